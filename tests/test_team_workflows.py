"""Team workflows with the real tools on the small generated project (``tests/dvc_project.py``).

- an MLflow tracking server (``mlflow server``) receives the pipeline's runs and registered models, and
  ``mlflow models serve`` answers with the champion;
- an S3 remote (moto's S3 server) shares the DVC cache: push, clone, pull, nothing to reproduce;
- the pull-request workflow (``.github/workflows/pr-report.yml``) and the report it posts;
- the experiment queue: two experiments at once, one SQLite MLflow store;
- interrupted and concurrent ``dvc repro``.

Every server binds to 127.0.0.1 on a free port and is stopped at the end of its test.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.dvc_project import ROOT, champion_digest, commit, ran, run

pytestmark = pytest.mark.integration

UP_TO_DATE = "Data and pipelines are up to date"
# DVC's two lock errors: the repository lock (`.dvc/tmp/lock`), and outputs locked by the other process
LOCK_ERROR = re.compile(r"Unable to acquire lock\. Most likely another DVC process is running"
                        r"|ERROR: failed to reproduce '[^']+': '[^']+' is busy, it is being blocked by:"
                        r"\s+\(PID \d+\)")
FAKE_AWS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1"}
MIGRATION_RACE = re.compile(r"duplicate column name|alembic\.util\.exc|sqlite3\.OperationalError")
WORKFLOW = ROOT / ".github/workflows/pr-report.yml"
CNN_FILE = "models/cnn_two_conv/seed42/model.pt"


# --------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def team(project):  # noqa: F811 (the imported fixture)
    """The small project with one deep model (the two-conv CNN), so that each retraining stays short."""
    repo, env, _ = project
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["classifiers"] = ["cnn_two_conv"]
    params["segmenters"] = []  # the pixel classifier stays
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    commit(repo, env, "one deep classifier")
    return repo, env


def commit_all(repo: Path, env: dict, message: str) -> None:
    """Commit whatever changed (nothing is fine)."""
    if run(["git", "status", "--porcelain"], repo, env).stdout.strip():
        commit(repo, env, message)


def branch(repo: Path, env: dict) -> str:
    return run(["git", "rev-parse", "--abbrev-ref", "HEAD"], repo, env).stdout.strip()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(proc: subprocess.Popen, timeout: float = 30) -> None:
    """Terminate a process started in its own session, with its children; kill it if it does not stop."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    with contextlib.suppress(ProcessLookupError):  # children that outlived their parent
        os.killpg(proc.pid, signal.SIGKILL)


def start(cmd: list[str], cwd: Path, env: dict, log: Path) -> subprocess.Popen:
    """A background process in its own session (process group), output to ``log``."""
    with open(log, "w") as out:
        return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


@contextlib.contextmanager
def background(cmd: list[str], cwd: Path, env: dict, log: Path) -> Iterator[subprocess.Popen]:
    proc = start(cmd, cwd, env, log)
    try:
        yield proc
    finally:
        stop(proc)


def wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None,
             log: Path | None = None, every: float = 0.5):
    """Poll ``predicate`` until it returns something true; fail with the log if ``proc`` dies or time's up."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            break
        time.sleep(every)
    tail = log.read_text()[-3000:] if log and log.exists() else ""
    pytest.fail(f"{what}: not within {timeout:.0f} s (process exit status {proc and proc.poll()})\n{tail}")


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def post_json(url: str, body: dict, timeout: float = 120) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def leftovers(repo: Path) -> list[str]:
    """Temporary files or folders of interrupted atomic writes (``.<name>.<random>.tmp``, ``*.tmp``)."""
    found = []
    for top in ("data", "models", "reports", "metrics", "plots"):
        if (repo / top).exists():
            found += [str(p.relative_to(repo)) for p in (repo / top).rglob("*")
                      if p.name.endswith(".tmp") or re.fullmatch(r"\..+\.old", p.name)]
    return sorted(found)


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def set_param(repo: Path, dotted: str, value) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    *parents, key = dotted.split(".")
    section = params
    for name in parents:
        section = section[name]
    section[key] = value
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


# --------------------------------------------------------------------------- 1. tracking server


def test_tracking_server_gets_runs_and_models_and_serves_the_champion(team, tmp_path):
    repo, env = team
    port, serve_port = free_port(), free_port()
    uri = f"http://127.0.0.1:{port}"
    server_env = {k: v for k, v in env.items() if not k.startswith("MLFLOW_")}
    server = ["mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
              "--backend-store-uri", f"sqlite:///{tmp_path}/server.db",
              "--artifacts-destination", str(tmp_path / "artifacts")]
    with background(server, tmp_path, server_env, tmp_path / "server.log") as proc:
        wait_for(lambda: answers(f"{uri}/health"), 120, "mlflow server /health", proc,
                 tmp_path / "server.log")
        client_env = {**env, "MLFLOW_TRACKING_URI": uri}
        out = run(["dvc", "repro", "-f"], repo, client_env).stdout
        assert "evaluate" in ran(out)
        head = run(["git", "rev-parse", "HEAD"], repo, env).stdout.strip()

        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        experiment = client.get_experiment_by_name("medpipe")
        runs = client.search_runs([experiment.experiment_id], max_results=500)
        assert runs and all(r.data.tags.get("dvc_experiment") == "workspace" for r in runs)
        assert all(r.data.tags.get("git_commit") == head for r in runs)
        assert {r.info.status for r in runs} == {"FINISHED"}, [(r.info.run_name, r.info.status) for r in runs]
        logged = {r.data.tags["model"]: r for r in runs if "model_md5" in r.data.tags}
        assert {"cnn_two_conv", "knn", "random_forest", "voting"} <= set(logged), sorted(logged)
        assert logged["cnn_two_conv"].data.tags["model_md5"] == md5(repo / CNN_FILE)
        registered = {m.name for m in client.search_registered_models()}
        assert {f"medpipe-tiny-{m}" for m in ("cnn_two_conv", "knn", "voting")} <= registered, registered

        champion = json.loads((repo / "reports/evaluate/champion.json").read_text())
        run(["medpipe-promote"], repo, client_env)  # promotion is explicit: the run itself moved no alias
        registered = f"medpipe-tiny-{champion['model']}"
        version = client.get_model_version_by_alias(registered, "champion")
        champion_run = client.get_run(version.run_id)
        assert champion_run.data.tags["model_file"] == champion["file"]
        assert champion_run.data.tags["model_md5"] == champion_digest(repo, champion)

        serve = ["mlflow", "models", "serve", "-m", f"models:/{registered}@champion",
                 "-h", "127.0.0.1", "-p", str(serve_port), "--env-manager", "local", "-w", "1"]
        with background(serve, tmp_path, client_env, tmp_path / "serve.log") as serving:
            wait_for(lambda: answers(f"http://127.0.0.1:{serve_port}/ping"), 180, "mlflow models serve /ping",
                     serving, tmp_path / "serve.log")
            images = np.random.default_rng(0).integers(0, 256, size=(2, 32, 32, 3), dtype=np.uint8)
            answer = post_json(f"http://127.0.0.1:{serve_port}/invocations", {"inputs": images.tolist()})
        proba = np.asarray(answer["predictions"], dtype=float)
        assert proba.shape == (2, 3), answer
        assert np.allclose(proba.sum(axis=1), 1.0, atol=1e-4) and (proba >= 0).all()

        # A team server keeps the artifacts: the runs' artifacts go through the server (`mlflow-artifacts:`),
        # not into a folder of the machine that ran the pipeline.
        local = sorted({r.info.artifact_uri.split("/mlartifacts")[0] for r in runs
                        if not r.info.artifact_uri.startswith("mlflow-artifacts:")})
        assert not local, f"artifacts written beside the client, not to the server: {local[:1]}"
        assert any((tmp_path / "artifacts").rglob("MLmodel"))


# --------------------------------------------------------------------------- 2. S3 remote


@pytest.fixture
def s3_server():
    """moto's S3 server on 127.0.0.1 (a free port), an empty bucket ``medpipe-dvc``: (endpoint, client)."""
    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        s3 = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing",
                          aws_secret_access_key="testing", region_name="us-east-1")
        s3.create_bucket(Bucket="medpipe-dvc")
        yield endpoint, s3
    finally:
        server.stop()


def test_s3_remote_push_then_a_clone_pulls_and_reproduces_nothing(team, s3_server, tmp_path):
    repo, env = team
    endpoint, s3 = s3_server
    env = {**env, **FAKE_AWS}
    run(["dvc", "repro"], repo, env)
    run(["dvc", "remote", "add", "-d", "s3remote", "s3://medpipe-dvc/store"], repo, env)
    run(["dvc", "remote", "modify", "s3remote", "endpointurl", endpoint], repo, env)
    try:
        commit(repo, env, "S3 remote")
        assert "pushed" in run(["dvc", "push"], repo, env).stdout
        stored = s3.list_objects_v2(Bucket="medpipe-dvc", Prefix="store/files/md5/").get("KeyCount", 0)
        assert stored > 10, stored

        clone = tmp_path / "clone"
        run(["git", "clone", "-q", str(repo), str(clone)], tmp_path, env)
        assert "s3://medpipe-dvc/store" in (clone / ".dvc/config").read_text()  # the remote travels with git
        assert not (clone / "models").exists()
        run(["dvc", "pull"], clone, env)
        assert md5(clone / CNN_FILE) == md5(repo / CNN_FILE)
        assert UP_TO_DATE in run(["dvc", "status"], clone, env).stdout
        out = run(["dvc", "repro"], clone, env).stdout
        assert ran(out) == set(), out

        # the pull-request workflow's `Reproduce` step in a fresh checkout: pulls everything, runs nothing
        ci = tmp_path / "ci"
        run(["git", "clone", "-q", str(repo), str(ci)], tmp_path, env)
        ci_env = {**env, "BASE": branch(repo, env), "GITHUB_ENV": str(tmp_path / "github_env")}
        out = run(["bash", "-ec", step_scripts()["Reproduce"]], ci, ci_env).stdout
        assert "Pulling data for stage: 'evaluate'" in out
        assert ran(out) == set(), out
        assert UP_TO_DATE in run(["dvc", "status"], ci, env).stdout
    finally:  # the server goes away with this test: later tests must not try to reach it
        run(["dvc", "remote", "remove", "s3remote"], repo, env)
        commit_all(repo, env, "no remote")


def test_an_experiment_run_in_one_clone_is_listed_compared_and_applied_in_another(team, s3_server, tmp_path):
    """Two machines, the DVC way: one bare git repository (experiments travel as git refs, `dvc exp push` /
    `dvc exp pull`), the S3 remote for their outputs, one MLflow server for their runs."""
    repo, env = team
    endpoint, _ = s3_server
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    env = {**env, **FAKE_AWS, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    server = ["mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
              "--backend-store-uri", f"sqlite:///{tmp_path}/server.db",
              "--artifacts-destination", str(tmp_path / "artifacts")]
    server_env = {k: v for k, v in env.items() if not k.startswith("MLFLOW_")}
    run(["dvc", "remote", "add", "-d", "s3remote", "s3://medpipe-dvc/store"], repo, env)
    run(["dvc", "remote", "modify", "s3remote", "endpointurl", endpoint], repo, env)
    try:
        run(["dvc", "repro"], repo, env)
        commit_all(repo, env, "S3 remote, reproduced")
        run(["dvc", "push"], repo, env)
        bare = tmp_path / "origin.git"
        run(["git", "clone", "-q", "--bare", str(repo), str(bare)], tmp_path, env)
        alice, bob = tmp_path / "alice", tmp_path / "bob"
        for clone in (alice, bob):
            run(["git", "clone", "-q", str(bare), str(clone)], tmp_path, env)
            run(["dvc", "pull"], clone, env)
        with background(server, tmp_path, server_env, tmp_path / "server.log") as proc:
            wait_for(lambda: answers(f"{uri}/health"), 120, "mlflow server /health", proc, tmp_path / "server.log")
            shared = {**env, "MLFLOW_TRACKING_URI": uri}
            out = run(["dvc", "exp", "run", "-n", "knn-one", "-S", "classical.knn.n_neighbors=1"], alice, shared).stdout
            assert ran(out) == {"train_classical", "evaluate"}, out
            run(["dvc", "exp", "push", "origin", "knn-one"], alice, shared)  # git refs to origin, outputs to S3

            assert "knn-one" in run(["dvc", "exp", "list", "origin"], bob, shared).stdout
            run(["dvc", "exp", "pull", "origin", "knn-one"], bob, shared)
            shown = json.loads(run(["dvc", "exp", "show", "--json"], bob, shared).stdout)
            names = {r.get("name") for c in shown for e in c.get("experiments") or [] for r in e.get("revs", [])}
            assert "knn-one" in names, shown
            run(["dvc", "exp", "apply", "knn-one"], bob, shared)
            assert yaml.safe_load((bob / "params.yaml").read_text())["classical"]["knn"]["n_neighbors"] == 1
            assert UP_TO_DATE in run(["dvc", "status"], bob, shared).stdout  # its outputs came with it
            report = run(["medpipe-report", "--base", "HEAD", "--resamples", "200"], bob, shared).stdout
            assert "classical.knn.n_neighbors" in report and "| knn | " in report, report

            from mlflow import MlflowClient

            client = MlflowClient(tracking_uri=uri)
            runs = client.search_runs([client.get_experiment_by_name("medpipe").experiment_id], max_results=500)
            assert "knn-one" in {r.data.tags.get("dvc_experiment") for r in runs}  # alice's run, seen by bob
    finally:
        run(["dvc", "remote", "remove", "s3remote"], repo, env)
        commit_all(repo, env, "no remote")


# --------------------------------------------------------------------------- 3. pull-request workflow


def workflow() -> dict:
    return yaml.safe_load(WORKFLOW.read_text())


def step_scripts() -> dict[str, str]:
    return {step.get("name", step.get("uses")): step["run"] for step in workflow()["jobs"]["report"]["steps"]
            if "run" in step}


def commands_of(script: str) -> list[list[str]]:
    """The simple commands of a shell script (split on newlines, ;, &&, ||, |; if/then/else/fi dropped)."""
    commands = []
    for line in script.splitlines():
        for part in re.split(r"&&|\|\||;|\|", line):
            words = shlex.split(part, comments=True)
            while words and (words[0] in ("if", "then", "else", "elif", "fi", "!", "[", "do", "done")
                             or re.fullmatch(r"\w+=.*", words[0])):
                words = words[1:] if words[0] != "[" else []
            if words:
                commands.append(words)
    return commands


def test_pr_workflow_is_valid_and_every_command_exists():
    flow = workflow()
    triggers = flow.get("on", flow.get(True))  # YAML 1.1 reads the key `on` as True
    assert "pull_request" in triggers
    assert flow["permissions"]["pull-requests"] == "write"
    steps = flow["jobs"]["report"]["steps"]
    uses = [s.get("uses", "") for s in steps]
    checkout = steps[uses.index("actions/checkout@v4")]
    assert checkout["with"]["fetch-depth"] == 0
    python = steps[uses.index("actions/setup-python@v5")]
    assert str(python["with"]["python-version"]) == "3.11"
    assert "iterative/setup-cml@v2" in uses
    scripts = step_scripts()
    assert scripts["Install"] == "pip install -r requirements.txt"
    comment = next(s for s in steps if "cml comment" in s.get("run", ""))
    assert comment["env"]["REPO_TOKEN"] == "${{ secrets.GITHUB_TOKEN }}"
    assert comment["run"].strip() == "cml comment update report.md"  # one comment per pull request, updated
    assert "--guard" in scripts["Report"]  # a watched `worse` verdict fails the check...
    assert comment["if"].startswith("always()")  # ...after the comment is posted
    assert flow["jobs"]["report"]["env"]["BASE"] == "${{ github.base_ref }}"
    provided_by_actions = {"cml"}  # iterative/setup-cml
    programs = {words[0] for script in scripts.values() for words in commands_of(script)}
    assert {"pip", "dvc", "medpipe-report", "git", "cml"} <= programs
    missing = [p for p in programs - provided_by_actions if shutil.which(p) is None]
    assert not missing, missing
    for script in scripts.values():
        assert subprocess.run(["bash", "-n", "-c", script]).returncode == 0, script
    if shutil.which("actionlint"):
        result = subprocess.run(["actionlint", str(WORKFLOW)], capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr


def test_pr_workflow_steps_reproduce_and_report_against_the_base_branch(team, tmp_path):
    """The workflow's `Reproduce` and `Report` scripts, as written, on the project without a DVC remote."""
    repo, env = team
    own_branch = branch(repo, env)
    run(["dvc", "repro"], repo, env)
    commit_all(repo, env, "base")
    run(["git", "update-ref", "refs/remotes/origin/main", "HEAD"], repo, env)  # what checkout fetches
    set_param(repo, "classical.knn.n_neighbors", 1)
    commit(repo, env, "knn with one neighbour")  # the pull request (its outputs are not reproduced yet)
    github_env = tmp_path / "github_env"
    ci_env = {**env, "BASE": "main", "GITHUB_ENV": str(github_env), "MEDPIPE_TRACKING": "off"}
    scripts = step_scripts()
    try:
        out = run(["bash", "-ec", scripts["Reproduce"]], repo, ci_env).stdout
    finally:
        run(["git", "checkout", "-q", own_branch], repo, env)  # the script leaves HEAD detached, as in CI
    assert ran(out) == {"train_classical", "evaluate"}, out
    assert UP_TO_DATE in run(["dvc", "status"], repo, env).stdout
    exported = dict(line.split("=", 1) for line in github_env.read_text().splitlines())
    base_rev = exported["BASE_REV"]
    assert run(["git", "rev-parse", f"{base_rev}^"], repo, env).stdout == run(
        ["git", "rev-parse", "origin/main"], repo, env).stdout  # the base as reproduced here
    guarded = run(["bash", "-ec", scripts["Report"]], repo, {**ci_env, **exported}, check=False)
    assert guarded.returncode in (0, 3), guarded.stderr  # 3: the guard found a watched verdict worse
    report = (repo / "report.md").read_text()
    assert "## Guard" in report
    assert (guarded.returncode == 3) == ("- **failed**:" in report), report
    assert "# medpipe report: workspace" in report and base_rev in report
    assert "classical.knn.n_neighbors" in report  # dvc params diff
    assert "## Model verdicts" in report
    header = "| model | metric | base | head | difference | 95% interval | verdict |"
    assert header in report, report
    rows = [line for line in report.splitlines() if line.startswith("| knn | ")]
    assert rows and all(re.search(r"better|worse|within noise", row) for row in rows), report
    (repo / "report.md").unlink()
    commit_all(repo, env, "pull request reproduced")


# --------------------------------------------------------------------------- 4. experiment queue


def test_two_queued_experiments_run_at_once_and_share_one_mlflow_store(team):
    """`dvc queue start -j 2` on a project whose MLflow store (SQLite, at the project root) does not exist
    yet: both experiments open it at the same time."""
    repo, env = team
    run(["dvc", "repro"], repo, env)
    commit_all(repo, env, "before the queue")
    env = {k: v for k, v in env.items() if k != "MLFLOW_TRACKING_URI"}  # the store at the project root
    for name in ("mlflow.db", "mlflow.db.lock"):
        (repo / name).unlink(missing_ok=True)
    names = {"lr-high": "0.002", "lr-low": "0.0005"}
    for name, lr in names.items():
        run(["dvc", "exp", "run", "--queue", "-n", name, "-S", f"train.lr={lr}"], repo, env)
    try:
        run(["dvc", "queue", "start", "-j", "2"], repo, env)

        def finished():
            status = run(["dvc", "queue", "status"], repo, env).stdout
            lines = [line for line in status.splitlines() if any(n in line for n in names)]
            busy = any(word in "".join(lines) for word in ("Queued", "Running"))
            return status if len(lines) == 2 and not busy else None

        status = wait_for(finished, 600, "queued experiments", every=3)
        logs = {name: run(["dvc", "queue", "logs", name], repo, env).stdout for name in names}
        failed = [name for name in names
                  if any(name in line and "Failed" in line for line in status.splitlines())]
        # MLflow creates a new SQLite store's tables on first use; two stages doing so at once break it
        raced = [name for name in failed if "Creating initial MLflow database tables" in logs[name]
                 and MIGRATION_RACE.search(logs[name])]
        assert failed == raced, (status, {n: logs[n][-3000:] for n in failed})
        done = [name for name in names if name not in failed]
        assert done, status
        for name, text in logs.items():
            assert "database is locked" not in text, (name, text[-3000:])

        shown = json.loads(run(["dvc", "exp", "show", "--json"], repo, env).stdout)
        experiments = {}
        for commit_entry in shown:
            for exp in commit_entry.get("experiments") or []:
                for revision in exp.get("revs", []):
                    if revision.get("name") in done:
                        experiments[revision["name"]] = revision["data"]
        assert set(experiments) == set(done), shown
        for name, data in experiments.items():
            metrics = data["metrics"]["metrics/evaluate.json"]["data"]
            assert metrics["classifiers"]["cnn_two_conv"]["accuracy"] is not None, name
            assert str(data["params"]["params.yaml"]["data"]["train"]["lr"]) == names[name]

        run(["dvc", "exp", "branch", done[0], f"{done[0]}-branch"], repo, env)
        shown_params = run(["git", "show", f"{done[0]}-branch:params.yaml"], repo, env).stdout
        branch_params = yaml.safe_load(shown_params)
        assert branch_params["train"]["lr"] == float(names[done[0]])

        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=f"sqlite:///{repo}/mlflow.db")
        runs = client.search_runs([client.get_experiment_by_name("medpipe").experiment_id], max_results=1000)
        for name in done:
            mine = [r for r in runs if r.data.tags.get("dvc_experiment") == name]
            assert {r.info.status for r in mine} == {"FINISHED"}, [(r.info.run_name, r.info.status)
                                                                   for r in mine]
            trained = [r for r in mine
                       if r.data.tags.get("model") == "cnn_two_conv" and "model_md5" in r.data.tags]
            assert len(trained) == 1, [r.info.run_name for r in mine]
            assert float(trained[0].data.params["train.lr"]) == float(names[name])
        assert not raced, f"{raced} failed: two stages created the project's new SQLite MLflow store at once"
    finally:
        run(["dvc", "queue", "stop", "--kill"], repo, env, check=False)


# --------------------------------------------------------------------------- 5. interruption, concurrency


# Runs a command with SIGINT at its default, as in a terminal: a suite started in the background by a shell
# without job control (`pytest &` in a script) inherits SIGINT ignored, and dvc and the stage would ignore Ctrl-C.
WITH_CTRL_C = ["python", "-c", "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
               "os.execvp(sys.argv[1], sys.argv[1:])"]


def wait_for_training(proc: subprocess.Popen, log: Path) -> None:
    """Until the training stage's first epoch is done (its output folder is being written)."""
    def training():
        text = log.read_text()
        return "Running stage 'train@" in text and re.search(r"epoch 1/\d+", text)

    wait_for(training, 300, "a training stage", proc, log, every=0.2)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL],
                         ids=["sigint", "sigterm", "sigkill"])
def test_an_interrupted_repro_is_finished_by_the_next_one(team, tmp_path, sig):
    repo, env = team
    env = {**env, "MEDPIPE_TRACKING": "off"}
    run(["dvc", "repro"], repo, env)
    epochs = {signal.SIGINT: 12, signal.SIGTERM: 14}.get(sig, 13)  # a change each time; ~0.5 s per epoch
    set_param(repo, "models.cnn_two_conv.train", {"epochs": epochs, "patience": epochs})
    log = tmp_path / "repro.log"
    proc = start([*WITH_CTRL_C, "dvc", "repro"], repo, env, log)
    try:
        wait_for_training(proc, log)
        os.killpg(proc.pid, sig)  # the whole process group, as Ctrl-C in a terminal or a killed CI job
        proc.wait(120)
        if sig != signal.SIGKILL:  # Ctrl-C, a CI timeout, a scheduler: the stage cleans up after itself
            # dvc itself dies at once on SIGTERM; the stage, in the same process group, unwinds on its own
            wait_for(lambda: not leftovers(repo), 60, f"the stage removing its temporary outputs {leftovers(repo)}")
    finally:
        stop(proc)
    assert proc.returncode != 0
    out = run(["dvc", "repro"], repo, env).stdout
    assert "train@cnn_two_conv-42" in ran(out), out
    assert UP_TO_DATE in run(["dvc", "status"], repo, env).stdout
    left = leftovers(repo)
    assert not left, left


def test_two_repros_at_once_in_one_workspace_one_stops_with_the_lock_error(team, tmp_path):
    repo, env = team
    run(["dvc", "repro"], repo, env)
    set_param(repo, "evaluate.bootstrap_resamples", 60)  # evaluate alone has something to do
    logs = [tmp_path / "first.log", tmp_path / "second.log"]
    procs = [start(["dvc", "repro"], repo, env, log) for log in logs]
    try:
        codes = [p.wait(600) for p in procs]
    finally:
        for p in procs:
            stop(p)
    texts = [log.read_text() for log in logs]
    assert sorted(code != 0 for code in codes) == [False, True], (codes, texts)
    winner, loser = (texts[0], texts[1]) if codes[0] == 0 else (texts[1], texts[0])
    assert LOCK_ERROR.search(loser), loser
    assert ran(winner) == {"evaluate"}, winner
    out = run(["dvc", "repro"], repo, env).stdout
    assert ran(out) == set(), out
    assert UP_TO_DATE in run(["dvc", "status"], repo, env).stdout
    assert not leftovers(repo), leftovers(repo)
