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

How the boundary reaches attention depends on the model's ``attn_implementation``:

* ``flex_attention``: a FlexAttention ``BlockMask`` (same document and causal), built once per
  forward and shared by every layer; blocks with no allowed pair are skipped, so a packed window
  costs about what its documents cost apart, and no (T, T) float tensor exists.  Equal to the dense
  path (tests/test_documents.py).  On a CPU it runs uncompiled (``flex_on_cpu_uncompiled``).
* ``sdpa`` / ``eager``: the dense reference and fallback, an additive float (B, 1, T, T) mask in the
  compute dtype, 0 where a query may attend and ``finfo(dtype).min`` elsewhere — T² elements per
  row (at T = 8192 in bf16, 128 MiB per row), and it keeps SDPA off its flash kernel.  (A 4D bool
  mask is wrong under ``eager``.)
* ``flash_attention_2`` / ``_3``: no mask; the reset ``position_ids`` alone, from which it finds the
  document boundaries itself (varlen) — not exercised by the CPU test suite.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

from ted_ds.errors import ConfigError

MASKED_IMPLEMENTATIONS = ("sdpa", "eager")  # take the dense additive mask
BLOCK_MASK_IMPLEMENTATIONS = ("flex_attention",)  # take a FlexAttention BlockMask
POSITION_ONLY_IMPLEMENTATIONS = ("flash_attention_2", "flash_attention_3")  # varlen from position ids (no CPU test)
DOCUMENT_IMPLEMENTATIONS = MASKED_IMPLEMENTATIONS + BLOCK_MASK_IMPLEMENTATIONS + POSITION_ONLY_IMPLEMENTATIONS


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


def document_block_mask(document: torch.Tensor):
    """A FlexAttention ``BlockMask`` letting query i see key j of row b iff j ≤ i and both lie in the
    same document; ``document`` (B, T) numbers each token's document (``restarted_positions``)."""
    from torch.nn.attention.flex_attention import create_block_mask

    b, t = document.shape

    def same_document_causal(batch, _head, q, k):
        return (q >= k) & (document[batch, q] == document[batch, k])

    return create_block_mask(same_document_causal, b, None, t, t, device=document.device)


def flex_on_cpu_uncompiled(module, query, key, value, attention_mask, scaling=None, softcap=None, **kwargs):
    """transformers' ``flex_attention`` forward, run uncompiled where the tensors are on a CPU.

    transformers always compiles FlexAttention; its compiled CPU kernel (inductor, torch 2.13) was
    seen to crash in a process that had run SDPA with a 4D float mask before (AMD EPYC).  Uncompiled
    FlexAttention computes the same attention (unfused, so T² scores per head: CPU runs are small).
    GPUs keep transformers' compiled kernel."""
    from torch.nn.attention.flex_attention import BlockMask, flex_attention
    from transformers.integrations.flex_attention import flex_attention_forward

    if query.device.type != "cpu" or not isinstance(attention_mask, BlockMask) or kwargs.get("s_aux") is not None:
        return flex_attention_forward(module, query, key, value, attention_mask, scaling=scaling, softcap=softcap,
                                      **kwargs)
    if kwargs.get("dropout", 0.0) > 0:
        raise ValueError("flex_attention takes no attention dropout (set the model's attention_dropout to 0)")
    score_mod = None if softcap is None else (lambda score, _b, _h, _q, _k: softcap * torch.tanh(score / softcap))
    out = flex_attention(query, key, value, score_mod=score_mod, block_mask=attention_mask, scale=scaling,
                         enable_gqa=query.shape[1] != key.shape[1])
    return out.transpose(1, 2).contiguous(), None


def _use_flex_on_cpu_uncompiled() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register("flex_attention", flex_on_cpu_uncompiled)


@dataclass(frozen=True)
class DocumentAttention:
    """The extra forward arguments of one model under document attention."""

    eos_id: int
    dtype: torch.dtype
    attn_implementation: str

    def __call__(self, input_ids: torch.Tensor) -> dict:
        if self.attn_implementation in POSITION_ONLY_IMPLEMENTATIONS:
            return {"position_ids": restarted_positions(input_ids, self.eos_id)[0]}
        if self.attn_implementation in BLOCK_MASK_IMPLEMENTATIONS:
            positions, document = restarted_positions(input_ids, self.eos_id)
            return {"position_ids": positions, "attention_mask": document_block_mask(document)}
        positions, mask = document_positions(input_ids, self.eos_id, self.dtype)
        return {"position_ids": positions, "attention_mask": mask}


def attn_implementation(model) -> str:
    """The attention implementation a built (or meta) HF model runs with."""
    return str(getattr(model.config, "_attn_implementation", None) or "eager")


def check_document_attention(model, what: str) -> None:
    """Refuse a model whose forward cannot take packed positions and a 4D (or varlen) mask."""
    impl = attn_implementation(model)
    if impl not in DOCUMENT_IMPLEMENTATIONS:
        raise ConfigError(f"data.document_attention: the {what} runs attn_implementation {impl!r}, which cannot "
                          f"take packed-document masks; use one of {', '.join(DOCUMENT_IMPLEMENTATIONS)} or turn "
                          "it off")
    params = inspect.signature(model.forward).parameters
    if "position_ids" not in params or "attention_mask" not in params:
        raise ConfigError(f"data.document_attention: the {what} ({type(model).__name__}) takes no position_ids "
                          "and attention_mask in its forward, so it cannot restart positions per document; "
                          "turn document_attention off")


def check_trainable_attention(model, what: str, on_cpu: bool) -> None:
    """A model that is trained needs an attention with a backward where it runs; FlexAttention has
    none on a CPU (torch refuses it there at the first backward)."""
    if on_cpu and attn_implementation(model) in BLOCK_MASK_IMPLEMENTATIONS:
        raise ConfigError(f"the {what} runs attn_implementation 'flex_attention', which has no backward on a CPU "
                          f"(torch {torch.__version__}); train it with sdpa, or on a GPU")


def for_model(model, eos_id: int | None, dtype: torch.dtype) -> DocumentAttention | None:
    """Document attention for ``model`` (None: off, ``eos_id`` None)."""
    if eos_id is None:
        return None
    impl = attn_implementation(model)
    if impl in BLOCK_MASK_IMPLEMENTATIONS:
        _use_flex_on_cpu_uncompiled()
    return DocumentAttention(int(eos_id), dtype, impl)


def forward_kwargs(documents: DocumentAttention | None, input_ids: torch.Tensor) -> dict:
    """The forward arguments for ``input_ids``: none at all when document attention is off."""
    return documents(input_ids) if documents is not None else {}
