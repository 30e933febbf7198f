"""The teacher on an OpenAI-compatible server (zeda/remote.py): rollout.py --server and train_opd.py --teacher-url.

The server is zeda's own (zeda/server.py, uvicorn in a thread on a loopback port: tests/test_server.py's
`running`) on the shipped toy teacher, assets/qwen3_moe_teacher. What each test proves:

- rollouts: greedy answers over HTTP -- the server rendering the chat, or rollout.py rendering it with --teacher
  and sending token ids -- are the in-process rollout.py's, line for line (messages, finished, correct, id); a run
  stopped half way (by a server error that keeps what arrived) and rerun answers every prompt exactly once;
  seeded sampling asks the same answer whatever the concurrency; a busy server (503) is retried until it answers.
- OPD: train_opd.py --teacher-url gives the in-process teacher's metrics (teacher log-probs through reverse KL and
  the loss) to 1e-4 in fp32, with one update per rollout and with two; flags that need the in-process teacher
  are refused, and so is a server whose context is too short or whose tokenizer reads the ids differently.
- errors: a closed port, a 400, a 404, a timeout and a reply that is not JSON each end the script with exit 2
  and one line that says which.
- parsing of what zeda's server never sends (a reasoning parser's `reasoning_content` / `reasoning`, a
  finish_reason "abort", several models): a stdlib HTTP server replays replies in the shape vLLM and SGLang
  document; these test the reading of those fields, not any numbers.
"""

import http.server
import json
import re
import shutil
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

import rollout as rollout_script
import train_opd
from zeda_toy import tasks
from zeda.conversion import convert_checkpoint
from zeda.errors import UsageError
from zeda.sampling import SamplingParams
from zeda.loading import load_for_inference
from zeda.remote import RemoteError, Server, chat_answer, prompt_logprobs
from zeda.server import ServerOptions
from zeda_toy.tiny import make_tiny_checkpoint
from zeda_toy.tokenizer import save_tokenizer

from test_server import running  # tests/test_server.py's in-process server

ROOT = Path(__file__).resolve().parents[1]
TEACHER = ROOT / "assets" / "qwen3_moe_teacher"
GREEDY = ["--temperature", "0", "--max-new-tokens", "64"]


@pytest.fixture(scope="module")
def server():
    """(base URL, model, tokenizer) of zeda's server on the shipped toy teacher (fp32 on CPU)."""
    model, tokenizer = load_for_inference(TEACHER, device="cpu")
    with running(model, tokenizer, TEACHER.name, ServerOptions(max_batch_size=8)) as url:
        yield url, model, tokenizer


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    """Six task prompts with reference answers (two per family), as pipeline.py writes them."""
    path = tmp_path_factory.mktemp("remote") / "prompts.jsonl"
    items = tasks.mixture("train", 2, seed=1)
    path.write_text("".join(json.dumps(tasks.to_prompt_record(t)) + "\n" for t in items))
    return path


@pytest.fixture(scope="module")
def reference(prompts, tmp_path_factory) -> dict:
    """The in-process rollout.py's greedy lines, by id."""
    out = tmp_path_factory.mktemp("reference") / "r.jsonl"
    assert rollout_script.main(["--teacher", str(TEACHER), "--prompts", str(prompts), "--out", str(out),
                                "--device", "cpu", *GREEDY]) == 0
    return by_id(out)


def by_id(path: Path) -> dict:
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    ids = [line["id"] for line in lines]
    assert len(set(ids)) == len(ids), "an answer was written twice"
    return {line["id"]: line for line in lines}


def head(path: Path, n: int, out: Path) -> Path:
    out.write_text("".join(path.read_text().splitlines(keepends=True)[:n]))
    return out


def error_line(capsys, script: str) -> str:
    """The one error line a script printed on stderr (and no traceback)."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith(f"{script}: error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------------------------
# rollout.py --server


@pytest.mark.parametrize("render", ["server", "local"])
def test_greedy_rollouts_over_http_are_the_in_process_ones_and_resume(server, prompts, reference, tmp_path, render,
                                                                       capsys):
    """Half the prompts, then all of them: the second run answers only the other half, and the whole file is the
    in-process rollout's, line for line. render=local: --teacher renders the chats here and token ids are sent."""
    url = server[0]
    out = tmp_path / "r.jsonl"
    local = ["--teacher", str(TEACHER)] if render == "local" else []
    half = head(prompts, 3, tmp_path / "half.jsonl")
    assert rollout_script.main(["--server", url, *local, "--prompts", str(half), "--out", str(out), *GREEDY]) == 0
    assert rollout_script.main(["--server", url + "/v1/", *local, "--prompts", str(prompts), "--out", str(out),
                                "--concurrency", "4", *GREEDY]) == 0
    stats = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert stats["written"] == 3 and stats["skipped_existing"] == 3 and stats["checked"] == 3
    assert stats["new_tokens"] > 0
    assert by_id(out) == reference
    # the comparison covers both kinds of answer and of verdict
    assert {r["finished"] for r in reference.values()} == {True, False}
    assert {r["correct"] for r in reference.values()} == {True, False}


def test_seeded_samples_do_not_depend_on_concurrency_or_resume(server, prompts, tmp_path):
    """Each answer's seed comes from --seed and its id: one request at a time, four at a time, or a resumed run ask
    the server the same samples."""
    url = server[0]
    sampled = ["--temperature", "1", "--top-k", "0", "--top-p", "1", "--samples-per-prompt", "2", "--seed", "5",
               "--max-new-tokens", "12"]
    one, four = tmp_path / "one.jsonl", tmp_path / "four.jsonl"
    assert rollout_script.main(["--server", url, "--prompts", str(prompts), "--out", str(one), "--concurrency", "1",
                                *sampled]) == 0
    assert rollout_script.main(["--server", url, "--prompts", str(head(prompts, 2, tmp_path / "two.jsonl")), "--out",
                                str(four), "--concurrency", "4", *sampled]) == 0
    assert rollout_script.main(["--server", url, "--prompts", str(prompts), "--out", str(four), "--concurrency", "4",
                                *sampled]) == 0
    a, b = by_id(one), by_id(four)
    assert a == b and len(a) == 12
    texts = [r["messages"][-1]["content"] for r in a.values()]
    assert len(set(texts)) > 6  # sampled, not greedy: the two samples of a prompt mostly differ


def test_a_server_error_keeps_what_arrived_and_a_rerun_answers_the_rest_once(server, prompts, reference, tmp_path,
                                                                             capsys):
    """The fourth prompt is too long for the server's context with the answer limit: its 400 ends the run (exit 2,
    one line with the server's own message and the prompt's file:line), the three answers before it are on disk,
    and a rerun without it answers the other prompts exactly once."""
    url = server[0]
    lines = prompts.read_text().splitlines(keepends=True)
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(lines[:3]) + json.dumps({"prompt": "x" * 500}) + "\n" + "".join(lines[3:]))
    out = tmp_path / "r.jsonl"
    capsys.readouterr()
    argv = ["--server", url, "--out", str(out), "--concurrency", "1", "--batch-size", "64", *GREEDY]
    assert rollout_script.main([*argv, "--prompts", str(bad)]) == 2
    err = error_line(capsys, "rollout.py")
    assert f"{bad}:4: {url}/v1/chat/completions: HTTP 400: messages: the prompt has" in err
    assert "the context is 512 tokens" in err
    assert "3 new answers kept" in err
    assert len(by_id(out)) == 3
    assert rollout_script.main([*argv, "--prompts", str(prompts)]) == 0
    assert by_id(out) == reference


def test_a_busy_server_is_retried_until_it_answers(tmp_path, prompts, capsys):
    """zeda's server with one row and one waiting place answers 503 (Retry-After: 1) to the rest of four concurrent
    requests: without retries that ends the run, with them every prompt is answered."""
    model, tokenizer = load_for_inference(TEACHER, device="cpu")
    model.register_forward_pre_hook(lambda module, args: time.sleep(0.05))  # answers outlast the burst
    four = head(prompts, 4, tmp_path / "four.jsonl")
    with running(model, tokenizer, "busy", ServerOptions(max_batch_size=1, max_queue=1)) as url:
        argv = ["--server", url, "--prompts", str(four), "--concurrency", "4", "--max-new-tokens", "8",
                "--temperature", "0"]
        capsys.readouterr()
        assert rollout_script.main([*argv, "--out", str(tmp_path / "a.jsonl"), "--retries", "0"]) == 2
        assert "HTTP 503: the server is busy" in error_line(capsys, "rollout.py")
        assert rollout_script.main([*argv, "--out", str(tmp_path / "b.jsonl"), "--retries", "6"]) == 0
    assert len(by_id(tmp_path / "b.jsonl")) == 4


# ----------------------------------------------------------------------------------------------
# errors: one line, exit 2


@contextmanager
def silent_socket():
    """A port that accepts connections (the kernel's backlog) and never answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        yield f"http://127.0.0.1:{s.getsockname()[1]}"


@contextmanager
def replaying(routes: dict):
    """A stdlib HTTP server answering GET/POST `path` with routes[path] = (status, body text or JSON object)."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def answer(self):
            length = int(self.headers.get("Content-Length") or 0)
            self.rfile.read(length)
            status, body = routes.get(self.path, (404, {"error": {"message": "no such route"}}))
            raw = (body if isinstance(body, str) else json.dumps(body)).encode()
            self.send_response(status)
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

        do_GET = do_POST = answer

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


MODELS = (200, {"object": "list", "data": [{"id": "teacher", "object": "model"}]})


def test_unreachable_timeout_404_and_malformed_replies_end_in_one_line(server, prompts, tmp_path, capsys):
    out = tmp_path / "r.jsonl"

    def fails(*flags) -> str:
        capsys.readouterr()
        assert rollout_script.main(["--prompts", str(prompts), "--out", str(out), "--retries", "0", *flags]) == 2
        return error_line(capsys, "rollout.py")

    port = closed_port()
    err = fails("--server", f"http://127.0.0.1:{port}")
    assert f"http://127.0.0.1:{port}/v1/models: cannot connect (Connection refused)" in err and "--server" in err
    with silent_socket() as url:
        t0 = time.monotonic()
        assert "no reply within 0.5 s (--request-timeout)" in fails("--server", url, "--request-timeout", "0.5")
        assert time.monotonic() - t0 < 10
    err = fails("--server", server[0], "--model", "other")
    assert "HTTP 404: the model 'other' does not exist; this server serves 'qwen3_moe_teacher'" in err
    assert re.search(rf"{re.escape(str(prompts))}:\d: ", err)  # the prompt whose request failed first
    with replaying({"/v1/models": (200, "<html>hello</html>")}) as url:
        assert f"{url}/v1/models: malformed reply, not JSON: '<html>hello</html>'" in fails("--server", url)
    with replaying({"/v1/models": (200, {"data": [{"id": "a"}, {"id": "b"}]})}) as url:
        assert "lists 2 models (a, b): name the one to use with --model" in fails("--server", url)
    with replaying({"/v1/models": MODELS, "/v1/chat/completions": (500, {"message": "CUDA out of memory"})}) as url:
        assert "HTTP 500: CUDA out of memory" in fails("--server", url)  # older vLLM's error shape
    assert "not a server URL" in fails("--server", "localhost:8000")
    assert not out.exists()


def test_refusals_before_any_request(prompts, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        rollout_script.main(["--prompts", str(prompts), "--out", str(tmp_path / "r.jsonl")])
    assert exc.value.code == 2 and "one of --teacher (a model folder) or --server (a URL) is required" in \
        capsys.readouterr().err
    assert rollout_script.main(["--teacher", str(TEACHER), "--model", "x", "--prompts", str(prompts), "--out",
                                str(tmp_path / "r.jsonl")]) == 2
    assert "--model names the model a --server serves" in error_line(capsys, "rollout.py")


@pytest.mark.parametrize("url, base", [("http://h:8000", "http://h:8000/v1"), ("http://h:8000/v1/", "http://h:8000/v1"),
                                       ("https://h/proxy", "https://h/proxy/v1")])
def test_server_urls_with_or_without_v1(url, base):
    assert Server(url).base == base


@pytest.mark.parametrize("url", ["localhost:8000", "ftp://h", "http://h:99999", "http://", "http://h/?x=1"])
def test_bad_server_urls_are_refused_by_flag(url):
    with pytest.raises(UsageError, match=r"--teacher-url .*not a server URL"):
        Server(url, "--teacher-url")


# ----------------------------------------------------------------------------------------------
# fields zeda's server does not send (replayed in vLLM's and SGLang's documented shapes)


def chat_reply(message: dict, finish_reason: str = "stop") -> dict:
    return {"id": "x", "object": "chat.completion", "choices": [{"index": 0, "message": message,
                                                                 "finish_reason": finish_reason}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}}


@pytest.mark.parametrize("field", ["reasoning_content", "reasoning"])  # SGLang and vLLM < 0.10; vLLM after
def test_a_reasoning_parsers_reasoning_goes_into_reasoning_content(field, tmp_path, capsys):
    reply = chat_reply({"role": "assistant", "content": "Answer: 4", field: "2+2 is 4."})
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "What is 2+2?", "answer": "4"}) + "\n")
    with replaying({"/v1/models": MODELS, "/v1/chat/completions": (200, reply)}) as url:
        assert rollout_script.main(["--server", url, "--prompts", str(prompts), "--out",
                                    str(tmp_path / "r.jsonl")]) == 0
    line = json.loads((tmp_path / "r.jsonl").read_text())
    assert line["messages"][-1] == {"role": "assistant", "content": "Answer: 4", "reasoning_content": "2+2 is 4."}
    assert line["finished"] is True and line["correct"] is True  # judged on the answer, not the reasoning
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["new_tokens"] == 7


def test_length_is_unfinished_and_an_aborted_answer_is_refused():
    params = SamplingParams(max_new_tokens=4)
    cut = chat_reply({"role": "assistant", "content": None, "reasoning": "Let me"}, "length")
    with replaying({"/v1/chat/completions": (200, cut)}) as url:
        answer = chat_answer(Server(url), "teacher", [{"role": "user", "content": "q"}], params, 1)
    assert answer.content == "" and answer.reasoning == "Let me" and answer.finished is False
    with replaying({"/v1/chat/completions": (200, chat_reply({"role": "assistant", "content": "x"}, "abort"))}) as url:
        with pytest.raises(RemoteError, match="finish_reason 'abort', neither 'stop' nor 'length'"):
            chat_answer(Server(url), "teacher", [{"role": "user", "content": "q"}], params, 1)


def test_prompt_logprobs_refuses_a_reply_that_did_not_score_exactly_the_ids(server):
    """zeda's server scores exactly the ids sent; a reply with one token more (an engine that generated one) is
    refused rather than misaligned."""
    url, model, _ = server
    values, tokens = prompt_logprobs(Server(url), TEACHER.name, [5, 40, 41, 42])
    assert len(values) == 3 and len(tokens) == 4
    reply = {"choices": [{"index": 0, "text": "ab", "finish_reason": "length",
                          "logprobs": {"tokens": ["a", "b", "c"], "token_logprobs": [None, -1.0, -2.0]}}]}
    with replaying({"/v1/completions": (200, reply)}) as fake:
        with pytest.raises(RemoteError, match="echoed 3 tokens and 3 log-probs for the 2 token ids sent"):
            prompt_logprobs(Server(fake), "teacher", [5, 6])


# ----------------------------------------------------------------------------------------------
# train_opd.py --teacher-url


@pytest.fixture(scope="module")
def student(tmp_path_factory) -> Path:
    """A random tiny qwen3_moe with the toy tokenizer (the shipped teacher's), converted with 4 zero experts;
    initializer_range 0.2, so its distributions differ measurably from the teacher's (reverse KL of nats)."""
    d = tmp_path_factory.mktemp("opd_remote")
    make_tiny_checkpoint(d / "static", "qwen3_moe", vocab_size=104, max_position_embeddings=1024,
                         initializer_range=0.2)
    save_tokenizer(d / "static")
    convert_checkpoint(d / "static", d / "student", num_zero=4, progress=False)
    return d / "student"


OPD = ["--max-steps", "2", "--prompts-per-step", "2", "--samples-per-prompt", "2", "--max-new-tokens", "12",
       "--lr", "1e-3", "--device", "cpu"]


def opd(student, prompts, out, *teacher, extra=()) -> tuple[int, list[dict]]:
    code = train_opd.main(["--student", str(student), *teacher, "--prompts", str(prompts), "--out", str(out), *OPD,
                           *extra])
    path = Path(out) / "metrics.jsonl"
    return code, [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.mark.parametrize("updates", ["1", "2"])
def test_opd_with_a_teacher_server_gives_the_in_process_teachers_metrics(server, student, prompts, tmp_path, updates):
    extra = ["--updates-per-rollout", updates]
    code, local = opd(student, prompts, tmp_path / "local", "--teacher", str(TEACHER), extra=extra)
    assert code == 0
    code, remote = opd(student, prompts, tmp_path / "remote", "--teacher-url", server[0], extra=extra)
    assert code == 0 and [m["step"] for m in remote] == [m["step"] for m in local] == [1, 2]
    for a, b in zip(local, remote):
        assert a["mean_response_length"] == b["mean_response_length"]  # the same student samples the same answers
        for key in ("loss", "policy_loss", "reverse_kl", "ga", "zero_ratio", "clipfrac"):
            assert b[key] == pytest.approx(a[key], abs=1e-4), key
    # the teacher's log-probs matter here (a 0.1% error in them fails this test); step 2 follows step 1's update
    assert abs(local[0]["reverse_kl"]) > 0.1


def test_opd_refuses_what_needs_the_in_process_teacher(server, student, prompts, tmp_path, capsys):
    for flags, words in ((["--teacher", str(TEACHER), "--teacher-url", server[0]], "not both"),
                         (["--teacher", str(TEACHER), "--teacher-model", "x"], "--teacher-model names the model"),
                         ([], "one of --teacher (a model folder) or --teacher-url (a URL) is required")):
        with pytest.raises(SystemExit) as exc:
            opd(student, prompts, tmp_path / "o", *flags)
        assert exc.value.code == 2 and words in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_opd_refuses_a_server_too_short_for_the_answers_or_with_another_tokenizer(server, student, prompts, tmp_path,
                                                                                  capsys):
    """The server's /v1/models says its context (512): prompts plus 500 new tokens do not fit. A teacher served
    with a tokenizer that swaps two letters reads the student's ids as other text: refused on the first rollout,
    before any update."""
    code, metrics = opd(student, prompts, tmp_path / "short", "--teacher-url", server[0],
                        extra=["--max-new-tokens", "500"])
    assert code == 2 and not metrics
    assert "the teacher server's context (512 tokens, its max_model_len) is shorter" in error_line(capsys,
                                                                                                   "train_opd.py")
    swapped = tmp_path / "swapped"
    shutil.copytree(TEACHER, swapped)
    tok = json.loads((swapped / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    vocab["e"], vocab["t"] = vocab["t"], vocab["e"]
    (swapped / "tokenizer.json").write_text(json.dumps(tok))
    model, tokenizer = load_for_inference(swapped, device="cpu")
    with running(model, tokenizer, "swapped") as url:
        code, metrics = opd(student, prompts, tmp_path / "swapped-run", "--teacher-url", url)
    assert code == 2 and not metrics and not (tmp_path / "swapped-run" / "final").exists()
    err = error_line(capsys, "train_opd.py")
    assert "the teacher server must serve the student's tokenizer" in err and "'e'" in err and "'t'" in err
    port = closed_port()
    code, _ = opd(student, prompts, tmp_path / "closed", "--teacher-url", f"http://127.0.0.1:{port}",
                  extra=["--retries", "0"])
    assert code == 2 and "cannot connect (Connection refused); is the server at --teacher-url running?" in \
        error_line(capsys, "train_opd.py")
