"""Raw text → packed token shards, in parallel, resumable, byte-identical for any worker count.

The pipeline (one process reads and writes, ``workers`` processes do everything per document):

    reader: cut sources into chunks of raw lines/records, in order
    workers: decode (UTF-8 policy), parse JSON, drop empty documents, split each document by
             hash(seed, its bytes), tokenize            (results taken back in submission order)
    writer: cut shards by text bytes per split, write them

Shard boundaries depend only on the documents, never on timing or worker count, so the output is
the same bytes for any ``--workers``.  A re-run counts the documents of the finished shards without
tokenizing them (decode and hash only) and starts writing where they end.  Memory is bounded by
``2 × workers`` chunks in flight plus one shard's document-size list.
"""

from __future__ import annotations

import functools
import json
import multiprocessing as mp
import os
import shutil
import signal
import sys
import time
from collections import deque
from dataclasses import asdict, dataclass

import numpy as np

from data_prep.errors import UserError
from data_prep.fileio import atomically, write_text
from data_prep.format import BUILD_SPEC, FORMAT, MANIFEST, SPLITS, make_manifest, shard_name, shard_record, split_of
from data_prep.indexed import ShardWriter, token_dtype
from data_prep.sources import Chunk, ReadOptions, ReadStats, decode_chunk, iter_chunks, resolve_sources
from data_prep.tokenizer import BatchEncoder, load_tokenizer_for_build, tokenizer_identity


@dataclass
class BuildOptions:
    inputs: list[str]
    tokenizer: str
    out: str
    workers: int = 1
    valid_fraction: float = 0.01
    seed: int = 1234
    text_field: str = "text"
    blank_line_docs: bool = False
    strict: bool = False
    hf_split: str = "train"
    shard_mb: float = 256.0
    index_codes: str = "megatron"
    add_bos: bool = False
    overwrite: bool = False
    progress: bool = True

    def validate(self) -> None:
        if not 0.0 <= self.valid_fraction < 1.0:
            raise UserError(f"--valid-fraction must be in [0, 1), got {self.valid_fraction}")
        if self.workers < 1:
            raise UserError(f"--workers must be ≥ 1, got {self.workers}")
        if self.shard_mb <= 0:
            raise UserError(f"--shard-mb must be > 0, got {self.shard_mb}")
        if self.index_codes not in ("megatron", "deepspeed"):
            raise UserError(f"--index-codes must be megatron or deepspeed, not {self.index_codes!r}")


def _atomic_json(path: str, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True))


# ----------------------------------------------------------------------------- worker side
_ENCODER: BatchEncoder | None = None


@dataclass
class _Documents:
    """One chunk, decoded: per document its split (1 = valid) and UTF-8 size; tokens if asked."""

    split: np.ndarray
    nbytes: np.ndarray
    stats: ReadStats
    lengths: np.ndarray | None = None
    tokens: np.ndarray | None = None


def _process(chunk: Chunk, read: ReadOptions, seed: int, valid_fraction: float, tokenize: bool) -> _Documents:
    texts, raws, stats = decode_chunk(chunk, read)
    split = np.fromiter((split_of(r, seed, valid_fraction) == "valid" for r in raws), dtype=bool, count=len(raws))
    docs = _Documents(split, np.fromiter(map(len, raws), dtype=np.int64, count=len(raws)), stats)
    if tokenize and texts:
        docs.tokens, docs.lengths = _ENCODER(texts)
    return docs


def cut_shards(shard: int, used: int, nbytes: np.ndarray, limit: int) -> tuple[list[tuple[int, int, int]], int, int]:
    """Assign documents of one split to shards: a shard takes documents while its text stays within
    ``limit`` bytes (a document never splits; a shard holds at least one). Returns the (shard, start,
    end) runs over ``nbytes`` and the new (shard, used)."""
    runs, start = [], 0
    while start < len(nbytes):
        room = limit - used
        fits = int(np.searchsorted(np.cumsum(nbytes[start:]), room, side="right"))
        if fits == 0:
            if used == 0:
                fits = 1  # an oversized document gets a shard of its own
            else:
                shard, used = shard + 1, 0
                continue
        runs.append((shard, start, start + fits))
        used += int(nbytes[start:start + fits].sum())
        start += fits
    return runs, shard, used


class _ShardSink:
    """Receives tokenized chunks in order and turns them into finished shards, one split each."""

    def __init__(self, out: str, dtype, codes: str, done: dict, on_shard):
        self.out, self.dtype, self.codes = out, dtype, codes
        self.done = done  # split -> list of finished shard records (also resume state)
        self.on_shard = on_shard
        self.open: dict[str, tuple[int, ShardWriter]] = {}

    def add(self, split: str, shard: int, tokens: np.ndarray, lengths: np.ndarray) -> None:
        current = self.open.get(split)
        if current is not None and current[0] != shard:
            self._finish(split)
            current = None
        if current is None:
            writer = ShardWriter(os.path.join(self.out, shard_name(split, shard)), self.dtype, self.codes)
            self.open[split] = current = (shard, writer)
        current[1].add_documents(tokens, lengths)

    def _finish(self, split: str) -> None:
        shard, writer = self.open.pop(split)
        writer.finish()
        tokens = int(np.frombuffer(writer.sizes, dtype=np.int64).sum()) if writer.sizes else 0
        record = shard_record(self.out, shard_name(split, shard), len(writer.sizes), tokens)
        assert len(self.done[split]) == shard, "shards must finish in order"
        self.done[split].append(record)
        self.on_shard()

    def finish_all(self) -> None:
        for split in list(self.open):
            self._finish(split)

    def abort(self) -> None:
        for _, writer in self.open.values():
            writer.abort()
        self.open.clear()


def _spec(opts: BuildOptions, sources, tok_id: dict) -> dict:
    """Everything that determines the output bytes (worker count and progress do not)."""
    srcs = []
    for s in sources:
        st = os.stat(s.path)
        srcs.append({"path": os.path.abspath(s.path), "kind": s.kind, "compression": s.compression,
                     "bytes": st.st_size if os.path.isfile(s.path) else None, "mtime_ns": st.st_mtime_ns})
    return {
        "format": FORMAT,
        "sources": srcs,
        "tokenizer_vocab_sha256": tok_id["vocab_sha256"],
        "valid_fraction": opts.valid_fraction,
        "seed": opts.seed,
        "text_field": opts.text_field,
        "blank_line_docs": opts.blank_line_docs,
        "strict": opts.strict,
        "hf_split": opts.hf_split,
        "shard_bytes": int(opts.shard_mb * (1 << 20)),
        "index_codes": opts.index_codes,
        **({"add_bos": True} if opts.add_bos else {}),  # absent when off: builds from before it still resume
    }


def _check_out_dir(out: str, spec: dict, overwrite: bool) -> dict | None:
    """Return the resume state if ``out`` holds an unfinished build of this same spec."""
    spec_path = os.path.join(out, BUILD_SPEC)
    if not os.path.isdir(out) or not os.listdir(out):
        return None
    if not os.path.isfile(spec_path):
        raise UserError(f"output directory {out} is not empty and holds no ted-prep build; choose a new --out")
    with open(spec_path) as f:
        old = json.load(f)
    if old != spec:
        if overwrite:
            shutil.rmtree(out)
            return None
        diff = sorted(k for k in set(old) | set(spec) if old.get(k) != spec.get(k))
        raise UserError(
            f"output directory {out} holds a different dataset (differs in: {', '.join(diff)}); "
            "choose a new --out, or pass --overwrite to replace it"
        )
    state_path = os.path.join(out, ".build-state.json")
    if os.path.isfile(state_path):
        with open(state_path) as f:
            return json.load(f)
    return {"done": {s: [] for s in SPLITS}}


def _prepare_out_dir(out: str, spec: dict, tok) -> None:
    """Record the spec (what a re-run must match), drop an interrupted shard, save the tokenizer."""
    os.makedirs(out, exist_ok=True)
    _atomic_json(os.path.join(out, BUILD_SPEC), spec)
    for name in os.listdir(out):  # leftovers of an interrupted shard
        if name.endswith(".tmp"):
            os.remove(os.path.join(out, name))
    tok_dir = os.path.join(out, "tokenizer")
    if not os.path.isdir(tok_dir):
        with atomically(tok_dir) as tmp:
            tok.save_pretrained(tmp)


def build(opts: BuildOptions) -> dict:
    """Run (or finish) a build and return the manifest.

    A build that fails on bad input removes its output directory if this run created it, so
    nothing half-written is left; an interrupted build keeps its finished shards for the re-run.
    """
    opts.validate()
    sources = resolve_sources(opts.inputs)
    tok = load_tokenizer_for_build(opts.tokenizer)
    if opts.add_bos and tok.bos_token_id is None:
        raise UserError(f"--add-bos: tokenizer {opts.tokenizer} has no BOS token")
    tok_id = dict(tokenizer_identity(opts.tokenizer, tok), path=os.path.abspath(opts.tokenizer))
    dtype = token_dtype(tok_id["vocab_size"], opts.index_codes)
    spec = _spec(opts, sources, tok_id)
    manifest_path = os.path.join(opts.out, MANIFEST)

    state = _check_out_dir(opts.out, spec, opts.overwrite)
    if state is not None and os.path.isfile(manifest_path):
        print(f"ted-prep: {opts.out} is already complete; nothing to do", file=sys.stderr)
        with open(manifest_path) as f:
            return json.load(f)
    fresh = state is None
    state = state or {"done": {s: [] for s in SPLITS}}
    if any(state["done"][s] for s in SPLITS):
        print("ted-prep: resuming; finished shards kept: "
              + ", ".join(f"{s} {len(state['done'][s])}" for s in SPLITS), file=sys.stderr)
    _prepare_out_dir(opts.out, spec, tok)

    start = time.time()
    try:
        encoder = BatchEncoder(tok, dtype, opts.add_bos)
        stats = _tokenize_into_shards(opts, sources, encoder, spec["shard_bytes"], state)
    except UserError:
        if fresh:
            shutil.rmtree(opts.out, ignore_errors=True)
        raise
    except OSError as e:  # disk full, quota, I/O error: what is finished stays for the re-run
        kept = ", ".join(f"{s} {len(state['done'][s])}" for s in SPLITS)
        raise UserError(f"{opts.out}: cannot write ({e.strerror or e}); finished shards kept ({kept}): free "
                        "space and re-run the same command to resume") from None
    result = make_manifest(
        tok_id, np.dtype(dtype).name, opts.index_codes, opts.add_bos, opts.valid_fraction, opts.seed,
        sources=[dict(src, documents=stats.per_source.get(s.path, 0)) for src, s in zip(spec["sources"], sources)],
        shards=state["done"],
        stats={"documents": stats.documents, "empty_skipped": stats.empty_skipped,
               "utf8_replaced": stats.utf8_replaced},
        options={k: v for k, v in asdict(opts).items() if k not in ("progress", "workers", "out", "overwrite")})
    _atomic_json(manifest_path, result)
    state_path = os.path.join(opts.out, ".build-state.json")
    if os.path.exists(state_path):
        os.remove(state_path)
    _summary(result, time.time() - start)
    return result


def _tokenize_into_shards(opts: BuildOptions, sources, encoder: BatchEncoder, shard_bytes: int,
                          state: dict) -> ReadStats:
    """The streaming loop: read chunks, process them in the pool, cut shards and write, in order."""
    global _ENCODER
    _ENCODER = encoder  # inherited by the forked workers
    read = ReadOptions(opts.text_field, opts.blank_line_docs, opts.strict, opts.hf_split)
    state_path = os.path.join(opts.out, ".build-state.json")
    sink = _ShardSink(opts.out, encoder.dtype, opts.index_codes, state["done"],
                      lambda: _atomic_json(state_path, state))
    # documents already in finished shards, per split: counted again (decode + hash), never tokenized
    skip = {s: sum(r["documents"] for r in state["done"][s]) for s in SPLITS}
    seen = {s: 0 for s in SPLITS}
    cursor = {s: [len(state["done"][s]), 0] for s in SPLITS}  # split -> [shard, text bytes in it]
    stats = ReadStats()
    progress = _Progress(opts.progress)
    work = functools.partial(_process, read=read, seed=opts.seed, valid_fraction=opts.valid_fraction)

    def place(docs: _Documents) -> None:
        stats.add(docs.stats)
        for flag, split in ((False, "train"), (True, "valid")):
            index = np.flatnonzero(docs.split == flag)
            first = max(0, skip[split] - seen[split])  # documents of finished shards come first
            seen[split] += len(index)
            index = index[first:]
            if not len(index):
                continue
            runs, cursor[split][0], cursor[split][1] = cut_shards(*cursor[split], docs.nbytes[index], shard_bytes)
            for shard, a, b in runs:
                picked = np.zeros(len(docs.split), dtype=bool)
                picked[index[a:b]] = True
                tokens = docs.tokens[np.repeat(picked, docs.lengths)]
                sink.add(split, shard, tokens, docs.lengths[picked])
                progress.update(b - a, len(tokens))

    pool = mp.get_context("fork").Pool(opts.workers, _default_sigterm) if opts.workers > 1 else None
    resuming = any(skip.values())
    pending: deque = deque()
    try:
        for chunk in iter_chunks(sources, read):
            if resuming:  # count the finished shards' documents without tokenizing them
                if _in_finished_shards(work(chunk, tokenize=False), seen, skip, stats):
                    continue
                resuming = False  # from here on `place` drops whatever finished documents remain
            pending.append(pool.apply_async(work, (chunk,), {"tokenize": True}) if pool else work(chunk, tokenize=True))
            # in order: whatever is done at the head (so progress moves while reading), and never over 2 per worker
            while pending and (not pool or pending[0].ready() or len(pending) > 2 * opts.workers):
                place(pending.popleft().get() if pool else pending.popleft())
        while pending:
            place(pending.popleft().get() if pool else pending.popleft())
        if stats.documents == 0:
            raise UserError(f"no non-empty documents in the inputs ({stats.empty_skipped} empty skipped)")
        sink.finish_all()
    except BaseException:
        sink.abort()
        raise
    finally:
        if pool:
            pool.terminate()
        progress.close()
    return stats


def _default_sigterm() -> None:
    """Pool workers die on the SIGTERM of ``pool.terminate()`` even when forked from a process that handles
    SIGTERM itself (a training run's StopSignal in the same process), instead of hanging its join."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _in_finished_shards(counted: _Documents, seen: dict, skip: dict, stats: ReadStats) -> bool:
    """On resume: a chunk whose documents all belong to finished shards is only counted (per split),
    so the re-run never tokenizes them; False for the first chunk that reaches past them."""
    n = {s: int((counted.split == (s == "valid")).sum()) for s in SPLITS}
    if not all(seen[s] + n[s] <= skip[s] for s in SPLITS):
        return False
    stats.add(counted.stats)
    for s in SPLITS:
        seen[s] += n[s]
    return True


class _Progress:
    """Rank-free progress bar on stderr: documents done and tokens/s."""

    def __init__(self, enabled: bool):
        self.start = time.time()
        self.tokens = 0
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(unit=" doc", desc="tokenizing", file=sys.stderr, mininterval=1.0, smoothing=0.1,
                             leave=False)

    def update(self, docs: int, tokens: int) -> None:
        self.tokens += tokens
        if self.bar is not None:
            self.bar.update(docs)
            self.bar.set_postfix_str(f"{self.tokens / max(self.elapsed(), 1e-9) / 1e6:.2f}M tok/s", refresh=False)

    def elapsed(self) -> float:
        return time.time() - self.start

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _summary(manifest: dict, elapsed: float) -> None:
    t = manifest["totals"]
    st = manifest["stats"]
    lines = [
        f"ted-prep: built {len(manifest['shards']['train'])} train + {len(manifest['shards']['valid'])} valid shards "
        f"({manifest['dtype']}, {manifest['index_codes']} codes)",
        f"  train: {t['train']['documents']:,} docs, {t['train']['tokens']:,} tokens",
        f"  valid: {t['valid']['documents']:,} docs, {t['valid']['tokens']:,} tokens",
        f"  skipped empty documents: {st['empty_skipped']:,}; documents with invalid UTF-8 replaced: "
        f"{st['utf8_replaced']:,}",
        f"  time: {elapsed:.1f} s ({(t['train']['tokens'] + t['valid']['tokens']) / max(elapsed, 1e-9) / 1e6:.2f}M "
        "tokens/s)",
    ]
    print("\n".join(lines), file=sys.stderr)
