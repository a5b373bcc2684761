"""Text generation through infer.py on a tiny randomly initialised GPT-2 with a BERT-style tokenizer
(the layout of uer/gpt2-chinese-cluecorpussmall)."""
import json

import pytest
import torch

import infer
from common import generation
from conftest import build_tiny_tokenizer, write_vocab


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    from transformers import GPT2Config, GPT2LMHeadModel
    directory = tmp_path_factory.mktemp("tiny-gpt2")
    tokenizer = build_tiny_tokenizer(write_vocab(directory / "vocab.txt"))
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=128, n_embd=32, n_layer=2, n_head=4,
                        bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id,
                        pad_token_id=tokenizer.pad_token_id)
    GPT2LMHeadModel(config).save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))
    return directory


def run_json(capsys, argv):
    code = infer.main(argv)
    captured = capsys.readouterr()
    return code, [json.loads(line) for line in captured.out.splitlines()], captured.err


def test_causal_lm_directory_is_recognised(gpt2_dir, tiny_model_dir):
    assert generation.is_causal_lm_directory(gpt2_dir)
    assert not generation.is_causal_lm_directory(tiny_model_dir)  # an encoder: BertModel


def test_same_seed_same_text_and_different_seed_differs(gpt2_dir, capsys):
    argv = ["--model-path", str(gpt2_dir), "--prompt", "今天", "--max-new-tokens", "12", "--json",
            "--temperature", "1.5", "--top-k", "0"]
    _, first, _ = run_json(capsys, argv + ["--seed", "7"])
    _, second, _ = run_json(capsys, argv + ["--seed", "7"])
    others = [run_json(capsys, argv + ["--seed", str(seed)])[1][0]["generations"][0] for seed in (1, 2, 3)]
    assert first[0]["generations"] == second[0]["generations"]
    assert any(other != first[0]["generations"][0] for other in others)


def test_top_k_1_equals_greedy(gpt2_dir, capsys):
    base = ["--model-path", str(gpt2_dir), "--prompt", "good movie", "--prompt", "天气", "--max-new-tokens", "10",
            "--json"]
    _, greedy, _ = run_json(capsys, base + ["--temperature", "0"])
    _, top1, _ = run_json(capsys, base + ["--temperature", "0.8", "--top-k", "1", "--seed", "5"])
    assert [row["token_ids"] for row in greedy] == [row["token_ids"] for row in top1]
    assert [row["prompt"] for row in greedy] == ["good movie", "天气"]


def test_lengths_and_sequence_count_respected(gpt2_dir, capsys):
    code, rows, _ = run_json(capsys, ["--model-path", str(gpt2_dir), "--prompt", "今天", "--max-new-tokens", "6",
                                      "--num-return-sequences", "3", "--seed", "1", "--top-p", "0.9",
                                      "--repetition-penalty", "1.3", "--json"])
    assert code == 0 and len(rows[0]["generations"]) == 3
    assert all(0 < count <= 6 for count in rows[0]["new_tokens"])
    assert all(len(ids) <= 6 for ids in rows[0]["token_ids"])


def test_prompts_from_a_file_and_bad_values(gpt2_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("今天\n  \n天气\n", encoding="utf-8")
    code, rows, err = run_json(capsys, ["--model-path", str(gpt2_dir), "--file", str(prompts), "--json",
                                        "--max-new-tokens", "3", "--temperature", "0"])
    assert code == 1 and "line 2: empty" in err
    assert [row.get("prompt") for row in rows] == ["今天", None, "天气"]
    assert infer.main(["--model-path", str(gpt2_dir), "--prompt", "x", "--top-p", "1.5"]) == 2
    assert "--top-p" in capsys.readouterr().err


def test_human_readable_generation_output(gpt2_dir, capsys):
    assert infer.main(["--model-path", str(gpt2_dir), "--prompt", "今天", "--max-new-tokens", "4",
                       "--temperature", "0"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("prompt: 今天") and "[1] 今天" in out
