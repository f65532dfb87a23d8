"""A teacher and its student's vocabularies: the check that distillation compares like with like, and the teacher
seen through a trimmed student's vocabulary (student ids in, logits over the kept tokens out)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pistill.errors import InputError


def check_tokenizers(teacher_dir: Path, student_dir: Path):
    """Refuse to distil across vocabularies: the KL compares the two models' logits token id by token id. A student
    whose vocabulary was trimmed from the teacher's (compress/vocab.py) is compared on its kept tokens; its
    VocabMap is returned (None for the teacher's own vocabulary)."""
    from pistill.models import read_config
    from pistill.vocab_map import VocabMap

    vocab = VocabMap.load(student_dir)
    vt, vs = read_config(teacher_dir)["vocab_size"], read_config(student_dir)["vocab_size"]
    if vocab is not None and VocabMap.load(teacher_dir) is None:  # else both trimmed alike, or neither
        check_trimmed(teacher_dir, student_dir, vocab, vt)
        return vocab
    a, b = Path(teacher_dir) / "tokenizer.json", Path(student_dir) / "tokenizer.json"
    if not (a.is_file() and b.is_file() and a.read_bytes() == b.read_bytes()):
        _same_vocab(teacher_dir, student_dir)
    if vt != vs:
        raise InputError(f"teacher vocab_size {vt} != student vocab_size {vs}: the logits cannot be compared; "
                         "start the student from the teacher (the prune stage)")
    return vocab


def _same_vocab(teacher_dir: Path, student_dir: Path) -> None:
    from pistill.models import load_tokenizer

    va, vb = load_tokenizer(teacher_dir).get_vocab(), load_tokenizer(student_dir).get_vocab()
    if va != vb:
        diff = sorted(set(va.items()) ^ set(vb.items()), key=lambda kv: kv[1])[:3]
        raise InputError(f"the teacher ({teacher_dir}, {len(va)} tokens) and the student ({student_dir}, "
                         f"{len(vb)} tokens) have different tokenizers, e.g. {diff}; distillation needs one "
                         "vocabulary: start the student from the teacher (the prune stage) or share its tokenizer")


def check_trimmed(teacher_dir: Path, student_dir: Path, vocab, teacher_vocab: int) -> None:
    """A trimmed student's map must point into this teacher's vocabulary, token for token."""
    from pistill.models import load_tokenizer

    t_tok, s_tok = load_tokenizer(teacher_dir), load_tokenizer(student_dir)
    same = t_tok.convert_ids_to_tokens(vocab.kept.tolist()) == s_tok.convert_ids_to_tokens(list(range(vocab.size)))
    if vocab.teacher_vocab_size != teacher_vocab or not same:
        raise InputError(f"the student {student_dir} was trimmed from another vocabulary than the teacher's "
                         f"({teacher_dir}, {teacher_vocab} tokens); prune it from this teacher")



def kept_teacher(teacher, vocab):
    """`teacher` (an HF causal LM over the full vocabulary) as a module that takes a trimmed student's token ids
    and returns logits over the student's tokens only: the teacher's logits gathered at `vocab.kept`. Every loss
    then takes its softmax over the kept tokens, which renormalises the teacher's distribution onto them (the mass
    on dropped tokens is measured by `dropped_mass`)."""
    import copy

    import torch

    class KeptTeacher(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.teacher = teacher
            self.register_buffer("kept", torch.as_tensor(vocab.kept, device=teacher.device), persistent=False)
            self.config = copy.copy(teacher.config)
            self.config.vocab_size = vocab.size

        @property
        def device(self):
            return self.teacher.device

        def forward(self, input_ids, use_cache: bool = False):
            out = self.teacher(input_ids=self.kept[input_ids], use_cache=use_cache)
            out.logits = out.logits[..., self.kept]  # (B, T, N)
            return out

    return KeptTeacher()


def dropped_mass(teacher, blocks: np.ndarray, vocab) -> float:
    """The teacher's mean next-token probability on the tokens a trimmed vocabulary dropped, over every position of
    `blocks` (N, T) of teacher ids: what renormalising onto the kept tokens throws away."""
    import torch

    kept = torch.as_tensor(vocab.kept, device=teacher.device)
    total, n = 0.0, 0
    with torch.inference_mode():
        for block in blocks:
            x = torch.as_tensor(block[None].astype(np.int64), device=teacher.device)
            p = torch.softmax(teacher(input_ids=x, use_cache=False).logits[0].float(), dim=-1)  # (T, V)
            total += float((1.0 - p[:, kept].sum(-1)).clamp_min(0).sum())
            n += p.shape[0]
    return total / max(n, 1)
