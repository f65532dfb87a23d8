"""Pipeline: unchanged stages are skipped, changed or forced ones rerun, downstream follows."""

import pytest

from pistill import pipeline
from pistill.data import DataConfig
from pistill.teacher import TeacherConfig

DATA = DataConfig(block_size=32, calib_blocks=2, train_blocks=2, heldout_blocks=1, generate=0, topk=4)


def test_skip_rerun_and_downstream(tiny_model, tmp_path):
    teacher_st, data_st = pipeline.stage("teacher"), pipeline.stage("data")
    cfg = TeacherConfig(source=str(tiny_model))
    t1, ran = pipeline.run_stage(teacher_st, {}, cfg, tmp_path / "teacher", force=False)
    assert ran
    d1, _ = pipeline.run_stage(data_st, {"teacher": t1}, DATA, tmp_path / "data", force=False)
    t2, ran = pipeline.run_stage(teacher_st, {}, cfg, tmp_path / "teacher", force=False)
    assert not ran and t2.id == t1.id
    d2, ran = pipeline.run_stage(data_st, {"teacher": t2}, DATA, tmp_path / "data", force=False)
    assert not ran and d2.id == d1.id
    # a forced (or deleted) upstream stage gets a new id, so the stage after it reruns
    t3, ran = pipeline.run_stage(teacher_st, {}, cfg, tmp_path / "teacher", force=True)
    assert ran and t3.id != t1.id
    d3, ran = pipeline.run_stage(data_st, {"teacher": t3}, DATA, tmp_path / "data", force=False)
    assert ran and d3.id != d1.id
    # a changed config reruns
    _, ran = pipeline.run_stage(data_st, {"teacher": t3}, DataConfig(**{**DATA.__dict__, "seed": 1}), tmp_path / "data",
                                force=False)
    assert ran


def test_inputs_are_named_in_the_stage_order():
    """A stage gets {input stage: Artifact} in the order it declares, whatever else the caller holds."""
    st = pipeline.stage("quantize")
    held = {n: object() for n in ("data", "distill", "prune", "teacher")}
    got = pipeline.named(st, held)
    assert type(got) is dict and list(got) == ["teacher", "prune", "data"] and got["prune"] is held["prune"]
    with pytest.raises(ValueError, match="missing: prune"):
        pipeline.named(st, {"teacher": held["teacher"], "data": held["data"]})


def test_half_written_folder_is_not_taken_as_done(tmp_path):
    (tmp_path / "teacher").mkdir()
    (tmp_path / "teacher" / "model.safetensors").write_bytes(b"partial")
    assert pipeline.existing(tmp_path / "teacher") is None


def test_stage_order_and_inputs_are_consistent():
    names = [s.name for s in pipeline.STAGES]
    for i, st in enumerate(pipeline.STAGES):
        assert all(names.index(n) < i for n in st.inputs), st.name


def test_teacher_cache_is_keyed_by_content(tmp_path):
    from pistill.models import gguf_cache_path

    a, b = tmp_path / "a" / "m.gguf", tmp_path / "b" / "m.gguf"
    for p, body in ((a, b"GGUF same"), (b, b"GGUF same")):
        p.parent.mkdir()
        p.write_bytes(body)
    assert gguf_cache_path(a) == gguf_cache_path(b)
    b.write_bytes(b"GGUF other")
    assert gguf_cache_path(a) != gguf_cache_path(b)


def test_every_model_stage_is_benched_scored_and_reported():
    names = [s.name for s in pipeline.STAGES]
    assert pipeline.stage("bench").inputs == pipeline.stage("eval").inputs == pipeline.MODEL_STAGES
    assert set(pipeline.MODEL_STAGES) < set(names) and "baseline" in pipeline.MODEL_STAGES
    assert list(pipeline.stage("report").inputs) == names[:-1]  # the report reads every other artifact


def test_the_stage_table_gives_commands_and_labels():
    """Every stage but the teacher and data runs alone from a command; exactly the model stages carry a label."""
    assert [s.name for s in pipeline.STAGES if not s.command] == ["teacher", "data"]
    assert tuple(s.name for s in pipeline.STAGES if s.label) == pipeline.MODEL_STAGES
    assert pipeline.stage("teacher").module == "pistill.teacher"
