"""text-embeddings-inference's POST /tokenize and /decode on every kind of model, and raw_scores on its /predict:
the tokens are the ones the model reads (after its stored normalization and instruction), decode turns them back
into text, raw scores are the model's logits (torch and onnxruntime alike), bad bodies are one JSON 4xx and a
request's queue place is given back."""
import json

import numpy as np
import pytest
import torch

import export_onnx
from common import data, inference, server
from common.text import build_normalizer
from test_export_onnx import make_model_directory, make_vector_directory
from test_server_tei import post_all
from test_server_rerank import make_reranker_directory, needs_reranker_directories

pytestmark = pytest.mark.usefixtures("one_thread")

NORMALIZE = "social"  # full-width to ASCII, whitespace collapsed, mentions and links as placeholders
QUERY_INSTRUCTION, PASSAGE_INSTRUCTION = "query: ", "passage: "
TEXTS = ["ＧＯＯＤ   movie @bob", "今天天气真好啊 [ad] great film"]
KINDS = ["classification", "longdoc", "vector", pytest.param("rerank", marks=needs_reranker_directories)]


def with_preprocessing(directory, **settings):
    """Store ``settings`` in the model directory's toolkit preprocessing (as a trainer's flags would)."""
    config_path = directory / "config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["toolkit"]["preprocessing"].update(settings)
    if "longdoc" in config["toolkit"]:
        config["toolkit"]["longdoc"]["strip_patterns"] = [r"\[ad\]"]  # deleted before the normalization
    config_path.write_text(json.dumps(config), encoding="utf-8")
    return directory


def build_model(kind, tiny_model_dir, directory):
    if kind == "vector":
        directory = make_vector_directory(tiny_model_dir, directory)
        return with_preprocessing(directory, normalize=NORMALIZE, query_instruction=QUERY_INSTRUCTION,
                                  passage_instruction=PASSAGE_INSTRUCTION)
    if kind == "rerank":
        directory = make_reranker_directory(tiny_model_dir, directory)
    elif kind == "longdoc":
        directory = make_model_directory(tiny_model_dir, directory, task="longdoc", max_length=16, temperature=1.5)
    else:
        directory = make_model_directory(tiny_model_dir, directory, temperature=1.5)
    return with_preprocessing(directory, normalize=NORMALIZE)


@pytest.fixture(scope="module")
def model_dirs(tiny_model_dir, tmp_path_factory):
    """{kind: model directory}, built when first asked for."""
    built = {}

    def get(kind):
        if kind not in built:
            built[kind] = build_model(kind, tiny_model_dir, tmp_path_factory.mktemp(kind))
        return built[kind]
    return get


@pytest.fixture(scope="module")
def exports(model_dirs, tmp_path_factory):
    """{kind: the ONNX export of its model directory}, exported when first asked for."""
    built = {}

    def get(kind):
        if kind not in built:
            output = tmp_path_factory.mktemp(f"{kind}-export") / "model.onnx"
            assert export_onnx.main(["--model-path", str(model_dirs(kind)), "--output-path", str(output)]) == 0
            built[kind] = output
        return built[kind]
    return get


def json_of(response):
    assert response.status_code == 200, response.text
    return response.json()


def seen_text(kind, text, prompt_name=None):
    """What the model's tokenizer reads, written out here from the stored settings (not from the service)."""
    if kind == "longdoc":
        text = text.replace("[ad]", "")
    if kind == "vector":
        text = (QUERY_INSTRUCTION if prompt_name == "query" else PASSAGE_INSTRUCTION) + text
    return build_normalizer(NORMALIZE)(text)


def expected_tokens(tokenizer, text, add_special_tokens=True):
    """TEI's tokens of ``text`` from the tokenizer itself: byte offsets into ``text``, null for special tokens."""
    encoding = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True,
                         return_special_tokens_mask=True)
    tokens = []
    for token_id, (start, stop), special in zip(encoding["input_ids"], encoding["offset_mapping"],
                                                encoding["special_tokens_mask"]):
        if special:
            tokens.append({"id": token_id, "text": tokenizer.convert_ids_to_tokens(token_id), "special": True,
                           "start": None, "stop": None})
        else:
            tokens.append({"id": token_id, "text": text[start:stop], "special": False,
                           "start": len(text[:start].encode()), "stop": len(text[:stop].encode())})
    return tokens


@pytest.mark.parametrize("kind", KINDS)
def test_tokenize_gives_the_tokens_the_model_reads_and_decode_turns_them_back(kind, model_dirs):
    loaded = inference.load_model(model_dirs(kind))
    app = server.create_app(inference.build_service(loaded))
    prompt = {"prompt_name": "query"} if kind == "vector" else {}
    batch, single, bare, prompted = map(json_of, post_all(app, [
        ("/tokenize", {"inputs": TEXTS}), ("/tokenize", {"inputs": TEXTS[0]}),
        ("/tokenize", {"inputs": TEXTS, "add_special_tokens": False}), ("/tokenize", {"inputs": TEXTS, **prompt})]))
    tokenizer = loaded.tokenizer
    assert batch == [expected_tokens(tokenizer, seen_text(kind, text)) for text in TEXTS]
    assert single == batch[:1]  # TEI answers a list of token lists for one text too
    assert bare == [expected_tokens(tokenizer, seen_text(kind, text), False) for text in TEXTS]
    assert prompted == [expected_tokens(tokenizer, seen_text(kind, text, prompt.get("prompt_name")))
                        for text in TEXTS]
    assert "bob" not in json.dumps(batch) and "ＧＯＯＤ" not in json.dumps(batch)  # the normalization applied
    for tokens, text in zip(batch, TEXTS):  # each slice is where its offsets say, in UTF-8 bytes
        seen = seen_text(kind, text).encode()
        assert all(seen[token["start"]:token["stop"]].decode() == token["text"] for token in tokens
                   if not token["special"])
    if kind == "classification":  # and they are the ids the model runs on
        assert [token["id"] for token in batch[0]] == inference.encode_inputs(loaded, TEXTS[:1])[0]["input_ids"]
    if kind == "vector":
        features = inference.encode_inputs(loaded, inference.instructed(loaded, TEXTS, "query"), None, 16)
        assert [[token["id"] for token in tokens] for tokens in prompted] == [f["input_ids"] for f in features]

    ids = [[token["id"] for token in tokens] for tokens in batch]
    decoded, with_special, one = map(json_of, post_all(app, [
        ("/decode", {"ids": ids}), ("/decode", {"ids": ids, "skip_special_tokens": False}),
        ("/decode", {"ids": ids[0]})]))
    backend = data.backend_tokenizer(tokenizer)
    assert decoded == [backend.decode(sequence, skip_special_tokens=True) for sequence in ids]
    assert with_special == [backend.decode(sequence, skip_special_tokens=False) for sequence in ids]
    assert one == decoded[:1] and with_special[0].startswith("[CLS]") and "[CLS]" not in decoded[0]
    # the round trip: the text decoded with its special tokens ([UNK] among them) is tokenized to the same ids
    again = json_of(post_all(app, [("/tokenize", {"inputs": with_special, "add_special_tokens": False})])[0])
    instruction = tokenizer(PASSAGE_INSTRUCTION, add_special_tokens=False)["input_ids"] if kind == "vector" else []
    assert [[token["id"] for token in tokens] for tokens in again] == [instruction + sequence for sequence in ids]


def test_tokenize_reads_an_onnx_exports_stored_preprocessing(model_dirs, exports):
    answers = [json_of(post_all(server.create_app(inference.build_service(inference.load_model(path))),
                                [("/tokenize", {"inputs": TEXTS, "prompt_name": "query"})])[0])
               for path in (model_dirs("vector"), exports("vector"))]
    assert answers[0] == answers[1]


@pytest.mark.parametrize("path, body, status, fragment", [
    ("/tokenize", {"inputs": []}, 422, "at least 1 item"),
    ("/tokenize", {"inputs": [["good", "movie"]]}, 422, "tokenize takes no pairs"),  # as TEI's
    ("/tokenize", {"inputs": [101, 102]}, 422, "token-id arrays are not supported"),
    ("/tokenize", {"inputs": " "}, 422, "inputs[0]: empty or whitespace-only text"),
    ("/tokenize", {"inputs": "good \ud800"}, 422, "lone surrogate"),
    ("/tokenize", {"inputs": "good", "add_special_tokens": "yes"}, 422, "add_special_tokens"),
    ("/tokenize", {"inputs": "good", "prompt_name": "query"}, 422, "this classification model has no prompts"),
    ("/tokenize", {"inputs": "good", "prompt_name": "classification"}, 422, "'query', 'document' or 'passage'"),
    ("/tokenize", {"inputs": "good", "truncate": True}, 422, "Extra inputs are not permitted"),
    ("/tokenize", {"inputs": ["good"] * 65}, 413, "inputs: 65 texts, at most 64"),
    ("/tokenize", {"inputs": ["good", "x" * 10001]}, 413, "inputs[1]: 10001 characters"),
    ("/decode", {"ids": []}, 422, "at least 1 item"),
    ("/decode", {"ids": [[]]}, 422, "at least 1 item"),
    ("/decode", {"ids": [5, -1]}, 422, "greater than or equal to 0"),
    ("/decode", {"ids": [5, 1.5]}, 422, "valid integer"),
    ("/decode", {"ids": [True]}, 422, "valid integer"),
    ("/decode", {"ids": "good"}, 422, "valid list"),
    ("/decode", {"ids": [5, 100000]}, 422, "ids[1]: 100000 is not a token id of this model (0 to "),
    ("/decode", {"ids": [[5], [5, 6, 2 ** 40]]}, 422, f"ids[1][2]: {2 ** 40} is not a token id"),
    ("/decode", {"ids": [[5]] * 65}, 413, "ids: 65 sequences, at most 64"),
    ("/decode", {"ids": [5], "skip_special_tokens": 1}, 422, "skip_special_tokens"),
    ("/decode", [5], 422, "valid dictionary"),
])
def test_bad_tokenize_and_decode_bodies_are_one_4xx_with_teis_error_fields(path, body, status, fragment, model_dirs):
    app = server.create_app(inference.build_service(inference.load_model(model_dirs("classification"))))
    response, = post_all(app, [(path, body)])
    assert response.status_code == status, response.text
    answer = response.json()
    assert fragment in answer["error"] and answer["error_type"] == "Validation" and "detail" in answer, answer


def test_tokenize_and_decode_give_back_their_queue_place(model_dirs):
    service = inference.build_service(inference.load_model(model_dirs("classification")))
    app = server.create_app(service, max_queue=1)
    responses = post_all(app, [("/tokenize", {"inputs": "good"}), ("/decode", {"ids": [5, 9]}),
                               ("/tokenize", {"inputs": " "}), ("/decode", {"ids": [100000]}),
                               ("/tokenize", {"inputs": "good", "prompt_name": "query"}),
                               ("/predict", {"inputs": "good movie"})])
    assert [response.status_code for response in responses] == [200, 200, 422, 422, 422, 200]
    assert app.state.batcher.pending() == 0 and app.state.batcher.admitting == 0
    app.state.batcher.admitting = 1  # a request waiting: the queue of one is full, and tokenizing waits in it too
    busy, = post_all(app, [("/tokenize", {"inputs": "good"})])
    assert busy.status_code == 429 and busy.json()["error_type"] == "Overloaded"


def direct_logits(loaded, texts, contexts):
    """The classifier's logits from its torch module, on the tokenizer's ids of the normalized texts."""
    normalize = build_normalizer(NORMALIZE)
    rows = []
    for text, context in zip(texts, contexts):
        pair = (normalize(context), normalize(text)) if context else (normalize(text),)
        encoding = loaded.tokenizer(*pair, return_tensors="pt", truncation=True, max_length=32)  # the stored 32
        with torch.no_grad():
            rows.append(loaded.torch_model(encoding["input_ids"], encoding["attention_mask"],
                                           encoding["token_type_ids"])[0].numpy())
    return np.stack(rows)


@pytest.mark.parametrize("kind", ["classification", "longdoc"])
def test_raw_scores_are_the_models_logits_on_both_backends(kind, model_dirs, exports):
    texts = ["good movie", " ".join(["a terrible film and the music was sad"] * 4)]
    contexts = ["very sad", None] if kind == "classification" else [None, None]
    inputs = [[text, context] if context else [text] for text, context in zip(texts, contexts)]
    torch_model = inference.load_model(model_dirs(kind))
    answers = {}
    for backend, path in (("torch", model_dirs(kind)), ("onnx", exports(kind))):
        app = server.create_app(inference.build_service(inference.load_model(path)))
        answers[backend] = [json_of(response) for response in post_all(app, [
            ("/predict", {"inputs": inputs, "raw_scores": True}), ("/predict", {"inputs": inputs}),
            ("/predict", {"inputs": inputs[0], "raw_scores": True, "parameters": {"top_k": 1}}),
            ("/predict", {"texts": texts, "contexts": contexts})])]
    labels = torch_model.label_names
    for backend in ("torch", "onnx"):
        raw, probabilities, best, ours = answers[backend]
        logits = np.asarray([[dict((item["label"], item["score"]) for item in answer)[label] for label in labels]
                             for answer in raw])
        if kind == "classification":
            expected = direct_logits(torch_model, texts, contexts)
        else:  # the chunks' logits aggregated per document, as the prediction uses them
            expected = np.asarray([result["logits"] for result in
                                   inference.predict_long_documents(torch_model, texts, with_logits=True)])
        assert np.abs(logits - expected).max() < 1e-4, (backend, logits, expected)
        assert all([item["score"] for item in answer] == sorted((item["score"] for item in answer), reverse=True)
                   for answer in raw)  # best first, as TEI sorts them
        # the probabilities are softmax(logits / the stored temperature 1.5): raw scores come before both
        scaled = inference.softmax(logits, 1.5)
        for row, answer in zip(scaled, probabilities):
            assert dict((item["label"], item["score"]) for item in answer) == pytest.approx(
                dict(zip(labels, row)), abs=1e-5)
        assert len(best) == 1 and best[0]["label"] == raw[0][0]["label"]  # top_k 1 (alone: padded otherwise)
        assert best[0]["score"] == pytest.approx(raw[0][0]["score"], abs=1e-5)
        assert all("logits" not in prediction for prediction in ours["predictions"])  # our shape is unchanged
