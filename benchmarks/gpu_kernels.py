"""Low-bit linear layers on the GPU against their peers, measured in one run (GPU only).

For every (M, N, K): our routes (whatever the dispatch table picks: gemv / gemm / dequantize +
cuBLAS / int_gemm) for W4A16, W2A16, W4A4 and W8A8, next to fp16 and bf16 cuBLAS, torch's
tinygemm INT4 kernel (`aten._weight_int4pack_mm`), gemlite when installed, cuBLASLt INT8
(`torch._int_mm`) and FP8 (`torch._scaled_mm`). Times come from CUDA graphs (eager when a
graph cannot be captured); each row prints the H100 traffic-model floor and the ratio
fp16 time / ours (> 1 = faster than not quantizing).

    python benchmarks/gpu_kernels.py [--m 1 4 16] [--shapes 4096x4096 ...] [--json rows.json] [--markdown]
"""

from __future__ import annotations

import argparse
import json
from datetime import date

import torch

M_VALUES = (1, 4, 16, 64, 256, 1024, 4096)
SHAPES = ((4096, 4096), (14336, 4096), (4096, 14336), (8192, 8192), (28672, 8192))  # N x K
GROUP = 128


def graph_time_us(fn, reps: int = 50) -> float:
    """Mean time of fn() replayed from a CUDA graph (eager when capture fails)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        run = graph.replay
    except Exception:  # noqa: BLE001 - kernels that cannot be captured are timed eagerly
        run = fn
    for _ in range(5):
        run()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        run()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000 / reps


def _weights(n: int, k: int, bits: int, group: int | None):
    from lrq_deploy.quant import pack_codes

    codes = torch.randint(0, 2 ** min(bits, 8), (n, k), dtype=torch.uint8, device="cuda")
    groups = k // (group or k)
    scales = torch.rand(n, groups, device="cuda", dtype=torch.float16) * 0.01 + 1e-3
    zeros = torch.full((n, groups), 2 ** (bits - 1), dtype=torch.uint8, device="cuda")
    return pack_codes(codes, bits), scales, zeros, codes


def ours(kind: str, x: torch.Tensor, n: int, k: int):
    from lrq_deploy.plugins import ops

    if kind == "w4a16":
        q, s, z, _ = _weights(n, k, 4, GROUP)
        return lambda: ops.weight_only_linear(x, q, s, z, None, 4, GROUP)
    if kind == "w2a16":
        q, s, z, _ = _weights(n, k, 2, GROUP)
        return lambda: ops.weight_only_linear(x, q, s, z, None, 2, GROUP)
    if kind == "w4a4":
        q, s, z, _ = _weights(n, k, 4, None)
        return lambda: ops.integer_linear(x, q, s, z, None, 4, 4, k)
    q, s, z, _ = _weights(n, k, 8, None)
    return lambda: ops.integer_linear(x, q, s, z, None, 8, 8, k)


def peers(x: torch.Tensor, n: int, k: int) -> dict:
    """Baselines and peer kernels for one (M, N, K); a peer that cannot run here is skipped."""
    m = x.shape[0]
    w16 = torch.randn(n, k, device="cuda", dtype=torch.float16)
    xb, wb = x.bfloat16(), w16.bfloat16()
    out = {"fp16": lambda: torch.nn.functional.linear(x, w16), "bf16": lambda: torch.nn.functional.linear(xb, wb)}
    try:  # torch tinygemm (torchao's int4 path): bf16 activations, [K/group, N, 2] scales and zeros
        codes = torch.randint(0, 16, (n, k // 2), dtype=torch.uint8, device="cuda")
        packed = torch.ops.aten._convert_weight_to_int4pack(codes, 8)
        sz = torch.rand(k // GROUP, n, 2, device="cuda", dtype=torch.bfloat16)
        torch.ops.aten._weight_int4pack_mm(xb, packed, GROUP, sz)
        out["tinygemm_w4"] = lambda: torch.ops.aten._weight_int4pack_mm(xb, packed, GROUP, sz)
    except Exception:  # noqa: BLE001
        pass
    if m > 16:
        a8, b8 = torch.randint(-8, 8, (m, k), dtype=torch.int8, device="cuda"), torch.randint(-8, 8, (k, n), dtype=torch.int8, device="cuda").t().contiguous().t()
        out["int_mm"] = lambda: torch._int_mm(a8, b8)
    if m % 16 == 0 and hasattr(torch, "float8_e4m3fn"):
        try:
            af, bf = x.to(torch.float8_e4m3fn), w16.to(torch.float8_e4m3fn).t()
            one = torch.ones((), device="cuda")
            torch._scaled_mm(af, bf, one, one, out_dtype=torch.bfloat16)
            out["fp8_scaled_mm"] = lambda: torch._scaled_mm(af, bf, one, one, out_dtype=torch.bfloat16)
        except Exception:  # noqa: BLE001
            pass
    try:
        from gemlite.helper import A16W4  # noqa: F401 - optional peer

        out.update(_gemlite(x, n, k))
    except Exception:  # noqa: BLE001
        pass
    return out


def _gemlite(x, n, k) -> dict:
    from gemlite.core import DType, GemLiteLinear

    result = {}
    for bits in (4, 2):
        layer = GemLiteLinear(bits, group_size=GROUP, in_features=k, out_features=n, input_dtype=DType.FP16, output_dtype=DType.FP16)
        w = torch.randint(0, 2**bits, (n, k), dtype=torch.uint8, device="cuda")
        scales = torch.rand(n, k // GROUP, device="cuda", dtype=torch.float16)
        zeros = torch.full((n, k // GROUP), 2 ** (bits - 1), device="cuda", dtype=torch.float16)
        layer.pack(w, scales, zeros, None)
        result[f"gemlite_w{bits}"] = lambda layer=layer: layer(x)
    return result


def bench(kinds, m_values, shapes) -> list[dict]:
    from lrq_deploy.plugins import dispatch, report
    from lrq_deploy.quant.scheme import KernelFamily

    rows = []
    for n, k in shapes:
        for m in m_values:
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            baseline = {name: graph_time_us(fn) for name, fn in peers(x, n, k).items()}
            for kind in kinds:
                bits = 2 if kind == "w2a16" else 8 if kind == "w8a8" else 4
                family = KernelFamily.WEIGHT_ONLY if kind.endswith("a16") else KernelFamily.INTEGER
                route = dispatch.route_for(family, m)
                t = graph_time_us(ours(kind, x, n, k))
                group = GROUP if family is KernelFamily.WEIGHT_ONLY else k
                rows.append({"kind": kind, "route": route, "M": m, "N": n, "K": k, "ours_us": t,
                             "floor_us": report.floor_us(route, m, n, k, bits, group), **{f"{p}_us": v for p, v in baseline.items()},
                             "x_fp16": baseline["fp16"] / t, "x_bf16": baseline["bf16"] / t})
                print(_line(rows[-1]), flush=True)
    return rows


def _line(r: dict) -> str:
    peers_text = " ".join(f"{key[:-3]} {r['fp16_us'] / r[key]:.2f}x" for key in r if key.endswith("_us") and key not in ("ours_us", "floor_us", "fp16_us"))
    return (f"{r['kind']:<6} {r['route']:<10} M={r['M']:<5} {r['N']}x{r['K']:<6} ours {r['ours_us']:9.1f} us  floor {r['floor_us']:8.1f} us  "
            f"vs fp16 {r['x_fp16']:5.2f}x | peers vs fp16: {peers_text}")


def markdown(rows: list[dict]) -> str:
    lines = ["| kind | route | M | N x K | ours (us) | floor (us) | ours vs fp16 | tinygemm W4 | gemlite W4 | int_mm | fp8 |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    ratio = lambda r, key: f"{r['fp16_us'] / r[key]:.2f}" if key in r else "-"  # noqa: E731
    for r in rows:
        lines.append(f"| {r['kind']} | {r['route']} | {r['M']} | {r['N']}x{r['K']} | {r['ours_us']:.1f} | {r['floor_us']:.1f} | "
                     f"{r['x_fp16']:.2f} | {ratio(r, 'tinygemm_w4_us')} | {ratio(r, 'gemlite_w4_us')} | {ratio(r, 'int_mm_us')} | {ratio(r, 'fp8_scaled_mm_us')} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kinds", nargs="+", default=["w4a16", "w2a16", "w4a4", "w8a8"], choices=["w4a16", "w2a16", "w4a4", "w8a8"])
    parser.add_argument("--m", nargs="+", type=int, default=list(M_VALUES))
    parser.add_argument("--shapes", nargs="+", default=[f"{n}x{k}" for n, k in SHAPES], help="N x K")
    parser.add_argument("--json", dest="json_path", help="write the rows (and the device) as JSON")
    parser.add_argument("--markdown", help="write a markdown table to this file")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/gpu_kernels.py needs a CUDA GPU")
    device = torch.cuda.get_device_name()
    print(f"device: {device}  date: {date.today()}  group size {GROUP}")
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes]
    rows = bench(args.kinds, args.m, shapes)
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump({"device": device, "date": str(date.today()), "torch": torch.__version__, "rows": rows}, f, indent=2)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(f"{device}, {date.today()}, torch {torch.__version__}\n\n{markdown(rows)}\n")


if __name__ == "__main__":
    main()
