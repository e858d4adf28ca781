"""The README's "distil a Qwen-style pair" walk-through, run exactly as written: its bash block,
taken from README.md, from the repo root with ``W`` in a temporary directory."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from harness.common import REPO

TITLE = "### Walk-through: distil a Qwen-style pair"


def _block() -> str:
    text = open(os.path.join(REPO, "README.md")).read()
    section = text[text.index(TITLE):]
    return re.search(r"```bash\n(.*?)```", section, re.S).group(1)


@pytest.mark.multirank
def test_the_readme_walkthrough_runs_as_written(tmp_path):
    w = str(tmp_path / "qwen-pair")
    env = dict(os.environ, W=w, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"],
               PYTHONUNBUFFERED="1")
    r = subprocess.run(["bash", "-euo", "pipefail", "-c", _block()], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=1200)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert "ted-ds: distill-ted finished at step 6" in r.stderr
    assert "vocabularies: data tokenizer 4000 ids; teacher 4096 embedding rows, student 4032 embedding rows" in r.stderr
    assert "identical to the checkpoint's" in r.stderr  # the export's own check
    assert re.search(r"perplexity [0-9.]+", r.stdout)
    from safetensors import safe_open

    with safe_open(os.path.join(w, "student-ted", "model.safetensors"), "pt") as f:
        assert f.get_slice("model.embed_tokens.weight").get_shape() == [4032, 64]  # its own row count kept
