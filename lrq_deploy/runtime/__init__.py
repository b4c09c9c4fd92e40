"""Running models, one layer for every stage that runs them (export and engine verification,
eval, bench): Polygraphy runners for onnxruntime, TensorRT and torch, one input generator
driven by the graph's axis names, one comparison. Heavy libraries are imported lazily."""
