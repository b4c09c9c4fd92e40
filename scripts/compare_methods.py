"""Compare quantization methods on one model: WikiText-2 test perplexity per scenario.

Every method runs through the same engine on the same calibration samples and settings.
Writes a Markdown table (default docs/RESULTS.md) and a JSON file beside it.

    python scripts/compare_methods.py                       # bundled LLaMA, all scenarios
    python scripts/compare_methods.py --epochs 2 --eval-windows 50 --scenarios W4A4   # quick look
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from lrq_deploy.calib import calibrate
from lrq_deploy.config import CalibConfig, QuantConfig
from lrq_deploy.eval import evaluate_checkpoint

SCENARIOS = {
    "W4A4": QuantConfig(wbits=4, abits=4),
    "W6A6": QuantConfig(wbits=6, abits=6),
    "W3A16-g64": QuantConfig(wbits=3, abits=16, group_size=64),
    "W2A16-g64": QuantConfig(wbits=2, abits=16, group_size=64),
}
METHODS = ["rtn", "smoothquant", "omniquant", "lrquant", "lrquant+"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="bundled:llama")
    parser.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=list(SCENARIOS))
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--eval-windows", type=int, default=None, help="limit perplexity windows (default: whole test set)")
    parser.add_argument("--out", type=Path, default=Path("docs/RESULTS.md"))
    args = parser.parse_args()

    rows: dict[str, dict[str, float]] = {}
    fp_ppl = None
    with tempfile.TemporaryDirectory() as tmp:
        for scenario in args.scenarios:
            for method in args.methods:
                start = time.time()
                cconfig = CalibConfig(method=method, nsamples=args.nsamples, seqlen=args.seqlen,
                                      epochs=args.epochs, batch_size=args.batch_size)
                out = Path(tmp) / f"{scenario}-{method}"
                calibrate(args.model, out, SCENARIOS[scenario], cconfig, device="auto")
                result = evaluate_checkpoint(out, limit=args.eval_windows, compare_fp=fp_ppl is None)
                fp_ppl = fp_ppl or result["fp"]["ppl"]
                rows.setdefault(method, {})[scenario] = result["quant"]["ppl"]
                print(f"{scenario:<10} {method:<12} ppl {result['quant']['ppl']:.3f}  ({time.time() - start:.0f}s)", flush=True)
    write_table(args, rows, fp_ppl)


NOTES_HEADING = "\n## Reading the table"


def _kept_notes(path: Path) -> str:
    """Hand-written notes below NOTES_HEADING survive a regeneration of the table."""
    if not path.is_file():
        return ""
    text = path.read_text()
    return text[text.index(NOTES_HEADING):] if NOTES_HEADING in text else ""


def write_table(args, rows, fp_ppl):
    header = "| method | " + " | ".join(args.scenarios) + " |"
    lines = [header, "|" + "---|" * (len(args.scenarios) + 1), "| FP | " + " | ".join(f"{fp_ppl:.2f}" for _ in args.scenarios) + " |"]
    for method, values in rows.items():
        lines.append(f"| {method} | " + " | ".join(f"{values[s]:.2f}" for s in args.scenarios) + " |")
    settings = (f"model `{args.model}`, {args.nsamples} calibration samples x {args.seqlen} tokens, "
                f"{args.epochs} epochs, batch {args.batch_size}, eval windows: {args.eval_windows or 'all'}")
    text = ("# Results\n\nWikiText-2 test perplexity (lower is better), produced by "
            "`python scripts/compare_methods.py`.\n\nSettings: " + settings + "\n\n" + "\n".join(lines) + "\n"
            + _kept_notes(args.out))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    args.out.with_suffix(".json").write_text(json.dumps({"fp": fp_ppl, "methods": rows, "settings": settings}, indent=2) + "\n")
    print(text)


if __name__ == "__main__":
    main()
