"""The server on the onnxruntime backend: every task's export answers every route as its torch model does."""
import asyncio

import pytest

import export_onnx
import infer
import train_vector
from common import inference, server
from test_export_onnx import make_model_directory, make_vector_directory
from test_server import client_for
from test_server_rerank import make_reranker_directory, needs_reranker_directories

TEXTS = ["good movie", "a terrible film that was not very good at all", "今天天气真好啊", "stock price"]
LONG_TEXT = " ".join(["good movie and the music was great"] * 6)
CORPUS_IDS, CORPUS_TEXTS = ["d1", "d2", "d3"], ["a great film", "stock price", "very sad news"]


def build_model(kind, tiny_model_dir, directory):
    if kind == "vector":
        return make_vector_directory(tiny_model_dir, directory)
    if kind == "rerank":
        return make_reranker_directory(tiny_model_dir, directory)
    if kind == "longdoc":
        return make_model_directory(tiny_model_dir, directory, task="longdoc", max_length=16)
    return make_model_directory(tiny_model_dir, directory, temperature=1.5)


@pytest.fixture(scope="module", params=["classification", "longdoc", "vector",
                                        pytest.param("rerank", marks=needs_reranker_directories)])
def model_pair(request, tiny_model_dir, tmp_path_factory):
    """(kind, model directory, its ONNX export)."""
    directory = build_model(request.param, tiny_model_dir, tmp_path_factory.mktemp(request.param))
    output = tmp_path_factory.mktemp(f"{request.param}-export") / "model.onnx"
    assert export_onnx.main(["--model-path", str(directory), "--output-path", str(output)]) == 0
    return request.param, directory, output


# every route of each kind, with a body; the answers are compared number by number
REQUESTS = {
    "classification": [("/predict", {"texts": TEXTS, "contexts": ["very sad", None, None, "good"]})],
    "longdoc": [("/predict", {"texts": [LONG_TEXT, "sad"]})],
    "vector": [("/encode", {"texts": TEXTS}), ("/encode", {"texts": TEXTS, "side": "document"}),
               ("/similarity", {"query": "good movie", "documents": TEXTS}),
               ("/search", {"query": "good movie", "top_k": 3}),
               ("/v1/embeddings", {"input": TEXTS, "model": "m"})],
    "rerank": [("/rerank", {"query": "good movie", "texts": TEXTS, "return_text": True}),
               ("/rerank", {"query": "good movie", "texts": TEXTS, "raw_scores": True, "top_n": 2})],
}


def answers(model_path, kind):
    """Each route's JSON answer from a server on ``model_path`` (a vector server holds the small corpus)."""
    service = inference.build_service(inference.load_model(model_path))
    corpus = (server.build_corpus(service, CORPUS_IDS, CORPUS_TEXTS, show_progress=False)
              if kind == "vector" else None)
    app = server.create_app(service, corpus=corpus)

    async def calls():
        async with client_for(app) as client:
            responses = [await client.post(path, json=body) for path, body in REQUESTS[kind]]
            return [response.json() for response in responses], (await client.get("/info")).json()
    results, info = asyncio.run(calls())
    assert all("detail" not in result for result in results if isinstance(result, dict)), results
    return results, info


def assert_close(onnx_value, torch_value, where="answer"):
    """Numbers within 1e-4; everything else (labels, ids, order, texts) equal."""
    if isinstance(torch_value, dict):
        assert set(onnx_value) == set(torch_value), where
        for key in torch_value:
            assert_close(onnx_value[key], torch_value[key], f"{where}.{key}")
    elif isinstance(torch_value, list):
        assert len(onnx_value) == len(torch_value), where
        for index, (left, right) in enumerate(zip(onnx_value, torch_value)):
            assert_close(left, right, f"{where}[{index}]")
    elif isinstance(torch_value, float):
        assert abs(onnx_value - torch_value) < 1e-4, (where, onnx_value, torch_value)
    else:
        assert onnx_value == torch_value, (where, onnx_value, torch_value)


def test_every_route_answers_the_same_from_the_export(model_pair):
    kind, directory, exported = model_pair
    torch_answers, torch_info = answers(directory, kind)
    onnx_answers, onnx_info = answers(exported, kind)
    assert (torch_info["backend"], onnx_info["backend"]) == ("torch", "onnx")
    assert onnx_info["kind"] == torch_info["kind"] == kind
    for (path, _), onnx_answer, torch_answer in zip(REQUESTS[kind], onnx_answers, torch_answers):
        if path == "/v1/embeddings":  # the model name is the file's: model.onnx vs the directory
            onnx_answer.pop("model"), torch_answer.pop("model")
        assert_close(onnx_answer, torch_answer, path)


def test_both_entry_points_serve_an_export(model_pair, monkeypatch):
    kind, _, exported = model_pair
    started = []
    monkeypatch.setattr(server, "serve", lambda app, *args, **kwargs: started.append(app) or 0)
    assert infer.main(["--model-path", str(exported), "--serve"]) == 0
    if kind == "vector":
        assert train_vector.main(["--mode", "deploy", "--model-path", str(exported)]) == 0
    for app in started:
        assert any(route.path == REQUESTS[kind][0][0] for route in app.routes)
