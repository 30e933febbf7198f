"""The process mesh under torchrun: which rank holds which data, tensors and experts.

Parallelism is applied from outside the model (the model files never import torch.distributed): this file is the
mesh; zeda/expert_parallel.py, zeda/tensor_parallel.py and zeda/sharding.py (FSDP2, activation checkpointing)
apply each kind to a finished model; zeda/loading.py:load_model applies them in order as a checkpoint loads.

Under torchrun the world of W processes is laid out as a 2D DeviceMesh (dp, tp), W = dp x tp:

    dp  data parallel: ranks that see different sequences. Gradients are averaged over them (an all-reduce,
        or FSDP2's reduce-scatter with --fsdp, which also shards parameters and optimizer state over dp).
    tp  tensor parallel: ranks that see the same sequences and split each attention / dense MLP / shared
        expert by heads and columns (DTensor parallelize_module). Router and routed experts stay whole.
    ep  expert parallel: groups of ep consecutive ranks split the N real experts, N/ep each (see
        zeda/expert_parallel.py). The ep groups are replicas of each other: an expert's gradient is summed over
        the ranks that hold it. An ep group is made of whole tp groups (ep a multiple of tp).

NCCL on GPU, gloo on CPU; without torchrun there is one process and every helper here is a no-op. Every flag
combination is checked against the world size and the model before any work starts (ParallelDims).
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from zeda.device import pick_device
from zeda.errors import MeshError


# Parameters (by name) that tensor parallelism (zeda/tensor_parallel.py) leaves replicated but each rank applies to
# its own heads only, Qwen3's q/k norms: their gradient is partial, and Dist.average_gradients sums it over tp.
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


# Gradients are reduced in flat buckets of this many bytes, as DDP does (its bucket_cap_mb = 25): one collective
# per bucket instead of one per parameter (hundreds to thousands of small, latency-bound all-reduces a step),
# while the flat copy adds at most one bucket of memory.
BUCKET_BYTES = 25 * 2**20


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (tp, FSDP2) -- it shares the DTensor's storage -- or the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def buckets_of(tensors: list[torch.Tensor], bucket_bytes: int) -> list[list[torch.Tensor]]:
    """Consecutive runs of tensors of at most bucket_bytes each; a tensor larger than that is a bucket alone."""
    buckets, size = [], 0
    for t in tensors:
        nbytes = t.numel() * t.element_size()
        if not buckets or size + nbytes > bucket_bytes:
            buckets.append([])
            size = 0
        buckets[-1].append(t)
        size += nbytes
    return buckets


@torch.no_grad()
def all_reduce_in_buckets(tensors: list[torch.Tensor], group, divide_by: int = 1,
                          bucket_bytes: int = BUCKET_BYTES) -> None:
    """Sum tensors of one dtype and device over `group` in place, then divide by divide_by: one all_reduce per
    bucket. Each bucket is copied into one flat tensor and back; a bucket of one contiguous tensor is reduced
    where it is (the large expert weights: no copy). Every rank must pass the same shapes in the same order."""
    for bucket in buckets_of(tensors, bucket_bytes):
        if len(bucket) == 1 and bucket[0].is_contiguous():
            flat = bucket[0]
        else:
            flat = torch.cat([t.reshape(-1) for t in bucket])  # [sum of numel]
        dist.all_reduce(flat, group=group)
        if divide_by != 1:
            flat /= divide_by
        if flat is not bucket[0]:
            for t, part in zip(bucket, flat.split([t.numel() for t in bucket])):
                t.copy_(part.view_as(t))


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

    def average_gradients(self, named_params, bucket_bytes: int = BUCKET_BYTES) -> None:
        """After backward, over (name, parameter) pairs: the parameters the optimizer steps (a model's own, or the
        fp32 masters of a bf16 model, zeda/precision.py), each with .grad and, for an expert shard, .expert_shard.
        Each rank's loss is scaled so that the mean over dp ranks is the global-batch loss: average every
        replicated gradient over dp. An expert shard's gradient already holds its ep group's tokens (the
        all-to-all carried them back), so it is summed over the replicas of that shard and divided by dp. FSDP2
        reduces its own parameters in backward; they are skipped here. Under tp, Qwen3's per-head q/k RMSNorm
        weights (replicated, but each rank applies them to its own heads only) hold a partial gradient: it is
        summed over tp. (A hook on the parameter would not do: FSDP2 and to_empty replace Parameters.)
        The gradients are reduced in their own dtype, in flat buckets (all_reduce_in_buckets): one collective
        per bucket_bytes of gradients, not one per parameter."""
        named_params = list(named_params)
        if self.dims.tp > 1:
            partial = [local_tensor(p.grad) for name, p in named_params
                       if p.grad is not None and name.endswith(TP_PARTIAL_GRAD)]
            all_reduce_in_buckets(partial, self.mesh["tp"].get_group(), 1, bucket_bytes)
        if self.dp == 1:
            return
        dp_group = self._dp_group()
        by_group: dict[tuple, list[torch.Tensor]] = {}  # (group, dtype, device) -> local gradients
        for _, p in named_params:
            if not p.requires_grad or (self.dims.fsdp and not getattr(p, "expert_shard", False)):
                continue
            if p.grad is None:  # no token reached this parameter on this rank: it counts as zero
                p.grad = torch.zeros_like(p)
            grad = local_tensor(p.grad)
            group = self.edp_group if getattr(p, "expert_shard", False) else dp_group
            by_group.setdefault((group, grad.dtype, grad.device), []).append(grad)
        for (group, _, _), grads in by_group.items():  # insertion order: the same on every rank
            all_reduce_in_buckets(grads, group, self.dp, bucket_bytes)

    def agreed_signal(self, mine: str | None) -> str | None:
        """The stop signal that reached any rank (SIGTERM over SIGINT; None: none did), agreed by the whole world.
        Every rank calls it after the same step, so a signal that reaches one rank, or each rank at another
        moment, stops every rank after the same step with one checkpoint, instead of leaving the others waiting
        in a collective for a rank that left."""
        if self.world == 1:
            return mine
        code = torch.tensor([signal.Signals[mine].value if mine else 0], device=self.device)
        dist.all_reduce(code, op=dist.ReduceOp.MAX)
        return signal.Signals(int(code.item())).name if code.item() else None

    def ep_all_done(self, mine: bool) -> bool:
        """True when every rank of this expert-parallel group is done (generation's lockstep)."""
        flag = torch.tensor([int(mine)], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=self.ep_group)
        return bool(flag.item())

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


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
