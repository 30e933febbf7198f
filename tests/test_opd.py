"""train_opd.py (docs/method.md §5): stage 2, on-policy distillation of the converted student from the frozen teacher.

On a tiny random qwen3_moe teacher (the char-level tokenizer, vocab 104) and its conversion with Z = 4 zero
experts: opd_step's per-token advantage is log p_teacher - log p_student of the sampled tokens and its loss is
ppo_clip_loss on exactly those tensors; the full-vocabulary loss is the exact reverse KL; the teacher is never
modified (in memory or on disk) while the student is; the student as its own teacher gives zero advantage;
--resume reproduces the next step; metrics.jsonl has every field; bad inputs are refused with exit code 2 and
a message that says where; the final checkpoint is a loadable converted model; torchrun data parallel runs.
Every run is 1-3 steps of 4 prompts x 2 samples of at most 12 new tokens, on CPU.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import zeda
from zeda_toy import tasks
from zeda.data import Example, collate
from zeda.distributed import Dist
from zeda.model import token_logprobs
from zeda_toy.tiny import make_tiny_checkpoint
from zeda_toy.tokenizer import save_tokenizer

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # train_opd.py and convert.py live in the repository root
    sys.path.insert(0, str(ROOT))

import train_opd  # noqa: E402
import variant  # noqa: E402
from zeda.conversion import convert_checkpoint  # noqa: E402

VOCAB, Z = 104, 4
TINY = ["--max-steps", "2", "--prompts-per-step", "4", "--samples-per-prompt", "2", "--max-new-tokens", "12",
        "--lr", "1e-3", "--device", "cpu"]
FIELDS = {"step", "lr", "loss", "policy_loss", "ga", "reverse_kl", "sampler_logp_gap", "zero_ratio",
          "zero_ratio_per_layer",
          "mean_response_length", "truncation_rate", "sample_tokens_per_s", "train_tokens_per_s"}


# ----------------------------------------------------------------------------------------------
# fixtures and helpers


@pytest.fixture(scope="session")
def assets(tmp_path_factory):
    """teacher/ (static, tokenizer included), student/ (converted, Z = 4), prompts.jsonl (12 task prompts)."""
    root = tmp_path_factory.mktemp("opd")
    # initializer_range 0.2 (HF default 0.02): peaked distributions, so teacher and student differ measurably
    # (at 0.02 every logit is ~0 and their KL, ~1e-6, drowns in float error)
    make_tiny_checkpoint(root / "teacher", "qwen3_moe", vocab_size=VOCAB, max_position_embeddings=512,
                         initializer_range=0.2)
    save_tokenizer(root / "teacher")
    convert_checkpoint(root / "teacher", root / "student", num_zero=Z, progress=False)
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(tasks.to_prompt_record(t)) + "\n" for t in tasks.mixture("train", 4, seed=1)))
    return root


def run(assets, out, *extra, student=None, teacher=None, prompts=None, loss="ppo"):
    """train_opd.main in-process with the tiny flags (later flags win), the full-reverse-KL ablation through
    experiments/variant.py; -> (exit code, metrics lines)."""
    argv = ["--student", str(student or assets / "student"), "--teacher", str(teacher or assets / "teacher"),
            "--prompts", str(prompts or assets / "prompts.jsonl"), "--out", str(out), *TINY, *extra]
    code = train_opd.main(argv) if loss == "ppo" else variant.main(["--loss", loss, "train_opd.py", *argv])
    path = Path(out) / "metrics.jsonl"
    return code, [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def hand_batch():
    """Two prompt + answer sequences of different lengths (right padding in the batch), ids below 101."""
    return [Example([2, 10, 11, 12, 3, 5, 40, 41, 42, 3], 6), Example([2, 20, 21, 3, 5, 50, 51, 52, 53, 54, 55, 56], 5)]


def single_logprobs(model, e: Example) -> list[float]:
    """log p(answer token) of one unpadded sequence, answer tokens only."""
    with torch.no_grad():
        lp = token_logprobs(model, torch.tensor([e.ids]))[0]
    return lp[e.num_prompt - 1:].tolist()


def opd_args(assets, *extra):
    return train_opd.parse_args(["--student", str(assets / "student"), "--teacher", str(assets / "teacher"),
                                 "--prompts", "p", "--out", "o", *extra])


# ----------------------------------------------------------------------------------------------
# opd_step on a hand-built batch


def spy_on_ppo(monkeypatch) -> dict:
    """Record what opd_step hands ppo_clip_loss (the real loss still runs)."""
    seen, real_ppo = {}, train_opd.ppo_clip_loss

    def spy(new_logp, old_logp, advantages, mask, clip, normalizer=None, aggregation="token"):
        seen.update(new=new_logp.detach().clone(), old=old_logp.clone(), adv=advantages.clone(), mask=mask.clone(),
                    clip=clip, normalizer=normalizer, aggregation=aggregation)
        return real_ppo(new_logp, old_logp, advantages, mask, clip, normalizer, aggregation)

    monkeypatch.setattr(train_opd, "ppo_clip_loss", spy)
    return seen


def step(student, teacher, examples, sampler_logp, args, count, policy_loss=train_opd.ppo_policy):
    out = train_opd.opd_step(student, teacher, examples, sampler_logp, args, Dist(), 0, float(count),
                             policy_loss=policy_loss)
    policy, ga, rkl_sum, gap_sum, _clipped = out["sums"].tolist()
    return policy, ga, rkl_sum, gap_sum, out["counts_LE"]


@pytest.mark.parametrize("aggregation", ["sequence", "token"])
def test_opd_step_advantage_is_teacher_minus_student_logprob(assets, monkeypatch, aggregation):
    student, teacher = zeda.load_model(assets / "student"), zeda.load_model(assets / "teacher")
    teacher.requires_grad_(False)
    examples = hand_batch()
    old = [single_logprobs(student, e) for e in examples]
    teach = [single_logprobs(teacher, e) for e in examples]
    n_answer = sum(len(e.ids) - e.num_prompt for e in examples)
    assert [len(v) for v in old] == [len(e.ids) - e.num_prompt for e in examples]
    seen = spy_on_ppo(monkeypatch)
    args = opd_args(assets, "--loss-aggregation", aggregation)
    count = len(examples) if aggregation == "sequence" else n_answer
    policy, ga, rkl_sum, gap_sum, counts = step(student, teacher, examples, old, args, count)

    # the advantage at each answer token is log p_teacher - log p_student of that token, and nothing elsewhere
    _, _, mask = collate(examples, 0)
    assert torch.equal(seen["mask"].bool(), mask)
    for b, e in enumerate(examples):
        cols = slice(e.num_prompt - 1, len(e.ids) - 1)
        expected = torch.tensor(teach[b]) - torch.tensor(old[b])
        torch.testing.assert_close(seen["adv"][b, cols], expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(seen["old"][b, cols], torch.tensor(old[b]), atol=1e-5, rtol=0)
        torch.testing.assert_close(seen["new"][b, cols], torch.tensor(old[b]), atol=1e-5, rtol=0)
    assert seen["clip"] == 0.2 and seen["normalizer"] == count and seen["aggregation"] == aggregation
    # ratio 1 (one step per rollout batch): the loss is -mean(A), per sequence then over sequences, or per token
    adv = [torch.tensor(t) - torch.tensor(o) for t, o in zip(teach, old)]
    if aggregation == "sequence":
        expected_policy = -sum(float(a.mean()) for a in adv) / len(adv)
    else:
        expected_policy = -float(torch.cat(adv).sum()) / n_answer
    assert policy == pytest.approx(expected_policy, abs=1e-5)
    assert rkl_sum == pytest.approx(-float(torch.cat(adv).sum()), abs=1e-4)  # the metric: sum of log p_s - log p_t
    assert gap_sum == pytest.approx(0.0, abs=1e-4)  # the sampler's values were exact here
    assert ga > 0 and counts.shape[0] == student.config.num_moe_layers
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())


def test_sequence_and_token_aggregation_weigh_answers_differently(assets, monkeypatch):
    """With answers of different lengths the two aggregations give different gradients (the authors' is per
    sequence); fails if opd_step ignores --loss-aggregation."""
    student, teacher = zeda.load_model(assets / "student"), zeda.load_model(assets / "teacher")
    teacher.requires_grad_(False)
    examples = hand_batch()
    n_answer = sum(len(e.ids) - e.num_prompt for e in examples)
    grads = {}
    for aggregation, count in (("sequence", len(examples)), ("token", n_answer)):
        student.zero_grad(set_to_none=True)
        step(student, teacher, examples, [[0.0] * (len(e.ids) - e.num_prompt) for e in examples],
             opd_args(assets, "--loss-aggregation", aggregation, "--alpha", "0"), count)
        grads[aggregation] = torch.cat([p.grad.flatten() for p in student.parameters() if p.grad is not None])
    assert not torch.allclose(grads["sequence"], grads["token"], rtol=1e-3, atol=1e-7)


def test_old_logprobs_are_recomputed_not_the_samplers(assets, monkeypatch):
    """The behaviour policy's log-probs come from a training-mode forward: wrong sampler log-probs (as a bf16
    KV-cache decode gives) change neither the advantage nor the loss; they only show in sampler_logp_gap."""
    student, teacher = zeda.load_model(assets / "student"), zeda.load_model(assets / "teacher")
    teacher.requires_grad_(False)
    examples = hand_batch()
    n_answer = sum(len(e.ids) - e.num_prompt for e in examples)
    exact = [single_logprobs(student, e) for e in examples]
    off = [[v - 0.15 for v in row] for row in exact]
    args = opd_args(assets)
    seen = spy_on_ppo(monkeypatch)
    a = step(student, teacher, examples, exact, args, len(examples))
    adv_exact = seen["adv"].clone()
    b = step(student, teacher, examples, off, args, len(examples))
    torch.testing.assert_close(seen["adv"], adv_exact)
    assert a[0] == pytest.approx(b[0], abs=1e-7)  # the same policy loss
    assert b[3] == pytest.approx(0.15 * n_answer, rel=1e-4)  # the gap is reported


def test_old_logprobs_use_the_sampling_temperature(assets, monkeypatch):
    """At --temperature T the student's log-probs are those of the policy that sampled, log_softmax(logits / T):
    the old code took the sampler's (at T) for the ratio but the training forward's at 1."""
    student, teacher = zeda.load_model(assets / "student"), zeda.load_model(assets / "teacher")
    teacher.requires_grad_(False)
    examples = hand_batch()
    seen = spy_on_ppo(monkeypatch)
    step(student, teacher, examples, None, opd_args(assets, "--temperature", "0.5"), len(examples))
    for b, e in enumerate(examples):
        with torch.no_grad():
            at_t = token_logprobs(student, torch.tensor([e.ids]), temperature=0.5)[0, e.num_prompt - 1:]
            teacher_at_1 = token_logprobs(teacher, torch.tensor([e.ids]))[0, e.num_prompt - 1:]
        cols = slice(e.num_prompt - 1, len(e.ids) - 1)
        torch.testing.assert_close(seen["old"][b, cols], at_t, atol=1e-5, rtol=0)
        torch.testing.assert_close(seen["new"][b, cols], at_t, atol=1e-5, rtol=0)
        torch.testing.assert_close(seen["adv"][b, cols], teacher_at_1 - at_t, atol=1e-5, rtol=0)


@pytest.mark.parametrize("aggregation", ["sequence", "token"])
def test_opd_step_full_reverse_kl_is_exact_kl(assets, aggregation):
    student, teacher = zeda.load_model(assets / "student"), zeda.load_model(assets / "teacher")
    teacher.requires_grad_(False)
    examples = hand_batch()
    n_answer = sum(len(e.ids) - e.num_prompt for e in examples)
    count = len(examples) if aggregation == "sequence" else n_answer
    policy, ga, rkl_sum, _, _ = step(student, teacher, examples, None, opd_args(assets, "--loss-aggregation",
                                     aggregation), count, policy_loss=variant.full_reverse_kl_policy)
    # direct: each sequence alone (no padding), KL(p_s || p_t) over the vocabulary at every answer position
    kl_per_seq, rkl_direct = [], 0.0
    with torch.no_grad():
        for e in examples:
            ids = torch.tensor([e.ids])
            log_s = student(ids).double().log_softmax(-1)[0, e.num_prompt - 1:-1]
            log_t = teacher(ids).double().log_softmax(-1)[0, e.num_prompt - 1:-1]
            kl_per_seq.append((log_s.exp() * (log_s - log_t)).sum(-1))
            targets = ids[0, e.num_prompt:, None]
            rkl_direct += float((log_s.gather(-1, targets) - log_t.gather(-1, targets)).sum())
    if aggregation == "sequence":
        expected = sum(float(k.mean()) for k in kl_per_seq) / len(kl_per_seq)
    else:
        expected = float(torch.cat(kl_per_seq).sum()) / n_answer
    assert expected > 0
    assert policy == pytest.approx(expected, rel=1e-4, abs=1e-7)
    assert rkl_sum == pytest.approx(rkl_direct, abs=1e-4)
    assert ga > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())


# ----------------------------------------------------------------------------------------------
# whole runs


@pytest.fixture(scope="session")
def basic_run(assets, tmp_path_factory):
    """Two PPO steps; the teacher's files and loaded tensors are recorded before and after."""
    out = tmp_path_factory.mktemp("opd_basic") / "run"
    files_before = folder_bytes(assets / "teacher")
    tensors_before = {k: v.clone() for k, v in zeda.load_model(assets / "teacher").state_dict().items()}
    loaded = []
    real_load = train_opd.load_model

    def spy(path, *a, **kw):  # records the models the script loads (the real loader does the work)
        model = real_load(path, *a, **kw)
        loaded.append((Path(path), model))
        return model

    handlers_before = [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)]
    mp = pytest.MonkeyPatch()
    mp.setattr(train_opd, "load_model", spy)
    try:
        code, metrics = run(assets, out)
    finally:
        mp.undo()
    handlers_after = [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)]
    teacher_in_run = next(m for p, m in loaded if p == assets / "teacher")
    return dict(out=out, code=code, metrics=metrics, files_before=files_before, tensors_before=tensors_before,
                teacher_in_run=teacher_in_run, handlers_restored=handlers_after == handlers_before)


def test_teacher_is_frozen_and_student_moves(assets, basic_run):
    assert basic_run["code"] == 0
    # on disk: byte-identical; reloaded: every tensor equal; the in-run teacher object: untouched, no gradients
    assert folder_bytes(assets / "teacher") == basic_run["files_before"]
    after = zeda.load_model(assets / "teacher").state_dict()
    in_run = basic_run["teacher_in_run"].state_dict()
    assert after.keys() == basic_run["tensors_before"].keys() == in_run.keys()
    for k, v in basic_run["tensors_before"].items():
        assert torch.equal(after[k], v), k
        assert torch.equal(in_run[k], v), k
    assert all(not p.requires_grad and p.grad is None for p in basic_run["teacher_in_run"].parameters())
    # the student's parameters did change
    start = zeda.load_model(assets / "student").state_dict()
    final = zeda.load_model(basic_run["out"] / "final").state_dict()
    changed = [k for k in start if not torch.equal(start[k], final[k])]
    assert changed and any(".mlp.gate." in k for k in changed)


def test_final_checkpoint_is_converted_and_loads(assets, basic_run):
    final = basic_run["out"] / "final"
    model = zeda.load_model(final)
    cfg = zeda.ModelConfig.from_hf_config(final)
    assert cfg.num_zero_experts == Z and cfg.num_experts == 8 and cfg.vocab_size == VOCAB
    assert json.loads((final / "config.json").read_text())["zce_nums"] == [Z]
    assert (final / "tokenizer.json").exists()  # the side files travel with the student
    assert not (final / "trainer_state.json").exists() and not (final / "optimizer.safetensors").exists()
    with torch.no_grad():
        logits = model(torch.tensor([[2, 10, 11, 3]]))
    assert logits.shape == (1, 4, VOCAB) and torch.isfinite(logits).all()
    summary = json.loads((basic_run["out"] / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["final"] == str(final)
    assert basic_run["handlers_restored"]  # in-process main() gives SIGINT/SIGTERM back to the caller


def test_metrics_fields(assets, basic_run):
    metrics = basic_run["metrics"]
    assert [m["step"] for m in metrics] == [1, 2]
    n_moe = zeda.ModelConfig.from_hf_config(assets / "student").num_moe_layers
    for m in metrics:
        assert FIELDS <= m.keys()
        assert m["lr"] == 1e-3
        assert m["loss"] == pytest.approx(m["policy_loss"] + m["ga"])
        assert all(isinstance(m[k], float) and m[k] == m[k] for k in FIELDS - {"step", "zero_ratio_per_layer"})
        assert len(m["zero_ratio_per_layer"]) == n_moe
        assert all(0 <= r <= 1 for r in m["zero_ratio_per_layer"]) and 0 <= m["zero_ratio"] <= 1
        assert 1 <= m["mean_response_length"] <= 12
        assert 0 <= m["truncation_rate"] <= 1
        assert m["ga"] > 0 and m["sample_tokens_per_s"] > 0 and m["train_tokens_per_s"] > 0
        # the recomputed old log-probs agree with the sampler's to float rounding here (fp32)
        assert 0 <= m["sampler_logp_gap"] < 1e-4
    assert abs(metrics[0]["reverse_kl"]) > 1e-3  # the teacher is measurably different from the student


def test_truncation_rate_counts_every_truncated_answer(assets, tmp_path, monkeypatch):
    gens = []
    real_generate = train_opd.generate

    def spy(*a, **kw):
        gens.append(real_generate(*a, **kw))
        return gens[-1]

    monkeypatch.setattr(train_opd, "generate", spy)
    code, metrics = run(assets, tmp_path / "run", "--max-steps", "1", "--max-new-tokens", "2")
    assert code == 0 and len(metrics) == 1 and len(gens) == 1
    gen, m = gens[0], metrics[0]
    eos = {3}  # <|im_end|>
    for toks, fin in zip(gen.tokens, gen.finished):
        assert fin == (toks[-1] in eos)
        assert fin or len(toks) == 2  # unfinished = hit the 2-token limit
    n = len(gen.tokens)
    assert n == 8
    assert m["truncation_rate"] == pytest.approx(sum(not f for f in gen.finished) / n)
    assert m["mean_response_length"] == pytest.approx(sum(len(t) for t in gen.tokens) / n)
    assert m["truncation_rate"] == 1.0  # this seed samples no EOS within 2 tokens: every answer is truncated


@pytest.mark.parametrize("loss", ["ppo", "full-reverse-kl"])
def test_student_as_its_own_teacher_gives_zero_signal(assets, tmp_path, loss):
    code, metrics = run(assets, tmp_path / "run", "--max-steps", "1", loss=loss, teacher=assets / "student")
    assert code == 0 and len(metrics) == 1
    m = metrics[0]
    # the sampler's KV-cache log-probs (ppo) or the training forward's (full KL) vs the teacher's full forward:
    # equal weights, so only float error remains
    assert abs(m["reverse_kl"]) < 1e-4
    assert abs(m["policy_loss"]) < 1e-4
    assert m["ga"] > 0


def test_full_reverse_kl_run(assets, tmp_path, basic_run):
    code, metrics = run(assets, tmp_path / "run", loss="full-reverse-kl")
    assert code == 0 and [m["step"] for m in metrics] == [1, 2]
    for m in metrics:
        assert m["policy_loss"] > 0  # the exact KL of two different models
        assert m["reverse_kl"] >= 0  # its sampled-token estimate (a one-sample mean; positive for these samples)
    # step 1 samples what the PPO run sampled (same weights, prompts and seed): the same estimate
    assert metrics[0]["reverse_kl"] == pytest.approx(basic_run["metrics"][0]["reverse_kl"], abs=1e-5)
    assert (tmp_path / "run" / "final" / "config.json").exists()


def test_resume_reproduces_the_next_step(assets, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    code, metrics_a = run(assets, a, "--max-steps", "3", "--save-every", "2")
    assert code == 0 and [m["step"] for m in metrics_a] == [1, 2, 3]
    assert (a / "step-2" / "optimizer.safetensors").exists() and not (a / "step-3").exists()
    b.mkdir()
    shutil.copytree(a / "step-2", b / "step-2")
    code, metrics_b = run(assets, b, "--max-steps", "3", "--save-every", "2", "--resume")
    assert code == 0 and [m["step"] for m in metrics_b] == [3]
    for key in ("policy_loss", "ga", "reverse_kl", "zero_ratio", "mean_response_length", "truncation_rate"):
        assert metrics_b[0][key] == pytest.approx(metrics_a[2][key], abs=1e-6), key
    fa, fb = zeda.load_model(a / "final").state_dict(), zeda.load_model(b / "final").state_dict()
    for k in fa:
        torch.testing.assert_close(fb[k], fa[k], atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------------------------
# refusals


def expect_refusal(assets, tmp_path, capsys, *extra, **kw):
    capsys.readouterr()
    code, metrics = run(assets, tmp_path / "run", *extra, **kw)
    err = capsys.readouterr().err
    assert code == 2 and not metrics and not (tmp_path / "run" / "final").exists()
    lines = [line for line in err.splitlines() if line.startswith("train_opd.py: error: ")]
    assert len(lines) == 1, err
    return lines[0]


def test_refuses_unconverted_student(assets, tmp_path, capsys):
    err = expect_refusal(assets, tmp_path, capsys, student=assets / "teacher")
    assert "not a converted checkpoint" in err and str(assets / "teacher" / "config.json") in err


def test_refuses_teacher_with_another_vocab(assets, tmp_path, capsys):
    other = tmp_path / "teacher40"
    make_tiny_checkpoint(other, "qwen3_moe", vocab_size=40, max_position_embeddings=512)
    err = expect_refusal(assets, tmp_path, capsys, teacher=other)
    assert "vocab_size 40" in err and str(VOCAB) in err and str(other) in err


def test_refuses_empty_prompts(assets, tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    err = expect_refusal(assets, tmp_path, capsys, prompts=empty)
    assert f"{empty}: no prompts" in err


def test_refuses_malformed_prompt_line(assets, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "What is 2+3?"}) + "\n" + '{"messages": [\n')
    err = expect_refusal(assets, tmp_path, capsys, prompts=bad)
    assert f"{bad}:2:" in err
    bad.write_text(json.dumps({"prompt": "What is 2+3?"}) + "\n\n" + json.dumps({"text": "no messages"}) + "\n")
    err = expect_refusal(assets, tmp_path, capsys, prompts=bad)
    assert f"{bad}:3:" in err


def test_strict_refuses_prompt_too_long_for_context(assets, tmp_path, capsys):
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"prompt": "hi"}) + "\n" + json.dumps({"prompt": "x" * 300}) + "\n")
    # 512 positions - 400 new tokens leaves 112 for a prompt: line 1 fits, line 2 (300+ tokens) does not
    err = expect_refusal(assets, tmp_path, capsys, "--max-new-tokens", "400", "--strict", prompts=long)
    assert f"{long}:2:" in err and "--max-new-tokens" in err


# ----------------------------------------------------------------------------------------------
# data parallel


def test_torchrun_data_parallel(assets, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "train_opd.py"), "--student", str(assets / "student"), "--teacher", str(assets / "teacher"),
           "--prompts", str(assets / "prompts.jsonl"), "--out", str(out), *TINY, "--max-steps", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 1 and metrics[0]["step"] == 1  # written once, by rank 0
    assert 1 <= metrics[0]["mean_response_length"] <= 12
    assert zeda.ModelConfig.from_hf_config(out / "final").num_zero_experts == Z


def test_long_prompts_are_skipped_and_named_or_refused_with_strict(tmp_path, capsys):
    """A prompt that leaves no room to answer used to abort the whole run; now it is skipped and named (file:line)
    in the run's first lines and its summary, and --strict restores the refusal. --show-examples prints the prompts
    as rendered (the template's options applied) and trains nothing."""
    d = tmp_path
    make_tiny_checkpoint(d / "teacher", "qwen3_moe", vocab_size=VOCAB, max_position_embeddings=96)
    save_tokenizer(d / "teacher")
    convert_checkpoint(d / "teacher", d / "student", num_zero=Z, progress=False)
    lines = [{"prompt": "Compute 1+2."}, {"prompt": "x" * 400}, {"prompt": "Compute 3+4."}]
    (d / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    args = ["--student", str(d / "student"), "--teacher", str(d / "teacher"), "--prompts", str(d / "p.jsonl"),
            "--max-steps", "1", "--prompts-per-step", "2", "--samples-per-prompt", "1", "--max-new-tokens", "8",
            "--device", "cpu"]
    assert train_opd.main([*args, "--out", str(d / "run")]) == 0
    assert "skipped 1 prompt(s) too long" in capsys.readouterr().out
    assert json.loads((d / "run" / "summary.json").read_text())["skipped_too_long"] == [f"{d / 'p.jsonl'}:2"]
    assert train_opd.main([*args, "--out", str(d / "strict"), "--strict"]) == 2
    assert f"{d / 'p.jsonl'}:2: prompt of" in capsys.readouterr().err and not (d / "strict").exists()
    assert train_opd.main([*args, "--out", str(d / "show"), "--show-examples", "1"]) == 0
    out = capsys.readouterr().out
    assert "2 prompts used, 1 skipped" in out and "Compute 1+2." in out and not (d / "show").exists()


def test_a_teacher_with_another_tokenizer_or_a_short_context_is_refused(tmp_path, capsys):
    """Same vocabulary size but other ids (a permuted tokenizer.json) used to train silently on nonsense; a teacher
    whose context cannot hold prompt + answer was accepted. Both are refused before any training."""
    d = tmp_path
    make_tiny_checkpoint(d / "teacher", "qwen3_moe", vocab_size=VOCAB, max_position_embeddings=96)
    save_tokenizer(d / "teacher")
    convert_checkpoint(d / "teacher", d / "student", num_zero=Z, progress=False)
    (d / "p.jsonl").write_text(json.dumps({"prompt": "Compute 1+2."}) + "\n")
    permuted = d / "permuted"
    shutil.copytree(d / "teacher", permuted)
    tok = json.loads((permuted / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[10:12]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (permuted / "tokenizer.json").write_text(json.dumps(tok))
    short = d / "short"
    shutil.copytree(d / "teacher", short)
    hf = json.loads((short / "config.json").read_text())
    (short / "config.json").write_text(json.dumps(hf | {"max_position_embeddings": 16}))
    for teacher, message in ((permuted, "its tokenizer is not the student's"),
                             (short, "the teacher's context (16 tokens) is shorter")):
        rc = train_opd.main(["--student", str(d / "student"), "--teacher", str(teacher), "--prompts",
                             str(d / "p.jsonl"), "--out", str(d / teacher.name), "--max-steps", "1",
                             "--prompts-per-step", "1", "--samples-per-prompt", "1", "--max-new-tokens", "8",
                             "--device", "cpu"])
        err = capsys.readouterr().err
        assert rc == 2 and message in err and not (d / teacher.name / "final").exists(), err
