"""The chunked vocabulary-sized losses against plain autograd references: value, gradient, and memory.

The references are the unchunked code the chunked functions replaced. 303 tokens in chunks of 64 leave a
short last chunk; the memory checks would fail if the full (tokens × vocab) fp32 work came back.
"""

from __future__ import annotations

import copy
import math
import weakref

import pytest
import torch
import torch._dynamo  # noqa: F401  entering a TorchDispatchMode imports it, which sets TORCHINDUCTOR_CACHE_DIR
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from ted_ds.losses import IGNORE_INDEX, kd_loss, lm_loss, tap_lm_losses, trained_head_lm_loss
from ted_ds.teacher import TopP, support, teacher_logits

B, T, V, D, K = 3, 101, 50, 16, 5
CHUNK = 64
TEMPERATURE = 2.0
GRAD_OUTPUT = 0.7  # backward through loss·0.7: the saved gradient must be scaled, not returned as is


def reference_ce(logits, labels):
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())


def reference_kd(student_logits, teacher_logits, labels, temperature, teacher_topk_index=None):
    s_logp = F.log_softmax(student_logits.float() / temperature, dim=-1)
    t_logp = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    if teacher_topk_index is not None:
        s_logp = s_logp.gather(-1, teacher_topk_index)
    kl = (t_logp.exp() * (t_logp - s_logp)).sum(-1)
    return temperature * temperature * kl[labels != IGNORE_INDEX].mean()


def reference_divergence(divergence, mix, student_logits, teacher_logits, labels, temperature, topk_index=None):
    """The divergences of ted_ds.losses written out for autograd; with top-k, D(p ‖ q̃) − log Z_K."""
    q = F.log_softmax(student_logits.float() / temperature, dim=-1)
    p = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    support = 0.0
    if topk_index is not None:
        at = q.gather(-1, topk_index)
        support, q = -at.logsumexp(-1), F.log_softmax(at, dim=-1)
    log_m = (mix * p.exp() + (1 - mix) * q.exp()).log()
    kl = lambda a, b: (a.exp() * (a - b)).sum(-1)
    d = {"reverse_kl": lambda: kl(q, p), "jsd": lambda: mix * kl(p, log_m) + (1 - mix) * kl(q, log_m),
         "skew_kl": lambda: kl(p, log_m)}[divergence]() + support
    return temperature * temperature * d[labels != IGNORE_INDEX].mean()


def reference_tail(divergence, mix, student_logits, teacher_logits, labels, temperature, topk_index):
    """Top-k KD's tail form written out for autograd (softmax in fp32, the rest in fp64): both distributions
    read on the k ids plus one bucket 1 − Σ_K for the rest of the vocabulary."""
    def on_support(logits):
        prob = F.log_softmax(logits.float() / temperature, dim=-1).double().exp()
        at = prob.gather(-1, topk_index)
        return torch.cat([at, 1 - at.sum(-1, keepdim=True)], -1).log()

    q, p = on_support(student_logits), on_support(teacher_logits)
    log_m = (mix * p.exp() + (1 - mix) * q.exp()).log()
    kl = lambda a, b: (a.exp() * (a - b)).sum(-1)
    d = {"forward_kl": lambda: kl(p, q), "reverse_kl": lambda: kl(q, p),
         "jsd": lambda: mix * kl(p, log_m) + (1 - mix) * kl(q, log_m), "skew_kl": lambda: kl(p, log_m)}[divergence]()
    return temperature * temperature * d[labels != IGNORE_INDEX].mean()


def inputs(dtype=torch.float32):
    """Student and teacher logits, their top-k, and labels with ignored tokens (a whole chunk of them too)."""
    g = torch.Generator().manual_seed(0)
    student = (3 * torch.randn(B, T, V, generator=g)).to(dtype)
    teacher = (3 * torch.randn(B, T, V, generator=g)).to(dtype)
    labels = torch.randint(V, (B, T), generator=g)
    labels[torch.rand(B, T, generator=g) < 0.3] = IGNORE_INDEX
    labels[0, :CHUNK] = IGNORE_INDEX
    values, index = teacher.topk(K, dim=-1)
    tail_values, _ = teacher_logits(teacher, None, K, tail_temperature=TEMPERATURE)
    return {"student": student, "teacher": teacher, "labels": labels, "topk_values": values, "topk_index": index,
            "tail_values": tail_values}


CASES = {  # name -> (chunked, reference), each called as f(student_logits, inputs)
    "ce": (lambda s, x: lm_loss(s, x["labels"], chunk_tokens=CHUNK), lambda s, x: reference_ce(s, x["labels"])),
    "kd": (lambda s, x: kd_loss(s, x["teacher"], x["labels"], TEMPERATURE, chunk_tokens=CHUNK),
           lambda s, x: reference_kd(s, x["teacher"], x["labels"], TEMPERATURE)),
    "kd_topk": (lambda s, x: kd_loss(s, x["topk_values"], x["labels"], TEMPERATURE, x["topk_index"],
                                     chunk_tokens=CHUNK, topk_form="renormalized"),
                lambda s, x: reference_kd(s, x["topk_values"], x["labels"], TEMPERATURE, x["topk_index"])),
}
for _divergence, _mix in (("reverse_kl", 0.5), ("jsd", 0.3), ("skew_kl", 0.1)):
    for _topk in (False, True):
        _teacher = ("topk_values", "topk_index") if _topk else ("teacher", None)
        CASES[_divergence + "_topk" * _topk] = (
            lambda s, x, d=_divergence, a=_mix, t=_teacher: kd_loss(s, x[t[0]], x["labels"], TEMPERATURE,
                                                                    t[1] and x[t[1]], CHUNK, d, a, "renormalized"),
            lambda s, x, d=_divergence, a=_mix, t=_teacher: reference_divergence(d, a, s, x[t[0]], x["labels"],
                                                                                 TEMPERATURE, t[1] and x[t[1]]))
for _divergence, _mix in (("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3), ("skew_kl", 0.1)):
    CASES[_divergence + "_tail"] = (  # top-k KD's tail form, the default
        lambda s, x, d=_divergence, a=_mix: kd_loss(s, x["tail_values"], x["labels"], TEMPERATURE, x["topk_index"],
                                                    CHUNK, d, a),
        lambda s, x, d=_divergence, a=_mix: reference_tail(d, a, s, x["teacher"], x["labels"], TEMPERATURE,
                                                           x["topk_index"]))


def value_and_grad(loss_fn, leaf, *args):
    leaf = leaf.detach().requires_grad_()
    loss = loss_fn(leaf, *args)
    (GRAD_OUTPUT * loss).backward()
    return loss.detach(), leaf.grad


def rel_err(got, want):
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


@pytest.mark.parametrize("case", CASES)
def test_chunked_loss_matches_autograd_in_fp32(case):
    chunked, reference = CASES[case]
    x = inputs()
    loss, grad = value_and_grad(chunked, x["student"], x)
    ref_loss, ref_grad = value_and_grad(reference, x["student"], x)
    assert rel_err(loss, ref_loss) <= 1e-6
    assert rel_err(grad, ref_grad) <= 1e-6
    with torch.no_grad():
        assert rel_err(chunked(x["student"], x), ref_loss) <= 1e-6


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd", "skew_kl"])
def test_the_tail_form_at_k_equal_vocabulary_is_full_vocabulary_kd(divergence):
    """Every id in the top-k leaves the tail bucket empty (tail logit −inf on both sides): the value and the
    gradient are the full-vocabulary divergence's."""
    x = inputs()
    values, index = teacher_logits(x["teacher"], None, V, tail_temperature=TEMPERATURE)
    assert values[..., -1].eq(-math.inf).all()
    tail = lambda s, x: kd_loss(s, values, x["labels"], TEMPERATURE, index, CHUNK, divergence, 0.3)
    full = lambda s, x: kd_loss(s, x["teacher"], x["labels"], TEMPERATURE, None, CHUNK, divergence, 0.3)
    loss, grad = value_and_grad(tail, x["student"], x)
    full_loss, full_grad = value_and_grad(full, x["student"], x)
    assert grad.isfinite().all()
    assert rel_err(loss, full_loss) <= 1e-6
    assert rel_err(grad, full_grad) <= 1e-6


SUPPORT_CASES = [("tail", d) for d in ("forward_kl", "reverse_kl", "jsd", "skew_kl")] + [
    ("renormalized", d) for d in ("forward_kl", "reverse_kl", "jsd")]
MIX = {"forward_kl": 0.5, "reverse_kl": 0.5, "jsd": 0.3, "skew_kl": 0.1}


def reference_top_n(form, divergence, student, x, labels, n):
    """Top-n KD of the tokens ``labels`` keeps, for autograd (the references above), times their number."""
    index = x["teacher"].topk(n, dim=-1).indices
    if form == "tail":
        loss = reference_tail(divergence, MIX[divergence], student, x["teacher"], labels, TEMPERATURE, index)
    elif divergence == "forward_kl":
        loss = reference_kd(student, x["teacher"].gather(-1, index), labels, TEMPERATURE, index)
    else:
        loss = reference_divergence(divergence, MIX[divergence], student, x["teacher"].gather(-1, index), labels,
                                    TEMPERATURE, index)
    return loss * (labels != IGNORE_INDEX).sum()


@pytest.mark.parametrize("form, divergence", SUPPORT_CASES)
def test_a_tokens_support_is_its_own_top_n(form, divergence):
    """Top-p's per-token support (a mask over the top-k): each token's loss and gradient are those of top-n KD
    with n its support's size (in the tail form the dropped ids are in the bucket, on both sides)."""
    x = inputs()
    values, index = teacher_logits(x["teacher"], None, K, tail_temperature=TEMPERATURE if form == "tail" else None,
                                   top_p=TopP(0.3, TEMPERATURE))
    kept = support(values, index)
    index = x["topk_index"]  # past the support: the dropped ids themselves (teacher_logits gives the top id)
    sizes = kept.sum(-1)
    assert set(sizes[x["labels"] != IGNORE_INDEX].tolist()) == set(range(1, K + 1))  # every size occurs
    variable = lambda s, x: kd_loss(s, values, x["labels"], TEMPERATURE, index, CHUNK, divergence, MIX[divergence],
                                    form, kept)
    by_size = lambda s, x: sum(reference_top_n(form, divergence, s, x, x["labels"].where(sizes == n, IGNORE_INDEX), n)
                               for n in range(1, K + 1)) / (x["labels"] != IGNORE_INDEX).sum()
    loss, grad = value_and_grad(variable, x["student"], x)
    want_loss, want_grad = value_and_grad(by_size, x["student"], x)
    assert rel_err(loss, want_loss) <= 1e-6 and rel_err(grad, want_grad) <= 1e-6


@pytest.mark.parametrize("form, divergence", SUPPORT_CASES)
def test_a_support_of_every_top_k_entry_is_the_top_k_loss(form, divergence):
    x = inputs()
    values = x["tail_values"] if form == "tail" else x["topk_values"]
    loss_of = lambda mask: lambda s, x: kd_loss(s, values, x["labels"], TEMPERATURE, x["topk_index"], CHUNK,
                                                divergence, MIX[divergence], form, mask)
    loss, grad = value_and_grad(loss_of(torch.ones_like(x["topk_index"], dtype=torch.bool)), x["student"], x)
    want_loss, want_grad = value_and_grad(loss_of(None), x["student"], x)
    assert torch.equal(loss, want_loss) and torch.equal(grad, want_grad)


def test_the_tail_form_needs_the_tail_logit():
    """Top-k values without their tail logit (what the renormalized form reads) are refused, not misread."""
    x = inputs()
    with pytest.raises(ValueError, match="tail top-k KD takes 6 teacher values per token, got 5"):
        kd_loss(x["student"], x["topk_values"], x["labels"], TEMPERATURE, x["topk_index"])


@pytest.mark.parametrize("case", CASES)
def test_chunked_loss_matches_autograd_in_bf16(case):
    """Both sides compute in fp32 from the same bf16 logits, so values agree to fp32 rounding. Gradients:
    the reference rounds grad_output·∂loss to bf16 once, the chunked loss rounds ∂loss to bf16 in forward
    and again after ·grad_output, so elements may differ by up to two bf16 ulps (2⁻⁶ relative)."""
    chunked, reference = CASES[case]
    x = inputs(torch.bfloat16)
    loss, grad = value_and_grad(chunked, x["student"], x)
    ref_loss, ref_grad = value_and_grad(reference, x["student"], x)
    assert grad.dtype == torch.bfloat16
    assert rel_err(loss, ref_loss) <= 1e-6
    torch.testing.assert_close(grad, ref_grad, rtol=2 ** -6, atol=0.0)


def frozen_head():
    torch.manual_seed(0)
    head = torch.nn.Sequential(torch.nn.LayerNorm(D), torch.nn.Linear(D, V, bias=False))
    return head.requires_grad_(False)


def test_tap_losses_match_autograd():
    head, labels = frozen_head(), inputs()["labels"]
    taps = [torch.randn(B, T, D, requires_grad=True) for _ in range(2)]
    ref_taps = [h.detach().clone().requires_grad_() for h in taps]
    losses = tap_lm_losses(head, taps, labels, chunk_tokens=CHUNK)
    ref_losses = [reference_ce(head(h), labels) for h in ref_taps]
    (GRAD_OUTPUT * sum(losses)).backward()
    (GRAD_OUTPUT * sum(ref_losses)).backward()
    for loss, ref_loss, h, ref_h in zip(losses, ref_losses, taps, ref_taps):
        assert rel_err(loss.detach(), ref_loss.detach()) <= 1e-6
        assert rel_err(h.grad, ref_h.grad) <= 1e-6
    assert all(p.grad is None for p in head.parameters())


def test_a_trainable_head_gets_the_gradients_of_autograd():
    """distill.filter_head: trainable — value and gradients (tap and head) equal plain autograd."""
    head, labels = frozen_head().requires_grad_(True), inputs()["labels"]
    ref_head = copy.deepcopy(head)
    h = torch.randn(B, T, D, requires_grad=True)
    ref_h = h.detach().clone().requires_grad_()
    loss, ref_loss = trained_head_lm_loss(head, h, labels, chunk_tokens=CHUNK), reference_ce(ref_head(ref_h), labels)
    (GRAD_OUTPUT * loss).backward()
    (GRAD_OUTPUT * ref_loss).backward()
    assert rel_err(loss.detach(), ref_loss.detach()) <= 1e-6 and rel_err(h.grad, ref_h.grad) <= 1e-6
    for p, ref_p in zip(head.parameters(), ref_head.parameters()):
        assert rel_err(p.grad, ref_p.grad) <= 1e-6


def test_a_trainable_head_keeps_one_chunk_of_logits():
    head, labels = frozen_head().requires_grad_(True), inputs()["labels"]
    saved, largest = saved_bytes_and_largest_fp32(lambda h: trained_head_lm_loss(head, h, labels, CHUNK),
                                                  torch.randn(B, T, D))
    assert largest <= CHUNK * V
    assert saved <= B * T * D * 4 + B * T * 8 + 16  # the chunks' inputs, their labels and a count: no logits


# ----------------------------------------------------------------------------- memory
class LargestVocabFloat32(TorchDispatchMode):
    """Records the most elements of an fp32 (…, V) tensor that an op allocates, forward or backward (views
    and in-place results share an input's storage: not new)."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if is_vocab_float32(t) and t.untyped_storage().data_ptr() not in inputs:
                self.numel = max(self.numel, t.numel())
        return out


def is_vocab_float32(t) -> bool:
    return isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.ndim > 0 and t.shape[-1] == V


class _Saved:
    """What autograd holds for one saved tensor: alive until the graph that saved it is freed."""

    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor):
        self.tensor = tensor


def saved_bytes_and_largest_fp32(loss_fn, leaf, *args) -> tuple[int, int]:
    """Bytes that forward leaves saved for backward (graphs built and freed inside it do not count), and
    the most elements of an fp32 (…, V) tensor made in forward + backward."""
    saved = weakref.WeakSet()

    def pack(t):
        saved.add(held := _Saved(t))
        return held

    leaf = leaf.detach().requires_grad_()
    with LargestVocabFloat32() as largest:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda held: held.tensor):
            loss = loss_fn(leaf, *args)
        saved_bytes = sum(held.tensor.numel() * held.tensor.element_size() for held in saved)
        loss.backward()
    return saved_bytes, largest.numel


@pytest.mark.parametrize("case", CASES)
def test_chunked_loss_keeps_one_chunk_of_fp32_and_saves_one_buffer(case):
    chunked, reference = CASES[case]
    x = inputs(torch.bfloat16)
    logits_bytes = x["student"].numel() * x["student"].element_size()
    saved, largest = saved_bytes_and_largest_fp32(chunked, x["student"], x)
    assert saved <= logits_bytes  # the bf16 gradient buffer, nothing in fp32
    assert largest <= CHUNK * V
    ref_saved, ref_largest = saved_bytes_and_largest_fp32(reference, x["student"], x)
    assert ref_saved >= 2 * logits_bytes and ref_largest == B * T * V  # what the probes catch


@pytest.mark.parametrize("case", CASES)
def test_no_gradient_is_made_under_no_grad(case):
    chunked, _ = CASES[case]
    x = inputs()  # fp32: a gradient buffer would be an fp32 (tokens × V) tensor
    with torch.no_grad(), LargestVocabFloat32() as largest:
        chunked(x["student"].requires_grad_(), x)
    assert largest.numel <= CHUNK * V


def test_tap_losses_keep_one_chunk_of_logits_and_save_the_tap_gradient():
    head, labels = frozen_head(), inputs()["labels"]
    h = torch.randn(B, T, D)
    saved, largest = saved_bytes_and_largest_fp32(lambda h: tap_lm_losses(head, [h], labels, CHUNK)[0], h)
    assert saved <= h.numel() * h.element_size()
    assert largest <= CHUNK * V
    ref_saved, ref_largest = saved_bytes_and_largest_fp32(lambda h: reference_ce(head(h), labels), h)
    assert ref_saved >= B * T * V * 4 and ref_largest == B * T * V
