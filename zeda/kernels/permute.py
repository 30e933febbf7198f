"""Dispatch and combine for the fused MoE path: a counting sort that drops zero slots, and a gather-combine.

Shape letters: T tokens, K slots per token (top-k), S = T*K slots, N real experts, H hidden size,
M real slots (ids < N; known only on the device), B slot blocks of BLOCK_S slots.

Zero experts (ids >= N) output exactly zero, so their slots are dropped here, before any row buffer, grid or
GEMM sees them (compacted, not remapped to a dummy expert with weight 0, which would still be computed).
Everything is sized by the host-known upper bound S and the real count M lives only on the device (no .item(),
so torch.compile and CUDA graphs stay possible).

    permute (stable counting sort over the real slots):
        counts[b, e]  = #{slots s in block b : ids[s] == e}              # histogram kernel, zero ids ignored
        offsets[e]    = sum_{e' < e} sum_b counts[b, e']                  # exclusive scan, offsets[N] = M
        base[b, e]    = offsets[e] + sum_{b' < b} counts[b', e]           # where block b's rows of e start
        row(s)        = base[b, ids[s]] + #{s' < s in block b : ids[s'] == ids[s]}   # scatter kernel
        row_slot[row(s)] = s ;  slot_row[s] = row(s), or -1 for a zero slot
    The sort is stable (rows of an expert are in slot order), so the weight-gradient sums over rows are
    summed in a fixed order and two runs are bit-identical.

    combine (deterministic, no atomics):
        y[t] = sum_{k = 0..K-1, slot_row[t*K+k] >= 0} w[t, k] * src[slot_row[t*K+k]]     # fixed k order, fp32
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

PERMUTE_BLOCK_S = 128  # slots per program; the histogram is a [BLOCK_S, N_PAD] one-hot, small for N <= 256


class Permutation(NamedTuple):
    """Expert-sorted real slots. Buffers have the upper-bound length S; only the first M rows are defined."""

    row_slot_S: torch.Tensor  # [S] int32: flat slot (t*K + k) of each expert-sorted row; rows >= M undefined
    slot_row_S: torch.Tensor  # [S] int32: row of each slot, -1 for zero slots (never reach a GEMM)
    expert_offsets_N1: torch.Tensor  # [N + 1] int32: rows of expert e are offsets[e] .. offsets[e+1]-1


# ----------------------------------------------------------------------------------------------- kernels


@triton.jit
def _histogram_kernel(
    ids_ptr, counts_ptr,  # [S] expert ids (any int dtype), [B, N] int32 out
    S, N,
    N_PAD: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """counts[b, e] = number of slots of block b routed to real expert e (zero slots are not counted)."""
    b = tl.program_id(0)
    slots = b * BLOCK_S + tl.arange(0, BLOCK_S)  # [BLOCK_S]
    ids = tl.load(ids_ptr + slots, mask=slots < S, other=N)  # out-of-range slots look like zero slots
    real = ids < N
    experts = tl.arange(0, N_PAD)  # [N_PAD]
    onehot = (ids[:, None] == experts[None, :]) & real[:, None]  # [BLOCK_S, N_PAD]
    counts = tl.sum(onehot.to(tl.int32), axis=0)  # [N_PAD]
    tl.store(counts_ptr + b * N + experts, counts, mask=experts < N)


@triton.jit
def _scatter_kernel(
    ids_ptr, base_ptr,  # [S] expert ids, [B, N] int32 first row of (block b, expert e)
    row_slot_ptr, slot_row_ptr,  # [S] int32 out, [S] int32 out
    S, N,
    N_PAD: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """Place every real slot at its expert-sorted row; mark zero slots with row -1."""
    b = tl.program_id(0)
    slots = b * BLOCK_S + tl.arange(0, BLOCK_S)  # [BLOCK_S]
    in_range = slots < S
    ids = tl.load(ids_ptr + slots, mask=in_range, other=N)
    real = ids < N
    experts = tl.arange(0, N_PAD)
    onehot = ((ids[:, None] == experts[None, :]) & real[:, None]).to(tl.int32)  # [BLOCK_S, N_PAD]
    # Exclusive running count down the block: how many earlier slots of this block chose the same expert.
    # This rank is what makes the sort stable without atomics.
    rank = tl.cumsum(onehot, axis=0) - onehot  # [BLOCK_S, N_PAD]
    rank_in_block = tl.sum(rank * onehot, axis=1)  # [BLOCK_S], 0 for zero slots
    safe_ids = tl.where(real, ids, 0)
    base = tl.load(base_ptr + b * N + safe_ids, mask=real, other=0)  # [BLOCK_S]
    rows = base + rank_in_block
    tl.store(row_slot_ptr + rows, slots, mask=real)
    tl.store(slot_row_ptr + slots, tl.where(real, rows, -1), mask=in_range)


@triton.jit
def _combine_kernel(
    src_ptr, slot_row_ptr, weights_ptr, out_ptr,  # [S, H] rows, [S] int32, [S] fp32 (or unused), [T, H] out
    T, H,
    stride_src_m, stride_out_t,  # the H stride of both is 1 (asserted by the launcher)
    K: tl.constexpr, HAS_WEIGHTS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """out[t, h] = sum_k w[t, k] * src[slot_row[t, k], h] over real slots, in k order, fp32 accumulation."""
    pid_t = tl.program_id(0)
    pid_h = tl.program_id(1)
    tokens = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)  # [BLOCK_T]
    cols = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)  # [BLOCK_H]
    t_mask = tokens < T
    h_mask = cols < H
    acc = tl.zeros((BLOCK_T, BLOCK_H), dtype=tl.float32)
    for k in tl.static_range(K):  # fixed order over the K slots of a token: deterministic sum
        slots = tokens * K + k
        rows = tl.load(slot_row_ptr + slots, mask=t_mask, other=-1)  # [BLOCK_T]
        real = rows >= 0  # zero slots are skipped, never read
        vals = tl.load(
            src_ptr + rows.to(tl.int64)[:, None] * stride_src_m + cols[None, :],
            mask=real[:, None] & h_mask[None, :], other=0.0,
        ).to(tl.float32)  # [BLOCK_T, BLOCK_H]
        if HAS_WEIGHTS:
            w = tl.load(weights_ptr + slots, mask=real, other=0.0)  # [BLOCK_T] fp32 router weights
            vals = vals * w[:, None]
        acc += vals
    out_ptrs = out_ptr + tokens.to(tl.int64)[:, None] * stride_out_t + cols[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=t_mask[:, None] & h_mask[None, :])


# --------------------------------------------------------------------------------------------- launchers


def moe_permute(ids_TK: torch.Tensor, num_experts: int) -> Permutation:
    """Stable counting sort of the real slots of ids_TK [T, K] by expert; ids >= num_experts are dropped.

    No host sync: two Triton launches over B = cdiv(S, BLOCK_S) blocks and a device-side scan in between.
    """
    assert ids_TK.dim() == 2 and not ids_TK.is_floating_point(), "ids_TK must be an integer [T, K] tensor"
    assert num_experts >= 1
    ids_S = ids_TK.contiguous().view(-1)  # [S]
    S, N, dev = ids_S.numel(), num_experts, ids_S.device
    row_slot_S = torch.empty(S, dtype=torch.int32, device=dev)  # rows >= M are never read
    slot_row_S = torch.empty(S, dtype=torch.int32, device=dev)
    if S == 0:
        return Permutation(row_slot_S, slot_row_S, torch.zeros(N + 1, dtype=torch.int32, device=dev))
    B = triton.cdiv(S, PERMUTE_BLOCK_S)
    N_PAD = triton.next_power_of_2(N)
    counts_BN = torch.empty(B, N, dtype=torch.int32, device=dev)  # [B, N]
    _histogram_kernel[(B,)](ids_S, counts_BN, S, N, N_PAD=N_PAD, BLOCK_S=PERMUTE_BLOCK_S)
    # Exclusive scans on the device (tiny tensors: B*N ints). torch.cumsum is deterministic for integers.
    counts_N = counts_BN.sum(0, dtype=torch.int32)  # [N]
    expert_offsets_N1 = torch.zeros(N + 1, dtype=torch.int32, device=dev)  # [N + 1]
    expert_offsets_N1[1:] = counts_N.cumsum(0, dtype=torch.int32)
    base_BN = expert_offsets_N1[:-1] + counts_BN.cumsum(0, dtype=torch.int32) - counts_BN  # [B, N]
    _scatter_kernel[(B,)](
        ids_S, base_BN.contiguous(),
        row_slot_S, slot_row_S,
        S, N, N_PAD=N_PAD, BLOCK_S=PERMUTE_BLOCK_S,
    )
    return Permutation(row_slot_S, slot_row_S, expert_offsets_N1)


def moe_combine(src_SH: torch.Tensor, slot_row_S: torch.Tensor, weights_TK: torch.Tensor | None,
                num_tokens: int, top_k: int, out_dtype: torch.dtype) -> torch.Tensor:
    """y_TH[t] = sum_k w[t, k] * src_SH[slot_row[t*K + k]] over real slots (w = 1 when weights_TK is None).

    src_SH [S, H] holds one row per real slot (expert-sorted, first M rows); out [T, H] in out_dtype.
    """
    T, K = num_tokens, top_k
    H = src_SH.shape[1]
    assert src_SH.dim() == 2 and src_SH.stride(1) == 1, "src rows must be contiguous along H"
    assert slot_row_S.dtype == torch.int32 and slot_row_S.numel() == T * K
    if weights_TK is not None:
        assert weights_TK.dtype == torch.float32 and weights_TK.shape == (T, K) and weights_TK.is_contiguous()
    out_TH = torch.empty(T, H, dtype=out_dtype, device=src_SH.device)  # [T, H]
    if T == 0 or H == 0:
        return out_TH.zero_()
    BLOCK_T, BLOCK_H = 16, min(256, triton.next_power_of_2(H))
    grid = (triton.cdiv(T, BLOCK_T), triton.cdiv(H, BLOCK_H))
    _combine_kernel[grid](
        src_SH, slot_row_S, weights_TK if weights_TK is not None else slot_row_S, out_TH,  # dummy ptr if unused
        T, H,
        src_SH.stride(0), out_TH.stride(0),
        K=K, HAS_WEIGHTS=weights_TK is not None, BLOCK_T=BLOCK_T, BLOCK_H=BLOCK_H,
    )
    return out_TH
