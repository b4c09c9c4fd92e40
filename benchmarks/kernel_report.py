"""CPU kernel report: every kernel the dispatch table can choose, compiled for sm_80 / sm_89 /
sm_90 as the JIT compiles it, and the float-grid kernels for the GPUs with their tensor cores
(FP8: sm_89 / sm_90, FP4: sm_100 / sm_120), read from PTX and SASS (no GPU needed).

    python benchmarks/kernel_report.py [--sm 80 89 90] [--float-sm 89 90 100 120] [--json FILE] [--markdown]

Columns: registers, spills, occupancy, widest load of packed weights, scale loads (static),
tensor-core instructions, programs at N=28672 K=8192, and the H100 traffic-model floor.
"""

from __future__ import annotations

import argparse
import json
import sys

import kernel_inspect as report  # lies beside this script (the script's folder is first on sys.path)


def markdown(rows) -> str:
    lines = ["| route | sm | regs | spills | occupancy | weight loads (bits) | scale loads | tensor cores | programs | H100 floor (us) | problems |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.route} | {r.sm} | {r.regs} | {r.spill_bytes} B / {r.spill_instructions} | {r.occupancy:.2f} | "
                     f"{'/'.join(map(str, r.weight_loads))} | {r.scale_loads} | {', '.join(r.tensor_core) or '-'} | "
                     f"{r.grid_programs} | {r.floor_us} | {'; '.join(report.problems(r)) or 'none'} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sm", nargs="+", type=int, default=list(report.SMS))
    parser.add_argument("--float-sm", nargs="+", type=int, default=list(report.FLOAT_SMS),
                        help="SMs for the float-grid kernels (FP8 rows on 89 / 90, FP4 rows on 100 / 120)")
    parser.add_argument("--json", dest="json_path", help="write the rows as a JSON list")
    parser.add_argument("--markdown", action="store_true", help="print a markdown table")
    args = parser.parse_args()
    rows = report.kernel_report(tuple(args.sm)) + report.float_report(tuple(args.float_sm))
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump(report.as_dicts(rows), f, indent=2)
    print(markdown(rows) if args.markdown else "\n".join(
        f"{r.route:<36} sm_{r.sm} regs {r.regs:>3} spill {r.spill_bytes:>3} B occ {r.occupancy:.2f} "
        f"load {r.weight_load_bits:>3} b mma {','.join(r.tensor_core) or '-':<24} grid {r.grid_programs:>6} floor {r.floor_us:>8} us"
        for r in rows))
    bad = [(r.route, r.sm, report.problems(r)) for r in rows if report.problems(r)]
    for route, sm, found in bad:
        print(f"PROBLEM {route} sm_{sm}: {'; '.join(found)}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
