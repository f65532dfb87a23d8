"""The report stage: one table lining up every model's size, quality and speed, plus the recipe that made them.

Rows: the teacher and its own GGUF files (baseline), then the pipeline's models; quality from each model's
held-out metrics and the eval stage's zero-shot accuracy, speed from the bench, the speed-up over the teacher's model
of the same runtime and number format, and the front of non-dominated models (`front`). Also per device (SSH
fleets: `devices.json` of the bench artifact) with the same speed-up on that board, and the history of earlier
reports (this run folder's previous report and sibling run folders'). Writes Markdown, JSON, and one self-contained
HTML file with charts (`report_html`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, ClassVar

from . import front
from .artifact import Artifact, ArtifactWriter, runtime_for_format
from .export.gguf import gguf_quant
from .pipeline import STAGES

SCHEMA_VERSION = 3  # 2: devices, history; 3: baseline rows, zero-shot accuracy, speed-up by runtime and type, front
FORMATS = ("md", "json", "html")
MISSING = "–"
LABELS = {s.name: s.label for s in STAGES if s.label}  # model stage -> row name ({kind}: number format)
LEADING = ("teacher", "baseline")  # the teacher and its own GGUF files head the table
MODEL_STAGES = LEADING + tuple(s for s in LABELS if s not in LEADING)  # rows, then in pipeline order
QUALITY = ("params", "bytes", "ppl", "agreement", "kl")  # from each model artifact's metrics
SPEED = ("prefill_tps", "decode_tps", "ttft_s", "peak_rss_mb", "load_s")  # from the bench artifact's bench.json


@dataclass(frozen=True)
class ReportConfig:
    """What the report writes."""

    VERSION: ClassVar[int] = 2
    formats: list[str] = field(default_factory=lambda: list(FORMATS))  # any of "md", "json", "html"
    history: bool = True  # chart earlier reports: this run folder's previous one and sibling run folders'

    def __post_init__(self):
        bad = [f for f in self.formats if f not in FORMATS]
        if bad or not self.formats:
            raise ValueError(f"formats {self.formats} not supported; use a non-empty subset of {list(FORMATS)}")


# --- the table, from plain dicts -------------------------------------------------------------------------------

def _num(spec: str, scale: float = 1.0) -> Callable[[object], str]:
    return lambda v: format(float(v) * scale, spec)


def _count(v: object) -> str:
    n = float(v)
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.1f}{unit}"
    return f"{n:.0f}"


COLUMNS: tuple[tuple[str, str, Callable[[object], str]], ...] = (  # (row key, header, formatter)
    ("params", "params", _count),
    ("bytes", "size (MB)", _num(".1f", 1e-6)),
    ("ppl", "ppl", _num(".2f")),
    ("agreement", "agree (%)", _num(".1f", 100)),  # `agreement` is a fraction of held-out tokens
    ("kl", "KL", _num(".3f")),
    ("prefill_tps", "prefill tok/s", _num(".1f")),
    ("decode_tps", "decode tok/s", _num(".1f")),
    ("speedup", "× teacher", _num(".2f")),  # decode tok/s over the teacher's model of the same runtime and type
    ("ttft_s", "TTFT (ms)", _num(".0f", 1e3)),
    ("peak_rss_mb", "peak RSS (MB)", _num(".0f")),
)


def table_columns(tasks: dict[str, dict]) -> tuple:
    """COLUMNS with one zero-shot column per task (acc_norm ± standard error) after the held-out figures."""
    at = [k for k, _, _ in COLUMNS].index("kl") + 1
    zs = tuple((("zeroshot", t, "acc_norm"), f"{facts.get('label', t)} acc_norm", _num(".3f"))
               for t, facts in tasks.items())
    return COLUMNS[:at] + zs + COLUMNS[at:]


def lookup(row: dict, key: str | tuple) -> object:
    """row[key], or the value at a path of keys (nested dicts), None where any is missing."""
    for k in (key,) if isinstance(key, str) else key:
        row = row.get(k) if isinstance(row, dict) else None
    return row


def row_cell(row: dict, key: str | tuple, fmt: Callable[[object], str]) -> str:
    """`cell` of row[key], followed by "± <stderr>" when the row holds `<key>_stderr` beside it."""
    err_key = key + "_stderr" if isinstance(key, str) else key[:-1] + (key[-1] + "_stderr",)
    text, err = cell(lookup(row, key), fmt), cell(lookup(row, err_key), fmt)
    return f"{text} ± {err}" if MISSING not in (text, err) else text


def cell(value: object, fmt: Callable[[object], str]) -> str:
    """A formatted figure, or "–" when it is missing or not a finite number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return MISSING
    return fmt(value)


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
    ppl = teacher.get("ppl")
    if ppl is None:
        ppl = data.get("ppl", data.get("teacher_ppl"))
    return {"agreement": 1.0, "kl": 0.0, **teacher, "ppl": ppl}


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


DEVICE_COLUMNS: tuple[tuple[str, str, Callable[[object], str]], ...] = (  # one model on one device
    ("threads", "threads", _num(".0f")),
    ("prefill_tps", "prefill tok/s", _num(".1f")),
    ("decode_tps", "decode tok/s", _num(".1f")),
    ("speedup", "× teacher", _num(".2f")),  # over the teacher's model of the same runtime and type, same device
    ("ttft_s", "TTFT (ms)", _num(".0f", 1e3)),
    ("p50", "p50 (ms)", _num(".1f")),  # per-token decode latency percentiles
    ("p95", "p95 (ms)", _num(".1f")),
    ("p99", "p99 (ms)", _num(".1f")),
    ("peak_rss_mb", "peak RSS (MB)", _num(".0f")),
    ("decode_bw_fraction", "bandwidth used (%)", _num(".0f", 100)),  # weight bytes x tok/s / copy bandwidth
    ("temp_after", "temp after (°C)", _num(".0f")),
)


def row_name(r: dict) -> str:
    return f"{r['name']} ({r['device_format']})" if r.get("device_format") else str(r["name"])


def markdown_table(rows: list[dict], columns=COLUMNS) -> str:
    header = ["model"] + [h for _, h, _ in columns]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join([row_name(r)] + [row_cell(r, k, f) for k, _, f in columns]) + " |")
    return "\n".join(lines)


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
    "gguf": gguf_quant, "baseline": model_quant, "onnx": onnx_precision, "quantize": bnb_method}


def number_format(stage: str, manifest: dict) -> str:
    """"Q4_0", "int4", "nf4"...; "" for a model folder as saved."""
    return KINDS.get(stage, lambda m: None)(manifest) or ""


def model_label(stage: str, manifest: dict) -> str:
    """The row name; export rows name their number format, read from the manifest (e.g. GGUF Q4_K_M)."""
    kind = number_format(stage, manifest) if "{kind}" in LABELS.get(stage, "") else ""
    return LABELS.get(stage, stage).format(kind=kind).strip()


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
    front.add_speedups(rows)
    return rows


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


def bench_facts(speeds: dict[str, dict], bench: Artifact | None) -> dict:
    ok = [r for r in speeds.values() if "error" not in r]
    return {
        "target": bench.manifest.get("target") if bench else None,
        "host": ok[0].get("host") if ok else None,
        "settings": ok[0].get("settings") if ok else None,
        "runtimes": {s: r["runtime"] for s, r in speeds.items() if isinstance(r.get("runtime"), dict)},
        "thermal": {s: r["thermal"] for s, r in speeds.items() if "thermal" in r},
        "load": {s: r["load"] for s, r in speeds.items() if "load" in r},  # agent schema 3
        "busy": {s: r["load"]["busy"] for s, r in speeds.items() if (r.get("load") or {}).get("busy")},
        "errors": {s: r["error"] for s, r in speeds.items() if "error" in r},
    }


def busy_warning(name: str, reason: str) -> str:
    """The warning for figures the agent took while other work ran on the machine."""
    return (f"{name} was measured on a busy machine ({reason}): its speeds are lower than on a quiet one; "
            "rerun the bench when nothing else runs there")


# --- devices and history -------------------------------------------------------------------------------------

DEVICE_FIGURES = ("threads", "prefill_tps", "decode_tps", "ttft_s", "peak_rss_mb", "decode_bw_fraction")
FACTS = ("board", "cpu", "machine", "bits", "os", "cores", "mem_total_mb", "asimddp", "i8mm", "temp_c", "throttled")


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
    }


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
    keep = ("key", "stage", "name", "bytes", "ppl", "decode_tps", "prefill_tps")
    return {"run": run_dir.name, "path": str(run_dir.resolve()), "created": created,
            "rows": [{k: r.get(k) for k in keep} for r in rows]}


def _own_history(report_json: Path, path: str) -> list[dict]:
    try:
        old = json.loads(report_json.read_text())
    except (OSError, json.JSONDecodeError):
        return []
    return [h for h in old.get("history") or [] if isinstance(h, dict) and h.get("path") == path]


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
            "target": bench.manifest.get("target") if bench else None,
            "sentence": front.verdict(rows, list(tasks), labels,
                                      {n: t["chance"] for n, t in tasks.items() if "chance" in t})}


def report_data(inputs: Mapping[str, Artifact], out: Path | None = None, with_history: bool = False) -> dict:
    """Everything the report shows, as one JSON-ready dict, from {stage: Artifact} (those present)."""
    from .zeroshot import read_eval

    by_stage = dict(inputs)
    speeds, evals = read_speeds(by_stage.get("bench")), read_eval(by_stage.get("eval"))
    rows = rows_from_artifacts(by_stage, speeds, evals)
    labels = {r["key"]: r["name"] for r in rows}
    kinds = {k: number_format(stage_of(k), v.manifest) for k, v in model_views(by_stage).items()}
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


# --- markdown -------------------------------------------------------------------------------------------------

def toml_block(recipe: dict[str, dict]) -> str:
    """Stage configs as TOML tables; None has no TOML spelling, so it is shown commented out."""
    lines = []
    for stage, cfg in recipe.items():
        lines.append(f"[{stage}]")
        lines += [f"{k} = {json.dumps(v)}" if v is not None else f"# {k} = none" for k, v in cfg.items()]
        lines.append("")
    return "\n".join(lines).rstrip()


def duration(s: object) -> str:
    if not isinstance(s, (int, float)):
        return MISSING
    if s < 60:
        return f"{s:.1f} s"
    if s < 3600:
        return f"{int(s // 60)} min {int(s % 60):02d} s"
    return f"{int(s // 3600)} h {int(s % 3600 // 60):02d} min"


def stages_table(stages: list[dict]) -> str:
    lines = ["| stage | wall time | device | git |", "|---|---:|---|---|"]
    for st in stages:
        env = st.get("environment") or {}
        git = (env.get("git_sha") or MISSING)[:10]
        lines.append(f"| {st['stage']} | {duration(st.get('wall_s'))} | {env.get('device') or MISSING} | {git} |")
    return "\n".join(lines)


def versions_table(seen: dict[str, list[str]]) -> str:
    lines = ["| package | version |", "|---|---|"]
    lines += [f"| {name} | {' / '.join(vs)} |" for name, vs in seen.items()]
    return "\n".join(lines)


def bench_lines(bench: dict) -> str:
    host, st = bench.get("host") or {}, bench.get("settings") or {}
    lines = [f"- target: {bench.get('target') or MISSING}"]
    if host:
        board = f", {host['board']}" if host.get("board") else ""
        lines.append(f"- host: {host.get('hostname')} ({host.get('machine')}, {host.get('cores')} cores{board}, "
                     f"{host.get('system')}, Python {host.get('python')})")
    if st:
        lines.append(f"- settings: {st.get('threads')} threads, prompt tokens {st.get('prompt_tokens')}, "
                     f"{st.get('gen_tokens')} generated tokens, {st.get('repeats')} repeats after "
                     f"{st.get('warmup')} warm-up")
    lines += [f"- {s}: {r.get('name')} {r.get('version')}" for s, r in bench.get("runtimes", {}).items()]
    lines += [f"- **{s} failed**: {err}" for s, err in bench.get("errors", {}).items()]
    lines += [f"- **warning**: {busy_warning(s, why)}" for s, why in (bench.get("busy") or {}).items()]
    return "\n".join(lines)


def device_summary(dev: dict) -> str:
    """"Raspberry Pi 5 Model B Rev 1.0, Cortex-A76, 4 cores, 8052 MiB, 64-bit Debian 12, Python 3.11.2"."""
    f = dev.get("facts") or {}
    parts = [f.get("board") or f.get("machine"), f.get("cpu"), f.get("cores") and f"{f['cores']} cores",
             f.get("mem_total_mb") and f"{f['mem_total_mb']:.0f} MiB",
             " ".join(str(x) for x in (f.get("bits") and f"{f['bits']}-bit", f.get("os")) if x),
             dev.get("python") and f"Python {dev['python']}"]
    return ", ".join(str(p) for p in parts if p) or "no facts gathered"


def devices_markdown(devices: list[dict]) -> str:
    blocks = []
    for dev in devices:
        blocks.append(f"### {dev['target']}\n\n{device_summary(dev)}")
        if dev.get("error"):
            blocks.append(f"**device failed**: {dev['error']}")
        if dev.get("warnings"):
            blocks.append("\n".join(f"- warning: {w}" for w in dev["warnings"]))
        if dev["rows"]:
            blocks.append(markdown_table(dev["rows"], DEVICE_COLUMNS))
        blocks += [f"- **{r['name']} failed**: {r['error']}" for r in dev["rows"] if r.get("error")]
    return "\n\n".join(blocks)


def front_lines(report: dict) -> str:
    """The student GGUF against the teacher's file of its type in one sentence, the non-dominated models, and the
    models without zero-shot figures (why)."""
    fr = report.get("front") or {}
    names = {p["key"]: p["name"] for p in fr.get("points") or []}
    where = f" on {fr['target']}" if fr.get("target") else ""
    paras = [f"{fr['sentence'][0].upper()}{fr['sentence'][1:]}." if fr.get("sentence") else
             "No student GGUF and teacher GGUF of the same type with both speed and quality to compare."]
    if names:
        paras.append(f"Front of non-dominated models ({fr.get('quality')} against decode tok/s{where}): "
                     + ", ".join(names[k] for k in fr.get("front") or []) + ".")
    notes = [f"- {r['name']}: no zero-shot figures: {r['eval_note']}" for r in report["rows"] if r.get("eval_note")]
    return "\n\n".join(paras + (["\n".join(notes)] if notes else []))


def zeroshot_columns(tasks: dict[str, dict]) -> tuple:
    return tuple((("zeroshot", t, m), f"{facts.get('label', t)} {m}", _num(".3f"))
                 for t, facts in tasks.items() for m in ("acc", "acc_norm"))


def zeroshot_markdown(report: dict) -> str:
    tasks = report.get("tasks") or {}
    about = "; ".join(f"{t.get('label', n)}: {t.get('n')} items of {t.get('source')} (chance {t.get('chance', 0):.3f})"
                      for n, t in tasks.items())
    rows = [r for r in report["rows"] if r.get("zeroshot")]
    return (f"{about}. Scored as lm-eval (sum of log p over each choice's tokens; acc_norm per UTF-8 byte); "
            f"± one standard error.\n\n" + markdown_table(rows, zeroshot_columns(tasks)))


def render_markdown(report: dict) -> str:
    parts = [
        "# pistill report", markdown_table(report["rows"], table_columns(report.get("tasks") or {})),
        "## Quality vs speed", front_lines(report),
    ]
    if report.get("tasks"):
        parts += ["## Zero-shot accuracy", zeroshot_markdown(report)]
    parts += [
        "## Recipe", "```toml\n" + toml_block(report["recipe"]) + "\n```",
        "## Stages", stages_table(report["stages"]),
        "## Versions", versions_table(report["versions"]),
        "## Bench host", bench_lines(report["bench"]),
    ]
    if report.get("devices"):
        parts += ["## Devices", devices_markdown(report["devices"])]
    return "\n\n".join(parts) + "\n"


def run(inputs: Mapping[str, Artifact], cfg: ReportConfig, out: Path) -> Artifact:
    """Write report.md / report.json / report.html from every artifact of the pipeline (teacher ... bench)."""
    with ArtifactWriter(out, "report", cfg, inputs) as w:
        report = report_data(inputs, out, cfg.history)
        if "md" in cfg.formats:
            (w.dir / "report.md").write_text(render_markdown(report))
        if "json" in cfg.formats:
            (w.dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        if "html" in cfg.formats:
            from .report_html import render_html

            (w.dir / "report.html").write_text(render_html(report), encoding="utf-8")
        w.metrics["rows"] = len(report["rows"])
    return w.artifact
