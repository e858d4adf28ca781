"""Which layers are tapped, and the forward hooks that record them.

A tap is the output of one decoder block (1-based: layer L is the output of block L; the
embedding is never tapped).  ``tap_pairs`` matches teacher and student taps from the run
config; ``TapRecorder`` keeps exactly those outputs during a forward; ``TappedLM`` is a model whose
forward returns them (through its filters) beside its logits: the student, and every frozen model.
"""

from __future__ import annotations

import torch
from torch import nn

from ted_ds.architectures import decoder_layers
from ted_ds.documents import DocumentAttention, forward_kwargs
from ted_ds.errors import ConfigError


def tap_layers(every: int, n_layers: int) -> list[int]:
    """1-based layers k, 2k, …, always ending with the last block (the embedding is never tapped)."""
    if every < 1 or every > n_layers:
        raise ConfigError(f"a tap interval must be in 1..{n_layers}, got {every}")
    taps = list(range(every, n_layers + 1, every))
    if taps[-1] != n_layers:
        taps.append(n_layers)
    return taps


def tap_pairs(distill, n_teacher: int, n_student: int) -> list[tuple[int, int]]:
    """Matched (teacher_layer, student_layer) taps, 1-based, validated with an explanation."""
    if distill.pairs is not None:
        pairs = [tuple(p) for p in distill.pairs]
        for t, s in pairs:
            if len((t, s)) != 2 or not (1 <= t <= n_teacher and 1 <= s <= n_student):
                raise ConfigError(f"distill.pairs: ({t}, {s}) is out of range; teacher layers are 1..{n_teacher}, "
                                  f"student layers 1..{n_student} (layer L is the output of block L)")
        if not pairs:
            raise ConfigError("distill.pairs is empty")
        return pairs
    k_t = distill.teacher_every or max(1, n_teacher // n_student)
    k_s = distill.student_every or 1
    t_taps, s_taps = tap_layers(k_t, n_teacher), tap_layers(k_s, n_student)
    if len(t_taps) != len(s_taps):
        raise ConfigError(
            f"tap mismatch: teacher_every={k_t} taps teacher layers {t_taps} ({len(t_taps)} taps) but "
            f"student_every={k_s} taps student layers {s_taps} ({len(s_taps)}); choose intervals with equal counts "
            f"(e.g. teacher_every={max(1, n_teacher // len(s_taps))}) or list distill.pairs explicitly")
    return list(zip(t_taps, s_taps))


class TapRecorder:
    """Forward hooks that keep the outputs of the chosen blocks, and only those."""

    def __init__(self, model: nn.Module, layers: list[int]):
        self.layers = list(layers)
        self.states: dict[int, torch.Tensor] = {}
        blocks = decoder_layers(model)
        self._handles = [blocks[layer - 1].register_forward_hook(self._hook(layer)) for layer in self.layers]

    def _hook(self, layer: int):
        def hook(_module, _inputs, output):
            self.states[layer] = output[0] if isinstance(output, tuple) else output

        return hook

    def take(self) -> list[torch.Tensor]:
        """The recorded states in tap order, (B, T, D) each; clears the record."""
        states = [self.states[layer] for layer in self.layers]
        self.states = {}
        return states

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


class TappedLM(nn.Module):
    """A causal LM and the filters on its tapped layers: ``forward`` gives its logits and the tapped states,
    filtered when it has filters (None: the raw states; no layers: no taps).  Its weights are ``model.*``
    and ``filters.*``, the names checkpoints and exports use."""

    def __init__(self, model: nn.Module, layers: list[int], filters: nn.Module | None = None,
                 documents: DocumentAttention | None = None):
        super().__init__()
        self.model = model
        self.filters = filters
        self.documents = documents  # data.document_attention (None: off)
        self.recorder = TapRecorder(model, layers) if layers else None

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        logits = self.model(input_ids=input_ids, use_cache=False,
                            **forward_kwargs(self.documents, input_ids)).logits  # (B, T, V)
        taps = self.recorder.take() if self.recorder else None
        if taps is not None and self.filters is not None:
            taps = self.filters(taps)  # (B, T, D_filter) each
        return logits, taps
