"""The bench stage: time every model artifact with the device agent, here (a subprocess each) or on SSH devices.

`target = "local"` runs the agent on this machine (`local`). Any other target, or a fleet (`targets`, `inventory`),
goes through `fleet`: each device is checked, provisioned, sent the models over SFTP and benchmarked, in parallel.
The agent's command line and output are `protocol`'s; `runners` runs it here or over SSH.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from pistill.artifact import Artifact, ArtifactWriter
from pistill.errors import UsageError

from . import fleet
from .local import BenchInterrupted, bench_here, bench_keys, interrupted_lines
from .protocol import summary
from .target import LOCAL, check_spec

log = logging.getLogger(__name__)

HF_ON_DEVICE = ("gguf", "torch", "skip")
LLAMA_CPP_BUILDS = ("auto", "cross", "device")


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
    # how a device without llama-cpp-python gets it: "cross" (compiled here for 64-bit ARM, then uploaded: the
    # device compiles nothing), "device" (built there: tens of minutes on a Pi), "auto" (cross where this machine
    # has the aarch64 toolchain, else on the device)
    llama_cpp_build: str = "auto"
    hf_on_device: str = "gguf"  # HF models on a device: "gguf" (as the GGUF artifact's quant), "torch", "skip"
    # also time the teacher's GGUF of the student's type (the baseline file) decoding with the student's GGUF as
    # its draft (speculative decoding, bench.json key "speculative")
    speculative: bool = False
    draft_k: int = 4  # with `speculative`: draft tokens per teacher pass at first (adapts in 1 .. max(8, draft_k))

    def __post_init__(self):
        self._check_targets()
        if not self.prompt_tokens or any(not isinstance(n, int) or n < 1 for n in self.prompt_tokens):
            raise ValueError(f"prompt_tokens {self.prompt_tokens} must be positive integers, e.g. [64] or [32, 128]")
        if any(not isinstance(n, int) or n < 1 for n in self.thread_sweep):
            raise ValueError(f"thread_sweep {self.thread_sweep} must be positive integers, e.g. [1, 4]")
        for name in ("threads", "gen_tokens", "repeats", "timeout_s", "draft_k"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} = {getattr(self, name)} must be at least 1")
        for name in ("warmup", "cooldown_s", "bandwidth_mb"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} = {getattr(self, name)} must be 0 or more")
        if self.llama_cpp_build not in LLAMA_CPP_BUILDS:
            raise ValueError(f"llama_cpp_build = '{self.llama_cpp_build}' is not one of {', '.join(LLAMA_CPP_BUILDS)}")
        if self.hf_on_device not in HF_ON_DEVICE:
            raise ValueError(f"hf_on_device = '{self.hf_on_device}' is not one of {', '.join(HF_ON_DEVICE)}")
        if not self.remote_cache.strip():
            raise ValueError("remote_cache is empty; use a folder on the devices, e.g. \"~/.cache/pistill\"")

    def _check_targets(self):
        for key, spec in [("target", self.target), *((f"targets[{i}]", t) for i, t in enumerate(self.targets))]:
            if isinstance(spec, str) and not spec.replace(",", "").strip():  # "", " ", ","
                raise UsageError(f"{key} = {json.dumps(spec)} names no device; write \"local\", \"user@host\" or a "
                                 "Host alias from ~/.ssh/config (several: targets = [\"pi@a\", \"pi@b\"])")
            if spec == LOCAL:
                continue
            try:
                check_spec(spec)
            except UsageError as e:
                if key == "target":
                    raise
                raise UsageError(f"{key}: {e}") from None  # which entry of the list
        sources = [n for n, on in (("target", self.target != LOCAL), ("targets", self.targets),
                                   ("inventory", self.inventory)) if on]
        if len(sources) > 1:
            raise ValueError(f"{' and '.join(sources)} are both set; name the devices in one of them")
        if len(set(self.targets)) != len(self.targets):
            raise ValueError(f"targets {self.targets} names a device twice; list each once")

    def validate_paths(self) -> None:
        """The inventory file exists and names valid targets (called when a recipe is loaded)."""
        self.fleet()

    def check_devices(self) -> dict[str, dict]:
        """Connect to every SSH device of the fleet and run the doctor probe there ({spec: facts}); one TargetError
        naming each device that fails. `pistill search` calls it before it builds anything."""
        return fleet.check_devices(self.fleet(), self)

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


def _progress(bars: bool = False):
    """Spinners per model; with `bars`, upload progress bars too (SSH targets)."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    columns = [SpinnerColumn(), TimeElapsedColumn(), TextColumn("{task.description}")]
    if bars:
        columns.insert(2, BarColumn(bar_width=24))
    return Progress(*columns, console=Console(stderr=True))


def bench_local(inputs: list[Artifact], cfg: BenchConfig, progress) -> dict[str, dict]:
    """`target = "local"`: every model artifact on this machine, one agent subprocess each; on Ctrl-C,
    BenchInterrupted."""
    device: dict = {"results": {}}
    try:
        return bench_here(inputs, cfg, progress, device)["results"]
    except KeyboardInterrupt:
        for line in interrupted_lines({LOCAL: device}, bench_keys(inputs, cfg)):
            log.warning("bench interrupted: %s", line)
        raise BenchInterrupted({LOCAL: device}) from None


def primary(devices: dict[str, dict]) -> str:
    """The device whose figures fill the report's main table: the first real one with a model benchmarked, else
    the first emulated one."""
    for spec, d in sorted(devices.items(), key=lambda kv: bool((kv[1].get("facts") or {}).get("emulated"))):
        if any("error" not in r for r in d.get("results", {}).values()):
            return spec
    return next(iter(devices))


def run(inputs: Mapping[str, Artifact], cfg: BenchConfig, out: Path) -> Artifact:
    """Bench each model of the model artifacts (teacher ... baseline, `models`; with `speculative`, also the teacher's
    GGUF with the student's as its draft, `local.bench_keys`) and write `bench.json` ({key: agent JSON}); for SSH
    targets also `devices.json` ({target: {facts, results, error}}), with `bench.json` the first good device's."""
    fleet_specs = cfg.fleet()
    bars = fleet_specs != [LOCAL]
    with ArtifactWriter(out, "bench", cfg, inputs) as w, _progress(bars) as progress:  # inside: wall_s is the bench
        if fleet_specs == [LOCAL]:
            results, target = bench_local(list(inputs.values()), cfg, progress), LOCAL
        else:
            devices = fleet.bench_fleet(list(inputs.values()), cfg, fleet_specs, progress)
            target = primary(devices)
            results = devices[target].get("results", {})
            w.extra["emulated"] = (devices[target].get("facts") or {}).get("emulated")
            (w.dir / "devices.json").write_text(json.dumps(devices, indent=2) + "\n")
            w.metrics["devices"] = fleet.summaries(devices)
            w.extra["targets"] = fleet_specs
        (w.dir / "bench.json").write_text(json.dumps(results, indent=2) + "\n")
        w.metrics.update({stage: summary(r) for stage, r in results.items()})
        w.extra["target"] = target
        w.extra["host"] = next((r["host"] for r in results.values() if "host" in r), None)
    return w.artifact
