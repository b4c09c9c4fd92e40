#!/usr/bin/env bash
# Every GPU figure in one command, for the rare machine with a GPU:
#   bash benchmarks/gpu_suite.sh [OUT_DIR]     (default: $OUT, else results/gpu-<date>)
# Writes OUT_DIR/{gpu.json,gpu.md} (device, date, versions, the GPU tests' outcome, the kernel
# table with peers, calibration seconds per epoch) plus each step's raw log.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-results/gpu-$(date +%Y%m%d)}}"
mkdir -p "$out"
device="$(python -c 'import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device")')"
echo "device: $device" | tee "$out/device.txt"

python -m pytest -q -m gpu tests > "$out/gpu_tests.log" 2>&1; tests_rc=$?
python benchmarks/kernel_report.py --json "$out/kernel_report.json" --markdown > "$out/kernel_report.md" 2> "$out/kernel_report.log"
python benchmarks/gpu_kernels.py --json "$out/kernels.json" --markdown "$out/kernels.md" > "$out/kernels.log" 2>&1
python benchmarks/calib_speed.py --device cuda --method lrquant+ --epochs 2 > "$out/calib_speed.log" 2>&1
python benchmarks/calib_speed.py --device cuda --method lrquant+ --epochs 3 --compile >> "$out/calib_speed.log" 2>&1

python - "$out" "$device" "$tests_rc" <<'PY'
import json, sys, datetime, pathlib, platform
out, device, rc = pathlib.Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
def read(name):
    path = out / name
    return path.read_text() if path.exists() else ""
summary = {
    "device": device, "date": datetime.date.today().isoformat(), "python": platform.python_version(),
    "gpu_tests": {"exit_code": rc, "summary": (read("gpu_tests.log").strip().splitlines() or [""])[-1]},
    "kernels": json.loads(read("kernels.json") or "{}"),
    "kernel_report": json.loads(read("kernel_report.json") or "[]"),
    "calib_speed": [l for l in read("calib_speed.log").splitlines() if l.startswith(("device", "epoch"))],
}
(out / "gpu.json").write_text(json.dumps(summary, indent=2))
md = [f"# GPU suite: {device}, {summary['date']}", "", f"GPU tests: {summary['gpu_tests']['summary']}", "",
      "## Kernels vs peers", "", read("kernels.md"), "", "## Calibration speed", "", "```", *summary["calib_speed"], "```"]
(out / "gpu.md").write_text("\n".join(md) + "\n")
print(f"wrote {out / 'gpu.json'} and {out / 'gpu.md'}")
PY
exit $tests_rc
