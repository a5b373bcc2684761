"""bench/gpu_check.sh without a GPU: its syntax, its arguments, the one line it says when no GPU is
visible; and bench/gpu_check.py's checks run end to end on CPU with the tiny model (--device cpu, a
way to test the script's own logic, not the CUDA paths)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "gpu_check.sh"


def run_script(*arguments):
    return subprocess.run(["bash", str(SCRIPT), *arguments], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHON=sys.executable))


def test_the_script_parses():
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0


@pytest.mark.parametrize("arguments,message", [(["--bogus"], "error: unknown argument '--bogus' (see --help)"),
                                               (["--model"], "error: --model needs a value"),
                                               (["--model", "/nonexistent/model"], "error: --model /nonexistent/model")])
def test_bad_arguments_are_one_line_and_exit_2(arguments, message):
    result = run_script(*arguments)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith(message) and result.stderr.count("\n") == 1


def test_help_describes_the_checks():
    result = run_script("--help")
    assert result.returncode == 0 and "fp16 + GradScaler" in result.stdout and "--work-dir" in result.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible: the script would run the checks")
def test_without_a_gpu_it_says_so_in_one_line_and_runs_nothing(tiny_model_dir, tmp_path):
    result = run_script("--model", str(tiny_model_dir), "--work-dir", str(tmp_path / "work"))
    assert result.returncode == 0 and result.stderr == ""
    assert result.stdout == ("gpu_check: no CUDA GPU visible to torch on this machine: nothing checked, "
                             "the CUDA paths stay unproven\n")
    assert not (tmp_path / "work").exists()


def test_the_checks_run_end_to_end_on_cpu(tiny_model_dir, tmp_path, capsys):
    from bench import gpu_check
    gpu_check.main(["--model", str(tiny_model_dir), "--device", "cpu", "--precisions", "fp32",
                    "--work-dir", str(tmp_path)])
    assert "| check" in capsys.readouterr().out
    rows = {row["check"]: row for row in json.loads((tmp_path / "results.json").read_text())["rows"]}
    for script in gpu_check.TRAINERS:
        assert "resume max |diff| 0.00e+00" in rows[f"{script} fp32"]["detail"]  # exact resume, each trainer
    assert rows["DDP train_classifier bf16"]["result"] == "SKIP"
    for check in ("export_onnx.py parity", "infer.py --device cpu", "serve_load.py"):
        assert rows[check]["result"] == "PASS", rows[check]
