"""The pipeline: stages in order, each skipped when its inputs and config are unchanged."""

from __future__ import annotations

import importlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from .artifact import MANIFEST, Artifact, ArtifactError, check_out, input_key
from .rundir import clean_stale, locked

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Stage:
    """A pipeline stage: `module.run(inputs, cfg, out)` with the config class `module.<config>`."""

    name: str
    module: str
    config: str
    inputs: tuple[str, ...]

    def load(self):
        return importlib.import_module(self.module)

    def config_class(self) -> type:
        return getattr(self.load(), self.config)


MODEL_STAGES = ("teacher", "prune", "quantize", "distill", "gguf", "onnx", "baseline")  # artifacts holding models

STAGES: tuple[Stage, ...] = (
    Stage("teacher", "pistill.models", "TeacherConfig", ()),
    Stage("data", "pistill.data", "DataConfig", ("teacher",)),
    Stage("prune", "pistill.compress.prune", "PruneConfig", ("teacher", "data")),
    Stage("quantize", "pistill.compress.quantize", "QuantizeConfig", ("teacher", "prune", "data")),
    Stage("distill", "pistill.compress.distill", "DistillConfig", ("quantize", "prune", "data")),
    Stage("gguf", "pistill.export.gguf", "GGUFConfig", ("distill", "data")),
    Stage("onnx", "pistill.export.onnx", "ONNXConfig", ("distill", "data")),
    Stage("baseline", "pistill.export.baseline", "BaselineConfig", ("teacher", "data", "gguf")),
    Stage("bench", "pistill.device.bench", "BenchConfig", MODEL_STAGES),
    Stage("eval", "pistill.zeroshot", "EvalConfig", MODEL_STAGES),
    Stage("report", "pistill.report", "ReportConfig", ("teacher", "data", *MODEL_STAGES[1:], "bench", "eval")),
)
BY_NAME = {s.name: s for s in STAGES}


def stage(name: str) -> Stage:
    if name not in BY_NAME:
        raise ValueError(f"stage '{name}' is unknown; stages: {', '.join(BY_NAME)}")
    return BY_NAME[name]


def existing(out: Path) -> Artifact | None:
    """A finished artifact at `out`, or None (a folder without a manifest is not finished)."""
    if not (out / MANIFEST).is_file():
        return None
    try:
        return Artifact.load(out)
    except (ArtifactError, ValueError):
        return None


def run_stage(st: Stage, inputs: list[Artifact], cfg, out: Path, force: bool) -> tuple[Artifact, bool]:
    """Run one stage unless an artifact with the same input key is already at `out`. Returns (artifact, ran)."""
    old = existing(out)
    if old is not None and not force and old.key == input_key(st.name, cfg, inputs):
        return old, False
    clean_stale(out.parent, f".{out.name}.tmp-*")  # left by a killed run; never a finished artifact
    return st.load().run(inputs, cfg, out), True


def run(configs: dict, out: Path, force: str | None = None) -> dict[str, Artifact]:
    """Run every stage in order into `out/<stage>`; stages from `force` on rerun even when unchanged. Holds the
    run folder's lock, and refuses (before any stage runs) a `out/<stage>` folder that pistill did not write."""
    with locked(out):
        for st in STAGES:
            check_out(out / st.name, st.name)
        clean_stale(out, ".pipeline.json.tmp-*")
        return _run_locked(configs, out, force)


def _run_locked(configs: dict, out: Path, force: str | None) -> dict[str, Artifact]:
    forced_from = [s.name for s in STAGES].index(force) if force else len(STAGES)
    arts: dict[str, Artifact] = {}
    runlog = []
    for i, st in enumerate(STAGES):
        log.info("[%d/%d] %s ...", i + 1, len(STAGES), st.name)
        t0 = time.time()
        art, ran = run_stage(st, [arts[n] for n in st.inputs], configs[st.name], out / st.name, i >= forced_from)
        arts[st.name] = art
        wall = time.time() - t0
        verb = "done" if ran else "skipped (inputs and config unchanged)"
        log.info("[%d/%d] %s %s in %.1fs -> %s", i + 1, len(STAGES), st.name, verb, wall, art.path)
        runlog.append({"stage": st.name, "ran": ran, "wall_s": round(wall, 2), "id": art.id})
        write_json(out / "pipeline.json", {"stages": runlog})
    return arts


def write_json(path: Path, obj) -> None:
    """Write JSON atomically (temp file, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)
