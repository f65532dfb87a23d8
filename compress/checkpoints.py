"""Distillation's checkpoints and training log, kept beside the artifact (outside its temporary folder) so a killed
run resumes: trainable weights, optimizer, scheduler, step and RNG state written atomically; a damaged checkpoint
moved aside; a JSONL log whose half-written last line is dropped and redone."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from pistill.errors import OutputError
from pistill.rundir import atomic_write, open_own

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
TRAIN_LOG = "train_log.jsonl"
_STATE_KEYS = ("step", "key", "model", "optimizer", "scheduler", "rng", "cuda_rng")  # a checkpoint's contents


def checkpoint_dir(out: Path) -> Path:
    """Where checkpoints live: beside the artifact, outside its temporary folder, so a killed run resumes. A link
    there (planted in a shared run folder) is refused: checkpoints would be written wherever it points."""
    path = out.parent / f".{out.name}.ckpt"
    if path.is_symlink():
        raise OutputError(f"{path} is a symbolic link; pistill keeps its checkpoints there itself: remove the link "
                          "and rerun")
    return path


def trainable_state(model) -> dict:
    """What a checkpoint keeps of the model: its whole state_dict when every parameter trains (method full), else
    the trainable tensors alone (LoRA adapters: the frozen base is loaded again from the student folder)."""
    params = dict(model.named_parameters())
    if all(p.requires_grad for p in params.values()):
        return model.state_dict()
    return {name: p.detach() for name, p in params.items() if p.requires_grad}


def load_trainable(model, state: dict) -> None:
    """Restore `trainable_state`'s tensors: all of them (strict) or, with frozen parameters, every trainable one."""
    if all(p.requires_grad for p in model.parameters()):
        model.load_state_dict(state)
        return
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    if set(state) != trainable:
        raise RuntimeError(f"checkpoint holds {len(state)} tensors for {len(trainable)} trainable parameters")
    model.load_state_dict(state, strict=False)


def save_checkpoint(path: Path, student, opt, sched, step: int, key: str) -> None:
    """Trainable weights (`trainable_state`), optimizer, scheduler, step and RNG state, written to a temporary file
    and renamed (atomic)."""
    import torch

    state = {"step": step, "key": key, "model": trainable_state(student), "optimizer": opt.state_dict(),
             "scheduler": sched.state_dict(), "rng": torch.get_rng_state(),
             "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)  # created anew below: never written through a link planted under its name
    with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644), "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())  # on disk before the rename, so a crash leaves the old file or the new one
    os.replace(tmp, path)


def read_checkpoint(path: Path) -> dict | None:
    """A checkpoint's state, or None when the file is damaged (truncated, not a checkpoint): then it is moved
    aside to `<name>.damaged-<time>` with a warning naming it, and the stage starts over."""
    import pickle

    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and all(k in state for k in _STATE_KEYS) and isinstance(state["step"], int):
            return state
        problem = "it is not a pistill checkpoint"
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError) as e:  # truncated zip, bad pickle
        problem = f"{type(e).__name__}: {' '.join(str(e).split())[:120]}"
    aside = path.with_name(f"{path.name}.damaged-{time.strftime('%Y%m%dT%H%M%S')}")
    os.replace(path, aside)
    log.warning("distill: %s is damaged (%s); moved it to %s and starting this stage from step 0", path, problem,
                aside.name)
    return None


def load_checkpoint(path: Path, student, opt, sched, key: str) -> int:
    """Restore a checkpoint written for the same inputs and config; the step to resume from (0: none, or a damaged
    file, moved aside)."""
    import torch

    state = read_checkpoint(path) if path.is_file() else None
    if state is None:
        return 0
    if state["key"] != key:
        log.warning("distill: %s belongs to another config or inputs; starting from step 0", path)
        return 0
    load_trainable(student, state["model"])
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"])
    if state["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    log.info("distill: resuming from step %d (%s)", state["step"], path)
    return state["step"]


def read_log(path: Path) -> list[dict]:
    """The rows of a JSONL training log; a damaged line (half-written, not a row) is dropped with a warning naming
    the file and the line, and the steps it held are redone."""
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if not isinstance(row, dict) or not isinstance(row.get("step"), int):
            log.warning("distill: %s line %d is damaged; dropped it (its step is redone)", path, n)
            continue
        rows.append(row)
    return rows


class TrainLog:
    """JSONL training log kept beside the checkpoint; rows after the resumed step are dropped (they are redone)."""

    def __init__(self, path: Path | None, resume_step: int):
        self.path = path
        self.rows: list[dict] = []
        if path is not None and path.is_file():
            self.rows = [r for r in read_log(path) if r["step"] <= resume_step]
        if path is not None:  # atomically: a kill leaves the old log or the new one
            atomic_write(path, "".join(json.dumps(r) + "\n" for r in self.rows))

    def add(self, row: dict) -> None:
        self.rows.append(row)
        if self.path is not None:  # one write(2) of the whole line: a killed process writes all of it or none
            fd = open_own(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)  # never through a planted link
            try:
                os.write(fd, (json.dumps(row) + "\n").encode())
            finally:
                os.close(fd)

    def summary(self) -> dict:
        train = [r for r in self.rows if "loss" in r]
        if not train:
            return {"steps": 0}
        evals = [r for r in self.rows if "eval_loss" in r]
        out = {"steps": train[-1]["step"], "loss_first": train[0]["loss"], "loss_last": train[-1]["loss"],
               "tokens_per_s": sum(r["tokens"] for r in train) / sum(r["step_s"] for r in train)}
        return out | ({"eval_loss": evals[-1]["eval_loss"]} if evals else {})
