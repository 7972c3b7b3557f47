"""Configuration checks of what fields point at, and the path helpers the data pipeline shares:
model and tokenizer folders or hub ids in the local HF cache, data files and their columns.
Config.validate() calls model_problems and data_problems (config.py holds the schema)."""
from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import TYPE_CHECKING

from raytune_llama.engine.hf_cache import ModelNotFoundError, looks_like_hub_id, resolve_pretrained

if TYPE_CHECKING:
    from raytune_llama.config import DataConfig, ModelConfig


def model_problems(m: "ModelConfig") -> list[str]:
    """The model and tokenizer paths: a folder with config.json, or a hub id in the local HF cache."""
    path = Path(m.name_or_path).expanduser()
    problems = []
    if path.exists():
        if not (path / "config.json").is_file() and m.random_init is None:
            problems.append(
                f"model.name_or_path: {m.name_or_path!r} has no config.json; point it at a "
                f"model directory saved with save_pretrained, or set model.random_init"
            )
    elif m.random_init is None and not looks_like_hub_id(m.name_or_path):
        problems.append(
            f"model.name_or_path: {m.name_or_path!r} does not exist; give a local model "
            f"directory, an HF hub id like 'meta-llama/Meta-Llama-3-8B', or set "
            f"model.random_init: tiny-llama to create one"
        )
    elif m.random_init is None:
        problems += _check_cached(m.name_or_path, "model.name_or_path")
    if m.tokenizer is not None:
        tok = Path(m.tokenizer).expanduser()
        if not tok.exists() and not looks_like_hub_id(m.tokenizer):
            problems.append(
                f"model.tokenizer: {m.tokenizer!r} does not exist; give a tokenizer "
                f"directory (with tokenizer.json) or an HF hub id"
            )
        elif not tok.exists():
            problems += _check_cached(m.tokenizer, "model.tokenizer")
    return problems


def _check_cached(hub_id: str, field: str) -> list[str]:
    """A hub id must already be in the local HF cache (it is never downloaded at run time)."""
    try:
        resolve_pretrained(hub_id, field)
    except ModelNotFoundError as exc:
        return [str(exc)]
    return []


def resolve_reader(path: str, reader: str) -> str:
    """How the data files are read (jsonl | parquet | hf), inferred from the path for 'auto'."""
    if reader != "auto":
        return reader
    p = Path(path)
    name = p.name.lower()
    if name.endswith((".jsonl", ".json", ".jsonl.gz")):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    if p.is_dir():
        names = [f.name.lower() for f in p.iterdir() if f.is_file()]
        if any(n.endswith(".parquet") for n in names):
            return "parquet"
        if any(n.endswith((".jsonl", ".json", ".jsonl.gz", ".json.gz")) for n in names):
            return "jsonl"
    return "hf" if looks_like_hub_id(path) else "unknown"


def data_problems(d: "DataConfig") -> list[str]:
    """The training and validation data: they exist, are readable, and hold the needed columns."""
    problems = _check_source(d, "path", d.path)
    if d.eval_path is not None:
        problems += _check_source(d, "eval_path", d.eval_path)
    return problems


def needed_columns(d) -> list[tuple[str, str]]:
    """(config field, column) of every column a row of data.format needs."""
    from raytune_llama.engine.data.sft import template_fields

    if d.row_format == "chat":
        return [("messages_column", d.messages_column)]
    if d.row_format == "instruction":
        try:
            fields = template_fields(d.prompt_template)
        except (ValueError, TypeError):
            fields = []  # reported by Config.validate
        return [("prompt_template", f) for f in fields] + [("response_column", d.response_column)]
    return [("text_column", d.text_column)]


def _check_source(d, key: str, path: str) -> list[str]:
    fmt = resolve_reader(path, d.file_reader)
    if fmt == "hf":
        return []
    p = Path(path).expanduser()
    if not p.exists():
        return [
            f"data.{key}: {path!r} does not exist; give a JSONL/Parquet file or folder "
            f"(relative paths are resolved from the current directory), or set data.reader: hf"
        ]
    if fmt == "unknown":
        return [f"data.reader: cannot tell how to read {path!r}; set data.reader to jsonl, parquet or hf"]
    columns = _first_columns(p, fmt)
    if columns is None:
        return [f"data.{key}: {path!r} holds no {fmt} records; point it at a non-empty dataset"]
    problems = []
    for field, col in needed_columns(d) + [("id_column", d.id_column)]:
        if col is not None and col not in columns:
            what = f"the column {{{col}}} of data.prompt_template" if field == "prompt_template" else f"data.{field}"
            problems.append(
                f"{what}: column {col!r} is not in {path!r} (columns: {sorted(columns)}); "
                f"set it to one of them" + (" or change data.format" if d.row_format == "text" and "messages"
                                            in columns else "")
            )
    return problems


def _first_columns(path: Path, fmt: str):
    files = sorted(f for f in path.rglob("*") if f.is_file()) if path.is_dir() else [path]
    for f in files:
        if fmt == "parquet" and f.suffix == ".parquet":
            import pyarrow.parquet as pq

            return set(pq.read_schema(f).names)
        if fmt == "jsonl" and f.name.lower().endswith((".jsonl", ".json", ".jsonl.gz", ".json.gz")):
            opener = gzip.open if f.suffix == ".gz" else open
            try:
                with opener(f, "rt", encoding="utf-8", errors="replace") as fh:
                    for line in fh:
                        if line.strip():
                            try:
                                return set(json.loads(line))
                            except (json.JSONDecodeError, TypeError):
                                return {"<not JSON lines>"}
            except OSError:  # unreadable: the build names it; look at the next file
                continue
    return None
