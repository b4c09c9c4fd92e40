"""Which kernel runs a low-bit linear layer, with which tiles: one table for every caller.

Routes (facts behind each: docs/KERNELS.md):
- `gemv`, weight-only, M <= 8 rows (decoding): bandwidth-bound; 128-bit weight loads, split over
  K until the grid has PROGRAMS_PER_SM programs per SM, partial sums added in a fixed order.
- `gemm`, weight-only, 8 < M <= PREFILL_MIN_ROWS: tl.dot with (q - z) exact in the activation type.
- `dequantize`, weight-only, M > PREFILL_MIN_ROWS (prefill): the weights dequantized once into
  the activation type, then cuBLAS (`torch.nn.functional.linear`), as vLLM does at >= 256 tokens;
  the dequantization costs one pass over the weights, the GEMM is cuBLAS's.
- `int_gemm`, activation-quantized schemes, any M: per-token int8 codes (`quantize_rows`), then
  tl.dot int8 x int8 -> int32 with INT4 codes unpacked in registers (IMMA / IGMMA), exact.

Tiles come from kernel_configs.json per GPU family (compute capability), shipped as data. The
same `Launch` objects are compiled by the TensorRT AOT plugins (aot.py) and by the CPU kernel
report (benchmarks/kernel_report.py), so what is checked is what runs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from lrq_deploy.errors import LrqError
from lrq_deploy.quant.primitives import act_qmax
from lrq_deploy.quant.scheme import KernelFamily

GEMV_MAX_ROWS = 8
PREFILL_MIN_ROWS = 256
PROGRAMS_PER_SM = 4
H100_SMS = 132
FAMILIES = ("80", "86", "89", "90", "120")
ROUTES = ("gemv", "gemm", "dequantize", "int_gemm")


@dataclass(frozen=True)
class Launch:
    route: str
    kernel: str  # function name in kernels.py
    grid: tuple
    constexprs: dict
    num_warps: int
    num_stages: int
    split_k: int = 1

    @property
    def tiles(self) -> dict:
        """The BLOCK_* sizes, for reports."""
        return {name: value for name, value in self.constexprs.items() if name.startswith("BLOCK_")}


@lru_cache(maxsize=None)
def _configs() -> dict:
    return json.loads((Path(__file__).with_name("kernel_configs.json")).read_text())


def gpu_family(sm: int | None = None) -> str:
    """The config family for compute capability `sm` (e.g. 90); the local device when None;
    'interpreter' when Triton runs on the CPU."""
    from ._triton import interpreted

    if sm is None:
        if interpreted():
            return "interpreter"
        import torch

        major, minor = torch.cuda.get_device_capability()
        sm = 10 * major + minor
    known = [int(f) for f in FAMILIES if int(f) <= sm]
    return str(max(known)) if known else FAMILIES[0]


def sm_count(family: str) -> int:
    if family == "interpreter":
        return 1
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_properties(0).multi_processor_count
    except Exception:  # noqa: BLE001 - no device: size grids for an H100
        pass
    return H100_SMS


def route_for(kernel: KernelFamily, rows: int) -> str:
    if kernel is KernelFamily.INTEGER:
        return "int_gemm"
    if rows <= GEMV_MAX_ROWS:
        return "gemv"
    return "gemm" if rows <= PREFILL_MIN_ROWS else "dequantize"


def config(route: str, family: str) -> dict:
    return dict(_configs()[route][family])


def _pow2_divisor(n: int) -> int:
    return n & -n


def chunk_k(cap: int, group: int, k: int, bits: int) -> int:
    """Inputs per K-chunk: at most `cap` (given for 4-bit codes, scaled to the code width), a
    power of two, whole int32 words, and inside one weight group."""
    per_word = 32 // bits
    if group != k and group % per_word:
        raise LrqError(f"the kernels need weight groups of whole {per_word}-code words, got group size {group}")
    chunk = cap * 4 // bits
    if group != k:
        chunk = min(chunk, _pow2_divisor(group))
    return max(chunk, per_word)


def plan(route: str, m: int, n: int, k: int, group: int, bits: int, *, family: str | None = None,
         has_bias: bool = False, abits: int = 16, quantize_x: bool = False, store_int: bool = False,
         act_asym: bool = False) -> Launch:
    """The launch of `route` for an [m, k] x [n, k]^T product with `bits`-bit weight containers."""
    family = family or gpu_family()
    cfg = config(route, family)
    warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
    grouped = group != k
    common = {"BITS": bits, "GROUP": group}
    if route == "gemv":
        block_k = chunk_k(cfg["BLOCK_K"], group, k, bits)
        block_n = max(1, cfg["TILE_WORDS"] * (32 // bits) // block_k)
        chunks, grid_n = -(-k // block_k), -(-n // block_n)
        wanted = -(-PROGRAMS_PER_SM * sm_count(family) // grid_n)
        k_iters = -(-chunks // max(1, min(chunks, wanted)))
        split = -(-chunks // k_iters)
        rows = 1 << max(0, (m - 1).bit_length())
        constexprs = {**common, "GROUPED": grouped, "ROWS": rows, "K_ITERS": k_iters, "DIRECT": split == 1,
                      "HAS_BIAS": has_bias and split == 1, "BLOCK_N": block_n, "BLOCK_K": block_k}
        return Launch(route, "gemv", (grid_n, split, 1), constexprs, warps, stages, split)
    if route == "dequantize":
        block_k, block_n = chunk_k(cfg["BLOCK_K"], group, k, bits), cfg["BLOCK_N"]
        constexprs = {**common, "BLOCK_N": block_n, "BLOCK_K": block_k}
        return Launch(route, "dequantize", (-(-n // block_n), -(-k // block_k), 1), constexprs, warps, stages)
    block_k = chunk_k(cfg["BLOCK_K"], group, k, bits)
    if block_k < 16:
        raise LrqError(f"tensor-core kernels need weight groups of at least 16 inputs, got {group}")
    tiles = {"BLOCK_M": cfg["BLOCK_M"], "BLOCK_N": cfg["BLOCK_N"], "BLOCK_K": block_k}
    grid = (-(-m // tiles["BLOCK_M"]), -(-n // tiles["BLOCK_N"]), 1)
    if route == "gemm":
        constexprs = {**common, "HAS_BIAS": has_bias, "DOT_F32": family == "interpreter", **tiles}
        return Launch(route, "gemm", grid, constexprs, warps, stages)
    if route == "int_gemm":
        if bits not in (4, 8):
            raise LrqError(f"integer kernels take 4- or 8-bit weight containers, got {bits}")
        constexprs = {**common, "GROUPED": grouped, "QMAX": act_qmax(abits), "ACT_ASYM": act_asym, "QUANTIZE_X": quantize_x,
                      "HAS_BIAS": has_bias, "STORE_INT": store_int, **tiles}
        return Launch(route, "int_gemm", grid, constexprs, warps, stages)
    raise LrqError(f"unknown kernel route {route!r} (routes: {', '.join(ROUTES)})")
