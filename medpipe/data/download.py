"""Fetch a dataset's files: from a local copy when there is one, else from their public sources.

A dataset file (``datasets.yaml``: ``files``) is found, in this order:
1. in the offline copy folder (``$MEDPIPE_DATA_MIRROR``, else ``../shared/datasets`` beside the repository):
   copied and checked against the registry's ``checksum``;
2. built from its public ``source`` (a GitHub repository at a pinned commit), every file verified against
   the committed manifest (:mod:`medpipe.data.sources`);
3. downloaded from its ``urls`` and checked against ``checksum``.
Downloads go to a resume folder outside DVC's outputs (DVC clears a stage's outputs before running it) and
continue from where an interrupted run stopped.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from medpipe import config
from medpipe.data import sources
from medpipe.data.registry import SourceFile, get_spec, source_files
from medpipe.errors import UserError
from medpipe.io import atomic_dir, atomic_path
from medpipe.paths import MIRROR_ENV, mirror_dir, repo_root

log = logging.getLogger(__name__)
CHUNK = 1 << 20
PARTIAL_DIR = Path("data/.partial")  # resumable downloads live outside DVC's outputs
DEFAULT_URLS = sources.UrlTemplates(
    archive=config.DownloadConfig.model_fields["archive_url"].default,
    file=config.DownloadConfig.model_fields["file_url"].default,
)


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
    part = resume_dir / f"{source.name}.part"
    try:
        sources.download_resumable(url, part, timeout, source.name)
    except sources.SourceError as err:
        raise DownloadError(str(err)) from None
    try:
        verify(part, source)
    except DownloadError:
        part.unlink(missing_ok=True)  # a corrupt partial file must not be resumed next time
        raise
    with atomic_path(dest) as tmp:
        os.replace(part, tmp)


def _no_source_error(source: SourceFile, mirrored: Path, errors: list[str]) -> DownloadError:
    return DownloadError(
        f"cannot fetch {source.name}: " + "; ".join(errors) + ". Two ways to get it: connect this machine to the "
        f"internet and run again (its public source is fetched and verified), or put {source.name} "
        f"({source.checksum}) in {mirrored.parent} (or in the folder that {MIRROR_ENV} names)"
    )


def fetch(source: SourceFile, dest_dir: Path, resume_dir: Path, timeout: float = 60.0,
          urls: sources.UrlTemplates | None = None) -> Path:
    """Place ``source`` in ``dest_dir``, verified (checksum, or every file of its public source); return its path."""
    dest = dest_dir / source.name
    if dest.exists():
        try:
            verify(dest, source)
            return dest
        except DownloadError:
            log.warning("%s does not match its checksum: fetching it again", dest)
    mirrored = mirror_dir() / source.name
    if mirrored.is_file():
        log.info("copying %s from the offline copy in %s", source.name, mirrored.parent)
        _copy_from_mirror(mirrored, dest, source)
        return dest
    errors = [f"it is not in the offline copy folder {mirrored.parent}"]
    if source.source is not None:
        origin = f"{source.source.repo} @ {source.source.commit[:8]}"
        log.info("building %s from its public source %s", source.name, origin)
        try:
            sources.build(source, repo_root(), dest, resume_dir, urls or DEFAULT_URLS, timeout)
            return dest
        except sources.SourceError as err:
            errors.append(f"its public source {origin} failed: {err}")
    for url in source.urls:
        log.info("downloading %s from %s", source.name, url)
        try:
            _download_url(url, dest, source, resume_dir, timeout)
            return dest
        except DownloadError as err:
            errors.append(str(err))
    if source.source is None and not source.urls:
        errors.append("the registry gives neither a public source nor a URL for it")
    raise _no_source_error(source, mirrored, errors)


@dataclass(frozen=True)
class DownloadPaths:
    out: Path        # data/raw: the dataset's files as they came


def run(params: dict, paths: DownloadPaths) -> list[Path]:
    """Stage ``download``: every file of the dataset into ``paths.out``, checksum-verified, atomically."""
    spec = get_spec(config.dataset_name(params))
    cfg = config.load_section(params, "download", config.DownloadConfig)
    with atomic_dir(paths.out) as tmp:
        urls = sources.UrlTemplates(archive=cfg.archive_url, file=cfg.file_url)
        fetched = [fetch(f, tmp, PARTIAL_DIR, cfg.timeout_s, urls).name for f in source_files(spec)]
    return [paths.out / name for name in fetched]
