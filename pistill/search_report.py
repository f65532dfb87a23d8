"""`pistill search`'s report: the chosen model, the teacher's own files, every trial with its predicted and measured
speed, the predictor's error, and (HTML) the front: quality against decode speed, peak memory as colour."""

from __future__ import annotations

import html

from .report_html import png
from .report_table import cell


def _f(v, spec: str = ".1f") -> str:
    """A figure in `spec`, or "–" when missing or not finite."""
    return cell(v, lambda x: format(x, spec))


def _pct(v) -> str:
    return f"{v * 100:+.0f}%" if isinstance(v, (int, float)) else "–"


def _acc(q: dict | None) -> str:
    tasks = (q or {}).get("tasks") or {}
    if not tasks:
        return "–"
    return " / ".join(f"{t['acc_norm']:.3f}±{_f(t.get('stderr'), '.3f')}" for t in tasks.values())


def mean_abs(rows: list[dict], key: str) -> float | None:
    errs = [abs(e) for r in rows if (e := (r.get("prediction_error") or {}).get(key)) is not None]
    return sum(errs) / len(errs) if errs else None


def budget_text(cfg: dict) -> str:
    parts = []
    if cfg["min_decode_tok_s"]:
        parts.append(f"decode ≥ {cfg['min_decode_tok_s']:g} tok/s")
    if cfg["max_memory_mb"]:
        parts.append(f"peak memory ≤ {cfg['max_memory_mb']:g} MB")
    return " and ".join(parts) or "none"


def tables(doc: dict) -> dict[str, list[list[str]]]:
    """The report's tables as rows of cells (first row: the header)."""
    chosen, front = doc["chosen"], set(doc["front"])
    refs = [["model", "file MB", *[f"decode tok/s ({t} thr)" for t in doc["space"]["threads"]], "peak MB",
             "bits/byte", "held-out ppl", "acc_norm per task"]]
    for r in doc["references"]:
        ms = r["measured"]
        speeds = [_f(ms[str(t)].get("decode_tps")) for t in doc["space"]["threads"]]
        refs.append([r["name"], _f(r["bytes"] / 1e6), *speeds,
                     _f(max((m.get("peak_rss_mb") or 0) for m in ms.values()), ".0f"),
                     _f((r["quality"] or {}).get("bpb"), ".3f"), _f((r["quality"] or {}).get("ppl"), ".2f"),
                     _acc(r["quality"])])
    trials = [["#", "layers", "MLP", "vocab", "mend", "type", "thr", "params M", "MB pred / meas",
               "decode pred / meas (err)", "prefill pred / meas", "peak MB pred / meas", "bits/byte", "ppl", "KL",
               "acc_norm per task", "result"]]
    for r in doc["trials"]:
        p, pr, m, q = r["params"], r["predicted"] or {}, r["measured"] or {}, r["quality"] or {}
        err = (r.get("prediction_error") or {}).get("decode_tps")
        if r["state"] == "complete":
            mark = "**chosen**" if r["number"] == chosen else ("front" if r["number"] in front else "")
            result = ", ".join(x for x in (mark, "within budget" if r.get("within") else "misses budget") if x)
        else:
            result = r.get("skipped") or r.get("error") or r["state"]
        trials.append([str(r["number"]), str(p.get("n_layer", "–")), _f(p.get("ffn_ratio"), ".3g"),
                       str(p.get("vocab", "all")), str(p.get("mend", "–")), str(p.get("quant", "–")),
                       str(p.get("threads", "–")),
                       _f((r.get("sizes") or {}).get("params", 0) / 1e6), f"{_f((pr.get('bytes') or 0) / 1e6)} / "
                       f"{_f((r.get('bytes') or 0) / 1e6) if r.get('bytes') else '–'}",
                       f"{_f(pr.get('decode_tps'))} / {_f(m.get('decode_tps'))} ({_pct(err)})",
                       f"{_f(pr.get('prefill_tps'), '.0f')} / {_f(m.get('prefill_tps'), '.0f')}",
                       f"{_f(pr.get('peak_rss_mb'), '.0f')} / {_f(m.get('peak_rss_mb'), '.0f')}",
                       _f(q.get("bpb"), ".3f"), _f(q.get("ppl"), ".2f"), _f(q.get("kl"), ".3f"), _acc(q),
                       result])
    return {"references": refs, "trials": trials}


OBJECTIVE_TEXT = {"bpb": "held-out bits per byte of the file", "ppl": "held-out perplexity of the file",
                  "accuracy": "mean zero-shot acc_norm"}


def summary_lines(doc: dict) -> list[str]:
    cfg, rows = doc["config"], doc["trials"]
    done = [r for r in rows if r["state"] == "complete"]
    skipped = [r for r in rows if r.get("skipped", "") and r["skipped"].startswith("predicted")]
    lines = [f"- Target: {', '.join(doc['targets'])}; budget: {budget_text(cfg)}; objective: "
             f"{OBJECTIVE_TEXT.get(doc['objective'], doc['objective'])}.",
             f"- Trials: {len(done)} measured, {len(skipped)} skipped on the prediction, "
             f"{sum(r['state'] == 'fail' for r in rows)} failed; each healed with {cfg['steps']} distillation steps."]
    errs = {k: mean_abs(done, k) for k in ("bytes", "decode_tps", "prefill_tps", "peak_rss_mb")}
    lines.append("- Predictor, mean absolute error over the measured trials (each predicted before it was built, "
                 "from the points measured until then): " + ", ".join(
                     f"{name} {_f(v * 100 if v is not None else None, '.1f')}%" for name, v in
                     (("file bytes", errs["bytes"]), ("decode", errs["decode_tps"]), ("prefill", errs["prefill_tps"]),
                      ("peak memory", errs["peak_rss_mb"]))) + ".")
    chosen = next((r for r in rows if r["number"] == doc["chosen"]), None)
    if chosen is None:
        lines.append("- **No measured trial meets the budget.** Loosen it, or widen the space.")
    else:
        m, c = chosen["measured"], chosen.get("confirm") or {}
        again = (f"; benchmarked again: decode {_f(c.get('decode_tps'))} tok/s, peak "
                 f"{_f(c.get('peak_rss_mb'), '.0f')} MB") if c else ""
        p = chosen["params"]
        lines.append(f"- **Chosen: trial #{chosen['number']}**: {p['n_layer']} layers, MLP {p['ffn_ratio']:g}, "
                     f"{p['quant']}, {p['threads']} thread{'s' if p['threads'] > 1 else ''}; decode "
                     f"{_f(m['decode_tps'])} tok/s, peak {_f(m['peak_rss_mb'], '.0f')} MB, "
                     f"held-out {_f(chosen['quality'].get('bpb'), '.3f')} bits per byte (ppl "
                     f"{_f(chosen['quality'].get('ppl'), '.2f')}){again}. Recipe: `{doc['best_recipe']}` "
                     f"(`pistill run {doc['best_recipe']}` builds it again, with the full report).")
    return lines


def _md_table(rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    return out + ["| " + " | ".join(c.replace("|", "/") for c in r) + " |" for r in rows[1:]]


def render_md(doc: dict) -> str:
    t = tables(doc)
    lines = [f"# pistill search: {doc['recipe'] or 'recipe'}", "", *summary_lines(doc), "",
             "## The teacher's own files (same runtime, device and measurement)", "", *_md_table(t["references"]),
             "", "## Trials", "", "Predictions were made before each trial was built; `err` is (predicted - measured) "
             "/ measured decode speed.", "", *_md_table(t["trials"]), ""]
    return "\n".join(lines)


# --- HTML -------------------------------------------------------------------------------------------------------

def front_chart(doc: dict):
    """Quality (y) against decode tok/s (x) for every measured trial, coloured by peak memory; the teacher's files
    as crosses, the budget as a line, the chosen trial ringed."""
    from matplotlib.figure import Figure

    key = doc["objective"]
    ppl = key in ("bpb", "ppl")  # lower is better
    done = [r for r in doc["trials"] if r["state"] == "complete" and (r["quality"] or {}).get(key) is not None]
    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    if done:
        sc = ax.scatter([r["measured"]["decode_tps"] for r in done], [r["quality"][key] for r in done],
                        c=[r["measured"].get("peak_rss_mb") or 0 for r in done], cmap="viridis", s=40, zorder=3)
        fig.colorbar(sc, ax=ax, label="peak memory (MB)")
        for r in done:
            ax.annotate(f"#{r['number']}", (r["measured"]["decode_tps"], r["quality"][key]), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
        front = sorted((r for r in done if r["number"] in doc["front"]), key=lambda r: r["measured"]["decode_tps"])
        ax.plot([r["measured"]["decode_tps"] for r in front], [r["quality"][key] for r in front], "k--", lw=0.8,
                label="front")
        for r in done:
            if r["number"] == doc["chosen"]:
                ax.scatter([r["measured"]["decode_tps"]], [r["quality"][key]], s=160, facecolors="none",
                           edgecolors="red", zorder=4, label="chosen")
    t0 = str(doc["space"]["threads"][0])
    for i, r in enumerate(doc["references"]):
        m = r["measured"].get(t0) or {}
        if m.get("decode_tps") and (r["quality"] or {}).get(key) is not None:
            ax.scatter([m["decode_tps"]], [r["quality"][key]], marker="x", color="black", zorder=3)
            ax.annotate(r["name"], (m["decode_tps"], r["quality"][key]), fontsize=7, xytext=(4, 4 + 9 * i),
                        textcoords="offset points")  # the teacher's files sit close together: labels stacked
    if doc["config"]["min_decode_tok_s"]:
        ax.axvline(doc["config"]["min_decode_tok_s"], color="red", lw=0.8, ls=":", label="budget")
    ax.set_xlabel("decode tok/s (measured on the target)")
    ax.set_ylabel(f"held-out {OBJECTIVE_TEXT[key].split(' of ')[0].replace('held-out ', '')} (lower is better)"
                  if ppl else "mean acc_norm")
    if ppl:
        from matplotlib.ticker import FuncFormatter

        ax.set_yscale("log")  # a pruned model's perplexity spans decades
        ax.invert_yaxis()
        for axis in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
            axis(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.legend(fontsize=7, loc="best")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def prediction_chart(doc: dict):
    """Predicted against measured decode tok/s for every measured trial (the diagonal is a perfect prediction)."""
    from matplotlib.figure import Figure

    pts = [(r["measured"]["decode_tps"], r["predicted"]["decode_tps"]) for r in doc["trials"]
           if r["state"] == "complete" and (r["predicted"] or {}).get("decode_tps")]
    fig = Figure(figsize=(4.5, 4.5))
    ax = fig.add_subplot()
    if pts:
        ax.scatter(*zip(*pts), zorder=3)
        lo, hi = min(min(p) for p in pts) * 0.9, max(max(p) for p in pts) * 1.1
        ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
    ax.set_xlabel("measured decode tok/s")
    ax.set_ylabel("predicted before the trial was built")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def _html_table(rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c).replace('**', '')}</td>" for c in r) + "</tr>"
                   for r in rows[1:])
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def render_html(doc: dict) -> str:
    t = tables(doc)
    items = "".join(f"<li>{html.escape(line[2:]).replace('**', '')}</li>" for line in summary_lines(doc))
    return ("<!doctype html><html><head><meta charset='utf-8'><title>pistill search</title><style>"
            "body{font-family:sans-serif;margin:2em;max-width:1300px}table{border-collapse:collapse;font-size:12px}"
            "td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}th{background:#eee}</style></head><body>"
            f"<h1>pistill search: {html.escape(doc['recipe'] or 'recipe')}</h1><ul>{items}</ul>"
            f"<h2>Quality against speed</h2><img alt='front' src='data:image/png;base64,{png(front_chart(doc))}'>"
            f"<img alt='predicted vs measured' src='data:image/png;base64,{png(prediction_chart(doc))}'>"
            f"<h2>The teacher's own files</h2>{_html_table(t['references'])}"
            f"<h2>Trials</h2>{_html_table(t['trials'])}</body></html>\n")
