"""lrq's CPU kernel library for onnxruntime (csrc/matmul_int4.cc): the op ai.lrq.cpu::MatMulInt4,
4-bit block-quantized weights with exact (fp32) activations, about twice as fast in decode as
onnxruntime's MatMulNBits at the same numerics (benchmarks/RESULTS.md).

The library is C++ built from the package's own source with the machine's C++ compiler on
first use and cached ($LRQ_CACHE/cpu-kernels or ~/.cache/lrq/cpu-kernels, one file per source
and compiler); it needs no onnxruntime headers (csrc/ort_abi.h declares the ABI it calls). It
chooses AVX-512, AVX2 or portable code at run time, so one build serves any x86-64 or other CPU.
Sessions lrq creates register it for every graph that imports the ai.lrq.cpu domain
(`needs_library`, read from the file's first bytes without parsing the weights)."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from functools import lru_cache
from pathlib import Path

from lrq_deploy.atomic import atomic_write
from lrq_deploy.errors import LrqError

DOMAIN = "ai.lrq.cpu"
OP = "MatMulInt4"
SOURCES = ("matmul_int4.cc", "ort_abi.h")
# The ABI the library requests (csrc/ort_abi.h kApiVersion): onnxruntime 1.17.
MIN_ONNXRUNTIME = (1, 17)
FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-fvisibility=hidden", "-Wall", "-Wno-maybe-uninitialized",
         "-Wno-uninitialized")  # the two: GCC 12's own AVX-512 headers trip them


def source_dir() -> Path:
    return Path(__file__).with_name("csrc")


def cache_dir() -> Path:
    return Path(os.environ.get("LRQ_CACHE") or Path.home() / ".cache" / "lrq") / "cpu-kernels"


def compiler() -> str:
    chosen = os.environ.get("CXX") or next((c for c in ("g++", "c++", "clang++") if shutil.which(c)), None)
    if chosen is None or shutil.which(chosen) is None:
        raise LrqError("lrq's CPU kernels are built on first use and need a C++ compiler: install one "
                       "(apt install g++), or export without --cpu-kernels")
    return chosen


@lru_cache(maxsize=None)
def library() -> Path:
    """The built library (built now if this source and compiler have none cached)."""
    _check_onnxruntime()
    cxx = compiler()
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout.splitlines()[:1]
    digest = hashlib.sha256()
    for name in SOURCES:
        digest.update((source_dir() / name).read_bytes())
    digest.update(" ".join([cxx, *version, *FLAGS]).encode())
    path = cache_dir() / f"libai_lrq_cpu-{digest.hexdigest()[:16]}.so"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: _build(cxx, tmp))
    return path


def _build(cxx: str, out: Path) -> None:
    command = [cxx, *FLAGS, "-o", str(out), str(source_dir() / "matmul_int4.cc")]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        first_error = next((line for line in done.stderr.splitlines() if "error" in line), done.stderr.strip()[:200])
        raise LrqError(f"building lrq's CPU kernels failed ({cxx}): {first_error}")


def _check_onnxruntime() -> None:
    import onnxruntime as ort

    found = tuple(int(part) for part in ort.__version__.split(".")[:2] if part.isdigit())
    if found < MIN_ONNXRUNTIME:
        raise LrqError(f"lrq's CPU kernels need onnxruntime >= {'.'.join(map(str, MIN_ONNXRUNTIME))}, "
                       f"found {ort.__version__} (pip install -U onnxruntime)")


def code_path() -> str:
    """Which code of the library this CPU runs: "avx512" (with "+vnni" for int8 activations),
    "avx2" (fp32 activations 8-wide; int8 activations in the portable loop), or "portable" (a
    plain loop, slower than onnxruntime's MatMulNBits). Read from /proc/cpuinfo (Linux);
    elsewhere "unknown"."""
    try:
        flags = next((line.split(":", 1)[1].split() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("flags")), [])
    except OSError:
        return "unknown"
    capped = os.environ.get("LRQ_CPU_KERNEL_ISA")
    if capped != "portable" and capped != "avx2" and "avx512f" in flags:
        return "avx512" + ("+vnni" if "avx512_vnni" in flags else "")
    return "avx2" if capped != "portable" and {"avx2", "fma"} <= set(flags) else "portable"


def register(options) -> None:
    """Add the library's ops to an onnxruntime SessionOptions."""
    options.register_custom_ops_library(str(library()))


def needs_library(path: Path) -> bool:
    """Whether the ONNX file at `path` imports the ai.lrq.cpu domain."""
    return DOMAIN in opset_domains(Path(path))


def opset_domains(path: Path) -> set[str]:
    """The domains a ModelProto file imports, read from its top-level fields: every field but
    opset_import (field 8) is skipped by its length, so the graph and its weights are not read."""
    domains = set()
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            while f.tell() < size:
                field, wire = divmod(_varint(f), 8)
                if wire == 0:
                    _varint(f)
                    continue
                if wire != 2:
                    return domains  # not a ModelProto's layout: let onnxruntime name what is wrong
                length = _varint(f)
                if field == 8:
                    domains.add(_opset_domain(f.read(length)))
                else:
                    f.seek(length, os.SEEK_CUR)
    except (OSError, ValueError):
        pass  # unreadable or truncated: onnxruntime's own load reports it
    return domains


def _varint(f) -> int:
    shift = result = 0
    while True:
        byte = f.read(1)
        if not byte:
            raise ValueError("truncated varint")
        result |= (byte[0] & 0x7F) << shift
        if byte[0] < 0x80:
            return result
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def _opset_domain(entry: bytes) -> str:
    """OperatorSetIdProto's domain (field 1), "" when absent."""
    import io

    f = io.BytesIO(entry)
    while f.tell() < len(entry):
        field, wire = divmod(_varint(f), 8)
        if wire == 0:
            _varint(f)
        elif wire == 2:
            value = f.read(_varint(f))
            if field == 1:
                return value.decode("utf-8", "replace")
        else:
            break
    return ""
