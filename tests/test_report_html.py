"""The report's device section, history and self-contained HTML (looked at in headless Chromium)."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess

import pytest

from pistill.report import ReportConfig, run
from pistill.report_gather import device_report, device_row, history, report_data, snapshot
from pistill.report_html import render_html
from pistill.report_md import render_markdown
from pistill.report_table import device_tables
from test_report import pipeline, write_artifact  # noqa: F401 (fixture)
from tiny import named

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
PI5_FACTS = {"board": "Raspberry Pi 5 Model B Rev 1.0", "cpu": "Cortex-A76", "machine": "aarch64", "bits": 64,
             "cores": 4, "mem_total_mb": 8052.0, "os": "Debian GNU/Linux 12 (bookworm)", "asimddp": True,
             "python": {"version": "3.11.2"}}


def agent_result(decode_tps: float, prefill_tps: float, fmt: str | None = None) -> dict:
    """A schema-2 agent JSON, as a device would send it."""
    thermal = {"temp_c": 55.0, "cpu_mhz": 2400.0, "throttled": "0x0", "throttled_flags": []}
    r = {"schema_version": 2, "runtime": {"name": "llama_cpp", "version": "0.3.9"}, "threads": 4,
         "prefill_tps": prefill_tps, "decode_tps": decode_tps, "ttft_s": 0.05, "peak_rss_mb": 90.0, "load_s": 0.2,
         "decode_latency_ms": {"p50": 1e3 / decode_tps, "p95": 1.2e3 / decode_tps, "p99": 1.3e3 / decode_tps},
         "decode_bw_fraction": 0.42, "bandwidth": {"gbs": 5.0}, "thermal": {"before": thermal, "after": thermal},
         "sweep": [{"threads": 4, "prefill_tps": prefill_tps, "decode_tps": decode_tps},
                   {"threads": 1, "prefill_tps": prefill_tps / 3, "decode_tps": decode_tps / 2}]}
    return {**r, "device_format": fmt} if fmt else r


DEVICES = {
    "pi@pi5.local": {"facts": PI5_FACTS, "results": {"teacher": agent_result(10.0, 50.0, "as GGUF Q4_K_M"),
                                                    "gguf": agent_result(40.0, 200.0)}},
    "pi@pi4.local": {"facts": {"board": "Raspberry Pi 4 Model B", "asimddp": False},
                     "warnings": ["no ARM dot product (asimddp), as on a Pi 4: export Q4_K_M"],
                     "results": {"teacher": agent_result(5.0, 20.0, "as GGUF Q4_K_M"),
                                 "gguf": {"error": "agent: error: llama_cpp failed on m: boom"}}},
    "pi@pi3.local": {"error": "pi@pi3.local: cannot reach pi3.local:22: timed out", "results": {}},
}


@pytest.fixture(scope="module")
def fleet_run(pipeline, tmp_path_factory):  # noqa: F811 (fixture)
    """The fake pipeline with a bench artifact from a three-device fleet."""
    root = tmp_path_factory.mktemp("fleet-run")
    bench = write_artifact(root, "bench", pipeline[:1], {}, files={
        "bench.json": json.dumps(DEVICES["pi@pi5.local"]["results"]), "devices.json": json.dumps(DEVICES)})
    return [a for a in pipeline if a.stage != "bench"] + [bench]


def test_device_rows_and_speedup(fleet_run, tmp_path):
    report = report_data(named(fleet_run))
    pi5, pi4, pi3 = report["devices"]
    assert [d["target"] for d in report["devices"]] == list(DEVICES)
    teacher, student = pi5["rows"]
    assert teacher["speedup"] is None and student["speedup"] == pytest.approx(4.0)
    assert student["p99"] == pytest.approx(32.5) and student["decode_bw_fraction"] == 0.42
    assert teacher["device_format"] == "as GGUF Q4_K_M" and [s["threads"] for s in student["sweep"]] == [4, 1]
    assert pi4["rows"][1]["error"].endswith("boom") and pi3["error"].endswith("timed out") and pi3["rows"] == []
    assert pi5["facts"]["board"].startswith("Raspberry Pi 5") and pi5["python"] == "3.11.2"


def test_device_row_of_a_failed_model():
    assert device_row("baseline:Q8_0", "t", {"error": "x"}) == {"key": "baseline:Q8_0", "stage": "baseline",
                                                                 "name": "t", "error": "x"}


def test_device_speedup_is_against_the_teacher_file_of_the_same_type(fleet_run):
    """A device with the baseline files benched too: the student GGUF against the teacher's Q4_K_M file, the pruned
    model (converted on the device to Q4_K_M) too; the teacher converted to Q4_K_M is only the fallback."""
    results = {**DEVICES["pi@pi5.local"]["results"], "baseline": agent_result(20.0, 60.0),
               "baseline:Q8_0": agent_result(12.0, 40.0), "prune": agent_result(30.0, 100.0, "as GGUF Q4_K_M")}
    report = report_data(named(fleet_run))
    labels = {r["key"]: r["name"] for r in report["rows"]}
    kinds = {"gguf": "Q4_K_M", "baseline": "Q4_K_M", "baseline:Q8_0": "Q8_0"}
    rows = {r["key"]: r for r in device_report("pi5", {"results": results}, labels, kinds)["rows"]}
    assert list(rows) == ["teacher", "baseline", "baseline:Q8_0", "prune", "gguf"]
    assert rows["gguf"]["speedup"] == pytest.approx(2.0) and rows["prune"]["speedup"] == pytest.approx(1.5)
    assert rows["baseline:Q8_0"]["speedup"] is None and rows["teacher"]["speedup"] is None


def test_markdown_devices_section(fleet_run, tmp_path):
    md = run(named(fleet_run), ReportConfig(formats=["md"]), tmp_path / "report").file("report.md").read_text()
    assert "## Devices" in md and "### pi@pi5.local" in md and "Raspberry Pi 5 Model B Rev 1.0, Cortex-A76" in md
    assert "| teacher (as GGUF Q4_K_M) | 4 | 50.0 | 10.0 | – |" in md
    assert "| student GGUF Q4_K_M | 4 | 200.0 | 40.0 | 4.00 | 50 | 25.0 | 30.0 | 32.5 | 90 | 42 | 55 |" in md
    assert "**device failed**: pi@pi3.local: cannot reach" in md and "- **student GGUF Q4_K_M failed**" in md
    assert "- warning: no ARM dot product (asimddp), as on a Pi 4: export Q4_K_M" in md


def test_device_tables_are_what_both_documents_show(fleet_run):
    """One prepared table per device: the Markdown and the HTML lay out the same header and cells."""
    report = report_data(named(fleet_run))
    report["rows"] = report["rows"][:1]  # fewer charts to draw
    pi5, pi4, pi3 = device_tables(report["devices"])
    assert pi5.table.header[:5] == ("model", "threads", "prefill tok/s", "decode tok/s", "× teacher")
    assert pi5.table.rows[1][:5] == ("student GGUF Q4_K_M", "4", "200.0", "40.0", "4.00")
    assert pi4.failed == [("student GGUF Q4_K_M", "agent: error: llama_cpp failed on m: boom")]
    assert pi3.table is None and pi3.failed == [] and pi3.error.endswith("timed out")
    md, page = render_markdown(report), render_html(report)
    for row in pi5.table.rows + pi4.table.rows:
        assert "| " + " | ".join(row) + " |" in md
        assert f"<tr><td>{row[0]}</td>" + "".join(f'<td class="n">{c}</td>' for c in row[1:]) + "</tr>" in page


def test_history_across_reruns_and_sibling_runs(pipeline, tmp_path):  # noqa: F811 (fixture)
    runs = tmp_path / "runs"
    first = run(named(pipeline), ReportConfig(formats=["json"]), runs / "a" / "report")
    assert len(json.loads(first.file("report.json").read_text())["history"]) == 1
    run(named(pipeline), ReportConfig(formats=["json"]), runs / "b" / "report")  # a sibling run folder
    again = run(named(pipeline), ReportConfig(formats=["json"]), runs / "a" / "report")  # a rerun of a
    hist = json.loads(again.file("report.json").read_text())["history"]
    assert [h["run"] for h in hist].count("a") == 2 and [h["run"] for h in hist].count("b") == 1
    assert hist == sorted(hist, key=lambda h: h["created"])
    assert hist[-1]["rows"][6] == {"key": "gguf", "stage": "gguf", "name": "student GGUF Q4_K_M", "bytes": 800_000,
                                   "bpb": 1.284, "ppl": 28.4, "decode_tps": 80.0, "prefill_tps": 400.0}
    off = run(named(pipeline), ReportConfig(formats=["json"], history=False), runs / "c" / "report")
    assert json.loads(off.file("report.json").read_text())["history"] == []


def test_history_dedupes_snapshots(tmp_path):
    cur = snapshot(tmp_path / "run", [], "2026-01-02T00:00:00Z")
    (tmp_path / "run" / "report").mkdir(parents=True)
    (tmp_path / "run" / "report" / "report.json").write_text(json.dumps({"history": [cur, cur, "junk"]}))
    assert history(tmp_path / "run" / "report", cur) == [cur]


@pytest.fixture(scope="module")
def html_report(fleet_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("html") / "run" / "report"
    run(named(fleet_run), ReportConfig(), out)
    return run(named(fleet_run), ReportConfig(), out)  # a rerun: two history points to chart


def test_html_is_one_self_contained_file(html_report):
    page = html_report.file("report.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and "<script" not in page
    assert not re.search(r"""(src|href)=["']?(https?:|//|file:)""", page)  # nothing fetched from anywhere
    images = re.findall(r'<img alt="([^"]+)" src="data:image/png;base64,([^"]+)"', page)
    titles = [t for t, _ in images]
    assert titles == ["Quality vs decode speed", "Size, quality and latency per stage", "Size vs quality vs speed",
                      "Per device", "Thread sweep", "History across runs"]
    assert all(base64.b64decode(b).startswith(b"\x89PNG\r\n\x1a\n") for _, b in images)
    assert "× teacher" in page and "<td class=\"n\">4.00</td>" in page and "device failed" in page
    assert "pi@pi4.local" in page and "student GGUF Q4_K_M</b> failed" in page
    assert '<ul class="warn"><li>no ARM dot product' in page
    # the front chart, then the sentence under it (on pi5 the teacher converted to Q4_K_M is the reference)
    front = page.index('<img alt="Quality vs decode speed"')
    assert front < page.index('<p class="front"><b>The student is 300% faster than the teacher') < page.index(
        '<img alt="Size, quality and latency per stage"')
    assert "<h2>Zero-shot accuracy</h2>" in page and "0.400 ± 0.022" in page
    assert "quantized teacher: no zero-shot figures: bitsandbytes weights without CUDA" in page
    assert {"report.md", "report.json", "report.html"} <= set(html_report.manifest["files"])


def test_html_escapes_what_it_shows(fleet_run, tmp_path):
    report = report_data(named(fleet_run))
    report["devices"][2]["error"] = "<img src=x onerror=alert(1)>"
    report["rows"] = report["rows"][:1]  # fewer charts to draw
    page = render_html(report)
    assert "<img src=x" not in page and "&lt;img src=x" in page


@pytest.mark.skipif(CHROMIUM is None, reason="needs chromium to render the HTML (apt-get install chromium)")
def test_html_renders_in_headless_chromium(html_report, tmp_path):
    from matplotlib.image import imread

    shot = tmp_path / "report.png"
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", "--no-proxy-server",
           f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1280,3000", f"--screenshot={shot}",
           html_report.file("report.html").as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and shot.is_file(), proc.stderr[-2000:]
    img = imread(shot)  # (H, W, 3 or 4) floats in [0, 1]
    assert img.shape[:2] == (3000, 1280)
    ink = (img[..., :3].mean(axis=2) < 0.5).mean(axis=1)  # dark pixels per row
    assert ink[:200].max() > 0.05  # the title and the table at the top
    assert (ink[600:] > 0.01).sum() > 500  # charts and device tables below, not a blank page


def test_speculative_row_on_a_device_in_both_documents(pipeline, tmp_path):  # noqa: F811 (fixture)
    """A device that timed the teacher's Q4_K_M file with and without the student as its draft: the row on that
    board with its speed-up, and its acceptance under the main table and the device's, in Markdown and HTML."""
    spec = {"acceptance_rate": 0.5, "alpha": 0.6, "mean_accepted": 1.5, "tokens_per_step": 2.5, "mean_k": 3.0,
            "draft": {"path": "m", "bytes": 800_000}}
    results = {**DEVICES["pi@pi5.local"]["results"], "baseline": agent_result(20.0, 60.0),
               "speculative": {**agent_result(30.0, 55.0), "speculative": spec}}
    devices = {"pi@pi5.local": {"facts": PI5_FACTS, "results": results}}
    bench = write_artifact(tmp_path, "bench", pipeline[:1], {}, files={
        "bench.json": json.dumps(results), "devices.json": json.dumps(devices)})
    report = report_data(named([a for a in pipeline if a.stage != "bench"] + [bench]))
    row = report["devices"][0]["rows"][-1]
    assert row["name"] == "teacher GGUF Q4_K_M + student draft (speculative)" and row["speedup"] == pytest.approx(1.5)
    assert row["speculative"] == spec and report["rows"][-1]["speculative"] == spec
    note = ("teacher GGUF Q4_K_M + student draft (speculative): the teacher file decodes greedily, the student GGUF "
            "proposing its tokens; 0.50 of the drafted tokens accepted (alpha 0.60), mean accepted length 1.50 draft "
            "tokens and 2.50 tokens out per teacher pass (mean k 3.0); × teacher is over teacher GGUF Q4_K_M alone")
    assert device_tables(report["devices"])[0].notes == [note + "."]  # no quality columns on a device
    md, page = render_markdown(report), render_html(report)
    assert md.count(f"- {note}") == 2 and page.count(f"<li>{note}") == 2
    assert "| teacher GGUF Q4_K_M + student draft (speculative) | 4 | 55.0 | 30.0 | 1.50 |" in md
