"""The training objective as small pure functions: LM, KD, layer losses, and their weighted sum.

    loss = CE(student, next token) + α·T²·KL(p_t^T ‖ p_s^T) + β·mean_taps ℓ(f_s(h_s), f_t(h_t))

``method`` only decides which terms exist: lm → CE; kd → CE + KD; ted/lwd → all three
(ted with stage-1 filters on both sides, lwd with raw teacher states and a fresh student map).

The vocabulary-sized terms (CE, KD, stage-1 tap CE) run over chunks of ``CHUNK_TOKENS`` tokens and make
their gradient together with their value, in closed form: at 128k vocabulary and 8k tokens one fp32
(tokens × V) tensor is 4 GB, and autograd through log_softmax would keep several of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch.autograd.profiler import record_function

CHUNK_TOKENS = 512  # at 128k vocabulary a chunk's KD peaks at three fp32 (chunk × V) tensors, 0.75 GB
IGNORE_INDEX = -100  # F.cross_entropy's default: such labels count neither in the sum nor in the mean


def kept_tokens(labels: torch.Tensor) -> torch.Tensor:
    """How many tokens a mean divides by: labels other than IGNORE_INDEX, at least 1 (a micro-batch with
    every label ignored then adds 0 with a zero gradient, not 0/0)."""
    return (labels != IGNORE_INDEX).sum().clamp(min=1)


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, chunk_tokens: int = CHUNK_TOKENS) -> torch.Tensor:
    """Mean next-token cross-entropy over labels other than IGNORE_INDEX; logits (B, T, V), labels (B, T)."""
    labels = labels.flatten()
    return _chunked_mean(_ce_chunk, logits.flatten(0, 1), (labels,), kept_tokens(labels), chunk_tokens)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, temperature: float,
            teacher_topk_index: torch.Tensor | None = None, chunk_tokens: int = CHUNK_TOKENS) -> torch.Tensor:
    """T²·KL(softmax(t/T) ‖ softmax(s/T)), averaged over the tokens whose label is not IGNORE_INDEX (those
    the LM loss counts); the teacher logits get no gradient.

    With ``teacher_topk_index`` (B, T, k) the teacher logits are its top-k values (B, T, k): the teacher
    distribution is renormalised on that support and compared with the student's full-vocabulary
    log-probabilities at the same ids.
    """
    labels = labels.flatten()
    teacher = (teacher_logits.flatten(0, 1), labels)
    if teacher_topk_index is not None:
        teacher += (teacher_topk_index.flatten(0, 1),)
    student = student_logits.flatten(0, 1)
    return _chunked_mean(partial(_kd_chunk, temperature), student, teacher, kept_tokens(labels), chunk_tokens)


def _chunked_mean(chunk_loss, x: torch.Tensor, others: tuple, denominator, chunk_tokens: int) -> torch.Tensor:
    """Σ over chunks of ``chunk_loss`` / ``denominator``; the gradient w.r.t. ``x`` (N, F) is made with the
    value, and only where autograd will want it (not under no_grad, not for a frozen ``x``).

    ``chunk_loss(grad_scale, grad_rows, x_rows, *other_rows)`` returns the chunk's loss sum and, unless
    ``grad_rows`` is None, writes ``grad_scale`` times its gradient w.r.t. ``x_rows`` there. ``others``
    (tensors with N rows) get no gradient.
    """
    if torch.is_grad_enabled() and x.requires_grad:
        return _ChunkedMean.apply(x, others, chunk_loss, denominator, chunk_tokens)
    return _sum_chunks(chunk_loss, x, others, None, denominator, chunk_tokens) / denominator


def _sum_chunks(chunk_loss, x, others, grad, denominator, chunk_tokens) -> torch.Tensor:
    """Σ of the chunks' loss sums; each chunk's gradient goes into its rows of ``grad`` unless that is None."""
    grad_scale = 1.0 / denominator
    total = torch.zeros((), dtype=torch.float32, device=x.device)
    for start in range(0, x.shape[0], chunk_tokens):
        rows = slice(start, start + chunk_tokens)
        grad_rows = None if grad is None else grad[rows]
        total += chunk_loss(grad_scale, grad_rows, x[rows], *(o[rows] for o in others))
    return total


class _ChunkedMean(torch.autograd.Function):
    """_chunked_mean with a gradient: only that gradient, in ``x``'s dtype and shape, is kept for backward,
    so no fp32 intermediate outlives its chunk."""

    @staticmethod
    def forward(ctx, x, others, chunk_loss, denominator, chunk_tokens):
        grad = torch.empty_like(x)
        total = _sum_chunks(chunk_loss, x, others, grad, denominator, chunk_tokens)
        ctx.save_for_backward(grad)
        return total / denominator

    @staticmethod
    def backward(ctx, grad_loss):
        (grad,) = ctx.saved_tensors
        return grad_loss * grad, None, None, None, None


def _ce_chunk(grad_scale, grad_rows, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Σ cross-entropy over a chunk's kept tokens; gradient softmax(s) − onehot(y), zero on ignored rows."""
    logp = F.log_softmax(logits, dim=-1, dtype=torch.float32)  # (C, V)
    kept = labels != IGNORE_INDEX
    target = torch.where(kept, labels, 0).unsqueeze(1)  # (C, 1), a valid id on ignored rows
    loss_sum = -torch.where(kept, logp.gather(1, target).squeeze(1), 0.0).sum()
    if grad_rows is not None:
        grad = logp.exp_().scatter_add_(1, target, logp.new_full(target.shape, -1.0))
        torch.mul(grad, kept.unsqueeze(1) * grad_scale, out=grad_rows)  # scaled, masked and cast in one pass
    return loss_sum


def _kd_chunk(temperature: float, grad_scale, grad_rows, student: torch.Tensor, teacher: torch.Tensor,
              labels: torch.Tensor, topk_index: torch.Tensor | None = None) -> torch.Tensor:
    """T²·Σ KL(p_t ‖ p_s) over a chunk's kept tokens; gradient T·(softmax(s/T) − p_t) w.r.t. the student
    logits, zero on ignored rows.

    Where p_t = 0 (a teacher logit of −inf) the term p_t·(log p_t − log p_s) is 0, not 0·(−inf) = NaN.
    With top-k, p_t lives on k ids: the KL reads the student's full-vocabulary log-probs there, and the
    gradient scatters p_t onto those ids (Σ p_t = 1 leaves softmax(s/T) whole).
    """
    kept = (labels != IGNORE_INDEX).unsqueeze(1)  # (C, 1)
    s_logp = F.log_softmax(student.float() / temperature, dim=-1)  # (C, V)
    t_logp = F.log_softmax(teacher.float() / temperature, dim=-1)  # (C, V) or (C, k)
    t_p = t_logp.exp()
    s_at_teacher = s_logp if topk_index is None else s_logp.gather(1, topk_index)
    kl = t_logp.sub_(s_at_teacher).mul_(t_p).masked_fill_((t_p == 0) | ~kept, 0.0)
    loss_sum = temperature * temperature * kl.sum()
    if grad_rows is not None:
        grad = s_logp.exp_()
        if topk_index is None:
            grad.sub_(t_p)
        else:
            grad.scatter_add_(1, topk_index, t_p.neg_())
        torch.mul(grad, kept * (temperature * grad_scale), out=grad_rows)
    return loss_sum


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
    vocab: int | None = None  # KD compares the first ``vocab`` logits (the tokenizer's ids); None: all


@record_function("loss")  # names the objective's work (and its closed-form gradients) in a profile
def distill_objective(student_logits, student_taps, labels, teacher_logits, teacher_taps, w: ObjectiveWeights,
                      teacher_topk_index=None) -> dict[str, torch.Tensor]:
    """Every term, and their weighted sum under ``"loss"``; absent terms are not computed."""
    terms = {"lm": lm_loss(student_logits, labels)}
    total = terms["lm"]
    if teacher_logits is not None and w.alpha > 0:
        terms["kd"] = kd_loss(student_logits[..., :w.vocab], teacher_logits, labels, w.temperature,
                              teacher_topk_index)
        total = total + w.alpha * terms["kd"]
    if teacher_taps is not None and w.beta > 0:
        per_tap = [layer_loss(s, t, w.layer_loss) for s, t in zip(student_taps, teacher_taps)]
        terms["layer"] = torch.stack(per_tap).mean()
        total = total + w.beta * terms["layer"]
    terms["loss"] = total
    return terms


@record_function("loss")
def tap_lm_losses(head, filtered_taps: list[torch.Tensor], labels: torch.Tensor,
                  chunk_tokens: int = CHUNK_TOKENS) -> list[torch.Tensor]:
    """Stage 1: the next-token loss of every filtered tap (B, T, D) read through the frozen task head.

    Head and cross-entropy run fused, one chunk of tokens of one tap at a time, so only one chunk's
    logits exist at once and each tap keeps just its (tokens × D) gradient. The head gets no gradient.
    """
    labels = labels.flatten()
    kept, chunk_loss = kept_tokens(labels), partial(_head_ce_chunk, head)
    return [_chunked_mean(chunk_loss, h.flatten(0, 1), (labels,), kept, chunk_tokens) for h in filtered_taps]


def _head_ce_chunk(head, grad_scale, grad_rows, h: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Σ cross-entropy of head(h) over a chunk; the gradient w.r.t. h is CE's sent back through the head."""
    if grad_rows is None:
        return _ce_chunk(grad_scale, None, head(h), labels)
    with torch.enable_grad():
        h = h.detach().requires_grad_()
        logits = head(h)  # (C, D) -> (C, V)
        grad_logits = torch.empty_like(logits)
        loss_sum = _ce_chunk(grad_scale, grad_logits, logits.detach(), labels)
        grad_rows.copy_(torch.autograd.grad(logits, h, grad_logits)[0])
    return loss_sum


def trained_head_lm_loss(head, h: torch.Tensor, labels: torch.Tensor, chunk_tokens: int = CHUNK_TOKENS) -> torch.Tensor:
    """Stage 1 with a trainable head: mean next-token CE of ``head(h)`` for one tap, h (B, T, D).

    The head is learned, so its parameters need gradients and the closed-form path of
    ``tap_lm_losses`` (input gradient only) does not apply; instead each chunk runs under activation
    checkpointing: only a chunk's input is kept and its logits are recomputed in the backward pass,
    so at most one chunk's (chunk × V) logits exist at a time here too.
    """
    from torch.utils.checkpoint import checkpoint

    h, labels = h.flatten(0, 1), labels.flatten()
    kept = kept_tokens(labels)
    chunk_sum = lambda x, y: F.cross_entropy(head(x).float(), y, ignore_index=IGNORE_INDEX, reduction="sum")
    total = sum(checkpoint(chunk_sum, h[i:i + chunk_tokens], labels[i:i + chunk_tokens], use_reentrant=False)
                for i in range(0, h.shape[0], chunk_tokens))
    return total / kept.float()
