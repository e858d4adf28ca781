"""Shared set-up for the benchmarks: corpus, tokenizer, shards, a random LLaMA teacher, filter banks."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(REPO), "shared", "data")


def corpus_path(workdir: str) -> str:
    """The 3 MB Wikipedia sample: ../shared/data if present, else the bundled copy."""
    shared = os.path.join(SHARED, "enwiki_sample.txt")
    if os.path.isfile(shared):
        return shared
    out = os.path.join(workdir, "enwiki_sample.txt")
    if not os.path.exists(out):
        with gzip.open(os.path.join(REPO, "data_prep", "sample", "enwiki_sample.txt.gz"), "rb") as f, \
                open(out, "wb") as g:
            shutil.copyfileobj(f, g)
    return out


def cpu_model() -> str:
    """The CPU's model name (Linux), e.g. "AMD EPYC 9R45"; the platform's processor string elsewhere."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def machine() -> dict:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                            text=True).stdout.strip()
    return {"date": time.strftime("%Y-%m-%d"), "commit": commit, "cpus": os.cpu_count(), "cpu": cpu_model(),
            "platform": platform.platform(), "python": platform.python_version()}


def save_result(name: str, result: dict) -> None:
    """A full run's raw numbers as bench/results/<name>."""
    with open(os.path.join(REPO, "bench", "results", name), "w") as f:
        json.dump(result, f, indent=1)


def run(cmd: list[str], env: dict | None = None, timeout: float = 1800) -> str:
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, **(env or {})))
    if proc.returncode != 0:
        sys.exit(f"benchmark step failed: {' '.join(cmd)}\n{(proc.stdout + proc.stderr)[-4000:]}")
    return proc.stdout + proc.stderr


def persistent_config(source: str, work: str) -> str:
    """The DeepSpeed JSON ``source`` with every parameter persistent (threshold 10¹²: ZeRO-3 gathers none),
    written into ``work``; its path."""
    with open(source) as f:
        ds = json.load(f)
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 10**12
    name, ext = os.path.splitext(os.path.basename(source))
    path = os.path.join(work, f"{name}_persistent{ext}")
    with open(path, "w") as f:
        json.dump(ds, f, indent=2)
    return path


def _world_key(corpus: str, *shape) -> str:
    """Names a world by what it is built from, so a re-run (another checkout, a changed corpus or
    shape) reuses a matching world or builds a fresh one beside it, never a clash in one directory."""
    st = os.stat(corpus)
    return hashlib.sha256(repr((os.path.abspath(corpus), st.st_size, st.st_mtime_ns, shape)).encode()).hexdigest()[:12]


def tiny_world(workdir: str, vocab: int = 8000, teacher_layers: int = 8, hidden: int = 256) -> dict:
    """Tokenizer + shards of the corpus, a random LLaMA teacher and random filter banks (timing only)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from data_prep.tokenizer import load_tokenizer
    from ted_ds.filters import FilterBank, save_filter_bank

    os.makedirs(workdir, exist_ok=True)
    corpus = corpus_path(workdir)
    workdir = os.path.join(workdir, "world-" + _world_key(corpus, vocab, teacher_layers, hidden))
    os.makedirs(workdir, exist_ok=True)
    tok, data = os.path.join(workdir, "tok"), os.path.join(workdir, "data")
    if not os.path.isdir(tok):
        run([sys.executable, "-m", "data_prep", "tokenizer", "--input", corpus, "--vocab-size", str(vocab), "--out",
             tok])
    run([sys.executable, "-m", "data_prep", "build", "--input", corpus, "--tokenizer", tok, "--out", data,
         "--workers", "2", "--no-progress"])
    teacher = os.path.join(workdir, "teacher")
    if not os.path.isdir(teacher):
        t = load_tokenizer(tok)
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=len(t), hidden_size=hidden, intermediate_size=hidden * 8 // 3 // 8 * 8,
                             num_hidden_layers=teacher_layers, num_attention_heads=hidden // 64,
                             num_key_value_heads=max(1, hidden // 128), max_position_embeddings=512,
                             tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
        LlamaForCausalLM(config).save_pretrained(teacher)
        t.save_pretrained(teacher)
    banks = {}
    for side, layers in (("teacher", [2, 4, 6, 8]), ("student", [1, 2, 3, 4])):
        banks[side] = os.path.join(workdir, f"bank-{side}")
        if not os.path.isdir(banks[side]):
            b = FilterBank("linear", hidden, hidden, layers, seed=1)
            save_filter_bank(b.state_dict(), b.meta(), banks[side])
    return {"tokenizer": tok, "data": data, "teacher": teacher, "banks": banks}
