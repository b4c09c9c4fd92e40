"""lrq's methods against llm-compressor's GPTQ (and, with activations quantized, its rotation recipes:
QuIP's online transforms and SpinQuant's R1 + R2 + online R4) on the same model, windows and settings.

Both sides quantize the same Hugging Face directory with the same calibration windows (token ids
written once, read by both) and are scored on the same WikiText-2 test windows; each side also
reports the full-precision perplexity, which must agree. llm-compressor runs in its own Python
(its pins on torch / transformers rarely match lrq's), given by --peer-python:

    python -m venv /tmp/peer && /tmp/peer/bin/pip install torch llmcompressor
    python benchmarks/peer_quality.py --peer-python /tmp/peer/bin/python --wbits 3
    python benchmarks/peer_quality.py --peer-python /tmp/peer/bin/python --wbits 4 --group-size 64 --seeds 0 1 2
    python benchmarks/peer_quality.py --peer-python /tmp/peer/bin/python --wbits 4 --abits 4 --seeds 0 1 2

Prints one line per method: perplexity, degradation (ppl - FP) and its ratio to the peer's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

# What every peer script starts with (run in the peer's own Python): its arguments, the shared
# windows, and perplexity on the test windows as lrq computes it.
PEER_PREAMBLE = r'''
import json, sys
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

model_dir, windows_file, settings = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
torch.manual_seed(0)
tensors = load_file(windows_file)
calib, test = tensors["calib"], tensors["test"]

@torch.no_grad()
def perplexity(model):
    nll, count = 0.0, 0
    for batch in test.split(8):
        logits = model(batch).logits.float()
        nll += torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                 batch[:, 1:].reshape(-1), reduction="sum").item()
        count += batch[:, 1:].numel()
    return float(torch.tensor(nll / count).exp())
'''

PEER_SCRIPT = PEER_PREAMBLE + r'''
from datasets import Dataset
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
import llmcompressor

def load():
    return AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)

weights = {"num_bits": settings["wbits"], "type": "int", "symmetric": settings["symmetric"],
           "strategy": "group" if settings["group_size"] else "channel"}
if settings["group_size"]:
    weights["group_size"] = settings["group_size"]
scheme = {"targets": ["Linear"], "weights": weights}
if settings["abits"] < 16:  # per token, dynamic, as lrq's activations
    scheme["input_activations"] = {"num_bits": settings["abits"], "type": "int", "strategy": "token",
                                   "dynamic": True, "symmetric": not settings["act_asym"]}

# the static FP8 cache vLLM reads (k_scale / v_scale per attention layer)
KV_FP8 = {"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False, "symmetric": True}

def rounding(kind, kv_cache):
    cache = {"kv_cache_scheme": KV_FP8} if kv_cache == "fp8" else {}
    if kind == "rtn":
        return QuantizationModifier(config_groups={"group_0": scheme}, ignore=["lm_head"], **cache)
    return GPTQModifier(config_groups={"group_0": scheme}, ignore=["lm_head"], dampening_frac=settings["damp"],
                        block_size=128, **cache)

def transforms(name):
    from llmcompressor.modifiers.transform import QuIPModifier, SpinQuantModifier

    if name.startswith("quip"):
        return [QuIPModifier(rotations=["v"], transform_type="random-hadamard", ignore=["lm_head"])]
    if name.startswith("spinquant"):
        return [SpinQuantModifier(rotations=["R1", "R2", "R4"], transform_type="hadamard")]
    return []

data = Dataset.from_dict({"input_ids": calib.tolist(), "attention_mask": torch.ones_like(calib).tolist()})
fp = perplexity(load())
quant = {}
failed = {}
for name in settings["peers"]:  # "<transforms>+<rounding>[ kv fp8]"
    model = load()
    recipe_name, _, kv_cache = name.partition(" kv ")
    try:
        oneshot(model=model, dataset=data,
                recipe=transforms(recipe_name) + [rounding(recipe_name.rsplit("+", 1)[-1], kv_cache)],
                num_calibration_samples=len(calib), max_seq_length=calib.shape[1])
    except Exception as exc:  # a recipe the peer cannot apply to this model: reported, the others still run
        failed[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        continue
    quant[name] = perplexity(model)
print(json.dumps({"fp": fp, "quant": quant, "failed": failed, "version": llmcompressor.__version__}))
'''


def lrq_side(model: str, out: Path, settings: dict, method: str, options: dict, seed: int, eval_windows: int) -> dict:
    from lrq_deploy.calib import calibrate
    from lrq_deploy.calib.registry import CalibConfig
    from lrq_deploy.eval import evaluate_checkpoint
    from lrq_deploy.quant.scheme import QuantScheme

    scheme = QuantScheme(wbits=settings["wbits"], group_size=settings["group_size"], symmetric=settings["symmetric"],
                         abits=settings["abits"], act_asym=settings["act_asym"],
                         kv_cache=settings.get("kv_cache", "none"), kv_rotate=settings.get("kv_rotate", False))
    cconfig = CalibConfig.of(method, nsamples=settings["nsamples"], seqlen=settings["seqlen"], seed=seed, **options)
    calibrate(model, out, scheme, cconfig, device="auto", force=True)
    return evaluate_checkpoint(out, limit=eval_windows)


def windows_file(model: str, path: Path, settings: dict, seed: int, eval_windows: int) -> Path:
    """The calibration windows lrq draws for this seed and the first test windows, as token ids."""
    import torch
    from safetensors.torch import save_file

    from lrq_deploy import data
    from lrq_deploy.metrics.perplexity import windows
    from lrq_deploy.models import load_model

    loaded = load_model(model)
    calib = loaded.adapter.calibration_batches(loaded, None, settings["nsamples"], settings["seqlen"], seed)
    test = windows(data.tokenize(loaded.tokenizer, data.bundled_text("test")), loaded.adapter.eval_seqlen,
                   eval_windows)
    save_file({"calib": torch.cat(list(calib)).contiguous(), "test": test.contiguous()}, str(path))
    return path


def lrq_and_peer_methods(args) -> tuple[list[str], dict]:
    """The peer recipes and lrq's methods compared: weight-only rounding, or with activations
    quantized the rotation recipes beside lrq's rotated and unrotated methods."""
    learn = {"epochs": args.epochs}
    if args.abits == 16:
        # llm-compressor's GPTQModifier orders columns by the Hessian's diagonal by default (actorder
        # "static" since 0.6): lrq's --act-order is the same ordering with the same static groups
        return ["GPTQ"], {"lrq gptq": ("gptq", {"damp": args.damp}),
                          "lrq gptq --act-order": ("gptq", {"damp": args.damp, "act_order": True}),
                          "lrq gptq --weight-range minmax": ("gptq", {"damp": args.damp, "weight_range": "minmax"}),
                          "lrq rtn": ("rtn", {}), "lrq awq": ("awq", {}),
                          "lrq lrquant": ("lrquant", learn),
                          "lrq lrquant --rounding gptq": ("lrquant", {**learn, "rounding": "gptq"})}
    peers = ["GPTQ", "quip(v)+GPTQ", "spinquant(R1,R2,R4)+GPTQ", "spinquant(R1,R2,R4)+rtn"]
    methods = {"lrq rtn": ("rtn", {}), "lrq lrquant+": ("lrquant+", learn)}
    for rotation in args.rotations:
        flag, rotate = f"lrq --rotate {rotation}", {"rotate": rotation}
        methods[f"{flag} rtn"] = ("rtn", rotate)
        if args.abits == 4 and rotation == args.rotations[0]:
            methods[f"{flag} gptq"] = ("gptq", {"damp": args.damp, **rotate})
            methods[f"{flag} lrquant+"] = ("lrquant+", {**learn, **rotate})
        methods[f"{flag} lrquant+ --rounding gptq"] = ("lrquant+", {**learn, **rotate, "rounding": "gptq"})
    if args.abits == 4 and args.rotations:
        rotation = args.rotations[0]
        methods[f"lrq --rotate {rotation} lrquant+ --rounding gptq --learn-transforms"] = ("lrquant+", {
            **learn, "rotate": rotation, "rounding": "gptq", "learn_transforms": True})
    return peers, methods


def run_peer(peer_python: str, model: str, ids: Path, settings: dict) -> dict:
    """llm-compressor's recipes settings["peers"] on the windows in `ids`, in the peer's own Python:
    {"fp": ppl, "quant": {recipe: ppl}, "failed": {recipe: reason}, "version": ...}."""
    peer = subprocess.run([peer_python, "-c", PEER_SCRIPT, str(hf_directory(model)), str(ids), json.dumps(settings)],
                          capture_output=True, text=True)
    if peer.returncode:
        raise SystemExit(f"llm-compressor failed:\n{peer.stderr[-3000:]}")
    return json.loads(peer.stdout.strip().splitlines()[-1])


def hf_directory(model: str) -> Path:
    """The Hugging Face directory llm-compressor loads (the bundled model's own files)."""
    if model == "bundled:llama":
        import lrq_deploy

        return Path(lrq_deploy.__file__).parent / "assets" / "llama-wikitext2"
    return Path(model)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peer-python", required=True, help="a Python with llmcompressor installed")
    parser.add_argument("--model", default="bundled:llama", help="bundled:llama or a Hugging Face directory")
    parser.add_argument("--wbits", type=int, default=3)
    parser.add_argument("--group-size", type=int, default=None)
    parser.add_argument("--symmetric", action="store_true")
    parser.add_argument("--abits", type=int, default=16, help="below 16: per-token activations, rotation rows too")
    parser.add_argument("--act-sym", action="store_true", help="symmetric activations (default asymmetric)")
    parser.add_argument("--epochs", type=int, default=10, help="lrq's learnable methods")
    parser.add_argument("--rotations", nargs="*", default=["hadamard", "random-hadamard"],
                        help="with --abits below 16: lrq's --rotate values compared (every method on the first)")
    parser.add_argument("--nsamples", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=128)
    parser.add_argument("--damp", type=float, default=0.01)
    parser.add_argument("--eval-windows", type=int, default=100)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--kv-cache", default="none", choices=["none", "int8", "fp8", "int4"],
                        help="lrq's cache format; the peer's recipes also run with its static FP8 kv_cache_scheme")
    parser.add_argument("--only", nargs="*", default=None,
                        help="run only lrq's methods whose label contains one of these strings (the peer always runs)")
    args = parser.parse_args()
    settings = {"wbits": args.wbits, "group_size": args.group_size, "symmetric": args.symmetric,
                "abits": args.abits, "act_asym": args.abits < 16 and not args.act_sym, "nsamples": args.nsamples, "seqlen": args.seqlen,
                "damp": args.damp, "kv_cache": args.kv_cache}
    settings["peers"], methods = lrq_and_peer_methods(args)
    if args.kv_cache != "none":
        settings["peers"] += [f"{name} kv fp8" for name in settings["peers"]]
    if args.only is not None:
        methods = {k: v for k, v in methods.items() if any(s in k for s in args.only)}
    results: dict[str, list[float]] = {}
    fps, version = [], None
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            ids = windows_file(args.model, Path(tmp) / f"windows-{seed}.safetensors", settings, seed, args.eval_windows)
            start = time.time()
            record = run_peer(args.peer_python, args.model, ids, settings)
            version = record["version"]
            fps.append(record["fp"])
            for name, ppl in record["quant"].items():
                results.setdefault(f"llm-compressor {version} {name}", []).append(ppl)
                print(f"seed {seed}: llm-compressor {name} {ppl:.4f} (FP {record['fp']:.4f})", flush=True)
            for name, reason in record.get("failed", {}).items():
                print(f"seed {seed}: llm-compressor {name} cannot run on this model: {reason}", flush=True)
            print(f"seed {seed}: llm-compressor took {time.time() - start:.0f}s", flush=True)
            for name, (method, options) in methods.items():
                result = lrq_side(args.model, Path(tmp) / "ckpt", settings, method, options, seed, args.eval_windows)
                results.setdefault(name, []).append(result["quant"]["ppl"])
                print(f"seed {seed}: {name} {result['quant']['ppl']:.4f} (FP {result['fp']['ppl']:.4f})", flush=True)
    fp = statistics.mean(fps)
    peer_drop = min(statistics.mean(v) for k, v in results.items() if k.startswith("llm-compressor")) - fp
    scheme = f"W{args.wbits}A{args.abits}" + (f"-g{args.group_size}" if args.group_size else "") + (
        "-sym" if args.symmetric else "") + (f", lrq's KV cache {args.kv_cache}" if args.kv_cache != "none" else "")
    print(f"\n{scheme}, {args.nsamples} x {args.seqlen} calibration tokens, {args.eval_windows} test windows, "
          f"seeds {args.seeds}; FP perplexity {fp:.4f}")
    print(f"{'method':<36} {'ppl':>16} {'ppl - FP':>10} {'vs best peer':>12}")
    for name, values in results.items():
        mean = statistics.mean(values)
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        print(f"{name:<36} {mean:>9.4f} ± {sd:<5.3f} {mean - fp:>10.4f} {(mean - fp) / peer_drop:>7.2f}x")


if __name__ == "__main__":
    main()
