"""HardwareSpec: one accelerator kind (peak FLOP/s, memory, links, efficiency factors), loaded
from the YAML profiles shipped in planner/profiles/ or from a user YAML that adds/overrides one.

    from raytune_llama.planner.hardware import load_hardware
    load_hardware("mi250").peak_flops   # 181e12: one GCD, the unit the runtime exposes
    load_hardware("mi250", profile="calibrated.yaml")

Every number in the efficiency block is a calibration knob (raytune-llama calibrate).
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Mapping

import yaml

from raytune_llama.planner.errors import PlanError

PROFILES_DIR = Path(__file__).with_name("profiles")


@dataclass(frozen=True)
class Efficiency:
    """Achievable fractions of peak; fitted by calibration."""

    matmul_max: float = 0.7
    """Fraction of peak FLOP/s a large bf16 GEMM reaches."""
    matmul_half_dim: float = 128.0
    """GEMM dimension at which that dimension alone halves the efficiency (m/(m+c) per dim)."""
    attention: float = 0.6
    """Flash/SDPA attention efficiency relative to matmul_max."""
    memory_bw: float = 0.8
    """Fraction of memory bandwidth elementwise kernels and the optimizer reach."""
    network: float = 0.8
    """Bus-bandwidth fraction collectives reach on every link."""
    dp_overlap: float = 0.8
    """Fraction of the overlap window that hides data-parallel/FSDP collectives."""
    tp_overlap: float = 0.0
    """Fraction of tensor-parallel collective time hidden behind compute."""
    pp_overlap: float = 0.0
    """Fraction of pipeline point-to-point time hidden behind compute."""


@dataclass(frozen=True)
class HardwareSpec:
    """One device kind as the runtime exposes it (an MI250 is two devices: one per GCD)."""

    name: str
    description: str = ""
    peak_flops: float = 1e12
    """Dense bf16 FLOP/s of one device."""
    memory_bytes: float = 16 * 2**30
    """Device memory."""
    memory_bw: float = 1e11
    """Device memory bandwidth, bytes/s."""
    devices_per_node: int = 8
    devices_per_card: int = 1
    """Devices sharing one package with a fast link (MI250: 2 GCDs)."""
    intra_card_bw: float = 0.0
    """Per-direction bytes/s between devices of one card (0: no cards)."""
    intra_node_bw: float = 1e11
    """Per-direction bytes/s per device for collectives among the node's devices (across cards)."""
    inter_node_bw: float = 1e10
    """Per-direction bytes/s per device to other nodes."""
    collective_latency_s: float = 20e-6
    """Fixed cost per collective/p2p step."""
    host_link_bw: float = 25e9
    """Device<->host bytes/s per device (PCIe), for offload."""
    cpu_adam_params_per_s: float = 1.0e9
    """Host optimizer throughput per node (params/s), shared by the node's devices."""
    runtime_reserved_bytes: float = 1.5 * 2**30
    """Memory the runtime/context/collective library takes before the model."""
    fragmentation: float = 0.08
    """Allocator fragmentation margin on dynamic (activation) memory."""
    activation_scale: float = 1.0
    """Calibration multiplier on the derived activation bytes."""
    layer_overhead_s: float = 100e-6
    """Kernel-launch/framework time per layer per micro-batch (fwd+bwd); dominates tiny models."""
    cores_per_node: float = 0.0
    """CPU cores the devices of one node share (CPU/gloo ranks); 0: each device computes on its own
    silicon (GPUs), nothing is shared."""
    cores_per_device: float = 1.0
    """Cores one device (process) runs on when it has them to itself; peak_flops, memory_bw,
    collective_latency_s and layer_overhead_s describe a device with that many cores."""
    efficiency: Efficiency = field(default_factory=Efficiency)

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form (the profile YAML schema)."""
        return asdict(self)


def _from_mapping(data: Mapping[str, Any], base: HardwareSpec | None, source: str) -> HardwareSpec:
    known = {f.name: f for f in fields(HardwareSpec)}
    eff_known = {f.name for f in fields(Efficiency)}
    unknown = sorted(set(data) - set(known) - {"calibration"})
    if unknown:
        raise PlanError("profile", source, f"unknown field(s) {unknown}", f"known fields: {sorted(known)}")
    eff_in = dict(data.get("efficiency") or {})
    bad = sorted(set(eff_in) - eff_known)
    if bad:
        raise PlanError("profile.efficiency", source, f"unknown field(s) {bad}", f"known: {sorted(eff_known)}")
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key in ("efficiency", "calibration"):
            continue
        if key in ("name", "description"):
            kwargs[key] = str(value)
        elif key in ("devices_per_node", "devices_per_card"):
            kwargs[key] = int(value)
        else:
            # YAML 1.1 reads "181e12" as a string; accept it anyway.
            try:
                kwargs[key] = float(value)
            except (TypeError, ValueError) as exc:
                raise PlanError(f"profile.{key}", value, "must be a number", source) from exc
    eff = base.efficiency if base else Efficiency()
    eff = replace(eff, **{k: float(v) for k, v in eff_in.items()})
    spec = replace(base, **kwargs, efficiency=eff) if base else HardwareSpec(**kwargs, efficiency=eff)
    _validate(spec, source)
    return spec


def _validate(spec: HardwareSpec, source: str) -> None:
    for key in ("peak_flops", "memory_bytes", "memory_bw", "intra_node_bw", "inter_node_bw"):
        if getattr(spec, key) <= 0:
            raise PlanError(f"profile.{key}", getattr(spec, key), "must be positive", source)
    if spec.cores_per_node < 0 or spec.cores_per_device <= 0:
        raise PlanError("profile.cores_per_node", (spec.cores_per_node, spec.cores_per_device),
                        "cores_per_node must be >= 0 and cores_per_device > 0", source)
    if spec.devices_per_node < 1 or spec.devices_per_card < 1:
        raise PlanError("profile.devices_per_node", spec.devices_per_node, "must be >= 1", source)
    e = spec.efficiency
    for key in ("matmul_max", "attention", "memory_bw", "network"):
        if not 0 < getattr(e, key) <= 1.5:
            raise PlanError(f"profile.efficiency.{key}", getattr(e, key), "must be in (0, 1.5]", source)


def host_share(hw: HardwareSpec, devices_per_node: int) -> float:
    """Fraction of its nominal speed one device gets when the node's devices share
    `cores_per_node` cores (1.0 for GPUs or when the cores suffice)."""
    if hw.cores_per_node <= 0:
        return 1.0
    return min(1.0, hw.cores_per_node / (devices_per_node * hw.cores_per_device))


def shared_view(hw: HardwareSpec, devices_per_node: int) -> HardwareSpec:
    """The spec one device effectively sees on a node whose devices share CPU cores: everything the
    cores execute (GEMMs, memory traffic, shared-memory copies, collective and per-layer software
    overhead) runs `1/share` slower, and with no idle core left nothing progresses communication
    in the background (overlaps 0). GPUs (cores_per_node 0) are returned unchanged."""
    if hw.cores_per_node <= 0:
        return hw
    share = host_share(hw, devices_per_node)
    eff = hw.efficiency
    if devices_per_node * hw.cores_per_device >= hw.cores_per_node:
        eff = replace(eff, dp_overlap=0.0, tp_overlap=0.0, pp_overlap=0.0)
    if share >= 1.0 and eff is hw.efficiency:
        return hw
    return replace(hw, peak_flops=hw.peak_flops * share, memory_bw=hw.memory_bw * share,
                   intra_node_bw=hw.intra_node_bw * share, intra_card_bw=hw.intra_card_bw * share,
                   collective_latency_s=hw.collective_latency_s / share,
                   layer_overhead_s=hw.layer_overhead_s / share, efficiency=eff)


def builtin_names() -> list[str]:
    """Names of the shipped hardware profiles."""
    return sorted(p.stem for p in PROFILES_DIR.glob("*.yaml"))


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise PlanError("profile", str(path), f"cannot read YAML ({exc})", "pass a valid profile YAML") from exc
    if not isinstance(data, dict):
        raise PlanError("profile", str(path), "must be a YAML mapping", "see docs/planner.md")
    return data


def load_hardware(name: str | HardwareSpec | Mapping[str, Any] | None,
                  profile: "str | os.PathLike | Mapping[str, Any] | None" = None) -> HardwareSpec:
    """Resolve a hardware name (or spec/dict), then apply a user profile that overrides or adds one."""
    if isinstance(name, HardwareSpec):
        base: HardwareSpec | None = name
    elif isinstance(name, Mapping):
        base = _from_mapping(name, None, "<dict>")
    elif name is None:
        base = None
    else:
        key = str(name).strip().lower()
        path = PROFILES_DIR / f"{key}.yaml"
        if not path.is_file():
            if profile is None:
                raise PlanError("hardware", name, "unknown hardware kind",
                                f"use one of {builtin_names()} or pass --profile FILE.yaml defining it")
            base = None
        else:
            base = _from_mapping(_read_yaml(path), None, str(path))
    if profile is not None:
        data = dict(profile) if isinstance(profile, Mapping) else _read_yaml(Path(profile))
        src = "<dict>" if isinstance(profile, Mapping) else str(profile)
        if base is not None and data.get("name") not in (None, base.name):
            # A profile for another kind replaces the base only when no built-in exists for it.
            other = PROFILES_DIR / f"{str(data['name']).lower()}.yaml"
            base = _from_mapping(_read_yaml(other), None, str(other)) if other.is_file() else None
        if base is None and "name" not in data:
            data["name"] = str(name)
        base = _from_mapping(data, base, src)
    if base is None:
        raise PlanError("hardware", name, "no hardware given", f"use one of {builtin_names()}")
    return base


def profile_yaml(spec: HardwareSpec, calibration: Mapping[str, Any] | None = None) -> str:
    """Serialise a HardwareSpec as a profile YAML (what calibrate writes)."""
    data = spec.to_dict()
    if calibration:
        data["calibration"] = dict(calibration)
    return yaml.safe_dump(data, sort_keys=False)
