"""bench.forked: a study's one-process runs forked from a warm interpreter are the runs `python -m ted_ds`
makes, bit for bit, and fail as the command fails."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from harness.common import REPO
from harness.tiny import base_config, write_config

ENV = {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}


def _logged(out_dir: str) -> list[dict]:
    """Every logged figure but the timings."""
    timing = ("time", "tokens_per_s", "mfu", "peak")
    return [{k: v for k, v in json.loads(line).items() if not any(t in k for t in timing)}
            for line in open(os.path.join(out_dir, "metrics.jsonl"))]


def test_a_forked_run_is_the_plain_process_run_bit_for_bit(tiny, tmp_path):
    from bench import forked

    config = write_config(str(tmp_path / "kd.yaml"), **base_config(
        tiny["llama_data"], tiny["llama_teacher"], str(tmp_path / "unused"),
        **{"distill.method": "kd", "train.steps": 3, "train.log_interval": 1}))
    plain, fork = str(tmp_path / "plain"), str(tmp_path / "forked")
    subprocess.run([sys.executable, "-m", "ted_ds", "distill", "--config", config, f"train.out_dir={plain}"],
                   cwd=REPO, env=dict(os.environ, **ENV), check=True, capture_output=True, timeout=600)
    output = forked.ted_ds(["distill", "--config", config, f"train.out_dir={fork}"], ENV, timeout=600)
    assert "ted-ds:" in output  # the command's own output comes back
    assert [m["step"] for m in _logged(plain)] == [1, 2, 3, 3] and _logged(fork) == _logged(plain)
    with pytest.raises(SystemExit, match=r"exit 2\)(.|\n)*ted-ds: error: unknown config key optim\.nonsense"):
        forked.ted_ds(["distill", "--config", config, "optim.nonsense=1"], ENV, timeout=600)
