"""Issue 15, trainer side, on a tiny BERT: --false-negative-margin (GISTEmbed-style masking of InfoNCE
negatives that score near the positive) and --metric-for-best-model (checkpoint-best, early stopping,
the best record, --select_best and --resume by validation NDCG or MRR instead of the loss)."""
import json

import pytest
import torch
import torch.nn.functional as F

import train_vector
from common.pair_losses import compute_pair_loss, false_negative_mask, infonce_loss
from common.vector import PairEncoder
from conftest import assert_one_error_line, write_jsonl
from test_vector import pair_records
from test_vector_negatives import assert_grad_cache_matches_the_plain_batch, group_batch, tiny_vector_model


def unit(*rows):
    return F.normalize(torch.tensor(rows, dtype=torch.float32), dim=-1)


def todays_infonce(queries, documents, weight, doc_ids, temperature):
    """The loss as it was before the margin existed (the reference for margin None)."""
    queries, documents = F.normalize(queries.float(), dim=-1), F.normalize(documents.float(), dim=-1)
    logits = queries @ documents.T / temperature
    batch_size = len(queries)
    duplicate = doc_ids[:batch_size, None] == doc_ids[None, :]
    duplicate[:, :batch_size] &= ~torch.eye(batch_size, dtype=torch.bool)
    losses = F.cross_entropy(logits.masked_fill(duplicate, float("-inf")), torch.arange(batch_size), reduction="none")
    return torch.sum(weight * losses) / weight.sum()


# two queries, their positives, then a near-copy of query 0's positive and a clearly different text
QUERIES = unit([1.0, 0.0, 0.0], [0.0, 1.0, 0.0])
DOCUMENTS = unit([0.9, 0.1, 0.0], [0.1, 0.9, 0.1], [0.92, 0.05, 0.1], [0.0, 0.0, 1.0])
DOC_IDS = torch.arange(4)


# ---------------------------------------------------------------- the mask

def test_a_near_duplicate_negative_is_masked_and_a_clearly_different_one_is_not():
    mask = false_negative_mask(QUERIES @ DOCUMENTS.T, 0.1)  # (queries, documents)
    assert mask.tolist() == [[False, False, True, False], [False, False, False, False]]
    # the masked loss is the loss without the near-copy; the far negative still counts
    statistics = {}
    masked = infonce_loss(QUERIES, DOCUMENTS, torch.ones(2), DOC_IDS, 0.05, 0.1, statistics)
    without = torch.stack([F.cross_entropy((QUERIES[:1] @ DOCUMENTS[[0, 1, 3]].T) / 0.05, torch.tensor([0])),
                           F.cross_entropy((QUERIES[1:] @ DOCUMENTS.T) / 0.05, torch.tensor([1]))]).mean()
    assert float(masked) == pytest.approx(float(without), rel=1e-6)
    assert statistics == {"in_batch_masked": 0, "in_batch_negatives": 2, "hard_masked": 1, "hard_negatives": 4}


def test_the_mask_takes_no_gradient_and_frees_the_near_copy():
    def gradients(margin, leave_out=None):
        documents = DOCUMENTS.clone().requires_grad_()
        if leave_out is None:
            loss = infonce_loss(QUERIES, documents, torch.ones(2), DOC_IDS, 0.05, margin)
        else:  # by hand: query 0's softmax without the near-copy
            logits = (QUERIES @ documents.T / 0.05).masked_fill(leave_out, float("-inf"))
            loss = F.cross_entropy(logits, torch.arange(2))
        loss.backward()
        return documents.grad
    by_hand = torch.zeros(2, 4, dtype=torch.bool)
    by_hand[0, 2] = True
    masked = gradients(0.1)
    assert torch.allclose(masked, gradients(None, by_hand), atol=1e-7)  # the mask itself adds no gradient
    assert masked[2].norm() < 0.01 * gradients(None)[2].norm()  # no longer pushed away from query 0


def test_an_in_batch_sibling_is_masked():
    """Two queries of one paragraph: each one's positive nearly equals the other's (the pydoc case)."""
    queries = unit([1.0, 0.1, 0.0], [1.0, -0.1, 0.0], [0.0, 0.0, 1.0])
    documents = unit([1.0, 0.0, 0.05], [1.0, 0.0, -0.05], [0.0, 0.2, 1.0])
    statistics = {}
    mask = false_negative_mask(queries @ documents.T, 0.1)
    assert mask.tolist() == [[False, True, False], [True, False, False], [False, False, False]]
    infonce_loss(queries, documents, torch.ones(3), torch.arange(3), 0.05, 0.1, statistics)
    assert statistics == {"in_batch_masked": 2, "in_batch_negatives": 6, "hard_masked": 0, "hard_negatives": 0}


def test_margin_none_gives_exactly_todays_loss():
    generator = torch.Generator().manual_seed(0)
    queries, documents = torch.randn(5, 8, generator=generator), torch.randn(9, 8, generator=generator)
    doc_ids = torch.tensor([0, 1, 2, 3, 4, 5, 0, 7, 8])  # a copy of query 0's positive among the hard negatives
    weight = torch.tensor([1.0, 0.5, 2.0, 1.0, 1.0])
    batch = {"rel": torch.ones(5), "weight": weight, "doc_id": doc_ids}
    expected = todays_infonce(queries, documents, weight, doc_ids, 0.05)
    assert torch.equal(infonce_loss(queries, documents, weight, doc_ids, 0.05), expected)
    assert torch.equal(compute_pair_loss("infonce", queries, documents, batch, 0.05, false_negative_margin=None),
                       expected)


def test_the_mask_is_decided_per_matryoshka_size():
    """Document 2 is a near-copy of query 0's positive in the first two values only."""
    queries = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]])
    documents = torch.tensor([[1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.0, 1.0], [1.0, 0.0, -3.0, 0.0]])
    batch = {"rel": torch.ones(2), "weight": torch.ones(2), "doc_id": torch.arange(3)}
    statistics = {}
    loss = compute_pair_loss("infonce", queries, documents, batch, 0.05, [4, 2], false_negative_margin=0.1,
                             statistics=statistics)
    assert statistics["hard_masked"] == 1 and statistics["hard_negatives"] == 4  # 2 queries x 1 negative x 2 sizes
    full = infonce_loss(queries, documents, torch.ones(2), torch.arange(3), 0.05, 0.1)
    short = infonce_loss(queries[:, :2], documents[:, :2], torch.ones(2), torch.arange(3), 0.05, 0.1)
    assert float(loss) == pytest.approx(float(full + short), rel=1e-6)
    assert float(full) == pytest.approx(float(infonce_loss(queries, documents, torch.ones(2), torch.arange(3), 0.05)))


def test_the_margin_is_for_infonce_only():
    with pytest.raises(ValueError, match="InfoNCE"):
        compute_pair_loss("mse", QUERIES, DOCUMENTS[:2], {"rel": torch.ones(2), "weight": torch.ones(2),
                                                          "doc_id": torch.arange(2)}, 0.05, false_negative_margin=0.1)


@pytest.mark.parametrize("chunk", [1, 4])
def test_grad_cache_gives_the_plain_batch_gradients_with_the_mask(tiny_model_dir, chunk):
    model = PairEncoder(tiny_vector_model(tiny_model_dir, dropout=0.0)).train()
    batch = group_batch(model.encoder)
    with torch.no_grad():  # a margin that leaves out some negatives of this batch, not all
        query_embeddings, doc_embeddings = model(batch["query"], batch["document"])
        cosines = F.normalize(query_embeddings, dim=-1) @ F.normalize(doc_embeddings, dim=-1).T
        gaps = cosines.diagonal()[:, None] - cosines
        gaps = gaps[gaps > 0].sort().values
        # halfway between two neighbouring gaps: no gap sits at the margin, where the chunked embeddings'
        # rounding (threads, batch shapes) could flip it in one pass and not the other
        middle = len(gaps) // 2
        margin = float(gaps[middle - 1] + gaps[middle]) / 2
    counted = []

    def loss_of(query_embeddings, doc_embeddings):
        counted.append({})
        return compute_pair_loss("infonce", query_embeddings, doc_embeddings, batch, 0.05, [32, 8],
                                 false_negative_margin=margin, statistics=counted[-1])
    assert_grad_cache_matches_the_plain_batch(model, batch, chunk, loss_of)
    assert counted[0] == counted[1]  # the mask saw the whole batch both ways
    masked = counted[0]["in_batch_masked"] + counted[0]["hard_masked"]
    assert 0 < masked < counted[0]["in_batch_negatives"] + counted[0]["hard_negatives"]


# ---------------------------------------------------------------- the flags

def train_argv(tiny_model_dir, data_dir, output_dir, *extra):
    train = write_jsonl(data_dir / "train.jsonl", pair_records())
    val = write_jsonl(data_dir / "val.jsonl", pair_records(" news"))
    argv = ["--mode", "train", "--train-path", train, "--val-path", val, "--model-name", tiny_model_dir,
            "--max-length", "16", "--batch-size", "3", "--epochs", "2", "--learning-rate", "5e-3", "--warmup-steps",
            "0", "--precision", "fp32", "--device", "cpu", "--output-dir", output_dir, "--logging-steps", "1",
            "--save-steps", "1", "--relevance-threshold", "0.5", *extra]
    return [str(argument) for argument in argv]


@pytest.mark.parametrize("flags, fragments", [
    (["--false-negative-margin", "-0.1"], ["--false-negative-margin", ">= 0.0"]),
    (["--false-negative-margin", "nan"], ["--false-negative-margin", "nan"]),
    (["--false-negative-margin", "0.1", "--loss", "mse"], ["--false-negative-margin", "infonce", "mse"]),
    (["--false-negative-margin", "0.1", "--loss", "cosent"], ["--false-negative-margin", "infonce", "cosent"]),
    (["--metric-for-best-model", "accuracy"], ["--metric-for-best-model", "ndcg@K"]),
    (["--metric-for-best-model", "ndcg"], ["--metric-for-best-model", "ndcg@K"]),
    (["--metric-for-best-model", "ndcg@0"], ["--metric-for-best-model", "ndcg@K"]),
    (["--metric-for-best-model", "map@10"], ["--metric-for-best-model", "mrr@K"]),
], ids=["negative", "nan", "mse", "cosent", "classifier-metric", "no-k", "k-0", "not-offered"])
def test_bad_values_are_one_line_errors(tmp_path, tiny_model_dir, capsys, flags, fragments):
    with pytest.raises(SystemExit) as raised:
        code = train_vector.main(train_argv(tiny_model_dir, tmp_path, tmp_path / "out", *flags))
        raise SystemExit(code)
    assert raised.value.code == 2
    assert_one_error_line(capsys.readouterr().err, *fragments)
    assert not (tmp_path / "out" / "training_args.json").exists()


def test_selection_metric_spellings():
    parse = train_vector.parse_selection_metric
    assert [parse("loss"), parse("NDCG@10"), parse("mrr@05")] == ["loss", "ndcg@10", "mrr@5"]


def read_rows(output_dir):
    return [json.loads(line) for line in (output_dir / "train_log.jsonl").read_text().splitlines()]


def test_training_with_the_margin_reports_and_stores_it(tmp_path, tiny_model_dir, capsys):
    output_dir = tmp_path / "out"
    assert train_vector.main(train_argv(tiny_model_dir, tmp_path, output_dir, "--false-negative-margin", "0.5",
                                        "--epochs", "1")) == 0
    assert json.loads((output_dir / "training_args.json").read_text())["false_negative_margin"] == 0.5
    assert json.loads((output_dir / "checkpoint-best" / "training_args.json").read_text())["false_negative_margin"] \
        == 0.5
    shares = [row["masked_in_batch_share"] for row in read_rows(output_dir) if "masked_in_batch_share" in row]
    assert shares and all(0.0 <= share <= 1.0 for share in shares)
    assert "epoch 0: --false-negative-margin 0.5 left out" in capsys.readouterr().out


# ---------------------------------------------------------------- selection by a ranking metric

def step_checkpoints(output_dir):
    return sorted(output_dir.glob("checkpoint-step-*"), key=lambda path: int(path.name.rsplit("-", 1)[1]))


def summary_of(directory):
    return json.loads((directory / "trainer_state.json").read_text())


def test_training_selects_by_validation_ndcg(tmp_path, tiny_model_dir):
    output_dir = tmp_path / "out"
    assert train_vector.main(train_argv(tiny_model_dir, tmp_path, output_dir, "--metric-for-best-model",
                                        "ndcg@3")) == 0
    evaluations = [row for row in read_rows(output_dir) if "eval_loss" in row]
    assert evaluations[0]["untuned"] and all("eval_ndcg@3" in row for row in evaluations)  # the loss still logged
    values = {path.name: summary_of(path)["val_ndcg@3"] for path in [*step_checkpoints(output_dir),
                                                                      output_dir / "checkpoint-best"]}
    assert all("val_loss" in summary_of(path) for path in step_checkpoints(output_dir))
    best = json.loads((output_dir / "best_checkpoint.json").read_text())
    assert best["metric_for_best_model"] == "ndcg@3" and best["value"] == max(values.values())
    assert values[best["checkpoint"]] == max(values.values())
    assert evaluations[-1]["best"] == max(row["eval_ndcg@3"] for row in evaluations)  # early stopping: highest
    assert json.loads((output_dir / "training_args.json").read_text())["metric_for_best_model"] == "ndcg@3"


def rewrite_validation(directory, **figures):
    summary = summary_of(directory)
    summary.update({f"val_{name}": value for name, value in figures.items()})
    (directory / "trainer_state.json").write_text(json.dumps(summary))


def test_select_best_picks_the_higher_ndcg_even_when_its_loss_is_higher(tmp_path, tiny_model_dir, capsys):
    output_dir = tmp_path / "out"
    argv = train_argv(tiny_model_dir, tmp_path, output_dir, "--metric-for-best-model", "ndcg@3", "--epochs", "1")
    assert train_vector.main(argv) == 0
    first, *_, last = step_checkpoints(output_dir)
    shutil_rmtree(output_dir / "checkpoint-best")
    # constructed: the first checkpoint ranks better on validation, the last has the lower loss
    rewrite_validation(first, loss=2.0, **{"ndcg@3": 0.9})
    rewrite_validation(last, loss=1.0, **{"ndcg@3": 0.5})
    for path in step_checkpoints(output_dir)[1:-1]:
        rewrite_validation(path, loss=3.0, **{"ndcg@3": 0.1})
    assert train_vector.best_checkpoint(output_dir, "ndcg@3") == (first, 0.9)
    assert train_vector.best_checkpoint(output_dir, "loss") == (last, 1.0)
    test = write_jsonl(tmp_path / "test.jsonl", pair_records(" is"))
    evaluate = ["--mode", "evaluate", "--test-path", str(test), "--output-dir", str(output_dir), "--select_best",
                "--device", "cpu", "--baseline", "none"]
    assert train_vector.main(evaluate) == 0  # the run's own metric, from its training_args.json
    best = json.loads((output_dir / "best_checkpoint.json").read_text())
    assert (best["checkpoint"], best["metric_for_best_model"], best["val_loss"]) == (first.name, "ndcg@3", 2.0)
    assert "validation ndcg@3 0.90000" in capsys.readouterr().out
    assert train_vector.main(evaluate + ["--metric-for-best-model", "loss"]) == 0  # asked for: the loss
    assert json.loads((output_dir / "best_checkpoint.json").read_text())["checkpoint"] == last.name
    assert train_vector.resolve_best_model_dir(output_dir) == last
    assert train_vector.main(evaluate + ["--metric-for-best-model", "mrr@3"]) == 2  # never recorded
    assert_one_error_line(capsys.readouterr().err, "no checkpoint records a validation mrr@3")


def shutil_rmtree(path):
    import shutil
    shutil.rmtree(path)


def test_resume_keeps_the_runs_metric(tmp_path, tiny_model_dir, capsys):
    output_dir = tmp_path / "out"
    argv = train_argv(tiny_model_dir, tmp_path, output_dir, "--metric-for-best-model", "mrr@3")
    assert train_vector.main(argv) == 0
    rest = [argument for argument in argv if argument not in ("--metric-for-best-model", "mrr@3")]
    assert train_vector.main(rest + ["--resume", str(output_dir / "checkpoint-step-2")]) == 0
    assert json.loads((output_dir / "training_args.json").read_text())["metric_for_best_model"] == "mrr@3"
    resumed = [row for row in read_rows(output_dir) if "eval_loss" in row and row["step"] > 2]
    assert resumed and all("eval_mrr@3" in row for row in resumed)
    assert json.loads((output_dir / "best_checkpoint.json").read_text())["metric_for_best_model"] == "mrr@3"
    capsys.readouterr()
    # another metric cannot continue the run's early stopping (its best value is in mrr@3's units)
    assert train_vector.main(rest + ["--metric-for-best-model", "loss", "--resume",
                                     str(output_dir / "checkpoint-step-2")]) == 2
    assert_one_error_line(capsys.readouterr().err, "--metric-for-best-model 'mrr@3' -> 'loss'")


def test_a_ranking_metric_needs_validation_candidates(tmp_path, tiny_model_dir, capsys):
    """Positive pairs only: every query has one candidate, its NDCG is always 1."""
    positives = write_jsonl(tmp_path / "val_positives.jsonl",
                            [record for record in pair_records(" news") if record["rel"] == 1.0])
    argv = train_argv(tiny_model_dir, tmp_path, tmp_path / "out", "--metric-for-best-model", "ndcg@10")
    argv[argv.index("--val-path") + 1] = str(positives)
    assert train_vector.main(argv) == 2
    assert_one_error_line(capsys.readouterr().err, "--metric-for-best-model ndcg@10", "two or more candidates")
