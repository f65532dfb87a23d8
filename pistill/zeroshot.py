"""The eval stage: zero-shot multiple-choice accuracy (lm-eval's acc / acc_norm) of every model the run made.

Every model of every input artifact (the baseline's several files included) is scored here on the same items by
`pistill.mc_eval`: HF folders in torch, GGUF files in llama.cpp, the ONNX folder in the numpy + onnxruntime loop a
Pi runs. `eval.json` holds, per model key, each task's n, acc, acc_norm and their standard errors, with the wall
time and tokens/s; a model that cannot be scored here is recorded with the reason and the others go on.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from .artifact import Artifact, ArtifactWriter
from .errors import InputError, UserError
from .mc_eval import read_items

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
TASKS_DIR = Path(__file__).with_name("tasks")
SHIPPED = {"arc_easy": "ARC-Easy", "piqa": "PIQA"}  # pistill/tasks/<name>.jsonl -> label (500 items each)


@dataclass(frozen=True)
class Task:
    """A multiple-choice task: its name in the report, its label and its jsonl file."""

    name: str
    label: str
    path: Path


def task(spec: str) -> Task:
    """A shipped task name, or a path to a jsonl file (named by its stem)."""
    if spec in SHIPPED:
        return Task(spec, SHIPPED[spec], TASKS_DIR / f"{spec}.jsonl")
    path = Path(spec).expanduser()
    return Task(path.stem, path.stem, path)


@dataclass(frozen=True)
class EvalConfig:
    """Which multiple-choice tasks to score every model on, and how."""

    VERSION: ClassVar[int] = 1
    tasks: list[str] = field(default_factory=lambda: list(SHIPPED))  # shipped names or .jsonl files (either layout)
    items: int = 500  # the first N items of each task; 0 = all of them
    suffix: str = "\nAnswer:"  # appended to each query (lm-eval's ARC / PIQA prompt); "" for HellaSwag-layout files
    threads: int = 0  # CPU threads per model; 0 = every core
    skip: list[str] = field(default_factory=list)  # model keys not scored, e.g. ["prune", "baseline:Q8_0"]
    bitsandbytes_on_cpu: bool = False  # score bitsandbytes folders without CUDA too (no faster than float32 there)

    def __post_init__(self):
        if not self.tasks:
            raise ValueError('tasks is empty; name at least one, e.g. ["arc_easy", "piqa"] or a .jsonl file')
        for spec in self.tasks:
            if spec not in SHIPPED and not spec.endswith(".jsonl"):
                raise ValueError(f"task '{spec}' is neither shipped ({', '.join(SHIPPED)}) nor a .jsonl file")
        names = [task(s).name for s in self.tasks]
        if len(set(names)) != len(names):
            raise ValueError(f"tasks {self.tasks} name a task twice (tasks are named by file stem); list each once")
        if self.items < 0:
            raise ValueError(f"items = {self.items} must be 0 or more (0 = every item of each task)")
        if self.threads < 0:
            raise ValueError(f"threads = {self.threads} must be 0 or more (0 = every core)")

    def validate_paths(self) -> None:
        """Every task file exists and every line of it is an item (called when a recipe is loaded, so that a bad
        line fails then, not at the eval stage); InputError naming the file, the line and the problem."""
        for spec in self.tasks:
            path = task(spec).path
            if not path.is_file():
                what = "is not a file" if path.exists() else "does not exist"
                raise InputError(f"task file {path} {what}; fix [eval] tasks")
            if not read_items(path):
                raise InputError(f"task file {path} holds no item; write one JSON item a line, or remove it from "
                                 "[eval] tasks")


# --- one model ------------------------------------------------------------------------------------------------------

def skip_reason(key: str, view: Artifact, cfg: EvalConfig) -> str | None:
    """Why a model is not scored here, or None."""
    from .models import is_bitsandbytes

    if key in cfg.skip:
        return "listed in [eval] skip"
    if not view.model:
        return "holds no model"
    if view.model["format"] == "hf" and is_bitsandbytes(view.model_path()) and not cfg.bitsandbytes_on_cpu:
        import torch

        if not torch.cuda.is_available():
            return ("bitsandbytes weights without CUDA: about as slow as float32 on a CPU, so not scored "
                    "([eval] bitsandbytes_on_cpu = true scores them)")
    return None


def score_model(view: Artifact, items: dict[str, list], cfg: EvalConfig) -> dict:
    """Each task's acc / acc_norm summary for one model, with wall time and tokens/s per task."""
    from .mc_eval import evaluate, open_scorer

    threads = cfg.threads or os.cpu_count() or 1
    out = {"format": view.model["format"], "tasks": {}}
    t0 = time.perf_counter()
    with open_scorer(view.model_path(), view.model["format"], threads) as scorer:
        out["load_s"] = round(time.perf_counter() - t0, 3)
        for name, task_items in items.items():
            t1 = time.perf_counter()
            res = evaluate(scorer, task_items)
            wall = time.perf_counter() - t1
            out["tasks"][name] = {**res, "wall_s": round(wall, 3), "tokens_per_s": round(res["tokens"] / wall, 1)}
    out["wall_s"] = round(time.perf_counter() - t0, 3)
    return out


def _line(key: str, result: dict) -> str:
    if "tasks" not in result:
        return f"eval {key}: {result.get('skipped') or result.get('error')}"
    figures = ", ".join(f"{n} acc_norm {r['acc_norm']:.3f} ± {r['acc_norm_stderr']:.3f} ({r['wall_s']:.0f} s, "
                        f"{r['tokens_per_s']:.0f} tok/s)" for n, r in result["tasks"].items())
    return f"eval {key}: {figures}"


# --- stage ------------------------------------------------------------------------------------------------------------

def load_tasks(cfg: EvalConfig) -> tuple[dict[str, Task], dict[str, list]]:
    tasks = {t.name: t for t in map(task, cfg.tasks)}
    return tasks, {name: read_items(t.path, cfg.items, cfg.suffix) for name, t in tasks.items()}


def task_facts(t: Task, items: list) -> dict:
    """What the report shows about a task: label, source file and hash, items, chance accuracy."""
    return {"label": t.label, "source": t.path.name if t.name in SHIPPED else str(t.path),
            "sha256": hashlib.sha256(t.path.read_bytes()).hexdigest(), "n": len(items),
            "chance": sum(1 / len(it.choices) for it in items) / max(len(items), 1)}


def run(inputs: Mapping[str, Artifact], cfg: EvalConfig, out: Path) -> Artifact:
    """Score every model of every input artifact on `cfg.tasks`; write `eval.json`."""
    tasks, items = load_tasks(cfg)  # a bad task file fails here, before any model loads
    with ArtifactWriter(out, "eval", cfg, inputs) as w:
        results = {}
        for a in inputs.values():
            for key, view in a.each_model():
                if (reason := skip_reason(key, view, cfg)) is not None:
                    results[key] = {"skipped": reason}
                else:
                    try:
                        results[key] = score_model(view, items, cfg)
                    except (UserError, RuntimeError, ValueError, OSError) as e:  # one broken model, not the run
                        results[key] = {"error": f"{type(e).__name__}: {e}"}
                log.info("%s", _line(key, results[key]))
        doc = {"schema_version": SCHEMA_VERSION, "tasks": {n: task_facts(t, items[n]) for n, t in tasks.items()},
               "models": results}
        (w.dir / "eval.json").write_text(json.dumps(doc, indent=2) + "\n")
        w.metrics.update({k: {n: r["acc_norm"] for n, r in v["tasks"].items()} for k, v in results.items()
                          if "tasks" in v})
    return w.artifact


def read_eval(art: Artifact | None) -> dict:
    """An eval artifact's `eval.json` ({"tasks", "models"}), or empty tables when absent."""
    if art is None:
        return {"tasks": {}, "models": {}}
    try:
        return json.loads(art.file("eval.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {"tasks": {}, "models": {}}
