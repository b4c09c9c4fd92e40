"""Peak resident memory of `lrq calibrate` with and without --offload on a LLaMA-7B-shaped model
(hidden 4096, intermediate 11008, 32 heads, vocab 32000; random weights) truncated to a few
layers, and the projection to 32 layers from the per-layer slope (2 and 4 layers measured).

    python benchmarks/offload_memory.py [--workdir DIR] [--layers 2 4] [--hidden 4096 --intermediate 11008 --heads 32]

Each calibration runs in its own process; its peak RSS is read from getrusage of a wrapper
process, so runs do not see each other's peaks. Run by hand (minutes, ~4 GB of disk per model).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

WRAPPER = ("import resource, subprocess, sys; rc = subprocess.run(sys.argv[1:]).returncode; "
           "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(rc)")
CALIBRATE = ["--wbits", "4", "--group-size", "128", "--symmetric", "--nsamples", "4", "--seq-len", "128", "--force"]


def peak_rss_gib(command: list[str]) -> float:
    out = subprocess.run([sys.executable, "-c", WRAPPER, *command], check=True, capture_output=True, text=True)
    return int(out.stdout.strip().splitlines()[-1]) / 2**20  # ru_maxrss is in KiB on Linux


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=11008)
    parser.add_argument("--heads", type=int, default=32)
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="lrq-offload-"))
    lrq = [sys.executable, "-m", "lrq_deploy.cli"]
    rows = []
    for layers in args.layers:
        model = work / f"llama-{args.hidden}-{layers}l"
        if not (model / "config.json").is_file():
            subprocess.run([sys.executable, str(Path(__file__).with_name("random_llama.py")), "-o", str(model),
                            "--layers", str(layers), "--vocab", "32000", "--hidden", str(args.hidden),
                            "--intermediate", str(args.intermediate), "--heads", str(args.heads),
                            "--kv-heads", str(args.heads)], check=True, capture_output=True)
        for offload in (False, True):
            command = [*lrq, "calibrate", str(model), "-o", str(work / f"q-{layers}-{offload}"), *CALIBRATE]
            peak = peak_rss_gib(command + (["--offload"] if offload else []))
            rows.append({"layers": layers, "offload": offload, "peak_rss_gib": round(peak, 2)})
            print(json.dumps(rows[-1]), flush=True)
    for offload in (False, True):
        (a, pa), (b, pb) = [(r["layers"], r["peak_rss_gib"]) for r in rows if r["offload"] == offload][:2]
        slope = (pb - pa) / (b - a)
        print(json.dumps({"offload": offload, "per_layer_gib": round(slope, 3),
                          "projected_32_layers_gib": round(pb + (32 - b) * slope, 2)}))


if __name__ == "__main__":
    main()
