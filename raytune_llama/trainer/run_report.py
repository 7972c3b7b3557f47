"""End-of-run report in the run directory: summary.json (the summary dict as given) and
loss.png (loss and non-padding tokens/s over steps, with world-size changes marked).

    write_run_report("runs/tiny-cpu", summary, records)   # records: one step record per step
"""
from __future__ import annotations

import io
import json
import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

# Figure + the Agg canvas directly: no pyplot global state and no display needed, so this is
# safe on a head node without X and inside threads.
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from raytune_llama.engine.atomic_files import write_bytes_atomic

LOSS_COLOR, TPUT_COLOR, PRED_COLOR, EVAL_COLOR = "#1f77b4", "#2ca02c", "#7f7f7f", "#ff7f0e"


def _series(records: Sequence[Mapping[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of the records that carry a finite number under key."""
    xs, ys = [], []
    for rec in records:
        value = rec.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            xs.append(rec["step"])
            ys.append(float(value))
    return xs, ys


def _ema(values: list[float], span: int) -> list[float]:
    """Exponential moving average (a readable trend through a noisy loss)."""
    alpha, out, acc = 2.0 / (span + 1), [], None
    for v in values:
        acc = v if acc is None else alpha * v + (1 - alpha) * acc
        out.append(acc)
    return out


def _title(summary: Mapping[str, Any], records: Sequence[Mapping[str, Any]]) -> str:
    """Run name, layout and world size for the figure title."""
    last = records[-1] if records else {}
    name = summary.get("run_name") or last.get("run_name") or "run"
    layout = summary.get("layout") or last.get("layout")
    world = summary.get("world_size") or last.get("world_size")
    parts = [str(name)]
    if layout:
        parts.append(f"layout {layout}")
    if world:
        parts.append(f"{world} device(s)")
    return " | ".join(parts)


def _mark_resizes(axes, records: Sequence[Mapping[str, Any]]) -> None:
    """Dashed vertical line wherever world_size changed (an elastic resize or restart)."""
    prev = None
    for rec in records:
        world = rec.get("world_size")
        if prev is not None and world is not None and world != prev:
            for ax in axes:
                ax.axvline(rec["step"], color="#d62728", linestyle="--", linewidth=1, alpha=0.7)
            axes[0].annotate(f"world {prev}\u2192{world}", (rec["step"], 1.0), xycoords=("data", "axes fraction"),
                             xytext=(3, -12), textcoords="offset points", fontsize=8, color="#d62728")
        prev = world if world is not None else prev


def plot_run(summary: Mapping[str, Any], records: Sequence[Mapping[str, Any]]) -> Figure:
    """Two stacked panels sharing the step axis: loss on top, tokens/s below."""
    fig = Figure(figsize=(10, 6.5), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax_loss, ax_tput = fig.subplots(2, 1, sharex=True, height_ratios=[3, 2])
    fig.suptitle(_title(summary, records), fontsize=12)

    steps, loss = _series(records, "loss")
    if steps:
        # Raw loss faint, its trend bold: the trend is what a person looks for.
        span = max(len(loss) // 20, 1)
        ax_loss.plot(steps, loss, color=LOSS_COLOR, alpha=0.35 if span > 1 else 1.0, linewidth=1, label="loss")
        if span > 1:
            ax_loss.plot(steps, _ema(loss, span), color=LOSS_COLOR, linewidth=2, label=f"loss (EMA, span {span})")
        esteps, eloss = _series(records, "eval_loss")
        if esteps:
            ax_loss.plot(esteps, eloss, color=EVAL_COLOR, marker="o", linewidth=1.5, label="validation loss")
        ax_loss.legend(loc="upper right", fontsize=8)
    else:
        ax_loss.text(0.5, 0.5, "no steps ran", ha="center", va="center", transform=ax_loss.transAxes)
    ax_loss.set_ylabel("training loss")
    ax_loss.grid(True, alpha=0.3)

    tsteps, tput = _series(records, "tokens_per_s")
    if tsteps:
        ax_tput.plot(tsteps, tput, color=TPUT_COLOR, linewidth=1.5, label="measured")
        # Predicted tokens/s from the planner's step time: measured tokens * measured/predicted time.
        pred = [(r["step"], r["tokens_per_s"] * r["step_time_s"] / r["predicted_step_time_s"]) for r in records
                if r.get("predicted_step_time_s") and r.get("step_time_s") and r.get("tokens_per_s") is not None]
        if pred:
            ax_tput.plot(*zip(*pred), color=PRED_COLOR, linestyle=":", linewidth=1.5, label="predicted by planner")
        ax_tput.legend(loc="lower right", fontsize=8)
        ax_tput.set_ylim(bottom=0)
    ax_tput.set_ylabel("non-padding tokens/s")
    ax_tput.set_xlabel("optimizer step")
    ax_tput.grid(True, alpha=0.3)
    _mark_resizes([ax_loss, ax_tput], records)
    return fig


def write_run_report(run_dir: "str | os.PathLike", summary: Mapping[str, Any],
                     records: Sequence[Mapping[str, Any]]) -> dict[str, Path]:
    """Write RUN_DIR/summary.json and RUN_DIR/loss.png; return their paths."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    summary_path, plot_path = run_dir / "summary.json", run_dir / "loss.png"
    # default=str: a Path or numpy scalar in the summary must not cost the whole report.
    write_bytes_atomic(summary_path, json.dumps(dict(summary), indent=2, default=str).encode())
    ordered = sorted((r for r in records if "step" in r), key=lambda r: r["step"])
    fig = plot_run(summary, ordered)
    png = io.BytesIO()
    fig.savefig(png, format="png")
    write_bytes_atomic(plot_path, png.getvalue())
    return {"summary": summary_path, "plot": plot_path}
