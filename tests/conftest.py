"""Fixtures and hooks only: a small slice of the bundled corpus, two real tokenizers trained on it, the
tiny models built from them, and the checks every test runs under. What tests import lives in
``harness`` (``harness.common``, ``harness.tiny``)."""

from __future__ import annotations

import contextlib
import os

import pytest

from harness.common import REPO, corpus_lines
from ted_ds.distributed import SHM_WORKSPACE_PREFIX

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# DeepSpeed's JIT ops (shm comm on CPU) are compiled once per CPU under this cache (ted_ds/host.py keys it).
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(REPO, ".cache", "torch_extensions"))
os.environ.setdefault("DS_ACCELERATOR", "cpu")


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


@pytest.fixture
def _fail_missing_requirement(request):
    pytest.fail(f"CI must provide {request.node.get_closest_marker('missing').kwargs['what']} "
                "(scripts/setup_env.sh installs it as root)")



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
    from harness.tiny import make_dataset, make_teacher

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
def lwd_run(tiny, tmp_path_factory) -> tuple:
    """One real 2-rank LWD run with checkpoints (harness.tiny.checkpointed_config), shared by the checkpoint
    and the export tests: (its root directory, its out_dir)."""
    from harness.common import deepspeed_cmd, run_launcher
    from harness.tiny import checkpointed_config

    root = tmp_path_factory.mktemp("ckpt")
    run_launcher(deepspeed_cmd(2, "--module", "ted_ds", "distill", "--config", checkpointed_config(tiny, root, "ref")))
    return root, str(root / "ref")


@pytest.fixture(scope="session")
def arch_teachers(tiny) -> dict:
    """Tiny Qwen2 (padded embedding), Mistral, Gemma 2 and Phi-3 teachers on the LLaMA data's tokenizer."""
    from harness.tiny import ARCHITECTURES, make_arch_teacher

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
    # inductor (FlexAttention compiles its CPU kernel) hands a pointer to its C++ loader this way, and
    # importing deepspeed sets torch's NVML check (in whichever test imports it first)
    harmless = {"TOKENIZERS_PARALLELISM", "_TORCHINDUCTOR_PYOBJECT_TENSOR_DATA_PTR", "PYTORCH_NVML_BASED_CUDA_CHECK"}
    assert not leaked - harmless, f"test leaked environment variables: {sorted(leaked)}"
