"""POST /rerank in text-embeddings-inference's shape: a fake reranker for the route's contract and limits, and a tiny
reranker directory (torch and its ONNX export) for the scores."""
import asyncio
import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

import export_onnx
from common import inference, modeldir, server
from common.choices import PROBLEM_TYPES
from common.errors import UserError
from common.heads import SequenceClassifier
from test_server import FakeClassifier, FakeVectorService, client_for

QUERY = "good movie"
DOCUMENTS = ["a great film", "stock price", "the music was bad", "very happy and good", "今天天气真好啊"]


# a model directory can say problem_type "rerank" once the reranker trainer has registered it (common/choices.py)
needs_reranker_directories = pytest.mark.skipif("rerank" not in PROBLEM_TYPES,
                                                reason="problem_type 'rerank' is not registered yet")


def make_reranker_directory(tiny_model_dir, directory, max_length=32, seed=0):
    """A reranker as train_classifier.py writes one: a one-output classifier with toolkit problem_type "rerank"."""
    torch.manual_seed(seed)
    model = SequenceClassifier(modeldir.load_pretrained_backbone(str(tiny_model_dir)), 1, "mean")
    torch.nn.init.normal_(model.head.classifier.weight, std=1.0)  # the default std 0.02 scores all pairs alike
    toolkit = {"task": "classification", "problem_type": "rerank", "head": model.head_settings,
               "preprocessing": {"max_length": max_length, "truncation_side": "right", "context": "pair",
                                 "normalize": None, "record_format": "text"}}
    modeldir.write_model_directory(directory, model, modeldir.load_tokenizer(str(tiny_model_dir)), toolkit,
                                   {0: "relevance"})
    return Path(directory)


class FakeReranker:
    """Scores a document by how many of the query's words it holds; tokens are characters + 3 per pair."""
    kind = "rerank"
    max_length = 40

    def __init__(self):
        self.calls = []
        self.gate = None  # a threading.Event the first call waits on

    def info(self):
        return {"kind": self.kind, "max_length": self.max_length}

    def rerank(self, queries, documents):
        self.calls.append(len(documents))
        if self.gate is not None and len(self.calls) == 1:
            self.gate.wait(30)
        return [float(sum(word in document.split() for word in query.split())) - 0.5
                for query, document in zip(queries, documents)]

    def count_tokens(self, queries, documents, truncate=True):
        counts = [len(query) + len(document) + 3 for query, document in zip(queries, documents)]
        return [min(count, self.max_length) for count in counts] if truncate else counts


def post_all(app, requests):
    async def calls():
        async with client_for(app) as client:
            return [await client.post(path, json=body) for path, body in requests]
    return asyncio.run(calls())


def sigmoid(value):
    return 1 / (1 + np.exp(-value))


# ---------------------------------------------------------------- the route's contract (fake reranker)

def test_rerank_ranks_the_texts_with_teis_fields():
    app = server.create_app(FakeReranker())
    texts = ["bad", "good movie here", "a movie"]
    full, top, raw = post_all(app, [
        ("/rerank", {"query": QUERY, "texts": texts}),
        ("/rerank", {"query": QUERY, "texts": texts, "top_n": 2, "return_text": True}),
        ("/rerank", {"query": QUERY, "texts": texts, "raw_scores": True})])
    assert full.status_code == 200
    assert [row["index"] for row in full.json()] == [1, 2, 0]
    assert [row["score"] for row in full.json()] == pytest.approx([sigmoid(1.5), sigmoid(0.5), sigmoid(-0.5)])
    assert all(set(row) == {"index", "score"} for row in full.json())
    assert top.json() == [{"index": 1, "score": pytest.approx(sigmoid(1.5)), "text": "good movie here"},
                          {"index": 2, "score": pytest.approx(sigmoid(0.5)), "text": "a movie"}]
    assert [row["score"] for row in raw.json()] == [1.5, 0.5, -0.5]


@pytest.mark.parametrize("body, status, fragment", [
    ({"query": QUERY, "texts": ["a"] * 5}, 413, "texts: 5 texts, at most 4 per request"),
    ({"query": QUERY, "texts": ["a", "x" * 51]}, 413, "texts[1]: 51 characters, at most 50"),
    ({"query": "q" * 51, "texts": ["a"]}, 413, "query[0]: 51 characters, at most 50"),
    ({"query": QUERY, "texts": ["a", " "]}, 422, "texts[1]: empty or whitespace-only text"),
    ({"query": QUERY, "texts": []}, 422, "at least 1 item"),
    ({"query": QUERY, "texts": ["a"], "top_n": 0}, 422, "greater than or equal to 1"),
    ({"query": QUERY, "texts": ["a"], "truncate": "yes"}, 422, "valid boolean"),
    ({"query": QUERY, "texts": ["a"], "inputs": "x"}, 422, "Extra inputs"),
    ({"query": QUERY, "texts": ["short", "x" * 40], "truncate": False}, 422,
     "texts[1]: the query and this text are 53 tokens, the model takes 40"),
])
def test_bad_rerank_requests_are_one_json_4xx(body, status, fragment):
    service = FakeReranker()
    response, = post_all(server.create_app(service, max_texts=4, max_chars=50), [("/rerank", body)])
    assert response.status_code == status
    assert fragment in json.dumps(response.json()["detail"])
    assert service.calls == []


def test_truncate_false_accepts_pairs_that_fit():
    response, = post_all(server.create_app(FakeReranker()), [("/rerank", {"query": QUERY, "texts": ["a movie"],
                                                                          "truncate": False})])
    assert response.status_code == 200 and response.json()[0]["index"] == 0


def test_a_full_queue_answers_rerank_429_and_the_token_budget_splits_batches():
    service = FakeReranker()
    service.gate = threading.Event()
    # each queued request is one 17-token pair: a budget of 40 tokens holds two of them
    app = server.create_app(service, max_queue=3, max_batch_tokens=40, batch_wait_ms=0)

    async def calls():
        async with client_for(app) as client:
            first = asyncio.create_task(client.post("/rerank", json={"query": QUERY, "texts": ["first"]}))
            while not service.calls:
                await asyncio.sleep(0.01)
            queued = []
            for index in range(3):
                queued.append(asyncio.create_task(client.post("/rerank", json={"query": QUERY,
                                                                               "texts": [f"text{index}"]})))
                while app.state.batcher.pending() - app.state.batcher.admitting < len(queued):  # queued, not
                    await asyncio.sleep(0.01)                                                   # only admitted
            refused = await client.post("/rerank", json={"query": QUERY, "texts": ["one too many"]})
            assert refused.status_code == 429 and "server busy" in refused.json()["detail"]
            service.gate.set()
            assert [response.status_code for response in await asyncio.gather(first, *queued)] == [200] * 4
    asyncio.run(calls())
    assert service.calls == [1, 2, 1]


@pytest.mark.parametrize("service, path, fragment", [
    (FakeVectorService(), "/rerank", "POST /rerank is for rerank models; this server runs a vector model"),
    (FakeClassifier(), "/rerank", "this server runs a classification model"),
    (FakeReranker(), "/predict", "POST /predict is for classification and longdoc models; this server runs a rerank"),
    (FakeReranker(), "/v1/embeddings", "POST /v1/embeddings is for vector models"),
])
def test_routes_of_other_kinds_are_404_with_a_one_line_detail(service, path, fragment):
    response, = post_all(server.create_app(service), [(path, {"query": QUERY, "texts": ["a"]})])
    assert response.status_code == 404 and fragment in response.json()["detail"]
    assert "\n" not in response.json()["detail"]


# ---------------------------------------------------------------- a tiny reranker, torch and ONNX

@pytest.fixture(scope="module")
def reranker_dir(tiny_model_dir, tmp_path_factory):
    return make_reranker_directory(tiny_model_dir, tmp_path_factory.mktemp("reranker"))


@pytest.fixture(scope="module")
def reranker_onnx(reranker_dir, tmp_path_factory):
    output = tmp_path_factory.mktemp("reranker-export") / "reranker.onnx"
    assert export_onnx.main(["--model-path", str(reranker_dir), "--output-path", str(output)]) == 0
    return output


@needs_reranker_directories
def test_a_reranker_directory_serves_rerank_with_the_models_scores(reranker_dir, reranker_onnx):
    loaded = inference.load_model(reranker_dir)
    expected = inference.sigmoid(inference.rerank_logits(loaded, [QUERY] * len(DOCUMENTS), DOCUMENTS))
    assert np.ptp(expected) > 0.02  # the scores differ, so the order below means something
    for model_path in (reranker_dir, reranker_onnx):
        service = inference.build_service(inference.load_model(model_path))
        assert service.kind == "rerank"
        answer, = post_all(server.create_app(service), [("/rerank", {"query": QUERY, "texts": DOCUMENTS})])
        rows = answer.json()
        assert [row["index"] for row in rows] == np.argsort(-expected, kind="stable").tolist()
        assert np.allclose([row["score"] for row in rows], np.sort(expected)[::-1], atol=1e-5)
        assert service.info()["backend"] == ("onnx" if str(model_path).endswith(".onnx") else "torch")


@needs_reranker_directories
def test_rerank_scores_are_the_trainers_scores(reranker_dir):
    """/rerank must encode pairs as the reranker was trained, or its scores mean nothing."""
    reranking = pytest.importorskip("common.reranking")
    loaded = inference.load_model(reranker_dir)
    expected = reranking.score_pairs(loaded, [QUERY] * len(DOCUMENTS), DOCUMENTS)
    response, = post_all(server.create_app(inference.build_service(loaded)),
                         [("/rerank", {"query": QUERY, "texts": DOCUMENTS})])
    scores = [row["score"] for row in sorted(response.json(), key=lambda row: row["index"])]
    assert np.allclose(scores, expected, atol=1e-6)


@needs_reranker_directories
def test_a_reranker_counts_the_tokens_of_each_pair_it_runs(reranker_dir):
    service = inference.build_service(inference.load_model(reranker_dir))
    pair = inference.encode_rerank_pairs(service.loaded, [QUERY], ["a great film"])[0]
    assert 1 in pair["token_type_ids"]  # a sentence pair, not one text
    assert service.count_tokens([QUERY], ["a great film"]) == [len(pair["input_ids"])]
    assert service.count_tokens([QUERY], ["a great film"], truncate=False) == [len(pair["input_ids"])]
    long_document = " ".join(["good movie"] * 40)
    assert service.count_tokens([QUERY], [long_document]) == [32]  # the stored max length
    assert service.count_tokens([QUERY], [long_document], truncate=False)[0] > 32


@needs_reranker_directories
def test_a_rerank_head_with_several_outputs_is_refused(tiny_model_dir, tmp_path):
    from test_export_onnx import make_model_directory
    directory = make_model_directory(tiny_model_dir, tmp_path / "three-labels")
    config = json.loads((directory / "config.json").read_text())
    config["toolkit"]["problem_type"] = "rerank"
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="a reranker has one"):
        inference.build_service(inference.load_model(directory))


def test_fuzz_rerank_bodies_never_get_a_5xx():
    import random

    from test_server import random_body, random_json
    generator = random.Random(16)
    service = FakeReranker()
    app = server.create_app(service, max_texts=8, max_chars=200)
    fields = ["query", "texts", "top_n", "return_text", "raw_scores", "truncate"]
    statuses = {}

    def rerank_body():
        """TEI's fields with random values (sometimes valid), or bytes of any shape."""
        if generator.random() < 0.3:
            return random_body(generator)
        body = {"query": "good movie", "texts": ["a movie", "bad"]}
        for name in generator.sample(fields, generator.randrange(1, 4)):
            body[name] = random_json(generator)
        return json.dumps(body, allow_nan=True).encode()

    async def fuzz():
        async with client_for(app) as client:
            for _ in range(600):
                response = await client.post("/rerank", content=rerank_body(),
                                             headers={"content-type": "application/json"})
                statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
                assert response.status_code < 500, (response.status_code, response.text[:200])
                assert isinstance(response.json(), list) or "detail" in response.json()
    asyncio.run(fuzz())
    assert statuses.get(422, 0) + statuses.get(413, 0) >= 300 and statuses.get(200, 0) >= 10, statuses
