"""On-device benchmark agent: time one model in one runtime and print one JSON object (stdlib + the runtime).

    python3 agent.py --runtime llama_cpp --model student.gguf --threads 4,1,2 --prompt-tokens 32,128 --gen-tokens 64

Runs on a Pi with only agent.py, runtimes.py and ortlm.py copied side by side, so it imports nothing from pistill.
Prefill of the first prompt length gives the time to first token (prefill returns the first generated token),
`prefill_tps` is taken at the longest prompt, and decode runs `--gen-tokens` single steps continuing the last
prompt. Figures are medians over `--repeats` timed runs after `--warmup` untimed ones, with `--cooldown-s` of
rest between runs; decode latency percentiles pool every timed step. Each `--threads` count loads the model
afresh (`sweep`); the top-level figures are those of the first count. A memory-copy probe (`--bandwidth-mb`) gives
the bandwidth that bounds decode: `decode_bw_fraction` = model bytes x decode tok/s / copy bandwidth.
`load` records the machine's load (load averages, CPU used by other work, the busiest other processes) before,
during and after the model, and `load.busy` says why the figures were taken on a busy machine (None: quiet).

With `--draft FILE` (llama_cpp only) the model decodes speculatively with that draft (speculative.py beside this
file): TTFT is both models' prefill, decode tok/s is the same `--gen-tokens` emitted in 1 .. k+1 tokens per
teacher pass, each token's latency is its share of its step, `load_s` and `peak_rss_mb` cover both models, and a
`speculative` block adds acceptance, k and the time split between draft and teacher.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

try:
    from . import runtimes
except ImportError:  # standalone on the device: runtimes.py sits beside this file
    import runtimes

SCHEMA_VERSION = 3  # 2: thread sweep, memory bandwidth, throttle flags; 3: machine load (`load`)
PROMPT_TEXT = (  # fixed English text, tokenized by the runtime and cycled to the wanted length
    "The Raspberry Pi is a series of small single-board computers developed in the United Kingdom. "
    "It is widely used in education, robotics and home automation because it is cheap, quiet and draws "
    "little power. A language model that runs on it must be small, and every token it reads or writes "
    "costs memory bandwidth, which is the real limit on such a board. "
)
FALLBACK_IDS = range(3, 259)  # byte-level ids present in any BPE vocabulary, when the runtime cannot tokenize
THERMAL = Path("/sys/class/thermal/thermal_zone0/temp")  # millidegrees Celsius
CPUFREQ = Path("/sys/devices/system/cpu/cpu0/cpufreq/scaling_cur_freq")  # kHz
THROTTLE_BITS = {  # `vcgencmd get_throttled` bits (Raspberry Pi firmware)
    0: "under-voltage now", 1: "ARM frequency capped now", 2: "throttled now", 3: "soft temperature limit now",
    16: "under-voltage has occurred", 17: "ARM frequency capping has occurred", 18: "throttling has occurred",
    19: "soft temperature limit has occurred",
}
PROC = Path("/proc")  # Linux: /proc/stat (CPU time of the whole machine) and /proc/<pid>/stat (per process)
LOAD_WINDOW_S = 0.5  # each load sample watches the machine this long while the agent itself idles
BUSY_PROCESS_CORES = 0.25  # another process using this much of a core or more is listed as busy
BUSY_MIN_CORES = 0.5  # other work using max(this, BUSY_SHARE x cores) cores makes the machine busy
BUSY_SHARE = 0.25


class AgentError(Exception):
    """A user-facing failure: reported as one line on stderr."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, like every other agent error
        sys.stderr.write(f"agent: error: {message}\n")
        sys.exit(2)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = _Parser(description=__doc__.splitlines()[0])
    p.add_argument("--runtime", required=True, help="one of: " + ", ".join(sorted(runtimes.RUNTIMES)))
    p.add_argument("--model", required=True, help="model file or folder the runtime loads")
    p.add_argument("--threads", default="2", help="CPU threads, or a sweep such as 4,1,2 (the first is the headline)")
    p.add_argument("--prompt-tokens", default="64", help="comma-separated prompt lengths, e.g. 32,128")
    p.add_argument("--gen-tokens", type=int, default=32, help="decode steps per run")
    p.add_argument("--repeats", type=int, default=2, help="timed runs")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs before the timed ones")
    p.add_argument("--cooldown-s", type=float, default=1.0, help="rest between runs, in seconds")
    p.add_argument("--bandwidth-mb", type=int, default=64, help="memory-copy probe buffer in MB (0: no probe)")
    p.add_argument("--draft", help="a draft GGUF for speculative decoding of --model (llama_cpp only)")
    p.add_argument("--draft-k", type=int, default=4, help="draft tokens per teacher pass at the start (adapts 1..8)")
    p.add_argument("--draft-fixed", action="store_true", help="keep --draft-k fixed instead of adapting it")
    p.add_argument("--draft-temperature", type=float, default=0.0,
                   help="0: greedy; > 0: speculative sampling at this temperature (the teacher's distribution)")
    return p.parse_args(argv)


def int_list(spec: str, flag: str) -> list[int]:
    """"32,128" -> [32, 128], every item positive."""
    try:
        items = [int(x) for x in spec.split(",")]
    except ValueError:
        raise AgentError(f"{flag} '{spec}' is not a list of integers; pass e.g. 32,128") from None
    if not items or min(items) < 1:
        raise AgentError(f"{flag} '{spec}' needs positive numbers; pass e.g. 32,128")
    return items


def check_args(args: argparse.Namespace) -> tuple[list[int], list[int]]:
    """Validate before loading anything; returns the prompt lengths and the thread counts."""
    if args.runtime not in runtimes.RUNTIMES:
        raise AgentError(f"runtime '{args.runtime}' is not supported; supported: "
                         + ", ".join(sorted(runtimes.RUNTIMES)))
    if not Path(args.model).exists():
        raise AgentError(f"model not found: {args.model}")
    if args.draft and args.runtime != "llama_cpp":
        raise AgentError(f"--draft needs --runtime llama_cpp, not {args.runtime} (speculative decoding runs there)")
    if args.draft and not Path(args.draft).exists():
        raise AgentError(f"draft model not found: {args.draft}")
    for name in ("gen_tokens", "repeats", "draft_k"):
        if getattr(args, name) < 1:
            raise AgentError(f"--{name.replace('_', '-')} {getattr(args, name)} must be at least 1")
    if args.warmup < 0 or args.cooldown_s < 0 or args.bandwidth_mb < 0 or not args.draft_temperature >= 0:
        raise AgentError("--warmup, --cooldown-s, --bandwidth-mb and --draft-temperature must not be negative")
    return int_list(args.prompt_tokens, "--prompt-tokens"), int_list(args.threads, "--threads")


def synth_prompt(rt, n: int) -> tuple[list[int], str]:
    """`n` deterministic prompt ids: the fixed text tokenized by the runtime, cycled; byte ids as fallback."""
    try:
        base, source = rt.tokenize(PROMPT_TEXT), "text"
    except (ImportError, OSError):  # e.g. onnxruntime without the `tokenizers` package on the device
        base, source = [], "ids"
    if not base:
        base, source = list(FALLBACK_IDS), "ids"
    return [base[i % len(base)] for i in range(n)], source


def timed_prefills(rt, prompts: list[list[int]]) -> tuple[list[float], int]:
    """Prefill seconds per prompt, and the first generated token after the last prompt."""
    prefill_s = []
    for ids in prompts:
        t0 = time.perf_counter()
        token = rt.prefill(ids)  # a fresh cache; returns the first generated token
        prefill_s.append(time.perf_counter() - t0)
    return prefill_s, token


def timed_run(rt, prompts: list[list[int]], gen_tokens: int) -> tuple[list[float], list[float]]:
    """One run: prefill seconds per prompt, then per-step decode seconds continuing the last prompt."""
    prefill_s, token = timed_prefills(rt, prompts)
    decode_s = []
    for _ in range(gen_tokens):
        t0 = time.perf_counter()
        token = rt.decode(token)
        decode_s.append(time.perf_counter() - t0)
    return prefill_s, decode_s


def timed_spec_run(spec, prompts: list[list[int]], gen_tokens: int) -> tuple[list[float], list[float]]:
    """`timed_run` with a speculative decoder: each token's decode seconds are its share of its step."""
    prefill_s, _ = timed_prefills(spec, prompts)
    decode_s = []
    while len(decode_s) < gen_tokens:
        t0 = time.perf_counter()
        out = spec.step(gen_tokens - len(decode_s))
        decode_s += [(time.perf_counter() - t0) / len(out)] * len(out)
    return prefill_s, decode_s


def percentile(xs: list[float], q: float) -> float:
    """Linear-interpolated percentile, q in [0, 100]."""
    s = sorted(xs)
    k = (len(s) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def measure(rt, lengths: list[int], args: argparse.Namespace, spec=None) -> dict:
    """Warm-up and timed runs; medians over timed runs, decode latency percentiles over every timed step.
    `spec`: a speculative.SpeculativeDecoder over `rt`, which then decodes (its statistics: timed runs only)."""
    prompts, source = zip(*(synth_prompt(rt, n) for n in lengths))
    runs = []
    for i in range(args.warmup + args.repeats):
        if i:
            time.sleep(args.cooldown_s)
        if spec is not None and i == args.warmup:
            spec.reset_stats()
        runs.append(timed_run(rt, list(prompts), args.gen_tokens) if spec is None
                    else timed_spec_run(spec, list(prompts), args.gen_tokens))
    runs = runs[args.warmup:]
    prefill_s = [statistics.median(r[0][j] for r in runs) for j in range(len(lengths))]
    prefill = [{"prompt_tokens": n, "s": s, "tps": n / s} for n, s in zip(lengths, prefill_s)]
    steps = [s for r in runs for s in r[1]]
    return {
        "ttft_s": prefill_s[0], "ttft_prompt_tokens": lengths[0],
        "prefill_tps": max(prefill, key=lambda p: p["prompt_tokens"])["tps"], "prefill": prefill,
        "decode_tps": args.gen_tokens / statistics.median(sum(r[1]) for r in runs),
        "decode_context_tokens": lengths[-1],
        "decode_latency_ms": {f"p{q}": 1e3 * percentile(steps, q) for q in (50, 95, 99)},
        "prompt_source": source[0],
    } | ({"speculative": spec.stats.summary()} if spec is not None else {})


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MB (1e6 bytes).

    Linux: VmHWM from /proc/self/status, because ru_maxrss survives fork+exec and would report the parent's
    peak (the pipeline's) for an agent started as a subprocess. Elsewhere ru_maxrss (bytes on macOS).
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / 1e6  # kB
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 1e6 if sys.platform == "darwin" else rss * 1024 / 1e6


def read_number(path: Path, scale: float) -> float | None:
    try:
        return int(path.read_text().strip()) / scale
    except (OSError, ValueError):
        return None


def throttled() -> str | None:
    """`vcgencmd get_throttled` bits as hex (0x0: never throttled), or None off a Pi."""
    if shutil.which("vcgencmd") is None:
        return None
    try:
        out = subprocess.run(["vcgencmd", "get_throttled"], capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.strip().partition("=")[2] or None


def throttle_flags(value: str | None) -> list[str] | None:
    """The named bits of a `get_throttled` value ("0x50005" -> under-voltage now, ...); None when unknown."""
    try:
        bits = int(value, 16)
    except (TypeError, ValueError):
        return None
    return [name for bit, name in THROTTLE_BITS.items() if bits >> bit & 1]


def thermal_state() -> dict:
    state = throttled()
    return {"temp_c": read_number(THERMAL, 1e3), "cpu_mhz": read_number(CPUFREQ, 1e3), "throttled": state,
            "throttled_flags": throttle_flags(state)}


def cpu_ticks() -> tuple[int, int] | None:
    """(busy, total) CPU ticks of the whole machine since boot (/proc/stat); None off Linux."""
    try:
        head = (PROC / "stat").read_text().split("\n", 1)[0].split()
        ticks = [int(x) for x in head[1:9]]  # user nice system idle iowait irq softirq steal (guest is in user)
    except (OSError, ValueError):
        return None
    return sum(ticks) - ticks[3] - ticks[4], sum(ticks)  # steal counts as busy: another VM had the core


def own_cpu_s() -> float:
    """CPU seconds used by this process (all its threads) and its finished children."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def cpu_clock() -> dict:
    return {"t": time.monotonic(), "ticks": cpu_ticks(), "own_s": own_cpu_s()}


def other_cores(a: dict, b: dict) -> float | None:
    """Cores used on average by everything but this process between two `cpu_clock`s; None without /proc."""
    if a["ticks"] is None or b["ticks"] is None:
        return None
    busy, total, wall = b["ticks"][0] - a["ticks"][0], b["ticks"][1] - a["ticks"][1], b["t"] - a["t"]
    if total <= 0 or wall <= 0:
        return None
    machine = busy / total * (os.cpu_count() or 1)
    return round(max(0.0, machine - (b["own_s"] - a["own_s"]) / wall), 3)


def process_ticks() -> dict[int, tuple[str, int]]:
    """{pid: (name, user + system ticks)} of every process this one can see, except itself ({} off Linux)."""
    found = {}
    for d in PROC.glob("[0-9]*"):
        try:
            name, _, rest = (d / "stat").read_text().partition(" (")[2].rpartition(") ")
            fields = rest.split()  # from field 3 (state) on: utime and stime are fields 14 and 15
            found[int(d.name)] = (name, int(fields[11]) + int(fields[12]))
        except (OSError, ValueError, IndexError):  # gone meanwhile, or not a process folder
            continue
    found.pop(os.getpid(), None)
    return found


def loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def load_sample(window_s: float = LOAD_WINDOW_S) -> dict:
    """The machine while this process idles `window_s`: load averages, cores used by other work, and the other
    processes using a quarter core or more (busiest first, at most five)."""
    a, procs = cpu_clock(), process_ticks()
    time.sleep(window_s)
    b, later = cpu_clock(), process_ticks()
    wall, hz = b["t"] - a["t"], os.sysconf("SC_CLK_TCK")
    use = [{"pid": p, "name": n, "cores": round((t - procs[p][1]) / hz / wall, 2)}
           for p, (n, t) in later.items() if p in procs]
    busy = sorted((u for u in use if u["cores"] >= BUSY_PROCESS_CORES), key=lambda u: -u["cores"])
    return {"loadavg": loadavg(), "other_cores": other_cores(a, b), "busy_processes": busy[:5],
            "busy_count": len(busy)}


def busy_reason(load: dict, threads: int) -> str | None:
    """Why the figures were taken on a busy machine, or None when it was quiet.

    Busy: other work used max(BUSY_MIN_CORES, BUSY_SHARE x cores) cores or more on average while the model ran,
    or in both the samples before and after it (one short spike is not enough); or the 1-minute load average
    before it exceeded the cores plus the agent's own threads (a previous model adds at most those)."""
    cores = load["cores"] or 1
    before, after = load["before"], load["after"]
    seen = [load["during"]["other_cores"]]
    if before["other_cores"] is not None and after["other_cores"] is not None:
        seen.append(min(before["other_cores"], after["other_cores"]))  # there before and still there after
    others = max((x for x in seen if x is not None), default=None)
    if others is not None and others >= max(BUSY_MIN_CORES, BUSY_SHARE * cores):
        procs = {p["pid"]: p for p in after["busy_processes"] + before["busy_processes"]}.values()
        names = ", ".join(f"{p['name']} {p['cores']:.1f}" for p in sorted(procs, key=lambda p: -p["cores"])[:3])
        return f"other work used {others:.1f} of {cores} cores while it ran" + (f" ({names})" if names else "")
    load1 = (before["loadavg"] or [0.0])[0]
    if load1 > cores + threads:
        return f"the 1-minute load average was {load1:.1f} on {cores} cores before it ran"
    return None


def bandwidth(mb: int, threads: int, repeats: int = 3) -> dict:
    """Memory-copy bandwidth: bytes read plus written per second copying an `mb` MB buffer split over `threads`
    threads (numpy releases the GIL while copying), best of `repeats`. Decode streams every weight once per
    token, so this bounds decode tok/s at about bandwidth / model bytes."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    n = mb * 1_000_000
    src, dst = np.ones(n, np.uint8), np.zeros(n, np.uint8)  # both touched: pages are resident before timing
    step = -(-n // threads)
    spans = [slice(i, min(i + step, n)) for i in range(0, n, step)]
    with ThreadPoolExecutor(threads) as pool:
        def copy() -> float:
            t0 = time.perf_counter()
            list(pool.map(lambda sl: np.copyto(dst[sl], src[sl]), spans))
            return time.perf_counter() - t0
        copy()
        best = min(copy() for _ in range(repeats))
    return {"gbs": 2 * n / best / 1e9, "buffer_mb": mb, "threads": threads, "method": "numpy copyto"}


def bw_fraction(model_bytes: int, decode_tps: float, bw: dict | None) -> float | None:
    """Weight bytes x tokens/s over the copy bandwidth: how close decode runs to the memory limit."""
    if not bw or not bw.get("gbs"):
        return None
    return model_bytes * decode_tps / (bw["gbs"] * 1e9)


def host() -> dict:
    board = Path("/proc/device-tree/model")  # "Raspberry Pi 5 Model B Rev 1.0" on a Pi
    return {
        "hostname": platform.node(), "machine": platform.machine(), "system": platform.platform(),
        "cores": os.cpu_count(), "python": platform.python_version(),
        "board": board.read_text().strip("\x00\n ") if board.is_file() else None,
    }


def speculative_module():
    try:
        from . import speculative
    except ImportError:  # standalone on the device: speculative.py sits beside this file
        import speculative
    return speculative


def draft_config(args: argparse.Namespace):
    """--draft-k and --draft-fixed as a speculative.DraftConfig (adaptive k: from --draft-k within 1 .. 8 or more)."""
    spec = speculative_module()
    t = args.draft_temperature
    if args.draft_fixed:
        return spec.DraftConfig(k=args.draft_k, k_min=args.draft_k, k_max=args.draft_k, adaptive=False, temperature=t)
    return spec.DraftConfig(k=args.draft_k, k_max=max(spec.DraftConfig.k_max, args.draft_k), temperature=t)


def open_decoder(args: argparse.Namespace, rt, draft):
    """The speculative decoder of `rt` (a llama_cpp runtime) with the `draft` runtime; AgentError when they do not
    pair (another vocabulary)."""
    spec = speculative_module()
    try:
        return spec.SpeculativeDecoder(rt.llm, draft.llm, draft_config(args))
    except spec.DraftError as e:
        raise AgentError(f"--draft {args.draft}: {e}") from None


def run_at(args: argparse.Namespace, lengths: list[int], threads: int) -> tuple[dict, str | None]:
    """Load the model (and the draft) with `threads` threads, time it, close it; returns (figures, runtime
    version)."""
    t0 = time.perf_counter()
    models = [runtimes.get_runtime(args.runtime)(args.model, threads)]
    try:
        if args.draft:
            models.append(runtimes.get_runtime("llama_cpp")(args.draft, threads))
        spec = open_decoder(args, *models) if args.draft else None
        load_s = time.perf_counter() - t0
        figures = measure(models[0], lengths, args, spec)
    finally:
        for rt in models:
            rt.close()
    return {"threads": threads, "load_s": load_s, **figures}, getattr(models[0], "version", None)


def benchmark(args: argparse.Namespace, lengths: list[int], threads: list[int]) -> dict:
    before, sweep, version = thermal_state(), [], None
    load = {"cores": os.cpu_count(), "before": load_sample()}
    t0 = cpu_clock()
    for i, n in enumerate(threads):
        if i:
            time.sleep(args.cooldown_s)
        entry, version = run_at(args, lengths, n)
        sweep.append(entry)
    t1 = cpu_clock()
    rss = peak_rss_mb()  # before the bandwidth probe's buffers
    after = thermal_state()
    load |= {"during": {"other_cores": other_cores(t0, t1), "wall_s": round(t1["t"] - t0["t"], 3)},
             "after": load_sample()}
    load["busy"] = busy_reason(load, max(threads))
    bw = bandwidth(args.bandwidth_mb, threads[0]) if args.bandwidth_mb else None
    size = model_bytes(Path(args.model))
    draft_size = model_bytes(Path(args.draft)) if args.draft else 0
    for entry in sweep:
        streamed, stats = size, entry.get("speculative")
        if stats is not None:
            streamed = stats["bytes_per_token"] = bytes_per_token(stats, size, draft_size)
        entry["decode_bw_fraction"] = bw_fraction(streamed, entry["decode_tps"], bw)
    return {
        "schema_version": SCHEMA_VERSION, "host": host(),
        "runtime": {"name": args.runtime, "version": version},
        "model": {"path": str(args.model), "bytes": size},
        "settings": {"threads": threads[0], "thread_sweep": threads, "prompt_tokens": lengths,
                     "gen_tokens": args.gen_tokens, "repeats": args.repeats, "warmup": args.warmup,
                     "cooldown_s": args.cooldown_s, "bandwidth_mb": args.bandwidth_mb},
        **sweep[0], "sweep": sweep, "peak_rss_mb": rss, "bandwidth": bw,
        "thermal": {"before": before, "after": after}, "load": load,
    } | ({"speculative": speculative_block(args, sweep[0]["speculative"], size, draft_size)} if args.draft else {})


def bytes_per_token(stats: dict, size: int, draft_size: int) -> float:
    """Weight bytes a speculative decoder streams per emitted token: one teacher pass and `mean_k` draft passes per
    step, over the tokens a step emits (plain decoding streams `size`)."""
    return (size + draft_size * stats["mean_k"]) / stats["tokens_per_step"]


def speculative_block(args: argparse.Namespace, stats: dict, size: int, draft_size: int) -> dict:
    """The headline thread count's speculative figures with the draft and its settings."""
    cfg = draft_config(args)
    return {**stats, "draft": {"path": str(args.draft), "bytes": draft_size}, "teacher_bytes": size,
            "k": cfg.k, "k_min": cfg.k_min, "k_max": cfg.k_max, "adaptive": cfg.adaptive}


def model_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def one_line(e: Exception, limit: int = 500) -> str:
    return " ".join(str(e).split())[:limit]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stdout = os.dup(1)
    os.dup2(2, 1)  # runtimes' own chatter (C code included) goes to stderr; stdout carries only the JSON
    try:
        result = benchmark(args, *check_args(args))
    except AgentError as e:
        sys.stderr.write(f"agent: error: {e}\n")
        return 2
    except Exception as e:  # a runtime failure: one line for the bench stage to record
        sys.stderr.write(f"agent: error: {args.runtime} failed on {args.model}: {type(e).__name__}: {one_line(e)}\n")
        return 1
    finally:
        sys.stdout.flush()
        os.dup2(stdout, 1)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
