"""The static-shape decode (generate(compile=True): zeda/generation.py:forward_step with input_pos, the model's
static-shape mode), on tiny models.

Most tests run forward_step *eagerly* in that mode (generate's compiled path with torch.compile swapped for the
plain function), which checks everything the compiled path computes -- the KV cache written at a tensor position,
attention over the full cache width, the "sorted" expert backend with dropped slots past every group -- in a
second or so. One test really compiles (torch.compile, Inductor's C++ backend; ~30-40 s on a 2-core CPU), Qwen3's
converted model, with zero experts. Also bench/generate.py's identical-token check.
"""

import pytest
import torch

import zeda
from zeda import generation
from zeda.baselines import set_routing
from zeda.errors import UsageError
from zeda.generation import generate
from zeda.moe import GroupedExperts, routed_experts_forward
from zeda.sampling import SamplingParams
from zeda_toy.tiny import make_tiny_checkpoint

ARCHS = ["qwen3_moe", "glm4_moe_lite"]
PROMPTS = [[5, 17, 3], [9, 1, 44, 60, 2, 7, 31], [70], [12, 8, 90, 33, 4], [6, 6]]  # left padding
GREEDY = SamplingParams(temperature=0.0, max_new_tokens=10)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    from zeda.conversion import convert_checkpoint

    root = tmp_path_factory.mktemp("decode")
    for arch in ARCHS:
        make_tiny_checkpoint(root / arch, arch, seed=7)
        N = zeda.ModelConfig.from_hf_config(root / arch).num_experts
        convert_checkpoint(root / arch, root / f"{arch}-zeda", num_zero=N // 2, progress=False)
    return root


@pytest.fixture
def uncompiled(monkeypatch):
    """generate(compile=True) running forward_step without torch.compile: the same static-shape code, eagerly."""
    monkeypatch.setattr(generation, "compiled_forward_step", lambda: generation.forward_step)


def assert_same_generation(a, b):
    assert a.tokens == b.tokens
    assert a.real_slots == b.real_slots and a.zero_slots == b.zero_slots
    assert a.stats == b.stats and a.attended_keys == b.attended_keys
    assert a.finished == b.finished and a.new_tokens == b.new_tokens
    torch.testing.assert_close(torch.tensor([x for row in a.logprobs for x in row]),
                               torch.tensor([x for row in b.logprobs for x in row]), atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("converted", [False, True], ids=["static", "converted"])
def test_static_shape_step_equals_eager_generate(checkpoints, uncompiled, arch, converted):
    model = zeda.load_model(checkpoints / (f"{arch}-zeda" if converted else arch))
    eager = generate(model, PROMPTS, GREEDY, eos_ids=[])
    static = generate(model, PROMPTS, GREEDY, eos_ids=[], compile=True)
    assert_same_generation(static, eager)
    if converted:
        assert sum(map(sum, static.zero_slots)) > 0  # zero experts were really chosen


@pytest.mark.parametrize("arch", ARCHS)
def test_static_shape_step_with_eos_sampling_and_skipped_slots(checkpoints, uncompiled, arch):
    """Rows that stop early (their mask bit off, no expert rows), per-row seeds, and a training-free rule that
    skips slots (id E): still the eager engine's tokens and statistics."""
    model = zeda.load_model(checkpoints / f"{arch}-zeda")
    free = generate(model, PROMPTS, GREEDY, eos_ids=[])
    eos = {tok for row in free.tokens for tok in row[:2]}  # tokens the model really produces: rows stop early
    params = SamplingParams(temperature=0.8, top_k=20, max_new_tokens=12)
    for routing, bias in (("native", 0.0), ("topk:1", 0.0), ("native", 1.0)):
        set_routing(model, routing, bias)
        eager = generate(model, PROMPTS, params, eos_ids=eos, seed=[1, 2, 3, 4, 5])
        static = generate(model, PROMPTS, params, eos_ids=eos, seed=[1, 2, 3, 4, 5], compile=True)
        assert_same_generation(static, eager)
        assert any(eager.finished) and min(map(len, eager.tokens)) < params.max_new_tokens
    set_routing(model)


def test_sorted_experts_equal_the_dispatcher_path():
    """The "sorted" backend against the loop reference (nonzero dispatch) on random routing with zero experts and
    dropped padding tokens; the result of dropped slots is exactly zero whatever their rows held."""
    g = torch.Generator().manual_seed(0)
    T, K, N, Z, H, I = 9, 3, 5, 3, 8, 6
    experts = GroupedExperts(N, H, I)
    with torch.no_grad():
        for p in experts.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    x_TH = torch.randn(T, H, generator=g)
    ids_TK = torch.stack([torch.randperm(N + Z, generator=g)[:K] for _ in range(T)])
    weights_TK = torch.rand(T, K, generator=g)
    keep_TK = (ids_TK < N) & (torch.arange(T) % 4 != 0)[:, None]  # every 4th token is padding
    with torch.no_grad():
        want = routed_experts_forward(x_TH, weights_TK, ids_TK, experts.gate_up_proj, experts.down_proj, "loop",
                                      keep_TK)
        got = experts(x_TH, weights_TK, ids_TK, keep_TK, backend="sorted")
        none = experts(x_TH, weights_TK, ids_TK, torch.zeros_like(keep_TK), backend="sorted")
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert torch.equal(none, torch.zeros_like(none))
    assert (got[torch.arange(T) % 4 == 0] == 0).all()


def test_static_shape_forward_equals_the_in_order_forward(checkpoints):
    """CausalLM.forward's two cache modes on the same left-padded batch, prompts then one token: written in order
    (the cache sliced to what is filled) and written at input_pos (the cache's whole width, the sorted experts)
    give the same logits and routing; input_pos without a cache, or the sorted backend under expert parallelism,
    is refused by name."""
    from zeda.generation import left_pad
    from zeda.model import KVCache
    from zeda.moe import LocalDispatcher

    model = zeda.load_model(checkpoints / "glm4_moe_lite-zeda")
    ids_BP, mask_BP = left_pad(PROMPTS, pad_id=0)
    B, P = ids_BP.shape
    W = P + 5
    mask_BW = torch.zeros(B, W, dtype=torch.bool)
    mask_BW[:, :P] = mask_BP
    mask_BW[:, P] = torch.tensor([True, False, True, True, False])  # two rows feed padding (finished rows)
    next_B1 = torch.tensor([[3], [0], [8], [21], [0]])
    in_order, static = (KVCache(model.config, B, W, torch.float32, "cpu") for _ in range(2))
    with torch.no_grad():
        model(ids_BP, attention_mask=mask_BP, cache=in_order)
        model(ids_BP, attention_mask=mask_BW, cache=static, input_pos=torch.arange(P))
        want_routing, got_routing = [], []
        want = model(next_B1, attention_mask=mask_BW[:, :P + 1], cache=in_order, routing=want_routing)
        got = model(next_B1, attention_mask=mask_BW, cache=static, input_pos=torch.tensor([P]), routing=got_routing)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert all(torch.equal(a.ids_TK, b.ids_TK) for a, b in zip(got_routing, want_routing))
    assert sum(int((r.ids_TK >= model.config.num_experts).sum()) for r in got_routing) > 0  # zero slots chosen
    for layer in range(model.config.num_hidden_layers):  # the same columns written (up to attention's rounding)
        torch.testing.assert_close(static.k[layer][:, :, :P + 1], in_order.k[layer][:, :, :P + 1], atol=1e-5, rtol=0)
        assert not static.k[layer][:, :, P + 1:].any()
    assert in_order.length == P + 1 and static.length == 0  # the static mode leaves `length` alone
    with pytest.raises(UsageError, match="input_pos needs a cache"):
        model(next_B1, input_pos=torch.tensor([P]))
    experts = model.model.layers[-1].mlp.experts
    experts.dispatcher = LocalDispatcher()
    try:
        with pytest.raises(UsageError, match="sorted.*expert parallelism"):
            experts(torch.zeros(2, model.config.hidden_size), torch.ones(2, 1), torch.zeros(2, 1, dtype=torch.long),
                    torch.ones(2, 1, dtype=torch.bool), backend="sorted")
    finally:
        experts.dispatcher = None


@pytest.mark.parametrize("arch", ["qwen3_moe"])
def test_compiled_decode_gives_the_eager_tokens(checkpoints, arch):
    """torch.compile for real, on the converted model with zero experts. Qwen3 only, to keep this file near a
    minute: compiling GLM's step takes ~70 s here; the same code runs uncompiled for both architectures above,
    and bench/generate.py checks the compiled tokens of both shipped teachers against transformers'."""
    torch._dynamo.reset()
    model = zeda.load_model(checkpoints / f"{arch}-zeda")
    eager = generate(model, PROMPTS, GREEDY, eos_ids=[])
    compiled = generate(model, PROMPTS, GREEDY, eos_ids=[], compile=True)
    assert compiled.tokens == eager.tokens
    assert compiled.real_slots == eager.real_slots and compiled.stats == eager.stats
    assert sum(map(sum, compiled.zero_slots)) > 0


def test_stop_check_every_k_steps_changes_nothing(checkpoints):
    model = zeda.load_model(checkpoints / "qwen3_moe-zeda")
    free = generate(model, PROMPTS, GREEDY, eos_ids=[])
    eos = set(row[1] for row in free.tokens)  # every row stops by step 1: the loop may end long before 10
    every = generate(model, PROMPTS, GREEDY, eos_ids=eos)
    for k in (3, 7):
        assert_same_generation(generate(model, PROMPTS, GREEDY, eos_ids=eos, stop_check_every=k), every)
    with pytest.raises(UsageError):
        generate(model, PROMPTS, GREEDY, eos_ids=eos, stop_check_every=0)


def test_compare_rows_detects_a_difference():
    from bench.generate import compare_rows, up_to_eos

    eos = {3}
    assert up_to_eos([5, 3, 7, 7], eos) == [5, 3] and up_to_eos([5, 6], eos) == [5, 6]
    assert compare_rows([[5, 3], [1, 2]], [[5, 3, 0, 0], [1, 2]], eos)  # padding after EOS does not count
    assert not compare_rows([[5, 3], [1, 2]], [[5, 3], [1, 4]], eos)  # one token differs
    assert not compare_rows([[5, 3], [1, 2]], [[5, 6, 3], [1, 2]], eos)  # stops at a different step
    assert not compare_rows([[5, 3]], [[5, 3], [1, 2]], eos)  # a row missing
    assert not compare_rows([[5]], [[5, 3]], eos)  # theirs stopped, ours was cut
