"""Distributed training, applied from outside the model (the model files never import torch.distributed).

Under torchrun the world of W processes is laid out as a 2D DeviceMesh (dp, tp), W = dp x tp:

    dp  data parallel: ranks that see different sequences. Gradients are averaged over them (an all-reduce,
        or FSDP2's reduce-scatter with --fsdp, which also shards parameters and optimizer state over dp).
    tp  tensor parallel: ranks that see the same sequences and split each attention / dense MLP / shared
        expert by heads and columns (DTensor parallelize_module). Router and routed experts stay whole.
    ep  expert parallel: groups of ep consecutive ranks split the N real experts, N/ep each. Tokens travel to
        the rank that holds their expert and back with all-to-all; only real slots are sent (zero slots are
        dropped before dispatch), so the traffic falls as the zero share rises. The ep groups are replicas of
        each other: an expert's gradient is summed over the ranks that hold it. An ep group is made of whole
        tp groups (ep a multiple of tp); the tp ranks, which hold the same tokens, each dispatch a slice of them
        and all-gather the outputs (TokenSplitDispatcher), so no token is computed twice.

NCCL on GPU, gloo on CPU; without torchrun there is one process and every helper here is a no-op. Every flag
combination is checked against the world size and the model before any work starts (ParallelDims).
With --fsdp and --ep, FSDP2 shards everything but the experts, which ep already splits.
load_parallel builds the model on the meta device and splits its experts before reading any weight, so a rank
reads only its own experts. Generation under ep decodes in lockstep (Dist.ep_all_done): a rank whose rows are
finished keeps joining the all-to-alls until its whole group is done.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from zeda.moe import LocalDispatcher
from zeda.errors import MeshError  # noqa: F401  (re-exported)


# Parameters (by name) that tp leaves replicated but each rank applies to its own heads only: Qwen3's q/k norms.
TP_PARTIAL_GRAD = ("self_attn.q_norm.weight", "self_attn.k_norm.weight")




@dataclass(frozen=True)
class ParallelDims:
    dp: int
    tp: int
    ep: int
    fsdp: bool = False

    @classmethod
    def from_flags(cls, world: int, dp: int = 0, tp: int = 1, ep: int = 1, fsdp: bool = False) -> ParallelDims:
        """dp = 0 means inferred (world / tp). Errors name the flags and the world size."""
        for name, v in (("--tp", tp), ("--ep", ep)):
            if v < 1:
                raise MeshError(f"{name} must be >= 1, got {v}")
        if world % tp:
            raise MeshError(f"world size {world} is not a multiple of --tp {tp}")
        dp = dp or world // tp
        if dp * tp != world:
            raise MeshError(f"world size {world} is not --dp {dp} x --tp {tp}; launch {dp * tp} processes or fix "
                            f"the flags (--dp 0 infers it)")
        if world % ep:
            raise MeshError(f"--ep {ep} must divide the world size {world}")
        if ep > 1 and tp > 1 and ep % tp:
            raise MeshError(f"--ep {ep} must be a multiple of --tp {tp}: an expert-parallel group is made of whole "
                            f"tensor-parallel groups")
        return cls(dp, tp, ep, fsdp)

    def check_model(self, cfg, where: str = "model") -> None:
        """Shapes the mesh must divide: experts by ep, heads and MLP widths by tp."""
        if cfg.num_experts % self.ep:
            raise MeshError(f"{where}: --ep {self.ep} does not divide the {cfg.num_experts} routed experts")
        if self.tp == 1:
            return
        sizes = {"num_attention_heads": cfg.num_attention_heads, "intermediate_size": cfg.intermediate_size}
        if not cfg.is_mla:
            sizes["num_key_value_heads"] = cfg.num_key_value_heads
        if cfg.n_shared_experts:
            sizes["shared expert width"] = cfg.moe_intermediate_size * cfg.n_shared_experts
        for name, size in sizes.items():
            if size % self.tp:
                raise MeshError(f"{where}: --tp {self.tp} does not divide {name} = {size}")

    def describe(self) -> str:
        return f"dp={self.dp} tp={self.tp} ep={self.ep}{' fsdp' if self.fsdp else ''}"


@dataclass
class Dist:
    """This process's place in the mesh. dp_rank/dp index the data: ranks with the same dp_rank hold the same
    sequences (they differ in tp_rank). all_reduce sums over the data-parallel ranks."""

    rank: int = 0  # global process rank
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    dims: ParallelDims = field(default_factory=lambda: ParallelDims(1, 1, 1))
    mesh: object = None  # DeviceMesh (dp, tp) when world > 1
    ep_group: object = None  # this rank's expert-parallel group (ep consecutive dp ranks)
    edp_group: object = None  # the ranks holding the same experts as this one (one per ep group)

    @property
    def dp(self) -> int:
        return self.dims.dp

    @property
    def dp_rank(self) -> int:
        return self.rank // self.dims.tp

    @property
    def tp_rank(self) -> int:
        return self.rank % self.dims.tp

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def print(self, *args, **kwargs) -> None:
        """print on rank 0 only."""
        if self.is_main:
            print(*args, **kwargs, flush=True)

    def _dp_group(self):
        return self.mesh["dp"].get_group() if self.mesh is not None else None

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over the data-parallel ranks (a new tensor; the input is untouched and keeps no autograd link)."""
        out = t.detach().clone()
        if self.dp > 1:
            dist.all_reduce(out, group=self._dp_group())
        return out

    def average_gradients(self, model: torch.nn.Module) -> None:
        """After backward. Each rank's loss is scaled so that the mean over dp ranks is the global-batch loss:
        average every replicated gradient over dp. An expert shard's gradient already holds its ep group's
        tokens (the all-to-all carried them back), so it is summed over the replicas of that shard and divided by
        dp. FSDP2 reduces its own parameters in backward; they are skipped here. Under tp, Qwen3's per-head q/k
        RMSNorm weights (replicated, but each rank applies them to its own heads only) hold a partial gradient:
        it is summed over tp. (A hook on the parameter would not do: FSDP2 and to_empty replace Parameters.)"""
        if self.dims.tp > 1:
            for name, p in model.named_parameters():
                if p.grad is not None and name.endswith(TP_PARTIAL_GRAD):
                    grad = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad  # FSDP2: this rank's shard
                    dist.all_reduce(grad, group=self.mesh["tp"].get_group())
        if self.dp == 1:
            return
        for p in model.parameters():
            if not p.requires_grad or (self.dims.fsdp and not getattr(p, "expert_shard", False)):
                continue
            if p.grad is None:  # no token reached this parameter on this rank: it counts as zero
                p.grad = torch.zeros_like(p)
            grad = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad  # DTensor (tp) -> local shard
            group = self.edp_group if getattr(p, "expert_shard", False) else self._dp_group()
            dist.all_reduce(grad, group=group)
            grad /= self.dp

    def ep_all_done(self, mine: bool) -> bool:
        """True when every rank of this expert-parallel group is done (generation's lockstep)."""
        flag = torch.tensor([int(mine)], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=self.ep_group)
        return bool(flag.item())

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def pick_device(name: str = "auto") -> torch.device:
    """The one place a device is chosen: "auto" is cuda when available, else cpu; anything else is checked."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"bad device {name!r}: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but CUDA is not available here (use --device cpu)")
    return device


def init_distributed(device: str = "auto", dp: int = 0, tp: int = 1, ep: int = 1, fsdp: bool = False) -> Dist:
    """Read torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK), check the mesh flags, start the process
    group and build the (dp, tp) mesh and the expert-parallel groups."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    dims = ParallelDims.from_flags(world, dp, tp, ep, fsdp)  # before any process group: a bad mesh costs nothing
    dev = pick_device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    d = Dist(rank, world, local_rank, dev, dims)
    if world == 1:
        return d
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    from torch.distributed.device_mesh import init_device_mesh

    d.mesh = init_device_mesh(dev.type, (dims.dp, dims.tp), mesh_dim_names=("dp", "tp"))
    if dims.ep > 1:  # every rank must create every group, in the same order
        for start in range(0, world, dims.ep):
            g = dist.new_group(list(range(start, start + dims.ep)))
            if start <= rank < start + dims.ep:
                d.ep_group = g
        for offset in range(dims.ep):
            g = dist.new_group(list(range(offset, world, dims.ep)))
            if rank % dims.ep == offset:
                d.edp_group = g
    return d


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- expert parallelism

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
    model (load_parallel) nothing is allocated yet, and load_weights later reads only these experts; on a loaded
    one their rows are cloned and the rest freed. Parameters are marked `expert_shard` so gradient averaging and
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
        for name in ("gate_proj", "up_proj", "down_proj"):
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


# ----------------------------------------------------------------------------- tensor parallelism

def apply_tensor_parallel(model, d: Dist) -> None:
    """DTensor parallelize_module over the tp mesh: q/k/v (or MLA's q_b/kv_b) and gate/up split by columns
    (heads), o_proj and down_proj by rows, summed back with one all-reduce per block. The attention code reads
    the local head count from the tensors (view(B, T, -1, D)), so the model needs no change. Router, routed
    experts, norms and embeddings stay replicated; the router keeps computing in fp32."""
    if d.dims.tp == 1:
        return
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    tp_mesh = d.mesh["tp"]
    tp_group = tp_mesh.get_group()

    def mlp_plan(prefix):
        return {f"{prefix}.gate_proj": ColwiseParallel(), f"{prefix}.up_proj": ColwiseParallel(),
                f"{prefix}.down_proj": RowwiseParallel()}

    for block in model.model.layers:
        if model.config.is_mla:
            q = "q_proj" if model.config.q_lora_rank is None else "q_b_proj"
            plan = {f"self_attn.{q}": ColwiseParallel(), "self_attn.kv_b_proj": ColwiseParallel(),
                    "self_attn.o_proj": RowwiseParallel()}
        else:
            plan = {f"self_attn.{n}": ColwiseParallel() for n in ("q_proj", "k_proj", "v_proj")}
            plan["self_attn.o_proj"] = RowwiseParallel()
        if not block.is_moe:
            plan.update(mlp_plan("mlp"))
        elif block.mlp.shared_experts is not None:
            plan.update(mlp_plan("mlp.shared_experts"))
        parallelize_module(block, tp_mesh, plan)
        # Replicated weights that each rank applies to its own heads only get a partial gradient, summed over tp:
        # GLM's shared rotary key (a slice of kv_a_proj's output) here; Qwen3's per-head q/k RMSNorm weights in
        # Dist.average_gradients (TP_PARTIAL_GRAD).
        if model.config.is_mla:
            block.self_attn.kv_a_proj_with_mqa.register_forward_hook(_rope_key_grad_summed(model.config, tp_group))
    model.tensor_parallel = d.dims.tp  # generation sizes its KV cache by the local head count


def _all_reduce_sum(t, group):
    from torch.distributed._functional_collectives import all_reduce, wait_tensor

    return wait_tensor(all_reduce(t.contiguous(), "sum", group))


class _SumGradOverGroup(torch.autograd.Function):
    """Identity forward; backward sums the gradient over a group (Megatron's "copy to tensor-parallel region")."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce_sum(grad, ctx.group), None


def _rope_key_grad_summed(cfg, group):
    """Forward hook for MLA's kv_a_proj_with_mqa: its last qk_rope_head_dim outputs (the rotary key shared by all
    heads) feed only this rank's heads, so their gradient is summed over tp. The latent part goes through
    kv_b_proj, whose DTensor input already gets the summed gradient."""

    def hook(_module, _inputs, out):
        latent, k_rot = out.split([cfg.kv_lora_rank, cfg.qk_rope_head_dim], dim=-1)
        return torch.cat([latent, _SumGradOverGroup.apply(k_rot, group)], dim=-1)

    return hook


def apply_fsdp(model, d: Dist) -> None:
    """FSDP2 fully_shard over dp: one unit per block plus the root; parameters, gradients and optimizer state
    are sharded dp ways and gathered per block in forward and backward. Expert shards (ep) are left out: ep
    already splits them, and their gradients are reduced over their replicas by Dist.average_gradients."""
    if not d.dims.fsdp or d.dims.dp == 1:
        return
    from torch.distributed.fsdp import fully_shard

    dp_mesh = d.mesh["dp"]
    experts = {p for p in model.parameters() if getattr(p, "expert_shard", False)} or None
    for block in model.model.layers:
        fully_shard(block, mesh=dp_mesh, ignored_params=experts)
    fully_shard(model, mesh=dp_mesh, ignored_params=experts)


def apply_activation_checkpointing(model) -> None:
    """Recompute each block's activations in backward instead of keeping them (memory for compute)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    layers = model.model.layers
    for i, block in enumerate(layers):
        layers[i] = checkpoint_wrapper(block)


def load_parallel(path, d: Dist, dtype: torch.dtype = torch.float32, activation_checkpointing: bool = False,
                  router_fp32: bool = False, expert_backend: str | None = None, trainable: bool = True, **overrides):
    """A checkpoint folder's model, split over the mesh as it loads, in torchtitan's order with ep first: built on
    the meta device, its experts split (ep) before anything is allocated, so each rank reads only its own experts,
    the bulk of an MoE (~95% of Qwen3-30B-A3B). The dense part (attention, embeddings, dense MLPs) is read whole,
    one tensor at a time; then tp, activation checkpointing and FSDP2 (last) keep their part of it. ep and tp
    touch different modules, so their order is free. router_fp32: the router weights in fp32 whatever dtype (the
    paper's training recipe). trainable=False: a frozen model (the OPD teacher). One process: zeda.load_model."""
    from zeda import empty_model, materialize
    from zeda.checkpoint import load_weights
    from zeda.config import ModelConfig

    cfg = ModelConfig.from_hf_config(path, **overrides)
    d.dims.check_model(cfg, where=str(path))
    model = empty_model(cfg, dtype)
    if router_fp32:
        for block in model.model.layers:
            if block.is_moe:
                block.mlp.gate.float()
    apply_expert_parallel(model, d)
    materialize(model, d.device)
    mark_expert_shards(model)
    model.bytes_read = load_weights(model, path)  # what this rank read: the test checks it is only its share
    model.requires_grad_(trainable)
    if expert_backend is not None:
        model.set_expert_backend(expert_backend)
    apply_tensor_parallel(model, d)
    if activation_checkpointing:
        apply_activation_checkpointing(model)
    apply_fsdp(model, d)
    return model.eval()


# ----------------------------------------------------------------------------- whole tensors again

def full_state_dict(model, d: Dist) -> dict[str, torch.Tensor]:
    """Every parameter and buffer as one whole tensor on CPU, under the single-process names (collective: all
    ranks call it). DTensors (tp, fsdp) are gathered with full_tensor(); expert shards with an all-gather over
    their ep group."""
    out = {}
    for name, t in model.state_dict().items():
        name = name.replace("_checkpoint_wrapped_module.", "")
        if hasattr(t, "full_tensor"):
            t = t.full_tensor()
        elif d.dims.ep > 1 and name.rpartition(".")[0].endswith("mlp.experts"):
            parts = [torch.empty_like(t) for _ in range(d.dims.ep)]
            dist.all_gather(parts, t.contiguous(), group=d.ep_group)
            t = torch.cat(parts)
        out[name] = t.detach().cpu()
    return out


def clip_grad_norm(model, max_norm: float, d: Dist) -> torch.Tensor:
    """clip_grad_norm_ for any mesh: DTensor gradients (tp, fsdp) are reduced over their mesh, and expert
    shards (ep) over their ep group, so every rank clips by the same norm, the single-process one."""
    grads, expert_sq, other_sq = [], [], []
    for p in model.parameters():
        if p.grad is None:
            continue
        grads.append(p.grad)
        n = torch.linalg.vector_norm(p.grad.float())
        n = n.full_tensor() if hasattr(n, "full_tensor") else n
        (expert_sq if getattr(p, "expert_shard", False) else other_sq).append(n.double() ** 2)
    zero = torch.zeros((), dtype=torch.float64, device=d.device)
    expert = torch.stack(expert_sq).sum() if expert_sq else zero
    if d.dims.ep > 1:
        dist.all_reduce(expert, group=d.ep_group)
    total = ((torch.stack(other_sq).sum() if other_sq else zero) + expert).sqrt()
    scale = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(scale.to(g.dtype))
    return total.float()
