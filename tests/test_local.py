"""Benchmarking on this machine: the per-model loop, alone (`target = "local"`) and as `local` in a fleet, with a
broken model and an artifact without one (both fail fast, so no model is timed); the speculative pair
(`[bench] speculative`), timed from tiny GGUF files, and its errors when the inputs lack a file."""

from __future__ import annotations

import dataclasses
import io
import json
import threading

from rich.console import Console
from rich.progress import Progress

from pistill.artifact import ArtifactWriter
from pistill.device import fleet
from pistill.device.bench import BenchConfig, run
from pistill.device.local import bench_here, bench_speculative, interrupted_lines
from pistill.report_gather import report_data
from pistill.report_md import render_markdown
from tiny import FakeConfig, gguf_baseline, model_artifact, named

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


def test_speculative_pair_is_timed_here_with_its_acceptance(tiny_pair, tmp_path):
    """`speculative = true`: the teacher's GGUF of the student's type (baseline, F32) decodes with the student's GGUF
    as its draft, after the models; the report's row has its speed-up over that file alone and its acceptance."""
    baseline, student = tiny_pair
    art = run(named(tiny_pair), dataclasses.replace(QUICK, speculative=True, draft_k=3), tmp_path / "bench")
    results = json.loads(art.file("bench.json").read_text())
    assert list(results) == ["baseline", "gguf", "speculative"]
    r, spec = results["speculative"], results["speculative"]["speculative"]
    assert r["runtime"]["name"] == "llama_cpp" and r["decode_tps"] > 0 and "speculative" not in results["baseline"]
    assert r["model"]["path"] == str(baseline.model_path()) and spec["draft"]["path"] == str(student.model_path())
    assert spec["k"] == 3 and spec["steps"] > 0 and 0 <= spec["acceptance_rate"] <= 1 and spec["mean_accepted"] >= 0
    assert art.metrics["speculative"]["decode_tps"] == r["decode_tps"]
    report = report_data(named([*tiny_pair, art]))
    row = report["rows"][-1]
    assert row["name"] == "teacher GGUF F32 + student draft (speculative)" and row["kind"] == "F32"
    assert row["speedup"] == r["decode_tps"] / results["baseline"]["decode_tps"]
    assert row["speedup_vs"] == row["quality_from"] == "teacher GGUF F32" and row["speculative"] == spec
    assert row["bytes"] == baseline.model_path().stat().st_size + student.model_path().stat().st_size
    md = render_markdown(report)
    assert f"- teacher GGUF F32 + student draft (speculative): the teacher file decodes greedily, the student GGUF " \
           f"proposing its tokens; {spec['acceptance_rate']:.2f} of the drafted tokens accepted" in md


def test_speculative_without_its_files_is_a_row_error(tiny_pair, tiny_model, tmp_path):
    """No gguf artifact, or no baseline file of the student's type: the row holds the reason; nothing crashes."""
    baseline, student = tiny_pair
    cfg = dataclasses.replace(QUICK, speculative=True)
    fix = 'run the baseline stage with "student" in [baseline] quants'
    assert bench_speculative([student], cfg) == {"error": "speculative: no teacher GGUF F32 (the student GGUF's type) "
                                                          f"to verify the drafts; there is no baseline artifact: {fix}"}
    q8 = gguf_baseline(tmp_path, tiny_model, {"baseline": ("teacher-Q8_0.gguf", "Q8_0")})
    assert bench_speculative([q8, student], cfg)["error"].endswith(f"the baseline artifact holds Q8_0: {fix}")
    assert fleet.make_jobs([q8, student], cfg)["speculative"] == bench_speculative([q8, student], cfg)
    with quiet() as progress:
        device = bench_here(inputs(tmp_path), cfg, progress)
    assert list(device["results"]) == ["quantize", "data", "speculative"]
    assert device["results"]["speculative"] == {
        "error": "speculative: no student GGUF (gguf artifact) to draft with; run the gguf stage"}
