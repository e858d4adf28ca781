"""Which teacher blocks and taps each pipeline stage holds, as one frozen record: the ranks of a
pipeline group must build the same pipeline or the schedule hangs, so they compare its hash."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, fields

import torch

from ted_ds.architectures import decoder_layers, hidden_size, meta_model, num_layers, vocab_size
from ted_ds.documents import DocumentAttention, for_model
from ted_ds.errors import ConfigError
from ted_ds.filters import FilterBank
from ted_ds.teacher import TopP


def balanced_partition(costs: list[int], parts: int) -> list[int]:
    """Contiguous split of ``costs`` into ``parts`` non-empty runs minimising the largest run's sum;
    returns the run lengths."""
    n = len(costs)
    if not 1 <= parts <= n:
        raise ConfigError(f"cannot split {n} layers into {parts} pipeline stages")
    prefix = [0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(parts + 1)]  # best[p][i]: first i layers in p parts
    cut = [[0] * (n + 1) for _ in range(parts + 1)]
    best[0][0] = 0
    for p in range(1, parts + 1):
        for i in range(p, n + 1):
            for j in range(p - 1, i):
                load = max(best[p - 1][j], prefix[i] - prefix[j])
                if load < best[p][i]:
                    best[p][i], cut[p][i] = load, j
    sizes, i = [], n
    for p in range(parts, 0, -1):
        sizes.append(i - cut[p][i])
        i = cut[p][i]
    return sizes[::-1]


def stage_blocks(config, stages: int, explicit: list[int] | None) -> list[tuple[int, int]]:
    """[start, end) block ranges per pipeline stage: explicit sizes, or balanced by forward FLOPs
    (``stage_costs``)."""
    n = num_layers(config)
    if explicit is not None:
        if len(explicit) != stages or sum(explicit) != n or min(explicit) < 1:
            raise ConfigError(f"teacher.pipeline_layers {explicit} must be {stages} positive counts summing to "
                              f"the teacher's {n} layers")
        sizes = explicit
    else:
        sizes = balanced_partition(block_costs(config), stages)
    bounds, start = [], 0
    for size in sizes:
        bounds.append((start, start + size))
        start += size
    return bounds


def block_costs(config) -> list[int]:
    """Forward matmul FLOPs per token of each block (2 per parameter), the last one also carrying the
    output head's (2·V·d): a stage's time is its FLOPs. The input embedding is a lookup, no FLOPs, so
    stage 0 is charged nothing for it; attention's score work (4·d·T a block) is the same in every block
    and left out, which weighs the head a little more than it costs."""
    costs = [2 * sum(p.numel() for p in b.parameters()) for b in decoder_layers(meta_model(config))]
    costs[-1] += 2 * vocab_size(config) * hidden_size(config)
    return costs


@dataclass(frozen=True)
class PipelineLayout:
    """One pipeline group's teacher; every field must be equal on all ranks of the group."""

    blocks: tuple[tuple[int, int], ...]  # [start, end) teacher blocks of each pipeline stage
    tap_layers: tuple[int, ...]  # 1-based tapped blocks, in the order the teacher returns them
    chunks: int  # each rank's micro-batch is cut into this many chunks
    hidden_size: int  # width of the activations passed between pipeline stages
    filter_dim: int  # width of a tap after its filter (hidden_size without filters)
    need_logits: bool
    logits_topk: int  # 0: every logit; k: the k largest values and their ids
    logits_dtype: torch.dtype  # logits as sent to the rank that owns the chunk
    vocab: int  # logits keep ids < vocab (the tokenizer's): a padded head drops its extra rows
    dtype: torch.dtype  # teacher weights and activations
    documents: DocumentAttention | None  # data.document_attention (None: off)
    tail_temperature: float | None = None  # top-k's tail form: a (k + 1)-th value, the tail logit at this T
    top_p: TopP | None = None  # teacher.logits_top_p: entries past a token's support are −inf

    @property
    def logits_width(self) -> int:
        """Values per token the logits message holds: every logit, or the top-k (and the tail logit)."""
        return self.logits_topk + (self.tail_temperature is not None) if self.logits_topk else self.vocab

    def __post_init__(self):
        for layer in self.tap_layers:
            self.stage_of_layer(layer)

    @property
    def stages(self) -> int:
        return len(self.blocks)

    def stage_of_layer(self, layer: int) -> int:
        for s, (a, b) in enumerate(self.blocks):
            if a < layer <= b:
                return s
        raise ConfigError(f"tap layer {layer} is outside the teacher's layers")

    def taps_of(self, stage: int) -> list[int]:
        """Indices into ``tap_layers`` of the taps inside this pipeline stage's blocks."""
        return [i for i, layer in enumerate(self.tap_layers) if self.stage_of_layer(layer) == stage]

    def fingerprint(self) -> bytes:
        """8 bytes that differ when any field differs."""
        values = tuple((f.name, getattr(self, f.name)) for f in fields(self))
        return hashlib.sha256(repr(values).encode()).digest()[:8]

    @classmethod
    def resolve(cls, config, tap_layers: list[int], filters: FilterBank | None, *, stages: int,
                explicit_layers: list[int] | None = None, chunks: int = 1, need_logits: bool = True,
                logits_topk: int = 0, logits_dtype: torch.dtype = torch.float32, dtype: torch.dtype = torch.float32,
                document_eos: int | None = None, vocab: int | None = None,
                tail_temperature: float | None = None, top_p: TopP | None = None) -> PipelineLayout:
        """The layout of teacher ``config`` split into ``stages`` (``explicit_layers`` blocks each, or
        balanced); ``vocab``: the tokenizer's size (None: the head's)."""
        hidden = hidden_size(config)
        documents = for_model(meta_model(config), document_eos, dtype) if document_eos is not None else None
        return cls(blocks=tuple(stage_blocks(config, stages, explicit_layers)), tap_layers=tuple(tap_layers),
                   chunks=chunks, hidden_size=hidden, filter_dim=filters.out_dim if filters is not None else hidden,
                   need_logits=need_logits, logits_topk=logits_topk, logits_dtype=logits_dtype,
                   vocab=min(vocab, vocab_size(config)) if vocab else vocab_size(config), dtype=dtype,
                   documents=documents, tail_temperature=tail_temperature if logits_topk else None,
                   top_p=top_p if logits_topk else None)
