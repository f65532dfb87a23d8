"""The emulated Raspberry Pi 5 (tests/pi-emu): what `pistill doctor` reads there, and the cross-built llama.cpp.

The smoke run benchmarked on it (with a fleet of it and an x86 loopback device) is in test_e2e.py, which has the
run folder. Every test here skips with the reason where this machine cannot run the emulated Pi."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile

import pytest

from sshd import ssh_home

from pistill.device import crossbuild


def pistill(*args: str, home, timeout: int = 600) -> subprocess.CompletedProcess:
    import os

    env = {**os.environ, "HOME": str(home)}
    return subprocess.run([sys.executable, "-m", "pistill.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_doctor_reads_an_aarch64_pi5(pi_emu, tmp_path):
    home = ssh_home(tmp_path, ("pi-emu", "pi", pi_emu.port, pi_emu.client_key, pi_emu.known_hosts))
    p = pistill("doctor", "pi-emu", "--json", home=home)
    assert p.returncode == 0, p.stderr[-2000:]
    d = json.loads(p.stdout)
    f = d["facts"]
    assert f["machine"] == "aarch64" and f["bits"] == 64 and f["os"].startswith("Debian GNU/Linux 12")
    assert f["board"] == "Raspberry Pi 5 Model B Rev 1.0" and f["board_kind"] == "pi5" and f["cpu"] == "Cortex-A76"
    assert f["asimddp"] is True and f["i8mm"] is False and f["emulated"].startswith("qemu-user aarch64")
    assert f["python"]["version"].startswith("3.11") and f["python"]["bits"] == 64
    assert d["quant"]["type"] == "Q4_0" and "-DGGML_CPU_ARM_ARCH=armv8.2-a+dotprod" in " ".join(d["build_env"])
    table = pistill("doctor", "pi-emu", home=home)
    assert "Raspberry Pi 5 Model B Rev 1.0 (emulated: qemu-user aarch64" in " ".join(table.stdout.split())


def test_a_program_on_the_pi_sees_its_cpu(pi_emu, tmp_path):
    """What the emulated processes see: aarch64, the Pi's cpuinfo (not the host's), the Cortex-A76's features."""
    import paramiko

    c = paramiko.SSHClient()
    c.load_host_keys(pi_emu.known_hosts)
    c.set_missing_host_key_policy(paramiko.RejectPolicy())
    c.connect("127.0.0.1", pi_emu.port, "pi", key_filename=pi_emu.client_key, look_for_keys=False,
              allow_agent=False)
    try:
        _, out, _ = c.exec_command("uname -m; grep -c '^processor' /proc/cpuinfo; grep -m1 'CPU part' /proc/cpuinfo;"
                                   " python3 -c 'import platform; print(platform.machine())'; echo $QEMU_CPU")
        lines = out.read().decode().split("\n")
    finally:
        c.close()
    assert lines[0] == "aarch64" and int(lines[1]) >= 1 and lines[2].endswith("0xd0b")
    assert lines[3] == "aarch64" and lines[4] == "cortex-a76"


def wheel(path, tag: str):
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("pkg/__init__.py", "")
        z.writestr("pkg-1.0.dist-info/WHEEL", f"Wheel-Version: 1.0\nRoot-Is-Purelib: false\nTag: py3-none-{tag}\n")
        z.writestr("pkg-1.0.dist-info/RECORD", "pkg/__init__.py,sha256=x,0\npkg-1.0.dist-info/WHEEL,sha256=y,1\n"
                                                "pkg-1.0.dist-info/RECORD,,\n")
    return path


def test_retag_sets_the_platform_in_name_wheel_and_record(tmp_path):
    import base64
    import hashlib

    src = wheel(tmp_path / "pkg-1.0-py3-none-linux_x86_64.whl", "linux_x86_64")
    dst = crossbuild.retag(src, "linux_aarch64")
    assert dst.name == "pkg-1.0-py3-none-linux_aarch64.whl" and src.is_file()
    with zipfile.ZipFile(dst) as z:
        text = z.read("pkg-1.0.dist-info/WHEEL")
        record = z.read("pkg-1.0.dist-info/RECORD").decode()
    assert b"Tag: py3-none-linux_aarch64\n" in text and b"x86_64" not in text
    digest = base64.urlsafe_b64encode(hashlib.sha256(text).digest()).rstrip(b"=").decode()
    assert f"pkg-1.0.dist-info/WHEEL,sha256={digest},{len(text)}" in record
    assert "pkg/__init__.py,sha256=x,0" in record
    assert crossbuild.retag(dst, "linux_aarch64") == dst


def test_no_cross_build_for_x86_or_32_bit_devices():
    assert "only 64-bit ARM" in crossbuild.missing_toolchain({"machine": "x86_64", "bits": 64})
    assert "only 64-bit ARM" in crossbuild.missing_toolchain({"machine": "aarch64", "bits": 32})
    with pytest.raises(crossbuild.CrossBuildError, match='llama_cpp_build = "device"'):
        crossbuild.wheel({"machine": "armv7l", "bits": 32}, "armv8-a")


def test_no_cross_build_without_the_device_cpu_features():
    why = crossbuild.missing_toolchain({"machine": "aarch64", "bits": 64}, None)
    assert why == "the device's CPU features are unknown (no Features line in its /proc/cpuinfo)"
