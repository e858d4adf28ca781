"""The TED study's runs: its data, models and configs, the training commands of every arm (resumable:
each finished run leaves DONE), and what the runs logged, read back."""

from __future__ import annotations

import json
import os
import shutil
import statistics
import sys
from concurrent.futures import ThreadPoolExecutor

from bench import forked
from bench.common import REPO, corpus_path, run
from bench.repro_study import ARMS, SPLITS, aligned_blocks
from ted_ds.launch import local_deepspeed_command as deepspeed

BOOKS = os.path.join(REPO, "data_prep", "sample", "books_sample.txt.gz")


# ----------------------------------------------------------------------------- data and models
def prepare_data(out: str, size: dict, corpus: str | None) -> dict:
    """Tokenizer and shards of the training corpus; the books test split as a second build."""
    corpus = corpus or corpus_path(out)
    if size["corpus_lines"]:
        sliced = os.path.join(out, "corpus-slice.txt")
        if not os.path.exists(sliced):  # written once: a re-run finds the same source and its built shards
            with open(corpus, encoding="utf-8") as f, open(sliced, "w", encoding="utf-8") as g:
                for _, line in zip(range(size["corpus_lines"]), f):
                    g.write(line)
        corpus = sliced
    tok, data, test = (os.path.join(out, d) for d in ("tokenizer", "data", "books"))
    if not os.path.isdir(tok):
        run([sys.executable, "-m", "data_prep", "tokenizer", "--input", corpus, "--vocab-size", str(size["vocab"]),
             "--out", tok])
    build = [sys.executable, "-m", "data_prep", "build", "--tokenizer", tok, "--workers", "2", "--no-progress"]
    run([*build, "--input", corpus, "--out", data, "--valid-fraction", "0.02"])
    run([*build, "--input", BOOKS, "--out", test, "--valid-fraction", "0.9"])  # evaluated: the valid split
    return {"tokenizer": tok, "wikipedia": data, "books": test}


def llama_config(out: str, name: str, tok: str, size: dict, layers: int | None = None,
                 hidden: int | None = None) -> str:
    """A LLaMA-style config of ``layers`` × ``hidden`` (default: the study's teacher) for the tokenizer."""
    from data_prep.tokenizer import load_tokenizer

    path = os.path.join(out, f"{name}_config.json")
    hidden = hidden or size["hidden"]
    with open(path, "w") as f:
        json.dump({"model_type": "llama", "vocab_size": len(load_tokenizer(tok)), "hidden_size": hidden,
                   "intermediate_size": hidden * 8 // 3 // 8 * 8, "num_hidden_layers": layers or size["teacher_layers"],
                   "num_attention_heads": size["heads"], "num_key_value_heads": size["heads"],
                   "max_position_embeddings": 512, "tie_word_embeddings": False, "bos_token_id": 1,
                   "eos_token_id": 2}, f)
    return path


def write_run_config(out: str, data: dict, size: dict) -> str:
    return write_yaml(run_config(out, data, size), os.path.join(out, "run.yaml"))


def run_config(out: str, data: dict, size: dict) -> dict:
    """The study's run config (v5; v6's cell A): the teacher pre-trained in ``out``, Wikipedia + books (test)."""
    return {"teacher": {"path": f"{out}/teacher/hf"},
           "student": {"init_from_teacher": aligned_blocks(size)},
           "data": {"sources": [{"name": "wikipedia", "path": data["wikipedia"], "weight": 1.0},
                                {"name": "books", "path": data["books"], "weight": 0.0}],
                    "seq_len": size["seq_len"], "eval_samples": size["eval_samples"]},
           "distill": {"method": "ted", "alpha": 1.0, "beta": 1.0, "temperature": 2.0,
                       "teacher_every": size["teacher_layers"] // size["student_layers"], "student_every": 1,
                       "layer_loss": "normalized_mse"},
           "optim": {"lr": 1e-3, "min_lr": 1e-4, "warmup_steps": max(1, size["student_steps"] // 10)},
           "train": {"micro_batch_size": size["micro"], "global_batch_size": size["global"], "steps": 1,
                     "log_interval": 1, "eval_interval": 10**6, "eval_steps": list(size["eval_steps"]),
                     "save_interval": 10**6, "progress": False,
                     "deepspeed_config": os.path.join(REPO, "ds_configs", "zero3_cpu.json")}}


def write_yaml(cfg: dict, path: str) -> str:
    import yaml

    with open(path, "w") as f:
        yaml.safe_dump(cfg, f, sort_keys=False)
    return path


class Launcher:
    """Runs training commands, ``jobs`` at a time, each with ``ranks`` processes sharing the cores; one rank
    runs as a fork of a warm interpreter (bench.forked: world size 1 needs no launcher; the same bits,
    without the launcher's two interpreters, its shared-memory communicator and the imports per run)."""

    def __init__(self, config: str, ranks: int, jobs: int):
        self.config, self.ranks, self.jobs = config, ranks, jobs

    def one(self, command: list[str], overrides: list[str], jobs: int = 1) -> None:
        out_dir = next(o.split("=", 1)[1] for o in overrides if o.startswith("train.out_dir="))
        if os.path.isfile(os.path.join(out_dir, "DONE")):  # a re-run after an interruption resumes the study
            return
        shutil.rmtree(out_dir, ignore_errors=True)
        threads = max(1, (os.cpu_count() or 1) // (self.ranks * jobs))
        env, argv = {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": str(threads)}, [*command, "--config", self.config,
                                                                                 *overrides]
        if self.ranks == 1:
            forked.ted_ds(argv, env, timeout=7200)
        else:
            run(deepspeed(self.ranks, "--module", "ted_ds", *argv), env=env, timeout=7200)
        open(os.path.join(out_dir, "DONE"), "w").close()

    def many(self, runs: list[tuple[list[str], list[str]]]) -> None:
        with ThreadPoolExecutor(self.jobs) as pool:
            for f in [pool.submit(self.one, command, overrides, jobs=self.jobs) for command, overrides in runs]:
                f.result()


# ----------------------------------------------------------------------------- the runs
def teacher_run(work: str, tok: str, size: dict):
    """The teacher, pre-trained from scratch with ``method: lm`` on Wikipedia."""
    steps = size["teacher_steps"]
    config = llama_config(work, "teacher", tok, size)
    return (["distill"], [f"student.config={config}", "student.init_from_teacher=null", "distill.method=lm",
                          "optim.lr=3e-3", "optim.min_lr=3e-4", f"train.out_dir={work}/teacher", f"train.steps={steps}",
                          f"optim.warmup_steps={max(1, steps // 20)}", f"train.eval_interval={steps}",
                          "train.eval_steps=[]"])


def bank(work: str, seed: int, which: str) -> str:
    return f"{work}/seed{seed}/filters-{which}"


def banks(work: str, seed: int) -> list[str]:
    return [f"teacher.filters={bank(work, seed, 'teacher')}", f"student.filters={bank(work, seed, 'student')}"]


def stage1_run(work: str, size: dict, seed: int, which: str, warmup: int | None = None):
    """One stage-1 bank of one seed, learned on the frozen model ``which`` (teacher | student); ``warmup``
    steps (default: the run config's)."""
    out, steps = bank(work, seed, which), size["filter_steps"]
    return (["learn-filters", "--model", which],
            [*banks(work, seed), f"distill.filters_out={out}", f"train.out_dir={out}-run",
             f"train.steps={steps}", "optim.lr=1e-2", f"train.seed={seed}", f"train.eval_interval={steps}",
             "train.eval_steps=[]", *([f"optim.warmup_steps={warmup}"] if warmup is not None else [])])


def arm_dir(work: str, seed: int, arm: str) -> str:
    return f"{work}/seed{seed}/{arm}"


def arm_run(work: str, size: dict, seed: int, arm: str, steps: int, overrides: tuple | None = None):
    """The arm's training command for one seed (``overrides``: its settings, default v5's ARMS[arm])."""
    overrides = list(ARMS[arm] if overrides is None else overrides) + (banks(work, seed) if "ted" in arm else [])
    return (["distill"], [*overrides, f"train.seed={seed}", f"train.steps={steps}",
                          f"train.out_dir={arm_dir(work, seed, arm)}"])


def metrics(out_dir: str) -> list[dict]:
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def train_seconds(out_dir: str, tokens_per_step: int) -> float:
    """Seconds the run spent in training steps (evaluation, saving and start-up excluded), from its log."""
    return sum(tokens_per_step / r["tokens_per_s"] for r in metrics(out_dir) if "tokens_per_s" in r)


def matched_steps(work: str, size: dict, seeds: list[int], ted_arm: str = "ted-a1", kd_arm: str = "kd-a1") -> dict:
    """KD's step count at TED's cost: per seed, (both stage-1 runs + TED's steps) in seconds over KD's
    seconds per step; the median over seeds, so every seed of the arm trains as long."""
    tokens = size["global"] * size["seq_len"]
    ratios = []
    for seed in seeds:
        ted = train_seconds(arm_dir(work, seed, ted_arm), tokens)
        stage1 = sum(train_seconds(bank(work, seed, w) + "-run", tokens) for w in ("teacher", "student"))
        kd_step = train_seconds(arm_dir(work, seed, kd_arm), tokens) / size["student_steps"]
        ratios.append({"seed": seed, "ted_s": ted, "stage1_s": stage1, "kd_step_s": kd_step,
                       "steps": (ted + stage1) / kd_step})
    return {"per_seed": ratios, "steps": round(statistics.median(r["steps"] for r in ratios))}


def evaluations(out_dir: str, splits: tuple = SPLITS) -> dict[int, dict[str, float]]:
    """{step: {split: nats per token}} of every in-run evaluation."""
    return {r["step"]: {s: r[f"eval/{s}/loss"] for s in splits} for r in metrics(out_dir)
            if f"eval/{splits[0]}/loss" in r}


def train_curve(out_dir: str) -> list[tuple[int, float]]:
    return [(r["step"], r["loss/lm"]) for r in metrics(out_dir) if "loss/lm" in r]


def stage1_taps(out_dir: str) -> dict[str, float]:
    """Per tap, the next-token loss of the filtered states: the mean of the last 5 logged steps."""
    rows = [r for r in metrics(out_dir) if "loss/total" in r]  # training steps, not evaluations
    keys = sorted((k for k in rows[-1] if k.startswith("loss/tap_lm/")), key=lambda k: int(k.split("L")[-1]))
    return {k.split("/")[-1]: statistics.mean(r[k] for r in rows[-5:]) for k in keys}


# ----------------------------------------------------------------------------- results
def collect(work: str, seeds: list[int]) -> dict:
    """Per arm and seed, the in-run evaluations (JSON keys are strings: steps become ints again) and curves."""
    scores = {arm: [evaluations(arm_dir(work, s, arm)) for s in seeds] for arm in ARMS}
    curves = {arm: [train_curve(arm_dir(work, s, arm)) for s in seeds] for arm in ARMS}
    stage1 = {str(s): {w: stage1_taps(bank(work, s, w) + "-run") for w in ("teacher", "student")} for s in seeds}
    teacher = evaluations(f"{work}/teacher")
    return {"scores": scores, "curves": curves, "stage1": stage1, "teacher": teacher[max(teacher)]}
