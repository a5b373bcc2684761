"""``--extend-vocab``: find what the tokenizer maps to [UNK] and add it as new tokens.

An English vocabulary turns most Chinese characters and every emoji into [UNK]; the
model then cannot tell "好" from "坏". Adding the frequent unknown pieces as tokens
gives each its own embedding: ``fit_embeddings_to_tokenizer`` starts the new rows where
``--new-token-init`` says (placed from their neighbours by default), and training
(``--new-token-lr``, ``--mlm-adapt-steps``) gives them meaning.
"""
import collections
import re

import numpy as np
import torch
from tokenizers import AddedToken

from common.choices import MIN_COOCCURRENCE_COUNT
from common.data import backend_tokenizer
from common.text import EMOJI_PATTERN

# A span that became [UNK] is cut into emoji sequences and single characters, so one
# unknown emoji inside a known word ("abc😀") adds "😀", never the whole word.
UNIT_PATTERN = re.compile(f"{EMOJI_PATTERN.pattern}|.", re.DOTALL)


def _normalize(backend, piece):
    """The piece as the tokenizer's normalizer rewrites it (lowercase, accents, control
    characters): added tokens are matched against normalized text, so we add this form."""
    if backend.normalizer is None:
        return piece
    return backend.normalizer.normalize_str(piece).strip()


def unknown_spans(tokenizer, texts):
    """Yield the original substring behind every [UNK] the tokenizer produces for ``texts``."""
    backend = backend_tokenizer(tokenizer)
    unk_id = tokenizer.unk_token_id
    if unk_id is None:
        return
    for text, encoding in zip(texts, backend.encode_batch(list(texts), add_special_tokens=False)):
        for token_id, (start, end) in zip(encoding.ids, encoding.offsets):
            if token_id == unk_id and end > start:
                yield text[start:end]


def find_unknown_tokens(tokenizer, texts, min_count):
    """``[(token, count)]``: pieces mapped to [UNK] that occur at least ``min_count`` times.

    Each [UNK] span (a whole pre-tokenized word for BERT) is cut into emoji sequences
    and characters; a unit is kept only when it is itself unknown, in the form the
    tokenizer's normalizer gives it. Most frequent first, ties in code-point order.
    """
    backend = backend_tokenizer(tokenizer)
    is_unknown = {}
    counts = collections.Counter()
    for span in unknown_spans(tokenizer, texts):
        for unit in UNIT_PATTERN.findall(span):
            if unit not in is_unknown:
                is_unknown[unit] = _is_unknown(tokenizer, backend, unit)
            if is_unknown[unit]:
                counts[_normalize(backend, unit)] += 1
    counts.pop("", None)
    frequent = [(token, count) for token, count in counts.items() if count >= min_count]
    return sorted(frequent, key=lambda item: (-item[1], item[0]))


def _is_unknown(tokenizer, backend, unit):
    """Whether ``unit`` on its own tokenizes to anything containing [UNK]."""
    ids = backend.encode(unit, add_special_tokens=False).ids
    return bool(ids) and tokenizer.unk_token_id in ids


def extend_vocabulary(tokenizer, texts, min_count):
    """Add the frequent unknown pieces of ``texts`` to ``tokenizer``; return what was added.

    Tokens are added as normal (not special) tokens matched after normalization, so
    they are saved by ``save_pretrained`` and survive lowercasing / accent stripping.
    """
    tokens = [token for token, _ in find_unknown_tokens(tokenizer, texts, min_count)]
    if tokens:
        tokenizer.add_tokens([AddedToken(token, normalized=True, single_word=False) for token in tokens])
    return tokens


def unk_rate(tokenizer, texts):
    """Share of the tokens of ``texts`` (special tokens excluded) that are [UNK]."""
    backend = backend_tokenizer(tokenizer)
    unknown = total = 0
    for encoding in backend.encode_batch(list(texts), add_special_tokens=False):
        unknown += encoding.ids.count(tokenizer.unk_token_id)
        total += len(encoding.ids)
    return unknown / total if total else 0.0



def extend_for_training(tokenizer, texts, min_count):
    """--extend-vocab for a trainer: add the frequent [UNK] pieces of ``texts`` and say what changed."""
    before = unk_rate(tokenizer, texts)
    added = extend_vocabulary(tokenizer, texts, min_count)
    print(f"--extend-vocab {min_count}: added {len(added)} tokens, e.g. {added[:20]}; [UNK] rate of the "
          f"training texts {before:.2%} before, {unk_rate(tokenizer, texts):.2%} after")
    return added


def fit_embeddings_to_tokenizer(backbone, tokenizer, init, texts=()):
    """Grow the input embeddings to ``len(tokenizer)`` after --extend-vocab; return how many rows were added.

    ``init`` (--new-token-init) is where the added rows start:
      cooccurrence predicted from which tokens each new one appears beside in ``texts`` (see
                   ``cooccurrence_rows``), so tokens used alike start alike; rows of tokens seen under
                   MIN_COOCCURRENCE_COUNT times start random (the trainers' default)
      random       N(0, initializer_range), as the pretrained rows once started
      mean         the mean of the existing rows (transformers' resize_token_embeddings default)
      unk          a copy of the [UNK] row, so that at step 0 the model computes what the base model did
    "mean" and "unk" start every new token as the same vector, and training has to break the tie.
    On 4k Chinese reviews with all-MiniLM-L6-v2 and ~2,000 added characters (bench/quality.py,
    3 seeds) random rows reached 77.9% +- 1.1 test accuracy, mean rows 73.0% +- 4.8. What cooccurrence rows
    gain over those (little for the classifier, about 0.12 NDCG@10 for train_vector.py) is measured in
    bench/README.md, "Added rows placed from their neighbours".
    The embedding module remembers where the added rows begin (``first_added_row``) for --new-token-lr.
    """
    old_rows = backbone.get_input_embeddings().num_embeddings
    added = len(tokenizer) - old_rows
    if added <= 0:
        return 0
    backbone.resize_token_embeddings(len(tokenizer), mean_resizing=init == "mean")
    embeddings = backbone.get_input_embeddings()
    new_rows = embeddings.weight.data[old_rows:]
    if init in ("random", "cooccurrence"):
        new_rows.normal_(0.0, getattr(backbone.config, "initializer_range", 0.02))
    elif init == "unk" and tokenizer.unk_token_id is not None:
        new_rows.copy_(embeddings.weight.data[tokenizer.unk_token_id])
    if init == "cooccurrence":
        placed = cooccurrence_rows(embeddings.weight.data, old_rows, tokenizer, texts)
        left = f"; the other {added - placed} start random (too little context)" if placed < added else ""
        print(f"--new-token-init cooccurrence: {placed} of {added} added rows placed from their neighbours "
              f"in {len(texts)} texts{left}")
    embeddings.first_added_row = old_rows
    return added


COOCCURRENCE_WINDOW = 4  # tokens on each side that count as a token's context
COOCCURRENCE_DIMENSIONS = 64  # size of the SVD of the PPMI matrix (capped by the tokens seen)
# Counting stops after this many tokens of text (in the given order): the pairs cost 16 bytes each,
# 2 x COOCCURRENCE_WINDOW per token, and a few million tokens already give every frequent token its context
MAX_COOCCURRENCE_TOKENS = 5_000_000


def cooccurrence_rows(weight, first_new_row, tokenizer, texts):
    """Overwrite the added rows of ``weight`` that occur in ``texts`` with rows predicted from their context;
    return how many were placed.

    Every token gets a vector from the SVD of its positive-PMI co-occurrence counts (the classic
    count-based word embedding); a ridge map from that space to the pretrained rows is fitted on the
    pretrained tokens seen in ``texts`` and applied to the added ones, each scaled to the pretrained rows'
    median norm. The idea of WECHSEL and FOCUS (new rows from the embeddings of old tokens that appear in
    the same contexts), with a count-based space fitted on the run's own texts instead of a downloaded one.
    """
    from sklearn.linear_model import Ridge
    sequences = token_sequences(tokenizer, texts, MAX_COOCCURRENCE_TOKENS)
    counts = np.bincount(np.concatenate(sequences + [np.zeros(0, np.int64)]), minlength=weight.shape[0])
    special = set(tokenizer.all_special_ids)
    frequent = np.array([token for token in np.flatnonzero(counts >= MIN_COOCCURRENCE_COUNT)
                         if token not in special])
    anchors = frequent[frequent < first_new_row]
    targets = frequent[frequent >= first_new_row]
    if len(anchors) < 2 or len(targets) == 0:
        return 0
    vectors = context_vectors(sequences, frequent, weight.shape[0])
    anchor_rows = weight[anchors].float().cpu().numpy()
    ridge = Ridge(alpha=1.0).fit(vectors[:len(anchors)], anchor_rows)
    predicted = ridge.predict(vectors[len(anchors):])
    median_norm = np.median(np.linalg.norm(weight[:first_new_row].float().cpu().numpy(), axis=1))
    predicted *= median_norm / np.maximum(np.linalg.norm(predicted, axis=1, keepdims=True), 1e-12)
    weight[targets] = torch.as_tensor(predicted, dtype=weight.dtype, device=weight.device)
    return len(targets)


def token_sequences(tokenizer, texts, max_tokens):
    """The token ids of ``texts`` (no special tokens), in order, until ``max_tokens`` tokens are collected."""
    backend, texts, sequences, collected = backend_tokenizer(tokenizer), list(texts), [], 0
    for start in range(0, len(texts), 1000):
        for encoding in backend.encode_batch(list(texts[start:start + 1000]), add_special_tokens=False):
            if collected >= max_tokens:
                return sequences
            sequences.append(np.asarray(encoding.ids, dtype=np.int64))
            collected += len(encoding.ids)
    return sequences


def context_vectors(sequences, tokens, vocabulary_size):
    """One unit-length vector per token of ``tokens`` (in that order): the truncated SVD of the positive
    pointwise mutual information between tokens within ``COOCCURRENCE_WINDOW`` positions of each other."""
    from scipy import sparse
    from sklearn.decomposition import TruncatedSVD
    from sklearn.preprocessing import normalize
    row_of = np.full(vocabulary_size, -1, dtype=np.int64)  # token id -> its row, -1 for tokens left out
    row_of[tokens] = np.arange(len(tokens))
    left, right = [], []
    for sequence in sequences:
        indices = row_of[sequence]
        for offset in range(1, COOCCURRENCE_WINDOW + 1):
            pair_left, pair_right = indices[:-offset], indices[offset:]
            kept = (pair_left >= 0) & (pair_right >= 0)
            left.append(pair_left[kept])
            right.append(pair_right[kept])
    left, right = np.concatenate(left), np.concatenate(right)
    size = len(tokens)
    counts = sparse.coo_matrix((np.ones(len(left)), (left, right)), shape=(size, size)).tocsr()
    counts = (counts + counts.T).tocoo()
    total = counts.sum()
    marginal = np.asarray(counts.sum(axis=1)).ravel()
    pmi = np.log(counts.data * total / (marginal[counts.row] * marginal[counts.col]))
    ppmi = sparse.csr_matrix((np.maximum(pmi, 0.0), (counts.row, counts.col)), shape=(size, size))
    dimensions = max(1, min(COOCCURRENCE_DIMENSIONS, size - 1))
    return normalize(TruncatedSVD(dimensions, random_state=0).fit_transform(ppmi))

