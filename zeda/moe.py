"""Mixture-of-Experts with zero experts: router -> dispatcher -> grouped experts -> combine (docs/method.md §2).

A MoE layer has N real routed experts and Z zero experts. Zero experts have no parameters and output exactly
zero, so a zero slot costs nothing: the dispatcher drops it before any row is gathered, and the expert GEMMs
only ever see real slots. The seams follow torchtitan:

    Router(x_TH)                    -> weights_TK (fp32), ids_TK, logits_TE (fp32)
    LocalDispatcher.dispatch(...)   -> x_MH sorted by expert, counts_N, and a plan to undo the sort
    expert_swiglu(x_MH, counts_N)   -> y_MH        (backends: "loop" reference, "grouped_mm", "triton")
    LocalDispatcher.combine(...)    -> y_TH = sum_k w_TK * y of that slot

The expert-parallel dispatcher (all-to-all, zeda/expert_parallel.py) replaces LocalDispatcher; the fused Triton
path (zeda/kernels) replaces dispatch + GEMMs + combine in one go. The "sorted" backend is the static-shape one
that the MoE block picks when the forward asks for static shapes (the compiled decode, zeda/generation.py): every
slot is sorted by expert, dropped ones past the last group, so no shape depends on how many slots are real.

Shape letters: T tokens, K slots per token (top-k), N real experts, Z zero experts, E = N + Z router outputs,
H hidden size, I expert intermediate size, M real slots (the rows that reach a GEMM).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from zeda.config import ModelConfig
from zeda.errors import UsageError

BACKENDS = ("loop", "grouped_mm", "triton")


class RouterOutput(NamedTuple):
    weights_TK: torch.Tensor  # [T, K] fp32 combine weights (zero slots keep theirs: docs/method.md §2)
    ids_TK: torch.Tensor  # [T, K] int64 expert ids; ids >= N are zero experts
    logits_TE: torch.Tensor  # [T, E] fp32 raw router logits (the Group Auxiliary Loss reads these)


class Router(nn.Module):
    """Top-K router over N + Z experts, in fp32 (docs/method.md §2; paper: router math in fp32).

    softmax (Qwen3): p = softmax(logits); top-K of p; with norm_topk_prob divide by the sum of the K chosen
        probabilities -- zero slots included in that sum, so real experts are *not* renormalised.
    sigmoid (GLM):   s = sigmoid(logits); choose top-K on s + e_score_correction_bias; weights are s at the
        chosen ids over their sum (zero slots included), times routed_scaling_factor.
    use_zce_mask sets the zero-expert logits (and, for sigmoid, their selection scores) to -inf, which makes
    the layer exactly the original static MoE.

    Routing replay (forced_ids_TK, train_opd.py --routing-replay): a token whose K ids are given (>= 0) is
    routed to exactly those experts -- the ones the sampler chose -- while its weights are still the current
    scores at those ids (normalised as above), so the router keeps its gradient. -1 lets the router choose.

    The baselines ZEDA is compared with and its compute dial (zeda/baselines.py) are not part of this class:
    they subclass it and override its two hooks, adjust_logits and adjust_slots, which here change nothing.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_experts = cfg.num_experts  # N
        self.top_k = cfg.num_experts_per_tok  # K
        self.scoring = cfg.router_scoring
        self.norm_topk_prob = cfg.norm_topk_prob
        self.routed_scaling_factor = cfg.routed_scaling_factor
        self.use_zce_mask = cfg.use_zce_mask
        self.weight = nn.Parameter(torch.empty(cfg.num_router_outputs, cfg.hidden_size))  # [E, H]
        if self.scoring == "sigmoid":
            # Selection-only bias, fp32 and never trained (DeepSeek-style aux-free balancing state).
            self.register_buffer("e_score_correction_bias", torch.zeros(cfg.num_router_outputs, dtype=torch.float32))

    def forward(self, x_TH: torch.Tensor, forced_ids_TK: torch.Tensor | None = None) -> RouterOutput:
        if self.use_zce_mask:
            # Score the N real rows only (the original computation, bit for bit), then report -inf for the
            # zero experts: softmax/top-k over an -inf-padded row could round differently.
            real_TN = F.linear(x_TH.float(), self.weight[: self.num_experts].float())
            logits_TE = F.pad(real_TN, (0, self.weight.shape[0] - self.num_experts), value=float("-inf"))
            scored_TE = real_TN
        else:
            logits_TE = F.linear(x_TH.float(), self.weight.float())  # [T, E]
            scored_TE = self.adjust_logits(logits_TE)
        if self.scoring == "softmax":
            probs_TE = scored_TE.softmax(dim=-1)
            raw_TK, ids_TK = probs_TE.topk(self.top_k, dim=-1)  # [T, K]
            eps = 0.0
        else:
            scores_TE = scored_TE.sigmoid()
            choice_TE = scores_TE + self.e_score_correction_bias[: scores_TE.shape[1]]
            ids_TK = choice_TE.topk(self.top_k, dim=-1, sorted=False).indices  # [T, K]
            raw_TK = scores_TE.gather(1, ids_TK)
            eps = 1e-20  # HF's epsilon
        if forced_ids_TK is not None:  # routing replay: the sampler's experts, weighted by the current scores
            replay_T1 = (forced_ids_TK >= 0).all(dim=-1, keepdim=True)
            ids_TK = torch.where(replay_T1, forced_ids_TK.to(ids_TK.dtype), ids_TK)
            # a gather at the router's own ids is its top-K values bit for bit: rows not replayed are unchanged
            raw_TK = (probs_TE if self.scoring == "softmax" else scores_TE).gather(1, ids_TK)
        raw_TK, ids_TK, eps = self.adjust_slots(raw_TK, ids_TK, eps)
        weights_TK = raw_TK
        if self.norm_topk_prob:  # ZEDA: zero slots stay in the sum, real experts are not renormalised (§2)
            weights_TK = raw_TK / (raw_TK.sum(dim=-1, keepdim=True) + eps)
        if self.scoring == "sigmoid":
            weights_TK = weights_TK * self.routed_scaling_factor
        return RouterOutput(weights_TK, ids_TK, logits_TE)

    # Where zeda/baselines.py:RoutingVariant plugs in; the method routes as computed.
    def adjust_logits(self, logits_TE: torch.Tensor) -> torch.Tensor:
        """The logits that choose and weight the experts ([T, E]); the method uses them as they are."""
        return logits_TE

    def adjust_slots(self, raw_TK: torch.Tensor, ids_TK: torch.Tensor, eps: float):
        """The K chosen slots' unnormalised weights and ids (and the normaliser's epsilon); the method keeps them."""
        return raw_TK, ids_TK, eps


class DispatchPlan(NamedTuple):
    slot_of_row_M: torch.Tensor  # [M] flat slot index (t * K + k) of each expert-sorted row
    num_tokens: int  # T
    top_k: int  # K


class LocalDispatcher:
    """Single-process dispatch: drop zero slots, sort the real ones by expert, gather their rows."""

    def dispatch(self, x_TH, ids_TK, keep_TK, num_experts):
        """keep_TK marks slots that must be computed (real expert and a real, non-padding token).

        Returns x_MH (rows sorted by expert), counts_N (rows per expert) and the plan to undo it.
        """
        T, K = ids_TK.shape
        slot_M = keep_TK.flatten().nonzero().squeeze(1)  # [M] host sync: M is data-dependent
        expert_M = ids_TK.flatten()[slot_M]
        expert_M, order = expert_M.sort(stable=True)  # stable: deterministic row order within an expert
        slot_M = slot_M[order]
        counts_N = torch.bincount(expert_M, minlength=num_experts)  # [N]
        # [M, H] only real slots are gathered; index_select, whose backward is an index_add_ of the M rows (x[i]'s
        # is an accumulating index_put_, slower on CPU)
        x_MH = x_TH.index_select(0, slot_M // K)
        return x_MH, counts_N, DispatchPlan(slot_M, T, K)

    def combine(self, y_MH, weights_TK, plan: DispatchPlan):
        """y_TH[t] = sum_k w[t, k] * y[slot (t, k)] over t's real slots, in fp32.

        On CPU each real row is weighted and added into its token's row (index_add_, which adds in row order:
        deterministic): only the M real rows are touched, so the work shrinks with the zero share, and a token
        whose slots are all zero stays exactly zero. Elsewhere index_add_ would use atomics (a run-dependent
        sum), so the rows are scattered into [T*K, H] slot order and summed over k there (deterministic)."""
        T, K = plan.num_tokens, plan.top_k
        if y_MH.device.type == "cpu":
            w_M1 = weights_TK.flatten()[plan.slot_of_row_M].unsqueeze(-1)  # [M, 1] fp32
            y_TH = y_MH.new_zeros(T, y_MH.shape[1], dtype=w_M1.dtype)  # [T, H] fp32
            return y_TH.index_add_(0, plan.slot_of_row_M // K, y_MH * w_M1).to(y_MH.dtype)
        y_SH = y_MH.new_zeros(T * K, y_MH.shape[1])  # [T*K, H]; zero slots stay exactly zero
        y_SH = y_SH.index_copy(0, plan.slot_of_row_M, y_MH)
        y_TKH = y_SH.view(T, K, y_MH.shape[1]) * weights_TK.unsqueeze(-1)  # fp32 weights: product in fp32
        return y_TKH.sum(dim=1).to(y_MH.dtype)  # [T, H]


def swiglu(gate_up_RI2):
    """silu(gate) * up of a [R, 2I] gate+up projection: gate in the first I columns, up in the last I."""
    gate_RI, up_RI = gate_up_RI2.chunk(2, dim=-1)
    return F.silu(gate_RI) * up_RI


def expert_swiglu_loop(x_MH, counts_N, gate_up_proj, down_proj):
    """The reference: one SwiGLU per expert over its contiguous rows. gate_up [N, 2I, H], down [N, H, I]."""
    outs = []
    # unbind once: indexing w[e] inside the loop makes autograd build a full [N, ...] zero gradient per expert
    gate_ups, downs = gate_up_proj.unbind(0), down_proj.unbind(0)
    for e, rows in enumerate(x_MH.split(counts_N.tolist())):  # host sync
        if rows.shape[0] == 0:
            continue
        h = swiglu(F.linear(rows, gate_ups[e]))  # [m, I]
        outs.append(F.linear(h, downs[e]))  # [m, H]
    return torch.cat(outs) if outs else x_MH.new_zeros(0, down_proj.shape[1])


def grouped_swiglu(x_RH, ends_N, gate_up_proj, down_proj):
    """SwiGLU of expert e over rows [ends_N[e-1], ends_N[e]) of x_RH: two torch._grouped_mm (gate and up in one),
    which read the group offsets themselves (no host sync). Rows past ends_N[-1] are not computed, and are left
    uninitialised in the result. The one grouped SwiGLU that the "grouped_mm" and "sorted" backends share."""
    offs = ends_N.to(torch.int32)
    h = swiglu(torch._grouped_mm(x_RH, gate_up_proj.transpose(-2, -1), offs=offs)).contiguous()  # [R, I]
    return torch._grouped_mm(h, down_proj.transpose(-2, -1), offs=offs)  # [R, H]


def grouped_mm_aligned(x_MH, intermediate: int) -> bool:
    """Whether torch._grouped_mm takes these rows: 16-byte aligned strides, H and I."""
    return (x_MH.shape[1] * x_MH.element_size()) % 16 == 0 and (intermediate * x_MH.element_size()) % 16 == 0


def expert_swiglu_grouped_mm(x_MH, counts_N, gate_up_proj, down_proj, align_rows: int | None = None):
    """torch._grouped_mm over the expert groups.

    _grouped_mm wants 16-byte aligned strides (H, I) and, on CUDA, group starts aligned likewise (torchtitan
    pads to 8 rows for bf16): there each group's rows are copied into a buffer padded to align_rows (default: 16
    bytes of rows on CUDA). Padding rows are zeros and are sliced off again, so they change nothing. On CPU a
    group may start at any row, so the rows go in as they are, with no copy and no host sync (align_rows 1).
    """
    elems = max(1, 16 // x_MH.element_size())
    H, I = x_MH.shape[1], down_proj.shape[2]
    if not grouped_mm_aligned(x_MH, I):
        raise UsageError(f"grouped_mm backend needs H={H} and I={I} to be multiples of {elems} for {x_MH.dtype}")
    align = align_rows or (1 if x_MH.device.type == "cpu" else elems)
    if align == 1:
        return grouped_swiglu(x_MH, counts_N.cumsum(0), gate_up_proj, down_proj)
    padded_N = (counts_N + align - 1) // align * align
    ends_N = padded_N.cumsum(0)
    total = int(ends_N[-1]) if ends_N.numel() else 0  # host sync: buffer size
    starts_N = ends_N - padded_N
    # Row r of group e sits at starts_N[e] + (r - first row of e): a per-row destination index.
    first_row_N = counts_N.cumsum(0) - counts_N
    expert_M = torch.repeat_interleave(torch.arange(len(counts_N), device=x_MH.device), counts_N)
    dest_M = starts_N[expert_M] + torch.arange(x_MH.shape[0], device=x_MH.device) - first_row_N[expert_M]
    xp = x_MH.new_zeros(total, H).index_copy(0, dest_M, x_MH)  # [M_padded, H]
    y = grouped_swiglu(xp, ends_N, gate_up_proj, down_proj)  # [M_padded, H]
    return y[dest_M]


EXPERT_SWIGLU = {"loop": expert_swiglu_loop, "grouped_mm": expert_swiglu_grouped_mm}


@torch.library.custom_op("zeda::expert_swiglu_sorted", mutates_args=())
def expert_swiglu_sorted(x_SH: torch.Tensor, ends_N: torch.Tensor, gate_up_proj: torch.Tensor,
                         down_proj: torch.Tensor) -> torch.Tensor:
    """The sorted backend's SwiGLU: rows grouped by expert as for the other backends (expert e's rows end at
    ends_N[e], the cumulative counts), but x_SH holds every slot, and rows past the last group (dropped slots) are
    not computed: they are left uninitialised, and the caller masks them with torch.where (not a multiply:
    uninitialised memory may hold NaN).

    An opaque op to torch.compile (torch._grouped_mm's meta function wants bf16, and Inductor has no CPU lowering
    for it), so the compiled graph calls it as it is. On CPU torch._grouped_mm runs one GEMM per non-empty group;
    on CUDA it needs bf16 and 16-byte aligned group starts, which this path does not pad to: it has not been run
    on a GPU. Shapes _grouped_mm does not take (H or I not 16-byte aligned: the tiny test models) run the loop
    reference over the rows inside the groups (a host sync, hidden from the compiled graph)."""
    if grouped_mm_aligned(x_SH, down_proj.shape[2]):
        return grouped_swiglu(x_SH, ends_N, gate_up_proj, down_proj)
    out_SH = x_SH.new_zeros(x_SH.shape[0], down_proj.shape[1])
    m = int(ends_N[-1])  # host sync
    counts_N = ends_N.diff(prepend=ends_N.new_zeros(1))
    out_SH[:m] = expert_swiglu_loop(x_SH[:m], counts_N, gate_up_proj, down_proj)
    return out_SH


@expert_swiglu_sorted.register_fake
def _(x_SH, ends_N, gate_up_proj, down_proj):
    return x_SH.new_empty(x_SH.shape[0], down_proj.shape[1])


def sorted_experts_forward(x_TH, weights_TK, ids_TK, keep_TK, gate_up_proj, down_proj):
    """The "sorted" backend: LocalDispatcher + grouped SwiGLU + combine with static shapes (no nonzero(), no
    host sync), what torch.compile needs. All T*K slots are sorted by expert, the dropped ones (keep False: zero
    experts, padding) sorted as expert N, past every group: the GEMMs compute only rows inside the groups, so
    dropped slots still cost no expert FLOPs, but every buffer is [T*K, ...] whatever the zero share."""
    T, K = ids_TK.shape
    N = gate_up_proj.shape[0]
    key_S = torch.where(keep_TK, ids_TK, N).flatten()  # [T*K] dropped slots sort as expert N, after all groups
    order_S = key_S.argsort(stable=True)  # stable: LocalDispatcher's row order within an expert
    counts_N = torch.zeros(N + 1, dtype=torch.long, device=x_TH.device).scatter_add_(
        0, key_S, torch.ones_like(key_S))[:N]  # rows per expert (bincount's output size is data-dependent)
    # the cumulative counts in the compiled graph, where they fuse, rather than inside the opaque op
    y_SH = expert_swiglu_sorted(x_TH[order_S // K], counts_N.cumsum(0), gate_up_proj, down_proj)  # dropped: junk
    y_SH = torch.empty_like(y_SH).index_copy_(0, order_S, y_SH)  # back to slot order t * K + k
    y_SH = torch.where(keep_TK.reshape(-1, 1), y_SH, 0.0)  # dropped slots: exactly zero
    y_TKH = y_SH.view(T, K, -1) * weights_TK.unsqueeze(-1)  # fp32 weights, as LocalDispatcher.combine
    return y_TKH.sum(dim=1).to(x_TH.dtype)


def routed_experts_forward(x_TH, weights_TK, ids_TK, gate_up_proj, down_proj, backend="loop", keep_TK=None,
                           dispatcher=None, num_experts=None):
    """y_TH = sum over real slots of w * SwiGLU_e(x): the whole routed path behind one function.

    keep_TK (optional) further drops slots, e.g. those of padding tokens; ids >= N are always dropped.
    dispatcher: where dispatch/combine happen (LocalDispatcher by default; expert parallelism swaps it, and
    then gate_up/down hold only this rank's experts while num_experts is the model's N).
    backend: one of BACKENDS, or "sorted" (static shapes, sorted_experts_forward; one process only).
    """
    N = gate_up_proj.shape[0] if num_experts is None else num_experts
    real_TK = ids_TK < N
    keep_TK = real_TK if keep_TK is None else keep_TK & real_TK
    if backend == "sorted":
        if dispatcher is not None:
            raise UsageError("the sorted (static-shape) expert backend does not support expert parallelism")
        return sorted_experts_forward(x_TH, weights_TK, ids_TK, keep_TK, gate_up_proj, down_proj)
    if backend == "triton" and dispatcher is None:
        from zeda.kernels import triton_moe

        return triton_moe(x_TH, weights_TK * keep_TK, torch.where(keep_TK, ids_TK, N), gate_up_proj, down_proj)
    dispatcher = dispatcher or LocalDispatcher()
    x_MH, counts_N, plan = dispatcher.dispatch(x_TH, ids_TK, keep_TK, N)  # counts of the experts held here
    expert_swiglu = EXPERT_SWIGLU["grouped_mm" if backend == "triton" else backend]  # the fused kernel has no EP seam
    y_MH = expert_swiglu(x_MH, counts_N, gate_up_proj, down_proj)
    return dispatcher.combine(y_MH, weights_TK, plan)


class GroupedExperts(nn.Module):
    """N real SwiGLU experts as 3D tensors: gate and up in one [N, 2I, H] tensor (one GEMM computes both, as in
    transformers 5), down [N, H, I]. Checkpoints keep HF's per-expert keys; zeda/checkpoint.py stacks them into
    these on load (gate rows first, then up) and splits them again on save."""

    def __init__(self, num_experts: int, hidden: int, intermediate: int):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate, hidden))  # [N, 2I, H]
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden, intermediate))  # [N, H, I]
        self.num_experts = num_experts  # N of the model; expert parallelism leaves N/ep of them here:
        self.expert_offset = 0  # experts [expert_offset, expert_offset + N/ep) (zeda.expert_parallel sets it)
        self.backend = "loop"
        self.dispatcher = None  # LocalDispatcher; zeda.expert_parallel.apply_expert_parallel sets an all-to-all one

    def forward(self, x_TH, weights_TK, ids_TK, keep_TK, backend: str | None = None):
        """backend: this call's, instead of self.backend ("sorted" when the forward needs static shapes)."""
        return routed_experts_forward(x_TH, weights_TK, ids_TK, self.gate_up_proj, self.down_proj,
                                      backend or self.backend, keep_TK, self.dispatcher, self.num_experts)


class MLP(nn.Module):
    """Dense SwiGLU (dense layers and GLM's shared expert)."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MoE(nn.Module):
    """Router + routed experts (+ GLM's shared expert). Module names match HF keys: mlp.gate, mlp.experts."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_experts = cfg.num_experts
        self.gate = Router(cfg)
        self.experts = GroupedExperts(cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size)
        self.shared_experts = (
            MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts) if cfg.n_shared_experts else None
        )

    def forward(self, x_BTH, valid_BT=None, forced_ids_BTK=None, static_shapes: bool = False):
        """valid_BT marks real tokens; padding tokens are routed (for shapes) but never reach a GEMM.
        forced_ids_BTK: routing replay (Router), -1 where the router chooses. static_shapes: the routed experts
        run the "sorted" backend (no shape depends on the routing: torch.compile's decode step).

        This layer's RouterOutput is kept in `last_routing` (for statistics and the GA loss; CausalLM.forward
        collects it). An attribute, not an appended list: wrappers such as FSDP2 may copy a list argument, and
        activation checkpointing re-runs forward in backward, which would append twice.
        """
        B, T, H = x_BTH.shape
        x_TH = x_BTH.reshape(B * T, H)
        r = self.gate(x_TH, None if forced_ids_BTK is None else forced_ids_BTK.reshape(B * T, -1))
        self.last_routing = r
        keep_TK = r.ids_TK < self.num_experts  # [T, K] zero slots are dropped here, before dispatch
        if valid_BT is not None:
            keep_TK = keep_TK & valid_BT.reshape(B * T, 1)
        y_TH = self.experts(x_TH, r.weights_TK, r.ids_TK, keep_TK, "sorted" if static_shapes else None)
        if self.shared_experts is not None:
            y_TH = y_TH + self.shared_experts(x_TH)
        return y_TH.view(B, T, H)
