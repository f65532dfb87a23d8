"""The device agent: its JSON from real runtimes in a subprocess, its one-line errors, and its timing helpers."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pistill.device import agent
from pistill.device.protocol import AGENT_FILES

AGENT = Path(agent.__file__)
FIGURES = ("load_s", "ttft_s", "prefill_tps", "decode_tps", "peak_rss_mb")


@pytest.fixture(scope="module")
def tiny_gguf(tiny_model, tmp_path_factory):
    """The tiny llama as an F32 GGUF, written by the GGUF exporter."""
    gguf = pytest.importorskip("pistill.export.gguf_convert", reason="the GGUF writer is not there")
    return gguf.write_gguf(tiny_model, tmp_path_factory.mktemp("gguf") / "tiny.gguf", "f32")


@pytest.fixture(scope="module")
def tiny_onnx(tiny_model, tmp_path_factory):
    """The tiny llama as an int4 ONNX folder, written by the ONNX exporter."""
    onnx = pytest.importorskip("pistill.export.onnx", reason="the ONNX exporter (export/onnx.py) is not there")
    return onnx.export(tiny_model, tmp_path_factory.mktemp("onnx") / "model", onnx.ONNXConfig())


def run_agent(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(AGENT), *args], capture_output=True, text=True, timeout=300)


def check_schema(out: dict, runtime: str, lengths: list[int], gen_tokens: int, threads: tuple[int, ...] = (2,)) -> None:
    threads = list(threads)
    assert out["schema_version"] == agent.SCHEMA_VERSION == 3
    assert out["runtime"]["name"] == runtime and out["runtime"]["version"]
    assert {"hostname", "machine", "cores", "python"} <= set(out["host"])
    assert out["settings"]["prompt_tokens"] == lengths and out["settings"]["gen_tokens"] == gen_tokens
    assert out["settings"]["threads"] == threads[0] and out["settings"]["thread_sweep"] == threads
    assert [s["threads"] for s in out["sweep"]] == threads and out["threads"] == threads[0]
    for entry in [out] + out["sweep"]:
        assert [p["prompt_tokens"] for p in entry["prefill"]] == lengths
        figures = [entry[k] for k in FIGURES if k != "peak_rss_mb"] + list(entry["decode_latency_ms"].values())
        for v in figures + [p["tps"] for p in entry["prefill"]]:
            assert isinstance(v, float) and math.isfinite(v) and v > 0, entry
        lat = entry["decode_latency_ms"]
        assert lat["p50"] <= lat["p95"] <= lat["p99"]
    assert out["peak_rss_mb"] > 0
    assert set(out["thermal"]) == {"before", "after"}
    assert set(out["thermal"]["before"]) == {"temp_c", "cpu_mhz", "throttled", "throttled_flags"}
    load = out["load"]
    assert load["cores"] == os.cpu_count() and set(load) == {"cores", "before", "during", "after", "busy"}
    for sample in (load["before"], load["after"]):
        assert len(sample["loadavg"]) == 3 and sample["other_cores"] >= 0
        assert sample["busy_count"] >= len(sample["busy_processes"])
        assert all(p["cores"] >= agent.BUSY_PROCESS_CORES and p["pid"] != 0 for p in sample["busy_processes"])
    assert load["during"]["other_cores"] >= 0 and load["during"]["wall_s"] > 0
    assert load["busy"] == agent.busy_reason(load, max(threads))
    if out["settings"]["bandwidth_mb"]:
        assert out["bandwidth"]["gbs"] > 0 and 0 < out["decode_bw_fraction"] < 10
        assert out["decode_bw_fraction"] == pytest.approx(out["model"]["bytes"] * out["decode_tps"]
                                                          / (out["bandwidth"]["gbs"] * 1e9))
    else:
        assert out["bandwidth"] is None and out["decode_bw_fraction"] is None


@pytest.mark.parametrize("runtime, model", [("torch", "tiny_model"), ("llama_cpp", "tiny_gguf"),
                                            ("onnxruntime", "tiny_onnx")])
def test_agent_json(runtime, model, request):
    path = request.getfixturevalue(model)
    proc = run_agent("--runtime", runtime, "--model", str(path), "--threads", "1", "--prompt-tokens", "8,24",
                     "--gen-tokens", "4", "--repeats", "2", "--warmup", "1", "--cooldown-s", "0",
                     "--bandwidth-mb", "8")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)  # stdout holds the JSON and nothing else
    check_schema(out, runtime, [8, 24], 4, [1])
    assert out["prompt_source"] == "text"


def test_agent_thread_sweep(tiny_gguf):
    proc = run_agent("--runtime", "llama_cpp", "--model", str(tiny_gguf), "--threads", "2,1", "--prompt-tokens", "8",
                     "--gen-tokens", "3", "--repeats", "1", "--warmup", "0", "--cooldown-s", "0",
                     "--bandwidth-mb", "0")
    assert proc.returncode == 0, proc.stderr
    check_schema(json.loads(proc.stdout), "llama_cpp", [8], 3, [2, 1])


@pytest.mark.parametrize("args, message", [
    (["--runtime", "nope", "--model", "."],
     "runtime 'nope' is not supported; supported: llama_cpp, onnxruntime, torch"),
    (["--runtime", "torch", "--model", "/no/such/model"], "model not found: /no/such/model"),
    (["--runtime", "torch", "--model", ".", "--prompt-tokens", "8,x"], "--prompt-tokens '8,x' is not a list"),
    (["--runtime", "torch", "--model", ".", "--repeats", "0"], "--repeats 0 must be at least 1"),
    (["--runtime", "torch", "--model", ".", "--threads", "4,0"], "--threads '4,0' needs positive numbers"),
    (["--runtime", "torch", "--model", ".", "--bandwidth-mb", "-1"], "must not be negative"),
    (["--model", "."], "the following arguments are required: --runtime"),
])
def test_agent_usage_errors_are_one_line(args, message):
    proc = run_agent(*args)
    assert proc.returncode == 2 and proc.stdout == ""
    assert len(proc.stderr.splitlines()) == 1 and proc.stderr.startswith("agent: error: ")
    assert message in proc.stderr


def test_agent_runtime_failure_ends_with_one_error_line(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"not a gguf file")
    proc = run_agent("--runtime", "llama_cpp", "--model", str(bad), "--repeats", "1", "--warmup", "0")
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.splitlines()[-1].startswith(f"agent: error: llama_cpp failed on {bad}: ")


def test_agent_standalone_beside_its_runtimes(tiny_gguf, tmp_path):
    """As on the Pi: the files the bench uploads (agent.py, runtimes.py, ortlm.py) alone in a folder, and pistill not
    importable."""
    for name in AGENT_FILES:
        shutil.copy(AGENT.with_name(name), tmp_path / name)
    args = ["agent.py", "--runtime", "llama_cpp", "--model", str(tiny_gguf), "--gen-tokens", "2", "--repeats", "1",
            "--warmup", "0", "--bandwidth-mb", "4"]
    code = (f"import runpy, sys; sys.modules['pistill'] = None; sys.argv = {args!r}; "
            "runpy.run_path('agent.py', run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    check_schema(json.loads(proc.stdout), "llama_cpp", [64], 2)


class FakeRuntime:
    """Counts calls; tokenizes to a fixed id list (or cannot tokenize at all)."""

    def __init__(self, ids: list[int] | None):
        self.ids, self.prefills, self.decodes = ids, [], 0

    def tokenize(self, text: str) -> list[int]:
        if self.ids is None:
            raise ImportError("no tokenizers package")
        return self.ids

    def prefill(self, ids: list[int]) -> int:
        self.prefills.append(len(ids))
        return 1

    def decode(self, token: int) -> int:
        self.decodes += 1
        return token


def test_measure_counts_runs_and_steps():
    rt = FakeRuntime([5, 6, 7])
    args = agent.parse_args(["--runtime", "torch", "--model", ".", "--prompt-tokens", "4,10", "--gen-tokens", "3",
                             "--repeats", "2", "--warmup", "1", "--cooldown-s", "0"])
    out = agent.measure(rt, [4, 10], args)
    assert rt.prefills == [4, 10] * 3 and rt.decodes == 3 * 3  # warm-up + repeats
    assert out["ttft_prompt_tokens"] == 4 and out["decode_context_tokens"] == 10
    assert out["prefill_tps"] == out["prefill"][1]["tps"]  # at the longest prompt


@pytest.mark.parametrize("ids, n, expected, source", [
    ([5, 6, 7], 7, [5, 6, 7, 5, 6, 7, 5], "text"),
    ([9], 2, [9, 9], "text"),
    ([], 3, [3, 4, 5], "ids"),  # nothing tokenized: byte-level ids
    (None, 3, [3, 4, 5], "ids"),  # cannot tokenize on this device
])
def test_synth_prompt(ids, n, expected, source):
    assert agent.synth_prompt(FakeRuntime(ids), n) == (expected, source)


@pytest.mark.parametrize("xs, q, expected", [
    ([1.0], 99, 1.0), ([1.0, 3.0], 50, 2.0), ([4.0, 1.0, 2.0, 3.0], 0, 1.0), ([4.0, 1.0, 2.0, 3.0], 100, 4.0),
    (list(map(float, range(101))), 95, 95.0),
])
def test_percentile(xs, q, expected):
    assert agent.percentile(xs, q) == pytest.approx(expected)


@pytest.mark.parametrize("text, scale, expected", [("54321\n", 1e3, 54.321), ("garbage", 1e3, None), (None, 1, None)])
def test_read_number(tmp_path, text, scale, expected):
    path = tmp_path / "temp"
    if text is not None:
        path.write_text(text)
    assert agent.read_number(path, scale) == (pytest.approx(expected) if expected else None)


def test_throttled_is_none_off_a_pi(monkeypatch):
    monkeypatch.setattr(agent.shutil, "which", lambda name: None)
    assert agent.throttled() is None
    assert agent.thermal_state()["throttled_flags"] is None


@pytest.mark.parametrize("value, flags", [
    ("0x0", []),
    ("0x50005", ["under-voltage now", "throttled now", "under-voltage has occurred", "throttling has occurred"]),
    ("0x80000", ["soft temperature limit has occurred"]),
    (None, None), ("garbage", None),
])
def test_throttle_flags(value, flags):
    assert agent.throttle_flags(value) == flags


def _load(cores, before, during, after, load1=0.1, names=()):
    procs = [{"pid": i + 1, "name": n, "cores": 1.0} for i, n in enumerate(names)]
    return {"cores": cores, "during": {"other_cores": during, "wall_s": 10.0},
            "before": {"loadavg": None if load1 is None else [load1, 0.1, 0.1], "other_cores": before,
                       "busy_processes": procs, "busy_count": len(procs)},
            "after": {"loadavg": [0.1, 0.1, 0.1], "other_cores": after, "busy_processes": [], "busy_count": 0}}


@pytest.mark.parametrize("load, threads, expected", [
    (_load(4, 0.05, 0.04, 0.06), 4, None),  # a quiet Pi
    (_load(4, 1.0, 1.0, 1.0, names=["yes"]), 4, "other work used 1.0 of 4 cores while it ran (yes 1.0)"),
    (_load(2, 0.6, 0.6, 0.6), 2, "other work used 0.6 of 2 cores while it ran"),  # half a core at least
    (_load(2, 0.4, 0.4, 0.4), 2, None),
    (_load(16, 3.0, 3.0, 3.0), 2, None),  # a quarter of the cores on a big machine
    (_load(4, 2.0, 0.1, 0.0), 4, None),  # one spike before the model is not a busy machine
    (_load(4, 1.5, 0.2, 1.2), 4, "other work used 1.2 of 4 cores while it ran"),  # there before and after
    (_load(4, None, None, None, load1=9.0), 4, "the 1-minute load average was 9.0 on 4 cores before it ran"),
    (_load(4, None, None, None, load1=7.5), 4, None),  # our own previous model can leave up to its threads
    (_load(4, None, None, None, load1=None), 4, None),  # nothing measurable (no /proc, no load average)
])
def test_busy_reason(load, threads, expected):
    assert agent.busy_reason(load, threads) == expected


def test_load_sample_sees_a_busy_process():
    burner = subprocess.Popen(["yes"], stdout=subprocess.DEVNULL)  # one core, for about a second
    try:
        sample = agent.load_sample(0.8)
    finally:
        burner.kill()
        burner.wait()
    mine = [p for p in sample["busy_processes"] if p["pid"] == burner.pid]
    assert mine and mine[0]["name"] == "yes" and mine[0]["cores"] > 0.3, sample
    assert sample["other_cores"] > 0.3 and sample["busy_count"] >= 1 and len(sample["loadavg"]) == 3


def test_bandwidth_probe_and_fraction():
    bw = agent.bandwidth(4, 2, repeats=1)
    assert bw["gbs"] > 0.1 and bw["buffer_mb"] == 4 and bw["threads"] == 2
    assert agent.bw_fraction(1_000_000_000, 2.0, {"gbs": 4.0}) == pytest.approx(0.5)
    assert agent.bw_fraction(1, 2.0, None) is None


def test_peak_rss_is_this_process_not_the_parent():
    """ru_maxrss survives fork+exec; the agent must report its own peak (VmHWM), not the pipeline's."""
    ballast = b"x" * 400_000_000  # resident in the parent
    code = "import sys; sys.path.insert(0, sys.argv[1]); import agent; print(agent.peak_rss_mb())"
    out = subprocess.run([sys.executable, "-c", code, str(AGENT.parent)], capture_output=True, text=True,
                         check=True)
    assert float(out.stdout) < 200 and len(ballast) == 400_000_000
