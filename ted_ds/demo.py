"""The main job end to end on the bundled corpus, 2 CPU ranks under the deepspeed launcher.

    python -m ted_ds.demo [--out runs/demo] [--quick]

1. ted-prep: train a 4k SentencePiece tokenizer on the bundled Wikipedia sample, build shards.
2. Pre-train a tiny LLaMA-style teacher (method: lm).
3. TED stage 1: learn the teacher's and the student's filters (student = teacher blocks 2 and 4,
   the blocks its two blocks are matched to).
4. TED stage 2: distill; then the same-budget kd and lm students.
5. Print validation perplexity of every student next to the teacher's, and for each pair whether
   the difference is outside the evaluation's noise (paired over the same validation windows).
6. Continual pre-training: the TED student goes on (``train.init_from``) on a new domain, the
   bundled public-domain books, blended with 25 % replay of the Wikipedia data (``data.sources``),
   re-warmed with a WSD schedule; per-source perplexity before and after shows what it learnt and
   what it kept.

Each step is the real command; re-running skips finished steps (and resumes unfinished ones).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from ted_ds.launch import local_deepspeed_command

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
BOOKS = os.path.join(REPO, "data_prep", "sample", "books_sample.txt.gz")  # public domain, see its README


def _run(cmd: list[str], what: str) -> None:
    print(f"\n=== {what}\n$ {' '.join(cmd)}", flush=True)
    start = time.time()
    if subprocess.run(cmd).returncode != 0:
        sys.exit(f"demo: step failed: {what}")
    print(f"=== {what}: {time.time() - start:.0f} s", flush=True)


def _deepspeed(nproc: int, *args: str) -> list[str]:
    return local_deepspeed_command(nproc, "--module", "ted_ds", *args)


def _eval_ppl(model_dir: str, data: str, seq_len: int, samples: int) -> float:
    r = subprocess.run([sys.executable, "-m", "ted_ds", "eval", model_dir, "--data", data, "--seq-len", str(seq_len),
                        "--max-samples", str(samples), "--device", "cpu", "--json"], capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"demo: evaluating {model_dir} on {data} failed:\n{r.stderr[-2000:]}")
    return json.loads(r.stdout)["ppl"]


def _final(out_dir: str, key: str) -> float:
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        values = [json.loads(line).get(key) for line in f]
    return [v for v in values if v is not None][-1]


def _compare(models: dict[str, str], data: str, seq_len: int) -> list[str]:
    """Validation perplexity of each model and, for each pair, the paired difference in loss over the
    same windows with its 95 % interval: 'within noise' when that interval holds 0."""
    from ted_ds.evaluate import evaluate_hf, paired_difference

    scores = {name: evaluate_hf(path, data, "valid", seq_len, 8, None, "cpu", progress=False, per_window=True)
              for name, path in models.items()}
    lines = [f"  {name:<28} {s['ppl']:10.2f}" for name, s in scores.items()]
    lines.append(f"paired over the same {scores['teacher']['samples']} validation windows (loss difference, 95 % "
                 "interval; one training seed, so this is the evaluation's noise only — a seed's is larger, see "
                 "bench/repro.py):")
    names = list(models)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            d = paired_difference(scores[a]["window_loss"], scores[b]["window_loss"])
            verdict = "within noise" if d["within_noise"] else f"{a if d['mean'] < 0 else b} lower on these windows"
            lines.append(f"  {a} − {b}: {d['mean']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}]  {verdict}")
    return lines


def _prepare_data(out: str) -> tuple[str, str]:
    """Tokenizer and shards of the bundled Wikipedia sample."""
    tok, data = os.path.join(out, "tokenizer"), os.path.join(out, "data")
    if not os.path.isdir(tok):
        _run([sys.executable, "-m", "data_prep", "tokenizer", "--input", "sample", "--vocab-size", "4000", "--out",
              tok], "train a SentencePiece tokenizer on the bundled corpus")
    _run([sys.executable, "-m", "data_prep", "build", "--input", "sample", "--tokenizer", tok, "--out", data,
          "--workers", "2", "--valid-fraction", "0.02", "--no-progress"], "build packed token shards")
    return tok, data


def _trainer(out: str, data: str, ranks: int, quick: bool):
    """``train(what, name, steps, command, *overrides)``: one real command on demo.yaml with the demo's paths."""
    base = os.path.join(HERE, "configs", "demo.yaml")
    paths = [f"data.path={data}", f"teacher.path={out}/teacher/hf",
             f"teacher.filters={out}/filters-teacher/filters-teacher",
             f"student.filters={out}/filters-student/filters-student",
             f"train.deepspeed_config={os.path.join(REPO, 'ds_configs', 'zero3_cpu.json')}"]
    # last, so that --quick evaluates and saves every 2 steps in every command, the teacher's included
    smoke = ["train.eval_interval=2", "train.log_interval=1", "train.save_interval=2", "data.eval_samples=8"]

    def train(what: str, name: str, n_steps: int, command: list[str], *overrides: str) -> None:
        _run(_deepspeed(ranks, *command, "--config", base, *paths, f"train.out_dir={out}/{name}",
                        f"train.steps={n_steps}", *overrides, *(smoke if quick else [])), what)

    return train


def _distil(train, steps: dict) -> None:
    """Steps 2–4: the teacher, stage 1 on both sides, and the ted, kd and lm students."""
    train("pre-train the teacher (method: lm)", "teacher", steps["teacher"], ["distill"],
          f"student.config={os.path.join(HERE, 'configs', 'demo_teacher.json')}", "student.init_from_teacher=null",
          "distill.method=lm", "optim.lr=3e-3", "train.eval_interval=200", "train.save_interval=400")
    for side in ("teacher", "student"):
        train(f"TED stage 1: {side} filters", f"filters-{side}", steps["filters"],
              ["learn-filters", "--model", side], "optim.lr=1e-2")
    for method in ("ted", "kd", "lm"):
        train(f"student by {method}", method, steps["student"], ["distill"], f"distill.method={method}")


def _continual(train, out: str, tok: str, data: str, steps: int, quick: bool) -> list[str]:
    """Step 6: the TED student on books with 25 % Wikipedia replay; per-source perplexity before and after."""
    books = os.path.join(out, "data-books")
    _run([sys.executable, "-m", "data_prep", "build", "--input", BOOKS, "--tokenizer", tok, "--out", books,
          "--workers", "2", "--valid-fraction", "0.05", "--no-progress"],
         "build the new domain's shards (books, the same tokenizer)")
    sources = {"books": books, "wiki": data}
    before = {name: _eval_ppl(f"{out}/ted/hf", path, 128, 8 if quick else 64) for name, path in sources.items()}
    train("continual pre-training of the TED student: books + 25 % Wikipedia replay, WSD re-warmed", "continual",
          steps, ["distill"], "distill.method=lm", f"train.init_from={out}/ted/hf", "student.init_from_teacher=null",
          "data.path=''",
          f"data.sources=[{{name: books, path: {books}, weight: 0.75}}, {{name: wiki, path: {data}, weight: 0.25}}]",
          "optim.schedule=wsd", "optim.decay_fraction=0.2", f"optim.warmup_steps={1 if quick else 10}",
          "optim.lr=1e-3", "optim.min_lr=1e-4", "optim.warmup_start_lr=2e-4")
    after = {name: _final(f"{out}/continual", f"eval/{name}/ppl") for name in sources}
    return [f"  {'source':<10} {'before':>10} {'after':>10}",
            *(f"  {name:<10} {before[name]:10.2f} {after[name]:10.2f}" for name in sources)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ted_ds.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/demo", help="where everything goes (default runs/demo)")
    parser.add_argument("--ranks", type=int, default=2, help="processes per training command (default 2)")
    parser.add_argument("--quick", action="store_true", help="a few steps per command (smoke test)")
    args = parser.parse_args(argv)
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    start = time.time()
    tok, data = _prepare_data(out)
    steps = {"teacher": 800, "filters": 40, "student": 100, "continual": 100}
    if args.quick:
        steps = {"teacher": 6, "filters": 3, "student": 4, "continual": 4}
    train = _trainer(out, data, args.ranks, args.quick)
    _distil(train, steps)
    table = _compare({"teacher": f"{out}/teacher/hf", **{m: f"{out}/{m}/hf" for m in ("ted", "kd", "lm")}}, data, 128)
    continual = _continual(train, out, tok, data, steps["continual"], args.quick)
    print(f"\nvalidation perplexity on {data}: teacher (4 layers, lm) and 2-layer students, same token budget:")
    print("\n".join(table))
    print("\ncontinual pre-training of the TED student (75 % books, 25 % Wikipedia replay), validation perplexity:")
    print("\n".join(continual))
    print(f"demo finished in {time.time() - start:.0f} s; students in {out}/{{ted,kd,lm,continual}}/hf")
    return 0

if __name__ == "__main__":
    sys.exit(main())
