"""Continuous batching for the server (zeda/server.py): a decode loop kept open, so that requests join between
steps and leave as they finish, each with its own sampling params and seed.

    decoder = Decoder(model, capacity=16, eos_ids={eos})
    row = decoder.add([(prompt_ids, SamplingParams(temperature=0.6, max_new_tokens=64), seed)])[0]
    for row, token, real_slots, zero_slots in decoder.step(): ...     # one token per row; add() between steps

It runs the engine's own step (zeda/generation.py:forward_step, one model forward and its routing statistics)
and sampling (zeda/sampling.py:sample); what it adds is the bookkeeping of rows that come and go. Why it is not
generate()'s loop: that loop keeps a fixed batch and a cache sized once, and syncs with the host only to ask
whether every row is done (what the compiled decode and expert-parallel lockstep need), while a server must
hand every token to its client as it comes (a sync each step), admit new rows into a cache that grows, and pack
the rows that remain.

Shape letters: B rows (the capacity), n live rows, b rows being added, P their padded prompt length, S cache
columns, V vocabulary.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from zeda.errors import UsageError
from zeda.generation import check_prompts, forward_step, left_pad
from zeda.model import CausalLM, KVCache
from zeda.sampling import SamplingParams, sample


@dataclass(eq=False)
class Row:
    """One prompt inside a Decoder: its handle for step() results and end()."""

    params: SamplingParams
    generator: torch.Generator
    start: int  # cache column of its first real token (moves when the cache is compacted)
    prompt_tokens: int
    new_tokens: int = 0
    done: bool = False  # EOS, max_new_tokens, or end(): leaves at the next step
    # Log-probs (a server's `logprobs`), set by the caller after add(). None: none. k: after each step, `logprobs`
    # holds the sampled token's log-prob and the k most likely (token, log-prob), most likely first
    top_logprobs: int | None = None
    logprobs: tuple[float, list[tuple[int, float]]] | None = None


class Decoder:
    """generate()'s decode step in a loop kept open, so that rows join between steps and leave as they finish.

    The same engine as generate(): rows share one KV cache written at one column, RoPE positions come from the
    attention mask, forward_step runs the model, sample() draws with each row's own params and generator, so a
    row samples exactly what it would in generate() alone with its seed. What is added:
    - add() prefills new prompts (one forward of their own, left-padded together) and copies their keys and
      values into free rows of the shared cache, right-aligned at the current column; from the next step on
      they decode with the others. Columns left of a row's first token are masked, as padding is.
    - Live rows are packed into the first n rows of the cache (a row that leaves is replaced by the last one),
      so a forward covers live rows only. A row that only just joined feeds nothing in the step after its
      prefill (mask bit off) and keeps its prefill logits.
    - The cache grows (doubling) when full; columns left of the oldest live row's first token are dropped once
      they are half of it, so attention spans about one context, not the server's uptime.
    step() transfers each row's token and routing slots (real / zero, summed over MoE layers, of the forward
    that produced the token) to the host once. Rows that produced EOS or reached max_new_tokens are done;
    end(row) makes a row done early (a stop string, a client that left). A row whose top_logprobs is set gets
    its token's log-probs in row.logprobs after each step (log_softmax of the logits it was sampled from,
    before temperature, top-k and top-p); other rows cost nothing for it.
    """

    def __init__(self, model: CausalLM, capacity: int, eos_ids: list[int] | set[int], pad_id: int = 0,
                 initial_width: int = 256):
        cfg = model.config
        self.model, self.capacity, self.eos_ids, self.pad_id = model, capacity, set(eos_ids), pad_id
        self.device, self.dtype = model.lm_head.weight.device, model.compute_dtype
        self.tp = getattr(model, "tensor_parallel", 1)
        self.slots = cfg.num_moe_layers * cfg.num_experts_per_tok  # real + zero slots of one token
        self.cache = KVCache(cfg, capacity, initial_width, self.dtype, self.device, self.tp)
        self.mask_BS = torch.zeros(capacity, initial_width, dtype=torch.bool, device=self.device)
        self.logits_BV = torch.zeros(capacity, model.lm_head.weight.shape[0], dtype=torch.float32, device=self.device)
        self.real_B = torch.zeros(capacity, dtype=torch.long, device=self.device)
        self.zero_B = torch.zeros(capacity, dtype=torch.long, device=self.device)
        self.next_B = torch.full((capacity,), pad_id, dtype=torch.long, device=self.device)  # tokens to feed
        self.fed_B = torch.zeros(capacity, dtype=torch.bool, device=self.device)  # row has a token to feed
        self.rows: list[Row] = []  # live rows, row i in cache row i

    @property
    def free(self) -> int:
        return self.capacity - len(self.rows)

    @torch.no_grad()
    def add(self, requests: list[tuple[list[int], SamplingParams, int | None]]) -> list[Row]:
        """Prefill (prompt, params, seed) requests into free rows; seed None: a random generator."""
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
        small = KVCache(self.model.config, b, P, self.dtype, self.device, self.tp)
        prefill = forward_step(self.model, ids_bP, mask_bP, small)  # the new prompts alone
        if not self.rows:
            self.cache.length = 0  # nothing live: every column is free
        L = self.cache.length
        if L < P:  # no room on the left: shift what is cached right
            self._recolumn(0, P - L, max(self.cache.max_len, 2 * P))
            L = self.cache.length
        n = len(self.rows)
        for layer in range(len(self.cache.k)):
            self.cache.k[layer][n:n + b, :, L - P:L] = small.k[layer]
            self.cache.v[layer][n:n + b, :, L - P:L] = small.v[layer]
        self.mask_BS[n:n + b] = False
        self.mask_BS[n:n + b, L - P:L] = mask_bP
        self.logits_BV[n:n + b] = prefill.logits_BV.float()
        self.real_B[n:n + b], self.zero_B[n:n + b] = prefill.real_B, self.slots - prefill.real_B
        self.fed_B[n:n + b] = False
        new = []
        for prompt, params, seed in requests:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(seed) if seed is not None else generator.seed()
            new.append(Row(params, generator, L - len(prompt), len(prompt)))
        self.rows += new
        return new

    def end(self, row: Row) -> None:
        """Stop decoding `row` (it leaves at the next step)."""
        row.done = True

    @torch.no_grad()
    def step(self) -> list[tuple[Row, int, int, int]]:
        """Feed every live row's last token, then sample one more for each: [(row, token, real, zero)]."""
        self._drop_done()
        n = len(self.rows)
        if n == 0:
            return []
        if any(r.new_tokens for r in self.rows):  # a row that sampled before has a token to feed
            self._forward(n)
        tokens_n, _ = sample(self.logits_BV[:n], [r.params for r in self.rows], [r.generator for r in self.rows])
        self._logprobs(tokens_n)
        self.next_B[:n], self.fed_B[:n] = tokens_n, True
        tokens, real, zero = torch.stack([tokens_n, self.real_B[:n], self.zero_B[:n]]).tolist()  # host sync
        out = []
        for row, tok, r, z in zip(self.rows, tokens, real, zero):
            row.new_tokens += 1
            row.done = row.done or tok in self.eos_ids or row.new_tokens >= row.params.max_new_tokens
            out.append((row, tok, r, z))
        return out

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

    def _forward(self, n: int) -> None:
        """One decode step for rows [0, n): fed rows take their token, just-added rows feed masked padding."""
        self._make_room()
        L = self.cache.length
        fed_n = self.fed_B[:n]
        self.mask_BS[:n, L] = fed_n
        view = copy.copy(self.cache)  # the first n rows: slices are views, so the model writes into the cache
        view.k, view.v = [k[:n] for k in self.cache.k], [v[:n] for v in self.cache.v]
        ids_n1 = torch.where(fed_n, self.next_B[:n], self.pad_id)[:, None]
        step = forward_step(self.model, ids_n1, self.mask_BS[:n, :L + 1], view)
        self.cache.length = view.length
        keep = fed_n.to(self.logits_BV.dtype)[:, None]
        self.logits_BV[:n] = step.logits_BV.float() * keep + self.logits_BV[:n] * (1 - keep)
        self.real_B[:n] = torch.where(fed_n, step.real_B, self.real_B[:n])
        self.zero_B[:n] = torch.where(fed_n, self.slots - step.real_B, self.zero_B[:n])

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
                for t in (self.mask_BS, self.logits_BV, self.real_B, self.zero_B, self.next_B, self.fed_B):
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
