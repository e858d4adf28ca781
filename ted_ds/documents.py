"""Document-aware packing (``data.document_attention``): attention never crosses an EOS.

A training window cuts the packed token stream anywhere, so it usually holds the end of one
document, some whole ones and the start of another.  By default every token attends to all earlier
tokens of its window.  With document attention each token attends only to earlier tokens of its
own document and its position ids count from 0 at its document's first token:

* a document ends with its EOS token (ted-prep writes one after every document); the token after
  an EOS starts a new document at position 0;
* a window that starts mid-document starts at position 0 too (the part before the window is not
  in it), so the first document of a window is numbered from the window's start;
* the EOS belongs to the document it ends.  Targets are unchanged: the label at the EOS position is
  the next document's first token, predicted from the finished document and its EOS (nothing else
  ever predicts a document's first token, so masking it would leave document starts untrained).

The mask is dense: an additive float (B, 1, T, T) tensor in the model's compute dtype, 0 where a
query may attend and ``finfo(dtype).min`` elsewhere — T² elements per row (at T = 8192 in bf16,
128 MiB per row).  It is the CPU / fallback path for ``sdpa`` and ``eager`` attention, which apply
a 4D float mask exactly (a 4D bool mask is wrong under ``eager``).  FlashAttention-2 needs no mask:
it gets the reset ``position_ids`` alone and finds the document boundaries itself (varlen) — that
switch is not exercised by the CPU test suite.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

from ted_ds.errors import ConfigError

MASKED_IMPLEMENTATIONS = ("sdpa", "eager")  # take the dense additive mask
POSITION_ONLY_IMPLEMENTATIONS = ("flash_attention_2",)  # varlen from position ids alone (untested on CPU)


def restarted_positions(input_ids: torch.Tensor, eos_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(position_ids, document number), each (B, T) int64: a document opens after every ``eos_id``
    and at the window's start, and its positions count from 0 there."""
    b, t = input_ids.shape
    starts = torch.zeros_like(input_ids, dtype=torch.bool)
    starts[:, 1:] = input_ids[:, :-1] == eos_id  # the token after an EOS opens a document
    index = torch.arange(t, device=input_ids.device).expand(b, t)
    first = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=-1).values  # its document's first token
    return index - first, starts.cumsum(dim=-1)


def document_positions(input_ids: torch.Tensor, eos_id: int, dtype: torch.dtype = torch.float32
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """(position_ids (B, T) int64, additive mask (B, 1, T, T) in ``dtype``) for packed ``input_ids``
    (B, T): positions restart at 0 after every ``eos_id`` and at the window's start; the mask is 0
    where query i may see key j (same document, j ≤ i) and ``finfo(dtype).min`` elsewhere."""
    positions, document = restarted_positions(input_ids, eos_id)
    t = input_ids.shape[1]
    index = torch.arange(t, device=input_ids.device)
    allowed = (document[:, :, None] == document[:, None, :]) & (index[:, None] >= index[None, :])
    mask = torch.zeros(allowed.shape, dtype=dtype, device=input_ids.device).masked_fill_(~allowed,
                                                                                        torch.finfo(dtype).min)
    return positions, mask[:, None]


@dataclass(frozen=True)
class DocumentAttention:
    """The extra forward arguments of one model under document attention."""

    eos_id: int
    dtype: torch.dtype
    attn_implementation: str

    def __call__(self, input_ids: torch.Tensor) -> dict:
        if self.attn_implementation in POSITION_ONLY_IMPLEMENTATIONS:
            return {"position_ids": restarted_positions(input_ids, self.eos_id)[0]}
        positions, mask = document_positions(input_ids, self.eos_id, self.dtype)
        return {"position_ids": positions, "attention_mask": mask}


def attn_implementation(model) -> str:
    """The attention implementation a built (or meta) HF model runs with."""
    return str(getattr(model.config, "_attn_implementation", None) or "eager")


def check_document_attention(model, what: str) -> None:
    """Refuse a model whose forward cannot take packed positions and a 4D (or varlen) mask."""
    impl = attn_implementation(model)
    if impl not in MASKED_IMPLEMENTATIONS + POSITION_ONLY_IMPLEMENTATIONS:
        raise ConfigError(f"data.document_attention: the {what} runs attn_implementation {impl!r}, which cannot "
                          f"take packed-document masks; use one of "
                          f"{', '.join(MASKED_IMPLEMENTATIONS + POSITION_ONLY_IMPLEMENTATIONS)} or turn it off")
    params = inspect.signature(model.forward).parameters
    if "position_ids" not in params or "attention_mask" not in params:
        raise ConfigError(f"data.document_attention: the {what} ({type(model).__name__}) takes no position_ids "
                          "and attention_mask in its forward, so it cannot restart positions per document; "
                          "turn document_attention off")


def for_model(model, eos_id: int | None, dtype: torch.dtype) -> DocumentAttention | None:
    """Document attention for ``model`` (None: off, ``eos_id`` None)."""
    if eos_id is None:
        return None
    return DocumentAttention(int(eos_id), dtype, attn_implementation(model))


def forward_kwargs(documents: DocumentAttention | None, input_ids: torch.Tensor) -> dict:
    """The forward arguments for ``input_ids``: none at all when document attention is off."""
    return documents(input_ids) if documents is not None else {}
