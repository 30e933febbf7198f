"""FLOP accounting equals a hand count (docs/method.md §6), and routing statistics exclude padding.

The hand count here is independent of zeda/flops.py: it walks the model's own modules and counts
2 x (weight elements) per token for every Linear a token passes through, plus the attention scores.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import zeda
from zeda.flops import attended_keys, flop_report, routing_stats, zero_expert_ratio
from zeda.moe import RouterOutput
from zeda_toy.tiny import make_tiny_checkpoint


@pytest.fixture(scope="module", params=["qwen3_moe", "glm4_moe_lite"])
def tiny_model(request, tmp_path_factory):
    """A tiny static model with a dense layer among the MoE layers; returns (model, checkpoint folder)."""
    path = tmp_path_factory.mktemp(request.param)
    make_tiny_checkpoint(path, request.param, seed=7, num_hidden_layers=3,
                         **({"mlp_layer_types": ["dense", "sparse", "sparse"]} if request.param != "qwen3_moe"
                            else {"mlp_only_layers": [1]}))
    return zeda.load_model(path), path


def hand_count(model, n_tokens, keys, real_slots):
    """Count matmul FLOPs by walking the modules: 2 * in * out per token per Linear a token goes through."""
    cfg = model.config
    total = 0
    for block in model.model.layers:
        attn = block.self_attn
        total += sum(2 * m.weight.numel() for m in attn.modules() if isinstance(m, nn.Linear)) * n_tokens
        if cfg.is_mla:
            dqk = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
            total += keys * cfg.num_attention_heads * (2 * dqk + 2 * cfg.v_head_dim)
        else:
            total += keys * cfg.num_attention_heads * cfg.head_dim * 4
        if block.is_moe:
            total += 2 * cfg.num_experts * cfg.hidden_size * n_tokens  # the original N-output router
            if block.mlp.shared_experts is not None:
                total += sum(2 * m.weight.numel() for m in block.mlp.shared_experts.modules()
                             if isinstance(m, nn.Linear)) * n_tokens
        else:
            total += sum(2 * m.weight.numel() for m in block.mlp.modules() if isinstance(m, nn.Linear)) * n_tokens
    total += 2 * model.lm_head.weight.numel() * n_tokens
    experts = model.model.layers[-1].mlp.experts
    per_slot = 2 * (experts.gate_up_proj[0].numel() + experts.down_proj[0].numel())
    return total + real_slots * per_slot, per_slot


def test_static_model_flops_equal_hand_count(tiny_model):
    model, _ = tiny_model
    cfg = model.config
    ids = torch.randint(0, cfg.vocab_size, (2, 7))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # 3 padding tokens: never counted
    routing = []
    with torch.no_grad():
        model(ids, attention_mask=mask, routing=routing)
    stats = routing_stats(routing, cfg.num_experts, mask)
    keys = attended_keys(mask)
    assert keys == 7 * 8 // 2 + 4 * 5 // 2
    n_tokens = int(mask.sum())
    assert all(s.num_tokens == n_tokens and s.routed_slots == n_tokens * cfg.num_experts_per_tok for s in stats)
    report = flop_report(cfg, stats, keys)
    expected, _ = hand_count(model, n_tokens, keys, n_tokens * cfg.num_experts_per_tok * cfg.num_moe_layers)
    assert report["forward_flops_static"] == expected
    assert report["forward_flops_dynamic"] == expected  # static model: nothing skipped
    assert report["expert_flops_reduction"] == 0.0


def test_tiny_model_flops_equal_hand_count(tiny_model, tmp_path):
    from zeda.conversion import convert_checkpoint

    _, path = tiny_model
    convert_checkpoint(path, tmp_path / "dyn", num_zero=4, progress=False)
    model = zeda.load_model(tmp_path / "dyn")
    cfg = model.config
    with torch.no_grad():
        model.model.layers[-1].mlp.gate.weight[cfg.num_experts:] += 0.5  # make zero slots frequent
    ids = torch.randint(0, cfg.vocab_size, (3, 9))
    routing = []
    with torch.no_grad():
        model(ids, routing=routing)
    stats = routing_stats(routing, cfg.num_experts)
    real = sum(s.real_slots for s in stats)
    zero = sum(s.zero_slots for s in stats)
    assert zero > 0 and real + zero == 27 * cfg.num_experts_per_tok * cfg.num_moe_layers
    keys = attended_keys(None, 9) * 3
    report = flop_report(cfg, stats, keys)
    static_total, per_slot = hand_count(model, 27, keys, real + zero)
    router_extra = 27 * cfg.num_moe_layers * 2 * cfg.hidden_size * cfg.num_zero_experts
    assert report["forward_flops_static"] == static_total
    assert report["forward_flops_dynamic"] == static_total - zero * per_slot + router_extra
    assert report["expert_flops_dynamic"] == real * per_slot
    assert report["expert_flops_reduction"] == pytest.approx(zero / (real + zero))
    assert 0 < report["forward_flops_reduction"] < report["expert_flops_reduction"]
    # Tokens per expert add up to the real slots, layer by layer.
    assert all(sum(s.tokens_per_expert) == s.real_slots for s in stats)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 5), st.integers(1, 12), st.integers(1, 4), st.integers(1, 6), st.integers(0, 6),
       st.integers(0, 999))
def test_routing_stats_count_real_tokens_only(B, T, K, N, Z, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, N + Z, (B * T, K), generator=g)
    mask = (torch.rand(B, T, generator=g) < 0.7).long()
    r = RouterOutput(torch.rand(B * T, K), ids, torch.zeros(B * T, N + Z))
    (s,) = routing_stats([r], N, mask)
    valid = mask.reshape(-1).bool()
    assert s.num_tokens == int(valid.sum())
    assert s.real_slots == int((ids[valid] < N).sum())
    assert s.zero_slots == int((ids[valid] >= N).sum())
    assert s.routed_slots == s.num_tokens * K
    expected_ratio = s.zero_slots / s.routed_slots if s.routed_slots else 0.0
    assert zero_expert_ratio([s]) == expected_ratio


def test_attended_keys_matches_a_loop():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])
    loop = sum(int(mask[b, : t + 1].sum()) for b in range(3) for t in range(5) if mask[b, t])
    assert attended_keys(mask) == loop == 6 + 15 + 1
