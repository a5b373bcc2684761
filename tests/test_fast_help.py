"""``--help`` answers before torch loads (common/cli.py's exit_on_help), with the script's whole help.

The process boundary is the point: torch must not be in ``sys.modules`` when the script exits.
"""
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from common import cli

REPO = Path(__file__).resolve().parents[1]
# runs the script as ``python SCRIPT FLAG`` would, then says whether torch was imported
RUN_AND_REPORT = """import runpy, sys
sys.argv = sys.argv[1:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
finally:
    print("torch imported:", "torch" in sys.modules, file=sys.stderr)
"""
FLAGS_SHOWN = {
    "train_classifier.py": ("--data-path", "--output-dir", "--pooling", "--metric-for-best-model"),
    "train_vector.py": ("--data-path", "--output-dir", "--loss", "--k"),
    "train_longdoc.py": ("--data-path", "--output-dir", "--aggregation", "--chunk-selection"),
    "export_onnx.py": ("--model-path", "--output-path", "--opset"),
    "infer.py": ("--model-path", "--text", "--num-return-sequences"),
}


@pytest.mark.parametrize("flag", ["--help", "-h"])
@pytest.mark.parametrize("script", sorted(FLAGS_SHOWN))
def test_help_without_torch(script, flag, monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")  # the same width here and in the child, for the comparison below
    result = subprocess.run([sys.executable, "-c", RUN_AND_REPORT, script, flag], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "torch imported: False" in result.stderr
    for shown in FLAGS_SHOWN[script]:
        assert shown in result.stdout
    parser = importlib.import_module(Path(script).stem).build_parser()
    parser.prog = script
    assert result.stdout == parser.format_help()  # the help main would print


def build_small_parser():
    parser = cli.ArgumentParser()
    cli.add_flag(parser, "epochs", type=int, default=3)
    return parser


def test_exit_on_help_prints_and_exits(capsys):
    with pytest.raises(SystemExit) as stopped:
        cli.exit_on_help(build_small_parser, ["--epochs", "2", "-h"])
    assert stopped.value.code == 0
    assert "--epochs" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [["--epochs", "x", "--help"], ["--epochs", "2"], ["--epohcs", "2"]])
def test_exit_on_help_leaves_everything_else_to_main(argv, capsys):
    cli.exit_on_help(build_small_parser, argv)  # a mistake before -h, or no -h: main parses and reports
    assert capsys.readouterr() == ("", "")
