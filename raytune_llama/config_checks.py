"""Every check `Config.validate()` runs. Each problem is one sentence naming the field, the
value and the fix; all are gathered so the user fixes everything in one go."""
from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from raytune_llama.config import FILE_READERS, ROW_FORMATS
from raytune_llama.engine.hf_cache import ModelNotFoundError, looks_like_hub_id, resolve_pretrained
from raytune_llama.engine.packing import PACKING_MODES
from raytune_llama.lora_settings import lora_problems
from raytune_llama.tracker_settings import tracker_problems
from raytune_llama.presets import known_presets

if TYPE_CHECKING:
    from raytune_llama.config import Config

ENUMS = {
    ("data", "format"): ROW_FORMATS + FILE_READERS,
    ("data", "reader"): FILE_READERS,
    ("data", "packing"): PACKING_MODES,
    ("checkpoint", "keep_best"): (None, "eval_loss"),
    ("parallel", "hardware"): ("auto", "cpu", "mi250", "mi250x", "mi300x", "h100", "h200", "a100-80gb"),
    ("parallel", "mixed_precision"): ("auto", "bf16", "none"),
    ("parallel", "master_weights"): ("fp32", "bf16"),
    ("checkpoint", "resume"): ("auto", "never", "must"),
    ("checkpoint", "format"): ("auto", "full", "sharded"),
}

# (section, key, predicate, requirement text)
RANGES: list[tuple[str, str, Callable[[float], bool], str]] = [
    ("train", "max_steps", lambda v: v >= 1, ">= 1"),
    ("train", "global_batch_size", lambda v: v >= 1, ">= 1"),
    ("train", "lr", lambda v: v > 0, "> 0"),
    ("train", "min_lr_ratio", lambda v: 0 <= v <= 1, "between 0 and 1"),
    ("train", "warmup_steps", lambda v: v >= 0, ">= 0"),
    ("train", "weight_decay", lambda v: v >= 0, ">= 0"),
    ("train", "max_grad_norm", lambda v: v >= 0, ">= 0 (0 disables clipping)"),
    ("train", "log_every", lambda v: v >= 1, ">= 1"),
    ("data", "seq_len", lambda v: v >= 2, ">= 2"),
    ("data", "tokenize_batch_size", lambda v: v >= 1, ">= 1"),
    ("data", "chunk_mb", lambda v: v > 0, "> 0 (megabytes of source text per chunk)"),
    ("data", "shuffle_seed", lambda v: v >= 0, ">= 0"),
    ("data", "shuffle_window", lambda v: v >= 1, ">= 1 chunk"),
    ("data", "eval_fraction", lambda v: 0 <= v < 1, "in [0, 1) (0: no held-out documents)"),
    ("train", "eval_every_steps", lambda v: v >= 0, ">= 0 (0: evaluate only at the end)"),
    ("parallel", "num_workers", lambda v: v >= 1, ">= 1"),
    ("parallel", "cpus_per_worker", lambda v: v > 0, "> 0"),
    ("parallel", "resize_check_s", lambda v: v >= 0, ">= 0 seconds"),
    ("checkpoint", "every_steps", lambda v: v >= 0, ">= 0 (0 = only at the end)"),
    ("checkpoint", "keep_last", lambda v: v >= 1, ">= 1"),
    ("run", "max_failures", lambda v: v >= 0, ">= 0"),
    ("run", "collective_timeout_s", lambda v: v >= 10, ">= 10 seconds"),
]

INT_FIELDS = {
    ("train", "max_steps"), ("train", "global_batch_size"),
    ("train", "warmup_steps"), ("train", "log_every"), ("data", "seq_len"),
    ("data", "tokenize_batch_size"), ("data", "shuffle_seed"), ("data", "shuffle_window"),
    ("train", "eval_every_steps"),
    ("parallel", "num_workers"),
    ("checkpoint", "every_steps"), ("checkpoint", "keep_last"), ("run", "max_failures"), ("run", "collective_timeout_s"),
}


def collect_problems(cfg: "Config", check_files: bool = True) -> list[str]:
    """Return every problem found in cfg (empty when valid)."""
    problems: list[str] = []
    problems += _check_types_and_ranges(cfg)
    if check_files:
        problems += _check_model(cfg)
        problems += _check_data(cfg)
    low, high = cfg.parallel.min_workers, cfg.parallel.num_workers
    if low is not None and (isinstance(low, bool) or not isinstance(low, int) or low < 1 or
                            (isinstance(high, int) and low > high)):
        problems.append(f"parallel.min_workers: {low!r} must be a whole number between 1 and "
                        f"parallel.num_workers ({high}), or null for a fixed-size run")
    layout = cfg.parallel.layout
    if layout is not None and (not isinstance(layout, str) or ("=" not in layout and layout.strip() != "measured")):
        problems.append(f"parallel.layout: {layout!r} must be like \"dp_shard=2,zero_stage=3\", \"measured\" (the "
                        f"layout `raytune-llama tune-layout` measured fastest for this run) or null to let the "
                        f"planner choose")
    elif layout is not None and cfg.parallel.master_weights == "bf16" and "backend=deepspeed" in layout.replace(" ", ""):
        problems.append(f"parallel.master_weights: 'bf16' with parallel.layout {layout!r}: DeepSpeed's bf16 mode "
                        f"always keeps fp32 master weights; use master_weights: fp32, or a torch layout")
    problems += _check_sft_and_eval(cfg)
    problems += lora_problems(cfg.train.lora)
    problems += tracker_problems(cfg.run.trackers)
    for key in ("shuffle", "hf_streaming"):
        if not isinstance(getattr(cfg.data, key), bool):
            problems.append(f"data.{key}: {getattr(cfg.data, key)!r} must be true or false")
    if not isinstance(cfg.checkpoint.save_at_end, bool):
        problems.append(f"checkpoint.save_at_end: {cfg.checkpoint.save_at_end!r} must be true or false")
    async_save = cfg.checkpoint.async_save
    if not isinstance(async_save, bool):
        problems.append(f"checkpoint.async_save: {async_save!r} must be true or false")
    elif async_save and cfg.checkpoint.format == "full":
        problems.append("checkpoint.async_save: true needs checkpoint.format sharded (or auto with a sharded "
                        "layout); format 'full' gathers the model to rank 0 and saves synchronously")
    if not str(cfg.run.name).strip() or "/" in str(cfg.run.name):
        problems.append(f"run.name: {cfg.run.name!r} must be a non-empty name without '/'")
    return problems


def _check_sft_and_eval(cfg: "Config") -> list[str]:
    d, t = cfg.data, cfg.train
    problems = []
    if not isinstance(d.train_on_prompt, bool):
        problems.append(f"data.train_on_prompt: {d.train_on_prompt!r} must be true or false")
    if d.row_format == "instruction":
        from raytune_llama.engine.data.sft import template_fields

        try:
            fields = template_fields(d.prompt_template)
        except (ValueError, TypeError) as exc:
            problems.append(f"data.prompt_template: {d.prompt_template!r:.80} is not a valid template ({exc}); "
                            f"write columns as {{column}} and a literal brace as {{{{ or }}}}")
        else:
            if not fields:
                problems.append(f"data.prompt_template: {d.prompt_template!r:.80} names no {{column}}; put the "
                                f"instruction column in it, e.g. '### Instruction:\\n{{instruction}}\\n\\n### Response:\\n'")
    if d.eval_path is not None and d.eval_fraction:
        problems.append(f"data.eval_fraction: {d.eval_fraction!r} together with data.eval_path {d.eval_path!r}; "
                        f"use one source of validation data (set eval_fraction: 0 or eval_path: null)")
    has_eval = d.eval_path is not None or bool(d.eval_fraction)
    mb = t.eval_max_batches
    if mb is not None and (isinstance(mb, bool) or not isinstance(mb, int) or mb < 1):
        problems.append(f"train.eval_max_batches: {mb!r} must be a whole number >= 1, or null for the whole "
                        f"validation set")
    if cfg.checkpoint.keep_best == "eval_loss" and not has_eval:
        problems.append("checkpoint.keep_best: 'eval_loss' needs validation data; set data.eval_path or "
                        "data.eval_fraction (e.g. 0.02)")
    if t.eval_every_steps and not has_eval and isinstance(t.eval_every_steps, int):
        problems.append(f"train.eval_every_steps: {t.eval_every_steps!r} without validation data; set "
                        f"data.eval_path or data.eval_fraction (e.g. 0.02)")
    return problems


def _check_types_and_ranges(cfg: "Config") -> list[str]:
    problems = []
    for (section, key), allowed in ENUMS.items():
        value = getattr(getattr(cfg, section), key)
        if value not in allowed:
            problems.append(f"{section}.{key}: {value!r} is not one of {list(allowed)}")
    for section, key, ok, requirement in RANGES:
        value = getattr(getattr(cfg, section), key)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            problems.append(f"{section}.{key}: expected a number, got {value!r}")
        elif (section, key) in INT_FIELDS and not isinstance(value, int):
            problems.append(f"{section}.{key}: expected a whole number, got {value!r}")
        elif not ok(value):
            problems.append(f"{section}.{key}: {value!r} must be {requirement}")
    stop = cfg.train.stop_after_steps
    if stop is not None and (isinstance(stop, bool) or not isinstance(stop, int) or stop < 1):
        problems.append(f"train.stop_after_steps: {stop!r} must be a whole number >= 1, or null to run to max_steps")
    problems += _check_step_timeout(cfg)
    betas = cfg.train.betas
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2 and all(0 <= b < 1 for b in betas)):
        problems.append(f"train.betas: {betas!r} must be two numbers in [0, 1), e.g. [0.9, 0.95]")
    return problems


def _check_step_timeout(cfg: "Config") -> list[str]:
    value, first = cfg.run.step_timeout_s, cfg.run.collective_timeout_s
    if value is None:
        return []
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 1:
        return [f"run.step_timeout_s: {value!r} must be a number of seconds >= 1, or null to tighten "
                f"the step bound automatically after the first step"]
    if isinstance(first, (int, float)) and not isinstance(first, bool) and value > first:
        return [f"run.step_timeout_s: {value!r} must be <= run.collective_timeout_s ({first!r}), the bound "
                f"of the first step that later steps only tighten; lower it or raise run.collective_timeout_s"]
    return []


def _check_model(cfg: "Config") -> list[str]:
    m = cfg.model
    path = Path(m.name_or_path).expanduser()
    problems = []
    if m.random_init is not None and m.random_init not in known_presets():
        problems.append(
            f"model.random_init: unknown preset {m.random_init!r}; known presets are "
            f"{known_presets()} (or null to load an existing model)"
        )
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


def _check_data(cfg: "Config") -> list[str]:
    d = cfg.data
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
            fields = []  # reported by _check_sft_and_eval
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
