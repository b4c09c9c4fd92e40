"""Output files and directories: checked before any work starts, written atomically.

Checks run first, so an unwritable or occupied output is reported within seconds, not after
an hour of calibration. Writes go to a hidden temporary name beside the target, which is
renamed into place only when complete: a reader never sees a half-written file, and a failed,
interrupted or killed write leaves nothing at the target path.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterable

from lrq_deploy.errors import LrqError


def temporary_path(path: Path, tag: str = "") -> Path:
    """A hidden name beside `path` that carries this process id (see remove_stale_temporaries)."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}{tag}")


def remove_stale_temporaries(path: Path) -> None:
    """Remove the temporaries of `path` left by processes that were killed (SIGKILL, power loss)."""
    path = Path(path)
    for stale in path.parent.glob(f".{glob.escape(path.name)}.tmp-*"):
        pid = stale.name.rsplit(".tmp-", 1)[1].split("-")[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call write(tmp) for a temporary path next to `path`, then move it into place."""
    path = Path(path)
    remove_stale_temporaries(path)
    tmp = temporary_path(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: Path, data) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2) + "\n"))


def check_output_file(path: Path, force: bool = True, inputs: Iterable[Path] = (), option: str = "output") -> Path:
    """A file output: not a directory, not one of the inputs, in an existing writable directory;
    an existing file is replaced only with force."""
    path = Path(path)
    if path.is_dir():
        raise LrqError(f"{option} {path} is a directory; name a file")
    for source in inputs:
        if Path(source).exists() and path.exists() and path.resolve() == Path(source).resolve():
            raise LrqError(f"{option} {path} is also the input; name another file")
    if path.exists() and not force:
        raise LrqError(f"{option} {path} exists (use --force to overwrite it)")
    if not path.parent.is_dir():
        raise LrqError(f"output directory {path.parent} does not exist")
    check_writable(path.parent)
    return path


def check_output_dir(out: Path, force: bool) -> None:
    """A directory output: absent, empty, or replaced with force; its parents are created on
    write, so the nearest existing ancestor must be a writable directory."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise LrqError(f"output {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise LrqError(f"output directory {out} is not empty (use --force to overwrite it)")
    ancestor = out.absolute().parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise LrqError(f"cannot create {out}: {ancestor} is not a directory")
    check_writable(ancestor)


def check_writable(directory: Path) -> None:
    """Create and remove a file in `directory`: the one test that also holds for root, ACLs and
    read-only mounts (os.access does not)."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".lrq-write-test-", dir=directory)
    except OSError as exc:
        raise LrqError(f"cannot write to {directory} ({exc.strerror}); choose another output location") from None
    os.close(fd)
    os.unlink(probe)


def make_readable(tmp: Path) -> None:
    """mkdtemp and some writers create owner-only files; give them the usual umask-based modes."""
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)
    for file in tmp.rglob("*"):
        file.chmod((0o777 if file.is_dir() else 0o666) & ~umask)


def atomic_directory(target: Path, write: Callable[[Path], None]) -> None:
    """Fill a staging directory beside `target` with write(staging), then put it in target's place
    (replacing what was there); a failed or killed write leaves the target as it was."""
    target = Path(target)
    remove_stale_temporaries(target)
    staging = temporary_path(target, "-dir")
    staging.mkdir(parents=True)
    try:
        write(staging)
        make_readable(staging)
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
