"""Argument helpers shared by every script: flag spellings, shared option groups, YAML config."""
import argparse
import difflib
import json
import math
import re
import stat
import sys
from pathlib import Path

import yaml

from common.choices import MIN_COOCCURRENCE_COUNT, PROBLEM_TYPES, REGRESSION_LOSSES, THRESHOLD_STRATEGIES
from common.errors import UserError, short_repr


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose mistakes are UserErrors: one ``error: argument --x: ...`` line and exit code 2
    from the script's ``main`` (the stock parser prints a usage block and calls sys.exit)."""

    def error(self, message):
        raise UserError(f"{message}{self._suggestion(message)} (see --help)")

    def _suggestion(self, message):
        """'did you mean --data-path?' for a mistyped flag (argparse only says it is unrecognized)."""
        if not message.startswith("unrecognized arguments:"):
            return ""
        known = [flag for action in self._actions for flag in action.option_strings]
        for word in message.split(":", 1)[1].split():
            close = difflib.get_close_matches(word.split("=", 1)[0], known, n=1, cutoff=0.6)
            if word.startswith("-") and close:
                return f" (did you mean {close[0]}?)"
        return ""


def exit_on_help(build_parser, argv=None):
    """Print the script's help and exit when the command line asks for it; else do nothing.

    A script calls this, when run as a program, between its ``build_parser`` and the imports that
    load torch, so ``--help`` answers without waiting seconds for them. The script's own parser
    prints the help, so it reads as it would from ``main``.
    """
    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:
        try:
            build_parser().parse_args(argv)  # argparse prints the help and exits when it reaches -h
        except UserError:
            pass  # a mistake before the -h: main reports it as usual


def bounded(kind, minimum=None, maximum=None, above=None, below=None):
    """An argparse ``type=`` for a finite int or float in a range, for flags and YAML alike.

    ``minimum``/``maximum`` are inclusive bounds, ``above``/``below`` exclusive ones.
    NaN, inf and (for ints) ``1.5`` are refused with the allowed range in the message.
    """
    limits = [text for text, bound in ((f">= {minimum}", minimum), (f"> {above}", above),
                                       (f"<= {maximum}", maximum), (f"< {below}", below)) if bound is not None]
    expected = f"{'an integer' if kind is int else 'a number'}{' ' + ' and '.join(limits) if limits else ''}"

    def convert(text):
        try:
            value = kind(str(text).strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not math.isfinite(value) or (minimum is not None and value < minimum) or \
                (maximum is not None and value > maximum) or (above is not None and value <= above) or \
                (below is not None and value >= below):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    convert.__name__ = expected  # argparse names the type in its own messages
    return convert


SEED_LIMIT = 2 ** 32  # numpy's seed range
DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


def parse_device(value):
    """``--device``: auto, cpu, mps, cuda or cuda:N (availability is checked when the run starts)."""
    if not DEVICE_PATTERN.fullmatch(str(value).strip()):
        raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda or cuda:N, got {value!r}")
    return str(value).strip()


def probability(strict_upper=True):
    return bounded(float, minimum=0.0, below=1.0) if strict_upper else bounded(float, minimum=0.0, maximum=1.0)


# One range per option, for every script that has it: a value outside is refused before any
# model loads, on the command line and in a YAML config alike (apply_option_ranges).
OPTION_RANGES = {
    "max_length": bounded(int, minimum=4), "query_max_length": bounded(int, minimum=4),
    "doc_max_length": bounded(int, minimum=4), "num_labels": bounded(int, minimum=2),
    "epochs": bounded(int, minimum=1), "num_epochs": bounded(int, minimum=1), "max_steps": bounded(int, minimum=0),
    "batch_size": bounded(int, minimum=1), "eval_batch_size": bounded(int, minimum=1),
    "chunk_batch_size": bounded(int, minimum=1), "gradient_accumulation_steps": bounded(int, minimum=1),
    "learning_rate": bounded(float, minimum=0.0, maximum=10.0), "weight_decay": bounded(float, minimum=0.0),
    "adam_epsilon": bounded(float, above=0.0), "warmup_ratio": probability(strict_upper=False),
    "warmup_steps": bounded(int, minimum=0), "max_grad_norm": bounded(float, minimum=0.0),
    "val_ratio": bounded(float, above=0.0, below=1.0), "dropout": probability(),
    "focal_gamma": bounded(float, minimum=0.0), "huber_delta": bounded(float, above=0.0),
    "class_weights_beta": bounded(float, above=0.0, below=1.0),
    "label_smoothing": probability(), "rdrop_alpha": bounded(float, minimum=0.0),
    "adv_epsilon": bounded(float, above=0.0), "adv_steps": bounded(int, minimum=1, maximum=100),
    "ema_decay": probability(strict_upper=False),
    "eval_steps": bounded(int, minimum=0), "patience": bounded(int, minimum=0),
    "min_delta": bounded(float, minimum=0.0),
    "save_steps": bounded(int, minimum=0), "save_total_limit": bounded(int, minimum=0),
    "logging_steps": bounded(int, minimum=1), "stride": bounded(int, minimum=0), "max_chunks": bounded(int, minimum=0),
    "projection_dim": bounded(int, minimum=0, maximum=65536), "temperature": bounded(float, above=0.0),
    "relevance_threshold": bounded(float), "port": bounded(int, minimum=1, maximum=65535),
    "max_texts": bounded(int, minimum=1), "max_chars": bounded(int, minimum=1),
    "max_batch_size": bounded(int, minimum=1), "batch_wait_ms": bounded(float, minimum=0.0, maximum=10000.0),
    "rerank_group_size": bounded(int, minimum=2, maximum=1024), "rerank_top": bounded(int, minimum=1),
}


def apply_option_ranges(parser):
    """Give every numeric option of ``parser`` its range from OPTION_RANGES (one table for all scripts)."""
    for action in parser._actions:
        if action.dest in OPTION_RANGES and action.type in (int, float):
            action.type = OPTION_RANGES[action.dest]
    return parser


def spellings(name):
    """Return the hyphenated flag and, when different, its underscore spelling.

    The source documents use both (``--data-path``, ``--train_path``); accepting
    both means every documented command works as written.
    """
    hyphenated = "--" + name.replace("_", "-")
    underscored = "--" + name.replace("-", "_")
    return [hyphenated] if hyphenated == underscored else [hyphenated, underscored]


def add_flag(parser, name, aliases=(), **kwargs):
    """``parser.add_argument`` with both spellings and a dest in snake_case.

    ``aliases`` are other documented names of the same option (the HF Trainer's
    ``--num_train_epochs`` for ``--epochs``), each also accepted in both spellings.
    """
    kwargs.setdefault("dest", name.replace("-", "_"))
    names = [flag for alias in (name, *aliases) for flag in spellings(alias)]
    return parser.add_argument(*names, **kwargs)


def parse_bool(value):
    """Parse 'true/false/1/0/yes/no' (for flags like ``--optimize false``)."""
    lowered = str(value).strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def parse_label_list(value):
    """``--labels a,b,c`` -> ['a', 'b', 'c']."""
    names = [name.strip() for name in value.split(",") if name.strip()]
    if len(names) < 2:
        raise argparse.ArgumentTypeError("--labels needs at least two comma-separated names")
    if len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"--labels has duplicate names: {value}")
    return names


def add_data_path_args(parser, what="examples", test_help=None):
    """Where the data is: the same three flags in every trainer (``--train-path`` is an alias)."""
    group = parser.add_argument_group("data")
    add_flag(group, "data-path", aliases=("train-path",),
             help=f"training {what}: JSON array, JSONL, CSV/TSV, or a datasets save_to_disk directory")
    add_flag(group, "val-path", help=f"validation {what}")
    add_flag(group, "test-path", help=test_help or f"test {what}, evaluated with the best model at the end")
    return group


def add_optimization_args(parser, **defaults):
    """Epochs, batch sizes, AdamW, warmup, schedule and clipping: the same flags in every trainer.

    ``defaults`` are the script's own (a long-document batch is smaller than a sentence batch).
    ``--warmup-steps`` and ``--warmup-ratio`` exclude each other; each script says which applies
    when neither is given (``resolve_default_warmup``).
    """
    group = parser.add_argument_group("training")
    add_flag(group, "epochs", aliases=("num-train-epochs", "num-epochs"), type=int, default=3,
             help="passes over the training data")
    add_flag(group, "max-steps", type=int, default=0, help="stop after this many optimizer steps (0: no limit)")
    add_flag(group, "batch-size", aliases=("per-device-train-batch-size",), type=int, default=32,
             help="examples per forward pass (per process)")
    add_flag(group, "eval-batch-size", type=int, default=64, help="examples per evaluation forward pass")
    add_flag(group, "gradient-accumulation-steps", type=int, default=1, help="forward passes per optimizer step")
    add_flag(group, "learning-rate", type=float, default=2e-5, help="peak AdamW learning rate")
    add_flag(group, "weight-decay", type=float, default=0.01, help="AdamW weight decay (not on biases/LayerNorm)")
    add_flag(group, "adam-epsilon", type=float, default=1e-8, help="AdamW epsilon")
    warmup = group.add_mutually_exclusive_group()
    add_flag(warmup, "warmup-ratio", type=float, default=None, help="share of all steps with linear warmup")
    add_flag(warmup, "warmup-steps", aliases=("num-warmup-steps",), type=int, default=None,
             help="linear warmup steps (instead of --warmup-ratio)")
    add_flag(group, "scheduler", choices=["linear", "cosine"], default="linear", help="decay after warmup")
    add_flag(group, "max-grad-norm", type=float, default=1.0, help="gradient clipping threshold (0: off)")
    add_flag(group, "group-by-length", type=parse_bool, default=True,
             help="batch similar lengths together (less padding); batch order stays random")
    parser.set_defaults(**defaults)
    return group


def resolve_default_warmup(args, warmup_ratio=None, warmup_steps=None):
    """Apply the script's default warmup when neither flag nor config set one; refuse both at once."""
    if args.warmup_ratio is not None and args.warmup_steps is not None:
        raise UserError("--warmup-steps and --warmup-ratio both set (one may come from --config): give one")
    if args.warmup_ratio is None and args.warmup_steps is None:
        args.warmup_ratio, args.warmup_steps = warmup_ratio, warmup_steps


def add_checkpoint_args(parser, **defaults):
    """Output directory, evaluation and early stopping, checkpoints, logging, config: shared by the trainers."""
    group = parser.add_argument_group("evaluation, early stopping, checkpoints, logging")
    add_flag(group, "output-dir", aliases=("save-path",), default="./output",
             help="where checkpoints, metrics and logs go: a new or empty directory, or this toolkit's own "
                  "earlier run (with --resume or --overwrite-output-dir)")
    add_flag(group, "eval-steps", type=int, default=0, help="evaluate every N steps (0: only at epoch ends)")
    add_flag(group, "patience", type=int, default=3, help="evaluations without improvement before stopping (0: off)")
    add_flag(group, "min-delta", type=float, default=0.001, help="smallest change that counts as improvement")
    add_flag(group, "save-steps", type=int, default=500, help="write checkpoint-step-N every N steps (0: off)")
    add_flag(group, "save-total-limit", type=int, default=3, help="step checkpoints to keep (0: all)")
    add_flag(group, "logging-steps", type=int, default=50, help="log loss, learning rate and throughput every N steps")
    add_flag(group, "baseline", choices=["tfidf", "none"], default="tfidf",
             help="fit a TF-IDF baseline (sklearn) on the same data and show it beside the model's figures")
    add_flag(group, "config", help="YAML config with model/training/... sections; flags override it")
    parser.set_defaults(**defaults)
    return group


def add_baseline_fusion_arg(group):
    """--fuse-baseline, for the trainers of single-label classifiers (common/fusion.py)."""
    add_flag(group, "fuse-baseline", type=parse_bool, default=False,
             help="single-label: fuse the model with the TF-IDF baseline, its share tuned on validation "
                  "(0 when that does not help) and stored with the model for inference, serving and export")


def check_baseline_fusion(args):
    """--fuse-baseline needs the baseline and a single-label model: refused before any work otherwise."""
    if not getattr(args, "fuse_baseline", False):
        return
    if args.baseline == "none":
        raise UserError("--fuse-baseline fits the TF-IDF baseline: drop --baseline none")
    problem_type = getattr(args, "problem_type", None) or "single_label"
    if problem_type != "single_label":
        raise UserError(f"--fuse-baseline: only a single-label classifier is fused, not --problem-type {problem_type}")


def add_data_text_args(parser):
    """Options about data, text and vocabulary that every training script shares.

    Their values are stored in the model directory so inference and export reuse them.
    """
    group = parser.add_argument_group("data and text")
    add_flag(group, "labels", type=parse_label_list, default=None,
             help="comma-separated label names fixing their order and ids (e.g. low_value,normal,interrupt)")
    add_flag(group, "skip-invalid", action="store_true",
             help="drop invalid records (and say how many) instead of stopping with an error")
    add_flag(group, "text-field", default=None, help="column holding the text when it is not 'text'")
    add_flag(group, "label-field", default=None, help="column holding the label when it is not 'label'")
    add_flag(group, "data-split", default=None,
             help="split to read from a datasets save_to_disk directory (none: the train split)")
    add_flag(group, "truncation-side", choices=["right", "left"], default="right",
             help="which end of a too-long text is cut (left keeps the ending); stored with the model")
    add_flag(group, "normalize", nargs="?", const="social", default=None,
             help="social-media text normalization preset or options (see docs/train_classifier.md); stored with "
                  "the model")
    return group


def add_vocabulary_args(parser):
    """--extend-vocab and what helps the added tokens: their start, their learning rate, MLM adaptation.
    The extended tokenizer is stored with the model."""
    group = parser.add_argument_group("vocabulary and domain adaptation")
    add_flag(group, "extend-vocab", type=bounded(int, minimum=0), default=0, metavar="MIN_COUNT",
             help="add tokens the tokenizer maps to [UNK] that occur at least MIN_COUNT times")
    add_flag(group, "new-token-init", choices=["cooccurrence", "random", "mean", "unk"], default="cooccurrence",
             help="where the added tokens' embeddings start: predicted from the tokens each one appears beside "
                  "in the training texts and --unlabeled-path (the default; tokens seen under "
                  f"{MIN_COOCCURRENCE_COUNT} times start random), random N(0, initializer_range), the mean of the "
                  "existing rows, or the [UNK] row (the untuned model unchanged; see docs/train_classifier.md)")
    add_flag(group, "new-token-lr", type=bounded(float, above=0), default=None, metavar="LR",
             help="learning rate of the added tokens' embeddings (default: 10 x --learning-rate)")
    add_flag(group, "mlm-adapt-steps", type=bounded(int, minimum=0), default=0, metavar="N",
             help="masked-language-model steps on the training texts (and --unlabeled-path) before fine-tuning")
    add_flag(group, "unlabeled-path", default=None,
             help="more in-domain texts for --extend-vocab and --mlm-adapt-steps: a .txt file (one text per "
                  "line) or any data file with a text field")
    return group


def add_runtime_args(parser):
    """Device, precision, seed and resume options shared by every training script."""
    group = parser.add_argument_group("runtime")
    add_flag(group, "device", type=parse_device, default="auto", help="auto, cpu, cuda, cuda:N or mps")
    add_flag(group, "precision", choices=["auto", "fp32", "fp16", "bf16"], default="auto",
             help="autocast precision: auto picks bf16/fp16 on CUDA, bf16 on CPUs with native bf16, else fp32")
    group.add_argument("--fp16", dest="precision", action="store_const", const="fp16",
                       help="same as --precision fp16 (the Hugging Face Trainer's flag)")
    add_flag(group, "seed", type=bounded(int, minimum=0, below=SEED_LIMIT), default=42,
             help="random seed (data split, shuffling, init, dropout)")
    add_flag(group, "resume", nargs="?", const="latest", default=None,
             help="resume from the latest checkpoint in the output directory, or from the given checkpoint path")
    add_flag(group, "resume-force", action="store_true",
             help="resume even when checksums fail or data-shaping options differ from the checkpoint's run")
    add_flag(group, "overwrite-output-dir", action="store_true",
             help="replace the results of an earlier run in the output directory (files it did not write stay)")
    add_flag(group, "trust-remote-code", action="store_true",
             help="allow model code from the model repository to run (off by default)")
    add_flag(group, "num-workers", type=bounded(int, minimum=0, maximum=256), default=0,
             help="DataLoader worker processes")
    add_flag(group, "max-nonfinite-steps", type=bounded(int, minimum=1), default=5,
             help="abort after this many optimizer steps in a row with a NaN/inf loss")
    return group


def load_yaml_config(path, section_aliases):
    """Read a YAML config with sections and flatten it to ``{dest: value}``.

    ``section_aliases`` maps ``(section, key)`` to a dest name when the file's key
    differs from the flag (``("model", "name") -> "model_name"``); other keys map to
    themselves. A key that no flag takes is an error naming the file and key.
    """
    try:
        raw = yaml.load(read_config_text(path), Loader=UniqueKeyLoader) or {}
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise UserError(f"{path}{where}: invalid YAML: {str(error).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a mapping of sections at the top level")
    flat = {}
    for section, body in raw.items():
        for dest, key, value in config_entries(section, body, section_aliases):
            # two sections (or a section and a top-level key) setting one option: the later would win unseen
            if dest in flat and not same_config_value(flat[dest][1], value):
                raise UserError(f"{path}: keys '{flat[dest][0]}' and '{key}' set the same option to "
                                f"{short_repr(flat[dest][1])} and {short_repr(value)}; keep one")
            flat[dest] = (key, value)
    return flat


def same_config_value(first, second):
    """Whether two config values are one: the same object (one anchor's aliases), or equal scalars. Lists
    and maps are not compared element by element: an alias-bomb list would take minutes."""
    if first is second:
        return True
    scalars = (str, int, float, bool, type(None))
    return isinstance(first, scalars) and type(first) is type(second) and first == second


def config_entries(section, body, section_aliases):
    """(option, key as written, value) for one top-level entry of a config: each key of a section, or
    the top-level key itself."""
    if isinstance(body, dict):
        return [(section_aliases.get((section, key), key), f"{section}.{key}", value) for key, value in body.items()]
    return [(section_aliases.get((None, section), section), section, body)]


class UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.safe_load`` that refuses a key repeated in one mapping: PyYAML keeps the last value without a
    word (data files refuse repeated JSON keys for the same reason). Keys brought in by a ``<<`` merge may
    be overridden, as YAML intends."""

    def __init__(self, stream):
        super().__init__(stream)
        self.checked_mappings = set()  # ids of the nodes whose own keys were checked

    def flatten_mapping(self, node):
        """Check a mapping's own keys before its merges are spliced in (which rewrites the node: checked
        after that, an override of a merged key would look repeated), once per node."""
        if id(node) not in self.checked_mappings:
            self.checked_mappings.add(id(node))
            self.refuse_repeated_keys(node)
        super().flatten_mapping(node)

    def refuse_repeated_keys(self, node):
        """A ConstructorError at the second of two equal keys of ``node`` (its own, not merged ones)."""
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node)
            try:
                repeated = key in seen
            except TypeError:  # an unhashable key: SafeLoader itself reports it
                continue
            if repeated:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {short_repr(key)} repeats a key of the same mapping (YAML would keep "
                    "only the last value)", key_node.start_mark)
            seen.add(key)


def read_config_text(path):
    """The text of the config file at ``path``: a regular file in UTF-8 (a byte-order mark is dropped).

    Anything else is one line naming the file; a FIFO or device is refused before it is opened,
    since reading one could block or never end.
    """
    from common.data import decode_utf8, input_path_mode, special_file_kind  # here: common.data loads torch
    mode = input_path_mode(path, "config file")
    if not stat.S_ISREG(mode):
        kind = "a directory" if stat.S_ISDIR(mode) else f"a {special_file_kind(mode)}"
        raise UserError(f"{path}: the config file is not a regular file ({kind})")
    try:
        raw = Path(path).read_bytes()
    except OSError as error:
        raise UserError(f"{path}: cannot read the config file ({error.strerror or error})") from None
    return decode_utf8(raw, path)


def parse_with_config(parser, argv, section_aliases, value_converters=None):
    """Parse argv, with ``--config`` values as defaults that explicit flags override. The arguments as
    given are kept in ``args.command_line`` (training_args.json and the model card show them)."""
    command_line = [str(argument) for argument in (sys.argv[1:] if argv is None else argv)]
    args = parser.parse_args(argv)
    args.command_line = command_line
    if not getattr(args, "config", None):
        return args
    given = {dest for dest, value in vars(args).items() if value != parser.get_default(dest)}
    actions = {}
    for action in parser._actions:  # the flag itself, not an alias like --fp16 that shares its dest
        actions.setdefault(action.dest, action)
    converters = value_converters or {}
    defaults = {}
    for dest, (key, value) in load_yaml_config(args.config, section_aliases).items():
        if dest in converters:
            dest, value = converters[dest](value)
            if dest is None:
                continue
        if dest not in actions:
            raise UserError(f"{args.config}: key '{key}' is not a known option")
        if value is not None:
            defaults[dest] = convert_config_value(actions[dest], value, f"{args.config}: key '{key}'")
    for group in parser._mutually_exclusive_groups:  # a flag overrides its config partner too
        members = {action.dest for action in group._group_actions}
        if members & given:
            for dest in members - given:
                defaults.pop(dest, None)
    parser.set_defaults(**defaults)
    args = parser.parse_args(argv)
    args.command_line = command_line
    return args


def convert_config_value(action, value, where):
    """Check a YAML value with the same type and choices as its flag (set_defaults would skip them)."""
    if action.dest == "labels" and isinstance(value, list):
        if not all(isinstance(name, (str, int)) and not isinstance(name, bool) for name in value):
            raise UserError(f"{where}: expected a list of label names")  # never str() a nested (alias-bomb) list
        value = ",".join(str(name) for name in value)
    if action.nargs == 0:  # store_true / store_const flags take a YAML boolean
        if not isinstance(value, bool):
            raise UserError(f"{where}: expected true or false, got {value!r}")
        return action.const if value else action.default
    if isinstance(value, bool) and action.type in (None, str):
        return _text_option_from_boolean(action, value, where)
    if isinstance(value, (dict, list)):
        raise UserError(f"{where}: expected a single value, got a {type(value).__name__}")
    try:
        converted = (action.type or str)(str(value))
    except (argparse.ArgumentTypeError, ValueError) as error:
        raise UserError(f"{where}: {error}") from None
    if action.choices is not None and converted not in action.choices:
        raise UserError(f"{where}: expected one of {', '.join(map(str, action.choices))}, got {value!r}")
    return converted


def _text_option_from_boolean(action, value, where):
    """A YAML boolean for an option that takes a path or word (str() would make it the path "True").

    An option whose value may be left out (``--resume`` alone means "latest") takes ``true`` as that
    bare flag and ``false`` as not given; any other is refused: YAML reads yes/no/on/off as booleans.
    """
    if action.nargs == "?":
        return action.const if value else action.default
    takes = f"one of {', '.join(map(str, action.choices))}" if action.choices else "a path or text"
    raise UserError(f"{where}: expected {takes}, got the YAML boolean {str(value).lower()} "
                    "(quote a word YAML reads as a boolean, like 'no')")


def write_effective_config(args, output_dir):
    """Record every option's effective value in ``output_dir/training_args.json``."""
    path = Path(output_dir) / "training_args.json"
    path.write_text(json.dumps(vars(args), indent=2, ensure_ascii=False, default=str), encoding="utf-8")
    return path


def add_problem_type_args(parser):
    """--problem-type and the options of each problem type (common/problem_types.py)."""
    group = parser.add_argument_group("problem type (see docs/train_classifier.md)")
    add_flag(group, "problem-type", choices=PROBLEM_TYPES, default=None,
             help="single_label: one class per text; multi_label: any number of labels (a list, or names joined "
                  "by --label-separator); regression: a number per text; rerank (train_classifier.py): a cross-encoder "
                  "scoring query/document pairs (default: single_label, or for --eval-only the model's own)")
    add_flag(group, "label-separator", default=",", help="multi_label: separator of label names in one string "
             "(CSV/TSV cells, chat answers)")
    add_flag(group, "threshold-strategy", choices=THRESHOLD_STRATEGIES, default="per_label",
             help="multi_label: tune one decision threshold per label (each label's F1) or one global "
                  "threshold (micro-F1) on the validation set; stored with the model")
    add_flag(group, "regression-loss", choices=REGRESSION_LOSSES, default="mse", help="regression: loss")
    add_flag(group, "huber-delta", type=float, default=1.0, help="regression: Huber loss delta (in the trained "
             "scale: standard deviations with --standardize-targets)")
    add_flag(group, "standardize-targets", action="store_true",
             help="regression: train on (score - mean) / std of the training scores; stored with the model, "
                  "predictions come back in the original scale")
