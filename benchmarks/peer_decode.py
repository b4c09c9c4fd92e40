"""Decode speed of lrq's `--with-past` graphs beside onnxruntime-genai's model builder graphs of the
same Hugging Face model, timed interleaved in one run with one protocol (prompt, new tokens,
threads, greedy), each generation in a fresh process; the table gives tokens/s and ratios to the
first target, median over the rounds.

onnxruntime-genai runs in its own environment (its own onnxruntime), named by --peer-python:

    python -m venv /tmp/genai && /tmp/genai/bin/pip install torch==2.13.0 onnxruntime-genai transformers onnx
    python benchmarks/random_llama.py -o llama --layers 2
    /tmp/genai/bin/python -m onnxruntime_genai.models.builder -i llama -o genai-a4 -p int4 -e cpu \\
        --extra_options accuracy_level=4 block_size=128     # 0.18.0's keys: int4_* ones are ignored
    cp -r genai-a4 genai-a1 && python benchmarks/peer_decode.py --set-accuracy genai-a1 1
    lrq calibrate llama -o w4 --wbits 4 --group-size 128 --symmetric --quantize-head --nsamples 4 --seq-len 64
    lrq export llama --onnx fp.onnx --with-past --no-verify
    lrq export w4 --genai lrq-w4 && lrq export w4 --genai lrq-w4-a8 --ort-int8-activations
    lrq export w4 --genai lrq-w4-ck --cpu-kernels
    python benchmarks/peer_decode.py fp.onnx lrq-w4/model.onnx lrq-w4-ck/model.onnx lrq-w4-a8/model.onnx \\
        --genai lrq-w4 lrq-w4-ck lrq-w4-a8 genai-a1 genai-a4 --peer-python /tmp/genai/bin/python --threads 1 --rounds 5

lrq's graphs are timed by `lrq bench --decode` (positional graphs) and, from the directories
`lrq export --genai` writes, inside onnxruntime-genai's own loop (--genai); each row's last column
is its ratio to the builder's graph of the same MatMulNBits accuracy level.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

# Runs under the peer's Python: greedy generation with onnxruntime-genai, timed like lrq bench
# --decode (prefill = the first token; tokens/s over the tokens after it).
GENAI_TIMER = r"""
import json, sys, time
import numpy as np
import onnxruntime_genai as og
directory, prompt_len, new_tokens = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
model = og.Model(directory)  # threads: set in its genai_config.json by the caller
prompt = np.random.default_rng(0).integers(0, 100, (1, prompt_len), dtype=np.int32)
params = og.GeneratorParams(model)
params.set_search_options(max_length=prompt_len + new_tokens, min_length=prompt_len + new_tokens, do_sample=False)
for timed in (False, True):  # a warm-up generation first, as lrq bench --decode does
    generator = og.Generator(model, params)
    start = time.perf_counter()
    generator.append_tokens(prompt)
    generator.generate_next_token()
    first = time.perf_counter()
    steps = 0
    while not generator.is_done():
        generator.generate_next_token()
        steps += 1
    end = time.perf_counter()
print(json.dumps({"ttft_ms": (first - start) * 1e3, "tokens_per_s": steps / (end - first), "tokens": steps}))
"""


def time_lrq(graph: Path, prompt_len: int, new_tokens: int, threads: int | None) -> dict:
    with tempfile.TemporaryDirectory() as scratch:
        record = Path(scratch) / "decode.json"
        command = [sys.executable, "-m", "lrq_deploy.cli", "--quiet", "bench", "--decode", str(graph), "--prompt-len",
                   str(prompt_len), "--new-tokens", str(new_tokens), "--iterations", "1", "--export-json", str(record)]
        if threads:
            command += ["--threads", str(threads)]
        subprocess.run(command, check=True, capture_output=True)
        result = json.loads(record.read_text())
    return {"ttft_ms": result["ttft_ms"], "tokens_per_s": result["tokens_per_s"]}


def time_genai(directory: Path, peer_python: str, prompt_len: int, new_tokens: int, threads: int | None) -> dict:
    config = json.loads((directory / "genai_config.json").read_text())
    options = config["model"]["decoder"].setdefault("session_options", {})
    if threads:  # the thread count travels in the model's genai_config.json
        options["intra_op_num_threads"], options["inter_op_num_threads"] = threads, 1
    else:
        options.pop("intra_op_num_threads", None)
    (directory / "genai_config.json").write_text(json.dumps(config, indent=4))
    out = subprocess.run([peer_python, "-c", GENAI_TIMER, str(directory), str(prompt_len), str(new_tokens)],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def graph_of(target: Path) -> "onnx.ModelProto":
    import onnx

    return onnx.load(str(target / "model.onnx" if target.is_dir() else target), load_external_data=False)


def weights_of(target: Path) -> tuple[str, int | None, bool]:
    """What a target's quantized linears compute with, from its graph: (description, MatMulNBits
    accuracy level or None for a float graph, whether lrq wrote it): lrq's scheme and the accuracy
    level it declares, or the genai builder graph's block size and accuracy level (the table shows
    it so that only like numerics are compared)."""
    import onnx

    model = graph_of(target)
    meta = {p.key: p.value for p in model.metadata_props}
    if "lrq.scheme" in meta:
        level = meta.get("lrq.ort_matmulnbits_accuracy_level")
        quantized = meta["lrq.scheme"] != "full precision"
        kernel = ", lrq CPU kernel" if "lrq.cpu_kernels" in meta else ""
        return (meta["lrq.scheme"] + (f", accuracy {level}" if level else "") + kernel,
                int(level or 1) if quantized else None, True)
    found = {(a["block_size"], a["accuracy_level"]) for a in (
        {x.name: onnx.helper.get_attribute_value(x) for x in n.attribute}
        for n in model.graph.node if n.op_type == "MatMulNBits")}
    levels = {level for _, level in found}
    return (", ".join(f"int4 g{block}, accuracy {level}" for block, level in sorted(found)) or "float",
            levels.pop() if len(levels) == 1 else None, False)


def label(target: Path) -> str:
    return f"{target.parent.name}/{target.name}" if target.name == "model.onnx" else target.name


def set_accuracy(directory: Path, level: int) -> int:
    """Set every MatMulNBits node's accuracy_level in a genai model (the builder, 0.18.0, writes 4
    whatever int4_accuracy_level says): 1 computes in fp32, the class of lrq's exact graphs."""
    import onnx

    model = onnx.load(str(directory / "model.onnx"), load_external_data=False)
    nodes = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    for node in nodes:
        for attribute in node.attribute:
            if attribute.name == "accuracy_level":
                attribute.i = level
    onnx.save(model, str(directory / "model.onnx"))  # the weights stay in model.onnx.data
    return len(nodes)


def _spread(values: list[float]) -> str:
    return f"{statistics.median(values):.3f}x [{min(values):.3f}-{max(values):.3f}]"


def main() -> int:
    if sys.argv[1:2] == ["--set-accuracy"]:
        print(f"{set_accuracy(Path(sys.argv[2]), int(sys.argv[3]))} MatMulNBits nodes set to accuracy {sys.argv[3]}")
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("graphs", nargs="+", type=Path, help="lrq --with-past graphs (the first is the baseline)")
    parser.add_argument("--genai", nargs="*", type=Path, default=[], help="onnxruntime-genai model directories")
    parser.add_argument("--peer-python", default=None, help="the Python that has onnxruntime-genai")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if args.genai and not args.peer_python:
        parser.error("--genai needs --peer-python")
    targets = [("lrq", g) for g in args.graphs] + [("onnxruntime-genai", d) for d in args.genai]
    runs: dict[str, list[dict]] = {str(t): [] for _, t in targets}
    for round_index in range(args.rounds):
        for kind, target in targets:
            if kind == "lrq":
                figures = time_lrq(target, args.prompt_len, args.new_tokens, args.threads)
            else:
                figures = time_genai(target, args.peer_python, args.prompt_len, args.new_tokens, args.threads)
            runs[str(target)].append(figures)
            first = runs[str(targets[0][1])][round_index]
            print(f"round {round_index + 1}: {kind} {target}: {figures['tokens_per_s']:.2f} tokens/s "
                  f"({figures['tokens_per_s'] / first['tokens_per_s']:.3f}x the first), TTFT {figures['ttft_ms']:.1f} ms "
                  f"({figures['ttft_ms'] / first['ttft_ms']:.3f}x)", file=sys.stderr, flush=True)
    median = {str(t): statistics.median(r["tokens_per_s"] for r in runs[str(t)]) for _, t in targets}
    weights = {str(t): weights_of(t) for _, t in targets}
    builder = {}  # the peer of each numerics class: the first builder graph at that accuracy level
    for kind, target in targets:
        _, level, by_lrq = weights[str(target)]
        if kind == "onnxruntime-genai" and not by_lrq and level is not None:
            builder.setdefault(level, median[str(target)])
    print(f"prompt {args.prompt_len}, {args.new_tokens} new tokens, {args.threads} thread(s), {args.rounds} rounds "
          "(median [min-max]; ratios to the first target per round, interleaved)\n")
    print("| runtime | graph | weights | TTFT ms | tokens/s | vs first (per round) | TTFT vs first (per round) "
          "| vs the builder's graph, same accuracy |\n|---|---|---|---|---|---|---|---|")
    for kind, target in targets:
        tps, (description, level, _) = median[str(target)], weights[str(target)]
        own, first = runs[str(target)], runs[str(targets[0][1])]
        ttfts, speeds = [r["ttft_ms"] for r in own], [r["tokens_per_s"] for r in own]
        ratios = [a["tokens_per_s"] / b["tokens_per_s"] for a, b in zip(own, first)]
        ttft_ratios = [a["ttft_ms"] / b["ttft_ms"] for a, b in zip(own, first)]
        peer = f"{tps / builder[level]:.3f}x" if level in builder else ""
        runtime = "lrq bench" if kind == "lrq" else "onnxruntime-genai"
        print(f"| {runtime} | {label(target)} | {description} | {statistics.median(ttfts):.1f} "
              f"[{min(ttfts):.1f}-{max(ttfts):.1f}] | {tps:.2f} [{min(speeds):.2f}-{max(speeds):.2f}] | "
              f"{_spread(ratios)} | {_spread(ttft_ratios)} | {peer} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
