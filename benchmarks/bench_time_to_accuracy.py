"""Time to accuracy: the wall time of a training recipe, data loading included, and the test accuracy it reaches.

The recipe is a params file merged over ``params.yaml`` (default ``benchmarks/recipes/bloodmnist_fast.yaml``:
bloodmnist with its own train/val/test split, as MedMNIST publishes its figures, and the two-convolution CNN).
The data stages run once into ``--work`` (timed apart: ``dvc repro`` caches them); then, for each seed, the
training stage runs exactly as ``dvc repro`` runs it (``medpipe.training.stage.run``, MLflow off), and the
saved model predicts the test split. The clock covers what a user waits for from a cached split to a test
score: loading the split, training (with its per-epoch validation), saving, and predicting the test split.
The epoch count is fixed by the recipe; the test split is read once, after training, never to stop early.

    python benchmarks/bench_time_to_accuracy.py                          # 3 seeds, target 0.958 in 66 s
    python benchmarks/bench_time_to_accuracy.py --seeds 42 --set models.cnn_two_conv.train.epochs=10

Run it on an otherwise idle machine: a second torch process on the same cores slows both several-fold.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]


def merged(base: dict, overrides: dict) -> dict:
    """``base`` with ``overrides`` merged in, nested mappings key by key."""
    out = dict(base)
    for key, value in overrides.items():
        out[key] = merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def set_key(params: dict, assignment: str) -> None:
    """``a.b.c=value`` (value parsed as YAML), like ``dvc exp run -S``."""
    key, _, text = assignment.partition("=")
    *parents, leaf = key.split(".")
    node = params
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = yaml.safe_load(text)


def prepare_data(params: dict, work: Path) -> dict[str, float]:
    """download -> preprocess -> split into ``work`` (skipped when already there); seconds per stage."""
    from medpipe.data import download, preprocess, splitting

    seconds: dict[str, float] = {}
    steps = [
        ("download", work / "raw", lambda: download.run(params, download.DownloadPaths(work / "raw"))),
        ("preprocess", work / "images", lambda: preprocess.run(
            params, preprocess.PreprocessPaths(work / "raw", work / "images", work / "preprocess_report.json"))),
        ("split", work / "processed", lambda: splitting.run(params, splitting.SplitPaths(
            work / "images", work / "preprocess_report.json", work / "processed", work / "split_report.json",
            work / "data.json"))),
    ]
    for name, output, step in steps:
        if not output.exists():
            start = time.perf_counter()
            step()
            seconds[name] = time.perf_counter() - start
    return seconds


def time_to_accuracy(params: dict, model: str, seed: int, processed: Path, out: Path) -> dict[str, float]:
    """One training run as ``dvc repro`` runs it, then the test split: wall seconds and test accuracy."""
    from medpipe.data.imageset import ImageSet
    from medpipe.predictors import load_model
    from medpipe.training import stage

    paths = stage.TrainPaths(model, seed, processed / "train", processed / "val",
                             processed / "normalization.json", out / model / f"seed{seed}", out / "live" / f"seed{seed}")
    start = time.perf_counter()
    summary = stage.run(params, paths)
    trained = time.perf_counter()
    test = ImageSet.load(processed / "test")
    proba = load_model(paths.out / "model.pt").predict_proba(test.images)
    done = time.perf_counter()
    return {"seed": seed, "seconds": done - start, "train_seconds": trained - start,
            "test_accuracy": float((proba.argmax(1) == test.labels).mean()), "test_images": len(test),
            "epochs": summary["epochs_run"], "best_epoch": summary["best_epoch"],
            "validation_accuracy": summary["validation"]["accuracy"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", type=Path, default=ROOT / "benchmarks/recipes/bloodmnist_fast.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a param")
    parser.add_argument("--seeds", nargs="+", type=int, default=[42, 43, 44])
    parser.add_argument("--target", type=float, default=0.958, help="test accuracy to reach (MedMNIST ResNet-18)")
    parser.add_argument("--budget", type=float, default=66.0, help="seconds allowed per run")
    parser.add_argument("--work", type=Path, help="data and model folder (default: a new temporary folder)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args()
    os.environ.setdefault("MEDPIPE_TRACKING", "off")

    from medpipe.config import load_params

    params = merged(load_params(ROOT / "params.yaml"), yaml.safe_load(args.recipe.read_text()))
    for assignment in args.set:
        set_key(params, assignment)
    model = params["classifiers"][0]
    work = args.work or Path(tempfile.mkdtemp(prefix="medpipe-tta-"))
    data_seconds = prepare_data(params, work)
    print(f"dataset {params['dataset']} (source split: {params['split']['use_source_split']}), model {model}; "
          f"data stages {', '.join(f'{k} {v:.1f} s' for k, v in data_seconds.items()) or 'cached'}", flush=True)
    print(f"{'seed':>5} {'seconds':>8} {'train s':>8} {'epochs':>6} {'best':>5} {'val acc':>8} {'test acc':>9}")
    runs = []
    for seed in args.seeds:
        r = time_to_accuracy(params, model, seed, work / "processed", work / "models")
        runs.append(r)
        print(f"{seed:>5} {r['seconds']:>8.1f} {r['train_seconds']:>8.1f} {r['epochs']:>6} {r['best_epoch']:>5} "
              f"{r['validation_accuracy']:>8.4f} {r['test_accuracy']:>9.4f}", flush=True)
    acc = np.array([r["test_accuracy"] for r in runs])
    secs = np.array([r["seconds"] for r in runs])
    reached = int(((acc >= args.target) & (secs <= args.budget)).sum())
    print(f"test accuracy {acc.mean():.4f} ± {acc.std(ddof=1) if len(acc) > 1 else 0:.4f} (min {acc.min():.4f}), "
          f"wall {secs.mean():.1f} s (max {secs.max():.1f} s) on {runs[0]['test_images']} test images; "
          f"{reached}/{len(runs)} runs reached {args.target} within {args.budget:.0f} s")
    if args.out:
        args.out.write_text(json.dumps({"recipe": str(args.recipe), "set": args.set, "data_seconds": data_seconds,
                                        "target": args.target, "budget": args.budget, "runs": runs}, indent=2) + "\n")


if __name__ == "__main__":
    main()
