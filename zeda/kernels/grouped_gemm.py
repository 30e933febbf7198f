"""Grouped GEMMs over expert-sorted rows, forward and backward, for the fused MoE path.

Shape letters: T tokens, K slots per token, S = T*K (buffer upper bound), M real slots (device-side), N real
experts, H hidden size, I expert intermediate size. Weights are stacked nn.Linear weights: gate_up_proj
[N, 2I, H] (gate rows, then up rows; the kernels read its halves gate_proj, up_proj as [N, I, H] views) and
down_proj [N, H, I].

Rows are the real slots sorted by expert (zeda/kernels/permute.py); expert e owns rows
offsets[e] .. offsets[e+1]-1. The GEMMs that read token activations (x, dy) gather the row's token
t = slot // K straight from the [T, H] tensor, so no permuted copy of x or dy is ever written.

Tile schedule (device-side, no host sync, no tile straddling two experts -- the classic grouped-GEMM bug):
    tiles[e]   = cdiv(rows of e, BLOCK_M)              # every program recomputes this from offsets [N+1]
    tile_end   = cumsum(tiles)
    e          = #{e' : tile_end[e'] <= pid_m}         # the expert this M-tile belongs to
    rows       = offsets[e] + (pid_m - first tile of e) * BLOCK_M + arange(BLOCK_M), masked < offsets[e+1]
    The launch uses the upper bound min(S, cdiv(S, BLOCK_M) + N) M-tiles; programs past the real tile count
    (e == N) return at once.

Kernels (all accumulate in fp32):
    _gate_up_kernel   h = silu(x_t @ gate[e]^T) * (x_t @ up[e]^T)          [M, I]  (two accumulators, one read of x)
    _rows_gemm_kernel out = a @ b[e] (+ a2 @ b2[e])                         down forward [M, H]; dx rows [M, H]
    _down_bwd_kernel  dh = dy_t @ down[e], then the SwiGLU backward in the epilogue -> dg, du, w*h [M, I] and
                      per-tile partial sums of dh*h (the router-weight gradient)
    _wgrad_kernel     dW[e] = L_e^T @ R_e over the rows of expert e           dgate_up [N, 2I, H]; ddown [N, H, I]
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl


@dataclass(frozen=True)
class TileConfig:
    """Tile sizes. BLOCK_M: rows (slots) per tile, also the row chunk of the weight-gradient reduction;
    BLOCK_N: output columns; BLOCK_K: reduction chunk (the weight-gradient kernels use a BLOCK_N x BLOCK_K
    output tile)."""

    BLOCK_M: int
    BLOCK_N: int
    BLOCK_K: int
    num_warps: int = 4
    num_stages: int = 2


# ------------------------------------------------------------------------------------------ jit helpers


@triton.jit
def _expert_tile(pid_m, offsets_ptr, N, N_PAD: tl.constexpr, BLOCK_M: tl.constexpr):
    """Map M-tile pid_m to (expert e, first row, end row). e == N means past the last real tile: exit."""
    experts = tl.arange(0, N_PAD)  # [N_PAD]
    starts = tl.load(offsets_ptr + experts, mask=experts < N, other=0)
    ends = tl.load(offsets_ptr + experts + 1, mask=experts < N, other=0)
    tiles = (ends - starts + BLOCK_M - 1) // BLOCK_M  # [N_PAD], 0 for empty and padded experts
    tile_end = tl.cumsum(tiles, axis=0)
    e = tl.sum((tile_end <= pid_m).to(tl.int32), axis=0)
    this = experts == e
    first_tile = tl.sum(tl.where(this, tile_end - tiles, 0), axis=0)
    row_start = tl.sum(tl.where(this, starts, 0), axis=0) + (pid_m - first_tile) * BLOCK_M
    row_end = tl.sum(tl.where(this, ends, 0), axis=0)
    return e, row_start, row_end


@triton.jit
def _dot(a, b, acc, INTERPRET: tl.constexpr, PRECISION: tl.constexpr):
    """acc += a @ b. The interpreter mis-computes bf16 dots, so there (only) both sides go to fp32 first.
    PRECISION ("ieee" or "tf32") only matters for fp32 operands; see _dot_precision."""
    if INTERPRET:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


# ----------------------------------------------------------------------------------------------- kernels


@triton.jit
def _gate_up_kernel(
    x_ptr, gate_ptr, up_ptr,  # [T, H], then [N, I, H] each: the halves of gate_up_proj [N, 2I, H]
    h_ptr, g_ptr, u_ptr,  # [S, I] out: silu(g) * u, and (if SAVE_PREACT) the pre-activations g and u
    row_slot_ptr, offsets_ptr,  # [S] int32, [N + 1] int32
    N, H, I,
    stride_xt, stride_we, stride_wi,  # x and weights are contiguous along H (asserted by the launcher)
    stride_hm,  # h, g, u share one layout
    K: tl.constexpr, N_PAD: tl.constexpr, SAVE_PREACT: tl.constexpr,
    INTERPRET: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """h[m, :] = silu(gate[e] @ x[t]) * (up[e] @ x[t]) for the real rows m of one expert tile."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    e, row_start, row_end = _expert_tile(pid_m, offsets_ptr, N, N_PAD, BLOCK_M)
    if e >= N:  # device-side early exit: this program lies past the real tiles
        return
    rows = row_start + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    row_mask = rows < row_end  # the tile never spills into the next expert's rows
    slots = tl.load(row_slot_ptr + rows, mask=row_mask, other=0)
    tokens = (slots // K).to(tl.int64)  # gather x rows by token: no permuted copy of x
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N] over I
    col_mask = cols < I
    w_base = e.to(tl.int64) * stride_we + cols[None, :] * stride_wi  # [1, BLOCK_N]
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)  # [BLOCK_K] over H
        k_mask = ks < H
        a = tl.load(x_ptr + tokens[:, None] * stride_xt + ks[None, :],
                    mask=row_mask[:, None] & k_mask[None, :], other=0.0)  # [BLOCK_M, BLOCK_K]
        w_mask = k_mask[:, None] & col_mask[None, :]
        bg = tl.load(gate_ptr + w_base + ks[:, None], mask=w_mask, other=0.0)  # [BLOCK_K, BLOCK_N] = gate^T
        bu = tl.load(up_ptr + w_base + ks[:, None], mask=w_mask, other=0.0)
        acc_g = _dot(a, bg, acc_g, INTERPRET, PRECISION)  # one read of x feeds both projections
        acc_u = _dot(a, bu, acc_u, INTERPRET, PRECISION)
    h = acc_g * tl.sigmoid(acc_g) * acc_u  # SiLU-and-multiply in fp32
    out_off = rows.to(tl.int64)[:, None] * stride_hm + cols[None, :]
    out_mask = row_mask[:, None] & col_mask[None, :]
    tl.store(h_ptr + out_off, h.to(h_ptr.dtype.element_ty), mask=out_mask)
    if SAVE_PREACT:  # only when a backward will follow
        tl.store(g_ptr + out_off, acc_g.to(g_ptr.dtype.element_ty), mask=out_mask)
        tl.store(u_ptr + out_off, acc_u.to(u_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _rows_gemm_kernel(
    a_ptr, b_ptr, a2_ptr, b2_ptr,  # [S, R] rows, [N, ...] weights read as [R, C] per expert (and a second pair)
    out_ptr,  # [S, C]
    offsets_ptr,  # [N + 1] int32
    N, R, C,
    stride_am, stride_be, stride_br, stride_bc, stride_om,  # a's and out's column strides are 1
    N_PAD: tl.constexpr, TWO: tl.constexpr, INTERPRET: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """out[m, :] = a[m, :] @ b[e] (+ a2[m, :] @ b2[e]) over expert-sorted rows m; reduction length R."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    e, row_start, row_end = _expert_tile(pid_m, offsets_ptr, N, N_PAD, BLOCK_M)
    if e >= N:
        return
    rows = row_start + tl.arange(0, BLOCK_M)
    row_mask = rows < row_end
    rows64 = rows.to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N] over C
    col_mask = cols < C
    b_base = e.to(tl.int64) * stride_be + cols[None, :] * stride_bc  # [1, BLOCK_N]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, R, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < R
        a_off = rows64[:, None] * stride_am + ks[None, :]
        a_mask = row_mask[:, None] & k_mask[None, :]
        b_off = b_base + ks[:, None] * stride_br
        b_mask = k_mask[:, None] & col_mask[None, :]
        a = tl.load(a_ptr + a_off, mask=a_mask, other=0.0)  # [BLOCK_M, BLOCK_K]
        b = tl.load(b_ptr + b_off, mask=b_mask, other=0.0)  # [BLOCK_K, BLOCK_N]
        acc = _dot(a, b, acc, INTERPRET, PRECISION)
        if TWO:  # dx = dg @ gate[e] + du @ up[e]: one accumulator, one store
            a2 = tl.load(a2_ptr + a_off, mask=a_mask, other=0.0)
            b2 = tl.load(b2_ptr + b_off, mask=b_mask, other=0.0)
            acc = _dot(a2, b2, acc, INTERPRET, PRECISION)
    out_off = rows64[:, None] * stride_om + cols[None, :]
    tl.store(out_ptr + out_off, acc.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


@triton.jit
def _down_bwd_kernel(
    dy_ptr, down_ptr,  # [T, H] upstream gradient, [N, H, I]
    g_ptr, u_ptr, weights_ptr,  # [S, I] saved pre-activations, [S] fp32 router weights (flat slots)
    dg_ptr, du_ptr, wh_ptr, dw_part_ptr,  # [S, I] out x3, [S, n_tiles_I] fp32 out
    row_slot_ptr, offsets_ptr,
    N, H, I,
    stride_dyt, stride_de, stride_dh,  # down is contiguous along I
    stride_gm, stride_pm,
    K: tl.constexpr, N_PAD: tl.constexpr, INTERPRET: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """With o = down[e] @ h, h = silu(g) * u and y_t += w * o (per real row m of token t):
        dh_raw = down[e]^T @ dy_t       (this GEMM, gathered by token)
        dw     = <dy_t, o> = <dh_raw, h>  (partial sums over this I-tile; the launcher adds the tiles)
        dh = w * dh_raw;  du = dh * silu(g);  dg = dh * u * silu'(g);  wh = w * h (feeds d down)
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    e, row_start, row_end = _expert_tile(pid_m, offsets_ptr, N, N_PAD, BLOCK_M)
    if e >= N:
        return
    rows = row_start + tl.arange(0, BLOCK_M)
    row_mask = rows < row_end
    rows64 = rows.to(tl.int64)
    slots = tl.load(row_slot_ptr + rows, mask=row_mask, other=0)
    tokens = (slots // K).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N] over I
    col_mask = cols < I
    b_base = e.to(tl.int64) * stride_de + cols[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # dh_raw tile
    for k0 in range(0, H, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)  # over H
        k_mask = ks < H
        a = tl.load(dy_ptr + tokens[:, None] * stride_dyt + ks[None, :],
                    mask=row_mask[:, None] & k_mask[None, :], other=0.0)  # [BLOCK_M, BLOCK_K]
        b = tl.load(down_ptr + b_base + ks[:, None] * stride_dh,
                    mask=k_mask[:, None] & col_mask[None, :], other=0.0)  # [BLOCK_K, BLOCK_N] = down[e]
        acc = _dot(a, b, acc, INTERPRET, PRECISION)
    mask = row_mask[:, None] & col_mask[None, :]
    off = rows64[:, None] * stride_gm + cols[None, :]
    g = tl.load(g_ptr + off, mask=mask, other=0.0).to(tl.float32)  # [BLOCK_M, BLOCK_N]
    u = tl.load(u_ptr + off, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(weights_ptr + slots, mask=row_mask, other=0.0)  # [BLOCK_M] fp32
    sig = tl.sigmoid(g)
    silu = g * sig
    h = silu * u
    tl.store(dw_part_ptr + rows64 * stride_pm + pid_n, tl.sum(acc * h, axis=1), mask=row_mask)
    dh = acc * w[:, None]
    du = dh * silu
    dg = dh * u * sig * (1.0 + g * (1.0 - sig))  # silu'(g) = sig * (1 + g * (1 - sig))
    tl.store(dg_ptr + off, dg.to(dg_ptr.dtype.element_ty), mask=mask)
    tl.store(du_ptr + off, du.to(du_ptr.dtype.element_ty), mask=mask)
    tl.store(wh_ptr + off, (h * w[:, None]).to(wh_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _wgrad_kernel(
    l_ptr, l2_ptr, r_ptr,  # rows of the left operand(s) [*, P] and the right operand [*, Q]
    out_ptr, out2_ptr,  # [N, P, Q]
    row_slot_ptr, offsets_ptr,
    P, Q,
    stride_lm, stride_rm, stride_oe, stride_op,  # column strides are 1
    K: tl.constexpr, GATHER_L: tl.constexpr, GATHER_R: tl.constexpr, TWO: tl.constexpr,
    INTERPRET: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """out[e] = sum over rows m of expert e of L[m]^T R[m] (and out2[e] with L2), rows in sorted order.

    A GATHER_* operand is a [T, *] token tensor read at the row's token (slot // K). Experts without rows
    write zeros, so the output needs no zero-fill beforehand.
    """
    e = tl.program_id(0)
    pid_p = tl.program_id(1)
    pid_q = tl.program_id(2)
    row_start = tl.load(offsets_ptr + e)
    row_end = tl.load(offsets_ptr + e + 1)
    ps = pid_p * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N] over P
    qs = pid_q * BLOCK_K + tl.arange(0, BLOCK_K)  # [BLOCK_K] over Q
    p_mask = ps < P
    q_mask = qs < Q
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for r0 in range(row_start, row_end, BLOCK_M):  # fixed row order: deterministic reduction
        rows = r0 + tl.arange(0, BLOCK_M)  # [BLOCK_M]
        row_mask = rows < row_end
        rows64 = rows.to(tl.int64)
        if GATHER_L:  # token rows: t = slot // K
            l_idx = (tl.load(row_slot_ptr + rows, mask=row_mask, other=0) // K).to(tl.int64)
        else:
            l_idx = rows64
        if GATHER_R:
            r_idx = (tl.load(row_slot_ptr + rows, mask=row_mask, other=0) // K).to(tl.int64)
        else:
            r_idx = rows64
        l_off = l_idx[None, :] * stride_lm + ps[:, None]  # [BLOCK_N, BLOCK_M]: L^T tile
        l_mask = p_mask[:, None] & row_mask[None, :]
        rt = tl.load(r_ptr + r_idx[:, None] * stride_rm + qs[None, :],
                     mask=row_mask[:, None] & q_mask[None, :], other=0.0)  # [BLOCK_M, BLOCK_K]
        lt = tl.load(l_ptr + l_off, mask=l_mask, other=0.0)
        acc = _dot(lt, rt, acc, INTERPRET, PRECISION)
        if TWO:  # dgate and dup share the x tile
            lt2 = tl.load(l2_ptr + l_off, mask=l_mask, other=0.0)
            acc2 = _dot(lt2, rt, acc2, INTERPRET, PRECISION)
    out_off = e.to(tl.int64) * stride_oe + ps[:, None] * stride_op + qs[None, :]
    out_mask = p_mask[:, None] & q_mask[None, :]
    tl.store(out_ptr + out_off, acc.to(out_ptr.dtype.element_ty), mask=out_mask)
    if TWO:
        tl.store(out2_ptr + out_off, acc2.to(out2_ptr.dtype.element_ty), mask=out_mask)


# --------------------------------------------------------------------------------------------- launchers


def _interpreting() -> bool:
    return triton.knobs.runtime.interpret


def _dot_precision(dtype: torch.dtype) -> str:
    """fp32 dots follow torch's own switch: tl.dot defaults to TF32, torch.matmul (by default) does not.
    bf16 operands ignore the setting."""
    return "tf32" if dtype != torch.float32 or torch.backends.cuda.matmul.allow_tf32 else "ieee"


def _num_m_tiles(S: int, N: int, BLOCK_M: int) -> int:
    """Upper bound on the M-tiles of any routing: each expert adds at most one partial tile, and every tile
    holds at least one real row (so never more tiles than slots)."""
    return min(S, triton.cdiv(S, BLOCK_M) + N)


def _check_rows(name: str, t: torch.Tensor, S: int, dtype: torch.dtype) -> None:
    assert t.dim() == 2 and t.shape[0] == S and t.is_contiguous() and t.dtype == dtype, \
        f"{name}: want contiguous [{S}, *] {dtype}, got {tuple(t.shape)} {t.dtype}"


def gate_up_swiglu(x_TH, gate_proj, up_proj, row_slot_S, offsets_N1, top_k: int, cfg: TileConfig,
                   save_preact: bool):
    """h_SI = silu(x @ gate^T) * (x @ up^T) per expert-sorted row; also g_SI, u_SI when save_preact.

    gate_proj and up_proj are [N, I, H] views with one layout, contiguous along H (the two halves of the
    experts' [N, 2I, H] gate_up_proj). Returns (h [S, I], g [S, I] or None, u [S, I] or None); rows >= M are left
    undefined.
    """
    T, H = x_TH.shape
    N, I, _ = gate_proj.shape
    S = T * top_k
    assert x_TH.is_contiguous() and gate_proj.shape[2] == H
    assert gate_proj.stride(2) == 1 and up_proj.stride() == gate_proj.stride() and up_proj.shape == gate_proj.shape
    assert gate_proj.dtype == up_proj.dtype == x_TH.dtype
    h_SI = x_TH.new_empty(S, I)  # [S, I]; sized by the upper bound, only M rows are written
    g_SI = x_TH.new_empty(S, I) if save_preact else h_SI  # dummies are never written (SAVE_PREACT=False)
    u_SI = x_TH.new_empty(S, I) if save_preact else h_SI
    grid = (_num_m_tiles(S, N, cfg.BLOCK_M), triton.cdiv(I, cfg.BLOCK_N))
    if S > 0:
        _gate_up_kernel[grid](
            x_TH, gate_proj, up_proj,
            h_SI, g_SI, u_SI,
            row_slot_S, offsets_N1,
            N, H, I,
            x_TH.stride(0), gate_proj.stride(0), gate_proj.stride(1),
            h_SI.stride(0),
            K=top_k, N_PAD=triton.next_power_of_2(N), SAVE_PREACT=save_preact,
            INTERPRET=_interpreting(), PRECISION=_dot_precision(x_TH.dtype),
            BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    return h_SI, (g_SI if save_preact else None), (u_SI if save_preact else None)


def rows_gemm(a_SR, b_NRC, offsets_N1, cfg: TileConfig, a2_SR=None, b2_NRC=None):
    """out_SC[m] = a_SR[m] @ b_NRC[e] (+ a2_SR[m] @ b2_NRC[e]) for every expert-sorted row m of expert e.

    b_NRC is any [N, R, C] view (e.g. down_proj.transpose(1, 2) for the down projection); a is [S, R].
    """
    S, R = a_SR.shape
    N, R_b, C = b_NRC.shape
    assert R_b == R and a_SR.is_contiguous() and b_NRC.dtype == a_SR.dtype
    two = a2_SR is not None
    if two:
        assert a2_SR.shape == a_SR.shape and a2_SR.is_contiguous() and b2_NRC.stride() == b_NRC.stride()
        assert b2_NRC.shape == b_NRC.shape and b2_NRC.dtype == b_NRC.dtype
    out_SC = a_SR.new_empty(S, C)  # [S, C]
    grid = (_num_m_tiles(S, N, cfg.BLOCK_M), triton.cdiv(C, cfg.BLOCK_N))
    if S > 0:
        _rows_gemm_kernel[grid](
            a_SR, b_NRC, a2_SR if two else a_SR, b2_NRC if two else b_NRC,
            out_SC, offsets_N1,
            N, R, C,
            a_SR.stride(0), b_NRC.stride(0), b_NRC.stride(1), b_NRC.stride(2), out_SC.stride(0),
            N_PAD=triton.next_power_of_2(N), TWO=two,
            INTERPRET=_interpreting(), PRECISION=_dot_precision(a_SR.dtype),
            BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    return out_SC


def down_backward(dy_TH, down_proj, g_SI, u_SI, weights_S, row_slot_S, offsets_N1, top_k: int, cfg: TileConfig):
    """Backward through down, the router weight and SwiGLU. Returns dg_SI, du_SI, wh_SI and dw_S (fp32).

    dw_S [S] is the router-weight gradient per expert-sorted row (rows >= M undefined).
    """
    T, H = dy_TH.shape
    N, _, I = down_proj.shape
    S = T * top_k
    assert dy_TH.is_contiguous() and down_proj.is_contiguous() and down_proj.shape[1] == H
    _check_rows("g", g_SI, S, dy_TH.dtype)
    _check_rows("u", u_SI, S, dy_TH.dtype)
    assert weights_S.dtype == torch.float32 and weights_S.is_contiguous() and weights_S.numel() == S
    n_tiles_I = triton.cdiv(I, cfg.BLOCK_N)
    dg_SI, du_SI, wh_SI = (torch.empty_like(g_SI) for _ in range(3))  # [S, I] each
    dw_part_SP = torch.empty(S, n_tiles_I, dtype=torch.float32, device=dy_TH.device)  # [S, n_tiles_I]
    grid = (_num_m_tiles(S, N, cfg.BLOCK_M), n_tiles_I)
    if S > 0:
        _down_bwd_kernel[grid](
            dy_TH, down_proj,
            g_SI, u_SI, weights_S,
            dg_SI, du_SI, wh_SI, dw_part_SP,
            row_slot_S, offsets_N1,
            N, H, I,
            dy_TH.stride(0), down_proj.stride(0), down_proj.stride(1),
            g_SI.stride(0), dw_part_SP.stride(0),
            K=top_k, N_PAD=triton.next_power_of_2(N),
            INTERPRET=_interpreting(), PRECISION=_dot_precision(dy_TH.dtype),
            BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    # Summing the I-tiles here (not with atomics in the kernel) keeps dw deterministic.
    return dg_SI, du_SI, wh_SI, dw_part_SP.sum(1)


def expert_wgrad(l_rows, r_rows, row_slot_S, offsets_N1, top_k: int, cfg: TileConfig, out_dtype: torch.dtype,
                 gather_l: bool, gather_r: bool, l2_rows=None):
    """out[e] = L_e^T @ R_e ([N, P, Q]); with l2_rows, out[e] = [L_e, L2_e]^T @ R_e ([N, 2P, Q]: L's rows first,
    as the gradient of a gate_up_proj [N, 2I, H]).

    L rows are [S, P] expert-sorted rows, or [T, P] token rows when gather_l (likewise R, [*, Q]).
    """
    P, Q = l_rows.shape[1], r_rows.shape[1]
    N = offsets_N1.numel() - 1
    assert l_rows.is_contiguous() and r_rows.is_contiguous() and l_rows.dtype == r_rows.dtype
    two = l2_rows is not None
    if two:
        assert l2_rows.shape == l_rows.shape and l2_rows.is_contiguous() and l2_rows.dtype == l_rows.dtype
    # [N, P, Q] or [N, 2P, Q], every element written; out2 is the second half, with out's strides
    whole = torch.empty(N, 2 * P if two else P, Q, dtype=out_dtype, device=l_rows.device)
    out, out2 = whole.chunk(2, dim=1) if two else (whole, whole)
    grid = (N, triton.cdiv(P, cfg.BLOCK_N), triton.cdiv(Q, cfg.BLOCK_K))
    _wgrad_kernel[grid](
        l_rows, l2_rows if two else l_rows, r_rows,
        out, out2,
        row_slot_S, offsets_N1,
        P, Q,
        l_rows.stride(0), r_rows.stride(0), out.stride(0), out.stride(1),
        K=top_k, GATHER_L=gather_l, GATHER_R=gather_r, TWO=two,
        INTERPRET=_interpreting(), PRECISION=_dot_precision(l_rows.dtype),
        BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return whole
