"""End to end: the train workflow (local Ray and `ray job submit`), MLflow contents, the evaluate
workflow and the transfer protocols, against a real mlflow server and Ray on loopback."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from bimors.config import load_config
from bimors.data.catalog import DOMAIN_GENERALIZATION, get_dataset
from bimors.data.splits import split_sizes
from bimors.data.synthetic import generate_synthetic

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "configs" / "quickstart.yaml"


def overrides(model_dir: Path, root: Path, mlflow_uri: str | None, extra: list[str] = ()) -> list[str]:
    """The quickstart made small: 6 classes, 4 shots, 4 epochs, fractional CPUs for a 2-core runner."""
    return [
        f"data.root={root}", "data.shots=4", "data.synthetic.images_per_class=12",
        "data.synthetic.classes=[beach, bridge, desert, forest, harbor, river]", "featurize.seeds=[1, 2]",
        f"model.backbone.name={model_dir / 'clip-tiny'}", f"model.captioner.name={model_dir / 'blip2-tiny'}",
        f"storage.cache_dir={model_dir / 'cache'}",
        "featurize.decode.num_cpus=0.25", "featurize.caption.actors=1", "featurize.caption.num_cpus=0.25",
        "featurize.clip.num_cpus=0.25", "train.cpus_per_worker=0.5", "evaluate.predict.num_cpus=0.25",
        "optim.epochs=4", "optim.batch_size=4",
        *([f"tracking.uri={mlflow_uri}", f"tracking.experiment=test-{secrets.token_hex(3)}"] if mlflow_uri else ["tracking.enabled=false"]),
        *extra,
    ]


def run_workflow(script: str, args: list[str], env: dict[str, str] | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "workflows" / script), *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout)


def test_train_workflow_records_the_run_in_mlflow(tmp_path, model_dir, mlflow_server, backbone):
    """`python workflows/train.py` on its own: it starts a local Ray (no RAY_ADDRESS given)."""
    args = overrides(model_dir, tmp_path / "tiles", mlflow_server.uri, ["tracking.registered_model=quick"])
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"BIMORS_LOG_DIR": str(tmp_path / "logs")}
    done = subprocess.run([sys.executable, str(REPO / "workflows" / "train.py"), "--config", str(QUICKSTART),
                           "--output", str(tmp_path / "out"), *args], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "| method | seed | base | new | hm |" in out and "| bimors | 1 |" in out
    # a concise console when piped: progress per stage, the results, where the log is; no Ray internals
    console = (done.stdout + done.stderr).strip().splitlines()
    assert len(console) <= 30, "\n".join(console)
    for stage in ("featurize: ", "train: ", "evaluate base and new classes: "):
        assert any(line.startswith(stage) for line in done.stderr.splitlines()), done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith(f"log: {env['BIMORS_LOG_DIR']}/train-")
    assert not [line for line in console[:-1] if "pid=" in line or "INFO" in line or "Warning" in line or "ray" in line.lower()]
    log_file = next(Path(env["BIMORS_LOG_DIR"]).glob("train-*.log")).read_text()
    assert "ray: " in log_file and "CPU" in log_file  # what the console leaves out is in the log file
    assert "mlflow run: " + mlflow_server.uri in out and "registered as quick v1, alias candidate" in out

    cfg = load_config(QUICKSTART, args)
    client = MlflowClient(mlflow_server.uri)
    experiment = client.get_experiment_by_name(cfg.tracking.experiment)
    (run,) = client.search_runs([experiment.experiment_id], "tags.method = 'bimors'")
    params = run.data.params
    assert params["optim.lr"] == str(cfg.optim.lr) and params["model.learner.method"] == "bimors"
    assert params["storage.secret"] in ("null", "None", "**********")
    for key in ("loss", "train_acc", "val_acc", "lr"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [0, 1, 2, 3]
    base_count = int(run.data.metrics["test_base_count"])
    assert base_count == 3 * split_sizes(12, 0.5, 0.2)[2]  # every test tile of the 3 base classes
    assert 0 <= run.data.metrics["test_new_acc"] <= 100 and "test_hm" in run.data.metrics
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)} | {
        a.path for folder in ("plots", "metrics") for a in client.list_artifacts(run.info.run_id, folder)}
    assert {"config.yaml", "results.md", "plots/confusion_base.png", "plots/confusion_new.png", "plots/curves.png",
            "metrics/per_class_base.json"} <= artifacts

    # the registered model is loadable by the serving code
    from bimors.pipelines.inference import Predictor
    from bimors.tracking import resolve_checkpoint

    checkpoint = resolve_checkpoint("models:/quick@candidate", cfg)
    meta = json.loads((Path(checkpoint) / "learner.json").read_text())
    assert meta["classnames"] == ["beach", "bridge", "desert"] and meta["method"] == "bimors"
    predictor = Predictor.from_checkpoint(cfg, checkpoint, backbone=backbone)
    assert predictor.classnames == ["beach", "bridge", "desert"]


def test_train_workflow_through_ray_job_submit(tmp_path, model_dir):
    """`ray job submit --working-dir . -- python workflows/train.py` against a `ray start --head`
    cluster with token authentication, exactly as the README's "Commands" shows it: the token from
    `ray get-auth-token --generate` in ~/.ray/auth_token, `export RAY_AUTH_MODE=token`, then the
    head and the submitter. A submitter without the token is refused."""
    ray_bin = Path(sys.executable).parent / "ray"
    port, dashboard = _free_port(), _free_port()
    temp_dir = Path(f"/tmp/rj-{secrets.token_hex(3)}")  # Ray's socket paths must stay under 108 bytes
    home = tmp_path / "home"  # the user's ~ (and so ~/.ray/auth_token) is the test's own
    home.mkdir()
    user = {k: v for k, v in os.environ.items()
            if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")}
    user.update(HOME=str(home), PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")

    # ray get-auth-token --generate >/dev/null
    generate = subprocess.run([str(ray_bin), "get-auth-token", "--generate"], env=user, capture_output=True,
                              text=True, timeout=120)
    assert generate.returncode == 0, generate.stderr[-2000:]
    assert (home / ".ray" / "auth_token").read_text().strip() == generate.stdout.strip()
    # export RAY_AUTH_MODE=token
    env = {**user, "RAY_AUTH_MODE": "token"}
    # ray start --head; every port explicit: the session's own Ray already holds the defaults
    # (e.g. the agent's 52365), and so only this cluster's processes are stopped afterwards
    ports = [f"--{name}={_free_port()}" for name in (
        "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port",
        "runtime-env-agent-port", "node-manager-port", "object-manager-port")]
    start = subprocess.run([str(ray_bin), "start", "--head", f"--port={port}", f"--dashboard-port={dashboard}",
                            "--dashboard-host=127.0.0.1", "--num-cpus=2", "--include-dashboard=true", *ports,
                            f"--temp-dir={temp_dir}"], env=env, capture_output=True, text=True, timeout=120)
    assert start.returncode == 0, start.stderr[-2000:]
    try:
        address = f"--address=http://127.0.0.1:{dashboard}"
        # what is under test is the submission; the run itself is as small as the workflow allows
        args = overrides(model_dir, tmp_path / "tiles", None, ["data.synthetic.images_per_class=6", "data.shots=2",
                                                               "featurize.seeds=[1]", "optim.epochs=2"])
        submit = [str(ray_bin), "job", "submit", address, "--working-dir", str(REPO),
                  "--", "python", "workflows/train.py", "--config", "configs/quickstart.yaml",
                  "--output", str(tmp_path / "out"), *args]
        for _ in range(60):  # the head's job agent comes up a little after `ray start` returns
            job = subprocess.run(submit, env=env, capture_output=True, text=True, timeout=600)
            if "No available agent to submit job" not in job.stdout + job.stderr:
                break
            time.sleep(2)
        assert job.returncode == 0, (job.stdout + job.stderr)[-3000:]
        assert "succeeded" in job.stdout + job.stderr
        assert "| bimors | 1 |" in job.stdout

        # the cluster refuses a submitter without the token: the same user without `export
        # RAY_AUTH_MODE=token` (the token file is there but not sent: the reported "Authentication
        # required"), and one with another token
        wrong = {**env, "RAY_AUTH_TOKEN": secrets.token_hex(32)}
        for without, refusal in ((user, "Authentication required"), (wrong, "Authentication failed")):
            refused = subprocess.run([str(ray_bin), "job", "submit", address, "--", "python", "-c", "print('ran')"],
                                     env=without, capture_output=True, text=True, timeout=120)
            out = refused.stdout + refused.stderr
            assert refused.returncode != 0 and refusal in out, out[-2000:]
            assert "submitted successfully" not in out
    finally:
        _stop_cluster(temp_dir)  # not `ray stop`: that would also stop the session's own Ray


def _stop_cluster(temp_dir: Path) -> None:
    """Kill the processes of the cluster whose session lives under ``temp_dir``, and only those."""
    import signal

    marker = str(temp_dir).encode()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if marker in (entry / "cmdline").read_bytes():
                    os.kill(int(entry.name), signal.SIGKILL)
            except OSError:
                continue
    shutil.rmtree(temp_dir, ignore_errors=True)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_evaluate_workflow_writes_mean_std_tables(ray_cluster, tmp_path, model_dir, mlflow_server):
    args = overrides(model_dir, tmp_path / "tiles", mlflow_server.uri,
                     ["evaluate.methods=[zeroshot, coop]", "evaluate.seeds=[1, 2]", "optim.epochs=2"])
    done = run_workflow("evaluate.py", ["--config", str(QUICKSTART), "--protocol", "base2new",
                                        "--output", str(tmp_path / "eval"), *args], env={"RAY_ADDRESS": ray_cluster})
    assert done.returncode == 0, done.stderr[-3000:]
    md = (tmp_path / "eval" / "tables" / "base2new.md").read_text()
    n_test = 3 * split_sizes(12, 0.5, 0.2)[2]
    assert f"| method | base ({n_test} tiles) | new ({n_test} tiles) | hm |" in md
    assert "| zeroshot |" in md and "| coop |" in md and "±" in md and "2 seed(s)" in md
    rows = (tmp_path / "eval" / "tables" / "base2new.csv").read_text().splitlines()
    assert rows[0] == "method,column,mean,std,seeds,values,test_tiles"
    assert len(rows) == 1 + 2 * 3 and all(r.split(",")[4] == "2" for r in rows[1:])
    cfg = load_config(QUICKSTART, args)
    client = MlflowClient(mlflow_server.uri)
    experiment = client.get_experiment_by_name(cfg.tracking.experiment)
    (protocol_run,) = client.search_runs([experiment.experiment_id], "tags.protocol = 'base2new'")
    assert "coop.hm.mean" in protocol_run.data.metrics
    assert len(client.search_runs([experiment.experiment_id], "tags.method = 'coop'")) == 2


def test_domain_generalization_trains_on_patternnetv2_and_tests_on_the_others(ray_cluster, tmp_path, tiny_config, backbone):
    """With APPLeNet on two DDP workers: its per-block token means are featurized into every store
    (source and targets), read back for training and streamed to evaluation, whose report matches
    the raw-tile path of the nightly job and the endpoint."""
    from bimors.pipelines.feature_store import FeatureStore
    from bimors.pipelines.protocol_data import eval_split
    from bimors.pipelines.protocol_runs import run_protocol
    from model_fixtures import raw_tile_report

    source, targets = DOMAIN_GENERALIZATION
    roots = {}
    for i, name in enumerate((source, *targets)):
        spec = get_dataset(name)
        roots[name] = str(tmp_path / name)
        generate_synthetic(roots[name], tiny_config.data.synthetic.model_copy(
            update={"classes": list(spec.classnames), "images_per_class": 5, "seed": i}))
    cfg = load_config(QUICKSTART, [
        "data.shots=2", "data.generate_synthetic=false", "featurize.seeds=[1]",
        f"model.backbone.name={tiny_config.model.backbone.name}", f"model.captioner.name={tiny_config.model.captioner.name}",
        "featurize.decode.num_cpus=0.25", "featurize.caption.actors=1", "featurize.caption.num_cpus=0.25",
        "featurize.clip.num_cpus=0.25", "train.cpus_per_worker=0.5", "evaluate.predict.num_cpus=0.25",
        "optim.epochs=2", "optim.batch_size=4", "tracking.enabled=false", "train.workers=2",
        "evaluate.methods=[applenet]", "evaluate.seeds=[1]",
        *[f"evaluate.datasets.{name}={root}" for name, root in roots.items()],
    ])
    table = run_protocol(cfg, str(tmp_path / "out"), "domain-generalization")
    assert table.columns == [source, *targets]
    for column in table.columns:
        mean, _, n = table.cell("applenet", column)
        assert n == 1 and 0 <= mean <= 100
        assert table.counts[column] == 16 * split_sizes(5, 0.5, 0.2)[2]  # every test tile of the 16 shared classes
        assert FeatureStore(str(tmp_path / "out" / column / "features")).identity()["layer_means"] is True
    assert (tmp_path / "out" / "tables" / "domain-generalization.md").is_file()
    (run,) = table.runs
    assert [h["encoded_images"] for h in run.history] == [0, 0]  # trained from the store
    source_cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"dataset": source, "root": roots[source]})})
    store = FeatureStore(str(tmp_path / "out" / source / "features"))
    raw = raw_tile_report(source_cfg, store, run.checkpoint, eval_split(source_cfg, store, seed=1), backbone)
    assert raw.confusion.tolist() == run.reports["all"].confusion.tolist()


def test_transfer_protocols_name_missing_dataset_roots(tiny_config, tmp_path):
    from bimors.config import ConfigError
    from bimors.pipelines.protocol_runs import run_protocol

    with pytest.raises(ConfigError, match="evaluate.datasets.rsicd=URI"):
        run_protocol(tiny_config, str(tmp_path), "cross-dataset")
