"""A real OpenSSH server on 127.0.0.1 for the device tests: its own host key, client key and known_hosts.

Import the fixtures into a test module (`from sshd import sshd, sshd_factory  # noqa: F401`); they skip with a
reason when /usr/sbin/sshd is not installed (Debian: `apt-get install openssh-server`).
"""

from __future__ import annotations

import getpass
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "pi-emu"))
from piemu import free_port, wait_listening  # noqa: E402  (one copy, in the standard-library-only module)

SSHD = Path("/usr/sbin/sshd")
CONFIG = """\
ListenAddress 127.0.0.1
Port {port}
HostKey {dir}/host_ed25519
PidFile {dir}/sshd.pid
AuthorizedKeysFile {dir}/authorized_keys
AllowUsers {user}
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
AllowTcpForwarding yes
Subsystem sftp internal-sftp{sftp_args}
LogLevel VERBOSE
# bash sources ~/.bashrc when it sees it runs under sshd at shell level 1; a slow .bashrc (pyenv init) would add
# half a second to every command, so sessions start one level deeper
SetEnv SHLVL=1{env}
"""


def keygen(path: Path) -> str:
    """A fresh ed25519 key pair at `path` (no passphrase); returns the public key line."""
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "pistill-test", "-f", str(path)],
                   check=True, capture_output=True)
    return path.with_suffix(".pub").read_text().strip()


@dataclass
class SSHServer:
    """One sshd process; `spec` is the pistill target string, `known_hosts` already trusts its host key.

    `env` is set in every session (SetEnv); with `own_home`, SFTP starts in `<dir>/home`, so `~` in a remote path
    (what pistill expands through SFTP) is this device's own folder, as on separate machines."""

    dir: Path
    port: int = field(default_factory=free_port)
    user: str = field(default_factory=getpass.getuser)
    proc: subprocess.Popen | None = None
    env: dict[str, str] = field(default_factory=dict)
    own_home: bool = False

    def __post_init__(self):
        self.dir.mkdir(parents=True, exist_ok=True)
        self.host_pub = keygen(self.dir / "host_ed25519")
        self.client_key = self.dir / "client_ed25519"
        (self.dir / "authorized_keys").write_text(keygen(self.client_key) + "\n")
        self.known_hosts = self.dir / "known_hosts"
        self.known_hosts.write_text(f"[127.0.0.1]:{self.port} {' '.join(self.host_pub.split()[:2])}\n")
        self.ssh_config = self.dir / "ssh_config"
        self.ssh_config.write_text(f"Host testpi\n  HostName 127.0.0.1\n  Port {self.port}\n  User {self.user}\n"
                                   f"  IdentityFile {self.client_key}\nHost *\n  IdentityFile {self.client_key}\n")
        sftp_args = ""
        if self.own_home:
            (self.dir / "home").mkdir(exist_ok=True)
            sftp_args = f" -d {self.dir}/home"
        env = "".join(f" {k}={v}" for k, v in self.env.items())
        (self.dir / "sshd_config").write_text(CONFIG.format(port=self.port, dir=self.dir, user=self.user,
                                                            sftp_args=sftp_args, env=env))

    @property
    def spec(self) -> str:
        return f"{self.user}@127.0.0.1:{self.port}"

    def start(self) -> "SSHServer":
        Path("/run/sshd").mkdir(exist_ok=True)  # privilege-separation directory sshd insists on
        log = self.dir / "sshd.log"
        with open(log, "ab") as err:  # sshd -e: its log, for a failing test to look at
            self.proc = subprocess.Popen([str(SSHD), "-D", "-e", "-f", str(self.dir / "sshd_config")],
                                         stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
        wait_listening(self.port, self.proc, log, limit_s=10.0, what="sshd", poll_s=0.05)
        return self

    def sessions(self) -> list[int]:
        """Pids of the per-connection sshd processes this listener forked (they run in their own sessions)."""
        pids = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                ppid = int(stat.read_text().rpartition(")")[2].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            if self.proc is not None and ppid == self.proc.pid:
                pids.append(int(stat.parent.name))
        return pids

    def stop(self) -> None:
        """Stop the listener and the sessions it forked: the device goes away."""
        if self.proc is None or self.proc.poll() is not None:
            return
        children = self.sessions()
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=10)
        for pid in children:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass


def _need_sshd() -> None:
    if not SSHD.exists() or shutil.which("ssh-keygen") is None:
        pytest.skip("needs OpenSSH's /usr/sbin/sshd and ssh-keygen (apt-get install openssh-server)")


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    """A running sshd for the whole test module."""
    _need_sshd()
    server = SSHServer(tmp_path_factory.mktemp("sshd")).start()
    yield server
    server.stop()


@pytest.fixture
def sshd_factory(tmp_path):
    """Start extra servers (each with its own keys); all are stopped at the end of the test."""
    _need_sshd()
    servers = []

    def start(name: str = "srv", run: bool = True, env: dict[str, str] | None = None,
              own_home: bool = False) -> SSHServer:
        server = SSHServer(tmp_path / f"{name}{len(servers)}", env=env or {}, own_home=own_home)
        servers.append(server)
        return server.start() if run else server

    yield start
    for s in servers:
        s.stop()


def ssh_home(home: Path, *devices: tuple[str, str, int, str, str]) -> Path:
    """A home folder whose ~/.ssh/config names each (alias, user, port, key, known_hosts) device on 127.0.0.1."""
    ssh = home / ".ssh"
    ssh.mkdir(parents=True, exist_ok=True)
    (ssh / "config").write_text("".join(
        f"Host {alias}\n  HostName 127.0.0.1\n  User {user}\n  Port {port}\n  IdentityFile {key}\n"
        f"  UserKnownHostsFile {known}\n" for alias, user, port, key, known in devices))
    return home
