"""Reproduce the bundled default models shipped in lrq_deploy/assets/.

- llama-wikitext2: a small LLaMA-architecture causal LM (grouped-query attention,
  SwiGLU, RMSNorm, RoPE) with a byte-level BPE tokenizer, trained on the
  WikiText-2 *validation* text. The test text stays held out for perplexity.
- llama-wide (not shipped; `--only llama-wide --out DIR`): the same recipe with every linear's
  input width a multiple of 128 (hidden 256, 8 heads), so that group size 128 applies; the
  comparison model of the weight-quantization tables in docs/RESULTS.md.
- vit-digits: a small timm VisionTransformer trained on sklearn's 8x8 digits
  (first 1,400 images of a fixed permutation; the remaining 397 are held out).

Deterministic: fixed seeds, single process. Usage:
    python scripts/train_bundled.py --wikitext ../shared/data/wikitext-2 [--only llama|vit]
    python scripts/train_bundled.py --only llama-wide --out /tmp/llama-wide
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ASSETS = Path(__file__).resolve().parents[1] / "lrq_deploy" / "assets"

LLAMA_CONFIG = dict(
    vocab_size=2048,
    hidden_size=192,
    intermediate_size=512,
    num_hidden_layers=4,
    num_attention_heads=6,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)
# every linear's input width (hidden, heads x head_dim, intermediate) a multiple of 128
LLAMA_WIDE_CONFIG = dict(LLAMA_CONFIG, hidden_size=256, num_attention_heads=8, head_dim=32)
VIT_KWARGS = dict(
    img_size=8, patch_size=2, in_chans=1, num_classes=10,
    embed_dim=64, depth=4, num_heads=4, mlp_ratio=4.0,
)


def train_tokenizer(text_path: Path, out_dir: Path):
    """A byte-level BPE tokenizer with the bundled model's vocabulary size (deterministic)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=LLAMA_CONFIG["vocab_size"],
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train([str(text_path)], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(out_dir)
    return fast


def train_llama(wikitext: Path, steps: int, out_dir: Path, config_fields: dict = LLAMA_CONFIG,
                seqlen: int = 256, batch: int = 16):
    from transformers import LlamaConfig, LlamaForCausalLM

    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    tokenizer = train_tokenizer(wikitext / "valid.txt", out_dir)
    ids = torch.tensor(tokenizer((wikitext / "valid.txt").read_text())["input_ids"])
    print(f"llama: {ids.numel()} training tokens")
    config = LlamaConfig(**config_fields, bos_token_id=0, eos_token_id=1)
    model = LlamaForCausalLM(config)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(0)
    start = time.time()
    for step in range(steps):
        lr = 3e-3 * min(1.0, (step + 1) / 100) * 0.5 * (1 + math.cos(math.pi * step / steps))
        for group in opt.param_groups:
            group["lr"] = lr
        offsets = torch.randint(0, ids.numel() - seqlen - 1, (batch,), generator=gen)
        x = torch.stack([ids[o : o + seqlen] for o in offsets])
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"llama step {step} loss {loss.item():.3f} ({time.time() - start:.0f}s)", flush=True)
    model = model.half()
    model.save_pretrained(out_dir, safe_serialization=True)


def train_vit(epochs: int):
    import timm
    from sklearn.datasets import load_digits

    out_dir = ASSETS / "vit-digits"
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    digits = load_digits()
    perm = torch.randperm(len(digits.images), generator=torch.Generator().manual_seed(0))
    images = torch.tensor(digits.images, dtype=torch.float32)[perm].unsqueeze(1) / 16.0
    labels = torch.tensor(digits.target)[perm]
    x_train, y_train = (images[:1400] - 0.5) / 0.5, labels[:1400]
    x_test, y_test = (images[1400:] - 0.5) / 0.5, labels[1400:]
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **VIT_KWARGS)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    gen = torch.Generator().manual_seed(0)
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(1400, generator=gen)
        for i in range(0, 1400, 64):
            idx = order[i : i + 64]
            loss = F.cross_entropy(model(x_train[idx]), y_train[idx], label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()
        if epoch % 10 == 0 or epoch == epochs - 1:
            model.eval()
            with torch.no_grad():
                acc = (model(x_test).argmax(-1) == y_test).float().mean().item()
            print(f"vit epoch {epoch} loss {loss.item():.3f} held-out top-1 {acc:.4f}", flush=True)
    from safetensors.torch import save_file

    state = {k: v.detach().half().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out_dir / "model.safetensors"))
    (out_dir / "timm.json").write_text(
        json.dumps({"model_name": "vit_tiny_patch16_224", "kwargs": VIT_KWARGS}, indent=2) + "\n"
    )


def vendor_text(wikitext: Path):
    data = ASSETS / "data"
    data.mkdir(parents=True, exist_ok=True)
    valid = (wikitext / "valid.txt").read_text()
    # Calibration excerpt: the first ~256 KB of the validation text, cut at an article boundary.
    cut = valid.find("\n = ", 256_000)
    (data / "wikitext2-calib.txt").write_text(valid[:cut] + "\n")
    (data / "wikitext2-test.txt").write_text((wikitext / "test.txt").read_text())


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wikitext", type=Path, default=Path("../shared/data/wikitext-2"))
    parser.add_argument("--only", choices=["llama", "vit", "llama-wide"])
    parser.add_argument("--out", type=Path, default=None, help="llama-wide: where to write it (required)")
    parser.add_argument("--llama-steps", type=int, default=600)
    parser.add_argument("--vit-epochs", type=int, default=80)
    args = parser.parse_args()
    if args.only == "llama-wide" and args.out is None:
        parser.error("--only llama-wide needs --out DIR (the wide model is not shipped)")
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)
    if args.only in (None, "llama"):
        vendor_text(args.wikitext)
        train_llama(args.wikitext, args.llama_steps, ASSETS / "llama-wikitext2")
    if args.only == "llama-wide":
        train_llama(args.wikitext, args.llama_steps, args.out, LLAMA_WIDE_CONFIG)
    if args.only in (None, "vit"):
        train_vit(args.vit_epochs)


if __name__ == "__main__":
    main()
