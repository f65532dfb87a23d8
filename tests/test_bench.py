"""The bench stage: config checks, failure messages, and a run where one broken model does not stop the others."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
from dataclasses import dataclass

import pytest

from pistill.artifact import ArtifactWriter, config_dict
from pistill.device.bench import SUMMARY, BenchConfig, agent_command, bench_model, failure, run

QUICK = BenchConfig(threads=1, prompt_tokens=[8], gen_tokens=4, repeats=1, warmup=0, timeout_s=300)


@dataclass(frozen=True)
class FakeConfig:
    note: str = "test"


def model_artifact(root, stage, fmt, fill):
    """An artifact of `stage` whose model (format `fmt`) is whatever `fill(dir)` writes; returns its file name."""
    with ArtifactWriter(root / stage, stage, FakeConfig(), []) as w:
        w.model = {"format": fmt, "file": fill(w.dir)}
    return w.artifact


@pytest.fixture(scope="module")
def teacher(tiny_model, tmp_path_factory):
    def copy(d):
        shutil.copytree(tiny_model, d, dirs_exist_ok=True)
        return "."
    return model_artifact(tmp_path_factory.mktemp("bench"), "teacher", "hf", copy)


@pytest.fixture(scope="module")
def gguf(tiny_model, tmp_path_factory):
    export = pytest.importorskip("pistill.export.gguf", reason="the GGUF exporter (export/gguf.py) is not there")
    return model_artifact(tmp_path_factory.mktemp("bench"), "gguf", "gguf",
                          lambda d: export.write_gguf(tiny_model, d / "model-f32.gguf", "f32").name)


@pytest.fixture
def broken(tmp_path):
    def garbage(d):
        (d / "model.gguf").write_bytes(b"not a gguf file")
        return "model.gguf"
    return model_artifact(tmp_path, "quantize", "gguf", garbage)


@pytest.mark.parametrize("changes, message", [
    ({"target": "pi@raspberrypi"}, "SSH deployment is not implemented yet"),
    ({"target": "my-pi"}, "target 'my-pi' is not understood"),
    ({"threads": 0}, "threads = 0"),
    ({"prompt_tokens": []}, "prompt_tokens [] must be positive"),
    ({"prompt_tokens": [64, 0]}, "prompt_tokens [64, 0]"),
    ({"prompt_tokens": ["64"]}, "must be positive integers"),
    ({"gen_tokens": 0}, "gen_tokens = 0"),
    ({"repeats": 0}, "repeats = 0"),
    ({"warmup": -1}, "warmup = -1"),
    ({"timeout_s": 0}, "timeout_s = 0"),
])
def test_config_rejects(changes, message):
    with pytest.raises(ValueError) as err:
        BenchConfig(**changes)
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("cfg", [BenchConfig(), QUICK, BenchConfig(prompt_tokens=[32, 128], warmup=0)])
def test_config_round_trip(cfg):
    d = config_dict(cfg)
    assert d.pop("version") == BenchConfig.VERSION
    assert BenchConfig(**d) == cfg and dataclasses.asdict(cfg) == d


def test_agent_command():
    cmd = agent_command("llama_cpp", "m.gguf", BenchConfig(prompt_tokens=[32, 128], threads=4))
    assert cmd[1].endswith("agent.py")
    assert cmd[2:] == ["--runtime", "llama_cpp", "--model", "m.gguf", "--threads", "4", "--prompt-tokens", "32,128",
                       "--gen-tokens", "32", "--repeats", "2", "--warmup", "1"]


@pytest.mark.parametrize("rc, stderr, expected", [
    (1, "loading...\nagent: error: torch failed on x: OSError: no\n\n", "agent: error: torch failed on x: OSError: no"),
    (-11, "", "agent killed by SIGSEGV"),
    (-9, "partial line\n", "agent killed by SIGKILL: partial line"),
    (3, "", "agent exited with code 3 and no message"),
])
def test_failure(rc, stderr, expected):
    assert failure(subprocess.CompletedProcess([], rc, "", stderr)) == expected


def test_bench_model_times_out(teacher):
    out = bench_model(teacher, dataclasses.replace(QUICK, timeout_s=1))  # importing torch alone takes longer
    assert out == {"error": "timed out after 1 s (BenchConfig.timeout_s)", "runtime": "torch"}


def test_bench_model_without_model(tmp_path):
    with ArtifactWriter(tmp_path / "data", "data", FakeConfig(), []) as w:
        pass
    assert "holds no model" in bench_model(w.artifact, QUICK)["error"]


def test_run_records_broken_model_and_finishes_others(teacher, gguf, broken, tmp_path):
    art = run([teacher, broken, gguf], QUICK, tmp_path / "bench")
    results = json.loads(art.file("bench.json").read_text())
    assert list(results) == ["teacher", "quantize", "gguf"]
    assert results["quantize"]["error"].startswith("agent: error: llama_cpp failed on ")
    for stage, runtime in (("teacher", "torch"), ("gguf", "llama_cpp")):
        assert results[stage]["runtime"]["name"] == runtime and results[stage]["schema_version"] == 1
        assert set(art.metrics[stage]) == set(SUMMARY) and all(v > 0 for v in art.metrics[stage].values())
    assert art.metrics["quantize"] == {"error": results["quantize"]["error"]}
    assert art.manifest["target"] == "local" and art.manifest["host"]["cores"] >= 1
