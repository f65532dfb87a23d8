"""Provision the device: a venv with onnxruntime and llama-cpp-python built for the board, or the user's python.

Build flags follow the CPU: a Pi 5 (Cortex-A76) has the ARMv8.2 dot product, so llama.cpp is built for
`armv8.2-a+dotprod` and its repacked Q4_0 kernels run; a Pi 4 (Cortex-A72) has none, so it gets plain `armv8-a`
(a binary with +dotprod would die with SIGILL there). For a 64-bit ARM device llama-cpp-python is cross-compiled
on this machine where it has the aarch64 toolchain (device/crossbuild.py; `[bench] llama_cpp_build`), and the
device installs the uploaded wheel; otherwise it is built on the device, which takes long on a Pi (its output
streams to the log). The device's llama-cpp-python is the release this machine writes GGUF files with.
"""

from __future__ import annotations

import json
import logging
import shlex
import threading
from dataclasses import dataclass, field
from pathlib import Path

from pistill.formats import FORMATS
from pistill.llama_build import NO_AMX

from . import crossbuild, transfer
from .probe import PY_PROBE
from .target import Connection, TargetError, describe

log = logging.getLogger(__name__)

PACKAGES = {  # runtime -> (distribution the probe reports, pip requirements), from the format table
    f.runtime: (f.distribution, list(f.requirements)) for f in FORMATS.values()}
VERSIONS = {f.runtime: f.version for f in FORMATS.values() if f.version}  # runtime -> the exact release wanted
WHEELS = "{wheels}"  # in a plan's commands: the device folder its wheels were uploaded to
_cross_lock = threading.Lock()  # a fleet's devices share one cross build
PROBE_TIMEOUT_S = 60
VENV_TIMEOUT_S = 300
PIP_TIMEOUT_S = 3600  # compiling llama.cpp on a Pi 4 takes tens of minutes


class ProvisionError(TargetError):
    """The device has no usable python or runtime, and pistill may not (or could not) install one."""


@dataclass(frozen=True)
class Plan:
    """How the agent will run on one device."""

    python: str  # interpreter for the agent
    commands: list[list[str]] = field(default_factory=list)  # installs to run first, in order
    env: dict[str, str] = field(default_factory=dict)  # environment for the agent (LLAMA_CPP_LIB_PATH)
    wheels: dict[str, Path] = field(default_factory=dict)  # built here, uploaded before the commands run


def llama_arch(facts: dict) -> str | None:
    """GGML_CPU_ARM_ARCH for the board: +dotprod only where the CPU has asimddp (Pi 5), +i8mm where it has that."""
    if facts.get("machine") not in ("aarch64", "arm64") or facts.get("asimddp") is None:
        return None
    arch = "armv8.2-a+dotprod" if facts["asimddp"] else "armv8-a"
    return arch + "+i8mm" if facts.get("i8mm") else arch


def cmake_args(facts: dict, llama_cpp_lib: str = "") -> str:
    """CMAKE_ARGS for building llama-cpp-python on the device (x86 adds CFLAGS: see `build_env`)."""
    args = []
    if arch := llama_arch(facts):  # an explicit arch, not -march=native: reproducible and right on every Pi
        args += ["-DGGML_NATIVE=OFF", f"-DGGML_CPU_ARM_ARCH={arch}"]
    if llama_cpp_lib:  # the user's own libllama.so: build only the bindings
        args.append("-DLLAMA_BUILD=OFF")
    return " ".join(args)


def build_env(facts: dict, llama_cpp_lib: str = "") -> list[str]:
    """`env` assignments for the device's llama-cpp-python build: CMAKE_ARGS, and on an x86 device the flags that
    keep llama.cpp's AMX kernels out (they crash on Q4_0 files; pistill/llama_build.py)."""
    env = [f"CMAKE_ARGS={cmake_args(facts, llama_cpp_lib)}"]
    if facts.get("machine") in ("x86_64", "amd64"):
        env += [f"CFLAGS={NO_AMX}", f"CXXFLAGS={NO_AMX}"]
    return env


def lacking(packages: dict | None, runtimes: list[str]) -> dict[str, str]:
    """{runtime: what is wrong} for the runtimes whose package the probed python lacks or has in another release."""
    packages, out = packages or {}, {}
    for r in runtimes:
        have, want = packages.get(PACKAGES[r][0]), VERSIONS.get(r)
        if not have:
            out[r] = f"{r} (not installed)"
        elif want and have != want:
            out[r] = f"{r} ({PACKAGES[r][0]} {have}; {want} wanted, the release this machine writes its files with)"
    return out


def install_commands(venv: str, need: list[str], facts: dict, llama_cpp_lib: str, has_venv: bool,
                     llama_wheel: Path | None = None) -> list[list[str]]:
    """The commands that create `venv` (unless `has_venv`) and install `need` into it; llama.cpp from
    `llama_wheel` (uploaded to WHEELS) when given, else built on the device."""
    pip = f"{venv}/bin/pip"
    cmds = [] if has_venv else [["python3", "-m", "venv", venv], [pip, "install", "--upgrade", "pip", "wheel"]]
    for runtime in need:
        reqs = PACKAGES[runtime][1]
        if runtime != "llama_cpp":
            cmds.append([pip, "install", *reqs])
        elif llama_wheel:
            cmds.append([pip, "install", "--force-reinstall", f"{WHEELS}/{llama_wheel.name}"])
        else:
            env = ["env", *build_env(facts, llama_cpp_lib), "FORCE_CMAKE=1",
                   f"CMAKE_BUILD_PARALLEL_LEVEL={facts.get('cores') or 1}"]
            cmds.append([*env, pip, "install", "-v", "--no-cache-dir", "--force-reinstall", "--no-binary",
                         "llama-cpp-python", *reqs])
    return cmds


def llama_wheel(conn: Connection, facts: dict, mode: str, llama_cpp_lib: str) -> Path | None:
    """The cross-built llama-cpp-python wheel for this device, or None to build on the device."""
    if mode == "device" or llama_cpp_lib:  # with the user's own libllama.so only the bindings are built there
        return None
    arch = llama_arch(facts)
    if mode == "auto" and (why := crossbuild.missing_toolchain(facts, arch)):
        log.info("%s: llama.cpp will be built on the device (%s)", conn.target, why)
        return None
    try:
        with _cross_lock:
            return crossbuild.wheel(facts, arch)
    except crossbuild.CrossBuildError as e:
        raise ProvisionError(f"{conn.target}: {e}") from None


def probe_python(conn: Connection, python: str) -> dict | None:
    """{version, executable, bits, packages} of a python on the device, or None when it does not run."""
    res = conn.run([python, "-c", PY_PROBE], PROBE_TIMEOUT_S, check=False)
    try:
        return json.loads(res.stdout.strip().splitlines()[-1]) if res.rc == 0 else None
    except (json.JSONDecodeError, IndexError):
        return None


def plan(conn: Connection, facts: dict, runtimes: list[str], python: str, cache: str,
         llama_cpp_lib: str = "", llama_cpp_build: str = "auto") -> Plan:
    """Use the named python as it is, or pistill's venv in the cache (listing what to install into it)."""
    env = {"LLAMA_CPP_LIB_PATH": llama_cpp_lib} if llama_cpp_lib else {}
    if python:
        info = probe_python(conn, python)
        if info is None:
            raise ProvisionError(f"{conn.target}: python '{python}' is not there or does not run; install python3 "
                                 "(sudo apt install python3 python3-venv) or fix [bench] python")
        if lack := lacking(info["packages"], runtimes):
            reqs = " ".join(f"'{r}'" for x in lack for r in PACKAGES[x][1])
            raise ProvisionError(f"{conn.target}: {python} lacks {', '.join(lack.values())}; install them there "
                                 f"({python} -m pip install {reqs}) or leave [bench] python empty so pistill "
                                 "provisions its own venv")
        return Plan(python, [], env)
    venv = f"{conn.expand(cache).rstrip('/')}/venv"
    info = probe_python(conn, f"{venv}/bin/python")
    if info is None and probe_python(conn, "python3") is None:
        raise ProvisionError(f"{conn.target}: python3 is not installed; install it on the device "
                             "(sudo apt install python3 python3-venv) or set [bench] python")
    lack = list(lacking(info and info["packages"], runtimes))
    wheel = llama_wheel(conn, facts, llama_cpp_build, llama_cpp_lib) if "llama_cpp" in lack else None
    return Plan(f"{venv}/bin/python", install_commands(venv, lack, facts, llama_cpp_lib, info is not None, wheel),
                env, {wheel.name: wheel} if wheel else {})


def provision(conn: Connection, p: Plan, runtimes: list[str],
              cache: str = transfer.CACHE) -> tuple[list[str], list[transfer.Upload]]:
    """Upload the plan's wheels, run its installs (streaming their output), then check the runtimes import;
    returns the commands run (as shell text) and the wheels' uploads."""
    ran, ups, folder = [], [], ""
    if p.wheels:
        folder, ups = transfer.upload_tree(conn, p.wheels, cache)
    for argv in p.commands:
        argv = [a.replace(WHEELS, folder) for a in argv]
        ran.append(shlex.join(argv))
        log.info("%s: provisioning: %s", conn.target, describe(argv))
        conn.run(argv, PIP_TIMEOUT_S if "pip" in " ".join(argv) else VENV_TIMEOUT_S, echo=True)
    if p.commands and (lack := lacking((probe_python(conn, p.python) or {}).get("packages"), runtimes)):
        raise ProvisionError(f"{conn.target}: after installing, {p.python} still lacks {', '.join(lack.values())}")
    return ran, ups
