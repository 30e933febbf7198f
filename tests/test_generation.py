"""The generation engine (zeda/generation.py) on tiny random checkpoints of both architectures.

The fast engine (left padding, static KV cache, one decode step per token) is checked against the naive
reference that recomputes the whole sequence without a cache (tests/reference_generation.py), and against each
prompt generated alone; sampling (zeda/sampling.py) against its own definition; the routing statistics against a
plain forward over the same tokens; token_logprobs (zeda/model.py) against a full forward's logits.
"""


import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import zeda
from zeda.flops import attended_keys, flop_report, merge_stats, routing_stats
from zeda.generation import generate, left_pad
from zeda.model import token_logprobs
from zeda.sampling import SamplingParams, filter_logits, sample
from zeda_toy.tiny import make_tiny_checkpoint

from reference_generation import generate_naive  # tests/reference_generation.py: no cache, recomputed each step

ARCHS = ["qwen3_moe", "glm4_moe_lite"]
PROMPTS = [[5, 17, 3], [9, 1, 44, 60, 2, 7, 31], [70], [12, 8, 90, 33, 4]]  # different lengths: left padding
GREEDY = SamplingParams(temperature=0.0, max_new_tokens=8)


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("generation")
    for arch in ARCHS:
        make_tiny_checkpoint(root / arch, arch, seed=7)
    return root


@pytest.fixture(scope="session", params=ARCHS)
def model(request, checkpoints):
    return zeda.load_model(checkpoints / request.param)


@pytest.fixture(scope="session", params=ARCHS)
def converted(request, checkpoints):
    """The tiny checkpoint converted with Z = N / 2 zero experts (the paper's ratio)."""
    from zeda.conversion import convert_checkpoint

    N = zeda.ModelConfig.from_hf_config(checkpoints / request.param).num_experts
    out = checkpoints / f"{request.param}-zeda"
    convert_checkpoint(checkpoints / request.param, out, num_zero=N // 2, progress=False)
    return zeda.load_model(out)


def full_logprobs(model, prompt, tokens, temperature=1.0):
    """log_softmax(logits / T) of one no-cache forward over prompt + tokens, at the generated tokens."""
    ids = torch.tensor([prompt + tokens])
    with torch.no_grad():
        logits = model(ids)[0, len(prompt) - 1: -1].float()
    return (logits / temperature).log_softmax(-1).gather(-1, torch.tensor(tokens)[:, None]).squeeze(-1)


# ---------------------------------------------------------------------------------------------------------------
# The engine against the naive reference.


def test_greedy_cache_equals_naive_and_alone(model):
    batch = generate(model, PROMPTS, GREEDY, eos_ids=[])
    for i, prompt in enumerate(PROMPTS):
        naive = generate_naive(model, prompt, GREEDY, eos_ids=[])
        alone = generate(model, [prompt], GREEDY, eos_ids=[])
        assert batch.tokens[i] == naive.tokens[0] == alone.tokens[0], i
        assert len(batch.tokens[i]) == GREEDY.max_new_tokens
        torch.testing.assert_close(torch.tensor(batch.logprobs[i]), torch.tensor(naive.logprobs[0]), atol=1e-5,
                                   rtol=0)
    assert batch.prompt_tokens == sum(map(len, PROMPTS))
    assert batch.new_tokens == len(PROMPTS) * GREEDY.max_new_tokens


def test_fixed_seed_reproduces_and_matches_naive(model):
    params = SamplingParams(temperature=1.0, max_new_tokens=8)
    a = generate(model, PROMPTS, params, eos_ids=[], seed=123)
    b = generate(model, PROMPTS, params, eos_ids=[], seed=123)
    assert a.tokens == b.tokens and a.logprobs == b.logprobs
    # Batch of one: the engine draws from the generator exactly as the naive reference does.
    one = generate(model, PROMPTS[:1], params, eos_ids=[], seed=5)
    assert one.tokens == generate_naive(model, PROMPTS[0], params, eos_ids=[], seed=5).tokens


def test_per_row_seeds_make_a_sample_independent_of_its_batch(model):
    """What data parallelism needs: a row with its own seed samples the same tokens whichever rows share its batch
    (and the batch of one equals the naive reference with that seed)."""
    params = SamplingParams(temperature=1.0, max_new_tokens=8)
    seeds = [11 + i for i in range(len(PROMPTS))]
    batch = generate(model, PROMPTS, params, eos_ids=[], seed=seeds)
    for i, prompt in enumerate(PROMPTS):
        alone = generate(model, [prompt], params, eos_ids=[], seed=[11 + i])
        assert batch.tokens[i] == alone.tokens[0], i
        assert alone.tokens == generate_naive(model, prompt, params, eos_ids=[], seed=11 + i).tokens
    shuffled = generate(model, PROMPTS[::-1], params, eos_ids=[], seed=seeds[::-1])
    assert shuffled.tokens[::-1] == batch.tokens


def test_different_seeds_differ(model):
    params = SamplingParams(temperature=1.0, max_new_tokens=8)
    a = generate(model, PROMPTS, params, eos_ids=[], seed=1)
    b = generate(model, PROMPTS, params, eos_ids=[], seed=2)
    assert a.tokens != b.tokens


def test_top_k_1_equals_greedy(model):
    greedy = generate(model, PROMPTS, GREEDY, eos_ids=[])
    top1 = generate(model, PROMPTS, SamplingParams(temperature=1.0, top_k=1, max_new_tokens=8), eos_ids=[], seed=3)
    assert top1.tokens == greedy.tokens
    torch.testing.assert_close(torch.tensor(top1.logprobs), torch.tensor(greedy.logprobs), atol=1e-6, rtol=0)


@pytest.mark.parametrize("params", [SamplingParams(temperature=1.0, max_new_tokens=6),
                                    SamplingParams(temperature=0.7, top_k=20, top_p=0.9, max_new_tokens=6),
                                    SamplingParams(temperature=0.0, max_new_tokens=6)])
def test_logprobs_equal_full_forward(model, params):
    """logprob = log_softmax(logits / T) at the token, before top-k/top-p truncation (T = 1 when greedy)."""
    gen = generate(model, PROMPTS, params, eos_ids=[], seed=11)
    T = params.temperature or 1.0
    for prompt, tokens, logprobs in zip(PROMPTS, gen.tokens, gen.logprobs):
        torch.testing.assert_close(torch.tensor(logprobs), full_logprobs(model, prompt, tokens, T), atol=1e-5,
                                   rtol=0)


def test_streaming_callback_sees_every_token(model):
    seen = {}
    gen = generate(model, PROMPTS, GREEDY, eos_ids=[], on_token=lambda row, tok: seen.setdefault(row, []).append(tok))
    assert [seen[i] for i in range(len(PROMPTS))] == gen.tokens


# ---------------------------------------------------------------------------------------------------------------
# Stopping.


def test_eos_stops_a_row_and_nothing_follows(model):
    free = generate(model, PROMPTS, GREEDY, eos_ids=[])
    row0 = free.tokens[0]
    # The EOS id is a token greedy really produces: the first one at step >= 2 not seen earlier in row 0.
    step = next((s for s in range(2, len(row0)) if row0[s] not in row0[:s]), 0)
    eos = row0[step]
    seen = []
    gen = generate(model, PROMPTS, SamplingParams(temperature=0.0, max_new_tokens=20), eos_ids={eos},
                   on_token=lambda row, tok: seen.append(row))
    assert gen.tokens[0] == row0[:step + 1] and gen.finished[0]
    for i, toks in enumerate(gen.tokens):  # every row stops at its first EOS, or runs to max_new_tokens
        assert gen.finished[i] == (eos in toks)
        assert (toks.index(eos) + 1 if eos in toks else 20) == len(toks)
        n = min(len(toks), GREEDY.max_new_tokens)
        assert toks[:n] == free.tokens[i][:n]  # EOS changes nothing before it
        assert len(gen.logprobs[i]) == len(gen.real_slots[i]) == len(gen.zero_slots[i]) == len(toks)
    assert gen.new_tokens == sum(map(len, gen.tokens)) == len(seen)


def test_truncation_flags(model):
    gen = generate(model, PROMPTS, SamplingParams(temperature=1.0, max_new_tokens=3), eos_ids=[], seed=0)
    assert gen.finished == [False] * len(PROMPTS)
    assert [len(t) for t in gen.tokens] == [3] * len(PROMPTS)
    one = generate(model, PROMPTS[:1], SamplingParams(temperature=0.0, max_new_tokens=1), eos_ids=[])
    assert len(one.tokens[0]) == 1 and one.finished == [False]


# ---------------------------------------------------------------------------------------------------------------
# Routing statistics.


def test_slots_per_token_sum_to_k_times_moe_layers(model):
    cfg = model.config
    gen = generate(model, PROMPTS, SamplingParams(temperature=1.0, max_new_tokens=5), eos_ids=[], seed=4)
    for real, zero in zip(gen.real_slots, gen.zero_slots):
        assert [r + z for r, z in zip(real, zero)] == [cfg.num_experts_per_tok * cfg.num_moe_layers] * len(real)
        assert zero == [0] * len(zero)  # a static model has no zero experts


def test_converted_model_routes_to_zero_experts(converted):
    cfg = converted.config
    assert cfg.num_zero_experts == cfg.num_experts // 2
    gen = generate(converted, PROMPTS, GREEDY, eos_ids=[])
    assert sum(map(sum, gen.zero_slots)) > 0
    assert all(r + z == cfg.num_experts_per_tok * cfg.num_moe_layers
               for real, zero in zip(gen.real_slots, gen.zero_slots) for r, z in zip(real, zero))
    # Batched stats (padding excluded) = the sum over each prompt alone = a plain forward over what was processed.
    merged, keys = [], 0
    for i, prompt in enumerate(PROMPTS):
        processed = prompt + gen.tokens[i][:-1]  # the last generated token is never fed back
        routing = []
        with torch.no_grad():
            converted(torch.tensor([processed]), routing=routing)
        merged = merge_stats(merged, routing_stats(routing, cfg.num_experts))
        keys += attended_keys(num_tokens=len(processed))
        # Per-token slots: the routing of the position whose logits produced the token.
        real_T = sum((r.ids_TK < cfg.num_experts).sum(-1) for r in routing)[len(prompt) - 1:]
        assert gen.real_slots[i] == real_T.tolist()
        naive = generate_naive(converted, prompt, GREEDY, eos_ids=[])
        assert naive.real_slots[0] == gen.real_slots[i] and naive.zero_slots[0] == gen.zero_slots[i]
    assert gen.stats == merged
    assert gen.attended_keys == keys
    assert gen.stats[0].num_tokens == gen.prompt_tokens + gen.new_tokens - len(PROMPTS)
    report = flop_report(cfg, gen.stats, gen.attended_keys)
    assert 0 < report["zero_expert_ratio"] < 1 and report["expert_flops_reduction"] > 0


def test_naive_stats_equal_engine_stats(converted):
    gen = generate(converted, PROMPTS[1:2], GREEDY, eos_ids=[])
    naive = generate_naive(converted, PROMPTS[1], GREEDY, eos_ids=[])
    assert gen.tokens == naive.tokens
    assert gen.stats == naive.stats and gen.attended_keys == naive.attended_keys


# ---------------------------------------------------------------------------------------------------------------
# Errors.


def test_prompt_too_long_names_the_prompt(model):
    max_pos = model.config.max_position_embeddings
    params = SamplingParams(temperature=0.0, max_new_tokens=max_pos - 4)
    with pytest.raises(ValueError, match=r"prompt 2 has 5 tokens.*at most 4"):
        generate(model, [[1], [2, 3], [1, 2, 3, 4, 5]], params, eos_ids=[])
    with pytest.raises(ValueError, match="prompt 0"):
        generate_naive(model, [1, 2, 3, 4, 5], params, eos_ids=[])


def test_empty_prompt_is_an_error(model):
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate(model, [[1, 2], []], GREEDY, eos_ids=[])
    with pytest.raises(ValueError, match="at least one prompt"):
        generate(model, [], GREEDY, eos_ids=[])


def test_sampling_params_validation():
    assert SamplingParams(temperature=0).greedy and not SamplingParams().greedy
    for bad in [{"temperature": -1}, {"top_p": 0.0}, {"top_p": 1.5}, {"top_k": -1}, {"max_new_tokens": 0}]:
        with pytest.raises(ValueError):
            SamplingParams(**bad)


# ---------------------------------------------------------------------------------------------------------------
# Scoring sequences.


def test_token_logprobs_matches_manual(model):
    ids, mask = left_pad(PROMPTS, pad_id=0)
    with torch.no_grad():
        got = token_logprobs(model, ids, mask)  # [B, P-1]
    assert got.shape == (len(PROMPTS), ids.shape[1] - 1)
    for i, prompt in enumerate(PROMPTS):
        n = len(prompt)
        with torch.no_grad():
            logits = model(torch.tensor([prompt]))[0, :-1].float()
        manual = torch.tensor([logits[t].log_softmax(-1)[prompt[t + 1]].item() for t in range(n - 1)])
        torch.testing.assert_close(got[i, ids.shape[1] - n:], manual, atol=1e-5, rtol=0)
        assert (got[i, : ids.shape[1] - n] == 0).all()  # padding (as target or as context) scores 0


def test_token_logprobs_has_gradients_and_routing(model):
    routing = []
    ids = torch.tensor([PROMPTS[1]])
    lp = token_logprobs(model, ids, routing=routing)
    lp.sum().backward()
    assert model.lm_head.weight.grad is not None and len(routing) == model.config.num_moe_layers
    model.zero_grad(set_to_none=True)


# ---------------------------------------------------------------------------------------------------------------
# Sampling on random logits (pure functions).

logit_rows = st.lists(st.floats(-8, 8, width=32), min_size=2, max_size=40, unique=True)


@settings(max_examples=60, deadline=None)
@given(logit_rows, st.integers(1, 45), st.floats(0.05, 1.0))
def test_filter_keeps_top_k_and_nucleus(row, k, p):
    logits = torch.tensor([row])
    kept = torch.isfinite(filter_logits(logits, top_k=k))[0]
    assert kept.sum() == min(k, len(row))
    assert logits[0][kept].min() >= logits[0][~kept].max() if (~kept).any() else True
    kept = torch.isfinite(filter_logits(logits, top_p=p))[0]
    probs = logits[0].softmax(-1)
    assert probs[~kept].max() <= probs[kept].min() if (~kept).any() else True  # a top-ranked prefix
    assert probs[kept].sum() >= p - 1e-5  # enough mass ...
    assert probs[kept].sum() - probs[kept].min() < p + 1e-5  # ... and the smallest such set


@settings(max_examples=30, deadline=None)
@given(logit_rows, st.integers(1, 5), st.floats(0.1, 0.9), st.integers(0, 2**31 - 1))
def test_sample_stays_inside_the_filtered_set(row, k, p, seed):
    logits = torch.tensor([row] * 16)
    params = SamplingParams(temperature=0.8, top_k=k, top_p=p)
    tokens, logprobs = sample(logits, params, torch.Generator().manual_seed(seed))
    kept = torch.isfinite(filter_logits(logits / 0.8, k, p))
    assert kept.gather(1, tokens[:, None]).all()
    torch.testing.assert_close(logprobs, (logits / 0.8).log_softmax(-1).gather(1, tokens[:, None]).squeeze(1))


def test_generation_config_end_tokens_stop_generation(tmp_path):
    """An end token that only generation_config.json names (Qwen3 and GLM list end-of-turn tokens there) ends the
    answer on every generation path; it used to run on to the length limit. A bad value names the file."""
    import json

    from zeda.config import ModelConfig
    from zeda.errors import ConfigError

    folder = tmp_path / "m"
    make_tiny_checkpoint(folder, "qwen3_moe", vocab_size=64, max_position_embeddings=128)
    params = SamplingParams(temperature=0.0, max_new_tokens=12)
    free = generate(zeda.load_model(folder), [[5, 6, 7]], params, eos_ids=[], pad_id=0).tokens[0]
    assert len(free) == 12
    stop = free[3]
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [stop], "temperature": 0.6}))
    cfg = ModelConfig.from_hf_config(folder)
    assert stop in cfg.eos_token_id
    assert "generation_config" not in json.dumps(cfg.to_hf_dict()) and cfg.to_hf_dict().get("eos_token_id") != [stop]
    stopped = generate(zeda.load_model(folder), [[5, 6, 7]], params, eos_ids=cfg.eos_token_id, pad_id=0).tokens[0]
    assert stopped == free[:free.index(stop) + 1]
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": "newline"}))
    with pytest.raises(ConfigError, match="generation_config.json: eos_token_id"):
        ModelConfig.from_hf_config(folder)


def test_sampling_defaults_come_from_generation_config_where_no_flag_is_given(tmp_path):
    """rollout.py, train_sft.py --teacher and serve.py: a flag the user gave wins; one not given takes the model
    folder's generation_config.json; without it the paper's rollout sampling. A bad value names the file."""
    import argparse
    import json

    from zeda.errors import ConfigError
    from zeda.sampling import ROLLOUT_SAMPLING, add_sampling_args, sampling_from_args

    p = argparse.ArgumentParser()
    add_sampling_args(p)
    (tmp_path / "generation_config.json").write_text(json.dumps({"temperature": 0.3, "top_k": 5, "eos_token_id": 2}))
    got = sampling_from_args(p.parse_args(["--top-k", "7"]), 16, model_dir=tmp_path)
    assert (got.temperature, got.top_p, got.top_k) == (0.3, ROLLOUT_SAMPLING["top_p"], 7)
    plain = sampling_from_args(p.parse_args([]), 16, model_dir=tmp_path / "nowhere")
    assert (plain.temperature, plain.top_p, plain.top_k) == tuple(ROLLOUT_SAMPLING.values())
    (tmp_path / "generation_config.json").write_text(json.dumps({"top_p": 1.5}))
    with pytest.raises(ConfigError, match="generation_config.json: top_p 1.5"):
        sampling_from_args(p.parse_args([]), 16, model_dir=tmp_path)
