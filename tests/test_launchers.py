"""Every documented launch path, for real: a local SLURM cluster running the project's sbatch script
(with preemption), `deepspeed --hostfile`, `mpirun` and `torchrun`."""

from __future__ import annotations

import json
import os
import shutil
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from harness.common import REPO, last_launch, losses, needs, record_fault, run_launcher
from harness.netns_hosts import ADDRS, IFNAME, TwoHosts, netns_available
from harness.slurm_cluster import LocalSlurm, slurm_available
from harness.tiny import base_config, write_config

pytestmark = pytest.mark.multirank
SBATCH = os.path.join(REPO, "slurm", "ted_ds.sbatch")


def _config(tiny, path, **over) -> str:
    cfg = base_config(tiny["llama_data"], tiny["llama_teacher"], "unused", **{"distill.method": "lwd", **over})
    return write_config(path, **cfg)


def _metrics(out_dir) -> list[dict]:
    return [json.loads(line) for line in open(os.path.join(out_dir, "metrics.jsonl"))]


def _finished(out_dir, steps) -> None:
    steps_logged = [m["step"] for m in _metrics(out_dir) if "loss/total" in m]
    assert steps_logged == list(range(1, steps + 1))
    assert os.path.isfile(os.path.join(out_dir, "hf", "model.safetensors"))
    assert open(os.path.join(out_dir, "checkpoints", "distill-lwd", "latest")).read().strip() == f"step-{steps:08d}"


def _latest(out_dir):
    path = os.path.join(out_dir, "checkpoints", "distill-lwd", "latest")
    return open(path).read().strip() if os.path.exists(path) else None


@needs(slurm_available(), "root and Debian's slurmctld/slurmd")
def test_slurm_batch_job_preemption_and_time_limit_warning(tiny, tmp_path):
    env = {"PYTHON": sys.executable, "TORCH_EXTENSIONS_DIR": os.environ["TORCH_EXTENSIONS_DIR"],
           "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    shape = ["--nodes", "1", "--ntasks", "2", "--ntasks-per-node", "2", "--cpus-per-task", "1"]
    with LocalSlurm(str(tmp_path / "slurm")) as slurm:
        # 1. a plain 2-task TED distillation job
        out = str(tmp_path / "job")
        job = slurm.submit(SBATCH, *shape, "--output", f"{out}.log",
                           env=dict(env, CONFIG=_config(tiny, str(tmp_path / "a.yaml")), OUT_DIR=out))
        info = slurm.wait(job, timeout=300)
        log = open(f"{out}.log").read()
        assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log[-3000:]
        assert "ted-ds: job" in log and "master" in log and "distill-lwd finished at step 4" in log
        _finished(out, 4)

        # 2. preemption: `scontrol requeue` mid-run -> SIGTERM, save, requeue, resume, finish
        log = _interrupted_job(slurm, tiny, tmp_path, "preempted", shape, env, ["scontrol", "requeue"])
        assert "(restart 1)" in log

        # 3. the time-limit warning (--signal=USR1@300 in the script): ranks save and exit 75, the
        #    script requeues the job itself, the restart resumes and finishes
        log = _interrupted_job(slurm, tiny, tmp_path, "warned", shape, env, ["scancel", "--signal=USR1"])
        assert "SIGUSR1 received; saved step" in log and "requeueing job" in log


def _interrupted_job(slurm, tiny, tmp_path, name, shape, env, interrupt: list[str], steps: int = 120) -> str:
    """Submit a longer job, interrupt it once its first checkpoint exists, and check that it comes
    back and finishes; returns its log."""
    out = str(tmp_path / name)
    cfg = _config(tiny, str(tmp_path / f"{name}.yaml"), **{"train.steps": steps, "train.save_interval": 10})
    job = slurm.submit(SBATCH, *shape, "--output", f"{out}.log", env=dict(env, CONFIG=cfg, OUT_DIR=out))
    _wait_for(lambda: _latest(out) is not None, 300, slurm)
    slurm.run([*interrupt, job])
    slurm.release_requeued(job)
    info = slurm.wait(job, timeout=600, until=("COMPLETED", "FAILED", "CANCELLED"))
    log = open(f"{out}.log").read()
    assert info["JobState"] == "COMPLETED", log[-4000:]
    assert int(info["Restarts"]) >= 1 and "resumed from step-" in log
    _finished(out, steps)
    return log


def _wait_for(cond, timeout, slurm):
    deadline = time.time() + timeout
    while not cond():
        assert time.time() < deadline, slurm.log_tail()
        time.sleep(0.05)


def test_deepspeed_hostfile_single_host(tiny, tmp_path):
    from ted_ds.distributed import free_port

    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    launcher = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    for i, extra in enumerate((["--no_ssh_check", "--master_addr", "127.0.0.1"],
                               ["--no_ssh", "--node_rank", "0", "--master_addr", "127.0.0.1"])):
        out = str(tmp_path / f"hf{i}")
        cfg = _config(tiny, str(tmp_path / f"h{i}.yaml"), **{"train.out_dir": out})
        run_launcher([launcher, "--hostfile", str(hostfile), *extra, "--master_port", str(free_port()),
                      "--module", "ted_ds", "distill", "--config", cfg])
        _finished(out, 4)


@needs(shutil.which("mpirun") is not None, "Open MPI (mpirun)")
def test_mpirun_launch(tiny, tmp_path):
    out = str(tmp_path / "mpi")
    cfg = _config(tiny, str(tmp_path / "m.yaml"), **{"train.out_dir": out})
    env = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1", "OMP_NUM_THREADS": "1"}
    run_launcher(["mpirun", "-np", "2", "--allow-run-as-root", "--oversubscribe", "-x", "TORCH_EXTENSIONS_DIR",
                  "-x", "DS_ACCELERATOR", "-x", "PATH", sys.executable, "-m", "ted_ds", "distill", "--config", cfg],
                 env=env)
    _finished(out, 4)


@needs(shutil.which("mpirun") is not None, "Open MPI (mpirun)")
def test_mpirun_keeps_the_master_port_the_user_exported():
    """``mpirun -x MASTER_PORT=<p>`` (as ``ted-ds launch`` prints it): the process group's store listens
    on <p> (DeepSpeed's MPI discovery would set 29500), rank 0's address is broadcast through MPI,
    and each rank's LOCAL_RANK is Open MPI's."""
    from ted_ds.distributed import free_port

    port = free_port()
    env = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1", "OMP_NUM_THREADS": "1"}
    r = run_launcher(["mpirun", "-np", "2", "--allow-run-as-root", "--oversubscribe", "-x", f"MASTER_PORT={port}",
                      "-x", "TORCH_EXTENSIONS_DIR", "-x", "DS_ACCELERATOR", "-x", "PATH", sys.executable,
                      os.path.join(REPO, "tests", "harness", "mp", "group_port.py")], env=env, timeout=300)
    lines = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    ranks = sorted(lines, key=lambda x: x["rank"])
    assert [(x["rank"], x["world"], x["local_rank"], x["store_port"], x["sum"]) for x in ranks] == \
        [(0, 2, "0", port, 1.0), (1, 2, "1", port, 1.0)], r.stdout + r.stderr[-3000:]
    assert ranks[0]["master_addr"] == ranks[1]["master_addr"] != "", ranks


def test_torchrun_launch(tiny, tmp_path):
    from ted_ds.distributed import free_port

    out = str(tmp_path / "torchrun")
    cfg = _config(tiny, str(tmp_path / "t.yaml"), **{"train.out_dir": out})
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    run_launcher([torchrun, "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
                  "-m", "ted_ds", "distill", "--config", cfg])
    _finished(out, 4)


def _two_node_launch(hosts: TwoHosts, tmp_path, cfg: str, check: bool = True):
    """The deepspeed launcher on host A starts one rank on each host through pdsh/ssh."""
    from ted_ds.distributed import free_port

    hostfile = tmp_path / "hostfile"
    hostfile.write_text("".join(f"{addr} slots=1\n" for addr in ADDRS))
    env_file = tmp_path / "deepspeed_env"  # what the launcher exports to the remote ranks
    env_file.write_text("".join(f"{k}={os.environ.get(k, v)}\n" for k, v in (
        ("TORCH_EXTENSIONS_DIR", ""), ("DS_ACCELERATOR", "cpu"), ("GLOO_SOCKET_IFNAME", IFNAME),
        ("OMP_NUM_THREADS", "1"), ("TOKENIZERS_PARALLELISM", "false"), ("PATH", ""))))
    launcher = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    env = {"PDSH_RCMD_TYPE": "ssh", "PDSH_SSH_ARGS_APPEND": " ".join(hosts.ssh_options()),
           "DS_ENV_FILE": str(env_file), "GLOO_SOCKET_IFNAME": IFNAME}
    proc = run_launcher(["ip", "netns", "exec", hosts.ns[0], launcher, "--hostfile", str(hostfile),
                         "--no_ssh_check", "--master_addr", ADDRS[0], "--master_port", str(free_port()),
                         "--module", "ted_ds", "distill", "--config", cfg], env=env, timeout=600, check=check)
    return proc.returncode, proc.stdout + proc.stderr


def _merge(disks: list[str], out: str) -> None:
    """The files of every node's disk in one directory, as storage all nodes share would hold them."""
    for disk in disks:
        shutil.copytree(disk, out, dirs_exist_ok=True,
                        copy_function=lambda src, dst: os.path.exists(dst) or shutil.copy2(src, dst))


@needs(netns_available(), "root, iproute2, openssh-server and pdsh")
def test_two_node_runs_over_pdsh_ssh_resume_only_from_storage_both_nodes_see(tiny, tmp_path):
    """Genuine 2-node jobs: one rank on each of two network namespaces ("hosts" ted-node0 and
    ted-node1, an sshd in each), started by the deepspeed launcher through pdsh/ssh, talking gloo over
    the veth link between them.

    1. ``train.out_dir`` on node-local disks (the same path, a directory of each host's own): the run
       trains and finishes; its re-run refuses to start, with one line naming the host that cannot
       see the checkpoint (without the ranks' agreement, node 0 would resume and node 1 start over).
    2. The two disks' files in one directory, as storage both nodes share would hold them, ``latest``
       back at step 2: the re-run resumes from step 2 and ends bit-identical to run 1.  Its own record
       says it resumed and trained steps 3 and 4 only (a run that started over would end identical too).
    """
    local = str(tmp_path / "local")  # the same path on both hosts, with each host's own disk behind it
    over = {"train.out_dir": os.path.join(local, "run"), "train.save_interval": 2, "train.timeout_minutes": 1}
    cfg = _config(tiny, str(tmp_path / "local.yaml"), **over)
    with TwoHosts(str(tmp_path), local=local) as hosts:
        _, log = _two_node_launch(hosts, tmp_path, cfg)
        assert "pdsh" in log and ADDRS[1] in log
        node0 = os.path.join(hosts.disk(0), "run")
        _finished(node0, 4)
        rc, log = _two_node_launch(hosts, tmp_path, cfg, check=False)
        errors = {line.split("error: ", 1)[1] for line in log.splitlines() if "ted-ds: " in line and "error: " in line}
        assert rc != 0 and "Traceback" not in log and len(errors) == 1, log[-4000:]
        error = errors.pop()
        # each rank records what every rank wrote (COMPLETE): node 0's disk lacks node 1's files
        assert error.startswith(f"{local}/run/checkpoints/distill-lwd: no complete checkpoint left to resume from on "
                                "ted-node0 (step-00000004: ") and error.endswith(
            "train.out_dir must be on storage every node shares"), error
        shared = str(tmp_path / "shared")
        _merge([node0, os.path.join(hosts.disk(1), "run")], shared)
        shutil.rmtree(os.path.join(shared, "hf"))
        with open(os.path.join(shared, "checkpoints", "distill-lwd", "latest"), "w") as f:
            f.write("step-00000002")
        _, log = _two_node_launch(hosts, tmp_path, _config(tiny, str(tmp_path / "shared.yaml"),
                                                           **dict(over, **{"train.out_dir": shared})))
    assert "ted-ds: resumed from step-00000002" in log and last_launch(shared) == ("step-00000002", [3, 4])
    _finished(shared, 4)
    a, b = (load_file(os.path.join(d, "hf", "model.safetensors")) for d in (node0, shared))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert losses(shared) == losses(node0)
    record_fault("train.out_dir on node-local disks (2 nodes), re-run",
                 f"one line on every rank: `{error.split(': ', 1)[1]}`",
                 "nothing trained; with the disks' files on shared storage the re-run resumes bit-identically")
