"""Ray Train: one and two workers, online features, and a worker killed mid-run (real local Ray)."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch

from bimors.config import Config
from bimors.data.synthetic import generate_synthetic
from bimors.pipelines.experiment import prepare_store
from bimors.pipelines.protocol_data import protocol_data
from bimors.pipelines.train import fit

pytestmark = pytest.mark.slow
CLASSES = ["beach", "bridge", "desert", "forest", "harbor", "river"]
EPOCHS = 6


def small_config(base: Config, root: str) -> Config:
    return base.model_validate(
        base.model_dump()
        | {
            "data": base.data.model_dump()
            | {
                "root": root,
                "generate_synthetic": False,
                "shots": 4,
                "subsample": "base",
                "synthetic": base.data.synthetic.model_dump() | {"classes": CLASSES, "images_per_class": 14},
            },
            "featurize": base.featurize.model_dump()
            | {
                "seeds": [1],
                "decode": {"batch_size": 16, "num_cpus": 0.25},
                "caption": {"batch_size": 16, "actors": 1, "num_cpus": 0.25},
                "clip": {"batch_size": 16, "actors": 1, "num_cpus": 0.25},
            },
            "optim": base.optim.model_dump() | {"epochs": EPOCHS, "batch_size": 4, "lr": 0.05, "warmup_epochs": 1},
            "train": base.train.model_dump() | {"cpus_per_worker": 0.5},
            "evaluate": base.evaluate.model_dump() | {"predict": {"batch_size": 64, "actors": 1, "num_cpus": 0.25}},
            "tracking": {"enabled": False},
        }
    )


@pytest.fixture(scope="module")
def small(ray_cluster, tiny_config, tmp_path_factory):
    """A synthetic dataset featurized once: (config, output folder, store, base-class protocol data)."""
    root = tmp_path_factory.mktemp("train")
    cfg = small_config(tiny_config, str(root / "tiles"))
    generate_synthetic(cfg.data.root, cfg.data.synthetic)
    store = prepare_store(cfg, str(root / "out"))
    return cfg, str(root / "out"), store, protocol_data(cfg, store, seed=1)


@pytest.fixture(scope="module")
def one_worker(small):
    cfg, output, _, data = small
    return fit(cfg, data, f"{output}/runs", "one-worker")


def test_one_worker_fits_and_keeps_the_best_checkpoint(small, one_worker):
    cfg, output, _, data = small
    history = one_worker.history
    assert [h["epoch"] for h in history] == list(range(EPOCHS))
    assert history[-1]["loss"] < history[0]["loss"]
    assert history[0]["lr"] == cfg.optim.warmup_lr
    assert len(data.splits["train"]) == 4 * len(data.classnames) and data.classnames == CLASSES[:3]
    best = Path(one_worker.checkpoint)
    assert (best / "learner.json").is_file() and (best / "learner.safetensors").is_file()
    best_epoch = max(range(EPOCHS), key=lambda e: (history[e]["val_acc"], e))
    import json

    assert json.loads((best / "train_state.json").read_text())["state"]["epoch"] == best_epoch + 1
    kept = sorted(p.name for p in (Path(output) / "runs" / "one-worker").glob("checkpoint_*"))
    assert 1 <= len(kept) <= 2  # the best and the latest


def test_two_workers_follow_the_one_worker_curve(small, one_worker):
    cfg, output, _, data = small
    two = cfg.model_copy(update={"train": cfg.train.model_copy(update={"workers": 2})})
    result = fit(two, data, f"{output}/runs", "two-workers")
    for a, b in zip(one_worker.history, result.history, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4, abs=1e-5)
        assert b["train_acc"] == pytest.approx(a["train_acc"])
        assert b["val_acc"] == pytest.approx(a["val_acc"])


def test_online_features_train_through_the_image_encoder(small, one_worker, backbone):
    """train.features=online: every step decodes its tiles, crops and flips them and runs the frozen
    image encoder (``encoded_images`` counts them). With the augmentation switched off the loop must
    reproduce the cached run (same encoder, same tiles in the same order); switched on, the losses must
    move away from it (cached features cannot give the losses of random crops)."""
    from bimors.data.augment import random_resized_crop_flip
    from bimors.data.tiles import read_tile

    cfg, output, _, data = small
    # the augmentation itself: off, it is the featurize (cached) view of a tile; on, it is not
    uri = data.splits["train"].column("uri")[0].as_py()
    tile = read_tile(uri, cfg.data.decode, cfg.storage, cfg.featurize.max_side)
    whole = backbone.preprocess([tile])
    crop = lambda seed, **kw: backbone.preprocess(  # noqa: E731
        random_resized_crop_flip(tile, backbone.image_size, torch.Generator().manual_seed(seed), **kw)[None]
    )
    assert torch.allclose(crop(0, scale=(1.0, 1.0), flip=False), whole, atol=1e-5)
    assert not any(torch.allclose(crop(s, scale=cfg.train.augment.crop_scale), whole, atol=1e-2) for s in range(4))

    def online(name: str, **augment) -> list[dict]:
        run = cfg.model_copy(update={
            "train": cfg.train.model_copy(update={
                "features": "online", "augment": cfg.train.augment.model_copy(update=augment),
            }),
            "optim": cfg.optim.model_copy(update={"epochs": 2}),
        })
        return fit(run, data, f"{output}/runs", name).history

    cached = one_worker.history
    plain, augmented = online("online-plain", crop_scale=(1.0, 1.0), flip=False), online("online")
    per_epoch = len(data.splits["train"]) // cfg.optim.batch_size * cfg.optim.batch_size
    assert [h["encoded_images"] for h in cached] == [0] * EPOCHS
    assert [h["encoded_images"] for h in plain] == [h["encoded_images"] for h in augmented] == [per_epoch] * 2
    # epoch 0 runs at the warm-up rate whatever the number of epochs: the same steps from the same start
    # (the cached visual tokens are float16, the loop's float32: a ~1e-7 difference)
    assert plain[0]["loss"] == pytest.approx(cached[0]["loss"], rel=1e-5)
    assert plain[0]["train_acc"] == cached[0]["train_acc"]
    assert augmented[0]["loss"] != pytest.approx(cached[0]["loss"], rel=1e-4)
    for a, p in zip(augmented, plain, strict=True):  # identical runs but for the augmentation
        assert a["loss"] != pytest.approx(p["loss"], rel=1e-4)


def processes_titled(prefix: str) -> list[int]:
    """PIDs of processes whose title (Ray sets ``ray::<Actor>...``) starts with ``prefix``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                title = (entry / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
            except OSError:
                continue
            if title.startswith(prefix):
                pids.append(int(entry.name))
    return pids


def test_a_killed_worker_resumes_from_its_checkpoint_and_ends_the_same(small, one_worker):
    cfg, output, _, data = small
    run_dir = Path(output) / "runs" / "killed"
    killed: list[int] = []

    def registered_checkpoint() -> bool:
        """A checkpoint the Ray Train controller has accepted (it is listed in the run's snapshot)."""
        try:
            return "checkpoint_dir_name" in (run_dir / "checkpoint_manager_snapshot.json").read_text()
        except OSError:
            return False

    def kill_after_first_checkpoint() -> None:
        deadline = time.time() + 120
        while time.time() < deadline and not registered_checkpoint():
            time.sleep(0.02)
        for pid in processes_titled("ray::RayTrainWorker"):
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    killer = threading.Thread(target=kill_after_first_checkpoint, daemon=True)
    killer.start()
    result = fit(cfg, data, f"{output}/runs", "killed")
    killer.join()
    assert killed, "no worker was killed"
    assert len(result.resumed_at) == 1 and 0 < result.resumed_at[0] < EPOCHS, result.resumed_at
    for a, b in zip(one_worker.history, result.history, strict=True):
        a, b = ({k: v for k, v in h.items() if k != "epoch_seconds"} for h in (a, b))
        assert b == pytest.approx(a, rel=1e-6, abs=1e-7)


def test_checkpoints_go_to_object_storage(small, s3_server, s3_storage, backbone):
    from bimors import storage
    from bimors.pipelines.inference import Predictor

    cfg, _, store, data = small
    on_s3 = cfg.model_copy(update={"storage": s3_storage, "optim": cfg.optim.model_copy(update={"epochs": 2})})
    bucket = s3_server.create_bucket("runs")
    result = fit(on_s3, data, f"s3://{bucket}/runs", "to-s3")
    assert result.checkpoint.startswith(f"s3://{bucket}/runs/to-s3/checkpoint_")
    assert storage.exists(storage.join(result.checkpoint, "learner.safetensors"), s3_storage)
    predictor = Predictor.from_checkpoint(on_s3, result.checkpoint, backbone=backbone)
    test = store.features(tile_ids=set(data.tests["base"].rows.column("tile_id").to_pylist()))
    assert predictor.predict_table(test).shape == (len(test), len(data.classnames)) and len(test) > 0


def test_missing_features_are_computed_first_not_skipped(small):
    cfg, _, store, _ = small
    before = store.done_tile_ids()
    seed2 = protocol_data(cfg, store, seed=2)  # the store was featurized for seed 1's shots only
    after = store.done_tile_ids()
    assert after > before
    assert len(seed2.splits["train"]) == 4 * len(seed2.classnames)
    assert sum(seed2.unfeaturized.values()) == 0
