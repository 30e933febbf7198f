"""The optimizer of both training stages, and its state as plain tensors for a checkpoint.

The optimizer steps a list of (name, parameter) pairs, not a model: with a bf16 model those are the fp32 masters
(zeda/precision.py), with an fp32 model the model's own parameters. Two choices (--optimizer):

- adamw: torch's AdamW, exp_avg and exp_avg_sq in fp32: 8 bytes a parameter.
- adamw8bit: torchao's AdamW8bit, the same update with both moments stored as 8-bit codes on a dynamic (roughly
  logarithmic) scale plus one fp32 scale per block of 256 values: ~2.03 bytes a parameter. Tensors under 4096
  elements, or not a whole number of blocks, keep fp32 moments (torchao follows bitsandbytes there). Each
  tensor's step is one torch.compile'd kernel, except on a CPU for a small model, where it runs eagerly (see
  AdamW8bit below).

The state is saved as safetensors keyed '<parameter name>::<field>' (no pickle), the local shard of a sharded
(DTensor) parameter on each rank. An 8-bit moment is saved as its parts, '<name>::exp_avg.codes' (uint8, the
parameter's shape), '.scale' (fp32, one per block), '.qmap' (fp32 [256], code -> value) and '.signed', and is
rebuilt from them exactly, so a resumed run continues bit for bit.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from pathlib import Path

import torch

from zeda.distributed import local_tensor
from zeda.errors import CheckpointError, UsageError

OPTIMIZERS = ("adamw", "adamw8bit")
BLOCK_SIZE = 256  # AdamW8bit: values sharing one fp32 scale
MIN_QUANTIZED = 4096  # AdamW8bit: smaller tensors keep fp32 moments
COMPILE_FROM = 1 << 22  # AdamW8bit on a CPU: compile the step from this many elements in the largest tensor
QUANTIZED_PARTS = ("codes", "scale", "qmap", "signed")  # what an 8-bit moment is saved as


def make_optimizer(named_params, lr: float, betas=(0.9, 0.98), weight_decay: float = 0.1, eps: float = 1e-8,
                   optimizer: str = "adamw"):
    """AdamW (or torchao's AdamW8bit); decay on matrices and expert tensors (ndim >= 2), none on norms and biases."""
    params = [p for _, p in named_params if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    if optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps)
    if optimizer == "adamw8bit":
        return adamw8bit_class()(groups, lr=lr, betas=betas, eps=eps, block_size=BLOCK_SIZE)
    raise UsageError(f"--optimizer {optimizer}: must be one of {', '.join(OPTIMIZERS)}")


@functools.cache
def adamw8bit_class():
    """torchao's AdamW8bit, imported on first use (only --optimizer adamw8bit needs torchao)."""
    # torchao logs, at import, each CUDA extension it cannot load (fp8/mxfp8 GEMMs on a CPU machine) and torch
    # warns about a pytree registration of its own; the optimizer needs none of them.
    quiet = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [log.level for log in quiet]
    for log in quiet:
        log.setLevel(logging.ERROR)
    try:
        from torchao.optim import AdamW8bit as TorchaoAdamW8bit
    except ImportError as e:
        raise UsageError(f"--optimizer adamw8bit needs torchao ({e}); pip install torchao") from None
    finally:
        for log, level in zip(quiet, levels):
            log.setLevel(level)

    class AdamW8bit(TorchaoAdamW8bit):
        """torchao's AdamW8bit, stepped eagerly on a CPU for a small model. Its step compiles one kernel per
        parameter shape, which on a CPU is an inductor C++ build of ~10 s a shape (the 2-core VM: 50 s for 5
        shapes): more than a small model's whole run takes eagerly (milliseconds a step), but soon repaid at real
        width, where the eager step is 11x slower (5.6 s against 0.5 s for a [16, 768, 2048] expert shard).
        Eager also holds more temporaries (~53 bytes an element against ~8 compiled; zeda.plan counts both)."""

        eight_bit = True

        def __init__(self, params, **kwargs):
            super().__init__(params, **kwargs)
            self.compiled = step_compiled([p for group in self.param_groups for p in group["params"]])

        @torch.no_grad()
        def step(self, closure=None):
            with contextlib.nullcontext() if self.compiled else torch.compiler.set_stance("force_eager"):
                return super().step(closure)

    return AdamW8bit


def step_compiled(params) -> bool:
    """Whether AdamW8bit compiles its step: on CUDA always, on a CPU when the largest (local) tensor has
    COMPILE_FROM elements or more."""
    return any(p.is_cuda for p in params) or max((local_tensor(p).numel() for p in params), default=0) >= COMPILE_FROM


def is_8bit(opt) -> bool:
    """Whether `opt` is make_optimizer's AdamW8bit."""
    return getattr(opt, "eight_bit", False)


def quantizes(numel: int) -> bool:
    """Whether AdamW8bit keeps 8-bit moments for a (local) tensor of `numel` elements."""
    return numel >= MIN_QUANTIZED and numel % BLOCK_SIZE == 0


def set_lr(opt, lr: float) -> None:
    """The learning rate of the next step, for every parameter group. torchao keeps it as a tensor (so a compiled
    step does not recompile when it changes), which must be filled in place, not replaced."""
    for group in opt.param_groups:
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr


def optimizer_tensors(opt, named_params) -> dict[str, torch.Tensor]:
    """This rank's optimizer state keyed '<parameter name>::<field>' (the local shard of a DTensor), on CPU; an
    8-bit moment as its parts '<name>::<field>.codes', '.scale', '.qmap', '.signed'."""
    names = {id(p): name for name, p in named_params}
    tensors = {}
    for group in opt.param_groups:
        for p in group["params"]:
            for key, value in opt.state.get(p, {}).items():
                value = local_tensor(value)
                if hasattr(value, "codes"):  # torchao's OptimState8bit
                    parts = {"codes": value.codes, "scale": value.scale, "qmap": value.qmap,
                             "signed": torch.tensor(value.signed)}
                    for part, t in parts.items():
                        tensors[f"{names[id(p)]}::{key}.{part}"] = t.detach().cpu().contiguous()
                    continue
                tensors[f"{names[id(p)]}::{key}"] = value.detach().cpu().contiguous().reshape(value.shape)
    return tensors


def load_optimizer_tensors(opt, named_params, tensors: dict[str, torch.Tensor], file: Path) -> None:
    """The inverse of optimizer_tensors, onto parameters laid out (sharded) as when it was saved, and an optimizer
    of the same kind. `file` names where the tensors came from, for errors."""
    params = dict(named_params)
    eight_bit = is_8bit(opt)
    quantized: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        name, _, field = key.partition("::")
        if name not in params:
            raise CheckpointError(f"{file}: state for '{name}', which the model does not have")
        p = params[name]
        field, _, part = field.partition(".")
        if part:  # one part of an 8-bit moment: rebuilt below, once all its parts are read
            if not eight_bit:
                raise CheckpointError(f"{file}: '{key}' is 8-bit optimizer state; resume with --optimizer adamw8bit")
            quantized.setdefault((name, field), {})[part] = value
            continue
        if value.dim() == 0:  # the step count: on the CPU, where both optimizers keep it
            opt.state[p][field] = value
            continue
        if eight_bit and quantizes(local_tensor(p).numel()):
            raise CheckpointError(f"{file}: '{key}' holds fp32 moments where --optimizer adamw8bit keeps 8-bit ones; "
                                  f"resume with --optimizer adamw")
        opt.state[p][field] = _like_param(value, p)
    for (name, field), parts in quantized.items():
        if set(parts) != set(QUANTIZED_PARTS):
            missing = sorted(set(QUANTIZED_PARTS) - set(parts))
            raise CheckpointError(f"{file}: 8-bit state '{name}::{field}' lacks {', '.join(missing)}")
        from torchao.optim.subclass_8bit import OptimState8bit

        p = params[name]
        device = local_tensor(p).device
        state = OptimState8bit(parts["codes"].to(device), parts["scale"].to(device), parts["qmap"].to(device),
                               bool(parts["signed"]), dtype=local_tensor(p).dtype)
        opt.state[p][field] = _like_param(state, p)


def _like_param(local: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """A rank's local state tensor placed as parameter p is: on its device, and a DTensor like it when p is one
    (with p's global shape: FSDP2's shards of a dim-0 size that dp does not divide are uneven)."""
    if hasattr(p, "device_mesh"):
        from torch.distributed.tensor import DTensor

        return DTensor.from_local(local.to(p.to_local().device), p.device_mesh, p.placements, run_check=False,
                                  shape=p.shape, stride=p.stride())
    return local.to(p.device)
