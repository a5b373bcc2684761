"""common/server.py with fake services: routes, limits, auth, micro-batching, a fuzz run, SIGTERM draining."""
import asyncio
import ctypes
import json
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from common import server
from common.errors import UserError

REPO = Path(__file__).resolve().parents[1]
KEY = "s3cret"


class FakeVectorService:
    """Deterministic 4-d embeddings from the text; records every call's size."""
    kind = "vector"

    def __init__(self):
        self.calls = []
        self.gate = None  # a threading.Event the first call waits on (micro-batching test)

    def info(self):
        return {"kind": self.kind, "dim": 4}

    def encode(self, texts):
        self.calls.append(len(texts))
        if self.gate is not None and len(self.calls) == 1:
            self.gate.wait(30)
        return [[float(len(text)), float(text.count("a")), 1.0, float(sum(map(ord, text)) % 7)] for text in texts]


class FakeClassifier:
    kind = "classification"

    def __init__(self):
        self.calls = []

    def info(self):
        return {"kind": self.kind, "labels": ["neg", "pos"]}

    def predict(self, texts, contexts):
        self.calls.append((list(texts), list(contexts)))
        if any("boom" in text for text in texts):
            raise UserError("texts: 'boom' is not allowed")
        return [{"label": "pos" if "good" in text else "neg", "context": context} for text, context in
                zip(texts, contexts)]


def client_for(app):
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


def run(coroutine):
    return asyncio.run(coroutine)


def vector_app(service=None, **options):
    service = service or FakeVectorService()
    corpus = server.build_corpus(service, ["d1", "d2", "d3"], ["a", "banana", "cherry pie"], show_progress=False)
    return server.create_app(service, corpus=corpus, **options), service


def test_vector_routes_answer_with_json():
    app, _ = vector_app()

    async def calls():
        async with client_for(app) as client:
            assert (await client.get("/health")).json() == {"status": "ok"}
            info = (await client.get("/info")).json()
            assert info["dim"] == 4 and info["corpus_size"] == 3 and info["max_texts"] == 64
            encoded = (await client.post("/encode", json={"texts": ["a", "bb"]})).json()
            assert encoded["dim"] == 4 and encoded["embeddings"][1][0] == 2.0
            similarity = (await client.post("/similarity", json={"query": "aa", "documents": ["xyz", "aa"]})).json()
            assert len(similarity["scores"]) == 2 and similarity["ranking"][0] == 1
            assert similarity["scores"][1] == pytest.approx(1.0)
            search = (await client.post("/search", json={"query": "banana", "top_k": 2})).json()
            assert [hit["id"] for hit in search["results"]][0] == "d2" and len(search["results"]) == 2
            assert (await client.get("/docs")).status_code == 200
            assert "/similarity" in (await client.get("/openapi.json")).json()["paths"]
    run(calls())


def test_encode_side_document_uses_the_document_length():
    class TwoSidedService(FakeVectorService):
        def encode_documents(self, texts):
            return [[0.0, 0.0, 0.0, 9.0] for _ in texts]
    app = server.create_app(TwoSidedService())

    async def calls():
        async with client_for(app) as client:
            query = (await client.post("/encode", json={"texts": ["a"]})).json()["embeddings"][0]
            document = (await client.post("/encode", json={"texts": ["a"], "side": "document"})).json()["embeddings"][0]
            assert query[3] != 9.0 and document == [0.0, 0.0, 0.0, 9.0]
            assert (await client.post("/encode", json={"texts": ["a"], "side": "passage"})).status_code == 422
    run(calls())


def test_bad_requests_get_4xx_json_errors():
    app, _ = vector_app(max_texts=3, max_chars=20)
    cases = [
        ("/encode", {"texts": []}, 422), ("/encode", {"texts": "a"}, 422), ("/encode", {"texts": [1]}, 422),
        ("/encode", {"text": ["a"]}, 422), ("/encode", {"texts": ["a"] * 4}, 413), ("/encode", {"texts": ["a" * 21]}, 413),
        ("/encode", {"texts": ["   "]}, 422), ("/similarity", {"query": "a"}, 422),
        ("/similarity", {"query": None, "documents": ["a"]}, 422), ("/search", {"query": "a", "top_k": 0}, 422),
        ("/search", {"query": "a", "top_k": "3"}, 422), ("/search", {"query": "a", "top_k": 10 ** 9}, 422),
        ("/predict", {"texts": ["a"]}, 404),
    ]

    async def calls():
        async with client_for(app) as client:
            for path, body, status in cases:
                response = await client.post(path, json=body)
                assert response.status_code == status, (path, body, response.text)
                assert "detail" in response.json()
            response = await client.post("/encode", content=b'{"texts": [', headers={"content-type": "application/json"})
            assert response.status_code == 422 and "detail" in response.json()
            response = await client.post("/encode", content=b"x" * 200_000, headers={"content-type": "application/json"})
            assert response.status_code == 413 and "detail" in response.json()
    run(calls())


def test_search_without_a_corpus_is_404():
    app = server.create_app(FakeVectorService())

    async def calls():
        async with client_for(app) as client:
            response = await client.post("/search", json={"query": "a"})
            assert response.status_code == 404 and "corpus" in response.json()["detail"]
    run(calls())


def test_predict_route_contexts_and_service_errors():
    service = FakeClassifier()
    app = server.create_app(service)

    async def calls():
        async with client_for(app) as client:
            body = (await client.post("/predict", json={"texts": ["good", "bad"], "contexts": ["c", None]})).json()
            assert [p["label"] for p in body["predictions"]] == ["pos", "neg"]
            assert body["predictions"][0]["context"] == "c"
            assert (await client.post("/predict", json={"texts": ["a"], "contexts": ["x", "y"]})).status_code == 422
            response = await client.post("/predict", json={"texts": ["boom"]})
            assert response.status_code == 422 and "boom" in response.json()["detail"]
            assert (await client.post("/encode", json={"texts": ["a"]})).status_code == 404
    run(calls())


@pytest.mark.parametrize("from_environment", [False, True])
def test_api_key_protects_every_route_but_health(monkeypatch, from_environment):
    if from_environment:
        monkeypatch.setenv(server.API_KEY_ENV, KEY)
        app, _ = vector_app()
    else:
        monkeypatch.delenv(server.API_KEY_ENV, raising=False)
        app, _ = vector_app(api_key=KEY)

    async def calls():
        async with client_for(app) as client:
            assert (await client.get("/health")).status_code == 200
            for method, path, body in (("GET", "/info", None), ("POST", "/encode", {"texts": ["a"]}),
                                       ("POST", "/search", {"query": "a"}), ("GET", "/docs", None)):
                response = await client.request(method, path, json=body)
                assert response.status_code == 401 and "detail" in response.json()
                wrong = await client.request(method, path, json=body, headers={"Authorization": "Bearer nope"})
                assert wrong.status_code == 401
                right = await client.request(method, path, json=body, headers={"Authorization": f"Bearer {KEY}"})
                assert right.status_code == 200, path
    run(calls())


@pytest.mark.parametrize("max_batch_size, expected_calls", [(64, 2), (1, 6)])
def test_concurrent_requests_are_micro_batched(max_batch_size, expected_calls):
    """While the first call blocks, five more requests queue; they then run as one call (or one each)."""
    service = FakeVectorService()
    service.gate = threading.Event()
    app = server.create_app(service, max_batch_size=max_batch_size, batch_wait_ms=0)

    async def calls():
        async with client_for(app) as client:
            first = asyncio.create_task(client.post("/encode", json={"texts": ["first"]}))
            while not service.calls:
                await asyncio.sleep(0.01)
            others = [asyncio.create_task(client.post("/encode", json={"texts": [f"t{i}"]})) for i in range(5)]
            while app.state.batcher.queue.qsize() < 5:
                await asyncio.sleep(0.01)
            service.gate.set()
            responses = await asyncio.gather(first, *others)
            assert all(response.status_code == 200 for response in responses)
            assert [r.json()["embeddings"][0][0] for r in responses[1:]] == [2.0] * 5  # each got its own row
    run(calls())
    assert len(service.calls) == expected_calls
    assert sum(service.calls) == 6


def test_a_failing_request_does_not_fail_the_requests_batched_with_it():
    service = FakeClassifier()
    app = server.create_app(service, batch_wait_ms=50)

    async def calls():
        async with client_for(app) as client:
            bad, good = await asyncio.gather(client.post("/predict", json={"texts": ["boom"]}),
                                             client.post("/predict", json={"texts": ["good"]}))
            assert bad.status_code == 422 and good.status_code == 200
    run(calls())


def test_every_batch_releases_freed_memory_on_the_model_thread_failed_ones_too(monkeypatch):
    releases = []
    monkeypatch.setattr(server, "release_freed_memory", lambda: releases.append(threading.current_thread().name))
    service = FakeClassifier()
    app = server.create_app(service, batch_wait_ms=0)

    async def calls():
        async with client_for(app) as client:
            assert (await client.post("/predict", json={"texts": ["good"]})).status_code == 200
            assert (await client.post("/predict", json={"texts": ["boom"]})).status_code == 422
    run(calls())
    assert len(releases) == len(service.calls) == 2
    assert all(name.startswith("model") for name in releases)


@pytest.fixture
def fresh_malloc_trim():
    """load_malloc_trim looks the symbol up once per process: forget it before and after the test."""
    server.load_malloc_trim.cache_clear()
    yield
    server.load_malloc_trim.cache_clear()


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc_trim is glibc's")
def test_release_freed_memory_finds_malloc_trim_on_glibc(fresh_malloc_trim):
    assert server.load_malloc_trim()(0) in (0, 1)  # 1: some memory went back to the system
    server.release_freed_memory()


@pytest.mark.parametrize("platform_name, c_library", [("darwin", None), ("win32", None), ("linux", object())])
def test_release_freed_memory_is_a_no_op_without_malloc_trim(monkeypatch, fresh_malloc_trim, platform_name,
                                                              c_library):
    """macOS and Windows are not asked; a Linux C library without the symbol (musl) is not an error."""
    monkeypatch.setattr(sys, "platform", platform_name)
    monkeypatch.setattr(ctypes, "CDLL", lambda name: c_library)
    assert server.load_malloc_trim() is None
    server.release_freed_memory()


# ---------------------------------------------------------------- bounded work: queue limit and token budget

class GatedCountingService(FakeVectorService):
    """The fake vector service that counts tokens (characters + 2) and whose first call waits on ``gate``."""

    def count_tokens(self, texts, side="query"):
        return [len(text) + 2 for text in texts]


async def block_then_queue(app, service, client, bodies):
    """Send one request that blocks in the service, then ``bodies`` to wait in the queue; their tasks."""
    first = asyncio.create_task(client.post("/encode", json={"texts": ["first"]}))
    while not service.calls:
        await asyncio.sleep(0.01)
    queued = []
    batcher = app.state.batcher
    for body in bodies:
        queued.append(asyncio.create_task(client.post("/encode", json=body)))
        # in the queue, not only admitted (pending() counts a request from its headers on): else, on a busy
        # machine, the gate could open while the last one is still being read and it would miss the batch
        while batcher.pending() - batcher.admitting < len(queued):
            await asyncio.sleep(0.01)
    return [first] + queued


def test_a_full_queue_answers_429_at_once_and_recovers():
    service = GatedCountingService()
    service.gate = threading.Event()
    app = server.create_app(service, max_queue=3, batch_wait_ms=0)

    async def calls():
        async with client_for(app) as client:
            waiting = await block_then_queue(app, service, client, [{"texts": [f"t{i}"]} for i in range(3)])
            started = time.perf_counter()
            refused = await client.post("/encode", json={"texts": ["one too many"]})
            openai_refused = await client.post("/v1/embeddings", json={"input": "x", "model": "m"})
            assert time.perf_counter() - started < 1.0  # answered while the model is still blocked
            assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
            assert refused.json() == {"detail": "server busy: 3 requests waiting (limit 3); retry later"}
            assert openai_refused.status_code == 429 and "server busy" in openai_refused.json()["error"]["message"]
            assert (await client.get("/health")).status_code == 200
            metrics = (await client.get("/metrics")).text
            assert 'toolkit_requests_total{route="/encode",status="429"} 1.0' in metrics
            assert "toolkit_queue_size 3.0" in metrics
            service.gate.set()
            assert [response.status_code for response in await asyncio.gather(*waiting)] == [200] * 4
            assert (await client.post("/encode", json={"texts": ["after"]})).status_code == 200
    run(calls())
    assert sum(service.calls) == 5  # the refused requests never reached the model


def test_an_admitted_similarity_request_is_not_refused_for_its_second_half():
    """/similarity queues its query and its documents as two jobs: the second must not get the 429 the
    first one's place in the queue would give it (--max-queue 1, the model busy with another request)."""
    service = GatedCountingService()
    service.gate = threading.Event()
    app = server.create_app(service, max_queue=1, batch_wait_ms=0)

    async def calls():
        async with client_for(app) as client:
            blocked = await block_then_queue(app, service, client, [])
            similarity = asyncio.create_task(client.post("/similarity", json={"query": "q", "documents": ["a", "b"]}))
            while app.state.batcher.pending() < 2 and not similarity.done():  # both halves queued behind it
                await asyncio.sleep(0.01)
            service.gate.set()
            return await similarity, await asyncio.gather(*blocked)
    similarity, blocked = run(calls())
    assert similarity.status_code == 200 and len(similarity.json()["scores"]) == 2
    assert [response.status_code for response in blocked] == [200]


@pytest.mark.parametrize("max_batch_tokens, expected_calls", [(None, [1, 5]), (14, [1, 2, 2, 1]),
                                                               (1, [1, 1, 1, 1, 1, 1])])
def test_the_token_budget_splits_batches(max_batch_tokens, expected_calls):
    """Queued behind a blocked call: four 5-token texts and one 22-token text (over a 14-token budget: alone)."""
    service = GatedCountingService()
    service.gate = threading.Event()
    app = server.create_app(service, max_batch_tokens=max_batch_tokens, batch_wait_ms=0)
    bodies = [{"texts": ["abc"]}, {"texts": ["def"]}, {"texts": ["ghi"]}, {"texts": ["jkl"]}, {"texts": ["x" * 20]}]

    async def calls():
        async with client_for(app) as client:
            waiting = await block_then_queue(app, service, client, bodies)
            service.gate.set()
            responses = await asyncio.gather(*waiting)
            assert [response.json()["embeddings"][0][0] for response in responses[1:]] == [3.0] * 4 + [20.0]
            return (await client.get("/info")).json()
    info = run(calls())
    assert service.calls == expected_calls
    assert info["max_batch_tokens"] == max_batch_tokens and info["max_queue"] == server.MAX_QUEUE


def test_work_limits_below_one_are_refused():
    for options in ({"max_queue": 0}, {"max_batch_tokens": -5}):
        with pytest.raises(UserError, match="must be a whole number >= 1"):
            server.create_app(FakeVectorService(), **options)


def test_deploy_reports_the_corpus_records_skip_invalid_dropped(tiny_model_dir, tmp_path, monkeypatch, capsys):
    import train_vector
    from conftest import write_jsonl
    from test_export_onnx import make_vector_directory
    directory = str(make_vector_directory(tiny_model_dir, tmp_path / "vector"))
    corpus = write_jsonl(tmp_path / "corpus.jsonl", [{"id": "a", "text": "good movie"}, {"text": "no id"},
                                                     {"id": "c", "text": "   "}, {"id": "d", "text": "stock price"}])
    started = []
    monkeypatch.setattr(server, "serve", lambda app, host, port: started.append(app) or 0)
    assert train_vector.main(["--mode", "deploy", "--model-path", directory, "--corpus", str(corpus),
                              "--skip-invalid", "--device", "cpu"]) == 0
    assert "--skip-invalid: dropped 2 invalid record(s)" in capsys.readouterr().err
    assert started[0].state.corpus.ids == ["a", "d"]


def test_both_entry_points_pass_the_work_limits_and_refuse_bad_ones(tiny_model_dir, tmp_path, monkeypatch, capsys):
    import infer
    import train_vector
    from fastapi.testclient import TestClient
    from common import inference
    from test_export_onnx import make_vector_directory
    directory = str(make_vector_directory(tiny_model_dir, tmp_path / "vector"))
    started = []
    monkeypatch.setattr(server, "serve", lambda app, host, port: started.append(app) or 0)
    assert infer.main(["--model-path", directory, "--serve", "--max-queue", "7", "--max_batch_tokens", "99"]) == 0
    assert train_vector.main(["--mode", "deploy", "--model-path", directory, "--max_queue", "5",
                              "--device", "cpu"]) == 0
    infos = []
    for app in started:
        with TestClient(app) as client:
            infos.append(client.get("/info").json())
    assert [(info["max_queue"], info["max_batch_tokens"]) for info in infos] == [(7, 99), (5, server.MAX_BATCH_TOKENS)]

    def must_not_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the limits were checked")
    monkeypatch.setattr(inference, "load_model", must_not_load)
    capsys.readouterr()
    assert infer.main(["--model-path", directory, "--serve", "--max-queue", "0"]) == 2
    assert "--max-queue" in capsys.readouterr().err
    assert train_vector.main(["--mode", "deploy", "--model-path", directory, "--max-batch-tokens", "0"]) == 2
    assert "error: --max-batch-tokens 0: must be a whole number >= 1" in capsys.readouterr().err
    for main, argv in ((infer.main, ["--serve"]), (train_vector.main, ["--mode", "deploy"])):
        assert main(["--model-path", directory, "--workers", "0", *argv]) == 2
        assert "--workers" in capsys.readouterr().err


# ---------------------------------------------------------------- fuzzing

def random_json(generator, depth=0):
    kind = generator.randrange(9 if depth < 3 else 6)
    if kind == 0:
        return None
    if kind == 1:
        return generator.choice([True, False])
    if kind == 2:
        return generator.choice([0, -1, 2 ** 63, 10 ** 30, 3])
    if kind == 3:
        return generator.choice([1.5, -0.0, 1e308, float("inf")])
    if kind == 4:
        return "".join(chr(generator.randrange(1, 0x2FFF)) for _ in range(generator.randrange(0, 12)))
    if kind == 5:
        return generator.choice(["", " ", "\u0000", "a" * 20000, "\ud800", "\U0001F600"])
    if kind == 6:
        return [random_json(generator, depth + 1) for _ in range(generator.randrange(0, 5))]
    if kind == 7:
        return [random_json(generator, depth + 1) for _ in range(generator.randrange(60, 80))]
    keys = ["texts", "query", "documents", "top_k", "contexts", "extra", "", "input", "dimensions", "encoding_format"]
    return {generator.choice(keys): random_json(generator, depth + 1) for _ in range(generator.randrange(0, 4))}


def random_body(generator):
    """Valid-looking JSON bodies with wrong shapes, broken JSON, binary, huge or oddly encoded bytes."""
    choice = generator.randrange(6)
    if choice <= 2:
        return json.dumps(random_json(generator), allow_nan=True).encode()
    if choice == 3:
        text = json.dumps(random_json(generator))
        return text[:generator.randrange(0, max(1, len(text)))].encode()
    if choice == 4:
        return bytes(generator.randrange(256) for _ in range(generator.randrange(0, 64)))
    return ('{"texts": ["' + "x" * generator.randrange(1, 5) + '"]}').encode("utf-16")


def test_fuzz_1000_bad_requests_never_get_a_5xx():
    generator = random.Random(1234)
    vector, _ = vector_app(max_texts=64, max_chars=10000)
    classifier = server.create_app(FakeClassifier())
    routes = {"vector": ["/encode", "/similarity", "/search", "/v1/embeddings"], "classifier": ["/predict"]}
    other_paths = ["/encode", "/predict", "/info", "/health", "/nope", "/encode/x", "/metrics", "/v1/nope"]
    content_types = ["application/json", "text/plain", "application/x-www-form-urlencoded", None,
                     "application/json; charset=latin-1", "multipart/form-data; boundary=x"]
    statuses = {}

    async def fuzz():
        async with client_for(vector) as vector_client, client_for(classifier) as classifier_client:
            for index in range(1200):
                kind = "vector" if index % 3 else "classifier"
                client = vector_client if kind == "vector" else classifier_client
                method = generator.choice(["POST"] * 18 + ["GET", "PUT"])
                path = generator.choice(routes[kind]) if generator.random() < 0.9 else generator.choice(other_paths)
                headers = {}
                content_type = generator.choice(content_types)
                if content_type:
                    headers["content-type"] = content_type
                if generator.random() < 0.05:
                    headers["content-length"] = generator.choice(["-1", "abc", "99999999999"])
                try:
                    response = await client.request(method, path, content=random_body(generator),
                                                     headers=headers)
                except httpx.HTTPError:
                    statuses["client-refused"] = statuses.get("client-refused", 0) + 1
                    continue
                statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
                assert response.status_code < 500, (response.status_code, response.text[:200])
                if response.status_code >= 400:
                    assert "detail" in response.json()
            assert (await vector_client.get("/health")).status_code == 200
            assert (await vector_client.post("/encode", json={"texts": ["still here"]})).status_code == 200
            assert (await classifier_client.post("/predict", json={"texts": ["good"]})).status_code == 200
    run(fuzz())
    answered = sum(count for status, count in statuses.items() if status != "client-refused")
    assert answered >= 1000, statuses
    validation_errors = statuses.get(413, 0) + statuses.get(422, 0) + statuses.get(400, 0)
    assert validation_errors >= 700, statuses  # most requests reach the body checks, not just routing


# ---------------------------------------------------------------- a real server process

SLOW_SERVER = """
import sys, time
from pathlib import Path
from common import server

class SlowService:
    kind = "vector"
    def info(self):
        return {"kind": "vector"}
    def encode(self, texts):
        Path(sys.argv[2]).write_text("started")
        time.sleep(2.0)
        return [[1.0, 0.0] for _ in texts]

server.serve(server.create_app(SlowService()), "127.0.0.1", int(sys.argv[1]), log_level="warning")
"""


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_up(base_url, process, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"server exited early: {process.stderr.read().decode()[-2000:]}")
        try:
            if httpx.get(f"{base_url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.3)
    raise AssertionError("server did not start")


def test_sigterm_drains_the_request_in_flight(tmp_path):
    script = tmp_path / "slow_server.py"
    script.write_text(SLOW_SERVER)
    marker = tmp_path / "started"
    port = free_port()
    environment = dict(os.environ, PYTHONPATH=str(REPO))
    process = subprocess.Popen([sys.executable, str(script), str(port), str(marker)], cwd=REPO, env=environment,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        base_url = f"http://127.0.0.1:{port}"
        wait_until_up(base_url, process)
        result = {}
        request = threading.Thread(target=lambda: result.update(
            response=httpx.post(f"{base_url}/encode", json={"texts": ["hello"]}, timeout=60)))
        request.start()
        while not marker.exists():
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)  # the request is inside the model call now
        request.join(60)
        assert result["response"].status_code == 200
        assert result["response"].json()["embeddings"] == [[1.0, 0.0]]
        # uvicorn re-raises the captured SIGTERM once it has drained, so the exit status says "terminated"
        assert process.wait(60) in (0, -signal.SIGTERM)
        assert b"Traceback" not in process.stderr.read()
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"{base_url}/health", timeout=2)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_corpus_records_are_validated(tmp_path):
    from conftest import write_jsonl
    good = write_jsonl(tmp_path / "corpus.jsonl", [{"id": 1, "text": "a"}, {"id": "2", "text": "b"}])
    assert server.load_corpus_records(good) == (["1", "2"], ["a", "b"])
    for records, message in (([{"id": 1, "text": ""}], "line 1: field 'text'"),
                             ([{"text": "a"}], "line 1: field 'id'"),
                             ([{"id": 1, "text": "a"}, {"id": 1, "text": "b"}], "line 2: field 'id': duplicate")):
        with pytest.raises(UserError, match=message):
            server.load_corpus_records(write_jsonl(tmp_path / "bad.jsonl", records))
    matrix = server.build_corpus(FakeVectorService(), ["x"], ["abc"], show_progress=False).matrix
    assert np.allclose(np.linalg.norm(matrix, axis=1), 1.0)


def test_a_skipped_corpus_record_leaves_every_later_id_with_its_own_text(tmp_path, capsys):
    from conftest import write_jsonl
    records = [{"id": "a", "text": "apple"}, {"id": "b", "text": ""}, {"text": "no id"}, 7,
               {"id": "c", "text": "cherry pie"}, {"id": "d", "text": "banana split"}]
    ids, texts = server.load_corpus_records(write_jsonl(tmp_path / "corpus.jsonl", records), skip_invalid=True)
    assert list(zip(ids, texts)) == [("a", "apple"), ("c", "cherry pie"), ("d", "banana split")]
    report = capsys.readouterr().err
    assert "--skip-invalid: dropped 3 invalid record(s)" in report
    assert "line 2: field 'text': empty text" in report and "line 3: field 'id': missing" in report
    service = FakeVectorService()
    app = server.create_app(service, corpus=server.build_corpus(service, ids, texts, show_progress=False))

    async def search():
        async with client_for(app) as client:
            for entry_id, text in zip(ids, texts):
                best = (await client.post("/search", json={"query": text, "top_k": 1})).json()["results"][0]
                assert (best["id"], best["text"]) == (entry_id, text) and best["score"] == pytest.approx(1.0)
    run(search())
    records.append({"id": "c", "text": "cherry again"})  # the duplicate is named by its own line, not an earlier one
    with pytest.raises(UserError, match="line 7: field 'id': duplicate id 'c'"):
        server.load_corpus_records(write_jsonl(tmp_path / "corpus.jsonl", records), skip_invalid=True)


def test_health_and_metrics_answer_head_for_load_balancer_checks():
    app, _ = vector_app()

    async def calls():
        async with client_for(app) as client:
            for path in ("/health", "/metrics"):
                assert (await client.head(path)).status_code == 200, path
            assert (await client.head("/encode")).status_code == 405  # a POST route stays POST only
    run(calls())


@pytest.mark.parametrize("host", ["127.0.0.1", "999.1.1.1"], ids=["port-in-use", "unknown-host"])
def test_one_worker_that_cannot_listen_is_one_line(host):
    from common.errors import UserError
    app, _ = vector_app()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(UserError, match=f"--port {port}: cannot listen on {host}"):
            server.serve(app, host=host, port=port, log_level="warning")
