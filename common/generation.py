"""Text generation with a causal language model directory (GPT-2 and friends).

A causal LM directory is a Hugging Face checkpoint whose config.json names a causal-LM
architecture (``GPT2LMHeadModel``, ``...ForCausalLM``) and has no ``toolkit`` block;
``infer.py`` hands such directories here. Sampling goes through transformers'
``generate()``; ``temperature == 0`` means greedy decoding.
"""
import json
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from common import modeldir
from common.choices import MAX_RETURN_SEQUENCES
from common.errors import UserError

CAUSAL_LM_SUFFIXES = ("LMHeadModel", "ForCausalLM")
DEFAULT_TOP_K = 50
# BERT-style tokenizers (uer/gpt2-chinese-*) decode Chinese with a space between characters
CJK = r"[\u3000-\u303f\u4e00-\u9fff\uff00-\uffef]"
SPACE_BETWEEN_CJK = re.compile(rf"(?<={CJK}) (?={CJK})")


@dataclass
class GenerationOptions:
    """Decoding settings; ``temperature == 0`` selects greedy decoding."""
    max_new_tokens: int = 50
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    num_return_sequences: int = 1
    seed: int | None = None

    def check(self):
        """Raise a UserError naming the flag for an out-of-range value (NaN and inf included).

        infer.py's flag types refuse the same values first; this guards other callers.
        """
        finite = all(math.isfinite(value) for value in (self.temperature, self.top_p, self.repetition_penalty))
        if self.max_new_tokens < 1:
            raise UserError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
        if not finite or self.temperature < 0:
            raise UserError(f"--temperature must be a finite number >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 0:
            raise UserError(f"--top-k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise UserError(f"--top-p must be in (0, 1], got {self.top_p}")
        if not self.repetition_penalty > 0:
            raise UserError(f"--repetition-penalty must be a finite number > 0, got {self.repetition_penalty}")
        if not 1 <= self.num_return_sequences <= MAX_RETURN_SEQUENCES:
            raise UserError(f"--num-return-sequences must be between 1 and {MAX_RETURN_SEQUENCES}, "
                            f"got {self.num_return_sequences}")
        if self.temperature == 0 and self.num_return_sequences > 1:
            raise UserError("--num-return-sequences > 1 needs sampling (--temperature > 0): greedy gives one answer")
        return self


def is_causal_lm_directory(path):
    """True for a directory whose config.json names a causal-LM architecture and has no toolkit block."""
    config_path = Path(path) / "config.json"
    if not config_path.is_file():
        return False
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        return False  # the model loaders report an unreadable config.json with its reason
    architectures = config.get("architectures") if isinstance(config, dict) else None
    return isinstance(architectures, list) and "toolkit" not in config and \
        any(isinstance(name, str) and name.endswith(CAUSAL_LM_SUFFIXES) for name in architectures)


def load_causal_lm(path, device="cpu"):
    """(model in eval mode on ``device``, tokenizer) from a causal LM directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        model = AutoModelForCausalLM.from_pretrained(str(path))
    except modeldir.LOAD_ERRORS as error:
        raise UserError(f"--model-path {path}: cannot load a causal language model "
                        f"({modeldir.describe_load_error(error)})") from None
    return model.to(device).eval(), tokenizer


def position_limit(model):
    """How many positions (prompt + generated tokens) the model has, or None when it does not say."""
    config = model.config
    for name in ("n_positions", "max_position_embeddings"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def tokens_to_generate(model, prompt_length, max_new_tokens, prompt):
    """``max_new_tokens``, clamped so prompt + continuation fit the model's positions.

    Past the last position GPT-2 indexes out of its position table (IndexError), so a
    request beyond it is shortened (with one warning per run, from generate_texts) and a
    prompt that already fills every position is refused.
    """
    limit = position_limit(model)
    if limit is None or prompt_length + max_new_tokens <= limit:
        return max_new_tokens
    if prompt_length >= limit:
        shown = prompt if len(prompt) <= 40 else prompt[:37] + "..."
        raise UserError(f"prompt {shown!r}: {prompt_length} tokens, but the model has only {limit} positions")
    return limit - prompt_length


def generation_kwargs(options, tokenizer):
    """Arguments for ``model.generate``: greedy at temperature 0, else sampling."""
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    kwargs = {"max_new_tokens": options.max_new_tokens, "repetition_penalty": options.repetition_penalty,
              "num_return_sequences": options.num_return_sequences, "pad_token_id": pad_token_id}
    if options.temperature == 0:
        # greedy: explicitly switch off sampling knobs a checkpoint's generation_config may set
        kwargs.update(do_sample=False, temperature=None, top_k=None, top_p=None)
    else:
        kwargs.update(do_sample=True, temperature=options.temperature,
                      top_k=DEFAULT_TOP_K if options.top_k is None else options.top_k, top_p=options.top_p)
    return kwargs


def encode_prompt(tokenizer, prompt, device):
    """Prompt ids without special tokens: a BERT-style [SEP] at the end would make the model stop."""
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    if ids.shape[1] == 0:
        raise UserError(f"prompt {prompt!r}: encodes to no tokens")
    return ids.to(device)


def decode(tokenizer, ids):
    text = tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=True)
    return SPACE_BETWEEN_CJK.sub("", text)


def generate_texts(model, tokenizer, prompts, options, skip_errors=False):
    """One result per prompt: ``{"prompt", "generations": [continuation, ...], "new_tokens": [...]}``.

    With a seed, each prompt is seeded on its own, so a prompt's output does not
    depend on which prompts came before it. With ``skip_errors`` a prompt that cannot be
    continued (no tokens, longer than the model) gives ``{"prompt", "error"}`` instead of
    stopping the others.
    """
    options.check()
    device = next(model.parameters()).device
    kwargs = generation_kwargs(options, tokenizer)
    results, warned = [], False
    for prompt in prompts:
        try:
            input_ids = encode_prompt(tokenizer, prompt, device)
            new_tokens = tokens_to_generate(model, input_ids.shape[1], options.max_new_tokens, prompt)
        except UserError as error:
            if not skip_errors:
                raise
            results.append({"prompt": prompt, "error": str(error)})
            continue
        if new_tokens < options.max_new_tokens and not warned:
            print(f"warning: --max-new-tokens {options.max_new_tokens}: the model has {position_limit(model)} "
                  "positions; continuations stop there (prompt + new tokens)", file=sys.stderr)
            warned = True
        if options.seed is not None:
            torch.manual_seed(options.seed)
        with torch.no_grad():
            output = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                    **dict(kwargs, max_new_tokens=new_tokens))
        continuations = output[:, input_ids.shape[1]:]  # (num_return_sequences, new tokens)
        results.append({"prompt": prompt,
                        "generations": [decode(tokenizer, row) for row in continuations],
                        "new_tokens": [int(row.shape[0]) for row in continuations],
                        "token_ids": [row.tolist() for row in continuations]})
    return results
