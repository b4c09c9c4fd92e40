"""Low-bit linear kernels vs torch.matmul, measured in one run with CUDA events (GPU only).

For every (M, N, K): our kernel time, the fp16 and bf16 torch.matmul times, the ratio
(baseline / ours, >1 = faster) and what our kernel achieves: GB/s of weight + activation
traffic for weight-only kernels, TOP/s for W4A4.

    python benchmarks/kernels.py [--kernels w4a16 w2a16 w4a4] [--group-size 128] [--out results.json]
"""

from __future__ import annotations

import argparse
import json

import torch

M_VALUES = (1, 16, 128, 2048, 4096)
NK = ((4096, 4096), (11008, 4096), (4096, 11008), (8192, 8192), (28672, 8192))


def cuda_time_ms(fn, warmup: int = 10, reps: int = 50) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def make_weights(n: int, k: int, bits: int, group: int | None):
    from lrq_deploy.quant import pack_codes

    codes = torch.randint(0, 2**bits, (n, k), dtype=torch.uint8, device="cuda")
    groups = k // (group or k)
    scales = torch.rand(n, groups, device="cuda", dtype=torch.float16) * 0.01
    zeros = torch.full((n, groups), 2 ** (bits - 1), dtype=torch.uint8, device="cuda")
    return pack_codes(codes, bits), scales, zeros


def bench_shape(kernel: str, m: int, n: int, k: int, group: int | None) -> dict:
    from lrq_deploy.plugins import ops

    bits = 2 if kernel == "w2a16" else 4
    x = torch.randn(m, k, device="cuda", dtype=torch.float16)
    w16 = torch.randn(k, n, device="cuda", dtype=torch.float16)
    qweight, scales, zeros = make_weights(n, k, bits, None if kernel == "w4a4" else group)
    if kernel == "w4a4":
        ours = lambda: ops.w4a4_linear(x, qweight, scales, zeros, None, 0)  # noqa: E731
    else:
        ours = lambda: ops.weight_only_linear(x, qweight, scales, zeros, None, bits, group or 0)  # noqa: E731
    t_ours = cuda_time_ms(ours)
    t_fp16 = cuda_time_ms(lambda: torch.matmul(x, w16))
    xb, wb = x.bfloat16(), w16.bfloat16()
    t_bf16 = cuda_time_ms(lambda: torch.matmul(xb, wb))
    row = {"kernel": kernel, "M": m, "N": n, "K": k, "ours_ms": t_ours, "fp16_ms": t_fp16, "bf16_ms": t_bf16,
           "speedup_vs_fp16": t_fp16 / t_ours, "speedup_vs_bf16": t_bf16 / t_ours}
    if kernel == "w4a4":
        row["tops"] = 2 * m * n * k / (t_ours * 1e-3) / 1e12
    else:
        traffic = qweight.numel() + scales.numel() * 2 + zeros.numel() + x.numel() * 2 + m * n * 2
        row["gb_per_s"] = traffic / (t_ours * 1e-3) / 1e9
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kernels", nargs="+", default=["w4a16", "w2a16", "w4a4"], choices=["w4a16", "w2a16", "w4a4"])
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--out", default=None, help="also write the rows as JSON")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/kernels.py needs a CUDA GPU")
    print(f"device: {torch.cuda.get_device_name()}  group size {args.group_size}")
    print(f"{'kernel':<7}{'M':>6}{'N':>7}{'K':>7}{'ours ms':>10}{'fp16 ms':>10}{'bf16 ms':>10}{'x fp16':>8}{'x bf16':>8}{'GB/s|TOP/s':>12}")
    rows = []
    for kernel in args.kernels:
        for n, k in NK:
            for m in M_VALUES:
                row = bench_shape(kernel, m, n, k, args.group_size)
                rows.append(row)
                rate = row.get("gb_per_s", row.get("tops"))
                print(f"{kernel:<7}{m:>6}{n:>7}{k:>7}{row['ours_ms']:>10.4f}{row['fp16_ms']:>10.4f}{row['bf16_ms']:>10.4f}"
                      f"{row['speedup_vs_fp16']:>8.2f}{row['speedup_vs_bf16']:>8.2f}{rate:>12.1f}", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
