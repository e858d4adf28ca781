"""The teacher cache against the online teacher, in five launches.

1 rank: ``cache-teacher``, then KD with the teacher online and KD from that cache, with forward KL and JSD;
the same for a top-p cache and a sampled one (on the two-source mixture).
2 ranks: ``cache-teacher`` killed after a few blocks; then one launch that finishes that build (with the
teacher under another placement, ZeRO-3) and trains, each online and from the cache: KD, LWD (the teacher
runs for its taps, its logits come from the cache; k = 4 read from a k = 8 cache, in the renormalized form)
and KD on a two-source mixture, top-p and sampled; finally KD from the cache killed mid-save and resumed.
The cached runs must equal the online ones bit for bit (fp32, top-8 logits and the tail logit rounded to fp16
on both paths: KD's default tail form);
the 2-rank build, killed and finished, must equal the 1-rank build byte for byte.
"""

from __future__ import annotations

import filecmp
import json
import os
import re
import shutil
import subprocess

import pytest
import torch
import yaml

from data_prep.build import BuildOptions, build
from harness.common import REPO, corpus_lines, deepspeed_cmd, run_launcher, student_weights
from harness.scenarios import Scenarios, launch_scenarios
from harness.tiny import base_config, make_teacher, write_config
from ted_ds.cache.format import MANIFEST, CacheRows

pytestmark = pytest.mark.multirank

BLOCK_WINDOWS = 128
LOSS_KEYS = ("loss/total", "loss/lm", "loss/kd", "loss/layer")


def _losses(out_dir: str) -> dict[int, dict]:
    rows = [json.loads(line) for line in open(os.path.join(out_dir, "metrics.jsonl"))]
    return {r["step"]: {k: r[k] for k in LOSS_KEYS if k in r} for r in rows if "loss/total" in r}


def _same_run(a: str, b: str) -> None:
    """Two runs' loss curves and final weights, bit for bit."""
    assert _losses(a) == _losses(b) and len(_losses(a)) == 6
    wa, wb = student_weights(a), student_weights(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def _files(cache: str) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, f), cache) for d, _, fs in os.walk(cache) for f in fs)


class World:
    """The data (wiki, and a second source on its tokenizer) and the runs' configs, in one directory."""

    def __init__(self, tiny, root):
        self.root, self.tiny = root, tiny
        wiki = tiny["llama_data"]
        corpus = root / "more.txt"
        corpus.write_text("\n".join(corpus_lines(16, start=400)) + "\n", encoding="utf-8")
        more = str(root / "more")
        build(BuildOptions(inputs=[str(corpus)], tokenizer=os.path.join(wiki, "tokenizer"), out=more,
                           valid_fraction=0.3, progress=False))
        self.mix = {"data.path": "", "data.sources": [{"name": "wiki", "path": wiki, "weight": 0.75},
                                                      {"name": "more", "path": more, "weight": 0.25}]}
        self.lwd = {"distill.method": "lwd", "teacher.logits_topk": 4, "teacher.placement": "zero3",
                    "teacher.logits_topk_form": "renormalized"}  # k < the cache's: exact in this form only

    def config(self, name: str, cache: str | None = None, **over) -> str:
        """KD, top-8 logits rounded to fp16, 6 steps saved every 2; ``cache``: a cache directory's name."""
        kd = {"distill.method": "kd", "teacher.logits_topk": 8, "teacher.logits_dtype": "fp16", "train.steps": 6,
              "train.save_interval": 2}
        cfg = base_config(self.tiny["llama_data"], self.tiny["llama_teacher"], str(self.root / name), **{**kd, **over})
        if cache:
            cfg["teacher"]["cache"] = str(self.root / cache)
        return write_config(str(self.root / f"{name}.yaml"), **cfg)

    def scenarios(self, ranks: int, name: str, runs) -> Scenarios:
        """One launch of run_scenarios.py over ``runs`` ((name, config, extra), ...); its records."""
        spec = [{"name": n, "config": c, **extra} for n, c, extra in runs]
        return launch_scenarios(ranks, spec, {}, {n: c for n, c, _ in runs}, str(self.root / f"{name}.json"), 1200)

    def cache_run(self, name: str, placement: str = "replicated", **over) -> tuple:
        """A scenario building the cache ``name`` over both sources."""
        config = self.config(f"for-{name}", **self.mix, **{"teacher.placement": placement, **over})
        return (name, config, {"cache_out": str(self.root / name), "block_windows": BLOCK_WINDOWS})

    def killed(self, fault: str, *command: str) -> subprocess.CompletedProcess:
        script = os.path.join(REPO, "tests", "harness", "mp", "fault_at.py")
        return subprocess.run(deepspeed_cmd(2, script, "--fault", fault, *command), cwd=REPO, capture_output=True,
                              text=True, timeout=600)


@pytest.fixture(scope="module")
def world(tiny, tmp_path_factory) -> World:
    return World(tiny, tmp_path_factory.mktemp("cache"))


TOP_P = {"teacher.logits_top_p": 0.012}  # the tiny random teacher is flat (top-8 hold ~5 % at T = 2): 1 to 3 kept
SAMPLED = {"teacher.logits_topk": 0, "teacher.logits_sampling": "sampled", "teacher.logits_samples": 16}


@pytest.fixture(scope="module")
def one_rank(world) -> Scenarios:
    """1 rank: the cache, KD online and from the cache, and the same with JSD as KD's divergence; top-p and
    sampled caches and KD online and from each (sampled on the two-source mixture)."""
    c, jsd, mix = world.config, {"distill.divergence": "jsd", "distill.divergence_mix": 0.3}, world.mix
    return world.scenarios(1, "one", [world.cache_run("cache1"), ("kd_online", c("kd1"), {}),
                                      ("kd_cached", c("kd1c", "cache1"), {}),
                                      ("jsd_online", c("jsd1", **jsd), {}),
                                      ("jsd_cached", c("jsd1c", "cache1", **jsd), {}),
                                      world.cache_run("cache1p", **TOP_P), ("topp_online", c("p1", **TOP_P), {}),
                                      ("topp_cached", c("p1c", "cache1p", **TOP_P), {}),
                                      world.cache_run("cache1s", **SAMPLED),
                                      ("sampled_online", c("s1", **mix, **SAMPLED), {}),
                                      ("sampled_cached", c("s1c", "cache1s", **mix, **SAMPLED), {})])


@pytest.fixture(scope="module")
def killed_build(world) -> tuple:
    """2 ranks: the build killed on rank 1 after its second block; what the directory held afterwards."""
    _, config, _ = world.cache_run("cache2")
    killed = world.killed("cache-block:2:1:KILL", "cache-teacher", "--config", config, "--out",
                          str(world.root / "cache2"), "--block-windows", str(BLOCK_WINDOWS))
    return killed, {f: os.stat(world.root / "cache2" / f) for f in _files(str(world.root / "cache2"))}


@pytest.fixture(scope="module")
def two_ranks(world, killed_build) -> Scenarios:
    """2 ranks: the killed build finished (the teacher now under ZeRO-3), then each run online and cached."""
    c, mix, lwd = world.config, world.mix, world.lwd
    return world.scenarios(2, "two", [
        world.cache_run("cache2", "zero3"), ("kd_online", c("kd2"), {}), ("kd_cached", c("kd2c", "cache2"), {}),
        ("lwd_online", c("lwd2", **lwd), {}), ("lwd_cached", c("lwd2c", "cache2", **lwd), {}),
        ("mix_online", c("mix2", **mix), {}), ("mix_cached", c("mix2c", "cache2", **mix), {}),
        world.cache_run("cache2p", "zero3", **TOP_P), ("topp_online", c("p2", **TOP_P), {}),
        ("topp_cached", c("p2c", "cache2p", **TOP_P), {}), world.cache_run("cache2s", "zero3", **SAMPLED),
        ("sampled_online", c("s2", **mix, **SAMPLED), {}),
        ("sampled_cached", c("s2c", "cache2s", **mix, **SAMPLED), {})])


def test_cached_kd_equals_online_kd_on_one_rank(world, one_rank):
    _same_run(str(world.root / "kd1"), str(world.root / "kd1c"))
    _same_run(str(world.root / "jsd1"), str(world.root / "jsd1c"))
    assert _losses(str(world.root / "jsd1"))[1]["loss/kd"] != _losses(str(world.root / "kd1"))[1]["loss/kd"]
    held = lambda name: "frozen_local_params_sum" in one_rank.record(name)
    assert held("kd_online") and not held("kd_cached")


def _bytes(cache: str) -> int:
    return sum(f["bytes"] for f in json.load(open(os.path.join(cache, MANIFEST)))["files"].values())


def test_top_p_and_sampled_cached_kd_equals_online_kd(world, one_rank):
    """Top-p (a support of 1 to 3 of the top-8 per token; only those entries stored) and 16 samples per
    position (their distinct ids and counts): the cached run is the online run, bit for bit."""
    root = world.root
    _same_run(str(root / "p1"), str(root / "p1c"))
    _same_run(str(root / "s1"), str(root / "s1c"))
    manifest = json.load(open(root / "cache1p" / MANIFEST))
    key = next(iter(manifest["sources"]))
    kept = CacheRows(str(root / "cache1p"), manifest, [key], 8).window(key, 0)[2]
    assert manifest["format"] == "ted-cache/3" and kept.min() >= 1 and len(set(kept.tolist())) > 2, kept
    assert _bytes(str(root / "cache1p")) < _bytes(str(root / "cache1"))
    kd = lambda run: _losses(str(root / run))[1]["loss/kd"]
    assert kd("p1") != kd("kd1") and kd("s1") > 0


def test_cached_runs_equal_online_runs_on_two_ranks(world, two_ranks):
    """KD (no teacher at all), LWD (teacher for its taps, logits from the cache, k = 4 of 8) and a mixture."""
    root, two = world.root, two_ranks
    for online, cached in (("kd2", "kd2c"), ("lwd2", "lwd2c"), ("mix2", "mix2c")):
        _same_run(str(root / online), str(root / cached))
    held = lambda name: "frozen_local_params_sum" in two.record(name)
    assert not held("kd_cached") and held("lwd_cached")
    mixed = [json.loads(line) for line in open(root / "mix2c" / "metrics.jsonl") if "data/more/samples" in line]
    assert mixed[-1]["data/more/samples"] == 12  # a quarter of 6 × 8 samples came from the second source


def test_top_p_and_sampled_cached_runs_equal_online_runs_on_two_ranks(world, one_rank, two_ranks):
    """Top-p and sampled, 2 ranks: each cached run is its online run bit for bit, and each cache (built by
    a ZeRO-3 teacher over 2 ranks) is the 1-rank replicated build byte for byte: the same supports, the
    same draws."""
    root = world.root
    _same_run(str(root / "p2"), str(root / "p2c"))
    _same_run(str(root / "s2"), str(root / "s2c"))
    for one, two in (("cache1p", "cache2p"), ("cache1s", "cache2s")):
        files = _files(str(root / one))
        assert files == _files(str(root / two)), (one, two)
        match, differ, errors = filecmp.cmpfiles(root / one, root / two, files, shallow=False)
        assert not differ and not errors, (one, differ, errors)


def test_a_killed_cache_build_keeps_its_finished_blocks_and_resumes(world, killed_build, two_ranks):
    root, (killed, after_kill) = world.root, killed_build
    assert killed.returncode != 0
    finished = [f for f in after_kill if f.endswith(".bin")]
    assert finished and MANIFEST not in after_kill, sorted(after_kill)  # some blocks done, the cache unfinished
    assert all(f.endswith((".bin", ".tmp")) or f == "build.json" for f in after_kill), sorted(after_kill)
    blocks, computed = re.search(r"\((\d+) blocks, (\d+) computed now", two_ranks.record("cache2")["line"]).groups()
    assert int(computed) == int(blocks) - len(finished)
    for f in finished:  # kept as they were, not recomputed
        assert os.stat(root / "cache2" / f).st_mtime_ns == after_kill[f].st_mtime_ns, f
    assert not [f for f in _files(str(root / "cache2")) if f.endswith(".tmp")]


def test_cache_build_is_byte_identical_for_one_and_two_ranks(world, one_rank, two_ranks):
    """The 1-rank build (replicated teacher) and the 2-rank one (killed, finished under ZeRO-3): same files,
    manifest included."""
    one, two = _files(str(world.root / "cache1")), _files(str(world.root / "cache2"))
    assert one == two and len([f for f in one if f.endswith(".bin")]) > 2
    match, differ, errors = filecmp.cmpfiles(world.root / "cache1", world.root / "cache2", one, shallow=False)
    assert not differ and not errors and len(match) == len(one)


def test_cached_run_killed_mid_save_resumes_to_the_online_run(world, two_ranks):
    config = world.config("kd2c-killed", "cache2")
    assert world.killed("save-shards:2:1:KILL", "distill", "--config", config).returncode != 0
    resumed = run_launcher(deepspeed_cmd(2, "--module", "ted_ds", "distill", "--config", config))
    assert "resumed from step-00000002" in resumed.stderr
    _same_run(str(world.root / "kd2"), str(world.root / "kd2c-killed"))


def _refused(config: str, capsys, out_dir: str) -> str:
    """Run ``distill`` in this process: it must stop before any process group with one error line, exit 2,
    and write nothing."""
    from ted_ds.cli import main

    capsys.readouterr()  # what came before
    assert main(["distill", "--config", config]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ted-ds: error: "), err
    assert not os.path.exists(out_dir)
    return err[0]


def _damaged_copy(root, how: str) -> str:
    cache = str(root / f"cache-{how}")
    shutil.copytree(root / "cache1", cache)
    block = os.path.join(cache, next(f for f in _files(cache) if f.endswith(".bin")))
    if how == "missing":
        os.remove(block)
    else:
        with open(block, "r+b") as f:
            f.seek(100)
            byte = f.read(1)
            f.seek(100)
            f.write(bytes([byte[0] ^ 1]))
    return cache


@pytest.mark.parametrize("how,says", [("missing", "is missing"), ("flipped", "sha256 differs")])
def test_a_missing_or_damaged_cache_file_is_refused(world, one_rank, capsys, how, says):
    config = world.config(f"refused-{how}", os.path.basename(_damaged_copy(world.root, how)))
    assert says in _refused(config, capsys, str(world.root / f"refused-{how}"))


@pytest.mark.parametrize("change,says", [
    ("teacher", "was made with another teacher"),
    ("data", "holds no windows of data source"),
    ("topk", "teacher.logits_topk 16 asks for more"),
    ("seq_len", "holds windows of seq_len 32; this run has data.seq_len 16"),
    ("dtype", "stores fp16 logits; set teacher.logits_dtype: fp16"),
    ("temperature", "holds its tail logits at temperature 2; this run has distill.temperature 1"),
    ("top_p", "was made with teacher.logits_top_p none (top_p); this run has 0.5"),
])
def test_a_cache_of_another_run_is_refused(world, one_rank, tiny, capsys, tmp_path, change, says):
    over = {"topk": {"teacher.logits_topk": 16}, "seq_len": {"data.seq_len": 16},
            "dtype": {"teacher.logits_dtype": "bf16"}, "temperature": {"distill.temperature": 1.0},
            "top_p": {"teacher.logits_top_p": 0.5}}.get(change, {})
    config = world.config(f"refused-{change}", "cache1", **over)
    cfg = yaml.safe_load(open(config))
    if change == "teacher":
        cfg["teacher"]["path"] = make_teacher("llama", os.path.join(tiny["llama_data"], "tokenizer"),
                                              str(tmp_path / "other-teacher"), seed=1)
    if change == "data":
        corpus = tmp_path / "other.txt"
        corpus.write_text("\n".join(corpus_lines(60, start=600)) + "\n", encoding="utf-8")
        cfg["data"]["path"] = str(tmp_path / "other")
        build(BuildOptions(inputs=[str(corpus)], tokenizer=os.path.join(tiny["llama_data"], "tokenizer"),
                           out=cfg["data"]["path"], valid_fraction=0.3, progress=False))
    write_config(config, **cfg)
    assert says in _refused(config, capsys, cfg["train"]["out_dir"])
