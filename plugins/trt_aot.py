"""Ahead-of-time lrq plugins for the full `tensorrt` package (`tensorrt.plugin`, TensorRT >= 10.9).

The same `lrq` nodes as trt_plugins.py, declared with `@register` (shape/type rules),
`@autotune` (type/format combinations) and `@aot_impl`, which hands TensorRT the PTX that
Triton compiles for the building GPU plus symbolic launch parameters. The engine then embeds
the kernels and runs without Python (trtexec, C++). TensorRT for RTX 1.7 has no AOT plugin
interface, so it uses the Python plugins of trt_plugins.py.

`tensorrt.plugin` registrations have a fixed input list, so graphs whose lrq nodes carry a bias
input build with the Python plugins (the bundled LLaMA has none; ViTs do).

Kernel parameters follow TensorRT's AOT launch order: input pointers (x, qweight, scales,
zeros), the output pointer, then the scalars M, N, K, groups and the weight row stride in int32
words (aot.SCALARS); Triton appends two scratch pointers, unused by these kernels. The kernel
and its tiles are the dispatch table's for the building GPU (aot.plugin_kernel).
"""

# No `from __future__ import annotations`: tensorrt.plugin inspects these annotations as classes.
from typing import List, Tuple, Union

import inspect

from lrq_deploy.errors import LrqError
from lrq_deploy.quant.scheme import layer_attributes

from . import aot
from .trt_plugins import FIELDS, NAMESPACE, PLUGIN_NAMES

_DTYPE_NAMES = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16"}
_registered: set[str] = set()


def supports_aot() -> bool:
    """True when the installed `tensorrt` has ahead-of-time Python plugins."""
    try:
        import tensorrt.plugin as trtp
    except Exception:  # absent, or a package without its libraries
        return False
    return hasattr(trtp, "aot_impl")


def grid_dims(kernel: aot.PluginKernel, rows, cols) -> tuple:
    """Tiles over (rows, cols); works on ints and on TensorRT's symbolic shape expressions."""
    block_m, block_n = kernel.constexprs["BLOCK_M"], kernel.constexprs["BLOCK_N"]
    return (rows + (block_m - 1)) // block_m, (cols + (block_n - 1)) // block_n


def scalar_args(attrs: dict) -> tuple:
    """The scalars after M, in aot.SCALARS order: N, K, groups, weight row stride (int32 words)."""
    scheme, k, n = layer_attributes(attrs)
    if (k * scheme.container_bits) % 32:
        raise LrqError(f"ahead-of-time plugins read weight rows as int32 words; in_features {k} does not fill them")
    return n, k, scheme.groups(k), k * scheme.container_bits // 32


def leading_rows(shape, rank: int):
    """Product of all but the last dimension: the GEMM's M."""
    rows = shape[0]
    for index in range(1, rank - 1):
        rows = rows * shape[index]
    return rows


def register_aot_plugins() -> None:
    import tensorrt.plugin as trtp

    for name in PLUGIN_NAMES:
        if name not in _registered:
            _register(trtp, name)
            _registered.add(name)


def _register(trtp, name: str) -> None:  # noqa: C901 - tensorrt.plugin reads these signatures
    op = f"{NAMESPACE}::{name}"
    TensorDesc = trtp.TensorDesc  # noqa: N806 - annotations must name the class

    @trtp.register(op)
    def describe(x: TensorDesc, qweight: TensorDesc, scales: TensorDesc, zeros: TensorDesc, wbits: int, abits: int,
                 group_size: int, in_features: int, out_features: int, symmetric: int, act_asym: int
                 ) -> Tuple[TensorDesc]:
        dims = tuple(x.shape_expr[i] for i in range(x.ndim - 1)) + (out_features,)
        return (trtp.from_shape_expr(dims, x.dtype),)

    @trtp.autotune(op)
    def combinations(x: TensorDesc, qweight: TensorDesc, scales: TensorDesc, zeros: TensorDesc,
                     outputs: Tuple[TensorDesc]) -> List[trtp.AutoTuneCombination]:
        return [trtp.AutoTuneCombination("FP16|FP32|BF16, INT8, FP16, INT8, FP16|FP32|BF16", "LINEAR")]

    @trtp.aot_impl(op)
    def compile_kernel(x: TensorDesc, qweight: TensorDesc, scales: TensorDesc, zeros: TensorDesc, wbits: int,
                       abits: int, group_size: int, in_features: int, out_features: int, symmetric: int,
                       act_asym: int, outputs: Tuple[TensorDesc], tactic: int
                       ) -> Tuple[Union[str, bytes], Union[str, bytes], trtp.KernelLaunchParams, trtp.SymExprs]:
        import torch

        attrs = {"wbits": wbits, "abits": abits, "group_size": group_size, "symmetric": symmetric,
                 "act_asym": act_asym, "in_features": in_features, "out_features": out_features}
        major, minor = torch.cuda.get_device_capability()
        sm = 10 * major + minor
        kernel = aot.plugin_kernel(name, attrs, _DTYPE_NAMES[str(x.dtype).rsplit(".", 1)[-1]], sm)
        compiled = aot.compile_ptx(kernel, sm)
        rows = leading_rows(x.shape_expr, x.ndim)
        launch = trtp.KernelLaunchParams()
        launch.grid_x, launch.grid_y = grid_dims(kernel, rows, out_features)
        launch.block_x = 32 * compiled.num_warps
        launch.shared_mem = compiled.shared_bytes
        extra = trtp.SymIntExprs.from_tuple((trtp.SymInt32(rows), *scalar_args(attrs)))
        return compiled.name, compiled.ptx, launch, extra

    check_signature(describe, 4)
    check_signature(compile_kernel, 4, trailing=2)


def check_signature(fn, tensors: int, trailing: int = 0) -> None:
    """tensorrt.plugin reads the attributes from the function's parameters, which must therefore
    be spelled out; they must be exactly the scheme's and layer's attributes (trt_plugins.FIELDS)."""
    names = list(inspect.signature(fn).parameters)[tensors:len(inspect.signature(fn).parameters) - trailing]
    if sorted(names) != sorted(FIELDS):
        raise LrqError(f"{fn.__name__} takes attributes {names}, the plugins carry {list(FIELDS)}")
