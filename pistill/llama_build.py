"""The llama.cpp build pistill runs on: install llama-cpp-python without AMX, and probe it in a child process.

Why no AMX: llama.cpp's AMX kernels (built when `-march=native` finds AMX-INT8, as on Intel Sapphire Rapids and
later Xeons) crash in `ggml_backend_amx_mul_mat` on the first decode of Q4_0 / Q4_1 files. The build stays native
(`GGML_NATIVE=ON`: AVX2, AVX-512, VNNI where the CPU has them) with AMX switched off by `-mno-amx-*`, which GCC and
Clang honour whatever their order relative to `-march=native`.

Usable before pistill is installed (`python pistill/llama_build.py --python .venv/bin/python`, what `make install`
runs): stdlib only at import time. The probe writes a tiny Q4_0 GGUF with gguf-py and decodes it in a child
process, once per build (cached in the pistill cache), so a crashing build stops a run with one line, not a
segfault.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

LLAMA_CPP_VERSION = "0.3.36"  # the llama-cpp-python release pistill is tested with (its own llama.cpp inside)
NO_AMX = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"  # x86 only: keep every other native feature
MARKER = ".pistill-llama-build.json"  # in the venv (sys.prefix): what build is installed there
REBUILD = "python -m pistill.llama_build --force"  # the fix named in errors (make install runs the same)
PROBE_TIMEOUT_S = 120
PROBE_TOKENS = 8


try:
    from pistill.errors import UserError
    from pistill.rundir import scratch
except ImportError:  # run as a script before pistill is installed (to install, which never probes)
    UserError = RuntimeError

    def scratch(prefix: str):
        return tempfile.TemporaryDirectory(prefix=f"pistill-{prefix}-")


class LlamaBuildError(UserError):
    """The installed llama.cpp build crashes or cannot run here; the message names the rebuild command."""


def cache_dir() -> Path:
    return Path(os.environ.get("PISTILL_CACHE", "~/.cache/pistill")).expanduser()


# --- building ----------------------------------------------------------------------------------------------------

def build_env(machine: str | None = None) -> dict[str, str]:
    """CMAKE_ARGS / CFLAGS / CXXFLAGS for building llama-cpp-python on this machine (x86: native without AMX)."""
    machine = machine or platform.machine()
    if machine.lower() in ("x86_64", "amd64", "i686", "x86"):
        return {"CMAKE_ARGS": "-DGGML_NATIVE=ON", "CFLAGS": NO_AMX, "CXXFLAGS": NO_AMX}
    return {"CMAKE_ARGS": "-DGGML_NATIVE=ON"}


def cpu_signature() -> str:
    """The CPU's model name and feature flags: a native build is only valid on a CPU with the same ones."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    keep = [ln.split(":", 1)[1].strip() for ln in text.splitlines()
            if ln.split(":", 1)[0].strip() in ("model name", "flags", "Features", "CPU part")]
    return "\n".join(dict.fromkeys(keep))


def compiler() -> str:
    try:
        out = subprocess.run(["cc", "--version"], capture_output=True, text=True, timeout=30)
        return out.stdout.splitlines()[0] if out.stdout else "cc ?"
    except (OSError, subprocess.TimeoutExpired):
        return "cc ?"


def build_key(version: str, env: dict[str, str]) -> str:
    """What a wheel depends on and pip's wheel cache ignores: flags, CPU, compiler, machine."""
    blob = json.dumps({"version": version, "env": env, "cpu": cpu_signature(), "cc": compiler(),
                       "machine": platform.machine()}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def python_facts(python: str) -> dict:
    """sys.prefix of `python`, and the llama_cpp there: version and llama_print_system_info() (None if absent)."""
    code = ("import json,sys\ntry:\n import llama_cpp\n v=llama_cpp.__version__\n"
            " s=llama_cpp.llama_print_system_info().decode(errors='replace')\nexcept Exception:\n v=s=None\n"
            "print(json.dumps({'prefix':sys.prefix,'version':v,'system_info':s}))")
    out = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        raise LlamaBuildError(f"{python} does not run ({out.stderr.strip()[-200:]}); create the venv first")
    return json.loads(out.stdout.strip().splitlines()[-1])


def has_amx(system_info: str | None) -> bool:
    """Whether llama_print_system_info() reports the AMX kernels ("AMX_INT8 = 1")."""
    return bool(system_info) and "AMX_INT8 = 1" in system_info


def needs_build(facts: dict, version: str, key: str) -> str | None:
    """Why the venv's llama-cpp-python must be (re)built, or None when it is the wanted build."""
    if facts["version"] is None:
        return "llama-cpp-python is not installed"
    if has_amx(facts["system_info"]):
        return "the installed llama.cpp has AMX kernels, which crash on Q4_0 files"
    marker = Path(facts["prefix"]) / MARKER
    try:
        recorded = json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError):
        return f"the installed llama-cpp-python {facts['version']} was not built by pistill (no {MARKER})"
    if recorded.get("key") != key or facts["version"] != version:
        return f"the installed build ({facts['version']}, {recorded.get('key')}) is not {version}, {key}"
    return None


def build_wheel(python: str, version: str, env: dict[str, str], key: str) -> Path:
    """The llama-cpp-python wheel for these flags, built once into the pistill cache (pip's own wheel cache is
    keyed by version only, so it would hand back a wheel built with other flags)."""
    dest = cache_dir() / "wheels" / f"llama-cpp-python-{version}-{key}"
    if wheels := sorted(dest.glob("*.whl")):
        return wheels[-1]
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.tmp-"))
    try:
        cmd = [python, "-m", "pip", "wheel", "--no-deps", "--no-cache-dir", "--no-binary", "llama-cpp-python",
               f"llama-cpp-python=={version}", "-w", str(tmp)]
        print(f"llama_build: building llama-cpp-python {version} ({_flags(env)}); takes minutes", file=sys.stderr)
        # the build log goes to stderr (fd 2): stdout is a command's output (`pistill run` prints the report path)
        subprocess.run(cmd, check=True, stdout=2,
                       env={**os.environ, **env, "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count())})
        os.replace(tmp, dest)  # only a finished build lands in the cache
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return sorted(dest.glob("*.whl"))[-1]


def _flags(env: dict[str, str]) -> str:
    return " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())


def install(python: str, force: bool = False, version: str = LLAMA_CPP_VERSION) -> str:
    """Make `python`'s environment hold the no-AMX build of llama-cpp-python `version`; returns what it did."""
    env = build_env()
    key = build_key(version, env)
    facts = python_facts(python)
    why = "--force" if force else needs_build(facts, version, key)
    if why is None:
        return f"llama-cpp-python {version} ({key}) already installed"
    print(f"llama_build: installing: {why}", file=sys.stderr)
    wheel = build_wheel(python, version, env, key)
    pip = [python, "-m", "pip", "install", "-q"]
    subprocess.run([*pip, "--force-reinstall", "--no-deps", str(wheel)], check=True, stdout=2)
    subprocess.run([*pip, str(wheel)], check=True, stdout=2)  # its dependencies, where missing
    facts = python_facts(python)
    if has_amx(facts["system_info"]):
        raise LlamaBuildError(f"{wheel.name} still reports AMX kernels; delete {wheel.parent} and rerun")
    marker = Path(facts["prefix"]) / MARKER
    marker.write_text(json.dumps({"key": key, "version": version, "env": env, "wheel": wheel.name}, indent=2))
    return f"installed llama-cpp-python {version} ({key}) from {wheel}"


# --- probing -----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ProbeResult:
    ok: bool
    detail: str  # tokens decoded, or how the child died


def library_files() -> list[Path]:
    """The shared libraries llama_cpp loads (its own lib folder, or LLAMA_CPP_LIB_PATH)."""
    import importlib.util

    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        raise LlamaBuildError(f"llama-cpp-python is not installed; install it with {REBUILD}")
    folder = os.environ.get("LLAMA_CPP_LIB_PATH") or os.path.join(spec.submodule_search_locations[0], "lib")
    return sorted(p for p in Path(folder).glob("*.so*") if p.is_file()) + sorted(Path(folder).glob("*.dylib"))


def probe_key() -> str:
    """One build on one CPU: the libraries' bytes, and the CPU's features."""
    h = hashlib.sha256(cpu_signature().encode())
    for lib in library_files():
        h.update(lib.name.encode())
        with open(lib, "rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
    return h.hexdigest()[:24]


def write_tiny_gguf(path: Path) -> Path:
    """A random 2-layer llama in Q4_0 (64-wide, 256 byte tokens): every matmul takes llama.cpp's Q4_0 paths,
    AMX's included where a build has them."""
    import gguf
    import numpy as np

    rng = np.random.default_rng(0)
    n_embd, n_ff, n_vocab, n_layer, n_head = 64, 128, 288, 2, 2
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(128)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head)
    w.add_rope_dimension_count(n_embd // n_head)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(2)  # MOSTLY_Q4_0
    tokens = [f"<{i:02x}>" for i in range(n_vocab - 2)] + ["ab", "</s>"]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([1] * n_vocab)
    w.add_token_merges(["a b"])
    w.add_eos_token_id(n_vocab - 1)

    def q4(name: str, rows: int, cols: int) -> None:
        data = rng.standard_normal((rows, cols), dtype=np.float32) * 0.1
        w.add_tensor(name, gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q4_0),
                     raw_dtype=gguf.GGMLQuantizationType.Q4_0)

    q4("token_embd.weight", n_vocab, n_embd)
    w.add_tensor("output_norm.weight", np.ones(n_embd, dtype=np.float32))
    q4("output.weight", n_vocab, n_embd)
    for i in range(n_layer):
        for norm in ("attn_norm", "ffn_norm"):
            w.add_tensor(f"blk.{i}.{norm}.weight", np.ones(n_embd, dtype=np.float32))
        for proj in ("attn_q", "attn_k", "attn_v", "attn_output"):
            q4(f"blk.{i}.{proj}.weight", n_embd, n_embd)
        q4(f"blk.{i}.ffn_gate.weight", n_ff, n_embd)
        q4(f"blk.{i}.ffn_up.weight", n_ff, n_embd)
        q4(f"blk.{i}.ffn_down.weight", n_embd, n_ff)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def decode(path: str, n_tokens: int = PROBE_TOKENS, threads: int = 0) -> list[int]:
    """Greedy-decode `n_tokens` after a 4-token prompt (what the probe's child runs)."""
    import llama_cpp
    import numpy as np

    llm = llama_cpp.Llama(model_path=path, n_ctx=64, n_batch=32, n_threads=threads or os.cpu_count(),
                          verbose=False)
    try:
        ids = [1, 2, 3, 4]
        llm.eval(ids)
        for _ in range(n_tokens):
            ids.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
            llm.eval(ids[-1:])
        return ids[4:]
    finally:
        llm.close()


def run_child(cmd: list[str], timeout: float = PROBE_TIMEOUT_S) -> ProbeResult:
    """Run a probe child; a signal, a non-zero exit or a timeout becomes a failed result saying which."""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return ProbeResult(False, f"the probe did not finish in {timeout:.0f} s")
    if proc.returncode < 0:
        sig = -proc.returncode
        name = signal.Signals(sig).name if sig in signal.valid_signals() else f"signal {sig}"
        return ProbeResult(False, f"the probe was killed by {name}")
    if proc.returncode != 0:
        last = [ln for ln in proc.stderr.splitlines() if ln.strip()][-1:] or ["no message"]
        return ProbeResult(False, f"the probe exited with code {proc.returncode}: {last[0]}")
    return ProbeResult(True, proc.stdout.strip())


def probe(force: bool = False, child: list[str] | None = None) -> ProbeResult:
    """Decode a tiny Q4_0 file in a child process, once per build and CPU (the result is cached)."""
    key = probe_key()
    record = cache_dir() / "llama-probe" / f"{key}.json"
    if not force and child is None and record.is_file():
        return ProbeResult(**json.loads(record.read_text()))
    with scratch("llama-probe") as tmp:
        path = write_tiny_gguf(Path(tmp) / "tiny-q4_0.gguf")
        cmd = child or [sys.executable, "-m", "pistill.llama_build", "--decode", str(path)]
        result = run_child(cmd)
    if result.ok:  # a failure is not cached: a rebuild changes the key anyway, and a timeout may be load
        record.parent.mkdir(parents=True, exist_ok=True)
        tmp_record = record.with_name(f".{record.name}.tmp-{os.getpid()}")
        tmp_record.write_text(json.dumps({"ok": result.ok, "detail": result.detail}))
        os.replace(tmp_record, record)
    return result


@functools.cache
def ensure_works() -> None:
    """Raise LlamaBuildError (one line: cause and fix) unless the installed llama.cpp decodes a Q4_0 file here.
    Once per process; the probe itself runs once per build and CPU."""
    check(probe())


def check(result: ProbeResult) -> None:
    """LlamaBuildError naming the cause and the rebuild command for a failed probe."""
    if not result.ok:
        amx = " (it has AMX kernels, which crash on Q4_0 files)" if has_amx(system_info()) else ""
        raise LlamaBuildError(f"llama.cpp crashed decoding a tiny Q4_0 file: {result.detail}{amx}; "
                              f"rebuild it with: {REBUILD}")


def system_info() -> str | None:
    """llama_print_system_info() of this python's llama_cpp (CPU features it was built with), None if absent."""
    try:
        import llama_cpp
    except ImportError:
        return None
    return llama_cpp.llama_print_system_info().decode(errors="replace").strip()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pistill.llama_build",
                                description="Install llama-cpp-python built for this CPU without AMX, or probe it.")
    p.add_argument("--python", default=sys.executable, help="the python whose environment gets it (default: this)")
    p.add_argument("--force", action="store_true", help="rebuild and reinstall even if the build looks right")
    p.add_argument("--version", default=LLAMA_CPP_VERSION, help=f"llama-cpp-python version ({LLAMA_CPP_VERSION})")
    p.add_argument("--decode", metavar="GGUF", help=argparse.SUPPRESS)  # the probe's child
    args = p.parse_args(argv)
    if args.decode:
        print(" ".join(map(str, decode(args.decode))))
        return 0
    try:
        print(install(args.python, args.force, args.version))
    except (LlamaBuildError, subprocess.CalledProcessError) as e:
        print(f"llama_build: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
