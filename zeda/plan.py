"""Will it fit? An analytic per-GPU memory estimate for SFT, OPD and serving, from a config.json and a mesh.

    python -m zeda.plan --config Qwen3-30B-A3B/config.json --gpus 8 --ep 8 --fsdp --activation-checkpointing \
        --seq 8192 --batch 1 --gpu-memory-gb 80
    python -m zeda.plan --config ckpt/config.json --gpus 2 --ep 2 --seq 96 --batch 2 --device-kind cpu --json

Every number is bytes per rank, summed from terms that say what they hold (printed as GiB, one table per
stage). The formulas follow what zeda allocates, not a generic recipe:

- parameters are counted from the config part by part (tests check the count equals the zeda model's own);
  tp splits attention, dense MLPs and the shared expert, ep splits the routed experts, FSDP2 shards the rest
  over dp (and the experts too when there is no ep: with ep they are left to ep);
- training in bf16 computes in bf16 and steps fp32 masters (zeda/precision.py). Without FSDP2 the model holds
  bf16 parameters (the router in fp32) and each bf16 one has an fp32 master (4 bytes); backward leaves bf16
  gradients, which move into fp32 master gradients (4 bytes) before the step. Under FSDP2 the model's sharded
  fp32 parameters are the masters and their gradients arrive in fp32; expert shards left to ep follow the first
  rule. --dtype float32: everything fp32, no masters. The optimizer state follows the masters: AdamW keeps
  exp_avg and exp_avg_sq in fp32 (8 bytes); AdamW8bit (--optimizer adamw8bit, zeda/optim.py) keeps each as 8-bit
  codes plus an fp32 scale per block of 256 and a 256-entry code table, and fp32 moments for a tensor under
  4096 elements or not a whole number of blocks -- counted tensor by tensor on the rank's shards
  (trained_tensors). Both keep a step count per tensor on the CPU, left out;
- FSDP2 holds the root (embeddings, head, final norm) whole from forward to the end of backward, and a block
  whole while it runs (the next one prefetched), gathered in the compute dtype, with its gradient whole until
  the reduce-scatter, whose input it copies into one fp32 buffer (reduce_dtype);
- the optimizer step holds every gradient in fp32 and the optimizer's temporaries: torch's foreach AdamW (its
  default on CUDA when no parameter is a DTensor: no FSDP2, no tp) takes sqrt(exp_avg_sq) of every tensor at
  once; otherwise one tensor at a time, as torch's single-tensor AdamW (~2 fp32 copies) and AdamW8bit
  (dequantised moments and their codes: ~8 bytes an element compiled, ~53 eager, as a small model on a CPU
  steps) do;
- activations are those autograd keeps per token and layer (listed in activation_bytes_per_token), or only
  the block inputs with activation checkpointing plus one block recomputed; the loss head holds one chunk of
  fp32 logits (zeda/model.py:target_logprobs), never [B, T, V];
- OPD adds the frozen teacher (split like the student), the KV cache its sampling uses, and three forwards on
  the sampled sequences (teacher, old policy, new policy); serving is weights plus the KV cache.

--device-kind cpu predicts a CPU rehearsal (bench/real_shape.py), where the peak RSS also holds the Python
and torch baseline (--host-baseline-gb, measured by the rehearsal), the safetensors pages mapped while a shard
is read, torch.compile's own memory where AdamW8bit's step compiles (a large model), and on rank 0 the whole
model gathered for the checkpoint written at the end of training (host RAM, not GPU memory, on a GPU machine).
--device-kind gpu adds a fixed runtime reserve (CUDA context, NCCL buffers,
allocator slack) instead.

Shape letters: V vocabulary, H hidden, L layers, N real experts, Z zero experts, E = N + Z, K top-k, I expert
width, D head dim, B sequences per rank, T tokens per sequence.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

from zeda.config import ModelConfig
from zeda.distributed import ParallelDims
from zeda.errors import ConfigError, ZedaError
from zeda.flags import float_range, int_range
from zeda.model import HEAD_CHUNK_ELEMENTS
from zeda.optim import BLOCK_SIZE, COMPILE_FROM, OPTIMIZERS, quantizes

GiB = 1 << 30
DTYPE_BYTES = {"bfloat16": 2, "float32": 4}
FP32 = 4
# Temporaries of one AdamW8bit step per element of the tensor it steps (dequantised moments, their new codes),
# measured on a 32M-element tensor with torch 2.13: 8 bytes compiled by inductor (on CUDA, and on a CPU for a
# large model; the CPU's inductor measured for both), 53 bytes eager (a small model on a CPU, zeda/optim.py)
ADAMW8BIT_STEP_BYTES = {"compiled": 8, "eager": 53}
INDUCTOR_HOST = 0.24 * GiB  # RSS a CPU process gains with its first torch.compile'd call (measured, torch 2.13)
GPU_RUNTIME_RESERVE = 1.5 * GiB  # CUDA context (~0.5 GiB), NCCL buffers, caching-allocator fragmentation
DEFAULT_HOST_BASELINE = 0.45 * GiB  # RSS of `import train_sft` (torch, transformers, zeda) on the CPU VM


# ----------------------------------------------------------------------------- parameters

@dataclass
class ParamCounts:
    """Parameter elements of a model, by how the mesh splits them."""

    embedding: int  # embed_tokens [V, H]
    lm_head: int  # [V, H]; 0 when tied to the embedding
    final_norm: int  # [H]
    attention_split: int  # what tp splits by heads: Qwen3 q/k/v/o; MLA q_b/kv_b/o (or q_proj)
    attention_whole: int  # what tp leaves whole: q/k norms, MLA's q_a/kv_a and their norms
    layer_norms: int  # 2H per layer
    dense_mlp: int  # dense layers' SwiGLU, 3 * H * intermediate_size each (tp splits it)
    shared_experts: int  # GLM's shared expert, 3 * H * (I * n_shared) per MoE layer (tp splits it)
    routers: int  # [E, H] per MoE layer (replicated; fp32 in training)
    experts: int  # routed experts, 3 * N * I * H per MoE layer (ep splits them)

    @property
    def root(self) -> int:
        """What FSDP2's root unit holds: embedding, head, final norm."""
        return self.embedding + self.lm_head + self.final_norm

    @property
    def total(self) -> int:
        return (self.root + self.attention_split + self.attention_whole + self.layer_norms + self.dense_mlp
                + self.shared_experts + self.routers + self.experts)


def count_parameters(cfg: ModelConfig) -> ParamCounts:
    """Parameter elements of zeda's model for `cfg` (zeda/model.py, zeda/moe.py), counted from the shapes."""
    H, V, L = cfg.hidden_size, cfg.vocab_size, cfg.num_hidden_layers
    bias = cfg.attention_bias
    if cfg.is_mla:
        nh, nope, rope, vd = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        qk = nope + rope
        if cfg.q_lora_rank is None:
            q_split, q_whole = H * nh * qk, 0  # q_proj
        else:
            # q_a [q_lora, H] (+ bias) and its norm stay whole; q_b [nh*qk, q_lora] is split
            q_split, q_whole = cfg.q_lora_rank * nh * qk, H * cfg.q_lora_rank + cfg.q_lora_rank * (1 + bias)
        kv_a = H * (cfg.kv_lora_rank + rope) + (cfg.kv_lora_rank + rope) * bias  # kv_a_proj_with_mqa
        split = q_split + cfg.kv_lora_rank * nh * (nope + vd) + nh * vd * H + H * bias  # + kv_b, o_proj
        whole = q_whole + kv_a + cfg.kv_lora_rank  # + kv_a_layernorm
    else:
        nq, nkv, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        split = H * nq * D * 2 + H * nkv * D * 2  # q, o and k, v
        if bias:
            split += nq * D + 2 * nkv * D + H
        whole = 2 * D  # q_norm, k_norm on the head dim
    moe_layers = cfg.num_moe_layers
    return ParamCounts(
        embedding=V * H,
        lm_head=0 if cfg.tie_word_embeddings else V * H,
        final_norm=H,
        attention_split=L * split,
        attention_whole=L * whole,
        layer_norms=L * 2 * H,
        dense_mlp=(L - moe_layers) * 3 * H * cfg.intermediate_size,
        shared_experts=moe_layers * 3 * H * cfg.moe_intermediate_size * cfg.n_shared_experts,
        routers=moe_layers * cfg.num_router_outputs * H,
        experts=moe_layers * 3 * cfg.num_experts * cfg.moe_intermediate_size * H,
    )


# ----------------------------------------------------------------------------- the mesh

@dataclass(frozen=True)
class Mesh:
    gpus: int
    tp: int = 1
    ep: int = 1
    fsdp: bool = False

    @property
    def dp(self) -> int:
        return self.gpus // self.tp

    def check(self, cfg: ModelConfig, where: str) -> None:
        """The same checks train_sft.py makes before any work (zeda.distributed.ParallelDims)."""
        dims = ParallelDims.from_flags(self.gpus, 0, self.tp, self.ep, self.fsdp)
        dims.check_model(cfg, where)


@dataclass
class RankParams:
    """Parameter elements on one rank, and what FSDP2 gathers whole while a unit runs."""

    replicated_fp32_in_training: int  # routers (fp32 when training, the paper's recipe)
    other: int  # everything else on this rank
    fsdp_root_whole: int  # root unit gathered whole (0 without FSDP)
    fsdp_block_whole: int  # the largest block's FSDP-managed part gathered whole (0 without FSDP)

    @property
    def total(self) -> int:
        return self.replicated_fp32_in_training + self.other


def rank_params(cfg: ModelConfig, mesh: Mesh) -> RankParams:
    """How the mesh splits each part (zeda/tensor_parallel.py, zeda/expert_parallel.py, zeda/sharding.py)."""
    c = count_parameters(cfg)
    tp, ep = mesh.tp, mesh.ep
    fsdp = mesh.dp if mesh.fsdp and mesh.dp > 1 else 1  # FSDP2 shards over dp only
    experts = c.experts / ep / (fsdp if ep == 1 else 1)  # with ep, FSDP2 leaves the experts to ep
    tp_split = (c.attention_split + c.dense_mlp + c.shared_experts) / tp / fsdp
    whole = (c.root + c.attention_whole + c.layer_norms) / fsdp
    routers = c.routers / fsdp
    root_whole = block_whole = 0
    if fsdp > 1:
        L = cfg.num_hidden_layers
        root_whole = c.root
        # The largest block's FSDP-managed part: its attention and norms, its MLP or router (+ experts when ep
        # does not hold them); a dense block's MLP is counted when it is the larger.
        attn = (c.attention_split / tp + c.attention_whole + c.layer_norms) / L
        moe = (c.routers + c.shared_experts / tp + (c.experts if ep == 1 else 0)) / max(1, cfg.num_moe_layers)
        dense = c.dense_mlp / tp / max(1, L - cfg.num_moe_layers) if L > cfg.num_moe_layers else 0
        block_whole = attn + max(moe if cfg.num_moe_layers else 0, dense)
    return RankParams(int(routers), int(experts + tp_split + whole), int(root_whole), int(block_whole))


# What apply_tensor_parallel splits (zeda/tensor_parallel.py): by output rows (dim 0, weight and bias) and by
# input columns (dim 1, the weight; the bias stays whole). Routed experts are left to ep.
TP_BY_ROWS = {"q_proj", "k_proj", "v_proj", "q_b_proj", "kv_b_proj", "gate_proj", "up_proj"}
TP_BY_COLUMNS = {"o_proj", "down_proj"}


@dataclass
class TrainedTensor:
    """One trainable parameter as rank 0 holds it."""

    numel: int  # elements of its shard on this rank (the whole tensor when nothing splits it)
    ndim: int
    held_bytes: int  # its dtype in the model: 2 (bf16, with an fp32 master) or 4 (fp32, its own master)


def trained_tensors(cfg: ModelConfig, mesh: Mesh, dtype: str = "bfloat16") -> list[TrainedTensor]:
    """Every trainable parameter of zeda's model (built on the meta device: the model's own shapes), split as the
    mesh splits it on rank 0: ep takes dim 0 of the routed experts; tp splits attention, dense MLPs and the shared
    expert (TP_BY_ROWS, TP_BY_COLUMNS); FSDP2 takes dim 0 of the rest (and of the experts without ep) in chunks
    of ceil(rows / dp), rank 0's the largest. The optimizer state is per tensor: AdamW8bit decides 8-bit or fp32
    moments on each rank's own shard."""
    from zeda.loading import empty_model
    from zeda.moe import Router

    model = empty_model(cfg)
    routers = {id(p) for module in model.modules() if isinstance(module, Router) for p in module.parameters()}
    fsdp = mesh.dp if mesh.fsdp and mesh.dp > 1 else 1
    s = DTYPE_BYTES[dtype]
    out = []
    for name, p in model.named_parameters():
        module, _, kind = name.rpartition(".")
        shape = list(p.shape)
        if module.endswith("mlp.experts"):
            shape[0] //= mesh.ep
            by_fsdp = mesh.ep == 1
        else:
            layer = module.rpartition(".")[2]
            if layer in TP_BY_ROWS:
                shape[0] //= mesh.tp
            elif layer in TP_BY_COLUMNS and kind == "weight":
                shape[1] //= mesh.tp
            by_fsdp = True
        if by_fsdp and fsdp > 1:
            shape[0] = -(-shape[0] // fsdp)
        # fp32 in the model: a float32 run, the router (the paper's recipe), FSDP2's sharded masters
        fp32 = s == FP32 or id(p) in routers or (by_fsdp and fsdp > 1)
        out.append(TrainedTensor(math.prod(shape), len(shape), FP32 if fp32 else s))
    return out


def optimizer_state_bytes(tensors: list[TrainedTensor], optimizer: str) -> int:
    """exp_avg and exp_avg_sq of every tensor: fp32 for AdamW; for AdamW8bit, per moment the uint8 codes, one
    fp32 scale per block and the 256-entry fp32 code table (qmap), or fp32 where it does not quantize."""
    if optimizer == "adamw":
        return sum(2 * FP32 * t.numel for t in tensors)
    return sum(2 * (t.numel + t.numel // BLOCK_SIZE * FP32 + 256 * FP32) if quantizes(t.numel) else 2 * FP32 * t.numel
               for t in tensors)


# ----------------------------------------------------------------------------- activations

def activation_bytes_per_token(cfg: ModelConfig, dtype_bytes: int, tp: int = 1) -> dict[str, float]:
    """Bytes autograd keeps per token for one layer of each kind, training without checkpointing.

    s is the dtype size; fp32 terms are the RMSNorms (which normalise in fp32), the router (fp32 logits and
    scores) and the combine (the fp32 routing weights times the expert outputs). Every MoE slot is counted as
    real (the worst case: zero slots gather nothing). tp splits the per-head tensors."""
    s, H = dtype_bytes, cfg.hidden_size
    norms = 2 * (FP32 * 2 * H + s * H)  # input and post-attention RMSNorm: fp32 copy and product, output
    if cfg.is_mla:
        nh, qk, vd = cfg.num_attention_heads / tp, cfg.qk_nope_head_dim + cfg.qk_rope_head_dim, cfg.v_head_dim
        q_lora = cfg.q_lora_rank or 0
        attention = (s * (q_lora + 3 * nh * qk  # q_a out, q_b out, rope split and cat
                          + 2 * cfg.kv_lora_rank + cfg.qk_rope_head_dim  # latent, its norm, the rotary key
                          + 2 * nh * (cfg.qk_nope_head_dim + vd)  # kv_b out, split
                          + 2 * nh * qk  # k with the shared rotary key expanded to every head
                          + 2 * nh * vd)  # attention output, o_proj input
                     + FP32 * (2 * q_lora + 2 * cfg.kv_lora_rank))  # the latent RMSNorms in fp32
    else:
        nq, nkv, D = cfg.num_attention_heads / tp, cfg.num_key_value_heads / tp, cfg.head_dim
        attention = (s * (3 * (nq + 2 * nkv) * D  # q/k/v projections, their norms, rope
                          + 2 * 2 * nq * D  # k, v repeated to every query head (GQA)
                          + 2 * nq * D)  # attention output, o_proj input
                     + FP32 * 2 * (nq + nkv) * D)  # q/k RMSNorm in fp32
    K, I, E = cfg.num_experts_per_tok, cfg.moe_intermediate_size, cfg.num_router_outputs
    moe = (FP32 * 3 * E  # router logits, softmax/sigmoid scores, selection
           + s * (2 * K * H  # rows gathered per slot, and grouped_mm's padded copy
                  + 4 * K * I  # gate, up, silu(gate), their product
                  + 2 * K * H)  # expert output, scattered back per slot
           + FP32 * K * H)  # combine: the fp32 weights times the outputs
    shared = s * 4 * cfg.moe_intermediate_size * cfg.n_shared_experts / tp
    dense = s * 4 * cfg.intermediate_size / tp
    return {"attention": attention, "norms": norms, "moe": moe + shared, "dense_mlp": dense}


def activation_bytes(cfg: ModelConfig, tokens: int, seq: int, dtype_bytes: int, tp: int, checkpointing: bool,
                     grad: bool = True, device_kind: str = "gpu") -> dict[str, int]:
    """Activation terms for `tokens` tokens (B * T on this rank) through the whole model.

    grad=False (the teacher, the old policy, sampling): nothing is kept between layers; one layer's tensors
    exist at a time. With checkpointing, each block keeps only its input [tokens, H] and one block is
    recomputed at a time in backward."""
    per = activation_bytes_per_token(cfg, dtype_bytes, tp)
    moe_layers, L = cfg.num_moe_layers, cfg.num_hidden_layers
    layer_max = per["attention"] + per["norms"] + max(per["moe"] if moe_layers else 0,
                                                      per["dense_mlp"] if L > moe_layers else 0)
    all_layers = (L * (per["attention"] + per["norms"]) + moe_layers * per["moe"]
                  + (L - moe_layers) * per["dense_mlp"])
    s, H = dtype_bytes, cfg.hidden_size
    if not grad:
        kept = tokens * layer_max
    elif checkpointing:
        kept = tokens * (L * s * H + layer_max)
    else:
        kept = tokens * all_layers
    # The loss head: target_logprobs holds one chunk of fp32 logits at a time, [C, V] with C = 2**26 / V
    # tokens; logits, their exp for the logsumexp, and in backward their gradient: ~3 such buffers.
    chunk = min(tokens, max(1, HEAD_CHUNK_ELEMENTS // cfg.vocab_size))
    head = 3 * chunk * cfg.vocab_size * FP32 + tokens * H * (s + FP32)  # + the final hidden states
    # The attention mask [B, T, S] (bool), built once per forward; SDPA with a mask on GPU (memory-efficient
    # kernel) is O(T) per head. On CPU the math path materialises the scores [B, heads, T, S] in fp32.
    sequences = max(1, tokens // seq)
    mask = sequences * seq * seq
    if device_kind == "cpu":
        heads = cfg.num_attention_heads / tp
        mask += 2 * sequences * heads * seq * seq * FP32 * (L if grad and not checkpointing else 1)
    return {"activations": int(kept), "loss head": int(head), "attention mask/scores": int(mask)}


def kv_cache_bytes(cfg: ModelConfig, sequences: int, positions: int, dtype_bytes: int, tp: int = 1) -> int:
    """zeda's static KVCache (zeda/model.py): per layer k [B, heads, S, dk] and v [B, heads, S, dv]; MLA caches
    the expanded keys and values (not the latent), and tp caches only its own heads."""
    if cfg.is_mla:
        heads, dk, dv = cfg.num_attention_heads, cfg.qk_nope_head_dim + cfg.qk_rope_head_dim, cfg.v_head_dim
    else:
        heads, dk, dv = cfg.num_key_value_heads, cfg.head_dim, cfg.head_dim
    return int(cfg.num_hidden_layers * sequences * positions * (heads // tp) * (dk + dv) * dtype_bytes)


# ----------------------------------------------------------------------------- the stages

@dataclass
class Setup:
    mesh: Mesh
    seq: int  # tokens per sequence (SFT: the rollout; OPD: prompt + answer; serving: the context)
    batch: int  # sequences per rank (SFT: the micro-batch; OPD: the rank's samples; serving: concurrent ones)
    dtype: str = "bfloat16"
    checkpointing: bool = False
    device_kind: str = "gpu"  # "gpu" or "cpu" (a rehearsal's peak RSS)
    host_baseline: float = DEFAULT_HOST_BASELINE  # bytes, cpu only
    largest_shard: int = 0  # bytes, cpu only: mapped safetensors pages held on top of the model while loading
    answer_tokens: int = 0  # OPD: tokens sampled per answer (the KV cache holds seq positions in all)
    optimizer: str = "adamw"  # "adamw" or "adamw8bit" (zeda/optim.py)


def _student(cfg: ModelConfig) -> ModelConfig:
    """The converted student: Z = N/2 zero experts when the config is a static one (the paper's Z)."""
    if cfg.num_zero_experts:
        return cfg
    return ModelConfig.from_hf_config(cfg.hf_config, zce_nums=[cfg.num_experts // 2], zce_types=["zero"])


def _reserve(setup: Setup, rank0: bool) -> dict[str, int]:
    if setup.device_kind == "cpu":
        return {"python + torch baseline (measured)": int(setup.host_baseline)}
    return {"CUDA context, NCCL, allocator slack": int(GPU_RUNTIME_RESERVE)}


def _load_pages(cfg: ModelConfig, setup: Setup, rp: RankParams, s: int) -> int:
    """cpu: safetensors maps a shard while it is read, and the pages a process touches count in its RSS until
    the shard is closed: on top of the model, about one shard (--largest-shard-gb; bench/real_shape.py passes
    the exact figure for its shards), times the share of the model this rank reads (ep: its own experts)."""
    if setup.device_kind != "cpu":
        return 0
    share = min(1.0, (rp.total + rp.fsdp_root_whole) / count_parameters(cfg).total)
    return int(setup.largest_shard * share)


def training_moments(cfg: ModelConfig, setup: Setup, rank0: bool = True,
                     teacher: bool = False) -> tuple[dict[str, int], dict[str, dict[str, int]]]:
    """One training rank: what stays (parameters, fp32 masters, optimizer state, the teacher), and the terms of
    each of three moments that do not overlap -- backward (its gradients, FSDP2 units, activations, the loss
    head), the optimizer step (fp32 gradients, its temporaries) and, on cpu, the checkpoint written at the end
    (rank 0's gather)."""
    student = _student(cfg)
    s = DTYPE_BYTES[setup.dtype]
    mesh = setup.mesh
    rp = rank_params(student, mesh)
    tensors = trained_tensors(student, mesh, setup.dtype)
    elements = sum(t.numel for t in tensors)
    with_master = sum(t.numel for t in tensors if t.held_bytes < FP32)  # held in bf16, stepped as fp32 masters
    held = sum(t.numel * t.held_bytes for t in tensors)
    state_name = {"adamw": "AdamW exp_avg + exp_avg_sq (fp32)",
                  "adamw8bit": "AdamW8bit exp_avg + exp_avg_sq (8-bit codes + block scales)"}[setup.optimizer]
    terms = {
        "parameters": held,
        "fp32 master weights of the bf16 parameters": with_master * FP32,
        state_name: optimizer_state_bytes(tensors, setup.optimizer),
    }
    step_grads = {"gradients (fp32, the masters')": elements * FP32}
    tokens = setup.batch * setup.seq
    backward = {"gradients (in the parameters' dtype)": held}
    backward |= activation_bytes(student, tokens, setup.seq, s, mesh.tp, setup.checkpointing,
                                 device_kind=setup.device_kind)
    if rp.fsdp_root_whole:
        # root whole (params and, until its reduce-scatter, grads) + the running block and the prefetched one,
        # gathered in the compute dtype; each unit's reduce-scatter copies its gradient into one fp32 buffer
        blocks = min(2, student.num_hidden_layers)
        backward["FSDP2 gathered units"] = int(2 * rp.fsdp_root_whole * s + (blocks + 1) * rp.fsdp_block_whole * s
                                               + max(rp.fsdp_root_whole, rp.fsdp_block_whole) * FP32)
    if teacher:
        t = rank_params(cfg, mesh)
        terms["frozen teacher parameters"] = t.total * s
        if t.fsdp_root_whole:  # the teacher's root stays gathered after its no-grad forward
            backward["FSDP2 gathered units"] += int(t.fsdp_root_whole * s)
        # OPD samples first (no grad): the KV cache of its answers, when larger than the training activations
        cache = kv_cache_bytes(student, setup.batch, setup.seq, s, mesh.tp)
        backward["activations"] = max(backward["activations"], cache)
    largest = max(t.numel for t in tensors)
    if setup.optimizer == "adamw8bit":
        compiled = setup.device_kind == "gpu" or largest >= COMPILE_FROM  # as zeda.optim.step_compiled decides
        temporaries = {f"AdamW8bit temporaries, largest tensor ({'compiled' if compiled else 'eager'})":
                       largest * ADAMW8BIT_STEP_BYTES["compiled" if compiled else "eager"]}
        if compiled and setup.device_kind == "cpu":
            terms["torch.compile (inductor) for AdamW8bit's step (measured)"] = int(INDUCTOR_HOST)
    elif setup.device_kind == "gpu" and not (mesh.fsdp and mesh.dp > 1) and mesh.tp == 1:
        # foreach AdamW, one call per parameter group: the matrices' group is the larger
        temporaries = {"AdamW temporaries, sqrt(exp_avg_sq) of every tensor (foreach)":
                       sum(t.numel for t in tensors if t.ndim >= 2) * FP32}
    else:  # single-tensor AdamW: sqrt(exp_avg_sq) and its quotient, one tensor at a time
        temporaries = {"AdamW temporaries, largest tensor": largest * 2 * FP32}
    moments = {"backward": backward, "optimizer step": step_grads | temporaries}
    if setup.device_kind == "cpu" and rank0:
        # The checkpoint at the end: rank 0 (zeda.sharding.full_state_dict) makes whole fp32 copies of the masters
        # the mesh splits -- everything under FSDP2, the experts under ep, the split attention/MLPs under tp --
        # while its parameters, gradients and optimizer state are still there, then rounds every tensor to the
        # checkpoint's dtype (taken to be --dtype). Host RAM, not GPU memory, on a GPU machine.
        c = count_parameters(student)
        split = c.total if mesh.fsdp and mesh.dp > 1 else (
            (c.experts if mesh.ep > 1 else 0)
            + (c.attention_split + c.dense_mlp + c.shared_experts if mesh.tp > 1 else 0))
        moments["checkpoint save"] = step_grads | {
            "whole fp32 copies gathered for the checkpoint (rank 0)": split * FP32,
            "the whole model rounded to the checkpoint's dtype (rank 0)": c.total * s if s < FP32 else 0}
        if cfg.num_nextn_predict_layers:
            # GLM's MTP layers, which the model does not have, are read from the input checkpoint and written along
            # (zeda.checkpoint.mtp_tensors): per layer an MoE block, eh_proj [H, 2H], its own embedding and head.
            L, H, V = cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size
            block = ((c.attention_split + c.attention_whole + c.layer_norms) / L
                     + (c.routers + c.experts + c.shared_experts) / max(1, cfg.num_moe_layers))
            mtp = cfg.num_nextn_predict_layers * (block + 2 * H * H + 2 * V * H + 3 * H)
            moments["checkpoint save"]["GLM MTP layer carried over (rank 0)"] = int(mtp * s)
    return terms, moments


def _training_memory(cfg: ModelConfig, setup: Setup, rank0: bool, teacher: bool) -> dict[str, int]:
    """What stays plus the largest of the moments (training_moments), its terms named after it."""
    terms, moments = training_moments(cfg, setup, rank0, teacher)
    name, peak = max(moments.items(), key=lambda kv: sum(kv[1].values()))
    terms |= {f"{term} [{name}]": value for term, value in peak.items()}
    terms |= _reserve(setup, rank0)
    if setup.device_kind == "cpu":
        student = _student(cfg)
        terms["safetensors pages while loading"] = _load_pages(student, setup, rank_params(student, setup.mesh),
                                                               DTYPE_BYTES[setup.dtype])
    return terms


def sft_memory(cfg: ModelConfig, setup: Setup, rank0: bool = True) -> dict[str, int]:
    """One rank's peak during SFT (train_sft.py): parameters, fp32 masters, gradients, optimizer state,
    activations."""
    return _training_memory(cfg, setup, rank0, teacher=False)


def opd_memory(cfg: ModelConfig, setup: Setup, rank0: bool = True) -> dict[str, int]:
    """One rank's peak during OPD (train_opd.py): the student as in SFT on the sampled sequences (prompt +
    answer), plus the frozen teacher split the same way and the KV cache of the sampling; the no-grad teacher
    and old-policy forwards keep nothing between layers, so they add no more than the training forward."""
    return _training_memory(cfg, setup, rank0, teacher=True)


def serve_memory(cfg: ModelConfig, setup: Setup, rank0: bool = True) -> dict[str, int]:
    """One rank serving (zeda/generation.py, no FSDP): weights in --dtype, the KV cache of `batch` sequences of
    `seq` positions, one layer's prefill activations and the last position's logits."""
    s = DTYPE_BYTES[setup.dtype]
    served = Setup(Mesh(setup.mesh.gpus, setup.mesh.tp, setup.mesh.ep, False), setup.seq, setup.batch,
                   setup.dtype, device_kind=setup.device_kind)
    rp = rank_params(_student(cfg), served.mesh)
    terms = {"weights": rp.total * s,
             "KV cache": kv_cache_bytes(cfg, setup.batch, setup.seq, s, setup.mesh.tp)}
    prefill = activation_bytes(cfg, setup.batch * setup.seq, setup.seq, s, setup.mesh.tp, False, grad=False,
                               device_kind=setup.device_kind)
    terms["prefill (one layer at a time)"] = prefill["activations"] + prefill["attention mask/scores"]
    terms["last-position logits"] = setup.batch * cfg.vocab_size * (s + FP32)
    terms |= _reserve(setup, rank0)
    if setup.device_kind == "cpu":
        terms["safetensors pages while loading"] = _load_pages(cfg, setup, rp, s)
    return terms


def convert_memory(two_shards: int, host_baseline: float) -> dict[str, int]:
    """convert.py (cpu, one process) streams one shard at a time: while a shard is read, its tensors are copied
    out of the mapped file (copies + mapped pages ~ 2 x the shard), and the allocator may still hold the freed
    previous shard. The bound used: the largest two consecutive shards (measured 1.0-2.0 x the largest shard,
    bench/real_shape.py; docs/scaling.md)."""
    return {"two consecutive shards' tensors": two_shards, "python + torch baseline (measured)": int(host_baseline)}


STAGES = {"sft": sft_memory, "opd": opd_memory, "serve": serve_memory}


def plan(cfg: ModelConfig, setup: Setup, gpu_memory: float | None = None) -> dict:
    """Every stage's per-rank terms, total and whether it fits `gpu_memory` bytes (rank 0, the largest)."""
    out = {}
    for name, fn in STAGES.items():
        terms = fn(cfg, setup, rank0=True)
        total = sum(terms.values())
        out[name] = {"terms": terms, "total": total,
                     "fits": None if gpu_memory is None else bool(total <= gpu_memory)}
    return out


# ----------------------------------------------------------------------------- command line

def load_config(path: Path, layers: int | None) -> ModelConfig:
    """A config.json (or a model folder), with num_hidden_layers overridden by --layers."""
    if not path.exists():
        raise ConfigError(f"{path}: no such file (--config needs a config.json or a model folder)")
    overrides = {}
    if layers is not None:
        overrides["num_hidden_layers"] = layers
        if ModelConfig.from_hf_config(path).model_type == "glm4_moe_lite":
            overrides["mlp_layer_types"] = None  # rebuilt from first_k_dense_replace for the new layer count
    return ModelConfig.from_hf_config(path, **overrides)


def format_table(cfg: ModelConfig, setup: Setup, result: dict, gpu_memory: float | None) -> str:
    m = setup.mesh
    c = count_parameters(cfg)
    lines = [(f"{cfg.model_type}: {c.total / 1e9:.2f}B parameters ({c.experts / 1e9:.2f}B in routed experts), "
             f"{cfg.num_hidden_layers} layers; {m.gpus} {'ranks' if setup.device_kind == 'cpu' else 'GPUs'}, "
             f"dp={m.dp} tp={m.tp} ep={m.ep}{' fsdp' if m.fsdp else ''}"
             f"{' activation-checkpointing' if setup.checkpointing else ''}; {setup.batch} x {setup.seq} tokens "
             f"per rank, {setup.dtype}, {setup.optimizer}, {setup.device_kind}")]
    for name, r in result.items():
        lines.append("")
        lines.append(f"{name.upper():<74} GiB per rank")
        for term, value in r["terms"].items():
            if value:
                lines.append(f"  {term:<72} {value / GiB:8.2f}")
        verdict = "" if r["fits"] is None else (" fits" if r["fits"] else " DOES NOT FIT")
        budget = "" if gpu_memory is None else f" of {gpu_memory / GiB:.0f} GiB"
        lines.append(f"  {'total':<72} {r['total'] / GiB:8.2f}{budget}{verdict}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m zeda.plan", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", type=Path, required=True, help="a config.json (or a model folder)")
    p.add_argument("--gpus", type=int_range(min=1), required=True, help="ranks in all (GPUs, or CPU processes)")
    p.add_argument("--tp", type=int_range(min=1), default=1, help="tensor-parallel size")
    p.add_argument("--ep", type=int_range(min=1), default=1, help="expert-parallel size")
    p.add_argument("--fsdp", action="store_true", help="FSDP2 over dp")
    p.add_argument("--activation-checkpointing", action="store_true", help="recompute each block in backward")
    p.add_argument("--seq", type=int_range(min=2), required=True, help="tokens per sequence")
    p.add_argument("--batch", type=int_range(min=1), required=True, help="sequences per rank")
    p.add_argument("--answer-tokens", type=int_range(min=0), default=0,
                   help="OPD: tokens sampled per answer (the rest of --seq is the prompt; informational)")
    p.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPE_BYTES),
                   help="compute dtype (bfloat16: fp32 masters beside bf16 parameters)")
    p.add_argument("--optimizer", default="adamw", choices=OPTIMIZERS,
                   help="adamw (fp32 moments) or adamw8bit (8-bit moments, zeda/optim.py)")
    p.add_argument("--gpu-memory-gb", type=float_range(above=0), default=None,
                   help="memory per GPU in GiB, to say what fits (e.g. 80)")
    p.add_argument("--layers", type=int_range(min=1), default=None, help="override num_hidden_layers")
    p.add_argument("--device-kind", default="gpu", choices=["gpu", "cpu"],
                   help="gpu, or cpu: predict a CPU rehearsal's peak RSS (bench/real_shape.py)")
    p.add_argument("--host-baseline-gb", type=float_range(min=0), default=DEFAULT_HOST_BASELINE / GiB,
                   help="cpu: RSS of the Python/torch baseline in GiB (default %(default).2f)")
    p.add_argument("--largest-shard-gb", type=float_range(min=0), default=0.0,
                   help="cpu: the checkpoint's largest safetensors shard in GiB (mapped while loading)")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.config, args.layers)
        mesh = Mesh(args.gpus, args.tp, args.ep, args.fsdp)
        mesh.check(cfg, str(args.config))
        setup = Setup(mesh, args.seq, args.batch, args.dtype, args.activation_checkpointing, args.device_kind,
                      args.host_baseline_gb * GiB, int(args.largest_shard_gb * GiB), args.answer_tokens,
                      args.optimizer)
        budget = None if args.gpu_memory_gb is None else args.gpu_memory_gb * GiB
        result = plan(cfg, setup, budget)
    except ZedaError as e:
        print(f"zeda.plan: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"parameters": count_parameters(cfg).total, "mesh": vars(mesh) | {"dp": mesh.dp},
                          "seq": args.seq, "batch": args.batch, "dtype": args.dtype, "optimizer": args.optimizer,
                          "device_kind": args.device_kind, "gpu_memory_bytes": budget, **result}))
    else:
        print(format_table(cfg, setup, result, budget))
    return 0


if __name__ == "__main__":
    sys.exit(main())
