"""Hostile input, round 5: a strip pattern that backtracks without end is one line (training, inference,
the server, an ONNX export), not a hang; a text that --normalize empties is refused by every trainer;
graded relevance past [0, 1] says how to fix it, and no pointwise target exceeds 1; an ONNX export's stored
max length past its graph's positions is refused when it loads."""
import argparse
import contextlib
import json
import signal

import pytest

import export_onnx
import infer
import train_classifier
import train_longdoc
import train_vector
from common import inference, longdoc, modeldir
from common.pairs import PairExample
from conftest import assert_one_error_line, make_text_records, trainer_argv, write_jsonl
from test_export_onnx import make_model_directory

# (a+)+$ on a run of "a"s that ends in another letter tries every way to split the run: 2^5000 of them
HOSTILE_PATTERN = "(a+)+$"
HOSTILE_TEXT = "a" * 5000 + "b"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def short_strip_time(monkeypatch):
    """A strip pattern's time cut to 0.2 s, so each refusal below takes a moment."""
    monkeypatch.setattr(longdoc, "STRIP_SECONDS", 0.2, raising=False)  # raising: the old code had none


@contextlib.contextmanager
def deadline(seconds):
    """Fail (not hang) when the body runs past ``seconds``: the old code's ``re`` never returned. ``re``
    checks for signals while it matches, so the alarm's exception ends it."""
    def expire(signum, frame):
        raise AssertionError(f"still running after {seconds} s: a hang")
    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# ---------------------------------------------------------------- 1. strip patterns that never finish

def longdoc_records(extra_text=None):
    records = [{"text": f"the {topic} news was very good {index}", "label": label}
               for index in range(4) for topic, label in (("game team", "sports"), ("stock price", "market"))]
    if extra_text is not None:
        records.insert(2, {"text": extra_text, "label": "sports"})
    return records


def test_a_backtracking_strip_pattern_is_one_line_at_training_naming_its_line_and_the_document(tmp_path, capsys):
    data = write_jsonl(tmp_path / "train.jsonl", longdoc_records(HOSTILE_TEXT))
    patterns = tmp_path / "patterns.txt"
    patterns.write_text("# bylines\n^By [A-Za-z ]+$\n" + HOSTILE_PATTERN + "\n", encoding="utf-8")
    with deadline(20):
        code = train_longdoc.main(["--data-path", str(data), "--model-name", str(tmp_path / "no-model"),
                                   "--output-dir", str(tmp_path / "out"), "--max-length", "16", "--stride", "4",
                                   "--strip-patterns", str(patterns)])
    assert code == 2
    assert_one_error_line(capsys.readouterr().err, f"{data} line 3: field 'text'", f"'{HOSTILE_PATTERN}'",
                          f"{patterns} line 3", "took more than")
    assert not (tmp_path / "out" / "train_log.jsonl").exists()


def test_a_backtracking_strip_pattern_on_an_unlabeled_text_names_its_line(tiny_model_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "train.jsonl", longdoc_records())
    unlabeled = tmp_path / "unlabeled.txt"
    unlabeled.write_text(f"the game was good\n\n{HOSTILE_TEXT}\n", encoding="utf-8")
    patterns = tmp_path / "patterns.txt"
    patterns.write_text(HOSTILE_PATTERN + "\n", encoding="utf-8")
    with deadline(60):
        code = train_longdoc.main(["--data-path", str(data), "--model-name", str(tiny_model_dir),
                                   "--output-dir", str(tmp_path / "out"), "--max-length", "16", "--stride", "4",
                                   "--strip-patterns", str(patterns), "--extend-vocab", "1",
                                   "--unlabeled-path", str(unlabeled)])
    assert code == 2
    assert_one_error_line(capsys.readouterr().err, f"{unlabeled} line 3: strip pattern '{HOSTILE_PATTERN}'",
                          f"{patterns} line 1", "took more than")


@pytest.fixture(scope="module")
def hostile_longdoc_dir(tiny_model_dir, tmp_path_factory):
    """A long-document model whose stored strip patterns are an ordinary byline pattern and a hostile one."""
    directory = make_model_directory(tiny_model_dir, tmp_path_factory.mktemp("longdoc") / "model", task="longdoc")
    config = json.loads((directory / modeldir.CONFIG_FILE).read_text())
    config["toolkit"]["longdoc"]["strip_patterns"] = ["^By [A-Za-z ]+$", HOSTILE_PATTERN]
    (directory / modeldir.CONFIG_FILE).write_text(json.dumps(config), encoding="utf-8")
    return directory


def test_stored_patterns_keep_re_semantics_and_a_hostile_text_is_one_error_at_inference(hostile_longdoc_dir):
    loaded = inference.load_model(hostile_longdoc_dir)
    body = "the game and the team was very good"
    with deadline(20):
        plain, with_byline = inference.predict_long_documents(loaded, [body, f"By Some Reporter\n{body}\nBy Another"],
                                                              explain=1)
        # MULTILINE still holds: ^ and $ anchor to lines, so both bylines go and the text is the body alone
        assert with_byline["top_chunks"][0]["text"].strip() == body
        assert with_byline["probabilities"] == plain["probabilities"]
        with pytest.raises(inference.UserError) as refused:
            inference.predict_long_documents(loaded, [body, HOSTILE_TEXT])
    message = str(refused.value)
    assert message.startswith("input 2: strip pattern '(a+)+$' (toolkit.longdoc.strip_patterns[1] of ")
    assert "took more than" in message and "\n" not in message


def test_a_hostile_text_is_one_line_from_infer_and_a_422_from_the_server(hostile_longdoc_dir, tmp_path, capsys,
                                                                        monkeypatch):
    from fastapi.testclient import TestClient
    from common import server
    with deadline(30):
        assert infer.main(["--model-path", str(hostile_longdoc_dir), "--text", HOSTILE_TEXT]) == 2
        assert_one_error_line(capsys.readouterr().err, "--text 1: strip pattern '(a+)+$'", "took more than")
        documents = tmp_path / "documents.jsonl"
        documents.write_text(json.dumps({"text": "the game was good"}) + "\n" + json.dumps({"text": HOSTILE_TEXT}) + "\n",
                             encoding="utf-8")
        assert infer.main(["--model-path", str(hostile_longdoc_dir), "--file", str(documents)]) == 2
        assert_one_error_line(capsys.readouterr().err, f"{documents} line 2: strip pattern '(a+)+$'")
        app = server.create_app(inference.build_service(inference.load_model(hostile_longdoc_dir)))
        with TestClient(app) as client:
            response = client.post("/predict", json={"texts": ["the game was good", HOSTILE_TEXT]})
            assert response.status_code == 422, response.text
            assert response.json()["detail"].startswith("texts[1]: strip pattern '(a+)+$'")
            assert client.get("/health").status_code == 200
            assert client.post("/predict", json={"texts": ["the game was good"]}).status_code == 200


def test_an_onnx_export_applies_the_same_bound(hostile_longdoc_dir, tmp_path, capsys):
    output = tmp_path / "export" / "longdoc.onnx"
    assert export_onnx.main(["--model-path", str(hostile_longdoc_dir), "--output-path", str(output),
                             "--optimize", "false"]) == 0
    capsys.readouterr()
    with deadline(20):
        assert infer.main(["--model-path", str(output), "--text", HOSTILE_TEXT]) == 2
    assert_one_error_line(capsys.readouterr().err, "--text 1: strip pattern '(a+)+$'", "longdoc.onnx", "took more than")


# ---------------------------------------------------------------- 2. texts that --normalize empties

EMOJI_ONLY = "\U0001F600\U0001F600 \u2764\ufe0f"
LINK_ONLY = "https://example.com/a?b=c www.example.org"


def classifier_records(bad):
    records = make_text_records(4)
    records.insert(2, bad)
    return records


NORMALIZE_CASES = {
    "single_label text": ([], lambda: classifier_records({"text": EMOJI_ONLY, "label": "positive"}),
                          "social,emoji=drop", "line 3: field 'text'"),
    "links dropped": ([], lambda: classifier_records({"text": LINK_ONLY, "label": "negative"}),
                      "social,urls=drop", "line 3: field 'text'"),
    "message and context": ([], lambda: [{"message": r["text"], "context": "hello", "label": r["label"]}
                                         for r in classifier_records({"text": EMOJI_ONLY, "label": "positive"})],
                            "emoji=drop", "line 3: field 'message'"),
    "chat": ([], lambda: [{"messages": [{"role": "system", "content": "classify"},
                                        {"role": "user", "content": r["text"]},
                                        {"role": "assistant", "content": r["label"]}]}
                          for r in classifier_records({"text": EMOJI_ONLY, "label": "positive"})],
             "emoji=drop", "line 3: field 'messages[1].content'"),
    "multi_label": (["--problem-type", "multi_label"],
                    lambda: [{"text": r["text"], "label": [r["label"], "other"] if i % 2 else [r["label"]]}
                             for i, r in enumerate(classifier_records({"text": EMOJI_ONLY, "label": "positive"}))],
                    "emoji=drop", "line 3: field 'text'"),
    "regression": (["--problem-type", "regression"],
                   lambda: [{"text": r["text"], "label": float(i)}
                            for i, r in enumerate(classifier_records({"text": EMOJI_ONLY, "label": "positive"}))],
                   "emoji=drop", "line 3: field 'text'"),
    "rerank document": (["--problem-type", "rerank"],
                        lambda: [{"query": f"query {i % 3}", "document": EMOJI_ONLY if i == 2 else f"doc {i}",
                                  "rel": float(i % 2)} for i in range(8)],
                        "emoji=drop", "line 3: field 'document'"),
    "rerank query group": (["--problem-type", "rerank"],
                           lambda: [{"query": f"query {i}", "pos": ["good doc"],
                                     "neg": ["bad doc", LINK_ONLY] if i == 1 else ["bad doc"]} for i in range(6)],
                           "urls=drop", "line 2: field 'neg[1]'"),
}


@pytest.mark.parametrize("case", list(NORMALIZE_CASES))
def test_a_classifier_text_that_normalize_empties_is_refused_before_the_model_loads(case, tmp_path, capsys):
    extra, records, normalize, where = NORMALIZE_CASES[case]
    path = write_jsonl(tmp_path / "d.jsonl", records())
    assert train_classifier.main(["--data-path", str(path), "--model-name", str(tmp_path / "no-model"),
                                  "--output-dir", str(tmp_path / "out"), "--normalize", normalize, *extra]) == 2
    assert_one_error_line(capsys.readouterr().err, f"{path} {where}", "nothing left after --normalize",
                          "drop these records")
    assert not (tmp_path / "out" / "train_log.jsonl").exists()


def test_a_validation_text_that_normalize_empties_names_the_validation_file(tmp_path, capsys):
    train = write_jsonl(tmp_path / "train.jsonl", make_text_records(4))
    val = write_jsonl(tmp_path / "val.jsonl", classifier_records({"text": EMOJI_ONLY, "label": "positive"})
                      + [{"text": LINK_ONLY, "label": "negative"}])
    assert train_classifier.main(["--data-path", str(train), "--val-path", str(val), "--model-name",
                                  str(tmp_path / "no-model"), "--output-dir", str(tmp_path / "out"),
                                  "--normalize", "emoji=drop,urls=drop"]) == 2
    assert_one_error_line(capsys.readouterr().err, f"{val} line 3: field 'text'", "(and 1 more texts)")


def test_a_long_document_in_the_message_format_is_named_by_its_own_field(tmp_path, capsys):
    """The long-document check named every emptied document's field 'text', whatever the file called it."""
    records = [{"message": r["text"], "label": r["label"]} for r in longdoc_records(EMOJI_ONLY)]
    path = write_jsonl(tmp_path / "d.jsonl", records)
    assert train_longdoc.main(["--data-path", str(path), "--model-name", str(tmp_path / "no-model"),
                               "--output-dir", str(tmp_path / "out"), "--max-length", "16", "--stride", "4",
                               "--normalize", "emoji=drop"]) == 2
    assert_one_error_line(capsys.readouterr().err, f"{path} line 3: field 'message'", "nothing left after")


def test_a_vector_pair_that_normalize_empties_is_refused_before_the_model_loads(tmp_path, capsys):
    pairs = [{"query": f"query {i}", "document": EMOJI_ONLY if i == 1 else f"doc {i}", "rel": 1.0} for i in range(4)]
    path = write_jsonl(tmp_path / "pairs.jsonl", pairs)
    assert train_vector.main(trainer_argv("train_vector", tmp_path / "no-model", tmp_path / "out", "--train-path",
                                          path, "--val-path", path, "--normalize", "emoji=drop")) == 2
    assert_one_error_line(capsys.readouterr().err, f"{path} line 2: field 'document'", "nothing left after --normalize")


# ---------------------------------------------------------------- 3. graded relevance and pointwise targets

@pytest.mark.parametrize("where", ["train", "val"])
def test_a_zero_to_three_grade_is_refused_saying_how_to_fix_it(where, tmp_path, capsys):
    good = [{"query": f"q{i % 2}", "document": f"d{i}", "rel": float(i % 2)} for i in range(6)]
    graded = [{"query": f"q{i % 2}", "document": f"d{i}", "rel": i % 4} for i in range(6)]
    train = write_jsonl(tmp_path / "train.jsonl", graded if where == "train" else good)
    val = write_jsonl(tmp_path / "val.jsonl", graded if where == "val" else good)
    assert train_classifier.main(["--problem-type", "rerank", "--rerank-loss", "pointwise", "--data-path", str(train),
                                  "--val-path", str(val), "--model-name", str(tmp_path / "no-model"),
                                  "--output-dir", str(tmp_path / "out")]) == 2
    path = train if where == "train" else val
    assert_one_error_line(capsys.readouterr().err, f"{path} line 3: field 'rel': 2.0 is outside [0.0, 1.0]",
                          "rescale the field's values into [0, 1]")


def test_no_pointwise_target_exceeds_one_when_only_validation_has_the_top_grade(tiny_model_dir):
    """Targets were rel / the training split's top grade: a validation rel of 1 over a training top of 0.5
    was a BCE target of 2 (a validation loss that falls without end as the logits grow)."""
    def pairs(rels):
        return [PairExample(f"query {i % 2}", f"document {i}", rel, 1.0, f"f.jsonl line {i + 1}")
                for i, rel in enumerate(rels)]
    splits = {"train": pairs([0.0, 0.5, 0.0, 0.5]), "val": pairs([0.0, 1.0, 0.5, 0.0]),
              "test": pairs([0.0, 1.0, 0.0, 0.2])}
    args = argparse.Namespace(rerank_loss="pointwise", rerank_group_size=4, seed=0, max_length=16,
                              truncation_side="right")
    tokenizer = modeldir.load_tokenizer(str(tiny_model_dir))
    datasets, _ = train_classifier.encode_rerank_splits(splits, tokenizer, args, lambda text: text)
    targets = {name: [label[0] for feature in dataset.features for label in feature["labels"]]
               for name, dataset in datasets.items()}
    assert targets["train"] == [0.0, 0.5, 0.0, 0.5]  # graded on the scale of everything trained on: 1.0
    assert targets["val"] == [0.0, 1.0, 0.5, 0.0]
    assert max(targets["test"]) == 1.0


# ---------------------------------------------------------------- 4. an ONNX export's max length

@pytest.fixture(scope="module")
def classifier_export(tiny_model_dir, tmp_path_factory):
    directory = make_model_directory(tiny_model_dir, tmp_path_factory.mktemp("classifier") / "model")
    output = tmp_path_factory.mktemp("export") / "model.onnx"
    assert export_onnx.main(["--model-path", str(directory), "--output-path", str(output), "--optimize", "false"]) == 0
    return output


def edited_copy(export, directory, **changes):
    """A copy of an export (graph, tokenizer, preprocessing record) with its record changed: a key whose
    value is None is removed; ``max_length`` goes into toolkit.preprocessing."""
    import shutil
    directory.mkdir()
    shutil.copy(export, directory / export.name)
    shutil.copytree(export.parent / "tokenizer", directory / "tokenizer")
    record = json.loads(export.with_name("model.preprocessing.json").read_text())
    for key, value in changes.items():
        if key == "max_length":
            record["toolkit"]["preprocessing"]["max_length"] = value
        elif value is None:
            record.pop(key, None)
        else:
            record[key] = value
    (directory / "model.preprocessing.json").write_text(json.dumps(record), encoding="utf-8")
    return directory / export.name


def test_an_export_records_its_positions_and_a_stored_max_length_past_them_is_refused_on_load(
        classifier_export, tmp_path, capsys):
    assert json.loads(classifier_export.with_name("model.preprocessing.json").read_text())[
        "max_position_embeddings"] == 512
    damaged = edited_copy(classifier_export, tmp_path / "damaged", max_length=100000)
    assert infer.main(["--model-path", str(damaged), "--text", "good movie"]) == 2
    assert_one_error_line(capsys.readouterr().err, f"{damaged.with_name('model.preprocessing.json')}: field "
                          "'toolkit.preprocessing.max_length': 100000 exceeds the model's 512 positions")
    # an export from before the limit was recorded: the graph's position table says it
    older = edited_copy(classifier_export, tmp_path / "older", max_length=100000, max_position_embeddings=None)
    assert infer.main(["--model-path", str(older), "--text", "good movie"]) == 2
    assert_one_error_line(capsys.readouterr().err, "'toolkit.preprocessing.max_length': 100000 exceeds")
    # ...and one whose lengths fit still loads and answers
    fine = edited_copy(classifier_export, tmp_path / "fine", max_position_embeddings=None)
    assert infer.main(["--model-path", str(fine), "--text", "good movie", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["label"] in ("negative", "neutral", "positive")


@pytest.mark.parametrize("value", ["lots", 0, True, 1.5])
def test_a_damaged_position_count_is_one_line_naming_the_field(classifier_export, tmp_path, capsys, value):
    damaged = edited_copy(classifier_export, tmp_path / "damaged", max_position_embeddings=value)
    assert infer.main(["--model-path", str(damaged), "--text", "good movie"]) == 2
    assert_one_error_line(capsys.readouterr().err, "model.preprocessing.json: field 'max_position_embeddings'")
