"""Seconds per calibration epoch for one transformer block, learnable methods.

GPU: one LLaMA-7B-shaped block (hidden 4096, intermediate 11008, 32 heads, random weights)
at 128 samples x 2048 tokens. CPU: a small block. Prints seconds per epoch and the final loss.

    python benchmarks/calib_speed.py [--method lrquant+] [--epochs 2] [--device cuda|cpu] [--compile]

The first epoch with --compile includes compiling (cached on disk for later runs).
"""

from __future__ import annotations

import argparse
import time

import torch

from lrq_deploy.calib import learnable
from lrq_deploy.calib.blockwise import BlockJob, run_block
from lrq_deploy.calib.registry import CalibConfig, get_method, methods
from lrq_deploy.quant.scheme import QuantScheme
from lrq_deploy.models import adapter_for_family

SHAPES = {
    "cuda": dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, nsamples=128, seqlen=2048),
    "cpu": dict(hidden_size=256, intermediate_size=688, num_attention_heads=4, nsamples=16, seqlen=256),
}


def make_job(device: str, method: str, epochs: int, batch_size: int, compile: bool = False) -> BlockJob:
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = dict(SHAPES[device])
    nsamples, seqlen = shape.pop("nsamples"), shape.pop("seqlen")
    config = LlamaConfig(vocab_size=1024, num_hidden_layers=1, max_position_embeddings=seqlen, **shape)
    model = LlamaForCausalLM(config).to(device).eval()
    adapter = adapter_for_family("llama")
    batches = [torch.randint(0, 1024, (1, seqlen), device=device) for _ in range(nsamples)]
    inputs = adapter.capture_block_inputs(model, batches)
    block = adapter.blocks(model)[0]
    cconfig = CalibConfig.of(method=method, nsamples=nsamples, seqlen=seqlen, epochs=epochs, batch_size=batch_size,
                           compile=compile)
    targets = run_block(adapter, block, inputs.hidden, inputs.kwargs, batch_size)
    return BlockJob(
        0, block, adapter, adapter.smooth_groups(model), adapter.linear_names(block), QuantScheme(wbits=4, abits=4),
        cconfig, inputs.hidden, inputs.hidden, targets, inputs.kwargs, torch.device(device),
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    learnable_methods = [m.name for m in methods() if m.resumable]  # the ones with a training loop
    parser.add_argument("--method", default="lrquant+", choices=learnable_methods)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--compile", action="store_true", help="torch.compile the training step (as lrq calibrate --compile)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    args = parser.parse_args()
    torch.manual_seed(0)
    job = make_job(args.device, args.method, args.epochs, args.batch_size, args.compile)
    recipe = get_method(args.method).quantize_block.recipe
    for p in job.block.parameters():
        p.requires_grad_(False)
    params = learnable.init_block_params(job, recipe)
    times = []

    def tick(epoch, loss):
        if args.device == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter(), loss))

    start = time.perf_counter()
    learnable.train_block(job, params, recipe, tick)
    stamps = [start] + [t for t, _ in times]
    per_epoch = [b - a for a, b in zip(stamps, stamps[1:])]
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    shape = SHAPES[args.device]
    print(f"device {name}  method {args.method}{'  compiled' if args.compile else ''}  block hidden {shape['hidden_size']}  "
          f"{shape['nsamples']} x {shape['seqlen']} tokens")
    for epoch, (seconds, (_, loss)) in enumerate(zip(per_epoch, times)):
        print(f"epoch {epoch}: {seconds:.2f} s  loss {loss:.5g}")


if __name__ == "__main__":
    main()
