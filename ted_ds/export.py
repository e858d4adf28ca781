"""Getting weights out: gather a ZeRO-3 module, write HF directories and filter banks.

``save_trained_outputs`` runs at the end of training (live engine, all ranks take part);
``export_checkpoint`` rebuilds weights offline from a checkpoint's ZeRO shards (no GPU, no
process group) with DeepSpeed's own zero_to_fp32 utilities.
"""

from __future__ import annotations

import os
import shutil

import torch
from torch import nn

from ted_ds import distributed as D
from ted_ds import models as M
from ted_ds.filters import save_filter_bank


def gathered_state_dict(module: nn.Module) -> dict[str, torch.Tensor] | None:
    """The full state dict of a (possibly ZeRO-3-partitioned) module on rank 0; None elsewhere.
    Every rank must call it (the gather is collective)."""
    import deepspeed

    params = list(module.parameters())
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None, enabled=any(hasattr(p, "ds_id")
                                                                                   for p in params)):
        if D.rank() != 0:
            return None
        return {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()}


def write_hf_dir(config, state: dict[str, torch.Tensor], out_dir: str, tokenizer_dir: str | None,
                 dtype: torch.dtype = torch.float32) -> nn.Module:
    """A standard HF directory (safetensors, config, generation config, tokenizer), written atomically."""
    model = M.meta_model(config)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    tied = {k for k in missing if k.endswith("lm_head.weight")} if config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise ValueError(f"state does not fit the model: missing {sorted(set(missing) - tied)[:3]}, "
                         f"unexpected {sorted(unexpected)[:3]}")
    model.tie_weights()
    model = model.to(dtype)
    tmp = out_dir.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    if tokenizer_dir and os.path.isdir(tokenizer_dir):
        for name in os.listdir(tokenizer_dir):
            shutil.copy2(os.path.join(tokenizer_dir, name), tmp)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    return model


def save_trained_outputs(stage, p, out_dir: str) -> str:
    """Stage 1: the filter bank. Distillation: the student as an HF directory (``<out>/hf``) and, for
    ted/lwd, its trained filters (``<out>/student-filters``) for users who continue TED later."""
    trained = stage.trained_model
    if stage.name.startswith("filters-"):
        which = stage.name.split("-", 1)[1]
        target = p.cfg.distill.filters_out or os.path.join(out_dir, f"filters-{which}")
        _save_bank(trained, target)
        return target
    target = os.path.join(out_dir, "hf")
    state = gathered_state_dict(trained.model)
    if D.rank() == 0:
        write_hf_dir(p.student_config, state, target, os.path.join(p.cfg.data.path, "tokenizer"))
    if trained.filters is not None:
        _save_bank(trained.filters, os.path.join(out_dir, "student-filters"))
    D.barrier()
    return target


def _save_bank(bank, target: str) -> None:
    state = gathered_state_dict(bank)
    if D.rank() == 0:
        save_filter_bank(state, bank.meta(), target)
    D.barrier()
