"""Tensor parallelism with DTensor: attention, dense MLPs and shared experts split by heads and columns.

Router and routed experts stay whole on every tp rank (expert parallelism splits experts instead,
zeda/expert_parallel.py). The model code needs no change: attention reads its local head count from the
tensors. Replicated weights that each rank applies to its own heads only get a partial gradient, which is
summed over tp (zeda/distributed.py:TP_PARTIAL_GRAD, _rope_key_grad_summed here).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from zeda.distributed import Dist



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
        # Dist.average_gradients (zeda/distributed.py:TP_PARTIAL_GRAD).
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
