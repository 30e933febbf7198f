"""The model: Qwen3-MoE and GLM-4.7-Flash (with zero experts) in one readable file.

What is special here:
- One class for both architectures; they differ by config fields (attention kind, router, shared expert,
  dense first layers), never by copied code.
- Routed experts are 3D tensors behind the MoE seams of zeda/moe.py; zero experts have no parameters.
- Module names equal HF's checkpoint keys (model.layers.{i}.self_attn.q_proj, ...), so loading is a key map
  plus stacking the per-expert tensors (zeda/checkpoint.py).
- One forward for training, prefill, decode and the compiled decode (gpt-fast style): with `input_pos` the new
  keys are written at given cache columns and every shape is fixed by the cache (KVCache), which is what
  torch.compile needs; without it the cache is filled in order and read up to what is filled. MLA caches the
  expanded keys and values (simple; caching the latent would save memory and is left for the serving work).
- `forward(..., routing=list)` collects each MoE layer's RouterOutput for statistics and the Group
  Auxiliary Loss. Each MoE block keeps its last RouterOutput in `last_routing` only until this forward collects
  it and clears it (an attribute rather than a list argument: FSDP2 may copy arguments, and activation
  checkpointing re-runs a block's forward in backward).
- `forward(..., targets=ids)` returns the log-probability of each target token instead of logits, computed a
  chunk of tokens at a time and (all but the last chunk) recomputed in backward (target_logprobs): the losses
  never hold [B, T, V] logits, which at V = 151,936 and T = 32k would be ~20 GB per sequence in fp32;
  token_logprobs scores given sequences with it (teacher and student in OPD).

Shape letters: B batch, T new tokens, S keys (cache + new), H hidden, D head dim, V vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from zeda.config import ModelConfig
from zeda.errors import UsageError
from zeda.moe import MLP, MoE


HEAD_CHUNK_ELEMENTS = 2**26  # logits held at once by target_logprobs: 256 MB of fp32, whatever V is


def _chunk_logprobs(hidden_CH, weight_VH, targets_C, temperature: float):
    """(log softmax of this chunk's logits [C, V] fp32, log-prob of each target [C])."""
    logits_CV = F.linear(hidden_CH, weight_VH).float() / temperature  # [C, V], this chunk only
    logp_CV = logits_CV.log_softmax(-1)  # as F.cross_entropy (transformers' loss) computes it
    return logp_CV, logp_CV.gather(-1, targets_C[:, None]).squeeze(-1)


class _TargetLogprobs(torch.autograd.Function):
    """target_logprobs under autograd, chunk by chunk, with a hand-written backward.

    Forward keeps no [C, V] logits but the last chunk's log-softmax; backward recomputes the others' (as
    activation checkpointing would) but never the last chunk's (the head runs last in forward and first in
    backward, so that chunk is alive anyway: at a few thousand tokens it is the only chunk), and it adds each
    chunk's head-weight gradient in place into one [V, H] buffer instead of building one per chunk and summing.
    With z = h W^T / temperature and out = log softmax(z)[target]:
        d out / d z = onehot(target) - softmax(z);  dh = dz W / temperature;  dW = dz^T h / temperature."""

    @staticmethod
    def forward(ctx, hidden_NH, weight_VH, targets_N, temperature: float, chunk: int):
        out, logp_CV = [], None
        for s in range(0, hidden_NH.shape[0], chunk):
            logp_CV, out_C = _chunk_logprobs(hidden_NH[s:s + chunk], weight_VH, targets_N[s:s + chunk], temperature)
            out.append(out_C)
        ctx.save_for_backward(hidden_NH, weight_VH, targets_N)
        # the last chunk's [C, V] log-softmax, for backward (an intermediate, not an input: kept on ctx)
        ctx.last_logp_CV, ctx.temperature, ctx.chunk = logp_CV, temperature, chunk
        return torch.cat(out) if out else hidden_NH.new_empty(0, dtype=torch.float32)  # [N]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_N):
        hidden_NH, weight_VH, targets_N = ctx.saved_tensors
        want_h, want_w = ctx.needs_input_grad[:2]
        grad_h = torch.empty_like(hidden_NH) if want_h else None
        grad_w = None
        starts = list(range(0, hidden_NH.shape[0], ctx.chunk))
        for s in reversed(starts):  # the last chunk first, while its kept log-softmax is still there
            h_CH, y_C, g_C = hidden_NH[s:s + ctx.chunk], targets_N[s:s + ctx.chunk], grad_N[s:s + ctx.chunk]
            if ctx.last_logp_CV is not None:
                logp_CV, ctx.last_logp_CV = ctx.last_logp_CV, None
            else:
                logp_CV = _chunk_logprobs(h_CH, weight_VH, y_C, ctx.temperature)[0]  # the recompute
            # dz = g * (onehot - softmax), in place over the log-softmax: [C, V] fp32, then / temperature
            dz_CV = logp_CV.exp_().mul_(-g_C.float()[:, None])
            dz_CV.scatter_add_(1, y_C[:, None], g_C.float()[:, None])
            if ctx.temperature != 1.0:
                dz_CV.div_(ctx.temperature)
            dz_CV = dz_CV.to(hidden_NH.dtype)  # the gradient of .float(): back to the GEMM's dtype
            if want_h:
                torch.mm(dz_CV, weight_VH, out=grad_h[s:s + ctx.chunk])  # [C, H]
            if want_w:
                if grad_w is None:
                    grad_w = dz_CV.t().mm(h_CH)  # [V, H]
                else:
                    grad_w.addmm_(dz_CV.t(), h_CH)  # in place: one [V, H] buffer for all chunks
        return grad_h, grad_w, None, None, None


def target_logprobs(hidden_BTH, weight_VH, targets_BT, temperature: float = 1.0, chunk: int | None = None):
    """log softmax(hidden @ W^T / temperature)[target], fp32 [B, T], without ever holding [B, T, V].

    Tokens are taken `chunk` at a time (default: HEAD_CHUNK_ELEMENTS / V); under autograd only the last chunk's
    [chunk, V] log-softmax is kept for backward, the others are recomputed there (_TargetLogprobs). Peak extra
    memory grows with the chunk and T*H, not with T*V."""
    B, T, H = hidden_BTH.shape
    chunk = chunk or max(1, HEAD_CHUNK_ELEMENTS // weight_VH.shape[0])
    hidden_NH, targets_N = hidden_BTH.reshape(B * T, H), targets_BT.reshape(B * T)
    if torch.is_grad_enabled() and (hidden_NH.requires_grad or weight_VH.requires_grad):
        return _TargetLogprobs.apply(hidden_NH, weight_VH, targets_N, temperature, chunk).view(B, T)
    out = [_chunk_logprobs(hidden_NH[s:s + chunk], weight_VH, targets_N[s:s + chunk], temperature)[1]
           for s in range(0, B * T, chunk)]
    return torch.cat(out).view(B, T)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # Normalise in fp32, cast back before the weight: HF's order, which the parity tests hold us to.
        xf = x.float()
        return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


def rope_cos_sin(positions_BT, dim: int, theta: float, dtype):
    """cos, sin [B, T, dim] for the default RoPE (cat(freqs, freqs) layout, as HF)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=positions_BT.device) / dim))
    freqs = positions_BT.float()[..., None] * inv_freq  # [B, T, dim/2]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x_BhTD, cos_BTD, sin_BTD, interleave: bool = False):
    """Rotate x [B, heads, T, D]. interleave=True: DeepSeek/GLM pairs (x0, x1), (x2, x3), ... then
    de-interleaved output (HF's apply_rotary_pos_emb_interleave); else the rotate-half convention."""
    cos, sin = cos_BTD.unsqueeze(1), sin_BTD.unsqueeze(1)
    if interleave:
        half = cos.shape[-1] // 2
        cos, sin = cos[..., :half], sin[..., :half]
        x1, x2 = x_BhTD[..., 0::2], x_BhTD[..., 1::2]
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    x1, x2 = x_BhTD.chunk(2, dim=-1)
    return x_BhTD * cos + torch.cat((-x2, x1), dim=-1) * sin


class KVCache:
    """Static per-layer key/value buffers [B, heads, max_len, D]; every row writes at the same column (prompts
    are left-padded). Two ways to write, one for each kind of forward (CausalLM.forward):
    - in order (input_pos None: the prefill and the eager decode): a forward's T new keys go to columns
      [length, length + T) and attention reads [0, length + T); `length`, a Python int, says how much is filled,
      so the shapes grow by one column each decode step.
    - at given columns (input_pos, a device tensor: the compiled decode, gpt-fast's KVCache): index_copy_ writes
      them and attention reads the whole width max_len, columns not yet written masked out, so no shape changes
      from step to step and nothing reads the position on the host. `length` is left as it was."""

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, dtype, device, tensor_parallel: int = 1):
        # under tensor parallelism each rank caches only its own heads
        heads = (cfg.num_attention_heads if cfg.is_mla else cfg.num_key_value_heads) // tensor_parallel
        dk = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim if cfg.is_mla else cfg.head_dim
        dv = cfg.v_head_dim if cfg.is_mla else cfg.head_dim
        n = cfg.num_hidden_layers
        self.k = [torch.zeros(batch, heads, max_len, dk, dtype=dtype, device=device) for _ in range(n)]
        self.v = [torch.zeros(batch, heads, max_len, dv, dtype=dtype, device=device) for _ in range(n)]
        self.max_len = max_len
        self.length = 0  # positions filled so far; the model advances it after each forward

    def update(self, layer: int, k_BhTD, v_BhTD, input_pos_T=None):
        """Write this layer's new keys and values; returns the keys and values attention reads, [B, heads, S, D]."""
        if input_pos_T is not None:
            self.k[layer].index_copy_(2, input_pos_T, k_BhTD)
            self.v[layer].index_copy_(2, input_pos_T, v_BhTD)
            return self.k[layer], self.v[layer]
        start, end = self.length, self.length + k_BhTD.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} positions > max_len {self.max_len}")
        self.k[layer][:, :, start:end] = k_BhTD
        self.v[layer][:, :, start:end] = v_BhTD
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class Attention(nn.Module):
    """Qwen3 grouped-query attention with per-head RMSNorm on q and k."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer, self.cfg = layer, cfg
        H, D, nq, nkv = cfg.hidden_size, cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
        self.q_proj = nn.Linear(H, nq * D, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(H, nkv * D, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(H, nkv * D, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(nq * D, H, bias=cfg.attention_bias)
        self.q_norm = RMSNorm(D, cfg.rms_norm_eps)  # on the head dim only
        self.k_norm = RMSNorm(D, cfg.rms_norm_eps)

    def forward(self, x_BTH, cos, sin, mask_BTS, cache: KVCache | None, input_pos_T=None):
        B, T, _ = x_BTH.shape
        D = self.cfg.head_dim
        q = self.q_norm(self.q_proj(x_BTH).view(B, T, -1, D)).transpose(1, 2)  # [B, nq, T, D]
        k = self.k_norm(self.k_proj(x_BTH).view(B, T, -1, D)).transpose(1, 2)  # [B, nkv, T, D]
        v = self.v_proj(x_BTH).view(B, T, -1, D).transpose(1, 2)  # [B, nkv, T, D]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer, k, v, input_pos_T)  # [B, nkv, S, D]
        groups = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)  # GQA -> [B, nq, S, D]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask_BTS.unsqueeze(1))  # [B, nq, T, D]
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))


class MLAttention(nn.Module):
    """GLM-4.7-Flash multi-head latent attention (DeepSeek-V2 MLA): q through a low-rank bottleneck,
    k/v from one compressed latent plus a single shared rotary key."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer, self.cfg = layer, cfg
        H, nh = cfg.hidden_size, cfg.num_attention_heads
        self.qk_head_dim = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
        if cfg.q_lora_rank is None:
            self.q_proj = nn.Linear(H, nh * self.qk_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(H, cfg.q_lora_rank, bias=cfg.attention_bias)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank)  # HF uses the default eps 1e-6 here, not rms_norm_eps
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, nh * self.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(H, cfg.kv_lora_rank + cfg.qk_rope_head_dim, bias=cfg.attention_bias)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank)  # default eps, as HF
        self.kv_b_proj = nn.Linear(cfg.kv_lora_rank, nh * (cfg.qk_nope_head_dim + cfg.v_head_dim), bias=False)
        self.o_proj = nn.Linear(nh * cfg.v_head_dim, H, bias=cfg.attention_bias)

    def forward(self, x_BTH, cos, sin, mask_BTS, cache: KVCache | None, input_pos_T=None):
        cfg = self.cfg
        B, T, _ = x_BTH.shape
        if cfg.q_lora_rank is None:
            q = self.q_proj(x_BTH)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x_BTH)))
        q = q.view(B, T, -1, self.qk_head_dim).transpose(1, 2)  # [B, nh, T, nope+rope]
        q_nope, q_rot = q.split([cfg.qk_nope_head_dim, cfg.qk_rope_head_dim], dim=-1)
        latent, k_rot = self.kv_a_proj_with_mqa(x_BTH).split([cfg.kv_lora_rank, cfg.qk_rope_head_dim], dim=-1)
        kv = self.kv_b_proj(self.kv_a_layernorm(latent)).view(B, T, -1, cfg.qk_nope_head_dim + cfg.v_head_dim)
        k_nope, v = kv.transpose(1, 2).split([cfg.qk_nope_head_dim, cfg.v_head_dim], dim=-1)  # [B, nh, T, *]
        q_rot = apply_rope(q_rot, cos, sin, cfg.rope_interleave)
        k_rot = apply_rope(k_rot.view(B, 1, T, -1), cos, sin, cfg.rope_interleave)  # one key shared by heads
        q = torch.cat((q_nope, q_rot), dim=-1)
        k = torch.cat((k_nope, k_rot.expand(-1, k_nope.shape[1], -1, -1)), dim=-1)  # [B, nh, T, nope+rope]
        if cache is not None:
            k, v = cache.update(self.layer, k, v, input_pos_T)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask_BTS.unsqueeze(1), scale=self.qk_head_dim**-0.5)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))  # [B, T, H]


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.self_attn = MLAttention(cfg, layer) if cfg.is_mla else Attention(cfg, layer)
        self.is_moe = cfg.moe_layers[layer]
        self.mlp = MoE(cfg) if self.is_moe else MLP(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, mask_BTS, valid_BT, cache, forced_ids_BTK=None, input_pos_T=None):
        """input_pos_T: the static-shape mode (CausalLM.forward), for the cache and the routed experts alike."""
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask_BTS, cache, input_pos_T)
        h = self.post_attention_layernorm(x)
        if not self.is_moe:
            return x + self.mlp(h)
        return x + self.mlp(h, valid_BT, forced_ids_BTK, static_shapes=input_pos_T is not None)


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class CausalLM(nn.Module):
    """logits = CausalLM(cfg)(input_ids [B, T]) -> [B, T, V]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.mixed_precision_dtype: torch.dtype | None = None  # set when FSDP2 gathers fp32 parameters as bf16

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype of activations and of the KV cache: the parameters' own, or under FSDP2's mixed precision
        (zeda/sharding.py:apply_fsdp) the dtype the fp32 parameters are gathered in."""
        return self.mixed_precision_dtype or self.model.embed_tokens.weight.dtype

    @torch.no_grad()
    def init_weights(self, seed: int = 0, std: float = 0.02) -> None:
        """Initialise from scratch (teachers are trained from scratch): N(0, std) for every matrix, embedding,
        router and 3D expert tensor; ones for norms; zero selection bias. One place, as nanochat."""
        g = torch.Generator(device=self.lm_head.weight.device).manual_seed(seed)
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=g, device=p.device, dtype=torch.float32).mul_(std))
        for name, b in self.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.zero_()

    def set_expert_backend(self, backend: str) -> None:
        """Pick the routed-expert implementation for every MoE layer: "loop", "grouped_mm" or "triton"."""
        from zeda.moe import BACKENDS

        if backend not in BACKENDS:
            raise UsageError(f"unknown expert backend {backend!r}; choose one of {BACKENDS}")
        for block in self.model.layers:
            if block.is_moe:
                block.mlp.experts.backend = backend

    def forward(self, input_ids, attention_mask=None, positions=None, cache: KVCache | None = None, routing=None,
                hidden_only: bool = False, targets=None, temperature: float = 1.0, forced_routing=None,
                input_pos=None):
        """input_ids [B, T]. attention_mask [B, S] (1 = real token) covers the keys: cached and new tokens,
        S = cached + T (or the cache's width with input_pos); None means all real. positions [B, T] default to
        each row's count of real tokens before it (so left padding works). routing: a list to append each MoE
        layer's RouterOutput to. Returns logits [B, T, V]; or the final hidden states [B, T, H] with hidden_only;
        or, given targets [B, T], the fp32 log-probability of each target at `temperature` [B, T], computed in
        chunks (target_logprobs), for the losses.
        forced_routing [L, B, T, K] (L MoE layers): routing replay, the expert ids each token must take in each
        MoE layer, -1 where the router chooses (zeda/moe.py:Router). An argument, not module state: activation
        checkpointing re-runs a block's forward in backward, and must route it the same way.
        input_pos [T] (int64, on the device): the static-shape mode of the compiled decode (gpt-fast's input_pos).
        The new tokens sit at these cache columns: their keys are written there (KVCache.update), attention spans
        the cache's whole width W with attention_mask [B, W] saying which columns each row may see (the new ones
        included; the causal mask is by column), and the routed experts run the "sorted" backend
        (zeda/moe.py:sorted_experts_forward). No shape then depends on the data or on how full the cache is, and
        nothing waits for the host: torch.compile traces it once per batch size and cache width."""
        B, T = input_ids.shape
        device = input_ids.device
        if input_pos is None:
            past = cache.length if cache is not None else 0
            S = past + T
            q_pos = torch.arange(past, S, device=device)
            new = slice(past, S)  # the new tokens' columns
        else:
            if cache is None:
                raise UsageError("CausalLM.forward: input_pos needs a cache (the columns it names are the cache's)")
            S = cache.max_len
            q_pos = new = input_pos
        key_valid_BS = (
            torch.ones(B, S, dtype=torch.bool, device=device) if attention_mask is None else attention_mask.bool()
        )
        if key_valid_BS.shape != (B, S):
            raise ValueError(f"attention_mask has shape {tuple(key_valid_BS.shape)}, expected {(B, S)}")
        if positions is None:
            positions = (key_valid_BS.long().cumsum(-1) - 1).clamp(min=0)[:, new]  # [B, T]
        k_pos = torch.arange(S, device=device)
        causal_TS = k_pos[None, :] <= q_pos[:, None]  # [T, S]
        # Each query also sees itself, so a padding row never has every key masked (NaN in softmax).
        mask_BTS = (causal_TS & key_valid_BS[:, None, :]) | (k_pos[None, :] == q_pos[:, None])
        valid_BT = key_valid_BS[:, new]

        x = self.model.embed_tokens(input_ids)
        cos, sin = rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta, x.dtype)
        moe_index = 0
        for block in self.model.layers:
            forced_BTK = None
            if forced_routing is not None and block.is_moe:
                forced_BTK, moe_index = forced_routing[moe_index], moe_index + 1
            x = block(x, cos, sin, mask_BTS, valid_BT, cache, forced_BTK, input_pos)
        if routing is not None:
            for block in self.model.layers:
                if block.is_moe:
                    routing.append(block.mlp.last_routing)
                    block.mlp.last_routing = None
        if cache is not None and input_pos is None:
            cache.length = S
        x = self.model.norm(x)
        if targets is not None:  # inside forward, so FSDP2 has the head's weight gathered here
            return target_logprobs(x, self.lm_head.weight, targets, temperature)
        return x if hidden_only else self.lm_head(x)


def token_logprobs(model: CausalLM, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                   temperature: float = 1.0, routing: list | None = None,
                   forced_routing: torch.Tensor | None = None) -> torch.Tensor:
    """log p(x_{t+1} | x_{<=t}) [B, T-1] for input_ids [B, T] in one forward (e.g. teacher and student in OPD).

    Not decorated with no_grad: the student's log-probs need gradients; wrap the call for the teacher. Positions
    whose target x_{t+1} or context token x_t is padding (attention_mask 0) are set to 0, so with left padding
    row b holds log-probs of its real tokens 2..n in its last n-1 columns. `routing` collects the RouterOutputs for the
    Group Auxiliary Loss (every position is routed, the last one too). The log-probs come from the model's chunked
    head (target_logprobs): no [B, T, V] logits are ever held, whatever V and T are.
    forced_routing [L, B, T, K]: routing replay (CausalLM.forward).
    """
    targets_BT = torch.cat([input_ids[:, 1:], input_ids[:, -1:]], dim=1)  # the last position's target is unused
    out_BT = model(input_ids, attention_mask=attention_mask, routing=routing, targets=targets_BT,
                   temperature=temperature, forced_routing=forced_routing)[:, :-1]  # [B, T-1]
    if attention_mask is not None:
        real_BS = attention_mask.bool()
        out_BT = out_BT.masked_fill(~(real_BS[:, :-1] & real_BS[:, 1:]), 0.0)
    return out_BT
