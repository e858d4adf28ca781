"""The GPU check's arithmetic on inputs whose answer is known: the attention work a document mask
leaves, the synthetic packed batch, the student section's headline figures, the section names."""

from __future__ import annotations

import argparse

import pytest
import torch

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


def test_sections_run_in_their_own_order_and_unknown_ones_are_refused():
    assert sections("ted, attention") == ["attention", "ted"]
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
