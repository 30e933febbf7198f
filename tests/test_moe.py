"""Router and experts with zero experts: the invariants of docs/method.md §2, as property tests.

- zero experts contribute exactly zero (against a dense computation where they are real experts with
  all-zero weights);
- the rows handed to the expert GEMMs are exactly the real slots (spying on the GEMM's input);
- routing weights follow §2 (zero slots stay in the normaliser; GLM's bias selects, scaling multiplies);
- the loop and grouped_mm backends agree, forward and backward.
"""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from zeda import moe
from zeda.config import ModelConfig
from zeda.moe import Router, routed_experts_forward

SETTINGS = settings(max_examples=25, deadline=None)


def make_experts(N, H, I, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(N, 2 * I, H, generator=g, dtype=dtype) / H**0.5,  # gate_up [N, 2I, H]
            torch.randn(N, H, I, generator=g, dtype=dtype) / I**0.5]  # down [N, H, I]


def random_routing(T, K, N, Z, zero_share, seed):
    """ids [T, K] distinct per row; roughly zero_share of the slots on zero experts; fp32 weights."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(N + Z, generator=g)[:K] for _ in range(T)]) if T else torch.zeros(0, K)
    ids = ids.long()
    if Z:
        to_zero = torch.rand(T, K, generator=g) < zero_share
        ids = torch.where(to_zero, N + (ids % Z), torch.where(ids >= N, ids % N, ids))
        # keep rows distinct enough for the test's purpose; duplicates are harmless to the math
    weights = torch.rand(T, K, generator=g)
    return weights, ids


def loop_reference(x, weights, ids, gate_up, down):
    """Per slot: y[t] += w * SwiGLU_e(x[t]) for real e, nothing for zero e."""
    gate, up = gate_up.chunk(2, dim=1)  # [N, I, H] each: gate rows first
    N = gate.shape[0]
    y = torch.zeros_like(x, dtype=torch.float32)
    for t in range(x.shape[0]):
        for k in range(ids.shape[1]):
            e = int(ids[t, k])
            if e < N:
                h = F.silu(gate[e] @ x[t]) * (up[e] @ x[t])
                y[t] += weights[t, k] * (down[e] @ h)
    return y.to(x.dtype)


routing_case = st.tuples(
    st.integers(0, 13),  # T
    st.integers(1, 4),  # K
    st.integers(1, 6),  # N
    st.integers(0, 5),  # Z
    st.floats(0.0, 1.0),  # zero share
    st.integers(0, 2**16),  # seed
).filter(lambda c: c[1] <= c[2] + c[3])


@SETTINGS
@given(routing_case, st.sampled_from(["loop", "grouped_mm"]))
def test_zero_experts_contribute_exactly_zero(case, backend):
    T, K, N, Z, share, seed = case
    H, I = 8, 4
    x = torch.randn(T, H, generator=torch.Generator().manual_seed(seed))
    weights, ids = random_routing(T, K, N, Z, share, seed)
    gate_up, down = make_experts(N, H, I, seed)
    y = routed_experts_forward(x, weights, ids, gate_up, down, backend)
    # Dense twin: the Z zero experts become real experts whose weights are all zero.
    zeros = lambda w: torch.cat([w, w.new_zeros(Z, *w.shape[1:])])  # noqa: E731
    y_dense = routed_experts_forward(x, weights, ids, zeros(gate_up), zeros(down), backend)
    torch.testing.assert_close(y, y_dense, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(y, loop_reference(x, weights, ids, gate_up, down), rtol=1e-5, atol=1e-5)
    all_zero_rows = (ids >= N).all(dim=1)
    assert torch.equal(y[all_zero_rows], torch.zeros_like(y[all_zero_rows]))  # exactly zero, not just small


@SETTINGS
@given(routing_case, st.sampled_from(["loop", "grouped_mm"]))
def test_gemm_rows_are_exactly_the_real_slots(case, backend):
    T, K, N, Z, share, seed = case
    H, I = 8, 4
    x = torch.randn(T, H, generator=torch.Generator().manual_seed(seed))
    weights, ids = random_routing(T, K, N, Z, share, seed)
    seen = []
    real_fn = moe.EXPERT_SWIGLU[backend]

    def spy(x_MH, counts_N, *w):
        seen.append((x_MH.clone(), counts_N.clone()))
        return real_fn(x_MH, counts_N, *w)

    moe.EXPERT_SWIGLU[backend] = spy
    try:
        routed_experts_forward(x, weights, ids, *make_experts(N, H, I, seed), backend=backend)
    finally:
        moe.EXPERT_SWIGLU[backend] = real_fn
    (x_MH, counts_N), = seen
    real = ids < N
    assert x_MH.shape[0] == int(real.sum())  # no zero slot, no padding row reached the GEMM function
    assert torch.equal(counts_N, torch.bincount(ids[real], minlength=N))
    # Row multiset per expert: the tokens routed to it, in token order.
    start = 0
    for e in range(N):
        tokens = [t for t in range(T) for k in range(K) if ids[t, k] == e]
        assert torch.equal(x_MH[start:start + len(tokens)], x[tokens])
        start += len(tokens)


def test_padding_tokens_never_reach_a_gemm():
    T, K, N = 6, 2, 4
    x = torch.randn(T, 8)
    weights, ids = random_routing(T, K, N, 0, 0.0, 1)
    keep = torch.tensor([True, False, True, True, False, True])[:, None].expand(T, K)
    seen = []
    real_fn = moe.EXPERT_SWIGLU["loop"]
    moe.EXPERT_SWIGLU["loop"] = lambda x_MH, c, *w: seen.append(x_MH.shape[0]) or real_fn(x_MH, c, *w)
    try:
        y = routed_experts_forward(x, weights, ids, *make_experts(N, 8, 4), backend="loop", keep_TK=keep)
    finally:
        moe.EXPERT_SWIGLU["loop"] = real_fn
    assert seen == [4 * K]
    assert torch.equal(y[1], torch.zeros(8)) and torch.equal(y[4], torch.zeros(8))


def _router(scoring, N, Z, K, H, norm, scaling=1.0, mask=False, seed=0):
    cfg = ModelConfig(model_type="glm4_moe_lite" if scoring == "sigmoid" else "qwen3_moe", vocab_size=8,
                      hidden_size=H, num_hidden_layers=1, num_attention_heads=1, num_key_value_heads=1, head_dim=4,
                      intermediate_size=4, moe_intermediate_size=4, num_experts=N, num_experts_per_tok=K,
                      moe_layers=(True,), norm_topk_prob=norm, rms_norm_eps=1e-6, rope_theta=1e4,
                      max_position_embeddings=64, tie_word_embeddings=False, num_zero_experts=Z, use_zce_mask=mask,
                      router_scoring=scoring, routed_scaling_factor=scaling)
    r = Router(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        r.weight.copy_(torch.randn(N + Z, H, generator=g))
        if scoring == "sigmoid":
            r.e_score_correction_bias.copy_(torch.randn(N + Z, generator=g) * 0.5)
    return r


@SETTINGS
@given(st.integers(1, 6), st.integers(1, 6), st.integers(1, 4), st.booleans(), st.integers(0, 999))
def test_softmax_routing_keeps_zero_slots_in_the_normaliser(N, Z, K, norm, seed):
    assume(K <= N + Z)  # a router cannot pick more slots than it has experts
    H = 5
    r = _router("softmax", N, Z, K, H, norm, seed=seed)
    x = torch.randn(7, H, generator=torch.Generator().manual_seed(seed))
    out = r(x)
    p = torch.softmax(x @ r.weight.T, dim=-1)  # over all N + Z
    top = p.topk(K, dim=-1)
    expected = top.values / top.values.sum(-1, keepdim=True) if norm else top.values
    torch.testing.assert_close(out.weights_TK, expected)
    assert torch.equal(out.ids_TK, top.indices)
    if norm:  # real experts are NOT renormalised: their weights sum to 1 minus the zero slots' share
        real_sum = (out.weights_TK * (out.ids_TK < N)).sum(-1)
        zero_sum = (out.weights_TK * (out.ids_TK >= N)).sum(-1)
        torch.testing.assert_close(real_sum + zero_sum, torch.ones(7))


@SETTINGS
@given(st.integers(2, 8), st.integers(1, 6), st.integers(1, 4), st.integers(0, 999))
def test_sigmoid_routing_bias_selects_scaling_multiplies(N, Z, K, seed):
    assume(K <= N + Z)  # N=2, Z=1, K=4 is not a router (hypothesis found it in CI)
    H, scaling = 5, 1.8
    r = _router("sigmoid", N, Z, K, H, True, scaling, seed=seed)
    x = torch.randn(7, H, generator=torch.Generator().manual_seed(seed))
    out = r(x)
    s = torch.sigmoid(x @ r.weight.T)
    chosen = (s + r.e_score_correction_bias).topk(K, dim=-1).indices
    assert torch.equal(out.ids_TK.sort(-1).values, chosen.sort(-1).values)
    w = s.gather(1, out.ids_TK)
    torch.testing.assert_close(out.weights_TK, w / (w.sum(-1, keepdim=True) + 1e-20) * scaling)


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_zce_mask_never_selects_zero_experts(scoring):
    r = _router(scoring, 4, 4, 2, 6, True, 1.8, mask=True)
    with torch.no_grad():
        r.weight[4:] += 100.0  # zero experts would win every token without the mask
        if scoring == "sigmoid":
            r.e_score_correction_bias[4:] = 10.0
    out = r(torch.randn(20, 6))
    assert (out.ids_TK < 4).all()
    assert torch.isinf(out.logits_TE[:, 4:]).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("share", [0.0, 0.5, 1.0])
def test_backends_agree_forward_and_backward(dtype, share):
    T, K, N, Z, H, I = 37, 3, 6, 3, 16, 8
    x0 = torch.randn(T, H).to(dtype)
    weights0, ids = random_routing(T, K, N, Z, share, 5)
    ids[:, :] = torch.where(ids == 2, 3, ids)  # expert 2 gets no tokens: an empty group
    results = {}
    for backend in ("loop", "grouped_mm"):
        x = x0.clone().requires_grad_()
        weights = weights0.clone().requires_grad_()
        params = [p.requires_grad_() for p in make_experts(N, H, I, 3, dtype)]
        y = routed_experts_forward(x, weights, ids, *params, backend=backend)
        y.backward(torch.ones_like(y))  # a contiguous gradient (_grouped_mm rejects stride-0 ones)
        leaves = [x, weights] + params
        # No real slot: the loop never touches a weight (grad None), the same as a zero gradient.
        results[backend] = [y] + [torch.zeros_like(t) if t.grad is None else t.grad for t in leaves]
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for a, b in zip(results["loop"], results["grouped_mm"]):
        torch.testing.assert_close(a.float(), b.float(), **tol)
    if share == 1.0:
        assert not results["loop"][0].any() and not results["loop"][2].any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_mm_padded_groups_equal_unpadded_ones(dtype):
    """CUDA's _grouped_mm wants aligned group starts, so there each group is copied into a padded buffer; CPU takes
    the rows as they are. Both ways (the padded one forced here, on CPU) give the loop's output and gradients."""
    N, H, I = 5, 16, 8
    counts_N = torch.tensor([3, 0, 9, 1, 4])  # an empty group, and groups that end mid-alignment
    x0 = torch.randn(int(counts_N.sum()), H).to(dtype)
    results = []
    for fn in (moe.expert_swiglu_loop, moe.expert_swiglu_grouped_mm,
               lambda *a: moe.expert_swiglu_grouped_mm(*a, align_rows=8)):
        x = x0.clone().requires_grad_()
        params = [p.requires_grad_() for p in make_experts(N, H, I, 7, dtype)]
        y = fn(x, counts_N, *params)
        y.backward(torch.ones_like(y))
        results.append([y, x.grad] + [p.grad for p in params])
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            torch.testing.assert_close(b.float(), a.float(), **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("share", [0.0, 0.5, 1.0])
def test_combine_equals_the_slot_order_sum_in_value_and_gradient(dtype, share):
    """LocalDispatcher.combine (on CPU: weighted real rows index_add_-ed into their tokens) against the plain
    slot-order sum over a [T*K, H] buffer where zero slots are zero rows, forward and backward."""
    T, K, N, Z, H = 29, 3, 5, 3, 16
    weights0, ids = random_routing(T, K, N, Z, share, 11)
    ids[0] = N  # token 0: every slot on a zero expert
    keep = ids < N
    x_MH0, _, plan = moe.LocalDispatcher().dispatch(torch.randn(T, H), ids, keep, N)
    y_MH0 = torch.randn(x_MH0.shape[0], H).to(dtype)

    def reference(y_MH, weights_TK):
        y_SH = torch.zeros(T * K, H, dtype=dtype).index_copy(0, plan.slot_of_row_M, y_MH)
        return (y_SH.view(T, K, H) * weights_TK.unsqueeze(-1)).sum(1).to(dtype)

    out = {}
    for name, fn in (("combine", moe.LocalDispatcher().combine), ("reference", None)):
        y_MH, weights = y_MH0.clone().requires_grad_(), weights0.clone().requires_grad_()
        y_TH = fn(y_MH, weights, plan) if fn else reference(y_MH, weights)
        y_TH.backward(torch.randn(T, H, generator=torch.Generator().manual_seed(1)).to(dtype))
        out[name] = (y_TH, y_MH.grad, weights.grad)
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    for a, b in zip(out["combine"], out["reference"]):
        torch.testing.assert_close(a.float(), b.float(), **tol)
    assert torch.equal(out["combine"][0][0], torch.zeros(H, dtype=dtype))  # all-zero token: exactly zero
    assert not out["combine"][2][~keep].any()  # zero slots' weights get no gradient through the experts
