"""A small-scale study of TED's claim on real English text, end to end, tuned and paired.

    python bench/repro.py [--quick] [--seeds 5] [--jobs 2] [--out bench/results/repro]

The claim (Liang et al., 2023): a TED student beats KD and layer-wise distillation (LWD), which beat
plain LM training of the same student under the same budget. Here, on CPU:

1. data: the Wikipedia sample (../shared/data/enwiki_sample.txt when present, else the bundled copy)
   for training and the valid split (2 % of documents, used for tuning); the **test split** is the
   bundled public-domain books sample (~270k tokens), a corpus the teacher never trained on;
2. a LLaMA-style teacher (6 layers, d=192, 4k vocabulary) pre-trained with `distill.method=lm`;
3. two student geometries, each distilled from the same teacher:
   * ``same-width``: 3 layers, d=192, initialised from teacher blocks 2, 4, 6 (1-based) — the
     blocks student blocks 1–3 are matched to (taps: every 2nd teacher layer ↔ every student layer);
   * ``narrow``: the paper's shape, d=96 = d_t/2 and half the depth, pre-trained on its own with
     `lm` first, then continued with each method (filters map 96 → 192);
4. stage 1 once per model and head kind (``distill.filter_head`` teacher | trainable); stage 2 per seed;
5. tuning on the valid split at seed 1 (`search`): KD's α, and TED's and LWD's β then α (the other
   held at its best), each over a window of its ladder that widens while the best value sits at an
   edge; the chosen weights then run on every seed (same data order per seed across methods, so
   comparisons pair); ``ted-trainable`` (TED with its own stage-1 heads) reuses TED's weights;
6. every student exported to HF and scored on the test split (`ted-ds eval` perplexity) and by
   lm-evaluation-harness (`loglikelihood_rolling` on test documents at max_length = training length);
7. results.md (mean ± std, paired intervals and verdicts, tuning and stage-1 tables), results.json,
   loss_curves.png and perplexity.png.

--quick shrinks everything (tiny models, a corpus slice, two seeds, a few steps) to check the pipeline.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import shutil
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import REPO, corpus_path, machine, run  # noqa: E402
from ted_ds.launch import local_deepspeed_command as deepspeed  # noqa: E402

METHODS = ("lm", "kd", "lwd", "ted", "ted-trainable")
GEOMETRIES = ("same-width", "narrow")
SEARCH = {"kd": ("alpha",), "lwd": ("beta", "alpha"), "ted": ("beta", "alpha")}  # the weights tuned, in order
LADDERS = {"alpha": (0.25, 0.5, 1.0, 2.0, 4.0, 8.0), "beta": (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)}
BOOKS = os.path.join(REPO, "data_prep", "sample", "books_sample.txt.gz")

FULL = {"vocab": 4096, "teacher_layers": 6, "hidden": 192, "heads": 4, "seq_len": 128, "micro": 8, "global": 16,
        "teacher_steps": 600, "base_steps": 300, "filter_steps": 40, "student_steps": 40, "student_layers": 3,
        "corpus_lines": None, "eval_samples": 256, "test_tokens": 200_000, "heldout_docs": 100,
        "window": {"alpha": (0.5, 2.0), "beta": (0.1, 10.0)}, "widen": True}
QUICK = {"vocab": 1000, "teacher_layers": 4, "hidden": 64, "heads": 4, "seq_len": 32, "micro": 2, "global": 8,
         "teacher_steps": 20, "base_steps": 4, "filter_steps": 3, "student_steps": 4, "student_layers": 2,
         "corpus_lines": 1500, "eval_samples": 16, "test_tokens": 2_000, "heldout_docs": 8,
         "window": {"alpha": (1.0, 1.0), "beta": (1.0, 3.0)}, "widen": False}


# ----------------------------------------------------------------------------- data and models
def prepare_data(out: str, size: dict, corpus: str | None) -> dict:
    """Tokenizer and shards of the training corpus; the books test set as shards and as documents."""
    corpus = corpus or corpus_path(out)
    if size["corpus_lines"]:
        sliced = os.path.join(out, "corpus-slice.txt")
        if not os.path.exists(sliced):  # written once: a re-run finds the same source and its built shards
            with open(corpus, encoding="utf-8") as f, open(sliced, "w", encoding="utf-8") as g:
                for _, line in zip(range(size["corpus_lines"]), f):
                    g.write(line)
        corpus = sliced
    tok, data, test = (os.path.join(out, d) for d in ("tokenizer", "data", "test"))
    if not os.path.isdir(tok):
        run([sys.executable, "-m", "data_prep", "tokenizer", "--input", corpus, "--vocab-size", str(size["vocab"]),
             "--out", tok])
    build = [sys.executable, "-m", "data_prep", "build", "--tokenizer", tok, "--workers", "2", "--no-progress"]
    run([*build, "--input", corpus, "--out", data, "--valid-fraction", "0.02"])
    run([*build, "--input", BOOKS, "--out", test, "--valid-fraction", "0"])  # all of it: split "train"
    heldout = os.path.join(out, "test-docs.jsonl")
    with gzip.open(BOOKS, "rt", encoding="utf-8") as f, open(heldout, "w") as g:
        docs = [line.rstrip("\n") for line in f if line.strip()]
        for text in docs[:: max(1, len(docs) // size["heldout_docs"])][: size["heldout_docs"]]:
            g.write(json.dumps({"text": text}) + "\n")
    return {"tokenizer": tok, "data": data, "test": test, "test_docs": heldout}


def llama_config(out: str, name: str, tok: str, hidden: int, layers: int, heads: int) -> str:
    from data_prep.tokenizer import load_tokenizer

    path = os.path.join(out, f"{name}_config.json")
    with open(path, "w") as f:
        json.dump({"model_type": "llama", "vocab_size": len(load_tokenizer(tok)), "hidden_size": hidden,
                   "intermediate_size": hidden * 8 // 3 // 8 * 8, "num_hidden_layers": layers,
                   "num_attention_heads": heads, "num_key_value_heads": heads, "max_position_embeddings": 512,
                   "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2}, f)
    return path


def write_run_config(out: str, data: str, size: dict) -> str:
    import yaml

    cfg = {"teacher": {"path": f"{out}/teacher/hf"},
           "student": {"init_from_teacher": aligned_blocks(size)},
           "data": {"path": data, "seq_len": size["seq_len"], "eval_samples": size["eval_samples"]},
           "distill": {"method": "ted", "alpha": 1.0, "beta": 1.0, "temperature": 2.0,
                       "teacher_every": size["teacher_layers"] // size["student_layers"], "student_every": 1,
                       "layer_loss": "normalized_mse"},
           "optim": {"lr": 1e-3, "min_lr": 1e-4, "warmup_steps": max(1, size["student_steps"] // 10)},
           "train": {"micro_batch_size": size["micro"], "global_batch_size": size["global"], "steps": 1,
                     "log_interval": 1, "eval_interval": 10**6, "save_interval": 10**6, "progress": False,
                     "deepspeed_config": os.path.join(REPO, "ds_configs", "zero3_cpu.json")}}
    path = os.path.join(out, "run.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f, sort_keys=False)
    return path


def aligned_blocks(size: dict) -> list[int]:
    """0-based teacher blocks whose outputs student blocks 1..n are matched to: k-1, 2k-1, … (k = interval)."""
    k = size["teacher_layers"] // size["student_layers"]
    return [k * (i + 1) - 1 for i in range(size["student_layers"])]


class Launcher:
    """Runs training commands, ``jobs`` at a time, each with ``ranks`` processes sharing the cores."""

    def __init__(self, config: str, ranks: int, jobs: int):
        self.config, self.ranks, self.jobs = config, ranks, jobs

    def one(self, command: list[str], overrides: list[str], jobs: int = 1) -> None:
        out_dir = next(o.split("=", 1)[1] for o in overrides if o.startswith("train.out_dir="))
        if os.path.isfile(os.path.join(out_dir, "DONE")):  # a re-run after an interruption resumes the study
            return
        shutil.rmtree(out_dir, ignore_errors=True)
        threads = max(1, (os.cpu_count() or 1) // (self.ranks * jobs))
        run(deepspeed(self.ranks, "--module", "ted_ds", *command, "--config", self.config, *overrides),
            env={"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": str(threads)}, timeout=7200)
        open(os.path.join(out_dir, "DONE"), "w").close()

    def many(self, runs: list[tuple[list[str], list[str]]]) -> None:
        with ThreadPoolExecutor(self.jobs) as pool:
            for f in [pool.submit(self.one, command, overrides, jobs=self.jobs) for command, overrides in runs]:
                f.result()


# ----------------------------------------------------------------------------- the study
def student_overrides(work: str, geometry: str) -> list[str]:
    if geometry == "same-width":
        return []
    return ["student.init_from_teacher=null", f"train.init_from={work}/narrow-base/hf"]


def filters(work: str, geometry: str, head: str) -> list[str]:
    return [f"teacher.filters={work}/filters/teacher-{head}", f"student.filters={work}/filters/{geometry}-{head}",
            f"distill.filter_head={head}"]


Point = tuple[tuple[str, float], ...]  # a method's tuned weights, e.g. (("alpha", 1.0), ("beta", 0.3)); () for lm


def method_overrides(work: str, geometry: str, method: str, point: Point) -> list[str]:
    """The overrides of one stage-2 run: method, tuned weights, filters."""
    base, head = ("ted", "trainable") if method == "ted-trainable" else (method, "teacher")
    o = [f"distill.method={base}", *student_overrides(work, geometry)]
    if base == "ted":
        o += filters(work, geometry, head)
    return o + [f"distill.{name}={value}" for name, value in point]


def run_dir(work: str, geometry: str, method: str, seed: int, point: Point) -> str:
    return f"{work}/{geometry}/{method}" + "".join(f"-{name[0]}{value:g}" for name, value in point) + f"/seed{seed}"


def label(point) -> str:
    """``alpha=1, beta=0.3`` from a point or a dict's items."""
    return ", ".join(f"{name}={value:g}" for name, value in point)


def pending(axes: tuple[str, ...], window: dict, widen: bool, scores: dict[Point, float]) -> list[Point]:
    """The points a coordinate search still has to score, given the ``scores`` so far (pure: re-derived
    on every call, so an interrupted study resumes where it stopped).

    Each axis in turn (the others held at their best so far, 1.0 before they are searched) is scored
    over the ladder's values inside ``window``; while the best of them is at the window's edge and the
    ladder goes further, the window widens by one rung on that side. Nothing pending: the search is done
    and its choice is the best score."""
    held = {axis: 1.0 for axis in axes}
    for axis in axes:
        ladder = LADDERS[axis]
        lo, hi = ladder.index(window[axis][0]), ladder.index(window[axis][1])
        while True:
            line = [tuple(sorted({**held, axis: v}.items())) for v in ladder[lo:hi + 1]]
            todo = [p for p in line if p not in scores]
            if todo:
                return todo
            best = dict(min(line, key=scores.__getitem__))[axis]
            if widen and best == ladder[lo] and lo > 0:
                lo -= 1
            elif widen and best == ladder[hi] and hi < len(ladder) - 1:
                hi += 1
            else:
                break
        held[axis] = best
    return []


def lm_run(work: str, tok: str, size: dict, name: str, hidden: int, layers: int, steps: int):
    """A model pre-trained from scratch with ``method: lm`` (the teacher; the narrow student's start)."""
    config = llama_config(work, name, tok, hidden, layers, size["heads"])
    return (["distill"], [f"student.config={config}", "student.init_from_teacher=null", "distill.method=lm",
                          "optim.lr=3e-3", "optim.min_lr=3e-4", f"train.out_dir={work}/{name}", f"train.steps={steps}",
                          f"optim.warmup_steps={max(1, steps // 20)}"])


def stage1_run(work: str, size: dict, geometry: str, head: str, which: str):
    out = f"{work}/filters/" + (f"teacher-{head}" if which == "teacher" else f"{geometry}-{head}")
    return (["learn-filters", "--model", which],
            [*student_overrides(work, geometry), *filters(work, geometry, head), f"distill.filters_out={out}",
             f"train.out_dir={out}-run", f"train.steps={size['filter_steps']}", "optim.lr=1e-2", "train.seed=1"])


def prepare_models(launch: Launcher, work: str, tok: str, size: dict) -> None:
    """The teacher (alone: it is the longest run), then the narrow student's pre-training next to stage 1,
    once per frozen model and head kind (stage 2's seeds share the banks)."""
    launch.one(*lm_run(work, tok, size, "teacher", size["hidden"], size["teacher_layers"], size["teacher_steps"]))
    narrow = lm_run(work, tok, size, "narrow-base", size["hidden"] // 2, size["student_layers"], size["base_steps"])
    launch.many([narrow, *(stage1_run(work, size, "same-width", head, which) for head in ("teacher", "trainable")
                           for which in ("teacher", "student"))])
    launch.many([stage1_run(work, size, "narrow", head, "student") for head in ("teacher", "trainable")])


def distill(launch: Launcher, work: str, size: dict, plan: list[tuple[str, str, int, Point]]) -> None:
    launch.many([(["distill"], [*method_overrides(work, g, m, p), f"train.seed={seed}", f"train.steps="
                                f"{size['student_steps']}", f"train.out_dir={run_dir(work, g, m, seed, p)}"])
                 for g, m, seed, p in plan])


def valid_score(work: str, path: str, size: dict) -> dict:
    """An HF model's perplexity on the whole valid split (Wikipedia): what tuning chooses by."""
    from ted_ds.evaluate import evaluate_hf

    return evaluate_hf(path, f"{work}/data", "valid", size["seq_len"], 8, None, "cpu", progress=False)


def tune(launch: Launcher, work: str, size: dict) -> dict:
    """Seed-1 runs scored on the valid split, round after round, until every method's search is done."""
    scores = {g: {m: {} for m in SEARCH} for g in GEOMETRIES}
    while todo := [(g, m, p) for g in GEOMETRIES for m in SEARCH
                   for p in pending(SEARCH[m], size["window"], size["widen"], scores[g][m])]:
        distill(launch, work, size, [(g, m, 1, p) for g, m, p in todo])
        for g, m, p in todo:
            scores[g][m][p] = valid_score(work, f"{run_dir(work, g, m, 1, p)}/hf", size)["ppl"]
    return scores


def choose(scores: dict) -> dict:
    """Per geometry and tuned method, the weights with the lowest valid perplexity at seed 1."""
    return {g: {m: min(scores[g][m], key=scores[g][m].get) for m in SEARCH} for g in GEOMETRIES}


def tuned_as(method: str) -> str:
    """Whose tuned weights a method runs at: ``ted-trainable`` reuses TED's."""
    return "ted" if method == "ted-trainable" else method


def chosen_point(chosen: dict, geometry: str, method: str) -> Point:
    return chosen[geometry].get(tuned_as(method), ())


def final_plan(chosen: dict, seeds: list[int]) -> list[tuple[str, str, int, Point]]:
    """Every method at its chosen weights on every seed (seed 1 of a tuned method is already done)."""
    return [(g, m, seed, chosen_point(chosen, g, m)) for g in GEOMETRIES for m in METHODS for seed in seeds
            if not (m in SEARCH and seed == 1)]


def curve(out_dir: str, key: str = "loss/lm") -> list[tuple[int, float]]:
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return [(r["step"], r[key]) for r in rows if key in r]


def stage1_taps(work: str) -> dict:
    """Per tap, the next-token loss of the filtered states: the mean of the last 5 logged steps."""
    out = {}
    for name in sorted(os.listdir(f"{work}/filters")):
        if name.endswith("-run"):
            rows = [json.loads(line) for line in open(f"{work}/filters/{name}/metrics.jsonl")]
            rows = [r for r in rows if "loss/total" in r]  # training steps, not evaluations
            keys = sorted((k for k in rows[-1] if k.startswith("loss/tap_lm/")), key=lambda k: int(k.split("L")[-1]))
            out[name[:-4]] = {k.split("/")[-1]: statistics.mean(r[k] for r in rows[-5:]) for k in keys}
    return out


def lm_eval_scores(models: dict[str, str], heldout: str, workdir: str, max_length: int) -> dict[str, dict]:
    """loglikelihood_rolling on the test documents at ``max_length`` positions, in-process, offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import lm_eval
    from lm_eval.tasks import TaskManager

    from ted_ds.evaluate import write_rolling_task

    task_dir = os.path.join(workdir, "lm_eval_tasks")
    write_rolling_task(task_dir, "ted_books", heldout)
    manager = TaskManager(include_path=task_dir, include_defaults=False)
    scores = {}
    for name, path in models.items():
        result = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={path},dtype=float32,"
                                         f"max_length={max_length}", tasks=["ted_books"], device="cpu",
                                         batch_size=8, task_manager=manager)
        r = result["results"]["ted_books"]
        scores[name] = {"word_perplexity": r["word_perplexity,none"], "bits_per_byte": r["bits_per_byte,none"]}
    return scores


def evaluate_all(work: str, paths: dict, size: dict) -> dict:
    """Test-split (books) and valid-split (Wikipedia) perplexity of every model, one process."""
    from ted_ds.evaluate import evaluate_hf

    test_samples = size["test_tokens"] // size["seq_len"]
    out = {}
    for name, path in paths.items():
        out[name] = {"test": evaluate_hf(path, f"{work}/test", "train", size["seq_len"], 8, test_samples, "cpu",
                                         progress=False),
                     "valid": valid_score(work, path, size)}
    return out


def collect(work: str, size: dict, seeds: list[int], chosen: dict, data: dict) -> dict:
    """Scores of the teacher, the narrow student's starting point and every final student."""
    finals = {(g, m, seed): run_dir(work, g, m, seed, chosen_point(chosen, g, m))
              for g in GEOMETRIES for m in METHODS for seed in seeds}
    paths = {"teacher": f"{work}/teacher/hf", "narrow-base": f"{work}/narrow-base/hf"}
    paths.update({"/".join(map(str, k)): f"{d}/hf" for k, d in finals.items()})
    scores = evaluate_all(work, paths, size)
    harness = lm_eval_scores(paths, data["test_docs"], work, size["seq_len"])
    model = lambda name: {**scores[name], "lm_eval": harness[name]}
    return {"teacher": model("teacher"), "narrow-base": model("narrow-base"),
            "students": {g: {m: [{"seed": seed, **model(f"{g}/{m}/{seed}"), "curve": curve(finals[g, m, seed])}
                                 for seed in seeds] for m in METHODS} for g in GEOMETRIES}}


# ----------------------------------------------------------------------------- report
COMPARISONS = (("ted", "kd"), ("ted", "lwd"), ("ted-trainable", "ted"), ("ted-trainable", "kd"), ("kd", "lm"),
               ("lwd", "lm"))


def mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


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


def _model_row(name: str, runs: list[dict]) -> str:
    cells = [mean_std([r["test"]["ppl"] for r in runs]), mean_std([r["valid"]["ppl"] for r in runs]),
             mean_std([r["lm_eval"]["word_perplexity"] for r in runs]),
             mean_std([r["lm_eval"]["bits_per_byte"] for r in runs])]
    fmt = lambda m, s, p: f"{m:.{p}f} ± {s:.{p}f}" if len(runs) > 1 else f"{m:.{p}f}"
    return f"| {name} | " + " | ".join(fmt(*c, p) for c, p in zip(cells, (2, 2, 1, 4))) + " |"


def _geometry_section(results: dict, g: str) -> list[str]:
    students, size = results["students"][g], results["size"]
    what = {"same-width": f"{size['student_layers']} layers, d={size['hidden']}, initialised from teacher blocks "
                          f"{[b + 1 for b in aligned_blocks(size)]} (1-based: the blocks they are matched to)",
            "narrow": f"{size['student_layers']} layers, d={size['hidden'] // 2} (d_t/2), pre-trained with lm for "
                      f"{size['base_steps']} steps, then each method"}[g]
    lines = [f"## Geometry `{g}`: {what}", "",
             "| model | test perplexity (books) | valid perplexity (Wikipedia) | lm-eval word perplexity (books) | "
             "lm-eval bits/byte |", "|---|---|---|---|---|", _model_row("teacher", [results["teacher"]])]
    if g == "narrow":
        lines.append(_model_row("narrow student before distillation", [results["narrow-base"]]))
    chosen = results["chosen"][g]
    for m in METHODS:
        weights = chosen.get(tuned_as(m))
        lines.append(_model_row(f"student {m}" + (f" ({label(weights.items())})" if weights else ""), students[m]))
    lines += ["", "Tuning (seed 1, valid perplexity, in the order searched; chosen in bold):", ""]
    for m, tried in results["valid_tuning"][g].items():
        cells = [f"{label(t['weights'].items())}: {t['ppl']:.2f}" for t in tried]
        cells = [f"**{c}**" if t["weights"] == chosen[m] else c for c, t in zip(cells, tried)]
        lines.append(f"* {m}: " + "; ".join(cells) + _edge_note(chosen[m], [t["weights"] for t in tried]))
    lines += ["", "Paired per seed on the test split (both students saw the same batches in the same order):", ""]
    ppl_of = lambda m: [r["test"]["ppl"] for r in students[m]]
    for better, worse in COMPARISONS:
        c = paired_comparison(ppl_of(better), ppl_of(worse))
        lines.append(f"* {better} < {worse}: **{c['verdict']}** (Δ = {c['mean']:+.2f} ppl, 95 % t interval "
                     f"[{c['low']:+.2f}, {c['high']:+.2f}], p = {c['p']:.3f}; {better} better in {c['favourable']} of "
                     f"{c['n']} seeds; smallest difference detectable at 80 % power: {c['detectable']:.2f} ppl)")
    return lines + [""]


def _edge_note(best: dict, tried: list[dict]) -> str:
    """Names the weights whose best value is the smallest or largest tried along its line."""
    edges = []
    for axis, value in best.items():
        line = [w[axis] for w in tried if all(w[a] == v for a, v in best.items() if a != axis)]
        if len(line) > 1 and value in (min(line), max(line)):
            edges.append(axis)
    return f" — best {' and '.join(edges)} at the edge of the values tried" if edges else ""


def _stage1_section(stage1: dict) -> list[str]:
    lines = ["## Stage 1: next-token loss of the filtered states per tap (mean of the last 5 steps)", "",
             "`teacher` head: the teacher's frozen final norm + unembedding, shared by all taps; `trainable`: a "
             "head per tap initialised from it and trained with the filter.", "",
             "| bank | " + " | ".join(f"tap {i + 1}" for i in range(max(len(v) for v in stage1.values()))) + " |",
             "|---|" + "---|" * max(len(v) for v in stage1.values())]
    for name, taps in stage1.items():
        lines.append(f"| {name} | " + " | ".join(f"{layer}: {loss:.3f}" for layer, loss in taps.items()) + " |")
    return lines + [""]


def report(out: str, results: dict) -> None:
    size, m = results["size"], results["machine"]
    tokens = size["student_steps"] * size["global"] * size["seq_len"]
    lines = ["# TED study (small scale, CPU)", "",
             f"{m['date']}, commit {m['commit']}, {m['cpus']} CPUs, {results['elapsed_s'] / 60:.0f} min; seeds "
             f"{results['seeds']}; produced by `bench/repro.py` ({results['jobs']} runs at a time, "
             f"{results['ranks']} rank(s) each). Minutes per phase: "
             + ", ".join(f"{name} {sec / 60:.0f}" for name, sec in results["phases_s"].items()) + ".", "",
             f"Teacher: LLaMA-style, {size['teacher_layers']} layers, d={size['hidden']}, {size['teacher_steps']} "
             f"steps ({size['teacher_steps'] * size['global'] * size['seq_len']:,} Wikipedia tokens). Every "
             f"student: {size['student_steps']} steps ({tokens:,} tokens), same data order per seed. KD/LWD/TED: "
             f"T=2; LWD/TED: normalized MSE, taps every {size['teacher_layers'] // size['student_layers']} teacher "
             f"layers ↔ every student layer; stage 1: {size['filter_steps']} steps per bank, seed 1, shared by "
             "all stage-2 seeds. Test split: the bundled public-domain books sample "
             f"({size['test_tokens']:,} tokens scored by `ted-ds eval`; lm-eval on {size['heldout_docs']} of its "
             f"documents at max_length {size['seq_len']}), which the teacher never saw.", ""]
    for g in GEOMETRIES:
        lines += _geometry_section(results, g)
    lines += _stage1_section(results["stage1"])
    lines += ["![loss curves](loss_curves.png) ![perplexity](perplexity.png)"]
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    plot(out, results)
    print("\n".join(lines))


def plot(out: str, results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(GEOMETRIES), figsize=(12, 4))
    for ax, g in zip(axes, GEOMETRIES):
        for m in METHODS:
            curves = [dict(r["curve"]) for r in results["students"][g][m]]
            steps = sorted(curves[0])
            mean = [statistics.mean(c[s] for c in curves) for s in steps]
            window = max(1, len(steps) // 10)  # a moving average: per-batch losses are noisy
            ax.plot(steps, [statistics.mean(mean[max(0, i - window + 1): i + 1]) for i in range(len(mean))], label=m)
        ax.set_xlabel("step")
        ax.set_ylabel("train LM loss (mean of seeds, moving average)")
        ax.set_title(f"{g} students")
        ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, "loss_curves.png"), dpi=110)
    fig, axes = plt.subplots(1, len(GEOMETRIES), figsize=(12, 4))
    for ax, g in zip(axes, GEOMETRIES):
        stats = [mean_std([r["test"]["ppl"] for r in results["students"][g][m]]) for m in METHODS]
        ax.bar(METHODS, [s[0] for s in stats], yerr=[s[1] for s in stats], capsize=6, color="#4c72b0")
        ax.set_ylim(min(s[0] - s[1] for s in stats) * 0.97, max(s[0] + s[1] for s in stats) * 1.01)
        ax.set_ylabel("test perplexity (books; lower is better)")
        ax.set_title(f"{g}: after the same token budget")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "perplexity.png"), dpi=110)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny models and budget: checks the pipeline only")
    ap.add_argument("--seeds", type=int, help="seeds per method (default 5, quick 2)")
    ap.add_argument("--ranks", type=int, default=1, help="processes per training command (default 1)")
    ap.add_argument("--jobs", type=int, default=2, help="training commands at once (default 2: one per core)")
    ap.add_argument("--out", help="results directory (default bench/results/repro[-quick])")
    ap.add_argument("--corpus", help="training corpus, one document per line (default: ../shared/data/"
                                     "enwiki_sample.txt if present, else the bundled sample)")
    ap.add_argument("--report-only", action="store_true", help="rebuild results.md and the plots from results.json")
    args = ap.parse_args(argv)
    size = QUICK if args.quick else FULL
    seeds = list(range(1, 1 + (args.seeds or (2 if args.quick else 5))))
    if len(seeds) < 2:
        ap.error("--seeds must be ≥ 2 (the comparisons are paired intervals)")
    out = os.path.abspath(args.out or os.path.join(REPO, "bench", "results", "repro-quick" if args.quick else "repro"))
    if args.report_only:
        results = json.load(open(os.path.join(out, "results.json")))
        report(out, results)
        return results
    work = os.path.join(out, "work")
    os.makedirs(work, exist_ok=True)
    start, phases = time.time(), {}

    def phase(name: str, fn, *a):
        t = time.time()
        print(f"repro: {name} …", flush=True)
        result = fn(*a)
        phases[name] = round(time.time() - t)
        return result

    data = phase("data", prepare_data, work, size, args.corpus)
    launch = Launcher(write_run_config(work, data["data"], size), args.ranks, args.jobs)
    phase("teacher, narrow student and stage 1", prepare_models, launch, work, data["tokenizer"], size)
    scores = phase("tuning", tune, launch, work, size)
    chosen = choose(scores)
    phase("final runs", distill, launch, work, size, final_plan(chosen, seeds))
    results = {"machine": machine(), "size": size, "seeds": seeds, "ranks": args.ranks, "jobs": args.jobs,
               "valid_tuning": {g: {m: [{"weights": dict(p), "ppl": ppl} for p, ppl in by_point.items()]
                                    for m, by_point in by_method.items()} for g, by_method in scores.items()},
               "chosen": {g: {m: dict(p) for m, p in by_method.items()} for g, by_method in chosen.items()},
               "stage1": stage1_taps(work)}
    results.update(phase("evaluation", collect, work, size, seeds, chosen, data))
    results["phases_s"], results["elapsed_s"] = phases, time.time() - start
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    report(out, results)
    print(f"repro: {results['elapsed_s'] / 60:.1f} min; results in {out}")
    return results


if __name__ == "__main__":
    main()
