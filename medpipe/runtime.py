"""Share the machine's cores among the medpipe processes that run at the same time.

Two torch processes on a 2-core machine (``dvc queue start -j 2``, say) each start one thread per core
by default and run several times slower than with one thread each. :func:`configure_threads` sets
torch's thread count per process: a fixed number, or ``auto``, which divides the usable cores among
the medpipe workers registered on this machine.

Each worker registers itself as ``<pid>.pid`` in a shared folder (``MEDPIPE_WORKERS_DIR``, by default
``<tempdir>/medpipe-workers-<uid>``), written to a temporary name and renamed into place, so that a
reader never sees half a file. The file holds the process's start time (from ``/proc``), so that a pid
reused by another process after a crash is not taken for a live worker. Files of dead workers are
removed by whoever counts; a worker removes its own at exit.

Environment variables such as ``OMP_NUM_THREADS`` are deliberately not set: OpenMP and MKL read them
when they start, which is at ``import torch``, before any parameter is read, and
``torch.set_num_threads`` then sets the same pools directly. DataLoader worker processes set their own
torch threads to 1.
"""

from __future__ import annotations

import atexit
import logging
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Literal

from medpipe.errors import UserError

log = logging.getLogger(__name__)

THREADS_PARAM = "train.threads"
THREADS_ENV = "MEDPIPE_THREADS"
WORKERS_DIR_ENV = "MEDPIPE_WORKERS_DIR"

Threads = int | Literal["auto"]
_own_files: set[Path] = set()


class ThreadsError(UserError, ValueError):
    """``train.threads`` (or ``MEDPIPE_THREADS``) is neither ``auto`` nor a positive integer."""


class WorkersDirError(UserError, OSError):
    """The folder where medpipe workers register cannot be written."""


def parse_threads(value: object, name: str = THREADS_PARAM) -> Threads:
    """``"auto"`` or a positive int from a parameter or an environment string; ``name`` is for errors."""
    if value == "auto":
        return "auto"
    if isinstance(value, str):
        try:
            value = int(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ThreadsError(
            f"{name} must be 'auto' or a positive integer (torch threads per process), got {value!r}"
        )
    return value


def requested_threads(setting: object) -> Threads:
    """The thread setting in force: ``MEDPIPE_THREADS`` when set, else the ``train.threads`` parameter."""
    env = os.environ.get(THREADS_ENV, "").strip()
    if env:
        return parse_threads(env, f"{THREADS_ENV} (which overrides {THREADS_PARAM})")
    return parse_threads(setting)


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity, which containers and taskset restrict)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def share_of_cores(cores: int, workers: int) -> int:
    """Threads per worker when ``workers`` processes share ``cores`` cores: at least 1."""
    return max(1, cores // max(1, workers))


def workers_dir() -> Path:
    """The folder of worker registrations: ``MEDPIPE_WORKERS_DIR`` or ``<tempdir>/medpipe-workers-<uid>``."""
    override = os.environ.get(WORKERS_DIR_ENV, "").strip()
    if override:
        return Path(override)
    user = os.getuid() if hasattr(os, "getuid") else os.environ.get("USERNAME", "user")
    return Path(tempfile.gettempdir()) / f"medpipe-workers-{user}"


def _process_stat(pid: int) -> tuple[str, str] | None:
    """(state, start time in clock ticks since boot) of ``pid`` from ``/proc``; None where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rpartition(")")[2].split()  # the command name in parentheses may hold spaces
    return fields[0], fields[19]


def start_token(pid: int) -> str:
    """What identifies this run of ``pid`` (its start time), or "" where the system does not say."""
    stat = _process_stat(pid)
    return stat[1] if stat else ""


def is_live(pid: int, token: str = "") -> bool:
    """Whether ``pid`` runs (not a zombie) and, when ``token`` is given, is the process that registered."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, under another user
    stat = _process_stat(pid)
    if stat is None:
        return True
    state, started = stat
    return state != "Z" and (not token or started == token)


def register_pid(pid: int, directory: Path | None = None) -> Path:
    """Register ``pid`` as a running medpipe worker; atomic: written aside, then renamed into place."""
    directory = directory or workers_dir()
    path = directory / f"{pid}.pid"
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=directory, prefix=f".{pid}.", suffix=".tmp",
                                         delete=False) as tmp:
            tmp.write(start_token(pid))
        os.replace(tmp.name, path)
    except OSError as err:
        raise WorkersDirError(
            f"cannot register medpipe worker {pid} in {directory} ({err}); "
            f"set {WORKERS_DIR_ENV} to a writable folder"
        ) from None
    return path


def _registered_pid(path: Path) -> int | None:
    """The pid a registration file is named after; None for other files (and for 0, which os.kill reads
    as "our own process group")."""
    return int(path.stem) if path.stem.isdigit() and int(path.stem) > 0 else None


def live_workers(directory: Path | None = None) -> list[int]:
    """Pids of the live registered workers, sorted; the registrations of dead ones are removed."""
    directory = directory or workers_dir()
    live = []
    for path in directory.glob("*.pid"):
        pid = _registered_pid(path)
        if pid is None:
            continue
        try:
            token = path.read_text().strip()
        except FileNotFoundError:  # unregistered meanwhile
            continue
        except PermissionError:  # another user's, in a shared folder: trust the pid alone
            token = ""
        if is_live(pid, token):
            live.append(pid)
        else:
            with suppress(PermissionError):
                path.unlink(missing_ok=True)
    return sorted(live)


def register_worker(directory: Path | None = None) -> Path:
    """Register this process (until :func:`unregister_worker` or exit); calling again is harmless."""
    path = register_pid(os.getpid(), directory)
    _own_files.add(path)
    return path


@atexit.register
def unregister_worker() -> None:
    """Remove this process's registrations, so that other workers take its cores (runs at exit too)."""
    mine = {p for p in _own_files if p.stem == str(os.getpid())}  # a forked child leaves its parent's alone
    for path in mine:
        path.unlink(missing_ok=True)
    _own_files.difference_update(mine)


def choose_threads(setting: object, directory: Path | None = None) -> tuple[int, str]:
    """Register this process and pick its thread count; returns (threads, why) without touching torch."""
    requested = requested_threads(setting)
    register_worker(directory)
    if requested != "auto":
        return requested, f"{requested} requested"
    cores, workers = usable_cores(), len(live_workers(directory))
    return share_of_cores(cores, workers), f"auto: {cores} cores / {workers} live medpipe workers"


def apply_threads(threads: int) -> None:
    """Set torch's intra-op threads, and its inter-op threads where torch still allows it."""
    import torch

    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(threads)
    except RuntimeError:  # only allowed once, before any inter-op work: keep what is set
        log.debug("torch inter-op threads stay at %d", torch.get_num_interop_threads())


def configure_threads(setting: Threads | str = "auto", directory: Path | None = None) -> int:
    """Set torch's threads from ``train.threads`` (``MEDPIPE_THREADS`` overrides it) and return the count.

    An int is used as is. ``auto`` takes ``max(1, usable cores // live medpipe workers)``, this process
    included. The share is computed now: a worker that starts later sees this one, but this one does not
    shrink; call again (e.g. each epoch) to rebalance. This process stays registered until
    :func:`unregister_worker` or exit, also with an int (its threads use cores all the same).
    """
    threads, why = choose_threads(setting, directory)
    apply_threads(threads)
    log.info("torch threads: %d (%s)", threads, why)
    return threads


@contextmanager
def configured_threads(setting: Threads | str = "auto", directory: Path | None = None) -> Iterator[int]:
    """:func:`configure_threads` for the block; the registration is removed when it ends."""
    try:
        yield configure_threads(setting, directory)
    finally:
        unregister_worker()
