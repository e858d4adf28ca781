"""bench/crosstok_study.py (does KD across tokenizers help, in bits per byte): the pre-registered rule on
inputs whose answers are known, and --quick end to end (every arm on two paired seeds, the rule's outcome)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from harness.common import REPO, corpus_lines


def scores(chunk_gain: float, overlap_gain: float, ref_gain: float) -> dict[str, list[float]]:
    """Per-seed bits/byte of every arm: each KD arm below its tokenizer's no-teacher arm by its gain, with
    seed noise that does not pair across arms."""
    noise = [0.003, -0.002, 0.001, -0.002]  # mean 0
    lm, ref = [1.5 + n for n in noise], [1.4 - n for n in noise]
    return {"lm": lm, "chunk_likelihood": [x - chunk_gain + n / 2 for x, n in zip(lm, noise)],
            "overlap_kl": [x - overlap_gain - n / 2 for x, n in zip(lm, noise)],
            "ref-lm": ref, "ref-kd": [x - ref_gain + n / 3 for x, n in zip(ref, noise)]}


def test_the_rule_meets_the_goal_only_for_a_loss_that_beats_no_teacher_and_recovers_half_the_reference():
    from bench.crosstok_study import decide

    d = decide(scores(chunk_gain=0.06, overlap_gain=0.04, ref_gain=0.1))
    chunk = d["chunk_likelihood"]
    assert chunk["goal"] == "met" and chunk["recovered"] == "recovers ≥ 50 % (shown at 95 %)"
    assert chunk["recovery"] == pytest.approx(0.6)
    assert d["overlap_kl"]["vs_no_teacher"]["high"] < 0 and d["overlap_kl"]["goal"] == "not met: recovers < 50 %"
    d = decide(scores(chunk_gain=-0.05, overlap_gain=0.0, ref_gain=0.1))
    assert d["chunk_likelihood"]["goal"] == "not met: does not beat no teacher; recovers < 50 %"
    d = decide(scores(chunk_gain=0.05, overlap_gain=0.05, ref_gain=0.0))  # nothing to recover
    assert d["chunk_likelihood"]["recovered"] == "reference gain not shown: recovery not ruled on"
    assert d["chunk_likelihood"]["goal"] == "not met: reference gain not shown: recovery not ruled on"


@pytest.mark.slow
def test_crosstok_study_quick_runs_every_arm_on_paired_seeds_and_rules(tmp_path):
    from bench.crosstok_study import ARMS, CROSS

    corpus = tmp_path / "corpus.txt"  # the bundled sample, never ../shared
    corpus.write_text("\n".join(corpus_lines(1200)) + "\n", encoding="utf-8")
    r = subprocess.run([sys.executable, os.path.join(REPO, "bench", "crosstok_study.py"), "--quick", "--out",
                        str(tmp_path / "out"), "--corpus", str(corpus)], cwd=REPO, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    result = json.load(open(tmp_path / "out" / "result.json"))
    assert set(result["runs"]) == set(ARMS) and result["seeds"] == [1, 2]
    assert all(0 < run["bits_per_byte"] < 20 for runs in result["runs"].values() for run in runs)
    bpb = lambda arm: [run["bits_per_byte"] for run in result["runs"][arm]]
    assert bpb("lm") != bpb("ref-lm") and bpb("lm") != bpb("chunk_likelihood") != bpb("overlap_kl")
    for x in CROSS:
        assert result["decision"][x]["goal"].startswith(("met", "not met")) and f"{x}: − lm" in r.stdout
