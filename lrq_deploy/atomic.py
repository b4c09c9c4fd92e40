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
    ancestor = nearest_existing(out.absolute().parent)
    if not ancestor.is_dir():
        raise LrqError(f"cannot create {out}: {ancestor} is not a directory")
    check_writable(ancestor)


TEMPORARY_TAG_BYTES = 40  # what temporary_path adds to a name: ".", ".tmp-", a process id and a tag


def check_name_lengths(path: Path, option: str = "output") -> None:
    """Every component of an output path, with room for its temporary name, within the file
    system's limit (found at the end of a run otherwise, when the first file is written)."""
    where = nearest_existing(Path(path).absolute().parent)
    try:
        limit = os.pathconf(where if where.is_dir() else where.parent, "PC_NAME_MAX")
    except (OSError, ValueError):
        limit = 255
    for part in Path(path).parts:
        if len(part.encode()) + TEMPORARY_TAG_BYTES > limit:
            raise LrqError(f"{option}: the name {part[:40]}... is {len(part.encode())} bytes; this file system allows "
                           f"{limit} (lrq needs {TEMPORARY_TAG_BYTES} more for its temporary name): choose a shorter name")


def nearest_existing(path: Path) -> Path:
    """`path` or its nearest ancestor that exists (where a new output's directories would start)."""
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_free_space(path: Path, need_bytes: int | None, option: str = "output") -> None:
    """Refuse an output whose file system cannot hold `need_bytes` (a lower bound of its size)
    before any work, instead of failing on a full disk after it."""
    if not need_bytes:
        return
    where = nearest_existing(Path(path).absolute().parent)
    free = shutil.disk_usage(where).free
    if free < need_bytes:
        raise LrqError(f"{option} {path}: {where} has {human_size(free)} free, and the output needs at least "
                       f"{human_size(need_bytes)}; free space there or choose another location")


def human_size(nbytes: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes} bytes"


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
                 option: str = "output", lock: bool = True, need_bytes: int | None = None) -> Path:
    """Check `path` as an output of `kind` (module docstring) and lock it for this process
    (lock=False: checked only, for the ranks of a job whose rank 0 writes). need_bytes: a lower
    bound of the output's size, checked against the free space where it goes."""
    path = Path(path)
    if not str(path).strip():
        raise LrqError(f"{option} is empty; name a {'directory' if kind.directory else 'file'}")
    check_name_lengths(path, option)
    check_not_an_input(path, inputs, option)
    if path.exists() or path.is_symlink():
        _check_replaceable(path, kind, force, option)
    if kind.directory:
        check_output_dir(path, force=True)
    else:
        if not path.parent.is_dir():
            raise LrqError(f"output directory {path.parent} does not exist")
        check_writable(path.parent)
    check_free_space(path, need_bytes, option)
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
    ancestor = nearest_existing(Path(target).parent)
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
