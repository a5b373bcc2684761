"""Issue 15 on a tiny BERT: FlagEmbedding's query-group format in every file type, InfoNCE with hard
negatives (gathered across two torchrun processes = one process with the whole batch), GradCache
gradients = the plain batch's, --mode mine's filters, Matryoshka sizes and stored instructions."""
import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import train_vector
from common import mining
from common.errors import UserError
from common.gradcache import grad_cache_backward
from common.pair_losses import compute_pair_loss, infonce_loss
from common.pairs import GroupCollator, QueryGroup, build_group_dataset, load_pairs, read_query_groups
from common.vector import ROTATION_FILE, BertVectorModel, PairEncoder, fit_rotation
from conftest import assert_one_error_line, write_json, write_jsonl
from test_vector import TOPICS

REPO = Path(__file__).resolve().parents[1]


def group_records():
    """Per topic: two queries, positives from the topic, negatives from the other topics."""
    records = []
    for query, documents in TOPICS.items():
        others = [document for topic, texts in TOPICS.items() if topic != query for document in texts]
        records.append({"query": query, "pos": documents[:2], "neg": others})
        records.append({"query": query + " news", "pos": documents[1:], "neg": others[:3], "prompt": "find: ",
                        "pos_scores": [0.9, 0.8], "neg_scores": [0.1, 0.2, 0.3]})
    return records


def write_csv(path, records):
    import csv
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["query", "pos", "neg"])
        writer.writeheader()
        for record in records:
            writer.writerow({"query": record["query"], "pos": json.dumps(record["pos"]),
                             "neg": json.dumps(record["neg"])})
    return path


def write_saved_dataset(path, records):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list([{"query": r["query"], "pos": r["pos"], "neg": r["neg"]} for r in records]) \
        .save_to_disk(str(path))
    return path


# ---------------------------------------------------------------- the query-group format

@pytest.mark.parametrize("writer", [write_jsonl, write_json, write_csv, write_saved_dataset],
                         ids=["jsonl", "json", "csv", "save_to_disk"])
def test_query_groups_read_from_every_file_type(writer, tmp_path):
    suffix = {"write_jsonl": ".jsonl", "write_json": ".json", "write_csv": ".csv"}.get(writer.__name__, "")
    path = writer(tmp_path / f"groups{suffix}", group_records())
    groups = read_query_groups(path)
    assert groups.record_format == "groups" and len(groups) == 6
    assert groups[0].query == "good movie" and groups[0].positives == TOPICS["good movie"][:2]
    assert len(groups[0].negatives) == 6 and len(groups[1].negatives) == 3
    pairs = load_pairs(path)  # the same file as graded pairs: positives rel 1, negatives rel 0
    assert pairs.record_format == "groups" and len(pairs) == 6 * 2 + 3 * 6 + 3 * 3
    assert sorted({pair.rel for pair in pairs}) == [0.0, 1.0]


def test_the_shipped_example_is_the_graded_example_as_query_groups():
    groups = read_query_groups(REPO / "examples" / "vec_train_groups.jsonl")
    graded = read_query_groups(REPO / "examples" / "vec_train.jsonl", relevance_threshold=0.5)
    assert [(g.query, g.positives, g.negatives) for g in groups] == [(g.query, g.positives, g.negatives) for g in graded]


def test_optional_fields_are_kept():
    records = group_records()
    group = read_query_groups_from(records)[1]
    assert (group.prompt, group.pos_scores, group.neg_scores) == ("find: ", [0.9, 0.8], [0.1, 0.2, 0.3])


def read_query_groups_from(records, **options):
    import tempfile
    with tempfile.TemporaryDirectory() as directory:
        return read_query_groups(write_jsonl(Path(directory) / "groups.jsonl", records), **options)


def test_graded_pairs_become_query_groups(tmp_path):
    records = [{"query": "q1", "document": "a", "rel": 1.0}, {"query": "q1", "document": "b", "rel": 0.0},
               {"query": "q2", "document": "c", "rel": 0.0}, {"query": "q1", "document": "d", "rel": 0.6}]
    groups = read_query_groups(write_jsonl(tmp_path / "pairs.jsonl", records), relevance_threshold=0.5)
    assert groups.record_format == "pairs"
    assert [(g.query, g.positives, g.negatives) for g in groups] == [("q1", ["a", "d"], ["b"])]  # q2: no positive


BAD_GROUPS = [
    ({"query": "q", "neg": ["x"]}, "field 'pos': missing"),
    ({"query": "q", "pos": [], "neg": ["x"]}, "field 'pos': empty list"),
    ({"query": "q", "pos": "a passage", "neg": []}, "field 'pos': expected a list"),
    ({"query": "q", "pos": ["a", 3]}, "field 'pos[1]': expected a string"),
    ({"query": "q", "pos": ["a", "  "]}, "field 'pos[1]': empty text"),
    ({"query": "q", "pos": ["a"], "neg": [None]}, "field 'neg[0]': expected a string"),
    ({"query": "", "pos": ["a"]}, "field 'query': empty text"),
    ({"query": "q", "pos": ["a"], "pos_scores": [1, 2]}, "field 'pos_scores': 2 scores for 1 passages"),
    ({"query": "q", "pos": ["a"], "pos_scores": ["high"]}, "field 'pos_scores[0]': expected a number"),
    ({"query": "q", "pos": ["a"], "neg": ["b"], "neg_scores": [float("nan")]}, "field 'neg_scores[0]'"),
    ({"query": "q", "pos": ["a"], "prompt": 7}, "field 'prompt': expected a string"),
    ({"query": "q", "document": "d", "rel": 1.0}, "field 'pos': missing"),  # the other format mid-file
]


@pytest.mark.parametrize("bad, message", BAD_GROUPS, ids=[message for _, message in BAD_GROUPS])
def test_a_bad_group_record_is_one_line_naming_file_line_and_field(bad, message, tmp_path, capsys):
    path = write_jsonl(tmp_path / "train.jsonl", [group_records()[0], bad])
    argv = ["--mode", "mine", "--train-path", str(path), "--miner", "bm25", "--output-path", str(tmp_path / "o.jsonl")]
    assert train_vector.main(argv) == 2
    assert_one_error_line(capsys.readouterr().err, "train.jsonl line 2", message)
    assert not (tmp_path / "o.jsonl").exists()


def test_skip_invalid_drops_bad_groups_and_keeps_the_rest(tmp_path):
    records = group_records() + [{"query": "q", "pos": []}]
    groups = read_query_groups(write_jsonl(tmp_path / "g.jsonl", records), skip_invalid=True)
    assert len(groups) == 6 and len(groups.skipped) == 1 and "line 7" in groups.skipped[0]


def test_a_bad_list_cell_in_csv_names_the_field(tmp_path):
    path = tmp_path / "g.csv"
    path.write_text('query,pos\nq,"[""a"""\n', encoding="utf-8")
    with pytest.raises(UserError, match=r"g.csv line 2: field 'pos': expected a JSON array"):
        read_query_groups(path)


# ---------------------------------------------------------------- InfoNCE with hard negatives

def test_infonce_ranks_each_query_against_positives_and_hard_negatives():
    queries = torch.eye(2, 4)
    documents = torch.stack([torch.eye(4)[0], torch.eye(4)[1], torch.eye(4)[0] + torch.eye(4)[2]])  # 3rd: hard neg
    loss = infonce_loss(queries, documents, torch.ones(2), torch.tensor([0, 1, 2]), temperature=1.0)
    logits = torch.nn.functional.normalize(queries, dim=-1) @ torch.nn.functional.normalize(documents, dim=-1).T
    expected = torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1]))
    assert torch.allclose(loss, expected)
    # a copy of query 0's positive among the negatives is not its negative
    masked = infonce_loss(queries, documents, torch.ones(2), torch.tensor([0, 1, 0]), temperature=1.0)
    assert masked < loss


def test_matryoshka_loss_is_the_sum_over_prefixes():
    generator = torch.Generator().manual_seed(0)
    queries, documents = torch.randn(4, 8, generator=generator), torch.randn(6, 8, generator=generator)
    batch = {"rel": torch.ones(4), "weight": torch.ones(4), "doc_id": torch.arange(6), "positives": 4}
    summed = compute_pair_loss("infonce", queries, documents, batch, 0.05, [8, 4, 2])
    parts = [compute_pair_loss("infonce", queries[:, :dim], documents[:, :dim], batch, 0.05) for dim in (8, 4, 2)]
    assert torch.allclose(summed, sum(parts))
    assert not torch.allclose(summed, parts[0])


def test_matryoshka_weights_multiply_each_size_term():
    generator = torch.Generator().manual_seed(0)
    queries, documents = torch.randn(4, 8, generator=generator), torch.randn(6, 8, generator=generator)
    batch = {"rel": torch.ones(4), "weight": torch.ones(4), "doc_id": torch.arange(6), "positives": 4}
    weighted = compute_pair_loss("infonce", queries, documents, batch, 0.05, [8, 4, 2], [1.0, 2.0, 0.5])
    parts = [compute_pair_loss("infonce", queries[:, :dim], documents[:, :dim], batch, 0.05) for dim in (8, 4, 2)]
    assert torch.allclose(weighted, parts[0] + 2.0 * parts[1] + 0.5 * parts[2])
    assert not torch.allclose(weighted, sum(parts))
    with pytest.raises(ValueError, match="2 Matryoshka weights for 3 sizes"):
        compute_pair_loss("infonce", queries, documents, batch, 0.05, [8, 4, 2], [1.0, 2.0])


@pytest.mark.parametrize("margin", [None, "0.3"], ids=["plain", "false-negative-margin"])
def test_gathered_loss_across_two_processes_equals_one_process_with_the_whole_batch(tmp_path, margin):
    result = tmp_path / "gathered.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(REPO / "tests" / "vector_gather_worker.py"), str(result), *([margin] if margin else [])]
    environment = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    run = subprocess.run(command, capture_output=True, text=True, timeout=180, env=environment, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    outcome = json.loads(result.read_text())
    gathered, whole = outcome["gathered"], outcome["one_process"]
    assert gathered["loss"] == pytest.approx(whole["loss"], rel=1e-6)
    assert gathered["statistics"] == whole["statistics"]  # the mask saw the whole batch on every rank
    if margin:  # some negatives, not all, were left out
        assert 0 < whole["statistics"]["in_batch_masked"] < whole["statistics"]["in_batch_negatives"]
    for mine, reference in zip(gathered["grad"], whole["grad"]):
        assert torch.allclose(torch.tensor(mine), torch.tensor(reference), atol=1e-5, rtol=1e-5)


def test_a_query_group_batch_puts_positives_first_and_draws_per_epoch(tiny_model_dir):
    model = tiny_vector_model(tiny_model_dir)
    groups = [QueryGroup(q, docs, [d for t, ds in TOPICS.items() if t != q for d in ds], "here")
              for q, docs in TOPICS.items()]
    dataset = build_group_dataset(model.tokenizer, groups, 16, 16, model.preprocessing, negatives_per_query=2, seed=3)
    batch = GroupCollator(0)([dataset[i] for i in range(3)])
    assert batch["query"]["input_ids"].shape[0] == 3 and batch["document"]["input_ids"].shape[0] == 3 + 3 * 2
    assert batch["positives"] == 3
    first_epoch = [dataset[i]["doc_ids"] for i in range(3)]
    assert first_epoch == [dataset[i]["doc_ids"] for i in range(3)]  # the same epoch draws the same
    dataset.set_epoch(1)
    assert first_epoch != [dataset[i]["doc_ids"] for i in range(3)]


# ---------------------------------------------------------------- GradCache

def tiny_vector_model(tiny_model_dir, dropout=None, **settings):
    from transformers import BertModel
    options = {} if dropout is None else {"hidden_dropout_prob": dropout, "attention_probs_dropout_prob": dropout}
    torch.manual_seed(0)
    backbone = BertModel.from_pretrained(str(tiny_model_dir), add_pooling_layer=False, **options)
    model = BertVectorModel(backbone, "mean", max_length=16, **settings)
    from common import modeldir
    model.tokenizer = modeldir.load_tokenizer(str(tiny_model_dir))
    return model


def group_batch(model, count=6, negatives=2):
    groups = [QueryGroup(q + suffix, docs, [d for t, ds in TOPICS.items() if t != q for d in ds], "here")
              for suffix in ("", " news") for q, docs in TOPICS.items()][:count]
    dataset = build_group_dataset(model.tokenizer, groups, 16, 16, model.preprocessing, negatives, seed=0)
    return GroupCollator(0)([dataset[i] for i in range(len(dataset))])


@pytest.mark.parametrize("chunk", [1, 4])
def test_grad_cache_gives_the_plain_batch_gradients(tiny_model_dir, chunk):
    model = PairEncoder(tiny_vector_model(tiny_model_dir, dropout=0.0)).train()
    batch = group_batch(model.encoder)

    def loss_of(query_embeddings, doc_embeddings):
        return compute_pair_loss("infonce", query_embeddings, doc_embeddings, batch, 0.05, [32, 8])
    assert_grad_cache_matches_the_plain_batch(model, batch, chunk, loss_of)


def assert_grad_cache_matches_the_plain_batch(model, batch, chunk, loss_of):
    """GradCache over ``chunk``-sized pieces gives the plain batch's loss and gradients under ``loss_of``."""
    plain = loss_of(*model(batch["query"], batch["document"]))
    plain.backward()
    expected = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    cached = grad_cache_backward(model, batch["query"], batch["document"], chunk, loss_of, lambda loss: loss.backward(),
                                 contextlib.nullcontext, lambda last: contextlib.nullcontext(), torch.device("cpu"))
    assert cached == pytest.approx(float(plain.detach()), rel=1e-6)
    for name, parameter in model.named_parameters():
        assert torch.allclose(parameter.grad, expected[name], atol=1e-5, rtol=1e-4), name


def test_grad_cache_replays_each_chunks_dropout(tiny_model_dir):
    """With dropout on, the replayed chunk must see the masks of its first pass (else the cached
    gradients belong to other embeddings): the replay's embeddings equal the first pass's."""
    from common.gradcache import capture_random_state, replayed_random_state
    model = tiny_vector_model(tiny_model_dir, dropout=0.3).train()
    features = group_batch(model)["query"]
    state = capture_random_state(torch.device("cpu"))
    first = model(**features)
    second = model(**features)
    with replayed_random_state(state, torch.device("cpu")):
        replayed = model(**features)
    assert not torch.allclose(first, second) and torch.equal(first, replayed)


# ---------------------------------------------------------------- mining

def fixed_scorer(table):
    """score(queries, prompts) from a {query: [score per corpus text]} table (prompts ignored)."""
    import numpy as np
    return lambda queries, prompts=None: np.array([table[query] for query in queries], dtype=np.float32)


def test_mining_filters_positives_the_query_and_likely_false_negatives():
    corpus = ["pos", "near", "q", "n1", "n2", "n3", "n4", "far"]
    scores = {"q": [0.9, 0.88, 0.95, 0.7, 0.6, 0.5, 0.4, 0.1]}
    group = QueryGroup("q", ["pos"], [], "line 1")
    mined, report = mining.mine_hard_negatives([group], corpus, fixed_scorer(scores), (1, 7), 10, 0.05, seed=0)
    # ranks 1-7: q, pos, near, n1, n2, n3, n4 ("far" is rank 8, outside the window)
    assert (report.candidates, report.known_positive, report.query_text, report.likely_false_negative) == (7, 1, 1, 1)
    assert mined[0].negatives == ["n1", "n2", "n3", "n4"] and mined[0].positives == ["pos"]
    assert report.written == 4 and report.short_queries == 1


def test_mining_leaves_out_passages_that_quote_a_long_query():
    query = "the sorted function returns a new list"  # an inverse-cloze query: a sentence of its paragraph
    sibling = "Lists have methods. " + query + " and sort() sorts in place."  # another query's document
    corpus = ["pos", sibling, "a list of words", "n1"]
    scores = {query: [0.9, 0.8, 0.7, 0.6], "list": [0.9, 0.8, 0.7, 0.6]}
    mined, report = mining.mine_hard_negatives([QueryGroup(query, ["pos"], [], "line 1")], corpus,
                                               fixed_scorer(scores), (1, 4), 10, -2.0, seed=0)
    assert mined[0].negatives == ["a list of words", "n1"] and report.query_text == 1
    # a short query is found inside unrelated passages: only its identical text would be left out
    mined, report = mining.mine_hard_negatives([QueryGroup("list", ["pos"], [], "line 1")], corpus,
                                               fixed_scorer(scores), (1, 4), 10, -2.0, seed=0)
    assert mined[0].negatives == [sibling, "a list of words", "n1"] and report.query_text == 0


def test_mining_is_deterministic_under_the_seed():
    corpus = ["pos"] + [f"n{index}" for index in range(30)]
    scores = {"q": [1.0] + [0.5 - index / 100 for index in range(30)]}
    group = QueryGroup("q", ["pos"], [], "line 1")

    def draw(seed):
        return mining.mine_hard_negatives([group], corpus, fixed_scorer(scores), (2, 31), 5, 0.0, seed)[0][0].negatives
    assert draw(1) == draw(1) and draw(1) != draw(2)


def test_mine_mode_writes_query_groups_with_bm25_and_never_overwrites(tmp_path, capsys):
    train = write_jsonl(tmp_path / "train.jsonl", group_records())
    output = tmp_path / "mined.jsonl"
    argv = ["--mode", "mine", "--train-path", str(train), "--miner", "bm25", "--range-for-sampling", "1-9",
            "--negative-number", "2", "--negative-margin", "0", "--output-path", str(output)]
    assert train_vector.main(argv) == 0
    printed = capsys.readouterr().out
    assert "known positives" in printed and "likely false negatives" in printed
    mined = read_query_groups(output)
    assert len(mined) == 6 and mined[1].prompt == "find: "
    for group in mined:
        assert group.negatives and not set(group.negatives) & set(group.positives)
    before = output.read_bytes()
    assert train_vector.main(argv) == 2
    assert_one_error_line(capsys.readouterr().err, "--output-path", "already exists")
    assert output.read_bytes() == before


def test_mine_mode_with_the_model(tiny_model_dir, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", group_records())
    output = tmp_path / "mined.jsonl"
    argv = ["--mode", "mine", "--train-path", str(train), "--model-name", str(tiny_model_dir), "--max-length", "16",
            "--range-for-sampling", "1-9", "--negative-number", "2", "--negative-margin", "-1", "--device", "cpu",
            "--output-path", str(output)]
    assert train_vector.main(argv) == 0
    assert all(len(group.negatives) == 2 for group in read_query_groups(output))


def test_bm25_mining_of_passages_without_a_word_is_one_line(tmp_path, capsys):
    """rank_bm25 divided by zero (a ZeroDivisionError traceback) when no passage had a word to index."""
    train = write_jsonl(tmp_path / "train.jsonl", [{"query": "???", "pos": ["!!!"], "neg": ["..."]}])
    assert train_vector.main(["--mode", "mine", "--train-path", str(train), "--miner", "bm25",
                              "--output-path", str(tmp_path / "mined.jsonl")]) == 2
    assert_one_error_line(capsys.readouterr().err, "--miner bm25", f"no passage of {train}", "--miner model")
    assert not (tmp_path / "mined.jsonl").exists()


def test_a_query_groups_prompt_is_used_by_evaluation_and_mining_as_in_training(tiny_model_dir, tmp_path):
    """A record's prompt replaces the stored query instruction in training; --mode evaluate, ranking
    validation and --mode mine used to embed the query with the stored instruction instead."""
    import numpy as np
    from common.vector import embed_pairs
    model = tiny_vector_model(tiny_model_dir, query_instruction="query: ").eval()
    path = write_jsonl(tmp_path / "groups.jsonl", group_records())
    prompted = next(pair for pair in load_pairs(path) if pair.prompt == "find: ")
    query_vectors, _ = embed_pairs(model, [prompted], 8, None)
    group = QueryGroup(prompted.query, ["a passage"], [], "line 2", prompt="find: ")
    trained_on = build_group_dataset(model.tokenizer, [group], 16, 16, model.preprocessing, 0).queries[0]
    with torch.no_grad():
        expected = model(torch.tensor([trained_on["input_ids"]]),
                         torch.ones(1, len(trained_on["input_ids"]), dtype=torch.long))
    assert torch.allclose(query_vectors, expected, atol=1e-6)
    groups, seen = read_query_groups(path), []
    corpus = mining.build_corpus(groups)

    def scorer(queries, prompts=None):
        seen.extend(prompts)
        return np.zeros((len(queries), len(corpus)), dtype=np.float32)
    mining.mine_hard_negatives(groups, corpus, scorer, (1, 3), 1, 0.0, seed=0)
    assert seen == [group.prompt for group in groups] and "find: " in seen


# ---------------------------------------------------------------- training on query groups; Matryoshka; instructions

def test_training_on_query_groups_with_grad_cache_matryoshka_and_instructions(tiny_model_dir, tmp_path,
                                                                              monkeypatch):
    train = write_jsonl(tmp_path / "train.jsonl", group_records())
    output_dir = tmp_path / "out"
    argv = ["--mode", "train", "--train-path", str(train), "--val-path", str(train), "--model-name",
            str(tiny_model_dir), "--max-length", "16", "--batch-size", "4", "--epochs", "1", "--precision", "fp32",
            "--device", "cpu", "--output-dir", str(output_dir), "--negatives-per-query", "2",
            "--grad-cache-chunk", "3", "--matryoshka-dims", "8,16", "--matryoshka-weights", "3,1",
            "--query-instruction", "query: ", "--passage-instruction", "passage: ", "--learning-rate", "1e-3",
            "--warmup-steps", "0", "--logging-steps", "1"]
    size_weights = []  # what every training and validation loss was computed with

    def recording_loss(*arguments, **options):
        size_weights.append((arguments[5], arguments[6]))
        return compute_pair_loss(*arguments, **options)
    monkeypatch.setattr(train_vector, "compute_pair_loss", recording_loss)
    assert train_vector.main(argv) == 0
    # the weights pair with the sizes in the order given, then both are sorted largest first
    assert size_weights and all(dims == [16, 8] and weights == [1.0, 3.0] for dims, weights in size_weights)
    model = BertVectorModel.from_pretrained(output_dir / "checkpoint-step-2")
    assert model.vector_settings["matryoshka_dims"] == [16, 8]
    assert model.vector_settings["matryoshka_weights"] == [1.0, 3.0]
    assert model.preprocessing["query_instruction"] == "query: "
    full, short = model.encode(["good movie"]), model.encode(["good movie"], dim=8)
    assert full.shape == (1, 32) and short.shape == (1, 8)
    assert torch.allclose(short, torch.nn.functional.normalize(full[:, :8], dim=-1), atol=1e-6)
    with pytest.raises(UserError, match="dimension 12"):
        model.encode(["good movie"], dim=12)
    # the stored instruction is put before the text: a query equals the untreated text with it spelled out
    plain = BertVectorModel.from_pretrained(output_dir / "checkpoint-step-2")
    plain.preprocessing["query_instruction"] = None
    assert torch.allclose(model.encode(["good movie"]), plain.encode(["query: good movie"]), atol=1e-6)
    assert torch.allclose(model.encode(["a film"], side="document"), plain.encode(["passage: a film"]), atol=1e-6)
    rows = [json.loads(line) for line in (output_dir / "train_log.jsonl").read_text().splitlines()]
    assert any("loss" in row for row in rows)


# ---------------------------------------------------------------- the rotation before a Matryoshka cut

def cosines(vectors):
    unit = torch.nn.functional.normalize(vectors, dim=-1)
    return unit @ unit.T


def test_a_rotation_keeps_every_similarity_and_puts_the_strongest_directions_first(tiny_model_dir):
    model = tiny_vector_model(tiny_model_dir).eval()
    texts = [text for documents in TOPICS.values() for text in documents]
    rotation = fit_rotation(model, list(TOPICS), texts)
    assert torch.allclose(rotation @ rotation.T, torch.eye(model.dim), atol=1e-5)
    plain = model.encode(texts)
    model.rotation = rotation
    turned = model.encode(texts)
    assert torch.allclose(cosines(turned), cosines(plain), atol=1e-5)
    assert not torch.allclose(turned, plain, atol=1e-3)
    # the first 4 values hold the most of the fitted texts' embeddings any 4 orthogonal directions can hold
    fitted = torch.cat([model.encode(list(TOPICS)), model.encode(texts, side="document")])
    energy = fitted.pow(2).sum(dim=0)
    assert energy[:4].sum() > plain.pow(2).sum(dim=0)[:4].sum() * 1.2
    assert torch.all(energy[:-1] >= energy[1:] - 1e-4)  # strongest first


@pytest.mark.parametrize("rotation", ["pca", "none"])
def test_a_matryoshka_run_saves_turned_models_unless_told_not_to(rotation, tiny_model_dir, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", group_records())
    output_dir = tmp_path / "out"
    argv = ["--train-path", str(train), "--val-path", str(train), "--model-name", str(tiny_model_dir),
            "--max-length", "16", "--batch-size", "4", "--epochs", "1", "--precision", "fp32", "--device", "cpu",
            "--output-dir", str(output_dir), "--matryoshka-dims", "16,8", "--matryoshka-rotation", rotation,
            "--learning-rate", "1e-3", "--warmup-steps", "0", "--save-steps", "1"]
    assert train_vector.main(argv) == 0
    rotations = []
    for directory in (output_dir, output_dir / "checkpoint-step-1", output_dir / "checkpoint-step-2"):
        stored = json.loads((directory / "config.json").read_text())["toolkit"]["vector"].get("rotation")
        assert stored == (None if rotation == "none" else "pca")
        assert (directory / ROTATION_FILE).is_file() == (rotation == "pca")
        if rotation == "pca":
            rotations.append(load_file(str(directory / ROTATION_FILE))["rotation"])
    # fitted once on the starting model: every checkpoint trained through, and stores, the same one
    assert all(torch.equal(rotations[0], other) for other in rotations[1:])
    model = BertVectorModel.from_pretrained(output_dir)
    texts = [text for documents in TOPICS.values() for text in documents]
    full, short = model.encode(texts), model.encode(texts, dim=8)
    assert torch.allclose(short, torch.nn.functional.normalize(full[:, :8], dim=-1), atol=1e-6)
    if rotation == "pca":  # the same similarities as the weights unturned
        unturned = BertVectorModel.from_pretrained(output_dir)
        unturned.rotation = None
        assert torch.allclose(cosines(full), cosines(unturned.encode(texts)), atol=1e-5)


def test_the_rotation_sample_is_half_queries_with_their_prompts_and_fixed_by_the_seed(monkeypatch):
    monkeypatch.setattr(train_vector, "ROTATION_SAMPLE", 6)
    groups = [QueryGroup(f"q{index}", [f"pos{index}"], [f"neg{index}", "shared"], "here",
                         prompt="find: " if index % 2 else None) for index in range(5)]
    queries, documents, prompts = train_vector.rotation_texts(groups, 3)
    assert len(queries) == 3 and len(documents) == 3 and len(set(documents)) == 3
    assert all(prompt == ("find: " if int(query[1:]) % 2 else None) for query, prompt in zip(queries, prompts))
    assert train_vector.rotation_texts(groups, 3) == (queries, documents, prompts)
    queries, documents, prompts = train_vector.rotation_texts(groups[:1], 3)  # fewer texts than the sample
    assert (queries, sorted(documents), prompts) == (["q0"], ["neg0", "pos0", "shared"], [None])


def test_a_turned_run_under_torchrun_stores_the_rotation_one_process_fits(tiny_model_dir, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", group_records())
    argv = lambda output_dir: ["--train-path", str(train), "--val-path", str(train),  # noqa: E731
                               "--model-name", str(tiny_model_dir), "--max-length", "16", "--batch-size", "2",
                               "--epochs", "1", "--precision", "fp32", "--device", "cpu", "--output-dir",
                               str(output_dir), "--matryoshka-dims", "32,8", "--warmup-steps", "0"]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(REPO / "train_vector.py"), *argv(tmp_path / "two")]
    environment = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    run = subprocess.run(command, capture_output=True, text=True, timeout=300, env=environment, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "processes: 2" in run.stdout and "turned (--matryoshka-rotation pca)" in run.stdout
    assert train_vector.main(argv(tmp_path / "one")) == 0
    stored = [load_file(str(tmp_path / name / ROTATION_FILE))["rotation"] for name in ("two", "one")]
    assert torch.allclose(*stored, atol=1e-6)  # fitted on the starting model, before the processes split the data
    BertVectorModel.from_pretrained(tmp_path / "two").encode(["good movie"], dim=8)


def rotate_argv(train, tiny_model_dir, output_dir, *extra):
    return ["--mode", "rotate", "--train-path", str(train), "--model-name", str(tiny_model_dir), "--pooling", "mean",
            "--max-length", "16", "--device", "cpu", "--output-dir", str(output_dir), "--matryoshka-dims", "32,8",
            *extra]


def test_rotate_writes_the_untrained_encoder_turned_as_a_matryoshka_run_starts(tiny_model_dir, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", group_records())
    assert train_vector.main(rotate_argv(train, tiny_model_dir, tmp_path / "turned")) == 0
    turned = BertVectorModel.from_pretrained(tmp_path / "turned")
    # the rotation a training run with the same data and seed fits before its first step (one code path)
    assert train_vector.main(["--train-path", str(train), "--val-path", str(train), "--model-name", str(tiny_model_dir),
                              "--pooling", "mean", "--max-length", "16", "--batch-size", "4", "--epochs", "1",
                              "--precision", "fp32", "--device", "cpu", "--output-dir", str(tmp_path / "trained"),
                              "--matryoshka-dims", "32,8", "--warmup-steps", "0"]) == 0
    trained_rotation = load_file(str(tmp_path / "trained" / ROTATION_FILE))["rotation"]
    assert torch.allclose(turned.rotation, trained_rotation, atol=1e-6)
    # no training: the encoder's own weights, and at full size its own similarities
    untuned = tiny_vector_model(tiny_model_dir).eval()
    assert all(torch.equal(value, untuned.backbone.state_dict()[name])
               for name, value in turned.backbone.state_dict().items())
    texts = [text for documents in TOPICS.values() for text in documents]
    assert torch.allclose(cosines(turned.encode(texts)), cosines(untuned.encode(texts)), atol=1e-5)
    assert torch.allclose(turned.encode(texts, dim=8),
                          torch.nn.functional.normalize(turned.encode(texts)[:, :8], dim=-1), atol=1e-6)
    with pytest.raises(UserError, match="4"):
        turned.encode(texts, dim=4)  # only the sizes it was turned for
    # evaluate finds it at the top of --output-dir and cuts it to a size it was turned for
    test = write_jsonl(tmp_path / "test.jsonl", [{"query": query, "document": document, "rel": 1.0 if topic == query
                                                  else 0.0} for query in TOPICS for topic, documents in TOPICS.items()
                                                 for document in documents])
    assert train_vector.main(["--mode", "evaluate", "--test-path", str(test), "--output-dir", str(tmp_path / "turned"),
                              "--dim", "8", "--device", "cpu"]) == 0


@pytest.mark.parametrize("extra, fragment", [
    (["--matryoshka-dims", ""], "needs --matryoshka-dims"),
    (["--matryoshka-rotation", "none"], "nothing to do"),
    (["--projection-dim", "8"], "--projection-dim: --mode rotate trains nothing"),
    (["--extend-vocab", "1"], "--extend-vocab: --mode rotate trains nothing"),
    (["--model-path", "somewhere"], "--model-path: --mode rotate turns the encoder --model-name names")])
def test_rotate_refuses_what_needs_training_in_one_line(extra, fragment, tiny_model_dir, tmp_path, capsys):
    train = write_jsonl(tmp_path / "train.jsonl", group_records())
    argv = rotate_argv(train, tiny_model_dir, tmp_path / "out")
    if extra[0] == "--matryoshka-dims":
        argv = argv[:-2]
    else:
        argv += extra
    assert train_vector.main(argv) == 2
    assert_one_error_line(capsys.readouterr().err, fragment)
    assert not (tmp_path / "out").exists()


def test_rotate_refuses_a_text_normalize_empties_before_the_model_loads(tmp_path, capsys):
    pairs = [{"query": f"query {i}", "document": "\U0001F600\U0001F600" if i == 1 else f"doc {i}", "rel": 1.0}
             for i in range(4)]
    path = write_jsonl(tmp_path / "pairs.jsonl", pairs)
    argv = rotate_argv(path, tmp_path / "no-model", tmp_path / "out", "--normalize", "emoji=drop")
    assert train_vector.main(argv) == 2
    assert_one_error_line(capsys.readouterr().err, f"{path} line 2: field 'document'", "nothing left after --normalize")


def test_rotate_never_writes_into_the_base_model(tiny_model_dir, tmp_path, capsys):
    train = write_jsonl(tmp_path / "train.jsonl", group_records())
    before = {path.name: path.read_bytes() for path in Path(tiny_model_dir).iterdir() if path.is_file()}
    assert train_vector.main(rotate_argv(train, tiny_model_dir, tiny_model_dir)) == 2
    assert_one_error_line(capsys.readouterr().err, "--output-dir")
    assert {path.name: path.read_bytes() for path in Path(tiny_model_dir).iterdir() if path.is_file()} == before


@pytest.mark.parametrize("damage, fragment", [("missing", "unreadable"), ("shape", "expected a 32x32 rotation"),
                                              ("skewed", "not an orthogonal matrix")])
def test_a_damaged_stored_rotation_is_refused_naming_its_file(damage, fragment, tiny_model_dir, tmp_path):
    model = tiny_vector_model(tiny_model_dir, matryoshka_dims=[32, 8])
    model.rotation = torch.eye(32)
    directory = model.save_pretrained(tmp_path / "model")
    path = directory / ROTATION_FILE
    if damage == "missing":
        path.unlink()
    else:
        save_file({"rotation": torch.eye(16) if damage == "shape" else torch.eye(32) * 2}, str(path))
    with pytest.raises(UserError, match=fragment) as error:
        BertVectorModel.from_pretrained(directory)
    assert str(path) in str(error.value)


def test_matryoshka_dims_larger_than_the_model_are_refused(tiny_model_dir, tmp_path, capsys):
    train = write_jsonl(tmp_path / "train.jsonl", group_records())
    argv = ["--train-path", str(train), "--val-path", str(train), "--model-name", str(tiny_model_dir),
            "--max-length", "16", "--device", "cpu", "--output-dir", str(tmp_path / "out"), "--matryoshka-dims", "64,8"]
    assert train_vector.main(argv) == 2
    assert_one_error_line(capsys.readouterr().err, "--matryoshka-dims 64")


def test_an_unparseable_dims_or_range_flag_is_one_line(capsys):
    for flag, value in (("--matryoshka-dims", "128,x"), ("--range-for-sampling", "100-10"),
                        ("--matryoshka-weights", "1,x"), ("--matryoshka-weights", "1,0")):
        assert train_vector.main(["--mode", "mine", "--train-path", "t.jsonl", "--output-path", "o", flag, value]) == 2
        assert_one_error_line(capsys.readouterr().err, flag, value)


@pytest.mark.parametrize("flags, fragment", [(["--matryoshka-dims", "16,8", "--matryoshka-weights", "1,2,3"],
                                              "3 weights for the 2 --matryoshka-dims sizes 16,8"),
                                             (["--matryoshka-weights", "1,2"], "needs --matryoshka-dims")],
                         ids=["count", "without-dims"])
def test_matryoshka_weights_that_do_not_match_the_dims_are_refused(flags, fragment, tmp_path, capsys):
    argv = ["--train-path", "t.jsonl", "--val-path", "t.jsonl", "--output-dir", str(tmp_path / "out"), *flags]
    assert train_vector.main(argv) == 2
    assert_one_error_line(capsys.readouterr().err, "--matryoshka-weights", fragment)
    assert not (tmp_path / "out").exists()


def test_stored_matryoshka_weights_are_read_back_and_a_mismatch_is_refused(tiny_model_dir, tmp_path):
    model = tiny_vector_model(tiny_model_dir, matryoshka_dims=[4, 8], matryoshka_weights=[2.0, 1.0])
    directory = model.save_pretrained(tmp_path / "model")
    loaded = BertVectorModel.from_pretrained(directory)
    assert loaded.vector_settings["matryoshka_dims"] == [8, 4]
    assert loaded.vector_settings["matryoshka_weights"] == [1.0, 2.0]  # each weight stays with its size
    config_path = directory / "config.json"
    config = json.loads(config_path.read_text())
    config["toolkit"]["vector"]["matryoshka_weights"] = [1.0]
    config_path.write_text(json.dumps(config))
    with pytest.raises(UserError, match=r"toolkit\.vector\.matryoshka_weights': 1 weights for the 2 sizes"):
        BertVectorModel.from_pretrained(directory)
    config["toolkit"]["vector"]["matryoshka_weights"] = [1.0, "heavy"]
    config_path.write_text(json.dumps(config))
    with pytest.raises(UserError, match="a non-empty list of positive numbers"):
        BertVectorModel.from_pretrained(directory)


def test_all_train_sentences_adds_training_queries_and_leaves_the_other_files_alone(tmp_path):
    pytest.importorskip("pydoc_data.topics")
    from bench import prepare_retrieval
    assert prepare_retrieval.main(["--output-dir", str(tmp_path / "plain")]) == 0
    assert prepare_retrieval.main(["--output-dir", str(tmp_path / "all"), "--all-train-sentences"]) == 0
    for name in ("train", "valid", "test", "corpus"):
        assert (tmp_path / "plain" / f"{name}.jsonl").read_bytes() == (tmp_path / "all" / f"{name}.jsonl").read_bytes()
    assert not (tmp_path / "plain" / "train_all.jsonl").exists()
    read = lambda path: [json.loads(line) for line in path.read_text().splitlines()]  # noqa: E731
    train, train_all = read(tmp_path / "all" / "train.jsonl"), read(tmp_path / "all" / "train_all.jsonl")
    assert train_all[:len(train)] == train
    added = {record["query"] for record in train_all[len(train):]}
    assert added and not added & {record["query"] for record in train}
    held_out = [record["document"] for name in ("valid", "test") for record in read(tmp_path / "all" / f"{name}.jsonl")]
    assert not any(query in document for query in added for document in held_out)
    for record in train_all[len(train):]:
        if record["rel"] == 1.0:  # inverse cloze: the query sentence is not in its own document
            assert record["query"] not in record["document"]


FAKE_DOCSTRING_MODULE = '''
def mean_of_rows(a):
    """Compute the arithmetic mean of each row of a matrix number {index}.

    The rows of matrix {index} are averaged one by one, ignoring missing values, and the
    result keeps one value per row of the input matrix.

    Parameters
    ----------
    a : array_like
        The matrix.

    Returns
    -------
    out : ndarray
        One mean per row.

    Examples
    --------
    >>> mean_of_rows([[1, 2]])
    """


def _private(a):
    """Compute something private that no user should ever search for.

    A private helper is not an API, so it is never a query however well documented it is.
    """


def templated(a):
    """Return the %(klass)s of the rows of the matrix.

    The template is filled in at import time, so the text read here is not what users see.
    """


def alias_one(a):
    """Return a shared description under two names.

    Both names carry this docstring word for word, so its summary would have two answers.
    """


def alias_two(a):
    """Return a shared description under two names.

    Both names carry this docstring word for word, so its summary would have two answers.
    """
'''


def test_docstrings_pair_each_public_summary_with_its_description(tmp_path, monkeypatch):
    from bench import prepare_retrieval
    package = tmp_path / "fakedocs"
    for index in range(12):  # twelve source files: twelve topics to split
        (package / f"module{index}").mkdir(parents=True)
        (package / f"module{index}" / "__init__.py").write_text(FAKE_DOCSTRING_MODULE.replace("{index}", str(index)))
    (package / "__init__.py").write_text("")
    (package / "tests").mkdir()
    (package / "tests" / "test_it.py").write_text(FAKE_DOCSTRING_MODULE.replace("{index}", "in a test"))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(prepare_retrieval, "DOCSTRING_PACKAGES", {"fakedocs": "fakedocs", "absentdocs": "absentdocs"})
    paragraphs = prepare_retrieval.read_docstring_paragraphs()
    assert len(paragraphs) == 12  # one per file: no private, templated, aliased or test-directory docstring
    topic, (summary, description) = paragraphs[0]
    assert topic == "fakedocs.module0.__init__"
    assert summary == "Compute the arithmetic mean of each row of a matrix number 0."
    assert description.startswith("The rows of matrix 0 are averaged one by one")
    assert "Parameters: a : array_like The matrix." in description and "Returns: out : ndarray" in description
    assert "Examples" not in description and summary not in description

    output = tmp_path / "data"
    assert prepare_retrieval.main(["--source", "docstrings", "--output-dir", str(output), "--negatives", "2"]) == 0
    read = lambda name: [json.loads(line) for line in (output / f"{name}.jsonl").read_text().splitlines()]  # noqa: E731
    texts = {summary: description for _, (summary, description) in paragraphs}
    splits = {name: read(name) for name in ("train", "valid", "test")}
    for name, records in splits.items():
        for record in records:
            assert record["query"] in texts  # every query is a summary
            assert record["document"] in texts.values()  # every document is a description, never a summary
            assert (record["rel"] == 1.0) == (texts[record["query"]] == record["document"])
    train_queries = {record["query"] for record in splits["train"]}
    assert train_queries and not train_queries & {record["query"] for record in splits["test"]}
    assert [row["text"] for row in read("corpus")] == [description for _, (_, description) in paragraphs]
    with pytest.raises(SystemExit) as refused:
        prepare_retrieval.main(["--source", "docstrings", "--output-dir", str(output), "--all-train-sentences"])
    assert refused.value.code == 2


# ---------------------------------------------------------------- instructions and sizes reach every inference path

@pytest.fixture(scope="module")
def instructed_model_dir(tiny_model_dir, tmp_path_factory):
    model = tiny_vector_model(tiny_model_dir, projection_dim=16, query_instruction="query: ",
                              passage_instruction="passage: ", matryoshka_dims=[8, 4])
    return model.save_pretrained(tmp_path_factory.mktemp("instructed") / "model")


def test_inference_torch_and_onnx_apply_the_instruction_and_the_sizes(instructed_model_dir, tmp_path):
    import numpy as np

    import export_onnx
    from common import inference
    model = BertVectorModel.from_pretrained(instructed_model_dir)
    onnx_path = tmp_path / "vector.onnx"
    assert export_onnx.main(["--model-path", str(instructed_model_dir), "--output-path", str(onnx_path)]) == 0
    for loaded in (inference.load_model(str(instructed_model_dir)), inference.load_model(str(onnx_path))):
        for side, encode_side in (("query", "query"), ("doc", "document")):
            vectors = inference.embed(loaded, ["good movie", "the stock market"], side=side)
            assert np.allclose(vectors, model.encode(["good movie", "the stock market"], side=encode_side).numpy(),
                               atol=1e-4), (loaded.backend, side)
        cut = inference.embed(loaded, ["good movie"], dim=4)
        assert cut.shape == (1, 4) and np.allclose(cut, model.encode(["good movie"], dim=4).numpy(), atol=1e-4)
        with pytest.raises(UserError, match="8, 4"):
            inference.embed(loaded, ["good movie"], dim=5)
    service = inference.VectorService(inference.load_model(str(instructed_model_dir)))
    assert service.count_tokens(["good movie"]) == [len(model.tokenizer("query: good movie")["input_ids"])]


def test_infer_cli_takes_a_trained_dim_and_refuses_another(instructed_model_dir, capsys):
    import infer
    assert infer.main(["--model-path", str(instructed_model_dir), "--text", "good movie", "--dim", "8", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["dim"] == 8
    assert infer.main(["--model-path", str(instructed_model_dir), "--text", "good movie", "--dim", "12"]) == 2
    assert_one_error_line(capsys.readouterr().err, "dimension 12", "16, 8, 4")


def test_server_gives_a_trained_size_and_refuses_another(instructed_model_dir):
    import numpy as np

    from common import inference, server
    from test_server_openai import post_all
    app = server.create_app(inference.VectorService(inference.load_model(str(instructed_model_dir))))
    full, cut, refused = post_all(app, [("/v1/embeddings", {"input": "good movie", "model": "m"}),
                                        ("/v1/embeddings", {"input": "good movie", "model": "m", "dimensions": 8}),
                                        ("/v1/embeddings", {"input": "good movie", "model": "m", "dimensions": 12})])
    vector = np.array(full.json()["data"][0]["embedding"])
    assert len(vector) == 16 and cut.status_code == 200
    assert np.allclose(cut.json()["data"][0]["embedding"], vector[:8] / np.linalg.norm(vector[:8]), atol=1e-5)
    assert refused.status_code == 400 and "16, 8, 4" in refused.text
