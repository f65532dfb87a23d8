"""Structural slicing of llama-like models: MLP channels, attention heads (GQA-aware), whole layers, hidden width."""

from __future__ import annotations


def slice_linear(linear, keep, dim: int) -> None:
    """Keep the `keep` indices of a Linear's weight along `dim` (0: output rows, 1: input columns), in place."""
    import torch

    keep = keep.to(linear.weight.device)
    linear.weight = torch.nn.Parameter(linear.weight.data.index_select(dim, keep).clone())
    if dim == 0 and linear.bias is not None:
        linear.bias = torch.nn.Parameter(linear.bias.data[keep].clone())
    if dim == 0:
        linear.out_features = len(keep)
    else:
        linear.in_features = len(keep)


def select_channels(scores: list, width: int) -> list:
    """The `width` highest-scoring channel indices of each layer, in ascending order: list of (width,) int64."""
    return [s.topk(width).indices.sort().values for s in scores]


def prune_mlp(model, keep: list) -> None:
    """Slice every layer's MLP to the kept channels (gate/up rows, down columns) and set intermediate_size.

    `keep` holds one index tensor per layer, all of the same length: llama.cpp needs uniform layers.
    """
    widths = {len(k) for k in keep}
    if len(widths) != 1 or len(keep) != len(model.model.layers):
        raise ValueError(f"need one index tensor per layer ({len(model.model.layers)}), all of one width; "
                         f"got {len(keep)} with widths {sorted(widths)}")
    for layer, k in zip(model.model.layers, keep):
        slice_linear(layer.mlp.gate_proj, k, 0)
        slice_linear(layer.mlp.up_proj, k, 0)
        slice_linear(layer.mlp.down_proj, k, 1)
        layer.mlp.intermediate_size = len(k)
    model.config.intermediate_size = widths.pop()


# --- attention heads ----------------------------------------------------------------------------------------------

def select_heads(scores, kv_teacher: int, n_heads: int, kv_heads: int):
    """Kept query and key/value heads of one layer from per-query-head scores (n_heads_teacher,).

    GQA-aware: whole kv groups are ranked by the summed score of their query heads and the best `kv_heads` kept;
    inside each kept group the best `n_heads // kv_heads` query heads are kept, so every kv head serves the same
    number of query heads. Returns (q (n_heads,), kv (kv_heads,)) int64, ascending (group order preserved).
    """
    import torch

    groups = scores.reshape(kv_teacher, -1)  # (kv, group_size)
    kv = groups.sum(dim=1).topk(kv_heads).indices.sort().values
    per = n_heads // kv_heads
    q = [g * groups.shape[1] + groups[g].topk(per).indices.sort().values for g in kv.tolist()]
    return torch.cat(q), kv


def _head_rows(heads, head_dim: int):
    import torch

    return (heads[:, None] * head_dim + torch.arange(head_dim)).flatten()  # (len(heads) * head_dim,)


def prune_heads(model, keep: list) -> None:
    """Keep, in every layer, the query heads and kv heads of `keep` [(q, kv) per layer, uniform counts]: slices
    q/k/v rows (and their biases, Qwen2) and o_proj columns; sets num_attention_heads, num_key_value_heads and an
    explicit head_dim (hidden / heads no longer gives it)."""
    counts = {(len(q), len(kv)) for q, kv in keep}
    if len(counts) != 1 or len(keep) != len(model.model.layers):
        raise ValueError(f"need one (q, kv) pair per layer ({len(model.model.layers)}), all of one size; got {counts}")
    n_heads, kv_heads = counts.pop()
    if n_heads % kv_heads:
        raise ValueError(f"{n_heads} query heads cannot share {kv_heads} kv heads evenly; use a multiple of {kv_heads}")
    head_dim = model.model.layers[0].self_attn.head_dim
    for layer, (q, kv) in zip(model.model.layers, keep):
        attn = layer.self_attn
        slice_linear(attn.q_proj, _head_rows(q, head_dim), 0)
        slice_linear(attn.k_proj, _head_rows(kv, head_dim), 0)
        slice_linear(attn.v_proj, _head_rows(kv, head_dim), 0)
        slice_linear(attn.o_proj, _head_rows(q, head_dim), 1)
        attn.num_key_value_groups = n_heads // kv_heads
    model.config.head_dim = head_dim
    model.config.num_attention_heads, model.config.num_key_value_heads = n_heads, kv_heads


# --- whole layers -------------------------------------------------------------------------------------------------

def drop_layers(model, drop: list[int]) -> None:
    """Remove the decoder layers `drop`, renumber the rest (KV-cache slots) and update num_hidden_layers and,
    when the config has one, layer_types."""
    import torch

    n = len(model.model.layers)
    if any(not 0 <= i < n for i in drop) or len(set(drop)) >= n:
        raise ValueError(f"cannot drop layers {sorted(drop)} of {n}; keep at least one, indices 0..{n - 1}")
    kept = [i for i in range(n) if i not in set(drop)]
    model.model.layers = torch.nn.ModuleList([model.model.layers[i] for i in kept])
    for new, layer in enumerate(model.model.layers):
        layer.self_attn.layer_idx = new
    model.config.num_hidden_layers = len(kept)
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = [model.config.layer_types[i] for i in kept]


# --- hidden width -------------------------------------------------------------------------------------------------

def prune_hidden(model, keep) -> None:
    """Keep the hidden (embedding) channels `keep` (D',) everywhere: embed_tokens columns, every norm weight, the
    input columns of q/k/v/gate/up, the output rows of o/down, lm_head columns (tied stays tied); head_dim fixed."""
    import torch

    tied = model.lm_head.weight is model.model.embed_tokens.weight
    model.config.head_dim = model.model.layers[0].self_attn.head_dim  # no longer hidden / heads
    emb = model.model.embed_tokens
    emb.weight = torch.nn.Parameter(emb.weight.data[:, keep.to(emb.weight.device)].clone())
    emb.embedding_dim = len(keep)
    norms = [model.model.norm] + [n for layer in model.model.layers
                                  for n in (layer.input_layernorm, layer.post_attention_layernorm)]
    for norm in norms:
        norm.weight = torch.nn.Parameter(norm.weight.data[keep.to(norm.weight.device)].clone())
    for layer in model.model.layers:
        a, m = layer.self_attn, layer.mlp
        for linear in (a.q_proj, a.k_proj, a.v_proj, m.gate_proj, m.up_proj):
            slice_linear(linear, keep, 1)
        slice_linear(a.o_proj, keep, 0)
        slice_linear(m.down_proj, keep, 0)
    if tied:
        model.lm_head.weight = emb.weight
        model.lm_head.in_features = len(keep)
    else:
        slice_linear(model.lm_head, keep, 1)
    model.config.hidden_size = len(keep)
