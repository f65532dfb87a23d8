"""Zero-shot multiple-choice accuracy (ARC, PIQA, HellaSwag...) of a causal LM in torch, llama.cpp or onnxruntime,
scored as lm-eval.

Each choice is scored by the sum of log p(delimiter + choice | context) over the continuation's tokens; `acc` takes
the argmax of that sum, `acc_norm` the argmax of the sum divided by the continuation's length in UTF-8 bytes
(lm-eval's `acc_norm`, Gao et al. 2021, "A framework for few-shot language model evaluation"). The continuation
tokens are those of tokenize(context + continuation) after the tokens of tokenize(context), as lm-eval splits them.

The three runtimes share everything but one method (`logliks`, see the scorers), each computing an item's context
once: torch and llama.cpp pack the choices behind one copy of it (a block mask; sequences of a unified KV cache),
several items per forward pass, and onnxruntime keeps its KV cache for each choice.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .errors import InputError
from .formats import runtime_for_format
from .registry import lookup


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
        return MCItem(_text(row, "query") + suffix, _choices(row, "choices"), _gold(row["gold"], "gold"))
    if {"activity_label", "ctx", "endings", "label"} <= row.keys():
        return MCItem(f"{_text(row, 'activity_label')}: {_text(row, 'ctx')}{suffix}", _choices(row, "endings"),
                      _gold(row["label"], "label"))
    raise InputError(f"multiple-choice row with keys {sorted(row)} has neither layout; expected "
                     "{query, choices, gold} or {activity_label, ctx, endings, label}")


def _text(row: dict, key: str) -> str:
    if not isinstance(row[key], str):
        raise InputError(f"'{key}' is a JSON {type(row[key]).__name__}, not a string")
    return row[key]


def _choices(row: dict, key: str) -> tuple[str, ...]:
    value = row[key]
    if not isinstance(value, list) or not all(isinstance(c, str) for c in value):
        raise InputError(f"'{key}' must be a list of strings, got {json.dumps(value)[:80]}")
    return tuple(value)


def _gold(value, key: str) -> int:
    """The right choice's index: an integer, or a string of digits (HellaSwag's label "2")."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().isdecimal():
        return int(value)
    raise InputError(f"'{key}' = {json.dumps(value)[:40]} is not the index of a choice (an integer)")


def read_items(path: str | Path, limit: int = 0, suffix: str = "") -> list[MCItem]:
    """The first `limit` items (all if 0) of a multiple-choice jsonl file; InputError naming the file and line."""
    items = []
    for n, line in _lines(Path(path)):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{path} line {n} is not JSON ({e.msg} at column {e.colno}); write one item per "
                             "line") from None
        if not isinstance(row, dict):
            raise InputError(f"{path} line {n} is a JSON {type(row).__name__}, not an item object")
        try:
            item = parse_item(row, suffix)
        except ValueError as e:  # a missing layout, a gold that is no integer...
            raise InputError(f"{path} line {n}: {e}") from None
        if not 0 <= item.gold < len(item.choices):
            raise InputError(f"{path} line {n}: gold {item.gold} is not an index of its {len(item.choices)} choices")
        items.append(item)
        if limit and len(items) == limit:
            break
    return items


def _lines(path: Path) -> list[tuple[int, str]]:
    """(line number, text) of each line of a UTF-8 file, split at "\\n" only (a JSON string may hold U+2028)."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise InputError(f"task file {path} cannot be read ({type(e).__name__}: {e.strerror}); make it a file you "
                         "may read, or fix [eval] tasks") from None
    out = []
    for n, raw in enumerate(data.split(b"\n"), 1):
        try:
            out.append((n, raw.decode("utf-8-sig" if n == 1 else "utf-8")))
        except UnicodeDecodeError as e:
            raise InputError(f"{path} line {n} is not UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1}); "
                             "save the file as UTF-8") from None
    return out


def encode_pair(tokenize: Callable[[str], list[int]], eos_id: int | None, context: str,
                continuation: str) -> tuple[list[int], list[int]]:
    """Context and continuation token ids as lm-eval splits them: the whole string is tokenized once, and the
    continuation is what follows the context's own tokens. An empty context becomes the EOS token."""
    ctx = tokenize(context)
    cont = tokenize(context + continuation)[len(ctx):]
    if not ctx:
        if eos_id is None:
            raise InputError("an item has an empty context and this model has no EOS token to stand for it; "
                             "give every item a query (or a suffix)")
        ctx = [eos_id]
    if not cont:
        raise InputError(f"the choice {continuation!r} after {context[-40:]!r} tokenizes to nothing; "
                         "remove the empty choice")
    return ctx, cont


def split_tokens(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """`encode_pair` with a Hugging Face tokenizer (no special tokens added)."""
    return encode_pair(lambda t: tokenizer(t, add_special_tokens=False).input_ids, tokenizer.eos_token_id,
                       context, continuation)


def target_logprob_sum(logits: np.ndarray, targets: list[int]) -> float:
    """Sum over t of log softmax(logits[t])[targets[t]], in float64: (T, V) logits, T targets."""
    z = np.asarray(logits, dtype=np.float64)
    top = z.max(axis=-1)
    lse = top + np.log(np.exp(z - top[:, None]).sum(axis=-1))
    return float((z[np.arange(len(targets)), targets] - lse).sum())


# --- scorers: one runtime each, one interface --------------------------------------------------------------------
# A scorer has `tokenize(text) -> ids`, `eos_id`, and `logliks(requests) -> [(n_choices,) float64 array]`, where a
# request is (context ids, [continuation ids, ...]): the summed log-probs of each continuation after the context.
# Each computes the context once per request.

Request = tuple[list[int], list[list[int]]]


@dataclass(frozen=True)
class Packed:
    """One request as one sequence: the context once, then every continuation but its last token, each continuation
    attending to the context and to itself only (a block mask), its positions continuing the context's."""

    ids: list[int]
    positions: list[int]
    segments: list[int]  # 0 = context, j + 1 = continuation j
    picks: list[list[int]]  # per continuation: the sequence indices whose logits predict its tokens


def pack(ctx: list[int], conts: list[list[int]]) -> Packed:
    ids, pos, seg, picks = list(ctx), list(range(len(ctx))), [0] * len(ctx), []
    for j, cont in enumerate(conts):
        start = len(ids)
        picks.append([len(ctx) - 1] + list(range(start, start + len(cont) - 1)))
        ids += cont[:-1]  # the last token predicts nothing we score
        pos += range(len(ctx), len(ctx) + len(cont) - 1)
        seg += [j + 1] * (len(cont) - 1)
    return Packed(ids, pos, seg, picks)


def block_mask(segments, length: int):
    """(length, length) bool, True where query i may attend key k: k <= i, and k in the context or in i's own
    continuation; padding rows (past len(segments)) attend to themselves only."""
    import torch

    n = len(segments)
    seg = torch.tensor(segments)
    idx = torch.arange(n)
    allowed = torch.eye(length, dtype=torch.bool)
    allowed[:n, :n] = (idx[None, :] <= idx[:, None]) & ((seg[None, :] == 0) | (seg[None, :] == seg[:, None]))
    return allowed


class TorchScorer:
    """A Hugging Face causal LM: several requests per forward pass, each packed into one sequence (`pack`) under a
    block mask (a custom 4D attention mask), and the output head applied only where a choice token is predicted."""

    def __init__(self, model, tokenizer, token_budget: int = 512):
        self.model, self.tok, self.token_budget = model, tokenizer, token_budget  # padded tokens per forward pass
        self.eos_id = tokenizer.eos_token_id

    def close(self) -> None:
        pass

    def tokenize(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False).input_ids

    def logliks(self, requests: list[Request]) -> list[np.ndarray]:
        packs = [pack(ctx, conts) for ctx, conts in requests]
        order = sorted(range(len(packs)), key=lambda i: -len(packs[i].ids))  # longest first: little padding
        out: list[np.ndarray] = [np.empty(0)] * len(packs)
        i = 0
        while i < len(order):
            n = max(1, self.token_budget // len(packs[order[i]].ids))
            batch = order[i:i + n]
            for k, ll in zip(batch, self._forward([packs[k] for k in batch], [requests[k][1] for k in batch])):
                out[k] = ll
            i += n
        return out

    def _forward(self, packs: list[Packed], conts: list[list[list[int]]]) -> list[np.ndarray]:
        import torch

        dev, dtype = self.model.device, self.model.get_input_embeddings().weight.dtype
        width = len(packs[0].ids)
        ids = torch.zeros(len(packs), width, dtype=torch.long)
        pos = torch.zeros_like(ids)
        mask = torch.full((len(packs), 1, width, width), torch.finfo(dtype).min, dtype=dtype)
        for b, p in enumerate(packs):
            ids[b, : len(p.ids)], pos[b, : len(p.ids)] = torch.tensor(p.ids), torch.tensor(p.positions)
            mask[b, 0].masked_fill_(block_mask(p.segments, width), 0.0)
        rows = torch.tensor([(b, i) for b, p in enumerate(packs) for pk in p.picks for i in pk])  # (N, 2)
        targets = torch.tensor([t for cs in conts for c in cs for t in c], device=dev)  # (N,)
        with torch.inference_mode():
            hidden = self.model.base_model(input_ids=ids.to(dev), attention_mask=mask.to(dev),
                                           position_ids=pos.to(dev), use_cache=False).last_hidden_state  # (B, W, H)
            logits = self.model.get_output_embeddings()(hidden[rows[:, 0], rows[:, 1]]).float()  # (N, V)
            logp = (logits.gather(1, targets[:, None])[:, 0] - logits.logsumexp(-1)).double().cpu().numpy()
        sums = np.add.reduceat(logp, np.cumsum([0] + [len(c) for cs in conts for c in cs])[:-1])  # per choice
        starts = np.cumsum([0] + [len(cs) for cs in conts])
        return [sums[a:b] for a, b in zip(starts[:-1], starts[1:])]


class LlamaCppScorer:
    """A GGUF file through llama.cpp: several requests per `llama_decode`, laid out as `pack` lays them in torch.
    Each request's context tokens belong to the sequences of all its choices and each choice's tokens to its own
    (a unified KV cache masks attention by sequence, as the block mask does), and logits are asked only where a
    choice token is predicted. A context of its own beside the runtime's (`llama_init_from_model` on the same
    weights): many sequences, flash attention off as in the runtime."""

    MAX_SEQS = 64  # sequences (choices) per llama_decode

    def __init__(self, rt, token_budget: int = 512):
        import llama_cpp

        self.rt, self.llm, self.lib = rt, rt.llm, llama_cpp
        self.eos_id, self.n_vocab = self.llm.token_eos(), self.llm.n_vocab()
        self.ctx = self.batch = None
        self._open(token_budget)

    def _open(self, token_budget: int) -> None:
        """A context and a batch for `token_budget` tokens per llama_decode (the old ones freed)."""
        lib = self.lib
        self.close()
        self.token_budget = token_budget  # llama.cpp reserves an output row per sequence: no more of them than tokens
        self.max_seqs = min(self.MAX_SEQS, token_budget, lib.llama_max_parallel_sequences())
        params = lib.llama_context_default_params()
        params.n_ctx = params.n_batch = params.n_ubatch = token_budget
        params.n_seq_max, params.kv_unified = self.max_seqs, True
        params.n_threads = params.n_threads_batch = self.llm.n_threads
        params.flash_attn_type = lib.LLAMA_FLASH_ATTN_TYPE_DISABLED
        self.ctx = lib.llama_init_from_model(self.llm.model, params)
        if not self.ctx:
            raise RuntimeError(f"llama.cpp could not create a {token_budget}-token context for scoring")
        self.batch = lib.llama_batch_init(token_budget, 0, self.max_seqs)

    def tokenize(self, text: str) -> list[int]:
        return self.rt.tokenize(text)

    def logliks(self, requests: list[Request]) -> list[np.ndarray]:
        if (most := max((len(r[1]) for r in requests), default=0)) > self.MAX_SEQS:
            raise InputError(f"an item has {most} choices; the llama.cpp scorer takes at most {self.MAX_SEQS}")
        if (longest := max((n_tokens([r]) for r in requests), default=0)) > self.token_budget:
            self._open(longest)  # an item longer than the budget: a batch of its own
        out, group, tokens, seqs = [], [], 0, 0
        for req in requests:
            n = n_tokens([req])
            if group and (tokens + n > self.token_budget or seqs + len(req[1]) > self.max_seqs):
                out += self._decode(group)
                group, tokens, seqs = [], 0, 0
            group.append(req)
            tokens, seqs = tokens + n, seqs + len(req[1])
        return out + (self._decode(group) if group else [])

    def _add(self, token: int, pos: int, seqs: list[int], logits: bool) -> None:
        b, i = self.batch, self.batch.n_tokens
        b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = token, pos, len(seqs), logits
        for k, s in enumerate(seqs):
            b.seq_id[i][k] = s
        b.n_tokens += 1

    def _decode(self, group: list[Request]) -> list[np.ndarray]:
        self.batch.n_tokens, rows, picks, first_seq = 0, 0, [], 0
        for ctx, conts in group:
            seqs = list(range(first_seq, first_seq + len(conts)))
            first_seq += len(conts)
            for t, token in enumerate(ctx):
                self._add(token, t, seqs, t == len(ctx) - 1)
            last, rows = rows, rows + 1  # the output row predicting every choice's first token
            picks.append([])
            for seq, cont in zip(seqs, conts):
                for k, token in enumerate(cont[:-1]):
                    self._add(token, len(ctx) + k, [seq], True)
                picks[-1].append([last] + list(range(rows, rows + len(cont) - 1)))
                rows += len(cont) - 1
        if (rc := self.lib.llama_decode(self.ctx, self.batch)) != 0:
            raise RuntimeError(f"llama_decode failed with code {rc} on {self.batch.n_tokens} tokens")
        logits = np.ctypeslib.as_array(self.lib.llama_get_logits(self.ctx), shape=(rows, self.n_vocab))  # (R, V)
        out = [np.asarray([target_logprob_sum(logits[p], c) for p, c in zip(pk, conts)])
               for pk, (_, conts) in zip(picks, group)]
        self.lib.llama_memory_clear(self.lib.llama_get_memory(self.ctx), True)
        return out

    def close(self) -> None:
        if self.batch is not None:
            self.lib.llama_batch_free(self.batch)
        if self.ctx is not None:
            self.lib.llama_free(self.ctx)
        self.ctx = self.batch = None


class OrtScorer:
    """An ONNX folder through onnxruntime and numpy (`ortlm.OrtLM`, the loop the Pi runs): the context's KV cache
    is kept and each continuation runs after it (`OrtLM.extend`)."""

    def __init__(self, rt, token_budget: int = 512):
        self.rt, self.lm = rt, rt.lm  # one request at a time: the ONNX graph takes no block mask
        self.eos_id = self.lm.spec.eos_ids[0] if self.lm.spec.eos_ids else None

    def tokenize(self, text: str) -> list[int]:
        return self.rt.tokenize(text)

    def logliks(self, requests: list[Request]) -> list[np.ndarray]:
        out = []
        for ctx, conts in requests:
            last = self.lm.extend(ctx, keep=0)[-1:]  # (1, V): predicts each continuation's first token
            out.append(np.asarray([target_logprob_sum(
                np.concatenate([last, self.lm.extend(c[:-1], keep=len(ctx))]) if len(c) > 1 else last, c)
                for c in conts]))
        return out

    def close(self) -> None:
        pass


SCORERS: dict[str, Callable] = {  # runtime name -> scorer(open runtime, token budget)
    "torch": lambda rt, budget: TorchScorer(rt.model, rt.tok, budget),
    "llama_cpp": LlamaCppScorer,
    "onnxruntime": OrtScorer,
}


@contextmanager
def open_scorer(path: str | Path, fmt: str, threads: int = 0, token_budget: int = 512):
    """A scorer for a model on disk: fmt "hf" (torch, float32 on a CPU), "gguf" (llama.cpp) or "onnx" (the numpy
    loop). `token_budget`: tokens per forward pass in torch and llama.cpp (512 was the fastest of 256 / 512 / 1024
    for both on 2 cores); a longer item goes alone."""
    from pistill.device.runtimes import get_runtime

    name = runtime_for_format(fmt)
    make_scorer = lookup(SCORERS, name, "zero-shot scoring in runtime")  # before the model loads
    rt = get_runtime(name)(str(path), threads, min(token_budget, 512))  # the runtime's own cache: not for scoring
    try:
        scorer = make_scorer(rt, token_budget)
        try:
            yield scorer
        finally:
            scorer.close()
    finally:
        rt.close()


# --- scoring --------------------------------------------------------------------------------------------------------

def requests_for(scorer, items: list[MCItem], delimiter: str = " ") -> list[Request]:
    """One request per item: its context and each `delimiter + choice`, split as lm-eval splits them."""
    requests = []
    for it in items:
        pairs = [encode_pair(scorer.tokenize, scorer.eos_id, it.context, delimiter + c) for c in it.choices]
        requests.append((pairs[0][0], [cont for _, cont in pairs]))
    return requests


def n_tokens(requests: list[Request]) -> int:
    """Tokens a scorer runs through the model for these requests: each context once, each continuation but its
    last token."""
    return sum(len(ctx) + sum(len(c) - 1 for c in conts) for ctx, conts in requests)


def judge(item: MCItem, ll: np.ndarray, delimiter: str = " ") -> dict:
    """The choices' log-likelihoods, and whether the argmax (acc) and the argmax per UTF-8 byte of the continuation
    (acc_norm) pick the gold one."""
    norm = ll / np.array([len((delimiter + c).encode("utf-8")) for c in item.choices])
    return {"loglik": ll.tolist(), "acc": int(np.argmax(ll) == item.gold),
            "acc_norm": int(np.argmax(norm) == item.gold)}


def score_items(scorer, items: list[MCItem], delimiter: str = " ") -> list[dict]:
    """`judge` of each item."""
    return [judge(it, ll, delimiter) for it, ll in zip(items, scorer.logliks(requests_for(scorer, items, delimiter)))]


def summarize(rows: list[dict]) -> dict:
    """n, acc and acc_norm with their standard errors (sample std / sqrt(n), as lm-eval's `mean_stderr`)."""
    out = {"n": len(rows)}
    for key in ("acc", "acc_norm"):
        v = np.array([r[key] for r in rows], dtype=float)
        out[key] = float(v.mean()) if len(v) else float("nan")
        out[f"{key}_stderr"] = float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else 0.0
    return out


def score_item(scorer, item: MCItem, delimiter: str = " ") -> dict:
    return score_items(scorer, [item], delimiter)[0]


def evaluate(scorer, items: list[MCItem], delimiter: str = " ") -> dict:
    """`summarize` over `items`, plus `tokens`: how many went through the model."""
    requests = requests_for(scorer, items, delimiter)
    rows = [judge(it, ll, delimiter) for it, ll in zip(items, scorer.logliks(requests))]
    return {**summarize(rows), "tokens": n_tokens(requests)}


def evaluate_mc(model, tokenizer, items: list[MCItem], delimiter: str = " ") -> dict:
    """acc and acc_norm over `items`, with their standard errors, for an in-memory HF causal LM."""
    was_training = model.training
    model.eval()
    try:
        return evaluate(TorchScorer(model, tokenizer), items, delimiter)
    finally:
        model.train(was_training)
