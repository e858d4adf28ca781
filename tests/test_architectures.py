"""Qwen2, Mistral, Gemma 2 and Phi-3; embeddings padded past the tokenizer; tokenizers that differ only
in special-token roles.  Unit checks here in one process; training on 2 ranks in ONE launch for every
architecture (stage 1 on both sides, TED with a pipeline teacher, KD with a replicated one, export)."""

from __future__ import annotations

import json
import os
import shutil
import warnings

import pytest
import torch

from harness.scenarios import launch_scenarios
from harness.tiny import ARCHITECTURES, PADDED_ROWS, arch_config, base_config, stage1_first_batch, write_config
from ted_ds.errors import ConfigError
from ted_ds.plan import Job

IDS = torch.randint(1000, (2, 24), generator=torch.Generator().manual_seed(0))


def _manifest(data_dir: str) -> dict:
    return json.load(open(os.path.join(data_dir, "manifest.json")))


def _norm_input(model, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(state entering the final norm, the model's own logits) of one forward."""
    from ted_ds.architectures import final_norm

    seen = []
    hook = final_norm(model).register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    hook.remove()
    return seen[0], logits


def test_stage_surgery_keeps_each_architecture_whole(arch_teachers):
    """A pipeline stage holding every block, embeddings and head is the model itself, bit for bit: Gemma 2's
    embedding computes sqrt(d) into a buffer that is not in the weight files and must not be left empty."""
    from ted_ds.architectures import load_hf_config
    from ted_ds.pipeline.stage import build_stage_model
    from ted_ds.weights import load_model

    for kind, path in arch_teachers.items():
        model = load_model(path).eval()
        stage, _ = build_stage_model(path, load_hf_config(path), 0, 4, True, True, torch.float32, torch.device("cpu"))
        with torch.no_grad():
            assert torch.equal(stage(input_ids=IDS, use_cache=False).logits, model(input_ids=IDS).logits), kind


def test_task_head_is_the_models_own_norm_head_and_soft_cap(arch_teachers, tiny):
    """Stage 1's frozen head reads a state as the model's own final norm, head and (Gemma 2) logit
    soft-cap do, cut to the tokenizer's ids; the fused head + cross-entropy gives the same loss and
    gradient as autograd through the model's own modules."""
    import torch.nn.functional as F

    from ted_ds.heads import TaskHead
    from ted_ds.losses import tap_lm_losses
    from ted_ds.weights import load_model

    vocab = _manifest(tiny["llama_data"])["vocab_size"]
    labels = torch.randint(vocab, IDS.shape, generator=torch.Generator().manual_seed(1))
    for kind, path in arch_teachers.items():
        model = load_model(path).eval()
        h, logits = _norm_input(model, IDS)
        head = TaskHead(path, vocab=vocab)
        assert torch.equal(head(h), logits[..., :vocab]), kind
        h = h.clone().requires_grad_()
        (fused,) = tap_lm_losses(head, [h], labels, chunk_tokens=16)
        fused.backward()
        h2 = h.detach().clone().requires_grad_()
        hook = model.model.norm.register_forward_pre_hook(lambda _m, _a, s=h2: (s,))
        want = F.cross_entropy(model(input_ids=IDS).logits[..., :vocab].flatten(0, 1), labels.flatten())
        hook.remove()
        want.backward()
        torch.testing.assert_close(fused, want, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(h.grad, h2.grad, rtol=1e-5, atol=1e-8)


def test_student_from_teacher_blocks_keeps_their_attention_kinds(arch_teachers):
    """Gemma 2 alternates sliding-window and full attention: student block i is teacher block layers[i],
    with that block's kind, and the config stays loadable."""
    from transformers import AutoConfig

    from ted_ds.architectures import load_hf_config, teacher_blocks_config

    teacher = load_hf_config(arch_teachers["gemma2"])
    assert teacher.layer_types == ["sliding_attention", "full_attention"] * 2
    student = teacher_blocks_config(teacher, [1, 2, 3])
    assert student.layer_types == ["full_attention", "sliding_attention", "full_attention"]
    assert AutoConfig.for_model(**student.to_dict()).layer_types == student.layer_types


def test_unknown_layout_names_the_model_class_and_the_table():
    from torch import nn

    from ted_ds.architectures import layout

    class OddLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.stack = nn.ModuleList([nn.Linear(2, 2)])

    with pytest.raises(ConfigError) as e:
        layout(OddLM())
    assert "OddLM: cannot find its decoder blocks" in str(e.value)
    assert "_LAYOUTS in ted_ds/architectures.py" in str(e.value)
    assert "\n" not in str(e.value)


def test_kd_and_top_k_see_only_the_tokenizers_ids(arch_teachers, tiny):
    """Rows past the tokenizer's ids (a padded embedding) get no probability from the teacher: the
    teacher's top-k never picks them, KD ignores the student's, and they get no KD gradient."""
    from ted_ds.losses import ObjectiveWeights, distill_objective, kd_loss
    from ted_ds.teacher import FrozenLM
    from ted_ds.weights import load_model

    vocab = _manifest(tiny["llama_data"])["vocab_size"]
    model = load_model(arch_teachers["qwen2"])
    with torch.no_grad():  # make the padding rows the teacher's favourites
        model.lm_head.weight[vocab:] = 50 * model.lm_head.weight[:PADDED_ROWS]
    index = FrozenLM(model, [], None, True, 8, vocab=vocab)(IDS).topk_index
    assert index.max() < vocab
    unsliced = FrozenLM(model, [], None, True, 8)(IDS).topk_index
    assert unsliced.max() >= vocab  # the check above is not vacuous
    t_logits = FrozenLM(model, [], None, True, 0, vocab=vocab)(IDS).logits
    assert t_logits.shape[-1] == vocab
    student = torch.randn(*IDS.shape, vocab + 8, requires_grad=True)
    labels = torch.randint(vocab, IDS.shape)
    w = ObjectiveWeights(1.0, 0.0, 2.0, "mse", vocab)
    kd = distill_objective(student, None, labels, t_logits, None, w)["kd"]
    assert kd.item() == pytest.approx(kd_loss(student[..., :vocab], t_logits, labels, 2.0).item(), rel=1e-6)
    kd.backward()
    assert student.grad[..., vocab:].abs().max() == 0 and student.grad[..., :vocab].abs().max() > 0


def _student_config(tmp_path, rows: int) -> str:
    config = arch_config("qwen2", 1000, layers=2).to_dict()
    config["vocab_size"] = rows
    path = str(tmp_path / f"student-{rows}.json")
    json.dump(config, open(path, "w"))
    return path


def test_plan_takes_different_embedding_rows_and_names_the_sizes(tiny, arch_teachers, tmp_path):
    from ted_ds.config import load_run_config
    from ted_ds.plan import plan

    cfg = lambda rows: load_run_config(write_config(str(tmp_path / f"c{rows}.yaml"), **base_config(
        tiny["llama_data"], arch_teachers["qwen2"], str(tmp_path / "o"),
        **{"distill.method": "kd", "student.init_from_teacher": None,
           "student.config": _student_config(tmp_path, rows)})))
    assert plan(cfg(1008)).vocabularies == ("vocabularies: data tokenizer 1000 ids; teacher 1024 embedding rows, "
                                            "student 1008 embedding rows")
    with pytest.raises(ConfigError) as e:
        plan(cfg(900))
    assert str(e.value).startswith("student ") and "900 embedding rows cannot hold the data tokenizer's 1000 ids" \
        in str(e.value) and "teacher 1024 embedding rows" in str(e.value)


def test_tokenizers_must_agree_below_the_data_size_only(tiny, tmp_path):
    """Extra tokens past the data's ids are fine; a different EOS/BOS/PAD role is one warning naming it;
    a token at another id is an error naming the first id where they differ."""
    from data_prep.tokenizer import load_tokenizer
    from ted_ds.plan import check_tokenizer

    data = tiny["llama_data"]
    manifest = _manifest(data)

    def variant(name, change):
        tok = load_tokenizer(os.path.join(data, "tokenizer"))
        change(tok)
        out = str(tmp_path / name)
        tok.save_pretrained(out)
        return out

    extra = variant("extra", lambda tok: tok.add_tokens(["<extra_0>", "<extra_1>"]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_tokenizer(extra, manifest, "teacher", data)
    eos = variant("eos", lambda tok: setattr(tok, "eos_token", tok.convert_ids_to_tokens(5)))
    data_eos = load_tokenizer(os.path.join(data, "tokenizer")).eos_token
    other = load_tokenizer(eos).eos_token
    with pytest.warns(UserWarning) as seen:
        check_tokenizer(eos, manifest, "student", data)
    (w,) = seen
    assert f"special-token roles differ (data vs student: eos {data_eos!r} vs {other!r})" in str(w.message)
    assert "\n" not in str(w.message)
    swapped = str(tmp_path / "swapped")
    shutil.copytree(os.path.join(data, "tokenizer"), swapped)
    spec = json.load(open(os.path.join(swapped, "tokenizer.json")))
    v = spec["model"]["vocab"]
    a, b = [t for t, i in v.items() if i in (500, 501)]
    v[a], v[b] = v[b], v[a]
    json.dump(spec, open(os.path.join(swapped, "tokenizer.json"), "w"))
    for f in os.listdir(swapped):
        if f.endswith(".model"):
            os.remove(os.path.join(swapped, f))
    with pytest.raises(ConfigError) as e:
        check_tokenizer(swapped, manifest, "teacher", data)
    first = min((v[a], a), (v[b], b))
    assert f"id {first[0]} is {first[1]!r} there" in str(e.value) and "\n" not in str(e.value)
    # through plan with a data mixture (data.path empty): the sources' tokenizer is the one compared
    from ted_ds.config import load_run_config
    from ted_ds.plan import plan

    teacher = str(tmp_path / "teacher-eos")
    shutil.copytree(tiny["llama_teacher"], teacher)
    load_tokenizer(eos).save_pretrained(teacher)
    cfg = base_config(data, teacher, str(tmp_path / "o"), **{"distill.method": "kd", "data.path": "",
                                                             "data.sources": [{"name": "a", "path": data}]})
    with pytest.warns(UserWarning, match="special-token roles differ"):
        plan(load_run_config(write_config(str(tmp_path / "mix.yaml"), **cfg)))


# ----------------------------------------------------------------------------- 2 ranks, one launch
@pytest.fixture(scope="module")
def arch_runs(tiny, arch_teachers, tmp_path_factory):
    root = tmp_path_factory.mktemp("arch_runs")
    o = lambda name: str(root / name)
    data = tiny["llama_data"]
    configs = {}
    for kind, teacher in arch_teachers.items():
        filters = {"teacher.filters": o(f"{kind}_ft/filters-teacher"),
                   "student.filters": o(f"{kind}_fs/filters-student")}
        short = {"train.steps": 2, "optim.lr": 5e-2}
        configs[f"{kind}_filters_teacher"] = (base_config(data, teacher, o(f"{kind}_ft"), **short), "teacher")
        configs[f"{kind}_filters_student"] = (base_config(data, teacher, o(f"{kind}_fs"), **short), "student")
        configs[f"{kind}_ted_pipeline"] = (base_config(data, teacher, o(f"{kind}_ted"), **filters, **{
            "train.steps": 2, "teacher.placement": "pipeline", "teacher.pipeline_stages": 2}), None)
        configs[f"{kind}_kd"] = (base_config(data, teacher, o(f"{kind}_kd"), **{
            "distill.method": "kd", "train.steps": 2}), None)
    # a student whose embedding has other rows than the teacher's (1008 vs 1024, tokenizer 1000); top-8 KD
    configs["qwen2_kd_rows"] = (base_config(data, arch_teachers["qwen2"], o("qwen2_kd_rows"), **{
        "distill.method": "kd", "train.steps": 2, "teacher.logits_topk": 8, "teacher.placement": "pipeline",
        "teacher.pipeline_stages": 2, "student.init_from_teacher": None,
        "student.config": _student_config(root, 1008)}), None)
    spec = [{"name": n, "config": write_config(o(f"{n}.yaml"), **c), "job": Job.learning_filters_of(w).value}
            for n, (c, w) in configs.items()]
    return launch_scenarios(2, spec, {n: c[0]["train"]["out_dir"] for n, c in configs.items()},
                            {n: o(f"{n}.yaml") for n in configs}, o("spec.json"), timeout=900)


def _losses(out_dir: str, key: str = "loss/total") -> list[float]:
    return [m[key] for m in map(json.loads, open(os.path.join(out_dir, "metrics.jsonl"))) if key in m]


def _stage1_first_loss(config_path: str) -> float:
    """Stage 1's first loss in one process, through each model's own forward: fresh filters' outputs are
    put in front of the model's final norm, so its norm, head and soft-cap make the logits."""
    import torch.nn.functional as F

    from ted_ds.architectures import final_norm
    from ted_ds.data import collate
    from ted_ds.taps import TapRecorder
    from ted_ds.weights import load_model

    cfg, p, bank, data, micro = stage1_first_batch(config_path)
    vocab = p.manifest["vocab_size"]
    model = load_model(cfg.teacher.path).eval()
    recorder = TapRecorder(model, p.teacher_layers)
    total = 0.0
    with torch.no_grad():
        for idx in micro:
            x, y = collate(data, idx)
            model(input_ids=x)
            per_tap = []
            for state in bank(recorder.take()):
                hook = final_norm(model).register_forward_pre_hook(lambda _m, _a, s=state: (s,))
                logits = model(input_ids=x).logits[..., :vocab]
                recorder.take()
                hook.remove()
                per_tap.append(F.cross_entropy(logits.flatten(0, 1), y.flatten()))
            total += torch.stack(per_tap).mean().item() / len(micro)
    return total


@pytest.mark.multirank
def test_architectures_learn_filters_through_their_own_head(arch_runs):
    for kind in ARCHITECTURES:
        for side in ("teacher", "student"):
            got = _losses(arch_runs.dir(f"{kind}_filters_{side}"))
            assert len(got) == 2 and got[1] < got[0], (kind, side, got)
        want = _stage1_first_loss(arch_runs.configs[f"{kind}_filters_teacher"])
        assert _losses(arch_runs.dir(f"{kind}_filters_teacher"))[0] == pytest.approx(want, rel=1e-5), kind


@pytest.mark.multirank
def test_architectures_distil_like_a_single_process_reference(arch_runs):
    """TED with a 2-stage pipeline teacher and KD with a replicated one, the student under ZeRO-3, equal
    the same steps in one plain-PyTorch process; every frozen teacher stays as it was on disk."""
    from test_engine_multirank import _reference

    names = [f"{kind}_{run}" for kind in ARCHITECTURES for run in ("ted_pipeline", "kd")] + ["qwen2_kd_rows"]
    for name in names:
        want, _ = _reference(arch_runs.configs[name], 2)
        got = _losses(arch_runs.dir(name))
        assert got == pytest.approx(want, rel=1e-5, abs=1e-6), (name, got, want)
    for name in arch_runs.dirs:
        assert arch_runs.record(name)["frozen_matches_disk"], name


@pytest.mark.multirank
def test_architectures_export_exactly_with_their_own_rows(arch_runs, tmp_path):
    from safetensors.torch import load_file

    from ted_ds.export import export_checkpoint

    for name in [f"{kind}_kd" for kind in ARCHITECTURES] + ["qwen2_kd_rows"]:
        (line,) = export_checkpoint(arch_runs.dir(name), str(tmp_path / name))
        assert "weights and logits" in line and "identical to the checkpoint's" in line, (name, line)
    rows = lambda d: load_file(os.path.join(d, "model.safetensors"))["model.embed_tokens.weight"].shape[0]
    assert rows(str(tmp_path / "qwen2_kd_rows")) == 1008 and rows(str(tmp_path / "qwen2_kd")) == 1000 + PADDED_ROWS


def test_attention_switches_reach_the_models_and_unrunnable_ones_are_refused(tiny, tmp_path, capsys):
    """student/teacher.attn_implementation: the planned configs and every model the run builds (student from
    teacher blocks, from a directory, at random; the teacher) run the chosen kernel, which changes no number
    (eager = sdpa within 1e-5); a student built from teacher blocks does not inherit the teacher's choice.
    A kernel the installed stack cannot run (FlashAttention-2 on a CPU) is one line, before any process group."""
    import torch.distributed as dist

    from ted_ds.cli import main as ted_main
    from ted_ds.config import load_run_config
    from ted_ds.documents import attn_implementation
    from ted_ds.models import load_student, load_teacher
    from ted_ds.plan import plan

    def planned(**overrides):
        return plan(load_run_config(write_config(str(tmp_path / "c.yaml"), **base_config(
            tiny["llama_data"], tiny["llama_teacher"], str(tmp_path / "o"), **{"distill.method": "kd", **overrides}))))

    p = planned(**{"teacher.attn_implementation": "eager"})
    assert attn_implementation(load_teacher(p.cfg)) == "eager" and attn_implementation(load_student(p)) == "sdpa"
    logits = {}
    for impl in ("eager", "sdpa"):
        for start in ({}, {"student.init_from_teacher": None, "student.path": tiny["llama_teacher"]},
                      {"student.init_from_teacher": None, "student.config": tiny["llama_teacher"]}):
            student = load_student(planned(**{"student.attn_implementation": impl, **start})).eval()
            assert attn_implementation(student) == impl, (impl, start)
        with torch.no_grad():
            logits[impl] = student(input_ids=IDS % 1000).logits
    assert (logits["eager"] - logits["sdpa"]).abs().max() < 1e-5

    cfg = write_config(str(tmp_path / "bad.yaml"), **base_config(tiny["llama_data"], tiny["llama_teacher"],
                                                                 str(tmp_path / "o"), **{"distill.method": "kd"}))
    for side in ("student", "teacher"):
        assert ted_main(["distill", "--config", cfg, f"{side}.attn_implementation=flash_attention_2"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"{side}.attn_implementation 'flash_attention_2' cannot run here" \
            in err and "FlashAttention2" in err, err
    assert not dist.is_initialized()


def test_compile_without_a_toolchain_is_one_line_at_start_up(tiny, tmp_path, capsys):
    """train.compile_blocks where inductor finds no C++ compiler (a CPU) is refused before any process
    group, not at the first forward."""
    import torch._inductor.config as inductor
    import torch.distributed as dist

    from ted_ds.cli import main as ted_main

    cfg = write_config(str(tmp_path / "c.yaml"), **base_config(tiny["llama_data"], tiny["llama_teacher"],
                                                               str(tmp_path / "o"), **{"distill.method": "kd"}))
    with inductor.patch({"cpp.cxx": (str(tmp_path / "no-such-c++"),)}):
        assert ted_main(["distill", "--config", cfg, "train.compile_blocks=true"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "train.compile_blocks: torch.compile needs a C++ compiler" in err, err
    assert not dist.is_initialized()
