"""The values scripts' options offer whose implementation needs torch, defined here without it.

A script builds its parser, and so answers ``--help``, before it imports torch (which takes
seconds); the modules that implement these choices import them from here, so each is written once.
"""

POOLINGS = ("cls", "mean", "max", "pooler")  # heads.py: classifier and long-document models
VECTOR_POOLINGS = ("cls", "mean")  # vector.py
# vector.py: how a model trained with --matryoshka-dims turns its embeddings before they are cut (pca: the
# strongest directions of the training texts' embeddings first; none: the values as the encoder gives them)
MATRYOSHKA_ROTATIONS = ("pca", "none")
PAIR_LOSSES = ("mse", "cosent", "infonce")  # pair_losses.py: the vector trainer's --loss
AGGREGATIONS = ("mean", "max", "logsumexp")  # longdoc.py: chunk logits -> document logits
# longdoc.py: spread: evenly spaced windows from first to last (a sample of the whole document);
# head-tail: the first half and the last half of the cap; head: the first windows only
CHUNK_SELECTIONS = ("spread", "head-tail", "head")
# generation.py: every sequence is a row of one generate() batch: a million of them exhausts memory,
# not the model
MAX_RETURN_SEQUENCES = 64
# vocab.py: --new-token-init cooccurrence places an added token seen at least this often in the texts; a token
# seen fewer times has too little context for a vector and starts random
MIN_COOCCURRENCE_COUNT = 3
# problem_types.py: what the classification head predicts (stored as toolkit["problem_type"];
# a model directory without it is single_label); rerank: a query/document pair scored by one logit
# (common/reranking.py)
PROBLEM_TYPES = ("single_label", "multi_label", "regression", "rerank")
THRESHOLD_STRATEGIES = ("per_label", "global")  # problem_types.py: multi-label thresholds tuned on validation
REGRESSION_LOSSES = ("mse", "huber")
RERANK_LOSSES = ("pointwise", "listwise")  # reranking.py: BCE on graded relevance, softmax over a group
# validation metrics that can pick the best model (--metric-for-best-model), per problem type;
# the first is the default. metrics.selection_mode says which are minimised.
SINGLE_LABEL_METRICS = ("macro_f1", "accuracy", "weighted_f1", "loss", "macro_precision", "macro_recall",
                        "weighted_precision", "weighted_recall")
MULTI_LABEL_METRICS = ("micro_f1", "macro_f1", "weighted_f1", "samples_f1", "subset_accuracy", "hamming_loss",
                       "loss")
REGRESSION_METRICS = ("rmse", "mae", "pearson", "spearman", "loss")
RERANK_METRICS = ("ndcg@10", "mrr@10", "map@10", "recall@10", "loss")  # ranking.py, each query's documents
METRICS_BY_PROBLEM_TYPE = {"single_label": SINGLE_LABEL_METRICS, "multi_label": MULTI_LABEL_METRICS,
                           "regression": REGRESSION_METRICS, "rerank": RERANK_METRICS}
