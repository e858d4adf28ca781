"""Find input files and stream their documents in one fixed, worker-independent order.

A *source* is one file (``.txt``, ``.jsonl``, ``.parquet``, each optionally ``.gz``/``.zst``)
or one Hugging Face ``datasets`` directory saved with ``save_to_disk``.

Reading is split in two so the expensive half runs in the tokenizer workers: the reader only cuts
each source into ``Chunk`` s of raw items (undecoded lines, or texts for parquet / datasets /
blank-line paragraphs) in file order; ``decode_chunk`` turns a chunk into documents — UTF-8
policy, JSON parsing, empty-document filtering — and names ``file:line`` in every error.
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
class Chunk:
    """Consecutive raw items of one source: ``lines`` (bytes, one document each), ``jsonl`` (bytes,
    one record each) or ``text`` (str documents). ``numbers`` are their 1-based line/row numbers."""

    source: int
    path: str
    kind: str
    numbers: list[int]
    items: list = field(default_factory=list)


@dataclass
class ReadStats:
    """Counters kept so that nothing is dropped silently."""

    documents: int = 0
    empty_skipped: int = 0
    utf8_replaced: int = 0  # documents that had invalid UTF-8 replaced by U+FFFD
    per_source: dict = field(default_factory=dict)

    def add(self, other: ReadStats) -> None:
        self.documents += other.documents
        self.empty_skipped += other.empty_skipped
        self.utf8_replaced += other.utf8_replaced
        for k, v in other.per_source.items():
            self.per_source[k] = self.per_source.get(k, 0) + v


@dataclass(frozen=True)
class ReadOptions:
    text_field: str = "text"
    blank_line_docs: bool = False
    strict: bool = False
    hf_split: str = "train"


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
            _check_one_format(raw, found)
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


def _check_one_format(raw: str, found: list[Source]) -> None:
    """A directory or glob holds one format: copies of a corpus in two formats (``.jsonl`` beside
    ``.parquet``) would count every document twice."""
    formats: dict[str, int] = {}
    for src in found:
        formats[src.kind] = formats.get(src.kind, 0) + 1
    if len(formats) > 1:
        listed = ", ".join(f"{n} .{fmt}" for fmt, n in sorted(formats.items()))
        raise UserError(f"{raw} mixes file formats ({listed}): copies of one corpus would be read twice; name the "
                        f"files of one format (e.g. '{os.path.join(raw, '*.' + min(formats))}' for a directory)")


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


def _binary_lines(src: Source) -> Iterator[bytes]:
    """The raw lines of a file (newline kept); a damaged archive is a clear error."""
    try:
        with _open_binary(src) as f:
            yield from f
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise UserError(f"{src.path}: compressed stream is damaged or truncated ({e})") from None
    except OSError as e:
        raise UserError(f"{src.path}: read failed ({e})") from None
    except Exception as e:  # zstandard raises its own ZstdError
        if type(e).__name__ == "ZstdError":
            raise UserError(f"{src.path}: compressed stream is damaged or truncated ({e})") from None
        raise


def _paragraphs(src: Source) -> Iterator[tuple[int, bytes]]:
    """Blank-line separated documents: (first line number, the paragraph's lines joined by newlines)."""
    para: list[bytes] = []
    start = 0
    for lineno, line in enumerate(_binary_lines(src), 1):
        line = line.rstrip(b"\r\n")
        if line.strip():
            if not para:
                start = lineno
            para.append(line)
        elif para:
            yield start, b"\n".join(para)
            para = []
    if para:
        yield start, b"\n".join(para)


def _parquet_texts(src: Source, text_field: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(src.path)
    except Exception as e:
        raise UserError(f"{src.path}: not a readable parquet file ({e})") from None
    if text_field not in pf.schema_arrow.names:
        raise UserError(f"{src.path}: no column {text_field!r} (columns: {', '.join(pf.schema_arrow.names)})")
    for batch in pf.iter_batches(columns=[text_field], batch_size=1024):
        yield from batch.column(0).to_pylist()


def _hf_texts(src: Source, text_field: str, hf_split: str) -> Iterator[str]:
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
    for batch in ds.select_columns([text_field]).iter(batch_size=1024):
        yield from batch[text_field]


def iter_chunks(sources: list[Source], opts: ReadOptions, max_items: int = 512,
                max_bytes: int = 2 << 20) -> Iterator[Chunk]:
    """Every source cut into chunks of raw items, in source order then file order."""
    for i, src in enumerate(sources):
        if src.kind == "txt" and opts.blank_line_docs:
            kind, numbered = "lines", _paragraphs(src)
        elif src.kind in ("txt", "jsonl"):
            kind, numbered = ("lines" if src.kind == "txt" else "jsonl"), enumerate(_binary_lines(src), 1)
        elif src.kind == "parquet":
            kind, numbered = "text", enumerate(_parquet_texts(src, opts.text_field), 1)
        else:
            kind, numbered = "text", enumerate(_hf_texts(src, opts.text_field, opts.hf_split), 1)
        chunk, size = Chunk(i, src.path, kind, []), 0
        for number, item in numbered:
            chunk.numbers.append(number)
            chunk.items.append(item)
            size += len(item) if item else 0
            if len(chunk.items) >= max_items or size >= max_bytes:
                yield chunk
                chunk, size = Chunk(i, src.path, kind, []), 0
        if chunk.items:
            yield chunk


def _decode(raw: bytes, where: str, strict: bool, stats: ReadStats) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        if strict:
            raise UserError(f"{where}: invalid UTF-8 at byte {e.start} of the document (--strict)") from None
        stats.utf8_replaced += 1
        return raw.decode("utf-8", errors="replace")


def decode_chunk(chunk: Chunk, opts: ReadOptions) -> tuple[list[str], list[bytes], ReadStats]:
    """The chunk's non-empty documents as texts and as UTF-8 bytes, with the counters."""
    stats = ReadStats()
    texts: list[str] = []
    raws: list[bytes] = []
    label = "row " if chunk.kind == "text" else ""
    for number, item in zip(chunk.numbers, chunk.items):
        where = f"{chunk.path}:{label}{number}"
        if chunk.kind == "lines":
            raw = item.rstrip(b"\r\n")
            text = _decode(raw, where, opts.strict, stats)
        elif chunk.kind == "jsonl":
            if not item.strip():
                continue
            text = _json_text(_decode(item, where, opts.strict, stats), where, opts.text_field)
            raw = None
        else:
            text, raw = item or "", None
        if not text.strip():
            stats.empty_skipped += 1
            continue
        if raw is None or "\ufffd" in text:
            raw = text.encode("utf-8", "surrogatepass")
        texts.append(text)
        raws.append(raw)
    stats.documents = len(texts)
    stats.per_source[chunk.path] = len(texts)
    return texts, raws, stats


def _json_text(line: str, where: str, text_field: str) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise UserError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(record, dict) or text_field not in record:
        raise UserError(f"{where}: record has no field {text_field!r} (choose one with --text-field)")
    text = record[text_field]
    if text is None:
        return ""
    if not isinstance(text, str):
        raise UserError(f"{where}: field {text_field!r} is {type(text).__name__}, not a string")
    return text


def iter_texts(sources: list[Source], opts: ReadOptions) -> Iterator[str]:
    """Every non-empty document's text, in order (for tokenizer training)."""
    for chunk in iter_chunks(sources, opts):
        yield from decode_chunk(chunk, opts)[0]
