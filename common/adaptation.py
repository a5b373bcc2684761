"""The task's own vocabulary and domain before the task: ``--extend-vocab`` over the training texts and
``--unlabeled-path``, then ``--mlm-adapt-steps`` of masked-language-model training.

Rows that --extend-vocab adds start without meaning, and a pretrained encoder may never have seen
the domain's text. MLM steps on in-domain text can teach both before the task loss does:
domain-adaptive pretraining (Gururangan et al., 2020, "Don't Stop Pretraining"). It is opt-in: on
4k Chinese reviews, 250 steps on the training texts alone lowered test accuracy, and 500 steps with
10,868 more unlabeled reviews (--unlabeled-path) did not raise it (bench/README.md); longer adaptation
on more text is untested. The MLM output layer is tied to the input embeddings, as in BERT's
pretraining, so every masked prediction also trains the added rows. A sentence encoder usually ships
without an MLM head: it starts new, and the linear warmup keeps its first random gradients small.
"""
from pathlib import Path

import torch
from tqdm import tqdm

from common import data, optimization
from common.errors import UserError

MASK_PROBABILITY = 0.15  # BERT's: of those, 80% become [MASK], 10% a random token, 10% stay


# The added rows learn at this multiple of --learning-rate unless --new-token-lr says otherwise: on 4k Chinese
# reviews with ~2,100 added characters, 10x gave +4.2 and +1.9 points of test accuracy (seeds 13, 14;
# bench/README.md)
NEW_TOKEN_LR_FACTOR = 10


def resolve_vocabulary_options(args):
    """Refuse combinations whose effect would silently be nothing; then give --new-token-lr its default."""
    adapts = args.mlm_adapt_steps > 0
    if getattr(args, "freeze_backbone", False) and args.extend_vocab > 0 and not adapts:
        raise UserError("--freeze-backbone with --extend-vocab: the new tokens' embeddings would never be "
                        "trained; add --mlm-adapt-steps N, or drop one of the two")
    if args.new_token_lr is not None and args.extend_vocab == 0:
        raise UserError("--new-token-lr applies to tokens added by --extend-vocab: add --extend-vocab MIN_COUNT")
    if args.unlabeled_path and args.extend_vocab == 0 and not adapts:
        raise UserError("--unlabeled-path is read only for --extend-vocab and --mlm-adapt-steps: add one of them")
    if args.extend_vocab > 0 and args.new_token_lr is None:
        args.new_token_lr = NEW_TOKEN_LR_FACTOR * args.learning_rate


def prepare_domain(args, tokenizer, cleaned_train_texts, clean):
    """--extend-vocab over the training texts, already cleaned as in training (an iterable, read only when an
    option needs it), and --unlabeled-path (``clean`` applied here); return the texts --mlm-adapt-steps
    trains on (none when neither option is on)."""
    if args.extend_vocab == 0 and args.mlm_adapt_steps == 0:
        return []
    texts = list(cleaned_train_texts)
    if args.unlabeled_path:
        texts += [data.clean_text(clean, text, where)
                  for where, text in read_unlabeled_records(args.unlabeled_path, args.text_field or "text")]
    if args.extend_vocab > 0:
        from common.vocab import extend_for_training
        extend_for_training(tokenizer, texts, args.extend_vocab)
    return texts


def read_unlabeled_records(path, text_field="text"):
    """(where, text) of each text of --unlabeled-path (one per line in a .txt file, else the ``text_field`` of
    every record); ``where`` names its file line or record and field."""
    if not Path(path).is_file():
        raise UserError(f"--unlabeled-path {path}: no such file")
    if Path(path).suffix.lower() == ".txt":
        records = [(f"{path} line {number}", line.strip())
                   for number, line in enumerate(data.read_text_file(path).splitlines(), start=1) if line.strip()]
    else:
        records = [(record.where(text_field), data.require_text(record, text_field))
                   for record in data.read_records(path)]
    if not records:
        raise UserError(f"--unlabeled-path {path}: no texts found")
    return records


def adapt_before_training(backbone, tokenizer, texts, args, resume_from, show=True):
    """--mlm-adapt-steps on a fresh run; a resumed run's checkpoint already holds the adapted weights."""
    if args.mlm_adapt_steps > 0 and resume_from is None:
        adapt_with_mlm(backbone, tokenizer, texts, args, show)


def adapt_with_mlm(backbone, tokenizer, texts, args, show=True):
    """Train ``backbone`` in place for ``args.mlm_adapt_steps`` masked-LM steps on ``texts``."""
    from transformers import DataCollatorForLanguageModeling
    device, precision, steps = args.device_obj, args.precision_obj, args.mlm_adapt_steps
    head = build_mlm_head(backbone).to(device)
    mlm_model = torch.nn.ModuleDict({"backbone": backbone, "head": head}).train()  # one module to optimize
    examples = sorted(tokenize_for_mlm(tokenizer, texts, args.max_length), key=lambda e: len(e["input_ids"]))
    if not examples:
        raise UserError("--mlm-adapt-steps: none of the texts has a token to mask")
    mask = DataCollatorForLanguageModeling(tokenizer, mlm_probability=MASK_PROBABILITY, seed=args.seed)
    optimizer = optimization.build_optimizer(mlm_model, args.learning_rate, args.weight_decay, args.adam_epsilon,
                                             device)
    optimization.scale_new_token_updates(optimizer, mlm_model, args)
    warmup_steps = optimization.resolve_warmup_steps(steps, warmup_ratio=0.1)
    scheduler = optimization.build_scheduler(optimizer, "linear", warmup_steps, steps)
    scaler = optimization.build_grad_scaler(precision, device)
    sampler = torch.Generator().manual_seed(args.seed)
    losses = []
    for _ in tqdm(range(steps), desc="mlm adaptation", mininterval=1.0, disable=not show):
        masked_batch = mask(draw_batch(examples, args.batch_size, sampler))
        batch = {name: tensor.to(device) for name, tensor in masked_batch.items()}
        with precision.autocast(device):
            loss = masked_token_loss(backbone, head, batch)
        scaler.scale(loss).backward()
        optimization.optimizer_step(mlm_model, optimizer, scheduler, scaler, args.max_grad_norm)
        losses.append(loss.item())
    window = max(1, min(50, steps // 10))  # mean over the first and last tenth: one batch is noisy
    if show:
        print(f"MLM adaptation: {steps} steps on {len(texts)} texts, masked-token loss "
              f"{sum(losses[:window]) / window:.3f} -> {sum(losses[-window:]) / window:.3f}")
    backbone.zero_grad(set_to_none=True)


def draw_batch(examples_by_length, batch_size, generator):
    """A random run of ``batch_size`` neighbours in the length-sorted examples (with replacement across
    steps, so any step count works): texts of one length pad little, where a random draw from review data
    pads most batches to the one long text among them, for ~3x the compute."""
    start = torch.randint(max(1, len(examples_by_length) - batch_size + 1), (), generator=generator).item()
    return examples_by_length[start:start + batch_size]


def build_mlm_head(backbone):
    """A new masked-LM head for ``backbone``'s architecture, its output layer tied to the input embeddings."""
    from transformers import AutoModelForMaskedLM
    mlm_model = AutoModelForMaskedLM.from_config(backbone.config)
    head = next((getattr(mlm_model, name) for name in ("cls", "lm_head") if hasattr(mlm_model, name)), None)
    if head is None:
        raise UserError(f"--mlm-adapt-steps: no masked-LM head known for {type(mlm_model).__name__}")
    mlm_model.get_output_embeddings().weight = backbone.get_input_embeddings().weight
    return head


def masked_token_loss(backbone, head, batch):
    """Cross-entropy of the masked positions only: scoring every position against a 30k-row vocabulary
    made a step ~6x slower (batch 32 x 128 tokens on a CPU) for the same loss."""
    hidden = backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    masked = batch["labels"] != -100  # (batch, length)
    if not masked.any():  # short texts can draw no mask at all: nothing to learn from this batch
        return hidden.sum() * 0.0
    logits = head(hidden[masked])  # (masked tokens, vocabulary)
    return torch.nn.functional.cross_entropy(logits.float(), batch["labels"][masked])


def tokenize_for_mlm(tokenizer, texts, max_length):
    """One {input_ids, attention_mask, special_tokens_mask} dict per non-empty text, cut at ``max_length``."""
    encoded = tokenizer(texts, truncation=True, max_length=max_length, return_special_tokens_mask=True,
                        return_token_type_ids=False)
    names = list(encoded.keys())
    examples = [dict(zip(names, values)) for values in zip(*(encoded[name] for name in names))]
    return [example for example in examples if len(example["input_ids"]) > 2]
