"""``ted-ds launch``: the printed commands, checked against the config. Real launches: test_launchers.py."""

from __future__ import annotations

import pytest

from harness.tiny import base_config, write_config
from ted_ds.cli import main as ted_main


def test_launch_prints_commands_checked_against_the_config(tiny, tmp_path, capsys):
    path = write_config(str(tmp_path / "c.yaml"), **base_config(tiny["llama_data"], tiny["llama_teacher"], "out",
                                                                **{"train.global_batch_size": 32}))
    capsys.readouterr()
    assert ted_main(["launch", "--nodes", "2", "--gpus-per-node", "2", "--hosts", "a,b", "distill", "--config", path,
                     "teacher.placement=pipeline"]) == 0
    out = capsys.readouterr().out
    assert "# 4 ranks: micro-batch 2 × accumulation 4 × 4 ranks = global batch 32; teacher in 2 pipeline groups" in out
    assert "printf 'a slots=2\\nb slots=2\\n' > hostfile" in out
    assert "deepspeed --hostfile hostfile --master_addr a" in out
    assert "sbatch --nodes 2 --ntasks-per-node 2" in out and "COMMAND=distill" in out
    assert "torchrun --nnodes 2 --node_rank 1" in out and "mpirun -np 4 -H a:2,b:2" in out
    assert ted_main(["launch", "--nodes", "3", "--gpus-per-node", "2", "distill", "--config", path]) == 2
    assert "not a multiple of micro_batch_size 2 × 6 ranks" in capsys.readouterr().err


def test_ranks_that_fit_neither_the_batch_nor_the_pipeline_get_both_reasons_at_once(tiny, tmp_path, capsys,
                                                                                    monkeypatch):
    """3 ranks, a 16-sample batch of micro-batches of 2 and a 2-stage pipeline teacher: one refusal names
    both, before any process group — in `ted-ds launch` and in the run itself."""
    path = write_config(str(tmp_path / "c.yaml"), **base_config(tiny["llama_data"], tiny["llama_teacher"], "out",
                                                                **{"teacher.placement": "pipeline"}))
    both = ("not a multiple of micro_batch_size 2 × 3 ranks", "pipeline_stages 2 must divide the number of ranks 3")
    capsys.readouterr()
    assert ted_main(["launch", "--nodes", "3", "--gpus-per-node", "1", "distill", "--config", path]) == 2
    err = capsys.readouterr().err
    assert all(b in err for b in both), err
    for k, v in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "3", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": "29555"}.items():  # rank 0 of 3, as its launcher starts it
        monkeypatch.setenv(k, v)
    assert ted_main(["distill", "--config", path, "distill.method=kd", "train.timeout_minutes=0.2"]) == 2
    err = capsys.readouterr().err
    assert all(b in err for b in both) and err.count("\n") == 1, err


def test_launch_refuses_dry_run_it_always_is_one(tiny, tmp_path, capsys):
    """`launch` never starts anything, so `--dry-run` would change nothing: argparse refuses it."""
    path = write_config(str(tmp_path / "c.yaml"), **base_config(tiny["llama_data"], tiny["llama_teacher"], "out"))
    with pytest.raises(SystemExit) as e:
        ted_main(["launch", "--nodes", "1", "--gpus-per-node", "2", "--dry-run", "distill", "--config", path])
    assert e.value.code == 2 and "unrecognized arguments: --dry-run" in capsys.readouterr().err


@pytest.mark.parametrize("cmdline, launcher", [
    (["/venv/bin/python", "/venv/bin/deepspeed", "--num_gpus", "2", "--module", "ted_ds"], True),
    (["/venv/bin/python", "-u", "-m", "deepspeed.launcher.launch", "--world_info=e30="], True),
    (["/usr/bin/torchrun", "--nproc-per-node", "2", "-m", "ted_ds"], True),
    (["python3", "-m", "torch.distributed.run", "--nproc-per-node", "2"], True),
    (["python", "-m", "pytest", "tests/deepspeed"], False),  # a mere argument named like a launcher
    (["/bin/bash", "-c", "deepspeed --num_gpus 2"], False),  # a shell that started one: not watched
    (["slurmstepd: [12.0]"], False),
])
def test_the_processes_a_rank_watches_are_its_launchers(cmdline, launcher):
    """A rank watches the launchers above it (stop_when_launcher_dies), never a shell or scheduler above them."""
    from ted_ds.trainer import LAUNCHERS, launched_program

    assert (launched_program(cmdline) in LAUNCHERS) is launcher


def test_a_run_in_a_longer_process_gives_back_the_signal_handlers_it_found(tiny, tmp_path):
    """StopSignal takes SIGTERM and SIGUSR1 for the run and restores them when it ends (run_recipe's
    finally, here after a run refused in set-up): a test process or a scenario launch running several
    runs keeps its own handlers."""
    import signal

    from harness.tiny import base_config, write_config
    from ted_ds.config import load_run_config
    from ted_ds.errors import UserError
    from ted_ds.run import run_recipe
    from ted_ds.trainer import StopSignal

    mine = lambda signum, frame: None
    before = {sig: signal.signal(sig, mine) for sig in StopSignal.SIGNALS}
    try:
        stop = StopSignal()
        assert all(signal.getsignal(sig) == stop._handler for sig in StopSignal.SIGNALS)
        signal.raise_signal(signal.SIGUSR1)
        assert stop.received == "SIGUSR1"
        stop.restore()
        assert all(signal.getsignal(sig) is mine for sig in StopSignal.SIGNALS)
        cfg = base_config(tiny["llama_data"], str(tmp_path / "no-teacher"), str(tmp_path / "out"))
        with pytest.raises(UserError):
            run_recipe(load_run_config(write_config(str(tmp_path / "run.yaml"), **cfg)))
        assert all(signal.getsignal(sig) is mine for sig in StopSignal.SIGNALS)
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
