"""Training metrics exported through Ray's own Prometheus endpoint (ray.util.metrics), so the
Ray dashboard's Grafana and any Prometheus that scrapes the Ray nodes see them next to Ray's
metrics. Rank 0 records one step record per optimizer step:

    metrics = TrainingMetrics(run_name="llama3-70b-mi250", layout="dp_shard=8,pp=8,mbs=1")
    metrics.record({"step": 1, "loss": 2.3, "lr": 1e-5, "grad_norm": 0.9, "step_time_s": 4.1,
                    "tokens_per_s": 12000.0, "tokens_seen": 49152, "world_size": 64})

Every metric name lives in METRICS below; cluster/grafana/raytune_llama.json and its test
read the exported names from here (`prometheus_name`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional

from ray.util.metrics import Counter, Gauge

# Ray's exporter puts this in front of every application metric name.
RAY_EXPORT_PREFIX = "ray_"
# Tags on every series: the run and the parallel layout it ran with (a re-plan after a
# resize shows up as a new series rather than a jump in the old one).
TAG_KEYS = ("run", "layout")


@dataclass(frozen=True)
class MetricSpec:
    """One exported metric: Ray name, kind, help text, Grafana unit, and its step-record key."""

    name: str
    kind: str  # "gauge" | "counter"
    description: str
    unit: str
    source: str


# key -> spec. `source` names the step-record key the value comes from; the two derived
# values (tokens_per_s_per_device, step_tokens) are computed in TrainingMetrics.record.
METRICS: dict[str, MetricSpec] = {
    spec.source: spec
    for spec in (
        MetricSpec("raytune_step", "gauge", "Optimizer step just finished.", "none", "step"),
        MetricSpec("raytune_loss", "gauge", "Training loss of the step (mean over non-padding tokens).", "none", "loss"),
        MetricSpec("raytune_eval_loss", "gauge", "Validation loss (token mean over the held-out rows), at the "
                   "steps that evaluate.", "none", "eval_loss"),
        MetricSpec("raytune_eval_perplexity", "gauge", "exp(validation loss).", "none", "eval_perplexity"),
        MetricSpec("raytune_learning_rate", "gauge", "Learning rate used for the step.", "none", "lr"),
        MetricSpec("raytune_grad_norm", "gauge", "Gradient norm before clipping.", "none", "grad_norm"),
        MetricSpec("raytune_step_time_seconds", "gauge", "Measured wall time of the step (device synchronized).",
                   "s", "step_time_s"),
        MetricSpec("raytune_predicted_step_time_seconds", "gauge", "Step time the planner predicted for this layout.",
                   "s", "predicted_step_time_s"),
        MetricSpec("raytune_tokens_per_second", "gauge", "Non-padding tokens per second, whole job.",
                   "none", "tokens_per_s"),
        MetricSpec("raytune_tokens_per_second_per_device", "gauge", "Non-padding tokens per second per device.",
                   "none", "tokens_per_s_per_device"),
        MetricSpec("raytune_mfu", "gauge", "Model FLOPs utilization (0..1) against the hardware profile's peak.",
                   "percentunit", "mfu"),
        MetricSpec("raytune_peak_memory_bytes", "gauge", "Peak device memory allocated during the step.",
                   "bytes", "peak_memory_bytes"),
        MetricSpec("raytune_predicted_memory_bytes", "gauge", "Peak device memory the planner predicted.",
                   "bytes", "predicted_memory_bytes"),
        MetricSpec("raytune_world_size", "gauge", "Training workers (devices) in the current worker group.",
                   "none", "world_size"),
        MetricSpec("raytune_tokens_seen", "gauge", "Non-padding tokens trained on since the run began (survives resume).",
                   "none", "tokens_seen"),
        MetricSpec("raytune_steps", "counter", "Optimizer steps finished by this process.", "none", "steps"),
        MetricSpec("raytune_tokens", "counter", "Non-padding tokens trained by this process.", "none", "step_tokens"),
    )
}


def prometheus_name(key: str) -> str:
    """The series name Prometheus sees for METRICS[key] (Ray's prefix; counters get `_total`)."""
    spec = METRICS[key]
    return RAY_EXPORT_PREFIX + spec.name + ("_total" if spec.kind == "counter" else "")


def _number(value: Any) -> Optional[float]:
    """A plain float (numpy/torch scalars included), or None for absent or unusable values."""
    if value is None or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number


class TrainingMetrics:
    """Per-step training metrics of one run, exported to Prometheus through Ray."""

    def __init__(self, run_name: str, layout: str):
        self.tags = {"run": str(run_name), "layout": str(layout)}
        # Metric objects are cheap handles; Ray aggregates them per process and flushes every
        # few seconds to the node's metrics agent, which serves --metrics-export-port.
        self._metrics: dict[str, Gauge | Counter] = {}
        for key, spec in METRICS.items():
            cls = Gauge if spec.kind == "gauge" else Counter
            self._metrics[key] = cls(spec.name, description=spec.description, tag_keys=TAG_KEYS).set_default_tags(self.tags)

    def record(self, step_record: Mapping[str, Any]) -> dict[str, float]:
        """Export one step record (absent or None keys are skipped); returns what was recorded."""
        values: dict[str, float] = {}
        for key in METRICS:
            value = _number(step_record.get(key))
            # A NaN/inf loss is exactly what a dashboard should show; elsewhere it is noise.
            if value is not None and (math.isfinite(value) or key == "loss"):
                values[key] = value
        world = values.get("world_size")
        if "tokens_per_s" in values and world and world > 0:
            values["tokens_per_s_per_device"] = values["tokens_per_s"] / world
        step_time = values.get("step_time_s")
        if "tokens_per_s" in values and step_time:
            values["step_tokens"] = values["tokens_per_s"] * step_time
        values["steps"] = 1.0
        for key, value in values.items():
            metric = self._metrics[key]
            if isinstance(metric, Counter):
                if value > 0:  # Ray's Counter refuses increments <= 0
                    metric.inc(value)
            else:
                metric.set(value)
        return values
