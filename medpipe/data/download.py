"""Fetch a dataset's files: from the offline mirror when it has them, else from their URLs.

Every file is checked against the registry's checksum before it appears under its final name. A URL
download goes to ``<name>.part`` in a resume folder outside DVC's outputs (DVC clears a stage's outputs
before running it) and continues from where an interrupted run stopped, via an HTTP Range request.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from medpipe import config

from medpipe.errors import UserError
from medpipe.io import atomic_dir, atomic_path
from medpipe.paths import mirror_dir
from medpipe.data.registry import SourceFile, get_spec, source_files

log = logging.getLogger(__name__)
CHUNK = 1 << 20
PARTIAL_DIR = Path("data/.partial")  # resumable downloads live outside DVC's outputs


class DownloadError(UserError, RuntimeError):
    """A file could not be fetched or did not match its checksum."""


def file_digest(path: Path, algorithm: str) -> str:
    digest = hashlib.new(algorithm)
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def verify(path: Path, source: SourceFile) -> None:
    actual = file_digest(path, source.algorithm)
    if actual != source.digest:
        raise DownloadError(
            f"checksum mismatch for {path}: expected {source.checksum}, got {source.algorithm}:{actual}; "
            f"the file is corrupt or not the release the registry (datasets.yaml) names"
        )


def _copy_from_mirror(mirrored: Path, dest: Path, source: SourceFile) -> None:
    with atomic_path(dest) as tmp:
        shutil.copyfile(mirrored, tmp)
        verify(tmp, source)


def _download_url(url: str, dest: Path, source: SourceFile, resume_dir: Path, timeout: float) -> None:
    resume_dir.mkdir(parents=True, exist_ok=True)
    part = resume_dir / f"{source.name}.part"
    offset = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={offset}-"} if offset else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            if offset and response.status != 206:  # the server ignored the range: start over
                offset = 0
            total = response.length + offset if response.length is not None else None
            with open(part, "ab" if offset else "wb") as out, tqdm(
                total=total, initial=offset, unit="B", unit_scale=True, desc=source.name
            ) as bar:
                for block in iter(lambda: response.read(CHUNK), b""):
                    out.write(block)
                    bar.update(len(block))
    except urllib.error.HTTPError as err:
        if err.code == 416:  # range not satisfiable: the part file is already complete or stale
            pass
        else:
            raise DownloadError(f"{url}: HTTP {err.code} {err.reason}") from None
    except (urllib.error.URLError, TimeoutError, OSError) as err:
        raise DownloadError(f"{url}: {err}") from None
    try:
        verify(part, source)
    except DownloadError:
        part.unlink(missing_ok=True)  # a corrupt partial file must not be resumed next time
        raise
    with atomic_path(dest) as tmp:
        os.replace(part, tmp)


def fetch(source: SourceFile, dest_dir: Path, resume_dir: Path, timeout: float = 60.0) -> Path:
    """Place ``source`` in ``dest_dir`` after verifying its checksum; return its path."""
    dest = dest_dir / source.name
    if dest.exists():
        try:
            verify(dest, source)
            return dest
        except DownloadError:
            log.warning("%s does not match its checksum: fetching it again", dest)
    mirrored = mirror_dir() / source.name
    if mirrored.is_file():
        log.info("copying %s from the mirror %s", source.name, mirrored.parent)
        _copy_from_mirror(mirrored, dest, source)
        return dest
    errors = [f"not in the mirror ({mirrored}; set MEDPIPE_DATA_MIRROR to another folder)"]
    for url in source.urls:
        log.info("downloading %s from %s", source.name, url)
        try:
            _download_url(url, dest, source, resume_dir, timeout)
            return dest
        except DownloadError as err:
            errors.append(str(err))
    if not source.urls:
        errors.append("the registry gives no URL for it")
    raise DownloadError(f"cannot fetch {source.name}: " + "; ".join(errors))


@dataclass(frozen=True)
class DownloadPaths:
    out: Path        # data/raw: the dataset's files as they came


def run(params: dict, paths: DownloadPaths) -> list[Path]:
    """Stage ``download``: every file of the dataset into ``paths.out``, checksum-verified, atomically."""
    spec = get_spec(config.dataset_name(params))
    cfg = config.load_section(params, "download", config.DownloadConfig)
    with atomic_dir(paths.out) as tmp:
        fetched = [fetch(f, tmp, PARTIAL_DIR, cfg.timeout_s).name for f in source_files(spec)]
    return [paths.out / name for name in fetched]
