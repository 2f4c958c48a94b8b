"""MLflow helpers for the training driver, rank 0 of Ray Train workers, the nightly job and serving.

Everything goes through an explicit tracking URI and an :class:`mlflow.MlflowClient` bound to it,
never through MLflow's process-global "active run" or "current tracking URI": a Ray worker in
another process can keep logging to a run the driver created, and two configs in one process do
not leak into each other. The only place that has to touch MLflow's globals is
:func:`register_model` (see :func:`_scoped_tracking_uri` for why and how it undoes it).

Secrets never reach MLflow: params come from :func:`bimors.config.flatten`, which masks
``SecretStr`` values, and the config artifacts drop them entirely (:func:`config_yaml`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Iterator, Sequence

import yaml
from pydantic import BaseModel, SecretStr

from bimors import storage
from bimors.config import Config, TrackingConfig, flatten
from bimors.errors import BimorsError
from bimors.models.checkpoint import META

DEFAULT_URI = "sqlite:///mlflow.db"
MODEL_NAME = "model"  # the logged model's name, i.e. the "model" in runs:/<run_id>/model
MODEL_CODE = Path(__file__).with_name("mlflow_model.py")

# MLflow's server-side limits (mlflow/utils/validation.py).
_MAX_PARAM_VALUE = 6000
_MAX_PARAMS_PER_BATCH = 100
_MAX_METRICS_PER_BATCH = 1000


class TrackingError(BimorsError, RuntimeError):
    """A tracking or registry lookup failed; the message names the URI and what is missing."""


# --------------------------------------------------------------------------------------------
# where to track


def tracking_uri(cfg: TrackingConfig) -> str:
    """``tracking.uri`` if set, else ``MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db``.

    This is the one place tracking reads the environment. A relative SQLite path is
    made absolute against the current directory here, on the driver, because the resolved URI is
    handed to Ray workers whose working directory is elsewhere; a SQLite file still only works
    where that path is shared, so multi-node clusters should use an ``http(s)://`` server."""
    uri = cfg.uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI
    if uri.startswith("sqlite:///"):
        path, sep, query = uri[len("sqlite:///") :].partition("?")
        if path and path != ":memory:" and not os.path.isabs(path):
            return f"sqlite:///{os.path.abspath(os.path.expanduser(path))}{sep}{query}"
    return uri


def _sqlite_path(uri: str) -> Path | None:
    if not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///") :].partition("?")[0]
    return Path(path) if os.path.isabs(path) else None


def _client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def run_url(uri: str, run_id: str) -> str:
    """Where a user finds the run: the UI link for a server, else the store and how to open it."""
    if uri.startswith(("http://", "https://")):
        experiment_id = _client(uri).get_run(run_id).info.experiment_id
        return f"{uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"
    return f"run {run_id} in {uri} (open it with: mlflow ui --backend-store-uri {uri})"


# --------------------------------------------------------------------------------------------
# runs


def config_yaml(cfg: Config) -> str:
    """The config as YAML that :func:`bimors.config.load_config` reads back. Secrets are left out
    (null) rather than masked: a masked value would load as a bogus credential, while null falls
    back to the environment's credential chain where the model is used."""
    return yaml.safe_dump(_without_secrets(cfg), sort_keys=False)


def _without_secrets(model: BaseModel) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in type(model).model_fields:
        value = getattr(model, name)
        if isinstance(value, SecretStr):
            out[name] = None
        elif isinstance(value, BaseModel):
            out[name] = _without_secrets(value)
        else:
            out[name] = model.model_dump(mode="json", include={name})[name]
    return out


def _param_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value)  # None -> "null", True -> "true"
    return text if len(text) <= _MAX_PARAM_VALUE else text[: _MAX_PARAM_VALUE - 3] + "..."


def _batches(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _experiment_id(client: Any, name: str) -> str:
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    # A SQLite store keeps its artifacts beside the database file: MLflow's default is ./mlruns
    # of whichever process happens to create the experiment.
    db = _sqlite_path(client.tracking_uri)
    location = (db.parent / "mlruns").as_uri() if db is not None else None
    try:
        return client.create_experiment(name, artifact_location=location)
    except MlflowException:  # another job created it in the meantime
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


def start_run(cfg: Config, run_name: str, tags: dict[str, str] | None = None) -> str:
    """Create a run (and the experiment, if needed) with the flattened config as params and the
    config as ``config.yaml``; return its id. The run is not made the process's active run, so
    any process can log to it by id; close it with :func:`end_run`."""
    from mlflow.entities import Param

    uri = tracking_uri(cfg.tracking)
    client = _client(uri)
    run = client.create_run(_experiment_id(client, cfg.tracking.experiment), run_name=run_name, tags=tags)
    run_id = run.info.run_id
    try:
        params = [Param(key, _param_value(value)) for key, value in flatten(cfg).items()]
        for batch in _batches(params, _MAX_PARAMS_PER_BATCH):
            client.log_batch(run_id, params=list(batch))
        client.log_text(run_id, config_yaml(cfg), "config.yaml")
    except BaseException:
        with contextlib.suppress(Exception):  # keep the original error, not a follow-up one
            client.set_terminated(run_id, "FAILED")
        raise
    return run_id


def log_metrics(uri: str, run_id: str, metrics: dict[str, float], step: int | None = None) -> None:
    from mlflow.entities import Metric

    timestamp = int(time.time() * 1000)
    entries = [Metric(key, float(value), timestamp, step or 0) for key, value in metrics.items()]
    client = _client(uri)
    for batch in _batches(entries, _MAX_METRICS_PER_BATCH):
        client.log_batch(run_id, metrics=list(batch))


def log_figure(uri: str, run_id: str, figure: Any, artifact_file: str) -> None:
    """``figure``: a matplotlib Figure (e.g. from :mod:`bimors.plots`); ``artifact_file`` ends in .png."""
    _client(uri).log_figure(run_id, figure, artifact_file)


def log_dir(uri: str, run_id: str, local_dir: str, artifact_path: str | None = None) -> None:
    _client(uri).log_artifacts(run_id, local_dir, artifact_path)


def log_text(uri: str, run_id: str, text: str, artifact_file: str) -> None:
    _client(uri).log_text(run_id, text, artifact_file)


def end_run(uri: str, run_id: str, status: str = "FINISHED") -> None:
    """``status``: FINISHED, FAILED or KILLED."""
    _client(uri).set_terminated(run_id, status)


# --------------------------------------------------------------------------------------------
# registry


@contextlib.contextmanager
def _scoped_tracking_uri(uri: str) -> Iterator[None]:
    """Point MLflow's global tracking URI at ``uri`` for the duration, then restore it exactly.

    Needed because ``Model.log`` (what ``mlflow.pyfunc.log_model`` calls) and the LoggedModel
    finalisation inside it only talk to the global URI. Restoring "exactly" means: a URI that was
    never set stays unset (so ``MLFLOW_TRACKING_URI`` keeps working), and the variable itself,
    which ``mlflow.set_tracking_uri`` rewrites, is put back. MLflow has no public getter for "the
    URI set by set_tracking_uri, if any", hence the private module attribute. Not thread-safe:
    model registration happens once per training job, on the driver."""
    import mlflow
    from mlflow.tracking._tracking_service import utils as mlflow_tracking_utils

    previous = getattr(mlflow_tracking_utils, "_tracking_uri", None)
    previous_env = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)  # None: back to unset (this also drops the variable)
        if previous_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = previous_env


def _signature() -> Any:
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("string", "uri")]),
        outputs=Schema(
            [ColSpec("string", "uri"), ColSpec("string", "label"), ColSpec("double", "probability"),
             ColSpec("string", "caption")]
        ),
    )


def _requirements() -> list[str]:
    """Pinned instead of inferred: inference would import and run the model in a subprocess at log
    time (loading every frozen encoder) just to find out that it needs bimors."""
    from importlib.metadata import PackageNotFoundError, version

    import mlflow

    try:
        bimors = f"bimors=={version('bimors')}"
    except PackageNotFoundError:
        bimors = "bimors"
    return [bimors, f"mlflow=={mlflow.__version__}"]


def register_model(cfg: Config, run_id: str, checkpoint_dir: str) -> int:
    """Log a learner checkpoint as the pyfunc model ``model`` of run ``run_id`` (models from code:
    :mod:`bimors.mlflow_model` plus the checkpoint folder and the config as artifacts, nothing
    pickled), register it as a new version of ``tracking.registered_model``, point
    ``tracking.alias`` at that version and return the version number."""
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.models import Model

    name = cfg.tracking.registered_model
    if not name:
        raise TrackingError("tracking.registered_model is not set: there is no registry name to register under")
    uri = tracking_uri(cfg.tracking)
    local = storage.stage_local(checkpoint_dir, cfg.storage)
    if not (local / META).is_file():
        raise TrackingError(f"{checkpoint_dir}: not a learner checkpoint (no {META} there)")
    client = _client(uri)
    experiment_id = client.get_run(run_id).info.experiment_id
    with tempfile.TemporaryDirectory(prefix="bimors-model-") as tmp:
        shutil.copytree(local, Path(tmp) / "checkpoint")
        (Path(tmp) / "config.yaml").write_text(config_yaml(cfg))
        # Created here so it lands in the run's experiment: Model.log would put it in the
        # process's current experiment (Default, "0") when no run is active.
        logged = client.create_logged_model(experiment_id, name=MODEL_NAME, source_run_id=run_id)
        with _scoped_tracking_uri(uri), warnings.catch_warnings():
            # An input example would make MLflow run the model (every frozen encoder) at log time;
            # the explicit signature documents the input instead.
            warnings.filterwarnings("ignore", message=".*input example was not provided.*")
            Model.log(
                artifact_path=None,  # deprecated spelling of `name`, but still a required argument
                name=MODEL_NAME,
                flavor=mlflow.pyfunc,
                flavor_name="pyfunc.ModelFromCode",
                run_id=run_id,
                model_id=logged.model_id,
                python_model=str(MODEL_CODE),
                artifacts={"checkpoint": str(Path(tmp) / "checkpoint"), "config": str(Path(tmp) / "config.yaml")},
                signature=_signature(),
                pip_requirements=_requirements(),
            )
    try:
        client.create_registered_model(name)
    except MlflowException as err:
        if err.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise
    # The concrete artifact location (not models:/<id>) as source: a SQLite registry resolves a
    # models:/ source through the global tracking URI, which may be another store.
    artifact_location = client.get_logged_model(logged.model_id).artifact_location
    version = client.create_model_version(name, artifact_location, run_id=run_id, model_id=logged.model_id)
    client.set_registered_model_alias(name, cfg.tracking.alias, version.version)
    return int(version.version)


# --------------------------------------------------------------------------------------------
# resolving --model


def resolve_checkpoint(model_uri: str, cfg: Config) -> str:
    """The learner checkpoint behind ``--model``.

    ``models:/name@alias``, ``models:/name/<version>`` and ``runs:/<run_id>/<path>`` are looked up
    in the configured tracking server and downloaded once into ``storage.cache_dir``; the local
    folder holding ``learner.json`` is returned. Anything else is a checkpoint URI (local path,
    ``file://``, ``s3://``) and is returned unchanged once ``learner.json`` is found there."""
    if model_uri.startswith(("models:", "runs:")):
        uri = tracking_uri(cfg.tracking)
        source = _artifact_location(model_uri, uri)
        return str(_find_checkpoint(model_uri, _download(source, uri, cfg)))
    if not storage.exists(storage.join(model_uri, META), cfg.storage):
        raise TrackingError(
            f"{model_uri}: not a learner checkpoint (no {META} there); --model takes a checkpoint "
            "folder or an MLflow URI (models:/name@alias, models:/name/<version>, runs:/<run_id>/model)"
        )
    return model_uri


def pin_registry_uri(model_uri: str, cfg: Config) -> tuple[str, str, str | None]:
    """``models:/name@alias`` (or ``models:/name/<n>``) -> (``models:/name/<version>[/path]``, the
    version, the run that logged it): the registry URI that no alias move can change."""
    from mlflow.exceptions import MlflowException

    uri = tracking_uri(cfg.tracking)
    name, version, path = _registry_parts(model_uri, uri, _client(uri))
    try:
        run_id = _client(uri).get_model_version(name, version).run_id or None
    except MlflowException as err:
        raise TrackingError(f"{model_uri}: lookup in {uri} failed ({err.message})") from err
    return "models:/" + "/".join([name, str(version), *([path] if path else [])]), str(version), run_id


def _artifact_location(model_uri: str, uri: str) -> str:
    """Resolve a registry/run URI to the immutable artifact location it currently points at.

    Done with a client bound to ``uri`` rather than handing ``models:/`` to MLflow's downloader,
    which resolves registry names through the process-global registry URI whatever tracking URI
    it is given."""
    from mlflow.exceptions import MlflowException

    client = _client(uri)
    scheme, _, rest = model_uri.partition(":")
    parts = [p for p in rest.split("/") if p]
    try:
        if scheme == "runs" and parts:
            return _run_artifact_location(client, model_uri, uri, parts[0], "/".join(parts[1:]))
        name, version, path = _registry_parts(model_uri, uri, client)
        location = client.get_model_version_download_uri(name, version)
        return storage.join(location, path) if path else location
    except MlflowException as err:
        raise TrackingError(f"{model_uri}: lookup in {uri} failed ({err.message})") from err


def _registry_parts(model_uri: str, uri: str, client: Any) -> tuple[str, str, str]:
    """(name, version, path inside the model) of ``models:/name@alias[/path]`` or
    ``models:/name/<n>[/path]``; the alias is looked up now."""
    parts = [p for p in model_uri.partition(":")[2].split("/") if p]
    if parts and "@" in parts[0]:
        name, _, alias = parts[0].partition("@")
        return name, _model_version(client, model_uri, uri, name, alias=alias), "/".join(parts[1:])
    if len(parts) >= 2 and parts[1].isdigit():
        return parts[0], _model_version(client, model_uri, uri, parts[0], version=parts[1]), "/".join(parts[2:])
    raise TrackingError(
        f"{model_uri}: expected models:/<name>@<alias>, models:/<name>/<version number> or runs:/<run_id>/<path>"
    )


def _model_version(client: Any, model_uri: str, uri: str, name: str, *, alias: str = "", version: str = "") -> str:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException as err:
        if err.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        raise TrackingError(f"{model_uri}: no registered model named {name!r} in {uri}") from None
    try:
        found = client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, version)
    except MlflowException as err:
        if err.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise
        what = f"no alias {alias!r}" if alias else f"no version {version}"
        raise TrackingError(f"{model_uri}: registered model {name!r} has {what} in {uri}") from None
    return found.version


def _run_artifact_location(client: Any, model_uri: str, uri: str, run_id: str, path: str) -> str:
    """A logged model named ``path`` from that run (MLflow 3 keeps model artifacts outside the
    run's artifact folder), else the run's own artifact at ``path``."""
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(run_id)
    except MlflowException as err:
        if err.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        raise TrackingError(f"{model_uri}: no run {run_id!r} in {uri}") from None
    if path and "/" not in path and "'" not in path:
        newest = client.search_logged_models(
            experiment_ids=[run.info.experiment_id],
            filter_string=f"name = '{path}' AND source_run_id = '{run_id}'",
            order_by=[{"field_name": "creation_timestamp", "ascending": False}],
            max_results=1,
        )
        if newest:
            return newest[0].artifact_location
    return storage.join(run.info.artifact_uri, path) if path else run.info.artifact_uri


def _download(source: str, uri: str, cfg: Config) -> Path:
    """Download ``source`` once into ``<cache_dir>/mlflow/<hash>`` (published whole, see
    :func:`bimors.storage.publish_folder`, so concurrent replicas never read half a model)."""
    import mlflow.artifacts

    root = Path(os.path.expanduser(cfg.storage.cache_dir)) / "mlflow"
    where = ".downloaded"  # the downloaded folder's path, relative to the entry

    def download(staging: Path) -> None:
        local = mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(staging), tracking_uri=uri)
        (staging / where).write_text(Path(local).relative_to(staging).as_posix())

    entry = storage.publish_folder(root / hashlib.sha256(f"{uri} {source}".encode()).hexdigest()[:16], download)
    if not (entry / where).exists():  # an entry downloaded before publish_folder: its marker holds the path
        return entry / (entry / storage.COMPLETE).read_text()
    return entry / (entry / where).read_text()


def _find_checkpoint(model_uri: str, local: Path) -> Path:
    """The checkpoint folder inside a download: the folder itself, or the pyfunc model's
    ``checkpoint`` artifact (read from its MLmodel file)."""
    if (local / META).is_file():
        return local
    mlmodel = local / "MLmodel"
    if mlmodel.is_file():
        flavor = (yaml.safe_load(mlmodel.read_text()) or {}).get("flavors", {}).get("python_function", {})
        relative = (flavor.get("artifacts") or {}).get("checkpoint", {}).get("path")
        if relative and (local / relative / META).is_file():
            return local / relative
        raise TrackingError(f"{model_uri}: an MLflow model, but not a bimors one (no checkpoint artifact with {META})")
    raise TrackingError(f"{model_uri}: no {META} in the downloaded artifacts (not a learner checkpoint)")
