"""How far an edit reaches: for each module of `medpipe/`, the stage definitions of `dvc.yaml` that rerun when it
changes (a `foreach`/`matrix` definition counts once, however many models and seeds it expands to).

    python benchmarks/blast_radius.py            # the table, widest first, then dvc.yaml's size
    python benchmarks/blast_radius.py --rev REV  # the same for a committed revision (git show REV:...)

A module counts for a stage when the stage's `deps` name it, or a folder holding it.
"""

from __future__ import annotations

import argparse
import subprocess
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def read(rev: str | None, path: str) -> str:
    if rev is None:
        return (ROOT / path).read_text()
    return subprocess.run(["git", "show", f"{rev}:{path}"], cwd=ROOT, check=True, capture_output=True,
                          text=True).stdout


def modules(rev: str | None) -> list[str]:
    if rev is None:
        return sorted(str(p.relative_to(ROOT)) for p in (ROOT / "medpipe").rglob("*.py"))
    out = subprocess.run(["git", "ls-tree", "-r", "--name-only", rev, "medpipe"], cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout
    return sorted(line for line in out.splitlines() if line.endswith(".py"))


def stage_deps(dvc_yaml: str) -> dict[str, list[str]]:
    stages = yaml.safe_load(dvc_yaml)["stages"]
    return {name: list((stage.get("do", stage)).get("deps", [])) for name, stage in stages.items()}


def covers(dep: str, module: str) -> bool:
    return module == dep or module.startswith(dep.rstrip("/") + "/")


def radius(rev: str | None) -> dict[str, list[str]]:
    deps = stage_deps(read(rev, "dvc.yaml"))
    return {m: sorted(s for s, ds in deps.items() if any(covers(d, m) for d in ds)) for m in modules(rev)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rev", help="a git revision (default: the working tree)")
    args = parser.parse_args()
    table = radius(args.rev)
    text = read(args.rev, "dvc.yaml")
    deps = stage_deps(text)
    print("| module | stage definitions | which |\n|---|---|---|")
    for module, stages in sorted(table.items(), key=lambda kv: (-len(kv[1]), kv[0])):
        print(f"| `{module}` | {len(stages)} | {', '.join(stages)} |")
    print(f"\nstage definitions: {len(deps)}; modules: {len(table)}; "
          f"modules in more than 2 definitions besides evaluate: "
          f"{sum(len([s for s in st if s != 'evaluate']) > 2 for st in table.values())}")
    print(f"dvc.yaml: {len(text.splitlines())} lines, {sum(len(d) for d in deps.values())} dep entries "
          f"({sum(d.startswith('medpipe') for ds in deps.values() for d in ds)} of them medpipe modules or folders)")


if __name__ == "__main__":
    main()
