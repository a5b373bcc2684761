"""The values scripts' options offer whose implementation needs torch, defined here without it.

A script builds its parser, and so answers ``--help``, before it imports torch (which takes
seconds); the modules that implement these choices import them from here, so each is written once.
"""

POOLINGS = ("cls", "mean", "max", "pooler")  # heads.py: classifier and long-document models
VECTOR_POOLINGS = ("cls", "mean")  # vector.py
PAIR_LOSSES = ("mse", "cosent", "infonce")  # pair_losses.py: the vector trainer's --loss
AGGREGATIONS = ("mean", "max", "logsumexp")  # longdoc.py: chunk logits -> document logits
# longdoc.py: spread: evenly spaced windows from first to last (a sample of the whole document);
# head-tail: the first half and the last half of the cap; head: the first windows only
CHUNK_SELECTIONS = ("spread", "head-tail", "head")
# generation.py: every sequence is a row of one generate() batch: a million of them exhausts memory,
# not the model
MAX_RETURN_SEQUENCES = 64
# train_classifier.py --problem-type: what one example's label is (rerank: a query/document pair
# scored by one logit, common/reranking.py)
PROBLEM_TYPES = ("single_label", "rerank")
RERANK_LOSSES = ("pointwise", "listwise")  # reranking.py: BCE on graded relevance, softmax over a group
