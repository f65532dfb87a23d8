"""sha256 of files, remembered by file identity so that an unchanged multi-GB model is hashed once, not every run.

An entry is keyed by the file's absolute path and stores its device, inode, size, mtime and ctime (in ns). A file
whose bytes change has a new mtime or ctime (ctime cannot be set back by `touch`), so a changed file always misses
the cache and is hashed again; a file renamed with its folder (an artifact's temporary folder renamed into place)
keeps its inode and times. The cache lives in PISTILL_CACHE (default ~/.cache/pistill)/hashes.json, never inside a
run folder; losing it only costs a rehash.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from .rundir import atomic_write, make_dir

FILE = "hashes.json"
MAX_ENTRIES = 20_000  # about 4 MB of JSON; the oldest entries go first


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def cache_path() -> Path:
    return Path(os.environ.get("PISTILL_CACHE", "~/.cache/pistill")).expanduser() / FILE


def _identity(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


_read: dict = {}  # {cache file: ((mtime_ns, size), entries)}: a stage's many checks parse the file once


def _load() -> dict:
    path = cache_path()
    try:
        st = path.stat()
        stamp = (st.st_mtime_ns, st.st_size)
        if path in _read and _read[path][0] == stamp:
            return dict(_read[path][1])
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # absent, unreadable or damaged: start empty
        return {}
    data = data if isinstance(data, dict) else {}
    _read[path] = (stamp, data)
    return dict(data)


def _save(entries: dict) -> None:
    if len(entries) > MAX_ENTRIES:  # dicts keep insertion order: drop the oldest
        entries = dict(list(entries.items())[-MAX_ENTRIES:])
    try:
        atomic_write(make_dir(cache_path().parent) / FILE, json.dumps(entries))
    except (OSError, ValueError):  # a read-only or full cache disk costs a rehash next time, nothing else
        pass


def remember(files: dict[Path, str]) -> None:
    """Record the sha256 of files just written (their writer hashed them already)."""
    entries = _load()
    for path, digest in files.items():
        path = Path(path).absolute()
        entries.pop(str(path), None)
        entries[str(path)] = {"id": _identity(path), "sha256": digest}
    _save(entries)


def sha256_many(paths: list[Path], cached: bool = True) -> dict[Path, str]:
    """{path: sha256} for existing files, from the cache where the file is unchanged (`cached`), else read whole."""
    entries = _load() if cached else {}
    out, fresh = {}, {}
    for path in paths:
        key = str(Path(path).absolute())
        ident = _identity(Path(path))
        entry = entries.get(key)
        if isinstance(entry, dict) and entry.get("id") == ident and isinstance(entry.get("sha256"), str):
            out[path] = entry["sha256"]
            continue
        out[path] = sha256_file(Path(path))
        if _identity(Path(path)) == ident:  # not changed while it was read
            fresh[path] = out[path]
    if fresh:
        remember(fresh)
    return out
