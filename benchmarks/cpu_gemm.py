"""One linear layer on the CPU, onnxruntime sessions side by side, interleaved in one run: lrq's
MatMulInt4 (lrq export --cpu-kernels) against onnxruntime's MatMulNBits on the same 4-bit codes
and scales, each at accuracy level 1 (fp32 activations) and 4 (int8 activations per block), and
an fp32 MatMul of the dequantized weight (the full-precision baseline). LLaMA-7B shapes by default (q/k/v fused, o, gate/up fused, down, the
vocab-32000 head), decode (1 row of A) and prefill (64 rows).

    python benchmarks/cpu_gemm.py --threads 1 --rounds 3

Prints milliseconds (median over the rounds of each round's median) and each one's speed
relative to MatMulNBits at accuracy level 1.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

SHAPES = {"qkv": (4096, 12288), "o": (4096, 4096), "gate_up": (4096, 22016), "down": (11008, 4096),
          "head": (4096, 32000)}
BLOCK = 128
COLUMNS = ("lrq MatMulInt4 acc 1", "MatMulNBits acc 1", "fp32 MatMul", "lrq MatMulInt4 acc 4", "MatMulNBits acc 4")


def graphs(K: int, N: int) -> dict:
    from onnx import TensorProto, helper, numpy_helper

    from lrq_deploy.runtime.cpu_kernels import DOMAIN, OP

    rng = np.random.default_rng(0)
    codes = rng.integers(0, 256, (N, K // BLOCK, BLOCK // 2), dtype=np.uint8)
    scales = (rng.random(N * (K // BLOCK), dtype=np.float32) * 0.01 + 1e-3).astype(np.float32)
    weights = [numpy_helper.from_array(codes, "B"), numpy_helper.from_array(scales, "scales")]
    nodes = {
        **{f"lrq MatMulInt4 acc {level}": helper.make_node(OP, ["A", "B", "scales"], ["Y"], domain=DOMAIN, K=K, N=N,
                                                            block_size=BLOCK, accuracy_level=level)
           for level in (1, 4)},
        **{f"MatMulNBits acc {level}": helper.make_node("MatMulNBits", ["A", "B", "scales"], ["Y"], domain="com.microsoft",
                                                         K=K, N=N, bits=4, block_size=BLOCK, accuracy_level=level)
           for level in (1, 4)},
    }
    values = np.stack([codes & 15, codes >> 4], -1).reshape(N, K // BLOCK, BLOCK).astype(np.float32) - 8
    dense = (values * scales.reshape(N, -1, 1)).reshape(N, K).T.copy()
    out = {}
    io = ([helper.make_tensor_value_info("A", TensorProto.FLOAT, ["M", K])],
          [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", N])])
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1), helper.make_opsetid(DOMAIN, 1)]
    for name, node in nodes.items():
        out[name] = helper.make_model(helper.make_graph([node], name, *io, initializer=weights), opset_imports=opsets)
    fp32 = helper.make_node("MatMul", ["A", "W"], ["Y"])
    out["fp32 MatMul"] = helper.make_model(helper.make_graph([fp32], "fp32", *io, initializer=[numpy_helper.from_array(dense, "W")]),
                                           opset_imports=opsets[:1])
    return out


def session(model, threads: int):
    import onnxruntime as ort

    from lrq_deploy.runtime import cpu_kernels

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    cpu_kernels.register(options)
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def median_ms(run, a, repeats: int) -> float:
    for _ in range(3):
        run(a)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run(a)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--shapes", nargs="*", default=list(SHAPES), choices=list(SHAPES))
    args = parser.parse_args()
    print(f"| layer (K x N) | rows of A | {' | '.join(COLUMNS)} |")
    print("|---|---|" + "---|" * len(COLUMNS))
    for shape in args.shapes:
        K, N = SHAPES[shape]
        sessions = {name: session(model, args.threads) for name, model in graphs(K, N).items()}
        for rows in (1, 64):
            a = np.random.default_rng(rows).standard_normal((rows, K)).astype(np.float32)
            results = {name: [] for name in sessions}
            for _ in range(args.rounds):
                for name, s in sessions.items():
                    results[name].append(median_ms(lambda x, s=s: s.run(None, {"A": x}), a, 30 if rows == 1 else 5))
            ms = {name: statistics.median(v) for name, v in results.items()}
            base = ms["MatMulNBits acc 1"]
            cells = [f"{ms[n]:.2f} ms ({base / ms[n]:.2f}x)" for n in COLUMNS]
            print(f"| {shape} ({K} x {N}) | {rows} | {' | '.join(cells)} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
