"""train_opd.py without wasted forwards (docs/method.md §5, §8): one student and one teacher forward per update
with the three-forward gradients; --updates-per-rollout K samples once per K optimizer steps, its later updates
move the PPO ratio and the clip binds; --max-tokens-per-micro-batch splits the forwards without changing the
gradients; --routing-replay makes the training forward route each token as the sampler did (bf16, where they
otherwise differ); under --fsdp the sampling phase gathers the student once (bench/opd_sampling.py on 2 gloo
processes). Tiny random qwen3_moe teacher and its conversion (Z = 4), as in tests/test_opd.py.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train_opd
import zeda
from zeda_toy import tasks
from zeda.conversion import convert_checkpoint
from zeda.data import Example, collate
from zeda.distributed import Dist
from zeda.generation import generate
from zeda.losses import auxiliary_loss, ppo_clip_loss, reverse_kl_advantage
from zeda.model import token_logprobs
from zeda.moe import MoE
from zeda.sampling import SamplingParams
from zeda_toy.tiny import make_tiny_checkpoint
from zeda_toy.tokenizer import save_tokenizer

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--prompts-per-step", "4", "--samples-per-prompt", "2", "--max-new-tokens", "12", "--device", "cpu"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """teacher/ (static), student/ (converted, Z = 4), prompts.jsonl; peaked distributions (initializer 0.2)."""
    root = tmp_path_factory.mktemp("opd_cost")
    make_tiny_checkpoint(root / "teacher", "qwen3_moe", vocab_size=104, max_position_embeddings=512,
                         initializer_range=0.2)
    save_tokenizer(root / "teacher")
    convert_checkpoint(root / "teacher", root / "student", num_zero=4, progress=False)
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(tasks.to_prompt_record(t)) + "\n" for t in tasks.mixture("train", 4, seed=1)))
    return root


def models(assets, dtype=torch.float32):
    student = zeda.load_model(assets / "student", dtype=dtype)
    teacher = zeda.load_model(assets / "teacher", dtype=dtype).requires_grad_(False)
    return student, teacher


def batch():
    """Three prompt + answer sequences of different lengths, ids below 101."""
    return [Example([2, 10, 11, 12, 3, 5, 40, 41, 42, 3], 6), Example([2, 20, 21, 3, 5, 50, 51, 52, 53, 54, 55, 56], 5),
            Example([2, 30, 3, 5, 60, 61, 62], 4)]


def opd_args(assets, *extra):
    return train_opd.parse_args(["--student", str(assets / "student"), "--teacher", str(assets / "teacher"),
                                 "--prompts", "p", "--out", "o", *extra])


def count_forwards(model) -> dict:
    calls = {"n": 0}
    model.register_forward_hook(lambda *_: calls.__setitem__("n", calls["n"] + 1))
    return calls


def gradients(model) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def run(assets, out, *extra):
    argv = ["--student", str(assets / "student"), "--teacher", str(assets / "teacher"),
            "--prompts", str(assets / "prompts.jsonl"), "--out", str(out), *TINY, *extra]
    code = train_opd.main(argv)
    path = Path(out) / "metrics.jsonl"
    return code, [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


# ----------------------------------------------------------------------------------------------
# 1. two scoring forwards, not three


def test_one_update_per_rollout_runs_one_student_and_one_teacher_forward_with_the_same_gradients(assets):
    student, teacher = models(assets)
    examples, count = sorted(batch(), key=lambda e: len(e.ids)), 3.0  # opd_step's order: the same float sums
    args = opd_args(assets)
    # the reference: the old policy recomputed by a third, no-grad forward
    ids, attn, mask = collate(examples, 0)
    with torch.no_grad():
        t_logp, old_logp = token_logprobs(teacher, ids, attn), token_logprobs(student, ids, attn)
    routing = []
    new_logp = token_logprobs(student, ids, attn, routing=routing)
    policy = ppo_clip_loss(new_logp, old_logp, reverse_kl_advantage(t_logp, old_logp), mask.float(), 0.2, count)
    ga = auxiliary_loss(routing, student.config, attn.reshape(-1).bool(), args.alpha, args.w)
    (policy + ga).backward()
    reference = gradients(student)
    student.zero_grad(set_to_none=True)

    student_calls, teacher_calls = count_forwards(student), count_forwards(teacher)
    out = train_opd.opd_step(student, teacher, examples, None, args, Dist(), 0, count)
    assert (student_calls["n"], teacher_calls["n"]) == (1, 1)
    torch.testing.assert_close(gradients(student), reference, rtol=1e-6, atol=1e-9)
    assert float(out["sums"][0]) == pytest.approx(float(policy), abs=1e-7)
    assert float(out["sums"][4]) == 0  # ratio 1: the clip never binds


# ----------------------------------------------------------------------------------------------
# 3. micro-batches under a padded-token cap


def test_micro_batches_keep_under_the_cap_and_a_long_sequence_alone():
    lengths = [7, 3, 12, 5, 5, 30, 4]
    examples = [Example(list(range(2, 2 + n)), 1) for n in lengths]
    batches = train_opd.micro_batches(examples, 12, Dist())
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        assert len(b) * max(lengths[i] for i in b) <= 12 or len(b) == 1
    assert [5] in batches and [2] in batches  # 30 and 12 tokens: each alone (12 = the cap)
    assert len(batches) < len(lengths)  # short ones do share
    assert train_opd.micro_batches(examples, 0, Dist()) == [sorted(range(len(lengths)), key=lambda i: lengths[i])]


@pytest.mark.parametrize("aggregation", ["sequence", "token"])
def test_micro_batch_cap_gives_the_one_forward_gradients(assets, aggregation):
    student, teacher = models(assets)
    examples = batch()
    count = 3.0 if aggregation == "sequence" else float(sum(len(e.ids) - e.num_prompt for e in examples))
    grads, sums = {}, {}
    for cap in ("0", "1"):
        student.zero_grad(set_to_none=True)
        calls = count_forwards(student) if cap == "1" else {"n": None}
        args = opd_args(assets, "--max-tokens-per-micro-batch", cap, "--loss-aggregation", aggregation, "--alpha", "0")
        out = train_opd.opd_step(student, teacher, examples, None, args, Dist(), 0, count)
        grads[cap], sums[cap] = gradients(student), out["sums"]
    assert calls["n"] == 3  # cap 1: every sequence its own forward
    # equal up to float summation order: measured within 9e-7 (the embedding's), the largest gradient ~0.23; a
    # wrong split or normaliser would be off by a share of the gradient, orders of magnitude more
    torch.testing.assert_close(grads["1"], grads["0"], rtol=1e-5, atol=1e-5 * float(grads["0"].abs().max()))
    # the logged sums (fp32 log-probs summed in fp64) likewise: measured within 3e-6 relative
    torch.testing.assert_close(sums["1"], sums["0"], rtol=1e-5, atol=1e-8)


# ----------------------------------------------------------------------------------------------
# 2. K optimizer steps per rollout


@pytest.fixture(scope="module")
def two_updates(assets, tmp_path_factory):
    """4 steps, 2 updates per rollout, a checkpoint asked for after every step; records each generate() and what
    each update hands ppo_clip_loss."""
    out = tmp_path_factory.mktemp("opd_k2") / "run"
    seen, rollouts = [], []
    real_ppo, real_generate = train_opd.ppo_clip_loss, train_opd.generate

    def spy_ppo(new_logp, old_logp, advantages, mask, *a, **kw):
        seen.append((new_logp.detach().clone(), old_logp.clone(), mask.clone()))
        return real_ppo(new_logp, old_logp, advantages, mask, *a, **kw)

    def spy_generate(*a, **kw):
        rollouts.append(real_generate(*a, **kw))
        return rollouts[-1]

    mp = pytest.MonkeyPatch()
    mp.setattr(train_opd, "ppo_clip_loss", spy_ppo)
    mp.setattr(train_opd, "generate", spy_generate)
    try:
        code, metrics = run(assets, out, "--max-steps", "4", "--updates-per-rollout", "2", "--lr", "3e-2",
                            "--clip", "0.02", "--save-every", "1", "--keep-last", "0")
    finally:
        mp.undo()
    return dict(out=out, code=code, metrics=metrics, seen=seen, rollouts=rollouts)


def test_updates_per_rollout_sample_once_and_the_later_update_moves_the_ratio(two_updates):
    assert two_updates["code"] == 0 and [m["step"] for m in two_updates["metrics"]] == [1, 2, 3, 4]
    assert len(two_updates["rollouts"]) == 2  # steps 1-2 share a rollout, steps 3-4 the next
    ratio_dev = [float(((new - old).exp() - 1).abs()[mask.bool()].max()) for new, old, mask in two_updates["seen"]]
    assert ratio_dev[0] < 1e-5 and ratio_dev[2] < 1e-5  # first update of a rollout: the weights that sampled
    assert ratio_dev[1] > 0.05 and ratio_dev[3] > 0.05  # after one optimizer step the ratio has left 1
    m = two_updates["metrics"]
    assert m[0]["clipfrac"] == 0 and m[1]["clipfrac"] > 0 and all(0 <= x["clipfrac"] <= 1 for x in m)
    # each update trains on half of the rollout: 4 prompts x 2 samples -> 4 sequences
    assert all(len(new) == 4 for new, _, _ in two_updates["seen"])


def test_updates_per_rollout_save_and_resume_between_rollouts(assets, two_updates, tmp_path):
    out = two_updates["out"]
    # --save-every 1, but never inside a rollout (step 4 is the end: final/)
    assert sorted(p.name for p in out.glob("step-*")) == ["step-2"]
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(out / "step-2", resumed / "step-2")
    code, metrics = run(assets, resumed, "--max-steps", "4", "--updates-per-rollout", "2", "--lr", "3e-2",
                        "--clip", "0.02", "--save-every", "1", "--keep-last", "0", "--resume")
    assert code == 0 and [m["step"] for m in metrics] == [3, 4]
    for a, b in zip(metrics, two_updates["metrics"][2:]):
        for key in ("policy_loss", "ga", "reverse_kl", "clipfrac", "zero_ratio"):
            assert a[key] == pytest.approx(b[key], abs=1e-6), key


def test_updates_per_rollout_refusals(assets, two_updates, tmp_path, capsys):
    code, metrics = run(assets, tmp_path / "a", "--max-steps", "3", "--updates-per-rollout", "3")
    err = capsys.readouterr().err
    assert code == 2 and not metrics and "--updates-per-rollout 3" in err and "8 sequences" in err
    # a checkpoint inside a rollout of the new K (step 2 of K = 3) cannot be resumed, even with changes allowed
    shutil.copytree(two_updates["out"] / "step-2", tmp_path / "b" / "step-2")
    code, _ = run(assets, tmp_path / "b", "--max-steps", "6", "--updates-per-rollout", "3",
                  "--prompts-per-step", "3", "--resume", "--allow-changed-settings")
    err = capsys.readouterr().err
    assert code == 2 and "step 2, inside a rollout" in err
    with pytest.raises(SystemExit):
        opd_args(assets, "--updates-per-rollout", "0")


def test_several_updates_score_the_rollout_once_and_the_full_kl_ablation_not_at_all(assets, tmp_path, monkeypatch):
    """With K updates per rollout the method scores each rollout once up front (the old policy and the teacher,
    no grad); the full-reverse-KL ablation takes both models' full logits in every update, so scoring the rollout
    for it would be two wasted forwards."""
    import variant

    calls = []
    real = train_opd.score_rollout
    monkeypatch.setattr(train_opd, "score_rollout", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    code, metrics = run(assets, tmp_path / "ppo", "--max-steps", "2", "--updates-per-rollout", "2")
    assert code == 0 and len(metrics) == 2 and calls == [1]
    argv = ["--student", str(assets / "student"), "--teacher", str(assets / "teacher"), "--prompts",
            str(assets / "prompts.jsonl"), "--out", str(tmp_path / "kl"), *TINY, "--max-steps", "2",
            "--updates-per-rollout", "2"]
    assert variant.main(["--loss", "full-reverse-kl", "train_opd.py", *argv]) == 0
    metrics = [json.loads(line) for line in (tmp_path / "kl" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2] and all(m["policy_loss"] > 0 for m in metrics)
    assert calls == [1]  # none more


# ----------------------------------------------------------------------------------------------
# 5. routing replay


def test_forced_ids_route_to_them_with_the_current_scores(assets):
    torch.manual_seed(0)
    moe = zeda.load_model(assets / "student").model.layers[0].mlp
    assert isinstance(moe, MoE)
    x = torch.randn(1, 6, moe.gate.weight.shape[1])
    own = moe(x)
    own_ids = moe.last_routing.ids_TK
    torch.testing.assert_close(moe(x, forced_ids_BTK=own_ids.view(1, 6, -1)), own, rtol=0, atol=0)  # bit for bit
    forced = torch.tensor([[0, 1], [2, 9], [10, 11], [3, 4], [5, 6], [7, 8]])  # [T, K], zero experts are 8-11
    forced[3] = -1  # this token: the router's own choice
    moe(x, forced_ids_BTK=forced.view(1, 6, 2)).sum().backward()
    r = moe.last_routing
    expected = forced.clone()
    expected[3] = own_ids[3]
    assert torch.equal(r.ids_TK, expected)
    probs = r.logits_TE.softmax(-1).gather(1, expected)
    torch.testing.assert_close(r.weights_TK, probs / probs.sum(-1, keepdim=True))  # norm_topk_prob, zero slots in
    assert moe.gate.weight.grad.abs().sum() > 0  # the router still learns


def replay_and_free_routing(student, prompts):
    """Sample in bf16 recording the routing, then route the training forward with and without replay: per
    sequence, per MoE layer, its answer tokens' ids, as recorded and as routed."""
    gen = generate(student, prompts, SamplingParams(temperature=1.0, max_new_tokens=24), [3], 0,
                   seed=list(range(len(prompts))), record_routing=True)
    examples = [Example(p + t, len(p)) for p, t in zip(prompts, gen.tokens)]
    ids, attn, _ = collate(examples, 0)
    routed = {}
    for replay in (False, True):
        routing = []
        forced = train_opd.replay_routing(gen.routed_ids, ids.shape, "cpu") if replay else None
        with torch.no_grad():
            token_logprobs(student, ids, attn, routing=routing, forced_routing=forced)
        routed[replay] = [r.ids_TK.view(*ids.shape, -1) for r in routing]
    return gen, examples, routed


def test_routing_replay_routes_every_answer_token_as_the_sampler_in_bf16(assets):
    student = zeda.load_model(assets / "student", dtype=torch.bfloat16)
    prompts = [[2] + [10 + (i * 7 + j) % 80 for j in range(5 + i % 5)] for i in range(8)]
    gen, examples, routed = replay_and_free_routing(student, prompts)
    differ = 0
    for b, e in enumerate(examples):
        fed = len(e.ids) - 1  # every token but the last answer token went through the sampler's forward
        assert gen.routed_ids[b].shape == (student.config.num_moe_layers, fed, student.config.num_experts_per_tok)
        answer = slice(e.num_prompt, fed)
        for layer, sampled in enumerate(gen.routed_ids[b]):
            assert torch.equal(routed[True][layer][b, answer], sampled[answer].long())
            free = routed[False][layer][b, answer].sort(-1).values
            differ += int((free != sampled[answer].long().sort(-1).values).any(-1).sum())
    assert differ > 0  # without replay, bf16 rounding routes some answer tokens to other experts (4 here)


def test_opd_step_trains_on_the_replayed_routing(assets):
    """opd_step hands each micro-batch's forward its sequences' recorded experts (sorted into micro-batches)."""
    student, teacher = models(assets)
    examples = batch()
    L, K, E = student.config.num_moe_layers, student.config.num_experts_per_tok, student.config.num_router_outputs
    # sequence b, layer l: experts b and b + 4 + l at every token the sampler processed
    recorded = [torch.stack([torch.tensor([b % E, (b + 4 + layer) % E]).expand(len(e.ids) - 1, K)
                             for layer in range(L)]).to(torch.int16) for b, e in enumerate(examples)]
    routings = []
    args = opd_args(assets, "--routing-replay", "--max-tokens-per-micro-batch", "24")
    batches = train_opd.micro_batches(examples, 24, Dist())
    assert len(batches) == 2
    train_opd.opd_step(student, teacher, examples, None, args, Dist(), 0, 3.0, routed_ids=recorded,
                       routing_loss=lambda routing, *a: routings.append(routing) or auxiliary_loss(routing, *a))
    for mb, routing in zip(batches, routings, strict=True):
        T = max(len(examples[i].ids) for i in mb)
        for layer, r in enumerate(routing):
            ids_BTK = r.ids_TK.view(len(mb), T, K)
            for row, i in enumerate(mb):
                fed = len(examples[i].ids) - 1
                assert torch.equal(ids_BTK[row, :fed], recorded[i][layer].long())


# ----------------------------------------------------------------------------------------------
# 4. --fsdp: the sampling phase gathers the student once


def test_fsdp_sampling_gathers_once_and_samples_the_same_tokens(tmp_path):
    """bench/opd_sampling.py at its smallest: 2 gloo processes, FSDP2 over dp=2, the same rollout sampled with
    the student gathered at every forward and gathered once (train_opd.gathered)."""
    out = tmp_path / "opd_sampling.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "opd_sampling.py"), "--prompts", "2", "--samples",
                           "1", "--max-new-tokens", "6", "--repeats", "1", "--json", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())["runs"][0]
    assert result["identical"]
    per_token, once = result["per_token_gather"], result["gathered_once"]
    assert per_token["generated_tokens"] == once["generated_tokens"] > 2
    # 4 blocks + the root: at most one gather each, against one per block per decoded token
    assert once["all_gathers_per_rank"] <= 5 < per_token["all_gathers_per_rank"]
