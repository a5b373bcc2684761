"""Social-media text normalization, stored with the model and applied again at inference.

``--normalize`` takes a preset and comma-separated options, e.g. ``social``,
``social,emoji=drop,t2s`` or ``basic,repeats=3``. ``normalizer_spec`` turns that into a
canonical dict (written to config.json as ``toolkit.preprocessing.normalize``) and
``build_normalizer`` turns the dict into a pure function ``str -> str``.

Placeholders are plain lowercase words that every BERT WordPiece vocabulary splits
into known pieces (never [UNK]): ``@user`` for mentions and ``http`` for links (the
TweetEval convention), ``emoji`` for emoji.
"""
import functools
import re

from common.errors import UserError

SPEC_VERSION = 1
MENTION_PLACEHOLDER = "@user"
URL_PLACEHOLDER = "http"
EMOJI_PLACEHOLDER = "emoji"

# option -> allowed values; booleans also accept a bare option name ("t2s")
CHOICES = {
    "mentions": ("keep", "placeholder", "drop"),
    "hashtags": ("keep", "text", "drop"),
    "urls": ("keep", "placeholder", "drop"),
    "emoji": ("keep", "placeholder", "drop"),
}
BOOLEANS = ("width", "whitespace", "t2s")
DEFAULT_REPEATS = 3

PRESETS = {
    # Weibo/Twitter text: placeholders for mentions and links, hashtag topics kept as words
    "social": {"mentions": "placeholder", "hashtags": "text", "urls": "placeholder", "emoji": "keep",
               "width": True, "whitespace": True, "t2s": False, "repeats": 0},
    # only the encoding-level clean-up: full-width ASCII and whitespace
    "basic": {"mentions": "keep", "hashtags": "keep", "urls": "keep", "emoji": "keep",
              "width": True, "whitespace": True, "t2s": False, "repeats": 0},
}
OPTION_NAMES = tuple(CHOICES) + BOOLEANS + ("repeats",)

# Links: ASCII URL characters only, so Chinese text glued to a link is not eaten.
# A trailing '.', ',', '!', ')' etc. is sentence punctuation, not part of the link.
URL_PATTERN = re.compile(r"(?:https?://|www\.)[A-Za-z0-9\-._~:/?#\[\]@!$&'()*+,;=%]*[A-Za-z0-9\-_~/#=&+%]",
                         re.IGNORECASE)
# Mentions: '@' not preceded by an ASCII letter, digit, '.' or '_' (so e-mail addresses
# stay, while Chinese text glued to a mention, 你好@张三, still counts), then a
# Weibo/Twitter nickname (letters incl. CJK, digits, '_', '-'), at most 30 characters.
# A nickname ends at whitespace or punctuation, as Weibo's client writes it ("@张三 ", "//@张三:").
MENTION_PATTERN = re.compile(r"(?<![A-Za-z0-9._@])@[\w\-]{1,30}")
# Weibo topics are paired, #话题#, and must not start or end with a space; Twitter's are #word.
WEIBO_TOPIC_PATTERN = re.compile(r"#([^#\s](?:[^#\n]{0,58}[^#\s])?)#")
TWITTER_TAG_PATTERN = re.compile(r"(?<![A-Za-z0-9_&#])#(\w+)")
# Emoji by Unicode range (no dependency, stable across library versions): pictographs,
# misc symbols and dingbats, a few technical symbols, then any skin-tone modifiers,
# variation selectors, tags and zero-width-joiner sequences glued to them. Flags (two
# regional indicators) and keycaps (#️⃣) are one emoji each. Arrows and ©®™ are left as text.
_EMOJI_BASE = ("\U0001F000-\U0001FAFF"  # mahjong .. symbols & pictographs extended-A
               "\u2600-\u27BF"  # miscellaneous symbols, dingbats (☀ ❤ ✨)
               "\u2B00-\u2BFF"  # ⭐ ⬆ ⭕
               "\u231A\u231B\u2328\u23CF\u23E9-\u23F3\u23F8-\u23FA"  # ⌚ ⏰ ⏳
               "\u3030\u303D\u3297\u3299")
_EMOJI_TAIL = "\uFE0F\uFE0E\U0001F3FB-\U0001F3FF\U000E0020-\U000E007F"
EMOJI_PATTERN = re.compile(
    "(?:[\U0001F1E6-\U0001F1FF]{2}"
    "|[0-9#*]\uFE0F?\u20E3"
    f"|[{_EMOJI_BASE}][{_EMOJI_TAIL}]*(?:\u200D[{_EMOJI_BASE}][{_EMOJI_TAIL}]*)*)")
ZERO_WIDTH_PATTERN = re.compile("[\u200B\uFEFF]")  # zero-width space, BOM; ZWJ is kept (emoji sequences)
WHITESPACE_PATTERN = re.compile(r"\s+")


# ---------------------------------------------------------------- the spec

def normalizer_spec(value):
    """Parse a ``--normalize`` value (or a stored spec) into the canonical dict, or None.

    ``None``/``""``/``"none"`` -> None. Otherwise an optional preset first (``social``,
    the default, or ``basic``) followed by ``option=value`` or bare boolean options:
    ``mentions=keep|placeholder|drop``, ``hashtags=keep|text|drop``,
    ``urls=keep|placeholder|drop``, ``emoji=keep|placeholder|drop``, ``width``,
    ``whitespace``, ``t2s`` (true/false; bare means true), ``repeats=N`` (collapse runs
    of one character longer than N to N; bare means 3; 0 is off).
    """
    if value is None:
        return None
    if isinstance(value, dict):
        return _check_spec(value)
    parts = [part.strip() for part in str(value).split(",") if part.strip()]
    if not parts or parts == ["none"]:
        return None
    preset = parts[0] if parts[0] in PRESETS else "social"
    spec = {"version": SPEC_VERSION, "preset": preset, **PRESETS[preset]}
    for part in parts[1:] if parts[0] in PRESETS else parts:
        name, separator, raw = part.partition("=")
        spec[name.strip()] = _parse_option(name.strip(), raw.strip() if separator else None)
    return spec


def _parse_option(name, raw):
    """One option's value; a UserError names the option and what it accepts."""
    if name in PRESETS:
        raise UserError(f"--normalize: preset '{name}' must come first")
    if name in CHOICES:
        if raw not in CHOICES[name]:
            raise UserError(f"--normalize: option '{name}' takes one of {'|'.join(CHOICES[name])}, got {raw!r}")
        return raw
    if name in BOOLEANS:
        if raw is None or raw.lower() in ("true", "yes", "on", "1"):
            return True
        if raw.lower() in ("false", "no", "off", "0"):
            return False
        raise UserError(f"--normalize: option '{name}' takes true or false, got {raw!r}")
    if name == "repeats":
        if raw is None:
            return DEFAULT_REPEATS
        if not raw.isdigit() or int(raw) == 1:
            raise UserError(f"--normalize: option 'repeats' takes 0 (off) or a count >= 2, got {raw!r}")
        return int(raw)
    raise UserError(f"--normalize: unknown option '{name}' (options: {', '.join(OPTION_NAMES)}; "
                    f"presets: {', '.join(PRESETS)})")


def _check_spec(spec):
    """Validate a spec read back from a model directory (written by a possibly newer toolkit)."""
    if spec.get("version", SPEC_VERSION) > SPEC_VERSION:
        raise UserError(f"normalize spec version {spec['version']} is newer than this toolkit's ({SPEC_VERSION})")
    preset = spec.get("preset", "social")
    if preset not in PRESETS:
        raise UserError(f"normalize spec: unknown preset '{preset}' (presets: {', '.join(PRESETS)})")
    checked = {"version": SPEC_VERSION, "preset": preset, **PRESETS[preset]}
    for name, value in spec.items():
        if name in ("version", "preset"):
            continue
        if name not in OPTION_NAMES:
            raise UserError(f"normalize spec: unknown option '{name}'")
        raw = str(value).lower() if isinstance(value, bool) else str(value)
        checked[name] = _parse_option(name, raw)
    return checked


def describe(spec):
    """Short human-readable form of a spec, e.g. ``social,emoji=drop,t2s``."""
    if spec is None:
        return "none"
    base = PRESETS[spec["preset"]]
    changes = [name if value is True else f"{name}={str(value).lower()}"
               for name, value in spec.items() if name in OPTION_NAMES and value != base[name]]
    return ",".join([spec["preset"], *changes])


# ---------------------------------------------------------------- the normalizer

def build_normalizer(spec):
    """A pure, deterministic ``str -> str`` for a spec (a dict, a --normalize string, or None).

    The steps run in this order: full-width -> half-width, zero-width characters out,
    URLs, mentions, hashtags, emoji, traditional -> simplified, repeat collapsing,
    whitespace. URLs go first because they may contain '@' and '#'.
    """
    spec = normalizer_spec(spec)
    if spec is None:
        return _identity
    steps = []
    if spec["width"]:
        steps.append(to_half_width)
    steps.append(lambda text: ZERO_WIDTH_PATTERN.sub("", text))
    steps += [_rule(URL_PATTERN, spec["urls"], f" {URL_PLACEHOLDER} "),
              _rule(MENTION_PATTERN, spec["mentions"], MENTION_PLACEHOLDER),
              _hashtag_rule(spec["hashtags"]),
              _rule(EMOJI_PATTERN, spec["emoji"], f" {EMOJI_PLACEHOLDER} ")]
    if spec["t2s"]:
        steps.append(traditional_to_simplified)
    if spec["repeats"]:
        steps.append(functools.partial(collapse_repeats, limit=spec["repeats"]))
    if spec["whitespace"]:
        steps.append(collapse_whitespace)
    steps = [step for step in steps if step is not None]

    def normalize(text):
        for step in steps:
            text = step(text)
        return text
    return normalize


def _identity(text):
    """No normalization."""
    return text


def _rule(pattern, mode, placeholder):
    """A step replacing ``pattern`` by ``placeholder``, or by a space for 'drop' (so the
    words around it stay apart; whitespace collapsing tidies up); None for 'keep'."""
    if mode == "keep":
        return None
    replacement = placeholder if mode == "placeholder" else " "
    return lambda text: pattern.sub(replacement, text)


def _hashtag_rule(mode):
    """A step for hashtags: keep only the topic words ('text'), remove them ('drop'), or None."""
    if mode == "keep":
        return None
    if mode == "text":  # the topic words carry meaning; only the markers go
        return lambda text: TWITTER_TAG_PATTERN.sub(r"\1", WEIBO_TOPIC_PATTERN.sub(r"\1", text))
    return lambda text: TWITTER_TAG_PATTERN.sub(" ", WEIBO_TOPIC_PATTERN.sub(" ", text))


def to_half_width(text):
    """Full-width ASCII (U+FF01-U+FF5E) and the ideographic space to their ASCII forms.

    Only this range: NFKC would also rewrite ①, ㎡, ﬁ and half-width katakana.
    """
    return text.translate(_HALF_WIDTH)


_HALF_WIDTH = {code: code - 0xFEE0 for code in range(0xFF01, 0xFF5F)}
_HALF_WIDTH[0x3000] = 0x20


def collapse_whitespace(text):
    """Runs of whitespace (spaces, tabs, newlines) to one space; ends stripped."""
    return WHITESPACE_PATTERN.sub(" ", text).strip()


def collapse_repeats(text, limit=DEFAULT_REPEATS):
    """A character repeated more than ``limit`` times in a row is cut to ``limit``
    ("哈哈哈哈哈哈" -> "哈哈哈", "!!!!!" -> "!!!"). Digits are left alone: 1000000 is a number."""
    return re.sub(r"([^\d\s])\1{%d,}" % limit, lambda match: match.group(1) * limit, text)


def traditional_to_simplified(text):
    """Traditional -> simplified Chinese with OpenCC's t2s tables."""
    return _opencc_converter().convert(text)


@functools.lru_cache(maxsize=1)
def _opencc_converter():
    """The OpenCC t2s converter, built once (loading its tables takes a moment)."""
    try:
        import opencc
    except ImportError:
        raise UserError("--normalize t2s needs the OpenCC tables: pip install opencc-python-reimplemented "
                        "(pure Python) or opencc") from None
    try:
        return opencc.OpenCC("t2s")
    except Exception:  # the C++ 'opencc' package names its configs with a .json suffix
        return opencc.OpenCC("t2s.json")
