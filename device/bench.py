"""The bench stage: time every model artifact with the device agent, here (a subprocess each) or on SSH devices.

`target = "local"` runs the agent on this machine. Any other target, or a fleet (`targets`, `inventory`), goes
through `fleet`: each device is checked, provisioned, sent the models over SFTP and benchmarked, in parallel.
"""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from pistill.artifact import Artifact, ArtifactWriter

from .runtimes import runtime_for_format
from .target import LOCAL, Interrupted, check_spec

log = logging.getLogger(__name__)

AGENT = Path(__file__).with_name("agent.py")
AGENT_FILES = ("agent.py", "runtimes.py", "ortlm.py")  # what the device needs beside the runtime
SUMMARY = ("prefill_tps", "decode_tps", "ttft_s", "peak_rss_mb", "load_s")  # per-stage metrics of the artifact
HF_ON_DEVICE = ("gguf", "torch", "skip")
POLL_S = 0.2  # how often a waiting bench looks for Ctrl-C (a fleet) or a finished agent


class BenchInterrupted(KeyboardInterrupt):
    """Ctrl-C during the bench: the agents were stopped; `devices` holds what finished ({target: device})."""

    def __init__(self, devices: dict[str, dict]):
        super().__init__("bench interrupted")
        self.devices = devices


@dataclass(frozen=True)
class BenchConfig:
    """Where and how hard to time the models."""

    VERSION: ClassVar[int] = 2
    target: str = LOCAL  # "local" (this machine), "user@host[:port]", or a Host alias from ~/.ssh/config
    targets: list[str] = field(default_factory=list)  # a fleet, benchmarked in parallel (instead of `target`)
    inventory: str = ""  # a file naming the fleet, one target per line ('#' comments), instead of `targets`
    threads: int = 2  # CPU threads per runtime (the headline figures)
    thread_sweep: list[int] = field(default_factory=list)  # more thread counts to time as well, e.g. [1, 4]
    prompt_tokens: list[int] = field(default_factory=lambda: [64])  # prompt lengths; the first gives TTFT
    gen_tokens: int = 32  # decode steps per run
    repeats: int = 2  # timed runs per model (medians reported)
    warmup: int = 1  # untimed runs before the timed ones
    cooldown_s: float = 1.0  # rest between runs, so a Pi's clock recovers from the previous one
    bandwidth_mb: int = 64  # memory-copy probe buffer in MB, for decode as a fraction of bandwidth; 0 = no probe
    timeout_s: int = 600  # hard limit per model; past it the model is recorded as failed
    remote_cache: str = "~/.cache/pistill"  # on the devices: blobs, trees, the venv
    python: str = ""  # the devices' python that has the runtimes; "" = pistill's venv in remote_cache (built)
    llama_cpp_lib: str = ""  # folder on the devices with your own llama.cpp build's libllama.so; "" = build one
    hf_on_device: str = "gguf"  # HF models on a device: "gguf" (as the GGUF artifact's quant), "torch", "skip"

    def __post_init__(self):
        self._check_targets()
        if not self.prompt_tokens or any(not isinstance(n, int) or n < 1 for n in self.prompt_tokens):
            raise ValueError(f"prompt_tokens {self.prompt_tokens} must be positive integers, e.g. [64] or [32, 128]")
        if any(not isinstance(n, int) or n < 1 for n in self.thread_sweep):
            raise ValueError(f"thread_sweep {self.thread_sweep} must be positive integers, e.g. [1, 4]")
        for name in ("threads", "gen_tokens", "repeats", "timeout_s"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} = {getattr(self, name)} must be at least 1")
        for name in ("warmup", "cooldown_s", "bandwidth_mb"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} = {getattr(self, name)} must be 0 or more")
        if self.hf_on_device not in HF_ON_DEVICE:
            raise ValueError(f"hf_on_device = '{self.hf_on_device}' is not one of {', '.join(HF_ON_DEVICE)}")
        if not self.remote_cache.strip():
            raise ValueError("remote_cache is empty; use a folder on the devices, e.g. \"~/.cache/pistill\"")

    def _check_targets(self):
        for spec in [self.target, *self.targets]:
            if spec != LOCAL:
                check_spec(spec)
        sources = [n for n, on in (("target", self.target != LOCAL), ("targets", self.targets),
                                   ("inventory", self.inventory)) if on]
        if len(sources) > 1:
            raise ValueError(f"{' and '.join(sources)} are both set; name the devices in one of them")
        if len(set(self.targets)) != len(self.targets):
            raise ValueError(f"targets {self.targets} names a device twice; list each once")

    def validate_paths(self) -> None:
        """The inventory file exists and names valid targets (called when a recipe is loaded)."""
        self.fleet()

    def fleet(self) -> list[str]:
        """The targets to benchmark, in order."""
        if not self.inventory:
            return list(self.targets) or [self.target]
        path = Path(self.inventory).expanduser()
        if not path.is_file():
            raise ValueError(f"inventory {path} does not exist; write one target per line or use targets = [...]")
        specs = [ln.split("#")[0].strip() for ln in path.read_text().splitlines()]
        specs = [s for s in specs if s]
        for spec in specs:
            if spec != LOCAL:
                check_spec(spec)
        if not specs:
            raise ValueError(f"inventory {path} names no target; write one per line, e.g. pi@pi5.local")
        if twice := sorted({s for s in specs if specs.count(s) > 1}):
            raise ValueError(f"inventory {path} names {', '.join(twice)} twice; list each device once")
        return specs


def agent_args(runtime: str, model: str | Path, cfg: BenchConfig) -> list[str]:
    """The agent's arguments (the same here and on a device); the first thread count is the headline."""
    threads = [cfg.threads] + [n for n in dict.fromkeys(cfg.thread_sweep) if n != cfg.threads]
    return ["--runtime", runtime, "--model", str(model), "--threads", ",".join(map(str, threads)),
            "--prompt-tokens", ",".join(map(str, cfg.prompt_tokens)), "--gen-tokens", str(cfg.gen_tokens),
            "--repeats", str(cfg.repeats), "--warmup", str(cfg.warmup), "--cooldown-s", f"{cfg.cooldown_s:g}",
            "--bandwidth-mb", str(cfg.bandwidth_mb)]


def agent_command(runtime: str, model: Path, cfg: BenchConfig) -> list[str]:
    return [sys.executable, str(AGENT), *agent_args(runtime, model, cfg)]


def failure(proc: subprocess.CompletedProcess) -> str:
    """The agent's last stderr line, or how the process died (a segfault prints nothing)."""
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    if proc.returncode < 0:
        how = f"agent killed by signal {-proc.returncode}"
        if -proc.returncode in signal.valid_signals():
            how = f"agent killed by {signal.Signals(-proc.returncode).name}"
        return how + (f": {lines[-1]}" if lines else "")
    return lines[-1] if lines else f"agent exited with code {proc.returncode} and no message"


def run_agent(argv: list[str], timeout_s: float, stop=None) -> subprocess.CompletedProcess:
    """Run the agent here; killed past `timeout_s` (TimeoutExpired), on Ctrl-C, or once `stop` is set (Interrupted)."""
    deadline = time.monotonic() + timeout_s
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        try:
            while True:
                try:
                    out, err = proc.communicate(timeout=POLL_S)
                    return subprocess.CompletedProcess(argv, proc.returncode, out, err)
                except subprocess.TimeoutExpired:
                    if stop is not None and stop.is_set():
                        raise Interrupted(f"local: interrupted; the agent (pid {proc.pid}) was stopped") from None
                    if time.monotonic() > deadline:
                        raise
        except BaseException:  # the time limit, Ctrl-C, `stop`: never leave the agent running
            proc.kill()
            proc.communicate()
            raise


def bench_model(artifact: Artifact, cfg: BenchConfig, stop=None) -> dict:
    """The agent's JSON for one model artifact, or `{"error": ...}`; never raises for a broken model (only
    Interrupted once `stop` is set, and KeyboardInterrupt)."""
    try:
        model = artifact.model_path()  # ArtifactError when the artifact holds no model
        runtime = runtime_for_format(artifact.model["format"])
    except (ValueError, RuntimeError) as e:  # no model, unknown format
        return {"error": str(e)}
    try:
        proc = run_agent(agent_command(runtime, model, cfg), cfg.timeout_s, stop)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {cfg.timeout_s} s (BenchConfig.timeout_s)", "runtime": runtime}
    if proc.returncode != 0:
        return {"error": failure(proc), "runtime": runtime}
    return agent_json(proc.stdout, runtime)


def agent_json(stdout: str, runtime: str) -> dict:
    """The agent's one JSON line, or an error naming what it printed instead (no JSON, or JSON that is not the
    agent's object: a device's python may print its own last line)."""
    try:
        out = json.loads(stdout.strip().splitlines()[-1])
    except (json.JSONDecodeError, IndexError):
        return {"error": f"agent printed no JSON: {stdout[-200:]!r}", "runtime": runtime}
    if not isinstance(out, dict):
        return {"error": f"agent printed JSON that is not its result object: {stdout.strip()[-200:]!r}",
                "runtime": runtime}
    if lack := [k for k in SUMMARY if not isinstance(out.get(k), (int, float))] + (
            [] if isinstance(out.get("runtime"), dict) else ["runtime"]):
        return {"error": f"agent printed an object without {', '.join(lack)}: {stdout.strip()[-200:]!r}",
                "runtime": runtime}
    return out


def summary(result: dict) -> dict:
    """The figures the report lines up, or the error."""
    if "error" in result:
        return {"error": result["error"]}
    return {k: result.get(k) for k in SUMMARY}


def busy(result: dict) -> str | None:
    """Why a result was measured on a busy machine (agent schema 3), or None (quiet, or an older result)."""
    return ((result.get("load") or {}).get("busy") or None) if isinstance(result, dict) else None


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


def _progress(bars: bool = False):
    """Spinners per model; with `bars`, upload progress bars too (SSH targets)."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    columns = [SpinnerColumn(), TimeElapsedColumn(), TextColumn("{task.description}")]
    if bars:
        columns.insert(2, BarColumn(bar_width=24))
    return Progress(*columns, console=Console(stderr=True))


def _done_line(stage: str, result: dict) -> str:
    from rich.markup import escape

    if "error" in result:
        return f"[red]✗[/] {stage}: {escape(result['error'])}"
    return (f"[green]✓[/] {stage} ({result['runtime']['name']}): prefill {result['prefill_tps']:.1f} tok/s, "
            f"decode {result['decode_tps']:.1f} tok/s, peak RSS {result['peak_rss_mb']:.0f} MB"
            + (" [yellow](busy machine)[/]" if busy(result) else ""))


def models(inputs: list[Artifact]) -> list[tuple[str, Artifact]]:
    """(key, artifact narrowed to that model) for every model of the inputs: a stage's name, or "baseline:Q8_0" for
    an artifact holding several (`Artifact.each_model`). Results are keyed so in bench.json."""
    return [pair for a in inputs for pair in a.each_model()]


def bench_local(inputs: list[Artifact], cfg: BenchConfig, progress) -> dict[str, dict]:
    """Every model artifact on this machine, one agent subprocess each; on Ctrl-C, BenchInterrupted."""
    results = {}
    try:
        for key, a in models(inputs):
            task = progress.add_task(f"bench {key}", total=1)
            results[key] = bench_model(a, cfg)
            progress.update(task, completed=1, description=_done_line(key, results[key]))
            log_result(LOCAL, key, results[key])
    except KeyboardInterrupt:
        devices = {LOCAL: {"results": results}}
        for line in interrupted_lines(devices, [key for key, _ in models(inputs)]):
            log.warning("bench interrupted: %s", line)
        raise BenchInterrupted(devices) from None
    return results


def log_result(spec: str, stage: str, result: dict) -> None:
    """A failed model, or one measured on a busy machine, as a warning."""
    if "error" in result:
        log.warning("bench %s on %s failed: %s", stage, spec, result["error"])
    elif reason := busy(result):
        log.warning("bench %s on %s ran on a busy machine (%s): its speeds are lower than a quiet machine's; "
                    "rerun when nothing else runs there", stage, spec, reason)


def primary(devices: dict[str, dict]) -> str:
    """The device whose figures fill the report's main table: the first with a model benchmarked."""
    for spec, d in devices.items():
        if any("error" not in r for r in d.get("results", {}).values()):
            return spec
    return next(iter(devices))


def run(inputs: list[Artifact], cfg: BenchConfig, out: Path) -> Artifact:
    """Bench each model of the model artifacts (teacher ... baseline, `models`) and write `bench.json` ({key: agent
    JSON}); for SSH targets also `devices.json` ({target: {facts, results, error}}), with `bench.json` the first good
    device's."""
    fleet_specs = cfg.fleet()
    bars = fleet_specs != [LOCAL]
    with ArtifactWriter(out, "bench", cfg, inputs) as w, _progress(bars) as progress:  # inside: wall_s is the bench
        if fleet_specs == [LOCAL]:
            results, target = bench_local(inputs, cfg, progress), LOCAL
        else:
            from . import fleet

            devices = fleet.bench_fleet(inputs, cfg, fleet_specs, progress)
            target = primary(devices)
            results = devices[target].get("results", {})
            (w.dir / "devices.json").write_text(json.dumps(devices, indent=2) + "\n")
            w.metrics["devices"] = fleet.summaries(devices)
            w.extra["targets"] = fleet_specs
        (w.dir / "bench.json").write_text(json.dumps(results, indent=2) + "\n")
        w.metrics.update({stage: summary(r) for stage, r in results.items()})
        w.extra["target"] = target
        w.extra["host"] = next((r["host"] for r in results.values() if "host" in r), None)
    return w.artifact
