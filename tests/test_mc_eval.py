"""pistill.mc_eval: both jsonl layouts, lm-eval's token split, acc / acc_norm against the logits by hand, and the
three runtimes (torch, llama.cpp on an F32 GGUF, onnxruntime on an fp32 ONNX folder) agreeing on the same items."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pistill.errors import InputError
from pistill.mc_eval import (MCItem, TorchScorer, block_mask, evaluate, evaluate_mc, n_tokens, open_scorer, pack,
                             parse_item, read_items, requests_for, score_item, split_tokens, summarize)

torch.set_num_threads(1)
TASKS = Path(__file__).resolve().parents[1] / "pistill" / "tasks"

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
    with pytest.raises(InputError, match="line 1: gold 3"):
        read_items(bad)
    bad.write_text('{"query": "x"}\n{"query": \n')
    with pytest.raises(InputError, match="line 1.*neither layout"):
        read_items(bad)
    bad.write_text('\n[1, 2]\n')
    with pytest.raises(InputError, match="line 2 is a JSON list"):
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
        got = score_item(TorchScorer(model, tok), it)
        np.testing.assert_allclose(got["loglik"], ll, rtol=1e-6)
        assert (got["acc"], got["acc_norm"]) == (acc, acc_norm)
    res = evaluate_mc(model, tok, items)
    assert res["n"] == 4
    assert res["acc"] == pytest.approx(np.mean([h[1] for h in hand]))
    assert res["acc_norm"] == pytest.approx(np.mean([h[2] for h in hand]))
    assert res["acc_stderr"] >= 0 and not model.training and res["tokens"] > 0


def test_gold_at_the_models_argmax_scores_one(model_and_tokenizer):
    model, tok = model_and_tokenizer
    item = MCItem("Question: pick", ("x", "y"), 0)
    ll = score_item(TorchScorer(model, tok), item)["loglik"]
    flipped = MCItem(item.context, item.choices, int(np.argmax(ll)))
    assert evaluate_mc(model, tok, [flipped])["acc"] == 1.0


def test_pack_puts_the_context_once_and_each_choice_after_it():
    p = pack([1, 2, 3], [[4, 5], [6], [7, 8, 9]])
    assert p.ids == [1, 2, 3, 4, 7, 8]  # a choice's last token predicts nothing scored
    assert p.positions == [0, 1, 2, 3, 3, 4]  # every choice continues the context's positions
    assert p.segments == [0, 0, 0, 1, 3, 3]
    assert p.picks == [[2, 3], [2], [2, 4, 5]]
    allowed = block_mask(p.segments, 8).int().tolist()
    assert allowed[4] == [1, 1, 1, 0, 1, 0, 0, 0]  # choice 3's first token: the context and itself, not choice 1
    assert allowed[5][:6] == [1, 1, 1, 0, 1, 1] and allowed[7] == [0] * 7 + [1]  # padding sees itself only


@pytest.mark.parametrize("rows, want", [
    ([1, 0, 1, 1], {"n": 4, "acc": 0.75, "acc_stderr": 0.25}),
    ([1], {"n": 1, "acc": 1.0, "acc_stderr": 0.0}),
])
def test_summarize_standard_error(rows, want):
    got = summarize([{"acc": a, "acc_norm": a} for a in rows])
    assert {k: got[k] for k in want} == pytest.approx(want) and got["acc_norm"] == got["acc"]


def test_empty_choice_is_refused(model_and_tokenizer):
    with pytest.raises(InputError, match="tokenizes to nothing"):
        requests_for(TorchScorer(*model_and_tokenizer), [MCItem("Question: pick", ("x", ""), 0)], delimiter="")


def test_batching_and_attention_kernel_do_not_change_the_scores(model_and_tokenizer, jsonl, tiny_model):
    """One request per forward pass, many with padding, and eager attention instead of sdpa: the same sums."""
    from transformers import AutoModelForCausalLM

    model, tok = model_and_tokenizer
    reqs = requests_for(TorchScorer(model, tok), read_items(jsonl, suffix="\nAnswer:"))
    batched = TorchScorer(model, tok).logliks(reqs)
    alone = TorchScorer(model, tok, token_budget=1).logliks(reqs)
    eager = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32, attn_implementation="eager").eval()
    for a, b, c in zip(batched, alone, TorchScorer(eager, tok).logliks(reqs)):
        np.testing.assert_allclose(a, b, rtol=1e-5)
        np.testing.assert_allclose(a, c, rtol=1e-5)


@pytest.fixture(scope="module")
def exported(tiny_model, tmp_path_factory):
    """The tiny model as an F32 GGUF file and an fp32 ONNX folder: unquantized, so only the runtime differs."""
    from pistill.export import onnx
    from pistill.export.gguf_convert import write_gguf

    root = tmp_path_factory.mktemp("mc-exports")
    return {"hf": tiny_model, "gguf": write_gguf(tiny_model, root / "model-f32.gguf", "f32"),
            "onnx": onnx.export(tiny_model, root / "onnx", onnx.ONNXConfig(precision="fp32"))}


def test_torch_llama_cpp_and_onnxruntime_agree(exported, jsonl):
    """The same items through the three scorers: the same tokens, log-likelihoods within float rounding, the same
    choices; so an accuracy difference between rows of a report is the model's, not the runtime's."""
    items = read_items(jsonl, suffix="\nAnswer:") + read_items(TASKS / "arc_easy.jsonl", 6, "\nAnswer:") \
        + read_items(TASKS / "piqa.jsonl", 6, "\nAnswer:")
    got = {}
    for fmt, path in exported.items():
        with open_scorer(path, fmt, threads=2) as scorer:
            reqs = requests_for(scorer, items)
            got[fmt] = (reqs, scorer.logliks(reqs), evaluate(scorer, items))
    ref_reqs, ref_ll, ref_res = got["hf"]
    for fmt in ("gguf", "onnx"):
        reqs, ll, res = got[fmt]
        assert reqs == ref_reqs, fmt  # llama.cpp's and tokenizer.json's tokenizers split as the HF one
        for a, b in zip(ll, ref_ll):
            np.testing.assert_allclose(a, b, atol=2e-3, rtol=1e-4, err_msg=fmt)
            assert np.argmax(a) == np.argmax(b)
        assert res == ref_res, fmt  # acc, acc_norm, their standard errors, n, tokens


def test_llama_cpp_batches_requests_and_gives_a_long_one_its_own(exported, jsonl):
    """Budgets split the requests over several llama_decode calls (one at a time at the smallest); a request longer
    than the budget goes alone in a context grown to fit it: the same sums within llama.cpp's rounding."""
    items = read_items(jsonl, suffix="\nAnswer:") + read_items(TASKS / "piqa.jsonl", 3, "\nAnswer:")
    got = []
    for budget in (1024, 300, 16):
        with open_scorer(exported["gguf"], "gguf", threads=1, token_budget=budget) as scorer:
            reqs = requests_for(scorer, items)
            got.append(scorer.logliks(reqs))
            assert scorer.token_budget == max(budget, max(n_tokens([r]) for r in reqs))
    for one in got[1:]:
        for a, b in zip(one, got[0]):
            np.testing.assert_allclose(a, b, atol=1e-3)
    with open_scorer(exported["gguf"], "gguf", threads=1) as scorer:
        with pytest.raises(InputError, match="has 65 choices; the llama.cpp scorer takes at most 64"):
            scorer.logliks([([10, 11], [[12]] * 65)])
