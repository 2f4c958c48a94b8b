"""Ray Data stages of the featurize and scene pipelines. Each works on a batch of rows (numpy
format) and never fails the batch for one bad tile: the tile gets ``error``/``stage`` set and later
stages skip it.

Rows carry ``tile_id``, ``image`` (uint8 HWC), ``error`` and ``stage`` ("" when fine; a scene tile
without data has stage ``nodata`` and no error), plus the manifest or tile-grid columns. The model
stages call :class:`~bimors.pipelines.inference.CaptionModels` and
:class:`~bimors.pipelines.inference.Predictor` (or the backbone behind it), so featurize, the nightly
job and the endpoint encode a tile with the same code.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Sequence, TypeVar

import numpy as np
import torch

from bimors.config import Config, DecodeConfig, StorageConfig
from bimors.data.decode import DecodeError
from bimors.data.tiles import read_tile
from bimors.storage import StorageError

if TYPE_CHECKING:
    from bimors.pinned_model import PinnedModel

Batch = dict[str, np.ndarray]
T = TypeVar("T")
R = TypeVar("R")

PLACEHOLDER = np.zeros((1, 1, 3), np.uint8)


def object_array(items: Sequence[Any]) -> np.ndarray:
    """1-D object array (never broadcast into a higher-dimensional array when shapes agree)."""
    out = np.empty(len(items), dtype=object)
    for i, item in enumerate(items):
        out[i] = item
    return out


def one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:500]


def run_isolated(fn: Callable[[list[T]], list[R]], items: list[T]) -> list[R | BaseException]:
    """``fn`` on the whole batch; if that fails, item by item, so only the culprit is lost."""
    if not items:
        return []
    try:
        return list(fn(items))
    except Exception:  # noqa: BLE001 - isolate whatever broke the batch
        out: list[R | BaseException] = []
        for item in items:
            try:
                out.extend(fn([item]))
            except Exception as err:  # noqa: BLE001
                out.append(err)
        return out


def pick_device(num_gpus: float) -> torch.device:
    return torch.device("cuda" if num_gpus > 0 and torch.cuda.is_available() else "cpu")


def decode_batch(batch: Batch, decode_cfg: DecodeConfig, storage_cfg: StorageConfig | None, max_side: int) -> Batch:
    images, errors, stages = [], [], []
    for uri in batch["uri"]:
        try:
            images.append(read_tile(str(uri), decode_cfg, storage_cfg, max_side))
            errors.append("")
            stages.append("")
        except StorageError as err:
            images.append(PLACEHOLDER)
            errors.append(str(err))
            stages.append("read")
        except Exception as err:  # noqa: BLE001 - whatever the decoder chokes on is a decode error
            images.append(PLACEHOLDER)
            errors.append(str(err) if isinstance(err, DecodeError) else one_line(err))
            stages.append("decode")
    batch["image"] = object_array(images)
    batch["error"] = np.array(errors, dtype=object)
    batch["stage"] = np.array(stages, dtype=object)
    return batch


def _healthy(batch: Batch) -> list[int]:
    return [i for i, (err, stage) in enumerate(zip(batch["error"], batch["stage"])) if not err and not stage]


def _record(batch: Batch, index: int, stage: str, err: BaseException) -> None:
    batch["error"][index] = one_line(err)
    batch["stage"][index] = stage


class CaptionStage:
    """BLIP-2 caption + BERT caption embedding, one model pair per actor."""

    def __init__(self, cfg: Config, num_gpus: float = 0.0):
        from bimors.pipelines.inference import CaptionModels

        models = CaptionModels(cfg, pick_device(num_gpus))
        self.captioner, self.encoder = models.captioner, models.encoder

    def __call__(self, batch: Batch) -> Batch:
        n = len(batch["tile_id"])
        captions = [""] * n
        embeddings = np.zeros((n, self.encoder.dim), np.float32)
        rows = _healthy(batch)
        results = run_isolated(self.captioner.caption, [batch["image"][i] for i in rows])
        good = []
        for i, result in zip(rows, results):
            if isinstance(result, BaseException):
                _record(batch, i, "caption", result)
            else:
                captions[i] = result
                good.append(i)
        embedded = run_isolated(lambda caps: list(self.encoder.encode(caps).cpu().numpy()), [captions[i] for i in good])
        for i, result in zip(good, embedded):
            if isinstance(result, BaseException):
                _record(batch, i, "caption_embedding", result)
            else:
                embeddings[i] = result
        batch["caption"] = np.array(captions, dtype=object)
        batch["caption_emb"] = embeddings
        return batch


class ClipStage:
    """Frozen CLIP image tower: normalised embedding and (optionally) the visual tokens and the
    per-block token means."""

    def __init__(self, cfg: Config, num_gpus: float = 0.0, layer_means: bool = False):
        from bimors.models.clip_backbone import FrozenCLIP

        self.backbone = FrozenCLIP.load(cfg.model.backbone, cfg.storage, pick_device(num_gpus))
        self.keep_tokens = cfg.featurize.visual_tokens
        self.keep_means = layer_means  # the store's choice (its identity), not this config's

    def _encode(self, images: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray | None]]:
        feats = self.backbone.encode_image(self.backbone.preprocess(images), layer_means=self.keep_means)
        emb = feats.embedding.cpu().numpy()
        tokens = feats.tokens.to(torch.float16).cpu().numpy()
        means = feats.layer_means.to(torch.float16).cpu().numpy() if feats.layer_means is not None else [None] * len(emb)
        return list(zip(emb, tokens, means))

    def __call__(self, batch: Batch) -> Batch:
        n = len(batch["tile_id"])
        b = self.backbone
        n_tokens = 1 + (b.image_size // b.model.visual.patch_size[0]) ** 2
        image_emb = np.zeros((n, b.embed_dim), np.float32)
        tokens = np.zeros((n, n_tokens, b.vision_width), np.float16) if self.keep_tokens else None
        means = np.zeros((n, b.vision_layers, b.vision_width), np.float16) if self.keep_means else None
        rows = _healthy(batch)
        for i, result in zip(rows, run_isolated(self._encode, [batch["image"][i] for i in rows])):
            if isinstance(result, BaseException):
                _record(batch, i, "clip", result)
                continue
            image_emb[i] = result[0]
            if tokens is not None:
                tokens[i] = result[1]
            if means is not None:
                means[i] = result[2]
        batch["image_emb"] = image_emb
        if tokens is not None:
            batch["visual_tokens"] = tokens
        if means is not None:
            batch["layer_means"] = means
        del batch["image"]  # pixels are not stored; dropping them here keeps the writer's input small
        return batch


class ClassifyStage:
    """CLIP + the pinned prompt learner (:meth:`Predictor.classify_images`): the best class and its
    probability per tile, from the pixels and, for learners that read them, the caption embeddings
    of the caption stage. Drops the pixels: what leaves this stage is small."""

    def __init__(self, cfg: Config, model: "PinnedModel", num_gpus: float = 0.0):
        from bimors.pinned_model import load_pinned

        self.predictor = load_pinned(cfg, model, pick_device(num_gpus), encoders=False)

    def _classify(self, batch: Batch, rows: list[int]) -> list[np.ndarray]:
        from bimors.pipelines.inference import Captioned

        captioned = None
        if self.predictor.needs_captions:
            embeddings = torch.from_numpy(np.stack([batch["caption_emb"][i] for i in rows]))
            captioned = Captioned([str(batch["caption"][i]) for i in rows], embeddings)
        return list(self.predictor.classify_images([batch["image"][i] for i in rows], captioned))

    def __call__(self, batch: Batch) -> Batch:
        n = len(batch["tile_id"])
        class_index = np.full(n, -1, np.int16)
        probability = np.zeros(n, np.float32)
        rows = _healthy(batch)
        for i, result in zip(rows, run_isolated(lambda part: self._classify(batch, part), rows)):
            if isinstance(result, BaseException):
                _record(batch, i, "classify", result)
                continue
            class_index[i] = int(result.argmax())
            probability[i] = float(result[class_index[i]])
        batch["class_index"] = class_index
        batch["probability"] = probability
        del batch["image"]
        batch.pop("caption_emb", None)
        return batch
