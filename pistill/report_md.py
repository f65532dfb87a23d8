"""The report as Markdown: the tables of `report_table`, the recipe as TOML, and the stages, versions and bench host."""

from __future__ import annotations

from .report_table import (MISSING, DeviceTable, Table, busy_warning, device_tables, eval_notes, models_table,
                           speculative_notes, toml_block, verdict, zeroshot_about, zeroshot_table)


def markdown_table(table: Table) -> str:
    """The model column left-aligned, the figures right-aligned."""
    lines = ["| " + " | ".join(table.header) + " |", "|---|" + "---:|" * (len(table.header) - 1)]
    lines += ["| " + " | ".join(row) + " |" for row in table.rows]
    return "\n".join(lines)


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


def notes_markdown(notes: list[str]) -> str:
    return "\n".join(f"- {n}" for n in notes)


DEVICE_PARTS = {  # DeviceTable part -> Markdown
    "heading": lambda target: f"### {target}",
    "summary": str,
    "error": lambda err: f"**device failed**: {err}",
    "warnings": lambda warnings: "\n".join(f"- warning: {w}" for w in warnings),
    "table": markdown_table,
    "notes": notes_markdown,
    "failed": lambda failed: "\n\n".join(f"- **{name} failed**: {err}" for name, err in failed),
}


def devices_markdown(devices: list[DeviceTable]) -> str:
    return "\n\n".join(DEVICE_PARTS[part](content) for d in devices for part, content in d.parts())


def front_lines(report: dict) -> str:
    """The student GGUF against the teacher's file of its type in one sentence, the non-dominated models, and the
    models without zero-shot figures (why)."""
    fr = report.get("front") or {}
    names = {p["key"]: p["name"] for p in fr.get("points") or []}
    where = f" on {fr['target']}" if fr.get("target") else ""
    paras = [verdict(fr) or "No student GGUF and teacher GGUF of the same type with both speed and quality to compare."]
    if names:
        paras.append(f"Front of non-dominated models ({fr.get('quality')} against decode tok/s{where}): "
                     + ", ".join(names[k] for k in fr.get("front") or []) + ".")
    notes = [f"- {note}" for note in eval_notes(report["rows"])]
    return "\n\n".join(paras + (["\n".join(notes)] if notes else []))


def zeroshot_markdown(report: dict) -> str:
    return (f"{zeroshot_about(report.get('tasks') or {})}. Scored as lm-eval (sum of log p over each choice's tokens; "
            f"acc_norm per UTF-8 byte); ± one standard error.\n\n" + markdown_table(zeroshot_table(report)))


def render_markdown(report: dict) -> str:
    """report.md from the gathered report (`report_gather.report_data`)."""
    parts = ["# pistill report", markdown_table(models_table(report))]
    if notes := speculative_notes(report["rows"]):
        parts.append(notes_markdown(notes))
    parts += ["## Quality vs speed", front_lines(report)]
    if report.get("tasks"):
        parts += ["## Zero-shot accuracy", zeroshot_markdown(report)]
    parts += [
        "## Recipe", "```toml\n" + toml_block(report["recipe"]) + "\n```",
        "## Stages", stages_table(report["stages"]),
        "## Versions", versions_table(report["versions"]),
        "## Bench host", bench_lines(report["bench"]),
    ]
    if report.get("devices"):
        parts += ["## Devices", devices_markdown(device_tables(report["devices"]))]
    return "\n\n".join(parts) + "\n"
