"""Several machines: the training wrappers pass NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT (or a
RDZV_ENDPOINT) to torchrun, and two "nodes" on loopback (one process each) train exactly what one
node with two processes trains."""
import os
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from test_trainer_contract import contract_argv, read_rows, write_data

REPO = Path(__file__).resolve().parents[1]
WRAPPER = REPO / "scripts" / "train_classifier.sh"


def wrapper_environment(**settings):
    environment = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", DEVICE="cpu",
                       PYTHONPATH=str(REPO), **settings)
    for name in ("NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "RDZV_ENDPOINT", "NPROC"):
        if name not in settings:
            environment.pop(name, None)
    return environment


def dry_run(**settings):
    return subprocess.run(["bash", str(WRAPPER)], capture_output=True, text=True, timeout=60,
                          env=wrapper_environment(DRY_RUN="1", **settings))


def test_several_machines_with_a_fixed_master():
    result = dry_run(NNODES="2", NODE_RANK="1", MASTER_ADDR="10.0.0.1", MASTER_PORT="29400", NPROC="4")
    assert result.returncode == 0, result.stderr
    assert shlex.split(result.stdout)[1:13] == [
        "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", "1", "--master_addr", "10.0.0.1",
        "--master_port", "29400", "--nproc_per_node", "4"]


def test_several_machines_with_a_rendezvous_endpoint():
    result = dry_run(NNODES="3", RDZV_ENDPOINT="head.example:29400", RDZV_ID="job7")
    assert result.returncode == 0, result.stderr
    assert shlex.split(result.stdout)[1:13] == [
        "-m", "torch.distributed.run", "--nnodes", "3", "--rdzv_backend", "c10d", "--rdzv_endpoint",
        "head.example:29400", "--rdzv_id", "job7", "--nproc_per_node", "1"]


@pytest.mark.parametrize("settings,message", [
    ({"NNODES": "2", "NODE_RANK": "0"}, "error: NNODES=2 needs NODE_RANK and MASTER_ADDR"),
    ({"NNODES": "2", "MASTER_ADDR": "10.0.0.1"}, "error: NNODES=2 needs NODE_RANK and MASTER_ADDR"),
    ({"NNODES": "2", "NODE_RANK": "2", "MASTER_ADDR": "10.0.0.1"}, "error: NODE_RANK must be below NNODES=2"),
    ({"NNODES": "two"}, "error: NNODES must be a whole number, at least 1 (got 'two')"),
    ({"NNODES": "2", "NODE_RANK": "0", "MASTER_ADDR": "h", "MASTER_PORT": "x"}, "error: MASTER_PORT must be")])
def test_incomplete_settings_are_one_line_before_anything_starts(settings, message):
    result = dry_run(**settings)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith(message) and result.stderr.count("\n") == 1


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])


def start_wrapper(arguments, log_file, **settings):
    # START_WAIT longer than the run: the wrapper returns when training has finished, with its status
    return subprocess.Popen(["bash", str(WRAPPER), *arguments], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=wrapper_environment(START_WAIT="400", LOG_FILE=str(log_file),
                                                               LABELS="negative,positive",
                                                               **settings))


def finish(process):
    stdout, stderr = process.communicate(timeout=420)
    assert process.returncode == 0, stderr
    assert "training finished (exit 0)" in stdout


def test_two_nodes_on_loopback_train_what_one_node_with_two_processes_trains(tiny_model_dir, tmp_path):
    data = write_data("train_classifier", tmp_path)
    one_node, two_nodes = tmp_path / "one-node", tmp_path / "two-nodes"
    # configs/classifier.yaml (the wrapper's) has three labels; the test data two
    arguments = {output: contract_argv("train_classifier", tiny_model_dir, data, output, "--num-labels", "2")
                 for output in (one_node, two_nodes)}
    finish(start_wrapper(arguments[one_node], tmp_path / "one.log", NPROC="2"))
    port = free_port()
    nodes = [start_wrapper(arguments[two_nodes], tmp_path / f"node{rank}.log", NNODES="2", NODE_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                           MASTER_PORT=port, NPROC="1") for rank in (0, 1)]
    for node in nodes:
        finish(node)
    losses = [[(row["step"], row["loss"]) for row in read_rows(output) if "loss" in row]
              for output in (one_node, two_nodes)]
    assert losses[0] and losses[0] == losses[1]
    weights = [load_file(str(output / "checkpoint-best" / "model.safetensors")) for output in (one_node, two_nodes)]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])
