"""The process-group helpers, without a GPU: a communication failure named by its collective and
caller; each rank's rank, world and GPU under every launcher (pure functions of the launcher's
variables) and the refusal of ranks sharing a device; rank 0 working alone (a conversion, the export
of ``train.init_from``) for longer than the collective timeout."""

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


# What each launcher sets for local rank ``r`` of node 1 of a 2-node job with 6 ranks on each 8-GPU
# node (global rank 6 + r: local and global rank differ modulo the GPUs a rank sees, 8 or 1).
def _srun(r):
    return {"SLURM_PROCID": str(6 + r), "SLURM_NTASKS": "12", "SLURM_LOCALID": str(r), "SLURM_NODEID": "1",
            "SLURM_STEP_TASKS_PER_NODE": "6(x2)", "SLURM_GPUS_ON_NODE": "8", "SLURM_JOB_ID": "7",
            "MASTER_ADDR": "node0", "MASTER_PORT": "29507"}  # slurm/ted_ds.sbatch sets the master


def _open_mpi(r):
    return {"OMPI_COMM_WORLD_SIZE": "12", "OMPI_COMM_WORLD_RANK": str(6 + r), "OMPI_COMM_WORLD_LOCAL_RANK": str(r),
            "OMPI_COMM_WORLD_LOCAL_SIZE": "6", "OMPI_COMM_WORLD_NODE_RANK": "1", "MASTER_PORT": "29600"}


def _mpich(r):
    return {"PMI_SIZE": "12", "PMI_RANK": str(6 + r), "MPI_LOCALRANKID": str(r), "MPI_LOCALNRANKS": "6",
            "MASTER_PORT": "29600"}


# an MPI launcher inside a Slurm allocation starts its ranks from daemons srun started, one per node:
# the ranks inherit the daemon's SLURM_PROCID (the node's index) and SLURM_NTASKS (the node count)
_SLURM_DAEMON = {"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_LOCALID": "0", "SLURM_NODEID": "1",
                 "SLURM_JOB_ID": "7", "SLURM_GPUS_ON_NODE": "8"}
LAUNCHERS = {
    "deepspeed": lambda r: {"RANK": str(6 + r), "WORLD_SIZE": "12", "LOCAL_RANK": str(r), "LOCAL_SIZE": "6",
                            "CROSS_RANK": "1", "CROSS_SIZE": "2", "MASTER_ADDR": "node0", "MASTER_PORT": "29500"},
    "torchrun": lambda r: {"RANK": str(6 + r), "WORLD_SIZE": "12", "LOCAL_RANK": str(r), "LOCAL_WORLD_SIZE": "6",
                           "GROUP_RANK": "1", "MASTER_ADDR": "node0", "MASTER_PORT": "29500"},
    "srun": _srun,
    "srun --mpi=pmi2": lambda r: {**_srun(r), "PMI_RANK": str(6 + r), "PMI_SIZE": "12", "PMI_FD": "9",
                                  "PMI_JOBID": "7.0"},
    "srun --mpi=pmix": lambda r: {**_srun(r), "PMIX_RANK": str(6 + r), "PMIX_NAMESPACE": "slurm.pmix.7.0",
                                  "PMIX_SERVER_URI2": "pmix-server.1;tcp4://10.0.0.2:4711"},
    "mpirun (Open MPI)": _open_mpi,
    "mpirun (Open MPI) in Slurm": lambda r: {**_SLURM_DAEMON, **_open_mpi(r)},
    "mpirun (MPICH)": _mpich,
    "mpirun (MPICH) in Slurm": lambda r: {**_SLURM_DAEMON, **_mpich(r), "PMI_FD": "9"},
}


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_each_launcher_gives_each_rank_its_rank_world_and_gpu(launcher):
    """All 8 GPUs visible to each rank: local rank i drives GPU i, whatever the launcher (global rank
    mod 8 would give 6, 7, 0...); srun's task wins over the PMI2/PMIx variables its plugin sets, an
    MPI launcher's ranks over the Slurm daemon they came from; a MASTER_PORT given holds."""
    from ted_ds.distributed import gpu_for, launcher_env, local_world_size

    env = LAUNCHERS[launcher]
    assert [gpu_for(env(r), visible=8) for r in range(6)] == list(range(6))
    full = {**env(3), **launcher_env(env(3))[1]}
    assert (full["RANK"], full["WORLD_SIZE"], full["LOCAL_RANK"]) == ("9", "12", "3")
    assert full.get("MASTER_PORT") == env(3)["MASTER_PORT"]
    assert local_world_size(env(3)) == 6


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_one_visible_gpu_per_rank_is_gpu_0_under_every_launcher(launcher):
    """srun --gpus-per-task=1, or an MPI/torchrun wrapper setting CUDA_VISIBLE_DEVICES to the local
    rank: each rank sees one GPU of its own while the local rank runs to 5; so does
    --gpus-per-task=2 (two visible, ranks alternate between them)."""
    from ted_ds.distributed import gpu_for

    env = LAUNCHERS[launcher]
    assert [gpu_for(env(r), visible=1) for r in range(6)] == [0] * 6
    assert [gpu_for(env(r), visible=2) for r in range(4)] == [0, 1, 0, 1]


def test_the_mpi_launchers_fill_what_deepspeed_would_otherwise_discover():
    """An MPI launch fills RANK, WORLD_SIZE and LOCAL_RANK itself (DeepSpeed's discovery would reset
    LOCAL_RANK to the host's count and MASTER_PORT to 29500); what the variables do not give (the
    master, MPICH without a local rank) is left for ``mpi_discovered`` to ask MPI."""
    from ted_ds.distributed import launcher_env

    open_mpi = {k: v for k, v in _open_mpi(2).items() if k != "MASTER_PORT"}
    assert launcher_env(open_mpi) == ("mpi", {"RANK": "8", "WORLD_SIZE": "12", "LOCAL_RANK": "2"})
    assert launcher_env({"PMI_SIZE": "4", "PMI_RANK": "3"}) == ("mpi", {"RANK": "3", "WORLD_SIZE": "4"})
    assert launcher_env(LAUNCHERS["srun --mpi=pmi2"](2))[0] == "slurm"
    assert launcher_env(LAUNCHERS["mpirun (MPICH) in Slurm"](2))[0] == "mpi"


def test_ranks_that_share_a_device_are_named_in_one_line():
    """Every rank's (host, device UUID), gathered once the group exists: two ranks of a host on one
    device are refused (8 ranks that all see one GPU, or a wrapper that bound two to the same), the
    same index on two hosts or distinct devices are not."""
    from ted_ds.distributed import shared_device

    assert shared_device([("node0", f"GPU-{i}") for i in range(4)] + [("node1", f"GPU-{i}") for i in range(4)]) is None
    problem = shared_device([("node0", "GPU-a"), ("node0", "GPU-b"), ("node1", "GPU-c"), ("node1", "GPU-c")])
    assert problem.startswith("ranks 2 and 3 on node1 would share GPU GPU-c, which NCCL refuses: ")
    assert "\n" not in problem


def test_one_process_drives_gpu_0_and_the_environment_is_left_alone():
    import os

    from ted_ds.distributed import gpu_for
    from ted_ds.errors import DeviceError

    before = dict(os.environ)
    assert gpu_for({}, visible=8) == 0
    assert gpu_for(LAUNCHERS["srun"](5), visible=1) == 0
    assert dict(os.environ) == before
    with pytest.raises(DeviceError, match="no GPU visible to this rank"):
        gpu_for({}, visible=0)


def test_slurm_task_counts_per_node():
    from ted_ds.distributed import local_world_size, slurm_tasks_on_node

    assert [slurm_tasks_on_node("8(x2),4", n) for n in range(3)] == [8, 8, 4]
    assert slurm_tasks_on_node("3,5", 1) == 5
    env = {**LAUNCHERS["srun"](0), "SLURM_STEP_TASKS_PER_NODE": "8,6", "SLURM_NODEID": "1"}
    assert local_world_size(env) == 6
    assert local_world_size({**env, "SLURM_NTASKS_PER_NODE": "4"}) == 4  # --ntasks-per-node, when given


def _slow_export(path: str, out: str) -> list[str]:
    """``export_checkpoint`` of a student too big to export within the collective timeout (4 s)."""
    import os
    import time

    time.sleep(4)
    os.makedirs(out)
    with open(os.path.join(out, "config.json"), "w") as f:
        f.write("{}")
    return [f"wrote {out} from {os.path.basename(path)}"]


def _rank0_works_longer_than_the_timeout(rank: int, port: int, run_dir: str, outcomes) -> None:
    """One of 2 gloo ranks with a 2 s collective timeout: rank 0 works 4 s while rank 1 waits, first
    in ``rank0_alone`` (60 s), then in ``train.init_from``'s export of a checkpoint, then in a plain
    barrier."""
    import datetime
    import time
    from types import SimpleNamespace

    import torch.distributed as dist

    from ted_ds import distributed, export
    from ted_ds.models import init_from_hf_dir

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=2))

    def work() -> None:
        time.sleep(4)

    export.export_checkpoint = _slow_export
    cfg = SimpleNamespace(train=SimpleNamespace(init_from=f"{run_dir}/checkpoints/distill-lm", out_dir=run_dir))
    for name, wait in (("rank0_alone", lambda: distributed.rank0_alone(work, datetime.timedelta(seconds=60))),
                       ("init_from", lambda: init_from_hf_dir(cfg)),
                       ("barrier", lambda: (work() if rank == 0 else None, distributed.barrier()))):
        try:
            wait()
            outcomes.put((rank, name, "waited"))
        except RuntimeError as e:
            outcomes.put((rank, name, "timed out" if "Timed out" in str(e) else str(e)[:200]))


def test_ranks_wait_for_rank0_working_alone_beyond_the_collective_timeout(tmp_path):
    """What a resume on another rank count does (rank 0 converts the checkpoint), and a run started
    from another run's checkpoint (``train.init_from``: rank 0 exports its student): the others outwait
    the collective timeout, where a plain barrier times out (the control)."""
    import torch.multiprocessing as mp

    from harness.common import empty_checkpoint
    from ted_ds.distributed import free_port

    empty_checkpoint(tmp_path / "checkpoints" / "distill-lm", 2)
    ctx = mp.get_context("spawn")
    outcomes = ctx.Queue()
    mp.start_processes(_rank0_works_longer_than_the_timeout, args=(free_port(), str(tmp_path), outcomes), nprocs=2,
                       start_method="spawn")
    seen = {(rank, name): outcome for rank, name, outcome in (outcomes.get(timeout=5) for _ in range(6))}
    assert seen[(0, "rank0_alone")] == seen[(1, "rank0_alone")] == "waited", seen
    assert seen[(0, "init_from")] == seen[(1, "init_from")] == "waited", seen
    assert (tmp_path / "init-from-step-00000002" / "config.json").is_file()
    assert seen[(1, "barrier")] == "timed out", seen
