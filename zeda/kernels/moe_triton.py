"""Fused routed-experts path for MoE layers with zero experts: permute -> grouped SwiGLU -> combine, in Triton.

Shape letters: T tokens, K slots per token (top-k), S = T*K slots, N real experts (ids >= N are zero experts),
H hidden size, I expert intermediate size, M real slots (ids < N; a device-side count, never read on the host).

Semantics (docs/method.md §2), with e = ids[t, k]:
    y[t] = sum_k [e < N] * w[t, k] * down[e] @ (silu(gate[e] @ x[t]) * (up[e] @ x[t]))
A zero slot keeps its weight in the router's normalisation but costs nothing here: it is dropped by the
counting sort before any buffer row, tile or GEMM (compacted, not remapped to a dummy expert), and no host sync
sizes anything: launches use the upper bound S and programs past the device-side real count exit at once.

Algorithm (forward):
    rows      = stable counting sort of the real slots by expert        # permute.py: histogram, scan, scatter
    h[m]      = silu(gate[e_m] @ x[t_m]) * (up[e_m] @ x[t_m])          # [M, I] one kernel, two accumulators
    o[m]      = down[e_m] @ h[m]                                       # [M, H]
    y[t]      = sum_k w[t, k] * o[row(t, k)]                           # gather-combine, fixed k order
Backward (all Triton, same tile schedule; see _TritonMoE.backward):
    dh_raw[m] = down[e_m]^T @ dy[t_m]; dw[t,k] = <dh_raw, h>; dg, du = SwiGLU backward of w * dh_raw
    dx rows   = gate[e]^T dg + up[e]^T du  ->  dx[t] = sum_k dx rows       (same gather-combine, no atomics)
    dgate_up[e] = [dg_e, du_e]^T x_e, ddown[e] = dy_e^T (w h)_e   (per-expert row reductions; gate rows first)

Why Triton for the backward rather than torch._grouped_mm: the rows stay unpadded (_grouped_mm wants
16-byte-aligned group offsets on CUDA, i.e. padding every expert to 8 bf16 rows and copying into a padded
buffer), x and dy are gathered by token inside the kernels (no permuted [M, H] copies), the router-weight
gradient and the SwiGLU backward are fused into the dh GEMM's epilogue, fp32 works on CUDA too, and forward
and backward share one device-side tile schedule, so nothing in the layer needs M on the host.

Limits: row buffers ([S, I], [S, H]) are allocated at the upper bound S = T*K, since sizing them by M would
need a host sync; rows >= M are never written or read, so they cost memory, not traffic. Tile configs are
untuned defaults (no GPU was available when this was written). torch.compile / CUDA-graph capture is designed
for (no host sync, fixed launch sizes) but untested.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from zeda.kernels.grouped_gemm import (
    TileConfig,
    _interpreting,
    down_backward,
    expert_wgrad,
    gate_up_swiglu,
    rows_gemm,
)
from zeda.kernels.permute import Permutation, moe_combine, moe_permute

DECODE_MAX_SLOTS = 1024  # T*K up to this is "decode": a few rows per expert, so short M tiles


def tile_config(num_tokens: int, top_k: int, dtype: torch.dtype = torch.bfloat16) -> TileConfig:
    """Tiles by token count (host-known, no sync). Untuned sane defaults, not an autotuned table.

    decode (T*K <= 1024, e.g. T <= 128 at K = 8): ~1-8 rows per expert, so BLOCK_M = 16 (tl.dot's minimum)
        and long reduction chunks; the work is reading weights, so more stages hide the loads.
    prefill: 64-row tiles; the gate-up kernel holds two BLOCK_M x BLOCK_N fp32 accumulators, hence 8 warps.
    fp32 halves BLOCK_K: its pipelined tiles are twice the bytes, and the H100 has 227 KiB of shared memory per
        block (tests/test_kernels.py compiles every kernel for sm_90 and checks this).
    interpreter (TRITON_INTERPRET=1): big tiles, because it pays per program, not per element.
    """
    if _interpreting():
        return TileConfig(BLOCK_M=32, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=1)
    k_div = 2 if dtype == torch.float32 else 1
    if num_tokens * top_k <= DECODE_MAX_SLOTS:
        return TileConfig(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128 // k_div, num_warps=4, num_stages=4)
    return TileConfig(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64 // k_div, num_warps=8, num_stages=3)


class _TritonMoE(torch.autograd.Function):
    """Autograd wrapper: forward runs permute + gate_up + down + combine; backward the five Triton kernels."""

    @staticmethod
    def forward(ctx, x_TH, weights_TK, ids_TK, gate_up_proj, down_proj, cfg: TileConfig, save: bool):
        T = x_TH.shape[0]
        K = ids_TK.shape[1]
        N = gate_up_proj.shape[0]
        gate_proj, up_proj = gate_up_proj.chunk(2, dim=1)  # [N, I, H] views: the kernels read both halves
        perm = moe_permute(ids_TK, N)
        h_SI, g_SI, u_SI = gate_up_swiglu(x_TH, gate_proj, up_proj, perm.row_slot_S, perm.expert_offsets_N1,
                                          K, cfg, save_preact=save)  # [S, I]
        o_SH = rows_gemm(h_SI, down_proj.transpose(1, 2), perm.expert_offsets_N1, cfg)  # [S, H]
        y_TH = moe_combine(o_SH, perm.slot_row_S, weights_TK, T, K, x_TH.dtype)  # [T, H]
        if save:
            ctx.save_for_backward(x_TH, weights_TK, gate_up_proj, down_proj, g_SI, u_SI, *perm)
            ctx.cfg, ctx.top_k = cfg, K
        return y_TH

    @staticmethod
    @once_differentiable
    def backward(ctx, dy_TH):
        x_TH, weights_TK, gate_up_proj, down_proj, g_SI, u_SI, *perm = ctx.saved_tensors
        gate_proj, up_proj = gate_up_proj.chunk(2, dim=1)
        perm = Permutation(*perm)
        cfg, K = ctx.cfg, ctx.top_k
        T = x_TH.shape[0]
        need_x, need_w, need_gate_up, need_down = (ctx.needs_input_grad[i] for i in (0, 1, 3, 4))
        # Autograd may hand over an expanded (stride-0) or otherwise strided gradient; the kernels gather rows.
        dy_TH = dy_TH.contiguous().to(x_TH.dtype)
        row_slot, offsets = perm.row_slot_S, perm.expert_offsets_N1
        dg_SI, du_SI, wh_SI, dw_S = down_backward(dy_TH, down_proj, g_SI, u_SI, weights_TK.view(-1),
                                                  row_slot, offsets, K, cfg)  # [S, I] x3, [S] fp32
        dx = dweights = dgate_up = ddown = None
        if need_x:
            dx_SH = rows_gemm(dg_SI, gate_proj, offsets, cfg, a2_SR=du_SI, b2_NRC=up_proj)  # [S, H]
            dx = moe_combine(dx_SH, perm.slot_row_S, None, T, K, x_TH.dtype)  # [T, H]
        if need_w:
            # Row -> slot: zero slots get exactly 0 (their weight does not reach the output of this layer).
            real = perm.slot_row_S >= 0
            dweights = torch.where(real, dw_S[perm.slot_row_S.clamp(min=0).long()], 0.0).view_as(weights_TK)
        if need_gate_up:
            dgate_up = expert_wgrad(dg_SI, x_TH, row_slot, offsets, K, cfg, gate_up_proj.dtype,
                                    gather_l=False, gather_r=True, l2_rows=du_SI)  # [N, 2I, H]
        if need_down:
            ddown = expert_wgrad(dy_TH, wh_SI, row_slot, offsets, K, cfg, down_proj.dtype,
                                 gather_l=True, gather_r=False)  # [N, H, I]
        return dx, dweights, None, dgate_up, ddown, None, None


def triton_moe(x_TH: torch.Tensor, weights_TK: torch.Tensor, ids_TK: torch.Tensor, gate_up_proj: torch.Tensor,
               down_proj: torch.Tensor, config: TileConfig | None = None) -> torch.Tensor:
    """Routed experts of one MoE layer: y_TH = sum over real slots of w * SwiGLU_e(x_t).

    x_TH [T, H] fp32/bf16; weights_TK [T, K] fp32; ids_TK [T, K] int (ids >= N are zero experts);
    gate_up_proj [N, 2I, H] (gate rows, then up rows) and down_proj [N, H, I] in x's dtype. Returns y_TH [T, H] in
    x's dtype, accumulated in fp32. Differentiable w.r.t. x, weights_TK and the two expert weights.
    `config` overrides the tile sizes of tile_config (tests use it to force tiny tiles).
    """
    assert x_TH.dim() == 2 and ids_TK.dim() == 2 and weights_TK.shape == ids_TK.shape
    assert ids_TK.shape[0] == x_TH.shape[0], "one row of ids per token"
    assert weights_TK.dtype == torch.float32, "router weights are fp32 (router math is fp32)"
    assert x_TH.dtype in (torch.float32, torch.bfloat16) and x_TH.dtype == gate_up_proj.dtype
    N, I2, H = gate_up_proj.shape
    assert x_TH.shape[1] == H and down_proj.shape == (N, H, I2 // 2), "want gate_up [N, 2I, H], down [N, H, I]"
    cfg = config or tile_config(x_TH.shape[0], ids_TK.shape[1], x_TH.dtype)
    tensors = (x_TH, weights_TK, gate_up_proj, down_proj)
    save = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    x_TH, weights_TK, ids_TK, gate_up_proj, down_proj = (
        t.contiguous() for t in (x_TH, weights_TK, ids_TK, gate_up_proj, down_proj))
    return _TritonMoE.apply(x_TH, weights_TK, ids_TK, gate_up_proj, down_proj, cfg, save)
