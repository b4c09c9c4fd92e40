"""Launchers for the Triton kernels, with input checks, registered as torch custom ops
(`lrq_kernels::*`, with fake implementations so torch.compile can trace them).

Every launcher asks dispatch.py for its route and tiles. `group` arguments are group lengths
(a divisor of K; K itself for per-channel weights): QuantScheme.group_length makes them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lrq_deploy.errors import LrqError
from lrq_deploy.quant.primitives import act_qmax
from lrq_deploy.quant.scheme import KernelFamily, QuantScheme

from . import dispatch, kernels
from ._triton import load_triton

triton, _ = load_triton()
FLOAT_TYPES = (torch.float16, torch.bfloat16, torch.float32)
ROW_ALIGN_BYTES = 16


def kernel_words(qweight: torch.Tensor) -> torch.Tensor:
    """Packed uint8 rows [N, B] as int32 words [N, B'/4], rows padded with zero codes to a multiple
    of 16 bytes: every row starts 16-byte aligned, so threads read weights with 128-bit loads.
    A zero-copy view whenever K * bits is a multiple of 128 (every real model's layer); other
    shapes pay a copy per call. Padding codes meet masked (zero) activations."""
    n, row_bytes = qweight.shape
    padded = -(-row_bytes // ROW_ALIGN_BYTES) * ROW_ALIGN_BYTES
    if padded != row_bytes or not qweight.is_contiguous() or qweight.data_ptr() % ROW_ALIGN_BYTES:
        aligned = torch.zeros(n, padded, dtype=torch.uint8, device=qweight.device)
        aligned[:, :row_bytes] = qweight
        qweight = aligned
    return qweight.view(torch.int32)


def check_weight(x: torch.Tensor, qweight, scales, zeros, bits: int, group: int) -> tuple[int, int, int]:
    """Validate operands; returns (N, K, groups). Every violation is one clear error."""
    if x.dtype not in FLOAT_TYPES:
        raise LrqError(f"activations must be float16, bfloat16 or float32, got {x.dtype}")
    if bits not in (2, 4, 8):
        raise LrqError(f"no kernel for {bits}-bit weight containers (kernels exist for 2, 4 and 8)")
    if qweight.dtype != torch.uint8 or qweight.dim() != 2:
        raise LrqError("packed weights must be a 2-D uint8 tensor")
    n, k, codes = qweight.shape[0], x.shape[-1], qweight.shape[1] * (8 // bits)
    if codes != -(-k // (8 // bits)) * (8 // bits):
        raise LrqError(f"activations have {k} input features, the weights {codes}")
    if group < 1 or k % group:
        raise LrqError(f"group size {group} does not divide K = {k}")
    if scales.shape != (n, k // group) or zeros.shape != (n, k // group):
        raise LrqError(f"scales and zero points must be [{n}, {k // group}], got {tuple(scales.shape)} / {tuple(zeros.shape)}")
    if len({t.device for t in (x, qweight, scales, zeros)}) != 1:
        raise LrqError("all operands must be on the same device")
    return n, k, k // group


def _launch(launch: dispatch.Launch, *args) -> None:
    fn = getattr(kernels, launch.kernel)
    fn[launch.grid](*args, **launch.constexprs, num_warps=launch.num_warps, num_stages=launch.num_stages)


def _bias_arg(bias, fallback):
    return bias if bias is not None else fallback


@torch.library.custom_op("lrq_kernels::weight_only_linear", mutates_args=())
def weight_only_linear(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
    bias: torch.Tensor | None, bits: int, group: int,
) -> torch.Tensor:
    """y = x @ ((q - z) * s)^T (+ bias) for 2- or 4-bit weight containers, routed by rows."""
    if bits not in (2, 4):
        raise LrqError(f"no weight-only kernel for {bits}-bit weight containers (kernels exist for 2 and 4)")
    n, k, groups = check_weight(x, qweight, scales, zeros, bits, group)
    x2 = x.reshape(-1, k).contiguous()
    m = x2.shape[0]
    words = kernel_words(qweight)
    route = dispatch.route_for(KernelFamily.WEIGHT_ONLY, m)
    launch = dispatch.plan(route, m, n, k, group, bits, has_bias=bias is not None)
    if route == "dequantize":
        weight = torch.empty(n, k, dtype=x.dtype, device=x.device)
        _launch(launch, words, scales, zeros, weight, n, k, groups, words.shape[1])
        y = F.linear(x2, weight, None if bias is None else bias.to(x.dtype))
    elif route == "gemv" and launch.split_k > 1:
        partial = torch.empty(launch.split_k, m, n, dtype=torch.float32, device=x.device)
        _launch(launch, x2, words, scales, zeros, scales, partial, m, n, k, groups, words.shape[1])
        y = partial.sum(0)
        y = (y if bias is None else y + bias.float()).to(x.dtype)
    else:
        y = torch.empty(m, n, dtype=x.dtype, device=x.device)
        _launch(launch, x2, words, scales, zeros, _bias_arg(bias, scales), y, m, n, k, groups, words.shape[1])
    return y.reshape(*x.shape[:-1], n)


@weight_only_linear.register_fake
def _(x, qweight, scales, zeros, bias, bits, group):
    return x.new_empty(*x.shape[:-1], qweight.shape[0])


@torch.library.custom_op("lrq_kernels::quantize_rows", mutates_args=())
def quantize_rows(x: torch.Tensor, bits: int, asym: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token quantization: (int8 codes [M, K], float32 scales [M], int32 zero points [M]).
    Symmetric: codes in [-(2^(b-1)-1), 2^(b-1)-1], zero points 0. Asymmetric: the codes of
    quant/primitives.py in [0, 2^b - 1] and their zero points, both minus 2^(b-1) (centred, so
    8-bit codes fit int8): x = (codes - zero) * scale either way."""
    if x.dtype not in FLOAT_TYPES:
        raise LrqError(f"activations must be float16, bfloat16 or float32, got {x.dtype}")
    if not 2 <= bits <= 8:
        raise LrqError(f"activation bits must lie in 2..8, got {bits}")
    k = x.shape[-1]
    x2 = x.reshape(-1, k).contiguous()
    q = torch.empty(x2.shape, dtype=torch.int8, device=x.device)
    s = torch.empty(x2.shape[0], dtype=torch.float32, device=x.device)
    z = torch.empty(x2.shape[0], dtype=torch.int32, device=x.device)
    kernels.quantize_rows[(x2.shape[0],)](x2, q, s, z, k, QMAX=act_qmax(bits), ASYM=asym, BLOCK_K=triton.next_power_of_2(k))
    return q, s, z


@quantize_rows.register_fake
def _(x, bits, asym=False):
    k = x.shape[-1]
    rows = x.numel() // k
    return (x.new_empty(rows, k, dtype=torch.int8), x.new_empty(rows, dtype=torch.float32),
            x.new_empty(rows, dtype=torch.int32))


def integer_matmul(xq, xs, xz, qweight, scales, zeros, bias, bits: int, abits: int, group: int, out_dtype):
    """Integer activation codes (int8 [M, K], scales xs, centred zero points xz or None for
    symmetric codes) x integer weights -> y [M, N]."""
    if xq.dtype != torch.int8:
        raise LrqError(f"quantized activations must be int8, got {xq.dtype}")
    n, k, groups = check_weight(xs.new_empty(1, xq.shape[-1]), qweight, scales, zeros, bits, group)
    m = xq.shape[0]
    launch = dispatch.plan("int_gemm", m, n, k, group, bits, has_bias=bias is not None, abits=abits,
                           act_asym=xz is not None)
    y = torch.empty(m, n, dtype=out_dtype, device=xq.device)
    words = kernel_words(qweight)
    _launch(launch, xq.contiguous(), words, scales, zeros, _bias_arg(bias, scales), y, xs, xs if xz is None else xz, y,
            m, n, k, groups, words.shape[1])
    return y


@torch.library.custom_op("lrq_kernels::integer_linear", mutates_args=())
def integer_linear(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
    bias: torch.Tensor | None, bits: int, abits: int, group: int, act_asym: bool = False,
) -> torch.Tensor:
    """An activation-quantized layer: per-token codes (quantize_rows), then the integer GEMM."""
    check_weight(x, qweight, scales, zeros, bits, group)
    xq, xs, xz = quantize_rows(x, abits, act_asym)
    y = integer_matmul(xq, xs, xz if act_asym else None, qweight, scales, zeros, bias, bits, abits, group, x.dtype)
    return y.reshape(*x.shape[:-1], qweight.shape[0])


@integer_linear.register_fake
def _(x, qweight, scales, zeros, bias, bits, abits, group, act_asym=False):
    return x.new_empty(*x.shape[:-1], qweight.shape[0])


def scheme_linear(x, qweight, scales, zeros, bias, scheme: QuantScheme, in_features: int) -> torch.Tensor:
    """A layer of `scheme` on the kernel family the scheme names (the torch backend and the
    TensorRT Python plugins both run layers through here); `zeros` is a float grid's tensor_scales."""
    family = scheme.require_kernel()
    if family is KernelFamily.FLOAT:
        from .float_ops import float_linear

        attrs = scheme.to_attributes()  # the node-attribute encoding: format index, block (0 = per channel)
        return float_linear(x, qweight, scales, zeros, bias, attrs["wformat"], attrs["group_size"])
    bits, group = scheme.container_bits, scheme.group_length(in_features)
    if family is KernelFamily.INTEGER:
        return integer_linear(x, qweight, scales, zeros, bias, bits, scheme.abits, group, scheme.act_asym)
    return weight_only_linear(x, qweight, scales, zeros, bias, bits, group)
