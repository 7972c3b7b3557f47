"""Run configuration: dataclass sections loaded from YAML, dotted `--set` overrides, and a
`validate()` that gathers every problem into one `ConfigError` before any worker starts.

    cfg = load_config("examples/configs/tiny_cpu.yaml", overrides=["train.max_steps=20"])
    cfg.validate()
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

import yaml


class ConfigError(ValueError):
    """One or more configuration problems; each names the field, the value and a fix."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{len(self.problems)} configuration problem(s):\n{lines}")

    def __reduce__(self):  # pickled across Ray (a Tune trial's error) with its problems intact
        return type(self), (self.problems,)


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
    format: str = "text"
    """What a row is: text (one document in data.text_column) | chat (a conversation in
    data.messages_column, rendered with the tokenizer's chat template) | instruction (prompt
    columns filled into data.prompt_template, the answer in data.response_column). The older
    values auto | jsonl | parquet | hf still mean text, read that way (docs/data.md "Supervised
    fine-tuning data")."""
    reader: str = "auto"
    """How the files are read: auto (from the file ending) | jsonl | parquet | hf."""
    hf_split: str = "train"
    """Split to read when format == 'hf'."""
    text_column: str = "text"
    """Column holding the raw document text."""
    id_column: Optional[str] = None
    """Optional column of unique document ids, carried through packing."""
    seq_len: int = 128
    """Tokens per packed training sequence."""
    tokenize_batch_size: int = 512
    """Documents per tokenizer call inside a store build task (bounds the task's memory)."""
    chunk_mb: float = 4.0
    """Source bytes per token-store chunk: the unit of tokenization, of shuffling, and of the
    wait before the first step (docs/data.md "Token store")."""
    shuffle: bool = True
    """Seeded per-epoch shuffle: of the chunks, and of the rows within each window of chunks."""
    shuffle_window: int = 16
    """Chunks whose rows are shuffled together (a global batch mixes rows of that many chunks
    from anywhere in the corpus); also how many chunks must be tokenized before the first step."""
    shuffle_seed: int = 0
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
    packing: str = "documents"
    """documents (rows hold whole documents, position ids restart and attention stays inside
    each document) | naive (documents joined with EOS and cut every seq_len tokens, attention
    across them) | none (one document per row, padded). A document longer than seq_len is
    split into rows in every mode (docs/data.md "Packing")."""
    eval_path: Optional[str] = None
    """Validation data, read like data.path (same format and columns)."""
    eval_fraction: float = 0.0
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
    max_steps: int = 60
    """Optimizer steps of the whole run (the LR schedule spans these)."""
    stop_after_steps: Optional[int] = None
    """Stop this invocation after N more steps (checkpointed; rerun to continue)."""
    global_batch_size: int = 8
    """Sequences per optimizer step, over all workers (kept fixed at every world size); the
    layout splits it into data-parallel ranks x micro-batches x accumulation steps."""
    lr: float = 1e-3
    """Peak learning rate (AdamW)."""
    min_lr_ratio: float = 0.1
    """Cosine decay floor as a fraction of lr."""
    warmup_steps: int = 5
    """Linear warm-up steps."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    betas: tuple = (0.9, 0.95)
    """AdamW betas."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm (0 disables)."""
    log_every: int = 5
    """Report metrics to Ray Train every N steps (progress is shown every step)."""
    seed: int = 0
    """Seed for the training process (data order is fixed by the pipeline)."""
    eval_every_steps: int = 0
    """With validation data (data.eval_path or data.eval_fraction): evaluate every N steps and
    at the end (0: only at the end)."""
    eval_max_batches: Optional[int] = None
    """Global batches per evaluation (None: the whole validation set)."""
    lora: Optional[dict] = None
    """LoRA fine-tuning with peft: {r, alpha, dropout, target_modules}; the base weights are
    frozen, only the adapters train (docs/lora.md)."""


@dataclass
class ParallelConfig:
    num_workers: int = 2
    """Ray Train workers (one per device); the most an elastic run uses."""
    min_workers: Optional[int] = None
    """Elastic runs: the fewest workers to go on with (None = fixed size). At every size the
    layout is re-planned, the global batch is kept, and training resumes from the checkpoint."""
    resize_check_s: float = 60.0
    """Elastic runs: while training, how often Ray Train looks for room to grow back towards
    num_workers (ScalingConfig.elastic_resize_monitor_interval_s); a grow restarts the worker
    group from the latest checkpoint, so it costs up to one checkpoint interval of steps."""
    use_gpu: bool = False
    """Give each worker one GPU (ROCm or CUDA); CPU/gloo otherwise."""
    cpus_per_worker: float = 1.0
    """CPUs reserved per training worker."""
    layout: Optional[str] = None
    """Parallel layout, e.g. "dp_shard=2,zero_stage=3" or "tp=2,micro_batch_size=2"; None lets
    the planner choose the fastest layout that fits (see `raytune-llama plan`)."""
    hardware: str = "auto"
    """Planner hardware profile of the workers' devices (auto: cpu without GPUs, else from Ray)."""
    mixed_precision: str = "auto"
    """Compute dtype: auto (bf16 on accelerators, fp32 on CPU) | bf16 | none (fp32)."""
    master_weights: str = "fp32"
    """Dtype of the trained weights and the AdamW moments, whatever the checkpoint's dtype:
    fp32 (default: fp32 masters and optimizer state, bf16 compute per mixed_precision; 16
    bytes/param before sharding) | bf16 (pure bf16 weights, gradients and moments: 8
    bytes/param, but updates smaller than bf16's resolution round away, so low learning rates
    stall; see docs/parallel_engine.md)."""


@dataclass
class CheckpointConfig:
    every_steps: int = 20
    """Save a checkpoint every N steps (and at the end); 0 saves only at the end."""
    keep_last: int = 2
    """Checkpoints kept by Ray Train."""
    resume: str = "auto"
    """auto (resume if this run has a checkpoint) | never | must (error if none)."""
    format: str = "auto"
    """auto (sharded when the layout shards the model: FSDP/ZeRO, TP or PP on the torch
    backend; else full) | full (rank 0 writes the gathered whole model: small models) |
    sharded (every rank writes only its own shards with torch.distributed.checkpoint; needed
    for 70B). Either format resumes in any layout, world size and backend."""
    save_at_end: bool = True
    """Save a checkpoint after the last step of the run (or of this invocation). False only for
    throw-away runs (raytune-llama tune-layout's trials: a 70B checkpoint is ~850 GB)."""
    keep_best: Optional[str] = None
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
    max_failures: int = 0
    """Worker-group restarts Ray Train may do before failing the run."""
    trackers: list = field(default_factory=list)
    """Experiment trackers fed with every step, evaluation and checkpoint: any of mlflow,
    tensorboard, wandb (offline unless configured otherwise; files under STORAGE/NAME)."""
    collective_timeout_s: int = 600
    """A collective that waits longer than this fails (naming the rank) instead of hanging
    for torch's 30-minute default; the failure then counts against max_failures. Also the
    bound of each worker group's first training step."""
    step_timeout_s: Optional[float] = None
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
        from raytune_llama.config_checks import collect_problems

        problems = collect_problems(self, check_files=check_files)
        if problems:
            raise ConfigError(problems)
        return self


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
