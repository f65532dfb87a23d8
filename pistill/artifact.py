"""Artifacts: self-describing stage outputs, written to a temporary folder and renamed when complete."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from .errors import OutputError, UserError
from .formats import FORMATS, runtime_for_format  # noqa: F401 (runtime_for_format: the report imports it here)
from .hashcache import remember, sha256_file
from .rundir import atomic_write, make_dir, no_space, track

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
SCHEMA_VERSION = 1
_TRACKED_PACKAGES = ("transformers", "accelerate", "bitsandbytes", "gguf", "onnx", "onnxruntime-genai", "numpy",
                     *(f.distribution for f in FORMATS.values()))  # and each format's runtime


class ArtifactError(UserError, RuntimeError):
    """An artifact folder is missing, incomplete or of the wrong stage."""


def config_dict(cfg: Any) -> dict:
    """A config dataclass as a plain dict, with its version (a `VERSION` class attribute)."""
    return {"version": getattr(cfg, "VERSION", 1), **dataclasses.asdict(cfg)}


def as_list(parents: Mapping[str, "Artifact"] | Sequence["Artifact"]) -> list["Artifact"]:
    """A stage's inputs ({input stage: artifact}, in the stage's declared order) as a list of its parents."""
    return list(parents.values()) if isinstance(parents, Mapping) else list(parents)


def input_key(stage: str, cfg: Any, parents: Mapping[str, "Artifact"] | Sequence["Artifact"]) -> str:
    """The hash that decides whether a stage must rerun: stage, config (with version) and parents' ids."""
    blob = json.dumps({"stage": stage, "config": config_dict(cfg), "parents": [p.id for p in as_list(parents)]},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


@dataclass(frozen=True)
class Artifact:
    """A finished stage output: a folder with `manifest.json`."""

    path: Path
    manifest: dict

    @classmethod
    def load(cls, path: str | Path, stage: str | None = None) -> "Artifact":
        path = Path(path)
        mf = path / MANIFEST
        if not mf.is_file():
            raise ArtifactError(f"{path} is not a pistill artifact (no {MANIFEST}); pass a folder a stage wrote")
        manifest = read_manifest(mf)
        if stage is not None and manifest.get("stage") != stage:
            raise ArtifactError(f"{path} holds stage '{manifest.get('stage')}', expected '{stage}'")
        return cls(path, manifest)

    @property
    def stage(self) -> str:
        return self.manifest["stage"]

    @property
    def id(self) -> str:
        return self.manifest["id"]

    @property
    def key(self) -> str:
        return self.manifest["key"]

    @property
    def metrics(self) -> dict:
        return self.manifest.get("metrics", {})

    @property
    def model(self) -> dict | None:
        """`{"format": "hf" | "gguf" | "onnx", "file": relative path}` for artifacts that hold a model."""
        return self.manifest.get("model")

    def file(self, name: str) -> Path:
        return self.path / name

    def model_path(self) -> Path:
        if not self.model:
            raise ArtifactError(f"{self.path} (stage '{self.stage}') holds no model")
        return self.path / self.model["file"]

    @property
    def models(self) -> list[dict]:
        """Every model the artifact holds, each `{"key", "format", "file", ...}`: the manifest's `models` list (an
        artifact with several, e.g. baseline), else its one `model` keyed by the stage name."""
        if self.manifest.get("models"):
            return [dict(m) for m in self.manifest["models"]]
        return [{"key": self.stage, **self.model}] if self.model else []

    def each_model(self) -> list[tuple[str, "Artifact"]]:
        """(key, the artifact narrowed to that model) for each model: the view's `model` and `metrics` are that
        model's. An artifact with one model or none is its own view, keyed by its stage."""
        if not self.manifest.get("models"):
            return [(self.stage, self)]
        views = []
        for m in self.models:
            model = {k: v for k, v in m.items() if k not in ("key", "metrics")}
            views.append((m["key"], Artifact(self.path, {**self.manifest, "model": model,
                                                         "metrics": m.get("metrics", self.metrics)})))
        return views


def read_manifest(path: Path) -> dict:
    """A manifest.json as a dict holding at least stage, id and key; ArtifactError naming the file otherwise."""
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{path} cannot be read as JSON ({type(e).__name__}: {e}); rerun the stage that "
                            "wrote it") from None
    missing = [k for k in ("stage", "id", "key") if not isinstance(manifest, dict) or k not in manifest]
    if missing:
        what = f"lacks {', '.join(missing)}" if isinstance(manifest, dict) else f"is a JSON {type(manifest).__name__}"
        raise ArtifactError(f"{path} {what}, not a pistill manifest; rerun the stage that wrote the folder")
    wrong = _wrong_field(manifest)
    if wrong:
        raise ArtifactError(f"{path}: {wrong}; the manifest is damaged: rerun the stage that wrote the folder")
    return manifest


def _is_model(m: Any) -> bool:
    return isinstance(m, dict) and isinstance(m.get("format"), str) and isinstance(m.get("file"), str)


_SHAPES = {  # manifest field: (its check, what it must be); absent fields are allowed where readers default them
    "stage": (lambda v: isinstance(v, str), "a string"),
    "id": (lambda v: isinstance(v, str), "a string"),
    "key": (lambda v: isinstance(v, str), "a string"),
    "model": (lambda v: v is None or _is_model(v), "null or an object with string 'format' and 'file'"),
    "models": (lambda v: isinstance(v, list) and all(_is_model(m) and isinstance(m.get("key"), str) for m in v),
               "a list of objects with string 'key', 'format' and 'file'"),
    "metrics": (lambda v: isinstance(v, dict), "an object"),
    "config": (lambda v: isinstance(v, dict), "an object"),
    "parents": (lambda v: isinstance(v, list) and all(isinstance(p, dict) for p in v), "a list of objects"),
    "files": (lambda v: isinstance(v, dict) and all(
        isinstance(f, dict) and isinstance(f.get("sha256"), str) and isinstance(f.get("bytes"), int)
        for f in v.values()), "an object of {file: {bytes, sha256}}"),
}


def _wrong_field(manifest: dict) -> str:
    """'<field> is <what it is>, not <what it must be>' for the first malformed field, else ''."""
    for name, (ok, must) in _SHAPES.items():
        if name in manifest and not ok(manifest[name]):
            return f"'{name}' is {json.dumps(manifest[name])[:60]}, not {must}"
    return ""


def environment() -> dict:
    """Versions, machine and git revision; reads package metadata without importing the packages."""
    versions = {}
    for name in _TRACKED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "device": _device(),
        "packages": versions,
        "git_sha": _git_sha(),
    }


def cpu_fields(cpuinfo: str) -> dict[str, str]:
    """The first occurrence of each `key : value` in /proc/cpuinfo (every core repeats them)."""
    fields = {}
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() not in fields:
            fields[key.strip()] = value.strip()
    return fields


def machine_summary() -> str:
    """"AMD EPYC 7B13, 2 cores, Linux": the CPU model (from /proc/cpuinfo where there is one), the core count and
    the OS, for benchmark records."""
    info = Path("/proc/cpuinfo")
    cpu = cpu_fields(info.read_text()).get("model name") if info.exists() else None
    return f"{cpu or platform.processor() or platform.machine()}, {os.cpu_count()} cores, {platform.system()}"


def _device() -> str:
    torch = sys.modules.get("torch")  # only if a stage already imported it
    if torch is not None and torch.cuda.is_available():
        return f"cuda:{torch.cuda.get_device_name(0)}"
    return "cpu"


def _git_sha() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


@dataclass
class ArtifactWriter:
    """Context manager that writes an artifact into `<out>.tmp-<pid>` and renames it to `out` on success.

    with ArtifactWriter(out, "prune", cfg, inputs) as w:  # inputs: {stage: Artifact} (or a list of parents)
        model.save_pretrained(w.dir); w.metrics["params"] = n; w.model = {"format": "hf", "file": "."}
    """

    out: Path
    stage: str
    config: Any
    parents: Mapping[str, Artifact] | Sequence[Artifact]  # kept as a list of the artifacts
    metrics: dict = field(default_factory=dict)
    model: dict | None = None
    models: list[dict] | None = None  # several models: [{"key", "format", "file", "metrics"}]
    extra: dict = field(default_factory=dict)  # stage-specific manifest fields
    artifact: Artifact | None = None

    def __post_init__(self):
        self.out = Path(self.out)
        self.parents = as_list(self.parents)
        self.dir = self.out.parent / f".{self.out.name}.tmp-{os.getpid()}"
        self._t0 = 0.0

    def __enter__(self) -> "ArtifactWriter":
        check_out(self.out, self.stage, self.parents)  # before any work
        if self.dir.is_symlink():  # planted under our temporary's name: drop the link, never follow it
            self.dir.unlink()
        elif self.dir.exists():
            shutil.rmtree(self.dir)
        make_dir(self.dir)
        track(self.dir)  # a SIGKILL here: the next pistill process removes it, whatever its --out
        self._t0 = time.time()
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            full = no_space(exc, self.out)  # disk full anywhere in the stage: one line naming the folder
            if full is not None:
                raise full from None
            return False
        try:
            manifest = self._manifest(time.time() - self._t0)
            atomic_write(self.dir / MANIFEST, json.dumps(manifest, indent=2, default=_json_default) + "\n")
            check_out(self.out, self.stage, self.parents)  # again: the folder may have changed during the stage
        except BaseException as e:
            shutil.rmtree(self.dir, ignore_errors=True)
            full = no_space(e, self.out)
            if full is not None:
                raise full from None
            raise
        self._put_in_place()
        self.artifact = Artifact(self.out, manifest)
        remember({self.out / name: f["sha256"] for name, f in manifest["files"].items()})  # no rehash next run
        return False

    def _put_in_place(self) -> None:
        """Rename the finished folder to `out`; the old artifact there goes only once the new one is in place, and
        files in it that its manifest does not list (the user's own) are moved aside first, never deleted."""
        old = self.out.parent / f".{self.out.name}.tmp-{os.getpid()}.old"  # never a moment without an artifact
        if old.is_symlink() or old.is_file():
            old.unlink()
        if self.out.exists():
            keep_foreign(self.out)
            os.replace(self.out, old)
        os.replace(self.dir, self.out)
        shutil.rmtree(old, ignore_errors=True)

    def _manifest(self, wall_s: float) -> dict:
        files = {str(p.relative_to(self.dir)): {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
                 for p in sorted(self.dir.rglob("*")) if p.is_file()}
        created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        ident = hashlib.sha256(json.dumps([files, created, time.time_ns()], sort_keys=True).encode()).hexdigest()
        return {
            "schema_version": SCHEMA_VERSION,
            "stage": self.stage,
            "id": ident,
            "key": input_key(self.stage, self.config, self.parents),
            "config": config_dict(self.config),
            "parents": [{"stage": p.stage, "id": p.id, "path": str(p.path)} for p in self.parents],
            "model": self.model,
            **({"models": self.models} if self.models else {}),
            "files": files,
            "metrics": self.metrics,
            **self.extra,
            "environment": environment(),
            "created": created,
            "wall_s": round(wall_s, 3),
        }


def foreign_files(folder: Path) -> list[Path]:
    """Files (and links) in an artifact folder that its manifest does not list: put there by someone else."""
    try:
        listed = set(read_manifest(folder / MANIFEST).get("files", {})) | {MANIFEST}
    except ArtifactError:
        return []
    return [p for p in sorted(folder.rglob("*"))
            if (p.is_symlink() or p.is_file()) and str(p.relative_to(folder)) not in listed]


def keep_foreign(folder: Path) -> Path | None:
    """Move the files an artifact's manifest does not list to `<folder>.kept-<time>/` beside it (same relative
    paths), with a warning naming them, before pistill replaces the folder. The new folder, or None."""
    foreign = foreign_files(folder)
    if not foreign:
        return None
    dest = folder.parent / f"{folder.name}.kept-{time.strftime('%Y%m%d-%H%M%S')}"
    n = 1
    while dest.exists():
        n += 1
        dest = dest.with_name(f"{folder.name}.kept-{time.strftime('%Y%m%d-%H%M%S')}-{n}")
    for p in foreign:
        target = dest / p.relative_to(folder)
        make_dir(target.parent)
        os.replace(p, target)
    names = ", ".join(str(p.relative_to(folder)) for p in foreign[:5]) + (" ..." if len(foreign) > 5 else "")
    log.warning("%s held %d file(s) its manifest does not list (%s); pistill replaces the folder, so it moved them "
                "to %s", folder, len(foreign), names, dest)
    return dest


def check_out(out: Path, stage: str, parents: list[Artifact] = ()) -> None:
    """Refuse an output folder whose replacement would delete what pistill did not write: anything but an empty
    folder or a `stage` artifact, or a folder holding one of the stage's inputs (OutputError, nothing written)."""
    out = Path(out)
    where = out.resolve()
    for p in parents:
        if where == p.path.resolve() or where in p.path.resolve().parents:
            raise OutputError(f"{out} holds the '{p.stage}' input {p.path}; writing there would delete it: "
                              "choose another --out")
    if out.is_symlink() or out.exists() and not out.is_dir():
        raise OutputError(f"{out} is {'a link' if out.is_symlink() else 'a file'}, not a pistill '{stage}' "
                          "artifact; choose another --out or remove it yourself")
    if not out.is_dir() or not any(out.iterdir()):
        return
    try:
        found = read_manifest(out / MANIFEST)["stage"]
    except ArtifactError:
        found = None
    if found != stage:
        what = f"a '{found}' artifact" if found else "not a pistill artifact"
        raise OutputError(f"{out} exists and is {what}; pistill replaces only a '{stage}' artifact it wrote: "
                          "choose another --out or remove the folder yourself")


def _json_default(o: Any) -> Any:
    if hasattr(o, "item"):  # numpy / torch scalars
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def dir_bytes(path: Path) -> int:
    """Total size of a file, or of every file under a folder."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
