"""Hard-negative mining for ``train_vector.py --mode mine``: retrieve candidates for each query, keep
the ones in a rank window that are neither known positives nor likely false negatives, and draw
the negatives from them (as FlagEmbedding's hn_mine, with a positive-aware margin).

Scorers give a (queries, corpus) score matrix: ``embedding_scorer`` (cosine of the model's
embeddings) or ``bm25_scorer`` (rank_bm25's Okapi BM25, scores divided by each query's top score
so the margin reads on a 0..1 scale either way).
"""
import json
import random
import re
from dataclasses import dataclass

import numpy as np

from common.errors import UserError
from common.pairs import QueryGroup

# a word of letters/digits, or one CJK character (Chinese text has no spaces between words)
BM25_TOKEN = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]|[^\W_]+", re.UNICODE)
# a passage that quotes a query this long word for word is its source or a copy of it (inverse-cloze
# data: another query's document holds this query's sentence), never a negative; shorter queries
# ("好", "python") occur in unrelated passages, so only an identical text is left out for them
QUOTED_QUERY_CHARACTERS = 10


@dataclass
class MiningReport:
    """How many candidates each filter removed, and what was written."""
    candidates: int = 0
    known_positive: int = 0
    query_text: int = 0
    likely_false_negative: int = 0
    written: int = 0
    short_queries: int = 0  # queries left with fewer than the asked number of negatives

    def lines(self, first, last, margin, negative_number, queries):
        return [f"candidates at ranks {first}-{last}: {self.candidates} for {queries} queries",
                f"  removed {self.known_positive} known positives",
                f"  removed {self.query_text} identical to their query or quoting it "
                f"({QUOTED_QUERY_CHARACTERS}+ characters)",
                f"  removed {self.likely_false_negative} likely false negatives (score above the query's lowest "
                f"positive score - {margin})",
                f"wrote {self.written} negatives ({self.short_queries} queries have fewer than {negative_number})"]


def bm25_tokens(text):
    return BM25_TOKEN.findall(text.lower())


def bm25_scorer(corpus, source="the corpus"):
    """score(queries, prompts) -> (queries, corpus) BM25 scores, each row divided by its highest score
    (an instruction is no evidence of relevance: prompts are left out). ``source`` names the corpus's
    files for an error."""
    try:
        from rank_bm25 import BM25Okapi
    except ImportError:
        raise UserError("--miner bm25 needs the rank-bm25 package (pip install rank-bm25)") from None
    documents = [bm25_tokens(text) for text in corpus]
    if not any(documents):  # rank_bm25 divides by the number of distinct words
        raise UserError(f"--miner bm25: no passage of {source} has a word or CJK character to index (only "
                        "punctuation or symbols); use --miner model")
    index = BM25Okapi(documents)

    def score(queries, prompts=None):
        rows = np.stack([index.get_scores(bm25_tokens(query)) for query in queries]).astype(np.float32)
        return rows / np.maximum(rows.max(axis=1, keepdims=True), 1e-12)
    return score


def embedding_scorer(model, corpus, batch_size=64):
    """score(queries, prompts) -> (queries, corpus) cosine similarities of the model's query and document
    embeddings; a query's own prompt replaces the stored query instruction, as in training."""
    documents = model.encode(corpus, batch_size=batch_size, side="document").numpy()  # (corpus, dim)

    def score(queries, prompts=None):
        return model.encode(queries, batch_size=batch_size, side="query", prompts=prompts).numpy() @ documents.T
    return score


def mine_hard_negatives(groups, corpus, score, rank_range, negative_number, margin, seed, queries_per_block=256):
    """(mined QueryGroups, MiningReport): each group's positives and prompt kept, its negatives drawn
    from its candidates at ranks ``rank_range`` (1-based, inclusive) of ``corpus``.

    A candidate is left out when it is one of the query's positives, the query's own text (or quotes
    it, see QUOTED_QUERY_CHARACTERS), or
    scores above (the query's lowest positive score - ``margin``): a passage the retriever ranks
    with the known answers is more likely unlabelled relevant than negative. ``corpus`` must hold
    the positives (their scores set the margin). The draw depends on ``seed`` and the query's
    position only. ``score(queries, prompts)`` returns (queries, len(corpus)) scores (``prompts``: each
    group's own instruction, or None).
    """
    first, last = rank_range
    row_of = {text: row for row, text in enumerate(corpus)}
    report, mined = MiningReport(), []
    for start in range(0, len(groups), queries_per_block):
        block = groups[start:start + queries_per_block]
        # (block, corpus); the model adds its stored instruction where a group has no prompt of its own
        scores = score([group.query for group in block], [group.prompt for group in block])
        for offset, (group, row_scores) in enumerate(zip(block, scores)):
            ranked = np.argsort(-row_scores, kind="stable")[first - 1:last]  # ties: corpus order
            kept = filter_candidates(group, ranked, row_scores, row_of, corpus, margin, report)
            draw = random.Random(f"{seed}-{start + offset}")
            chosen = sorted(draw.sample(range(len(kept)), min(negative_number, len(kept))))
            negatives = [corpus[kept[index]] for index in chosen]  # in rank order
            report.written += len(negatives)
            report.short_queries += len(negatives) < negative_number
            mined.append(QueryGroup(group.query, list(group.positives), negatives, group.locator,
                                    prompt=group.prompt))
    return mined, report


def filter_candidates(group, ranked, row_scores, row_of, corpus, margin, report):
    """The corpus rows of ``ranked`` that may be negatives of ``group``; counts each removal in ``report``."""
    positives = set(group.positives)
    lowest_positive = min(float(row_scores[row_of[text]]) for text in group.positives)
    kept = []
    for row in ranked:
        text = corpus[row]
        report.candidates += 1
        if text in positives:
            report.known_positive += 1
        elif quotes_query(text, group.query):
            report.query_text += 1
        elif float(row_scores[row]) > lowest_positive - margin:
            report.likely_false_negative += 1
        else:
            kept.append(int(row))
    return kept


def build_corpus(groups, extra_texts=()):
    """The distinct texts negatives come from: ``extra_texts`` (a --corpus), then every passage of the
    groups (positives included: their scores set the false-negative margin)."""
    texts = list(extra_texts) + [text for group in groups for text in (*group.positives, *group.negatives)]
    return list(dict.fromkeys(texts))


def format_query_groups(groups):
    """JSONL text of query groups in FlagEmbedding's format ({"query", "pos", "neg"}, "prompt" if any)."""
    lines = []
    for group in groups:
        record = {"query": group.query, "pos": group.positives, "neg": group.negatives}
        if group.prompt is not None:
            record["prompt"] = group.prompt
        lines.append(json.dumps(record, ensure_ascii=False))
    return "\n".join(lines) + "\n"


def quotes_query(text, query):
    """Whether ``text`` is the query itself, or holds a query of QUOTED_QUERY_CHARACTERS or more verbatim."""
    return text == query or (len(query.strip()) >= QUOTED_QUERY_CHARACTERS and query.strip() in text)
