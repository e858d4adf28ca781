"""The GPU check's arithmetic on inputs whose answer is known: the attention work a document mask
leaves, the synthetic packed batch, the student section's headline figures, the section names."""

from __future__ import annotations

import argparse

import pytest
import torch
import torch._dynamo  # noqa: F401  autocast and the model import it, which sets TORCHINDUCTOR_CACHE_DIR

from bench.gpu_check import sections
from bench.gpu_measure import EOS, attended_pairs, packed_ids
from bench.gpu_sections import student_summary
from ted_ds.documents import restarted_positions


def test_attended_pairs_count_the_causal_work_within_each_document():
    assert attended_pairs(torch.tensor([[0, 0, 0, 1, 1]])) == 6 + 3
    assert attended_pairs(torch.zeros(2, 8, dtype=torch.long)) == 2 * 36  # one document a row: T(T+1)/2


def test_a_packed_batch_holds_the_documents_asked_for():
    ids = packed_ids(3, 64, 5)
    assert ids.shape == (3, 64)
    assert restarted_positions(ids, EOS)[1][:, -1].tolist() == [4, 4, 4]  # documents 0..4 in every row


def test_student_summary_compares_each_micro_batch_with_the_plain_step():
    rows = [{"variant": "ted-ds", "micro_batch": 1, "overrides": [], "step_s": 2.0, "tokens_per_s": 10.0, "mfu": 0.1},
            {"variant": "plain", "micro_batch": 1, "overrides": [], "step_s": 1.0, "tokens_per_s": 20.0},
            {"variant": "ted-ds", "micro_batch": 2, "overrides": [], "step_s": 3.0, "tokens_per_s": 13.0, "mfu": 0.2},
            {"variant": "plain", "micro_batch": 2, "overrides": [], "step_s": 2.0, "tokens_per_s": 20.0},
            {"variant": "eager", "micro_batch": 2, "overrides": ["x=1"], "step_s": 2.5, "tokens_per_s": 16.0},
            {"variant": "flex_attention", "micro_batch": 2, "skipped": "no backward on a CPU"}]
    s = student_summary(rows, 2)
    assert s["student_mfu"] == 0.2 and s["student_vs_plain"] == 1.5
    assert s["student_vs_plain_by_micro_batch"] == {1: 2.0, 2: 1.5}
    assert s["best_student"] == {"variant": "eager", "micro_batch": 2, "overrides": ["x=1"]}  # plain is no setting


def test_sections_run_headline_figures_first_and_unknown_ones_are_refused():
    assert sections("documents, attention, levers, ted, student") == ["student", "ted", "levers", "documents",
                                                                       "attention"]
    with pytest.raises(argparse.ArgumentTypeError, match="choose among"):
        sections("attention,gemm")


@pytest.mark.parametrize("name, dtype, tflops", [
    ("NVIDIA H100 80GB HBM3", torch.bfloat16, 989.0),  # SXM
    ("NVIDIA H100 PCIe", torch.bfloat16, 756.0),
    ("NVIDIA H100 NVL", torch.bfloat16, 835.0),
    ("NVIDIA H100 NVL", torch.float32, 60.0),
    ("NVIDIA H200", torch.bfloat16, 989.0),
    ("NVIDIA H200 NVL", torch.bfloat16, 835.0),
    ("NVIDIA A100-SXM4-80GB", torch.bfloat16, 312.0),
    ("NVIDIA A100 80GB PCIe", torch.float32, 19.5),
    ("NVIDIA L40S", torch.bfloat16, 362.0),
    ("NVIDIA L4", torch.bfloat16, 121.0),
    ("Tesla V100-SXM2-16GB", torch.bfloat16, None),  # no bf16 unit
    ("NVIDIA RTX PRO 6000 Blackwell", torch.bfloat16, None),  # not in the table
])
def test_peak_flops_by_gpu_model_and_dtype(name, dtype, tflops):
    """The datasheet's dense peak per model and dtype: PCIe and NVL parts are not taken for the SXM one,
    L4 is not L40S, and a GPU (or dtype) the table lacks has no peak rather than a guessed one."""
    from ted_ds.metrics import gpu_peak_tflops

    assert gpu_peak_tflops(name, dtype) == tflops


def test_the_plain_step_computes_the_ted_ds_loss_and_clips():
    """The baseline of ``student_vs_plain`` does ted-ds's work: bf16 autocast over fp32 master weights gives
    the chunked LM loss ted-ds computes on the same model held in bf16 (as its bf16 ZeRO-3 engine holds
    it), within bf16 rounding; and the gradient is clipped to the run's norm before the update."""
    import copy

    from transformers import LlamaConfig, LlamaForCausalLM

    from bench.gpu_measure import plain_step
    from ted_ds.losses import lm_loss

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    with torch.no_grad():
        model.lm_head.weight.mul_(50)  # peaked logits: the loss tells the right labels from others
    window = torch.randint(0, 512, (2, 33))
    ids, labels = window[:, :-1], window[:, 1:]
    with torch.no_grad():
        ted_ds_loss = lm_loss(copy.deepcopy(model).bfloat16()(input_ids=ids).logits, labels)
    before = [p.detach().clone() for p in model.parameters()]
    sgd = torch.optim.SGD(model.parameters(), lr=1.0)  # the update is then the clipped gradient itself
    loss, norm = plain_step(model, sgd, ids, labels, torch.bfloat16, clip=1e-3)
    assert loss.item() == pytest.approx(ted_ds_loss.item(), rel=1e-2) and norm > 1e-3
    update = torch.cat([(b - p.detach()).flatten() for b, p in zip(before, model.parameters())])
    assert update.norm().item() == pytest.approx(1e-3, rel=1e-3)
