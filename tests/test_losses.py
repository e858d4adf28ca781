"""The loss terms against a hand computation: LM, KD (full and top-k), the layer losses, the weighted objective."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from ted_ds.losses import ObjectiveWeights, distill_objective, kd_loss, layer_loss, lm_loss, sampled_kd_loss
from ted_ds.teacher import sampled_logits, teacher_logits


def test_lm_loss_by_hand():
    logits = torch.tensor([[[2.0, 0.0, -1.0], [0.5, 0.5, 0.0]]])
    labels = torch.tensor([[0, 2]])
    p0 = math.exp(2) / (math.exp(2) + 1 + math.exp(-1))
    p1 = 1 / (2 * math.exp(0.5) + 1)
    assert lm_loss(logits, labels).item() == pytest.approx(-(math.log(p0) + math.log(p1)) / 2, rel=1e-6)


def test_kd_loss_by_hand_and_topk():
    s = torch.tensor([[[1.0, 0.0, 0.0]]])
    t = torch.tensor([[[0.0, 2.0, 0.0]]])
    T = 2.0
    ps = [math.exp(x / T) for x in (1.0, 0.0, 0.0)]
    pt = [math.exp(x / T) for x in (0.0, 2.0, 0.0)]
    ps = [x / sum(ps) for x in ps]
    pt = [x / sum(pt) for x in pt]
    kl = sum(a * (math.log(a) - math.log(b)) for a, b in zip(pt, ps))
    y = torch.tensor([[0]])
    assert kd_loss(s, t, y, T).item() == pytest.approx(T * T * kl, rel=1e-6)
    assert kd_loss(t, t, y, T).item() == pytest.approx(0.0, abs=1e-7)
    # top-k support: teacher renormalised over its 2 best ids, student log-probs at those ids
    values, index = t.topk(2, dim=-1)
    qt = torch.softmax(values / T, -1)[0, 0]
    ls = torch.log_softmax(s / T, -1)[0, 0, index[0, 0]]
    expected = T * T * (qt * (qt.log() - ls)).sum().item()
    assert kd_loss(s, values, y, T, index, topk_form="renormalized").item() == pytest.approx(expected, rel=1e-6)


def test_divergences_by_hand_and_at_their_limits():
    """p = (1/4, 3/4) and q = (1/2, 1/2) at T = 1; m = a·p + (1 − a)·q."""
    s, t, y = torch.tensor([[[0.0, 0.0]]]), torch.tensor([[[0.0, math.log(3.0)]]]), torch.tensor([[0]])
    p, q = (0.25, 0.75), (0.5, 0.5)
    kl = lambda a, b: sum(x * math.log(x / z) for x, z in zip(a, b))
    mix = lambda a: [a * x + (1 - a) * z for x, z in zip(p, q)]
    by_hand = {"forward_kl": kl(p, q), "reverse_kl": kl(q, p), "jsd": 0.3 * kl(p, mix(0.3)) + 0.7 * kl(q, mix(0.3)),
               "skew_kl": kl(p, mix(0.3))}
    for divergence, want in by_hand.items():
        assert kd_loss(s, t, y, 1.0, divergence=divergence, mix=0.3).item() == pytest.approx(want, rel=1e-6)
    g = torch.Generator().manual_seed(0)
    s, t, y = torch.randn(2, 5, 40, generator=g), torch.randn(2, 5, 40, generator=g), torch.zeros(2, 5).long()
    values, index = t.topk(6, dim=-1)
    for divergence in by_hand:  # 0 when the student is the teacher
        assert kd_loss(t, t, y, 2.0, divergence=divergence, mix=0.3).item() == pytest.approx(0.0, abs=1e-6)
    tail_values, _ = teacher_logits(t, None, 6, tail_temperature=2.0)
    for teacher, form in (((t,), "tail"), ((values, index), "renormalized"), ((tail_values, index), "tail")):
        # skew KL at a = 0 is forward KL, over all ids and on the top-k in either form
        forward = kd_loss(s, *teacher[:1], y, 2.0, *teacher[1:], topk_form=form).item()
        assert kd_loss(s, *teacher[:1], y, 2.0, *teacher[1:], divergence="skew_kl", mix=0.0,
                       topk_form=form).item() == pytest.approx(forward, rel=1e-6)
    # forward KL on the top-k is D(p ‖ q̃) − log Z_K, the form the other divergences take there
    q = torch.log_softmax(s / 2.0, -1).gather(-1, index)
    p_k, q_tilde = torch.log_softmax(values / 2.0, -1), torch.log_softmax(q, -1)
    general = (p_k.exp() * (p_k - q_tilde)).sum(-1) - q.logsumexp(-1)
    assert kd_loss(s, values, y, 2.0, index, topk_form="renormalized").item() == \
        pytest.approx(4.0 * general.mean().item(), rel=1e-6)


def test_layer_losses_by_hand():
    s = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])
    t = torch.tensor([[[1.0, 0.0], [0.0, 4.0]]])
    mse = (0 + 4 + 9 + 0) / 4
    assert layer_loss(s, t, "mse").item() == pytest.approx(mse)
    var = torch.tensor([1.0, 0.0, 0.0, 4.0]).var().item()  # unbiased, as torch.var
    assert layer_loss(s, t, "normalized_mse").item() == pytest.approx(mse / (var + 1e-6), rel=1e-6)
    cos = [(1 * 1 + 2 * 0) / (math.sqrt(5) * 1), (3 * 0 + 4 * 4) / (5 * 4)]
    assert layer_loss(s, t, "cosine").item() == pytest.approx(1 - sum(cos) / 2, rel=1e-6)
    # normalised MSE does not care about the scale of both sides
    assert layer_loss(10 * s, 10 * t, "normalized_mse").item() == pytest.approx(
        layer_loss(s, t, "normalized_mse").item(), rel=1e-4)


def test_objective_weights_and_terms():
    torch.manual_seed(0)
    s_logits, t_logits = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    labels = torch.randint(5, (2, 3))
    s_taps, t_taps = [torch.randn(2, 3, 4) for _ in range(2)], [torch.randn(2, 3, 4) for _ in range(2)]
    w = ObjectiveWeights(alpha=0.5, beta=3.0, temperature=2.0, layer_loss="mse")
    terms = distill_objective(s_logits, s_taps, labels, t_logits, t_taps, w)
    layer = (F.mse_loss(s_taps[0], t_taps[0]) + F.mse_loss(s_taps[1], t_taps[1])) / 2
    assert terms["layer"].item() == pytest.approx(layer.item(), rel=1e-6)
    assert terms["loss"].item() == pytest.approx(
        (terms["lm"] + 0.5 * terms["kd"] + 3.0 * terms["layer"]).item(), rel=1e-6)
    lm_only = distill_objective(s_logits, None, labels, None, None, w)
    assert set(lm_only) == {"lm", "loss"}


def _softmax(xs: list[float]) -> list[float]:
    e = [math.exp(x) for x in xs]
    return [x / sum(e) for x in e]


KD_ONLY = ObjectiveWeights(alpha=1.0, beta=0.0, temperature=2.0, layer_loss="mse")


def test_kd_gives_no_weight_to_a_teacher_entry_of_minus_infinity():
    """A masked teacher entry (logit −inf) has p_t = 0 and p·log p = 0 there: value and closed-form gradient
    T·(p_s − p_t) by hand, full vocabulary and top-k (a −inf among the k values)."""
    T = KD_ONLY.temperature
    s = torch.tensor([[[1.0, 0.0, 0.5]]], requires_grad=True)
    t = torch.tensor([[[0.0, 2.0, -math.inf]]])
    ps, pt = _softmax([1.0 / T, 0.0, 0.5 / T]), _softmax([0.0, 2.0 / T]) + [0.0]
    kl = sum(a * (math.log(a) - math.log(b)) for a, b in zip(pt, ps) if a > 0)
    kd = distill_objective(s, None, torch.tensor([[0]]), t, None, KD_ONLY)["kd"]
    assert kd.item() == pytest.approx(T * T * kl, rel=1e-6)
    kd.backward()
    assert s.grad[0, 0].tolist() == pytest.approx([T * (a - b) for a, b in zip(ps, pt)], rel=1e-6)
    s.grad = None
    values, index = torch.tensor([[[2.0, -math.inf]]]), torch.tensor([[[1, 2]]])
    renormalized = dataclasses.replace(KD_ONLY, topk_form="renormalized")
    kd = distill_objective(s, None, torch.tensor([[0]]), values, None, renormalized, index)["kd"]
    assert kd.item() == pytest.approx(-T * T * math.log(ps[1]), rel=1e-6)  # p_t = (1, 0) on ids (1, 2)
    kd.backward()
    assert s.grad[0, 0].tolist() == pytest.approx([T * (a - b) for a, b in zip(ps, [0.0, 1.0, 0.0])], rel=1e-6)


def test_kd_averages_over_the_tokens_the_lm_loss_counts():
    """Labels of IGNORE_INDEX (-100) leave a token out of KD as out of CE: the mean is over the kept tokens,
    and an ignored token's logits get no KD gradient."""
    torch.manual_seed(0)
    s, t = torch.randn(1, 3, 5, requires_grad=True), torch.randn(1, 3, 5)
    labels = torch.tensor([[1, -100, 4]])
    kd = distill_objective(s, None, labels, t, None, KD_ONLY)["kd"]
    kept = [0, 2]
    alone = distill_objective(s[:, kept].detach(), None, labels[:, kept], t[:, kept], None, KD_ONLY)["kd"]
    assert kd.item() == pytest.approx(alone.item(), rel=1e-6)
    kd.backward()
    assert s.grad[0, 1].abs().max() == 0 and s.grad[0, kept].abs().min() > 0


def test_a_micro_batch_with_every_label_ignored_adds_nothing():
    """0 kept tokens: every term is 0 with a zero gradient (0/0 would be NaN and skip the whole step)."""
    from ted_ds.losses import tap_lm_losses

    s, t = torch.randn(1, 2, 5, requires_grad=True), torch.randn(1, 2, 5)
    h = torch.randn(1, 2, 5, requires_grad=True)
    labels = torch.full((1, 2), -100)
    terms = distill_objective(s, None, labels, t, None, KD_ONLY)
    (tap,) = tap_lm_losses(torch.nn.Identity(), [h], labels)
    assert [terms["lm"].item(), terms["kd"].item(), tap.item()] == [0.0, 0.0, 0.0]
    (terms["loss"] + tap).backward()
    assert s.grad.abs().max() == 0 and h.grad.abs().max() == 0


def test_the_sampled_estimate_has_full_forward_kls_mean_gradient():
    """Sampled KD (N = 8 draws per position from p at T = 2): over 4000 seeds its mean gradient is the
    full-vocabulary forward-KL gradient, each id within 4 standard errors of the mean (and so is its mean
    value); without the counts or the ÷ N it is not."""
    vocab, draws, seeds, temperature = 12, 8, 4000, 2.0
    g = torch.Generator().manual_seed(0)
    teacher, student = 3 * torch.randn(1, 1, vocab, generator=g), 3 * torch.randn(1, 1, vocab, generator=g)
    logp, ids, counts = sampled_logits(teacher.expand(seeds, 1, vocab), list(range(seeds)), draws, temperature)
    labels = torch.zeros(seeds, 1, dtype=torch.long)
    leaf = student.expand(seeds, 1, vocab).clone().requires_grad_()
    estimate = sampled_kd_loss(leaf, logp, ids, counts, labels, temperature)
    estimate.backward()
    per_seed = leaf.grad[:, 0] * seeds  # (seeds, V): each seed's gradient (the loss is their mean)
    exact = student.clone().requires_grad_()
    full = kd_loss(exact, teacher, labels[:1], temperature)
    full.backward()
    error = (per_seed.mean(0) - exact.grad[0, 0]).abs()
    assert (error <= 4 * per_seed.std(0) / math.sqrt(seeds) + 1e-6).all(), error
    assert exact.grad.abs().max() > 0.1  # a gradient worth estimating
    assert estimate.item() == pytest.approx(full.item(), rel=0.05)
