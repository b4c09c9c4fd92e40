"""Triton kernels for low-bit linear layers.

Weights use the checkpoint layout directly (docs/FORMATS.md): codes packed along K, little
end first, row n of `qweight` holding output channel n; float16 scales and uint8 zero points
per (output channel, group). Dequantization happens in registers inside the main loop.

- weight_only_gemm: W{4,2}A16, tiled over (M, N), tl.dot with fp32 accumulation (prefill).
- weight_only_gemv: the same for 1-4 rows (decoding), a reduction per output channel.
- w4a4_gemm: int8-held INT4 activations x INT4 weights, int32 accumulation per group
  (exact), then scales per group and per token.
- quantize_rows: per-token symmetric quantization to int8-held integers and float32 scales,
  round half to even, bit-identical to the reference.
- w4a4_fused_gemm: quantize_rows and w4a4_gemm in one kernel (one launch per TensorRT plugin).
"""

from __future__ import annotations

from ._triton import load_triton

triton, tl = load_triton()


@triton.jit
def _dequant_tile(q_ptr, s_ptr, z_ptr, offs_n, offs_k, N, K, G, BITS: tl.constexpr, GROUP: tl.constexpr):
    """[BN, BK] float32 dequantized weights (q - z) * s for output channels offs_n and inputs offs_k."""
    PER: tl.constexpr = 8 // BITS
    mask = (offs_n[:, None] < N) & (offs_k[None, :] < K)
    packed = tl.load(q_ptr + offs_n[:, None] * (K // PER) + (offs_k // PER)[None, :], mask=mask, other=0)
    codes = (packed.to(tl.int32) >> ((offs_k % PER) * BITS)[None, :]) & ((1 << BITS) - 1)
    group = offs_k // GROUP
    scale = tl.load(s_ptr + offs_n[:, None] * G + group[None, :], mask=mask, other=0.0).to(tl.float32)
    zero = tl.load(z_ptr + offs_n[:, None] * G + group[None, :], mask=mask, other=0).to(tl.float32)
    return (codes.to(tl.float32) - zero) * scale


@triton.jit
def weight_only_gemm(
    x_ptr, q_ptr, s_ptr, z_ptr, b_ptr, y_ptr, M, N, K, G,
    BITS: tl.constexpr, GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_m[:, None] * K + offs_k[None, :], mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0.0)
        w = _dequant_tile(q_ptr, s_ptr, z_ptr, offs_n, offs_k, N, K, G, BITS, GROUP)
        if IEEE:
            acc += tl.dot(x.to(tl.float32), tl.trans(w), input_precision="ieee")
        else:
            acc += tl.dot(x, tl.trans(w.to(x.dtype)))
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m[:, None] * N + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


@triton.jit
def weight_only_gemv(
    x_ptr, q_ptr, s_ptr, z_ptr, b_ptr, y_ptr, N, K, G,
    ROWS: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    for row in tl.static_range(ROWS):
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + row * K + offs_k, mask=offs_k < K, other=0.0).to(tl.float32)
            w = _dequant_tile(q_ptr, s_ptr, z_ptr, offs_n, offs_k, N, K, G, BITS, GROUP)
            acc += tl.sum(w * x[None, :], axis=1)
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
        tl.store(y_ptr + row * N + offs_n, acc.to(y_ptr.dtype.element_ty), mask=offs_n < N)


@triton.jit
def _rint(y):
    """Round half to even (torch.round), from floor."""
    r = tl.floor(y + 0.5)
    return tl.where((r - y == 0.5) & (r % 2 != 0), r - 1.0, r)


@triton.jit
def quantize_rows(x_ptr, q_ptr, s_ptr, K, QMAX: tl.constexpr, BLOCK_K: tl.constexpr):
    """One program per token: s = max(max|x|, 1e-5) / QMAX, q = clamp(rint(x / s), -QMAX, QMAX)."""
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK_K)
    x = tl.load(x_ptr + row * K + offs, mask=offs < K, other=0.0).to(tl.float32)
    scale = tl.maximum(tl.max(tl.abs(x), axis=0), 1e-5) / QMAX
    q = tl.minimum(tl.maximum(_rint(x / scale), -QMAX), QMAX)
    tl.store(q_ptr + row * K + offs, q.to(tl.int8), mask=offs < K)
    tl.store(s_ptr + row, scale)


@triton.jit
def _int4_weight_tile(q_ptr, z_ptr, offs_n, offs_k, N, K, G, group):
    """[BN, BK] int8 tile of (q - z) for 4-bit codes; every k in offs_k lies in `group`."""
    mask = (offs_n[:, None] < N) & (offs_k[None, :] < K)
    packed = tl.load(q_ptr + offs_n[:, None] * (K // 2) + (offs_k // 2)[None, :], mask=mask, other=0)
    codes = (packed.to(tl.int32) >> ((offs_k % 2) * 4)[None, :]) & 15
    zero = tl.load(z_ptr + offs_n * G + group, mask=offs_n < N, other=0).to(tl.int32)
    return tl.where(mask, codes - zero[:, None], 0).to(tl.int8)


@triton.jit
def w4a4_gemm(
    xq_ptr, xs_ptr, q_ptr, s_ptr, z_ptr, b_ptr, y_ptr, acc_ptr, M, N, K, G,
    GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, STORE_INT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """y = xs[m] * sum_g s[n, g] * sum_{k in g} xq[m, k] * (q[n, k] - z[n, g]); products in int32.

    BLOCK_K divides GROUP, so every K-chunk lies in one group. With STORE_INT (per-channel
    weights) the exact int32 accumulator is written to acc_ptr as well.
    """
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_int = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        kmask = offs_k < K
        x = tl.load(xq_ptr + offs_m[:, None] * K + offs_k[None, :], mask=(offs_m[:, None] < M) & kmask[None, :], other=0)
        group = k0 // GROUP
        w = _int4_weight_tile(q_ptr, z_ptr, offs_n, offs_k, N, K, G, group)
        partial = tl.dot(x, tl.trans(w), out_dtype=tl.int32)
        if STORE_INT:
            acc_int += partial
        scale = tl.load(s_ptr + offs_n * G + group, mask=offs_n < N, other=0.0).to(tl.float32)
        acc += partial.to(tl.float32) * scale[None, :]
    acc = acc * tl.load(xs_ptr + offs_m, mask=offs_m < M, other=0.0)[:, None]
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    out_mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(y_ptr + offs_m[:, None] * N + offs_n[None, :], acc.to(y_ptr.dtype.element_ty), mask=out_mask)
    if STORE_INT:
        tl.store(acc_ptr + offs_m[:, None] * N + offs_n[None, :], acc_int, mask=out_mask)


@triton.jit
def w4a4_fused_gemm(
    x_ptr, q_ptr, s_ptr, z_ptr, b_ptr, y_ptr, M, N, K, G,
    GROUP: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """W4A4 in one kernel (the TensorRT plugin's kernel): a first pass over K finds each row's
    max |x|, the main loop quantizes x tiles to INT4 on the fly (same arithmetic as
    quantize_rows) and accumulates integer products as w4a4_gemm does."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    amax = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_m[:, None] * K + offs_k[None, :], mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0.0)
        amax = tl.maximum(amax, tl.max(tl.abs(x.to(tl.float32)), axis=1))
    x_scale = tl.maximum(amax, 1e-5) / 7
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        kmask = offs_k < K
        x = tl.load(x_ptr + offs_m[:, None] * K + offs_k[None, :], mask=(offs_m[:, None] < M) & kmask[None, :], other=0.0)
        xq = tl.minimum(tl.maximum(_rint(x.to(tl.float32) / x_scale[:, None]), -7.0), 7.0).to(tl.int8)
        group = k0 // GROUP
        w = _int4_weight_tile(q_ptr, z_ptr, offs_n, offs_k, N, K, G, group)
        partial = tl.dot(xq, tl.trans(w), out_dtype=tl.int32)
        scale = tl.load(s_ptr + offs_n * G + group, mask=offs_n < N, other=0.0).to(tl.float32)
        acc += partial.to(tl.float32) * scale[None, :]
    acc = acc * x_scale[:, None]
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m[:, None] * N + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))
