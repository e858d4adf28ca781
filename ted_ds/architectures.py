"""Adapters over Hugging Face causal LMs: where the parts are, and the configs that describe them.

HF models stay HF models.  This module only knows how to find the decoder blocks, final norm,
embeddings and head of GPT-2-style (``transformer.h``), LLaMA-style (``model.layers``: LLaMA,
Qwen2, Mistral, Gemma 2, Phi-3, OLMo 2) and GPT-NeoX models, read their HF configs, and build a
module tree from a config (``instantiate``, the one place that calls ``from_config``).  Reading
weights into such a tree is ``ted_ds.weights``.
"""

from __future__ import annotations

import copy
import json
import os

import torch
from torch import nn

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
                      "(blocks, final norm) attribute paths to _LAYOUTS in ted_ds/architectures.py")


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    return _get(model, layout(model)[0])


def final_norm(model: nn.Module) -> nn.Module:
    return _get(model, layout(model)[1])


def module_name(model: nn.Module, target: nn.Module) -> str:
    for name, mod in model.named_modules():
        if mod is target:
            return name
    raise KeyError(type(target).__name__)


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


# ----------------------------------------------------------------------------- configs
def quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def trusted(config) -> bool:
    """A config that names remote code (auto_map) could only be loaded with the user's consent."""
    return bool(getattr(config, "auto_map", None))


def load_hf_config(path: str, trust_remote_code: bool = False):
    """An HF config from a model directory or a config.json file."""
    from transformers import AutoConfig

    quiet_transformers()
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


def teacher_blocks_config(teacher_config, layers: list[int]):
    """The config of a student made of the teacher blocks ``layers`` (0-based, in order)."""
    n = num_layers(teacher_config)
    if not layers or any(not 0 <= i < n for i in layers):
        raise ConfigError(f"student.init_from_teacher: layers must be non-empty 0-based indices < {n}, got {layers}")
    config = copy.deepcopy(teacher_config)
    config.num_hidden_layers = len(layers)
    if isinstance(getattr(config, "layer_types", None), list):  # per-block attention (Gemma 2's sliding/full)
        config.layer_types = [teacher_config.layer_types[i] for i in layers]
    return config


def with_attention(config, attn_implementation: str | None):
    """``config`` set to build its model with ``attn_implementation`` (None: leave the config's own)."""
    if attn_implementation is not None:
        config = copy.deepcopy(config)
        config._attn_implementation = attn_implementation
    return config


def teacher_hf_config(teacher) -> object:
    """The HF config the run builds its teacher from (``teacher``: the run's TeacherConfig): the directory's,
    with the run's attention kernel."""
    return with_attention(load_hf_config(teacher.path, teacher.trust_remote_code), teacher.attn_implementation)


def check_attention(config, what: str) -> None:
    """Refuse, in one line, an attention kernel the installed stack or the model class cannot run:
    transformers' own check, which otherwise fails only when a rank builds the model."""
    try:
        meta_model(config)
    except (ImportError, ValueError) as e:
        impl = getattr(config, "_attn_implementation", None)
        raise ConfigError(f"{what}.attn_implementation {impl!r} cannot run here: {str(e).splitlines()[0]} "
                          f"(install what it names, or choose sdpa)") from None


# ----------------------------------------------------------------------------- module trees
def instantiate(config, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The causal LM of ``config``, built in the caller's context (device, ``no_init_weights``,
    ``zero.Init``, a forked RNG): every way this package makes a model goes through here."""
    from transformers import AutoModelForCausalLM

    quiet_transformers()
    return AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trusted(config))


def compile_blocks(model: nn.Module, zero3: bool = False) -> nn.Module:
    """``train.compile_blocks``: each decoder block's forward through ``torch.compile``.  The block's own
    hooks (ZeRO-3's gathers, tap recorders, transformers' activation checkpointing) stay outside the
    compiled code.  Under ZeRO-3 (``zero3``; call before ``deepspeed.initialize``) the blocks become
    DeepSpeed leaf modules, so one hook gathers a whole block before its compiled forward instead of a
    hook per linear layer inside it.  Blocks without parameters (a pipeline stage's stand-ins for the
    other stages' blocks) stay as they are."""
    blocks = [block for block in decoder_layers(model) if any(True for _ in block.parameters())]
    if zero3:
        from deepspeed.utils import set_z3_leaf_modules

        set_z3_leaf_modules(model, [type(blocks[0])])
    for block in blocks:
        block.forward = torch.compile(block.forward)
    return model


def check_compile(on_gpu: bool) -> None:
    """``train.compile_blocks`` at start-up: torch.compile's inductor writes Triton kernels for a GPU and
    C++ for a CPU; a missing toolchain is one line here, not a failure at the first forward."""
    if on_gpu:
        from torch.utils._triton import has_triton

        if not has_triton():
            raise ConfigError("train.compile_blocks: torch.compile needs Triton on a GPU and this environment has "
                              "none (pip install triton), or turn train.compile_blocks off")
        return
    from torch._inductor.cpp_builder import get_cpp_compiler

    try:
        get_cpp_compiler()
    except Exception as e:  # inductor's own search: InvalidCxxCompiler and what a broken setting raises
        raise ConfigError(f"train.compile_blocks: torch.compile needs a C++ compiler on a CPU ({str(e).splitlines()[0]}"
                          "); install g++ or set CXX, or turn train.compile_blocks off") from None


def meta_model(config) -> nn.Module:
    """The model's module tree with no storage: cheap to build for any size."""
    with torch.device("meta"):
        return instantiate(config)


def model_from_config(config, seed: int) -> nn.Module:
    """A randomly initialised causal LM, built whole in fp32; the same seed gives the same weights on
    every rank."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return instantiate(config)
