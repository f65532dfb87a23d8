"""Mending dropped layers: a fitted linear map folded into the last kept layer before each gap (ReplaceMe)."""

from __future__ import annotations

import logging

import numpy as np

from pistill.hooks import forward_hooks

from .importance import calibrate

log = logging.getLogger(__name__)

RIDGE = 0.1  # ridge toward the identity, relative to trace(M^T M) / D; best of 1e-3..1 on SmolLM2-135M, 9 layers


# --- pure math: tensors in, tensors out --------------------------------------------------------------------------

def gap_runs(drop: list[int]) -> list[tuple[int, int]]:
    """The runs of consecutive dropped layers as inclusive (first, last) pairs, ascending: [3, 1, 4, 7] ->
    [(1, 1), (3, 4), (7, 7)]."""
    runs: list[list[int]] = []
    for i in sorted(set(drop)):
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return [(a, b) for a, b in runs]


def ridge_fit(mtm, mtr, ridge: float = RIDGE):
    """The linear map T (D, D) minimising ||M T - R||^2 + lam ||T - I||^2, from float64 sums over tokens of
    M^T M (D, D) and M^T R (D, D): T = (M^T M + lam I)^-1 (M^T R + lam I), lam = ridge * trace(M^T M) / D.

    Shopkhoev et al. 2025, "ReplaceMe: Network Simplification via Depth Pruning and Transformer Block
    Linearization", arXiv:2505.02819: the least-squares (L2) objective for the map that replaces a run of blocks,
    T* = argmin ||M_i T - (L_{i+n} - Y_i)||, and its closed form (M^T M)^-1 M^T (L - Y). M is the MLP output of
    the last kept layer, Y the residual stream after its attention, L the hidden state leaving the gap. The ridge
    pulls T toward I (plain dropping) rather than 0, so with no data or a dead MLP the layer is left unchanged.
    """
    import torch

    d = mtm.shape[0]
    eye = torch.eye(d, dtype=torch.float64, device=mtm.device)
    lam = ridge * float(torch.trace(mtm)) / d or 1.0  # a zero MLP output: any lam gives T = I
    return torch.linalg.solve(mtm.double() + lam * eye, mtr.double() + lam * eye)


def residual_error(mtm, mtr, rtr: float, t) -> float:
    """Relative residual ||M T - R|| / ||R|| from the sums M^T M, M^T R (D, D) and R^T R (scalar) alone:
    ||M T - R||^2 = tr(T^T M^T M T) - 2 tr(T^T M^T R) + ||R||^2. T = I gives the error of plain dropping."""
    t = t.double()
    sq = float((t * (mtm.double() @ t)).sum() - 2 * (t * mtr.double()).sum()) + rtr
    return (max(sq, 0.0) / rtr) ** 0.5 if rtr > 0 else 0.0


def fold_down_proj(linear, t) -> None:
    """Fold T (D, D) into an MLP's down projection, in place: the output a W^T + b becomes (a W^T + b) T, so
    W (D, F) <- T^T W and b <- T^T b. The model keeps its plain architecture (no new modules)."""
    import torch

    with torch.no_grad():
        t = t.to(linear.weight.device, torch.float64)
        linear.weight.copy_((t.T @ linear.weight.double()).to(linear.weight.dtype))
        if linear.bias is not None:
            linear.bias.copy_((t.T @ linear.bias.double()).to(linear.bias.dtype))


# --- collecting the statistics -----------------------------------------------------------------------------------

class GapSums:
    """Float64 sums for one gap over calibration tokens: M^T M, M^T R (D, D), R^T R with R = L - Y, each token's
    row of M and R divided by ||L_t||, so every token counts alike.

    Unweighted, the attention-sink token (position 0; its hidden state is ~100x the norm of the others in
    SmolLM2-135M) decides the least-squares fit, and the map then hurts every other token; leaving it out instead
    lets the map wreck the sink. The weighting is the closed-form stand-in for ReplaceMe's cosine objective.
    Forward hooks feed it in the order of a forward pass: `take_y` (input of the kept layer's
    post_attention_layernorm: the residual stream after its attention), `take_m` (its mlp.down_proj output),
    then `add` (the output of the gap's last layer, L). Only one batch of Y and M is held at a time.
    """

    def __init__(self):
        self.mtm = self.mtr = None
        self.rtr, self.tokens = 0.0, 0
        self._y = self._m = None

    def take_y(self, module, args, out) -> None:
        self._y = args[0].detach()

    def take_m(self, module, args, out) -> None:
        self._m = out.detach()

    def add(self, module, args, out) -> None:
        out = out[0] if isinstance(out, tuple) else out
        d = out.shape[-1]
        ell = out.detach().reshape(-1, d).double()  # (tokens, D)
        w = ell.norm(dim=1, keepdim=True).clamp_min(1e-12).reciprocal()  # (tokens, 1): 1 / ||L_t||
        m = self._m.reshape(-1, d).double() * w
        r = (ell - self._y.reshape(-1, d).double()) * w  # L - Y
        self.mtm = m.T @ m if self.mtm is None else self.mtm + m.T @ m
        self.mtr = m.T @ r if self.mtr is None else self.mtr + m.T @ r
        self.rtr += float((r * r).sum())
        self.tokens += m.shape[0]
        self._y = self._m = None


def mend_linear(model, blocks: np.ndarray, drop: list[int], ridge: float = RIDGE, batch_size: int = 4) -> dict:
    """Refit, for every run [i, j] of the layers `drop`, what it added to the residual stream as a linear map of
    layer i-1's MLP output, and fold the map into that layer's down projection (ReplaceMe; see `ridge_fit`).

    Call it on the unpruned model, before `drop_layers(model, drop)`: one calibration pass over `blocks` (N, T)
    collects the statistics of every gap. A run that starts at layer 0 has no layer before it and is left as plain
    dropping (logged). Returns {"i-j": {"from": i - 1, "err_before", "err_after", "tokens"}} per fitted gap: the
    relative residual error of plain dropping (T = I) and of the fit, on the calibration tokens (each token
    weighted by 1 / ||L_t||; see `GapSums`).
    """
    import torch

    layers = model.model.layers
    sums = {}
    for i, j in gap_runs(drop):
        if i == 0:
            log.info("mend: layers %d-%d start at layer 0, no layer before them to fold into: plain dropping", i, j)
            continue
        sums[i, j] = GapSums()
    hooks = [hook for (i, j), s in sums.items() for hook in ((layers[i - 1].post_attention_layernorm, s.take_y),
                                                            (layers[i - 1].mlp.down_proj, s.take_m),
                                                            (layers[j], s.add))]
    with forward_hooks(hooks):
        calibrate(model, blocks, batch_size)
    figures = {}
    for (i, j), s in sums.items():
        t = ridge_fit(s.mtm, s.mtr, ridge)
        eye = torch.eye(t.shape[0], dtype=t.dtype, device=t.device)  # plain dropping
        f = figures[f"{i}-{j}"] = {"from": i - 1, "err_before": residual_error(s.mtm, s.mtr, s.rtr, eye),
                                   "err_after": residual_error(s.mtm, s.mtr, s.rtr, t), "tokens": s.tokens}
        fold_down_proj(layers[i - 1].mlp.down_proj, t)
        log.info("mend: layers %d-%d refit into layer %d's down_proj: relative error %.3f -> %.3f", i, j, i - 1,
                 f["err_before"], f["err_after"])
    return figures
