"""The champion's regret: how much test score the champion choice leaves on the table, per champion rule.

    python benchmarks/champion_regret.py /path/to/workspace [...]      # workspaces where `dvc repro` ran evaluate
    python benchmarks/champion_regret.py LEVER --against BASE          # also: every model of LEVER against BASE

Each workspace is a finished run with several training seeds (`seeds: [42, 43, 44]`). Each seed stands for one
single-seed run of the pipeline: its deep models, the classical models (trained once, the same in every seed) and
that seed's ensemble. Per seed and rule, the champion is chosen on the validation predictions
(`reports/predictions/validation/*.csv`, the ensemble's cross-fitted) by the evaluate stage's own code, with the
metric `evaluate.champion_metric` resolves to; the regret is the best candidate's test score minus the champion's
(`reports/predictions/*.csv`), with the paired 95% bootstrap interval of that difference on the test images.
Rules: `best_mean` (the best validation score) and `prefer_ensemble` (the ensemble unless the best model beats it
on validation beyond noise). Printed: per rule the champion of each seed, its test accuracy and ROC AUC, the
regret of each seed and whether it lies within the paired interval, and the mean over seeds. Last, the ensemble's
greedy weights against an equal-weight mean of every classifier, paired on the test images over the seeds.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from medpipe import config  # noqa: E402
from medpipe.evaluation import compare, ensemble  # noqa: E402
from medpipe.evaluation.config import EvaluateConfig  # noqa: E402
from medpipe.evaluation.stage import VALIDATION_DIR, champion_metric, choose_champion, prefer_ensemble  # noqa: E402
from medpipe.metrics import classification_metrics  # noqa: E402

RULES = ("best_mean", "prefer_ensemble")


def one_seed(p: compare.Predictions, seed: int) -> compare.Predictions:
    """``p`` at training ``seed``; a model trained once (a classical one) serves every seed."""
    index = p.seeds.index(seed) if seed in p.seeds else 0 if len(p.seeds) == 1 else None
    if index is None:
        raise SystemExit(f"no predictions for seed {seed} (seeds {p.seeds})")
    return dataclasses.replace(p, seeds=(seed,), proba=p.proba[index:index + 1])


def score(p: compare.Predictions, metric: str) -> float:
    value = classification_metrics(p.labels, p.proba[0])[metric]
    return float("nan") if value is None else float(value)


def load(folder: Path) -> dict[str, compare.Predictions]:
    return {f.stem: compare.load_predictions(f) for f in sorted(folder.glob("*.csv"))
            if compare.load_predictions(f).kind == compare.CLASSIFIER}


def regret_rows(workspace: Path) -> tuple[str, str, list[dict]]:
    params = yaml.safe_load((workspace / "params.yaml").read_text())
    cfg = config.load_section(params, "evaluate", EvaluateConfig)
    with contextlib.chdir(workspace):   # the workspace's datasets.yaml
        metric = champion_metric(cfg, params)
    cfg = cfg.model_copy(update={"champion_metric": metric})
    validation = load(workspace / "reports/predictions" / VALIDATION_DIR)
    test = {name: p for name, p in load(workspace / "reports/predictions").items() if name in validation}
    rows = []
    for seed in params["seeds"]:
        val = {name: one_seed(p, seed) for name, p in validation.items()}
        tst = {name: one_seed(p, seed) for name, p in test.items()}
        candidates = {name: [(score(p, metric), name)] for name, p in val.items()}
        best_test = max(tst, key=lambda name: (score(tst[name], metric), name))
        for rule in RULES:
            chosen = choose_champion(candidates)
            if rule == "prefer_ensemble":
                chosen, _ = prefer_ensemble(chosen, candidates, val, cfg)
            name = chosen[0]
            gap = compare.compare(tst[name], tst[best_test], [metric], cfg.bootstrap_resamples, cfg.bootstrap_seed,
                                  cfg.confidence)[metric]
            scores = classification_metrics(tst[name].labels, tst[name].proba[0])
            rows.append({"seed": seed, "rule": rule, "champion": name, "best": best_test,
                         "regret": score(tst[best_test], metric) - score(tst[name], metric),
                         "ci": (gap.ci_low, gap.ci_high), "accuracy": scores["accuracy"], "roc_auc": scores["roc_auc"]})
    return params["dataset"], metric, rows


def uniform_vs_greedy(workspace: Path, metrics: tuple[str, ...] = ("accuracy", "roc_auc")) -> str:
    """The equal-weight mean of every classifier against the ensemble's vote, per seed, paired over the seeds."""
    test = load(workspace / "reports/predictions")
    vote = test[ensemble.NAME]
    members = [name for name in test if name != ensemble.NAME]
    mean = np.stack([np.mean([one_seed(test[m], s).proba[0] for m in members], axis=0) for s in vote.seeds])
    uniform = dataclasses.replace(vote, proba=mean)
    verdicts = compare.compare(vote, uniform, list(metrics), 1000, 0, 0.95)
    return "; ".join(f"{m} {v.base:.4f} -> {v.head:.4f}, {v.difference:+.4f} [{v.ci_low:+.4f}, {v.ci_high:+.4f}] "
                     f"{v.verdict}" for m, v in verdicts.items())


def against(base: Path, head: Path, metrics: tuple[str, ...] = ("accuracy", "roc_auc")) -> list[str]:
    """Each classifier of ``head`` against the same model of ``base`` (two runs on the same test images, e.g. a lever
    and the default), paired over the images and seeds: one line per model."""
    before, after = load(base / "reports/predictions"), load(head / "reports/predictions")
    lines = []
    for name in sorted(set(before) & set(after)):
        verdicts = compare.compare(before[name], after[name], list(metrics), 1000, 0, 0.95)
        lines.append(f"{name}: " + "; ".join(f"{m} {v.base:.4f} -> {v.head:.4f}, {v.difference:+.4f} "
                                             f"[{v.ci_low:+.4f}, {v.ci_high:+.4f}] {v.verdict}"
                                             for m, v in verdicts.items()))
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workspaces", nargs="+", type=Path)
    parser.add_argument("--against", type=Path, help="a run on the same test images to compare every model with")
    args = parser.parse_args()
    for workspace in args.workspaces:
        dataset, metric, rows = regret_rows(workspace)
        print(f"\n## {dataset} ({workspace}), regret in test {metric}; ensemble = {ensemble.NAME}")
        print("| rule | seed | champion | best on test | regret | paired 95% interval | within | test ACC | test AUC |")
        print("|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            low, high = r["ci"]
            within = "yes" if low <= 0 <= high or r["regret"] == 0 else "no"
            print(f"| {r['rule']} | {r['seed']} | {r['champion']} | {r['best']} | {r['regret']:.4f} | "
                  f"[{low:.4f}, {high:.4f}] | {within} | {r['accuracy']:.4f} | {r['roc_auc']:.4f} |")
        for rule in RULES:
            mine = [r for r in rows if r["rule"] == rule]
            acc, auc = np.array([r["accuracy"] for r in mine]), np.array([r["roc_auc"] for r in mine])
            print(f"{rule}: mean regret {np.mean([r['regret'] for r in mine]):.4f} over {len(mine)} seeds; champion "
                  f"test ACC {acc.mean():.4f} ± {acc.std(ddof=1) if len(acc) > 1 else 0:.4f}, "
                  f"AUC {auc.mean():.4f} ± {auc.std(ddof=1) if len(auc) > 1 else 0:.4f}")
        print(f"equal weights instead of the greedy vote: {uniform_vs_greedy(workspace)}")
        if args.against:
            print(f"against {args.against}:", *against(args.against, workspace), sep="\n")


if __name__ == "__main__":
    main()
