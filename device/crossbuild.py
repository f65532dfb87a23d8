"""llama-cpp-python for an ARM board, compiled on this machine: the device installs a wheel and compiles nothing.

Building llama.cpp on a Pi takes tens of minutes (a Pi 4 far longer) and needs a compiler there. Here the same
llama-cpp-python release this machine runs (`LLAMA_CPP_VERSION`, so the device's llama.cpp reads the GGUF files
this machine writes) is cross-compiled with Debian's aarch64 toolchain for the board's ARM architecture
(`provision.llama_arch`: `armv8.2-a+dotprod` on a Pi 5, plain `armv8-a` on a Pi 4), with OpenMP off (no libgomp
needed on the device; ggml's own thread pool) and without the multimodal library, and the wheel is tagged for
linux_aarch64. Wheels are cached in the
pistill cache by release and flags; the device gets one through the content-addressed upload, so a second device
or run sends nothing.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from pistill.errors import UserError
from pistill.llama_build import LLAMA_CPP_VERSION, build_wheel

TOOLCHAINS = {"aarch64": "aarch64-linux-gnu"}  # device machine -> Debian cross toolchain prefix
TOOLCHAIN_PACKAGES = {"aarch64": "g++-aarch64-linux-gnu"}
WHEEL_PLATFORMS = {"aarch64": "linux_aarch64"}


class CrossBuildError(UserError):
    """The cross toolchain is missing or the build failed; the message names the fix."""


def machine(facts: dict) -> str | None:
    m = facts.get("machine")
    return "aarch64" if m in ("aarch64", "arm64") and facts.get("bits") != 32 else None


def missing_toolchain(facts: dict, arch: str | None = "armv8-a") -> str | None:
    """Why this machine cannot cross-build for the device (for `arch`, the board's GGML_CPU_ARM_ARCH), or None."""
    m = machine(facts)
    if m is None:
        return f"no cross build for a {facts.get('machine') or 'unknown'} device (only 64-bit ARM)"
    if not arch:
        return "the device's CPU features are unknown (no Features line in its /proc/cpuinfo)"
    if not (shutil.which(f"{TOOLCHAINS[m]}-gcc") and shutil.which(f"{TOOLCHAINS[m]}-g++")):
        return f"the {TOOLCHAINS[m]} compilers are not installed here (apt-get install {TOOLCHAIN_PACKAGES[m]})"
    if not shutil.which("cmake"):
        return "cmake is not installed here (apt-get install cmake)"
    return None


def cmake_args(m: str, arch: str) -> str:
    """CMake settings for a cross build: target system and compilers, the board's arch, no OpenMP."""
    prefix = TOOLCHAINS[m]
    return " ".join([f"-DCMAKE_SYSTEM_NAME=Linux", f"-DCMAKE_SYSTEM_PROCESSOR={m}",
                     f"-DCMAKE_C_COMPILER={prefix}-gcc", f"-DCMAKE_CXX_COMPILER={prefix}-g++",
                     "-DGGML_NATIVE=OFF", f"-DGGML_CPU_ARM_ARCH={arch}", "-DGGML_OPENMP=OFF",
                     "-DLLAVA_BUILD=OFF"])  # the multimodal library: pistill runs text models only


def compiler_version(m: str) -> str:
    out = subprocess.run([f"{TOOLCHAINS[m]}-gcc", "--version"], capture_output=True, text=True, timeout=30)
    return out.stdout.splitlines()[0] if out.stdout else "?"


def wheel(facts: dict, arch: str | None, version: str = LLAMA_CPP_VERSION) -> Path:
    """The device's llama-cpp-python wheel (built here once, then from the cache)."""
    if why := missing_toolchain(facts, arch):
        raise CrossBuildError(f"cannot build llama.cpp for the device here: {why}; or set "
                              "[bench] llama_cpp_build = \"device\" to build it on the device")
    m = machine(facts)
    env = {"CMAKE_ARGS": cmake_args(m, arch)}
    key = hashlib.sha256(json.dumps({"version": version, "env": env, "cc": compiler_version(m)},
                                    sort_keys=True).encode()).hexdigest()[:16]
    try:
        built = build_wheel(sys.executable, version, env, f"{m}-{key}")
    except subprocess.CalledProcessError as e:
        raise CrossBuildError(f"cross-building llama-cpp-python {version} for {m} ({arch}) failed (exit "
                              f"{e.returncode}; its output is above); set [bench] llama_cpp_build = \"device\" "
                              "to build on the device instead") from None
    return retag(built, WHEEL_PLATFORMS[m])


def retag(path: Path, platform: str) -> Path:
    """A copy of the wheel at `path` with its platform tag set to `platform` (the build tags it with this
    machine's): file name, the Tag lines of WHEEL and WHEEL's line in RECORD. Returns `path` when already right."""
    name, ver, py, abi, _ = path.stem.split("-")
    dst = path.with_name(f"{name}-{ver}-{py}-{abi}-{platform}.whl")
    if dst == path or dst.is_file():
        return dst
    part = dst.with_suffix(".whl.part")
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(part, "w", zipfile.ZIP_DEFLATED) as out:
        wheel_file = next(n for n in src.namelist() if re.fullmatch(r"[^/]+\.dist-info/WHEEL", n))
        record = wheel_file[:-len("WHEEL")] + "RECORD"
        text = re.sub(r"^Tag: (\S+?)-(\S+?)-\S+$", rf"Tag: \1-\2-{platform}", src.read(wheel_file).decode(),
                      flags=re.M).encode()
        digest = base64.urlsafe_b64encode(hashlib.sha256(text).digest()).rstrip(b"=").decode()
        for info in src.infolist():
            data = src.read(info)
            if info.filename == wheel_file:
                data = text
            elif info.filename == record:
                data = "".join(f"{wheel_file},sha256={digest},{len(text)}\n" if ln.startswith(wheel_file + ",")
                               else ln + "\n" for ln in data.decode().splitlines()).encode()
            out.writestr(info, data)
    part.replace(dst)
    return dst
