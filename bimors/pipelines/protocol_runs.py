"""The paper's three protocols, run over methods x seeds on one harness, as tables (mean ± std).

* base-to-new: train on the base half of the classes (K shots), test on base and new classes;
* cross-dataset: train on PatternNet (all classes), test on RSICD, RESISC45 and MLRSNet;
* domain generalization: train on PatternNetv2, test on RSICDv2, RESISC45v2 and MLRSNetv2.
"""

from __future__ import annotations

import csv
import io
import logging
import statistics
from dataclasses import dataclass, field

from bimors import storage
from bimors.config import Config, ConfigError
from bimors.data.protocols import transfer_pairing
from bimors.pipelines.evaluate import evaluate_splits
from bimors.pipelines.experiment import RunReport, prepare_store, run_experiment
from bimors.pipelines.protocol_data import eval_split

log = logging.getLogger(__name__)

PROTOCOLS = ("base2new", "cross-dataset", "domain-generalization")


@dataclass
class ProtocolTable:
    protocol: str
    columns: list[str]
    values: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # method -> column -> one per seed
    counts: dict[str, int] = field(default_factory=dict)  # column -> test tiles behind it
    runs: list[RunReport] = field(default_factory=list)

    def add(self, method: str, column: str, value: float, count: int | None = None) -> None:
        self.values.setdefault(method, {}).setdefault(column, []).append(value)
        if count is not None:
            self.counts[column] = count

    def cell(self, method: str, column: str) -> tuple[float, float, int]:
        values = self.values.get(method, {}).get(column, [])
        if not values:
            return float("nan"), float("nan"), 0
        return statistics.fmean(values), statistics.pstdev(values) if len(values) > 1 else 0.0, len(values)

    def markdown(self) -> str:
        head = "| method | " + " | ".join(
            f"{c} ({self.counts[c]} tiles)" if c in self.counts else c for c in self.columns) + " |"
        lines = [head, "|---" * (1 + len(self.columns)) + "|"]
        for method in self.values:
            cells = []
            for column in self.columns:
                mean, std, n = self.cell(method, column)
                cells.append(f"{mean:.2f} ± {std:.2f}" if n else "—")
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        seeds = max((self.cell(m, c)[2] for m in self.values for c in self.columns), default=0)
        return "\n".join(lines) + f"\n\nMean ± std over {seeds} seed(s); accuracy in % on the full test splits."

    def csv(self) -> str:
        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow(["method", "column", "mean", "std", "seeds", "values", "test_tiles"])
        for method in self.values:
            for column in self.columns:
                mean, std, n = self.cell(method, column)
                values = " ".join(f"{v:.4f}" for v in self.values[method].get(column, []))
                writer.writerow([method, column, f"{mean:.4f}", f"{std:.4f}", n, values, self.counts.get(column, "")])
        return out.getvalue()


def _variant(cfg: Config, method: str, seed: int, subsample: str, **data) -> Config:
    update = {
        "seed": seed,
        "data": cfg.data.model_copy(update={"subsample": subsample, **data}),
        "model": cfg.model.model_copy(update={"learner": cfg.model.learner.model_copy(update={"method": method})}),
    }
    if method == "zeroshot":  # the hand-written prompt "a photo of a <class>."
        update["model"] = update["model"].model_copy(
            update={"learner": update["model"].learner.model_copy(update={"ctx_init": cfg.model.learner.ctx_init or "a photo of a"})})
    return cfg.model_copy(update=update)


def base_to_new(cfg: Config, output: str, data: str | None = None) -> ProtocolTable:
    table = ProtocolTable("base2new", ["base", "new", "hm"])
    store = prepare_store(_variant(cfg, cfg.model.learner.method, cfg.seed, "base"), output, data)
    for method in cfg.evaluate.methods:
        for seed in cfg.evaluate.seeds:
            report = run_experiment(_variant(cfg, method, seed, "base"), store, output, register=False)
            acc = report.accuracies()
            table.add(method, "base", acc["base"], report.reports["base"].count)
            table.add(method, "new", acc["new"], report.reports["new"].count)
            table.add(method, "hm", acc["hm"])
            table.runs.append(report)
    return table


def transfer(cfg: Config, output: str, protocol: str) -> ProtocolTable:
    """Cross-dataset or domain generalization: sources and targets come from ``evaluate.datasets``."""
    source, targets = transfer_pairing(protocol)
    roots = cfg.evaluate.datasets
    missing = [name for name in (source, *targets) if name not in roots]
    if missing:
        raise ConfigError(
            f"protocol {protocol} needs dataset roots for {', '.join(missing)}: set "
            + " ".join(f"evaluate.datasets.{name}=URI" for name in missing)
        )
    table = ProtocolTable(protocol, [source, *targets])
    source_out = storage.join(output, source)
    source_store = prepare_store(_variant(cfg, cfg.model.learner.method, cfg.seed, "all", dataset=source, root=roots[source]), source_out)
    target_stores = {
        name: prepare_store(_variant(cfg, cfg.model.learner.method, cfg.seed, "all", dataset=name, root=roots[name]),
                            storage.join(output, name))
        for name in targets
    }
    for method in cfg.evaluate.methods:
        for seed in cfg.evaluate.seeds:
            run_cfg = _variant(cfg, method, seed, "all", dataset=source, root=roots[source])
            report = run_experiment(run_cfg, source_store, source_out, register=False)
            table.add(method, source, report.accuracies()["all"], report.reports["all"].count)
            table.runs.append(report)
            for name, store in target_stores.items():
                target = eval_split(_variant(cfg, method, seed, "all", dataset=name, root=roots[name]), store, seed)
                result = evaluate_splits(run_cfg, report.checkpoint, store, {"all": target}, f"evaluate on {name}")["all"]
                table.add(method, name, 100 * result.accuracy, result.count)
    return table


def run_protocol(cfg: Config, output: str, protocol: str, data: str | None = None) -> ProtocolTable:
    from bimors.models.classifier import check_learner_config

    for method in cfg.evaluate.methods:  # before any featurizing: a config mistake costs seconds
        check_learner_config(_variant(cfg, method, cfg.seed, "all"))
    if protocol == "base2new":
        table = base_to_new(cfg, output, data)
    elif protocol in ("cross-dataset", "domain-generalization"):
        table = transfer(cfg, output, protocol)
    else:
        raise ConfigError(f"unknown protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")
    storage.write_bytes(storage.join(output, "tables", f"{protocol}.md"), table.markdown().encode(), cfg.storage)
    storage.write_bytes(storage.join(output, "tables", f"{protocol}.csv"), table.csv().encode(), cfg.storage)
    _log_table(cfg, table)
    return table


def _log_table(cfg: Config, table: ProtocolTable) -> None:
    from bimors import tracking

    if not cfg.tracking.enabled:
        return
    uri = tracking.tracking_uri(cfg.tracking)
    run_id = tracking.start_run(cfg, f"protocol-{table.protocol}", {"protocol": table.protocol})
    metrics = {}
    for method in table.values:
        for column in table.columns:
            mean, std, n = table.cell(method, column)
            if n:
                metrics[f"{method}.{column}.mean"] = mean
                metrics[f"{method}.{column}.std"] = std
    tracking.log_metrics(uri, run_id, metrics)
    tracking.log_text(uri, run_id, table.markdown(), f"tables/{table.protocol}.md")
    tracking.log_text(uri, run_id, table.csv(), f"tables/{table.protocol}.csv")
    tracking.end_run(uri, run_id)

