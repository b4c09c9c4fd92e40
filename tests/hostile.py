"""Hostile inputs shared by the bad-input and crash-safety tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def read_only_directory(path: Path) -> str:
    """A directory no one can create files in: chmod 555, or (as root, whom modes do not stop)
    a directory on a read-only filesystem."""
    path.mkdir()
    path.chmod(0o555)
    if not _writable(path):
        return str(path)
    for candidate in ("/sys", "/proc/sys"):
        if Path(candidate).is_dir() and not _writable(Path(candidate)):
            return candidate
    pytest.skip("no read-only directory can be made on this machine")


def _writable(directory: Path) -> bool:
    try:
        (directory / ".probe").write_text("x")
    except OSError:
        return False
    (directory / ".probe").unlink()
    return True


class PicklePayload:
    """Unpickling this creates a marker directory: proof that a pickle was executed."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


def another_native_library() -> Path:
    """A valid shared library that is not lrq's: onnxruntime's small provider bridge (or, failing
    that, its smallest native file)."""
    import onnxruntime

    found = sorted(Path(onnxruntime.__file__).parent.joinpath("capi").glob("*.so*"), key=lambda p: p.stat().st_size)
    if not found:
        pytest.skip("no shared library found beside onnxruntime")
    return found[0]
