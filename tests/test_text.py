"""common/text.py: --normalize parsing and each normalization rule."""
import json

import pytest

from common import text
from common.errors import UserError
from common.text import build_normalizer, normalizer_spec


def only(**options):
    """A normalizer doing nothing but the given options (the 'basic' preset minus its clean-up)."""
    spec = normalizer_spec("basic,width=false,whitespace=false")
    spec.update(options)
    return build_normalizer(spec)


# ---------------------------------------------------------------- parsing --normalize

def test_bare_flag_means_the_social_preset():
    spec = normalizer_spec("social")
    assert spec == {"version": 1, "preset": "social", "mentions": "placeholder", "hashtags": "text",
                    "urls": "placeholder", "emoji": "keep", "width": True, "whitespace": True, "t2s": False,
                    "repeats": 0}


def test_options_modify_the_preset():
    spec = normalizer_spec("social,emoji=drop,t2s,repeats")
    assert (spec["emoji"], spec["t2s"], spec["repeats"], spec["mentions"]) == ("drop", True, 3, "placeholder")
    assert normalizer_spec("emoji=placeholder")["preset"] == "social"  # options alone start from social
    basic = normalizer_spec("basic, repeats=4, t2s=false")
    assert (basic["preset"], basic["repeats"], basic["t2s"], basic["mentions"]) == ("basic", 4, False, "keep")


@pytest.mark.parametrize("value", [None, "", "none"])
def test_no_normalization(value):
    assert normalizer_spec(value) is None
    assert build_normalizer(normalizer_spec(value))("  Ｘ @a  ") == "  Ｘ @a  "


@pytest.mark.parametrize("value, message", [
    ("social,colour=red", "unknown option 'colour'"),
    ("social,emoji=smile", "option 'emoji' takes one of keep|placeholder|drop"),
    ("social,t2s=maybe", "option 't2s' takes true or false"),
    ("social,repeats=1", "option 'repeats'"),
    ("emoji=drop,social", "preset 'social' must come first"),
])
def test_bad_options_are_user_errors_naming_the_option(value, message):
    with pytest.raises(UserError, match=message):
        normalizer_spec(value)


def test_the_spec_survives_json_and_is_checked_on_load():
    spec = normalizer_spec("social,emoji=drop,t2s,repeats=5")
    reloaded = json.loads(json.dumps(spec))
    assert normalizer_spec(reloaded) == spec
    assert text.describe(spec) == "social,emoji=drop,t2s,repeats=5"
    with pytest.raises(UserError, match="unknown option 'lowercase'"):
        normalizer_spec(dict(spec, lowercase=True))
    with pytest.raises(UserError, match="newer"):
        normalizer_spec(dict(spec, version=99))


# ---------------------------------------------------------------- each rule

def test_mentions():
    assert only(mentions="placeholder")("回复@张三_99:好的 //@Bob-x: ok") == "回复@user:好的 //@user: ok"
    assert only(mentions="drop")("你好@李四 今天") == "你好  今天"
    assert only(mentions="placeholder")("write to a@b.com") == "write to a@b.com"  # e-mail, not a mention


def test_hashtags():
    keep_text = only(hashtags="text")
    assert keep_text("#今天天气# 真好 #happy day") == "今天天气 真好 happy day"
    assert keep_text("#iPhone 15发布会#来了") == "iPhone 15发布会来了"
    assert keep_text("I'm #1 and # 2") == "I'm 1 and # 2"
    assert only(hashtags="drop")("#话题#正文 #tag") == " 正文  "


def test_urls():
    placeholder = only(urls="placeholder")
    assert placeholder("看这个http://t.cn/A6xYz今天") == "看这个 http 今天"
    assert placeholder("see https://example.com/a?b=1#c, and www.weibo.com.") == "see  http , and  http ."
    assert only(urls="drop")("link: HTTPS://X.CN/abc") == "link:  "


def test_urls_go_before_mentions_and_hashtags():
    normalize = only(urls="placeholder", mentions="placeholder", hashtags="text")
    assert normalize("https://x.cn/@bob#frag @bob") == " http  @user"


@pytest.mark.parametrize("mode, expected", [("keep", "好😂👍🏻 ❤️ 🇨🇳 👨‍👩‍👧 #️⃣ →"),
                                            ("placeholder", "好 emoji  emoji   emoji   emoji   emoji   emoji  →"),
                                            ("drop", "好" + " " * 11 + "→")])
def test_emoji(mode, expected):
    assert only(emoji=mode)("好😂👍🏻 ❤️ 🇨🇳 👨‍👩‍👧 #️⃣ →") == expected


def test_emoji_sequences_are_one_emoji_each():
    matches = text.EMOJI_PATTERN.findall("👍🏻❤️🇨🇳👨‍👩‍👧#️⃣😂")
    assert matches == ["👍🏻", "❤️", "🇨🇳", "👨‍👩‍👧", "#️⃣", "😂"]
    assert text.EMOJI_PATTERN.findall("普通文字 abc 123 ，。！→ © [微笑]") == []


def test_full_width_to_half_width():
    assert text.to_half_width("ＡＢＣ１２３，！＠＃　好。") == "ABC123,!@# 好。"
    assert text.to_half_width("①㎡") == "①㎡"  # not NFKC: only the full-width ASCII block


def test_whitespace():
    assert text.collapse_whitespace("  a \t b\n\n c \u3000 ") == "a b c"


def test_repeats():
    assert text.collapse_repeats("哈哈哈哈哈哈哈") == "哈哈哈"
    assert text.collapse_repeats("好好 啊啊啊啊!!!!!😂😂😂😂", limit=2) == "好好 啊啊!!😂😂"
    assert text.collapse_repeats("100000000 元") == "100000000 元"  # numbers untouched


def test_traditional_to_simplified():
    pytest.importorskip("opencc")
    assert only(t2s=True)("我們喜歡這個電影") == "我们喜欢这个电影"


def test_t2s_without_opencc_is_a_clear_user_error(monkeypatch):
    import builtins
    real_import = builtins.__import__

    def no_opencc(name, *args, **kwargs):
        if name == "opencc":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)
    monkeypatch.setattr(builtins, "__import__", no_opencc)
    text._opencc_converter.cache_clear()
    try:
        with pytest.raises(UserError, match="pip install opencc-python-reimplemented"):
            only(t2s=True)("這個")
    finally:
        text._opencc_converter.cache_clear()


def test_zero_width_spaces_removed_but_emoji_joiners_kept():
    assert only()("a\u200bb\ufeff👨‍👩‍👧") == "ab👨‍👩‍👧"


# ---------------------------------------------------------------- the whole pipeline

WEIBO = [
    ("回复@小鞠酱:哈哈哈哈哈哈太可爱了😂😂 #今日份快乐# http://t.cn/A6xYzAbc",
     "回复@user:哈哈哈太可爱了😂😂 今日份快乐 http"),
    ("//@新浪新闻：【突发】　ＸＸ地区发生地震，详情见 https://weibo.com/123?from=page_1005 ！！！！",
     "//@user:【突发】 XX地区发生地震,详情见 http !!!"),
    ("我們今天去看電影了，好開心～～～～ 👍🏻👍🏻 #電影#", "我们今天去看电影了,好开心~~~ 👍🏻👍🏻 电影"),
]


@pytest.mark.parametrize("raw, expected", WEIBO)
def test_social_pipeline_on_weibo_style_posts(raw, expected):
    pytest.importorskip("opencc")
    assert build_normalizer("social,t2s,repeats")(raw) == expected


def test_social_pipeline_with_emoji_dropped_and_idempotent():
    normalize = build_normalizer("social,emoji=drop")
    once = normalize("@某人 今天 😂😂 真的 ❤️ 好 https://x.cn/a")
    assert once == "@user 今天 真的 好 http"
    assert normalize(once) == once  # placeholders are not matched again


def test_normalizer_accepts_a_string_spec_and_is_deterministic():
    first = build_normalizer("social")("  ＃话题＃　@a  ")
    assert first == build_normalizer(normalizer_spec("social"))("  ＃话题＃　@a  ") == "话题 @user"
