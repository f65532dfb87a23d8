"""The agent-call protocol: the agent's command line, reading its one JSON line or its failure, and one model timed
through a runner (`runners`), the same on this machine and on an SSH device."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from pistill.formats import FORMATS

from .target import exit_reason, last_line

AGENT = Path(__file__).with_name("agent.py")
AGENT_FILES = ("agent.py", "runtimes.py",  # what the device needs beside the runtime packages
               *dict.fromkeys(n for f in FORMATS.values() for n in f.agent_files))
SUMMARY = ("prefill_tps", "decode_tps", "ttft_s", "peak_rss_mb", "load_s")  # per-stage metrics of the artifact


class AgentTimeout(Exception):
    """The agent ran past its limit and was stopped."""


def agent_args(runtime: str, model: str | Path, cfg, draft: str | Path | None = None) -> list[str]:
    """The agent's arguments (the same here and on a device) from a BenchConfig; the first thread count is the
    headline. With `draft`, the model decodes speculatively with that draft GGUF (`cfg.draft_k` at first)."""
    threads = [cfg.threads] + [n for n in dict.fromkeys(cfg.thread_sweep) if n != cfg.threads]
    return ["--runtime", runtime, "--model", str(model), "--threads", ",".join(map(str, threads)),
            "--prompt-tokens", ",".join(map(str, cfg.prompt_tokens)), "--gen-tokens", str(cfg.gen_tokens),
            "--repeats", str(cfg.repeats), "--warmup", str(cfg.warmup), "--cooldown-s", f"{cfg.cooldown_s:g}",
            "--bandwidth-mb", str(cfg.bandwidth_mb)] + (
        ["--draft", str(draft), "--draft-k", str(cfg.draft_k)] if draft is not None else [])


def agent_command(runtime: str, model: str | Path, cfg, draft: str | Path | None = None) -> list[str]:
    """The agent's command line on this machine (this python, the agent file beside this module)."""
    return [sys.executable, str(AGENT), *agent_args(runtime, model, cfg, draft)]


def failure(rc: int, stderr: str) -> str:
    """The agent's own one-line error, or how it died (`rc` as a shell reports it: 128 + N for signal N; the OOM
    killer prints nothing)."""
    last = last_line(stderr) if stderr.strip() else None
    if last and rc <= 128:
        return last
    return f"agent {exit_reason(rc)}" + (f": {last}" if last else " and printed nothing")


def agent_json(stdout: str, runtime: str) -> dict:
    """The agent's one JSON line, or an error naming what it printed instead (no JSON, or JSON that is not the
    agent's object: a device's python may print its own last line)."""
    try:
        out = json.loads(stdout.strip().splitlines()[-1])
    except (json.JSONDecodeError, IndexError):
        return {"error": f"agent printed no JSON: {stdout[-200:]!r}", "runtime": runtime}
    if not isinstance(out, dict):
        return {"error": f"agent printed JSON that is not its result object: {stdout.strip()[-200:]!r}",
                "runtime": runtime}
    if lack := [k for k in SUMMARY if not isinstance(out.get(k), (int, float))] + (
            [] if isinstance(out.get("runtime"), dict) else ["runtime"]):
        return {"error": f"agent printed an object without {', '.join(lack)}: {stdout.strip()[-200:]!r}",
                "runtime": runtime}
    return out


def time_model(runner, argv: list[str], runtime: str, timeout_s: int) -> dict:
    """The agent's JSON for one model, run by `runner.run_agent(argv, timeout_s)`, or `{"error": ...}` when it timed
    out, failed or printed something else."""
    try:
        res = runner.run_agent(argv, timeout_s)
    except AgentTimeout:
        return {"error": f"timed out after {timeout_s} s (BenchConfig.timeout_s)", "runtime": runtime}
    if res.rc != 0:
        return {"error": failure(res.rc, res.stderr), "runtime": runtime}
    return agent_json(res.stdout, runtime)


def summary(result: dict) -> dict:
    """The figures the report lines up, or the error."""
    if "error" in result:
        return {"error": result["error"]}
    return {k: result.get(k) for k in SUMMARY}


def busy(result: dict) -> str | None:
    """Why a result was measured on a busy machine (agent schema 3), or None (quiet, or an older result)."""
    return ((result.get("load") or {}).get("busy") or None) if isinstance(result, dict) else None
