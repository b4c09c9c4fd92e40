"""lrq's CPU kernel library for onnxruntime: ai.lrq.cpu::MatMulInt4 (csrc/matmul_int4.cc),
4-bit block-quantized weights with exact (fp32) activations, about twice as fast in decode as
onnxruntime's MatMulNBits at the same numerics (benchmarks/RESULTS.md); and
ai.lrq.cpu::QuantizedCacheAttention (csrc/kv_attention.cc), attention that reads an int8 / int4
KV cache as codes, scales and zero points, or an fp8 one as E4M3 codes and a static scale.

The library is C++ built from the package's own source with the machine's C++ compiler on
first use and cached ($LRQ_CACHE/cpu-kernels or ~/.cache/lrq/cpu-kernels, one file per source
and compiler); it needs no onnxruntime headers (csrc/ort_abi.h declares the ABI it calls). It
chooses AVX-512, AVX2 or portable code at run time, so one build serves any x86-64 or other CPU.
Sessions lrq creates register it for every graph that imports the ai.lrq.cpu domain
(`needs_library`, read from the file's first bytes without parsing the weights).

A library is code: nothing is loaded unverified. The cache folder must not be writable by other
users; each build is recorded by its sha256 beside it (`NAME.so.sha256`, as `sha256sum` writes
it); the library's bytes are read once, checked against that record (a truncated, changed or
replaced file is rebuilt, with one line saying so) and loaded from a private copy of exactly
those bytes, so a later change to the cache cannot reach a running process."""

from __future__ import annotations

import atexit
import hashlib
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from functools import lru_cache
from pathlib import Path

from lrq_deploy.atomic import atomic_write
from lrq_deploy.errors import LrqError

DOMAIN = "ai.lrq.cpu"
OP = "MatMulInt4"
SOURCES = ("matmul_int4.cc", "kv_attention.cc", "ort_kernel.h", "ort_abi.h")
COMPILED = ("matmul_int4.cc", "kv_attention.cc")
# The ABI the library requests (csrc/ort_abi.h kApiVersion): onnxruntime 1.17.
MIN_ONNXRUNTIME = (1, 17)
# Built without -march: the code for AVX-512 / AVX2 is chosen per CPU at run time (code_path)
CPU_REQUIREMENT = "any CPU of the build machine's architecture; AVX-512 (+VNNI) or AVX2 code chosen at run time"
FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-fvisibility=hidden", "-Wall", "-Wno-maybe-uninitialized",
         "-Wno-uninitialized", "-Wno-psabi")  # the two: GCC 12's own AVX-512 headers trip them


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
    """A private copy of the built library, verified against its record (built now if this
    source and compiler have none cached, rebuilt if the cached file fails its record)."""
    cxx = preflight()
    folder = cache_dir()
    built = folder / f"libai_lrq_cpu-{_build_key(cxx)}.so"
    code = verified_bytes(built)
    if code is None:
        if built.exists():
            print(f"lrq: {built} does not match its record {built.name}.sha256; rebuilding it", file=sys.stderr)
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        atomic_write(built, lambda tmp: _build(cxx, tmp))
        code = built.read_bytes()
        atomic_write(record_path(built), lambda tmp: tmp.write_text(f"{hashlib.sha256(code).hexdigest()}  {built.name}\n"))
    return _private_copy(code)


def _build_key(cxx: str) -> str:
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout.splitlines()[:1]
    digest = hashlib.sha256()
    for name in SOURCES:
        digest.update((source_dir() / name).read_bytes())
    digest.update(" ".join([cxx, *version, *FLAGS]).encode())
    return digest.hexdigest()[:16]


def record_path(built: Path) -> Path:
    return built.with_name(built.name + ".sha256")


def verified_bytes(built: Path) -> bytes | None:
    """The library's bytes when they match its sha256 record; None when either is missing or they differ."""
    try:
        recorded = record_path(built).read_text().split()[0]
        code = built.read_bytes()
    except (OSError, IndexError):
        return None
    return code if hashlib.sha256(code).hexdigest() == recorded else None


def check_cache_folder(folder: Path) -> None:
    """Refuse a cache whose code other users could change: the folder must belong to this user (or
    root) and not be writable by others, and no folder above it may be writable by everyone unless
    sticky (as /tmp: there others cannot rename or replace what is ours)."""
    for path in (folder, *folder.parents):
        try:
            info = path.stat()
        except FileNotFoundError:
            continue
        own = path == folder
        world_writable = info.st_mode & stat.S_IWOTH and (own or not info.st_mode & stat.S_ISVTX)
        foreign = own and info.st_uid not in (os.geteuid(), 0)
        if world_writable or foreign:
            why = "is writable by every user" if world_writable else f"belongs to another user (uid {info.st_uid})"
            raise LrqError(f"the CPU kernel cache {folder}: {path} {why}, and lrq loads native code from it; "
                           f"chmod o-w it, or point LRQ_CACHE at a folder of your own")


_PRIVATE: list[str] = []


def _private_copy(code: bytes) -> Path:
    """`code` written to a folder only this process uses (removed at exit), named by its digest so
    that other bytes (a rebuild) never reuse an earlier copy."""
    if not _PRIVATE:
        _PRIVATE.append(tempfile.mkdtemp(prefix="lrq-cpu-kernels-"))
        atexit.register(shutil.rmtree, _PRIVATE[0], True)
    path = Path(_PRIVATE[0]) / f"libai_lrq_cpu-{hashlib.sha256(code).hexdigest()[:16]}.so"
    if not path.exists():
        path.write_bytes(code)
        path.chmod(0o500)
    return path


def _build(cxx: str, out: Path) -> None:
    command = [cxx, *FLAGS, "-o", str(out), *(str(source_dir() / name) for name in COMPILED)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        if "No space left on device" in done.stderr:
            raise LrqError(f"no space left on the device of {out.parent} for lrq's CPU kernel library (about 1 MB): "
                           "free some, or point LRQ_CACHE at another disk")
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
    "avx2" (fp32 activations 8-wide; int8 activations by vpmaddubsw), or "portable" (a
    plain loop, slower than onnxruntime's MatMulNBits). Read from /proc/cpuinfo (Linux);
    elsewhere "unknown"."""
    try:
        flags = next((line.split(":", 1)[1].split() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("flags")), [])
    except OSError:
        return "unknown"
    capped = isa_cap()
    if capped != "portable" and capped != "avx2" and "avx512f" in flags:
        return "avx512" + ("+vnni" if "avx512_vnni" in flags else "")
    return "avx2" if capped != "portable" and {"avx2", "fma"} <= set(flags) else "portable"


ISA_CAPS = ("avx512", "avx2", "portable")  # csrc/matmul_int4.cc reads LRQ_CPU_KERNEL_ISA as the same names


def isa_cap() -> str | None:
    """LRQ_CPU_KERNEL_ISA: the best code the library may choose (unset: the best this CPU has)."""
    capped = os.environ.get("LRQ_CPU_KERNEL_ISA") or None
    if capped is not None and capped not in ISA_CAPS:
        raise LrqError(f"LRQ_CPU_KERNEL_ISA must be one of {', '.join(ISA_CAPS)} (or unset), got {capped!r}")
    return capped


def preflight() -> str:
    """What a --cpu-kernels export or session needs, checked before any work: onnxruntime's ABI, the
    ISA setting, a safe cache folder and a C++ compiler (returned: the build key names it)."""
    _check_onnxruntime()
    isa_cap()
    check_cache_folder(cache_dir())
    return compiler()


def register(options) -> None:
    """Add the library's ops to an onnxruntime SessionOptions (saying once per process when this CPU
    runs the library's slow code)."""
    options.register_custom_ops_library(str(library()))
    warn_of_slow_code()


@lru_cache(maxsize=None)
def warn_of_slow_code() -> None:
    """One line on stderr where this CPU runs the portable loop: slower than onnxruntime's own
    MatMulNBits there (on this build machine 1/15 of the AVX2 form's speed)."""
    path = code_path()
    if path == "portable":
        cause = "LRQ_CPU_KERNEL_ISA=portable" if isa_cap() == "portable" else "this CPU has neither AVX-512 nor AVX2"
        print(f"lrq: warning: {cause}, so lrq's CPU kernels run their portable code, slower than onnxruntime's "
              "MatMulNBits; export without --cpu-kernels for this machine", file=sys.stderr)


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
