"""Device and dtype, chosen once: every script and rank asks here (STYLE: one helper, no `cuda` hard-coded).

"auto" means cuda when it is available, else cpu; for dtypes, bfloat16 on cuda and float32 elsewhere (CPU bf16
matmuls are slow and gain nothing at the embedded default's size).
"""

from __future__ import annotations

import torch

from zeda.errors import UsageError

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def pick_device(name: str | torch.device = "auto") -> torch.device:
    """The one place a device is chosen: "auto" is cuda when available, else cpu; anything else is checked."""
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise UsageError(f"--device: bad device {name!r}: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name!r} asked for, but CUDA is not available here (use --device cpu)")
    return device


def resolve_dtype(name: str | torch.dtype, device: torch.device) -> torch.dtype:
    """"auto": bfloat16 on cuda, float32 elsewhere; a name from DTYPES; or a torch.dtype as it is."""
    if isinstance(name, torch.dtype):
        return name
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise UsageError(f"--dtype: unknown dtype {name!r}; choose auto or one of {', '.join(DTYPES)}")
    return DTYPES[name]
