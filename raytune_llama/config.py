"""Run configuration: dataclass sections loaded from YAML, dotted `--set` overrides, and a
`validate()` that gathers every problem into one `ConfigError` before any worker starts.

The schema is the dataclasses: a field's type says what it holds (int: a whole number, float:
a number, bool: true/false, Optional: or null) and its metadata the allowed values (`one_of`)
or range (`within`, `optional`); `validate()` checks every field from them, then the rules that
tie fields together. Checks of files and hub ids are in config_paths.py.

    cfg = load_config("examples/configs/tiny_cpu.yaml", overrides=["train.max_steps=20"])
    cfg.validate()
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Optional

import yaml


class ConfigError(ValueError):
    """One or more configuration problems; each names the field, the value and a fix."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{len(self.problems)} configuration problem(s):\n{lines}")

    def __reduce__(self):  # pickled across Ray (a Tune trial's error) with its problems intact
        return type(self), (self.problems,)


def one_of(default: Any, choices: "tuple | Callable[[], tuple]") -> Any:
    """A field whose value must be one of `choices` (a callable: computed when validating)."""
    return field(default=default, metadata={"choices": choices})


def within(default: Any, ok: Callable[[Any], bool], requirement: str) -> Any:
    """A number field whose value must satisfy `ok`; `requirement` says how, e.g. '>= 1'."""
    return field(default=default, metadata={"ok": ok, "requirement": requirement})


def optional(ok: Callable[[Any], bool], requirement: str, null_means: str) -> Any:
    """An Optional number field, None by default: a value must satisfy `ok` (requirement: e.g.
    'a whole number >= 1'), null means `null_means` (e.g. 'to run to max_steps')."""
    return field(default=None, metadata={"ok": ok, "requirement": requirement, "null_means": null_means})


def _hardware_names() -> tuple:
    from raytune_llama.planner.hardware import builtin_names

    return ("auto", *builtin_names())


def _packing_modes() -> tuple:
    from raytune_llama.engine.packing import PACKING_MODES

    return PACKING_MODES


@dataclass
class ModelConfig:
    name_or_path: str = "runs/models/tiny-llama"
    """HF hub name or local directory with config.json + safetensors."""
    random_init: Optional[str] = None
    """Preset (e.g. 'tiny-llama') to create with random weights at name_or_path when that
    directory has no config.json yet; None to require an existing model."""
    tokenizer: Optional[str] = None
    """Tokenizer directory or hub name; defaults to name_or_path."""
    seed: int = 0
    """Seed for random initialisation."""


DEFAULT_PROMPT_TEMPLATE = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")

FILE_READERS = ("auto", "jsonl", "parquet", "hf")
ROW_FORMATS = ("text", "chat", "instruction")


@dataclass
class DataConfig:
    path: str = "examples/data/tiny_corpus.jsonl"
    """JSONL / Parquet file or directory, or an HF dataset name when format == 'hf'."""
    format: str = one_of("text", ROW_FORMATS + FILE_READERS)
    """What a row is: text (one document in data.text_column) | chat (a conversation in
    data.messages_column, rendered with the tokenizer's chat template) | instruction (prompt
    columns filled into data.prompt_template, the answer in data.response_column). The older
    values auto | jsonl | parquet | hf still mean text, read that way (docs/data.md "Supervised
    fine-tuning data")."""
    reader: str = one_of("auto", FILE_READERS)
    """How the files are read: auto (from the file ending) | jsonl | parquet | hf."""
    hf_split: str = "train"
    """Split to read when format == 'hf'."""
    text_column: str = "text"
    """Column holding the raw document text."""
    id_column: Optional[str] = None
    """Optional column of unique document ids, carried through packing."""
    seq_len: int = within(128, lambda v: v >= 2, ">= 2")
    """Tokens per packed training sequence."""
    tokenize_batch_size: int = within(512, lambda v: v >= 1, ">= 1")
    """Documents per tokenizer call inside a store build task (bounds the task's memory)."""
    chunk_mb: float = within(4.0, lambda v: v > 0, "> 0 (megabytes of source text per chunk)")
    """Source bytes per token-store chunk: the unit of tokenization, of shuffling, and of the
    wait before the first step (docs/data.md "Token store")."""
    shuffle: bool = True
    """Seeded per-epoch shuffle: of the chunks, and of the rows within each window of chunks."""
    shuffle_window: int = within(16, lambda v: v >= 1, ">= 1 chunk")
    """Chunks whose rows are shuffled together (a global batch mixes rows of that many chunks
    from anywhere in the corpus); also how many chunks must be tokenized before the first step."""
    shuffle_seed: int = within(0, lambda v: v >= 0, ">= 0")
    """Seed of the data order (the same order at every world size and cluster shape)."""
    store_dir: Optional[str] = None
    """Where packed token stores live; default {run.storage_path}/token_store (a filesystem
    every node can read, as run.storage_path is)."""
    hf_streaming: bool = False
    """format hf: read the dataset as a streaming IterableDataset, one chunk per source shard."""
    messages_column: str = "messages"
    """format chat: the column of role/content message lists."""
    chat_template: Optional[str] = None
    """format chat: a Jinja chat template used instead of the tokenizer's own (needed when the
    tokenizer has none)."""
    prompt_template: str = DEFAULT_PROMPT_TEMPLATE
    """format instruction: the prompt, with {column} fields filled from the row; a paragraph
    (text between blank lines) whose fields are all empty is left out (Alpaca's `input`)."""
    response_column: str = "output"
    """format instruction: the column holding the answer."""
    train_on_prompt: bool = False
    """chat / instruction: also train on the prompt tokens (default: loss on the answers only)."""
    packing: str = one_of("documents", _packing_modes)
    """documents (rows hold whole documents, position ids restart and attention stays inside
    each document) | naive (documents joined with EOS and cut every seq_len tokens, attention
    across them) | none (one document per row, padded). A document longer than seq_len is
    split into rows in every mode (docs/data.md "Packing")."""
    eval_path: Optional[str] = None
    """Validation data, read like data.path (same format and columns)."""
    eval_fraction: float = within(0.0, lambda v: 0 <= v < 1, "in [0, 1) (0: no held-out documents)")
    """Without eval_path: this fraction of the documents (chosen by a hash of their position,
    the same on every run) is held out of training for validation."""


    @property
    def row_format(self) -> str:
        """text | chat | instruction (the legacy file-kind values of `format` mean text)."""
        return self.format if self.format in ROW_FORMATS else "text"

    @property
    def file_reader(self) -> str:
        """auto | jsonl | parquet | hf: `reader`, or `format` when it names a file kind."""
        return self.format if self.format in FILE_READERS else self.reader


@dataclass
class TrainConfig:
    max_steps: int = within(60, lambda v: v >= 1, ">= 1")
    """Optimizer steps of the whole run (the LR schedule spans these)."""
    stop_after_steps: Optional[int] = optional(lambda v: v >= 1, "a whole number >= 1", "to run to max_steps")
    """Stop this invocation after N more steps (checkpointed; rerun to continue)."""
    global_batch_size: int = within(8, lambda v: v >= 1, ">= 1")
    """Sequences per optimizer step, over all workers (kept fixed at every world size); the
    layout splits it into data-parallel ranks x micro-batches x accumulation steps."""
    lr: float = within(1e-3, lambda v: v > 0, "> 0")
    """Peak learning rate (AdamW)."""
    min_lr_ratio: float = within(0.1, lambda v: 0 <= v <= 1, "between 0 and 1")
    """Cosine decay floor as a fraction of lr."""
    warmup_steps: int = within(5, lambda v: v >= 0, ">= 0")
    """Linear warm-up steps."""
    weight_decay: float = within(0.01, lambda v: v >= 0, ">= 0")
    """AdamW weight decay."""
    betas: tuple = (0.9, 0.95)
    """AdamW betas."""
    max_grad_norm: float = within(1.0, lambda v: v >= 0, ">= 0 (0 disables clipping)")
    """Gradient clipping norm (0 disables)."""
    log_every: int = within(5, lambda v: v >= 1, ">= 1")
    """Report metrics to Ray Train every N steps (progress is shown every step)."""
    seed: int = 0
    """Seed for the training process (data order is fixed by the pipeline)."""
    eval_every_steps: int = within(0, lambda v: v >= 0, ">= 0 (0: evaluate only at the end)")
    """With validation data (data.eval_path or data.eval_fraction): evaluate every N steps and
    at the end (0: only at the end)."""
    eval_max_batches: Optional[int] = optional(lambda v: v >= 1, "a whole number >= 1", "for the whole validation set")
    """Global batches per evaluation (None: the whole validation set)."""
    lora: Optional[dict] = None
    """LoRA fine-tuning with peft: {r, alpha, dropout, target_modules}; the base weights are
    frozen, only the adapters train (docs/lora.md)."""


@dataclass
class ParallelConfig:
    num_workers: int = within(2, lambda v: v >= 1, ">= 1")
    """Ray Train workers (one per device); the most an elastic run uses."""
    min_workers: Optional[int] = None
    """Elastic runs: the fewest workers to go on with (None = fixed size). At every size the
    layout is re-planned, the global batch is kept, and training resumes from the checkpoint."""
    resize_check_s: float = within(60.0, lambda v: v >= 0, ">= 0 seconds")
    """Elastic runs: while training, how often Ray Train looks for room to grow back towards
    num_workers (ScalingConfig.elastic_resize_monitor_interval_s); a grow restarts the worker
    group from the latest checkpoint, so it costs up to one checkpoint interval of steps."""
    use_gpu: bool = False
    """Give each worker one GPU (ROCm or CUDA); CPU/gloo otherwise."""
    cpus_per_worker: float = within(1.0, lambda v: v > 0, "> 0")
    """CPUs reserved per training worker."""
    layout: Optional[str] = None
    """Parallel layout, e.g. "dp_shard=2,zero_stage=3" or "tp=2,micro_batch_size=2"; None lets
    the planner choose the fastest layout that fits (see `raytune-llama plan`)."""
    hardware: str = one_of("auto", _hardware_names)
    """Planner hardware profile of the workers' devices (auto: cpu without GPUs, else from Ray)."""
    mixed_precision: str = one_of("auto", ("auto", "bf16", "none"))
    """Compute dtype: auto (bf16 on accelerators, fp32 on CPU) | bf16 | none (fp32)."""
    master_weights: str = one_of("fp32", ("fp32", "bf16"))
    """Dtype of the trained weights and the AdamW moments, whatever the checkpoint's dtype:
    fp32 (default: fp32 masters and optimizer state, bf16 compute per mixed_precision; 16
    bytes/param before sharding) | bf16 (pure bf16 weights, gradients and moments: 8
    bytes/param, but updates smaller than bf16's resolution round away, so low learning rates
    stall; see docs/parallel_engine.md)."""


@dataclass
class CheckpointConfig:
    every_steps: int = within(20, lambda v: v >= 0, ">= 0 (0 = only at the end)")
    """Save a checkpoint every N steps (and at the end); 0 saves only at the end."""
    keep_last: int = within(2, lambda v: v >= 1, ">= 1")
    """Checkpoints kept by Ray Train."""
    resume: str = one_of("auto", ("auto", "never", "must"))
    """auto (resume if this run has a checkpoint) | never | must (error if none)."""
    format: str = one_of("auto", ("auto", "full", "sharded"))
    """auto (sharded when the layout shards the model: FSDP/ZeRO, TP or PP on the torch
    backend; else full) | full (rank 0 writes the gathered whole model: small models) |
    sharded (every rank writes only its own shards with torch.distributed.checkpoint; needed
    for 70B). Either format resumes in any layout, world size and backend."""
    save_at_end: bool = True
    """Save a checkpoint after the last step of the run (or of this invocation). False only for
    throw-away runs (raytune-llama tune-layout's trials: a 70B checkpoint is ~850 GB)."""
    keep_best: Optional[str] = one_of(None, (None, "eval_loss"))
    """eval_loss: also keep the checkpoint with the lowest validation loss (besides the last
    keep_last ones)."""
    async_save: bool = False
    """Sharded format: copy the shards to host memory at the checkpoint step and write them
    in the background during the next step; the checkpoint is reported (and becomes the one
    a restart resumes from) once written. The last step always saves synchronously."""


@dataclass
class RunConfig:
    name: str = "tiny-cpu"
    """Run name; rerunning the same name and storage path resumes."""
    storage_path: str = "runs"
    """Where checkpoints, reports and the export go (shared storage on a real cluster)."""
    export_dir: Optional[str] = None
    """Where the final model is saved; defaults to STORAGE/NAME/export."""
    address: Optional[str] = None
    """Ray address; None uses RAY_ADDRESS or starts a local cluster."""
    local_num_cpus: Optional[int] = None
    """Logical CPUs of a local cluster; default leaves room for the data pipeline."""
    max_failures: int = within(0, lambda v: v >= 0, ">= 0")
    """Worker-group restarts Ray Train may do before failing the run."""
    trackers: list = field(default_factory=list)
    """Experiment trackers fed with every step, evaluation and checkpoint: any of mlflow,
    tensorboard, wandb (offline unless configured otherwise; files under STORAGE/NAME)."""
    collective_timeout_s: int = within(600, lambda v: v >= 10, ">= 10 seconds")
    """A collective that waits longer than this fails (naming the rank) instead of hanging
    for torch's 30-minute default; the failure then counts against max_failures. Also the
    bound of each worker group's first training step."""
    step_timeout_s: Optional[float] = optional(lambda v: v >= 1, "a number of seconds >= 1",
                                               "to tighten the step bound automatically after the first step")
    """Bound of every later training step: a rank whose step runs longer logs its rank, step
    and stack and ends its process, and the worker group restarts from the latest checkpoint
    (counted against max_failures). None tightens automatically after the first step to 10x
    the slowest step seen, at least 120 s. Never above collective_timeout_s; the step after
    a checkpoint keeps collective_timeout_s (on a URI storage_path it can wait for a rank's
    upload of its checkpoint files)."""


SECTIONS = {
    "model": ModelConfig,
    "data": DataConfig,
    "train": TrainConfig,
    "parallel": ParallelConfig,
    "checkpoint": CheckpointConfig,
    "run": RunConfig,
}


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (YAML/JSON-ready)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @property
    def run_dir(self) -> Path:
        """STORAGE/NAME: the run's own directory."""
        return Path(self.run.storage_path) / self.run.name

    @property
    def export_path(self) -> Path:
        """Where the final model is exported."""
        return Path(self.run.export_dir) if self.run.export_dir else self.run_dir / "export"

    def validate(self, check_files: bool = True) -> "Config":
        """Raise one ConfigError listing every problem; returns self when valid."""
        problems = self.problems(check_files)
        if problems:
            raise ConfigError(problems)
        return self

    def problems(self, check_files: bool = True) -> list[str]:
        """Every problem: each field against its type and metadata, the rules between fields,
        and with check_files the model, tokenizer and data they point at (config_paths.py)."""
        problems = [p for name in SECTIONS for p in field_problems(name, getattr(self, name))]
        problems += _cross_field_problems(self)
        if check_files:
            from raytune_llama.config_paths import data_problems, model_problems

            problems += model_problems(self.model) + data_problems(self.data)
        return problems


def field_problems(section: str, values: Any) -> list[str]:
    """Every field of one section checked against its type and metadata (one_of, within, optional)."""
    problems = []
    for f in fields(values):
        value, name, meta = getattr(values, f.name), f"{section}.{f.name}", f.metadata
        if "choices" in meta:
            allowed = meta["choices"]() if callable(meta["choices"]) else meta["choices"]
            if value not in allowed:
                problems.append(f"{name}: {value!r} is not one of {list(allowed)}")
            continue
        kind = str(f.type)
        nullable = kind.startswith("Optional[")
        kind = kind.removeprefix("Optional[").removesuffix("]")
        if value is None and nullable:
            continue
        if kind == "bool" and not isinstance(value, bool):
            problems.append(f"{name}: {value!r} must be true or false")
        elif kind in ("int", "float"):
            number = not isinstance(value, bool) and isinstance(value, (int, float))
            whole = kind == "float" or isinstance(value, int)
            fits = number and whole and ("ok" not in meta or meta["ok"](value))
            if fits:
                continue
            if nullable:
                requirement = meta.get("requirement", "a whole number" if kind == "int" else "a number")
                problems.append(f"{name}: {value!r} must be {requirement}, or null {meta.get('null_means', '')}"
                                .rstrip())
            elif not number:
                problems.append(f"{name}: expected a number, got {value!r}")
            elif not whole:
                problems.append(f"{name}: expected a whole number, got {value!r}")
            else:
                problems.append(f"{name}: {value!r} must be {meta['requirement']}")
    return problems


def _cross_field_problems(cfg: Config) -> list[str]:
    """The rules between fields, and the fields whose values are structured (betas, layout,
    lora, trackers, run.name)."""
    from raytune_llama.lora_settings import lora_problems
    from raytune_llama.presets import known_presets
    from raytune_llama.tracker_settings import tracker_problems

    p, d, t, ck, run = cfg.parallel, cfg.data, cfg.train, cfg.checkpoint, cfg.run
    problems = []
    low, high = p.min_workers, p.num_workers
    if _is_whole(low) and _is_whole(high) and not 1 <= low <= high:
        problems.append(f"parallel.min_workers: {low!r} must be a whole number between 1 and "
                        f"parallel.num_workers ({high}), or null for a fixed-size run")
    layout = p.layout
    if layout is not None and (not isinstance(layout, str) or ("=" not in layout and layout.strip() != "measured")):
        problems.append(f"parallel.layout: {layout!r} must be like \"dp_shard=2,zero_stage=3\", \"measured\" (the "
                        f"layout `raytune-llama tune-layout` measured fastest for this run) or null to let the "
                        f"planner choose")
    if not (isinstance(t.betas, (tuple, list)) and len(t.betas) == 2 and all(0 <= b < 1 for b in t.betas)):
        problems.append(f"train.betas: {t.betas!r} must be two numbers in [0, 1), e.g. [0.9, 0.95]")
    timeout, first = run.step_timeout_s, run.collective_timeout_s
    if _is_number(timeout) and _is_number(first) and timeout >= 1 and timeout > first:
        problems.append(f"run.step_timeout_s: {timeout!r} must be <= run.collective_timeout_s ({first!r}), the "
                        f"bound of the first step that later steps only tighten; lower it or raise "
                        f"run.collective_timeout_s")
    if ck.async_save is True and ck.format == "full":
        problems.append("checkpoint.async_save: true needs checkpoint.format sharded (or auto with a sharded "
                        "layout); format 'full' gathers the model to rank 0 and saves synchronously")
    if not str(run.name).strip() or "/" in str(run.name):
        problems.append(f"run.name: {run.name!r} must be a non-empty name without '/'")
    if cfg.model.random_init is not None and cfg.model.random_init not in known_presets():
        problems.append(f"model.random_init: unknown preset {cfg.model.random_init!r}; known presets are "
                        f"{known_presets()} (or null to load an existing model)")
    problems += _sft_and_eval_problems(d, t, ck)
    return problems + lora_problems(t.lora) + tracker_problems(run.trackers)


def _sft_and_eval_problems(d: DataConfig, t: TrainConfig, ck: CheckpointConfig) -> list[str]:
    problems = []
    if d.row_format == "instruction":
        from raytune_llama.engine.data.sft import template_fields

        try:
            names = template_fields(d.prompt_template)
        except (ValueError, TypeError) as exc:
            problems.append(f"data.prompt_template: {d.prompt_template!r:.80} is not a valid template ({exc}); "
                            f"write columns as {{column}} and a literal brace as {{{{ or }}}}")
        else:
            if not names:
                problems.append(f"data.prompt_template: {d.prompt_template!r:.80} names no {{column}}; put the "
                                f"instruction column in it, e.g. '### Instruction:\\n{{instruction}}\\n\\n"
                                f"### Response:\\n'")
    if d.eval_path is not None and d.eval_fraction:
        problems.append(f"data.eval_fraction: {d.eval_fraction!r} together with data.eval_path {d.eval_path!r}; "
                        f"use one source of validation data (set eval_fraction: 0 or eval_path: null)")
    has_eval = d.eval_path is not None or bool(d.eval_fraction)
    if ck.keep_best == "eval_loss" and not has_eval:
        problems.append("checkpoint.keep_best: 'eval_loss' needs validation data; set data.eval_path or "
                        "data.eval_fraction (e.g. 0.02)")
    if t.eval_every_steps and not has_eval and _is_whole(t.eval_every_steps):
        problems.append(f"train.eval_every_steps: {t.eval_every_steps!r} without validation data; set "
                        f"data.eval_path or data.eval_fraction (e.g. 0.02)")
    return problems


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _coerce_float(value: Any) -> Any:
    """YAML 1.1 reads '1e-4' as a string and '3' as an int; a float field takes both."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value  # validate() reports it
    return value


def _build(cls, values: dict[str, Any], prefix: str, problems: list[str]):
    known = {f.name: f for f in fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in known:
            problems.append(
                f"{prefix}.{key}: unknown key (value {value!r}); known keys in "
                f"'{prefix}' are {sorted(known)}"
            )
            continue
        if key == "betas" and isinstance(value, list):
            value = tuple(value)
        kwargs[key] = _coerce_float(value) if known[key].type == "float" else value
    return cls(**kwargs)


def config_from_dict(data: dict[str, Any]) -> Config:
    """Build a Config from a nested dict; unknown sections/keys are collected as problems."""
    problems: list[str] = []
    if not isinstance(data, dict):
        raise ConfigError([f"config: expected a mapping of sections, got {type(data).__name__}"])
    sections = {}
    for name, value in data.items():
        if name not in SECTIONS:
            problems.append(
                f"{name}: unknown section; known sections are {sorted(SECTIONS)}"
            )
            continue
        if not isinstance(value, dict):
            problems.append(f"{name}: expected a mapping, got {value!r}")
            continue
        sections[name] = _build(SECTIONS[name], value, name, problems)
    if problems:
        raise ConfigError(problems)
    return Config(**sections)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply 'section.key=value' overrides (values parsed as YAML) to a nested dict."""
    problems = []
    for item in overrides or []:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            problems.append(
                f"--set {item!r}: expected SECTION.KEY=VALUE, e.g. train.max_steps=20"
            )
            continue
        dotted, raw = item.split("=", 1)
        section, key = dotted.strip().split(".", 1)
        data.setdefault(section, {})
        if not isinstance(data[section], dict):
            problems.append(f"--set {item!r}: section '{section}' is not a mapping")
            continue
        data[section][key] = yaml.safe_load(raw) if raw.strip() else None
    if problems:
        raise ConfigError(problems)
    return data


def load_config(path: Optional[str | os.PathLike], overrides: Optional[list[str]] = None) -> Config:
    """Load YAML (or the defaults when path is None), then apply dotted overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError([f"config file: {str(path)!r} does not exist; pass a YAML path such as examples/configs/tiny_cpu.yaml"])
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError([f"config file: {str(path)!r} is not valid YAML: {exc}"]) from exc
    data = apply_overrides(data, overrides or [])
    return config_from_dict(data)
