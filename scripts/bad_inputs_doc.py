"""Write docs/BAD_INPUTS.md: every case of tests/test_bad_inputs.py with the one line it prints.

    python scripts/bad_inputs_doc.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEADER = """# Bad input: what each command says

Every case below runs through the real CLI in `tests/test_bad_inputs.py` (CI runs it). Each ends
with a non-zero exit status and exactly one line on stderr (a traceback only with
`lrq --debug ...`), and leaves the directory it ran in exactly as it was. `.` is the case's
directory, `./tiny-llama` a small HF LLaMA directory, `./ckpt` and `./model.onnx` a W4A16
checkpoint and its graph (damaged as the case says). Regenerate with
`python scripts/bad_inputs_doc.py`.

| case | command | message |
|---|---|---|
"""


def main() -> int:
    with tempfile.TemporaryDirectory() as scratch:
        log = Path(scratch) / "cases.jsonl"
        env = {**os.environ, "LRQ_BAD_INPUTS_LOG": str(log)}
        subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_bad_inputs.py::test_bad_input"], cwd=ROOT, env=env, check=True)
        entries = [json.loads(line) for line in log.read_text().splitlines()]
    rows = [f"| `{e['id']}` | `{e['command']}` | {e['message'].removeprefix('error: ').replace('|', '/')} |" for e in entries]
    (ROOT / "docs" / "BAD_INPUTS.md").write_text(HEADER + "\n".join(rows) + "\n")
    print(f"wrote docs/BAD_INPUTS.md ({len(rows)} cases)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
