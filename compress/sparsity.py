"""Unstructured and N:M sparsity (magnitude, Wanda): zeros inside same-shape weights, for quality comparisons only.

A sparse model is stored dense, so its file size and its speed on a Pi are those of the dense model; llama.cpp
and onnxruntime have no sparse CPU kernels. Structured pruning (compress/structured.py) is what saves bytes.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from pistill.errors import InputError
from pistill.hooks import forward_hooks
from pistill.registry import lookup, register

WEIGHT_SCORES: dict[str, Callable] = {}  # method -> fn(model, blocks (N, T), ) -> {Linear: score (O, I)}


def weight_scorer(name: str):
    """Register a weight scorer under `name` (the `sparsity_method` of `PruneConfig`)."""
    return register(WEIGHT_SCORES, name)


def get_weight_scorer(name: str) -> Callable:
    return lookup(WEIGHT_SCORES, name, "sparsity_method")


# --- pure functions -----------------------------------------------------------------------------------------------

def wanda_score(weight, x_norm):
    """Wanda importance |W_ij| * ||X_j||_2: (O, I), (I,) -> (O, I).

    Sun et al. 2023, "A Simple and Effective Pruning Approach for Large Language Models", arXiv:2306.11695,
    Eq. 1; weights are compared per output row (their Sec. 3, "comparison group").
    """
    return weight.float().abs() * x_norm.float()[None, :]


def row_mask(score, sparsity: float):
    """Keep-mask (O, I) bool zeroing the round(sparsity * I) lowest scores of every output row."""
    import torch

    k = round(sparsity * score.shape[1])
    mask = torch.ones_like(score, dtype=torch.bool)
    if k:
        mask.scatter_(1, score.topk(k, dim=1, largest=False).indices, False)
    return mask


def nm_mask(score, n: int, m: int):
    """Keep-mask (O, I) bool keeping the n highest scores of every m consecutive inputs (2:4: Ampere's pattern)."""
    import torch

    o, i = score.shape
    groups = score.reshape(o, i // m, m)
    mask = torch.zeros_like(groups, dtype=torch.bool)
    mask.scatter_(2, groups.topk(n, dim=2).indices, True)
    return mask.reshape(o, i)


# --- scores per Linear --------------------------------------------------------------------------------------------

def decoder_linears(model) -> list:
    """Every Linear inside the decoder layers (embeddings and lm_head stay dense, as in the papers)."""
    import torch

    return [m for layer in model.model.layers for m in layer.modules() if isinstance(m, torch.nn.Linear)]


@weight_scorer("magnitude")
def magnitude_scores(model, blocks: np.ndarray) -> dict:
    """|W|, compared per output row; needs no data."""
    return {lin: lin.weight.detach().float().abs() for lin in decoder_linears(model)}


@weight_scorer("wanda")
def wanda_scores(model, blocks: np.ndarray) -> dict:
    """Wanda scores from the input norms of every decoder Linear on calibration blocks (one dense pass: the
    paper's layer-by-layer variant feeds pruned outputs forward; with a few blocks the difference is small)."""
    import torch

    from .importance import calibrate

    sq = {}

    def hook(lin):
        def fn(module, args):
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])  # (B*T, I)
            sq[lin] = sq.get(lin, 0) + (x * x).sum(dim=0).double().cpu()
        return fn

    with forward_hooks([(lin, hook(lin)) for lin in decoder_linears(model)], pre=True):
        calibrate(model, blocks)
    return {lin: wanda_score(lin.weight.detach().cpu(), torch.sqrt(sq[lin])).to(lin.weight.device) for lin in sq}


def parse_nm(nm: str) -> tuple[int, int]:
    """"2:4" -> (2, 4)."""
    try:
        n, m = (int(v) for v in nm.split(":"))
    except ValueError:
        raise ValueError(f"nm = {nm!r} is not an N:M pattern; use \"2:4\" (or \"\" for none)") from None
    if not 0 < n < m:
        raise ValueError(f"nm = {nm!r} needs 0 < N < M; use \"2:4\"")
    return n, m


def sparsify(model, blocks: np.ndarray, method: str, sparsity: float = 0.0, nm: str = "") -> float:
    """Zero weights of every decoder Linear in place, per output row (`sparsity`) or N:M (`nm`); returns the
    fraction of those weights that are zero."""
    import torch

    scores = get_weight_scorer(method)(model, blocks)
    zeros = total = 0
    for lin, score in scores.items():
        if nm:
            n, m = parse_nm(nm)
            if score.shape[1] % m:
                raise InputError(f"nm = {nm!r}: input width {score.shape[1]} is not a multiple of {m}")
            mask = nm_mask(score, n, m)
        else:
            mask = row_mask(score, sparsity)
        with torch.no_grad():
            lin.weight.mul_(mask.to(lin.weight.device, lin.weight.dtype))
        zeros += int((lin.weight == 0).sum())
        total += lin.weight.numel()
    return zeros / max(total, 1)


def zero_fraction(model) -> float:
    """Fraction of decoder Linear weights that are exactly zero (0.0 for a dense model)."""
    lins = decoder_linears(model)
    return sum(int((lin.weight == 0).sum()) for lin in lins) / max(sum(lin.weight.numel() for lin in lins), 1)
