"""Building engines: the trained module's dtype guard before DeepSpeed."""

from __future__ import annotations

import pytest

from harness.tiny import base_config, write_config
from ted_ds.config import load_run_config


def test_a_trained_module_of_mixed_dtypes_is_refused_in_one_line_before_deepspeed(tiny, tmp_path):
    """DeepSpeed's own check is a bare assertion deep in ZeRO-3's set-up; ours names the parameters."""
    import json

    import torch

    from ted_ds.engine import DeepSpeedSettings, build_trained_engine, resolve_ds_config
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
    ds = DeepSpeedSettings.of(json.loads(json.dumps(ds.config)) | {"bf16": {"enabled": True}})
    with pytest.raises(TrainingError, match=r"but student\.weight \(float32\) is not$"):
        build_trained_engine(cfg, module, ds, 1)
