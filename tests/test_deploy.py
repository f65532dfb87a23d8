"""Deploying: a tiny GGUF served by llama-cpp-python's server here (`--target local`) and on the loopback sshd, chat
requests through the SSH tunnel, switching, rollback, refusals that change nothing, a fleet with a device down, and
the systemd unit text. Every server a test starts is stopped by the `reaper` fixture."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import stat
import struct
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from pistill import cli
from pistill.artifact import sha256_file
from pistill.device import deploy as D
from pistill.device import health
from pistill.device import doctor, served
from pistill.device import target as T
from pistill.errors import InputError, UsageError
from sshd import free_port, sshd, sshd_factory  # noqa: F401 (fixtures)

TIMEOUT_S = 60.0


# --- models and helpers ----------------------------------------------------------------------------------------

def unloadable(src: Path, dst: Path) -> Path:
    """`src` with general.architecture renamed to one llama.cpp does not know: a whole GGUF that pistill reads and
    the device's llama.cpp refuses to load (as a model newer than the device's build would be)."""
    data = src.read_bytes()
    at = data.index(b"general.architecture") + len(b"general.architecture")
    n = struct.unpack_from("<Q", data, at + 4)[0]  # after the value type (uint32): the string's length (uint64)
    assert data[at + 12:at + 12 + n] == b"llama"
    dst.write_bytes(data[:at + 12] + b"pistx" + data[at + 12 + n:])
    return dst


@pytest.fixture(scope="module")
def models(tiny_pair, tmp_path_factory):
    """A run folder (student and baseline GGUFs), and loose files: a truncated GGUF and one llama.cpp cannot load."""
    pytest.importorskip("fastapi", reason="llama-cpp-python's server extra is not installed (pip install "
                        "'pistill[deploy]')")
    run = tiny_pair[0].path.parent
    root = tmp_path_factory.mktemp("deploy-models")
    teacher = tiny_pair[0].model_path()
    truncated = root / "truncated.gguf"
    truncated.write_bytes(teacher.read_bytes()[: teacher.stat().st_size // 2])
    return {"run": run, "student": tiny_pair[1].model_path(), "baseline": teacher, "truncated": truncated,
            "unloadable": unloadable(teacher, root / "unloadable.gguf")}


def our_pids(root: Path) -> list[int]:
    """Pids of live processes whose command line names a path under `root` (the servers and supervisors a test
    started there)."""
    pids = []
    for cmd in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if str(root) in cmd.read_bytes().decode(errors="replace") and served.alive(int(cmd.parent.name)):
                pids.append(int(cmd.parent.name))
        except OSError:
            continue
    return [p for p in pids if p != os.getpid()]


@pytest.fixture
def reaper(tmp_path):
    """Stops, at the end of the test, every process started under tmp_path (undeploy first, then SIGKILL by pid)."""
    yield tmp_path
    for d in tmp_path.glob("**/deploy/*"):
        if (d / "served.py").is_file():
            served.main(["undeploy", "--dir", str(d)])
    for pid in our_pids(tmp_path):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def get(url: str, key: str | None = None, body: dict | None = None) -> tuple[int, dict]:
    """A plain HTTP request from this machine (urllib): (status, JSON)."""
    req = urllib.request.Request(url, data=json.dumps(body).encode() if body else None,
                                 headers={"Content-Type": "application/json",
                                          **({"Authorization": f"Bearer {key}"} if key else {})})
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT_S) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def ask(port: int, key: str | None = None, name: str = "pistill") -> str:
    """An OpenAI-style chat request to 127.0.0.1:port; the reply's text."""
    status, reply = get(f"http://127.0.0.1:{port}/v1/chat/completions", key,
                        {"model": name, "messages": [{"role": "user", "content": "Hello?"}], "max_tokens": 4})
    assert status == 200 and reply["choices"][0]["message"]["role"] == "assistant", reply
    return reply["choices"][0]["message"]["content"]


def local_cfg(tmp_path, monkeypatch, **changes) -> D.DeployConfig:
    monkeypatch.setenv("PISTILL_CACHE", str(tmp_path / "cache"))
    return D.DeployConfig(**{"port": free_port(), "ctx": 256, "check_timeout_s": TIMEOUT_S, **changes})


# --- here (--target local) -------------------------------------------------------------------------------------

def test_local_deploy_switch_rollback_undeploy(models, reaper, tmp_path, monkeypatch, capsys):
    cfg = local_cfg(tmp_path, monkeypatch)
    first = D.deploy(str(models["run"]), T.LOCAL, cfg)
    assert first["health"] == "ok" and first["service"] == "supervised" and not first["skipped"]
    assert first["sha256"] == sha256_file(models["student"]) and first["ttft_s"] > 0 and first["decode_tps"] > 0
    assert first["candidate"]["health"] == "ok"
    assert ask(cfg.port) is not None
    again = D.deploy(str(models["run"]), T.LOCAL, cfg)  # the same model: nothing copied, served again
    assert again["skipped"] and again["uploaded_bytes"] == 0 and again["release"] == first["release"]
    assert cli.main(["deploy", str(models["run"]), "--model", "baseline", "--target", "local", "--port",
                     str(cfg.port), "--ctx", "256"]) == 0
    out = capsys.readouterr().out
    assert "supervised" in out and sha256_file(models["baseline"])[:12] in out
    now = D.status(T.LOCAL)
    assert now["sha256"] == sha256_file(models["baseline"]) and now["previous"]["sha256"] == first["sha256"]
    assert now["running"] and now["listening"] and now["rss_mb"] > 0 and ask(cfg.port) is not None
    back = D.rollback(T.LOCAL, cfg)
    assert back["sha256"] == first["sha256"] and back["health"] == "ok"
    assert D.status(T.LOCAL)["sha256"] == first["sha256"] and ask(cfg.port) is not None
    pid = D.status(T.LOCAL)["pid"]
    assert D.undeploy(T.LOCAL) == {"target": "local", "name": "pistill", "removed": True, "stopped": True}
    assert not served.alive(pid) and our_pids(tmp_path) == []
    assert not (tmp_path / "cache" / "deploy" / "pistill").exists()
    assert D.status(T.LOCAL)["deployed"] is False


def test_supervisor_restarts_a_crashed_server(models, reaper, tmp_path, monkeypatch):
    cfg = local_cfg(tmp_path, monkeypatch)
    D.deploy(str(models["student"]), T.LOCAL, cfg)
    pid = D.status(T.LOCAL)["pid"]
    os.kill(pid, signal.SIGKILL)  # the OOM killer, a segfault
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline and not ((s := D.status(T.LOCAL))["listening"] and s["pid"] != pid):
        time.sleep(0.2)
    assert s["pid"] != pid and s["listening"] and ask(cfg.port) is not None


def test_api_key_only_in_the_device_config(models, reaper, tmp_path, monkeypatch, caplog):
    secret = "pistill-test-key-0123456789abcdef"
    monkeypatch.setenv("PISTILL_TEST_KEY", secret)
    cfg = local_cfg(tmp_path, monkeypatch, api_key_env="PISTILL_TEST_KEY")
    summary = D.deploy(str(models["student"]), T.LOCAL, cfg)
    assert get(f"http://127.0.0.1:{cfg.port}/v1/models")[0] == 401  # no key, no model
    assert ask(cfg.port, secret) is not None
    d = tmp_path / "cache" / "deploy" / "pistill"
    key_file = d / "releases" / summary["release"] / "api_key"
    assert key_file.read_text().strip() == secret and stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    holders = [p for p in d.rglob("*") if p.is_file() and secret in p.read_text(errors="replace")]
    assert holders == [key_file]  # not in meta.json, state.json, the run records or the logs
    assert secret not in json.dumps([summary, D.status(T.LOCAL)]) and secret not in caplog.text
    assert all(secret not in (Path("/proc") / str(p) / "cmdline").read_text(errors="replace")
               for p in our_pids(tmp_path))


def test_ctrl_c_before_the_switch_leaves_the_old_service(models, reaper, tmp_path, monkeypatch):
    cfg = local_cfg(tmp_path, monkeypatch)
    D.deploy(str(models["student"]), T.LOCAL, cfg)
    before = D.status(T.LOCAL)

    def interrupted(*args):
        raise KeyboardInterrupt  # Ctrl-C while the candidate is checked

    monkeypatch.setattr(D, "check", interrupted)
    with pytest.raises(KeyboardInterrupt):
        D.deploy(str(models["baseline"]), T.LOCAL, cfg)
    after = D.status(T.LOCAL)
    assert (after["pid"], after["sha256"], after["candidate"]) == (before["pid"], before["sha256"], False)
    assert ask(cfg.port) is not None


def test_a_failure_after_the_switch_rolls_back(models, reaper, tmp_path, monkeypatch):
    cfg = local_cfg(tmp_path, monkeypatch)
    first = D.deploy(str(models["student"]), T.LOCAL, cfg)
    moved = dataclasses.replace(cfg, port=free_port())  # the new release serves on another port...
    grab = socket.socket()
    stop = D.stop_candidate

    def then_taken(*args):
        stop(*args)
        grab.bind(("127.0.0.1", moved.port))  # ...which another program takes once the candidate passed
        grab.listen()

    monkeypatch.setattr(D, "stop_candidate", then_taken)
    with grab, pytest.raises(D.DeployError, match=f"rolled back to the previous release {first['release']}, which "
                                                  "serves again"):
        D.deploy(str(models["baseline"]), T.LOCAL, moved)
    now = D.status(T.LOCAL)
    assert (now["release"], now["port"], now["running"]) == (first["release"], cfg.port, True)
    assert ask(cfg.port) is not None


# --- on the loopback sshd --------------------------------------------------------------------------------------

def ssh_cfg(tmp_path, **changes) -> D.DeployConfig:
    return D.DeployConfig(**{"port": free_port(), "ctx": 256, "check_timeout_s": TIMEOUT_S, "python": sys.executable,
                             "cache": str(tmp_path / "device-cache"), **changes})


def options(*servers) -> D.SSHOptions:
    return D.SSHOptions(known_hosts=str(servers[0].known_hosts), ssh_config=str(servers[0].ssh_config))


def tunnel_chat(server, port: int) -> dict:
    """A fresh SSH connection and a chat completion through its tunnel to 127.0.0.1:port on the device."""
    with D.open_device(server.spec, options(server), sys.executable) as dev:
        return health.chat(dev, "127.0.0.1", port, "pistill", None, 4, TIMEOUT_S)


def state(sshd_server, cfg) -> tuple:
    """What is deployed and running, and every file of the device's cache."""
    s = D.status(sshd_server.spec, cfg.name, options(sshd_server), cfg.cache, sys.executable)
    files = sorted(str(p.relative_to(cfg.cache)) for p in Path(cfg.cache).rglob("*"))
    return s["release"], s["pid"], s["since"], s["candidate"], files


def test_ssh_deploy_lifecycle(models, sshd, reaper, tmp_path):
    cfg, ssh = ssh_cfg(tmp_path), options(sshd)
    first = D.deploy(str(models["run"]), sshd.spec, cfg, ssh)  # the connection is closed when it returns
    assert first["health"] == "ok" and first["uploaded_bytes"] == models["student"].stat().st_size
    assert tunnel_chat(sshd, cfg.port)["choices"][0]["message"]["role"] == "assistant"
    pid = D.status(sshd.spec, "pistill", ssh, cfg.cache, sys.executable)["pid"]
    assert tunnel_chat(sshd, cfg.port)["choices"] and D.status(sshd.spec, "pistill", ssh, cfg.cache,
                                                                sys.executable)["pid"] == pid  # after reconnecting
    assert D.deploy(str(models["run"]), sshd.spec, cfg, ssh)["skipped"]  # nothing uploaded the second time
    second = D.deploy(str(models["run"]), sshd.spec, dataclasses.replace(cfg, model="baseline"), ssh)
    now = D.status(sshd.spec, "pistill", ssh, cfg.cache, sys.executable)
    assert now["sha256"] == second["sha256"] == sha256_file(models["baseline"]) and second["previous"] == \
        first["release"]
    with pytest.raises(InputError, match="is not a whole GGUF file"):  # refused before it is uploaded
        D.deploy(str(models["truncated"]), sshd.spec, cfg, ssh)
    before = state(sshd, cfg)
    with pytest.raises(D.DeployError, match="not switched in: the service runs as before") as e:
        D.deploy(str(models["unloadable"]), sshd.spec, cfg, ssh)
    assert "pistx" in str(e.value) or "load" in str(e.value)
    after = state(sshd, cfg)
    assert after[:4] == before[:4]  # same release, same server, no candidate left
    assert tunnel_chat(sshd, cfg.port)["choices"]
    back = D.rollback(sshd.spec, cfg, ssh)
    assert back["sha256"] == first["sha256"] and tunnel_chat(sshd, cfg.port)["choices"]
    server = D.status(sshd.spec, "pistill", ssh, cfg.cache, sys.executable)["pid"]
    assert D.undeploy(sshd.spec, "pistill", ssh, cfg.cache, sys.executable)["stopped"]
    assert not served.alive(server) and our_pids(tmp_path) == []
    assert not (Path(cfg.cache) / "deploy" / "pistill").exists()


def test_bad_input_changes_nothing(models, sshd, reaper, tmp_path):
    cfg, ssh = ssh_cfg(tmp_path), options(sshd)
    D.deploy(str(models["run"]), sshd.spec, cfg, ssh)
    before = state(sshd, cfg)
    with pytest.raises(UsageError, match=r"--model 'teacher' is not a GGUF model of .*; valid: student, baseline"):
        D.deploy(str(models["run"]), sshd.spec, dataclasses.replace(cfg, model="teacher"), ssh)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        with pytest.raises(D.DeployError, match=f"port {busy.getsockname()[1]} on 127.0.0.1 is in use by another "
                                                "program"):
            D.deploy(str(models["baseline"]), sshd.spec, dataclasses.replace(cfg, port=busy.getsockname()[1]), ssh)
    with pytest.raises(ValueError, match="listen 0.0.0.0 would let anyone on the network use the model"):
        dataclasses.replace(cfg, listen="0.0.0.0")
    per_token = D.kv_bytes(models["baseline"], 1)
    avail = doctor.probe(None, str(tmp_path), sys.executable)["mem_available_mb"] * (1 << 20)
    if 2 * avail / per_token >= 2**31:
        pytest.skip("this machine has more memory than a context can fill")
    with pytest.raises(D.DeployError, match="needs about .* MiB, the device has .* MiB available"):
        D.deploy(str(models["baseline"]), sshd.spec, dataclasses.replace(cfg, ctx=int(2 * avail / per_token)), ssh)
    assert state(sshd, cfg) == before  # the same server, release and cache: nothing uploaded, nothing started
    assert tunnel_chat(sshd, cfg.port)["choices"]


def test_fleet_with_a_device_down(models, sshd, sshd_factory, reaper, tmp_path):
    down = sshd_factory("down", run=False)
    ssh = options(sshd)
    cfg = ssh_cfg(tmp_path)
    canary_down = D.deploy_fleet(str(models["run"]), [down.spec, sshd.spec], cfg, ssh)
    assert f"cannot reach 127.0.0.1:{down.port}" in canary_down[down.spec]["error"]
    assert "not deployed: the canary" in canary_down[sshd.spec]["error"]
    assert not (Path(cfg.cache) / "deploy").exists()  # the canary failed: nothing touched the other device
    fleet = D.deploy_fleet(str(models["run"]), [sshd.spec, down.spec], cfg, ssh)
    assert fleet[sshd.spec]["health"] == "ok" and fleet[sshd.spec]["service"] == "supervised"
    assert f"cannot reach 127.0.0.1:{down.port}" in fleet[down.spec]["error"]
    assert tunnel_chat(sshd, cfg.port)["choices"]


# --- pure parts ------------------------------------------------------------------------------------------------

def test_unit_text_and_commands():
    d, py = "/home/pi/.cache/pistill/deploy/chat", "/home/pi/.cache/pistill/venv/bin/python"
    text = served.unit_text("systemd-user", "chat", py, d, "pi")
    assert f'ExecStart="{py}" "{d}/served.py" "serve" "--dir" "{d}" "--slot" "main"\n' in text
    for line in ("Restart=on-failure", "UMask=0077", f"StandardOutput=append:{d}/log/main.log",
                 "WantedBy=default.target"):
        assert line in text.splitlines()
    assert "User=" not in text
    system = served.unit_text("systemd", "chat", py, d, "pi")
    assert "User=pi" in system.splitlines() and "WantedBy=multi-user.target" in system.splitlines()
    assert served.systemd_quote("/a b/%h$x\"") == '"/a b/%%h$$x\\""'
    assert served.unit_commands("systemd-user", "chat", "install") == [
        ["systemctl", "--user", "daemon-reload"], ["systemctl", "--user", "enable", "pistill-chat.service"]]
    assert served.unit_commands("systemd", "chat", "install", "/tmp/u") == [
        ["sudo", "-n", "install", "-m", "0644", "/tmp/u", "/etc/systemd/system/pistill-chat.service"],
        ["sudo", "-n", "systemctl", "daemon-reload"], ["sudo", "-n", "systemctl", "enable", "pistill-chat.service"]]
    assert served.unit_commands("systemd-user", "chat", "start") == [
        ["systemctl", "--user", "restart", "pistill-chat.service"]]
    assert served.unit_commands("systemd", "chat", "remove") == [
        ["sudo", "-n", "systemctl", "disable", "pistill-chat.service"],
        ["sudo", "-n", "rm", "-f", "/etc/systemd/system/pistill-chat.service"],
        ["sudo", "-n", "systemctl", "daemon-reload"]]
    assert served.unit_path("systemd-user", "chat", "/home/pi") == \
        "/home/pi/.config/systemd/user/pistill-chat.service"
    assert served.detect_kind("supervised") == "supervised"


@pytest.mark.parametrize("changes, match", [
    ({"name": "Bad Name"}, "name 'Bad Name' must be"),
    ({"port": 0}, "port 0 is not a TCP port"),
    ({"listen": "pi.local"}, "listen 'pi.local' is not an IP address"),
    ({"listen": "0.0.0.0"}, "would let anyone on the network"),
    ({"api_key_file": "k", "api_key_env": "K"}, "not both"),
    ({"ctx": 0}, "ctx 0 must be"),
    ({"threads": -1}, "threads -1 must be"),
    ({"check_timeout_s": float("nan")}, "check_timeout_s nan must be"),
    ({"service": "docker"}, "service 'docker' is unknown; valid: auto, systemd-user, systemd, supervised"),
])
def test_bad_config_values(changes, match):
    with pytest.raises(ValueError, match=match):
        D.DeployConfig(**changes)


@pytest.mark.parametrize("cfg", [D.DeployConfig(), D.DeployConfig(listen="0.0.0.0", api_key_env="K", ctx=4096,
                                                                     threads=4, service="systemd-user")])
def test_config_round_trip(cfg):
    assert D.DeployConfig(**dataclasses.asdict(cfg)) == cfg


def test_api_key_sources(tmp_path, monkeypatch):
    (tmp_path / "k").write_text("s3cret\n")
    assert D.read_api_key(D.DeployConfig(api_key_file=str(tmp_path / "k"))) == "s3cret"
    monkeypatch.setenv("K", "two words")
    with pytest.raises(UsageError, match="--api-key-env K: the key is empty or holds spaces") as e:
        D.read_api_key(D.DeployConfig(api_key_env="K"))
    assert "two words" not in str(e.value)
    os.mkfifo(tmp_path / "fifo")  # would block a read
    with pytest.raises(UsageError, match="cannot be read"):
        D.read_api_key(D.DeployConfig(api_key_file=str(tmp_path / "fifo")))


def test_http_responses():
    assert health.parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}", "x") == (200, {})
    chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\n{\"a\"\r\n3\r\n: 1\r\n1\r\n}\r\n0\r\n\r\n"
    assert health.parse_response(chunked, "x") == (200, {"a": 1})
    with pytest.raises(D.DeployError, match="x: the answer is not HTTP"):
        health.parse_response(b"SSH-2.0-OpenSSH\r\n", "x")


def test_the_recipes_deploy_table_and_bench_targets_are_the_defaults(tmp_path, capfd):
    """`[deploy]` in a recipe sets the options (the command line wins) and `[bench]` names the devices."""
    from pistill import recipe
    from pistill.cli import main

    r = tmp_path / "r.toml"
    r.write_text('[deploy]\nname = "chat"\nport = 9001\nctx = 512\n[bench]\ntarget = "local"\n')
    rec = recipe.load(r)
    assert (rec.deploy.name, rec.deploy.port, rec.deploy.ctx) == ("chat", 9001, 512)
    r.write_text('[deploy]\nlisten = "0.0.0.0"\n')
    with pytest.raises(recipe.RecipeError, match=r"\[deploy\] .*listen 0.0.0.0 would let anyone"):
        recipe.load(r)
    capfd.readouterr()
    assert main(["status", "--name", "x"]) == 2
    assert "needs --target" in capfd.readouterr().err
