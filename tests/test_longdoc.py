"""train_longdoc.py and common/longdoc.py on a tiny BERT: chunking, aggregation, the bounded-memory
document loss, train -> model directory -> predict_documents, stripping, capping, errors.
Resume and torchrun are in test_trainer_contract.py, with the other trainers."""
import json
import math
import random
from pathlib import Path

import pytest
import torch

import train_longdoc
from common import longdoc, modeldir
from common.heads import SequenceClassifier
from conftest import assert_one_error_line, run_trainer, write_jsonl

FILLER = ["the", "a", "is", "was", "it", "this", "and", "what", "very", "not"]
TOPICS = {"sports": ["sports", "game", "team"], "market": ["market", "stock", "price"]}


def make_documents(count_per_class, seed=0, words=40):
    """Long two-topic documents: filler words with a topic word every few tokens."""
    generator = random.Random(seed)
    records = []
    for index in range(count_per_class):
        for label, topic_words in TOPICS.items():
            tokens = [generator.choice(topic_words) if position % 4 == 0 else generator.choice(FILLER)
                      for position in range(words + generator.randrange(0, 30))]
            records.append({"id": f"{label}-{index}", "text": " ".join(tokens), "label": label})
    return records


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def documents(tmp_path):
    return {split: write_jsonl(tmp_path / f"{split}.jsonl", make_documents(count, seed))
            for split, count, seed in (("train", 12, 0), ("val", 4, 1), ("test", 4, 2))}


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return modeldir.load_tokenizer(str(tiny_model_dir))


def run(tiny_model_dir, output_dir, *extra):
    return run_trainer("train_longdoc", tiny_model_dir, output_dir, *extra)


# ---------------------------------------------------------------- chunking

WINDOW = 14  # max_length 16 minus [CLS] and [SEP]


@pytest.mark.parametrize("content_tokens", [1, WINDOW - 1, WINDOW, WINDOW + 1, 2 * WINDOW, 57])
@pytest.mark.parametrize("stride", [0, 4])
def test_chunk_count_and_window_positions(tokenizer, content_tokens, stride):
    text = " ".join(["good"] * content_tokens)  # one token and five characters per word
    settings = longdoc.LongdocSettings(stride=stride)
    chunks, windows = longdoc.chunk_document(tokenizer, text, 16, settings, doc_id=3, label=1)
    # exact count: one window when the text fits, else ceil((n - stride) / (window - stride))
    expected = 1 if content_tokens <= WINDOW else math.ceil((content_tokens - stride) / (WINDOW - stride))
    assert len(chunks) == windows == expected == longdoc.count_windows(content_tokens, 16, stride)
    # The guide's ceil((n_tokens - 2) / (max_len - 2 - stride)) counts [CLS]/[SEP] in n_tokens: it is exact
    # for stride 0 and an upper bound otherwise (one window of exactly 14 tokens gives 2 there, 1 here).
    guide = math.ceil(((content_tokens + 2) - 2) / (16 - 2 - stride))
    assert guide == expected if stride == 0 else guide >= expected
    cls_id, sep_id = tokenizer.cls_token_id, tokenizer.sep_token_id
    for index, chunk in enumerate(chunks):
        assert chunk["input_ids"][0] == cls_id and chunk["input_ids"][-1] == sep_id
        assert len(chunk["input_ids"]) <= 16
        assert (chunk["doc_id"], chunk["chunk_idx"], chunk["num_chunks"], chunk["labels"]) == (3, index, expected, 1)
        assert chunk["char_start"] == 5 * index * (WINDOW - stride)  # each window starts window - stride later
    assert chunks[-1]["char_end"] == len(text)  # the last window reaches the end of the text


def test_one_token_over_adds_a_window_sharing_stride_tokens(tokenizer):
    words = [f"{letter}" for letter in "abcdefghijklmno"]  # 15 single-letter tokens: one over the window
    chunks, _ = longdoc.chunk_document(tokenizer, " ".join(words), 16, longdoc.LongdocSettings(stride=4))
    first, second = (tokenizer.convert_ids_to_tokens(c["input_ids"][1:-1]) for c in chunks)
    assert first == words[:14] and second == words[10:]  # the second window repeats 4 tokens


def test_empty_text_gives_one_cls_sep_chunk(tokenizer):
    chunks, windows = longdoc.chunk_document(tokenizer, "", 16, longdoc.LongdocSettings(stride=4), label=0)
    assert windows == 1 and len(chunks) == 1
    assert chunks[0]["input_ids"] == [tokenizer.cls_token_id, tokenizer.sep_token_id]
    assert (chunks[0]["char_start"], chunks[0]["char_end"], chunks[0]["num_chunks"]) == (0, 0, 1)


@pytest.mark.parametrize("selection, expected", [("spread", [0, 3, 6, 9]), ("head-tail", [0, 1, 8, 9]),
                                                 ("head", [0, 1, 2, 3])])
def test_select_chunks(selection, expected):
    assert longdoc.select_chunks(10, 4, selection) == expected
    assert longdoc.select_chunks(10, 1, selection) == [0]  # a cap of one is head truncation
    assert longdoc.select_chunks(3, 4, selection) == [0, 1, 2]


def test_metadata_survives_collation(tokenizer):
    texts = ["good " * 30, "bad movie", "great " * 20]
    documents = longdoc.chunk_documents(tokenizer, texts, [1, 0, 1], 16, longdoc.LongdocSettings(stride=4))
    batch = longdoc.DocumentCollator()(documents)
    assert batch["labels"].tolist() == [1, 0, 1] and batch["doc_ids"].tolist() == [0, 1, 2]
    assert batch["doc_index"].tolist() == [0] * len(documents[0]) + [1] + [2] * len(documents[2])
    micro = list(longdoc.chunk_micro_batches(batch["chunks"], 2, tokenizer.pad_token_id))
    assert [start for start, _ in micro] == list(range(0, len(batch["chunks"]), 2))
    collated = {key: torch.cat([b[key] for _, b in micro]) for key in
                ("doc_id", "chunk_idx", "num_chunks", "labels", "char_start", "char_end")}
    assert all(value.dtype == torch.long for value in collated.values())
    flat = batch["chunks"]
    assert collated["doc_id"].tolist() == [c["doc_id"] for c in flat]
    assert collated["chunk_idx"].tolist() == [c["chunk_idx"] for c in flat]
    assert collated["num_chunks"].tolist() == [len(documents[c["doc_id"]]) for c in flat]
    assert collated["char_end"].tolist() == [c["char_end"] for c in flat]


# ---------------------------------------------------------------- aggregation

def test_aggregate_logits_against_hand_values():
    chunk_logits = torch.tensor([[1.0, 2.0], [3.0, 0.0], [5.0, 5.0]])
    doc_index = torch.tensor([0, 0, 1])
    mean = longdoc.aggregate_logits(chunk_logits, doc_index, 2, "mean")
    maximum = longdoc.aggregate_logits(chunk_logits, doc_index, 2, "max")
    logsumexp = longdoc.aggregate_logits(chunk_logits, doc_index, 2, "logsumexp")
    assert mean.tolist() == [[2.0, 1.0], [5.0, 5.0]]
    assert maximum.tolist() == [[3.0, 2.0], [5.0, 5.0]]
    expected = [[math.log(math.exp(1) + math.exp(3)), math.log(math.exp(2) + 1)], [5.0, 5.0]]
    assert torch.allclose(logsumexp, torch.tensor(expected))
    # no overflow for large logits (the per-document max is subtracted first)
    large = longdoc.aggregate_logits(torch.tensor([[1000.0], [1000.0]]), torch.tensor([0, 0]), 1, "logsumexp")
    assert torch.allclose(large, torch.tensor([[1000.0 + math.log(2)]]))
    with pytest.raises(ValueError):
        longdoc.aggregate_logits(chunk_logits, doc_index, 2, "median")


# ---------------------------------------------------------------- the two-pass document loss

def build_tiny_classifier(tiny_model_dir, dropout):
    from transformers import AutoModel
    torch.manual_seed(0)
    backbone = AutoModel.from_pretrained(str(tiny_model_dir), hidden_dropout_prob=dropout,
                                         attention_probs_dropout_prob=dropout)
    backbone.pooler = None
    return SequenceClassifier(backbone, 2, "cls", dropout=dropout)


def loss_args(tokenizer, aggregation, chunk_batch_size):
    from types import SimpleNamespace
    return SimpleNamespace(gradient_accumulation_steps=2, chunk_batch_size=chunk_batch_size,
                           pad_token_id=tokenizer.pad_token_id, aggregation=aggregation)


def two_pass_gradients(model, batch, args):
    from common import optimization, training
    model.zero_grad(set_to_none=True)
    device = torch.device("cpu")
    precision = training.resolve_precision("fp32", device)
    scaler = optimization.build_grad_scaler(precision, device)
    torch.manual_seed(123)
    loss = train_longdoc.document_loss_backward(model, batch["chunks"], batch["doc_index"], batch["labels"], args,
                                                scaler, precision, device)
    return loss, {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def reference_gradients(model, batch, args, micro_batch_size):
    """The whole document graph kept in memory: forward (in micro-batches of the given size), then backward."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(123)
    logits = torch.cat([model(b["input_ids"], b["attention_mask"], b["token_type_ids"]) for _, b in
                        longdoc.chunk_micro_batches(batch["chunks"], micro_batch_size, args.pad_token_id)])
    doc_logits = longdoc.aggregate_logits(logits, batch["doc_index"], len(batch["labels"]), args.aggregation)
    loss = torch.nn.functional.cross_entropy(doc_logits, batch["labels"])
    (loss / args.gradient_accumulation_steps).backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("aggregation", longdoc.AGGREGATIONS)
def test_two_pass_gradients_equal_the_all_at_once_computation(tiny_model_dir, tokenizer, aggregation):
    texts = ["good movie " * 12, "bad", "terrible film and the music " * 5]
    documents = longdoc.chunk_documents(tokenizer, texts, [1, 0, 0], 16, longdoc.LongdocSettings(stride=4))
    batch = longdoc.DocumentCollator()(documents)
    assert len(batch["chunks"]) > 3  # several micro-batches of 2: the two-pass path runs
    model = build_tiny_classifier(tiny_model_dir, dropout=0.0).train()
    loss, gradients = two_pass_gradients(model, batch, loss_args(tokenizer, aggregation, 2))
    # all chunks in one padded batch, one graph, one backward
    expected_loss, expected = reference_gradients(model, batch, loss_args(tokenizer, aggregation, 2), 10_000)
    assert torch.allclose(loss, expected_loss, atol=1e-6)
    assert gradients.keys() == expected.keys() and len(gradients) > 10
    for name in expected:
        assert torch.allclose(gradients[name], expected[name], atol=1e-6, rtol=1e-4), name


def test_two_pass_replays_dropout_masks(tiny_model_dir, tokenizer):
    """With dropout on, pass 2 must see pass 1's masks: compare with one graph under the same RNG draws."""
    texts = ["good movie " * 12, "terrible film and the music " * 5]
    documents = longdoc.chunk_documents(tokenizer, texts, [1, 0], 16, longdoc.LongdocSettings(stride=4))
    batch = longdoc.DocumentCollator()(documents)
    model = build_tiny_classifier(tiny_model_dir, dropout=0.3).train()
    loss, gradients = two_pass_gradients(model, batch, loss_args(tokenizer, "mean", 2))
    after_two_pass = torch.get_rng_state()
    expected_loss, expected = reference_gradients(model, batch, loss_args(tokenizer, "mean", 2), 2)
    assert torch.equal(torch.get_rng_state(), after_two_pass)  # the RNG moved as for one pass
    assert torch.allclose(loss, expected_loss, atol=1e-6)
    for name in expected:
        assert torch.allclose(gradients[name], expected[name], atol=1e-6, rtol=1e-4), name


# ---------------------------------------------------------------- training and inference

def torch_chunk_logits(model):
    def chunk_logits(batch):
        with torch.no_grad():
            return model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    return chunk_logits


def test_trains_and_round_trips_through_predict_documents(tmp_path, tiny_model_dir, documents):
    assert run(tiny_model_dir, tmp_path / "out", "--data-path", str(documents["train"]), "--val-path",
               str(documents["val"]), "--test-path", str(documents["test"]), "--epochs", "6") == 0
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    test = metrics["test"]
    assert test["accuracy"] > metrics["majority_baseline"]["accuracy"]
    assert set(test["by_aggregation"]) == {"mean", "max", "logsumexp"}
    assert test["aggregation"] == "mean" and test["by_aggregation"]["mean"]["accuracy"] == test["accuracy"]
    assert test["chunk_level_diagnostic"]["num_chunks"] > test["num_examples"] == 8
    assert {"per_class", "confusion_matrix", "macro_f1"} <= set(test)
    config = json.loads((tmp_path / "out" / "checkpoint-best" / "config.json").read_text())
    assert config["toolkit"]["task"] == "longdoc"
    assert config["toolkit"]["longdoc"] == {"stride": 4, "max_chunks": 0, "chunk_selection": "spread",
                                            "aggregation": "mean", "strip_patterns": []}
    # the saved directory, through predict_documents, reproduces the reported test accuracy
    model, tokenizer, toolkit, config = SequenceClassifier.from_directory(tmp_path / "out" / "checkpoint-best")
    records = [json.loads(line) for line in Path(documents["test"]).read_text().splitlines()]
    results = longdoc.predict_documents(torch_chunk_logits(model), tokenizer, toolkit, [r["text"] for r in records],
                                        chunk_batch_size=5, explain=2, id2label=config.id2label)
    accuracy = sum(r["label"] == record["label"] for r, record in zip(results, records)) / len(records)
    assert accuracy == pytest.approx(test["accuracy"])
    first = results[0]
    assert len(first["probs"]) == 2 and first["num_chunks"] == first["num_windows"] > 1
    assert len(first["top_chunks"]) == 2
    assert first["top_chunks"][0]["score"] >= first["top_chunks"][1]["score"]
    for chunk in first["top_chunks"]:
        assert chunk["text"] == records[0]["text"][chunk["char_start"]:chunk["char_end"]] and chunk["text"]


def test_predict_documents_streams_bounded_batches(tiny_model_dir, tokenizer):
    model = build_tiny_classifier(tiny_model_dir, dropout=0.0).eval()
    toolkit = {"preprocessing": {"max_length": 16}, "longdoc": {"stride": 4, "aggregation": "max"}}
    texts = ["good movie and music " * 40, "", "bad", "great song " * 9]
    batch_sizes = []

    def recording(batch):
        batch_sizes.append(batch["input_ids"].shape[0])
        return torch_chunk_logits(model)(batch).numpy()  # an ONNX-style runner returns arrays
    streamed = longdoc.predict_documents(recording, tokenizer, toolkit, texts, chunk_batch_size=4)
    assert max(batch_sizes) == 4 and sum(batch_sizes) == sum(r["num_chunks"] for r in streamed)
    assert streamed[0]["num_chunks"] == 16 and streamed[1]["num_chunks"] == 1
    one_at_a_time = longdoc.predict_documents(torch_chunk_logits(model), tokenizer, toolkit, texts, chunk_batch_size=1)
    for a, b in zip(streamed, one_at_a_time):
        assert a["label_id"] == b["label_id"] and a["probs"] == pytest.approx(b["probs"], abs=1e-5)


def test_strip_patterns_are_stored_and_applied_at_inference(tmp_path, tiny_model_dir, documents):
    patterns = tmp_path / "boilerplate.txt"
    patterns.write_text("# bylines and ad tails\n^By [A-Za-z ]+$\nsubscribe now.*$\n", encoding="utf-8")
    assert run(tiny_model_dir, tmp_path / "out", "--data-path", str(documents["train"]), "--val-path",
               str(documents["val"]), "--strip-patterns", str(patterns)) == 0
    model, tokenizer, toolkit, _ = SequenceClassifier.from_directory(tmp_path / "out" / "checkpoint-best")
    assert toolkit["longdoc"]["strip_patterns"] == ["^By [A-Za-z ]+$", "subscribe now.*$"]
    body = "the game and the team was very good " * 3
    with_boilerplate = f"By Some Reporter\n{body}\nsubscribe now for great music and stock price news"
    plain, stripped = longdoc.predict_documents(torch_chunk_logits(model), tokenizer, toolkit,
                                                [body.strip() + "\n", with_boilerplate], explain=1)
    assert stripped["logits"] == pytest.approx(plain["logits"], abs=1e-5)
    assert "Reporter" not in stripped["top_chunks"][0]["text"] and "subscribe" not in stripped["top_chunks"][0]["text"]


def test_max_chunks_caps_and_reports(tmp_path, tiny_model_dir, documents, tokenizer, capsys):
    assert run(tiny_model_dir, tmp_path / "out", "--data-path", str(documents["train"]), "--val-path",
               str(documents["val"]), "--max-chunks", "2", "--chunk-selection", "head-tail") == 0
    summary = {s["split"]: s for s in json.loads((tmp_path / "out" / "dataset_summary.json").read_text())}
    records = [json.loads(line) for line in Path(documents["train"]).read_text().splitlines()]
    settings = longdoc.LongdocSettings(stride=4)
    over = sum(longdoc.chunk_document(tokenizer, r["text"], 16, settings)[1] > 2 for r in records)
    assert over > 0 and summary["train"]["capped_documents"] == over
    assert summary["train"]["chunks_per_document"]["max"] == 2
    assert f"{over} document(s) capped at --max-chunks 2" in capsys.readouterr().out
    model, tokenizer, toolkit, _ = SequenceClassifier.from_directory(tmp_path / "out" / "checkpoint-best")
    result = longdoc.predict_documents(torch_chunk_logits(model), tokenizer, toolkit, [records[0]["text"]])[0]
    assert result["num_chunks"] == 2 and result["num_windows"] > 2


def test_eval_only_uses_the_stored_settings(tmp_path, tiny_model_dir, documents, capsys):
    assert run(tiny_model_dir, tmp_path / "out", "--data-path", str(documents["train"]), "--val-path",
               str(documents["val"]), "--test-path", str(documents["test"]), "--aggregation", "max") == 0
    trained = json.loads((tmp_path / "out" / "metrics.json").read_text())["test"]
    capsys.readouterr()
    assert train_longdoc.main(["--eval-only", "--model-path", str(tmp_path / "out" / "checkpoint-best"),
                               "--test-path", str(documents["test"]), "--output-dir", str(tmp_path / "eval"),
                               "--precision", "fp32"]) == 0
    evaluated = json.loads((tmp_path / "eval" / "metrics.json").read_text())["test"]
    assert evaluated["aggregation"] == "max" and evaluated["accuracy"] == trained["accuracy"]


@pytest.mark.parametrize("records, extra, expected", [
    ([{"text": "good", "label": "a"}] * 10, [], "only one class"),
    ([{"text": "good"}], [], "line 1: field 'label': missing"),
    ([{"text": "  ", "label": "a"}], [], "line 1: field 'text': empty text"),
    ([{"text": "good", "label": "a"}, {"text": "bad", "label": "b"}], ["--stride", "14"], "--stride 14"),
    ([{"text": "good", "label": "a"}, {"text": "bad", "label": "b"}], ["--strip-patterns", "BAD_REGEX"],
     "line 2: invalid regular expression"),
    ([{"text": "good", "label": "a"}, {"text": "bad", "label": "b"}], ["--chunk-batch-size", "0"],
     "--chunk-batch-size/--chunk_batch_size: expected an integer >= 1"),
    # a Latin-1 pattern file was a UnicodeDecodeError traceback
    ([{"text": "good", "label": "a"}, {"text": "bad", "label": "b"}], ["--strip-patterns", "LATIN1"],
     "latin1.txt line 2: not valid UTF-8"),
])
def test_bad_input_exits_2_before_loading_the_model(tmp_path, capsys, records, extra, expected):
    path = write_jsonl(tmp_path / "d.jsonl", records)
    (tmp_path / "bad.txt").write_text("fine\n(unclosed\n", encoding="utf-8")
    (tmp_path / "latin1.txt").write_bytes("fine\ncaf\u00e9\n".encode("latin-1"))
    files = {"BAD_REGEX": "bad.txt", "LATIN1": "latin1.txt"}
    extra = [str(tmp_path / files[value]) if value in files else value for value in extra]
    assert train_longdoc.main(["--data-path", str(path), "--model-name", str(tmp_path / "no-model"),
                               "--output-dir", str(tmp_path / "out"), "--max-length", "16", "--stride", "4",
                               *extra]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and expected in error[0] and "Traceback" not in error[0]


def test_documents_the_strip_patterns_empty_are_refused(tmp_path, tiny_model_dir, documents, capsys):
    """A pattern that deletes whole documents left each one a bare [CLS] [SEP] chunk, trained under its
    label without a word."""
    patterns = tmp_path / "everything.txt"
    patterns.write_text("(?s).*\n", encoding="utf-8")
    assert run(tiny_model_dir, tmp_path / "out", "--data-path", str(documents["train"]), "--val-path",
               str(documents["val"]), "--strip-patterns", str(patterns)) == 2
    assert_one_error_line(capsys.readouterr().err, f"{documents['train']} line 1: field 'text'",
                          "nothing left after the strip patterns", "more documents")
    assert not (tmp_path / "out" / "train_log.jsonl").exists()
