"""TED on a real 2-rank DeepSpeed ZeRO-3 run, checked against a single-process PyTorch reference.

One ``deepspeed --num_gpus 2`` launch runs every scenario (stage 1 on both sides, TED with the
teacher replicated, ZeRO-3-sharded and pipelined, with activation checkpointing and in bf16, LWD,
KD on all logits and on the teacher's top-k, and a GPT-2 TED run); the tests read its records.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from harness.scenarios import launch_scenarios
from harness.tiny import base_config, stage1_first_batch, write_config
from ted_ds.plan import Job

pytestmark = pytest.mark.multirank

STEPS = 4
# bf16 keeps 8 significant bits: every weight and activation of the step is off by at most half a bf16
# ulp (2^-9 relative), and the loss, a mean over every token of the batch, moves by a fraction of that.
# Allowed: one ulp, 2^-8 relative (measured: 1e-4 to 3e-4). fp32 results would be equal, not close.
BF16_LOSS_BOUND = 2**-8


# Built (not trained) with the accelerator reporting neither fp16 nor bf16 support: every placement's
# models, and the trainable heads of stage 1.
BUILT_ONLY = {
    "build_ted_zero3": ({"teacher.placement": "zero3"}, None),
    "build_ted_pipeline": ({"teacher.placement": "pipeline", "teacher.pipeline_stages": 2}, None),
    "build_filters_teacher_zero3_trainable": ({"teacher.placement": "zero3", "distill.filter_head": "trainable"},
                                              "teacher"),
    "build_filters_student_zero3_trainable": ({"teacher.placement": "zero3", "distill.filter_head": "trainable"},
                                              "student"),
}


def metrics(out_dir: str) -> list[dict]:
    return [json.loads(line) for line in open(os.path.join(out_dir, "metrics.jsonl"))]


def losses(out_dir: str, key: str = "loss/total") -> list[float]:
    return [m[key] for m in metrics(out_dir) if key in m]


def _ds_variants(o) -> tuple[str, str]:
    """zero3_cpu.json with bf16 on (one switch flipped, as a GPU user would) and with every parameter
    persistent (ZeRO-3 without gathers): their paths."""
    ds = json.load(open(os.path.join(os.path.dirname(os.path.dirname(__file__)), "ds_configs", "zero3_cpu.json")))
    json.dump(ds | {"zero_optimization": ds["zero_optimization"] | {"stage3_param_persistence_threshold": 1e12}},
              open(o("zero3_cpu_persistent.json"), "w"))
    json.dump(ds | {"bf16": {"enabled": True}}, open(o("zero3_cpu_bf16.json"), "w"))
    return o("zero3_cpu_bf16.json"), o("zero3_cpu_persistent.json")


@pytest.fixture(scope="module")
def runs(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    o = lambda name: str(root / name)
    bf16_config, persistent_config = _ds_variants(o)
    ll, gp = tiny["llama_data"], tiny["gpt2_data"]
    lt, gt = tiny["llama_teacher"], tiny["gpt2_teacher"]
    filters = {"teacher.filters": o("ft/filters-teacher"), "student.filters": o("fs/filters-student")}
    gfilters = {"teacher.filters": o("gft/filters-teacher"), "student.filters": o("gfs/filters-student")}
    configs = {
        "filters_teacher": (base_config(ll, lt, o("ft"), **{"train.steps": 10, "train.eval_interval": 1,
                                                            "optim.lr": 5e-2}), "teacher"),
        "filters_student": (base_config(ll, lt, o("fs"), **{"train.steps": 10, "train.eval_interval": 1,
                                                            "optim.lr": 5e-2}), "student"),
        "filters_student_trainable": (base_config(ll, lt, o("fst"), **{
            "train.steps": 3, "train.eval_interval": 1, "optim.lr": 5e-2, "distill.filter_head": "trainable",
            "train.save_interval": 3}), "student"),
        "ted_replicated": (base_config(ll, lt, o("ted_rep"), **filters), None),
        "ted_zero3": (base_config(ll, lt, o("ted_z3"), **filters, **{"teacher.placement": "zero3"}), None),
        "ted_pipeline": (base_config(ll, lt, o("ted_pp"), **filters, **{"teacher.placement": "pipeline",
                                                                         "teacher.pipeline_stages": 2}), None),
        "ted_checkpointing": (base_config(ll, lt, o("ted_ac"), **filters, **{"student.activation_checkpointing": True}),
                              None),
        "ted_compiled_zero3": (base_config(ll, lt, o("ted_cz3"), **filters, **{
            "teacher.placement": "zero3", "train.compile_blocks": True, "train.steps": 2}), None),
        "ted_compiled_pipeline": (base_config(ll, lt, o("ted_cpp"), **filters, **{
            "teacher.placement": "pipeline", "teacher.pipeline_stages": 2, "train.compile_blocks": True,
            "train.steps": 2}), None),
        "ted_persistent": (base_config(ll, lt, o("ted_persist"), **filters, **{
            "train.deepspeed_config": persistent_config, "train.steps": 2}), None),
        "ted_bf16": (base_config(ll, lt, o("ted_bf16"), **filters, **{"train.deepspeed_config": bf16_config}), None),
        "lwd": (base_config(ll, lt, o("lwd"), **{"distill.method": "lwd", "train.steps": 2}), None),
        "kd": (base_config(ll, lt, o("kd"), **{"distill.method": "kd", "train.steps": 2}), None),
        "kd_top8": (base_config(ll, lt, o("kd_top8"), **{"distill.method": "kd", "train.steps": 2,
                                                         "teacher.logits_topk": 8}), None),
        "gpt2_filters_teacher": (base_config(gp, gt, o("gft"), **{"train.steps": 2}), "teacher"),
        "gpt2_filters_student": (base_config(gp, gt, o("gfs"), **{"train.steps": 2}), "student"),
        "gpt2_ted": (base_config(gp, gt, o("gted"), **gfilters, **{"train.steps": 2}), None),
        # 128-token windows: the first batch holds EOS tokens (32-token ones happen to hold none)
        "filters_teacher_documents": (base_config(ll, lt, o("ftd"), **{
            "train.steps": 1, "data.seq_len": 128, "data.document_attention": True}), "teacher"),
        "ted_pipeline_documents": (base_config(ll, lt, o("ted_ppd"), **filters, **{
            "teacher.placement": "pipeline", "teacher.pipeline_stages": 2, "train.steps": 2, "train.eval_interval": 1,
            "data.seq_len": 128, "data.document_attention": True}), None),
    }
    # Every run as on a machine whose accelerator reports bf16 but no fp16 support (every AMD CPU, most
    # Intel ones), whatever this machine reports; the builds below report neither.
    job = lambda which: Job.learning_filters_of(which).value
    spec = [{"name": name, "config": write_config(o(f"{name}.yaml"), **cfg), "job": job(which),
             "accelerator": "bf16"} for name, (cfg, which) in configs.items()]
    for name, (cfg, which) in BUILT_ONLY.items():
        cfg = base_config(ll, lt, o(name), **filters, **cfg)
        spec.append({"name": name, "config": write_config(o(f"{name}.yaml"), **cfg), "job": job(which),
                     "accelerator": "none", "build_only": True})
    return launch_scenarios(2, spec, {n: c[0]["train"]["out_dir"] for n, c in configs.items()},
                            {n: o(f"{n}.yaml") for n in configs}, o("spec.json"), timeout=900)


def test_stage1_lowers_the_tap_lm_loss(runs):
    for name in ("filters_teacher", "filters_student"):
        evals = losses(runs.dir(name), "eval/loss")
        assert len(evals) == 10
        assert all(b < a for a, b in zip(evals, evals[1:])), (name, evals)  # falls at every step
        assert evals[-1] < evals[0] - 0.03, (name, evals)
        per_tap = [k for k in metrics(runs.dir(name))[0] if k.startswith("loss/tap_lm/")]
        assert len(per_tap) == 2  # two taps, each logged
        assert os.path.isfile(os.path.join(runs.dir(name), f"filters-{name.split('_')[1]}", "filters.json"))


def test_trainable_heads_start_from_the_teachers_head_then_learn_and_only_the_bank_is_kept(runs, tmp_path):
    """distill.filter_head: trainable — step 1 equals the shared frozen head's run (same filters, heads
    initialised from the teacher's norm + unembedding); afterwards the heads learn, so the runs part;
    the saved bank holds filters only, loads for stage 2, and matches the offline export."""
    from ted_ds.export import export_checkpoint
    from ted_ds.filters import load_filter_bank

    shared, own = losses(runs.dir("filters_student")), losses(runs.dir("filters_student_trainable"))
    assert own[0] == pytest.approx(shared[0], rel=1e-6), (own, shared)
    assert all(abs(a - b) > 1e-4 for a, b in zip(own[1:], shared[1:3])), (own, shared)
    assert len([k for k in metrics(runs.dir("filters_student_trainable"))[0] if k.startswith("loss/tap_lm/")]) == 2
    bank_dir = os.path.join(runs.dir("filters_student_trainable"), "filters-student")
    saved = load_file(os.path.join(bank_dir, "filters.safetensors"))
    assert saved and all(k.startswith("filters.") for k in saved), sorted(saved)
    meta = json.load(open(os.path.join(bank_dir, "filters.json")))
    load_filter_bank(bank_dir, meta, "student.filters")
    export_checkpoint(runs.dir("filters_student_trainable"), None, filters_out=str(tmp_path / "offline"))
    offline = load_file(str(tmp_path / "offline" / "filters.safetensors"))
    assert offline.keys() == saved.keys() and all(torch.equal(offline[k], saved[k]) for k in saved)


def _reference(config_path: str, steps: int):
    """The same steps (TED or KD) in one process with plain PyTorch: no DeepSpeed, no ZeRO, no ranks.
    With ``teacher.logits_topk`` KD runs on the teacher's top-k ids (and its tail), as teacher_logits gives them."""
    from ted_ds.config import load_run_config
    from ted_ds.data import ConsumedSamplesSampler, PackedShardDataset, collate
    from ted_ds.documents import for_model
    from ted_ds.losses import ObjectiveWeights, distill_objective
    from ted_ds.models import distill_modules
    from ted_ds.optim import lr_multiplier, param_groups
    from ted_ds.plan import plan
    from ted_ds.run import seed_everything
    from ted_ds.teacher import FrozenLM, teacher_logits
    from ted_ds.weights import load_model

    cfg = load_run_config(config_path)
    p = plan(cfg)
    seed_everything(cfg.train.seed)
    student, teacher_filters = distill_modules(p)  # what the run builds before its engine, in fp32
    teacher = load_model(cfg.teacher.path)
    teacher = FrozenLM(teacher, p.teacher_layers, teacher_filters, True, 0,
                       for_model(teacher, p.document_eos, torch.float32), p.manifest["vocab_size"])
    opt = torch.optim.AdamW(param_groups(student, cfg.optim.weight_decay), lr=cfg.optim.lr,
                            betas=tuple(cfg.optim.betas), eps=cfg.optim.eps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_multiplier(s, cfg.optim, p.total_steps))
    data = PackedShardDataset(cfg.data.path, "train", cfg.data.seq_len)
    sampler = ConsumedSamplesSampler(len(data), cfg.train.global_batch_size, cfg.train.micro_batch_size, 0, 1,
                                     cfg.train.seed)
    w = ObjectiveWeights(cfg.distill.alpha, cfg.distill.beta, cfg.distill.temperature, cfg.distill.layer_loss,
                         p.manifest["vocab_size"], topk_form=cfg.teacher.logits_topk_form)
    per_step = []
    for _ in range(steps):
        micro = sampler.next_batch()
        total = 0.0
        for idx in micro:
            x, y = collate(data, idx)
            with torch.no_grad():
                t = teacher(x)
            t_taps, t_logits = t.taps, t.logits
            t_index = None
            if cfg.teacher.logits_topk:
                t_logits, t_index = teacher_logits(t_logits, None, cfg.teacher.logits_topk,
                                                   tail_temperature=cfg.tail_temperature)
            logits, taps = student(x)
            loss = distill_objective(logits, taps, y, t_logits, t_taps, w, t_index)["loss"]
            (loss / len(micro)).backward()
            total += loss.item() / len(micro)
        torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.optim.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad()
        per_step.append(total)
    return per_step, student


def test_zero3_ted_matches_single_process_reference(runs):
    ref_losses, ref_student = _reference(runs.configs["ted_replicated"], STEPS)
    got = losses(runs.dir("ted_replicated"))
    assert len(got) == STEPS
    assert got == pytest.approx(ref_losses, rel=1e-5, abs=1e-6)
    assert got[-1] < got[0]  # it learns
    final = load_file(os.path.join(runs.dir("ted_replicated"), "hf", "model.safetensors"))
    ref_state = ref_student.model.state_dict()
    # Adam divides by sqrt(v): float-order differences in tiny gradients move weights by a small
    # fraction of one step (lr 3e-3), hence atol 1e-4 on weights while losses agree to 1e-6.
    for key, value in final.items():
        torch.testing.assert_close(value, ref_state[key], rtol=1e-3, atol=1e-4)
    ref_filters = ref_student.filters.state_dict()
    trained_filters = load_file(os.path.join(runs.dir("ted_replicated"), "student-filters", "filters.safetensors"))
    for key, value in trained_filters.items():
        torch.testing.assert_close(value, ref_filters[key], rtol=1e-3, atol=1e-4)


def test_only_student_and_its_filters_change(runs):
    from ted_ds.config import load_run_config
    from ted_ds.models import load_student
    from ted_ds.plan import plan
    from ted_ds.run import seed_everything

    cfg = load_run_config(runs.configs["ted_replicated"])
    seed_everything(cfg.train.seed)
    initial = load_student(plan(cfg)).state_dict()
    final = load_file(os.path.join(runs.dir("ted_replicated"), "hf", "model.safetensors"))
    assert all(not torch.equal(final[k], initial[k]) for k in final), "every student tensor should train"
    s0 = load_file(os.path.join(cfg.student.filters, "filters.safetensors"))
    s1 = load_file(os.path.join(runs.dir("ted_replicated"), "student-filters", "filters.safetensors"))
    assert all(not torch.equal(s0[k], s1[k]) for k in s0)
    trained = {name: record for name, record in runs.records().items() if name in runs.dirs}
    assert all(record["frozen_matches_disk"] for record in trained.values()), trained


def test_replicated_and_zero3_teachers_give_identical_losses(runs):
    rep, z3 = losses(runs.dir("ted_replicated")), losses(runs.dir("ted_zero3"))
    assert rep == pytest.approx(z3, rel=1e-6, abs=1e-7)
    r = {name: runs.record(name) for name in ("ted_replicated", "ted_zero3", "ted_pipeline")}
    # ZeRO-3 inference keeps about half of the teacher (and its filters) on each of 2 ranks
    assert r["ted_zero3"]["frozen_local_params_rank0"] < 0.6 * r["ted_replicated"]["frozen_local_params_rank0"]
    assert r["ted_zero3"]["frozen_local_params_sum"] == pytest.approx(r["ted_replicated"]["frozen_local_params_rank0"],
                                                                       rel=0.01)


def test_pipeline_teacher_training_matches_replicated(runs):
    rep, pp = losses(runs.dir("ted_replicated")), losses(runs.dir("ted_pipeline"))
    assert len(pp) == STEPS and pp == pytest.approx(rep, rel=1e-6, abs=1e-7)
    r = {name: runs.record(name) for name in ("ted_replicated", "ted_zero3", "ted_pipeline")}
    assert r["ted_pipeline"]["frozen_local_params_rank0"] < 0.7 * r["ted_replicated"]["frozen_local_params_rank0"]


def test_activation_checkpointing_recomputes_and_changes_nothing_else(runs):
    plain, ac = runs.record("ted_replicated")["student"], runs.record("ted_checkpointing")["student"]
    assert plain["block_calls_per_forward"] == 1
    assert ac["block_calls_per_forward"] == 2  # each block again in the backward: activations were dropped
    assert plain["train_mode"] == ac["train_mode"] == [True]
    rep = losses(runs.dir("ted_replicated"))
    assert losses(runs.dir("ted_checkpointing")) == pytest.approx(rep, rel=1e-6, abs=1e-7)


def test_every_model_is_built_in_the_runs_dtype_whatever_the_accelerator_reports(runs):
    """zero.Init once built bf16 models on machines whose accelerator reports no fp16 support (DeepSpeed
    0.19 ignores an explicit dtype there): the student and the trained modules, the frozen side in every
    placement, with the accelerator reporting bf16 only (the runs) or nothing (the builds)."""
    for name in BUILT_ONLY:
        runs.record(name)
    for name, record in runs.records().items():
        assert "error" not in record, (name, record.get("error"))
        dtype = "torch.bfloat16" if name == "ted_bf16" else "torch.float32"
        assert record["dtypes"] == {"trained": [dtype], "frozen": [dtype]}, name


def test_bf16_student_steps_in_bf16_within_rounding_of_fp32(runs):
    plain, half = runs.record("ted_replicated")["student"], runs.record("ted_bf16")["student"]
    assert plain["weight_dtypes"] == plain["activation_dtypes"] == ["torch.float32"]
    assert half["weight_dtypes"] == half["activation_dtypes"] == ["torch.bfloat16"]
    rep, bf16 = losses(runs.dir("ted_replicated")), losses(runs.dir("ted_bf16"))
    assert len(bf16) == STEPS and all(a != b for a, b in zip(bf16, rep))
    assert all(abs(a - b) <= BF16_LOSS_BOUND * b for a, b in zip(bf16, rep)), (bf16, rep)


def test_kd_on_the_teachers_top_k_matches_a_reference_on_that_support(runs):
    ref_losses, _ = _reference(runs.configs["kd_top8"], 2)
    got = losses(runs.dir("kd_top8"))
    assert got == pytest.approx(ref_losses, rel=1e-5, abs=1e-6)
    full = losses(runs.dir("kd"), "loss/kd")
    assert all(a != pytest.approx(b, rel=1e-3) for a, b in zip(losses(runs.dir("kd_top8"), "loss/kd"), full))


def _without_documents(config_path: str, out: str) -> str:
    import yaml

    cfg = yaml.safe_load(open(config_path))
    cfg["data"]["document_attention"] = False
    return write_config(out, **cfg)


def _stage1_first_loss(config_path: str) -> float:
    """The first step's stage-1 loss (teacher side) in one process: fresh filters on the frozen teacher's
    taps, read through its head, over the whole first global batch."""
    from ted_ds.data import collate
    from ted_ds.documents import for_model
    from ted_ds.heads import TaskHead
    from ted_ds.losses import tap_lm_losses
    from ted_ds.teacher import FrozenLM
    from ted_ds.weights import load_model

    cfg, p, bank, data, micro = stage1_first_batch(config_path)
    model = load_model(cfg.teacher.path)
    frozen = FrozenLM(model, p.teacher_layers, None, False, 0, for_model(model, p.document_eos, torch.float32))
    head = TaskHead(cfg.teacher.path)
    total = 0.0
    with torch.no_grad():
        for idx in micro:
            x, y = collate(data, idx)
            total += torch.stack(tap_lm_losses(head, bank(frozen(x).taps), y)).mean().item() / len(micro)
    return total


def test_document_attention_in_stage1_and_in_pipeline_ted_training(runs, tmp_path):
    """data.document_attention in real runs: TED with a pipeline teacher equals a single-process
    reference whose student and teacher keep documents apart (and differs from one that does not);
    evaluation runs with it; stage 1's first loss is that of filters on a document-aware teacher."""
    config = runs.configs["ted_pipeline_documents"]
    ref_losses, _ = _reference(config, 2)
    got = losses(runs.dir("ted_pipeline_documents"))
    assert got == pytest.approx(ref_losses, rel=1e-5, abs=1e-6)
    plain, _ = _reference(_without_documents(config, str(tmp_path / "plain.yaml")), 2)
    print("documents", got, "reference", ref_losses, "without", plain)
    assert max(abs(a - b) for a, b in zip(got, plain)) > 5e-4, (got, plain)
    assert len(losses(runs.dir("ted_pipeline_documents"), "eval/loss")) == 2
    config = runs.configs["filters_teacher_documents"]
    stage1 = losses(runs.dir("filters_teacher_documents"))
    on, off = _stage1_first_loss(config), _stage1_first_loss(_without_documents(config, str(tmp_path / "s1.yaml")))
    print("stage 1", stage1, "reference", on, "without", off)
    assert stage1 == pytest.approx([on], rel=1e-6), (stage1, on, off)
    assert abs(stage1[0] - off) > 1e-4, (stage1, on, off)


def test_baselines_log_their_own_terms(runs):
    lwd, kd = metrics(runs.dir("lwd"))[0], metrics(runs.dir("kd"))[0]
    assert {"loss/lm", "loss/kd", "loss/layer"} <= set(lwd)
    assert {"loss/lm", "loss/kd"} <= set(kd) and "loss/layer" not in kd
    for m in (lwd, kd):
        assert m["loss/total"] == pytest.approx(m["loss/lm"] + m["loss/kd"] + m.get("loss/layer", 0.0), rel=1e-6)
        assert {"lr", "grad_norm", "tokens_per_s", "mfu"} <= set(m)
    assert os.path.isdir(os.path.join(runs.dir("lwd"), "student-filters"))
    assert not os.path.isdir(os.path.join(runs.dir("kd"), "student-filters"))


def test_gpt2_ted_runs_and_exports(runs):
    from transformers import AutoModelForCausalLM

    got = losses(runs.dir("gpt2_ted"))
    assert len(got) == 2 and all(0 < x < 100 for x in got)
    model = AutoModelForCausalLM.from_pretrained(os.path.join(runs.dir("gpt2_ted"), "hf"))
    assert type(model).__name__ == "GPT2LMHeadModel" and model.config.n_layer == 2
    assert os.path.isdir(os.path.join(runs.dir("gpt2_ted"), "tb"))


def test_each_rank_reads_only_its_share_of_the_weights(runs, tiny):
    """Counted while loading: a rank reads its teacher share (whole, 1/2, one pipeline stage) and only
    its 1/2 slice of the student's tensors — the student's teacher blocks are never read whole, and
    the teacher is never read twice. Slack: the partial rows at each slice's two ends."""
    from ted_ds.architectures import load_hf_config, meta_model, teacher_blocks_config
    from ted_ds.capacity import teacher_share

    t = load_hf_config(tiny["llama_teacher"])
    total = teacher_share(t, "replicated", 2, 2, None)
    student = meta_model(teacher_blocks_config(t, [0, 2]))
    student_half = sum(p.numel() for p in student.parameters()) / 2
    row = lambda p: p[0].numel() if p.ndim > 1 else 1
    slack = 2 * sum(row(p) for model in (student, meta_model(t)) for p in model.parameters())
    for placement in ("replicated", "zero3", "pipeline"):
        read = runs.record(f"ted_{placement}")["elements_read_max"]
        teacher_read = -(-total // 2) if placement == "zero3" else teacher_share(t, placement, 2, 2, None)
        share = teacher_read + student_half
        assert student_half <= read <= share + slack, (placement, read, share)


def test_every_tensor_lives_on_the_rank_device(runs):
    from ted_ds.distributed import device

    for name, record in runs.records().items():
        assert record["devices"] == [device().type], name


def test_deepspeed_ops_were_built_into_this_cpus_cache(runs):
    """init_distributed compiles (or reuses) the shared-memory communicator under this CPU's key."""
    from ted_ds.host import this_cpu_key

    keyed = os.path.join(os.environ["TORCH_EXTENSIONS_DIR"], this_cpu_key())
    assert any("shm_comm" in name for _, dirs, _ in os.walk(keyed) for name in dirs), keyed


def test_persistent_parameters_keep_the_student_whole_and_change_no_number(runs):
    """stage3_param_persistence_threshold above every tensor: each rank holds the whole student as a
    training forward starts (nothing left to gather; with threshold 0 nothing is whole there), and the
    losses are ZeRO-3's exactly."""
    sharded, whole = runs.record("ted_zero3")["student"], runs.record("ted_persistent")["student"]
    assert whole["resident_share"] == 1 and sharded["resident_share"] < 0.01, (whole, sharded)
    assert losses(runs.dir("ted_persistent")) == losses(runs.dir("ted_replicated"))[:2]


def test_compiled_blocks_run_compiled_and_change_no_number(runs, tiny):
    """train.compile_blocks: every block of the student (ZeRO-3 leaf modules, one gather per block) and
    of the frozen teacher (ZeRO-3: all 4; a pipeline stage: its own, as the FLOP balance splits them) runs
    a compiled forward, and the losses are the uncompiled runs' within fp32 rounding (inductor may order a
    reduction otherwise)."""
    from transformers import AutoConfig

    from ted_ds.pipeline.layout import stage_blocks

    start, end = stage_blocks(AutoConfig.from_pretrained(tiny["llama_teacher"]), 2, None)[0]  # rank 0's stage
    uncompiled = losses(runs.dir("ted_replicated"))[:2]
    assert runs.record("ted_zero3")["compiled_blocks"] == {"trained": 0, "frozen": 0}
    for name, teacher_blocks in (("ted_compiled_zero3", 4), ("ted_compiled_pipeline", end - start)):
        assert runs.record(name)["compiled_blocks"] == {"trained": 2, "frozen": teacher_blocks}, name
        assert losses(runs.dir(name)) == pytest.approx(uncompiled, rel=1e-5), name
