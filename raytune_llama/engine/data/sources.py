"""Split a corpus into chunks and read one chunk's documents, in a fixed order.

A chunk is a JSON-able descriptor of a bounded slice of the source (docs/data.md "Token
store"): a byte range of a JSONL file (lines that START inside the range), a run of Parquet
row groups, a row range of an HF dataset's Arrow cache file, or one shard of a streaming HF
dataset. The chunks depend on the files and `data.chunk_mb` alone, never on the cluster, so
every run over the same corpus sees the same chunks and the same documents in each. Listing
them reads file sizes and Parquet footers only: nothing here is proportional to the corpus.
"""
from __future__ import annotations

import gzip
import json
import logging
import os
from pathlib import Path
from typing import Iterator, Optional

log = logging.getLogger(__name__)

JSONL_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz")


class SourceError(ValueError):
    """A source that cannot be listed or read; the message names the file and the fix."""


def source_files(path: str, fmt: str) -> list[Path]:
    """The files of a JSONL or Parquet source (a file, or a folder read recursively), sorted."""
    p = Path(path)
    suffixes = JSONL_SUFFIXES if fmt == "jsonl" else (".parquet",)
    if p.is_file():
        return [p]
    if not p.is_dir():
        raise SourceError(f"data.path: {path!r} does not exist; give a {fmt} file or folder")
    return sorted(f for f in p.rglob("*") if f.is_file() and f.name.lower().endswith(suffixes))


def list_chunks(path: str, fmt: str, chunk_bytes: int, *, split: str = "train", streaming: bool = False,
                columns: tuple = ()) -> tuple[list[dict], dict]:
    """(chunk descriptors in corpus order, what identifies the source's content)."""
    if fmt == "jsonl":
        files = source_files(path, fmt)
        return [c for f in files for c in _jsonl_chunks(f, chunk_bytes)], {"files": _stats(files)}
    if fmt == "parquet":
        files = source_files(path, fmt)
        return [c for f in files for c in _parquet_chunks(f, chunk_bytes)], {"files": _stats(files)}
    if fmt == "hf":
        return _hf_stream_chunks(path, split, columns) if streaming else _hf_chunks(path, split, chunk_bytes, columns)
    raise SourceError(f"data.reader: cannot read {path!r} as {fmt!r}; set data.reader to jsonl, parquet or hf")


def _stats(files: list[Path]) -> list:
    out = []
    for f in files:
        st = f.stat()
        out.append([str(f), st.st_size, st.st_mtime_ns])
    return out


def _jsonl_chunks(f: Path, chunk_bytes: int) -> list[dict]:
    size = f.stat().st_size
    if size == 0:
        return []
    if f.name.lower().endswith(".gz"):  # no byte ranges inside a gzip stream: one chunk per file
        return [{"kind": "jsonl_gz", "file": str(f)}]
    return [{"kind": "jsonl", "file": str(f), "start": lo, "end": min(lo + chunk_bytes, size)}
            for lo in range(0, size, chunk_bytes)]


def _parquet_chunks(f: Path, chunk_bytes: int) -> list[dict]:
    import pyarrow.parquet as pq

    try:
        meta = pq.ParquetFile(f).metadata
    except Exception as exc:
        raise SourceError(f"data.path: {f} is not a readable Parquet file ({type(exc).__name__}: {exc}); "
                          f"remove or replace it") from exc
    chunks, start, acc = [], 0, 0
    for g in range(meta.num_row_groups):
        acc += meta.row_group(g).total_byte_size
        if acc >= chunk_bytes or g == meta.num_row_groups - 1:
            chunks.append({"kind": "parquet", "file": str(f), "row_groups": [start, g + 1]})
            start, acc = g + 1, 0
    return chunks


def _hf_dataset(path: str, split: str, streaming: bool):
    import datasets

    try:
        return datasets.load_dataset(path, split=split, streaming=streaming)
    except Exception as exc:
        raise SourceError(f"data.path: could not load the HF dataset {path!r} split {split!r} "
                          f"({type(exc).__name__}: {str(exc).strip().splitlines()[0][:300]}); a hub dataset must "
                          f"already be in the local HF cache, or give a local folder") from exc


def _check_columns(names, path: str, columns: tuple) -> None:
    for key, col in columns:
        if names and col is not None and col not in names:
            raise SourceError(f"data.{key}: column {col!r} is not in the HF dataset {path!r} "
                              f"(columns: {sorted(names)}); set data.{key} to one of them")


def _hf_chunks(path: str, split: str, chunk_bytes: int, columns: tuple) -> tuple[list[dict], dict]:
    """A local (map-style) HF dataset: row ranges of its memory-mapped Arrow cache files. The
    driver only opens the files' metadata; the rows are read by the tasks that tokenize them."""
    import datasets

    hf = _hf_dataset(path, split, streaming=False)
    _check_columns(hf.column_names, path, columns)
    if not hf.cache_files:
        raise SourceError(f"data.path: the HF dataset {path!r} is held in memory, not in Arrow cache files; "
                          f"save it with save_to_disk and point data.path at that folder")
    chunks = []
    for entry in hf.cache_files:
        f = entry["filename"]
        rows = datasets.Dataset.from_file(f).num_rows
        if rows == 0:
            continue
        per_chunk = max(1, int(chunk_bytes / max(os.path.getsize(f) / rows, 1)))
        chunks += [{"kind": "arrow", "file": f, "rows": [lo, min(lo + per_chunk, rows)]}
                   for lo in range(0, rows, per_chunk)]
    return chunks, {"hf": path, "split": split, "fingerprint": hf._fingerprint}


def _hf_stream_chunks(path: str, split: str, columns: tuple) -> tuple[list[dict], dict]:
    """A streaming HF dataset: one chunk per source shard (its files), read by one task each."""
    hf = _hf_dataset(path, split, streaming=True)
    _check_columns(list(hf.column_names or []), path, columns)
    shards = hf.num_shards
    content: dict = {"hf_stream": path, "split": split, "shards": shards}
    if Path(path).is_dir():  # a local folder: its files identify the content
        content["files"] = _stats(sorted(f for f in Path(path).rglob("*") if f.is_file()))
    return [{"kind": "hf_stream", "path": path, "split": split, "shard": i, "shards": shards}
            for i in range(shards)], content


def iter_chunk_documents(chunk: dict, text_column, id_column: Optional[str],
                         batch_size: int) -> Iterator[tuple[list, Optional[list]]]:
    """(texts, ids or None) in batches of up to batch_size documents, in source order. A text
    is whatever the row holds (str, bytes, None, anything): cleaning and counting are the
    caller's. With a tuple of columns (chat and instruction rows) each document is a dict
    {column: value} instead. An unreadable file raises SourceError naming it."""
    kind = chunk["kind"]
    try:
        if kind in ("jsonl", "jsonl_gz"):
            yield from _batches(_jsonl_rows(chunk, text_column, id_column), batch_size, id_column is not None)
        elif kind == "parquet":
            yield from _parquet_batches(chunk, text_column, id_column, batch_size)
        elif kind == "arrow":
            yield from _arrow_batches(chunk, text_column, id_column, batch_size)
        elif kind == "hf_stream":
            yield from _hf_stream_batches(chunk, text_column, id_column, batch_size)
        else:
            raise SourceError(f"unknown chunk kind {kind!r}")
    except (OSError, ValueError) as exc:
        if isinstance(exc, SourceError):
            raise
        where = chunk.get("file") or chunk.get("path")
        raise SourceError(f"data.path: could not read {where} ({type(exc).__name__}: "
                          f"{str(exc).strip()[:300]}); remove or replace the file") from exc


def _batches(rows: Iterator[tuple], batch_size: int, with_ids: bool):
    texts, ids = [], []
    for text, doc_id in rows:
        texts.append(text)
        ids.append(doc_id)
        if len(texts) == batch_size:
            yield texts, (ids if with_ids else None)
            texts, ids = [], []
    if texts:
        yield texts, (ids if with_ids else None)


def _jsonl_rows(chunk: dict, text_column: str, id_column: Optional[str]) -> Iterator[tuple]:
    """(text, id) of every line that starts in the chunk's byte range. A line that is not a
    JSON object gives text None (skipped and counted like an empty row) and a warning."""
    if chunk["kind"] == "jsonl_gz":
        lines = _gzip_lines(chunk["file"])
    else:
        lines = _range_lines(chunk["file"], chunk["start"], chunk["end"])
    bad = 0
    for line in lines:
        if not line.strip():
            continue
        try:
            row = json.loads(line.decode("utf-8", errors="replace"))
        except json.JSONDecodeError:
            row = None
        if not isinstance(row, dict):
            bad += 1
            yield None, None
            continue
        yield _pick(row, text_column), row.get(id_column) if id_column else None
    if bad:
        log.warning("%s: %d line(s) in bytes %s..%s are not JSON objects; skipped and counted", chunk["file"], bad,
                    chunk.get("start", 0), chunk.get("end", "end"))


def _pick(row: dict, columns):
    """The document of a row: one column's value, or {column: value} for a tuple of columns."""
    if isinstance(columns, tuple):
        return {c: row.get(c) for c in columns}
    return row.get(columns)


def _column_names(columns) -> list[str]:
    return list(columns) if isinstance(columns, tuple) else [columns]


def _field_of(columns) -> str:
    """The config field(s) that name these columns, for error messages."""
    if isinstance(columns, tuple):
        return "data.messages_column / data.prompt_template fields / data.response_column"
    return "data.text_column"


def _range_lines(path: str, start: int, end: int) -> Iterator[bytes]:
    """Lines whose first byte lies in [start, end): consecutive ranges cover every line once."""
    with open(path, "rb") as f:
        if start > 0:
            f.seek(start - 1)
            f.readline()  # the line holding byte start-1 belongs to the previous range
        pos = f.tell()
        while pos < end:
            line = f.readline()
            if not line:
                return
            pos += len(line)
            yield line


def _gzip_lines(path: str) -> Iterator[bytes]:
    with gzip.open(path, "rb") as f:
        yield from f


def _text_values(column) -> list:
    """A text column as Python values; strings go through bytes so that invalid UTF-8 is
    decoded with replacement characters later instead of failing here."""
    import pyarrow as pa

    if pa.types.is_string(column.type):
        column = column.cast(pa.binary())
    elif pa.types.is_large_string(column.type):
        column = column.cast(pa.large_binary())
    return column.to_pylist()


def _table_batches(batches, text_column, id_column: Optional[str]):
    for b in batches:
        names = b.schema.names
        for col in _column_names(text_column):
            if col not in names:
                raise SourceError(f"{_field_of(text_column)}: column {col!r} is not in the data (columns: "
                                  f"{sorted(names)}); set it to one of them")
        if isinstance(text_column, tuple):
            values = {c: b.column(names.index(c)).to_pylist() for c in text_column}
            texts = [dict(zip(values, row)) for row in zip(*values.values())]
        else:
            texts = _text_values(b.column(names.index(text_column)))
        ids = None
        if id_column:
            ids = b.column(names.index(id_column)).to_pylist() if id_column in names else [None] * len(texts)
        yield texts, ids


def _parquet_batches(chunk: dict, text_column: str, id_column: Optional[str], batch_size: int):
    import pyarrow.parquet as pq

    lo, hi = chunk["row_groups"]
    cols = _column_names(text_column) + ([id_column] if id_column else [])
    pf = pq.ParquetFile(chunk["file"])
    yield from _table_batches(pf.iter_batches(batch_size=batch_size, row_groups=list(range(lo, hi)), columns=cols),
                              text_column, id_column)


def _arrow_batches(chunk: dict, text_column: str, id_column: Optional[str], batch_size: int):
    import pyarrow as pa

    with pa.memory_map(chunk["file"]) as source:  # zero-copy: only the rows read are paged in
        table = pa.ipc.open_stream(source).read_all()
        lo, hi = chunk["rows"]
        part = table.slice(lo, hi - lo).select(_column_names(text_column) + ([id_column] if id_column else []))
        yield from _table_batches(part.to_batches(max_chunksize=batch_size), text_column, id_column)


def _hf_stream_batches(chunk: dict, text_column: str, id_column: Optional[str], batch_size: int):
    hf = _hf_dataset(chunk["path"], chunk["split"], streaming=True).shard(num_shards=chunk["shards"],
                                                                          index=chunk["shard"])
    for batch in hf.iter(batch_size=batch_size):
        missing = [c for c in _column_names(text_column) if c not in batch]
        if missing:
            raise SourceError(f"{_field_of(text_column)}: column {missing[0]!r} is not in the HF dataset "
                              f"{chunk['path']!r}; set it to one of {sorted(batch)}")
        if isinstance(text_column, tuple):
            texts = [dict(zip(text_column, row)) for row in zip(*(batch[c] for c in text_column))]
        else:
            texts = list(batch[text_column])
        yield texts, (list(batch.get(id_column, [None] * len(texts))) if id_column else None)
