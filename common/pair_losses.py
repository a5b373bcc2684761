"""Losses of the vector trainer: weighted MSE of cosine against the graded relevance (the default),
CoSENT (rank pairs by relevance) and InfoNCE over in-batch negatives (their --loss names:
choices.PAIR_LOSSES)."""
import torch
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


def infonce_loss(query_embeddings, doc_embeddings, weight, doc_ids, temperature=0.05):
    """In-batch-negative InfoNCE: each query's own document against the batch's other documents.

    A document that appears twice in the batch is not a negative for its other query.
    """
    queries = F.normalize(query_embeddings.float(), dim=-1)
    documents = F.normalize(doc_embeddings.float(), dim=-1)
    logits = queries @ documents.T / temperature  # (batch, batch)
    duplicate = (doc_ids[:, None] == doc_ids[None, :]) & ~torch.eye(len(doc_ids), dtype=torch.bool,
                                                                   device=logits.device)
    logits = logits.masked_fill(duplicate, float("-inf"))
    targets = torch.arange(len(doc_ids), device=logits.device)
    losses = F.cross_entropy(logits, targets, reduction="none")  # (batch,)
    return torch.sum(weight * losses) / weight.sum().clamp(min=1e-12)


def compute_pair_loss(loss_name, query_embeddings, doc_embeddings, batch, temperature):
    """The training objective chosen by ``--loss`` on one batch of embeddings."""
    rel, weight = batch["rel"].to(query_embeddings.device), batch["weight"].to(query_embeddings.device)
    if loss_name == "mse":
        return weighted_mse_loss(query_embeddings, doc_embeddings, rel, weight)
    if loss_name == "cosent":
        return cosent_loss(query_embeddings, doc_embeddings, rel, weight)
    if loss_name == "infonce":
        return infonce_loss(query_embeddings, doc_embeddings, weight, batch["doc_id"].to(query_embeddings.device),
                            temperature)
    raise ValueError(f"unknown loss {loss_name!r}")
