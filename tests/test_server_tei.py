"""POST /embed (and POST /) in text-embeddings-inference's shape on a vector server: equal to /encode,
normalised, and the unmodified huggingface_hub InferenceClient against a real uvicorn server."""
import asyncio
import json

import numpy as np
import pytest

from common import inference, server
from test_server import FakeClassifier, FakeVectorService, client_for, vector_app


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
    ({"inputs": "a", "truncate": False}, 422, "truncate: false is not supported"),
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


def test_a_classifier_refuses_the_embed_routes_naming_the_kind():
    app = server.create_app(FakeClassifier())
    for response in post_all(app, [("/embed", {"inputs": "a"}), ("/", {"inputs": "a"})]):
        assert response.status_code == 404 and "for vector models" in response.json()["detail"]


def test_the_unmodified_huggingface_hub_client_gets_encodes_embeddings(tiny_model_dir, tmp_path, monkeypatch):
    huggingface_hub = pytest.importorskip("huggingface_hub")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # tests run offline; this is loopback
    import httpx
    from test_export_onnx import make_vector_directory
    from test_server_hostile import running_server
    service = inference.VectorService(inference.load_model(make_vector_directory(tiny_model_dir, tmp_path)))
    texts = ["good movie", "the stock market", "今天天气真好啊"]
    with running_server(server.create_app(service, api_key="k3y")) as (_, base_url):
        client = huggingface_hub.InferenceClient(model=base_url, token="k3y", timeout=30)
        documents = client.feature_extraction(texts)  # posts to the URL itself, as to TEI
        query = client.feature_extraction(texts[0], prompt_name="query")

        def encode(side):
            return np.asarray(httpx.post(f"{base_url}/encode", json={"texts": texts, "side": side}, timeout=30,
                                         headers={"Authorization": "Bearer k3y"}).json()["embeddings"])
        expected_documents, expected_queries = encode("document"), encode("query")
    assert documents.shape == (3, service.dim)
    assert np.abs(documents - inference.normalize_rows(expected_documents)).max() <= 1e-6
    assert np.abs(query.reshape(-1) - inference.normalize_rows(expected_queries)[0]).max() <= 1e-6
