"""A weighted mixture of two sources in one real 2-rank run: each source evaluated on its own, the
weighted total, and the samples and epochs each source gave, in metrics.jsonl and trainer_state.json;
then the same run killed mid-save and resumed gives the same batches, losses and weights."""

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
    corpus = tmp_path / "more.txt"  # other paragraphs, the same tokenizer
    corpus.write_text("\n".join(corpus_lines(16, start=400)) + "\n", encoding="utf-8")
    more = str(tmp_path / "more")
    build(BuildOptions(inputs=[str(corpus)], tokenizer=os.path.join(wiki, "tokenizer"), out=more, valid_fraction=0.3,
                       progress=False))
    out = str(tmp_path / "mix")
    sources = [{"name": "wiki", "path": wiki, "weight": 0.75}, {"name": "more", "path": more, "weight": 0.25}]
    over = {"distill.method": "lm", "train.eval_interval": 2, "train.save_interval": 2, "data.path": "",
            "data.sources": sources}
    run_launcher(deepspeed_cmd(2, "--module", "ted_ds", "distill", "--config",
                               write_config(str(tmp_path / "mix.yaml"), **base_config(wiki, tiny["llama_teacher"], out,
                                                                                      **over))))

    metrics = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    evals = {m["step"]: m for m in metrics if "eval/loss" in m}
    assert sorted(evals) == [2, 4]
    for m in evals.values():
        for name in ("wiki", "more"):
            assert m[f"eval/{name}/ppl"] == pytest.approx(math.exp(m[f"eval/{name}/loss"]))
        assert m["eval/loss"] == pytest.approx(0.75 * m["eval/wiki/loss"] + 0.25 * m["eval/more/loss"], rel=1e-12)
        assert m["eval/wiki/loss"] != m["eval/more/loss"]
    sizes = {s["name"]: len(PackedShardDataset(s["path"], "train", 32)) for s in sources}
    blend = Blend(("wiki", "more"), (sizes["wiki"], sizes["more"]), (0.75, 0.25))
    logged = {m["step"]: m for m in metrics if "loss/total" in m}
    for step in (1, 4):  # 8 samples per step, 3 : 1
        assert blend.counts(8 * step).tolist() == [6 * step, 2 * step]
        for name, n in zip(blend.names, blend.counts(8 * step)):
            assert logged[step][f"data/{name}/samples"] == n
            assert logged[step][f"data/{name}/epochs"] == n / sizes[name]
    state = json.load(open(os.path.join(out, "checkpoints", "distill-lm", "step-00000004", "trainer_state.json")))
    assert state["sampler"]["consumed_samples"] == 32
    assert state["sampler"]["sources"] == {"wiki": {"samples": 24, "epochs": 24 / sizes["wiki"], "weight": 0.75},
                                           "more": {"samples": 8, "epochs": 8 / sizes["more"], "weight": 0.25}}

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
