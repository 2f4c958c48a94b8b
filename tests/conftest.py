"""Shared test setup: offline, quiet, and never near real AWS.

The environment below is set when pytest imports this file, before any test module imports
bimors, transformers or Ray, so child processes (Ray workers, subprocesses) inherit it too.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

# -- offline and quiet -------------------------------------------------------------------------
os.environ.update(
    {
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "RAY_USAGE_STATS_ENABLED": "0",
        # Ray Train's controller polls workers every 2 s by default, and each epoch's report waits for
        # a poll: fine for real epochs, most of the time of the tests' tiny ones.
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25",
        "MLFLOW_DISABLE_TELEMETRY": "true",
    }
)

# -- never real AWS: no profile, no credentials, no config files, no instance metadata ---------
for _name in [n for n in os.environ if n.startswith("AWS_")]:
    del os.environ[_name]
os.environ.update(
    {
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        "AWS_EC2_METADATA_DISABLED": "true",
    }
)

import pytest  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from s3_server import FAKE_KEY, FAKE_SECRET, REGION, S3Server  # noqa: E402

pytest_plugins = ["model_fixtures"]


def _clear_s3fs_instances() -> None:
    """s3fs caches filesystem objects (and with them credentials/endpoint resolved from the
    environment) per process; a test that changes the environment must not get an old one."""
    s3fs = sys.modules.get("s3fs")
    if s3fs is not None:
        s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture(autouse=True)
def _fresh_s3fs_instances():
    _clear_s3fs_instances()
    yield


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A moto S3 server on 127.0.0.1 (own process, real TCP listener) for the whole session.

    Yields an :class:`s3_server.S3Server`: ``.endpoint_url``, ``.create_bucket(prefix)`` (fresh,
    unique name), ``.client()`` (boto3, for writes "from another client"), ``.put``/``.delete``,
    and ``.env()`` (AWS_* variables pointing at it, for subprocesses and Ray workers)."""
    server = S3Server(log_dir=tmp_path_factory.mktemp("moto")).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_bucket(s3_server) -> str:
    """Name of a fresh, empty bucket on the test server."""
    return s3_server.create_bucket()


@pytest.fixture
def tmp_cache(tmp_path) -> Path:
    """An empty folder for ``storage.cache_dir`` (staged copies of remote files)."""
    path = tmp_path / "cache"
    path.mkdir()
    return path


@pytest.fixture
def s3_storage(s3_server, tmp_cache):
    """A :class:`bimors.config.StorageConfig` pointing at the test server with fake credentials
    and a per-test cache folder."""
    from bimors.config import StorageConfig

    return StorageConfig(
        endpoint_url=s3_server.endpoint_url,
        region=REGION,
        key=FAKE_KEY,
        secret=FAKE_SECRET,
        cache_dir=str(tmp_cache),
    )


@pytest.fixture
def s3_env(s3_server, monkeypatch) -> dict[str, str]:
    """The standard AWS environment (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY/AWS_DEFAULT_REGION/
    AWS_ENDPOINT_URL) pointing at the test server, for code paths that use the default AWS chain.
    Returns the variables that were set; they are undone after the test."""
    env = s3_server.env()
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    _clear_s3fs_instances()
    return env


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray for the session (started once: workers and actor pools are reused by tests).
    Yields the cluster's address, so that subprocesses can join it with RAY_ADDRESS."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", configure_logging=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real ``mlflow server`` on 127.0.0.1 (SQLite backend, artifacts served through the server)
    for the whole session, in its own process group. Yields a :class:`mlflow_server.MLflowServer`:
    ``.uri`` (http://127.0.0.1:PORT), ``.log_tail()``."""
    from mlflow_server import MLflowServer

    server = MLflowServer(tmp_path_factory.mktemp("mlflow")).start()
    try:
        yield server
    finally:
        server.stop()
