"""common/vocab.py: --extend-vocab finds [UNK] pieces, adds them, and they survive a save."""
import pytest
import torch

from common.data import backend_tokenizer
from common.modeldir import load_tokenizer
from common.vocab import extend_vocabulary, find_unknown_tokens, unk_rate

# 😀 ❤ 嗯 躬 are missing from the tiny vocabulary (tests/conftest.py); 好 电 影 are in it
TEXTS = ["好电影😀😀 嗯躬", "good movie😀 ❤️", "嗯 ❤ 😀", "Ünïcode is 躬"]


def tokens_of(tokenizer, text):
    # tokenizers stores a normalized added token under its normalized form, and BERT's
    # normalizer puts spaces around CJK characters: the added "躬" reads back as " 躬 "
    ids = backend_tokenizer(tokenizer).encode(text, add_special_tokens=False).ids
    return [token.strip() for token in tokenizer.convert_ids_to_tokens(ids)]


def test_find_unknown_tokens_splits_spans_into_characters_and_emoji(tiny_model_dir):
    tokenizer = load_tokenizer(str(tiny_model_dir))
    assert tokens_of(tokenizer, "movie😀") == ["[UNK]"]  # BERT's [UNK] covers the whole word
    found = find_unknown_tokens(tokenizer, TEXTS, min_count=1)
    # "❤️" and "❤" are one token after the normalizer drops the variation selector;
    # "movie" and the letters of "Ünïcode" are known on their own and never added
    assert found == [("😀", 4), ("❤", 2), ("嗯", 2), ("躬", 2)]  # most frequent first, ties by code point
    assert find_unknown_tokens(tokenizer, TEXTS, min_count=3) == [("😀", 4)]


def test_extend_vocabulary_adds_single_tokens_and_lowers_the_unk_rate(tiny_model_dir):
    tokenizer = load_tokenizer(str(tiny_model_dir))
    size, before = len(tokenizer), unk_rate(tokenizer, TEXTS)
    added = extend_vocabulary(tokenizer, TEXTS, min_count=2)
    assert set(added) == {"😀", "❤", "躬", "嗯"}
    assert len(tokenizer) == size + 4
    for token in added:
        assert tokens_of(tokenizer, token) == [token]
    assert tokens_of(tokenizer, "好电影😀😀 嗯躬") == ["好", "电", "影", "😀", "😀", "嗯", "躬"]
    assert tokens_of(tokenizer, "movie😀") == ["movie", "😀"]
    assert tokens_of(tokenizer, "❤️") == ["❤"]  # the variation-selector form matches too
    after = unk_rate(tokenizer, TEXTS)
    assert before > 0.4 and after < before / 3


def test_added_tokens_survive_lowercasing(tiny_model_dir):
    tokenizer = load_tokenizer(str(tiny_model_dir))
    texts = ["ΩMEGA Ω", "ω ω"]  # Greek is not in the vocabulary; the tokenizer lowercases
    added = extend_vocabulary(tokenizer, texts, min_count=2)
    assert added == ["ω"]
    assert tokens_of(tokenizer, "Ω") == ["ω"] and tokens_of(tokenizer, "ω") == ["ω"]


def test_unk_rate_counts_tokens_without_special_tokens(tiny_model_dir):
    tokenizer = load_tokenizer(str(tiny_model_dir))
    assert unk_rate(tokenizer, ["good movie", "😀 good"]) == pytest.approx(1 / 4)
    assert unk_rate(tokenizer, []) == 0.0


def test_added_tokens_round_trip_through_save_pretrained(tiny_model_dir, tmp_path):
    tokenizer = load_tokenizer(str(tiny_model_dir))
    added = extend_vocabulary(tokenizer, TEXTS, min_count=2)
    tokenizer.save_pretrained(str(tmp_path))
    reloaded = load_tokenizer(str(tmp_path))
    assert len(reloaded) == len(tokenizer)
    assert tokens_of(reloaded, "嗯躬😀❤️") == ["嗯", "躬", "😀", "❤"]
    assert reloaded.convert_tokens_to_ids(added) == tokenizer.convert_tokens_to_ids(added)


def test_resized_embeddings_cover_the_new_ids(tiny_model_dir):
    from common.modeldir import load_pretrained_backbone
    tokenizer = load_tokenizer(str(tiny_model_dir))
    backbone = load_pretrained_backbone(str(tiny_model_dir))
    extend_vocabulary(tokenizer, TEXTS, min_count=2)
    backbone.resize_token_embeddings(len(tokenizer))
    ids = backend_tokenizer(tokenizer).encode("嗯躬😀").ids
    assert max(ids) < backbone.get_input_embeddings().num_embeddings
    backbone(input_ids=torch.tensor([ids]))  # runs: no index out of range


REVIEWS = ["这家酒店服务很好，房间干净，下次还会再来！", "质量太差了，用了两天就坏了，不推荐购买。",
           "物流很快，包装完好，宝贝和描述的一样，好评。", "电影剧情拖沓，演员演技尴尬，浪费时间。",
           "味道不错，分量很足，价格也实惠，推荐大家来吃。", "客服态度恶劣，退货流程麻烦，再也不买了。",
           "屏幕清晰，运行流畅，电池续航也很满意。", "房间有异味，隔音很差，晚上根本睡不着。"]


@pytest.mark.slow
def test_minilm_unk_rate_on_chinese_reviews_drops_to_near_zero(real_model_dir):
    tokenizer = load_tokenizer(str(real_model_dir))
    before = unk_rate(tokenizer, REVIEWS)
    added = extend_vocabulary(tokenizer, REVIEWS, min_count=1)
    after = unk_rate(tokenizer, REVIEWS)
    assert before > 0.5 and after < 0.01
    assert all(len(token) == 1 for token in added)  # characters, not whole phrases


def test_unk_rows_keep_the_extended_model_computing_what_the_base_did(tiny_model_dir):
    """--new-token-init unk must not change the untuned model: every added piece was [UNK] before."""
    import torch
    from common import modeldir
    from common.vocab import extend_vocabulary, fit_embeddings_to_tokenizer
    texts = ["猫狗 good movie", "猫 is good", "狗 bad"]
    tokenizer = modeldir.load_tokenizer(str(tiny_model_dir))
    backbone = modeldir.load_pretrained_backbone(str(tiny_model_dir)).eval()
    with torch.no_grad():
        before = backbone(**tokenizer(texts, padding=True, return_tensors="pt")).last_hidden_state
    assert extend_vocabulary(tokenizer, texts, 1) == ["狗", "猫"]
    assert fit_embeddings_to_tokenizer(backbone, tokenizer, "unk") == 2
    encoded = tokenizer(texts, padding=True, return_tensors="pt")
    assert tokenizer.unk_token_id not in encoded["input_ids"]
    with torch.no_grad():
        after = backbone(**encoded).last_hidden_state
    assert torch.allclose(before, after, atol=1e-6)


@pytest.mark.parametrize("init", ["random", "mean", "unk"])
def test_new_token_init_decides_where_the_added_rows_start(tiny_model_dir, init):
    import torch
    from common import modeldir
    from common.vocab import extend_vocabulary, fit_embeddings_to_tokenizer
    tokenizer = modeldir.load_tokenizer(str(tiny_model_dir))
    backbone = modeldir.load_pretrained_backbone(str(tiny_model_dir))
    old = backbone.get_input_embeddings().weight.detach().clone()
    torch.manual_seed(0)
    added = extend_vocabulary(tokenizer, ["猫狗鱼鸟 good", "猫狗鱼鸟 bad"], 1)
    assert fit_embeddings_to_tokenizer(backbone, tokenizer, init) == len(added) == 4
    embeddings = backbone.get_input_embeddings()
    new_rows = embeddings.weight.detach()[len(old):]
    assert embeddings.first_added_row == len(old)
    assert torch.equal(embeddings.weight.detach()[:len(old)], old)  # the pretrained rows are untouched
    if init == "random":  # distinct rows, spread like the model's own initialization
        assert torch.cdist(new_rows, new_rows).fill_diagonal_(1.0).min() > 0
        assert abs(new_rows.std().item() - backbone.config.initializer_range) < 0.01
    elif init == "mean":
        assert torch.allclose(new_rows, old.mean(0).expand_as(new_rows), atol=1e-3)
    else:
        assert torch.equal(new_rows, old[tokenizer.unk_token_id].expand_as(new_rows))


def contexts_texts(seed=0):
    """Texts where 猫 always stands where "good" stands (letters a-l around it) and 狗 where "bad" stands
    (letters m-x): tokens used alike."""
    import random
    draw = random.Random(seed)
    texts = []
    for _ in range(200):
        for words, letters in ((("good", "猫"), "abcdefghijkl"), (("bad", "狗"), "mnopqrstuvwx")):
            for word in words:
                texts.append(" ".join(draw.sample(letters, 3) + [word] + draw.sample(letters, 3)))
    return texts


def test_cooccurrence_rows_start_beside_the_pretrained_tokens_used_alike(tiny_model_dir):
    from common import modeldir
    from common.vocab import fit_embeddings_to_tokenizer
    tokenizer = modeldir.load_tokenizer(str(tiny_model_dir))
    backbone = modeldir.load_pretrained_backbone(str(tiny_model_dir))
    old = backbone.get_input_embeddings().weight.detach().clone()
    texts = contexts_texts()
    assert sorted(extend_vocabulary(tokenizer, texts + ["鱼 鱼"], 1)) == sorted(["猫", "狗", "鱼"])
    fit_embeddings_to_tokenizer(backbone, tokenizer, "cooccurrence", texts + ["鱼 鱼"])
    rows = backbone.get_input_embeddings().weight.detach()
    assert torch.equal(rows[:len(old)], old)
    cat, dog, fish = (rows[tokenizer.convert_tokens_to_ids(token)] for token in ("猫", "狗", "鱼"))
    good, bad = (old[tokenizer.convert_tokens_to_ids(word)] for word in ("good", "bad"))
    similarity = torch.nn.functional.cosine_similarity
    assert similarity(cat, good, dim=0) > similarity(cat, bad, dim=0) + 0.3
    assert similarity(dog, bad, dim=0) > similarity(dog, good, dim=0) + 0.3
    median_norm = old.norm(dim=1).quantile(0.5)  # numpy's median: the mean of the middle two
    assert torch.allclose(cat.norm(), median_norm, rtol=1e-4) and torch.allclose(dog.norm(), median_norm, rtol=1e-4)
    assert abs(fish.std().item() - backbone.config.initializer_range) < 0.01  # seen twice: too little context


def test_cooccurrence_rows_are_the_same_run_to_run(tiny_model_dir):
    from common import modeldir
    from common.vocab import fit_embeddings_to_tokenizer
    rows = []
    for _ in range(2):
        tokenizer = modeldir.load_tokenizer(str(tiny_model_dir))
        backbone = modeldir.load_pretrained_backbone(str(tiny_model_dir))
        extend_vocabulary(tokenizer, contexts_texts(), 1)
        fit_embeddings_to_tokenizer(backbone, tokenizer, "cooccurrence", contexts_texts())
        rows.append(backbone.get_input_embeddings().weight.detach()[-2:].clone())
    assert torch.equal(rows[0], rows[1])


def test_cooccurrence_counts_stop_after_the_token_budget(tiny_model_dir):
    from common import modeldir
    from common.vocab import token_sequences
    tokenizer = modeldir.load_tokenizer(str(tiny_model_dir))
    sequences = token_sequences(tokenizer, ["good movie"] * 5000, max_tokens=7)
    assert [len(sequence) for sequence in sequences] == [2, 2, 2, 2]  # stops once 7 are collected
    assert len(token_sequences(tokenizer, ["good movie"] * 2500, max_tokens=10**6)) == 2500  # past one batch
