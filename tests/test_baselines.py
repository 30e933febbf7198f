"""Training-free routing (zeda/baselines.py): top-k' and top-p keep exactly the slots their rule says, with the
kept weights renormalised by the model's own rule; skipped slots never reach a GEMM and cost zero FLOPs in the
accounting; the zero-expert dial at bias 0 is bit-identical to no dial, and the zero share rises with the bias."""

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import evaluate
import zeda
from zeda.baselines import keep_slots, parse_routing, routing_variant, set_routing
from zeda.config import ModelConfig
from zeda.errors import UsageError
from zeda.flops import expert_flops_per_slot, flop_report, routing_stats
from zeda.moe import Router, routed_experts_forward
from zeda_toy.tiny import make_tiny_checkpoint, tiny_hf_config
from zeda_toy.tokenizer import save_tokenizer


def router(model_type: str, zero: int = 0, seed: int = 0, top_k: int = 4) -> Router:
    hf = tiny_hf_config(model_type, num_experts_per_tok=top_k).to_dict()
    if zero:
        hf["zce_nums"], hf["zce_types"] = [zero], ["zero"]
    r = Router(ModelConfig.from_hf_config(hf))
    torch.manual_seed(seed)
    torch.nn.init.normal_(r.weight, std=1.0)
    return r


def raw_weights(r: Router, x):
    """The K chosen ids and their unnormalised weights (softmax p or sigmoid s), by hand."""
    logits = x.float() @ r.weight.float().T
    if r.scoring == "softmax":
        raw, ids = logits.softmax(-1).topk(r.top_k, dim=-1)
    else:
        s = logits.sigmoid()
        ids = (s + r.e_score_correction_bias).topk(r.top_k, dim=-1).indices
        raw = s.gather(1, ids)
    return raw, ids


@settings(max_examples=25, deadline=None)
@given(model_type=st.sampled_from(["qwen3_moe", "glm4_moe_lite"]), k=st.integers(1, 4), seed=st.integers(0, 10_000))
def test_topk_keeps_the_k_highest_weighted_and_renormalises(model_type, k, seed):
    r = router(model_type, seed=seed)
    x = torch.randn(16, r.weight.shape[1], generator=torch.Generator().manual_seed(seed))
    raw, ids = raw_weights(r, x)
    routing_variant(r).keep_rule = ("topk", k)
    out = r(x)
    E = r.weight.shape[0]
    for t in range(x.shape[0]):
        order = raw[t].argsort(descending=True, stable=True)
        kept = {int(ids[t, j]) for j in order[:k]}
        assert {int(i) for i in out.ids_TK[t] if i != E} == kept
        assert int((out.ids_TK[t] == E).sum()) == r.top_k - k  # the rest are skipped
        w = {int(i): float(v) for i, v in zip(out.ids_TK[t], out.weights_TK[t]) if i != E}
        total = sum(float(raw[t, j]) for j in order[:k])
        scale = r.routed_scaling_factor if r.scoring == "sigmoid" else 1.0
        for j in order[:k]:
            assert w[int(ids[t, j])] == pytest.approx(float(raw[t, j]) / total * scale, rel=1e-5)
        assert all(float(v) == 0 for i, v in zip(out.ids_TK[t], out.weights_TK[t]) if i == E)


@settings(max_examples=40, deadline=None)
@given(p=st.floats(0.05, 1.0), seed=st.integers(0, 10_000))
def test_topp_keeps_slots_until_the_cumulative_share_reaches_p(p, seed):
    w = torch.rand(8, 4, generator=torch.Generator().manual_seed(seed)) + 1e-3
    keep = keep_slots(w, "topp", p)
    for t in range(w.shape[0]):
        share = sorted((float(v) / float(w[t].sum()) for v in w[t]), reverse=True)
        before = 0.0
        expected = 0
        for s in share:  # keep while the mass before this slot is short of p
            if before < p:
                expected += 1
            before += s
        assert int(keep[t].sum()) == expected >= 1
        kept_min = min(float(v) for v, k in zip(w[t], keep[t]) if k)
        assert all(float(v) <= kept_min for v, k in zip(w[t], keep[t]) if not k)  # the highest are the kept


def test_skipped_slots_never_reach_a_gemm_and_cost_nothing():
    """The expert GEMMs see exactly the kept slots: the layer output equals a loop over kept slots only, and the
    FLOP accounting charges exactly 2*3*H*I per kept slot."""
    torch.manual_seed(0)
    cfg_hf = tiny_hf_config("qwen3_moe", num_experts_per_tok=4).to_dict()
    cfg = ModelConfig.from_hf_config(cfg_hf)
    r = router("qwen3_moe")
    routing_variant(r).keep_rule = ("topk", 2)
    N, H, I = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
    gate, up, down = torch.randn(N, I, H), torch.randn(N, I, H), torch.randn(N, H, I)
    x = torch.randn(10, H)
    out = r(x)
    seen = []

    def counting_swiglu(x_MH, counts_N, *w):
        seen.append(x_MH.shape[0])
        from zeda.moe import expert_swiglu_loop
        return expert_swiglu_loop(x_MH, counts_N, *w)

    import zeda.moe as moe
    real = moe.EXPERT_SWIGLU["loop"]
    moe.EXPERT_SWIGLU["loop"] = counting_swiglu
    try:
        y = routed_experts_forward(x, out.weights_TK, out.ids_TK, torch.cat([gate, up], dim=1), down, "loop")
    finally:
        moe.EXPERT_SWIGLU["loop"] = real
    assert seen == [10 * 2]  # two kept slots per token reach the GEMMs, nothing else
    ref = torch.zeros_like(x)
    for t in range(10):
        for e, w in zip(out.ids_TK[t].tolist(), out.weights_TK[t].tolist()):
            if e < N:
                h = torch.nn.functional.silu(gate[e] @ x[t]) * (up[e] @ x[t])
                ref[t] += w * (down[e] @ h)
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)
    stats = routing_stats([out], N)
    report = flop_report(cfg, stats, 10)
    assert report["expert_flops_dynamic"] == 10 * 2 * expert_flops_per_slot(cfg) == 10 * 2 * 2 * 3 * H * I
    assert report["expert_flops_reduction"] == pytest.approx(0.5)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    from zeda.conversion import convert_checkpoint

    root = tmp_path_factory.mktemp("dial")
    make_tiny_checkpoint(root / "static", "qwen3_moe", vocab_size=104, max_position_embeddings=128)
    save_tokenizer(root / "static")
    convert_checkpoint(root / "static", root / "dynamic", num_zero=4, progress=False)
    return root


def test_dial_at_zero_is_bit_identical_and_zero_share_rises_with_the_bias(converted):
    model = zeda.load_model(converted / "dynamic")
    ids = torch.randint(5, 100, (3, 20), generator=torch.Generator().manual_seed(0))
    plain = model(ids)
    set_routing(model, zero_bias=0.0)
    assert torch.equal(model(ids), plain)
    shares = []
    for bias in (-4.0, -1.0, 0.0, 1.0, 4.0):
        set_routing(model, zero_bias=bias)
        routing = []
        model(ids, routing=routing)
        stats = routing_stats(routing, model.config.num_experts)
        shares.append(sum(s.zero_slots for s in stats) / sum(s.routed_slots for s in stats))
    assert shares == sorted(shares) and shares[0] < shares[2] < shares[-1]
    set_routing(model)
    assert torch.equal(model(ids), plain)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), low=st.floats(-3, 3), step=st.floats(0.01, 3))
def test_each_tokens_zero_slots_never_fall_as_the_bias_rises(seed, low, step):
    for model_type in ("qwen3_moe", "glm4_moe_lite"):
        r = router(model_type, zero=4, seed=seed)
        x = torch.randn(12, r.weight.shape[1], generator=torch.Generator().manual_seed(seed))
        counts = []
        for bias in (low, low + step):
            routing_variant(r).zero_bias = bias
            counts.append((r(x).ids_TK >= r.num_experts).sum(-1))
        assert bool((counts[1] >= counts[0]).all())


def test_rules_are_parsed_and_refused_by_name():
    assert parse_routing("topk:2", 4) == ("topk", 2.0) and parse_routing("topp:0.6", 4) == ("topp", 0.6)
    assert parse_routing("native", 4) is None
    for bad in ("topk:0", "topk:5", "topk:1.5", "topp:0", "topp:1.2", "topp:nan", "top:3", "topk", "topk:x"):
        with pytest.raises(UsageError, match="--routing"):
            parse_routing(bad, 4)


def test_evaluate_routing_flag_reports_the_skipped_share(converted, tmp_path):
    out = tmp_path / "r.json"
    assert evaluate.main(["--model", str(converted / "static"), "--n", "2", "--max-new-tokens", "4", "--routing",
                          "topk:1", "--out", str(out), "--no-progress", "--device", "cpu"]) == 0
    report = json.loads(out.read_text())
    K = ModelConfig.from_hf_config(converted / "static").num_experts_per_tok
    assert report["routing"] == "topk:1"
    assert report["expert_flops_reduction"] == pytest.approx(1 - 1 / K)  # every token keeps exactly one slot
    assert evaluate.main(["--model", str(converted / "static"), "--routing", "topk:99"]) == 2
    assert evaluate.main(["--model", str(converted / "static"), "--zero-bias", "1"]) == 2  # no zero experts


# ----------------------------------------------------------------------------------------------
# The trained baselines: AdaMoE null experts (real weights renormalised, Switch balance loss) and the static
# top-k' fine-tune. Each runs two SFT steps and reloads.


def test_adamoe_renormalises_the_real_slots_and_round_trips(converted, tmp_path):
    from zeda.conversion import convert_checkpoint

    out = tmp_path / "adamoe"
    convert_checkpoint(converted / "static", out, num_zero=4, progress=False, normalization="adamoe")
    assert json.loads((out / "config.json").read_text())["zce_normalization"] == "adamoe"
    zeda_model, ada = zeda.load_model(converted / "dynamic"), zeda.load_model(out)
    assert ada.config.zero_normalization == "adamoe" and zeda_model.config.zero_normalization == "zeda"
    x = torch.randn(30, ada.config.hidden_size, generator=torch.Generator().manual_seed(0))
    gate = next(b.mlp.gate for b in ada.model.layers if b.is_moe)
    torch.nn.init.normal_(gate.weight, std=1.0)  # spread-out scores: some tokens pick zero slots, some do not
    r = gate(x)
    N = ada.config.num_experts
    real = r.ids_TK < N
    assert real.any() and (~real).any()
    assert (r.weights_TK[~real] == 0).all()
    sums = (r.weights_TK * real).sum(-1)
    has_real = real.any(-1)
    torch.testing.assert_close(sums[has_real], torch.ones(int(has_real.sum())))  # norm_topk_prob over real slots
    # the same router under ZEDA's rule keeps the zero slots' share: its real weights sum to less than 1
    gate.renormalize_real = False
    r2 = gate(x)
    assert torch.equal(r2.ids_TK, r.ids_TK)  # the normalisation changes weights, never the selection
    mixed = has_real & (~real).any(-1)  # tokens with real and zero slots
    assert mixed.any() and float((r2.weights_TK * real).sum(-1)[mixed].max()) < 1.0


def rollouts_file(path):
    path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Compute {i}+1."},
                                                     {"role": "assistant", "content": f"Answer: {i + 1}"}]}) + "\n"
                            for i in range(4)))
    return path


@pytest.mark.parametrize("baseline", ["adamoe", "static_topk"])
def test_trained_baselines_run_two_steps_and_reload(converted, tmp_path, baseline):
    """Both trained baselines through experiments/variant.py and the user's own scripts."""
    import variant

    rollouts = rollouts_file(tmp_path / "r.jsonl")
    if baseline == "adamoe":
        student = tmp_path / "adamoe"
        assert variant.main(["--normalization", "adamoe", "convert.py", "--input-dir", str(converted / "static"),
                             "--output-dir", str(student), "--num-zero-experts", "4"]) == 0
        swap = ["--aux-loss", "switch"]
    else:
        student, swap = converted / "static", ["--routing", "topk:1"]
    out = tmp_path / "run"
    assert variant.main([*swap, "train_sft.py", "--student", str(student), "--rollouts", str(rollouts), "--out",
                         str(out), "--global-batch-size", "2", "--micro-batch-size", "2", "--max-steps", "2",
                         "--lr", "1e-3", "--device", "cpu"]) == 0
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]
    if baseline == "static_topk":  # one of the K slots kept: the skipped ones show as the zero share
        K = ModelConfig.from_hf_config(student).num_experts_per_tok
        assert metrics[0]["zero_ratio"] == pytest.approx(1 - 1 / K) and metrics[0]["ga"] == 0
    else:
        assert metrics[0]["ga"] > 0
    reloaded = zeda.load_model(out / "final")
    before = zeda.load_model(student)
    assert reloaded.config.zero_normalization == before.config.zero_normalization
    assert any(not torch.equal(a, b) for a, b in zip(reloaded.state_dict().values(), before.state_dict().values()))


def test_a_static_student_needs_a_rule(converted, tmp_path, capsys):
    import train_sft

    rollouts = rollouts_file(tmp_path / "r.jsonl")
    code = train_sft.main(["--student", str(converted / "static"), "--rollouts", str(rollouts), "--out",
                           str(tmp_path / "o"), "--global-batch-size", "2", "--micro-batch-size", "2"])
    assert code == 2 and "not a converted checkpoint" in capsys.readouterr().err


def test_a_routing_baseline_trains_under_fsdp2_on_two_ranks_in_bf16(tmp_path):
    """The static top-k' fine-tune on the real path: two gloo ranks, FSDP2 (which wraps the router in a class of
    its own before --routing turns it into a RoutingVariant), bf16 compute with fp32 masters. Every step keeps
    exactly k' of the K slots."""
    from conftest import tiny_sft_setup, torchrun

    d = tiny_sft_setup(tmp_path)
    out = tmp_path / "out"
    torchrun("experiments/variant.py", "--routing", "topk:1", "train_sft.py", "--student", str(d / "teacher"),
             "--rollouts", str(d / "r.jsonl"), "--out", str(out), "--fsdp", "--dtype", "bfloat16", "--device", "cpu", "--max-steps", "2",
             "--global-batch-size", "4", "--micro-batch-size", "2", "--keep-unfinished")
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    K = ModelConfig.from_hf_config(d / "teacher").num_experts_per_tok
    assert len(steps) == 2 and all(s["zero_ratio"] == pytest.approx(1 - 1 / K) for s in steps)
    assert (out / "final" / "config.json").exists()
