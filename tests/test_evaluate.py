"""Evaluation: the teacher scores itself perfectly; metrics are consistent across runtimes."""

import numpy as np
import pytest

from pistill.evaluate import Scores, evaluate_path, evaluate_torch, log_softmax


def test_scores_by_hand():
    logits = np.log(np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]]))
    ids = np.array([0, 2])
    s = Scores()
    top1 = np.array([0, 2])
    topk_ids = np.array([[0, 1], [2, 0]])
    topk_logp = np.log(np.array([[0.7, 0.2], [0.8, 0.1]]))
    s.add(logits, ids, top1, topk_ids, topk_logp)
    r = s.result()
    assert r["ppl"] == pytest.approx(1 / 0.1)  # p(ids[1]=2 | pos 0) = 0.1
    assert r["agreement"] == 1.0 and r["kl"] == pytest.approx(0.0, abs=1e-12)


def test_log_softmax_is_normalised():
    x = np.random.default_rng(0).normal(size=(3, 7)) * 50
    assert np.allclose(np.exp(log_softmax(x)).sum(-1), 1.0)


def test_teacher_agrees_with_itself(tiny_teacher, tiny_data):
    from pistill.models import load_model

    r = evaluate_torch(load_model(tiny_teacher.model_path()), tiny_data)
    assert r["agreement"] == 1.0 and abs(r["kl"]) < 1e-4
    assert r["ppl"] == pytest.approx(tiny_data.metrics["teacher_ppl"], rel=1e-4)
    assert evaluate_path(tiny_teacher.model_path(), "hf", tiny_data) == pytest.approx(r, rel=1e-4)
