"""The HTTP server shared by ``train_vector.py --mode deploy`` and ``infer.py --serve``.

``create_app(service)`` builds a FastAPI app around a service object:
  service.kind         "vector" | "classification" | "longdoc" | "rerank"
  service.info()       -> dict shown by GET /info
  service.encode(texts) -> list of embeddings                       (vector)
  service.encode_documents(texts) -> embeddings, optional            (vector; else encode)
  service.predict(texts, contexts) -> list of result dicts          (classification, longdoc)
  service.rerank(queries, documents) -> list of relevance logits    (rerank)
  service.count_tokens(texts, side[, truncate]) / (texts, contexts) -> tokens per text, optional (usage,
                       metrics, budget; a vector model's untruncated counts for TEI's truncate: false)
  service.tokenize(texts, add_special_tokens, prompt_name) -> per text, TEI's token dicts     (optional)
  service.decode(sequences, skip_special_tokens) -> texts; service.vocabulary_size          (optional)
  a predict result's "logits" (the head's outputs in label order), optional: TEI's raw_scores
Routes: GET /health (never needs a key), GET /info, GET /metrics (Prometheus), GET /v1/models (OpenAI's
list of the one model); vector: POST /encode, /similarity (ours or TEI's shape), /search (with a corpus),
/v1/embeddings (OpenAI's shape), /embed and / (TEI's shape; / with an ``inputs`` object is TEI's
similarity); classification/longdoc: POST /predict and / (ours or TEI's shape); rerank: POST /rerank and /
(TEI's shape); every kind: POST /tokenize and /decode (TEI's shape; the tokenizer runs beside the
micro-batcher, not through it). Where a route takes both shapes, a body with ``inputs`` is TEI's. A route for another kind
of model answers 404 with a one-line detail naming the kind it needs. OpenAPI docs at /docs.

Bad input never gets a 5xx: malformed JSON, wrong types and text that is not valid Unicode (a
lone surrogate such as JSON's "\\ud800") and, with TEI's ``truncate: false``, a text over the model's max
length answer 422, too many texts, texts of too many characters or an oversize body 413, a missing or wrong key 401, a ``dimensions`` the model lacks 400, always as a JSON body
(on /v1/ routes with OpenAI's error object beside ``detail``, on TEI's routes with its ``error`` and
``error_type``). ``serve()`` bounds how long a client
may take to send a request (408 after HEADER_TIMEOUT_SECONDS / BODY_TIMEOUT_SECONDS), to read its
answer (dropped after WRITE_TIMEOUT_SECONDS) and how many connections may be open (503 past
MAX_CONNECTIONS); an unparseable request gets a JSON 400, and one with both Content-Length and
Transfer-Encoding a 400 that closes the connection.
Concurrent requests are micro-batched: their texts are queued and run as one service call
in a worker thread, so the event loop keeps answering while the model runs. A batch holds at most
``max_batch_size`` texts and ``max_batch_tokens`` tokens. A request to a model route waits from its
headers on (body, parsing, tokenizing, queue); past ``max_queue`` waiting requests a new one gets 429
at once, before its body is read, instead of holding memory until the model gets to it.
"""
import asyncio
import base64
import contextvars
import ctypes
import functools
import http
import json
import multiprocessing
import os
import secrets
import signal
import socket
import sys
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Annotated, Literal

import h11
import numpy as np
import uvicorn
from fastapi import Body, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector,
                               generate_latest)
from pydantic import (AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, StrictInt,
                      StrictStr, ValidationError, WithJsonSchema)
from starlette.requests import ClientDisconnect
from uvicorn.protocols.http.h11_impl import H11Protocol

from common import inference
from common.errors import UserError

API_KEY_ENV = "TOOLKIT_API_KEY"
DEFAULT_HOST = "127.0.0.1"
GRACEFUL_SHUTDOWN_SECONDS = 30
BYTES_PER_CHAR = 6  # worst case of a JSON-escaped character (\uXXXX)
MAX_TOP_K = 1000
# Bounded work. A request waits in the queue until the model takes it; past MAX_QUEUE waiting requests
# a new one is answered 429 at once (below MAX_CONNECTIONS, so the queue limit is what clients meet).
# A batch holds at most MAX_BATCH_TOKENS tokens (TEI's default), so a burst of long texts runs as
# several bounded forward passes instead of one of max_batch_size x max_length.
MAX_QUEUE = 256
MAX_BATCH_TOKENS = 16384

# Slow clients. uvicorn only times out a connection that sits idle after a response, so a client that
# opens a socket and sends half its headers (slowloris) or trickles a body would hold it forever.
# A request must arrive whole: headers within HEADER_TIMEOUT_SECONDS of the connection opening (or
# of the previous response), the body within BODY_TIMEOUT_SECONDS of the headers (generous: a full
# 64-text request is ~4 MB), else 408 and the connection is closed. The model's time is not bounded.
HEADER_TIMEOUT_SECONDS = 10
BODY_TIMEOUT_SECONDS = 60
KEEP_ALIVE_SECONDS = 5  # an idle connection after a response (uvicorn's timeout_keep_alive)
# A client that stops reading its answers: once the socket's buffers are full uvicorn waits for it to
# drain, without a limit. A response of which no byte leaves for WRITE_TIMEOUT_SECONDS drops the connection.
WRITE_TIMEOUT_SECONDS = 60
# Connections beyond this are answered 503 and closed at once, so sockets held by clients that never
# finish a request cannot exhaust the process's file descriptors (often 1024); well above what
# micro-batching needs (64 texts per forward pass). Behind a public address, put a reverse proxy in front.
MAX_CONNECTIONS = 500
READ_TIMEOUT_SCOPE_KEY = "toolkit.read_timeout"  # set in a request's ASGI scope when its body deadline passed
MAX_HEADER_BYTES = 16 * 1024  # request line + headers; h11's default, stated so it is a decision


# ---------------------------------------------------------------- request and response models

def require_encodable(text):
    """Refuse text the tokenizer cannot encode: JSON allows a lone surrogate ("\\ud800"), UTF-8 does not."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        # the character itself is not echoed: it cannot be written into a UTF-8 response either
        raise ValueError(f"character {error.start} is a lone surrogate (U+{ord(text[error.start]):04X}); "
                         "text must be valid Unicode") from None
    return text


Text = Annotated[StrictStr, AfterValidator(require_encodable)]


class StrictRequest(BaseModel):
    """A request body that rejects unknown fields (a typo answers 422 instead of being ignored)."""
    model_config = ConfigDict(extra="forbid")


class EncodeRequest(StrictRequest):
    texts: list[Text] = Field(min_length=1, description="texts to embed")
    side: Literal["query", "document"] = Field(
        default="query", description="'document' encodes with the model's document max length (queries are short)")


class SimilarityRequest(StrictRequest):
    query: Text = Field(description="the query text")
    documents: list[Text] = Field(min_length=1, description="documents to score against the query")


class SearchRequest(StrictRequest):
    query: Text = Field(description="the query text")
    top_k: int = Field(default=10, ge=1, le=MAX_TOP_K, strict=True, description="how many corpus entries to return")


class PredictRequest(StrictRequest):
    texts: list[Text] = Field(min_length=1, description="texts to classify")
    contexts: list[Text | None] | None = Field(default=None, description="optional context per text")


class RerankRequest(StrictRequest):
    """text-embeddings-inference's rerank request (its ``truncation_direction`` is left out: the model's stored
    truncation side applies)."""
    query: Text = Field(description="the query text")
    texts: list[Text] = Field(min_length=1, description="documents to score against the query")
    top_n: int | None = Field(default=None, ge=1, strict=True, description="return only the n best (default: all)")
    return_text: StrictBool = Field(default=False, description="echo each document's text in its result")
    raw_scores: StrictBool = Field(default=False, description="the logit instead of its sigmoid")
    truncate: StrictBool = Field(
        default=True, description="cut pairs longer than the model's max length (false: such a pair answers 422)")


def texts_from_input(value):
    """OpenAI's ``input``: a string becomes a list of one (so a bad string is reported once, as ``input.0``,
    not once per union branch). Token ids (a list of ints, or of lists) are refused: our tokenizer is not theirs."""
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list):
        raise ValueError("send a string or a list of strings")
    if any(isinstance(item, (int, list)) and not isinstance(item, bool) for item in value):
        raise ValueError("token-id arrays are not supported: send text (a string or a list of strings)")
    return value


TEXT_OR_TEXTS_SCHEMA = {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}, "minItems": 1}]}


class EmbeddingsRequest(StrictRequest):
    """OpenAI's embeddings request (https://platform.openai.com/docs/api-reference/embeddings/create)."""
    input: Annotated[list[Text], Field(min_length=1), BeforeValidator(texts_from_input),
                     WithJsonSchema(TEXT_OR_TEXTS_SCHEMA)] = Field(description="a text or a list of texts")
    model: StrictStr | None = Field(default=None, description="accepted and not checked: the server has one model")
    encoding_format: Literal["float", "base64"] = Field(
        default="float", description="'base64': each embedding as its little-endian float32 bytes")
    dimensions: StrictInt | None = Field(default=None, description="the model's embedding size, or one of the "
                                         "sizes it was trained for with --matryoshka-dims")
    user: StrictStr | None = Field(default=None, description="accepted and ignored")
    side: Literal["query", "document"] = Field(
        default="document", description="not OpenAI's: 'query' cuts texts at the query max length as /encode does")


class EmbedRequest(StrictRequest):
    """text-embeddings-inference's embed request (POST /embed, and POST / on a vector server). Its
    ``truncation_direction`` is left out: the model's stored truncation side applies."""
    inputs: Annotated[list[Text], Field(min_length=1), BeforeValidator(texts_from_input),
                      WithJsonSchema(TEXT_OR_TEXTS_SCHEMA)] = Field(description="a text or a list of texts")
    normalize: StrictBool = Field(default=True, description="L2-normalise each embedding")
    truncate: StrictBool = Field(default=True, description="cut texts longer than the model's max length (TEI's "
                                 "--auto-truncate); false: such a text answers 422")
    dimensions: StrictInt | None = Field(default=None, description="the model's embedding size, or one of the "
                                         "sizes it was trained for with --matryoshka-dims")
    prompt_name: Literal["query", "document", "passage"] | None = Field(
        default=None, description="'query': the query side (its instruction and max length); else the document side")


def predict_inputs(value):
    """TEI's predict ``inputs`` as a list of sequences, each [text] or [text, text_pair]: a string is one
    sequence, a list of strings one sequence (a pair when it holds two), a list of lists a batch."""
    if isinstance(value, str):
        return [[value]]
    if isinstance(value, list) and value and all(isinstance(item, str) for item in value):
        if len(value) > 2:
            raise ValueError(f"a list of strings is one input, a text or a [text, text_pair]; {len(value)} given "
                             "(send a batch as [[text], [text, text_pair], ...])")
        return [value]
    return value


SEQUENCE_SCHEMA = {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 2}
PREDICT_INPUTS_SCHEMA = {"anyOf": [{"type": "string"}, SEQUENCE_SCHEMA,
                                   {"type": "array", "items": SEQUENCE_SCHEMA, "minItems": 1}]}


class ClassificationParameters(StrictRequest):
    """The ``parameters`` huggingface_hub's ``text_classification`` sends (TEI ignores them)."""
    top_k: int | None = Field(default=None, ge=1, strict=True, description="return only the k best labels")


class TEIPredictRequest(StrictRequest):
    """text-embeddings-inference's predict request (its ``truncation_direction`` is left out: the model's stored
    truncation side applies)."""
    inputs: Annotated[list[Annotated[list[Text], Field(min_length=1, max_length=2)]], Field(min_length=1),
                      BeforeValidator(predict_inputs), WithJsonSchema(PREDICT_INPUTS_SCHEMA)] = Field(
        description="a text, a [text, text_pair], or a batch of them: [[text], [text, text_pair], ...]")
    raw_scores: StrictBool = Field(default=False, description="the model's logits instead of its probabilities "
                                   "(or a regression model's score)")
    truncate: StrictBool | None = Field(default=None, description="texts are cut at the model's max length; "
                                        "false is refused for a classifier (a long-document model reads it all)")
    parameters: ClassificationParameters | None = Field(default=None, description="huggingface_hub's: top_k")


def tokenize_inputs(value):
    """TEI's tokenize ``inputs`` as a list of texts (it takes no pairs, unlike its predict)."""
    if isinstance(value, list) and any(isinstance(item, list) for item in value):
        raise ValueError("send a text or a list of texts (tokenize takes no pairs)")
    return texts_from_input(value)


def ids_from_input(value):
    """TEI's decode ``ids`` as a list of sequences: a list without lists in it is one sequence."""
    if isinstance(value, list) and value and not any(isinstance(item, list) for item in value):
        return [value]
    return value


class TokenizeRequest(StrictRequest):
    """text-embeddings-inference's tokenize request (a text or a list of texts; TEI takes no pairs here)."""
    inputs: Annotated[list[Text], Field(min_length=1), BeforeValidator(tokenize_inputs),
                      WithJsonSchema(TEXT_OR_TEXTS_SCHEMA)] = Field(description="a text or a list of texts")
    add_special_tokens: StrictBool = Field(default=True, description="add the model's special tokens ([CLS], [SEP])")
    prompt_name: Literal["query", "document", "passage"] | None = Field(
        default=None, description="a vector model's side, as /embed's: 'query' puts its query instruction before "
                                  "each text, else its passage instruction; refused by other models")


TokenId = Annotated[int, Field(ge=0, strict=True)]
IDS_SCHEMA = {"anyOf": [{"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1},
                        {"type": "array", "items": {"type": "array", "items": {"type": "integer", "minimum": 0},
                                                    "minItems": 1}, "minItems": 1}]}


class DecodeRequest(StrictRequest):
    """text-embeddings-inference's decode request."""
    ids: Annotated[list[Annotated[list[TokenId], Field(min_length=1)]], Field(min_length=1),
                   BeforeValidator(ids_from_input), WithJsonSchema(IDS_SCHEMA)] = Field(
        description="token ids, or a list of lists of them")
    skip_special_tokens: StrictBool = Field(default=True, description="leave the special tokens out of the text")


class SimilarityInputs(StrictRequest):
    source_sentence: Text = Field(description="the text the others are compared with")
    sentences: list[Text] = Field(min_length=1, description="texts to compare with source_sentence")


class SimilarityParameters(StrictRequest):
    truncate: StrictBool | None = Field(default=None, description="as /embed's truncate")
    prompt_name: Literal["query", "document", "passage"] | None = Field(
        default=None, description="as /embed's prompt_name: every text on the side it names")


class TEISimilarityRequest(StrictRequest):
    """text-embeddings-inference's sentence-similarity request (what huggingface_hub's ``sentence_similarity``
    sends); its ``truncation_direction`` is left out."""
    inputs: SimilarityInputs
    parameters: SimilarityParameters | None = None


def parse_request(body, ours, theirs):
    """``body`` (a JSON object) as TEI's request ``theirs`` when it has TEI's ``inputs``, else as our ``ours``."""
    return validate_body(theirs if "inputs" in body else ours, body)


def validate_body(model, body):
    """``body`` as a ``model``; an invalid one is the usual 422, its errors located as FastAPI locates them."""
    try:
        return model.model_validate(body)
    except ValidationError as error:
        raise RequestValidationError([{**item, "loc": ("body", *item["loc"])} for item in error.errors()]) from None


def either_body(ours, theirs):
    """A route's body type for ``parse_request``: any JSON object, documented as either request."""
    return Annotated[dict, Body(), WithJsonSchema({"anyOf": [inlined_schema(ours), inlined_schema(theirs)]})]


def inlined_schema(model):
    """``model``'s JSON schema with its nested models written in place (its "#/$defs/..." references would
    not resolve inside the OpenAPI document)."""
    schema = model.model_json_schema()
    definitions = schema.pop("$defs", {})

    def inline(node):
        if isinstance(node, dict):
            if "$ref" in node:
                return inline(definitions[node["$ref"].rsplit("/", 1)[-1]])
            return {key: inline(value) for key, value in node.items()}
        return [inline(item) for item in node] if isinstance(node, list) else node
    return inline(schema)


# ---------------------------------------------------------------- corpus for /search

@dataclass
class Corpus:
    """Ids, texts and their embeddings (n, dim), L2-normalised, for POST /search."""
    ids: list
    texts: list
    matrix: np.ndarray


def load_corpus_records(path, skip_invalid=False):
    """(ids, texts) of a corpus file of {"id", "text"} records (JSONL, JSON, CSV/TSV); ids must be unique.

    With ``skip_invalid`` a record without an id or a text is dropped, and each id stays with its own text;
    the dropped ones are counted on standard error, as the trainers do.
    """
    from common import data
    records = data.read_records(path, skip_invalid=skip_invalid)

    def parse(record):
        if record.fields.get("id") is None:
            raise data.RecordError(f"{record.where('id')}: missing")
        return str(record.fields["id"]), data.require_text(record, "text"), record
    # each entry carries its record: after a skipped record, the records no longer line up with the entries
    entries = data.parse_each(records, parse, skip_invalid)
    data.report_skipped(entries)
    if not entries:
        raise UserError(f"{path}: no valid corpus records")
    seen = set()
    for entry_id, _, record in entries:
        if entry_id in seen:
            raise UserError(f"{record.where('id')}: duplicate id {entry_id!r}")
        seen.add(entry_id)
    return [entry_id for entry_id, _, _ in entries], [text for _, text, _ in entries]


def build_corpus(service, ids, texts, batch_size=256, show_progress=True):
    """Encode the corpus once (document side) into an in-memory matrix, with a progress bar."""
    from tqdm.auto import tqdm
    encode = getattr(service, "encode_documents", service.encode)
    rows = []
    for start in tqdm(range(0, len(texts), batch_size), desc="encoding corpus", disable=not show_progress,
                      file=sys.stderr):
        rows.extend(encode(texts[start:start + batch_size]))
    return Corpus(list(ids), list(texts), inference.normalize_rows(rows))


# ---------------------------------------------------------------- micro-batching

class ServerBusy(Exception):
    """The queue is full: the request is answered 429 without being queued."""


def busy_response(error):
    """The 429 for a full queue (from a route, or from QueueAdmission before the body is read)."""
    return ErrorResponse({"detail": str(error)}, status_code=429, headers={"Retry-After": "1"})


class Admission:
    """One request counted against ``max_queue`` from its headers until its job is queued (or it ends)."""

    def __init__(self, batcher):
        self.batcher = batcher
        self.held = True
        batcher.admitting += 1

    def release(self):
        """Stop counting the request (once: its job is queued, or the request ended)."""
        if self.held:
            self.held = False
            self.batcher.admitting -= 1


# the Admission of the request this task serves (set by QueueAdmission, released by MicroBatcher.submit)
CURRENT_ADMISSION = contextvars.ContextVar("current_admission", default=None)


@dataclass
class Job:
    """One request's items for one service method, their token count, and the future its answer goes to."""
    method: str
    items: list
    tokens: int
    future: asyncio.Future
    queued_at: float = field(default_factory=time.perf_counter)


class MicroBatcher:
    """Queue requests' texts and run them as few service calls as possible.

    A request is a job (method name, items, tokens). The worker takes the oldest job and every
    queued job of the same method that fits in ``max_batch_size`` items and ``max_batch_tokens``
    tokens, runs them as one call in a thread, and hands each job its slice. A job over either
    limit on its own runs alone. Requests arriving while the model runs wait in the queue and
    form the next batch, so a lone request is never delayed; when others are already waiting,
    the worker lingers ``wait_seconds`` for the batch to fill. If a merged call fails, each job
    is retried alone so one bad request cannot fail the others. ``max_batch_size=1`` gives one
    service call per request. With ``max_queue`` requests waiting, ``admit`` and ``submit`` raise
    ServerBusy. A request admitted (by QueueAdmission, before its body is read) waits too: while its body
    arrives, is parsed and tokenized, it holds memory the queue limit must bound.
    """

    def __init__(self, functions, max_batch_size=64, wait_seconds=0.005, max_batch_tokens=None, max_queue=None,
                 metrics=None):
        self.functions = functions  # {method: callable(list of items) -> list of results}
        self.max_batch_size = max(1, max_batch_size)
        self.max_batch_tokens = max_batch_tokens
        self.max_queue = max_queue
        self.wait_seconds = wait_seconds
        self.metrics = metrics  # ServerMetrics, or None
        self.loop = None
        self.queue = None
        self.worker = None
        self.backlog = deque()  # jobs taken off the queue but not yet run (another method, or no room)
        self.admitting = 0  # requests admitted whose job is not queued yet (body, parsing, tokenizing)
        # batches run one at a time, so one thread runs them all: the model's allocations then stay in one
        # malloc arena (spread over the default pool's threads, resident memory crept up batch after batch);
        # each batch then hands back what it freed (run_and_release)
        self.model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")

    def _ensure_worker(self):
        """Start the worker in the running loop (again if a test client opened a new loop)."""
        loop = asyncio.get_running_loop()
        if self.loop is not loop or self.worker is None or self.worker.done():
            self.loop = loop
            self.queue = asyncio.Queue()
            self.backlog = deque()
            self.worker = loop.create_task(self._run())

    def pending(self):
        """Requests waiting for the model (not counting the batch it is running): admitted or queued."""
        queued = self.queue.qsize() if self.queue is not None else 0
        return self.admitting + queued + len(self.backlog)

    def check_room(self):
        """Raise ServerBusy when ``max_queue`` requests are already waiting."""
        if self.max_queue is not None and self.pending() >= self.max_queue:
            raise ServerBusy(f"server busy: {self.pending()} requests waiting (limit {self.max_queue}); "
                             "retry later")

    def admit(self):
        """Count a new request as waiting (an Admission to release), or raise ServerBusy if the queue is full."""
        self.check_room()
        return Admission(self)

    async def submit(self, method, items, tokens=None):
        """Queue ``items`` for ``method`` and wait for their results (or the service's exception).

        ``tokens``: the items' token counts (for the batch budget and metrics), or None if unknown.
        """
        self._ensure_worker()
        admission = CURRENT_ADMISSION.get()
        if admission is None:
            self.check_room()
        else:  # admitted already: from here on its queued job counts instead (a second job of the same
            admission.release()  # request, as /similarity's documents, is not refused after its first ran)
        future = self.loop.create_future()
        self.queue.put_nowait(Job(method, list(items), sum(tokens or ()), future))
        return await future

    async def stop(self):
        """Cancel the worker (at shutdown, after uvicorn has drained the requests in flight)."""
        if self.worker is not None and not self.worker.done():
            self.worker.cancel()
            try:
                await self.worker
            except asyncio.CancelledError:
                pass

    async def _run(self):
        while True:
            if not self.backlog:
                self.backlog.append(await self.queue.get())
            self._drain_queue()
            first = self.backlog.popleft()
            jobs = [first]
            size, tokens = self._take_compatible(jobs, len(first.items), first.tokens)
            if self.wait_seconds > 0 and len(jobs) > 1 and not self._full(size, tokens):
                await asyncio.sleep(self.wait_seconds)  # under concurrent load: let the batch fill
                self._drain_queue()
                size, tokens = self._take_compatible(jobs, size, tokens)
            await self._execute(jobs)

    def _drain_queue(self):
        while not self.queue.empty():
            self.backlog.append(self.queue.get_nowait())

    def _full(self, size, tokens):
        return size >= self.max_batch_size or (self.max_batch_tokens is not None and tokens >= self.max_batch_tokens)

    def _take_compatible(self, jobs, size, tokens):
        """Move backlog jobs of the batch's method into ``jobs`` while they fit; return (items, tokens)."""
        method, kept = jobs[0].method, deque()
        while self.backlog:
            candidate = self.backlog.popleft()
            fits = (size + len(candidate.items) <= self.max_batch_size
                    and (self.max_batch_tokens is None or tokens + candidate.tokens <= self.max_batch_tokens))
            if candidate.method == method and fits:
                jobs.append(candidate)
                size += len(candidate.items)
                tokens += candidate.tokens
            else:
                kept.append(candidate)
        self.backlog = kept
        return size, tokens

    async def _execute(self, jobs):
        """One service call for all jobs' items in a worker thread; each future gets its slice."""
        function = self.functions[jobs[0].method]
        items = [item for job in jobs for item in job.items]
        started = time.perf_counter()
        try:
            results = await asyncio.get_running_loop().run_in_executor(self.model_thread, run_and_release,
                                                                       function, items)
            error = None
        except Exception as caught:  # noqa: BLE001 - handed to the request that caused it
            results, error = None, caught
        if self.metrics is not None:
            self.metrics.observe_batch(jobs, started, time.perf_counter() - started)
        if error is not None:
            if len(jobs) > 1:
                for job in jobs:
                    await self._execute([job])
                return
            self._settle(jobs[0].future, exception=error)
            return
        start = 0
        for job in jobs:
            self._settle(job.future, result=results[start:start + len(job.items)])
            start += len(job.items)

    @staticmethod
    def _settle(future, result=None, exception=None):
        if future.done():  # the client went away
            return
        if exception is not None:
            future.set_exception(exception)
        else:
            future.set_result(result)


def run_and_release(function, items):
    """``function(items)``, then hand what the call freed back to the system, failed calls included (one
    batch on the model thread)."""
    try:
        return function(items)
    finally:
        release_freed_memory()


def release_freed_memory():
    """Return the free pages of the process's malloc heaps to the system (glibc); elsewhere nothing happens.

    Batches of varying shape (texts x tokens) leave their freed activations as holes in the model
    thread's arena, and glibc keeps those pages resident: under sustained load resident memory crept up
    batch after batch. ``malloc_trim(0)`` after each batch keeps it flat for 6-10 ms of page faults
    per batch on a 2-core CPU; a fixed mmap threshold cost 40 ms (bench/README.md, "Backpressure and memory").
    """
    malloc_trim = load_malloc_trim()
    if malloc_trim is not None:
        malloc_trim(0)


@functools.cache
def load_malloc_trim():
    """glibc's ``malloc_trim``, or None where there is none (macOS, Windows, musl)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # a C library without malloc_trim (musl)
        return None


# ---------------------------------------------------------------- metrics

SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class ServerMetrics:
    """One app's Prometheus metrics, in a registry of its own (two apps in one process do not collide).

    Request counts and latencies come from ``RequestMetrics`` (every route, every status, 401 and
    413 included); queue, batch and token figures from the MicroBatcher.
    """

    def __init__(self):
        self.registry = CollectorRegistry()
        self.routes = set()  # the app's paths; any other path is counted as "other" (bounded label values)
        registry = self.registry
        self.requests = Counter("toolkit_requests", "HTTP requests answered, by route and status",
                                ["route", "status"], registry=registry)
        self.errors = Counter("toolkit_request_errors", "HTTP requests answered with a 4xx or 5xx, by route and status",
                              ["route", "status"], registry=registry)
        self.request_seconds = Histogram("toolkit_request_duration_seconds", "time from request to response, by route",
                                         ["route"], buckets=SECONDS_BUCKETS, registry=registry)
        self.queue_seconds = Histogram("toolkit_queue_duration_seconds", "time a request waited for its batch",
                                       buckets=SECONDS_BUCKETS, registry=registry)
        self.inference_seconds = Histogram("toolkit_inference_duration_seconds", "time of one batch's service call",
                                           buckets=SECONDS_BUCKETS, registry=registry)
        self.batch_size = Histogram("toolkit_batch_size", "texts per batch",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512), registry=registry)
        self.batch_tokens = Histogram("toolkit_batch_tokens", "tokens per batch (0 when the service cannot count them)",
                                      buckets=(16, 64, 256, 1024, 4096, 16384, 65536), registry=registry)
        self.tokens = Counter("toolkit_tokens", "tokens run through the model", registry=registry)
        self.texts = Counter("toolkit_texts", "texts run through the model", registry=registry)
        self.queue_size = Gauge("toolkit_queue_size", "requests waiting for the model", registry=registry)
        self.queue_limit = Gauge("toolkit_queue_limit", "requests that may wait before new ones get 429",
                                 registry=registry)
        ProcessCollector(registry=registry)  # memory, CPU and open files of this process

    def observe_batch(self, jobs, started, seconds):
        """One service call: its size, tokens, each request's wait and the call's duration."""
        self.batch_size.observe(sum(len(job.items) for job in jobs))
        self.batch_tokens.observe(sum(job.tokens for job in jobs))
        self.texts.inc(sum(len(job.items) for job in jobs))
        self.tokens.inc(sum(job.tokens for job in jobs))
        self.inference_seconds.observe(seconds)
        for job in jobs:
            self.queue_seconds.observe(max(0.0, started - job.queued_at))

    def observe_request(self, path, status, seconds):
        route = path if path in self.routes else "other"
        self.requests.labels(route, str(status)).inc()
        if status >= 400:
            self.errors.labels(route, str(status)).inc()
        self.request_seconds.labels(route).observe(seconds)


class RequestMetrics:
    """ASGI middleware, outermost: counts every response by route and status, and times it."""

    def __init__(self, app, metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.perf_counter(), 500  # an exception with no response is answered 500 outside

        async def send_and_record(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)
        try:
            await self.app(scope, receive, send_and_record)
        finally:
            if scope.get(READ_TIMEOUT_SCOPE_KEY):  # the app's answer was dropped: the client got the deadline's 408
                status = 408
            route = getattr(scope.get("route"), "path", scope["path"])  # the template: /v1/models/{model_id:path}
            self.metrics.observe_request(route, status, time.perf_counter() - started)


# ---------------------------------------------------------------- middleware: body size and auth

class ErrorResponse(JSONResponse):
    """A JSON error body written as ASCII: a message quoting the client's input can always be encoded."""

    def render(self, content):
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


class PayloadTooLarge(HTTPException):
    """413, raised while a streamed body is read."""

    def __init__(self, detail):
        super().__init__(status_code=413, detail=detail)


class BodySizeLimit:
    """Answer 413 before reading a body whose Content-Length is too big, or once a streamed body grows too big."""

    def __init__(self, app, max_bytes):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            response = ErrorResponse({"detail": f"request body too large (limit {self.max_bytes} bytes)"}, 413)
            return await response(scope, receive, send)
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise PayloadTooLarge(f"request body too large (limit {self.max_bytes} bytes)")
            return message

        return await self.app(scope, limited_receive, send)


class QueueAdmission:
    """ASGI middleware: a POST to a model route counts against ``max_queue`` from its headers on, and is
    answered 429 before its body is read when the queue is full.

    Checking only when the job is queued let a flood of large requests all be read, parsed and
    tokenized first: memory grew with the connection cap, not the queue limit.
    """

    def __init__(self, app, batcher, paths):
        self.app = app
        self.batcher = batcher
        self.paths = paths  # the model routes this app serves (filled once they are added)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in self.paths:
            return await self.app(scope, receive, send)
        try:
            admission = self.batcher.admit()
        except ServerBusy as busy:
            return await busy_response(busy)(scope, receive, send)
        token = CURRENT_ADMISSION.set(admission)
        try:
            await self.app(scope, receive, send)
        finally:
            admission.release()
            CURRENT_ADMISSION.reset(token)


class AmbiguousFraming:
    """ASGI middleware: a request with both Content-Length and Transfer-Encoding gets 400 and its connection
    is closed, unread.

    A proxy in front may take the body's end from the other header than h11 does (it goes by
    Transfer-Encoding), and the bytes left over would be read here as a second request (request
    smuggling). RFC 9112, 6.3, lets a server refuse such a request and requires it to close the connection.
    """

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        names = {name.lower() for name, _ in scope.get("headers") or ()}
        if scope["type"] == "http" and {b"content-length", b"transfer-encoding"} <= names:
            response = ErrorResponse({"detail": "request has both Content-Length and Transfer-Encoding: send one"},
                                     status_code=400, headers={"Connection": "close"})
            return await response(scope, receive, send)
        return await self.app(scope, receive, send)


class OpenAIErrorBodies:
    """ASGI middleware: an error answered on a /v1/ route also carries OpenAI's ``{"error": {"message", ...}}``.

    The openai client shows only that message in its exception; ``detail`` stays for everyone else.
    """

    def __init__(self, app):
        self.app = app

    @staticmethod
    def applies(path):
        """Whether errors on ``path`` are rewritten."""
        return path.startswith("/v1/")

    @staticmethod
    def rewrite(body, status):
        """The error body to send instead of ``body``."""
        return with_openai_error(body, status)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not self.applies(scope["path"]):
            return await self.app(scope, receive, send)
        start, chunks = None, []

        async def send_rewritten(message):
            nonlocal start
            if message["type"] == "http.response.start" and message["status"] >= 400:
                start = message  # held back until the whole (small) error body is here
                return
            if start is None:
                return await send(message)
            chunks.append(message.get("body", b""))
            if message.get("more_body"):
                return
            body = self.rewrite(b"".join(chunks), start["status"])
            headers = [(name, value) for name, value in start.get("headers", ()) if name.lower() != b"content-length"]
            await send(dict(start, headers=headers + [(b"content-length", str(len(body)).encode())]))
            await send({"type": "http.response.body", "body": body})
        await self.app(scope, receive, send_rewritten)


# the paths where text-embeddings-inference answers errors as {"error", "error_type"}
TEI_PATHS = ("/", "/embed", "/rerank", "/predict", "/similarity", "/tokenize", "/decode")


class TEIErrorBodies(OpenAIErrorBodies):
    """ASGI middleware: an error answered on one of TEI's routes also carries TEI's ``"error"`` and
    ``"error_type"`` beside ``detail`` (huggingface_hub's InferenceClient shows only ``error`` in its exception)."""

    @staticmethod
    def applies(path):
        return path in TEI_PATHS

    @staticmethod
    def rewrite(body, status):
        return with_error_fields(body, lambda message: {"error": message, "error_type": tei_error_type(status)})


def tei_error_type(status):
    """TEI's ``error_type`` for a status (router/src/http/server.rs maps them the other way)."""
    return "Overloaded" if status == 429 else "Backend" if status >= 500 else "Validation"


def with_openai_error(body, status):
    """An error body ``{"detail": ...}`` with OpenAI's error object added (a body that is not ours is kept)."""
    return with_error_fields(body, lambda message: {"error": {
        "message": message, "type": "invalid_request_error" if status < 500 else "server_error", "param": None,
        "code": status}})


def with_error_fields(body, fields):
    """An error body ``{"detail": ...}`` with ``fields(message)`` added, the message being ``detail`` as one line
    (a body that is not ours is kept)."""
    try:
        content = json.loads(body)
    except ValueError:
        return body
    if not isinstance(content, dict) or "detail" not in content:
        return body
    detail = content["detail"]
    if isinstance(detail, list):  # validation errors: "body.input: message; ..."
        detail = "; ".join(f"{'.'.join(map(str, item.get('loc', ())))}: {item.get('msg')}" for item in detail
                           if isinstance(item, dict))
    content.update(fields(str(detail)))
    return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode("ascii")


def resolve_api_key(api_key):
    """The key from --api-key, else from the TOOLKIT_API_KEY environment variable, else None (no auth).

    A key that is given but empty is refused, not read as "no key": ``--api-key "$KEY"`` with KEY
    unset must not serve without authentication. A key a client could never send in a header
    (surrounding spaces, non-ASCII or control characters) is refused too: it would lock everyone out.
    """
    if api_key is not None:
        source, key = "--api-key", api_key
    elif os.environ.get(API_KEY_ENV) is not None:
        source, key = f"the {API_KEY_ENV} environment variable", os.environ[API_KEY_ENV]
    else:
        return None
    if not key.strip():
        raise UserError(f"{source} is empty: give a key (--api-key KEY), or leave out --api-key and "
                        f"unset {API_KEY_ENV} to serve without one")
    if key != key.strip() or not key.isascii() or not key.isprintable():
        raise UserError(f"{source}: the key must be printable ASCII without surrounding spaces "
                        "(clients send it in an HTTP header)")
    return key


def check_work_limits(max_queue, max_batch_tokens, workers=1):
    """Refuse a queue limit, token budget or worker count below 1 (None means none) before the model loads."""
    for flag, value in (("--max-queue", max_queue), ("--max-batch-tokens", max_batch_tokens), ("--workers", workers)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise UserError(f"{flag} {value}: must be a whole number >= 1")


def work_limit_options(args):
    """``create_app``'s max_queue and max_batch_tokens from the --max-queue / --max-batch-tokens given (else
    the defaults)."""
    return {name: getattr(args, name) for name in ("max_queue", "max_batch_tokens")
            if getattr(args, name, None) is not None}


def request_key(request):
    """The key a client sent: ``Authorization: Bearer KEY`` (or ``X-API-Key: KEY``)."""
    authorization = request.headers.get("authorization", "")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return request.headers.get("x-api-key")


# ---------------------------------------------------------------- the app

def create_app(service, *, api_key=None, max_texts=64, max_chars=10000, max_batch_size=64, batch_wait_ms=5,
               max_batch_tokens=MAX_BATCH_TOKENS, max_queue=MAX_QUEUE, corpus=None):
    """A FastAPI app serving ``service`` (see the module docstring for the contract).

    ``max_batch_tokens`` or ``max_queue`` None: no token budget, no queue limit.
    """
    api_key = resolve_api_key(api_key)
    check_work_limits(max_queue, max_batch_tokens)
    if service.kind == "vector":
        functions = {"encode": service.encode,
                     "encode_documents": getattr(service, "encode_documents", service.encode)}
    elif service.kind == "rerank":
        functions = {"rerank": lambda items: service.rerank([query for query, _ in items],
                                                            [document for _, document in items])}
    else:
        functions = {"predict": lambda items: service.predict([text for text, _ in items],
                                                              [context for _, context in items])}
    metrics = ServerMetrics()
    batcher = MicroBatcher(functions, max_batch_size, batch_wait_ms / 1000, max_batch_tokens, max_queue, metrics)
    metrics.queue_size.set_function(batcher.pending)
    metrics.queue_limit.set(max_queue if max_queue is not None else float("inf"))

    async def lifespan(app):
        yield
        await batcher.stop()

    app = FastAPI(title=f"BERT toolkit {service.kind} server", lifespan=lifespan,
                  description="Embeddings and similarity (vector models) or predictions (classifiers).")
    app.state.batcher = batcher
    app.state.metrics = metrics
    app.state.corpus = corpus
    app.state.has_key = bool(api_key)
    model_paths = set()  # the model routes, once added below
    app.add_middleware(QueueAdmission, batcher=batcher, paths=model_paths)  # innermost: after auth and size
    app.add_middleware(BodySizeLimit, max_bytes=max_texts * max_chars * BYTES_PER_CHAR + 65536)
    install_error_handlers(app)

    @app.middleware("http")
    async def require_key(request: Request, call_next):
        if api_key and request.url.path != "/health":
            sent = request_key(request)
            if sent is None or not secrets.compare_digest(sent.encode(), api_key.encode()):
                return ErrorResponse({"detail": "missing or invalid API key (send 'Authorization: Bearer <key>')"},
                                    status_code=401, headers={"WWW-Authenticate": "Bearer"})
        return await call_next(request)

    app.add_middleware(AmbiguousFraming)  # before the key: any request so framed closes its connection
    app.add_middleware(OpenAIErrorBodies)
    app.add_middleware(TEIErrorBodies)
    app.add_middleware(RequestMetrics, metrics=metrics)  # added last: outermost, so it sees 401 and 413 too

    def check_limits(texts, field="texts"):
        if len(texts) > max_texts:
            raise HTTPException(413, f"{field}: {len(texts)} texts, at most {max_texts} per request")
        for index, text in enumerate(texts):
            if len(text) > max_chars:
                raise HTTPException(413, f"{field}[{index}]: {len(text)} characters, at most {max_chars}")
            if not text.strip():
                raise HTTPException(422, f"{field}[{index}]: empty or whitespace-only text")

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/info")
    async def info():
        details = dict(service.info())
        details.update({"max_texts": max_texts, "max_chars": max_chars, "max_batch_size": max_batch_size,
                        "max_batch_tokens": max_batch_tokens, "max_queue": max_queue,
                        "pid": os.getpid()})  # which worker answered, with --workers
        if service.kind == "vector":
            details["corpus_size"] = len(corpus.ids) if corpus is not None else 0
        details.update(tei_info_fields(details, max_texts, max_queue, max_batch_size))
        return details

    @app.get("/metrics")
    async def prometheus_metrics():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    for path, endpoint in (("/health", health), ("/metrics", prometheus_metrics)):  # load balancers may check with HEAD
        app.add_api_route(path, endpoint, methods=["HEAD"], include_in_schema=False)
    add_model_list_routes(app, service)

    if service.kind == "vector":
        add_vector_routes(app, service, batcher, check_limits, corpus)
    elif service.kind == "rerank":
        add_rerank_route(app, service, batcher, check_limits)
    else:
        add_predict_route(app, service, batcher, check_limits, max_chars)
    add_tokenizer_routes(app, service, max_texts, check_limits)
    model_paths.update(route.path for route in app.routes if route.path in ROUTE_KINDS)
    add_unserved_routes(app, service.kind)
    metrics.routes.update(route.path for route in app.routes)
    return app


def tei_info_fields(details, max_texts, max_queue, max_batch_size):
    """The fields of text-embeddings-inference's GET /info (router/src/lib.rs, ``Info``) that this server can
    fill, from its own ``details``: the model, its type and the request limits."""
    kind = details["kind"]
    if kind == "vector":
        model_type = {"embedding": {"pooling": details.get("pooling") or "unknown"}}
        max_input_length = max(filter(None, (details.get("query_max_length"), details.get("doc_max_length"),
                                             details.get("max_length"))), default=None)
    else:
        labels = details.get("labels") or []
        model_type = {"reranker" if kind == "rerank" else "classifier": {
            "id2label": {str(index): label for index, label in enumerate(labels)},
            "label2id": {label: index for index, label in enumerate(labels)}}}
        max_input_length = None if kind == "longdoc" else details.get("max_length")  # longdoc: every chunk is read
    return {"model_id": details.get("model") or kind, "model_type": model_type, "max_input_length": max_input_length,
            "max_client_batch_size": max_texts, "max_concurrent_requests": max_queue,
            "max_batch_requests": max_batch_size, "auto_truncate": True}


def add_model_list_routes(app, service):
    """GET /v1/models and /v1/models/{id} in OpenAI's shape: the one model served (``client.models.list()``,
    which RAG front-ends call to check a connection)."""
    model = {"id": service.info().get("model") or service.kind, "object": "model", "created": int(time.time()),
             "owned_by": "bert-toolkit", "kind": service.kind}

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [model]}

    @app.get("/v1/models/{model_id:path}")
    async def retrieve_model(model_id: str):
        if model_id != model["id"]:
            raise HTTPException(404, f"no such model: this server runs {model['id']!r} only")
        return model


async def count_tokens(service, *arguments):
    """The service's token counts for these texts (in a thread: tokenizing 64 long texts takes a while), or None.

    A text the service refuses is its 422, before queueing (a full queue answered 429 before the body was read).
    """
    counter = getattr(service, "count_tokens", None)
    return None if counter is None else await asyncio.to_thread(counter, *arguments)


def add_vector_routes(app, service, batcher, check_limits, corpus):
    """POST /encode, /similarity (ours or TEI's shape), /search (the last needs a corpus), the OpenAI-style
    /v1/embeddings and TEI's /embed (and /, TEI's embed or, for its ``inputs`` object, its similarity)."""
    details = service.info()
    max_lengths = {"query": details.get("query_max_length"), "document": details.get("doc_max_length")}

    async def embed(texts, side, field, truncate=True):
        """(embeddings, tokens per text or None) of ``texts`` on ``side`` ("query" | "document"); with
        ``truncate`` False a text longer than the side's max length is the client's 422, as in TEI."""
        check_limits(texts, field)
        side_name = "doc" if side == "document" else "query"
        if truncate:
            tokens = await count_tokens(service, texts, side_name)
        else:
            if getattr(service, "count_tokens", None) is None or max_lengths[side] is None:
                raise HTTPException(422, "truncate: false is not supported: this model cannot count its tokens "
                                         "(leave truncate out, or send true)")
            tokens = await count_tokens(service, texts, side_name, False)
            refuse_long_inputs(tokens, max_lengths[side], lambda index, count: f"{field}[{index}]: {count} tokens, "
                               f"the model takes {max_lengths[side]} on the {side} side")
        embeddings = await batcher.submit("encode_documents" if side == "document" else "encode", texts, tokens)
        return embeddings, tokens

    @app.post("/encode")
    async def encode(request: EncodeRequest):
        embeddings, _ = await embed(request.texts, request.side, "texts")
        return {"embeddings": embeddings, "dim": len(embeddings[0]) if embeddings else 0}

    async def tei_similarity(request: TEISimilarityRequest):
        """TEI's answer: the cosine of each sentence with the source sentence, all embedded as /embed would."""
        parameters = request.parameters or SimilarityParameters()
        side = "query" if parameters.prompt_name == "query" else "document"
        truncate = parameters.truncate is not False
        check_limits([request.inputs.source_sentence], "inputs.source_sentence")
        check_limits(request.inputs.sentences, "inputs.sentences")
        (source, _), (sentences, _) = await asyncio.gather(
            embed([request.inputs.source_sentence], side, "inputs.source_sentence", truncate),
            embed(request.inputs.sentences, side, "inputs.sentences", truncate))
        return (inference.normalize_rows(sentences) @ inference.normalize_rows(source)[0]).tolist()

    @app.post("/similarity")
    async def similarity(body: either_body(SimilarityRequest, TEISimilarityRequest)):
        request = parse_request(body, SimilarityRequest, TEISimilarityRequest)
        if isinstance(request, TEISimilarityRequest):
            return await tei_similarity(request)
        check_limits([request.query], "query")
        check_limits(request.documents, "documents")
        (query_vector, _), (doc_vectors, _) = await asyncio.gather(embed([request.query], "query", "query"),
                                                                   embed(request.documents, "document", "documents"))
        scores = inference.normalize_rows(doc_vectors) @ inference.normalize_rows(query_vector)[0]
        ranking = np.argsort(-scores, kind="stable")
        return {"scores": [float(score) for score in scores], "ranking": [int(index) for index in ranking]}

    @app.post("/search")
    async def search(request: SearchRequest):
        if corpus is None:
            raise HTTPException(404, "no corpus loaded: start the server with --corpus FILE")
        query_vector, _ = await embed([request.query], "query", "query")
        hits = inference.nearest_rows(corpus.matrix, query_vector, request.top_k)[0]
        return {"results": [{"id": corpus.ids[row], "text": corpus.texts[row], "score": score} for row, score in hits]}

    model_name = service.info().get("model") or service.kind
    dim = service.info().get("dim")

    sizes = sorted({dim, *(service.info().get("matryoshka_dims") or [])}, reverse=True)  # --matryoshka-dims

    @app.post("/v1/embeddings")
    async def openai_embeddings(request: EmbeddingsRequest):
        check_dimensions(request.dimensions, sizes)
        embeddings, tokens = await embed(request.input, request.side, "input")
        if request.dimensions not in (None, dim):  # a Matryoshka prefix, renormalised
            embeddings = cut_embeddings(embeddings, request.dimensions).tolist()
        token_count = sum(tokens or ())
        data = [{"object": "embedding", "index": index, "embedding": encode_embedding(row, request.encoding_format)}
                for index, row in enumerate(embeddings)]
        return {"object": "list", "data": data, "model": model_name,
                "usage": {"prompt_tokens": token_count, "total_tokens": token_count}}

    @app.post("/embed", summary="Embed (text-embeddings-inference's shape)")
    async def tei_embed(request: EmbedRequest):
        check_dimensions(request.dimensions, sizes)
        side = "query" if request.prompt_name == "query" else "document"
        embeddings, _ = await embed(request.inputs, side, "inputs", request.truncate)
        return cut_embeddings(embeddings, request.dimensions, request.normalize).tolist()

    # TEI serves its embed route at / too: what huggingface_hub's InferenceClient(model=URL) posts to, for
    # feature_extraction and for sentence_similarity (whose ``inputs`` is an object)
    @app.post("/", summary="Embed, or sentence similarity for an ``inputs`` object (text-embeddings-inference's)")
    async def tei_root(body: either_body(EmbedRequest, TEISimilarityRequest)):
        if isinstance(body.get("inputs"), dict):
            return await tei_similarity(validate_body(TEISimilarityRequest, body))
        return await tei_embed(validate_body(EmbedRequest, body))


def refuse_long_inputs(tokens, max_length, describe):
    """With ``truncate: false`` an input over the model's max length is the client's 422, as in TEI (since v1.9;
    it answered 413 before). ``describe(index, count)`` says which input and how long it is."""
    for index, count in enumerate(tokens or ()):
        if count > max_length:
            raise HTTPException(422, f"{describe(index, count)}; send truncate: true to cut it")


def cut_embeddings(embeddings, dimensions=None, normalize=True):
    """The first ``dimensions`` values of each embedding (all with None), L2-normalised when ``normalize``."""
    rows = np.asarray(embeddings, dtype=np.float32)[:, :dimensions]
    return inference.normalize_rows(rows) if normalize else rows


def check_dimensions(requested, sizes):
    """Refuse a ``dimensions`` the model does not give (400); ``sizes``: the full size first, then the
    --matryoshka-dims prefixes."""
    if requested is None or requested in sizes:
        return
    offered = f"{sizes[0]}-dimensional embeddings only; leave dimensions out or send {sizes[0]}" if len(sizes) == 1 \
        else f"embeddings of {', '.join(map(str, sizes))} values (--matryoshka-dims); send one of them"
    raise HTTPException(400, f"dimensions: {requested} requested, but this model gives {offered}")


def encode_embedding(row, encoding_format):
    """One embedding as OpenAI sends it: a list of floats, or base64 of its little-endian float32 bytes."""
    if encoding_format == "base64":
        return base64.b64encode(np.asarray(row, dtype="<f4").tobytes()).decode("ascii")
    return row


def add_predict_route(app, service, batcher, check_limits, max_chars):
    """POST /predict for classification and long-document services, in our shape or TEI's (and POST /, where
    TEI serves its predict for a classifier)."""
    labels = service.info().get("labels") or []

    async def run_predict(texts, contexts, field, context_field):
        """The service's results for ``texts`` and their ``contexts`` (None where a text has none)."""
        check_limits(texts, field)
        for index, context in enumerate(contexts):
            if context is not None and len(context) > max_chars:
                raise HTTPException(413, f"{context_field(index)}: {len(context)} characters, at most {max_chars}")
        tokens = await count_tokens(service, texts, contexts)
        return await batcher.submit("predict", list(zip(texts, contexts)), tokens)

    async def tei_predict(request: TEIPredictRequest, batch):
        """TEI's answer: each input's labels with their scores, best first; a list of them for a batch."""
        if request.truncate is False and service.kind != "longdoc":  # a long-document model reads every chunk
            raise HTTPException(422, "truncate: false is not supported: texts are cut at the model's max length "
                                     "(leave truncate out, or send true)")
        top_k = request.parameters.top_k if request.parameters is not None else None
        results = await run_predict([sequence[0] for sequence in request.inputs],
                                    [sequence[1] if len(sequence) == 2 else None for sequence in request.inputs],
                                    "inputs", lambda index: f"inputs[{index}][1]")
        if request.raw_scores and not all("logits" in result for result in results):
            raise HTTPException(422, "raw_scores: true is not supported: this model's service gives no logits "
                                     "(leave raw_scores out, or send false)")
        answers = [tei_predictions(result, labels, top_k, request.raw_scores) for result in results]
        return answers if batch else answers[0]

    @app.post("/predict")
    async def predict(body: either_body(PredictRequest, TEIPredictRequest)):
        request = parse_request(body, PredictRequest, TEIPredictRequest)
        if isinstance(request, TEIPredictRequest):  # TEI answers a list per input when inputs is a list of lists
            inputs = body["inputs"]
            return await tei_predict(request, isinstance(inputs, list) and isinstance(inputs[0], list))
        contexts = request.contexts if request.contexts is not None else [None] * len(request.texts)
        if len(contexts) != len(request.texts):
            raise HTTPException(422, f"contexts: {len(contexts)} given for {len(request.texts)} texts")
        results = await run_predict(request.texts, contexts, "texts", lambda index: f"contexts[{index}]")
        return {"predictions": [without_logits(result) for result in results]}

    app.add_api_route("/", predict, methods=["POST"], summary="Predict (as /predict; TEI serves it at / too)")


def without_logits(result):
    """A service's result without the ``logits`` it carries for TEI's raw_scores (our shape answers without them)."""
    return {key: value for key, value in result.items() if key != "logits"}


def tei_predictions(result, labels, top_k=None, raw_scores=False):
    """One of our prediction results as TEI's ``[{"score", "label"}]``, best first (the model's label order among
    equal scores): every label's probability, or a regression model's one score; with ``raw_scores``, every
    label's logit (the head's outputs, as TEI's: no softmax or sigmoid, and no temperature)."""
    if raw_scores:
        scores = dict(zip(labels or [str(index) for index in range(len(result["logits"]))], result["logits"]))
    else:
        scores = result.get("probabilities") or {labels[0] if labels else "score": result["score"]}
    ranked = sorted(scores.items(), key=lambda item: -item[1])[:top_k]
    return [{"score": score, "label": label} for label, score in ranked]


def add_rerank_route(app, service, batcher, check_limits):
    """POST /rerank (and /, as TEI serves it for a reranker) in text-embeddings-inference's shape: the texts'
    indices, best first."""
    @app.post("/rerank")
    @app.post("/", summary="Rerank (as /rerank; TEI serves it at / too)")
    async def rerank(request: RerankRequest):
        check_limits([request.query], "query")
        check_limits(request.texts)
        queries = [request.query] * len(request.texts)
        tokens = await count_tokens(service, queries, request.texts, request.truncate)
        if not request.truncate:
            refuse_long_inputs(tokens, service.max_length, lambda index, count: f"texts[{index}]: the query and "
                               f"this text are {count} tokens, the model takes {service.max_length}")
        logits = np.asarray(await batcher.submit("rerank", list(zip(queries, request.texts)), tokens))
        scores = logits if request.raw_scores else inference.sigmoid(logits)
        ranking = np.argsort(-scores, kind="stable")[:request.top_n]
        return [{"index": int(index), "score": float(scores[index]),
                 **({"text": request.texts[index]} if request.return_text else {})} for index in ranking]


def add_tokenizer_routes(app, service, max_texts, check_limits):
    """POST /tokenize and /decode in text-embeddings-inference's shape, for every kind of model. The tokenizer is
    cheap: they run in a thread of their own, not through the MicroBatcher (their queue place, taken by
    QueueAdmission, is given back when the request ends)."""
    def require(method):
        if getattr(service, method, None) is None:
            raise HTTPException(404, f"this server's {service.kind} model has no tokenizer")
        return getattr(service, method)

    @app.post("/tokenize", summary="Tokenize (text-embeddings-inference's shape)")
    async def tokenize(request: TokenizeRequest):
        tokenize_texts = require("tokenize")
        check_limits(request.inputs, "inputs")
        return await asyncio.to_thread(tokenize_texts, request.inputs, request.add_special_tokens,
                                       request.prompt_name)

    @app.post("/decode", summary="Decode token ids (text-embeddings-inference's shape)")
    async def decode(body: Annotated[dict, Body(), WithJsonSchema(inlined_schema(DecodeRequest))]):
        request = validate_body(DecodeRequest, body)
        decode_ids = require("decode")
        if len(request.ids) > max_texts:
            raise HTTPException(413, f"ids: {len(request.ids)} sequences, at most {max_texts} per request")
        single = not isinstance(body["ids"][0], list)  # a list of ints: one sequence, located as ids[position]
        vocabulary_size = service.vocabulary_size
        for index, ids in enumerate(request.ids):
            for position, token_id in enumerate(ids):
                if token_id >= vocabulary_size:
                    where = f"ids[{position}]" if single else f"ids[{index}][{position}]"
                    raise HTTPException(422, f"{where}: {token_id} is not a token id of this model (0 to "
                                             f"{vocabulary_size - 1})")
        return await asyncio.to_thread(decode_ids, request.ids, request.skip_special_tokens)


ALL_KINDS = ("vector", "classification", "longdoc", "rerank")
# the model kinds each route is for: on a server for another kind it answers 404 saying so
ROUTE_KINDS = {"/encode": ("vector",), "/similarity": ("vector",), "/search": ("vector",),
               "/v1/embeddings": ("vector",), "/embed": ("vector",), "/": ALL_KINDS,
               "/predict": ("classification", "longdoc"), "/rerank": ("rerank",),
               "/tokenize": ALL_KINDS, "/decode": ALL_KINDS}


def add_unserved_routes(app, kind):
    """POST routes of the other kinds of model, each a 404 naming the kind it needs (not a bare "Not Found")."""
    served = {route.path for route in app.routes}
    for path, kinds in ROUTE_KINDS.items():
        if path in served:
            continue
        detail = (f"POST {path} is for {' and '.join(kinds)} models; this server runs a {kind} model "
                  "(GET /info lists it)")
        app.add_api_route(path, refusal(404, detail), methods=["POST"], include_in_schema=False)


def refusal(status, detail):
    """An endpoint that answers ``status`` with ``detail`` whatever it is sent (its body is not read)."""
    async def refuse():
        raise HTTPException(status, detail)
    return refuse


def install_error_handlers(app):
    """Every error as a JSON body; a UserError from the service (bad text) is the client's 422."""

    @app.exception_handler(UserError)
    async def user_error(request, error):
        return ErrorResponse({"detail": str(error)}, status_code=422)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, error):
        # the offending input is left out: it may be megabytes, or not encodable at all
        errors = [{"loc": list(item.get("loc", ())), "msg": item.get("msg"), "type": item.get("type")}
                  for item in error.errors()]
        content_type = request.headers.get("content-type", "")
        if "json" not in content_type.lower():  # FastAPI ignores a form or text body: say why it was empty
            errors.insert(0, {"loc": ["header", "content-type"], "type": "content_type",
                              "msg": f"expected application/json, got {content_type or 'no content type'!r}"})
        return ErrorResponse({"detail": errors}, status_code=422)

    @app.exception_handler(ServerBusy)
    async def server_busy(request, error):
        return busy_response(error)

    @app.exception_handler(ClientDisconnect)
    async def client_gone(request, error):
        # the client left (or was cut off by a read deadline) mid-body: nobody to answer, nothing to log
        return ErrorResponse({"detail": "client disconnected"}, status_code=400)

    @app.exception_handler(Exception)
    async def unexpected_error(request, error):
        print(f"error while serving {request.url.path}: {type(error).__name__}: {error}", file=sys.stderr)
        return ErrorResponse({"detail": "internal error"}, status_code=500)


# ---------------------------------------------------------------- running

class BoundedH11Protocol(H11Protocol):
    """uvicorn's h11 connection with a deadline for reading each request and a cap on open connections.

    The deadline runs while the client owes us bytes: from the connection opening (or the previous
    response) until the headers are parsed, then until the body is complete. It is off while the app
    runs. On expiry a client that sent part of a request gets 408; the connection is closed either way.
    A response of which the client takes no byte for ``write_timeout`` seconds drops the connection.
    ``bounded_protocol()`` makes a subclass with other limits (tests use a 1 s deadline). The answers
    written here, outside the app (400, 408, 503), are counted in ``metrics`` (the app's ServerMetrics).
    """
    header_timeout = HEADER_TIMEOUT_SECONDS
    body_timeout = BODY_TIMEOUT_SECONDS
    write_timeout = WRITE_TIMEOUT_SECONDS
    max_connections = MAX_CONNECTIONS
    metrics = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.read_phase = None  # "headers" | "body" | None (nothing owed by the client)
        self.read_timer = None
        self.write_timer = None
        self.unsent_at_timer = 0  # unsent_bytes() when the write clock started

    def connection_made(self, transport):
        """Refuse a connection past the cap; otherwise start the clock on the first request's headers."""
        super().connection_made(transport)
        # uvicorn's limit_concurrency answers 503 only once headers arrive: it cannot bound silent sockets
        if len(self.connections) > self.max_connections:
            self.reply_and_close(503, f"too many open connections (limit {self.max_connections}); retry later")
            return
        self.update_read_deadline()

    def data_received(self, data):
        """Let h11 parse, then move the deadline to whatever the client still owes."""
        super().data_received(data)
        self.update_read_deadline()

    def on_response_complete(self):
        """After a response a kept-alive connection owes the next request's headers."""
        super().on_response_complete()
        self.update_read_deadline()

    def connection_lost(self, exc):
        """Stop the clocks (a timer must not fire on a closed connection)."""
        self.set_read_phase(None)
        self.stop_write_timer()
        super().connection_lost(exc)

    def pause_writing(self):
        """The transport's buffer is full (the client reads slower than we write): start the clock."""
        super().pause_writing()
        if self.write_timer is None:
            self.start_write_timer()

    def resume_writing(self):
        """The buffer drained: the client is reading."""
        super().resume_writing()
        self.stop_write_timer()

    def start_write_timer(self):
        """Give the client ``write_timeout`` seconds to take some of what is unsent now."""
        self.unsent_at_timer = unsent_bytes(self.transport)
        self.write_timer = self.loop.call_later(self.write_timeout, self.on_write_timeout)

    def stop_write_timer(self):
        """Cancel the write clock, if it runs."""
        if self.write_timer is not None:
            self.write_timer.cancel()
            self.write_timer = None

    def on_write_timeout(self):
        """No byte left the buffer for ``write_timeout`` s: drop the connection and the unsent bytes (the
        waiting response then returns, as for a client that left). A client still reading, however
        slowly, gets another period: one large answer may take longer than one period to send."""
        self.write_timer = None
        if unsent_bytes(self.transport) < self.unsent_at_timer:
            self.start_write_timer()
            return
        self.transport.abort()

    def send_400_response(self, msg):
        """A request h11 cannot parse: 400, as JSON like every other error (uvicorn writes plain text)."""
        self.reply_and_close(400, msg)

    def update_read_deadline(self):
        """Arm, keep or cancel the timer from what h11 says the client still has to send."""
        phase = {h11.IDLE: "headers", h11.SEND_BODY: "body"}.get(self.conn.their_state)
        self.set_read_phase(None if self.transport.is_closing() else phase)

    def set_read_phase(self, phase):
        """Restart the timer when the phase changes; None stops it."""
        if phase == self.read_phase:
            return  # the deadline covers the whole phase, not the gap between two packets
        if self.read_timer is not None:
            self.read_timer.cancel()
            self.read_timer = None
        self.read_phase = phase
        if phase is not None:
            timeout = self.header_timeout if phase == "headers" else self.body_timeout
            self.read_timer = self.loop.call_later(timeout, self.on_read_timeout)

    def on_read_timeout(self):
        """The client took too long: 408 if it had started a request, then close the connection."""
        phase, self.read_timer, self.read_phase = self.read_phase, None, None
        if self.transport.is_closing():
            return
        cycle = self.cycle if phase == "body" else None
        if cycle is not None:
            cycle.disconnected = True  # the app reading the body sees a disconnect; its answer is dropped
            cycle.scope[READ_TIMEOUT_SCOPE_KEY] = True  # ... and RequestMetrics counts it as this 408
        started = phase == "body" or bool(self.conn.trailing_data[0])
        if started and not (cycle is not None and cycle.response_started):
            timeout = self.header_timeout if phase == "headers" else self.body_timeout
            self.reply_and_close(408, f"request {phase} not received within {timeout:g} s",
                                 counted_by_app=cycle is not None)
        else:
            self.transport.close()  # an idle connection that never started a request: just close it

    def reply_and_close(self, status, detail, counted_by_app=False):
        """Write a whole JSON error response outside h11's state machine (the connection ends here), and
        count it unless the app counts it (a body cut off by the deadline is answered in the app's route)."""
        if self.metrics is not None and not counted_by_app:
            self.metrics.observe_request(None, status, 0.0)
        body = json.dumps({"detail": detail}).encode()
        head = (f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}\r\ncontent-type: application/json\r\n"
                f"content-length: {len(body)}\r\nconnection: close\r\n\r\n").encode()
        self.transport.write(head + body)
        self.transport.close()


def unsent_bytes(transport):
    """Bytes written and not yet taken by the client: the transport's buffer, plus the socket's send queue
    where the system says (Linux's TIOCOUTQ). The buffer alone refills only once the kernel's queue is half
    empty, which for a slow reader can take longer than the write timeout."""
    unsent = transport.get_write_buffer_size()
    try:
        import fcntl
        import termios
        queue = fcntl.ioctl(transport.get_extra_info("socket").fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
        unsent += int.from_bytes(queue, sys.byteorder)
    except (ImportError, AttributeError, OSError):  # no such call here (Windows), or the socket is gone
        pass
    return unsent


def bounded_protocol(header_timeout=HEADER_TIMEOUT_SECONDS, body_timeout=BODY_TIMEOUT_SECONDS,
                     max_connections=MAX_CONNECTIONS, write_timeout=WRITE_TIMEOUT_SECONDS, metrics=None):
    """A ``BoundedH11Protocol`` subclass with these limits (uvicorn builds one instance per connection)."""
    limits = {"header_timeout": header_timeout, "body_timeout": body_timeout, "max_connections": max_connections,
              "write_timeout": write_timeout, "metrics": metrics}
    return type("BoundedH11Protocol", (BoundedH11Protocol,), limits)


def build_server(app, host=DEFAULT_HOST, port=8000, graceful_seconds=GRACEFUL_SHUTDOWN_SECONDS, log_level="info",
                 header_timeout=HEADER_TIMEOUT_SECONDS, body_timeout=BODY_TIMEOUT_SECONDS,
                 max_connections=MAX_CONNECTIONS, write_timeout=WRITE_TIMEOUT_SECONDS):
    """The ``uvicorn.Server`` that ``serve()`` runs, with the read and write deadlines and connection cap
    applied (and their answers counted in the app's metrics)."""
    metrics = getattr(getattr(app, "state", None), "metrics", None)
    protocol = bounded_protocol(header_timeout, body_timeout, max_connections, write_timeout, metrics)
    # ws="none": there are no websocket routes, and an upgrade would hand the socket to a protocol
    # without these deadlines
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=graceful_seconds, timeout_keep_alive=KEEP_ALIVE_SECONDS,
                            http=protocol,
                            h11_max_incomplete_event_size=MAX_HEADER_BYTES, ws="none")
    return uvicorn.Server(config)


def serve(app, host=DEFAULT_HOST, port=8000, graceful_seconds=GRACEFUL_SHUTDOWN_SECONDS, log_level="info",
          workers=1, has_key=None, **limits):
    """Run uvicorn; on SIGTERM/SIGINT it stops accepting, finishes in-flight requests, then exits.

    ``workers`` > 1: ``app`` is a picklable zero-argument callable that builds the app, called in
    each of ``workers`` processes (see ``serve_workers``); ``has_key`` says whether it needs an API key.
    ``limits`` (header_timeout, body_timeout, max_connections, write_timeout) default to the module's constants.
    """
    has_key = getattr(getattr(app, "state", None), "has_key", False) if has_key is None else has_key
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: listening on {host}: reachable from other machines"
              + ("" if has_key else " without an API key (consider --api-key)"), file=sys.stderr)
    if workers > 1:
        return serve_workers(app, workers, host, port, graceful_seconds, log_level, **limits)
    sock = bind_port(host, port, shared=False)  # bound here: a busy port is one line, not uvicorn's log
    build_server(app, host, port, graceful_seconds, log_level, **limits).run(sockets=[sock])
    return 0


# ---------------------------------------------------------------- several worker processes

WORKER_STARTUP_FAILED = 2  # a worker's app could not be built (a UserError): every worker would fail the same way
WORKER_POLL_SECONDS = 0.5


def bind_port(host, port, shared=True):
    """A TCP socket bound to (host, port), or one line when the port is taken or the host unknown.

    ``shared``: SO_REUSEPORT, so every worker binds one and the kernel spreads new connections across
    them by their address hash (a shared accept queue would wake them all for each one).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if shared:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        raise UserError(f"--port {port}: cannot listen on {host} ({error.strerror or error})") from None
    return sock


def serve_workers(build_app, workers, host=DEFAULT_HOST, port=8000, graceful_seconds=GRACEFUL_SHUTDOWN_SECONDS,
                  log_level="info", **limits):
    """Run ``workers`` server processes on one port (SO_REUSEPORT), each with its own model and micro-batcher.

    The processes are started with "spawn" (a fresh interpreter: no torch state forked mid-use) and each
    calls ``build_app()``. A worker that dies after building its app is started again; one that dies
    before stops them all (exit 2 for a UserError, else 1), since every new one would die the same way.
    SIGTERM or SIGINT here is passed on once as SIGTERM, so each worker drains its requests in flight,
    as a single server does. Each worker uses its share of the CPU cores for the model.
    """
    if not hasattr(socket, "SO_REUSEPORT"):
        raise UserError("--workers: this platform has no SO_REUSEPORT; run one server per port behind a "
                        "load balancer instead")
    bind_port(host, port).close()  # the port is free (or this fails with one line) before any model loads
    context = multiprocessing.get_context("spawn")
    threads = max(1, (os.cpu_count() or 1) // workers)
    settings = (build_app, host, port, graceful_seconds, log_level, limits, threads, os.getpid())

    def start_worker():
        ready = context.Event()  # set by the worker once its app is built
        process = context.Process(target=run_worker, args=(*settings, ready), daemon=False)
        process.start()
        return process, ready

    stopping = threading.Event()
    previous = {signum: signal.signal(signum, lambda *_: stopping.set()) for signum in (signal.SIGTERM, signal.SIGINT)}
    workers_started, exit_code = [start_worker() for _ in range(workers)], 0
    try:
        while not stopping.wait(WORKER_POLL_SECONDS):
            for index, (process, ready) in enumerate(workers_started):
                if process.is_alive():
                    continue
                if not ready.is_set():
                    exit_code = WORKER_STARTUP_FAILED if process.exitcode == WORKER_STARTUP_FAILED else 1
                    stopping.set()
                    break
                print(f"worker {process.pid} exited ({process.exitcode}); starting another", file=sys.stderr)
                workers_started[index] = start_worker()
    finally:
        processes = [process for process, _ in workers_started]
        for process in processes:
            if process.is_alive():
                os.kill(process.pid, signal.SIGTERM)
        for process in processes:
            process.join(graceful_seconds + 10)
            if process.is_alive():
                process.kill()
                process.join()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return exit_code


def run_worker(build_app, host, port, graceful_seconds, log_level, limits, threads, parent_pid, ready):
    """One worker process: build the app (then set ``ready``), and serve it on its own SO_REUSEPORT socket until
    SIGTERM."""
    os.setpgrp()  # Ctrl-C reaches the parent only, which passes on one SIGTERM (two would cut requests short)
    threading.Thread(target=exit_with_parent, args=(parent_pid,), daemon=True).start()
    import torch
    torch.set_num_threads(threads)
    try:
        app = build_app()
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(WORKER_STARTUP_FAILED) from None
    ready.set()
    build_server(app, host, port, graceful_seconds, log_level, **limits).run(sockets=[bind_port(host, port)])


def exit_with_parent(parent_pid):
    """Stop this worker (gracefully) when the process that started it is gone, even after a SIGKILL."""
    while os.getppid() == parent_pid:
        time.sleep(1)
    os.kill(os.getpid(), signal.SIGTERM)
