"""Output files and directories: claimed before any work starts, written atomically.

`claim_output` is the one rule every command's outputs go through, before any work (so an
unwritable or occupied output is reported within seconds, not after an hour of calibration):
- an output is never an input of the same command, never contains one and never lies inside an
  input directory (writing there would change the input);
- an existing output is replaced only with --force, and --force replaces only an lrq artifact of
  the same kind (a checkpoint by a checkpoint, an lrq ONNX graph by a graph, ...), never a file
  or directory lrq did not write;
- the output is locked for the rest of the process: a second lrq process writing the same
  output is refused, not raced.
Writes go to a hidden temporary name beside the target, which is renamed into place only when
complete: a reader never sees a half-written file, and a failed, interrupted or killed write
leaves nothing at the target path.
"""

from __future__ import annotations

import atexit
import glob
import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
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


@dataclass(frozen=True)
class OutputKind:
    """What an output is: its name in messages, whether it is a directory, and how an existing
    path is recognised as an lrq artifact of this kind (what --force may replace)."""

    name: str
    directory: bool
    recognise: Callable[[Path], bool]


def claim_output(path: Path, kind: OutputKind, force: bool = False, inputs: Iterable = (),
                 option: str = "output", lock: bool = True) -> Path:
    """Check `path` as an output of `kind` (module docstring) and lock it for this process
    (lock=False: checked only, for the ranks of a job whose rank 0 writes)."""
    path = Path(path)
    if not str(path).strip():
        raise LrqError(f"{option} is empty; name a {'directory' if kind.directory else 'file'}")
    check_not_an_input(path, inputs, option)
    if path.exists() or path.is_symlink():
        _check_replaceable(path, kind, force, option)
    if kind.directory:
        check_output_dir(path, force=True)
    else:
        if not path.parent.is_dir():
            raise LrqError(f"output directory {path.parent} does not exist")
        check_writable(path.parent)
    if lock:
        lock_output(path)
    return path


def check_distinct_outputs(outputs: dict) -> None:
    """Outputs of one command ({option: path}) must not be, or lie inside, one another."""
    resolved = {option: Path(os.path.abspath(p)).resolve() for option, p in outputs.items() if p is not None}
    items = list(resolved.items())
    for i, (a, path_a) in enumerate(items):
        for b, path_b in items[i + 1:]:
            if path_a == path_b or path_a.is_relative_to(path_b) or path_b.is_relative_to(path_a):
                raise LrqError(f"{a} {outputs[a]} and {b} {outputs[b]} overlap; give each output its own place")


def check_not_an_input(path: Path, inputs: Iterable, option: str = "output") -> None:
    """Refuse an output that is an input, contains one, or lies inside an input directory."""
    target = Path(os.path.abspath(path)).resolve()
    for source in inputs:
        if source is None or not Path(str(source)).exists():
            continue  # a named model (bundled:llama, pypi:...) is not a path
        src = Path(str(source)).resolve()
        if target == src:
            raise LrqError(f"{option} {path} is the input {source}; name another output")
        if src.is_relative_to(target):
            raise LrqError(f"{option} {path} contains the input {source}; writing it would destroy the input")
        if src.is_dir() and target.is_relative_to(src):
            raise LrqError(f"{option} {path} lies inside the input {source}; writing there would change the input")


def _check_replaceable(path: Path, kind: OutputKind, force: bool, option: str) -> None:
    if kind.directory and not path.is_dir():
        raise LrqError(f"{option} {path} exists and is not a directory")
    if not kind.directory and path.is_dir():
        raise LrqError(f"{option} {path} is a directory; name a file")
    if kind.directory and not any(path.iterdir()):
        return  # an empty directory holds nothing to lose
    if not force:
        what = "is not empty" if kind.directory else "exists"
        raise LrqError(f"{option} {path} {what} (use --force to overwrite it)")
    if not kind.recognise(path):
        raise LrqError(f"{option} {path} is not an lrq {kind.name}; --force replaces only an lrq {kind.name} "
                       "(lrq never overwrites what it did not write): choose another output")


_LOCKS: dict[str, tuple[int, Path]] = {}


def lock_output(path: Path) -> None:
    """Hold an exclusive lock on `path` as an output until this process ends. The lock file sits
    in the nearest existing directory above the output (hidden, removed at exit; a killed
    process's lock is released by the kernel)."""
    import fcntl

    target = os.path.abspath(path)
    if target in _LOCKS:
        return
    ancestor = Path(target).parent
    while not ancestor.is_dir():
        ancestor = ancestor.parent
    digest = hashlib.sha1(target.encode()).hexdigest()[:16]
    lock = ancestor / f".lrq-lock-{Path(target).name[:40]}-{digest}"
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise LrqError(f"cannot write to {ancestor} ({exc.strerror}); choose another output location") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip()
            os.close(fd)
            raise LrqError(f"another lrq process{f' (pid {holder})' if holder else ''} is writing {path}; "
                           "wait for it to finish or choose another output") from None
        if _same_file(fd, lock):
            break
        os.close(fd)  # the holder released and removed the file between our open and lock: take the new one
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    _LOCKS[target] = (fd, lock)


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


@atexit.register
def release_outputs(keys: Iterable[str] | None = None) -> None:
    """Release the output locks named by `keys` (default: all this process holds)."""
    for key in list(_LOCKS if keys is None else keys):
        fd, lock = _LOCKS.pop(key)
        try:
            lock.unlink(missing_ok=True)
        finally:
            os.close(fd)


@contextmanager
def output_scope():
    """Outputs claimed inside are unlocked when the scope ends (a command, or one library call:
    calibrate, export_onnx, build_engine, ...); also usable as a decorator."""
    held = set(_LOCKS)
    try:
        yield
    finally:
        release_outputs([key for key in _LOCKS if key not in held])


def is_json_of(path: Path, key: str, value: str) -> bool:
    """Whether `path` is a JSON object whose `key` is `value` (how lrq recognises its records)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.get(key) == value
