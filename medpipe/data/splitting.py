"""Leakage-free splitting: duplicate grouping and a stratified, grouped train/val/test split."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medpipe import config
from medpipe.data.imageset import ImageSet
from medpipe.io import read_json, write_json

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


class UnionFind:
    def __init__(self, n: int) -> None:
        self.parent = np.arange(n)

    def find(self, i: int) -> int:
        root = i
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[i] != root:
            self.parent[i], i = root, self.parent[i]
        return int(root)

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)

    def labels(self) -> np.ndarray:
        """Group index per element, numbered 0.. in order of first appearance."""
        roots = np.array([self.find(i) for i in range(len(self.parent))])
        _, first, inverse = np.unique(roots, return_index=True, return_inverse=True)
        order = np.argsort(np.argsort(first))
        return order[inverse]


def near_duplicate_pairs(phashes: np.ndarray, max_distance: int, chunk: int = 1024) -> np.ndarray:
    """Index pairs (i < j) whose 64-bit perceptual hashes differ in at most ``max_distance`` bits."""
    phashes = np.asarray(phashes, dtype=np.uint64)
    if max_distance < 0 or len(phashes) < 2:
        return np.zeros((0, 2), dtype=np.int64)
    pairs = []
    for start in range(0, len(phashes), chunk):
        block = phashes[start:start + chunk]
        distance = np.bitwise_count(block[:, None] ^ phashes[None, :])
        rows, cols = np.nonzero(distance <= max_distance)
        rows = rows + start
        keep = cols > rows
        pairs.append(np.stack([rows[keep], cols[keep]], axis=1))
    return np.concatenate(pairs).astype(np.int64)


@dataclass
class Grouping:
    group_of: np.ndarray  # group index per image
    exact_duplicate_copies: int  # images beyond the first of each pixel-identical set
    near_duplicate_pairs: int
    conflicting_groups: list[list[str]] = field(default_factory=list)  # source ids per conflicting group


def group_images(data: ImageSet, max_distance: int) -> Grouping:
    """Group pixel-identical images, near-duplicates and images sharing a metadata group id."""
    uf = UnionFind(len(data))
    first_of: dict[str, int] = {}
    exact = 0
    for i, digest in enumerate(data.content_hashes):
        if digest in first_of:
            uf.union(first_of[digest], i)
            exact += 1
        else:
            first_of[digest] = i
    near = near_duplicate_pairs(data.phashes, max_distance)
    for a, b in near:
        uf.union(int(a), int(b))
    first_group: dict[str, int] = {}
    for i, group in enumerate(data.groups):
        if group:
            if group in first_group:
                uf.union(first_group[group], i)
            else:
                first_group[group] = i
    group_of = uf.labels()
    conflicting = []
    for g in np.unique(group_of):
        members = np.flatnonzero(group_of == g)
        if len(set(data.labels[members].tolist())) > 1:
            conflicting.append(sorted(str(s) for s in data.source_ids[members]))
    return Grouping(group_of, exact, len(near), conflicting)


def assign_groups(group_ids: np.ndarray, group_labels: np.ndarray, group_sizes: np.ndarray,
                   fractions: tuple[float, ...], rng: np.random.Generator) -> np.ndarray:
    """Split index (0..len(fractions)-1) per group, stratified by the group's label: within each class
    the shuffled groups fill the splits in order, by the position of each group's midpoint."""
    assignment = np.zeros(len(group_ids), dtype=np.int64)
    bounds = np.cumsum(fractions)[:-1]
    for label in np.unique(group_labels):
        members = np.flatnonzero(group_labels == label)
        members = members[rng.permutation(len(members))]
        sizes = group_sizes[members]
        midpoints = (np.cumsum(sizes) - sizes / 2) / sizes.sum()
        assignment[members] = np.searchsorted(bounds, midpoints, side="right")
    return assignment


@dataclass
class SplitResult:
    split_of: np.ndarray  # per image: 0 train, 1 val, 2 test, -1 dropped
    grouping: Grouping
    dropped: int


def split_dataset(data: ImageSet, fractions: tuple[float, float, float], seed: int, max_distance: int,
                  conflicting_labels: str = "drop", use_source_split: bool = False) -> SplitResult:
    """Stratified grouped split: a duplicate group or metadata group never straddles two splits."""
    grouping = group_images(data, max_distance)
    group_of = grouping.group_of
    groups = np.unique(group_of)
    sizes = np.bincount(group_of)[groups]
    group_labels = np.array([Counter(data.labels[group_of == g].tolist()).most_common(1)[0][0] for g in groups])
    rng = np.random.default_rng(seed)
    conflicted = {g for g in groups if len(set(data.labels[group_of == g].tolist())) > 1}
    if use_source_split and (data.source_splits != "").any():
        group_split = np.zeros(len(groups), dtype=np.int64)
        for g in groups:
            sources = set(data.source_splits[group_of == g].tolist())
            group_split[g] = 2 if "test" in sources else 1 if "val" in sources else 0
        if not (group_split == 1).any():  # the source has no validation split: carve it out of train
            in_train = np.flatnonzero(group_split == 0)
            val_share = fractions[1] / (fractions[0] + fractions[1])
            sub = assign_groups(groups[in_train], group_labels[in_train], sizes[in_train],
                                 (1 - val_share, val_share), rng)
            group_split[in_train[sub == 1]] = 1
    else:
        group_split = assign_groups(groups, group_labels, sizes, fractions, rng)
    split_of = group_split[group_of]
    dropped = 0
    if conflicting_labels == "drop" and conflicted:
        drop = np.isin(group_of, list(conflicted))
        split_of[drop] = -1
        dropped = int(drop.sum())
    return SplitResult(split_of, grouping, dropped)


def normalization_stats(images: np.ndarray, mode: str) -> dict:
    """Per-channel mean and std of uint8 NHWC images on the 0-1 scale ('unit': mean 0, std 1)."""
    if mode == "unit":
        return {"mode": "unit", "mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0]}
    pixels = images.reshape(-1, images.shape[-1]).astype(np.float64) / 255.0
    mean = pixels.mean(axis=0)
    std = np.maximum(pixels.std(axis=0), 1e-6)
    return {"mode": "mean_std", "mean": [round(float(m), 6) for m in mean], "std": [round(float(s), 6) for s in std]}


@dataclass(frozen=True)
class SplitPaths:
    images: Path     # data/interim/images.npz
    report: Path     # data/interim/preprocess_report.json (skipped files)
    out: Path        # data/processed: {train,val,test}.npz and normalization.json
    details: Path    # everything about the split: classes, duplicates, conflicting groups, skipped files
    metrics: Path    # the headline: split sizes and images dropped


def run(params: dict, paths: SplitPaths) -> dict[str, ImageSet]:
    """Stage ``split``: duplicate-grouped, stratified train/val/test and training-split normalisation."""
    cfg = config.load_section(params, "split", config.SplitConfig)
    data = ImageSet.load(paths.images)
    result = split_dataset(data, (cfg.train, cfg.val, cfg.test), cfg.seed, cfg.near_duplicate_distance,
                           cfg.conflicting_labels, cfg.use_source_split)
    parts = {name: data.subset(np.flatnonzero(result.split_of == i)) for i, name in enumerate(SPLITS)}
    for name, part in parts.items():
        if len(part) == 0:
            raise config.ParamsError(
                f"the {name} split is empty: {len(data)} images are too few for split.train/val/test = "
                f"{cfg.train}/{cfg.val}/{cfg.test}"
            )
    paths.out.mkdir(parents=True, exist_ok=True)
    for name, part in parts.items():
        part.save(paths.out / f"{name}.npz")
    write_json(paths.out / "normalization.json", normalization_stats(parts["train"].images, cfg.normalization))
    skipped = read_json(paths.report)["skipped"]
    write_json(paths.details, split_details(config.dataset_name(params), data, parts, result, skipped))
    write_json(paths.metrics, {**{name: len(part) for name, part in parts.items()},
                               "dropped": result.dropped, "skipped": len(skipped)})
    grouping = result.grouping
    log.info("split %s; %d exact copies, %d near pairs, %d conflicting groups (%d images dropped)",
             {k: len(v) for k, v in parts.items()}, grouping.exact_duplicate_copies, grouping.near_duplicate_pairs,
             len(grouping.conflicting_groups), result.dropped)
    return parts


def split_details(dataset: str, data: ImageSet, parts: dict[str, ImageSet], result: SplitResult,
                  skipped: list[dict]) -> dict:
    """The split's full record: per split and class counts, duplicates, conflicting groups, skipped files."""
    grouping = result.grouping
    return {
        "dataset": dataset,
        "image_size": data.image_size,
        "images": len(data),
        "classes": list(data.class_names),
        "splits": {name: {"total": len(part), **part.class_counts()} for name, part in parts.items()},
        "duplicates": {
            "exact_copies": grouping.exact_duplicate_copies,
            "near_duplicate_pairs": grouping.near_duplicate_pairs,
            "groups": int(grouping.group_of.max()) + 1,
            "conflicting_label_groups": len(grouping.conflicting_groups),
            "dropped_images": result.dropped,
        },
        "conflicting_label_groups": grouping.conflicting_groups[:50],
        "skipped": {"total": len(skipped), "by_reason": dict(Counter(s["reason"] for s in skipped))},
    }
