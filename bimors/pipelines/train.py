"""Fitting a prompt learner with Ray Train (TorchTrainer; DDP over gloo on CPU, NCCL on GPU).

Every worker reads the (few-shot, small) training rows through Ray Data and takes its slice of
each global batch, the way torch's DistributedSampler does: the global batches are a function of
(seed, epoch) only, so N workers compute the same gradient steps as one, and a run restarted
from a checkpoint continues exactly where it stopped.
"""

from __future__ import annotations

import json
import logging
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from safetensors.torch import load_file, save_file

from bimors import storage
from bimors.config import Config
from bimors.console import Progress
from bimors.models.checkpoint import load_learner, save_learner
from bimors.models.classifier import PromptClassifier, build_learner
from bimors.models.clip_backbone import FrozenCLIP
from bimors.models.frozen import resolve_dtype
from bimors.pipelines.inference import Features, Predictor, features_from_table, image_tower_features
from bimors.pipelines.protocol_data import ProtocolData, labels_of
from bimors.pipelines.schedule import build_optimizer, learning_rate, set_learning_rate

log = logging.getLogger(__name__)

TRAIN_STATE = "train_state.json"
OPTIMIZER_STATE = "optimizer.safetensors"


@dataclass
class TrainState:
    epoch: int = 0  # the next epoch to run
    history: list[dict[str, float]] = field(default_factory=list)
    resumed_at: list[int] = field(default_factory=list)  # epochs at which a restarted worker group picked up


@dataclass
class FitResult:
    run_name: str
    checkpoint: str  # the best checkpoint (by validation accuracy, else the last), a learner checkpoint folder URI
    history: list[dict[str, float]]
    classnames: list[str]
    resumed_at: list[int] = field(default_factory=list)


# ------------------------------------------------------------------------------------------
# checkpoints: learner (safetensors + JSON) + optimizer (safetensors) + progress (JSON)


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    state = optimizer.state_dict()
    tensors = {
        f"{index}.{name}": value.detach().cpu().contiguous()
        for index, entry in state["state"].items()
        for name, value in entry.items()
        if isinstance(value, torch.Tensor)
    }
    scalars = {
        f"{index}.{name}": value
        for index, entry in state["state"].items()
        for name, value in entry.items()
        if not isinstance(value, torch.Tensor)
    }
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, value in [*tensors.items(), *meta["scalars"].items()]:
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_training_checkpoint(
    directory: Path, learner, optimizer, state: TrainState, classnames: list[str], backbone: FrozenCLIP, cfg: Config
) -> None:
    save_learner(str(directory), learner, classnames, backbone.identity, cfg.model_dump(mode="json"),
                 extra={"epoch": state.epoch, "history": state.history})
    tensors, meta = _optimizer_tensors(optimizer)
    save_file(tensors, str(directory / OPTIMIZER_STATE))
    (directory / TRAIN_STATE).write_text(json.dumps({"state": asdict(state), "optimizer": meta}))


def restore_training_checkpoint(directory: Path, learner, optimizer, backbone: FrozenCLIP) -> TrainState:
    loaded = load_learner(str(directory), backbone)
    learner.load_state_dict(loaded.learner.state_dict())
    saved = json.loads((directory / TRAIN_STATE).read_text())
    _restore_optimizer(optimizer, load_file(str(directory / OPTIMIZER_STATE)), saved["optimizer"])
    return TrainState(**saved["state"])


# ------------------------------------------------------------------------------------------
# the loop each Ray Train worker runs


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[np.ndarray]:
    """Global batches of one epoch: a permutation drawn from (seed, epoch); the last partial batch
    is dropped when there is at least one full one (Dassl's rule)."""
    order = np.random.default_rng([seed, epoch]).permutation(n)
    if n >= batch_size:
        order = order[: n - n % batch_size]
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def _online_features(backbone: FrozenCLIP, uris: list[str], cfg: Config, generator: torch.Generator, uses: frozenset[str]) -> Features:
    """Fresh augmented crops through the frozen image tower (or, for a learner that prompts the
    tower, the crops themselves)."""
    from bimors.data.augment import random_resized_crop_flip

    crops = torch.stack([
        random_resized_crop_flip(_read(uri, cfg), backbone.image_size, generator, cfg.train.augment.crop_scale, cfg.train.augment.flip)
        for uri in uris
    ])
    return image_tower_features(backbone, backbone.preprocess(crops), uses, as_stored=False)


def _read(uri: str, cfg: Config):
    from bimors.data.tiles import read_tile

    return read_tile(uri, cfg.data.decode, cfg.storage, cfg.featurize.max_side)


def _validation_features(backbone: FrozenCLIP, rows: pa.Table, cfg: Config, uses: frozenset[str]) -> Features:
    """Stored features of the validation tiles; their pixels (no augmentation) for a learner that
    prompts the image tower."""
    if "pixels" not in uses:
        return features_from_table(rows, uses)
    uris = rows.column("uri").to_pylist()
    return Features(pixels=backbone.preprocess([_read(uri, cfg) for uri in uris]) if uris else None)


class _Objective(torch.nn.Module):
    """The classifier's training loss as a module's forward, so DDP sees (and syncs) the whole step."""

    def __init__(self, classifier: PromptClassifier):
        super().__init__()
        self.classifier = classifier

    def forward(self, labels: torch.Tensor, **features: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        return self.classifier.training_loss(labels, **features)


def _autocast(cfg: Config, device: torch.device):
    if device.type != "cuda":
        return torch.autocast("cpu", enabled=False), None
    dtype = resolve_dtype(cfg.train.precision, device)
    if dtype == torch.float32:
        return torch.autocast("cuda", enabled=False), None
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    return torch.autocast("cuda", dtype=dtype), scaler


def _rows(name: str) -> pa.Table:
    import ray.train

    shard = ray.train.get_dataset_shard(name)
    return pa.concat_tables(list(shard.iter_batches(batch_size=None, batch_format="pyarrow")))


def train_loop_per_worker(config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    cfg = Config.model_validate(config["cfg"])
    classnames: list[str] = config["classnames"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.seed)

    backbone = FrozenCLIP.load(cfg.model.backbone, cfg.storage, device)
    learner = build_learner(cfg.model.learner, backbone, caption_dim=config["caption_dim"])
    classifier = PromptClassifier(backbone, learner, classnames)
    model = _Objective(classifier)
    if world > 1:
        model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"broadcast_buffers": False})
    optimizer = build_optimizer(cfg.optim, classifier.trainable_parameters())
    state = TrainState()
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            state = restore_training_checkpoint(Path(directory), learner, optimizer, backbone)
        state.resumed_at.append(state.epoch)
        log.info("rank %d resumed at epoch %d", rank, state.epoch)

    train_rows, val_rows = _rows("train"), _rows("val")
    online = cfg.train.features == "online"
    train_feats = features_from_table(train_rows, learner.uses)
    train_labels = torch.from_numpy(labels_of(train_rows))
    uris = train_rows.column("uri").to_pylist()
    val_feats = _validation_features(backbone, val_rows, cfg, learner.uses) if rank == 0 else None
    val_labels = labels_of(val_rows)
    autocast, scaler = _autocast(cfg, device)
    local = cfg.optim.batch_size // world

    for epoch in range(state.epoch, cfg.optim.epochs):
        started = time.perf_counter()
        lr = learning_rate(cfg.optim, epoch)
        set_learning_rate(optimizer, lr)
        classifier.train()
        totals = torch.zeros(4, dtype=torch.float64)  # loss sum, correct, count, images encoded in the loop
        for step, batch in enumerate(epoch_batches(len(train_rows), cfg.optim.batch_size, cfg.seed, epoch)):
            mine = torch.from_numpy(batch[rank * local : (rank + 1) * local])
            feats = train_feats.take(mine)
            if online:  # fresh crops through the frozen image tower; captions still come from the store
                seed = int(np.random.SeedSequence([cfg.seed, epoch, step, rank]).generate_state(1)[0])
                image = _online_features(backbone, [uris[i] for i in mine.tolist()], cfg, torch.Generator().manual_seed(seed), learner.uses)
                feats = feats.replace(image)
                totals[3] += len(image)
            feats = feats.to(device)
            labels = train_labels[mine].to(device)
            with autocast:
                logits, loss = model(labels, **feats.as_dict())
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                optimizer.step()
            totals[:3] += torch.tensor([loss.item() * len(mine), (logits.argmax(-1) == labels).sum().item(), len(mine)], dtype=torch.float64)
        if world > 1:
            torch.distributed.all_reduce(totals)
        metrics = {
            "epoch": epoch,
            "epoch_seconds": time.perf_counter() - started,  # the optimisation steps, not validation or checkpointing
            "lr": lr,
            "loss": float(totals[0] / totals[2]),
            "train_acc": float(totals[1] / totals[2]),
            # tiles decoded, augmented and run through the frozen image encoder in this epoch, all
            # workers together: every training tile with features=online, 0 with cached features
            "encoded_images": int(totals[3]),
        }
        if rank == 0 and len(val_rows):
            predictions = Predictor(classifier).probabilities(val_feats, cfg.train.eval_batch_size).argmax(-1)
            metrics["val_acc"] = float((predictions == val_labels).mean())
        state.epoch, state.history = epoch + 1, [*state.history, metrics]
        if rank == 0 and config.get("mlflow_run_id"):
            from bimors import tracking

            tracking.log_metrics(config["mlflow_uri"], config["mlflow_run_id"], metrics, step=epoch)
        if rank == 0:
            with tempfile.TemporaryDirectory() as tmp:
                save_training_checkpoint(Path(tmp), learner, optimizer, state, classnames, backbone, cfg)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
            _show_progress(config.get("progress"), metrics)
        else:
            ray.train.report(metrics)


def _show_progress(queue, metrics: dict[str, Any]) -> None:
    """Hand an epoch's metrics to the driver's progress display; a display gone away is no error."""
    if queue is None:
        return
    try:
        queue.put_nowait(metrics)
    except Exception:  # noqa: BLE001
        log.debug("progress queue unavailable", exc_info=True)


# ------------------------------------------------------------------------------------------
# the driver side


def fit(cfg: Config, data: ProtocolData, runs_uri: str, run_name: str, mlflow: tuple[str, str] | None = None) -> FitResult:
    """Train on ``data`` with ``train.workers`` Ray Train workers; checkpoints go to ``runs_uri/run_name``."""
    import ray.data
    import ray.train
    from ray.train.torch import TorchTrainer

    from bimors.pipelines.runtime import ensure_ray

    ensure_ray()
    filesystem, path = storage.pyarrow_filesystem(runs_uri, cfg.storage)
    resources = {"CPU": cfg.train.cpus_per_worker} | ({"GPU": 1} if cfg.train.use_gpu else {})
    progress = _EpochProgress(cfg.optim.epochs)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "cfg": cfg.model_dump(mode="python"),
            "classnames": data.classnames,
            "caption_dim": data.caption_dim,
            "mlflow_uri": mlflow[0] if mlflow else None,
            "mlflow_run_id": mlflow[1] if mlflow else None,
            "progress": progress.queue,
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.train.workers, use_gpu=cfg.train.use_gpu, resources_per_worker=resources
        ),
        run_config=ray.train.RunConfig(
            name=run_name,
            storage_path=path,
            storage_filesystem=filesystem,
            failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=1, checkpoint_score_attribute="val_acc" if len(data.splits["val"]) else "epoch",
                checkpoint_score_order="max",
            ),
        ),
        datasets={name: _quiet_dataset(data.splits[name]) for name in ("train", "val")},
        dataset_config=ray.train.DataConfig(datasets_to_split=[]),
    )
    with progress:
        result = trainer.fit()
    # the last checkpoint holds the whole history; the best one only up to its epoch
    last = json.loads(storage.read_bytes(storage.join(_as_uri(result.checkpoint), TRAIN_STATE), cfg.storage))["state"]
    return FitResult(run_name, _best_checkpoint(result), last["history"], data.classnames, last["resumed_at"])


class _EpochProgress:
    """Per-epoch progress on the driver's console while ``trainer.fit()`` blocks: rank 0 puts each
    epoch's metrics into a Ray queue (an actor that takes no CPU), a thread here shows them."""

    def __init__(self, epochs: int):
        from ray.util.queue import Queue

        self.queue = Queue(actor_options={"num_cpus": 0})
        self.progress = Progress("train", epochs, "epochs")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._drain, name="epoch-progress", daemon=True)

    def __enter__(self) -> "_EpochProgress":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._show_waiting()
        self.progress.close()
        self.queue.shutdown()

    def _drain(self) -> None:
        from ray.util.queue import Empty

        while not self._stop.is_set():
            try:
                self._show(self.queue.get(timeout=0.5))
            except Empty:
                continue
            except Exception:  # noqa: BLE001 - progress is a nicety; never fail the run over it
                return

    def _show_waiting(self) -> None:
        try:
            while not self.queue.empty():
                self._show(self.queue.get_nowait())
        except Exception:  # noqa: BLE001
            pass

    def _show(self, metrics: dict[str, Any]) -> None:
        note = f"loss {metrics['loss']:.3f}, train acc {100 * metrics['train_acc']:.1f}%"
        if "val_acc" in metrics:
            note += f", val acc {100 * metrics['val_acc']:.1f}%"
        self.progress.update(max(0, int(metrics["epoch"]) + 1 - self.progress.done), note)


def _quiet_dataset(table: pa.Table):
    """A Ray dataset of a few hundred rows, without a progress bar left running in every worker."""
    import ray.data

    ds = ray.data.from_arrow(table)
    ds.context.enable_progress_bars = False
    return ds


def _best_checkpoint(result) -> str:
    """URI of the checkpoint with the best validation accuracy (Ray keeps it and the latest)."""
    runs = result.best_checkpoints or [(result.checkpoint, {})]
    checkpoint, _ = max(runs, key=lambda item: (item[1].get("val_acc", float("-inf")), item[1].get("epoch", -1)))
    return _as_uri(checkpoint)


def _as_uri(checkpoint) -> str:
    fs = checkpoint.filesystem
    if fs is None or fs.type_name == "local":
        return checkpoint.path
    handler = getattr(fs, "handler", None)
    protocol = getattr(getattr(handler, "fs", None), "protocol", None)
    protocol = protocol[0] if isinstance(protocol, (tuple, list)) else protocol
    return f"{protocol}://{checkpoint.path}" if protocol else checkpoint.path

