"""Structured pruning to uniform layer shapes (MLP channels, attention heads, layers, hidden width) and
unstructured sparsity for comparison; the `prune` stage."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import ClassVar

from pistill.artifact import Artifact, ArtifactWriter
from pistill.errors import InputError
from pistill.rundir import check_free

from .importance import angular_block, get_scorer
from .mend import mend_linear
from .shapes import Shape, budget_shape, check_hidden, param_count, parse_params, round_to, teacher_shape
from .sparsity import get_weight_scorer, parse_nm, sparsify, zero_fraction
from .structured import drop_layers, prune_heads, prune_hidden, prune_mlp, select_channels, select_heads
from .vocab import corpus_counts, coverage, kept_count, token_counts, trim_folder

log = logging.getLogger(__name__)

MENDS = ("none", "linear")  # PruneConfig.mend
LAYER_METRICS = ("influence", "angular")  # PruneConfig.layer_metric


@dataclass(frozen=True)
class PruneConfig:
    """The shape of the pruned student, how its parts are chosen, and optional unstructured sparsity."""

    VERSION: ClassVar[int] = 3
    method: str = "activation"  # importance: activation (Minitron; Block Influence for layers) | magnitude | random
    ffn_dim: int | None = None  # MLP width kept in every layer; when set it overrides ffn_ratio
    ffn_ratio: float = 0.5  # fraction of MLP channels kept (when ffn_dim and target_params are unset)
    n_heads: int | None = None  # query heads kept per layer (None: all); a multiple of kv_heads
    kv_heads: int | None = None  # key/value heads kept per layer (None: all); whole GQA groups are dropped
    hidden: int | None = None  # embedding width kept across all layers (None: all); head_dim stays fixed
    n_layer: int | None = None  # layers kept (None: all); the lowest Block Influence ones are dropped
    target_params: str | int | None = None  # parameter budget, e.g. "60M": chooses hidden and ffn_dim (met within 2%)
    multiple_of: int = 32  # round widths to a multiple of this; llama.cpp/onnx kernels need multiples of 32
    kquant_friendly: bool = False  # round widths to multiples of 256 instead (llama.cpp K-quant super-blocks)
    sparsity: float = 0.0  # unstructured: fraction of each decoder weight row zeroed (same file size and speed)
    nm: str = ""  # semi-structured N:M instead, e.g. "2:4" (same file size and speed on a Pi)
    sparsity_method: str = "wanda"  # weight scores for sparsity / nm: wanda (|W| * ||X||) | magnitude
    calib_blocks: int = 16  # calibration blocks for the activation statistics (at most what the data holds)
    vocab: int | float | None = None  # tokens kept: a count (16384) or a share of the teacher's in (0, 1); None: all
    vocab_corpus: str = ""  # text or JSONL file whose token counts choose the kept tokens ("": the training blocks)
    mend: str = "none"  # none | linear: refit each run of dropped layers into the down_proj before it (ReplaceMe)
    layer_metric: str = "influence"  # layers dropped: influence (Block Influence) | angular (nearest block, Gromov)
    seed: int = 0  # random scorer seed

    @property
    def step(self) -> int:
        """The width multiple in effect."""
        return 256 if self.kquant_friendly else self.multiple_of

    def __post_init__(self):
        for axis in ("mlp", "heads", "layers", "hidden"):
            get_scorer(self.method, axis)  # ValueError listing the methods
        get_weight_scorer(self.sparsity_method)
        if self.ffn_dim is not None and self.ffn_dim < 1:
            raise ValueError(f"ffn_dim = {self.ffn_dim} must be at least 1; or leave it unset and use ffn_ratio")
        if not 0.0 < self.ffn_ratio <= 1.0:
            raise ValueError(f"ffn_ratio = {self.ffn_ratio} must be in (0, 1]: the fraction of channels kept")
        if self.multiple_of < 1:
            raise ValueError(f"multiple_of = {self.multiple_of} must be at least 1 (1 turns rounding off)")
        for name in ("ffn_dim", "hidden"):
            value = getattr(self, name)
            if value is not None and value % self.step:
                raise ValueError(f"{name} = {value} is not a multiple of {self.step}; "
                                 f"use {value // self.step * self.step or self.step} or lower multiple_of")
        for name in ("n_heads", "kv_heads", "hidden", "n_layer"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} = {getattr(self, name)} must be at least 1, or unset to keep them all")
        if self.n_heads and self.kv_heads and self.n_heads % self.kv_heads:
            fix = self.n_heads // self.kv_heads * self.kv_heads or self.kv_heads
            raise ValueError(f"n_heads = {self.n_heads} is not a multiple of kv_heads = {self.kv_heads}; every kv "
                             f"head needs the same number of query heads: use {fix}")
        if self.target_params is not None:
            if parse_params(self.target_params) < 1:
                raise ValueError(f"target_params = {self.target_params!r} must be positive")
            if self.ffn_dim is not None:
                raise ValueError("ffn_dim and target_params are both set; the budget chooses ffn_dim: unset one")
        if not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"sparsity = {self.sparsity} must be in [0, 1): the fraction of weights zeroed")
        if self.nm:
            parse_nm(self.nm)
            if self.sparsity:
                raise ValueError(f"sparsity = {self.sparsity} and nm = {self.nm!r} are both set; use one")
        if self.calib_blocks < 1:
            raise ValueError(f"calib_blocks = {self.calib_blocks} must be at least 1")
        if self.vocab is not None and not (0 < self.vocab < 1 if isinstance(self.vocab, float) else self.vocab >= 1):
            raise ValueError(f"vocab = {self.vocab} must be a token count of at least 1 (e.g. 16384) or a share of "
                             "the teacher's vocabulary in (0, 1); unset it to keep every token")
        if self.vocab_corpus and self.vocab is None:
            raise ValueError(f"vocab_corpus = {self.vocab_corpus!r} is set but vocab is not; set vocab (the tokens "
                             "kept) or remove vocab_corpus")
        for name, valid in (("mend", MENDS), ("layer_metric", LAYER_METRICS)):
            if getattr(self, name) not in valid:
                raise ValueError(f"{name} = {getattr(self, name)!r} is not one of: {', '.join(valid)}")

    def validate_paths(self) -> None:
        """Fail fast (no weights loaded) when vocab_corpus does not exist."""
        if self.vocab_corpus and not Path(self.vocab_corpus).is_file():
            raise ValueError(f"vocab_corpus file {self.vocab_corpus} does not exist; fix [prune] vocab_corpus")


def check_vocab(hf_cfg: dict, tok_json: dict, cfg: PruneConfig) -> int | None:
    """The number of tokens the trimmed vocabulary keeps (None: all); InputError before any weight loads."""
    return None if cfg.vocab is None else kept_count(cfg.vocab, tok_json, hf_cfg["vocab_size"])


def vocab_counts(folder: Path, data: Artifact, cfg: PruneConfig, vocab_size: int):
    """(vocab_size,) token counts that choose the kept tokens: vocab_corpus's, else the data's training blocks."""
    from pistill.data import load_blocks
    from pistill.models import load_tokenizer

    if cfg.vocab_corpus:
        return corpus_counts(load_tokenizer(folder), Path(cfg.vocab_corpus), vocab_size)
    return token_counts(load_blocks(data, "train"), vocab_size)


def vocab_metrics(folder: Path, out: Path, data: Artifact, vmap) -> dict:
    """Vocabulary sizes and the trimmed tokenizer's coverage of the held-out text (decoded with the teacher's)."""
    from pistill.data import load_blocks
    from pistill.models import load_tokenizer

    tok = load_tokenizer(folder)
    texts = [tok.decode(b.tolist(), skip_special_tokens=True) for b in load_blocks(data, "heldout")]
    return {"vocab_size": vmap.size, "teacher_vocab_size": vmap.teacher_vocab_size, **coverage(folder, out, texts)}


def kept_width(ffn_dim: int, cfg: PruneConfig) -> int:
    """The MLP width after pruning: cfg.ffn_dim, or ffn_ratio * ffn_dim rounded to a multiple of cfg.step."""
    if cfg.ffn_dim is not None:
        if cfg.ffn_dim > ffn_dim:
            raise InputError(f"ffn_dim = {cfg.ffn_dim} is wider than the teacher's MLP ({ffn_dim}); "
                             f"use a value up to {ffn_dim}")
        return cfg.ffn_dim
    return min(round_to(cfg.ffn_ratio * ffn_dim, cfg.step), ffn_dim)  # full width when rounding overshoots


def target_shape(hf: dict, cfg: PruneConfig) -> Shape:
    """The uniform shape the teacher (HF config dict) is pruned to; fails on impossible targets, before weights."""
    t = teacher_shape(hf)
    for name, value in (("n_layer", cfg.n_layer), ("hidden", cfg.hidden), ("n_heads", cfg.n_heads),
                        ("kv_heads", cfg.kv_heads)):
        if value is not None and value > getattr(t, name):
            raise InputError(f"{name} = {value} is more than the teacher's {getattr(t, name)}; use at most that")
    if cfg.mend != "none" and (cfg.n_layer or t.n_layer) == t.n_layer:
        raise InputError(f"[prune] mend = {cfg.mend!r} needs dropped layers, but n_layer keeps all the teacher's "
                         f"{t.n_layer}: set n_layer below {t.n_layer}, or mend = \"none\"")
    kv = cfg.kv_heads or t.kv_heads
    n_heads = cfg.n_heads or (t.n_heads // t.kv_heads * kv)
    if n_heads % kv or n_heads // kv > t.n_heads // t.kv_heads:
        raise InputError(f"n_heads = {n_heads} with kv_heads = {kv}: each kv head can keep at most its "
                         f"{t.n_heads // t.kv_heads} query heads and all the same number; use a multiple of {kv} "
                         f"up to {t.n_heads // t.kv_heads * kv}")
    base = replace(t, n_layer=cfg.n_layer or t.n_layer, hidden=cfg.hidden or t.hidden, n_heads=n_heads, kv_heads=kv)
    if cfg.hidden is not None:
        check_hidden(cfg.hidden, n_heads, cfg.step)
    if cfg.target_params is None:
        return replace(base, ffn_dim=kept_width(t.ffn_dim, cfg))
    budget = parse_params(cfg.target_params)
    if budget >= param_count(t, hf):
        raise InputError(f"target_params = {cfg.target_params!r} is not below the teacher's "
                         f"{param_count(t, hf)} parameters; use a smaller budget")
    return budget_shape(base, t, hf, budget, cfg.step, fixed_hidden=cfg.hidden is not None)


def choose_layers(model, blocks, n_drop: int, cfg: PruneConfig) -> list[int]:
    """The `n_drop` layers to drop, ascending: the contiguous block nearest to identity (angular distance) for
    method activation with layer_metric angular, else the lowest `cfg.method` layer scores one by one."""
    if cfg.method == "activation" and cfg.layer_metric == "angular":
        return angular_block(model, blocks, n_drop)
    scores = get_scorer(cfg.method, "layers")(model, blocks, cfg.seed)  # (n_layer,)
    return sorted(scores.topk(n_drop, largest=False).indices.tolist())


def prune_structure(model, blocks, shape: Shape, cfg: PruneConfig) -> dict:
    """Prune `model` in place to `shape`: layers first (mended when cfg.mend says so), then heads, hidden width, MLP
    channels, each scored with `cfg.method` on the model as it is after the previous step. A step with nothing to
    remove is skipped. Returns what a run records: {"dropped_layers", "mend": per-gap figures} when layers go."""
    c, notes = model.config, {}
    if shape.n_layer < c.num_hidden_layers:
        drop = choose_layers(model, blocks, c.num_hidden_layers - shape.n_layer, cfg)
        log.info("prune: dropping layers %s (%s, %s)", drop, cfg.method, cfg.layer_metric)
        notes["dropped_layers"] = drop
        if cfg.mend == "linear":
            notes["mend"] = mend_linear(model, blocks, drop)
        drop_layers(model, drop)
    if (shape.n_heads, shape.kv_heads) != (c.num_attention_heads, c.num_key_value_heads):
        scores = get_scorer(cfg.method, "heads")(model, blocks, cfg.seed)
        prune_heads(model, [select_heads(s, c.num_key_value_heads, shape.n_heads, shape.kv_heads) for s in scores])
    if shape.hidden < c.hidden_size:
        scores = get_scorer(cfg.method, "hidden")(model, blocks, cfg.seed)  # (hidden,)
        prune_hidden(model, scores.topk(shape.hidden).indices.sort().values)
    if shape.ffn_dim < c.intermediate_size:
        scores = get_scorer(cfg.method)(model, blocks, cfg.seed)
        prune_mlp(model, select_channels(scores, shape.ffn_dim))
    return notes


def prune(model, blocks, cfg: PruneConfig, notes: dict | None = None) -> Shape:
    """Prune `model` in place to the target shape of `cfg` using calibration `blocks` (N, T), then apply the
    configured sparsity; returns the shape, and fills `notes` (when given) with what `prune_structure` returns."""
    blocks = blocks[: cfg.calib_blocks]
    shape = target_shape(model.config.to_dict(), cfg)
    (notes if notes is not None else {}).update(prune_structure(model, blocks, shape, cfg))
    if cfg.sparsity or cfg.nm:
        sparsify(model, blocks, cfg.sparsity_method, cfg.sparsity, cfg.nm)
    return shape


def run(inputs: Mapping[str, Artifact], cfg: PruneConfig, out: Path) -> Artifact:
    """Prune the teacher to a uniform shape (and optional sparsity) and save a standard HF folder."""
    import torch

    from pistill.data import load_blocks
    from pistill.evaluate import evaluate_torch
    from pistill.hf_folder import read_json
    from pistill.models import check_architecture, count_params, load_model, read_config, save_model, weight_bytes

    teacher, data = inputs["teacher"], inputs["data"]
    folder = teacher.model_path()
    hf_cfg = read_config(folder)
    check_architecture(hf_cfg, str(folder))
    t, shape = teacher_shape(hf_cfg), target_shape(hf_cfg, cfg)  # fails before any weight is loaded
    n_vocab = check_vocab(hf_cfg, read_json(folder / "tokenizer.json"), cfg)
    with ArtifactWriter(out, "prune", cfg, inputs) as w:  # the whole run inside, so wall_s counts it
        counts = vocab_counts(folder, data, cfg, hf_cfg["vocab_size"]) if n_vocab else None  # before the weights
        model = load_model(folder)  # float32: exact statistics and slicing
        before = count_params(model)
        notes = {}
        prune(model, load_blocks(data, "calib"), cfg, notes)
        log.info("prune: %s importance, %s -> %s, params %d -> %d", cfg.method, t, shape, before, count_params(model))
        vmap = trim_folder(model, folder, w.dir, counts, n_vocab) if n_vocab else None  # tokenizer files into w.dir
        model.to(getattr(torch, hf_cfg.get("dtype") or hf_cfg.get("torch_dtype") or "float32"))
        # safetensors: the pruned parameters at the teacher's dtype width (a tied embedding counted once)
        check_free(out, count_params(model) * model.dtype.itemsize, "the pruned model")
        save_model(model, folder, w.dir)
        w.model = {"format": "hf", "file": "."}
        w.metrics.update(params=count_params(model), bytes=weight_bytes(w.dir), ffn_dim=shape.ffn_dim,
                         teacher_ffn_dim=t.ffn_dim, n_layer=shape.n_layer, hidden=shape.hidden,
                         n_heads=shape.n_heads, kv_heads=shape.kv_heads, head_dim=shape.head_dim,
                         structured=shape != t, sparsity=zero_fraction(model), **notes)
        if cfg.sparsity or cfg.nm:  # say plainly what zeros buy on a Pi
            w.extra["sparsity_note"] = ("unstructured/N:M zeros are stored dense: same file size and Pi speed "
                                        "as the dense model; compare quality only")
        if vmap is not None:
            w.metrics.update(vocab_metrics(folder, w.dir, data, vmap))
        w.metrics.update(evaluate_torch(model.float(), data, vocab=vmap))
    return w.artifact
