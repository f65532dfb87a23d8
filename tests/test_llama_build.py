"""The llama.cpp build: no-AMX flags, rebuild decisions, and the crash probe (real llama.cpp, real child processes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from pistill import llama_build as lb

SEGV_CHILD = [sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)"]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PISTILL_CACHE", str(tmp_path))
    lb.ensure_works.cache_clear()
    yield tmp_path
    lb.ensure_works.cache_clear()


@pytest.mark.parametrize("machine, amx_off", [("x86_64", True), ("AMD64", True), ("aarch64", False)])
def test_build_env_switches_amx_off_on_x86_only(machine, amx_off):
    env = lb.build_env(machine)
    assert env["CMAKE_ARGS"] == "-DGGML_NATIVE=ON"  # native otherwise: AVX2 / AVX-512 / VNNI where present
    assert ("-mno-amx-int8" in env.get("CFLAGS", "")) is amx_off
    assert ("-mno-amx-int8" in env.get("CXXFLAGS", "")) is amx_off


def test_no_amx_flags_beat_native_march():
    """GCC honours -mno-amx-* after or before -march: a Sapphire Rapids build keeps VNNI and loses AMX."""
    for order in ([*lb.NO_AMX.split(), "-march=sapphirerapids"], ["-march=sapphirerapids", *lb.NO_AMX.split()]):
        out = subprocess.run(["cc", *order, "-dM", "-E", "-x", "c", "/dev/null"], capture_output=True, text=True)
        if out.returncode != 0:
            pytest.skip(f"cc does not know sapphirerapids: {out.stderr.strip()[:80]}")
        assert "__AVX512VNNI__" in out.stdout and "__AMX_INT8__" not in out.stdout


def test_build_key_follows_flags_and_version():
    env = lb.build_env("x86_64")
    assert lb.build_key("0.3.36", env) == lb.build_key("0.3.36", dict(env))
    assert lb.build_key("0.3.36", env) != lb.build_key("0.3.36", lb.build_env("aarch64"))
    assert lb.build_key("0.3.36", env) != lb.build_key("0.3.35", env)


def facts(tmp_path, version="0.3.36", info="CPU : AVX2 = 1 | AVX512 = 1 |", key=None):
    if key is not None:
        (tmp_path / lb.MARKER).write_text(json.dumps({"key": key}))
    return {"prefix": str(tmp_path), "version": version, "system_info": info}


def test_needs_build_reasons(tmp_path):
    assert "not installed" in lb.needs_build(facts(tmp_path, version=None), "0.3.36", "k")
    assert "not built by pistill" in lb.needs_build(facts(tmp_path), "0.3.36", "k")  # a venv from before the fix
    assert "AMX" in lb.needs_build(facts(tmp_path, info="CPU : AMX_INT8 = 1 | AVX512 = 1 |", key="k"), "0.3.36", "k")
    assert "is not" in lb.needs_build(facts(tmp_path, key="other"), "0.3.36", "k")  # other flags or another CPU
    assert lb.needs_build(facts(tmp_path, key="k"), "0.3.36", "k") is None


def test_this_venv_holds_the_no_amx_build():
    """What `make install` leaves: pistill's marker with this machine's key, and no AMX kernels."""
    f = lb.python_facts(sys.executable)
    assert f["version"] is not None and not lb.has_amx(f["system_info"])
    assert lb.needs_build(f, lb.LLAMA_CPP_VERSION, lb.build_key(lb.LLAMA_CPP_VERSION, lb.build_env())) is None


def test_q4_0_decode_in_a_child(cache):
    """The real probe: a tiny Q4_0 file decoded by this llama.cpp build in a child process, then cached."""
    result = lb.probe()
    assert result.ok, result.detail
    assert len(result.detail.split()) == lb.PROBE_TOKENS
    records = list((cache / "llama-probe").glob("*.json"))
    assert len(records) == 1 and json.loads(records[0].read_text())["ok"] is True
    lb.ensure_works()  # passes


def test_tiny_file_is_q4_0(tmp_path):
    import gguf

    path = lb.write_tiny_gguf(tmp_path / "t.gguf")
    kinds = {t.tensor_type.name for t in gguf.GGUFReader(path).tensors if len(t.shape) > 1}
    assert kinds == {"Q4_0"}


def test_a_segfaulting_child_becomes_one_clear_line(cache):
    result = lb.probe(child=SEGV_CHILD)
    assert not result.ok and result.detail == "the probe was killed by SIGSEGV"
    assert not (cache / "llama-probe").exists()  # a failure is never cached as a pass

    with pytest.raises(lb.LlamaBuildError) as err:
        lb.check(result)
    msg = str(err.value)
    assert "\n" not in msg and "SIGSEGV" in msg and lb.REBUILD in msg


def test_child_exit_code_and_timeout_are_named():
    bad = lb.run_child([sys.executable, "-c", "import sys; print('boom', file=sys.stderr); sys.exit(3)"])
    assert not bad.ok and bad.detail == "the probe exited with code 3: boom"
    slow = lb.run_child([sys.executable, "-c", "import time; time.sleep(5)"], timeout=0.5)
    assert not slow.ok and "did not finish" in slow.detail


def test_a_build_writes_its_log_to_stderr_never_stdout(tmp_path):
    """`pistill run` prints only the report's path on stdout (scripts read it): a first build of llama.cpp, whose
    pip log is hundreds of lines, must not reach it. A stand-in interpreter logs to stdout and drops a wheel."""
    fake = tmp_path / "python"
    fake.write_text('#!/bin/sh\necho "pip: compiling ggml"\nwhile [ "$1" != "-w" ]; do shift; done\n'
                    'touch "$2/llama_cpp_python-0.0.1-cp311-cp311-linux_x86_64.whl"\n')
    fake.chmod(0o755)
    code = ("import sys; from pistill import llama_build as lb; "
            "print(lb.build_wheel(sys.argv[1], '0.0.1', {}, 'k').name, file=sys.stderr)")
    p = subprocess.run([sys.executable, "-c", code, str(fake)], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "PISTILL_CACHE": str(tmp_path / "cache")})
    assert p.returncode == 0, p.stderr
    assert p.stdout == "" and "pip: compiling ggml" in p.stderr and p.stderr.strip().endswith(".whl")
