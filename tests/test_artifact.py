"""Artifacts: atomic writes, manifests, input keys."""

import json
from dataclasses import dataclass
from typing import ClassVar

import pytest

from pistill.artifact import Artifact, ArtifactError, ArtifactWriter, input_key, sha256_file


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
