"""text-embeddings-inference's shapes: POST /embed (and POST /) on a vector server, equal to /encode,
normalised, with truncate: false; /predict and /similarity in TEI's shape beside ours; POST / for each kind;
TEI's error fields; and the unmodified huggingface_hub InferenceClient against a real uvicorn server."""
import asyncio
import json

import numpy as np
import pytest

from common import inference, server
from test_server import FakeClassifier, FakeVectorService, client_for, vector_app
from test_server_rerank import FakeReranker


def post_all(app, requests):
    """POST each (path, body) in turn, the body as ASCII JSON (a lone surrogate survives); the responses."""
    async def calls():
        async with client_for(app) as client:
            return [await client.post(path, content=json.dumps(body), headers={"content-type": "application/json"})
                    for path, body in requests]
    return asyncio.run(calls())


def rows(response):
    assert response.status_code == 200, response.text
    return np.asarray(response.json(), dtype=np.float64)


def test_embed_is_encode_normalised_on_the_side_its_prompt_names():
    class TwoSidedService(FakeVectorService):
        def encode_documents(self, texts):
            return [[float(len(text)), 1.0, 0.0, 2.0] for text in texts]
    app, _ = vector_app(TwoSidedService())
    texts = ["a", "banana", "cherry pie"]
    responses = post_all(app, [("/embed", {"inputs": texts}), ("/", {"inputs": texts}),
                               ("/embed", {"inputs": "banana"}), ("/embed", {"inputs": texts, "normalize": False}),
                               ("/embed", {"inputs": texts, "prompt_name": "query"}),
                               ("/encode", {"texts": texts, "side": "document"}), ("/encode", {"texts": texts})])
    documents, at_root, single, raw, queries = map(rows, responses[:5])
    encoded_documents, encoded_queries = (np.asarray(response.json()["embeddings"]) for response in responses[5:])
    assert np.abs(documents - inference.normalize_rows(encoded_documents)).max() <= 1e-6
    assert np.abs(np.linalg.norm(documents, axis=1) - 1).max() <= 1e-6
    assert np.array_equal(at_root, documents) and np.array_equal(single, documents[1:2])
    assert np.abs(raw - encoded_documents).max() <= 1e-6
    assert np.abs(queries - inference.normalize_rows(encoded_queries)).max() <= 1e-6


@pytest.mark.parametrize("body, status, fragment", [
    ({"inputs": "a", "dimensions": 2}, 400, "2 requested, but this model gives 4-dimensional embeddings only"),
    ({"inputs": "a", "prompt_name": "classification"}, 422, "'query', 'document' or 'passage'"),
    ({"inputs": "a", "truncation_direction": "Left"}, 422, "Extra inputs are not permitted"),
    ({"inputs": []}, 422, "at least 1 item"),
    ({"inputs": [101, 2023]}, 422, "token-id arrays are not supported"),
    ({"inputs": "\ud800"}, 422, "lone surrogate"),
    ({"inputs": " "}, 422, "inputs[0]: empty or whitespace-only text"),
    ({"text": "a"}, 422, "Field required"),
])
def test_bad_embed_requests_are_one_json_4xx(body, status, fragment):
    app, service = vector_app()
    calls_before = len(service.calls)
    response, = post_all(app, [("/embed", body)])
    assert response.status_code == status and fragment in str(response.json()["detail"]), response.text
    assert len(service.calls) == calls_before  # refused before the model


def test_a_classifier_refuses_the_embed_route_naming_the_kind():
    response, = post_all(server.create_app(FakeClassifier()), [("/embed", {"inputs": "a"})])
    assert response.status_code == 404 and "for vector models" in response.json()["detail"]


class CountingVectorService(FakeVectorService):
    """Counts a text's characters as its tokens; a query takes 8, a document 16."""

    def info(self):
        return {"kind": self.kind, "dim": 4, "query_max_length": 8, "doc_max_length": 16}

    def count_tokens(self, texts, side="query", truncate=True):
        limit = 8 if side == "query" else 16
        return [len(text) if not truncate else min(len(text), limit) for text in texts]


def test_truncate_false_refuses_a_text_over_its_sides_max_length_with_teis_422():
    app, service = vector_app(CountingVectorService(), max_queue=1)
    twelve = "twelve chars"
    responses = post_all(app, [
        ("/embed", {"inputs": ["short", twelve], "truncate": False}),  # a document: 16 tokens
        ("/embed", {"inputs": ["short", twelve], "truncate": False, "prompt_name": "query"}),  # a query: 8
        ("/embed", {"inputs": ["short", "x" * 17], "truncate": False}),
        ("/embed", {"inputs": ["short", twelve], "prompt_name": "query"}),  # truncate: true cuts it
        ("/embed", {"inputs": ["short"]})])  # the refused requests gave back their place (max_queue 1)
    fits, query, document, truncated, after = responses
    assert fits.status_code == 200 and truncated.status_code == 200 and after.status_code == 200
    for refused, index, count, limit, side in ((query, 1, 12, 8, "query"), (document, 1, 17, 16, "document")):
        body = refused.json()
        assert refused.status_code == 422, refused.text
        assert body["detail"] == (f"inputs[{index}]: {count} tokens, the model takes {limit} on the {side} side; "
                                  "send truncate: true to cut it")
        assert body["error"] == body["detail"] and body["error_type"] == "Validation"
    assert app.state.batcher.pending() == 0 and app.state.batcher.admitting == 0
    calls_after_checks = len(service.calls)
    post_all(app, [("/embed", {"inputs": "x" * 17, "truncate": False})])
    assert len(service.calls) == calls_after_checks  # refused before the model


def test_truncate_false_is_refused_where_the_service_cannot_count_tokens():
    response, = post_all(vector_app()[0], [("/embed", {"inputs": "a", "truncate": False})])
    assert response.status_code == 422 and "cannot count its tokens" in response.json()["error"]


def test_vector_service_counts_untruncated_tokens(tiny_model_dir, tmp_path):
    from test_export_onnx import make_vector_directory
    service = inference.VectorService(inference.load_model(make_vector_directory(tiny_model_dir, tmp_path)))
    texts = ["good movie", " ".join(["good movie and the music was great"] * 8)]
    for side, limit in (("query", 16), ("doc", 32)):
        cut, whole = service.count_tokens(texts, side), service.count_tokens(texts, side, truncate=False)
        assert cut[0] == whole[0] < limit and cut[1] == limit < whole[1]


class ScoringClassifier(FakeClassifier):
    """Every label's probability, as the real services give them."""

    def info(self):
        return {"kind": self.kind, "labels": ["neg", "pos", "mixed"], "max_length": 32}

    def predict(self, texts, contexts):
        self.calls.append((list(texts), list(contexts)))
        return [{"label": "pos", "probabilities": {"neg": 0.2, "pos": 0.7 if context is None else 0.5,
                                                   "mixed": 0.1 if context is None else 0.3}} for context in contexts]


def test_predict_takes_teis_request_and_answers_its_sorted_labels():
    service = ScoringClassifier()
    app = server.create_app(service)
    single = [{"score": 0.7, "label": "pos"}, {"score": 0.2, "label": "neg"}, {"score": 0.1, "label": "mixed"}]
    paired = [{"score": 0.5, "label": "pos"}, {"score": 0.3, "label": "mixed"}, {"score": 0.2, "label": "neg"}]
    responses = post_all(app, [
        ("/predict", {"inputs": "good"}), ("/", {"inputs": "good"}), ("/predict", {"inputs": ["good"]}),
        ("/predict", {"inputs": ["good", "its context"]}),
        ("/predict", {"inputs": [["good"], ["good", "its context"]], "raw_scores": False, "truncate": True}),
        ("/predict", {"inputs": "good", "parameters": {"top_k": 1}}),
        ("/predict", {"texts": ["good"]})])  # ours, unchanged
    assert [response.status_code for response in responses] == [200] * 7, [r.text for r in responses]
    answers = [response.json() for response in responses]
    assert answers[:3] == [single] * 3 and answers[3] == paired and answers[4] == [single, paired]
    assert answers[5] == single[:1] and answers[6]["predictions"][0]["label"] == "pos"
    assert service.calls[3] == (["good"], ["its context"]) and service.calls[4] == (["good", "good"],
                                                                                    [None, "its context"])
    ours_refused, = post_all(app, [("/predict", {"texts": [3]})])  # our shape's errors are located as before
    assert ours_refused.status_code == 422 and ours_refused.json()["detail"][0]["loc"] == ["body", "texts", 0]


def test_a_regression_models_one_score_is_labelled_with_its_label():
    class Regressor(FakeClassifier):
        def info(self):
            return {"kind": self.kind, "labels": ["rating"]}

        def predict(self, texts, contexts):
            return [{"problem_type": "regression", "score": 3.5} for _ in texts]
    response, = post_all(server.create_app(Regressor()), [("/predict", {"inputs": "good"})])
    assert response.json() == [{"score": 3.5, "label": "rating"}]


@pytest.mark.parametrize("body, fragment", [
    ({"inputs": ["a", "b", "c"]}, "a list of strings is one input"),
    ({"inputs": [["a"], "b"]}, "valid list"),
    ({"inputs": [["a", "b", "c"]]}, "at most 2 items"),
    ({"inputs": []}, "at least 1 item"),
    ({"inputs": [[]]}, "at least 1 item"),
    ({"inputs": 3}, "valid list"),
    ({"inputs": " "}, "inputs[0]: empty or whitespace-only text"),
    ({"inputs": "a", "truncate": False}, "truncate: false is not supported"),
    ({"inputs": "a", "texts": ["a"]}, "Extra inputs are not permitted"),
    ({"inputs": "a", "parameters": {"function_to_apply": "none"}}, "Extra inputs are not permitted"),
    ({"inputs": "a", "truncation_direction": "left"}, "Extra inputs are not permitted"),
    ({"inputs": [["a", "x" * 10001]]}, "inputs[0][1]: 10001 characters"),
])
def test_bad_tei_predict_requests_are_one_4xx_with_teis_error_fields(body, fragment):
    service = ScoringClassifier()
    for path in ("/predict", "/"):
        response, = post_all(server.create_app(service), [(path, body)])
        assert response.status_code in (413, 422) and fragment in response.json()["error"], response.text
        assert response.json()["error_type"] == "Validation" and "detail" in response.json()
    assert service.calls == []


def test_similarity_takes_teis_request_and_answers_the_cosines_of_embed():
    app, _ = vector_app()
    sentences = ["banana", "cherry pie", "a"]
    tei = {"inputs": {"source_sentence": "aa", "sentences": sentences}}
    responses = post_all(app, [
        ("/similarity", tei), ("/", tei), ("/similarity", {**tei, "parameters": {"prompt_name": "query"}}),
        ("/embed", {"inputs": ["aa", *sentences]}), ("/embed", {"inputs": ["aa", *sentences], "prompt_name": "query"}),
        ("/similarity", {"query": "aa", "documents": sentences})])  # ours, unchanged
    assert [response.status_code for response in responses] == [200] * 6, [r.text for r in responses]
    documents, queries = rows(responses[3]), rows(responses[4])
    assert responses[0].json() == pytest.approx((documents[1:] @ documents[0]).tolist(), abs=1e-6)
    assert responses[1].json() == responses[0].json()
    assert responses[2].json() == pytest.approx((queries[1:] @ queries[0]).tolist(), abs=1e-6)
    assert set(responses[5].json()) == {"scores", "ranking"}


@pytest.mark.parametrize("path, body, fragment", [
    ("/similarity", {"inputs": {"source_sentence": "a", "sentences": []}}, "at least 1 item"),
    ("/similarity", {"inputs": {"source_sentence": "a"}}, "Field required"),
    ("/similarity", {"inputs": {"source_sentence": "a", "sentences": ["b"]}, "parameters": {"prompt_name": "x"}},
     "'query', 'document' or 'passage'"),
    ("/similarity", {"inputs": {"source_sentence": " ", "sentences": ["b"]}}, "inputs.source_sentence[0]: empty"),
    ("/similarity", {"inputs": "a"}, "valid dictionary"),
    ("/", {"inputs": {"source_sentence": "a", "sentences": [3]}}, "inputs.sentences.0"),
    ("/similarity", {"inputs": {"source_sentence": "a", "sentences": ["b"]}, "query": "a"}, "Extra inputs"),
    ("/similarity", [1], "valid dictionary"),
])
def test_bad_tei_similarity_requests_are_one_4xx_with_teis_error_fields(path, body, fragment):
    app, service = vector_app()
    calls_before = len(service.calls)
    response, = post_all(app, [(path, body)])
    assert response.status_code == 422 and fragment in response.json()["error"], response.text
    assert response.json()["error_type"] == "Validation"
    assert len(service.calls) == calls_before


def test_similarity_truncate_false_refuses_a_long_sentence():
    app, _ = vector_app(CountingVectorService())
    body = {"inputs": {"source_sentence": "a", "sentences": ["b", "x" * 17]}, "parameters": {"truncate": False}}
    response, = post_all(app, [("/similarity", body)])
    assert response.status_code == 422 and response.json()["error"].startswith("inputs.sentences[1]: 17 tokens")


def test_a_reranker_answers_teis_rerank_at_the_root_too():
    body = {"query": "good movie", "texts": ["bad", "good movie here"], "return_text": True}
    at_root, rerank = post_all(server.create_app(FakeReranker()), [("/", body), ("/rerank", body)])
    assert at_root.status_code == 200 and at_root.json() == rerank.json() and at_root.json()[0]["index"] == 1


def test_info_has_teis_fields():
    async def info(app):
        async with client_for(app) as client:
            return (await client.get("/info")).json()
    vector = asyncio.run(info(vector_app(CountingVectorService(), max_texts=5)[0]))
    classifier = asyncio.run(info(server.create_app(ScoringClassifier(), max_queue=7)))
    assert vector["model_type"] == {"embedding": {"pooling": "unknown"}} and vector["max_input_length"] == 16
    assert vector["max_client_batch_size"] == 5 and vector["auto_truncate"] is True
    assert classifier["model_type"] == {"classifier": {"id2label": {"0": "neg", "1": "pos", "2": "mixed"},
                                                       "label2id": {"neg": 0, "pos": 1, "mixed": 2}}}
    assert classifier["max_input_length"] == 32 and classifier["max_concurrent_requests"] == 7
    assert classifier["model_id"] == "classification" and classifier["kind"] == "classification"


def test_the_unmodified_huggingface_hub_client_gets_encodes_embeddings(tiny_model_dir, tmp_path, monkeypatch):
    huggingface_hub = pytest.importorskip("huggingface_hub")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # tests run offline; this is loopback
    import httpx
    from test_export_onnx import make_vector_directory
    from test_server_hostile import running_server
    service = inference.VectorService(inference.load_model(make_vector_directory(tiny_model_dir, tmp_path)))
    texts = ["good movie", "the stock market", "今天天气真好啊"]
    long_text = " ".join(["good movie and the music was great"] * 8)
    with running_server(server.create_app(service, api_key="k3y")) as (_, base_url):
        client = huggingface_hub.InferenceClient(model=base_url, token="k3y", timeout=30)
        documents = client.feature_extraction(texts)  # posts to the URL itself, as to TEI
        query = client.feature_extraction(texts[0], prompt_name="query")
        whole = client.feature_extraction(texts, truncate=False)
        with pytest.raises(huggingface_hub.errors.HfHubHTTPError) as refused:
            client.feature_extraction(["good", long_text], truncate=False)
        similarities = client.sentence_similarity(texts[0], texts[1:])  # posts {"inputs": {...}} to the URL too

        def encode(side):
            return np.asarray(httpx.post(f"{base_url}/encode", json={"texts": texts, "side": side}, timeout=30,
                                         headers={"Authorization": "Bearer k3y"}).json()["embeddings"])
        expected_documents, expected_queries = encode("document"), encode("query")
    assert documents.shape == (3, service.dim)
    assert np.abs(documents - inference.normalize_rows(expected_documents)).max() <= 1e-6
    assert np.abs(query.reshape(-1) - inference.normalize_rows(expected_queries)[0]).max() <= 1e-6
    assert np.abs(whole - documents).max() <= 1e-6  # these texts fit: truncate: false changes nothing
    assert refused.value.response.status_code == 422
    tokens, = service.count_tokens([long_text], "doc", truncate=False)
    assert f"inputs[1]: {tokens} tokens, the model takes 32 on the document side" in str(refused.value)
    assert np.abs(np.asarray(similarities) - documents[1:] @ documents[0]).max() <= 1e-5


def test_the_unmodified_huggingface_hub_client_classifies(tiny_model_dir, tmp_path, monkeypatch):
    huggingface_hub = pytest.importorskip("huggingface_hub")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # tests run offline; this is loopback
    import httpx
    from test_export_onnx import make_model_directory
    from test_server_hostile import running_server
    service = inference.build_service(inference.load_model(make_model_directory(tiny_model_dir, tmp_path)))
    with running_server(server.create_app(service)) as (_, base_url):
        client = huggingface_hub.InferenceClient(model=base_url, timeout=30)
        best = client.text_classification("good movie")  # posts {"inputs", "parameters"} to the URL, as to TEI
        batch = httpx.post(f"{base_url}/predict", json={"inputs": [["good movie"], ["good movie", "sad"]]},
                           timeout=30).json()
        ours = httpx.post(f"{base_url}/predict", json={"texts": ["good movie", "good movie"],
                                                       "contexts": [None, "sad"]}, timeout=30).json()["predictions"]
    # huggingface_hub keeps the first element of TEI's answer to one text: its best label
    assert (best.label, best.score) == (ours[0]["label"], pytest.approx(ours[0]["probability"]))
    for labels, prediction in zip(batch, ours):
        assert [label["label"] for label in labels] == sorted(prediction["probabilities"],
                                                              key=lambda name: -prediction["probabilities"][name])
        assert {label["label"]: label["score"] for label in labels} == prediction["probabilities"]
