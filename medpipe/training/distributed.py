"""Data-parallel training (``train.processes > 1``): the torchrun launcher, the process group, and the
collectives the training loop uses. Every distributed concern of the pipeline lives here.

A deep training stage whose ``train.processes`` is above 1 runs its own command again under ``torchrun
--standalone --nproc_per_node=N`` and waits (:func:`worker_command`, :func:`run_and_wait`). Each worker joins
the process group (:func:`process_group`: NCCL and GPU ``LOCAL_RANK`` on CUDA, gloo on CPU) and takes its share
of the cores (:func:`share_threads`); :func:`medpipe.training.loop.fit` wraps the model in
DistributedDataParallel (:func:`data_parallel`) and sums the epoch's statistics over the ranks
(:func:`all_reduce_sums`, :func:`broadcast_from_rank0`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from medpipe.errors import UserError
from medpipe.runtime import configure_threads, register_worker
from medpipe.training.config import TrainConfig
from medpipe.training.device import resolve_device

WORKER_ENV = ("LOCAL_RANK", "WORLD_SIZE")   # set by torchrun in each worker


class LaunchError(UserError, RuntimeError):
    """``train.processes > 1`` but the stage was not started as ``python -m <its stage module>``, or asks for
    more processes than the machine has GPUs."""


def world() -> tuple[int, int]:
    """(rank, world size) of this process: (0, 1) unless a ``torch.distributed`` process group is initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce_sums(values: Sequence[float], device: torch.device) -> list[float]:
    """Element-wise sums of ``values`` over all ranks (float64)."""
    summed = torch.tensor(list(values), dtype=torch.float64, device=device)
    dist.all_reduce(summed)
    return summed.tolist()


def broadcast_from_rank0(value: Any) -> Any:
    """Rank 0's ``value`` (any picklable object) on every rank."""
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def data_parallel(model: nn.Module, device: torch.device, trainable_changes: bool) -> nn.Module:
    """``model`` in DistributedDataParallel (rank 0's weights and buffers broadcast to every rank).

    ``trainable_changes``: which parameters train changes between epochs (progressive unfreezing), so
    all of them must be in DDP's reducer from the start, frozen or not, and the frozen ones found unused
    at every step (``find_unused_parameters``; their gradients stay None, as in one process). Otherwise the
    graph is static (``static_graph``): parameters a model never uses (the encoder blocks below a shallow
    U-Net's depth) are found once, in the first step, at no cost afterwards.
    """
    device_ids = [device.index] if device.type == "cuda" else None
    if not trainable_changes:
        return DistributedDataParallel(model, device_ids=device_ids, static_graph=True)
    frozen = [p for p in model.parameters() if not p.requires_grad]
    for p in frozen:
        p.requires_grad_(True)
    try:
        return DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=True)
    finally:
        for p in frozen:
            p.requires_grad_(False)


def torchrun_worker() -> bool:
    """Whether this process is a worker started by torchrun."""
    return all(name in os.environ for name in WORKER_ENV)


def worker_command(processes: int, stage_module: str) -> list[str]:
    """This stage command (``stage_module``, same arguments) under ``torchrun --standalone`` with ``processes``
    workers."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is None or spec.name != stage_module:
        raise LaunchError(f"train.processes is {processes}: the stage starts its workers by running its own command "
                          f"under torchrun, so it must run as `python -m {stage_module} ...` (as dvc.yaml does)")
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
            "-m", stage_module, *sys.argv[1:]]


def run_and_wait(command: list[str]) -> int:
    """Run ``command``; SIGTERM is passed on to it and an interrupt stops it; returns its exit status."""
    proc = subprocess.Popen(command)
    forward = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, lambda signum, _: proc.send_signal(signum)) if forward else None
    try:
        return proc.wait()
    except BaseException:
        proc.terminate()
        proc.wait()
        raise
    finally:
        if forward:
            signal.signal(signal.SIGTERM, previous)


def check_gpus(cfg: TrainConfig, processes: int) -> None:
    """On CUDA, one process per GPU: no more processes than this machine's GPUs."""
    if resolve_device(cfg.device).type == "cuda" and processes > torch.cuda.device_count():
        raise LaunchError(f"{processes} training processes but this machine has {torch.cuda.device_count()} GPU(s): "
                          "on CUDA each process takes one GPU; lower train.processes")


@contextlib.contextmanager
def process_group(cfg: TrainConfig) -> Iterator[tuple[int, int]]:
    """(rank, world size): (0, 1) in a plain process; in a torchrun worker of several, the joined process group
    (NCCL on the GPU ``LOCAL_RANK`` when ``train.device`` resolves to CUDA, else gloo), left at the end."""
    world_size = int(os.environ["WORLD_SIZE"]) if torchrun_worker() else 1
    if world_size == 1:
        yield 0, 1
        return
    local_rank = int(os.environ["LOCAL_RANK"])
    if resolve_device(cfg.device).type == "cuda":
        check_gpus(cfg, local_rank + 1)
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank))
    else:
        dist.init_process_group("gloo")
    rank = dist.get_rank()
    if rank != 0:   # rank 0 tells the story
        logging.getLogger("medpipe").setLevel(logging.WARNING)
    try:   # torchrun stops the other ranks with SIGTERM when one fails: cli.run makes them unwind
        yield rank, world_size
    finally:
        dist.destroy_process_group()


def share_threads(setting: Any, world_size: int) -> int:
    """This process's torch threads; the ranks of one machine all register before any counts, so that they
    split the cores evenly (``configure_threads`` counts the live medpipe workers)."""
    if world_size > 1:
        register_worker()
        dist.barrier()
    return configure_threads(setting)
