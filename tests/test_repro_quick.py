"""bench/repro.py --quick: the whole study on a tiny budget produces all four students and the table."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from harness.common import REPO, corpus_lines

pytestmark = pytest.mark.multirank


def test_repro_quick_produces_every_student_and_the_report(tmp_path):
    out = tmp_path / "repro"
    big = tmp_path / "corpus.txt"  # the bundled sample, never ../shared
    big.write_text("\n".join(corpus_lines(2000)) + "\n", encoding="utf-8")
    r = subprocess.run([sys.executable, os.path.join(REPO, "bench", "repro.py"), "--quick", "--out", str(out),
                        "--corpus", str(big)], cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    results = json.load(open(out / "results.json"))
    methods = {"lm", "kd", "lwd", "ted", "ted-trainable"}
    for geometry in ("same-width", "narrow"):
        assert set(results["students"][geometry]) == methods
        assert set(results["chosen"][geometry]) == {"kd", "lwd", "ted"}
        tried = results["valid_tuning"][geometry]
        assert [t["weights"] for t in tried["ted"]] == [{"alpha": 1.0, "beta": 1.0}, {"alpha": 1.0, "beta": 3.0}]
        assert [t["weights"] for t in tried["kd"]] == [{"alpha": 1.0}]
        for runs in results["students"][geometry].values():
            assert [r["seed"] for r in runs] == [1, 2]
            assert all(r["test"]["ppl"] > 1 and r["lm_eval"]["bits_per_byte"] > 0 for r in runs)
            assert len(runs[0]["curve"]) == 4
    narrow = json.load(open(out / "work" / "narrow" / "lm" / "seed1" / "hf" / "config.json"))
    assert narrow["hidden_size"] == results["size"]["hidden"] // 2
    assert set(results["stage1"]) == {f"{m}-{h}" for m in ("teacher", "same-width", "narrow")
                                      for h in ("teacher", "trainable")}
    table = (out / "results.md").read_text()
    for method in methods:
        assert f"| student {method}" in table
    assert table.count("ted < kd: **") == 2 and "Stage 1" in table
    assert (out / "loss_curves.png").stat().st_size > 1000 and (out / "perplexity.png").stat().st_size > 1000


def test_the_search_widens_past_an_edge_then_tunes_the_next_weight_at_the_best_so_far():
    from bench.repro import LADDERS, pending

    def search(widen: bool, best: dict) -> dict:
        """Runs the search to its end on a bowl in log-space whose minimum is ``best``."""
        scores = {}
        while todo := pending(("beta", "alpha"), {"alpha": (0.5, 2.0), "beta": (0.1, 10.0)}, widen, scores):
            assert not set(todo) & set(scores)  # nothing is scored twice
            for point in todo:
                scores[point] = sum(math.log(v / best[k]) ** 2 for k, v in point)
        return scores

    scores = search(True, {"beta": 0.03, "alpha": 4.0})  # both outside the starting window
    assert min(scores, key=scores.get) == (("alpha", 4.0), ("beta", 0.03))
    betas = sorted(dict(p)["beta"] for p in scores if dict(p)["alpha"] == 1.0)
    assert betas == [0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0]  # widened one rung past the best, then stopped
    assert {dict(p)["alpha"] for p in scores if dict(p)["beta"] == 0.03} == {0.5, 1.0, 2.0, 4.0, 8.0}
    assert all(dict(p)["beta"] in (0.03,) or dict(p)["alpha"] == 1.0 for p in scores)  # α searched at the best β
    scores = search(True, {"beta": 0.0001, "alpha": 1.0})  # past the ladder's end: stops there
    assert min(scores, key=scores.get) == (("alpha", 1.0), ("beta", LADDERS["beta"][0]))
    scores = search(False, {"beta": 0.03, "alpha": 4.0})  # no widening: the window's edges
    assert min(scores, key=scores.get) == (("alpha", 2.0), ("beta", 0.1)) and len(scores) == 7


def test_the_verdict_holds_only_when_the_paired_interval_excludes_zero():
    from scipy import stats

    from bench.repro import paired_comparison

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


def _runs(test_ppl: float, valid_ppl: float, noise: list[float]) -> list[dict]:
    """Seeds of one student: test and valid perplexity (offset by ``noise`` per seed) and a short curve."""
    return [{"seed": i + 1, "test": {"ppl": test_ppl + e}, "valid": {"ppl": valid_ppl - e},
             "lm_eval": {"word_perplexity": test_ppl, "bits_per_byte": 1.0}, "curve": [[1, 3.0], [2, 2.5]]}
            for i, e in enumerate(noise)]


def test_the_report_chooses_the_lowest_valid_score_and_states_each_verdict_by_the_test_split(tmp_path):
    """Synthetic scores whose answers are known: tuning picks the lowest valid perplexity (in bold); each
    comparison's verdict reads the test split (valid is ordered the other way round, so reading it flips
    them), per geometry, with the better method first."""
    from bench.repro import GEOMETRIES, QUICK, choose, report

    a, b, c = [0.1, -0.2, 0.15, -0.05, 0.0], [-0.1, 0.05, 0.2, 0.0, -0.15], [0.3, -0.3, 0.25, -0.25, 0.0]
    test = {"same-width": {"lm": 30, "kd": 25, "lwd": 26, "ted": 20, "ted-trainable": 20.5},
            "narrow": {"lm": 30, "kd": 25, "lwd": 26, "ted": 25, "ted-trainable": 35}}
    students = {g: {m: _runs(ppl, 60 - ppl, [a, b, c, a[::-1], b[::-1]][i]) for i, (m, ppl) in enumerate(by.items())}
                for g, by in test.items()}
    point = lambda alpha, beta=None: (("alpha", alpha),) + ((("beta", beta),) if beta else ())
    tuning = {"kd": {point(1.0): 12.0, point(2.0): 11.0, point(4.0): 13.0},
              "lwd": {point(1.0, 1.0): 12.0}, "ted": {point(1.0, 1.0): 20.0, point(1.0, 3.0): 18.0,
                                                     point(2.0, 3.0): 19.0}}
    scores = {g: tuning for g in GEOMETRIES}
    chosen = choose(scores)
    assert chosen["narrow"] == {"kd": point(2.0), "lwd": point(1.0, 1.0), "ted": point(1.0, 3.0)}
    results = {"machine": {"date": "today", "commit": "abc", "cpus": 2}, "size": QUICK, "seeds": [1, 2, 3, 4, 5],
               "ranks": 1, "jobs": 2, "elapsed_s": 60, "phases_s": {"all": 60},
               "valid_tuning": {g: {m: [{"weights": dict(p), "ppl": v} for p, v in by.items()]
                                    for m, by in scores[g].items()} for g in GEOMETRIES},
               "chosen": {g: {m: dict(p) for m, p in by.items()} for g, by in chosen.items()},
               "stage1": {"teacher-teacher": {"L2": 3.0, "L4": 2.0}},
               "teacher": _runs(10, 10, [0.0])[0], "narrow-base": _runs(40, 40, [0.0])[0], "students": students}
    report(str(tmp_path), results)
    table = (tmp_path / "results.md").read_text()
    same, narrow = table.split("## Geometry `narrow`")
    verdict = lambda section, better, worse: section.split(f"* {better} < {worse}: **")[1].split("**")[0]
    assert [verdict(same, *pair) for pair in [("ted", "kd"), ("ted", "lwd"), ("ted-trainable", "ted"),
                                              ("kd", "lm"), ("lwd", "lm")]] == \
        ["holds", "holds", "reversed", "holds", "holds"]
    assert verdict(narrow, "ted", "kd") == "no detectable difference"  # equal means, noise only
    assert verdict(narrow, "ted-trainable", "kd") == "reversed"
    assert "* kd: alpha=1: 12.00; **alpha=2: 11.00**; alpha=4: 13.00\n" in same
    assert "* ted: alpha=1, beta=1: 20.00; **alpha=1, beta=3: 18.00**; alpha=2, beta=3: 19.00 — best alpha and " \
           "beta at the edge of the values tried\n" in same
    assert "| student ted (alpha=1, beta=3) | 20.00 ± 0.14 |" in same
    assert "| student ted-trainable (alpha=1, beta=3) |" in same  # at TED's weights

