#!/usr/bin/env bash
# sha256 of the artifacts the README's commands and the bundled scenarios produce: run it before
# and after a change that must not alter outputs, then diff the two lists.
#   bash scripts/artifact_hashes.sh OUT_DIR > hashes.txt
# Manifests and verification records are hashed without their time stamps and library
# versions (the only fields that differ between two runs of the same code).
set -euo pipefail
out=${1:?usage: artifact_hashes.sh OUT_DIR}
mkdir -p "$out"
export PYTHONHASHSEED=0 OMP_NUM_THREADS=1

scenario() {  # name, calibrate options...
    local name=$1; shift
    lrq calibrate -o "$out/$name" --force "$@" >/dev/null
    lrq export "$out/$name" --onnx "$out/$name.onnx" --target ort --force >/dev/null
    lrq export "$out/$name" --onnx "$out/$name-trt.onnx" --target trt --force >/dev/null
    lrq build-engine "$out/$name-trt.onnx" -o "$out/$name.engine" --sm 89 --force >/dev/null \
        || echo "$name: no engine" >&2
}

scenario readme                                    # the README's first command (rtn W4A16)
scenario rtn-w4a16-g64 --method rtn --wbits 4 --group-size 64
scenario rtn-w4sym-g64 --method rtn --wbits 4 --group-size 64 --symmetric
scenario lrqplus-w4a4 --method lrquant+ --wbits 4 --abits 4 --act-sym --epochs 2 --nsamples 8
scenario rtn-w2a16 --method rtn --wbits 2 --group-size 64
scenario lrquant-w4a4-asym --method lrquant --wbits 4 --abits 4 --act-asym --epochs 2 --nsamples 8

python - "$out" <<'PY'
import hashlib, json, sys
from pathlib import Path

VOLATILE = {"created", "versions", "library_versions", "time", "date", "built", "seconds"}

def scrub(value):
    if isinstance(value, dict):
        return {k: scrub(v) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [scrub(v) for v in value]
    return value

root = Path(sys.argv[1])
for path in sorted(p for p in root.rglob("*") if p.is_file() and ".run" not in p.parts[-2]):
    data = path.read_bytes()
    if path.suffix == ".json":
        data = json.dumps(scrub(json.loads(data)), sort_keys=True).encode()
    print(hashlib.sha256(data).hexdigest(), path.relative_to(root))
PY
