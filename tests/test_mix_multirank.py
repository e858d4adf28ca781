"""A weighted mixture of two sources and a held-out third (weight 0) in one real 2-rank run: each
source evaluated on its own at train.eval_steps and the last step, the weighted total, and the samples
and epochs each source gave, in metrics.jsonl and trainer_state.json; then the same run killed
mid-save and resumed gives the same batches, losses and weights."""

from __future__ import annotations

import json
import math
import os
import subprocess

import pytest
import torch
from safetensors.torch import load_file

from data_prep.build import BuildOptions, build
from harness.common import REPO, corpus_lines, deepspeed_cmd, run_launcher
from harness.tiny import base_config, write_config
from ted_ds.data import Blend, PackedShardDataset


@pytest.mark.multirank
def test_two_source_mixture_reports_per_source_eval_and_counts(tiny, tmp_path):
    wiki = tiny["llama_data"]
    more, held = str(tmp_path / "more"), str(tmp_path / "held")
    for path, start in ((more, 400), (held, 600)):  # other paragraphs, the same tokenizer
        with open(path + ".txt", "w", encoding="utf-8") as f:
            f.write("\n".join(corpus_lines(16, start=start)) + "\n")
        build(BuildOptions(inputs=[path + ".txt"], tokenizer=os.path.join(wiki, "tokenizer"), out=path,
                           valid_fraction=0.3, progress=False))
    out = str(tmp_path / "mix")
    # "held" has weight 0: evaluated, never trained on (a test split beside the training data)
    sources = [{"name": "wiki", "path": wiki, "weight": 0.75}, {"name": "more", "path": more, "weight": 0.25},
               {"name": "held", "path": held, "weight": 0.0}]
    over = {"distill.method": "lm", "train.eval_interval": 100, "train.eval_steps": [2], "train.save_interval": 2,
            "data.path": "",
            "data.sources": sources}
    run_launcher(deepspeed_cmd(2, "--module", "ted_ds", "distill", "--config",
                               write_config(str(tmp_path / "mix.yaml"), **base_config(wiki, tiny["llama_teacher"], out,
                                                                                      **over))))

    metrics = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    evals = {m["step"]: m for m in metrics if "eval/loss" in m}
    assert sorted(evals) == [2, 4]  # train.eval_steps and the last step
    for m in evals.values():
        for name in ("wiki", "more", "held"):
            assert m[f"eval/{name}/ppl"] == pytest.approx(math.exp(m[f"eval/{name}/loss"]))
        assert m["eval/loss"] == pytest.approx(0.75 * m["eval/wiki/loss"] + 0.25 * m["eval/more/loss"], rel=1e-12)
        assert len({m[f"eval/{name}/loss"] for name in ("wiki", "more", "held")}) == 3
    sizes = {s["name"]: len(PackedShardDataset(s["path"], "train", 32)) for s in sources}
    blend = Blend(("wiki", "more", "held"), (sizes["wiki"], sizes["more"], sizes["held"]), (0.75, 0.25, 0.0))
    logged = {m["step"]: m for m in metrics if "loss/total" in m}
    for step in (1, 4):  # 8 samples per step, 3 : 1
        assert blend.counts(8 * step).tolist() == [6 * step, 2 * step, 0]
        for name, n in zip(blend.names, blend.counts(8 * step)):
            assert logged[step][f"data/{name}/samples"] == n
            assert logged[step][f"data/{name}/epochs"] == n / sizes[name]
    state = json.load(open(os.path.join(out, "checkpoints", "distill-lm", "step-00000004", "trainer_state.json")))
    assert state["sampler"]["consumed_samples"] == 32
    assert state["sampler"]["sources"] == {"wiki": {"samples": 24, "epochs": 24 / sizes["wiki"], "weight": 0.75},
                                           "more": {"samples": 8, "epochs": 8 / sizes["more"], "weight": 0.25},
                                           "held": {"samples": 0, "epochs": 0.0, "weight": 0.0}}

    # killed (rank 1, in the middle of the save at step 4) and resumed from step 2: the same batches
    # from both sources, so the same losses and weights as the run above, and the same counts
    killed = str(tmp_path / "killed")
    cfg = write_config(str(tmp_path / "killed.yaml"), **base_config(wiki, tiny["llama_teacher"], killed, **over))
    r = subprocess.run(deepspeed_cmd(2, os.path.join(REPO, "tests", "harness", "mp", "fault_at.py"), "--fault",
                                     "save-shards:2:1:KILL", "distill", "--config", cfg), cwd=REPO,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode != 0
    r = run_launcher(deepspeed_cmd(2, "--module", "ted_ds", "distill", "--config", cfg))
    assert "resumed from step-00000002" in r.stderr
    losses = lambda d: {m["step"]: m["loss/total"] for m in map(json.loads, open(os.path.join(d, "metrics.jsonl")))
                        if "loss/total" in m}
    assert losses(killed) == losses(out)
    a, b = (load_file(os.path.join(d, "hf", "model.safetensors")) for d in (out, killed))
    assert all(torch.equal(a[k], b[k]) for k in a)
    resumed = json.load(open(os.path.join(killed, "checkpoints", "distill-lm", "step-00000004", "trainer_state.json")))
    assert resumed["sampler"] == state["sampler"]
