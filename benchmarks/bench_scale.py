"""Each pipeline stage at N generated images: wall time, images per second, peak memory, output and disk size.

    python benchmarks/bench_scale.py --n 2000 10000 --source-size 512 --image-size 224
    python benchmarks/bench_scale.py --n 2000 --stages download preprocess split augment --keep
    python benchmarks/bench_scale.py --n 2000 --link-type reflink,hardlink,symlink,copy   # DVC's cache links

For each N it generates (once, cached under WORKDIR/datasets by N and source size) a class-folder zip of
N distinct RGB JPEGs (`root/<class>/<i>.jpg`, 3 classes, no masks: smooth random fields, a gradient,
ellipses, speckle, seeded per image, so that perceptual hashes group none of them), copies the repository
(what git tracks, plus uncommitted changes) into WORKDIR as a new git repository whose datasets.yaml
registers the zip (no crop, `--image-size`) and whose params.yaml selects it, no segmenters, `cnn_two_conv`
and `efficientnet_lite0` at one epoch; then it runs the chosen stages one at a time, `dvc repro -s STAGE`
in DAG order, with the zip's folder as the offline copy (`$MEDPIPE_DATA_MIRROR`).

Before the stages, the bound of preprocessing: JPEG decoding and resizing alone, in 2 processes, on the
first `--bound` images. Per stage: wall seconds, N / seconds, peak resident memory (that of the largest single
process of the stage's tree, as GNU time's %M reports it: the preprocess workers are not summed) and the
bytes of the stage's outputs as dvc.lock records them. Per N: the disk used by `data/`, `.dvc/cache` and both (hard links
counted once) and the cache link type (DVC's default, copy, unless --link-type). A failing stage ends its
N (the later stages depend on it): its return code and error line are printed, its log is kept under
WORKDIR. At the end: a markdown table and the machine. The generation time is printed apart: it is not a
stage. Nothing else should run on the machine meanwhile.

Stages: download preprocess split augment folds train_cnn (train@cnn_two_conv-SEED, one per seed)
train_lite0 (train@efficientnet_lite0-SEED) classical (train_classical). The repository copy is deleted at
the end unless --keep; the generated zips stay unless --clean.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import multiprocessing
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import cv2
import numpy as np
import yaml
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from medpipe.data import imaging  # noqa: E402
from tests.dvc_project import commit, copy_repository, run  # noqa: E402

CLASSES = ("a", "b", "c")
MODELS = ("cnn_two_conv", "efficientnet_lite0")
# benchmark name -> how the copy's stage names start (matrix stages: one per seed), in DAG order
STAGES = {
    "download": "download",
    "preprocess": "preprocess",
    "split": "split",
    "augment": "augment",
    "folds": "folds",
    "train_cnn": "train@cnn_two_conv-",
    "train_lite0": "train@efficientnet_lite0-",
    "classical": "train_classical",
}
GB = 1e9
MB = 1e6


def synthetic_image(index: int, size: int) -> Image.Image:
    """An RGB image of its own: a smooth random field (its low frequencies are what pHash sees), a gradient,
    a tint, a few ellipses (more in the later classes) and speckle, all seeded by ``index``."""
    rng = np.random.default_rng(index)
    cells = int(rng.integers(3, 9))
    coarse = Image.fromarray((rng.random((cells, cells)) * 255).astype(np.uint8))
    field = np.asarray(coarse.resize((size, size), Image.BICUBIC), dtype=np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    axis = np.linspace(-1, 1, size, dtype=np.float32)
    ramp = np.cos(angle) * axis[None, :] + np.sin(angle) * axis[:, None]
    pixels = 0.7 * field + 40 * ramp + 6 * rng.standard_normal((size, size), dtype=np.float32)
    tint = rng.uniform(0.6, 1.0, 3).astype(np.float32)
    image = Image.fromarray(np.clip(pixels[..., None] * tint, 0, 255).astype(np.uint8), mode="RGB")
    draw = ImageDraw.Draw(image)
    for _ in range(1 + index % len(CLASSES) + int(rng.integers(0, 3))):
        x, y = rng.uniform(0, size, 2)
        rx, ry = rng.uniform(size / 20, size / 5, 2)
        draw.ellipse((x - rx, y - ry, x + rx, y + ry), fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    return image


def jpeg_member(job: tuple[int, int]) -> tuple[str, bytes]:
    index, size = job
    buffer = io.BytesIO()
    synthetic_image(index, size).save(buffer, format="JPEG", quality=90)
    return f"root/{CLASSES[index % len(CLASSES)]}/{index}.jpg", buffer.getvalue()


_zip: zipfile.ZipFile | None = None


def _open_zip(archive: str) -> None:
    global _zip
    cv2.setNumThreads(1)   # one OpenCV thread per process, as in the preprocess workers
    _zip = zipfile.ZipFile(archive)


def _decode_and_resize(job: tuple[str, int]) -> None:
    name, size = job
    imaging.resize_image(imaging.decode_image(_zip.read(name)), size)


def decode_bound(archive: Path, image_size: int, limit: int, processes: int = 2) -> float:
    """Images per second that reading, JPEG decoding and resizing alone reach on ``processes`` processes (the
    first ``limit`` images of the zip): the physical bound of the preprocess stage."""
    with zipfile.ZipFile(archive) as zf:
        jobs = [(name, image_size) for name in sorted(zf.namelist())[:limit]]
    context = multiprocessing.get_context("spawn")   # the workers hold the images, this process does not
    with context.Pool(processes, initializer=_open_zip, initargs=(str(archive),)) as pool:
        pool.map(_open_zip, [str(archive)] * processes)   # started before the clock
        start = time.perf_counter()
        for _ in pool.imap_unordered(_decode_and_resize, jobs, chunksize=32):
            pass
        seconds = time.perf_counter() - start
    return len(jobs) / seconds


def dataset_name(n: int, source_size: int) -> str:
    return f"scale-n{n}-s{source_size}"


def generate_zip(path: Path, n: int, source_size: int, processes: int = 2) -> float:
    """Write the zip (stored, not deflated: JPEGs do not shrink) unless it is there; the seconds it took (0 if
    cached). Written beside its final name and renamed, so an interrupted run leaves no half zip behind."""
    if path.is_file():
        return 0.0
    start = time.perf_counter()
    partial = path.with_suffix(".partial")
    jobs = ((i, source_size) for i in range(n))
    with multiprocessing.Pool(processes) as pool, zipfile.ZipFile(partial, "w", zipfile.ZIP_STORED) as zf:
        for member, data in pool.imap(jpeg_member, jobs, chunksize=64):
            zf.writestr(member, data)
    partial.rename(path)
    return time.perf_counter() - start


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def edit_yaml(path: Path, change) -> None:
    data = yaml.safe_load(path.read_text())
    change(data)
    path.write_text(yaml.safe_dump(data, sort_keys=False))


def configure(repo: Path, archive: Path, image_size: int) -> None:
    """Register the zip in the copy's datasets.yaml and point params.yaml at it: no segmenters, the two
    classifiers at one epoch (as tests/dvc_project.py's shrink_for_test overrides params)."""
    name = archive.stem

    def register(registry: dict) -> None:
        registry[name] = {
            "description": f"bench_scale: {archive.name}, generated",
            "files": [{"name": archive.name, "checksum": f"sha256:{sha256_of(archive)}", "urls": []}],
            "reader": "class_folders",
            "classes": {c: c for c in CLASSES},
            "crop": "none",
            "image_size": image_size,
        }

    def shrink(params: dict) -> None:
        params.update(dataset=name, image_size="auto", segmenters=[], classifiers=list(MODELS))
        params["train"]["epochs"] = 1
        params["train"]["unfreeze"]["head_epochs"] = 1
        for model in MODELS:
            params["models"][model]["train"] = {**(params["models"][model].get("train") or {}), "epochs": 1}

    edit_yaml(repo / "datasets.yaml", register)
    edit_yaml(repo / "params.yaml", shrink)


def set_up_copy(base: Path, archive: Path, image_size: int, link_type: str | None) -> tuple[Path, dict]:
    repo = base / "repo"
    if base.exists():
        shutil.rmtree(base)
    repo.mkdir(parents=True)
    copy_repository(repo)
    configure(repo, archive, image_size)
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    env = {**os.environ, "PATH": path, "MEDPIPE_DATA_MIRROR": str(archive.parent),
           "MLFLOW_TRACKING_URI": f"sqlite:///{base}/mlflow.db", "MEDPIPE_WORKERS_DIR": str(base / "workers")}
    env.pop("DVC_ROOT", None)
    run(["git", "init", "-q"], repo, env)
    if link_type:
        run(["dvc", "config", "cache.type", link_type], repo, env)
    commit(repo, env, "bench_scale")
    return repo, env


def link_type_of(repo: Path, env: dict) -> str:
    result = run(["dvc", "config", "cache.type"], repo, env, check=False)
    return result.stdout.strip() if result.returncode == 0 and result.stdout.strip() else "copy (default)"


def stage_names(repo: Path, env: dict, chosen: list[str]) -> list[str]:
    """The copy's DVC stages for the chosen benchmark stages, in DAG order; a matrix stage, one per seed."""
    names = run(["dvc", "stage", "list", "--name-only"], repo, env).stdout.split()
    found = []
    for prefix in (STAGES[key] for key in STAGES if key in chosen):
        matches = [s for s in names if s == prefix or (prefix.endswith("-") and s.startswith(prefix))]
        found += matches or [prefix]  # absent: `dvc repro` says so, as a failed stage
    return found


def timed(command: list[str], cwd: Path, env: dict, log: Path) -> tuple[int, float, int]:
    """Return code, wall seconds, peak RSS in bytes: ``wait4``'s ru_maxrss, that of the largest process of the
    tree that was waited for (GNU time's %M), so the stage's python process under dvc counts."""
    with log.open("w") as out:
        start = time.perf_counter()
        process = subprocess.Popen(command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)
    return process.returncode, seconds, usage.ru_maxrss * 1024


def error_line(text: str) -> str:
    """The stage's own ``error: ...`` line, else a traceback's last exception line, else the last line."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    own = [line for line in lines if line.startswith("error:")]
    raised = [line for line in lines if re.match(r"^[\w.]+(Error|Exception|Interrupt|Exit)\b:?", line)]
    return (own or raised or lines or [""])[-1][:200]


def output_bytes(repo: Path, stage: str) -> int:
    """The sizes of the stage's outs as dvc.lock records them (exact, after the run; a directory's total)."""
    lock = yaml.safe_load((repo / "dvc.lock").read_text()) if (repo / "dvc.lock").is_file() else {}
    entry = ((lock or {}).get("stages") or {}).get(stage) or {}
    return sum(int(out.get("size") or 0) for out in entry.get("outs") or [])


def disk_used(*folders: Path) -> int:
    """Bytes of disk the folders' files take (allocated blocks), each hard-linked file once."""
    seen, total = set(), 0
    for path in (p for folder in folders if folder.exists() for p in folder.rglob("*")):
        info = path.lstat()
        if path.is_file() and not path.is_symlink() and (info.st_dev, info.st_ino) not in seen:
            seen.add((info.st_dev, info.st_ino))
            total += info.st_blocks * 512
    return total


def run_n(n: int, args, archive: Path, base: Path) -> list[dict]:
    try:
        repo, env = set_up_copy(base, archive, args.image_size, args.link_type)
        stages = stage_names(repo, env, args.stages)
    except AssertionError as err:  # tests.dvc_project.run: a git or dvc command failed
        print(f"N={n}: setting up the copy failed: {error_line(str(err))}", flush=True)
        return []
    logs = base / "logs"
    logs.mkdir()
    print(f"N={n}: copy {repo}, DVC cache link type {link_type_of(repo, env)}", flush=True)
    rows = []
    for stage in stages:
        log = logs / f"{stage.replace('@', '_')}.log"
        rc, seconds, rss = timed(["dvc", "repro", "-s", stage], repo, env, log)
        row = {"n": n, "stage": stage, "rc": rc, "seconds": seconds, "rate": n / seconds, "rss_gb": rss / GB,
               "out_mb": output_bytes(repo, stage) / MB if rc == 0 else None}
        rows.append(row)
        print(format_row(row), flush=True)
        if rc != 0:
            print(f"  {stage} failed (rc {rc}): {error_line(log.read_text(errors='replace'))}\n"
                  f"  log: {log}; the later stages of N={n} are skipped", flush=True)
            break
    data, cache = repo / "data", repo / ".dvc" / "cache"
    print(f"N={n}: disk used: data/ {disk_used(data) / MB:.1f} MB, "
          f".dvc/cache {disk_used(cache) / MB:.1f} MB, "
          f"both {disk_used(data, cache) / MB:.1f} MB (hard links once)", flush=True)
    return rows


HEADER = f"{'N':>7}  {'stage':<32}{'seconds':>9}{'img/s':>9}{'peak RSS GB':>13}{'output MB':>11}"


def format_row(row: dict) -> str:
    out = "-" if row["out_mb"] is None else f"{row['out_mb']:.1f}"
    failed = "" if row["rc"] == 0 else f"  FAILED rc {row['rc']}"
    return (f"{row['n']:>7}  {row['stage']:<32}{row['seconds']:>9.1f}{row['rate']:>9.1f}"
            f"{row['rss_gb']:>13.2f}{out:>11}{failed}")


def markdown(rows: list[dict]) -> str:
    lines = ["| N | stage | seconds | img/s | peak RSS GB | output MB |", "|---|---|---|---|---|---|"]
    for r in rows:
        out = f"failed (rc {r['rc']})" if r["out_mb"] is None else f"{r['out_mb']:.1f}"
        lines.append(f"| {r['n']} | `{r['stage']}` | {r['seconds']:.1f} | {r['rate']:.1f} | "
                     f"{r['rss_gb']:.2f} | {out} |")
    return "\n".join(lines)


def machine() -> str:
    info = Path("/proc/meminfo").read_text() if Path("/proc/meminfo").is_file() else ""
    total = re.search(r"MemTotal:\s+(\d+) kB", info)
    memory = f"{int(total.group(1)) * 1024 / GB:.1f} GB" if total else "unknown"
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    model = re.search(r"model name\s*:\s*(.+)", cpuinfo)
    name = " ".join(filter(None, [platform.processor(), model.group(1).strip() if model else ""]))
    usable = len(os.sched_getaffinity(0))
    return f"machine: {name or 'unknown'}, {os.cpu_count()} CPUs ({usable} usable), {memory} memory"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", nargs="+", type=int, default=[2000, 10000], help="image counts, a run each")
    parser.add_argument("--source-size", type=int, default=512, help="side of the generated JPEGs (px)")
    parser.add_argument("--image-size", type=int, default=224, help="the dataset entry's image_size (px)")
    parser.add_argument("--stages", nargs="+", choices=list(STAGES), default=list(STAGES),
                        help="stages to run, in DAG order whatever the order given (default: all)")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "medpipe-scale",
                        help="outside the checkout; the zips are cached under WORKDIR/datasets")
    parser.add_argument("--link-type", metavar="TYPES",
                        help="set the copy's `dvc config cache.type`, e.g. reflink,hardlink,symlink,copy")
    parser.add_argument("--bound", type=int, default=2000, metavar="K",
                        help="time JPEG decode + resize alone on the first K images (0: skip)")
    parser.add_argument("--keep", action="store_true", help="keep the repository copies")
    parser.add_argument("--clean", action="store_true", help="also delete the generated zips at the end")
    args = parser.parse_args(argv)
    workdir = args.workdir.resolve()
    if workdir == ROOT or ROOT in workdir.parents:
        parser.error(f"--workdir {workdir} is inside the checkout {ROOT}")
    datasets = workdir / "datasets"
    datasets.mkdir(parents=True, exist_ok=True)
    print(HEADER, flush=True)
    rows = []
    try:
        for n in args.n:
            archive = datasets / f"{dataset_name(n, args.source_size)}.zip"
            seconds = generate_zip(archive, n, args.source_size)
            made = f"generated in {seconds:.1f} s ({n / seconds:.0f} img/s)" if seconds else "cached"
            print(f"N={n}: {archive} {archive.stat().st_size / MB:.1f} MB, {made}", flush=True)
            if args.bound:
                rate = decode_bound(archive, args.image_size, min(n, args.bound))
                print(f"N={n}: bound: JPEG decode + resize to {args.image_size} px alone, 2 processes: "
                      f"{rate:.0f} img/s (first {min(n, args.bound)} images)", flush=True)
            base = workdir / f"n{n}-s{args.source_size}-i{args.image_size}"
            try:
                rows += run_n(n, args, archive, base)
            finally:
                if not args.keep:
                    shutil.rmtree(base / "repo", ignore_errors=True)
    finally:
        print("\n" + markdown(rows))
        print(machine())
        if args.clean:
            shutil.rmtree(datasets, ignore_errors=True)


if __name__ == "__main__":
    main()
