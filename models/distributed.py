"""torch.distributed for the stage scripts: one plain process, or the ranks ``torchrun`` starts.

``python script.py`` runs as before (world size 1, no process group). Under ``torchrun``
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` in the environment, one machine or several with a
c10d rendezvous), :func:`init` joins the process group: NCCL when the rank's device is CUDA
(``cuda:LOCAL_RANK``), gloo on CPU. Everything here is a no-op at world size 1, so the scripts
call it unconditionally.

Sharding (:func:`shard_order`) follows ``torch.utils.data.DistributedSampler``: one permutation
per epoch, seeded by (seed, epoch) and the same on every rank, dealt out rank by rank and cut to
the same length on each, so every rank runs the same number of steps and no rank waits on a
collective the others skipped.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import numpy as np
import torch

from models.utils import get_device, set_torch_threads

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Context:
    """Where this process stands: rank, world size, local rank and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes files, logs progress and shows tqdm."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1


def rank_device(setting: str, local_rank: int) -> torch.device:
    """``get_device(setting)``, with CUDA pinned to this rank's GPU (``cuda:LOCAL_RANK``)."""
    device = get_device(setting)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank % max(torch.cuda.device_count(), 1))
    return device


def init(device_setting: str = "auto") -> Context:
    """Join the process group when started by torchrun; otherwise a world of one."""
    if not launched_by_torchrun():
        return Context(device=get_device(device_setting))
    import torch.distributed as dist

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    device = rank_device(device_setting, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if rank != 0:  # one log: the other ranks report warnings and errors only
        logging.getLogger().setLevel(logging.WARNING)
    log.info("torch.distributed: %d ranks (%s), rank 0 on %s", world, dist.get_backend(), device)
    return Context(rank, world, local_rank, local_world, device)


def teardown(ctx: Context) -> None:
    if ctx.distributed:
        import torch.distributed as dist

        if dist.is_initialized():
            # Every rank reaches here before any tears down: a gloo rank whose peer left mid-way can
            # abort at exit ("terminate called without an active exception", seen in CI runs).
            dist.barrier()
            dist.destroy_process_group()


def barrier(ctx: Context) -> None:
    if ctx.distributed:
        import torch.distributed as dist

        dist.barrier()


def all_sum(values, ctx: Context) -> np.ndarray:
    """Element-wise sum over the ranks of a float vector (float64), returned on every rank."""
    array = np.asarray(values, dtype=np.float64)
    if not ctx.distributed:
        return array
    import torch.distributed as dist

    tensor = torch.as_tensor(array, device=ctx.device)
    dist.all_reduce(tensor)
    return tensor.cpu().numpy()


def any_rank(flag: bool, ctx: Context) -> bool:
    """True on every rank when ``flag`` is true on any rank (one small all-reduce)."""
    if not ctx.distributed:
        return bool(flag)
    return bool(all_sum([float(flag)], ctx)[0] > 0)


def broadcast_object(value, ctx: Context, src: int = 0):
    """Rank ``src``'s ``value`` (any picklable object: a flag, a checkpoint dict) on every rank."""
    if not ctx.distributed:
        return value
    import torch.distributed as dist

    holder = [value if ctx.rank == src else None]
    dist.broadcast_object_list(holder, src=src, device=ctx.device if ctx.device.type == "cuda" else None)
    return holder[0]


def broadcast_module(module: torch.nn.Module, ctx: Context, src: int = 0) -> None:
    """Copy rank ``src``'s parameters and buffers into every rank's ``module`` in place."""
    if not ctx.distributed:
        return
    import torch.distributed as dist

    with torch.no_grad():
        for tensor in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(tensor.data, src=src)


def wrap(module: torch.nn.Module, ctx: Context) -> torch.nn.Module:
    """``DistributedDataParallel(module)`` under torchrun (gradients averaged over the ranks in
    backward), the module itself otherwise. The wrapped module's ``state_dict`` is read from the
    inner module (:func:`unwrap`), so checkpoints never carry a ``module.`` prefix.

    Buffers are not re-broadcast at each forward: the ones training reads (one-hot, library
    prior) are equal on every rank from the start, and rank 0 alone refits the generation
    buffers before it saves.
    """
    if not ctx.distributed:
        return module
    from torch.nn.parallel import DistributedDataParallel

    import inspect

    no_buffer_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in
                      inspect.signature(DistributedDataParallel.__init__).parameters else {"broadcast_buffers": False})
    return DistributedDataParallel(module, device_ids=None, **no_buffer_sync)


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    return getattr(module, "module", module)


def shard_order(rows: np.ndarray, seed: int, epoch: int, rank: int = 0, world_size: int = 1) -> np.ndarray:
    """This rank's rows for one epoch: a (seed, epoch)-seeded shuffle of ``rows`` dealt out to the
    ranks, each shard cut to ``len(rows) // world_size`` (the few rows left over differ per
    epoch). Shards are disjoint; at world size 1 it is the whole shuffle."""
    order = np.asarray(rows)[np.random.default_rng([int(seed), int(epoch)]).permutation(len(rows))]
    per_rank = len(order) // world_size
    return order[rank:per_rank * world_size:world_size]


def set_rank_threads(setting: int, ctx: Context) -> int:
    """Torch threads for this rank: ``setting``, or with 0 the machine's cores shared by its ranks."""
    threads = set_torch_threads(setting)
    if setting <= 0 and ctx.local_world_size > 1:  # ranks on one machine share its cores
        threads = set_torch_threads(max(1, threads // ctx.local_world_size))
    return threads


def rank_seed(seed: int, *key: int) -> int:
    """A 63-bit seed for a torch.Generator from (seed, *key), e.g. (seed, epoch, rank)."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, *map(int, key)]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def on_main(ctx: Context, compute):
    """``compute()`` on rank 0, its result broadcast to every rank. An InputError raised there is
    raised on every rank, so no rank is left waiting on a collective when rank 0 refuses."""
    from models.utils import InputError

    result, error = None, None
    if ctx.is_main:
        try:
            result = compute()
        except InputError as err:
            if not ctx.distributed:
                raise
            error = str(err)
    if ctx.distributed:
        result, error = broadcast_object((result, error), ctx)
    if error is not None:
        raise InputError(error)
    return result
