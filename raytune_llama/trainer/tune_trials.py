"""A raytune_llama run as one Ray Tune trial (Ray Train v2's pattern for Tune: the trial's
function is the run's driver, which starts its own TorchTrainer): the searches of
`raytune-llama sweep` and `raytune-llama tune-layout` both run their trials through here.

    def trial(params):                       # a Tune function trainable
        cfg = load_config(path, overrides + as_overrides(params))
        summary = fit_in_trial(cfg, metric="eval_loss")

Every report of the run's workers (each `train.log_every` steps, each checkpoint and each
evaluation) reaches Tune as one result, with `step` as its time axis, so schedulers such as
ASHA can stop a trial between reports; with `metric`, only the reports that carry it are
forwarded (Tune refuses results without the metric it optimizes). The trial's run directory
is `{run.storage_path}/{run.name}` as usual; each trial gets its own `run.name`.
"""
from __future__ import annotations

from typing import Any, Optional

from raytune_llama.config import Config


def forwarding_callback(metric: Optional[str] = None):
    """A Ray Train callback that hands the run's reports to the enclosing Tune trial (only
    those carrying `metric`, when given). Must be created inside the trial."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class ForwardReports(TuneReportCallback):
        def after_report(self, run_context, metrics, checkpoint):
            if metric is None or (metrics and metric in metrics[0]):
                super().after_report(run_context, metrics, checkpoint)

    return ForwardReports()


def fit_in_trial(cfg: Config, metric: Optional[str] = None) -> dict:
    """Run cfg to its end inside a Tune trial, its reports forwarded to Tune; returns the run
    summary (LlamaTrainer.fit)."""
    from raytune_llama.trainer.llama_trainer import LlamaTrainer

    return LlamaTrainer(cfg, callbacks=[forwarding_callback(metric)]).fit()


def as_overrides(params: dict[str, Any]) -> list[str]:
    """Tune's sampled {"train.lr": 3e-4, ...} as the config's --set overrides."""
    import json

    return [f"{key}={json.dumps(value)}" for key, value in params.items()]
