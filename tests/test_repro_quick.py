"""bench/repro.py --quick: the whole study on a tiny budget produces all four students and the table."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO, corpus_lines

pytestmark = pytest.mark.multirank


def test_repro_quick_produces_every_student_and_the_report(tmp_path):
    out = tmp_path / "repro"
    big = tmp_path / "corpus.txt"  # the bundled sample, never ../shared
    big.write_text("\n".join(corpus_lines(2000)) + "\n", encoding="utf-8")
    r = subprocess.run([sys.executable, os.path.join(REPO, "bench", "repro.py"), "--quick", "--out", str(out),
                        "--corpus", str(big)], cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    results = json.load(open(out / "results.json"))
    assert set(results["students"]) == {"lm", "kd", "lwd", "ted"}
    for method, runs in results["students"].items():
        assert len(runs) == 1 and os.path.isfile(out / "work" / "seed1" / method / "hf" / "model.safetensors")
        assert runs[0]["eval"]["ppl"] > 1 and runs[0]["lm_eval"]["bits_per_byte"] > 0
        assert len(runs[0]["curve"]) == 4
    table = (out / "results.md").read_text()
    for method in ("lm", "kd", "lwd", "ted"):
        assert f"| student {method} |" in table
    assert "Ranking by held-out perplexity" in table
    assert (out / "loss_curves.png").stat().st_size > 1000 and (out / "perplexity.png").stat().st_size > 1000
