"""Shared fixtures: tiny random llama folders and their artifacts, built once per session."""

from __future__ import annotations

import pytest

from tiny import make_model


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
