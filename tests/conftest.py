"""Shared fixtures: a tiny BERT (2 layers, hidden 32) with a small vocabulary, built
from a config and written to disk once per session, and small data files."""
import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REAL_MODEL_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "models" / "all-MiniLM-L6-v2"

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = ["good", "bad", "great", "terrible", "movie", "film", "the", "a", "is", "was", "not", "very",
         "happy", "sad", "love", "hate", "it", "this", "and", "news", "sports", "game", "team",
         "market", "stock", "price", "music", "song", "what", "machine", "learning", "##s", "##ing", "##ed"]
CHINESE = list("今天天气真好啊昨天下雨了我需要帮助解决这个问题有人知道怎么处理吗哈对小鞠可爱明会的是不很开心难过生气好坏电影")
PUNCTUATION = list(".,!?;:'\"()-@#/")


def write_vocab(path):
    tokens = list(dict.fromkeys(SPECIAL_TOKENS + WORDS + CHINESE + PUNCTUATION + list("abcdefghijklmnopqrstuvwxyz0123456789")))
    Path(path).write_text("\n".join(tokens) + "\n", encoding="utf-8")
    return path


def build_tiny_tokenizer(vocab_path):
    """A BertTokenizerFast on our vocab (BertTokenizerFast(vocab_file=...) ignores the file in transformers 5)."""
    from tokenizers import BertWordPieceTokenizer
    from transformers import BertTokenizerFast
    return BertTokenizerFast(tokenizer_object=BertWordPieceTokenizer(str(vocab_path), lowercase=True)._tokenizer,
                             unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
                             mask_token="[MASK]")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A randomly initialised 2-layer BERT saved like a hub checkpoint (config, weights, tokenizer)."""
    import torch
    from transformers import BertConfig, BertModel
    directory = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = build_tiny_tokenizer(write_vocab(directory / "vocab.txt"))
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=512, type_vocab_size=2)
    BertModel(config).save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))
    return directory


@pytest.fixture(scope="module")
def one_thread():
    """torch on one thread for a module (``pytestmark = pytest.mark.usefixtures("one_thread")``): a 32-wide
    model is all thread synchronisation on a shared 2-core machine (10x slower with 2 threads)."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def real_model_dir():
    if not (REAL_MODEL_DIR / "model.safetensors").is_file():
        pytest.skip("../shared/models/all-MiniLM-L6-v2 is not present")
    return REAL_MODEL_DIR


POSITIVE = ["good movie", "great film", "very happy", "love it", "this is good", "a great movie",
            "今天天气真好啊", "很开心", "好电影", "this film was great"]
NEGATIVE = ["bad movie", "terrible film", "very sad", "hate it", "this is bad", "a terrible movie",
            "今天下雨了", "很难过", "坏电影", "this film was terrible"]


def make_text_records(count_per_class=20, names=("negative", "positive")):
    """Separable two-class records: positive and negative phrases."""
    records = []
    for index in range(count_per_class):
        records.append({"text": NEGATIVE[index % len(NEGATIVE)], "label": names[0]})
        records.append({"text": POSITIVE[index % len(POSITIVE)], "label": names[1]})
    return records


def write_json(path, records):
    Path(path).write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    return path


def write_jsonl(path, records):
    Path(path).write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def text_data(tmp_path):
    """train.jsonl / val.jsonl / test.jsonl of separable two-class text records."""
    return {split: write_jsonl(tmp_path / f"{split}.jsonl", make_text_records(count))
            for split, count in (("train", 24), ("val", 8), ("test", 8))}


def snapshot_files(*roots):
    """{path: (mode, bytes)} of every file under the given files or directories.

    Taken before and after a hostile run to prove that nothing the user had was touched.
    """
    snapshot = {}
    for root in map(Path, roots):
        paths = [root] if not root.is_dir() else sorted(p for p in root.rglob("*") if not p.is_dir())
        for path in paths:
            if path.is_file() and not path.is_symlink():
                snapshot[str(path)] = (path.stat().st_mode, path.read_bytes())
            elif path.exists() or path.is_symlink():
                snapshot[str(path)] = (path.lstat().st_mode, os.readlink(path) if path.is_symlink() else None)
    return snapshot


def assert_one_error_line(stderr, *fragments):
    """stderr ends in exactly one ``error: ...`` line (containing each fragment) and holds no traceback."""
    assert "Traceback" not in stderr, stderr
    error_lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1, stderr
    for fragment in fragments:
        assert fragment in error_lines[0], (fragment, error_lines[0])
    return error_lines[0]


def tiny_run_argv(script, tmp_path, tiny_model_dir, output_dir):
    """Arguments for a tiny CPU run of each trainer (2 steps, a checkpoint every step)."""
    if script == "train_vector":
        pairs = [{"query": "good movie", "document": "a great film", "rel": 1.0},
                 {"query": "music", "document": "stock price", "rel": 0.0}] * 2
        data = ["--train-path", write_jsonl(tmp_path / "pairs.jsonl", pairs), "--val-path", tmp_path / "pairs.jsonl"]
    else:
        data = ["--data-path", write_jsonl(tmp_path / "d.jsonl", make_text_records(4)), "--val-path",
                tmp_path / "d.jsonl"]
    argv = [*data, "--model-name", tiny_model_dir, "--output-dir", output_dir, "--precision", "fp32", "--device",
            "cpu", "--batch-size", "4", "--max-steps", "2", "--save-steps", "1", "--save-total-limit", "0"]
    if script == "train_longdoc":
        argv += ["--max-length", "16", "--stride", "4"]
    return [str(argument) for argument in argv]


# ---------------------------------------------------------------- running the trainers

# Each trainer's own flags for a tiny CPU run; argparse keeps the last value, so a test's flags win.
TRAINER_FLAGS = {
    "train_classifier": ["--batch-size", "8"],
    "train_longdoc": ["--batch-size", "4", "--max-length", "16", "--stride", "4", "--chunk-batch-size", "3"],
    "train_vector": ["--batch-size", "8", "--max-length", "32"],
}


def trainer_argv(script, model_dir, output_dir, *extra):
    """Arguments of a tiny fp32 CPU run of ``script``: one epoch, learning rate 5e-3, no step checkpoints,
    then ``extra``."""
    argv = ["--model-name", model_dir, "--output-dir", output_dir, "--precision", "fp32", "--device", "cpu",
            "--epochs", "1", "--learning-rate", "5e-3", "--logging-steps", "2", "--save-steps", "0",
            *TRAINER_FLAGS[script], *extra]
    return [str(argument) for argument in argv]


def run_trainer(script, model_dir, output_dir, *extra):
    """``script.main(trainer_argv(...))`` in this process; returns the exit code."""
    import importlib
    return importlib.import_module(script).main(trainer_argv(script, model_dir, output_dir, *extra))
