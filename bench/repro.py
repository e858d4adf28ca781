"""A small-scale reproduction of TED's claim on real English text, end to end.

    python bench/repro.py [--quick] [--seeds 3] [--out bench/results/repro]

The claim (Liang et al., 2023): a TED student beats KD and layer-wise distillation (LWD), which beat
plain LM training of the same student under the same budget. Here, on CPU:

1. data: the Wikipedia sample (../shared/data/enwiki_sample.txt when present, else the bundled copy)
   plus any --extra-corpus files; an 8k SentencePiece tokenizer trained by `ted-prep tokenizer`;
   shards with 2 % of documents held out;
2. a LLaMA-style teacher (8 layers, d=256) pre-trained with `distill.method=lm`;
3. per seed: TED stage 1 on both sides, then four students (4 layers, initialised from teacher layers
   0, 2, 4, 6) trained on the same tokens with `lm`, `kd`, `lwd` and `ted`;
4. every student exported to HF and scored on the held-out split (`ted-ds eval`: perplexity) and by
   lm-evaluation-harness (`loglikelihood_rolling` on held-out documents: word perplexity, bits/byte);
5. results.md (mean ± std over seeds), results.json, loss_curves.png and perplexity.png.

--quick shrinks everything (tiny models, a corpus slice, one seed, a few steps) to check the pipeline.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import REPO, corpus_path, machine, run  # noqa: E402
from ted_ds.launch import local_deepspeed_command as deepspeed  # noqa: E402

METHODS = ("lm", "kd", "lwd", "ted")

FULL = {"vocab": 8000, "teacher_layers": 8, "hidden": 256, "heads": 4, "seq_len": 128, "micro": 8, "global": 16,
        "teacher_steps": 800, "filter_steps": 40, "student_steps": 100, "student_layers": [0, 2, 4, 6],
        "corpus_lines": None, "eval_samples": 256, "heldout_docs": 150}
QUICK = {"vocab": 1000, "teacher_layers": 4, "hidden": 64, "heads": 4, "seq_len": 32, "micro": 2, "global": 8,
         "teacher_steps": 20, "filter_steps": 3, "student_steps": 4, "student_layers": [0, 2],
         "corpus_lines": 1500, "eval_samples": 16, "heldout_docs": 8}


def prepare_data(out: str, size: dict, corpus: str | None, extra: list[str]) -> tuple[str, str, str]:
    """Tokenizer, shards, and a JSONL of held-out documents (the valid split's own documents)."""
    from data_prep.format import split_of

    corpus = corpus or corpus_path(out)
    if size["corpus_lines"]:
        sliced = os.path.join(out, "corpus-slice.txt")
        with open(corpus, encoding="utf-8") as f, open(sliced, "w", encoding="utf-8") as g:
            for _, line in zip(range(size["corpus_lines"]), f):
                g.write(line)
        corpus = sliced
    inputs = [corpus, *extra]
    tok, data = os.path.join(out, "tokenizer"), os.path.join(out, "data")
    if not os.path.isdir(tok):
        run([sys.executable, "-m", "data_prep", "tokenizer", "--input", *inputs, "--vocab-size", str(size["vocab"]),
             "--out", tok])
    run([sys.executable, "-m", "data_prep", "build", "--input", *inputs, "--tokenizer", tok, "--out", data,
         "--valid-fraction", "0.02", "--workers", "2", "--no-progress"])
    heldout = os.path.join(out, "heldout.jsonl")
    with open(corpus, encoding="utf-8") as f, open(heldout, "w") as g:
        kept = 0
        for line in f:
            text = line.rstrip("\n")
            if text.strip() and split_of(text.encode(), 1234, 0.02) == "valid" and kept < size["heldout_docs"]:
                g.write(json.dumps({"text": text}) + "\n")
                kept += 1
    return tok, data, heldout


def teacher_config(out: str, tok: str, size: dict) -> str:
    from data_prep.tokenizer import load_tokenizer

    vocab = len(load_tokenizer(tok))
    path = os.path.join(out, "teacher_config.json")
    with open(path, "w") as f:
        json.dump({"model_type": "llama", "vocab_size": vocab, "hidden_size": size["hidden"],
                   "intermediate_size": size["hidden"] * 8 // 3 // 8 * 8, "num_hidden_layers": size["teacher_layers"],
                   "num_attention_heads": size["heads"], "num_key_value_heads": size["heads"],
                   "max_position_embeddings": 512, "tie_word_embeddings": False, "bos_token_id": 1,
                   "eos_token_id": 2}, f)
    return path


def write_run_config(out: str, data: str, size: dict) -> str:
    import yaml

    k_t = size["teacher_layers"] // len(size["student_layers"])
    cfg = {"teacher": {"path": f"{out}/teacher/hf"},
           "student": {"init_from_teacher": size["student_layers"]},
           "data": {"path": data, "seq_len": size["seq_len"], "eval_samples": size["eval_samples"]},
           "distill": {"method": "ted", "alpha": 1.0, "beta": 1.0, "temperature": 2.0, "teacher_every": k_t,
                       "student_every": 1, "layer_loss": "normalized_mse"},
           "optim": {"lr": 1e-3, "min_lr": 1e-4, "warmup_steps": max(1, size["student_steps"] // 10)},
           "train": {"micro_batch_size": size["micro"], "global_batch_size": size["global"], "steps": 1,
                     "log_interval": 1, "eval_interval": 10**6, "save_interval": 10**6, "progress": False,
                     "deepspeed_config": os.path.join(REPO, "ds_configs", "zero3_cpu.json")}}
    path = os.path.join(out, "run.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f, sort_keys=False)
    return path


def train(ranks: int, command: list[str], config: str, *overrides: str) -> None:
    run(deepspeed(ranks, "--module", "ted_ds", *command, "--config", config, *overrides),
        env={"DS_ACCELERATOR": "cpu"}, timeout=7200)


def curve(out_dir: str) -> list[tuple[int, float]]:
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return [(r["step"], r["loss/lm"]) for r in rows if "loss/lm" in r]


def lm_eval_scores(models: dict[str, str], heldout: str, workdir: str) -> dict[str, dict]:
    """loglikelihood_rolling on the held-out documents, in-process, offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import lm_eval
    from lm_eval.tasks import TaskManager

    from ted_ds.evaluate import write_rolling_task

    task_dir = os.path.join(workdir, "lm_eval_tasks")
    write_rolling_task(task_dir, "ted_heldout", heldout)
    manager = TaskManager(include_path=task_dir, include_defaults=False)
    scores = {}
    for name, path in models.items():
        result = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={path},dtype=float32",
                                         tasks=["ted_heldout"], device="cpu", batch_size=8, task_manager=manager)
        r = result["results"]["ted_heldout"]
        scores[name] = {"word_perplexity": r["word_perplexity,none"], "bits_per_byte": r["bits_per_byte,none"]}
    return scores


def mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def write_report(out: str, results: dict, size: dict, seeds: list[int]) -> str:
    rows = []
    t = results["teacher"]
    lines = ["# TED reproduction (small scale, CPU)", "",
             f"{results['machine']['date']}, commit {results['machine']['commit']}, "
             f"{results['machine']['cpus']} CPUs; seeds {seeds}; produced by `bench/repro.py`.", "",
             f"Teacher: LLaMA-style, {size['teacher_layers']} layers, d={size['hidden']}, "
             f"{t['steps']} steps ({t['tokens']:,} tokens). Students: {len(size['student_layers'])} layers "
             f"initialised from teacher layers {size['student_layers']}, {size['student_steps']} steps "
             f"({results['student_tokens']:,} tokens) each, same data order per seed. KD/LWD/TED: α=1, T=2; "
             "LWD/TED: β=1, normalized MSE, taps every "
             f"{size['teacher_layers'] // len(size['student_layers'])} teacher layers ↔ every student layer.", "",
             "| model | held-out perplexity (ted-ds eval) | lm-eval word perplexity | lm-eval bits/byte |",
             "|---|---|---|---|",
             f"| teacher | {t['eval']['ppl']:.2f} | {t['lm_eval']['word_perplexity']:.1f} | "
             f"{t['lm_eval']['bits_per_byte']:.4f} |"]
    for m in METHODS:
        runs = results["students"][m]
        ppl = mean_std([r["eval"]["ppl"] for r in runs])
        wp = mean_std([r["lm_eval"]["word_perplexity"] for r in runs])
        bpb = mean_std([r["lm_eval"]["bits_per_byte"] for r in runs])
        rows.append((m, ppl))
        lines.append(f"| student {m} | {ppl[0]:.2f} ± {ppl[1]:.2f} | {wp[0]:.1f} ± {wp[1]:.1f} | "
                     f"{bpb[0]:.4f} ± {bpb[1]:.4f} |")
    order = [m for m, _ in sorted(rows, key=lambda r: r[1][0])]
    lines += ["", f"Ranking by held-out perplexity (best first): {' < '.join(order)}.", "",
              "The paper's claim, pair by pair (paired per seed: both students saw the same batches in the same "
              "order):", ""]
    ppl_of = lambda m: [r["eval"]["ppl"] for r in results["students"][m]]
    for better, worse in (("ted", "kd"), ("ted", "lwd"), ("kd", "lm"), ("lwd", "lm")):
        c = paired_comparison(ppl_of(better), ppl_of(worse))
        lines.append(f"* {better} < {worse}: **{c['verdict']}** (paired Δ = {c['mean']:+.2f} ppl, 95 % t interval "
                     f"[{c['low']:+.2f}, {c['high']:+.2f}], p = {c['p']:.3f}; {better} better in "
                     f"{c['favourable']} of {c['n']} seeds; the smallest difference this study detects with 80 % "
                     f"power: {c['detectable']:.2f} ppl)")
    lines += ["", "![loss curves](loss_curves.png) ![perplexity](perplexity.png)"]
    path = os.path.join(out, "results.md")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def paired_comparison(better: list[float], worse: list[float], confidence: float = 0.95,
                      power: float = 0.8) -> dict:
    """Paired t analysis of per-seed differences ``better − worse`` (negative favours ``better``).

    The verdict says "holds" only when the whole interval is below 0, "reversed" when it is above,
    and "no detectable difference" otherwise; ``detectable`` is the smallest true difference the
    same number of seeds would find with ``power`` (two-sided, at this spread)."""
    from scipy import stats

    d = [b - w for b, w in zip(better, worse)]
    n = len(d)
    if n < 2:
        nan = float("nan")
        return {"n": n, "mean": d[0] if d else nan, "low": nan, "high": nan, "p": nan, "detectable": nan,
                "favourable": sum(x < 0 for x in d), "verdict": "no detectable difference (one seed)"}
    mean, se = statistics.mean(d), statistics.stdev(d) / math.sqrt(n)
    t_crit = stats.t.ppf(1 - (1 - confidence) / 2, n - 1)
    low, high = mean - t_crit * se, mean + t_crit * se
    p = 2 * stats.t.sf(abs(mean) / se, n - 1) if se > 0 else float(mean == 0)
    verdict = "holds" if high < 0 else "reversed" if low > 0 else "no detectable difference"
    return {"n": n, "mean": mean, "low": low, "high": high, "p": p, "favourable": sum(x < 0 for x in d),
            "detectable": (t_crit + stats.t.ppf(power, n - 1)) * se, "verdict": verdict}


def plot(out: str, results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for m in METHODS:
        curves = [dict(r["curve"]) for r in results["students"][m]]
        steps = sorted(curves[0])
        mean = [statistics.mean(c[s] for c in curves) for s in steps]
        window = max(1, len(steps) // 10)  # a moving average: per-batch losses are noisy
        smooth = [statistics.mean(mean[max(0, i - window + 1): i + 1]) for i in range(len(mean))]
        ax.plot(steps, smooth, label=m)
    ax.set_xlabel("step")
    ax.set_ylabel("train LM loss")
    ax.set_title(f"Students: next-token loss (mean of seeds, {max(1, len(steps) // 10)}-step moving average)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, "loss_curves.png"), dpi=110)
    fig, ax = plt.subplots(figsize=(6, 4))
    stats = [mean_std([r["eval"]["ppl"] for r in results["students"][m]]) for m in METHODS]
    ax.bar(METHODS, [s[0] for s in stats], yerr=[s[1] for s in stats], capsize=6, color="#4c72b0")
    lo = min(s[0] - s[1] for s in stats)
    ax.set_ylim(lo * 0.97, max(s[0] + s[1] for s in stats) * 1.01)
    ax.set_ylabel("held-out perplexity (lower is better)")
    ax.set_title("Students after the same token budget")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "perplexity.png"), dpi=110)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny models and budget: checks the pipeline only")
    ap.add_argument("--seeds", type=int, help="seeds per method (default 3, quick 1)")
    ap.add_argument("--ranks", type=int, default=2, help="processes per training command")
    ap.add_argument("--out", help="results directory (default bench/results/repro[-quick])")
    ap.add_argument("--corpus", help="main corpus, one document per line (default: ../shared/data/enwiki_sample.txt "
                                     "if present, else the bundled sample)")
    ap.add_argument("--extra-corpus", nargs="*", default=[], help="more real text files for training")
    ap.add_argument("--report-only", action="store_true", help="rebuild results.md and the plots from results.json")
    args = ap.parse_args(argv)
    size = QUICK if args.quick else FULL
    seeds = list(range(1, 1 + (args.seeds or (1 if args.quick else 3))))
    out = os.path.abspath(args.out or os.path.join(REPO, "bench", "results", "repro-quick" if args.quick else "repro"))
    if args.report_only:
        results = json.load(open(os.path.join(out, "results.json")))
        print(open(write_report(out, results, results["size"], results["seeds"])).read())
        plot(out, results)
        return results
    work = os.path.join(out, "work")
    os.makedirs(work, exist_ok=True)
    start = time.time()

    tok, data, heldout = prepare_data(work, size, args.corpus, args.extra_corpus)
    config = write_run_config(work, data, size)
    common = [f"train.steps={size['student_steps']}"]
    train(args.ranks, ["distill"], config, f"student.config={teacher_config(work, tok, size)}",
          "student.init_from_teacher=null", "distill.method=lm", f"train.out_dir={work}/teacher",
          f"train.steps={size['teacher_steps']}", "optim.lr=3e-3", "optim.min_lr=3e-4",
          f"optim.warmup_steps={max(1, size['teacher_steps'] // 20)}")
    for seed in seeds:
        s = f"{work}/seed{seed}"
        filters = [f"teacher.filters={s}/filters-teacher/filters-teacher",
                   f"student.filters={s}/filters-student/filters-student"]
        for side in ("teacher", "student"):
            train(args.ranks, ["learn-filters", "--model", side], config, *filters, f"train.seed={seed}",
                  f"train.out_dir={s}/filters-{side}", f"train.steps={size['filter_steps']}", "optim.lr=1e-2")
        for m in METHODS:
            train(args.ranks, ["distill"], config, *filters, *common, f"train.seed={seed}",
                  f"distill.method={m}", f"train.out_dir={s}/{m}")

    from ted_ds.evaluate import evaluate_hf

    evaluate = lambda path: evaluate_hf(path, data, "valid", size["seq_len"], 8, None, "cpu", progress=False)
    models = {"teacher": f"{work}/teacher/hf"}
    models.update({f"{m}/{seed}": f"{work}/seed{seed}/{m}/hf" for m in METHODS for seed in seeds})
    harness = lm_eval_scores(models, heldout, work)
    results = {"machine": machine(), "size": size, "seeds": seeds,
               "student_tokens": size["student_steps"] * size["global"] * size["seq_len"],
               "teacher": {"steps": size["teacher_steps"],
                           "tokens": size["teacher_steps"] * size["global"] * size["seq_len"],
                           "eval": evaluate(models["teacher"]), "lm_eval": harness["teacher"]},
               "students": {m: [{"seed": seed, "eval": evaluate(models[f"{m}/{seed}"]),
                                 "lm_eval": harness[f"{m}/{seed}"], "curve": curve(f"{work}/seed{seed}/{m}")}
                                for seed in seeds] for m in METHODS}}
    results["elapsed_s"] = time.time() - start
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    report = write_report(out, results, size, seeds)
    plot(out, results)
    print(open(report).read())
    print(f"repro: {results['elapsed_s'] / 60:.1f} min; results in {out}")
    assert all(math.isfinite(r["eval"]["ppl"]) for m in METHODS for r in results["students"][m])
    return results


if __name__ == "__main__":
    main()
