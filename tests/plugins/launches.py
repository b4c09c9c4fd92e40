"""Kernel launches that only tests make: the integer GEMM with its exact int32 accumulator
stored, and the fused launch the TensorRT AOT plugins run (per-token quantizer inside the GEMM),
both through the dispatch table and the launch helpers of lrq_deploy.plugins.ops."""

import torch

from lrq_deploy.plugins import dispatch, ops


def integer_matmul_with_accumulator(xq, xs, xz, qweight, scales, zeros, bias, bits: int, abits: int, group: int,
                                    out_dtype):
    """(y [M, N], the int32 accumulator sum_k (xq - xz)(q - z) [M, N]) for per-channel weights."""
    n, k, groups = ops.check_weight(xs.new_empty(1, xq.shape[-1]), qweight, scales, zeros, bits, group)
    assert groups == 1, "the accumulator is stored for per-channel weights only"
    m = xq.shape[0]
    launch = dispatch.plan("int_gemm", m, n, k, group, bits, has_bias=bias is not None, abits=abits, store_int=True,
                           act_asym=xz is not None)
    y = torch.empty(m, n, dtype=out_dtype, device=xq.device)
    acc = torch.empty(m, n, dtype=torch.int32, device=xq.device)
    words = ops.kernel_words(qweight)
    ops._launch(launch, xq.contiguous(), words, scales, zeros, ops._bias_arg(bias, scales), y, xs,
                xs if xz is None else xz, acc, m, n, k, groups, words.shape[1])
    return y, acc


def integer_fused(x, qweight, scales, zeros, bias, bits: int, abits: int, group: int, act_asym: bool = False):
    """One launch: per-token activation quantization inside the integer GEMM (what the TensorRT
    AOT plugin kernel does); equal to quantize_rows + integer_matmul."""
    n, k, groups = ops.check_weight(x, qweight, scales, zeros, bits, group)
    x2 = x.reshape(-1, k).contiguous()
    m = x2.shape[0]
    launch = dispatch.plan("int_gemm", m, n, k, group, bits, has_bias=bias is not None, abits=abits, quantize_x=True,
                           act_asym=act_asym)
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    words = ops.kernel_words(qweight)
    ops._launch(launch, x2, words, scales, zeros, ops._bias_arg(bias, scales), y, scales, scales, y, m, n, k, groups,
                words.shape[1])
    return y.reshape(*x.shape[:-1], n)
