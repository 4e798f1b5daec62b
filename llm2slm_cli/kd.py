"""Logit distillation: the loss of a student against a teacher's stored top-K distributions (train --kd-weight)."""

from __future__ import annotations

import torch


def kd_loss(logits: torch.Tensor, target_mask: torch.Tensor, teacher_ids: torch.Tensor,
            teacher_logprobs: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Logit distillation against a teacher's stored top-K: KL(teacher || student), summed over target tokens.

    Only the teacher's K most likely tokens are known, so both distributions are compared over K + 1 outcomes: each
    of the K tokens, and "any other token" (teacher: 1 - the K tokens' mass; student: 1 - its probability of those
    same K tokens). This is the exact KL of the two distributions coarsened to these K + 1 outcomes, so it never
    asks the student for mass the teacher did not state, and it is 0 only when the student matches the teacher on
    the K tokens. A teacher token the student cannot emit (id -1: outside a trimmed vocabulary) moves its mass to
    "other" on both sides. With temperature T the K + 1 log-probabilities of both sides are divided by T and
    renormalised, and the KL is multiplied by T^2 (Hinton et al.), so gradients keep their scale across T.

    logits (batch, T, V) of the student at the target positions; target_mask (batch, T); teacher_ids (batch, T, K)
    in the student's ids, -1 for none; teacher_logprobs (batch, T, K) log-probabilities at temperature 1."""
    valid = teacher_ids >= 0
    student = logits.float().log_softmax(-1).gather(-1, teacher_ids.clamp(min=0))
    never = torch.finfo(torch.float32).min
    t_top = teacher_logprobs.float().masked_fill(~valid, never)
    s_top = student.masked_fill(~valid, never)

    def with_other(top: torch.Tensor) -> torch.Tensor:
        mass = top.exp().sum(-1, keepdim=True).clamp(max=1 - 1e-6)
        return torch.cat([top, torch.log1p(-mass)], -1)

    t, s = with_other(t_top), with_other(s_top)
    if temperature != 1.0:
        t, s = (t / temperature).log_softmax(-1), (s / temperature).log_softmax(-1)
    p = t.exp()
    kl = (p * (t - s)).masked_fill(p == 0, 0.0).sum(-1)
    return (kl * target_mask.to(kl.dtype)).sum() * temperature ** 2
