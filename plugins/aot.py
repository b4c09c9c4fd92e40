"""Ahead-of-time kernels: signatures, shape/type rules, launch parameters and compiled code.

The `lrq`-domain nodes that `lrq export --target trt` writes (W4A16Linear, W2A16Linear,
W4A4Linear, ...) each run one Triton kernel. What TensorRT's plugin API asks for is computed
here in plain Python, so it is tested without TensorRT or a GPU:

- `plugin_kernel`: the node's kernel, from its QuantScheme and dispatch.py's table (weight-only:
  the `gemm` route; activation-quantized: `int_gemm` with the per-token quantizer fused);
- `output_shape` / `output_dtype`: the plugin's shape and type rules;
- `launch_params`: grid, threads per block and shared memory for given M, N;
- `compile_kernels`: Triton compiles kernels for a target GPU (sm_80, sm_90, sm_100, ...) on any
  machine, GPU or not, with the alignment hints its JIT adds (`tt.divisibility` 16 on pointers
  and on integers divisible by 16) and the config's num_warps / num_stages, so the PTX handed
  to TensorRT and the code the kernel report reads are what the JIT runs. Triton's interpreter
  (used on CPU) cannot compile, so when it is active compilation runs in a child process.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass

from lrq_deploy.errors import LrqError
from lrq_deploy.quant.scheme import KernelFamily, layer_attributes

from . import dispatch

_DTYPES = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}
# Pointer element types per kernel argument; "act" is the activations' type.
_POINTERS = {
    "x_ptr": "act", "w_ptr": "i32", "s_ptr": "fp16", "z_ptr": "u8", "b_ptr": "act", "y_ptr": "act",
    "out_ptr": "act", "xs_ptr": "fp32", "xz_ptr": "i32", "acc_ptr": "i32", "q_ptr": "i8",
}
# Scalars of the kernels, in their order, as TensorRT's AOT launch passes them after the pointers.
SCALARS = ("M", "N", "K", "G", "stride_w")


@dataclass(frozen=True)
class PluginKernel:
    op_type: str
    launch: dispatch.Launch
    signature: dict
    constexprs: dict
    hints: tuple  # arguments known to be multiples of 16 (pointers: 16-byte aligned)

    @property
    def kernel(self) -> str:
        return self.launch.kernel

    @property
    def num_warps(self) -> int:
        return self.launch.num_warps

    @property
    def num_stages(self) -> int:
        return self.launch.num_stages


def _arg_names(kernel: str) -> list[str]:
    from . import kernels

    fn = getattr(kernels, kernel)
    return list(getattr(fn, "arg_names", None) or fn.fn.arg_names)


def kernel_signature(launch: dispatch.Launch, dtype: str, values: dict, absent: tuple = ()) -> tuple[dict, dict, tuple]:
    """(signature, constexprs, hints) to compile `launch` for activations of `dtype`. `values`
    gives the integer arguments that are known (divisible-by-16 ones get the JIT's hint);
    `absent` names pointer arguments the caller does not pass (they become None constants)."""
    if dtype not in _DTYPES:
        raise LrqError(f"plugin activations must be one of {', '.join(_DTYPES)}, got {dtype}")
    act = _DTYPES[dtype]
    types = dict(_POINTERS)
    if launch.kernel == "gemv" and not launch.constexprs["DIRECT"]:
        types["y_ptr"] = "fp32"
    if launch.kernel == "int_gemm" and not launch.constexprs["QUANTIZE_X"]:
        types["x_ptr"] = "i8"
    signature, constexprs, hints = {}, dict(launch.constexprs), []
    for name in _arg_names(launch.kernel):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in absent:
            signature[name], constexprs[name] = "constexpr", None
        elif name.endswith("_ptr"):
            signature[name] = "*" + (act if types[name] == "act" else types[name])
            hints.append(name)
        else:
            signature[name] = "i32"
            if values.get(name) and values[name] % 16 == 0:
                hints.append(name)
    return signature, constexprs, tuple(hints)


def plugin_kernel(op_type: str, attrs: dict, dtype: str = "float16", sm: int = 90, has_bias: bool = False) -> PluginKernel:
    """The kernel, argument types, compile-time constants and hints of one lrq plugin node
    (`attrs`: its scheme and layer attributes; has_bias: the node has a bias input)."""
    scheme, k, n = layer_attributes(attrs, op_type)
    kernel = scheme.kernel
    if kernel is None:
        raise LrqError(f"no plugin kernel for {op_type} ({scheme.name})")
    bits = scheme.container_bits
    group = scheme.group_length(k)
    if k % (8 // bits):
        raise LrqError(f"{op_type}: in_features {k} does not fit the packing")
    family = dispatch.gpu_family(sm)
    if kernel is KernelFamily.WEIGHT_ONLY:
        launch = dispatch.plan("gemm", 64, n, k, group, bits, family=family, has_bias=has_bias)
        absent = ()
    else:
        launch = dispatch.plan("int_gemm", 64, n, k, group, bits, family=family, has_bias=has_bias,
                               abits=scheme.abits, quantize_x=True, act_asym=scheme.act_asym)
        absent = ("xs_ptr", "xz_ptr", "acc_ptr")
    # A None pointer is a compile-time constant: the kernel then takes exactly what an
    # ahead-of-time TensorRT plugin passes: input pointers, the output pointer, then scalars.
    absent += () if has_bias else ("b_ptr",)
    stride = k * bits // 32 if (k * bits) % 32 == 0 else None
    values = {"N": n, "K": k, "stride_w": stride if stride and (k * bits // 8) % 16 == 0 else None}
    signature, constexprs, hints = kernel_signature(launch, dtype, values, absent)
    return PluginKernel(op_type, launch, signature, constexprs, hints)


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
    cubin: str = ""  # base64


def compile_request(kernel: str, signature: dict, constexprs: dict, hints: tuple, sm: int,
                    num_warps: int, num_stages: int) -> dict:
    return {"kernel": kernel, "signature": signature, "constexprs": constexprs, "hints": list(hints), "sm": sm,
            "num_warps": num_warps, "num_stages": num_stages}


def compile_ptx(kernel: PluginKernel, sm: int) -> CompiledKernel:
    """PTX of a plugin kernel for compute capability `sm` (80, 86, 89, 90, 100, 120, ...)."""
    request = compile_request(kernel.kernel, kernel.signature, kernel.constexprs, kernel.hints, sm,
                              kernel.num_warps, kernel.num_stages)
    return compile_kernels([request])[0]


def compile_kernels(requests: list[dict]) -> list[CompiledKernel]:
    """Compile every request (see compile_request); one child process when the interpreter is on."""
    from ._triton import interpreted, load_triton

    load_triton()  # decides on the interpreter (no CUDA device) before we look
    if not interpreted():
        return [CompiledKernel(**_compile(r)) for r in requests]
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    proc = subprocess.run([sys.executable, "-m", "lrq_deploy.plugins.aot"], input=json.dumps(requests),
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise LrqError(f"Triton could not compile the kernels: {last}")
    return [CompiledKernel(**r) for r in json.loads(proc.stdout)]


def _compile(request: dict) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from . import float_kernels, kernels

    fn = getattr(kernels, request["kernel"], None) or getattr(float_kernels, request["kernel"])
    names = fn.arg_names
    attrs = {(names.index(h),): [["tt.divisibility", 16]] for h in request["hints"]}
    source = ASTSource(fn=fn, signature=request["signature"], constexprs=request["constexprs"], attrs=attrs)
    options = {"num_warps": request["num_warps"], "num_stages": request["num_stages"]}
    compiled = triton.compile(source, target=GPUTarget("cuda", request["sm"], 32), options=options)
    target = next(line.split()[1] for line in compiled.asm["ptx"].splitlines() if line.startswith(".target"))
    return asdict(CompiledKernel(compiled.metadata.name, target, compiled.asm["ptx"], compiled.metadata.num_warps,
                                 compiled.metadata.shared, base64.b64encode(compiled.asm["cubin"]).decode()))


if __name__ == "__main__":
    print(json.dumps([_compile(r) for r in json.loads(sys.stdin.read())]))
