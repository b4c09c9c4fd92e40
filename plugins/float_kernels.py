"""Triton kernels of the float grids: FP8 W8A8 on FP8 tensor cores (SM89 / SM90: `tl.dot` of two
E4M3 tiles) and NVFP4 / MXFP4 W4A4 on block-scaled FP4 tensor cores (SM100 / SM120:
`tl.dot_scaled` of two E2M1 tiles with their E4M3 or E8M0 block scales).

Operands are the checkpoint's buffers as stored (quant/grids.py): FP8 codes [N, K], E2M1 codes
packed two per byte [N, K / 2] with their block scales [N, K / block]; the activations arrive
quantized the same way (float_ops.py). Products of grid values and power-of-two scales are exact
in float32; what differs from the reference is the order of the float32 sums only.
"""

from __future__ import annotations

from ._triton import load_triton

triton, tl = load_triton()

FP8_TILES = {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3}
FP4_TILES = {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3}


@triton.jit
def fp8_linear(x_ptr, w_ptr, ws_ptr, b_ptr, y_ptr, x_scale, M, N, K,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """y[m, n] = sum_k x[m, k] w[n, k] * x_scale * ws[n] (+ b[n]); x, w E4M3 codes, fp32 sums."""
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + rk
        x = tl.load(x_ptr + rm[:, None] * K + ks[None, :], mask=(rm[:, None] < M) & (ks[None, :] < K), other=0.0)
        w = tl.load(w_ptr + rn[None, :] * K + ks[:, None], mask=(rn[None, :] < N) & (ks[:, None] < K), other=0.0)
        acc = tl.dot(x, w, acc)
    ws = tl.load(ws_ptr + rn, mask=rn < N, other=0.0)
    out = acc * x_scale * ws[None, :]
    if b_ptr is not None:
        out += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rm[:, None] * N + rn[None, :], out.to(y_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


@triton.jit
def fp4_linear(x_ptr, xs_ptr, w_ptr, ws_ptr, b_ptr, y_ptr, alpha, M, N, K,
               SCALE_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """y = alpha * sum over blocks of (x * xs)(w * ws) (+ b): x, w E2M1 codes two per byte, xs, ws
    block scales (E4M3 for blocks of 16: NVFP4; E8M0 for blocks of 32: MXFP4), alpha the product of
    the tensor scales. K is a multiple of BLOCK_K (the launcher checks)."""
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rb = tl.arange(0, BLOCK_K // 2)
    rs = tl.arange(0, BLOCK_K // SCALE_BLOCK)
    half, groups = K // 2, K // SCALE_BLOCK
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x = tl.load(x_ptr + rm[:, None] * half + (k0 // 2 + rb)[None, :], mask=rm[:, None] < M, other=0)
        w = tl.load(w_ptr + rn[:, None] * half + (k0 // 2 + rb)[None, :], mask=rn[:, None] < N, other=0)
        # rows past M / N read no scale (their products are never stored)
        xs = tl.load(xs_ptr + rm[:, None] * groups + (k0 // SCALE_BLOCK + rs)[None, :], mask=rm[:, None] < M)
        ws = tl.load(ws_ptr + rn[:, None] * groups + (k0 // SCALE_BLOCK + rs)[None, :], mask=rn[:, None] < N)
        acc = tl.dot_scaled(x, xs, "e2m1", w.T, ws, "e2m1", acc)
    out = acc * alpha
    if b_ptr is not None:
        out += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rm[:, None] * N + rn[None, :], out.to(y_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))
