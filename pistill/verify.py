"""Artifacts checked against their manifests before use: every listed file present, of its size and sha256.

The pipeline checks a stage's inputs before it reads them and a finished artifact before it skips its stage (a
damaged one is rebuilt by `pistill run`); `pistill verify RUN` rehashes a whole run folder. Hashes of unchanged files
come from pistill.hashcache, so an untouched multi-GB model costs a stat, not a read.
"""

from __future__ import annotations

from pathlib import Path

from .artifact import MANIFEST, Artifact, ArtifactError, foreign_files
from .errors import InputError
from .hashcache import sha256_many


def problems(art: Artifact, cached: bool = True) -> list[str]:
    """What is wrong with an artifact's files, one line each ('' when intact): missing, resized, rehashed."""
    files = art.manifest.get("files", {})
    out, present = [], []
    for name, entry in files.items():
        path = art.path / name
        if not path.is_file():
            out.append(f"{path} is missing")
        elif path.stat().st_size != entry["bytes"]:
            out.append(f"{path} has {path.stat().st_size} bytes, its manifest says {entry['bytes']}")
        else:
            present.append(path)
    digests = sha256_many(present, cached=cached)
    for path in present:
        if digests[path] != files[str(path.relative_to(art.path))]["sha256"]:
            out.append(f"{path} differs from its manifest's sha256")
    return out


def artifact_folders(run_dir: Path) -> list[Path]:
    """Every folder under `run_dir` (itself included) holding a manifest, skipping temporaries of running stages."""
    run_dir = Path(run_dir)
    found = [run_dir] if (run_dir / MANIFEST).is_file() else []
    for mf in sorted(run_dir.rglob(MANIFEST)):
        folder = mf.parent
        if folder != run_dir and ".tmp-" not in str(folder.relative_to(run_dir)):
            found.append(folder)
    return found


def verify_run(run_dir: Path) -> list[tuple[str, Path, str]]:
    """Rehash (no cache) every artifact under `run_dir`: (stage or '', folder, problem) for each problem. Files a
    manifest does not list are not problems (they are the user's: see `notes`)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise InputError(f"{run_dir} is not a folder; pass a run folder (e.g. runs/default)")
    folders = artifact_folders(run_dir)
    if not folders:
        raise InputError(f"{run_dir} holds no pistill artifact (no {MANIFEST} in it or below); pass a run folder")
    found = []
    for folder in folders:
        try:
            art = Artifact.load(folder)
        except ArtifactError as e:
            found.append(("", folder, str(e)))
            continue
        found += [(art.stage, folder, p) for p in problems(art, cached=False)]
    return found


def notes(run_dir: Path) -> list[str]:
    """Files in artifact folders that their manifests do not list (kept, never verified)."""
    return [f"{p} is not listed in its folder's manifest (not checked)" for folder in artifact_folders(run_dir)
            for p in foreign_files(folder)]
