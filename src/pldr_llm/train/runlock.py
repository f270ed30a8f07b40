"""One trainer per run folder, and never a folder that is not a run.

:func:`claim_run_folder` is called by :func:`pldr_llm.train.run.run` before anything is written:

* A folder given to ``--out`` must be new, empty, or a run of this project: it holds ``run.yaml``
  (written once a run is set up) or ``.lock`` (written when a run starts, so that a start that
  failed before ``run.yaml`` can be run again). Anything else -- a model folder, a dataset, a home
  directory -- is refused with one line naming what is there; nothing in it is touched.
* The main process then holds an exclusive ``fcntl.flock`` on ``<out>/.lock`` (which holds its
  PID) for the run's lifetime. A second trainer on the same folder is refused at once, naming the
  holder's PID. The kernel drops the lock when the holder exits however it exits (even on
  ``kill -9``), so a lock file left behind never blocks the next run.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pldr_llm.core.errors import PLDRError
from pldr_llm.core.fileio import io_error_message

__all__ = ["LOCK_FILE", "claim_run_folder", "foreign_entries"]

LOCK_FILE = ".lock"
_RUN_MARKERS = ("run.yaml", LOCK_FILE)
_LISTED = 5  # entries named in the refusal


def foreign_entries(run_dir: Path) -> list[str]:
    """What makes ``run_dir`` not a run folder: its entries (sorted), or ``[]`` if it is new,
    empty, or already a run of this project."""
    if not run_dir.is_dir():
        return []
    names = sorted(entry.name for entry in run_dir.iterdir())
    if not names or any(marker in names for marker in _RUN_MARKERS):
        return []
    return names


def _check_folder(run_dir: Path) -> None:
    found = foreign_entries(run_dir)
    if found:
        shown = ", ".join(found[:_LISTED]) + (
            f" and {len(found) - _LISTED} more" if len(found) > _LISTED else ""
        )
        raise PLDRError(
            f"--out {run_dir} is not a run folder: it holds {shown}; give a new or empty "
            "folder (or a run folder to resume)"
        )


def _lock(run_dir: Path) -> int:
    """Open and lock ``run_dir/.lock`` (main process); returns its descriptor, holding the lock."""
    import fcntl

    path = run_dir / LOCK_FILE
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise PLDRError(f"cannot create the run's lock file: {io_error_message(exc)}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        os.close(fd)
        if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise PLDRError(f"cannot lock {path}: {io_error_message(exc)}") from None
        who = f"process {holder}" if holder.isdigit() else "another process"
        raise PLDRError(
            f"--out {run_dir} is in use by {who} (it holds {path}): wait for that run to end, "
            "or give another folder"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
    return fd


@contextlib.contextmanager
def claim_run_folder(run_dir: Path, env: Any) -> Iterator[None]:
    """Check ``run_dir`` is a run folder and hold its lock for the ``with`` block. Collective:
    the main process decides and every rank raises the same :class:`PLDRError` if it refuses."""
    from pldr_llm.train.distributed import broadcast_object

    fd = None
    refusal = None
    if env.is_main:
        try:
            _check_folder(run_dir)
            fd = _lock(run_dir)
        except PLDRError as exc:
            refusal = str(exc)
    refusal = broadcast_object(refusal)
    if refusal is not None:
        raise PLDRError(refusal)
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)  # releases the flock; the file stays and marks the folder as a run
