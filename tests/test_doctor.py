"""`pistill doctor`: parsing Pi 5 / Pi 4 / 32-bit / x86 facts, advice, and a real probe through the local sshd."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pistill.device import doctor
from pistill.device import target as T
from sshd import sshd  # noqa: F401 (fixture)

PI5_CPUINFO = """processor\t: 0
BogoMIPS\t: 108.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp
CPU implementer\t: 0x41
CPU part\t: 0xd0b

processor\t: 1
Features\t: fp asimd
"""
PI4_CPUINFO = """processor\t: 0
Features\t: fp asimd evtstrm crc32 cpuid
CPU part\t: 0xd08
"""
X86_CPUINFO = "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse avx2\n"
MEMINFO = "MemTotal:        8245000 kB\nMemFree:  100 kB\nMemAvailable:    7340032 kB\n"
DF = "Filesystem 1024-blocks Used Available Capacity Mounted on\n/dev/mmcblk0p2 30000000 10000000 20971520 34% /\n"
OS = 'PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\nNAME="Debian GNU/Linux"\n'
PY = json.dumps({"version": "3.11.2", "executable": "/usr/bin/python3", "bits": 64,
                 "packages": {"llama_cpp_python": None, "onnxruntime": "1.20.1", "numpy": "1.26.4"}})


def output(machine="aarch64", model="Raspberry Pi 5 Model B Rev 1.0", cpuinfo=PI5_CPUINFO, dpkg="arm64",
           python=PY, temp="52300", throttled="throttled=0x0", long_bit="64") -> str:
    """What the doctor script prints on a device."""
    parts = {"machine": machine, "kernel": "6.6.31+rpt-rpi-2712", "long_bit": long_bit, "dpkg_arch": dpkg,
             "model": model, "cpuinfo": cpuinfo, "meminfo": MEMINFO, "nproc": "4", "df": DF, "os": OS,
             "python": python, "temp": temp, "freq": "2400000", "throttled": throttled, "end": ""}
    return "\n".join(f"@@{k}\n{v}" for k, v in parts.items())


def test_pi5():
    f = doctor.parse(output())
    assert f["board"] == "Raspberry Pi 5 Model B Rev 1.0" and f["board_kind"] == "pi5" and f["cpu"] == "Cortex-A76"
    assert (f["machine"], f["bits"], f["cores"], f["asimddp"], f["i8mm"]) == ("aarch64", 64, 4, True, False)
    assert f["mem_total_mb"] == pytest.approx(8051.8, abs=0.1) and f["mem_available_mb"] == 7168
    assert f["disk_free_mb"] == 20480 and f["os"] == "Debian GNU/Linux 12 (bookworm)"
    assert f["python"]["version"] == "3.11.2" and f["temp_c"] == 52.3 and f["cpu_mhz"] == 2400
    assert f["throttled"] == "0x0" and f["throttled_flags"] == []
    assert doctor.recommend_quant(f)[0] == "Q4_0" and "dot-product" in doctor.recommend_quant(f)[1]
    assert doctor.advise(f, model_bytes=100_000_000) == []
    assert doctor.diagnose(f)["cmake_args"] == "-DGGML_NATIVE=OFF -DGGML_CPU_ARM_ARCH=armv8.2-a+dotprod"


def test_pi4_gets_k_quant_advice_and_no_dotprod_build():
    f = doctor.parse(output(model="Raspberry Pi 4 Model B Rev 1.4", cpuinfo=PI4_CPUINFO))
    assert f["board_kind"] == "pi4" and f["cpu"] == "Cortex-A72" and f["asimddp"] is False
    assert doctor.recommend_quant(f)[0] == "Q4_K_M"
    notes = doctor.advise(f)
    assert len(notes) == 1 and "no ARM dot product" in notes[0] and "Q4_K_M" in notes[0]
    assert doctor.diagnose(f)["cmake_args"] == "-DGGML_NATIVE=OFF -DGGML_CPU_ARM_ARCH=armv8-a"


def test_32bit_userland_on_a_64bit_kernel():
    f = doctor.parse(output(dpkg="armhf", python=PY.replace('"bits": 64', '"bits": 32'), long_bit="32"))
    assert f["bits"] == 32 and any("32-bit OS" in n for n in doctor.advise(f))


def test_x86_has_nulls_not_guesses():
    f = doctor.parse(output(machine="x86_64", model="", cpuinfo=X86_CPUINFO, dpkg="amd64", temp="", throttled=""))
    assert f["board"] is None and f["board_kind"] is None and f["asimddp"] is None and f["i8mm"] is None
    assert f["temp_c"] is None and f["throttled"] is None and f["throttled_flags"] is None and f["cpu"] == "AMD EPYC"
    assert doctor.recommend_quant(f) is None and doctor.diagnose(f)["cmake_args"] == ""
    notes = doctor.advise(f)
    assert len(notes) == 1 and notes[0].startswith("not a Raspberry Pi (x86_64)")


@pytest.mark.parametrize("changes, model_bytes, warning", [
    ({"python": ""}, None, "python3 not found"),
    ({"python": "not json"}, None, "python3 not found"),
    ({}, 8_000_000_000, "too little memory"),
    ({}, 30_000_000_000, "too little disk"),
    ({"temp": "84000"}, None, "running hot (84 C)"),
    ({"throttled": "throttled=0x50005"}, None, "under-voltage now, throttled now"),
])
def test_warnings(changes, model_bytes, warning):
    notes = doctor.advise(doctor.parse(output(**changes)), model_bytes)
    assert len(notes) >= 1 and any(warning in n for n in notes), notes


def test_sections_ignore_preamble_and_strip():
    assert doctor.sections("motd\n@@a\n x \n\n@@b\n") == {"a": "x", "b": ""}


def test_probe_through_sshd(sshd, tmp_path):
    """The local sshd is an x86 box: facts are real where Linux says them, None where a Pi would."""
    with T.connect(T.parse_target(sshd.spec, sshd.ssh_config), sshd.known_hosts) as conn:
        f = doctor.probe(conn, str(tmp_path / "cache"), sys.executable)
        missing = doctor.probe(conn, str(tmp_path / "cache"), "/no/such/python3")
    assert f["machine"] and f["cores"] >= 1 and f["mem_total_mb"] > 0 and f["disk_free_mb"] > 0 and f["os"]
    assert f["python"]["executable"] == sys.executable and f["python"]["packages"]["llama_cpp_python"]
    if f["machine"] == "x86_64":
        assert f["asimddp"] is None and f["board_kind"] is None
        assert any(n.startswith("not a Raspberry Pi") for n in doctor.advise(f))
    assert missing["python"] is None and any("python3 not found" in n for n in doctor.advise(missing))


def test_cli_doctor(sshd, tmp_path):
    args = [sys.executable, "-m", "pistill.cli", "doctor", sshd.spec, "--known-hosts", str(sshd.known_hosts),
            "--ssh-config", str(sshd.ssh_config), "--python", sys.executable, "--cache", str(tmp_path)]
    p = subprocess.run(args + ["--json"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["target"] == sshd.spec and out["facts"]["cores"] >= 1 and isinstance(out["warnings"], list)
    p = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and "free disk" in p.stdout and "suggested quant" in p.stdout


def test_cli_doctor_local():
    p = subprocess.run([sys.executable, "-m", "pistill.cli", "doctor", "local", "--json"], capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0 and json.loads(p.stdout)["facts"]["cores"] >= 1


AMX_INFO = "CPU : SSE3 = 1 | AVX2 = 1 | AVX512 = 1 | AVX512_VNNI = 1 | AMX_INT8 = 1 | LLAMAFILE = 1 | REPACK = 0 |"


@pytest.mark.parametrize("info, amx", [(AMX_INFO, True), (AMX_INFO.replace("AMX_INT8 = 1", "AMX_INT8 = 0"), False)])
def test_llama_build_features_and_amx_warning(info, amx):
    py = json.loads(PY)
    py["llama_system_info"] = info
    f = doctor.parse(output(machine="x86_64", model="", cpuinfo=X86_CPUINFO, dpkg="amd64", python=json.dumps(py)))
    assert ("AMX_INT8" in doctor.llama_features(f)) is amx and "REPACK" not in doctor.llama_features(f)
    notes = [n for n in doctor.advise(f) if "AMX" in n]
    assert bool(notes) is amx and (not notes or "python -m pistill.llama_build --force" in notes[0])
    row = dict(doctor.rows("local", doctor.diagnose(f)))["llama.cpp build"]
    assert row.startswith("SSE3, AVX2, AVX512")
    assert "-mno-amx-int8" in dict(doctor.rows("local", doctor.diagnose(f)))["llama.cpp build flags"]


def test_local_doctor_reports_this_llama_build():
    """The real probe of this machine: the venv's llama.cpp is the no-AMX build."""
    f = doctor.probe(None, "~/.cache/pistill", sys.executable)
    feats = doctor.llama_features(f)
    assert feats and "AMX_INT8" not in feats and not doctor.llama_has_amx(f)
