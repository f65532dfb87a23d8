"""Provisioning: build flags per board, install command lines, and the "use this python" path on a real sshd."""

from __future__ import annotations

import logging
import sys

import pytest

from pistill.llama_build import LLAMA_CPP_VERSION

from pistill.device import provision as P
from pistill.device import target as T
from sshd import sshd  # noqa: F401 (fixture)

PI5 = {"machine": "aarch64", "asimddp": True, "i8mm": False, "cores": 4}
PI4 = {"machine": "aarch64", "asimddp": False, "i8mm": False, "cores": 4}
ARMV9 = {"machine": "aarch64", "asimddp": True, "i8mm": True, "cores": 8}
X86 = {"machine": "x86_64", "asimddp": None, "i8mm": None, "cores": 2}


@pytest.mark.parametrize("facts, lib, expected", [
    (PI5, "", "-DGGML_NATIVE=OFF -DGGML_CPU_ARM_ARCH=armv8.2-a+dotprod"),
    (PI4, "", "-DGGML_NATIVE=OFF -DGGML_CPU_ARM_ARCH=armv8-a"),  # +dotprod would SIGILL on a Cortex-A72
    (ARMV9, "", "-DGGML_NATIVE=OFF -DGGML_CPU_ARM_ARCH=armv8.2-a+dotprod+i8mm"),
    (X86, "", ""),
    (PI5, "/opt/llama.cpp/build/bin", "-DGGML_NATIVE=OFF -DGGML_CPU_ARM_ARCH=armv8.2-a+dotprod -DLLAMA_BUILD=OFF"),
    ({}, "", ""),
])
def test_cmake_args(facts, lib, expected):
    assert P.cmake_args(facts, lib) == expected


def test_install_commands_fresh_venv_on_a_pi5():
    cmds = P.install_commands("/home/pi/.cache/pistill/venv", ["llama_cpp", "onnxruntime"], PI5, "", False)
    pip = "/home/pi/.cache/pistill/venv/bin/pip"
    assert cmds[0] == ["python3", "-m", "venv", "/home/pi/.cache/pistill/venv"]
    assert cmds[1] == [pip, "install", "--upgrade", "pip", "wheel"]
    assert cmds[2] == ["env", "CMAKE_ARGS=-DGGML_NATIVE=OFF -DGGML_CPU_ARM_ARCH=armv8.2-a+dotprod", "FORCE_CMAKE=1",
                       "CMAKE_BUILD_PARALLEL_LEVEL=4", pip, "install", "-v", "--no-cache-dir", "--force-reinstall",
                       "--no-binary", "llama-cpp-python", f"llama-cpp-python=={LLAMA_CPP_VERSION}"]
    assert cmds[3] == [pip, "install", "onnxruntime>=1.20,!=1.21.0", "numpy", "tokenizers"]
    assert len(cmds) == 4


def test_install_commands_existing_venv_on_a_pi4():
    cmds = P.install_commands("/v", ["llama_cpp"], PI4, "", True)
    assert len(cmds) == 1 and "CMAKE_ARGS=-DGGML_NATIVE=OFF -DGGML_CPU_ARM_ARCH=armv8-a" in cmds[0]
    assert P.install_commands("/v", [], PI4, "", True) == []


@pytest.mark.parametrize("packages, runtimes, expected", [
    ({"llama_cpp_python": LLAMA_CPP_VERSION, "onnxruntime": None}, ["llama_cpp", "onnxruntime"], ["onnxruntime"]),
    ({"llama_cpp_python": "0.3.9"}, ["llama_cpp"], ["llama_cpp"]),  # another release reads GGUF files differently
    ({}, ["llama_cpp"], ["llama_cpp"]),
    (None, ["torch"], ["torch"]),
    ({"torch": "2.4"}, ["torch"], []),
])
def test_lacking(packages, runtimes, expected):
    assert list(P.lacking(packages, runtimes)) == expected


def test_lacking_says_which_release_is_wanted():
    why = P.lacking({"llama_cpp_python": "0.3.9"}, ["llama_cpp"])["llama_cpp"]
    assert f"llama_cpp_python 0.3.9; {LLAMA_CPP_VERSION} wanted" in why


def test_a_pi_gets_the_cross_built_wheel_and_compiles_nothing(tmp_path):
    wheel = tmp_path / f"llama_cpp_python-{LLAMA_CPP_VERSION}-py3-none-linux_aarch64.whl"
    cmds = P.install_commands("/v", ["llama_cpp", "onnxruntime"], PI4, "", True, wheel)
    assert cmds[0] == ["/v/bin/pip", "install", "--force-reinstall", f"{P.WHEELS}/{wheel.name}"]
    assert not any("CMAKE_ARGS" in " ".join(c) for c in cmds)


@pytest.fixture
def conn(sshd):
    with T.connect(T.parse_target(sshd.spec, sshd.ssh_config), sshd.known_hosts) as c:
        yield c


def test_existing_python_with_the_runtimes_is_used_as_is(conn, tmp_path):
    plan = P.plan(conn, X86, ["llama_cpp", "onnxruntime"], sys.executable, str(tmp_path))
    assert plan == P.Plan(sys.executable, [], {})
    lib = P.plan(conn, X86, ["llama_cpp"], sys.executable, str(tmp_path), "/opt/llama/lib")
    assert lib.env == {"LLAMA_CPP_LIB_PATH": "/opt/llama/lib"}


def test_named_python_missing_is_a_clear_error(conn, tmp_path):
    with pytest.raises(P.ProvisionError, match=r"python '/no/such/python3' is not there or does not run; install"):
        P.plan(conn, X86, ["llama_cpp"], "/no/such/python3", str(tmp_path))


def test_named_python_without_the_runtime_is_a_clear_error(conn, tmp_path):
    bare = "/usr/bin/python3"
    info = P.probe_python(conn, bare)
    if info is None or info["packages"].get("llama_cpp_python"):
        pytest.skip(f"needs a {bare} without llama-cpp-python")
    with pytest.raises(P.ProvisionError, match=f"{bare} lacks llama_cpp \\(not installed\\); install them there"):
        P.plan(conn, X86, ["llama_cpp"], bare, str(tmp_path))


def test_own_venv_plan(conn, tmp_path):
    """No python named and no venv yet: create one in the cache and install into it."""
    plan = P.plan(conn, PI5, ["llama_cpp"], "", str(tmp_path / "cache"), llama_cpp_build="device")
    venv = f"{tmp_path}/cache/venv"
    assert plan.python == f"{venv}/bin/python" and plan.commands[0] == ["python3", "-m", "venv", venv]
    assert "CMAKE_ARGS=-DGGML_NATIVE=OFF -DGGML_CPU_ARM_ARCH=armv8.2-a+dotprod" in plan.commands[2]
    assert plan.wheels == {}


def test_an_x86_device_builds_llama_cpp_itself_and_cross_says_why_not(conn, tmp_path):
    plan = P.plan(conn, X86, ["llama_cpp"], "", str(tmp_path / "cache"))  # "auto": no cross build for x86
    assert plan.wheels == {} and "--no-binary" in plan.commands[2]
    with pytest.raises(P.ProvisionError, match=r"no cross build for a x86_64 device \(only 64-bit ARM\); or set "
                                               r"\[bench\] llama_cpp_build = \"device\""):
        P.plan(conn, X86, ["llama_cpp"], "", str(tmp_path / "cache"), llama_cpp_build="cross")


def test_provision_streams_its_output_and_checks_the_result(conn, caplog):
    plan = P.Plan(sys.executable, [["sh", "-c", "echo Building wheel 1/2; echo cmake step >&2"]])
    with caplog.at_level(logging.INFO):
        P.provision(conn, plan, ["llama_cpp"])
    assert "Building wheel 1/2" in caplog.text and "cmake step" in caplog.text
    bare = P.Plan("/no/such/python3", [["true"]])
    with pytest.raises(P.ProvisionError, match="after installing, /no/such/python3 still lacks llama_cpp"):
        P.provision(conn, bare, ["llama_cpp"])


class NoPython:
    """A device where no python runs at all (every probe exits 127)."""

    target = "pi@bare"

    def expand(self, path: str) -> str:
        return path.replace("~", "/home/pi")

    def run(self, argv, timeout_s, check=True, echo=False):
        return T.Result(127, "", f"sh: 1: {argv[0]}: not found\n")


def test_device_without_python3_is_a_clear_error():
    with pytest.raises(P.ProvisionError, match=r"pi@bare: python3 is not installed; install it on the device"):
        P.plan(NoPython(), PI5, ["llama_cpp"], "", "~/.cache/pistill")


@pytest.mark.parametrize("facts, amx_flags", [(X86, True), (PI5, False), (PI4, False)])
def test_x86_devices_build_llama_cpp_without_amx(facts, amx_flags):
    cmd = P.install_commands("/v", ["llama_cpp"], facts, "", True)[0]
    assert ("CFLAGS=-mno-amx-tile -mno-amx-int8 -mno-amx-bf16" in cmd) is amx_flags
    assert ("CXXFLAGS=-mno-amx-tile -mno-amx-int8 -mno-amx-bf16" in cmd) is amx_flags
