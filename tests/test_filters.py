"""The filter bank: its initialisation and output shapes (linear and MLP filters), and the model it
records having been learned on, checked before any process group."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from harness.common import REPO, ProcessGroupStarted, stop_at_process_group
from harness.tiny import base_config, write_config
from ted_ds.filters import FilterBank
from ted_ds.weights import fingerprint


def test_filter_bank_init_and_shapes():
    bank = FilterBank("linear", 32, 64, [2, 4], seed=1)
    w = torch.cat([f.weight.flatten() for f in bank.filters])
    assert w.std().item() == pytest.approx(0.02, rel=0.1) and abs(w.mean().item()) < 2e-3
    assert all(torch.count_nonzero(f.bias) == 0 for f in bank.filters)
    out = bank([torch.randn(2, 5, 32), torch.randn(2, 5, 32)])
    assert [o.shape for o in out] == [(2, 5, 64)] * 2
    mlp = FilterBank("mlp", 32, 64, [2], seed=1)
    assert mlp([torch.randn(1, 3, 32)])[0].shape == (1, 3, 64)


def _other_teacher(teacher: str, out: str) -> str:
    """A teacher of the same shapes and files as ``teacher`` with other weights (each nudged by 1e-3)."""
    shutil.copytree(teacher, out)
    path = os.path.join(out, "model.safetensors")
    save_file({k: v + 1e-3 for k, v in load_file(path).items()}, path, metadata={"format": "pt"})
    return out


def test_a_weights_fingerprint_survives_a_move_and_tells_other_weights_apart(tiny, tmp_path):
    teacher = tiny["llama_teacher"]
    moved = shutil.copytree(teacher, tmp_path / "moved")
    assert fingerprint(str(moved)) == fingerprint(teacher)
    assert fingerprint(_other_teacher(teacher, str(tmp_path / "other"))) != fingerprint(teacher)


def test_a_bank_learned_on_another_teacher_of_the_same_shape_is_refused(tiny, tmp_path, capsys, monkeypatch):
    """Stage 1 (one process, one step per side) on the tiny teacher; stage 2 with another teacher of the same
    shapes is refused in one line naming both, before any process group; the same teacher moved elsewhere
    is accepted (paths move, the weights' digest does not); a bank that records no model (written before
    banks recorded it) is accepted with a warning."""
    from ted_ds.cli import main as ted_main

    teacher = tiny["llama_teacher"]
    banks = {side: str(tmp_path / f"filters-{side}") for side in ("teacher", "student")}
    cfg = lambda name, path: write_config(str(tmp_path / f"{name}.yaml"), **base_config(
        tiny["llama_data"], path, str(tmp_path / name), **{"train.steps": 1, "teacher.filters": banks["teacher"],
                                                          "student.filters": banks["student"]}))
    for side in banks:
        r = subprocess.run([sys.executable, "-m", "ted_ds", "learn-filters", "--config", cfg(f"stage1-{side}", teacher),
                            "--model", side, f"distill.filters_out={banks[side]}"], cwd=REPO, capture_output=True,
                           text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
    stop_at_process_group(monkeypatch)
    other = _other_teacher(teacher, str(tmp_path / "other-teacher"))
    capsys.readouterr()
    assert ted_main(["distill", "--config", cfg("other", other)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"ted-ds: error: teacher.filters: {banks['teacher']} was learned on {teacher} (weights "
                   f"{fingerprint(teacher)}), but this run's model is {other} (weights {fingerprint(other)}); re-run "
                   "learn-filters on it"], err
    learned = json.load(open(os.path.join(banks["student"], "filters.json")))["model"]
    assert learned["name"] == f"blocks [0, 2] of {teacher}"  # the student: the teacher's blocks it is made of
    moved = shutil.copytree(teacher, tmp_path / "moved-teacher")
    with pytest.raises(ProcessGroupStarted):
        ted_main(["distill", "--config", cfg("moved", str(moved))])
    meta = json.load(open(os.path.join(banks["student"], "filters.json")))
    del meta["model"]
    json.dump(meta, open(os.path.join(banks["student"], "filters.json"), "w"))
    with pytest.warns(UserWarning, match="does not record the model it was learned on"), \
            pytest.raises(ProcessGroupStarted):
        ted_main(["distill", "--config", cfg("old-bank", teacher)])


def test_lwd_can_start_its_student_map_at_the_identity_and_refuses_it_where_it_means_nothing():
    """distill.lwd_map_init=identity: the map LWD trains returns the student's own states (cut or
    zero-padded to the teacher's size), so its layer loss starts from them; normal is N(0, 0.02)."""
    from ted_ds.config import DistillConfig, load_run_config
    from ted_ds.errors import ConfigError
    from ted_ds.models import lwd_map

    h = torch.randn(2, 5, 32)
    same = lwd_map(DistillConfig(method="lwd", lwd_map_init="identity"), 32, 32, [1, 2], seed=3)
    assert all(torch.equal(out, h) for out in same([h, h]))
    wider = lwd_map(DistillConfig(method="lwd", lwd_map_init="identity"), 32, 48, [1], seed=3)([h])[0]
    assert torch.equal(wider[..., :32], h) and not wider[..., 32:].any()
    narrower = lwd_map(DistillConfig(method="lwd", lwd_map_init="identity"), 32, 16, [1], seed=3)([h])[0]
    assert torch.equal(narrower, h[..., :16])
    normal = lwd_map(DistillConfig(method="lwd"), 32, 32, [1], seed=3).filters[0].weight
    assert normal.std().item() == pytest.approx(0.02, rel=0.1)
    for overrides, message in ((["distill.method=kd"], "method kd"), (["distill.filter=mlp"], "filter mlp")):
        with pytest.raises(ConfigError, match=message):
            load_run_config(None, ["distill.method=lwd", *overrides, "distill.lwd_map_init=identity"])
    with pytest.raises(ConfigError, match="distill.lwd_map_init must be one of normal, identity"):
        load_run_config(None, ["distill.lwd_map_init=zero"])
