"""Launchers for the Triton kernels, with input checks, registered as torch custom ops
(`lrq_kernels::*`, with fake implementations so torch.compile can trace them)."""

from __future__ import annotations

import torch

from lrq_deploy.errors import LrqError

from . import kernels
from ._triton import interpreted, load_triton

triton, _ = load_triton()
FLOAT_TYPES = (torch.float16, torch.bfloat16, torch.float32)
GEMV_MAX_ROWS = 4


def _blocks(small: int = 16) -> dict:
    # The interpreter runs one numpy program per block: large blocks keep CPU tests fast.
    return {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64} if interpreted() else {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": max(small, 64)}


def check_weight(x: torch.Tensor, qweight, scales, zeros, bits: int, group_size: int) -> tuple[int, int, int]:
    """Validate operands; returns (N, K, groups). Every violation is one clear error."""
    if x.dtype not in FLOAT_TYPES:
        raise LrqError(f"activations must be float16, bfloat16 or float32, got {x.dtype}")
    if bits not in (2, 4):
        raise LrqError(f"no kernel for {bits}-bit weight containers (kernels exist for 2 and 4)")
    if qweight.dtype != torch.uint8 or qweight.dim() != 2:
        raise LrqError("packed weights must be a 2-D uint8 tensor")
    n, k = qweight.shape[0], qweight.shape[1] * (8 // bits)
    if x.shape[-1] != k:
        raise LrqError(f"activations have {x.shape[-1]} input features, the weights {k}")
    group = group_size or k
    if k % group:
        raise LrqError(f"group size {group} does not divide K = {k}")
    if scales.shape != (n, k // group) or zeros.shape != (n, k // group):
        raise LrqError(f"scales and zero points must be [{n}, {k // group}], got {tuple(scales.shape)} / {tuple(zeros.shape)}")
    if len({t.device for t in (x, qweight, scales, zeros)}) != 1:
        raise LrqError("all operands must be on the same device")
    return n, k, k // group


@torch.library.custom_op("lrq_kernels::weight_only_linear", mutates_args=())
def weight_only_linear(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
    bias: torch.Tensor | None, bits: int, group_size: int,
) -> torch.Tensor:
    """y = x @ ((q - z) * s)^T (+ bias), weights dequantized inside the kernel."""
    n, k, groups = check_weight(x, qweight, scales, zeros, bits, group_size)
    x2 = x.reshape(-1, k).contiguous()
    m = x2.shape[0]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    common = dict(BITS=bits, GROUP=group_size or k, HAS_BIAS=bias is not None)
    b = bias if bias is not None else scales
    if m <= GEMV_MAX_ROWS:
        blocks = _blocks()
        kernels.weight_only_gemv[(triton.cdiv(n, blocks["BLOCK_N"]),)](
            x2, qweight, scales, zeros, b, y, n, k, groups, ROWS=m, BLOCK_N=blocks["BLOCK_N"], BLOCK_K=blocks["BLOCK_K"], **common
        )
    else:
        blocks = _blocks()
        grid = (triton.cdiv(m, blocks["BLOCK_M"]), triton.cdiv(n, blocks["BLOCK_N"]))
        kernels.weight_only_gemm[grid](
            x2, qweight, scales, zeros, b, y, m, n, k, groups, IEEE=x.dtype == torch.float32, **common, **blocks
        )
    return y.reshape(*x.shape[:-1], n)


@weight_only_linear.register_fake
def _(x, qweight, scales, zeros, bias, bits, group_size):
    return x.new_empty(*x.shape[:-1], qweight.shape[0])


@torch.library.custom_op("lrq_kernels::quantize_rows", mutates_args=())
def quantize_rows(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token symmetric quantization: (int8 values in [-(2^(b-1)-1), 2^(b-1)-1] [M, K], float32 scales [M])."""
    if x.dtype not in FLOAT_TYPES:
        raise LrqError(f"activations must be float16, bfloat16 or float32, got {x.dtype}")
    if not 2 <= bits <= 8:
        raise LrqError(f"activation bits must lie in 2..8, got {bits}")
    k = x.shape[-1]
    x2 = x.reshape(-1, k).contiguous()
    q = torch.empty(x2.shape, dtype=torch.int8, device=x.device)
    s = torch.empty(x2.shape[0], dtype=torch.float32, device=x.device)
    kernels.quantize_rows[(x2.shape[0],)](x2, q, s, k, QMAX=2 ** (bits - 1) - 1, BLOCK_K=triton.next_power_of_2(k))
    return q, s


@quantize_rows.register_fake
def _(x, bits):
    k = x.shape[-1]
    rows = x.numel() // k
    return x.new_empty(rows, k, dtype=torch.int8), x.new_empty(rows, dtype=torch.float32)


def w4a4_matmul(xq, xs, qweight, scales, zeros, bias, group_size: int, out_dtype, return_int: bool = False):
    """INT4 activations (int8-held) x INT4 weights. Returns y [M, N] (and the int32 accumulator)."""
    if xq.dtype != torch.int8:
        raise LrqError(f"quantized activations must be int8, got {xq.dtype}")
    n, k, groups = check_weight(xs.new_empty(1, xq.shape[-1]), qweight, scales, zeros, 4, group_size)
    group = group_size or k
    blocks, block_k = _w4a4_blocks(group_size, k)
    if return_int and groups != 1:
        raise LrqError("the exact int32 accumulator is returned for per-channel weights only")
    m = xq.shape[0]
    y = torch.empty(m, n, dtype=out_dtype, device=xq.device)
    acc = torch.empty(m, n, dtype=torch.int32, device=xq.device) if return_int else y
    grid = (triton.cdiv(m, blocks["BLOCK_M"]), triton.cdiv(n, blocks["BLOCK_N"]))
    kernels.w4a4_gemm[grid](
        xq.contiguous(), xs, qweight, scales, zeros, bias if bias is not None else scales, y, acc, m, n, k, groups,
        GROUP=group, HAS_BIAS=bias is not None, STORE_INT=return_int,
        BLOCK_M=blocks["BLOCK_M"], BLOCK_N=blocks["BLOCK_N"], BLOCK_K=block_k,
    )
    return (y, acc) if return_int else y


def _w4a4_blocks(group_size: int, k: int) -> tuple[dict, int]:
    blocks = _blocks()
    group = group_size or k
    block_k = min(blocks["BLOCK_K"], group)
    if group % block_k or (not interpreted() and block_k < 16):
        raise LrqError(f"the W4A4 kernel needs a group size that is a multiple of 16, got {group}")
    return blocks, block_k


def w4a4_fused(x, qweight, scales, zeros, bias, group_size: int) -> torch.Tensor:
    """W4A4 in one kernel launch: activation quantization fused into the integer GEMM."""
    n, k, groups = check_weight(x, qweight, scales, zeros, 4, group_size)
    x2 = x.reshape(-1, k).contiguous()
    m = x2.shape[0]
    blocks, block_k = _w4a4_blocks(group_size, k)
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(m, blocks["BLOCK_M"]), triton.cdiv(n, blocks["BLOCK_N"]))
    kernels.w4a4_fused_gemm[grid](
        x2, qweight, scales, zeros, bias if bias is not None else scales, y, m, n, k, groups,
        GROUP=group_size or k, HAS_BIAS=bias is not None,
        BLOCK_M=blocks["BLOCK_M"], BLOCK_N=blocks["BLOCK_N"], BLOCK_K=block_k,
    )
    return y.reshape(*x.shape[:-1], n)


@torch.library.custom_op("lrq_kernels::w4a4_linear", mutates_args=())
def w4a4_linear(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
    bias: torch.Tensor | None, group_size: int,
) -> torch.Tensor:
    """A W4A4 layer: per-token INT4 quantization of x fused into the integer GEMM (one launch)."""
    return w4a4_fused(x, qweight, scales, zeros, bias, group_size)


@w4a4_linear.register_fake
def _(x, qweight, scales, zeros, bias, group_size):
    return x.new_empty(*x.shape[:-1], qweight.shape[0])
