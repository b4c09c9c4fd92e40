"""Child process of `lrq build-engine`: reads a JSON request on stdin, builds, writes a JSON report.

Run by lrq_deploy.engine.build; errors are printed as one `error: ...` line on stderr.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from lrq_deploy.engine.builder import build_in_this_process
from lrq_deploy.engine.requirements import BuildOptions
from lrq_deploy.errors import LrqError


def _options(raw: dict) -> BuildOptions:
    raw = dict(raw)
    raw["shapes"] = {name: tuple(tuple(dims) for dims in triple) for name, triple in raw["shapes"].items()}
    raw["timing_cache"] = Path(raw["timing_cache"]) if raw["timing_cache"] else None
    return BuildOptions(**raw)


def main() -> int:
    request = json.loads(sys.stdin.read())
    try:
        report = build_in_this_process(Path(request["onnx"]), Path(request["out"]), _options(request["options"]),
                                       request["flavour"], request["requirements"])
    except LrqError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    Path(request["report"]).write_text(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
