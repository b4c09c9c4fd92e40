"""onnxruntime sessions: the reference (optimizations off, CPU) and as deployed; OrtSession is
the session type every stage runs graphs with (verification, bench, decode)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from lrq_deploy.errors import LrqError
from lrq_deploy.runtime.threads import intra_op_threads

MATMULNBITS_ACCURACY_KEY = "session.qdq_matmulnbits_accuracy_level"
# Graph metadata of an export for onnxruntime's int8-activation MatMulNBits (lrq export
# --ort-int8-activations): sessions as deployed then fuse at that accuracy level.
ACCURACY_LEVEL_META = "lrq.ort_matmulnbits_accuracy_level"
INT8_ACTIVATIONS_LEVEL = "4"


@lru_cache(maxsize=1)
def onnxruntime_opset() -> int:
    """The highest default-domain opset the installed onnxruntime loads (it has no query for
    it): a one-node graph tried from onnx's highest opset down."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    value = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1]) for n in "xy"]
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "probe", value[:1], value[1:])
    for version in range(onnx.defs.onnx_opset_version(), 17, -1):
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", version)])
        model.ir_version = min(model.ir_version, onnx.IR_VERSION)
        options = ort.SessionOptions()
        options.log_severity_level = 4
        try:
            ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
            return version
        except Exception:  # onnxruntime's errors are its own types: "opset N is under development" and the like
            continue
    return 18


def reference_session(path: Path):
    """Graph optimizations off, CPU: the optimizer would fuse DQ(int4) + MatMul into
    MatMulNBits, which is not bit-exact; verification compares the graph as written."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    return _session(path, options, ["CPUExecutionProvider"])


def deployed_session(path: Path, optimize: bool = True, device: str = "auto"):
    """As deployed: graph optimizations on; every available provider (auto), the CPU only
    (cpu), or CUDA, refused when onnxruntime has no CUDA provider (cuda)."""
    import onnxruntime as ort

    providers = ort.get_available_providers()
    if device == "cpu":
        providers = ["CPUExecutionProvider"]
    elif device == "cuda":
        if "CUDAExecutionProvider" not in providers:
            raise LrqError("--device cuda: this onnxruntime has no CUDA provider (pip install onnxruntime-gpu, "
                           "or lrq-deploy[trt])")
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]

    def session(level: str):
        options = ort.SessionOptions()
        if not optimize:
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        # The optimizer fuses INT4/INT2 DequantizeLinear + MatMul into MatMulNBits, by default at
        # accuracy level 4 (activations rounded to int8): another model. Level 1 computes in fp32;
        # level 4 only where the export declared it (the declaration is read from the session).
        options.add_session_config_entry(MATMULNBITS_ACCURACY_KEY, level)
        options.log_severity_level = 3
        threads = intra_op_threads()
        if threads is not None:
            options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        return _session(path, options, providers)

    first = session("1")
    declared = first.get_modelmeta().custom_metadata_map.get(ACCURACY_LEVEL_META, "1")
    return first if declared == "1" else session(declared)


class OrtSession:
    """One graph in onnxruntime, as deployed (default) or as the reference (optimizations off,
    CPU): its inputs as tensor specs, what the export recorded, and runs on numpy feeds."""

    def __init__(self, path: Path, reference: bool = False, optimize: bool = True, device: str = "auto"):
        self.path = Path(path)
        self.session = reference_session(self.path) if reference else deployed_session(self.path, optimize, device)
        self.device = "cuda" if "CUDAExecutionProvider" in self.session.get_providers() else "cpu"
        self.output_names = [o.name for o in self.session.get_outputs()]

    def input_specs(self) -> list:
        return input_specs(self.session)

    @property
    def metadata(self) -> dict:
        return dict(self.session.get_modelmeta().custom_metadata_map)

    @property
    def max_positions(self) -> int | None:
        """The model's positions recorded at export (lrq.max_seq_len), if any."""
        longest = self.metadata.get("lrq.max_seq_len")
        return int(longest) if longest else None

    @property
    def has_kv_cache(self) -> bool:
        from lrq_deploy.graph_io import PAST_PREFIX

        return any(i.name.startswith(PAST_PREFIX) for i in self.session.get_inputs())

    def run(self, feeds: dict) -> dict:
        return dict(zip(self.output_names, self.session.run(None, feeds)))


def declares_int8_activations(session) -> bool:
    """Whether the graph was exported for MatMulNBits at accuracy level 4 (lrq export --ort-int8-activations)."""
    return session.get_modelmeta().custom_metadata_map.get(ACCURACY_LEVEL_META) == INT8_ACTIVATIONS_LEVEL


def _session(path: Path, options, providers):
    import onnxruntime as ort

    from lrq_deploy.runtime import cpu_kernels

    if cpu_kernels.needs_library(path):
        cpu_kernels.register(options)
    try:
        return ort.InferenceSession(str(path), options, providers=providers)
    except Exception as exc:  # onnxruntime raises its own exception types for unreadable graphs
        raise LrqError(f"onnxruntime cannot load {path}: {str(exc).splitlines()[0]}") from None


ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int64)": "int64", "tensor(int32)": "int32",
             "tensor(uint8)": "uint8"}


def input_specs(session) -> list:
    """The session's inputs as tensor specs (symbolic dims keep the graph's axis names)."""
    from lrq_deploy.graph_io import TensorSpec

    return [TensorSpec(i.name, ORT_TYPES.get(i.type, "float32"), tuple(i.shape)) for i in session.get_inputs()]


def empty_past(session, batch: int) -> dict:
    """Zero-length KV-cache inputs of a --with-past graph: the graph then runs as prefill."""
    import numpy as np

    from lrq_deploy.graph_io import PAST_PREFIX

    return {spec.name: np.zeros((batch, spec.shape[1], 0, spec.shape[3]), dtype=ORT_TYPES.get(spec.type, "float32"))
            for spec in session.get_inputs() if spec.name.startswith(PAST_PREFIX)}


def step_feeds(session, input_ids, past: dict | None = None) -> dict:
    """One step's feeds of a --with-past graph: the new tokens [B, S], the cache so far (None: an
    empty one; the graph then runs as prefill) and, for a graph that takes one (its cache kept in
    place, export/attention.py lengths_from_mask), the attention mask over past and new tokens."""
    import numpy as np

    from lrq_deploy.graph_io import ATTENTION_MASK

    past = empty_past(session, input_ids.shape[0]) if past is None else past
    feeds = {"input_ids": input_ids, **past}
    if any(spec.name == ATTENTION_MASK for spec in session.get_inputs()):
        past_length = next(iter(past.values())).shape[2] if past else 0
        feeds[ATTENTION_MASK] = np.ones((input_ids.shape[0], past_length + input_ids.shape[1]), dtype=np.int64)
    return feeds


def next_past(outputs: dict) -> dict:
    """The present.* outputs of one step as the past.* inputs of the next."""
    from lrq_deploy.graph_io import PAST_PREFIX, PRESENT_PREFIX

    return {n.replace(PRESENT_PREFIX, PAST_PREFIX): v for n, v in outputs.items() if n.startswith(PRESENT_PREFIX)}


def declare_onnxruntime_norm() -> None:
    """Declare SimplifiedLayerNormalization to onnx: onnxruntime registers it in the default ONNX
    domain, so graphs onnxruntime saves with it (lrq export --genai) read as unknown ops to onnx's
    checker without this."""
    import onnx
    from onnx.defs import OpSchema

    if onnx.defs.has("SimplifiedLayerNormalization"):
        return
    param, optional = OpSchema.FormalParameter, OpSchema.FormalParameterOption.Optional
    floats = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)", "tensor(double)"]
    schema = OpSchema(
        "SimplifiedLayerNormalization", "", 1, doc="onnxruntime's RMSNorm: x / sqrt(mean(x^2) + epsilon) * scale",
        inputs=[param("X", "T"), param("scale", "V")],
        outputs=[param("Y", "V"), param("inv_std_var", "U", param_option=optional)],
        type_constraints=[("T", floats, ""), ("V", floats, ""), ("U", ["tensor(float)", "tensor(double)"], "")],
        attributes=[OpSchema.Attribute("axis", OpSchema.AttrType.INT, ""),
                    OpSchema.Attribute("epsilon", OpSchema.AttrType.FLOAT, ""),
                    OpSchema.Attribute("stash_type", OpSchema.AttrType.INT, "")],
    )
    onnx.defs.register_schema(schema)
