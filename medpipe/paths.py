"""Where things live: the repository root, the offline dataset mirror, the MLflow store."""

from __future__ import annotations

import os
from pathlib import Path

MIRROR_ENV = "MEDPIPE_DATA_MIRROR"


def repo_root() -> Path:
    """The DVC repository root.

    DVC sets ``DVC_ROOT`` to the main repository's root in every stage, also for queued and
    ``--temp`` experiments that run in a copy under ``.dvc/tmp/exps``; outside DVC we walk up from
    the working directory to the first folder holding ``.dvc``.
    """
    env = os.environ.get("DVC_ROOT")
    if env:
        return Path(env).resolve()
    here = Path.cwd().resolve()
    for folder in (here, *here.parents):
        if (folder / ".dvc").is_dir():
            return folder
    return here


def mirror_dir() -> Path:
    """The offline mirror of public datasets: ``$MEDPIPE_DATA_MIRROR`` or ``<repo root>/../shared/datasets``."""
    env = os.environ.get(MIRROR_ENV)
    if env:
        return Path(env).expanduser().resolve()
    return (repo_root().parent / "shared" / "datasets").resolve()
