"""The large-scale path at small size: the GPU check's phases on CPU, the scale rehearsal's
arithmetic, and the one-line refusals of runs that cannot fit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch

from harness.common import ProcessGroupStarted, stop_at_process_group
from harness.tiny import base_config, write_config
from ted_ds.cli import main as ted_main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bench_output(*args: str, timeout: float = 1200) -> str:
    proc = subprocess.run([sys.executable, "-m", "bench", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ, DS_ACCELERATOR="cpu"))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc.stdout


def _bench(*args: str, timeout: float = 1200) -> dict:
    return json.loads(_bench_output(*args, timeout=timeout).strip().splitlines()[-1])


@pytest.mark.multirank
def test_gpu_check_dry_run_runs_every_phase_on_cpu(tmp_path):
    """The GPU check's own code path (bf16 ZeRO-3 config, fused AdamW, TED stage 1 and 2 from
    partitioned loads, export, eval, engine and KD benches; attention kernels, teacher forward, the
    ted-ds student step against a plain PyTorch step and each lever, the TED step with and without
    documents) with tiny shapes on CPU."""
    args = ["gpu", "--dry-run", "--work", str(tmp_path / "w"), "--out", str(tmp_path / "o")]
    result = _bench(*args)
    written = json.load(open(tmp_path / "o" / "gpu_check.json"))
    phases = {p["phase"]: p["rc"] for p in written["phases"]}
    assert {"kd bench", "learn-filters teacher", "learn-filters student", "distill ted", "export", "eval",
            "engine bench replicated", "engine bench zero3", "engine bench pipeline", "attention teacher",
            "attention student", "teacher forward", "plain step", "random teacher", "random student"} <= set(phases)
    assert not any(phases.values()), phases
    every = ["student", "ted", "levers", "documents", "attention", "teacher", "kd", "distill"]
    assert result["sections"] == {"ran": every, "reused": [], "failed": [], "left": []} and result["vocab"] == 1536
    again = _bench(*args)  # the same work directory: every section's figures reused, nothing measured again
    assert again["sections"] == {"ran": [], "reused": every, "failed": [], "left": []}
    assert {k: v for k, v in again.items() if k != "sections"} == {k: v for k, v in result.items() if k != "sections"}
    assert result["tokens_per_s"] > 0 and 0 < result["mfu"] < 1 and 1 < result["eval_ppl"] < result["vocab"]
    assert result["ted_over_student_plus_teacher"] == pytest.approx(  # the ratio of the figures it reports
        result["ted_step_s_replicated"] / (result["student_step_s"] + result["teacher_forward_s"]))
    assert 0 < result["kd_memory_ratio"] < 1 and result["kd_time_ratio"] > 0  # chunking holds less than the whole
    for side in ("teacher", "student"):
        _assert_attention(result["attention"][side])
    _assert_teacher_forward(result["teacher_forward"])
    _assert_student_steps(result)
    assert result["ted_mfu"] == result["ted_step"]["mfu"] > 0 and result["ted_step"]["step_s"] > 0
    assert 0 < result["doc_attention_ratio"] < float("inf")
    assert result["ted_settings"] == {"variant": "ted-ds", "overrides": [], "micro_batch": 2}  # as configured
    assert result["ted_documents_step"]["step_s"] > 0 and result["best_student"]["variant"] != "plain"


def _assert_attention(a: dict) -> None:
    """Every kernel ran and timed; in fp32 the flex document path and causal SDPA equal the dense masks."""
    for name in ("causal", "document_dense", "document_flex"):
        assert a[name]["ms"] > 0 and a[name]["tflops"] > 0, (name, a[name])
    assert a["causal"]["backend"] in a["causal"]["ms_by_backend"] and a["document_dense"]["backend"]
    assert isinstance(a["document_dense"]["ms_by_backend"]["MATH"], float)
    assert a["document_dense"]["max_abs_err"] == 0
    assert a["document_flex"]["max_abs_err"] <= 1e-5 and a["causal"]["max_abs_err"] <= 1e-5


def _assert_teacher_forward(rows: list[dict]) -> None:
    assert {(r["attn_implementation"], r["document_attention"], r["micro_batch"]) for r in rows} == {
        (impl, docs, mb) for impl, docs in (("sdpa", False), ("sdpa", True), ("flex_attention", True)) for mb in (1, 2)}
    assert all(r["ms"] > 0 and r["ms_per_4096_tokens"] == pytest.approx(r["ms"] * 4096 / (r["micro_batch"] * 64))
               for r in rows)  # a call's ms scaled by its tokens (micro-batch × the dry run's 64)
    flops = [r["mfu"] * r["ms"] / r["micro_batch"] for r in rows]  # ∝ FLOPs per window: one model, one length
    assert all(f > 0 and f == pytest.approx(flops[0]) for f in flops)


def _assert_student_steps(result: dict) -> None:
    """The ted-ds and the plain step at every micro-batch (1 and 2 in the dry run), each lever (flex skipped on
    a CPU), the headlines."""
    rows = {(r["variant"], r["micro_batch"]): r for r in [*result["student_steps"], *result["lever_steps"]]}
    assert {(r["variant"], r["micro_batch"]) for r in result["student_steps"]} == {("ted-ds", 2), ("plain", 2)}
    levers = ("persistent_params", "activation_checkpointing", "eager", "compile_blocks")
    timed = [*((v, mb) for v in ("ted-ds", "plain") for mb in (1, 2)), *((v, 2) for v in levers)]
    for key in timed:  # tokens/s is the step's tokens (micro-batch × 64) over its seconds; MFU ∝ tokens/s
        r = rows[key]
        assert r["step_s"] > 0 and r["tokens_per_s"] * r["step_s"] == pytest.approx(key[1] * 64), key
        assert r["peak_gpu_gib"] is None  # no GPU
    for v in ("ted-ds", "plain"):  # one model, one window: the same FLOPs per token at either micro-batch
        per_token = [rows[(v, mb)]["mfu"] / rows[(v, mb)]["tokens_per_s"] for mb in (1, 2)]
        assert per_token[0] > 0 and per_token[0] == pytest.approx(per_token[1]), v
    assert "no backward on a CPU" in rows[("flex_attention", 2)]["skipped"]
    assert result["student_mfu"] == rows[("ted-ds", 2)]["mfu"]
    assert result["student_vs_plain"] == pytest.approx(rows[("ted-ds", 2)]["step_s"] / rows[("plain", 2)]["step_s"])
    assert set(result["student_vs_plain_by_micro_batch"]) == {"1", "2"}
    assert all(0 < r < float("inf") for r in result["student_vs_plain_by_micro_batch"].values())
    profile = result["student_profile"]
    assert sum(profile["phase"].values()) == pytest.approx(1) and profile["kind"]["GEMM"] > 0
    assert {"forward", "backward", "step"} <= set(profile["phase"]) and profile["total_s"]["wall"] > 0


@pytest.mark.slow
def test_gpu_check_reuses_finished_sections_and_stops_within_its_budget(tmp_path):
    """A GPU slot is short: a second call with the same --work reuses every finished section (the data,
    the models and the figures) in well under a third of the first call's time, and --budget-s starts no
    section that would end past it, saying in one line what is left."""
    args = ["gpu", "--dry-run", "--work", str(tmp_path / "w"), "--sections", "attention,teacher"]
    times, results = [], []
    for _ in range(2):
        start = time.perf_counter()
        results.append(_bench(*args))
        times.append(time.perf_counter() - start)
    first, second = results
    assert first["sections"]["ran"] == ["attention", "teacher"] and first["teacher_params"] > 0
    assert second["sections"] == {"ran": [], "reused": ["attention", "teacher"], "failed": [], "left": []}
    assert second["teacher_forward"] == first["teacher_forward"] and times[1] < times[0] / 3, times
    out = _bench_output(*args[:-1], "attention,teacher,kd", "--budget-s", "1")
    assert "gpu-check: budget 1 s: stopped before kd" in out and "left: kd — run again with --work" in out
    assert "ran=- reused=attention,teacher failed=- left=kd" in out


@pytest.mark.multirank
def test_scale_rehearsal_quick_reports_every_placement(tmp_path):
    summary = _bench("scale", "--quick", "--workdir", str(tmp_path))
    assert set(summary["rss_over_floor"]) == {"replicated", "zero3", "pipeline"}
    assert all(r > 0 for r in summary["rss_over_floor"].values())


def test_floor_follows_the_placement(tiny):
    """Sharded placements must hold less teacher than a replicated one, and the floor says how much."""
    from ted_ds.architectures import load_hf_config, meta_model, teacher_blocks_config, vocab_size
    from ted_ds.capacity import chunk_tokens, rank_floor_bytes, teacher_share

    t = load_hf_config(tiny["llama_teacher"])
    total = teacher_share(t, "replicated", 2, 2, None)
    largest = max(p.numel() for p in meta_model(t).parameters())
    assert teacher_share(t, "zero3", 2, 2, None) == (total + 1) // 2 + largest
    assert total / 2 < teacher_share(t, "pipeline", 2, 2, None) < total
    s = teacher_blocks_config(t, [0, 2])
    floors = {p: rank_floor_bytes(t, s, p, 2, 2, None, torch.float32, 64) for p in ("replicated", "zero3")}
    assert floors["replicated"] - floors["zero3"] == pytest.approx(4 * (total - (total + 1) // 2 - largest))
    # a pipeline's last stage also holds one chunk of another rank's logits (3 rows in 2 chunks: 2 rows)
    pipeline = lambda stages, chunk: rank_floor_bytes(t, s, "pipeline", 2, stages, None, torch.float32, 48, 0, chunk)
    assert chunk_tokens(3, 16, 2) == 32
    assert pipeline(2, 32) - pipeline(2, 0) == 32 * vocab_size(s) * 4 and pipeline(1, 32) == pipeline(1, 0)


def test_runs_that_cannot_fit_are_refused_in_one_line(tiny, tmp_path, capsys, monkeypatch):
    from ted_ds import capacity

    cfg = base_config(tiny["llama_data"], tiny["llama_teacher"], str(tmp_path / "o"), **{"distill.method": "kd"})
    path = write_config(str(tmp_path / "c.yaml"), **cfg)
    monkeypatch.setattr(capacity, "visible_bytes", lambda device, local_ranks: (1e5, "host"))  # a rank sees 100 kB
    capsys.readouterr()
    assert ted_main(["distill", "--config", path]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ted-ds: error: this run needs at least") and "teacher.placement zero3" in err
    assert "\n" not in err and not os.path.exists(tmp_path / "o" / "checkpoints")
    monkeypatch.undo()
    assert ted_main(["distill", "--config", path, "teacher.placement=pipeline",
                     "teacher.pipeline_stages=8"]) == 2
    err = capsys.readouterr().err.strip()
    assert "pipeline_stages 8 must divide the number of ranks 1" in err and "\n" not in err


def test_trainable_stage1_heads_count_in_the_floor(tiny, tmp_path, capsys, monkeypatch):
    """Stage 1 with ``filter_head: trainable`` trains a norm + unembedding per tap under ZeRO-3: through
    ``ted-ds learn-filters`` (its set-up, before any process group), a rank that holds the floor plus half
    the heads' bytes starts with the teacher's frozen head and is refused in one line with trainable heads."""
    from ted_ds import capacity
    from ted_ds.architectures import hidden_size, load_hf_config, vocab_size

    teacher = load_hf_config(tiny["llama_teacher"])
    taps = 2  # base_config: teacher layers 2, 4 ↔ student layers 1, 2
    heads = 16 * taps * vocab_size(teacher) * hidden_size(teacher)  # fp32 ZeRO-3 state of each head, one rank
    floors = []
    floor = capacity.rank_floor_bytes
    monkeypatch.setattr(capacity, "rank_floor_bytes", lambda *a, **k: floors.append(floor(*a, **k)) or floors[-1])
    monkeypatch.setattr(capacity, "visible_bytes", lambda device, local_ranks: (floors[-1] + heads / 2, "host"))
    stop_at_process_group(monkeypatch)
    path = write_config(str(tmp_path / "c.yaml"), **base_config(tiny["llama_data"], tiny["llama_teacher"],
                                                                str(tmp_path / "o")))
    learn = ["learn-filters", "--config", path, "--model", "student"]
    with pytest.raises(ProcessGroupStarted):
        ted_main(learn)
    capsys.readouterr()
    assert ted_main([*learn, "distill.filter_head=trainable"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ted-ds: error: this run needs at least") and "\n" not in err, err


def test_arch_list_that_deepspeed_can_parse():
    """Hopper images set TORCH_CUDA_ARCH_LIST=9.0a, which DeepSpeed's fused-Adam builder cannot parse
    (seen on an H100); the rank start rewrites it to plain numbers."""
    from ted_ds.distributed import numeric_arch_list

    assert numeric_arch_list("9.0a") == "9.0"
    assert numeric_arch_list("8.0;9.0a+PTX") == "8.0;9.0+PTX"
    assert numeric_arch_list("7.5 8.0") == "7.5 8.0"
