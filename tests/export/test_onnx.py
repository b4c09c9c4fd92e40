"""ONNX export: onnxruntime parity with the torch reference, TensorRT-flavour node contents, bad inputs."""

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from onnx import helper, numpy_helper

from lrq_deploy.calib.api import calibrate
from lrq_deploy.checkpoint import load_checkpoint
from lrq_deploy.cli import main
from lrq_deploy.calib.registry import CalibConfig
from lrq_deploy.quant.scheme import QuantScheme
from lrq_deploy.export import export_onnx
from lrq_deploy.quant.pack import unpack_array
from lrq_deploy.quant import QuantLinear

SCENARIOS = {
    "w4a16-g64": (QuantScheme(wbits=4, group_size=64), "rtn"),
    "w2a16-g64": (QuantScheme(wbits=2, group_size=64), "rtn"),
    "w8a8": (QuantScheme(wbits=8, abits=8, act_asym=False), "smoothquant"),
    "w4a4": (QuantScheme(wbits=4, abits=4, act_asym=False), "smoothquant"),
    "w4a4-g64": (QuantScheme(wbits=4, abits=4, group_size=64, act_asym=False), "rtn"),
    "w4a16-sym": (QuantScheme(wbits=4, group_size=64, symmetric=True), "rtn"),
    "w4a4-asym": (QuantScheme(wbits=4, abits=4, act_asym=True), "smoothquant"),
    "w4a8-g64-asym": (QuantScheme(wbits=4, abits=8, group_size=64, act_asym=True), "rtn"),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpts")
    for name, (qconfig, method) in SCENARIOS.items():
        calibrate("bundled:llama", root / name, qconfig, CalibConfig.of(method=method, nsamples=4, seqlen=64), device="cpu")
    calibrate("bundled:vit", root / "vit-w4a4", QuantScheme(wbits=4, abits=4, act_asym=False), CalibConfig.of(method="smoothquant", nsamples=64), device="cpu")
    return root


@pytest.mark.parametrize("name", ["w4a16-g64", "w2a16-g64", "w8a8", "w4a4", "w4a4-g64", "vit-w4a4", "w4a4-asym",
                                  "w4a8-g64-asym"])
def test_ort_graph_matches_torch_reference(checkpoints, tmp_path, name):
    out = tmp_path / f"{name}.onnx"
    report = export_onnx(checkpoints / name, out, target="ort", limit=4 if name != "vit-w4a4" else None)
    verify = report["verify"]
    assert verify["relative_difference"] < 0.005
    # weight-only: the same float ops; quantized activations: an activation at a rounding boundary after
    # the two runtimes' float ops can round the other way and move a whole step, flipping near-tied argmaxes
    # (4 of 256 positions of w4a4-asym on an AMD EPYC, none on an Intel Xeon)
    assert verify["argmax_agreement"] >= (0.995 if "a16" in name else 0.98)
    if "a16" in name:  # weight-only: same float ops in the same order up to GEMM accumulation
        assert verify["max_abs_logit_error"] < 1e-3
    assert json.loads(out.with_name(out.name + ".verify.json").read_text())["verify"] == verify
    assert all(n.domain != "lrq" for n in onnx.load(str(out)).graph.node)


@pytest.mark.parametrize("name", ["w8a8", "w4a4", "w4a4-g64", "w4a4-asym", "w4a8-g64-asym"])
def test_ort_graph_is_the_same_model_at_every_optimization_level(checkpoints, tmp_path, name):
    """Activation-quantized layers are integer GEMMs (MatMulInteger, uint8 x uint8): onnxruntime's
    graph optimizations, on by default, must not change what the graph computes (a float
    fake-quant graph is rewritten by them into a different model)."""
    import onnxruntime as ort

    out = tmp_path / f"{name}.onnx"
    export_onnx(checkpoints / name, out, target="ort", verify=False)
    ops = {n.op_type for n in onnx.load(str(out)).graph.node}
    assert "MatMulInteger" in ops and "DequantizeLinear" not in ops
    ids = np.random.default_rng(0).integers(0, 2048, (2, 64))
    logits = []
    for level in (ort.GraphOptimizationLevel.ORT_DISABLE_ALL, ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
        options = ort.SessionOptions()
        options.graph_optimization_level = level
        logits.append(ort.InferenceSession(str(out), options, providers=["CPUExecutionProvider"]).run(None, {"input_ids": ids})[0])
    # The quantized layers are exact at every level; what differs is float work elsewhere that
    # onnxruntime fuses (attention's FusedMatMul), which can move an activation across a
    # rounding boundary. The float fake-quant W4A4 graph differed
    # by 1.7 in the logits with 91% argmax agreement here.
    assert np.abs(logits[1] - logits[0]).max() < 0.25
    assert (logits[0].argmax(-1) == logits[1].argmax(-1)).mean() >= 0.99


def test_packed_sizes(checkpoints, tmp_path):
    w4 = export_onnx(checkpoints / "w4a16-g64", tmp_path / "a.onnx", verify=False)
    w2 = export_onnx(checkpoints / "w2a16-g64", tmp_path / "b.onnx", verify=False)
    # codes + fp32 scale and zero point per 64 weights: 4/16 + 0.031 + 0.004, 2/16 + 0.031 + 0.002
    assert w4["weight_ratio"] == pytest.approx(0.25 + 32 / 64 / 16 + 4 / 64 / 16, rel=0.02)
    assert w2["weight_ratio"] == pytest.approx(0.125 + 32 / 64 / 16 + 2 / 64 / 16, rel=0.02)
    w4a4 = export_onnx(checkpoints / "w4a4", tmp_path / "c.onnx", verify=False)  # integer GEMM pattern
    assert w4a4["weight_ratio"] == pytest.approx(0.25 + (32 + 8) / 192 / 16, rel=0.02)  # per-channel scale + zero


def _attrs(node):
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


@pytest.mark.parametrize("name,plugin", [("w4a4", "W4A4Linear"), ("w2a16-g64", "W2A16Linear"), ("w4a16-g64", "W4A16Linear"),
                                         ("w4a4-asym", "W4A4Linear")])
def test_trt_graph_has_one_plugin_node_per_linear(checkpoints, tmp_path, name, plugin):
    """... and the graph is verified against torch before it is written (its plugin nodes rewritten
    into the standard ops of --target ort, from their own bytes)."""
    out = tmp_path / f"{name}-trt.onnx"
    report = export_onnx(checkpoints / name, out, target="trt", limit=2)
    assert report["verify"]["relative_difference"] < 0.005 and report["verify"]["argmax_agreement"] >= 0.995
    assert json.loads(out.with_name(out.name + ".verify.json").read_text())["verify"] == report["verify"]
    model = onnx.load(str(out))
    ckpt = load_checkpoint(checkpoints / name)
    loaded, manifest = ckpt.loaded, ckpt.manifest
    nodes = [n for n in model.graph.node if n.domain == "lrq"]
    assert len(nodes) == len(manifest["quantized_modules"])
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    layers = {n: m for n, m in loaded.model.named_modules() if isinstance(m, QuantLinear)}
    for node in nodes:
        attrs = _attrs(node)
        assert node.op_type == plugin
        assert attrs["plugin_namespace"] == b"lrq" and attrs["aot"] == 1
        assert inits[node.input[1]].dtype == np.int8 and inits[node.input[3]].dtype == np.int8  # uint8 bytes
        qweight = inits[node.input[1]].view(np.uint8)
        layer = next(m for m in layers.values() if np.array_equal(m.qweight.numpy(), qweight))
        assert attrs["in_features"] == layer.in_features and attrs["out_features"] == layer.out_features
        assert attrs["wbits"] == manifest["quant"]["wbits"] and attrs["abits"] == manifest["quant"]["abits"]
        assert attrs["act_asym"] == int(manifest["quant"]["act_asym"])
        np.testing.assert_array_equal(inits[node.input[2]], layer.scales.numpy())
        np.testing.assert_array_equal(inits[node.input[3]].view(np.uint8), layer.zeros.numpy())
        codes = unpack_array(qweight, attrs["wbits"])
        np.testing.assert_array_equal(codes.reshape(layer.out_features, -1), layer.codes().numpy())


def test_trt_symmetric_int4_uses_native_block_dq(checkpoints, tmp_path):
    out = tmp_path / "sym-trt.onnx"
    report = export_onnx(checkpoints / "w4a16-sym", out, target="trt", limit=2)
    assert report["verify"]["max_abs_logit_error"] < 1e-3  # weight-only: the same float ops as the reference
    model = onnx.load(str(out))
    assert not [n for n in model.graph.node if n.domain == "lrq"]
    dqs = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    ckpt = load_checkpoint(checkpoints / "w4a16-sym")
    loaded, manifest = ckpt.loaded, ckpt.manifest
    assert len(dqs) == len(manifest["quantized_modules"])
    inits = {t.name: t for t in model.graph.initializer}
    first = loaded.model.model.layers[0].self_attn.q_proj
    weight = inits[dqs[0].input[0]]
    assert weight.data_type == onnx.TensorProto.INT4 and len(dqs[0].input) == 2  # no zero point
    codes = unpack_array(weight.raw_data, 4, int(np.prod(weight.dims)), signed=True).reshape(weight.dims)
    np.testing.assert_array_equal(codes.T + 8, first.codes().numpy())
    assert _attrs(dqs[0])["block_size"] == 64


def _clean_error(result, fragment):
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert fragment in result.output.strip().splitlines()[-1]


def test_bad_inputs(checkpoints, tmp_path):
    run = lambda *a: CliRunner().invoke(main, [str(x) for x in a])  # noqa: E731
    _clean_error(run("export", checkpoints / "w2a16-g64", "--onnx", tmp_path / "a.onnx", "--opset", "21"), "minimum is 25")
    assert not (tmp_path / "a.onnx").exists()
    _clean_error(run("export", checkpoints / "w4a4", "--onnx", tmp_path / "missing" / "a.onnx"), "does not exist")
    bad = tmp_path / "corrupt"
    bad.mkdir()
    for f in (checkpoints / "w4a4").iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    (bad / "model.safetensors").write_bytes(b"\x00" * 64)
    _clean_error(run("export", bad, "--onnx", tmp_path / "c.onnx"), "model.safetensors does not match manifest.json")
    manifest = json.loads((bad / "manifest.json").read_text())
    manifest["format_version"] = 7
    (bad / "manifest.json").write_text(json.dumps(manifest))
    _clean_error(run("export", bad, "--onnx", tmp_path / "c.onnx"), "format version 7")
    assert not list(tmp_path.glob("*.onnx"))


def test_a_graph_outside_tolerance_fails_the_export_unless_kept(checkpoints, tmp_path, monkeypatch):
    """Verification that fails makes the export fail with nothing written; --allow-outside-tolerance
    keeps the graph, and says so in its metadata and its verification record."""
    from lrq_deploy.export import verify

    monkeypatch.setattr(verify, "TOLERANCE", {**verify.TOLERANCE, "cosine": 1.5})  # no graph can meet it
    run = lambda *a: CliRunner().invoke(main, [str(x) for x in a])  # noqa: E731
    out = tmp_path / "w4.onnx"
    result = run("export", checkpoints / "w4a16-g64", "--onnx", out, "--limit", "2")
    _clean_error(result, "the graph fails its verification, nothing written")
    assert "OUTSIDE tolerance" in result.output and "--allow-outside-tolerance keeps it" in result.output
    assert not list(tmp_path.iterdir())
    result = run("export", checkpoints / "w4a16-g64", "--onnx", out, "--limit", "2", "--allow-outside-tolerance")
    assert result.exit_code == 0 and "OUTSIDE tolerance" in result.output, result.output
    metadata = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert metadata["lrq.allow_outside_tolerance"] == "true"
    record = json.loads(out.with_name(out.name + ".verify.json").read_text())["verify"]
    assert record["within_tolerance"] is False and record["allowed_outside_tolerance"] is True
    _clean_error(run("export", checkpoints / "w4a16-g64", "--onnx", tmp_path / "x.onnx", "--no-verify",
                     "--allow-outside-tolerance"), "drop --no-verify or the option")


def test_static_shape_is_verified_at_that_shape(checkpoints, tmp_path):
    """A valid static shape exports and verifies with inputs of exactly that shape."""
    out = tmp_path / "static.onnx"
    report = export_onnx(checkpoints / "w4a16-g64", out, batch=1, seq_len=128, limit=3)
    assert report["verify"]["samples"] == 3 and report["verify"]["relative_difference"] < 1e-4
    dims = [d.dim_value for d in onnx.load(str(out)).graph.input[0].type.tensor_type.shape.dim]
    assert dims == [1, 128]


def test_dynamic_axes(checkpoints, tmp_path):
    from lrq_deploy.runtime.onnxrt import reference_session as ort_session

    out = tmp_path / "dyn.onnx"
    export_onnx(checkpoints / "w4a16-g64", out, verify=False)
    session = ort_session(out)
    loaded = load_checkpoint(checkpoints / "w4a16-g64").loaded
    for shape in [(1, 7), (3, 40)]:
        ids = torch.randint(0, 2048, shape)
        got = session.run(None, {"input_ids": ids.numpy()})[0]
        with torch.no_grad():
            ref = loaded.model(input_ids=ids).logits.numpy()
        np.testing.assert_allclose(got, ref, atol=1e-3)


@pytest.mark.parametrize("name", ["w4a16-g64", "w4a4"])
def test_with_past_graph_prefill_and_decode(checkpoints, tmp_path, name):
    out = tmp_path / f"{name}-past.onnx"
    report = export_onnx(checkpoints / name, out, target="ort", limit=2, with_past=True)
    assert report["verify"]["relative_difference"] < 0.005
    assert report["verify_generation"]["match"], report["verify_generation"]
    model = onnx.load(str(out))
    inputs = [i.name for i in model.graph.input]
    assert inputs[0] == "input_ids" and inputs[1:3] == ["past.0.key", "past.0.value"]
    assert [o.name for o in model.graph.output][1] == "present.0.key"


def test_with_past_refused_for_vit(checkpoints, tmp_path):
    result = CliRunner().invoke(main, ["export", str(checkpoints / "vit-w4a4"), "--onnx", str(tmp_path / "v.onnx"), "--with-past"])
    _clean_error(result, "--with-past applies to causal language models")


def test_weights_beyond_the_protobuf_limit_go_to_external_data(checkpoints, tmp_path, monkeypatch):
    """Past 2 GiB of weights a graph keeps them in OUT.data; verified and recorded the same way
    (the limit is lowered here so that a small checkpoint takes that path)."""
    from lrq_deploy.export import onnx_export
    from lrq_deploy.info import describe

    monkeypatch.setattr(onnx_export, "INLINE_LIMIT", 1)
    out = tmp_path / "big.onnx"
    report = export_onnx(checkpoints / "w4a16-g64", out, limit=2)
    data = tmp_path / "big.onnx.data"
    assert data.is_file() and data.stat().st_size > out.stat().st_size
    assert data.stat().st_mode & 0o777 == out.stat().st_mode & 0o777  # not owner-only, like every other output
    assert report["file_bytes"] == out.stat().st_size + data.stat().st_size
    assert report["verify"]["max_abs_logit_error"] < 1e-3 and report["data_sha256"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.onnx", "big.onnx.data", "big.onnx.verify.json"]
    info = describe(out)
    assert info["intact"] and info["external_data_bytes"] == data.stat().st_size
    data.write_bytes(data.read_bytes()[:-1] + b"\x01")
    assert not describe(out)["intact"]



def test_external_data_graph_is_replaced_from_its_own_directory(checkpoints, tmp_path, monkeypatch):
    """--force over a graph with OUT.data, run from the directory that holds them (onnx's own
    external-data save refuses when the data file's name exists in the current directory)."""
    from lrq_deploy.export import onnx_export

    monkeypatch.setattr(onnx_export, "INLINE_LIMIT", 1)
    monkeypatch.chdir(tmp_path)
    export_onnx(checkpoints / "w4a16-g64", Path("big.onnx"), verify=False)
    first = (tmp_path / "big.onnx.data").read_bytes()
    export_onnx(checkpoints / "w4a16-g64", Path("big.onnx"), verify=False, force=True)
    assert (tmp_path / "big.onnx.data").read_bytes() == first


def test_ort_int8_activations_is_declared_and_verified_with_its_own_numerics(checkpoints, tmp_path):
    """--ort-int8-activations: the graph declares MatMulNBits accuracy level 4, sessions as
    deployed run it (outputs differ from the same graph without the declaration), and the
    verification report names those numerics and their own perplexity."""
    import numpy as np

    from lrq_deploy.runtime.onnxrt import ACCURACY_LEVEL_META, deployed_session

    plain = export_onnx(checkpoints / "w4a16-g64", tmp_path / "plain.onnx", limit=2)
    fast = export_onnx(checkpoints / "w4a16-g64", tmp_path / "int8.onnx", limit=2, ort_int8_activations=True)
    meta = {p.key: p.value for p in onnx.load(str(tmp_path / "int8.onnx")).metadata_props}
    assert meta[ACCURACY_LEVEL_META] == "4" and ACCURACY_LEVEL_META not in {
        p.key for p in onnx.load(str(tmp_path / "plain.onnx")).metadata_props}
    assert "int8" in fast["verify"]["onnxruntime_numerics"] and "as written" in plain["verify"]["onnxruntime_numerics"]
    assert plain["verify"]["onnxruntime"] == pytest.approx(plain["verify"]["torch"], rel=1e-5)
    assert fast["verify"]["onnxruntime"] != plain["verify"]["onnxruntime"]  # its own perplexity
    assert fast["verify"]["relative_difference"] < 0.02  # close, not equal: another model
    ids = {"input_ids": np.arange(32, dtype=np.int64).reshape(1, 32)}
    outputs = [deployed_session(tmp_path / f"{n}.onnx", device="cpu").run(None, ids)[0] for n in ("plain", "int8")]
    assert not np.array_equal(*outputs)
    assert np.abs(outputs[0] - outputs[1]).max() < 0.05 * np.abs(outputs[0]).max()


@pytest.mark.parametrize("group", [None, 32])
@pytest.mark.parametrize("wbits,abits", [(4, 4), (8, 8)])
@pytest.mark.parametrize("asym", [False, True], ids=["sym", "asym"])
def test_ort_integer_layer_is_bit_exact(group, wbits, abits, asym):
    """One lowered layer in onnxruntime: activation codes, scales and zero points equal the
    reference's bit for bit, and the int32 accumulators (zero-point corrections included) equal
    sum_k (xq - xz)(q - z) computed in int64."""
    import onnxruntime as ort

    from lrq_deploy.export.lower import lower
    from lrq_deploy.quant import quantize_activation, quantize_activation_asym, quantize_weight, weight_qparams

    gen = torch.Generator().manual_seed(0)
    k, n = 96, 40
    weight = torch.randn(n, k, generator=gen)
    config = QuantScheme(wbits=wbits, abits=abits, group_size=group, act_asym=asym)
    scale, zero = weight_qparams(weight, wbits, group, False)
    layer = QuantLinear.from_codes(quantize_weight(weight, scale, zero, wbits, group), scale, zero, None, config)
    inits = [numpy_helper.from_array(t.numpy(), name) for name, t in
             (("qweight", layer.qweight), ("scales", layer.scales), ("zeros", layer.zeros))]
    node = helper.make_node("QuantLinear", ["x", "qweight", "scales", "zeros"], ["y"], domain="lrq",
                            **config.to_attributes(), in_features=k)
    graph = helper.make_graph([node], "layer", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["m", k])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["m", n])], inits)
    model = lower(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("lrq", 1)]),
                  "ort")
    probes = ["lrq_linear_0.q", "lrq_linear_0.scale"] + (["lrq_linear_0.zero"] if asym else [])
    accumulator = "lrq_linear_0.acc_exact" if asym else "lrq_linear_0.acc"
    for name in probes + [accumulator]:
        model.graph.output.append(onnx.ValueInfoProto(name=name))
    x = torch.randn(7, k, generator=gen) * 2 + (0.6 if asym else 0.0)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    outputs = dict(zip([o.name for o in session.get_outputs()], session.run(None, {"x": x.numpy()})))
    reference = quantize_activation_asym(x, abits) if asym else (*quantize_activation(x, abits), torch.zeros(7, 1))
    for name, expected in zip(probes, reference):
        np.testing.assert_array_equal(outputs[name], expected.numpy())
    codes = (layer.codes().to(torch.int64) - layer.zeros.to(torch.int64).repeat_interleave(group or k, dim=1))
    centred = (reference[0] - reference[2]).to(torch.int64)
    if group is None:
        np.testing.assert_array_equal(outputs[accumulator], (centred @ codes.T).numpy())
    else:  # [groups, m, n]: one accumulator per weight group
        per_group = torch.stack([centred[:, g:g + group] @ codes[:, g:g + group].T for g in range(0, k, group)])
        np.testing.assert_array_equal(outputs[accumulator], per_group.numpy())
    torch.testing.assert_close(torch.from_numpy(outputs["y"]), layer(x), rtol=1e-5, atol=1e-4)


def test_cpu_kernel_graph_matches_torch_and_the_matmulnbits_graph(checkpoints, tmp_path):
    """--cpu-kernels: every 4-bit linear as ai.lrq.cpu::MatMulInt4 (asymmetric here: zero points
    as inputs), verified against torch; its logits equal the MatMulNBits graph's up to fp32
    summation order."""
    from lrq_deploy.runtime.cpu_kernels import DOMAIN
    from lrq_deploy.runtime.onnxrt import OrtSession

    ours, theirs = tmp_path / "ck.onnx", tmp_path / "nbits.onnx"
    report = export_onnx(checkpoints / "w4a16-g64", ours, limit=2, cpu_kernels=True)
    export_onnx(checkpoints / "w4a16-g64", theirs, verify=False)
    assert report["cpu_kernel_linears"] == 16 and report["verify"]["within_tolerance"]
    assert {n.op_type for n in onnx.load(str(ours)).graph.node if n.domain == DOMAIN} == {"MatMulInt4"}
    ids = np.random.default_rng(0).integers(0, 100, (2, 24)).astype(np.int64)
    feeds = {"input_ids": ids}
    a, b = (OrtSession(p).run(feeds)["logits"] for p in (ours, theirs))
    assert np.abs(a - b).max() <= 1e-4 * np.abs(b).max()
