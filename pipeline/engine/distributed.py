"""Data-parallel training under `torchrun` (docs/architecture.md, "Distributed training").

Every training stage runs unchanged as one process or as N ranks launched by `torchrun`, which sets RANK,
WORLD_SIZE, LOCAL_RANK and the rendezvous address. The process group is created on first use: gloo for CPU
tensors, NCCL for CUDA ones (one backend string, so the same collectives serve both). What the stages rely on:

- `shard`: each rank takes every world_size-th batch of the one global batch stream, so the ranks' batches are
  disjoint and together cover each epoch exactly once, and every sampler stays a pure function of its state.
- `all_reduce_floats`: one collective per update carries the loss parts, audio seconds and whether the loss was
  finite everywhere, so every rank takes the same decision (skip or step) and logs the same figures.
- `is_main`: only rank 0 writes checkpoints, metrics, result files and rejects.
- `gather`: the per-rank state (RNG, sampler positions, slimIPL cache) goes into rank 0's resume record.

A rank that raises ends the whole run: torchrun stops the other ranks, so none hangs in a collective.
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from pipeline.data.world import World

log = logging.getLogger("mlpl.distributed")
T = TypeVar("T")


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    try:
        return int(value) if value is not None else default
    except ValueError as err:
        raise ValueError(f"{name}={value!r} is not an integer (set by torchrun)") from err


def world() -> World:
    """The run's world from torchrun's environment; joins the process group on first use when size > 1."""
    size = _env_int("WORLD_SIZE", 1)
    if size <= 1:
        return World()
    w = World(_env_int("RANK", 0), size, _env_int("LOCAL_RANK", 0))
    if not dist.is_initialized():
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(w.local_rank)  # "cuda" means this rank's GPU from here on
        timeout = datetime.timedelta(seconds=_env_int("MLPL_DIST_TIMEOUT_S", 1800))
        dist.init_process_group(backend=backend, timeout=timeout)
        log.info("rank %d of %d joined the process group (%s)", w.rank, w.size, backend)
    return w


def is_main() -> bool:
    """Whether this process writes (rank 0, or the only process)."""
    return world().is_main


def shard(batches: Iterable[T], w: World) -> Iterator[T]:
    """This rank's share of a global batch stream: the items it owns (`World.owns`) of each consecutive group of
    `size` items.

    The source advances by the whole group before the rank's item is handed out, so a sampler's state after
    each item is the same on every rank (the global position) and the groups never overlap. A finite stream's
    tail shorter than a group goes to the first ranks.
    """
    group: list[T] = []
    for item in batches:
        group.append(item)
        if len(group) == w.size:
            yield from (x for i, x in enumerate(group) if w.owns(i))
            group = []
    yield from (x for i, x in enumerate(group) if w.owns(i))


def all_reduce_floats(values: list[float], w: World) -> list[float]:
    """Element-wise sum of `values` over the ranks (a no-op for one process)."""
    if not w.distributed:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def any_rank(flag: bool, w: World) -> bool:
    """Whether `flag` holds on at least one rank (every rank gets the same answer)."""
    return all_reduce_floats([float(flag)], w)[0] > 0


def gather(obj: Any, w: World) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank ([obj] for one process)."""
    if not w.distributed:
        return [obj]
    out: list[Any] = [None] * w.size
    dist.all_gather_object(out, obj)
    return out


def gather_unique(items: list[T], w: World, key: str = "id") -> list[T]:
    """Every rank's `items` in one list, each `key` once (e.g. the rejects each rank found in its own share)."""
    return list({getattr(x, key): x for rank_items in gather(items, w) for x in rank_items}.values())


def barrier(w: World) -> None:
    """Wait until every rank gets here (e.g. until rank 0 has written a file the others read)."""
    if w.distributed:
        dist.barrier()


def wrap_model(model: torch.nn.Module, w: World, device: torch.device) -> torch.nn.Module:
    """The module to train: DDP around `model` when there are several ranks (gradients averaged), else itself.

    Unused parameters are searched for each step because LayerDrop skips whole layers at random.
    """
    if not w.distributed:
        return model
    ids = [device.index if device.index is not None else w.local_rank] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids, find_unused_parameters=True)


def shutdown() -> None:
    """Leave the process group (at the end of a torchrun process)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def launcher_rank() -> int:
    """The RANK torchrun gave this process (0 without torchrun), read without joining any group."""
    return _env_int("RANK", 0)
