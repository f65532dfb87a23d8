"""Run folders: one writer at a time (a kernel lock), folders created with clear errors, stale temporaries removed."""

from __future__ import annotations

import atexit
import contextlib
import errno
import logging
import os
import re
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path

from .errors import OutputError

log = logging.getLogger(__name__)

LOCK = ".pistill.lock"  # in the run folder: holds the writer's PID; flock'd while it runs
_TMP_PID = re.compile(r"\.tmp-(\d+)")  # `.<name>.tmp-<pid>...`: a temporary written by process <pid>


def make_dir(path: Path, fix: str = "choose another --out") -> Path:
    """Create a folder and its parents; OutputError naming the file in the way or the refused permission, and
    `fix` (what the user changes to put the folder elsewhere)."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        block = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), path)
        raise OutputError(f"cannot create folder {path}: {block} is a file; {fix}") from None
    except PermissionError:
        raise OutputError(f"cannot create folder {path}: permission denied; {fix}") from None
    return path


@contextlib.contextmanager
def locked(run_dir: Path) -> Iterator[Path]:
    """Hold the run folder's lock (fcntl.flock, released by the kernel when the process ends, however it ends).

    OutputError naming the holder's PID when another process holds it. The lock file is opened without following
    links and must be a regular file of ours with one name: a link planted in a shared run folder cannot make
    pistill write its PID into another file.
    """
    import fcntl

    path = make_dir(run_dir) / LOCK
    fd = open_own(path, os.O_RDWR | os.O_CREAT)
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


def open_own(path: Path, flags: int, mode: int = 0o644) -> int:
    """os.open without following a link at `path`, refusing (OutputError, nothing written) anything but a regular
    file owned by this user with a single name (a hard link to someone's file would be written through)."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), mode)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise OutputError(f"{path} is a symbolic link; pistill writes only its own files there: remove the "
                              "link and rerun") from None
        raise OutputError(f"cannot open {path} ({e.strerror}); check the folder's permissions") from None
    st = os.fstat(fd)
    why = ("not a regular file" if not stat.S_ISREG(st.st_mode) else
           f"owned by another user (uid {st.st_uid})" if st.st_uid != os.geteuid() else
           f"a hard link with {st.st_nlink} names" if st.st_nlink > 1 else "")
    if why:
        os.close(fd)
        raise OutputError(f"{path} is {why}; pistill writes only its own files there: remove it and rerun")
    return fd


def atomic_write(path: Path, data: str | bytes) -> Path:
    """Write a file whole or not at all: a temporary beside it (created anew, never through a link someone put
    there), fsynced, then renamed over `path` (which replaces a link at `path`, never writes through it)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)  # ours from an earlier write, or planted: unlinking a link touches only the link
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), 0o644)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def pid_alive(pid: int) -> bool:
    """Whether a process with this PID exists on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by someone else
        return True
    return True


def clean_stale(folder: Path, pattern: str, level: int = logging.INFO) -> list[Path]:
    """Remove temporaries matching `pattern` in `folder` whose writer (the PID in their name) is gone; keep a live
    writer's, and our own (the caller may be using it); each removal logged at `level`. The removed paths."""
    removed = []
    for path in Path(folder).glob(pattern) if Path(folder).is_dir() else ():
        m = _TMP_PID.search(path.name)
        if m is None or int(m.group(1)) == os.getpid() or pid_alive(int(m.group(1))):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        log.log(level, "removed %s, left by a process that is gone (PID %s)", path, m.group(1))
        removed.append(path)
    return removed


def check_free(folder: Path, needed: int, what: str) -> None:
    """OutputError before writing `what` (about `needed` bytes) into `folder` when its disk has less free, naming
    the folder and both sizes. The nearest existing parent is measured (the folder may not exist yet)."""
    folder = Path(folder)
    where = next((p for p in (folder, *folder.parents) if p.exists()), Path("/"))
    free = shutil.disk_usage(where).free
    if free < needed:
        raise OutputError(f"{what} needs about {_gb(needed)} free in {folder}, but its disk has {_gb(free)}; "
                          "free some space or choose another --out")


def _gb(n: int) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.0f} MB"


def no_space(e: BaseException, folder: Path) -> OutputError | None:
    """An OutputError naming `folder` and its free space when `e` (an OSError or a library's wrapper of one, such
    as safetensors' SafetensorError) means the disk is full; None otherwise."""
    full = isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT) or "No space left" in str(e)
    if not full:
        return None
    where = next((p for p in (Path(folder), *Path(folder).parents) if p.exists()), Path("/"))
    return OutputError(f"no space left on the disk of {folder} ({_gb(shutil.disk_usage(where).free)} free); free "
                       "some space or choose another --out, then rerun")


SCRATCH = "pistill-*.tmp-*"  # in the temp folder: `pistill-<prefix>.tmp-<pid>-<random>` folders, and the ledgers
LEDGER = "pistill-temporaries.tmp-{pid}"  # in the temp folder: the temporaries process <pid> made elsewhere


def scratch(prefix: str, parent: Path | None = None):
    """A fresh folder `pistill-<prefix>.tmp-<pid>-<random>` in `parent` (default: the temp folder, $TMPDIR or
    /tmp), as a `tempfile.TemporaryDirectory`: `with scratch("x") as tmp` (tmp: its path, a str) removes it when
    the block ends, however it ends short of SIGKILL. What killed processes left there is removed first; a
    SIGKILLed run's scratch goes at the next pistill process that calls this or `clean_scratch`."""
    import tempfile

    folder = Path(parent) if parent is not None else Path(tempfile.gettempdir())
    clean_scratch(folder)
    return tempfile.TemporaryDirectory(prefix=f"pistill-{prefix}.tmp-{os.getpid()}-", dir=folder)


def track(path: Path) -> None:
    """Note a temporary this process makes outside the temp folder (named `<name>.tmp-<pid>`, as ArtifactWriter's
    beside a one-off --out), so `clean_scratch` removes it, and its `.old` sibling, once this process is gone.
    A temp folder that takes no ledger costs only that clean-up: a warning, and the stage goes on."""
    import tempfile

    ledger = Path(tempfile.gettempdir()) / LEDGER.format(pid=os.getpid())
    try:
        fd = open_own(ledger, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    except OutputError as e:
        log.warning("%s; a killed run's %s will not be removed by the next one", e, path)
        return
    try:
        os.write(fd, f"{os.path.abspath(path)}\n".encode())
    finally:
        os.close(fd)
    if ledger not in _LEDGERS:  # a normal exit removes it; only a killed process leaves it for clean_scratch
        _LEDGERS.add(ledger)
        atexit.register(_drop_ledger, ledger, os.getpid())


_LEDGERS: set[Path] = set()


def _drop_ledger(ledger: Path, pid: int) -> None:
    if os.getpid() == pid:  # not in a forked child that exits normally: the ledger is its parent's
        ledger.unlink(missing_ok=True)


def clean_scratch(folder: Path | None = None) -> list[Path]:
    """Remove what pistill processes that are gone left behind: their scratch folders in `folder` (default: the
    temp folder) and the temporaries their ledgers there name (see `track`), wherever those lie. Only this user's
    entries are touched, and only those named with the PID of a process that is gone. The removed paths."""
    import glob
    import tempfile

    tmp = Path(folder) if folder is not None else Path(tempfile.gettempdir())
    removed = []
    for ledger in _own(tmp.glob(LEDGER.format(pid="*"))):
        if _gone(ledger):
            removed += _clean_noted(ledger)
    for path in _own(tmp.glob(SCRATCH)):  # the folders, and the ledgers just read
        removed += clean_stale(tmp, glob.escape(path.name), logging.DEBUG)  # stderr stays one line per command
    return removed


def _clean_noted(ledger: Path) -> list[Path]:
    """Remove the temporaries a dead process's ledger names (`.x.tmp-<pid>`, and `.x.tmp-<pid>.old` beside it)."""
    import glob

    try:
        lines = ledger.read_text(errors="replace").splitlines()
    except OSError:  # removed meanwhile by another cleaner
        return []
    removed = []
    for noted in map(Path, lines):
        if noted.is_absolute() and _TMP_PID.search(noted.name):  # clean_stale checks each match's own PID
            removed += clean_stale(noted.parent, glob.escape(noted.name) + "*", logging.DEBUG)
    return removed


def _own(paths) -> list[Path]:
    """Those of `paths` this user owns (a shared /tmp holds other users' scratch, which is theirs to remove)."""
    owned = []
    for p in paths:
        with contextlib.suppress(OSError):  # removed meanwhile by another cleaner
            if p.lstat().st_uid == os.geteuid():
                owned.append(p)
    return owned


def _gone(path: Path) -> bool:
    """Whether the process whose PID names this temporary has ended (never this process)."""
    m = _TMP_PID.search(path.name)
    return m is not None and int(m.group(1)) != os.getpid() and not pid_alive(int(m.group(1)))
