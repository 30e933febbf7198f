"""The HTTP server (zeda/server.py) and what it needs from the engine (zeda/generation.py): per-row sampling
parameters and seeds, and the Decoder (zeda/generation.py) that lets rows join and leave between decode steps.

Servers run in-process (uvicorn in a thread on a free loopback port; the model loads once per checkpoint) and
are driven with the official `openai` client, or with raw http.client where a body must be malformed. What each
test proves is in its docstring. One subprocess runs the real CLI (`serve.py --port 0`) for SIGTERM; one runs
convert.py for the converted checkpoint.
"""

import http.client
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import openai
import pytest
import uvicorn

from zeda.evaluation import Item, encode_items, pad_id, stop_ids
from zeda.generation import generate
from zeda.loading import load_for_inference
from zeda.sampling import SamplingParams
from zeda.generation import Decoder
from zeda.server import ServerOptions, TextStream, create_app, listen, uvicorn_config
from zeda_toy.tiny import make_tiny_checkpoint
from zeda_toy.tokenizer import save_tokenizer

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
CONTEXT = 128
QUESTIONS = ["Compute 1+2.", "Compute 358+67-149.", "Write the word cat exactly 2 times.", "Reverse abc.",
             "What is 7*6?", "Sort 3 1 2.", "hi", "Count the letters of hello."]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A random static tiny MoE with the char-level tokenizer and a 128-token context."""
    path = tmp_path_factory.mktemp("server") / "tiny"
    make_tiny_checkpoint(path, vocab_size=104, eos_token_id=3, pad_token_id=0, max_position_embeddings=CONTEXT)
    save_tokenizer(path)
    return path


@pytest.fixture(scope="module")
def converted(tiny) -> Path:
    """The same checkpoint through the real convert.py: 4 zero experts."""
    out = tiny.parent / "tiny-zeda"
    r = subprocess.run([sys.executable, "convert.py", "--input-dir", str(tiny), "--output-dir", str(out),
                        "--num-zero-experts", "4"], cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return out


@contextmanager
def running(model, tokenizer, name: str, options: ServerOptions | None = None):
    """An in-process server on a free 127.0.0.1 port, with serve.py's HTTP limits; yields its base URL and stops
    it on exit."""
    sock = listen("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn_config(create_app(model, tokenizer, name, options), "warning", 2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        assert not thread.is_alive(), "the server did not stop"


@pytest.fixture(scope="module")
def static(tiny):
    """(base URL, model, tokenizer) of the static model's server."""
    model, tokenizer = load_for_inference(tiny, device="cpu")
    with running(model, tokenizer, tiny.name, ServerOptions(max_batch_size=8)) as url:
        yield url, model, tokenizer


@pytest.fixture(scope="module")
def slow(tiny):
    """A server whose model sleeps 20 ms per forward, one request per batch and one waiting at most: long enough
    answers to disconnect from and to fill the queue with, on any machine."""
    model, tokenizer = load_for_inference(tiny, device="cpu")
    model.register_forward_pre_hook(lambda module, args: time.sleep(0.02))
    with running(model, tokenizer, "slow", ServerOptions(max_batch_size=1, max_queue=1)) as url:
        yield url


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)


def health(url: str) -> dict:
    return get(url, "/health")[1]


def get(url: str, path: str) -> tuple[int, dict]:
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request("GET", path)
    r = conn.getresponse()
    return r.status, json.loads(r.read())


def post_raw(url: str, path: str, body: str) -> tuple[int, dict, dict]:
    """(status, JSON body, headers) of a POST with exactly this body."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request("POST", path, body=body.encode(), headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    return r.status, json.loads(r.read()), dict(r.getheaders())


def chat(url: str, question: str, **kw):
    return client(url).chat.completions.create(model=kw.pop("model", "tiny"),
                                               messages=[{"role": "user", "content": question}], **kw)


def wait_until(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def greedy_reference(model, tokenizer, questions: list[str], max_new_tokens: int):
    """What evaluate.py answers: its encode_items (the chat template) and one batched greedy generate."""
    items = [Item("serve", f"question {i}", [{"role": "user", "content": q}], "", None)
             for i, q in enumerate(questions)]
    prompts = encode_items(tokenizer, items, max_new_tokens, model.config.max_position_embeddings)
    cfg = model.config
    gen = generate(model, prompts, SamplingParams(temperature=0, max_new_tokens=max_new_tokens),
                   stop_ids(tokenizer, cfg), pad_id(tokenizer, cfg))
    return prompts, gen, [tokenizer.decode(t, skip_special_tokens=True) for t in gen.tokens]


# ---------------------------------------------------------------------------------------------------------------
# The engine: per-row sampling parameters and seeds; rows joining and leaving a Decoder.

ROW_PARAMS = [SamplingParams(temperature=0.0, max_new_tokens=6), SamplingParams(temperature=1.0, max_new_tokens=9),
              SamplingParams(temperature=0.7, top_k=5, max_new_tokens=4),
              SamplingParams(temperature=1.3, top_p=0.8, top_k=20, max_new_tokens=9),
              SamplingParams(temperature=1.0, max_new_tokens=2)]
ROW_PROMPTS = [[5, 17, 3], [9, 1, 44, 60, 2, 7, 31], [70], [12, 8, 90, 33, 4], [40, 41]]


def test_rows_with_their_own_params_sample_what_they_would_alone(static):
    """A batch of rows with different temperature / top-k / top-p / max_new_tokens and their own seeds samples for
    each row exactly the tokens that row gets alone with the same seed (int or one-element list)."""
    _, model, _ = static
    seeds = [3, 4, 5, 6, 7]
    batch = generate(model, ROW_PROMPTS, ROW_PARAMS, eos_ids=[], seed=seeds)
    for i, (prompt, params, seed) in enumerate(zip(ROW_PROMPTS, ROW_PARAMS, seeds)):
        for alone_seed in (seed, [seed]):
            alone = generate(model, [prompt], params, eos_ids=[], seed=alone_seed)
            assert batch.tokens[i] == alone.tokens[0], (i, alone_seed)
            # log-probs up to the float noise of a batched forward (padding, cache width), as in test_generation
            assert batch.logprobs[i] == pytest.approx(alone.logprobs[0], abs=1e-5)
        assert len(batch.tokens[i]) == params.max_new_tokens and not batch.finished[i]
        assert batch.real_slots[i] == alone.real_slots[0]
    assert batch.new_tokens == sum(p.max_new_tokens for p in ROW_PARAMS)
    same = generate(model, ROW_PROMPTS, [ROW_PARAMS[1]] * 5, eos_ids=[], seed=seeds)  # a list of equal params
    assert same.tokens == generate(model, ROW_PROMPTS, ROW_PARAMS[1], eos_ids=[], seed=seeds).tokens


@pytest.mark.parametrize("width", [256, 4])  # 4: the cache grows and is compacted on the way
def test_decoder_rows_joining_between_steps_sample_what_they_would_alone(static, width):
    """Continuous batching: rows that join a running Decoder at different steps, leave at EOS, at their own
    max_new_tokens or by end(), and are moved between cache rows as others leave, each sample exactly what
    generate() samples for them alone with the same seed; their slots are that generation's."""
    _, model, _ = static
    prompts, params = ROW_PROMPTS + [list(range(10, 40))], ROW_PARAMS + [SamplingParams(0.0, max_new_tokens=25)]
    alone = [generate(model, [p], q, eos_ids={3}, seed=[i]) for i, (p, q) in enumerate(zip(prompts, params))]
    decoder = Decoder(model, capacity=3, eos_ids={3}, initial_width=width)
    joins = [1, 0, 2, 0, 1, 0, 0, 1, 0, 1]  # how many rows try to join before each step
    pending, index, got, slots = list(range(len(prompts))), {}, {}, {}
    for step in range(200):
        new = [pending.pop(0) for _ in range(min(joins[step % len(joins)], decoder.free, len(pending)))]
        for i, row in zip(new, decoder.add([(prompts[i], params[i], i) for i in new])):
            index[row], got[i], slots[i] = i, [], []
        for row, token, real, zero in decoder.step():
            got[index[row]].append(token)
            slots[index[row]].append((real, zero))
            if index[row] == 3 and len(got[3]) == 5:  # a stop string / a client that left
                decoder.end(row)
        if not pending and not decoder.rows:
            break
    for i, gen in enumerate(alone):
        expected = gen.tokens[0][:5] if i == 3 else gen.tokens[0]
        assert got[i] == expected, i
        assert slots[i] == list(zip(gen.real_slots[0], gen.zero_slots[0]))[:len(expected)], i
    assert decoder.free == 3


def test_text_stream_holds_back_a_possible_stop_string(static):
    """Text is released only once it cannot be the start of a stop string; the answer ends before the stop."""
    _, _, tokenizer = static
    stream = TextStream(tokenizer, {3}, ["END"])
    ids = tokenizer("abEN ENcdEND tail", add_special_tokens=False)["input_ids"]
    pieces = []
    for tok in ids:
        pieces.append(stream.push(tok))
        if stream.stopped:
            break
    assert pieces[:4] == ["a", "b", "", ""] and "".join(pieces) + stream.flush() == "abEN ENcd" and stream.stopped


# ---------------------------------------------------------------------------------------------------------------
# Answers.


def test_models_and_health_name_the_folder(static, tiny):
    url, _, _ = static
    status, models = get(url, "/v1/models")
    assert status == 200 and [m["id"] for m in models["data"]] == [tiny.name]
    assert client(url).models.list().data[0].id == tiny.name
    h = health(url)
    assert h["status"] == "ok" and h["model"] == tiny.name and h["waiting"] == 0


def test_greedy_chat_equals_evaluate(static):
    """Chat answers at temperature 0 are evaluate.py's for the same prompts (its chat template, its greedy
    engine), streamed or not; usage counts the same tokens, and a static model saves nothing."""
    url, model, tokenizer = static
    prompts, gen, texts = greedy_reference(model, tokenizer, QUESTIONS[:3], 24)
    for i, question in enumerate(QUESTIONS[:3]):
        r = chat(url, question, temperature=0, max_tokens=24)
        assert r.choices[0].message.content == texts[i], i
        assert r.choices[0].finish_reason == ("stop" if gen.finished[i] else "length")
        u = r.usage
        assert (u.prompt_tokens, u.completion_tokens) == (len(prompts[i]), len(gen.tokens[i]))
        assert u.total_tokens == u.prompt_tokens + u.completion_tokens
        assert u.zero_expert_ratio == 0.0 and u.expert_flops_saved == 0.0
        chunks = list(chat(url, question, model="tiny", temperature=0, max_tokens=24, stream=True))
        assert chunks[0].choices[0].delta.role == "assistant"
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == texts[i]
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == r.choices[0].finish_reason
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == u.completion_tokens


def test_completions_streamed_and_not(static):
    """/v1/completions continues the raw prompt (no chat template): the engine's greedy answer, both ways."""
    url, model, tokenizer = static
    ids = tokenizer("Compute 1+2 =", add_special_tokens=False)["input_ids"]
    cfg = model.config
    gen = generate(model, [ids], SamplingParams(temperature=0, max_new_tokens=12), stop_ids(tokenizer, cfg),
                   pad_id(tokenizer, cfg))
    text = tokenizer.decode(gen.tokens[0], skip_special_tokens=True)
    c = client(url)
    r = c.completions.create(model="tiny", prompt="Compute 1+2 =", temperature=0, max_tokens=12)
    assert r.object == "text_completion" and r.choices[0].text == text
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == len(gen.tokens[0])
    chunks = list(c.completions.create(model="tiny", prompt="Compute 1+2 =", temperature=0, max_tokens=12,
                                       stream=True))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == text
    assert chunks[-1].usage.total_tokens == r.usage.total_tokens


def test_converted_model_reports_its_routing(converted):
    """A converted model's usage reports the zero-expert ratio of exactly the slots its answer's tokens were
    routed to (the engine's per-token counts), positive, and the same share of expert FLOPs saved."""
    model, tokenizer = load_for_inference(converted, device="cpu")
    prompts, gen, texts = greedy_reference(model, tokenizer, QUESTIONS[:1], 16)
    with running(model, tokenizer, converted.name) as url:
        r = chat(url, QUESTIONS[0], model=converted.name, temperature=0, max_tokens=16)
    real, zero = sum(gen.real_slots[0]), sum(gen.zero_slots[0])
    assert r.choices[0].message.content == texts[0]
    assert r.usage.zero_expert_ratio == pytest.approx(zero / (real + zero), abs=1e-12) and zero > 0
    assert r.usage.expert_flops_saved == pytest.approx(r.usage.zero_expert_ratio, abs=1e-12)


def test_seeded_sampling_is_the_engines_and_reproducible(static):
    """Concurrent requests with their own temperature / top-p / top-k / seed each get what the engine samples for
    that prompt alone with that seed: batch-mates change nothing."""
    url, model, tokenizer = static
    cfg = model.config
    settings = [dict(temperature=1.0, seed=1), dict(temperature=0.7, top_p=0.9, seed=2),
                dict(temperature=1.2, seed=3, extra_body={"top_k": 5}), dict(temperature=0, seed=4)]
    expected = []
    for question, s in zip(QUESTIONS, settings):
        ids = encode_items(tokenizer, [Item("", "", [{"role": "user", "content": question}], "", None)], 16,
                           CONTEXT)[0]
        params = SamplingParams(temperature=s["temperature"], top_p=s.get("top_p", 0.95),
                                top_k=s.get("extra_body", {}).get("top_k", 20), max_new_tokens=16)
        gen = generate(model, [ids], params, stop_ids(tokenizer, cfg), pad_id(tokenizer, cfg), seed=[s["seed"]])
        expected.append(tokenizer.decode(gen.tokens[0], skip_special_tokens=True))
    answers = [None] * len(settings)

    def ask(i):
        answers[i] = chat(url, QUESTIONS[i], max_tokens=16, **settings[i]).choices[0].message.content

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(settings))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert answers == expected
    assert chat(url, QUESTIONS[0], max_tokens=16, **settings[0]).choices[0].message.content == expected[0]


def test_stop_string_cuts_the_answer(static):
    """`stop` ends the text before the first stop string (finish_reason "stop"), streamed or not."""
    url, _, _ = static
    answers = {q: chat(url, q, temperature=0, max_tokens=40).choices[0].message.content for q in QUESTIONS}
    question, full = max(answers.items(), key=lambda qa: len(qa[1]))  # a random model: some answers are short
    assert len(full) >= 8, full
    stop = full[6:8]
    cut = full[:full.find(stop)]
    r = chat(url, question, temperature=0, max_tokens=40, stop=[stop, "never appears"])
    assert r.choices[0].message.content == cut and r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens < 40
    chunks = list(chat(url, question, temperature=0, max_tokens=40, stop=stop, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == cut
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"


def test_concurrent_requests_equal_one_at_a_time(static):
    """8 greedy requests at once share decode steps (the worker decoded more than one row in a step) and each
    gets the answer it gets alone."""
    url, _, _ = static
    alone = [chat(url, q, temperature=0, max_tokens=20).choices[0].message.content for q in QUESTIONS]
    together = [None] * len(QUESTIONS)
    barrier = threading.Barrier(len(QUESTIONS))

    def ask(i):
        barrier.wait()
        together[i] = chat(url, QUESTIONS[i], temperature=0, max_tokens=20).choices[0].message.content

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(QUESTIONS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert together == alone
    assert health(url)["largest_batch"] > 1


# ---------------------------------------------------------------------------------------------------------------
# Bad input, overload, disconnects, signals.

GOOD = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}
BAD = [  # (body, status, param, words the message must contain)
    ("{not json", 400, None, "not valid JSON"),
    ("[1, 2]", 400, None, "must be a JSON object"),
    (json.dumps({"model": "tiny"}), 400, "messages", "Field required"),
    (json.dumps({**GOOD, "messages": "hi"}), 400, "messages", "valid list"),
    (json.dumps({**GOOD, "messages": [{"role": "user", "content": 5}]}), 400, "messages.0.content", "string"),
    (json.dumps({**GOOD, "model": "gpt-4"}), 404, "model", "does not exist"),
    (json.dumps({**GOOD, "messages": [{"role": "user", "content": "x" * 200}]}), 400, "messages",
     "the context is 128 tokens"),
    (json.dumps({**GOOD, "max_tokens": 0}), 400, "max_tokens", "greater than or equal to 1"),
    (json.dumps({**GOOD, "max_tokens": 500}), 400, "max_tokens", "exceed the context"),
    (json.dumps({**GOOD, "max_tokens": "ten"}), 400, "max_tokens", "valid integer"),
    (json.dumps({**GOOD, "temperature": -0.5}), 400, "temperature", "greater than or equal to 0"),
    (json.dumps({**GOOD, "temperature": float("nan")}), 400, "temperature", "finite number"),
    (json.dumps({**GOOD, "top_p": 0}), 400, "top_p", "greater than 0"),
    (json.dumps({**GOOD, "top_p": 1.5}), 400, "top_p", "less than or equal to 1"),
    (json.dumps({**GOOD, "stream": "yes"}), 400, "stream", "valid boolean"),
    (json.dumps({**GOOD, "n": 2}), 400, "n", "less than or equal to 1"),
]


@pytest.mark.parametrize("body,status,param,words", BAD, ids=[f"{b[2]}-{i}" for i, b in enumerate(BAD)])
def test_bad_chat_input_is_refused_by_name(static, body, status, param, words):
    url, _, _ = static
    code, reply, _ = post_raw(url, "/v1/chat/completions", body)
    assert code == status and reply["error"]["param"] == param and words in reply["error"]["message"], reply
    assert reply["error"]["type"] == "invalid_request_error"


def test_bad_completion_input_and_the_server_goes_on(static):
    url, _, _ = static
    for body, param in [({"model": "tiny"}, "prompt"), ({"prompt": ["a", 1]}, "prompt"), ({"prompt": ""}, "prompt"),
                        ({"prompt": "hi", "top_k": -1}, "top_k"), ({"prompt": "hi", "seed": -3}, "seed"),
                        ({"prompt": "hi", "stop": [""]}, "stop.0")]:
        code, reply, _ = post_raw(url, "/v1/completions", json.dumps(body))
        assert code == 400 and reply["error"]["param"] == param, (body, reply)
    with pytest.raises(openai.BadRequestError, match="temperature"):  # as the official client reports it
        chat(url, "hi", temperature=-1)
    assert client(url).completions.create(model="tiny", prompt="hi", max_tokens=2).usage.completion_tokens >= 1


def test_full_queue_gets_503_and_a_disconnect_frees_the_slot(slow):
    """Batch size 1, queue 1: while one answer streams and one waits, a third request gets 503 + Retry-After.
    The streaming client then leaves mid-answer: its row stops being decoded (the server's token count stops
    well short of max_tokens) and the waiting request is served."""
    c = client(slow)
    with chat(slow, "hi", model="slow", temperature=0, max_tokens=100, stream=True) as stream:
        chunks = iter(stream)
        next(chunks), next(chunks)  # the role chunk and the first token: it is being decoded
        waiting = {}
        t = threading.Thread(target=lambda: waiting.setdefault("r", chat(slow, "hi", model="slow", max_tokens=3)))
        t.start()
        wait_until(lambda: health(slow)["waiting"] == 1)
        with pytest.raises(openai.APIStatusError) as busy:
            c.completions.create(model="slow", prompt="hi", max_tokens=2)
        assert busy.value.status_code == 503 and busy.value.response.headers["retry-after"] == "1"
        assert "busy" in busy.value.message
        tokens_before = health(slow)["tokens_generated"]
    t.join(30)  # the stream is closed: the waiting request gets the slot
    assert waiting["r"].usage.completion_tokens >= 1
    wait_until(lambda: health(slow)["running"] == 0)
    assert health(slow)["tokens_generated"] - tokens_before < 20  # not the 100 the stream asked for
    assert health(slow)["waiting"] == 0


def test_a_non_streaming_client_that_leaves_frees_its_slot(slow):
    """A client waiting for a whole answer that hangs up is noticed (polled every 0.5 s) and its row ends."""
    host, port = slow.removeprefix("http://").split(":")
    wait_until(lambda: health(slow)["running"] == 0)
    before = health(slow)["tokens_generated"]
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request("POST", "/v1/completions", body=json.dumps({"prompt": "hi", "max_tokens": 100}),
                 headers={"Content-Type": "application/json"})
    wait_until(lambda: health(slow)["running"] == 1)
    conn.close()
    wait_until(lambda: health(slow)["running"] == 0, timeout=5)
    assert health(slow)["tokens_generated"] - before < 80  # 100 tokens take > 2 s at 20 ms a step


def test_sigterm_stops_the_cli_server_cleanly(tiny):
    """`serve.py --port 0` serves under --served-model-name, and SIGTERM ends it with 143 and no traceback."""
    proc = subprocess.Popen([sys.executable, "serve.py", "--model", str(tiny), "--port", "0", "--served-model-name",
                             "cli", "--max-new-tokens", "4"], cwd=ROOT, env=ENV, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stderr.readline()
        while line and "http://" not in line:
            line = proc.stderr.readline()
        url = re.search(r"(http://127\.0\.0\.1:\d+)/v1", line).group(1)
        wait_until(lambda: _up(url), timeout=30)
        assert client(url).models.list().data[0].id == "cli"
        assert chat(url, "hi", model="cli").usage.completion_tokens <= 4  # --max-new-tokens is the default
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143 and "Traceback" not in err, err


def _up(url: str) -> bool:
    try:
        return get(url, "/health")[0] == 200
    except OSError:
        return False


def test_chat_template_kwargs_reach_the_template(tiny):
    """A request's chat_template_kwargs (vLLM's and SGLang's field) and serve.py --chat-template-kwargs render the
    prompt: with a Qwen3-like template, enable_thinking false closes an empty thought (more prompt tokens); the
    request's value wins over the server's."""
    model, tokenizer = load_for_inference(tiny, device="cpu")
    tokenizer.chat_template = (ROOT / "tests" / "assets" / "thinking_template.jinja").read_text()
    ask = dict(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=1, temperature=0)
    with running(model, tokenizer, "tiny", ServerOptions(chat_template_kwargs={"enable_thinking": False})) as url:
        plain = client(url).chat.completions.create(**ask).usage.prompt_tokens
        thinking = client(url).chat.completions.create(
            **ask, extra_body={"chat_template_kwargs": {"enable_thinking": True}}).usage.prompt_tokens
    assert plain - thinking == len("\n</think>\n\n")
