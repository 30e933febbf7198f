"""Stage 1 (docs/method.md §4): train_sft.py on a tiny converted student, and rollout.py's resumable output.

The student is a tiny random Qwen3-MoE (N = 8, K = 2, 3 MoE layers) converted with Z = 4 zero experts; the
rollouts are the task suite's reference answers (no generation needed). Checked: the loss mask covers exactly
the response and its EOS; a few steps lower the loss; metrics.jsonl has its fields; --resume reproduces the
uninterrupted run; the final checkpoint is a converted model with tokenizer and trainer state; every refusal
exits 2 with a message that says where; over-long rollouts are dropped or truncated and counted; a NaN stops
the run naming the step, before any save; SIGTERM stops after the step with a checkpoint; rollout.py resumes
without duplicates and repairs a torn line. (torchrun meshes: tests/test_parallel.py.)
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

import train_sft
import zeda
from zeda import rollout
from zeda_toy import tasks
from zeda.conversion import convert_checkpoint
from zeda.data import collate, encode_chats
from zeda.sampling import SamplingParams
from zeda_toy.tiny import make_tiny_checkpoint
from zeda_toy.tokenizer import save_tokenizer
from zeda.checkpoint import STATE_FILE

ROOT = Path(__file__).resolve().parents[1]
NUM_ZERO = 4
FAST = ["--global-batch-size", "4", "--micro-batch-size", "2", "--lr", "1e-3", "--device", "cpu"]


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def subprocess_env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(autouse=True)
def keep_signal_handlers():
    """train_sft installs SIGTERM/SIGINT handlers in-process; put pytest's back so Ctrl-C still works."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)


@pytest.fixture(scope="session")
def data(tmp_path_factory):
    """teacher (static), student (converted), prompts.jsonl (12 prompts), rollouts.jsonl (12 reference answers),
    rollouts4.jsonl (the first 4)."""
    d = tmp_path_factory.mktemp("sft")
    make_tiny_checkpoint(d / "teacher", "qwen3_moe", vocab_size=104, max_position_embeddings=512)
    save_tokenizer(d / "teacher")
    convert_checkpoint(d / "teacher", d / "student", num_zero=NUM_ZERO, progress=False)
    items = tasks.mixture("train", 4, seed=1)
    write_jsonl(d / "prompts.jsonl", [tasks.to_prompt_record(t) for t in items])
    write_jsonl(d / "rollouts.jsonl", [tasks.to_rollout_record(t, t.response) for t in items])
    write_jsonl(d / "rollouts4.jsonl", [tasks.to_rollout_record(t, t.response) for t in items[:4]])
    return d


def sft(data: Path, out: Path, *extra, rollouts="rollouts4.jsonl", student="student") -> int:
    return train_sft.main(["--student", str(data / student), "--rollouts", str(data / rollouts), "--out", str(out),
                           *FAST, *extra])


@pytest.fixture(scope="session")
def run4(data):
    """One uninterrupted 4-step run on the same 4 rollouts (one global batch, repeated)."""
    out = data / "run4"
    assert sft(data, out, "--max-steps", "4") == 0
    return out


# ----------------------------------------------------------------------------------------------
# loss masking


def test_loss_mask_is_exactly_response_and_eos(data):
    tokenizer = AutoTokenizer.from_pretrained(data / "student")
    items = tasks.mixture("train", 1, seed=1)  # one per family: three different lengths
    examples = encode_chats(tokenizer, [[{"role": "user", "content": t.prompt}] for t in items],
                            [t.response for t in items])
    ids, attn, loss_mask = collate(examples, tokenizer.pad_token_id)
    targets = ids[:, 1:]
    assert loss_mask.shape == targets.shape
    eos = tokenizer.convert_ids_to_tokens(tokenizer.eos_token_id)
    assert eos == "<|im_end|>"
    for b, (task, e) in enumerate(zip(items, examples)):
        picked = targets[b][loss_mask[b]].tolist()
        assert tokenizer.decode(picked, skip_special_tokens=False) == task.response + eos
        # The prompt (all of it, assistant header included) is never a target; padding never either.
        prompt_text = tokenizer.apply_chat_template([{"role": "user", "content": task.prompt}], tokenize=False,
                                                    add_generation_prompt=True)
        assert tokenizer.decode(ids[b, : e.num_prompt].tolist(), skip_special_tokens=False) == prompt_text
        assert not loss_mask[b, : e.num_prompt - 1].any()  # targets 1..num_prompt-1 are prompt tokens
        assert loss_mask[b, e.num_prompt - 1 : len(e.ids) - 1].all()
        assert not loss_mask[b, len(e.ids) - 1 :].any()  # padding
        assert attn[b].sum() == len(e.ids)
    assert (~attn.bool()).any()  # the batch really has padding


# ----------------------------------------------------------------------------------------------
# a real run: the loss goes down, metrics, final checkpoint


def test_a_few_steps_lower_the_loss(run4):
    metrics = read_metrics(run4)
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert metrics[3]["loss"] < metrics[0]["loss"]
    assert metrics[3]["ce"] < metrics[0]["ce"]


def test_metrics_fields(run4, data):
    cfg = zeda.ModelConfig.from_hf_config(data / "student")
    moe_layers = sum(cfg.moe_layers)
    for m in read_metrics(run4):
        for key in ("step", "lr", "loss", "ce", "ga", "zero_ratio", "zero_ratio_per_layer", "tokens",
                    "tokens_per_s"):
            assert key in m, key
        assert len(m["zero_ratio_per_layer"]) == moe_layers == 3
        assert 0 <= m["zero_ratio"] <= 1 and all(0 <= r <= 1 for r in m["zero_ratio_per_layer"])
        assert m["loss"] == pytest.approx(m["ce"] + m["ga"])
        assert m["ga"] > 0 and m["tokens"] > 0 and m["tokens_per_s"] > 0
    first = read_metrics(run4)[0]
    assert first["lr"] == pytest.approx(1e-3)  # 10% of 4 steps = no warmup; cosine starts at the peak
    # tokens = response tokens (+ EOS) of the global batch: here all 4 rollouts.
    tokenizer = AutoTokenizer.from_pretrained(data / "student")
    examples, _ = train_sft.load_rollouts(data / "rollouts4.jsonl", tokenizer, 10**6, 10**6, False)
    assert first["tokens"] == sum(len(e.ids) - e.num_prompt for e in examples)


def test_final_checkpoint_is_a_converted_model(run4, data):
    final = run4 / "final"
    summary = json.loads((run4 / "summary.json").read_text())
    assert summary["step"] == 4 and summary["steps"] == 4
    # final/ is what a user keeps: weights, config, tokenizer; no optimizer or trainer state (3x the weights)
    assert not (final / "optimizer.safetensors").exists() and not (final / STATE_FILE).exists()
    model = zeda.load_model(final)
    assert model.config.num_zero_experts == NUM_ZERO and model.config.num_experts == 8
    assert json.loads((final / "config.json").read_text())["zce_nums"] == [NUM_ZERO]
    tokenizer = AutoTokenizer.from_pretrained(final)
    assert tokenizer.eos_token == "<|im_end|>" and len(tokenizer) == 101
    # It trained: weights moved away from the student's.
    student = zeda.load_model(data / "student")
    assert not torch.equal(model.lm_head.weight, student.lm_head.weight)
    summary = json.loads((run4 / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["examples_used"] == 4


# ----------------------------------------------------------------------------------------------
# resume


def test_resume_matches_uninterrupted_run(data):
    """12 rollouts, 4 per global batch: steps 3 and 4 cross an epoch boundary, so the data order must be
    recomputed right after the resume, not only the weights and the optimizer state."""
    a, b = data / "resume_a", data / "resume_b"
    assert sft(data, a, "--max-steps", "4", "--save-every", "2", rollouts="rollouts.jsonl") == 0
    assert (a / "step-2" / STATE_FILE).exists() and not (a / "step-4").exists()
    b.mkdir()
    shutil.copytree(a / "step-2", b / "step-2")
    assert sft(data, b, "--max-steps", "4", "--save-every", "2", "--resume", rollouts="rollouts.jsonl") == 0
    ma, mb = read_metrics(a), read_metrics(b)
    assert [m["step"] for m in mb] == [3, 4]
    for got, want in zip(mb, ma[2:]):
        for key in ("lr", "loss", "ce", "ga", "grad_norm", "zero_ratio", "tokens"):
            assert got[key] == pytest.approx(want[key], abs=1e-6, rel=1e-6), key
        assert got["zero_ratio_per_layer"] == pytest.approx(want["zero_ratio_per_layer"], abs=1e-6)


# ----------------------------------------------------------------------------------------------
# refusals: exit code 2 and a message that says what and where


def refused(capsys, rc) -> str:
    """The error line of a refused run (stderr may also carry progress bars and library warnings)."""
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = [line for line in err.splitlines() if line.startswith("train_sft.py: error: ")]
    assert len(lines) == 1, err
    return lines[0]


def test_refuses_to_start_over_in_a_folder_that_holds_a_run(data, run4, capsys):
    before = (run4 / "metrics.jsonl").read_text()
    err = refused(capsys, sft(data, run4, "--max-steps", "1"))
    assert "already holds a training run" in err and "--resume" in err
    assert (run4 / "metrics.jsonl").read_text() == before  # nothing appended, nothing replaced


def test_refuses_a_student_that_is_not_converted(data, tmp_path, capsys):
    err = refused(capsys, sft(data, tmp_path / "out", "--max-steps", "1", student="teacher"))
    assert "not a converted checkpoint" in err and str(data / "teacher" / "config.json") in err
    assert not (tmp_path / "out").exists()


def test_refuses_rollouts_that_do_not_fit_the_vocabulary(data, tmp_path, capsys):
    small = tmp_path / "small"
    make_tiny_checkpoint(small / "teacher", "qwen3_moe", vocab_size=40, max_position_embeddings=512)
    save_tokenizer(small / "teacher")
    convert_checkpoint(small / "teacher", small / "student", num_zero=NUM_ZERO, progress=False)
    items = tasks.mixture("train", 1, seed=1)
    records = [tasks.to_rollout_record(t, t.response) for t in items]
    assert not any("~" in json.dumps(r) for r in records)
    records[2]["messages"][-1]["content"] += " ~"  # "~" has the largest id of the tokenizer (100)
    path = write_jsonl(tmp_path / "rollouts.jsonl", records)
    rc = train_sft.main(["--student", str(small / "student"), "--rollouts", str(path), "--out", str(tmp_path / "o"),
                         *FAST, "--max-steps", "1"])
    err = refused(capsys, rc)
    assert f"{path}:3:" in err and "token id 100" in err and "vocab_size 40" in err


def test_refuses_an_empty_rollouts_file(data, tmp_path, capsys):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n")
    err = refused(capsys, train_sft.main(["--student", str(data / "student"), "--rollouts", str(path), "--out",
                                          str(tmp_path / "o"), *FAST]))
    assert str(path) in err and "empty" in err


def test_refuses_a_rollout_without_an_assistant_turn(data, tmp_path, capsys):
    items = tasks.mixture("train", 1, seed=1)
    records = [tasks.to_rollout_record(items[0], items[0].response), tasks.to_prompt_record(items[1])]
    path = write_jsonl(tmp_path / "r.jsonl", records)
    err = refused(capsys, train_sft.main(["--student", str(data / "student"), "--rollouts", str(path), "--out",
                                          str(tmp_path / "o"), *FAST]))
    assert f"{path}:2:" in err and "assistant" in err


def test_refuses_when_every_rollout_is_too_long(data, tmp_path, capsys):
    err = refused(capsys, sft(data, tmp_path / "o", "--max-seq-len", "10"))
    assert "--max-seq-len 10" in err and str(data / "rollouts4.jsonl") in err


def test_max_seq_len_is_at_most_the_context(data, tmp_path, capsys):
    """The default follows the student's context (capped at 4096); a longer --max-seq-len is refused by name."""
    context = json.loads((data / "student" / "config.json").read_text())["max_position_embeddings"]
    assert context < train_sft.DEFAULT_MAX_SEQ_LEN  # the tiny student: the old default 4096 was past its end
    err = refused(capsys, sft(data, tmp_path / "o", "--max-seq-len", str(context + 1)))
    assert f"--max-seq-len {context + 1} is longer than the student's context ({context}" in err
    args = train_sft.parse_args(["--student", str(data / "student"), "--rollouts", "r", "--out", "o"])
    assert train_sft.max_seq_len(args, zeda.ModelConfig.from_hf_config(data / "student")) == context


def test_refuses_a_global_batch_that_does_not_split(data, tmp_path, capsys):
    err = refused(capsys, sft(data, tmp_path / "o", "--global-batch-size", "3"))
    assert "--global-batch-size 3" in err and "--micro-batch-size 2" in err


def test_refuses_fewer_rollouts_than_one_global_batch(data, tmp_path, capsys):
    err = refused(capsys, sft(data, tmp_path / "o", "--global-batch-size", "8"))
    assert "fewer than one global batch" in err


def test_cli_needs_rollouts(data, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        train_sft.main(["--student", str(data / "student"), "--out", str(tmp_path / "o")])
    assert e.value.code == 2
    assert "the following arguments are required: --rollouts" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# over-long rollouts


@pytest.mark.parametrize("truncate", [False, True])
def test_over_long_rollouts_are_dropped_or_truncated(data, tmp_path, truncate):
    tokenizer = AutoTokenizer.from_pretrained(data / "student")
    path = data / "rollouts.jsonl"
    full, _ = train_sft.load_rollouts(path, tokenizer, 10**6, 10**6, False)
    lengths = sorted(len(e.ids) for e in full)
    limit = lengths[len(lengths) // 2]  # about half of them are longer
    assert limit > max(e.num_prompt for e in full)  # so every long one can be truncated
    n_long = sum(n > limit for n in lengths)
    assert 0 < n_long < len(full) - 4

    kept, counts = train_sft.load_rollouts(path, tokenizer, 10**6, limit, truncate)
    assert counts == {"rollouts": 12, "dropped_incorrect": 0, "dropped_unfinished": 0, "kept_unfinished": 0,
                      "truncated": n_long if truncate else 0, "dropped_too_long": 0 if truncate else n_long}
    assert all(len(e.ids) <= limit for e in kept)
    if truncate:  # cut at the end, the prompt intact
        assert [e.ids for e in kept] == [e.ids[:limit] for e in full]

    out = tmp_path / "out"
    extra = ["--truncate"] if truncate else []
    assert sft(data, out, "--max-steps", "1", "--max-seq-len", str(limit), *extra, rollouts="rollouts.jsonl") == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["truncated"] == counts["truncated"]
    assert summary["dropped_too_long"] == counts["dropped_too_long"]
    assert summary["examples_used"] == len(kept)


# ----------------------------------------------------------------------------------------------
# non-finite loss


def test_nan_stops_the_run_naming_the_step(data, tmp_path, capsys, monkeypatch):
    real = train_sft.response_cross_entropy
    calls = {"n": 0}

    def nan_on_second_call(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls["n"] == 2 else loss

    monkeypatch.setattr(train_sft, "response_cross_entropy", nan_on_second_call)
    out = tmp_path / "out"
    # One micro-batch per step: the second call is the second step.
    rc = sft(data, out, "--max-steps", "3", "--save-every", "1", "--global-batch-size", "2")
    err = refused(capsys, rc)
    assert "non-finite loss at step 2" in err and str(out / "step-1") in err
    assert (out / "step-1" / STATE_FILE).exists()
    assert not (out / "step-2").exists() and not (out / "final").exists()
    assert [m["step"] for m in read_metrics(out)] == [1]


# ----------------------------------------------------------------------------------------------
# SIGTERM: stop after the step with a checkpoint, then resume


def test_sigterm_saves_and_resume_continues(data, tmp_path):
    out = tmp_path / "out"
    stdout, stderr = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    cmd = [sys.executable, str(ROOT / "train_sft.py"), "--student", str(data / "student"), "--rollouts",
           str(data / "rollouts4.jsonl"), "--out", str(out), *FAST, "--global-batch-size", "2", "--max-steps", "200"]
    with open(stdout, "w") as so, open(stderr, "w") as se:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=so, stderr=se, env=subprocess_env())
        try:
            deadline = time.time() + 180
            while not ((out / "metrics.jsonl").exists() and len(read_metrics(out)) >= 2):
                assert proc.poll() is None, stderr.read_text()[-3000:]
                assert time.time() < deadline, "no training steps within 180 s"
                time.sleep(0.05)
            proc.send_signal(signal.SIGTERM)
            rc = proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert rc == 143, stderr.read_text()[-3000:]  # stopped, not finished: a caller can tell (128 + SIGTERM)
    steps = [m["step"] for m in read_metrics(out)]
    n = steps[-1]
    assert steps == list(range(1, n + 1)) and 2 <= n < 200
    assert json.loads((out / f"step-{n}" / STATE_FILE).read_text())["step"] == n
    assert not (out / "final").exists()
    assert f"stopped by SIGTERM after step {n}" in stdout.read_text()

    assert sft(data, out, "--global-batch-size", "2", "--max-steps", str(n + 1), "--resume") == 0
    assert [m["step"] for m in read_metrics(out)] == list(range(1, n + 2))
    assert json.loads((out / "summary.json").read_text())["step"] == n + 1


def whole_lines(out: Path) -> list[str]:
    """metrics.jsonl's complete lines (a kill can leave a torn last one)."""
    return [line for line in (out / "metrics.jsonl").read_text().split("\n")[:-1]]


def test_kill_9_then_resume_logs_each_step_once(data, tmp_path):
    """A SIGKILL after steps that were logged but never saved: the resumed run redoes them, and metrics.jsonl
    still holds each step exactly once (the steps past the checkpoint are dropped before the resume)."""
    out = tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "train_sft.py"), "--student", str(data / "student"), "--rollouts",
           str(data / "rollouts4.jsonl"), "--out", str(out), *FAST, "--global-batch-size", "2", "--max-steps", "200",
           "--save-every", "2"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=subprocess_env())
    try:
        deadline = time.time() + 180
        while not ((out / "metrics.jsonl").exists() and len(whole_lines(out)) >= 3 and (out / "step-2").exists()):
            assert proc.poll() is None and time.time() < deadline
            time.sleep(0.02)
        proc.kill()
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    logged = [json.loads(line)["step"] for line in whole_lines(out)]
    total = max(logged) + 2
    assert sft(data, out, "--global-batch-size", "2", "--max-steps", str(total), "--save-every", "2", "--resume") == 0
    assert [m["step"] for m in read_metrics(out)] == list(range(1, total + 1))


# ----------------------------------------------------------------------------------------------
# rollout.py: resumable, no duplicates, torn line repaired


def test_rollout_resume_writes_no_duplicates(data, tmp_path, monkeypatch):
    teacher = zeda.load_model(data / "teacher")
    tokenizer = AutoTokenizer.from_pretrained(data / "teacher")
    params = SamplingParams(temperature=1.0, max_new_tokens=8)
    prompts, out, samples = data / "prompts.jsonl", tmp_path / "out.jsonl", 2
    n_prompts = len(prompts.read_text().splitlines())

    real_generate = rollout.generate
    calls = {"n": 0}

    def crash_after_first_batch(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("simulated crash")
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(rollout, "generate", crash_after_first_batch)
    with torch.no_grad(), pytest.raises(RuntimeError, match="simulated crash"):
        rollout.rollout(teacher, tokenizer, prompts, out, params, samples, batch_size=2, progress=False)
    first = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(first) == 2
    # A crash in the middle of a write: half a JSON line, no newline.
    with open(out, "a") as f:
        f.write(json.dumps({"id": "9:1", "messages": [{"role": "user", "content": "x"}]})[:25])

    monkeypatch.setattr(rollout, "generate", real_generate)
    with torch.no_grad():
        stats = rollout.rollout(teacher, tokenizer, prompts, out, params, samples, batch_size=2, progress=False)
    assert stats["skipped_existing"] == 2 and stats["written"] == n_prompts * samples - 2
    text = out.read_text()
    assert text.endswith("\n")
    records = [json.loads(line) for line in text.splitlines()]  # every line is valid JSON: the torn one is gone
    ids = [r["id"] for r in records]
    assert len(ids) == len(set(ids)) == n_prompts * samples
    # keyed by content: "<hash of the prompt's messages>:<sample>"
    prompt_records = [json.loads(line) for line in prompts.read_text().splitlines()]
    assert set(ids) == {f"{rollout.prompt_hash(p['messages'])}:{s}" for p in prompt_records for s in range(samples)}
    assert records[:2] == first  # the first run's lines are kept as they were
    assert all(r["messages"][-1]["role"] == "assistant" for r in records)

    # A third run has nothing left to do.
    with torch.no_grad():
        stats = rollout.rollout(teacher, tokenizer, prompts, out, params, samples, batch_size=2, progress=False)
    assert stats["written"] == 0 and out.read_text() == text


# ----------------------------------------------------------------------------------------------
# rollout.py marks answers to prompts with a reference; train_sft.py --drop-incorrect skips the wrong ones


def test_rollout_marks_each_answer_against_its_prompts_reference(data, tmp_path, monkeypatch):
    """The teacher's answers are replaced (generation is not what is tested here) by each task's worked reference
    solution, with the final answer spoiled on every other task: the marks must follow exactly that."""
    teacher = zeda.load_model(data / "teacher")
    tokenizer = AutoTokenizer.from_pretrained(data / "teacher")
    items = tasks.mixture("train", 2, seed=3)
    wrong = {t.prompt for t in items[1::2]}
    answers = {t.prompt: (t.response.rsplit(tasks.ANSWER_PREFIX, 1)[0] + f"{tasks.ANSWER_PREFIX} 12345678"
                          if t.prompt in wrong else t.response) for t in items}
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [tasks.to_prompt_record(t) for t in items] + [{"prompt": "Hi."}])
    real_generate = rollout.generate

    def reference_answers(model, prompt_ids, *args, **kwargs):
        gen = real_generate(model, prompt_ids, *args, **kwargs)
        for row, ids in enumerate(prompt_ids):
            text = tokenizer.decode(ids)
            reply = next((a for q, a in answers.items() if q in text), "hello")
            gen.tokens[row] = tokenizer.encode(reply, add_special_tokens=False)
        return gen

    monkeypatch.setattr(rollout, "generate", reference_answers)
    out = tmp_path / "rollouts.jsonl"
    with torch.no_grad():
        stats = rollout.rollout(teacher, tokenizer, prompts, out, SamplingParams(max_new_tokens=4), progress=False)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    by_prompt = {r["messages"][0]["content"]: r for r in records}
    assert by_prompt["Hi."].keys() == {"id", "messages", "finished"}  # no reference: no mark
    for t in items:
        r = by_prompt[t.prompt]
        assert r["messages"][-1]["content"] == answers[t.prompt]
        assert r["correct"] is (t.prompt not in wrong)
    assert stats["checked"] == len(items) and stats["correct"] == len(items) - len(wrong) > 0


def rollouts_with_marks(data, tmp_path, marks) -> Path:
    items = tasks.mixture("train", 4, seed=1)
    records = []
    for t, mark in zip(items, marks):
        record = tasks.to_rollout_record(t, t.response)
        if mark is not None:
            record["correct"] = mark
        records.append(record)
    return write_jsonl(tmp_path / "marked.jsonl", records)


def test_drop_incorrect_skips_exactly_the_lines_marked_false(data, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(data / "student")
    marks = [True, False, None, False, True, True, False, True, None, True, True, False]
    path = rollouts_with_marks(data, tmp_path, marks)
    every, counts = train_sft.load_rollouts(path, tokenizer, 10**6, 10**6, False)
    assert len(every) == 12 and counts["dropped_incorrect"] == 0  # without the flag the marks change nothing
    kept, counts = train_sft.load_rollouts(path, tokenizer, 10**6, 10**6, False, drop_incorrect=True)
    assert counts["rollouts"] == 12 and counts["dropped_incorrect"] == marks.count(False)
    assert [e.ids for e in kept] == [e.ids for e, m in zip(every, marks) if m is not False]

    out = tmp_path / "out"
    assert train_sft.main(["--student", str(data / "student"), "--rollouts", str(path), "--out", str(out), *FAST,
                           "--max-steps", "1", "--drop-incorrect"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dropped_incorrect"] == 4 and summary["examples_used"] == 8


def test_drop_incorrect_refuses_rollouts_without_marks_or_with_a_bad_one(data, tmp_path, capsys):
    unmarked = rollouts_with_marks(data, tmp_path, [None] * 12)
    err = refused(capsys, train_sft.main(["--student", str(data / "student"), "--rollouts", str(unmarked), "--out",
                                          str(tmp_path / "o1"), *FAST, "--drop-incorrect"]))
    assert str(unmarked) in err and "no line has a 'correct' field" in err
    bad = rollouts_with_marks(data, tmp_path, [True, "yes"] + [True] * 10)
    err = refused(capsys, train_sft.main(["--student", str(data / "student"), "--rollouts", str(bad), "--out",
                                          str(tmp_path / "o2"), *FAST]))
    assert f"{bad}:2" in err and "'correct' must be true or false" in err


def test_unfinished_rollouts_are_dropped_and_counted_in_the_first_line_and_the_summary(data, tmp_path, capsys):
    """Rollouts marked "finished": false (cut at the answer limit) are left out by default, said so before
    training starts and in summary.json; --keep-unfinished trains on all of them."""
    path = rollouts_with_marks(data, tmp_path, [None] * 12)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    for i in (1, 4, 7):
        records[i]["finished"] = False
    write_jsonl(path, records)
    out = tmp_path / "out"
    assert train_sft.main(["--student", str(data / "student"), "--rollouts", str(path), "--out", str(out), *FAST,
                           "--max-steps", "1"]) == 0
    assert f"{path}: 12 rollouts, 9 used; dropped 3 unfinished" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dropped_unfinished"] == 3 and summary["examples_used"] == 9
    kept, counts = train_sft.load_rollouts(path, AutoTokenizer.from_pretrained(data / "student"), 10**6, 10**6,
                                           False, keep_unfinished=True)
    assert len(kept) == 12 and counts["kept_unfinished"] == 3


def test_a_trained_glm_checkpoint_keeps_its_mtp_layer(data, tmp_path):
    """GLM's MTP layer is neither run nor trained here, but the trained checkpoint must still carry it (grown
    router included), or the authors' serving code cannot use the model for multi-token prediction."""
    from safetensors import safe_open

    static, student = tmp_path / "glm", tmp_path / "glm-zeda"
    make_tiny_checkpoint(static, "glm4_moe_lite", vocab_size=104, max_position_embeddings=512, mtp_layers=1)
    save_tokenizer(static)
    convert_checkpoint(static, student, num_zero=NUM_ZERO, progress=False)

    def mtp(folder):
        n = zeda.ModelConfig.from_hf_config(folder).num_hidden_layers
        out = {}
        for shard in folder.glob("*.safetensors"):
            with safe_open(str(shard), framework="pt") as f:
                out.update({k: f.get_tensor(k) for k in f.keys() if k.startswith(f"model.layers.{n}.")})
        return out

    before = mtp(student)
    assert before and before[next(k for k in before if k.endswith("mlp.gate.weight"))].shape[0] > 8  # grown
    out = tmp_path / "run"
    assert train_sft.main(["--student", str(student), "--rollouts", str(data / "rollouts4.jsonl"), "--out", str(out),
                           *FAST, "--max-steps", "1"]) == 0
    after = mtp(out / "final")
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    zeda.load_model(out / "final")  # and it still loads


def test_resume_with_other_settings_is_refused_naming_them(data, tmp_path, capsys):
    """A resume with another lr or seed would silently train a different run; --allow-changed-settings proceeds.
    How long it runs may change."""
    out = tmp_path / "run"
    assert sft(data, out, "--max-steps", "2", "--save-every", "1") == 0
    shutil.rmtree(out / "final")
    (out / "summary.json").unlink()
    capsys.readouterr()
    line = refused(capsys, sft(data, out, "--max-steps", "3", "--resume", "--lr", "5e-4", "--seed", "3"))
    assert "--lr 0.001 -> 0.0005" in line and "--seed 0 -> 3" in line and "--allow-changed-settings" in line
    assert sft(data, out, "--max-steps", "3", "--resume", "--lr", "5e-4", "--allow-changed-settings") == 0
