"""An OpenAI-compatible HTTP server over the one generation engine (zeda/generation.py), for one model folder.

    app = create_app(model, tokenizer, "qwen3_moe_teacher", ServerOptions(max_batch_size=16))
    serve_forever(app, listen("127.0.0.1", 8000))      # what `python serve.py --port 8000` runs

Endpoints: POST /v1/chat/completions and POST /v1/completions (JSON, or server-sent events with
"stream": true), GET /v1/models, GET /health. FastAPI routes and validates, uvicorn speaks HTTP; this file only
says what a request means and how requests share the engine.

Batching (continuous): one worker thread owns a generation.Decoder of --max-batch-size rows. Between two decode
steps it moves the requests that are waiting into the free rows (their prompts are prefilled and join the
shared KV cache), then runs one step for every row; each row has its own SamplingParams and seed, so a seeded
request samples exactly what it would alone. After each step the worker decodes each row's token, streams the
new text to that row's client and ends the row at EOS, at a stop string or at its max_tokens -- its client gets
the full answer and usage at once -- or when its client has gone; its row is free for the next request at the
next step. Requests beyond the free rows wait in a queue of at most --max-queue (beyond it: 503 with
Retry-After).

Routing cost per response (docs/method.md §6): `usage` carries, besides OpenAI's token counts,
`zero_expert_ratio` (share of the answer's routed slots that went to zero experts, from the engine's per-token
real/zero slot counts of that row) and `expert_flops_saved` against the static original (1 - dynamic /
static expert FLOPs; every real slot costs the same, so it equals the ratio). A static checkpoint reports 0 for
both. Streams always end with a chunk carrying usage (as OpenAI's stream_options.include_usage does, but
unasked: the routing cost is the point of this server), then `data: [DONE]`.

Errors are OpenAI's shape, {"error": {"message", "type", "param", "code"}}: 400 invalid_request_error naming the
field for malformed JSON (not UTF-8, nested too deeply, cut short), a missing or wrong-typed field, a bad value or
a prompt longer than the context; 404 (code "model_not_found") for another model name; 413 for a body over
--max-request-bytes; 408 for a request that does not arrive within --request-timeout; 503 (Retry-After) when the
queue is full. Request fields this engine has no use for (penalties, logit_bias, user, tools, ...) are ignored;
n > 1 is refused.

Hostile clients (the last section): a body over --max-request-bytes is refused before it is read; a prompt longer
than context x the longest vocabulary entry is refused by its character count before it is tokenized, and
tokenizing happens in a thread, so /health and the streams go on meanwhile; a half-sent request is closed after
--request-timeout, an idle keep-alive connection after --keep-alive; at --limit-concurrency connections a new
one closes the one that has waited longest for a request, and the open-file limit is raised to its hard limit.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import json
import random
import resource
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Annotated, Literal

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError
from starlette.exceptions import HTTPException
from uvicorn.protocols.http.h11_impl import H11Protocol

from zeda.data import encode_chat
from zeda.evaluation import pad_id, stop_ids
from zeda.generation import Decoder, Row, SamplingParams
from zeda.model import CausalLM

RETRY_AFTER_S = 1  # what a 503 tells the client to wait: about one answer of a small model
DISCONNECT_POLL_S = 0.5  # how often a non-streaming request checks that its client is still there
GRACEFUL_SHUTDOWN_S = 5  # after SIGTERM, how long answers in progress may take to finish
SEED_BITS = 63  # a request without a seed gets a random one of these bits: every row has its own generator
MAX_STOP_STRINGS = 16
# Limits against clients that send too much, too slowly or too many connections (serve.py's flags set them).
MAX_REQUEST_BYTES = 1 << 20  # 1 MiB: a chat prompt that fills a 128k-token context is ~0.5 MB of text
REQUEST_TIMEOUT_S = 10.0  # a request's headers and body must arrive within this, else 408 and the socket closes
KEEP_ALIVE_S = 5  # an idle keep-alive connection is closed after this (uvicorn's timeout_keep_alive)
MAX_CONNECTIONS = 1000  # open connections at most (uvicorn's limit_concurrency; see GuardedH11Protocol)
FD_RESERVE = 128  # open files the process needs besides its sockets (libraries, model files, pipes, threads)


# ---------------------------------------------------------------------------------------------------------------
# Requests: the fields we read, validated strictly ("0.5" is not a number, nan is not a temperature).

Temperature = Annotated[float, Field(ge=0, allow_inf_nan=False)]
TopP = Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)]


class Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class TextPart(Strict):
    type: Literal["text"]
    text: str


class Message(Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None

    def as_template_message(self) -> dict:
        """{"role", "content": str}: what the chat template reads (developer is the newer name of system)."""
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content or [])
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class Sampling(Strict):
    """The fields both endpoints share. None: the server's default (serve.py's flags)."""

    model: str | None = None  # optional here (curl convenience); the openai client always sends it
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    top_k: Annotated[int, Field(ge=0)] | None = None  # not OpenAI's, but vLLM's and the paper's (0 = off)
    seed: Annotated[int, Field(ge=0, lt=2 ** SEED_BITS)] | None = None
    stop: Annotated[str, Field(min_length=1)] | list[Annotated[str, Field(min_length=1)]] | None = None
    stream: bool = False
    n: Annotated[int, Field(ge=1, le=1)] = 1  # one answer per request

    @field_validator("stop")
    @classmethod
    def few_stop_strings(cls, stop):
        # here, not as the list's max_length: a union reports a too-long list as "should be a valid string" too
        if isinstance(stop, list) and len(stop) > MAX_STOP_STRINGS:
            raise PydanticCustomError("too_many_stops", "at most {limit} stop strings, not {count}",
                                      {"limit": MAX_STOP_STRINGS, "count": len(stop)})
        return stop


class ChatRequest(Sampling):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None  # the newer name of max_tokens
    chat_template_kwargs: dict | None = None  # variables for the chat template (vLLM's and SGLang's field)


class CompletionRequest(Sampling):
    prompt: str


@dataclass
class ServerOptions:
    """What serve.py's flags set: request defaults, and how requests share the engine."""

    temperature: float = 0.6  # the paper's evaluation sampling (docs/method.md §6)
    top_p: float = 0.95
    top_k: int = 20
    max_tokens: int = 256  # a request without max_tokens: this, or what the context leaves if less
    max_batch_size: int = 16
    max_queue: int = 64
    max_request_bytes: int = MAX_REQUEST_BYTES  # a larger body gets 413 before it is read
    request_timeout: float = REQUEST_TIMEOUT_S  # these three are the HTTP layer's (uvicorn_config)
    keep_alive: int = KEEP_ALIVE_S
    max_connections: int = MAX_CONNECTIONS
    chat_template_kwargs: dict = field(default_factory=dict)  # a request's own chat_template_kwargs win


class ApiError(Exception):
    """An error response in OpenAI's shape."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code
        self.headers = headers

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


def _is_branch(part) -> bool:
    """A union branch in a pydantic error location ("str", "list[TextPart]", "constrained-str"), not a field."""
    return isinstance(part, str) and (part in ("str", "int", "float", "bool") or "[" in part or "-" in part)


def validation_error(exc: RequestValidationError) -> ApiError:
    """pydantic's complaint about the first bad field as a 400 naming it ("messages.0.content"). A union field
    fails once per branch; the deepest complaint is the one about what the client actually sent."""
    errors = exc.errors()
    first = errors[0]
    if first.get("type") == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", first.get("msg", ""))
        return ApiError(400, f"the request body is not valid JSON: {detail}")
    loc = tuple(first.get("loc", ()))
    field_loc = loc[:next((i for i, part in enumerate(loc) if _is_branch(part)), len(loc))]
    error = max((e for e in errors if tuple(e.get("loc", ()))[:len(field_loc)] == field_loc),
                key=lambda e: len(e.get("loc", ())))
    path = [str(part) for part in error.get("loc", ()) if part != "body" and not _is_branch(part)]
    if not path or path[0].isdigit():  # the body itself: absent, or not a JSON object
        return ApiError(400, f"the request body must be a JSON object: {first.get('msg', '')}")
    param = ".".join(path)
    return ApiError(400, f"{param}: {error.get('msg', 'invalid value')}", param)


def http_error(request: Request, exc: HTTPException) -> ApiError:
    """starlette's and FastAPI's own errors in OpenAI's shape. FastAPI turns a body that json.loads cannot even
    start on (not UTF-8, nested deeper than Python's recursion limit) into a bare 400 "error parsing the body":
    its cause says which."""
    cause = exc.__cause__
    if isinstance(cause, UnicodeDecodeError):
        return ApiError(400, f"the request body is not valid JSON: it is not UTF-8 text ({cause.reason} at byte "
                        f"{cause.start})")
    if isinstance(cause, RecursionError):
        return ApiError(400, "the request body is not valid JSON: it is nested too deeply")
    if exc.status_code == 400 and cause is not None:
        return ApiError(400, f"the request body cannot be parsed: {type(cause).__name__}: {cause}")
    kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
    return ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", kind=kind,
                    headers=exc.headers)


# ---------------------------------------------------------------------------------------------------------------
# One answer's text as it grows: streamed as soon as it is final, cut at the first stop string.


class TextStream:
    """Decoded text of an answer token by token: push() returns the new text that is safe to send.

    Each new token is decoded together with the one before it and the text of that one alone is subtracted
    (vLLM's incremental detokenization): a BPE's leading spaces and multi-token characters come out as a whole
    decode would give them, at a constant cost per token. Text ending in U+FFFD is half a UTF-8 character and
    waits for the next token. A suffix that could still become a stop string is held back, so a stop string is
    never half sent; once one appears the text ends before it."""

    def __init__(self, tokenizer, eos_ids: set[int], stops: list[str]):
        self.tokenizer, self.eos_ids, self.stops = tokenizer, eos_ids, stops
        self.ids: list[int] = []
        self.prefix, self.read = 0, 0  # ids[prefix:read] were decoded last time; ids[read:] are new
        self.text = ""  # the answer so far, stop string excluded
        self.sent = 0  # characters of it already returned
        self.stopped = False  # a stop string was found

    def push(self, token: int) -> str:
        if token in self.eos_ids:
            return ""
        self.ids.append(token)
        before = self.tokenizer.decode(self.ids[self.prefix:self.read], skip_special_tokens=True)
        after = self.tokenizer.decode(self.ids[self.prefix:], skip_special_tokens=True)
        if after.endswith("\ufffd") or len(after) <= len(before):
            return ""
        self.text += after[len(before):]
        self.prefix, self.read = self.read, len(self.ids)
        hits = [i for i in (self.text.find(s, self.sent) for s in self.stops) if i >= 0]  # none starts earlier
        if hits:
            self.text, self.stopped = self.text[:min(hits)], True
            return self._take(len(self.text))
        held = max((k for s in self.stops for k in range(1, len(s)) if self.text.endswith(s[:k])), default=0)
        return self._take(len(self.text) - held)

    def flush(self) -> str:
        """The rest, at the end of the answer (a trailing half character included, as a replacement char)."""
        if not self.stopped and self.read < len(self.ids):
            before = self.tokenizer.decode(self.ids[self.prefix:self.read], skip_special_tokens=True)
            self.text += self.tokenizer.decode(self.ids[self.prefix:], skip_special_tokens=True)[len(before):]
            self.read = len(self.ids)
        return self._take(len(self.text))

    def _take(self, end: int) -> str:
        new, self.sent = self.text[self.sent:end], max(self.sent, end)
        return new


# ---------------------------------------------------------------------------------------------------------------
# A request inside the worker.


@dataclass
class Job:
    """One request: what to generate, and the queue its events go to (filled by the worker thread through the
    event loop). Events: ("text", str), ("done", finish_reason, usage), ("error", status, message)."""

    prompt: list[int]
    params: SamplingParams
    seed: int
    text: TextStream
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: bool = False  # the client has gone: drop it from the queue, end its row
    finished: bool = False
    tokens: int = 0
    real_slots: int = 0
    zero_slots: int = 0

    def emit(self, *event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop is closed: the server is gone, and so is the client
            pass

    def push(self, token: int, real: int, zero: int, eos_ids: set[int]) -> bool:
        """Take one token; True when this row is over (EOS, a stop string, max_tokens or no client)."""
        if self.cancelled:
            return True
        self.tokens, self.real_slots, self.zero_slots = self.tokens + 1, self.real_slots + real, self.zero_slots + zero
        new = self.text.push(token)
        if new:
            self.emit("text", new)
        if token in eos_ids or self.text.stopped:
            self.finish("stop")
        elif self.tokens >= self.params.max_new_tokens:
            self.finish("length")
        return self.finished

    def finish(self, reason: str) -> None:
        rest = self.text.flush()
        if rest:
            self.emit("text", rest)
        self.finished = True
        self.emit("done", reason, self.usage())

    def fail(self, status: int, message: str) -> None:
        self.finished = True
        self.emit("error", status, message)

    def usage(self) -> dict:
        routed = self.real_slots + self.zero_slots  # slots of the forwards that produced the answer's tokens
        ratio = self.zero_slots / routed if routed else 0.0
        return {"prompt_tokens": len(self.prompt), "completion_tokens": self.tokens,
                "total_tokens": len(self.prompt) + self.tokens,
                "zero_expert_ratio": ratio,
                "expert_flops_saved": 1 - self.real_slots / routed if routed else 0.0}


class Batcher:
    """The worker thread: waiting requests join the Decoder between steps (see the module docstring)."""

    def __init__(self, model: CausalLM, tokenizer, tokenizer_lock: threading.Lock, max_batch_size: int,
                 max_queue: int):
        self.model, self.tokenizer, self.tokenizer_lock = model, tokenizer, tokenizer_lock
        self.eos_ids, self.pad_id = stop_ids(tokenizer, model.config), pad_id(tokenizer, model.config)
        self.max_batch_size, self.max_queue = max_batch_size, max_queue
        self.waiting: collections.deque[Job] = collections.deque()
        self.running = 0  # requests being decoded
        self.cond = threading.Condition()
        self.stopping = False
        self.counters = {"steps": 0, "largest_batch": 0, "requests": 0, "tokens_generated": 0}
        self.thread = threading.Thread(target=self._loop, name="zeda-batcher", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop after the current step: answers in progress and waiting requests get a 503 error."""
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
        self.thread.join(timeout)

    def submit(self, job: Job) -> None:
        with self.cond:
            if self.stopping:
                raise ApiError(503, "the server is shutting down", kind="server_error")
            self._drop_cancelled()
            if len(self.waiting) >= self.max_queue:
                raise ApiError(503, f"the server is busy: {len(self.waiting)} requests are waiting (--max-queue "
                               f"{self.max_queue}); retry in {RETRY_AFTER_S} s", kind="server_error",
                               headers={"Retry-After": str(RETRY_AFTER_S)})
            self.waiting.append(job)
            self.cond.notify()

    def status(self) -> dict:
        with self.cond:
            self._drop_cancelled()
            return {"running": self.running, "waiting": len(self.waiting), **self.counters}

    def _drop_cancelled(self) -> None:
        if any(j.cancelled for j in self.waiting):
            self.waiting = collections.deque(j for j in self.waiting if not j.cancelled)

    def _loop(self) -> None:
        decoder = Decoder(self.model, self.max_batch_size, self.eos_ids, self.pad_id)
        jobs: dict[Row, Job] = {}
        c = self.counters
        while True:
            with self.cond:
                while not self.waiting and not jobs and not self.stopping:
                    self.cond.wait()
                if self.stopping:
                    for job in [*self.waiting, *jobs.values()]:
                        job.fail(503, "the server is shutting down")
                    self.waiting.clear()
                    self.running = 0
                    return
                self._drop_cancelled()
                new = [self.waiting.popleft() for _ in range(min(decoder.free, len(self.waiting)))]
                self.running = len(jobs) + len(new)
            try:
                rows = decoder.add([(j.prompt, j.params, j.seed) for j in new])
                jobs.update(zip(rows, new))
                step = decoder.step()
            except Exception as e:  # a bug or out of memory: these clients get a 500, the server goes on
                for job in [*jobs.values(), *new]:
                    if not job.finished:
                        job.fail(500, f"generation failed: {type(e).__name__}: {e}")
                jobs.clear()
                decoder = Decoder(self.model, self.max_batch_size, self.eos_ids, self.pad_id)
                continue
            c["requests"] += len(new)
            c["steps"], c["largest_batch"] = c["steps"] + 1, max(c["largest_batch"], len(step))
            c["tokens_generated"] += len(step)
            with self.tokenizer_lock:
                for row, token, real, zero in step:
                    job = jobs[row]
                    over = job.push(token, real, zero, self.eos_ids)
                    if over or row.done:  # EOS, stop string, max_tokens, or the client has gone
                        decoder.end(row)
                        del jobs[row]
                        if not job.finished and not job.cancelled:
                            job.finish("length")
            with self.cond:
                self.running = len(jobs)


# ---------------------------------------------------------------------------------------------------------------
# The app.


def sse(obj: dict) -> str:
    """One server-sent event carrying a JSON object."""
    return f"data: {json.dumps(obj)}\n\n"


def create_app(model: CausalLM, tokenizer, model_name: str, options: ServerOptions | None = None) -> FastAPI:
    """The FastAPI app serving `model` as `model_name`; its lifespan starts and stops the batching worker."""
    opts = options or ServerOptions()
    cfg = model.config
    context = cfg.max_position_embeddings
    tokenizer_lock = threading.Lock()  # the fast tokenizer is shared by request threads and the worker thread
    batcher = Batcher(model, tokenizer, tokenizer_lock, opts.max_batch_size, opts.max_queue)
    created = int(time.time())
    # No token stands for more characters than its vocabulary entry has (a byte-level BPE's entry has one
    # character per byte), so a text longer than context x the longest entry cannot fit: it is refused by its
    # length, before the tokenizer spends seconds and gigabytes on it.
    longest_token = max(map(len, tokenizer.get_vocab()), default=1)
    max_prompt_chars = context * longest_token

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(AcceptErrorFilter(loop))
        batcher.start()
        yield
        await asyncio.to_thread(batcher.stop)

    app = FastAPI(title=f"zeda: {model_name}", lifespan=lifespan)
    app.state.batcher, app.state.options = batcher, opts
    app.add_middleware(RequestBodyLimit, max_bytes=opts.max_request_bytes)

    @app.exception_handler(ApiError)
    async def on_api_error(request: Request, exc: ApiError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError):
        return validation_error(exc).response()

    @app.exception_handler(HTTPException)
    async def on_http_error(request: Request, exc: HTTPException):
        return http_error(request, exc).response()

    @app.exception_handler(Exception)  # a bug: starlette still logs the traceback, the client gets this shape
    async def on_bug(request: Request, exc: Exception):
        return ApiError(500, f"internal error: {type(exc).__name__}: {exc}", kind="server_error").response()

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, **batcher.status()}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "zeda", "max_model_len": context}]}

    def check_length(chars: int, where: str) -> None:
        if chars > max_prompt_chars:
            raise ApiError(400, f"{where}: the prompt has {chars} characters; the context is {context} tokens of "
                           f"at most {longest_token} characters each", where)

    async def tokenize(encode, *args, **kwargs):
        """encode(*args, **kwargs) in a thread: a long prompt takes the tokenizer a while, and the event loop must go on
        serving /health and the streams meanwhile."""
        def locked():
            with tokenizer_lock:
                return encode(*args, **kwargs)
        return await asyncio.to_thread(locked)

    def make_job(req: Sampling, prompt: list[int], where: str, max_tokens: int | None) -> Job:
        """Check the request against the model and the context; the Job the worker will run."""
        if req.model is not None and req.model != model_name:
            raise ApiError(404, f"the model {req.model!r} does not exist; this server serves {model_name!r}",
                           "model", code="model_not_found")
        if not prompt:
            raise ApiError(400, f"{where}: the prompt is empty", where)
        if len(prompt) >= context:
            raise ApiError(400, f"{where}: the prompt has {len(prompt)} tokens; the context is {context} tokens "
                           "and the answer needs at least one", where)
        if max_tokens is not None and len(prompt) + max_tokens > context:
            raise ApiError(400, f"max_tokens: {len(prompt)} prompt tokens + max_tokens {max_tokens} exceed the "
                           f"context of {context} tokens (at most {context - len(prompt)} fit)", "max_tokens")
        params = SamplingParams(
            temperature=opts.temperature if req.temperature is None else req.temperature,
            top_p=opts.top_p if req.top_p is None else req.top_p,
            top_k=opts.top_k if req.top_k is None else req.top_k,
            max_new_tokens=max_tokens if max_tokens is not None else min(opts.max_tokens, context - len(prompt)))
        stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        seed = random.getrandbits(SEED_BITS) if req.seed is None else req.seed
        job = Job(prompt, params, seed, TextStream(tokenizer, batcher.eos_ids, stops), asyncio.get_running_loop())
        batcher.submit(job)
        return job

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest, request: Request):
        messages = [m.as_template_message() for m in req.messages]
        check_length(sum(len(m["content"]) for m in messages), "messages")
        try:
            options = {**opts.chat_template_kwargs, **(req.chat_template_kwargs or {})}
            prompt = (await tokenize(encode_chat, tokenizer, messages, chat_template_kwargs=options)).ids
        except Exception as e:  # the template refused the conversation (jinja raises its own errors)
            raise ApiError(400, f"messages: the chat template cannot render them: {e}", "messages") from None
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        job = make_job(req, prompt, "messages", max_tokens)
        return await respond(job, req, request, "chatcmpl", "chat.completion")

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        check_length(len(req.prompt), "prompt")
        prompt = (await tokenize(tokenizer, req.prompt, add_special_tokens=False))["input_ids"]
        job = make_job(req, prompt, "prompt", req.max_tokens)
        return await respond(job, req, request, "cmpl", "text_completion")

    async def respond(job: Job, req: Sampling, request: Request, prefix: str, kind: str):
        rid, made = f"{prefix}-{uuid.uuid4().hex[:24]}", int(time.time())
        head = {"id": rid, "created": made, "model": model_name}
        chat = kind == "chat.completion"
        if req.stream:
            return StreamingResponse(stream_events(job, head, chat), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        parts, done = [], None
        async for event in events_of(job, request):
            if event[0] == "text":
                parts.append(event[1])
            elif event[0] == "error":
                raise ApiError(event[1], event[2], kind="server_error")
            else:
                done = event
        if done is None:  # the client left while it waited: nobody reads this
            return Response(status_code=499)
        _, reason, usage = done
        text = "".join(parts)
        choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                   "finish_reason": reason} if chat else
                  {"index": 0, "text": text, "logprobs": None, "finish_reason": reason})
        return {**head, "object": kind, "choices": [choice], "usage": usage}

    async def stream_events(job: Job, head: dict, chat: bool) -> AsyncIterator[str]:
        """Server-sent events: one chunk per piece of text, a chunk with finish_reason, one with usage."""
        kind = "chat.completion.chunk" if chat else "text_completion"

        def chunk(text: str | None = None, reason: str | None = None, delta: dict | None = None) -> str:
            if chat:
                delta = delta if delta is not None else {} if text is None else {"content": text}
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
            else:
                choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}
            return sse({**head, "object": kind, "choices": [choice]})

        try:
            if chat:
                yield chunk(delta={"role": "assistant", "content": ""})
            async for event in events_of(job, None):
                if event[0] == "text":
                    yield chunk(event[1])
                elif event[0] == "error":  # the status line is long gone: the error is the last event
                    yield sse({"error": {"message": event[2], "type": "server_error", "param": None, "code": None}})
                else:
                    yield chunk(reason=event[1])
                    yield sse({**head, "object": kind, "choices": [], "usage": event[2]})
            yield "data: [DONE]\n\n"
        finally:  # the client went away mid-stream (or the stream ended): its row is not decoded any further
            job.cancelled = True

    async def events_of(job: Job, request: Request | None) -> AsyncIterator[tuple]:
        """The job's events until done or error. With `request` (non-streaming answers), a client that
        disconnects while it waits is noticed within DISCONNECT_POLL_S and cancels the job; a stream notices
        sooner, when starlette sees the disconnect and cancels it."""
        loop = asyncio.get_running_loop()
        checked = loop.time()
        try:
            while True:
                try:
                    event = await asyncio.wait_for(job.events.get(), timeout=DISCONNECT_POLL_S)
                except TimeoutError:
                    event = None
                if request is not None and loop.time() - checked >= DISCONNECT_POLL_S:
                    checked = loop.time()
                    if await request.is_disconnected():
                        return
                if event is None:
                    continue
                yield event
                if event[0] in ("done", "error"):
                    return
        finally:
            if not job.finished:
                job.cancelled = True

    return app


# ---------------------------------------------------------------------------------------------------------------
# Limits against hostile or broken clients: too large a body, too slow a request, too many connections.


class RequestBodyLimit:
    """Pure ASGI middleware: a request body larger than max_bytes gets 413 before it is read in full.

    A Content-Length above the limit is refused before one byte of the body is read; a chunked body is counted
    as it streams and refused as soon as the count passes the limit. The body is read here (at most max_bytes
    held) and handed to the app in one message: the app reads it whole anyway to parse the JSON. The 413 closes
    the connection, so the rest of the body is never read."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")  # h11 has checked that it is a number
        if declared is not None and int(declared) > self.max_bytes:
            return await self.too_large(int(declared))(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":  # the client left (or timed out) mid-body
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await self.too_large(None)(scope, receive, send)
            if not message.get("more_body", False):
                break
        first = {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        async def replay():  # the whole body first, then the client's own messages (its disconnect)
            nonlocal first
            if first is not None:
                message, first = first, None
                return message
            return await receive()

        await self.app(scope, replay, send)

    def too_large(self, declared: int | None) -> JSONResponse:
        size = f"{declared} bytes" if declared is not None else "more"
        return ApiError(413, f"the request body is too large: {size}, the limit is {self.max_bytes} bytes "
                        "(serve.py --max-request-bytes)", code="request_too_large",
                        headers={"Connection": "close"}).response()


def raw_error(status: int, reason: str, message: str) -> bytes:
    """A whole HTTP/1.1 error response in OpenAI's shape that closes the connection, for the protocol layer
    (no request, or no app, to answer through)."""
    body = json.dumps({"error": {"message": message, "type": "invalid_request_error" if status < 500 else
                                 "server_error", "param": None, "code": None}}).encode()
    return (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            "connection: close\r\n\r\n").encode() + body


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 connection with the two limits it lacks (uvicorn.Config(http=...) makes one per connection).

    A read timeout: a request's headers and body must all arrive within read_timeout seconds of its first byte
    (of the connection, for the first request), else 408 and the connection closes. Without it a client that
    sends half a request line holds its socket, a file descriptor, forever; once the descriptors run out, every
    accept() fails and asyncio logs the failure with a traceback up to `backlog` times per loop turn (gigabytes of
    stderr within minutes) while real clients wait in the kernel's queue.

    A connection cap (config.limit_concurrency): uvicorn's own check answers 503 to requests over the limit but
    still accepts and keeps every connection. Here the connection over the limit closes the connection that has
    waited longest for a request (half sent, or an idle keep-alive), so idle sockets cannot crowd out a real
    request; if every connection has a request in progress, the new one gets 503. Requests in progress never
    exceed connections, so the cap covers uvicorn's request limit too."""

    def __init__(self, config, server_state, app_state, _loop=None, read_timeout: float = REQUEST_TIMEOUT_S):
        super().__init__(config, server_state, app_state, _loop)
        self.max_connections, self.limit_concurrency = config.limit_concurrency, None  # ours replaces uvicorn's
        self.read_timeout = read_timeout
        self.read_timer: asyncio.TimerHandle | None = None
        self.waiting_since = 0.0  # when this connection last began to wait for a request

    def waiting_for_request(self) -> bool:
        """No request of this connection is being answered: none has arrived whole, or the last was answered."""
        return self.cycle is None or self.cycle.response_complete

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self.waiting_since = self.loop.time()
        if self.max_connections is not None and len(self.connections) > self.max_connections:
            live = [c for c in self.connections if not c.transport.is_closing()]  # closed ones are on their way out
            if len(live) > self.max_connections:
                idle = [c for c in live if c is not self and isinstance(c, GuardedH11Protocol)
                        and c.waiting_for_request()]
                if not idle:
                    transport.write(raw_error(503, "Service Unavailable", f"the server has {self.max_connections} "
                                              "connections with requests in progress (serve.py --limit-concurrency)"))
                    transport.close()
                    return
                min(idle, key=lambda c: c.waiting_since).transport.close()
        self._arm_read_timer()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.more_body and not self.cycle.response_complete:
            self._cancel_read_timer()  # the request is in, whole: the app answers it in its own time
        elif self.read_timer is None:  # the first bytes of the next request on a kept-alive connection
            self._arm_read_timer()

    def on_response_complete(self) -> None:
        self.waiting_since = self.loop.time()
        super().on_response_complete()

    def connection_lost(self, exc) -> None:
        self._cancel_read_timer()
        super().connection_lost(exc)

    def _arm_read_timer(self) -> None:
        self.read_timer = self.loop.call_later(self.read_timeout, self._read_timed_out)

    def _cancel_read_timer(self) -> None:
        if self.read_timer is not None:
            self.read_timer.cancel()
            self.read_timer = None

    def _read_timed_out(self) -> None:
        self.read_timer = None
        if self.transport.is_closing():
            return
        if self.waiting_for_request() or not self.cycle.response_started:  # else the app has answered: just close
            self.transport.write(raw_error(408, "Request Timeout", f"the request did not arrive whole within "
                                           f"{self.read_timeout:g} s (serve.py --request-timeout)"))
        self.transport.close()


class AcceptErrorFilter:
    """The event loop's exception handler, with asyncio's "socket.accept() out of system resource" (out of file
    descriptors; see GuardedH11Protocol) logged at most once a minute, counting the ones left out."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop, self.last, self.dropped = loop, -float("inf"), 0

    def __call__(self, loop, context: dict) -> None:
        if context.get("message") == "socket.accept() out of system resource":
            if loop.time() - self.last < 60:
                self.dropped += 1
                return
            self.last, dropped, self.dropped = loop.time(), self.dropped, 0
            print(f"zeda.server: cannot accept connections: {context.get('exception')} (and {dropped} more since "
                  "the last report): raise the open-file limit (ulimit -n) or lower --limit-concurrency",
                  file=sys.stderr, flush=True)
            return
        loop.default_exception_handler(context)


def open_file_limit() -> int:
    """Raise this process's open-file soft limit to its hard limit (each connection is a file); the new limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):  # RLIM_INFINITY may not be settable: keep the soft limit
            pass
    return soft


def connection_limit(wanted: int) -> int:
    """wanted, or fewer if the open-file soft limit cannot hold that many sockets beside FD_RESERVE other files."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return wanted
    return max(1, min(wanted, soft - FD_RESERVE))


def uvicorn_config(app: FastAPI, log_level: str = "info", graceful_shutdown_s: float = GRACEFUL_SHUTDOWN_S):
    """uvicorn's Config for create_app's app, with its ServerOptions' HTTP limits (at most the connections the
    open-file limit allows)."""
    opts: ServerOptions = app.state.options
    return uvicorn.Config(app, log_level=log_level, access_log=False, lifespan="on",
                          timeout_graceful_shutdown=graceful_shutdown_s, timeout_keep_alive=opts.keep_alive,
                          limit_concurrency=connection_limit(opts.max_connections),
                          http=functools.partial(GuardedH11Protocol, read_timeout=opts.request_timeout))


# ---------------------------------------------------------------------------------------------------------------
# Running it.


def listen(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the model loads, so a taken port fails at once (OSError)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, port), family=family)


def serve_forever(app: FastAPI, sock: socket.socket, log_level: str = "info") -> int:
    """Serve until SIGINT or SIGTERM; returns the exit code (130 / 143 after a signal, as a shell reports it).

    uvicorn handles the signal (stops accepting, lets answers in progress finish for up to GRACEFUL_SHUTDOWN_S,
    then stops the worker) and re-raises it once it is done; the handlers installed here catch that re-raise,
    so the process exits with a code instead of dying by the signal or printing a KeyboardInterrupt."""
    open_file_limit()
    config = uvicorn_config(app, log_level)
    if config.limit_concurrency < app.state.options.max_connections:
        print(f"zeda.server: at most {config.limit_concurrency} connections, not {app.state.options.max_connections}"
              f": the open-file limit is {resource.getrlimit(resource.RLIMIT_NOFILE)[0]} (ulimit -n)",
              file=sys.stderr, flush=True)
    received: list[int] = []
    previous = {sig: signal.signal(sig, lambda s, frame: received.append(s)) for sig in (signal.SIGINT,
                                                                                         signal.SIGTERM)}
    try:
        server = uvicorn.Server(config)
        server.run(sockets=[sock])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 128 + received[0] if received else 0

