"""Distillation losses: pure functions of student and teacher logits, each citing its paper and equation."""

from __future__ import annotations

import math


def soft_log_probs(student_logits, teacher_logits, temperature: float):
    """(log p, log q): the teacher's and the student's log-probabilities at temperature T, in float32.

    Hinton et al. 2015 (arXiv:1503.02531), Sec. 2: q_i = exp(z_i / T) / sum_j exp(z_j / T). logits: (..., V).
    """
    import torch.nn.functional as F

    return (F.log_softmax(teacher_logits.float() / temperature, dim=-1),
            F.log_softmax(student_logits.float() / temperature, dim=-1))


def forward_kl(student_logits, teacher_logits, temperature: float = 1.0):
    """KL(p_teacher || p_student) of temperature-softened distributions, times T^2, mean over positions.

    Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a Neural Network" (arXiv:1503.02531), Sec. 2: the
    soft-target gradients scale as 1/T^2, so the loss is multiplied by T^2 to keep its weight against the hard loss
    when T changes. logits: (..., V) -> scalar.
    """
    import torch.nn.functional as F

    log_p, log_q = soft_log_probs(student_logits, teacher_logits, temperature)  # (..., V) each
    kl = F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1)  # (...,)
    return kl.mean() * temperature**2


def reverse_kl(student_logits, teacher_logits, temperature: float = 1.0):
    """KL(p_student || p_teacher) of temperature-softened distributions, times T^2, mean over positions.

    Mode-seeking: the student is not pushed to cover teacher modes it cannot represent. Gu et al. 2023, "MiniLLM"
    (arXiv:2306.08543), Eq. 1; Agarwal et al. 2024, "On-Policy Distillation of Language Models" (GKD,
    arXiv:2306.13649), Sec. 2. logits: (..., V) -> scalar.
    """
    import torch.nn.functional as F

    log_p, log_q = soft_log_probs(student_logits, teacher_logits, temperature)  # (..., V) each
    kl = F.kl_div(log_p, log_q, log_target=True, reduction="none").sum(-1)  # sum q (log q - log p)
    return kl.mean() * temperature**2


def generalized_jsd(student_logits, teacher_logits, beta: float = 0.5, temperature: float = 1.0):
    """Generalized Jensen-Shannon divergence JSD(beta) = beta KL(p || m) + (1 - beta) KL(q || m), with the mixture
    m = beta p + (1 - beta) q, p the teacher and q the student, times T^2, mean over positions.

    Agarwal et al. 2024, GKD (arXiv:2306.13649), Sec. 3 (as trl's `generalized_jsd_loss`). JSD(beta) / beta tends
    to KL(p || q) as beta -> 0 and JSD(beta) / (1 - beta) to KL(q || p) as beta -> 1, so the two ends are defined
    as those limits: beta = 0 is `forward_kl`, beta = 1 is `reverse_kl`. logits: (..., V) -> scalar.
    """
    import torch
    import torch.nn.functional as F

    if beta == 0.0:
        return forward_kl(student_logits, teacher_logits, temperature)
    if beta == 1.0:
        return reverse_kl(student_logits, teacher_logits, temperature)
    log_p, log_q = soft_log_probs(student_logits, teacher_logits, temperature)  # (..., V) each
    log_m = torch.logsumexp(torch.stack([log_p + math.log(beta), log_q + math.log(1 - beta)]), dim=0)
    kl_pm = F.kl_div(log_m, log_p, log_target=True, reduction="none").sum(-1)  # KL(p || m)
    kl_qm = F.kl_div(log_m, log_q, log_target=True, reduction="none").sum(-1)  # KL(q || m)
    return (beta * kl_pm + (1 - beta) * kl_qm).mean() * temperature**2


def total_variation(student_logits, teacher_logits, temperature: float = 1.0):
    """Total variation distance TV(p, q) = 1/2 sum_v |p_v - q_v| of temperature-softened distributions, mean over
    positions, in [0, 1] (not scaled by T^2: it is a distance between distributions, not a log-ratio).

    Zhou et al. 2024, "DistillSpec" (arXiv:2310.08461), Sec. 3: a draft token sampled from q is accepted by
    speculative sampling with probability 1 - TV(p, q), so a draft distilled with TV is trained for acceptance
    directly (Leviathan et al. 2023, Corollary 3.6). logits: (..., V) -> scalar.
    """
    log_p, log_q = soft_log_probs(student_logits, teacher_logits, temperature)  # (..., V) each
    return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1).mean()


SOFT_LOSSES = {  # DistillConfig.loss -> fn(student_logits, teacher_logits, temperature, beta) -> scalar
    "forward_kl": lambda s, t, temperature, beta: forward_kl(s, t, temperature),
    "reverse_kl": lambda s, t, temperature, beta: reverse_kl(s, t, temperature),
    "jsd": lambda s, t, temperature, beta: generalized_jsd(s, t, beta, temperature),
    "tv": lambda s, t, temperature, beta: total_variation(s, t, temperature),
}


def hard_ce(logits, labels):
    """Cross-entropy with the true next tokens (Hinton et al. 2015's "hard targets"): (..., V), (...) -> scalar.

    Labels equal to -100 are ignored.
    """
    import torch.nn.functional as F

    return F.cross_entropy(logits.float().flatten(0, -2), labels.flatten(), ignore_index=-100)


def distill_loss(student_logits, teacher_logits, labels, alpha: float, temperature: float,
                 loss: str = "forward_kl", beta: float = 0.5, topk_ids=None):
    """alpha * hard_ce + (1 - alpha) * soft loss (`SOFT_LOSSES[loss]`): Hinton et al. 2015's weighted average of the
    two objectives.

    Minitron (Muralidharan et al. 2024, arXiv:2407.14679) finds the logit KL alone (alpha = 0) works best.
    With `topk_ids` (..., K), `teacher_logits` are the teacher's top-K log-probs (..., K) and the soft loss compares
    both models renormalised over those K tokens (the student's logits gathered there; log-probs work as logits).
    """
    total = 0.0
    if alpha > 0:
        total = alpha * hard_ce(student_logits, labels)
    if alpha < 1:
        soft = student_logits if topk_ids is None else student_logits.gather(-1, topk_ids)  # (..., K)
        total = total + (1 - alpha) * SOFT_LOSSES[loss](soft, teacher_logits, temperature, beta)
    return total
