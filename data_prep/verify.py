"""Check a built dataset against its manifest, and show what is inside it."""

from __future__ import annotations

import os

from data_prep.format import SPLITS, file_sha256, read_manifest
from data_prep.indexed import IndexedShard, ShardError


def verify_dataset(data_dir: str, checksums: bool = True) -> dict:
    """Raise ``ShardError`` naming the first bad shard; return the manifest when all is well.

    ``checksums=False`` reads no token data (headers, indexes and sizes only): cheap enough for
    every training start; byte-level damage inside a ``.bin`` needs the full check."""
    manifest = read_manifest(data_dir)
    codes = manifest["index_codes"]
    for split in SPLITS:
        for rec in manifest["shards"][split]:
            prefix = os.path.join(data_dir, rec["name"])
            shard = IndexedShard(prefix, codes)
            if shard.dtype.name != manifest["dtype"]:
                raise ShardError(f"{prefix}.idx: dtype {shard.dtype.name}, manifest says {manifest['dtype']}")
            if len(shard) != rec["documents"] or shard.num_tokens != rec["tokens"]:
                raise ShardError(f"{prefix}: {len(shard)} docs / {shard.num_tokens} tokens, manifest says "
                                 f"{rec['documents']} / {rec['tokens']}")
            for ext in ("bin", "idx"):
                path = f"{prefix}.{ext}"
                if os.path.getsize(path) != rec[f"{ext}_bytes"]:
                    raise ShardError(f"{path}: size {os.path.getsize(path)}, manifest says {rec[ext + '_bytes']}")
                if checksums and file_sha256(path) != rec[f"{ext}_sha256"]:
                    raise ShardError(f"{path}: sha256 mismatch (corrupted)")
            if checksums and shard.num_tokens and int(shard.tokens.max()) >= manifest["vocab_size"]:
                raise ShardError(f"{prefix}.bin: token id ≥ vocab size {manifest['vocab_size']} (corrupted)")
    return manifest


def describe(data_dir: str, tokenizer_dir: str | None = None, samples: int = 1, chars: int = 400) -> str:
    """Counts per split and shard, plus the first documents decoded back to text."""
    from data_prep.tokenizer import load_tokenizer

    manifest = read_manifest(data_dir)
    lines = [f"dataset {data_dir}",
             f"  tokenizer: {manifest['tokenizer']['name']} ({manifest['tokenizer']['class']}, "
             f"vocab {manifest['vocab_size']:,}, vocab sha256 {manifest['tokenizer']['vocab_sha256'][:12]})",
             f"  dtype: {manifest['dtype']} ({manifest['index_codes']} index codes)",
             f"  split: valid_fraction={manifest['split']['valid_fraction']} seed={manifest['split']['seed']}"]
    for split in SPLITS:
        tot = manifest["totals"][split]
        lines.append(f"  {split}: {len(manifest['shards'][split])} shards, {tot['documents']:,} docs, "
                     f"{tot['tokens']:,} tokens")
    st = manifest["stats"]
    lines.append(f"  skipped empty: {st['empty_skipped']:,}; utf-8 replaced: {st['utf8_replaced']:,}")
    first = next((r for s in SPLITS for r in manifest["shards"][s]), None)
    if first is not None and samples > 0:
        tok = load_tokenizer(tokenizer_dir or os.path.join(data_dir, "tokenizer"))
        shard = IndexedShard(os.path.join(data_dir, first["name"]), manifest["index_codes"])
        for i in range(min(samples, len(shard))):
            ids = shard.document(i)
            text = tok.decode(ids.tolist())
            shown = text if len(text) <= chars else text[:chars] + " …"
            lines.append(f"  sample {first['name']}[{i}] ({len(ids)} tokens): {shown!r}")
    return "\n".join(lines)
