"""Target shapes for pruning: uniform layer shapes from explicit sizes or a parameter budget, and exact counts."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace

from pistill.errors import InputError
from pistill.hf_folder import qkv_bias, tied_embeddings

BUDGET_TOLERANCE = 0.02  # a parameter budget is met within 2%
_SUFFIX = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9}


@dataclass(frozen=True)
class Shape:
    """The uniform shape of a llama-like model (every layer the same: llama.cpp needs uniform layers)."""

    n_layer: int
    hidden: int
    ffn_dim: int
    n_heads: int
    kv_heads: int
    head_dim: int


def teacher_shape(hf: dict) -> Shape:
    """The shape of an HF config dict (head_dim explicit or hidden / heads)."""
    heads = hf["num_attention_heads"]
    return Shape(n_layer=hf["num_hidden_layers"], hidden=hf["hidden_size"], ffn_dim=hf["intermediate_size"],
                 n_heads=heads, kv_heads=hf.get("num_key_value_heads") or heads,
                 head_dim=hf.get("head_dim") or hf["hidden_size"] // heads)


def param_count(s: Shape, hf: dict) -> int:
    """Parameters of a model of shape `s` with the vocabulary, tying and biases of HF config `hf` (tied counted
    once): embeddings, per layer q/k/v/o (+ biases: Qwen2 has q/k/v biases), gate/up/down, two norms; final norm."""
    qkv = qkv_bias(hf)
    o_bias = bool(hf.get("attention_bias"))
    mlp_bias = bool(hf.get("mlp_bias"))
    q, kv = s.n_heads * s.head_dim, s.kv_heads * s.head_dim
    attn = s.hidden * (2 * q + 2 * kv) + qkv * (q + 2 * kv) + o_bias * s.hidden
    mlp = 3 * s.hidden * s.ffn_dim + mlp_bias * (2 * s.ffn_dim + s.hidden)
    embed = hf["vocab_size"] * s.hidden * (1 if tied_embeddings(hf) else 2)
    return embed + s.hidden + s.n_layer * (attn + mlp + 2 * s.hidden)


def parse_params(value: str | int) -> int:
    """A parameter count: 60000000, "60M", "1.5B", "500K" (case-insensitive)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMbB]?)\s*", str(value))
    if not m:
        raise ValueError(f"target_params = {value!r} is not a parameter count; use an int or a string like \"60M\"")
    count = float(m.group(1)) * _SUFFIX[m.group(2).upper()]
    if not math.isfinite(count):
        raise ValueError(f"target_params = {value!r} is not a finite parameter count; use a string like \"60M\"")
    return int(count)


def round_to(x: float, step: int) -> int:
    """x rounded to a multiple of `step`, at least one step."""
    return max(step, round(x / step) * step)


def check_hidden(hidden: int, n_heads: int, step: int) -> None:
    """transformers refuses a llama-like config whose hidden width is not a multiple of its query heads (even with
    head_dim explicit): say so before any weight is pruned, with the nearest widths that work."""
    if hidden % n_heads:
        unit = math.lcm(n_heads, step)
        options = sorted({max(unit, hidden // unit * unit), hidden // unit * unit + unit})
        raise InputError(f"hidden = {hidden} is not a multiple of the {n_heads} query heads kept; transformers "
                         f"refuses such a model: use hidden = {' or '.join(map(str, options))} (multiples of "
                         f"{n_heads} and {step}), or keep another number of heads")


def budget_shape(base: Shape, teacher: Shape, hf: dict, budget: int, step: int, fixed_hidden: bool) -> Shape:
    """The widest uniform shape meeting `budget` within 2%: depth and heads stay as in `base`; then hidden goes
    down in multiples of `step` (unless fixed) and, for each hidden, ffn_dim is the multiple of `step` closest to
    the budget; the first hidden whose ffn ratio is at least its hidden ratio (the MLP is pruned no harder than
    the embedding channels, one width ratio for both) and whose count is within 2% wins. Coarse steps (256) may
    allow no such pair: then the pair within 2% whose two ratios are closest. Only hidden widths that are a multiple
    of the query heads are tried (`check_hidden`)."""
    below = range((base.hidden - 1) // step * step, 0, -step)  # narrower multiples of `step`
    hiddens = [base.hidden] if fixed_hidden else dict.fromkeys([base.hidden, *below])  # unpruned first
    met, best = [], None
    for hidden in hiddens:
        if hidden % base.n_heads:  # transformers refuses such a config even with head_dim explicit
            continue
        rest = param_count(replace(base, hidden=hidden, ffn_dim=0), hf)
        per_ffn = param_count(replace(base, hidden=hidden, ffn_dim=1), hf) - rest
        ffn = min(round_to((budget - rest) / per_ffn, step), teacher.ffn_dim // step * step or teacher.ffn_dim)
        s = replace(base, hidden=hidden, ffn_dim=ffn)
        err = abs(param_count(s, hf) - budget) / budget
        best = min(best or (err, s), (err, s), key=lambda e: e[0])
        if err <= BUDGET_TOLERANCE:
            gap = ffn / teacher.ffn_dim - hidden / teacher.hidden
            if fixed_hidden or gap >= 0:
                return s
            met.append((-gap, s))
    if met:
        return min(met, key=lambda e: e[0])[1]
    raise InputError(f"target_params = {budget} cannot be met within 2% with widths in multiples of {step} "
                     f"(closest: {param_count(best[1], hf)} params at {best[1]}); fix: lower multiple_of, "
                     "or set n_layer / hidden / ffn_dim yourself")
