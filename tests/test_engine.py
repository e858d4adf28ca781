"""The LR schedules: warm-up then cosine; WSD and re-warming against a hand computation."""

from __future__ import annotations

import pytest

from harness.tiny import base_config, write_config
from ted_ds.config import load_run_config
from ted_ds.engine import lr_multiplier


def test_lr_schedule_warmup_then_cosine(tiny, tmp_path):
    cfg = load_run_config(write_config(str(tmp_path / "c.yaml"), **base_config(tiny["llama_data"],
                                                                               tiny["llama_teacher"],
                                                                               str(tmp_path / "o"))),
                          ["optim.warmup_steps=10", "optim.lr=1.0", "optim.min_lr=0.1"])
    m = [lr_multiplier(s, cfg, 110) for s in range(110)]
    assert m[0] == pytest.approx(0.1) and m[9] == pytest.approx(1.0) and m[10] == pytest.approx(1.0)
    # a quarter, half and three quarters into the 100 decay steps: 0.1 + 0.45·(1 + cos(π/4 · k)), by hand;
    # a straight line from 1 to 0.1 would give 0.775 and 0.325 at the quarters
    assert [m[35], m[60], m[85]] == pytest.approx([0.1 + 0.45 * (1 + 0.5**0.5), 0.55, 0.1 + 0.45 * (1 - 0.5**0.5)],
                                                  abs=1e-12)
    assert m[109] == pytest.approx(0.1, abs=1e-3)
    assert all(a >= b for a, b in zip(m[10:], m[11:]))


def test_wsd_and_rewarming_follow_the_hand_computed_curve(tiny, tmp_path):
    """lr 1, min_lr 0.1, 4 warmup steps re-warming from 0.5, 20 steps, the last 25 % decaying."""
    cfg = load_run_config(write_config(str(tmp_path / "c.yaml"), **base_config(tiny["llama_data"],
                                                                               tiny["llama_teacher"],
                                                                               str(tmp_path / "o"))),
                          ["optim.schedule=wsd", "optim.lr=1.0", "optim.min_lr=0.1", "optim.warmup_steps=4",
                           "optim.warmup_start_lr=0.5", "optim.decay_fraction=0.25"])
    by_hand = [0.625, 0.75, 0.875, 1.0] + [1.0] * 11 + [0.82, 0.64, 0.46, 0.28, 0.1]
    assert [lr_multiplier(s, cfg, 20) for s in range(20)] == pytest.approx(by_hand, abs=1e-12)
    cfg.optim.schedule = "constant"
    assert [lr_multiplier(s, cfg, 20) for s in range(20)] == pytest.approx(by_hand[:4] + [1.0] * 16, abs=1e-12)


def test_a_trained_module_of_mixed_dtypes_is_refused_in_one_line_before_deepspeed(tiny, tmp_path):
    """DeepSpeed's own check is a bare assertion deep in ZeRO-3's set-up; ours names the parameters."""
    import json

    import torch

    from ted_ds.engine import build_trained_engine, resolve_ds_config
    from ted_ds.errors import TrainingError

    cfg = load_run_config(write_config(str(tmp_path / "c.yaml"), **base_config(tiny["llama_data"],
                                                                               tiny["llama_teacher"],
                                                                               str(tmp_path / "o"))))
    module = torch.nn.ModuleDict({"student": torch.nn.Linear(4, 4), "filters": torch.nn.Linear(4, 4).bfloat16()})
    module["student"].bias.requires_grad_(False)  # a frozen parameter is not trained: not named
    ds = resolve_ds_config(cfg, 2)
    with pytest.raises(TrainingError) as e:
        build_trained_engine(cfg, module, ds, 1)
    assert str(e.value) == ("the trained parameters must be all float32, the run's compute dtype, but "
                            "filters.weight (bfloat16), filters.bias (bfloat16) are not")
    ds = json.loads(json.dumps(ds)) | {"bf16": {"enabled": True}}
    with pytest.raises(TrainingError, match=r"but student\.weight \(float32\) is not$"):
        build_trained_engine(cfg, module, ds, 1)
