"""Zero-shot multiple-choice accuracy (ARC, PIQA, HellaSwag...) of an in-memory torch causal LM, scored as lm-eval.

Each choice is scored by the sum of log p(delimiter + choice | context) over the continuation's tokens; `acc` takes
the argmax of that sum, `acc_norm` the argmax of the sum divided by the continuation's length in UTF-8 bytes
(lm-eval's `acc_norm`, Gao et al. 2021, "A framework for few-shot language model evaluation"). The continuation
tokens are those of tokenize(context + continuation) after the tokens of tokenize(context), as lm-eval splits them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class MCItem:
    """One question: the context, its candidate continuations and the index of the right one."""

    context: str
    choices: tuple[str, ...]
    gold: int


def parse_item(row: dict, suffix: str = "") -> MCItem:
    """A jsonl row in the standard layout {query, choices, gold} or the HellaSwag one {activity_label, ctx, endings,
    label} (context = activity_label + ": " + ctx); `suffix` is appended to the context (e.g. "\\nAnswer:")."""
    if {"query", "choices", "gold"} <= row.keys():
        return MCItem(row["query"] + suffix, tuple(row["choices"]), int(row["gold"]))
    if {"activity_label", "ctx", "endings", "label"} <= row.keys():
        return MCItem(f"{row['activity_label']}: {row['ctx']}{suffix}", tuple(row["endings"]), int(row["label"]))
    raise ValueError(f"multiple-choice row with keys {sorted(row)} has neither layout; expected "
                     "{query, choices, gold} or {activity_label, ctx, endings, label}")


def read_items(path: str | Path, limit: int = 0, suffix: str = "") -> list[MCItem]:
    """The first `limit` items (all if 0) of a multiple-choice jsonl file."""
    items = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        item = parse_item(json.loads(line), suffix)
        if not 0 <= item.gold < len(item.choices):
            raise ValueError(f"{path} line {n}: gold {item.gold} is not an index of its {len(item.choices)} choices")
        items.append(item)
        if limit and len(items) == limit:
            break
    return items


def split_tokens(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Context and continuation token ids as lm-eval splits them: the whole string is tokenized once, and the
    continuation is what follows the context's own tokens. An empty context becomes the EOS token."""
    ctx = tokenizer(context, add_special_tokens=False).input_ids
    whole = tokenizer(context + continuation, add_special_tokens=False).input_ids
    cont = whole[len(ctx):]
    return (ctx or [tokenizer.eos_token_id]), cont


def continuation_logprobs(model, tokenizer, context: str, continuations: list[str]) -> np.ndarray:
    """Sum of log p(continuation | context) over each continuation's tokens: (n_choices,) float64.

    The choices go through the model as one right-padded batch (padding after a sequence cannot change it).
    """
    import torch

    pairs = [split_tokens(tokenizer, context, c) for c in continuations]
    seqs = [ctx + cont for ctx, cont in pairs]
    width = max(map(len, seqs))
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, : len(s)], mask[i, : len(s)] = torch.tensor(s), 1
    with torch.inference_mode():
        logits = model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device),
                       use_cache=False).logits  # (C, W, V)
        out = []
        for i, (ctx, cont) in enumerate(pairs):
            pos = torch.arange(len(ctx) - 1, len(ctx) + len(cont) - 1)  # the positions predicting the cont tokens
            logp = torch.log_softmax(logits[i, pos].double(), dim=-1)  # (len(cont), V)
            out.append(float(logp[torch.arange(len(cont)), torch.tensor(cont)].sum()))
    return np.asarray(out)


def score_item(model, tokenizer, item: MCItem, delimiter: str = " ") -> dict:
    """Log-likelihoods of the item's choices and whether the argmax (acc) and byte-normalised argmax (acc_norm)
    pick the gold one."""
    conts = [delimiter + c for c in item.choices]
    ll = continuation_logprobs(model, tokenizer, item.context, conts)
    norm = ll / np.array([len(c.encode("utf-8")) for c in conts])
    return {"loglik": ll.tolist(), "acc": int(np.argmax(ll) == item.gold),
            "acc_norm": int(np.argmax(norm) == item.gold)}


def evaluate_mc(model, tokenizer, items: list[MCItem], delimiter: str = " ") -> dict:
    """acc and acc_norm over `items`, with their standard errors, for an in-memory HF causal LM."""
    was_training = model.training
    model.eval()
    try:
        rows = [score_item(model, tokenizer, it, delimiter) for it in items]
    finally:
        model.train(was_training)
    out = {"n": len(rows)}
    for key in ("acc", "acc_norm"):
        v = np.array([r[key] for r in rows], dtype=float)
        out[key] = float(v.mean())
        out[f"{key}_stderr"] = float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else 0.0
    return out
