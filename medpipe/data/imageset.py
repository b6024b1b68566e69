"""The image set every data stage reads and writes: a folder of uint8 arrays that readers memory-map.

On disk an image set is a folder (DVC tracks it as one output)::

    images.npy     (N, S, S, 3) uint8, NHWC
    masks.npy      (N, S, S) uint8 0/1, only where the dataset has masks
    metadata.npz   per image: labels, source ids, metadata groups, content and perceptual hashes, the
                   source's own split; and the class names

``ImageSet.load`` memory-maps ``images.npy`` and ``masks.npy``: a stage reads the rows it touches, when it
touches them. ``subset`` and ``concatenate`` of memory-mapped sets select rows without reading them
(:class:`Rows`), and :class:`ImageSetWriter` streams rows into a new folder chunk by chunk, so a data stage
holds one chunk of pixels at a time whatever the number of images. The ``.npy`` files are exactly what
``numpy.save`` writes for the whole array (same header, same bytes), written without ever holding it.
"""

from __future__ import annotations

import mmap
from collections.abc import Iterator
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import BinaryIO

import numpy as np

from medpipe.io import atomic_dir

IMAGES_FILE = "images.npy"
MASKS_FILE = "masks.npy"
METADATA_FILE = "metadata.npz"
CHUNK_BYTES = 32 * 2**20  # pixels a streaming stage holds at once (per array)


def release_pages(array: np.ndarray, first: int, last: int) -> None:
    """Unmap rows ``first..last`` of a memory-mapped array once they are read: their pages stay in the page
    cache, but leave the process's resident memory, which then holds what it copied out and nothing more."""
    if not (isinstance(array, np.memmap) and isinstance(array.base, mmap.mmap)) or last < first:
        return   # in memory, or a view of a mapping (whose start in the mapping is unknown here)
    data = array.offset % mmap.ALLOCATIONGRANULARITY   # where the rows start in the mapping (np.memmap's rule)
    start = data + first * array.strides[0]
    aligned = start - start % mmap.PAGESIZE
    array.base.madvise(mmap.MADV_DONTNEED, aligned, data + (last + 1) * array.strides[0] - aligned)


class Rows:
    """Rows ``index`` of one or several memory-mapped arrays stacked along the first axis, read on access.

    Indexing with an int, a slice or an index array reads just those rows (an ``np.ndarray``) and unmaps
    them again (:func:`release_pages`); ``np.asarray(rows)`` reads them all.
    """

    def __init__(self, parts: list[np.ndarray], index: np.ndarray | None = None) -> None:
        self.parts = parts
        self.starts = np.cumsum([0] + [len(p) for p in parts])
        self.index = np.arange(self.starts[-1], dtype=np.int64) if index is None else np.asarray(index, np.int64)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.index), *self.parts[0].shape[1:])

    @property
    def dtype(self) -> np.dtype:
        return self.parts[0].dtype

    @property
    def ndim(self) -> int:
        return self.parts[0].ndim

    def __len__(self) -> int:
        return len(self.index)

    def take(self, index: np.ndarray) -> Rows:
        """Rows ``index`` of these rows, still unread."""
        return Rows(self.parts, self.index[index])

    def __getitem__(self, key) -> np.ndarray:
        if isinstance(key, int | np.integer):
            return np.asarray(self[np.array([key])][0])
        wanted = self.index[key]
        out = np.empty((len(wanted), *self.shape[1:]), dtype=self.dtype)
        part_of = np.searchsorted(self.starts, wanted, side="right") - 1
        for p, part in enumerate(self.parts):
            at = np.flatnonzero(part_of == p)
            if len(at):
                rows = wanted[at] - self.starts[p]
                out[at] = part[rows]
                release_pages(part, int(rows.min()), int(rows.max()))
        return out

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = self[:]
        return out if dtype is None else out.astype(dtype, copy=False)


def as_rows(array):
    """A memory-mapped array as :class:`Rows` (reads that unmap what they read); anything else as it is."""
    return Rows([array]) if isinstance(array, np.memmap) else array


def _is_on_disk(array) -> bool:
    return isinstance(array, np.memmap | Rows)


def _select(array, index: np.ndarray):
    """Rows ``index`` of ``array``: unread when the array is on disk, an in-memory copy otherwise."""
    return as_rows(array).take(index) if _is_on_disk(array) else array[index]


def chunk_rows(row_bytes: int) -> int:
    """How many rows of ``row_bytes`` bytes a streaming stage reads or writes at once."""
    return max(1, CHUNK_BYTES // max(1, row_bytes))


@dataclass(frozen=True)
class ImageSet:
    images: np.ndarray  # (N, S, S, 3) uint8 (memory-mapped or Rows when loaded)
    labels: np.ndarray  # (N,) int64, index into class_names
    class_names: tuple[str, ...]
    source_ids: np.ndarray  # (N,) str: the file (or array index) each image came from
    groups: np.ndarray  # (N,) str: lesion/patient id from metadata, '' where unknown
    content_hashes: np.ndarray  # (N,) str: SHA-256 of the decoded source pixels
    phashes: np.ndarray  # (N,) uint64: perceptual hash of the processed image
    source_splits: np.ndarray  # (N,) str: the source's own split ('' where it has none)
    masks: np.ndarray | None = None  # (N, S, S) uint8 0/1 where the dataset has masks

    def __post_init__(self) -> None:
        n = len(self.images)
        if self.images.ndim != 4 or self.images.shape[3] != 3 or self.images.dtype != np.uint8:
            raise ValueError(f"images must be uint8 (N, H, W, 3), got {self.images.dtype} {self.images.shape}")
        for name in _per_image_fields():
            value = getattr(self, name)
            if value is not None and len(value) != n:
                raise ValueError(f"{name} has {len(value)} entries for {n} images")
        if n and (self.labels.min() < 0 or self.labels.max() >= len(self.class_names)):
            raise ValueError(f"labels outside 0..{len(self.class_names) - 1}")

    def __len__(self) -> int:
        return len(self.images)

    @property
    def image_size(self) -> int:
        return int(self.images.shape[1])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def class_counts(self) -> dict[str, int]:
        counts = np.bincount(self.labels, minlength=self.num_classes)
        return {name: int(c) for name, c in zip(self.class_names, counts, strict=True)}

    def subset(self, index: np.ndarray) -> ImageSet:
        """The images ``index``; the pixels of a set on disk stay there until read."""
        index = np.asarray(index)
        return replace(self, **{name: _select(getattr(self, name), index) for name in _per_image_fields()
                                if getattr(self, name) is not None})

    def chunks(self) -> Iterator[ImageSet]:
        """Consecutive in-memory pieces of this set, each of about ``CHUNK_BYTES`` of pixels."""
        step = chunk_rows(int(np.prod(self.images.shape[1:])))
        for start in range(0, len(self), step):
            yield self.subset(np.arange(start, min(start + step, len(self)))).in_memory()

    def in_memory(self) -> ImageSet:
        """This set with its pixels read into memory."""
        if not _is_on_disk(self.images) and not _is_on_disk(self.masks):
            return self
        return replace(self, images=np.asarray(self.images),
                       masks=None if self.masks is None else np.asarray(self.masks))

    def save(self, path: str | Path) -> None:
        """Write this set as an image-set folder, one chunk of pixels at a time, atomically."""
        with ImageSetWriter(path, self.image_size, self.class_names, self.masks is not None) as writer:
            for chunk in self.chunks():
                writer.append(chunk)

    @classmethod
    def load(cls, path: str | Path) -> ImageSet:
        """The set in folder ``path``, its pixels memory-mapped (read-only)."""
        path = Path(path)
        if not (path / METADATA_FILE).is_file():
            raise FileNotFoundError(f"image set {path} does not exist (no {METADATA_FILE} in it): "
                                    "run the stage that writes it (dvc repro)")
        with np.load(path / METADATA_FILE, allow_pickle=False) as data:
            values = {name: data[name] for name in data.files}
        values["class_names"] = tuple(str(c) for c in values["class_names"])
        values["images"] = np.load(path / IMAGES_FILE, mmap_mode="r")
        masks = path / MASKS_FILE
        values["masks"] = np.load(masks, mmap_mode="r") if masks.is_file() else None
        return cls(**values)


def _per_image_fields() -> list[str]:
    return [f.name for f in fields(ImageSet) if f.name != "class_names"]


class ArrayWriter:
    """Streams rows of one uint8 array into a ``.npy`` file; the header takes its final shape on close.

    NumPy pads every header so that the first axis can grow in place, so the header written on close has
    the length of the one written first, and the file is byte for byte what ``np.save`` writes.
    """

    def __init__(self, path: Path, row_shape: tuple[int, ...]) -> None:
        self.row_shape, self.rows = row_shape, 0
        self.handle: BinaryIO = open(path, "wb")
        self.data_start = self._header((0, *row_shape))

    def _header(self, shape: tuple[int, ...]) -> int:
        np.lib.format.write_array_header_1_0(
            self.handle, {"descr": np.dtype(np.uint8).str, "fortran_order": False, "shape": shape})
        return self.handle.tell()

    def write(self, rows: np.ndarray) -> None:
        if rows.dtype != np.uint8 or rows.shape[1:] != self.row_shape:
            raise ValueError(f"rows must be uint8 (n, {self.row_shape}), got {rows.dtype} {rows.shape}")
        self.handle.write(np.ascontiguousarray(rows).tobytes())
        self.rows += len(rows)

    def close(self) -> None:
        self.handle.seek(0)
        if self._header((self.rows, *self.row_shape)) != self.data_start:
            raise RuntimeError("the .npy header changed length: the array file would be corrupt")
        self.handle.close()


class ImageSetWriter:
    """Writes an image-set folder from chunks (``append``), atomically: the folder appears when the
    ``with`` block ends without an error, and nothing of it is left behind when it ends with one."""

    def __init__(self, path: str | Path, image_size: int, class_names: tuple[str, ...], with_masks: bool) -> None:
        self.path, self.size, self.class_names, self.with_masks = Path(path), image_size, class_names, with_masks
        self.metadata: dict[str, list[np.ndarray]] = {}

    def __enter__(self) -> ImageSetWriter:
        self._atomic = atomic_dir(self.path)
        folder = self._atomic.__enter__()
        self.images = ArrayWriter(folder / IMAGES_FILE, (self.size, self.size, 3))
        self.masks = ArrayWriter(folder / MASKS_FILE, (self.size, self.size)) if self.with_masks else None
        self.folder = folder
        return self

    def append(self, chunk: ImageSet) -> None:
        if chunk.class_names != self.class_names:
            raise ValueError(f"class names {chunk.class_names} differ from the set's {self.class_names}")
        if (chunk.masks is not None) != self.with_masks:
            raise ValueError("every chunk of a set has masks, or none does")
        self.images.write(np.asarray(chunk.images))
        if self.masks is not None:
            self.masks.write(np.asarray(chunk.masks))
        for name in _per_image_fields():
            if name not in ("images", "masks"):
                self.metadata.setdefault(name, []).append(np.asarray(getattr(chunk, name)))

    def __exit__(self, kind, error, trace) -> bool | None:
        try:
            for writer in (self.images, self.masks):
                if writer is not None:
                    writer.close()
            if error is None:
                self._write_metadata()
        except BaseException as failure:  # the temporary folder goes, the failure propagates
            self._atomic.__exit__(type(failure), failure, failure.__traceback__)
            raise
        return self._atomic.__exit__(kind, error, trace)

    def _write_metadata(self) -> None:
        empty = {"labels": np.int64, "phashes": np.uint64}
        arrays = {name: np.concatenate(parts) if parts else np.zeros(0, empty.get(name, str))
                  for name, parts in ((n, self.metadata.get(n, [])) for n in _per_image_fields()
                                      if n not in ("images", "masks"))}
        arrays["class_names"] = np.asarray(self.class_names)
        with open(self.folder / METADATA_FILE, "wb") as handle:
            np.savez_compressed(handle, **arrays)


def fold_file(folds_dir: str | Path, fold: int, name: str) -> Path:
    """``data/folds/fold<f>/<name>``: an image set of one cross-validation fold (the ``folds`` stage's)."""
    return Path(folds_dir) / f"fold{fold}" / name


def images_with_lesion(masks) -> np.ndarray:
    """Positions of the images whose mask has a lesion pixel, reading the masks a chunk at a time."""
    pixels = int(np.prod(masks.shape[1:]))
    step = chunk_rows(pixels)
    found = [start + np.flatnonzero(np.asarray(masks[start:start + step]).reshape(-1, pixels).any(1))
             for start in range(0, len(masks), step)]
    return np.concatenate(found) if found else np.zeros(0, dtype=np.int64)


def missing_masks(train: ImageSet, val: ImageSet) -> str | None:
    """Why a segmenter cannot train on these splits (no masks, or no lesion to learn), else None."""
    if train.masks is None or val.masks is None:
        return "skipped: the dataset has no segmentation masks"
    if not len(images_with_lesion(train.masks)):
        return "skipped: every training mask is empty: nothing to learn"
    return None


def concatenate(sets: list[ImageSet]) -> ImageSet:
    """The sets one after the other; sets on disk stay there (their rows are stacked unread)."""
    first = sets[0]
    if any(s.class_names != first.class_names for s in sets):
        raise ValueError("cannot concatenate image sets with different class names")
    merged = {}
    for name in _per_image_fields():
        values = [getattr(s, name) for s in sets]
        if any(v is None for v in values):
            merged[name] = None
        elif any(_is_on_disk(v) for v in values):
            merged[name] = _stack_rows(values)
        else:
            merged[name] = np.concatenate(values)
    return ImageSet(class_names=first.class_names, **merged)


def _stack_rows(values: list) -> Rows:
    """Stack several arrays, some of them Rows, into one Rows over all their stored parts."""
    parts, index, offset = [], [], 0
    for value in values:
        rows = value if isinstance(value, Rows) else Rows([value])
        parts.extend(rows.parts)
        index.append(rows.index + offset)
        offset += int(rows.starts[-1])
    return Rows(parts, np.concatenate(index))
