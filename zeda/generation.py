"""Generation: the one decode loop that SFT rollouts, on-policy distillation (docs/method.md §4-5), evaluation and
serving share.

    gen = generate(model, prompts, SamplingParams(temperature=1.0, max_new_tokens=256), eos_ids={eos}, seed=0)
    gen.tokens[i], gen.logprobs[i], gen.finished[i]      # per prompt
    flop_report(model.config, gen.stats, gen.attended_keys)   # zero-expert ratio and expert FLOPs (docs/method.md §6)

    decoder = Decoder(model, capacity=16, eos_ids={eos})          # the server's: rows join and leave between steps
    row = decoder.add([(prompt_ids, SamplingParams(temperature=0.6, max_new_tokens=64), seed)])[0]
    for row, token, real_slots, zero_slots in decoder.step(): ...

How it works (gpt-fast / nanochat style), from the bottom up:
- forward_step: T new tokens per row through the model (CausalLM.forward, the one training uses) into a KVCache,
  the last position's logits, and the routing statistics of the tokens it processed. The prefill (T = prompt
  length) and every decode step (T = 1) are this call; compiled decoding runs it through torch.compile.
- Decoder: rows that share one KV cache written at one column. Prompts of different lengths are LEFT-padded, so
  the newest token is always the last column; the attention mask marks real tokens and the model derives RoPE
  positions from it, so a padded row sees exactly what it would see alone. Decoder.advance() is the loop's body:
  feed every row its last token (one forward_step), sample the next (zeda/sampling.py, on the device, each row
  with its own params and generator). A row that produced EOS or reached its max_new_tokens keeps feeding
  `pad_id` with its mask bit off (it computes no expert row and counts nothing). The server's step() lets done
  rows leave and new ones join between advances (continuous batching).
- generate(): a Decoder with a row per prompt and a cache of prompt_len + max_new_tokens columns, advanced until
  every row is done or after max_new_tokens. A fixed seed reproduces the samples exactly; with per-row seeds a
  row samples exactly what it would alone.
- The only host sync per decode step in generate() is the `all done?` check (marked `# host sync`), plus the token
  transfer when an `on_token` streaming callback is given. Routing statistics (per-token real/zero slots,
  per-expert counts, attended keys) are accumulated on the device and moved to the host once, after the loop;
  they are statistics only and never feed back into generation. The eager routed path syncs inside the dispatch
  (nonzero(): the number of real slots sets its shapes); generate(compile=True) runs each decode step through
  torch.compile(forward_step) in the model's static-shape mode instead (input_pos: the cache written at a
  column held in a device tensor, attention over its whole width, the "sorted" expert backend), with no sync,
  and stop_check_every=k makes the `all done?` check every k steps. Eager and compiled run the same loop.

tests/reference_generation.py holds the naive generator (no cache, the whole sequence recomputed at every step)
that this engine is tested against.

Shape letters: B batch (prompts, or the Decoder's rows), n live rows, b rows being added, P padded prompt length,
M max new tokens, S keys, W cache width (P + M, or rounded up when compiled), T tokens of a forward, K slots per
token, L MoE layers, E router outputs (N real + Z zero experts), V vocabulary.
"""

from __future__ import annotations

import copy
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
# decode step (T = 1) call it; the Decoder's compiled mode calls it through torch.compile.


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
# The decode loop: rows in one KV cache, fed and sampled together. generate() runs it over a fixed batch; the
# server (zeda/server.py) keeps it open and lets rows join and leave between steps.


@dataclass(eq=False)
class Row:
    """One prompt inside a Decoder: its handle for step() results and end()."""

    params: SamplingParams
    generator: torch.Generator | None  # None: torch's global RNG; rows given one generator draw from it together
    start: int  # cache column of its first real token (moves when the cache is compacted)
    prompt_tokens: int
    new_tokens: int = 0  # steps it has taken (tokens sampled while it was live, and padding after it was done)
    done: bool = False  # set by step() (EOS, max_new_tokens) or end(): it leaves at the next step()
    # Log-probs (a server's `logprobs`), set by the caller after add(). None: none. k: after each step(), `logprobs`
    # holds the sampled token's log-prob and the k most likely (token, log-prob), most likely first
    top_logprobs: int | None = None
    logprobs: tuple[float, list[tuple[int, float]]] | None = None


class Sampled(NamedTuple):
    """What one Decoder.advance() produced, for rows [0, n), on the device."""

    tokens_n: torch.Tensor  # the next token of each row (pad_id for a row that was already done)
    logprobs_n: torch.Tensor  # fp32, sample()'s log-prob of it
    live_n: torch.Tensor  # bool: the row was not done, so its token is real
    real_n: torch.Tensor  # real-expert slots (summed over MoE layers) of the forward its logits came from
    forward: Step | None  # the forward that fed the previous tokens; None when every row sampled its prefill's


class Decoder:
    """Rows decoding together in one KV cache: the decode loop that generate() (evaluation, rollouts, OPD
    sampling) and the server run.

    - add() prefills new prompts (one forward of their own, left-padded together) and copies their keys and
      values into free rows of the cache, right-aligned at the current column. Columns left of a row's first token
      are masked, as padding is, and RoPE positions come from the mask, so a row sees what it would alone.
    - advance() is the loop's body: feed every row the token it sampled last (one forward_step for all rows, one
      column of the cache), then sample the next from the logits, each row with its own SamplingParams and
      generator, so a row samples exactly what it would alone with its seed. A row that is done (EOS, its
      max_new_tokens) feeds padding with its mask bit off: it computes no expert row and counts nothing. A row
      that only just joined feeds nothing (mask bit off) and samples from its prefill logits. No host sync.
    - step() is advance() for a server: done rows leave first (the last live row moves into a freed cache row, so
      a forward covers live rows only), and the tokens, slots and done flags come to the host once.
    - The cache grows (doubling) when full; columns left of the oldest live row's first token are dropped once
      they are half of it, so attention spans about one context, not the server's uptime. A cache sized for the
      whole generation (generate()) never does either.
    compile=True: the feed runs torch.compile(forward_step) in the model's static-shape mode (input_pos: the column
    to write held in a device tensor, attention over the cache's whole width): one graph per row count and width.
    """

    def __init__(self, model: CausalLM, capacity: int, eos_ids: list[int] | set[int], pad_id: int = 0,
                 initial_width: int = 256, compile: bool = False):
        cfg = model.config
        if compile:
            check_compilable(model)
        self.model, self.capacity, self.pad_id = model, capacity, pad_id
        device = self.device = model.lm_head.weight.device
        self.dtype = model.compute_dtype
        self.tp = getattr(model, "tensor_parallel", 1)
        self.slots = cfg.num_moe_layers * cfg.num_experts_per_tok  # real + zero slots of one token
        self.cache = KVCache(cfg, capacity, initial_width, self.dtype, device, self.tp)
        self.mask_BS = torch.zeros(capacity, initial_width, dtype=torch.bool, device=device)  # real keys
        self.eos_X = torch.tensor(sorted(set(eos_ids)), dtype=torch.long, device=device)
        # per cache row: what it samples from, and its state
        self.logits_BV = torch.zeros(capacity, model.lm_head.weight.shape[0], dtype=torch.float32, device=device)
        self.real_B = torch.zeros(capacity, dtype=torch.long, device=device)  # slots of the forward behind logits
        self.next_B = torch.full((capacity,), pad_id, dtype=torch.long, device=device)  # the token to feed
        self.fed_B = torch.zeros(capacity, dtype=torch.bool, device=device)  # has a token to feed (live, sampled)
        self.count_B = torch.zeros(capacity, dtype=torch.long, device=device)  # tokens sampled while live
        self.limit_B = torch.zeros(capacity, dtype=torch.long, device=device)  # its max_new_tokens
        self.stopped_B = torch.zeros(capacity, dtype=torch.bool, device=device)  # produced EOS
        self.done_B = torch.zeros(capacity, dtype=torch.bool, device=device)  # stopped, or at max_new_tokens
        self.per_row = (self.logits_BV, self.real_B, self.next_B, self.fed_B, self.count_B, self.limit_B,
                        self.stopped_B, self.done_B)
        # Routing statistics over every real token processed (prefills and fed tokens), and the last prefill
        self.counts_LE = torch.zeros(cfg.num_moe_layers, cfg.num_router_outputs + 1, dtype=torch.long,
                                     device=device)
        self.prefill: Step | None = None
        self.input_pos_1 = torch.zeros(1, dtype=torch.long, device=device) if compile else None
        self.rows: list[Row] = []  # live rows, row i in cache row i

    @property
    def free(self) -> int:
        return self.capacity - len(self.rows)

    @torch.no_grad()
    def add(self, requests: list[tuple[list[int], SamplingParams, int | torch.Generator | None]]) -> list[Row]:
        """Prefill (prompt, params, seed) requests into free rows. seed: an int (the row's own generator seeded
        with it), a torch.Generator (used as it is: rows given the same one draw from it together, as one batch),
        or None (torch's global RNG)."""
        if len(requests) > self.free:
            raise UsageError(f"Decoder.add: {len(requests)} prompts but {self.free} free rows")
        if not requests:
            return []
        prompts = [p for p, _, _ in requests]
        check_prompts(prompts, [params.max_new_tokens for _, params, _ in requests],
                      self.model.config.max_position_embeddings)
        self._drop_done()
        ids_bP, mask_bP = left_pad(prompts, self.pad_id, self.device)
        b, P = ids_bP.shape
        n = len(self.rows)
        if n == 0:  # nothing live: every column is free, the prompts go straight into columns [0, P)
            self.cache.length = 0
            if P >= self.cache.max_len:
                self._recolumn(0, 0, 2 * P)
            prefill = forward_step(self.model, ids_bP, mask_bP, self._first_rows(b))
        else:  # the new prompts alone, then their keys and values right-aligned at the current column
            small = KVCache(self.model.config, b, P, self.dtype, self.device, self.tp)
            prefill = forward_step(self.model, ids_bP, mask_bP, small)
            if self.cache.length < P:  # no room on the left: shift what is cached right
                self._recolumn(0, P - self.cache.length, max(self.cache.max_len, 2 * P))
            L = self.cache.length
            for layer in range(len(self.cache.k)):
                self.cache.k[layer][n:n + b, :, L - P:L] = small.k[layer]
                self.cache.v[layer][n:n + b, :, L - P:L] = small.v[layer]
        self.cache.length = L = max(self.cache.length, P)
        self.prefill = prefill
        self.counts_LE += prefill.counts_LE
        self.mask_BS[n:n + b] = False
        self.mask_BS[n:n + b, L - P:L] = mask_bP
        self.logits_BV[n:n + b] = prefill.logits_BV.float()
        self.real_B[n:n + b] = prefill.real_B
        for t in (self.fed_B, self.count_B, self.stopped_B, self.done_B):
            t[n:n + b] = 0
        self.next_B[n:n + b] = self.pad_id
        self.limit_B[n:n + b] = torch.tensor([params.max_new_tokens for _, params, _ in requests])
        new = []
        for prompt, params, seed in requests:
            generator = torch.Generator(device=self.device).manual_seed(seed) if isinstance(seed, int) else seed
            new.append(Row(params, generator, L - len(prompt), len(prompt)))
        self.rows += new
        return new

    def end(self, row: Row) -> None:
        """Stop decoding `row` (it leaves at the next step)."""
        row.done = True

    @torch.no_grad()
    def advance(self) -> Sampled:
        """Feed every row's last sampled token, then sample the next for each (see the class docstring)."""
        n = len(self.rows)
        forward = self._feed(n) if any(r.new_tokens for r in self.rows) else None
        generators = [r.generator for r in self.rows]
        shared = all(g is generators[0] for g in generators)  # one generator for the batch: one draw for all
        tokens_n, logprobs_n = sample(self.logits_BV[:n], [r.params for r in self.rows],
                                      generators[0] if shared else generators)
        live_n = ~self.done_B[:n]
        tokens_n = torch.where(live_n, tokens_n, self.pad_id)
        self.count_B[:n] += live_n
        self.stopped_B[:n] |= live_n & torch.isin(tokens_n, self.eos_X)
        self.done_B[:n] = self.stopped_B[:n] | (self.count_B[:n] >= self.limit_B[:n])
        self.next_B[:n], self.fed_B[:n] = tokens_n, ~self.done_B[:n]
        for row in self.rows:
            row.new_tokens += 1
        return Sampled(tokens_n, logprobs_n, live_n, self.real_B[:n].clone(), forward)

    @torch.no_grad()
    def step(self) -> list[tuple[Row, int, int, int]]:
        """A server's step: done rows leave, then advance(): [(row, token, real slots, zero slots)] per row."""
        self._drop_done()
        n = len(self.rows)
        if n == 0:
            return []
        sampled = self.advance()
        self._logprobs(sampled.tokens_n)
        tokens, real, done = torch.stack([sampled.tokens_n, sampled.real_n, self.done_B[:n].long()]).tolist()
        for row, d in zip(self.rows, done):  # host sync above: the one per step
            row.done = row.done or bool(d)
        return [(row, tok, r, self.slots - r) for row, tok, r in zip(self.rows, tokens, real)]

    def _feed(self, n: int) -> Step:
        """One forward for rows [0, n): each fed row's token into the next cache column; the others (just added,
        or done) feed padding with their mask bit off and keep their logits."""
        self._make_room()
        L = self.cache.length
        fed_n = self.fed_B[:n]
        self.mask_BS[:n, L] = fed_n
        cache = self._first_rows(n)
        ids_n1 = self.next_B[:n, None]
        if self.input_pos_1 is None:
            step = forward_step(self.model, ids_n1, self.mask_BS[:n, :L + 1], cache)
        else:
            self.input_pos_1.fill_(L)
            step = compiled_forward_step()(self.model, ids_n1, self.mask_BS[:n], cache, self.input_pos_1)
        self.cache.length = L + 1
        self.logits_BV[:n] = torch.where(fed_n[:, None], step.logits_BV.float(), self.logits_BV[:n])
        self.real_B[:n] = torch.where(fed_n, step.real_B, self.real_B[:n])
        self.counts_LE += step.counts_LE
        return step

    def _first_rows(self, n: int) -> KVCache:
        """The cache of rows [0, n): slices are views, so the model writes into the cache."""
        if n == self.capacity:
            return self.cache
        view = copy.copy(self.cache)
        view.k, view.v = [k[:n] for k in self.cache.k], [v[:n] for v in self.cache.v]
        return view

    def _logprobs(self, tokens_n: torch.Tensor) -> None:
        """row.logprobs for the rows that asked: the sampled token's log-prob and the top_logprobs most likely,
        under the model's own distribution, log_softmax of the raw logits -- not the temperature-scaled or
        truncated one sample() draws from (vLLM's default, "raw_logprobs"; sample()'s own log-prob is at T)."""
        asked = [i for i, row in enumerate(self.rows) if row.top_logprobs is not None]
        if not asked:
            return
        index_a = torch.tensor(asked, device=self.device)
        logprobs_aV = self.logits_BV[index_a].log_softmax(dim=-1)  # [a, V] fp32, only the rows that asked
        chosen_a = logprobs_aV.gather(-1, tokens_n[index_a, None]).squeeze(-1)
        top = logprobs_aV.topk(max(self.rows[i].top_logprobs for i in asked), dim=-1)  # sorted, most likely first
        chosen, top_ids, top_values = chosen_a.tolist(), top.indices.tolist(), top.values.tolist()  # host sync
        for j, i in enumerate(asked):
            k = self.rows[i].top_logprobs
            self.rows[i].logprobs = (chosen[j], list(zip(top_ids[j][:k], top_values[j][:k])))

    def _drop_done(self) -> None:
        """Remove done rows, moving the last live row into each freed cache row (rows stay packed)."""
        i = 0
        while i < len(self.rows):
            if not self.rows[i].done:
                i += 1
                continue
            last = len(self.rows) - 1
            if i != last:
                for k, v in zip(self.cache.k, self.cache.v):
                    k[i], v[i] = k[last], v[last]
                for t in (self.mask_BS, *self.per_row):
                    t[i] = t[last]
                self.rows[i] = self.rows[last]
            self.rows.pop()

    def _make_room(self) -> None:
        """A free column for the next token: drop the columns no live row uses once they are half the cache
        (or it is full), and double the width when it is full anyway."""
        L, W = self.cache.length, self.cache.max_len
        unused = min(r.start for r in self.rows)
        if unused > 0 and (unused >= L // 2 or L == W):
            self._recolumn(unused, 0, W)
            L = self.cache.length
        if L == W:
            self._recolumn(0, 0, 2 * W)

    def _recolumn(self, drop: int, pad: int, width: int) -> None:
        """Cache columns [drop, length) move to [pad, pad + length - drop) of a cache `width` wide."""
        L = self.cache.length
        keep = L - drop
        for store in (self.cache.k, self.cache.v):
            for layer, old in enumerate(store):
                new = old.new_zeros(*old.shape[:2], width, old.shape[3]) if width != old.shape[2] else old
                new[:, :, pad:pad + keep] = old[:, :, drop:L].clone()
                store[layer] = new
        mask = self.mask_BS.new_zeros(self.capacity, width) if width != self.mask_BS.shape[1] else self.mask_BS
        moved = self.mask_BS[:, drop:L].clone()
        mask[:, :pad + keep] = False
        mask[:, pad:pad + keep] = moved
        self.mask_BS = mask
        self.cache.max_len, self.cache.length = width, pad + keep
        for row in self.rows:
            row.start += pad - drop


# ---------------------------------------------------------------------------------------------------------------
# generate(): the decode loop over a fixed batch.


@torch.no_grad()
def generate(model: CausalLM, prompts: list[list[int]], params: SamplingParams | list[SamplingParams],
             eos_ids: list[int] | set[int], pad_id: int = 0, seed: int | list[int] | None = None,
             on_token: Callable[[int, int], None] | None = None,
             all_done: Callable[[bool], bool] | None = None, compile: bool = False,
             stop_check_every: int = 1, record_routing: bool = False) -> Generation:
    """Generate for a batch of prompts: a Decoder with a row per prompt and a cache sized for the whole
    generation, advanced until every row is done (see the module docstring).

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
    limits = [p.max_new_tokens for p in rows]
    check_prompts(prompts, limits, cfg.max_position_embeddings)
    t0 = time.perf_counter()
    device = model.lm_head.weight.device
    N, K = cfg.num_experts, cfg.num_experts_per_tok
    M, P = max(limits), max(len(p) for p in prompts)
    # The compiled step is traced for one cache width: round it up so that batches of similar prompt lengths
    # share a graph (the extra columns stay masked).
    W = -(-(P + M) // CACHE_WIDTH_MULTIPLE) * CACHE_WIDTH_MULTIPLE if compile else P + M
    generator = make_generator(seed, device)
    seeds = generator if isinstance(generator, list) else [generator] * B  # one generator: one draw for all rows
    decoder = Decoder(model, B, eos_ids, pad_id, initial_width=W, compile=compile)
    decoder.add(list(zip(prompts, rows, seeds)))  # the prefill (eager in both modes)
    prefill_seconds = time.perf_counter() - t0
    tokens_BM = torch.full((B, M), pad_id, dtype=torch.long, device=device)
    logprobs_BM = torch.zeros(B, M, dtype=torch.float32, device=device)
    real_BM = torch.zeros(B, M, dtype=torch.long, device=device)
    emitted_BM = torch.zeros(B, M, dtype=torch.bool, device=device)  # a real generated token at (row, step)
    routed_LBWK = None
    if record_routing and decoder.prefill.ids_LBTK is not None:  # int16: router outputs number in the hundreds
        routed_LBWK = torch.zeros(cfg.num_moe_layers, B, W, K, dtype=torch.int16, device=device)
        routed_LBWK[:, :, :P] = decoder.prefill.ids_LBTK
    for t in range(M):
        sampled = decoder.advance()
        if routed_LBWK is not None and sampled.forward is not None:  # the column that forward wrote
            routed_LBWK[:, :, decoder.cache.length - 1] = sampled.forward.ids_LBTK[:, :, 0]
        tokens_BM[:, t], logprobs_BM[:, t] = sampled.tokens_n, sampled.logprobs_n
        real_BM[:, t], emitted_BM[:, t] = sampled.real_n, sampled.live_n
        if on_token is not None:
            for row, tok in enumerate(torch.where(sampled.live_n, sampled.tokens_n, -1).tolist()):  # host sync
                if tok >= 0:  # (streaming only)
                    on_token(row, tok)
        if t == M - 1:
            break
        if (t + 1) % stop_check_every == 0:
            finished = bool(decoder.done_B.all())  # host sync: the one per step (per stop_check_every steps)
            if all_done(finished) if all_done is not None else finished:
                break

    # Everything to the host once.
    lengths = emitted_BM.sum(dim=1).tolist()  # host sync
    tokens, logprobs = tokens_BM.tolist(), logprobs_BM.tolist()
    real = real_BM.tolist()
    slots = cfg.num_moe_layers * K  # every routed slot of a token is real or zero (or skipped, and counted zero)
    mask_BW = decoder.mask_BS
    num_tokens = int(mask_BW.sum())  # prompts + fed tokens (the last token of a row is never fed)
    routed_ids = None
    if record_routing:  # each row's processed tokens are its real columns, in order
        routed_ids = [routed_LBWK[:, b, mask_BW[b]] if routed_LBWK is not None else None for b in range(B)]
    return Generation(
        tokens=[row[:n] for row, n in zip(tokens, lengths)],
        logprobs=[row[:n] for row, n in zip(logprobs, lengths)],
        finished=decoder.stopped_B.tolist(),
        real_slots=[row[:n] for row, n in zip(real, lengths)],
        zero_slots=[[slots - r for r in row[:n]] for row, n in zip(real, lengths)],
        stats=layer_stats(decoder.counts_LE, num_tokens, N, K),
        attended_keys=attended_keys(mask_BW),
        prompt_tokens=sum(len(p) for p in prompts),
        new_tokens=sum(lengths),
        seconds=time.perf_counter() - t0,
        prefill_seconds=prefill_seconds,
        routed_ids=routed_ids,
    )
