"""The LR schedules against a hand computation: warm-up then cosine, WSD, re-warming, constant; the distillation
weights' schedules (the same code) at their boundaries (across a real resume: test_checkpoint_multirank's
scheduled-weights run)."""

from __future__ import annotations

import pytest

from ted_ds.config import DistillConfig, OptimConfig
from ted_ds.optim import distill_weights, lr_multiplier


def test_lr_schedule_warmup_then_cosine():
    o = OptimConfig(warmup_steps=10, lr=1.0, min_lr=0.1)
    m = [lr_multiplier(s, o, 110) for s in range(110)]
    assert m[0] == pytest.approx(0.1) and m[9] == pytest.approx(1.0) and m[10] == pytest.approx(1.0)
    # a quarter, half and three quarters into the 100 decay steps: 0.1 + 0.45·(1 + cos(π/4 · k)), by hand;
    # a straight line from 1 to 0.1 would give 0.775 and 0.325 at the quarters
    assert [m[35], m[60], m[85]] == pytest.approx([0.1 + 0.45 * (1 + 0.5**0.5), 0.55, 0.1 + 0.45 * (1 - 0.5**0.5)],
                                                  abs=1e-12)
    assert m[109] == pytest.approx(0.1, abs=1e-3)
    assert all(a >= b for a, b in zip(m[10:], m[11:]))


def test_wsd_and_rewarming_follow_the_hand_computed_curve():
    """lr 1, min_lr 0.1, 4 warmup steps re-warming from 0.5, 20 steps, the last 25 % decaying."""
    o = OptimConfig(schedule="wsd", lr=1.0, min_lr=0.1, warmup_steps=4, warmup_start_lr=0.5, decay_fraction=0.25)
    by_hand = [0.625, 0.75, 0.875, 1.0] + [1.0] * 11 + [0.82, 0.64, 0.46, 0.28, 0.1]
    assert [lr_multiplier(s, o, 20) for s in range(20)] == pytest.approx(by_hand, abs=1e-12)
    o.schedule = "constant"
    assert [lr_multiplier(s, o, 20) for s in range(20)] == pytest.approx(by_hand[:4] + [1.0] * 16, abs=1e-12)


def test_distillation_weight_schedules_at_their_boundaries():
    """α: 2 warm over 2 steps, wsd to 0.5 over the last 25 % (round(2.5) = 2 steps) of 10; β: 1 linear to 0 after the
    same warmup, reaching 0 at the last step; a constant weight is its value at every step."""
    d = DistillConfig(alpha=2.0, alpha_schedule="wsd", alpha_final=0.5, beta=1.0, beta_schedule="linear",
                      weight_warmup_steps=2, weight_decay_fraction=0.25)
    at = [distill_weights(d, 10, s) for s in range(10)]
    assert [w["alpha"] for w in at] == pytest.approx([1.0, 2.0] + [2.0] * 6 + [1.25, 0.5], abs=1e-12)
    assert [w["beta"] for w in at] == pytest.approx([0.5, 1.0] + [1 - k / 7 for k in range(8)], abs=1e-12)
    rising = DistillConfig(alpha=1.0, alpha_schedule="linear", alpha_final=3.0)  # α_final above α: a rise
    assert [distill_weights(rising, 5, s)["alpha"] for s in range(5)] == pytest.approx([1.0, 1.5, 2.0, 2.5, 3.0])
    assert {distill_weights(DistillConfig(alpha=0.7, beta=0.3), 10, s)["alpha"] for s in range(10)} == {0.7}
