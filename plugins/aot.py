"""Ahead-of-time kernels for the TensorRT plugins: shape/type rules, launch parameters and PTX.

The `lrq`-domain nodes that `lrq export --target trt` writes (W4A16Linear, W2A16Linear,
W4A4Linear, ...) each run one Triton kernel. What TensorRT's plugin API asks for is computed
here in plain Python, so it is tested without TensorRT or a GPU:

- `output_shape` / `output_dtype`: the plugin's shape and type rules;
- `launch_params`: grid, threads per block and shared memory for given M, N;
- `compile_ptx`: Triton compiles the kernel for a target GPU (sm_80, sm_90, sm_100, ...)
  on any machine, GPU or not. Triton's interpreter (used on CPU) cannot compile, so when it is
  active the compilation runs in a child process with the interpreter off.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass

from lrq_deploy.errors import LrqError

BLOCK = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64}
_DTYPES = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}


@dataclass(frozen=True)
class PluginKernel:
    op_type: str
    kernel: str  # function name in plugins/kernels.py
    signature: dict
    constexprs: dict


def plugin_kernel(op_type: str, attrs: dict, dtype: str = "float16") -> PluginKernel:
    """The kernel, argument types and compile-time constants of one lrq plugin node."""
    if dtype not in _DTYPES:
        raise LrqError(f"plugin activations must be one of {', '.join(_DTYPES)}, got {dtype}")
    t = _DTYPES[dtype]
    wbits, abits, k = attrs["wbits"], attrs["abits"], attrs["in_features"]
    group = attrs.get("group_size") or k
    pointers = {"x_ptr": f"*{t}", "q_ptr": "*u8", "s_ptr": "*fp16", "z_ptr": "*u8", "b_ptr": f"*{t}", "y_ptr": f"*{t}"}
    sizes = {"M": "i32", "N": "i32", "K": "i32", "G": "i32"}
    has_bias = bool(attrs.get("has_bias", False))
    if abits == 16 and wbits in (2, 3, 4):
        constexprs = {"BITS": 2 if wbits == 2 else 4, "GROUP": group, "HAS_BIAS": has_bias, "IEEE": t == "fp32", **BLOCK}
        kernel = "weight_only_gemm"
    elif (wbits, abits) == (4, 4):
        constexprs = {"GROUP": group, "HAS_BIAS": has_bias, **BLOCK, "BLOCK_K": min(BLOCK["BLOCK_K"], group)}
        kernel = "w4a4_fused_gemm"
    else:
        raise LrqError(f"no plugin kernel for {op_type} (W{wbits}A{abits})")
    if k % (8 // constexprs.get("BITS", 4)) or k % group:
        raise LrqError(f"{op_type}: in_features {k} does not fit the packing or group size {group}")
    if not has_bias:
        # A None pointer is a compile-time constant: the kernel then takes exactly what an
        # ahead-of-time TensorRT plugin passes: input pointers, the output pointer, then scalars.
        pointers["b_ptr"] = "constexpr"
        constexprs = {**constexprs, "b_ptr": None}
    signature = {**pointers, **sizes, **{name: "constexpr" for name in constexprs if name != "b_ptr"}}
    return PluginKernel(op_type, kernel, signature, constexprs)


def output_shape(input_shape: tuple, attrs: dict) -> tuple:
    """[..., in_features] -> [..., out_features]."""
    if not input_shape or input_shape[-1] not in (attrs["in_features"], -1):
        raise LrqError(f"input's last dimension {input_shape[-1] if input_shape else None} != in_features {attrs['in_features']}")
    return (*input_shape[:-1], attrs["out_features"])


def output_dtype(input_dtype: str) -> str:
    """The output has the activations' type."""
    if input_dtype not in _DTYPES:
        raise LrqError(f"plugin activations must be one of {', '.join(_DTYPES)}, got {input_dtype}")
    return input_dtype


def launch_params(kernel: PluginKernel, m: int, n: int, num_warps: int, shared_bytes: int) -> dict:
    """Grid over (M, N) tiles, threads per block and dynamic shared memory of one launch."""
    grid = (-(-m // kernel.constexprs["BLOCK_M"]), -(-n // kernel.constexprs["BLOCK_N"]), 1)
    return {"grid": grid, "block": (32 * num_warps, 1, 1), "shared_bytes": shared_bytes}


@dataclass
class CompiledKernel:
    name: str
    target: str
    ptx: str
    num_warps: int
    shared_bytes: int


def compile_ptx(kernel: PluginKernel, sm: int) -> CompiledKernel:
    """PTX of a plugin kernel for compute capability `sm` (80, 86, 89, 90, 100, 120, ...)."""
    request = {"kernel": kernel.kernel, "signature": kernel.signature, "constexprs": kernel.constexprs, "sm": sm}
    if os.environ.get("TRITON_INTERPRET") != "1":
        return CompiledKernel(**_compile(request))
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    proc = subprocess.run(
        [sys.executable, "-m", "lrq_deploy.plugins.aot"], input=json.dumps(request), capture_output=True, text=True, env=env
    )
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise LrqError(f"Triton could not compile {kernel.kernel} for sm_{sm}: {last}")
    return CompiledKernel(**json.loads(proc.stdout))


def _compile(request: dict) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from . import kernels

    fn = getattr(kernels, request["kernel"])
    source = ASTSource(fn=fn, signature=request["signature"], constexprs=request["constexprs"])
    compiled = triton.compile(source, target=GPUTarget("cuda", request["sm"], 32))
    target = next(line.split()[1] for line in compiled.asm["ptx"].splitlines() if line.startswith(".target"))
    return asdict(CompiledKernel(compiled.metadata.name, target, compiled.asm["ptx"],
                                 compiled.metadata.num_warps, compiled.metadata.shared))


if __name__ == "__main__":
    print(json.dumps(_compile(json.loads(sys.stdin.read()))))
