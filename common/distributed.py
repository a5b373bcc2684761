"""Distributed data parallel under torchrun: the process group, and what ranks share."""
import os
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist

from common.errors import UserError


@dataclass
class DistributedContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self):
        return self.world_size > 1

    @property
    def is_main(self):
        return self.rank == 0


def init_distributed(device_name):
    """Initialise DDP when launched by torchrun (RANK/WORLD_SIZE set); gloo on CPU, nccl on CUDA."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistributedContext()
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and not str(device_name).startswith("cpu")
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return DistributedContext(rank, world_size, local_rank)


def gather_objects(context, local_object):
    """All ranks' objects in rank order (a one-element list without DDP)."""
    if not context.enabled:
        return [local_object]
    gathered = [None] * context.world_size
    dist.all_gather_object(gathered, local_object)
    return gathered


def run_on_main(context, function):
    """Call ``function`` on the main process only and hand its result (or its UserError) to every rank.

    For work that must happen once, like claiming the output directory: two ranks doing it
    would race, and a rank that waits for a failed main process would wait forever.
    """
    outcome = None
    if context.is_main:
        try:
            outcome = ("ok", function())
        except UserError as error:
            outcome = ("error", str(error))
    if context.enabled:
        shared = [outcome]
        dist.broadcast_object_list(shared, src=0)
        outcome = shared[0]
    if outcome[0] == "error":
        raise UserError(outcome[1])
    return outcome[1]


def barrier(context):
    if context.enabled:
        dist.barrier()


def sync_gradients(model, sync):
    """Context for one backward pass: under DDP, ``sync=False`` keeps the gradients local (``no_sync``)
    so they are all-reduced once, on the last pass of an accumulation window; without DDP a no-op."""
    return nullcontext() if sync or not hasattr(model, "no_sync") else model.no_sync()


def cleanup_distributed(context):
    if context.enabled and dist.is_initialized():
        dist.destroy_process_group()


def unwrap(model):
    """The module inside a DistributedDataParallel (or compiled) wrapper."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)
