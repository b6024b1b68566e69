"""Every entry of datasets.yaml through `dvc exp run -S dataset=NAME`, as a new user runs it.

    python benchmarks/registry_smoke.py                       # every entry, the default params.yaml
    python benchmarks/registry_smoke.py --quick               # every deep model one epoch (the stated override)
    python benchmarks/registry_smoke.py busi derma --quick    # some entries
    python benchmarks/registry_smoke.py --offline-only        # only entries whose files the offline copy holds

The repository (what git tracks, plus uncommitted changes) is copied to a temporary folder outside the checkout
and committed there; each entry then runs as `dvc exp run -S dataset=NAME [overrides]` in that copy, one after
the other, with the offline copy of the datasets (`$MEDPIPE_DATA_MIRROR`, else `../shared/datasets` beside this
checkout) and a throwaway MLflow store. Per entry it prints the return code, the wall time, the stages that ran,
the champion and its test accuracy and balanced accuracy (metrics/evaluate.json), or the error's last line.
Nothing else should run on the machine meanwhile: the times are wall times on its cores.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.dvc_project import commit, copy_repository, ran  # noqa: E402

# --quick: one epoch for every deep model (each model's own `train.epochs` too), the rest as params.yaml has it
QUICK = ["train.epochs=1", "train.unfreeze.head_epochs=1"]


def quick_overrides(params: dict) -> list[str]:
    models = [*(params.get("classifiers") or []), *(params.get("segmenters") or [])]
    own = [f"models.{m}.train.epochs=1" for m in models if "epochs" in ((params["models"][m] or {}).get("train") or {})]
    return QUICK + own


def error_line(text: str) -> str:
    """The stage's own one-line error (``error: ...``), else the last line DVC printed."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    own = [line for line in lines if line.startswith("error:")]
    return (own or lines or [""])[-1][:160]


def needs_internet(registry: dict, name: str, mirror: Path) -> list[str]:
    """The files of entry ``name`` (and of the entries it composes) that only a URL gives: not in the offline copy
    and not built from a public source repository."""
    entry = registry[name]
    missing = [f["name"] for f in entry.get("files", []) if "source" not in f and not (mirror / f["name"]).is_file()]
    return missing + [m for part in entry.get("compose", []) for m in needs_internet(registry, part["dataset"], mirror)]


def run_entry(repo: Path, env: dict, name: str, overrides: list[str]) -> dict:
    command = ["dvc", "exp", "run", "-S", f"dataset={name}", *(a for o in overrides for a in ("-S", o))]
    start = time.perf_counter()
    result = subprocess.run(command, cwd=repo, env=env, capture_output=True, text=True)
    row = {"dataset": name, "rc": result.returncode, "seconds": round(time.perf_counter() - start),
           "stages": len(ran(result.stdout)), "champion": "", "accuracy": None, "balanced_accuracy": None,
           "error": "" if result.returncode == 0 else error_line(result.stdout + result.stderr)}
    (repo.parent / f"{name}.log").write_text(result.stdout + result.stderr)
    if result.returncode == 0:
        headline = json.loads((repo / "metrics/evaluate.json").read_text())
        champion = (headline.get("champion") or {}).get("model", "")
        scores = headline["classifiers"].get(champion, {})
        row.update(champion=champion, accuracy=scores.get("accuracy"), balanced_accuracy=scores.get("balanced_accuracy"))
    return row


def markdown(rows: list[dict]) -> str:
    lines = ["| dataset | rc | wall time | stages run | champion | test accuracy | test balanced accuracy |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        minutes = f"{r['seconds'] // 60} min {r['seconds'] % 60:02d} s"
        score = (lambda v: "" if v is None else f"{v:.3f}")
        champion = f"`{r['champion']}`" if r["champion"] else r["error"]
        lines.append(f"| `{r['dataset']}` | {r['rc']} | {minutes} | {r['stages']} | {champion} | "
                     f"{score(r['accuracy'])} | {score(r['balanced_accuracy'])} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("datasets", nargs="*", help="entries of datasets.yaml (default: every entry)")
    parser.add_argument("--quick", action="store_true", help="one epoch for every deep model: " + " ".join(QUICK))
    parser.add_argument("--keep", action="store_true", help="keep the temporary copy and the logs")
    parser.add_argument("--offline-only", action="store_true",
                        help="leave out (and list) the entries whose files only a download from a URL gives")
    args = parser.parse_args(argv)
    registry = yaml.safe_load((ROOT / "datasets.yaml").read_text())
    names = args.datasets or list(registry)
    unknown = sorted(set(names) - set(registry))
    if unknown:
        parser.error(f"not in datasets.yaml: {', '.join(unknown)}")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    overrides = quick_overrides(params) if args.quick else []
    mirror = os.environ.get("MEDPIPE_DATA_MIRROR") or str(ROOT.parent / "shared" / "datasets")
    if args.offline_only:
        online = {name: files for name in names if (files := needs_internet(registry, name, Path(mirror)))}
        for name, files in online.items():
            print(f"{name}: not run, needs the internet ({', '.join(files)})")
        names = [name for name in names if name not in online]
    base = Path(tempfile.mkdtemp(prefix="registry-smoke-"))
    repo = base / "repo"
    repo.mkdir()
    copy_repository(repo)
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    env = {**os.environ, "PATH": path, "MEDPIPE_DATA_MIRROR": mirror, "MLFLOW_TRACKING_URI": f"sqlite:///{base}/mlflow.db"}
    env.pop("DVC_ROOT", None)
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    commit(repo, env, "registry smoke")
    print(f"cores: {len(os.sched_getaffinity(0))}; overrides: {' '.join(overrides) or 'none (params.yaml)'}; "
          f"copy: {repo}", flush=True)
    rows = []
    try:
        for name in names:
            rows.append(run_entry(repo, env, name, overrides))
            r = rows[-1]
            print(f"{name}: rc {r['rc']}, {r['seconds']} s, {r['stages']} stages, champion {r['champion'] or '-'} "
                  f"accuracy {r['accuracy']} {r['error']}", flush=True)
    finally:
        print(markdown(rows))
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
