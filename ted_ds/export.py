"""Getting weights out: gather a ZeRO-3 module, write HF directories and filter banks.

``save_bank`` and ``save_student`` run at the end of training (live engine, all ranks take part; a
``TrainModule`` says which of them is its output);
``export_checkpoint`` rebuilds weights offline from a checkpoint's ZeRO shards (no GPU, no
process group) with DeepSpeed's own zero_to_fp32 utilities.
"""

from __future__ import annotations

import json
import os
import shutil

import torch
from torch import nn

from data_prep.fileio import atomically
from ted_ds import distributed
from ted_ds.checkpoint import read_record, resolve_checkpoint, weights_only_loads
from ted_ds.config import DataConfig, data_config
from ted_ds.errors import CheckpointError
from ted_ds.filters import model_record, save_filter_bank
from ted_ds.weights import build_dense

TRAINED_AT = "ted_ds_training.json"  # in an HF directory ted-ds wrote: {"seq_len": the window it was trained at}


def gathered_state_dict(module: nn.Module) -> dict[str, torch.Tensor] | None:
    """The full state dict of a (possibly ZeRO-3-partitioned) module on rank 0; None elsewhere.
    Every rank must call it (the gather is collective)."""
    import deepspeed

    params = list(module.parameters())
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None, enabled=any(hasattr(p, "ds_id")
                                                                                   for p in params)):
        if distributed.rank() != 0:
            return None
        return {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()}


def model_from_state(config, state: dict[str, torch.Tensor]) -> nn.Module:
    """An fp32 CPU model holding ``state`` exactly (a tied head may be absent from it)."""
    model = build_dense(config, torch.float32)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {k for k in missing if k.endswith("lm_head.weight")} if config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise ValueError(f"state does not fit the model: missing {sorted(set(missing) - tied)[:3]}, "
                         f"unexpected {sorted(unexpected)[:3]}")
    model.tie_weights()
    return model.eval()


def write_hf_dir(config, state: dict[str, torch.Tensor], out_dir: str, tokenizer_dir: str | None,
                 dtype: torch.dtype = torch.float32, seq_len: int | None = None) -> None:
    """A standard HF directory (safetensors, config, generation config, tokenizer), whole or not at all; with
    the window length it was trained at (``TRAINED_AT``), which ``ted-ds eval`` takes by default."""
    model = model_from_state(config, state).to(dtype)
    with atomically(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if seq_len is not None:
            with open(os.path.join(tmp, TRAINED_AT), "w") as f:
                json.dump({"seq_len": seq_len}, f)
        if tokenizer_dir and os.path.isdir(tokenizer_dir):
            for name in os.listdir(tokenizer_dir):
                shutil.copy2(os.path.join(tokenizer_dir, name), tmp)


def trained_seq_len(model_dir: str) -> int | None:
    """The window length a ted-ds model directory was trained at; None for other models."""
    path = os.path.join(model_dir, TRAINED_AT)
    return json.load(open(path))["seq_len"] if os.path.isfile(path) else None


def save_student(trained: nn.Module, student_config, tokenizer_dir: str, out_dir: str, seq_len: int) -> str:
    """Stage 2 and the baselines: the student as an HF directory (``<out>/hf``) and, for ted/lwd, its
    trained filters (``<out>/student-filters``) for users who continue TED later."""
    target = os.path.join(out_dir, "hf")
    state = gathered_state_dict(trained.model)
    if distributed.rank() == 0:
        write_hf_dir(student_config, state, target, tokenizer_dir, seq_len=seq_len)
    if trained.filters is not None:
        save_bank(trained.filters, os.path.join(out_dir, "student-filters"), target)
    distributed.barrier()
    return target


def save_bank(bank, target: str, student_dir: str | None = None) -> str:
    """Every rank gathers, rank 0 writes; a bank trained with the student records it as ``student_dir``."""
    state = gathered_state_dict(bank)
    if distributed.rank() == 0:
        save_filter_bank(state, bank.meta() if student_dir is None else with_student(bank.meta(), student_dir), target)
    distributed.barrier()
    return target


def with_student(meta: dict, student_dir: str | None) -> dict:
    """A stage-2 bank trains with its student, so it was learned on the student as saved in ``student_dir``
    (None: not saved with it; the bank then names no model)."""
    meta = {k: v for k, v in meta.items() if k != "model"}
    return meta if student_dir is None else {**meta, "model": model_record(student_dir)}


# ----------------------------------------------------------------------------- offline export
def consolidated_state(ckpt_dir: str, tag: str) -> dict[str, torch.Tensor]:
    """fp32 master weights rebuilt from the ZeRO shards by DeepSpeed's zero_to_fp32."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with weights_only_loads():
        state = get_fp32_state_dict_from_zero_checkpoint(ckpt_dir, tag)
    return {k: v.float() for k, v in state.items()}


def _split(state: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def sample_batch(data: DataConfig, vocab_size: int) -> torch.Tensor:
    """Token ids to compare logits on: the first validation windows of the run's (first source's) data,
    or seeded random ids when the data is gone."""
    data_path, seq_len = data.blend[0].path, data.seq_len
    if data_path and os.path.isdir(data_path):
        from ted_ds.data import PackedShardDataset, collate

        split = "valid" if _has_split(data_path, "valid") else "train"
        data = PackedShardDataset(data_path, split, seq_len)
        return collate(data, list(range(min(4, len(data)))))[0]
    return torch.randint(0, vocab_size, (4, min(seq_len, 64)), generator=torch.Generator().manual_seed(0))


def _check_weights(reloaded: nn.Module, state: dict[str, torch.Tensor], dtype: torch.dtype, hf_dir: str) -> None:
    """Every tensor of the reloaded model is the checkpoint's, rounded to ``dtype``; only a tied head
    may be absent from the checkpoint."""
    got = reloaded.state_dict()
    tied = {k for k in got if k.endswith("lm_head.weight")} if reloaded.config.tie_word_embeddings else set()
    unknown, missing = sorted(set(got) - set(state) - tied), sorted(set(state) - set(got))
    differ = [k for k in state if k in got and not torch.equal(got[k], state[k].to(dtype).float())]
    if unknown or missing or differ:
        raise CheckpointError(f"{hf_dir}: weights are not the checkpoint's (differ: {differ[:3]}, missing: "
                              f"{missing[:3]}, not in the checkpoint: {unknown[:3]}); export is not faithful")


@torch.no_grad()
def verify_export(hf_dir: str, state: dict[str, torch.Tensor], config, batch: torch.Tensor,
                  dtype: torch.dtype) -> str:
    """Reload ``hf_dir`` with plain transformers and check it against the checkpoint's own weights
    (``state``), never against the model just written: every weight equals the checkpoint's rounded to
    ``dtype``; the logits equal the checkpoint's in fp32, and in bf16 are no further from them than
    rounding the checkpoint's weights to bf16 moves them (computed here, in fp32)."""
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    _check_weights(reloaded, state, dtype, hf_dir)
    exact = model_from_state(config, state)(input_ids=batch).logits
    diff = (reloaded(input_ids=batch).logits - exact).abs().max().item()
    bound = 0.0
    if dtype != torch.float32:
        rounded = model_from_state(config, {k: v.to(dtype).float() for k, v in state.items()})
        bound = (rounded(input_ids=batch).logits - exact).abs().max().item()
    if diff > bound:
        raise CheckpointError(f"{hf_dir}: reloaded logits differ from the checkpoint's by {diff:.3g} (allowed: "
                              f"{bound:.3g}, what rounding the weights to {dtype} does); export is not faithful")
    where = f"logits on {batch.shape[0]}×{batch.shape[1]} tokens"
    if dtype == torch.float32:
        return f"weights and {where} identical to the checkpoint's"
    return (f"weights are the checkpoint's rounded to {dtype}; {where} {diff:.3g} off the checkpoint's, as far as "
            "that rounding moves them")


def _has_split(data_path: str, split: str) -> bool:
    from data_prep.format import read_manifest

    return bool(read_manifest(data_path)["shards"].get(split))


def export_checkpoint(path: str, out: str | None, tag: str | None = None, dtype: str = "fp32",
                      filters_out: str | None = None, tokenizer: str | None = None) -> list[str]:
    """Checkpoint → HF directory (student only) and/or filter bank. No GPU, no process group."""
    ckpt_dir, tag = resolve_checkpoint(path, tag)
    run = read_record(os.path.join(ckpt_dir, tag)).run
    state = consolidated_state(ckpt_dir, tag)
    done = []
    is_bank = not any(k.startswith("model.") for k in state)
    if out is not None:
        if is_bank:
            raise CheckpointError(f"{ckpt_dir}/{tag} is a stage-1 checkpoint (filters only); use --filters")
        from transformers import AutoConfig

        config = AutoConfig.for_model(**run["student_config"])
        torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
        student = _split(state, "model.")
        write_hf_dir(config, student, out, tokenizer or run.get("tokenizer"), torch_dtype,
                     seq_len=run["config"]["data"]["seq_len"])
        batch = sample_batch(data_config(run["config"]["data"]), config.vocab_size)
        done.append(f"wrote {out} from {tag} ({verify_export(out, student, config, batch, torch_dtype)})")
    if filters_out is not None:
        bank_state = (_split(state, "bank.") or state) if is_bank else _split(state, "filters.")  # bank. : own heads
        if not bank_state or run.get("filters") is None:
            raise CheckpointError(f"{ckpt_dir}/{tag} holds no filter bank (method without filters)")
        save_filter_bank(bank_state, run["filters"] if is_bank else with_student(run["filters"], out), filters_out)
        done.append(f"wrote filter bank {filters_out}")
    return done
