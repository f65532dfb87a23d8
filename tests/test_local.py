"""Benchmarking on this machine: the per-model loop, alone (`target = "local"`) and as `local` in a fleet, with a
broken model and an artifact without one (both fail fast, so no model is timed)."""

from __future__ import annotations

import io
import threading

from rich.console import Console
from rich.progress import Progress

from pistill.artifact import ArtifactWriter
from pistill.device import fleet
from pistill.device.bench import BenchConfig
from pistill.device.local import bench_here, interrupted_lines
from tiny import FakeConfig, model_artifact

QUICK = BenchConfig(threads=1, prompt_tokens=[8], gen_tokens=4, repeats=1, warmup=0, timeout_s=120, cooldown_s=0,
                    bandwidth_mb=0)


def inputs(tmp_path):
    """A model artifact whose GGUF file is garbage (the agent fails at load), and an artifact without a model."""
    def garbage(d):
        (d / "model.gguf").write_bytes(b"not a gguf file")
        return "model.gguf"
    with ArtifactWriter(tmp_path / "data", "data", FakeConfig(), []) as w:
        pass
    return [model_artifact(tmp_path, "quantize", "gguf", garbage), w.artifact]


def quiet() -> Progress:
    """A progress display that prints nowhere, its tasks kept for the asserts."""
    return Progress(console=Console(file=io.StringIO()))


def test_bench_here_records_each_failure(tmp_path):
    with quiet() as progress:
        device = bench_here(inputs(tmp_path), QUICK, progress)
    assert list(device) == ["results"] and list(device["results"]) == ["quantize", "data"]
    assert device["results"]["quantize"]["error"].startswith("agent: error: llama_cpp failed on ")
    assert device["results"]["data"]["error"].endswith("(stage 'data') holds no model")
    assert [t.description.split(":")[0] for t in progress.tasks] == ["[red]✗[/] quantize", "[red]✗[/] data"]


def test_bench_here_stopped_says_so(tmp_path):
    stop = threading.Event()
    stop.set()
    with quiet() as progress:
        device = bench_here(inputs(tmp_path), QUICK, progress, stop=stop)
    assert device == {"results": {}, "error": "local: interrupted while benchmarking quantize; its agent was stopped"}
    assert interrupted_lines({"local": device}, ["quantize"]) == ["local: finished nothing; not finished: quantize"]


def test_local_in_a_fleet_has_facts_and_one_line(tmp_path):
    with quiet() as progress:
        devices = fleet.bench_fleet(inputs(tmp_path), QUICK, ["local"], progress)
    local = devices["local"]
    assert local["facts"]["cores"] >= 1 and set(local["results"]) == {"quantize", "data"} and "error" not in local
    assert len(progress.tasks) == 1 and progress.tasks[0].description.endswith(": 0/2 models benchmarked")
