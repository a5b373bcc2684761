"""The model directory: one self-describing folder per trained model.

Layout (what infer.py, export_onnx.py and the server read):
  config.json        the backbone's config plus ``id2label``/``label2id`` and a
                     ``toolkit`` block: task, head settings and the preprocessing
                     used in training (max_length, truncation side, normalization...)
  model.safetensors  the whole model's weights (``backbone.*`` and head keys)
  tokenizer files    tokenizer.json, tokenizer_config.json, vocab...
  training_args.json the effective options of the run that produced it
"""
import json
import math
import pickle
import re
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from common import text
from common.errors import UserError

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
FORMAT_VERSION = 1
BACKBONE_PREFIX = "backbone."  # where a toolkit model directory keeps its encoder's weights
TASKS = ("classification", "vector", "longdoc")
# what from_pretrained raises for unreadable, truncated or refused weights and configs
# (torch.load's weights_only refusal of a pickle that would run code is an UnpicklingError)
LOAD_ERRORS = (OSError, ValueError, TypeError, KeyError, RuntimeError, EOFError, pickle.UnpicklingError,
               SafetensorError)


def load_pretrained_backbone(name_or_path, trust_remote_code=False, keep_pooler=False, flag="--model-name"):
    """AutoModel from a hub name or local path, or the encoder of a model directory this toolkit wrote
    (a classifier, vector or long-document model: fine-tuning goes on from it); the BERT pooler is
    dropped unless used. ``flag`` is the option that named the model, for the error messages.

    An unused pooler would leave parameters without gradients (DDP then fails) and wastes a matmul
    per step. Encoder weights the checkpoint lacks are refused: transformers would draw them at random
    and print a warning table, and the run would fine-tune a random encoder.
    """
    import transformers  # imported where used: ~2 s that --help and flag errors should not wait for
    if is_toolkit_model_directory(name_or_path):
        backbone, missing = toolkit_backbone(name_or_path, flag)
    else:
        try:
            backbone, loading = transformers.AutoModel.from_pretrained(
                name_or_path, trust_remote_code=trust_remote_code, output_loading_info=True)
        except LOAD_ERRORS as error:
            raise UserError(f"{flag} {name_or_path}: cannot load a model there "
                            f"({describe_load_error(error)})") from None
        missing = sorted(loading["missing_keys"])
    check_missing_weights(name_or_path, missing, keep_pooler, flag)
    if not keep_pooler and getattr(backbone, "pooler", None) is not None:
        backbone.pooler = None
    return backbone


def is_toolkit_model_directory(path):
    """Whether ``path`` is a model directory this toolkit wrote (config.json with a 'toolkit' block)."""
    config = read_json_if_exists(Path(path) / CONFIG_FILE)
    return isinstance(config, dict) and isinstance(config.get("toolkit"), dict)


def read_json_if_exists(path):
    """Parsed JSON of a file, or None when it is missing or unreadable."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        return None


def toolkit_backbone(directory, flag="--model-name"):
    """(encoder, names of encoder weights it lacks) of a toolkit model directory: its weights are saved
    under ``backbone.``, beside the head's, which a new task does not reuse."""
    config, toolkit = read_model_config(directory, flag)
    print(describe_starting_model(directory, toolkit, flag))
    backbone = build_backbone_from_config(config, keep_pooler=True)
    missing, _ = load_state(backbone, directory, BACKBONE_PREFIX)
    return backbone, sorted(missing)


def describe_starting_model(directory, toolkit, flag="--model-name"):
    """One line on what a run started from a toolkit model directory takes from it, and the text option
    it was trained with that this run does not inherit."""
    line = (f"{flag} {directory}: a {toolkit['task']} model of this toolkit; training starts from its "
            "encoder and tokenizer (not its head or settings)")
    normalize = toolkit.get("preprocessing", {}).get("normalize")
    if normalize:
        line += (f"; it was trained on text normalized with --normalize {text.describe(normalize)}: pass it again "
                 "to keep that")
    return line


def check_missing_weights(name_or_path, missing, keep_pooler, flag="--model-name"):
    """Refuse an encoder whose checkpoint lacks weights it needs (the pooler only matters when used)."""
    needed = [name for name in missing if keep_pooler or not name.startswith("pooler.")]
    if needed:
        raise UserError(f"{flag} {name_or_path}: {len(needed)} encoder weights are not in the checkpoint "
                        f"(e.g. {', '.join(needed[:3])}); they would start at random")


def load_tokenizer(name_or_path, trust_remote_code=False):
    import transformers  # imported where used: ~2 s that --help and flag errors should not wait for
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except LOAD_ERRORS as error:
        raise UserError(f"{name_or_path}: cannot load a tokenizer there ({_first_line(error)})") from None
    if not getattr(tokenizer, "is_fast", False) or not hasattr(tokenizer, "backend_tokenizer"):
        raise UserError(f"{name_or_path}: a fast (tokenizers-backed) tokenizer is required")
    return tokenizer


def check_max_lengths(name_or_path, args, trust_remote_code=False):
    """Every --*max-length must fit the encoder's position embeddings: past them the embedding lookup
    fails in the middle of training (only once a text that long comes along)."""
    import transformers  # imported where used: ~2 s that --help and flag errors should not wait for
    try:
        config = transformers.AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        raise UserError(f"--model-name {name_or_path}: cannot read its config.json ({_first_line(error)})") from None
    limit = getattr(config, "max_position_embeddings", None)
    for name in ("max_length", "query_max_length", "doc_max_length"):
        value = getattr(args, name, None)
        if isinstance(limit, int) and isinstance(value, int) and value > limit:
            raise UserError(f"--{name.replace('_', '-')} {value}: longer than the {limit} positions of "
                            f"--model-name {name_or_path}; use at most {limit}")


def _first_line(error):
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def describe_load_error(error):
    """A short reason for a failed from_pretrained; a refused pickle is said plainly (it did not run)."""
    if isinstance(error, pickle.UnpicklingError):
        return ("its .bin weights hold Python objects, not only tensors; refused without running them "
                "(convert them to safetensors)")
    return _first_line(error)


def write_model_directory(directory, model, tokenizer, toolkit, id2label=None):
    """Write config.json (backbone config + toolkit block), model.safetensors and the tokenizer."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = model.backbone.config
    config_dict = config.to_dict()
    if id2label is not None:
        config_dict["id2label"] = {str(index): name for index, name in id2label.items()}
        config_dict["label2id"] = {name: int(index) for index, name in id2label.items()}
    config_dict["toolkit"] = dict(toolkit, format_version=FORMAT_VERSION)
    (directory / CONFIG_FILE).write_text(json.dumps(config_dict, indent=2, ensure_ascii=False), encoding="utf-8")
    state = {name: tensor.detach().to("cpu").contiguous() for name, tensor in model.state_dict().items()}
    save_file(state, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
    tokenizer.save_pretrained(str(directory))


def classifier_writer(model, tokenizer, toolkit, args, id2label):
    """A function writing a classifier's model directory (weights, config, tokenizer, training_args.json)
    into a folder: what checkpoint-best and every step checkpoint hold."""
    from common.cli import write_effective_config

    def write(folder):
        write_model_directory(folder, model, tokenizer, toolkit, id2label)
        write_effective_config(args, folder)
    return write


def read_model_config(directory, option="--model-path"):
    """(backbone config, toolkit block) of a model directory, or a clear UserError naming ``option``."""
    import transformers  # imported where used: ~2 s that --help and flag errors should not wait for
    directory = Path(directory)
    config_path = directory / CONFIG_FILE
    if not directory.is_dir():
        raise UserError(f"{option} {directory}: not a directory")
    if not config_path.is_file():
        raise UserError(f"{option} {directory}: no config.json (not a model directory)")
    try:
        raw = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as error:
        raise UserError(f"{config_path}: invalid JSON ({_first_line(error)})") from None
    if not isinstance(raw, dict):
        raise UserError(f"{config_path}: expected a JSON object, got a JSON {type(raw).__name__}")
    toolkit = raw.pop("toolkit", None)
    if not isinstance(toolkit, dict) or "task" not in toolkit:
        raise UserError(f"{config_path}: field 'toolkit': missing (not written by this toolkit's trainers)")
    check_toolkit_block(toolkit, config_path)
    if not (directory / WEIGHTS_FILE).is_file():
        raise UserError(f"{option} {directory}: no {WEIGHTS_FILE}")
    try:
        config = transformers.AutoConfig.for_model(**raw) if "model_type" in raw else \
            transformers.AutoConfig.from_pretrained(str(directory))
    except LOAD_ERRORS as error:
        raise UserError(f"{config_path}: not a usable model config ({_first_line(error)})") from None
    return config, toolkit


# ---------------------------------------------------------------- checking the toolkit block

def _integer(minimum):
    return lambda value: isinstance(value, int) and not isinstance(value, bool) and value >= minimum, \
        f"an integer >= {minimum}"


def _number(above=None, minimum=None, below=None, maximum=None):
    def check(value):
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and \
            (above is None or value > above) and (minimum is None or value >= minimum) and \
            (below is None or value < below) and (maximum is None or value <= maximum)
    limits = [text for text, bound in ((f"> {above}", above), (f">= {minimum}", minimum), (f"< {below}", below),
                                       (f"<= {maximum}", maximum)) if bound is not None]
    return check, "a finite number " + " and ".join(limits)


def _choice(*choices):
    return lambda value: isinstance(value, str) and value in choices, "one of " + ", ".join(choices)


def _of_type(kind, name):
    return lambda value: isinstance(value, kind), name


def _integer_list():
    return lambda value: isinstance(value, list) and bool(value) and all(
        isinstance(item, int) and not isinstance(item, bool) and item >= 1 for item in value), \
        "a non-empty list of positive integers"


def _positive_number_list():
    return lambda value: isinstance(value, list) and bool(value) and all(
        isinstance(item, (int, float)) and not isinstance(item, bool) and math.isfinite(item) and item > 0
        for item in value), "a non-empty list of positive numbers"


def _threshold_map():
    """{label name: threshold in [0, 1]} (a multi-label model's decision thresholds)."""
    def check(value):
        return isinstance(value, dict) and all(
            isinstance(t, (int, float)) and not isinstance(t, bool) and 0 <= t <= 1 for t in value.values())
    return check, "an object of label names to numbers in [0, 1]"


def _regex_list():
    def check(value):
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            return False
        try:
            for pattern in value:
                re.compile(pattern)
        except re.error:
            return False
        return True
    return check, "a list of valid regular expressions"


def toolkit_rules():
    """(field, (check, expected), may be null, required) for every toolkit setting that loading reads.

    Imported here, not at the top: heads, vector and longdoc import this module.
    """
    from common.choices import PROBLEM_TYPES, REGRESSION_LOSSES, THRESHOLD_STRATEGIES
    from common.heads import POOLINGS
    from common.longdoc import AGGREGATIONS, CHUNK_SELECTIONS
    from common.vector import VECTOR_POOLINGS
    length = _integer(2)
    return [
        ("task", _choice(*TASKS), False, True),
        ("problem_type", _choice(*PROBLEM_TYPES), True, False),
        ("thresholds", _threshold_map(), True, False),
        ("threshold_strategy", _choice(*THRESHOLD_STRATEGIES), True, False),
        ("label_separator", _of_type(str, "a string"), True, False),
        ("target_scaling", _of_type(dict, "an object"), True, False),
        ("target_scaling.mean", _number(), False, True),
        ("target_scaling.std", _number(above=0), False, True),
        ("regression_loss", _choice(*REGRESSION_LOSSES), True, False),
        ("huber_delta", _number(above=0), True, False),
        ("temperature", _number(above=0), True, False),
        ("fusion", _of_type(dict, "an object"), True, False),
        ("fusion.retriever_weight", _number(minimum=0, maximum=1), False, True),
        ("fusion.rerank_top", _integer(1), True, False),
        ("baseline_fusion", _of_type(dict, "an object"), True, False),
        ("baseline_fusion.weight", _number(minimum=0, maximum=1), False, True),
        ("baseline_fusion.baseline", _of_type(str, "a string"), True, False),
        ("preprocessing", _of_type(dict, "an object"), False, False),
        ("preprocessing.max_length", length, True, False),
        ("preprocessing.truncation_side", _choice("right", "left"), True, False),
        ("preprocessing.context", _of_type(str, "a string"), True, False),
        ("preprocessing.record_format", _of_type(str, "a string"), True, False),
        ("preprocessing.query_instruction", _of_type(str, "a string"), True, False),
        ("preprocessing.passage_instruction", _of_type(str, "a string"), True, False),
        ("head", _of_type(dict, "an object"), False, False),
        ("head.num_labels", _integer(1), False, True),
        ("head.pooling", _choice(*POOLINGS), False, True),
        ("head.dropout", _number(minimum=0, below=1), True, False),
        ("head.head_layernorm", _of_type(bool, "true or false"), True, False),
        ("head.freeze_backbone", _of_type(bool, "true or false"), True, False),
        ("vector", _of_type(dict, "an object"), False, False),
        ("vector.pooling", _choice(*VECTOR_POOLINGS), True, False),
        ("vector.projection_dim", _integer(1), True, False),
        ("vector.normalize", _of_type(bool, "true or false"), True, False),
        ("vector.max_length", length, True, False),
        ("vector.query_max_length", length, True, False),
        ("vector.doc_max_length", length, True, False),
        ("vector.matryoshka_dims", _integer_list(), True, False),
        ("vector.matryoshka_weights", _positive_number_list(), True, False),
        ("vector.rotation", _choice("pca"), True, False),
        ("longdoc", _of_type(dict, "an object"), False, False),
        ("longdoc.stride", _integer(0), True, False),
        ("longdoc.max_chunks", _integer(0), True, False),
        ("longdoc.chunk_selection", _choice(*CHUNK_SELECTIONS), True, False),
        ("longdoc.aggregation", _choice(*AGGREGATIONS), True, False),
        ("longdoc.strip_patterns", _regex_list(), True, False),
    ]


def check_toolkit_block(toolkit, config_path):
    """Refuse a toolkit block with a wrong type or range, naming the file and the field.

    The block decides the preprocessing and the head's shape; a hand-edited value
    ("preprocessing": "oops", "temperature": "hot") would otherwise fail deep inside
    loading with an AttributeError. A required field is required only when its block is present.
    """
    if toolkit.get("task") != "vector" and "head" not in toolkit:
        raise UserError(f"{config_path}: field 'toolkit.head': missing (the classifier head's settings)")
    for name, (check, expected), nullable, required in toolkit_rules():
        *parents, key = name.split(".")
        block = toolkit
        for parent in parents:
            block = block.get(parent) if isinstance(block, dict) else None
        if not isinstance(block, dict):
            continue
        if key not in block:
            if required:
                raise UserError(f"{config_path}: field 'toolkit.{name}': missing")
            continue
        value = block[key]
        if not (value is None and nullable) and not check(value):
            shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
            raise UserError(f"{config_path}: field 'toolkit.{name}': expected {expected}, got {shown}")
    _check_stored_normalizer(toolkit, config_path)
    _check_matryoshka_weights(toolkit, config_path)


def _check_matryoshka_weights(toolkit, config_path):
    """Stored Matryoshka weights need one entry per stored size."""
    vector = toolkit.get("vector") or {}
    weights, dims = vector.get("matryoshka_weights"), vector.get("matryoshka_dims") or []
    if weights is not None and len(weights) != len(dims):
        raise UserError(f"{config_path}: field 'toolkit.vector.matryoshka_weights': {len(weights)} weights for the "
                        f"{len(dims)} sizes of 'toolkit.vector.matryoshka_dims'; expected one per size")


def _check_stored_normalizer(toolkit, config_path):
    from common.text import normalizer_spec
    spec = toolkit.get("preprocessing", {}).get("normalize")
    try:
        normalizer_spec(spec)
    except (UserError, TypeError, ValueError, AttributeError) as error:
        raise UserError(f"{config_path}: field 'toolkit.preprocessing.normalize': {error}") from None


def build_backbone_from_config(config, keep_pooler=False):
    """An untrained backbone of the saved architecture (weights come from model.safetensors)."""
    import transformers  # imported where used: ~2 s that --help and flag errors should not wait for
    backbone = transformers.AutoModel.from_config(config)
    if not keep_pooler and getattr(backbone, "pooler", None) is not None:
        backbone.pooler = None
    return backbone


def load_weights(model, directory):
    """Load model.safetensors into ``model`` strictly; a truncated file is a UserError."""
    missing, unexpected = load_state(model, directory)
    if missing or unexpected:
        raise UserError(f"{Path(directory) / WEIGHTS_FILE}: weights do not match the model in config.json "
                        f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model


def load_state(model, directory, prefix=""):
    """Load the weights of ``directory`` named under ``prefix`` (without it) into ``model``, not strictly:
    (missing, unexpected) names. An unreadable file or a tensor of another shape is a UserError."""
    path = Path(directory) / WEIGHTS_FILE
    try:
        saved = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise UserError(f"{path}: unreadable or truncated weights ({_first_line(error)})") from None
    state = {name[len(prefix):]: tensor for name, tensor in saved.items() if name.startswith(prefix)}
    try:
        return model.load_state_dict(state, strict=False)
    except RuntimeError as error:  # a tensor of another shape than config.json describes
        raise UserError(f"{path}: weights do not match the model in config.json ({_first_line(error)})") from None


def describe_parameters(model):
    """'22.7M parameters (1,155 trainable)': exact below a million, so a frozen backbone's head is not '0.00M'."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return f"{_count(total)} parameters ({_count(trainable)} trainable)"


def _count(number):
    return f"{number / 1e6:.1f}M" if number >= 1_000_000 else f"{number:,}"


def to_device(batch, device, keys=("input_ids", "attention_mask", "token_type_ids")):
    """Move the model inputs of a collated batch to ``device`` (non_blocking from pinned memory)."""
    return {key: batch[key].to(device, non_blocking=True) for key in keys if key in batch}

