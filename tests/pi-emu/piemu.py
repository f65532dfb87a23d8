"""An emulated Raspberry Pi 5 on this machine: an arm64 Debian bookworm root file system run through qemu-user
(binfmt_misc), with its own OpenSSH server on 127.0.0.1. pistill provisions, uploads to and benchmarks it exactly
as a Pi over SSH; every process on it is an aarch64 binary, so its numbers are labelled "emulated" (doctor reads
/etc/pistill-emulated) and never stand for a Pi's speed.

    python tests/pi-emu/piemu.py up [--dir DIR] [--port N]   # prints the device as JSON (target, key, known_hosts)
    python tests/pi-emu/piemu.py down [--dir DIR]
    python tests/pi-emu/piemu.py status [--dir DIR]

Needs root (chroot, mounts) and Debian's qemu-user-static, binfmt-support and debootstrap (tests/system-deps.sh
installs them). The first `up` runs debootstrap from the configured Debian mirror (minutes; its second stage runs
emulated) and keeps the finished root file system as a tarball in the pistill cache; later ones restore it in
seconds. The tests use the same functions through a fixture shared by the whole test run (tests/conftest.py).

Three things make the emulated device behave: the host's CA certificates are installed in it (pip reaches PyPI
through the same TLS-inspecting proxy as the host); a Pi 5's /proc/cpuinfo is bind-mounted over the host's
(emulated programs read /proc/cpuinfo, and onnxruntime crashes on an x86 one); and QEMU_CPU=cortex-a76 (a Pi 5's
core) for sshd and every session, so programs see the Pi's CPU features (with qemu's default CPU numpy picks SME
kernels and prints spurious floating-point warnings).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
PACKAGES = "openssh-server,python3,python3-venv,python3-pip,ca-certificates,procps"
QEMU_CPU = "cortex-a76"  # a Raspberry Pi 5's core (ARMv8.2 with the dot product)
USER = "pi"
BOARD = "Raspberry Pi 5 Model B Rev 1.0"
EMULATED = f"qemu-user aarch64 ({QEMU_CPU}) on {os.uname().machine}"  # what doctor reports for this device
ROOTFS_VERSION = 1  # bump when the root file system's set-up below changes: the cached tarball is rebuilt
DEFAULT_DIR = Path("/var/tmp/pistill-pi-emu")
CPUINFO = """processor\t: {n}
BogoMIPS\t: 108.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp
CPU implementer\t: 0x41
CPU architecture: 8
CPU variant\t: 0x4
CPU part\t: 0xd0b
CPU revision\t: 1

"""
SSHD_CONFIG = """ListenAddress 127.0.0.1
Port {port}
HostKey /etc/ssh/pistill_host_ed25519
PidFile /run/pistill-sshd.pid
AllowUsers {user}
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
Subsystem sftp internal-sftp
SetEnv QEMU_CPU={cpu}
LogLevel VERBOSE
"""


class Unavailable(RuntimeError):
    """This machine cannot run the emulated Pi (not root, no binfmt, packages missing); the message says why."""


@dataclass(frozen=True)
class Device:
    """A running emulated Pi: `target` is pistill's target string; `known_hosts` trusts its host key."""

    target: str
    port: int
    client_key: str
    known_hosts: str
    root: str
    emulated: str = EMULATED


def cache_dir() -> Path:
    return Path(os.environ.get("PISTILL_CACHE", "~/.cache/pistill")).expanduser() / "pi-emu"


def rootfs_key() -> str:
    spec = json.dumps([SUITE, MIRROR, PACKAGES, USER, ROOTFS_VERSION])
    return hashlib.sha256(spec.encode()).hexdigest()[:12]


def tarball() -> Path:
    return cache_dir() / f"{SUITE}-arm64-{rootfs_key()}.tar"


# --- can this machine run it? ------------------------------------------------------------------------------------

BINFMT = Path("/proc/sys/fs/binfmt_misc")


def check_machine() -> None:
    """Raise Unavailable with the reason when this machine cannot run an aarch64 chroot; mounts binfmt_misc and
    enables qemu-aarch64 where they are installed but off."""
    if os.geteuid() != 0:
        raise Unavailable("the emulated Pi needs root (chroot and mounts); run as root")
    for tool, pkg in (("debootstrap", "debootstrap"), ("update-binfmts", "binfmt-support"),
                      ("qemu-aarch64-static", "qemu-user-static")):
        if not shutil.which(tool):
            raise Unavailable(f"{tool} is missing; apt-get install {pkg} (tests/system-deps.sh does)")
    if not (BINFMT / "status").exists():
        r = subprocess.run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(BINFMT)], capture_output=True, text=True)
        if r.returncode:
            raise Unavailable(f"binfmt_misc cannot be mounted ({r.stderr.strip()}); the kernel or container "
                              "does not allow running foreign binaries")
    entry = BINFMT / "qemu-aarch64"
    if not entry.exists() or "enabled" not in entry.read_text():
        subprocess.run(["update-binfmts", "--enable", "qemu-aarch64"], capture_output=True)
    if not entry.exists() or "enabled" not in entry.read_text():
        raise Unavailable("binfmt_misc has no enabled qemu-aarch64 entry; apt-get install --reinstall "
                          "qemu-user-static binfmt-support")
    if "F" not in entry.read_text().split("flags:")[-1].splitlines()[0]:
        raise Unavailable("the qemu-aarch64 binfmt entry lacks the F flag, so it cannot run inside a chroot; "
                          "use Debian's qemu-user-static (it registers with F)")


# --- the root file system ----------------------------------------------------------------------------------------

def chroot(root: Path, *cmd: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "QEMU_CPU": QEMU_CPU, "LANG": "C.UTF-8", "HOME": "/root"}
    return subprocess.run(["chroot", str(root), *cmd], env=env, check=check, capture_output=True, text=True, **kw)


def build_rootfs(root: Path, log=print) -> None:
    """debootstrap an arm64 minimal bookworm with sshd and python3 into `root`, and set it up as a Pi."""
    log(f"pi-emu: debootstrap {SUITE} arm64 from {MIRROR} (minutes: its second stage runs emulated)")
    t0 = time.monotonic()
    r = subprocess.run(["debootstrap", "--arch=arm64", "--variant=minbase", f"--include={PACKAGES}", SUITE,
                        str(root), MIRROR], capture_output=True, text=True)
    if r.returncode:
        tail = (root / "debootstrap" / "debootstrap.log")
        detail = tail.read_text()[-1500:] if tail.exists() else r.stderr[-1500:]
        raise RuntimeError(f"debootstrap failed ({r.returncode}): {detail}")
    setup_rootfs(root)
    log(f"pi-emu: root file system ready in {time.monotonic() - t0:.0f} s")


def setup_rootfs(root: Path) -> None:
    """What makes a fresh debootstrap a Pi for pistill: CA certificates, the user, the board's files."""
    # the host's CA certificates, local ones included: pip on the device goes through the same TLS proxy
    local = Path("/usr/local/share/ca-certificates")
    if local.is_dir():
        shutil.copytree(local, root / local.relative_to("/"), dirs_exist_ok=True)
    chroot(root, "update-ca-certificates")
    (root / "etc/pip.conf").write_text("[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n")
    chroot(root, "useradd", "--create-home", "--shell", "/bin/bash", USER)
    chroot(root, "usermod", "--password", "*", USER)  # no password, not locked: sshd (no PAM) refuses locked ones
    (root / "run/sshd").mkdir(parents=True, exist_ok=True)
    (root / "etc/pistill-emulated").write_text(EMULATED + "\n")
    fw = root / "etc/pistill-emu/firmware/devicetree/base"  # bind-mounted over /sys/firmware at `up`
    fw.mkdir(parents=True)
    (fw / "model").write_bytes(BOARD.encode() + b"\0")
    shutil.rmtree(root / "var/cache/apt/archives", ignore_errors=True)


def restore(root: Path, log=print) -> None:
    """`root` from the cached tarball, building (and caching) it first when there is none."""
    tar = tarball()
    if not tar.is_file():
        tar.parent.mkdir(parents=True, exist_ok=True)
        build = root.with_name(root.name + ".build")
        shutil.rmtree(build, ignore_errors=True)
        build_rootfs(build, log)
        part = tar.with_suffix(".tar.part")
        subprocess.run(["tar", "-C", str(build), "-cf", str(part), "."], check=True)
        os.replace(part, tar)  # only a finished root file system is cached
        shutil.rmtree(build)
    t0 = time.monotonic()
    root.mkdir(parents=True)
    subprocess.run(["tar", "-C", str(root), "-xf", str(tar)], check=True)
    log(f"pi-emu: restored {tar.name} in {time.monotonic() - t0:.1f} s")


# --- up and down -------------------------------------------------------------------------------------------------

def mounts(root: Path) -> list[tuple[list[str], Path]]:
    """(mount arguments, mount point), in mounting order."""
    return [(["-t", "proc", "proc"], root / "proc"),
            (["--bind", str(root / "etc/pistill-emu/cpuinfo")], root / "proc/cpuinfo"),
            (["-t", "sysfs", "sysfs"], root / "sys"),
            (["--bind", str(root / "etc/pistill-emu/firmware")], root / "sys/firmware"),
            (["--bind", "/dev"], root / "dev"),
            (["-t", "tmpfs", "tmpfs"], root / "tmp")]


def mounts_under(root: Path) -> list[str]:
    """Mount points at or below `root`, deepest first (the order to unmount them)."""
    real = os.path.realpath(root)
    points = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()]
    return sorted({p for p in points if p == real or p.startswith(real + "/")}, key=len, reverse=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def up(state: Path = DEFAULT_DIR, port: int = 0, log=print) -> Device:
    """Bring the emulated Pi up in `state` (its root file system restored fresh from the cache) and return it."""
    check_machine()
    down(state)
    root = state / "root"
    if left := mounts_under(root):  # never delete through a bind mount of /dev
        raise RuntimeError(f"{left[0]} is still mounted; unmount it (umount -l) before bringing the Pi up again")
    if root.exists():
        shutil.rmtree(root)
    state.mkdir(parents=True, exist_ok=True)
    restore(root, log)
    shutil.copy("/etc/resolv.conf", root / "etc/resolv.conf")
    cpus = len(os.sched_getaffinity(0))  # the Pi's cores are this machine's: threads match what it can run
    (root / "etc/pistill-emu/cpuinfo").write_text("".join(CPUINFO.format(n=i) for i in range(cpus))
                                                  + f"Model\t\t: {BOARD}\n")
    for args, point in mounts(root):
        subprocess.run(["mount", *args, str(point)], check=True)
    port = port or free_port()
    keys = state / "keys"
    shutil.rmtree(keys, ignore_errors=True)
    keys.mkdir()
    for name in ("host", "client"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"pi-emu-{name}", "-f",
                        str(keys / name)], check=True)
    shutil.copy(keys / "host", root / "etc/ssh/pistill_host_ed25519")
    os.chmod(root / "etc/ssh/pistill_host_ed25519", 0o600)
    ssh = root / "home" / USER / ".ssh"
    ssh.mkdir(mode=0o700, exist_ok=True)
    (ssh / "authorized_keys").write_text((keys / "client.pub").read_text())
    ids = chroot(root, "id", "-u", USER).stdout.strip(), chroot(root, "id", "-g", USER).stdout.strip()
    for p in (ssh, ssh / "authorized_keys"):
        os.chown(p, int(ids[0]), int(ids[1]))
    (root / "etc/ssh/pistill_sshd_config").write_text(SSHD_CONFIG.format(port=port, user=USER, cpu=QEMU_CPU))
    with open(state / "sshd.log", "w") as logf:  # sshd keeps its own copy of the descriptor
        proc = subprocess.Popen(["chroot", str(root), "/usr/sbin/sshd", "-D", "-e", "-f",
                                 "/etc/ssh/pistill_sshd_config"],
                                env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "QEMU_CPU": QEMU_CPU},
                                stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
    (state / "sshd.pid").write_text(str(proc.pid))
    wait_listening(port, proc, state / "sshd.log")
    host_pub = (keys / "host.pub").read_text().split()
    known = state / "known_hosts"
    known.write_text(f"[127.0.0.1]:{port} {host_pub[0]} {host_pub[1]}\n")
    dev = Device(f"{USER}@127.0.0.1:{port}", port, str(keys / "client"), str(known), str(root))
    (state / "device.json").write_text(json.dumps(asdict(dev), indent=2))
    return dev


def wait_listening(port: int, proc: subprocess.Popen, logf: Path, limit_s: float = 60.0,
                   what: str = "the emulated Pi's sshd", poll_s: float = 0.2) -> None:
    """Return once something listens on 127.0.0.1:`port`; fail with `logf`'s tail if `proc` exits first, or after
    `limit_s` (tests/sshd.py uses it too: this module needs only the standard library, which it must)."""
    deadline = time.monotonic() + limit_s  # sshd runs emulated: it starts in a second or two
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode}: {logf.read_text()[-2000:]}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(poll_s)
    raise RuntimeError(f"{what} did not listen on 127.0.0.1:{port} within {limit_s:.0f} s")


def processes_in(root: Path) -> list[int]:
    """Pids of the processes whose root directory is `root` (sshd, sessions, agents)."""
    real, pids = os.path.realpath(root), []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if os.readlink(p / "root") == real:
                    pids.append(int(p.name))
            except OSError:
                pass
    return pids


def down(state: Path = DEFAULT_DIR) -> None:
    """Stop every process of the emulated Pi and unmount its file systems (the root file system is kept)."""
    root = state / "root"
    if not root.exists():
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = processes_in(root)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 5
        while pids and processes_in(root) and time.monotonic() < deadline:
            time.sleep(0.1)
    for point in mounts_under(root):
        if subprocess.run(["umount", point], capture_output=True).returncode:
            subprocess.run(["umount", "-l", point], capture_output=True)
    (state / "device.json").unlink(missing_ok=True)


def status(state: Path = DEFAULT_DIR) -> dict | None:
    f = state / "device.json"
    if not f.is_file() or not processes_in(state / "root"):
        return None
    return json.loads(f.read_text())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="piemu", description=__doc__.split("\n\n")[0])
    p.add_argument("command", choices=("up", "down", "status"))
    p.add_argument("--dir", type=Path, default=DEFAULT_DIR, help=f"state folder (default {DEFAULT_DIR})")
    p.add_argument("--port", type=int, default=0, help="sshd port on 127.0.0.1 (default: a free one)")
    args = p.parse_args(argv)
    try:
        if args.command == "up":
            print(json.dumps(asdict(up(args.dir, args.port, log=lambda m: print(m, file=sys.stderr))), indent=2))
        elif args.command == "down":
            down(args.dir)
        else:
            s = status(args.dir)
            print(json.dumps(s, indent=2) if s else "down")
            return 0 if s else 3
    except (Unavailable, RuntimeError, subprocess.CalledProcessError) as e:
        print(f"piemu: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
