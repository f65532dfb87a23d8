"""Shared fixtures: tiny random llama folders and their artifacts, built once per session."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tiny import make_model

sys.path.insert(0, str(Path(__file__).parent / "pi-emu"))
PI_EMU_DIR = Path("/var/tmp/pistill-pi-emu-tests")  # not under pytest's tmp: its clean-up must never meet mounts


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A tiny random llama (2 layers, hidden 64, GQA 4/2 heads, tied embeddings) as an HF folder."""
    return make_model(tmp_path_factory.mktemp("tiny") / "model")


def pytest_collection_modifyitems(config, items):
    import importlib.util

    has_cuda = False
    if importlib.util.find_spec("torch") is not None:
        import torch
        has_cuda = torch.cuda.is_available()
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device; none on this machine"))


@pytest.fixture(scope="session")
def tiny_pair(tiny_model, tmp_path_factory):
    """What `[bench] speculative` reads: a baseline artifact with the tiny model as an F32 GGUF (type F32, the
    teacher) and a gguf artifact with its first layer alone as an F32 GGUF (the student, type F32: the draft)."""
    from tiny import first_layers, gguf_baseline, gguf_student

    root = tmp_path_factory.mktemp("pair")
    student = gguf_student(root, first_layers(tiny_model, root / "student-hf"))
    return [gguf_baseline(root, tiny_model, {"baseline": ("teacher-F32.gguf", "F32")}), student]


@pytest.fixture(scope="session")
def tiny_teacher(tiny_model, tmp_path_factory):
    """The tiny model as a `teacher` artifact."""
    from pistill.teacher import TeacherConfig, run

    return run({}, TeacherConfig(source=str(tiny_model)), tmp_path_factory.mktemp("run") / "teacher")


@pytest.fixture(scope="session")
def tiny_data(tiny_teacher, tmp_path_factory):
    """A small `data` artifact for the tiny teacher (block 64; 4 calib, 16 train, 2 held-out blocks)."""
    from pistill.data import DataConfig, run

    cfg = DataConfig(block_size=64, calib_blocks=4, train_blocks=16, heldout_blocks=2, instructions=4, generate=4,
                     gen_tokens=16, parallel=4, threads=1, topk=16)
    return run({"teacher": tiny_teacher}, cfg, tiny_teacher.path.parent / "data")


@pytest.fixture(scope="session")
def pi_emu():
    """The emulated Raspberry Pi 5 (tests/pi-emu/piemu.py), fresh from its cached root file system, up for the
    whole test run; skips with the reason where this machine cannot run it (not root, no binfmt)."""
    import piemu

    try:
        piemu.check_machine()
    except piemu.Unavailable as e:
        pytest.skip(str(e))
    device = piemu.up(PI_EMU_DIR)
    yield device
    piemu.down(PI_EMU_DIR)


@pytest.fixture(scope="module")
def real_teacher(tmp_path_factory):
    """The offline default teacher and a small data artifact (corpus only, 128-token blocks)."""
    from pistill.data import DataConfig
    from pistill.teacher import TeacherConfig
    from pistill.pipeline import run_stage, stage

    tmp = tmp_path_factory.mktemp("real")
    teacher, _ = run_stage(stage("teacher"), {}, TeacherConfig(), tmp / "teacher", force=False)
    cfg = DataConfig(generate=0, block_size=128, calib_blocks=4, train_blocks=1, heldout_blocks=4, topk=8)
    data, _ = run_stage(stage("data"), {"teacher": teacher}, cfg, tmp / "data", force=False)
    return teacher, data
