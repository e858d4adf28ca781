"""Find input files and stream their documents in one fixed, worker-independent order.

A *source* is one file (``.txt``, ``.jsonl``, ``.parquet``, each optionally ``.gz``/``.zst``)
or one Hugging Face ``datasets`` directory saved with ``save_to_disk``.  Documents come out
as ``Document(source, location, text)`` where ``location`` is a human-readable line/row
reference used in error messages.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import os
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field

from data_prep.errors import UserError

TEXT_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")
COMPRESSED_SUFFIXES = (".gz", ".zst")


@dataclass(frozen=True)
class Source:
    path: str
    kind: str  # "txt" | "jsonl" | "parquet" | "hf"
    compression: str = ""  # "" | "gz" | "zst"


@dataclass
class Document:
    source: int  # index into the resolved source list
    location: str  # "file:line" / "file:row", for messages
    text: str


@dataclass
class ReadStats:
    """Counters the reader keeps so that nothing is dropped silently."""

    documents: int = 0
    empty_skipped: int = 0
    utf8_replaced: int = 0  # documents that had invalid UTF-8 replaced by U+FFFD
    bytes_read: int = 0
    per_source: dict = field(default_factory=dict)


def _is_hf_dataset_dir(path: str) -> bool:
    names = set(os.listdir(path))
    return "dataset_info.json" in names or "dataset_dict.json" in names or "state.json" in names


def _classify(path: str) -> Source | None:
    name = path
    compression = ""
    for suffix in COMPRESSED_SUFFIXES:
        if name.endswith(suffix):
            compression, name = suffix[1:], name[: -len(suffix)]
    if name.endswith(".txt"):
        return Source(path, "txt", compression)
    if name.endswith((".jsonl", ".json")):
        return Source(path, "jsonl", compression)
    if name.endswith(".parquet"):
        if compression:
            raise UserError(f"{path}: compressed parquet is not supported (parquet compresses internally)")
        return Source(path, "parquet")
    return None


def resolve_sources(inputs: list[str]) -> list[Source]:
    """Expand files, directories and globs into a sorted, de-duplicated source list.

    Every named input must exist and be readable; a directory or glob must contain at least one
    supported file.  Errors name the offending input.
    """
    sources: list[Source] = []
    seen: set[str] = set()

    def add(src: Source) -> None:
        real = os.path.realpath(src.path)
        if real not in seen:
            seen.add(real)
            sources.append(src)

    for raw in inputs:
        if any(ch in raw for ch in "*?[") or (os.path.isdir(raw) and not _is_hf_dataset_dir(raw)):
            is_glob = not os.path.isdir(raw)
            paths = _glob_files(raw) if is_glob else _walk_files(raw)
            if is_glob and not paths:
                raise UserError(f"input glob matches no files: {raw}")
            found = [s for s in map(_classify, paths) if s]
            if not found:
                what = "input glob matches no" if is_glob else "input directory holds no"
                raise UserError(f"{what} supported files ({', '.join(TEXT_SUFFIXES)}): {raw}")
            for s in found:
                _check_readable(s.path)
                add(s)
        elif os.path.isdir(raw):
            add(Source(raw, "hf"))
        elif os.path.exists(raw):
            s = _classify(raw)
            if s is None:
                raise UserError(
                    f"unsupported input type: {raw} (expected {', '.join(TEXT_SUFFIXES)}, optionally .gz/.zst, "
                    "or a datasets directory)"
                )
            _check_readable(raw)
            add(s)
        else:
            raise UserError(f"input not found: {raw}")
    return sources


def _glob_files(pattern: str) -> list[str]:
    return [m for m in sorted(glob.glob(pattern, recursive=True)) if os.path.isfile(m)]


def _walk_files(directory: str) -> list[str]:
    out = []
    for root, dirs, files in os.walk(directory):
        dirs.sort()
        out += [os.path.join(root, name) for name in sorted(files)]
    return out


def _check_readable(path: str) -> None:
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as e:
        raise UserError(f"cannot read input {path}: {e.strerror}") from None


def _open_binary(src: Source):
    if src.compression == "gz":
        return gzip.open(src.path, "rb")
    if src.compression == "zst":
        try:
            import zstandard
        except ImportError:
            raise UserError(f"{src.path}: reading .zst needs the 'zstandard' package (pip install zstandard)") from None
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(src.path, "rb"), closefd=True))
    return open(src.path, "rb")


def _decode(raw: bytes, where: str, strict: bool, stats: ReadStats) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        if strict:
            raise UserError(f"{where}: invalid UTF-8 at byte {e.start} of the document (--strict)") from None
        stats.utf8_replaced += 1
        return raw.decode("utf-8", errors="replace")


def _binary_lines(src: Source) -> Iterator[tuple[int, bytes]]:
    """Yield (1-based line number, line without newline); a damaged archive is a clear error."""
    try:
        with _open_binary(src) as f:
            for lineno, line in enumerate(f, 1):
                yield lineno, line.rstrip(b"\r\n")
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise UserError(f"{src.path}: compressed stream is damaged or truncated ({e})") from None
    except OSError as e:
        raise UserError(f"{src.path}: read failed ({e})") from None
    except Exception as e:  # zstandard raises its own ZstdError
        if type(e).__name__ == "ZstdError":
            raise UserError(f"{src.path}: compressed stream is damaged or truncated ({e})") from None
        raise


def _txt_documents(src: Source, blank_line_docs: bool, strict: bool, stats: ReadStats):
    if not blank_line_docs:
        for lineno, line in _binary_lines(src):
            stats.bytes_read += len(line) + 1
            yield f"{src.path}:{lineno}", _decode(line, f"{src.path}:{lineno}", strict, stats)
        return
    para: list[bytes] = []
    start = 0
    for lineno, line in _binary_lines(src):
        stats.bytes_read += len(line) + 1
        if line.strip():
            if not para:
                start = lineno
            para.append(line)
        elif para:
            yield f"{src.path}:{start}", _decode(b"\n".join(para), f"{src.path}:{start}", strict, stats)
            para = []
    if para:
        yield f"{src.path}:{start}", _decode(b"\n".join(para), f"{src.path}:{start}", strict, stats)


def _jsonl_documents(src: Source, text_field: str, strict: bool, stats: ReadStats):
    for lineno, line in _binary_lines(src):
        stats.bytes_read += len(line) + 1
        where = f"{src.path}:{lineno}"
        if not line.strip():
            continue
        try:
            record = json.loads(_decode(line, where, strict, stats))
        except json.JSONDecodeError as e:
            raise UserError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(record, dict) or text_field not in record:
            raise UserError(f"{where}: record has no field {text_field!r} (choose one with --text-field)")
        text = record[text_field]
        if text is None:
            text = ""
        if not isinstance(text, str):
            raise UserError(f"{where}: field {text_field!r} is {type(text).__name__}, not a string")
        yield where, text


def _parquet_documents(src: Source, text_field: str, stats: ReadStats):
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(src.path)
    except Exception as e:
        raise UserError(f"{src.path}: not a readable parquet file ({e})") from None
    if text_field not in pf.schema_arrow.names:
        raise UserError(f"{src.path}: no column {text_field!r} (columns: {', '.join(pf.schema_arrow.names)})")
    row = 0
    for batch in pf.iter_batches(columns=[text_field], batch_size=1024):
        for text in batch.column(0).to_pylist():
            row += 1
            text = text or ""
            stats.bytes_read += len(text)
            yield f"{src.path}:row {row}", text


def _hf_documents(src: Source, text_field: str, hf_split: str, stats: ReadStats):
    import datasets

    try:
        ds = datasets.load_from_disk(src.path)
    except Exception as e:
        raise UserError(f"{src.path}: not a loadable datasets directory ({e})") from None
    if isinstance(ds, datasets.DatasetDict):
        if hf_split not in ds:
            raise UserError(f"{src.path}: no split {hf_split!r} (splits: {', '.join(ds)}); choose one with --hf-split")
        ds = ds[hf_split]
    if text_field not in ds.column_names:
        raise UserError(f"{src.path}: no column {text_field!r} (columns: {', '.join(ds.column_names)})")
    row = 0
    for batch in ds.select_columns([text_field]).iter(batch_size=1024):
        for text in batch[text_field]:
            row += 1
            text = text or ""
            stats.bytes_read += len(text)
            yield f"{src.path}:row {row}", text


def iter_documents(
    sources: list[Source],
    *,
    text_field: str = "text",
    blank_line_docs: bool = False,
    strict: bool = False,
    hf_split: str = "train",
    stats: ReadStats | None = None,
) -> Iterator[Document]:
    """Stream every non-empty document of every source, in source order then file order."""
    stats = stats if stats is not None else ReadStats()
    for i, src in enumerate(sources):
        if src.kind == "txt":
            it = _txt_documents(src, blank_line_docs, strict, stats)
        elif src.kind == "jsonl":
            it = _jsonl_documents(src, text_field, strict, stats)
        elif src.kind == "parquet":
            it = _parquet_documents(src, text_field, stats)
        else:
            it = _hf_documents(src, text_field, hf_split, stats)
        count = 0
        for where, text in it:
            if not text.strip():
                stats.empty_skipped += 1
                continue
            count += 1
            stats.documents += 1
            yield Document(i, where, text)
        stats.per_source[src.path] = count
