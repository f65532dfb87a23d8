"""pistill.mc_eval: both jsonl layouts, lm-eval's token split, and acc / acc_norm against the logits by hand."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pistill.mc_eval import MCItem, evaluate_mc, parse_item, read_items, score_item, split_tokens

torch.set_num_threads(1)

ROWS = [
    {"query": "Question: Which returns a copy of the list?", "choices": ["list.copy()", "list.clear()"], "gold": 0},
    {"query": "Question: What does len() return?", "choices": ["the number of items", "a string", "None"],
     "gold": 0},
    {"activity_label": "Reading files", "ctx": "The function opens the file and",
     "endings": ["returns its contents.", "deletes the disk.", "prints nothing at all", "raises"], "label": 0},
    {"query": "Question: Which module parses JSON?", "choices": ["json", "math"], "gold": 1},
]


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval(), \
        AutoTokenizer.from_pretrained(tiny_model)


@pytest.fixture
def jsonl(tmp_path):
    path = tmp_path / "mc.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS) + "\n")
    return path


@pytest.mark.parametrize("row, want", [
    (ROWS[0], MCItem("Question: Which returns a copy of the list?\nAnswer:", ("list.copy()", "list.clear()"), 0)),
    (ROWS[2], MCItem("Reading files: The function opens the file and\nAnswer:", tuple(ROWS[2]["endings"]), 0)),
])
def test_parse_both_layouts(row, want):
    assert parse_item(row, suffix="\nAnswer:") == want


def test_read_items_limit_and_bad_rows(jsonl, tmp_path):
    assert len(read_items(jsonl)) == 4 and len(read_items(jsonl, limit=2)) == 2
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "x", "answers": []}) + "\n")
    with pytest.raises(ValueError, match="neither layout"):
        read_items(bad)
    bad.write_text(json.dumps({"query": "x", "choices": ["a"], "gold": 3}) + "\n")
    with pytest.raises(ValueError, match="line 1: gold 3"):
        read_items(bad)


def test_split_tokens_rebuilds_the_whole_string(model_and_tokenizer):
    _, tok = model_and_tokenizer
    ctx, cont = split_tokens(tok, "Question: What does len() return?", " the number of items")
    assert tok.decode(ctx + cont) == "Question: What does len() return? the number of items"
    assert tok.decode(cont).strip() == "the number of items"
    assert split_tokens(tok, "", "hello")[0] == [tok.eos_token_id]


def by_hand(model, tok, item: MCItem) -> tuple[np.ndarray, int, int]:
    """Each choice alone through the model (no batching, no padding): its summed log-probs, acc, acc_norm."""
    ll = []
    for choice in item.choices:
        ctx = tok(item.context, add_special_tokens=False).input_ids
        whole = tok(item.context + " " + choice, add_special_tokens=False).input_ids
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([whole])).logits[0].double()
        logp = torch.log_softmax(logits, -1)
        ll.append(sum(float(logp[i - 1, whole[i]]) for i in range(len(ctx), len(whole))))
    ll = np.array(ll)
    norm = ll / np.array([len((" " + c).encode()) for c in item.choices])
    return ll, int(ll.argmax() == item.gold), int(norm.argmax() == item.gold)


def test_scores_match_a_direct_computation_from_the_logits(model_and_tokenizer, jsonl):
    model, tok = model_and_tokenizer
    items = read_items(jsonl)
    hand = [by_hand(model, tok, it) for it in items]
    for it, (ll, acc, acc_norm) in zip(items, hand):
        got = score_item(model, tok, it)
        np.testing.assert_allclose(got["loglik"], ll, rtol=1e-6)
        assert (got["acc"], got["acc_norm"]) == (acc, acc_norm)
    res = evaluate_mc(model, tok, items)
    assert res["n"] == 4
    assert res["acc"] == pytest.approx(np.mean([h[1] for h in hand]))
    assert res["acc_norm"] == pytest.approx(np.mean([h[2] for h in hand]))
    assert res["acc_stderr"] >= 0 and not model.training


def test_gold_at_the_models_argmax_scores_one(model_and_tokenizer):
    model, tok = model_and_tokenizer
    item = MCItem("Question: pick", ("x", "y"), 0)
    ll = score_item(model, tok, item)["loglik"]
    flipped = MCItem(item.context, item.choices, int(np.argmax(ll)))
    assert evaluate_mc(model, tok, [flipped])["acc"] == 1.0
