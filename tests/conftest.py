"""Shared fixtures: a small slice of the bundled corpus and two real tokenizers trained on it."""

from __future__ import annotations

import contextlib
import gzip
import os

import pytest

from data_prep.cli import SAMPLE_CORPUS
from ted_ds.distributed import SHM_WORKSPACE_PREFIX
from ted_ds.launch import local_deepspeed_command

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def corpus_lines(n: int, start: int = 0) -> list[str]:
    with gzip.open(SAMPLE_CORPUS, "rt", encoding="utf-8") as f:
        lines = [line.rstrip("\n") for line in f]
    return lines[start:start + n]


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory) -> str:
    """400 Wikipedia paragraphs, one per line."""
    path = tmp_path_factory.mktemp("corpus") / "wiki.txt"
    path.write_text("\n".join(corpus_lines(400)) + "\n", encoding="utf-8")
    return str(path)


@pytest.fixture(scope="session")
def sp_tokenizer(tmp_path_factory) -> str:
    """A LLaMA-style SentencePiece BPE tokenizer (vocab 1000) trained by ted-prep itself."""
    from data_prep.tokenizer import train_sentencepiece

    out = str(tmp_path_factory.mktemp("tok") / "sp-bpe")
    train_sentencepiece(iter(corpus_lines(2000)), out, vocab_size=1000, model_type="bpe")
    return out


@pytest.fixture(scope="session")
def gpt2_tokenizer(tmp_path_factory) -> str:
    """A GPT-2-style byte-level BPE tokenizer (GPT2TokenizerFast, <|endoftext|>), trained here."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2TokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(corpus_lines(2000), vocab_size=1200, min_frequency=2,
                            special_tokens=["<|endoftext|>"], show_progress=False)
    out = str(tmp_path_factory.mktemp("tok") / "gpt2-bpe")
    tok = GPT2TokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                            unk_token="<|endoftext|>")
    tok.save_pretrained(out)
    return out


def needs(available: bool, what: str):
    """Mark a test that needs ``what`` (root, a system package): skipped where it is missing on a
    developer's machine, but under CI (``CI`` set) a missing ``what`` fails the test — CI installs
    everything (scripts/setup_env.sh), so a skip there would hide an untested launch path."""
    if available:
        return lambda test: test
    if os.environ.get("CI"):
        return lambda test: pytest.mark.usefixtures("_fail_missing_requirement")(pytest.mark.missing(what=what)(test))
    return pytest.mark.skip(reason=f"needs {what} (scripts/setup_env.sh installs it as root)")


@pytest.fixture
def _fail_missing_requirement(request):
    pytest.fail(f"CI must provide {request.node.get_closest_marker('missing').kwargs['what']} "
                "(scripts/setup_env.sh installs it as root)")


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
deepspeed_cmd = local_deepspeed_command  # every multi-rank launch of the tests
# DeepSpeed's JIT ops (shm comm on CPU) are compiled once per machine into this cache.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(REPO, ".cache", "torch_extensions"))
os.environ.setdefault("DS_ACCELERATOR", "cpu")


FAULTS_DIR = os.path.join(REPO, ".cache", "faults")


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


def run_launcher(cmd: list[str], timeout: float = 600, env: dict | None = None, cwd: str | None = None):
    """Run a multi-process launch; on failure the assertion shows the end of its output.

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
    assert out.returncode == 0, f"{' '.join(cmd)} failed ({out.returncode}):\n{(stdout + stderr)[-6000:]}"
    if "--master_port" in cmd:
        port = cmd[cmd.index("--master_port") + 1]
        left = [f for f in os.listdir("/dev/shm") if f.startswith(SHM_WORKSPACE_PREFIX) and f"_{port}_" in f]
        assert not left, f"the launch left shared memory behind: {left}"
    return out


@pytest.fixture(scope="session", autouse=True)
def _no_stale_shared_memory():
    """Runs from before ted-ds released DeepSpeed's CPU all-reduce workspaces (69 MB of RAM per rank
    each) may have left them in /dev/shm; drop those no live process maps."""
    if not os.path.isdir("/dev/shm"):
        return
    mapped = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/maps") as f:
                mapped.update(line.rsplit("/", 1)[-1].strip() for line in f if "/dev/shm/" in line)
        except OSError:
            continue
    for name in os.listdir("/dev/shm"):
        if name.startswith(SHM_WORKSPACE_PREFIX) and name not in mapped:
            with contextlib.suppress(OSError):
                os.unlink(os.path.join("/dev/shm", name))


@pytest.fixture(scope="session")
def tiny(sp_tokenizer, gpt2_tokenizer, corpus_file, tmp_path_factory) -> dict:
    """Datasets and randomly initialised teachers: LLaMA (SentencePiece) and GPT-2 (byte-level BPE)."""
    from tiny import make_dataset, make_teacher

    root = tmp_path_factory.mktemp("tiny")
    llama_data = make_dataset(corpus_file, sp_tokenizer, str(root / "data-sp"))
    gpt2_data = make_dataset(corpus_file, gpt2_tokenizer, str(root / "data-gpt2"))
    return {
        "root": str(root),
        "llama_data": llama_data,
        "llama_teacher": make_teacher("llama", sp_tokenizer, str(root / "teacher-llama"), llama_data),
        "gpt2_data": gpt2_data,
        "gpt2_teacher": make_teacher("gpt2", gpt2_tokenizer, str(root / "teacher-gpt2"), gpt2_data),
    }


@pytest.fixture(scope="session")
def arch_teachers(tiny) -> dict:
    """Tiny Qwen2 (padded embedding), Mistral, Gemma 2 and Phi-3 teachers on the LLaMA data's tokenizer."""
    from tiny import ARCHITECTURES, make_arch_teacher

    tok = os.path.join(tiny["llama_data"], "tokenizer")
    return {kind: make_arch_teacher(kind, tok, os.path.join(tiny["root"], f"teacher-{kind}"), tiny["llama_data"])
            for kind in ARCHITECTURES}


@pytest.fixture(autouse=True)
def _commands_never_end_the_test_process():
    """A command run in-process (``ted_ds.cli.main``) that got as far as a process group ends with
    ``os._exit`` — it would take pytest with it, silently and with status 0. Make it a failure.
    (Not through ``monkeypatch``: that would undo the tests' own environment changes too late.)"""
    from ted_ds import distributed

    leave = distributed.leave
    distributed.leave = lambda rc: pytest.fail(
        f"an in-process command started a process group and would have ended the test process (os._exit({rc}))")
    yield
    distributed.leave = leave


@pytest.fixture(autouse=True)
def _environment_is_left_as_found():
    """A test must not leak variables (RANK, MASTER_PORT, ...) into the launches of later tests."""
    before = dict(os.environ)
    yield
    leaked = {k for k in os.environ if k not in before}
    for key in leaked:
        del os.environ[key]
    os.environ.update(before)
    assert not leaked - {"TOKENIZERS_PARALLELISM"}, f"test leaked environment variables: {sorted(leaked)}"
