"""The report's data: every model's size, quality and speed, per device too, the verdict and the history, gathered
from the pipeline's artifacts into one JSON-ready dict (`report_data`); no rendering.

Rows: the teacher and its own GGUF files (baseline), then the pipeline's models, then (`[bench] speculative`) the
teacher's GGUF decoding with the student GGUF as its draft; quality from each model's held-out metrics and the eval
stage's zero-shot accuracy, speed from the bench, the speed-up over the teacher's model of the same runtime and
number format, and the front of non-dominated models (`front`). Also per device (SSH fleets: `devices.json` of the
bench artifact) with the same speed-up on that board, and the history of earlier reports (this run folder's previous
report and sibling run folders').
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from . import front
from .artifact import Artifact, runtime_for_format
from .export.gguf import gguf_quant
from .pipeline import STAGES
from .report_table import busy_warning, table_columns
from .zeroshot import read_eval

log = logging.getLogger(__name__)

SCHEMA_VERSION = 3  # 2: devices, history; 3: baseline rows, zero-shot accuracy, speed-up by runtime and type, front
SPECULATIVE = "speculative"  # bench.json's key (device/local.py) of the teacher's GGUF with the student's as draft
LABELS = {s.name: s.label for s in STAGES if s.label} | {  # model stage -> row name ({kind}: number format)
    SPECULATIVE: "teacher GGUF {kind} + student draft (speculative)"}
LEADING = ("teacher", "baseline")  # the teacher and its own GGUF files head the table
MODEL_STAGES = LEADING + tuple(s for s in LABELS if s not in LEADING)  # rows, then in pipeline order
QUALITY = ("params", "bytes", "bpb", "ppl", "agreement", "kl")  # from each model artifact's metrics
SPEED = ("prefill_tps", "decode_tps", "ttft_s", "peak_rss_mb", "load_s")  # from the bench artifact's bench.json


# --- rows, from plain dicts -----------------------------------------------------------------------------------

def model_row(key: str, label: str, metrics: dict, speed: dict | None) -> dict:
    """One row: quality figures from a model's metrics, speeds from its bench result (None when not benched)."""
    speed = speed or {}
    row = {"key": key, "stage": stage_of(key), "name": label}
    row.update({k: metrics.get(k) for k in QUALITY})
    row.update({k: speed.get(k) for k in SPEED})
    row["bench_error"] = speed.get("error")
    return row


def teacher_metrics(teacher: dict, data: dict) -> dict:
    """The teacher's metrics, completed: held-out ppl from the data artifact when the teacher has none, and
    agreement 1 / KL 0 by definition (the data artifact's reference is the teacher's own prediction)."""
    ppl, bpb = teacher.get("ppl"), teacher.get("bpb")
    if ppl is None:
        ppl = data.get("ppl", data.get("teacher_ppl"))
    if bpb is None:
        bpb = data.get("bpb", data.get("teacher_bpb"))
    return {"agreement": 1.0, "kl": 0.0, **teacher, "ppl": ppl, "bpb": bpb}


def stage_of(key: str) -> str:
    """The stage of a model key: "baseline:Q8_0" -> "baseline"."""
    return key.split(":")[0]


def ordered(keys) -> list[str]:
    """Model keys in row order (MODEL_STAGES; a stage's several models as given)."""
    keys = [k for k in keys if stage_of(k) in MODEL_STAGES]
    return sorted(keys, key=lambda k: MODEL_STAGES.index(stage_of(k)))


def build_rows(metrics: dict[str, dict], labels: dict[str, str], speeds: dict[str, dict]) -> list[dict]:
    """Rows in row order for the models in `metrics` (model key -> its metrics)."""
    return [model_row(k, labels.get(k, k), metrics[k], speeds.get(k)) for k in ordered(metrics)]


# --- gathering from artifacts --------------------------------------------------------------------------------

def onnx_precision(manifest: dict) -> str | None:
    return (manifest.get("config") or {}).get("precision")  # int4 (MatMulNBits) or fp32


def model_quant(manifest: dict) -> str | None:
    """The type of one model of an artifact holding several (its `models` entry's `quant`, e.g. baseline's)."""
    return (manifest.get("model") or {}).get("quant")


def bnb_method(manifest: dict) -> str | None:
    method = (manifest.get("config") or {}).get("method")  # the quantize stage's: nf4, int8 or none
    return None if method == "none" else method


KINDS: dict[str, Callable[[dict], str | None]] = {  # stage -> the number format of its model, from its manifest
    "gguf": gguf_quant, "baseline": model_quant, "onnx": onnx_precision, "quantize": bnb_method,
    SPECULATIVE: gguf_quant}  # of the gguf artifact's manifest: the teacher file of the student's type


def number_format(stage: str, manifest: dict) -> str:
    """"Q4_0", "int4", "nf4"...; "" for a model folder as saved."""
    return KINDS.get(stage, lambda m: None)(manifest) or ""


def model_label(stage: str, manifest: dict) -> str:
    """The row name; export rows name their number format, read from the manifest (e.g. GGUF Q4_K_M)."""
    kind = number_format(stage, manifest) if "{kind}" in LABELS.get(stage, "") else ""
    return " ".join(LABELS.get(stage, stage).format(kind=kind).split())


def run_format(fmt: str | None, kind: str, result: dict | None) -> tuple[str | None, str]:
    """(runtime, number format) a model ran in: its bench result's runtime, and "as GGUF Q4_0" (an HF model
    converted for a device) read as Q4_0; the artifact's own format and kind otherwise."""
    result = result or {}
    runtime = (result.get("runtime") or {}).get("name") or (runtime_for_format(fmt) if fmt else None)
    note = result.get("device_format") or ""
    return runtime, note.split()[-1] if note.startswith("as GGUF ") else kind


def read_speeds(bench: Artifact | None) -> dict[str, dict]:
    """The bench artifact's `bench.json` ({stage: agent result or {"error": ...}}), {} when absent."""
    if bench is None:
        return {}
    try:
        return json.loads(bench.file("bench.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def model_views(by_stage: dict[str, Artifact]) -> dict[str, Artifact]:
    """Model key -> the artifact narrowed to that model, for every model artifact in `by_stage`."""
    return {k: v for s, a in by_stage.items() if s in MODEL_STAGES for k, v in a.each_model()}


def zeroshot_of(result: dict | None) -> tuple[dict, str | None]:
    """A model's eval result as ({task: {n, acc, acc_stderr, acc_norm, acc_norm_stderr}}, why it has none)."""
    result = result or {}
    keep = ("n", "acc", "acc_stderr", "acc_norm", "acc_norm_stderr")
    tasks = {t: {k: r.get(k) for k in keep} for t, r in (result.get("tasks") or {}).items()}
    return tasks, result.get("skipped") or result.get("error")


def rows_from_artifacts(by_stage: dict[str, Artifact], speeds: dict[str, dict],
                        evals: dict | None = None) -> list[dict]:
    views = model_views(by_stage)
    metrics = {k: v.metrics for k, v in views.items()}
    if "teacher" in metrics:
        data = by_stage["data"].metrics if "data" in by_stage else {}
        metrics["teacher"] = teacher_metrics(metrics["teacher"], data)
    labels = {k: model_label(stage_of(k), v.manifest) for k, v in views.items()}
    rows = build_rows(metrics, labels, speeds)
    for r in rows:
        view = views[r["key"]]
        kind = number_format(r["stage"], view.manifest)
        r["runtime"], r["kind"] = run_format((view.model or {}).get("format"), kind, speeds.get(r["key"]))
        r["zeroshot"], r["eval_note"] = zeroshot_of(((evals or {}).get("models") or {}).get(r["key"]))
    if SPECULATIVE in speeds:
        rows.append(speculative_row(rows, speeds[SPECULATIVE], student_manifest(by_stage)))
    front.add_speedups(rows)
    return rows


def student_manifest(by_stage: dict[str, Artifact]) -> dict:
    """The gguf artifact's manifest (the student GGUF: the speculative row's draft and number format), {} without."""
    return by_stage["gguf"].manifest if "gguf" in by_stage else {}


def speculative_row(rows: list[dict], result: dict, student: dict) -> dict:
    """The bench's speculative result (`student`: the gguf manifest) as a row: its own speeds; the number format of
    the student GGUF, which is the teacher file's; size both files; quality that teacher file's (`quality_from`), as
    the output is that file's greedy output; the agent's `speculative` block (acceptance, tokens per step ...)."""
    kind = number_format(SPECULATIVE, student)
    teacher = next((r for r in rows if r["stage"] == "baseline" and r["kind"] == kind), {})
    spec = result.get("speculative") or {}
    files = [(result.get("model") or {}).get("bytes"), (spec.get("draft") or {}).get("bytes")]
    metrics = {k: teacher.get(k) for k in ("bpb", "ppl", "agreement", "kl")} | \
        {"bytes": None if None in files else sum(files)}
    row = model_row(SPECULATIVE, model_label(SPECULATIVE, student), metrics, result)
    row["runtime"], row["kind"] = run_format("gguf", kind, result)
    row["zeroshot"], row["eval_note"] = teacher.get("zeroshot") or {}, None
    return row | {"quality_from": teacher.get("name"), "speculative": spec or None}


def stage_facts(a: Artifact) -> dict:
    m = a.manifest
    return {"stage": a.stage, "id": m.get("id"), "wall_s": m.get("wall_s"), "created": m.get("created"),
            "environment": m.get("environment") or {}}


def versions(artifacts: list[Artifact]) -> dict[str, list[str]]:
    """Every version of python and each tracked package seen across the manifests (several = a mixed run)."""
    seen: dict[str, list[str]] = {}
    for a in artifacts:
        env = a.manifest.get("environment") or {}
        for name, v in {"python": env.get("python"), **(env.get("packages") or {})}.items():
            if v and v not in seen.setdefault(name, []):
                seen[name].append(v)
    return seen


def bench_target(bench: Artifact | None) -> str | None:
    """The device of the main table's speeds, marked when it is emulated (never to be read as a board's speed)."""
    if bench is None:
        return None
    emulated = bench.manifest.get("emulated")
    return f"{bench.manifest.get('target')} (emulated: {emulated})" if emulated else bench.manifest.get("target")


def bench_facts(speeds: dict[str, dict], bench: Artifact | None) -> dict:
    ok = [r for r in speeds.values() if "error" not in r]
    return {
        "target": bench_target(bench),
        "host": ok[0].get("host") if ok else None,
        "settings": ok[0].get("settings") if ok else None,
        "runtimes": {s: r["runtime"] for s, r in speeds.items() if isinstance(r.get("runtime"), dict)},
        "thermal": {s: r["thermal"] for s, r in speeds.items() if "thermal" in r},
        "load": {s: r["load"] for s, r in speeds.items() if "load" in r},  # agent schema 3
        "busy": {s: r["load"]["busy"] for s, r in speeds.items() if (r.get("load") or {}).get("busy")},
        "errors": {s: r["error"] for s, r in speeds.items() if "error" in r},
    }


# --- devices and history -------------------------------------------------------------------------------------

DEVICE_FIGURES = ("threads", "prefill_tps", "decode_tps", "ttft_s", "peak_rss_mb", "decode_bw_fraction")
FACTS = ("board", "cpu", "machine", "bits", "os", "cores", "mem_total_mb", "asimddp", "i8mm", "temp_c", "throttled",
         "emulated")


def read_devices(bench: Artifact | None, speeds: dict[str, dict]) -> dict[str, dict]:
    """{target: {"facts", "results", "error"?}}: the bench's devices.json, else its one target from bench.json."""
    if bench is None:
        return {}
    try:
        return json.loads(bench.file("devices.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {bench.manifest.get("target") or "local": {"facts": None, "results": speeds}} if speeds else {}


def device_row(key: str, label: str, result: dict) -> dict:
    """One model on one device: headline figures, latency percentiles, thermal, sweep (`device_report` adds the
    speed-up over the teacher's model of the same runtime and type)."""
    if "error" in result:
        return {"key": key, "stage": stage_of(key), "name": label, "error": result["error"]}
    lat, th = result.get("decode_latency_ms") or {}, result.get("thermal") or {}
    return {
        "key": key, "stage": stage_of(key), "name": label, "runtime": (result.get("runtime") or {}).get("name"),
        "device_format": result.get("device_format"), **{k: result.get(k) for k in DEVICE_FIGURES},
        **{k: lat.get(k) for k in ("p50", "p95", "p99")},
        "bandwidth_gbs": (result.get("bandwidth") or {}).get("gbs"),
        "temp_before": (th.get("before") or {}).get("temp_c"), "temp_after": (th.get("after") or {}).get("temp_c"),
        "throttled": (th.get("after") or {}).get("throttled_flags"),
        "load": result.get("load"), "busy": (result.get("load") or {}).get("busy"),
        "sweep": [{k: e.get(k) for k in ("threads", "prefill_tps", "decode_tps")} for e in result.get("sweep", [])],
    } | ({"speculative": result["speculative"]} if result.get("speculative") else {})


def device_report(target: str, device: dict, labels: dict[str, str], kinds: dict[str, str] | None = None) -> dict:
    """One device's section; `kinds`: model key -> number format, for the speed-up's same-type teacher model."""
    results = device.get("results") or {}
    facts = device.get("facts") or {}
    rows = [device_row(k, labels.get(k, k), results[k]) for k in ordered(results)]
    for r in rows:
        r["kind"] = run_format(None, (kinds or {}).get(r["key"], ""), results[r["key"]])[1]
    front.add_speedups(rows)
    busy = [busy_warning(r["name"], r["busy"]) for r in rows if r.get("busy")]
    return {"target": target, "error": device.get("error"), "facts": {k: facts.get(k) for k in FACTS},
            "python": (facts.get("python") or {}).get("version"), "warnings": (device.get("warnings") or []) + busy,
            "rows": rows}


def snapshot(run_dir: Path, rows: list[dict], created: str) -> dict:
    """One point of history: a run's models by size, quality and speed at one time."""
    keep = ("key", "stage", "name", "bytes", "bpb", "ppl", "decode_tps", "prefill_tps")
    return {"run": run_dir.name, "path": str(run_dir.resolve()), "created": created,
            "rows": [{k: r.get(k) for k in keep} for r in rows]}


def _is_snapshot(h) -> bool:
    """Whether `h` has what the history table and chart read: as `snapshot` writes it."""
    return isinstance(h, dict) and all(isinstance(h.get(k), str) for k in ("path", "created", "run")) and \
        isinstance(h.get("rows"), list) and all(isinstance(r, dict) and isinstance(r.get("name"), str)
                                                for r in h["rows"])


def _own_history(report_json: Path, path: str) -> list[dict]:
    """The well-formed snapshots of run `path` in an earlier report.json. A file that is not a UTF-8 JSON object
    with a list of snapshots is skipped with a warning naming it: another run's damaged report must not stop this
    one."""
    try:
        old = json.loads(report_json.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return []
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        why = e.strerror if isinstance(e, OSError) else f"not UTF-8 JSON: {type(e).__name__}"
        log.warning("report: skipped %s in the history (%s); rerun that run's report or delete the file",
                    report_json, why)
        return []
    history = old.get("history") if isinstance(old, dict) else None
    if not isinstance(history, list):
        log.warning("report: skipped %s in the history (a JSON %s without a list of snapshots); rerun that run's "
                    "report or delete the file", report_json, type(old).__name__)
        return []
    return [h for h in history if _is_snapshot(h) and h["path"] == path]


def history(out: Path, current: dict) -> list[dict]:
    """Snapshots by time: this report's previous ones (from `out`'s old report.json) and each sibling run folder's
    (`<runs>/*/report/report.json`), then `current`."""
    run_dir = out.parent
    seen = _own_history(out / "report.json", current["path"])
    for other in sorted(run_dir.parent.glob(f"*/{out.name}/report.json")):
        if other.parent.parent.resolve() != run_dir.resolve():
            seen += _own_history(other, str(other.parent.parent.resolve()))
    unique = {(h["path"], h["created"]): h for h in seen + [current]}
    return sorted(unique.values(), key=lambda h: h["created"])


def front_data(rows: list[dict], tasks: dict[str, dict], bench: Artifact | None) -> dict:
    """The quality / decode-speed front on the bench target, and the sentence placing the student GGUF."""
    labels = [t.get("label", n) for n, t in tasks.items()]
    return {**front.front(rows, list(tasks)), "task_labels": labels,
            "target": bench_target(bench),
            "sentence": front.verdict(rows, list(tasks), labels,
                                      {n: t["chance"] for n, t in tasks.items() if "chance" in t})}


def report_data(inputs: Mapping[str, Artifact], out: Path | None = None, with_history: bool = False) -> dict:
    """Everything the report shows, as one JSON-ready dict, from {stage: Artifact} (those present)."""
    by_stage = dict(inputs)
    speeds, evals = read_speeds(by_stage.get("bench")), read_eval(by_stage.get("eval"))
    rows = rows_from_artifacts(by_stage, speeds, evals)
    student = student_manifest(by_stage)
    labels = {SPECULATIVE: model_label(SPECULATIVE, student)} | {r["key"]: r["name"] for r in rows}
    kinds = {k: number_format(stage_of(k), v.manifest) for k, v in model_views(by_stage).items()}
    kinds[SPECULATIVE] = number_format(SPECULATIVE, student)
    devices = read_devices(by_stage.get("bench"), speeds)
    tasks = evals.get("tasks") or {}
    report = {
        "schema_version": SCHEMA_VERSION,
        "columns": [{"key": ".".join(k) if isinstance(k, tuple) else k, "header": h}
                    for k, h, _ in table_columns(tasks)],
        "rows": rows,
        "tasks": tasks,
        "front": front_data(rows, tasks, by_stage.get("bench")),
        "recipe": {a.stage: a.manifest.get("config") or {} for a in inputs.values()},
        "stages": [stage_facts(a) for a in inputs.values()],
        "versions": versions(list(inputs.values())),
        "bench": bench_facts(speeds, by_stage.get("bench")),
        "devices": [device_report(t, d, labels, kinds) for t, d in devices.items()],
        "history": [],
    }
    if out is not None and with_history:
        now = datetime.now(timezone.utc).isoformat(timespec="microseconds")  # distinct even for quick reruns
        report["history"] = history(Path(out), snapshot(Path(out).parent, rows, now))
    return report
