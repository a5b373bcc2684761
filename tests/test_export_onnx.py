"""export_onnx.py: torch and onnxruntime agree for every model kind; broken or lossy exports are refused
without touching an earlier export at the same path."""
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

import export_onnx
from common import inference, modeldir
from common.heads import SequenceClassifier
from conftest import SPECIAL_TOKENS, build_tiny_tokenizer, make_text_records, write_jsonl

LABELS = {0: "negative", 1: "neutral", 2: "positive"}


def make_model_directory(tiny_model_dir, directory, task="classification", temperature=1.0, pooling="mean",
                         max_length=32, seed=0):
    """A classifier (or long-document chunk classifier) on the tiny backbone, written as a model directory."""
    torch.manual_seed(seed)
    backbone = modeldir.load_pretrained_backbone(str(tiny_model_dir))
    model = SequenceClassifier(backbone, len(LABELS), pooling)
    tokenizer = modeldir.load_tokenizer(str(tiny_model_dir))
    toolkit = {"task": task, "head": model.head_settings, "temperature": temperature,
               "preprocessing": {"max_length": max_length, "truncation_side": "right", "context": "pair",
                                 "normalize": None, "record_format": "text"}}
    if task == "longdoc":
        toolkit["longdoc"] = {"stride": 8, "max_chunks": 8, "chunk_selection": "head", "aggregation": "mean",
                              "strip_patterns": []}
    modeldir.write_model_directory(directory, model, tokenizer, toolkit, LABELS)
    return Path(directory)


def make_vector_directory(tiny_model_dir, directory, pooling="mean", projection_dim=16, rotation=None):
    """A vector model (pooling, projection, normalisation; ``rotation`` stored for it to apply) on the tiny
    backbone, saved as a model directory."""
    from common.vector import BertVectorModel
    torch.manual_seed(0)
    model = BertVectorModel.from_backbone(str(tiny_model_dir), pooling=pooling, projection_dim=projection_dim,
                                          query_max_length=16, doc_max_length=32, max_length=32)
    model.rotation = rotation
    model.save_pretrained(str(directory))
    return Path(directory)


@pytest.fixture(scope="module")
def classifier_dir(tiny_model_dir, tmp_path_factory):
    return make_model_directory(tiny_model_dir, tmp_path_factory.mktemp("classifier"), temperature=1.7)


@pytest.fixture(scope="module")
def exported(classifier_dir, tmp_path_factory):
    output = tmp_path_factory.mktemp("export") / "model.onnx"
    assert export_onnx.main(["--model-path", str(classifier_dir), "--output-path", str(output),
                             "--optimize", "true"]) == 0
    return output


def random_batch(vocab_size, batch_size, length, seed):
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(5, vocab_size, (batch_size, length), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    for row in range(1, batch_size):  # later rows are padded
        attention_mask[row, length - row * length // (batch_size + 1):] = 0
    input_ids[attention_mask == 0] = 0
    token_type_ids = torch.zeros_like(input_ids)
    token_type_ids[:, length // 2:] = attention_mask[:, length // 2:]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}


def assert_torch_and_onnx_agree(model_dir, onnx_path, tolerance=1e-4):
    torch_loaded = inference.load_torch_model(model_dir)
    onnx_loaded = inference.load_onnx_model(onnx_path)
    vocab_size = torch_loaded.config.vocab_size
    for batch_size, length in ((1, 5), (3, 11), (6, 32)):
        batch = random_batch(vocab_size, batch_size, length, seed=batch_size)
        difference = np.abs(torch_loaded.run(batch) - onnx_loaded.run(batch)).max()
        assert difference < tolerance, (batch_size, length, difference)


def test_classifier_export_is_dynamic_self_contained_and_matches_torch(classifier_dir, exported):
    graph = onnx.load(str(exported))
    for graph_input in graph.graph.input:
        dims = graph_input.type.tensor_type.shape.dim
        assert [dim.dim_param for dim in dims] == ["batch", "sequence"]  # no fixed shapes
        assert graph_input.type.tensor_type.elem_type == onnx.TensorProto.INT64
    meta = json.loads(exported.with_name("model.preprocessing.json").read_text())
    assert meta["task"] == "classification" and meta["id2label"]["2"] == "positive"
    assert meta["toolkit"]["preprocessing"]["max_length"] == 32 and meta["toolkit"]["temperature"] == 1.7
    assert (exported.parent / "tokenizer" / "tokenizer.json").is_file()
    assert meta["fused_operators"].get("Attention")  # the optimizer fused attention
    report = json.loads(exported.with_name("model.report.json").read_text())
    assert report["passed"] and report["max_abs_diff"] <= 1e-4
    assert any(case["padded"] for case in report["cases"]) and len({c["batch"] for c in report["cases"]}) >= 3
    assert_torch_and_onnx_agree(classifier_dir, exported)


@pytest.mark.parametrize("threads", [1, 2])
def test_onnx_sessions_run_on_torchs_threads(exported, threads):
    """A process limited to fewer cores (taskset, OMP_NUM_THREADS=1 under torchrun, a --workers server process)
    must not get onnxruntime's default of one thread per core of the whole machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        session = inference.create_onnx_session(exported)
    finally:
        torch.set_num_threads(previous)
    assert session.get_session_options().intra_op_num_threads == threads


def test_unoptimized_export_and_validate_existing(classifier_dir, tmp_path, capsys):
    output = tmp_path / "models" / "model.onnx"
    assert export_onnx.main(["--model-path", str(classifier_dir), "--output-path", str(output),
                             "--optimize", "false", "--max-length", "48"]) == 0
    assert "will truncate inputs at 48 tokens instead of the training-time 32" in capsys.readouterr().err
    meta = json.loads(output.with_name("model.preprocessing.json").read_text())
    assert meta["optimized"] is False and meta["toolkit"]["preprocessing"]["max_length"] == 48
    assert meta["max_length"] == {"export": 48, "training": 32}
    assert_torch_and_onnx_agree(classifier_dir, output)
    assert export_onnx.main(["--validate", "--model-path", str(output),
                             "--tokenizer-path", str(tmp_path / "models" / "tokenizer")]) == 0
    assert "result: PASSED" in capsys.readouterr().out


def test_symlinked_outputs_are_written_through_and_stay_links(classifier_dir, tmp_path):
    real = tmp_path / "real" / "model.onnx"
    real.parent.mkdir()
    link = tmp_path / "link.onnx"
    link.symlink_to(real)  # dangling until the export is published
    report_target = tmp_path / "real" / "report.json"
    report_target.write_text("{}", encoding="utf-8")
    report_link = tmp_path / "report.json"
    report_link.symlink_to(report_target)
    assert export_onnx.main(["--model-path", str(classifier_dir), "--output-path", str(link),
                             "--report-path", str(report_link), "--optimize", "false"]) == 0
    assert link.is_symlink() and report_link.is_symlink() and real.is_file()
    assert (real.parent / "model.preprocessing.json").is_file() and (real.parent / "tokenizer").is_dir()
    assert json.loads(report_target.read_text(encoding="utf-8"))["passed"] is True


def test_reexport_into_the_model_directory_is_allowed(classifier_dir, tmp_path):
    model_dir = tmp_path / "model"
    shutil.copytree(classifier_dir, model_dir)
    for _ in range(2):  # the second run replaces the first export, never a file of the model
        assert export_onnx.main(["--model-path", str(model_dir), "--output-path", str(model_dir / "model.onnx"),
                                 "--optimize", "false"]) == 0
    assert_torch_and_onnx_agree(model_dir, model_dir / "model.onnx")


def test_dynamo_exporter_also_matches(classifier_dir, tmp_path):
    output = tmp_path / "model.onnx"
    assert export_onnx.main(["--model-path", str(classifier_dir), "--output-path", str(output),
                             "--exporter", "dynamo", "--optimize", "false", "--opset", "18"]) == 0
    assert_torch_and_onnx_agree(classifier_dir, output)


def test_longdoc_export_gives_chunk_logits(tiny_model_dir, tmp_path):
    model_dir = make_model_directory(tiny_model_dir, tmp_path / "longdoc", task="longdoc", pooling="cls")
    output = tmp_path / "longdoc.onnx"
    assert export_onnx.main(["--model-path", str(model_dir), "--output-path", str(output)]) == 0
    assert json.loads(output.with_name("longdoc.preprocessing.json").read_text())["toolkit"]["longdoc"]["stride"] == 8
    assert_torch_and_onnx_agree(model_dir, output)


def test_vector_export_puts_pooling_and_normalisation_in_the_graph(tiny_model_dir, tmp_path):
    model_dir = make_vector_directory(tiny_model_dir, tmp_path / "vector")
    output = tmp_path / "vector.onnx"
    assert export_onnx.main(["--model-path", str(model_dir), "--output-path", str(output)]) == 0
    meta = json.loads(output.with_name("vector.preprocessing.json").read_text())
    assert meta["task"] == "vector" and meta["output"] == "embedding"
    assert meta["toolkit"]["preprocessing"]["max_length"] == 32  # the longer of query/doc lengths
    assert meta["max_length"] == {"export": 32, "training": 32}
    assert_torch_and_onnx_agree(model_dir, output)
    onnx_loaded = inference.load_onnx_model(output)
    vectors = onnx_loaded.run(random_batch(onnx_loaded.tokenizer.vocab_size, 3, 9, seed=1))
    assert vectors.shape == (3, 16) and np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_a_vector_models_stored_rotation_is_in_the_graph(tiny_model_dir, tmp_path):
    rotation = torch.linalg.qr(torch.randn(16, 16, generator=torch.Generator().manual_seed(3)))[0]
    model_dir = make_vector_directory(tiny_model_dir, tmp_path / "turned", rotation=rotation)
    output = tmp_path / "turned.onnx"
    assert export_onnx.main(["--model-path", str(model_dir), "--output-path", str(output)]) == 0
    assert_torch_and_onnx_agree(model_dir, output)  # torch applies the stored rotation: so does the graph
    unturned = make_vector_directory(tiny_model_dir, tmp_path / "unturned")
    batch = random_batch(inference.load_onnx_model(output).tokenizer.vocab_size, 3, 9, seed=1)
    turned_vectors = inference.load_onnx_model(output).run(batch)
    plain_vectors = inference.load_torch_model(unturned).run(batch)
    assert np.allclose(turned_vectors, plain_vectors @ rotation.numpy().T, atol=1e-4)
    assert not np.allclose(turned_vectors, plain_vectors, atol=1e-2)


def corrupt_classifier_weights(path):
    """Scale the last MatMul/Gemm weights: a graph that loads and runs but computes wrong logits."""
    graph = onnx.load(str(path))
    initializers = {tensor.name: tensor for tensor in graph.graph.initializer}
    last = [node for node in graph.graph.node if node.op_type in ("MatMul", "Gemm")][-1]
    weight = next(initializers[name] for name in last.input if name in initializers)
    values = onnx.numpy_helper.to_array(weight) * 3.0 + 0.5
    weight.CopyFrom(onnx.numpy_helper.from_array(values.astype(np.float32), weight.name))
    onnx.save(graph, str(path))


def break_optimized_graphs(monkeypatch):
    """From now on every optimized graph computes wrong logits, so the parity gate refuses it."""
    original = export_onnx.optimize_graph

    def optimize_then_break(source, target, config, use_gpu=False):
        result = original(source, target, config, use_gpu)
        corrupt_classifier_weights(target)
        return result

    monkeypatch.setattr(export_onnx, "optimize_graph", optimize_then_break)


def folder_contents(folder):
    """{relative path: bytes} of every file under folder (hidden ones too)."""
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(Path(folder).rglob("*"))
            if path.is_file()}


def test_broken_graph_is_rejected_and_kept(classifier_dir, tmp_path, monkeypatch, capsys):
    break_optimized_graphs(monkeypatch)
    output = tmp_path / "model.onnx"
    assert export_onnx.main(["--model-path", str(classifier_dir), "--output-path", str(output),
                             "--optimize", "true"]) == 1
    assert not output.exists() and (tmp_path / "model.onnx.rejected").is_file()
    report = json.loads((tmp_path / "model.rejected.report.json").read_text())
    assert not report["passed"] and "exceeds the tolerance" in report["reasons"][0]
    assert "REJECTED" in capsys.readouterr().out
    # nothing but the rejected graph and its report: no companions, no staging folder left behind
    assert sorted(folder_contents(tmp_path)) == ["model.onnx.rejected", "model.rejected.report.json"]


def test_refused_reexport_leaves_the_previous_export_untouched(classifier_dir, tmp_path, monkeypatch, capsys):
    output = tmp_path / "models" / "model.onnx"
    assert export_onnx.main(["--model-path", str(classifier_dir), "--output-path", str(output)]) == 0
    before = folder_contents(output.parent)
    assert {"model.onnx", "model.preprocessing.json", "model.report.json", "tokenizer/tokenizer.json"} <= set(before)
    break_optimized_graphs(monkeypatch)
    # a different max length, so the refused export's preprocessing json would differ if it were written
    assert export_onnx.main(["--model-path", str(classifier_dir), "--output-path", str(output),
                             "--max-length", "48", "--optimize", "true"]) == 1
    after = folder_contents(output.parent)
    assert {name: after.get(name) for name in before} == before  # byte-identical, report included
    assert sorted(set(after) - set(before)) == ["model.onnx.rejected", "model.rejected.report.json"]
    assert "nothing was written to" in capsys.readouterr().err
    assert_torch_and_onnx_agree(classifier_dir, output)


def make_other_tokenizer_model(classifier_dir, directory):
    """The classifier with a different vocabulary: another model's tokenizer."""
    shutil.copytree(classifier_dir, directory)
    vocab = directory.parent / "other-vocab.txt"
    vocab.write_text("\n".join(SPECIAL_TOKENS + list("abcdefghijklmnopqrstuvwxyz")) + "\n", encoding="utf-8")
    build_tiny_tokenizer(vocab).save_pretrained(str(directory))
    return directory


def test_a_different_models_tokenizer_is_not_swapped_in(classifier_dir, tiny_model_dir, tmp_path, capsys):
    output = tmp_path / "models" / "model.onnx"
    assert export_onnx.main(["--model-path", str(classifier_dir), "--output-path", str(output)]) == 0
    tokenizer_files = folder_contents(output.parent / "tokenizer")
    other = make_other_tokenizer_model(classifier_dir, tmp_path / "other-model")
    capsys.readouterr()
    assert export_onnx.main(["--model-path", str(other), "--output-path", str(output.with_name("other.onnx"))]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "tokenizer: holds a different model's tokenizer" in error
    assert str(classifier_dir.resolve()) in error and "another folder" in error
    assert not output.with_name("other.onnx").exists()
    assert folder_contents(output.parent / "tokenizer") == tokenizer_files
    # another model with the same tokenizer may share the folder; tokenizer/ is left as it was
    same_tokenizer = make_model_directory(tiny_model_dir, tmp_path / "same-tokenizer", seed=1)
    assert export_onnx.main(["--model-path", str(same_tokenizer),
                             "--output-path", str(output.with_name("b.onnx"))]) == 0
    assert folder_contents(output.parent / "tokenizer") == tokenizer_files


def test_another_models_export_is_replaced_only_with_overwrite_output(classifier_dir, tiny_model_dir, tmp_path,
                                                                      capsys):
    output = tmp_path / "models" / "model.onnx"
    assert export_onnx.main(["--model-path", str(classifier_dir), "--output-path", str(output)]) == 0
    before = folder_contents(output.parent)
    other = make_model_directory(tiny_model_dir, tmp_path / "other", seed=1)  # same tokenizer, other weights
    capsys.readouterr()
    assert export_onnx.main(["--model-path", str(other), "--output-path", str(output)]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and f"holds an export of {classifier_dir.resolve()}" in error
    assert "--overwrite-output" in error
    assert folder_contents(output.parent) == before
    # the same model again replaces its own earlier export; another one needs the flag
    assert export_onnx.main(["--model-path", str(classifier_dir), "--output-path", str(output)]) == 0
    assert export_onnx.main(["--model-path", str(other), "--output-path", str(output), "--overwrite-output"]) == 0
    source = json.loads(output.with_name("model.preprocessing.json").read_text(encoding="utf-8"))["source_model"]
    assert source == str(other.resolve())


def test_an_onnx_file_this_toolkit_did_not_export_is_not_replaced(classifier_dir, tmp_path, capsys):
    output = tmp_path / "theirs.onnx"
    output.write_bytes(b"someone else's graph")
    assert export_onnx.main(["--model-path", str(classifier_dir), "--output-path", str(output)]) == 2
    assert "this toolkit did not export" in capsys.readouterr().err
    assert output.read_bytes() == b"someone else's graph"


def test_validate_detects_an_export_tampered_with_later(classifier_dir, exported, tmp_path):
    copy_dir = tmp_path / "copy"
    copy_dir.mkdir()
    for name in ("model.onnx", "model.preprocessing.json"):
        (copy_dir / name).write_bytes((exported.parent / name).read_bytes())
    (copy_dir / "tokenizer").symlink_to(exported.parent / "tokenizer")
    corrupt_classifier_weights(copy_dir / "model.onnx")
    assert export_onnx.main(["--validate", "--model-path", str(copy_dir / "model.onnx")]) == 1
    assert (copy_dir / "model.onnx").is_file()  # --validate reports, it never renames


def test_int8_is_gated_on_the_validation_metric(classifier_dir, tmp_path):
    validation = write_jsonl(tmp_path / "val.jsonl", make_text_records(6, names=("negative", "positive")))
    output = tmp_path / "int8.onnx"
    code = export_onnx.main(["--model-path", str(classifier_dir), "--output-path", str(output), "--quantize", "int8",
                             "--validation-file", str(validation), "--max-metric-drop", "-1"])
    assert code == 1  # no export can improve accuracy by a whole point: always refused
    assert (tmp_path / "int8.onnx.rejected").is_file() and not output.exists()
    report = json.loads((tmp_path / "int8.rejected.report.json").read_text())
    assert report["quantization"] == "int8" and report["validation"]["metric"] == "accuracy"
    assert report["validation"]["records"] == 12 and "drops by" in report["reasons"][0]
    quantized = onnx.load(str(tmp_path / "int8.onnx.rejected"))
    assert any(node.op_type in ("DynamicQuantizeLinear", "MatMulInteger", "QAttention", "DynamicQuantizeMatMul")
               for node in quantized.graph.node)


def test_int8_within_the_allowed_drop_is_kept(classifier_dir, tmp_path):
    validation = write_jsonl(tmp_path / "val.jsonl", [{"text": r["text"]} for r in make_text_records(6)])
    output = tmp_path / "int8.onnx"
    assert export_onnx.main(["--model-path", str(classifier_dir), "--output-path", str(output), "--quantize", "int8",
                             "--validation-file", str(validation), "--max-metric-drop", "1.0",
                             "--min-label-agreement", "0"]) == 0
    report = json.loads((tmp_path / "int8.report.json").read_text())
    assert report["validation"]["metric"] == "agreement" and 0 <= report["validation"]["drop"] <= 1
    assert report["int8_check_skipped"] is False


def test_int8_needs_a_validation_file_or_an_explicit_skip(classifier_dir, tmp_path, capsys):
    output = tmp_path / "int8.onnx"
    export = ["--model-path", str(classifier_dir), "--output-path", str(output), "--quantize", "int8"]
    assert export_onnx.main(export) == 2
    assert "--quantize int8: needs --validation-file" in capsys.readouterr().err
    assert export_onnx.main(export + ["--skip-int8-check", "--validation-file", str(tmp_path / "v.jsonl")]) == 2
    assert export_onnx.main(export + ["--validation-file", str(tmp_path / "absent.jsonl")]) == 2
    assert "absent.jsonl: not found" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # refused before any work
    assert export_onnx.main(export + ["--skip-int8-check"]) == 0
    assert "int8 accuracy was not checked" in capsys.readouterr().out
    report = json.loads((tmp_path / "int8.report.json").read_text())
    assert report["passed"] and report["int8_check_skipped"] is True and "validation" not in report
    assert export_onnx.main(["--validate", "--model-path", str(output)]) == 2  # the same rule when re-checking
    assert export_onnx.main(["--validate", "--model-path", str(output), "--skip-int8-check"]) == 0


def test_user_errors_exit_2(classifier_dir, tmp_path, capsys):
    assert export_onnx.main(["--model-path", str(tmp_path / "missing"), "--output-path", str(tmp_path / "m.onnx")]) == 2
    assert export_onnx.main(["--model-path", str(classifier_dir), "--output-path", str(tmp_path / "m.bin")]) == 2
    assert export_onnx.main(["--model-path", str(classifier_dir), "--output-path", str(tmp_path / "m.onnx"),
                             "--max-length", "100000"]) == 2
    assert "error: --max-length 100000" in capsys.readouterr().err


def test_vector_max_length_other_than_the_trained_one_is_refused(tiny_model_dir, tmp_path, capsys):
    model_dir = make_vector_directory(tiny_model_dir, tmp_path / "vector")
    output = tmp_path / "vector.onnx"
    assert export_onnx.main(["--model-path", str(model_dir), "--output-path", str(output), "--max-length", "64"]) == 2
    error = capsys.readouterr().err
    assert "--max-length 64: a vector model keeps its training-time query/doc lengths (16/32" in error
    assert not output.exists()


def test_parity_batches_cover_padding_and_segments(classifier_dir):
    loaded = inference.load_torch_model(classifier_dir)
    batches = export_onnx.parity_batches(loaded.tokenizer, loaded.config, 32)
    assert [size for size, _, _ in batches] == [1, 2, 4, 8]
    padded = [batch for size, _, batch in batches if size > 1]
    assert all((batch["attention_mask"] == 0).any() for batch in padded)
    assert all((batch["token_type_ids"] == 1).any() for batch in padded)
    assert max(batch["input_ids"].shape[1] for _, _, batch in batches) == 32


@pytest.mark.slow
def test_real_minilm_classifier_export_matches_torch(real_model_dir, tmp_path):
    torch.manual_seed(0)
    backbone = modeldir.load_pretrained_backbone(str(real_model_dir))
    model = SequenceClassifier(backbone, len(LABELS), "mean")
    toolkit = {"task": "classification", "head": model.head_settings, "temperature": 1.0,
               "preprocessing": {"max_length": 128, "truncation_side": "right", "context": "pair",
                                 "normalize": None, "record_format": "text"}}
    modeldir.write_model_directory(tmp_path / "model", model, modeldir.load_tokenizer(str(real_model_dir)),
                                   toolkit, LABELS)
    output = tmp_path / "model.onnx"
    assert export_onnx.main(["--model-path", str(tmp_path / "model"), "--output-path", str(output),
                             "--optimize", "true"]) == 0
    meta = json.loads(output.with_name("model.preprocessing.json").read_text())
    assert meta["fused_operators"]["Attention"] == 6  # every layer's attention fused
    assert_torch_and_onnx_agree(tmp_path / "model", output)
