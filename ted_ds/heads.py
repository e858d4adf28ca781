"""Heads that read tapped states as next-token logits (TED stage 1 trains filters through them)."""

from __future__ import annotations

import torch
from torch import nn

from ted_ds.architectures import final_norm, load_hf_config, logit_softcap, meta_model, module_name
from ted_ds.weights import WeightReader, fill_modules


class TaskHead(nn.Module):
    """The teacher's final norm and unembedding, frozen: reads a (filtered) state as next-token logits.

    Built from the teacher directory without materialising the teacher: only the norm and head
    tensors are read, straight into ``dtype`` on ``device``.
    """

    def __init__(self, teacher_path: str, trust_remote_code: bool = False, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu", vocab: int | None = None):
        super().__init__()
        config = load_hf_config(teacher_path, trust_remote_code)
        model = meta_model(config)
        self.norm, self.head = final_norm(model), model.get_output_embeddings()
        self.softcap = logit_softcap(config)
        self.vocab = vocab  # the tokenizer's ids: rows past them (padding of the embedding) are dropped
        fill_modules(model, {module_name(model, self.norm): self.norm, module_name(model, self.head): self.head},
                     WeightReader(teacher_path), dtype, device)
        self.requires_grad_(False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        logits = self.head(self.norm(h))  # (B, T, D_teacher) -> (B, T, V_teacher)
        if self.softcap:  # as the model's own forward does (Gemma 2): cap·tanh(logits / cap)
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits[..., :self.vocab]  # (B, T, V)
