"""Expert parallelism: groups of ep ranks split each MoE layer's N real experts, N/ep each.

Tokens travel to the rank that holds their expert and back with all-to-all; only real slots are sent (zero
slots are dropped before dispatch, docs/method.md §2), so the traffic falls as the zero share rises. Zero
experts have no parameters: every rank "holds" them, and they never travel. Under tensor parallelism the tp
ranks of a group hold the same tokens; each dispatches a slice of them and all-gathers the outputs
(TokenSplitDispatcher), so no token is computed twice. zeda/loading.py:load_model splits the experts on the meta
device before any weight is read, so a rank reads only its own experts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from zeda.moe import LocalDispatcher
from zeda.tensor_parallel import _SumGradOverGroup

if TYPE_CHECKING:
    from zeda.distributed import Dist


class AllToAllDispatcher:
    """Expert-parallel dispatch: the LocalDispatcher's real slots, sorted by expert, are sent to the rank that
    holds their expert (experts [r*N/ep, (r+1)*N/ep) live on group rank r), computed there, and sent back.

    Two all-to-alls per direction: the row counts (ep x N/ep integers) and then the rows. Received rows arrive
    grouped by source rank; they are regrouped by local expert for the GEMMs and put back before the return
    trip. `rows_sent` counts every row this rank dispatched (= its real slots, the volume the bench reports).
    """

    def __init__(self, group, group_size: int):
        self.group, self.ep = group, group_size
        self.local = LocalDispatcher()
        self.rows_sent = 0
        self.bytes_sent = 0

    def dispatch(self, x_TH, ids_TK, keep_TK, num_experts):
        x_MH, counts_N, local_plan = self.local.dispatch(x_TH, ids_TK, keep_TK, num_experts)  # zero slots gone
        n_local = num_experts // self.ep
        send_counts = counts_N.view(self.ep, n_local)  # [ep, N/ep] rows for each rank's each expert
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts.contiguous(), group=self.group)  # [src, local expert]
        in_splits = send_counts.sum(1).tolist()  # host sync: the split sizes
        out_splits = recv_counts.sum(1).tolist()
        x_RH = _all_to_all(x_MH, out_splits, in_splits, self.group)  # [R, H]
        # Received rows are [source][local expert][row]: a stable sort by local expert groups them for the GEMMs.
        expert_R = torch.repeat_interleave(torch.arange(n_local, device=x_RH.device).repeat(self.ep),
                                           recv_counts.flatten())
        order_R = expert_R.argsort(stable=True)
        self.rows_sent += x_MH.shape[0]
        self.bytes_sent += x_MH.numel() * x_MH.element_size()
        return x_RH[order_R], recv_counts.sum(0), (local_plan, order_R, in_splits, out_splits, x_RH)

    def combine(self, y_RH, weights_TK, plan):
        local_plan, order_R, in_splits, out_splits, x_RH = plan
        if x_RH.requires_grad and not y_RH.requires_grad:
            # This rank received no rows, and the empty expert output fell off the autograd graph. Reconnect it:
            # every rank must take part in both backward all-to-alls, or the others wait forever.
            y_RH = y_RH + x_RH.sum() * 0
        y_RH = y_RH[order_R.argsort()]  # back to [source][local expert][row]
        y_MH = _all_to_all(y_RH, in_splits, out_splits, self.group)
        return self.local.combine(y_MH, weights_TK, local_plan)


class TokenSplitDispatcher:
    """Expert parallelism across tensor-parallel ranks: the tp ranks of a group hold the same tokens, so each one
    dispatches only its slice (rows [r*c, (r+1)*c), c = ceil(T/tp)) through the all-to-all dispatcher, and the
    combined slices are all-gathered back into every rank's [T, H].

    Gradients: what arrives at the layer output is the same on every tp rank (the rest of the model is
    replicated or DTensor), so the gather's backward keeps this rank's slice. The slice's input rows and routing
    weights then hold only this rank's share of their gradient, summed over tp on the way back
    (_SumGradOverGroup); the router's other path, the Group Auxiliary Loss on all tokens, is whole already."""

    def __init__(self, inner: AllToAllDispatcher, tp_group, tp: int, tp_rank: int):
        self.inner, self.group, self.tp, self.tp_rank = inner, tp_group, tp, tp_rank

    def _slice(self, T: int) -> slice:
        chunk = -(-T // self.tp)
        return slice(min(T, self.tp_rank * chunk), min(T, (self.tp_rank + 1) * chunk))

    def dispatch(self, x_TH, ids_TK, keep_TK, num_experts):
        own = self._slice(x_TH.shape[0])
        x_TH = _SumGradOverGroup.apply(x_TH, self.group)
        x_MH, counts, plan = self.inner.dispatch(x_TH[own], ids_TK[own], keep_TK[own], num_experts)
        return x_MH, counts, (plan, x_TH.shape[0])

    def combine(self, y_MH, weights_TK, plan):
        inner_plan, T = plan
        own = self._slice(T)
        weights_TK = _SumGradOverGroup.apply(weights_TK, self.group)
        y_own = self.inner.combine(y_MH, weights_TK[own], inner_plan)  # [own rows, H]
        return _GatherSlices.apply(y_own, T, self.group, self.tp, self.tp_rank)


class _GatherSlices(torch.autograd.Function):
    """Forward: every tp rank's slice of the T rows, concatenated (padded to equal chunks for all_gather).
    Backward: this rank's slice of the (replicated) gradient."""

    @staticmethod
    def forward(ctx, y_own, T, group, tp, tp_rank):
        chunk = -(-T // tp)
        ctx.rows = (min(T, tp_rank * chunk), min(T, (tp_rank + 1) * chunk))
        padded = y_own.new_zeros(chunk, y_own.shape[1])
        padded[: y_own.shape[0]] = y_own
        out = y_own.new_empty(tp * chunk, y_own.shape[1])
        dist.all_gather_into_tensor(out, padded.contiguous(), group=group)
        # rank r's slice sits at [r*chunk, r*chunk + its length); the padding rows are dropped
        lengths = [max(0, min(T, (r + 1) * chunk) - r * chunk) for r in range(tp)]
        return torch.cat([out[r * chunk: r * chunk + n] for r, n in enumerate(lengths)])

    @staticmethod
    def backward(ctx, grad_TH):
        lo, hi = ctx.rows
        return grad_TH[lo:hi].contiguous(), None, None, None, None


def _all_to_all(x, out_splits: list[int], in_splits: list[int], group):
    """Rows of x sent in blocks of in_splits, received in blocks of out_splits; differentiable (backward is the
    same exchange the other way round)."""
    from torch.distributed._functional_collectives import all_to_all_single_autograd, wait_tensor

    return wait_tensor(all_to_all_single_autograd(x.contiguous(), out_splits, in_splits, group))


def apply_expert_parallel(model, d: Dist) -> None:
    """Keep this rank's N/ep experts of every MoE layer and route through the all-to-all dispatcher. On a meta
    model (zeda.loading.load_model) nothing is allocated yet, and load_weights later reads only these experts; on a
    loaded one their rows are cloned and the rest freed. Parameters are marked `expert_shard` so gradient averaging and
    checkpoint gathering know them."""
    ep = d.dims.ep
    if ep == 1:
        return
    ep_rank = d.rank % ep
    for block in model.model.layers:
        if not block.is_moe:
            continue
        experts = block.mlp.experts
        n_local = experts.num_experts // ep
        experts.expert_offset = lo = ep_rank * n_local
        for name in ("gate_up_proj", "down_proj"):
            full = getattr(experts, name)
            shard = torch.nn.Parameter(full.data[lo:lo + n_local].clone(), requires_grad=full.requires_grad)
            setattr(experts, name, shard)
        experts.dispatcher = AllToAllDispatcher(d.ep_group, ep)
        if d.dims.tp > 1:
            experts.dispatcher = TokenSplitDispatcher(experts.dispatcher, d.mesh["tp"].get_group(), d.dims.tp,
                                                      d.tp_rank)
    mark_expert_shards(model)


def mark_expert_shards(model) -> None:
    """Tag the parameters of split experts (`p.expert_shard`); again after to_empty, which makes new Parameters."""
    for block in model.model.layers:
        if block.is_moe and block.mlp.experts.dispatcher is not None:
            for p in block.mlp.experts.parameters():
                p.expert_shard = True


def expert_traffic(model) -> dict:
    """Rows and bytes this rank's MoE layers dispatched through all-to-all so far."""
    rows = bytes_ = 0
    for block in model.model.layers:
        disp = getattr(block.mlp, "experts", None) and block.mlp.experts.dispatcher
        disp = getattr(disp, "inner", disp)  # TokenSplitDispatcher wraps the all-to-all one
        if isinstance(disp, AllToAllDispatcher):
            rows, bytes_ = rows + disp.rows_sent, bytes_ + disp.bytes_sent
    return {"rows_sent": rows, "bytes_sent": bytes_}
