"""The training objective as small pure functions: LM, KD, layer losses, and their weighted sum.

    loss = CE(student, next token) + α·T²·KL(p_t^T ‖ p_s^T) + β·mean_taps ℓ(f_s(h_s), f_t(h_t))

``method`` only decides which terms exist: lm → CE; kd → CE + KD; ted/lwd → all three
(ted with stage-1 filters on both sides, lwd with raw teacher states and a fresh student map).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy; logits (B, T, V), labels (B, T)."""
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
            teacher_topk_index: torch.Tensor | None = None) -> torch.Tensor:
    """T²·KL(softmax(t/T) ‖ softmax(s/T)), averaged over tokens.

    With ``teacher_topk_index`` (B, T, k) the teacher logits are its top-k values (B, T, k): the teacher
    distribution is renormalised on that support and compared with the student's full-vocabulary
    log-probabilities at the same ids.
    """
    s_logp = F.log_softmax(student_logits.float() / temperature, dim=-1)  # (B, T, V)
    t_logp = F.log_softmax(teacher_logits.float() / temperature, dim=-1)  # (B, T, V) or (B, T, k)
    if teacher_topk_index is not None:
        s_logp = s_logp.gather(-1, teacher_topk_index)  # (B, T, k)
    kl = (t_logp.exp() * (t_logp - s_logp)).sum(-1)  # (B, T)
    return temperature * temperature * kl.mean()


def layer_loss(student: torch.Tensor, teacher: torch.Tensor, kind: str) -> torch.Tensor:
    """Distance between one tap's student and teacher states, (B, T, D) each."""
    student, teacher = student.float(), teacher.float()
    if kind == "mse":
        return F.mse_loss(student, teacher)
    if kind == "normalized_mse":  # scale-free: 1.0 means "as far as predicting the target's mean"
        return F.mse_loss(student, teacher) / (teacher.var() + 1e-6)
    if kind == "cosine":
        return 1.0 - F.cosine_similarity(student, teacher, dim=-1).mean()
    raise ValueError(f"unknown layer loss {kind!r}")


@dataclass(frozen=True)
class ObjectiveWeights:
    alpha: float
    beta: float
    temperature: float
    layer_loss: str


def distill_objective(student_logits, student_taps, labels, teacher_logits, teacher_taps, w: ObjectiveWeights,
                      teacher_topk_index=None) -> dict[str, torch.Tensor]:
    """Every term, and their weighted sum under ``"loss"``; absent terms are not computed."""
    terms = {"lm": lm_loss(student_logits, labels)}
    total = terms["lm"]
    if teacher_logits is not None and w.alpha > 0:
        terms["kd"] = kd_loss(student_logits, teacher_logits, w.temperature, teacher_topk_index)
        total = total + w.alpha * terms["kd"]
    if teacher_taps is not None and w.beta > 0:
        per_tap = [layer_loss(s, t, w.layer_loss) for s, t in zip(student_taps, teacher_taps)]
        terms["layer"] = torch.stack(per_tap).mean()
        total = total + w.beta * terms["layer"]
    terms["loss"] = total
    return terms


def tap_lm_losses(head, filtered_taps: list[torch.Tensor], labels: torch.Tensor) -> list[torch.Tensor]:
    """Stage 1: the next-token loss of every filtered tap read through the (frozen) task head."""
    return [lm_loss(head(h), labels) for h in filtered_taps]
