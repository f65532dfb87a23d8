"""Held-out quality against the teacher: bits per byte, perplexity per teacher token, top-1 agreement and KL, for
torch, GGUF and ONNX models, with the teacher's vocabulary or a trimmed one."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .artifact import Artifact
from .data import load_blocks, load_reference, load_token_bytes
from .formats import runtime_for_format


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """(T, V) -> (T, V) in float64, numerically stable."""
    z = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


@dataclass(frozen=True)
class HeldoutBlock:
    """One held-out block in a model's token ids: the targets from `first` on are scored (earlier ones are pieces
    of the block's first teacher token, which no model predicts)."""

    ids: np.ndarray  # (T',) the model's token ids (T' = T with the teacher's vocabulary)
    first: int  # index of the first scored target
    n_bytes: int  # UTF-8 bytes of the scored targets: the same for every vocabulary
    n_teacher: int  # teacher tokens of the scored targets (T - 1): perplexity's denominator


def heldout(data: Artifact, vocab=None) -> list[HeldoutBlock]:
    """The held-out blocks of `data` in the ids of a model with `vocab` (a compress.vocab.VocabMap; None: the
    teacher's own vocabulary): dropped teacher tokens become the pieces the trimmed tokenizer writes them as."""
    blocks, nbytes = load_blocks(data, "heldout"), load_token_bytes(data)
    out = []
    for block in blocks:
        b = int(nbytes[block[1:]].sum())
        if vocab is None:
            out.append(HeldoutBlock(block.astype(np.int64), 1, b, len(block) - 1))
            continue
        ids, src = vocab.to_student(block)
        out.append(HeldoutBlock(ids, int(np.searchsorted(src, 1)), b, len(block) - 1))
    return out


@dataclass
class Scores:
    """Running sums over held-out positions. Agreement and KL compare with the teacher's reference token by
    token, so they exist only for models with the teacher's vocabulary."""

    nll: float = 0.0  # nats over the scored targets
    n_teacher: int = 0  # teacher tokens of those targets
    n_bytes: int = 0  # their UTF-8 bytes
    agree: int = 0
    kl: float = 0.0
    n_pos: int = 0  # positions compared with the teacher's reference
    n_tokens: int = 0  # the model's own held-out tokens

    def add(self, logits: np.ndarray, block: HeldoutBlock, ref: tuple | None = None) -> None:
        """logits (T', V) of the model on `block`; `ref`: the teacher's argmax (T,) and top-k ids and log-probs
        (T, K) on the same block, for a model with the teacher's vocabulary."""
        lp, ids = log_softmax(logits), block.ids
        t = np.arange(block.first, len(ids))
        self.nll -= float(lp[t - 1, ids[t]].sum())
        self.n_teacher += block.n_teacher
        self.n_bytes += block.n_bytes
        self.n_tokens += len(ids)
        if ref is not None:
            top1, topk_ids, topk_logp = ref
            self.agree += int((lp.argmax(-1) == top1).sum())
            # KL(teacher || model) over the teacher's top-k tokens (they hold `topk_mass` of its probability)
            student = np.take_along_axis(lp, topk_ids.astype(np.int64), axis=-1)
            self.kl += float((np.exp(topk_logp) * (topk_logp - student)).sum())
            self.n_pos += len(ids)

    def result(self) -> dict:
        """bpb: bits per byte of the held-out text; ppl: e to the nats per teacher token (the teacher's tokens of
        the same text, whatever the model's vocabulary, so it compares across vocabularies)."""
        return {"bpb": self.nll / (math.log(2) * max(self.n_bytes, 1)),
                "ppl": float(np.exp(self.nll / max(self.n_teacher, 1))),
                "agreement": self.agree / self.n_pos if self.n_pos else None,
                "kl": self.kl / self.n_pos if self.n_pos else None, "n_tokens": self.n_tokens}


def evaluate_fn(logits_fn, data: Artifact, vocab=None) -> dict:
    """Score `logits_fn(ids: list[int]) -> (T, V) array` on the held-out blocks of a data artifact; `vocab` is the
    model's VocabMap when it was trimmed."""
    ref = load_reference(data) if vocab is None else None
    s = Scores()
    for i, block in enumerate(heldout(data, vocab)):
        r = None if ref is None else (ref["top1"][i], ref["topk_ids"][i], ref["topk_logp"][i])
        s.add(np.asarray(logits_fn(block.ids.tolist())), block, r)
    return s.result()


def evaluate_torch(model, data: Artifact, vocab=None) -> dict:
    """Held-out metrics of an in-memory HF causal LM (`vocab`: its VocabMap when trimmed)."""
    import torch

    def logits_fn(ids):
        x = torch.tensor([ids], device=model.device)
        with torch.inference_mode():
            return model(input_ids=x).logits[0].float().cpu().numpy()

    was_training = model.training
    model.eval()
    try:
        return evaluate_fn(logits_fn, data, vocab)
    finally:
        model.train(was_training)


def heldout_ctx(data: Artifact, vocab=None) -> int:
    """The context a runtime needs for the held-out blocks in a model's ids (at least 512)."""
    return max([len(b.ids) for b in heldout(data, vocab)] + [512])


def evaluate_path(path: str | Path, fmt: str, data: Artifact, threads: int = 0, vocab=None) -> dict:
    """Held-out metrics of a model on disk of format `fmt` (a key of pistill.formats.FORMATS), in its runtime;
    `vocab`: the model's VocabMap when it was trimmed."""
    from pistill.device.runtimes import get_runtime

    rt = get_runtime(runtime_for_format(fmt))(str(path), threads, heldout_ctx(data, vocab))
    try:
        return evaluate_fn(rt.logits, data, vocab)
    finally:
        rt.close()
