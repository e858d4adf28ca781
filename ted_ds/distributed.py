"""Process-group set-up for every launcher, and the few collectives the trainer needs.

Launchers and what they give us:

* ``deepspeed`` / ``torchrun``: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT.
* ``mpirun``: OMPI_COMM_WORLD_* (MPICH: PMI_*, MPI_LOCALRANKID); ``init`` fills RANK, WORLD_SIZE,
  LOCAL_RANK and, unless exported, MASTER_ADDR / MASTER_PORT (rank 0's, through mpi4py) itself, so
  DeepSpeed's MPI discovery, which would reset MASTER_PORT to 29500, never runs.
* ``srun``: SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID (they win over the PMI_* / PMIX_* variables of
  srun's MPI plugins); the master is the job's first host.
* nothing (plain ``ted-ds ...``): one process, a free local port.

Each rank drives GPU ``local rank % visible GPUs`` (``gpu_index``), chosen from these variables
before anything touches CUDA: one GPU visible per rank (srun --gpus-per-task=1, a wrapper setting
CUDA_VISIBLE_DEVICES) is GPU 0 of each.  Once the group exists the ranks compare their devices'
UUIDs and refuse two ranks of a host on one device.  ``init`` hands the index to DeepSpeed as
LOCAL_RANK, which DeepSpeed takes for the device index.  Every collective runs under the timeout
given to ``init`` so a dead peer ends the job with an error instead of a hang.
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
from collections.abc import Callable, Mapping

import torch
import torch.distributed as dist

from ted_ds.errors import DeviceError, DistributedError
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


def srun_task(env: Mapping[str, str]) -> bool:
    """Whether ``srun`` started this process as one task of several.  srun's MPI plugins (PMI2, PMIx)
    also set PMI_RANK / PMIX_RANK, equal to SLURM_PROCID; an MPI launcher inside a Slurm allocation
    (Open MPI's mpirun, MPICH's hydra) starts its ranks from srun-started daemons, whose SLURM_PROCID
    numbers the daemons, not the ranks: Open MPI's OMPI_COMM_WORLD_* or a PMI rank that disagrees
    says so."""
    if "SLURM_PROCID" not in env or int(env.get("SLURM_NTASKS", "1")) <= 1 or "OMPI_COMM_WORLD_SIZE" in env:
        return False
    return all(env.get(key, env["SLURM_PROCID"]) == env["SLURM_PROCID"] for key in ("PMI_RANK", "PMIX_RANK")) \
        and env.get("PMI_SIZE", env["SLURM_NTASKS"]) == env["SLURM_NTASKS"]


def mpi_fill(env: Mapping[str, str]) -> dict[str, str]:
    """RANK / WORLD_SIZE / LOCAL_RANK of an MPI launcher's rank (Open MPI: OMPI_COMM_WORLD_*; MPICH and
    Intel MPI: PMI_* and MPI_LOCALRANKID); a local rank the variables do not give, and the master, are
    left to ``mpi_discovered``."""
    ompi = "OMPI_COMM_WORLD_SIZE" in env
    fill = {"RANK": env["OMPI_COMM_WORLD_RANK" if ompi else "PMI_RANK"],
            "WORLD_SIZE": env["OMPI_COMM_WORLD_SIZE" if ompi else "PMI_SIZE"]}
    local = env.get("OMPI_COMM_WORLD_LOCAL_RANK" if ompi else "MPI_LOCALRANKID")
    if local is not None:
        fill["LOCAL_RANK"] = local
    return fill


def launcher_env(env: Mapping[str, str] | None = None) -> tuple[str, dict[str, str]]:
    """Which launcher started us, and the torch.distributed variables it left for us to fill.

    In this order: deepspeed / torchrun (RANK and WORLD_SIZE set), srun (``srun_task``, PMI2 and PMIx
    included), an MPI launcher (with or without Slurm around it), one process.  Pure: reads ``env``
    (default ``os.environ``) and writes nothing; ``init`` writes the fill, so a run that fails its
    checks leaves the environment as it found it.
    """
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        return "torch", {}
    if srun_task(env):
        fill = {"RANK": env["SLURM_PROCID"], "WORLD_SIZE": env["SLURM_NTASKS"],
                "LOCAL_RANK": env.get("SLURM_LOCALID", "0")}
        if "MASTER_ADDR" not in env:
            fill["MASTER_ADDR"] = _first_slurm_host()
        if "MASTER_PORT" not in env:
            fill["MASTER_PORT"] = str(29500 + int(env.get("SLURM_JOB_ID", "0")) % 20000)
        return "slurm", fill
    if "OMPI_COMM_WORLD_SIZE" in env or "PMI_SIZE" in env:
        return "mpi", mpi_fill(env)
    fill = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}
    if "MASTER_ADDR" not in env:
        fill["MASTER_ADDR"] = "127.0.0.1"
    if "MASTER_PORT" not in env:
        fill["MASTER_PORT"] = str(free_port())
    return "single", fill


def mpi_discovered(fill: dict[str, str], env: Mapping[str, str] | None = None) -> dict[str, str]:
    """What an MPI launch's variables leave open, from MPI itself (mpi4py): the local rank (ranks
    before this one on its host) and rank 0's address and a free port of it, broadcast.  A
    MASTER_ADDR / MASTER_PORT the user exported (``mpirun -x``) holds: DeepSpeed's own discovery
    would replace the port with 29500, so ``init`` fills all five variables and skips it."""
    env = os.environ if env is None else env
    needed = [key for key in ("LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if key not in fill and key not in env]
    if not needed:
        return {}
    try:
        from mpi4py import MPI
    except ImportError:
        raise DistributedError(f"an MPI launch without {', '.join(needed)} needs mpi4py to find them: pip install "
                               "mpi4py, or export them (mpirun -x MASTER_ADDR=<rank 0's host> -x MASTER_PORT=<p>)"
                               ) from None

    comm = MPI.COMM_WORLD
    hosts = comm.allgather(MPI.Get_processor_name())
    master = comm.bcast((_own_address(), str(free_port())) if comm.Get_rank() == 0 else None, root=0)
    found = {"LOCAL_RANK": str(hosts[:comm.Get_rank()].count(hosts[comm.Get_rank()])),
             "MASTER_ADDR": master[0], "MASTER_PORT": master[1]}
    return {key: found[key] for key in needed}


def _own_address() -> str:
    """This host's first address (``hostname -I``, as DeepSpeed's MPI discovery takes it)."""
    try:
        return subprocess.run(["hostname", "-I"], capture_output=True, text=True, timeout=30,
                              check=True).stdout.split()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return socket.gethostbyname(socket.gethostname())


def expected_world_size(env: Mapping[str, str] | None = None) -> int:
    """World size from the launcher's environment, before the process group exists."""
    env = os.environ if env is None else env
    env = {**env, **launcher_env(env)[1]}
    for key in ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"):
        if key in env:
            return int(env[key])
    return 1


def slurm_tasks_on_node(spec: str, node: int) -> int:
    """Tasks on node ``node`` from SLURM's compressed count list ("8(x2),4": 8, 8 and 4 tasks)."""
    counts = []
    for part in spec.split(","):
        tasks, _, repeat = part.partition("(x")
        counts += [int(tasks)] * int(repeat.rstrip(")") or 1)
    return counts[node]


def local_world_size(env: Mapping[str, str] | None = None) -> int:
    """Ranks on this host, from the launcher's environment."""
    env = os.environ if env is None else env
    for key in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS",
                "SLURM_NTASKS_PER_NODE"):
        if env.get(key, "").isdigit():
            return int(env[key])
    spec = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
    if spec and "SLURM_PROCID" in env:
        return slurm_tasks_on_node(spec, int(env.get("SLURM_NODEID", "0")))
    return expected_world_size(env)


def gpu_index(local_rank: int, visible: int) -> int:
    """The GPU, among the ``visible`` ones, that local rank ``local_rank`` drives: ``local_rank %
    visible``.  With one GPU visible per rank (srun --gpus-per-task=1, or an mpirun wrapper setting
    CUDA_VISIBLE_DEVICES=$OMPI_COMM_WORLD_LOCAL_RANK) that is GPU 0 of each, under any launcher;
    whether ranks really got devices of their own is known only by comparing them (``shared_device``)."""
    if visible < 1:
        raise DeviceError("no GPU visible to this rank: check CUDA_VISIBLE_DEVICES, or DS_ACCELERATOR=cpu for CPU")
    return local_rank % visible


def gpu_for(env: Mapping[str, str], visible: int) -> int:
    """This rank's GPU index from its launcher's variables (``env``) and the GPUs it sees (pure)."""
    env = {**env, **launcher_env(env)[1]}
    return gpu_index(int(env.get("LOCAL_RANK", "0")), visible)


def shared_device(devices: list[tuple[str, str]]) -> str | None:
    """Given every rank's ``(host, device UUID)`` in rank order, one line naming ranks of a host that
    drive the same device (NCCL refuses two ranks on one device), or None."""
    first: dict[tuple[str, str], int] = {}
    for r, device_ in enumerate(devices):
        if device_ in first:
            return (f"ranks {first[device_]} and {r} on {device_[0]} would share GPU {device_[1]}, which NCCL "
                    "refuses: start one rank per GPU (deepspeed --num_gpus, torchrun --nproc_per_node, srun "
                    "--ntasks-per-node) or give each rank its own (srun --gpus-per-task=1, CUDA_VISIBLE_DEVICES)")
        first[device_] = r
    return None


def _refuse_shared_devices(gpu: int) -> None:
    """Every rank's device, compared once the group exists, over a gloo group: an NCCL collective
    between two ranks on one device fails with NCCL's own, less clear, error."""
    if world_size() == 1:
        return
    uuid = str(getattr(torch.cuda.get_device_properties(gpu), "uuid", gpu))
    group = dist.new_group(backend="gloo")
    devices: list = [None] * world_size()
    dist.all_gather_object(devices, (socket.gethostname(), uuid), group=group)
    dist.destroy_process_group(group)
    problem = shared_device(devices)
    if problem:
        raise DeviceError(problem)


_STARTED = False
_GPU: int | None = None  # this rank's GPU, once init has chosen it


def started() -> bool:
    """Whether this process ever started a process group (it may be destroyed by now)."""
    return _STARTED


def init(timeout_minutes: float) -> None:
    """Start the process group (gloo on CPU, NCCL on CUDA: DeepSpeed's accelerator decides)."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    global _STARTED, _GPU
    _STARTED = True
    if dist.is_initialized():
        return
    launcher, fill = launcher_env()
    if launcher == "mpi":
        fill.update(mpi_discovered(fill))
    acc = get_accelerator()
    if acc.device_name() != "cpu":
        _GPU = gpu_for({**os.environ, **fill}, acc.device_count())
        fill["LOCAL_RANK"] = str(_GPU)  # DeepSpeed reads LOCAL_RANK as the device index (engine, zero.Init)
        acc.set_device(_GPU)
    os.environ.update(fill)
    use_cpu_keyed_extensions()  # the shared-memory communicator is compiled (or reused) in init_distributed
    # all five variables are set: DeepSpeed's MPI discovery, which would reset MASTER_PORT, stays off
    deepspeed.init_distributed(timeout=datetime.timedelta(minutes=timeout_minutes), verbose=False,
                               auto_mpi_discovery=False)
    if acc.device_name() == "cuda":
        _refuse_shared_devices(_GPU)
    if acc.device_name() != "cpu":
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


def device() -> torch.device:
    """This rank's device: the CPU, or its GPU (before ``init``: the one ``init`` will choose)."""
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    if acc.device_name() == "cpu":
        return torch.device("cpu")
    return torch.device(acc.device_name(), _GPU if _GPU is not None else gpu_for(os.environ, acc.device_count()))


def synchronize(where: torch.device | str | None = None) -> None:
    """Wait until ``where`` (default: this rank's device) has run all the work queued on it.  A timer
    read before that measures how fast the work was queued, not how fast it ran: call this wherever
    a timer stops (at world size 1 too, where ``barrier`` returns at once)."""
    where = device() if where is None else torch.device(where)
    if where.type == "cuda":
        torch.cuda.synchronize(where)
    elif where.type != "cpu":  # another accelerator: through DeepSpeed's interface to it
        from deepspeed.accelerator import get_accelerator

        get_accelerator().synchronize(where.index)


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


def gather_objects(obj) -> list:
    """``obj`` of every rank, in rank order (one collective; none at world size 1)."""
    if world_size() == 1:
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def rank0_alone(work: Callable[[], None], timeout: datetime.timedelta) -> None:
    """Run ``work`` on rank 0 while the other ranks wait for it up to ``timeout``, however much longer
    than the collective timeout (``init``) that is: work one rank does alone, such as converting a
    checkpoint, grows with the model, and no collective timeout was chosen for it.

    The others wait in a barrier of a gloo group made for it, because only a group's own timeout can
    be longer (NCCL's barrier takes none, and the NCCL watchdog ends a collective at the group's
    timeout).  If rank 0 dies, its sockets close and the wait ends at once, with an error."""
    group = dist.new_group(backend="gloo", timeout=timeout) if world_size() > 1 else None
    if rank() == 0:
        work()
    if group is not None:
        dist.barrier(group=group)
        dist.destroy_process_group(group)


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
