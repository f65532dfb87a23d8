"""The report stage: rows from plain dicts, "–" for missing figures, and md/json from real artifact folders."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from pistill.artifact import ArtifactWriter, config_dict
from pistill.report import ReportConfig, run
from pistill.report_gather import build_rows, model_label, teacher_metrics
from pistill.report_md import markdown_table
from pistill.report_table import MISSING, cell, text_table
from tiny import named

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class FakeConfig:
    sparsity: float = 0.25
    method: str = "wanda"
    note: str | None = None


@dataclass(frozen=True)
class FakeONNXConfig:
    precision: str = "int4"


@dataclass(frozen=True)
class FakeGGUFConfig:
    outtype: str = "f16"
    quants: tuple[str, ...] = ("Q4_K_M", "Q8_0")


QUALITY = {
    "teacher": {"params": 1_500_000, "bytes": 6_000_000},
    "prune": {"params": 1_000_000, "bytes": 4_000_000, "bpb": 1.305, "ppl": 30.5, "agreement": 0.8, "kl": 0.25},
    "quantize": {"params": 1_000_000, "bytes": 1_000_000, "bpb": 1.31, "ppl": 31.0, "agreement": 0.75, "kl": 0.3},
    "distill": {"params": 1_000_000, "bytes": 4_000_000, "bpb": 1.28, "ppl": 28.0, "agreement": 0.85, "kl": 0.2},
    "gguf": {"params": 1_000_000, "bytes": 800_000, "bpb": 1.284, "ppl": 28.4, "agreement": 0.84, "kl": 0.21},
    "onnx": {"params": 1_000_000, "bytes": 900_000},  # no quality figures: "–"
}
BASELINE = [  # the baseline artifact's `models`: the teacher at the student's type, and at Q8_0
    {"key": "baseline", "format": "gguf", "file": "teacher-Q4_K_M.gguf", "quant": "Q4_K_M",
     "metrics": {"params": 1_500_000, "bytes": 1_200_000, "bpb": 1.26, "ppl": 26.0, "agreement": 0.9, "kl": 0.1}},
    {"key": "baseline:Q8_0", "format": "gguf", "file": "teacher-Q8_0.gguf", "quant": "Q8_0",
     "metrics": {"params": 1_500_000, "bytes": 2_000_000, "bpb": 1.252, "ppl": 25.2, "agreement": 0.97, "kl": 0.02}},
]
SPEEDS = {
    "teacher": {"prefill_tps": 100.0, "decode_tps": 20.0, "ttft_s": 0.25, "peak_rss_mb": 300.0, "load_s": 1.0},
    "gguf": {"prefill_tps": 400.0, "decode_tps": 80.0, "ttft_s": 0.05, "peak_rss_mb": 50.0, "load_s": 0.1},
    "prune": {"error": "agent: error: torch failed on x: OSError: boom"},
    "distill": {"prefill_tps": 90.0, "decode_tps": 15.0, "ttft_s": 0.3, "peak_rss_mb": 250.0, "load_s": 1.0},
    "baseline": {"prefill_tps": 300.0, "decode_tps": 60.0, "ttft_s": 0.07, "peak_rss_mb": 60.0, "load_s": 0.1},
    "baseline:Q8_0": {"prefill_tps": 250.0, "decode_tps": 40.0, "ttft_s": 0.08, "peak_rss_mb": 80.0, "load_s": 0.1},
}
RUNTIMES = {"teacher": "torch", "distill": "torch", "gguf": "llama_cpp", "baseline": "llama_cpp",
            "baseline:Q8_0": "llama_cpp"}


def zs(arc, piqa, se=0.022):
    return {"arc_easy": {"n": 500, "acc": arc + 0.01, "acc_stderr": se, "acc_norm": arc, "acc_norm_stderr": se},
            "piqa": {"n": 500, "acc": piqa, "acc_stderr": se, "acc_norm": piqa, "acc_norm_stderr": se - 0.001}}


EVAL = {"schema_version": 1,
        "tasks": {"arc_easy": {"label": "ARC-Easy", "source": "arc_easy.jsonl", "n": 500, "chance": 0.25},
                  "piqa": {"label": "PIQA", "source": "piqa.jsonl", "n": 500, "chance": 0.5}},
        "models": {"teacher": {"tasks": zs(0.60, 0.66)}, "baseline": {"tasks": zs(0.45, 0.65)},
                   "baseline:Q8_0": {"tasks": zs(0.50, 0.66)}, "prune": {"tasks": zs(0.30, 0.52)},
                   "quantize": {"skipped": "bitsandbytes weights without CUDA"}, "distill": {"tasks": zs(0.38, 0.55)},
                   "gguf": {"tasks": zs(0.40, 0.60)}, "onnx": {"error": "ValueError: broken"}}}


def write_artifact(root, stage, parents, metrics, cfg=None, model=None, files=None):
    with ArtifactWriter(root / stage, stage, cfg or FakeConfig(), parents) as w:
        for name, text in (files or {}).items():
            (w.dir / name).write_text(text)
        w.metrics.update(metrics)
        w.model = model
    return w.artifact


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """Fake-but-real artifacts teacher ... bench, without any model weights."""
    root = tmp_path_factory.mktemp("runs")
    teacher = write_artifact(root, "teacher", [], QUALITY["teacher"], model={"format": "hf", "file": "."})
    data = write_artifact(root, "data", [teacher], {"teacher_ppl": 25.0, "teacher_bpb": 1.25, "n_tokens": 1000})
    arts = [teacher, data]
    for stage, fmt in (("prune", "hf"), ("quantize", "hf"), ("distill", "hf"), ("gguf", "gguf"),
                       ("onnx", "onnx")):
        cfg = {"gguf": FakeGGUFConfig(), "onnx": FakeONNXConfig()}.get(stage)
        arts.append(write_artifact(root, stage, [arts[-1]], QUALITY[stage], cfg, {"format": fmt, "file": "m"}))
    with ArtifactWriter(root / "baseline", "baseline", FakeConfig(), [teacher]) as w:
        w.model, w.models = {"format": "gguf", "file": BASELINE[0]["file"]}, BASELINE
        w.metrics.update(BASELINE[0]["metrics"])
    arts.append(w.artifact)
    bench_json = {s: {**v, "runtime": {"name": RUNTIMES[s], "version": "2.x"}} if "error" not in v else v
                  for s, v in SPEEDS.items()}
    bench_json["teacher"]["host"] = {"hostname": "pi5", "machine": "aarch64", "cores": 4, "python": "3.11"}
    arts.append(write_artifact(root, "bench", arts[:1] + arts[2:], {}, files={"bench.json": json.dumps(bench_json)}))
    arts.append(write_artifact(root, "eval", arts[:1] + arts[2:-1], {}, files={"eval.json": json.dumps(EVAL)}))
    return arts


@pytest.mark.parametrize("value, expected", [
    (None, MISSING), ("12", MISSING), (float("nan"), MISSING), (float("inf"), MISSING), (True, MISSING),
    (12.345, "12.35"), (3, "3.00"),
])
def test_cell(value, expected):
    assert cell(value, lambda v: f"{v:.2f}") == expected


def test_teacher_ppl_prefers_teacher_then_data():
    assert teacher_metrics({"ppl": 9.0}, {"teacher_ppl": 25.0}) == {"ppl": 9.0, "bpb": None, "agreement": 1.0,
                                                                    "kl": 0.0}
    assert teacher_metrics({}, {"teacher_bpb": 1.1})["bpb"] == 1.1
    assert teacher_metrics({"agreement": 0.99}, {})["agreement"] == 0.99  # a measured figure wins
    assert teacher_metrics({}, {"teacher_ppl": 25.0})["ppl"] == 25.0
    assert teacher_metrics({}, {"ppl": 24.0})["ppl"] == 24.0
    assert teacher_metrics({}, {})["ppl"] is None


def test_build_rows_order_values_and_missing():
    labels = {"gguf": "student GGUF Q4_K_M"}
    metrics = {s: QUALITY[s] for s in ("onnx", "teacher", "gguf")}  # order comes from the pipeline, not the dict
    rows = build_rows(metrics, labels, SPEEDS)
    assert [r["stage"] for r in rows] == ["teacher", "gguf", "onnx"]
    assert rows[1]["name"] == "student GGUF Q4_K_M" and rows[1]["decode_tps"] == 80.0
    assert rows[2]["ppl"] is None and rows[2]["decode_tps"] is None
    table = markdown_table(text_table(rows)).splitlines()
    assert len(table) == 2 + 3
    assert table[2].startswith("| teacher | 1.5M | 6.0 | – | – | – | – | 100.0 | 20.0 | – | 250 | 300 |")
    assert table[4] == "| onnx | 1.0M | 0.9 | – | – | – | – | – | – | – | – | – |"  # params and size only


def test_failed_bench_shows_missing_speeds():
    row = build_rows({"prune": QUALITY["prune"]}, {}, SPEEDS)[0]
    assert row["bench_error"].endswith("boom") and row["prefill_tps"] is None
    assert markdown_table(text_table([row])).splitlines()[2].endswith("| – | – | – | – |")


def test_labels():
    assert model_label("gguf", {"config": {"quants": ["Q4_K_S"]}}) == "student GGUF Q4_K_S"
    assert model_label("gguf", {}) == "student GGUF"
    assert model_label("quantize", {}) == "quantized teacher"
    assert model_label("onnx", {"config": {"precision": "fp32"}}) == "student ONNX fp32"
    assert model_label("onnx", {}) == "student ONNX"


def test_report_md_and_json(pipeline, tmp_path):
    art = run(named(pipeline), ReportConfig(formats=["md", "json"]), tmp_path / "report")  # html: test_report_html.py
    report, md = json.loads(art.file("report.json").read_text()), art.file("report.md").read_text()
    assert report["schema_version"] == 3
    assert [r["name"] for r in report["rows"]] == ["teacher", "teacher GGUF Q4_K_M", "teacher GGUF Q8_0", "pruned",
                                                    "quantized teacher", "student", "student GGUF Q4_K_M",
                                                    "student ONNX int4"]
    assert [r["key"] for r in report["rows"]][1:3] == ["baseline", "baseline:Q8_0"]
    teacher = report["rows"][0]
    assert teacher["ppl"] == 25.0 and teacher["decode_tps"] == 20.0
    assert report["recipe"]["prune"]["sparsity"] == 0.25 and report["recipe"]["gguf"]["quants"][0] == "Q4_K_M"
    assert [s["stage"] for s in report["stages"]] == [a.stage for a in pipeline]
    assert report["stages"][0]["environment"]["python"] and "| teacher | 0.0 s | cpu |" in md
    assert "python" in report["versions"]
    assert report["bench"]["host"]["hostname"] == "pi5" and "prune" in report["bench"]["errors"]
    assert ("| model | params | size (MB) | bits/byte | ppl | agree (%) | KL | ARC-Easy acc_norm | PIQA acc_norm | "
            "prefill tok/s | decode tok/s | × teacher | TTFT (ms) | peak RSS (MB) |") in md
    assert ("| teacher | 1.5M | 6.0 | 1.250 | 25.00 | 100.0 | 0.000 | 0.600 ± 0.022 | 0.660 ± 0.021 | 100.0 | 20.0 "
            "| – |") in md
    assert ("| student GGUF Q4_K_M | 1.0M | 0.8 | 1.284 | 28.40 | 84.0 | 0.210 | 0.400 ± 0.022 | 0.600 ± 0.021 | 400.0 "
            "| 80.0 | 1.33 | 50 | 50 |") in md  # against the teacher's Q4_K_M file, not the torch teacher
    assert ("| teacher GGUF Q8_0 | 1.5M | 2.0 | 1.252 | 25.20 | 97.0 | 0.020 | 0.500 ± 0.022 | 0.660 ± 0.021 "
            "| 250.0 |") in md
    assert ("| student | 1.0M | 4.0 | 1.280 | 28.00 | 85.0 | 0.200 | 0.380 ± 0.022 | 0.550 ± 0.021 | 90.0 | 15.0 "
            "| 0.75 |") in md
    assert "| student ONNX int4 | 1.0M | 0.9 | – | – | – | – | – | – | – | – | – | – | – |" in md  # no ONNX teacher
    rows = {r["key"]: r for r in report["rows"]}
    assert rows["gguf"]["speedup_vs"] == "teacher GGUF Q4_K_M" and rows["distill"]["speedup_vs"] == "teacher"
    assert rows["gguf"]["zeroshot"]["arc_easy"] == EVAL["models"]["gguf"]["tasks"]["arc_easy"]
    assert rows["quantize"]["eval_note"].startswith("bitsandbytes") and rows["onnx"]["eval_note"].endswith("broken")
    assert report["tasks"]["piqa"]["chance"] == 0.5
    assert [c["key"] for c in report["columns"]][5:8] == ["kl", "zeroshot.arc_easy.acc_norm",
                                                         "zeroshot.piqa.acc_norm"]
    sentence = ("the student is 33% faster than the teacher's Q4_K_M at 5.0 points lower accuracy, keeping 71% of "
                "its accuracy above chance (mean acc_norm over ARC-Easy and PIQA 0.500 against 0.550; decode 80.0 "
                "against 60.0 tok/s, student GGUF Q4_K_M against teacher GGUF Q4_K_M)")
    assert report["front"]["sentence"] == sentence and "## Quality vs speed\n\nT" + sentence[1:] + "." in md
    assert report["front"]["front"] == ["teacher", "baseline", "baseline:Q8_0", "gguf"]  # distill: dominated
    assert ("Front of non-dominated models (mean acc_norm against decode tok/s): teacher, teacher GGUF Q4_K_M, "
            "teacher GGUF Q8_0, student GGUF Q4_K_M.") in md
    assert "- quantized teacher: no zero-shot figures: bitsandbytes weights without CUDA" in md
    assert "## Zero-shot accuracy" in md and "ARC-Easy: 500 items of arc_easy.jsonl (chance 0.250)" in md
    assert "| student GGUF Q4_K_M | 0.410 ± 0.022 | 0.400 ± 0.022 | 0.600 ± 0.022 | 0.600 ± 0.021 |" in md
    assert "[prune]\nversion = 1\nsparsity = 0.25\nmethod = \"wanda\"\n# note = none" in md
    assert "pi5 (aarch64, 4 cores" in md and "**prune failed**" in md
    assert art.metrics["rows"] == 8


def test_report_without_bench_or_data(pipeline, tmp_path):
    """A partial pipeline still reports: no data, bench or eval -> no teacher ppl, speeds or accuracy, no crash."""
    partial = [a for a in pipeline if a.stage not in ("data", "bench", "onnx", "eval")]
    art = run(named(partial), ReportConfig(formats=["md"]), tmp_path / "report")
    assert not art.file("report.json").exists()
    md = art.file("report.md").read_text()
    assert "| teacher | 1.5M | 6.0 | – | – | 100.0 | 0.000 | – | – | – | – | – |" in md and "ONNX" not in md
    assert "No student GGUF and teacher GGUF of the same type" in md and "## Zero-shot accuracy" not in md


@pytest.mark.parametrize("formats", [[], ["pdf"], ["md", "pdf"]])
def test_config_rejects_bad_formats(formats):
    with pytest.raises(ValueError, match="subset"):
        ReportConfig(formats=formats)


@pytest.mark.parametrize("cfg", [ReportConfig(), ReportConfig(formats=["json"]),
                                 ReportConfig(formats=["html", "md"], history=False)])
def test_config_round_trip(cfg):
    d = config_dict(cfg)
    assert d.pop("version") == ReportConfig.VERSION
    assert ReportConfig(**d) == cfg and dataclasses.asdict(cfg) == d


def test_same_figures_finds_a_changed_figure_and_ignores_speeds(tmp_path):
    """bench/same_figures.py: the before/after check of a refactor (size and quality per row; speeds vary)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("same_figures", ROOT / "bench" / "same_figures.py")
    sf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sf)
    row = {"name": "student", "params": 10, "bytes": 40, "ppl": 31.0, "agreement": 0.5, "kl": 0.2,
           "decode_tps": 100.0, "zeroshot": {"piqa": {"n": 20, "acc": 0.6, "acc_norm": 0.55}}}
    for name, rows in (("a", [row]), ("b", [{**row, "decode_tps": 90.0}]),
                       ("c", [{**row, "zeroshot": {"piqa": {"n": 20, "acc": 0.6, "acc_norm": 0.5}}}])):
        (tmp_path / name / "report").mkdir(parents=True)
        (tmp_path / name / "report" / "report.json").write_text(json.dumps({"rows": rows}))
    assert sf.main([str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    assert sf.compare(sf.read_rows(tmp_path / "a"), sf.read_rows(tmp_path / "c")) == [
        "student: piqa.acc_norm 0.55 -> 0.5"]
    assert sf.main([str(tmp_path / "a"), str(tmp_path / "missing")]) == 2


SPECULATIVE = {  # the agent's JSON with --draft: the teacher's Q4_K_M file with the student GGUF as its draft
    "prefill_tps": 280.0, "decode_tps": 90.0, "ttft_s": 0.09, "peak_rss_mb": 110.0, "load_s": 0.2,
    "runtime": {"name": "llama_cpp", "version": "2.x"}, "model": {"path": "teacher-Q4_K_M.gguf", "bytes": 1_200_000},
    "speculative": {"acceptance_rate": 0.6, "alpha": 0.7, "mean_accepted": 2.4, "tokens_per_step": 3.4, "mean_k": 4.0,
                    "draft": {"path": "m", "bytes": 800_000}}}


def with_speculative(pipeline, tmp_path, result: dict) -> list:
    """The fake pipeline with a bench artifact whose bench.json also holds `result` under "speculative"."""
    old = next(a for a in pipeline if a.stage == "bench")
    speeds = {**json.loads(old.file("bench.json").read_text()), "speculative": result}
    bench = write_artifact(tmp_path, "bench", [], {}, files={"bench.json": json.dumps(speeds)})
    return [a for a in pipeline if a.stage != "bench"] + [bench]


def test_speculative_row(pipeline, tmp_path):
    """The last row: its own speeds, × teacher over the teacher's file of the student's type, the teacher file's
    quality (its output is that file's), both files' size; its acceptance in a note under the table; the front."""
    art = run(named(with_speculative(pipeline, tmp_path, SPECULATIVE)), ReportConfig(formats=["md", "json"]),
              tmp_path / "report")
    report, md = json.loads(art.file("report.json").read_text()), art.file("report.md").read_text()
    row = report["rows"][-1]
    assert row["key"] == "speculative" and row["speculative"] == SPECULATIVE["speculative"]
    assert row["speedup"] == 1.5 and row["speedup_vs"] == row["quality_from"] == "teacher GGUF Q4_K_M"
    assert ("| teacher GGUF Q4_K_M + student draft (speculative) | – | 2.0 | 1.260 | 26.00 | 90.0 | 0.100 | 0.450 ± 0.022 | "
            "0.650 ± 0.021 | 280.0 | 90.0 | 1.50 | 90 | 110 |") in md
    assert ("\n\n- teacher GGUF Q4_K_M + student draft (speculative): the teacher file decodes greedily, the student "
            "GGUF proposing its tokens; 0.60 of the drafted tokens accepted (alpha 0.70), mean accepted length 2.40 "
            "draft tokens and 3.40 tokens out per teacher pass (mean k 4.0); × teacher is over teacher GGUF Q4_K_M "
            "alone. Its output is teacher GGUF Q4_K_M's, so its quality cells are that file's; its size is both "
            "files.\n\n## Quality vs speed") in md
    assert report["front"]["front"] == ["teacher", "baseline:Q8_0", "speculative"]  # the teacher's quality, faster
    assert report["front"]["sentence"].startswith("the student is 33% faster than the teacher's Q4_K_M")


def test_speculative_row_error(pipeline, tmp_path):
    """A bench that could not pair the files: the row shows its reason, no note, no crash."""
    error = ("speculative: no teacher GGUF Q4_K_M (the student GGUF's type) to verify the drafts; there is no "
             "baseline artifact: run the baseline stage with \"student\" in [baseline] quants")
    art = run(named(with_speculative(pipeline, tmp_path, {"error": error})), ReportConfig(formats=["md", "json"]),
              tmp_path / "report")
    row = json.loads(art.file("report.json").read_text())["rows"][-1]
    assert row["bench_error"] == error and row["decode_tps"] is None and row["speculative"] is None
    md = art.file("report.md").read_text()
    assert f"- **speculative failed**: {error}" in md and "drafted tokens accepted" not in md
    assert "| teacher GGUF Q4_K_M + student draft (speculative) | – | – | 1.260 | 26.00 |" in md


def test_damaged_sibling_reports_are_skipped_with_a_warning(pipeline, tmp_path, caplog):
    """A sibling run's report.json that is not UTF-8, not a JSON object, or holds broken snapshots does not stop this
    run's report: each is skipped with a warning naming it; a good sibling's history is still read."""
    from pistill.report_gather import snapshot

    runs = tmp_path / "runs"
    good = snapshot(runs / "good", [{"key": "gguf", "stage": "gguf", "name": "student GGUF"}], "2020-01-01T00:00:00Z")
    broken = {**snapshot(runs / "snap", [], "2020-01-02T00:00:00Z"), "rows": "x"}  # where a list of rows belongs
    siblings = {"binary": b"\xff\xfe\x00 not utf-8", "list": b"[1, 2]", "nohistory": b'{"history": "x"}',
                "snap": json.dumps({"history": [broken]}).encode(), "good": json.dumps({"history": [good]}).encode()}
    for name, body in siblings.items():
        (runs / name / "report").mkdir(parents=True)
        (runs / name / "report" / "report.json").write_bytes(body)
    art = run(named(pipeline), ReportConfig(formats=["json"]), runs / "mine" / "report")
    hist = json.loads(art.file("report.json").read_text())["history"]
    assert [h["run"] for h in hist] == ["good", "mine"]  # the broken snapshot is left out, the good one kept
    warned = {r.getMessage() for r in caplog.records if r.levelname == "WARNING"}
    for name in ("binary", "list", "nohistory"):
        path = runs / name / "report" / "report.json"
        assert any(m.startswith(f"report: skipped {path} in the history (") for m in warned), (name, warned)
