"""ModelSpec: the shape of a Llama-class decoder (from an HF config) and its parameter/FLOP counts.

    from raytune_llama.planner.model_spec import load_model
    load_model("llama3-70b").n_params  # ~70.55e9

A model is a registry name (JSON HF configs shipped in planner/registry/), an HF config dict,
a config.json path or a local model directory holding one.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping

from raytune_llama.lora_settings import ALL_LINEAR
from raytune_llama.planner.errors import PlanError

REGISTRY_DIR = Path(__file__).with_name("registry")


@dataclass(frozen=True)
class ModelSpec:
    """Shape of a Llama-class (Llama/Mistral/Qwen2) causal LM."""

    name: str
    """Registry name or the config's _name_or_path."""
    vocab_size: int
    hidden_size: int
    """d: model width."""
    intermediate_size: int
    """SwiGLU FFN width (gate/up/down)."""
    num_layers: int
    num_heads: int
    num_kv_heads: int
    """Grouped-query attention: key/value heads (== num_heads for MHA)."""
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    """Qwen2 has biases on q/k/v projections."""

    @property
    def head_dim(self) -> int:
        """Per-head width."""
        return self.hidden_size // self.num_heads

    @property
    def kv_dim(self) -> int:
        """Width of the K (or V) projection output."""
        return self.head_dim * self.num_kv_heads

    @property
    def attn_matmul_params(self) -> int:
        """q, k, v, o projection weights of one layer."""
        h = self.hidden_size
        return 2 * h * h + 2 * h * self.kv_dim

    @property
    def mlp_params(self) -> int:
        """gate, up, down weights of one layer."""
        return 3 * self.hidden_size * self.intermediate_size

    @property
    def layer_params(self) -> int:
        """All parameters of one decoder layer (weights, biases, two RMSNorms)."""
        bias = (self.hidden_size + 2 * self.kv_dim) if self.qkv_bias else 0
        return self.attn_matmul_params + self.mlp_params + bias + 2 * self.hidden_size

    @property
    def embedding_params(self) -> int:
        """Input embedding table."""
        return self.vocab_size * self.hidden_size

    @property
    def head_params(self) -> int:
        """Untied lm_head weights (0 when tied to the embedding)."""
        return 0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size

    @property
    def n_params(self) -> int:
        """Total parameter count, as the HF model reports it."""
        return (self.embedding_params + self.head_params + self.num_layers * self.layer_params
                + self.hidden_size)

    @property
    def n_nonembedding(self) -> int:
        """Parameters that take part in matmuls per token: all but the input embedding lookup
        (the lm_head matmul counts, tied or not), per the 6 N_nonembedding + 12 L d s
        convention of docs/planner.md (MFU)."""
        return self.num_layers * self.layer_params + self.hidden_size + self.vocab_size * self.hidden_size

    def linear_shapes(self) -> dict[str, tuple[int, int, str]]:
        """Each linear projection of a decoder layer: name -> (in_features, out_features, how TP
        splits it: "col" divides the output, "row" the input)."""
        h, kv, inter = self.hidden_size, self.kv_dim, self.intermediate_size
        return {"q_proj": (h, h, "col"), "k_proj": (h, kv, "col"), "v_proj": (h, kv, "col"),
                "o_proj": (h, h, "row"), "gate_proj": (h, inter, "col"), "up_proj": (h, inter, "col"),
                "down_proj": (inter, h, "row")}

    def lora_layer_params(self, rank: int, targets: tuple[str, ...] = ALL_LINEAR, tp: int = 1) -> float:
        """LoRA adapter parameters of one decoder layer held by one TP rank: for each targeted
        W [out, in], A [r, in] and B [out, r]. Under TP a column-parallel W's A is replicated and
        its B split with W's output; a row-parallel W's A is split with W's input and its B replicated."""
        total = 0.0
        for name in targets:
            fan_in, fan_out, split = self.linear_shapes()[name]
            total += rank * (fan_in + fan_out / tp) if split == "col" else rank * (fan_in / tp + fan_out)
        return total

    def lora_params(self, rank: int, targets: tuple[str, ...] = ALL_LINEAR) -> int:
        """Trainable LoRA adapter parameters of the whole model (0 for rank 0): r * (in + out)
        summed over the targeted projections of every layer, e.g. llama3-8b r=16 all linear
        41,943,040."""
        return int(self.num_layers * self.lora_layer_params(rank, targets)) if rank else 0

    def model_flops_per_token(self, seq_len: int, lora_rank: int = 0,
                              lora_targets: tuple[str, ...] = ALL_LINEAR) -> float:
        """Training model FLOPs per token: 6*N_nonembedding + 12*L*d*s (PaLM appendix B). With
        LoRA (lora_rank > 0) the frozen weights need no weight gradients: forward 2N + input
        gradients 2N, plus 6 per adapter parameter; attention keeps its 12*L*d*s (its backward
        still computes dQ, dK, dV)."""
        attention = 12.0 * self.num_layers * self.hidden_size * seq_len
        if lora_rank:
            return 4.0 * self.n_nonembedding + 6.0 * self.lora_params(lora_rank, lora_targets) + attention
        return 6.0 * self.n_nonembedding + attention

    def forward_flops_per_token(self, seq_len: int, lora_rank: int = 0,
                                lora_targets: tuple[str, ...] = ALL_LINEAR) -> float:
        """Forward-only model FLOPs per token (what full recompute runs again): 2N (+2 per adapter
        parameter) + 4*L*d*s."""
        return (2.0 * self.n_nonembedding + 2.0 * self.lora_params(lora_rank, lora_targets)
                + 4.0 * self.num_layers * self.hidden_size * seq_len)

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict summary (JSON-ready)."""
        return {
            "name": self.name, "n_params": self.n_params, "n_nonembedding": self.n_nonembedding,
            "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size, "num_layers": self.num_layers,
            "num_heads": self.num_heads, "num_kv_heads": self.num_kv_heads,
            "tie_word_embeddings": self.tie_word_embeddings, "qkv_bias": self.qkv_bias,
        }


@lru_cache(maxsize=None)
def _registry_names() -> tuple[str, ...]:
    return tuple(sorted(p.stem for p in REGISTRY_DIR.glob("*.json")))


def registry_names() -> list[str]:
    """Names of the built-in model configs (planner/registry/*.json)."""
    return list(_registry_names())


def registry_entry(name: str) -> dict[str, Any]:
    """The HF config dict of one built-in model (a name from registry_names())."""
    return json.loads((REGISTRY_DIR / f"{name}.json").read_text())


def from_hf_config(config: Mapping[str, Any], name: str | None = None) -> ModelSpec:
    """Build a ModelSpec from an HF config dict; missing or bad fields raise a PlanError."""
    required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads")
    missing = [k for k in required if k not in config]
    if missing:
        raise PlanError("model", name or "<config>", f"HF config lacks field(s) {missing}",
                        "pass a Llama-class config.json (LlamaConfig/MistralConfig/Qwen2Config)")
    heads = int(config["num_attention_heads"])
    kv = int(config.get("num_key_value_heads") or heads)
    spec = ModelSpec(
        name=name or str(config.get("_name_or_path") or config.get("model_type") or "model"),
        vocab_size=int(config["vocab_size"]),
        hidden_size=int(config["hidden_size"]),
        intermediate_size=int(config["intermediate_size"]),
        num_layers=int(config["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=kv,
        max_position_embeddings=int(config.get("max_position_embeddings") or 4096),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        # Qwen2 hard-codes q/k/v biases; Llama exposes attention_bias (applies to q/k/v/o, o ignored here).
        qkv_bias=bool(config.get("attention_bias", False)) or config.get("model_type") == "qwen2",
    )
    for field, value in (("hidden_size", spec.hidden_size), ("num_hidden_layers", spec.num_layers),
                         ("num_attention_heads", heads), ("vocab_size", spec.vocab_size),
                         ("intermediate_size", spec.intermediate_size), ("num_key_value_heads", kv)):
        if value <= 0:
            raise PlanError(f"model.{field}", value, "must be positive", "fix the config")
    if spec.hidden_size % heads or heads % kv:
        raise PlanError("model.num_key_value_heads", kv,
                        f"hidden_size ({spec.hidden_size}) must divide by heads ({heads}) and heads by kv heads",
                        "fix the config")
    return spec


def load_model(model: "str | os.PathLike | Mapping[str, Any] | ModelSpec") -> ModelSpec:
    """Resolve a registry name, HF config dict, config.json path or model directory to a ModelSpec."""
    if isinstance(model, ModelSpec):
        return model
    if isinstance(model, Mapping):
        return from_hf_config(model)
    text = os.fspath(model)
    key = text.strip().lower()
    reg = REGISTRY_DIR / f"{key}.json"
    if reg.is_file():
        return from_hf_config(registry_entry(key), name=key)
    path = Path(text).expanduser()
    if path.is_dir():
        path = path / "config.json"
    if path.is_file():
        try:
            cfg = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise PlanError("model", text, f"{path} is not valid JSON ({exc})", "pass an HF config.json") from exc
        return from_hf_config(cfg, name=cfg.get("_name_or_path") or path.parent.name)
    raise PlanError("model", text, "unknown model (not a registry name, config.json or model directory)",
                    f"use one of {registry_names()} or a path to an HF config.json")
