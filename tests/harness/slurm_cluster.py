"""A real single-node SLURM cluster for the tests: Debian's slurmctld + slurmd, started without
systemd under a temporary directory (auth/none), stopped on exit — also when a test fails."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time

from ted_ds.distributed import free_port


def slurm_available() -> bool:
    return all(shutil.which(b) for b in ("slurmctld", "slurmd", "sbatch", "scontrol")) and os.geteuid() == 0


class LocalSlurm:
    def __init__(self, root: str, cpus: int | None = None):
        self.root = root
        self.host = socket.gethostname().split(".")[0]
        self.cpus = cpus or os.cpu_count() or 2
        self.env = dict(os.environ, SLURM_CONF=os.path.join(root, "slurm.conf"))
        self.procs: list[subprocess.Popen] = []

    def __enter__(self) -> LocalSlurm:
        for d in ("state", "spool", "log"):
            os.makedirs(os.path.join(self.root, d), exist_ok=True)
        memory = 16000
        with open(self.env["SLURM_CONF"], "w") as f:
            f.write(f"""ClusterName=tedtest
SlurmctldHost={self.host}(127.0.0.1)
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/none
CredType=cred/none
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
ReturnToService=2
JobRequeue=1
KillWait=30
StateSaveLocation={self.root}/state
SlurmdSpoolDir={self.root}/spool
SlurmctldPidFile={self.root}/slurmctld.pid
SlurmdPidFile={self.root}/slurmd.pid
SlurmctldLogFile={self.root}/log/slurmctld.log
SlurmdLogFile={self.root}/log/slurmd.log
NodeName={self.host} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={memory} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
""")
        self.procs.append(subprocess.Popen(["slurmctld", "-D", "-i"], env=self.env, stdout=subprocess.DEVNULL,
                                           stderr=subprocess.DEVNULL))
        time.sleep(1)
        self.procs.append(subprocess.Popen(["slurmd", "-D"], env=self.env, stdout=subprocess.DEVNULL,
                                           stderr=subprocess.DEVNULL))
        deadline = time.time() + 60
        while time.time() < deadline:
            state = self.run(["sinfo", "-h", "-o", "%t"], check=False).stdout.strip()
            if state in ("idle", "mix", "alloc"):
                return self
            time.sleep(0.5)
        self.__exit__(None, None, None)
        raise RuntimeError(f"SLURM did not come up; log:\n{self.log_tail()}")

    def __exit__(self, *exc) -> None:
        self.run(["scontrol", "shutdown"], check=False)
        for p in self.procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()

    def log_tail(self) -> str:
        out = []
        for name in ("slurmctld.log", "slurmd.log"):
            path = os.path.join(self.root, "log", name)
            if os.path.exists(path):
                out.append(f"--- {name}\n" + open(path).read()[-3000:])
        return "\n".join(out)

    def run(self, cmd: list[str], check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, env=self.env, capture_output=True, text=True, check=check, timeout=60)

    def submit(self, script: str, *args: str, env: dict | None = None) -> str:
        export = ",".join(["ALL"] + [f"{k}={v}" for k, v in (env or {}).items()])
        out = self.run(["sbatch", "--parsable", f"--export={export}", *args, script]).stdout
        return out.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        out = self.run(["scontrol", "-o", "show", "job", job_id], check=False).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def release_requeued(self, job_id: str, timeout: float = 300) -> None:
        """Once the job is back in the queue and its previous run has fully ended, start it now:
        SLURM holds a requeued job for about two minutes (BeginTime), which only costs the tests
        time. Released too early, slurmctld can apply the old run's exit status to the new run
        (seen with 22.05 when a batch script requeues itself), hence the grace period."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            info = self.job(job_id)
            old_run_alive = subprocess.run(["pgrep", "-f", f"slurmstepd: \\[{job_id}\\."],
                                           capture_output=True).returncode == 0
            if info.get("JobState") == "PENDING" and int(info.get("Restarts", "0")) >= 1 and not old_run_alive:
                time.sleep(10)
                self.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], check=False)
                return
            time.sleep(0.3)
        raise TimeoutError(f"job {job_id} was not requeued: {self.job(job_id)}")

    def wait(self, job_id: str, timeout: float, until=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL",
                                                         "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE")) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in until:
                return info
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id} still {self.job(job_id).get('JobState')} after {timeout} s\n"
                           f"{self.log_tail()}")
