"""Decode and time to first token with a float32, int8, int4 and fp8 KV cache at long context, in
one run: the 4096-wide random LLaMA of benchmarks/random_llama.py (2 layers, 32 heads of 128, no
grouped-query attention, vocabulary 32000), weights W4 g128 symmetric with lrq's CPU kernels, one
`--with-past --cpu-kernels` graph per cache format. By hand, from the repository root:

    python benchmarks/kv_cache_speed.py runs/kv-speed --rounds 3 --threads 1

Protocol: every graph is loaded once and stays resident (one process); each graph is warmed up by
one short generation; then in each round, for each prompt length, the graphs generate one after
another (their order rotated from round to round), each timed for its first token (prefill) and
its per-token decode, in wall time and in this process's CPU time. Ratios are taken within a round
against the float graph, so a machine that slows down between rounds moves both sides of a ratio;
CPU time per token shows what a shared machine's unequal CPU shares do to the wall times. The
table gives the median and range over rounds. The float graph attends with onnxruntime's
GroupQueryAttention, the quantized ones with ai.lrq.cpu::QuantizedCacheAttention.

Memory: onnxruntime's CPU arena keeps each resident session's peak (the float graph's attention
scores at a 4096-token prompt alone are GiBs); four sessions at 4096 tokens come near 24 GiB. Turning
the arena off is no remedy: the float graph then allocates its buffers on every step (decode 2.6x
slower in one measurement). On a smaller machine give fewer --formats per run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

FORMATS = ("none", "int8", "int4", "fp8")
LABELS = {"none": "float32", "int8": "int8", "int4": "int4", "fp8": "fp8 (E4M3)"}


def build(out: Path, formats: list[str], positions: int) -> dict[str, Path]:
    """The random model, one checkpoint and one graph per cache format (each kept if already there)."""
    model = out / "model"
    if not model.exists():
        run([sys.executable, "benchmarks/random_llama.py", "-o", str(model), "--layers", "2",
             "--positions", str(positions)])
    graphs = {}
    for fmt in formats:
        ckpt, graph = out / f"w4-{fmt}", out / f"w4-{fmt}.onnx"
        cache = [] if fmt == "none" else ["--kv-cache", fmt]
        if not ckpt.exists():
            run(["lrq", "-q", "calibrate", str(model), "-o", str(ckpt), "--method", "rtn", "--wbits", "4",
                 "--group-size", "128", "--symmetric", "--nsamples", "2", "--seq-len", "32", *cache])
        if not graph.exists():
            run(["lrq", "export", str(ckpt), "--onnx", str(graph), "--with-past", "--cpu-kernels", "--no-verify"])
        graphs[fmt] = graph
    return graphs


def run(command: list[str]) -> None:
    print("+", " ".join(command), flush=True)
    subprocess.run(command, check=True)


def generate(decoder, prompt: np.ndarray, new_tokens: int) -> dict:
    """One greedy generation: first-token and per-token wall / CPU times (ms)."""
    decoder.reserve(prompt.shape[1] + new_tokens)
    wall, cpu = time.perf_counter(), time.process_time()
    tokens = decoder.prefill(prompt)
    ttft, ttft_cpu = time.perf_counter() - wall, time.process_time() - cpu
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(new_tokens - 1):
        tokens = decoder.step(tokens)
    steps = new_tokens - 1
    return {"ttft_ms": 1e3 * ttft, "ttft_cpu_ms": 1e3 * ttft_cpu,
            "ms_per_token": 1e3 * (time.perf_counter() - wall) / steps,
            "cpu_ms_per_token": 1e3 * (time.process_time() - cpu) / steps}


def measure(graphs: dict[str, Path], prompts: list[int], new_tokens: int, rounds: int, threads: int) -> dict:
    from lrq_deploy.bench.decode import OrtDecoder
    from lrq_deploy.runtime.threads import use_threads

    use_threads(threads)
    decoders = {fmt: OrtDecoder(graph, "cpu") for fmt, graph in graphs.items()}
    rng = np.random.default_rng(0)
    for decoder in decoders.values():
        generate(decoder, rng.integers(0, 100, (1, 64)), 4)
    runs = []
    order = list(decoders)
    for round_ in range(rounds):
        for prompt_len in prompts:
            prompt = rng.integers(0, 100, (1, prompt_len))
            for fmt in order[round_ % len(order):] + order[:round_ % len(order)]:
                result = generate(decoders[fmt], prompt, new_tokens)
                runs.append({"round": round_, "prompt": prompt_len, "format": fmt, **result})
                print(json.dumps(runs[-1]), flush=True)
    return {"threads": threads, "new_tokens": new_tokens, "runs": runs,
            "kv_bytes_per_token": {fmt: d.kv_bytes_per_token for fmt, d in decoders.items()}}


def _median_range(values: list[float], digits: int = 3) -> str:
    return f"{statistics.median(values):.{digits}g} ({min(values):.{digits}g}–{max(values):.{digits}g})"


def table(result: dict) -> str:
    """Per prompt and format: median (range over rounds) of the times and of the ratios to float32."""
    runs = result["runs"]
    lines = ["| prompt | cache | KV bytes / token | time to first token, s | TTFT vs float32 | ms / token "
             "| CPU ms / token | decode speed vs float32 |", "|---|---|---|---|---|---|---|---|"]
    for prompt in sorted({r["prompt"] for r in runs}):
        at = [r for r in runs if r["prompt"] == prompt]
        base = {r["round"]: r for r in at if r["format"] == "none"}
        for fmt in dict.fromkeys(r["format"] for r in at):
            mine = [r for r in at if r["format"] == fmt]
            ttft = [r["ttft_ms"] / 1e3 for r in mine]
            ttft_ratio = [r["ttft_ms"] / base[r["round"]]["ttft_ms"] for r in mine if r["round"] in base]
            speed = [base[r["round"]]["ms_per_token"] / r["ms_per_token"] for r in mine if r["round"] in base]
            bytes_ = result["kv_bytes_per_token"][fmt]
            lines.append(f"| {prompt} | {LABELS[fmt]} | {bytes_:.0f} | {_median_range(ttft)} | "
                         f"{_median_range(ttft_ratio)}x | {_median_range([r['ms_per_token'] for r in mine])} | "
                         f"{_median_range([r['cpu_ms_per_token'] for r in mine])} | {_median_range(speed)}x |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="working directory: model, checkpoints, graphs, result.json")
    parser.add_argument("--formats", nargs="+", default=list(FORMATS), choices=FORMATS)
    parser.add_argument("--prompts", nargs="+", type=int, default=[512, 2048, 4096])
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    if "none" not in args.formats:
        parser.error("--formats needs none: the ratios are to the float32 cache")
    args.out.mkdir(parents=True, exist_ok=True)
    graphs = build(args.out, args.formats, max(args.prompts) + args.new_tokens + 496)
    result = measure(graphs, args.prompts, args.new_tokens, args.rounds, args.threads)
    (args.out / "result.json").write_text(json.dumps(result, indent=1))
    print(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
