"""Structural importance (MLP channels, attention heads, layers, hidden channels): activation statistics on
calibration blocks, weight magnitude, and a random baseline."""

from __future__ import annotations

from typing import Callable

import numpy as np

from pistill.hooks import forward_hooks
from pistill.registry import lookup, register

SCORERS: dict[str, Callable] = {}  # method -> fn(model, blocks (N, T) int32, seed) -> list of (ffn_dim,) per layer
HEAD_SCORERS: dict[str, Callable] = {}  # method -> fn(model, blocks, seed) -> list of (n_heads,) per layer
LAYER_SCORERS: dict[str, Callable] = {}  # method -> fn(model, blocks, seed) -> (n_layer,): low = safe to drop
HIDDEN_SCORERS: dict[str, Callable] = {}  # method -> fn(model, blocks, seed) -> (hidden,)
AXES = {"mlp": SCORERS, "heads": HEAD_SCORERS, "layers": LAYER_SCORERS, "hidden": HIDDEN_SCORERS}


def scorer(name: str, axis: str = "mlp"):
    """Register a model-level scorer of `axis` under `name` (the `method` of `PruneConfig`)."""
    return register(AXES[axis], name)


def get_scorer(name: str, axis: str = "mlp") -> Callable:
    return lookup(AXES[axis], name, "importance method")


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


def head_gram(o_weight, n_heads: int):
    """Per-head Gram matrices of o_proj's columns: (D, H * hd) -> (H, hd, hd), G_h = W_h^T W_h."""
    import torch

    w = o_weight.float().reshape(o_weight.shape[0], n_heads, -1)  # (D, H, hd)
    return torch.einsum("dhi,dhj->hij", w, w)


def head_contribution_l2(acts, gram):
    """Per-head L2 norm of what each head writes into the residual stream, ||W_o,h a_h|| per token, aggregated
    with L2 over the sequence and summed over the batch (divide by B for the mean): (B, T, H * hd), (H, hd, hd)
    -> (H,).

    Minitron (Muralidharan et al. 2024, arXiv:2407.14679, Sec. 2.2) scores a head by the norm of its attention
    output before o_proj, with this aggregation. But o_proj scales heads very differently: on SmolLM2-135M that
    score ranked heads worse than chance (docs/pruning.md). Scoring each head's output after its slice of o_proj
    measures what removing it takes away from the residual stream. Computed through the Gram matrix,
    ||W a||^2 = a^T G a, so memory stays at the size of `acts` whatever the hidden width.
    """
    import torch

    b, t, _ = acts.shape
    a = acts.float().reshape(b, t, gram.shape[0], -1)  # (B, T, H, hd)
    sq = torch.einsum("bthi,hij,bthj->bth", a, gram.to(a.device), a).clamp_min(0)  # (B, T, H)
    return sq.sqrt().norm(dim=1).sum(dim=0)  # (H,)


def block_influence(x_in, x_out):
    """Block Influence per token: 1 - cos(x_in, x_out) of a block's input and output hidden states.

    (B, T, D), (B, T, D) -> (B, T). Men et al. 2024, "ShortGPT: Layers in Large Language Models are More
    Redundant Than You Expect", arXiv:2403.03853, Eq. 1 (BI_i = 1 - E_t[cos(X_i,t, X_i+1,t)]): a block that
    barely changes its input scores near 0 and is the first to drop.
    """
    import torch

    return 1.0 - torch.nn.functional.cosine_similarity(x_in.float(), x_out.float(), dim=-1)


def angular_distance(x_a, x_b):
    """Angular distance per token: arccos(cos(x_a, x_b)) / pi, in [0, 1]. (B, T, D), (B, T, D) -> (B, T).

    Gromov et al. 2024, "The Unreasonable Ineffectiveness of the Deeper Layers", arXiv:2403.17887, Sec. 3.2,
    d(x^l, x^(l+n)): the distance between the hidden states entering layer l and layer l + n; the block of n
    layers with the smallest mean is the one to drop.
    """
    import torch

    cos = torch.nn.functional.cosine_similarity(x_a.float(), x_b.float(), dim=-1)
    return torch.arccos(cos.clamp(-1.0, 1.0)) / torch.pi


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

    Memory is bounded: one (ffn_dim,) float64 sum per layer, whatever the number of blocks. `stat` is one
    function for every layer or a list with one per layer (a head score needs that layer's o_proj).

        with ActivationStats(model) as stats:
            model(input_ids=x)
        scores = stats.scores()  # list of (ffn_dim,) per layer
    """

    def __init__(self, model, stat: Callable | list[Callable] = channel_l2,
                 module: Callable = lambda layer: layer.mlp.down_proj, output: bool = False):
        self.layers = model.model.layers
        self.stat = stat if isinstance(stat, list) else [stat] * len(self.layers)  # one per layer
        self.module = module  # layer -> the hooked submodule
        self.output = output  # hook the module's output (forward hook) instead of its input (pre-hook)
        self.sums = [None] * len(self.layers)
        self.n_seq = 0  # sequences seen (the batch dimension, summed)
        self._hooks = None

    def _hook(self, i: int):
        def hook(module, args, out=None):
            acts = (out if self.output else args[0]).detach()
            s = self.stat[i](acts).double().cpu()  # (F,)
            self.sums[i] = s if self.sums[i] is None else self.sums[i] + s
            if i == 0:
                self.n_seq += acts.shape[0]
        return hook

    def __enter__(self) -> "ActivationStats":
        hooks = [(self.module(layer), self._hook(i)) for i, layer in enumerate(self.layers)]
        self._hooks = forward_hooks(hooks, pre=not self.output)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)
        self._hooks = None

    def scores(self) -> list:
        if self.n_seq == 0:
            raise RuntimeError("no calibration forward pass ran inside ActivationStats")
        return [s / self.n_seq for s in self.sums]


# --- model-level scorers (the registry) --------------------------------------------------------------------------

@scorer("activation")
def activation_scores(model, blocks: np.ndarray, seed: int, batch_size: int = 4) -> list:
    """Minitron-style activation importance of every MLP channel from forward passes on calibration blocks."""
    with ActivationStats(model) as stats:
        calibrate(model, blocks, batch_size)
    return stats.scores()


def calibrate(model, blocks: np.ndarray, batch_size: int = 4) -> None:
    """Forward passes over calibration blocks (N, T), for the hooks of a statistics collector."""
    import torch
    from rich.console import Console
    from rich.progress import track

    steps = range(0, len(blocks), batch_size)
    with torch.inference_mode():
        for i in track(steps, description="activation statistics", transient=True, console=Console(stderr=True)):
            x = torch.as_tensor(blocks[i:i + batch_size].astype(np.int64), device=model.device)
            model(input_ids=x, use_cache=False)


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


# --- attention heads ---------------------------------------------------------------------------------------------

@scorer("activation", "heads")
def head_activation_scores(model, blocks: np.ndarray, seed: int) -> list:
    """Head importance from calibration blocks: the L2 norm of each head's contribution to the residual stream
    (its output through its slice of o_proj; see head_contribution_l2)."""
    from functools import partial

    n = model.config.num_attention_heads
    grams = [head_gram(layer.self_attn.o_proj.weight.detach(), n) for layer in model.model.layers]
    per_layer = [partial(head_contribution_l2, gram=g) for g in grams]
    with ActivationStats(model, per_layer, module=lambda layer: layer.self_attn.o_proj) as stats:
        calibrate(model, blocks)
    return stats.scores()


@scorer("magnitude", "heads")
def head_magnitude_scores(model, blocks: np.ndarray, seed: int) -> list:
    """||W_q rows of head h|| * ||W_o columns of head h||; needs no data."""
    n = model.config.num_attention_heads
    out = []
    for layer in model.model.layers:
        q, o = layer.self_attn.q_proj.weight.float(), layer.self_attn.o_proj.weight.float()  # (H*hd, D), (D, H*hd)
        out.append((q.reshape(n, -1).norm(dim=1) * o.T.reshape(n, -1).norm(dim=1)).detach().cpu())
    return out


@scorer("random", "heads")
def head_random_scores(model, blocks: np.ndarray, seed: int) -> list:
    n = model.config.num_attention_heads
    return [random_score(n, seed * 10_007 + 101 + i) for i in range(len(model.model.layers))]


# --- whole layers -------------------------------------------------------------------------------------------------

@scorer("activation", "layers")
def layer_influence_scores(model, blocks: np.ndarray, seed: int):
    """Block Influence of every decoder layer, averaged over calibration tokens: (n_layer,) float64."""
    import torch

    sums = torch.zeros(len(model.model.layers), dtype=torch.float64)
    count = [0]

    def hook(i):
        def fn(module, args, kwargs, out):
            x_in = args[0] if args else kwargs["hidden_states"]
            bi = block_influence(x_in, out[0] if isinstance(out, tuple) else out)  # (B, T)
            sums[i] += bi.double().sum().cpu()
            count[0] += bi.numel() if i == 0 else 0
        return fn

    with forward_hooks([(layer, hook(i)) for i, layer in enumerate(model.model.layers)], with_kwargs=True):
        calibrate(model, blocks)
    return sums / max(count[0], 1)


def angular_block(model, blocks: np.ndarray, n_drop: int, batch_size: int = 4) -> list[int]:
    """The contiguous layers [l, l + n_drop) whose input and output hidden states have the smallest mean angular
    distance over calibration tokens (Gromov et al. 2024, arXiv:2403.17887; see `angular_distance`). Blocks that
    hold the last layer are never chosen, as the paper recommends. One pass; one batch of hidden states held."""
    import torch

    layers = model.model.layers
    n = len(layers)
    if not 1 <= n_drop < n:
        raise ValueError(f"cannot drop a block of {n_drop} of {n} layers without the last; use 1..{n - 1}")
    sums = torch.zeros(n - n_drop, dtype=torch.float64)  # block starts 0 .. n - n_drop - 1: the last layer stays
    count, states = [0], [None] * n  # states[l]: the hidden state entering layer l, this batch only

    def hook(i):
        def fn(module, args, kwargs, out):
            states[i] = args[0] if args else kwargs["hidden_states"]  # (B, T, D)
            if i == n - 1:  # every block output needed enters a layer up to this one
                for start in range(len(sums)):
                    sums[start] += angular_distance(states[start], states[start + n_drop]).double().sum().cpu()
                count[0] += states[i].shape[0] * states[i].shape[1]
                states[:] = [None] * n
        return fn

    with forward_hooks([(layer, hook(i)) for i, layer in enumerate(layers)], with_kwargs=True):
        calibrate(model, blocks, batch_size)
    start = int((sums / max(count[0], 1)).argmin())
    return list(range(start, start + n_drop))


@scorer("magnitude", "layers")
def layer_magnitude_scores(model, blocks: np.ndarray, seed: int):
    """||W_o|| + ||W_down||: the weights that write into the residual stream (an identity block scores 0)."""
    import torch

    return torch.stack([(layer.self_attn.o_proj.weight.float().norm() + layer.mlp.down_proj.weight.float().norm())
                        .detach().cpu() for layer in model.model.layers]).double()


@scorer("random", "layers")
def layer_random_scores(model, blocks: np.ndarray, seed: int):
    return random_score(len(model.model.layers), seed * 10_007 + 202).double()


# --- hidden (embedding) channels ----------------------------------------------------------------------------------

@scorer("activation", "hidden")
def hidden_activation_scores(model, blocks: np.ndarray, seed: int):
    """Minitron embedding-channel importance: L2 activation norms of every layernorm output, summed over layers."""
    stats = [ActivationStats(model, module=lambda layer: layer.input_layernorm, output=True),
             ActivationStats(model, module=lambda layer: layer.post_attention_layernorm, output=True)]
    with stats[0], stats[1]:
        calibrate(model, blocks)
    return sum(sum(s.scores()) for s in stats)


@scorer("magnitude", "hidden")
def hidden_magnitude_scores(model, blocks: np.ndarray, seed: int):
    """Column norm of the token embedding: how large each channel is written into the residual stream."""
    return model.model.embed_tokens.weight.float().norm(dim=0).detach().cpu()


@scorer("random", "hidden")
def hidden_random_scores(model, blocks: np.ndarray, seed: int):
    return random_score(model.config.hidden_size, seed * 10_007 + 303)
