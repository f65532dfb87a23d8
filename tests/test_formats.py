"""The format table: every format's runtime, device packages, job and scorer exist, and runtimes keep the protocol."""

from __future__ import annotations

import ast
import inspect
import textwrap
from pathlib import Path

import pytest

from pistill import mc_eval
from pistill.device import fleet, probe, protocol, provision, runtimes
from pistill.formats import FORMATS, Format, get_format, runtime_for_format
from tiny import model_artifact


@pytest.mark.parametrize("fmt, runtime", [("hf", "torch"), ("gguf", "llama_cpp"), ("onnx", "onnxruntime")])
def test_runtime_for_format(fmt, runtime):
    assert runtime_for_format(fmt) == runtime and get_format(fmt).name == fmt


def test_unknown_format_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"^model format 'tflite' is not supported; supported: gguf, hf, onnx$"):
        runtime_for_format("tflite")


@pytest.mark.parametrize("fmt", FORMATS.values(), ids=FORMATS)
def test_every_format_is_wired(fmt: Format):
    assert fmt.runtime in runtimes.RUNTIMES  # a registered runtime runs it
    assert provision.PACKAGES[fmt.runtime] == (fmt.distribution, list(fmt.requirements))  # the device installs it
    assert fmt.distribution in probe.PROBED  # and the probe sees it installed
    assert fmt.job in fleet.JOBS  # the bench can ship it
    assert fmt.runtime in mc_eval.SCORERS  # the eval stage can score it
    assert set(fmt.agent_files) <= set(protocol.AGENT_FILES)
    assert all((Path(runtimes.__file__).parent / n).is_file() for n in protocol.AGENT_FILES)


def missing_members(cls: type) -> list[str]:
    """The members of the Runtime protocol `cls` lacks: a method, or one whose parameters do not start with the
    protocol's; an attribute neither on the class nor assigned to `self` in its source."""
    source = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    assigned = {t.attr for node in ast.walk(source) if isinstance(node, ast.Assign) for t in node.targets
                if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self"}
    lacks = [a for a in runtimes.Runtime.__annotations__ if not hasattr(cls, a) and a not in assigned]
    for name, method in vars(runtimes.Runtime).items():
        if not inspect.isfunction(method) or name.startswith("_") and name != "__init__":
            continue
        want = list(inspect.signature(method).parameters)
        have = list(inspect.signature(getattr(cls, name)).parameters) if name in vars(cls) else []
        if have[:len(want)] != want:
            lacks.append(name)
    return lacks


@pytest.mark.parametrize("name", sorted(runtimes.RUNTIMES))
def test_every_runtime_keeps_the_protocol(name):
    assert missing_members(runtimes.RUNTIMES[name]) == []


def test_a_runtime_that_breaks_the_protocol_is_caught():
    class Half:
        def __init__(self, model_path: str, threads: int = 0, max_ctx: int = 2048):
            self.lm = None

        def tokenize(self, text: str) -> list[int]:
            return []

        def logits(self, tokens: list[int]):  # named unlike the protocol's `ids`
            return None

        def prefill(self, ids: list[int]) -> int:
            return 0

        def close(self) -> None:
            pass

    assert missing_members(Half) == ["name", "version", "logits", "decode"]


def test_a_format_with_a_known_runtime_is_one_table_entry(tmp_path, monkeypatch):
    monkeypatch.setitem(FORMATS, "onnx2", Format("onnx2", "onnxruntime", "ONNX2", "onnxruntime", (), "folder"))

    def fill(d: Path) -> str:
        (d / "model").mkdir()
        (d / "model" / "model.onnx").write_bytes(b"graph")
        return "model"

    job = fleet.make_job(model_artifact(tmp_path, "onnx2", "onnx2", fill), None, "Q4_0")
    assert job.runtime == "onnxruntime" and job.model == "." and list(job.files) == ["model.onnx"]
    assert len(job.sha256s["model.onnx"]) == 64 and runtime_for_format("onnx2") == "onnxruntime"


def test_an_artifact_of_an_unknown_format_is_not_sent(tmp_path):
    art = model_artifact(tmp_path, "tflite", "tflite", lambda d: (d / "m.tflite").write_bytes(b"x") and "m.tflite")
    assert fleet.make_jobs([art], None)["tflite"] == {
        "error": "model format 'tflite' is not supported; supported: gguf, hf, onnx"}
