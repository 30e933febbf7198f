"""The naive reference generator that the engine (zeda/generation.py: generate() and the Decoder) is tested
against: one prompt, no KV cache, the whole sequence recomputed by a plain forward at every step, host syncs
wherever convenient. It shares only sampling (zeda/sampling.py) with the engine, so that with the same seed both
draw the same tokens; everything else -- the cache, left padding, masks, the step function, the statistics'
accumulation -- is what it checks."""

from __future__ import annotations

import time

import torch

from zeda.flops import attended_keys, routing_stats
from zeda.generation import Generation, check_prompts
from zeda.model import CausalLM
from zeda.sampling import SamplingParams, make_generator, sample


@torch.no_grad()
def generate_naive(model: CausalLM, prompt: list[int], params: SamplingParams, eos_ids: list[int] | set[int],
                   seed: int | None = None) -> Generation:
    """The reference: one prompt, no cache, the whole sequence recomputed at every step (host syncs freely).

    Draws from the generator exactly as generate() does for a batch of one, so with the same seed both sample
    the same tokens. stats/attended_keys come from the last forward, which covers every processed token."""
    cfg = model.config
    check_prompts([prompt], params.max_new_tokens, cfg.max_position_embeddings)
    t0 = time.perf_counter()
    device = model.lm_head.weight.device
    generator = make_generator(seed, device)
    ids, tokens, logprobs, real, zero, finished = list(prompt), [], [], [], [], False
    slots = cfg.num_moe_layers * cfg.num_experts_per_tok
    for _ in range(params.max_new_tokens):
        routing = []
        logits_V = model(torch.tensor([ids], device=device), routing=routing)[0, -1]
        # the last position's slots, each MoE layer's ids_TK row of it
        real_slots = sum(int((r.ids_TK[-1] < cfg.num_experts).sum()) for r in routing)
        tok, logp = sample(logits_V[None], params, generator)
        tokens.append(int(tok))
        logprobs.append(float(logp))
        real.append(real_slots)
        zero.append(slots - real_slots)
        if tokens[-1] in eos_ids:
            finished = True
            break
        ids.append(tokens[-1])
    n = len(prompt) + len(tokens) - 1  # tokens the last forward processed: every token generation processed
    stats = routing_stats(routing, cfg.num_experts)
    return Generation([tokens], [logprobs], [finished], [real], [zero], stats, attended_keys(num_tokens=n),
                      len(prompt), len(tokens), time.perf_counter() - t0)
