"""export_onnx.py's choices by measurement: --optimize auto keeps the faster graph that passes the parity
gate, and --quantize int8 keeps the fastest variant that passes the int8 gate (or refuses them all).

Timings and the variants' accuracy are injected through two seams (batch1_latencies_ms and
build_int8_variant), so these tests check the choice, not this machine's speed."""
import json
import shutil
from pathlib import Path

import onnx
import pytest

import export_onnx
from conftest import assert_one_error_line, make_text_records, write_jsonl
from test_export_onnx import (break_optimized_graphs, corrupt_classifier_weights, make_model_directory,
                              make_vector_directory)


@pytest.fixture(scope="module")
def classifier_dir(tiny_model_dir, tmp_path_factory):
    return make_model_directory(tiny_model_dir, tmp_path_factory.mktemp("classifier"))


def fake_latencies(monkeypatch, milliseconds):
    """batch1_latencies_ms answers from ``milliseconds`` ({graph file stem: ms}) instead of a clock."""
    seen = []

    def latencies(candidates, rows, runs):
        stems = [Path(candidate.source).stem for candidate in candidates]
        seen.append(stems)
        return [milliseconds[stem] for stem in stems]

    monkeypatch.setattr(export_onnx, "batch1_latencies_ms", latencies)
    return seen


@pytest.mark.parametrize("faster", ["optimized", "exported"])
def test_optimize_auto_keeps_the_faster_graph_and_prints_both(classifier_dir, tmp_path, monkeypatch, capsys, faster):
    fake_latencies(monkeypatch, {"exported": 3.0, "optimized": 5.0} if faster == "exported"
                   else {"exported": 5.0, "optimized": 3.0})
    output = tmp_path / "model.onnx"
    assert export_onnx.main(["--model-path", str(classifier_dir), "--output-path", str(output)]) == 0
    printed = capsys.readouterr().out
    assert "--optimize auto:" in printed and "unoptimized" in printed and "3.00 ms" in printed and "5.00 ms" in printed
    meta = json.loads(output.with_name("model.preprocessing.json").read_text())
    assert meta["optimized"] is (faster == "optimized")
    fused_ops = {node.op_type for node in onnx.load(str(output)).graph.node} & {"Attention", "SkipLayerNormalization"}
    assert bool(fused_ops) is (faster == "optimized")  # the graph kept is the one that was faster
    timings = json.loads(output.with_name("model.report.json").read_text())["optimize_timings"]
    assert sorted(row["latency_ms"] for row in timings) == [3.0, 5.0]
    assert [row["optimized"] for row in timings if row["chosen"]] == [faster == "optimized"]


def test_optimize_auto_never_keeps_a_graph_that_fails_parity(classifier_dir, tmp_path, monkeypatch, capsys):
    break_optimized_graphs(monkeypatch)
    fake_latencies(monkeypatch, {"exported": 9.0, "optimized": 1.0})  # the broken graph is the faster one
    output = tmp_path / "model.onnx"
    assert export_onnx.main(["--model-path", str(classifier_dir), "--output-path", str(output)]) == 0
    assert "optimized 1.00 ms (fails the parity gate)" in capsys.readouterr().out
    assert json.loads(output.with_name("model.preprocessing.json").read_text())["optimized"] is False


@pytest.mark.parametrize("forced", ["true", "false"])
def test_optimize_true_or_false_forces_the_choice_untimed(classifier_dir, tmp_path, monkeypatch, forced):
    seen = fake_latencies(monkeypatch, {})  # any timing call would raise KeyError
    output = tmp_path / "model.onnx"
    assert export_onnx.main(["--model-path", str(classifier_dir), "--output-path", str(output),
                             "--optimize", forced]) == 0
    assert json.loads(output.with_name("model.preprocessing.json").read_text())["optimized"] is (forced == "true")
    assert seen == []


def inject_variants(monkeypatch, failing):
    """Every variant becomes a copy of the fp32 graph (agrees with torch on every record), except the
    ``failing`` ones, whose classifier weights are corrupted (labels flip)."""
    def build(name, source, target, calibration=None):
        shutil.copyfile(source, target)
        if name in failing:
            corrupt_classifier_weights(target)
        return target

    monkeypatch.setattr(export_onnx, "build_int8_variant", build)


def int8_export(classifier_dir, tmp_path, variants, *extra):
    validation = write_jsonl(tmp_path / "val.jsonl", make_text_records(20, names=("negative", "positive")))
    output = tmp_path / "int8.onnx"
    code = export_onnx.main(["--model-path", str(classifier_dir), "--output-path", str(output), "--optimize", "false",
                             "--quantize", "int8", "--validation-file", str(validation),
                             "--int8-variants", variants, *extra])
    return code, output


def test_int8_keeps_the_fastest_variant_that_passes_the_gate(classifier_dir, tmp_path, monkeypatch, capsys):
    inject_variants(monkeypatch, failing={"per-channel"})
    # the failing variant is the fastest; of the passing ones, fp32-ends is faster than dynamic
    fake_latencies(monkeypatch, {"exported": 10.0, "int8-dynamic": 6.0, "int8-per-channel": 2.0,
                                 "int8-fp32-ends": 4.0})
    code, output = int8_export(classifier_dir, tmp_path, "dynamic,per-channel,fp32-ends")
    assert code == 0
    printed = capsys.readouterr().out
    assert "int8 variants" in printed and "fp32 10.00 ms" in printed and "2.50x" in printed  # 10 / 4
    assert "<- kept" in printed.splitlines()[[i for i, line in enumerate(printed.splitlines())
                                              if line.strip().startswith("fp32-ends")][0]]
    meta = json.loads(output.with_name("int8.preprocessing.json").read_text())
    assert meta["quantization"] == "int8" and meta["int8_variant"] == "fp32-ends"
    report = json.loads(output.with_name("int8.report.json").read_text())
    rows = {row["variant"]: row for row in report["int8_variants"]}
    assert rows["per-channel"]["passed"] is False and "agree with torch on" in rows["per-channel"]["reasons"][0]
    assert rows["dynamic"]["passed"] and rows["fp32-ends"]["chosen"] and not rows["dynamic"]["chosen"]
    assert report["passed"] and report["validation"]["label_agreement"] == 1.0


def test_int8_refuses_with_one_line_when_no_variant_passes(classifier_dir, tmp_path, monkeypatch, capsys):
    inject_variants(monkeypatch, failing={"dynamic", "per-channel"})
    fake_latencies(monkeypatch, {"exported": 10.0, "int8-dynamic": 6.0, "int8-per-channel": 2.0})
    code, output = int8_export(classifier_dir, tmp_path, "dynamic,per-channel")
    assert code == 1 and not output.exists()
    refusals = [line for line in capsys.readouterr().err.splitlines() if line.startswith("int8 refused")]
    assert len(refusals) == 1 and "no variant passes the gate" in refusals[0]
    report = json.loads((tmp_path / "int8.rejected.report.json").read_text())
    assert not report["passed"] and not any(row["passed"] for row in report["int8_variants"])


def test_every_real_int8_recipe_builds_and_is_reported(classifier_dir, tmp_path, capsys):
    code, output = int8_export(classifier_dir, tmp_path, ",".join(export_onnx.INT8_VARIANTS),
                               "--min-label-agreement", "0", "--max-metric-drop", "1", "--timing-runs", "1")
    assert code == 0
    report = json.loads(output.with_name("int8.report.json").read_text())
    rows = {row["variant"]: row for row in report["int8_variants"]}
    assert list(rows) == list(export_onnx.INT8_VARIANTS)
    assert all("error" not in row and row["latency_ms"] > 0 for row in rows.values()), rows
    assert rows["static"]["validation"]["records"] == 40 and sum(row["chosen"] for row in rows.values()) == 1
    assert "int8 variants" in capsys.readouterr().out


def test_fp32_ends_recipe_keeps_embeddings_and_head_in_fp32(classifier_dir, tmp_path):
    output = tmp_path / "model.onnx"
    assert export_onnx.main(["--model-path", str(classifier_dir), "--output-path", str(output),
                             "--optimize", "false"]) == 0
    kept = export_onnx.fp32_end_nodes(output)
    nodes = {node.name: node for node in onnx.load(str(output)).graph.node}
    assert sum(nodes[name].op_type == "Gather" for name in kept) >= 3  # word, position, token-type embeddings
    last_matmul = [node for node in nodes.values() if node.op_type in ("MatMul", "Gemm")][-1]
    assert last_matmul.name in kept  # the classifier
    float_embeddings = {}
    for name in ("dynamic", "fp32-ends"):
        export_onnx.build_int8_variant(name, output, tmp_path / f"{name}.onnx")
        float_embeddings[name] = {tensor.name for tensor in onnx.load(str(tmp_path / f"{name}.onnx")).graph.initializer
                                  if tensor.name.endswith("word_embeddings.weight")
                                  and tensor.data_type == onnx.TensorProto.FLOAT}
    assert float_embeddings["fp32-ends"] and not float_embeddings["dynamic"]  # dynamic stores the table in int8
    feed_forward = export_onnx.feed_forward_nodes(output)
    assert len(feed_forward) == 4 and all("attention" not in name for name in feed_forward)  # 2 layers x 2
    export_onnx.build_int8_variant("ffn-only", output, tmp_path / "ffn.onnx")
    quantized = {node.name for node in onnx.load(str(tmp_path / "ffn.onnx")).graph.node
                 if node.op_type in ("MatMulInteger", "DynamicQuantizeMatMul")}
    assert quantized and all(any(name in node for name in feed_forward) for node in quantized)


def test_unknown_int8_variant_is_a_usage_error(classifier_dir, tmp_path, capsys):
    assert export_onnx.main(["--model-path", str(classifier_dir), "--output-path", str(tmp_path / "m.onnx"),
                             "--int8-variants", "dynamic,fast"]) == 2
    assert "unknown int8 variant fast; choose from dynamic" in capsys.readouterr().err


@pytest.mark.parametrize("extra", [[], ["--quantize", "none"], ["--validate"]])
def test_int8_variants_without_an_int8_export_is_refused_not_ignored(classifier_dir, tmp_path, capsys, extra):
    assert export_onnx.main(["--model-path", str(classifier_dir), "--output-path", str(tmp_path / "m.onnx"),
                             "--int8-variants", "dynamic", *extra]) == 2
    assert_one_error_line(capsys.readouterr().err, "--int8-variants: applies only to an export with --quantize int8")
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize("passing_from, nodes, tried, kept", [
    (3, 12, [1, 2, 4, 3], 3),
    (99, 12, [1, 2, 4, 6], 6),  # never more than half in fp32; none passes
    (5, 20, [1, 2, 4, 8, 6, 5], 5),
    (7, 20, [1, 2, 4, 8, 6, 7], 7),
    (6, 20, [1, 2, 4, 8, 6, 5, 6], 6),  # the last try failed: the passing count is built again, to be kept
])
def test_fp32_sensitive_keeps_the_fewest_harmful_nodes_that_pass(tmp_path, monkeypatch, passing_from, nodes, tried,
                                                                  kept):
    built = []
    monkeypatch.setattr(export_onnx, "build_int8_variant",
                        lambda name, source, target, also_fp32=(): built.append(list(also_fp32)) or target)
    ranking = [f"node{index}" for index in range(nodes)]
    row = export_onnx.search_fp32_sensitive(tmp_path / "fp32.onnx", tmp_path / "int8.onnx", ranking,
                                            lambda graph: {"passed": len(built[-1]) >= passing_from})
    assert [len(nodes_kept) for nodes_kept in built] == tried
    assert row["kept_fp32_nodes"] == ranking[:kept] and row["passed"] is (passing_from <= kept)  # most harmful first


def test_sensitivity_ranking_puts_the_node_int8_hurts_most_first(classifier_dir, tmp_path, monkeypatch):
    graph = tmp_path / "model.onnx"
    assert export_onnx.main(["--model-path", str(classifier_dir), "--output-path", str(graph),
                             "--optimize", "false"]) == 0
    nodes = export_onnx.encoder_weight_nodes(graph)
    assert len(nodes) == 12 and not set(nodes) & set(export_onnx.fp32_end_nodes(graph))  # 2 layers x 6 MatMuls
    victim, probed = nodes[7], []

    def quantize_alone(name, source, target, only):  # "quantizing" the victim scales its weights; others are exact
        probed.extend(only)
        model = onnx.load(str(source))
        if only == [victim]:
            node = next(node for node in model.graph.node if node.name == victim)
            weight = next(tensor for tensor in model.graph.initializer if tensor.name == node.input[1])
            weight.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(weight) * 1.5, weight.name))
        onnx.save(model, str(target))
        return target

    monkeypatch.setattr(export_onnx, "build_int8_variant", quantize_alone)
    validation = write_jsonl(tmp_path / "val.jsonl", make_text_records(20, names=("negative", "positive")))
    torch_loaded = export_onnx.inference.load_torch_model(classifier_dir, "cpu")
    ranking = export_onnx.sensitivity_ranking(graph, torch_loaded, 64, str(validation), "cpu", tmp_path)
    assert probed == nodes and sorted(ranking) == sorted(nodes) and ranking[0] == victim


def test_fp32_sensitive_works_on_a_vector_model(tiny_model_dir, tmp_path, capsys):
    model_dir = make_vector_directory(tiny_model_dir, tmp_path / "vector")
    validation = write_jsonl(tmp_path / "val.jsonl", make_text_records(12, names=("negative", "positive")))
    output = tmp_path / "vector-int8.onnx"
    assert export_onnx.main(["--model-path", str(model_dir), "--output-path", str(output), "--optimize", "false",
                             "--quantize", "int8", "--int8-variants", "fp32-sensitive", "--validation-file",
                             str(validation), "--max-metric-drop", "1", "--timing-runs", "1"]) == 0
    [row] = json.loads(output.with_name("vector-int8.report.json").read_text())["int8_variants"]
    assert row["validation"]["metric"] == "mean_cosine_to_torch" and row["kept_fp32_nodes"]
