"""SSH targets: spec parsing through ssh_config, host-key checks, quoted commands with limits, on a real sshd."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import socket
import struct
import subprocess
import sys
import threading
import time

import pytest

from pistill.device import target as T
from sshd import SSHServer, keygen, sshd, sshd_factory  # noqa: F401 (fixtures)

SSH_CONFIG = """\
Host pi5
  HostName 10.1.2.3
  User pi
  Port 2222
  IdentityFile ~/.ssh/pi5_ed25519
  ServerAliveInterval 7
Host pi4
  HostName pi4.lan
  ProxyJump bastion
  UserKnownHostsFile ~/pistill_known_hosts
Host far
  HostName far.lan
  ProxyJump a,b
"""


@pytest.fixture
def ssh_config(tmp_path):
    path = tmp_path / "config"
    path.write_text(SSH_CONFIG)
    return path


@pytest.mark.parametrize("spec, host, user, port", [
    ("pi@pi5.local", "pi5.local", "pi", 22),
    ("pi@10.0.0.5:2200", "10.0.0.5", "pi", 2200),
    ("pi@[::1]:2200", "::1", "pi", 2200),
    ("pi5", "10.1.2.3", "pi", 2222),  # alias: HostName, User, Port from the config
    ("bob@pi5", "10.1.2.3", "bob", 2222),  # the spec's user wins, as with ssh
    ("pi5:2000", "10.1.2.3", "pi", 2000),
])
def test_parse_target(ssh_config, spec, host, user, port):
    t = T.parse_target(spec, ssh_config)
    assert (t.spec, t.host, t.user, t.port) == (spec, host, user, port)


def test_parse_target_reads_identity_jump_keepalive_known_hosts(ssh_config):
    pi5, pi4 = T.parse_target("pi5", ssh_config), T.parse_target("pi4", ssh_config)
    assert pi5.identity_files[0].endswith("/.ssh/pi5_ed25519") and "~" not in pi5.identity_files[0]
    assert pi5.keepalive_s == 7 and pi5.proxy_jump is None and pi5.host_key_name == "[10.1.2.3]:2222"
    assert pi4.proxy_jump == "bastion" and pi4.keepalive_s == T.KEEPALIVE_S and pi4.host_key_name == "pi4.lan"
    assert pi4.known_hosts.endswith("/pistill_known_hosts")


def test_jump_chain(ssh_config):
    far = T.parse_target("far", ssh_config)
    hop = T.jump_target(far, ssh_config)
    assert hop.host == "b" and hop.proxy_jump == "a"  # b is reached through a
    assert T.jump_target(hop, ssh_config).host == "a" and T.jump_target(T.parse_target("a", ssh_config),
                                                                       ssh_config) is None


@pytest.mark.parametrize("spec", ["pi@", "@host", "pi@host:99999", "pi@host:0", "a b", "pi@ho st", "pi@host:x",
                                  "-oProxyCommand=x", ""])
def test_bad_specs(spec):
    with pytest.raises(ValueError, match="is not understood"):
        T.check_spec(spec)


@pytest.mark.parametrize("config, spec, match", [
    ("Host pi\n  Port abc\n", "pi", r"config: Port 'abc' for pi is not a port number; write one from 1 to 65535"),
    ("Host pi\n  Port 70000\n", "pi@pi:2222", r"Port '70000' for pi@pi:2222 is not a port number"),  # read anyway
    ("Host pi\n  Port \uff12\uff12\n", "pi", "Port '\uff12\uff12' for pi is not a port number"),  # int() takes it
    ("Host pi\n  ServerAliveInterval x\n", "pi", r"ServerAliveInterval 'x' for pi is not a time; write seconds"),
    ("Host pi\n  ServerAliveInterval -5\n", "pi", r"ServerAliveInterval '-5' for pi is not a time"),
    ("Host pi\n  HostName a..b\n", "pi", r"HostName 'a..b' for pi is not a valid host name \(a dot-separated part "
                                        r"is empty or over 63 characters\); fix the name"),
    (f"Host pi\n  HostName {'a' * 70}.lan\n", "pi", r"HostName 'a{70}.lan' for pi is not a valid host name"),
    ("", "pi@a..b", r"host 'a..b' of target 'pi@a..b' is not a valid host name"),
    ("", f"pi@{'x' * 70}", r"host 'x{70}' of target 'pi@x{70}' is not a valid host name"),
    ("Host pi\n  HostName \"a b\"\n", "pi", r"HostName 'a b' for pi is not a valid host name \(it holds spaces"),
    ("Host pi\n  ProxyJump bastion,-oProxyCommand=x\n", "pi",
     r"ProxyJump 'bastion,-oProxyCommand=x' for pi: hop '-oProxyCommand=x' is not understood"),
    ("Host pi\n  ProxyJump a,,b\n", "pi", r"ProxyJump 'a,,b' for pi: hop '' is not understood"),
    ("Host pi\n  Port\n", "pi", r"config: Unparsable line Port; fix that line \(`ssh -G pi`"),
    ("Host pi\n  UserKnownHostsFile /tmp/a\x01b\n", "pi", r"UserKnownHostsFile '/tmp/a\\x01b' for pi holds control"),
])
def test_bad_ssh_config_values_are_one_line_usage_errors(tmp_path, config, spec, match):
    """A value ssh would refuse fails where it is read, naming the option and the fix, not as ValueError,
    UnicodeError (getaddrinfo's idna codec) or a traceback later."""
    path = tmp_path / "config"
    path.write_text(config)
    with pytest.raises(T.UsageError, match=match) as err:
        T.parse_target(spec, path)
    assert "\n" not in str(err.value) and err.value.exit_code == 2


def test_ssh_config_that_is_not_text_is_one_line(tmp_path):
    path = tmp_path / "config"
    path.write_bytes(b"Host pi\n  HostName \xff\xfe\n")
    with pytest.raises(T.UsageError, match=r"ssh_config .*config cannot be read \(UnicodeDecodeError: .*\); check "
                                           r"that it is a UTF-8 text file"):
        T.parse_target("pi", path)


@pytest.mark.parametrize("value, seconds", [("30", 30), ("1m30s", 90), ("2M", 120), ("0", T.KEEPALIVE_S)])
def test_server_alive_interval_in_ssh_time_format(tmp_path, value, seconds):
    path = tmp_path / "config"
    path.write_text(f"Host pi\n  ServerAliveInterval {value}\n  ProxyJump ssh://bob@jump:2200\n")
    t = T.parse_target("pi", path)
    assert t.keepalive_s == seconds and t.proxy_jump == "bob@jump:2200"  # an ssh:// URI hop, as OpenSSH takes it
    assert T.jump_target(t, path).port == 2200


@pytest.mark.parametrize("config, spec, loop", [
    ("Host pi\n  ProxyJump pi\n", "pi", "pi -> pi"),  # used to be a RecursionError
    ("Host *\n  ProxyJump bastion\n", "pi@10.0.0.5", "pi@10.0.0.5 -> bastion -> bastion"),  # Host * reaches the jump
    ("Host a\n  ProxyJump b\nHost b\n  ProxyJump a\n", "a", "a -> b -> a"),
])
def test_proxy_jump_loop_is_refused_before_connecting(tmp_path, config, spec, loop):
    path = tmp_path / "config"
    path.write_text(config)
    t0 = time.monotonic()
    for call in (lambda t: T.connect(t, ssh_config=path, timeout_s=1), lambda t: T.host_key(t, path, timeout_s=1)):
        with pytest.raises(T.UsageError, match=r"the ProxyJump chain of .* loops \(" + loop.replace(".", r"\.")
                           + r"\); give the jump host its own `ProxyJump none`") as err:
            call(T.parse_target(spec, path))
        assert "\n" not in str(err.value)
    assert time.monotonic() - t0 < 1  # nothing was dialled


def test_missing_named_ssh_config(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        T.parse_target("pi@pi5", tmp_path / "nope")


def test_last_line_and_describe():
    assert T.last_line("", "a\nboom\n\n") == "boom" and T.last_line("", "") == "no output"
    assert T.describe(["echo", "a b"]) == "echo 'a b'" and T.describe(["x" * 300]).endswith("...")


# --- against a real sshd --------------------------------------------------------------------------------------

def server_target(server: SSHServer) -> T.Target:
    return T.parse_target(server.spec, server.ssh_config)


def test_connect_and_run_quoted(sshd):
    with T.connect(server_target(sshd), sshd.known_hosts) as conn:
        res = conn.run(["printf", "%s|", "a b", "$HOME", "x; rm -rf /nope", "'q'"], 10)
        assert res.stdout == "a b|$HOME|x; rm -rf /nope|'q'|"  # every argument arrives literally
        assert conn.expand("~/x") == conn.home + "/x" and conn.expand("/abs") == "/abs"


def test_output_is_streamed_to_the_log(sshd, caplog):
    with caplog.at_level(logging.DEBUG, logger="pistill.device.target"), \
            T.connect(server_target(sshd), sshd.known_hosts) as conn:
        conn.run(["sh", "-c", "echo step one; echo warn two >&2"], 10, echo=True)
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert any(ln.endswith("| step one") for ln in lines) and any(ln.endswith("! warn two") for ln in lines)


def test_failing_command_names_its_last_error_line(sshd):
    with T.connect(server_target(sshd), sshd.known_hosts) as conn:
        with pytest.raises(T.TargetError, match=r"exited with code 3: second"):
            conn.run(["sh", "-c", "echo first >&2; echo second >&2; exit 3"], 10)
        assert conn.run(["sh", "-c", "exit 4"], 10, check=False).rc == 4


def test_command_past_its_limit_is_stopped(sshd):
    marker = f"{time.time_ns() % 10**6 + 1000.5}"  # a sleep argument no other process uses
    with T.connect(server_target(sshd), sshd.known_hosts) as conn:
        t0 = time.monotonic()
        with pytest.raises(T.RemoteTimeout, match=r"ran past its 1 s limit and was stopped"):
            conn.run(["sleep", marker], 1)
        assert time.monotonic() - t0 < 5
        left = conn.run(["sh", "-c", f"ps -eo args | grep -c '^sleep {marker}' || true"], 10).stdout.strip()
    assert left == "0"  # stopped on the device, not just abandoned


def test_stop_kills_the_running_command_on_the_device(sshd):
    """Ctrl-C in a fleet sets `conn.stop`: the command is killed on the device at once, not abandoned."""
    marker = f"{time.time_ns() % 10**6 + 2000.5}"
    with T.connect(server_target(sshd), sshd.known_hosts) as conn:
        assert conn.run(["sh", "-c", "echo only >&2"], 10).stderr == "only\n"  # the pid line is not in stderr
        conn.stop = threading.Event()
        threading.Timer(1.0, conn.stop.set).start()
        t0 = time.monotonic()
        with pytest.raises(T.Interrupted, match=r"interrupted; `sleep .*` was stopped"):
            conn.run(["sleep", marker], 600)
        assert time.monotonic() - t0 < 8  # not the 600 s limit
        conn.stop = None
        left = conn.run(["sh", "-c", f"ps -eo args | grep -c '^sleep {marker}' || true"], 10).stdout.strip()
    assert left == "0"


def test_unknown_host_is_refused_with_its_fingerprint(sshd, tmp_path):
    empty = tmp_path / "known_hosts"
    with pytest.raises(T.HostKeyError) as err:
        T.connect(server_target(sshd), empty)
    fp = subprocess.run(["ssh-keygen", "-lf", str(sshd.dir / "host_ed25519.pub")], capture_output=True,
                        text=True).stdout.split()[1]
    assert err.value.fingerprint == fp and fp in str(err.value) and "--accept-host-key" in str(err.value)
    assert not empty.exists()  # nothing was added
    with pytest.raises(T.HostKeyError, match="not the SHA256:wrong you accepted"):
        T.connect(server_target(sshd), empty, accept_host_key="SHA256:wrong")
    with T.connect(server_target(sshd), empty, accept_host_key=fp) as conn:  # the explicit opt-in
        conn.run(["true"], 10)
    assert empty.read_text().startswith(f"[127.0.0.1]:{sshd.port} ssh-ed25519 ")
    T.connect(server_target(sshd), empty).close()  # known now


def test_changed_host_key_is_refused(sshd, tmp_path):
    other = keygen(tmp_path / "other")
    known = tmp_path / "known_hosts"
    known.write_text(f"[127.0.0.1]:{sshd.port} {' '.join(other.split()[:2])}\n")
    with pytest.raises(T.HostKeyError, match="HOST KEY CHANGED") as err:
        T.connect(server_target(sshd), known)
    assert "ssh-keygen -f" in str(err.value)
    with pytest.raises(T.HostKeyError, match="HOST KEY CHANGED"):  # accepting does not override a known key
        T.connect(server_target(sshd), known, accept_host_key=err.value.fingerprint)


def test_trust(sshd, tmp_path):
    known, tgt = tmp_path / "kh", server_target(sshd)
    fp, state = T.trust(tgt, None, known)
    assert state == "unconfirmed" and fp.startswith("SHA256:") and not known.exists()
    with pytest.raises(T.HostKeyError, match="nothing was trusted"):
        T.trust(tgt, "SHA256:nope", known)
    assert T.trust(tgt, fp, known) == (fp, "added")
    assert T.trust(tgt, None, known) == (fp, "known")


def test_wrong_key_fails_authentication_with_the_fix(sshd, tmp_path):
    keygen(tmp_path / "stranger")
    tgt = dataclasses.replace(server_target(sshd), identity_files=(str(tmp_path / "stranger"),))
    with pytest.raises(T.TargetError, match="authentication failed.*ssh-copy-id"):
        T.connect(tgt, sshd.known_hosts)


def test_unreachable_device(sshd_factory):
    down = sshd_factory("down", run=False)
    with pytest.raises(T.TargetError, match=f"cannot reach 127.0.0.1:{down.port}"):
        T.connect(server_target(down), down.known_hosts, timeout_s=5)


RESET = "reset"  # for `not_ssh`: read the client's banner, then reset the connection (SO_LINGER 0)


@contextlib.contextmanager
def not_ssh(reply: bytes | str | None):
    """A real TCP listener on 127.0.0.1 that is not an SSH server; yields its port. Each connection gets `reply` and
    an orderly close, or RESET, or with None, hears nothing and stays open."""
    srv, stop, held = socket.create_server(("127.0.0.1", 0)), threading.Event(), []
    srv.settimeout(0.1)

    def answer(conn):
        try:
            if reply == RESET:
                conn.recv(4096)
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            else:
                conn.sendall(reply)
                conn.shutdown(socket.SHUT_WR)
                conn.settimeout(5)
                while conn.recv(4096):  # until the client hangs up: its unread banner would make a reset
                    pass
        except OSError:
            pass
        finally:
            conn.close()

    def serve():
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except OSError:  # the accept timeout: look at `stop` again
                continue
            if reply is None:
                held.append(conn)
            else:
                threading.Thread(target=answer, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield srv.getsockname()[1]
    finally:
        stop.set()
        thread.join(5)
        for conn in [srv, *held]:
            conn.close()


@pytest.mark.parametrize("reply, why", [
    (b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n", "it closed the connection without an SSH banner"),
    (b"\xff\xfb\x01\xff\xfb\x03login: \n", "it sent binary data, not an SSH banner"),  # a telnet server
    (RESET, "it closed the connection without an SSH banner"),
    (None, "no SSH banner within 1 s"),  # bounded by the timeout, not paramiko's 15 s per line
])
def test_host_that_does_not_speak_ssh_is_one_line(tmp_path, caplog, reply, why):
    """paramiko's transport thread logs the failure at ERROR with its traceback (about 30 lines before the error);
    that goes to DEBUG (-v shows it), and the error is one line."""
    (tmp_path / "config").write_text("")
    with not_ssh(reply) as port, caplog.at_level(logging.INFO):
        tgt = T.parse_target(f"pi@127.0.0.1:{port}", tmp_path / "config")
        t0 = time.monotonic()
        for call in (lambda: T.connect(tgt, tmp_path / "kh", timeout_s=1), lambda: T.host_key(tgt, timeout_s=1)):
            with pytest.raises(T.TargetError) as err:
                call()
            assert str(err.value) == (f"pi@127.0.0.1:{port} accepted a TCP connection but did not answer as an SSH "
                                      f"server ({why}); check the host and port")
        assert time.monotonic() - t0 < 6
        time.sleep(0.2)  # the transport threads' last words
    assert not [r for r in caplog.records if r.name.startswith("paramiko") and r.levelno > logging.INFO]
    assert "Traceback" not in caplog.text
    with not_ssh(reply) as port, caplog.at_level(logging.DEBUG):  # -v
        with pytest.raises(T.TargetError, match="did not answer as an SSH server"):
            T.connect(T.parse_target(f"pi@127.0.0.1:{port}", tmp_path / "config"), tmp_path / "kh", timeout_s=1)
        time.sleep(0.5)  # a silent host: its transport thread gives up after the error is raised
    shown = [r for r in caplog.records if r.name == "paramiko.transport" and "Traceback" in r.getMessage()]
    assert shown and all(r.levelno == logging.DEBUG for r in shown)


def test_cli_doctor_on_a_host_that_does_not_speak_ssh_prints_one_line(tmp_path):
    env = {"HOME": str(tmp_path), "PATH": "/usr/bin:/bin", "TMPDIR": str(tmp_path)}  # no other run's leftovers
    with not_ssh(b"220 mail.example ESMTP\r\n") as port:  # e.g. the port of another service
        runs = [subprocess.run([sys.executable, "-m", "pistill.cli", *v, "doctor", f"pi@127.0.0.1:{port}"],
                               capture_output=True, text=True, timeout=60, env=env) for v in ([], ["-v"])]
    quiet, verbose = runs
    assert quiet.returncode == verbose.returncode == 1
    assert quiet.stderr.splitlines() == [f"pistill: error: pi@127.0.0.1:{port} accepted a TCP connection but did not "
                                         "answer as an SSH server (it closed the connection without an SSH banner); "
                                         "check the host and port"], quiet.stderr
    assert "DEBUG    Exception (client)" in verbose.stderr  # paramiko's own account, at DEBUG


def test_proxy_jump(sshd, tmp_path):
    """`ProxyJump` through the server to itself: a direct-tcpip channel carries the second connection."""
    cfg = tmp_path / "config"
    cfg.write_text(sshd.ssh_config.read_text().replace("Host *", f"Host viajump\n  HostName 127.0.0.1\n"
                                                       f"  Port {sshd.port}\n  ProxyJump testpi\nHost *"))
    with T.connect(T.parse_target("viajump", cfg), sshd.known_hosts, ssh_config=cfg) as conn:
        assert conn.run(["echo", "through"], 10).stdout == "through\n" and len(conn.jumps) == 1


def test_cli_trust_and_doctor_refuse_unknown_host(sshd, tmp_path):
    known = tmp_path / "kh"
    base = [sys.executable, "-m", "pistill.cli"]
    opts = ["--known-hosts", str(known), "--ssh-config", str(sshd.ssh_config)]
    p = subprocess.run(base + ["doctor", sshd.spec, *opts], capture_output=True, text=True, timeout=60)
    assert p.returncode == 1 and "is not in" in p.stderr and "pistill trust" in p.stderr
    p = subprocess.run(base + ["trust", sshd.spec, *opts], capture_output=True, text=True, timeout=60)
    fp = p.stderr.split("--accept-host-key ")[-1].strip()
    assert p.returncode == 1 and fp.startswith("SHA256:")
    p = subprocess.run(base + ["trust", sshd.spec, *opts, "--accept-host-key", fp], capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 0 and "added to" in p.stdout and known.read_text().count("ssh-ed25519") == 1
