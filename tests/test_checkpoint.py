"""The checkpoint's RNG file, single-process: every generator restored (CUDA per local device; another
device count warns); the ranks' agreement on the checkpoint to resume from. Multi-rank checkpoints:
test_checkpoint_multirank.py."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch


def _draws() -> tuple:
    """One draw from every generator a training step may use (dropout masks, shuffles)."""
    cuda = [torch.rand(2, device=f"cuda:{i}").cpu() for i in range(torch.cuda.device_count())]
    return torch.rand(3), cuda, np.random.rand(3).tolist(), random.random()


def _same(a: tuple, b: tuple) -> bool:
    return torch.equal(a[0], b[0]) and len(a[1]) == len(b[1]) and all(map(torch.equal, a[1], b[1])) and a[2:] == b[2:]


def test_rng_file_restores_every_generator_and_warns_on_another_device_count(tmp_path):
    """rng_rank<r>.pt brings back torch CPU, every local CUDA device (none on a CPU machine), numpy and
    Python; CUDA streams saved for another number of devices cannot be mapped: the rest is restored, with
    a warning."""
    from ted_ds.checkpoint import rng_state, set_rng_state

    path = str(tmp_path / "rng_rank0.pt")
    torch.save(rng_state(), path)
    first = _draws()
    assert not _same(_draws(), first)  # the streams moved on
    set_rng_state(torch.load(path, weights_only=True))
    assert _same(_draws(), first)
    state = torch.load(path, weights_only=True)
    assert len(state["cuda"]) == torch.cuda.device_count()
    state["cuda"] = state["cuda"] + [torch.zeros(16, dtype=torch.uint8)]  # one device more than here
    with pytest.warns(UserWarning, match="CUDA random streams are not restored"):
        set_rng_state(state)
    assert _same(_draws(), first)


def test_ranks_agree_on_the_checkpoint_or_name_the_hosts_that_cannot_see_it():
    """What every rank sees, gathered: one tag for all, or one line, the same on every rank."""
    from ted_ds.checkpoint import agreed_tag
    from ted_ds.errors import CheckpointError

    assert agreed_tag([("node0", "step-00000002", None), ("node1", "step-00000002", None)], "/c") == "step-00000002"
    assert agreed_tag([("node0", None, None)] * 2, "/c") is None
    local = [("node0", "step-00000004", None)] * 8 + [("node1", None, None), ("node2", "step-00000002", None)] * 4
    with pytest.raises(CheckpointError) as e:
        agreed_tag(local, "/c")
    assert str(e.value) == ("/c: node1, node2 cannot see checkpoint step-00000004, which node0 would resume from "
                            "(no checkpoint, step-00000002 there): train.out_dir must be on storage every node shares")
    with pytest.raises(CheckpointError, match="^/c: no complete checkpoint left"):
        agreed_tag([("node0", None, "/c: no complete checkpoint left"), ("node1", "step-00000002", None)], "/c")
