"""zeda/losses.py against hand computations (docs/method.md §3 Group Auxiliary Loss, §4 SFT cross-entropy, §5 OPD).

Group Auxiliary Loss: the value on hand-written routing tables (softmax and sigmoid scoring, padding masked,
summed over layers) recomputed with plain Python; its minimum sits at the zero share w Z / (N + w Z); the
gradient pushes the zero share toward that target; f is a count (no gradient), P carries it; and with a fake
two-rank all_reduce the mean of the ranks' losses (and their gradients) is the one-process loss over the union.
Response cross-entropy ignores prompt and padding positions; the PPO-clipped loss clips on both sides with zero
gradient where clipped; the reverse-KL advantage is detached; the full reverse KL matches torch.distributions.
"""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from zeda.config import ModelConfig
from zeda.losses import (
    aggregate,
    full_reverse_kl,
    group_aux_loss,
    group_shares,
    ppo_clip_loss,
    response_cross_entropy,
    reverse_kl_advantage,
)
from zeda.model import target_logprobs
from zeda.moe import Router, RouterOutput
from zeda_toy.tiny import tiny_hf_config


def ga_counted(*args, **kwargs):
    """group_aux_loss with f counted on the routed ids: the tables below give those ids by hand, independent of
    their logits, to test the formula itself."""
    return group_aux_loss(*args, counts="routing", **kwargs)

# ----------------------------------------------------------------------------------------------
# Group Auxiliary Loss: hand computation

N, Z, K = 4, 2, 2  # 4 real experts (ids 0..3), 2 zero experts (ids 4, 5), top-2

# Two MoE layers, T = 3 tokens each: raw router logits [T][N + Z] and chosen ids [T][K].
LAYER_A = (
    [[0.5, -1.0, 2.0, 0.0, 1.5, -0.5],
     [1.0, 0.3, -0.7, 0.2, 0.9, 2.2],
     [-0.4, 0.8, 0.1, 1.7, -1.2, 0.6]],
    [[2, 4], [5, 0], [3, 1]],  # zero slots: token 0 one, token 1 one, token 2 none
)
LAYER_B = (
    [[0.0, 0.1, -0.3, 0.4, 2.5, 1.9],
     [-1.5, 2.0, 0.5, -0.2, 0.0, 0.3],
     [0.7, -0.6, 1.1, 0.9, 1.4, 1.6]],
    [[4, 5], [1, 2], [5, 4]],  # zero slots: two, none, two
)


def routing_of(*layers, requires_grad=False):
    """RouterOutputs from ([T][E] logits, [T][K] ids) tables; weights are unused by the loss (ones)."""
    out = []
    for logits, ids in layers:
        logits_TE = torch.tensor(logits, dtype=torch.float32, requires_grad=requires_grad)
        ids_TK = torch.tensor(ids, dtype=torch.long)
        out.append(RouterOutput(torch.ones(ids_TK.shape), ids_TK, logits_TE))
    return out


def hand_probs(row, scoring):
    """The router's full distribution over N + Z, in plain Python."""
    if scoring == "softmax":
        e = [math.exp(x) for x in row]
    else:
        e = [1 / (1 + math.exp(-x)) for x in row]  # sigmoid scores, then normalised to sum to 1
    s = sum(e)
    return [x / s for x in e]


def hand_ga(layers, n, z, valid, scoring, alpha=0.1, w=2.0):
    """L_GA = alpha (N + wZ) (f_E P_E / N + f_Z P_Z / (wZ)), summed over layers, over valid tokens only."""
    total = 0.0
    for logits, ids in layers:
        tokens = [t for t in range(len(ids)) if valid[t]]
        slots = [e for t in tokens for e in ids[t]]
        f_z = sum(e >= n for e in slots) / len(slots)
        f_e = 1 - f_z
        p_z = sum(sum(hand_probs(logits[t], scoring)[n:]) for t in tokens) / len(tokens)
        p_e = sum(sum(hand_probs(logits[t], scoring)[:n]) for t in tokens) / len(tokens)
        total += alpha * (n + w * z) * (f_e * p_e / n + f_z * p_z / (w * z))
    return total


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_group_aux_loss_matches_hand_computation(scoring):
    all_valid = [True, True, True]
    for layers in [(LAYER_A,), (LAYER_B,), (LAYER_A, LAYER_B)]:  # the two-layer case is the sum of the others
        got = ga_counted(routing_of(*layers), N, Z, scoring=scoring)
        assert got.item() == pytest.approx(hand_ga(layers, N, Z, all_valid, scoring), rel=1e-6)
    both = ga_counted(routing_of(LAYER_A, LAYER_B), N, Z, scoring=scoring).item()
    one = [ga_counted(routing_of(layer), N, Z, scoring=scoring).item() for layer in (LAYER_A, LAYER_B)]
    assert both == pytest.approx(sum(one), rel=1e-6)
    # Other alpha and w.
    got = ga_counted(routing_of(LAYER_A, LAYER_B), N, Z, scoring=scoring, alpha=0.7, w=0.5)
    assert got.item() == pytest.approx(hand_ga((LAYER_A, LAYER_B), N, Z, all_valid, scoring, 0.7, 0.5), rel=1e-6)


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_group_aux_loss_ignores_padding_tokens(scoring):
    valid = [True, False, True]
    valid_T = torch.tensor(valid)
    layers = (LAYER_A, LAYER_B)
    got = ga_counted(routing_of(*layers), N, Z, valid_T, scoring=scoring)
    assert got.item() == pytest.approx(hand_ga(layers, N, Z, valid, scoring), rel=1e-6)
    assert got.item() != pytest.approx(hand_ga(layers, N, Z, [True] * 3, scoring), rel=1e-3)
    # Whatever a padding token's logits and ids are, the loss is the same.
    junk = [(logits[:1] + [[9.0, -9.0, 3.0, 0.0, -4.0, 7.0]] + logits[2:], ids[:1] + [[5, 4]] + ids[2:])
            for logits, ids in layers]
    assert ga_counted(routing_of(*junk), N, Z, valid_T, scoring=scoring).item() == pytest.approx(got.item(),
                                                                                                     rel=1e-6)


def test_group_shares_are_sums():
    """(real slots, zero slots, P mass on E, P mass on Z, tokens) per layer, padding excluded."""
    valid = [True, False, True]
    (real, zero, p_real, p_zero, tokens), = group_shares(routing_of(LAYER_A), N, torch.tensor(valid), "softmax",
                                                         "routing")
    assert (int(real), int(zero), tokens) == (3, 1, 2)
    probs = [hand_probs(LAYER_A[0][t], "softmax") for t in (0, 2)]
    assert p_zero.item() == pytest.approx(sum(sum(p[N:]) for p in probs), rel=1e-6)
    assert p_real.item() == pytest.approx(sum(sum(p[:N]) for p in probs), rel=1e-6)


# ----------------------------------------------------------------------------------------------
# Group Auxiliary Loss: where its minimum is, and which way its gradient points


def tied_routing(s_slots: int, T: int, K: int, n: int, z: int):
    """T tokens whose routing puts exactly s_slots of the T*K slots on zero experts (f_Z = s) and whose softmax
    puts mass s = s_slots / (T K) on the zero group at every token (P_Z = s): real logits 0, zero logits c
    with Z e^c / (N + Z e^c) = s."""
    s = s_slots / (T * K)
    c = math.log(s * n / (z * (1 - s)))
    logits_TE = torch.cat([torch.zeros(T, n), torch.full((T, z), c)], dim=1)
    flat = [n + (j % z) if j < s_slots else j % n for j in range(T * K)]
    ids_TK = torch.tensor(flat).view(T, K)
    return [RouterOutput(torch.ones(T, K), ids_TK, logits_TE)], s


@pytest.mark.parametrize("n,z,w", [(4, 2, 2.0), (8, 4, 1.0), (6, 2, 3.0), (16, 8, 0.5)])
def test_group_aux_loss_minimum_is_at_the_target_zero_share(n, z, w):
    T, K = 100, 2
    step = 1 / (T * K)
    grid = []
    for k in range(1, T * K):
        routing, s = tied_routing(k, T, K, n, z)
        f_z = int((routing[0].ids_TK >= n).sum()) / (T * K)
        p_z = routing[0].logits_TE.softmax(-1)[:, n:].sum(-1).mean().item()
        assert f_z == pytest.approx(s) and p_z == pytest.approx(s, abs=1e-6)
        grid.append((ga_counted(routing, n, z, w=w).item(), s))
    best = min(grid)[1]
    target = w * z / (n + w * z)
    assert abs(best - target) <= step + 1e-9, (best, target)


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
@pytest.mark.parametrize("zero_share", [0.8, 0.2])
def test_group_aux_loss_gradient_pushes_zero_share_toward_target(scoring, zero_share):
    """Target 50% (w = 2, Z = N/2). Above it the gradient lowers the zero-expert logits and P_Z; below, it
    raises them."""
    n, z, T, K = 4, 2, 10, 2
    torch.manual_seed(0)
    logits_TE = torch.randn(T, n + z, requires_grad=True)
    zero_slots = round(zero_share * T * K)
    ids_TK = torch.tensor([n + (j % z) if j < zero_slots else j % n for j in range(T * K)]).view(T, K)
    loss = ga_counted([RouterOutput(torch.ones(T, K), ids_TK, logits_TE)], n, z, scoring=scoring)
    loss.backward()
    zero_grad = logits_TE.grad[:, n:].sum().item()
    above = zero_share > 2 * z / (n + 2 * z)
    assert (zero_grad > 0) == above  # descent subtracts the gradient: zero logits go down when above target

    def p_zero(logits):
        s = logits.softmax(-1) if scoring == "softmax" else logits.sigmoid() / logits.sigmoid().sum(-1, keepdim=True)
        return s[:, n:].sum(-1).mean().item()

    stepped = (logits_TE - 0.5 * logits_TE.grad).detach()
    assert (p_zero(stepped) < p_zero(logits_TE.detach())) == above


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_group_aux_loss_gradient_flows_through_logits_only(scoring):
    """f is a count of the chosen ids (a constant); P carries the gradient. Checked against the formula with f
    written in as numbers."""
    routing = routing_of(LAYER_A, LAYER_B, requires_grad=True)
    for r in routing:
        r.weights_TK.requires_grad_(True)
    loss = ga_counted(routing, N, Z, scoring=scoring)
    grads = torch.autograd.grad(loss, [t for r in routing for t in (r.weights_TK, r.logits_TE)], allow_unused=True)
    assert grads[0] is None and grads[2] is None  # the combine weights do not enter the loss
    assert all(g.abs().sum() > 0 for g in (grads[1], grads[3]))

    # Same loss with f as Python floats: identical gradient, so f contributes none.
    ref = 0.0
    fresh = [torch.tensor(layer[0], requires_grad=True) for layer in (LAYER_A, LAYER_B)]
    for logits_TE, (_, ids) in zip(fresh, (LAYER_A, LAYER_B)):
        f_z = sum(e >= N for row in ids for e in row) / (len(ids) * K)
        probs = logits_TE.softmax(-1) if scoring == "softmax" else (
            logits_TE.sigmoid() / logits_TE.sigmoid().sum(-1, keepdim=True))
        p_e, p_z = probs[:, :N].sum(-1).mean(), probs[:, N:].sum(-1).mean()
        ref = ref + 0.1 * (N + 2 * Z) * ((1 - f_z) * p_e / N + f_z * p_z / (2 * Z))
    ref_grads = torch.autograd.grad(ref, fresh)
    torch.testing.assert_close(grads[1], ref_grads[0])
    torch.testing.assert_close(grads[3], ref_grads[1])


# ----------------------------------------------------------------------------------------------
# Group Auxiliary Loss: the data-parallel all_reduce hook


def recording_all_reduce(log):
    """What a rank hands to all_reduce (its own contributions), recorded in call order; returns them as is."""
    def all_reduce(t):
        log.append(t.detach().clone())
        return t.detach().clone()
    return all_reduce


def two_rank_all_reduce(other_contributions):
    """A fake 2-rank all_reduce: adds the other rank's contribution to the same call (same call order)."""
    queue = list(other_contributions)

    def all_reduce(t):
        return t.detach() + queue.pop(0)
    return all_reduce


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_group_aux_loss_all_reduce_averages_to_the_union_loss(scoring):
    """Rank A holds LAYER_A/LAYER_B routing for 3 tokens, rank B another 5 tokens (its own routing, one of them
    padding). Mean of the two ranks' losses == one-process loss over the union; and the gradients each rank
    gets, averaged (what DP does), equal the union's."""
    torch.manual_seed(1)
    rank_a = [list(LAYER_A), list(LAYER_B)]
    rank_b = [[torch.randn(5, N + Z).tolist(), torch.randint(0, N + Z, (5, K)).tolist()] for _ in range(2)]
    rank_b[1][1][0] = [4, 5]  # make sure the two layers differ in zero share on B
    valid_a, valid_b = torch.ones(3, dtype=torch.bool), torch.tensor([True, True, False, True, True])

    # Each rank's own contributions (what it would hand to all_reduce), from its own routing only.
    log_a, log_b = [], []
    ga_counted(routing_of(*rank_a), N, Z, valid_a, scoring, all_reduce=recording_all_reduce(log_a))
    ga_counted(routing_of(*rank_b), N, Z, valid_b, scoring, all_reduce=recording_all_reduce(log_b))
    assert len(log_a) == len(log_b) == 1  # one reduction: per layer [slots on E, slots on Z, tokens, 1]

    routing_a, routing_b = routing_of(*rank_a, requires_grad=True), routing_of(*rank_b, requires_grad=True)
    loss_a = ga_counted(routing_a, N, Z, valid_a, scoring, all_reduce=two_rank_all_reduce(log_b))
    loss_b = ga_counted(routing_b, N, Z, valid_b, scoring, all_reduce=two_rank_all_reduce(log_a))

    union_layers = [(la[0] + lb[0], la[1] + lb[1]) for la, lb in zip(rank_a, rank_b)]
    valid_u = torch.cat([valid_a, valid_b])
    routing_u = routing_of(*union_layers, requires_grad=True)
    loss_u = ga_counted(routing_u, N, Z, valid_u, scoring)
    assert loss_u.item() == pytest.approx(hand_ga(union_layers, N, Z, valid_u.tolist(), scoring), rel=1e-6)
    assert ((loss_a + loss_b) / 2).item() == pytest.approx(loss_u.item(), rel=1e-6)
    assert loss_a.item() != pytest.approx(loss_b.item(), rel=1e-3)  # the ranks really do see different data

    (loss_a / 2).backward()  # DP averages the ranks' gradients
    (loss_b / 2).backward()
    loss_u.backward()
    for ra, rb, ru in zip(routing_a, routing_b, routing_u):
        torch.testing.assert_close(ru.logits_TE.grad[:3], ra.logits_TE.grad)
        torch.testing.assert_close(ru.logits_TE.grad[3:], rb.logits_TE.grad)


# ----------------------------------------------------------------------------------------------
# Response cross-entropy


def ce_case():
    torch.manual_seed(2)
    B, T, V = 2, 6, 11
    logits = torch.randn(B, T, V)
    targets = torch.randint(0, V, (B, T))
    # Row 0: prompt positions 0-1, response 2-5. Row 1: prompt 0-2, response 3-4, padding 5.
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [0, 0, 0, 1, 1, 0]], dtype=torch.bool)
    return logits, targets, mask


def ce(logits, targets, mask, normalizer=None):
    """response_cross_entropy on the chunked head: logits as hidden states through an identity head, 3 tokens
    a chunk, so the chunking is exercised too."""
    logp = target_logprobs(logits, torch.eye(logits.shape[-1]), targets, chunk=3)
    return response_cross_entropy(logp, mask, normalizer)


def test_response_cross_entropy_matches_hand_computation():
    logits, targets, mask = ce_case()
    logp = logits.log_softmax(-1)
    terms = [-logp[b, t, targets[b, t]].item() for b in range(2) for t in range(6) if mask[b, t]]
    assert ce(logits, targets, mask).item() == pytest.approx(sum(terms) / len(terms), rel=1e-6)
    # An explicit normalizer (the global response-token count under accumulation) divides the sum.
    assert ce(logits, targets, mask, normalizer=25.0).item() == pytest.approx(sum(terms) / 25, rel=1e-6)


def test_response_cross_entropy_ignores_prompt_and_padding():
    logits, targets, mask = ce_case()
    base = ce(logits, targets, mask)
    changed = logits.clone()
    changed[~mask] = torch.randn(int((~mask).sum()), logits.shape[-1]) * 50
    other_targets = torch.where(mask, targets, (targets + 3) % logits.shape[-1])
    assert torch.equal(ce(changed, other_targets, mask), base)
    poked = logits.clone()
    poked[1, 4] += torch.randn(logits.shape[-1])
    assert ce(poked, targets, mask).item() != pytest.approx(base.item(), rel=1e-4)

    leaf = logits.clone().requires_grad_(True)
    ce(leaf, targets, mask).backward()
    assert leaf.grad[~mask].abs().sum() == 0 and (leaf.grad[mask].abs().sum(-1) > 0).all()


def test_chunked_head_equals_the_full_log_softmax_in_value_and_gradient():
    torch.manual_seed(3)
    hidden = torch.randn(2, 7, 5, requires_grad=True)
    weight = torch.randn(13, 5, requires_grad=True)
    targets = torch.randint(0, 13, (2, 7))
    for chunk in (1, 4, 100):
        for temperature in (1.0, 0.5):
            ref = (hidden @ weight.T / temperature).log_softmax(-1).gather(-1, targets[..., None]).squeeze(-1)
            got = target_logprobs(hidden, weight, targets, temperature, chunk=chunk)
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
            g_ref = torch.autograd.grad(ref.sum(), [hidden, weight])
            g_got = torch.autograd.grad(got.sum(), [hidden, weight])
            for a, b in zip(g_got, g_ref):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)



@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("frozen", ["none", "weight", "hidden"])
def test_chunked_head_gradient_matches_plain_autograd(dtype, frozen):
    """target_logprobs' hand-written backward (the last chunk's log-softmax kept, the others recomputed, the
    head's gradient accumulated in place) against autograd through the plain computation in the same dtype:
    chunks that do and do not divide the tokens, a frozen head (teacher-style) or frozen hidden states, and an
    upstream gradient that differs per token."""
    torch.manual_seed(4)
    hidden0, weight0 = torch.randn(3, 11, 16).to(dtype), (torch.randn(37, 16) * 0.3).to(dtype)
    targets = torch.randint(0, 37, (3, 11))
    upstream = torch.randn(3, 11)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for chunk in (1, 5, 33, 1000):
        for temperature in (1.0, 0.7):
            grads = []
            for plain in (True, False):
                hidden = hidden0.clone().requires_grad_(frozen != "hidden")
                weight = weight0.clone().requires_grad_(frozen != "weight")
                if plain:
                    logits = (hidden @ weight.T).float() / temperature
                    out = logits.log_softmax(-1).gather(-1, targets[..., None]).squeeze(-1)
                else:
                    out = target_logprobs(hidden, weight, targets, temperature, chunk=chunk)
                (out * upstream).sum().backward()
                grads.append((out.detach(), hidden.grad, weight.grad))
            (o_ref, h_ref, w_ref), (o, h, w) = grads
            torch.testing.assert_close(o, o_ref, **tol)
            for a, b in ((h, h_ref), (w, w_ref)):
                assert (a is None) == (b is None)
                if a is not None:
                    assert a.dtype == dtype
                    torch.testing.assert_close(a.float(), b.float(), **tol)

# ----------------------------------------------------------------------------------------------
# PPO-clipped loss and the reverse-KL advantage


def test_ppo_clip_loss_matches_hand_computation_with_clipping():
    eps = 0.2
    # (ratio, advantage, in mask, clipped?)  -min(r A, clip(r) A)
    cases = [
        (1.5, 1.0, True, True),    # r > 1 + eps, A > 0: clipped to 1.2 A
        (0.5, -1.0, True, True),   # r < 1 - eps, A < 0: clipped to 0.8 A
        (1.5, -1.0, True, False),  # r > 1 + eps, A < 0: unclipped (pessimistic side)
        (0.5, 1.0, True, False),   # r < 1 - eps, A > 0: unclipped
        (1.1, 2.0, True, False),   # inside the band
        (0.9, -0.5, True, False),  # inside the band
        (3.0, 7.0, False, None),   # masked: ignored whatever it is
    ]
    old = torch.tensor([-1.0, -2.0, -0.5, -3.0, -1.5, -0.7, -2.2])
    ratio = torch.tensor([c[0] for c in cases])
    new = (old + ratio.log()).requires_grad_(True)
    adv = torch.tensor([c[1] for c in cases])
    mask = torch.tensor([c[2] for c in cases], dtype=torch.float32)

    def hand(r, a):
        return -min(r * a, min(max(r, 1 - eps), 1 + eps) * a)

    expected = sum(hand(r, a) for r, a, m, _ in cases if m) / 6
    loss = ppo_clip_loss(new, old, adv, mask, clip=eps, aggregation="token")
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss3 = ppo_clip_loss(new, old, adv, mask, clip=eps, normalizer=3.0, aggregation="token")
    assert loss3.item() == pytest.approx(expected * 6 / 3, rel=1e-5)
    loss.backward()
    for i, (r, a, m, clipped) in enumerate(cases):
        if not m or clipped:
            assert new.grad[i].item() == 0.0, i
        else:  # d/d new_logp of -r A = -r A, over the 6 masked tokens
            assert new.grad[i].item() == pytest.approx(-r * a / 6, rel=1e-5), i


def test_reverse_kl_advantage_is_detached_teacher_minus_student():
    teacher = torch.tensor([-1.0, -0.2, -3.0], requires_grad=True)
    student = torch.tensor([-0.5, -0.9, -2.0], requires_grad=True)
    adv = reverse_kl_advantage(teacher, student)
    assert not adv.requires_grad and adv.grad_fn is None
    assert torch.equal(adv, (teacher - student).detach())
    torch.testing.assert_close(adv, torch.tensor([-0.5, 0.7, -1.0]))


# ----------------------------------------------------------------------------------------------
# Full-vocabulary reverse KL


def test_full_reverse_kl_matches_torch_distributions():
    torch.manual_seed(3)
    s, t = torch.randn(2, 5, 13), torch.randn(2, 5, 13)
    mask = torch.tensor([[1, 1, 0, 1, 0], [0, 1, 1, 1, 1]], dtype=torch.float32)
    kl = torch.distributions.kl_divergence(torch.distributions.Categorical(logits=s),
                                           torch.distributions.Categorical(logits=t))  # KL(student || teacher)
    expected = (kl * mask).sum() / mask.sum()
    torch.testing.assert_close(full_reverse_kl(s, t, mask, aggregation="token"), expected)
    # Explicit sum for one position.
    ps, pt = s[0, 0].softmax(-1), t[0, 0].softmax(-1)
    one = sum(ps[v] * (ps[v].log() - pt[v].log()) for v in range(13))
    torch.testing.assert_close(full_reverse_kl(s[:1, :1], t[:1, :1], torch.ones(1, 1), aggregation="token"), one)
    assert full_reverse_kl(s, t, mask, normalizer=2.0, aggregation="token").item() == pytest.approx(
        (kl * mask).sum().item() / 2, rel=1e-5)
    # It is the reverse KL, not the forward one.
    forward = torch.distributions.kl_divergence(torch.distributions.Categorical(logits=t),
                                                torch.distributions.Categorical(logits=s))
    assert full_reverse_kl(s, t, mask, aggregation="token").item() != pytest.approx(
        ((forward * mask).sum() / mask.sum()).item(), rel=1e-3)


def test_full_reverse_kl_zero_when_equal():
    torch.manual_seed(4)
    s = torch.randn(3, 4, 9)
    assert full_reverse_kl(s, s.clone(), torch.ones(3, 4), aggregation="token").abs().item() < 1e-6
    # a constant shift is the same p
    assert full_reverse_kl(s, s + 5.0, torch.ones(3, 4), aggregation="token").abs().item() < 1e-5


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**31 - 1), st.floats(0.1, 20.0))
def test_full_reverse_kl_is_non_negative(seed, scale):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(2, 3, 7, generator=g) * scale
    t = torch.randn(2, 3, 7, generator=g) * scale
    mask = (torch.rand(2, 3, generator=g) > 0.3).float()
    assert full_reverse_kl(s, t, mask, aggregation="token").item() >= -1e-6


# ----------------------------------------------------------------------------------------------
# Group Auxiliary Loss: which slots f counts (the authors': a fresh top-K of the normalised scores)


def router_of(model_type: str, bias_on_zero: float = 0.0, seed: int = 0) -> Router:
    hf = tiny_hf_config(model_type).to_dict()
    n = next(hf[k] for k in ("num_experts", "num_local_experts", "n_routed_experts") if hf.get(k))
    hf["zce_nums"], hf["zce_types"] = [n // 2], ["zero"]
    cfg = ModelConfig.from_hf_config(hf)
    torch.manual_seed(seed)
    router = Router(cfg)
    torch.nn.init.normal_(router.weight, std=0.5)
    if cfg.router_scoring == "sigmoid":
        router.e_score_correction_bias[cfg.num_experts:] = bias_on_zero
    return router


def test_scores_count_equals_routing_for_softmax_routers():
    router = router_of("qwen3_moe")
    x = torch.randn(40, router.weight.shape[1])
    r = router(x)
    assert torch.equal(group_aux_loss([r], router.num_experts, router.weight.shape[0] - router.num_experts),
                       ga_counted([r], router.num_experts, router.weight.shape[0] - router.num_experts))


def test_glm_scores_count_leaves_out_the_correction_bias():
    """A bias that pushes selection onto the zero experts: the routing uses many zero slots, while f (the authors'
    count) is taken on the unbiased normalised sigmoid scores, computed here by hand."""
    router = router_of("glm4_moe_lite", bias_on_zero=5.0)
    n = router.num_experts
    z = router.weight.shape[0] - n
    x = torch.randn(40, router.weight.shape[1])
    r = router(x)
    routed_zero = float((r.ids_TK >= n).float().mean())
    fresh = (r.logits_TE.sigmoid() / r.logits_TE.sigmoid().sum(-1, keepdim=True)).topk(r.ids_TK.shape[1]).indices
    scores_zero = float((fresh >= n).float().mean())
    assert routed_zero > scores_zero + 0.2  # the bias really changed the routing
    (real_s, zero_s, *_), = group_shares([r], n, None, "sigmoid", "scores")
    (real_r, zero_r, *_), = group_shares([r], n, None, "sigmoid", "routing")
    assert float(zero_s) / float(real_s + zero_s) == pytest.approx(scores_zero)
    assert float(zero_r) / float(real_r + zero_r) == pytest.approx(routed_zero)
    # and the loss itself is the formula on the scores' f
    f_z = scores_zero
    probs = r.logits_TE.sigmoid() / r.logits_TE.sigmoid().sum(-1, keepdim=True)
    p_z, p_e = float(probs[:, n:].sum(-1).mean()), float(probs[:, :n].sum(-1).mean())
    expected = 0.1 * (n + 2 * z) * ((1 - f_z) * p_e / n + f_z * p_z / (2 * z))
    assert group_aux_loss([r], n, z, scoring="sigmoid").item() == pytest.approx(expected, rel=1e-5)


def test_sequence_aggregation_is_the_mean_of_each_answers_mean():
    """The authors' OPD aggregation: [1, 2, 3] and [10] -> (2 + 10) / 2 = 6, where the token mean is 16 / 4 = 4;
    a row without answer tokens counts for nothing."""
    per_token = torch.tensor([[1.0, 2.0, 3.0], [10.0, 99.0, 99.0], [7.0, 7.0, 7.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]])
    assert aggregate(per_token, mask, "sequence").item() == pytest.approx(6.0)
    assert aggregate(per_token, mask, "token").item() == pytest.approx(4.0)
    assert aggregate(per_token, mask, "sequence", normalizer=4.0).item() == pytest.approx(3.0)
    with pytest.raises(ValueError, match="aggregation"):
        aggregate(per_token, mask, "batch")
