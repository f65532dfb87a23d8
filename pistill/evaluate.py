"""Held-out quality against the teacher: perplexity, top-1 agreement and KL, for torch, GGUF and ONNX models."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .artifact import Artifact
from .data import load_blocks, load_reference
from .formats import runtime_for_format


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """(T, V) -> (T, V) in float64, numerically stable."""
    z = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


@dataclass
class Scores:
    """Running sums over held-out positions."""

    nll: float = 0.0
    n_next: int = 0  # positions with a next token
    agree: int = 0
    kl: float = 0.0
    n_pos: int = 0

    def add(self, logits: np.ndarray, ids: np.ndarray, top1: np.ndarray, topk_ids: np.ndarray,
            topk_logp: np.ndarray) -> None:
        """logits (T, V) of the model on block `ids` (T,); teacher argmax (T,) and top-k (T, K)."""
        lp = log_softmax(logits)
        nll = -lp[np.arange(len(ids) - 1), ids[1:]]
        self.nll += float(nll.sum())
        self.n_next += len(nll)
        self.agree += int((lp.argmax(-1) == top1).sum())
        # KL(teacher || model) over the teacher's top-k tokens (they hold `topk_mass` of its probability)
        student = np.take_along_axis(lp, topk_ids.astype(np.int64), axis=-1)
        self.kl += float((np.exp(topk_logp) * (topk_logp - student)).sum())
        self.n_pos += len(ids)

    def result(self) -> dict:
        return {"ppl": float(np.exp(self.nll / self.n_next)), "agreement": self.agree / self.n_pos,
                "kl": self.kl / self.n_pos, "n_tokens": self.n_pos}


def evaluate_fn(logits_fn, data: Artifact) -> dict:
    """Score `logits_fn(ids: list[int]) -> (T, V) array` on the held-out blocks of a data artifact."""
    blocks, ref = load_blocks(data, "heldout"), load_reference(data)
    s = Scores()
    for i, block in enumerate(blocks):
        s.add(np.asarray(logits_fn(block.tolist())), block, ref["top1"][i], ref["topk_ids"][i],
              ref["topk_logp"][i])
    return s.result()


def evaluate_torch(model, data: Artifact) -> dict:
    """Held-out metrics of an in-memory HF causal LM."""
    import torch

    def logits_fn(ids):
        x = torch.tensor([ids], device=model.device)
        with torch.inference_mode():
            return model(input_ids=x).logits[0].float().cpu().numpy()

    was_training = model.training
    model.eval()
    try:
        return evaluate_fn(logits_fn, data)
    finally:
        model.train(was_training)


def evaluate_path(path: str | Path, fmt: str, data: Artifact, threads: int = 0) -> dict:
    """Held-out metrics of a model on disk of format `fmt` (a key of pistill.formats.FORMATS), in its runtime."""
    from pistill.device.runtimes import get_runtime

    block_size = int(load_blocks(data, "heldout").shape[1])
    rt = get_runtime(runtime_for_format(fmt))(str(path), threads, max(block_size, 512))
    try:
        return evaluate_fn(rt.logits, data)
    finally:
        rt.close()
