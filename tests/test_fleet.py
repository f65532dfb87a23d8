"""Benchmarking over SSH: a fleet where one device is down, reruns that upload nothing, limits and missing pythons.

The "devices" are sshd processes on 127.0.0.1; their python is this venv's, where the runtimes are installed.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys

import pytest

from pistill.device import fleet, transfer
from pistill.device import target as T
from pistill.device.bench import BenchConfig, run
from sshd import sshd_factory  # noqa: F401 (fixture)
from tiny import model_artifact


@pytest.fixture(scope="module")
def models(tiny_model, tmp_path_factory):
    """A teacher (HF folder) and a student GGUF artifact, built from the tiny llama."""
    gguf = pytest.importorskip("pistill.export.gguf", reason="the GGUF exporter (export/gguf.py) is not there")
    root = tmp_path_factory.mktemp("fleet")

    def copy(d):
        shutil.copytree(tiny_model, d, dirs_exist_ok=True)
        return "."
    teacher = model_artifact(root, "teacher", "hf", copy)
    student = model_artifact(root, "gguf", "gguf", lambda d: gguf.write_gguf(tiny_model, d / "model-f32.gguf",
                                                                              "f32").name)
    return [teacher, student]


@pytest.fixture(scope="module")
def onnx_student(tiny_model, tmp_path_factory):
    """The student as an int4 ONNX folder artifact: a folder becomes a tree of blobs on the device."""
    onnx = pytest.importorskip("pistill.export.onnx", reason="the ONNX exporter (export/onnx.py) is not there")
    return model_artifact(tmp_path_factory.mktemp("fleet-onnx"), "onnx", "onnx",
                          lambda d: onnx.export(tiny_model, d / "model", onnx.ONNXConfig()).name)


@pytest.fixture
def lab(sshd_factory, tmp_path, monkeypatch):
    """Two devices, `up` running and `down` not; ~/.ssh/config and known_hosts point at their keys."""
    up, down = sshd_factory("up"), sshd_factory("down", run=False)
    config = tmp_path / "ssh_config"
    config.write_text(f"Host *\n  IdentityFile {up.client_key}\n  IdentityFile {down.client_key}\n")
    known = tmp_path / "known_hosts"
    known.write_text(up.known_hosts.read_text() + down.known_hosts.read_text())
    monkeypatch.setattr(T, "USER_SSH_CONFIG", config)
    monkeypatch.setattr(T, "USER_KNOWN_HOSTS", known)
    monkeypatch.setenv("PISTILL_CACHE", str(tmp_path / "local-cache"))  # HF -> GGUF conversions
    return up, down


def quick(tmp_path, **changes) -> BenchConfig:
    base = dict(threads=1, prompt_tokens=[8], gen_tokens=4, repeats=1, warmup=0, cooldown_s=0.0, bandwidth_mb=4,
                timeout_s=120, python=sys.executable, remote_cache=str(tmp_path / "device-cache"))
    return BenchConfig(**{**base, **changes})


def test_fleet_with_one_device_down(models, onnx_student, lab, tmp_path):
    up, down = lab
    art = run(models + [onnx_student], quick(tmp_path, targets=[down.spec, up.spec]), tmp_path / "bench")
    devices = json.loads(art.file("devices.json").read_text())
    assert list(devices) == [down.spec, up.spec]
    assert f"cannot reach 127.0.0.1:{down.port}" in devices[down.spec]["error"]
    good = devices[up.spec]
    assert "error" not in good and good["facts"]["cores"] >= 1
    assert any(w.startswith("not a Raspberry Pi") for w in good["warnings"]) or good["facts"]["board_kind"]
    for stage in ("teacher", "gguf"):  # teacher and student on the same device, both through llama.cpp
        r = good["results"][stage]
        assert r["schema_version"] == 2 and r["runtime"]["name"] == "llama_cpp" and r["decode_tps"] > 0, r
        assert r["model"]["path"].startswith(str(tmp_path / "device-cache" / "trees"))
    assert good["results"]["teacher"]["device_format"] == "as GGUF Q4_0"
    onnx = good["results"]["onnx"]
    assert onnx["runtime"]["name"] == "onnxruntime" and onnx["decode_tps"] > 0 and onnx["prompt_source"] == "text"
    assert json.loads(art.file("bench.json").read_text()) == good["results"]  # the main table: the good device
    assert art.manifest["target"] == up.spec and art.manifest["targets"] == [down.spec, up.spec]
    assert art.metrics["devices"][down.spec] == {"error": devices[down.spec]["error"]}
    assert art.metrics["gguf"]["decode_tps"] > 0


def test_second_run_uploads_nothing(models, lab, tmp_path, monkeypatch):
    up, _ = lab
    cfg = quick(tmp_path, target=up.spec)
    run(models[1:], cfg, tmp_path / "bench1")

    def no_send(*args):
        raise AssertionError("uploaded again")

    monkeypatch.setattr(transfer, "_send", no_send)
    art = run(models[1:], cfg, tmp_path / "bench2")
    assert art.metrics["gguf"]["decode_tps"] > 0


def test_every_device_down_fails_the_stage(models, lab, tmp_path):
    _, down = lab
    with pytest.raises(T.TargetError, match="no device could be benchmarked"):
        run(models, quick(tmp_path, target=down.spec), tmp_path / "bench")
    assert not (tmp_path / "bench").exists()  # nothing cached: a rerun tries again


def test_device_without_python(models, lab, tmp_path):
    up, _ = lab
    with pytest.raises(T.TargetError, match=r"python '/no/such/python3' is not there or does not run"):
        run(models, quick(tmp_path, target=up.spec, python="/no/such/python3"), tmp_path / "bench")


def test_unknown_host_key_in_a_fleet(models, lab, tmp_path, sshd_factory):
    up, _ = lab
    stranger = sshd_factory("stranger")  # its host key is in no known_hosts
    config = T.USER_SSH_CONFIG.read_text() + f"  IdentityFile {stranger.client_key}\n"
    T.USER_SSH_CONFIG.write_text(config)
    devices = fleet.bench_fleet(models[1:], quick(tmp_path), [stranger.spec, up.spec], _quiet())
    assert "pistill trust" in devices[stranger.spec]["error"] and "SHA256:" in devices[stranger.spec]["error"]
    assert devices[up.spec]["results"]["gguf"]["decode_tps"] > 0


def test_remote_limit_stops_the_agent(models, lab, tmp_path):
    up, _ = lab
    cfg = quick(tmp_path, target=up.spec, hf_on_device="torch", timeout_s=1)  # importing torch alone takes longer
    devices = fleet.bench_fleet(models[:1], cfg, [up.spec], _quiet())
    assert devices[up.spec]["results"]["teacher"] == {"error": "timed out after 1 s (BenchConfig.timeout_s)",
                                                      "runtime": "torch"}


def test_jobs(models, tmp_path, monkeypatch):
    teacher, student = models
    monkeypatch.setenv("PISTILL_CACHE", str(tmp_path))
    cfg = BenchConfig()
    job = fleet.make_job(student, cfg, "Q4_0")
    assert job.runtime == "llama_cpp" and job.model == "model-f32.gguf" and len(job.sha256s["model-f32.gguf"]) == 64
    torch_job = fleet.make_job(teacher, dataclasses.replace(cfg, hf_on_device="torch"), "Q4_0")
    assert torch_job.runtime == "torch" and torch_job.model == "." and "manifest.json" not in torch_job.files
    assert "config.json" in torch_job.files and torch_job.sha256s["config.json"]
    jobs = fleet.make_jobs(models, dataclasses.replace(cfg, hf_on_device="skip"))
    assert "skipped" in jobs["teacher"]["error"] and isinstance(jobs["gguf"], fleet.Job)


@pytest.mark.parametrize("rc, stderr, expected", [
    (1, "loading\nagent: error: llama_cpp failed on m: boom\n", "agent: error: llama_cpp failed on m: boom"),
    (137, "", "agent was killed by SIGKILL (out of memory?) and printed nothing"),
    (139, "partial\n", "agent was killed by SIGSEGV: partial"),
    (3, "", "agent exited with code 3 and printed nothing"),
])
def test_agent_failure(rc, stderr, expected):
    assert fleet.agent_failure(rc, stderr) == expected


def test_bitsandbytes_model_is_not_sent(tmp_path):
    def bnb(d):
        (d / "config.json").write_text(json.dumps({"model_type": "llama", "quantization_config": {"bits": 4}}))
        return "."
    art = model_artifact(tmp_path, "quantize", "hf", bnb)
    assert "run on CUDA only" in fleet.make_jobs([art], BenchConfig())["quantize"]["error"]


def _quiet():
    import io

    from rich.console import Console
    from rich.progress import Progress

    return Progress(console=Console(file=io.StringIO()))


def test_cli_bench_with_an_unreachable_target(sshd_factory, tmp_path):
    """`pistill bench RUN --target` (what `make edge PI=...` passes): nothing reachable -> one error line, exit 1."""
    import subprocess

    down = sshd_factory("down", run=False)
    run_dir = tmp_path / "run"
    for stage in ("teacher", "prune", "quantize", "distill", "gguf", "onnx"):
        model_artifact(run_dir, stage, "gguf", lambda d: (d / "m.gguf").write_bytes(b"GGUF") and "m.gguf")
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "known_hosts").write_text(down.known_hosts.read_text())
    env = {"HOME": str(home), "PATH": "/usr/bin:/bin"}
    p = subprocess.run([sys.executable, "-m", "pistill.cli", "bench", str(run_dir), "--target", down.spec],
                       capture_output=True, text=True, timeout=120, env=env)
    assert p.returncode == 1, p.stderr
    assert p.stderr.strip().splitlines()[-1].startswith("pistill: error: no device could be benchmarked: ")
    assert not (run_dir / "bench").exists()
