"""What a quantized KV cache costs in perplexity: one method and weight scheme calibrated with each
cache format (float, int8, fp8, int4) on the same calibration and test windows, over seeds.

Prints, per format, the degradation (quantized minus full-precision perplexity) as mean ± sd over
seeds and per seed, and what the cache adds to the float-cache model's degradation:

    python benchmarks/kv_cache_quality.py --model bundled:llama --wbits 4 --seeds 0 1
    python benchmarks/kv_cache_quality.py --model /tmp/llama-wide --method lrquant+ --wbits 4 --abits 4 --rotate hadamard
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

FORMATS = ("none", "int8", "fp8", "int4")


def degradation(model: str, out: Path, args, fmt: str, seed: int) -> float:
    from lrq_deploy.calib import calibrate
    from lrq_deploy.calib.registry import CalibConfig
    from lrq_deploy.eval import evaluate_checkpoint
    from lrq_deploy.quant.scheme import QuantScheme

    scheme = QuantScheme(wbits=args.wbits, abits=args.abits, group_size=args.group_size, kv_cache=fmt)
    options = {"epochs": args.epochs} if args.method in ("lrquant", "lrquant+", "omniquant") else {}
    cconfig = CalibConfig.of(args.method, nsamples=args.nsamples, seqlen=args.seqlen, seed=seed, rotate=args.rotate,
                             **options)
    calibrate(model, out, scheme, cconfig, device="auto", force=True)
    result = evaluate_checkpoint(out, limit=args.eval_windows)
    return result["quant"]["ppl"] - result["fp"]["ppl"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="bundled:llama")
    parser.add_argument("--method", default="gptq")
    parser.add_argument("--wbits", type=int, default=4)
    parser.add_argument("--abits", type=int, default=16)
    parser.add_argument("--group-size", type=int, default=None)
    parser.add_argument("--rotate", default="none")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--formats", nargs="+", default=list(FORMATS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--nsamples", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=128)
    parser.add_argument("--eval-windows", type=int, default=100)
    args = parser.parse_args()
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            for fmt in args.formats:
                rows.setdefault(fmt, []).append(degradation(args.model, Path(tmp) / fmt, args, fmt, seed))
                print(f"seed {seed} kv {fmt}: degradation {rows[fmt][-1]:.4f}", flush=True)
    sd = (lambda v: statistics.stdev(v) if len(v) > 1 else 0.0)
    base = statistics.mean(rows["none"]) if "none" in rows else None
    print(f"\n{args.model}, {args.method} W{args.wbits}A{args.abits}"
          + (f"-g{args.group_size}" if args.group_size else "") + (f", --rotate {args.rotate}" if args.rotate != "none" else "")
          + f", seeds {args.seeds}, {args.nsamples} x {args.seqlen} calibration tokens, {args.eval_windows} test windows")
    print(f"{'kv cache':<10}{'degradation':>20}  {'per seed':<30}{'added by the cache':>20}")
    for fmt, values in rows.items():
        added = "" if base is None or fmt == "none" else f"{statistics.mean(values) - base:+.4f}"
        print(f"{fmt:<10}{statistics.mean(values):>12.4f} ± {sd(values):<6.3f} "
              f"{' / '.join(f'{v:.3f}' for v in values):<30}{added:>20}")


if __name__ == "__main__":
    main()
