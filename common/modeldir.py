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
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModel, AutoTokenizer

from common.errors import UserError

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
FORMAT_VERSION = 1


def load_pretrained_backbone(name_or_path, trust_remote_code=False, keep_pooler=False):
    """AutoModel from a hub name or local path; the BERT pooler is dropped unless used.

    An unused pooler would leave parameters without gradients (DDP then fails) and
    wastes a matmul per step.
    """
    try:
        backbone = AutoModel.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        raise UserError(f"--model-name {name_or_path}: cannot load a model there ({_first_line(error)})") from None
    if not keep_pooler and getattr(backbone, "pooler", None) is not None:
        backbone.pooler = None
    return backbone


def load_tokenizer(name_or_path, trust_remote_code=False):
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError) as error:
        raise UserError(f"{name_or_path}: cannot load a tokenizer there ({_first_line(error)})") from None
    if not getattr(tokenizer, "is_fast", False) or not hasattr(tokenizer, "backend_tokenizer"):
        raise UserError(f"{name_or_path}: a fast (tokenizers-backed) tokenizer is required")
    return tokenizer


def _first_line(error):
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


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


def read_model_config(directory):
    """(backbone config, toolkit block) of a model directory, or a clear UserError."""
    directory = Path(directory)
    config_path = directory / CONFIG_FILE
    if not directory.is_dir():
        raise UserError(f"--model-path {directory}: not a directory")
    if not config_path.is_file():
        raise UserError(f"--model-path {directory}: no config.json (not a model directory)")
    try:
        raw = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"{config_path}: invalid JSON ({error})") from None
    toolkit = raw.pop("toolkit", None)
    if not isinstance(toolkit, dict) or "task" not in toolkit:
        raise UserError(f"{config_path}: field 'toolkit': missing (not written by this toolkit's trainers)")
    if not (directory / WEIGHTS_FILE).is_file():
        raise UserError(f"--model-path {directory}: no {WEIGHTS_FILE}")
    config = AutoConfig.for_model(**raw) if "model_type" in raw else AutoConfig.from_pretrained(str(directory))
    return config, toolkit


def build_backbone_from_config(config, keep_pooler=False):
    """An untrained backbone of the saved architecture (weights come from model.safetensors)."""
    backbone = AutoModel.from_config(config)
    if not keep_pooler and getattr(backbone, "pooler", None) is not None:
        backbone.pooler = None
    return backbone


def load_weights(model, directory):
    """Load model.safetensors into ``model`` strictly; a truncated file is a UserError."""
    path = Path(directory) / WEIGHTS_FILE
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise UserError(f"{path}: unreadable or truncated weights ({_first_line(error)})") from None
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UserError(f"{path}: weights do not match the model in config.json "
                        f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model


def count_parameters(model):
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return sum(p.numel() for p in model.parameters()), trainable


def device_of(model):
    return next(model.parameters()).device


def to_device(batch, device, keys=("input_ids", "attention_mask", "token_type_ids")):
    """Move the model inputs of a collated batch to ``device`` (non_blocking from pinned memory)."""
    return {key: batch[key].to(device, non_blocking=True) for key in keys if key in batch}

