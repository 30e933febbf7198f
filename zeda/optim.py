"""The optimizer of both training stages, and its state as plain tensors for a checkpoint.

The optimizer steps a list of (name, parameter) pairs, not a model: with a bf16 model those are the fp32 masters
(zeda/precision.py), with an fp32 model the model's own parameters. Its state is saved as safetensors keyed
'<parameter name>::<field>' (no pickle), the local shard of a sharded (DTensor) parameter on each rank.
"""

from __future__ import annotations

from pathlib import Path

import torch

from zeda.errors import CheckpointError


def make_optimizer(named_params, lr: float, betas=(0.9, 0.98), weight_decay: float = 0.1, eps: float = 1e-8):
    """AdamW; decay on matrices and expert tensors (ndim >= 2), none on norms and biases."""
    params = [p for _, p in named_params if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps)


def set_lr(opt, lr: float) -> None:
    """The learning rate of the next step, for every parameter group."""
    for group in opt.param_groups:
        group["lr"] = lr


def optimizer_tensors(opt, named_params) -> dict[str, torch.Tensor]:
    """This rank's optimizer state keyed '<parameter name>::<field>' (the local shard of a DTensor), on CPU."""
    names = {id(p): name for name, p in named_params}
    tensors = {}
    for group in opt.param_groups:
        for p in group["params"]:
            for key, value in opt.state.get(p, {}).items():
                value = value.to_local() if hasattr(value, "to_local") else value
                tensors[f"{names[id(p)]}::{key}"] = value.detach().cpu().contiguous().reshape(value.shape)
    return tensors


def load_optimizer_tensors(opt, named_params, tensors: dict[str, torch.Tensor], file: Path) -> None:
    """The inverse of optimizer_tensors, onto parameters laid out (sharded) as when it was saved. `file` names
    where the tensors came from, for errors."""
    params = dict(named_params)
    for key, value in tensors.items():
        name, _, field = key.partition("::")
        if name not in params:
            raise CheckpointError(f"{file}: state for '{name}', which the model does not have")
        p = params[name]
        if hasattr(p, "device_mesh") and value.dim() > 0:  # a DTensor parameter: its state is a DTensor too
            from torch.distributed.tensor import DTensor

            value = DTensor.from_local(value.to(p.to_local().device), p.device_mesh, p.placements, run_check=False)
        else:
            value = value.to(p.device)
        opt.state[p][field] = value
