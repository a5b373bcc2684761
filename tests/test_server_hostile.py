"""common/server.py against hostile clients: text that is not valid Unicode, every kind of malformed
body, empty API keys, and slow or greedy connections against a real uvicorn server on 127.0.0.1."""
import asyncio
import contextlib
import json
import socket
import threading
import time
import types

import httpx
import numpy as np
import pytest

from common import server
from common.errors import UserError
from conftest import assert_one_error_line
from test_server import (FakeClassifier, FakeVectorService, GatedCountingService, client_for, free_port, run,
                         vector_app)

SURROGATE = "\ud800"  # legal in JSON ("\ud800"), not encodable as UTF-8: the tokenizer raises TypeError


def post_raw(app, path, body, content_type="application/json"):
    """POST ``body`` (bytes, or an object serialised with \\u escapes so lone surrogates survive)."""
    if not isinstance(body, bytes):
        body = json.dumps(body).encode("ascii")
    headers = {"content-type": content_type} if content_type else {}

    async def call():
        async with client_for(app) as client:
            return await client.post(path, content=body, headers=headers)
    return asyncio.run(call())


# ---------------------------------------------------------------- text that is not valid Unicode (F4)

SURROGATE_CASES = [
    ("vector", "/encode", {"texts": ["fine", f"bad {SURROGATE} text"]}, ["body", "texts", 1], 4),
    ("vector", "/encode", {"texts": [SURROGATE], "side": "document"}, ["body", "texts", 0], 0),
    ("vector", "/similarity", {"query": f"q{SURROGATE}", "documents": ["a"]}, ["body", "query"], 1),
    ("vector", "/similarity", {"query": "q", "documents": ["a", "b", "\udfff"]}, ["body", "documents", 2], 0),
    ("vector", "/search", {"query": f"ab{SURROGATE}", "top_k": 2}, ["body", "query"], 2),
    ("classifier", "/predict", {"texts": [f"x{SURROGATE}"]}, ["body", "texts", 0], 1),
    ("classifier", "/predict", {"texts": ["a", "b"], "contexts": [None, SURROGATE]}, ["body", "contexts", 1], 0),
    ("vector", "/v1/embeddings", {"input": f"x{SURROGATE}", "model": "m"}, ["body", "input", 0], 1),
    ("vector", "/v1/embeddings", {"input": ["a", SURROGATE], "model": "m"}, ["body", "input", 1], 0),
]


@pytest.mark.parametrize("kind, path, body, loc, position", SURROGATE_CASES,
                         ids=[f"{case[1]}-{'.'.join(map(str, case[3][1:]))}" for case in SURROGATE_CASES])
def test_lone_surrogate_is_a_422_naming_the_field_and_index(kind, path, body, loc, position):
    app, service = vector_app() if kind == "vector" else (None, FakeClassifier())
    app = app or server.create_app(service)
    calls_before = len(service.calls)
    response = post_raw(app, path, body)
    assert response.status_code == 422, response.text
    error, = response.json()["detail"]  # one error, not one per branch of a union ("a valid list")
    assert error["loc"] == loc
    assert f"character {position} is a lone surrogate" in error["msg"] and "U+D" in error["msg"]
    assert len(service.calls) == calls_before  # refused before the model saw it


def test_lone_surrogate_in_a_field_name_or_choice_is_a_422():
    app, _ = vector_app()
    for body in (b'{"texts": ["a"], "\\ud800": 1}', b'{"texts": ["a"], "side": "\\ud800"}'):
        response = post_raw(app, "/encode", body)
        assert response.status_code == 422 and response.json()["detail"][0]["type"] == "string_unicode"


def test_an_error_message_quoting_unencodable_text_is_still_answered():
    """A service error that echoes the client's text gets its 422, written as ASCII JSON, not a 500."""
    class EchoingClassifier(FakeClassifier):
        def predict(self, texts, contexts):
            raise UserError(f"texts[0]: cannot classify {texts[0][:3]!s}\udc80 ünïcode")
    response = post_raw(server.create_app(EchoingClassifier()), "/predict", {"texts": ["abc"]})
    assert response.status_code == 422
    assert response.content.isascii() and "cannot classify abc" in response.json()["detail"]


# ---------------------------------------------------------------- every other client mistake is a 4xx

CLIENT_MISTAKES = [  # (path, body, content type, status, fragment of the JSON detail)
    ("/encode", b'{"texts": [NaN]}', "application/json", 422, "valid string"),
    ("/encode", b'{"texts": [Infinity, -Infinity]}', "application/json", 422, "valid string"),
    ("/encode", b'{"texts": [1e999]}', "application/json", 422, "valid string"),
    ("/encode", b'{"texts": [null]}', "application/json", 422, "valid string"),
    ("/encode", b'{"texts": [["a"]]}', "application/json", 422, "valid string"),
    ("/encode", b'{"texts": [{"text": "a"}]}', "application/json", 422, "valid string"),
    ("/encode", b'{"texts": []}', "application/json", 422, "at least 1 item"),
    ("/encode", b'{"texts": ""}', "application/json", 422, "valid list"),
    ("/encode", b'{"texts": [""]}', "application/json", 422, "texts[0]: empty"),
    ("/encode", b'{"texts": ["\\t\\n \\u3000"]}', "application/json", 422, "texts[0]: empty"),
    ("/encode", b'{"texts": ["a"], "textz": ["b"]}', "application/json", 422, "extra_forbidden"),
    ("/encode", b'{"texts": ["a"], "side": 1}', "application/json", 422, "'query' or 'document'"),
    ("/encode", b'{}', "application/json", 422, "missing"),
    ("/encode", b'[]', "application/json", 422, "valid dictionary"),
    ("/encode", b'["a"]', "application/json", 422, "valid dictionary"),
    ("/encode", b'null', "application/json", 422, "valid dictionary"),
    ("/encode", b'"texts"', "application/json", 422, "valid dictionary"),
    ("/encode", b'12', "application/json", 422, "valid dictionary"),
    ("/encode", b'', "application/json", 422, "missing"),
    ("/encode", b'{"texts": ["a"]', "application/json", 422, "JSON decode error"),
    ("/encode", b'{"texts": [\'a\']}', "application/json", 422, "JSON decode error"),
    ("/encode", b'\xff\xfe\x00{', "application/json", 422, "JSON decode error"),
    ("/encode", b'[' * 20000 + b']' * 20000, "application/json", 400, "error parsing the body"),
    ("/search", b'{"query": "a", "top_k": ' + b"9" * 5000 + b'}', "application/json", 400, "error parsing"),
    ("/search", b'{"query": "a", "top_k": 100000000000000000000000000000}', "application/json", 422,
     "less than or equal to 1000"),
    ("/search", b'{"query": "a", "top_k": -1}', "application/json", 422, "greater than or equal to 1"),
    ("/search", b'{"query": "a", "top_k": 2.0}', "application/json", 422, "valid integer"),
    ("/search", b'{"query": "a", "top_k": NaN}', "application/json", 422, "valid integer"),
    ("/search", b'{"query": "a", "top_k": true}', "application/json", 422, "valid integer"),
    ("/search", b'{"query": "a", "top_k": "3"}', "application/json", 422, "valid integer"),
    ("/search", b'{"query": ["a"]}', "application/json", 422, "valid string"),
    ("/search", b'{"query": "a" , "query": 5}', "application/json", 422, "valid string"),
    ("/similarity", b'{"query": "a", "documents": []}', "application/json", 422, "at least 1 item"),
    ("/similarity", b'{"query": "  ", "documents": ["a"]}', "application/json", 422, "query[0]: empty"),
    ("/similarity", b'{"query": "a", "documents": "a"}', "application/json", 422, "valid list"),
    ("/encode", b'{"texts": ["a"]}', "text/plain", 422, "expected application/json, got 'text/plain'"),
    ("/encode", b'texts=a', "application/x-www-form-urlencoded", 422, "expected application/json"),
    ("/encode", b'{"texts": ["a"]}', None, 422, "no content type"),
    ("/encode", b'--x\r\n\r\n', "multipart/form-data; boundary=x", 422, "expected application/json"),
    ("/encode", b'\x00\x01\x02', "application/octet-stream", 422, "expected application/json"),
    ("/predict", b'{"texts": ["a"]}', "application/json", 404, "is for classification and longdoc models"),
]


@pytest.mark.parametrize("path, body, content_type, status, fragment", CLIENT_MISTAKES,
                         ids=[f"{index}-{case[0]}-{case[3]}" for index, case in enumerate(CLIENT_MISTAKES)])
def test_client_mistakes_on_the_vector_app_get_a_4xx_with_a_detail(path, body, content_type, status, fragment):
    app, service = vector_app(max_texts=4, max_chars=50)
    response = post_raw(app, path, body, content_type)
    assert response.status_code == status, response.text[:300]
    assert fragment in json.dumps(response.json()["detail"]), response.text[:300]
    assert service.calls == [3]  # only the corpus encoding at start-up: no request reached the model


PREDICT_MISTAKES = [
    (b'{"texts": ["a"], "contexts": []}', 422, "contexts: 0 given for 1 texts"),
    (b'{"texts": ["a"], "contexts": ["x", "y"]}', 422, "contexts: 2 given for 1 texts"),
    (b'{"texts": ["a"], "contexts": [5]}', 422, "valid string"),
    (b'{"texts": ["a"], "contexts": "x"}', 422, "valid list"),
    (b'{"texts": ["a"], "contexts": ["' + b"c" * 51 + b'"]}', 413, "contexts[0]: 51 characters"),
    (b'{"texts": ["a", "b", "c", "d", "e"]}', 413, "texts: 5 texts, at most 4"),
    (b'{"texts": ["' + b"t" * 51 + b'"]}', 413, "texts[0]: 51 characters, at most 50"),
    (b'{"texts": ["a"], "labels": ["x"]}', 422, "extra_forbidden"),
    (b'{"texts": [true]}', 422, "valid string"),
]


@pytest.mark.parametrize("body, status, fragment", PREDICT_MISTAKES)
def test_client_mistakes_on_the_classifier_app_get_a_4xx_with_a_detail(body, status, fragment):
    service = FakeClassifier()
    response = post_raw(server.create_app(service, max_texts=4, max_chars=50), "/predict", body)
    assert response.status_code == status, response.text[:300]
    assert fragment in json.dumps(response.json()["detail"]), response.text[:300]
    assert service.calls == []


def test_oversize_declared_and_streamed_bodies_are_413_before_the_model():
    app, service = vector_app(max_texts=2, max_chars=10)
    limit = 2 * 10 * server.BYTES_PER_CHAR + 65536

    async def calls():
        async with client_for(app) as client:
            declared = await client.post("/encode", content=b"{}", headers={"content-length": "99999999999999"})
            assert declared.status_code == 413 and str(limit) in declared.json()["detail"]

            async def chunks():
                for _ in range(40):
                    yield b" " * 4096
            streamed = await client.post("/encode", content=chunks(), headers={"content-type": "application/json"})
            assert streamed.status_code == 413 and "too large" in streamed.json()["detail"]
    asyncio.run(calls())
    assert service.calls == [3]


# ---------------------------------------------------------------- API keys (F14)

@pytest.mark.parametrize("key", ["", " ", "\t\n"])
def test_an_empty_api_key_is_refused_not_read_as_no_auth(key, monkeypatch):
    monkeypatch.delenv(server.API_KEY_ENV, raising=False)
    with pytest.raises(UserError, match="--api-key is empty"):
        server.resolve_api_key(key)
    with pytest.raises(UserError, match="--api-key"):
        server.create_app(FakeClassifier(), api_key=key)


def test_an_empty_api_key_in_the_environment_is_refused(monkeypatch):
    monkeypatch.setenv(server.API_KEY_ENV, "")
    with pytest.raises(UserError, match=f"{server.API_KEY_ENV} environment variable is empty"):
        server.resolve_api_key(None)
    assert server.resolve_api_key("flag-wins") == "flag-wins"
    monkeypatch.delenv(server.API_KEY_ENV)
    assert server.resolve_api_key(None) is None  # no flag, no variable: no auth, as documented


@pytest.mark.parametrize("key", [" padded", "padded ", "clé", "tab\tin"])
def test_an_api_key_no_client_could_send_is_refused(key, monkeypatch):
    monkeypatch.delenv(server.API_KEY_ENV, raising=False)
    with pytest.raises(UserError, match="--api-key: the key must be printable ASCII"):
        server.resolve_api_key(key)


@pytest.mark.parametrize("entry_point", ["infer", "train_vector"])
def test_both_entry_points_refuse_an_empty_api_key(entry_point, tmp_path, monkeypatch, capsys):
    """infer.py --serve and train_vector.py --mode deploy both reach resolve_api_key through create_app."""
    monkeypatch.delenv(server.API_KEY_ENV, raising=False)
    served = []
    monkeypatch.setattr(server, "serve", lambda *args, **kwargs: served.append(args))
    if entry_point == "infer":
        import infer
        monkeypatch.setattr(infer, "load_model", lambda args: types.SimpleNamespace(task="classification"))
        monkeypatch.setattr(infer.inference, "build_service", lambda *args: FakeClassifier())
        status = infer.main(["--model-path", str(tmp_path), "--serve", "--api-key", ""])
    else:
        import train_vector  # the key is checked before any model is looked for
        status = train_vector.main(["--mode", "deploy", "--model_dir", str(tmp_path), "--api_key", ""])
    assert status == 2 and served == []
    assert_one_error_line(capsys.readouterr().err, "--api-key is empty")


# ---------------------------------------------------------------- slow and greedy connections (F6)

@contextlib.contextmanager
def running_server(app, **limits):
    """A real uvicorn server from build_server() on a free 127.0.0.1 port, in a thread; stopped on exit."""
    uvicorn_server = server.build_server(app, "127.0.0.1", free_port(), log_level="warning", **limits)
    thread = threading.Thread(target=uvicorn_server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not uvicorn_server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.02)
    try:
        yield uvicorn_server, f"http://127.0.0.1:{uvicorn_server.config.port}"
    finally:
        uvicorn_server.should_exit = True
        thread.join(20)


def open_raw(base_url, data):
    """A socket to the server that has sent ``data`` and waits at most 10 s for each answer."""
    host, port = base_url.removeprefix("http://").split(":")
    connection = socket.create_connection((host, int(port)), timeout=10)
    connection.sendall(data)
    return connection


def read_until_closed(connection):
    """Everything the server sends until it closes; socket.timeout (a failure) if it keeps it open 10 s."""
    received = b""
    while True:
        try:
            chunk = connection.recv(65536)
        except ConnectionResetError:  # closed with our unread bytes pending: what it sent is already here
            return received
        if not chunk:
            return received
        received += chunk


def wait_for_connections(uvicorn_server, count):
    deadline = time.monotonic() + 10
    while len(uvicorn_server.server_state.connections) != count:
        assert time.monotonic() < deadline, (len(uvicorn_server.server_state.connections), count)
        time.sleep(0.02)


def request_count(base_url, route, status):
    """``toolkit_requests_total`` for this route and status, from GET /metrics (0 when absent)."""
    from prometheus_client.parser import text_string_to_metric_families
    text = httpx.get(f"{base_url}/metrics", timeout=10).text
    return sum(sample.value for family in text_string_to_metric_families(text) for sample in family.samples
               if sample.name == "toolkit_requests_total"
               and sample.labels == {"route": route, "status": str(status)})


def test_stalled_headers_are_cut_off_while_health_keeps_answering():
    app, _ = vector_app()
    with running_server(app, header_timeout=1) as (uvicorn_server, base_url):
        stalled = open_raw(base_url, b"GET /health HTTP/1.1\r\nHost: x\r\nUser-Agent: slo")
        assert httpx.get(f"{base_url}/health", timeout=10).json() == {"status": "ok"}
        started = time.monotonic()
        answer = read_until_closed(stalled)  # raises socket.timeout if the server never closes it
        waited = time.monotonic() - started
        stalled.close()
        assert answer.startswith(b"HTTP/1.1 408 ")
        assert b"request headers not received within 1 s" in answer
        assert waited < 10  # bounded by the 1 s deadline, not by the client's patience
        wait_for_connections(uvicorn_server, 0)
        assert httpx.get(f"{base_url}/health", timeout=10).status_code == 200
        assert request_count(base_url, "other", 408) == 1  # written by the protocol, counted all the same


def test_a_connection_that_never_sends_a_byte_is_closed_silently():
    app, _ = vector_app()
    with running_server(app, header_timeout=1) as (_, base_url):
        silent = open_raw(base_url, b"")
        assert read_until_closed(silent) == b""
        silent.close()


def test_a_trickled_body_is_cut_off_before_the_model_sees_it():
    app, service = vector_app()
    with running_server(app, body_timeout=1) as (uvicorn_server, base_url):
        head = b"POST /encode HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n"
        trickle = open_raw(base_url, head + b'{"texts": ["a')
        answer = read_until_closed(trickle)
        trickle.close()
        assert answer.startswith(b"HTTP/1.1 408 ") and b"request body not received within 1 s" in answer
        wait_for_connections(uvicorn_server, 0)
        assert service.calls == [3]  # the corpus only
        assert httpx.post(f"{base_url}/encode", json={"texts": ["a"]}, timeout=10).status_code == 200
        # counted once, as the route's 408 (not as the 400 of the disconnect the app saw)
        assert (request_count(base_url, "/encode", 408), request_count(base_url, "/encode", 400)) == (1, 0)


def test_connections_beyond_the_cap_get_503_and_the_server_recovers():
    app, _ = vector_app()
    with running_server(app, header_timeout=30, max_connections=3) as (uvicorn_server, base_url):
        stalled = [open_raw(base_url, b"GET /health HTTP/1.1\r\n") for _ in range(3)]
        wait_for_connections(uvicorn_server, 3)
        extra = open_raw(base_url, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = read_until_closed(extra)
        extra.close()
        assert answer.startswith(b"HTTP/1.1 503 ") and b"too many open connections (limit 3)" in answer
        for connection in stalled:
            connection.close()
        wait_for_connections(uvicorn_server, 0)
        assert httpx.get(f"{base_url}/health", timeout=10).status_code == 200
        assert request_count(base_url, "other", 503) == 1


@pytest.mark.parametrize("request_bytes", [
    b"GET /health HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * (server.MAX_HEADER_BYTES + 1),  # oversize headers
    b"GET /\xff HTTP/1.1\r\nHost: x\r\n\r\n",
    b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + b"\x00" * 40,  # a TLS hello on the plain port
    b"POST /encode HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
    b"POST /encode HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
], ids=["oversize-headers", "non-ascii-target", "tls-hello", "two-content-lengths", "bad-chunk"])
def test_unparseable_requests_get_a_400_json_body(request_bytes):
    app, service = vector_app()
    with running_server(app) as (_, base_url):
        connection = open_raw(base_url, request_bytes)
        answer = read_until_closed(connection)
        connection.close()
        assert request_count(base_url, "other", 400) == 1
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 ") and b"content-type: application/json" in head
    assert json.loads(body)["detail"] == "Invalid HTTP request received."
    assert service.calls == [3]


def test_the_read_deadline_does_not_bound_the_model_or_kept_alive_requests():
    class SlowService(FakeVectorService):
        def encode(self, texts):
            time.sleep(1.0)
            return super().encode(texts)
    app = server.create_app(SlowService())
    with running_server(app, header_timeout=0.5, body_timeout=0.5) as (_, base_url):
        with httpx.Client(base_url=base_url, timeout=10) as client:
            for _ in range(2):  # the second request reuses the kept-alive connection
                assert client.post("/encode", json={"texts": ["slow"]}).status_code == 200


def test_serve_applies_the_documented_limits(monkeypatch):
    import uvicorn
    configs, bound = [], []

    def record(self, sockets=None):
        configs.append(self.config)
        bound.extend(sockets or ())
    monkeypatch.setattr(uvicorn.Server, "run", record)
    port = free_port()
    assert server.serve(server.create_app(FakeClassifier()), "127.0.0.1", port) == 0
    assert [sock.getsockname()[1] for sock in bound] == [port]  # bound before uvicorn starts
    for sock in bound:
        sock.close()
    config = configs[0]
    assert issubclass(config.http, server.BoundedH11Protocol)
    assert (config.http.header_timeout, config.http.body_timeout, config.http.max_connections) == (
        server.HEADER_TIMEOUT_SECONDS, server.BODY_TIMEOUT_SECONDS, server.MAX_CONNECTIONS)
    assert config.http.write_timeout == server.WRITE_TIMEOUT_SECONDS
    assert isinstance(config.http.metrics, server.ServerMetrics)  # the app's: protocol-level answers are counted
    assert config.timeout_keep_alive == server.KEEP_ALIVE_SECONDS
    assert config.h11_max_incomplete_event_size == server.MAX_HEADER_BYTES
    assert config.ws == "none" and config.port == port


def test_a_full_queue_answers_429_before_reading_the_body():
    """Admission is at the headers: a refused request's body (here never sent) is not waited for or read."""
    service = GatedCountingService()
    service.gate = threading.Event()
    app = server.create_app(service, max_queue=1, batch_wait_ms=0)
    with running_server(app) as (_, base_url):
        with httpx.Client(base_url=base_url, timeout=30) as blocked, httpx.Client(base_url=base_url,
                                                                                  timeout=30) as queued:
            first = threading.Thread(target=blocked.post, args=("/encode",), kwargs={"json": {"texts": ["x"]}})
            first.start()
            wait_until(lambda: service.calls)
            second = threading.Thread(target=queued.post, args=("/encode",), kwargs={"json": {"texts": ["y"]}})
            second.start()
            wait_until(lambda: app.state.batcher.pending() == 1)
            head = (b"POST /encode HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    b"Content-Length: 1000000\r\n\r\n")
            connection = open_raw(base_url, head)  # the body never follows: waiting for it would time out
            answer = read_one_response(connection)
            connection.close()
            service.gate.set()
            first.join(30)
            second.join(30)
    assert answer.startswith(b"HTTP/1.1 429 ") and b"retry-after: 1" in answer.lower()
    assert b"server busy: 1 requests waiting (limit 1)" in answer
    assert service.calls == [1, 1]


def test_requests_being_tokenized_count_against_the_queue_limit():
    """Two requests stuck in tokenizing fill --max-queue 2: a third is refused before it is read or tokenized."""
    tokenizing = threading.Event()

    class SlowTokenizer(GatedCountingService):
        def __init__(self):
            super().__init__()
            self.counted = 0
            self.release = threading.Event()

        def count_tokens(self, texts, side="query"):
            self.counted += 1
            tokenizing.set()
            self.release.wait(30)
            return super().count_tokens(texts, side)

    service = SlowTokenizer()
    app = server.create_app(service, max_queue=2, batch_wait_ms=0)

    async def calls():
        async with client_for(app) as client:
            admitted = [asyncio.create_task(client.post("/encode", json={"texts": [f"t{i}"]})) for i in range(2)]
            while service.counted < 2:
                await asyncio.sleep(0.01)
            refused = await client.post("/encode", json={"texts": ["third"]})
            queue_size = [line for line in (await client.get("/metrics")).text.splitlines()
                          if line.startswith("toolkit_queue_size ")]
            service.release.set()
            return refused, queue_size, [response.status_code for response in await asyncio.gather(*admitted)]
    refused, queue_size, statuses = run(calls())
    assert refused.status_code == 429 and "2 requests waiting (limit 2)" in refused.json()["detail"]
    assert queue_size == ["toolkit_queue_size 2.0"]  # the gauge counts them too
    assert statuses == [200, 200] and service.counted == 2
    assert app.state.batcher.pending() == 0  # every admission released


def test_a_request_with_both_content_length_and_transfer_encoding_is_refused_and_closed():
    """Request smuggling: what follows the ambiguous request must not be read as a request of its own."""
    app, service = vector_app()
    smuggled = (b"POST /encode HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 5\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /info HTTP/1.1\r\nHost: x\r\n\r\n")
    with running_server(app) as (_, base_url):
        connection = open_raw(base_url, smuggled)
        answer = read_until_closed(connection)
        connection.close()
        assert request_count(base_url, "/encode", 400) == 1 and request_count(base_url, "/info", 200) == 0
    assert answer.count(b"HTTP/1.1 ") == 1 and answer.startswith(b"HTTP/1.1 400 ")
    assert b"both Content-Length and Transfer-Encoding" in answer and b"connection: close" in answer.lower()
    assert service.calls == [3]  # the corpus only


class WideService(FakeVectorService):
    """Embeddings of 2,000,000 values: ~10 MB of base64 per text, more than the sockets buffer."""

    def info(self):
        return {"kind": self.kind, "dim": 2_000_000}

    def encode(self, texts):
        return [np.full(2_000_000, 0.5, dtype=np.float32) for _ in texts]


WIDE_REQUEST_BODY = json.dumps({"input": "x", "encoding_format": "base64"}).encode()
WIDE_REQUEST = (b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(WIDE_REQUEST_BODY), WIDE_REQUEST_BODY))


def test_a_client_that_stops_reading_is_dropped_after_the_write_timeout():
    """A response that cannot be written (the client reads nothing) no longer holds its connection forever."""
    app = server.create_app(WideService())
    request = WIDE_REQUEST
    with running_server(app, write_timeout=1) as (uvicorn_server, base_url):
        reader = socket.socket()
        reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connecting: a small window
        reader.connect(("127.0.0.1", uvicorn_server.config.port))
        reader.sendall(request)
        wait_for_connections(uvicorn_server, 1)
        wait_for_connections(uvicorn_server, 0)  # dropped while our socket is still open, unread
        reader.close()
        assert httpx.get(f"{base_url}/health", timeout=10).status_code == 200


def read_one_response(connection, pause=0.0):
    """The head and body of the next response (by its Content-Length) on a connection that stays open,
    waiting ``pause`` seconds before each read (a slow reader); AssertionError if the server closes first."""
    received = b""
    while b"\r\n\r\n" not in received:
        received += receive_chunk(connection, pause, len(received))
    head, _, body = received.partition(b"\r\n\r\n")
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
    while len(body) < length:
        body += receive_chunk(connection, pause, len(head) + len(body))
    return head + b"\r\n\r\n" + body


def receive_chunk(connection, pause, received):
    time.sleep(pause)
    chunk = connection.recv(1 << 20)
    assert chunk, f"connection closed after {received} bytes"
    return chunk


def test_a_slow_reader_gets_its_whole_answer_past_the_write_timeout():
    """The write clock restarts while bytes keep leaving: an answer longer to send than one period is whole."""
    app = server.create_app(WideService())
    with running_server(app, write_timeout=1) as (uvicorn_server, base_url):
        reader = socket.socket()
        reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 262144)
        reader.settimeout(10)
        reader.connect(("127.0.0.1", uvicorn_server.config.port))
        reader.sendall(WIDE_REQUEST)
        answer = read_one_response(reader, pause=0.1)  # about 11 MB: a few seconds at this pace
        reader.close()
    assert answer.startswith(b"HTTP/1.1 200 ") and len(answer) > 10_000_000


def wait_until(condition, seconds=20):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)
