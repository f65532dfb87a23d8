"""The report as one self-contained HTML file: the tables of `report_table`, and matplotlib charts as base64 PNGs."""

from __future__ import annotations

import base64
import html
import io
import math

from .report_table import (MISSING, DeviceTable, Table, device_tables, eval_notes, failures, models_table,
                           speculative_notes, toml_block, verdict, zeroshot_about, zeroshot_table)

CSS = """body{font:14px/1.45 system-ui,sans-serif;margin:2em auto;max-width:1200px;color:#222;padding:0 1em}
table{border-collapse:collapse;margin:.5em 0 1.5em}th,td{border:1px solid #ccc;padding:3px 8px}
td.n{text-align:right;font-variant-numeric:tabular-nums}th{background:#f2f2f2}h1,h2,h3{margin-top:1.4em}
img{max-width:100%;border:1px solid #eee}.err{color:#b00020}.warn{color:#8a5a00}
pre{background:#f7f7f7;padding:.8em;overflow:auto}"""


def _num(v) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def png(fig) -> str:
    """A matplotlib Figure as a base64 PNG (Agg canvas: no pyplot, no global state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _ms_per_token(r: dict) -> float | None:
    tps = _num(r.get("decode_tps"))
    return 1e3 / tps if tps else None


STAGE_PANELS = (  # (title, value of a row)
    ("size (MB)", lambda r: (_num(r.get("bytes")) or 0) / 1e6 or None),
    ("bits per byte", lambda r: _num(r.get("bpb"))),
    ("decode latency (ms/token)", _ms_per_token),
)


def stage_chart(rows: list[dict]):
    """Size, bits per byte and decode latency per model, side by side (a missing figure is an empty bar)."""
    from matplotlib.figure import Figure

    names = [r["name"] for r in rows]
    fig = Figure(figsize=(12, 0.9 + 0.45 * len(rows)))
    for i, (title, value) in enumerate(STAGE_PANELS):
        ax = fig.add_subplot(1, 3, i + 1)
        ax.barh(range(len(rows)), [value(r) or 0.0 for r in rows], color="#4c72b0")
        ax.set_yticks(range(len(rows)), names if i == 0 else [""] * len(rows))
        ax.invert_yaxis()
        ax.set_title(title)
    return fig


def tradeoff_chart(rows: list[dict]):
    """Size against held-out bits per byte, each model coloured by decode tok/s: what each stage bought."""
    from matplotlib.figure import Figure

    pts = [(r, _num(r.get("bytes")), _num(r.get("bpb"))) for r in rows]
    pts = [(r, b / 1e6, p) for r, b, p in pts if b is not None and p is not None]
    if not pts:
        return None
    fig = Figure(figsize=(6.5, 4.2))
    ax = fig.add_subplot()
    timed = [(r, b, p) for r, b, p in pts if _num(r.get("decode_tps"))]
    untimed = [(r, b, p) for r, b, p in pts if not _num(r.get("decode_tps"))]
    sc = ax.scatter([b for _, b, _ in timed], [p for _, _, p in timed], c=[r["decode_tps"] for r, _, _ in timed],
                    cmap="viridis", s=80)
    ax.scatter([b for _, b, _ in untimed], [p for _, _, p in untimed], facecolors="none", edgecolors="grey", s=80,
               label="not benchmarked")
    for r, b, p in pts:
        ax.annotate(r["name"], (b, p), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.margins(0.2)
    if untimed:
        ax.legend(fontsize=8)
    if timed:
        fig.colorbar(sc, ax=ax, label="decode tok/s")
    ax.set_xlabel("size (MB)")
    ax.set_ylabel("bits per byte (lower is better)")
    ax.set_title("size vs quality vs speed")
    return fig


def device_chart(devices: list[dict]):
    """Decode tok/s of every model on every device, grouped by model."""
    from matplotlib.figure import Figure

    devs = [d for d in devices if any(_num(r.get("decode_tps")) for r in d["rows"])]
    if not devs:
        return None
    names = list(dict.fromkeys(r["name"] for d in devs for r in d["rows"]))
    fig = Figure(figsize=(max(6.0, 1.3 * len(names) * len(devs) ** 0.5), 3.8))
    ax, width = fig.add_subplot(), 0.8 / len(devs)
    for i, d in enumerate(devs):
        by_name = {r["name"]: _num(r.get("decode_tps")) or 0.0 for r in d["rows"]}
        ax.bar([j + i * width for j in range(len(names))], [by_name.get(n, 0.0) for n in names], width,
               label=d["target"])
    ax.set_xticks([j + width * (len(devs) - 1) / 2 for j in range(len(names))], names, rotation=20, ha="right")
    ax.set_ylabel("decode tok/s")
    ax.set_title("decode speed per device")
    ax.legend(fontsize=8)
    return fig


def sweep_chart(devices: list[dict]):
    """Decode tok/s against thread count, one line per model and device (only when a sweep was run)."""
    from matplotlib.figure import Figure

    lines = [(f"{d['target']}: {r['name']}", r["sweep"]) for d in devices for r in d["rows"]
             if len(r.get("sweep") or []) > 1]
    if not lines:
        return None
    fig = Figure(figsize=(6.5, 3.8))
    ax = fig.add_subplot()
    for label, sweep in lines:
        pts = sorted((e["threads"], e["decode_tps"]) for e in sweep if _num(e.get("decode_tps")))
        ax.plot([t for t, _ in pts], [v for _, v in pts], marker="o", label=label)
    ax.set_xticks(sorted({e["threads"] for _, sweep in lines for e in sweep}))
    ax.set_xlabel("threads")
    ax.set_ylabel("decode tok/s")
    ax.set_title("thread sweep")
    ax.legend(fontsize=7)
    return fig


def history_chart(history: list[dict]):
    """Decode tok/s and bits per byte of each model across earlier reports (two or more)."""
    from matplotlib.figure import Figure

    if len(history) < 2:
        return None
    labels = [f"{h['run']}\n{h['created'][5:16].replace('T', ' ')}" for h in history]
    names = list(dict.fromkeys(r["name"] for h in history for r in h["rows"]))
    fig = Figure(figsize=(12, 3.8))
    for i, (key, title) in enumerate((("decode_tps", "decode tok/s"), ("bpb", "bits per byte"))):
        ax = fig.add_subplot(1, 2, i + 1)
        for name in names:
            ys = [next((_num(r.get(key)) for r in h["rows"] if r["name"] == name), None) for h in history]
            ax.plot(range(len(history)), [math.nan if y is None else y for y in ys], marker="o", label=name)
        ax.set_xticks(range(len(history)), labels, fontsize=7)
        ax.set_title(f"{title} across runs")
    fig.axes[0].legend(fontsize=7)
    return fig


FRONT_TITLE = "Quality vs decode speed"


def front_chart(fr: dict):
    """Quality (mean acc_norm over the tasks, or bits per byte) against decode tok/s on the bench target, with the front
    of non-dominated models drawn through them."""
    from matplotlib.figure import Figure

    points, on = fr.get("points") or [], set(fr.get("front") or [])
    if not points:
        return None
    fig = Figure(figsize=(7.5, 4.6))
    ax = fig.add_subplot()
    line = sorted((p for p in points if p["key"] in on), key=lambda p: p["decode_tps"])
    ax.plot([p["decode_tps"] for p in line], [p["quality"] for p in line], "--", color="#c44e52", zorder=2,
            label="front (not dominated)")
    for p in points:
        ax.scatter(p["decode_tps"], p["quality"], s=80, zorder=3, color="#c44e52" if p["key"] in on else "#4c72b0")
        ax.annotate(p["name"], (p["decode_tps"], p["quality"]), textcoords="offset points", xytext=(5, 4), fontsize=8)
    if not fr.get("higher_is_better"):
        ax.invert_yaxis()  # up is better either way
    ax.margins(0.2)
    ax.legend(fontsize=8)
    where = f" on {fr['target']}" if fr.get("target") else ""
    ax.set_xlabel(f"decode tok/s{where}")
    tasks = ", ".join(fr.get("task_labels") or fr.get("tasks") or [])
    ax.set_ylabel(f"mean acc_norm ({tasks})" if fr.get("higher_is_better") else "bits per byte (lower is better)")
    ax.set_title("quality vs decode speed")
    return fig


def charts(report: dict) -> dict[str, str]:
    """Title -> base64 PNG, for the charts the data supports."""
    figs = {"Size, quality and latency per stage": stage_chart(report["rows"]) if report["rows"] else None,
            "Size vs quality vs speed": tradeoff_chart(report["rows"]),
            "Per device": device_chart(report.get("devices") or []),
            "Thread sweep": sweep_chart(report.get("devices") or []),
            "History across runs": history_chart(report.get("history") or [])}
    return {title: png(fig) for title, fig in figs.items() if fig is not None}


# --- HTML -----------------------------------------------------------------------------------------------------

def e(x: object) -> str:
    return html.escape(str(x))


def html_table(table: Table) -> str:
    """The model column as text, the figures right-aligned."""
    head = "<tr>" + "".join(f"<th>{e(h)}</th>" for h in table.header) + "</tr>"
    body = "".join("<tr><td>" + e(name) + "</td>" + "".join(f'<td class="n">{e(c)}</td>' for c in cells) + "</tr>"
                   for name, *cells in table.rows)
    return f"<table>{head}{body}</table>"


def notes_html(notes: list[str]) -> str:
    return "<ul>" + "".join(f"<li>{e(n)}</li>" for n in notes) + "</ul>" if notes else ""


def errors_html(failed: list[tuple[str, str]]) -> str:
    items = "".join(f"<li><b>{e(name)}</b> failed: {e(err)}</li>" for name, err in failed)
    return f'<ul class="err">{items}</ul>' if items else ""


DEVICE_PARTS = {  # DeviceTable part -> HTML
    "heading": lambda target: f"<h3>{e(target)}</h3>",
    "summary": lambda summary: f"<p>{e(summary)}</p>",
    "error": lambda err: f'<p class="err"><b>device failed:</b> {e(err)}</p>',
    "warnings": lambda warnings: '<ul class="warn">' + "".join(f"<li>{e(w)}</li>" for w in warnings) + "</ul>",
    "table": html_table,
    "notes": notes_html,
    "failed": errors_html,
}


def devices_html(devices: list[DeviceTable]) -> str:
    return "".join(DEVICE_PARTS[part](content) for d in devices for part, content in d.parts())


def img(title: str, b64: str) -> str:
    return f'<h3>{e(title)}</h3><img alt="{e(title)}" src="data:image/png;base64,{b64}">'


def front_html(report: dict) -> str:
    """The front chart with the sentence placing the student under it, and the models left without accuracy."""
    fr = report.get("front") or {}
    fig = front_chart(fr)
    parts = [img(FRONT_TITLE, png(fig))] if fig is not None else []
    if sentence := verdict(fr):
        parts.append(f'<p class="front"><b>{e(sentence)}</b></p>')
    notes = "".join(f"<li>{e(note)}</li>" for note in eval_notes(report["rows"]))
    return "".join(parts) + (f'<ul class="warn">{notes}</ul>' if notes else "")


def zeroshot_html(report: dict) -> str:
    about = zeroshot_about(report.get("tasks") or {})
    return f"<p>{e(about)}; ± one standard error.</p>" + html_table(zeroshot_table(report))


def render_html(report: dict) -> str:
    """report.html from the gathered report (`report_gather.report_data`)."""
    imgs = "".join(img(t, b) for t, b in charts(report).items())
    bench, bench_failed = report.get("bench") or {}, failures(report["rows"], "bench_error")
    body = [
        "<h1>pistill report</h1>", html_table(models_table(report)), notes_html(speculative_notes(report["rows"])),
        errors_html(bench_failed),
        f"<p>benchmark target: {e(bench.get('target') or MISSING)}</p>",
        "<h2>Charts</h2>", front_html(report), imgs or "<p>no figures to chart</p>",
    ]
    if report.get("tasks"):
        body += ["<h2>Zero-shot accuracy</h2>", zeroshot_html(report)]
    if report.get("devices"):
        body += ["<h2>Devices</h2>", devices_html(device_tables(report["devices"]))]
    body += ["<h2>Recipe</h2>", f"<pre>{e(toml_block(report['recipe']))}</pre>"]
    return ("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>pistill report</title>"
            f"<style>{CSS}</style></head><body>{''.join(body)}</body></html>\n")
