"""The report's tables as text, shared by the Markdown and HTML renderers: columns, formatted cells ("–" for a
missing figure), and the sections both show (models, zero-shot accuracy, the verdict, one table per device).

Rows are the gathered report's plain dicts (`report_gather`); a `Table` is what a renderer lays out: a header and
rows of cells, the model's name first.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Callable

MISSING = "–"


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
    ("bpb", "bits/byte", _num(".3f")),  # held-out bits per byte: compares models whatever their vocabulary
    ("ppl", "ppl", _num(".2f")),  # per teacher token of the same text
    ("agreement", "agree (%)", _num(".1f", 100)),  # `agreement` is a fraction of held-out tokens
    ("kl", "KL", _num(".3f")),
    ("prefill_tps", "prefill tok/s", _num(".1f")),
    ("decode_tps", "decode tok/s", _num(".1f")),
    ("speedup", "× teacher", _num(".2f")),  # decode tok/s over the teacher's model of the same runtime and type
    ("ttft_s", "TTFT (ms)", _num(".0f", 1e3)),
    ("peak_rss_mb", "peak RSS (MB)", _num(".0f")),
)
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


def table_columns(tasks: dict[str, dict]) -> tuple:
    """COLUMNS with one zero-shot column per task (acc_norm ± standard error) after the held-out figures."""
    at = [k for k, _, _ in COLUMNS].index("kl") + 1
    zs = tuple((("zeroshot", t, "acc_norm"), f"{facts.get('label', t)} acc_norm", _num(".3f"))
               for t, facts in tasks.items())
    return COLUMNS[:at] + zs + COLUMNS[at:]


def zeroshot_columns(tasks: dict[str, dict]) -> tuple:
    return tuple((("zeroshot", t, m), f"{facts.get('label', t)} {m}", _num(".3f"))
                 for t, facts in tasks.items() for m in ("acc", "acc_norm"))


# --- cells ----------------------------------------------------------------------------------------------------

def cell(value: object, fmt: Callable[[object], str]) -> str:
    """A formatted figure, or "–" when it is missing or not a finite number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return MISSING
    return fmt(value)


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


def row_name(r: dict) -> str:
    return f"{r['name']} ({r['device_format']})" if r.get("device_format") else str(r["name"])


# --- tables and sections --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Table:
    """One table as text: "model" and the columns' headers; per row its name, then one cell per column."""

    header: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]


def text_table(rows: list[dict], columns=COLUMNS) -> Table:
    """`rows` in `columns`, each figure formatted by its column."""
    return Table(("model", *(h for _, h, _ in columns)),
                 tuple((row_name(r), *(row_cell(r, k, f) for k, _, f in columns)) for r in rows))


def models_table(report: dict) -> Table:
    """The main table: every model's size, held-out quality, zero-shot accuracy and speed."""
    return text_table(report["rows"], table_columns(report.get("tasks") or {}))


def speculative_notes(rows: list[dict]) -> list[str]:
    """Under a table, per timed speculative row (the teacher's GGUF with the student's as its draft): acceptance,
    mean accepted length and tokens per teacher pass, the speed-up's reference, and (main table: the row has
    `quality_from`) what its size and quality cells hold."""
    notes, two, one = [], _num(".2f"), _num(".1f")
    for r in rows:
        if "speculative" not in r or r.get("bench_error") or r.get("error"):
            continue
        s = r["speculative"] or {}
        note = f"{r['name']}: the teacher file decodes greedily, the student GGUF proposing its tokens"
        if s:
            note += (f"; {cell(s.get('acceptance_rate'), two)} of the drafted tokens accepted (alpha "
                     f"{cell(s.get('alpha'), two)}), mean accepted length {cell(s.get('mean_accepted'), two)} draft "
                     f"tokens and {cell(s.get('tokens_per_step'), two)} tokens out per teacher pass (mean k "
                     f"{cell(s.get('mean_k'), one)})")
        if r.get("speedup_vs"):
            note += f"; × teacher is over {r['speedup_vs']} alone"
        if "quality_from" in r:
            note += (f". Its output is {r['quality_from'] or 'the teacher file'}'s, so its quality cells are that "
                     "file's; its size is both files")
        notes.append(note + ".")
    return notes


@dataclass(frozen=True)
class DeviceTable:
    """One device's section: the board in one line, why it failed or warns, its table and the notes under it, and
    its failed models."""

    target: str
    summary: str
    error: str | None
    warnings: list[str]
    table: Table | None  # None when no model ran there
    failed: list[tuple[str, str]]  # (model name, error)
    notes: list[str]  # under the table: the speculative row's acceptance (`speculative_notes`)

    def parts(self) -> list[tuple[str, object]]:
        """(part, content) in the order both documents show them, empty ones left out: "heading" (the target),
        "summary", "error", "warnings", "table", "notes", "failed"."""
        parts = (("heading", self.target), ("summary", self.summary), ("error", self.error),
                 ("warnings", self.warnings), ("table", self.table), ("notes", self.notes), ("failed", self.failed))
        return [(k, v) for k, v in parts if v]


def failures(rows: list[dict], key: str) -> list[tuple[str, str]]:
    """(name, error) of the rows with an error under `key` ("error" on a device, "bench_error" in the main table)."""
    return [(r["name"], r[key]) for r in rows if r.get(key)]


def device_summary(dev: dict) -> str:
    """"Raspberry Pi 5 Model B Rev 1.0, Cortex-A76, 4 cores, 8052 MiB, 64-bit Debian 12, Python 3.11.2"; an
    emulated device says so first, with how: its speeds are the emulator's, not the board's."""
    f = dev.get("facts") or {}
    parts = [f.get("emulated") and f"EMULATED ({f['emulated']}): not the board's speed",
             f.get("board") or f.get("machine"), f.get("cpu"), f.get("cores") and f"{f['cores']} cores",
             f.get("mem_total_mb") and f"{f['mem_total_mb']:.0f} MiB",
             " ".join(str(x) for x in (f.get("bits") and f"{f['bits']}-bit", f.get("os")) if x),
             dev.get("python") and f"Python {dev['python']}"]
    return ", ".join(str(p) for p in parts if p) or "no facts gathered"


def device_tables(devices: list[dict]) -> list[DeviceTable]:
    """The report's `devices` as sections ready to lay out."""
    return [DeviceTable(d["target"], device_summary(d), d.get("error"), d.get("warnings") or [],
                        text_table(d["rows"], DEVICE_COLUMNS) if d["rows"] else None, failures(d["rows"], "error"),
                        speculative_notes(d["rows"]))
            for d in devices]


def zeroshot_table(report: dict) -> Table:
    """acc and acc_norm per task, of the models that have zero-shot figures."""
    tasks = report.get("tasks") or {}
    return text_table([r for r in report["rows"] if r.get("zeroshot")], zeroshot_columns(tasks))


def zeroshot_about(tasks: dict[str, dict]) -> str:
    """"ARC-Easy: 500 items of arc_easy.jsonl (chance 0.250); ..."."""
    return "; ".join(f"{t.get('label', n)}: {t.get('n')} items of {t.get('source')} (chance {t.get('chance', 0):.3f})"
                     for n, t in tasks.items())


def verdict(fr: dict) -> str | None:
    """The sentence placing the student GGUF, as a sentence ("The student is ... ."), None without one."""
    return f"{fr['sentence'][0].upper()}{fr['sentence'][1:]}." if fr.get("sentence") else None


def eval_notes(rows: list[dict]) -> list[str]:
    """Why a model has no zero-shot figures, one line per such model."""
    return [f"{r['name']}: no zero-shot figures: {r['eval_note']}" for r in rows if r.get("eval_note")]


def busy_warning(name: str, reason: str) -> str:
    """The warning for figures the agent took while other work ran on the machine."""
    return (f"{name} was measured on a busy machine ({reason}): its speeds are lower than on a quiet one; "
            "rerun the bench when nothing else runs there")


def toml_block(recipe: dict[str, dict]) -> str:
    """Stage configs as TOML tables; None has no TOML spelling, so it is shown commented out."""
    lines = []
    for stage, cfg in recipe.items():
        lines.append(f"[{stage}]")
        lines += [f"{k} = {json.dumps(v)}" if v is not None else f"# {k} = none" for k, v in cfg.items()]
        lines.append("")
    return "\n".join(lines).rstrip()
