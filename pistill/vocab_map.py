"""A trimmed model's vocabulary map: which teacher token each of its token ids is, and how a dropped teacher token
is written in its tokens (compress/vocab.py writes it; evaluation, distillation and the exports read it)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

VOCAB_MAP = "vocab_map.json"  # in a trimmed model's HF folder, beside tokenizer.json


@dataclass(frozen=True)
class VocabMap:
    """How a trimmed student's token ids relate to its teacher's.

    Student id i is teacher id kept[i] (kept ascending, so the order of the teacher's vocabulary is kept). A
    dropped teacher token is written in the student's vocabulary as the pieces the trimmed tokenizer splits its
    bytes into (`expand`): the teacher's token stream and the student's encode the same bytes.
    """

    kept: np.ndarray  # (N,) int64: teacher id of each student id, ascending
    teacher_vocab_size: int  # the teacher's vocab_size (its embedding rows)
    expand: dict[int, tuple[int, ...]] = field(default_factory=dict)  # dropped teacher id -> student ids

    def __post_init__(self):
        kept = np.asarray(self.kept, dtype=np.int64)
        if kept.ndim != 1 or len(kept) == 0 or np.any(np.diff(kept) <= 0):
            raise ValueError("VocabMap.kept must be a non-empty, strictly ascending list of teacher ids")
        if kept[-1] >= self.teacher_vocab_size:
            raise ValueError(f"VocabMap.kept holds id {kept[-1]} >= teacher_vocab_size {self.teacher_vocab_size}")
        object.__setattr__(self, "kept", kept)

    @property
    def size(self) -> int:
        return len(self.kept)

    def student_ids(self) -> np.ndarray:
        """(teacher_vocab_size,) int64: the student id of every kept teacher id, -1 for dropped ones."""
        inv = np.full(self.teacher_vocab_size, -1, dtype=np.int64)
        inv[self.kept] = np.arange(len(self.kept))
        return inv

    def to_teacher(self, ids) -> np.ndarray:
        """Student ids (any shape) -> teacher ids."""
        return self.kept[np.asarray(ids, dtype=np.int64)]

    def to_student(self, ids) -> tuple[np.ndarray, np.ndarray]:
        """A teacher token sequence (T,) in student ids: (ids (T',), source (T',)), where source[j] is the position
        of the teacher token that student token j comes from (dropped tokens become several pieces)."""
        inv = self.student_ids()
        out, src = [], []
        for pos, t in enumerate(np.asarray(ids, dtype=np.int64).tolist()):
            pieces = (inv[t],) if inv[t] >= 0 else self.expand.get(t)
            if pieces is None:
                raise ValueError(f"teacher token {t} is neither kept nor has an expansion in the vocabulary map")
            out.extend(pieces)
            src.extend([pos] * len(pieces))
        return np.asarray(out, dtype=np.int64), np.asarray(src, dtype=np.int64)

    def to_student_blocks(self, blocks: np.ndarray) -> np.ndarray:
        """Blocks (N, T) of teacher ids as blocks (N', T) of student ids: the expanded stream re-cut into blocks of
        the same length (the tail that does not fill a block is dropped; N' >= N when tokens expand)."""
        stream = np.concatenate([self.to_student(b)[0] for b in blocks]) if len(blocks) else np.zeros(0, np.int64)
        t = blocks.shape[1]
        return stream[: len(stream) // t * t].reshape(-1, t).astype(blocks.dtype)

    def to_json(self) -> dict:
        return {"kept": self.kept.tolist(), "teacher_vocab_size": int(self.teacher_vocab_size),
                "expand": {str(k): list(v) for k, v in sorted(self.expand.items())}}

    @classmethod
    def from_json(cls, d: dict) -> "VocabMap":
        return cls(np.asarray(d["kept"], dtype=np.int64), int(d["teacher_vocab_size"]),
                   {int(k): tuple(int(i) for i in v) for k, v in d.get("expand", {}).items()})

    def save(self, folder: Path) -> Path:
        """Write `folder`/vocab_map.json atomically."""
        path = Path(folder) / VOCAB_MAP
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(self.to_json()))
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, folder: Path | str | None) -> "VocabMap | None":
        """The map of a trimmed model's HF folder, or None for a folder with the teacher's vocabulary."""
        if folder is None:
            return None
        path = Path(folder) / VOCAB_MAP
        if not path.is_file():
            return None
        return cls.from_json(json.loads(path.read_text()))


# --- counts -------------------------------------------------------------------------------------------------------
