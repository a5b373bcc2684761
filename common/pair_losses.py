"""Losses of the vector trainer: weighted MSE of cosine against the graded relevance, CoSENT (rank
pairs by relevance) and InfoNCE over in-batch and hard negatives (their --loss names:
choices.PAIR_LOSSES); under torchrun InfoNCE ranks against every rank's documents; Matryoshka sums
a loss over embedding prefixes. InfoNCE can leave out likely false negatives (GISTEmbed-style masking,
the model being trained as its own guide)."""
import torch
import torch.distributed as dist
import torch.nn.functional as F


def weighted_mse_loss(query_embeddings, doc_embeddings, rel, weight):
    """mean_i weight_i * (cos(q_i, d_i) - rel_i)^2: the cosine is pulled towards the labelled relevance."""
    cosine = F.cosine_similarity(query_embeddings.float(), doc_embeddings.float(), dim=-1)  # (batch,)
    return torch.mean(weight * (cosine - rel) ** 2)


def cosent_loss(query_embeddings, doc_embeddings, rel, weight, scale=20.0):
    """CoSENT: log(1 + sum over pairs with rel_i > rel_j of exp(scale * (cos_j - cos_i))).

    Only the order of the cosines matters, not their values; a pair's term is weighted
    by the product of the two records' weights.
    """
    cosine = F.cosine_similarity(query_embeddings.float(), doc_embeddings.float(), dim=-1) * scale  # (batch,)
    differences = cosine[None, :] - cosine[:, None]  # [i, j] = cos_j - cos_i
    ordered = rel[:, None] > rel[None, :]  # i should rank above j
    pair_weights = weight[:, None] * weight[None, :]
    masked = differences.masked_fill(~ordered | (pair_weights == 0), float("-inf")) + torch.log(
        pair_weights.clamp(min=1e-12))
    zero = torch.zeros(1, device=cosine.device)
    return torch.logsumexp(torch.cat([zero, masked.flatten()]), dim=0)


def infonce_loss(query_embeddings, doc_embeddings, weight, doc_ids, temperature=0.05, false_negative_margin=None,
                 statistics=None):
    """InfoNCE: each query's own document against every other document of the batch.

    ``doc_embeddings`` (documents, dim) holds the queries' positives first, in query order
    (document i belongs to query i), then any hard negatives; ``doc_ids`` (documents,) names each
    document's text, so a copy of a query's positive elsewhere in the batch is not its negative.
    ``false_negative_margin``: see ``false_negative_mask``; ``statistics`` (a dict) counts what it removed.
    """
    queries = F.normalize(query_embeddings.float(), dim=-1)  # (batch, dim)
    documents = F.normalize(doc_embeddings.float(), dim=-1)  # (documents, dim)
    cosines = queries @ documents.T  # (batch, documents)
    batch_size = len(queries)
    duplicate = doc_ids[:batch_size, None] == doc_ids[None, :]  # (batch, documents)
    duplicate[:, :batch_size] &= ~torch.eye(batch_size, dtype=torch.bool, device=cosines.device)
    excluded = duplicate
    if false_negative_margin is not None:
        masked = false_negative_mask(cosines, false_negative_margin) & ~duplicate
        excluded = duplicate | masked
        if statistics is not None:
            count_masked_negatives(statistics, masked, duplicate)
    logits = (cosines / temperature).masked_fill(excluded, float("-inf"))
    targets = torch.arange(batch_size, device=logits.device)
    losses = F.cross_entropy(logits, targets, reduction="none")  # (batch,)
    return torch.sum(weight * losses) / weight.sum().clamp(min=1e-12)


def false_negative_mask(cosines, margin):
    """(batch, documents) True where a document other than query i's own (column i) scores above
    cos(query i, its positive) - ``margin``: a likely unlabelled positive, left out of the softmax.

    sentence-transformers' GISTEmbedLoss (absolute margin) with the model being trained as its own
    guide: a frozen guide model would double the forward cost. Decided on detached cosines, so the
    mask carries no gradient; margin 0 leaves out only documents above the positive.
    """
    cosines = cosines.detach()
    batch_size = len(cosines)
    own = torch.arange(batch_size, device=cosines.device)
    positive = cosines[own, own]  # (batch,)
    mask = cosines > (positive - margin)[:, None]
    mask[own, own] = False  # the positive itself stays
    return mask


def count_masked_negatives(statistics, masked, duplicate):
    """Add this batch's masked and total negatives, in-batch (the other queries' positives) and hard,
    to ``statistics``; copies of a query's own positive are not negatives and are not counted. The counts
    stay tensors (no host sync in the training step): int() them when reporting."""
    batch_size = len(masked)
    negatives = ~duplicate
    negatives[torch.arange(batch_size), torch.arange(batch_size)] = False
    for kind, columns in (("in_batch", slice(None, batch_size)), ("hard", slice(batch_size, None))):
        statistics[f"{kind}_masked"] = statistics.get(f"{kind}_masked", 0) + masked[:, columns].sum()
        statistics[f"{kind}_negatives"] = statistics.get(f"{kind}_negatives", 0) + negatives[:, columns].sum()


def compute_pair_loss(loss_name, query_embeddings, doc_embeddings, batch, temperature, matryoshka_dims=None,
                      matryoshka_weights=None, gather=False, false_negative_margin=None, statistics=None):
    """The training objective chosen by ``--loss`` on one batch of embeddings.

    ``matryoshka_dims``: the loss summed over the embeddings cut to each of these sizes (every loss
    normalises, so a prefix is compared by its own cosine), each term times its
    ``matryoshka_weights`` entry (default 1; as sentence-transformers' MatryoshkaLoss). ``gather``
    (InfoNCE under torchrun): the loss over every rank's queries and documents, see
    ``gather_keeping_local_gradients``. ``false_negative_margin`` (InfoNCE): leave out the negatives
    scoring within this much of the query's positive (``false_negative_mask``), at every size; their
    counts are added to ``statistics`` (a dict) when given.
    """
    device = query_embeddings.device
    rel, weight, doc_ids = (batch[key].to(device) for key in ("rel", "weight", "doc_id"))
    if loss_name not in ("mse", "cosent", "infonce"):
        raise ValueError(f"unknown loss {loss_name!r}")
    sizes = matryoshka_dims or [None]
    size_weights = matryoshka_weights or [1.0] * len(sizes)
    if false_negative_margin is not None and loss_name != "infonce":
        raise ValueError("a false-negative margin applies to the InfoNCE loss only")
    if len(size_weights) != len(sizes):
        raise ValueError(f"{len(size_weights)} Matryoshka weights for {len(sizes)} sizes")
    if loss_name == "infonce" and gather:
        positives = batch.get("positives", len(query_embeddings))  # documents before the hard negatives
        query_embeddings, weight = gather_batch_part(query_embeddings, weight, len(query_embeddings))
        doc_embeddings, doc_ids = gather_batch_part(doc_embeddings, doc_ids, positives)
    total = 0.0
    for dim, size_weight in zip(sizes, size_weights):
        queries, documents = query_embeddings[:, :dim], doc_embeddings[:, :dim]
        if loss_name == "mse":
            loss = weighted_mse_loss(queries, documents, rel, weight)
        elif loss_name == "cosent":
            loss = cosent_loss(queries, documents, rel, weight)
        else:
            loss = infonce_loss(queries, documents, weight, doc_ids, temperature, false_negative_margin, statistics)
        total = total + size_weight * loss
    return total


# ---------------------------------------------------------------- every rank's negatives (torchrun)

def gather_batch_part(embeddings, values, positives):
    """Every rank's rows of a query or document batch, arranged as one process with the whole batch
    would hold them: all ranks' first ``positives`` rows (the queries, or the positives in query
    order), then all ranks' remaining rows (hard negatives). ``values`` (rows,) travel along."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return embeddings, values
    local_sizes = torch.tensor([[len(values), int(positives)]], device=values.device)
    embeddings = gather_keeping_local_gradients(embeddings)
    values = gather_keeping_local_gradients(values)
    first, rest, start = [], [], 0
    for rows, leading in gather_keeping_local_gradients(local_sizes).tolist():  # (rows, positives) per rank
        first.append(torch.arange(start, start + leading))
        rest.append(torch.arange(start + leading, start + rows))
        start += rows
    arrangement = torch.cat(first + rest).to(embeddings.device)
    return embeddings[arrangement], values[arrangement]


def gather_keeping_local_gradients(tensor):
    """All ranks' rows of ``tensor`` (rows may differ per rank), in rank order. This rank's rows keep
    their autograd graph; the others arrive as constants.

    Every rank then computes the same whole-batch loss, and the gradient reaching its own embeddings
    is the whole-batch loss's gradient for them. DDP averages gradients over ranks, so the caller
    multiplies the loss it backpropagates by the world size to get the whole-batch gradient.
    """
    world_size, rank = dist.get_world_size(), dist.get_rank()
    count = torch.tensor([tensor.shape[0]], device=tensor.device)
    counts = [torch.zeros_like(count) for _ in range(world_size)]
    dist.all_gather(counts, count)
    largest = int(max(counts))
    padded = torch.zeros((largest, *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
    padded[:tensor.shape[0]] = tensor.detach()
    gathered = [torch.empty_like(padded) for _ in range(world_size)]
    dist.all_gather(gathered, padded)
    gathered[rank] = tensor
    return torch.cat([part[:int(n)] for part, n in zip(gathered, counts)])
