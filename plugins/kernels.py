"""Triton kernels for low-bit linear layers.

Weight layout: the checkpoint's rows read as int32 words (docs/FORMATS.md). Row n holds output
channel n; word w of a row holds the 32 / BITS consecutive input codes 32/BITS*w ..., code j in
bits j*BITS. A thread loads four adjacent words (one 128-bit load = 32 four-bit codes) and
unpacks them in registers with shifts and masks. Rows are padded to 16 bytes at load time when
the checkpoint's are not (plugins/dispatch.py), so every row starts 16-byte aligned.
Scales (float16) and zero points (uint8) are [N, groups]: one [BLOCK_N] vector per group.

Kernels (dispatch.py picks one per call by the scheme and the number of rows M):
- gemv: M <= 8 (decoding). Bandwidth-bound, split over K (each program covers K_ITERS chunks and
  writes a float32 partial sum; the partials are added in a fixed order, so results are
  deterministic). The zero point is applied once per group: s * (sum q*x - z * sum x).
- gemm: tl.dot GEMM for moderate M; (q - z) is exact in the dot's input type, the scale
  multiplies each group's partial product.
- dequantize: the weights to float once, for cuBLAS at large M (prefill).
- int_gemm: integer activations x integer weights, tl.dot int8 x int8 -> int32 (exact), zero
  points as a rank-1 correction (sum of the activation codes), scales per group and per token.
  With QUANTIZE_X it first quantizes the float activations per token (one launch, the
  TensorRT plugin kernel); otherwise it reads codes from quantize_rows.
- quantize_rows: per-token symmetric quantization, round half to even, bit-identical to the
  reference.
"""

from __future__ import annotations

from ._triton import load_triton

triton, tl = load_triton()


@triton.jit
def _unpack(words, BITS: tl.constexpr):
    """int32 [R, W] -> [R, W, 32 // BITS] codes (int32). Masking after the arithmetic shift drops
    the sign bits."""
    shifts = tl.arange(0, 32 // BITS) * BITS
    return (words[:, :, None] >> shifts[None, None, :]) & ((1 << BITS) - 1)


@triton.jit
def _load_words(w_ptr, offs_n, k0, N, stride_w, BITS: tl.constexpr, BLOCK_K: tl.constexpr):
    """[BLOCK_N, BLOCK_K / per-word] int32 words of rows offs_n covering inputs k0 .. k0 + BLOCK_K.

    The mask stops at the row's (padded) end rather than at K: it is then constant over every
    16 bytes, which lets the load vectorize; codes beyond K meet zero activations."""
    PER: tl.constexpr = 32 // BITS
    offs_w = k0 // PER + tl.arange(0, BLOCK_K // PER)
    mask = (offs_n[:, None] < N) & (offs_w[None, :] < stride_w)
    return tl.load(w_ptr + offs_n[:, None] * stride_w + offs_w[None, :], mask=mask, other=0)


@triton.jit
def _as_float32(codes):
    """Exact int -> float32 for codes < 2^23 without a conversion instruction: the code ORed into
    the mantissa of 2^23, minus 2^23."""
    return (codes | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0


@triton.jit
def _centered(codes, zero, DTYPE: tl.constexpr):
    """(q - z) in DTYPE, exact (|q - z| < 256). float16 and float32 use the magic-number
    conversion: the code ORed into the mantissa of 1024 (float16) or 2^23 (float32)."""
    if DTYPE == tl.float16:
        magic = (codes | 0x6400).to(tl.int16).to(tl.float16, bitcast=True)
        return magic - (zero + 1024.0).to(tl.float16)
    else:
        return (_as_float32(codes) - zero).to(DTYPE)


@triton.jit
def gemv(
    x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr, M, N, K, G, stride_w,
    BITS: tl.constexpr, GROUP: tl.constexpr, GROUPED: tl.constexpr, ROWS: tl.constexpr,
    K_ITERS: tl.constexpr, DIRECT: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """y[m, n] = sum_k x[m, k] (q[n, k] - z[n, g]) s[n, g] for m < M <= ROWS.

    Program (n, k) covers BLOCK_N channels and K_ITERS chunks of BLOCK_K inputs, each chunk in one
    group. DIRECT (one program over K): adds the bias and stores y in its type; otherwise it
    stores a float32 partial to y_ptr[k, m, n]."""
    PER: tl.constexpr = 32 // BITS
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.arange(0, ROWS)
    in_word = tl.arange(0, BLOCK_K // PER)[:, None] * PER + tl.arange(0, PER)[None, :]  # [W, PER]
    acc = tl.zeros((ROWS, BLOCK_N), dtype=tl.float32)
    if not GROUPED:
        scale = tl.load(s_ptr + offs_n * G, mask=offs_n < N, other=0.0).to(tl.float32)
        zero = tl.load(z_ptr + offs_n * G, mask=offs_n < N, other=0).to(tl.float32)
        x_sums = tl.zeros((ROWS, 1), dtype=tl.float32)
    for it in range(K_ITERS):
        k0 = (pid_k * K_ITERS + it) * BLOCK_K
        codes = _as_float32(_unpack(_load_words(w_ptr, offs_n, k0, N, stride_w, BITS, BLOCK_K), BITS))
        offs_k = k0 + in_word
        if GROUPED:
            # the last split-K program may run past K (splits * K_ITERS chunks >= the chunks K has):
            # such a chunk reads the row's last group (its codes and x are zero, so it adds nothing)
            # rather than the scale beyond the row
            group = tl.minimum(k0 // GROUP, G - 1)
            scale = tl.load(s_ptr + offs_n * G + group, mask=offs_n < N, other=0.0).to(tl.float32)
            zero = tl.load(z_ptr + offs_n * G + group, mask=offs_n < N, other=0).to(tl.float32)
        for r in tl.static_range(ROWS):
            x = tl.load(x_ptr + r * K + offs_k, mask=(offs_k < K) & (r < M), other=0.0).to(tl.float32)
            qx = tl.sum(tl.sum(codes * x[None, :, :], axis=2), axis=1)  # [BLOCK_N]
            x_sum = tl.sum(tl.sum(x, axis=1), axis=0)
            if GROUPED:
                contribution = scale * (qx - zero * x_sum)
            else:
                contribution = qx
                x_sums += tl.where(rows[:, None] == r, x_sum, 0.0)
            acc += tl.where(rows[:, None] == r, contribution[None, :], 0.0)
    if not GROUPED:
        acc = scale[None, :] * (acc - zero[None, :] * x_sums)
    mask = (rows[:, None] < M) & (offs_n[None, :] < N)
    if DIRECT:
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + rows[:, None] * N + offs_n[None, :], acc.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(y_ptr + pid_k * M * N + rows[:, None] * N + offs_n[None, :], acc, mask=mask)


@triton.jit
def _weight_tile(w_ptr, offs_n, k0, N, stride_w, BITS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """[BLOCK_N, BLOCK_K] int32 codes."""
    codes = _unpack(_load_words(w_ptr, offs_n, k0, N, stride_w, BITS, BLOCK_K), BITS)
    return tl.reshape(codes, (BLOCK_N, BLOCK_K))


@triton.jit
def gemm(
    x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr, M, N, K, G, stride_w,
    BITS: tl.constexpr, GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_F32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """y = x @ ((q - z) * s)^T (+ bias): (q - z) exact in x's type, one dot per chunk (each chunk
    lies in one group), the group's scale applied to the [BLOCK_M, BLOCK_N] partial.
    DOT_F32: the dot in float32 (IEEE) for bfloat16 operands, whose products are exact in
    float32; set only under Triton's CPU interpreter, whose bfloat16 dot is wrong."""
    DTYPE: tl.constexpr = x_ptr.dtype.element_ty
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_m[:, None] * K + offs_k[None, :], mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0.0)
        group = k0 // GROUP
        scale = tl.load(s_ptr + offs_n * G + group, mask=offs_n < N, other=0.0).to(tl.float32)
        zero = tl.load(z_ptr + offs_n * G + group, mask=offs_n < N, other=0).to(tl.float32)
        w = _centered(_weight_tile(w_ptr, offs_n, k0, N, stride_w, BITS, BLOCK_N, BLOCK_K), zero[:, None], DTYPE)
        if DTYPE == tl.float32 or DOT_F32:
            partial = tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), input_precision="ieee")
        else:
            partial = tl.dot(x, tl.trans(w))
        acc += partial * scale[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m[:, None] * N + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


@triton.jit
def dequantize(
    w_ptr, s_ptr, z_ptr, out_ptr, N, K, G, stride_w,
    BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """out[n, k] = (q - z) * s in out's type: the same value as the reference dequantization cast
    to that type ((q - z) * s is exact in float32, then rounded once)."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    offs_k = k0 + tl.arange(0, BLOCK_K)
    group = k0 // GROUP
    scale = tl.load(s_ptr + offs_n * G + group, mask=offs_n < N, other=0.0).to(tl.float32)
    zero = tl.load(z_ptr + offs_n * G + group, mask=offs_n < N, other=0).to(tl.float32)
    w = _centered(_weight_tile(w_ptr, offs_n, k0, N, stride_w, BITS, BLOCK_N, BLOCK_K), zero[:, None], tl.float32)
    tl.store(out_ptr + offs_n[:, None] * K + offs_k[None, :], (w * scale[:, None]).to(out_ptr.dtype.element_ty),
             mask=(offs_n[:, None] < N) & (offs_k[None, :] < K))


@triton.jit
def _rint(y):
    """Round half to even (torch.round), from floor."""
    r = tl.floor(y + 0.5)
    return tl.where((r - y == 0.5) & (r % 2 != 0), r - 1.0, r)


@triton.jit
def _codes(x, scale, zero, QMAX: tl.constexpr, ASYM: tl.constexpr):
    """int8 activation codes. Symmetric: clamp(rint(x / s), -QMAX, QMAX). Asymmetric: the codes
    clamp(rint(x / s) + z, 0, 2 QMAX + 1) centred by QMAX + 1 so that 8-bit ones fit int8; `zero`
    is the centred zero point z - (QMAX + 1)."""
    if ASYM:
        q = tl.minimum(tl.maximum(_rint(x / scale) + (zero + QMAX + 1).to(tl.float32), 0.0), 2.0 * QMAX + 1.0)
        return (q - (QMAX + 1)).to(tl.int8)
    return tl.minimum(tl.maximum(_rint(x / scale), -QMAX), QMAX).to(tl.int8)


@triton.jit
def _params(hi, lo, amax, QMAX: tl.constexpr, ASYM: tl.constexpr):
    """(scale, centred zero point) from a token's max, min (both against 0) and max |x|."""
    if ASYM:
        scale = tl.maximum(hi - lo, 1e-5) / (2 * QMAX + 1)
        return scale, _rint(-lo / scale).to(tl.int32) - (QMAX + 1)
    return tl.maximum(amax, 1e-5) / QMAX, amax.to(tl.int32) * 0


@triton.jit
def quantize_rows(x_ptr, q_ptr, s_ptr, z_ptr, K, QMAX: tl.constexpr, ASYM: tl.constexpr, BLOCK_K: tl.constexpr):
    """One program per token: scale, zero point and codes as quant/primitives.py computes them
    (symmetric: s = max(max|x|, 1e-5) / QMAX; asymmetric: the range [min(x, 0), max(x, 0)] on
    2 QMAX + 1 levels); zero points stored centred (0 when symmetric)."""
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK_K)
    x = tl.load(x_ptr + row * K + offs, mask=offs < K, other=0.0).to(tl.float32)
    hi, lo = tl.maximum(tl.max(x, axis=0), 0.0), tl.minimum(tl.min(x, axis=0), 0.0)
    scale, zero = _params(hi, lo, tl.max(tl.abs(x), axis=0), QMAX, ASYM)
    tl.store(q_ptr + row * K + offs, _codes(x, scale, zero, QMAX, ASYM), mask=offs < K)
    tl.store(s_ptr + row, scale)
    tl.store(z_ptr + row, zero)


@triton.jit
def _row_params(x_ptr, offs_m, M, K, QMAX: tl.constexpr, ASYM: tl.constexpr, BLOCK_K: tl.constexpr):
    """Per-token (scale, centred zero point) of rows offs_m (a pass over K), as quantize_rows."""
    hi = tl.zeros((offs_m.shape[0],), dtype=tl.float32)
    lo = tl.zeros((offs_m.shape[0],), dtype=tl.float32)
    amax = tl.zeros((offs_m.shape[0],), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_m[:, None] * K + offs_k[None, :], mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0.0)
        x = x.to(tl.float32)
        if ASYM:
            hi, lo = tl.maximum(hi, tl.max(x, axis=1)), tl.minimum(lo, tl.min(x, axis=1))
        else:
            amax = tl.maximum(amax, tl.max(tl.abs(x), axis=1))
    return _params(hi, lo, amax, QMAX, ASYM)


@triton.jit
def int_gemm(
    x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr, xs_ptr, xz_ptr, acc_ptr, M, N, K, G, stride_w,
    BITS: tl.constexpr, GROUP: tl.constexpr, GROUPED: tl.constexpr, QMAX: tl.constexpr, ACT_ASYM: tl.constexpr,
    QUANTIZE_X: tl.constexpr, HAS_BIAS: tl.constexpr, STORE_INT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """y = xs[m] * sum_g s[n, g] * sum_{k in g} (xq[m, k] - xz[m]) (q[n, k] - z[n, g]).

    Codes enter the int8 dot centred on OFFSET (128 for 8-bit containers, whose codes exceed
    int8; 0 otherwise) and the zero point moves by the same amount, so every sum is exact in
    int32. Per-channel weights keep one int32 accumulator and apply the zero points and scale
    once (STORE_INT writes that accumulator too). QUANTIZE_X: x is float and quantized per token
    here (the same arithmetic as quantize_rows); otherwise x holds int8 codes, xs their scales and
    xz their centred zero points. ACT_ASYM: the activation zero point enters as the epilogue's
    correction xz[m] * sum_{k in g} (q[n, k] - z[n, g]), the column sums taken from the weight
    tiles already loaded.
    """
    OFFSET: tl.constexpr = 128 if BITS == 8 else 0
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    if QUANTIZE_X:
        x_scale, x_zero = _row_params(x_ptr, offs_m, M, K, QMAX, ACT_ASYM, BLOCK_K)
    else:
        x_scale = tl.load(xs_ptr + offs_m, mask=offs_m < M, other=0.0)
        x_zero = tl.load(xz_ptr + offs_m, mask=offs_m < M, other=0) if ACT_ASYM else tl.zeros((BLOCK_M,), dtype=tl.int32)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_int = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    x_sum = tl.zeros((BLOCK_M,), dtype=tl.int32)
    w_sum = tl.zeros((BLOCK_N,), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_m[:, None] * K + offs_k[None, :], mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0)
        if QUANTIZE_X:
            x = _codes(x.to(tl.float32), x_scale[:, None], x_zero[:, None], QMAX, ACT_ASYM)
            x = tl.where(offs_k[None, :] < K, x, 0)  # padding columns: no code, no contribution
        w = (_weight_tile(w_ptr, offs_n, k0, N, stride_w, BITS, BLOCK_N, BLOCK_K) - OFFSET).to(tl.int8)
        partial = tl.dot(x, tl.trans(w), out_dtype=tl.int32)
        if ACT_ASYM:  # sum of (q - OFFSET) over this chunk's real columns (padding loaded as code 0)
            chunk_w = tl.sum(w.to(tl.int32), axis=1) + (BLOCK_K - tl.minimum(K - k0, BLOCK_K)) * OFFSET
        if GROUPED:
            group = k0 // GROUP
            zero = tl.load(z_ptr + offs_n * G + group, mask=offs_n < N, other=0).to(tl.int32) - OFFSET
            scale = tl.load(s_ptr + offs_n * G + group, mask=offs_n < N, other=0.0).to(tl.float32)
            partial -= tl.sum(x.to(tl.int32), axis=1)[:, None] * zero[None, :]
            if ACT_ASYM:
                partial -= x_zero[:, None] * (chunk_w - tl.minimum(K - k0, BLOCK_K) * zero)[None, :]
            acc += partial.to(tl.float32) * scale[None, :]
        else:
            acc_int += partial
            x_sum += tl.sum(x.to(tl.int32), axis=1)
            if ACT_ASYM:
                w_sum += chunk_w
    if not GROUPED:
        zero = tl.load(z_ptr + offs_n * G, mask=offs_n < N, other=0).to(tl.int32) - OFFSET
        acc_int -= x_sum[:, None] * zero[None, :]
        if ACT_ASYM:
            acc_int -= x_zero[:, None] * (w_sum - K * zero)[None, :]
        acc = acc_int.to(tl.float32) * tl.load(s_ptr + offs_n * G, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    acc = acc * x_scale[:, None]
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    out_mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(y_ptr + offs_m[:, None] * N + offs_n[None, :], acc.to(y_ptr.dtype.element_ty), mask=out_mask)
    if STORE_INT:
        tl.store(acc_ptr + offs_m[:, None] * N + offs_n[None, :], acc_int, mask=out_mask)
