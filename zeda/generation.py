"""Generation: the one engine that SFT rollouts, on-policy distillation (docs/method.md §4-5) and serving share.

    gen = generate(model, prompts, SamplingParams(temperature=1.0, max_new_tokens=256), eos_ids={eos}, seed=0)
    gen.tokens[i], gen.logprobs[i], gen.finished[i]      # per prompt
    flop_report(model.config, gen.stats, gen.attended_keys)   # zero-expert ratio and expert FLOPs (docs/method.md §6)

How it works (gpt-fast / nanochat style):
- Prompts of different lengths are LEFT-padded into one batch, so every row writes its KV cache at the same offset
  and the newest token is always the last column. The attention mask marks real tokens; the model derives
  RoPE positions from it, so a padded row sees exactly what it would see alone.
- One prefill over the prompts into a static KVCache of prompt_len + max_new_tokens positions, then one decode
  step per token for all rows. A row that produced EOS keeps feeding `pad_id` with its mask bit off (its outputs
  are ignored and it stops counting); the loop ends when every row is done or after max_new_tokens.
- Sampling runs on the device: temperature, top-k, top-p, then gpt-fast's exponential trick
  (argmax(p / q), q ~ Exp(1)) from a torch.Generator seeded by `seed`, which is a categorical draw without
  torch.multinomial's host sync. A fixed seed reproduces the samples exactly.
- Each row may bring its own SamplingParams (a list, one per prompt: what a server batching independent
  requests needs). With per-row seeds a row then samples exactly what it would alone; its max_new_tokens ends
  it like EOS does, and the cache is sized for the longest.
- The only host sync per decode step is the `all done?` check (marked `# host sync`), plus the token transfer
  when an `on_token` streaming callback is given. Routing statistics (per-token real/zero slots, per-expert
  counts, attended keys) are accumulated on the device and moved to the host once, after the loop; they are
  statistics only and never feed back into generation. The eager routed path syncs inside the dispatch
  (nonzero(): the number of real slots sets its shapes); generate(compile=True) runs each decode step through
  torch.compile(decode_step) instead, static shapes and no sync (see "The compiled decode step" below), and
  stop_check_every=k makes the `all done?` check every k steps.

`Decoder` is the same decode loop kept open for a server: rows join between steps (continuous batching) and leave
as they finish, each with its own params and seed. `generate_naive` recomputes the whole sequence without a
cache at every step: the reference the fast engine is tested against. `token_logprobs` scores given sequences
in one forward (teacher and student in OPD/SFT).

Shape letters: B batch (prompts), P padded prompt length, M max new tokens, S keys (P + M), T tokens of a
forward, K slots per token, L MoE layers, E router outputs (N real + Z zero experts), V vocabulary.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from zeda.errors import UsageError
from zeda.flags import float_range, int_range
from zeda.flops import LayerStats, attended_keys, expert_counts, layer_stats, routing_stats
from zeda.model import CausalLM, KVCache, rope_cos_sin

# How a teacher samples its answers for SFT: the paper's sampling settings (docs/method.md §6), which are also Qwen3's
# recommended thinking-mode ones. At temperature 1 a small teacher's answers are markedly less accurate than its
# greedy ones, and SFT teaches the student those mistakes.
ROLLOUT_SAMPLING = {"temperature": 0.6, "top_p": 0.95, "top_k": 20}


def add_sampling_args(parser, prefix: str = "", from_model: bool = True) -> None:
    """--{prefix}temperature, --{prefix}top-p, --{prefix}top-k. from_model: a flag not given takes the model
    folder's generation_config.json value, else the rollout default above (sampling_from_args resolves it)."""
    t, p, k = ROLLOUT_SAMPLING.values()
    source = "the model's generation_config.json, else " if from_model else ""
    parser.add_argument(f"--{prefix}temperature", type=float_range(min=0), default=None if from_model else t,
                        help=f"sampling temperature (0 = greedy; default: {source}{t}, the paper's)")
    parser.add_argument(f"--{prefix}top-p", type=float_range(above=0, max=1), default=None if from_model else p,
                        help=f"nucleus sampling mass (1 = off; default: {source}{p})")
    parser.add_argument(f"--{prefix}top-k", type=int_range(min=0), default=None if from_model else k,
                        help=f"top-k sampling (0 = off; default: {source}{k})")


def sampling_from_args(args, max_new_tokens: int, prefix: str = "", model_dir=None) -> SamplingParams:
    """The SamplingParams of the flags add_sampling_args(parser, prefix) added: what the user gave, else the
    model folder's generation_config.json (its temperature, top_p, top_k), else ROLLOUT_SAMPLING."""
    from zeda.config import generation_defaults

    attr = prefix.replace("-", "_")
    given = {key: getattr(args, f"{attr}{key}") for key in ROLLOUT_SAMPLING}
    folder = generation_defaults(model_dir) if model_dir is not None else {}
    values = {key: v if v is not None else folder.get(key, ROLLOUT_SAMPLING[key]) for key, v in given.items()}
    return SamplingParams(**values, max_new_tokens=max_new_tokens)


@dataclass
class SamplingParams:
    temperature: float = 1.0  # 0 = greedy argmax
    top_p: float = 1.0  # nucleus: keep the smallest set of tokens whose probability reaches top_p (1 = off)
    top_k: int = 0  # keep the k most likely tokens (0 = off)
    max_new_tokens: int = 128

    def __post_init__(self):
        if self.temperature < 0:
            raise UsageError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise UsageError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise UsageError(f"top_k must be >= 0, got {self.top_k}")
        if self.max_new_tokens < 1:
            raise UsageError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


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
# Sampling: pure functions on [B, V] logits.


def filter_logits(logits_BV: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set every logit outside the top-k and outside the top-p nucleus to -inf (0 / 1.0 switch a filter off).

    Top-k keeps ties with the k-th value. Top-p keeps a token if the probability mass of the tokens ranked
    strictly before it is < top_p, so the most likely token always survives."""
    if top_k > 0 and top_k < logits_BV.shape[-1]:
        kth_B1 = logits_BV.topk(top_k, dim=-1).values[:, -1:]  # [B, 1]
        logits_BV = logits_BV.masked_fill(logits_BV < kth_B1, float("-inf"))
    if top_p < 1.0:
        sorted_BV, order_BV = logits_BV.sort(dim=-1, descending=True)
        probs_BV = sorted_BV.softmax(dim=-1)
        before_BV = probs_BV.cumsum(dim=-1) - probs_BV  # mass ranked strictly above each token
        sorted_BV = sorted_BV.masked_fill(before_BV >= top_p, float("-inf"))
        logits_BV = torch.full_like(logits_BV, float("-inf")).scatter(-1, order_BV, sorted_BV)
    return logits_BV


def sample(logits_BV: torch.Tensor, params: SamplingParams | list[SamplingParams],
           generator: torch.Generator | list[torch.Generator] | None = None):
    """One token per row, and its log-probability. Returns (tokens [B] int64, logprobs [B] fp32); no host sync.

    logprob = log_softmax(logits / T)[token], at the sampling temperature T but *before* the top-k/top-p
    truncation (T = 1 for greedy). At T = 1 -- what OPD samples with (docs/method.md §5) -- that is exactly
    log p_student(y_t), the quantity the advantage log p_teacher - log p_student needs; the truncated
    distribution's log-prob would be biased upwards by the dropped mass.
    params: one for the batch, or one per row (a server's independent requests).
    generator: one for the batch, or one per row (a row's samples then do not depend on its batch-mates).
    """
    logits_BV = logits_BV.float()
    if isinstance(params, list):
        if len(params) != logits_BV.shape[0]:
            raise UsageError(f"sample() got {len(params)} SamplingParams for {logits_BV.shape[0]} rows")
        if any(p != params[0] for p in params):
            return _sample_rows(logits_BV, params, generator)
        params = params[0]
    if params.greedy:
        tokens_B = logits_BV.argmax(dim=-1)
        logprobs_BV = logits_BV.log_softmax(dim=-1)
    else:
        scaled_BV = logits_BV / params.temperature
        logprobs_BV = scaled_BV.log_softmax(dim=-1)
        probs_BV = filter_logits(scaled_BV, params.top_k, params.top_p).softmax(dim=-1)
        tokens_B = (probs_BV / _exponential(probs_BV, generator)).argmax(dim=-1)
    return tokens_B, logprobs_BV.gather(-1, tokens_B[:, None]).squeeze(-1)


def _exponential(probs_BV: torch.Tensor, generator) -> torch.Tensor:
    """q ~ Exp(1) [B, V]: argmax(p / q) is a draw from p (gpt-fast), without torch.multinomial's host sync.
    With one generator per row, row b's draws come from generator b alone."""
    if isinstance(generator, list):
        return torch.stack([torch.empty_like(row).exponential_(1, generator=g) for row, g in zip(probs_BV, generator)])
    return torch.empty_like(probs_BV).exponential_(1, generator=generator)


def _sample_rows(logits_BV: torch.Tensor, params: list[SamplingParams], generator):
    """sample() with each row's own temperature, top-k and top-p, computed so that every row gets bit for bit
    what sample() gives it alone: the same scaling, the same filter over the same values, its own draws."""
    device = logits_BV.device
    greedy_B = torch.tensor([p.greedy for p in params], device=device)
    T_B1 = torch.tensor([[p.temperature if not p.greedy else 1.0] for p in params], device=device)  # greedy: T=1
    scaled_BV = logits_BV / T_B1
    logprobs_BV = scaled_BV.log_softmax(dim=-1)
    tokens_B = logits_BV.argmax(dim=-1)
    if not all(p.greedy for p in params):
        filtered_BV = scaled_BV.clone()
        by_filter: dict[tuple[int, float], list[int]] = {}  # rows sharing a (top_k, top_p) are filtered together
        for row, p in enumerate(params):
            by_filter.setdefault((p.top_k, p.top_p), []).append(row)
        for (top_k, top_p), rows in by_filter.items():
            index = torch.tensor(rows, device=device)
            filtered_BV[index] = filter_logits(scaled_BV[index], top_k, top_p)
        probs_BV = filtered_BV.softmax(dim=-1)
        sampled_B = (probs_BV / _exponential(probs_BV, generator)).argmax(dim=-1)
        tokens_B = torch.where(greedy_B, tokens_B, sampled_B)
    return tokens_B, logprobs_BV.gather(-1, tokens_B[:, None]).squeeze(-1)


def make_generator(seed: int | list[int] | None, device):
    """A generator on `device` seeded with `seed` (a list of seeds: one generator per row); None (torch's global
    RNG) when no seed is given."""
    if isinstance(seed, list):
        return [torch.Generator(device=device).manual_seed(s) for s in seed]
    return None if seed is None else torch.Generator(device=device).manual_seed(seed)


# ---------------------------------------------------------------------------------------------------------------
# Batching and routing statistics.


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


def last_token_slots(routing: list, batch: int, num_experts: int):
    """Real and zero slots [B], summed over MoE layers, at the last position of each row of a forward."""
    if not routing:
        return (torch.zeros(batch, dtype=torch.long),) * 2
    ids_LBK = torch.stack([r.ids_TK.reshape(batch, -1, r.ids_TK.shape[-1])[:, -1] for r in routing])  # [L, B, K]
    L, _, K = ids_LBK.shape
    real_B = (ids_LBK < num_experts).sum(dim=(0, 2))
    return real_B, L * K - real_B


def _last_logits(model: CausalLM, ids_BT, mask_BS, cache, routing) -> torch.Tensor:
    """Logits [B, V] of the last position only (the LM head never sees the other prompt positions)."""
    hidden_BTH = model(ids_BT, attention_mask=mask_BS, cache=cache, routing=routing, hidden_only=True)
    return model.lm_head(hidden_BTH[:, -1])


# ---------------------------------------------------------------------------------------------------------------
# The compiled decode step (gpt-fast style): one token per row over a static KV cache, static shapes throughout,
# so torch.compile traces it once per (batch, cache width) and nothing in it waits for the host.
#
# What differs from the eager decode step (CausalLM.forward over KVCache), and why:
# - The cache is written at a position held in a device tensor (index_copy_) and attention always spans the
#   cache's full width W, with columns not yet written masked out: the eager step slices the cache to the
#   filled length, a shape that changes every step and would recompile every step.
# - RoPE positions come in as a tensor (each row's count of real tokens so far) instead of a cumsum of the mask.
# - The routed experts run over all T*K slots sorted by expert, with the slots that must not be computed (zero
#   experts, finished rows) sorted past the last expert's group: the grouped GEMM computes only rows inside
#   the groups, so zero slots still cost no expert FLOPs, but every buffer is [T*K, ...] whatever the zero share,
#   instead of [M real slots, ...] found by nonzero() (a host sync and a data-dependent shape).
# The result is the eager step's up to floating-point reduction order (Inductor fuses and reorders sums), so the
# sampled tokens are the same unless two logits tie to within rounding; tests/test_decode.py checks the tokens.


@torch.library.custom_op("zeda::grouped_swiglu", mutates_args=())
def grouped_swiglu(x_SH: torch.Tensor, ends_N: torch.Tensor, gate_NIH: torch.Tensor, up_NIH: torch.Tensor,
                   down_NHI: torch.Tensor) -> torch.Tensor:
    """SwiGLU of expert e over rows [ends_N[e-1], ends_N[e]) of x_SH; rows past ends_N[-1] are not computed.

    An opaque op to torch.compile (its meta function wants bf16, and Inductor has no CPU lowering), so the
    compiled graph calls it as it is. Rows past ends_N[-1] of the result are left uninitialised: the caller
    masks them with torch.where (not a multiply: uninitialised memory may hold NaN). On CPU torch._grouped_mm
    runs one GEMM per non-empty group, reading the group offsets itself (no sync on CPU); on CUDA it needs bf16
    and 16-byte aligned group starts, which this path does not pad to: it has not been run on a GPU."""
    if (x_SH.shape[1] * x_SH.element_size()) % 16 or (gate_NIH.shape[1] * x_SH.element_size()) % 16:
        # torch._grouped_mm wants 16-byte aligned rows: one SwiGLU per expert instead (reads the offsets).
        out_SH, start = x_SH.new_zeros(x_SH.shape[0], down_NHI.shape[1]), 0
        for e, end in enumerate(ends_N.tolist()):
            if end > start:
                rows = x_SH[start:end]
                out_SH[start:end] = F.linear(F.silu(F.linear(rows, gate_NIH[e])) * F.linear(rows, up_NIH[e]),
                                             down_NHI[e])
            start = end
        return out_SH
    offs = ends_N.to(torch.int32)
    gate = torch._grouped_mm(x_SH, gate_NIH.transpose(-2, -1), offs=offs)  # [S, I]
    up = torch._grouped_mm(x_SH, up_NIH.transpose(-2, -1), offs=offs)
    h = (F.silu(gate) * up).contiguous()
    return torch._grouped_mm(h, down_NHI.transpose(-2, -1), offs=offs)  # [S, H]


@grouped_swiglu.register_fake
def _(x_SH, ends_N, gate_NIH, up_NIH, down_NHI):
    return x_SH.new_empty(x_SH.shape[0], down_NHI.shape[1])


def sorted_routed_experts(x_TH, weights_TK, ids_TK, keep_TK, experts) -> torch.Tensor:
    """y_TH = sum over kept slots of w * SwiGLU_e(x) with static shapes (LocalDispatcher + combine without
    nonzero): all T*K slots are sorted by expert, dropped ones (keep False) last, past every group."""
    T, K = ids_TK.shape
    N = experts.gate_proj.shape[0]
    key_S = torch.where(keep_TK, ids_TK, N).flatten()  # [T*K] dropped slots sort as expert N, after all groups
    order_S = key_S.argsort(stable=True)  # stable: the eager dispatcher's row order within an expert
    counts_N = torch.zeros(N + 1, dtype=torch.long, device=x_TH.device).scatter_add_(
        0, key_S, torch.ones_like(key_S))[:N]  # rows per expert (bincount's output size is data-dependent)
    y_SH = grouped_swiglu(x_TH[order_S // K], counts_N.cumsum(0), experts.gate_proj, experts.up_proj,
                          experts.down_proj)  # [T*K, H], rows of dropped slots uninitialised
    y_SH = torch.empty_like(y_SH).index_copy_(0, order_S, y_SH)  # back to slot order t * K + k
    y_SH = torch.where(keep_TK.reshape(-1, 1), y_SH, 0.0)  # dropped slots: exactly zero
    y_TKH = y_SH.view(T, K, -1) * weights_TK.unsqueeze(-1)  # fp32 weights, as LocalDispatcher.combine
    return y_TKH.sum(dim=1).to(x_TH.dtype)


class StaticCache:
    """A KVCache's buffers [B, heads, W, D] written at `position_1` (a device tensor), read whole: what the
    attention modules see during the compiled decode (they only call update())."""

    def __init__(self, cache: KVCache, position_1: torch.Tensor):
        self.k, self.v, self.position_1 = cache.k, cache.v, position_1

    def update(self, layer: int, k_BhTD, v_BhTD):
        self.k[layer].index_copy_(2, self.position_1, k_BhTD)
        self.v[layer].index_copy_(2, self.position_1, v_BhTD)
        return self.k[layer], self.v[layer]


def decode_step(model: CausalLM, ids_B: torch.Tensor, positions_B: torch.Tensor, mask_BW: torch.Tensor,
                live_B: torch.Tensor, cache: StaticCache):
    """One decode token per row over the static cache: (logits [B, V], real slots [B] summed over MoE layers,
    slots per router output [L, E + 1] over live rows, expert ids [L, B, K]), what the eager loop collects.

    mask_BW: the keys each row may attend to, the column being written included (a finished row attends to its
    own padding key only, so its softmax is never empty). live_B: rows whose token is real; the others are
    routed for shapes but compute no expert row, as padding is in the eager step. Block.forward and MoE.forward
    written out for static shapes (see the section comment above)."""
    cfg = model.config
    x_B1H = model.model.embed_tokens(ids_B[:, None])
    cos, sin = rope_cos_sin(positions_B[:, None], cfg.head_dim, cfg.rope_theta, x_B1H.dtype)
    mask_B1W = mask_BW[:, None, :]
    ids_per_layer = []
    for block in model.model.layers:
        x_B1H = x_B1H + block.self_attn(block.input_layernorm(x_B1H), cos, sin, mask_B1W, cache)
        h_BH = block.post_attention_layernorm(x_B1H)[:, 0]
        if block.is_moe:
            moe = block.mlp
            r = moe.gate(h_BH)
            keep_BK = (r.ids_TK < moe.num_experts) & live_B[:, None]
            y_BH = sorted_routed_experts(h_BH, r.weights_TK, r.ids_TK, keep_BK, moe.experts)
            if moe.shared_experts is not None:
                y_BH = y_BH + moe.shared_experts(h_BH)
            ids_per_layer.append(r.ids_TK)
        else:
            y_BH = block.mlp(h_BH)
        x_B1H = x_B1H + y_BH[:, None]
    logits_BV = model.lm_head(model.model.norm(x_B1H)[:, 0])
    B = ids_B.shape[0]
    if not ids_per_layer:
        return logits_BV, torch.zeros(B, dtype=torch.long, device=ids_B.device), None, None
    ids_LBK = torch.stack(ids_per_layer)
    real_B = (ids_LBK < cfg.num_experts).sum(dim=(0, 2))
    E = cfg.num_router_outputs
    live_LX = live_B.long().repeat_interleave(ids_LBK.shape[2]).expand(len(ids_per_layer), -1)  # [L, B*K]
    counts_LE = torch.zeros(len(ids_per_layer), E + 1, dtype=torch.long, device=ids_B.device).scatter_add_(
        1, ids_LBK.reshape(len(ids_per_layer), -1), live_LX)  # expert_counts over this step's live rows
    return logits_BV, real_B, counts_LE, ids_LBK


CACHE_WIDTH_MULTIPLE = 64  # the compiled path rounds its cache width up to this: fewer distinct graphs


def check_compilable(model: CausalLM) -> None:
    """UsageError for what decode_step does not cover: tensor or expert parallelism (collectives and a swapped
    dispatcher inside the step)."""
    if getattr(model, "tensor_parallel", 1) > 1:
        raise UsageError("generate(compile=True) does not support tensor parallelism")
    if any(block.is_moe and block.mlp.experts.dispatcher is not None for block in model.model.layers):
        raise UsageError("generate(compile=True) does not support expert parallelism")


_compiled_decode_step = None  # torch.compile(decode_step), made on first use (compiling is lazy anyway)


def compiled_decode_step():
    """torch.compile(decode_step): static shapes (dynamic=False, one graph per batch size and cache width);
    on CUDA mode="reduce-overhead" adds CUDA graphs (gpt-fast), which has not been run here (no GPU)."""
    global _compiled_decode_step
    if _compiled_decode_step is None:
        mode = "reduce-overhead" if torch.cuda.is_available() else None
        _compiled_decode_step = torch.compile(decode_step, dynamic=False, mode=mode)
    return _compiled_decode_step


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
    compile: run each decode step through torch.compile(decode_step) (static shapes, no host sync; the prefill
    stays eager). The first call for a batch size and cache width compiles (tens of seconds on a CPU).
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
    N, E, K = cfg.num_experts, cfg.num_router_outputs, cfg.num_experts_per_tok
    M, P = max(limits), max(len(p) for p in prompts)
    # The compiled step is traced for one cache width: round it up so that batches of similar prompt lengths
    # share a graph (the extra columns stay masked).
    W = -(-(P + M) // CACHE_WIDTH_MULTIPLE) * CACHE_WIDTH_MULTIPLE if compile else P + M
    generator = make_generator(seed, device)
    eos_X = torch.tensor(sorted(set(eos_ids)), dtype=torch.long, device=device)
    limit_B = torch.tensor(limits, dtype=torch.long, device=device)

    ids_BP, prompt_mask_BP = left_pad(prompts, pad_id, device)
    mask_BS = torch.zeros(B, W, dtype=torch.bool, device=device)  # grows one column per fed token
    mask_BS[:, :P] = prompt_mask_BP
    cache = KVCache(cfg, B, W, dtype, device, getattr(model, "tensor_parallel", 1))
    tokens_BM = torch.full((B, M), pad_id, dtype=torch.long, device=device)
    logprobs_BM = torch.zeros(B, M, dtype=torch.float32, device=device)
    real_BM = torch.zeros(B, M, dtype=torch.long, device=device)
    emitted_BM = torch.zeros(B, M, dtype=torch.bool, device=device)  # a real generated token at (row, step)
    stopped_B = torch.zeros(B, dtype=torch.bool, device=device)  # produced EOS
    done_B = torch.zeros(B, dtype=torch.bool, device=device)  # stopped, or at its own max_new_tokens

    routing = []
    logits_BV = _last_logits(model, ids_BP, mask_BS[:, :P], cache, routing)  # prefill (eager in both modes)
    prefill_seconds = time.perf_counter() - t0
    routed_LBWK = None
    if record_routing and routing:  # int16: router outputs number in the hundreds
        routed_LBWK = torch.zeros(len(routing), B, W, K, dtype=torch.int16, device=device)
        routed_LBWK[:, :, :P] = torch.stack([r.ids_TK.view(B, P, K) for r in routing])
    counts_LE = expert_counts(routing, prompt_mask_BP, E)
    # Statistics only: the real slots of the forward that produced the next token (device ops, no sync).
    real_B = last_token_slots(routing, B, N)[0].to(device)
    if compile:
        step, position_1 = compiled_decode_step(), torch.zeros(1, dtype=torch.long, device=device)
        static_cache = StaticCache(cache, position_1)
        positions_B = prompt_mask_BP.sum(dim=1)  # RoPE position of each row's next token: its real tokens so far
    for t in range(M):
        real_BM[:, t] = real_B
        next_B, logp_B = sample(logits_BV, params, generator)
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
        if compile:
            position_1.fill_(P + t)
            mask_BS[:, P + t] = True  # this step's key: a finished row attends to its own padding key only
            logits_BV, real_B, step_counts_LE, ids_LBK = step(model, fed_B, positions_B, mask_BS, ~done_B,
                                                              static_cache)
            positions_B = positions_B + ~done_B
        else:
            routing = []
            mask_BS[:, P + t] = ~done_B
            logits_BV = _last_logits(model, fed_B[:, None], mask_BS[:, :P + t + 1], cache, routing)
            real_B = last_token_slots(routing, B, N)[0]
            step_counts_LE = expert_counts(routing, mask_BS[:, P + t], E)
            ids_LBK = torch.stack([r.ids_TK for r in routing]) if routed_LBWK is not None else None
        if routed_LBWK is not None:
            routed_LBWK[:, :, P + t] = ids_LBK
        mask_BS[:, P + t] = ~done_B  # what the statistics count: real tokens only
        counts_LE = counts_LE + step_counts_LE

    # Everything to the host once.
    lengths = emitted_BM.sum(dim=1).tolist()  # host sync
    tokens, logprobs = tokens_BM.tolist(), logprobs_BM.tolist()
    real = real_BM.tolist()
    slots = cfg.num_moe_layers * K  # every routed slot of a token is real or zero (or skipped, and counted zero)
    num_tokens = int(mask_BS.sum())  # prompts + fed tokens (the last token of a row is never fed)
    routed_ids = None
    if record_routing:  # each row's processed tokens are its real columns, in order
        routed_ids = [routed_LBWK[:, b, mask_BS[b]] if routed_LBWK is not None else None for b in range(B)]
    return Generation(
        tokens=[row[:n] for row, n in zip(tokens, lengths)],
        logprobs=[row[:n] for row, n in zip(logprobs, lengths)],
        finished=stopped_B.tolist(),
        real_slots=[row[:n] for row, n in zip(real, lengths)],
        zero_slots=[[slots - r for r in row[:n]] for row, n in zip(real, lengths)],
        stats=layer_stats(counts_LE, num_tokens, N, K),
        attended_keys=attended_keys(mask_BS),
        prompt_tokens=sum(len(p) for p in prompts),
        new_tokens=sum(lengths),
        seconds=time.perf_counter() - t0,
        prefill_seconds=prefill_seconds,
        routed_ids=routed_ids,
    )


# ---------------------------------------------------------------------------------------------------------------
# Continuous batching: rows that join and leave between decode steps (a server's requests).


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
    """generate()'s decode loop kept open, so that rows join between steps and leave as they finish.

        decoder = Decoder(model, capacity=16, eos_ids={eos})
        row = decoder.add([(prompt_ids, SamplingParams(temperature=0.6, max_new_tokens=64), seed)])[0]
        for row, token, real_slots, zero_slots in decoder.step(): ...     # one token per row; add() between steps

    The same engine as generate(): rows share one KV cache written at one offset, RoPE positions come from the
    attention mask, sample() draws with each row's own params and generator, so a row samples exactly what it
    would in generate() alone with its seed. What is added:
    - add() prefills new prompts (one forward of their own, left-padded together) and copies their keys and
      values into free rows of the shared cache, right-aligned at the current offset; from the next step on
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
        routing = []
        logits_bV = _last_logits(self.model, ids_bP, mask_bP, small, routing)  # the new prompts alone
        real_b, zero_b = last_token_slots(routing, b, self.model.config.num_experts)
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
        self.logits_BV[n:n + b] = logits_bV.float()
        self.real_B[n:n + b], self.zero_B[n:n + b] = real_b.to(self.device), zero_b.to(self.device)
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
        routing = []
        ids_n1 = torch.where(fed_n, self.next_B[:n], self.pad_id)[:, None]
        logits_nV = _last_logits(self.model, ids_n1, self.mask_BS[:n, :L + 1], view, routing)
        self.cache.length = view.length
        real_n, zero_n = last_token_slots(routing, n, self.model.config.num_experts)
        keep = fed_n.to(self.logits_BV.dtype)[:, None]
        self.logits_BV[:n] = logits_nV.float() * keep + self.logits_BV[:n] * (1 - keep)
        self.real_B[:n] = torch.where(fed_n, real_n.to(self.device), self.real_B[:n])
        self.zero_B[:n] = torch.where(fed_n, zero_n.to(self.device), self.zero_B[:n])

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
    for _ in range(params.max_new_tokens):
        routing = []
        logits_V = model(torch.tensor([ids], device=device), routing=routing)[0, -1]
        real_B, zero_B = last_token_slots(routing, 1, cfg.num_experts)
        tok, logp = sample(logits_V[None], params, generator)
        tokens.append(int(tok))
        logprobs.append(float(logp))
        real.append(int(real_B))
        zero.append(int(zero_B))
        if tokens[-1] in eos_ids:
            finished = True
            break
        ids.append(tokens[-1])
    n = len(prompt) + len(tokens) - 1  # tokens the last forward processed: every token generation processed
    stats = routing_stats(routing, cfg.num_experts)
    return Generation([tokens], [logprobs], [finished], [real], [zero], stats, attended_keys(num_tokens=n),
                      len(prompt), len(tokens), time.perf_counter() - t0)


def token_logprobs(model: CausalLM, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                   temperature: float = 1.0, routing: list | None = None,
                   forced_routing: torch.Tensor | None = None) -> torch.Tensor:
    """log p(x_{t+1} | x_{<=t}) [B, T-1] for input_ids [B, T] in one forward (e.g. teacher and student in OPD).

    Not decorated with no_grad: the student's log-probs need gradients; wrap the call for the teacher. Positions
    whose target x_{t+1} or context token x_t is padding (attention_mask 0) are set to 0, so with left padding
    row b holds log-probs of its real tokens 2..n in its last n-1 columns. `routing` collects the RouterOutputs for the
    Group Auxiliary Loss (every position is routed, the last one too). The log-probs come from the model's chunked
    head (zeda/model.py:target_logprobs): no [B, T, V] logits are ever held, whatever V and T are.
    forced_routing [L, B, T, K]: routing replay (CausalLM.forward).
    """
    targets_BT = torch.cat([input_ids[:, 1:], input_ids[:, -1:]], dim=1)  # the last position's target is unused
    out_BT = model(input_ids, attention_mask=attention_mask, routing=routing, targets=targets_BT,
                   temperature=temperature, forced_routing=forced_routing)[:, :-1]  # [B, T-1]
    if attention_mask is not None:
        real_BS = attention_mask.bool()
        out_BT = out_BT.masked_fill(~(real_BS[:, :-1] & real_BS[:, 1:]), 0.0)
    return out_BT
