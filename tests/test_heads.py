"""The task head, read from the safetensors files alone, against the model's own logits."""

from __future__ import annotations

import pytest
import torch

from ted_ds.heads import TaskHead
from ted_ds.taps import TapRecorder
from ted_ds.weights import load_model


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
