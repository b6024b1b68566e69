"""Wall time of two queued experiments with `dvc queue start -j 1` and with `-j 2`, on a small generated project.

    python benchmarks/bench_queue.py            # prints one line per -j setting

Each run makes a fresh copy of the repository on a tiny generated dataset (the integration tests' project),
reproduces the baseline, commits it, queues `-S train.lr=0.002` and `-S train.lr=0.0005` (every deep model
retrains), starts the queue and waits for it. `train.threads: auto` decides each training process's threads;
nothing else should run on the machine meanwhile.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.dvc_project import commit, project, run  # noqa: E402


class _Factory:
    def __init__(self, root: Path) -> None:
        self.root = root

    def mktemp(self, name: str) -> Path:
        path = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=self.root))
        return path


def queue_wall_time(jobs: int, root: Path) -> float:
    repo, env, _ = project.__wrapped__(_Factory(root))
    env = {k: v for k, v in env.items() if k not in ("MEDPIPE_THREADS",)}  # threads: auto, as users run it
    env["MEDPIPE_WORKERS_DIR"] = str(root / f"workers-{jobs}")
    run(["dvc", "repro"], repo, env)
    commit(repo, env, "baseline")
    for lr in ("0.002", "0.0005"):
        run(["dvc", "exp", "run", "--queue", "-S", f"train.lr={lr}"], repo, env)
    start = time.perf_counter()
    run(["dvc", "queue", "start", "-j", str(jobs)], repo, env)
    while True:
        status = run(["dvc", "queue", "status"], repo, env).stdout
        if "Queued" not in status and "Running" not in status:
            break
        time.sleep(2)
    seconds = time.perf_counter() - start
    failed = status.count("Failed")
    if failed:
        raise SystemExit(f"-j {jobs}: {failed} experiment(s) failed:\n{status}")
    return seconds


def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="bench-queue-"))
    try:
        print(f"cores: {len(os.sched_getaffinity(0))}")
        for jobs in (1, 2):
            print(f"dvc queue start -j {jobs}: two experiments in {queue_wall_time(jobs, root):.1f} s wall", flush=True)
    finally:
        subprocess.run(["pkill", "-f", f"{root}"], check=False)
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
