"""Graphs for onnxruntime: linears reading one input fused into one GEMM (exact), and per-channel
4-bit weights in blocks onnxruntime fuses into MatMulNBits (the same dequantized weight)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from lrq_deploy.calib.api import calibrate
from lrq_deploy.calib.registry import CalibConfig
from lrq_deploy.export import export_onnx
from lrq_deploy.export.lower_ort import matmulnbits_block
from lrq_deploy.export.norms import norms_as_division
from lrq_deploy.quant.scheme import QuantScheme
from lrq_deploy.runtime.onnxrt import deployed_session, reference_session


@pytest.fixture(scope="module")
def checkpoints(tiny_llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("fuse")
    for name, scheme in (("w4g32", QuantScheme(wbits=4, group_size=32)), ("w4a4", QuantScheme(wbits=4, abits=4))):
        calibrate(str(tiny_llama_dir), root / name, scheme, CalibConfig.of("rtn", nsamples=2, seqlen=16), device="cpu")
    return root


def with_norms_as_division(graph) -> None:
    model = onnx.load(str(graph))
    norms_as_division(model)
    onnx.save(model, str(graph))


def logits(session, ids) -> np.ndarray:
    return session.run(None, {"input_ids": ids})[0]


@pytest.mark.parametrize("name", ["w4g32", "w4a4"])
def test_fused_graph_computes_what_the_unfused_one_does(checkpoints, tmp_path, name):
    fused, plain = tmp_path / "fused.onnx", tmp_path / "plain.onnx"
    report = export_onnx(checkpoints / name, fused, target="ort", limit=2, contrib_ops=False)
    export_onnx(checkpoints / name, plain, target="ort", verify=False, fuse=False)
    with_norms_as_division(plain)  # what fuse=True also does: the comparison is about the linears
    assert report["fused_linears"] == 3 * 2  # per layer: k, v into q; up into gate
    assert report["verify"]["within_tolerance"]
    gemm = "MatMulInteger" if name == "w4a4" else "MatMul"
    counts = [Counter(n.op_type for n in onnx.load(str(g)).graph.node if n.name.startswith("lrq_linear_"))[gemm]
              for g in (fused, plain)]
    assert counts == [4 * 2, 7 * 2]  # q/k/v, o, gate/up, down per layer
    ids = np.random.default_rng(0).integers(0, 2048, (2, 48))
    a, b = logits(reference_session(fused), ids), logits(reference_session(plain), ids)
    if name == "w4a4":  # integer GEMMs: the activation quantized once or three times, the same codes
        assert np.array_equal(a, b)
    else:
        assert np.abs(a - b).max() < 1e-5
    deployed = [logits(deployed_session(g, device="cpu"), ids) for g in (fused, plain)]
    assert np.abs(deployed[0] - deployed[1]).max() < 1e-4
    assert (deployed[0].argmax(-1) == deployed[1].argmax(-1)).all()


def test_per_channel_int4_runs_as_matmulnbits(tmp_path):
    """The bundled LLaMA's widths (192, 512) are no MatMulNBits block: its per-channel scales go in
    blocks of 64 / 256 (one scale repeated), so onnxruntime fuses every linear into MatMulNBits."""
    assert (matmulnbits_block(192), matmulnbits_block(512), matmulnbits_block(11008), matmulnbits_block(100)) == \
        (64, 256, 256, None)
    ckpt, graph = tmp_path / "q", tmp_path / "q.onnx"
    calibrate("bundled:llama", ckpt, QuantScheme(wbits=4), CalibConfig.of("rtn", nsamples=2, seqlen=32), device="cpu")
    report = export_onnx(ckpt, graph, target="ort", limit=2)
    assert report["verify"]["within_tolerance"] and report["verify"]["max_abs_logit_error"] < 1e-3
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
    ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
    ops = Counter(n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node)
    assert ops["DequantizeLinear"] == 0 and ops["MatMulNBits"] == 4 * 4  # 4 layers, q/k/v and gate/up fused


def test_rms_norms_become_one_onnxruntime_kernel(checkpoints, tmp_path):
    """Every RMSNorm (2 per layer and the final one) is written as a division, which onnxruntime
    fuses into SimplifiedLayerNormalization; the logits stay those of the reciprocal form."""
    rewritten, plain = tmp_path / "norms.onnx", tmp_path / "plain.onnx"
    report = export_onnx(checkpoints / "w4g32", rewritten, target="ort", limit=2)
    export_onnx(checkpoints / "w4g32", plain, target="ort", verify=False, fuse=False)
    assert report["norms_for_ort"] == 2 * 2 + 1 and report["verify"]["within_tolerance"]
    ops = Counter(n.op_type for n in onnx.load(str(rewritten)).graph.node)
    # the norms after a residual add are one SkipSimplifiedLayerNormalization with it; the
    # first (reading the embeddings) stays in division form, which onnxruntime fuses itself
    assert ops["Reciprocal"] == 0 and ops["SkipSimplifiedLayerNormalization"] == 4 and ops["Div"] == 1
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(rewritten), options, providers=["CPUExecutionProvider"])
    optimized = Counter(n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node)
    assert optimized["SimplifiedLayerNormalization"] + optimized["SkipSimplifiedLayerNormalization"] == 5
    assert optimized["Pow"] == optimized["ReduceMean"] == 0
    ids = np.random.default_rng(1).integers(0, 2048, (2, 48))
    a, b = logits(reference_session(rewritten), ids), logits(reference_session(plain), ids)
    assert np.abs(a - b).max() < 1e-4 * np.abs(b).max()


@pytest.fixture(scope="module")
def kv_graphs(checkpoints, tmp_path_factory):
    """The W4-g32 checkpoint's --with-past graph with GroupQueryAttention and in standard ops."""
    root = tmp_path_factory.mktemp("gqa")
    report = export_onnx(checkpoints / "w4g32", root / "gqa.onnx", target="ort", with_past=True, limit=2)
    export_onnx(checkpoints / "w4g32", root / "std.onnx", target="ort", with_past=True, contrib_ops=False, verify=False)
    return report, root / "gqa.onnx", root / "std.onnx"


def decode(session, prompt: np.ndarray, steps: int) -> list[np.ndarray]:
    """Prefill then greedy steps; the logits of every run."""
    from lrq_deploy.runtime.onnxrt import empty_past, next_past

    names = [o.name for o in session.get_outputs()]
    feeds, out = {"input_ids": prompt, **empty_past(session, len(prompt))}, []
    for _ in range(steps):
        outputs = dict(zip(names, session.run(None, feeds)))
        out.append(outputs["logits"])
        feeds = {"input_ids": outputs["logits"][:, -1:].argmax(-1), **next_past(outputs)}
    return out


def test_attention_is_one_group_query_attention_node_per_layer(kv_graphs):
    report, gqa, std = kv_graphs
    assert report["attention"] == "GroupQueryAttention" and report["verify"]["within_tolerance"]
    assert report["verify_generation"]["match"]
    nodes = onnx.load(str(gqa)).graph.node
    ops = Counter(n.op_type for n in nodes)
    assert ops["GroupQueryAttention"] == 2 and ops["Softmax"] == 0
    # q/k/v are one fused linear: its output goes to the node packed, without the Split
    assert all(n.input[1] == n.input[2] == "" for n in nodes if n.op_type == "GroupQueryAttention")
    assert ops["Split"] == 2  # gate/up only
    assert Counter(n.op_type for n in onnx.load(str(std)).graph.node)["GroupQueryAttention"] == 0
    prompt = np.random.default_rng(2).integers(0, 2048, (2, 12))
    for a, b in zip(decode(reference_session(gqa), prompt, 4), decode(reference_session(std), prompt, 4)):
        assert np.abs(a - b).max() < 1e-4 * np.abs(b).max()  # float order of the fused kernel, same values


def assert_op_is_the_models_attention(loaded, layout, new_tokens: int, past_tokens: int) -> None:
    """The custom op's eager body, swapped into every attention module, gives the logits and
    present cache of the HF model it replaces for a chunk of new tokens after a random past."""
    import torch

    from lrq_deploy.export.attention import group_query_attention_modules
    from lrq_deploy.models.causal_lm import _WithPast

    wrapper = _WithPast(loaded.model)
    ids = torch.randint(0, 2048, (2, new_tokens), generator=torch.Generator().manual_seed(0))
    shape = (2, layout.kv_heads, past_tokens, layout.head_dim)
    past = tuple(torch.randn(shape, generator=torch.Generator().manual_seed(i)) for i in range(2 * len(layout.modules)))
    with torch.no_grad():
        reference = wrapper(ids, past)
        with group_query_attention_modules(layout):
            fused = wrapper(ids, past)
    for a, b in zip(fused, reference):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)


def test_group_query_attention_op_computes_the_models_attention(tiny_llama_dir):
    from lrq_deploy.models import load_model

    loaded = load_model(str(tiny_llama_dir))
    layout = loaded.adapter.attention_layout(loaded.model)
    assert (layout.num_heads, layout.kv_heads, layout.head_dim) == (4, 2, 16)
    assert_op_is_the_models_attention(loaded, layout, new_tokens=9, past_tokens=5)


def test_group_query_attention_op_windows_soft_capping_and_qk_norms(tmp_path):
    """Gemma 2: an 8-token sliding window on every other layer and soft-capped scores; Gemma 3:
    q/k norms and a rotary table per layer type; both after a past longer than the window."""
    from conftest import _save_hf
    from lrq_deploy.models import load_model
    from lrq_deploy.models.tiny import tiny_model

    for model_type, windows, softcap in (("gemma2", [8, -1], 50.0), ("gemma3_text", [8, -1, 8], 0.0)):
        loaded = load_model(str(_save_hf(tiny_model(model_type), tmp_path / model_type)))
        layout = loaded.adapter.attention_layout(loaded.model)
        assert layout.windows == windows and layout.softcap == softcap
        assert_op_is_the_models_attention(loaded, layout, new_tokens=7, past_tokens=11)


def test_sliding_window_attention_keeps_standard_ops(tiny_llama_dir):
    from lrq_deploy.models import load_model

    loaded = load_model(str(tiny_llama_dir))
    loaded.model.config.sliding_window = 64
    assert loaded.adapter.attention_layout(loaded.model) is None
