"""The pipeline-parallel teacher on 2 and 4 CPU ranks: exact outputs, memory split, clear failures;
the 4-rank launch with point-to-point matched as NCCL matches it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from harness.common import REPO, deepspeed_cmd, run_launcher

pytestmark = pytest.mark.multirank
SCRIPT = os.path.join(REPO, "tests", "harness", "mp", "pipeline_check.py")


@pytest.fixture(scope="module")
def bank(tiny, tmp_path_factory) -> str:
    from ted_ds.filters import FilterBank, save_filter_bank

    b = FilterBank("linear", 64, 64, [2, 4], seed=3)
    out = str(tmp_path_factory.mktemp("bank") / "bank")
    save_filter_bank(b.state_dict(), b.meta(), out)
    return out


def _launch(tiny, bank, out_dir, ranks: int, *extra: str) -> dict:
    out = os.path.join(out_dir, "r.json")
    run_launcher(deepspeed_cmd(ranks, SCRIPT, "--teacher", tiny["llama_teacher"], "--bank", bank, "--out", out,
                               *extra))
    return json.load(open(out))


@pytest.fixture(scope="module")
def two_ranks(tiny, arch_teachers, bank, tmp_path_factory) -> dict:
    """One 2-rank launch: the pipeline checks (also on Qwen2, Mistral, Gemma 2, Phi-3 teachers), and
    document attention in ZeRO-3 and pipeline teachers."""
    return _launch(tiny, bank, str(tmp_path_factory.mktemp("two")), 2, "--documents", tiny["llama_teacher"],
                   tiny["gpt2_teacher"], "--archs", *arch_teachers.values(), "--vocab",
                   str(load_tokenizer_size(tiny["llama_data"])))


@pytest.fixture(scope="module")
def four_ranks_as_nccl(tiny, bank, tmp_path_factory) -> dict:
    """One 4-rank launch with point-to-point matched as NCCL matches it (``harness.nccl_matching``:
    one tag for every message, each rank's operations one at a time in posting order, a send done
    once received): P=2 (two pipeline groups side by side) and P=4, and document attention at P=4."""
    return _launch(tiny, bank, str(tmp_path_factory.mktemp("four")), 4, "--matching", "nccl", "--documents",
                   tiny["llama_teacher"])


CASES = ["", "_chunks2", "_chunks2_top8_bf16", "_chunks2_taps"]  # chunks 1 and 2; full, top-8 bf16, no logits


def check_cases(r: dict, stages: list[int]) -> None:
    """Each case bit-identical (fp32 taps and logits, bf16 logits = the teacher's rounded to bf16, top-k
    ids equal) to the whole teacher in one process on the same chunks, and every rank holds exactly its
    stage: whole blocks balanced by forward FLOPs (about 1/P of the teacher), the embeddings on the
    first stage and the head on the last, nothing else."""
    for name in [f"P{p}{case}" for p in stages for case in CASES]:
        assert r[name]["exact"], (name, r[name]["max_diff"])
        assert r[name]["local_params"] == r[name]["stage_params"], name
        group_total = sum(r[name]["local_params"][:int(name[1])])
        assert group_total == pytest.approx(r[name]["full_params"], rel=0.01), name


def test_pipeline_outputs_equal_a_single_process_teacher(two_ranks):
    """On plain gloo (messages matched by tag, operations run side by side)."""
    check_cases(two_ranks, [2])


def test_pipeline_matched_as_nccl_equals_a_single_process_teacher(four_ranks_as_nccl):
    """The protocol leans neither on tags nor on gloo running operations side by side: under NCCL's
    matching rules the outputs stay exact, document attention included (the schedule that posted
    every receive first timed out here; one that posts a tick's receives before its sends too).  The
    rules were in force: a tag-swapped pair of messages met in posting order, and the pipeline's
    operations went through the one-at-a-time queue."""
    r = four_ranks_as_nccl
    check_cases(r, [2, 4])
    assert r["documents_llama_pipeline"]["max_diff"] < 1e-5
    assert r["matching"]["tags_ignored"] and r["matching"]["operations"] > 100, r["matching"]


def load_tokenizer_size(data_dir: str) -> int:
    return json.load(open(os.path.join(data_dir, "manifest.json")))["vocab_size"]


def test_other_architectures_pipeline_equals_a_single_process_teacher(two_ranks):
    """Qwen2 (embedding padded past the tokenizer), Mistral (sliding window), Gemma 2 (sqrt(d)-scaled
    embedding, final logit soft-cap, sliding window), Phi-3: the 2-stage pipeline's filtered taps and
    logits, cut to the tokenizer's ids, are bit-identical to the whole teacher's; bf16 top-8 logits and
    ids too (never an id past the tokenizer's)."""
    from harness.tiny import ARCHITECTURES

    for kind in ARCHITECTURES:
        for name in (f"{kind}_P2_chunks2", f"{kind}_P2_top8_bf16"):
            assert two_ranks[name]["exact"], (name, two_ranks[name]["max_diff"])
            assert two_ranks[name]["local_params"] == two_ranks[name]["stage_params"], name


def test_documents_stay_apart_in_zero3_and_pipeline_teachers(two_ranks):
    """data.document_attention: each document of a packed window (one cut by the window's start, one
    whole, each with its EOS) gives the logits and tapped hidden states of the document run alone.  The
    teachers are built by the run's loader with ``teacher.attn_implementation: eager``, and each placement
    runs it (the pipeline's stages build their own models from the config)."""
    for kind in ("llama", "gpt2"):
        for placement in ("zero3", "pipeline"):
            result = two_ranks[f"documents_{kind}_{placement}"]
            assert result["max_diff"] < 1e-5 and result["attn"] == "eager", (kind, placement, result)


def _spawn(tiny, bank, fault: str, ranks: int = 2):
    """Start ranks without a launcher (as `srun` without --kill-on-bad-exit would): nobody kills the
    survivors for us, so they must notice the failure themselves."""
    from ted_ds.distributed import free_port

    port = str(free_port())
    procs = []
    for r in range(ranks):
        env = dict(os.environ, RANK=str(r), WORLD_SIZE=str(ranks), LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=port)
        procs.append(subprocess.Popen([sys.executable, SCRIPT, "--teacher", tiny["llama_teacher"], "--bank", bank,
                                       "--fault", fault], env=env, cwd=REPO, stderr=subprocess.PIPE, text=True))
    start = time.time()
    outs = [(p.wait(timeout=120), p.stderr.read()) for p in procs]
    return outs, time.time() - start


def test_dead_stage_ends_the_job_with_a_clear_error(tiny, bank):
    outs, elapsed = _spawn(tiny, bank, "die")
    (rc0, err0), (rc1, _) = outs
    assert rc1 == 17
    assert rc0 == 2, err0[-2000:]
    assert "pipeline teacher, stage 0 (rank 0)" in err0 and "peer stage died" in err0
    assert elapsed < 90  # within the 15 s timeout plus start-up, not a hang


def test_shape_mismatch_is_an_error_on_every_rank(tiny, bank):
    """Micro-batches of different sizes (rows) are refused; widths may differ (tests/test_crosstok_multirank.py)."""
    outs, _ = _spawn(tiny, bank, "shape")
    for rc, err in outs:
        assert rc == 2, err[-2000:]
        assert "micro-batch sizes differ" in err and "[(4, 16), (2, 16)]" in err
