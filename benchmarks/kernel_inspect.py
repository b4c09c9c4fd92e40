"""What the kernels compile to, read on a machine without a GPU.

For every launch the dispatch table can choose (and the TensorRT AOT plugin kernels), compiled
for sm_80 / sm_89 / sm_90 exactly as the JIT compiles them (aot.compile_kernels), report:
registers, stack and spill instructions, shared memory, occupancy, grid size at the benchmark
shape, the width of the loads that read packed weights (traced through the PTX from the weight
pointer), scale loads, tensor-core instructions in the SASS, and a traffic-model floor time on
an H100. benchmarks/kernel_report.py prints it; tests/plugins/test_kernel_report.py holds the
kernels to it.
"""

from __future__ import annotations

import base64
import os
import re
import subprocess
import tempfile
from dataclasses import asdict, dataclass

from lrq_deploy.errors import LrqError

from lrq_deploy.plugins import aot, dispatch

N_BENCH, K_BENCH, GROUP_BENCH = 28672, 8192, 128
SMS = (80, 89, 90)
FLOAT_SMS = (89, 90, 100, 120)
H100 = {"sms": 132, "bytes_per_s": 3.0e12, "fp16_flops": 790e12, "int8_ops": 1400e12}
REGISTERS_PER_SM, MAX_WARPS_PER_SM, SHARED_PER_SM = 65536, 64, {80: 164 * 1024, 89: 100 * 1024, 90: 228 * 1024,
                                                                100: 228 * 1024, 120: 100 * 1024}

# (route label, dispatch route, rows M at which it is reported, container bits, group, plan options)
CASES = (
    ("gemv W4A16 M=1", "gemv", 1, 4, GROUP_BENCH, {}),
    ("gemv W4A16 M=8", "gemv", 8, 4, GROUP_BENCH, {}),
    ("gemv W2A16 M=1", "gemv", 1, 2, GROUP_BENCH, {}),
    ("gemm W4A16 M=64", "gemm", 64, 4, GROUP_BENCH, {}),
    ("gemm W2A16 M=64", "gemm", 64, 2, GROUP_BENCH, {}),
    ("dequantize W4 (prefill M=4096)", "dequantize", 4096, 4, GROUP_BENCH, {}),
    ("int_gemm W4A4 M=1024", "int_gemm", 1024, 4, K_BENCH, {"abits": 4}),
    ("int_gemm W4A4-g128 M=1024", "int_gemm", 1024, 4, GROUP_BENCH, {"abits": 4}),
    ("int_gemm W8A8 M=1024", "int_gemm", 1024, 8, K_BENCH, {"abits": 8}),
    ("plugin int_gemm W4A4 fused M=1024", "int_gemm", 1024, 4, K_BENCH, {"abits": 4, "quantize_x": True}),
    ("int_gemm W4A4-asym M=1024", "int_gemm", 1024, 4, K_BENCH, {"abits": 4, "act_asym": True}),
    ("plugin int_gemm W4A4-asym fused M=1024", "int_gemm", 1024, 4, K_BENCH,
     {"abits": 4, "quantize_x": True, "act_asym": True}),
)
MATRIX_ROUTES = ("gemm", "int_gemm", "fp8_linear", "fp4_linear")
# Float-grid kernels (plugins/float_kernels.py), on the GPUs that have their tensor cores:
# (route label, kernel, SMs, activation rows M, weight bits, scale block, scale pointer type)
FLOAT_CASES = (
    ("fp8 W8A8 M=1024", "fp8_linear", (89, 90), 1024, 8, 0, None),
    ("nvfp4 W4A4 M=1024", "fp4_linear", (100, 120), 1024, 4, 16, "fp8e4nv"),
    ("mxfp4 W4A4 M=1024", "fp4_linear", (100, 120), 1024, 4, 32, "u8"),
)
FLOAT_PEAK = {8: 1979e12}  # H100 dense FP8; FP4 rows (no FP4 on H100) keep the traffic floor only
# 128-bit loads on every route but the 2-bit tl.dot GEMM, whose [32, 8-word] tile gives each
# thread two words (64 bits); a wider tile spills there (measured, benchmarks/RESULTS.md).
MIN_WEIGHT_LOAD_BITS = 64


@dataclass
class KernelRow:
    route: str
    kernel: str
    sm: int
    regs: int
    stack_bytes: int
    spill_bytes: int  # stack + local-memory bytes per thread (register spills)
    spill_instructions: int
    shared_bytes: int
    occupancy: float  # resident warps / 64 per SM, from registers and shared memory
    weight_load_bits: int  # widest load reading packed weights
    weight_loads: list
    scale_loads: int  # static count of load instructions reading scales
    tensor_core: list
    grid_programs: int  # at N = 28672, K = 8192
    tiles: dict
    num_warps: int
    floor_us: float


def _bin(tool: str) -> str:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", tool)
    if not os.path.exists(path):
        raise LrqError(f"{tool} is missing from the Triton installation ({path})")
    return path


def _cuobjdump(cubin: bytes, flag: str) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([_bin("cuobjdump"), flag, f.name], capture_output=True, text=True, check=True).stdout


def resource_usage(cubin: bytes) -> dict:
    """REG, STACK, SHARED, LOCAL of the kernel, from cuobjdump -res-usage."""
    text = _cuobjdump(cubin, "-res-usage")
    return {key: int(value) for key, value in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", text)}


def sass_facts(cubin: bytes) -> dict:
    sass = _cuobjdump(cubin, "-sass")
    mma = sorted(set(re.findall(r"\b((?:[HIQ]GMMA|[HIQO]MMA|UTC[A-Z]*MMA)[.\w]*)", sass)))
    spills = len(re.findall(r"\b(?:LDL|STL)\b", sass))
    return {"tensor_core": mma, "spill_instructions": spills}


_TYPE_BITS = {"8": 8, "16": 16, "32": 32, "64": 64}


def _load_bits(instruction: str) -> int:
    if instruction.startswith("cp.async"):
        size = re.search(r",\s*(0x[0-9a-fA-F]+|\d+)\s*(?:,|;)", instruction.split("]", 2)[-1])
        return 8 * int(size.group(1), 0) if size else 0
    vec = re.search(r"\.v(\d)\.", instruction)
    width = re.search(r"\.[bsuf](8|16|32|64)\b", instruction)
    return (int(vec.group(1)) if vec else 1) * _TYPE_BITS[width.group(1)] if width else 0


def ptx_loads_by_pointer(ptx: str, kernel_name: str, param_names: list[str]) -> dict[str, list[int]]:
    """Widths (bits) of the global loads (ld.global, cp.async) of each pointer parameter, found by
    following each load's address register back through the PTX to the ld.param it comes from."""
    defs: dict[str, set] = {}
    params: dict[str, str] = {}
    loads: list[tuple[str, str]] = []
    for raw in ptx.splitlines():
        line = raw.strip().split("//")[0].strip().rstrip(";")
        line = re.sub(r"^@!?%p\d+\s+", "", line)
        if not line or line.startswith((".", "}", "{")):
            continue
        param = re.match(r"ld\.param\.\w+\s+(%\w+),\s*\[(\w+)\]", line)
        if param:
            params[param.group(1)] = param.group(2)
            continue
        if line.startswith(("ld.global", "cp.async")) and "[" in line:
            address = re.findall(r"\[\s*(%\w+)", line)
            if address:
                loads.append((line, address[-1] if line.startswith("cp.async") else address[0]))
            continue
        match = re.match(r"([a-z][\w.:]*)\s+(%\w+)\s*,(.*)", line)
        if match:
            defs.setdefault(match.group(2), set()).update(re.findall(r"%\w+", match.group(3)))
    index = {f"{kernel_name}_param_{i}": name for i, name in enumerate(param_names)}
    result: dict[str, list[int]] = {}
    for instruction, register in loads:
        for source in _param_sources(register, defs, params):
            name = index.get(source)
            if name and name.endswith("_ptr"):
                result.setdefault(name, []).append(_load_bits(instruction))
    return result


def _param_sources(register: str, defs: dict, params: dict) -> set:
    seen, stack, found = set(), [register], set()
    while stack:
        reg = stack.pop()
        if reg in seen:
            continue
        seen.add(reg)
        if reg in params:
            found.add(params[reg])
        stack.extend(defs.get(reg, ()))
    return found


def occupancy(regs: int, num_warps: int, shared: int, sm: int) -> float:
    per_warp = -(-max(regs, 1) * 32 // 256) * 256  # registers are allocated per warp, 256 at a time
    by_regs = REGISTERS_PER_SM // (per_warp * num_warps)
    by_shared = SHARED_PER_SM.get(sm, SHARED_PER_SM[80]) // shared if shared else 32
    blocks = max(0, min(by_regs, by_shared, MAX_WARPS_PER_SM // num_warps, 32))
    return blocks * num_warps / MAX_WARPS_PER_SM


def floor_us(route: str, m: int, n: int, k: int, bits: int, group: int) -> float:
    """H100 traffic model: bytes / 3.0 TB/s or operations / peak, whichever is larger."""
    groups = k // group
    weights = n * k * bits / 8 + n * groups * 3
    activations = m * k * 2 + m * n * 2
    if route == "dequantize":  # one pass writing float16 weights, then cuBLAS reads them
        dequant = (weights + n * k * 2) / H100["bytes_per_s"]
        gemm = max((n * k * 2 + activations) / H100["bytes_per_s"], 2 * m * n * k / H100["fp16_flops"])
        return 1e6 * (dequant + gemm)
    peak = H100["int8_ops"] if route == "int_gemm" else H100["fp16_flops"]
    return 1e6 * max((weights + activations) / H100["bytes_per_s"], 2 * m * n * k / peak)


def _case_launches(sm: int) -> list[tuple[str, int, int, int, dispatch.Launch, tuple]]:
    family = dispatch.gpu_family(sm)
    out = []
    for label, route, m, bits, group, options in CASES:
        launch = dispatch.plan(route, m, N_BENCH, K_BENCH, group, bits, family=family, **options)
        absent = ("b_ptr", "acc_ptr") + (("xs_ptr",) if options.get("quantize_x") else ())
        out.append((label, m, bits, group, launch, absent))
    return out


def _float_requests(sms: tuple) -> list[tuple]:
    """(label, m, bits, block, launch-like record, sm, signature, request) of every float case on the
    requested SMs among those it targets."""
    from lrq_deploy.plugins import float_kernels

    out = []
    for label, kernel, targets, m, bits, block, scale_type in FLOAT_CASES:
        tiles = dict(float_kernels.FP8_TILES if kernel == "fp8_linear" else float_kernels.FP4_TILES)
        warps, stages = tiles.pop("num_warps"), tiles.pop("num_stages")
        if kernel == "fp8_linear":
            signature = {"x_ptr": "*fp8e4nv", "w_ptr": "*fp8e4nv", "ws_ptr": "*fp32", "b_ptr": "constexpr",
                         "y_ptr": "*fp16", "x_scale": "fp32"}
            constexprs = {"b_ptr": None, **tiles}
        else:
            signature = {"x_ptr": "*u8", "xs_ptr": f"*{scale_type}", "w_ptr": "*u8", "ws_ptr": f"*{scale_type}",
                         "b_ptr": "constexpr", "y_ptr": "*fp16", "alpha": "fp32"}
            constexprs = {"b_ptr": None, "SCALE_BLOCK": block, **tiles}
        signature.update({"M": "i32", "N": "i32", "K": "i32", **{name: "constexpr" for name in constexprs if name != "b_ptr"}})
        hints = [name for name in signature if name.endswith("_ptr") and name != "b_ptr"] + ["N", "K"]  # as the JIT specializes them
        grid = -(-m // tiles["BLOCK_M"]) * -(-N_BENCH // tiles["BLOCK_N"])
        for sm in (s for s in targets if s in sms):
            request = aot.compile_request(kernel, signature, constexprs, hints, sm, warps, stages)
            out.append((label, kernel, m, bits, block, grid, tiles, sm, signature, request))
    return out


def float_report(sms: tuple = FLOAT_SMS) -> list[KernelRow]:
    """One row per (float case, SM it targets)."""
    planned = _float_requests(sms)
    compiled = aot.compile_kernels([p[-1] for p in planned])
    rows = []
    for (label, kernel_name, m, bits, block, grid, tiles, sm, signature, _), kernel in zip(planned, compiled):
        cubin = base64.b64decode(kernel.cubin)
        usage, facts = resource_usage(cubin), sass_facts(cubin)
        params = [name for name, kind in signature.items() if kind != "constexpr"]
        loads = ptx_loads_by_pointer(kernel.ptx, kernel.name, params)
        weight = loads.get("w_ptr", [])
        weights = N_BENCH * K_BENCH * bits / 8 + (N_BENCH * K_BENCH // block if block else N_BENCH * 4)
        seconds = (weights + m * K_BENCH * bits / 8 + m * N_BENCH * 2) / H100["bytes_per_s"]
        if bits in FLOAT_PEAK:
            seconds = max(seconds, 2 * m * N_BENCH * K_BENCH / FLOAT_PEAK[bits])
        rows.append(KernelRow(
            route=label, kernel=kernel_name, sm=sm, regs=usage.get("REG", 0), stack_bytes=usage.get("STACK", 0),
            spill_bytes=usage.get("LOCAL", 0) + usage.get("STACK", 0), spill_instructions=facts["spill_instructions"],
            shared_bytes=kernel.shared_bytes, occupancy=occupancy(usage.get("REG", 0), kernel.num_warps, kernel.shared_bytes, sm),
            weight_load_bits=max(weight, default=0), weight_loads=sorted(set(weight)),
            scale_loads=len(loads.get("ws_ptr", [])), tensor_core=facts["tensor_core"], grid_programs=grid, tiles=tiles,
            num_warps=kernel.num_warps, floor_us=round(1e6 * seconds, 2)))
    return rows


def kernel_report(sms: tuple = SMS, dtype: str = "float16") -> list[KernelRow]:
    """One row per (case, sm)."""
    planned, requests = [], []
    for sm in sms:
        for label, m, bits, group, launch, absent in _case_launches(sm):
            values = {"M": m, "N": N_BENCH, "K": K_BENCH, "G": K_BENCH // group, "stride_w": K_BENCH * bits // 32}
            signature, constexprs, hints = aot.kernel_signature(launch, dtype, values, absent)
            requests.append(aot.compile_request(launch.kernel, signature, constexprs, hints, sm, launch.num_warps, launch.num_stages))
            planned.append((label, m, bits, group, launch, sm, signature))
    compiled = aot.compile_kernels(requests)
    return [_row(*plan, kernel) for plan, kernel in zip(planned, compiled)]


def _row(label, m, bits, group, launch, sm, signature, kernel) -> KernelRow:
    cubin = base64.b64decode(kernel.cubin)
    usage, facts = resource_usage(cubin), sass_facts(cubin)
    params = [name for name, kind in signature.items() if kind != "constexpr"]
    loads = ptx_loads_by_pointer(kernel.ptx, kernel.name, params)
    weight = loads.get("w_ptr", [])
    grid = launch.grid[0] * launch.grid[1] * launch.grid[2]
    return KernelRow(
        route=label, kernel=launch.kernel, sm=sm, regs=usage.get("REG", 0), stack_bytes=usage.get("STACK", 0),
        spill_bytes=usage.get("LOCAL", 0) + usage.get("STACK", 0), spill_instructions=facts["spill_instructions"],
        shared_bytes=kernel.shared_bytes, occupancy=occupancy(usage.get("REG", 0), kernel.num_warps, kernel.shared_bytes, sm),
        weight_load_bits=max(weight, default=0), weight_loads=sorted(set(weight)), scale_loads=len(loads.get("s_ptr", [])),
        tensor_core=facts["tensor_core"], grid_programs=grid, tiles=launch.tiles, num_warps=kernel.num_warps,
        floor_us=round(floor_us(launch.route, m, N_BENCH, K_BENCH, bits, group), 2),
    )


def problems(row: KernelRow, sms_on_gpu: int = H100["sms"]) -> list[str]:
    """What makes a row slow by construction (empty when none)."""
    found = []
    if row.spill_bytes or row.spill_instructions:
        found.append(f"spills ({row.spill_bytes} B stack/local, {row.spill_instructions} LDL/STL)")
    if row.weight_load_bits < MIN_WEIGHT_LOAD_BITS:
        found.append(f"packed weights read {row.weight_load_bits} bits at a time")
    if row.kernel in MATRIX_ROUTES and not row.tensor_core:
        found.append("no tensor-core instruction")
    if row.grid_programs < 4 * sms_on_gpu:
        found.append(f"{row.grid_programs} programs < 4 per SM")
    return found


def as_dicts(rows: list[KernelRow]) -> list[dict]:
    return [asdict(r) for r in rows]
