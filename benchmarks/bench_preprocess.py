"""Preprocessing throughput (decode + crop + resize + hashes) in images per second, 1 and 2 workers.

    python benchmarks/bench_preprocess.py [--datasets busi brain-tumor-4class] [--workers 1 2]

Reads the dataset files from the offline mirror (or $MEDPIPE_DATA_MIRROR) and prints one line per
dataset and worker count. Figures depend on the machine and on what else runs on it.
"""

from __future__ import annotations

import argparse
import time

from medpipe.paths import mirror_dir
from medpipe.data.preprocess import read_dataset
from medpipe.data.registry import get_spec, load_registry


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=["busi", "brain-tumor-4class"])
    parser.add_argument("--workers", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--size", type=int, default=None, help="image size (default: the dataset's own)")
    args = parser.parse_args()
    registry = load_registry()
    print(f"{'dataset':<22}{'workers':>8}{'images':>8}{'seconds':>9}{'img/s':>9}")
    for name in args.datasets:
        spec = get_spec(name)
        for workers in args.workers:
            start = time.perf_counter()
            result = read_dataset(spec, mirror_dir(), args.size or spec.image_size, None, workers, registry)
            seconds = time.perf_counter() - start
            n = len(result.imageset)
            print(f"{name:<22}{workers:>8}{n:>8}{seconds:>9.1f}{n / seconds:>9.0f}", flush=True)


if __name__ == "__main__":
    main()
