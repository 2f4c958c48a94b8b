"""Deployment files: the Ray cluster-launcher config, the Docker images and the KubeRay/Kubernetes
manifests. Everything here is offline: the launcher config is validated with the installed Ray's
own autoscaler schema, the manifests are parsed and cross-checked (names, ports, probes, files
they refer to, Ray versions), and every file is scanned for anything that looks like a credential.
Nothing reaches AWS or a Kubernetes cluster."""

from __future__ import annotations

import ast
import copy
import json
import re
import shlex
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlsplit

import jsonschema
import pytest
import yaml

from bimors.config import load_config

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
K8S = INFRA / "k8s"
CLUSTER_YAML = ROOT / "ray_cluster.yaml"
RAY_VERSION = metadata.version("ray")
NAMESPACE = "bimors"

KNOWN_KINDS = {
    ("v1", "Namespace"), ("v1", "ServiceAccount"), ("v1", "ConfigMap"), ("v1", "Service"),
    ("apps/v1", "Deployment"), ("batch/v1", "CronJob"),
    ("ray.io/v1", "RayCluster"), ("ray.io/v1", "RayJob"), ("ray.io/v1", "RayService"),
}
# GPUs per EC2 instance type, for the types the launcher config may use.
EC2_GPUS = {
    "g4dn.xlarge": 1, "g4dn.2xlarge": 1, "g4dn.12xlarge": 4, "g5.xlarge": 1, "g5.2xlarge": 1,
    "g5.4xlarge": 1, "g5.12xlarge": 4, "g5.48xlarge": 8, "g6.xlarge": 1, "g6.12xlarge": 4,
    "p3.2xlarge": 1, "p3.8xlarge": 4, "p3.16xlarge": 8, "p4d.24xlarge": 8,
}


# --------------------------------------------------------------------------------------------
# loading


def _docs() -> list[tuple[str, dict]]:
    out = []
    for path in sorted(K8S.rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                out.append((str(path.relative_to(ROOT)), doc))
    return out


DOCS = _docs()


def _of_kind(kind: str) -> list[dict]:
    return [doc for _, doc in DOCS if doc["kind"] == kind]


def _one(kind: str, name: str | None = None) -> dict:
    found = [d for d in _of_kind(kind) if name is None or d["metadata"].get("name") == name]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def _ray_cluster_specs() -> Iterator[tuple[str, dict]]:
    """(owner, RayCluster spec) for the RayCluster, RayService and RayJob manifests."""
    for doc in _of_kind("RayCluster"):
        yield doc["metadata"]["name"], doc["spec"]
    for doc in _of_kind("RayService"):
        yield doc["metadata"]["name"], doc["spec"]["rayClusterConfig"]
    for doc in _of_kind("RayJob"):
        yield doc["metadata"].get("name") or doc["metadata"]["generateName"], doc["spec"]["rayClusterSpec"]


def _pod_specs() -> Iterator[tuple[str, dict, dict]]:
    """(where, the owning manifest, pod spec) for every pod template in the manifests."""
    for _, doc in DOCS:
        kind, spec = doc["kind"], doc.get("spec", {})
        if kind == "Deployment":
            yield f"Deployment {doc['metadata']['name']}", doc, spec["template"]["spec"]
        elif kind == "CronJob":
            yield f"CronJob {doc['metadata']['name']}", doc, spec["jobTemplate"]["spec"]["template"]["spec"]
    for owner, cluster in _ray_cluster_specs():
        yield f"{owner} head", cluster, cluster["headGroupSpec"]["template"]["spec"]
        for group in cluster.get("workerGroupSpecs", []):
            yield f"{owner} {group['groupName']}", cluster, group["template"]["spec"]


def _ray_containers() -> Iterator[tuple[str, dict]]:
    for owner, cluster in _ray_cluster_specs():
        for c in cluster["headGroupSpec"]["template"]["spec"]["containers"]:
            yield f"{owner} head", c
        for group in cluster.get("workerGroupSpecs", []):
            for c in group["template"]["spec"]["containers"]:
                yield f"{owner} {group['groupName']}", c


def _dockerfile_workdir() -> str:
    workdirs = re.findall(r"^WORKDIR\s+(\S+)", (INFRA / "Dockerfile").read_text(), flags=re.M)
    assert workdirs, "infra/Dockerfile sets no WORKDIR"
    return workdirs[-1]


def _container_port(containers: list[dict], port: int | str) -> int | None:
    """The containerPort a Service/probe port (number or name) resolves to, if any."""
    for c in containers:
        for p in c.get("ports", []):
            if port in (p["containerPort"], p.get("name")):
                return p["containerPort"]
    return None


def _python_command(words: list[str]) -> tuple[str, dict[str, str], list[str]]:
    """From a command line: the script after `python`, its --flag values, its key=value args."""
    start = words.index("python")
    script = words[start + 1]
    flags, overrides = {}, []
    rest = words[start + 2:]
    i = 0
    while i < len(rest):
        if rest[i].startswith("--"):
            flags[rest[i]] = rest[i + 1]
            i += 2
        else:
            overrides.append(rest[i])
            i += 1
    return script, flags, overrides


# --------------------------------------------------------------------------------------------
# the cluster launcher


@pytest.fixture(scope="module")
def cluster() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def test_launcher_config_passes_rays_autoscaler_schema(cluster):
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    schema_path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    schema = json.loads(schema_path.read_text())
    jsonschema.validate(cluster, schema)  # as written
    prepared = prepare_config(copy.deepcopy(cluster))  # as `ray up` sees it, defaults filled in
    validate_config(prepared)
    assert prepared["provider"]["type"] == "aws"

    # the schema does reject mistakes (so the checks above mean something)
    broken = copy.deepcopy(cluster)
    broken["available_node_types"]["gpu-inference"]["min_worker"] = 1
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)


def test_launcher_node_types(cluster):
    types_ = cluster["available_node_types"]
    head = types_[cluster["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    assert head["node_config"]["InstanceType"] not in EC2_GPUS, "the head node should be a CPU instance"

    workers = {name: t for name, t in types_.items() if name != cluster["head_node_type"]}
    for name, t in workers.items():
        instance = t["node_config"]["InstanceType"]
        assert instance in EC2_GPUS, f"{name}: {instance} is not a known GPU instance type"
        assert t["resources"]["GPU"] == EC2_GPUS[instance], f"{name}: GPU count does not match {instance}"
        assert 0 <= t["min_workers"] <= t["max_workers"], name
        assert t["min_workers"] == 0, f"{name}: GPU workers should scale to zero"
    assert sum(t["max_workers"] for t in workers.values()) <= cluster["max_workers"]

    inference = [t for t in workers.values() if t["resources"]["GPU"] == 1]
    training = [t for t in workers.values() if t["resources"]["GPU"] >= 4]
    assert inference and training
    for t in inference:
        assert t["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot"
    assert cluster["provider"]["cache_stopped_nodes"] is False  # spot instances cannot be stopped
    assert 0 < cluster["idle_timeout_minutes"] <= 60


def test_launcher_image_environment_and_identity(cluster):
    docker = cluster["docker"]
    assert docker["image"].rsplit("/", 1)[-1].startswith("bimors:")
    env = {}
    for option in docker["run_options"]:
        words = shlex.split(option)
        if words[0] in ("--env", "-e"):
            key, _, value = words[1].partition("=")
            env[key] = value
    assert {"MLFLOW_TRACKING_URI", "AWS_REGION"} <= set(env)
    assert urlsplit(env["MLFLOW_TRACKING_URI"]).port == 5000
    assert env["AWS_REGION"] == cluster["provider"]["region"]
    assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "BIMORS_API_TOKEN",
                "RAY_AUTH_TOKEN"} & set(env)
    for name, t in cluster["available_node_types"].items():
        profile = t["node_config"]["IamInstanceProfile"]
        assert profile.get("Name") or profile.get("Arn"), f"{name}: no IAM instance profile"

    # the checkout is synced to the path the image uses and installed there
    workdir = _dockerfile_workdir()
    assert cluster["file_mounts"][workdir] == "."
    assert any("pip install" in cmd and workdir in cmd for cmd in cluster["setup_commands"])


def _docker_options(cluster: dict) -> tuple[dict[str, str], list[str]]:
    """(--env NAME=VALUE pairs, --env-file paths) of the launcher's `docker run` options."""
    env, env_files = {}, []
    for option in cluster["docker"]["run_options"]:
        words = shlex.split(option)
        if words[0] in ("--env", "-e"):
            key, _, value = words[1].partition("=")
            env[key] = value
        elif words[0] == "--env-file":
            env_files.append(words[1])
    return env, env_files


def _ray_token_secret_id(cluster: dict) -> str:
    """The Secrets Manager id the launcher reads Ray's token from (and checks how it is written)."""
    _, env_files = _docker_options(cluster)
    writers = [cmd for cmd in cluster["initialization_commands"] if "RAY_AUTH_TOKEN=" in cmd]
    assert len(writers) == 1, "exactly one initialization command should write RAY_AUTH_TOKEN"
    (cmd,) = writers
    target = re.search(r">\s*(\S+)\s*$", cmd)
    assert target and target.group(1) in env_files, "the token file is not passed to the container (--env-file)"
    assert "umask 077" in cmd, "the token file must be private to its owner"
    assert "|| true" not in cmd and "test -n" in cmd, "a missing Ray token must stop the node, not start it open"
    secret = re.search(r"aws secretsmanager get-secret-value\b.*--secret-id\s+(\S+)", cmd, flags=re.S)
    assert secret, "RAY_AUTH_TOKEN should come from Secrets Manager"
    return secret.group(1)


def test_launcher_gives_rays_token_to_every_node_and_the_submitter(cluster):
    """Token auth on a launcher cluster: RAY_AUTH_MODE=token and RAY_AUTH_TOKEN in every container
    (head and workers start in the same `docker run`, after the same initialization_commands), the
    token from Secrets Manager, and the submit commands (this file's header, the README) export the
    same two variables from the same secret."""
    env, _ = _docker_options(cluster)
    assert env.get("RAY_AUTH_MODE") == "token"
    secret_id = _ray_token_secret_id(cluster)
    # no node type replaces the docker options or the initialization commands that carry the token
    for name, t in cluster["available_node_types"].items():
        assert "docker" not in t and "initialization_commands" not in t, name
    # every `ray start` runs in the container with that environment and nothing turns auth off
    starts = cluster["head_start_ray_commands"] + cluster["worker_start_ray_commands"]
    assert sum("ray start" in c for c in starts) == 2
    for command in starts + cluster["setup_commands"] + cluster["head_setup_commands"] + cluster["worker_setup_commands"]:
        assert not re.search(r"RAY_AUTH_MODE=(?!token\b)|-u\s+RAY_AUTH|unset\s+RAY_AUTH", command), command

    def submit_path(text: str, where: str) -> None:
        before = text[:text.index("ray job submit")]
        assert re.search(r"export RAY_AUTH_MODE=token\b", before), f"{where}: the submitter does not set RAY_AUTH_MODE=token"
        token = re.search(r"export RAY_AUTH_TOKEN=\"\$\(aws secretsmanager get-secret-value\b[^)]*--secret-id\s+(\S+)",
                          before.replace("#", "").replace("\\\n", " "))
        assert token and token.group(1) == secret_id, f"{where}: RAY_AUTH_TOKEN does not come from {secret_id}"

    submit_path(CLUSTER_YAML.read_text(), "ray_cluster.yaml")
    readme = (ROOT / "README.md").read_text()
    submit_path(readme[readme.index("**Ray cluster launcher**"):], "README (Ray cluster launcher)")


# --------------------------------------------------------------------------------------------
# images


def test_dockerfile_uses_the_installed_ray_on_gpu_and_installs_the_project():
    text = (INFRA / "Dockerfile").read_text()
    bases = re.findall(r"^FROM\s+(\S+)", text, flags=re.M)
    assert bases == [f"rayproject/ray:{RAY_VERSION}-py311-gpu"], (
        f"infra/Dockerfile must build on Ray {RAY_VERSION} (installed here), got {bases}"
    )
    assert re.search(r"pip install [^\n]*\s\.(\s|$)", text), "the project is not pip-installed"
    for source in re.findall(r"^COPY\s+(?:--\S+\s+)*(.+?)\s+\S+$", text, flags=re.M):
        for path in source.split():
            assert (ROOT / path).exists(), f"infra/Dockerfile copies {path}, which does not exist"
    assert not re.search(r"^(ENV|ARG)\s+\S*(KEY|SECRET|TOKEN|PASSWORD)", text, flags=re.M | re.I)
    # the KubeRay pods start where the image keeps the project
    workdir = _dockerfile_workdir()
    for where, container in _ray_containers():
        assert container.get("workingDir") == workdir, where


def test_mlflow_image_matches_the_client_version():
    text = (INFRA / "mlflow.Dockerfile").read_text()
    pinned = re.search(r"mlflow==([\w.]+)", text)
    assert pinned and pinned.group(1) == metadata.version("mlflow")
    assert "psycopg2" in text and "boto3" in text


# --------------------------------------------------------------------------------------------
# the manifests


def test_manifests_parse_with_known_kinds():
    assert DOCS
    kinds = set()
    for path, doc in DOCS:
        key = (doc.get("apiVersion"), doc.get("kind"))
        assert key in KNOWN_KINDS, f"{path}: unexpected {key}"
        meta = doc["metadata"]
        assert meta.get("name") or meta.get("generateName"), path
        if doc["kind"] != "Namespace":
            assert meta.get("namespace") == NAMESPACE, f"{path}: {doc['kind']} not in namespace {NAMESPACE}"
        kinds.add(doc["kind"])
    assert {"RayJob", "RayService", "RayCluster", "CronJob", "Deployment", "Service"} <= kinds
    _one("Namespace", NAMESPACE)


def test_services_target_container_ports():
    deployments = _of_kind("Deployment")
    for service in _of_kind("Service"):
        selector = service["spec"]["selector"]
        targets = [d for d in deployments
                   if selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()]
        assert targets, f"Service {service['metadata']['name']} selects no Deployment"
        for d in targets:
            assert d["spec"]["selector"]["matchLabels"].items() <= d["spec"]["template"]["metadata"]["labels"].items()
            containers = d["spec"]["template"]["spec"]["containers"]
            for port in service["spec"]["ports"]:
                target = port.get("targetPort", port["port"])
                assert _container_port(containers, target) is not None, (
                    f"Service {service['metadata']['name']} targets {target}, which no container exposes"
                )


def test_mlflow_server_and_its_address():
    service = _one("Service", "mlflow")
    (port,) = service["spec"]["ports"]
    assert port["port"] == 5000
    deployment = _one("Deployment", "mlflow")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert _container_port(pod["containers"], port["targetPort"]) == 5000
    args = " ".join(container.get("command", []) + container.get("args", []))
    assert "--port=5000" in args and "--host=0.0.0.0" in args
    assert re.search(r"--(artifacts-destination|default-artifact-root)[= ]s3://", args)
    for probe in ("readinessProbe", "livenessProbe"):
        get = container[probe]["httpGet"]
        assert get["path"] == "/health" and _container_port(pod["containers"], get["port"]) == 5000

    env = {e["name"]: e for e in container["env"]}
    backend = env["MLFLOW_BACKEND_STORE_URI"]["value"]
    assert backend.startswith("postgresql://")
    for var in re.findall(r"\$\((\w+)\)", backend):  # every piece of the URI comes from the Secret
        assert env[var]["valueFrom"]["secretKeyRef"]["name"] == "mlflow-postgres"
    assert env["MLFLOW_DB_PASSWORD"]["valueFrom"]["secretKeyRef"]["key"] == "password"
    assert pod["serviceAccountName"] == "mlflow"

    # every Ray pod finds the server by the Service's name and port, and the server accepts that Host
    config = _one("ConfigMap", "bimors-env")
    uri = urlsplit(config["data"]["MLFLOW_TRACKING_URI"])
    assert uri.hostname.split(".")[0] == service["metadata"]["name"] and uri.port == port["port"]
    allowed = re.search(r"--allowed-hosts=(\S+)", args).group(1).split(",")
    assert f"{uri.hostname}:{uri.port}" in allowed
    for where, c in _ray_containers():
        refs = [e["configMapRef"]["name"] for e in c.get("envFrom", []) if "configMapRef" in e]
        assert "bimors-env" in refs, f"{where}: does not load ConfigMap bimors-env"


def test_rayservice_runs_the_serve_app_on_port_8000():
    service = _one("RayService")
    serve = yaml.safe_load(service["spec"]["serveConfigV2"])
    assert serve["http_options"]["port"] == 8000
    (app,) = serve["applications"]
    assert app["import_path"] == "bimors.serve.app:build_app"
    args = dict(app["args"])
    overrides = args.pop("overrides", [])
    assert args == {"config": "configs/paper.yaml", "model": "models:/bimors@champion"}
    assert (ROOT / args["config"]).is_file()
    config = load_config(ROOT / args["config"], overrides)  # what build_app will load
    assert config.serve.port == serve["http_options"]["port"]
    assert config.serve.output.startswith("s3://"), "scene jobs must keep their status where every replica sees it"

    from ray.serve.schema import ServeDeploySchema

    ServeDeploySchema.model_validate(serve)  # the schema Serve's REST API (and so KubeRay) applies

    cluster = service["spec"]["rayClusterConfig"]
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert {"name": "serve", "containerPort": 8000} in head["ports"]
    assert {"name": "dashboard", "containerPort": 8265} in head["ports"]
    assert cluster["enableInTreeAutoscaling"] is True
    for group in cluster["workerGroupSpecs"]:
        containers = group["template"]["spec"]["containers"]
        probe = containers[0]["readinessProbe"]["httpGet"]
        assert probe["path"] == "/health"
        assert _container_port(containers, probe["port"]) == 8000
    # the model replicas fit the GPU workers: one of each per node, and all of them at full scale
    gpus_per_node = max(int(g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
                        for g in cluster["workerGroupSpecs"])
    gpus = sum(int(g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
               * g["maxReplicas"] for g in cluster["workerGroupSpecs"])
    models = [config.serve.captioner, config.serve.classifier]
    assert all(m.num_gpus > 0 for m in models), "the models should run on the GPU workers"
    assert sum(m.num_gpus for m in models) <= gpus_per_node
    assert sum(m.num_gpus * m.max_replicas for m in models) <= gpus
    for where, c in _ray_containers():
        if where.startswith(service["metadata"]["name"]):
            env = {e["name"]: e for e in c.get("env", [])}
            ref = env["BIMORS_API_TOKEN"]["valueFrom"]["secretKeyRef"]
            assert ref["name"] == "bimors-api-token" and ref["key"], where


def test_serve_import_path_names_a_build_app_function():
    service = _one("RayService")
    (app,) = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"]
    module, _, attribute = app["import_path"].partition(":")
    path = ROOT / (module.replace(".", "/") + ".py")
    assert path.is_file(), f"{app['import_path']}: {path.relative_to(ROOT)} does not exist"
    tree = ast.parse(path.read_text(), filename=str(path))
    functions = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
    assert attribute in functions, f"{path.relative_to(ROOT)} defines no top-level function {attribute}"
    assert functions[attribute].args.args or functions[attribute].args.vararg, (
        f"{attribute} must take the application's args dict"
    )


def test_training_rayjob_entrypoint():
    job = _one("RayJob")
    words = shlex.split(job["spec"]["entrypoint"])
    script, flags, overrides = _python_command(words)
    assert script == "workflows/train.py" and (ROOT / script).is_file()
    assert flags["--config"] == "configs/paper.yaml" and (ROOT / flags["--config"]).is_file()
    assert flags["--data"].startswith("s3://") and flags["--output"].startswith("s3://")
    config = load_config(ROOT / flags["--config"], overrides)  # the overrides are valid config keys
    assert config.train.use_gpu

    runtime_env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    assert runtime_env["working_dir"] == _dockerfile_workdir()
    assert job["spec"]["shutdownAfterJobFinishes"] is True
    gpus = sum(int(g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
               * g["maxReplicas"] for g in job["spec"]["rayClusterSpec"]["workerGroupSpecs"])
    assert config.train.workers <= gpus
    stages = [config.featurize.caption, config.featurize.clip]
    fixed = [s.actors if isinstance(s.actors, int) else s.actors[0] for s in stages]
    assert sum(n * s.num_gpus for n, s in zip(fixed, stages)) <= gpus


def test_nightly_cronjob_submits_to_the_batch_cluster():
    cron = _one("CronJob", "bimors-nightly")
    assert len(cron["spec"]["schedule"].split()) == 5
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["restartPolicy"] in ("Never", "OnFailure")
    (container,) = pod["containers"]
    command = container["command"]
    script_text = command[-1] if command[:2] == ["bash", "-c"] else " ".join(command)
    words = shlex.split(script_text.replace("\\\n", " "))
    i = words.index("submit")
    assert words[i - 2:i] == ["ray", "job"]
    address = urlsplit(words[words.index("--address") + 1])

    # the address is the head Service KubeRay creates for a RayCluster defined here
    clusters = {f"{d['metadata']['name']}-head-svc": d for d in _of_kind("RayCluster")}
    assert address.hostname in clusters, f"{address.hostname} is not the head service of a RayCluster here"
    head = clusters[address.hostname]["spec"]["headGroupSpec"]["template"]["spec"]["containers"]
    assert _container_port(head, "dashboard") == address.port == 8265
    assert words[words.index("--working-dir") + 1] == _dockerfile_workdir()

    script, flags, overrides = _python_command(words[words.index("--") + 1:])
    assert script == "workflows/nightly.py"
    assert (ROOT / script).is_file(), "workflows/nightly.py does not exist"
    assert flags["--config"] == "configs/paper.yaml" and (ROOT / flags["--config"]).is_file()
    assert flags["--input"].startswith("s3://") and flags["--output"].startswith("s3://")
    assert flags["--model"] == "models:/bimors@champion"
    config = load_config(ROOT / flags["--config"], overrides)
    assert config.scene.classify.num_gpus > 0, "the nightly job should classify on the GPU workers"


def test_ray_clusters_use_the_installed_ray_and_gpu_worker_groups():
    for owner, cluster in _ray_cluster_specs():
        assert cluster["rayVersion"] == RAY_VERSION, owner
        assert cluster["headGroupSpec"]["rayStartParams"].get("num-cpus") == "0", f"{owner}: head should run no tasks"
        for group in cluster["workerGroupSpecs"]:
            assert 0 <= group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"], owner
            limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
            assert int(limits["nvidia.com/gpu"]) >= 1, f"{owner} {group['groupName']}: no GPU"
    batch = _one("RayCluster")
    assert batch["spec"]["enableInTreeAutoscaling"] is True
    assert {g["groupName"] for g in batch["spec"]["workerGroupSpecs"]} >= {"gpu-inference", "gpu-train"}


def test_pods_get_aws_access_through_their_service_account():
    accounts = {d["metadata"]["name"]: d for d in _of_kind("ServiceAccount")}
    for account in accounts.values():
        role = account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"]
        assert re.fullmatch(r"arn:aws:iam::\d{12}:role/[\w+=,.@-]+", role)
    for where, _, pod in _pod_specs():
        if where.startswith("CronJob"):
            continue  # only talks to the Ray dashboard
        assert pod.get("serviceAccountName") in accounts, f"{where}: no IRSA service account"


# --------------------------------------------------------------------------------------------
# Ray token authentication on Kubernetes


RAY_TOKEN_SECRET = "bimors-ray-token"
RAY_TOKEN_KEY = "auth_token"  # the key KubeRay's authOptions.secretName reads


def _kuberay_auth_env(owner: str, cluster: dict) -> dict[str, dict]:
    """What KubeRay (>= 1.6, SetContainerTokenAuthEnvVars) adds to every Ray container, the
    autoscaler and the RayJob submitter of a cluster whose authOptions.mode is token: RAY_AUTH_MODE
    and RAY_AUTH_TOKEN from the Secret's `auth_token` (a generated `<cluster>` Secret without
    secretName). Variables a container already sets are left as they are."""
    auth = cluster.get("authOptions") or {}
    if auth.get("mode") != "token":
        return {}
    secret = auth.get("secretName") or owner
    return {"RAY_AUTH_MODE": {"name": "RAY_AUTH_MODE", "value": "token"},
            "RAY_AUTH_TOKEN": {"name": "RAY_AUTH_TOKEN",
                               "valueFrom": {"secretKeyRef": {"name": secret, "key": RAY_TOKEN_KEY}}}}


def _effective_env(container: dict, added: dict[str, dict]) -> dict[str, dict]:
    env = {e["name"]: e for e in container.get("env", [])}
    return {**added, **env}


def _assert_gets_ray_token(where: str, env: dict[str, dict]) -> None:
    assert env.get("RAY_AUTH_MODE", {}).get("value") == "token", f"{where}: RAY_AUTH_MODE is not token"
    ref = env.get("RAY_AUTH_TOKEN", {}).get("valueFrom", {}).get("secretKeyRef")
    assert ref == {"name": RAY_TOKEN_SECRET, "key": RAY_TOKEN_KEY}, (
        f"{where}: RAY_AUTH_TOKEN should come from Secret {RAY_TOKEN_SECRET} key {RAY_TOKEN_KEY}, got {ref}"
    )


def test_every_ray_pod_and_the_rayjob_submitter_get_rays_token():
    """authOptions (not hand-written env) because the operator itself calls the dashboard (it
    deploys the RayService's Serve config and follows the RayJob) and reads the token only from
    authOptions; it also hands the token to the autoscaler sidecar and the RayJob submitter."""
    owners = list(_ray_cluster_specs())
    assert {o for o, _ in owners} >= {"bimors-batch", "bimors-serve"} and len(owners) == 3
    for owner, cluster in owners:
        assert cluster.get("authOptions") == {"mode": "token", "secretName": RAY_TOKEN_SECRET}, owner
        assert tuple(int(p) for p in cluster["rayVersion"].split(".")[:2]) >= (2, 52), f"{owner}: token auth needs Ray >= 2.52"
        added = _kuberay_auth_env(owner, cluster)
        containers = [(f"{owner} head {c['name']}", c) for c in cluster["headGroupSpec"]["template"]["spec"]["containers"]]
        for group in cluster.get("workerGroupSpecs", []):
            containers += [(f"{owner} {group['groupName']} {c['name']}", c) for c in group["template"]["spec"]["containers"]]
        if cluster.get("enableInTreeAutoscaling"):
            containers.append((f"{owner} autoscaler", cluster.get("autoscalerOptions") or {}))
        for where, container in containers:
            _assert_gets_ray_token(where, _effective_env(container, added))

    job = _one("RayJob")
    added = _kuberay_auth_env("rayjob", job["spec"]["rayClusterSpec"])
    assert job["spec"].get("submissionMode", "K8sJobMode") in ("K8sJobMode", "SidecarMode", "HTTPMode")
    template = job["spec"].get("submitterPodTemplate")
    submitters = template["spec"]["containers"] if template else [{}]  # {}: KubeRay's default submitter
    for container in submitters:
        _assert_gets_ray_token("RayJob submitter", _effective_env(container, added))


def test_nightly_submitter_sends_rays_token_to_the_batch_cluster():
    cron = _one("CronJob", "bimors-nightly")
    (container,) = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    env = _effective_env(container, {})
    _assert_gets_ray_token("CronJob bimors-nightly", env)
    # the Secret is the one the cluster it submits to requires
    address = re.search(r"--address\s+(\S+)", container["command"][-1]).group(1)
    (batch,) = [d for d in _of_kind("RayCluster") if f"{d['metadata']['name']}-head-svc" == urlsplit(address).hostname]
    assert batch["spec"]["authOptions"]["secretName"] == env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["name"]


def test_kuberay_auth_model_matches_the_operator():
    """The model above, on KubeRay's own sample shapes: nothing without authOptions, the generated
    per-cluster Secret without secretName, and a container's own variables win."""
    assert _kuberay_auth_env("c", {}) == {}
    assert _kuberay_auth_env("c", {"authOptions": {"mode": "disabled"}}) == {}
    generated = _kuberay_auth_env("c", {"authOptions": {"mode": "token"}})
    assert generated["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "c", "key": "auth_token"}
    own = _effective_env({"env": [{"name": "RAY_AUTH_MODE", "value": "disabled"}]}, generated)
    with pytest.raises(AssertionError):
        _assert_gets_ray_token("x", own)


# --------------------------------------------------------------------------------------------
# credentials: by name (Secrets, IAM roles) only


SECRET_NAME = re.compile(r"(PASSWORD|PASSWD|SECRET|TOKEN|ACCESS_KEY|API_KEY|CREDENTIAL)", re.I)
PATTERNS = [
    (re.compile(r"(?<![A-Z0-9])(AKIA|ASIA)[0-9A-Z]{16}(?![A-Z0-9])"), "an AWS access key id"),
    (re.compile(r"(?i)aws_secret_access_key[\"']?\s*[:=]\s*[\"']?[A-Za-z0-9/+=]{16,}"), "an AWS secret key"),
    (re.compile(r"(?i)\bbearer\s+[A-Za-z0-9._~+/=-]{16,}"), "a bearer token"),
    (re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"), "a private key"),
    (re.compile(r"(?i)(?<![a-z])(password|passwd|secret|token|api[_-]?key)[\"']?\s*[:=]\s*[\"']?"
                r"(?![\"'$<{(%])[^\s\"',}]{6,}"), "a literal secret"),
    (re.compile(r"[a-z][a-z0-9+.-]*://[^/\s:@$]+:(?!\$\()[^/\s@]+@"), "credentials in a URL"),
]


def find_secrets(text: str) -> list[str]:
    return [f"{what}: {m.group(0)[:40]!r}" for pattern, what in PATTERNS for m in pattern.finditer(text)]


def _structured_secrets(node: Any, where: str) -> list[str]:
    """Kubernetes-level: a Secret with data, or an env var that looks secret with a literal value."""
    found = []
    if isinstance(node, dict):
        if node.get("kind") == "Secret" and (node.get("data") or node.get("stringData")):
            found.append(f"{where}: a Secret with values")
        if isinstance(node.get("name"), str) and "value" in node and SECRET_NAME.search(node["name"]):
            value = str(node["value"])
            if not re.fullmatch(r"(\S*\$\(\w+\)\S*)*", value):  # only $(VAR) references allowed
                found.append(f"{where}: env {node['name']} has a literal value")
        for key, value in node.items():
            found += _structured_secrets(value, f"{where}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            found += _structured_secrets(value, f"{where}[{i}]")
    return found


def _scanned_files() -> list[Path]:
    files = [CLUSTER_YAML, ROOT / "README.md"]
    files += [p for p in sorted(INFRA.rglob("*")) if p.is_file()]
    return files


def test_no_credentials_in_deployment_files():
    problems = []
    for path in _scanned_files():
        problems += [f"{path.relative_to(ROOT)}: {p}" for p in find_secrets(path.read_text())]
        if path.suffix == ".yaml":
            for i, doc in enumerate(yaml.safe_load_all(path.read_text())):
                problems += _structured_secrets(doc, f"{path.relative_to(ROOT)}#{i}")
    cluster = yaml.safe_load(CLUSTER_YAML.read_text())
    for option in cluster["docker"]["run_options"]:
        words = shlex.split(option)
        if words[0] in ("--env", "-e") and SECRET_NAME.search(words[1].split("=")[0]):
            problems.append(f"ray_cluster.yaml: {words[1].split('=')[0]} set in the config")
    assert not problems, "credentials must be referenced by Secret name or IAM role only:\n" + "\n".join(problems)


def test_secret_refs_name_the_documented_secrets():
    refs = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key in ("secretKeyRef", "secretRef"):
                if key in node:
                    refs.add(node[key]["name"])
            if "secretName" in node.get("authOptions", {}):
                refs.add(node["authOptions"]["secretName"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    for _, doc in DOCS:
        walk(doc)
    assert refs == {"bimors-api-token", "bimors-ray-token", "mlflow-postgres", "bimors-aws"}
    readme = (ROOT / "README.md").read_text()
    for name in refs:
        assert name in readme, f"README does not say how to create Secret {name}"


@pytest.mark.parametrize(
    "text",
    [
        "aws_access_key_id: " + "AKIA" + "IOSFODNN7EXAMPLE",
        "aws_secret_access_key: wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
        "password: hunter2hunter2",
        'MLFLOW_DB_PASSWORD="s3cr3t-value"',
        "Authorization: Bearer abcdefghijklmnop0123",
        "postgresql://mlflow:s3cr3t@db:5432/mlflow",
        "-----BEGIN RSA PRIVATE KEY-----",
    ],
)
def test_the_scan_finds_planted_credentials(text):
    assert find_secrets(text)


@pytest.mark.parametrize(
    "text",
    [
        "secretKeyRef: {name: bimors-api-token, key: token}",
        'value: "postgresql://$(MLFLOW_DB_USER):$(MLFLOW_DB_PASSWORD)@$(MLFLOW_DB_HOST):5432/db"',
        "printf 'BIMORS_API_TOKEN=%s' \"$token\"",
        'token="$(aws secretsmanager get-secret-value --secret-id bimors/api-token)"',
        "docker login --username AWS --password-stdin 111122223333.dkr.ecr.us-west-2.amazonaws.com",
    ],
)
def test_the_scan_accepts_references(text):
    assert not find_secrets(text)


def test_structured_scan_flags_literal_env_values():
    doc = {"env": [{"name": "BIMORS_API_TOKEN", "value": "abc"}, {"name": "AWS_REGION", "value": "us-west-2"}]}
    assert len(_structured_secrets(doc, "x")) == 1
    assert _structured_secrets({"kind": "Secret", "stringData": {"token": "x"}}, "x")
