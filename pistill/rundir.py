"""Run folders: one writer at a time (a kernel lock), folders created with clear errors, stale temporaries removed."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

from .errors import OutputError

log = logging.getLogger(__name__)

LOCK = ".pistill.lock"  # in the run folder: holds the writer's PID; flock'd while it runs
_TMP_PID = re.compile(r"\.tmp-(\d+)")  # `.<name>.tmp-<pid>...`: a temporary written by process <pid>


def make_dir(path: Path) -> Path:
    """Create a folder and its parents; OutputError naming the file in the way or the refused permission."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        block = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), path)
        raise OutputError(f"cannot create folder {path}: {block} is a file; choose another --out") from None
    except PermissionError:
        raise OutputError(f"cannot create folder {path}: permission denied; choose another --out") from None
    return path


@contextlib.contextmanager
def locked(run_dir: Path) -> Iterator[Path]:
    """Hold the run folder's lock (fcntl.flock, released by the kernel when the process ends, however it ends).

    OutputError naming the holder's PID when another process holds it.
    """
    import fcntl

    path = make_dir(run_dir) / LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise OutputError(f"{run_dir} is in use by another pistill process (PID {holder}); wait for it to "
                              "finish or choose another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield Path(run_dir)
    finally:
        os.close(fd)  # releases the lock


def pid_alive(pid: int) -> bool:
    """Whether a process with this PID exists on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by someone else
        return True
    return True


def clean_stale(folder: Path, pattern: str) -> list[Path]:
    """Remove temporaries matching `pattern` in `folder` whose writer (the PID in their name) is gone; keep a live
    writer's, and our own (the caller may be using it). The removed paths."""
    removed = []
    for path in Path(folder).glob(pattern) if Path(folder).is_dir() else ():
        m = _TMP_PID.search(path.name)
        if m is None or int(m.group(1)) == os.getpid() or pid_alive(int(m.group(1))):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        log.info("removed %s, left by a process that is gone (PID %s)", path, m.group(1))
        removed.append(path)
    return removed
