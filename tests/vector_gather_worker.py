"""Run by test_vector_negatives.py under torchrun (2 processes, gloo): InfoNCE with hard negatives
gathered across ranks, against the same loss computed by one process on the whole batch.

Each rank embeds its share of a fixed batch with a small linear encoder, computes the gathered
loss, backpropagates it scaled by the world size and averages the gradients as DDP does. Rank 0
writes both losses and both gradients, and the negatives a --false-negative-margin (argv[2], optional)
removed, to the JSON file named by argv[1]."""
import json
import sys

import torch
import torch.distributed as dist

from common.pair_losses import compute_pair_loss

QUERIES, NEGATIVES_PER_QUERY, FEATURES, DIM = 6, 2, 8, 4
RANK_QUERIES = (4, 2)  # unequal shares: the last batch of an epoch is often short


def whole_batch():
    generator = torch.Generator().manual_seed(0)
    queries = torch.randn(QUERIES, FEATURES, generator=generator)
    positives = torch.randn(QUERIES, FEATURES, generator=generator)
    negatives = torch.randn(QUERIES, NEGATIVES_PER_QUERY, FEATURES, generator=generator)
    doc_ids = torch.arange(QUERIES * (1 + NEGATIVES_PER_QUERY))
    doc_ids[3] = doc_ids[0]  # the same positive text twice: not a negative for the other query
    return queries, positives, negatives, doc_ids


def loss_and_gradient(encoder, queries, positives, negatives, positive_ids, negative_ids, gather, margin=None,
                      statistics=None):
    documents = torch.cat([positives, negatives.reshape(-1, FEATURES)])
    batch = {"rel": torch.ones(len(queries)), "weight": torch.ones(len(queries)),
             "doc_id": torch.cat([positive_ids, negative_ids]), "positives": len(queries)}
    loss = compute_pair_loss("infonce", encoder(queries), encoder(documents), batch, 0.05, [4, 2], gather=gather,
                             false_negative_margin=margin, statistics=statistics)
    encoder.zero_grad()
    return loss, batch


def as_ints(statistics):
    """The mask's counts (tensors) as JSON numbers."""
    return {name: int(count) for name, count in statistics.items()}


def main():
    dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    margin = float(sys.argv[2]) if len(sys.argv) > 2 else None
    statistics = {}
    torch.manual_seed(0)
    encoder = torch.nn.Linear(FEATURES, DIM)
    queries, positives, negatives, doc_ids = whole_batch()
    positive_ids, negative_ids = doc_ids[:QUERIES], doc_ids[QUERIES:].reshape(QUERIES, NEGATIVES_PER_QUERY)
    start = sum(RANK_QUERIES[:rank])
    share = slice(start, start + RANK_QUERIES[rank])
    loss, _ = loss_and_gradient(encoder, queries[share], positives[share], negatives[share], positive_ids[share],
                                negative_ids[share].reshape(-1), gather=True, margin=margin, statistics=statistics)
    (loss * world_size).backward()
    for parameter in encoder.parameters():  # what DDP does after backward
        dist.all_reduce(parameter.grad)
        parameter.grad /= world_size
    gathered = {"loss": float(loss.detach()), "grad": [p.grad.flatten().tolist() for p in encoder.parameters()],
                "statistics": as_ints(statistics)}
    if rank == 0:
        reference_statistics = {}
        reference_loss, _ = loss_and_gradient(encoder, queries, positives, negatives, positive_ids,
                                              negative_ids.reshape(-1), gather=False, margin=margin,
                                              statistics=reference_statistics)
        reference_loss.backward()
        reference = {"loss": float(reference_loss.detach()),
                     "grad": [p.grad.flatten().tolist() for p in encoder.parameters()],
                     "statistics": as_ints(reference_statistics)}
        with open(sys.argv[1], "w") as handle:
            json.dump({"gathered": gathered, "one_process": reference}, handle)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
