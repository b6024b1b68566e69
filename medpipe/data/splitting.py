"""Leakage-free splitting: duplicate grouping and a stratified, grouped train/val/test split."""

from __future__ import annotations

import logging
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medpipe import config
from medpipe.data.imageset import ImageSet, chunk_rows
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


def near_duplicate_pairs(phashes: np.ndarray, max_distance: int, block_bytes: int = 2**26) -> np.ndarray:
    """Index pairs (i < j) whose 64-bit perceptual hashes differ in at most ``max_distance`` bits.

    Every pair is compared (N^2 / 2 XORs and popcounts), a block of rows at a time that holds ``block_bytes`` of
    XORs, so memory stays flat in N (see docs/benchmarks.md for the time at 100,000 images)."""
    phashes = np.asarray(phashes, dtype=np.uint64)
    if max_distance < 0 or len(phashes) < 2:
        return np.zeros((0, 2), dtype=np.int64)
    pairs = []
    chunk = max(1, block_bytes // (8 * len(phashes)))
    for start in range(0, len(phashes), chunk):
        block = phashes[start:start + chunk]
        distance = np.bitwise_count(block[:, None] ^ phashes[start:][None, :])
        rows, cols = np.nonzero(distance <= max_distance)
        rows, cols = rows + start, cols + start
        keep = cols > rows
        pairs.append(np.stack([rows[keep], cols[keep]], axis=1))
    return np.concatenate(pairs).astype(np.int64)


def group_members(group_of: np.ndarray) -> list[np.ndarray]:
    """The image positions (ascending) of each group, in the order of the group ids: one sort, not one scan of
    all N images per group."""
    order = np.argsort(group_of, kind="stable")
    return np.split(order, np.flatnonzero(np.diff(group_of[order])) + 1) if len(order) else []


def majority_labels(group_of: np.ndarray, labels: np.ndarray,
                    num_classes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(group ids, each group's most frequent label, whether the group's labels disagree). A tie goes to the
    label met first among the group's images, as ``Counter.most_common`` gives it."""
    groups, inverse = np.unique(group_of, return_inverse=True)
    counts = np.zeros((len(groups), num_classes), dtype=np.int64)
    np.add.at(counts, (inverse, labels), 1)
    first = np.full((len(groups), num_classes), len(labels), dtype=np.int64)
    np.minimum.at(first, (inverse, labels), np.arange(len(labels)))
    tied = counts == counts.max(axis=1, keepdims=True)
    majority = np.where(tied, first, len(labels)).argmin(axis=1)
    return groups, majority, (counts > 0).sum(axis=1) > 1


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
    _, _, conflicted = majority_labels(group_of, data.labels, data.num_classes)
    members = group_members(group_of)
    conflicting = [sorted(str(s) for s in data.source_ids[members[g]]) for g in np.flatnonzero(conflicted)]
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
                  conflicting_labels: str = "drop", use_source_split: bool | str = False) -> SplitResult:
    """Stratified grouped split: a duplicate group or metadata group never straddles two splits.

    ``use_source_split``: True follows the source's own split, a group with a test image going to test;
    ``"exact"`` keeps every image in its source split (:func:`exact_source_split`).
    """
    grouping = group_images(data, max_distance)
    if use_source_split == "exact" and (data.source_splits != "").any():
        return exact_source_split(data, grouping, fractions, seed)
    group_of = grouping.group_of   # groups are numbered 0..G-1
    groups, group_labels, disagree = majority_labels(group_of, data.labels, data.num_classes)
    sizes = np.bincount(group_of)[groups]
    rng = np.random.default_rng(seed)
    conflicted = set(groups[disagree].tolist())
    if use_source_split and (data.source_splits != "").any():
        def has(split: str) -> np.ndarray:   # per group: whether any of its images is in the source's ``split``
            return np.bincount(group_of, weights=data.source_splits == split, minlength=len(groups)) > 0
        group_split = np.where(has("test"), 2, np.where(has("val"), 1, 0)).astype(np.int64)
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


def exact_source_split(data: ImageSet, grouping: Grouping, fractions: tuple[float, float, float],
                       seed: int) -> SplitResult:
    """Every image in its source split, nothing moved or dropped: a benchmark's test set as published.

    Duplicates across the splits stay where the source put them; the split report lists them
    (:func:`cross_split_duplicates`). A source without a validation split gives one carved out of its training
    images (stratified, whole duplicate groups); images the source left unassigned go to train.
    """
    split_of = np.select([data.source_splits == "test", data.source_splits == "val"], [2, 1], 0).astype(np.int64)
    if not (split_of == 1).any():
        in_train = np.flatnonzero(split_of == 0)
        group_of = np.unique(grouping.group_of[in_train], return_inverse=True)[1]
        groups, group_labels, _ = majority_labels(group_of, data.labels[in_train], data.num_classes)
        val_share = fractions[1] / (fractions[0] + fractions[1])
        sub = assign_groups(groups, group_labels, np.bincount(group_of)[groups], (1 - val_share, val_share),
                            np.random.default_rng(seed))
        split_of[in_train[sub[group_of] == 1]] = 1
    return SplitResult(split_of, grouping, 0)


def cross_split_duplicates(result: SplitResult, source_ids: np.ndarray, limit: int = 50) -> dict:
    """The duplicate groups (pixel-identical, near-duplicate or one metadata group) whose images sit in more than one
    split: how many test images have a copy in train or val, and the first ``limit`` groups' source ids by split."""
    split_of, group_of = result.split_of, result.grouping.group_of
    kept = split_of >= 0
    splits_per_group = np.zeros((group_of.max() + 1, len(SPLITS)), dtype=bool)
    splits_per_group[group_of[kept], split_of[kept]] = True
    straddling = np.flatnonzero(splits_per_group.sum(axis=1) > 1)
    leaked_test = int(np.isin(group_of, straddling)[split_of == 2].sum())
    members = group_members(group_of)
    listed = [{SPLITS[s]: sorted(str(i) for i in source_ids[members[g]][split_of[members[g]] == s])
               for s in range(len(SPLITS)) if splits_per_group[g, s]} for g in straddling[:limit]]
    return {"groups": len(straddling), "test_images_with_a_copy_elsewhere": leaked_test, "first_groups": listed}


def channel_histograms(images) -> np.ndarray:
    """(channels, 256) counts of each uint8 value per channel, reading the images a chunk at a time."""
    channels = images.shape[-1]
    counts = np.zeros((channels, 256), dtype=np.int64)
    step = chunk_rows(int(np.prod(images.shape[1:])))
    for start in range(0, len(images), step):
        chunk = np.asarray(images[start:start + step]).reshape(-1, channels)
        for c in range(channels):
            counts[c] += np.bincount(chunk[:, c], minlength=256)
    return counts


def normalization_stats(images, mode: str) -> dict:
    """Per-channel mean and std of uint8 NHWC images on the 0-1 scale ('unit': mean 0, std 1).

    One streaming pass: per-channel histograms of the uint8 values give the exact sums, so memory does not
    grow with the number of images and the figures do not depend on the order of summation.
    """
    if mode == "unit":
        return {"mode": "unit", "mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0]}
    counts = channel_histograms(images)
    values = np.arange(256, dtype=np.int64)
    mean, std = [], []
    for hist in counts:
        n, total, squares = int(hist.sum()), int(hist @ values), int(hist @ values**2)
        mean.append(total / n / 255.0)
        std.append(max(math.sqrt((n * squares - total * total) / (n * n)) / 255.0, 1e-6))
    return {"mode": "mean_std", "mean": [round(m, 6) for m in mean], "std": [round(s, 6) for s in std]}


@dataclass(frozen=True)
class SplitPaths:
    images: Path     # data/interim/images
    report: Path     # data/interim/preprocess_report.json (skipped files)
    out: Path        # data/processed: the {train,val,test} image sets and normalization.json
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
        part.save(paths.out / name)
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
        "duplicates_across_splits": cross_split_duplicates(result, data.source_ids),
        "moved_from_source_split": moved_from_source_split(result.split_of, data.source_splits),
        "skipped": {"total": len(skipped), "by_reason": dict(Counter(s["reason"] for s in skipped))},
    }


def moved_from_source_split(split_of: np.ndarray, source_splits: np.ndarray) -> dict[str, int]:
    """{"<source split> -> <split>": images} for the images of a source with its own split that ended elsewhere
    (dropped: ``-> dropped``); empty when nothing moved or the source has no split."""
    moves: Counter = Counter()
    for source, split in zip(source_splits, split_of, strict=True):
        if source and (split < 0 or source != SPLITS[split]):
            moves[f"{source} -> {SPLITS[split] if split >= 0 else 'dropped'}"] += 1
    return dict(sorted(moves.items()))
