"""The pipeline: stages in order, each skipped when its inputs and config are unchanged."""

from __future__ import annotations

import importlib
import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from .artifact import MANIFEST, Artifact, ArtifactError, check_out, input_key
from .errors import InputError
from .rundir import atomic_write, clean_stale, locked, make_dir
from .verify import problems

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Stage:
    """A pipeline stage: `module.run(inputs, cfg, out)` with the config class `module.<config>`; `inputs` is
    {input stage: Artifact} in the order `inputs` names them."""

    name: str
    module: str
    config: str
    inputs: tuple[str, ...]
    command: str = ""  # the `pistill` subcommand that runs it alone on a run folder; "" = none
    label: str = ""  # the report's row name for the model(s) it makes ({kind}: number format); "" = no model

    def load(self):
        return importlib.import_module(self.module)

    def config_class(self) -> type:
        return getattr(self.load(), self.config)

    def keyed(self, inputs: Mapping[str, Artifact], cfg) -> dict[str, Artifact]:
        """The inputs its key covers: those the module's `key_inputs(cfg)` names (the ones this config reads), or
        all of them. A stage that ignores an input is not rerun when only that input changed."""
        reads = getattr(self.load(), "key_inputs", None)
        return {n: inputs[n] for n in reads(cfg)} if reads else dict(inputs)


_MAKERS: tuple[Stage, ...] = (  # the teacher, the data and every model made from them
    Stage("teacher", "pistill.teacher", "TeacherConfig", (), label="teacher"),
    Stage("data", "pistill.data", "DataConfig", ("teacher",)),
    Stage("prune", "pistill.compress.prune", "PruneConfig", ("teacher", "data"), "prune", "pruned"),
    Stage("quantize", "pistill.compress.quantize", "QuantizeConfig", ("teacher", "prune", "data"), "quantize",
          "quantized teacher"),
    Stage("distill", "pistill.compress.distill", "DistillConfig", ("quantize", "prune", "data"), "distill",
          "student"),
    Stage("gguf", "pistill.export.gguf", "GGUFConfig", ("distill", "data"), "export", "student GGUF {kind}"),
    Stage("onnx", "pistill.export.onnx", "ONNXConfig", ("distill", "data"), "export", "student ONNX {kind}"),
    Stage("baseline", "pistill.export.baseline", "BaselineConfig", ("teacher", "data", "gguf"), "baseline",
          "teacher GGUF {kind}"),
)
MODEL_STAGES = tuple(s.name for s in _MAKERS if s.label)  # artifacts holding models: what bench and eval read
_MEASURES = (
    Stage("bench", "pistill.device.bench", "BenchConfig", MODEL_STAGES, "bench"),
    Stage("eval", "pistill.zeroshot", "EvalConfig", MODEL_STAGES, "eval"),
)
STAGES: tuple[Stage, ...] = (*_MAKERS, *_MEASURES, Stage("report", "pistill.report", "ReportConfig",
                                                         tuple(s.name for s in _MAKERS + _MEASURES), "report"))
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


class DamagedError(InputError):
    """An artifact's file is missing or differs from its manifest's size or sha256."""


def run_stage(st: Stage, inputs: Mapping[str, Artifact], cfg, out: Path, force: bool) -> tuple[Artifact, bool]:
    """Run one stage on its inputs (taken by name from `inputs`, which may hold more) unless an intact artifact
    with the same input key is already at `out` (a damaged one is rebuilt, with a warning). The inputs are checked
    against their manifests first: DamagedError names a damaged file. Returns (artifact, ran)."""
    inputs, old = named(st, inputs), existing(out)
    check_inputs(inputs)
    if old is not None and not force and old.key == input_key(st.name, cfg, st.keyed(inputs, cfg)):
        bad = problems(old)
        if not bad:
            return old, False
        log.warning("%s; rebuilding the '%s' stage", bad[0], st.name)
    clean_stale(out.parent, f".{out.name}.tmp-*")  # left by a killed run; never a finished artifact
    return st.load().run(inputs, cfg, out), True


def rerun_hint(stage_name: str, run_dir: Path) -> str:
    """How to rebuild a stage's artifact: its subcommand, or `pistill run --force`."""
    command = BY_NAME[stage_name].command if stage_name in BY_NAME else ""
    alone = f"pistill {command} {run_dir}, or " if command else ""
    return f"rebuild it with {alone}pistill run RECIPE --force {stage_name}"


def check_inputs(inputs: Mapping[str, Artifact]) -> None:
    """DamagedError naming the first damaged input file and the stage that wrote it."""
    for art in inputs.values():
        bad = problems(art)
        if bad:
            raise DamagedError(f"{bad[0]} (changed after the '{art.stage}' stage wrote it); "
                               f"{rerun_hint(art.stage, art.path.parent)}")


def named(st: Stage, inputs: Mapping[str, Artifact]) -> dict[str, Artifact]:
    """{input stage: Artifact} for the stage's inputs, in its declared order; a missing one fails naming them."""
    missing = [n for n in st.inputs if n not in inputs]
    if missing:
        raise ValueError(f"stage '{st.name}' needs the inputs {', '.join(st.inputs)}; missing: {', '.join(missing)}")
    return {n: inputs[n] for n in st.inputs}


def run(configs: dict, out: Path, force: str | None = None) -> dict[str, Artifact]:
    """Run every stage in order into `out/<stage>`; stages from `force` on rerun even when unchanged. Holds the
    run folder's lock, and refuses (before any stage runs) a `out/<stage>` folder that pistill did not write."""
    with locked(out):
        for st in STAGES:
            check_out(out / st.name, st.name)
        if force or existing(out / "bench") is None:  # the bench will run: reach its devices before building
            configs["bench"].check_devices()
        clean_stale(out, ".pipeline.json.tmp-*")
        return _run_locked(configs, out, force)


def _run_locked(configs: dict, out: Path, force: str | None) -> dict[str, Artifact]:
    forced_from = [s.name for s in STAGES].index(force) if force else len(STAGES)
    arts: dict[str, Artifact] = {}
    runlog = []
    for i, st in enumerate(STAGES):
        log.info("[%d/%d] %s ...", i + 1, len(STAGES), st.name)
        t0 = time.time()
        art, ran = run_stage(st, arts, configs[st.name], out / st.name, i >= forced_from)
        arts[st.name] = art
        wall = time.time() - t0
        verb = "done" if ran else "skipped (inputs and config unchanged)"
        log.info("[%d/%d] %s %s in %.1fs -> %s", i + 1, len(STAGES), st.name, verb, wall, art.path)
        runlog.append({"stage": st.name, "ran": ran, "wall_s": round(wall, 2), "id": art.id})
        write_json(out / "pipeline.json", {"stages": runlog})
    return arts


def write_json(path: Path, obj) -> None:
    """Write JSON atomically (temp file, then rename)."""
    write_text(path, json.dumps(obj, indent=2) + "\n")


def write_text(path: Path, text: str) -> None:
    """Write a text file atomically (temp file, then rename; never through a link)."""
    atomic_write(make_dir(path.parent) / path.name, text)
