"""FSDP2 sharding, activation checkpointing, and the mesh-aware pieces of a training step that need whole
tensors again: the full state dict for a checkpoint and the gradient-norm clip over every shard.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from zeda.distributed import Dist
from zeda.precision import clean_name


def apply_fsdp(model, d: Dist, compute_dtype: torch.dtype | None = None) -> None:
    """FSDP2 fully_shard over dp: one unit per block plus the root; parameters, gradients and optimizer state
    are sharded dp ways and gathered per block in forward and backward. Expert shards (ep) are left out: ep
    already splits them, and their gradients are reduced over their replicas by Dist.average_gradients.
    compute_dtype (training in bf16, zeda/precision.py): the model's fp32 parameters are the masters; each unit
    is gathered in compute_dtype for its forward and backward, and gradients are reduced in fp32."""
    if not d.dims.fsdp or d.dims.dp == 1:
        return
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from zeda.moe import Router

    dp_mesh = d.mesh["dp"]
    experts = {p for p in model.parameters() if getattr(p, "expert_shard", False)} or None
    # No input casting: the inputs already are what they must be (token ids, activations in compute_dtype), and
    # casting rebuilds the arguments, which would replace the `routing` list forward appends to with a copy.
    mixed = (MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)
             if compute_dtype else None)
    kwargs = {"mesh": dp_mesh, "ignored_params": experts} | ({"mp_policy": mixed} if mixed else {})
    for block in model.model.layers:
        # The router computes in fp32 (the training recipe): it is its own unit with no cast. FSDP2 also keeps
        # one dtype per unit, so an fp32 router in a bf16 block must be apart or fully_shard refuses the block.
        if mixed or len({p.dtype for p in block.parameters() if not experts or p not in experts}) > 1:
            for module in block.modules():
                if isinstance(module, Router):
                    fully_shard(module, mesh=dp_mesh)
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    if mixed:
        model.mixed_precision_dtype = compute_dtype


def apply_activation_checkpointing(model) -> None:
    """Recompute each block's activations in backward instead of keeping them (memory for compute)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    layers = model.model.layers
    for i, block in enumerate(layers):
        layers[i] = checkpoint_wrapper(block)


def full_state_dict(model, d: Dist, replace: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Every parameter and buffer as one whole tensor on CPU, under the single-process names (collective: all
    ranks call it). DTensors (tp, fsdp) are gathered with full_tensor(); expert shards with an all-gather over
    their ep group. Only rank 0, which writes the checkpoint, keeps them (the others get {}): every rank keeping
    a whole copy put the whole model in each rank's host RAM at every save (8 copies of Qwen3-30B-A3B's 61 GB
    on an 8-GPU node). replace: tensors to write in place of the model's, by name (this rank's fp32 masters of
    a bf16 model, zeda/precision.py, laid out as the parameters they stand for)."""
    out = {}
    for name, t in model.state_dict().items():
        name = clean_name(name)
        t = (replace or {}).get(name, t)
        if hasattr(t, "full_tensor"):
            t = t.full_tensor()
        elif d.dims.ep > 1 and name.rpartition(".")[0].endswith("mlp.experts"):
            parts = [torch.empty_like(t) for _ in range(d.dims.ep)]
            dist.all_gather(parts, t.contiguous(), group=d.ep_group)
            t = torch.cat(parts)
        if d.is_main:
            out[name] = t.detach().cpu()
        del t  # a gathered whole tensor, on a rank that does not write: freed before the next one
    return out


def clip_grad_norm(params, max_norm: float, d: Dist) -> torch.Tensor:
    """clip_grad_norm_ for any mesh, over the parameters the optimizer steps: DTensor gradients (tp, fsdp) are reduced over their mesh, and expert
    shards (ep) over their ep group, so every rank clips by the same norm, the single-process one."""
    grads, expert_sq, other_sq = [], [], []
    for p in params:
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
