"""The report stage: one table lining up every model's size, quality and speed, plus the recipe that made them.

Gathers the figures from every artifact of the pipeline (`report_gather`), then writes them as Markdown
(`report_md`), JSON, and one self-contained HTML file with charts (`report_html`); both documents lay out the same
tables (`report_table`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from .artifact import Artifact, ArtifactWriter
from .report_gather import report_data
from .report_html import render_html
from .report_md import render_markdown

FORMATS = ("md", "json", "html")


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


RENDERERS = {  # format -> (file, the gathered report as that file's text)
    "md": ("report.md", render_markdown),
    "json": ("report.json", lambda report: json.dumps(report, indent=2) + "\n"),
    "html": ("report.html", render_html),
}


def run(inputs: Mapping[str, Artifact], cfg: ReportConfig, out: Path) -> Artifact:
    """Write report.md / report.json / report.html from every artifact of the pipeline (teacher ... bench)."""
    with ArtifactWriter(out, "report", cfg, inputs) as w:
        report = report_data(inputs, out, cfg.history)
        for fmt in FORMATS:
            if fmt in cfg.formats:
                name, render = RENDERERS[fmt]
                (w.dir / name).write_text(render(report), encoding="utf-8")
        w.metrics["rows"] = len(report["rows"])
    return w.artifact
