"""A Triton Inference Server model repository for an exported graph or a built engine:

    REPO/NAME/config.pbtxt      inputs, outputs, dtypes and dims from the graph (dynamic axes -1),
                                max_batch_size and dynamic batching from the batch axis
    REPO/NAME/1/model.onnx      (+ its external data file) or 1/model.plan

The configuration is built as Triton's own ModelConfig protobuf (tritonclient), so what is
written is what the server parses. Graphs with a KV cache (--with-past) declare the past.* /
present.* tensors and get no dynamic batcher: requests carry caches of different lengths,
which cannot be stacked into one batch.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from lrq_deploy.atomic import OutputKind, atomic_directory, claim_output
from lrq_deploy.errors import LrqError
from lrq_deploy.graph_io import BATCH_AXIS, PAST_PREFIX

INSTALL_HINT = 'pip install "lrq-deploy[serve]"'
ONNX_BATCH_LIMIT = 8  # max_batch_size for graphs with a dynamic batch axis (no profile says otherwise)
TRITON_TYPES = {"FLOAT": "TYPE_FP32", "FLOAT16": "TYPE_FP16", "BFLOAT16": "TYPE_BF16", "INT64": "TYPE_INT64",
                "INT32": "TYPE_INT32", "INT8": "TYPE_INT8", "UINT8": "TYPE_UINT8", "BOOL": "TYPE_BOOL"}


def model_name_for(path: Path) -> str:
    """Triton model names: letters, digits, '-', '_' and '.'."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", Path(path).stem) or "model"


OUTPUT = OutputKind("Triton model directory", directory=True,
                    recognise=lambda p: (Path(p) / "config.pbtxt").is_file() and (Path(p) / "1").is_dir())


def check_repository_target(repo: Path, name: str, force: bool, inputs=()) -> Path:
    """The model directory REPO/NAME, claimed before any work (writable; not an input; replaced
    only with force, and only when it is a Triton model directory)."""
    target = Path(repo) / name
    claim_output(target, OUTPUT, force, inputs=inputs, option="--triton-repo")
    return target


def check_plugins_servable(plugins: str | None) -> None:
    """Engines whose lrq plugin layers are Python plugins ("python") need lrq-deploy in the process
    that runs them, which Triton's TensorRT backend is not; ahead-of-time plugins ("aot") serve."""
    if plugins == "python":
        raise LrqError("this engine holds lrq Python plugin layers, which Triton's TensorRT backend cannot load; "
                       "build with full TensorRT (ahead-of-time plugins) or export the graph with --triton-repo")


def onnx_repository(onnx_path: Path, repo: Path, name: str | None = None, force: bool = False) -> Path:
    """REPO/NAME for an ONNX graph (Triton's onnxruntime backend); returns the model directory."""
    import onnx

    onnx_path = Path(onnx_path)
    target = check_repository_target(repo, name or model_name_for(onnx_path), force, inputs=[onnx_path])
    model = onnx.load(str(onnx_path), load_external_data=False)
    config = model_config(target.name, "onnxruntime_onnx", model.graph, max_batch=ONNX_BATCH_LIMIT)
    data = [onnx_path.with_name(loc) for loc in _external_locations(model.graph)]
    _write(target, config, {"model.onnx": onnx_path, **{f.name: f for f in data}})
    return target


def engine_repository(engine: Path, record: dict, repo: Path, name: str | None = None, force: bool = False) -> Path:
    """REPO/NAME for an engine (Triton's TensorRT backend), its tensors read from the graph it was
    built from (recorded in the build record) and its batch limit from the build profile."""
    import onnx

    if record.get("flavour") != "tensorrt":
        raise LrqError("Triton's TensorRT backend runs engines of full TensorRT; this engine was built with "
                       f"{record.get('flavour')} (build with --flavour tensorrt for Triton)")
    check_plugins_servable(record.get("plugins"))
    target = check_repository_target(repo, name or model_name_for(engine), force, inputs=[engine])
    source = Path(record["onnx"]["path"])
    if not source.is_file():
        raise LrqError(f"the graph {source} the engine was built from is gone; its inputs and outputs name the "
                       "engine's tensors in config.pbtxt")
    graph = onnx.load(str(source), load_external_data=False).graph
    batch = max((shapes[2][0] for shapes in record.get("profile", {}).values()), default=ONNX_BATCH_LIMIT)
    config = model_config(target.name, "tensorrt_plan", graph, max_batch=batch)
    _write(target, config, {"model.plan": Path(engine)})
    return target


def model_config(name: str, platform: str, graph, max_batch: int):
    """Triton's ModelConfig for `graph`'s inputs and outputs."""
    mc = _model_config_pb2()
    batched = _batch_is_dynamic(graph)
    config = mc.ModelConfig(name=name, platform=platform, max_batch_size=max_batch if batched else 0)
    for values, field in ((graph.input, config.input), (graph.output, config.output)):
        for value in values:
            dims = _dims(value)
            field.add(name=value.name, data_type=mc.DataType.Value(_triton_type(value)),
                      dims=dims[1:] if batched else dims)
    if batched and not any(v.name.startswith(PAST_PREFIX) for v in graph.input):
        config.dynamic_batching.SetInParent()
    return config


def config_text(config) -> str:
    from google.protobuf import text_format

    return text_format.MessageToString(config)


def _batch_is_dynamic(graph) -> bool:
    """Every input and output leads with the symbolic batch axis."""
    values = list(graph.input) + list(graph.output)
    firsts = [v.type.tensor_type.shape.dim[0] for v in values if v.type.tensor_type.shape.dim]
    return bool(firsts) and all(d.dim_param and BATCH_AXIS in d.dim_param for d in firsts)


def _dims(value) -> list[int]:
    return [d.dim_value if d.dim_value > 0 else -1 for d in value.type.tensor_type.shape.dim]


def _triton_type(value) -> str:
    import onnx

    name = onnx.TensorProto.DataType.Name(value.type.tensor_type.elem_type)
    if name not in TRITON_TYPES:
        raise LrqError(f"tensor {value.name} has type {name}, which Triton model configs do not express")
    return TRITON_TYPES[name]


def _external_locations(graph) -> set[str]:
    """Files holding the graph's external weights (ONNX graphs past 2 GiB), relative to it."""
    import onnx

    return {entry.value for tensor in graph.initializer if tensor.data_location == onnx.TensorProto.EXTERNAL
            for entry in tensor.external_data if entry.key == "location"}


def _model_config_pb2():
    try:
        from tritonclient.grpc import model_config_pb2
    except ImportError:
        raise LrqError(f"writing a Triton model repository needs tritonclient: {INSTALL_HINT}") from None
    return model_config_pb2


def _write(target: Path, config, files: dict[str, Path]) -> None:
    """config.pbtxt and 1/<files>, staged beside the target, then moved into place."""

    def write(staging: Path) -> None:
        (staging / "config.pbtxt").write_text(config_text(config))
        (staging / "1").mkdir()
        for name, source in files.items():
            shutil.copyfile(source, staging / "1" / name)

    atomic_directory(target, write)
