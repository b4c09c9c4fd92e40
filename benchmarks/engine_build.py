"""TensorRT engines of the bundled LLaMA per scenario: build time, engine size, plugin layers.

Calibrates (RTN, 2 samples) each scenario, exports `--target trt` and builds one engine for the
named compute capabilities. With TensorRT for RTX this runs on a machine without a GPU.

    python benchmarks/engine_build.py [--sm 89 --sm 120] [--out runs/engine-bench]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from lrq_deploy.calib.api import calibrate
from lrq_deploy.calib.registry import CalibConfig
from lrq_deploy.quant.scheme import QuantScheme
from lrq_deploy.engine import BuildOptions, build_engine
from lrq_deploy.export import export_onnx

SCENARIOS = {
    "W4A16-g64 symmetric (native INT4)": QuantScheme(wbits=4, group_size=64, symmetric=True),
    "W4A16-g64 asymmetric (plugin)": QuantScheme(wbits=4, group_size=64),
    "W2A16-g64 (plugin)": QuantScheme(wbits=2, group_size=64),
    "W4A4 (plugin)": QuantScheme(wbits=4, abits=4),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sm", action="append", default=None, help="target compute capability (repeatable)")
    parser.add_argument("--out", type=Path, default=Path("runs/engine-bench"))
    args = parser.parse_args()
    targets = args.sm or ["89", "120"]
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"{'scenario':36} {'plugins':>8} {'plugin layers':>13} {'engine MB':>10} {'build s':>8}")
    for index, (name, quant) in enumerate(SCENARIOS.items()):
        ckpt, graph = args.out / f"s{index}", args.out / f"s{index}-trt.onnx"
        calibrate("bundled:llama", ckpt, quant, CalibConfig.of(nsamples=2, seqlen=32), device="cpu", force=True)
        export_onnx(ckpt, graph, target="trt")
        start = time.perf_counter()
        report = build_engine(graph, args.out / f"s{index}.engine", BuildOptions(compute_capabilities=targets))
        seconds = time.perf_counter() - start
        layers = report["layers"].get("PLUGIN_V3", 0)
        print(f"{name:36} {report['plugins'] or '-':>8} {layers:>13} {report['bytes'] / 1e6:>10.2f} {seconds:>8.1f}")


if __name__ == "__main__":
    main()
