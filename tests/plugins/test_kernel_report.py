"""The kernels are fast by construction, checked on the CPU: every launch the dispatch table can
choose, compiled for sm_80 / sm_89 / sm_90 with the JIT's hints (and the float-grid kernels for
sm_89 / sm_90 / sm_100 / sm_120), has no spills, reads packed weights with wide loads, runs matrix
routes on tensor cores (FP8 and block-scaled FP4 ones for the float grids) and fills an H100 with programs."""

import json
import subprocess
import sys

import pytest

from script_loader import ROOT, load_module

report = load_module("benchmarks/kernel_inspect.py")  # development tooling, not part of the package


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "rows.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kernel_report.py"), "--json", str(out)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return json.loads(out.read_text())


def test_report_covers_every_route_and_target(rows):
    assert {r["sm"] for r in rows} == set(report.SMS) | set(report.FLOAT_SMS)
    assert {r["kernel"] for r in rows} == {"gemv", "gemm", "dequantize", "int_gemm", "fp8_linear", "fp4_linear"}
    assert {(r["route"].split()[0], r["sm"]) for r in rows if r["kernel"] in ("fp8_linear", "fp4_linear")} == {
        ("fp8", 89), ("fp8", 90), ("nvfp4", 100), ("nvfp4", 120), ("mxfp4", 100), ("mxfp4", 120)}
    keys = {"route", "sm", "regs", "spill_bytes", "weight_load_bits", "tensor_core", "grid_programs", "floor_us"}
    assert all(keys <= set(r) for r in rows)


def test_no_spills(rows):
    assert [(r["route"], r["sm"]) for r in rows if r["spill_bytes"] or r["spill_instructions"]] == []


def test_packed_weights_are_read_wide(rows):
    assert all(r["weight_load_bits"] >= report.MIN_WEIGHT_LOAD_BITS for r in rows), [(r["route"], r["weight_loads"]) for r in rows]
    # 128-bit loads but the 2-bit GEMM (see MIN_WEIGHT_LOAD_BITS) and the FP4 GEMM, whose [128, 32-byte]
    # tile of packed E2M1 codes gives each thread 8 bytes
    assert all(r["weight_load_bits"] == 128 for r in rows if "W2A16" not in r["route"] and r["kernel"] != "fp4_linear")


def test_matrix_kernels_use_tensor_cores(rows):
    float_instructions = {  # FP8 tensor cores (Ada, Hopper), block-scaled FP4 ones (Blackwell: tcgen05, sm_120 mma)
        ("fp8_linear", 89): ("QMMA", "E4M3"), ("fp8_linear", 90): ("QGMMA", "E4M3"),
        ("fp4_linear", 100): ("UTCOMMA", ""), ("fp4_linear", 120): ("OMMA.SF", "E2M1")}
    for r in rows:
        if (r["kernel"], r["sm"]) in float_instructions:
            prefix, operand = float_instructions[r["kernel"], r["sm"]]
            assert any(n.startswith(prefix) and operand in n for n in r["tensor_core"]), (r["route"], r["sm"], r["tensor_core"])
        elif r["kernel"] in report.MATRIX_ROUTES:
            expected = ("HGMMA", "IGMMA") if r["sm"] == 90 else ("HMMA", "IMMA")
            assert any(name.startswith(expected) for name in r["tensor_core"]), (r["route"], r["sm"], r["tensor_core"])


def test_grid_fills_an_h100(rows):
    assert all(r["grid_programs"] >= 4 * report.H100["sms"] for r in rows)


def test_one_scale_vector_per_group_in_the_gemv(rows):
    """The decode kernel loads each group's scales once per chunk (one load instruction)."""
    assert all(r["scale_loads"] == 1 for r in rows if r["kernel"] == "gemv")


def test_ptx_load_tracing():
    ptx = """
    ld.param.u64 %rd1, [k_param_0];
    ld.param.u64 %rd2, [k_param_1];
    ld.param.u32 %r1, [k_param_2];
    mul.wide.s32 %rd3, %r1, 4;
    add.s64 %rd4, %rd2, %rd3;
    @%p1 ld.global.v4.b32 { %r2, %r3, %r4, %r5 }, [ %rd4 + 0 ];
    add.s64 %rd5, %rd1, %rd3;
    @%p1 ld.global.b8 { %rs1 }, [ %rd5 + 0 ];
    cp.async.cg.shared.global [ %r9 + 0 ], [ %rd4 + 0 ], 0x10, %r10;
    """
    loads = report.ptx_loads_by_pointer(ptx, "k", ["x_ptr", "w_ptr", "N"])
    assert loads == {"w_ptr": [128, 128], "x_ptr": [8]}
