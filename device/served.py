#!/usr/bin/env python3
"""The device side of `pistill deploy` (standard library only): releases of a GGUF model, served by llama-cpp-python.

The server is llama-cpp-python's OpenAI-compatible one (`llama_cpp.server`: its FastAPI app under uvicorn), run with
the python that pistill provisions for benchmarking: that venv already holds llama-cpp-python built for the board
(the cross-built wheel, the very build that was benchmarked), so serving adds only packages with ready wheels (fastapi,
uvicorn, sse-starlette, starlette-context, pydantic-settings, PyYAML), not a second cross build of llama-server.
`serve` builds llama-cpp-python's app from its own settings models in this process (what `python -m llama_cpp.server
--config_file F` does), so the API key is read from a 0600 file and never appears in argv or the environment, and
stray HOST / PORT / MODEL variables cannot change what is served. The model's chat template is the GGUF's own.

Layout of DIR = <cache>/deploy/<name>/ (mode 0700):
  releases/<id>/model.gguf   a link to the verified blob <cache>/blobs/<sha256> (id: sha12-settings8)
  releases/<id>/meta.json    sha256, source, model key, created, ctx, alias, threads, host, port (never the key)
  releases/<id>/api_key      the API key, mode 0600 (only with an API key)
  current, previous          links to releases/<id>, each switched atomically (a link at a temporary name, renamed)
  state.json                 the main service: kind, since, release, python
  run/<slot>.*               per slot ("main", "candidate"): supervisor pid, the server's record, its crash record
  log/<slot>.log             the server's output
  served.py                  this script, installed by `prepare`: what units and supervisors run
Service kinds: "systemd-user" (a user unit, where `systemctl --user` works and lingering is on), "systemd" (a system
unit through `sudo -n`, where PID 1 is systemd), else "supervised" (a detached supervisor that restarts the server).
Every subcommand prints one JSON object on its last stdout line ({"ok": false, "error": ...} and exit 1 on failure).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import getpass
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

SLOTS = ("main", "candidate")
KINDS = ("systemd-user", "systemd", "supervised")
POLL_S = 0.2
STOP_WAIT_S = 15.0  # SIGTERM, then this long before SIGKILL
BACKOFF_S = (1, 2, 4, 8, 16, 30)  # between restarts of a crashed server
STABLE_S = 60.0  # a server up this long resets the backoff
LOG_MAX = 10 << 20  # a log over this size is cut when a slot starts
LOCK_WAIT_S = 900.0  # how long a command waits for another one changing the same deployment
CHANGES = ("prepare", "start", "stop", "switch", "rollback", "undeploy")  # the commands that take the lock
SUPERVISOR = "pistill-supervisor:"  # the supervisor's own log lines


class Fail(Exception):
    """A one-line error for the JSON answer."""


def answer(obj: dict) -> None:
    print(json.dumps(obj), flush=True)


# --- files -----------------------------------------------------------------------------------------------------

def write_atomic(path: str, text: str, mode: int = 0o600) -> None:
    """`text` at `path`, whole or not at all (a fresh temporary of `mode`, fsynced, renamed over the name)."""
    tmp = f"{path}.tmp-{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_json(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def link_atomic(target: str, link: str) -> None:
    """Point `link` at `target` in one step: a symlink at a temporary name renamed over `link`."""
    tmp = f"{link}.tmp-{os.getpid()}"
    if os.path.lexists(tmp):
        os.unlink(tmp)
    os.symlink(target, tmp)
    os.replace(tmp, link)


def run_file(d: str, slot: str, what: str) -> str:
    return os.path.join(d, "run", f"{slot}.{what}")


def script(d: str) -> str:
    return os.path.join(d, "served.py")


def alive(pid) -> bool:
    """A live process (a zombie is not): /proc where there is one, else signal 0."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except (OSError, IndexError):
        pass
    try:
        os.kill(pid, 0)
        return not os.path.isdir("/proc")
    except OSError:
        return False


def ours(pid, d: str) -> bool:
    """`pid` is alive and runs this deployment's served.py (a reused pid is someone else's)."""
    if not alive(pid):
        return False
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().decode(errors="replace").split("\0")
    except OSError:
        return True  # no /proc: trust the pid file
    return script(d) in argv and d in argv


def rss_mb(pid) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def log_tail(d: str, slot: str) -> str:
    """The server's last line of output (the supervisor's own lines skipped)."""
    try:
        with open(os.path.join(d, "log", f"{slot}.log"), "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - 8192))
            lines = f.read().decode(errors="replace").splitlines()
    except OSError:
        return "no log"
    lines = [ln.strip() for ln in lines if ln.strip() and not ln.startswith(SUPERVISOR)]
    return lines[-1][:300] if lines else "no output"


def open_log(d: str, slot: str):
    os.makedirs(os.path.join(d, "log"), mode=0o700, exist_ok=True)
    path = os.path.join(d, "log", f"{slot}.log")
    if os.path.isfile(path) and os.path.getsize(path) > LOG_MAX:
        os.replace(path, path + ".1")
    return open(path, "ab")


# --- releases --------------------------------------------------------------------------------------------------

def prepare(d: str, release: str, blob: str, meta: dict) -> dict:
    """releases/<release>/ with model.gguf linked to the blob and meta.json; installs this script into `d`."""
    blob = os.path.abspath(blob)
    if not os.path.isfile(blob):
        raise Fail(f"the model blob {blob} is not on the device; rerun pistill deploy to upload it")
    rel = os.path.join(d, "releases", release)
    existed = os.path.isdir(rel)
    for folder in (d, os.path.join(d, "releases"), rel, os.path.join(d, "run")):
        os.makedirs(folder, mode=0o700, exist_ok=True)
        os.chmod(folder, 0o700)
    link_atomic(blob, os.path.join(rel, "model.gguf"))
    write_atomic(os.path.join(rel, "meta.json"), json.dumps({**meta, "release": release}, indent=1), 0o644)
    with open(os.path.abspath(__file__)) as f:
        me = f.read()
    if not os.path.isfile(script(d)) or _text(script(d)) != me:
        write_atomic(script(d), me, 0o755)
    return {"ok": True, "release": release, "existed": existed}


def _text(path: str) -> str:
    with open(path) as f:
        return f.read()


def release_of(d: str, link: str) -> dict | None:
    """The release a link points at, as its meta.json (with "release"), None when there is none."""
    path = os.path.join(d, link)
    if not os.path.islink(path):
        return None
    meta = read_json(os.path.join(path, "meta.json"))
    return dict(meta, release=os.path.basename(os.readlink(path))) if meta else None


def switch(d: str, release: str) -> dict:
    """previous <- current, current <- release (each link replaced atomically); other releases are removed."""
    rel = os.path.join(d, "releases", release)
    if not os.path.isfile(os.path.join(rel, "meta.json")):
        raise Fail(f"release {release} is not prepared on the device; rerun pistill deploy")
    cur = release_of(d, "current")
    if cur and cur["release"] != release:
        link_atomic(os.path.join("releases", cur["release"]), os.path.join(d, "previous"))
    link_atomic(os.path.join("releases", release), os.path.join(d, "current"))
    keep = {release, (release_of(d, "previous") or {}).get("release")}
    for other in os.listdir(os.path.join(d, "releases")):
        if other not in keep:
            shutil.rmtree(os.path.join(d, "releases", other), ignore_errors=True)
    return {"ok": True, "current": release, "previous": (release_of(d, "previous") or {}).get("release")}


def rollback(d: str) -> dict:
    """Swap current and previous."""
    cur, prev = release_of(d, "current"), release_of(d, "previous")
    if prev is None:
        raise Fail("there is no previous release to roll back to (only one model was ever deployed under this name)")
    link_atomic(os.path.join("releases", cur["release"]), os.path.join(d, "previous"))
    link_atomic(os.path.join("releases", prev["release"]), os.path.join(d, "current"))
    return {"ok": True, "current": prev["release"], "previous": cur["release"]}


# --- the server ------------------------------------------------------------------------------------------------

def slot_settings(d: str, slot: str) -> dict:
    """What a slot serves: the current release (main) or the one `start` named (candidate), with its key."""
    if slot == "main":
        meta, host, port = release_of(d, "current"), None, None
    else:
        cand = read_json(run_file(d, slot, "json")) or {}
        meta = read_json(os.path.join(d, "releases", str(cand.get("release")), "meta.json"))
        host, port = "127.0.0.1", cand.get("port")  # a candidate answers only through the tunnel
    if not meta:
        raise Fail(f"no release to serve in the {slot} slot")
    rel = os.path.join(d, "releases", meta["release"])
    key_file = os.path.join(rel, "api_key")
    key = _text(key_file).strip() if os.path.isfile(key_file) else None
    return {"model": os.path.realpath(os.path.join(rel, "model.gguf")), "alias": meta["alias"], "ctx": meta["ctx"],
            "threads": meta.get("threads") or 0, "host": host or meta["host"], "port": port or meta["port"],
            "api_key": key, "release": meta["release"]}


def serve(d: str, slot: str) -> int:
    """Run llama-cpp-python's OpenAI-compatible server for a slot in this process (what systemd or the supervisor
    runs). The port is bound before the model loads (a port someone else holds fails at once) and listened on once it
    has loaded, so whatever answers on it is this server; an error before that goes to run/<slot>.crash for `start`."""
    crash = run_file(d, slot, "crash")
    try:
        s = slot_settings(d, slot)
        write_atomic(run_file(d, slot, "server"), json.dumps({"pid": os.getpid(), "started": time.time(),
                                                              "release": s["release"], "port": s["port"]}))
        sock = bind(s["host"], s["port"])
        import uvicorn
        from llama_cpp.server.app import create_app
        from llama_cpp.server.settings import ModelSettings, ServerSettings

        model = {"model": s["model"], "model_alias": s["alias"], "n_ctx": s["ctx"], "verbose": False}
        if s["threads"]:
            model["n_threads"] = model["n_threads_batch"] = s["threads"]
        app = create_app(server_settings=ServerSettings.model_validate(
            {"host": s["host"], "port": s["port"], "api_key": s["api_key"]}),
            model_settings=[ModelSettings.model_validate(model)])
    except (Exception, SystemExit) as e:
        why = str(e) if isinstance(e, Fail) else f"{type(e).__name__}: {e}"
        write_atomic(crash, json.dumps({"time": time.time(), "error": why}))
        raise
    uvicorn.Server(uvicorn.Config(app, host=s["host"], port=s["port"], log_level="info")).run(sockets=[sock])
    return 0


def bind(host: str, port: int) -> socket.socket:
    """The server's socket, bound (as uvicorn binds: SO_REUSEADDR) but not yet listening; Fail when it is taken."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise Fail(f"port {port} on {host} is taken by another program ({e.strerror})") from None
    return sock


def serve_argv(python: str, d: str, slot: str) -> list[str]:
    return [python, script(d), "serve", "--dir", d, "--slot", slot]


def _die_with_parent() -> None:
    """The server gets SIGTERM when its supervisor dies (Linux prctl PR_SET_PDEATHSIG)."""
    try:
        import ctypes
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def supervise(d: str, slot: str, python: str, restarts: int, ttl: float) -> int:
    """Run the server, restarting it after a crash with backoff (at most `restarts` times; -1: always) until SIGTERM,
    which takes the server down too; with `ttl`, stop after that many seconds (a candidate never outlives its
    check)."""
    stopping = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: stopping.append(signum))
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    write_atomic(run_file(d, slot, "pid"), str(os.getpid()))
    end, tries = (time.monotonic() + ttl) if ttl > 0 else None, 0
    while not stopping:
        t0 = time.monotonic()
        child = subprocess.Popen(serve_argv(python, d, slot), stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)
        rc = _wait_child(child, stopping, end)
        print(f"{SUPERVISOR} server (pid {child.pid}) exited with {rc}", flush=True)
        if stopping or (end and time.monotonic() >= end) or (0 <= restarts <= tries):
            break
        tries = 1 if time.monotonic() - t0 > STABLE_S else tries + 1
        pause = time.monotonic() + BACKOFF_S[min(tries, len(BACKOFF_S)) - 1]
        while not stopping and time.monotonic() < pause:
            time.sleep(POLL_S)
    if (read_json(run_file(d, slot, "pid")) or 0) == os.getpid():
        os.unlink(run_file(d, slot, "pid"))
    return 0


def _wait_child(child: subprocess.Popen, stopping: list, end: float | None) -> int:
    """The child's exit code; it is sent SIGTERM once `stopping` or past `end`, and SIGKILL STOP_WAIT_S later."""
    asked = None
    while True:
        try:
            return child.wait(timeout=POLL_S)
        except subprocess.TimeoutExpired:
            pass
        if asked is None and (stopping or (end and time.monotonic() >= end)):
            child.terminate()
            asked = time.monotonic()
        elif asked is not None and time.monotonic() - asked > STOP_WAIT_S:
            child.kill()


def launch_supervisor(d: str, slot: str, python: str, restarts: int, ttl: float) -> subprocess.Popen:
    """The supervisor as a detached process (its own session, stdio to the slot's log), so it outlives the SSH
    connection and the command that started it."""
    with open_log(d, slot) as logf:
        return subprocess.Popen([python, script(d), "supervise", "--dir", d, "--slot", slot, "--python", python,
                                 "--restarts", str(restarts), "--ttl", f"{ttl:g}"], stdin=subprocess.DEVNULL,
                                stdout=logf, stderr=subprocess.STDOUT, start_new_session=True, close_fds=True, cwd=d)


# --- systemd ---------------------------------------------------------------------------------------------------

def unit_name(name: str) -> str:
    return f"pistill-{name}.service"


def unit_path(kind: str, name: str, home: str) -> str:
    if kind == "systemd-user":
        return os.path.join(home, ".config", "systemd", "user", unit_name(name))
    return f"/etc/systemd/system/{unit_name(name)}"


def systemd_quote(arg: str) -> str:
    """One ExecStart argument as systemd reads it (double quotes; `%` and `$` doubled: specifiers, variables)."""
    text = arg.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%").replace("$", "$$")
    return f'"{text}"'


def unit_text(kind: str, name: str, python: str, d: str, user: str) -> str:
    """The unit that runs the main slot's server; Restart=on-failure restarts a crashed server."""
    exec_start = " ".join(systemd_quote(a) for a in serve_argv(python, d, "main"))
    who = f"User={user}\n" if kind == "systemd" else ""
    target = "default.target" if kind == "systemd-user" else "multi-user.target"
    return (f"[Unit]\nDescription=pistill {name}: a GGUF model served by llama-cpp-python (OpenAI API)\n"
            "After=network-online.target\nWants=network-online.target\nStartLimitIntervalSec=0\n\n"
            f"[Service]\nType=simple\n{who}WorkingDirectory={d}\nExecStart={exec_start}\n"
            "Environment=PYTHONUNBUFFERED=1\nRestart=on-failure\nRestartSec=3\nTimeoutStopSec=15\nUMask=0077\n"
            f"StandardOutput=append:{d}/log/main.log\nStandardError=inherit\n\n[Install]\nWantedBy={target}\n")


def unit_commands(kind: str, name: str, action: str, staged: str = "") -> list[list[str]]:
    """The commands for `action` ("install": put the unit in place and enable it, "start", "stop", "remove"); a
    system unit goes through `sudo -n` (never a password prompt), and is installed from the `staged` file."""
    unit = unit_name(name)
    ctl = ["systemctl", "--user"] if kind == "systemd-user" else ["sudo", "-n", "systemctl"]
    put = [] if kind == "systemd-user" else [["sudo", "-n", "install", "-m", "0644", staged,
                                               unit_path(kind, name, "")]]
    drop = [] if kind == "systemd-user" else [["sudo", "-n", "rm", "-f", unit_path(kind, name, "")]]
    return {"install": put + [[*ctl, "daemon-reload"], [*ctl, "enable", unit]],
            "start": [[*ctl, "restart", unit]],
            "stop": [[*ctl, "stop", unit]],
            "remove": [[*ctl, "disable", unit]] + drop + [[*ctl, "daemon-reload"]]}[action]


def ok(argv: list[str], timeout: float = 30) -> subprocess.CompletedProcess | None:
    """The finished command when it exits 0, else None (also when it is not installed)."""
    try:
        p = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return p if p.returncode == 0 else None


def detect_kind(want: str) -> str:
    """`want`, or for "auto": a user unit where the user manager runs and lingering is (or can be) on (so it outlives
    the SSH session), a system unit where PID 1 is systemd and sudo needs no password, else the supervisor."""
    if want != "auto":
        return want
    user = getpass.getuser()
    if ok(["systemctl", "--user", "show-environment"]):
        ok(["loginctl", "enable-linger", user])
        linger = ok(["loginctl", "show-user", user, "-p", "Linger"])
        if linger and linger.stdout.strip() == "Linger=yes":
            return "systemd-user"
    try:
        with open("/proc/1/comm") as f:
            pid1 = f.read().strip()
    except OSError:
        pid1 = ""
    if pid1 == "systemd" and ok(["sudo", "-n", "true"]):
        return "systemd"
    return "supervised"


def systemd_do(kind: str, d: str, python: str, action: str) -> None:
    name = os.path.basename(d)
    staged = ""
    if action == "install":
        open_log(d, "main").close()  # the user's own file, before systemd appends to it
        text = unit_text(kind, name, python, d, getpass.getuser())
        staged = unit_path(kind, name, os.path.expanduser("~")) if kind == "systemd-user" else run_file(d, "main",
                                                                                                         "unit")
        os.makedirs(os.path.dirname(staged), exist_ok=True)
        write_atomic(staged, text, 0o644)
    elif action == "remove" and kind == "systemd-user":
        path = unit_path(kind, name, os.path.expanduser("~"))
        if os.path.exists(path):
            os.unlink(path)
    for argv in unit_commands(kind, name, action, staged):
        p = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
        if p.returncode != 0 and action not in ("stop", "remove"):
            raise Fail(f"`{' '.join(argv)}` failed: {(p.stderr or p.stdout).strip()[-300:]}")


# --- slots -----------------------------------------------------------------------------------------------------

def connect_host(host: str) -> str:
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)


def listening(host: str, port: int) -> bool:
    try:
        with socket.create_connection((connect_host(host), port), timeout=1):
            return True
    except OSError:
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_pid(d: str, slot: str) -> int | None:
    rec = read_json(run_file(d, slot, "server")) or {}
    return rec.get("pid") if ours(rec.get("pid"), d) else None


def stop_slot(d: str, slot: str) -> bool:
    """Stop a slot's server (and its supervisor, or its unit); True when something was running."""
    state = read_json(os.path.join(d, "state.json")) or {}
    kind = state.get("kind") if slot == "main" else "supervised"
    was = False
    if kind in ("systemd-user", "systemd"):
        was = server_pid(d, slot) is not None
        systemd_do(kind, d, state.get("python", sys.executable), "stop")
    sup = read_json(run_file(d, slot, "pid"))
    for pid in (sup if ours(sup, d) else None, server_pid(d, slot)):
        if pid is not None:
            was = True
            _terminate(pid, d)
    for what in ("pid", "server"):
        if os.path.exists(run_file(d, slot, what)):
            os.unlink(run_file(d, slot, what))
    return was


def _terminate(pid: int, d: str) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except OSError:
        return
    end = time.monotonic() + STOP_WAIT_S
    while ours(pid, d) and time.monotonic() < end:
        time.sleep(0.05)
    if ours(pid, d):
        os.kill(pid, signal.SIGKILL)


def start(d: str, slot: str, python: str, kind: str, timeout: float, release: str = "", port: int = 0) -> dict:
    """Start a slot and wait until its server listens: the candidate (a given release on a free loopback port, under
    a supervisor that never restarts it and stops it after its check's time) or the main service (the current
    release, as `kind`), stopping what ran in the slot before."""
    stop_slot(d, slot)
    if os.path.exists(run_file(d, slot, "crash")):
        os.unlink(run_file(d, slot, "crash"))
    since = time.time()
    if slot == "candidate":
        port = port or free_port()
        write_atomic(run_file(d, slot, "json"), json.dumps({"release": release, "port": port}))
        proc = launch_supervisor(d, slot, python, 0, 2 * timeout + 60)
        running, kind = (lambda: proc.poll() is None), "supervised"
    else:
        kind = _main_kind(d, kind)
        write_atomic(os.path.join(d, "state.json"), json.dumps({"kind": kind, "since": since, "python": python,
                                                                "release": release_of(d, "current")["release"]}))
        running = _start_main(d, python, kind)
    s = slot_settings(d, slot)
    try:
        rec = wait_ready(d, slot, s["host"], s["port"], since, timeout, running)
    except Fail:
        stop_slot(d, slot)  # a server that does not come up is not left restarting in a loop
        raise
    return {"ok": True, "slot": slot, "kind": kind, "pid": rec["pid"], "host": s["host"], "port": s["port"],
            "release": s["release"]}


def _main_kind(d: str, want: str) -> str:
    """The kind the main slot runs as now; the unit of another kind that ran it before is removed."""
    if release_of(d, "current") is None:
        raise Fail("no current release to serve; deploy a model first")
    kind, old = detect_kind(want), read_json(os.path.join(d, "state.json")) or {}
    if old.get("kind") in ("systemd-user", "systemd") and old["kind"] != kind:
        systemd_do(old["kind"], d, old.get("python", sys.executable), "remove")
    return kind


def _start_main(d: str, python: str, kind: str):
    """Start the main slot as `kind`; returns a function telling whether it still runs."""
    if kind == "supervised":
        proc = launch_supervisor(d, "main", python, -1, 0)
        return lambda: proc.poll() is None
    systemd_do(kind, d, python, "install")
    systemd_do(kind, d, python, "start")
    return lambda: True  # systemd restarts a crash; the crash record or the time limit ends the wait


def wait_ready(d: str, slot: str, host: str, port: int, since: float, timeout: float, running) -> dict:
    """The server's record once it listens; Fail with its own error when it crashes or never listens."""
    end = time.monotonic() + timeout
    while True:
        crash = read_json(run_file(d, slot, "crash"))
        if crash:
            raise Fail(f"the {slot} server failed to start: {crash['error'][:300]}")
        rec = read_json(run_file(d, slot, "server")) or {}
        if rec.get("started", 0) >= since and alive(rec.get("pid")) and listening(host, port):
            return rec
        if not running():
            raise Fail(f"the {slot} server exited: {log_tail(d, slot)}")
        if time.monotonic() > end:
            raise Fail(f"the {slot} server does not listen on {host}:{port} after {timeout:g} s: {log_tail(d, slot)}")
        time.sleep(POLL_S)


def status(d: str) -> dict:
    if not os.path.isdir(d):
        return {"ok": True, "deployed": False}
    state, prev = read_json(os.path.join(d, "state.json")) or {}, release_of(d, "previous")
    cur, pid = release_of(d, "current") or {}, server_pid(d, "main")
    return {"ok": True, "deployed": bool(cur), "kind": state.get("kind"), "python": state.get("python"),
            "running": pid is not None, "pid": pid,
            "listening": bool(pid) and listening(cur.get("host", ""), cur.get("port", 0)),
            "host": cur.get("host"), "port": cur.get("port"), "since": state.get("since"),
            "release": cur.get("release"), "sha256": cur.get("sha256"), "alias": cur.get("alias"),
            "source": cur.get("source"), "ctx": cur.get("ctx"), "rss_mb": rss_mb(pid) if pid else None,
            "previous": prev and {"release": prev["release"], "sha256": prev["sha256"]},
            "candidate": server_pid(d, "candidate") is not None}


def undeploy(d: str) -> dict:
    """Stop both slots, remove the unit and the deployment folder (the model blobs stay in the cache)."""
    if os.path.basename(os.path.dirname(d)) != "deploy":
        raise Fail(f"{d} is not a deployment folder (<cache>/deploy/<name>)")
    if not os.path.isdir(d):
        return {"ok": True, "removed": False, "stopped": False}
    state = read_json(os.path.join(d, "state.json")) or {}
    stopped = stop_slot(d, "candidate") | stop_slot(d, "main")
    if state.get("kind") in ("systemd-user", "systemd"):
        systemd_do(state["kind"], d, state.get("python", sys.executable), "remove")
    shutil.rmtree(d)
    return {"ok": True, "removed": True, "stopped": stopped}


def port_free(d: str, host: str, port: int) -> dict:
    """Whether `host:port` can be bound (as uvicorn binds: SO_REUSEADDR), and whether our main server holds it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
            free = True
        except OSError:
            free = False
    cur = release_of(d, "current") or {}
    mine = not free and server_pid(d, "main") is not None and cur.get("port") == port
    return {"ok": True, "free": free, "ours": mine}


# --- command line ----------------------------------------------------------------------------------------------

def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="served.py", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    for name in ("prepare", "start", "stop", "status", "switch", "rollback", "undeploy", "port-free", "serve",
                 "supervise"):
        s = sub.add_parser(name)
        s.add_argument("--dir", required=True, help="<cache>/deploy/<name>, absolute")
        if name in ("start", "stop", "serve", "supervise"):
            s.add_argument("--slot", choices=SLOTS, default="main")
        if name in ("start", "supervise"):
            s.add_argument("--python", default=sys.executable, help="the python that runs the server")
        if name in ("prepare", "start", "switch"):
            s.add_argument("--release", default="")
        if name in ("start", "port-free"):
            s.add_argument("--port", type=int, default=0)
    sub.choices["prepare"].add_argument("--blob", required=True)
    sub.choices["prepare"].add_argument("--meta", required=True, help="the release's meta.json, as JSON")
    sub.choices["start"].add_argument("--kind", choices=("auto",) + KINDS, default="auto")
    sub.choices["start"].add_argument("--timeout", type=float, default=120.0)
    sub.choices["port-free"].add_argument("--host", default="127.0.0.1")
    sub.choices["supervise"].add_argument("--restarts", type=int, default=-1)
    sub.choices["supervise"].add_argument("--ttl", type=float, default=0.0)
    return p


@contextlib.contextmanager
def locked(d: str, create: bool):
    """One command at a time changes a deployment: an flock on <cache>/deploy/.<name>.lock (beside the folder, which
    undeploy removes). A stop sent after Ctrl-C waits here for the start it interrupted, then stops what it started."""
    parent = os.path.dirname(d)
    if create:
        os.makedirs(parent, mode=0o700, exist_ok=True)
    if not os.path.isdir(parent):
        yield
        return
    fd = os.open(os.path.join(parent, f".{os.path.basename(d)}.lock"), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        end = time.monotonic() + LOCK_WAIT_S
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > end:
                    raise Fail(f"another pistill command has been changing {d} for {LOCK_WAIT_S:g} s; wait for it "
                               "or stop it") from None
                time.sleep(POLL_S)
        yield
    finally:
        os.close(fd)


def dispatch(a) -> dict | int:
    d = os.path.abspath(a.dir)
    if a.command == "serve":
        return serve(d, a.slot)
    if a.command == "supervise":
        return supervise(d, a.slot, a.python, a.restarts, a.ttl)
    table = {
        "prepare": lambda: prepare(d, a.release, a.blob, json.loads(a.meta)),
        "start": lambda: start(d, a.slot, a.python, a.kind, a.timeout, a.release, a.port),
        "stop": lambda: {"ok": True, "stopped": stop_slot(d, a.slot)},
        "status": lambda: status(d),
        "switch": lambda: switch(d, a.release),
        "rollback": lambda: rollback(d),
        "undeploy": lambda: undeploy(d),
        "port-free": lambda: port_free(d, a.host, a.port),
    }
    return table[a.command]()


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    try:
        with locked(os.path.abspath(a.dir), a.command == "prepare") if a.command in CHANGES \
                else contextlib.nullcontext():
            result = dispatch(a)
    except Fail as e:
        answer({"ok": False, "error": str(e)})
        return 1
    except OSError as e:
        answer({"ok": False, "error": f"{type(e).__name__}: {e}"})
        return 1
    if isinstance(result, dict):
        answer(result)
        return 0
    return result


if __name__ == "__main__":
    sys.exit(main())
