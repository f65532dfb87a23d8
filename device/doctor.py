"""`pistill doctor TARGET`: what the device is (board, CPU features, memory, disk, OS, Python, heat) and advice.

One POSIX shell script gathers raw text on the device (so it works where python3 is missing); pure functions here
parse it. Fields are None where the device does not say (an x86 test machine has no board model or dot product).
"""

from __future__ import annotations

import json
import os
import re
import subprocess

from pistill.artifact import cpu_fields
from pistill.llama_build import REBUILD

from .agent import throttle_flags
from .probe import DF, PY_PROBE, parse_df

SCRIPT_TIMEOUT_S = 60
# $1: a folder whose file system holds the cache (or will); $2: the python to check
SCRIPT = r"""
s() { echo "@@$1"; }
s machine; uname -m
s kernel; uname -r
s long_bit; getconf LONG_BIT 2>/dev/null
s dpkg_arch; dpkg --print-architecture 2>/dev/null
s model; tr -d '\000' < /sys/firmware/devicetree/base/model 2>/dev/null || tr -d '\000' < /proc/device-tree/model 2>/dev/null; echo
s emulated; cat /etc/pistill-emulated 2>/dev/null; echo
s cpuinfo; cat /proc/cpuinfo 2>/dev/null
s meminfo; cat /proc/meminfo 2>/dev/null
s nproc; nproc 2>/dev/null || getconf _NPROCESSORS_ONLN
""" f"s df; {DF} 2>/dev/null\n" r"""s os; cat /etc/os-release 2>/dev/null
s python; "$2" -c "$3" 2>/dev/null
s temp; cat /sys/class/thermal/thermal_zone0/temp 2>/dev/null
s freq; cat /sys/devices/system/cpu/cpu0/cpufreq/scaling_cur_freq 2>/dev/null
s throttled; vcgencmd get_throttled 2>/dev/null
s end
"""
CPU_PARTS = {"0xd03": "Cortex-A53", "0xd08": "Cortex-A72", "0xd0b": "Cortex-A76", "0xd05": "Cortex-A55"}
BOARDS = (("Raspberry Pi 5", "pi5"), ("Raspberry Pi 4", "pi4"), ("Raspberry Pi 400", "pi4"),
          ("Compute Module 4", "pi4"), ("Compute Module 5", "pi5"), ("Raspberry Pi 3", "pi3"),
          ("Raspberry Pi Zero 2", "pi3"))
MODEL_OVERHEAD_B = 300e6  # runtime, KV cache and Python beside the weights
HOT_C = 80.0  # the Pi 5 starts to throttle at 85 C


def sections(text: str) -> dict[str, str]:
    """`@@name` markers -> the text below each, stripped."""
    out, name = {}, None
    for line in text.splitlines():
        if line.startswith("@@"):
            name = line[2:].strip()
            out[name] = ""
        elif name:
            out[name] += line + "\n"
    return {k: v.strip() for k, v in out.items()}


def arm_features(cpuinfo: str) -> dict[str, bool | None]:
    """asimddp (int8 dot product: llama.cpp's repacked Q4_0 kernels) and i8mm; None off ARM."""
    feats = cpu_fields(cpuinfo).get("Features")
    if feats is None:
        return {"asimddp": None, "i8mm": None}
    have = set(feats.split())
    return {"asimddp": "asimddp" in have, "i8mm": "i8mm" in have}


def board_kind(model: str | None, cpuinfo: str) -> str | None:
    """pi5 / pi4 / pi3 from the device-tree model, else from the CPU core (Cortex-A76 is a Pi 5's)."""
    for prefix, kind in BOARDS:
        if model and model.startswith(prefix):
            return kind
    part = cpu_fields(cpuinfo).get("CPU part", "").lower()
    return {"0xd0b": "pi5", "0xd08": "pi4"}.get(part) if model and "Raspberry" in model else None


def meminfo(text: str) -> dict[str, float | None]:
    kb = {m[1]: int(m[2]) for m in re.finditer(r"^(\w+):\s+(\d+) kB", text, re.M)}
    mb = {k: kb[k] / 1024 if k in kb else None for k in ("MemTotal", "MemAvailable")}
    return {"mem_total_mb": mb["MemTotal"], "mem_available_mb": mb["MemAvailable"]}


def os_name(text: str) -> str | None:
    m = re.search(r'^PRETTY_NAME="?([^"\n]*)"?', text, re.M)
    return m[1] if m else None


def df_free_mb(text: str) -> float | None:
    free = parse_df(text)
    return None if free is None else free / (1 << 20)


def number(text: str, scale: float = 1.0) -> float | None:
    try:
        return int(text.strip()) / scale
    except ValueError:
        return None


def integer(text: str) -> int | None:
    n = number(text)
    return None if n is None else int(n)


def userland_bits(sec: dict[str, str], python: dict | None) -> int | None:
    """32 on a 32-bit OS even with a 64-bit kernel (armhf userland on aarch64)."""
    if sec.get("dpkg_arch") in ("armhf", "armel", "i386"):
        return 32
    if python and python.get("bits"):
        return python["bits"]
    return integer(sec.get("long_bit", ""))


def parse(text: str) -> dict:
    """Doctor facts from the script's output."""
    sec = sections(text)
    cpuinfo, model = sec.get("cpuinfo", ""), sec.get("model") or None
    try:
        python = json.loads(sec.get("python") or "null")
    except json.JSONDecodeError:
        python = None
    throttled = sec.get("throttled", "").partition("=")[2] or None
    return {
        "board": model, "board_kind": board_kind(model, cpuinfo),
        "cpu": CPU_PARTS.get(cpu_fields(cpuinfo).get("CPU part", "").lower()) or cpu_fields(cpuinfo).get("model name"),
        "machine": sec.get("machine") or None, "bits": userland_bits(sec, python), "os": os_name(sec.get("os", "")),
        "kernel": sec.get("kernel") or None, "cores": integer(sec.get("nproc", "")),
        **arm_features(cpuinfo), **meminfo(sec.get("meminfo", "")), "disk_free_mb": df_free_mb(sec.get("df", "")),
        "python": python, "temp_c": number(sec.get("temp", ""), 1e3), "cpu_mhz": number(sec.get("freq", ""), 1e3),
        "throttled": throttled, "throttled_flags": throttle_flags(throttled),
        # a device image run under emulation says how in /etc/pistill-emulated: its numbers are not a board's speed
        "emulated": sec.get("emulated") or None,
    }


def recommend_quant(facts: dict) -> tuple[str, str] | None:
    """The llama.cpp type that suits the CPU, and why; None off ARM."""
    if facts.get("asimddp") is None:
        return None
    if facts.get("i8mm"):
        return "Q4_0", "llama.cpp repacks Q4_0 at load time for its i8mm matrix-multiply kernels"
    if facts["asimddp"]:
        return "Q4_0", ("llama.cpp repacks Q4_0 at load time (4x4 interleaved) for the dot-product kernels of the "
                        "Cortex-A76 (Pi 5); K-quants are not repacked")
    return "Q4_K_M", ("without dot product (Cortex-A72, Pi 4) Q4_0 is not repacked and has no speed edge, so take "
                      "Q4_K_M's better quality at the same memory-bound decode speed (Q4_K_S when memory is tight)")


def advise(facts: dict, model_bytes: int | None = None) -> list[str]:
    """Warnings, most serious first; adapted to what the device is (an x86 box gets no Pi advice)."""
    notes = []
    if not facts.get("python"):
        notes.append("python3 not found (or not runnable): the agent needs it; install it with "
                     "`sudo apt install python3 python3-venv`, or set [bench] python to one that exists")
    if facts.get("bits") == 32:
        notes.append("32-bit OS: llama.cpp's ARM dot-product kernels and onnxruntime wheels need a 64-bit OS; "
                     "install Raspberry Pi OS (64-bit)")
    if facts.get("board_kind") is None:
        notes.append(f"not a Raspberry Pi ({facts.get('machine') or 'unknown machine'}): board-specific advice "
                     "(quant type, build flags, throttling) does not apply")
    notes += _memory_notes(facts, model_bytes) + _heat_notes(facts)
    if llama_has_amx(facts):
        notes.append("llama.cpp was built with AMX kernels (AMX_INT8 = 1), which crash on the first Q4_0 / Q4_1 "
                     f"decode; rebuild it without them: {REBUILD} (pistill provisions devices that way)")
    if facts.get("asimddp") is False:
        quant, why = recommend_quant(facts)
        notes.append(f"no ARM dot product (asimddp), as on a Pi 4: export {quant} rather than Q4_0 ({why}); "
                     "llama.cpp is built without +dotprod here")
    return notes


def llama_features(facts: dict) -> list[str] | None:
    """The CPU features the device's llama.cpp was built with (llama_print_system_info's "X = 1"), None if the
    python there has no llama_cpp."""
    info = (facts.get("python") or {}).get("llama_system_info")
    if not info:
        return None
    return [m[1] for m in re.finditer(r"([A-Z0-9_]+) = 1\b", info)]


def llama_has_amx(facts: dict) -> bool:
    return "AMX_INT8" in (llama_features(facts) or [])


def _memory_notes(facts: dict, model_bytes: int | None) -> list[str]:
    notes, mib = [], 1 << 20
    mem, disk = facts.get("mem_available_mb"), facts.get("disk_free_mb")
    if model_bytes and mem is not None and (model_bytes + MODEL_OVERHEAD_B) / mib > mem:
        notes.append(f"too little memory: the model needs about {(model_bytes + MODEL_OVERHEAD_B) / mib:.0f} MiB "
                     f"with the runtime, {mem:.0f} MiB are available; choose a smaller model or quant (e.g. Q4_0)")
    if model_bytes and disk is not None and model_bytes / mib > disk:
        notes.append(f"too little disk: the model is {model_bytes / mib:.0f} MiB, {disk:.0f} MiB are free")
    return notes


def _heat_notes(facts: dict) -> list[str]:
    notes = []
    if facts.get("temp_c") is not None and facts["temp_c"] >= HOT_C:
        notes.append(f"running hot ({facts['temp_c']:.0f} C): fit a heatsink or fan, or benchmarks will throttle")
    if facts.get("throttled_flags"):
        notes.append("throttling reported by the firmware: " + ", ".join(facts["throttled_flags"])
                     + " (use the official power supply and cooling)")
    return notes


def script_argv(folder: str, python: str) -> list[str]:
    return ["sh", "-c", SCRIPT, "doctor", folder, python, PY_PROBE]


def probe(conn, folder: str, python: str = "python3") -> dict:
    """Doctor facts of an SSH target (`conn` a target.Connection), or of this machine when `conn` is None."""
    if conn is None:
        proc = subprocess.run(script_argv(os.path.expanduser(folder), python), capture_output=True, text=True,
                              timeout=SCRIPT_TIMEOUT_S)
        return parse(proc.stdout)
    return parse(conn.run(script_argv(conn.expand(folder), python), SCRIPT_TIMEOUT_S).stdout)


def diagnose(facts: dict, model_bytes: int | None = None) -> dict:
    """Facts plus the advice: suggested quant, llama.cpp build flags, warnings (what `pistill doctor` prints)."""
    from .provision import build_env, cmake_args

    quant = recommend_quant(facts)
    return {"facts": facts, "quant": quant and {"type": quant[0], "why": quant[1]},
            "cmake_args": cmake_args(facts), "build_env": build_env(facts), "warnings": advise(facts, model_bytes)}


def _yes_no(v: bool | None) -> str:
    return "unknown (not ARM)" if v is None else ("yes" if v else "no")


def fmt(v: object, spec: str = "") -> str:
    return "–" if v is None else format(v, spec)


def rows(target: str, d: dict) -> list[tuple[str, str]]:
    """(field, value) lines for the terminal; "–" where the device does not say."""
    f, py = d["facts"], d["facts"].get("python") or {}
    have = ", ".join(f"{k} {v}" for k, v in (py.get("packages") or {}).items() if v) or "no runtimes"
    return [
        ("target", target), ("board", fmt(f.get("board")) + (f" (emulated: {f['emulated']})" if f.get("emulated")
                                                              else "")), ("cpu", fmt(f.get("cpu"))),
        ("arch", f"{fmt(f.get('machine'))}, {fmt(f.get('bits'))}-bit userland"), ("os", fmt(f.get("os"))),
        ("cores", fmt(f.get("cores"))), ("dot product (asimddp)", _yes_no(f.get("asimddp"))),
        ("i8mm", _yes_no(f.get("i8mm"))),
        ("memory", f"{fmt(f.get('mem_total_mb'), '.0f')} MiB total, {fmt(f.get('mem_available_mb'), '.0f')} available"),
        ("free disk", f"{fmt(f.get('disk_free_mb'), '.0f')} MiB"),
        ("python", f"{py['version']} ({py['executable']}): {have}" if py else "not found"),
        ("temperature", f"{fmt(f.get('temp_c'), '.1f')} C, CPU at {fmt(f.get('cpu_mhz'), '.0f')} MHz"
         if f.get("temp_c") is not None else "–"),
        ("throttled", f"{f['throttled']} ({', '.join(f['throttled_flags']) or 'never'})" if f.get("throttled")
         else "–"),
        ("suggested quant", f"{d['quant']['type']}: {d['quant']['why']}" if d["quant"] else "– (not an ARM board)"),
        ("llama.cpp build", ", ".join(feats) if (feats := llama_features(f)) is not None else "– (not installed)"),
        ("llama.cpp build flags", " ".join(d["build_env"])),
    ]
