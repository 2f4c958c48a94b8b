"""One experiment: featurize what is missing, fit a learner (or take zero-shot CLIP), evaluate it on
the full test split(s), and record everything in one MLflow run. ``workflows/train.py`` runs one;
the protocols in :mod:`bimors.pipelines.protocols` run many.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field

from bimors import storage
from bimors.config import Config
from bimors.pipelines.evaluate import evaluate_splits
from bimors.pipelines.feature_store import FeatureStore
from bimors.pipelines.metrics import ClassificationReport, harmonic_mean
from bimors.pipelines.protocol_data import ProtocolData, protocol_data

log = logging.getLogger(__name__)


@dataclass
class RunReport:
    run_name: str
    dataset: str
    method: str
    seed: int
    checkpoint: str
    reports: dict[str, ClassificationReport]  # "base" and "new" (base-to-new) or "all"
    history: list[dict[str, float]] = field(default_factory=list)
    mlflow_run_id: str | None = None
    mlflow_location: str | None = None
    model_version: int | None = None

    def accuracies(self) -> dict[str, float]:
        acc = {name: 100 * report.accuracy for name, report in self.reports.items()}
        if "base" in acc and "new" in acc:
            acc["hm"] = harmonic_mean(acc["base"], acc["new"])
        return acc

    def table(self) -> str:
        """A Markdown table of this run's accuracies with the tile counts behind them."""
        acc = self.accuracies()
        head = "| method | seed | " + " | ".join(acc) + " |"
        rule = "|---" * (2 + len(acc)) + "|"
        cells = [f"{acc[k]:.2f}" + (f" ({self.reports[k].correct}/{self.reports[k].count})" if k in self.reports else "") for k in acc]
        return "\n".join([head, rule, f"| {self.method} | {self.seed} | " + " | ".join(cells) + " |"])


def config_digest(cfg: Config) -> str:
    """Short hash of everything that shapes a run; part of the run name, so that re-running the same
    command resumes (or finds finished) the same Ray Train run, and a changed config starts anew."""
    keep = cfg.model_dump(mode="json", exclude={"tracking": True, "storage": True, "train": {"name", "max_failures"}})
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:8]


def train_and_evaluate(cfg: Config, output: str, data: str | None = None) -> RunReport:
    """What ``workflows/train.py`` does: check the learner config, featurize what is missing, fit,
    evaluate and register (one MLflow run)."""
    from bimors.models.classifier import check_learner_config

    check_learner_config(cfg)  # before any Ray work: a mismatch costs seconds, not a featurize run
    return run_experiment(cfg, prepare_store(cfg, output, data), output)


def prepare_store(cfg: Config, output: str, data: str | None = None) -> FeatureStore:
    """The feature store under ``output`` with the configured protocol's tiles featurized."""
    from bimors.pipelines.featurize import featurize

    uri = storage.join(output, "features")
    summary = featurize(cfg, uri, data)
    log.info(summary.line())
    return FeatureStore(uri, cfg.storage)


def run_experiment(cfg: Config, store: FeatureStore, output: str, register: bool = True) -> RunReport:
    """Fit ``cfg.model.learner.method`` on ``cfg.seed``'s shots and evaluate it (base and new classes
    when ``data.subsample`` is ``base``)."""
    from bimors import tracking

    data = protocol_data(cfg, store, cfg.seed)
    dataset = data.dataset
    method = cfg.model.learner.method
    run_name = cfg.train.name or f"{dataset}-{method}-seed{cfg.seed}-{cfg.data.subsample}-{config_digest(cfg)}"
    uri = tracking.tracking_uri(cfg.tracking) if cfg.tracking.enabled else None
    run_id = tracking.start_run(cfg, run_name, {"dataset": dataset, "method": method}) if uri else None
    try:
        report = _fit_and_evaluate(cfg, store, data, output, run_name, dataset, (uri, run_id) if run_id else None)
        report.mlflow_run_id = run_id
        if run_id:
            _log_run(cfg, uri, run_id, report)
            if register and method != "zeroshot" and cfg.tracking.registered_model:
                report.model_version = tracking.register_model(cfg, run_id, str(storage.stage_local(report.checkpoint, cfg.storage)))
            report.mlflow_location = tracking.run_url(uri, run_id)
            tracking.end_run(uri, run_id)
    except BaseException:
        if run_id:
            tracking.end_run(uri, run_id, status="FAILED")
        raise
    return report


def _fit_and_evaluate(cfg, store, data: ProtocolData, output, run_name, dataset, mlflow) -> RunReport:
    runs = storage.join(output, "runs")
    if cfg.model.learner.method == "zeroshot":
        checkpoint, history = _zero_shot_checkpoint(cfg, data, storage.join(runs, run_name, "zeroshot")), []
    else:
        from bimors.pipelines.train import fit

        result = fit(cfg, data, runs, run_name, mlflow)
        checkpoint, history = result.checkpoint, result.history
    label = "evaluate base and new classes" if set(data.tests) == {"base", "new"} else "evaluate"
    reports: dict[str, ClassificationReport] = evaluate_splits(cfg, checkpoint, store, data.tests, label)
    return RunReport(run_name, dataset, cfg.model.learner.method, cfg.seed, checkpoint, reports, history)


def _zero_shot_checkpoint(cfg: Config, data: ProtocolData, uri: str) -> str:
    """Zero-shot CLIP has nothing to train; saving its fixed prompt as a checkpoint lets it go
    through exactly the same evaluation and serving path as the trained methods."""
    from bimors.models.checkpoint import save_learner
    from bimors.models.classifier import build_learner
    from bimors.models.clip_backbone import FrozenCLIP

    backbone = FrozenCLIP.load(cfg.model.backbone, cfg.storage)
    learner = build_learner(cfg.model.learner, backbone, data.caption_dim)
    save_learner(uri, learner, data.classnames, backbone.identity, cfg.model_dump(mode="json"), storage_cfg=cfg.storage)
    return uri


def _log_run(cfg: Config, uri: str, run_id: str, report: RunReport) -> None:
    from bimors import plots, tracking

    metrics: dict[str, float] = {}
    for name, result in report.reports.items():
        metrics |= {f"test_{name}_acc": 100 * result.accuracy, f"test_{name}_count": result.count}
        tracking.log_figure(uri, run_id, plots.confusion_matrix_figure(result.confusion, result.classnames,
                            f"{report.dataset} {name} classes: {100 * result.accuracy:.1f}% of {result.count}"),
                            f"plots/confusion_{name}.png")
        per_class = {c: {"accuracy": a, "count": n} for c, (a, n) in result.per_class().items()}
        tracking.log_text(uri, run_id, json.dumps(per_class, indent=2), f"metrics/per_class_{name}.json")
    if "hm" in report.accuracies():
        metrics["test_hm"] = report.accuracies()["hm"]
    tracking.log_metrics(uri, run_id, metrics)
    if report.history:
        tracking.log_figure(uri, run_id, plots.curves_figure(report.history), "plots/curves.png")
    tracking.log_text(uri, run_id, report.table(), "results.md")
