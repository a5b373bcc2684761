"""Encoder + head models. ``SequenceClassifier`` serves the classifier and long-document tasks."""
from pathlib import Path

import torch
from torch import nn

from common import modeldir
from common.choices import POOLINGS


def pool_hidden_states(hidden_states, attention_mask, pooling, pooler_output=None):
    """Reduce token states to one vector per sequence.

    hidden_states: (batch, seq, hidden); attention_mask: (batch, seq) -> (batch, hidden).
    """
    if pooling == "cls":
        return hidden_states[:, 0]
    if pooling == "pooler":
        return pooler_output
    mask = attention_mask.unsqueeze(-1).to(hidden_states.dtype)  # (batch, seq, 1)
    if pooling == "mean":
        return (hidden_states * mask).sum(1) / mask.sum(1).clamp(min=1.0)
    if pooling == "max":
        # padding must never win the max: fill it with the dtype's lowest value
        return hidden_states.masked_fill(mask == 0, torch.finfo(hidden_states.dtype).min).max(1).values
    raise ValueError(f"unknown pooling {pooling!r}")


class ClassificationHead(nn.Module):
    """Pooled vector -> [LayerNorm] -> Dropout -> Linear(num_labels).

    The optional LayerNorm helps a frozen encoder or mean pooling, whose output scale
    varies with sequence length, by giving the linear layer a fixed input range.
    """

    def __init__(self, hidden_size, num_labels, dropout=0.1, layernorm=False):
        super().__init__()
        self.layernorm = nn.LayerNorm(hidden_size) if layernorm else nn.Identity()
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(hidden_size, num_labels)

    def forward(self, pooled):
        return self.classifier(self.dropout(self.layernorm(pooled)))


class SequenceClassifier(nn.Module):
    """An AutoModel backbone with a pooling classification head."""

    def __init__(self, backbone, num_labels, pooling="cls", dropout=0.1, head_layernorm=False,
                 freeze_backbone=False):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}")
        self.backbone = backbone
        self.pooling = pooling
        self.freeze_backbone = freeze_backbone
        self.head = ClassificationHead(backbone.config.hidden_size, num_labels, dropout, head_layernorm)
        self.head_settings = {"num_labels": num_labels, "pooling": pooling, "dropout": dropout,
                              "head_layernorm": head_layernorm, "freeze_backbone": freeze_backbone}
        if freeze_backbone:
            self.backbone.requires_grad_(False)

    def encode(self, input_ids, attention_mask, token_type_ids=None):
        """Pooled sequence vectors, (batch, hidden)."""
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None and self.backbone.config.type_vocab_size > 1:
            inputs["token_type_ids"] = token_type_ids
        # a frozen encoder is a fixed feature extractor: no activations kept for backward
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_backbone):
            outputs = self.backbone(**inputs)
        return pool_hidden_states(outputs.last_hidden_state, attention_mask, self.pooling,
                                  getattr(outputs, "pooler_output", None))

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        """Logits, (batch, num_labels)."""
        return self.head(self.encode(input_ids, attention_mask, token_type_ids))

    @classmethod
    def from_pretrained_encoder(cls, args, num_labels, tokenizer, domain_texts=()):
        """A new classifier on ``args.model_name`` with the head options of ``args`` (embeddings grown
        for tokens --extend-vocab added to ``tokenizer``, placed from ``domain_texts`` where
        --new-token-init says so)."""
        from common.vocab import fit_embeddings_to_tokenizer
        backbone = modeldir.load_pretrained_backbone(args.model_name, args.trust_remote_code,
                                                     keep_pooler=args.pooling == "pooler")
        fit_embeddings_to_tokenizer(backbone, tokenizer, args.new_token_init, domain_texts)
        return cls(backbone, num_labels, args.pooling, args.dropout, args.head_layernorm, args.freeze_backbone)

    @classmethod
    def from_directory(cls, directory, device="cpu"):
        """Rebuild from a model directory: returns (model, tokenizer, toolkit, config)."""
        config, toolkit = modeldir.read_model_config(directory)
        head = toolkit["head"]
        backbone = modeldir.build_backbone_from_config(config, keep_pooler=head["pooling"] == "pooler")
        model = cls(backbone, head["num_labels"], head["pooling"], head.get("dropout", 0.1),
                    head.get("head_layernorm", False))
        modeldir.load_weights(model, directory)
        tokenizer = modeldir.load_tokenizer(str(Path(directory)))
        return model.to(device).eval(), tokenizer, toolkit, config
