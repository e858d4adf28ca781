"""The filter bank: its initialisation and output shapes (linear and MLP filters)."""

from __future__ import annotations

import pytest
import torch

from ted_ds.filters import FilterBank


def test_filter_bank_init_and_shapes():
    bank = FilterBank("linear", 32, 64, [2, 4], seed=1)
    w = torch.cat([f.weight.flatten() for f in bank.filters])
    assert w.std().item() == pytest.approx(0.02, rel=0.1) and abs(w.mean().item()) < 2e-3
    assert all(torch.count_nonzero(f.bias) == 0 for f in bank.filters)
    out = bank([torch.randn(2, 5, 32), torch.randn(2, 5, 32)])
    assert [o.shape for o in out] == [(2, 5, 64)] * 2
    mlp = FilterBank("mlp", 32, 64, [2], seed=1)
    assert mlp([torch.randn(1, 3, 32)])[0].shape == (1, 3, 64)
