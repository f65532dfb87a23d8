"""Knowledge distillation: train the pruned student to match the teacher's next-token distribution, resumably."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import ClassVar

import numpy as np

from pistill.artifact import Artifact, ArtifactWriter, config_dict, input_key
from pistill.errors import InputError, UserError
from pistill.rundir import check_free, clean_stale, make_dir

from .checkpoints import CHECKPOINT, TRAIN_LOG, TrainLog, checkpoint_dir, load_checkpoint, save_checkpoint
from .kept_teacher import check_tokenizers
from .losses import SOFT_LOSSES, distill_loss

log = logging.getLogger(__name__)

METHODS = ("full", "lora")  # [distill] method


class DivergedError(UserError, RuntimeError):
    """The training loss turned NaN or infinite; nothing was saved after the last finite checkpoint."""


# --- config and schedule ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DistillConfig:
    """The distillation run: optimizer, schedule, loss, evaluation and checkpoints."""

    VERSION: ClassVar[int] = 3
    steps: int = 40  # optimizer steps
    batch_size: int = 4  # blocks per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 2e-4  # peak learning rate (AdamW)
    warmup_steps: int = 4  # linear warm-up from lr / warmup_steps to lr
    min_lr_ratio: float = 0.1  # the cosine decays to lr * min_lr_ratio at the last step
    weight_decay: float = 0.0  # AdamW decoupled weight decay on matrices (never on norms)
    clip: float = 1.0  # max global gradient norm; 0 turns clipping off
    temperature: float = 1.0  # softmax temperature of the KL term
    alpha: float = 0.0  # weight of the hard-label CE; 1 - alpha weighs the KL (Minitron: KL alone)
    loss: str = "forward_kl"  # soft loss: forward_kl (Hinton) | reverse_kl (MiniLLM) | jsd (GKD, beta) | tv
    beta: float = 0.5  # jsd only: 0 is forward_kl, 1 is reverse_kl, between them the generalized JSD
    teacher_topk: int = 0  # 0: live teacher logits; K: cache its top-K log-probs per block, loss over those K
    eval_every: int = 10  # held-out distillation loss every N steps; 0 turns it off
    eval_blocks: int = 4  # held-out blocks for that periodic evaluation
    ckpt_every: int = 10  # checkpoint every N steps (outside the artifact, for resuming); 0 turns it off
    seed: int = 0  # data order and torch RNG
    threads: int = 0  # torch CPU threads; 0 keeps torch's default
    grad_checkpointing: str = "auto"  # recompute activations in backward: auto (on CUDA only) | on | off
    student: str = ""  # "": the prune stage's model; else any HF folder, .gguf file or hub id with the teacher's
    #                    tokenizer (its weights are the starting point)
    qat: str = "none"  # fake-quantize the student late in training in an export's 4-bit layout: none | q4_0 | int4
    qat_start: float = 0.5  # QAT from this fraction of the steps on; the saved weights are then on that 4-bit grid
    method: str = "full"  # full: train every weight | lora: adapters on a frozen base, merged at the end (lora.py)
    lora_rank: int = 16  # lora: rank r of each adapter pair (A: r x in, B: out x r)
    lora_alpha: float = 32.0  # lora: the adapters' output is scaled by lora_alpha / lora_rank
    lora_dropout: float = 0.0  # lora: dropout on the adapters' input while training
    lora_base: str = "nf4"  # lora: the frozen base as nf4 (bitsandbytes, double quant: QLoRA) | none (float32)
    # share of micro-batches made on-policy: the first half of each block kept as the prompt and the second half
    # sampled from the student being trained, then scored by the teacher (GKD; DistillSpec for drafts); 0 = none
    on_policy: float = 0.0

    def __post_init__(self):
        for name in ("steps", "batch_size", "grad_accum", "eval_blocks"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} = {getattr(self, name)} must be at least 1")
        for name in ("warmup_steps", "eval_every", "ckpt_every", "threads", "teacher_topk"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} = {getattr(self, name)} must be >= 0 (0 turns it off)")
        if not self.lr > 0:
            raise ValueError(f"lr = {self.lr} must be positive; try 1e-4 to 3e-4")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio = {self.min_lr_ratio} must be in [0, 1]")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha = {self.alpha} must be in [0, 1]: the weight of the hard-label loss")
        if self.loss not in SOFT_LOSSES:
            raise ValueError(f"loss '{self.loss}' is not supported; supported: {', '.join(sorted(SOFT_LOSSES))}")
        if not 0.0 <= self.beta <= 1.0:
            raise ValueError(f"beta = {self.beta} must be in [0, 1]: 0 is forward_kl, 1 is reverse_kl")
        if not self.temperature > 0:
            raise ValueError(f"temperature = {self.temperature} must be positive; 1.0 is the plain distribution")
        if self.grad_checkpointing not in ("auto", "on", "off"):
            raise ValueError(f"grad_checkpointing = {self.grad_checkpointing!r} is not one of auto, on, off")
        if self.weight_decay < 0 or self.clip < 0:
            raise ValueError(f"weight_decay = {self.weight_decay} and clip = {self.clip} must be >= 0")
        from .qat import QAT_CHOICES

        if self.qat not in QAT_CHOICES:
            raise ValueError(f"qat '{self.qat}' is not supported; use one of {', '.join(QAT_CHOICES)} (q4_0 for the "
                             "GGUF export, int4 for the ONNX one)")
        if not 0.0 <= self.qat_start < 1.0:
            raise ValueError(f"qat_start = {self.qat_start} must be in [0, 1): the fraction of the steps before QAT")
        if not 0.0 <= self.on_policy <= 1.0:
            raise ValueError(f"on_policy = {self.on_policy} must be in [0, 1]: the share of on-policy micro-batches")
        if self.on_policy and self.teacher_topk:
            raise ValueError("on_policy > 0 with teacher_topk > 0: the teacher's cache holds the data's blocks, not the "
                             "student's samples; set teacher_topk = 0")
        self._check_lora()

    def _check_lora(self) -> None:
        from .lora import LORA_BASES

        if self.method not in METHODS:
            raise ValueError(f"method '{self.method}' is not supported; use full (train every weight) or lora "
                             "(adapters on a frozen base)")
        if self.lora_rank < 1:
            raise ValueError(f"lora_rank = {self.lora_rank} must be at least 1; try 8 to 64")
        if not self.lora_alpha > 0:
            raise ValueError(f"lora_alpha = {self.lora_alpha} must be positive; try twice lora_rank")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout = {self.lora_dropout} must be in [0, 1)")
        if self.lora_base not in LORA_BASES:
            raise ValueError(f"lora_base '{self.lora_base}' is not supported; use nf4 (a 4-bit base: QLoRA) or none "
                             "(a float32 base)")
        if self.method == "lora" and self.qat != "none":
            raise ValueError(f"qat = '{self.qat}' with method = 'lora': QAT trains the full weights; use "
                             "qat = \"none\" with lora")

    def validate_paths(self) -> None:
        """Fail fast (no weights loaded) when a `student` source cannot be found."""
        if self.student:
            from pistill.models import check_source

            check_source(self.student, "student", "[distill] student")


def lr_factor(step: int, cfg: DistillConfig) -> float:
    """Multiplier of cfg.lr at optimizer step `step` (0-based): linear warm-up, then cosine to min_lr_ratio."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - 1 - cfg.warmup_steps)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def batch_indices(n_blocks: int, batch_size: int, index: int, seed: int) -> np.ndarray:
    """Block indices of micro-batch `index`: each epoch is a permutation seeded by (seed, epoch), so the order is a
    pure function of the position and a resumed run sees exactly the blocks an uninterrupted one would."""
    pos = np.arange(index * batch_size, (index + 1) * batch_size)
    epoch = pos // n_blocks
    out = np.empty_like(pos)
    for e in np.unique(epoch):
        perm = np.random.default_rng([seed, int(e)]).permutation(n_blocks)
        out[epoch == e] = perm[pos[epoch == e] % n_blocks]
    return out


# --- checkpoint space ---------------------------------------------------------------------------------------

def check_checkpoint_space(path: Path | None, student, cfg: DistillConfig) -> None:
    """OutputError before the first step when the checkpoint's disk lacks room for a checkpoint and the student:
    the trainable weights and AdamW's two moments of the same size (3x their bytes; a new checkpoint is written
    beside the old one, then renamed over it), plus every parameter at float32 (the saved student, at most)."""
    if path is None or not cfg.ckpt_every:
        return
    params = list(student.parameters())
    trainable = sum(p.numel() * p.element_size() for p in params if p.requires_grad)
    check_free(path.parent, 3 * trainable + 4 * sum(p.numel() for p in params),
               "distillation (a checkpoint, then the student)")


# --- training -----------------------------------------------------------------------------------------------------

def grad_checkpointing(cfg: DistillConfig, device) -> bool:
    """Whether to recompute the student's activations in the backward pass: "auto" does it on CUDA, where
    activation memory bounds the batch; on a CPU the RAM is there and the recompute only costs time."""
    return cfg.grad_checkpointing == "on" or (cfg.grad_checkpointing == "auto" and device.type == "cuda")


def _autocast(device):
    import torch

    # bf16 autocast on CUDA only: CPU bf16 matmuls are several times slower than float32
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def on_policy_batch(index: int, cfg: DistillConfig) -> bool:
    """Whether global micro-batch `index` is made on-policy: a pure function of the seed and the index, so a
    resumed run makes the same choice."""
    import random

    return bool(cfg.on_policy) and random.Random(cfg.seed * 1_000_003 + index).random() < cfg.on_policy


def student_continuation(model, x, temperature: float = 1.0):
    """x (B, T) with its second half replaced by tokens sampled from `model` after the first half (no gradient; the
    torch generator, which checkpoints save, decides the samples). Agarwal et al. 2024 (GKD, arXiv:2306.13649)
    Algorithm 1: the student's own outputs, scored by the teacher."""
    import inspect

    import torch

    keep = x.shape[1] - x.shape[1] // 2
    prompt, new = x[:, :keep], []
    training = model.training
    model.eval()  # the KV cache (gradient checkpointing turns it off in training mode)
    cache = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"  # 5.24 renamed it
    try:
        with torch.no_grad(), _autocast(x.device):
            out = model(input_ids=prompt, use_cache=True)
            for i in range(x.shape[1] - keep):
                probs = torch.softmax(out.logits[:, -1].float() / temperature, dim=-1)
                new.append(torch.multinomial(probs, 1))  # (B, 1)
                if i < x.shape[1] - keep - 1:
                    out = model(input_ids=new[-1], use_cache=True, **{cache: out.past_key_values})
    finally:
        model.train(training)
    return torch.cat([prompt, *new], dim=1) if new else prompt


def micro_loss(student, teacher, x, cfg: DistillConfig, topk: tuple | None = None):
    """The distillation loss of one micro-batch x (B, T): next-token positions 0..T-2 of both models.

    `topk`: the teacher's cached (ids, log-probs), each (B, T-1, K), used instead of running `teacher`.
    """
    import torch

    ids, t_logits = topk if topk is not None else (None, None)
    if topk is None:
        with torch.no_grad(), _autocast(x.device):
            t_logits = teacher(input_ids=x, use_cache=False).logits[:, :-1]  # (B, T-1, V)
    with _autocast(x.device):
        s_logits = student(input_ids=x, use_cache=False).logits[:, :-1]
    return distill_loss(s_logits, t_logits, x[:, 1:], cfg.alpha, cfg.temperature, cfg.loss, cfg.beta, ids)


# --- top-k teacher cache ------------------------------------------------------------------------------------------

def teacher_topk(teacher, blocks: np.ndarray, k: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """The teacher's top-k next-token log-probs at positions 0..T-2 of every block: ids (N, T-1, k) int32 and
    log-probs (N, T-1, k) float32 (log-softmax over the full vocabulary, temperature 1)."""
    import torch

    ids, logp = [], []
    for i in range(0, len(blocks), batch_size):
        x = torch.as_tensor(blocks[i:i + batch_size].astype(np.int64), device=teacher.device)
        with torch.no_grad(), _autocast(x.device):
            lp = torch.log_softmax(teacher(input_ids=x, use_cache=False).logits[:, :-1].float(), dim=-1)
        v, j = lp.topk(k, dim=-1)
        ids.append(j.int().cpu().numpy()), logp.append(v.cpu().numpy())
    return np.concatenate(ids), np.concatenate(logp)


def load_topk_cache(work_dir: Path | None, teacher, blocks: np.ndarray, cfg: DistillConfig, key: str,
                    write: bool = True):
    """The teacher's top-k cache for `blocks`: read from `work_dir` when written for the same `key`, else computed
    once (the teacher runs once per training block) and, if `write`, saved there atomically. None when
    cfg.teacher_topk is 0."""
    if not cfg.teacher_topk:
        return None
    k = min(cfg.teacher_topk, teacher.config.vocab_size)
    path = None if work_dir is None else work_dir / f"teacher_top{k}.npz"
    if path is not None and path.is_file():
        try:
            with np.load(path) as z:
                if str(z["key"]) == key and z["ids"].shape[0] == len(blocks):
                    return z["ids"], z["logp"]
        except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as e:  # damaged: computed again
            log.warning("distill: %s is damaged (%s); computing the teacher's top-k again", path, type(e).__name__)
    ids, logp = teacher_topk(teacher, blocks, k, cfg.batch_size)
    if path is not None and write:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.stem}.tmp-{os.getpid()}.npz")
        np.savez(tmp, ids=ids, logp=logp, key=np.array(key))
        os.replace(tmp, path)
    log.info("distill: the teacher's top-%d hold %.1f%% of its probability", k, 100 * np.exp(logp).sum(-1).mean())
    return ids, logp


def distributed():
    """An `accelerate.Accelerator` when launched as several processes (`accelerate launch`, torchrun), else None."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    import torch
    from accelerate import Accelerator

    # reads the launcher's environment (rank, world); without cpu=True accelerate ignores CPU processes (gloo)
    return Accelerator(cpu=not torch.cuda.is_available())


def _train_step(student, teacher, blocks: np.ndarray, step: int, opt, sched, cfg: DistillConfig,
                dist=None, cache: tuple | None = None) -> dict:
    """One optimizer step over cfg.grad_accum micro-batches; the mean loss and the gradient norm.

    Under `dist` (DDP) `student` is the wrapped model: rank r takes global micro-batch (i * world + r), so the
    ranks see disjoint blocks, and the gradients are all-reduced on the last micro-batch's backward.
    `cache`: the teacher's top-k (ids, log-probs) of every block (`load_topk_cache`), used instead of the teacher.
    """
    import contextlib

    import torch

    world, rank = (dist.num_processes, dist.process_index) if dist else (1, 0)
    params = list(student.parameters())
    device, total = params[0].device, 0.0
    for micro in range(cfg.grad_accum):
        index = (step * cfg.grad_accum + micro) * world + rank
        idx = batch_indices(len(blocks), cfg.batch_size, index, cfg.seed)
        x = torch.as_tensor(blocks[idx].astype(np.int64), device=device)
        if on_policy_batch(index, cfg):
            x = student_continuation(student.module if dist else student, x, cfg.temperature)
        topk = None if cache is None else (torch.as_tensor(cache[0][idx].astype(np.int64), device=device),
                                           torch.as_tensor(cache[1][idx], device=device))
        last = micro == cfg.grad_accum - 1
        with dist.no_sync(student) if dist and not last else contextlib.nullcontext():  # all-reduce once a step
            loss = micro_loss(student, teacher, x, cfg, topk) / cfg.grad_accum
            loss.backward()
        total += loss.item()
    if dist:
        total = dist.reduce(torch.tensor(total, device=device), reduction="mean").item()
    norm = torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None],
                                          cfg.clip if cfg.clip > 0 else float("inf"))
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    return {"loss": total, "grad_norm": float(norm)}


def check_finite(row: dict, cfg: DistillConfig, ckpt: Path | None) -> None:
    """Stop (DivergedError) when a step's loss or gradient norm is NaN or infinite: the student is ruined, and
    saving it would only move the failure to the export."""
    if math.isfinite(row["loss"]) and math.isfinite(row["grad_norm"]):
        return
    kept = f"the checkpoint {ckpt} of an earlier step is kept" if ckpt is not None and ckpt.is_file() else \
        "nothing was saved"
    raise DivergedError(f"distill: step {row['step']} has loss {row['loss']:.4g} and gradient norm "
                        f"{row['grad_norm']:.4g}: training diverged; lower [distill] lr (now {cfg.lr:g}) or set "
                        f"clip (now {cfg.clip:g}), or check the teacher's logits; {kept}")


def evaluate_loss(student, teacher, heldout: np.ndarray, cfg: DistillConfig) -> float:
    """Mean distillation loss on held-out blocks, one block at a time."""
    import torch

    student.eval()
    with torch.no_grad():
        losses = [micro_loss(student, teacher, torch.as_tensor(b[None].astype(np.int64), device=student.device),
                             cfg).item() for b in heldout[: cfg.eval_blocks]]
    student.train()
    return float(np.mean(losses))


def make_optimizer(student, cfg: DistillConfig):
    """AdamW with decay on matrices only (not norms or biases, as in nanoGPT), and the warm-up + cosine schedule."""
    import torch

    params = [p for p in student.parameters() if p.requires_grad]  # tied embeddings appear once; no frozen base
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=cfg.lr)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, partial(lr_factor, cfg=cfg))


def _resume(work_dir: Path | None, student, opt, sched, key: str,
            main: bool = True) -> tuple[Path | None, int, TrainLog]:
    """The checkpoint path, the step to start from and the log, restoring a matching checkpoint in `work_dir`.

    Every rank restores the same checkpoint; only the main process (`main`) writes the checkpoint and the log.
    """
    if work_dir is None:
        return None, 0, TrainLog(None, 0)
    if main:
        make_dir(work_dir)
        clean_stale(work_dir, "*.tmp-*")  # a killed run's half-written checkpoint, log or top-k cache
    start = load_checkpoint(work_dir / CHECKPOINT, student, opt, sched, key)
    return (work_dir / CHECKPOINT, start, TrainLog(work_dir / TRAIN_LOG, start)) if main else \
        (None, start, TrainLog(None, start))


def _progress(show: bool = True):
    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    return Progress(TextColumn("distill"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[loss]}"), TextColumn("{task.fields[tps]}"),  # `bar_fields`
                    TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                    console=Console(stderr=True), disable=not show)  # stdout is for a command's output


def bar_fields(rows: list[dict]) -> dict[str, str]:
    """The progress bar's loss and tokens/s: the last logged training step's (a resumed run shows where it stopped),
    or blank before any step; never nan."""
    last = next((r for r in reversed(rows) if "loss" in r), {})
    loss, tps = last.get("loss"), last.get("tokens_per_s")
    return {"loss": f"loss {loss:.4f}" if _finite(loss) else "", "tps": f"{tps:.0f} tok/s" if _finite(tps) else ""}


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def qat_switch(student, cfg: DistillConfig, step: int) -> None:
    """Turn fake quantization (`cfg.qat`) on at the first step that trains with it, or at once on resuming later."""
    from . import qat

    if cfg.qat != "none" and step >= qat.start_step(cfg.steps, cfg.qat_start) and not qat.is_enabled(student):
        n = qat.enable(student, cfg.qat)
        log.info("distill: from step %d, %d weight matrices are fake-quantized as %s (QAT)", step + 1, n, cfg.qat)


def qat_summary(student, cfg: DistillConfig) -> dict:
    """Bake the fake-quantized weights into the student (plain modules again); what the summary records of QAT."""
    from . import qat

    if cfg.qat == "none":
        return {}
    qat.disable(student, bake=True)
    return {"qat": cfg.qat, "qat_from_step": qat.start_step(cfg.steps, cfg.qat_start) + 1}


def train(student, teacher, blocks: np.ndarray, heldout: np.ndarray, cfg: DistillConfig,
          work_dir: Path | None = None, key: str = "") -> dict:
    """Distil `teacher` into `student` (in place) on `blocks` (N, T); summary of the run (`TrainLog.summary`).

    With `work_dir`, a checkpoint and the JSONL log live there, and a rerun with the same `key` resumes.
    Launched as several processes (`distributed`), the student is wrapped in DDP: each step takes
    batch_size x grad_accum blocks on every rank, and only the main process logs and checkpoints.
    With cfg.teacher_topk, the teacher runs once per block up front and its top-k is cached in `work_dir`.
    With cfg.qat, the last steps train through fake-quantized weights, which the student keeps at the end.
    """
    import torch

    torch.manual_seed(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    dist = distributed()
    main = dist is None or dist.is_main_process
    key = key or json.dumps(config_dict(cfg), sort_keys=True)
    opt, sched = make_optimizer(student, cfg)
    ckpt, start, tlog = _resume(work_dir, student, opt, sched, key, main)
    check_checkpoint_space(ckpt, student, cfg)
    recompute = grad_checkpointing(cfg, next(student.parameters()).device)
    if recompute:  # transformers' per-layer checkpointing, non-reentrant (works with DDP and no_sync)
        student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if dist:  # every rank then finds the same cache (a sharded teacher's forward passes are collective)
        dist.wait_for_everyone()
    cache = load_topk_cache(work_dir, teacher, blocks, cfg, key, write=main)
    model = dist.prepare_model(student) if dist else student  # DDP shares the student's parameters
    tokens = cfg.batch_size * cfg.grad_accum * blocks.shape[1] * (dist.num_processes if dist else 1)
    student.train()
    qat_switch(student, cfg, start)
    with _progress(show=main) as bar:
        task = bar.add_task("distill", total=cfg.steps, completed=start, **bar_fields(tlog.rows))
        for step in range(start, cfg.steps):
            qat_switch(student, cfg, step)
            t0, lr = time.perf_counter(), sched.get_last_lr()[0]  # the lr this step uses
            row = {"step": step + 1, **_train_step(model, teacher, blocks, step, opt, sched, cfg, dist, cache),
                   "lr": lr, "tokens": tokens, "step_s": time.perf_counter() - t0}
            check_finite(row, cfg, ckpt)
            tlog.add(row | {"tokens_per_s": tokens / row["step_s"]})
            bar.update(task, advance=1, **bar_fields(tlog.rows))
            if cfg.eval_every and (step + 1) % cfg.eval_every == 0:  # every rank: see the top-k cache
                tlog.add({"step": step + 1, "eval_loss": evaluate_loss(student, teacher, heldout, cfg)})
            if ckpt is not None and cfg.ckpt_every and (step + 1) % cfg.ckpt_every == 0:
                save_checkpoint(ckpt, student, opt, sched, step + 1, key)
    if dist:
        dist.wait_for_everyone()
    if recompute:
        student.gradient_checkpointing_disable()
    student.eval()
    return tlog.summary() | qat_summary(student, cfg)


# --- the stage ----------------------------------------------------------------------------------------------------

def training_blocks(data: Artifact, vocab_size: int, vocab=None) -> tuple[np.ndarray, np.ndarray]:
    """The train and held-out blocks of a data artifact, checked against the student's vocabulary; in a trimmed
    student's ids (`vocab`, its VocabMap) when it has one."""
    from pistill.data import load_blocks

    blocks, heldout = load_blocks(data, "train"), load_blocks(data, "heldout")
    if vocab is not None:
        if max(blocks.max(), heldout.max()) >= vocab.teacher_vocab_size:
            raise InputError("the data holds token ids outside the teacher's vocabulary; rebuild the data artifact")
        return vocab.to_student_blocks(blocks), vocab.to_student_blocks(heldout)
    if max(blocks.max(), heldout.max()) >= vocab_size:
        raise InputError(f"the data holds token ids >= the student's vocab_size {vocab_size}; it was built with "
                         "another tokenizer: rebuild the data artifact from this teacher")
    return blocks, heldout


def check_inputs(t_dir: Path, s_dir: Path, data: Artifact) -> tuple[np.ndarray, np.ndarray]:
    """Every check before a weight loads (the student's architecture, one vocabulary, the data's token ids); the
    train and held-out blocks, in the student's token ids (the data holds the teacher's)."""
    from pistill.models import check_architecture, read_config

    s_cfg = read_config(s_dir)
    check_architecture(s_cfg, str(s_dir))
    vocab = check_tokenizers(t_dir, s_dir)
    return training_blocks(data, s_cfg["vocab_size"], vocab)


def distil(teacher, s_dir: Path, device: str, blocks: np.ndarray, heldout: np.ndarray, cfg: DistillConfig,
           work: Path, key: str):
    """The student in `s_dir`, loaded in float32 on `device` and trained against `teacher` (`train`, checkpoints and
    log in `work`); the student and the run's summary. With method lora, adapters on a frozen base are trained and
    merged: the student returned is an ordinary float32 model all the same."""
    import torch
    from transformers import AutoModelForCausalLM

    from .kept_teacher import kept_teacher
    from pistill.vocab_map import VocabMap

    vocab = VocabMap.load(s_dir)
    if vocab is not None and teacher.config.vocab_size == vocab.teacher_vocab_size:  # a student trimmed from it
        teacher = kept_teacher(teacher, vocab)  # the teacher's logits on the student's tokens
    if cfg.method == "lora":
        from . import lora

        adapted = lora.load_adapted(s_dir, cfg, device)
        summary = train(adapted, teacher, blocks, heldout, cfg, work, key) | lora.adapter_summary(adapted, cfg)
        return lora.merge(adapted, s_dir, cfg), summary
    student = AutoModelForCausalLM.from_pretrained(s_dir, dtype=torch.float32, device_map=device)
    return student, train(student, teacher, blocks, heldout, cfg, work, key)


def save_student(student, s_dir: Path, work: Path, dst: Path) -> None:
    """The trained student as an HF folder in `dst`: weights, `s_dir`'s tokenizer files, the training log."""
    from pistill.models import save_model

    save_model(student, s_dir, dst)
    shutil.copy2(work / TRAIN_LOG, dst / TRAIN_LOG)


def run(inputs: Mapping[str, Artifact], cfg: DistillConfig, out: Path) -> Artifact:
    """Distil the (quantized) teacher into the pruned student (or the model `cfg.student` names) and save the
    student as an HF folder."""
    import torch

    from pistill.data import load_blocks
    from pistill.evaluate import evaluate_torch
    from pistill.models import count_params, materialize, read_config, torch_device, weight_bytes

    from .kept_teacher import dropped_mass
    from .quantize import load_teacher
    from pistill.vocab_map import VocabMap

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise InputError("the distill stage writes its artifact from one process; to train on several, launch "
                         "compress/distill_launch.py with accelerate launch or torchrun")
    data = inputs["data"]
    t_dir = inputs["quantize"].model_path()
    s_dir = materialize(cfg.student, "student", "[distill] student") if cfg.student else inputs["prune"].model_path()
    blocks, heldout = check_inputs(t_dir, s_dir, data)
    work = checkpoint_dir(out)
    with ArtifactWriter(out, "distill", cfg, inputs) as w:  # the whole run inside, so wall_s counts training
        teacher = load_teacher(t_dir, torch_device())
        if (vocab := VocabMap.load(s_dir)) is not None and teacher.config.vocab_size == vocab.teacher_vocab_size:
            w.metrics["teacher_dropped_mass"] = dropped_mass(teacher, load_blocks(data, "heldout"), vocab)
            log.info("distill: the teacher puts %.2f%% of its held-out probability on the %d dropped tokens",
                     100 * w.metrics["teacher_dropped_mass"], vocab.teacher_vocab_size - vocab.size)
        student, summary = distil(teacher, s_dir, torch_device(), blocks, heldout, cfg, work,
                                  input_key("distill", cfg, inputs))
        del teacher
        log.info("distill: %d steps, loss %.4f -> %.4f, %.0f tok/s", summary["steps"], summary["loss_first"],
                 summary["loss_last"], summary["tokens_per_s"])
        w.metrics.update(evaluate_torch(student, data, VocabMap.load(s_dir)))
        s_cfg = read_config(s_dir)
        student.to(getattr(torch, s_cfg.get("dtype") or s_cfg.get("torch_dtype") or "float32"))
        save_student(student, s_dir, work, w.dir)
        w.model = {"format": "hf", "file": "."}
        w.metrics.update(params=count_params(student), bytes=weight_bytes(w.dir), **summary)
        w.extra["student"] = cfg.student or "prune"
        w.extra["method"] = cfg.method
    shutil.rmtree(work, ignore_errors=True)  # the artifact is complete; the checkpoint has served
    return w.artifact
