"""Routing statistics and FLOP accounting (docs/method.md §6).

What is counted: matmul FLOPs (2 per multiply-add) of the forward pass -- attention projections, attention
scores and values (q.k and p.v over the keys each query attends to), dense MLP layers, shared experts, the
router, routed experts and the LM head. What is ignored: norms, RoPE, softmax, SiLU, residual adds and the
embedding lookup (no matmul), all O(H) per token and < 1% at real shapes.

Routed experts: a SwiGLU expert costs 2 * 3 * H * I FLOPs per real slot (gate, up, down); a zero slot costs
0. The *static equivalent* is the original model: every one of the K slots is real and the router has N
outputs (the dynamic model's router has N + Z). Padding tokens are not counted anywhere.

    stats = routing_stats(routing, cfg.num_experts, attention_mask)   # after model(..., routing=routing)
    report = flop_report(cfg, stats, attended_keys(attention_mask))
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from zeda.config import ModelConfig


@dataclass
class LayerStats:
    """One MoE layer's routing over the real (non-padding) tokens of a forward."""

    num_tokens: int  # real tokens routed
    routed_slots: int  # tokens * K
    real_slots: int  # slots that went to real experts (the rows the GEMMs saw)
    zero_slots: int  # slots that went to zero experts (cost nothing)
    tokens_per_expert: list[int]  # [N] real slots per real expert


def expert_counts(routing: list, valid_BT: torch.Tensor, num_outputs: int) -> torch.Tensor:
    """Slots per router output [L, E + 1] over the real tokens of a forward (no boolean indexing: no host sync).

    Column E counts the slots a training-free routing rule skipped (zeda/baselines.py marks them with id E, one
    past the last router output); like zero slots they cost nothing, and with ZEDA's own routing it stays 0."""
    if not routing:
        return torch.zeros(0, num_outputs + 1, dtype=torch.long, device=valid_BT.device)
    ids_LX = torch.stack([r.ids_TK.reshape(-1) for r in routing])  # [L, T*K]
    K = routing[0].ids_TK.shape[-1]
    weight_LX = valid_BT.reshape(-1).long().repeat_interleave(K).expand_as(ids_LX)
    return torch.zeros(len(routing), num_outputs + 1, dtype=torch.long, device=ids_LX.device).scatter_add_(
        1, ids_LX, weight_LX)


def layer_stats(counts_LE: torch.Tensor, num_tokens: int, num_experts: int, top_k: int) -> list[LayerStats]:
    """LayerStats from accumulated per-output slot counts [L, E + 1] (expert_counts); columns >= N cost nothing."""
    counts = counts_LE.tolist()  # host sync, once
    return [LayerStats(num_tokens, num_tokens * top_k, sum(c[:num_experts]), sum(c[num_experts:]), c[:num_experts])
            for c in counts]


def routing_stats(routing, num_experts: int, attention_mask=None) -> list[LayerStats]:
    """Per MoE layer: routed, real and zero slots and tokens per expert, over real tokens only.

    routing: the RouterOutputs a forward appended (ids_TK with T = B * T_new, flattened row-major).
    attention_mask: [B, S] with the new tokens last (as passed to the model), or None for all real.
    Counted on device; one host sync for the whole list.
    """
    if not routing:
        return []
    ids_TK = routing[0].ids_TK
    if attention_mask is None:
        valid_T = torch.ones(ids_TK.shape[0], dtype=torch.bool, device=ids_TK.device)
    else:
        B = attention_mask.shape[0]
        valid_T = attention_mask[:, -(ids_TK.shape[0] // B):].reshape(-1).bool()
    counts_LE = expert_counts(routing, valid_T, routing[0].logits_TE.shape[-1])
    return layer_stats(counts_LE, int(valid_T.sum()), num_experts, ids_TK.shape[-1])  # host sync


def merge_stats(a: list[LayerStats], b: list[LayerStats]) -> list[LayerStats]:
    """Sum two lists of per-layer statistics (e.g. over the steps of a generation)."""
    if not a:
        return list(b)
    return [
        LayerStats(x.num_tokens + y.num_tokens, x.routed_slots + y.routed_slots, x.real_slots + y.real_slots,
                   x.zero_slots + y.zero_slots, [p + q for p, q in zip(x.tokens_per_expert, y.tokens_per_expert)])
        for x, y in zip(a, b)
    ]


def zero_expert_ratio(stats: list[LayerStats]) -> float:
    """Share of routed slots (tokens x MoE layers x K) that point at zero experts."""
    routed = sum(s.routed_slots for s in stats)
    return sum(s.zero_slots for s in stats) / routed if routed else 0.0


def attended_keys(attention_mask=None, num_tokens: int | None = None) -> int:
    """Sum over real query tokens of the keys each attends to (causal, padding excluded).

    For a row with n real tokens that is n (n + 1) / 2. Without a mask, pass num_tokens for one sequence."""
    if attention_mask is None:
        n = int(num_tokens or 0)
        return n * (n + 1) // 2
    n_BT = attention_mask.long().cumsum(-1) * attention_mask.long()  # keys seen by each real token
    return int(n_BT.sum())  # host sync


def expert_flops_per_slot(cfg: ModelConfig) -> int:
    return 2 * 3 * cfg.hidden_size * cfg.moe_intermediate_size


def attention_proj_flops(cfg: ModelConfig) -> int:
    """Per token per layer: the q, k, v and o projections (MLA: the low-rank ones)."""
    H, nh = cfg.hidden_size, cfg.num_attention_heads
    if not cfg.is_mla:
        D, nkv = cfg.head_dim, cfg.num_key_value_heads
        return 2 * H * nh * D + 2 * 2 * H * nkv * D + 2 * nh * D * H
    dqk = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
    q = 2 * H * nh * dqk if cfg.q_lora_rank is None else 2 * H * cfg.q_lora_rank + 2 * cfg.q_lora_rank * nh * dqk
    kv = 2 * H * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) + 2 * cfg.kv_lora_rank * nh * (cfg.qk_nope_head_dim
                                                                                        + cfg.v_head_dim)
    return q + kv + 2 * nh * cfg.v_head_dim * H


def attention_score_flops_per_key(cfg: ModelConfig) -> int:
    """Per (query, key) pair per layer: q.k and p.v over all heads."""
    nh = cfg.num_attention_heads
    if cfg.is_mla:
        return 2 * nh * (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim) + 2 * nh * cfg.v_head_dim
    return 2 * nh * cfg.head_dim * 2


def flop_report(cfg: ModelConfig, stats: list[LayerStats], keys: int) -> dict:
    """Expert and whole-forward FLOPs, dynamic (measured routing) and static (the original model).

    stats: routing_stats of the forward(s); keys: attended_keys of the same forward(s)."""
    tokens = stats[0].num_tokens if stats else 0
    H, L = cfg.hidden_size, cfg.num_hidden_layers
    n_moe = cfg.num_moe_layers
    per_slot = expert_flops_per_slot(cfg)
    expert_static = sum(s.routed_slots for s in stats) * per_slot
    expert_dynamic = sum(s.real_slots for s in stats) * per_slot
    dense_mlp = (L - n_moe) * 2 * 3 * H * cfg.intermediate_size
    shared = n_moe * 2 * 3 * H * cfg.moe_intermediate_size * cfg.n_shared_experts
    common_per_token = L * attention_proj_flops(cfg) + dense_mlp + shared + 2 * H * cfg.vocab_size
    common = tokens * common_per_token + L * keys * attention_score_flops_per_key(cfg)
    router_static = tokens * n_moe * 2 * H * cfg.num_experts
    router_dynamic = tokens * n_moe * 2 * H * cfg.num_router_outputs
    forward_static = common + router_static + expert_static
    forward_dynamic = common + router_dynamic + expert_dynamic
    return {
        "tokens": tokens,
        "expert_flops_static": expert_static,
        "expert_flops_dynamic": expert_dynamic,
        "expert_flops_reduction": 1 - expert_dynamic / expert_static if expert_static else 0.0,
        "forward_flops_static": forward_static,
        "forward_flops_dynamic": forward_dynamic,
        "forward_flops_reduction": 1 - forward_dynamic / forward_static if forward_static else 0.0,
        "zero_expert_ratio": zero_expert_ratio(stats),
    }
