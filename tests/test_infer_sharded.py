"""infer.py --file under torchrun: two gloo processes on CPU write the same output, in input order,
as one process (bad lines kept in their place), and the shares cover every input once."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from common import sharding
from test_export_onnx import make_model_directory

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("count,world_size", [(0, 2), (1, 2), (7, 2), (10, 3), (3, 4)])
def test_shares_are_contiguous_and_cover_every_input_once(count, world_size):
    bounds = [sharding.shard_bounds(count, rank, world_size) for rank in range(world_size)]
    assert bounds[0][0] == 0 and bounds[-1][1] == count
    assert all(end == next_start for (_, end), (next_start, _) in zip(bounds, bounds[1:]))
    sizes = [end - start for start, end in bounds]
    assert max(sizes) - min(sizes) <= 1


def run_infer(arguments, processes, cwd):
    launcher = [sys.executable] if processes == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    environment = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    return subprocess.run(launcher + [str(REPO / "infer.py"), *arguments], capture_output=True, text=True,
                          timeout=300, env=environment, cwd=cwd)


def test_two_processes_write_what_one_process_writes(tiny_model_dir, tmp_path):
    model_dir = make_model_directory(tiny_model_dir, tmp_path / "model")
    lines = [" ".join("abcdefgh"[(index * 3 + position) % 8] for position in range(2 + index % 9))
             for index in range(23)]
    lines[5] = "   "  # a bad input: reported in its place, by the process that owns it
    lines[17] = ""
    (tmp_path / "inputs.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    outputs = {}
    for processes in (1, 2):
        output = tmp_path / f"out-{processes}.jsonl"
        result = run_infer(["--model-path", str(model_dir), "--file", "inputs.txt", "--output", str(output),
                            "--batch-size", "4"], processes, tmp_path)
        assert result.returncode == 1, result.stderr[-3000:]  # some inputs failed: exit 1, as one process
        assert result.stderr.count("2 of 23 input(s) could not be processed") == 1  # said once, by the main one
        outputs[processes] = [json.loads(line) for line in output.read_text(encoding="utf-8").splitlines()]
    assert [row["source"] for row in outputs[2]] == [f"inputs.txt line {number}" for number in range(1, 24)]
    assert ["error" in row for row in outputs[2]] == [index in (5, 17) for index in range(23)]
    for one, two in zip(outputs[1], outputs[2]):
        assert one.keys() == two.keys() and one.get("label") == two.get("label")
        assert one.get("probability") == pytest.approx(two.get("probability"), abs=1e-5)


def test_torchrun_without_a_file_is_refused_with_one_line(tiny_model_dir, tmp_path):
    model_dir = make_model_directory(tiny_model_dir, tmp_path / "model")
    result = run_infer(["--model-path", str(model_dir), "--text", "a b c"], 2, tmp_path)
    assert result.returncode != 0
    assert "error: torchrun: only --file runs are sharded" in result.stderr
