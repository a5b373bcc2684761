"""GradCache (Gao et al., 2021): a contrastive batch of any size in about the memory of one chunk.

The loss of a contrastive batch needs every embedding at once, but its gradient reaches the
encoder only through the embeddings. So: (1) embed the batch chunk by chunk without a graph;
(2) compute the loss on all the embeddings and backpropagate it to them only (cheap: no encoder);
(3) embed each chunk again, now with a graph, and backpropagate the cached gradient of its
embeddings through the encoder. Step (3) replays the random state each chunk had in step (1), so
dropout draws the same masks and the gradients are those of the plain batch.
"""
import contextlib

import torch


def split_rows(features, chunk_size):
    """Token features (batch, seq) cut into chunks of ``chunk_size`` rows, each trimmed to its own
    longest text (the batch was padded to its longest)."""
    chunks = []
    for start in range(0, len(features["input_ids"]), chunk_size):
        chunk = {key: value[start:start + chunk_size] for key, value in features.items()}
        length = int(chunk["attention_mask"].sum(dim=1).max())
        chunks.append({key: value[:, :length] for key, value in chunk.items()})
    return chunks


def capture_random_state(device):
    """The CPU (and this CUDA device's) random state, to replay a chunk's dropout masks."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


@contextlib.contextmanager
def replayed_random_state(state, device):
    """Run with ``state`` restored, leaving the random stream as it was outside."""
    cpu, cuda = state
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, device)
        yield


def grad_cache_backward(pair_encoder, query, document, chunk_size, compute_loss, backward, autocast, sync_gradients,
                        device):
    """One contrastive batch's loss, its gradients accumulated chunk by chunk; returns the loss (detached).

    ``pair_encoder(query, document)`` embeds either side (None: skipped); ``compute_loss(query
    embeddings, document embeddings)`` is the batch loss; ``backward(loss)`` backpropagates it (the
    loop's scaled backward: the cached gradients carry the scale, the replays add none);
    ``autocast()`` is the forward precision context; ``sync_gradients(is_last)`` the DDP context
    of a replay (gradients are all-reduced on the last one only).
    """
    chunks = [(chunk, None) for chunk in split_rows(query, chunk_size)] + \
             [(None, chunk) for chunk in split_rows(document, chunk_size)]
    # ---- 1. every embedding without a graph, with the random state each chunk started from
    states, embeddings = [], []
    with torch.no_grad():
        for query_chunk, document_chunk in chunks:
            states.append(capture_random_state(device))
            with autocast():
                query_part, document_part = pair_encoder(query_chunk, document_chunk)
            embeddings.append(query_part if query_part is not None else document_part)
    query_count = sum(1 for query_chunk, _ in chunks if query_chunk is not None)
    query_embeddings = torch.cat(embeddings[:query_count]).detach().requires_grad_()
    doc_embeddings = torch.cat(embeddings[query_count:]).detach().requires_grad_()
    # ---- 2. the loss on all embeddings; its gradient for each embedding
    loss = compute_loss(query_embeddings, doc_embeddings)
    backward(loss)
    cached = list(torch.split(query_embeddings.grad, chunk_size)) + list(torch.split(doc_embeddings.grad, chunk_size))
    # ---- 3. replay each chunk with a graph; backpropagate its cached gradient through the encoder
    for index, ((query_chunk, document_chunk), state, gradient) in enumerate(zip(chunks, states, cached)):
        with sync_gradients(index == len(chunks) - 1), replayed_random_state(state, device):
            with autocast():
                query_part, document_part = pair_encoder(query_chunk, document_chunk)
            part = query_part if query_part is not None else document_part
            # d(sum embedding * cached gradient)/d(weights) is the chain rule's share of this chunk
            torch.sum(part.float() * gradient).backward()
    return loss.detach()
