"""The process-group helpers, without a GPU: a communication failure named by its collective and
caller; each rank's GPU under every launcher (pure functions of the launcher's variables); rank 0
working alone for longer than the collective timeout."""

from __future__ import annotations

import pytest


def test_a_communication_failure_is_named_by_its_collective_and_caller():
    from ted_ds.distributed import failed_collective

    c10d = "/site-packages/torch/distributed/distributed_c10d.py"
    namespace: dict = {}
    exec(compile("def all_gather_into_tensor():\n    raise RuntimeError('Timed out waiting 30000ms for recv')\n",
                 c10d, "exec"), namespace)

    def gather_params():  # a caller, as DeepSpeed's or ours would be
        namespace["all_gather_into_tensor"]()

    def raised(fn):
        try:
            fn()
        except RuntimeError as e:
            return e

    name = failed_collective(raised(gather_params))
    assert name.startswith("all_gather_into_tensor (called by ") and name.endswith(".gather_params)"), name

    def wait_on_handle():
        raise RuntimeError("[gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:1234")

    assert failed_collective(raised(wait_on_handle)).startswith("wait() of an asynchronous collective (called by ")

    def not_comm():
        raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")

    assert failed_collective(raised(not_comm)) is None


# What each launcher sets for local rank ``r`` of node 1 of a 2-node job with 8 ranks per node.
LAUNCHERS = {
    "deepspeed": lambda r: {"RANK": str(8 + r), "WORLD_SIZE": "16", "LOCAL_RANK": str(r), "LOCAL_SIZE": "8",
                            "CROSS_RANK": "1", "CROSS_SIZE": "2", "MASTER_ADDR": "node0", "MASTER_PORT": "29500"},
    "torchrun": lambda r: {"RANK": str(8 + r), "WORLD_SIZE": "16", "LOCAL_RANK": str(r), "LOCAL_WORLD_SIZE": "8",
                           "GROUP_RANK": "1", "MASTER_ADDR": "node0", "MASTER_PORT": "29500"},
    "srun": lambda r: {"SLURM_PROCID": str(8 + r), "SLURM_NTASKS": "16", "SLURM_LOCALID": str(r), "SLURM_NODEID": "1",
                       "SLURM_STEP_TASKS_PER_NODE": "8(x2)", "SLURM_GPUS_ON_NODE": "8", "SLURM_JOB_ID": "7",
                       "MASTER_ADDR": "node0", "MASTER_PORT": "29500"},  # slurm/ted_ds.sbatch sets the master
    "mpirun": lambda r: {"OMPI_COMM_WORLD_SIZE": "16", "OMPI_COMM_WORLD_RANK": str(8 + r),
                         "OMPI_COMM_WORLD_LOCAL_RANK": str(r), "OMPI_COMM_WORLD_LOCAL_SIZE": "8"},
    "mpirun (MPICH)": lambda r: {"PMI_SIZE": "16", "PMI_RANK": str(8 + r), "MPI_LOCALRANKID": str(r),
                                 "MPI_LOCALNRANKS": "8"},
}


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_eight_gpus_per_node_give_each_local_rank_its_own(launcher):
    from ted_ds.distributed import gpu_for, local_world_size

    env = LAUNCHERS[launcher]
    assert [gpu_for(env(r), visible=8) for r in range(8)] == list(range(8))
    assert local_world_size(env(3)) == 8


def test_one_gpu_per_srun_task_is_gpu_0_of_each_task():
    """srun --gpus-per-task=1: every task sees one GPU of its own (CUDA_VISIBLE_DEVICES of length 1)
    while SLURM_LOCALID runs to 7; so does --gpus-per-task=2 with 4 tasks per node."""
    from ted_ds.distributed import gpu_for

    assert [gpu_for(LAUNCHERS["srun"](r), visible=1) for r in range(8)] == [0] * 8
    four = {"SLURM_STEP_TASKS_PER_NODE": "4(x2)"}
    assert [gpu_for({**LAUNCHERS["srun"](r), **four}, visible=2) for r in range(4)] == [0, 1, 0, 1]


@pytest.mark.parametrize("launcher", ["deepspeed", "torchrun", "mpirun", "mpirun (MPICH)", "srun unbound"])
def test_ranks_that_would_share_a_gpu_are_refused_in_one_line(launcher):
    """One GPU seen by 8 ranks that all see the same one (every launcher but a bound srun; srun with
    --gpus-per-node=1 and 8 tasks): NCCL would refuse the pair at its first collective."""
    from ted_ds.distributed import gpu_for
    from ted_ds.errors import DeviceError

    env = {**LAUNCHERS["srun"](3), "SLURM_GPUS_ON_NODE": "1"} if launcher == "srun unbound" else LAUNCHERS[launcher](3)
    with pytest.raises(DeviceError, match="8 ranks on this host but 1 GPU visible to each: .*NCCL refuses") as e:
        gpu_for(env, visible=1)
    assert "\n" not in str(e.value)


def test_one_process_drives_gpu_0_and_the_environment_is_left_alone():
    import os

    from ted_ds.distributed import gpu_for

    before = dict(os.environ)
    assert gpu_for({}, visible=8) == 0
    assert gpu_for(LAUNCHERS["srun"](5), visible=1) == 0
    assert dict(os.environ) == before


def test_slurm_task_counts_per_node():
    from ted_ds.distributed import local_world_size, slurm_tasks_on_node

    assert [slurm_tasks_on_node("8(x2),4", n) for n in range(3)] == [8, 8, 4]
    assert slurm_tasks_on_node("3,5", 1) == 5
    env = {**LAUNCHERS["srun"](0), "SLURM_STEP_TASKS_PER_NODE": "8,6", "SLURM_NODEID": "1"}
    assert local_world_size(env) == 6
    assert local_world_size({**env, "SLURM_NTASKS_PER_NODE": "4"}) == 4  # --ntasks-per-node, when given


def _rank0_works_longer_than_the_timeout(rank: int, port: int, outcomes) -> None:
    """One of 2 gloo ranks with a 2 s collective timeout: rank 0 works 4 s while rank 1 waits, first
    in ``rank0_alone`` (60 s), then in a plain barrier."""
    import datetime
    import time

    import torch.distributed as dist

    from ted_ds import distributed

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=2))

    def work() -> None:
        time.sleep(4)

    for name, wait in (("rank0_alone", lambda: distributed.rank0_alone(work, datetime.timedelta(seconds=60))),
                       ("barrier", lambda: (work() if rank == 0 else None, distributed.barrier()))):
        try:
            wait()
            outcomes.put((rank, name, "waited"))
        except RuntimeError as e:
            outcomes.put((rank, name, "timed out" if "Timed out" in str(e) else str(e)[:200]))


def test_ranks_wait_for_rank0_working_alone_beyond_the_collective_timeout():
    """What a resume on another rank count does (rank 0 converts the checkpoint): the others outwait
    the collective timeout in ``rank0_alone``, where a plain barrier times out (the control)."""
    import torch.multiprocessing as mp

    from ted_ds.distributed import free_port

    ctx = mp.get_context("spawn")
    outcomes = ctx.Queue()
    mp.start_processes(_rank0_works_longer_than_the_timeout, args=(free_port(), outcomes), nprocs=2,
                       start_method="spawn")
    seen = {(rank, name): outcome for rank, name, outcome in (outcomes.get(timeout=5) for _ in range(4))}
    assert seen[(0, "rank0_alone")] == seen[(1, "rank0_alone")] == "waited", seen
    assert seen[(1, "barrier")] == "timed out", seen
