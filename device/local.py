"""Benchmarking on this machine (one agent subprocess per model, `runners.LocalRunner`), and what every bench run
shares: the models to time (and, with `[bench] speculative`, the teacher's GGUF with the student's as its draft),
their progress and log lines, and the Ctrl-C exception with what finished."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from pistill.artifact import Artifact
from pistill.formats import runtime_for_format

from .protocol import agent_command, busy, time_model
from .runners import LocalRunner
from .target import LOCAL, Interrupted

log = logging.getLogger(__name__)

SPECULATIVE = "speculative"  # bench.json's key for the teacher's GGUF decoding with the student's GGUF as its draft


class BenchInterrupted(KeyboardInterrupt):
    """Ctrl-C during the bench: the agents were stopped; `devices` holds what finished ({target: device})."""

    def __init__(self, devices: dict[str, dict]):
        super().__init__("bench interrupted")
        self.devices = devices


def models(inputs: list[Artifact]) -> list[tuple[str, Artifact]]:
    """(key, artifact narrowed to that model) for every model of the inputs: a stage's name, or "baseline:Q8_0" for
    an artifact holding several (`Artifact.each_model`). Results are keyed so in bench.json."""
    return [pair for a in inputs for pair in a.each_model()]


def bench_keys(inputs: list[Artifact], cfg) -> list[str]:
    """What the bench times, as bench.json keys it: every model (`models`), then the speculative pair when
    `cfg.speculative` (`cfg` a BenchConfig, or None: the models alone)."""
    return [key for key, _ in models(inputs)] + ([SPECULATIVE] if getattr(cfg, "speculative", False) else [])


def student_gguf(inputs: list[Artifact]) -> Artifact | None:
    """The gguf artifact (the student's GGUF; the baseline holds the teacher's), None without one."""
    return next((a for a in inputs if a.stage == "gguf" and a.model), None)


def speculative_pair(inputs: list[Artifact]) -> tuple[Artifact, Artifact]:
    """(the teacher's GGUF of the student's number format: the baseline model of the gguf artifact's type, narrowed;
    the student's GGUF, its draft); ValueError naming what the inputs lack."""
    from pistill.export.gguf import gguf_quant

    student = student_gguf(inputs)
    if student is None:
        raise ValueError("speculative: no student GGUF (gguf artifact) to draft with; run the gguf stage")
    kind = gguf_quant(student.manifest)
    files = [v for a in inputs if a.stage == "baseline" for _, v in a.each_model() if v.model]
    teacher = next((v for v in files if v.model.get("quant") == kind), None)
    if teacher is None:
        have = (f"the baseline artifact holds {', '.join(str(v.model.get('quant')) for v in files)}" if files
                else "there is no baseline artifact")
        raise ValueError(f"speculative: no teacher GGUF {kind} (the student GGUF's type) to verify the drafts; "
                         f"{have}: run the baseline stage with \"student\" in [baseline] quants")
    return teacher, student


def bench_model(artifact: Artifact, cfg, stop: threading.Event | None = None, draft: Path | None = None) -> dict:
    """The agent's JSON for one model artifact here (`cfg` a BenchConfig; with `draft`, decoding speculatively with
    that GGUF), or `{"error": ...}`; never raises for a broken model (only Interrupted once `stop` is set, and
    KeyboardInterrupt)."""
    try:
        model = artifact.model_path()  # ArtifactError when the artifact holds no model
        runtime = runtime_for_format(artifact.model["format"])
    except (ValueError, RuntimeError) as e:  # no model, unknown format
        return {"error": str(e)}
    return time_model(LocalRunner(stop), agent_command(runtime, model, cfg, draft), runtime, cfg.timeout_s)


def bench_speculative(inputs: list[Artifact], cfg, stop: threading.Event | None = None) -> dict:
    """The teacher's GGUF of the student's type decoding with the student's GGUF as its draft (`speculative_pair`),
    here; `{"error": ...}` when the inputs lack either."""
    try:
        teacher, student = speculative_pair(inputs)
    except ValueError as e:
        return {"error": str(e)}
    return bench_model(teacher, cfg, stop, student.model_path())


def bench_here(inputs: list[Artifact], cfg, progress, device: dict | None = None,
               stop: threading.Event | None = None, task=None) -> dict:
    """Every model artifact on this machine, one agent subprocess each, into `device["results"]` (filled in place, so
    after Ctrl-C it holds what finished); once `stop` is set the running agent is stopped and `device` says so.
    Progress: a line per model, or with `task` (this machine's line in a fleet) that line advanced per model."""
    device = {"results": {}} if device is None else device
    views = dict(models(inputs))
    for key in bench_keys(inputs, cfg):
        line = progress.add_task(f"bench {key}", total=1) if task is None else None
        try:
            result = bench_speculative(inputs, cfg, stop) if key == SPECULATIVE else bench_model(views[key], cfg, stop)
        except Interrupted:
            device["error"] = f"local: interrupted while benchmarking {key}; its agent was stopped"
            break
        device["results"][key] = result
        log_result(LOCAL, key, result)
        if line is None:
            progress.advance(task)
        else:
            progress.update(line, completed=1, description=done_line(key, result))
    return device


def done_line(stage: str, result: dict) -> str:
    """One model's progress line once timed: its speeds, or its error."""
    from rich.markup import escape

    if "error" in result:
        return f"[red]✗[/] {stage}: {escape(result['error'])}"
    return (f"[green]✓[/] {stage} ({result['runtime']['name']}): prefill {result['prefill_tps']:.1f} tok/s, "
            f"decode {result['decode_tps']:.1f} tok/s, peak RSS {result['peak_rss_mb']:.0f} MB"
            + (" [yellow](busy machine)[/]" if busy(result) else ""))


def log_result(spec: str, stage: str, result: dict) -> None:
    """A failed model, or one measured on a busy machine, as a warning."""
    if "error" in result:
        log.warning("bench %s on %s failed: %s", stage, spec, result["error"])
    elif reason := busy(result):
        log.warning("bench %s on %s ran on a busy machine (%s): its speeds are lower than a quiet machine's; "
                    "rerun when nothing else runs there", stage, spec, reason)


def interrupted_lines(devices: dict[str, dict], stages: list[str]) -> list[str]:
    """What an interrupted bench finished, one line per device."""
    lines = []
    for spec, d in devices.items():
        results = d.get("results") or {}
        done = [f"{s} (decode {r['decode_tps']:.1f} tok/s)" if "error" not in r else f"{s} (failed)"
                for s, r in results.items()]
        left = [s for s in stages if s not in results]
        lines.append(f"{spec}: finished {', '.join(done) or 'nothing'}"
                     + (f"; not finished: {', '.join(left)}" if left else ""))
    return lines
