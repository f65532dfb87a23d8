"""A full disk stops a stage with one line naming the folder, before the big writers start where pistill can estimate
what they write, and leaves no half-written file; tested on a real tiny tmpfs (root only, else skipped)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from pistill.artifact import ArtifactWriter
from pistill.errors import OutputError
from pistill.rundir import check_free
from tiny import FakeConfig


@pytest.fixture
def small_disk():
    """Factory: a tmpfs of the given size, mounted under /var/tmp (not pytest's tmp, whose clean-up must never meet
    a mount) and unmounted afterwards; the test is skipped where mounting is not permitted."""
    points = []

    def mount(size: str = "64k") -> Path:
        point = Path(tempfile.mkdtemp(prefix="pistill-diskfull-", dir="/var/tmp"))
        try:
            p = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)],
                               capture_output=True, text=True, timeout=30)
        except OSError as e:  # no mount command
            p = subprocess.CompletedProcess([], 1, "", str(e))
        if p.returncode != 0:
            point.rmdir()
            pytest.skip(f"cannot mount a {size} tmpfs here ({p.stderr.strip() or 'mount failed'}); needs root")
        points.append(point)
        return point

    yield mount
    for point in points:
        subprocess.run(["umount", str(point)], check=False, timeout=30)
        point.rmdir()


def leftovers(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def hf_artifact(root: Path, stage: str, model: Path):
    """An artifact of `stage` holding a copy of the HF folder `model`, with its parameter count as a stage records."""
    from safetensors.numpy import load_file

    with ArtifactWriter(root / stage, stage, FakeConfig(), []) as w:
        shutil.copytree(model, w.dir, dirs_exist_ok=True)
        w.metrics["params"] = sum(t.size for t in load_file(w.dir / "model.safetensors").values())
        w.model = {"format": "hf", "file": "."}
    return w.artifact


def test_check_free_refuses_more_than_the_disk(tmp_path):
    """Where no tmpfs can be mounted this still holds: a need beyond the disk's size is refused, naming both."""
    total = shutil.disk_usage(tmp_path).total
    with pytest.raises(OutputError, match=rf"^the thing needs about .* free in {tmp_path / 'new'}, but its disk has "):
        check_free(tmp_path / "new", total + 1, "the thing")
    check_free(tmp_path / "new", 1, "the thing")  # a byte fits


def test_prune_onto_a_full_disk_is_one_line(tiny_teacher, tiny_data, small_disk):
    disk = small_disk("64k")
    run_dir = tiny_teacher.path.parent
    p = subprocess.run([sys.executable, "-m", "pistill.cli", "prune", str(run_dir), "--out", str(disk / "prune")],
                       capture_output=True, text=True, timeout=300)
    errors = [line for line in p.stderr.splitlines() if line.startswith("pistill: error: ")]
    assert p.returncode == 1 and "Traceback" not in p.stderr and len(errors) == 1, p.stderr
    assert errors[0].startswith("pistill: error: the pruned model needs about ")
    assert f" free in {disk / 'prune'}, but its disk has " in errors[0]
    assert errors[0].endswith("free some space or choose another --out")
    assert leftovers(disk) == []  # no half artifact
    assert (run_dir / "teacher" / "manifest.json").is_file()  # the inputs are untouched


def test_report_onto_a_full_disk_is_one_line(tmp_path, small_disk):
    """The report writes without an estimate: the disk-full error itself becomes the one line."""
    from pistill.report import ReportConfig, run

    disk = small_disk("4k")  # one page: report.md does not fit
    with ArtifactWriter(tmp_path / "teacher", "teacher", FakeConfig(), []) as w:
        w.model, w.metrics["params"] = {"format": "hf", "file": "."}, 1000
    with pytest.raises(OutputError, match=rf"^no space left on the disk of {disk / 'report'} \("):
        run({"teacher": w.artifact}, ReportConfig(formats=["md", "json"], history=False), disk / "report")
    assert leftovers(disk) == []


def test_gguf_teacher_conversion_checks_the_cache_disk(tmp_path, small_disk, monkeypatch):
    import gguf
    import numpy as np

    from pistill.models import materialize

    disk = small_disk("64k")
    monkeypatch.setenv("PISTILL_CACHE", str(disk))
    w = gguf.GGUFWriter(str(tmp_path / "t.gguf"), "llama")
    w.add_tensor("token_embd.weight", np.ones((16, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(OutputError, match=rf"^the float32 copy of t\.gguf \(in pistill's cache; PISTILL_CACHE moves "
                                          rf"it\) needs about 50 MB free in {disk}/teachers, but its disk has 0 MB"):
        materialize(str(tmp_path / "t.gguf"))
    assert leftovers(disk) == ["teachers"]  # the cache folder, empty


def test_distillation_checks_the_checkpoint_disk(tiny_model, small_disk):
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    from pistill.compress.distill import DistillConfig, train

    disk = small_disk("64k")
    student = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    blocks = np.random.default_rng(0).integers(0, 500, (4, 16)).astype(np.int32)
    before = [p.detach().clone() for p in student.parameters()]
    cfg = DistillConfig(steps=2, batch_size=2, warmup_steps=0, eval_every=0, ckpt_every=1)
    with pytest.raises(OutputError, match=rf"^distillation \(a checkpoint, then the student\) needs about \d+ MB free "
                                          rf"in {disk / 'ckpt'}, but its disk has 0 MB"):
        train(student, teacher, blocks, blocks[:1], cfg, disk / "ckpt")
    assert all(torch.equal(a, b) for a, b in zip(before, student.parameters()))  # refused before the first step
    assert "checkpoint.pt" not in leftovers(disk)


@pytest.mark.parametrize("stage", ["gguf", "onnx"])
def test_exports_check_their_disk_first(tiny_model, tmp_path, small_disk, stage):
    from pistill.export import gguf, onnx

    disk = small_disk("64k")
    student = hf_artifact(tmp_path, "distill", tiny_model)
    run, cfg, what = {"gguf": (gguf.run, gguf.GGUFConfig(), "the GGUF export"),
                      "onnx": (onnx.run, onnx.ONNXConfig(), "the ONNX export")}[stage]
    with pytest.raises(OutputError, match=rf"^{what} needs about \d+ MB free in {disk / stage}, but its disk has "):
        run({"distill": student, "data": student}, cfg, disk / stage)
    assert leftovers(disk) == []
