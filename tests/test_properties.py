"""Two design properties, tested as properties over random configs, weights and inputs (hypothesis):

(a) zero experts contribute exactly zero: through the Router and the whole MoE block (shared expert included),
    for every expert backend (the compiled decode's "sorted" one included), a token whose K slots are all zero
    experts gets a routed contribution of exactly zero (bitwise), and every token's output is the sum over its
    real slots alone;
(b) FLOP accounting is exact: zeda.flops.flop_report's count of a forward equals what torch's FlopCounterMode
    counts the same forward executing, matmul by matmul (attention through SDPA's math backend, whose matmuls
    the counter sees; it has no formula for the fused CPU kernel). The one documented difference is attention:
    the report counts the keys each query attends to (causal), while the kernel computes, and FlopCounterMode
    counts, the full T x S score matrix; the test adds that difference explicitly and compares the rest exactly.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from zeda.baselines import routing_variant
from zeda.config import ModelConfig
from zeda.flops import attended_keys, attention_score_flops_per_key, flop_report, routing_stats
from zeda.loading import empty_model, materialize
from zeda_toy.tiny import tiny_hf_config

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
ARCHS = ("qwen3_moe", "glm4_moe_lite")


def backends() -> list[str]:
    """loop and grouped_mm always; the Triton kernel where it can run (a GPU, or its CPU interpreter)."""
    names = ["loop", "grouped_mm"]
    if importlib.util.find_spec("triton") and (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"):
        names.append("triton")
    return names


def random_model(arch: str, N: int, Z: int, K: int, H: int, I: int, layers: int, seed: int):
    """A converted model of `arch` with N real + Z zero experts, top-K, random weights (norms near 1)."""
    experts = {"qwen3_moe": "num_experts", "glm4_moe_lite": "n_routed_experts"}[arch]
    # GLM: the first layer dense when there are several (as GLM-4.7-Flash), so dense FLOPs are counted too
    extra = ({"mlp_only_layers": []} if arch == "qwen3_moe"
             else {"mlp_layer_types": ["dense" if i == 0 and layers > 1 else "sparse" for i in range(layers)]})
    hf = tiny_hf_config(arch, hidden_size=H, moe_intermediate_size=I, intermediate_size=2 * I,
                        num_hidden_layers=layers, num_experts_per_tok=K, vocab_size=40, **{experts: N},
                        **extra).to_dict()
    hf.update(zce_nums=[Z], zce_types=["zero"], use_zce_mask=False)
    cfg = ModelConfig.from_hf_config(hf)
    model = empty_model(cfg, torch.float32)
    materialize(model, "cpu")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in [*model.named_parameters(), *model.named_buffers()]:
            if not p.is_floating_point():
                continue
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.1 * noise if "norm" in name else 0.3 * noise)
    return model.eval()


def swiglu(x_H, gate_IH, up_IH, down_HI):
    return down_HI @ (F.silu(gate_IH @ x_H) * (up_IH @ x_H))


def real_slot_sum(x_TH, weights_TK, ids_TK, experts, N):
    """The reference: each token's sum over its real slots of w * SwiGLU_e(x), one slot at a time, in fp64."""
    g, u = experts.gate_up_proj.double().chunk(2, dim=1)  # [N, I, H] each: gate rows first
    d = experts.down_proj.double()
    y = torch.zeros(x_TH.shape, dtype=torch.float64)
    for t in range(x_TH.shape[0]):
        for k in range(ids_TK.shape[1]):
            e = int(ids_TK[t, k])
            if e < N:
                y[t] += float(weights_TK[t, k]) * swiglu(x_TH[t].double(), g[e], u[e], d[e])
    return y


@SETTINGS
@given(arch=st.sampled_from(ARCHS), N=st.integers(2, 6), Z=st.integers(1, 4), K=st.integers(1, 4),
       T=st.integers(1, 10), zero_bias=st.sampled_from([0.0, 1.5, 50.0]), seed=st.integers(0, 10**6))
def test_zero_experts_contribute_exactly_zero_through_the_moe_block(arch, N, Z, K, T, zero_bias, seed):
    assume(K <= N + Z)
    model = random_model(arch, N, Z, K, H=16, I=8, layers=1, seed=seed)
    moe = model.model.layers[0].mlp
    g = torch.Generator().manual_seed(seed + 1)
    x_BTH = torch.randn(1, T, 16, generator=g)
    x_TH = x_BTH[0]
    # Some tokens replay K zero-expert ids (routing replay goes through the Router like any routing), so every
    # example has tokens whose slots are all zero experts, whatever the random router picks for the rest.
    forced_BTK = torch.full((1, T, K), -1, dtype=torch.long)
    forced_T = torch.rand(T, generator=g) < 0.4
    forced_BTK[0, forced_T] = torch.randint(N, N + Z, (int(forced_T.sum()), K), generator=g)
    routing_variant(moe.gate).zero_bias = zero_bias  # large: the router itself picks zero experts for most slots
    shared_TH = moe.shared_experts(x_TH) if moe.shared_experts is not None else torch.zeros_like(x_TH)
    reference = None
    for backend in backends():
        moe.experts.backend = backend
        with torch.no_grad():
            y_TH = moe(x_BTH, forced_ids_BTK=forced_BTK)[0]
        r = moe.last_routing
        all_zero_T = (r.ids_TK >= N).all(dim=-1)
        assert all_zero_T[forced_T].all()
        # bitwise: routed part exactly 0.0, so the output is the shared expert's (or 0) exactly
        assert torch.equal(y_TH[all_zero_T], shared_TH[all_zero_T]), backend
        if reference is None:
            reference = real_slot_sum(x_TH, r.weights_TK, r.ids_TK, moe.experts, N)
        torch.testing.assert_close((y_TH - shared_TH).double(), reference, atol=1e-5, rtol=1e-5)
    # the compiled decode's backend (sorted by expert, static shapes): the same two properties
    with torch.no_grad():
        y_TH = moe.experts(x_TH, r.weights_TK, r.ids_TK, r.ids_TK < N, backend="sorted")
    assert torch.equal(y_TH[all_zero_T], torch.zeros_like(y_TH[all_zero_T]))
    torch.testing.assert_close(y_TH.double(), reference, atol=1e-5, rtol=1e-5)


@SETTINGS
@given(arch=st.sampled_from(ARCHS), N=st.integers(2, 6), Z=st.integers(1, 4), K=st.integers(1, 3),
       H=st.sampled_from([8, 16]), I=st.sampled_from([4, 12]), layers=st.integers(1, 3), B=st.integers(1, 2),
       T=st.integers(1, 8), zero_bias=st.sampled_from([-50.0, 0.0, 1.0, 50.0]), seed=st.integers(0, 10**6))
def test_flop_report_equals_what_the_forward_executes(arch, N, Z, K, H, I, layers, B, T, zero_bias, seed):
    assume(K <= N + Z)
    model = random_model(arch, N, Z, K, H, I, layers, seed)
    cfg = model.config
    for block in model.model.layers:
        if block.is_moe:
            routing_variant(block.mlp.gate).zero_bias = zero_bias  # from no zero slots (-50) to almost all (50)
    model.set_expert_backend("loop")  # one matmul per expert on exactly its rows: what FlopCounterMode can see
    ids_BT = torch.randint(cfg.vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))
    routing = []
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(ids_BT, routing=routing)
    keys = B * attended_keys(num_tokens=T)  # causal: T (T + 1) / 2 per sequence
    report = flop_report(cfg, routing_stats(routing, cfg.num_experts), keys)
    per_key = attention_score_flops_per_key(cfg)
    full_scores = cfg.num_hidden_layers * B * T * T * per_key  # what the attention kernel computes
    causal_scores = cfg.num_hidden_layers * keys * per_key  # what the report counts
    assert counter.get_total_flops() == report["forward_flops_dynamic"] - causal_scores + full_scores


def test_the_properties_can_fail():
    """The reference and the counter are independent of the code under test: a router that kept one zero slot's
    weight on a real expert, or a report that forgot the router's zero-expert rows, is caught."""
    model = random_model("qwen3_moe", 4, 4, 2, H=16, I=8, layers=1, seed=3)
    moe = model.model.layers[0].mlp
    x_TH = torch.randn(6, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        r = moe.gate(x_TH)
        broken_ids = r.ids_TK.clamp(max=3)  # zero slots sent to real expert 3
        y = moe.experts(x_TH, r.weights_TK, broken_ids, broken_ids < 4, backend="sorted")
    assert not torch.allclose(y.double(), real_slot_sum(x_TH, r.weights_TK, r.ids_TK, moe.experts, 4), atol=1e-5)
    routing = []
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 4, dtype=torch.long), routing=routing)
    report = flop_report(model.config, routing_stats(routing, 4), attended_keys(num_tokens=4))
    router_zero_rows = 4 * 2 * 16 * 4  # T * 2 * H * Z: the report without them is off by exactly this
    per_key = attention_score_flops_per_key(model.config)
    executed = counter.get_total_flops() - 16 * per_key + 10 * per_key
    assert executed == report["forward_flops_dynamic"] != report["forward_flops_dynamic"] - router_zero_rows


if __name__ == "__main__":
    pytest.main([__file__, "-q"])
