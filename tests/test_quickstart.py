"""``examples/quickstart.sh``, the README's Quickstart, run as a user runs it: on a corpus and a teacher of
its own (tiny sizes through the settings the script reads from the environment), every job in its own
out_dir, from shards to the evaluation of each model."""

from __future__ import annotations

import json
import os
import re
import sys

import pytest

from harness.common import REPO, run_launcher
from ted_ds.distributed import free_port

SCRIPT = os.path.join(REPO, "examples", "quickstart.sh")
TINY = {"GPUS": "2", "DS_CONFIG": os.path.join(REPO, "ds_configs", "zero3_cpu.json"), "STUDENT_BLOCKS": "[1, 3]",
        "TEACHER_EVERY": "2", "SEQ_LEN": "32", "GLOBAL_BATCH": "8", "MICRO_BATCH": "2", "STAGE1_STEPS": "3",
        "STEPS": "4", "EVAL_SAMPLES": "8"}


def test_the_readme_quickstart_is_the_script():
    readme = open(os.path.join(REPO, "README.md")).read()
    section = readme[readme.index("## Quickstart"):readme.index("## Commands")]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    assert block.strip() == open(SCRIPT).read().strip()


@pytest.mark.multirank
def test_the_quickstart_script_runs_as_written(tiny, corpus_file, tmp_path):
    work = str(tmp_path / "qs")
    env = dict(TINY, TEACHER=tiny["llama_teacher"], CORPUS=corpus_file, WORK=work, MASTER_PORT=str(free_port()),
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    r = run_launcher(["bash", SCRIPT], env=env, cwd=str(tmp_path), timeout=900)
    for job, recipe, steps in (("stage1-teacher", "filters-teacher", 3), ("stage1-student", "filters-student", 3),
                               ("ted", "distill-ted", 4), ("kd", "distill-kd", 4)):
        rows = [json.loads(line) for line in open(os.path.join(work, job, "metrics.jsonl"))]
        assert {row["job"] for row in rows} == {recipe} and rows[-1]["step"] == steps
        assert os.path.isfile(os.path.join(work, job, f"config-{recipe}.yaml"))
    assert "ted-ds: distill-ted finished at step 4" in r.stderr and "identical to the checkpoint's" in r.stderr
    scores = re.findall(r"^(\S+) on \S+ \[valid\]: \d+ windows × 32 tokens, .*perplexity ([0-9.]+)", r.stdout, re.M)
    assert [model for model, _ in scores] == [tiny["llama_teacher"], f"{work}/ted-export", f"{work}/kd/hf"], r.stdout
