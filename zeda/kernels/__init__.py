"""Triton kernels for the routed experts of a MoE layer with zero experts (see moe_triton.py for the algorithm).

    from zeda.kernels import triton_available, triton_moe
    y_TH = triton_moe(x_TH, weights_TK, ids_TK, gate_up_proj, down_proj)   # ids >= N are zero experts

On a machine without a GPU, set TRITON_INTERPRET=1 *before* this package is imported (Triton decides at
@triton.jit time whether a kernel is compiled or interpreted); the interpreter is correct but very slow.
"""

from __future__ import annotations

import os


def triton_available() -> bool:
    """True when triton imports and there is a CUDA device to compile for, or TRITON_INTERPRET=1 is set."""
    try:
        import torch
        import triton  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


def triton_moe(x_TH, weights_TK, ids_TK, gate_up_proj, down_proj, config=None):
    """y_TH = sum_k [ids < N] * w * SwiGLU_ids(x): see zeda.kernels.moe_triton.triton_moe.

    Imported on first call, so `import zeda.kernels` works where triton is missing.
    """
    from zeda.kernels.moe_triton import triton_moe as _triton_moe

    return _triton_moe(x_TH, weights_TK, ids_TK, gate_up_proj, down_proj, config=config)


__all__ = ["triton_available", "triton_moe"]
