"""The teacher on an external OpenAI-compatible server (vLLM, SGLang, `transformers serve`, zeda's serve.py):
rollout.py --server samples its answers there, train_opd.py --teacher-url reads its log-probs of the student's
tokens from there, instead of from a model folder loaded in process.

    server = Server("http://127.0.0.1:8000")                      # with or without /v1
    name, context = server.model()                                 # GET /v1/models: the only model served
    answer = chat_answer(server, name, messages, params, seed=7)   # POST /v1/chat/completions
    logprobs, tokens = prompt_logprobs(server, name, ids)          # POST /v1/completions, echo + max_tokens 0

Standard library only: one http.client connection per request, and no proxy from the environment (a loopback
server is never sent through one). Every failure is a RemoteError, a ZedaError, so the scripts print it as one
line and exit 2: it names the URL and says what happened -- the server cannot be reached, it answered an HTTP
error (its own message is shown), it sent nothing within the timeout, or its reply is not what the API says.
Connection errors, 429 and 503 are retried `retries` times, waiting 1, 2, 4, ... s (at most MAX_BACKOFF_S; a
Retry-After in seconds wins); any other status is not, 400 above all: the same request gets the same answer.

Requests run concurrently on daemon threads (unordered_map): a fatal error ends the caller at once, and the
requests still in flight are abandoned rather than waited for (a server notices the closed connection).
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import queue
import re
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from zeda.errors import UsageError, ZedaError
from zeda.flags import float_range, int_range
from zeda.sampling import SamplingParams

RETRY_STATUSES = (429, 503)  # busy: the same request may succeed later
BACKOFF_S = 1.0  # the first wait before a retry; doubled each time
MAX_BACKOFF_S = 30.0
SEED_BITS = 31  # a request's seed: every engine takes a 32-bit signed int


class RemoteError(ZedaError):
    """The server could not be reached, or answered something unusable; the message names the URL and says why."""


def add_connection_args(p: argparse.ArgumentParser, timeout: float) -> None:
    """--request-timeout and --retries, for a script that talks to a server."""
    p.add_argument("--request-timeout", type=float_range(above=0), default=timeout, metavar="S",
                   help=f"seconds a request may wait for the server's reply (default {timeout:g}); no retry after it")
    p.add_argument("--retries", type=int_range(min=0), default=4,
                   help="retries of a request on a connection error, 429 or 503, with backoff 1, 2, 4, ... s "
                        "(default 4); never on another status")


def one_line(text: str, limit: int = 500) -> str:
    text = re.sub(r"\s+", " ", text).strip()
    return text if len(text) <= limit else text[:limit] + " ..."


def error_message(raw: bytes) -> str:
    """The server's own words from an error body: OpenAI's {"error": {"message"}}, older vLLM's {"message"},
    FastAPI's {"detail"}, else the body's text."""
    try:
        body = json.loads(raw)
    except ValueError:
        return one_line(raw.decode("utf-8", "replace")) or "(empty body)"
    if isinstance(body, dict):
        error = body.get("error")
        for value in (error.get("message") if isinstance(error, dict) else error, body.get("message"),
                      body.get("detail")):
            if value:
                return one_line(value if isinstance(value, str) else json.dumps(value))
    return one_line(raw.decode("utf-8", "replace"))


class Server:
    """An OpenAI-compatible server at `url` (http[s]://host[:port][/prefix], /v1 added when missing). `flag`
    names the command-line flag the URL came from, for the messages."""

    def __init__(self, url: str, flag: str = "--server", timeout: float = 600.0, retries: int = 4):
        parts = urllib.parse.urlsplit(url)
        try:
            port = parts.port
        except ValueError:
            port = -1
        if parts.scheme not in ("http", "https") or not parts.hostname or port == -1 or parts.query:
            raise UsageError(f"{flag} {url!r}: not a server URL like http://127.0.0.1:8000 or http://host:8000/v1")
        prefix = parts.path.rstrip("/")
        prefix = prefix if prefix.endswith("/v1") else prefix + "/v1"
        self.https, self.host, self.port, self.prefix = parts.scheme == "https", parts.hostname, port, prefix
        self.base = f"{parts.scheme}://{parts.netloc}{prefix}"
        self.flag, self.timeout, self.retries = flag, timeout, retries

    def request(self, method: str, path: str, body: dict | None = None) -> dict:
        """The JSON object the server answers to `method path` (path after /v1), retried as the module docstring
        says; RemoteError otherwise."""
        url, data = self.base + path, None if body is None else json.dumps(body).encode("utf-8")
        for attempt in range(self.retries + 1):
            try:
                status, retry_after, raw = self._once(method, self.prefix + path, data)
            except TimeoutError:
                raise RemoteError(f"{url}: no reply within {self.timeout:g} s (--request-timeout)") from None
            except OSError as e:  # refused, reset, unreachable, unknown host
                problem, wait = f"cannot connect ({e.strerror or e})", None
            except http.client.HTTPException as e:  # a reply that is not HTTP at all
                raise RemoteError(f"{url}: not an HTTP reply ({type(e).__name__}: {one_line(str(e), 200)})") from None
            else:
                if 200 <= status < 300:
                    return self._json(url, raw)
                problem = f"HTTP {status}: {error_message(raw)}"
                if status not in RETRY_STATUSES:
                    raise RemoteError(f"{url}: {problem}")
                wait = float(retry_after) if retry_after and retry_after.strip().isdigit() else None
            if attempt == self.retries:
                tries = f" (tried {attempt + 1} times; --retries)" if attempt else ""
                raise RemoteError(f"{url}: {problem}{tries}; is the server at {self.flag} running?"
                                  if problem.startswith("cannot connect") else f"{url}: {problem}{tries}")
            time.sleep(min(MAX_BACKOFF_S, wait if wait is not None else BACKOFF_S * 2 ** attempt))
        raise AssertionError("unreachable")

    def _once(self, method: str, path: str, data: bytes | None) -> tuple[int, str | None, bytes]:
        kind = http.client.HTTPSConnection if self.https else http.client.HTTPConnection
        conn = kind(self.host, self.port, timeout=self.timeout)
        try:
            headers = {"Accept": "application/json"}
            if data is not None:
                headers["Content-Type"] = "application/json"
            conn.request(method, path, body=data, headers=headers)
            reply = conn.getresponse()
            return reply.status, reply.getheader("Retry-After"), reply.read()
        finally:
            conn.close()

    @staticmethod
    def _json(url: str, raw: bytes) -> dict:
        try:
            body = json.loads(raw)
        except ValueError:
            raise RemoteError(f"{url}: malformed reply, not JSON: {one_line(raw.decode('utf-8', 'replace'), 200)!r}"
                              ) from None
        if not isinstance(body, dict):
            raise RemoteError(f"{url}: malformed reply, not a JSON object: {one_line(raw.decode('utf-8'), 200)!r}")
        return body

    def model(self, wanted: str | None = None, model_flag: str = "--model") -> tuple[str, int | None]:
        """(the model name to send, its context in tokens or None): `wanted`, else the only model GET /v1/models
        lists. The context is the listing's max_model_len (vLLM's, SGLang's and zeda's field), when it has one."""
        url = self.base + "/models"
        listed = self.request("GET", "/models").get("data")
        if not isinstance(listed, list) or not all(isinstance(m, dict) and isinstance(m.get("id"), str)
                                                   for m in listed):
            raise RemoteError(f"{url}: malformed reply: no list of models with an id under 'data'")
        if wanted is None:
            if len(listed) != 1:
                names = ", ".join(m["id"] for m in listed[:10]) or "none"
                raise UsageError(f"{url} lists {len(listed)} models ({names}): name the one to use with {model_flag}")
            wanted = listed[0]["id"]
        context = next((m.get("max_model_len") for m in listed if m["id"] == wanted), None)
        return wanted, context if isinstance(context, int) and context > 0 else None


# ---------------------------------------------------------------------------------------------------------------
# What the requests mean: answers (rollouts) and prompt log-probs (the OPD teacher).


@dataclass
class Answer:
    content: str  # the answer's text (with a reasoning parser on the server: the part after the reasoning)
    reasoning: str | None  # the server's reasoning_content (SGLang, vLLM before 0.10) or reasoning (later vLLM)
    finished: bool  # False: it hit max_tokens (finish_reason "length")
    tokens: int  # the answer's tokens, from usage.completion_tokens (0 when the server does not say)


def request_seed(seed: int, key: str) -> int:
    """The seed of one answer: a function of the run's --seed and the answer's id alone, so a resumed run or
    another concurrency asks each answer with the seed the uninterrupted run used."""
    return int(hashlib.sha256(f"{seed}:{key}".encode()).hexdigest(), 16) % 2 ** SEED_BITS


def sampling_body(params: SamplingParams, seed: int) -> dict:
    """The sampling fields, always sent: a field left out would take the server's default (vLLM's comes from the
    model's generation_config.json, OpenAI's is temperature 1), not ours. top_k 0 means off, as in vLLM."""
    return {"max_tokens": params.max_new_tokens, "temperature": params.temperature, "top_p": params.top_p,
            "top_k": params.top_k, "seed": seed}


def _choice(reply: dict, url: str) -> dict:
    choices = reply.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise RemoteError(f"{url}: malformed reply: no choices")
    return choices[0]


def _finished(choice: dict, url: str) -> bool:
    reason = choice.get("finish_reason")
    if reason not in ("stop", "length"):  # "abort", null: the server gave up on it; not an answer to train on
        raise RemoteError(f"{url}: the answer ended with finish_reason {reason!r}, neither 'stop' nor 'length'")
    return reason == "stop"


def _completion_tokens(reply: dict) -> int:
    usage = reply.get("usage")
    tokens = usage.get("completion_tokens") if isinstance(usage, dict) else None
    return tokens if isinstance(tokens, int) else 0


def chat_answer(server: Server, model: str, messages: list[dict], params: SamplingParams, seed: int,
                chat_template_kwargs: dict | None = None) -> Answer:
    """One answer from POST /v1/chat/completions: the server renders the chat with its own template."""
    body = {"model": model, "messages": messages, **sampling_body(params, seed)}
    if chat_template_kwargs:
        body["chat_template_kwargs"] = chat_template_kwargs
    url = server.base + "/chat/completions"
    reply = server.request("POST", "/chat/completions", body)
    choice = _choice(reply, url)
    message = choice.get("message")
    if not isinstance(message, dict) or not isinstance(message.get("content"), (str, type(None))):
        raise RemoteError(f"{url}: malformed reply: choices[0].message has no text content")
    reasoning = message.get("reasoning_content") or message.get("reasoning")
    return Answer(message["content"] or "", reasoning if isinstance(reasoning, str) else None,
                  _finished(choice, url), _completion_tokens(reply))


def completion_answer(server: Server, model: str, ids: list[int], params: SamplingParams, seed: int) -> Answer:
    """One answer from POST /v1/completions to a prompt given as token ids (rendered here, not by the server)."""
    url = server.base + "/completions"
    reply = server.request("POST", "/completions", {"model": model, "prompt": ids, **sampling_body(params, seed)})
    choice = _choice(reply, url)
    if not isinstance(choice.get("text"), str):
        raise RemoteError(f"{url}: malformed reply: choices[0].text is not a string")
    return Answer(choice["text"], None, _finished(choice, url), _completion_tokens(reply))


def prompt_logprobs(server: Server, model: str, ids: list[int]) -> tuple[list[float], list[str]]:
    """(log p(ids[t] | ids[:t]) for t = 1 .. len(ids) - 1, the server's text of each of the ids) from POST
    /v1/completions with the ids as the prompt, echo, max_tokens 0 and logprobs 1: the server scores exactly
    these tokens and generates none. Its log-probs are the model's own distribution (temperature 1), as vLLM
    and zeda report them by default. A reply with another number of tokens than were sent is refused: the
    server did not score these ids."""
    url = server.base + "/completions"
    reply = server.request("POST", "/completions", {"model": model, "prompt": ids, "max_tokens": 0, "echo": True,
                                                     "logprobs": 1})
    logprobs = _choice(reply, url).get("logprobs")
    tokens = logprobs.get("tokens") if isinstance(logprobs, dict) else None
    values = logprobs.get("token_logprobs") if isinstance(logprobs, dict) else None
    if not isinstance(tokens, list) or not isinstance(values, list):
        raise RemoteError(f"{url}: malformed reply: choices[0].logprobs has no tokens and token_logprobs (does the "
                          f"server take echo with max_tokens 0? docs/usage.md, External inference engines)")
    if len(tokens) != len(ids) or len(values) != len(ids):
        raise RemoteError(f"{url}: echoed {len(tokens)} tokens and {len(values)} log-probs for the {len(ids)} token "
                          f"ids sent: it did not score exactly these tokens (it generated some, or re-tokenized)")
    scores = values[1:]  # nothing predicts the first token
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in scores):
        raise RemoteError(f"{url}: malformed reply: a token_logprobs entry after the first is not a number")
    return [float(v) for v in scores], [t if isinstance(t, str) else "" for t in tokens]


def check_token_texts(tokens: list[str], ids: list[int], tokenizer, where: str) -> None:
    """The tokenizer check that can be made over HTTP: the server's text of each id sent must be what `tokenizer`
    decodes it to, so the server reads ids as the student means them. Special and added tokens (an engine may
    print them as "") and pieces of a UTF-8 character (U+FFFD here) are not compared; vLLM's
    --return-tokens-as-token-ids form "token_id:N" compares by id."""
    local = tokenizer.batch_decode([[t] for t in ids], skip_special_tokens=False)
    added = set(tokenizer.added_tokens_decoder)
    for i, (token_id, mine, theirs) in enumerate(zip(ids, local, tokens)):
        if token_id in added or "\ufffd" in mine or theirs == f"token_id:{token_id}":
            continue
        if theirs.strip() != mine.strip():
            raise UsageError(f"{where}: the server reads token id {token_id} (position {i}) as {theirs!r}, the "
                             f"student's tokenizer as {mine!r}: the teacher server must serve the student's "
                             f"tokenizer (same ids), or its log-probs are of other tokens")


def unordered_map(fn: Callable, items: Sequence, concurrency: int) -> Iterator[tuple[int, object]]:
    """(index, fn(items[index])) as each call finishes, `concurrency` calls at a time on daemon threads. The
    first exception is raised here; the calls then still running finish on their own and are dropped, and no
    new one starts."""
    tasks, results, stop = queue.Queue(), queue.Queue(), threading.Event()
    for i in range(len(items)):
        tasks.put(i)

    def work():
        while not stop.is_set():
            try:
                i = tasks.get_nowait()
            except queue.Empty:
                return
            try:
                results.put((i, fn(items[i]), None))
            except BaseException as e:  # noqa: BLE001 -- handed to the caller's thread, raised there
                results.put((i, None, e))

    for _ in range(min(concurrency, len(items))):
        threading.Thread(target=work, name="zeda-remote", daemon=True).start()
    try:
        for _ in range(len(items)):
            i, value, error = results.get()
            if error is not None:
                raise error
            yield i, value
    finally:
        stop.set()
