"""Task-aware filters: one small map per tap from a model's hidden size into a shared space.

Stage 1 trains a bank on a frozen model so that the teacher's head can predict the next token
from each filtered state; stage 2 aligns the student's filtered states with the teacher's.
Banks are saved as ``filters.safetensors`` + ``filters.json`` (what they map, for which layers, and
the model they were learned on: a bank learned on another model of the same shape maps nothing useful).
"""

from __future__ import annotations

import json
import os
import warnings

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from data_prep.fileio import atomically, write_text
from ted_ds.errors import ConfigError
from ted_ds.weights import fingerprint


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

    def __init__(self, kind: str, in_dim: int, out_dim: int, layers: list[int], seed: int = 0,
                 model: dict | None = None, init: str = "normal"):
        super().__init__()
        self.kind, self.in_dim, self.out_dim, self.layers = kind, in_dim, out_dim, list(layers)
        self.model = model  # what it is learned on ({"name", "digest"}: model_record), None: not known
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.filters = nn.ModuleList(make_filter(kind, in_dim, out_dim) for _ in self.layers)
        if init == "identity":  # h ↦ h, cut or zero-padded to out_dim (lwd's distill.lwd_map_init)
            if kind != "linear":
                raise ConfigError(f"an identity-initialised filter must be linear, not {kind!r}")
            with torch.no_grad():
                for f in self.filters:
                    nn.init.eye_(f.weight)
                    nn.init.zeros_(f.bias)

    def forward(self, states: list[torch.Tensor]) -> list[torch.Tensor]:
        return [f(h) for f, h in zip(self.filters, states)]  # (B, T, in_dim) -> (B, T, out_dim)

    def meta(self) -> dict:
        meta = {"kind": self.kind, "in_dim": self.in_dim, "out_dim": self.out_dim, "layers": self.layers}
        return meta if self.model is None else {**meta, "model": self.model}


def model_record(path: str) -> dict:
    """An HF directory as a bank's metadata names it: where it was, and a digest of its weights that
    survives moving it (only the digest is compared)."""
    return {"name": os.path.abspath(path), "digest": fingerprint(path)}


def save_filter_bank(state: dict[str, torch.Tensor], meta: dict, out_dir: str) -> None:
    """Write a bank atomically (tensors first, then the json that marks it complete)."""
    os.makedirs(out_dir, exist_ok=True)
    with atomically(os.path.join(out_dir, "filters.safetensors")) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, tmp)
    write_text(os.path.join(out_dir, "filters.json"), json.dumps(meta, indent=2))


def check_filter_bank(path: str, expect: dict, what: str) -> dict:
    """A saved bank's metadata, checked against what this run needs (``expect``): filter kind, dimensions,
    layers and, when ``expect`` names one, the model it was learned on."""
    meta_path = os.path.join(path, "filters.json")
    if not (os.path.isfile(meta_path) and os.path.isfile(os.path.join(path, "filters.safetensors"))):
        raise ConfigError(f"{what}: {path} is not a filter bank (run `ted-ds learn-filters` first)")
    with open(meta_path) as f:
        meta = json.load(f)
    for key in ("kind", "in_dim", "out_dim", "layers"):
        if meta.get(key) != expect[key]:
            raise ConfigError(f"{what}: {path} was learned with {key}={meta.get(key)}, this run needs "
                              f"{expect[key]} (re-run learn-filters with this config)")
    if expect.get("model") is not None:
        _check_model(meta.get("model"), expect["model"], path, what)
    return meta


def _check_model(learned: dict | None, model: dict, path: str, what: str) -> None:
    """Refuse a bank learned on another model; a bank from before banks recorded it is taken with a warning."""
    if learned is None:
        warnings.warn(f"{what}: {path} does not record the model it was learned on (written before ted-ds recorded "
                      f"it); using it for {model['name']} unchecked", stacklevel=3)
    elif learned["digest"] != model["digest"]:
        raise ConfigError(f"{what}: {path} was learned on {learned['name']} (weights {learned['digest']}), but this "
                          f"run's model is {model['name']} (weights {model['digest']}); re-run learn-filters on it")


def load_filter_bank(path: str, expect: dict, what: str) -> FilterBank:
    """Load a saved bank, checked as ``check_filter_bank`` says."""
    meta = check_filter_bank(path, expect, what)
    bank = FilterBank(meta["kind"], meta["in_dim"], meta["out_dim"], meta["layers"], model=meta.get("model"))
    bank.load_state_dict(load_file(os.path.join(path, "filters.safetensors")))
    return bank
