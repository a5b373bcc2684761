"""Hostile inputs to infer.py, export_onnx.py and generation: one `error:` line and exit 2 (1 where some
inputs were answered), no traceback, and nothing that existed before changed: device nodes stay device
nodes, symlinks stay symlinks, inputs and model directories stay byte-identical."""
import json
import os
import pickle
import resource
import stat
import threading
from pathlib import Path

import pytest
import torch

import export_onnx
import infer
from common import files, generation, inference, modeldir
from common.errors import UserError
from conftest import assert_one_error_line, build_tiny_tokenizer, snapshot_files, write_jsonl, write_vocab
from test_export_onnx import make_model_directory

REPO = Path(__file__).resolve().parents[1]
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="creating device nodes needs root")


@pytest.fixture(scope="module")
def classifier_dir(tiny_model_dir, tmp_path_factory):
    return make_model_directory(tiny_model_dir, tmp_path_factory.mktemp("hostile-classifier"))


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    """A tiny GPT-2 with 24 positions, so running past them is cheap to try."""
    from transformers import GPT2Config, GPT2LMHeadModel
    directory = tmp_path_factory.mktemp("hostile-gpt2")
    tokenizer = build_tiny_tokenizer(write_vocab(directory / "vocab.txt"))
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=24, n_embd=16, n_layer=1, n_head=2,
                        bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id,
                        pad_token_id=tokenizer.pad_token_id)
    GPT2LMHeadModel(config).save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))
    return directory


@pytest.fixture
def no_loading(monkeypatch):
    """Fail the test if a model is loaded: the check under test must come first."""
    def must_not_load(*args, **kwargs):
        raise AssertionError("a model was loaded before the bad input was refused")
    for module, name in ((inference, "load_model"), (inference, "load_torch_model"), (generation, "load_causal_lm")):
        monkeypatch.setattr(module, name, must_not_load)


def run(main, argv, capsys):
    """(exit code, stdout, stderr) of a script's main, argparse's SystemExit included."""
    try:
        code = main([str(arg) for arg in argv])
    except SystemExit as exit_:
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]


# ---------------------------------------------------------------- F1: --output onto devices, FIFOs, symlinks

@needs_root
def test_output_onto_a_character_device_writes_through_and_keeps_the_node(classifier_dir, tmp_path, capsys):
    null = tmp_path / "mynull"
    os.mknod(null, stat.S_IFCHR | 0o666, os.makedev(1, 3))  # a private /dev/null: never touch the real one
    before = os.lstat(null)
    code, _, err = run(infer.main, ["--model-path", classifier_dir, "--text", "good", "--output", null], capsys)
    assert code == 0 and "Traceback" not in err
    after = os.lstat(null)
    assert stat.S_ISCHR(after.st_mode) and after.st_rdev == before.st_rdev and after.st_ino == before.st_ino
    assert [path.name for path in tmp_path.iterdir()] == ["mynull"]  # no temporary file left beside it


@needs_root
def test_a_full_device_gives_one_line_and_stays_a_device(classifier_dir, tmp_path, capsys):
    full = tmp_path / "myfull"
    os.mknod(full, stat.S_IFCHR | 0o666, os.makedev(1, 7))  # a private /dev/full: every write is ENOSPC
    code, _, err = run(infer.main, ["--model-path", classifier_dir, "--text", "good", "--output", full], capsys)
    assert code == 2
    assert_one_error_line(err, f"--output {full}", "No space left")
    assert stat.S_ISCHR(os.lstat(full).st_mode) and os.lstat(full).st_rdev == os.makedev(1, 7)


def test_output_into_a_fifo_is_read_by_the_reader_and_stays_a_fifo(classifier_dir, tmp_path, capsys):
    fifo = tmp_path / "results.fifo"
    os.mkfifo(fifo)
    received = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_bytes()), daemon=True)
    reader.start()
    code, _, err = run(infer.main, ["--model-path", classifier_dir, "--text", "good", "--text", "sad",
                                    "--output", fifo], capsys)
    reader.join(timeout=30)
    assert code == 0 and "Traceback" not in err
    rows = [json.loads(line) for line in received[0].decode("utf-8").splitlines()]
    assert [row["input"] for row in rows] == ["good", "sad"]
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)


def test_output_through_a_symlink_writes_the_target_and_keeps_the_link(classifier_dir, tmp_path, capsys):
    target = tmp_path / "real" / "target.jsonl"
    target.parent.mkdir()
    target.write_text("old\n", encoding="utf-8")
    link = tmp_path / "link.jsonl"
    link.symlink_to(target)
    dangling = tmp_path / "dangling.jsonl"
    dangling.symlink_to(tmp_path / "real" / "new.jsonl")
    for output in (link, dangling):
        code, _, err = run(infer.main, ["--model-path", classifier_dir, "--text", "good", "--output", output], capsys)
        assert code == 0 and "Traceback" not in err
        assert output.is_symlink()
    assert os.readlink(link) == str(target) and read_jsonl(target)[0]["input"] == "good"
    assert read_jsonl(tmp_path / "real" / "new.jsonl")[0]["input"] == "good"
    assert sorted(path.name for path in target.parent.iterdir()) == ["new.jsonl", "target.jsonl"]


def test_output_to_dev_stdout_goes_to_the_open_descriptor(classifier_dir, capfd):
    assert infer.main(["--model-path", str(classifier_dir), "--text", "good", "--output", "/dev/stdout"]) == 0
    out = capfd.readouterr().out
    assert json.loads(out.splitlines()[-1])["input"] == "good"
    assert os.path.islink("/dev/stdout") or not os.path.isfile("/dev/stdout")


def test_replaced_files_keep_their_mode_and_new_files_follow_the_umask(tmp_path):
    private = tmp_path / "private.jsonl"
    private.write_text("old\n", encoding="utf-8")
    private.chmod(0o600)
    files.write_output_file(private, "new\n")
    assert stat.S_IMODE(private.stat().st_mode) == 0o600 and private.read_text(encoding="utf-8") == "new\n"
    old_umask = os.umask(0o027)
    try:
        files.write_output_file(tmp_path / "fresh.jsonl", b"x\n")
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE((tmp_path / "fresh.jsonl").stat().st_mode) == 0o640  # not mkstemp's 0600


def test_block_devices_and_symlink_loops_are_refused(tmp_path):
    loop = tmp_path / "loop.jsonl"
    loop.symlink_to(tmp_path / "loop2.jsonl")
    (tmp_path / "loop2.jsonl").symlink_to(loop)
    with pytest.raises(UserError, match="symlink loop"):
        files.check_output_path(loop)
    if os.geteuid() == 0:
        block = tmp_path / "disk"
        os.mknod(block, stat.S_IFBLK | 0o600, os.makedev(7, 200))
        with pytest.raises(UserError, match="block device"):
            files.write_output_file(block, "x")
        assert stat.S_ISBLK(os.lstat(block).st_mode)


# ---------------------------------------------------------------- F3: --output must not replace an input

def test_output_that_is_the_input_file_is_refused_before_loading(classifier_dir, tmp_path, capsys, no_loading):
    inputs = write_jsonl(tmp_path / "in.jsonl", [{"text": "good", "label": "positive"}])
    hard_link = tmp_path / "hard.jsonl"
    os.link(inputs, hard_link)
    soft_link = tmp_path / "soft.jsonl"
    soft_link.symlink_to(inputs)
    before = snapshot_files(tmp_path, classifier_dir)
    for output in (inputs, hard_link, soft_link, tmp_path / "." / "in.jsonl"):
        code, _, err = run(infer.main, ["--model-path", classifier_dir, "--file", inputs, "--output", output], capsys)
        assert code == 2
        assert_one_error_line(err, f"--output {output}", f"--file {inputs}")
    for output in (classifier_dir / "config.json", classifier_dir / "model.safetensors"):
        code, _, err = run(infer.main, ["--model-path", classifier_dir, "--text", "good", "--output", output], capsys)
        assert code == 2
        assert_one_error_line(err, f"--output {output}", "--model-path")
    assert snapshot_files(tmp_path, classifier_dir) == before


def test_output_over_an_onnx_export_companion_is_refused(tmp_path, capsys, no_loading):
    onnx_path = tmp_path / "model.onnx"
    onnx_path.write_bytes(b"graph")
    companion = tmp_path / "model.preprocessing.json"
    companion.write_text("{}", encoding="utf-8")
    before = snapshot_files(tmp_path)
    code, _, err = run(infer.main, ["--model-path", onnx_path, "--text", "x", "--output", companion], capsys)
    assert code == 2
    assert_one_error_line(err, "--output", "would overwrite --model-path")
    assert snapshot_files(tmp_path) == before


# ---------------------------------------------------------------- F4: lone surrogates

def test_a_lone_surrogate_record_is_named_and_the_good_ones_answered(classifier_dir, tmp_path, capsys):
    inputs = tmp_path / "in.jsonl"
    inputs.write_text('{"text": "good movie"}\n{"text": "bad \\ud800 text"}\n{"text": "very sad"}\n'
                      '{"text": "fine \\udfff"}\n', encoding="utf-8")
    output = tmp_path / "out.jsonl"
    before = snapshot_files(inputs, classifier_dir)
    code, _, err = run(infer.main, ["--model-path", classifier_dir, "--file", inputs, "--output", output], capsys)
    assert code == 1 and "Traceback" not in err
    rows = read_jsonl(output)
    assert [row.get("input") for row in rows] == ["good movie", None, "very sad", None]
    assert f"{inputs} line 2: field 'text'" in rows[1]["error"] and "surrogate" in rows[1]["error"]
    assert f"{inputs} line 2: field 'text'" in err and "2 of 4 input(s) could not be processed" in err
    assert snapshot_files(inputs, classifier_dir) == before
    messages = tmp_path / "messages.jsonl"
    messages.write_text('{"message": "ok", "context": "\\udfff"}\n{"message": "good"}\n', encoding="utf-8")
    code, out, err = run(infer.main, ["--model-path", classifier_dir, "--file", messages, "--json"], capsys)
    assert code == 1 and f"{messages} line 1: field 'context'" in err and "Traceback" not in err
    assert [json.loads(line).get("input") for line in out.splitlines()] == [None, "good"]


def test_a_lone_surrogate_on_the_command_line_is_one_line(classifier_dir, gpt2_dir, capsys, no_loading):
    for argv in (["--model-path", classifier_dir, "--text", "good", "--text", "bad \udcff"],
                 ["--model-path", classifier_dir, "--text", "good", "--context", "\ud800"],
                 ["--model-path", gpt2_dir, "--prompt", "\ud800"]):
        code, _, err = run(infer.main, argv, capsys)
        assert code == 2
        assert_one_error_line(err, "not valid Unicode")


def test_the_server_services_refuse_lone_surrogates(classifier_dir):
    service = inference.build_service(inference.load_model(classifier_dir))
    with pytest.raises(UserError, match=r"texts\[1\]: not valid Unicode"):
        service.predict(["good", "x \ud800"])
    with pytest.raises(UserError, match=r"contexts\[0\]: not valid Unicode"):
        service.predict(["good"], ["\ud800"])


# ---------------------------------------------------------------- F10/F11: numeric flags

BAD_FLAGS = [
    ("--temperature", "nan"), ("--temperature", "inf"), ("--temperature", "-1"), ("--batch-size", "0"),
    ("--batch-size", "1.5"), ("--max-length", "1"), ("--max-length", "-5"), ("--top-k", "-1"), ("--explain", "-1"),
    ("--port", "0"), ("--port", "70000"), ("--seed", "-1"), ("--seed", str(2 ** 70)), ("--max-new-tokens", "0"),
    ("--top-p", "0"), ("--top-p", "1.5"), ("--top-p", "nan"), ("--repetition-penalty", "nan"),
    ("--repetition-penalty", "0"), ("--num-return-sequences", "0"), ("--num-return-sequences", "1000000"),
    ("--device", "tpu:7"),
]


@pytest.mark.parametrize("flag,value", BAD_FLAGS, ids=[f"{flag}={value}" for flag, value in BAD_FLAGS])
def test_bad_numeric_flags_are_refused_by_their_type(flag, value, classifier_dir, capsys, no_loading):
    before = snapshot_files(classifier_dir)
    code, _, err = run(infer.main, ["--model-path", classifier_dir, "--text", "good", flag, value], capsys)
    assert code == 2
    assert_one_error_line(err, flag)
    assert snapshot_files(classifier_dir) == before


def test_generation_flags_are_refused_before_loading(gpt2_dir, capsys, no_loading):
    for flag, value in (("--temperature", "nan"), ("--repetition-penalty", "nan"), ("--top-p", "1.01"),
                        ("--top-k", "-3"), ("--num-return-sequences", "1000000")):
        code, _, err = run(infer.main, ["--model-path", gpt2_dir, "--prompt", "x", flag, value], capsys)
        assert code == 2
        assert_one_error_line(err, flag)


def test_temperature_zero_is_greedy_for_generation_but_refused_for_a_classifier(classifier_dir, capsys, no_loading):
    code, _, err = run(infer.main, ["--model-path", classifier_dir, "--text", "good", "--temperature", "0"], capsys)
    assert code == 2
    assert_one_error_line(err, "--temperature 0", "> 0")


def test_a_tiny_temperature_still_gives_valid_json(classifier_dir, capsys):
    code, out, _ = run(infer.main, ["--model-path", classifier_dir, "--text", "good", "--json",
                                    "--temperature", "1e-300"], capsys)
    row = json.loads(out, parse_constant=lambda name: pytest.fail(f"{name} in the output"))
    assert code == 0 and abs(sum(row["probabilities"].values()) - 1) < 1e-6


def test_softmax_never_returns_nan():
    probabilities = inference.softmax([[1e3, -1e3, 0.0]], 1e-300)
    assert torch.isfinite(torch.as_tensor(probabilities)).all() and probabilities[0, 0] == 1.0
    for temperature in (float("nan"), float("inf"), 0.0, -1.0):
        with pytest.raises(UserError, match="--temperature"):
            inference.softmax([[1.0, 2.0]], temperature)


def test_max_new_tokens_past_the_positions_is_clamped_with_one_warning(gpt2_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("今天\n" + "好 " * 30 + "\n天气\n", encoding="utf-8")
    code, out, err = run(infer.main, ["--model-path", gpt2_dir, "--file", prompts, "--json",
                                      "--max-new-tokens", "1000000", "--temperature", "0"], capsys)
    assert code == 1 and "Traceback" not in err
    assert len([line for line in err.splitlines() if line.startswith("warning: --max-new-tokens")]) == 1
    rows = [json.loads(line) for line in out.splitlines()]
    assert [row.get("prompt") for row in rows] == ["今天", None, "天气"]
    assert "only 24 positions" in rows[1]["error"]
    assert all(count <= 24 - 2 for row in (rows[0], rows[2]) for count in row["new_tokens"])


def test_generation_options_refuse_nan_for_other_callers():
    for options in (generation.GenerationOptions(temperature=float("nan")),
                    generation.GenerationOptions(repetition_penalty=float("nan")),
                    generation.GenerationOptions(num_return_sequences=generation.MAX_RETURN_SEQUENCES + 1)):
        with pytest.raises(UserError):
            options.check()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_device_cuda_without_cuda_is_one_line(classifier_dir, tmp_path, capsys, no_loading):
    for device in ("cuda", "cuda:1"):
        code, _, err = run(infer.main, ["--model-path", classifier_dir, "--text", "good", "--device", device], capsys)
        assert code == 2
        assert_one_error_line(err, f"--device {device}", "CUDA is not available")
        code, _, err = run(export_onnx.main, ["--model-path", classifier_dir, "--output-path", tmp_path / "m.onnx",
                                              "--device", device], capsys)
        assert code == 2
        assert_one_error_line(err, f"--device {device}", "CUDA is not available")


def test_wrapper_scripts_never_default_to_cuda():
    for script in (REPO / "scripts").glob("*.sh"):
        text = script.read_text(encoding="utf-8")
        assert ":-cuda" not in text and "--device cuda" not in text, script.name


# ---------------------------------------------------------------- F12: a full disk

def test_a_full_disk_is_one_line_and_the_previous_output_survives(classifier_dir, tmp_path, capsys):
    output = tmp_path / "out.jsonl"
    output.write_text("previous results\n", encoding="utf-8")
    before = snapshot_files(tmp_path, classifier_dir)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64, hard))  # what `ulimit -f` does: writes past 64 bytes get EFBIG
    try:
        code, _, err = run(infer.main, ["--model-path", classifier_dir, "--text", "good", "--text", "sad",
                                        "--output", output], capsys)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert code == 2
    assert_one_error_line(err, f"--output {output}", "File too large", "unchanged")
    assert snapshot_files(tmp_path, classifier_dir) == before  # no temporary file left either


# ---------------------------------------------------------------- F13: hostile model directories

class Payload:
    """A pickle that would create a file if it were ever unpickled with code execution."""
    marker = None

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def write_pickle_weights(directory, config, marker):
    directory.mkdir()
    Payload.marker = marker
    with open(directory / "pytorch_model.bin", "wb") as stream:
        pickle.dump({"weight": Payload()}, stream, protocol=2)
    (directory / "config.json").write_text(json.dumps(config), encoding="utf-8")
    return directory


def test_a_pickle_model_is_refused_in_one_line_and_never_runs(gpt2_dir, tmp_path, capsys):
    marker = tmp_path / "PAYLOAD-RAN"
    config = json.loads((gpt2_dir / "config.json").read_text(encoding="utf-8"))
    causal = write_pickle_weights(tmp_path / "causal", config, marker)
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json"):
        if (gpt2_dir / name).exists():
            (causal / name).write_bytes((gpt2_dir / name).read_bytes())
    before = snapshot_files(causal)
    code, _, err = run(infer.main, ["--model-path", causal, "--prompt", "x"], capsys)
    assert code == 2
    assert_one_error_line(err, f"--model-path {causal}", "refused without running")
    encoder = write_pickle_weights(tmp_path / "encoder", {"model_type": "bert", "architectures": ["BertModel"],
                                                          "vocab_size": 50, "hidden_size": 32, "num_hidden_layers": 1,
                                                          "num_attention_heads": 4, "intermediate_size": 64}, marker)
    with pytest.raises(UserError, match="refused without running"):  # the trainers' --model-name path
        modeldir.load_pretrained_backbone(str(encoder))
    assert not marker.exists() and snapshot_files(causal) == before


TOOLKIT_DAMAGE = [
    ("preprocessing", "oops", "toolkit.preprocessing"),
    ("temperature", "hot", "toolkit.temperature"),
    ("temperature", float("nan"), "toolkit.temperature"),
    ("temperature", 0, "toolkit.temperature"),
    ("head", None, "toolkit.head"),
    ("task", "translation", "toolkit.task"),
    ("preprocessing.max_length", "long", "toolkit.preprocessing.max_length"),
    ("preprocessing.max_length", 100000, "toolkit.preprocessing.max_length"),
    ("preprocessing.truncation_side", "middle", "toolkit.preprocessing.truncation_side"),
    ("preprocessing.normalize", {"preset": "nope"}, "toolkit.preprocessing.normalize"),
    ("head.pooling", "median", "toolkit.head.pooling"),
    ("head.num_labels", True, "toolkit.head.num_labels"),
]


@pytest.mark.parametrize("field,value,named", TOOLKIT_DAMAGE, ids=[f"{field}={value!r}" for field, value, _ in
                                                                   TOOLKIT_DAMAGE])
def test_a_damaged_toolkit_block_names_config_json_and_the_field(field, value, named, classifier_dir, tmp_path, capsys):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    for path in classifier_dir.iterdir():
        (model_dir / path.name).write_bytes(path.read_bytes())
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    *parents, key = ["toolkit", *field.split(".")]
    block = config
    for parent in parents:
        block = block[parent]
    block[key] = value
    (model_dir / "config.json").write_text(json.dumps(config), encoding="utf-8")
    before = snapshot_files(model_dir)
    code, _, err = run(infer.main, ["--model-path", model_dir, "--text", "good"], capsys)
    assert code == 2
    assert_one_error_line(err, str(model_dir / "config.json"), f"'{named}'")
    assert snapshot_files(model_dir) == before


def test_id2label_that_does_not_match_the_head_is_one_line(classifier_dir, tmp_path, capsys):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    for path in classifier_dir.iterdir():
        (model_dir / path.name).write_bytes(path.read_bytes())
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    config["id2label"] = {"0": "a", "7": "b", "2": "c"}
    (model_dir / "config.json").write_text(json.dumps(config), encoding="utf-8")
    code, _, err = run(infer.main, ["--model-path", model_dir, "--text", "good"], capsys)
    assert code == 2
    assert_one_error_line(err, "config.json", "id2label")


# ---------------------------------------------------------------- export_onnx.py

def test_export_opset_out_of_range_is_refused_by_its_type(classifier_dir, tmp_path, capsys, no_loading):
    for argv in (["--opset", "1"], ["--opset", "99"], ["--opset", "17", "--exporter", "dynamo"],
                 ["--tolerance", "nan"], ["--batch-size", "0"], ["--max-length", "1"], ["--max-metric-drop", "inf"]):
        code, _, err = run(export_onnx.main, ["--model-path", classifier_dir, "--output-path", tmp_path / "m.onnx",
                                              *argv], capsys)
        assert code == 2
        assert_one_error_line(err, argv[0])
    assert list(tmp_path.iterdir()) == []


def test_export_report_and_output_must_not_replace_inputs(classifier_dir, tmp_path, capsys, no_loading):
    validation = write_jsonl(tmp_path / "val.jsonl", [{"text": "good", "label": "positive"}])
    before = snapshot_files(tmp_path, classifier_dir)
    for argv, flag in ((["--report-path", validation], "--report-path"),
                       (["--report-path", classifier_dir / "config.json"], "--report-path"),
                       (["--output-path", tmp_path / "m.onnx", "--report-path", tmp_path / "m.onnx"], "--report-path")):
        argv = ["--output-path", tmp_path / "out.onnx", *argv] if "--output-path" not in argv else argv
        code, _, err = run(export_onnx.main, ["--model-path", classifier_dir, "--validation-file", validation, *argv],
                           capsys)
        assert code == 2
        assert_one_error_line(err, flag, "would overwrite")
    assert snapshot_files(tmp_path, classifier_dir) == before


def test_export_under_a_full_disk_is_one_line_and_leaves_nothing(classifier_dir, tmp_path, capsys):
    output = tmp_path / "models" / "m.onnx"
    before = snapshot_files(tmp_path, classifier_dir)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, hard))  # the graph is ~200 KB: EFBIG while writing it
    try:
        code, _, err = run(export_onnx.main, ["--model-path", classifier_dir, "--output-path", output,
                                              "--optimize", "false"], capsys)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert code == 2
    assert_one_error_line(err, f"--output-path {output}", "File too large")
    assert snapshot_files(tmp_path, classifier_dir) == before and list(output.parent.iterdir()) == []


def test_garbage_onnx_reports_the_graph_not_the_missing_tokenizer(tmp_path, capsys):
    garbage = tmp_path / "model.onnx"
    garbage.write_bytes(os.urandom(256))
    (tmp_path / "model.preprocessing.json").write_text(json.dumps({"task": "classification", "toolkit": {
        "task": "classification", "head": {"num_labels": 2, "pooling": "cls"}}}), encoding="utf-8")
    before = snapshot_files(tmp_path)
    code, _, err = run(infer.main, ["--model-path", garbage, "--text", "good"], capsys)
    assert code == 2
    assert_one_error_line(err, str(garbage), "onnxruntime cannot load it")
    code, _, err = run(export_onnx.main, ["--validate", "--model-path", garbage, "--report-path",
                                          tmp_path / "r.json"], capsys)
    assert code == 2
    assert_one_error_line(err, str(garbage), "onnxruntime cannot load it")
    assert snapshot_files(tmp_path) == before


# ---------------------------------------------------------------- odd paths and streams

def test_odd_paths_are_refused_before_loading(classifier_dir, gpt2_dir, tmp_path, capsys, no_loading):
    fifo = tmp_path / "inputs.fifo"
    os.mkfifo(fifo)  # no writer: reading it would wait forever
    for argv, fragment in ((["--file", fifo], f"--file {fifo}: not a regular file"),
                           (["--text", "good", "--output", ""], "--output: empty path"),
                           (["--text", "good", "--output", "a\0b"], "--output: a path cannot contain a NUL byte"),
                           (["--file", "in\0.jsonl"], "--file: a path cannot contain a NUL byte")):
        code, _, err = run(infer.main, ["--model-path", classifier_dir, *argv], capsys)
        assert code == 2
        assert_one_error_line(err, fragment)
    code, _, err = run(infer.main, ["--model-path", gpt2_dir, "--prompt", "x", "--temperature", "0",
                                    "--num-return-sequences", "3"], capsys)
    assert code == 2
    assert_one_error_line(err, "--num-return-sequences")


def test_a_reader_that_closes_the_pipe_gets_one_line_not_a_traceback(classifier_dir, tmp_path):
    import subprocess
    import sys
    inputs = tmp_path / "many.txt"
    inputs.write_text("good movie\n" * 3000, encoding="utf-8")
    process = subprocess.Popen([sys.executable, str(REPO / "infer.py"), "--model-path", str(classifier_dir),
                                "--file", str(inputs), "--json", "--batch-size", "512"], cwd=REPO,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    process.stdout.readline()
    process.stdout.close()  # `| head -1`
    err = process.stderr.read().decode("utf-8")
    assert process.wait(timeout=120) == 2
    assert_one_error_line(err, "broken pipe")


def test_a_read_only_output_is_not_replaced(tmp_path, monkeypatch):
    results = tmp_path / "results.jsonl"
    results.write_text("kept\n", encoding="utf-8")
    results.chmod(0o444)
    monkeypatch.setattr(files.os, "access", lambda path, mode: False)  # as root, access() would say yes
    for call in (files.check_output_path, lambda path: files.write_output_file(path, "new\n")):
        with pytest.raises(UserError, match="read-only"):
            call(results)
    assert results.read_text(encoding="utf-8") == "kept\n"
