"""Progress on stderr for every step that can take more than a few seconds: a bar over counted
work (windows, samples, rounds), a line per uncounted step (tracing, lowering, building).
Shown only when stderr is a terminal and `lrq --quiet` was not given: pipes and logs stay clean."""

from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")
QUIET_ENV = "LRQ_QUIET"  # set by `lrq --quiet`; inherited by the child processes a command starts


def set_quiet(quiet: bool) -> None:
    if quiet:
        os.environ[QUIET_ENV] = "1"
    else:
        os.environ.pop(QUIET_ENV, None)


def shown() -> bool:
    """Whether progress is drawn: stderr is a terminal and quiet is off."""
    if os.environ.get(QUIET_ENV):
        return False
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(isatty and isatty())


def bar(items: Iterable[T], desc: str, total: int | None = None, unit: str = "it") -> Iterator[T]:
    """`items`, with a bar on a terminal (cleared when done)."""
    if not shown():
        yield from items
        return
    from tqdm import tqdm

    yield from tqdm(items, desc=f"  {desc}", total=total, unit=unit, leave=False, file=sys.stderr, **bar_size())


def bar_size() -> dict:
    """tqdm's ncols / nrows from the terminal, 80 x 24 where it reports none: a pseudo-terminal
    nobody sized says 0 x 0, and tqdm then hides every bar (as beyond the last row)."""
    import shutil

    size = shutil.get_terminal_size((80, 24))
    return {"ncols": size.columns or 80, "nrows": size.lines or 24}


@contextmanager
def step(desc: str):
    """One line for an uncounted step: `desc ...` when it starts, its time when it ends."""
    if not shown():
        yield
        return
    start = time.perf_counter()
    print(f"  {desc} ...", end="", file=sys.stderr, flush=True)
    try:
        yield
    except BaseException:
        print(" failed", file=sys.stderr, flush=True)
        raise
    print(f" {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
