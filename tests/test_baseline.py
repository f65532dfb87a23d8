"""The baseline stage: the student GGUF's policy read from its manifest, and a run on the tiny teacher that writes
its Q4_0 (importance matrix) and Q8_0 files as one artifact holding two models, each scored and benchable."""

from __future__ import annotations

import dataclasses

import pytest

from pistill.artifact import ArtifactWriter, config_dict
from pistill.export.baseline import BaselineConfig, file_types, model_key, run, student_policy
from pistill.export.gguf import GGUFConfig


@pytest.mark.parametrize("changes, message", [
    ({"quants": []}, "quants is empty"),
    ({"quants": ["student", "Q9_9"]}, "quant type 'Q9_9' is unknown"),
    ({"quants": ["Q8_0", "Q8_0"]}, "repeats a type"),
    ({"threads": -1}, "threads = -1 must be >= 0"),
])
def test_config_rejects(changes, message):
    with pytest.raises(ValueError) as err:
        BaselineConfig(**changes)
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("cfg", [BaselineConfig(), BaselineConfig(quants=("Q4_K_M",), threads=2, evaluate=False)])
def test_config_round_trip(cfg):
    d = config_dict(cfg)
    assert d.pop("version") == BaselineConfig.VERSION
    assert BaselineConfig(**d) == cfg and dataclasses.asdict(cfg) == {**d, "quants": tuple(d["quants"])}


@pytest.mark.parametrize("config, expected", [
    ({"outtype": "f16", "quants": ["Q4_0"], "imatrix": True}, ("Q4_0", "f16", True)),
    ({"outtype": "f32", "quants": ["Q4_K_M", "Q8_0"], "imatrix": False}, ("Q4_K_M", "f32", False)),
    ({"outtype": "f16", "quants": ["Q8_0"], "imatrix": True}, ("Q8_0", "f16", False)),  # Q8_0 rounds without one
    ({"outtype": "f16", "quants": []}, ("F16", "f16", False)),  # the student is the unquantized file
    ({}, ("F16", "f16", False)),
])
def test_student_policy(config, expected):
    assert student_policy({"config": config}) == expected


@pytest.mark.parametrize("quants, student, expected", [
    (("student", "Q8_0"), "Q4_0", ["Q4_0", "Q8_0"]),
    (("student", "Q8_0"), "Q8_0", ["Q8_0"]),  # the student's type is Q8_0 already: one file
    (("Q5_K_M", "student"), "Q4_0", ["Q5_K_M", "Q4_0"]),
])
def test_file_types(quants, student, expected):
    assert file_types(BaselineConfig(quants=quants), student) == expected
    assert [model_key(i, k) for i, k in enumerate(expected)][0] == "baseline"


@pytest.fixture(scope="module")
def student_gguf(tmp_path_factory):
    """A gguf artifact's manifest as the gguf stage writes it (Q4_0 with an importance matrix); no file needed."""
    with ArtifactWriter(tmp_path_factory.mktemp("student") / "gguf", "gguf", GGUFConfig(quants=("Q4_0",)), []) as w:
        w.model = {"format": "gguf", "file": "model-Q4_0.gguf"}
    return w.artifact


def test_run_writes_the_teachers_files_at_the_students_type_and_q8(tiny_teacher, tiny_data, student_gguf, tmp_path):
    from pistill.device.local import models

    inputs = {"teacher": tiny_teacher, "data": tiny_data, "gguf": student_gguf}
    art = run(inputs, BaselineConfig(threads=2), tmp_path / "baseline")
    assert [m["key"] for m in art.models] == ["baseline", "baseline:Q8_0"]
    assert [m["file"] for m in art.models] == ["teacher-Q4_0.gguf", "teacher-Q8_0.gguf"]
    assert sorted(p.name for p in art.path.glob("*.gguf")) == ["teacher-Q4_0.gguf", "teacher-Q8_0.gguf"]
    assert art.model == {"format": "gguf", "file": "teacher-Q4_0.gguf"} and art.manifest["student_type"] == "Q4_0"
    assert art.metrics["imatrix"] is True
    q4, q8 = (m["metrics"] for m in art.models)
    assert q4["bytes"] < q8["bytes"] and q4["params"] == q8["params"] == art.metrics["params"]
    assert 4 < q4["bits_per_weight"] < 6.5 < 8 < q8["bits_per_weight"] < 9  # tiny: the embeddings weigh a lot
    for m in (q4, q8):
        assert m["ppl"] > 1 and 0 <= m["agreement"] <= 1 and m["kl"] >= 0 and m["n_tokens"] > 0
    assert q8["kl"] < q4["kl"]  # 8 bits keep more of the teacher than 4
    views = dict(models([art]))  # what bench and eval iterate over
    assert list(views) == ["baseline", "baseline:Q8_0"]
    assert views["baseline:Q8_0"].model_path() == art.path / "teacher-Q8_0.gguf"
    assert views["baseline:Q8_0"].metrics == q8 and views["baseline"].metrics == q4
    assert art.manifest["files_detail"]["teacher-Q4_0.gguf"]["Q4_0"] > 0


def test_unquantized_teacher_files_beside_the_quantized_one(tiny_teacher, tiny_data, student_gguf, tmp_path):
    art = run({"teacher": tiny_teacher, "data": tiny_data, "gguf": student_gguf},
              BaselineConfig(quants=("student", "F16", "F32"), threads=2), tmp_path / "baseline")
    assert [m["file"] for m in art.models] == ["teacher-Q4_0.gguf", "teacher-f16.gguf", "teacher-F32.gguf"]
    q4, f16, f32 = (m["metrics"] for m in art.models)
    assert q4["bytes"] < f16["bytes"] < f32["bytes"] and 15.5 < f16["bits_per_weight"] < 16.5 < 31.5 < f32["bits_per_weight"]
    assert f32["kl"] < 1e-3 and f16["kl"] < q4["kl"]  # the unquantized files are the teacher


def test_unknown_baseline_type_is_refused():
    with pytest.raises(ValueError, match="quant type 'F8' is unknown"):
        BaselineConfig(quants=("F8",))
