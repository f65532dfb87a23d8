"""The eval stage: config checks, the shipped task files, and a run over torch, GGUF, ONNX and a two-model artifact
where a bitsandbytes folder is skipped and a broken file is recorded without stopping the others."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest

from pistill.artifact import config_dict
from pistill.errors import InputError
from pistill.mc_eval import read_items
from pistill.zeroshot import SHIPPED, TASKS_DIR, EvalConfig, read_eval, run, task
from tiny import gguf_baseline, model_artifact, named

ROWS = [
    {"query": "Question: Which returns a copy of the list?", "choices": ["list.copy()", "list.clear()"], "gold": 0},
    {"query": "Question: What does len() return?", "choices": ["the number of items", "a string", "None"], "gold": 0},
    {"query": "Question: Which module parses JSON?", "choices": ["json", "math"], "gold": 0},
    {"activity_label": "Reading files", "ctx": "The function opens the file and",
     "endings": ["returns its contents.", "deletes the disk."], "label": 0},
]


@pytest.mark.parametrize("changes, message", [
    ({"tasks": []}, "tasks is empty"),
    ({"tasks": ["arc_challenge"]}, "task 'arc_challenge' is neither shipped (arc_easy, piqa) nor a .jsonl file"),
    ({"tasks": ["arc_easy", "a/arc_easy.jsonl"]}, "name a task twice"),
    ({"items": -1}, "items = -1 must be 0 or more"),
    ({"threads": -2}, "threads = -2 must be 0 or more"),
])
def test_config_rejects(changes, message):
    with pytest.raises(ValueError) as err:
        EvalConfig(**changes)
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("cfg", [EvalConfig(), EvalConfig(tasks=["piqa"], items=0, suffix="", threads=2,
                                                          skip=["prune"], bitsandbytes_on_cpu=True)])
def test_config_round_trip(cfg):
    d = config_dict(cfg)
    assert d.pop("version") == EvalConfig.VERSION
    assert EvalConfig(**d) == cfg and dataclasses.asdict(cfg) == d


def test_task_files_must_exist(tmp_path):
    with pytest.raises(ValueError, match="does not exist; fix \\[eval\\] tasks"):
        EvalConfig(tasks=[str(tmp_path / "none.jsonl")]).validate_paths()
    EvalConfig().validate_paths()  # the shipped ones are there


def test_every_line_is_checked_even_past_items(tmp_path):
    """`--eval-items 0` may ask for more lines than the recipe's items: a bad line anywhere fails at load."""
    path = tmp_path / "mine.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n\n" + json.dumps({**ROWS[1], "gold": "first"}) + "\n")
    with pytest.raises(InputError, match=r"mine.jsonl line 3: 'gold' = \"first\" is not the index of a choice"):
        EvalConfig(tasks=[str(path)], items=1).validate_paths()
    path.write_text(json.dumps(ROWS[0]) + "\n" + json.dumps(ROWS[3]) + "\n")
    EvalConfig(tasks=[str(path)], items=1).validate_paths()


def test_the_stage_refuses_a_file_spoilt_after_load_before_writing(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_bytes(json.dumps(ROWS[0]).encode() + b"\n" + "caf\u00e9".encode("latin-1") + b"\n")
    with pytest.raises(InputError, match=r"mine.jsonl line 2 is not UTF-8 \(byte 0xe9 at column 4\)"):
        run({}, EvalConfig(tasks=[str(path)]), tmp_path / "eval")
    assert not (tmp_path / "eval").exists()


@pytest.mark.parametrize("name", list(SHIPPED))
def test_shipped_tasks_have_500_items_and_a_licence(name):
    t = task(name)
    assert t.path == TASKS_DIR / f"{name}.jsonl" and t.label == SHIPPED[name]
    items = read_items(t.path)
    assert len(items) == 500 and all(it.context.startswith("Question: ") for it in items)
    assert not any(it.context.endswith("\n") for it in items)  # the suffix makes lm-eval's "...\nAnswer:"
    readme = (TASKS_DIR / "README.md").read_text()
    assert f"`{name}.jsonl`" in readme and "CC BY-SA 4.0" in readme and "Academic Free License 3.0" in readme


def test_package_data_ships_the_tasks(tmp_path):
    """A built wheel (not only the editable install) holds the shipped task files and their licences."""
    import shutil
    import subprocess
    import sys
    import zipfile
    from pathlib import Path

    root, src = Path(__file__).resolve().parents[1], tmp_path / "src"  # a copy: setuptools writes build/ beside it
    for folder in ("pistill", "compress", "export", "device"):
        shutil.copytree(root / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(root / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(src),
                    "-w", str(tmp_path)], check=True, capture_output=True, cwd=tmp_path)
    names = zipfile.ZipFile(next(tmp_path.glob("pistill-*.whl"))).namelist()
    assert {"pistill/tasks/arc_easy.jsonl", "pistill/tasks/piqa.jsonl", "pistill/tasks/README.md",
            "pistill/prompts.txt"} <= set(names)


@pytest.fixture(scope="module")
def models(tiny_model, tiny_teacher, tmp_path_factory):
    """Model artifacts of every format, one holding two GGUF files, one bitsandbytes folder, one broken file."""
    from pistill.export import onnx
    from pistill.export.gguf_convert import write_gguf

    root = tmp_path_factory.mktemp("eval")
    gguf = model_artifact(root, "gguf", "gguf", lambda d: write_gguf(tiny_model, d / "m.gguf", "f32").name)
    onnx_art = model_artifact(root, "onnx", "onnx",
                              lambda d: onnx.export(tiny_model, d / "model", onnx.ONNXConfig(precision="fp32")).name)
    baseline = gguf_baseline(root, tiny_model, {"baseline": ("a.gguf", "F16"), "baseline:X": ("b.gguf", "F16")},
                             "f16")

    def bnb(d):
        shutil.copytree(tiny_model, d, dirs_exist_ok=True)
        cfg = json.loads((d / "config.json").read_text())
        (d / "config.json").write_text(json.dumps({**cfg, "quantization_config": {"load_in_4bit": True}}))
        return "."

    def broken(d):
        (d / "m.gguf").write_bytes(b"not a gguf file")
        return "m.gguf"

    return [tiny_teacher, model_artifact(root, "quantize", "hf", bnb), model_artifact(root, "distill", "gguf", broken),
            gguf, onnx_art, baseline]


def test_run_scores_every_model_and_records_the_rest(models, tmp_path):
    path = tmp_path / "mc.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    cfg = EvalConfig(tasks=[str(path), "piqa"], items=3, threads=2)
    art = run(named(models), cfg, tmp_path / "eval")
    doc = read_eval(art)
    assert doc["schema_version"] == 1 and list(doc["tasks"]) == ["mc", "piqa"]
    assert doc["tasks"]["mc"]["n"] == 3 and doc["tasks"]["mc"]["chance"] == pytest.approx((1 / 2 + 1 / 3 + 1 / 2) / 3)
    assert doc["tasks"]["piqa"]["source"] == "piqa.jsonl" and len(doc["tasks"]["piqa"]["sha256"]) == 64
    res = doc["models"]
    assert list(res) == ["teacher", "quantize", "distill", "gguf", "onnx", "baseline", "baseline:X"]
    import torch

    if not torch.cuda.is_available():  # on CUDA the fake bitsandbytes folder is loaded, and fails
        assert "bitsandbytes" in res["quantize"]["skipped"]
    assert res["distill"]["error"].startswith("ValueError")
    scored = [k for k in res if "tasks" in res[k]]
    assert scored == ["teacher", "gguf", "onnx", "baseline", "baseline:X"]
    for key in scored:
        for name, r in res[key]["tasks"].items():
            assert r["n"] == 3 and 0 <= r["acc_norm"] <= 1 and r["acc_norm_stderr"] >= 0 and r["tokens_per_s"] > 0
    same = ("n", "acc", "acc_norm", "acc_stderr", "acc_norm_stderr", "tokens")  # unquantized: runtimes agree
    for key in ("gguf", "onnx"):
        assert {k: res[key]["tasks"]["mc"][k] for k in same} == {k: res["teacher"]["tasks"]["mc"][k] for k in same}
    assert art.metrics["onnx"] == {n: r["acc_norm"] for n, r in res["onnx"]["tasks"].items()}
    fewer = dataclasses.replace(cfg, skip=["teacher", "onnx", "baseline:X"], tasks=["piqa"], items=2)
    again = run(named(models), fewer, tmp_path / "eval2")
    skipped = read_eval(again)["models"]
    assert skipped["teacher"] == {"skipped": "listed in [eval] skip"} and "tasks" in skipped["baseline"]


def test_read_eval_without_artifact():
    assert read_eval(None) == {"tasks": {}, "models": {}}
