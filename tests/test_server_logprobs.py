"""Log-probs over HTTP (zeda/server.py): /v1/completions `logprobs` + `echo` + lists of prompts, /v1/chat/completions
`logprobs` + `top_logprobs`, streamed or not, and the engine's part (generation.Decoder's row.logprobs).

Every value is checked against an independent reference on the same tokens: zeda.model.token_logprobs (the
chunked head OPD scores with) for the chosen tokens, and log_softmax of a plain full forward for the most likely
ones, to 1e-4 in fp32. The servers run in-process on loopback (tests/test_server.py's `running`) on a random
tiny static model with the char-level tokenizer, whose tokens are single characters: offsets can be checked
exactly.
"""

import json

import openai
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

import zeda.server
from zeda.conversion import convert_checkpoint
from zeda.evaluation import Item, encode_items, pad_id, stop_ids
from zeda.generation import generate
from zeda.loading import load_for_inference
from zeda.model import token_logprobs
from zeda.sampling import SamplingParams
from zeda.generation import Decoder
from zeda.server import ServerOptions, score_prompts, token_bytes
from zeda_toy.tiny import make_tiny_checkpoint
from zeda_toy.tokenizer import save_tokenizer

from test_server import client, post_raw, running  # tests/test_server.py's in-process server and requests

CONTEXT = 128
MAX_QUEUE = 8
PROMPTS = ["Compute 1+2 =", "Reverse abc:", "hi"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random static tiny MoE whose vocabulary is exactly the char-level tokenizer's (101 tokens)."""
    path = tmp_path_factory.mktemp("logprobs") / "tiny"
    make_tiny_checkpoint(path, vocab_size=101, eos_token_id=3, pad_token_id=0, max_position_embeddings=CONTEXT)
    save_tokenizer(path)
    return path


@pytest.fixture(scope="module")
def server(tiny):
    """(base URL, model, tokenizer)."""
    model, tokenizer = load_for_inference(tiny, device="cpu")
    assert model.compute_dtype == torch.float32
    with running(model, tokenizer, "tiny", ServerOptions(max_batch_size=4, max_queue=MAX_QUEUE)) as url:
        yield url, model, tokenizer


@torch.no_grad()
def reference(model, ids: list[int]):
    """(log p(ids[t+1] | ids[:t+1]) [T-1] by token_logprobs, log_softmax of a full forward's logits [T-1, V])."""
    ids_1T = torch.tensor([ids])
    return token_logprobs(model, ids_1T)[0].tolist(), model(ids_1T)[0, :-1].float().log_softmax(-1)


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def post(url: str, path: str, body: dict) -> dict:
    status, reply, _ = post_raw(url, path, json.dumps(body))
    assert status == 200, reply
    return reply


def expected_top(tokenizer, logprobs_V: torch.Tensor, k: int) -> list[tuple[str, float]]:
    top = logprobs_V.topk(k)
    return [(tokenizer.decode([i], skip_special_tokens=False), v) for i, v in zip(top.indices.tolist(),
                                                                                   top.values.tolist())]


def check_completion_logprobs(tokenizer, logprobs: dict, ids: list[int], k: int, model, first_is_prompt: bool):
    """choices[i].logprobs of tokens `ids` (the whole sequence the model saw, the first one unscored when
    first_is_prompt) against the references: chosen log-probs, the k most likely (most likely first, the chosen
    one added when it is not among them)."""
    chosen, full_TV = reference(model, ids)
    assert logprobs["tokens"] == [tokenizer.decode([t], skip_special_tokens=False) for t in ids]
    got = logprobs["token_logprobs"]
    if first_is_prompt:
        assert got[0] is None and logprobs["top_logprobs"][0] is None
        got, tops = got[1:], logprobs["top_logprobs"][1:]
    else:
        tops = logprobs["top_logprobs"]
        chosen, full_TV = chosen[-len(got):], full_TV[-len(got):]
    assert got == pytest.approx(chosen, abs=1e-4)
    for t, (top, token) in enumerate(zip(tops, logprobs["tokens"][-len(tops):])):
        want = expected_top(tokenizer, full_TV[t], k)
        assert list(top)[:k] == [text for text, _ in want], t  # most likely first
        assert [top[text] for text, _ in want] == pytest.approx([v for _, v in want], abs=1e-4)
        assert set(top) == {text for text, _ in want} | {token}  # up to k + 1 entries: the chosen one too


# ---------------------------------------------------------------------------------------------------------------
# /v1/completions


def test_echo_scores_prompts_as_a_forward_does(server):
    """max_tokens 0 + echo: each prompt of a list (different lengths, left-padded into one forward) comes back as
    its own choice with its text and its tokens' log-probs, the first null; nothing is generated. The same
    prompts as token ids give the same answer."""
    url, model, tokenizer = server
    r = post(url, "/v1/completions", {"model": "tiny", "prompt": PROMPTS, "max_tokens": 0, "echo": True,
                                      "logprobs": 3})
    assert [c["index"] for c in r["choices"]] == [0, 1, 2]
    for prompt, choice in zip(PROMPTS, r["choices"]):
        ids = encode(tokenizer, prompt)
        assert choice["text"] == prompt and choice["finish_reason"] == "length"
        assert choice["logprobs"]["text_offset"] == list(range(len(prompt)))  # one character per token
        check_completion_logprobs(tokenizer, choice["logprobs"], ids, 3, model, first_is_prompt=True)
    assert r["usage"]["prompt_tokens"] == sum(map(len, PROMPTS)) and r["usage"]["completion_tokens"] == 0
    as_ids = post(url, "/v1/completions", {"prompt": [encode(tokenizer, p) for p in PROMPTS], "max_tokens": 0,
                                           "echo": True, "logprobs": 3})
    assert [c["text"] for c in as_ids["choices"]] == PROMPTS
    assert [c["logprobs"] for c in as_ids["choices"]] == [c["logprobs"] for c in r["choices"]]


def test_echo_without_logprobs_and_a_prompt_that_fills_the_context(server):
    """echo alone prepends the prompt's text (logprobs null); with max_tokens 0 a prompt may fill the whole
    context, one token more is refused naming the prompt."""
    url, _, tokenizer = server
    r = post(url, "/v1/completions", {"prompt": "Compute 1+2 =", "max_tokens": 3, "echo": True, "temperature": 0})
    alone = post(url, "/v1/completions", {"prompt": "Compute 1+2 =", "max_tokens": 3, "temperature": 0})
    assert r["choices"][0]["text"] == "Compute 1+2 =" + alone["choices"][0]["text"]
    assert r["choices"][0]["logprobs"] is None
    r = post(url, "/v1/completions", {"prompt": [encode(tokenizer, "ab<|im_end|>")], "max_tokens": 0, "echo": True})
    assert r["choices"][0]["text"] == "ab<|im_end|>"  # token ids are echoed decoded, special tokens kept
    full = list(range(6, 100)) + list(range(6, 6 + CONTEXT - 94))
    assert len(full) == CONTEXT
    r = post(url, "/v1/completions", {"prompt": full, "max_tokens": 0, "echo": True, "logprobs": 0})
    assert len(r["choices"][0]["logprobs"]["tokens"]) == CONTEXT
    status, reply, _ = post_raw(url, "/v1/completions", json.dumps({"prompt": full + [6], "max_tokens": 0,
                                                                    "echo": True}))
    assert status == 400 and reply["error"]["param"] == "prompt", reply


def test_generated_logprobs_are_the_models_before_temperature(server):
    """Sampled at temperature 1.5 with top-k and top-p, each generated token's log-prob is the model's own
    (log_softmax of the raw logits), not the tempered one; the tokens are what generate() samples with that seed
    (asking for log-probs changes no sample); echo puts the prompt's tokens before them, and text_offset
    locates every token in the returned text."""
    url, model, tokenizer = server
    prompt = "Compute 1+2 ="
    ids = encode(tokenizer, prompt)
    params = SamplingParams(temperature=1.5, top_p=0.9, top_k=8, max_new_tokens=12)
    gen = generate(model, [ids], params, stop_ids(tokenizer, model.config), pad_id(tokenizer, model.config),
                   seed=[5])
    r = post(url, "/v1/completions", {"prompt": prompt, "max_tokens": 12, "temperature": 1.5, "top_p": 0.9,
                                      "top_k": 8, "seed": 5, "logprobs": 5, "echo": True})
    choice = r["choices"][0]
    lp = choice["logprobs"]
    assert lp["tokens"][len(ids):] == [tokenizer.decode([t], skip_special_tokens=False) for t in gen.tokens[0]]
    check_completion_logprobs(tokenizer, lp, ids + gen.tokens[0], 5, model, first_is_prompt=True)
    tempered = gen.logprobs[0]  # what sample() reports: log_softmax(logits / 1.5)
    assert max(abs(a - b) for a, b in zip(lp["token_logprobs"][len(ids):], tempered)) > 1e-2
    text = choice["text"]
    for i, token, offset in zip(ids + gen.tokens[0], lp["tokens"], lp["text_offset"]):
        if tokenizer.decode([i], skip_special_tokens=True):  # special tokens have no text in an answer
            assert text[offset:offset + len(token)] == token
    assert lp["text_offset"] == sorted(lp["text_offset"]) and max(lp["text_offset"]) <= len(text)
    without = post(url, "/v1/completions", {"prompt": prompt, "max_tokens": 12, "temperature": 1.5, "top_p": 0.9,
                                            "top_k": 8, "seed": 5, "logprobs": 5})
    assert without["choices"][0]["text"] == text[len(prompt):]
    assert without["choices"][0]["logprobs"]["token_logprobs"] == lp["token_logprobs"][len(ids):]
    assert without["choices"][0]["logprobs"]["text_offset"] == [o - len(prompt) for o in lp["text_offset"][len(ids):]]


def test_lm_eval_loglikelihood_request(server):
    """What lm-evaluation-harness's local-completions sends to score a continuation (token-id prompts, echo,
    max_tokens 1, logprobs 1, temperature 0) and how it reads the answer: the sum of token_logprobs[ctxlen:-1]
    is the continuation's log-likelihood, and is_greedy (each token's log-prob the largest of its
    top_logprobs) says whether greedy decoding would produce it."""
    url, model, tokenizer = server
    pairs = [("Compute 1+2 =", " 3"), ("Reverse abc:", " cba"), ("hi", "!")]
    requests = [(encode(tokenizer, c), encode(tokenizer, c + x)) for c, x in pairs]
    r = post(url, "/v1/completions", {"model": "tiny", "prompt": [whole for _, whole in requests],
                                      "temperature": 0, "max_tokens": 1, "logprobs": 1, "seed": 1234, "echo": True})
    for (context, whole), choice in zip(requests, sorted(r["choices"], key=lambda c: c["index"])):
        ctxlen = len(context)
        got = choice["logprobs"]["token_logprobs"][ctxlen:-1]
        chosen, full_TV = reference(model, whole)
        assert sum(got) == pytest.approx(sum(chosen[ctxlen - 1:]), abs=1e-4)
        is_greedy = all(lp == max(top.values()) for lp, top in zip(got, choice["logprobs"]["top_logprobs"][ctxlen:-1]))
        assert is_greedy == (full_TV[ctxlen - 1:].argmax(-1).tolist() == whole[ctxlen:])
    context = requests[0][0]  # and a continuation greedy decoding gives: is_greedy holds, exactly
    greedy_token = int(reference(model, context + [6])[1][len(context) - 1].argmax())
    r = post(url, "/v1/completions", {"prompt": [context + [greedy_token]], "max_tokens": 1, "logprobs": 1,
                                      "echo": True, "temperature": 0})
    lps, tops = r["choices"][0]["logprobs"]["token_logprobs"], r["choices"][0]["logprobs"]["top_logprobs"]
    assert lps[-2] == max(tops[-2].values())  # the same tensor's value: equal, not merely close


def test_streamed_completions_carry_each_chunks_logprobs(server):
    """A streamed list of prompts with echo + logprobs: each chunk carries its own tokens' log-probs under its
    choice's index; put together per index they are the non-streamed answer, offsets included."""
    url, _, _ = server
    body = {"prompt": PROMPTS[:2], "max_tokens": 6, "temperature": 0, "logprobs": 2, "echo": True}
    whole = post(url, "/v1/completions", body)
    got = {0: {"text": "", "tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}, 1: None}
    got[1] = json.loads(json.dumps(got[0]))
    chunks = list(client(url).completions.create(model="tiny", stream=True, **body))
    for chunk in chunks[:-1]:
        c = chunk.choices[0]
        got[c.index]["text"] += c.text
        for key, values in (c.logprobs.model_dump() if c.logprobs else {}).items():
            got[c.index][key] += values
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole["usage"]["completion_tokens"]
    for choice in whole["choices"]:
        assert got[choice["index"]] == {"text": choice["text"], **choice["logprobs"]}


# ---------------------------------------------------------------------------------------------------------------
# /v1/chat/completions


def test_chat_logprobs_streamed_and_not(server):
    """Greedy chat with logprobs + top_logprobs 4: one entry per answer token (the reference's log-prob, its
    bytes, exactly 4 alternatives, most likely first, the chosen one first of them as greedy picks it); a
    stream's chunks carry the same entries; logprobs without top_logprobs gives none."""
    url, model, tokenizer = server
    question = "Compute 1+2."
    prompt = encode_items(tokenizer, [Item("", "", [{"role": "user", "content": question}], "", None)], 10,
                          CONTEXT)[0]
    c = client(url)
    ask = dict(model="tiny", messages=[{"role": "user", "content": question}], max_tokens=10, temperature=0,
               logprobs=True, top_logprobs=4)
    r = c.chat.completions.create(**ask)
    content = r.choices[0].logprobs.content
    answer = encode(tokenizer, r.choices[0].message.content)
    assert len(content) == r.usage.completion_tokens and [e.token for e in content][:len(answer)] == [
        tokenizer.decode([t]) for t in answer]
    ids = prompt + [tokenizer.convert_tokens_to_ids(e.token) for e in content]
    chosen, full_TV = reference(model, ids)
    n = len(prompt) - 1
    assert [e.logprob for e in content] == pytest.approx(chosen[n:], abs=1e-4)
    for t, entry in enumerate(content):
        want = expected_top(tokenizer, full_TV[n + t], 4)
        assert [a.token for a in entry.top_logprobs] == [text for text, _ in want]
        assert [a.logprob for a in entry.top_logprobs] == pytest.approx([v for _, v in want], abs=1e-4)
        assert entry.top_logprobs[0].token == entry.token and entry.top_logprobs[0].logprob == entry.logprob
        assert entry.bytes == list(entry.token.encode()) and entry.top_logprobs[1].bytes == list(
            entry.top_logprobs[1].token.encode())
    streamed = [e for chunk in c.chat.completions.create(stream=True, **ask) if chunk.choices and
                chunk.choices[0].logprobs for e in chunk.choices[0].logprobs.content]
    assert [e.model_dump() for e in streamed] == [e.model_dump() for e in content]
    plain = c.chat.completions.create(**{**ask, "top_logprobs": None})
    assert [e.top_logprobs for e in plain.choices[0].logprobs.content] == [[]] * len(content)
    assert c.chat.completions.create(**{**ask, "logprobs": None, "top_logprobs": None}).choices[0].logprobs is None


# ---------------------------------------------------------------------------------------------------------------
# Bad requests: refused by name, never ignored.

CHAT = {"messages": [{"role": "user", "content": "hi"}]}
BAD = [  # (path, body, param, words)
    ("/v1/completions", {"prompt": "hi", "logprobs": 6}, "logprobs", "less than or equal to 5"),
    ("/v1/completions", {"prompt": "hi", "logprobs": -1}, "logprobs", "greater than or equal to 0"),
    ("/v1/completions", {"prompt": "hi", "logprobs": True}, "logprobs", "valid integer"),
    ("/v1/completions", {"prompt": "hi", "echo": "yes"}, "echo", "valid boolean"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, "max_tokens", "needs echo"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": -1}, "max_tokens", "greater than or equal to 0"),
    ("/v1/completions", {"prompt": [], "echo": True}, "prompt", "list of token ids"),
    ("/v1/completions", {"prompt": [[5, 6], []]}, "prompt", "none of them empty"),
    ("/v1/completions", {"prompt": ["ab", [5, 6]]}, "prompt", "list of strings"),
    ("/v1/completions", {"prompt": [5, True]}, "prompt", "list of token ids"),
    ("/v1/completions", {"prompt": [5, 101]}, "prompt", "token id 101 is not in the vocabulary"),
    ("/v1/completions", {"prompt": [[5], [6, -1]]}, "prompt.1", "token id -1"),
    ("/v1/completions", {"prompt": ["ab", ""]}, "prompt.1", "empty"),
    ("/v1/completions", {"prompt": ["a"] * (MAX_QUEUE + 1)}, "prompt", f"at most {MAX_QUEUE}"),
    ("/v1/completions", {"prompt": "hi", "suffix": "!"}, "suffix", "does not support"),
    ("/v1/completions", {"prompt": "hi", "best_of": 2}, "best_of", "only 1"),
    ("/v1/completions", {"prompt": "hi", "prompt_logprobs": 1}, "prompt_logprobs", "does not support"),
    ("/v1/chat/completions", {**CHAT, "top_logprobs": 2}, "top_logprobs", "needs logprobs: true"),
    ("/v1/chat/completions", {**CHAT, "logprobs": False, "top_logprobs": 2}, "top_logprobs", "needs logprobs"),
    ("/v1/chat/completions", {**CHAT, "logprobs": True, "top_logprobs": 21}, "top_logprobs", "less than or equal"),
    ("/v1/chat/completions", {**CHAT, "logprobs": 1}, "logprobs", "valid boolean"),
    ("/v1/chat/completions", {**CHAT, "echo": True}, "echo", "does not support"),
    ("/v1/chat/completions", {**CHAT, "tools": []}, "tools", "does not support"),
    ("/v1/chat/completions", {**CHAT, "frequency_penalty": 0.5}, "frequency_penalty", "only 0"),
    ("/v1/chat/completions", {**CHAT, "logit_bias": {"5": 10}}, "logit_bias", "only {}"),
    ("/v1/chat/completions", {**CHAT, "stream_options": {"include_usage": True, "x": 1}}, "stream_options.x",
     "does not support"),
]


@pytest.mark.parametrize("path,body,param,words", BAD, ids=[f"{b[2]}-{i}" for i, b in enumerate(BAD)])
def test_bad_logprob_requests_are_refused_by_name(server, path, body, param, words):
    url, _, _ = server
    status, reply, _ = post_raw(url, path, json.dumps(body))
    assert status == 400 and reply["error"]["param"] == param and words in reply["error"]["message"], reply


def test_neutral_values_of_unsupported_fields_are_accepted(server):
    """What OpenAI clients may send unasked: penalties 0, logit_bias {}, best_of 1, user, stream_options."""
    url, _, _ = server
    post(url, "/v1/chat/completions", {**CHAT, "max_tokens": 1, "frequency_penalty": 0, "presence_penalty": 0.0,
                                       "logit_bias": {}, "user": "me", "stream_options": {"include_usage": True}})
    post(url, "/v1/completions", {"prompt": "hi", "max_tokens": 1, "best_of": 1, "repetition_penalty": 1})


# ---------------------------------------------------------------------------------------------------------------
# The parts: prompt scoring, the Decoder's log-probs, token bytes.


def test_score_prompts_in_groups_and_chunks_on_a_dynamic_model(tiny, tmp_path, monkeypatch):
    """score_prompts on a converted model (zero experts) with forwards of at most 24 tokens (several groups, one
    prompt alone over the budget) and a head of 3 positions at a time equals token_logprobs and a full forward's
    top-k, prompt by prompt."""
    convert_checkpoint(tiny, tmp_path / "dyn", num_zero=4, progress=False)
    model, tokenizer = load_for_inference(tmp_path / "dyn", device="cpu")
    monkeypatch.setattr(zeda.server, "SCORE_TOKENS", 24)
    monkeypatch.setattr(zeda.server, "HEAD_CHUNK_ELEMENTS", 3 * model.config.vocab_size)
    prompts = [encode(tokenizer, p) for p in ["Compute 1+2 =", "x", "ab", "Write the word cat twice, then stop."]]
    tops = [2, 0, 5, 3]
    scores = score_prompts(model, prompts, tops, pad_id(tokenizer, model.config))
    for ids, k, got in zip(prompts, tops, scores):
        chosen, full_TV = reference(model, ids)
        assert [lp for lp, _ in got] == pytest.approx(chosen, abs=1e-4)
        for t, (_, top) in enumerate(got):
            want = full_TV[t].topk(k)
            assert [i for i, _ in top] == want.indices.tolist()
            assert [v for _, v in top] == pytest.approx(want.values.tolist(), abs=1e-4)


def test_decoder_gives_raw_logprobs_to_the_rows_that_ask(server):
    """Decoder rows joining at different steps with their own sampling: a row with top_logprobs gets, each step,
    its token's log-prob under the raw logits and the k most likely; a row without gets nothing."""
    _, model, _ = server
    prompts = [[5, 17, 30, 40], [9, 44, 60], [70, 71]]
    params = [SamplingParams(temperature=1.3, top_k=5, max_new_tokens=6), SamplingParams(0.0, max_new_tokens=5),
              SamplingParams(temperature=0.7, top_p=0.8, max_new_tokens=4)]
    asks = [3, None, 0]
    decoder = Decoder(model, capacity=3, eos_ids=set())
    got = {}
    rows = decoder.add([(prompts[0], params[0], 1)])
    for step in range(8):
        if step == 2:
            rows += decoder.add([(p, q, i) for i, (p, q) in enumerate(zip(prompts[1:], params[1:]), 2)])
        for row in rows:
            row.top_logprobs = asks[rows.index(row)]
        for row, token, _, _ in decoder.step():
            got.setdefault(rows.index(row), []).append((token, row.logprobs))
    for i, steps in got.items():
        assert len(steps) == params[i].max_new_tokens
        if asks[i] is None:
            assert all(lp is None for _, lp in steps)
            continue
        chosen, full_TV = reference(model, prompts[i] + [t for t, _ in steps])
        n = len(prompts[i]) - 1
        assert [lp[0] for _, lp in steps] == pytest.approx(chosen[n:], abs=1e-4)
        for t, (_, (_, top)) in enumerate(steps):
            want = full_TV[n + t].topk(asks[i])
            assert [j for j, _ in top] == want.indices.tolist()
            assert [v for _, v in top] == pytest.approx(want.values.tolist(), abs=1e-4)


def test_token_bytes_of_a_byte_level_bpe_rebuild_the_text():
    """A byte-level BPE (Qwen's and GLM's kind) splits characters it has not merged into bytes that decode alone
    to U+FFFD; token_bytes gives each token's real bytes, so the bytes of all tokens are the text's UTF-8."""
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.train_from_iterator(["hello world, héllo wörld"] * 20, trainers.BpeTrainer(
        vocab_size=270, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core)
    text = "héllo 日本 wörld"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    texts = tokenizer.batch_decode([[i] for i in ids])
    assert sum("\ufffd" in t for t in texts) >= 6  # 日 and 本 are three bytes each, none merged
    assert b"".join(bytes(token_bytes(tokenizer, i, t)) for i, t in zip(ids, texts)) == text.encode()


def test_openai_client_reads_completion_logprobs(server):
    """The official client's types parse the completions shape (tokens, token_logprobs, top_logprobs,
    text_offset), and a client error names the field."""
    url, _, _ = server
    c = client(url)
    r = c.completions.create(model="tiny", prompt="ab", max_tokens=2, logprobs=2, echo=True, temperature=0)
    lp = r.choices[0].logprobs
    assert lp.tokens[:2] == ["a", "b"] and lp.token_logprobs[0] is None and len(lp.top_logprobs) == 4
    assert lp.text_offset == [0, 1, 2, 3]
    with pytest.raises(openai.BadRequestError, match="logprobs"):
        c.completions.create(model="tiny", prompt="ab", max_tokens=2, logprobs=9)
