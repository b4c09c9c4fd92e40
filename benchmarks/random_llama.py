"""Write a random-weight LLaMA with real-model widths as an HF directory, for speed benchmarks.

At hidden 4096 / intermediate 11008 (LLaMA-7B's layer shapes) decoding is bound by reading the
weights, on a CPU as on a GPU, so what 4-bit weights buy shows up in tokens per second. The
weights are random (N(0, 0.02)); the tokenizer is the bundled model's (its ids are a subset of
the vocabulary). By hand:

    python benchmarks/random_llama.py -o runs/llama-4096 --layers 2
    lrq calibrate runs/llama-4096 -o runs/llama-4096-w4 --wbits 4 --group-size 128 --symmetric --nsamples 4 --seq-len 64
    lrq export runs/llama-4096 --onnx runs/fp.onnx --with-past --no-verify
    lrq export runs/llama-4096-w4 --onnx runs/w4.onnx --with-past --no-verify
    lrq bench --decode --compare runs/fp.onnx runs/w4.onnx --prompt-len 64 --new-tokens 32
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch

BUNDLED = Path(__file__).resolve().parents[1] / "lrq_deploy" / "assets" / "llama-wikitext2"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--out", type=Path, required=True)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=11008)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=32)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--positions", type=int, default=2048)
    parser.add_argument("--tie-embeddings", action="store_true", help="Share input and output embeddings.")
    args = parser.parse_args()

    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        max_position_embeddings=args.positions, tie_word_embeddings=args.tie_embeddings,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(args.out, safe_serialization=True)
    for name in TOKENIZER_FILES:
        if (BUNDLED / name).exists():
            shutil.copy(BUNDLED / name, args.out / name)
    params = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.out}: {args.layers} layers, hidden {args.hidden}, {params / 1e6:.0f} M parameters")


if __name__ == "__main__":
    main()
