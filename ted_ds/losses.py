"""The training objective as small pure functions: LM, KD, layer losses, and their weighted sum.

    loss = CE(student, next token) + α·T²·D(p ‖ q) + β·mean_taps ℓ(f_s(h_s), f_t(h_t))

``method`` only decides which terms exist: lm → CE; kd → CE + KD; ted/lwd → all three
(ted with stage-1 filters on both sides, lwd with raw teacher states and a fresh student map).

KD's divergence D (``distill.divergence``) compares the teacher's p = softmax(z_t/T) with the student's
q = softmax(z_s/T), per token, averaged over the tokens the LM loss counts; a is ``distill.divergence_mix``:

    forward_kl  KL(p ‖ q) = Σ p·(log p − log q)
    reverse_kl  KL(q ‖ p) = Σ q·(log q − log p)
    jsd         a·KL(p ‖ m) + (1 − a)·KL(q ‖ m),  m = a·p + (1 − a)·q    (GKD's generalised JSD; a in (0, 1))
    skew_kl     KL(p ‖ m),  m = a·p + (1 − a)·q                          (DistiLLM's skew KL; a in [0, 1))

and their gradients in the softened student logits z_s/T, in closed form:

    forward_kl  q − p
    reverse_kl  q·(r − Σ q·r),          r = log q − log p
    jsd         (1 − a)·q·(h − Σ q·h),  h = log q − log m
    skew_kl     (1 − a)·q·(Σ q·w − w),  w = p / m

(the loss is T²·D, so its gradient in z_s is T times these; a term whose q is 0 counts 0, as one whose p is).
With the teacher's top-k (ids K) there are two forms (``teacher.logits_topk_form``):

    tail          D over k + 1 classes: p on K and the teacher's tail mass 1 − Σ_K p as one bucket, q on K
                  and 1 − Σ_K q likewise. The teacher sends its top-k logits and one more "tail logit"
                  z_∁ = T·log Σ_{i∉K} exp(z_i/T), so softmax over the k + 1 values at T is exactly those p
                  (``ted_ds.teacher.teacher_logits``). D's gradient g over the k + 1 classes goes back to
                  the vocabulary as g_i on K and g_∁·q_i / Q_∁ off K (Q_∁ = Σ_{i∉K} q: the bucket's share of
                  each tail id). At k = V the bucket is empty and this is the full-vocabulary D.
    renormalized  p renormalised on K, and the student: q̃ = q restricted to K ÷ Z_K, Z_K = Σ_K q; then
                  D_K = D(p ‖ q̃) − log Z_K, whose last term pulls the student's mass onto K and whose
                  gradient is q − q̃ on top of D's (on K). For forward_kl this is Σ_K p·(log p − log q), the
                  student's full-vocabulary log-probabilities read at K, computed so. It overstates the
                  teacher's confidence by 1/Σ_K p: at T = 2 a 64-entry top-k holds ~20 % of the teacher's
                  mass, and KD on it trains far worse than full KD (BENCHMARKS.md, "KD with the teacher's
                  top-k").

With ``teacher.logits_top_p`` K shrinks per token to its support S ⊆ K, the fewest top ids whose p reaches
the cut (``ted_ds.teacher.top_p_support``), given as a (k)-wide mask: both forms above run with S for K (the
tail bucket then holds the mass off S, which the teacher's tail logit includes); a mask of all k is the top-k.

Sampled (``teacher.logits_sampling: sampled``, forward_kl only): per token N ids drawn from p, kept as the
distinct ids i with their counts c_i; with p̂_i = c_i / N the loss and its gradient in z_s/T are

    L̂ = Σ_i p̂_i·(log p_i − log q_i)            ∂L̂/∂(z_s/T) = q − p̂

(log p_i, the teacher's log-probability at T of a drawn id, is sent with it). E[p̂] = p, so E[L̂] = KL(p ‖ q)
and E[∂L̂] = q − p, forward KL's value and gradient, unbiased, with Var p̂_i = p_i(1 − p_i)/N — where top-k
drops the tail and biases toward the head. Without the counts (each distinct id once) or without the ÷ N
the estimate is biased (tests/test_losses.py checks the mean gradient over many draws).

Across tokenizers (``distill.cross_tokenizer``; the chunks come from ted_ds.crosstok) one of two terms
stands in for KD, averaged over the aligned chunks c of the micro-batch:

    chunk_likelihood  KL_bin(P_c ‖ Q_c) = P·(log P − log Q) + (1 − P)·(log(1 − P) − log(1 − Q)),
                      log P_c = Σ_{j∈c} log p(teacher token j) / T, log Q_c likewise for the student's tokens
    overlap_kl        D (``distill.divergence``) at T between p and q restricted to the tokens both
                      vocabularies spell alike and renormalised there, read where a chunk is one token
                      on both sides (the two predict the same next piece of text from the same text)

chunk_likelihood is ALM's distance (Minixhofer et al. 2025): a chunk's probability is one number for
both models whatever their tokens, and the binary KL between the two Bernoulli "the next text is this
chunk" compares them without needing the rest of either distribution; its gradient in log Q is
(Q − P)/(1 − Q), so a student already likelier than the teacher is pushed down too.  The temperature
T (ALM's τ) softens the likelihoods: a chunk of probability e⁻⁶ weighs e⁻³ at T = 2, where at T = 1 the
binary KL of such small probabilities is near 0 and teaches little.  With one tokenizer every chunk is
one token and it is KL_bin of the two (softened) probabilities of each next token.  overlap_kl with one
tokenizer is KD itself.

TED across tokenizers adds β times the layer loss of chunk-level states: each tap's filtered states (the
student's through its filters, the teacher's through its stage-1 filters, each on its own tokens) averaged
over the positions of each aligned chunk, so both sides have one state per chunk of the same text; with one
tokenizer every chunk is one position and it is TED's layer loss.

The vocabulary-sized terms (CE, KD, stage-1 tap CE) run over chunks of ``CHUNK_TOKENS`` tokens and make
their gradient together with their value, in closed form: at 128k vocabulary and 8k tokens one fp32
(tokens × V) tensor is 4 GB, and autograd through log_softmax would keep several of them.
"""

from __future__ import annotations

import math
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
            teacher_topk_index: torch.Tensor | None = None, chunk_tokens: int = CHUNK_TOKENS,
            divergence: str = "forward_kl", mix: float = 0.5, topk_form: str = "tail",
            support: torch.Tensor | None = None) -> torch.Tensor:
    """T²·D(softmax(t/T) ‖ softmax(s/T)) for the ``divergence`` D of the module docstring (``mix``: its a),
    averaged over the tokens whose label is not IGNORE_INDEX (those the LM loss counts); the teacher
    logits get no gradient.

    With ``teacher_topk_index`` (B, T, k) D is taken on the teacher's top-k in ``topk_form`` (module
    docstring): the teacher logits are its top-k values and the tail logit (B, T, k + 1) for "tail", the
    top-k values (B, T, k) for "renormalized". ``support`` (B, T, k) bool narrows K per token to the
    entries it keeps (top-p), the teacher's values being −inf past it and its tail logit holding the mass off
    it (``ted_ds.teacher.teacher_logits``).
    """
    labels = labels.flatten()
    teacher = (teacher_logits.flatten(0, 1), labels)
    forms = TOPK_FORMS[topk_form]
    if teacher_topk_index is not None:
        extra = teacher_logits.shape[-1] - teacher_topk_index.shape[-1]
        if extra != (topk_form == "tail"):
            raise ValueError(f"{topk_form} top-k KD takes {teacher_topk_index.shape[-1] + (topk_form == 'tail')} "
                             f"teacher values per token, got {teacher_logits.shape[-1]}")
        teacher += (teacher_topk_index.flatten(0, 1),)
    if support is not None:
        teacher += (support.flatten(0, 1),)
    student = student_logits.flatten(0, 1)
    chunk = partial(_kd_chunk, forms[divergence], temperature, mix)
    return _chunked_mean(chunk, student, teacher, kept_tokens(labels), chunk_tokens)


def sampled_kd_loss(student_logits: torch.Tensor, teacher_logp: torch.Tensor, ids: torch.Tensor,
                    counts: torch.Tensor, labels: torch.Tensor, temperature: float,
                    chunk_tokens: int = CHUNK_TOKENS) -> torch.Tensor:
    """T²·KL(p ‖ q) estimated from N draws of the teacher's p = softmax(z_t/T) per token (module docstring,
    "sampled"): ``ids`` (B, T, N) the distinct ids drawn, ``counts`` their draws (0 on padding),
    ``teacher_logp`` log p at them; averaged over the tokens the LM loss counts."""
    labels = labels.flatten()
    teacher = (teacher_logp.flatten(0, 1), ids.flatten(0, 1), counts.flatten(0, 1), labels)
    chunk = partial(_sampled_chunk, temperature)
    return _chunked_mean(chunk, student_logits.flatten(0, 1), teacher, kept_tokens(labels), chunk_tokens)


def _sampled_chunk(temperature: float, grad_scale, grad_rows, student, teacher_logp, ids, counts, labels):
    """T²·Σ_i p̂_i·(log p_i − log q_i) over a chunk's kept tokens, p̂ = counts / N; T·(q − p̂) into ``grad_rows``."""
    s_logp = F.log_softmax(student.float() / temperature, dim=-1)  # (C, V)
    share = counts.float() / counts.sum(-1, keepdim=True)  # (C, N): p̂, the draws' share of each id
    terms, grad = _weighted_kl(share, teacher_logp.float(), s_logp, ids)
    return _chunk_sum(terms, grad, temperature, grad_scale, grad_rows, labels)


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
    return _ce_rows(grad_scale, grad_rows, logits, labels).sum()


def _ce_rows(grad_scale, grad_rows, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each row (C,), 0 on ignored rows; writes ``grad_scale``·(softmax(s) − onehot(y)) to
    ``grad_rows`` (zero on ignored rows) unless that is None."""
    logp = F.log_softmax(logits, dim=-1, dtype=torch.float32)  # (C, V)
    kept = labels != IGNORE_INDEX
    target = torch.where(kept, labels, 0).unsqueeze(1)  # (C, 1), a valid id on ignored rows
    rows = -torch.where(kept, logp.gather(1, target).squeeze(1), 0.0)
    if grad_rows is not None:
        grad = logp.exp_().scatter_add_(1, target, logp.new_full(target.shape, -1.0))
        torch.mul(grad, kept.unsqueeze(1) * grad_scale, out=grad_rows)  # scaled, masked and cast in one pass
    return rows


def _kd_chunk(divergence, temperature: float, mix: float, grad_scale, grad_rows, student: torch.Tensor,
              teacher: torch.Tensor, labels: torch.Tensor, topk_index: torch.Tensor | None = None,
              support: torch.Tensor | None = None) -> torch.Tensor:
    """T²·Σ D(p ‖ q) over a chunk's kept tokens; T times D's gradient in z/T w.r.t. the student logits,
    zero on ignored rows."""
    s_logp = F.log_softmax(student.float() / temperature, dim=-1)  # (C, V)
    t_logp = F.log_softmax(teacher.float() / temperature, dim=-1)  # (C, V) or (C, k [+ 1])
    terms, grad = divergence(t_logp, s_logp, mix, topk_index, support)
    return _chunk_sum(terms, grad, temperature, grad_scale, grad_rows, labels)


def _chunk_sum(terms, grad, temperature: float, grad_scale, grad_rows, labels) -> torch.Tensor:
    """T²·Σ of a chunk's ``terms`` over its kept tokens; T·``grad`` (zero on ignored rows) into ``grad_rows``."""
    kept = (labels != IGNORE_INDEX).unsqueeze(1)  # (C, 1)
    loss_sum = temperature * temperature * terms.masked_fill_(~kept, 0.0).sum()
    if grad_rows is not None:
        torch.mul(grad, kept * (temperature * grad_scale), out=grad_rows)
    return loss_sum


def _forward_kl(t_logp, s_logp, mix, topk_index=None, support=None):
    """KL(p ‖ q) term by term, and q − p (``support`` changes nothing: p is 0 off it already)."""
    return _weighted_kl(t_logp.exp(), t_logp, s_logp, topk_index)


def _weighted_kl(weight, t_logp, s_logp, ids=None):
    """Σ w·(log p − log q) term by term, and its gradient q − w (Σ w = 1 leaves q whole). Where w = 0 (a teacher
    logit of −inf, an id drawn 0 times) the term is 0, not 0·(−inf) = NaN. With ``ids`` the student's
    full-vocabulary log-probabilities are read there, and w is scattered there. Overwrites its inputs."""
    s_at_teacher = s_logp if ids is None else s_logp.gather(1, ids)
    terms = t_logp.sub_(s_at_teacher).mul_(weight).masked_fill_(weight == 0, 0.0)
    grad = s_logp.exp_()
    if ids is None:
        grad.sub_(weight)
    else:
        grad.scatter_add_(1, ids, weight.neg())
    return terms, grad


def _present(x, y) -> torch.Tensor:
    """x·y, 0 where x = 0 (an empty class, e.g. the tail bucket at k = V, whose y may be NaN)."""
    return (x * y).masked_fill_(x == 0, 0.0)


def _reverse_kl(t_logp, x_logp, mix):
    """KL(x ‖ p) per row (C, 1), and its gradient in x's logits. Infinite where p = 0 and x > 0."""
    x = x_logp.exp()
    r = x_logp - t_logp
    per_row = _present(x, r).sum(-1, keepdim=True)
    return per_row, _present(x, r.sub_(per_row))


def _log_mixture(t_logp, x_logp, mix: float) -> torch.Tensor:
    """log m, m = mix·p + (1 − mix)·x, without leaving log space."""
    teacher_part = t_logp + math.log(mix) if mix > 0 else torch.full_like(t_logp, -math.inf)
    return torch.logaddexp(teacher_part, x_logp + math.log1p(-mix))


def _p_log_p_over(t_logp, log_m) -> torch.Tensor:
    """Σ p·(log p − log m) per row (C, 1), 0 where p = 0."""
    t_p = t_logp.exp()
    return (t_p * (t_logp - log_m)).masked_fill_(t_p == 0, 0.0).sum(-1, keepdim=True)


def _jsd(t_logp, x_logp, mix):
    """mix·KL(p ‖ m) + (1 − mix)·KL(x ‖ m) per row, and its gradient in x's logits."""
    log_m = _log_mixture(t_logp, x_logp, mix)
    x = x_logp.exp()
    h = x_logp - log_m
    x_h = _present(x, h).sum(-1, keepdim=True)
    return mix * _p_log_p_over(t_logp, log_m) + (1 - mix) * x_h, _present(x, h.sub_(x_h)).mul_(1 - mix)


def _skew_kl(t_logp, x_logp, mix):
    """KL(p ‖ m) per row, and its gradient in x's logits."""
    log_m = _log_mixture(t_logp, x_logp, mix)
    x = x_logp.exp()
    w = (t_logp - log_m).exp()
    return _p_log_p_over(t_logp, log_m), _present(x, _present(x, w).sum(-1, keepdim=True) - w).mul_(1 - mix)


def _renormalised(divergence, t_logp, s_logp, mix, topk_index=None, support=None):
    """``divergence`` between p and the student's q, or with top-k: D(p ‖ q̃) − log Z_K with q̃ the student
    renormalised on the teacher's ids (its ``support`` of them); its gradient over the whole vocabulary."""
    if topk_index is None:
        return divergence(t_logp, s_logp, mix)
    at = s_logp.gather(1, topk_index)  # (C, k)
    if support is not None:
        at.masked_fill_(~support, -math.inf)
    log_mass = at.logsumexp(-1, keepdim=True)  # log Z_K
    q_tilde_logp = at.sub_(log_mass)
    terms, grad_k = divergence(t_logp, q_tilde_logp, mix)
    grad = s_logp.exp_().scatter_add_(1, topk_index, grad_k.sub_(q_tilde_logp.exp_()))
    return terms.sub_(log_mass), grad


def _with_tail(divergence, t_logp, s_logp, mix, topk_index=None, support=None):
    """``divergence`` between p and the student's q, or with top-k: D over the k + 1 classes of K (its
    ``support`` of the ids; the others are in the bucket) and the tail bucket (module docstring), ``t_logp``
    (C, k + 1) holding the teacher's; its gradient over the whole vocabulary."""
    if topk_index is None:
        return divergence(t_logp, s_logp, mix)
    if support is not None:  # a dropped entry stands for the top id, writing what the top id writes
        topk_index = topk_index.where(support, topk_index[:, :1])
    at = s_logp.gather(1, topk_index)  # (C, k)
    on_k = at if support is None else at.masked_fill(~support, -math.inf)
    q_off_k = s_logp.exp_().scatter_(1, topk_index, 0.0)  # q off K: summed, Q_∁ without 1 − Σ_K q's cancellation
    bucket = q_off_k.sum(-1, keepdim=True)  # Q_∁ (C, 1); 0 when K holds every id
    terms, grad_k1 = divergence(t_logp, torch.cat([on_k, bucket.log()], 1), mix)
    empty = bucket == 0  # K holds every id (or the student puts < e⁻¹⁰³ off K): nothing goes back, nothing is divided
    share = q_off_k.div_(bucket.masked_fill(empty, 1.0)).mul_(grad_k1[:, -1:].masked_fill(empty, 0.0))  # g_∁·q_i/Q_∁
    grad_k = grad_k1[:, :-1] if support is None else grad_k1[:, :-1].where(support, grad_k1[:, :1])
    return terms, share.scatter_(1, topk_index, grad_k)


_PLAIN = {"forward_kl": _forward_kl, "reverse_kl": _reverse_kl, "jsd": _jsd, "skew_kl": _skew_kl}
TOPK_FORMS = {  # teacher.logits_topk_form -> distill.divergence -> the chunk's divergence
    "tail": {name: partial(_with_tail, d) for name, d in _PLAIN.items()},
    "renormalized": {"forward_kl": _forward_kl, **{name: partial(_renormalised, _PLAIN[name])
                                                   for name in ("reverse_kl", "jsd", "skew_kl")}}}


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
    divergence: str = "forward_kl"  # distill.divergence
    divergence_mix: float = 0.5  # distill.divergence_mix
    topk_form: str = "tail"  # teacher.logits_topk_form


@record_function("loss")  # names the objective's work (and its closed-form gradients) in a profile
def distill_objective(student_logits, student_taps, labels, teacher_logits, teacher_taps, w: ObjectiveWeights,
                      teacher_topk_index=None, teacher_support=None, teacher_counts=None) -> dict[str, torch.Tensor]:
    """Every term, and their weighted sum under ``"loss"``; absent terms are not computed. ``teacher_support``:
    the top-k entries each token keeps (top-p); ``teacher_counts``: the logits are sampled (``sampled_kd_loss``)."""
    terms = {"lm": lm_loss(student_logits, labels)}
    total = terms["lm"]
    if teacher_counts is not None and w.alpha > 0:
        terms["kd"] = sampled_kd_loss(student_logits[..., :w.vocab], teacher_logits, teacher_topk_index,
                                      teacher_counts, labels, w.temperature)
    elif teacher_logits is not None and w.alpha > 0:
        terms["kd"] = kd_loss(student_logits[..., :w.vocab], teacher_logits, labels, w.temperature,
                              teacher_topk_index, divergence=w.divergence, mix=w.divergence_mix,
                              topk_form=w.topk_form, support=teacher_support)
    if "kd" in terms:
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


def target_logprobs(logits: torch.Tensor, targets: torch.Tensor, chunk_tokens: int = CHUNK_TOKENS) -> torch.Tensor:
    """log softmax(z)[y] of each row of ``logits`` (N, V), 0 where ``targets`` (N,) is IGNORE_INDEX, a chunk
    of rows at a time; with a gradient its (N, V) part onehot(y) − softmax(z) is made with the value."""
    if torch.is_grad_enabled() and logits.requires_grad:
        return _TargetLogProbs.apply(logits, targets, chunk_tokens)
    return _target_rows(logits, targets, None, chunk_tokens)


def _target_rows(logits, targets, grad, chunk_tokens) -> torch.Tensor:
    """The rows' target log-probabilities (N,) fp32; their gradients into ``grad`` unless that is None."""
    out = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
    for start in range(0, logits.shape[0], chunk_tokens):
        rows = slice(start, start + chunk_tokens)
        out[rows] = _ce_rows(-1.0, None if grad is None else grad[rows], logits[rows], targets[rows]).neg_()
    return out


class _TargetLogProbs(torch.autograd.Function):
    """target_logprobs with a gradient: only d log p(y)/dz, in the logits' dtype, is kept for backward."""

    @staticmethod
    def forward(ctx, logits, targets, chunk_tokens):
        grad = torch.empty_like(logits)
        out = _target_rows(logits, targets, grad, chunk_tokens)
        ctx.save_for_backward(grad)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        (grad,) = ctx.saved_tensors
        return grad * grad_out.unsqueeze(1).to(grad.dtype), None, None


def chunk_logprobs(logits: torch.Tensor, labels: torch.Tensor, chunk: torch.Tensor, chunks: int) -> torch.Tensor:
    """log P of each of ``chunks`` chunks (chunks,): the sum of its tokens' log-probabilities, ``chunk``
    (B, T) naming each label position's chunk (−1: none); logits (B, T, V), labels (B, T)."""
    rows = target_logprobs(logits.flatten(0, 1), labels.flatten())  # (B·T,)
    chunk = chunk.flatten()
    kept = chunk >= 0
    return rows.new_zeros(chunks).index_add(0, chunk[kept], rows[kept])


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − exp x) for x < 0, accurate on both sides of −log 2."""
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def binary_kl(log_p: torch.Tensor, log_q: torch.Tensor, ceiling: float = -1e-6) -> torch.Tensor:
    """KL(Bernoulli(P) ‖ Bernoulli(Q)) elementwise from log P and log Q; both held below ``ceiling`` so that
    log(1 − Q) stays finite."""
    log_p, log_q = log_p.clamp(max=ceiling), log_q.clamp(max=ceiling)
    return log_p.exp() * (log_p - log_q) + (-log_p.expm1()) * (_log1mexp(log_p) - _log1mexp(log_q))


def chunk_likelihood_loss(student_logits, labels, teacher_logits, view, temperature: float) -> torch.Tensor:
    """Mean over the aligned chunks of KL_bin(P_c ‖ Q_c) (module docstring); ``view`` a crosstok.TeacherView.
    The teacher gets no gradient; no chunk: 0."""
    log_q = chunk_logprobs(student_logits, labels, view.student_chunk, view.chunks)
    with torch.no_grad():
        log_p = chunk_logprobs(teacher_logits, view.labels, view.teacher_chunk, view.chunks)
    return binary_kl(log_p / temperature, log_q / temperature).sum() / max(view.chunks, 1)


def overlap_kl_loss(student_logits, teacher_logits, view, shared: tuple[torch.Tensor, torch.Tensor],
                    w: ObjectiveWeights) -> torch.Tensor:
    """KD (``w``'s divergence at its temperature) on the shared vocabulary ``shared`` (student ids, teacher
    ids), at the chunks one token on both sides; none: 0."""
    student_ids, teacher_ids = shared
    s = student_logits.flatten(0, 1).index_select(0, view.student_single).index_select(1, student_ids)  # (P, S)
    t = teacher_logits.flatten(0, 1).index_select(0, view.teacher_single).index_select(1, teacher_ids)  # (P, S)
    kept = torch.zeros(1, s.shape[0], dtype=torch.long, device=s.device)
    return kd_loss(s[None], t[None], kept, w.temperature, divergence=w.divergence, mix=w.divergence_mix)


def chunk_means(states: torch.Tensor, chunk: torch.Tensor, chunks: int) -> torch.Tensor:
    """The mean state of each of ``chunks`` chunks (chunks, D) in fp32, ``chunk`` (B, T) naming each position's
    chunk (−1: none) of ``states`` (B, T, D); autograd runs through it, its memory that of the states."""
    flat, chunk = states.flatten(0, 1).float(), chunk.flatten()
    kept = chunk >= 0
    sums = flat.new_zeros(chunks, flat.shape[1]).index_add(0, chunk[kept], flat[kept])
    sizes = torch.bincount(chunk[kept], minlength=chunks).clamp(min=1)
    return sums / sizes.unsqueeze(1)


def chunk_layer_loss(student_taps, teacher_taps, view, kind: str) -> torch.Tensor:
    """TED's layer loss across tokenizers: each tap's filtered states mean-pooled over the aligned chunks on
    both sides (``view``'s student_chunk and teacher_chunk), ``layer_loss`` of the chunk-level states, the
    mean over taps; no chunk: 0."""
    if view.chunks == 0:
        return torch.zeros((), device=student_taps[0].device)
    per_tap = [layer_loss(chunk_means(s, view.student_chunk, view.chunks)[None],
                          chunk_means(t, view.teacher_chunk, view.chunks)[None], kind)
               for s, t in zip(student_taps, teacher_taps)]
    return torch.stack(per_tap).mean()


@record_function("loss")
def cross_tokenizer_objective(student_logits, labels, teacher_logits, view, w: ObjectiveWeights,
                              shared: tuple[torch.Tensor, torch.Tensor] | None, student_taps=None,
                              teacher_taps=None) -> dict[str, torch.Tensor]:
    """CE plus α times the cross-tokenizer term (overlap_kl on the ``shared`` vocabulary, else chunk_likelihood),
    plus β times ``chunk_layer_loss`` when there are teacher taps (TED)."""
    own = student_logits[..., :w.vocab]  # the student tokenizer's ids
    if shared is None:
        name, term = "chunk_likelihood", chunk_likelihood_loss(own, labels, teacher_logits, view, w.temperature)
    else:
        name, term = "overlap_kl", overlap_kl_loss(own, teacher_logits, view, shared, w)
    terms = {"lm": lm_loss(student_logits, labels), name: term}
    terms["loss"] = terms["lm"] + w.alpha * term
    if teacher_taps is not None and w.beta > 0:
        terms["layer"] = chunk_layer_loss(student_taps, teacher_taps, view, w.layer_loss)
        terms["loss"] = terms["loss"] + w.beta * terms["layer"]
    return terms
