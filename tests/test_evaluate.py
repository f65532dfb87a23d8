"""Evaluation: the teacher scores itself perfectly; metrics are consistent across runtimes."""

import numpy as np
import pytest

from pistill.vocab_map import VocabMap
from pistill.evaluate import HeldoutBlock, Scores, evaluate_path, evaluate_torch, heldout, log_softmax


def test_scores_by_hand():
    logits = np.log(np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]]))
    block = HeldoutBlock(np.array([0, 2]), first=1, n_bytes=3, n_teacher=1)
    s = Scores()
    top1 = np.array([0, 2])
    topk_ids = np.array([[0, 1], [2, 0]])
    topk_logp = np.log(np.array([[0.7, 0.2], [0.8, 0.1]]))
    s.add(logits, block, (top1, topk_ids, topk_logp))
    r = s.result()
    assert r["ppl"] == pytest.approx(1 / 0.1)  # p(ids[1]=2 | pos 0) = 0.1
    assert r["bpb"] == pytest.approx(np.log2(10) / 3)  # 3.32 bits for the 3 bytes of the one scored token
    assert r["agreement"] == 1.0 and r["kl"] == pytest.approx(0.0, abs=1e-12)


def test_a_split_token_is_scored_per_teacher_token_and_per_byte():
    """The teacher's token 2 is a dropped one, written as the pieces [1, 0] of the trimmed vocabulary: the model
    predicts both pieces, and the sum is divided by one teacher token and by the token's bytes."""
    logits = np.log(np.array([[0.5, 0.5], [0.25, 0.75], [0.5, 0.5]]))
    block = HeldoutBlock(np.array([0, 1, 0]), first=1, n_bytes=4, n_teacher=1)
    s = Scores()
    s.add(logits, block)
    r = s.result()
    assert r["ppl"] == pytest.approx(1 / (0.5 * 0.25))
    assert r["bpb"] == pytest.approx(3 / 4)
    assert r["agreement"] is None and r["kl"] is None  # no token-level comparison across vocabularies


def test_heldout_in_a_trimmed_vocabulary_skips_the_first_tokens_pieces(tiny_data):
    """Blocks mapped through a VocabMap keep every byte; the pieces of the block's first teacher token are not
    scored, so the scored bytes are the same as the teacher's."""
    full = heldout(tiny_data)
    block = full[0].ids
    first = int(block[0])
    kept = np.array(sorted(set(range(tiny_data.metrics.get("vocab_size", 0) or int(block.max()) + 1)) - {first}))
    teacher_v = int(max(kept.max(), first)) + 1
    vocab = VocabMap(kept, teacher_v, {first: (0, 1)})
    mapped = heldout(tiny_data, vocab)
    assert mapped[0].first == 2 and len(mapped[0].ids) >= len(block) + 1
    assert [b.n_bytes for b in mapped] == [b.n_bytes for b in full]
    assert [b.n_teacher for b in mapped] == [b.n_teacher for b in full]


def test_log_softmax_is_normalised():
    x = np.random.default_rng(0).normal(size=(3, 7)) * 50
    assert np.allclose(np.exp(log_softmax(x)).sum(-1), 1.0)


def test_teacher_agrees_with_itself(tiny_teacher, tiny_data):
    from pistill.models import load_model

    r = evaluate_torch(load_model(tiny_teacher.model_path()), tiny_data)
    assert r["agreement"] == 1.0 and abs(r["kl"]) < 1e-4
    assert r["ppl"] == pytest.approx(tiny_data.metrics["teacher_ppl"], rel=1e-4)
    assert r["bpb"] == pytest.approx(tiny_data.metrics["teacher_bpb"], rel=1e-4)
    assert evaluate_path(tiny_teacher.model_path(), "hf", tiny_data) == pytest.approx(r, rel=1e-4)
