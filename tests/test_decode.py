"""The static-shape decode step (zeda/generation.py:decode_step) and generate(compile=True), on tiny models.

Most tests run decode_step *eagerly* (generate's compiled path with torch.compile swapped for the plain function),
which checks everything the compiled path computes -- the static cache written at a tensor position, attention
over the full cache width, the sorted grouped experts with dropped slots past every group -- in a second or
so. One test really compiles (torch.compile, Inductor's C++ backend; ~30-40 s on a 2-core CPU), Qwen3's
converted model, with zero experts. Also bench/generate.py's identical-token check.
"""

import pytest
import torch

import zeda
from zeda import generation
from zeda.baselines import set_routing
from zeda.errors import UsageError
from zeda.generation import SamplingParams, generate, sorted_routed_experts
from zeda.moe import GroupedExperts, routed_experts_forward
from zeda.tiny import make_tiny_checkpoint

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
    """generate(compile=True) running decode_step without torch.compile: the same static-shape code, eagerly."""
    monkeypatch.setattr(generation, "compiled_decode_step", lambda: generation.decode_step)


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
    """sorted_routed_experts against routed_experts_forward (nonzero dispatch, loop backend) on random routing with
    zero experts and dropped padding tokens; the result of dropped slots is exactly zero whatever their rows held."""
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
        want = routed_experts_forward(x_TH, weights_TK, ids_TK, experts.gate_proj, experts.up_proj,
                                      experts.down_proj, "loop", keep_TK)
        got = sorted_routed_experts(x_TH, weights_TK, ids_TK, keep_TK, experts)
        none = sorted_routed_experts(x_TH, weights_TK, ids_TK, torch.zeros_like(keep_TK), experts)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert torch.equal(none, torch.zeros_like(none))
    assert (got[torch.arange(T) % 4 == 0] == 0).all()


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
