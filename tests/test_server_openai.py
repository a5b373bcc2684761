"""POST /v1/embeddings: OpenAI's request and response shape, equal to /encode, and the unmodified `openai`
client against a real uvicorn server on 127.0.0.1."""
import asyncio
import base64

import numpy as np
import pytest

from common import inference, server
from test_server import FakeVectorService, client_for


class CountingVectorService(FakeVectorService):
    """The fake vector service with a token count: one token per character, plus two special tokens."""

    def count_tokens(self, texts, side="query"):
        return [len(text) + 2 for text in texts]


def post_all(app, requests):
    """POST each (path, body) in turn; the responses."""
    async def calls():
        async with client_for(app) as client:
            return [await client.post(path, json=body) for path, body in requests]
    return asyncio.run(calls())


def test_embeddings_have_openais_shape_and_equal_encode():
    app = server.create_app(CountingVectorService())
    texts = ["a", "banana", "cherry pie"]
    single, listed, encoded = post_all(app, [("/v1/embeddings", {"input": "banana", "model": "anything"}),
                                             ("/v1/embeddings", {"input": texts, "model": "m", "user": "u"}),
                                             ("/encode", {"texts": texts, "side": "document"})])
    assert single.status_code == 200 and listed.status_code == 200
    body = listed.json()
    assert body["object"] == "list" and body["model"] == "vector"
    assert [row["object"] for row in body["data"]] == ["embedding"] * 3
    assert [row["index"] for row in body["data"]] == [0, 1, 2]
    assert [row["embedding"] for row in body["data"]] == encoded.json()["embeddings"]
    assert body["usage"] == {"prompt_tokens": 3 + 8 + 12, "total_tokens": 3 + 8 + 12}
    assert single.json()["data"][0]["embedding"] == encoded.json()["embeddings"][1]
    assert single.json()["usage"]["prompt_tokens"] == 8


def test_base64_is_little_endian_float32_and_dimensions_must_be_the_models():
    app = server.create_app(CountingVectorService())
    floats, encoded, same_size, other_size = post_all(app, [
        ("/v1/embeddings", {"input": ["aa", "b"], "model": "m", "encoding_format": "float"}),
        ("/v1/embeddings", {"input": ["aa", "b"], "model": "m", "encoding_format": "base64"}),
        ("/v1/embeddings", {"input": "aa", "model": "m", "dimensions": 4}),
        ("/v1/embeddings", {"input": "aa", "model": "m", "dimensions": 2})])
    for float_row, base64_row in zip(floats.json()["data"], encoded.json()["data"]):
        decoded = np.frombuffer(base64.b64decode(base64_row["embedding"]), dtype="<f4")
        assert decoded.tolist() == float_row["embedding"]
    assert same_size.status_code == 200 and len(same_size.json()["data"][0]["embedding"]) == 4
    assert other_size.status_code == 400
    assert "2 requested, but this model gives 4-dimensional embeddings only" in other_size.json()["detail"]


@pytest.mark.parametrize("body, status, fragment", [
    ({"input": [1, 2, 3], "model": "m"}, 422, "token-id arrays are not supported"),
    ({"input": [[1, 2], [3]], "model": "m"}, 422, "token-id arrays are not supported"),
    ({"input": [], "model": "m"}, 422, "at least 1 item"),
    ({"input": "", "model": "m"}, 422, "input[0]: empty or whitespace-only text"),
    ({"input": ["a"] * 5, "model": "m"}, 413, "input: 5 texts, at most 4 per request"),
    ({"input": "a" * 51, "model": "m"}, 413, "input[0]: 51 characters"),
    ({"input": "a", "encoding_format": "int8"}, 422, "'float' or 'base64'"),
    ({"input": "a", "dimensions": "4"}, 422, "valid integer"),
    ({"input": "a", "temperature": 1}, 422, "Extra inputs are not permitted"),
    ({"model": "m"}, 422, "Field required"),
    ({"input": 5, "model": "m"}, 422, "send a string or a list of strings"),
])
def test_bad_embedding_requests_are_one_json_4xx(body, status, fragment):
    response, = post_all(server.create_app(CountingVectorService(), max_texts=4, max_chars=50),
                         [("/v1/embeddings", body)])
    assert response.status_code == status and response.headers["content-type"] == "application/json"
    assert fragment in str(response.json()["detail"])
    assert fragment in response.json()["error"]["message"]  # what the openai client shows in its exception
    assert len(response.text.splitlines()) == 1


def test_a_classifier_has_no_embeddings_route_but_lists_its_model():
    from test_server import FakeClassifier
    app = server.create_app(FakeClassifier())
    response, = post_all(app, [("/v1/embeddings", {"input": "a", "model": "m"})])
    assert response.status_code == 404 and "detail" in response.json()

    async def get(path):
        async with client_for(app) as client:
            return await client.get(path)
    listed, missing = asyncio.run(get("/v1/models")), asyncio.run(get("/v1/models/other"))
    assert listed.json()["data"][0]["id"] == "classification" and listed.json()["data"][0]["object"] == "model"
    assert missing.status_code == 404 and "this server runs 'classification' only" in missing.json()["error"]["message"]
    metrics = asyncio.run(get("/metrics")).text  # counted under the route's template, not as "other"
    assert 'toolkit_requests_total{route="/v1/models/{model_id:path}",status="404"} 1.0' in metrics


@pytest.fixture(scope="module")
def vector_service(tiny_model_dir, tmp_path_factory):
    from test_export_onnx import make_vector_directory
    directory = make_vector_directory(tiny_model_dir, tmp_path_factory.mktemp("vector"))
    return inference.VectorService(inference.load_model(directory))


def test_a_real_model_counts_tokens_with_its_tokenizer_and_cuts_documents_at_their_length(vector_service):
    app = server.create_app(vector_service)
    long_text = " ".join(["good movie"] * 12)  # 24 words: past the query length (16), within the document's (32)
    texts = ["good movie", "今天天气真好啊", long_text]
    openai_style, as_query, documents, queries = post_all(app, [
        ("/v1/embeddings", {"input": texts, "model": "m"}),
        ("/v1/embeddings", {"input": texts, "model": "m", "side": "query"}),
        ("/encode", {"texts": texts, "side": "document"}), ("/encode", {"texts": texts})])
    got = np.asarray([row["embedding"] for row in openai_style.json()["data"]])
    assert np.abs(got - np.asarray(documents.json()["embeddings"])).max() <= 1e-6
    got_queries = np.asarray([row["embedding"] for row in as_query.json()["data"]])
    assert np.abs(got_queries - np.asarray(queries.json()["embeddings"])).max() <= 1e-6
    tokenizer = vector_service.loaded.tokenizer
    document_tokens = [min(len(tokenizer(text)["input_ids"]), 32) for text in texts]
    assert openai_style.json()["usage"]["prompt_tokens"] == sum(document_tokens) == 4 + 9 + 26
    assert as_query.json()["usage"]["prompt_tokens"] == 4 + 9 + 16
    assert openai_style.json()["model"] == vector_service.info()["model"]


def test_the_unmodified_openai_client_gets_encodes_embeddings(vector_service):
    openai = pytest.importorskip("openai")
    from test_server_hostile import running_server
    app = server.create_app(vector_service, api_key="k3y")
    texts = ["good movie", "the stock market", "今天天气真好啊"]
    with running_server(app) as (_, base_url):
        client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="k3y", max_retries=0, timeout=30)
        default = client.embeddings.create(model="tiny", input=texts)  # the client asks for base64 and decodes it
        floats = client.embeddings.create(model="tiny", input=texts[0], encoding_format="float", dimensions=16)
        import httpx
        expected = httpx.post(f"{base_url}/encode", json={"texts": texts}, headers={"Authorization": "Bearer k3y"},
                              timeout=30).json()["embeddings"]
        with pytest.raises(openai.BadRequestError, match="16-dimensional"):
            client.embeddings.create(model="tiny", input=texts[0], dimensions=8)
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{base_url}/v1", api_key="wrong", max_retries=0).embeddings.create(
                model="tiny", input="a")
        listed = list(client.models.list())  # what RAG front-ends call to check a connection
        served = client.models.retrieve(vector_service.info()["model"])
        with pytest.raises(openai.NotFoundError, match="this server runs"):
            client.models.retrieve("gpt-4")
    assert [model.id for model in listed] == [served.id] == [vector_service.info()["model"]]
    assert [row.index for row in default.data] == [0, 1, 2]
    assert np.abs(np.asarray([row.embedding for row in default.data]) - np.asarray(expected)).max() <= 1e-6
    assert np.abs(np.asarray(floats.data[0].embedding) - np.asarray(expected[0])).max() <= 1e-6
    assert default.usage.prompt_tokens == default.usage.total_tokens > 0
