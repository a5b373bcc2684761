"""Bi-encoder (vector) models: ``BertVectorModel`` and its ranking evaluation (pair data lives in
common/pairs.py, the losses in common/pair_losses.py).

A vector model maps a text to one embedding: backbone -> pooling (CLS or mean) ->
optional linear projection -> optional rotation (a model trained with --matryoshka-dims: see
``fit_rotation``) -> L2 normalisation. Queries and documents share the encoder
but are tokenized at their own maximum lengths (queries are short).
"""
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from common import data, modeldir
from common.choices import VECTOR_POOLINGS
from common.errors import UserError
from common.heads import pool_hidden_states
from common.pair_losses import compute_pair_loss
from common.pairs import encode_text_features

ROTATION_FILE = "rotation.safetensors"  # beside model.safetensors, which a resumed run loads strictly
ROTATION_SAMPLE = 2048  # texts a rotation is fitted on: the leading directions of a 1024-value embedding settle


# ---------------------------------------------------------------- the model

class BertVectorModel(nn.Module):
    """An AutoModel backbone, pooling, optional projection and L2 normalisation.

    ``forward`` returns (batch, dim) embeddings; ``encode(texts)`` tokenizes with the
    stored preprocessing and returns a CPU tensor. ``tokenizer`` is set by
    ``from_pretrained`` / ``from_backbone`` and saved by ``save_pretrained``.
    """

    def __init__(self, backbone, pooling="cls", projection_dim=None, normalize=True,
                 query_max_length=None, doc_max_length=None, max_length=512,
                 truncation_side="right", text_normalize=None, query_instruction=None, passage_instruction=None,
                 matryoshka_dims=None, matryoshka_weights=None):
        super().__init__()
        if pooling not in VECTOR_POOLINGS:
            raise ValueError(f"pooling must be one of {VECTOR_POOLINGS}")
        self.backbone = backbone
        self.pooling = pooling
        self.normalize = normalize
        hidden_size = backbone.config.hidden_size
        self.projection = nn.Linear(hidden_size, projection_dim) if projection_dim else None
        self.vector_settings = {"pooling": pooling, "projection_dim": projection_dim or None, "normalize": normalize,
                                "query_max_length": query_max_length or max_length,
                                "doc_max_length": doc_max_length or max_length, "max_length": max_length}
        if matryoshka_dims:
            self.vector_settings["matryoshka_dims"] = sorted(matryoshka_dims, reverse=True)
        if matryoshka_weights:  # how the sizes were weighted in the loss, in matryoshka_dims' order
            if len(matryoshka_weights) != len(matryoshka_dims or []):
                raise ValueError(f"{len(matryoshka_weights)} Matryoshka weights for sizes {matryoshka_dims}")
            self.vector_settings["matryoshka_weights"] = [
                weight for _, weight in sorted(zip(matryoshka_dims, matryoshka_weights), reverse=True)]
        self.preprocessing = {"max_length": max_length, "truncation_side": truncation_side,
                              "normalize": text_normalize}
        # instructions are text preprocessing: encode, the server and the ONNX path put them before the text
        for key, instruction in (("query_instruction", query_instruction), ("passage_instruction", passage_instruction)):
            if instruction:
                self.preprocessing[key] = instruction
        self.tokenizer = None
        # (dim, dim) orthogonal, applied after the projection (see fit_rotation); kept out of model.safetensors
        self.register_buffer("rotation", None, persistent=False)

    @property
    def dim(self):
        """Size of the output embeddings."""
        return self.projection.out_features if self.projection is not None else self.backbone.config.hidden_size

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        """Embeddings (batch, dim), L2-normalised when the model's ``normalize`` setting is on."""
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None and getattr(self.backbone.config, "type_vocab_size", 0) > 1:
            inputs["token_type_ids"] = token_type_ids
        hidden_states = self.backbone(**inputs).last_hidden_state  # (batch, seq, hidden)
        pooled = pool_hidden_states(hidden_states, attention_mask, self.pooling)  # (batch, hidden)
        if self.projection is not None:
            pooled = self.projection(pooled)  # (batch, dim)
        if self.rotation is not None:
            pooled = pooled @ self.rotation.T  # (batch, dim): lengths and angles unchanged
        # normalise in fp32: under bf16 autocast the norm of a 768-d vector loses digits
        return F.normalize(pooled.float(), dim=-1) if self.normalize else pooled

    def toolkit_block(self):
        """The ``toolkit`` block of config.json: everything serving and export need."""
        vector = dict(self.vector_settings) | ({"rotation": "pca"} if self.rotation is not None else {})
        return {"task": "vector", "vector": vector, "preprocessing": dict(self.preprocessing)}

    # ---- model directories

    def save_pretrained(self, directory, tokenizer=None):
        """Write a model directory (config.json with the toolkit block, model.safetensors, tokenizer, and
        the rotation when the model has one)."""
        tokenizer = tokenizer or self.tokenizer
        if tokenizer is None:
            raise ValueError("save_pretrained needs a tokenizer (pass one or load with from_pretrained)")
        modeldir.write_model_directory(directory, self, tokenizer, self.toolkit_block())
        if self.rotation is not None:
            save_file({"rotation": self.rotation.detach().to("cpu", torch.float32).contiguous()},
                      str(Path(directory) / ROTATION_FILE))
        return Path(directory)

    @classmethod
    def from_pretrained(cls, directory, device="cpu"):
        """Load a vector model directory written by ``save_pretrained`` (tokenizer included), in eval mode."""
        config, toolkit = modeldir.read_model_config(directory)
        if toolkit.get("task") != "vector":
            raise UserError(f"{Path(directory) / modeldir.CONFIG_FILE}: field 'toolkit.task': "
                            f"expected 'vector', got {toolkit.get('task')!r}")
        settings, preprocessing = toolkit.get("vector", {}), toolkit.get("preprocessing", {})
        model = cls(modeldir.build_backbone_from_config(config), settings.get("pooling", "cls"),
                    settings.get("projection_dim"), settings.get("normalize", True),
                    settings.get("query_max_length"), settings.get("doc_max_length"),
                    settings.get("max_length") or preprocessing.get("max_length", 512),
                    preprocessing.get("truncation_side", "right"), preprocessing.get("normalize"),
                    preprocessing.get("query_instruction"), preprocessing.get("passage_instruction"),
                    settings.get("matryoshka_dims"), settings.get("matryoshka_weights"))
        modeldir.load_weights(model, directory)
        if settings.get("rotation"):
            model.rotation = load_rotation(directory, model.dim)
        model.tokenizer = modeldir.load_tokenizer(str(directory))
        return model.to(device).eval()

    @classmethod
    def from_backbone(cls, name_or_path, trust_remote_code=False, flag="--model-name", **settings):
        """A new vector model on a pretrained encoder (hub name or local path, given by the option ``flag``);
        ``settings`` go to __init__."""
        backbone = modeldir.load_pretrained_backbone(name_or_path, trust_remote_code, flag=flag)
        model = cls(backbone, **settings)
        model.tokenizer = modeldir.load_tokenizer(name_or_path, trust_remote_code)
        from common.vocab import fit_embeddings_to_tokenizer
        fit_embeddings_to_tokenizer(backbone, model.tokenizer, "random")  # a tokenizer longer than its embeddings
        return model

    # ---- inference

    def max_length_for(self, side):
        """Token budget for a 'query' or 'document' text."""
        key = "doc_max_length" if side in ("doc", "document") else "query_max_length"
        return self.vector_settings.get(key) or self.preprocessing["max_length"]

    @torch.no_grad()
    def encode(self, texts, batch_size=32, normalize=True, max_length=None, side="query", dim=None, prompts=None):
        """Embed a text or a list of texts with the stored preprocessing -> CPU float tensor (n, dim).

        ``side`` ("query" or "document") picks the max length and the stored instruction; ``prompts``
        (one per text, None for none) are records' own instructions, used instead of it.
        ``dim``: the first ``dim`` values of each embedding, one of the sizes the model was trained
        for with --matryoshka-dims (or its full size). ``normalize=True`` L2-normalises (after
        cutting) even when the model's own setting is off. Texts are run longest first (less
        padding) and returned in input order.
        """
        if self.tokenizer is None:
            raise ValueError("encode needs a tokenizer: load the model with from_pretrained")
        dim = check_dimension(dim, self.dim, self.vector_settings.get("matryoshka_dims"))
        texts = [texts] if isinstance(texts, str) else list(texts)
        features = encode_text_features(self.tokenizer, texts, max_length or self.max_length_for(side),
                                        self.preprocessing, side="document" if side in ("doc", "document") else side,
                                        prompts=prompts)
        was_training = self.training
        self.eval()
        device = next(self.parameters()).device
        collate = data.PaddingCollator(self.tokenizer.pad_token_id)
        order = np.argsort([-len(feature["input_ids"]) for feature in features], kind="stable")
        outputs = torch.empty((len(texts), self.dim))
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            batch = modeldir.to_device(collate([features[row] for row in rows]), device)
            outputs[torch.as_tensor(rows)] = self(**batch).float().cpu()
        self.train(was_training)
        outputs = outputs[:, :dim]
        return F.normalize(outputs, dim=-1) if normalize else outputs


def fit_rotation(model, queries, documents, query_prompts=None):
    """An orthogonal (dim, dim) matrix that turns the model's embeddings of these texts so that their
    first values carry the most of them: uncentred PCA, the rows being the eigenvectors of the
    embeddings' second moment, largest first.

    Turning changes no length and no angle, so full-size similarities are exactly the unturned model's;
    a Matryoshka cut then keeps the strongest directions instead of whichever values the encoder put
    first (measured in bench/README.md). Fewer texts than values leave the weakest directions arbitrary
    but still orthogonal."""
    embeddings = torch.cat([model.encode(queries, side="query", prompts=query_prompts),
                            model.encode(documents, side="document")]).double()  # (texts, dim), unit rows
    _, directions = torch.linalg.eigh(embeddings.T @ embeddings)  # columns, weakest first
    return directions.flip(-1).T.float().contiguous()


def load_rotation(directory, dim):
    """The stored rotation of a model directory whose config.json says it has one, checked."""
    path = Path(directory) / ROTATION_FILE
    try:
        rotation = load_file(str(path))["rotation"].float()
    except (SafetensorError, OSError, KeyError, ValueError) as error:
        raise UserError(f"{path}: unreadable (config.json's toolkit.vector.rotation needs it): "
                        f"{modeldir.describe_load_error(error)}") from None
    if tuple(rotation.shape) != (dim, dim):
        raise UserError(f"{path}: expected a {dim}x{dim} rotation for the {dim}-value embeddings, "
                        f"got shape {tuple(rotation.shape)}")
    if not torch.allclose(rotation @ rotation.T, torch.eye(dim), atol=1e-3):  # also false for NaN
        raise UserError(f"{path}: not an orthogonal matrix (it would change the model's similarities)")
    return rotation


class PairEncoder(nn.Module):
    """Runs the shared encoder on queries and documents in one ``forward``.

    DDP synchronises gradients per ``forward``/``backward`` pair, so both encoder passes
    must happen inside one module call.
    """

    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, query, document):
        """(query embeddings, document embeddings), each (batch, dim); a side passed as None gives None
        (GradCache embeds the two sides in chunks of their own)."""
        return tuple(None if side is None else self.encoder(**side) for side in (query, document))


def check_dimension(dim, full_dim, matryoshka_dims):
    """``dim`` if the model was trained for it (its full size, or one of --matryoshka-dims), else a
    UserError listing the sizes it has; None means the full size."""
    if dim is None:
        return full_dim
    allowed = sorted({full_dim, *(matryoshka_dims or [])}, reverse=True)
    if isinstance(dim, bool) or not isinstance(dim, int) or dim not in allowed:
        trained = "was trained with --matryoshka-dims" if matryoshka_dims else "was not trained with --matryoshka-dims"
        raise UserError(f"dimension {dim!r}: this model {trained}; it gives embeddings of "
                        f"{', '.join(map(str, allowed))} values")
    return dim


# ---------------------------------------------------------------- ranking evaluation

def embed_unique(model, texts, side, batch_size=32, dim=None, prompts=None):
    """Embeddings (len(texts), dim) computing each distinct (prompt, text) once (``prompts``: one
    instruction per text, None for the stored one)."""
    keys = list(zip(prompts or [None] * len(texts), texts))
    unique = list(dict.fromkeys(keys))
    vectors = model.encode([text for _, text in unique], batch_size=batch_size, side=side, dim=dim,
                           prompts=[prompt for prompt, _ in unique] if prompts else None)
    row = {key: index for index, key in enumerate(unique)}
    return vectors[torch.tensor([row[key] for key in keys], dtype=torch.long)]


def evaluate_pairs(model, pairs, loss_name="mse", temperature=0.05, batch_size=32, dim=None):
    """Score every pair once; return (per-query (relevances, scores) for ranking metrics, mean loss).

    The loss is computed over consecutive batches of ``batch_size`` pairs, as the
    validation loop does, so CoSENT and InfoNCE see the same in-batch groups. ``dim``: the
    embeddings cut to that many values (a --matryoshka-dims size).
    """
    query_vectors, doc_vectors = embed_pairs(model, pairs, batch_size, dim)
    groups = group_scores(pairs, F.cosine_similarity(query_vectors, doc_vectors, dim=-1).numpy())
    doc_ids = {document: index for index, document in enumerate(dict.fromkeys(p.document for p in pairs))}
    loss_sum = 0.0
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        batch = {"rel": torch.tensor([p.rel for p in chunk]), "weight": torch.tensor([p.weight for p in chunk]),
                 "doc_id": torch.tensor([doc_ids[p.document] for p in chunk])}
        loss = compute_pair_loss(loss_name, query_vectors[start:start + batch_size],
                                 doc_vectors[start:start + batch_size], batch, temperature)
        loss_sum += float(loss) * len(chunk)
    return groups, loss_sum / len(pairs)


def score_pairs(model, pairs, batch_size=32, dim=None):
    """Per-query (relevances, scores) of the pairs for ranking metrics, without a loss (validation)."""
    query_vectors, doc_vectors = embed_pairs(model, pairs, batch_size, dim)
    return group_scores(pairs, F.cosine_similarity(query_vectors, doc_vectors, dim=-1).numpy())


def embed_pairs(model, pairs, batch_size, dim):
    """(query vectors, document vectors), one row per pair, each distinct text embedded once."""
    # a query group's own prompt replaces the stored instruction, as in training
    return (embed_unique(model, [pair.query for pair in pairs], "query", batch_size, dim,
                         [pair.prompt for pair in pairs]),
            embed_unique(model, [pair.document for pair in pairs], "document", batch_size, dim))


def group_scores(pairs, cosines):
    """[(relevances, scores)] per query, in first-seen order, from each pair's cosine."""
    groups = {}
    for pair, cosine in zip(pairs, cosines):
        relevances, scores = groups.setdefault(pair.query, ([], []))
        relevances.append(pair.rel)
        scores.append(float(cosine))
    return list(groups.values())
