"""One pipeline stage as surgery on the HF model: the teacher's own module tree and forward, so
every architecture's embedding scale, masks and soft-caps stay exact, with the other pipeline
stages' modules replaced by stand-ins and the forward cut after this stage's last block."""

from __future__ import annotations

import torch
from torch import nn

from ted_ds.architectures import decoder_layers, final_norm, layout, meta_model, module_name
from ted_ds.documents import DocumentAttention, forward_kwargs
from ted_ds.errors import ConfigError
from ted_ds.weights import WeightReader, fill_modules


class _PipelineStageDone(Exception):
    """Raised by the hook on a pipeline stage's last block: the rest of the forward belongs to others."""

    def __init__(self, hidden: torch.Tensor):
        self.hidden = hidden


class PassThrough(nn.Module):
    """Stands in for a block another pipeline stage owns."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


class Injected(nn.Module):
    """Stands in for the input embedding on pipeline stages > 0: returns the hidden state received."""

    def __init__(self):
        super().__init__()
        self.hidden: torch.Tensor | None = None

    def forward(self, input_ids):
        return self.hidden


class ZeroEmbedding(nn.Module):
    """Stands in for extra embeddings (GPT-2's positions) on pipeline stages > 0: adds nothing."""

    def __init__(self, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.zero = nn.Buffer(torch.zeros((), dtype=dtype, device=device), persistent=False)

    def forward(self, ids):
        return self.zero


def _set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)


def build_stage_model(path: str, config, start: int, end: int, first: bool, last: bool, dtype: torch.dtype,
                      device: torch.device) -> tuple[nn.Module, Injected]:
    """The teacher's module tree with only blocks [start, end) (and embeddings / norm + head where
    this pipeline stage needs them) given storage and weights in ``dtype`` on ``device``; everything
    else is a stand-in or stays on the meta device, never executed.  Not the last stage: the forward
    ends after block ``end - 1`` (see ``run_pipeline_stage``)."""
    model = meta_model(config)
    blocks_path, norm_path = layout(model)
    blocks = decoder_layers(model)
    embed_name = module_name(model, model.get_input_embeddings())
    local = {f"{blocks_path}.{i}": blocks[i] for i in range(start, end)}
    extra_embeddings = {name: m for name, m in model.named_modules()
                        if isinstance(m, nn.Embedding) and name != embed_name and not name.startswith(blocks_path)}
    if first:
        local[embed_name] = model.get_input_embeddings()
        local.update(extra_embeddings)
    if last:
        local[norm_path] = final_norm(model)
        local[module_name(model, model.get_output_embeddings())] = model.get_output_embeddings()
    fill_modules(model, local, WeightReader(path), dtype, device)
    for i in list(range(0, start)) + list(range(end, len(blocks))):
        blocks[i] = PassThrough()
    injected = Injected()
    if not first:
        _set_module(model, embed_name, injected)
        for name in extra_embeddings:
            _set_module(model, name, ZeroEmbedding(dtype, device))
    _rebuild_meta_buffers(model, config, device)
    return model.eval().requires_grad_(False), injected


def stop_after(block: nn.Module) -> None:
    """End the forward at this block (register after any tap hook on it, which must run first)."""
    def stop(_module, _inputs, output):
        raise _PipelineStageDone(output[0] if isinstance(output, tuple) else output)

    block.register_forward_hook(stop)


def run_pipeline_stage(model: nn.Module, ids: torch.Tensor, documents: DocumentAttention | None
              ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(logits, None) on the last pipeline stage, (None, hidden state after its last block) on others."""
    try:
        return model(input_ids=ids, use_cache=False, **forward_kwargs(documents, ids)).logits, None
    except _PipelineStageDone as done:
        return None, done.hidden


def _rebuild_meta_buffers(model: nn.Module, config, device: torch.device) -> None:
    """Parameter-free helpers with computed buffers (rotary embeddings) are rebuilt for real."""
    for name, module in list(model.named_modules()):
        if name and not any(True for _ in module.parameters(recurse=False)) and any(
                b.is_meta for b in module.buffers(recurse=False)):
            try:
                _set_module(model, name, type(module)(config=config).to(device))
            except TypeError as e:
                raise ConfigError(f"pipeline placement cannot rebuild {type(module).__name__} of this architecture "
                                  f"({e}); use teacher.placement replicated or zero3") from None
