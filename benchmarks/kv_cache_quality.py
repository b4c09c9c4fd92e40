"""What a quantized KV cache costs in perplexity: one method and weight scheme calibrated with each
cache format (float, int8, fp8, int4) on the same calibration and test windows, over seeds, beside
llm-compressor's static FP8 kv_cache_scheme (the cache vLLM reads) on the same windows.

Prints, per format, the degradation (quantized minus full-precision perplexity) as mean ± sd over
seeds and per seed, and what the cache adds to the float-cache model's degradation. With
--peer-python (a Python with llmcompressor, see peer_quality.py) the peer's GPTQ runs with a float
cache and with its FP8 cache; at --abits 4 its SpinQuant recipe (R1 + R2 + online R4) + GPTQ:

    python benchmarks/kv_cache_quality.py --model bundled:llama --wbits 4 --seeds 0 1 --peer-python /tmp/peer/bin/python
    python benchmarks/kv_cache_quality.py --model /tmp/llama-wide --method lrquant+ --wbits 4 --abits 4 --rotate hadamard
    python benchmarks/kv_cache_quality.py --model /tmp/llama-wide --formats none int4 int4+rotated int8+rotated
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from peer_quality import lrq_side, run_peer, windows_file  # noqa: E402

FORMATS = ("none", "int8", "fp8", "int4")


def settings_for(args, fmt: str) -> dict:
    """fmt: a cache format, "<format>+rotated" for keys rotated before quantization (--kv-rotate)."""
    cache, _, rotated = fmt.partition("+")
    return {"wbits": args.wbits, "group_size": args.group_size, "symmetric": False, "abits": args.abits,
            "act_asym": args.abits < 16, "nsamples": args.nsamples, "seqlen": args.seqlen, "damp": 0.01,
            "kv_cache": cache, "kv_rotate": rotated == "rotated"}


def lrq_degradation(args, out: Path, fmt: str, seed: int) -> float:
    options = {"epochs": args.epochs} if args.method in ("lrquant", "lrquant+", "omniquant") else {}
    if args.rotate != "none":
        options["rotate"] = args.rotate
    result = lrq_side(args.model, out, settings_for(args, fmt), args.method, options, seed, args.eval_windows)
    return result["quant"]["ppl"] - result["fp"]["ppl"]


def peer_degradations(args, tmp: Path, seed: int) -> dict[str, float]:
    settings = settings_for(args, "none")
    recipe = "GPTQ" if args.abits == 16 else "spinquant(R1,R2,R4)+GPTQ"
    settings["peers"] = [recipe, f"{recipe} kv fp8"]
    ids = windows_file(args.model, tmp / f"windows-{seed}.safetensors", settings, seed, args.eval_windows)
    record = run_peer(args.peer_python, args.model, ids, settings)
    for name, reason in record.get("failed", {}).items():
        print(f"seed {seed}: llm-compressor {name} cannot run on this model: {reason}", flush=True)
    return {f"llm-compressor {record['version']} {name}": ppl - record["fp"] for name, ppl in record["quant"].items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="bundled:llama")
    parser.add_argument("--method", default="gptq")
    parser.add_argument("--wbits", type=int, default=4)
    parser.add_argument("--abits", type=int, default=16)
    parser.add_argument("--group-size", type=int, default=None)
    parser.add_argument("--rotate", default="none")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--formats", nargs="+", default=list(FORMATS),
                        help="cache formats; FORMAT+rotated for keys rotated first (--kv-rotate), e.g. int4+rotated")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--nsamples", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=128)
    parser.add_argument("--eval-windows", type=int, default=100)
    parser.add_argument("--peer-python", default=None, help="a Python with llmcompressor installed")
    args = parser.parse_args()
    rows: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            if args.peer_python:
                for name, value in peer_degradations(args, Path(tmp), seed).items():
                    rows.setdefault(name, []).append(value)
                    print(f"seed {seed} {name}: degradation {value:.4f}", flush=True)
            for fmt in args.formats:
                value = lrq_degradation(args, Path(tmp) / fmt, fmt, seed)
                rows.setdefault(f"lrq kv {fmt}", []).append(value)
                print(f"seed {seed} lrq kv {fmt}: degradation {value:.4f}", flush=True)
    report(args, rows)


def report(args, rows: dict[str, list[float]]) -> None:
    sd = (lambda v: statistics.stdev(v) if len(v) > 1 else 0.0)
    base = statistics.mean(rows["lrq kv none"]) if "lrq kv none" in rows else None
    print(f"\n{args.model}, lrq {args.method} W{args.wbits}A{args.abits}"
          + (f"-g{args.group_size}" if args.group_size else "") + (f", --rotate {args.rotate}" if args.rotate != "none" else "")
          + f", seeds {args.seeds}, {args.nsamples} x {args.seqlen} calibration tokens, {args.eval_windows} test windows")
    print(f"{'setting':<52}{'degradation':>20}  {'per seed':<30}{'added by lrq cache':>20}")
    for name, values in rows.items():
        added = "" if base is None or not name.startswith("lrq") or name == "lrq kv none" else \
            f"{statistics.mean(values) - base:+.4f}"
        print(f"{name:<52}{statistics.mean(values):>12.4f} ± {sd(values):<6.3f} "
              f"{' / '.join(f'{v:.3f}' for v in values):<30}{added:>20}")


if __name__ == "__main__":
    main()
