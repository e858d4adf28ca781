"""Weights into exactly what a rank holds: read from safetensors, one tensor at a time, in the
dtype and on the device the rank computes with.

Three ways a model lives on a rank, one loader each:

* **dense** (``build_dense`` + ``fill_dense``): a whole copy (replicated teacher, single-process
  runs); storage is allocated uninitialised in the compute dtype on the device, then each tensor
  is read and copied in, so the peak is one copy plus one tensor.
* **partitioned** (``build_partitioned`` + ``fill_partitions``): built under DeepSpeed's
  ``zero.Init``, each parameter holding only this rank's flat 1/W slice (``ds_tensor``); the
  loader reads only the rows of the file that cover that slice.  No rank ever holds a whole model.
* **some modules** (``fill_modules``): pipeline stages and the task head give storage to a few
  submodules of a meta-device tree and read only their tensors.

``load_model`` is the entry point for the first two: a model directory (or some of a teacher's
blocks, ``load_teacher_blocks``) to a model on this rank.

A ``Rename`` maps a target parameter name to the name it has in the source files: identity for a
model's own directory, teacher block indices for ``student.init_from_teacher``.
``WeightReader.elements_read`` counts what was read, so tests can check that no rank reads more
than its share.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
from collections.abc import Callable

import torch
from torch import nn

from ted_ds.architectures import instantiate, layout, load_hf_config, meta_model, teacher_blocks_config
from ted_ds.errors import ConfigError, TrainingError

Rename = Callable[[str], str]


def identity(name: str) -> str:
    return name


def weight_files(path: str) -> list[str]:
    """The safetensors files of an HF directory (sharded or not)."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            return sorted({os.path.join(path, v) for v in json.load(f)["weight_map"].values()})
    single = os.path.join(path, "model.safetensors")
    if os.path.isfile(single):
        return [single]
    raise ConfigError(f"{path}: no safetensors weights (model.safetensors[.index.json]); re-save the model with "
                      "save_pretrained(safe_serialization=True)")


FINGERPRINT_BYTES = 4096  # read at each end of every tensor


def fingerprint(path: str) -> str:
    """A digest of an HF directory's weights that moving or copying the directory keeps, cheap at any size:
    every safetensors header (names, dtypes, shapes, offsets) and the first and last 4 KiB of every
    tensor, so other weights of the same shapes (another teacher, a fine-tune) change it."""
    digest = hashlib.sha256()
    for file in weight_files(path):
        with open(file, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            header = f.read(size)
            digest.update(header)
            for name, entry in sorted(json.loads(header).items()):
                if name != "__metadata__":
                    digest.update(_tensor_ends(f, 8 + size, *entry["data_offsets"]))
    return digest.hexdigest()[:16]


def _tensor_ends(f, data_start: int, start: int, end: int) -> bytes:
    """The first and last FINGERPRINT_BYTES of the tensor at bytes [start, end) of a file's data."""
    length = min(FINGERPRINT_BYTES, end - start)
    f.seek(data_start + start)
    head = f.read(length)
    f.seek(data_start + end - length)
    return head + f.read(length)


class WeightReader:
    """Random access to the tensors of an HF directory without loading any file whole.

    Each read maps its file only for that read: a mapping kept open would keep every page read so
    far resident in this process (file-backed RSS), doubling the memory of a load.
    """

    process_total = 0  # elements read by every reader of this process (what a rank materialised)

    def __init__(self, path: str):
        from safetensors import safe_open

        self.path = path
        self.elements_read = 0
        self._file: dict[str, str] = {}
        self._shape: dict[str, list[int]] = {}
        for file in weight_files(path):
            with safe_open(file, framework="pt") as f:
                for name in f.keys():
                    self._file[name] = file
                    self._shape[name] = list(f.get_slice(name).get_shape())

    def names(self) -> list[str]:
        return list(self._file)

    def __contains__(self, name: str) -> bool:
        return name in self._file

    def shape(self, name: str) -> list[int]:
        if name not in self._file:
            raise ConfigError(f"{self.path}: weights lack {name}")
        return self._shape[name]

    def _count(self, tensor: torch.Tensor) -> torch.Tensor:
        self.elements_read += tensor.numel()
        WeightReader.process_total += tensor.numel()
        return tensor

    def read(self, name: str) -> torch.Tensor:
        """One whole tensor, in the file's dtype."""
        from safetensors import safe_open

        self.shape(name)
        with safe_open(self._file[name], framework="pt") as f:
            return self._count(f.get_tensor(name))

    def read_flat(self, name: str, start: int, end: int) -> torch.Tensor:
        """Elements [start, end) of the flattened tensor, reading only the rows that cover them."""
        from safetensors import safe_open

        shape = self.shape(name)
        if not shape:  # a scalar
            return self.read(name).reshape(1)[start:end]
        row = math.prod(shape[1:])
        first, last = start // row, -(-end // row)
        with safe_open(self._file[name], framework="pt") as f:
            rows = self._count(f.get_slice(name)[first:last])
        offset = start - first * row
        return rows.reshape(-1)[offset:offset + end - start]


def _check_shape(reader: WeightReader, source: str, param: nn.Parameter | torch.Tensor, target: str) -> None:
    expected = list(getattr(param, "ds_shape", param.shape))
    found = reader.shape(source)
    if found != expected:
        raise ConfigError(f"{reader.path}: {source} has shape {found}, the model's {target} needs {expected}")


def _tied_source(model: nn.Module, name: str, reader: WeightReader, rename: Rename) -> str:
    """The source name of ``name``; a tied output head missing from the files reads the embedding."""
    source = rename(name)
    if source in reader:
        return source
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    if head is not None and name == _param_name(model, head.weight) and embed is not None:
        return rename(_param_name(model, embed.weight))
    return source


def _param_name(model: nn.Module, param: torch.Tensor) -> str:
    for name, p in model.named_parameters(remove_duplicate=False):
        if p is param:
            return name
    raise KeyError("parameter not in model")


def persistent_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    """Buffers that are saved with the model's weights (e.g. none for LLaMA; rotary tables are not)."""
    return {name: b for name, b in model.named_buffers() if name in model.state_dict()}


# ----------------------------------------------------------------------------- building
def no_init_weights():
    """transformers' switch that skips weight initialisation (its module moved in 5.x)."""
    try:
        from transformers.initialization import no_init_weights as skip
    except ImportError:
        from transformers.modeling_utils import no_init_weights as skip
    return skip()


def build_dense(config, dtype: torch.dtype, device: torch.device | str = "cpu") -> nn.Module:
    """The model with uninitialised storage in ``dtype`` on ``device`` (its weights are about to be
    read); computed buffers (rotary tables) are real."""
    with torch.device(device), no_init_weights():
        model = instantiate(config, dtype)
    model.tie_weights()  # skipped with the initialisation: a tied head would train (and load) on its own
    return model


def build_partitioned(config, dtype: torch.dtype, ds_config: dict) -> nn.Module:
    """The model under ZeRO-3's ``zero.Init``: every parameter is this rank's uninitialised slice
    from the moment it is created (one module is whole, briefly, while it is built)."""
    import deepspeed

    # Import everything the build needs first: zero.Init patches tensor construction, and modules
    # first imported under it (torch._dynamo, through transformers' modeling code) fail to load.
    with torch.device("meta"), no_init_weights():
        instantiate(config, dtype)
    with deepspeed.zero.Init(config_dict_or_path=precision_config(ds_config, dtype)), no_init_weights():
        model = instantiate(config, dtype)
    model.tie_weights()
    check_dtype(model, dtype, "the model built under zero.Init")
    return model


def precision_config(ds_config: dict, dtype: torch.dtype) -> dict:
    """``ds_config`` with its bf16/fp16 sections saying ``dtype``: what ``zero.Init`` builds in.

    ``zero.Init`` is given no ``dtype`` of its own on purpose: DeepSpeed 0.19 ignores an explicit one
    whenever the accelerator reports no fp16 support (every AMD CPU, Intel CPUs without AMX-FP16) and
    builds bf16 instead, while the config's precision is honoured on every machine."""
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ConfigError(f"ZeRO-3 builds models in fp32, bf16 or fp16, not {dtype}")
    out = dict(ds_config)
    out["bf16"] = {**ds_config.get("bf16", {}), "enabled": dtype == torch.bfloat16}
    out["fp16"] = {**ds_config.get("fp16", {}), "enabled": dtype == torch.float16}
    return out


def check_dtype(module: nn.Module, dtype: torch.dtype, what: str, trained_only: bool = False) -> None:
    """One line naming the first parameters of ``module`` not in ``dtype`` (their ZeRO-3 slices
    included): a mixed module would otherwise fail deep inside DeepSpeed, or compute in the wrong
    precision."""
    wrong = []
    for name, p in module.named_parameters():
        if trained_only and not p.requires_grad:
            continue
        found = {p.dtype, getattr(p, "ds_tensor", p).dtype}
        if found != {dtype}:
            wrong.append(f"{name} ({'/'.join(sorted(str(d).removeprefix('torch.') for d in found))})")
    if wrong:
        more = f" and {len(wrong) - 3} more" if len(wrong) > 3 else ""
        verb = "is" if len(wrong) == 1 else "are"
        raise TrainingError(f"{what} must be all {str(dtype).removeprefix('torch.')}, the run's compute dtype, "
                            f"but {', '.join(wrong[:3])}{more} {verb} not")


# ----------------------------------------------------------------------------- filling
@torch.no_grad()
def fill_dense(model: nn.Module, reader: WeightReader, rename: Rename = identity) -> None:
    """Copy every parameter and saved buffer of ``model`` from the files, one tensor at a time."""
    for name, tensor in [*model.named_parameters(), *persistent_buffers(model).items()]:
        source = _tied_source(model, name, reader, rename)
        _check_shape(reader, source, tensor, name)
        tensor.copy_(reader.read(source))


@torch.no_grad()
def fill_partitions(model: nn.Module, reader: WeightReader, rename: Rename = identity) -> None:
    """Copy into each ZeRO-3 parameter only this rank's flat slice, read as rows from the files."""
    import torch.distributed as dist

    for name, param in model.named_parameters():
        source = _tied_source(model, name, reader, rename)
        _check_shape(reader, source, param, name)
        part = param.ds_tensor
        size = part.ds_numel
        start = size * dist.get_rank(group=param.ds_process_group)
        end = min(start + size, param.ds_numel)
        if start < end:
            part.narrow(0, 0, end - start).copy_(reader.read_flat(source, start, end))
    for name, buf in persistent_buffers(model).items():
        buf.copy_(reader.read(rename(name)))


@contextlib.contextmanager
def _parameters_on_meta():
    """Modules built inside get meta-device parameters (no storage) but real buffers."""
    register = nn.Module.register_parameter

    def on_meta(module, name, param):
        if param is not None:
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def computed_buffers(config) -> dict[str, torch.Tensor]:
    """The non-persistent buffers a model computes when it is built (Gemma's embedding scale
    sqrt(d), rotary tables), real on the CPU, without storage for any parameter."""
    with _parameters_on_meta(), no_init_weights():
        model = instantiate(config)
    saved = model.state_dict()
    return {name: b for name, b in model.named_buffers() if name not in saved}


def fill_modules(model: nn.Module, modules: dict[str, nn.Module], reader: WeightReader, dtype: torch.dtype,
                 device: torch.device | str) -> None:
    """Give the named meta-device submodules real storage (``dtype`` on ``device``) and read their
    tensors; a tied output head reads the input embedding's tensor.  Buffers the model computes
    rather than saves (Gemma's embedding scale) are computed, not left uninitialised."""
    head = model.get_output_embeddings()
    computed = None
    for prefix, module in modules.items():
        module.to_empty(device=device)
        module.to(dtype)
        saved = module.state_dict()
        for key, buf in module.named_buffers():
            if key not in saved:
                computed = computed_buffers(model.config) if computed is None else computed
                buf.copy_(computed[f"{prefix}.{key}"])
        with torch.no_grad():
            for key, tensor in [*module.named_parameters(), *persistent_buffers(module).items()]:
                name = f"{prefix}.{key}"
                source = name
                if name not in reader and module is head and key == "weight":
                    source = _param_name(model, model.get_input_embeddings().weight)
                _check_shape(reader, source, tensor, name)
                tensor.copy_(reader.read(source))


def layer_rename(blocks_path: str, layers: list[int]) -> Rename:
    """Student block i is read from teacher block ``layers[i]``; everything else keeps its name."""
    prefix = blocks_path + "."

    def rename(name: str) -> str:
        if name.startswith(prefix):
            index, rest = name[len(prefix):].split(".", 1)
            return f"{prefix}{layers[int(index)]}.{rest}"
        return name

    return rename


# ----------------------------------------------------------------------------- loading
def load_model(path: str, trust_remote_code: bool = False, dtype: torch.dtype = torch.float32,
               device: torch.device | str = "cpu", zero_config: dict | None = None, config=None,
               rename: Rename = identity) -> nn.Module:
    """A causal LM with weights read from the safetensors of ``path``, straight into ``dtype`` on
    ``device`` — whole (``zero_config`` None) or as this rank's ZeRO-3 slices.  ``config`` and
    ``rename`` build another shape from the same files (a student from some teacher blocks)."""
    config = config if config is not None else load_hf_config(path, trust_remote_code)
    reader = WeightReader(path)
    if zero_config is not None:
        model = build_partitioned(config, dtype, zero_config)
        fill_partitions(model, reader, rename)
    else:
        model = build_dense(config, dtype, device)
        fill_dense(model, reader, rename)
    return model


def load_teacher_blocks(teacher_path: str, layers: list[int], trust_remote_code: bool = False, config=None,
                        **placement):
    """A student with the teacher's embeddings, head, final norm and the chosen blocks, in order,
    reading only those tensors from the teacher's files (built from ``config``: default, the teacher's
    config cut to those blocks)."""
    teacher_config = load_hf_config(teacher_path, trust_remote_code)
    blocks_path = layout(meta_model(teacher_config))[0]
    config = config if config is not None else teacher_blocks_config(teacher_config, layers)
    return load_model(teacher_path, config=config, rename=layer_rename(blocks_path, layers), **placement)
