"""Tiny real models and datasets for the engine tests (built here: no model hub)."""

from __future__ import annotations

import json
import os
import shutil

import torch
import yaml

from data_prep.build import BuildOptions, build
from data_prep.tokenizer import load_tokenizer
from harness.common import REPO
from ted_ds.config import apply_override


def make_dataset(corpus: str, tokenizer: str, out: str) -> str:
    build(BuildOptions(inputs=[corpus], tokenizer=tokenizer, out=out, valid_fraction=0.1, shard_mb=0.05,
                       progress=False))
    return out


def pretrain(model, data_dir: str, steps: int, seq_len: int = 32, batch: int = 8, lr: float = 3e-3) -> list[float]:
    """A few hundred plain-PyTorch LM steps, so the teacher knows something worth distilling."""
    from ted_ds.data import PackedShardDataset, collate
    from ted_ds.losses import lm_loss

    data = PackedShardDataset(data_dir, "train", seq_len)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(0)
    curve = []
    for _ in range(steps):
        x, y = collate(data, torch.randint(len(data), (batch,), generator=gen).tolist())
        loss = lm_loss(model(input_ids=x).logits, y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        curve.append(loss.item())
    return curve


def make_teacher(kind: str, tokenizer: str, out: str, data_dir: str | None = None, layers: int = 4,
                 hidden: int = 64, seed: int = 0, steps: int = 150) -> str:
    """A LLaMA or GPT-2 teacher, pre-trained briefly on ``data_dir``, saved as an HF directory."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    tok = load_tokenizer(tokenizer)
    torch.manual_seed(seed)
    if kind == "llama":
        config = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                             num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                             max_position_embeddings=128, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                             tie_word_embeddings=False)
        model = LlamaForCausalLM(config)
    else:
        config = GPT2Config(vocab_size=len(tok), n_embd=hidden, n_layer=layers, n_head=4, n_positions=128,
                            bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id, resid_pdrop=0.0,
                            embd_pdrop=0.0, attn_pdrop=0.0)
        model = GPT2LMHeadModel(config)
    if data_dir is not None:
        pretrain(model, data_dir, steps)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


ARCHITECTURES = ("qwen2", "mistral", "gemma2", "phi3")
PADDED_ROWS = 24  # Qwen-style: the embedding has rows past the tokenizer's ids (152064 for 151646)


def arch_config(kind: str, vocab: int, layers: int = 4, hidden: int = 64, **extra):
    """A tiny config of another architecture (no download): Qwen2 with a padded embedding, Mistral with a
    sliding window, Gemma 2 with a strong final logit soft-cap (2.0, so capping visibly changes random
    logits), sliding window and its sqrt(d)-scaled embedding, Phi-3 with fused projections."""
    from transformers import Gemma2Config, MistralConfig, Phi3Config, Qwen2Config

    common = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  tie_word_embeddings=False, **extra)
    if kind == "qwen2":
        return Qwen2Config(**{**common, "vocab_size": vocab + PADDED_ROWS})
    if kind == "mistral":
        return MistralConfig(**common, sliding_window=16)
    if kind == "gemma2":
        return Gemma2Config(**{**common, "tie_word_embeddings": True}, head_dim=16, sliding_window=16,
                            final_logit_softcapping=2.0, query_pre_attn_scalar=16, pad_token_id=0)
    if kind == "phi3":
        return Phi3Config(**common, pad_token_id=0)
    raise ValueError(kind)


def make_arch_teacher(kind: str, tokenizer: str, out: str, data_dir: str, steps: int = 40) -> str:
    """A tiny ``kind`` teacher (see arch_config) on ``tokenizer``, pre-trained briefly, saved with it."""
    from transformers import AutoModelForCausalLM

    tok = load_tokenizer(tokenizer)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(arch_config(kind, len(tok), bos_token_id=tok.bos_token_id,
                                                         eos_token_id=tok.eos_token_id))
    pretrain(model, data_dir, steps)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


DROPOUT_KEYS = ("attention_dropout", "attn_pdrop", "resid_pdrop", "embd_pdrop")


def stage1_first_batch(config_path: str):
    """What a one-process reference of stage 1 (teacher side) needs: the run's config and plan, a fresh
    filter bank seeded as the trainer seeds it, the train split, and the first global batch as the
    trainer deals it to one rank: (cfg, plan, bank, dataset, micro-batches of sample indices)."""
    from ted_ds.architectures import hidden_size
    from ted_ds.config import load_run_config
    from ted_ds.data import ConsumedSamplesSampler, PackedShardDataset
    from ted_ds.filters import FilterBank
    from ted_ds.plan import Job, plan

    cfg = load_run_config(config_path)
    p = plan(cfg, Job.FILTERS_TEACHER)
    bank = FilterBank(cfg.distill.filter, hidden_size(p.teacher_config), p.filter_dim, p.teacher_layers,
                      seed=cfg.train.seed)
    data = PackedShardDataset(cfg.data.path, "train", cfg.data.seq_len)
    micro = ConsumedSamplesSampler(len(data), cfg.train.global_batch_size, cfg.train.micro_batch_size, 0, 1,
                                   cfg.train.seed).next_batch()
    return cfg, p, bank, data, micro


def with_dropout(model_dir: str, out: str, p: float = 0.1) -> str:
    """A copy of ``model_dir`` (same weights) whose config turns dropout on: a student built from it
    draws random masks at every training step, so only a restored RNG resumes it exactly."""
    shutil.copytree(model_dir, out)
    path = os.path.join(out, "config.json")
    with open(path) as f:
        config = json.load(f)
    config.update({k: p for k in DROPOUT_KEYS if k in config})
    with open(path, "w") as f:
        json.dump(config, f)
    return out


def write_config(path: str, **sections) -> str:
    with open(path, "w") as f:
        yaml.safe_dump(sections, f, sort_keys=False)
    return path


def base_config(data: str, teacher: str, out_dir: str, **overrides) -> dict:
    """A TED config for the tiny models: 4-layer teacher tapped every 2, 2-layer student from layers 0, 2."""
    ds_config = os.path.join(REPO, "ds_configs", "zero3_cpu.json")
    cfg = {
        "teacher": {"path": teacher},
        "student": {"init_from_teacher": [0, 2]},
        "data": {"path": data, "seq_len": 32, "eval_samples": 8},
        "distill": {"method": "ted", "teacher_every": 2, "student_every": 1, "alpha": 1.0, "beta": 1.0},
        "optim": {"lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 1},
        "train": {"out_dir": out_dir, "micro_batch_size": 2, "global_batch_size": 8, "steps": 4,
                  "log_interval": 1, "eval_interval": 100, "save_interval": 100, "deepspeed_config": ds_config,
                  "progress": False, "timeout_minutes": 3},
    }
    for key, value in overrides.items():
        apply_override(cfg, f"{key}={yaml.safe_dump(value)}")  # the value as YAML, which it parses back
    return cfg


def packed_documents(eos: int, vocab: int, seed: int = 0) -> tuple[torch.Tensor, list[tuple[int, int, int]]]:
    """Two packed windows of 24 tokens, as ``collate`` cuts them from the stream: the tail of a document
    (the window starts mid-document), EOS, a whole document, EOS, the start of a third.  Returns
    (input_ids (2, 24), spans): (row, start, end) of the first two documents, each with its EOS."""
    gen = torch.Generator().manual_seed(seed)
    rows, spans = [], []
    for b, (tail, whole) in enumerate(((5, 9), (9, 6))):
        ids = torch.randint(vocab - 1, (24,), generator=gen)
        ids = ids + (ids >= eos).long()  # anything but EOS
        ids[tail] = ids[tail + 1 + whole] = eos
        rows.append(ids)
        spans += [(b, 0, tail + 1), (b, tail + 1, tail + 2 + whole)]
    return torch.stack(rows), spans


def span_difference(packed: list[torch.Tensor], alone, ids: torch.Tensor, spans) -> float:
    """Largest |packed − alone| over the spans: ``packed`` are (B, T, ...) outputs (logits, taps) of the
    packed ``ids``; ``alone(ids)`` gives the same outputs for one document run by itself."""
    worst = 0.0
    for b, start, end in spans:
        for got, want in zip(packed, alone(ids[b:b + 1, start:end])):
            worst = max(worst, (got[b, start:end].float() - want[0].float()).abs().max().item())
    return worst


STEPS = 16  # a checkpointed run's length (checkpointed_config)


def checkpointed_config(tiny, root, name, teacher=None, **over) -> str:
    """A 2-rank LWD run of ``STEPS`` steps on the tiny LLaMA pair saving every 4 steps (keeping 2), written
    as ``root/<name>.yaml`` with its out_dir ``root/<name>``: what the checkpoint and export tests run."""
    cfg = base_config(tiny["llama_data"], teacher or tiny["llama_teacher"], str(root / name),
                      **{"distill.method": "lwd", "train.steps": STEPS, "train.save_interval": 4,
                         "train.keep_last": 2, **over})
    return write_config(str(root / f"{name}.yaml"), **cfg)


def damage_token(data: str, split: str, window: int, offset: int = 5) -> str:
    """Overwrite one token of ``window`` (seq_len 32) in a copy's shard with the largest id its dtype holds;
    returns the shard's .bin."""
    import numpy as np

    from ted_ds.data import PackedShardDataset

    ds = PackedShardDataset(data, split, 32)
    at = window * 32 + offset
    k = int(np.searchsorted(ds.starts, at, side="right")) - 1
    shard = ds.shards[k]
    with open(shard.prefix + ".bin", "r+b") as f:
        f.seek(int(at - ds.starts[k]) * shard.tokens.itemsize)
        f.write(b"\xff" * shard.tokens.itemsize)
    return shard.prefix + ".bin"
