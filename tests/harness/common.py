"""What the tests share besides fixtures: the repository root, the bundled corpus, the marker for a
missing requirement, the multi-rank launch (``run_launcher``, ``deepspeed_cmd``), a stop where a command
would start its process group (``stop_at_process_group``) and the rows of the "Faults survived" table
(``record_fault``)."""

from __future__ import annotations

import gzip
import json
import os

import pytest

from data_prep.cli import SAMPLE_CORPUS
from ted_ds.distributed import SHM_WORKSPACE_PREFIX
from ted_ds.launch import local_deepspeed_command

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
deepspeed_cmd = local_deepspeed_command  # every multi-rank launch of the tests
FAULTS_DIR = os.path.join(REPO, ".cache", "faults")


def student_weights(out_dir: str) -> dict:
    """The trained student a run wrote (``<out_dir>/hf``), tensor by name."""
    from safetensors.torch import load_file

    return load_file(os.path.join(out_dir, "hf", "model.safetensors"))


def losses(out_dir: str) -> dict[int, float]:
    """The total loss of every logged step in ``out_dir``'s metrics.jsonl (a re-run step: its last value)."""
    return {m["step"]: m["loss/total"] for m in map(json.loads, open(os.path.join(out_dir, "metrics.jsonl")))
            if "loss/total" in m}


def last_launch(out_dir: str) -> tuple[str | None, list[int]]:
    """What the newest launch did, from its own lines in metrics.jsonl: the tag it resumed from (None:
    it started from step 0) and the steps it trained."""
    rows = [json.loads(line) for line in open(os.path.join(out_dir, "metrics.jsonl"))]
    marks = [i for i, row in enumerate(rows) if "resumed_from" in row]
    own = rows[marks[-1] + 1:] if marks else rows
    return (rows[marks[-1]]["resumed_from"] if marks else None), [r["step"] for r in own if "loss/total" in r]


def corpus_lines(n: int, start: int = 0) -> list[str]:
    with gzip.open(SAMPLE_CORPUS, "rt", encoding="utf-8") as f:
        lines = [line.rstrip("\n") for line in f]
    return lines[start:start + n]


def needs(available: bool, what: str):
    """Mark a test that needs ``what`` (root, a system package): skipped where it is missing on a
    developer's machine, but under CI (``CI`` set) a missing ``what`` fails the test — CI installs
    everything (scripts/setup_env.sh), so a skip there would hide an untested launch path."""
    if available:
        return lambda test: test
    if os.environ.get("CI"):
        return lambda test: pytest.mark.usefixtures("_fail_missing_requirement")(pytest.mark.missing(what=what)(test))
    return pytest.mark.skip(reason=f"needs {what} (scripts/setup_env.sh installs it as root)")


class ProcessGroupStarted(Exception):
    """A command run in-process got past every check made before its process group."""


def stop_at_process_group(monkeypatch) -> None:
    """Make ``distributed.init`` raise ProcessGroupStarted: what a command checks up front can then be
    tested in-process, its acceptance seen as that exception."""
    from ted_ds import distributed

    def init(*_):
        raise ProcessGroupStarted()

    monkeypatch.setattr(distributed, "init", init)


def record_fault(fault: str, sees: str, kept: str) -> None:
    """One row of the "Faults survived" table (``python -m bench faults`` renders the rows into
    BENCHMARKS.md): called by a fault test after its assertions passed, with what it observed."""
    import hashlib
    import json
    import re

    os.makedirs(FAULTS_DIR, exist_ok=True)
    sees = re.sub(r"(/[^\s/`]+)+/([^\s/`]+/[^\s/`]+)", r"…/\2", sees)  # the test's temporary paths, shortened
    row = {"fault": fault, "sees": sees, "kept": kept,
           "test": os.environ.get("PYTEST_CURRENT_TEST", "").rsplit(" (", 1)[0]}
    with open(os.path.join(FAULTS_DIR, hashlib.sha1(fault.encode()).hexdigest()[:12] + ".json"), "w") as f:
        json.dump(row, f)


def run_launcher(cmd: list[str], timeout: float = 600, env: dict | None = None, cwd: str | None = None,
                 check: bool = True):
    """Run a multi-process launch; on failure (``check``: a non-zero status) the assertion shows the
    end of its output.

    The launch gets its own process group, killed whole on timeout: a hung rank must not outlive
    its test. A launch must leave no shared memory behind (see ted_ds.distributed)."""
    import signal
    import subprocess

    full_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full_env,
                            cwd=cwd or REPO, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        raise AssertionError(f"{' '.join(cmd)} still running after {timeout} s; killed:\n"
                             f"{(stdout + stderr)[-6000:]}") from None
    out = subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)
    assert out.returncode == 0 or not check, f"{' '.join(cmd)} failed ({out.returncode}):\n{(stdout + stderr)[-6000:]}"
    if "--master_port" in cmd:
        port = cmd[cmd.index("--master_port") + 1]
        left = [f for f in os.listdir("/dev/shm") if f.startswith(SHM_WORKSPACE_PREFIX) and f"_{port}_" in f]
        assert not left, f"the launch left shared memory behind: {left}"
    return out


def empty_checkpoint(ckpt_dir, step: int) -> str:
    """A checkpoint directory (``pathlib.Path``) whose newest tag is whole as ``find_resumable`` and
    ``resolve_checkpoint`` check it, holding no weights; returns the tag."""
    tag = f"step-{step:08d}"
    (ckpt_dir / tag).mkdir(parents=True)
    (ckpt_dir / tag / "trainer_state.json").write_text("{}")
    (ckpt_dir / tag / "COMPLETE").write_text('{"files": {}}')
    (ckpt_dir / "latest").write_text(tag)
    return tag
