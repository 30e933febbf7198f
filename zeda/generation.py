"""Generation: the one engine that SFT rollouts, on-policy distillation (docs/method.md §4-5) and serving share.

    gen = generate(model, prompts, SamplingParams(temperature=1.0, max_new_tokens=256), eos_ids={eos}, seed=0)
    gen.tokens[i], gen.logprobs[i], gen.finished[i]      # per prompt
    flop_report(model.config, gen.stats, gen.attended_keys)   # zero-expert ratio and expert FLOPs (docs/method.md §6)

How it works (gpt-fast / nanochat style):
- Prompts of different lengths are LEFT-padded into one batch, so every row writes its KV cache at the same column
  and the newest token is always the last column. The attention mask marks real tokens; the model derives
  RoPE positions from it, so a padded row sees exactly what it would see alone.
- One prefill over the prompts into a KVCache of prompt_len + max_new_tokens columns, then one decode step per
  token for all rows. Prefill and decode steps are the same call, forward_step: one model forward
  (CausalLM.forward, the one training uses) plus the routing statistics of the tokens it processed. A row that
  produced EOS keeps feeding `pad_id` with its mask bit off (its outputs are ignored and it stops counting); the
  loop ends when every row is done or after max_new_tokens.
- Sampling (zeda/sampling.py) runs on the device, from a torch.Generator seeded by `seed`: a fixed seed
  reproduces the samples exactly. Each row may bring its own SamplingParams (a list, one per prompt: what a
  server batching independent requests needs). With per-row seeds a row then samples exactly what it would
  alone; its max_new_tokens ends it like EOS does, and the cache is sized for the longest.
- The only host sync per decode step is the `all done?` check (marked `# host sync`), plus the token transfer
  when an `on_token` streaming callback is given. Routing statistics (per-token real/zero slots, per-expert
  counts, attended keys) are accumulated on the device and moved to the host once, after the loop; they are
  statistics only and never feed back into generation. The eager routed path syncs inside the dispatch
  (nonzero(): the number of real slots sets its shapes); generate(compile=True) runs each decode step through
  torch.compile(forward_step) in the model's static-shape mode instead (input_pos: the cache written at a
  column held in a device tensor, attention over its whole width, the "sorted" expert backend), with no sync,
  and stop_check_every=k makes the `all done?` check every k steps. Eager and compiled run the same loop.

The server's continuous batching (zeda/scheduler.py:Decoder) runs the same forward_step between its rows joining
and leaving. tests/reference_generation.py holds the naive generator (no cache, the whole sequence recomputed
at every step) that this engine is tested against.

Shape letters: B batch (prompts), P padded prompt length, M max new tokens, S keys, W cache width (P + M, or
rounded up when compiled), T tokens of a forward, K slots per token, L MoE layers, E router outputs (N real + Z
zero experts), V vocabulary.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch

from zeda.errors import UsageError
from zeda.flops import LayerStats, attended_keys, expert_counts, layer_stats
from zeda.model import CausalLM, KVCache
from zeda.sampling import SamplingParams, make_generator, sample


@dataclass
class Generation:
    tokens: list[list[int]]  # per prompt, the generated tokens (EOS included if produced, nothing after it)
    logprobs: list[list[float]]  # per token: log_softmax(logits / T) at the token (T = 1 for greedy), see sample()
    finished: list[bool]  # True: stopped at EOS; False: truncated at its max_new_tokens
    real_slots: list[list[int]]  # per token: real-expert slots, summed over MoE layers, of the step that produced it
    zero_slots: list[list[int]]  # same for zero-expert slots (real + zero = K x MoE layers)
    stats: list[LayerStats]  # per MoE layer, routing over every real token processed (prompts + fed tokens)
    attended_keys: int  # over the same tokens, for flop_report
    prompt_tokens: int
    new_tokens: int
    seconds: float
    prefill_seconds: float = 0.0  # of `seconds`, the prompt forward (the rest is decoding)
    # generate(record_routing=True): per prompt, int16 [L, prompt + new tokens - 1, K], the expert ids each token
    # the model processed (the prompt, then every generated token but the last, which is never fed) was routed to
    # in each MoE layer: what routing replay (train_opd.py --routing-replay) makes the training forward use
    routed_ids: list[torch.Tensor] | None = None


# ---------------------------------------------------------------------------------------------------------------
# Batching.


def check_prompts(prompts: list[list[int]], max_new_tokens: int | list[int], max_positions: int) -> None:
    """UsageError for no prompts, an empty prompt, or one that leaves no room for its max_new_tokens (one for all
    prompts, or one each)."""
    if not prompts:
        raise UsageError("generate() needs at least one prompt")
    limits = max_new_tokens if isinstance(max_new_tokens, list) else [max_new_tokens] * len(prompts)
    for i, (p, m) in enumerate(zip(prompts, limits)):
        if len(p) == 0:
            raise UsageError(f"prompt {i} is empty; every prompt needs at least one token")
        if len(p) > max_positions - m:
            raise UsageError(f"prompt {i} has {len(p)} tokens; with max_new_tokens={m} at most "
                             f"{max_positions - m} fit in max_position_embeddings={max_positions}")


def left_pad(prompts: list[list[int]], pad_id: int, device=None):
    """ids [B, P] with each prompt right-aligned after pad_id, and mask [B, P] (True = real token)."""
    P = max(len(p) for p in prompts)
    ids = [[pad_id] * (P - len(p)) + list(p) for p in prompts]
    mask = [[False] * (P - len(p)) + [True] * len(p) for p in prompts]
    return torch.tensor(ids, dtype=torch.long, device=device), torch.tensor(mask, dtype=torch.bool, device=device)


# ---------------------------------------------------------------------------------------------------------------
# The step: one model forward and the statistics of what it processed. The prefill (T = prompt length), every
# decode step (T = 1) and the server's scheduler call it; generate(compile=True) calls it through torch.compile.


class Step(NamedTuple):
    logits_BV: torch.Tensor  # of each row's last position: what the next token is sampled from
    real_B: torch.Tensor  # real-expert slots at that position, summed over MoE layers (statistics only)
    counts_LE: torch.Tensor  # [L, E + 1] slots per router output over the forward's real tokens (expert_counts)
    ids_LBTK: torch.Tensor | None  # every token's expert ids per MoE layer; None without MoE layers


def forward_step(model: CausalLM, ids_BT: torch.Tensor, mask_BS: torch.Tensor, cache: KVCache,
                 input_pos: torch.Tensor | None = None) -> Step:
    """T new tokens per row through the model into `cache`, and what the engine keeps of it (Step).

    mask_BS: the keys each row may attend to (CausalLM.forward's attention_mask), the new tokens' own columns
    included; a new token whose bit is off is padding (a finished row's feed), routed for shapes but computing no
    expert row and counting nothing. input_pos None: the cache is filled in order, mask_BS covers its filled
    columns plus the new ones, last. input_pos [T] (a device tensor): the static-shape mode (CausalLM.forward),
    mask_BS covers the cache's whole width. Only the last position goes through the LM head."""
    cfg = model.config
    T = ids_BT.shape[1]
    routing = []
    hidden_BTH = model(ids_BT, attention_mask=mask_BS, cache=cache, routing=routing, hidden_only=True,
                       input_pos=input_pos)
    logits_BV = model.lm_head(hidden_BTH[:, -1])
    valid_BT = mask_BS[:, -T:] if input_pos is None else mask_BS[:, input_pos]
    counts_LE = expert_counts(routing, valid_BT, cfg.num_router_outputs)
    if not routing:
        return Step(logits_BV, torch.zeros(ids_BT.shape[0], dtype=torch.long, device=ids_BT.device), counts_LE, None)
    B, K = ids_BT.shape[0], cfg.num_experts_per_tok
    ids_LBTK = torch.stack([r.ids_TK.reshape(B, T, K) for r in routing])
    real_B = (ids_LBTK[:, :, -1] < cfg.num_experts).sum(dim=(0, 2))
    return Step(logits_BV, real_B, counts_LE, ids_LBTK)


CACHE_WIDTH_MULTIPLE = 64  # the compiled path rounds its cache width up to this: fewer distinct graphs


def check_compilable(model: CausalLM) -> None:
    """UsageError for what the static-shape step does not cover: tensor or expert parallelism (collectives and a
    swapped dispatcher inside the step)."""
    if getattr(model, "tensor_parallel", 1) > 1:
        raise UsageError("generate(compile=True) does not support tensor parallelism")
    if any(block.is_moe and block.mlp.experts.dispatcher is not None for block in model.model.layers):
        raise UsageError("generate(compile=True) does not support expert parallelism")


_compiled_forward_step = None  # torch.compile(forward_step), made on first use (compiling is lazy anyway)


def compiled_forward_step():
    """torch.compile(forward_step) for the decode steps: static shapes (dynamic=False, one graph per batch size
    and cache width); on CUDA mode="reduce-overhead" adds CUDA graphs (gpt-fast), which has not been run here."""
    global _compiled_forward_step
    if _compiled_forward_step is None:
        mode = "reduce-overhead" if torch.cuda.is_available() else None
        _compiled_forward_step = torch.compile(forward_step, dynamic=False, mode=mode)
    return _compiled_forward_step


# ---------------------------------------------------------------------------------------------------------------
# The engine.


@torch.no_grad()
def generate(model: CausalLM, prompts: list[list[int]], params: SamplingParams | list[SamplingParams],
             eos_ids: list[int] | set[int], pad_id: int = 0, seed: int | list[int] | None = None,
             on_token: Callable[[int, int], None] | None = None,
             all_done: Callable[[bool], bool] | None = None, compile: bool = False,
             stop_check_every: int = 1, record_routing: bool = False) -> Generation:
    """Generate for a batch of prompts with a static KV cache (see the module docstring).

    params: one SamplingParams for every prompt, or a list with one per prompt (each row its own temperature,
    top-p, top-k and max_new_tokens). eos_ids: tokens that end a row (kept in its output). pad_id: what left
    padding and finished rows feed (it is masked out, so its value does not matter). seed: reproducible
    sampling; a list gives each row its own seed, so a row's sample does not depend on how the prompts were
    batched (data parallelism, a server's requests). on_token(row, token): called for each new token of each
    unfinished row as soon as it is sampled (streaming; one transfer a step). all_done(mine): whether every
    process is done, given whether this one is. Expert parallelism needs it: every rank of an all-to-all group
    must run the same number of forwards, so a finished rank keeps feeding padding.
    compile: run each decode step through torch.compile(forward_step) in the static-shape mode (no host sync;
    the prefill stays eager). The first call for a batch size and cache width compiles (tens of seconds on a CPU).
    stop_check_every: look at `all done?` (a host sync) only every that many steps. Results do not change: a
    finished row is masked and counts nothing, so the extra steps are wasted work only. Worth it where a sync
    stalls a queue of device work (a GPU); on a CPU the check is free and 1 is fastest.
    record_routing: keep every processed token's expert ids per MoE layer (Generation.routed_ids), kept on the
    device as int16 [L, B, P + M, K] during the loop.
    """
    cfg = model.config
    B = len(prompts)
    rows = params if isinstance(params, list) else [params] * B
    if len(rows) != B:
        raise UsageError(f"generate() got {len(rows)} SamplingParams for {B} prompts")
    if stop_check_every < 1:
        raise UsageError(f"stop_check_every must be >= 1, got {stop_check_every}")
    if compile:
        check_compilable(model)
    limits = [p.max_new_tokens for p in rows]
    check_prompts(prompts, limits, cfg.max_position_embeddings)
    t0 = time.perf_counter()
    device, dtype = model.lm_head.weight.device, model.compute_dtype
    N, K = cfg.num_experts, cfg.num_experts_per_tok
    M, P = max(limits), max(len(p) for p in prompts)
    # The compiled step is traced for one cache width: round it up so that batches of similar prompt lengths
    # share a graph (the extra columns stay masked).
    W = -(-(P + M) // CACHE_WIDTH_MULTIPLE) * CACHE_WIDTH_MULTIPLE if compile else P + M
    generator = make_generator(seed, device)
    eos_X = torch.tensor(sorted(set(eos_ids)), dtype=torch.long, device=device)
    limit_B = torch.tensor(limits, dtype=torch.long, device=device)

    ids_BP, prompt_mask_BP = left_pad(prompts, pad_id, device)
    mask_BW = torch.zeros(B, W, dtype=torch.bool, device=device)  # real keys; one more column per fed token
    mask_BW[:, :P] = prompt_mask_BP
    cache = KVCache(cfg, B, W, dtype, device, getattr(model, "tensor_parallel", 1))
    tokens_BM = torch.full((B, M), pad_id, dtype=torch.long, device=device)
    logprobs_BM = torch.zeros(B, M, dtype=torch.float32, device=device)
    real_BM = torch.zeros(B, M, dtype=torch.long, device=device)
    emitted_BM = torch.zeros(B, M, dtype=torch.bool, device=device)  # a real generated token at (row, step)
    stopped_B = torch.zeros(B, dtype=torch.bool, device=device)  # produced EOS
    done_B = torch.zeros(B, dtype=torch.bool, device=device)  # stopped, or at its own max_new_tokens

    step = forward_step(model, ids_BP, prompt_mask_BP, cache)  # the prefill (eager in both modes)
    prefill_seconds = time.perf_counter() - t0
    counts_LE = step.counts_LE
    routed_LBWK = None
    if record_routing and step.ids_LBTK is not None:  # int16: router outputs number in the hundreds
        routed_LBWK = torch.zeros(step.ids_LBTK.shape[0], B, W, K, dtype=torch.int16, device=device)
        routed_LBWK[:, :, :P] = step.ids_LBTK
    # Decode steps: eager, the cache filled in order and read up to what is filled; compiled, the static-shape
    # mode, the column to write held in a device tensor (changing it retraces nothing) and the whole width read.
    decode, input_pos_1 = ((compiled_forward_step(), torch.zeros(1, dtype=torch.long, device=device)) if compile
                           else (forward_step, None))
    for t in range(M):
        real_BM[:, t] = step.real_B  # statistics only: the real slots of the forward that produced this token
        next_B, logp_B = sample(step.logits_BV, params, generator)
        live_B = ~done_B
        tokens_BM[:, t] = torch.where(live_B, next_B, pad_id)
        logprobs_BM[:, t] = logp_B
        emitted_BM[:, t] = live_B
        stopped_B = stopped_B | (live_B & torch.isin(next_B, eos_X))
        done_B = stopped_B | (limit_B <= t + 1)
        if on_token is not None:
            for row, tok in enumerate(torch.where(live_B, next_B, -1).tolist()):  # host sync (streaming only)
                if tok >= 0:
                    on_token(row, tok)
        if t == M - 1:
            break
        if (t + 1) % stop_check_every == 0:
            finished = bool(done_B.all())  # host sync: the one per step (per stop_check_every steps)
            if all_done(finished) if all_done is not None else finished:
                break
        fed_B = torch.where(done_B, pad_id, next_B)  # a finished row feeds pad with its mask bit off
        mask_BW[:, P + t] = ~done_B  # this step's key, and what the statistics count: real tokens only
        if input_pos_1 is None:
            step = decode(model, fed_B[:, None], mask_BW[:, :P + t + 1], cache)
        else:
            input_pos_1.fill_(P + t)
            step = decode(model, fed_B[:, None], mask_BW, cache, input_pos_1)
        if routed_LBWK is not None:
            routed_LBWK[:, :, P + t] = step.ids_LBTK[:, :, 0]
        counts_LE = counts_LE + step.counts_LE

    # Everything to the host once.
    lengths = emitted_BM.sum(dim=1).tolist()  # host sync
    tokens, logprobs = tokens_BM.tolist(), logprobs_BM.tolist()
    real = real_BM.tolist()
    slots = cfg.num_moe_layers * K  # every routed slot of a token is real or zero (or skipped, and counted zero)
    num_tokens = int(mask_BW.sum())  # prompts + fed tokens (the last token of a row is never fed)
    routed_ids = None
    if record_routing:  # each row's processed tokens are its real columns, in order
        routed_ids = [routed_LBWK[:, b, mask_BW[b]] if routed_LBWK is not None else None for b in range(B)]
    return Generation(
        tokens=[row[:n] for row, n in zip(tokens, lengths)],
        logprobs=[row[:n] for row, n in zip(logprobs, lengths)],
        finished=stopped_B.tolist(),
        real_slots=[row[:n] for row, n in zip(real, lengths)],
        zero_slots=[[slots - r for r in row[:n]] for row, n in zip(real, lengths)],
        stats=layer_stats(counts_LE, num_tokens, N, K),
        attended_keys=attended_keys(mask_BW),
        prompt_tokens=sum(len(p) for p in prompts),
        new_tokens=sum(lengths),
        seconds=time.perf_counter() - t0,
        prefill_seconds=prefill_seconds,
        routed_ids=routed_ids,
    )
