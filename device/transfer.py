"""Content-addressed uploads over SFTP into `<cache>/blobs/<sha256>` on the device: skip, resume, verify, rename.

A blob is written to `<sha256>.part` (appending from the partial's size when an earlier upload was cut off), hashed
on the device, and renamed to its final name only when the hash matches, so a finished name is always whole. A blob
already there is hashed on the device before it is trusted (an SD card can rot, a user can edit it); a damaged one is
uploaded again. Folders (ONNX, Hugging Face) become `<cache>/trees/<tree hash>/`: hard links to their blobs under
their own names, laid out again whenever a blob was (re)sent.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from pistill.artifact import sha256_file

from .probe import DF, parse_df
from .target import Connection, Interrupted, TargetError, last_line

log = logging.getLogger(__name__)

CACHE = "~/.cache/pistill"  # default cache root on the device
CHUNK = 1 << 20  # bytes per write (paramiko splits it into SFTP requests)
COMMAND_TIMEOUT_S = 60  # mkdir, df, linking
HASH_TIMEOUT_S = 900  # sha256 of a multi-GB model on an SD card
PY_SHA256 = ("import hashlib,sys\nh=hashlib.sha256()\nwith open(sys.argv[1],'rb') as f:\n"
             "    for b in iter(lambda: f.read(1<<20), b''): h.update(b)\nprint(h.hexdigest())")
LINK_TREE = ('set -e; t=$1; shift; rm -rf "$t"; mkdir -p "$t"; while [ $# -gt 0 ]; do '
             'mkdir -p "$t/$(dirname "$2")"; ln -f "$1" "$t/$2" 2>/dev/null || cp "$1" "$t/$2"; shift 2; done')


class TransferError(TargetError):
    """An upload failed; the message says whether rerunning resumes it."""


class DiskFullError(TransferError):
    """The device has too little free space for an upload."""


@dataclass(frozen=True)
class Upload:
    """One blob on the device and what it took to put it there."""

    path: str  # final remote path, <cache>/blobs/<sha256>
    sha256: str
    bytes: int
    sent: int  # bytes sent by this call (0 when skipped)
    resumed_from: int  # the partial's size this call appended to (0: from the start)
    skipped: bool = False  # the device already had it (and its hash matched)


def _stat_size(sftp, path: str) -> int | None:
    try:
        return sftp.stat(path).st_size
    except OSError:  # FileNotFoundError and friends
        return None


def free_bytes(conn: Connection, folder: str) -> int | None:
    """Free bytes on the file system holding `folder` (or its nearest existing parent), None if df fails."""
    res = conn.run(["sh", "-c", DF, "sh", folder], COMMAND_TIMEOUT_S, check=False)
    return parse_df(res.stdout) if res.rc == 0 else None


def check_space(conn: Connection, folder: str, need: int) -> None:
    free = free_bytes(conn, folder)
    if free is not None and need > free:
        raise DiskFullError(f"{conn.target}: not enough disk space in {folder}: the upload needs {need / 1e6:.1f} MB, "
                            f"the device has {free / 1e6:.1f} MB free; free some space or set [bench] remote_cache "
                            "to a bigger disk")


def remote_sha256(conn: Connection, path: str, python: str = "python3") -> str:
    """sha256 of a device file with `sha256sum`, or Python's hashlib where coreutils lacks it."""
    for argv in (["sha256sum", "--", path], [python, "-c", PY_SHA256, path]):
        res = conn.run(argv, HASH_TIMEOUT_S, check=False)
        digest = res.stdout.split()[0] if res.stdout.split() else ""
        if res.rc == 0 and len(digest) == 64:
            return digest
    raise TransferError(f"{conn.target}: cannot hash {path} on the device (neither sha256sum nor {python} "
                        f"worked): {last_line(res.stderr, res.stdout)}")


def upload(conn: Connection, local: Path, cache: str = CACHE, sha256: str | None = None, progress=None,
           on_chunk: Callable[[int], None] | None = None) -> Upload:
    """Put `local` at `<cache>/blobs/<sha256>` unless it is there; resume a partial; verify on the device.

    `progress` is a rich Progress (a bar per file); `on_chunk(bytes_done)` is called after every chunk."""
    local = Path(local)
    sha, size = sha256 or sha256_file(local), local.stat().st_size
    blobs = f"{conn.expand(cache).rstrip('/')}/blobs"
    final, part = f"{blobs}/{sha}", f"{blobs}/{sha}.part"
    have = _stat_size(conn.sftp, final)
    if have is not None:
        if have == size and remote_sha256(conn, final) == sha:
            log.debug("%s: %s already on the device (%s)", conn.target, local.name, sha[:12])
            return Upload(final, sha, size, 0, 0, skipped=True)
        log.warning("%s: the device's copy of %s is damaged (its sha256 is not %s...); uploading it again",
                    conn.target, local.name, sha[:12])
        conn.sftp.remove(final)
    conn.run(["mkdir", "-p", blobs], COMMAND_TIMEOUT_S)
    offset = _stat_size(conn.sftp, part) or 0
    if offset > size:  # not a prefix of this file
        conn.sftp.remove(part)
        offset = 0
    check_space(conn, blobs, size - offset)
    _send(conn, local, part, offset, size, progress, on_chunk)
    got = remote_sha256(conn, part)
    if got != sha:
        conn.sftp.remove(part)
        if offset:  # the old partial was not a prefix of this file after all: start over once
            log.warning("%s: resumed upload of %s did not verify; uploading it again from the start",
                        conn.target, local.name)
            return upload(conn, local, cache, sha, progress, on_chunk)
        raise TransferError(f"{conn.target}: {local.name} arrived corrupted (device sha256 {got[:12]}..., "
                            f"expected {sha[:12]}...); the partial was deleted, rerun to upload it again")
    conn.sftp.posix_rename(part, final)  # atomic: a finished name is always a whole, verified file
    return Upload(final, sha, size, size - offset, offset)


def _send(conn: Connection, local: Path, part: str, offset: int, size: int, progress, on_chunk) -> None:
    import paramiko

    task, name = None, f"{conn.target} ↑ {local.name}"
    if progress is not None:
        task = progress.add_task(name, total=size, completed=offset)
    done = offset
    try:
        with open(local, "rb") as src, conn.sftp.open(part, "ab") as dst:
            dst.set_pipelined(True)
            src.seek(offset)
            while block := src.read(CHUNK):
                if conn.stop is not None and conn.stop.is_set():
                    raise Interrupted(f"{conn.target}: interrupted; the upload of {local.name} stopped at "
                                      f"{done / 1e6:.1f} MB (a rerun resumes it)")
                dst.write(block)
                done += len(block)
                if task is not None:
                    progress.update(task, completed=done, description=f"{name} {done / 1e6:.1f}/{size / 1e6:.1f} MB")
                if on_chunk is not None:
                    on_chunk(done)
    except (OSError, EOFError, paramiko.SSHException) as e:
        raise TransferError(f"{conn.target}: upload of {local.name} broke after {done / 1e6:.1f} of "
                            f"{size / 1e6:.1f} MB ({type(e).__name__}: {e}); rerun to resume from there") from None
    finally:
        if task is not None:
            progress.remove_task(task)
    if offset:
        log.info("%s: resumed %s at %.1f MB", conn.target, local.name, offset / 1e6)


def folder_files(folder: Path, skip: tuple[str, ...] = ("manifest.json",)) -> dict[str, Path]:
    """Every file under `folder` by its relative name (for a tree), except pistill's own manifest."""
    return {str(p.relative_to(folder)): p for p in sorted(folder.rglob("*"))
            if p.is_file() and p.relative_to(folder).parts[0] not in skip}


def tree_id(blobs: dict[str, str]) -> str:
    """The hash of a folder's layout: sorted (name, sha256) pairs."""
    return hashlib.sha256(json.dumps(sorted(blobs.items())).encode()).hexdigest()


def upload_tree(conn: Connection, files: dict[str, Path], cache: str = CACHE, progress=None,
                sha256s: dict[str, str] | None = None) -> tuple[str, list[Upload]]:
    """Upload each file as a blob and lay them out as `<cache>/trees/<tree id>/<name>`; returns (folder, uploads)."""
    sha256s = sha256s or {}
    ups = {name: upload(conn, path, cache, sha256s.get(name), progress) for name, path in files.items()}
    root = conn.expand(cache).rstrip("/")
    tree = f"{root}/trees/{tree_id({n: u.sha256 for n, u in ups.items()})}"
    resent = not all(u.skipped for u in ups.values())  # a re-sent blob is a new file: old links show the old one
    if resent or _stat_size(conn.sftp, tree) is None:
        tmp = f"{tree}.tmp"
        args = [x for name, u in ups.items() for x in (u.path, name)]
        conn.run(["sh", "-c", LINK_TREE, "sh", tmp, *args], COMMAND_TIMEOUT_S)
        replace = 'rm -rf "$2"; ' if resent else ""
        conn.run(["sh", "-c", replace + 'mv -T "$1" "$2" 2>/dev/null || [ -d "$2" ]', "sh", tmp, tree],
                 COMMAND_TIMEOUT_S)
        log.debug("%s: laid out %s", conn.target, shlex.quote(tree))
    return tree, list(ups.values())
