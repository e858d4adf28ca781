"""bench/repro.py (the TED study, v5): --quick runs every arm on two paired seeds with stage 1 per seed,
the compute-matched arm and in-run evaluations at the chosen steps, and writes the rule's outcome and
the report; the statistics, the pre-registered rule and the step matching on inputs whose answers are
known."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from harness.common import REPO, corpus_lines


@pytest.mark.multirank
def test_repro_quick_runs_every_arm_on_paired_seeds_and_writes_the_rule_and_report(tmp_path):
    from bench.repro_study import ARMS, MATCHED

    out = tmp_path / "repro"
    big = tmp_path / "corpus.txt"  # the bundled sample, never ../shared
    big.write_text("\n".join(corpus_lines(2000)) + "\n", encoding="utf-8")
    r = subprocess.run([sys.executable, os.path.join(REPO, "bench", "repro.py"), "--quick", "--out", str(out),
                        "--corpus", str(big)], cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    results = json.load(open(out / "results.json"))
    size, work = results["size"], out / "work"
    assert set(results["scores"]) == set(ARMS) and results["seeds"] == [1, 2]
    matched = results["matched"]["steps"]
    assert matched > size["student_steps"]  # TED's steps and its stage 1 cost more than KD's steps
    for arm, runs in results["scores"].items():
        for by_step in runs:  # evaluated at train.eval_steps and the last step only, on both splits
            steps = sorted(map(int, by_step))
            assert steps == [*size["eval_steps"], *([matched] if arm == MATCHED else [])], (arm, steps)
            assert all(0 < v[split] < 10 for v in by_step.values() for split in ("books", "wikipedia"))
    for seed in (1, 2):
        for arm, overrides in ARMS.items():
            cfg = yaml.safe_load(open(next((work / f"seed{seed}" / arm).glob("config-distill-*.yaml"))))
            assert cfg["train"]["seed"] == seed
            assert [o for o in overrides if f"{o.split('=')[1]}" != str(_get(cfg, o.split("=")[0]))] == []
            if arm.startswith("ted"):  # its own seed's banks
                assert cfg["teacher"]["filters"].endswith(f"seed{seed}/filters-teacher")
    banks = [load_file(work / f"seed{s}" / "filters-teacher" / "filters.safetensors") for s in (1, 2)]
    assert not all(torch.equal(banks[0][k], banks[1][k]) for k in banks[0])  # stage 1 learned again per seed
    assert set(results["stage1"]) == {"1", "2"} and all(set(b) == {"teacher", "student"}
                                                        for b in results["stage1"].values())
    table = (out / "results.md").read_text()
    assert f"**outcome: {results['decision']['outcome']}**" in table and "Decision rule (pre-registered)" in table
    for arm in ARMS:
        assert f"| {arm} | " in table
    assert (out / "curves.png").stat().st_size > 1000


def _get(cfg: dict, dotted: str):
    for key in dotted.split("."):
        cfg = cfg[key]
    return cfg


def test_the_verdict_holds_only_when_the_paired_interval_excludes_zero():
    from scipy import stats

    from bench.repro_study import paired_comparison

    ted, kd = [10.0, 10.2, 9.8, 10.1, 9.9], [11.0, 11.4, 10.6, 11.2, 10.8]  # differences −1 ± 0.158
    c = paired_comparison(ted, kd)
    # by hand: mean −1, se = 0.1581/√5 = 0.0707, t(0.975, 4) = 2.776
    assert c["verdict"] == "holds" and c["n"] == 5 and c["favourable"] == 5
    assert (c["low"], c["high"]) == pytest.approx((-1.1963, -0.8037), abs=1e-3)
    assert c["p"] == pytest.approx(stats.ttest_rel(ted, kd).pvalue)
    assert c["detectable"] == pytest.approx((2.776 + 0.941) * 0.0707, abs=1e-3)
    # 0.4 σ in favour: a negative mean that is NOT a win
    c = paired_comparison([10.0, 10.3, 9.6, 10.1, 9.9], [10.1, 10.0, 10.0, 10.0, 10.0])
    assert c["mean"] < 0 and c["low"] < 0 < c["high"] and c["verdict"] == "no detectable difference"
    assert paired_comparison(kd, ted)["verdict"] == "reversed"


NOISE = [0.004, -0.003, 0.001, -0.002, 0.0]


def _scores(books: dict[str, float], wikipedia: float = 3.0, matched_last: int = 260) -> dict:
    """Five seeds per arm evaluated at step 200 (the matched arm also at ``matched_last``), books loss
    ``books[arm]`` plus a little per-seed noise; the matched arm's step-200 loss is deliberately bad."""
    def seeds(arm: str, value: float) -> list[dict]:
        runs = [{200: {"books": value + e * (1 + len(arm) % 3), "wikipedia": wikipedia}} for e in NOISE]
        if arm == "kd-a1-matched":
            for run, e in zip(runs, NOISE):
                run[200]["books"] = 9.0
                run[matched_last] = {"books": value + e, "wikipedia": wikipedia}
        return runs
    return {arm: seeds(arm, value) for arm, value in books.items()}


BASE = {"kd-a1": 4.00, "kd-a4": 4.02, "ted-a1": 3.95, "ted-a4": 3.97, "lwd-identity-a1": 4.0,
        "ted-cosine-a1": 3.96, "kd-a1-matched": 3.98}


@pytest.mark.parametrize("change, outcome, main", [
    ({}, "TED is worth it here", -0.05),  # better at both α and than the compute-matched KD
    ({"kd-a1-matched": 3.94}, "not shown here", -0.05),  # KD given TED's compute wins
    ({"ted-a1": 3.90, "ted-a4": 4.12}, "not shown here", 0.0),  # a win at α = 1 undone at α = 4
    ({"ted-a4": 4.02}, "TED is worth it here", -0.025),  # the main effect averages the two α
])
def test_the_pre_registered_rule_needs_the_main_effect_at_matched_alpha_and_the_compute_matched_arm(
        change, outcome, main):
    from bench.repro_study import decide, effects

    scores = _scores({**BASE, **change})
    d = decide(scores)
    assert d["outcome"] == outcome
    assert d["main_effect"]["mean"] == pytest.approx(main, abs=1e-12)
    ted1 = BASE["ted-a1"] if "ted-a1" not in change else change["ted-a1"]
    matched = change.get("kd-a1-matched", BASE["kd-a1-matched"])
    assert d["vs_compute_matched"]["mean"] == pytest.approx(ted1 - matched, abs=1e-12)  # its last step, not 200
    assert effects(scores, 200, "books")["TED main effect (mean over α)"]["mean"] == pytest.approx(main, abs=1e-12)


def test_the_rule_reads_the_books_test_split_not_wikipedia():
    from bench.repro_study import decide

    scores = _scores({**BASE, "ted-a1": 4.05, "ted-a4": 4.07})  # TED worse on books ...
    for arm, runs in scores.items():
        for by_step in runs:
            for v in by_step.values():
                v["wikipedia"] = 3.0 if arm.startswith("ted") else 4.0  # ... far better on Wikipedia
    assert decide(scores)["outcome"] == "not shown here" and decide(scores)["main_effect"]["mean"] > 0
    swapped = {arm: [{k: {"books": v["wikipedia"], "wikipedia": v["books"]} for k, v in by_step.items()}
                     for by_step in runs] for arm, runs in scores.items()}
    assert decide(swapped)["outcome"] == "TED is worth it here"


def test_the_matched_arm_trains_for_teds_seconds_with_its_stage_1_over_kds_seconds_per_step(tmp_path):
    from bench.repro_runs import arm_dir, bank, matched_steps
    from bench.repro_study import QUICK

    tokens = QUICK["global"] * QUICK["seq_len"]

    def log(path: str, seconds_per_step: float, steps: int) -> None:
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, "metrics.jsonl"), "w") as f:
            for step in range(1, steps + 1):
                f.write(json.dumps({"step": step, "tokens_per_s": tokens / seconds_per_step}) + "\n")
                f.write(json.dumps({"step": step, "eval/books/loss": 5.0}) + "\n")  # evaluations cost nothing here

    work = str(tmp_path)
    for seed, (ted, kd) in enumerate([(0.3, 0.2), (0.3, 0.25), (0.3, 0.1)], start=1):
        log(arm_dir(work, seed, "ted-a1"), ted, QUICK["student_steps"])
        log(arm_dir(work, seed, "kd-a1"), kd, QUICK["student_steps"])
        for which in ("teacher", "student"):
            log(bank(work, seed, which) + "-run", 0.5, QUICK["filter_steps"])
    m = matched_steps(work, QUICK, [1, 2, 3])
    # per seed: (6 · 0.3 + 2 · 3 · 0.5) / kd = 4.8 / 0.2, 4.8 / 0.25, 4.8 / 0.1 = 24, 19.2, 48 → median 24
    assert [r["steps"] for r in m["per_seed"]] == pytest.approx([24, 19.2, 48])
    assert m["steps"] == 24 and not math.isnan(m["per_seed"][0]["stage1_s"])


# ----------------------------------------------------------------------------- study v6
def test_v6_rule_needs_both_cell_b_comparisons_at_97_5_percent():
    from bench.repro_v6 import decide_v6

    kd, matched = [5.00, 5.01, 4.99, 5.02], [4.98, 4.99, 4.97, 5.00]
    better = [x - 0.05 for x in kd]  # beats KD by 0.05, and the matched arm by 0.03, at no spread
    d = decide_v6({"B": {"ted-cosine": [b + e for b, e in zip(better, NOISE)], "kd": kd, "kd-matched": matched}})
    assert d["H_B"]["holds"] and d["H_B"]["outcome"].startswith("TED is worth it")
    assert d["H_A"]["holds"] is None and d["H_A"]["outcome"] == "cell A not run"
    d = decide_v6({"B": {"ted-cosine": better, "kd": kd, "kd-matched": [x - 0.06 for x in kd]}})
    assert not d["H_B"]["holds"] and d["H_B"]["outcome"].endswith("KD is the default")  # the matched KD wins


def test_v6_rule_uses_the_bonferroni_interval_not_the_95_percent_one():
    from bench.repro_study import interval
    from bench.repro_v6 import decide_v6

    kd = [5.0] * 5
    ted = [5.0 - 0.01 + e for e in (0.006, -0.004, 0.011, -0.003, 0.0)]  # 95 % below 0, 97.5 % not
    diffs = [t - k for t, k in zip(ted, kd)]
    assert interval(diffs)["high"] < 0 < interval(diffs, confidence=0.975)["high"]
    d = decide_v6({"A": {"ted-cosine": ted, "kd": kd}})
    assert not d["H_A"]["holds"] and "does not replicate" in d["H_A"]["outcome"]


def test_v6_tuning_takes_the_lowest_books_valid_loss_and_ties_go_to_grid_order(tmp_path):
    from bench.repro_runs import arm_dir
    from bench.repro_v6 import KD_GRID, TUNING_SEED, tuned

    for i, loss in enumerate([4.2, 4.1, 4.3, 4.1]):
        d = arm_dir(str(tmp_path), TUNING_SEED, f"tune-kd-{i}")
        os.makedirs(d)
        rows = [{"step": 10, "eval/books-test/loss": 1.0, "eval/books-valid/loss": 9.0, "eval/wikipedia/loss": 1.0},
                {"step": 20, "eval/books-test/loss": 1.0, "eval/books-valid/loss": loss, "eval/wikipedia/loss": 1.0}]
        with open(os.path.join(d, "metrics.jsonl"), "w") as f:
            f.write("".join(json.dumps(r) + "\n" for r in rows))
    best = tuned(str(tmp_path), KD_GRID, "tune-kd")
    assert {k: best[k] for k in KD_GRID[1]} == KD_GRID[1] and best["losses"] == [4.2, 4.1, 4.3, 4.1]


def test_v6_filters_add_nothing_only_inside_the_margin():
    from bench.repro_v6 import filters_add_nothing

    lwd = [5.0, 5.1, 4.9, 5.0]
    assert filters_add_nothing([x + e / 10 for x, e in zip(lwd, NOISE)], lwd)["within_margin"]
    assert not filters_add_nothing([x - 0.01 + e / 10 for x, e in zip(lwd, NOISE)], lwd)["within_margin"]


def test_v6_a_run_of_cell_a_keeps_cell_b_from_the_earlier_results(tmp_path):
    from bench.repro_v6_runs import Study

    earlier = {"cells": {"A": {"old": 1}, "B": {"final_books": {}}},
               "phases_s": {"teacher": 9, "B arms": 5, "A arms": 7}}
    (tmp_path / "results.json").write_text(json.dumps(earlier))
    study = Study(str(tmp_path), quick=True, ranks=1, jobs=1, corpus=None, cells="A")
    assert study.earlier_cells() == {"B": {"final_books": {}}}  # A is redone, not kept
    assert study.phases == {"B arms": 5}


@pytest.mark.multirank
def test_repro_v6_quick_runs_cell_b_end_to_end_and_rules_on_it(tmp_path):
    from bench.repro_v6 import B_ARMS, B_MATCHED, B_QUICK, KD_GRID, TED_GRID

    out = tmp_path / "v6"
    big = tmp_path / "corpus.txt"  # the bundled sample, never ../shared
    big.write_text("\n".join(corpus_lines(2000)) + "\n", encoding="utf-8")
    r = subprocess.run([sys.executable, os.path.join(REPO, "bench", "repro.py"), "--study", "v6", "--quick",
                        "--cells", "B", "--out", str(out), "--corpus", str(big)], cwd=REPO, capture_output=True,
                       text=True, timeout=1200)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    results = json.load(open(out / "results.json"))
    b, work = results["cells"]["B"], out / "work" / "cellB"
    assert set(b["scores"]) == {*B_ARMS, B_MATCHED} and b["seeds"] == list(B_QUICK["seeds"])
    assert b["matched"]["steps"] > B_QUICK["student_steps"]
    assert results["decision"]["H_A"]["outcome"] == "cell A not run" and results["decision"]["H_B"]["holds"] is not None
    for arm, runs in b["scores"].items():  # every split evaluated at the chosen steps and the last only
        for by_step in runs:
            assert sorted(map(int, by_step)) == [*B_QUICK["eval_steps"], *([b["matched"]["steps"]]
                                                                            if arm == B_MATCHED else [])]
            assert all(set(v) == {"books-test", "books-valid", "wikipedia"} for v in by_step.values())
    tuned_kd, tuned_ted = b["tuned"]["kd"], b["tuned"]["ted-cosine"]
    assert len(tuned_kd["losses"]) == len(KD_GRID) and len(tuned_ted["losses"]) == len(TED_GRID)
    cfg = yaml.safe_load(open(next((work / "seed1" / "ted-cosine").glob("config-distill-*.yaml"))))
    assert cfg["distill"]["temperature"] == tuned_kd["temperature"] and cfg["distill"]["beta"] == tuned_ted["beta"]
    assert cfg["teacher"]["path"].endswith("cellB/teacher-books/hf")  # the adapted teacher
    assert cfg["student"]["path"].endswith("cellB/student-base/hf")  # the pre-trained small student
    student = json.load(open(work / "student-base" / "hf" / "config.json"))
    teacher = json.load(open(work / "teacher-books" / "hf" / "config.json"))
    assert student["hidden_size"] < teacher["hidden_size"] and student["num_hidden_layers"] < teacher[
        "num_hidden_layers"]
    tune_cfg = yaml.safe_load(open(next((work / "seed0" / "tune-ted-cosine-0").glob("config-distill-*.yaml"))))
    assert tune_cfg["distill"]["temperature"] == tuned_kd["temperature"]  # TED tuned at KD's tuned T
    books = {s: set(open(work / f"books-{s}.txt", encoding="utf-8")) for s in ("train", "valid", "test")}
    assert not (books["train"] & books["test"]) and not (books["valid"] & books["test"])  # split by document
    assert all(b["filters"][s]["student"][0]["shape"] == [teacher["hidden_size"], student["hidden_size"]]
               for s in b["filters"])
    assert "H_B outcome" in (out / "results.md").read_text() and (out / "curves.png").stat().st_size > 1000
