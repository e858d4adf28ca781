"""Benchmark ``ted-prep build`` against the Hugging Face ``run_clm.py`` recipe and the bare tokenizer.

What: the same corpus (the shared 3 MB Wikipedia sample, 10 copies = 30 MB; the bundled
``data_prep/sample`` copy if the shared one is absent) and the same 32k SentencePiece tokenizer go
through three methods, each with W=2 processes, each in its own subprocess:

* ``hf-run_clm``: ``datasets.load_dataset("text")`` + ``map(tokenize)`` + ``map(group_texts, 1024)``
  with ``num_proc=W``, exactly as ``examples/pytorch/language-modeling/run_clm.py``;
  seconds = load + both maps (measured inside the child, imports excluded).
* ``bare-tokenizer``: ``backend_tokenizer.encode_batch_fast`` in batches of 1000 lines with Rust
  parallelism on (TOKENIZERS_PARALLELISM=true, W threads); seconds = encoding only. The ceiling.
* ``ted-prep``: ``python -m data_prep build --workers W``; seconds = the whole process, start-up included.

So "seconds" flatters the other two (their imports and tokenizer load are left out); the last column,
every child's whole process wall, compares like with like.

Peak RSS is the maximum over time of the summed RSS of the process tree (polled every 50 ms).
ted-prep is also run on 1 copy to show its peak RSS does not grow with the corpus.

Run:  .venv/bin/python bench/prep_bench.py [--quick]     (writes bench/results/prep.json)
      or ``from bench.prep_bench import run; run(quick=True)``
"""

from __future__ import annotations

import datetime
import gzip
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
PY = str(REPO / ".venv" / "bin" / "python") if (REPO / ".venv" / "bin" / "python").exists() else sys.executable
WORKERS = 2
BLOCK_SIZE = 1024
BATCH_LINES = 1000
RESULTS = REPO / "bench" / "results" / "prep.json"


# ----------------------------------------------------------------------------- inputs
def make_corpus(tmp: Path, copies: int) -> tuple[Path, Path]:
    """Return (1-copy corpus, ``copies``-copy concatenation) as .txt files, one document per line."""
    one = tmp / "corpus-1x.txt"
    shared = SHARED / "enwiki_sample.txt"
    if shared.is_file():
        shutil.copyfile(shared, one)
    else:
        with gzip.open(REPO / "data_prep" / "sample" / "enwiki_sample.txt.gz", "rb") as f, open(one, "wb") as g:
            shutil.copyfileobj(f, g)
    data = one.read_bytes()
    if not data.endswith(b"\n"):
        data += b"\n"
        one.write_bytes(data)
    if copies == 1:
        return one, one
    many = tmp / f"corpus-{copies}x.txt"
    with open(many, "wb") as f:
        for _ in range(copies):
            f.write(data)
    return one, many


def make_tokenizer(tmp: Path, corpus: Path) -> tuple[Path, str]:
    """An HF tokenizer directory of the shared 32k SentencePiece model (or an 8k one trained here)."""
    from transformers import AutoTokenizer

    raw, out = tmp / "tok-sp", tmp / "tok"
    model = SHARED / "tokenizers" / "mistral-sp32k" / "tokenizer.model"
    if model.is_file():
        raw.mkdir()
        shutil.copyfile(model, raw / "tokenizer.model")
        (raw / "tokenizer_config.json").write_text(
            json.dumps({"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False}))
        name = "mistral-sp32k"
    else:
        sys.path.insert(0, str(REPO))
        from data_prep.tokenizer import train_sentencepiece

        lines = (ln for ln in corpus.read_text(encoding="utf-8").splitlines() if ln.strip())
        train_sentencepiece(lines, str(raw), 8000, "bpe")
        name = "trained-bpe8k (shared tokenizer absent)"
    AutoTokenizer.from_pretrained(str(raw)).save_pretrained(str(out))
    n = len(AutoTokenizer.from_pretrained(str(out)))
    expected = 32000 if model.is_file() else 8000
    assert abs(n - expected) <= 64, f"tokenizer has {n} tokens, expected about {expected}"
    return out, f"{name}, {n} tokens"


# ----------------------------------------------------------------------------- measuring
def measure(cmd: list[str], env: dict | None = None, interval: float = 0.05) -> dict:
    """Run ``cmd``; return wall seconds, peak summed RSS of its process tree (MB), stdout, stderr."""
    out, err = tempfile.TemporaryFile(), tempfile.TemporaryFile()
    start = time.perf_counter()
    proc = psutil.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=err)
    peak = 0
    while proc.poll() is None:
        rss = 0
        try:
            for p in [proc] + proc.children(recursive=True):
                try:
                    rss += p.memory_info().rss
                except psutil.Error:
                    pass
        except psutil.Error:
            pass
        peak = max(peak, rss)
        time.sleep(interval)
    wall = time.perf_counter() - start
    out.seek(0)
    err.seek(0)
    stdout, stderr = out.read().decode(), err.read().decode()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{stderr[-3000:]}")
    return {"wall_s": wall, "peak_rss_mb": peak / 2**20, "stdout": stdout, "stderr": stderr}


def child_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TOKENIZERS_PARALLELISM"}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONPATH=str(REPO), **extra)
    return env


def run_child(kind: str, *args: str, env: dict | None = None) -> dict:
    m = measure([PY, __file__, "--child", kind, *map(str, args)], env=env or child_env())
    figures = json.loads(m["stdout"].strip().splitlines()[-1])
    return {**figures, "wall_s": m["wall_s"], "peak_rss_mb": m["peak_rss_mb"]}


# ----------------------------------------------------------------------------- the three methods (children)
def child_hf(corpus: str, tok_dir: str, workers: int, cache: str) -> dict:
    """run_clm.py: load_dataset("text") → map(tokenize) → map(group_texts), num_proc=workers."""
    from itertools import chain

    import datasets
    import pyarrow.compute as pc
    from transformers import AutoTokenizer

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    tok = AutoTokenizer.from_pretrained(tok_dir)

    def tokenize_function(examples):
        return tok(examples["text"])

    def group_texts(examples):
        concatenated = {k: list(chain(*examples[k])) for k in examples.keys()}
        total = len(concatenated[list(examples.keys())[0]])
        total = (total // BLOCK_SIZE) * BLOCK_SIZE
        result = {k: [t[i : i + BLOCK_SIZE] for i in range(0, total, BLOCK_SIZE)] for k, t in concatenated.items()}
        result["labels"] = result["input_ids"].copy()
        return result

    start = time.perf_counter()
    raw = datasets.load_dataset("text", data_files={"train": corpus}, cache_dir=cache)
    tokenized = raw.map(tokenize_function, batched=True, num_proc=workers, remove_columns=["text"])
    grouped = tokenized.map(group_texts, batched=True, num_proc=workers)
    seconds = time.perf_counter() - start
    tokens = pc.sum(pc.list_value_length(tokenized["train"].data.column("input_ids"))).as_py()
    return {"tokens": tokens, "seconds": seconds, "blocks": grouped["train"].num_rows}


def child_bare(corpus: str, tok_dir: str) -> dict:
    """The Rust tokenizer alone: encode_batch_fast over batches of BATCH_LINES documents."""
    from transformers import AutoTokenizer

    backend = AutoTokenizer.from_pretrained(tok_dir).backend_tokenizer
    with open(corpus, encoding="utf-8") as f:
        lines = [ln for ln in f.read().split("\n") if ln.strip()]
    tokens = 0
    start = time.perf_counter()
    for i in range(0, len(lines), BATCH_LINES):
        tokens += sum(len(e) for e in backend.encode_batch_fast(lines[i : i + BATCH_LINES], add_special_tokens=False))
    return {"tokens": tokens, "seconds": time.perf_counter() - start, "documents": len(lines)}


# ----------------------------------------------------------------------------- the three methods (parent)
def bench_hf(corpus: Path, tok: Path, tmp: Path) -> dict:
    cache = tempfile.mkdtemp(prefix="hf-cache-", dir=tmp)
    r = run_child("hf", corpus, tok, WORKERS, cache)
    shutil.rmtree(cache, ignore_errors=True)
    return r


def bench_bare(corpus: Path, tok: Path) -> dict:
    return run_child("bare", corpus, tok, env=child_env(TOKENIZERS_PARALLELISM="true",
                                                         RAYON_NUM_THREADS=str(WORKERS)))


def bench_tedprep(corpus: Path, tok: Path, tmp: Path) -> dict:
    out = Path(tempfile.mkdtemp(prefix="tedprep-", dir=tmp)) / "out"
    m = measure([PY, "-m", "data_prep", "build", "--input", str(corpus), "--tokenizer", str(tok), "--out", str(out),
                 "--workers", str(WORKERS), "--no-progress"], env=child_env())
    totals = json.loads((out / "manifest.json").read_text())["totals"]
    loop = re.search(r"time: ([\d.]+) s", m["stderr"])
    shutil.rmtree(out.parent, ignore_errors=True)
    tokens = sum(t["tokens"] for t in totals.values())
    return {"tokens": tokens, "documents": sum(t["documents"] for t in totals.values()), "seconds": m["wall_s"],
            "loop_s": float(loop.group(1)) if loop else None, "wall_s": m["wall_s"], "peak_rss_mb": m["peak_rss_mb"]}


def startup_seconds(repeats: int = 3) -> float:
    """Interpreter + CLI start-up: best of ``python -m data_prep --help``."""
    return min(measure([PY, "-m", "data_prep", "--help"], env=child_env())["wall_s"] for _ in range(repeats))


# ----------------------------------------------------------------------------- driver
def machine() -> dict:
    import datasets
    import tokenizers
    import transformers

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout.strip()

    return {"cpu_count": os.cpu_count(), "physical_cores": psutil.cpu_count(logical=False),
            "memory_gb": round(psutil.virtual_memory().total / 2**30, 1), "platform": platform.platform(),
            "python": platform.python_version(), "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__, "datasets": datasets.__version__,
            "git_head": git("rev-parse", "--short", "HEAD"), "data_prep_dirty": bool(git("status", "--porcelain",
                                                                                          "data_prep")),
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}


def run(quick: bool = False) -> dict:
    """Run the whole benchmark; return the figures (also written to bench/results/prep.json)."""
    copies = 1 if quick else 10
    with tempfile.TemporaryDirectory(prefix="prep-bench-") as d:
        tmp = Path(d)
        one, corpus = make_corpus(tmp, copies)
        tok, tok_desc = make_tokenizer(tmp, one)
        methods = {"hf-run_clm": bench_hf(corpus, tok, tmp), "bare-tokenizer": bench_bare(corpus, tok),
                   "ted-prep": bench_tedprep(corpus, tok, tmp)}
        small = bench_tedprep(one, tok, tmp) if copies > 1 else methods["ted-prep"]
        # past the allocator's warm-up: 3 copies vs 30 copies
        rss_curve = {} if quick else {n: bench_tedprep(make_corpus(tmp, n)[1], tok, tmp)["peak_rss_mb"]
                                      for n in (3, 30)}
        corpus_mb = corpus.stat().st_size / 2**20
    for m in methods.values():
        m["tokens_per_s"] = m["tokens"] / m["seconds"]
    startup = startup_seconds()
    ted = methods["ted-prep"]
    ted["cli_startup_s"] = startup  # interpreter + argparse only: the CLI imports lazily
    ted["fixed_overhead_s"] = ted["seconds"] - ted["loop_s"]  # imports, tokenizer load/fingerprint/save, pool
    ted["tokens_per_s_loop"] = ted["tokens"] / ted["loop_s"]
    result = {
        "corpus": {"copies": copies, "mb": round(corpus_mb, 1)}, "tokenizer": tok_desc, "workers": WORKERS,
        "methods": methods, "ted_prep_1x": small,
        "ratios": {
            "tedprep_vs_hf_tokens_per_s": ted["tokens_per_s"] / methods["hf-run_clm"]["tokens_per_s"],
            "tedprep_vs_bare_tokens_per_s": ted["tokens_per_s"] / methods["bare-tokenizer"]["tokens_per_s"],
            "tedprep_peak_rss_nx_vs_1x": ted["peak_rss_mb"] / small["peak_rss_mb"],
            **({"tedprep_peak_rss_30x_vs_3x": rss_curve[30] / rss_curve[3]} if rss_curve else {}),
        },
        "ted_prep_peak_rss_mb_by_copies": {1: small["peak_rss_mb"], copies: ted["peak_rss_mb"], **rss_curve},
        # every child's whole process wall (interpreter, imports and tokenizer load included for all three)
        "ratios_whole_process": {
            "tedprep_vs_hf": methods["hf-run_clm"]["wall_s"] / ted["wall_s"],
            "tedprep_vs_bare": methods["bare-tokenizer"]["wall_s"] / ted["wall_s"],
        },
        "goals": {"tedprep_vs_hf_tokens_per_s": ">= 1.3", "tedprep_vs_bare_tokens_per_s": ">= 0.9",
                  "tedprep_peak_rss_nx_vs_1x": "~1 (flat)", "tedprep_peak_rss_30x_vs_3x": "~1 (flat)"},
        "machine": machine(),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    return result


def table(r: dict) -> str:
    rows = [f"corpus {r['corpus']['mb']} MB ({r['corpus']['copies']} copies), tokenizer {r['tokenizer']}, "
            f"W={r['workers']}, {r['machine']['cpu_count']} CPUs, {r['machine']['git_head']}",
            f"{'method':<16}{'tokens':>12}{'seconds':>10}{'tokens/s':>12}{'peak RSS MB':>13}{'process wall s':>16}"]
    for name, m in r["methods"].items():
        rows.append(f"{name:<16}{m['tokens']:>12,}{m['seconds']:>10.2f}{m['tokens_per_s']:>12,.0f}"
                    f"{m['peak_rss_mb']:>13,.0f}{m['wall_s']:>16.2f}")
    ted, small = r["methods"]["ted-prep"], r["ted_prep_1x"]
    rows.append(f"ted-prep: `python -m data_prep --help` {ted['cli_startup_s']:.2f} s; its own tokenize loop "
                f"{ted['loop_s']} s ({ted['tokens_per_s_loop']:,.0f} tokens/s), the other "
                f"{ted['fixed_overhead_s']:.2f} s is imports + tokenizer load/fingerprint/save")
    rows.append(f"ted-prep 1 copy: {small['seconds']:.2f} s, peak RSS {small['peak_rss_mb']:,.0f} MB")
    rows.append("ted-prep peak RSS MB by corpus copies: " + ", ".join(
        f"{n}x {mb:,.0f}" for n, mb in sorted(r["ted_prep_peak_rss_mb_by_copies"].items(), key=lambda kv: int(kv[0]))))
    for key, value in r["ratios"].items():
        rows.append(f"{key:<32}{value:>7.2f}   goal {r['goals'][key]}")
    rows.append("on whole-process wall: " + ", ".join(f"{k} {v:.2f}" for k, v in r["ratios_whole_process"].items()))
    return "\n".join(rows)


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        kind, args = sys.argv[2], sys.argv[3:]
        figures = child_hf(args[0], args[1], int(args[2]), args[3]) if kind == "hf" else child_bare(*args)
        print(json.dumps(figures))
        return
    result = run(quick="--quick" in sys.argv)
    print(table(result))
    print(f"written to {RESULTS.relative_to(REPO)}")


if __name__ == "__main__":
    main()
