"""`lrq build-engine --verify`: the engine against onnxruntime on the same inputs.

The reference is the graph the engine was built from, with each lrq plugin node rewritten into
the standard ops of `--target ort` (lrq_deploy.export.lower.ort_reference), run by onnxruntime
on CPU: both sides then compute the same quantized model.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx

from lrq_deploy.errors import LrqError

TOKEN_RANGE = 100  # input ids drawn from [0, 100): valid for every vocabulary


def verification_feeds(model: onnx.ModelProto, shapes: dict, seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs for every graph input at its opt shape (explicit or the default profile's)."""
    from lrq_deploy.engine.build import AXIS_RANGES

    rng = np.random.default_rng(seed)
    feeds = {}
    for spec in model.graph.input:
        dims = []
        for d in spec.type.tensor_type.shape.dim:
            key = "past" if "past" in d.dim_param else ("seq" if "seq" in d.dim_param else "batch")
            dims.append(d.dim_value if d.dim_value > 0 else AXIS_RANGES[key][1])
        shape = tuple(shapes[spec.name][1]) if spec.name in shapes else tuple(dims)
        if spec.type.tensor_type.elem_type == onnx.TensorProto.INT64:
            feeds[spec.name] = rng.integers(0, TOKEN_RANGE, shape, dtype=np.int64)
        else:
            feeds[spec.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


def compare_outputs(engine_out: np.ndarray, reference: np.ndarray) -> dict:
    diff = np.abs(engine_out.astype(np.float64) - reference.astype(np.float64))
    a, b = engine_out.reshape(-1).astype(np.float64), reference.reshape(-1).astype(np.float64)
    return {
        "max_abs_error": float(diff.max()),
        "mean_abs_error": float(diff.mean()),
        "cosine": float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-30)),
        "argmax_agreement": float((engine_out.argmax(-1) == reference.argmax(-1)).mean()),
    }


def verify_engine(engine_path: Path, onnx_path: Path, shapes: dict, flavour: str | None = None) -> dict:
    from lrq_deploy.engine.runner import EngineSession
    from lrq_deploy.export.lower import ort_reference
    from lrq_deploy.export.verify import ort_session

    model = onnx.load(str(onnx_path))
    feeds = verification_feeds(model, shapes)
    session = EngineSession(engine_path, flavour)
    with tempfile.TemporaryDirectory() as scratch:
        reference_path = Path(scratch) / "reference.onnx"
        onnx.save(ort_reference(model), str(reference_path))
        ort = ort_session(reference_path)
        reference = dict(zip([o.name for o in ort.get_outputs()], ort.run(None, feeds)))
    produced = session.run(feeds)
    missing = sorted(set(reference) - set(produced))
    if missing:
        raise LrqError(f"the engine lacks the graph outputs {', '.join(missing)}")
    return {name: compare_outputs(produced[name], reference[name]) for name in reference}
