"""Structured MLP pruning: every layer keeps its most important channels, the same number in each."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from pistill.artifact import Artifact, ArtifactWriter

from .importance import get_scorer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PruneConfig:
    """How wide the MLP of the pruned student is and how its channels are chosen."""

    VERSION: ClassVar[int] = 1
    method: str = "activation"  # channel importance: activation | magnitude | random
    ffn_dim: int | None = None  # MLP width kept in every layer; when set it overrides ffn_ratio
    ffn_ratio: float = 0.5  # fraction of MLP channels kept (when ffn_dim is None)
    multiple_of: int = 32  # round the kept width to a multiple of this; llama.cpp/onnx kernels need multiples of 32
    calib_blocks: int = 16  # calibration blocks for the activation statistics (at most what the data holds)
    seed: int = 0  # random scorer seed

    def __post_init__(self):
        get_scorer(self.method)  # ValueError listing the methods
        if self.ffn_dim is not None and self.ffn_dim < 1:
            raise ValueError(f"ffn_dim = {self.ffn_dim} must be at least 1; or leave it unset and use ffn_ratio")
        if not 0.0 < self.ffn_ratio <= 1.0:
            raise ValueError(f"ffn_ratio = {self.ffn_ratio} must be in (0, 1]: the fraction of channels kept")
        if self.multiple_of < 1:
            raise ValueError(f"multiple_of = {self.multiple_of} must be at least 1 (1 turns rounding off)")
        if self.ffn_dim is not None and self.ffn_dim % self.multiple_of:
            raise ValueError(f"ffn_dim = {self.ffn_dim} is not a multiple of multiple_of = {self.multiple_of}; "
                             f"use {self.ffn_dim // self.multiple_of * self.multiple_of or self.multiple_of} "
                             "or lower multiple_of")
        if self.calib_blocks < 1:
            raise ValueError(f"calib_blocks = {self.calib_blocks} must be at least 1")


def kept_width(ffn_dim: int, cfg: PruneConfig) -> int:
    """The MLP width after pruning: cfg.ffn_dim, or ffn_ratio * ffn_dim rounded to a multiple of multiple_of."""
    if cfg.ffn_dim is not None:
        if cfg.ffn_dim > ffn_dim:
            raise ValueError(f"ffn_dim = {cfg.ffn_dim} is wider than the teacher's MLP ({ffn_dim}); "
                             f"use a value up to {ffn_dim}")
        return cfg.ffn_dim
    width = max(cfg.multiple_of, round(cfg.ffn_ratio * ffn_dim / cfg.multiple_of) * cfg.multiple_of)
    return min(width, ffn_dim)  # the full width when rounding overshoots (a teacher not a multiple of 32)


def select_channels(scores: list, width: int) -> list:
    """The `width` highest-scoring channel indices of each layer, in ascending order: list of (width,) int64."""
    return [s.topk(width).indices.sort().values for s in scores]


def _slice_linear(linear, keep, dim: int) -> None:
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


def prune_mlp(model, keep: list) -> None:
    """Slice every layer's MLP to the kept channels (gate/up rows, down columns) and set intermediate_size.

    `keep` holds one index tensor per layer, all of the same length: llama.cpp needs uniform layers.
    """
    widths = {len(k) for k in keep}
    if len(widths) != 1 or len(keep) != len(model.model.layers):
        raise ValueError(f"need one index tensor per layer ({len(model.model.layers)}), all of one width; "
                         f"got {len(keep)} with widths {sorted(widths)}")
    for layer, k in zip(model.model.layers, keep):
        _slice_linear(layer.mlp.gate_proj, k, 0)
        _slice_linear(layer.mlp.up_proj, k, 0)
        _slice_linear(layer.mlp.down_proj, k, 1)
        layer.mlp.intermediate_size = len(k)
    model.config.intermediate_size = widths.pop()


def prune(model, blocks, cfg: PruneConfig) -> int:
    """Score channels with `cfg.method` on calibration `blocks` (N, T) and prune `model` in place; the new width."""
    width = kept_width(model.config.intermediate_size, cfg)
    scores = get_scorer(cfg.method)(model, blocks[: cfg.calib_blocks], cfg.seed)
    prune_mlp(model, select_channels(scores, width))
    return width


def run(inputs: list[Artifact], cfg: PruneConfig, out: Path) -> Artifact:
    """Prune the teacher's MLPs to a uniform width and save a standard HF folder."""
    import torch

    from pistill.data import load_blocks
    from pistill.evaluate import evaluate_torch
    from pistill.models import check_architecture, count_params, load_model, read_config, save_model, weight_bytes

    teacher, data = inputs
    folder = teacher.model_path()
    hf_cfg = read_config(folder)
    check_architecture(hf_cfg, str(folder))
    width = kept_width(hf_cfg["intermediate_size"], cfg)  # fails before any weight is loaded
    with ArtifactWriter(out, "prune", cfg, inputs) as w:  # the whole run inside, so wall_s counts it
        model = load_model(folder)  # float32: exact statistics and slicing
        before = count_params(model)
        prune(model, load_blocks(data, "calib"), cfg)
        log.info("prune: %s importance, ffn_dim %d -> %d in each of %d layers, params %d -> %d", cfg.method,
                 hf_cfg["intermediate_size"], width, model.config.num_hidden_layers, before, count_params(model))
        model.to(getattr(torch, hf_cfg.get("dtype") or hf_cfg.get("torch_dtype") or "float32"))
        save_model(model, folder, w.dir)
        w.model = {"format": "hf", "file": "."}
        w.metrics.update(params=count_params(model), bytes=weight_bytes(w.dir), ffn_dim=width,
                         teacher_ffn_dim=hf_cfg["intermediate_size"], n_layer=model.config.num_hidden_layers)
        w.metrics.update(evaluate_torch(model.float(), data))
    return w.artifact

