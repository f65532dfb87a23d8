"""The report stage: one table lining up every model's size, quality and speed, plus the recipe that made them.

Also per device (SSH fleets: `devices.json` of the bench artifact) with the speed-up over the teacher on the same
board, and the history of earlier reports (this run folder's previous report and sibling run folders'). Writes
Markdown, JSON, and one self-contained HTML file with charts (`report_html`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, ClassVar

from .artifact import Artifact, ArtifactWriter

SCHEMA_VERSION = 2  # 2: devices, history
FORMATS = ("md", "json", "html")
MISSING = "–"
MODEL_STAGES = ("teacher", "prune", "quantize", "distill", "gguf", "onnx")  # row order
LABELS = {"teacher": "teacher", "prune": "pruned", "quantize": "quantized teacher", "distill": "student",
          "gguf": "student GGUF {kind}", "onnx": "student ONNX {kind}"}
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
    ("ttft_s", "TTFT (ms)", _num(".0f", 1e3)),
    ("peak_rss_mb", "peak RSS (MB)", _num(".0f")),
)


def cell(value: object, fmt: Callable[[object], str]) -> str:
    """A formatted figure, or "–" when it is missing or not a finite number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return MISSING
    return fmt(value)


def model_row(stage: str, label: str, metrics: dict, speed: dict | None) -> dict:
    """One row: quality figures from a model's metrics, speeds from its bench result (None when not benched)."""
    speed = speed or {}
    row = {"stage": stage, "name": label}
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


def build_rows(metrics: dict[str, dict], labels: dict[str, str], speeds: dict[str, dict]) -> list[dict]:
    """Rows in MODEL_STAGES order for the stages present in `metrics` (stage -> that artifact's metrics)."""
    return [model_row(s, labels.get(s, s), metrics[s], speeds.get(s)) for s in MODEL_STAGES if s in metrics]


DEVICE_COLUMNS: tuple[tuple[str, str, Callable[[object], str]], ...] = (  # one model on one device
    ("threads", "threads", _num(".0f")),
    ("prefill_tps", "prefill tok/s", _num(".1f")),
    ("decode_tps", "decode tok/s", _num(".1f")),
    ("speedup", "× teacher", _num(".2f")),  # decode tok/s over the teacher's on the same device
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
        lines.append("| " + " | ".join([row_name(r)] + [cell(r.get(k), f) for k, _, f in columns]) + " |")
    return "\n".join(lines)


# --- gathering from artifacts --------------------------------------------------------------------------------

def gguf_quant(manifest: dict) -> str | None:
    """The llama.cpp type of a GGUF artifact's model file: the export's first `quants` entry, else its outtype."""
    cfg = manifest.get("config") or {}
    quants = cfg.get("quants")
    if isinstance(quants, (list, tuple)) and quants:
        return str(quants[0])
    if isinstance(cfg.get("outtype"), str):  # no quants: the model is the unquantized file
        return cfg["outtype"].upper()
    return None


def onnx_precision(manifest: dict) -> str | None:
    return (manifest.get("config") or {}).get("precision")  # int4 (MatMulNBits) or fp32


def model_label(stage: str, manifest: dict) -> str:
    """The row name; export rows name their number format, read from the manifest (e.g. GGUF Q4_K_M)."""
    kind = {"gguf": gguf_quant, "onnx": onnx_precision}.get(stage, lambda m: None)(manifest)
    return LABELS.get(stage, stage).format(kind=kind or "").strip()


def read_speeds(bench: Artifact | None) -> dict[str, dict]:
    """The bench artifact's `bench.json` ({stage: agent result or {"error": ...}}), {} when absent."""
    if bench is None:
        return {}
    try:
        return json.loads(bench.file("bench.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def rows_from_artifacts(by_stage: dict[str, Artifact], speeds: dict[str, dict]) -> list[dict]:
    metrics = {s: a.metrics for s, a in by_stage.items() if s in MODEL_STAGES}
    if "teacher" in metrics:
        data = by_stage["data"].metrics if "data" in by_stage else {}
        metrics["teacher"] = teacher_metrics(metrics["teacher"], data)
    labels = {s: model_label(s, a.manifest) for s, a in by_stage.items()}
    return build_rows(metrics, labels, speeds)


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
        "errors": {s: r["error"] for s, r in speeds.items() if "error" in r},
    }


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


def device_row(stage: str, label: str, result: dict, teacher_tps: float | None) -> dict:
    """One model on one device: headline figures, latency percentiles, thermal, sweep, speed-up over the teacher."""
    if "error" in result:
        return {"stage": stage, "name": label, "error": result["error"]}
    lat, th = result.get("decode_latency_ms") or {}, result.get("thermal") or {}
    tps = result.get("decode_tps")
    return {
        "stage": stage, "name": label, "runtime": (result.get("runtime") or {}).get("name"),
        "device_format": result.get("device_format"), **{k: result.get(k) for k in DEVICE_FIGURES},
        **{k: lat.get(k) for k in ("p50", "p95", "p99")},
        "bandwidth_gbs": (result.get("bandwidth") or {}).get("gbs"),
        "speedup": tps / teacher_tps if tps and teacher_tps and stage != "teacher" else None,
        "temp_before": (th.get("before") or {}).get("temp_c"), "temp_after": (th.get("after") or {}).get("temp_c"),
        "throttled": (th.get("after") or {}).get("throttled_flags"),
        "sweep": [{k: e.get(k) for k in ("threads", "prefill_tps", "decode_tps")} for e in result.get("sweep", [])],
    }


def device_report(target: str, device: dict, labels: dict[str, str]) -> dict:
    results = device.get("results") or {}
    teacher_tps = (results.get("teacher") or {}).get("decode_tps")
    facts = device.get("facts") or {}
    return {"target": target, "error": device.get("error"), "facts": {k: facts.get(k) for k in FACTS},
            "python": (facts.get("python") or {}).get("version"), "warnings": device.get("warnings") or [],
            "rows": [device_row(s, labels.get(s, s), results[s], teacher_tps) for s in MODEL_STAGES if s in results]}


def snapshot(run_dir: Path, rows: list[dict], created: str) -> dict:
    """One point of history: a run's models by size, quality and speed at one time."""
    keep = ("stage", "name", "bytes", "ppl", "decode_tps", "prefill_tps")
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


def report_data(inputs: list[Artifact], out: Path | None = None, with_history: bool = False) -> dict:
    """Everything the report shows, as one JSON-ready dict."""
    by_stage = {a.stage: a for a in inputs}
    speeds = read_speeds(by_stage.get("bench"))
    rows = rows_from_artifacts(by_stage, speeds)
    labels = {r["stage"]: r["name"] for r in rows}
    devices = read_devices(by_stage.get("bench"), speeds)
    report = {
        "schema_version": SCHEMA_VERSION,
        "columns": [{"key": k, "header": h} for k, h, _ in COLUMNS],
        "rows": rows,
        "recipe": {a.stage: a.manifest.get("config") or {} for a in inputs},
        "stages": [stage_facts(a) for a in inputs],
        "versions": versions(inputs),
        "bench": bench_facts(speeds, by_stage.get("bench")),
        "devices": [device_report(t, d, labels) for t, d in devices.items()],
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


def render_markdown(report: dict) -> str:
    parts = [
        "# pistill report", markdown_table(report["rows"]),
        "## Recipe", "```toml\n" + toml_block(report["recipe"]) + "\n```",
        "## Stages", stages_table(report["stages"]),
        "## Versions", versions_table(report["versions"]),
        "## Bench host", bench_lines(report["bench"]),
    ]
    if report.get("devices"):
        parts += ["## Devices", devices_markdown(report["devices"])]
    return "\n\n".join(parts) + "\n"


def run(inputs: list[Artifact], cfg: ReportConfig, out: Path) -> Artifact:
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
