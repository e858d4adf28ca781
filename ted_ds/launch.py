"""``ted-ds launch``: the exact launch commands for a cluster shape, checked against the config.

Prints, for ``--nodes`` × ``--gpus-per-node`` ranks, the command of the chosen launcher (or all of
them), after checking that the run config fits that world size (batch divisibility, pipeline
stages).  Nothing is started.
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys

from ted_ds.config import RunConfig, accumulation_steps, check_pipeline_world
from ted_ds.errors import ConfigError

LAUNCHERS = ("deepspeed", "srun", "torchrun", "mpirun")


def check_world(cfg: RunConfig, world: int, with_teacher: bool = True) -> str:
    """One line describing how the batch splits over ``world`` ranks, or one ConfigError with every reason
    the ranks do not fit (the batch and the pipeline's stages at once, not one per attempt)."""
    mb, gb = cfg.train.micro_batch_size, cfg.train.global_batch_size
    pipeline = with_teacher and cfg.teacher.placement == "pipeline"
    problems = [r for r in (_refusal(accumulation_steps, gb, mb, world),
                            pipeline and _refusal(check_pipeline_world, cfg.teacher.pipeline_stages, world)) if r]
    if problems:
        raise ConfigError("; and ".join(problems))
    accumulation = accumulation_steps(gb, mb, world)
    line = f"{world} ranks: micro-batch {mb} × accumulation {accumulation} × {world} ranks = global batch {gb}"
    if pipeline:
        line += f"; teacher in {world // cfg.teacher.pipeline_stages} pipeline groups of {cfg.teacher.pipeline_stages}"
    return line


def _refusal(check, *args) -> str | None:
    try:
        check(*args)
    except ConfigError as e:
        return str(e)
    return None


def launch_commands(launcher: str, nodes: int, gpus: int, hosts: list[str], command: list[str], port: int,
                    out_dir: str) -> list[str]:
    """The shell lines that start ``command`` (ted-ds arguments) on every rank."""
    args = " ".join(shlex.quote(a) for a in command)
    master = hosts[0]
    if launcher == "deepspeed":
        if nodes == 1:
            return [f"deepspeed --num_gpus {gpus} --master_addr 127.0.0.1 --master_port {port} --module ted_ds {args}"]
        hostfile = "\\n".join(f"{h} slots={gpus}" for h in hosts)
        return [f"printf '{hostfile}\\n' > hostfile",
                f"deepspeed --hostfile hostfile --master_addr {master} --master_port {port} --module ted_ds {args}"]
    if launcher == "torchrun":
        return [f"# on {h}:\ntorchrun --nnodes {nodes} --node_rank {i} --nproc_per_node {gpus} --master_addr {master} "
                f"--master_port {port} -m ted_ds {args}" for i, h in enumerate(hosts)]
    if launcher == "mpirun":
        spec = ",".join(f"{h}:{gpus}" for h in hosts)
        return [f"mpirun -np {nodes * gpus} -H {spec} -x MASTER_PORT={port} python -m ted_ds {args}"]
    if launcher == "srun":
        sub, rest = command[0], command[1:]
        if sub == "learn-filters" and "--model" in rest:
            i = rest.index("--model")
            sub, rest = f"learn-filters --model {rest[i + 1]}", rest[:i] + rest[i + 2:]
        config = rest[rest.index("--config") + 1] if "--config" in rest else ""
        overrides = " ".join(a for a in rest if "=" in a and not a.startswith("-"))
        export = f"ALL,CONFIG={config},OUT_DIR={out_dir},COMMAND={sub}"
        if overrides:
            export += f",OVERRIDES={overrides}"
        return [f"sbatch --nodes {nodes} --ntasks-per-node {gpus} --gpus-per-node {gpus} --output logs/%x-%j.out "
                f"--export {shlex.quote(export)} slurm/ted_ds.sbatch"]
    raise ConfigError(f"unknown launcher {launcher!r} (choose from {', '.join(LAUNCHERS)})")


def local_deepspeed_command(nproc: int, *args: str) -> list[str]:
    """``deepspeed`` with ``nproc`` ranks on this host and a free port (the demo's, the tests' and the
    benches' launch); ``args`` follow the launcher's options (``--module ted_ds ...`` or a script)."""
    from ted_ds.distributed import free_port

    beside = os.path.join(os.path.dirname(sys.executable), "deepspeed")  # this venv's launcher first
    launcher = beside if os.path.isfile(beside) else shutil.which("deepspeed") or "deepspeed"
    return [launcher, "--num_gpus", str(nproc), "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
            *args]
