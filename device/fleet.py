"""Benchmark a fleet of SSH devices in parallel: check, provision, upload, run the agent, collect its JSON.

`local` in a fleet is this machine, benchmarked as with `target = "local"` (`local.bench_here`). Each device is
independent: one that is unreachable or fails is reported with its error and the others finish. `check_devices`
only reaches and probes each device (`pistill search` runs it before it builds anything).
HF models (teacher, pruned, student) are converted to the GGUF artifact's quant by default, so the teacher and the
student run in the same runtime on the same board and the report can state the speed-up. `cfg` is the bench
stage's BenchConfig throughout (not imported here: the stage imports this module).
"""

from __future__ import annotations

import logging
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from pistill.artifact import Artifact, sha256_file
from pistill.errors import UserError
from pistill.formats import Format, get_format
from pistill.models import is_bitsandbytes
from pistill.registry import register
from pistill.rundir import scratch

from . import doctor, provision, transfer
from .local import (SPECULATIVE, BenchInterrupted, bench_here, bench_keys, interrupted_lines, log_result, models,
                    speculative_pair, student_gguf)
from .protocol import AGENT, AGENT_FILES, agent_args, summary, time_model
from .runners import POLL_S, SSHRunner
from .target import LOCAL, Interrupted, TargetError, connect, parse_target

log = logging.getLogger(__name__)

DEFAULT_QUANT = "Q4_0"  # for HF models on a device when the run has no GGUF artifact
STOP_GRACE_S = 30  # after Ctrl-C, how long the devices get to kill their agents and hang up


@dataclass(frozen=True)
class Job:
    """One model, ready to send: the files of its tree and what the agent loads from it."""

    stage: str
    runtime: str
    files: dict[str, Path]  # name in the device's tree -> local file
    model: str  # relative to the tree: a file name, or "." for the folder itself
    sha256s: dict[str, str] = field(default_factory=dict)  # the files' hashes, read now (see `fresh_hashes`)
    note: str | None = None  # e.g. "as GGUF Q4_0" when converted for the device
    draft: str | None = None  # relative to the tree: the draft GGUF the model decodes with (speculative)


def device_quant(inputs: list[Artifact]) -> str:
    """The llama.cpp type HF models are converted to: the GGUF artifact's model type."""
    from pistill.export.gguf import gguf_quant

    gguf = student_gguf(inputs)
    return (gguf_quant(gguf.manifest) if gguf else None) or DEFAULT_QUANT


def device_gguf(artifact: Artifact, quant: str) -> Path:
    """An HF model artifact as one GGUF file of type `quant`, cached by artifact id in PISTILL_CACHE."""
    from pistill.export.gguf_convert import write_gguf
    from pistill.export.gguf_quantize import quantize_gguf
    from pistill.models import cache_dir

    dst = cache_dir() / "device-gguf" / f"{artifact.id[:16]}-{quant}.gguf"
    if dst.is_file():
        return dst
    dst.parent.mkdir(parents=True, exist_ok=True)
    if quant in ("F16", "F32"):
        return write_gguf(artifact.model_path(), dst, quant.lower())
    with scratch("device-gguf", dst.parent) as tmp:  # a killed run's f16 copy goes at the next one
        base = write_gguf(artifact.model_path(), Path(tmp) / "f16.gguf", "f16")
        return quantize_gguf(base, dst, quant)


def fresh_hashes(a: Artifact, files: dict[str, Path], known: dict[str, str]) -> dict[str, str]:
    """sha256 of each file read now (the device copy is checked against these), and the same as the artifact's
    manifest says where it names the file: a file changed after its stage wrote it is not benchmarked."""
    fresh = {}
    for name, path in files.items():
        fresh[name] = sha256_file(path)
        if known.get(name) not in (None, fresh[name]):
            raise ValueError(f"{path} changed after the {a.stage} stage wrote it (sha256 {fresh[name][:12]}..., "
                             f"its manifest says {known[name][:12]}...); rerun that stage (--force {a.stage})")
    return fresh


JOBS: dict[str, Callable[..., Job]] = {}  # Format.job -> builder(artifact, format, cfg, quant)


def make_job(a: Artifact, cfg, quant: str) -> Job:
    """A Job for one artifact; raises ValueError / RuntimeError with the reason it cannot run on a device."""
    a.model_path()  # ArtifactError (a RuntimeError) when the artifact holds no model
    fmt = get_format(a.model["format"])
    return JOBS[fmt.job](a, fmt, cfg, quant)


@register(JOBS, "file")
def file_job(a: Artifact, fmt: Format, cfg, quant: str) -> Job:
    """A one-file model: that file, checked against the manifest's hash of it."""
    model = a.model_path()
    known = {model.name: manifest_hashes(a).get(a.model["file"])}
    return Job(a.stage, fmt.runtime, {model.name: model}, model.name, fresh_hashes(a, {model.name: model}, known))


@register(JOBS, "folder")
def folder_job(a: Artifact, fmt: Format, cfg, quant: str) -> Job:
    """A model folder: every file under it, each checked against the manifest's hash of it."""
    model = a.model_path()
    files, known = transfer.folder_files(model), _rebase(manifest_hashes(a), a.path, model)
    return Job(a.stage, fmt.runtime, files, ".", fresh_hashes(a, files, known))


@register(JOBS, "hf")
def hf_job(a: Artifact, fmt: Format, cfg, quant: str) -> Job:
    """An HF folder as `cfg.hf_on_device` says: converted to a GGUF file of type `quant`, sent as a folder for torch,
    or skipped; bitsandbytes weights never (CUDA only)."""
    if is_bitsandbytes(a.model_path()):
        raise ValueError("bitsandbytes weights (the quantized distillation teacher) run on CUDA only; "
                         "not benchmarked on devices")
    if cfg.hf_on_device == "skip":
        raise ValueError("HF model skipped on devices (hf_on_device = \"skip\")")
    if cfg.hf_on_device == "torch":
        return folder_job(a, fmt, cfg, quant)
    path, gguf = device_gguf(a, quant), get_format("gguf")
    return Job(a.stage, gguf.runtime, {path.name: path}, path.name, fresh_hashes(a, {path.name: path}, {}),
               note=f"as {gguf.label} {quant}")


def speculative_job(inputs: list[Artifact], cfg) -> Job:
    """The teacher's GGUF of the student's type with the student's GGUF as its draft (`local.speculative_pair`): one
    tree of both files, each checked against its own manifest's hash."""
    gguf = get_format("gguf")
    teacher, draft = (file_job(a, gguf, cfg, "") for a in speculative_pair(inputs))
    name = draft.model if draft.model != teacher.model else f"draft-{draft.model}"
    return Job(SPECULATIVE, teacher.runtime, {**teacher.files, name: draft.files[draft.model]}, teacher.model,
               {**teacher.sha256s, name: draft.sha256s[draft.model]}, draft=name)


def manifest_hashes(a: Artifact) -> dict[str, str]:
    """{file relative to the artifact: sha256} as the artifact's manifest lists them."""
    return {name: f["sha256"] for name, f in a.manifest.get("files", {}).items()}


def _rebase(known: dict[str, str], root: Path, folder: Path) -> dict[str, str]:
    """Manifest hashes (relative to the artifact) re-keyed relative to the model folder."""
    prefix = str(folder.relative_to(root))
    if prefix == ".":
        return known
    return {k[len(prefix) + 1:]: v for k, v in known.items() if k.startswith(prefix + "/")}


def make_jobs(inputs: list[Artifact], cfg) -> dict[str, Job | dict]:
    """A Job per model artifact (and the speculative pair's, `bench_keys`), or `{"error": ...}` for one that cannot
    go to a device."""
    quant, jobs, views = device_quant(inputs), {}, dict(models(inputs))
    for key in bench_keys(inputs, cfg):
        try:
            jobs[key] = speculative_job(inputs, cfg) if key == SPECULATIVE else make_job(views[key], cfg, quant)
        except (ValueError, RuntimeError, OSError) as e:  # no model, unknown format, conversion failed
            jobs[key] = {"error": str(e)}
    return jobs


def bench_job(conn, job: Job, agent_dir: str, plan: provision.Plan, cfg, progress, device: dict) -> dict:
    """Upload one model (a copy already there is checked by its hash first; the bytes sent are added to the
    device's `uploaded_bytes`) and time it with the agent."""
    tree, ups = transfer.upload_tree(conn, job.files, cfg.remote_cache, progress, job.sha256s)
    device["uploaded_bytes"] += sum(u.sent for u in ups)
    model = tree if job.model == "." else f"{tree}/{job.model}"
    draft = f"{tree}/{job.draft}" if job.draft else None
    argv = [plan.python, f"{agent_dir}/agent.py", *agent_args(job.runtime, model, cfg, draft)]
    out = time_model(SSHRunner(conn, plan.env), argv, job.runtime, cfg.timeout_s)
    return {**out, "device_format": job.note} if job.note and "error" not in out else out


def bench_remote(spec: str, jobs: dict[str, Job | dict], cfg, progress, device: dict | None = None,
                 stop: threading.Event | None = None) -> dict:
    """One SSH device: doctor facts, provisioning, then each model, filling `device`; the device's error if it
    fails. Once `stop` is set, the command running on the device is killed and the device ends as interrupted."""
    import paramiko

    device = {"results": {}} if device is None else device
    task = progress.add_task(f"{spec}: connecting", total=None)
    try:
        with connect(parse_target(spec)) as conn:
            conn.stop = stop
            _on_device(conn, jobs, cfg, device, progress, task)
    except UserError as e:  # unreachable, refused, its ssh_config entry, a failed command: this device only
        device["error"] = str(e)
    except (OSError, EOFError, paramiko.SSHException) as e:  # the link died under SFTP or a channel
        device["error"] = link_error(spec, e)
    if "error" in device:
        log.warning("%s", device["error"])
    progress.update(task, total=1, completed=1, description=_device_line(spec, device))
    return device


def link_error(spec: str, e: BaseException) -> str:
    return f"{spec}: connection failed: {type(e).__name__}: {' '.join(str(e).split())}"


def reach(spec: str, cfg, stop: threading.Event | None = None) -> dict:
    """Connect to one SSH device and run the doctor probe: {"facts"} or {"error"} (the device's one line)."""
    import paramiko

    try:
        with connect(parse_target(spec)) as conn:
            conn.stop = stop
            facts = doctor.probe(conn, cfg.remote_cache, cfg.python or "python3")
    except UserError as e:
        return {"error": str(e)}
    except (OSError, EOFError, paramiko.SSHException) as e:
        return {"error": link_error(spec, e)}
    if not facts.get("python"):
        return {"error": f"{spec}: {cfg.python or 'python3'} is not there or does not run; install python3 on the "
                         "device (sudo apt install python3 python3-venv) or fix [bench] python"}
    return {"facts": facts}


def check_devices(specs: list[str], cfg) -> dict[str, dict]:
    """Every SSH device of `specs` reached and probed, in parallel, before anything is built for them: {spec:
    doctor facts}; one TargetError naming each device that fails (`local` needs no check)."""
    remote = [s for s in specs if s != LOCAL]
    for spec in remote:
        parse_target(spec)  # a bad ~/.ssh/config entry: its UsageError now (exit 2), before any connection
    if not remote:
        return {}
    stop, pool = threading.Event(), ThreadPoolExecutor(max_workers=len(remote))
    futures = [pool.submit(reach, s, cfg, stop) for s in remote]
    try:
        while wait(futures, timeout=POLL_S).not_done:  # a timed wait: Ctrl-C is seen at once
            pass
    except KeyboardInterrupt:
        stop.set()
        raise
    finally:
        pool.shutdown(wait=False)
    found = {s: f.result() for s, f in zip(remote, futures)}
    if errors := [d["error"] for d in found.values() if "error" in d]:
        several = f"{len(errors)} of {len(remote)} devices cannot be used: " if len(remote) > 1 else ""
        raise TargetError(several + "; ".join(errors))
    for spec, d in found.items():
        log.info("%s: reachable (%s, %s)", spec, d["facts"].get("board") or d["facts"].get("machine") or "?",
                 d["facts"]["python"].get("version", "python"))
    return {s: d["facts"] for s, d in found.items()}


def _on_device(conn, jobs, cfg, device: dict, progress, task) -> None:
    def say(what: str) -> None:
        progress.update(task, description=f"{conn.target}: {what}")

    say("checking")
    device["facts"] = doctor.probe(conn, cfg.remote_cache, cfg.python or "python3")
    biggest = max((sum(p.stat().st_size for p in j.files.values()) for j in jobs.values() if isinstance(j, Job)),
                  default=None)
    device["warnings"] = doctor.advise(device["facts"], biggest)
    runtimes = sorted({j.runtime for j in jobs.values() if isinstance(j, Job)})
    plan = provision.plan(conn, device["facts"], runtimes, cfg.python, cfg.remote_cache, cfg.llama_cpp_lib,
                          cfg.llama_cpp_build)
    say("provisioning" if plan.commands else "uploading the agent")
    device["provisioned"], ups = provision.provision(conn, plan, runtimes, cfg.remote_cache)
    agent_dir, agent_ups = transfer.upload_tree(conn, {n: AGENT.with_name(n) for n in AGENT_FILES}, cfg.remote_cache)
    device["uploaded_bytes"] = sum(u.sent for u in ups + agent_ups)
    for stage, job in jobs.items():
        if not isinstance(job, Job):
            device["results"][stage] = job
            continue
        say(f"bench {stage}")
        try:
            device["results"][stage] = bench_job(conn, job, agent_dir, plan, cfg, progress, device)
        except Interrupted:
            raise Interrupted(f"{conn.target}: interrupted while benchmarking {stage}; its agent was stopped") \
                from None
        except transfer.TransferError as e:  # e.g. this model does not fit; smaller ones may
            if not conn.client.get_transport().is_active():
                raise
            device["results"][stage] = {"error": str(e), "runtime": job.runtime}
        log_result(conn.target.spec, stage, device["results"][stage])


def bench_this_machine(inputs: list[Artifact], cfg, progress, device: dict, stop: threading.Event) -> dict:
    """`local` inside a fleet: this machine's doctor facts, then its models as with `target = "local"`."""
    task = progress.add_task("local: bench", total=len(bench_keys(inputs, cfg)))
    device["facts"] = doctor.probe(None, cfg.remote_cache, sys.executable)
    bench_here(inputs, cfg, progress, device, stop, task)
    progress.update(task, description=_device_line(LOCAL, device))
    return device


def bench_fleet(inputs: list[Artifact], cfg, specs: list[str], progress) -> dict[str, dict]:
    """Every device in parallel; {spec: {"facts", "results": {stage: agent JSON or error}, "error"?}}.

    On Ctrl-C the devices kill their agents and stop; BenchInterrupted carries what they finished."""
    jobs = make_jobs(inputs, cfg) if any(s != LOCAL for s in specs) else {}
    devices: dict[str, dict] = {s: {"results": {}} for s in specs}  # filled in place by each device's thread
    stop = threading.Event()
    pool = ThreadPoolExecutor(max_workers=len(specs))
    futures = [pool.submit(bench_this_machine, inputs, cfg, progress, devices[s], stop) if s == LOCAL
               else pool.submit(bench_remote, s, jobs, cfg, progress, devices[s], stop) for s in specs]
    try:
        while wait(futures, timeout=POLL_S).not_done:  # a timed wait: Ctrl-C is seen at once
            pass
        for f in futures:
            f.result()  # a bug in a device's thread surfaces here
    except KeyboardInterrupt:
        stop.set()
        raise BenchInterrupted(_stopped(devices, futures, bench_keys(inputs, cfg))) from None
    finally:
        pool.shutdown(wait=False)
    if all("error" in d for d in devices.values()):
        raise TargetError("no device could be benchmarked: " + "; ".join(d["error"] for d in devices.values()))
    return devices


def _stopped(devices: dict[str, dict], futures: list, stages: list[str]) -> dict[str, dict]:
    """After Ctrl-C: give the devices STOP_GRACE_S to kill their agents, then say what finished."""
    log.warning("interrupted: stopping the agents on %d device(s)", len(devices))
    t0 = time.monotonic()
    pending = wait(futures, timeout=STOP_GRACE_S).not_done
    for spec, f in zip(devices, futures):
        if f in pending:
            devices[spec].setdefault("error", f"{spec}: interrupted; still stopping after {STOP_GRACE_S} s")
    log.info("devices stopped in %.1f s", time.monotonic() - t0)
    for line in interrupted_lines(devices, stages):
        log.warning("bench interrupted: %s", line)
    return devices


def _device_line(spec: str, device: dict) -> str:
    from rich.markup import escape

    if "error" in device:
        return f"[red]✗[/] {escape(device['error'])}"  # the error names the device
    ok = [r for r in device["results"].values() if "error" not in r]
    board = (device.get("facts") or {}).get("board") or (device.get("facts") or {}).get("machine") or "?"
    return f"[green]✓[/] {escape(spec)} ({escape(board)}): {len(ok)}/{len(device['results'])} models benchmarked"


def summaries(devices: dict[str, dict]) -> dict[str, dict]:
    """Per-device summary figures for the bench artifact's metrics."""
    return {s: {st: summary(r) for st, r in d.get("results", {}).items()} | ({"error": d["error"]}
            if "error" in d else {}) for s, d in devices.items()}
