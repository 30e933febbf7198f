"""Mixed precision for training: compute in bf16, keep and step fp32 master weights.

Why masters: an Adam update is about lr in size, whatever the gradient. A bf16 weight of size 0.02 has a spacing
(ulp) of 2^-13 ~ 1.2e-4 between neighbouring values, so an update of lr = 2e-5 (SFT) or 1e-6 (OPD on GLM) is below
half an ulp and rounds away: a bf16 model stepped in place keeps few of its updates. So the optimizer steps an fp32
copy of every parameter the model holds in bf16, and the model gets the rounded masters back after each step
(Megatron's distributed optimizer, FSDP2's MixedPrecisionPolicy and nanochat all do the same).

Two ways, one meaning:
- without --fsdp, the model holds bf16 parameters (the router in fp32) and `MasterWeights` keeps an fp32 master
  of each bf16 one: after backward the bf16 gradient is copied into the master's fp32 gradient (and freed), the
  gradients are reduced and clipped in fp32, the optimizer steps the masters, the masters are copied back;
- with --fsdp, the model is loaded in fp32 and FSDP2 shards it with MixedPrecisionPolicy(param_dtype=bf16,
  reduce_dtype=fp32) (zeda/sharding.py:apply_fsdp): its sharded fp32 parameters are the masters, gathered as bf16
  for each unit's forward, and their gradients arrive in fp32. Expert shards left out of FSDP (--ep) are cast to
  bf16 and get masters as above.
An fp32 parameter is its own master (a float32 run, the fp32 router, FSDP2's sharded parameters): nothing copied.

    masters = MasterWeights(model)
    opt = make_optimizer(masters.named_params(), lr)
    loss.backward(); masters.grads_to_masters(); ...reduce, clip...; opt.step(); masters.masters_to_model()
"""

from __future__ import annotations

import torch

from zeda.distributed import local_tensor


def clean_name(name: str) -> str:
    """A parameter's name as the checkpoint knows it (activation checkpointing's wrapper adds a path element)."""
    return name.replace("_checkpoint_wrapped_module.", "")


class MasterWeights:
    """The parameters the optimizer steps: fp32 masters of a model's low-precision parameters, and the model's
    own fp32 parameters as they are."""

    def __init__(self, model: torch.nn.Module):
        self.pairs: list[tuple[str, torch.nn.Parameter, torch.nn.Parameter]] = []  # (name, model's, master)
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            if p.dtype == torch.float32:
                master = p
            else:
                master = torch.nn.Parameter(p.detach().float())  # a DTensor stays a DTensor (tp): same placements
                if getattr(p, "expert_shard", False):
                    master.expert_shard = True  # reduced over the shard's replicas (Dist.average_gradients)
            self.pairs.append((clean_name(name), p, master))

    def named_params(self) -> list[tuple[str, torch.nn.Parameter]]:
        return [(name, master) for name, _, master in self.pairs]

    def params(self) -> list[torch.nn.Parameter]:
        return [master for _, _, master in self.pairs]

    @property
    def copies(self) -> int:
        """How many parameters have a separate master (0 for an fp32 model)."""
        return sum(master is not p for _, p, master in self.pairs)

    def grads_to_masters(self) -> None:
        """After backward: each low-precision gradient moves into its master's fp32 gradient."""
        for _, p, master in self.pairs:
            if master is not p:
                master.grad = None if p.grad is None else p.grad.float()
                p.grad = None

    @torch.no_grad()
    def masters_to_model(self) -> None:
        """After the optimizer step: the model computes with the masters rounded to its dtype."""
        for _, p, master in self.pairs:
            if master is not p:
                p.copy_(master)

    @torch.no_grad()
    def load_masters(self, tensors: dict[str, torch.Tensor], where) -> None:
        """Restore the exact fp32 masters saved beside a checkpoint whose weights were rounded (this rank's local
        shards, as master_tensors wrote them), then the model's copies from them."""
        from zeda.errors import CheckpointError

        for name, _, master in self.pairs:
            if name not in tensors:
                raise CheckpointError(f"{where}: no fp32 master for '{name}'")
            local = local_tensor(master)
            if tuple(tensors[name].shape) != tuple(local.shape):
                raise CheckpointError(f"{where}: fp32 master of '{name}' has shape {tuple(tensors[name].shape)}, the "
                                      f"model's {tuple(local.shape)}: resume on the same mesh")
            local.copy_(tensors[name])
        self.masters_to_model()

    def master_tensors(self) -> dict[str, torch.Tensor]:
        """Every master as this rank's local fp32 tensor on CPU (for a checkpoint whose weights are rounded)."""
        out = {}
        for name, _, master in self.pairs:
            local = local_tensor(master)
            out[name] = local.detach().float().cpu().contiguous()
        return out
