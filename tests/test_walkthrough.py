"""The README's walk-throughs ("distil a Qwen-style pair", "distilling across tokenizers"), run exactly as
written: each one's bash block, taken from README.md, from the repo root with ``W`` in a temporary
directory."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from harness.common import REPO

TITLE = "### Walk-through: distil a Qwen-style pair"
CROSS_TITLE = "### Distilling across tokenizers"


def _block(title: str = TITLE) -> str:
    text = open(os.path.join(REPO, "README.md")).read()
    section = text[text.index(title):]
    return re.search(r"```bash\n(.*?)```", section, re.S).group(1)


def _run_block(title: str, w: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, W=w, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"],
               PYTHONUNBUFFERED="1")
    return subprocess.run(["bash", "-euo", "pipefail", "-c", _block(title)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=1200)


@pytest.mark.multirank
def test_the_readme_walkthrough_runs_as_written(tmp_path):
    w = str(tmp_path / "qwen-pair")
    r = _run_block(TITLE, w)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert "ted-ds: distill-ted finished at step 6" in r.stderr
    assert "vocabularies: data tokenizer 4000 ids; teacher 4096 embedding rows, student 4032 embedding rows" in r.stderr
    assert "identical to the checkpoint's" in r.stderr  # the export's own check
    assert re.search(r"perplexity [0-9.]+", r.stdout)
    from safetensors import safe_open

    with safe_open(os.path.join(w, "student-ted", "model.safetensors"), "pt") as f:
        assert f.get_slice("model.embed_tokens.weight").get_shape() == [4032, 64]  # its own row count kept


@pytest.mark.slow
@pytest.mark.multirank  # several launches in a row, as the walk-through above: out of the quick tier
def test_the_readme_cross_tokenizer_walkthrough_runs_as_written(tmp_path):
    r = _run_block(CROSS_TITLE, str(tmp_path / "cross"))
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert "ted-ds: distill-kd finished at step 6" in r.stderr
    assert len(re.findall(r"bits/byte [0-9.]+", r.stdout)) == 2, r.stdout
