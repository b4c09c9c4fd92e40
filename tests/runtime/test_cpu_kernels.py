"""lrq's CPU kernel library (ai.lrq.cpu::MatMulInt4) against a float64 reference and onnxruntime's
MatMulNBits on the same codes, scales and zero points; its AVX-512 and portable code; its
threads; its build and the file probe that decides when a session registers it.

Tolerance: both sides are fp32 sums of K products in different orders, so each output may differ
from the exact sum by at most about K * 2^-24 * sum_k |a_k w_k| (the classic bound for recursive
summation); the check uses that bound, per output."""

from __future__ import annotations

import hashlib
import shutil

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from hostile import another_native_library
from lrq_deploy.errors import LrqError
from lrq_deploy.runtime import cpu_kernels

pytest.importorskip("onnxruntime")


@pytest.fixture(params=["native", "avx2", "portable"])
def code(request, monkeypatch) -> str:
    """The library's code path under test: what this CPU picks, at most AVX2 (the fp32 form of
    CPUs without AVX-512, and its vpmaddubsw int8 form), or the portable loop."""
    if request.param != "native":
        monkeypatch.setenv("LRQ_CPU_KERNEL_ISA", request.param)
    return request.param


def _problem(K, N, block, zeros: bool, bias: bool, seed=0):
    rng = np.random.default_rng(seed)
    blocks = K // block
    codes = rng.integers(0, 256, (N, blocks, block // 2), dtype=np.uint8)
    scales = (rng.random(N * blocks, dtype=np.float32) * 0.02 + 0.001).astype(np.float32)
    zero_points = rng.integers(0, 256, N * ((blocks + 1) // 2), dtype=np.uint8) if zeros else None
    biases = rng.standard_normal(N).astype(np.float32) if bias else None
    return codes, scales, zero_points, biases


def _graph(op: str, K, N, block, codes, scales, zero_points, biases, accuracy: int = 1) -> bytes:
    inits = [numpy_helper.from_array(codes, "B"), numpy_helper.from_array(scales, "scales")]
    optional = []
    if zero_points is not None:
        inits.append(numpy_helper.from_array(zero_points, "zp"))
    if op == "lrq":
        optional = (["zp"] if zero_points is not None else [""]) + (["bias"] if biases is not None else [])
        node = helper.make_node(cpu_kernels.OP, ["A", "B", "scales", *optional], ["Y"], domain=cpu_kernels.DOMAIN,
                                K=K, N=N, block_size=block, accuracy_level=accuracy)
    else:
        optional = ["zp" if zero_points is not None else "", "", "bias" if biases is not None else ""]
        node = helper.make_node("MatMulNBits", ["A", "B", "scales", *optional], ["Y"], domain="com.microsoft",
                                K=K, N=N, bits=4, block_size=block, accuracy_level=accuracy)
    if biases is not None:
        inits.append(numpy_helper.from_array(biases, "bias"))
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["M", K])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", N])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1),
                                                    helper.make_opsetid(cpu_kernels.DOMAIN, 1)])
    return model.SerializeToString()


def _session(model: bytes, threads: int = 1):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 4
    cpu_kernels.register(options)
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def _reference(a, K, N, block, codes, scales, zero_points, biases):
    blocks = K // block
    values = np.stack([codes & 15, codes >> 4], axis=-1).reshape(N, blocks, block).astype(np.float64)
    if zero_points is None:
        zeros = np.full((N, blocks), 8.0)
    else:
        packed = zero_points.reshape(N, -1)
        zeros = np.stack([packed & 15, packed >> 4], axis=-1).reshape(N, -1)[:, :blocks].astype(np.float64)
    w = ((values - zeros[:, :, None]) * scales.reshape(N, blocks, 1)).reshape(N, K)
    a64 = a.astype(np.float64)
    exact = a64 @ w.T + (0 if biases is None else biases)
    bound = K * 2.0**-24 * (np.abs(a64) @ np.abs(w).T) + 1e-30
    return exact, bound


CASES = [  # K, N, block, rows of A, zero points, bias
    (256, 40, 32, 1, False, False), (320, 37, 64, 1, True, True), (512, 64, 128, 3, False, True),
    (512, 21, 256, 17, True, False), (1024, 48, 128, 40, True, True), (768, 9, 256, 33, False, False),
]


@pytest.mark.parametrize("K,N,block,M,zeros,bias", CASES)
def test_matches_exact_sum_and_matmulnbits(code, K, N, block, M, zeros, bias):
    codes, scales, zero_points, biases = _problem(K, N, block, zeros, bias)
    a = np.random.default_rng(1).standard_normal((M, K)).astype(np.float32)
    exact, bound = _reference(a, K, N, block, codes, scales, zero_points, biases)
    ours = _session(_graph("lrq", K, N, block, codes, scales, zero_points, biases)).run(None, {"A": a})[0]
    theirs = _session(_graph("nbits", K, N, block, codes, scales, zero_points, biases)).run(None, {"A": a})[0]
    assert ours.shape == (M, N)
    assert np.all(np.abs(ours - exact) <= bound)
    assert np.all(np.abs(ours - theirs) <= 2 * bound)


@pytest.mark.parametrize("block,accuracy", [(64, 1), (128, 4)])
def test_threads_give_the_same_bits(block, accuracy):
    """Each output is one thread's sum in a fixed order: any thread count gives identical bits
    (fp32 and int8 activations, decode and prefill)."""
    codes, scales, zero_points, biases = _problem(512, 300, block, True, True)
    model = _graph("lrq", 512, 300, block, codes, scales, zero_points, biases, accuracy=accuracy)
    for rows in (1, 24):
        a = np.random.default_rng(rows).standard_normal((rows, 512)).astype(np.float32)
        one, two = (_session(model, threads).run(None, {"A": a})[0] for threads in (1, 2))
        assert np.array_equal(one, two)


def test_batched_input_keeps_its_leading_axes():
    codes, scales, _, _ = _problem(256, 16, 64, False, False)
    model = onnx.load_from_string(_graph("lrq", 256, 16, 64, codes, scales, None, None))
    model.graph.input[0].CopyFrom(helper.make_tensor_value_info("A", TensorProto.FLOAT, ["b", "s", 256]))
    model.graph.output[0].CopyFrom(helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["b", "s", 16]))
    a = np.random.default_rng(0).standard_normal((2, 5, 256)).astype(np.float32)
    y = _session(model.SerializeToString()).run(None, {"A": a})[0]
    flat = _session(_graph("lrq", 256, 16, 64, codes, scales, None, None)).run(None, {"A": a.reshape(10, 256)})[0]
    assert y.shape == (2, 5, 16) and np.array_equal(y.reshape(10, 16), flat)


def test_a_block_the_kernel_does_not_take_fails_at_session_creation():
    codes, scales, _, _ = _problem(320, 8, 64, False, False)
    model = onnx.load_from_string(_graph("lrq", 320, 8, 64, codes, scales, None, None))
    for attr in model.graph.node[0].attribute:
        if attr.name == "block_size":
            attr.i = 40
    with pytest.raises(Exception, match="block_size must be a positive multiple of 32"):
        _session(model.SerializeToString())


def test_wrong_weight_shape_is_an_error_not_a_crash():
    codes, scales, _, _ = _problem(256, 8, 64, False, False)
    model = onnx.load_from_string(_graph("lrq", 256, 8, 64, codes[:4], scales, None, None))
    with pytest.raises(Exception, match="B or scales do not hold"):
        _session(model.SerializeToString()).run(None, {"A": np.ones((1, 256), np.float32)})


def test_session_registration_follows_the_graph_domains(tmp_path):
    codes, scales, _, _ = _problem(256, 8, 64, False, False)
    ours, theirs = tmp_path / "lrq.onnx", tmp_path / "nbits.onnx"
    ours.write_bytes(_graph("lrq", 256, 8, 64, codes, scales, None, None))
    model = onnx.load_from_string(_graph("nbits", 256, 8, 64, codes, scales, None, None))
    del model.opset_import[2]  # only the domains it uses
    onnx.save(model, str(theirs))
    assert cpu_kernels.needs_library(ours) and not cpu_kernels.needs_library(theirs)
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(ours.read_bytes()[:100])
    assert cpu_kernels.opset_domains(truncated) == set()  # onnxruntime's own load names the damage
    from lrq_deploy.runtime.onnxrt import OrtSession

    a = np.random.default_rng(0).standard_normal((1, 256)).astype(np.float32)
    assert np.allclose(OrtSession(ours).run({"A": a})["Y"], OrtSession(theirs).run({"A": a})["Y"], rtol=1e-5, atol=1e-5)


def test_no_compiler_is_one_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("LRQ_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    cpu_kernels.library.cache_clear()
    try:
        with pytest.raises(LrqError, match="need a C\\+\\+ compiler"):
            cpu_kernels.library()
    finally:
        cpu_kernels.library.cache_clear()
    assert not list(tmp_path.rglob("*.so"))


@pytest.fixture
def fresh_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("LRQ_CACHE", str(tmp_path))
    cpu_kernels.library.cache_clear()
    yield tmp_path / "cpu-kernels"
    cpu_kernels.library.cache_clear()


@pytest.fixture(scope="module")
def built_cache(tmp_path_factory):
    """One real build, copied into the caches of the tests that damage it."""
    folder = tmp_path_factory.mktemp("kernel-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LRQ_CACHE", str(folder))
        cpu_kernels.library.cache_clear()
        cpu_kernels.library()
    cpu_kernels.library.cache_clear()
    return folder / "cpu-kernels"


@pytest.fixture
def warm_cache(fresh_cache, built_cache):
    shutil.copytree(built_cache, fresh_cache)
    return fresh_cache


def _cached(folder):
    return next(folder.glob("libai_lrq_cpu-*.so"))


def test_library_is_built_once_per_source(fresh_cache):
    loaded = cpu_kernels.library()
    built = _cached(fresh_cache)
    stamp = built.stat().st_mtime_ns
    cpu_kernels.library.cache_clear()
    assert cpu_kernels.library().read_bytes() == built.read_bytes() and built.stat().st_mtime_ns == stamp
    assert sorted(p.name for p in fresh_cache.iterdir()) == [built.name, built.name + ".sha256"]  # no temporaries
    assert loaded.parent != fresh_cache  # sessions load a private copy, out of the cache's reach
    recorded = (fresh_cache / (built.name + ".sha256")).read_text().split()
    assert recorded == [hashlib.sha256(built.read_bytes()).hexdigest(), built.name]  # sha256sum -c reads it


def _truncate(path):
    path.write_bytes(path.read_bytes()[:4096])


def _flip_bytes(path):
    code = bytearray(path.read_bytes())
    code[len(code) // 2: len(code) // 2 + 16] = bytes(b ^ 0xFF for b in code[len(code) // 2: len(code) // 2 + 16])
    path.write_bytes(bytes(code))


def _replace_by_another_library(path):
    shutil.copyfile(another_native_library(), path)


@pytest.mark.parametrize("damage", [_truncate, _flip_bytes, _replace_by_another_library])
def test_a_damaged_cached_library_is_rebuilt_not_loaded(warm_cache, damage, capsys, monkeypatch):
    built = _cached(warm_cache)
    good = built.read_bytes()
    damage(built)
    cpu_kernels.library.cache_clear()
    # the rebuild writes what the compiler wrote the first time (the compile itself: the test above)
    monkeypatch.setattr(cpu_kernels, "_build", lambda cxx, out: out.write_bytes(good))
    loaded = cpu_kernels.library()
    assert "does not match its record" in capsys.readouterr().err
    assert built.read_bytes() == good and loaded.read_bytes() == good
    import onnxruntime as ort

    cpu_kernels.register(ort.SessionOptions())  # the rebuilt library loads


def test_a_missing_record_rebuilds(warm_cache, monkeypatch):
    built = _cached(warm_cache)
    good = built.read_bytes()
    (warm_cache / (built.name + ".sha256")).unlink()
    built.write_bytes(b"not a library")
    cpu_kernels.library.cache_clear()
    monkeypatch.setattr(cpu_kernels, "_build", lambda cxx, out: out.write_bytes(good))
    assert cpu_kernels.library().read_bytes() != b"not a library" and built.stat().st_size > 1000


def test_a_cache_other_users_can_write_is_refused(warm_cache):
    warm_cache.chmod(0o777)
    with pytest.raises(LrqError, match="is writable by every user"):
        cpu_kernels.library()
    warm_cache.chmod(0o700)
    warm_cache.parent.chmod(0o777)  # an open parent lets others swap the folder itself
    try:
        with pytest.raises(LrqError, match="is writable by every user"):
            cpu_kernels.library()
        warm_cache.parent.chmod(0o1777)  # sticky, as /tmp: others cannot rename what is ours
        assert cpu_kernels.library().is_file()
    finally:
        warm_cache.parent.chmod(0o700)


def _int8_reference(a, K, N, block, codes, scales, zero_points, biases):
    """Accuracy level 4 as the kernel defines it: per row and block of A, codes
    round-half-even(a * (127 / max|a|)) in float32, exact integer dot products, then the scales."""
    blocks = K // block
    x = a.reshape(a.shape[0], blocks, block)
    amax = np.abs(x).max(axis=2, keepdims=True)
    inverse = np.where(amax > 0, np.float32(127) / np.where(amax > 0, amax, 1), np.float32(0)).astype(np.float32)
    q = np.clip(np.rint((x * inverse).astype(np.float32)), -127, 127).astype(np.int64)
    a_scale = (amax / np.float32(127)).astype(np.float32)[..., 0]  # [M, blocks]
    values = np.stack([codes & 15, codes >> 4], axis=-1).reshape(N, blocks, block).astype(np.int64)
    if zero_points is None:
        zeros = np.full((N, blocks), 8, np.int64)
    else:
        packed = zero_points.reshape(N, -1)
        zeros = np.stack([packed & 15, packed >> 4], axis=-1).reshape(N, -1)[:, :blocks].astype(np.int64)
    corrections = zeros[None] * q.sum(axis=2)[:, None, :]
    dots = np.einsum("mbk,nbk->mnb", q, values) - corrections  # exact integers
    scale = (scales.reshape(N, blocks)[None].astype(np.float32) * a_scale[:, None, :]).astype(np.float64)
    exact = (scale * dots).sum(axis=2) + (0 if biases is None else biases)
    # fp32 sums over the blocks and 16 lanes, the zero-point term subtracted last: the bound of
    # recursive summation over every partial's magnitude
    magnitude = np.einsum("mbk,nbk->mnb", np.abs(q), values) + np.abs(corrections)
    bound = (16 + blocks + 2) * 2.0**-24 * (np.abs(scale) * magnitude).sum(axis=2) + 1e-30
    return exact, bound


INT8_CASES = [  # K, N, block, rows of A, zero points, bias
    (512, 40, 128, 1, False, False), (1024, 37, 128, 3, True, True), (768, 40, 256, 17, True, False),
    # prefill on VNNI: 32-row panels (and the rows past them), K past a 512-column panel, blocks wider than one
    (1408, 70, 128, 9, True, True), (2048, 33, 1024, 6, False, False),
    (320, 16, 64, 2, False, True),  # a block the AVX-512 / AVX2 forms do not take: the portable loop
]


@pytest.mark.parametrize("K,N,block,M,zeros,bias", INT8_CASES)
def test_int8_activations_match_their_definition_and_matmulnbits(code, K, N, block, M, zeros, bias):
    codes, scales, zero_points, biases = _problem(K, N, block, zeros, bias)
    a = np.random.default_rng(2).standard_normal((M, K)).astype(np.float32)
    a[0, :block] = 0.0  # a block of zeros: scale 0, codes 0
    exact, bound = _int8_reference(a, K, N, block, codes, scales, zero_points, biases)
    graph = _graph("lrq", K, N, block, codes, scales, zero_points, biases, accuracy=4)
    ours = _session(graph).run(None, {"A": a})[0]
    assert np.all(np.abs(ours - exact) <= bound)
    theirs = _session(_graph("nbits", K, N, block, codes, scales, zero_points, biases, accuracy=4)).run(None, {"A": a})[0]
    fp32, _ = _reference(a, K, N, block, codes, scales, zero_points, biases)
    # both round A to int8 per block; each is as close to the fp32 result as the other
    assert np.abs(ours - fp32).max() <= 2 * np.abs(theirs - fp32).max() + 1e-6


def test_unknown_accuracy_level_is_refused():
    codes, scales, _, _ = _problem(256, 8, 128, False, False)
    with pytest.raises(Exception, match="accuracy_level must be 1"):
        _session(_graph("lrq", 256, 8, 128, codes, scales, None, None, accuracy=2))


def test_graph_rewrite_takes_what_the_kernel_serves(tmp_path):
    """export/ort_optimized.py: MatMulNBits at accuracy 1 (any block of 32s) and at accuracy 4
    (blocks of 128s) become MatMulInt4 with the same inputs and level; the rest stays."""
    from lrq_deploy.export.ort_optimized import use_cpu_kernels

    nodes, inits = [], []
    for i, (block, level) in enumerate([(64, 1), (128, 4), (64, 4)]):
        codes, scales, _, _ = _problem(256, 8, block, False, False, seed=i)
        inits += [numpy_helper.from_array(codes, f"B{i}"), numpy_helper.from_array(scales, f"s{i}")]
        nodes.append(helper.make_node("MatMulNBits", ["A", f"B{i}", f"s{i}"], [f"Y{i}"], domain="com.microsoft",
                                      K=256, N=8, bits=4, block_size=block, accuracy_level=level))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [1, 256])],
                              [helper.make_tensor_value_info(f"Y{i}", TensorProto.FLOAT, [1, 8]) for i in range(3)],
                              initializer=inits)
    path = tmp_path / "g.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)]),
              str(path))
    assert use_cpu_kernels(path) == 2
    rewritten = onnx.load(str(path))
    kinds = [(n.op_type, {a.name: a.i for a in n.attribute}.get("accuracy_level")) for n in rewritten.graph.node]
    assert kinds == [("MatMulInt4", 1), ("MatMulInt4", 4), ("MatMulNBits", 4)]
    assert {p.key: p.value for p in rewritten.metadata_props}["lrq.cpu_kernels"] == cpu_kernels.DOMAIN
    from lrq_deploy.runtime.onnxrt import OrtSession

    a = np.random.default_rng(0).standard_normal((1, 256)).astype(np.float32)
    assert all(np.isfinite(v).all() for v in OrtSession(path).run({"A": a}).values())


def test_a_full_disk_is_named_not_blamed_on_the_compiler(fresh_cache, monkeypatch, tmp_path):
    fake = tmp_path / "cxx"
    fake.write_text('#!/bin/sh\nif [ "$1" = --version ]; then echo "c++ (fake) 1"; exit 0; fi\n'
                    'echo "fatal error: error writing to /tmp/ccX.s: No space left on device" >&2\nexit 1\n')
    fake.chmod(0o755)
    monkeypatch.setenv("CXX", str(fake))
    with pytest.raises(LrqError, match="no space left on the device of .* point LRQ_CACHE at another disk"):
        cpu_kernels.library()
    assert not list(fresh_cache.glob("*.so*"))


# --- ai.lrq.cpu::QuantizedCacheAttention -------------------------------------------------------

NAMES = ("query", "key_codes", "key_scale", "key_zero", "value_codes", "value_scale", "value_zero")


def _attention_graph(fmt: str, scale: float) -> bytes:
    """One QuantizedCacheAttention node; fp8 leaves its optional zero points out."""
    from lrq_deploy.quant.kv_cache import KV_BITS

    names = [n if fmt != "fp8" or not n.endswith("_zero") else "" for n in NAMES]
    types = {"query": TensorProto.FLOAT, "key_scale": TensorProto.FLOAT, "value_scale": TensorProto.FLOAT}
    inputs = [helper.make_tensor_value_info(n, types.get(n, TensorProto.UINT8), None) for n in names if n]
    node = helper.make_node("QuantizedCacheAttention", names, ["out"], domain=cpu_kernels.DOMAIN, bits=KV_BITS[fmt],
                            e4m3=int(fmt == "fp8"), scale=scale)
    graph = helper.make_graph([node], "g", inputs, [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18),
                                                   helper.make_opsetid(cpu_kernels.DOMAIN, 1)]).SerializeToString()


def _stored_cache(fmt, batch, heads, kv_heads, seq, total, dim, seed=0):
    """query, then the node's six cache inputs as the graph stores them (fp8: codes, its static scale
    [1] and None for the zero point)."""
    import torch

    from lrq_deploy.quant.floats import fp8_scale_of
    from lrq_deploy.quant.kv_cache import pack_stored, quantize_kv

    gen = torch.Generator().manual_seed(seed)
    query = torch.randn(batch, heads, seq, dim, generator=gen)
    cache = []
    for _ in range(2):
        x = torch.randn(batch, kv_heads, total, dim, generator=gen) * 2
        if fmt == "fp8":
            scale = fp8_scale_of(x.abs().amax()).reshape(1).float()
            cache += [pack_stored(quantize_kv(x, fmt, scale), fmt)[0], scale, None]
        else:
            cache += list(pack_stored(quantize_kv(x, fmt), fmt))
    return query, cache


def _feeds(query, cache) -> dict:
    return {n: t.numpy() for n, t in zip(NAMES, (query, *cache)) if t is not None}


@pytest.mark.parametrize("fmt", ["int8", "int4", "fp8"])
@pytest.mark.parametrize("heads,kv_heads,seq,total,dim", [
    (4, 2, 1, 37, 32), (4, 4, 5, 5, 64), (8, 2, 3, 70, 16), (2, 1, 1, 1, 128), (6, 3, 2, 19, 48)])
def test_quantized_cache_attention_matches_the_reference(fmt, heads, kv_heads, seq, total, dim):
    """Decode (one query), prefill (queries = cache) and chunks after a past, grouped heads, head
    sizes with and without a 16-wide tail: the node against lrq::quantized_cache_attention's reference
    (the cache dequantized, causal attention), computed in float64. Tolerance: fp32 scores of D
    products, a softmax and a weighted sum of T values differ from the float64 result by a few ulps of
    the largest value read (1e-5 relative to max |value|)."""
    from lrq_deploy.export.kv_attention import quantized_cache_attention

    scale = dim ** -0.5
    query, cache = _stored_cache(fmt, 2, heads, kv_heads, seq, total, dim)
    wide = [t.double() if t is not None and t.is_floating_point() else t for t in cache]
    want = quantized_cache_attention(query.double(), *wide, fmt, scale).numpy()
    got = _session(_attention_graph(fmt, scale)).run(None, _feeds(query, cache))[0]
    assert got.shape == (2, seq, heads * dim)
    largest = np.abs(want).max()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * largest)


def test_e4m3_codes_read_as_every_value_they_stand_for():
    """All 254 finite E4M3 bit patterns (normals, subnormals, both zeros), 16 to a cached value row:
    the first query sees the first token alone, so its output is that row's values (scale 1) exactly,
    read in registers (one query: decode) and from a dequantized tile (four queries: prefill)."""
    import torch

    from lrq_deploy.quant.floats import E4M3, decode_by_table

    finite = torch.tensor([c for c in range(256) if c & 0x7F != 0x7F], dtype=torch.uint8)
    rows = torch.cat([finite, finite[:2]]).reshape(16, 16)
    model = _attention_graph("fp8", 1.0)
    for row in rows:
        for seq in (1, 4):
            codes = torch.zeros(1, 1, seq, 16, dtype=torch.uint8)
            codes[0, 0, 0] = row
            cache = [codes, torch.ones(1), None, codes, torch.ones(1), None]
            got = _session(model).run(None, _feeds(torch.zeros(1, 1, seq, 16), cache))[0]
            assert np.array_equal(got[0, 0], decode_by_table(row, E4M3).numpy()), (row, seq)


def test_a_node_without_the_e4m3_attribute_reads_integer_codes():
    """Graphs exported before fp8 caches carry no `e4m3` attribute: they still load and compute."""
    query, cache = _stored_cache("int8", 1, 4, 2, 3, 9, 32)
    model = onnx.load_from_string(_attention_graph("int8", 0.2))
    node = model.graph.node[0]
    kept = [a for a in node.attribute if a.name != "e4m3"]
    del node.attribute[:]
    node.attribute.extend(kept)
    old, new = (_session(m).run(None, _feeds(query, cache))[0]
                for m in (model.SerializeToString(), _attention_graph("int8", 0.2)))
    assert np.array_equal(old, new)


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_quantized_cache_attention_threads_give_the_same_bits(fmt):
    query, cache = _stored_cache(fmt, 1, 8, 4, 9, 40, 64, seed=3)
    feeds = _feeds(query, cache)
    model = _attention_graph(fmt, 0.125)
    one, four = (_session(model, threads).run(None, feeds)[0] for threads in (1, 4))
    assert np.array_equal(one, four)


def test_quantized_cache_attention_refuses_a_wrong_cache_shape():
    import onnxruntime

    query, cache = _stored_cache("int4", 1, 4, 2, 1, 8, 32)
    with pytest.raises(onnxruntime.capi.onnxruntime_pybind11_state.InvalidArgument, match="key / value codes"):
        _session(_attention_graph("int8", 0.2)).run(None, _feeds(query, cache))  # int4-packed codes read as int8
    with pytest.raises(onnxruntime.capi.onnxruntime_pybind11_state.InvalidArgument, match="one scale"):
        query, (keys, key_scale, _, values, value_scale, _) = _stored_cache("int8", 1, 4, 2, 1, 8, 32)
        # a scale per token where E4M3 codes take one
        _session(_attention_graph("fp8", 0.2)).run(None, _feeds(query, [keys, key_scale, None, values, value_scale, None]))


def test_a_session_on_the_portable_code_says_so_once(monkeypatch, capsys):
    """Where the library can only run its portable loop (slower than MatMulNBits), the first session
    says so in one line naming the cause; the fast paths say nothing."""
    import onnxruntime as ort

    cpu_kernels.warn_of_slow_code.cache_clear()
    monkeypatch.setenv("LRQ_CPU_KERNEL_ISA", "portable")
    for _ in range(2):
        cpu_kernels.register(ort.SessionOptions())
    lines = [line for line in capsys.readouterr().err.splitlines() if line]
    assert lines == ["lrq: warning: LRQ_CPU_KERNEL_ISA=portable, so lrq's CPU kernels run their portable code, slower "
                     "than onnxruntime's MatMulNBits; export without --cpu-kernels for this machine"]
    cpu_kernels.warn_of_slow_code.cache_clear()
    monkeypatch.delenv("LRQ_CPU_KERNEL_ISA")
    cpu_kernels.register(ort.SessionOptions())
    if cpu_kernels.code_path() != "portable":
        assert capsys.readouterr().err == ""
    cpu_kernels.warn_of_slow_code.cache_clear()
