"""Benchmarking over SSH: a fleet where one device is down, reruns that upload nothing, limits and missing pythons.

The "devices" are sshd processes on 127.0.0.1; their python is this venv's, where the runtimes are installed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

from pistill.device import fleet, transfer
from pistill.device import target as T
from pistill.device.bench import BenchConfig, run
from pistill.device.local import BenchInterrupted
from sshd import sshd_factory  # noqa: F401 (fixture)
from tiny import model_artifact, named


@pytest.fixture(scope="module")
def models(tiny_model, tmp_path_factory):
    """A teacher (HF folder) and a student GGUF artifact, built from the tiny llama."""
    gguf = pytest.importorskip("pistill.export.gguf_convert", reason="the GGUF writer is not there")
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


def trusted(*devices, tmp_path, monkeypatch) -> tuple:
    """The devices, reachable with their client keys and trusted, through this test's ~/.ssh/config and
    known_hosts."""
    config = tmp_path / "ssh_config"
    config.write_text("Host *\n" + "".join(f"  IdentityFile {d.client_key}\n" for d in devices))
    known = tmp_path / "known_hosts"
    known.write_text("".join(d.known_hosts.read_text() for d in devices))
    monkeypatch.setattr(T, "USER_SSH_CONFIG", config)
    monkeypatch.setattr(T, "USER_KNOWN_HOSTS", known)
    return devices


@pytest.fixture
def lab(sshd_factory, tmp_path, monkeypatch):
    """Two devices, `up` running and `down` not; ~/.ssh/config and known_hosts point at their keys."""
    up, down = trusted(sshd_factory("up"), sshd_factory("down", run=False), tmp_path=tmp_path,
                       monkeypatch=monkeypatch)
    monkeypatch.setenv("PISTILL_CACHE", str(tmp_path / "local-cache"))  # HF -> GGUF conversions
    return up, down


def quick(tmp_path, **changes) -> BenchConfig:
    base = dict(threads=1, prompt_tokens=[8], gen_tokens=4, repeats=1, warmup=0, cooldown_s=0.0, bandwidth_mb=4,
                timeout_s=120, python=sys.executable, remote_cache=str(tmp_path / "device-cache"))
    return BenchConfig(**{**base, **changes})


def test_fleet_with_one_device_down(models, onnx_student, lab, tmp_path):
    up, down = lab
    art = run(named(models + [onnx_student]), quick(tmp_path, targets=[down.spec, up.spec]), tmp_path / "bench")
    devices = json.loads(art.file("devices.json").read_text())
    assert list(devices) == [down.spec, up.spec]
    assert f"cannot reach 127.0.0.1:{down.port}" in devices[down.spec]["error"]
    good = devices[up.spec]
    assert "error" not in good and good["facts"]["cores"] >= 1
    assert any(w.startswith("not a Raspberry Pi") for w in good["warnings"]) or good["facts"]["board_kind"]
    for stage in ("teacher", "gguf"):  # teacher and student on the same device, both through llama.cpp
        r = good["results"][stage]
        assert r["schema_version"] == 3 and r["runtime"]["name"] == "llama_cpp" and r["decode_tps"] > 0, r
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
    run(named(models[1:]), cfg, tmp_path / "bench1")

    def no_send(*args):
        raise AssertionError("uploaded again")

    monkeypatch.setattr(transfer, "_send", no_send)
    art = run(named(models[1:]), cfg, tmp_path / "bench2")
    assert art.metrics["gguf"]["decode_tps"] > 0


def test_every_device_down_fails_the_stage(models, lab, tmp_path):
    _, down = lab
    with pytest.raises(T.TargetError, match="no device could be benchmarked"):
        run(named(models), quick(tmp_path, target=down.spec), tmp_path / "bench")
    assert not (tmp_path / "bench").exists()  # nothing cached: a rerun tries again


def test_device_without_python(models, lab, tmp_path):
    up, _ = lab
    with pytest.raises(T.TargetError, match=r"python '/no/such/python3' is not there or does not run"):
        run(named(models), quick(tmp_path, target=up.spec, python="/no/such/python3"), tmp_path / "bench")


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
    from pistill.pipeline import stage

    for name in stage("bench").inputs:
        model_artifact(run_dir, name, "gguf", lambda d: (d / "m.gguf").write_bytes(b"GGUF") and "m.gguf")
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "known_hosts").write_text(down.known_hosts.read_text())
    env = {"HOME": str(home), "PATH": "/usr/bin:/bin"}
    p = subprocess.run([sys.executable, "-m", "pistill.cli", "bench", str(run_dir), "--target", down.spec],
                       capture_output=True, text=True, timeout=120, env=env)
    assert p.returncode == 1, p.stderr
    assert p.stderr.strip().splitlines()[-1].startswith("pistill: error: no device could be benchmarked: ")
    assert not (run_dir / "bench").exists()


# --- faults: Ctrl-C, a device's junk output, a damaged device copy, a changed local file ---------------------

@pytest.fixture(scope="module")
def ggufs(tiny_model, tmp_path_factory):
    """Three GGUF model artifacts (a.gguf, b.gguf, c.gguf: one blob, three trees on a device)."""
    gguf = pytest.importorskip("pistill.export.gguf_convert", reason="the GGUF writer is not there")
    root = tmp_path_factory.mktemp("ggufs")
    src = gguf.write_gguf(tiny_model, root / "tiny.gguf", "f32")
    return [model_artifact(root, stage, "gguf", lambda d, n=name: shutil.copy(src, d / n) and n)
            for stage, name in (("quantize", "a.gguf"), ("distill", "b.gguf"), ("gguf", "c.gguf"))]


def pair(sshd_factory, tmp_path, monkeypatch, env_b: dict | None = None):
    """Two devices with their own `~` (SFTP home), trusted and reachable through ~/.ssh/config."""
    return trusted(sshd_factory("a", own_home=True), sshd_factory("b", env=env_b, own_home=True),
                   tmp_path=tmp_path, monkeypatch=monkeypatch)


def agents_on(device) -> list[int]:
    """Pids of live agent processes whose command line is under this device's own home."""
    pids = []
    for d in Path("/proc").glob("[0-9]*"):
        try:
            args = (d / "cmdline").read_bytes().split(b"\0")
            state = (d / "stat").read_text().rpartition(")")[2].split()[0]
        except (OSError, IndexError):
            continue
        if state != "Z" and any(a.endswith(b"/agent.py") and str(device.dir).encode() in a for a in args):
            pids.append(int(d.name))
    return pids


def interrupt_when(ready, limit_s: float = 120.0) -> dict:
    """A thread that sends SIGINT to this process (Ctrl-C) once `ready()`; the dict gets the time it did."""
    sent: dict = {}

    def watch():
        end = time.monotonic() + limit_s
        while time.monotonic() < end and not ready():
            time.sleep(0.05)
        if time.monotonic() < end:
            sent["t"] = time.monotonic()
            os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=watch, daemon=True).start()
    return sent


def test_ctrl_c_stops_a_fleet_at_once_and_kills_the_agents(ggufs, sshd_factory, tmp_path, monkeypatch, caplog):
    """Two devices, three models each, 8 s of cooldown inside every model: Ctrl-C while both run the second model
    stops the fleet in seconds (not the 16 s the models had left, nor timeout_s), kills both agents on the devices,
    keeps the first model's figures and writes no bench artifact."""
    a, b = pair(sshd_factory, tmp_path, monkeypatch)
    cfg = quick(tmp_path, targets=[a.spec, b.spec], remote_cache="~/cache", repeats=2, cooldown_s=8.0,
                bandwidth_mb=0, timeout_s=300)

    def running(pid: int, name: bytes) -> bool:
        try:
            return name in Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:  # the agent ended between the listing and the read
            return False

    def second_model_running() -> bool:
        return all(any(running(p, b"b.gguf") for p in agents_on(d)) for d in (a, b))

    sent = interrupt_when(second_model_running)
    with caplog.at_level(logging.WARNING), pytest.raises(BenchInterrupted) as stopped:
        run(named(ggufs), cfg, tmp_path / "bench")
    took = time.monotonic() - sent["t"]
    assert took < 6, f"the fleet took {took:.1f} s to stop"
    assert agents_on(a) == [] and agents_on(b) == []  # killed on the devices, not left running
    for dev in (a, b):
        d = stopped.value.devices[dev.spec]
        assert d["results"]["quantize"]["decode_tps"] > 0 and set(d["results"]) == {"quantize"}  # what finished
        assert d["error"] == f"{dev.spec}: interrupted while benchmarking distill; its agent was stopped"
        assert f"bench interrupted: {dev.spec}: finished quantize (decode " in caplog.text
        assert any((dev.dir / "home" / "cache" / "blobs").iterdir())  # uploads kept: a rerun sends nothing
    assert "not finished: distill, gguf" in caplog.text
    assert not (tmp_path / "bench").exists() and not list(tmp_path.glob(".bench.tmp-*"))  # no half artifact


@pytest.mark.parametrize("junk", ["null", "[1]", "42"])
def test_agent_output_that_is_not_an_object_fails_only_that_device(junk, ggufs, sshd_factory, tmp_path,
                                                                    monkeypatch):
    """On device b, python prints `junk` as the last stdout line after the agent's JSON (a sitecustomize with an
    atexit hook): valid JSON, not the agent's object. That model fails on b; device a finishes; the stage ends."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import atexit, sys\n"
        f"if sys.argv and sys.argv[0].endswith('agent.py'):\n    atexit.register(print, {junk!r})\n")
    a, b = pair(sshd_factory, tmp_path, monkeypatch, env_b={"PYTHONPATH": str(site)})
    art = run(named(ggufs[2:]), quick(tmp_path, targets=[a.spec, b.spec], remote_cache="~/cache"), tmp_path / "bench")
    devices = json.loads(art.file("devices.json").read_text())
    bad = devices[b.spec]["results"]["gguf"]
    assert set(bad) == {"error", "runtime"} and bad["runtime"] == "llama_cpp"
    assert bad["error"].startswith("agent printed JSON that is not its result object: ")
    assert bad["error"].endswith(f"\\n{junk}'")  # the tail of stdout: the agent's JSON line, then the junk
    assert devices[a.spec]["results"]["gguf"]["decode_tps"] > 0 and "error" not in devices[a.spec]
    assert art.manifest["target"] == a.spec and art.metrics["devices"][b.spec]["gguf"]["error"]


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_damaged_device_copy_is_found_and_uploaded_again(models, lab, tmp_path, caplog):
    """Bytes of the model change on the device after the upload (same size): the next bench hashes the device copy,
    uploads it again and benchmarks the right file, not the damaged one."""
    up, _ = lab
    cfg = quick(tmp_path, target=up.spec)
    first = run(named(models[1:]), cfg, tmp_path / "bench1")
    loaded = Path(json.loads(first.file("bench.json").read_text())["gguf"]["model"]["path"])
    want = sha(models[1].model_path())
    blob = tmp_path / "device-cache" / "blobs" / want
    assert sha(loaded) == want and os.path.samefile(loaded, blob)
    with open(blob, "r+b") as f:  # rot in place: the tree's hard link shows the same damage
        f.seek(blob.stat().st_size // 2)
        f.write(b"\xff" * 4096)
    assert sha(loaded) != want
    with caplog.at_level(logging.WARNING):
        again = run(named(models[1:]), cfg, tmp_path / "bench2")
    assert "the device's copy of model-f32.gguf is damaged" in caplog.text
    result = json.loads(again.file("bench.json").read_text())["gguf"]
    assert result["decode_tps"] > 0 and sha(Path(result["model"]["path"])) == want and sha(blob) == want


def test_local_file_changed_after_its_stage_is_not_sent(models, tmp_path):
    """The manifest's hash is checked against the file as it is now, before anything goes to a device."""
    art = model_artifact(tmp_path, "gguf", "gguf", lambda d: shutil.copy(models[1].model_path(), d / "m.gguf")
                         and "m.gguf")
    with open(art.model_path(), "ab") as f:
        f.write(b"tampered")
    job = fleet.make_jobs([art], BenchConfig())["gguf"]
    assert job["error"].startswith(f"{art.model_path()} changed after the gguf stage wrote it (sha256 ")
    assert job["error"].endswith("rerun that stage (--force gguf)")
    fine = fleet.make_job(models[1], BenchConfig(), "Q4_0")
    assert fine.sha256s == {"model-f32.gguf": sha(models[1].model_path())}


def test_a_job_for_every_model_of_an_artifact(tiny_model, tmp_path):
    """The baseline artifact holds two GGUF files: one job each, keyed as bench.json keys them."""
    from tiny import gguf_baseline

    art = gguf_baseline(tmp_path, tiny_model, {"baseline": ("teacher-Q4_0.gguf", "Q4_0"),
                                               "baseline:Q8_0": ("teacher-Q8_0.gguf", "Q8_0")})
    jobs = fleet.make_jobs([art], BenchConfig())
    assert list(jobs) == ["baseline", "baseline:Q8_0"]
    assert [j.model for j in jobs.values()] == ["teacher-Q4_0.gguf", "teacher-Q8_0.gguf"]
    assert jobs["baseline:Q8_0"].sha256s["teacher-Q8_0.gguf"] == art.manifest["files"]["teacher-Q8_0.gguf"]["sha256"]


def test_speculative_pair_on_a_device(tiny_pair, tiny_model, lab, tmp_path):
    """`speculative = true` on an SSH device: one job, the teacher's file and the student's in one tree (hashed),
    run by the agent with --draft there; the report's device section has the row with its speed-up."""
    from pistill.report_gather import report_data
    from tiny import gguf_baseline

    up, _ = lab
    baseline, student = tiny_pair
    cfg = quick(tmp_path, target=up.spec, speculative=True)
    job = fleet.make_jobs(tiny_pair, cfg)["speculative"]
    assert job.files == {"teacher-F32.gguf": baseline.model_path(), "model-f32.gguf": student.model_path()}
    assert (job.runtime, job.model, job.draft) == ("llama_cpp", "teacher-F32.gguf", "model-f32.gguf")
    assert job.sha256s == {name: sha(path) for name, path in job.files.items()}
    same_name = gguf_baseline(tmp_path, tiny_model, {"baseline": ("model-f32.gguf", "F32")})
    assert fleet.make_jobs([same_name, student], cfg)["speculative"].draft == "draft-model-f32.gguf"

    art = run(named(tiny_pair), cfg, tmp_path / "bench")
    r = json.loads(art.file("devices.json").read_text())[up.spec]["results"]["speculative"]
    teacher = Path(r["model"]["path"])
    assert teacher.is_relative_to(tmp_path / "device-cache" / "trees") and teacher.name == "teacher-F32.gguf"
    assert r["speculative"]["draft"]["path"] == str(teacher.with_name("model-f32.gguf"))
    assert r["speculative"]["steps"] > 0 and 0 <= r["speculative"]["acceptance_rate"] <= 1 and r["decode_tps"] > 0
    rows = {row["key"]: row for row in report_data(named([*tiny_pair, art]))["devices"][0]["rows"]}
    assert list(rows) == ["baseline", "gguf", "speculative"]
    assert rows["speculative"]["name"] == "teacher GGUF F32 + student draft (speculative)"
    assert rows["speculative"]["speedup"] == pytest.approx(r["decode_tps"] / rows["baseline"]["decode_tps"])
    assert rows["speculative"]["speculative"] == r["speculative"]
