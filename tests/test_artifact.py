"""Artifacts: atomic writes, manifests, input keys and the machine facts."""

import json
from dataclasses import dataclass
from typing import ClassVar

import pytest

from pistill.artifact import Artifact, ArtifactError, ArtifactWriter, cpu_fields, input_key, sha256_file


@dataclass(frozen=True)
class Cfg:
    VERSION: ClassVar[int] = 3
    size: int = 1


def write(out, cfg=Cfg(), parents=(), text="hello"):
    with ArtifactWriter(out, "demo", cfg, list(parents)) as w:
        (w.dir / "a.txt").write_text(text)
        w.metrics["n"] = 1
    return w.artifact


def test_manifest_records_everything(tmp_path):
    art = write(tmp_path / "a")
    m = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert m["stage"] == "demo" and m["config"] == {"version": 3, "size": 1}
    assert m["files"]["a.txt"]["sha256"] == sha256_file(tmp_path / "a" / "a.txt")
    assert m["metrics"] == {"n": 1} and m["wall_s"] >= 0 and m["environment"]["python"]
    assert Artifact.load(tmp_path / "a").id == art.id


def test_crash_leaves_no_artifact(tmp_path):
    with pytest.raises(RuntimeError):
        with ArtifactWriter(tmp_path / "b", "demo", Cfg(), []) as w:
            (w.dir / "half.bin").write_bytes(b"x")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_rewrite_replaces_and_changes_id(tmp_path):
    a, b = write(tmp_path / "a"), write(tmp_path / "a", text="other")
    assert a.id != b.id and (tmp_path / "a" / "a.txt").read_text() == "other"


def test_input_key_depends_on_config_version_and_parents(tmp_path):
    p1, p2 = write(tmp_path / "p1"), write(tmp_path / "p2")
    keys = {input_key("demo", Cfg(), []), input_key("demo", Cfg(size=2), []), input_key("demo", Cfg(), [p1]),
            input_key("demo", Cfg(), [p2]), input_key("other", Cfg(), [])}
    assert len(keys) == 5
    assert input_key("demo", Cfg(), [p1]) == input_key("demo", Cfg(), [Artifact.load(p1.path)])


@pytest.mark.parametrize("stage,match", [(None, "not a pistill artifact"), ("prune", "expected 'prune'")])
def test_load_errors(tmp_path, stage, match):
    target = tmp_path / "x" if stage is None else write(tmp_path / "x").path
    with pytest.raises(ArtifactError, match=match):
        Artifact.load(target, stage=stage)


def test_models_of_one_model_several_and_none(tmp_path):
    """`models` / `each_model`: a manifest's `models` list keyed as written, an older one-model manifest keyed by its
    stage, and an artifact with no model as its own view (so a bench can report it)."""
    with ArtifactWriter(tmp_path / "two", "baseline", Cfg(), []) as w:
        w.model = {"format": "gguf", "file": "a.gguf"}
        w.metrics["ppl"] = 1.0
        w.models = [{"key": "baseline", "format": "gguf", "file": "a.gguf", "metrics": {"ppl": 1.0}},
                    {"key": "baseline:Q8_0", "format": "gguf", "file": "b.gguf", "quant": "Q8_0",
                     "metrics": {"ppl": 2.0}}]
    two = Artifact.load(tmp_path / "two")
    assert [m["key"] for m in two.models] == ["baseline", "baseline:Q8_0"]
    (k1, v1), (k2, v2) = two.each_model()
    assert (k1, v1.model, v1.metrics) == ("baseline", {"format": "gguf", "file": "a.gguf"}, {"ppl": 1.0})
    assert (k2, v2.model, v2.metrics) == ("baseline:Q8_0", {"format": "gguf", "file": "b.gguf", "quant": "Q8_0"},
                                          {"ppl": 2.0})
    assert v2.model_path() == tmp_path / "two" / "b.gguf" and v2.stage == "baseline" and v2.id == two.id
    with ArtifactWriter(tmp_path / "one", "gguf", Cfg(), []) as w:
        w.model = {"format": "gguf", "file": "m.gguf"}
    one = w.artifact
    assert "models" not in one.manifest and one.models == [{"key": "gguf", "format": "gguf", "file": "m.gguf"}]
    assert one.each_model() == [("gguf", one)]
    none = write(tmp_path / "none")
    assert none.models == [] and none.each_model() == [("demo", none)]


@pytest.mark.parametrize("body,match", [("[]", "is a JSON list, not a pistill manifest"),
                                        ('{"stage": "demo", "id": "x"}', "lacks key, not a pistill manifest"),
                                        ('{"stage": ', "cannot be read as JSON")])
def test_damaged_manifest_is_an_artifact_error(tmp_path, body, match):
    (tmp_path / "manifest.json").write_text(body)
    with pytest.raises(ArtifactError, match=match):
        Artifact.load(tmp_path)


def test_writer_replaces_only_its_own_stage_or_an_empty_folder(tmp_path):
    from pistill.errors import OutputError, UserError

    (tmp_path / "empty").mkdir()
    assert write(tmp_path / "empty").stage == "demo"  # an empty folder holds nothing to lose
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(OutputError, match="exists and is not a pistill artifact; pistill replaces only a 'demo'"):
        write(mine)
    other = tmp_path / "other"
    with ArtifactWriter(other, "prune", Cfg(), []):
        pass
    with pytest.raises(OutputError, match="is a 'prune' artifact"):
        write(other)
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="is a file"):
        write(tmp_path / "file")
    assert (mine / "notes.txt").read_text() == "keep me" and Artifact.load(other).stage == "prune"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "file", "mine", "other"]  # no temporaries left
    assert issubclass(OutputError, UserError)


def test_writer_refuses_a_folder_holding_an_input(tmp_path):
    from pistill.errors import OutputError

    parent = write(tmp_path / "run" / "teacher")
    for out in (tmp_path / "run" / "teacher", tmp_path / "run"):
        with pytest.raises(OutputError, match="holds the 'demo' input"):
            write(out, parents=[parent])
    assert Artifact.load(parent.path).id == parent.id


def test_cpu_fields_keeps_the_first_core():
    info = "processor\t: 0\nmodel name\t: Cortex-A76\nFeatures\t: fp asimd\n\nprocessor\t: 1\nmodel name\t: other\n"
    assert cpu_fields(info) == {"processor": "0", "model name": "Cortex-A76", "Features": "fp asimd"}
