"""The command line's first minutes: standard input (`--file -`, or piped with no input flag), the
interactive loop on a terminal, clipped echoes of long documents, progress bars only on a terminal, and
the shell wrappers (flags pass through, a failed start is reported, not "training started")."""
import io
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import export_onnx
import infer
from common.errors import UserError
from conftest import assert_one_error_line, write_jsonl
from test_export_onnx import LABELS, make_model_directory, make_vector_directory
from test_generation import gpt2_dir  # noqa: F401  (a fixture)

REPO = Path(__file__).resolve().parents[1]
needs_bash = pytest.mark.skipif(shutil.which("bash") is None, reason="bash is not installed")


@pytest.fixture(scope="module")
def classifier_dir(tiny_model_dir, tmp_path_factory):
    return make_model_directory(tiny_model_dir, tmp_path_factory.mktemp("cli-classifier"))


@pytest.fixture(scope="module")
def longdoc_dir(tiny_model_dir, tmp_path_factory):
    return make_model_directory(tiny_model_dir, tmp_path_factory.mktemp("cli-longdoc"), task="longdoc",
                                max_length=16)


@pytest.fixture(scope="module")
def vector_dir(tiny_model_dir, tmp_path_factory):
    return make_vector_directory(tiny_model_dir, tmp_path_factory.mktemp("cli-vector"))


class Terminal(io.StringIO):
    """Typed lines on a terminal: what input() reads when sys.stdin is not the real console."""

    def isatty(self):
        return True


class CtrlCAfterFirstLine(Terminal):
    def readline(self, *args):
        if self.tell():
            raise KeyboardInterrupt
        return super().readline(*args)


def piped(monkeypatch, content):
    """Standard input as a pipe holding ``content`` (bytes, or text encoded as UTF-8)."""
    raw = content if isinstance(content, bytes) else content.encode("utf-8")
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(raw), encoding="utf-8"))


def typed(monkeypatch, stream):
    monkeypatch.setattr(sys, "stdin", stream)


def json_rows(out):
    return [json.loads(line) for line in out.splitlines() if line.strip()]


# ---------------------------------------------------------------- standard input

def test_file_dash_reads_lines_from_standard_input(classifier_dir, monkeypatch, capsys):
    piped(monkeypatch, "good movie\n   \n今天天气真好啊\n\n")
    assert infer.main(["--model-path", str(classifier_dir), "--file", "-", "--json"]) == 1
    captured = capsys.readouterr()
    rows = json_rows(captured.out)
    assert [row.get("input") for row in rows] == ["good movie", None, "今天天气真好啊"]
    assert [row["source"] for row in rows] == ["stdin line 1", "stdin line 2", "stdin line 3"]
    assert "skipped stdin line 2: empty or whitespace-only text" in captured.err


def test_file_dash_reads_json_records_when_the_input_starts_with_a_brace(classifier_dir, monkeypatch, capsys):
    piped(monkeypatch, '{"message": "good movie"}\nnot json\n{"message": "sad", "context": "今天下雨了"}\n')
    assert infer.main(["--model-path", str(classifier_dir), "--file", "-", "--json"]) == 1
    captured = capsys.readouterr()
    rows = json_rows(captured.out)
    assert rows[0]["input"] == "good movie" and rows[2]["context"] == "今天下雨了"
    assert rows[1]["source"] == "stdin line 2" and "invalid JSON" in rows[1]["error"]
    assert "skipped stdin line 2: invalid JSON" in captured.err
    piped(monkeypatch, '  [{"text": "good movie"}, {"text": "very sad"}]')  # a JSON array, after spaces
    assert infer.main(["--model-path", str(classifier_dir), "--file", "-", "--json"]) == 0
    rows = json_rows(capsys.readouterr().out)
    assert [row["input"] for row in rows] == ["good movie", "very sad"]
    assert [row["source"] for row in rows] == ["stdin record 1", "stdin record 2"]


def test_standard_input_and_a_file_are_read_by_the_same_reader(classifier_dir, tmp_path, monkeypatch, capsys):
    content = '[{"text": "good movie"}, 5, {"text": "good", "text": "twice"}, {"text": "very sad"}]'
    (tmp_path / "in.json").write_text(content, encoding="utf-8")
    answers = []
    for source in ("-", str(tmp_path / "in.json")):
        piped(monkeypatch, content)
        assert infer.main(["--model-path", str(classifier_dir), "--file", source, "--json"]) == 1
        rows = json_rows(capsys.readouterr().out)
        answers.append([(row["source"].split()[-2:], row.get("input"), (row.get("error") or "").split(": ")[-1])
                        for row in rows])
    assert answers[0] == answers[1]
    assert [where for where, _, _ in answers[0]] == [["record", str(number)] for number in range(1, 5)]
    assert [text for _, text, _ in answers[0]] == ["good movie", None, None, "very sad"]


def test_standard_input_that_is_empty_or_not_utf8_is_one_line(classifier_dir, monkeypatch, capsys):
    piped(monkeypatch, "good\n".encode() + "café\n".encode("latin-1"))
    assert infer.main(["--model-path", str(classifier_dir), "--file", "-"]) == 2
    assert_one_error_line(capsys.readouterr().err, "stdin line 2", "not valid UTF-8")
    piped(monkeypatch, " \n\n")
    assert infer.main(["--model-path", str(classifier_dir), "--file", "-"]) == 2
    assert_one_error_line(capsys.readouterr().err, "no input: stdin is empty")
    monkeypatch.setattr(sys, "stdin", None)  # started with standard input closed
    assert infer.main(["--model-path", str(classifier_dir)]) == 2
    assert_one_error_line(capsys.readouterr().err, "standard input is closed")


def test_no_input_flag_reads_piped_standard_input(classifier_dir, longdoc_dir, monkeypatch, capsys):
    piped(monkeypatch, "good movie\nvery sad\n")
    assert infer.main(["--model-path", str(classifier_dir), "--json"]) == 0
    assert [row["input"] for row in json_rows(capsys.readouterr().out)] == ["good movie", "very sad"]
    article = "good movie and the music was great\n\nthe team game was bad\n"
    piped(monkeypatch, article)  # a long-document model reads all of it as one document, like a .txt file
    assert infer.main(["--model-path", str(longdoc_dir), "--json"]) == 0
    rows = json_rows(capsys.readouterr().out)
    assert len(rows) == 1 and rows[0]["input"] == article and rows[0]["source"] == "stdin"


def test_piped_input_through_a_real_process(classifier_dir):
    result = subprocess.run([sys.executable, str(REPO / "infer.py"), "--model-path", str(classifier_dir), "--json"],
                            input="good movie\n今天天气真好啊\n".encode("utf-8"), capture_output=True, cwd=REPO,
                            timeout=120)
    assert result.returncode == 0, result.stderr.decode()
    rows = json_rows(result.stdout.decode("utf-8"))
    assert [row["input"] for row in rows] == ["good movie", "今天天气真好啊"]
    assert set(rows[0]["probabilities"]) == set(LABELS.values())
    assert b"Traceback" not in result.stderr and b"inference" not in result.stderr  # no bar into a pipe


# ---------------------------------------------------------------- the interactive loop

def test_interactive_loop_answers_until_an_empty_line():
    answered = []
    code = infer.interactive_loop(lambda text: answered.append(text) or f"answer to {text}",
                                  iter(["first", "second", "", "never read"]), output=io.StringIO())
    assert code == 0 and answered == ["first", "second"]
    output = io.StringIO()
    assert infer.interactive_loop(str.upper, iter(["a", "b"]), output=output) == 0  # the end of input
    assert output.getvalue() == "A\nB\n"


def test_interactive_loop_survives_a_bad_line_and_ends_on_ctrl_c(capsys):
    def answer(text):
        if text == "bad":
            raise UserError("this line cannot be answered")
        return text.upper()

    def lines():
        yield from ("bad", "good")
        raise KeyboardInterrupt
    output = io.StringIO()
    assert infer.interactive_loop(answer, lines(), output=output) == 0
    assert output.getvalue() == "GOOD\n\n"
    assert capsys.readouterr().err == "error: this line cannot be answered\n"


def test_a_terminal_with_no_input_flag_gets_the_loop_for_a_classifier(classifier_dir, monkeypatch, capsys):
    typed(monkeypatch, Terminal("good movie\nvery sad\n\nnot answered\n"))
    assert infer.main(["--model-path", str(classifier_dir)]) == 0
    captured = capsys.readouterr()
    answers = [line.removeprefix(infer.PROMPT) for line in captured.out.splitlines()]
    assert len(answers) == 3  # two answers, then the prompt that read the empty line
    for answer in answers[:2]:
        label, _, probability = answer.partition(" (probability ")
        assert label in LABELS.values() and 0 < float(probability.rstrip(")")) <= 1
    assert "not answered" not in captured.out and "input:" not in captured.out  # no echo of the typed line
    assert "an empty line, Ctrl-D or Ctrl-C quits" in captured.err and "Traceback" not in captured.err
    typed(monkeypatch, Terminal("good movie\n"))  # --json: one object per line
    assert infer.main(["--model-path", str(classifier_dir), "--json", "--top-k", "2"]) == 0
    row = json.loads(capsys.readouterr().out.removeprefix(infer.PROMPT).splitlines()[0])
    assert row["input"] == "good movie" and len(row["top_k"]) == 2


def test_ctrl_c_and_ctrl_d_end_the_loop_cleanly(classifier_dir, monkeypatch, capsys):
    typed(monkeypatch, CtrlCAfterFirstLine("good movie\nsecond\n"))
    assert infer.main(["--model-path", str(classifier_dir)]) == 0
    captured = capsys.readouterr()
    assert "(probability " in captured.out and "Traceback" not in captured.err
    typed(monkeypatch, Terminal("good movie"))  # Ctrl-D after one line: input() raises EOFError
    assert infer.main(["--model-path", str(classifier_dir)]) == 0
    captured = capsys.readouterr()
    assert captured.out.count("(probability ") == 1 and captured.out.endswith("\n")
    assert "Traceback" not in captured.err


def test_the_loop_for_vector_long_document_and_language_models(vector_dir, longdoc_dir, gpt2_dir, tmp_path,
                                                                 monkeypatch, capsys):
    typed(monkeypatch, Terminal("good movie\n"))
    assert infer.main(["--model-path", str(vector_dir)]) == 0
    assert "embedding (dim 16): [" in capsys.readouterr().out
    corpus = write_jsonl(tmp_path / "corpus.jsonl", [{"id": "film", "text": "good movie"},
                                                     {"id": "money", "text": "stock price"}])
    typed(monkeypatch, Terminal("stock price\n"))
    assert infer.main(["--model-path", str(vector_dir), "--corpus", str(corpus)]) == 0
    out = capsys.readouterr().out
    assert "1. " in out and "2. " in out and out.index("money") < out.index("film")  # the nearest first
    typed(monkeypatch, Terminal("good movie and the music was great\n"))
    assert infer.main(["--model-path", str(longdoc_dir), "--explain", "1"]) == 0
    out = capsys.readouterr().out
    assert any(out.removeprefix(infer.PROMPT).startswith(label + " (probability") for label in LABELS.values())
    assert "  chunk " in out
    typed(monkeypatch, Terminal("今天\n"))
    assert infer.main(["--model-path", str(gpt2_dir), "--max-new-tokens", "3", "--temperature", "0"]) == 0
    captured = capsys.readouterr()
    assert captured.out.removeprefix(infer.PROMPT).startswith("今天") and "type a prompt" in captured.err


def test_the_loop_refuses_output_and_reports_a_bad_line_without_ending(classifier_dir, gpt2_dir, tmp_path,
                                                                       monkeypatch, capsys):
    typed(monkeypatch, Terminal("good movie\n"))
    assert infer.main(["--model-path", str(classifier_dir), "--output", str(tmp_path / "out.jsonl")]) == 2
    assert_one_error_line(capsys.readouterr().err, "--output needs inputs")
    typed(monkeypatch, Terminal("\ud800\n今天\n"))  # a lone surrogate, then a prompt that works
    assert infer.main(["--model-path", str(gpt2_dir), "--max-new-tokens", "2", "--temperature", "0"]) == 0
    captured = capsys.readouterr()
    assert "error: not valid Unicode text" in captured.err and "今天" in captured.out


# ---------------------------------------------------------------- echoes and progress bars

def test_explain_prints_a_clipped_preview_not_the_whole_document(longdoc_dir, capsys):
    document = " ".join(f"good movie number {index} and the music was great" for index in range(40))
    assert infer.main(["--model-path", str(longdoc_dir), "--text", document, "--explain", "2"]) == 0
    out = capsys.readouterr().out
    echo = next(line for line in out.splitlines() if line.startswith("input: "))
    assert echo == f"input: {document[:infer.PREVIEW_CHARACTERS]}… ({len(document)} characters)"
    assert document not in out and "  chunk " in out
    assert infer.main(["--model-path", str(longdoc_dir), "--text", document, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["input"] == document  # JSON keeps the whole input


def test_file_runs_show_a_progress_bar_only_on_a_terminal(classifier_dir, tmp_path, monkeypatch, capsys):
    inputs = tmp_path / "inputs.txt"
    inputs.write_text("good movie\nvery sad\nthe team game\nstock price\n", encoding="utf-8")
    argv = ["--model-path", str(classifier_dir), "--file", str(inputs), "--batch-size", "2", "--json"]
    assert infer.main(argv) == 0
    assert capsys.readouterr().err == ""  # not a terminal: no bar
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert infer.main(argv) == 0
    assert "inference" in terminal.getvalue() and "/2" in terminal.getvalue()  # two batches
    assert len(json_rows(capsys.readouterr().out)) == 4


def test_tokenizing_a_large_set_shows_a_bar_on_the_main_process_only(tiny_model_dir, monkeypatch):
    from common import data, modeldir
    tokenizer = modeldir.load_tokenizer(str(tiny_model_dir))
    texts = ["good movie", "very sad " * 30, "the team game", "stock price", "good", "sad day", "music"]
    contexts = [None, "today it rained", None, "", "the music was great", None, "game"]

    def encode():
        stats = data.EncodedBatchStats()
        return data.encode_texts(tokenizer, texts, contexts, 16, "left", stats), stats
    whole = encode()  # 7 records: one block, no bar
    monkeypatch.setattr(data, "TOKENIZING_BLOCK_RECORDS", 2)
    monkeypatch.setattr(data, "TOKENIZING_PROGRESS_MIN_RECORDS", 7)
    for rank, bar_shown in (("0", True), ("1", False)):
        monkeypatch.setenv("RANK", rank)
        terminal = Terminal()
        monkeypatch.setattr(sys, "stderr", terminal)
        assert encode() == whole  # blocks change nothing: same features, same summary counts
        assert ("tokenizing" in terminal.getvalue() and "/7 " in terminal.getvalue()) == bar_shown
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setattr(data, "TOKENIZING_PROGRESS_MIN_RECORDS", 8)  # a smaller set gets no bar
    monkeypatch.setattr(sys, "stderr", Terminal())
    encode()
    assert sys.stderr.getvalue() == ""


def test_export_parity_checks_show_progress_bars_on_a_terminal(monkeypatch):
    batch = {"input_ids": torch.ones(2, 4, dtype=torch.long), "attention_mask": torch.tensor([[1, 1, 1, 1],
                                                                                             [1, 1, 0, 0]]),
             "token_type_ids": torch.zeros(2, 4, dtype=torch.long)}
    batches = [(2, 4, batch)] * 3

    def run(inputs):
        return np.zeros((inputs["input_ids"].shape[0], 3), dtype=np.float32)
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    cases = export_onnx.compare_outputs(run, run, batches, "classification")
    assert export_onnx.padding_invariance(run, batches) == 0.0
    assert len(cases) == 3 and cases[0]["label_agreement"] == 1.0
    assert "parity check" in terminal.getvalue() and "padding check" in terminal.getvalue()
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # not a terminal
    export_onnx.compare_outputs(run, run, batches, "classification")
    assert sys.stderr.getvalue() == ""


# ---------------------------------------------------------------- shell wrappers

# wrapper: (the script it runs, a flag given after the wrapper's name, its dest, the value parsed)
WRAPPERS = {"train_classifier.sh": ("train_classifier", "--seed", "seed", 7),
            "train_longdoc.sh": ("train_longdoc", "--seed", "seed", 7),
            "train_vector.sh": ("train_vector", "--seed", "seed", 7),
            "deploy_vector.sh": ("train_vector", "--port", "port", 9000),
            "export_onnx.sh": ("export_onnx", "--tolerance", "tolerance", 0.001),
            "infer.sh": ("infer", "--batch-size", "batch_size", 8)}


def run_wrapper(name, *extra, timeout=180, **environment):
    env = dict(os.environ, PYTHON=sys.executable, **environment)
    return subprocess.run(["bash", str(REPO / "scripts" / name), *extra], capture_output=True, text=True, env=env,
                          timeout=timeout)


@needs_bash
@pytest.mark.parametrize("name", sorted(WRAPPERS))
def test_wrapper_flags_are_the_scripts_flags_and_extra_ones_pass_through(name):
    import importlib
    script, flag, dest, value = WRAPPERS[name]
    result = run_wrapper(name, flag, str(value), DRY_RUN="1", NPROC="1")
    assert result.returncode == 0, result.stderr
    command = shlex.split(result.stdout)
    assert command[:2] == [sys.executable, f"{script}.py"] and command[-2:] == [flag, str(value)]
    args = importlib.import_module(script).build_parser().parse_args(command[2:])  # every flag exists
    assert getattr(args, dest) == value  # a flag after the wrapper's name overrides the wrapper's default
    assert args.device in ("auto", "cpu")  # never a GPU the machine may lack


TRAINING_WRAPPERS = ("train_classifier.sh", "train_longdoc.sh")


@needs_bash
@pytest.mark.parametrize("name", TRAINING_WRAPPERS)
def test_training_wrappers_take_labels_and_start_torchrun_for_several_gpus(name):
    result = run_wrapper(name, DRY_RUN="1", LABELS="spam,ham", NPROC="4", TEXT_FIELD="body", LABEL_FIELD="y",
                         VAL_PATH="val data.jsonl", TEST_PATH="test.jsonl", DEVICE="cpu")
    command = shlex.split(result.stdout)
    assert command[:7] == [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "4",
                           name.replace(".sh", ".py")]
    pairs = dict(zip(command[7::2], command[8::2]))  # every flag before the wrapper's defaults takes a value
    assert {flag: pairs[flag] for flag in ("--config", "--labels", "--text-field", "--label-field", "--val-path",
                                           "--test-path", "--device")} == {
        "--config": f"configs/{name[len('train_'):-len('.sh')]}.yaml", "--labels": "spam,ham", "--text-field": "body",
        "--label-field": "y", "--val-path": "val data.jsonl", "--test-path": "test.jsonl", "--device": "cpu"}
    assert "--labels" not in shlex.split(run_wrapper(name, DRY_RUN="1", LABELS="").stdout)


@needs_bash
@pytest.mark.parametrize("name", TRAINING_WRAPPERS)
def test_a_wrapper_reports_a_failed_start_instead_of_training_started(name, tmp_path):
    log = tmp_path / "train.log"
    result = run_wrapper(name, "--bogus-flag", LOG_FILE=str(log))
    assert result.returncode == 2
    assert "training started" not in result.stdout
    assert "training failed to start (exit 2): error: unrecognized arguments: --bogus-flag" in result.stderr
    assert f"full log: {log}" in result.stderr and "--bogus-flag" in log.read_text(encoding="utf-8")


@needs_bash
def test_a_wrapper_that_cannot_start_says_why_in_one_line(tmp_path):
    for environment, status, message in (
            ({"NPROC": "two"}, 2, "error: NPROC must be a whole number, at least 1 (got 'two')"),
            ({"START_WAIT": "-1"}, 2, "error: START_WAIT must be a whole number, at least 0 (got '-1')"),
            ({"LOG_FILE": str(tmp_path / "missing" / "train.log")}, 1,
             f"training failed to start: cannot write the log file {tmp_path / 'missing' / 'train.log'}"),
            ({"LOG_FILE": str(tmp_path / "train.log"), "PYTHON": str(tmp_path / "no-python")}, 127,
             "training failed to start (exit 127): nohup: failed to run command")):
        result = subprocess.run(["bash", str(REPO / "scripts" / "train_longdoc.sh")], capture_output=True, text=True,
                                env=dict(os.environ, **environment), timeout=60)
        assert result.returncode == status and result.stdout == "", environment
        assert result.stderr.splitlines()[0].startswith(message), result.stderr


@needs_bash
def test_the_start_check_says_started_failed_or_finished(tmp_path):
    def start(command, wait="5"):
        script = f'set -euo pipefail; source scripts/_start.sh; start_in_background job "$LOG" {command}'
        return subprocess.run(["bash", "-c", script], capture_output=True, text=True, cwd=REPO, timeout=60,
                              env=dict(os.environ, START_WAIT=wait, LOG=str(tmp_path / "job.log")))
    failed = start("""python3 -c 'import sys; print("loading"); sys.exit("Traceback...\\nValueError: boom")'""")
    assert failed.returncode == 1 and "job failed to start (exit 1): ValueError: boom" in failed.stderr
    silent = start("bash -c 'exit 3'")
    assert silent.returncode == 3 and "job failed to start (exit 3): (the log is empty)" in silent.stderr
    finished = start("true")
    assert finished.returncode == 0 and "job finished (exit 0)" in finished.stdout
    running = start("sleep 30", wait="1")
    assert running.returncode == 0 and "job started (pid " in running.stdout
    os.kill(int(running.stdout.split("pid ")[1].split(")")[0]), 15)
