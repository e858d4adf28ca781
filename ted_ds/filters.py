"""Task-aware filters: one small map per tap from a model's hidden size into a shared space.

Stage 1 trains a bank on a frozen model so that the teacher's head can predict the next token
from each filtered state; stage 2 aligns the student's filtered states with the teacher's.
Banks are saved as ``filters.safetensors`` + ``filters.json`` (what they map, for which layers).
"""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from data_prep.fileio import atomically, write_text
from ted_ds.errors import ConfigError


def _init(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
            nn.init.zeros_(m.bias)


def make_filter(kind: str, in_dim: int, out_dim: int) -> nn.Module:
    if kind == "linear":
        f = nn.Linear(in_dim, out_dim)
    elif kind == "mlp":
        f = nn.Sequential(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))
    else:
        raise ConfigError(f"unknown filter kind {kind!r}")
    _init(f)
    return f


class FilterBank(nn.Module):
    """``len(layers)`` filters, the i-th applied to the state recorded at ``layers[i]``."""

    def __init__(self, kind: str, in_dim: int, out_dim: int, layers: list[int], seed: int = 0):
        super().__init__()
        self.kind, self.in_dim, self.out_dim, self.layers = kind, in_dim, out_dim, list(layers)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.filters = nn.ModuleList(make_filter(kind, in_dim, out_dim) for _ in self.layers)

    def forward(self, states: list[torch.Tensor]) -> list[torch.Tensor]:
        return [f(h) for f, h in zip(self.filters, states)]  # (B, T, in_dim) -> (B, T, out_dim)

    def meta(self) -> dict:
        return {"kind": self.kind, "in_dim": self.in_dim, "out_dim": self.out_dim, "layers": self.layers}


def save_filter_bank(state: dict[str, torch.Tensor], meta: dict, out_dir: str) -> None:
    """Write a bank atomically (tensors first, then the json that marks it complete)."""
    os.makedirs(out_dir, exist_ok=True)
    with atomically(os.path.join(out_dir, "filters.safetensors")) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, tmp)
    write_text(os.path.join(out_dir, "filters.json"), json.dumps(meta, indent=2))


def load_filter_bank(path: str, expect: dict, what: str) -> FilterBank:
    """Load a saved bank, checking it maps the dimensions and layers this run needs."""
    meta_path, weights = os.path.join(path, "filters.json"), os.path.join(path, "filters.safetensors")
    if not (os.path.isfile(meta_path) and os.path.isfile(weights)):
        raise ConfigError(f"{what}: {path} is not a filter bank (run `ted-ds learn-filters` first)")
    with open(meta_path) as f:
        meta = json.load(f)
    for key in ("kind", "in_dim", "out_dim", "layers"):
        if meta.get(key) != expect[key]:
            raise ConfigError(f"{what}: {path} was learned with {key}={meta.get(key)}, this run needs "
                              f"{expect[key]} (re-run learn-filters with this config)")
    if "model" in expect and meta.get("model") != expect["model"]:
        raise ConfigError(f"{what}: {path} was learned on a different model ({meta.get('model')}); this run uses "
                          f"{expect['model']}")
    bank = FilterBank(meta["kind"], meta["in_dim"], meta["out_dim"], meta["layers"])
    bank.load_state_dict(load_file(weights))
    return bank
