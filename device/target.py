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
import ipaddress
import logging
import os
import re
import shlex
import signal
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from pistill.errors import UsageError, UserError

log = logging.getLogger(__name__)

LOCAL = "local"  # the bench target that means "this machine, no SSH"
DEFAULT_PORT = 22
CONNECT_TIMEOUT_S = 15
KEEPALIVE_S = 15  # seconds between keepalive packets (ssh_config ServerAliveInterval overrides)
MAX_JUMPS = 8  # ProxyJump hops followed before a chain counts as a loop
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
_SPEC = re.compile(r"(?:(?P<user>[A-Za-z0-9._][A-Za-z0-9._-]*)@)?"  # matched whole (fullmatch: no "\n" at the end)
                   r"(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_][A-Za-z0-9._-]*)(?::(?P<port>[0-9]{1,5}))?")
_TIME = re.compile(r"([0-9]+)([smhdw]?)", re.I)  # ssh_config times: "30", "30s", "1m30s" (sshd_config(5) TIME FORMATS)
_UNIT_S = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


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


def shown(text, limit: int = 80) -> str:
    """`text` fit for a one-line message: control characters escaped, long text cut."""
    if not isinstance(text, str):
        return f"<{type(text).__name__}>"
    text = text if text.isprintable() else text.encode("unicode_escape").decode("ascii")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_spec(spec: str) -> None:
    """UsageError unless `spec` looks like `user@host[:port]` or an alias (reads no files)."""
    m = _SPEC.fullmatch(spec) if isinstance(spec, str) else None
    if m and m["host"].startswith("["):  # [IPv6]
        try:
            ipaddress.IPv6Address(m["host"][1:-1])
        except ValueError:
            m = None
    if not m or (m["port"] and not 0 < int(m["port"]) < 65536):
        several = isinstance(spec, str) and "," in spec
        raise UsageError(f"target '{shown(spec)}' is not understood; use \"local\", \"user@host\", \"user@host:port\" "
                         "or a Host alias from ~/.ssh/config" + ("; name several devices as a list: targets = "
                                                                 "[\"pi@a\", \"pi@b\"]" if several else ""))


def parse_target(spec: str, ssh_config: str | Path | None = None) -> Target:
    """Resolve a spec through ssh_config (HostName, User, Port, IdentityFile, ProxyJump, UserKnownHostsFile,
    ServerAliveInterval); UsageError naming the option and the fix for a value ssh would refuse.

    Values written in the spec win over the config, as with `ssh`."""
    check_spec(spec)
    m = _SPEC.fullmatch(spec)
    alias, path = m["host"].strip("[]"), ssh_config_path(ssh_config)
    conf = _lookup(alias, ssh_config)
    host = conf.get("hostname", alias)
    _check_host(host, f"host '{shown(host)}' of target '{spec}'" if host == alias
                else f"{path}: HostName '{shown(host)}' for {spec}")
    for key, name in (("userknownhostsfile", "UserKnownHostsFile"), ("identityfile", "IdentityFile")):
        for value in _values(conf.get(key)):
            if not value.isprintable():
                raise UsageError(f"{path}: {name} '{shown(value)}' for {spec} holds control characters; fix the path")
    known = (conf.get("userknownhostsfile") or "").split()
    port = _config_port(conf, spec, path)
    return Target(spec=spec, host=host, user=m["user"] or conf.get("user") or _local_user(spec),
                  port=int(m["port"]) if m["port"] else port, identity_files=tuple(conf.get("identityfile", ())),
                  proxy_jump=_proxy_jump(conf, spec, path), known_hosts=os.path.expanduser(known[0]) if known else None,
                  keepalive_s=_keepalive(conf, spec, path))


def ssh_config_path(ssh_config: str | Path | None) -> Path:
    """The ssh_config file read: the one named, else ~/.ssh/config."""
    return Path(ssh_config or USER_SSH_CONFIG).expanduser()


def _lookup(alias: str, ssh_config: str | Path | None) -> dict:
    import paramiko

    path = ssh_config_path(ssh_config)
    if not path.is_file():
        if ssh_config:
            raise UsageError(f"ssh_config file {path} does not exist; fix the path or leave it empty for "
                             f"{USER_SSH_CONFIG}")
        return {}
    try:
        return paramiko.SSHConfig.from_path(str(path)).lookup(alias)
    except paramiko.SSHException as e:  # ConfigParseError: a line paramiko cannot read
        raise UsageError(f"{path}: {shown(str(e), 200)}; fix that line (`ssh -G {alias}` shows how ssh reads the "
                         "file)") from None
    except (OSError, UnicodeDecodeError, ImportError) as e:  # unreadable, not UTF-8; `Match exec` without invoke
        raise UsageError(f"ssh_config {path} cannot be read ({type(e).__name__}: {shown(str(e), 200)}); check that "
                         "it is a UTF-8 text file you may read") from None


def _values(value) -> list[str]:
    return [] if value is None else [value] if isinstance(value, str) else list(value)


def _check_host(host: str, what: str) -> None:
    """UsageError unless `host` is an IP address or a name the resolver takes: getaddrinfo raises UnicodeError (not
    OSError) for "a..b" or a label over 63 characters."""
    try:
        ipaddress.ip_address(host)
        return
    except ValueError:
        pass
    if not host or not host.isprintable() or any(c.isspace() for c in host):
        why = "it is empty" if not host else "it holds spaces or control characters"
    else:
        try:
            host.encode("idna")
            return
        except UnicodeError as e:
            why = ("a dot-separated part is empty or over 63 characters" if "label" in str(e)
                   else shown(str(e), 120))
    raise UsageError(f"{what} is not a valid host name ({why}); fix the name")


def _config_port(conf: dict, spec: str, path: Path) -> int:
    value = conf.get("port", str(DEFAULT_PORT))
    if not (value.isascii() and value.isdigit() and 0 < int(value) < 65536):
        raise UsageError(f"{path}: Port '{shown(value)}' for {spec} is not a port number; write one from 1 to 65535 "
                         "(ssh's is 22)")
    return int(value)


def ssh_seconds(text: str) -> int | None:
    """An ssh_config time ("30", "30s", "1m30s": sshd_config(5) TIME FORMATS) in seconds; None if it is not one."""
    parts = _TIME.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        return None
    return sum(int(n) * _UNIT_S[u.lower()] for n, u in parts)


def _keepalive(conf: dict, spec: str, path: Path) -> int:
    value = conf.get("serveraliveinterval", "0")
    seconds = ssh_seconds(value)
    if seconds is None or seconds > 2**31 - 1:
        raise UsageError(f"{path}: ServerAliveInterval '{shown(value)}' for {spec} is not a time; write seconds, "
                         f"e.g. {KEEPALIVE_S} (or 1m; 0 for pistill's {KEEPALIVE_S} s)")
    return seconds or KEEPALIVE_S


def _proxy_jump(conf: dict, spec: str, path: Path) -> str | None:
    """ProxyJump as "a,b" (each hop checked like a target; `ssh://` URIs as `user@host:port`), None for `none`."""
    value = conf.get("proxyjump", "none")
    if value.lower() == "none":
        return None
    hops = [h.strip().removeprefix("ssh://") for h in value.split(",")]
    for hop in hops:
        try:
            check_spec(hop)
        except UsageError:
            raise UsageError(f"{path}: ProxyJump '{shown(value)}' for {spec}: hop '{shown(hop)}' is not understood; "
                             "write host, user@host or user@host:port, several separated by commas") from None
    return ",".join(hops)


def _local_user(spec: str) -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no $USER and no passwd entry (some containers)
        raise UsageError(f"target '{spec}' names no user and this machine's user name is unknown; write "
                         f"user@{spec}") from None


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

class _TransportLog(logging.Filter):
    """paramiko's transport thread logs a failed handshake or a dropped link at ERROR with its traceback, and pistill
    raises one line for the same failure: those records go out at DEBUG (seen with -v) instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR:
            return True
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return logging.getLogger().isEnabledFor(logging.DEBUG)


def route_transport_log() -> None:
    """Install `_TransportLog` on paramiko's transport logger (once)."""
    logger = logging.getLogger("paramiko.transport")
    if not any(isinstance(f, _TransportLog) for f in logger.filters):
        logger.addFilter(_TransportLog())


def connect(target: Target, known_hosts: str | Path | None = None, accept_host_key: str | None = None,
            ssh_config: str | Path | None = None, timeout_s: float = CONNECT_TIMEOUT_S) -> "Connection":
    """An authenticated connection (keys from IdentityFile, else the agent and ~/.ssh/id_*), keepalive on; through
    the ProxyJump hops, each one a connection of its own."""
    route_transport_log()
    jumps: list[Connection] = []
    try:
        for hop in jump_chain(target, ssh_config):
            jumps.append(Connection(hop, _client(hop, known_hosts, None, jumps[-1] if jumps else None, timeout_s), []))
        client = _client(target, known_hosts, accept_host_key, jumps[-1] if jumps else None, timeout_s)
    except BaseException:
        for j in reversed(jumps):
            j.close()
        raise
    for conn_target, c in [*((j.target, j.client) for j in jumps), (target, client)]:
        c.get_transport().set_keepalive(conn_target.keepalive_s)
    return Connection(target, client, jumps)


def _client(target: Target, known_hosts, accept: str | None, via: "Connection | None", timeout_s: float):
    import paramiko

    client, known = paramiko.SSHClient(), known_hosts_path(target, known_hosts)
    if SYSTEM_KNOWN_HOSTS.is_file():
        client.load_system_host_keys(str(SYSTEM_KNOWN_HOSTS))
    if known.is_file():
        client.load_host_keys(str(known))
    policy = _policy(target, known, accept)
    client.set_missing_host_key_policy(policy)
    try:
        _connect(client, target, via.tunnel(target, timeout_s) if via else None, timeout_s)
    except BaseException as e:
        transport = client.get_transport()
        client.close()
        if isinstance(e, paramiko.BadHostKeyException):
            raise HostKeyError(changed_host_message(target, known, e), fingerprint(e.key)) from None
        if isinstance(e, paramiko.SSHException) and policy.offered is not None \
                and fingerprint(policy.offered) != accept:
            raise HostKeyError(unknown_host_message(target, known, policy.offered, accept),
                               fingerprint(policy.offered)) from None
        if isinstance(e, paramiko.SSHException):
            raise handshake_error(target, e, transport, timeout_s) from None
        raise
    return client


def handshake_error(target: Target, e: Exception, transport, timeout_s: float) -> TargetError:
    """One line for a TCP connection on which no SSH session came up: the peer is not an SSH server (no banner:
    silent, closed, or something else talking), or the SSH handshake itself failed."""
    if transport is not None and not transport.remote_version:
        cause = e.__context__
        if isinstance(cause, socket.timeout) or str(e) == "No existing session":  # the latter: start_client's limit
            why = f"no SSH banner within {timeout_s:g} s"
        elif isinstance(cause, (EOFError, ConnectionError)):  # reset: it hung up on our own banner unread
            why = "it closed the connection without an SSH banner"
        elif isinstance(cause, UnicodeDecodeError):
            why = "it sent binary data, not an SSH banner"
        else:
            why = " ".join(shown(str(e), 160).split())
        return TargetError(f"{_named(target)} accepted a TCP connection but did not answer as an SSH server ({why}); "
                           "check the host and port")
    if str(e) == "No existing session":
        return TargetError(f"{target}: the SSH handshake with {target.host}:{target.port} did not finish within "
                           f"{timeout_s:g} s; check the device's sshd and the network")
    return TargetError(f"{target}: SSH failed: {' '.join(shown(str(e) or type(e).__name__, 200).split())}")


def _named(target: Target) -> str:
    """The spec, with the address it resolved to where the spec does not show it ("pi5 (10.0.0.5:2222)")."""
    shows = f"{target.host}:{target.port}" in target.spec or (target.port == DEFAULT_PORT
                                                              and target.spec.endswith(target.host))
    return target.spec if shows else f"{target.spec} ({target.host}:{target.port})"


def jump_target(target: Target, ssh_config: str | Path | None) -> Target | None:
    """The hop nearest the target: ProxyJump "a,b" means b, itself reached through "a" (as `ssh -J a,b`)."""
    if not target.proxy_jump:
        return None
    hops = [h.strip() for h in target.proxy_jump.split(",") if h.strip()]
    if not hops:
        return None
    *rest, last = hops
    hop = parse_target(last, ssh_config)
    return dataclasses.replace(hop, proxy_jump=",".join(rest) or None) if rest else hop


def jump_chain(target: Target, ssh_config: str | Path | None) -> list[Target]:
    """The ProxyJump hops to `target`, nearest us first; UsageError when they loop (a jump host that jumps through
    itself, often a `Host *` ProxyJump that also applies to the jump host)."""
    hops, hop = [], target
    while (hop := jump_target(hop, ssh_config)) is not None:
        seen = [target.spec, *(h.spec for h in hops)]
        chain, path = " -> ".join([*seen, hop.spec]), ssh_config_path(ssh_config)
        if hop.spec in seen:
            raise UsageError(f"{path}: the ProxyJump chain of {target.spec} loops ({chain}); give the jump host its "
                             f"own `ProxyJump none` (or exclude it: `Host * !{hop.spec}`)")
        if len(hops) == MAX_JUMPS:
            raise UsageError(f"{path}: the ProxyJump chain of {target.spec} has more than {MAX_JUMPS} hops ({chain}); "
                             "shorten it")
        hops.append(hop)
    return hops[::-1]


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
    except (OSError, EOFError, UnicodeError) as e:  # refused, unreachable, DNS, timeout; UnicodeError: a bad name
        raise TargetError(f"{target}: cannot reach {target.host}:{target.port}: {_reason(e)}") from None


def _reason(e: BaseException) -> str:
    return " ".join(shown(str(e), 200).split()) or type(e).__name__


def host_key(target: Target, ssh_config: str | Path | None = None, known_hosts: str | Path | None = None,
             timeout_s: float = CONNECT_TIMEOUT_S):
    """The host key the target offers (no authentication), for `pistill trust`."""
    import paramiko

    route_transport_log()
    hops = jump_chain(target, ssh_config)
    jump = connect(hops[-1], known_hosts, None, ssh_config, timeout_s) if hops else None
    transport = None
    try:
        sock = jump.tunnel(target, timeout_s) if jump else socket.create_connection((target.host, target.port),
                                                                                    timeout_s)
        transport = paramiko.Transport(sock)
        try:
            transport.start_client(timeout=timeout_s)
            return transport.get_remote_server_key()
        finally:
            transport.close()
    except paramiko.SSHException as e:
        raise handshake_error(target, e, transport, timeout_s) from None
    except (OSError, EOFError, UnicodeError) as e:
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
    """An open, authenticated SSH connection to one target; `jumps`: its ProxyJump hops' connections, nearest us
    first (closed with it)."""

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
        for j in reversed(self.jumps):  # the hop nearest the target first: the others carry its connection
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
        import paramiko

        try:
            return self.client.get_transport().open_channel("direct-tcpip", (target.host, target.port), ("", 0),
                                                            timeout=timeout_s)
        except paramiko.SSHException as e:  # ChannelException: the jump host could not open the connection
            raise TargetError(f"{target}: the jump host {self.target} cannot reach {target.host}:{target.port}: "
                              f"{shown(getattr(e, 'text', '') or _reason(e), 200)}") from None

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
