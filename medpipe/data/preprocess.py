"""Crop/normalize: read a dataset's raw files into one ImageSet at a common size.

Readers turn an archive into *items* (an image member, its mask members, label, group, source
split); ``process_item`` decodes, crops and resizes one item. Items of zip archives are processed in
worker processes, each opening the archive once (a ZipFile opened before forking breaks in workers).
"""

from __future__ import annotations

import csv
import io
import logging
import multiprocessing
import re
import zipfile
from collections.abc import Iterable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
from tqdm import tqdm

from medpipe import config
from medpipe.errors import UserError
from medpipe.data import imaging
from medpipe.data.imageset import ImageSet, ImageSetWriter, chunk_rows, concatenate
from medpipe.data.registry import DatasetSpec, get_spec, load_registry
from medpipe.io import write_json

log = logging.getLogger(__name__)


class ArchiveError(UserError, ValueError):
    """The archive is unsafe or not laid out as the registry says."""


@dataclass(frozen=True)
class Item:
    member: str
    label: int
    mask_members: tuple[str, ...] = ()
    group: str = ""
    source_split: str = ""


@dataclass
class Processed:
    image: np.ndarray
    mask: np.ndarray | None
    content_hash: str
    phash: np.uint64


@dataclass
class Skip:
    member: str
    reason: str


@dataclass
class PreprocessResult:
    imageset: ImageSet
    skipped: list[Skip] = field(default_factory=list)


def check_member_name(name: str, archive: Path) -> None:
    path = PurePosixPath(name)
    if name.startswith("/") or ".." in path.parts or re.match(r"^[A-Za-z]:", name) or "\\" in name:
        raise ArchiveError(f"{archive}: member {name!r} has an unsafe path (absolute or '..'): refusing the archive")


def is_hidden(name: str) -> bool:
    return any(part.startswith(".") or part == "__MACOSX" for part in PurePosixPath(name).parts)


def _mask_pattern(suffix: str) -> re.Pattern[str]:
    return re.compile(rf"^(?P<stem>.+){re.escape(suffix)}(?:_\d+)?$")


def class_folder_items(spec: DatasetSpec, archive: Path) -> tuple[list[Item], list[Skip]]:
    """Items of a zip of class folders, with masks, metadata groups and source splits attached."""
    with zipfile.ZipFile(archive) as zf:
        names = [info.filename for info in zf.infolist() if not info.is_dir()]
        for name in names:
            check_member_name(name, archive)
        groups: dict[str, str] = {}
        if spec.metadata is not None:
            if spec.metadata.path not in names:
                raise ArchiveError(f"{archive}: metadata file {spec.metadata.path!r} named in datasets.yaml is missing")
            rows = csv.DictReader(io.TextIOWrapper(zf.open(spec.metadata.path), encoding="utf-8"))
            for row in rows:
                groups[row[spec.metadata.id_column]] = (row.get(spec.metadata.group_column) or "").strip()
    folder_to_label = {str(folder): index for index, folder in enumerate(spec.classes.values())}
    mask_re = _mask_pattern(spec.mask_suffix) if spec.mask_suffix else None
    skipped: list[Skip] = []
    images: dict[tuple[str, str], list[str]] = {}  # (folder, stem) -> members (Y1.jpg and Y1.JPG may coexist)
    masks: dict[tuple[str, str], list[str]] = {}
    for name in sorted(names):
        if spec.metadata is not None and name == spec.metadata.path:
            continue
        if is_hidden(name):
            skipped.append(Skip(name, "hidden file"))
            continue
        path = PurePosixPath(name)
        match = mask_re.match(path.stem) if mask_re else None
        if match:
            masks.setdefault((str(path.parent), match["stem"]), []).append(name)
        else:
            images.setdefault((str(path.parent), path.stem), []).append(name)
    items = []
    for (folder, stem), members in images.items():
        if len(members) > 1 and spec.has_masks:
            skipped.extend(Skip(m, f"several images share the stem {stem!r}: their masks are ambiguous") for m in members)
            continue
        member = members[0]
        parts = PurePosixPath(folder).parts
        labels = [folder_to_label[p] for p in parts if p in folder_to_label]
        if len(labels) != 1:
            skipped.append(Skip(member, "not inside exactly one class folder named in datasets.yaml"))
            continue
        split = next((spec.split_folders[p] for p in parts if p in spec.split_folders), "")
        mask_members = tuple(sorted(masks.pop((folder, stem), [])))
        items.extend(
            Item(member=m, label=labels[0], mask_members=mask_members, group=groups.get(stem, ""), source_split=split)
            for m in members
        )
    for orphans in masks.values():
        skipped.extend(Skip(m, "mask without an image") for m in orphans)
    return items, skipped


def process_image(
    image: np.ndarray, masks: list[np.ndarray], crop: str, size: int, content_hash: str | None = None
) -> Processed:
    """Crop (by the image alone), resize, merge several masks with OR, and hash one decoded image."""
    content_hash = content_hash or imaging.pixel_hash(image)
    top, bottom, left, right = imaging.crop_box(image, crop)
    resized = imaging.resize_image(image[top:bottom, left:right], size)
    merged = None
    if masks is not None:
        merged = np.zeros(image.shape[:2], dtype=bool)
        for mask in masks:
            if mask.shape != merged.shape:
                raise imaging.ImageDecodeError(f"mask of shape {mask.shape} does not match image {merged.shape}")
            merged |= mask
        merged = imaging.resize_mask(merged[top:bottom, left:right], size)
    return Processed(resized, merged, content_hash, imaging.perceptual_hash(resized))


# -- worker-process plumbing for zip archives ---------------------------------------------------------
_zip: zipfile.ZipFile | None = None
_job: tuple[str, int, bool, int | None] | None = None


def _init_worker(archive: str, crop: str, size: int, with_masks: bool, max_pixels: int | None,
                 own_process: bool = False) -> None:
    """Open the archive and keep the job's settings; in a pool's own process, also tune the process."""
    global _zip, _job
    if own_process:
        import cv2

        cv2.setNumThreads(1)  # one OpenCV thread per worker process: the processes share the cores
        if max_pixels is not None:
            imaging.set_pil_pixel_limit(max_pixels)  # PIL's own bomb guard, for this process's lifetime
    _zip = zipfile.ZipFile(archive)
    _job = (crop, size, with_masks, max_pixels)


def _process_item(item: Item) -> Processed | Skip:
    assert _zip is not None and _job is not None
    crop, size, with_masks, max_pixels = _job
    try:
        image = imaging.decode_image(_zip.read(item.member), max_pixels)
        masks = None
        if with_masks:
            masks = [imaging.decode_mask(_zip.read(m), max_pixels) for m in item.mask_members]
        return process_image(image, masks, crop, size)
    except imaging.ImageDecodeError as err:
        return Skip(item.member, str(err))
    except zipfile.BadZipFile as err:
        return Skip(item.member, f"unreadable archive member: {err}")


def _map_items(items: list[Item], archive: Path, crop: str, size: int, with_masks: bool, workers: int,
               desc: str, max_pixels: int | None = None) -> Iterator[Processed | Skip]:
    args = (str(archive), crop, size, with_masks, max_pixels)
    if workers <= 1:  # in this process: PIL's global limit is set for the loop only, then restored
        pil_limit = nullcontext() if max_pixels is None else imaging.pil_pixel_limit(max_pixels)
        with pil_limit:
            _init_worker(*args)
            yield from tqdm(map(_process_item, items), total=len(items), desc=desc, unit="img", disable=None)
        return
    # spawn, not fork: forking a process that already runs threads (OpenCV and tqdm start some) can copy a
    # held lock into the child; a forked pool hung that way once here after an in-process read
    context = multiprocessing.get_context("spawn")
    with context.Pool(workers, initializer=_init_worker, initargs=(*args, True)) as pool:
        chunk = max(1, min(32, len(items) // (workers * 8) or 1))
        yield from tqdm(pool.imap(_process_item, items, chunksize=chunk), total=len(items), desc=desc, unit="img", disable=None)


def empty_imageset(class_names: tuple[str, ...], size: int, with_masks: bool) -> ImageSet:
    return ImageSet(
        images=np.zeros((0, size, size, 3), np.uint8), labels=np.zeros(0, np.int64), class_names=class_names,
        source_ids=np.zeros(0, str), groups=np.zeros(0, str), content_hashes=np.zeros(0, str),
        phashes=np.zeros(0, np.uint64), source_splits=np.zeros(0, str),
        masks=np.zeros((0, size, size), np.uint8) if with_masks else None,
    )


def _imageset(kept: list[tuple[Item, Processed]], class_names: tuple[str, ...], with_masks: bool,
              source: str) -> ImageSet:
    return ImageSet(
        images=np.stack([p.image for _, p in kept]),
        labels=np.array([i.label for i, _ in kept], dtype=np.int64),
        class_names=class_names,
        source_ids=np.array([f"{source}:{i.member}" for i, _ in kept], dtype=str),
        groups=np.array([i.group for i, _ in kept], dtype=str),
        content_hashes=np.array([p.content_hash for _, p in kept], dtype=str),
        phashes=np.array([p.phash for _, p in kept], dtype=np.uint64),
        source_splits=np.array([i.source_split for i, _ in kept], dtype=str),
        masks=np.stack([p.mask for _, p in kept]).astype(np.uint8) if with_masks else None,
    )


def _collect(spec: DatasetSpec, results: Iterable[tuple[Item, Processed | Skip]], size: int, source: str,
             skipped: list[Skip]) -> Iterator[ImageSet]:
    """The decoded images in chunks of about ``CHUNK_BYTES`` of pixels; skipped files go to ``skipped``."""
    step = chunk_rows(size * size * 3)
    kept: list[tuple[Item, Processed]] = []
    for item, result in results:
        if isinstance(result, Skip):
            skipped.append(Skip(f"{source}:{result.member}", result.reason))
            continue
        kept.append((item, result))
        if len(kept) == step:
            yield _imageset(kept, tuple(spec.class_names), spec.has_masks, source)
            kept = []
    if kept:
        yield _imageset(kept, tuple(spec.class_names), spec.has_masks, source)


def stream_class_folders(spec: DatasetSpec, archive: Path, crop: str, size: int, workers: int,
                         max_pixels: int | None, skipped: list[Skip]) -> Iterator[ImageSet]:
    """Decode a zip of class folders; an image of more than ``max_pixels`` pixels is skipped as too_large."""
    items, unread = class_folder_items(spec, archive)
    if not items:
        raise ArchiveError(f"{archive}: no images found in the class folders {list(spec.classes.values())}")
    skipped.extend(Skip(f"{archive.name}:{s.member}", s.reason) for s in unread)
    results = _map_items(items, archive, crop, size, spec.has_masks, workers, desc=f"preprocess {spec.name}",
                         max_pixels=max_pixels)
    yield from _collect(spec, zip(items, results, strict=True), size, archive.name, skipped)


def npz_rows(archive: Path, key: str) -> Iterator[np.ndarray]:
    """The rows of array ``key`` of an ``.npz`` file, a chunk at a time (decompressed as they are read)."""
    with zipfile.ZipFile(archive) as zf:
        if f"{key}.npy" not in zf.namelist():
            raise ArchiveError(f"{archive}: missing array {key!r} (expected the MedMNIST layout)")
        with zf.open(f"{key}.npy") as member:
            version = np.lib.format.read_magic(member)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            shape, fortran, dtype = read_header(member)
            if fortran or dtype.hasobject:
                raise ArchiveError(f"{archive}: array {key!r} is not a C-ordered numeric array")
            row_shape = shape[1:]
            row_bytes = int(np.prod(row_shape, dtype=np.int64)) * dtype.itemsize
            step = chunk_rows(row_bytes)
            for start in range(0, shape[0], step):
                n = min(step, shape[0] - start)
                buffer = member.read(n * row_bytes)
                if len(buffer) != n * row_bytes:
                    raise ArchiveError(f"{archive}: array {key!r} is truncated")
                yield np.frombuffer(buffer, dtype=dtype).reshape((n, *row_shape))


def _medmnist_results(spec: DatasetSpec, archive: Path, crop: str,
                      size: int) -> Iterator[tuple[Item, Processed | Skip]]:
    """Each image of the MedMNIST file's train, val and test arrays with its result, a chunk read at a time."""
    index_to_label = {int(v): i for i, v in enumerate(spec.classes.values())}
    for split in ("train", "val", "test"):
        labels = np.concatenate(list(npz_rows(archive, f"{split}_labels")))
        if labels.ndim > 1 and labels.shape[1] != 1:
            raise ArchiveError(f"{archive}: {split}_labels has {labels.shape[1]} labels per image (a multi-label "
                               "task such as ChestMNIST): every classifier here predicts one class per image")
        labels = labels.reshape(-1)
        position = 0
        for chunk in npz_rows(archive, f"{split}_images"):
            if chunk.ndim == 3:
                chunk = np.repeat(chunk[..., None], 3, axis=3)
            for image in chunk:
                member, label = f"{split}/{position:06d}", int(labels[position])
                position += 1
                if label not in index_to_label:
                    yield Item(member, -1), Skip(member, f"label {label} is not in datasets.yaml classes")
                    continue
                image = np.ascontiguousarray(image, dtype=np.uint8)
                yield Item(member, index_to_label[label], source_split=split), process_image(image, None, crop, size)


def stream_medmnist_npz(spec: DatasetSpec, archive: Path, crop: str, size: int,
                        skipped: list[Skip]) -> Iterator[ImageSet]:
    results = tqdm(_medmnist_results(spec, archive, crop, size), desc=f"preprocess {spec.name}", unit="img",
                   disable=None)
    yield from _collect(spec, results, size, archive.name, skipped)


def stream_dataset(spec: DatasetSpec, raw_dir: Path, size: int, crop: str | None = None, workers: int = 2,
                   registry: dict[str, DatasetSpec] | None = None, max_pixels: int | None = None,
                   skipped: list[Skip] | None = None) -> Iterator[ImageSet]:
    """The dataset ``spec`` from its files in ``raw_dir`` at ``size`` px, in chunks; unreadable files go to
    ``skipped`` with their reasons.

    ``max_pixels`` (``preprocess.max_pixels``) refuses larger images from their header; ``None`` keeps
    PIL's own limit (``PIL.Image.MAX_IMAGE_PIXELS``).
    """
    skipped = [] if skipped is None else skipped
    crop = spec.crop if crop in (None, "auto") else crop
    if spec.reader == "compose":
        registry = registry or load_registry()
        class_names = tuple(spec.class_names)
        for component in spec.compose:
            for part in stream_dataset(registry[component.dataset], raw_dir, size, None, workers, registry,
                                       max_pixels, skipped):
                keep = np.isin(np.array(part.class_names)[part.labels], list(component.classes))
                part = part.subset(np.flatnonzero(keep))
                new_labels = [class_names.index(component.classes[part.class_names[label]]) for label in part.labels]
                yield ImageSet(
                    images=part.images, labels=np.array(new_labels, dtype=np.int64), class_names=class_names,
                    source_ids=part.source_ids, groups=part.groups, content_hashes=part.content_hashes,
                    phashes=part.phashes, source_splits=np.full(len(part), "", dtype=str), masks=None,
                )
        return
    archive = raw_dir / spec.files[0].name
    if not archive.is_file():
        raise FileNotFoundError(f"{archive} does not exist: run the download stage first")
    if spec.reader == "class_folders":
        yield from stream_class_folders(spec, archive, crop, size, workers, max_pixels, skipped)
    else:
        yield from stream_medmnist_npz(spec, archive, crop, size, skipped)


def stored_with_masks(spec: DatasetSpec) -> bool:
    """Whether the image set of ``spec`` carries masks (a composed dataset never does)."""
    return spec.reader != "compose" and spec.has_masks


def read_dataset(spec: DatasetSpec, raw_dir: Path, size: int, crop: str | None = None, workers: int = 2,
                 registry: dict[str, DatasetSpec] | None = None,
                 max_pixels: int | None = None) -> PreprocessResult:
    """The whole dataset in memory (``stream_dataset`` gathered): for datasets that fit in it."""
    skipped: list[Skip] = []
    chunks = list(stream_dataset(spec, raw_dir, size, crop, workers, registry, max_pixels, skipped))
    data = concatenate(chunks) if chunks else empty_imageset(tuple(spec.class_names), size, stored_with_masks(spec))
    return PreprocessResult(data, skipped)


@dataclass(frozen=True)
class PreprocessPaths:
    raw: Path      # data/raw: the dataset's files as downloaded
    out: Path      # data/interim/images: the image-set folder
    report: Path   # data/interim/preprocess_report.json: skipped files with reasons (no timings)


def run(params: dict, paths: PreprocessPaths) -> ImageSet:
    """Stage ``preprocess`` (crop/normalize): decode, crop and resize every image into one array file."""
    spec = get_spec(config.dataset_name(params))
    cfg = config.load_section(params, "preprocess", config.PreprocessConfig)
    size = config.image_size(params, spec.image_size)
    skipped: list[Skip] = []
    images = 0
    with ImageSetWriter(paths.out, size, tuple(spec.class_names), stored_with_masks(spec)) as writer:
        for chunk in stream_dataset(spec, paths.raw, size, cfg.crop, cfg.workers, load_registry(), cfg.max_pixels,
                                    skipped):
            writer.append(chunk)
            images += len(chunk)
        if images == 0:
            raise ArchiveError(f"no image of dataset {spec.name!r} in {paths.raw} could be read")
    write_json(paths.report, {
        "dataset": spec.name,
        "image_size": size,
        "images": images,
        "skipped": [{"file": s.member, "reason": s.reason} for s in skipped],
    })  # no timings here: the report is a dependency of `split`, and must not change when the data do not
    log.info("%d images at %d px, %d files skipped", images, size, len(skipped))
    return ImageSet.load(paths.out)
