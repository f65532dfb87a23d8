"""The teacher seen through a trimmed student's vocabulary: student ids in, logits over the kept tokens out."""

from __future__ import annotations

import numpy as np


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
