"""Public sources: build a dataset file from the public GitHub repository it comes from.

Each dataset file of ``datasets.yaml`` may name a ``source``: a repository at a pinned commit, a committed
manifest (``manifests/<dataset>.tsv``) listing every file the dataset uses with its sha256 and size, and a
recipe that turns those files into the dataset file (a zip of class folders, or a MedMNIST ``.npz``).
Every source file is verified by content before it is used, whichever way it came: GitHub builds repository
archives on request, so an archive's own bytes prove nothing, but each member's sha256 does. A derived file
(a re-encoded image, a recipe's arrays) is checked against the manifest too, so this route gives the same
``data/interim`` arrays as a local copy of the ready-made file.

Source files are fetched file by file (``fetch: files``: one HTTPS request per file, for repositories that
hold much more than the dataset) or as the repository archive at the commit (``fetch: archive``: one
download, for datasets of thousands of files). Both resume: verified files stay in the resume folder until
the dataset file is complete, and the archive download continues with an HTTP Range request.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import logging
import shutil
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image
from tqdm import tqdm

from medpipe.data.registry import (
    GreyThumbnailRecipe, MedmnistRecipe, PublicSource, RegistryError, SourceFile,
)
from medpipe.errors import UserError
from medpipe.io import atomic_path

log = logging.getLogger(__name__)
CHUNK = 1 << 20
PARALLEL_REQUESTS = 8


class SourceError(UserError, RuntimeError):
    """A public source could not be reached, or a file from it is not the one its manifest names."""


@dataclass(frozen=True)
class UrlTemplates:
    """Where a repository's files are (``download.archive_url`` / ``download.file_url`` in params.yaml)."""

    archive: str  # {repo}, {commit}
    file: str     # {repo}, {commit}, {path}

    def archive_url(self, source: PublicSource) -> str:
        return self.archive.format(repo=source.repo, commit=source.commit)

    def file_url(self, source: PublicSource, path: str) -> str:
        return self.file.format(repo=source.repo, commit=source.commit, path=urllib.parse.quote(path))


# -- manifests -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ManifestEntry:
    sha256: str         # of the file in the repository
    size: int           # its size in bytes
    path: str           # its path in the repository
    member: str         # the member of the dataset file it becomes ('-': none, the recipe decides)
    member_sha256: str  # that member's sha256: '=' the source file's bytes, '-' not recorded


def read_manifest(path: Path) -> list[ManifestEntry]:
    """A manifest: tab-separated ``sha256 bytes path member member_sha256``, '#' comments; ``.gz`` allowed."""
    if not path.is_file():
        raise RegistryError(f"manifest {path} named in datasets.yaml does not exist")
    raw = path.read_bytes()
    text = gzip.decompress(raw).decode() if path.suffix == ".gz" else raw.decode()
    entries = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line or line.startswith("#"):
            continue
        fields = line.split("\t")
        if len(fields) != 5 or len(fields[0]) != 64 or not fields[1].isdigit():
            raise RegistryError(f"{path}:{number}: expected 'sha256<TAB>bytes<TAB>path<TAB>member<TAB>member_sha256'")
        entries.append(ManifestEntry(fields[0], int(fields[1]), fields[2], fields[3], fields[4]))
    if not entries:
        raise RegistryError(f"manifest {path} lists no file")
    return entries


def _mismatch(what: str, origin: str, expected_sha: str, expected_size: int | None, data: bytes) -> SourceError:
    size = f" ({expected_size} bytes)" if expected_size is not None else ""
    return SourceError(
        f"{what} from {origin}: expected sha256 {expected_sha}{size}, got {hashlib.sha256(data).hexdigest()} "
        f"({len(data)} bytes); the file is truncated, altered or not the one the manifest names"
    )


def check(entry: ManifestEntry, data: bytes, origin: str) -> bytes:
    if len(data) != entry.size or hashlib.sha256(data).hexdigest() != entry.sha256:
        raise _mismatch(f"source file {entry.path!r}", origin, entry.sha256, entry.size, data)
    return data


# -- fetching ----------------------------------------------------------------------------------------------------
def _get(url: str, timeout: float) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.read()
    except urllib.error.HTTPError as err:
        raise SourceError(f"{url}: HTTP {err.code} {err.reason}") from None
    except (urllib.error.URLError, TimeoutError, OSError) as err:
        raise SourceError(f"{url}: {getattr(err, 'reason', err)}") from None


def download_resumable(url: str, part: Path, timeout: float, desc: str) -> None:
    """Stream ``url`` into ``part`` in 1 MiB blocks, continuing an earlier partial download (HTTP Range)."""
    part.parent.mkdir(parents=True, exist_ok=True)
    offset = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={offset}-"} if offset else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            if offset and response.status != 206:  # the server ignored the range: start over
                offset = 0
            total = response.length + offset if response.length is not None else None
            with open(part, "ab" if offset else "wb") as out, tqdm(
                total=total, initial=offset, unit="B", unit_scale=True, desc=desc, disable=None
            ) as bar:
                for block in iter(lambda: response.read(CHUNK), b""):
                    out.write(block)
                    bar.update(len(block))
            if total is not None and part.stat().st_size != total:
                raise SourceError(f"{url}: the download stopped at {part.stat().st_size} of {total} bytes; run again to resume")
    except urllib.error.HTTPError as err:
        if err.code != 416:  # 416: range not satisfiable, the part file is already complete
            raise SourceError(f"{url}: HTTP {err.code} {err.reason}") from None
    except (urllib.error.URLError, TimeoutError, OSError) as err:
        raise SourceError(f"{url}: {getattr(err, 'reason', err)}") from None


class SourceFiles:
    """The verified files of one source, kept under ``folder`` (the resume folder) until the build is done."""

    def __init__(self, source: PublicSource, entries: list[ManifestEntry], folder: Path, urls: UrlTemplates,
                 timeout: float) -> None:
        self.source, self.entries, self.folder, self.urls, self.timeout = source, entries, folder, urls, timeout

    def local(self, entry: ManifestEntry) -> Path:
        return self.folder / "files" / entry.path

    def read(self, entry: ManifestEntry) -> bytes:
        """A file's bytes, after :meth:`fetch` (which verified every file: not hashed again here)."""
        return self.local(entry).read_bytes()

    def _have(self, entry: ManifestEntry) -> bool:
        path = self.local(entry)
        if not path.is_file() or path.stat().st_size != entry.size:
            return False
        try:
            check(entry, path.read_bytes(), str(path))
        except SourceError:
            return False
        return True

    def _keep(self, entry: ManifestEntry, data: bytes) -> None:
        with atomic_path(self.local(entry)) as tmp:
            tmp.write_bytes(data)

    def fetch(self) -> None:
        """Every file of the manifest into the resume folder, verified; files already there are kept."""
        missing = [e for e in self.entries if not self._have(e)]
        if not missing:
            return
        log.info("%s @ %s: %d of %d files to fetch (%s)", self.source.repo, self.source.commit[:8], len(missing),
                 len(self.entries), self.source.fetch)
        if self.source.fetch == "archive":
            self._from_archive(missing)
        else:
            self._file_by_file(missing)

    def _fetch_one(self, entry: ManifestEntry) -> int:
        url = self.urls.file_url(self.source, entry.path)
        self._keep(entry, check(entry, _get(url, self.timeout), url))
        return entry.size

    def _file_by_file(self, missing: list[ManifestEntry]) -> None:
        with tqdm(total=sum(e.size for e in missing), unit="B", unit_scale=True, desc=self.source.repo,
                  disable=None) as bar:
            bar.update(self._fetch_one(missing[0]))  # one request first: an unreachable host fails once, quickly
            with ThreadPoolExecutor(PARALLEL_REQUESTS) as pool:
                for size in pool.map(self._fetch_one, missing[1:]):
                    bar.update(size)

    def _from_archive(self, missing: list[ManifestEntry]) -> None:
        url = self.urls.archive_url(self.source)
        part = self.folder / f"{self.source.name}-{self.source.commit}.zip.part"
        download_resumable(url, part, self.timeout, f"{self.source.repo}@{self.source.commit[:8]}")
        prefix = f"{self.source.name}-{self.source.commit}/"
        try:
            with zipfile.ZipFile(part) as archive:
                names = set(archive.namelist())
                for entry in tqdm(missing, desc=f"verify {self.source.repo}", unit="file", disable=None):
                    member = prefix + entry.path
                    if member not in names:
                        raise SourceError(f"{url}: the archive has no member {member!r} (named in the manifest)")
                    self._keep(entry, check(entry, archive.read(member), f"{url} member {member!r}"))
        except zipfile.BadZipFile as err:
            part.unlink(missing_ok=True)
            raise SourceError(f"{url}: not a complete zip archive ({err}); it was removed, run again") from None
        part.unlink()


# -- recipes: source files -> the dataset file -------------------------------------------------------------------
def grey_thumbnail_jpeg(data: bytes, recipe: GreyThumbnailRecipe) -> bytes:
    """Decode, convert to 8-bit grey, shrink to at most ``max_side`` a side (aspect kept, never enlarged), JPEG."""
    with Image.open(io.BytesIO(data)) as img:
        grey = img.convert("L")
    grey.thumbnail((recipe.max_side, recipe.max_side), Image.Resampling.BICUBIC)
    out = io.BytesIO()
    grey.save(out, format="JPEG", quality=recipe.quality)
    return out.getvalue()


def build_zip(files: SourceFiles, out: Path, name: str, convert: Callable[[bytes], bytes] | None,
              extra: dict[str, Path]) -> None:
    """A zip of the manifest's members (stored, like the released archives), plus ``extra`` project files."""
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_STORED) as archive:
        for entry in tqdm(files.entries, desc=f"build {name}", unit="file", disable=None):
            data = files.read(entry)
            if convert is not None:
                data = convert(data)
                if entry.member_sha256 not in ("=", "-") and hashlib.sha256(data).hexdigest() != entry.member_sha256:
                    raise _mismatch(f"member {entry.member!r} made from {entry.path!r}", "the recipe",
                                    entry.member_sha256, None, data)
            archive.writestr(zipfile.ZipInfo(entry.member, date_time=(1980, 1, 1, 0, 0, 0)), data)
        for member, path in extra.items():
            archive.writestr(zipfile.ZipInfo(member, date_time=(1980, 1, 1, 0, 0, 0)), path.read_bytes())


def medmnist_arrays(images: Iterable[tuple[int, bytes]], recipe: MedmnistRecipe) -> dict[str, np.ndarray]:
    """The MedMNIST recipe: each image as RGB, centre crop, bicubic resize; a seeded split in index order.

    ``images`` yields ``(label, encoded image)`` in the dataset's order (classes in label order, files sorted).
    """
    pixels, labels = [], []
    for label, data in images:
        with Image.open(io.BytesIO(data)) as img:
            rgb = img.convert("RGB")
        left, top = (rgb.width - recipe.crop) // 2, (rgb.height - recipe.crop) // 2
        rgb = rgb.crop((left, top, left + recipe.crop, top + recipe.crop))
        pixels.append(np.asarray(rgb.resize((recipe.size, recipe.size), Image.Resampling.BICUBIC), dtype=np.uint8))
        labels.append(label)
    total = len(pixels)
    if recipe.train + recipe.val > total:
        raise SourceError(f"the medmnist recipe asks for {recipe.train} + {recipe.val} images, the source has {total}")
    order = np.random.default_rng(recipe.seed).permutation(total)
    parts = {"train": order[:recipe.train], "val": order[recipe.train:recipe.train + recipe.val],
             "test": order[recipe.train + recipe.val:]}
    stacked, label_array = np.stack(pixels), np.asarray(labels, dtype=np.uint8).reshape(-1, 1)
    arrays = {}
    for split, index in parts.items():
        index = np.sort(index)
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = stacked[index], label_array[index]
    return arrays


def arrays_digest(arrays: dict[str, np.ndarray]) -> str:
    """The sha256 of a set of arrays' content (names, dtypes, shapes, bytes): ``.npz`` bytes carry zip times."""
    digest = hashlib.sha256()
    for key in sorted(arrays):
        value = np.ascontiguousarray(arrays[key])
        digest.update(f"{key}|{value.dtype.str}|{value.shape}|".encode())
        digest.update(value.tobytes())
    return digest.hexdigest()


def build_npz(files: SourceFiles, out: Path, name: str, recipe: MedmnistRecipe) -> None:
    class_index = {folder: label for label, folder in enumerate(recipe.folders)}

    def labelled() -> Iterable[tuple[int, bytes]]:
        ordered = sorted(files.entries, key=lambda e: (class_index[PurePosixPath(e.path).parent.name], e.path))
        for entry in tqdm(ordered, desc=f"build {name}", unit="file", disable=None):
            yield class_index[PurePosixPath(entry.path).parent.name], files.read(entry)

    unknown = {PurePosixPath(e.path).parent.name for e in files.entries} - set(class_index)
    if unknown:
        raise RegistryError(f"manifest folders {sorted(unknown)} are not among the recipe's folders {recipe.folders}")
    arrays = medmnist_arrays(labelled(), recipe)
    actual = arrays_digest(arrays)
    if actual != recipe.content_sha256:
        raise SourceError(f"{name} built by the medmnist recipe: expected content sha256 {recipe.content_sha256}, "
                          f"got {actual}")
    with open(out, "wb") as handle:
        np.savez_compressed(handle, **arrays)


def build(file: SourceFile, root: Path, dest: Path, resume_dir: Path, urls: UrlTemplates, timeout: float) -> None:
    """Fetch ``file``'s public source, verify every file, and write the dataset file ``dest`` atomically."""
    source = file.source
    assert source is not None
    entries = read_manifest(root / source.manifest)
    folder = resume_dir / f"{source.name}-{source.commit}"
    files = SourceFiles(source, entries, folder, urls, timeout)
    files.fetch()
    extra = {member: root / path for member, path in source.extra_members.items()}
    with atomic_path(dest) as tmp:
        recipe = source.recipe
        if isinstance(recipe, MedmnistRecipe):
            build_npz(files, tmp, dest.name, recipe)
        elif isinstance(recipe, GreyThumbnailRecipe):
            build_zip(files, tmp, dest.name, lambda data: grey_thumbnail_jpeg(data, recipe), extra)
        else:
            build_zip(files, tmp, dest.name, None, extra)
    shutil.rmtree(folder, ignore_errors=True)
    log.info("built %s from %s @ %s (%d files verified)", dest.name, source.repo, source.commit[:8], len(entries))

