"""SSH targets: `user@host[:port]` or an ~/.ssh/config alias, host keys checked against known_hosts, quoted commands.

Host keys are never added silently: an unknown host is refused with its fingerprint, and trusted only when the user
passes that fingerprint back (`pistill trust TARGET --accept-host-key SHA256:...`). Commands are argument lists,
quoted with `shlex`, run under a hard time limit (coreutils `timeout` on the device, plus a local deadline), with
their output streamed to the log line by line.
"""

from __future__ import annotations

import base64
import dataclasses
import getpass
import hashlib
import logging
import os
import re
import shlex
import signal
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from pistill.errors import InputError, UserError

log = logging.getLogger(__name__)

LOCAL = "local"  # the bench target that means "this machine, no SSH"
DEFAULT_PORT = 22
CONNECT_TIMEOUT_S = 15
KEEPALIVE_S = 15  # seconds between keepalive packets (ssh_config ServerAliveInterval overrides)
KILL_GRACE_S = 5  # after the limit, SIGTERM; this much later, SIGKILL
SFTP_IDLE_S = 120  # an SFTP request unanswered this long means the link is dead
PID_LINE = "pistill-pid "  # the first stderr line of every command: its pid on the device, to stop it on Ctrl-C
WITH_PID = f'echo "{PID_LINE}$$" >&2; exec "$@"'
KILL = ('p=$1; kill -TERM "-$p" 2>/dev/null; kill -TERM "$p" 2>/dev/null; i=0; '  # its group (timeout leads one)
        'while kill -0 "$p" 2>/dev/null && [ $i -lt 20 ]; do sleep 0.1; i=$((i+1)); done; '
        'kill -KILL "-$p" 2>/dev/null; kill -KILL "$p" 2>/dev/null; true')  # dash's kill takes no `--`
USER_SSH_CONFIG = Path("~/.ssh/config")
USER_KNOWN_HOSTS = Path("~/.ssh/known_hosts")
SYSTEM_KNOWN_HOSTS = Path("/etc/ssh/ssh_known_hosts")
_SPEC = re.compile(r"^(?:(?P<user>[A-Za-z0-9._][A-Za-z0-9._-]*)@)?"
                   r"(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_][A-Za-z0-9._-]*)(?::(?P<port>\d{1,5}))?$")


class TargetError(UserError, RuntimeError):
    """A device is unreachable, refused, or a command on it failed; the message names the target and the fix."""


class HostKeyError(TargetError):
    """The device's host key is unknown or changed; `fingerprint` is what it offered."""

    def __init__(self, message: str, fingerprint: str | None = None):
        super().__init__(message)
        self.fingerprint = fingerprint


class RemoteTimeout(TargetError):
    """A remote command ran past its limit and was stopped."""


class Interrupted(TargetError):
    """The user stopped the run (Ctrl-C); the remote command was killed."""


@dataclass(frozen=True)
class Target:
    """Where to connect, resolved from the spec and ssh_config (no secrets: key paths only)."""

    spec: str  # as written: "pi@pi5.local", "pi@10.0.0.5:2222", or an ssh_config alias "pi5"
    host: str  # HostName to connect to
    user: str
    port: int = DEFAULT_PORT
    identity_files: tuple[str, ...] = ()  # IdentityFile entries; empty = default keys and the agent
    proxy_jump: str | None = None  # ProxyJump: "jumphost" or "a,b" (comma-separated, first is nearest us)
    known_hosts: str | None = None  # UserKnownHostsFile from ssh_config, when it names one
    keepalive_s: int = KEEPALIVE_S

    @property
    def host_key_name(self) -> str:
        """The known_hosts name: `host`, or `[host]:port` off port 22 (OpenSSH's spelling)."""
        return self.host if self.port == DEFAULT_PORT else f"[{self.host}]:{self.port}"

    def __str__(self) -> str:
        return self.spec


def check_spec(spec: str) -> None:
    """Raise ValueError unless `spec` looks like `user@host[:port]` or an alias (reads no files)."""
    m = _SPEC.match(spec)
    if not m or (m["port"] and not 0 < int(m["port"]) < 65536):
        raise InputError(f"target '{spec}' is not understood; use \"local\", \"user@host\", \"user@host:port\" "
                         "or a Host alias from ~/.ssh/config")


def parse_target(spec: str, ssh_config: str | Path | None = None) -> Target:
    """Resolve a spec through ssh_config (HostName, User, Port, IdentityFile, ProxyJump, UserKnownHostsFile).

    Values written in the spec win over the config, as with `ssh`."""
    check_spec(spec)
    m = _SPEC.match(spec)
    alias = m["host"].strip("[]")
    conf = _lookup(alias, ssh_config)
    known = (conf.get("userknownhostsfile") or "").split()
    return Target(spec=spec, host=conf.get("hostname", alias), user=m["user"] or conf.get("user") or getpass.getuser(),
                  port=int(m["port"] or conf.get("port", DEFAULT_PORT)),
                  identity_files=tuple(conf.get("identityfile", ())),
                  proxy_jump=None if conf.get("proxyjump", "none").lower() == "none" else conf["proxyjump"],
                  known_hosts=os.path.expanduser(known[0]) if known else None,
                  keepalive_s=int(conf.get("serveraliveinterval", KEEPALIVE_S)) or KEEPALIVE_S)


def _lookup(alias: str, ssh_config: str | Path | None) -> dict:
    import paramiko

    path = Path(ssh_config or USER_SSH_CONFIG).expanduser()
    if not path.is_file():
        if ssh_config:
            raise InputError(f"ssh_config file {path} does not exist; fix the path or leave it empty for "
                             f"{USER_SSH_CONFIG}")
        return {}
    return paramiko.SSHConfig.from_path(str(path)).lookup(alias)


# --- host keys ------------------------------------------------------------------------------------------------

def fingerprint(key) -> str:
    """OpenSSH's SHA256 fingerprint of a paramiko public key ("SHA256:base64-without-padding")."""
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def known_hosts_path(target: Target, known_hosts: str | Path | None) -> Path:
    """Which known_hosts file holds the target's key: the explicit one, ssh_config's, else ~/.ssh/known_hosts."""
    return Path(known_hosts or target.known_hosts or USER_KNOWN_HOSTS).expanduser()


def add_known_host(path: Path, name: str, key) -> None:
    """Append one entry (appending keeps the user's comments, hashed names and markers as they are)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    with os.fdopen(fd, "a") as f:
        f.write(f"{name} {key.get_name()} {key.get_base64()}\n")


def _policy(target: Target, known: Path, accept: str | None):
    """RejectPolicy that remembers the refused key (for the message), or accepts exactly one fingerprint."""
    import paramiko

    class Policy(paramiko.RejectPolicy):
        offered = None  # the key a host we do not know offered

        def missing_host_key(self, client, hostname, key):
            self.offered = key
            if accept is not None and fingerprint(key) == accept:
                client.get_host_keys().add(hostname, key.get_name(), key)
                add_known_host(known, hostname, key)
                log.info("%s: trusted host key %s (%s), saved to %s", target, accept, key.get_name(), known)
                return
            super().missing_host_key(client, hostname, key)

    return Policy()


def unknown_host_message(target: Target, known: Path, key, accept: str | None) -> str:
    fp = fingerprint(key)
    if accept is not None:
        return (f"{target}: the host offered {key.get_name()} {fp}, not the {accept} you accepted; refusing to "
                "connect (check the fingerprint on the device: ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub)")
    return (f"{target}: host key for {target.host_key_name} is not in {known}; the host offers {key.get_name()} "
            f"{fp}. If that is your device (on it: ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub), trust it "
            f"with: pistill trust {target.spec} --accept-host-key {fp}")


def changed_host_message(target: Target, known: Path, err) -> str:
    return (f"{target}: HOST KEY CHANGED for {target.host_key_name}: it offers {fingerprint(err.key)}, but {known} "
            f"has {fingerprint(err.expected_key)}; refusing to connect. This is a different machine or a "
            f"reinstalled device; if you know which, remove the old entry (ssh-keygen -f {known} -R "
            f"'{target.host_key_name}') and run pistill trust {target.spec}")


# --- connecting -----------------------------------------------------------------------------------------------

def connect(target: Target, known_hosts: str | Path | None = None, accept_host_key: str | None = None,
            ssh_config: str | Path | None = None, timeout_s: float = CONNECT_TIMEOUT_S) -> "Connection":
    """An authenticated connection (keys from IdentityFile, else the agent and ~/.ssh/id_*), keepalive on."""
    hop = jump_target(target, ssh_config)
    jumps = [connect(hop, known_hosts, None, ssh_config, timeout_s)] if hop else []
    try:
        client = _client(target, known_hosts, accept_host_key, jumps, timeout_s)
    except BaseException:
        for j in jumps:
            j.close()
        raise
    client.get_transport().set_keepalive(target.keepalive_s)
    return Connection(target, client, jumps)


def _client(target: Target, known_hosts, accept: str | None, jumps: list["Connection"], timeout_s: float):
    import paramiko

    client, known = paramiko.SSHClient(), known_hosts_path(target, known_hosts)
    if SYSTEM_KNOWN_HOSTS.is_file():
        client.load_system_host_keys(str(SYSTEM_KNOWN_HOSTS))
    if known.is_file():
        client.load_host_keys(str(known))
    policy = _policy(target, known, accept)
    client.set_missing_host_key_policy(policy)
    try:
        _connect(client, target, jumps[0].tunnel(target, timeout_s) if jumps else None, timeout_s)
    except BaseException as e:
        client.close()
        if isinstance(e, paramiko.BadHostKeyException):
            raise HostKeyError(changed_host_message(target, known, e), fingerprint(e.key)) from None
        if isinstance(e, paramiko.SSHException) and policy.offered is not None \
                and fingerprint(policy.offered) != accept:
            raise HostKeyError(unknown_host_message(target, known, policy.offered, accept),
                               fingerprint(policy.offered)) from None
        if isinstance(e, paramiko.SSHException):
            raise TargetError(f"{target}: SSH failed: {e}") from None
        raise
    return client


def jump_target(target: Target, ssh_config: str | Path | None) -> Target | None:
    """The hop nearest the target: ProxyJump "a,b" means b, itself reached through "a" (as `ssh -J a,b`)."""
    if not target.proxy_jump:
        return None
    *rest, last = [h.strip() for h in target.proxy_jump.split(",") if h.strip()]
    hop = parse_target(last, ssh_config)
    return dataclasses.replace(hop, proxy_jump=",".join(rest) or None) if rest else hop


def _connect(client, target: Target, sock, timeout_s: float) -> None:
    import paramiko

    keys = [os.path.expanduser(k) for k in target.identity_files if Path(os.path.expanduser(k)).is_file()]
    try:
        client.connect(target.host, target.port, username=target.user, key_filename=keys or None,
                       look_for_keys=not keys, allow_agent=True, timeout=timeout_s, banner_timeout=timeout_s,
                       auth_timeout=timeout_s, sock=sock)
    except paramiko.PasswordRequiredException:
        raise TargetError(f"{target}: key {', '.join(keys)} is passphrase-protected; load it into ssh-agent "
                          "(ssh-add KEY) and retry") from None
    except (paramiko.AuthenticationException, paramiko.SSHException) as e:
        if not isinstance(e, paramiko.AuthenticationException) and "authentication methods" not in str(e):
            raise
        tried = ", ".join(keys) if keys else "ssh-agent and ~/.ssh/id_*"
        raise TargetError(f"{target}: authentication failed for user '{target.user}' (tried {tried}); install "
                          f"your public key on the device: ssh-copy-id -p {target.port} "
                          f"{target.user}@{target.host}") from None
    except (OSError, EOFError) as e:  # refused, unreachable, DNS, timeout
        raise TargetError(f"{target}: cannot reach {target.host}:{target.port}: {_reason(e)}") from None


def _reason(e: BaseException) -> str:
    return str(e) or type(e).__name__


def host_key(target: Target, ssh_config: str | Path | None = None, known_hosts: str | Path | None = None,
             timeout_s: float = CONNECT_TIMEOUT_S):
    """The host key the target offers (no authentication), for `pistill trust`."""
    import paramiko

    hop = jump_target(target, ssh_config)
    jump = connect(hop, known_hosts, None, ssh_config, timeout_s) if hop else None
    try:
        sock = jump.tunnel(target, timeout_s) if jump else socket.create_connection((target.host, target.port),
                                                                                    timeout_s)
        transport = paramiko.Transport(sock)
        try:
            transport.start_client(timeout=timeout_s)
            return transport.get_remote_server_key()
        finally:
            transport.close()
    except (OSError, EOFError, paramiko.SSHException) as e:
        raise TargetError(f"{target}: cannot reach {target.host}:{target.port}: {_reason(e)}") from None
    finally:
        if jump:
            jump.close()


def trust(target: Target, accept: str | None, known_hosts: str | Path | None = None,
          ssh_config: str | Path | None = None) -> tuple[str, str]:
    """Record the target's host key when its fingerprint equals `accept`.

    Returns (fingerprint, what happened: "known" | "added" | "unconfirmed"); raises HostKeyError on a changed key
    or a fingerprint that does not match."""
    import paramiko

    key, known = host_key(target, ssh_config, known_hosts), known_hosts_path(target, known_hosts)
    fp, hk = fingerprint(key), paramiko.HostKeys(str(known)) if known.is_file() else paramiko.HostKeys()
    have = (hk.lookup(target.host_key_name) or {}).get(key.get_name())
    if have is not None:
        if have != key:
            raise HostKeyError(f"{target}: HOST KEY CHANGED: it offers {fp}, {known} has {fingerprint(have)}; "
                               f"remove the old entry (ssh-keygen -f {known} -R '{target.host_key_name}') first", fp)
        return fp, "known"
    if accept is None:
        return fp, "unconfirmed"
    if accept != fp:
        raise HostKeyError(f"{target}: the host offers {fp}, not {accept}; nothing was trusted", fp)
    add_known_host(known, target.host_key_name, key)
    return fp, "added"


# --- running commands -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Result:
    """A finished remote command."""

    rc: int
    stdout: str
    stderr: str


class _Lines:
    """Splits a byte stream into lines, logs each complete one, and keeps the whole text; with `pid_first`, the
    first line is the command's pid on the device (`WITH_PID`), kept in `pid` and left out of the text."""

    def __init__(self, prefix: str, level: int, pid_first: bool = False):
        self.prefix, self.level, self.parts, self.pending = prefix, level, [], b""
        self.pid, self._want_pid, self._head = None, pid_first, b""

    def feed(self, data: bytes) -> None:
        if self._want_pid:
            data = self._take_pid(data)
        self.parts.append(data)
        *lines, self.pending = (self.pending + data).split(b"\n")
        for line in lines:
            self._log(line)

    def _take_pid(self, data: bytes) -> bytes:
        """The stream without its pid line (b"" until that line is complete)."""
        self._head += data
        line, nl, rest = self._head.partition(b"\n")
        if not nl:
            return b""
        self._want_pid, self._head = False, b""
        if line.startswith(PID_LINE.encode()) and line[len(PID_LINE):].isdigit():
            self.pid = int(line[len(PID_LINE):])
            return rest
        return line + nl + rest

    def _log(self, line: bytes) -> None:
        text = line.decode("utf-8", "replace").rstrip("\r")
        if text.strip():
            log.log(self.level, "%s %s", self.prefix, text)

    def text(self) -> str:
        if self._want_pid:  # the stream ended inside its first line
            self._want_pid, head, self._head = False, self._head, b""
            self.feed(head)
        self._log(self.pending)
        self.pending = b""
        return b"".join(self.parts).decode("utf-8", "replace")


def describe(argv: list[str], limit: int = 120) -> str:
    text = shlex.join(argv)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class Connection:
    """An open, authenticated SSH connection to one target."""

    def __init__(self, target: Target, client, jumps: list["Connection"]):
        self.target, self.client, self.jumps = target, client, jumps
        self._sftp = self._home = self._has_timeout = None
        self.stop = None  # a threading.Event: once set, running commands are killed (Ctrl-C in a fleet)

    def __enter__(self) -> "Connection":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._sftp is not None:
            self._sftp.close()
        self.client.close()
        for j in self.jumps:
            j.close()

    @property
    def sftp(self):
        if self._sftp is None:
            self._sftp = self.client.open_sftp()
            self._sftp.get_channel().settimeout(SFTP_IDLE_S)
        return self._sftp

    @property
    def home(self) -> str:
        """The login user's home folder on the device."""
        if self._home is None:
            self._home = self.sftp.normalize(".")
        return self._home

    def expand(self, path: str) -> str:
        """`~/x` -> `<home>/x` (arguments are quoted, so the remote shell never expands `~`)."""
        return self.home + path[1:] if path == "~" or path.startswith("~/") else path

    def tunnel(self, target: Target, timeout_s: float):
        """A direct-tcpip channel to `target` through this host (ProxyJump)."""
        return self.client.get_transport().open_channel("direct-tcpip", (target.host, target.port), ("", 0),
                                                        timeout=timeout_s)

    def run(self, argv: list[str], timeout_s: float, check: bool = True, echo: bool = False) -> Result:
        """Run argv (quoted) with a hard limit; output lines go to the log (INFO when `echo`, else DEBUG).

        When `self.stop` (a threading.Event) is set, the command is killed on the device and Interrupted raised."""
        wrapped = ["sh", "-c", WITH_PID, "sh", *self._limited(argv, timeout_s)]
        log.debug("%s$ %s", self.target, describe(argv))
        chan, t0 = self.client.get_transport().open_session(), time.monotonic()
        try:
            chan.exec_command(shlex.join(wrapped))
            rc, out, err = self._pump(chan, argv, timeout_s + 2 * KILL_GRACE_S, echo)
        finally:
            chan.close()
        if self._has_timeout and rc in (124, 137) and time.monotonic() - t0 >= timeout_s:  # 137: after -k
            raise RemoteTimeout(f"{self.target}: `{describe(argv)}` ran past its {timeout_s:g} s limit and was "
                                "stopped")
        if check and rc != 0:
            raise TargetError(f"{self.target}: `{describe(argv)}` {exit_reason(rc)}: {last_line(err, out)}")
        return Result(rc, out, err)

    def _limited(self, argv: list[str], timeout_s: float) -> list[str]:
        if self._has_timeout is None:  # coreutils/busybox `timeout` stops the command on the device itself
            chan = self.client.get_transport().open_session()
            chan.exec_command("command -v timeout >/dev/null 2>&1")
            self._has_timeout = chan.recv_exit_status() == 0
            chan.close()
        if not self._has_timeout:
            return argv
        return ["timeout", "-k", str(KILL_GRACE_S), f"{timeout_s:g}", *argv]

    def _pump(self, chan, argv: list[str], limit_s: float, echo: bool) -> tuple[int, str, str]:
        level = logging.INFO if echo else logging.DEBUG
        out, err = _Lines(f"{self.target} |", level), _Lines(f"{self.target} !", level, pid_first=True)
        deadline = time.monotonic() + limit_s
        while True:
            if self.stop is not None and self.stop.is_set():
                self._kill(chan, err, argv)
            busy = False
            if chan.recv_ready():
                out.feed(chan.recv(1 << 16))
                busy = True
            if chan.recv_stderr_ready():
                err.feed(chan.recv_stderr(1 << 16))
                busy = True
            if not busy and chan.exit_status_ready() and (chan.eof_received or chan.closed):
                return chan.recv_exit_status(), out.text(), err.text()
            if not busy and (chan.closed or not chan.get_transport().is_active()):  # the connection dropped
                raise TargetError(f"{self.target}: connection lost while running `{describe(argv)}`")
            if time.monotonic() > deadline:  # the device could not stop it (no `timeout` there)
                raise RemoteTimeout(f"{self.target}: `{describe(argv)}` ran past its {limit_s:g} s limit; "
                                    "the channel was closed")
            if not busy:
                time.sleep(0.02)

    def _kill(self, chan, err: _Lines, argv: list[str]) -> None:
        """Kill the channel's command on the device (its process group: `timeout` leads one) and raise."""
        deadline = time.monotonic() + KILL_GRACE_S
        while err.pid is None and not chan.exit_status_ready() and time.monotonic() < deadline:  # pid not in yet
            if chan.recv_stderr_ready():
                err.feed(chan.recv_stderr(1 << 16))
            else:
                time.sleep(0.02)
        if err.pid is not None and not chan.exit_status_ready():
            kill = self.client.get_transport().open_session()
            try:
                kill.exec_command(shlex.join(["sh", "-c", KILL, "sh", str(err.pid)]))
                end = time.monotonic() + 2 * KILL_GRACE_S
                while not kill.exit_status_ready() and time.monotonic() < end:
                    time.sleep(0.05)
            finally:
                kill.close()
            log.info("%s: stopped `%s` (pid %d)", self.target, describe(argv), err.pid)
        raise Interrupted(f"{self.target}: interrupted; `{describe(argv)}` was stopped")


def exit_reason(rc: int) -> str:
    """"exited with code 3", or the signal a shell's 128+N exit code stands for (137: SIGKILL, often the OOM killer)."""
    if rc > 128 and rc - 128 in (6, 9, 11, 15):
        hint = " (out of memory?)" if rc == 137 else ""
        return f"was killed by {signal.Signals(rc - 128).name}{hint}"
    return f"exited with code {rc}"


def last_line(*texts: str) -> str:
    """The last non-empty line of the first text that has one (a command's error message)."""
    for text in texts:
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        if lines:
            return lines[-1][:500]
    return "no output"
