"""The server against hostile or broken clients (zeda/server.py: RequestBodyLimit, GuardedH11Protocol, the prompt's
length check, tokenization in a thread): huge bodies, idle and half-sent connections, a slow tokenizer, bodies
that are not JSON. Real sockets on 127.0.0.1; every wait is bounded. What each test proves is in its docstring.
"""

import http.client
import json
import re
import resource
import select
import socket
import subprocess
import sys
import threading

import pytest
from test_server import ENV, ROOT, health, running, tiny, wait_until  # noqa: F401 (tiny is a fixture)
from transformers import AutoTokenizer

from zeda.loading import load_for_inference
from zeda.server import ServerOptions

MB = 1 << 20


def address(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").split(":")
    return host, int(port)


def post_bytes(url: str, path: str, body: bytes, timeout: float = 30) -> tuple[int, dict]:
    conn = http.client.HTTPConnection(*address(url), timeout=timeout)
    conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    return r.status, json.loads(r.read())


def read_response(sock: socket.socket) -> bytes:
    """One HTTP response's bytes (head and Content-Length body), or what came before the server closed."""
    reply = b""
    try:
        while chunk := sock.recv(65536):
            reply += chunk
            head, sep, body = reply.partition(b"\r\n\r\n")
            length = re.search(rb"(?i)content-length: *(\d+)", head)
            if sep and length and len(body) >= int(length.group(1)):
                break
    except (ConnectionResetError, TimeoutError):  # closed with the rest of our body unread: the answer is in
        pass
    return reply


def rss_bytes() -> int:
    """This process's resident memory (the in-process server's included), from /proc."""
    with open("/proc/self/status") as f:
        return int(re.search(r"VmRSS:\s+(\d+) kB", f.read()).group(1)) * 1024


@pytest.fixture(scope="module")
def limited(tiny):  # noqa: F811
    """(base URL, model) of a server with serve.py's default limits."""
    model, tokenizer = load_for_inference(tiny, device="cpu")
    with running(model, tokenizer, "tiny", ServerOptions()) as url:
        yield url, model


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_a_50_mb_body_is_refused_before_it_is_read(limited, chunked):
    """A 50 MB body (declared by Content-Length, or chunked with no length) gets 413 in OpenAI's shape while the
    client is still sending: the server answers after at most a few MB (what the socket buffers hold), and this
    process, the server's, grows by a few MB at most. The client sends one 64 KB piece over and over."""
    url, _ = limited
    sock = socket.create_connection(address(url), timeout=10)
    head = "POST /v1/chat/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
    head += "Transfer-Encoding: chunked\r\n\r\n" if chunked else f"Content-Length: {50 * MB}\r\n\r\n"
    piece = b"x" * 65536
    frame = b"10000\r\n" + piece + b"\r\n" if chunked else piece
    rss_before = rss_bytes()
    sock.sendall(head.encode())
    sock.setblocking(False)
    sent, pending = 0, memoryview(frame)
    while sent < 50 * MB:
        readable, writable, _ = select.select([sock], [sock], [], 10)
        if readable or not writable:  # the answer has come (or nothing moves: the recv below says why)
            break
        try:
            n = sock.send(pending)
        except (BlockingIOError, BrokenPipeError, ConnectionResetError):
            break
        sent, pending = sent + n, pending[n:] if n < len(pending) else memoryview(frame)
    sock.settimeout(10)
    reply = read_response(sock)
    sock.close()
    grown = rss_bytes() - rss_before
    head_line, _, body = reply.partition(b"\r\n\r\n")
    assert head_line.startswith(b"HTTP/1.1 413"), reply[:300]
    error = json.loads(body)["error"]
    assert "too large" in error["message"] and "--max-request-bytes" in error["message"], error
    assert error["type"] == "invalid_request_error" and error["code"] == "request_too_large"
    assert sent < 8 * MB, f"{sent} bytes sent before the answer"
    assert grown < 30 * MB, f"the server grew by {grown / MB:.0f} MB"
    assert health(url)["status"] == "ok"


def test_idle_and_half_sent_connections_do_not_starve_a_real_request(tiny, tmp_path):  # noqa: F811
    """`serve.py --port 0` with only 256 open files allowed (hard limit): 300 connections that send half a request
    line or nothing do not stop a real request from being answered (at the connection cap, the connection that has
    waited longest for a request is closed), a half-sent request gets 408 after --request-timeout, and stderr
    stays small (asyncio logs every failed accept with a traceback once the descriptors run out)."""
    def few_files():
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))

    err_path = tmp_path / "stderr.txt"
    with open(err_path, "w") as err:
        proc = subprocess.Popen([sys.executable, "serve.py", "--model", str(tiny), "--port", "0",
                                 "--served-model-name", "cli", "--request-timeout", "1"],
                                cwd=ROOT, env=ENV, stderr=err, preexec_fn=few_files)
    idle: list[socket.socket] = []
    try:
        wait_until(lambda: "http://" in err_path.read_text() or proc.poll() is not None, timeout=60)
        url = re.search(r"(http://127\.0\.0\.1:\d+)/v1", err_path.read_text()).group(1)
        for i in range(300):
            s = socket.create_connection(address(url), timeout=10)
            if i % 2:
                s.sendall(b"POST /v1/chat/comp")
            idle.append(s)
        conn = http.client.HTTPConnection(*address(url), timeout=20)
        conn.request("POST", "/v1/completions", body=json.dumps({"prompt": "hi", "max_tokens": 2}),
                     headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        assert r.status == 200 and json.loads(r.read())["model"] == "cli"
        newest_half_sent = idle[-1]  # not evicted: the real request closed the oldest idle connection
        reply = read_response(newest_half_sent)
        assert reply.startswith(b"HTTP/1.1 408"), reply
        assert "--request-timeout" in json.loads(reply.partition(b"\r\n\r\n")[2])["error"]["message"]
    finally:
        for s in idle:
            s.close()
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    log = err_path.read_text()
    assert len(log) < 20_000 and "Traceback" not in log, log[-3000:]


@pytest.fixture(scope="module")
def slow_tokenizer(tiny):  # noqa: F811
    """(base URL, started, release) of a server whose chat template blocks until `release` is set (10 s at most):
    `started` is set when a request has entered it."""
    model, _ = load_for_inference(tiny, device="cpu")
    tokenizer = AutoTokenizer.from_pretrained(tiny)
    started, release = threading.Event(), threading.Event()
    render = tokenizer.apply_chat_template

    def blocking_render(*args, **kwargs):
        started.set()
        release.wait(10)
        return render(*args, **kwargs)

    tokenizer.apply_chat_template = blocking_render
    with running(model, tokenizer, "tiny", ServerOptions()) as url:
        yield url, started, release
    release.set()


def test_health_answers_while_a_prompt_is_tokenized(slow_tokenizer):
    """Tokenization runs in a thread: while one request is inside the chat template, /health answers, and the
    request is answered once the template returns."""
    url, started, release = slow_tokenizer
    answer = {}

    def ask():
        answer["r"] = post_bytes(url, "/v1/chat/completions", json.dumps(
            {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}).encode())

    thread = threading.Thread(target=ask)
    thread.start()
    try:
        assert started.wait(10)
        conn = http.client.HTTPConnection(*address(url), timeout=5)  # the template holds on for 10 s
        conn.request("GET", "/health")
        status = conn.getresponse().status
        still_rendering = not release.is_set()
    finally:
        release.set()
        thread.join(30)
    assert status == 200 and still_rendering
    assert answer["r"][0] == 200 and answer["r"][1]["usage"]["completion_tokens"] >= 1


def test_a_prompt_that_cannot_fit_is_refused_by_its_length_untokenized(slow_tokenizer):
    """A prompt longer than context x the longest vocabulary entry (128 x 13 characters here) is refused by its
    character count without entering the tokenizer."""
    url, started, release = slow_tokenizer
    started.clear()
    release.clear()
    try:
        status, reply = post_bytes(url, "/v1/chat/completions", json.dumps(
            {"messages": [{"role": "system", "content": "x" * 1000}, {"role": "user", "content": "y" * 900_000}]}
        ).encode(), timeout=5)
    finally:
        release.set()
    assert status == 400 and not started.is_set(), reply
    error = reply["error"]
    assert error["param"] == "messages" and "901000 characters" in error["message"], error
    assert "the context is 128 tokens" in error["message"]


BAD_BODIES = [  # (body, param, words the message must contain)
    (b'{"messages": [{"role": "user", "content": "caf\xe9"}]}', None, "not UTF-8"),
    (b"[" * 100_000 + b"]" * 100_000, None, "nested too deeply"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "model": "tiny"', None, "not valid JSON"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}], "stop": ["s"] * 17}).encode(), "stop",
     "at most 16 stop strings, not 17"),
]


@pytest.mark.parametrize("body,param,words", BAD_BODIES, ids=["latin-1", "deep", "cut", "17-stops"])
def test_unparsable_bodies_get_the_openai_error_shape(limited, body, param, words):
    url, _ = limited
    status, reply = post_bytes(url, "/v1/chat/completions", body)
    assert status == 400 and set(reply) == {"error"}, reply
    error = reply["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert error["param"] == param and words in error["message"], error


def test_unknown_routes_get_the_openai_error_shape(limited):
    url, _ = limited
    status, reply = post_bytes(url, "/v1/embeddings", b"{}")
    assert status == 404 and reply["error"]["message"] == "POST /v1/embeddings: Not Found", reply
