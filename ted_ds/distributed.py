"""Process-group set-up for every launcher, and the few collectives the trainer needs.

Launchers and what they give us:

* ``deepspeed`` / ``torchrun``: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT.
* ``mpirun``: OMPI_COMM_WORLD_*; DeepSpeed's MPI discovery (mpi4py) fills in the rest.
* ``srun``: SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID; the master is the job's first host.
* nothing (plain ``ted-ds ...``): one process, a free local port.

Every collective runs under the timeout given to ``init`` so a dead peer ends the job with an
error instead of a hang.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import re
import socket
import subprocess
import sys
import traceback

import torch
import torch.distributed as dist

from ted_ds.errors import DistributedError
from ted_ds.host import use_cpu_keyed_extensions


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _first_slurm_host() -> str:
    nodelist = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST", "")
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             timeout=30, check=True).stdout.split()
        return out[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return nodelist.split(",")[0] or "127.0.0.1"


def launcher_env() -> tuple[str, dict[str, str]]:
    """Which launcher started us, and the torch.distributed variables it left for us to fill.

    Pure: nothing is written to ``os.environ`` until ``init``, so a run that fails its checks
    leaves the environment as it found it.
    """
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return "torch", {}
    if "OMPI_COMM_WORLD_SIZE" in env or "PMI_SIZE" in env:
        return "mpi", {}  # deepspeed.init_distributed discovers ranks through mpi4py
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        fill = {"RANK": env["SLURM_PROCID"], "WORLD_SIZE": env["SLURM_NTASKS"],
                "LOCAL_RANK": env.get("SLURM_LOCALID", "0")}
        if "MASTER_ADDR" not in env:
            fill["MASTER_ADDR"] = _first_slurm_host()
        if "MASTER_PORT" not in env:
            fill["MASTER_PORT"] = str(29500 + int(env.get("SLURM_JOB_ID", "0")) % 20000)
        return "slurm", fill
    fill = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}
    if "MASTER_ADDR" not in env:
        fill["MASTER_ADDR"] = "127.0.0.1"
    if "MASTER_PORT" not in env:
        fill["MASTER_PORT"] = str(free_port())
    return "single", fill


def expected_world_size() -> int:
    """World size from the launcher's environment, before the process group exists."""
    env = {**os.environ, **launcher_env()[1]}
    for key in ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"):
        if key in env:
            return int(env[key])
    return 1


def local_world_size() -> int:
    """Ranks on this host, from the launcher's environment."""
    env = os.environ
    for key in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE", "SLURM_NTASKS_PER_NODE"):
        if env.get(key, "").isdigit():
            return int(env[key])
    return expected_world_size()


_STARTED = False


def started() -> bool:
    """Whether this process ever started a process group (it may be destroyed by now)."""
    return _STARTED


def init(timeout_minutes: float) -> None:
    """Start the process group (gloo on CPU, NCCL on CUDA: DeepSpeed's accelerator decides)."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    global _STARTED
    _STARTED = True
    if dist.is_initialized():
        return
    launcher, fill = launcher_env()
    os.environ.update(fill)
    use_cpu_keyed_extensions()  # the shared-memory communicator is compiled (or reused) in init_distributed
    deepspeed.init_distributed(timeout=datetime.timedelta(minutes=timeout_minutes), verbose=False,
                               auto_mpi_discovery=launcher == "mpi")
    acc = get_accelerator()
    if acc.device_name() != "cpu":
        acc.set_device(local_rank())
        _numeric_arch_list()
        return
    _release_shm_workspace()
    if "OMP_NUM_THREADS" not in os.environ:  # ranks on one host share its cores
        torch.set_num_threads(max(1, _usable_cpus() // local_world_size()))


def numeric_arch_list(value: str) -> str:
    """TORCH_CUDA_ARCH_LIST without arch-specific suffixes ("9.0a" -> "9.0", "+PTX" kept)."""
    return re.sub(r"(\d+\.\d+)[a-z]+", r"\1", value)


def _numeric_arch_list() -> None:
    """DeepSpeed's JIT op builder (fused Adam) parses TORCH_CUDA_ARCH_LIST as numbers and fails on
    Hopper images that set "9.0a"; the plain arch builds the same kernels for its ops."""
    value = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if value and numeric_arch_list(value) != value:
        os.environ["TORCH_CUDA_ARCH_LIST"] = numeric_arch_list(value)
        print(f"ted-ds: TORCH_CUDA_ARCH_LIST {value!r} -> {os.environ['TORCH_CUDA_ARCH_LIST']!r} for DeepSpeed's op "
              "builder", file=sys.stderr)


def _usable_cpus() -> int:
    """CPUs this process may run on (a cpuset or taskset can allow fewer than the machine has)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


SHM_WORKSPACE_PREFIX = "deepspeed_allreduce_buffer_"  # DeepSpeed's csrc/cpu/comm/shm.cpp names them so


def shm_workspace_path(rank_: int) -> str:
    """The POSIX shared-memory file DeepSpeed's CPU backend creates for ``rank_`` of this job."""
    name = f"{SHM_WORKSPACE_PREFIX}{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_" \
           f"{os.environ.get('MASTER_PORT', '')}_{rank_}"
    return os.path.join("/dev/shm", name)


def _release_shm_workspace() -> None:
    """DeepSpeed's CPU backend gives every rank a ~69 MB shared-memory workspace (for its
    inference all-reduce) when all ranks share a host, and never removes it: each run would leave
    69 MB per rank in /dev/shm — RAM — until reboot. Every rank maps its peers' workspaces during
    ``init_distributed``; after a barrier the names can go, and the kernel frees the memory when
    the last process exits, however it exits."""
    if world_size() > 1:
        barrier()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(shm_workspace_path(rank()))


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def device() -> torch.device:
    from deepspeed.accelerator import get_accelerator

    name = get_accelerator().device_name()
    return torch.device("cpu") if name == "cpu" else torch.device(name, local_rank())


def all_reduce_mean(values: dict[str, float]) -> dict[str, float]:
    """Mean of each scalar over ranks (one collective for the whole dict)."""
    if world_size() == 1 or not values:
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device())
    dist.all_reduce(t)
    return {k: float(v) / world_size() for k, v in zip(keys, t.tolist())}


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if world_size() > 1:
        dist.all_reduce(t)
    return t


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


# gloo's and NCCL's words for a lost peer, for errors raised by ``Work.wait()`` outside torch.distributed
_COMM_FAILURE = re.compile(r"gloo|nccl|Timed out waiting|Connection (closed|reset) by peer|pair closure", re.I)


def failed_collective(error: BaseException) -> str | None:
    """The collective an error comes from (``all_gather_into_tensor``, ``barrier``…) and the first
    caller outside torch and DeepSpeed's comm layer; None if it is not a communication failure."""
    frames = [(f.f_code.co_filename, f.f_code.co_name) for f, _ in traceback.walk_tb(error.__traceback__)]
    c10d = [i for i, (path, _) in enumerate(frames) if path.endswith(os.path.join("torch", "distributed",
                                                                                 "distributed_c10d.py"))]
    if c10d:
        name, frames = frames[c10d[-1]][1], frames[:c10d[0]]
    elif isinstance(error, dist.DistError) or _COMM_FAILURE.search(str(error)):
        name = "wait() of an asynchronous collective"
    else:
        return None
    callers = [(path, fn) for path, fn in frames if os.sep + "torch" + os.sep not in path
               and os.path.join("deepspeed", "comm") not in path and os.path.join("deepspeed", "utils") not in path]
    if callers:
        path, fn = callers[-1]
        package = "ted_ds" if os.sep + "ted_ds" + os.sep in path else "deepspeed" if "deepspeed" in path else ""
        name += f" (called by {package + '.' if package else ''}{os.path.basename(path)[:-3]}.{fn})"
    return name


@contextlib.contextmanager
def collective_errors(timeout_minutes: float):
    """A collective that times out or loses its peer (gloo and NCCL raise RuntimeError, possibly deep
    inside DeepSpeed's ZeRO-3 gathers) becomes one ``DistributedError`` line naming the collective."""
    try:
        yield
    except RuntimeError as e:
        name = failed_collective(e)
        if name is None:
            raise
        raise DistributedError(f"collective {name} failed: a peer rank is stopped, dead or unreachable "
                               f"(train.timeout_minutes {timeout_minutes:g}; {str(e).strip().splitlines()[0][:160]})"
                               ) from None


def shutdown() -> None:
    """End cleanly: a final barrier, then destroy the group (avoids rare aborts at exit)."""
    if dist.is_initialized():
        try:
            barrier()
        finally:
            dist.destroy_process_group()


def leave(rc: int) -> None:
    """End a process that started a process group, after ``shutdown``: everything is saved and
    flushed, so skip the C++ static destructors, which can abort ("terminate called without an
    active exception") while a gloo or shm communication thread is still joinable."""
    sys.stdout.flush()
    sys.stderr.flush()
    mpi = sys.modules.get("mpi4py.MPI")  # under mpirun, MPI must still be finalized
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
        mpi.Finalize()
    os._exit(rc)
