"""--workers N: several server processes on one port (SO_REUSEPORT), each answering; a clean stop on SIGTERM; a
worker that cannot build its app stops them all. The process boundary is the point, so these run real processes."""
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from common import server
from common.errors import UserError
from conftest import assert_one_error_line
from test_export_onnx import make_model_directory

REPO = Path(__file__).resolve().parents[1]


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_health(process, base_url, seconds=180):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert process.poll() is None, process.stderr.read().decode()[-3000:]
        try:
            if httpx.get(f"{base_url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.3)
    raise AssertionError("the server did not answer /health")


def is_running(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_two_workers_answer_on_one_port_a_dead_one_is_replaced_and_sigterm_stops_all(tiny_model_dir, tmp_path):
    model_dir = make_model_directory(tiny_model_dir, tmp_path / "classifier")
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    process = subprocess.Popen([sys.executable, "infer.py", "--model-path", str(model_dir), "--serve", "--workers", "2",
                                "--port", str(port)], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for_health(process, base_url)
        # a client that stalls mid-headers is cut off by a worker's read deadline (server.HEADER_TIMEOUT_SECONDS)
        stalled = socket.create_connection(("127.0.0.1", port), timeout=server.HEADER_TIMEOUT_SECONDS + 30)
        stalled.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nUser-Ag")
        pids = set()
        for _ in range(200):  # each a new connection: the kernel spreads them by address hash
            pids.add(httpx.get(f"{base_url}/info", timeout=30).json()["pid"])
            if len(pids) == 2:
                break
            time.sleep(0.05)  # the second worker may still be loading its model
        assert len(pids) == 2 and process.pid not in pids
        answer = stalled.recv(65536)  # socket.timeout (a failure) if the worker kept the connection open
        stalled.close()
        assert answer.startswith(b"HTTP/1.1 408 ")
        os.kill(min(pids), signal.SIGKILL)  # a worker that dies is replaced
        replacement = None
        deadline = time.monotonic() + 180
        while replacement is None and time.monotonic() < deadline:
            try:
                pid = httpx.get(f"{base_url}/info", timeout=30).json()["pid"]
                replacement = pid if pid not in pids else None
            except httpx.HTTPError:  # a connection hashed to the dead worker's socket
                pass
            time.sleep(0.2)
        assert replacement is not None
        pids.add(replacement)
        response = httpx.post(f"{base_url}/predict", json={"texts": ["good movie"]}, timeout=30)
        assert response.status_code == 200 and response.json()["predictions"][0]["label"]
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    deadline = time.monotonic() + 10
    while any(is_running(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(is_running(pid) for pid in pids)


def refusing_app():
    """An app factory that fails as a bad model would (picklable: a module-level function)."""
    raise UserError("model.onnx: cannot be loaded")


def test_a_worker_that_cannot_build_its_app_stops_them_all(capfd):
    assert server.serve_workers(refusing_app, 2, port=free_port(), log_level="warning") == server.WORKER_STARTUP_FAILED
    assert "error: model.onnx: cannot be loaded" in capfd.readouterr().err


def test_a_port_in_use_is_one_line_before_the_model_loads(tmp_path, capsys):
    import infer
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert infer.main(["--model-path", str(tmp_path / "missing"), "--serve", "--workers", "2", "--port",
                           str(port)]) == 2
        assert_one_error_line(capsys.readouterr().err, "missing")  # the model path is checked first
        with pytest.raises(UserError, match=f"--port {port}: cannot listen on 127.0.0.1"):
            server.serve_workers(refusing_app, 2, port=port)


@pytest.mark.parametrize("entry_point", ["infer", "train_vector"])
def test_both_entry_points_hand_the_workers_a_picklable_app_builder(entry_point, tiny_model_dir, tmp_path,
                                                                    monkeypatch):
    """What each worker process runs, run here: it builds an app with the flags' limits that answers."""
    import pickle

    from fastapi.testclient import TestClient

    import infer
    import train_vector
    from test_export_onnx import make_vector_directory
    model_dir = make_vector_directory(tiny_model_dir, tmp_path / "vector")
    calls = []
    monkeypatch.setattr(server, "serve", lambda app, host, port, **options: calls.append((app, options)) or 0)
    argv = ["--model-path", str(model_dir), "--workers", "3", "--max-queue", "7", "--api-key", "k"]
    if entry_point == "infer":
        assert infer.main(argv + ["--serve"]) == 0
    else:
        assert train_vector.main(argv + ["--mode", "deploy"]) == 0
    build_app, options = calls[0]
    assert options == {"workers": 3, "has_key": True}
    with TestClient(pickle.loads(pickle.dumps(build_app))()) as client:
        info = client.get("/info", headers={"X-API-Key": "k"}).json()
        assert info["max_queue"] == 7 and info["kind"] == "vector"
        assert client.post("/encode", json={"texts": ["good movie"]}, headers={"X-API-Key": "k"}).status_code == 200
