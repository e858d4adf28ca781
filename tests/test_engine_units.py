"""Single-process checks of the TED pieces: losses by hand, taps, heads, student init, config errors."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from harness.tiny import base_config, write_config
from ted_ds.architectures import decoder_layers
from ted_ds.cli import main as ted_main
from ted_ds.config import load_run_config
from ted_ds.engine import lr_multiplier
from ted_ds.errors import ConfigError
from ted_ds.filters import FilterBank
from ted_ds.heads import TaskHead
from ted_ds.losses import ObjectiveWeights, distill_objective, kd_loss, layer_loss, lm_loss
from ted_ds.taps import TapRecorder, tap_pairs
from ted_ds.weights import WeightReader, load_model, load_teacher_blocks


# ----------------------------------------------------------------------------- losses by hand
def test_lm_loss_by_hand():
    logits = torch.tensor([[[2.0, 0.0, -1.0], [0.5, 0.5, 0.0]]])
    labels = torch.tensor([[0, 2]])
    p0 = math.exp(2) / (math.exp(2) + 1 + math.exp(-1))
    p1 = 1 / (2 * math.exp(0.5) + 1)
    assert lm_loss(logits, labels).item() == pytest.approx(-(math.log(p0) + math.log(p1)) / 2, rel=1e-6)


def test_kd_loss_by_hand_and_topk():
    s = torch.tensor([[[1.0, 0.0, 0.0]]])
    t = torch.tensor([[[0.0, 2.0, 0.0]]])
    T = 2.0
    ps = [math.exp(x / T) for x in (1.0, 0.0, 0.0)]
    pt = [math.exp(x / T) for x in (0.0, 2.0, 0.0)]
    ps = [x / sum(ps) for x in ps]
    pt = [x / sum(pt) for x in pt]
    kl = sum(a * (math.log(a) - math.log(b)) for a, b in zip(pt, ps))
    assert kd_loss(s, t, T).item() == pytest.approx(T * T * kl, rel=1e-6)
    assert kd_loss(t, t, T).item() == pytest.approx(0.0, abs=1e-7)
    # top-k support: teacher renormalised over its 2 best ids, student log-probs at those ids
    values, index = t.topk(2, dim=-1)
    qt = torch.softmax(values / T, -1)[0, 0]
    ls = torch.log_softmax(s / T, -1)[0, 0, index[0, 0]]
    expected = T * T * (qt * (qt.log() - ls)).sum().item()
    assert kd_loss(s, values, T, index).item() == pytest.approx(expected, rel=1e-6)


def test_layer_losses_by_hand():
    s = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])
    t = torch.tensor([[[1.0, 0.0], [0.0, 4.0]]])
    mse = (0 + 4 + 9 + 0) / 4
    assert layer_loss(s, t, "mse").item() == pytest.approx(mse)
    var = torch.tensor([1.0, 0.0, 0.0, 4.0]).var().item()  # unbiased, as torch.var
    assert layer_loss(s, t, "normalized_mse").item() == pytest.approx(mse / (var + 1e-6), rel=1e-6)
    cos = [(1 * 1 + 2 * 0) / (math.sqrt(5) * 1), (3 * 0 + 4 * 4) / (5 * 4)]
    assert layer_loss(s, t, "cosine").item() == pytest.approx(1 - sum(cos) / 2, rel=1e-6)
    # normalised MSE does not care about the scale of both sides
    assert layer_loss(10 * s, 10 * t, "normalized_mse").item() == pytest.approx(
        layer_loss(s, t, "normalized_mse").item(), rel=1e-4)


def test_objective_weights_and_terms():
    torch.manual_seed(0)
    s_logits, t_logits = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    labels = torch.randint(5, (2, 3))
    s_taps, t_taps = [torch.randn(2, 3, 4) for _ in range(2)], [torch.randn(2, 3, 4) for _ in range(2)]
    w = ObjectiveWeights(alpha=0.5, beta=3.0, temperature=2.0, layer_loss="mse")
    terms = distill_objective(s_logits, s_taps, labels, t_logits, t_taps, w)
    layer = (F.mse_loss(s_taps[0], t_taps[0]) + F.mse_loss(s_taps[1], t_taps[1])) / 2
    assert terms["layer"].item() == pytest.approx(layer.item(), rel=1e-6)
    assert terms["loss"].item() == pytest.approx(
        (terms["lm"] + 0.5 * terms["kd"] + 3.0 * terms["layer"]).item(), rel=1e-6)
    lm_only = distill_objective(s_logits, None, labels, None, None, w)
    assert set(lm_only) == {"lm", "loss"}


# ----------------------------------------------------------------------------- taps and filters
def test_tap_mapping_and_its_errors():
    class D:
        pairs = None
        teacher_every = None
        student_every = None

    d = D()
    assert tap_pairs(d, 12, 6) == [(2, 1), (4, 2), (6, 3), (8, 4), (10, 5), (12, 6)]
    d.teacher_every, d.student_every = 4, 2
    assert tap_pairs(d, 12, 6) == [(4, 2), (8, 4), (12, 6)]
    d.teacher_every, d.student_every = 5, 2  # 5, 10, 12 vs 2, 4, 6: equal counts, last block included
    assert tap_pairs(d, 12, 6) == [(5, 2), (10, 4), (12, 6)]
    d.teacher_every, d.student_every = 3, 3
    with pytest.raises(ConfigError, match=r"tap mismatch.*\[3, 6, 9, 12\].*\[3, 6\]"):
        tap_pairs(d, 12, 6)
    d.teacher_every = d.student_every = None
    d.pairs = [[12, 7]]
    with pytest.raises(ConfigError, match="out of range"):
        tap_pairs(d, 12, 6)


def test_filter_bank_init_and_shapes():
    bank = FilterBank("linear", 32, 64, [2, 4], seed=1)
    w = torch.cat([f.weight.flatten() for f in bank.filters])
    assert w.std().item() == pytest.approx(0.02, rel=0.1) and abs(w.mean().item()) < 2e-3
    assert all(torch.count_nonzero(f.bias) == 0 for f in bank.filters)
    out = bank([torch.randn(2, 5, 32), torch.randn(2, 5, 32)])
    assert [o.shape for o in out] == [(2, 5, 64)] * 2
    mlp = FilterBank("mlp", 32, 64, [2], seed=1)
    assert mlp([torch.randn(1, 3, 32)])[0].shape == (1, 3, 64)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_task_head_reads_only_head_tensors_and_matches_the_model(tiny, kind):
    teacher_dir = tiny[f"{kind}_teacher"]
    teacher = load_model(teacher_dir).eval()
    head = TaskHead(teacher_dir)
    rec = TapRecorder(teacher, [4])
    x = torch.randint(100, (2, 7))
    with torch.no_grad():
        logits = teacher(input_ids=x).logits
        last = rec.take()[0]
        torch.testing.assert_close(head(last), logits, rtol=1e-5, atol=1e-5)
    assert not any(p.requires_grad for p in head.parameters())


def test_student_from_teacher_copies_chosen_layers(tiny):
    teacher = load_model(tiny["llama_teacher"])
    before = WeightReader.process_total
    student = load_teacher_blocks(tiny["llama_teacher"], [1, 3])
    # only the two blocks, embeddings, final norm and head were read, never the whole teacher
    assert WeightReader.process_total - before == sum(p.numel() for p in student.parameters())
    assert student.config.num_hidden_layers == 2
    for s_i, t_i in ((0, 1), (1, 3)):
        for (ks, vs), (kt, vt) in zip(decoder_layers(student)[s_i].state_dict().items(),
                                      decoder_layers(teacher)[t_i].state_dict().items()):
            assert ks == kt and torch.equal(vs, vt)
    assert torch.equal(student.get_input_embeddings().weight, teacher.get_input_embeddings().weight)
    with pytest.raises(ConfigError, match="0-based"):
        load_teacher_blocks(tiny["llama_teacher"], [0, 4])


def test_lr_schedule_warmup_then_cosine(tiny, tmp_path):
    cfg = load_run_config(write_config(str(tmp_path / "c.yaml"), **base_config(tiny["llama_data"],
                                                                               tiny["llama_teacher"],
                                                                               str(tmp_path / "o"))),
                          ["optim.warmup_steps=10", "optim.lr=1.0", "optim.min_lr=0.1"])
    m = [lr_multiplier(s, cfg, 110) for s in range(110)]
    assert m[0] == pytest.approx(0.1) and m[9] == pytest.approx(1.0) and m[10] == pytest.approx(1.0)
    assert m[60] == pytest.approx(0.55, abs=0.01) and m[109] == pytest.approx(0.1, abs=1e-3)
    assert all(a >= b for a, b in zip(m[10:], m[11:]))


def test_wsd_and_rewarming_follow_the_hand_computed_curve(tiny, tmp_path):
    """lr 1, min_lr 0.1, 4 warmup steps re-warming from 0.5, 20 steps, the last 25 % decaying."""
    cfg = load_run_config(write_config(str(tmp_path / "c.yaml"), **base_config(tiny["llama_data"],
                                                                               tiny["llama_teacher"],
                                                                               str(tmp_path / "o"))),
                          ["optim.schedule=wsd", "optim.lr=1.0", "optim.min_lr=0.1", "optim.warmup_steps=4",
                           "optim.warmup_start_lr=0.5", "optim.decay_fraction=0.25"])
    by_hand = [0.625, 0.75, 0.875, 1.0] + [1.0] * 11 + [0.82, 0.64, 0.46, 0.28, 0.1]
    assert [lr_multiplier(s, cfg, 20) for s in range(20)] == pytest.approx(by_hand, abs=1e-12)
    cfg.optim.schedule = "constant"
    assert [lr_multiplier(s, cfg, 20) for s in range(20)] == pytest.approx(by_hand[:4] + [1.0] * 16, abs=1e-12)


@pytest.mark.parametrize("override, message", [
    ("optim.warmup_start_lr=2.0", "optim.warmup_start_lr must be in [0, optim.lr"),
    ("optim.decay_fraction=0", "optim.decay_fraction must be in (0, 1]"),
    ("optim.schedule=linear", "optim.schedule must be one of cosine, wsd, constant"),
    ("optim.decay_fraction=0.9", "optim.schedule wsd: 1 warmup + 4 decay steps (optim.decay_fraction 0.9) exceed"),
])
def test_bad_schedules_are_one_line_before_any_process_group(tiny, tmp_path, override, message, capsys):
    from ted_ds.cli import main

    cfg = write_config(str(tmp_path / "c.yaml"), **base_config(tiny["llama_data"], tiny["llama_teacher"],
                                                                str(tmp_path / "o")))
    assert main(["distill", "--config", cfg, "distill.method=lwd", "optim.schedule=wsd", override]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ted-ds: error: ") and message in err[0], err


@pytest.mark.parametrize("key, allowed", [
    ("distill.method", "ted, lwd, kd, lm"), ("teacher.placement", "replicated, zero3, pipeline"),
    ("distill.layer_loss", "mse, normalized_mse, cosine"), ("distill.filter", "linear, mlp"),
    ("optim.schedule", "cosine, wsd, constant"), ("teacher.logits_dtype", "fp32, bf16"),
    ("distill.filter_head", "teacher, trainable"),
])
def test_fixed_choices_are_one_line_naming_every_choice(key, allowed):
    with pytest.raises(ConfigError) as e:
        load_run_config(None, [f"{key}=other"])
    assert str(e.value) == f"{key} must be one of {allowed}; got 'other'"


def test_every_teacher_placement_offers_the_teacher_protocol():
    from ted_ds.pipeline.schedule import PipelineTeacher
    from ted_ds.teacher import ReplicatedTeacher, Zero3Teacher

    placements = {cls.placement for cls in (ReplicatedTeacher, Zero3Teacher, PipelineTeacher)}
    assert placements == {"replicated", "zero3", "pipeline"}
    assert all(callable(getattr(cls, "local_parameters", None)) and "__call__" in vars(cls)
               for cls in (ReplicatedTeacher, Zero3Teacher, PipelineTeacher))


# ----------------------------------------------------------------------------- checkpointed RNG
def _draws() -> tuple:
    """One draw from every generator a training step may use (dropout masks, shuffles)."""
    cuda = [torch.rand(2, device=f"cuda:{i}").cpu() for i in range(torch.cuda.device_count())]
    return torch.rand(3), cuda, np.random.rand(3).tolist(), random.random()


def _same(a: tuple, b: tuple) -> bool:
    return torch.equal(a[0], b[0]) and len(a[1]) == len(b[1]) and all(map(torch.equal, a[1], b[1])) and a[2:] == b[2:]


def test_rng_file_restores_every_generator_and_warns_on_another_device_count(tmp_path):
    """rng_rank<r>.pt brings back torch CPU, every local CUDA device (none on a CPU machine), numpy and
    Python; CUDA streams saved for another number of devices cannot be mapped: the rest is restored, with
    a warning."""
    from ted_ds.checkpoint import rng_state, set_rng_state

    path = str(tmp_path / "rng_rank0.pt")
    torch.save(rng_state(), path)
    first = _draws()
    assert not _same(_draws(), first)  # the streams moved on
    set_rng_state(torch.load(path, weights_only=True))
    assert _same(_draws(), first)
    state = torch.load(path, weights_only=True)
    assert len(state["cuda"]) == torch.cuda.device_count()
    state["cuda"] = state["cuda"] + [torch.zeros(16, dtype=torch.uint8)]  # one device more than here
    with pytest.warns(UserWarning, match="CUDA random streams are not restored"):
        set_rng_state(state)
    assert _same(_draws(), first)


# ----------------------------------------------------------------------------- bad config, one line
def _fails(capsys, tmp_path, cfg: dict, *fragments, overrides=(), command="distill"):
    path = write_config(str(tmp_path / "bad.yaml"), **cfg)
    capsys.readouterr()
    assert ted_main([command, "--config", path, *overrides]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ted-ds: error: ") and "\n" not in err, err
    for frag in fragments:
        assert frag in err, (frag, err)


def test_bad_configs_fail_before_any_process_group(tiny, gpt2_tokenizer, tmp_path, capsys):
    import torch.distributed as dist

    good = lambda **o: base_config(tiny["llama_data"], tiny["llama_teacher"], str(tmp_path / "o"), **o)
    cfg = good()
    cfg["train"]["colour"] = "red"
    _fails(capsys, tmp_path, cfg, "unknown config key train.colour")
    _fails(capsys, tmp_path, good(), "train.steps must be int", overrides=["train.steps=many"])
    _fails(capsys, tmp_path, good(), "teacher.filters", "learn-filters")  # ted without stage 1
    _fails(capsys, tmp_path, good(**{"distill.method": "kd", "data.seq_len": 4096}), "seq_len 4096 exceeds")
    _fails(capsys, tmp_path, good(**{"distill.method": "lwd", "distill.teacher_every": 4}), "tap mismatch")
    _fails(capsys, tmp_path, good(**{"data.path": str(tmp_path / "nodata")}), "not a ted-prep dataset")
    _fails(capsys, tmp_path, good(**{"teacher.path": str(tmp_path / "noteacher")}), "teacher.path not found",
           "noteacher")
    _fails(capsys, tmp_path, good(**{"distill.method": "kd", "train.deepspeed_config": "nope.json"}),
           "DeepSpeed config not found")
    # a teacher whose tokenizer is not the data's
    _fails(capsys, tmp_path, base_config(tiny["llama_data"], tiny["gpt2_teacher"], str(tmp_path / "o"),
                                         **{"distill.method": "kd"}), "different tokenizer")
    _fails(capsys, tmp_path, good(**{"distill.method": "kd", "train.global_batch_size": 7}), "not a multiple")
    assert not dist.is_initialized()


def test_code_in_a_model_directory_never_runs_without_trust_remote_code(tiny, tmp_path, capsys):
    import json
    import shutil

    model = tmp_path / "remote"
    shutil.copytree(tiny["llama_teacher"], model)
    marker = tmp_path / "EXECUTED"
    (model / "configuration_evil.py").write_text(
        f"open({str(marker)!r}, 'w').write('x')\nfrom transformers import LlamaConfig\n"
        "class EvilConfig(LlamaConfig):\n    model_type = 'evil'\n")
    config = json.load(open(model / "config.json"))
    config["auto_map"] = {"AutoConfig": "configuration_evil.EvilConfig"}
    config["model_type"] = "evil"  # only the directory's own code could load it
    json.dump(config, open(model / "config.json", "w"))
    capsys.readouterr()
    assert ted_main(["eval", str(model), "--data", tiny["llama_data"]]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ted-ds: error:") and "\n" not in err
    _fails(capsys, tmp_path, base_config(tiny["llama_data"], str(model), str(tmp_path / "o"),
                                         **{"distill.method": "kd"}), "not a loadable HF model config")
    assert not marker.exists()


def test_launch_prints_commands_checked_against_the_config(tiny, tmp_path, capsys):
    path = write_config(str(tmp_path / "c.yaml"), **base_config(tiny["llama_data"], tiny["llama_teacher"], "out",
                                                                **{"train.global_batch_size": 32}))
    capsys.readouterr()
    assert ted_main(["launch", "--nodes", "2", "--gpus-per-node", "2", "--hosts", "a,b", "distill", "--config", path,
                     "teacher.placement=pipeline"]) == 0
    out = capsys.readouterr().out
    assert "# 4 ranks: micro-batch 2 × accumulation 4 × 4 ranks = global batch 32; teacher in 2 pipeline groups" in out
    assert "printf 'a slots=2\\nb slots=2\\n' > hostfile" in out
    assert "deepspeed --hostfile hostfile --master_addr a" in out
    assert "sbatch --nodes 2 --ntasks-per-node 2" in out and "COMMAND=distill" in out
    assert "torchrun --nnodes 2 --node_rank 1" in out and "mpirun -np 4 -H a:2,b:2" in out
    assert ted_main(["launch", "--nodes", "3", "--gpus-per-node", "2", "distill", "--config", path]) == 2
    assert "not a multiple of micro_batch_size 2 × 6 ranks" in capsys.readouterr().err


def test_loaded_models_keep_tied_heads_tied(tiny):
    """A tied head must stay the embedding's own parameter after loading (else it trains apart from
    it and the tied export silently differs from what was trained)."""
    for model in (load_model(tiny["gpt2_teacher"]), load_teacher_blocks(tiny["gpt2_teacher"], [0, 2])):
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight


def test_a_communication_failure_is_named_by_its_collective_and_caller():
    from ted_ds.distributed import failed_collective

    c10d = "/site-packages/torch/distributed/distributed_c10d.py"
    namespace: dict = {}
    exec(compile("def all_gather_into_tensor():\n    raise RuntimeError('Timed out waiting 30000ms for recv')\n",
                 c10d, "exec"), namespace)

    def gather_params():  # a caller, as DeepSpeed's or ours would be
        namespace["all_gather_into_tensor"]()

    def raised(fn):
        try:
            fn()
        except RuntimeError as e:
            return e

    name = failed_collective(raised(gather_params))
    assert name.startswith("all_gather_into_tensor (called by ") and name.endswith(".gather_params)"), name

    def wait_on_handle():
        raise RuntimeError("[gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:1234")

    assert failed_collective(raised(wait_on_handle)).startswith("wait() of an asynchronous collective (called by ")

    def not_comm():
        raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")

    assert failed_collective(raised(not_comm)) is None
