"""`lrq build-engine --verify`: the engine against onnxruntime on the same inputs.

The reference is the graph the engine was built from, with each lrq plugin node rewritten into
the standard ops of `--target ort` (lrq_deploy.export.lower_trt.ort_reference), run by onnxruntime
on CPU: both sides then compute the same quantized model. Inputs come from the runtime layer's
generator at the profile's opt shapes; the comparison is the one export verification uses.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import onnx

from lrq_deploy.errors import LrqError
from lrq_deploy.runtime.compare import compare_runs, run_iterations
from lrq_deploy.runtime.inputs import make_feeds
from lrq_deploy.runtime.runners import TrtRunner, ort_runner
from lrq_deploy.graph_io import TensorSpec


def verification_feeds(model: onnx.ModelProto, shapes: dict, seed: int = 0) -> dict:
    """Inputs for every graph input at its opt shape (explicit, or the default profile's)."""
    from lrq_deploy.graph_io import AXIS_RANGES

    specs = []
    for spec in model.graph.input:
        tensor = spec.type.tensor_type
        dims = tuple(shapes[spec.name][1]) if spec.name in shapes else tuple(
            d.dim_value if d.dim_value > 0 else d.dim_param for d in tensor.shape.dim)
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name
        specs.append(TensorSpec(spec.name, dtype, dims))
    return make_feeds(specs, {axis: r[1] for axis, r in AXIS_RANGES.items()}, seed)


def verify_engine(engine_path: Path, onnx_path: Path, shapes: dict, flavour: str | None = None) -> dict:
    """Per output: Polygraphy's error statistics, cosine and argmax agreement (runtime.compare)."""
    from lrq_deploy.export.lower_trt import ort_reference

    model = onnx.load(str(onnx_path))
    feeds = [verification_feeds(model, shapes)]
    with tempfile.TemporaryDirectory() as scratch:
        reference_path = Path(scratch) / "reference.onnx"
        onnx.save(ort_reference(model), str(reference_path))
        reference = run_iterations(ort_runner(reference_path), feeds)
    produced = run_iterations(TrtRunner(engine_path, flavour), feeds)
    missing = sorted(set(reference[0]) - set(produced[0]))
    if missing:
        raise LrqError(f"the engine lacks the graph outputs {', '.join(missing)}")
    return compare_runs(("onnxruntime", reference), ("tensorrt", produced), atol=1e-2, rtol=1e-2)
