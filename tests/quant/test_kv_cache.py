"""The quantized KV cache: its arithmetic by hand, the stored form against the fake quantization the
model computes with, the cache the model keeps during generation, and calibration end to end."""

from __future__ import annotations

import onnx
import pytest
import torch

from lrq_deploy.calib.api import calibrate
from lrq_deploy.errors import LrqError
from lrq_deploy.calib.registry import CalibConfig
from lrq_deploy.checkpoint import load_checkpoint
from lrq_deploy.models import load_model
from lrq_deploy.quant.floats import E4M3, round_to_format
from lrq_deploy.quant.kv_cache import (
    KVCacheQuantizer, dequantize_kv, fake_quant_kv, kv_bytes_per_token, kv_quantization_off, kv_quantizers,
    pack_stored, quantize_kv, quantize_kv_cache, unpack_stored,
)
from lrq_deploy.quant.scheme import QuantScheme

FORMATS = ("int8", "int4", "fp8")


def test_int8_codes_by_hand():
    """One token, one head: [min, max] = [-1, 3] over 255 levels, zero point round(1 / step) = 64."""
    x = torch.tensor([[-1.0, 0.0, 0.5, 3.0]])
    codes, step, zero = quantize_kv(x, "int8")
    assert step.item() == pytest.approx(4 / 255)
    assert zero.item() == 64
    assert codes.tolist() == [[0, 64, round(0.5 * 255 / 4) + 64, 255]]
    assert codes.dtype == torch.uint8 and zero.dtype == torch.uint8


@pytest.mark.parametrize("fmt", FORMATS)
def test_stored_form_is_what_the_model_computes_with(fmt):
    """dequantize(quantize(x)) equals the fake quantization of the forward pass bit for bit, per token
    and head; the int error stays within half a step."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 16) * 3
    scale = torch.tensor(x.abs().amax().item() / E4M3.max_value) if fmt == "fp8" else None
    stored = quantize_kv(x, fmt, scale)
    assert torch.equal(dequantize_kv(stored, fmt), fake_quant_kv(x, fmt, scale))
    if fmt != "fp8":
        codes, step, _ = stored
        assert int(codes.max()) <= (255 if fmt == "int8" else 15)
        assert ((dequantize_kv(stored, fmt) - x).abs() <= step / 2 + 1e-6).all()
    else:
        assert torch.equal(dequantize_kv(stored, fmt), round_to_format(x / scale, E4M3) * scale)


@pytest.mark.parametrize("fmt", FORMATS)
def test_gradients_pass_the_rounding(fmt):
    """Straight through the rounding: the identity, plus (int formats) what reaches each token's min
    and max through its dynamic range, as in the per-token activation quantizer."""
    x = torch.randn(1, 2, 4, 8, requires_grad=True)
    fake_quant_kv(x, fmt, torch.tensor(0.01)).sum().backward()
    inner = torch.ones_like(x, dtype=torch.bool)
    if fmt != "fp8":  # a token's min and max also carry its range's gradient; clamped codes none
        codes = quantize_kv(x.detach(), fmt)[0]
        inner &= (x != x.amax(-1, keepdim=True)) & (x != x.amin(-1, keepdim=True))
        inner &= (codes > 0) & (codes < codes.new_tensor(2 ** {"int8": 8, "int4": 4}[fmt] - 1))
    assert torch.isfinite(x.grad).all()
    torch.testing.assert_close(x.grad[inner], torch.ones_like(x)[inner], rtol=0, atol=1e-6)


def test_bytes_per_token():
    # 2 layers x 2 kv heads x (keys + values): fp32 64 x 4 bytes; int8 64 + scale + zero; int4 32 + 5; fp8 64
    assert kv_bytes_per_token("none", 2, 2, 64) == 2 * 2 * 2 * 256
    assert kv_bytes_per_token("int8", 2, 2, 64) == 2 * 2 * 2 * 69
    assert kv_bytes_per_token("int4", 2, 2, 64) == 2 * 2 * 2 * 37
    assert kv_bytes_per_token("fp8", 2, 2, 64) == 2 * 2 * 2 * 64


def _keys_of(model, ids):
    """The float keys and values each layer appends (post-rotary), from a model without quantizers."""
    from transformers import DynamicCache

    cache = DynamicCache()
    with torch.no_grad():
        model(input_ids=ids, use_cache=True, cache=cache)
    return [(layer.keys, layer.values) for layer in cache.layers]


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_generation_cache_holds_the_quantized_keys(tiny_llama_dir, fmt):
    """With quantizers attached the model's own cache stores dequantized codes of the float keys and
    values (post-rotary; compared in layer 0, whose input is the same either way), and scoring without a cache computes the same logits as prefill with one."""
    from transformers import DynamicCache

    loaded = load_model(str(tiny_llama_dir))
    ids = torch.randint(0, loaded.model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    floats = _keys_of(loaded.model, ids)
    quantize_kv_cache(loaded.adapter, loaded.model, fmt)
    cache = DynamicCache()
    with torch.no_grad():
        cached = loaded.model(input_ids=ids, use_cache=True, cache=cache).logits
        uncached = loaded.model(input_ids=ids, use_cache=False).logits
    (keys, values), first = floats[0], cache.layers[0]  # later layers see the quantized layers before them
    assert torch.equal(first.keys, fake_quant_kv(keys, fmt))
    assert torch.equal(first.values, fake_quant_kv(values, fmt))
    torch.testing.assert_close(cached, uncached, rtol=1e-5, atol=1e-5)
    with kv_quantization_off(loaded.model), torch.no_grad():
        plain = loaded.model(input_ids=ids, use_cache=False).logits
    assert not torch.equal(plain, uncached)


def test_decode_with_cache_equals_recomputing(tiny_llama_dir):
    """Token by token with the quantized cache gives the logits of the whole sequence at once: a
    token is quantized once, when it is appended, and per token, so the two agree."""
    from transformers import DynamicCache

    loaded = load_model(str(tiny_llama_dir))
    quantize_kv_cache(loaded.adapter, loaded.model, "int4")
    ids = torch.randint(0, loaded.model.config.vocab_size, (1, 10), generator=torch.Generator().manual_seed(1))
    cache = DynamicCache()
    with torch.no_grad():
        steps = [loaded.model(input_ids=ids[:, :6], use_cache=True, cache=cache).logits[:, -1]]
        for t in range(6, 10):
            steps.append(loaded.model(input_ids=ids[:, t:t + 1], use_cache=True, cache=cache).logits[:, -1])
        whole = loaded.model(input_ids=ids, use_cache=False).logits[:, 5:]
    torch.testing.assert_close(torch.stack(steps, 1), whole, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method,fmt", [("rtn", "int8"), ("gptq", "int4"), ("rtn", "fp8"), ("lrquant", "fp8")])
def test_calibrate_with_a_quantized_cache(tmp_path, tiny_llama_dir, method, fmt):
    """The format is recorded, reloaded with the checkpoint and applied; fp8 scales are calibrated
    (amax / 448 of the keys and values the quantized blocks produce, not 1), and the reloaded model
    scores as the calibrated one did."""
    options = {"epochs": 1} if method == "lrquant" else {}
    scheme = QuantScheme(wbits=4, group_size=32, kv_cache=fmt)
    out = tmp_path / "q"
    calibrate(str(tiny_llama_dir), out, scheme, CalibConfig.of(method, nsamples=4, seqlen=32, **options), device="cpu")
    ckpt = load_checkpoint(out)
    assert ckpt.quant.kv_cache == fmt and ckpt.quant.name.endswith({"int8": "-kv8", "int4": "-kv4", "fp8": "-kvfp8"}[fmt])
    quantizers = kv_quantizers(ckpt.model)
    assert len(quantizers) == ckpt.model.config.num_hidden_layers and all(q.fmt == fmt for q in quantizers)
    if fmt == "fp8":
        scales = [s.item() for q in quantizers for s in (q.k_scale, q.v_scale)]
        assert all(0 < s != 1.0 for s in scales)
    ids = torch.randint(0, 2048, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        quantized = ckpt.model(input_ids=ids, use_cache=False).logits
        with kv_quantization_off(ckpt.model):
            float_cache = ckpt.model(input_ids=ids, use_cache=False).logits
    assert torch.isfinite(quantized).all() and not torch.equal(quantized, float_cache)


def test_fp8_scales_come_from_the_calibration_keys(tiny_llama_dir):
    """calibrate_kv_scales: each layer's k_scale / v_scale is the amax of its keys / values over what
    was run, divided by 448."""
    from lrq_deploy.quant.kv_cache import calibrate_kv_scales

    loaded = load_model(str(tiny_llama_dir))
    ids = torch.randint(0, loaded.model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    floats = _keys_of(loaded.model, ids)
    quantizers = quantize_kv_cache(loaded.adapter, loaded.model, "fp8")
    calibrate_kv_scales(loaded.model, lambda: loaded.model(input_ids=ids, use_cache=False))
    for (keys, values), q in zip(floats, quantizers):
        assert q.k_scale.item() == pytest.approx(keys.abs().amax().item() / 448, rel=1e-6)
        assert q.v_scale.item() == pytest.approx(values.abs().amax().item() / 448, rel=1e-6)


def test_quantizer_passes_through_when_off():
    q = KVCacheQuantizer("int8")
    k, v = torch.randn(1, 1, 2, 4), torch.randn(1, 1, 2, 4)
    q.enabled = False
    assert q(k, v)[0] is k


def test_int8_cache_through_an_onnxruntime_graph(tmp_path, tiny_llama_dir):
    """A graph without a cache input carries the cache quantization as the reference's ops: the
    export's own verification (torch vs onnxruntime logits) passes."""
    from lrq_deploy.export.onnx_export import export_onnx

    out = tmp_path / "q"
    calibrate(str(tiny_llama_dir), out, QuantScheme(wbits=4, group_size=32, kv_cache="int8"),
              CalibConfig.of("rtn", nsamples=2, seqlen=16), device="cpu")
    report = export_onnx(out, tmp_path / "m.onnx", limit=2)
    assert report["verify"]["within_tolerance"]


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_stored_form_in_onnxruntime_is_bit_exact(tmp_path, fmt):
    """The quantization a --with-past graph applies to each new key, in onnxruntime: codes (packed
    for int4), scales and zero points bit-equal torch's on the same keys, and the dequantized
    values too."""
    import numpy as np
    import onnxruntime

    class Stored(torch.nn.Module):
        def forward(self, x):
            stored = pack_stored(quantize_kv(x, fmt), fmt)
            return (*stored, dequantize_kv(unpack_stored(stored, fmt), fmt))

    x = torch.randn(2, 2, 7, 16) * torch.linspace(0.1, 4, 16)
    path = tmp_path / "stored.onnx"
    torch.onnx.export(Stored(), (x,), str(path), dynamo=True, input_names=["x"],
                      dynamic_shapes=({2: torch.export.Dim("t")},))
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    other = (torch.randn(2, 2, 11, 16) * 3).numpy()  # another length than the trace's
    for sample in (x.numpy(), other):
        got = session.run(None, {"x": sample})
        want = Stored()(torch.from_numpy(sample))
        for g, w in zip(got, want):
            assert g.dtype == w.numpy().dtype and np.array_equal(g, w.numpy())


@pytest.mark.parametrize("fmt,cpu_kernels,rotate", [("int8", False, False), ("int8", True, False), ("int4", False, True),
                                                   ("int4", True, True), ("fp8", False, False), ("fp8", True, False)])
def test_with_past_graph_decodes_as_the_reference(tmp_path, tiny_llama_dir, fmt, cpu_kernels, rotate):
    """--with-past keeps the cache as codes, scales and zero points. Over a 32-token greedy decode
    (prefill 4, then one token at a time) fed the same past, the onnxruntime graph and the torch
    reference give the same tokens and the same cache up to the float differences of the two
    runtimes' matmuls (the quantization itself is bit-exact: the tests above and below), where a value
    at a rounding boundary may round the other way: stated tolerance 99% of codes and zero points
    equal and every other one a single step away, scales within 1e-5. With
    --cpu-kernels attention is one QuantizedCacheAttention node per layer reading the codes. With
    --kv-rotate the cache holds the rotated keys' codes (the graph rotates them back, or the query alike)."""
    import numpy as np

    from lrq_deploy.export.onnx_export import export_onnx
    from lrq_deploy.runtime.onnxrt import OrtSession, next_past, step_feeds
    from lrq_deploy.runtime.torch_models import TorchSession

    out = tmp_path / "q"
    calibrate(str(tiny_llama_dir), out, QuantScheme(wbits=4, group_size=32, kv_cache=fmt, kv_rotate=rotate),
              CalibConfig.of("rtn", nsamples=2, seqlen=16), device="cpu")
    graph = tmp_path / "m.onnx"
    report = export_onnx(out, graph, with_past=True, limit=2, cpu_kernels=cpu_kernels)
    attention = [n for n in onnx.load(str(graph)).graph.node if n.op_type == "QuantizedCacheAttention"]
    assert len(attention) == (2 if cpu_kernels else 0), report["attention"]
    ort = OrtSession(graph, device="cpu")
    reference = TorchSession(load_checkpoint(out).loaded, torch.device("cpu"), with_past=True)
    stored = ["uint8"] if fmt == "fp8" else ["uint8", "float32", "uint8"]  # fp8: codes; its scales are constants
    assert [s.dtype for s in reference.io.inputs[1:1 + 2 * len(stored)]] == stored * 2
    ids = np.random.default_rng(0).integers(0, 2048, (1, 4), dtype=np.int64)
    feeds = step_feeds(ort.session, ids)
    tokens = {"ort": [], "torch": []}
    for _ in range(29):
        got, want = ort.run(feeds), reference.run(feeds)
        for name in (n for n in want if n.startswith("present.")):
            assert got[name].dtype == want[name].dtype and got[name].shape == want[name].shape, name
            if name.endswith("_scale"):
                np.testing.assert_allclose(got[name], want[name], rtol=1e-5, err_msg=name)
            else:
                assert (got[name] == want[name]).mean() >= 0.99, name
                assert _steps_apart(got[name], want[name], fmt if not name.endswith("_zero") else "int8") <= 1, name
        tokens["ort"].append(int(got["logits"][0, -1].argmax()))
        tokens["torch"].append(int(want["logits"][0, -1].argmax()))
        feeds = step_feeds(ort.session, np.array([[tokens["ort"][-1]]], dtype=np.int64), next_past(got))
    assert tokens["ort"] == tokens["torch"]
    assert next(iter(next_past(got).values())).shape[2] == 32
    from lrq_deploy.bench.decode import OrtDecoder

    config = reference.loaded.model.config  # lrq bench --decode reports what the graph keeps per token
    assert OrtDecoder(graph, "cpu").kv_bytes_per_token == kv_bytes_per_token(
        fmt, config.num_hidden_layers, config.num_key_value_heads, config.hidden_size // config.num_attention_heads)


def _steps_apart(got, want, fmt: str) -> int:
    """The largest distance between two stored caches in quantization steps: int4 codes unpacked from
    their bytes; E4M3 codes of one sign are ordered as the values they stand for."""
    import numpy as np

    def steps(stored):
        wide = stored.astype(np.int32)
        if fmt == "int4":
            return np.stack([wide % 16, wide // 16], -1)
        if fmt == "fp8":
            return np.where(wide & 0x80, -(wide & 0x7F), wide)  # -0 and +0 one value, 0 steps apart
        return wide

    return int(np.abs(steps(got) - steps(want)).max())


def test_an_int8_cache_added_at_export(tmp_path, tiny_llama_dir):
    """lrq export --kv-cache int8 on a checkpoint calibrated without a cache: the graph keeps the int8
    cache (codes, scales, zero points), carries the scheme's -kv8 name and verifies against the
    reference with that cache; fp8 (static scales) is refused before any work."""
    from lrq_deploy.export.onnx_export import ExportOptions, export_onnx
    from lrq_deploy.runtime.onnxrt import OrtSession

    out = tmp_path / "q"
    calibrate(str(tiny_llama_dir), out, QuantScheme(wbits=4, group_size=32), CalibConfig.of("rtn", nsamples=2, seqlen=16),
              device="cpu")
    graph = tmp_path / "m.onnx"
    report = export_onnx(out, graph, with_past=True, limit=2, kv_cache="int8", cpu_kernels=True)
    assert report["verify"]["within_tolerance"] and report["attention"].startswith("QuantizedCacheAttention")
    meta = {p.key: p.value for p in onnx.load(str(graph), load_external_data=False).metadata_props}
    assert meta["lrq.scheme"].endswith("-kv8")
    past = [i for i in OrtSession(graph, device="cpu").session.get_inputs() if i.name.startswith("past.")]
    assert [i.type for i in past[:3]] == ["tensor(uint8)", "tensor(float)", "tensor(uint8)"]
    with pytest.raises(LrqError, match="--kv-cache fp8 needs static scales"):
        ExportOptions(kv_cache="fp8")


def test_rotated_keys_are_quantized_in_the_rotated_basis():
    """--kv-rotate: the stored codes are those of key @ H (H orthonormal Hadamard, its own inverse);
    attention reads them rotated back, so q . k is kept up to the rounding. A key with one outlier
    channel (what rotary leaves) loses less to an int4 cache rotated than as it is."""
    from lrq_deploy.quant.kv_cache import KVCacheQuantizer, key_rotation

    h = key_rotation(32)
    torch.testing.assert_close(h @ h, torch.eye(32), atol=1e-6, rtol=0)
    keys = torch.randn(1, 2, 64, 32)
    keys[..., 3] *= 30
    values = torch.randn(1, 2, 64, 32)
    plain, rotated = KVCacheQuantizer("int4"), KVCacheQuantizer("int4", h)
    error = {name: (q(keys, values)[0] - keys).pow(2).mean().item() for name, q in (("plain", plain), ("rotated", rotated))}
    assert error["rotated"] < 0.5 * error["plain"], error
    rotated.recorded = []
    read_back, _ = rotated(keys, values)
    stored_keys = rotated.recorded[-1][0]
    torch.testing.assert_close(stored_keys[0], quantize_kv(keys @ h, "int4")[0], atol=0, rtol=0)
    torch.testing.assert_close(read_back, dequantize_kv(stored_keys, "int4") @ h)
    assert torch.equal(rotated(keys, values)[1], plain(keys, values)[1])  # values are never rotated


def test_kv_rotate_is_recorded_in_the_scheme():
    scheme = QuantScheme(wbits=4, kv_cache="int4", kv_rotate=True)
    assert scheme.name.endswith("-kv4h") and QuantScheme.from_dict(scheme.to_dict()) == scheme
    assert "kv_rotate" not in QuantScheme(wbits=4, kv_cache="int4").to_dict()  # earlier manifests read the same


def test_fp8_stored_form_in_onnxruntime_is_bit_exact(tmp_path):
    """An fp8 cache's encoding in a graph (comparisons and arithmetic, its static scale a constant):
    onnxruntime's codes and dequantized values bit-equal torch's, zeros, ties and saturation included."""
    import numpy as np
    import onnxruntime

    scale = torch.tensor(0.05)

    class Stored(torch.nn.Module):
        def forward(self, x):
            codes = pack_stored(quantize_kv(x, "fp8", scale), "fp8")[0]
            return codes, dequantize_kv(unpack_stored((codes,), "fp8", scale), "fp8")

    x = torch.randn(1, 2, 9, 16) * 4
    x[0, 0, 0, :4] = torch.tensor([0.0, -0.0, 30.0, -1e-9])  # zeros, saturation (448 * 0.05 = 22.4), a -0 code
    path = tmp_path / "fp8.onnx"
    torch.onnx.export(Stored().eval(), (x,), str(path), dynamo=True, input_names=["x"],
                      dynamic_shapes=({2: torch.export.Dim("t")},))
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for sample in (x, torch.randn(1, 2, 5, 16) * 0.01):
        got, want = session.run(None, {"x": sample.numpy()}), Stored()(sample)
        for g, w in zip(got, want):
            assert np.array_equal(g, w.numpy()) and np.array_equal(np.signbit(g), np.signbit(w.numpy()))
