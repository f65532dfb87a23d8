"""The bench stage: config checks, failure messages, and a run where one broken model does not stop the others."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess

import pytest

from pistill.artifact import ArtifactWriter, config_dict
from pistill.device.bench import SUMMARY, BenchConfig, agent_command, bench_model, failure, run
from tiny import FakeConfig, model_artifact

QUICK = BenchConfig(threads=1, prompt_tokens=[8], gen_tokens=4, repeats=1, warmup=0, timeout_s=300, cooldown_s=0,
                    bandwidth_mb=4)


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
    ({"target": "pi@@raspberrypi"}, "target 'pi@@raspberrypi' is not understood"),
    ({"target": "my pi"}, "target 'my pi' is not understood"),
    ({"targets": ["pi@a", "pi@b:0"]}, "target 'pi@b:0' is not understood"),
    ({"targets": ["pi@a", "pi@a"]}, "names a device twice"),
    ({"target": "pi@a", "targets": ["pi@b"]}, "target and targets are both set"),
    ({"targets": ["pi@b"], "inventory": "fleet.txt"}, "targets and inventory are both set"),
    ({"thread_sweep": [1, 0]}, "thread_sweep [1, 0] must be positive"),
    ({"cooldown_s": -1.0}, "cooldown_s = -1.0"),
    ({"bandwidth_mb": -1}, "bandwidth_mb = -1"),
    ({"hf_on_device": "onnx"}, "hf_on_device = 'onnx' is not one of gguf, torch, skip"),
    ({"remote_cache": " "}, "remote_cache is empty"),
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


@pytest.mark.parametrize("cfg", [BenchConfig(), QUICK, BenchConfig(prompt_tokens=[32, 128], warmup=0),
                                 BenchConfig(targets=["pi@pi5.local", "pi4"], thread_sweep=[1, 4], hf_on_device="torch",
                                             python="/usr/bin/python3", llama_cpp_lib="/opt/llama")])
def test_config_round_trip(cfg):
    d = config_dict(cfg)
    assert d.pop("version") == BenchConfig.VERSION
    assert BenchConfig(**d) == cfg and dataclasses.asdict(cfg) == d


def test_agent_command():
    cmd = agent_command("llama_cpp", "m.gguf", BenchConfig(prompt_tokens=[32, 128], threads=4, thread_sweep=[1, 4, 2]))
    assert cmd[1].endswith("agent.py")
    assert cmd[2:] == ["--runtime", "llama_cpp", "--model", "m.gguf", "--threads", "4,1,2", "--prompt-tokens", "32,128",
                       "--gen-tokens", "32", "--repeats", "2", "--warmup", "1", "--cooldown-s", "1",
                       "--bandwidth-mb", "64"]


def test_fleet_from_target_targets_or_inventory(tmp_path):
    assert BenchConfig().fleet() == ["local"] and BenchConfig(target="pi5").fleet() == ["pi5"]
    assert BenchConfig(targets=["pi@a", "pi@b:2222"]).fleet() == ["pi@a", "pi@b:2222"]
    inv = tmp_path / "fleet.txt"
    inv.write_text("# the lab\npi@pi5.local   # on the shelf\n\npi@pi4.local\n")
    assert BenchConfig(inventory=str(inv)).fleet() == ["pi@pi5.local", "pi@pi4.local"]
    inv.write_text("pi@ok\nnot valid\n")
    with pytest.raises(ValueError, match="target 'not valid' is not understood"):
        BenchConfig(inventory=str(inv)).validate_paths()
    with pytest.raises(ValueError, match="does not exist"):
        BenchConfig(inventory=str(tmp_path / "none.txt")).validate_paths()


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
        assert results[stage]["runtime"]["name"] == runtime and results[stage]["schema_version"] == 2
        assert results[stage]["bandwidth"]["gbs"] > 0 and results[stage]["decode_bw_fraction"] > 0
        assert set(art.metrics[stage]) == set(SUMMARY) and all(v > 0 for v in art.metrics[stage].values())
    assert art.metrics["quantize"] == {"error": results["quantize"]["error"]}
    assert art.manifest["target"] == "local" and art.manifest["host"]["cores"] >= 1
    assert not art.file("devices.json").exists() and "devices" not in art.metrics  # local: as before
