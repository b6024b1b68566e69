"""Does a model depend on what else runs on the machine? Train one classifier three times on the pipeline's data:

  A  train.threads: 2, alone
  B  train.threads: 2, beside another medpipe training process (a worker that registers and keeps a core busy)
  C  train.threads: auto, beside that process (auto gives each of the two workers its share: 1 thread)

and print each run's wall time and the MD5 of its model file. With a fixed thread count A and B are the same bytes;
auto trades that for throughput when several trainings share the cores.

    dvc repro split augment            # the data it trains on
    python benchmarks/bench_threads.py [--model cnn_two_conv] [--seed 42]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
BUSY_WORKER = """
import time
from medpipe.runtime import register_worker
register_worker()
end = time.monotonic() + 3600
while time.monotonic() < end:
    sum(i * i for i in range(10000))
"""


@contextlib.contextmanager
def busy_medpipe_worker(env: dict) -> Iterator[None]:
    proc = subprocess.Popen([sys.executable, "-c", BUSY_WORKER], cwd=ROOT, env=env)
    time.sleep(2)  # registered before the training counts the workers
    try:
        yield
    finally:
        proc.terminate()
        proc.wait(30)


def train(model: str, seed: int, threads: object, folder: Path, env: dict) -> tuple[float, str]:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["train"]["threads"] = threads
    params_file = folder / "params.yaml"
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))
    train_set = params["train"]["train_set"]
    cmd = [sys.executable, "-m", "stages.train", "--params", str(params_file), "--model", model, "--seed", str(seed),
           "--train", f"data/processed/{train_set}", "--val", "data/processed/val",
           "--normalization", "data/processed/normalization.json", "--out", str(folder / "out"),
           "--live", str(folder / "live")]
    start = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True)
    seconds = time.perf_counter() - start
    return seconds, hashlib.md5((folder / "out" / "model.pt").read_bytes()).hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="cnn_two_conv", help="a classifier of params.yaml's models")
    parser.add_argument("--seed", type=int, default=42, help="training seed")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        env = {k: v for k, v in os.environ.items() if k != "MEDPIPE_THREADS"}
        env.update(MEDPIPE_TRACKING="off", MEDPIPE_WORKERS_DIR=str(Path(tmp) / "workers"))
        runs = {}
        for name, threads, busy in (("A", 2, False), ("B", 2, True), ("C", "auto", True)):
            folder = Path(tmp) / name
            folder.mkdir()
            with busy_medpipe_worker(env) if busy else contextlib.nullcontext():
                runs[name] = train(args.model, args.seed, threads, folder, env)
            beside = "beside a busy medpipe worker" if busy else "alone"
            print(f"{name}: train.threads={threads!s:<4} {beside:<29} {runs[name][0]:6.1f} s  model.pt md5 {runs[name][1]}")
    print(f"A == B (fixed threads, whatever runs beside): {runs['A'][1] == runs['B'][1]}")
    print(f"A == C (auto beside another worker):          {runs['A'][1] == runs['C'][1]}")


if __name__ == "__main__":
    main()
