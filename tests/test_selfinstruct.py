"""pistill.selfinstruct: ROUGE-L by hand, the filters, and proposals and answers from a real (tiny) teacher."""

from __future__ import annotations

import numpy as np
import pytest

from pistill.generate import LlamaCppGenerator, Sampling
from pistill.selfinstruct import (Pool, answer_tasks, lcs_length, parse_task, propose, proposal_prompt, reject_reason,
                                  rouge_l, words)


@pytest.mark.parametrize("a, b, lcs", [
    ("write a poem about the sea", "write a short poem about the moon", 5),
    ("a b c d", "d c b a", 1),
    ("x y", "", 0),
    ("the cat sat", "the cat sat", 3),
    ("a b a b", "b a b a", 3),
])
def test_lcs_by_hand(a, b, lcs):
    assert lcs_length(a.split(), b.split()) == lcs == lcs_length(b.split(), a.split())


def test_rouge_l_is_the_lcs_f1():
    a, b = words("Write a poem about the sea."), words("write a SHORT poem about the moon")
    assert rouge_l(a, b) == pytest.approx(2 * 5 / (6 + 7))
    assert rouge_l(a, a) == 1.0 and rouge_l(a, []) == 0.0


def test_pool_search_skips_only_pairs_that_cannot_reach_the_threshold():
    """The length and shared-word bounds never hide a pair at or above the threshold (brute force agrees)."""
    rng = np.random.default_rng(0)
    vocab = "the a of write explain list how why sea poem cat dog water light short story about".split()
    texts = [" ".join(rng.choice(vocab, rng.integers(2, 9))) for _ in range(150)]
    pool = Pool()
    for t in texts[:100]:
        pool.add(t)
    for t in texts[100:]:
        brute = max(rouge_l(words(t), words(o)) for o in texts[:100])
        got = pool.most_similar(t, 0.6)[0]
        assert got == pytest.approx(brute) if brute >= 0.6 else got < 0.6


@pytest.mark.parametrize("text, task", [
    (" Explain how tides work.\nTask 6: more", "Explain how tides work."),
    ("Task 5: List three birds.", "List three birds."),
    (' 3. "Write a haiku about rain."', "Write a haiku about rain."),
    ("\n\n", ""),
])
def test_parse_task(text, task):
    assert parse_task(text) == task


SEEDS = ["Write a short poem about the sea at night.", "Explain what a hash table is and when to use one."]


@pytest.mark.parametrize("task, reason", [
    ("Explain photosynthesis.", "too_short"),
    ("Explain " + "very " * 40 + "much.", "too_long"),
    ("- Describe a forest in spring.", "bad_start"),
    ("Éxplique la photosynthèse aux enfants.", "bad_start"),
    ("Draw a map of your town centre.", "unsupported"),
    ("write a short poem about the sea at night.", "duplicate"),
    ("Write a short poem about the sea at dawn.", "similar"),
    ("Give three tips for a first job interview.", None),
])
def test_reject_reasons(task, reason):
    pool = Pool()
    for s in SEEDS:
        pool.add(s)
    assert reject_reason(task, pool, 0.7) == reason


def test_the_proposal_prompt_leaves_the_next_task_open():
    assert proposal_prompt(["A b c d.", "E f g h."]) == \
        "Come up with a series of tasks:\nTask 1: A b c d.\nTask 2: E f g h.\nTask 3:"


@pytest.fixture(scope="module")
def teacher(tiny_model):
    from pistill.models import load_tokenizer

    gen = LlamaCppGenerator(tiny_model, parallel=4, threads=1, gguf_type="f16")
    yield gen, load_tokenizer(tiny_model)
    gen.close()


def test_proposals_are_counted_filtered_and_seeded(teacher):
    """A random tiny teacher writes mostly noise: every proposal is recorded with its fate, the counts add up, the
    kept ones pass the filters against the seeds, and a rerun with the seed gives the same records."""
    gen, tok = teacher
    seeds = SEEDS + ["Give three tips for writing clear emails.", "Why is the sky blue?"]
    new, records, counts = propose(gen, tok, seeds, 3, 0.7, seed=5)
    assert counts["proposed"] == len(records) == counts["kept"] + sum(counts["rejected"].values())
    assert counts["kept"] == len(new) <= 3 and new == [r["task"] for r in records if r["kept"]]
    assert len(records) <= 5 * 3  # PROPOSALS_PER_TASK
    pool = Pool()
    for s in seeds:
        pool.add(s)
    for task in new:
        assert reject_reason(task, pool, 0.7) is None
        pool.add(task)
    assert propose(gen, tok, seeds, 3, 0.7, seed=5) == (new, records, counts)
    assert propose(gen, tok, seeds, 0, 0.7, seed=5) == ([], [], {"proposed": 0, "kept": 0, "rejected": {}})


def test_answers_cycle_through_the_tasks_and_drop_repeats(teacher):
    gen, tok = teacher
    rows, counts = answer_tasks(gen, tok, ["Task one here.", "Task two here."], 5, Sampling(max_new=6, seed=1))
    assert counts["asked"] == 5 == counts["kept"] + counts["empty"] + counts["duplicate"]
    asked = iter(["Task one here.", "Task two here."] * 2 + ["Task one here."])
    assert counts["kept"] == len(rows) and all(r["prompt"] in asked for r in rows)  # in order, each asked once
    assert len({r["response"] for r in rows}) == len(rows) and all(r["response"] for r in rows)
    assert answer_tasks(gen, tok, [], 5, Sampling()) == ([], {"asked": 0, "kept": 0, "empty": 0, "duplicate": 0})
