"""Loading any model this toolkit writes and running it with its training-time preprocessing.

A model is either a model directory (``config.json`` with a ``toolkit`` block, weights,
tokenizer) or an ONNX export from ``export_onnx.py``: ``model.onnx`` with
``model.preprocessing.json`` (the toolkit block and id2label) and ``tokenizer/`` beside it.
Both load into a ``LoadedModel`` whose ``run(batch)`` maps a padded batch of int64
inputs to logits (classification, long-document chunks) or embeddings (vector), so
everything after loading is the same for both backends.
"""
import copy
import json
import math
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from common import data, fusion, modeldir, problem_types
from common.errors import UserError, short_repr
from common.text import build_normalizer

TASKS = modeldir.TASKS
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
PREPROCESSING_SUFFIX = ".preprocessing.json"
TOKENIZER_DIR = "tokenizer"


# ---------------------------------------------------------------- the loaded model

@dataclass
class LoadedModel:
    """A model ready to run: its task, preprocessing, tokenizer and a batch runner.

    ``run(batch)`` takes ``{"input_ids", "attention_mask", "token_type_ids"}`` LongTensors
    (batch, seq) and returns a float32 numpy array (batch, num_labels or dim).
    """
    task: str
    toolkit: dict
    tokenizer: object
    run: object
    backend: str
    source: str
    id2label: dict = field(default_factory=dict)
    torch_model: object = None
    config: object = None
    baseline: object = None  # --fuse-baseline's TF-IDF baseline (common/fusion.py), when the model has one

    @property
    def baseline_weight(self):
        """The baseline's share in the fused probabilities (0 when the model is not fused)."""
        return (self.toolkit.get("baseline_fusion") or {}).get("weight", 0.0) if self.baseline is not None else 0.0

    @property
    def preprocessing(self):
        return self.toolkit.get("preprocessing", {})

    @property
    def label_names(self):
        return [self.id2label[index] for index in range(len(self.id2label))]


def onnx_companions(onnx_path):
    """(preprocessing json, tokenizer dir) that export_onnx.py writes beside ``onnx_path``."""
    onnx_path = Path(onnx_path)
    return onnx_path.with_name(onnx_path.stem + PREPROCESSING_SUFFIX), onnx_path.parent / TOKENIZER_DIR


def resolve_device(name):
    """``auto`` -> cuda when available, else cpu; a device this machine lacks is a UserError.

    Checked before any loading, so ``--device cuda`` on a CPU box is one line, not a
    traceback from deep inside ``.to(device)``.
    """
    name = str(name)
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"--device {name}: CUDA is not available on this machine (use --device cpu or auto)")
        index = int(name.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if name == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"--device {name}: MPS is not available on this machine (use --device cpu or auto)")
    return name


def load_model(model_path, backend="auto", device="cpu", tokenizer_path=None):
    """Load a model directory (torch, or its export when ``backend="onnx"``) or an .onnx file.

    ``backend="onnx"`` with a model directory is a UserError: export it first.
    """
    path = Path(model_path)
    is_onnx = path.suffix == ".onnx"
    if not path.exists():
        raise UserError(f"--model-path {model_path}: not found")
    if is_onnx and not path.is_file():
        raise UserError(f"--model-path {model_path}: not a regular file")
    if is_onnx and backend == "torch":
        raise UserError(f"--model-path {model_path}: an ONNX file needs --backend onnx or auto")
    if not is_onnx and backend == "onnx":
        raise UserError(f"--model-path {model_path}: --backend onnx needs an .onnx file "
                        "(export the directory with export_onnx.py)")
    if is_onnx:
        return load_onnx_model(path, device, tokenizer_path)
    return load_torch_model(path, device)


def load_torch_model(directory, device="cpu"):
    """A model directory of any task as a LoadedModel with the torch backend."""
    config, toolkit = modeldir.read_model_config(directory)
    task = toolkit["task"]  # one of TASKS: read_model_config checked the toolkit block
    device = torch.device(device)
    if task == "vector":
        model, tokenizer = _load_vector_model(directory, device)
    else:
        from common.heads import SequenceClassifier
        model, tokenizer, toolkit, config = SequenceClassifier.from_directory(directory, device)
    check_stored_lengths(toolkit, config, Path(directory) / modeldir.CONFIG_FILE)
    # a vector model's config carries transformers' placeholder labels (LABEL_0, LABEL_1): not ours
    id2label = {} if task == "vector" else check_id2label(config.id2label, toolkit["head"]["num_labels"],
                                                          Path(directory) / modeldir.CONFIG_FILE)
    runner = TorchRunner(model, device)
    baseline = fusion.load_for_model(toolkit, Path(directory) / fusion.BASELINE_FILE, len(id2label),
                                     Path(directory) / modeldir.CONFIG_FILE)
    return LoadedModel(task, toolkit, tokenizer, runner, "torch", str(directory), id2label, model, config, baseline)


def check_stored_lengths(toolkit, config, where):
    """Stored max lengths must fit the position embeddings: past them the embedding lookup fails mid-batch."""
    limit = getattr(config, "max_position_embeddings", None)
    if not isinstance(limit, int):
        return
    for block in ("preprocessing", "vector"):
        for name, value in (toolkit.get(block) or {}).items():
            if name.endswith("max_length") and isinstance(value, int) and value > limit:
                raise UserError(f"{where}: field 'toolkit.{block}.{name}': {value} exceeds the model's "
                                f"{limit} positions")


def check_id2label(raw, num_labels, where):
    """{id: name} with ids exactly 0..num_labels-1 (the head's outputs), or a UserError naming the file."""
    try:
        id2label = {int(index): str(name) for index, name in (raw or {}).items()}
    except (TypeError, ValueError, AttributeError):
        id2label = None
    if id2label is None or sorted(id2label) != list(range(num_labels)):
        raise UserError(f"{where}: field 'id2label': expected names for the ids 0..{num_labels - 1} "
                        f"(the head has {num_labels} outputs)")
    return id2label


def _load_vector_model(directory, device):
    from common.vector import BertVectorModel
    model = BertVectorModel.from_pretrained(str(directory), device)
    return model, model.tokenizer


def load_onnx_model(onnx_path, device="cpu", tokenizer_path=None):
    """An export_onnx.py export (.onnx + preprocessing json + tokenizer) as a LoadedModel.

    The graph is loaded first: a broken .onnx is the problem to report, even when the
    files that should sit beside it are missing too.
    """
    preprocessing_file, default_tokenizer = onnx_companions(onnx_path)
    session = create_onnx_session(onnx_path, device)
    meta = read_preprocessing_file(preprocessing_file, onnx_path)
    tokenizer = modeldir.load_tokenizer(str(tokenizer_path or default_tokenizer))
    id2label = {}
    if meta["task"] != "vector":
        outputs = session.get_outputs()[0].shape[-1]  # the logits' width, when the graph fixes it
        num_labels = outputs if isinstance(outputs, int) else len(meta.get("id2label") or {})
        id2label = check_id2label(meta.get("id2label"), num_labels, preprocessing_file)
    baseline = fusion.load_for_model(meta["toolkit"], fusion.baseline_path_of_onnx(onnx_path), len(id2label),
                                     preprocessing_file)
    return LoadedModel(meta["task"], meta["toolkit"], tokenizer, OnnxRunner(session, onnx_path), "onnx",
                       str(onnx_path), id2label, baseline=baseline)


def read_preprocessing_file(preprocessing_file, onnx_path):
    """The ``<name>.preprocessing.json`` of an export, its toolkit block checked like a model directory's."""
    if not preprocessing_file.is_file():
        raise UserError(f"{onnx_path}: no {preprocessing_file.name} beside it "
                        "(export with export_onnx.py, which writes the preprocessing config)")
    try:
        meta = json.loads(preprocessing_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as error:
        raise UserError(f"{preprocessing_file}: invalid JSON ({str(error).splitlines()[0]})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("toolkit"), dict):
        raise UserError(f"{preprocessing_file}: field 'toolkit': missing (not written by export_onnx.py)")
    meta["toolkit"].setdefault("task", meta.get("task"))
    modeldir.check_toolkit_block(meta["toolkit"], preprocessing_file)
    if meta.get("task") != meta["toolkit"]["task"]:
        raise UserError(f"{preprocessing_file}: field 'task': {meta.get('task')!r} differs from toolkit.task")
    limit = export_position_limit(meta, preprocessing_file, onnx_path)
    check_stored_lengths(meta["toolkit"], types.SimpleNamespace(max_position_embeddings=limit), preprocessing_file)
    return meta


def export_position_limit(meta, preprocessing_file, onnx_path):
    """The positions an export's graph has: recorded by export_onnx.py as ``max_position_embeddings``, or,
    in an export from before it was recorded, the rows of the graph's position-embedding table (None when
    the graph has none by that name). A stored max length past it (a hand-edited or damaged record)
    failed inside onnxruntime at the first text that long."""
    limit = meta.get("max_position_embeddings")
    if limit is not None:
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 2:
            raise UserError(f"{preprocessing_file}: field 'max_position_embeddings': expected a whole number >= 2, "
                            f"got {short_repr(limit)}")
        return limit
    return graph_position_limit(onnx_path)


def graph_position_limit(onnx_path):
    """Rows of the position-embedding initializer of an .onnx graph, or None (read only for older exports:
    it parses the whole graph)."""
    import onnx
    try:
        graph = onnx.load(str(onnx_path), load_external_data=False).graph
    except Exception:  # noqa: BLE001 - onnxruntime loaded it; without a readable table there is nothing to check
        return None
    for initializer in graph.initializer:
        if "position_embeddings" in initializer.name and len(initializer.dims) == 2:
            return int(initializer.dims[0])
    return None


def create_onnx_session(onnx_path, device="cpu"):
    """An onnxruntime session on CUDA when asked for and available, else on CPU.

    Its CPU threads are torch's: onnxruntime's own default counts every core of the machine, so a process
    limited to fewer (taskset or a container's cpuset, OMP_NUM_THREADS=1 under torchrun, a --workers server
    process) ran two threads per core and took twice as long at batch 1.
    """
    import onnxruntime as ort
    providers = ["CPUExecutionProvider"]
    if str(device).startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    try:
        return ort.InferenceSession(str(onnx_path), options, providers=providers)
    except Exception as error:  # onnxruntime raises its own exception types for unreadable graphs
        raise UserError(f"{onnx_path}: onnxruntime cannot load it ({str(error).splitlines()[0]})") from None


class TorchRunner:
    """Batch -> numpy outputs through a torch module, without gradients."""

    def __init__(self, model, device):
        self.model = model
        self.device = device

    def __call__(self, batch):
        inputs = modeldir.to_device(batch, self.device)
        with torch.no_grad():
            outputs = self.model(inputs["input_ids"], inputs["attention_mask"], inputs.get("token_type_ids"))
        return outputs.float().cpu().numpy()


class OnnxRunner:
    """Batch -> numpy outputs through an onnxruntime session (feeds only the graph's inputs)."""

    def __init__(self, session, source=None):
        self.session = session
        self.source = source
        self.input_names = [node.name for node in session.get_inputs()]

    def __call__(self, batch):
        feeds = {name: batch[name].cpu().numpy().astype(np.int64) for name in self.input_names}
        try:
            return self.session.run(None, feeds)[0].astype(np.float32)
        except Exception as error:  # onnxruntime's own exception types: a graph that does not fit its inputs
            raise UserError(f"{self.source}: onnxruntime failed to run it ({str(error).splitlines()[0]})") from None


# ---------------------------------------------------------------- preprocessing and batching

def encode_inputs(loaded, texts, contexts=None, max_length=None):
    """Encode exactly as in training: stored normalization, max length, truncation side, context pair."""
    preprocessing = loaded.preprocessing
    normalize = build_normalizer(preprocessing.get("normalize"))  # the identity when training used none
    texts = [normalize(text) for text in texts]
    contexts = None if contexts is None else [normalize(c) if c else c for c in contexts]
    return data.encode_texts(loaded.tokenizer, texts, contexts, max_length or preprocessing.get("max_length", 128),
                             preprocessing.get("truncation_side", "right"))


def override_max_length(loaded, max_length):
    """Use ``max_length`` instead of the stored max length(s); returns {setting: stored value} of those it changed.

    A vector model's query and document max lengths are replaced too, so the flag means one
    thing whatever the task. The limit is the backbone's position embeddings, or for an ONNX
    export (which keeps no backbone config) the length it was exported and validated at.
    """
    stored = {"max_length": loaded.preprocessing.get("max_length", 128)}
    if loaded.task == "vector":
        stored.update(query_max_length=vector_max_length(loaded, "query"),
                      doc_max_length=vector_max_length(loaded, "doc"))
    limit = loaded.config.max_position_embeddings if loaded.config is not None else stored["max_length"]
    if not 3 <= max_length <= limit:
        raise UserError(f"--max-length {max_length}: must be between 3 and {limit} for {loaded.source}")
    toolkit = copy.deepcopy(loaded.toolkit)
    toolkit.setdefault("preprocessing", {})["max_length"] = max_length
    if loaded.task == "vector":
        toolkit.setdefault("vector", {}).update(query_max_length=max_length, doc_max_length=max_length)
    if loaded.task == "longdoc":
        from common import longdoc
        longdoc.check_settings(longdoc.LongdocSettings.from_toolkit(toolkit), max_length)
    loaded.toolkit = toolkit
    return {name: value for name, value in stored.items() if value != max_length}


def length_sorted_batches(lengths, batch_size, sort_by_length=True):
    """Index batches, longest first when sorting, so each batch pads to similar lengths."""
    order = np.argsort(-np.asarray(lengths), kind="stable") if sort_by_length else np.arange(len(lengths))
    return [order[start:start + batch_size].tolist() for start in range(0, len(order), batch_size)]


def progress_bar(iterable, description, enabled=True, unit="batch", total=None):
    """``iterable`` with a tqdm bar on standard error when ``enabled`` and standard error is a terminal.

    ``disable=None`` is tqdm's "only on a terminal": piped or logged runs get no bar lines.
    """
    from tqdm.auto import tqdm
    return tqdm(iterable, desc=description, unit=unit, total=total, leave=False, file=sys.stderr,
                disable=None if enabled else True)


def run_batched(loaded, features, batch_size=32, sort_by_length=True, progress=False):
    """Run ``loaded`` over encoded features in length-sorted batches; rows come back in input order.

    ``progress``: show a bar over the batches (on a terminal only).
    """
    if not features:
        return np.zeros((0, 0), dtype=np.float32)
    collator = data.PaddingCollator(loaded.tokenizer.pad_token_id)
    lengths = [len(feature["input_ids"]) for feature in features]
    outputs = [None] * len(features)
    batches = length_sorted_batches(lengths, batch_size, sort_by_length)
    for indices in progress_bar(batches, "inference", enabled=progress):
        batch_outputs = loaded.run(collator([features[index] for index in indices]))
        for index, row in zip(indices, batch_outputs):
            outputs[index] = row
    return np.stack(outputs)


# ---------------------------------------------------------------- classification

def softmax(logits, temperature=1.0):
    """Row-wise softmax of logits / temperature (numerically stable)."""
    if not math.isfinite(temperature) or temperature <= 0:  # NaN passes a plain "<= 0" test
        raise UserError(f"--temperature must be a finite number > 0, got {temperature}")
    logits = np.asarray(logits, dtype=np.float64)
    # shift before dividing: with a tiny temperature, logits / T alone overflows to inf and inf - inf is NaN
    scaled = (logits - logits.max(axis=-1, keepdims=True)) / temperature
    exp = np.exp(scaled)
    return exp / exp.sum(axis=-1, keepdims=True)


def check_finite_outputs(outputs, loaded):
    """NaN or inf outputs (corrupted weights) would print as NaN, which is not JSON: refuse them."""
    if not is_finite(outputs):
        raise UserError(f"{loaded.source}: the model produced NaN or infinite outputs (corrupted weights?)")
    return outputs


def resolve_temperature(loaded, temperature=None):
    """The flag's temperature, else the calibrated one stored with the model, else 1.0."""
    if temperature is not None:
        return float(temperature)
    return stored_temperature(loaded.toolkit)


def stored_temperature(toolkit):
    """The calibrated temperature a model's toolkit block stores, else 1.0."""
    return float(toolkit.get("temperature") or 1.0)


def classification_result(text, context, probabilities, label_names, temperature, top_k=None):
    """One prediction as a dict: input, temperature, predicted label and id, every label's probability."""
    best = int(np.argmax(probabilities))
    result = {"input": text}
    if context:
        result["context"] = context
    result.update({"temperature": temperature, "label": label_names[best], "label_id": best,
                   "probability": round(float(probabilities[best]), 6),
                   "probabilities": {name: round(float(p), 6) for name, p in zip(label_names, probabilities)}})
    if top_k:
        ranked = np.argsort(-probabilities, kind="stable")[:top_k]
        result["top_k"] = [{"label": label_names[i], "label_id": int(i),
                            "probability": round(float(probabilities[i]), 6)} for i in ranked]
    return result


def classify(loaded, texts, contexts=None, temperature=None, batch_size=32, top_k=None, sort_by_length=True,
             progress=False, threshold=None, with_logits=False):
    """Classify texts (with optional contexts) -> list of result dicts in input order, in the shape of the
    model's problem type (common/problem_types.py): one label, the labels above their thresholds
    (``threshold`` overrides the stored ones), or a score. ``with_logits``: each result also holds
    ``logits``, the head's outputs in label order (before temperature, softmax, sigmoid or target unscaling)."""
    temperature = resolve_temperature(loaded, temperature)
    features = encode_inputs(loaded, texts, contexts)
    logits = check_finite_outputs(run_batched(loaded, features, batch_size, sort_by_length, progress), loaded)
    results = decision_results(loaded, texts, contexts, logits, temperature, top_k, threshold)
    return [with_logits_field(result, row) if with_logits else result for result, row in zip(results, logits)]


def decision_results(loaded, texts, contexts, logits, temperature, top_k=None, threshold=None):
    """One result dict per input from its logits (inputs, labels): the model's problem type decides the
    shape; a model fused with a baseline (common/fusion.py) gives the fused probabilities and names the
    baseline's share as ``baseline_weight``."""
    contexts = contexts or [None] * len(texts)
    names = loaded.label_names or [str(index) for index in range(np.shape(logits)[-1])]
    if loaded.baseline is None:
        problem = problem_types.from_toolkit(loaded.toolkit)
        return [problem.result(text, context, row, names, temperature, top_k, threshold)
                for text, context, row in zip(texts, contexts, logits)]
    weight = loaded.baseline_weight
    probabilities = fusion.fuse(softmax(logits, temperature),
                                loaded.baseline.probabilities(fusion.baseline_inputs(texts, contexts)), weight)
    return [dict(classification_result(text, context, row, names, temperature, top_k), baseline_weight=weight)
            for text, context, row in zip(texts, contexts, probabilities)]


def with_logits_field(result, logits):
    """``result`` with ``logits`` (a row of the head's outputs) as a list of floats."""
    return {**result, "logits": [float(value) for value in logits]}


# ---------------------------------------------------------------- rerankers

RERANK_PROBLEM_TYPE = "rerank"


def is_reranker(loaded):
    """A classification model trained to score (query, document) pairs: ``toolkit["problem_type"] == "rerank"``."""
    return loaded.task == "classification" and loaded.toolkit.get("problem_type") == RERANK_PROBLEM_TYPE


def check_reranker(loaded):
    """A reranker's head has one output (the relevance logit); anything else is a mislabelled directory."""
    if len(loaded.id2label) != 1:
        raise UserError(f"{loaded.source}: toolkit.problem_type is 'rerank' but the head has {len(loaded.id2label)} "
                        "outputs; a reranker has one (num_labels 1)")
    return loaded


def encode_rerank_pairs(loaded, queries, documents):
    """Encode (query, document) pairs exactly as the reranker trainer does (common/reranking.py: the document
    is cut first, so a long document never pushes the query out of the window)."""
    from common import reranking
    return reranking.encode_for_model(loaded, list(queries), list(documents))


def rerank_logits(loaded, queries, documents, batch_size=32, sort_by_length=True, progress=False):
    """One relevance logit per (query, document) pair, (n,) float32; the score is its sigmoid."""
    features = encode_rerank_pairs(loaded, queries, documents)
    return check_finite_outputs(run_batched(loaded, features, batch_size, sort_by_length, progress), loaded)[:, 0]


def sigmoid(values):
    """Element-wise logistic function, stable for large magnitudes (tanh form: no exp overflow)."""
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(values, dtype=np.float64)))


# ---------------------------------------------------------------- vectors

def vector_max_length(loaded, side="query"):
    """Max tokens for a query or document text (toolkit["vector"]), else the preprocessing max."""
    vector = loaded.toolkit.get("vector", {})
    return vector.get(f"{side}_max_length") or loaded.preprocessing.get("max_length", 128)


def embed(loaded, texts, batch_size=32, side="query", sort_by_length=True, progress=False, dim=None):
    """Embeddings (n, dim) of texts, in input order, with the stored instruction of ``side`` before
    each text. ``dim``: cut to one of the model's --matryoshka-dims sizes and L2-normalised again."""
    features = encode_inputs(loaded, instructed(loaded, texts, side), None, vector_max_length(loaded, side))
    vectors = check_finite_outputs(run_batched(loaded, features, batch_size, sort_by_length, progress), loaded)
    return vectors if dim is None else cut_embeddings(loaded, vectors, dim)


def instructed(loaded, texts, side):
    """``texts`` with the model's --query-instruction / --passage-instruction for ``side`` before them."""
    from common.pairs import with_instructions
    return with_instructions(texts, loaded.preprocessing, "query" if side == "query" else "document")


def matryoshka_dims(loaded):
    """The embedding sizes besides the full one a vector model was trained for (--matryoshka-dims)."""
    return (loaded.toolkit.get("vector") or {}).get("matryoshka_dims") or []


def cut_embeddings(loaded, vectors, dim):
    """The first ``dim`` values of each row, L2-normalised; a size the model was not trained for is refused."""
    from common.vector import check_dimension
    check_dimension(dim, vectors.shape[-1], matryoshka_dims(loaded))
    return normalize_rows(vectors[:, :dim])


def cosine_similarity(first, second):
    """Cosine similarity of two 1-D vectors."""
    denominator = float(np.linalg.norm(first) * np.linalg.norm(second))
    return float(np.dot(first, second) / denominator) if denominator else 0.0


def normalize_rows(vectors):
    """The rows of ``vectors`` (n, dim) L2-normalised, as float32 (zero rows stay zero)."""
    vectors = np.asarray(vectors, dtype=np.float32)
    return vectors / np.maximum(np.linalg.norm(vectors, axis=-1, keepdims=True), 1e-12)


def nearest_rows(matrix, query_vectors, top_k):
    """Per query, the ``top_k`` (row, cosine similarity) of ``matrix`` (n, dim; rows L2-normalised), best first."""
    queries = normalize_rows(query_vectors)  # (queries, dim)
    scores = queries @ np.asarray(matrix, dtype=np.float32).T  # (queries, n)
    ranked = np.argsort(-scores, axis=-1, kind="stable")[:, :top_k]
    return [[(int(row), float(scores[query, row])) for row in rows] for query, rows in enumerate(ranked)]


# ---------------------------------------------------------------- long documents

def predict_long_documents(loaded, texts, temperature=None, batch_size=32, explain=0, top_k=None, progress=False,
                           threshold=None, input_name=None, with_logits=False):
    """Chunk, run every chunk, aggregate (common.longdoc, with the model's stored settings).

    Returns one dict per document in the classifier's shape (input, temperature, label,
    label_id, probabilities, top_k with ``top_k``) plus num_chunks, num_windows and, with
    ``explain``, top_chunks. ``progress``: a bar over the documents (on a terminal only).
    A text that a stored strip pattern cannot process in its time is a UserError naming the
    input (``input_name(index)``, by default "input N") and the pattern. ``with_logits``: each result also
    holds ``logits``, the aggregated document logits (as ``classify``'s).
    """
    from common import longdoc
    temperature = resolve_temperature(loaded, temperature)
    documents = progress_bar(texts, "inference", enabled=progress, unit="document")
    results = longdoc.predict_documents(loaded.run, loaded.tokenizer, loaded.toolkit, documents, batch_size, explain,
                                        loaded.id2label or None, input_name, loaded.source)
    if not results:
        return []
    logits = check_finite_outputs(np.stack([np.asarray(result["logits"]) for result in results]), loaded)
    outputs = decision_results(loaded, texts, None, logits, temperature, top_k, threshold)
    return [_document_result(output, result, row, with_logits) for output, result, row in zip(outputs, results, logits)]


def _document_result(output, result, logits, with_logits=False):
    """The classifier-shaped ``output`` with the chunker's own fields of ``result`` (num_chunks, ...)."""
    # label and probabilities were recomputed from the logits with the temperature (and a fused baseline)
    output.update({key: value for key, value in result.items() if key not in ("label", "label_id", "logits", "probs")})
    return with_logits_field(output, logits) if with_logits else output


# ---------------------------------------------------------------- services for common.server

class TokenizingService:
    """tokenize() and decode() for the server's /tokenize and /decode (text-embeddings-inference's): the model's
    tokenizer on the text as the model reads it (its stored preprocessing, ``seen_texts``)."""

    @property
    def vocabulary_size(self):
        """Token ids run from 0 to this, exclusive (added tokens included)."""
        return len(self.loaded.tokenizer)

    def seen_texts(self, texts, prompt_name=None):
        """``texts`` as the tokenizer gets them: after the stored normalization."""
        self.check_prompt_name(prompt_name)
        normalize = build_normalizer(self.loaded.preprocessing.get("normalize"))
        return [normalize(text) for text in texts]

    def check_prompt_name(self, prompt_name):
        """Only a vector model has prompts (its instructions): refuse one for another model."""
        if prompt_name is not None:
            raise UserError(f"prompt_name: {prompt_name!r}: this {self.kind} model has no prompts; leave it out")

    def tokenize(self, texts, add_special_tokens=True, prompt_name=None):
        """Per text, its tokens as TEI lists them (``token_records``), untruncated, as TEI's /tokenize."""
        check_texts(texts)
        seen, encodings = self.encode_seen(texts, add_special_tokens, prompt_name)
        return [token_records(text, encoding) for text, encoding in zip(seen, encodings)]

    def encode_seen(self, texts, add_special_tokens=True, prompt_name=None):
        """(``seen_texts``, their untruncated encodings by the model's tokenizer)."""
        seen = self.seen_texts(list(texts), prompt_name)
        return seen, data.backend_tokenizer(self.loaded.tokenizer).encode_batch(seen,
                                                                               add_special_tokens=add_special_tokens)

    def decode(self, sequences, skip_special_tokens=True):
        """Each list of token ids as text, as TEI's /decode (the tokenizer's decoder). The tokenizer skips ids
        outside the vocabulary silently: check them against ``vocabulary_size`` first."""
        return data.backend_tokenizer(self.loaded.tokenizer).decode_batch(
            [list(ids) for ids in sequences], skip_special_tokens=skip_special_tokens)


def token_records(text, encoding):
    """An encoding of ``text`` as TEI's tokens: ``{"id", "text", "special", "start", "stop"}``, where a special
    token's text is the token and its offsets null, another's text is its slice of ``text`` and its offsets are
    UTF-8 byte offsets into ``text`` (TEI's are: its tokenizer's offsets are bytes)."""
    byte_offsets = np.concatenate([[0], np.cumsum([len(character.encode("utf-8")) for character in text])])
    tokens = []
    for token_id, token, (start, stop), special in zip(encoding.ids, encoding.tokens, encoding.offsets,
                                                        encoding.special_tokens_mask):
        if special:
            tokens.append({"id": token_id, "text": token, "special": True, "start": None, "stop": None})
        else:
            tokens.append({"id": token_id, "text": text[start:stop], "special": False,
                           "start": int(byte_offsets[start]), "stop": int(byte_offsets[stop])})
    return tokens


class ClassificationService(TokenizingService):
    """What ``common.server.create_app`` serves for a classifier: info(), predict(), tokenize() and decode()."""
    kind = "classification"

    def __init__(self, loaded, temperature=None, batch_size=32, threshold=None):
        self.loaded = loaded
        self.temperature = temperature
        self.batch_size = batch_size
        self.threshold = threshold

    def info(self):
        problem = problem_types.from_toolkit(self.loaded.toolkit)
        info = {"kind": self.kind, "task": self.loaded.task, "backend": self.loaded.backend,
                "model": Path(self.loaded.source).name, "labels": self.loaded.label_names,
                "temperature": resolve_temperature(self.loaded, self.temperature),
                "max_length": self.loaded.preprocessing.get("max_length"), "problem_type": problem.name}
        if self.loaded.baseline is not None:
            info["baseline_fusion"] = {"baseline": self.loaded.baseline.name, "weight": self.loaded.baseline_weight}
        if problem.name == "multi_label":
            info["thresholds"] = dict(zip(self.loaded.label_names,
                                          problem.threshold_array(self.loaded.label_names, self.threshold).tolist()))
        return info

    def predict(self, texts, contexts=None):
        check_texts(texts)
        check_contexts(contexts)
        return classify(self.loaded, list(texts), list(contexts) if contexts else None, self.temperature,
                        self.batch_size, threshold=self.threshold, with_logits=True)  # logits: TEI's raw_scores

    def count_tokens(self, texts, contexts=None):
        """Tokens per input as the model sees them (context pair, special tokens, truncation)."""
        check_texts(texts)
        check_contexts(contexts)
        features = encode_inputs(self.loaded, list(texts), list(contexts) if contexts else None)
        return [len(feature["input_ids"]) for feature in features]


class LongDocumentService(ClassificationService):
    """The server's view of a long-document classifier (chunked and aggregated)."""
    kind = "longdoc"

    def predict(self, texts, contexts=None):
        check_texts(texts)
        # chunks are encoded without a second segment: dropping a context would answer a different question
        for index, context in enumerate(contexts or ()):
            if context is not None:
                raise UserError(f"contexts[{index}]: a long-document model takes no context; send only texts")
        # a retried request runs alone (common.server.MicroBatcher), so the index is the request's own
        return predict_long_documents(self.loaded, list(texts), self.temperature, self.batch_size,
                                      threshold=self.threshold, input_name=lambda index: f"texts[{index}]",
                                      with_logits=True)

    def seen_texts(self, texts, prompt_name=None):
        """Texts as the chunker gets them: the stored strip patterns deleted, then the stored normalization."""
        from common import longdoc
        self.check_prompt_name(prompt_name)
        settings = longdoc.LongdocSettings.from_toolkit(self.loaded.toolkit)
        clean = longdoc.build_text_cleaner(settings.strip_patterns, self.loaded.preprocessing.get("normalize"),
                                           model_source=self.loaded.source)
        return [data.clean_text(clean, text, f"texts[{index}]") for index, text in enumerate(texts)]

    def count_tokens(self, texts, contexts=None):
        """Tokens per whole document (no truncation: every chunk is run), without special tokens."""
        check_texts(texts)
        normalize = build_normalizer(self.loaded.preprocessing.get("normalize"))
        encodings = data.backend_tokenizer(self.loaded.tokenizer).encode_batch(
            [normalize(text) for text in texts], add_special_tokens=False)
        return [len(encoding.ids) for encoding in encodings]


class VectorService(TokenizingService):
    """The server's view of a vector model: info(), encode(), tokenize() and decode()."""
    kind = "vector"

    def __init__(self, loaded, batch_size=32):
        self.loaded = loaded
        self.batch_size = batch_size
        # measured once: an ONNX export keeps no backbone config to read the size from
        self.dim = int(embed(loaded, ["dim"]).shape[-1])

    def info(self):
        settings = self.loaded.toolkit.get("vector", {})
        return {"kind": self.kind, "task": "vector", "backend": self.loaded.backend,
                "model": Path(self.loaded.source).name, "dim": self.dim, "pooling": settings.get("pooling"),
                "normalize": settings.get("normalize"), "max_length": self.loaded.preprocessing.get("max_length"),
                "query_max_length": vector_max_length(self.loaded, "query"),
                "doc_max_length": vector_max_length(self.loaded, "doc"),
                "matryoshka_dims": matryoshka_dims(self.loaded) or None}

    def encode(self, texts):
        """Query-side embeddings (query_max_length) as lists of floats."""
        check_texts(texts)
        return embed(self.loaded, list(texts), self.batch_size).tolist()

    def encode_documents(self, texts):
        """Document-side embeddings (doc_max_length) as lists of floats."""
        check_texts(texts)
        return embed(self.loaded, list(texts), self.batch_size, side="doc").tolist()

    def seen_texts(self, texts, prompt_name=None):
        """Texts as ``embed`` gives them to the tokenizer: the instruction of the side ``prompt_name`` names
        ("query": the query side, else the document side, as TEI's /embed), then the stored normalization."""
        normalize = build_normalizer(self.loaded.preprocessing.get("normalize"))
        return [normalize(text) for text in instructed(self.loaded, texts, "query" if prompt_name == "query" else "doc")]

    def count_tokens(self, texts, side="query", truncate=True):
        """Tokens per text as the model sees them on ``side`` ("query" or "doc"): instruction, special tokens,
        truncation; with ``truncate`` False, before truncation (to refuse texts longer than the side's max
        length; a text that fits is encoded whole, so the counts agree)."""
        check_texts(texts)
        if truncate:
            features = encode_inputs(self.loaded, instructed(self.loaded, list(texts), side), None,
                                     vector_max_length(self.loaded, side))
            return [len(feature["input_ids"]) for feature in features]
        _, encodings = self.encode_seen(texts, prompt_name="query" if side == "query" else None)
        return [len(encoding.ids) for encoding in encodings]


class RerankService(TokenizingService):
    """The server's view of a reranker: info(), rerank() and count_tokens() over (query, document) pairs;
    tokenize() and decode() of single texts."""
    kind = "rerank"

    def __init__(self, loaded, batch_size=32):
        self.loaded = check_reranker(loaded)
        self.batch_size = batch_size

    @property
    def max_length(self):
        return self.loaded.preprocessing.get("max_length", 128)

    def info(self):
        return {"kind": self.kind, "task": self.loaded.task, "backend": self.loaded.backend,
                "model": Path(self.loaded.source).name, "max_length": self.max_length}

    def rerank(self, queries, documents):
        """Relevance logits of the pairs, as floats."""
        check_texts(queries, "query")
        check_texts(documents)
        return rerank_logits(self.loaded, queries, documents, self.batch_size).tolist()

    def count_tokens(self, queries, documents, truncate=True):
        """Tokens per pair as the model sees them; with ``truncate`` False, before truncation (to refuse
        pairs longer than ``max_length``; a pair that fits is encoded whole, so the counts agree)."""
        check_texts(queries, "query")
        check_texts(documents)
        if truncate:
            return [len(feature["input_ids"]) for feature in encode_rerank_pairs(self.loaded, queries, documents)]
        normalize = build_normalizer(self.loaded.preprocessing.get("normalize"))
        backend = data.backend_tokenizer(self.loaded.tokenizer)
        special = self.loaded.tokenizer.num_special_tokens_to_add(pair=True)
        query_lengths, document_lengths = (
            [len(encoding.ids) for encoding in backend.encode_batch([normalize(text) for text in texts],
                                                                     add_special_tokens=False)]
            for texts in (queries, documents))
        return [query + document + special for query, document in zip(query_lengths, document_lengths)]


def build_service(loaded, temperature=None, batch_size=32, threshold=None):
    """The service matching the model's task (``threshold``: a multi-label model's, for every label)."""
    if is_reranker(loaded):
        return RerankService(loaded, batch_size)
    if loaded.task == "vector":
        return VectorService(loaded, batch_size)
    if loaded.task == "longdoc":
        return LongDocumentService(loaded, temperature, batch_size, threshold)
    return ClassificationService(loaded, temperature, batch_size, threshold)


def check_texts(texts, name="texts"):
    """Refuse empty, whitespace-only or unencodable texts with the index of the first bad one."""
    for index, text in enumerate(texts):
        if not isinstance(text, str) or not text.strip():
            raise UserError(f"{name}[{index}]: empty or whitespace-only text")
        position = unencodable_position(text)
        if position is not None:
            raise UserError(f"{name}[{index}]: {describe_unencodable(position)}")


def check_contexts(contexts):
    """Refuse a context the tokenizer cannot encode (None means no context)."""
    for index, context in enumerate(contexts or ()):
        position = unencodable_position(context) if isinstance(context, str) else None
        if position is not None:
            raise UserError(f"contexts[{index}]: {describe_unencodable(position)}")


def unencodable_position(text):
    """Index of the first character UTF-8 cannot encode (a lone surrogate such as "\\ud800"), else None.

    JSON allows such escapes and Python decodes them, but the tokenizer refuses them.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        return error.start
    return None


def describe_unencodable(position):
    return f"not valid Unicode text (a lone surrogate at character {position + 1}); fix or drop it"


def is_finite(array):
    """True when every value of a numpy array is finite."""
    return bool(np.all(np.isfinite(array)))
