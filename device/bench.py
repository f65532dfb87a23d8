"""The bench stage: time every model artifact with the device agent, one subprocess per model."""

from __future__ import annotations

import json
import logging
import re
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from pistill.artifact import Artifact, ArtifactWriter

from .runtimes import runtime_for_format

log = logging.getLogger(__name__)

AGENT = Path(__file__).with_name("agent.py")
SUMMARY = ("prefill_tps", "decode_tps", "ttft_s", "peak_rss_mb", "load_s")  # per-stage metrics of the artifact
_SSH_TARGET = re.compile(r"^[\w.-]+@[\w.-]+$")


@dataclass(frozen=True)
class BenchConfig:
    """Where and how hard to time the models."""

    VERSION: ClassVar[int] = 1
    target: str = "local"  # where the agent runs: "local" (this machine); "user@host" (SSH) is not there yet
    threads: int = 2  # CPU threads per runtime
    prompt_tokens: list[int] = field(default_factory=lambda: [64])  # prompt lengths; the first gives TTFT
    gen_tokens: int = 32  # decode steps per run
    repeats: int = 2  # timed runs per model (medians reported)
    warmup: int = 1  # untimed runs before the timed ones
    timeout_s: int = 600  # hard limit per model; past it the model is recorded as failed

    def __post_init__(self):
        if _SSH_TARGET.match(self.target):
            raise ValueError(f"target '{self.target}': SSH deployment is not implemented yet; use target = \"local\"")
        if self.target != "local":
            raise ValueError(f"target '{self.target}' is not understood; use \"local\"")
        if not self.prompt_tokens or any(not isinstance(n, int) or n < 1 for n in self.prompt_tokens):
            raise ValueError(f"prompt_tokens {self.prompt_tokens} must be positive integers, e.g. [64] or [32, 128]")
        for name in ("threads", "gen_tokens", "repeats", "timeout_s"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} = {getattr(self, name)} must be at least 1")
        if self.warmup < 0:
            raise ValueError(f"warmup = {self.warmup} must be 0 or more")


def agent_command(runtime: str, model: Path, cfg: BenchConfig) -> list[str]:
    return [sys.executable, str(AGENT), "--runtime", runtime, "--model", str(model),
            "--threads", str(cfg.threads), "--prompt-tokens", ",".join(map(str, cfg.prompt_tokens)),
            "--gen-tokens", str(cfg.gen_tokens), "--repeats", str(cfg.repeats), "--warmup", str(cfg.warmup)]


def failure(proc: subprocess.CompletedProcess) -> str:
    """The agent's last stderr line, or how the process died (a segfault prints nothing)."""
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    if proc.returncode < 0:
        how = f"agent killed by signal {-proc.returncode}"
        if -proc.returncode in signal.valid_signals():
            how = f"agent killed by {signal.Signals(-proc.returncode).name}"
        return how + (f": {lines[-1]}" if lines else "")
    return lines[-1] if lines else f"agent exited with code {proc.returncode} and no message"


def bench_model(artifact: Artifact, cfg: BenchConfig) -> dict:
    """The agent's JSON for one model artifact, or `{"error": ...}`; never raises for a broken model."""
    try:
        model = artifact.model_path()  # ArtifactError when the artifact holds no model
        runtime = runtime_for_format(artifact.model["format"])
    except (ValueError, RuntimeError) as e:  # no model, unknown format
        return {"error": str(e)}
    try:
        proc = subprocess.run(agent_command(runtime, model, cfg), capture_output=True, text=True,
                              timeout=cfg.timeout_s)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {cfg.timeout_s} s (BenchConfig.timeout_s)", "runtime": runtime}
    if proc.returncode != 0:
        return {"error": failure(proc), "runtime": runtime}
    try:
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except (json.JSONDecodeError, IndexError):
        return {"error": f"agent printed no JSON: {proc.stdout[-200:]!r}", "runtime": runtime}


def summary(result: dict) -> dict:
    """The figures the report lines up, or the error."""
    if "error" in result:
        return {"error": result["error"]}
    return {k: result.get(k) for k in SUMMARY}


def _progress():
    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    return Progress(SpinnerColumn(), TimeElapsedColumn(), TextColumn("{task.description}"),
                    console=Console(stderr=True))


def _done_line(stage: str, result: dict) -> str:
    from rich.markup import escape

    if "error" in result:
        return f"[red]✗[/] {stage}: {escape(result['error'])}"
    return (f"[green]✓[/] {stage} ({result['runtime']['name']}): prefill {result['prefill_tps']:.1f} tok/s, "
            f"decode {result['decode_tps']:.1f} tok/s, peak RSS {result['peak_rss_mb']:.0f} MB")


def run(inputs: list[Artifact], cfg: BenchConfig, out: Path) -> Artifact:
    """Bench each model artifact (teacher, prune, quantize, distill, gguf, onnx) and write `bench.json`."""
    results = {}
    with ArtifactWriter(out, "bench", cfg, inputs) as w, _progress() as progress:  # inside: wall_s is the bench
        for a in inputs:
            task = progress.add_task(f"bench {a.stage}", total=1)
            results[a.stage] = bench_model(a, cfg)
            progress.update(task, completed=1, description=_done_line(a.stage, results[a.stage]))
            if "error" in results[a.stage]:
                log.warning("bench %s failed: %s", a.stage, results[a.stage]["error"])
        (w.dir / "bench.json").write_text(json.dumps(results, indent=2) + "\n")
        w.metrics.update({stage: summary(r) for stage, r in results.items()})
        w.extra["target"] = cfg.target
        w.extra["host"] = next((r["host"] for r in results.values() if "host" in r), None)
    return w.artifact
