"""``ted-ds cache-teacher``: one pass of the teacher over a run's windows, its top-k logits kept on disk.

    deepspeed --num_gpus 8 --module ted_ds cache-teacher --config run.yaml --out cache/ [k=v ...]

The teacher is placed as ``teacher.placement`` says (``engine.place_frozen``, the training code) and run
over every window of every source's train and valid splits with ``teacher.logits_topk`` and
``teacher.logits_dtype``; the format is ``ted_ds.cache.format``'s. Blocks of windows go round-robin to
the ranks; every rank runs the same number of teacher calls of the same shape (the ZeRO-3 and pipeline
placements are collective; short batches are padded), and a window's rows do not depend on who computed
it, so the bytes are the same for any rank count. Finished blocks are renamed into place whole; a re-run
of the same command keeps them and does the rest (a killed build leaves at most ``*.tmp`` files).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch

from data_prep.errors import UserError
from data_prep.fileio import write_text
from data_prep.format import SPLITS, file_sha256
from ted_ds import distributed
from ted_ds.cache.format import (
    BUILD_SPEC,
    MANIFEST,
    VALUE_DTYPES,
    ZSTD_LEVEL,
    block_name,
    encode_variable,
    encode_window,
    id_bits,
    identity,
    read_json,
    source_key,
    to_bits,
    write_block,
    write_manifest,
)
from ted_ds.config import RunConfig
from ted_ds.data import PackedShardDataset
from ted_ds.errors import ConfigError
from ted_ds.teacher import draw_seed, sampled_logits, support

PROGRESS_SECONDS = 10.0
MAX_ENTRIES = 0xFFFF  # a token's kept entries and an id's draws are stored as uint16 (format.encode_variable)


@dataclass(frozen=True)
class BlockPlan:
    """Windows ``[start, stop)`` of one split of one source: one file of the cache."""

    name: str
    split: PackedShardDataset  # the split's windows
    start: int
    stop: int
    source: str = ""  # the source's key (format.source_key)
    split_name: str = "train"


def plan_cache(cfg: RunConfig, out: str, block_windows: int):
    """Check the run for caching and what ``out`` holds; returns (plan, build spec, every block)."""
    from ted_ds.plan import plan

    t = cfg.teacher
    if t.logits_topk < 1 and t.logits_sampling != "sampled":
        raise ConfigError("cache-teacher keeps the teacher's top-k logits or samples: set teacher.logits_topk (e.g. "
                          "64), or teacher.logits_sampling: sampled")
    if t.logits_dtype not in VALUE_DTYPES:
        raise ConfigError(f"cache-teacher stores 16-bit logits: set teacher.logits_dtype to fp16 or bf16 (not "
                          f"{t.logits_dtype})")
    entries = t.logits_samples if t.logits_sampling == "sampled" else t.logits_topk
    if (t.logits_sampling == "sampled" or t.logits_top_p is not None) and entries > MAX_ENTRIES:
        raise ConfigError(f"cache-teacher counts a token's entries in 16 bits: at most {MAX_ENTRIES} top-p entries or "
                          f"samples per token, got {entries}")
    if block_windows < 1:
        raise UserError(f"--block-windows must be ≥ 1, got {block_windows}")
    as_kd = dataclasses.replace(cfg, teacher=dataclasses.replace(t, cache=None),
                                distill=dataclasses.replace(cfg.distill, method="kd", alpha=1.0))
    p = plan(as_kd)  # the run's checks; as KD, since the cache is the teacher's logits alone
    blocks, sources = [], {}
    for src, manifest in zip(cfg.data.blend, p.manifests):
        key, digest = source_key(src.path)
        if key in sources:
            continue
        splits = {}
        for split in SPLITS:
            has_window = manifest["totals"][split]["tokens"] > cfg.data.seq_len
            windows = PackedShardDataset(src.path, split, cfg.data.seq_len) if has_window else None
            n = len(windows) if windows is not None else 0
            splits[split] = {"windows": n, "blocks": math.ceil(n / block_windows)}
            blocks += [BlockPlan(block_name(key, split, b), windows, b * block_windows, min(n, (b + 1) * block_windows),
                             key, split) for b in range(splits[split]["blocks"])]
        sources[key] = {"name": src.name, "path": src.path, "manifest_sha256": digest, "splits": splits}
    spec = {**identity(cfg, p.cfg.teacher.path, p.manifest, t.logits_topk), "sources": sources,
            "id_bits": id_bits(p.manifest["vocab_size"]), "block_windows": block_windows, "compressor": "zstd",
            "zstd_level": ZSTD_LEVEL}
    _check_out(out, spec)
    return p, spec, blocks


def _check_out(out: str, spec: dict) -> None:
    """``out`` is new, or holds this very build (finished or not); anything else is refused."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"--out {out} is a file")
    for name in (MANIFEST, BUILD_SPEC):
        path = os.path.join(out, name)
        if os.path.isfile(path):
            held = {k: v for k, v in read_json(path, "teacher cache record").items() if k != "files"}
            if held != spec:
                differ = sorted(k for k in set(held) | set(spec) if held.get(k) != spec.get(k))
                raise UserError(f"--out {out} holds a teacher cache of another run ({', '.join(differ)} differ); "
                                "remove it or choose another directory")
            return
    if os.path.isdir(out) and os.listdir(out):
        raise UserError(f"--out {out} is a non-empty directory that holds no teacher cache")


def teacher_rows(teacher, block: BlockPlan | None, batch: int, calls: int, spec: dict) -> list[bytes]:
    """The frames of a block's windows, from ``calls`` teacher calls of exactly ``batch`` windows each (short
    ones padded with a repeated window; block None: this rank has none this round but joins every call)."""
    windows = range(block.start, block.stop) if block is not None else range(0)
    frames = []
    for c in range(calls):
        mine = windows[c * batch:(c + 1) * batch]
        rows = [block.split[w] for w in mine] or [np.zeros(spec["seq_len"] + 1, dtype=np.int64)]
        rows += [rows[-1]] * (batch - len(rows))
        out = teacher(torch.from_numpy(np.stack(rows))[:, :-1])  # (batch, L): a window's inputs
        if mine:  # a call this rank only joins writes nothing (and has no windows to draw for)
            frames += window_frames(out, [draw_seed(spec.get("sampling_seed"), block.source, block.split_name, w)
                                          for w in mine], spec)
    return frames


def window_frames(out, seeds: list[int], spec: dict) -> list[bytes]:
    """The frames of the first ``len(seeds)`` windows of a teacher call (``seeds``: their draws' seeds): top-k
    (format 2), or top-p and sampled (format 3, only the kept entries: ``encode_variable``)."""
    dtype, bits = VALUE_DTYPES[spec["value_dtype"]], spec["id_bits"]
    draws = kept = None
    if spec.get("samples"):
        values, index, draws = sampled_logits(out.logits[:len(seeds)], seeds, spec["samples"],
                                              spec["sampling_temperature"], dtype)
        kept, draws = (draws > 0).sum(-1).cpu().numpy(), draws.cpu().numpy()
    else:
        values, index = out.logits, out.topk_index
        if spec.get("top_p") is not None:
            kept = support(values, index).sum(-1).cpu().numpy()
    values, ids = to_bits(values, dtype), index.cpu().numpy()  # (batch, L, k [+ 1]), (batch, L, k)
    if kept is None:
        return [encode_window(values[r], ids[r], bits) for r in range(len(seeds))]
    return [encode_variable(values[r], ids[r], bits, kept[r], None if draws is None else draws[r])
            for r in range(len(seeds))]


def build_cache(cfg: RunConfig, out: str, batch: int | None = None, block_windows: int = 256) -> str:
    """The whole command: check, start the process group, run the teacher over the blocks left to do,
    write the manifest; returns the line to print."""
    from ted_ds.engine import place_frozen, resolve_ds_config
    from ted_ds.models import load_teacher

    p, spec, blocks = plan_cache(cfg, out, block_windows)
    batch, world = batch or cfg.train.micro_batch_size, distributed.expected_world_size()
    if batch < 1:
        raise UserError(f"--batch-size must be ≥ 1, got {batch}")
    one_call = dataclasses.replace(p.cfg.train, micro_batch_size=batch, global_batch_size=batch * world)
    ds = resolve_ds_config(dataclasses.replace(p.cfg, train=one_call), world)  # any rank count: no batch to split
    if os.path.isfile(os.path.join(out, MANIFEST)):
        return f"cache-teacher: {out} is complete already ({len(blocks)} blocks)"
    distributed.init(cfg.train.timeout_minutes)
    distributed.barrier()  # every rank has checked --out (plan_cache) before rank 0 writes into it
    rank = distributed.rank()
    if rank == 0:
        os.makedirs(out, exist_ok=True)
        write_text(os.path.join(out, BUILD_SPEC), json.dumps(spec, indent=1, sort_keys=True))
    distributed.barrier()
    todo = [b for b in blocks if not os.path.isfile(os.path.join(out, b.name))]
    distributed.barrier()  # every rank listed the same blocks before any is written
    teacher = None if not todo else place_frozen(p.cfg, functools.partial(load_teacher, p.cfg), [], None, True, ds,
                                                p.document_eos, p.manifest["vocab_size"])
    rounds = math.ceil(len(todo) / world)
    started, shown = time.perf_counter(), 0.0
    for r in range(rounds):
        mine = todo[r * world + rank] if r * world + rank < len(todo) else None
        calls = max(math.ceil((b.stop - b.start) / batch) for b in todo[r * world:(r + 1) * world])  # the round's
        frames = teacher_rows(teacher, mine, batch, calls, spec)
        if mine is not None:
            write_block(os.path.join(out, mine.name), frames)
        elapsed = time.perf_counter() - started
        if rank == 0 and cfg.train.progress and (elapsed - shown > PROGRESS_SECONDS or r == rounds - 1):
            shown = elapsed
            done = min(len(todo), (r + 1) * world)
            print(f"ted-ds: cache-teacher: {len(blocks) - len(todo) + done}/{len(blocks)} blocks, "
                  f"{done * block_windows * cfg.data.seq_len / elapsed:,.0f} tokens/s, "
                  f"{elapsed / (r + 1) * (rounds - r - 1):.0f} s left", file=sys.stderr, flush=True)
    distributed.barrier()
    files = hash_blocks(out, [b.name for b in blocks])
    if rank == 0:
        write_manifest(out, spec, files)
    distributed.barrier()
    return (f"cache-teacher: wrote {out} ({len(blocks)} blocks, {len(todo)} computed now, "
            f"{sum(f['bytes'] for f in files.values()):,} bytes)")


def hash_blocks(out: str, names: list[str]) -> dict[str, dict]:
    """Size and sha256 of every block file, each rank hashing its share."""
    rank, world = distributed.rank(), distributed.world_size()
    mine = {n: {"bytes": os.path.getsize(os.path.join(out, n)), "sha256": file_sha256(os.path.join(out, n))}
            for n in names[rank::world]}
    gathered = [mine]
    if world > 1:
        gathered = [None] * world
        torch.distributed.all_gather_object(gathered, mine)
    return {n: rec for part in gathered for n, rec in part.items()}
