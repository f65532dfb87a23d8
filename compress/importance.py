"""MLP channel importance: activation statistics on calibration blocks, weight magnitude, and a random baseline."""

from __future__ import annotations

from typing import Callable

import numpy as np

SCORERS: dict[str, Callable] = {}  # method -> fn(model, blocks (N, T) int32, seed) -> list of (ffn_dim,) per layer


def scorer(name: str):
    """Register a model-level scorer under `name` (the `method` of `PruneConfig`)."""
    def register(fn: Callable) -> Callable:
        SCORERS[name] = fn
        return fn
    return register


def get_scorer(name: str) -> Callable:
    if name not in SCORERS:
        raise ValueError(f"importance method '{name}' is not supported; supported: {', '.join(sorted(SCORERS))}")
    return SCORERS[name]


# --- pure score functions: tensors in, tensors out ---------------------------------------------------------------

def channel_l2(acts):
    """Per-channel L2 norm over the sequence, summed over the batch: (B, T, F) -> (F,).

    Divided by the number of sequences this is Minitron's neuron importance: the activation of each MLP channel
    aggregated with the L2 norm over the sequence and the mean over the batch (Muralidharan et al. 2024,
    "Compact Language Models via Pruning and Knowledge Distillation", arXiv:2407.14679, activation-based
    importance and its (batch, sequence) aggregation ablation). Returning the sum keeps accumulation exact.
    """
    return acts.float().norm(dim=1).sum(dim=0)  # (F,)


def channel_mean_abs(acts):
    """Per-channel mean |a| over the sequence, summed over the batch: (B, T, F) -> (F,); divide by B for the mean."""
    return acts.float().abs().mean(dim=1).sum(dim=0)  # (F,)


def magnitude_score(gate_w, up_w, down_w):
    """Weight-only importance of each MLP channel: ||gate_i|| * ||up_i|| * ||down_:,i||.

    gate_w, up_w: (F, D) rows; down_w: (D, F) columns. The product bounds the channel's contribution to the
    output for unit-norm inputs (up to the SiLU), so a channel with any zeroed projection scores 0.
    """
    return gate_w.float().norm(dim=1) * up_w.float().norm(dim=1) * down_w.float().norm(dim=0)  # (F,)


def random_score(ffn_dim: int, seed: int):
    """Uniform random scores: the baseline any importance method must beat."""
    import torch

    return torch.rand(ffn_dim, generator=torch.Generator().manual_seed(seed))


# --- collecting activation statistics ----------------------------------------------------------------------------

class ActivationStats:
    """Forward pre-hooks on every layer's `mlp.down_proj` that accumulate a per-sequence statistic of its input
    (the MLP channel activations, (B, T, F)) summed over sequences; `scores()` is the mean over sequences.

    Memory is bounded: one (ffn_dim,) float64 sum per layer, whatever the number of blocks.

        with ActivationStats(model) as stats:
            model(input_ids=x)
        scores = stats.scores()  # list of (ffn_dim,) per layer
    """

    def __init__(self, model, stat: Callable = channel_l2):
        self.layers = model.model.layers
        self.stat = stat
        self.sums = [None] * len(self.layers)
        self.n_seq = 0  # sequences seen (the batch dimension, summed)
        self._handles = []

    def _hook(self, i: int):
        def hook(module, args):
            s = self.stat(args[0].detach()).double().cpu()  # (F,)
            self.sums[i] = s if self.sums[i] is None else self.sums[i] + s
            if i == 0:
                self.n_seq += args[0].shape[0]
        return hook

    def __enter__(self) -> "ActivationStats":
        self._handles = [layer.mlp.down_proj.register_forward_pre_hook(self._hook(i))
                         for i, layer in enumerate(self.layers)]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def scores(self) -> list:
        if self.n_seq == 0:
            raise RuntimeError("no calibration forward pass ran inside ActivationStats")
        return [s / self.n_seq for s in self.sums]


# --- model-level scorers (the registry) --------------------------------------------------------------------------

@scorer("activation")
def activation_scores(model, blocks: np.ndarray, seed: int, batch_size: int = 4) -> list:
    """Minitron-style activation importance of every MLP channel from forward passes on calibration blocks."""
    import torch
    from rich.console import Console
    from rich.progress import track

    steps = range(0, len(blocks), batch_size)
    with ActivationStats(model) as stats, torch.inference_mode():
        for i in track(steps, description="activation statistics", transient=True, console=Console(stderr=True)):
            x = torch.as_tensor(blocks[i:i + batch_size].astype(np.int64), device=model.device)
            model(input_ids=x, use_cache=False)
    return stats.scores()


@scorer("magnitude")
def magnitude_scores(model, blocks: np.ndarray, seed: int) -> list:
    """Weight-norm importance; needs no data."""
    mlps = [layer.mlp for layer in model.model.layers]
    return [magnitude_score(m.gate_proj.weight, m.up_proj.weight, m.down_proj.weight).cpu() for m in mlps]


@scorer("random")
def random_scores(model, blocks: np.ndarray, seed: int) -> list:
    """Random importance per layer (a different draw per layer, reproducible from `seed`)."""
    ffn_dim = model.config.intermediate_size
    return [random_score(ffn_dim, seed * 10_007 + i) for i in range(len(model.model.layers))]
