"""infer.py: both backends agree, batching keeps input order, bad inputs are reported, output shapes."""
import errno
import io
import json

import numpy as np
import pytest

import export_onnx
import infer
from common import files, inference
from conftest import assert_one_error_line, write_jsonl
from test_export_onnx import LABELS, make_model_directory

TEXTS = ["good movie", "a terrible film that was not very good at all and the music was bad", "今天天气真好啊",
         "sad", "this is a great movie and i love it", "the team game", "stock price", "很开心"]


@pytest.fixture(scope="module")
def classifier_dir(tiny_model_dir, tmp_path_factory):
    return make_model_directory(tiny_model_dir, tmp_path_factory.mktemp("classifier"), temperature=2.5, seed=3)


@pytest.fixture(scope="module")
def onnx_path(classifier_dir, tmp_path_factory):
    output = tmp_path_factory.mktemp("export") / "model.onnx"
    assert export_onnx.main(["--model-path", str(classifier_dir), "--output-path", str(output)]) == 0
    return output


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_torch_and_onnx_backends_give_the_same_labels_on_a_file(classifier_dir, onnx_path, tmp_path):
    input_file = write_jsonl(tmp_path / "inputs.jsonl", [{"text": text} for text in TEXTS])
    for name, model_path in (("torch", classifier_dir), ("onnx", onnx_path)):
        assert infer.main(["--model-path", str(model_path), "--file", str(input_file), "--batch-size", "3",
                           "--output", str(tmp_path / f"{name}.jsonl")]) == 0
    torch_rows, onnx_rows = read_jsonl(tmp_path / "torch.jsonl"), read_jsonl(tmp_path / "onnx.jsonl")
    assert [row["label"] for row in torch_rows] == [row["label"] for row in onnx_rows]
    assert len({row["label"] for row in torch_rows}) >= 1 and len(torch_rows) == len(TEXTS)
    for torch_row, onnx_row in zip(torch_rows, onnx_rows):
        for name in LABELS.values():
            assert abs(torch_row["probabilities"][name] - onnx_row["probabilities"][name]) < 1e-4


def test_length_sorted_batches_come_back_in_input_order(classifier_dir):
    loaded = inference.load_torch_model(classifier_dir)
    one_at_a_time = inference.classify(loaded, TEXTS, batch_size=1)
    sorted_batches = inference.classify(loaded, TEXTS, batch_size=3, sort_by_length=True)
    fixed_order = inference.classify(loaded, TEXTS, batch_size=3, sort_by_length=False)
    assert [row["input"] for row in sorted_batches] == TEXTS
    for results in (sorted_batches, fixed_order):
        for alone, batched in zip(one_at_a_time, results):
            assert batched["input"] == alone["input"]
            assert np.allclose(list(batched["probabilities"].values()), list(alone["probabilities"].values()),
                               atol=1e-5)
    batches = inference.length_sorted_batches([3, 9, 1, 7], 2)
    assert batches == [[1, 3], [0, 2]]  # longest first, so each batch pads little


def test_bad_lines_are_reported_by_line_number_and_the_rest_processed(classifier_dir, tmp_path, capsys):
    input_file = tmp_path / "inputs.jsonl"
    input_file.write_text('{"text": "good movie"}\n{"text": ""}\nnot json\n{"txt": "wrong field"}\n'
                          '{"text": "very sad"}\n', encoding="utf-8")
    output = tmp_path / "out.jsonl"
    assert infer.main(["--model-path", str(classifier_dir), "--file", str(input_file), "--output", str(output)]) == 1
    rows = read_jsonl(output)
    assert [row.get("input") for row in rows] == ["good movie", None, None, None, "very sad"]
    assert [row["source"].split()[-1] for row in rows] == ["1", "2", "3", "4", "5"]
    err = capsys.readouterr().err
    assert "line 2" in err and "empty" in err and "line 3" in err and "invalid JSON" in err
    assert "line 4: field 'text': missing" in err and "3 of 5 input(s) could not be processed" in err


def test_text_file_with_blank_lines_and_csv_records(classifier_dir, tmp_path, capsys):
    text_file = tmp_path / "inputs.txt"
    text_file.write_text("good movie\n   \nbad movie\n\n", encoding="utf-8")
    assert infer.main(["--model-path", str(classifier_dir), "--file", str(text_file), "--json"]) == 1
    captured = capsys.readouterr()
    rows = [json.loads(line) for line in captured.out.splitlines()]
    assert [row.get("input") for row in rows] == ["good movie", None, "bad movie"]
    assert "inputs.txt line 2: empty or whitespace-only text" in captured.err
    csv_file = tmp_path / "inputs.csv"
    csv_file.write_text("message,context\nhappy,今天下雨了\nsad,\n", encoding="utf-8")
    assert infer.main(["--model-path", str(classifier_dir), "--file", str(csv_file), "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert rows[0]["context"] == "今天下雨了" and "context" not in rows[1]


def test_empty_text_gets_a_clear_message(classifier_dir, capsys, monkeypatch):
    assert infer.main(["--model-path", str(classifier_dir), "--text", "   "]) == 1
    assert "--text 1: empty or whitespace-only text" in capsys.readouterr().err
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"")))  # `< /dev/null`: not a terminal
    assert infer.main(["--model-path", str(classifier_dir)]) == 2
    assert_one_error_line(capsys.readouterr().err, "no input: stdin is empty")


def test_an_endless_standard_input_is_one_line_not_all_memory(classifier_dir, capsys, monkeypatch):
    class Endless(io.RawIOBase):  # `< /dev/zero` or `yes |`: a stream that never ends
        def readable(self):
            return True

        def readinto(self, buffer):
            buffer[:] = b"y\n" * (len(buffer) // 2) + b"y" * (len(buffer) % 2)
            return len(buffer)
    monkeypatch.setattr(infer, "MAX_STDIN_BYTES", 1000)
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BufferedReader(Endless())))
    assert infer.main(["--model-path", str(classifier_dir)]) == 2
    assert_one_error_line(capsys.readouterr().err, "stdin", "without an end", "--file")


def test_json_output_shape_and_default_temperature(classifier_dir, capsys):
    assert infer.main(["--model-path", str(classifier_dir), "--text", "good movie", "--text", "sad", "--json",
                       "--top-k", "2"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(rows) == 2
    row = rows[0]
    assert set(row) >= {"input", "temperature", "label", "label_id", "probability", "probabilities", "top_k"}
    assert row["temperature"] == 2.5  # the calibrated temperature stored in the model directory
    assert set(row["probabilities"]) == set(LABELS.values())
    assert abs(sum(row["probabilities"].values()) - 1) < 1e-4
    assert LABELS[row["label_id"]] == row["label"] == row["top_k"][0]["label"] and len(row["top_k"]) == 2
    assert infer.main(["--model-path", str(classifier_dir), "--text", "good movie", "--json",
                       "--temperature", "0.5"]) == 0
    sharper = json.loads(capsys.readouterr().out)
    assert sharper["temperature"] == 0.5 and sharper["probability"] > row["probability"]


def test_human_readable_output_follows_seed_002(classifier_dir, capsys):
    assert infer.main(["--model-path", str(classifier_dir), "--text", "今天天气真好啊", "--context", "昨天下雨了"]) == 0
    out = capsys.readouterr().out
    assert "input: 今天天气真好啊" in out and "context: 昨天下雨了" in out and "temperature: 2.5" in out
    assert "predicted: " in out and "(id " in out
    assert all(f"  {name}" in out for name in LABELS.values())


def test_context_changes_the_encoding(classifier_dir):
    loaded = inference.load_torch_model(classifier_dir)
    alone = inference.encode_inputs(loaded, ["good movie"])[0]
    paired = inference.encode_inputs(loaded, ["good movie"], ["very sad"])[0]
    assert 1 in paired["token_type_ids"] and len(paired["input_ids"]) > len(alone["input_ids"])


def test_backend_mismatches_are_user_errors(classifier_dir, onnx_path, capsys):
    assert infer.main(["--model-path", str(classifier_dir), "--backend", "onnx", "--text", "x"]) == 2
    assert infer.main(["--model-path", str(onnx_path), "--backend", "torch", "--text", "x"]) == 2
    assert "export" in capsys.readouterr().err


def test_services_for_the_server(classifier_dir, onnx_path):
    for model_path in (classifier_dir, onnx_path):
        service = inference.build_service(inference.load_model(model_path))
        assert service.kind == "classification"
        assert service.info()["labels"] == list(LABELS.values())
        results = service.predict(["good movie", "sad"], ["very happy", None])
        assert len(results) == 2 and results[0]["context"] == "very happy"
        with pytest.raises(Exception, match="empty"):
            service.predict(["good", " "])


def test_long_documents_chunk_aggregate_and_explain_through_both_backends(tiny_model_dir, tmp_path, capsys):
    model_dir = make_model_directory(tiny_model_dir, tmp_path / "longdoc", task="longdoc", pooling="cls", max_length=16)
    output = tmp_path / "longdoc.onnx"
    assert export_onnx.main(["--model-path", str(model_dir), "--output-path", str(output)]) == 0
    capsys.readouterr()
    long_text = " ".join(["good movie and the music was great"] * 6)
    rows = {}
    for name, path in (("torch", model_dir), ("onnx", output)):
        assert infer.main(["--model-path", str(path), "--text", long_text, "--text", "sad", "--json",
                           "--explain", "2", "--batch-size", "3"]) == 0
        rows[name] = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    long_row, short_row = rows["torch"]
    assert long_row["num_chunks"] > 1 and short_row["num_chunks"] == 1
    assert len(long_row["top_chunks"]) == 2 and long_row["top_chunks"][0]["text"]
    assert set(long_row["probabilities"]) == set(LABELS.values()) and long_row["temperature"] == 1.0
    assert [row["label"] for row in rows["torch"]] == [row["label"] for row in rows["onnx"]]
    assert abs(long_row["probability"] - rows["onnx"][0]["probability"]) < 1e-4
    assert infer.main(["--model-path", str(model_dir), "--text", long_text, "--explain", "1"]) == 0
    assert "chunks: " in capsys.readouterr().out


def test_vector_models_print_embedding_norm_and_similarity(tiny_model_dir, tmp_path, capsys):
    from test_export_onnx import make_vector_directory
    model_dir = make_vector_directory(tiny_model_dir, tmp_path / "vector")
    output = tmp_path / "vector.onnx"
    assert export_onnx.main(["--model-path", str(model_dir), "--output-path", str(output)]) == 0
    capsys.readouterr()
    rows = {}
    for name, path in (("torch", model_dir), ("onnx", output)):
        assert infer.main(["--model-path", str(path), "--text", "good movie", "--text", "good movie",
                           "--text-pair", "good movie", "--json"]) == 0
        rows[name] = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    row = rows["torch"][0]
    assert row["dim"] == 16 and abs(row["norm"] - 1.0) < 1e-4 and abs(row["cosine_similarity"] - 1.0) < 1e-4
    assert np.allclose(row["embedding"], rows["onnx"][0]["embedding"], atol=1e-4)
    assert infer.main(["--model-path", str(model_dir), "--text", "good movie", "--text-pair", "bad film"]) == 0
    out = capsys.readouterr().out
    assert "norm: 1.0000" in out and "cosine similarity: " in out and "embedding (dim 16)" in out
    service = inference.build_service(inference.load_model(output))
    assert service.kind == "vector" and len(service.encode_documents(["a b"])[0]) == 16
    assert service.info()["dim"] == 16  # an ONNX export has no backbone config: measured


def test_serve_exposes_predict_with_the_model_preprocessing(classifier_dir, onnx_path, monkeypatch):
    from fastapi.testclient import TestClient
    from common import server
    started = {}
    monkeypatch.setattr(server, "serve", lambda app, host, port: started.update(app=app, host=host, port=port))
    assert infer.main(["--model-path", str(onnx_path), "--serve", "--port", "8123", "--api-key", "secret"]) == 0
    assert started["port"] == 8123
    expected = inference.classify(inference.load_model(classifier_dir), ["good movie"], ["very sad"])[0]
    with TestClient(started["app"]) as client:
        assert client.post("/predict", json={"texts": ["good movie"]}).status_code == 401
        response = client.post("/predict", json={"texts": ["good movie"], "contexts": ["very sad"]},
                               headers={"Authorization": "Bearer secret"})
        assert response.status_code == 200
        prediction = response.json()["predictions"][0]
        assert prediction["label"] == expected["label"] and prediction["temperature"] == 2.5
        assert abs(prediction["probability"] - expected["probability"]) < 1e-4
        info = client.get("/info", headers={"X-API-Key": "secret"}).json()
        assert info["labels"] == list(LABELS.values()) and info["backend"] == "onnx"


# ---------------------------------------------------------------- --output, long-document files, flags per kind

@pytest.fixture(scope="module")
def longdoc_dir(tiny_model_dir, tmp_path_factory):
    return make_model_directory(tiny_model_dir, tmp_path_factory.mktemp("longdoc"), task="longdoc", max_length=16)


@pytest.fixture(scope="module")
def vector_dir(tiny_model_dir, tmp_path_factory):
    from test_export_onnx import make_vector_directory
    return make_vector_directory(tiny_model_dir, tmp_path_factory.mktemp("vector"))


def test_bad_output_path_fails_before_the_model_loads(classifier_dir, tmp_path, monkeypatch, capsys):
    def must_not_load(*args, **kwargs):
        raise AssertionError("the model was loaded before --output was checked")
    monkeypatch.setattr(inference, "load_model", must_not_load)
    regular_file = tmp_path / "notes.txt"
    regular_file.write_text("x", encoding="utf-8")
    for bad, message in ((tmp_path, "is a directory"), (regular_file / "out.jsonl", "is a file, not a folder"),
                         (regular_file / "a" / "b" / "out.jsonl", "is a file, not a folder")):
        assert infer.main(["--model-path", str(classifier_dir), "--text", "good", "--output", str(bad)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: --output {bad}: ") and message in err and len(err.splitlines()) == 1


def test_output_folders_are_created_and_results_written_atomically(classifier_dir, tmp_path, monkeypatch, capsys):
    nested = tmp_path / "new" / "folder" / "out.jsonl"
    assert infer.main(["--model-path", str(classifier_dir), "--text", "good", "--output", str(nested)]) == 0
    assert len(read_jsonl(nested)) == 1 and sorted(path.name for path in nested.parent.iterdir()) == ["out.jsonl"]
    existing = tmp_path / "existing.jsonl"
    existing.write_text("old results\n", encoding="utf-8")
    capsys.readouterr()

    def disk_full(descriptor):  # the data went to the page cache; flushing it finds the disk full
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(files.os, "fsync", disk_full)
    assert infer.main(["--model-path", str(classifier_dir), "--text", "good", "--text", "sad",
                       "--output", str(existing)]) == 2
    assert_one_error_line(capsys.readouterr().err, f"--output {existing}", "No space left on device")
    assert existing.read_text(encoding="utf-8") == "old results\n"
    assert [path.name for path in tmp_path.iterdir() if path.name.endswith(".tmp")] == []


def test_a_text_file_is_one_document_for_long_document_models(longdoc_dir, tmp_path, capsys):
    article = tmp_path / "article.txt"
    text = "good movie and the music was great\n\nthe team game was bad\n   \nvery sad film\n"
    article.write_text(text, encoding="utf-8")
    output = tmp_path / "out.jsonl"
    assert infer.main(["--model-path", str(longdoc_dir), "--file", str(article), "--output", str(output)]) == 0
    rows = read_jsonl(output)
    assert len(rows) == 1 and rows[0]["input"] == text and rows[0]["source"] == str(article)
    assert rows[0]["num_chunks"] > 1
    records = write_jsonl(tmp_path / "articles.jsonl", [{"text": text}, {"text": "sad"}])
    assert infer.main(["--model-path", str(longdoc_dir), "--file", str(records), "--json"]) == 0
    assert [json.loads(line)["input"] for line in capsys.readouterr().out.splitlines()] == [text, "sad"]
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n", encoding="utf-8")
    assert infer.main(["--model-path", str(longdoc_dir), "--file", str(empty)]) == 2
    assert "empty.txt: the file is empty" in capsys.readouterr().err


def test_top_k_works_for_long_document_models(longdoc_dir, capsys):
    assert infer.main(["--model-path", str(longdoc_dir), "--text", "good movie", "--top-k", "2", "--json"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert [entry["label"] for entry in row["top_k"]][:1] == [row["label"]] and len(row["top_k"]) == 2
    assert infer.main(["--model-path", str(longdoc_dir), "--text", "good movie", "--top-k", "1"]) == 0
    assert "top 1:" in capsys.readouterr().out


def test_context_for_models_that_take_none_is_an_error(longdoc_dir, vector_dir, tmp_path, capsys):
    for model_dir, task in ((longdoc_dir, "longdoc"), (vector_dir, "vector")):
        assert infer.main(["--model-path", str(model_dir), "--text", "good", "--context", "sad"]) == 2
        assert f"--context is for classification models; {model_dir} is a {task} model" in capsys.readouterr().err
    records = write_jsonl(tmp_path / "in.jsonl", [{"message": "good", "context": "sad"}, {"message": "bad"}])
    output = tmp_path / "out.jsonl"
    assert infer.main(["--model-path", str(longdoc_dir), "--file", str(records), "--output", str(output)]) == 1
    rows = read_jsonl(output)
    assert "line 1: field 'context': a longdoc model takes no context" in rows[0]["error"] and "label" in rows[1]
    assert infer.main(["--model-path", str(vector_dir), "--text", "good", "--explain", "2"]) == 2
    assert "--explain is for longdoc models" in capsys.readouterr().err


def test_serve_long_document_model_refuses_contexts(longdoc_dir, monkeypatch):
    from fastapi.testclient import TestClient
    from common import server
    started = {}
    monkeypatch.setattr(server, "serve", lambda app, host, port: started.update(app=app))
    assert infer.main(["--model-path", str(longdoc_dir), "--serve"]) == 0
    with TestClient(started["app"]) as client:
        response = client.post("/predict", json={"texts": ["good", "bad"], "contexts": [None, "sad"]})
        assert response.status_code == 422 and response.headers["content-type"] == "application/json"
        assert "contexts[1]: a long-document model takes no context" in response.json()["detail"]
        assert client.post("/predict", json={"texts": ["good"], "contexts": [None]}).status_code == 200
        assert len(client.post("/predict", json={"texts": ["good", "bad"]}).json()["predictions"]) == 2


def test_serve_vector_model_with_a_corpus(vector_dir, classifier_dir, tmp_path, monkeypatch, capsys):
    from fastapi.testclient import TestClient
    from common import server
    started = {}
    monkeypatch.setattr(server, "serve", lambda app, host, port: started.update(app=app))
    corpus = write_jsonl(tmp_path / "corpus.jsonl", [{"id": "a", "text": "good movie"}, {"id": 7, "text": "stock price"},
                                                     {"id": "c", "text": "the team game"}])
    assert infer.main(["--model-path", str(vector_dir), "--serve", "--corpus", str(corpus)]) == 0
    with TestClient(started["app"]) as client:
        info = client.get("/info").json()
        assert info["dim"] == 16 and info["query_max_length"] == 16 and info["doc_max_length"] == 32
        assert info["model"] == vector_dir.name and info["corpus_size"] == 3
        results = client.post("/search", json={"query": "stock price", "top_k": 2}).json()["results"]
        assert len(results) == 2 and results[0]["id"] == "7" and results[0]["score"] > results[1]["score"]
    assert infer.main(["--model-path", str(classifier_dir), "--serve", "--corpus", str(corpus)]) == 2
    assert "--corpus is for vector models" in capsys.readouterr().err
    assert infer.main(["--model-path", str(vector_dir), "--text", "stock price", "--corpus", str(corpus),
                       "--top-k", "2", "--json"]) == 0  # without --serve: each input lists its nearest entries
    hits = json.loads(capsys.readouterr().out)["hits"]
    assert [hit["id"] for hit in hits] == [str(row["id"]) for row in results] and hits[0]["score"] > hits[1]["score"]
    assert infer.main(["--model-path", str(vector_dir), "--text", "good", "--top-k", "2"]) == 2
    assert "--top-k for a vector model is the number of --corpus entries" in capsys.readouterr().err
    bad_corpus = write_jsonl(tmp_path / "bad.jsonl", [{"id": "a", "text": "good"}, {"text": "no id"}])
    assert infer.main(["--model-path", str(vector_dir), "--serve", "--corpus", str(bad_corpus)]) == 2
    assert "bad.jsonl line 2: field 'id'" in capsys.readouterr().err


def test_max_length_overrides_the_stored_value(classifier_dir, vector_dir, capsys):
    base = ["--model-path", str(classifier_dir), "--json"]
    # right truncation to 5 tokens keeps [CLS] good movie and [SEP]
    assert infer.main(base + ["--text", "good movie and the music was great", "--max_length", "5"]) == 0
    captured = capsys.readouterr()
    truncated = json.loads(captured.out)
    assert captured.err.strip() == ("--max-length 5 overrides the model's stored max_length 32 "
                                    "(the rest of the preprocessing still comes from the model)")
    assert infer.main(base + ["--text", "good movie and"]) == 0
    expected = json.loads(capsys.readouterr().out)
    assert truncated["probabilities"] == expected["probabilities"]
    assert infer.main(base + ["--text", "good", "--max-length", "32"]) == 0
    assert capsys.readouterr().err == ""  # the stored value: nothing to say
    assert infer.main(["--model-path", str(vector_dir), "--text", "good", "--max-length", "8"]) == 0
    assert "stored max_length 32, query_max_length 16, doc_max_length 32" in capsys.readouterr().err
    assert infer.main(base + ["--text", "good", "--max-length", "100000"]) == 2
    assert "--max-length 100000: must be between 3 and 512" in capsys.readouterr().err
