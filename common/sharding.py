"""infer.py --file under torchrun: each process runs a contiguous share of the inputs, and the main
process gathers the shares' results, in input order, and writes the one output.

    torchrun --nproc-per-node 2 infer.py --model-path models/model.onnx --file big.jsonl --output out.jsonl

The same launcher as the trainers (one process per GPU with --device cuda: each takes cuda:LOCAL_RANK),
so a corpus that outgrows one process needs no second tool.
"""
import os

import torch.distributed as dist

from common import distributed
from common.errors import UserError


def launched_by_torchrun():
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def start_file_run(args):
    """The process group for a sharded --file run (a one-process context outside torchrun); sets
    ``args.device`` to this process's GPU when running on CUDA."""
    if not launched_by_torchrun():
        return distributed.DistributedContext()
    if args.serve or not args.file or args.file == "-":
        raise UserError("torchrun: only --file runs are sharded across processes (not --serve, --text, "
                        "standard input or the interactive loop); start one process")
    context = distributed.init_distributed(args.device)
    if str(args.device).startswith("cuda"):
        args.device = f"cuda:{context.local_rank}"
    return context


def shard_bounds(count, rank, world_size):
    """[start, end) of ``rank``'s contiguous share of ``count`` inputs; shares differ by at most one."""
    per_rank, extra = divmod(count, world_size)
    start = rank * per_rank + min(rank, extra)
    return start, start + per_rank + (1 if rank < extra else 0)


def run_sharded(context, run, items):
    """``run(share) -> results`` on this process's share of ``items``.

    The main process gets every share's results in input order (errors that ``run`` marked on a share's
    items are copied onto its own ``items``); the other processes get None. Without torchrun, ``run(items)``.
    """
    if not context.enabled:
        return run(items) if items else []
    start, end = shard_bounds(len(items), context.rank, context.world_size)
    share = items[start:end]
    results = run(share) if share else []
    gathered = gather_on_main(context, (results, [item.error for item in share]))
    distributed.cleanup_distributed(context)  # the gather was the last collective
    if not context.is_main:
        return None
    every_result = []
    for rank, (share_results, share_errors) in enumerate(gathered):
        start, end = shard_bounds(len(items), rank, context.world_size)
        for item, error in zip(items[start:end], share_errors):
            item.error = item.error or error
        every_result += share_results
    return every_result


def gather_on_main(context, local_object):
    """Every rank's object, in rank order, on the main process only (memory for one copy, not N)."""
    gathered = [None] * context.world_size if context.is_main else None
    dist.gather_object(local_object, gathered, dst=0)
    return gathered
