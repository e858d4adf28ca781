"""Study v6's runs (design and rule: bench/repro_v6.py): cell B's books splits, its adapted teacher and
pre-trained small student, stage 1, the tuning grids, the arms and the compute-matched KD; cell A with
v5's configs; then what the runs logged (scores, stage-1 convergence, the filters' spectra)."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from bench.common import SHARED, machine, run
from bench.repro_runs import (
    BOOKS,
    Launcher,
    arm_dir,
    arm_run,
    bank,
    evaluations,
    llama_config,
    matched_steps,
    metrics,
    prepare_data,
    run_config,
    stage1_run,
    teacher_run,
    write_run_config,
    write_yaml,
)
from bench.repro_study import FULL as A_FULL
from bench.repro_study import QUICK, SPLITS
from bench.repro_v6 import (
    B_ARMS,
    B_FULL,
    B_MATCHED,
    B_QUICK,
    B_SPLITS,
    CELL_A,
    KD_GRID,
    TED_COSINE,
    TED_GRID,
    TUNING_SEED,
    b_arms,
    decide_v6,
    tuned,
)


# ----------------------------------------------------------------------------- cell B: data and models
def split_books(out: str, lines: int) -> dict[str, str]:
    """books-{train,valid,test}.txt: the first ``lines`` paragraphs split 80/10/10 by a hash of each text."""
    source = os.path.join(SHARED, "pd-books-spurgeon-web.txt.gz")
    source = source if os.path.isfile(source) else BOOKS
    paths = {s: os.path.join(out, f"books-{s}.txt") for s in ("train", "valid", "test")}
    if all(os.path.exists(p) for p in paths.values()):
        return paths
    files = {s: open(p + ".tmp", "w", encoding="utf-8") for s, p in paths.items()}
    with gzip.open(source, "rt", encoding="utf-8") as f:
        for _, line in zip(range(lines), f):
            if line.strip():
                h = int(hashlib.sha256(line.encode()).hexdigest(), 16) % 10
                files["test" if h == 0 else "valid" if h == 1 else "train"].write(line)
    for s, g in files.items():
        g.close()
        os.replace(paths[s] + ".tmp", paths[s])
    return paths


def prepare_books(work: str, tok: str, b: dict) -> dict[str, str]:
    """Shards of the three books splits; valid and test are evaluated on 90 % of their documents (their
    builds' valid splits; a build needs a train split), as v5 evaluates books."""
    out = {}
    for split, text in split_books(work, b["books_lines"]).items():
        out[split] = os.path.join(work, f"books-{split}")
        if not os.path.isdir(out[split]):
            run([sys.executable, "-m", "data_prep", "build", "--tokenizer", tok, "--workers", "2", "--no-progress",
                 "--input", text, "--out", out[split], "--valid-fraction", "0.02" if split == "train" else "0.9"])
    return out


def write_cell_b_config(work: str, data: dict, books: dict, size: dict, b: dict) -> str:
    """Cell B's run config: v5's, with the adapted teacher, the pre-trained student and the books blend."""
    cfg = run_config(work, data, {**size, **b})
    cfg["teacher"], cfg["student"] = {"path": f"{work}/teacher-books/hf"}, {"path": f"{work}/student-base/hf"}
    cfg["data"]["sources"] = [{"name": "books", "path": books["train"], "weight": b["books_weight"]},
                              {"name": "wikipedia", "path": data["wikipedia"], "weight": 1.0},
                              {"name": "books-valid", "path": books["valid"], "weight": 0.0},
                              {"name": "books-test", "path": books["test"], "weight": 0.0}]
    del cfg["distill"]["layer_loss"]  # each arm names its own
    return write_yaml(cfg, os.path.join(work, "run.yaml"))


def student_base_run(top: str, work: str, tok: str, size: dict, b: dict):
    """The small student, pre-trained from scratch on Wikipedia (run with the top-level, Wikipedia config)."""
    steps = b["student_base_steps"]
    config = llama_config(work, "student", tok, size, layers=b["student_layers"], hidden=b["student_hidden"])
    return (["distill"], [f"student.config={config}", "student.init_from_teacher=null", "distill.method=lm",
                          "optim.lr=3e-3", "optim.min_lr=3e-4", f"train.out_dir={work}/student-base",
                          f"train.steps={steps}", f"optim.warmup_steps={max(1, steps // 20)}",
                          f"train.eval_interval={steps}", "train.eval_steps=[]"])


def adapt_run(top: str, work: str, b: dict):
    """The v5 teacher, continually pre-trained on the books blend (run with cell B's config)."""
    steps = b["adapt_steps"]
    return (["distill"], [f"student.path={top}/teacher/hf", "distill.method=lm", f"train.out_dir={work}/teacher-books",
                          f"train.steps={steps}", f"optim.warmup_steps={max(1, steps // 20)}",
                          f"train.eval_interval={steps}", "train.eval_steps=[]"])


def tuning_runs(work: str, size: dict, name: str, grid: list[dict], fixed: tuple) -> list:
    """One run per grid point on the tuning seed, evaluated at its last step only."""
    steps = size["student_steps"]
    return [arm_run(work, size, TUNING_SEED, f"{name}-{i}", steps,
                    (*fixed, *(f"distill.{k}={v}" for k, v in point.items()), "train.eval_steps=[]"))
            for i, point in enumerate(grid)]


# ----------------------------------------------------------------------------- what the runs logged
def stage1_convergence(out_dir: str) -> dict[str, dict]:
    """Per tap, the mean loss of the first and last 10 % of steps, and the change over the last 20 %: the
    mean of the last 10 % minus the mean of the 10 % before it."""
    rows = [r for r in metrics(out_dir) if "loss/total" in r]
    keys = sorted((k for k in rows[-1] if k.startswith("loss/tap_lm/")), key=lambda k: int(k.split("L")[-1]))
    tenth = max(1, len(rows) // 10)
    first, before, last = rows[:tenth], rows[-2 * tenth:-tenth], rows[-tenth:]
    return {k.split("/")[-1]: {"first": statistics.mean(r[k] for r in first),
                               "last": statistics.mean(r[k] for r in last),
                               "last_20pct_change": statistics.mean(r[k] for r in last)
                               - statistics.mean(r[k] for r in before)} for k in keys}


def filter_spectrum(bank_dir: str) -> list[dict]:
    """Per filter of a stage-1 bank: singular values summarised (how far from an identity-like map)."""
    import torch
    from safetensors.torch import load_file

    weights = {k: v for k, v in load_file(os.path.join(bank_dir, "filters.safetensors")).items()
               if k.endswith("weight") and v.dim() == 2}
    out = []
    for name in sorted(weights):
        w = weights[name].double()
        s = torch.linalg.svdvals(w)
        p = s**2 / (s**2).sum()
        row = {"filter": name, "shape": list(w.shape), "effective_rank": float(torch.exp(-(p * p.log()).sum())),
               "sigma_min_over_max": float(s[-1] / s[0]), "sigma_max": float(s[0])}
        if w.shape[0] == w.shape[1]:
            eye = torch.eye(w.shape[0], dtype=w.dtype)
            row["distance_to_identity"] = float(torch.linalg.norm(w - eye) / torch.linalg.norm(eye))
        out.append(row)
    return out


def cell_scores(work: str, arms: list[str], seeds: list[int], splits: tuple) -> dict:
    return {arm: [{int(k): v for k, v in evaluations(arm_dir(work, s, arm), splits).items()} for s in seeds]
            for arm in arms}






# ----------------------------------------------------------------------------- the study
class Study:
    """Runs cell B, then cell A, writing results.json after each (a re-run resumes: finished runs are kept;
    cells it does not run are kept from an earlier results.json)."""

    def __init__(self, out: str, quick: bool, ranks: int, jobs: int, corpus: str | None, cells: str = "BA"):
        self.out, self.work = out, os.path.join(out, "work")
        self.size, self.b = (QUICK, B_QUICK) if quick else (A_FULL, B_FULL)
        self.seeds_a = [1, 2] if quick else [1, 2, 3, 4, 5]
        self.ranks, self.jobs, self.corpus, self.cells = ranks, jobs, corpus, cells
        self.phases, self.start = {}, time.time()
        self.results = {"machine": machine(), "size": self.size, "cell_b_size": self.b, "ranks": ranks, "jobs": jobs}

    def phase(self, name: str, fn, *a):
        t = time.time()
        print(f"repro v6: {name} …", flush=True)
        result = fn(*a)
        self.phases[name] = round(time.time() - t)
        return result

    def run(self) -> dict:
        os.makedirs(self.work, exist_ok=True)
        self.data = self.phase("data", prepare_data, self.work, self.size, self.corpus)
        self.top = Launcher(write_run_config(self.work, self.data, self.size), self.ranks, self.jobs)
        self.phase("teacher", self.top.one, *teacher_run(self.work, self.data["tokenizer"], self.size))
        self.results["cells"] = self.earlier_cells()
        for cell in self.cells:  # B first: it decides the recommendation
            ran = self.cell_b() if cell == "B" else self.cell_a()
            self.results["cells"][cell] = {**ran, "machine": machine()}  # cells may run apart: each says where
            self.finish()
        return self.results

    def earlier_cells(self) -> dict:
        """The cells of an earlier results.json that this run does not redo (``--cells A`` after ``--cells B``)."""
        path = os.path.join(self.out, "results.json")
        if not os.path.isfile(path):
            return {}
        earlier = json.load(open(path))
        kept = {c: v for c, v in earlier.get("cells", {}).items() if c not in self.cells}
        self.phases.update({k: v for k, v in earlier.get("phases_s", {}).items() if k.split()[0] in kept})
        return kept

    def finish(self) -> dict:
        cells = self.results["cells"]
        self.results["decision"] = decide_v6({c: v["final_books"] for c, v in cells.items()})
        self.results["phases_s"], self.results["elapsed_s"] = self.phases, time.time() - self.start
        with open(os.path.join(self.out, "results.json"), "w") as f:
            json.dump(self.results, f, indent=1)
        return self.results

    def cell_b(self) -> dict:
        work, b, size = os.path.join(self.work, "cellB"), self.b, {**self.size, **self.b}
        os.makedirs(work, exist_ok=True)
        books = self.phase("B data", prepare_books, work, self.data["tokenizer"], b)
        launch = Launcher(write_cell_b_config(work, self.data, books, size, b), self.ranks, self.jobs)
        with ThreadPoolExecutor(2) as pool:  # the adapted teacher and the pre-trained student side by side
            t = time.time()
            jobs = [pool.submit(launch.one, *adapt_run(self.work, work, b), jobs=2),
                    pool.submit(self.top.one, *student_base_run(self.work, work, self.data["tokenizer"], size, b),
                                jobs=2)]
            [j.result() for j in jobs]
            self.phases["B teacher-books and student-base"] = round(time.time() - t)
        seeds = list(b["seeds"])
        self.phase("B stage 1", launch.many, [stage1_run(work, size, s, w, b["filter_warmup"])
                                              for s in [TUNING_SEED, *seeds] for w in ("teacher", "student")])
        self.phase("B tuning KD", launch.many, tuning_runs(work, size, "tune-kd", KD_GRID, ("distill.method=kd",)))
        kd = tuned(work, KD_GRID, "tune-kd")
        self.phase("B tuning TED", launch.many, tuning_runs(work, size, "tune-ted-cosine", TED_GRID,
                                                             (*TED_COSINE, f"distill.temperature={kd['temperature']}")))
        ted = tuned(work, TED_GRID, "tune-ted-cosine")
        arms = b_arms(kd, ted)
        self.phase("B arms", launch.many, [arm_run(work, size, s, a, b["student_steps"], arms[a])
                                           for s in seeds for a in B_ARMS])
        matched = matched_steps(work, size, seeds, ted_arm="ted-cosine", kd_arm="kd")
        self.phase("B compute-matched KD", launch.many, [arm_run(work, size, s, B_MATCHED, matched["steps"],
                                                                 arms[B_MATCHED]) for s in seeds])
        return {"tuned": {"kd": kd, "ted-cosine": ted}, "arms": {a: list(o) for a, o in arms.items()},
                "matched": matched, **collect_cell(work, [*B_ARMS, B_MATCHED], seeds, B_SPLITS, "books-test")}

    def cell_a(self) -> dict:
        work, size = self.work, self.size
        self.phase("A stage 1", self.top.many, [stage1_run(work, size, s, w) for s in self.seeds_a
                                                for w in ("teacher", "student")])
        self.phase("A arms", self.top.many, [arm_run(work, size, s, a, size["student_steps"], CELL_A[a])
                                             for s in self.seeds_a for a in CELL_A])
        return {"arms": {a: list(o) for a, o in CELL_A.items()},
                **collect_cell(work, list(CELL_A), self.seeds_a, SPLITS, "books")}


def collect_cell(work: str, arms: list[str], seeds: list[int], splits: tuple, target: str) -> dict:
    """Scores per arm and seed ({step: {split: loss}}), each arm's books-test loss at its last step, training
    curves, stage-1 convergence and the filters' spectra per seed."""
    scores = cell_scores(work, arms, seeds, splits)
    return {"seeds": seeds, "scores": scores,
            "final_books": {a: [by[max(by)][target] for by in runs] for a, runs in scores.items()},
            "curves": {a: [[(r["step"], r["loss/lm"]) for r in metrics(arm_dir(work, s, a)) if "loss/lm" in r]
                           for s in seeds] for a in arms},
            "stage1": {str(s): {w: stage1_convergence(bank(work, s, w) + "-run") for w in ("teacher", "student")}
                       for s in seeds},
            "filters": {str(s): {w: filter_spectrum(bank(work, s, w)) for w in ("teacher", "student")}
                        for s in seeds}}
