"""Adapters over Hugging Face causal LMs: where the blocks are, how to tap them, how to load them.

HF models stay HF models.  This module only knows how to find the decoder blocks, final norm,
embeddings and head of GPT-2-style (``transformer.h``), LLaMA-style (``model.layers``: LLaMA,
Qwen2, Mistral, Gemma 2, Phi-3, OLMo 2) and GPT-NeoX models, record the outputs of chosen blocks,
build a student from teacher layers, and read only some of a checkpoint's tensors (for task heads
and pipeline stages).
"""

from __future__ import annotations

import json
import os

import torch
from torch import nn

from ted_ds import weights as W
from ted_ds.errors import ConfigError

# (decoder block list, final norm) attribute paths, tried in order.
_LAYOUTS = (("transformer.h", "transformer.ln_f"), ("model.layers", "model.norm"), ("gpt_neox.layers",
                                                                                     "gpt_neox.final_layer_norm"))


def _get(obj, dotted: str):
    for part in dotted.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def layout(model: nn.Module) -> tuple[str, str]:
    """Attribute paths of the decoder block list and the final norm."""
    for blocks, norm in _LAYOUTS:
        if isinstance(_get(model, blocks), nn.ModuleList) and _get(model, norm) is not None:
            return blocks, norm
    known = ", ".join(f"{blocks} + {norm}" for blocks, norm in _LAYOUTS)
    raise ConfigError(f"{type(model).__name__}: cannot find its decoder blocks (known layouts: {known}); add its "
                      "(blocks, final norm) attribute paths to _LAYOUTS in ted_ds/models.py")


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    return _get(model, layout(model)[0])


def final_norm(model: nn.Module) -> nn.Module:
    return _get(model, layout(model)[1])


def num_layers(config) -> int:
    return int(config.num_hidden_layers)


def hidden_size(config) -> int:
    return int(config.hidden_size)


def max_positions(config) -> int | None:
    return getattr(config, "max_position_embeddings", None)


def vocab_size(config) -> int:
    return int(config.vocab_size)


def logit_softcap(config) -> float | None:
    """Gemma 2's final logit soft-capping (cap·tanh(logits / cap) after the head), if the model has it."""
    return getattr(config, "final_logit_softcapping", None) or None


def ndim(p: torch.Tensor) -> int:
    """Dimensions of a parameter, also when ZeRO-3 has partitioned it (its data is then empty)."""
    return len(getattr(p, "ds_shape", p.shape))


def count_parameters(module: nn.Module) -> int:
    """Parameter count, also for ZeRO-3-partitioned modules (which report ds_numel)."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in module.parameters())


# ----------------------------------------------------------------------------- loading
def load_config(path: str, trust_remote_code: bool = False):
    """An HF config from a model directory or a config.json file."""
    from transformers import AutoConfig

    W.quiet_transformers()
    if not os.path.exists(path):
        raise ConfigError(f"model path not found: {path}")
    try:
        if os.path.isfile(path):
            with open(path) as f:
                data = json.load(f)
            return AutoConfig.for_model(data.pop("model_type"), **data)
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (ValueError, KeyError, OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: not a loadable HF model config ({str(e).splitlines()[0]})") from None


def load_model(path: str, trust_remote_code: bool = False, dtype: torch.dtype = torch.float32,
               device: torch.device | str = "cpu", zero_config: dict | None = None, config=None,
               rename: W.Rename = W.identity) -> nn.Module:
    """A causal LM with weights read from the safetensors of ``path``, straight into ``dtype`` on
    ``device`` — whole (``zero_config`` None) or as this rank's ZeRO-3 slices.  ``config`` and
    ``rename`` build another shape from the same files (a student from some teacher blocks)."""
    config = config if config is not None else load_config(path, trust_remote_code)
    reader = W.WeightReader(path)
    if zero_config is not None:
        model = W.build_partitioned(config, dtype, zero_config)
        W.fill_partitions(model, reader, rename)
    else:
        model = W.build_dense(config, dtype, device)
        W.fill_dense(model, reader, rename)
    return model


def teacher_blocks_config(teacher_config, layers: list[int]):
    """The config of a student made of the teacher blocks ``layers`` (0-based, in order)."""
    import copy

    n = num_layers(teacher_config)
    if not layers or any(not 0 <= i < n for i in layers):
        raise ConfigError(f"student.init_from_teacher: layers must be non-empty 0-based indices < {n}, got {layers}")
    config = copy.deepcopy(teacher_config)
    config.num_hidden_layers = len(layers)
    if isinstance(getattr(config, "layer_types", None), list):  # per-block attention (Gemma 2's sliding/full)
        config.layer_types = [teacher_config.layer_types[i] for i in layers]
    return config


def load_teacher_blocks(teacher_path: str, layers: list[int], trust_remote_code: bool = False, **placement):
    """A student with the teacher's embeddings, head, final norm and the chosen blocks, in order,
    reading only those tensors from the teacher's files."""
    teacher_config = load_config(teacher_path, trust_remote_code)
    blocks_path = layout(meta_model(teacher_config))[0]
    return load_model(teacher_path, config=teacher_blocks_config(teacher_config, layers),
                      rename=W.layer_rename(blocks_path, layers), **placement)


def model_from_config(config, seed: int) -> nn.Module:
    """A randomly initialised causal LM, built whole in fp32; the same seed gives the same weights on
    every rank."""
    from transformers import AutoModelForCausalLM

    W.quiet_transformers()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32, trust_remote_code=W.trusted(config))


def meta_model(config) -> nn.Module:
    """The model's module tree with no storage: cheap to build for any size."""
    from transformers import AutoModelForCausalLM

    W.quiet_transformers()
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32, trust_remote_code=W.trusted(config))


def module_name(model: nn.Module, target: nn.Module) -> str:
    for name, mod in model.named_modules():
        if mod is target:
            return name
    raise KeyError(type(target).__name__)


# ----------------------------------------------------------------------------- taps
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


def matmul_parameters(model: nn.Module) -> int:
    """Parameters that take part in matrix products (the N of 6·N FLOPs per token): every weight
    matrix except input/position embeddings, plus the output head even when it is tied."""
    embeddings = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    n = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if ndim(p) >= 2 and id(p) not in embeddings)
    head = model.get_output_embeddings()
    if head is not None and id(head.weight) in embeddings:
        n += getattr(head.weight, "ds_numel", head.weight.numel())
    return n


class TaskHead(nn.Module):
    """The teacher's final norm and unembedding, frozen: reads a (filtered) state as next-token logits.

    Built from the teacher directory without materialising the teacher: only the norm and head
    tensors are read, straight into ``dtype`` on ``device``.
    """

    def __init__(self, teacher_path: str, trust_remote_code: bool = False, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu", vocab: int | None = None):
        super().__init__()
        config = load_config(teacher_path, trust_remote_code)
        model = meta_model(config)
        self.norm, self.head = final_norm(model), model.get_output_embeddings()
        self.softcap = logit_softcap(config)
        self.vocab = vocab  # the tokenizer's ids: rows past them (padding of the embedding) are dropped
        W.fill_modules(model, {module_name(model, self.norm): self.norm, module_name(model, self.head): self.head},
                       W.WeightReader(teacher_path), dtype, device)
        self.requires_grad_(False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        logits = self.head(self.norm(h))  # (B, T, D_teacher) -> (B, T, V_teacher)
        if self.softcap:  # as the model's own forward does (Gemma 2): cap·tanh(logits / cap)
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits[..., :self.vocab]  # (B, T, V)
