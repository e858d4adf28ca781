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


def test_trainer_state_is_saved_as_trainer_state_json_always_was_and_restored_from_it(tmp_path):
    """The loop's ``TrainerState`` goes into ``trainer_state.json`` with the file's keys in their order, and
    comes back whole from a file as earlier versions wrote it (no ``bad_steps`` before those were counted):
    counters, and the sampler at the position that deals the same next batch."""
    import json
    from dataclasses import asdict

    from ted_ds.checkpoint import TrainerState, read_record
    from ted_ds.data import ConsumedSamplesSampler

    sampler = lambda: ConsumedSamplesSampler(64, 4, 2, 0, 2, seed=3)
    trained = TrainerState(sampler(), step=6, tokens=6 * 512, bad_steps=1, bad_in_a_row=1)
    for _ in range(6):
        trained.sampler.next_batch()
    record = asdict(trained.record({"recipe": "distill-kd"}, {"config": {}}, 2, "step-00000006"))
    assert list(record) == ["step", "tokens", "sampler", "identity", "run", "world_size", "tag", "bad_steps"]
    assert record["sampler"]["consumed_samples"] == 24 and record["bad_steps"] == 1
    (tmp_path / "trainer_state.json").write_text(json.dumps({k: v for k, v in record.items() if k != "bad_steps"}))
    resumed = TrainerState(sampler(), bad_in_a_row=2)
    resumed.restore(read_record(str(tmp_path)))
    assert (resumed.step, resumed.tokens, resumed.bad_steps, resumed.bad_in_a_row) == (6, 6 * 512, 0, 0)
    assert resumed.sampler.next_batch() == trained.sampler.next_batch()


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


class _Engine:
    """What ``Checkpointer.save`` uses of a DeepSpeed engine: its module, and a save that writes this
    rank's shard through its ``checkpoint_engine``, as DeepSpeed's does."""

    def __init__(self, rank: int):
        from types import SimpleNamespace

        self.rank, self.module = rank, torch.nn.Linear(2, 2)
        self.checkpoint_engine = SimpleNamespace(save=torch.save)

    def save_checkpoint(self, save_dir: str, tag: str, save_latest: bool) -> None:
        import os

        os.makedirs(os.path.join(save_dir, tag), exist_ok=True)
        self.checkpoint_engine.save({"shard": torch.zeros(100 * (self.rank + 1))},
                                    os.path.join(save_dir, tag, f"zero_pp_rank_{self.rank}_model_states.pt"))


def _save_with_a_stale_listing(rank: int, port: int, ckpt_dir: str) -> None:
    """One of 2 gloo ranks saves; rank 0's view of the directory lacks rank 1's files, as an NFS
    client's cached listing can just after another node wrote them."""
    import datetime
    import os

    import torch.distributed as dist

    from ted_ds.checkpoint import Checkpointer, TrainerState
    from ted_ds.data import ConsumedSamplesSampler

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    if rank == 0:
        walk, listdir = os.walk, os.listdir
        os.listdir = lambda path=".": [n for n in listdir(path) if "rank_1" not in n and "rank1" not in n]
        os.walk = lambda top, **kw: ((d, sub, [n for n in files if "rank_1" not in n and "rank1" not in n])
                                     for d, sub, files in walk(top, **kw))
    Checkpointer(ckpt_dir, 2, {}).save(_Engine(rank), TrainerState(ConsumedSamplesSampler(8, 4, 2, rank, 2, 0), step=3))
    dist.destroy_process_group()


def test_complete_records_what_every_rank_wrote_not_what_rank_0_lists(tmp_path):
    """``COMPLETE`` holds every rank's files with their sizes, reported by the rank that wrote them:
    rank 0's listing of the directory (stale for rank 1's files here) is not asked."""
    import json
    import os

    import torch.multiprocessing as mp

    from ted_ds.checkpoint import is_complete
    from ted_ds.distributed import free_port

    mp.start_processes(_save_with_a_stale_listing, args=(free_port(), str(tmp_path)), nprocs=2, start_method="spawn")
    tag = tmp_path / "step-00000003"
    files = json.loads((tag / "COMPLETE").read_text())["files"]
    assert sorted(files) == ["rng_rank0.pt", "rng_rank1.pt", "trainer_state.json", "zero_pp_rank_0_model_states.pt",
                             "zero_pp_rank_1_model_states.pt"]
    assert files["zero_pp_rank_1_model_states.pt"] == os.path.getsize(tag / "zero_pp_rank_1_model_states.pt")
    assert is_complete(str(tag)) is None and (tmp_path / "latest").read_text() == "step-00000003"
    (tag / "zero_pp_rank_1_model_states.pt").unlink()
    assert is_complete(str(tag)) == "missing file zero_pp_rank_1_model_states.pt"


def _resume_from_node_local_disks(rank: int, port: int, root: str, outcomes) -> None:
    """One of 2 gloo ranks resumes the trainer from a ``train.out_dir`` of its own (a node-local disk):
    rank 0's holds a checkpoint, rank 1's none."""
    import datetime
    import os
    from types import SimpleNamespace

    import torch.distributed as dist

    from ted_ds.checkpoint import Checkpointer
    from ted_ds.errors import CheckpointError
    from ted_ds.trainer import resume

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=30))
    try:
        tag = resume(SimpleNamespace(engine=None), Checkpointer(os.path.join(root, f"disk{rank}"), 2, {}), None)
        outcomes.put((rank, f"resumed from {tag}"))
    except CheckpointError as e:
        outcomes.put((rank, str(e)))
    except Exception as e:  # noqa: BLE001 — reported to the test, which names it
        outcomes.put((rank, f"{type(e).__name__}: {e}"[:200]))


@pytest.mark.multirank
def test_ranks_that_see_different_checkpoints_refuse_to_resume_together(tmp_path):
    """The trainer's resume compares every rank's view in one gather: a rank that sees no checkpoint
    where another sees one stops both with one line (alone, one would load weights the other never
    has, the other start over)."""
    import torch.multiprocessing as mp

    from harness.common import empty_checkpoint
    from ted_ds.distributed import free_port

    empty_checkpoint(tmp_path / "disk0", 2)
    (tmp_path / "disk1").mkdir()
    outcomes = mp.get_context("spawn").Queue()
    mp.start_processes(_resume_from_node_local_disks, args=(free_port(), str(tmp_path), outcomes), nprocs=2,
                       start_method="spawn")
    seen = dict(outcomes.get(timeout=5) for _ in range(2))
    for rank in (0, 1):
        assert seen[rank].startswith(str(tmp_path / f"disk{rank}")) and "cannot see checkpoint step-00000002, which " \
            "" in seen[rank] and seen[rank].endswith("train.out_dir must be on storage every node shares"), seen
