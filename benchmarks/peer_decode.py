"""Decode speed of lrq's `--with-past` graphs beside onnxruntime-genai's model builder graphs of the
same Hugging Face model, timed interleaved in one run with one protocol (prompts, new tokens,
threads, greedy): one resident process per engine for the whole run (--protocol resident, the
default), or a fresh process per generation (--protocol fresh). Each table (one per prompt length)
gives time to first token, tokens/s and tokens per CPU-second, and the ratios per round to the
first target and to the builder's graph of the same accuracy, as median [min-max] over the rounds.

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
from pathlib import Path

# One timer per engine, run by the engine's own Python. It reads requests "PROMPT NEW" on stdin, one
# per line, and answers each with one JSON line: time to first token and decode speed, in wall time
# and in this process's CPU time (a shared machine gives processes unequal CPU shares). Each prompt
# length is warmed up by one untimed generation the first time it is asked for. The fresh-process
# protocol sends one request per process; the resident one keeps one process per engine for the run.
TIMER_LOOP = r"""
import json, sys, time

def timed(generate, prompt_len, new_tokens):
    wall, cpu = time.perf_counter(), time.process_time()
    first = generate(prompt_len, new_tokens)  # returns the step loop to run after the first token
    ttft, ttft_cpu = time.perf_counter() - wall, time.process_time() - cpu
    wall, cpu = time.perf_counter(), time.process_time()
    steps = first()
    decode, decode_cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {"ttft_ms": 1e3 * ttft, "ttft_cpu_ms": 1e3 * ttft_cpu, "tokens_per_s": steps / decode,
            "cpu_ms_per_token": 1e3 * decode_cpu / steps, "tokens": steps}

warm = set()
print("ready", flush=True)
for line in sys.stdin:
    prompt_len, new_tokens = map(int, line.split())
    if prompt_len not in warm:
        timed(generate, prompt_len, new_tokens)
        warm.add(prompt_len)
    print(json.dumps(timed(generate, prompt_len, new_tokens)), flush=True)
"""

GENAI_TIMER = r"""
import sys
import numpy as np
import onnxruntime_genai as og
model = og.Model(sys.argv[1])  # threads: set in its genai_config.json by the caller

def generate(prompt_len, new_tokens):
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=prompt_len + new_tokens, min_length=prompt_len + new_tokens, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(np.random.default_rng(0).integers(0, 100, (1, prompt_len), dtype=np.int32))
    generator.generate_next_token()

    def rest():
        steps = 0
        while not generator.is_done():
            generator.generate_next_token()
            steps += 1
        return steps
    return rest
""" + TIMER_LOOP

LRQ_TIMER = r"""
import sys
import numpy as np
from lrq_deploy.bench.decode import make_decoder
from lrq_deploy.runtime.threads import use_threads
if sys.argv[2] != "0":
    use_threads(int(sys.argv[2]))
decoder = make_decoder(sys.argv[1], "cpu")

def generate(prompt_len, new_tokens):
    prompt = np.random.default_rng(0).integers(0, 100, (1, prompt_len), dtype=np.int64)
    decoder.reserve(prompt_len + new_tokens)
    tokens = [decoder.prefill_in_chunks(prompt, 4096)]

    def rest():
        for _ in range(new_tokens - 1):
            tokens[0] = decoder.step(tokens[0])
        return new_tokens - 1
    return rest
""" + TIMER_LOOP


class Engine:
    """One engine's timer process: started once (resident) or per request (fresh)."""

    def __init__(self, kind: str, target: Path, peer_python: str | None, threads: int | None):
        self.kind, self.target, self.threads = kind, target, threads
        if kind == "lrq":
            self.command = [sys.executable, "-c", LRQ_TIMER, str(target), str(threads or 0)]
        else:
            _set_genai_threads(target, threads)
            self.command = [peer_python, "-c", GENAI_TIMER, str(target)]
        self.process = None

    def start(self) -> None:
        self.process = subprocess.Popen(self.command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        if self.process.stdout.readline().strip() != "ready":
            raise RuntimeError(f"{self.target}: the timer did not start")

    def time(self, prompt_len: int, new_tokens: int) -> dict:
        self.process.stdin.write(f"{prompt_len} {new_tokens}\n")
        self.process.stdin.flush()
        return json.loads(self.process.stdout.readline())

    def stop(self) -> None:
        if self.process is not None:
            self.process.stdin.close()
            self.process.wait()
            self.process = None


def _set_genai_threads(directory: Path, threads: int | None) -> None:
    config = json.loads((directory / "genai_config.json").read_text())
    options = config["model"]["decoder"].setdefault("session_options", {})
    if threads:  # the thread count travels in the model's genai_config.json
        options["intra_op_num_threads"], options["inter_op_num_threads"] = threads, 1
    else:
        options.pop("intra_op_num_threads", None)
    (directory / "genai_config.json").write_text(json.dumps(config, indent=4))


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
    parser.add_argument("--prompt-lens", nargs="+", type=int, default=[64])
    parser.add_argument("--protocol", choices=("resident", "fresh"), default="resident",
                        help="resident: one process per engine for the run; fresh: a new process per generation")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if args.genai and not args.peer_python:
        parser.error("--genai needs --peer-python")
    targets = [("lrq", g) for g in args.graphs] + [("onnxruntime-genai", d) for d in args.genai]
    engines = [Engine(kind, target, args.peer_python, args.threads) for kind, target in targets]
    tables = []
    for prompt_len in args.prompt_lens:
        runs = measure(engines, prompt_len, args.new_tokens, args.rounds, args.protocol)
        tables.append(table(targets, runs, prompt_len, args))
    print("\n\n".join(tables))
    return 0


def measure(engines: list[Engine], prompt_len: int, new_tokens: int, rounds: int, protocol: str) -> dict:
    """Rounds interleaved: in each, every engine once, in order (resident: the processes started once)."""
    if protocol == "resident":
        for engine in engines:
            engine.start()
    runs: dict[str, list[dict]] = {str(e.target): [] for e in engines}
    try:
        for round_index in range(rounds):
            for engine in engines:
                if protocol == "fresh":
                    engine.start()
                figures = engine.time(prompt_len, new_tokens)
                if protocol == "fresh":
                    engine.stop()
                runs[str(engine.target)].append(figures)
                first = runs[str(engines[0].target)][round_index]
                print(f"prompt {prompt_len}, round {round_index + 1}: {engine.kind} {engine.target}: "
                      f"{figures['tokens_per_s']:.2f} tokens/s ({figures['tokens_per_s'] / first['tokens_per_s']:.3f}x "
                      f"the first), TTFT {figures['ttft_ms']:.1f} ms ({figures['ttft_ms'] / first['ttft_ms']:.3f}x)",
                      file=sys.stderr, flush=True)
    finally:
        for engine in engines:
            engine.stop()
    return runs


def table(targets, runs: dict, prompt_len: int, args) -> str:
    median = {str(t): statistics.median(r["tokens_per_s"] for r in runs[str(t)]) for _, t in targets}
    weights = {str(t): weights_of(t) for _, t in targets}
    builder = {}  # the peer of each numerics class: the first builder graph at that accuracy level
    for kind, target in targets:
        _, level, by_lrq = weights[str(target)]
        if kind == "onnxruntime-genai" and not by_lrq and level is not None:
            builder.setdefault(level, str(target))
    lines = [f"prompt {prompt_len}, {args.new_tokens} new tokens, {args.threads} thread(s), {args.rounds} rounds, "
             f"{args.protocol} processes (median [min-max]; ratios to the first target per round, interleaved)\n",
             "| runtime | graph | weights | TTFT ms | tokens/s | tokens per CPU-s | vs first (per round) "
             "| TTFT vs first (per round) | vs the builder's graph, same accuracy: decode / TTFT |",
             "|---|---|---|---|---|---|---|---|---|"]
    for kind, target in targets:
        tps, (description, level, _) = median[str(target)], weights[str(target)]
        own, first = runs[str(target)], runs[str(targets[0][1])]
        ttfts, speeds = [r["ttft_ms"] for r in own], [r["tokens_per_s"] for r in own]
        per_cpu_s = [1e3 / r["cpu_ms_per_token"] for r in own]
        ratios = [a["tokens_per_s"] / b["tokens_per_s"] for a, b in zip(own, first)]
        ttft_ratios = [a["ttft_ms"] / b["ttft_ms"] for a, b in zip(own, first)]
        peer = ""
        if level in builder:  # per round, against the builder's graph of the same accuracy
            theirs = runs[builder[level]]
            peer = (_spread([a["tokens_per_s"] / b["tokens_per_s"] for a, b in zip(own, theirs)]) + " / "
                    + _spread([a["ttft_ms"] / b["ttft_ms"] for a, b in zip(own, theirs)]))
        runtime = "lrq" if kind == "lrq" else "onnxruntime-genai"
        lines.append(f"| {runtime} | {label(target)} | {description} | {statistics.median(ttfts):.1f} "
                     f"[{min(ttfts):.1f}-{max(ttfts):.1f}] | {tps:.2f} [{min(speeds):.2f}-{max(speeds):.2f}] | "
                     f"{statistics.median(per_cpu_s):.2f} | {_spread(ratios)} | {_spread(ttft_ratios)} | {peer} |")
    return "\n".join(lines)

if __name__ == "__main__":
    sys.exit(main())
