"""zeda: Zero-Expert Self-Distillation Adaptation for post-trained MoE LLMs, in plain PyTorch.

    model = zeda.load_model("path/to/checkpoint")          # static or converted, qwen3_moe or glm4_moe_lite
    logits = model(input_ids)                             # [B, T, V]

docs/method.md describes the method; README.md maps each of its concepts to the file and function here.
"""

from __future__ import annotations

import os

# Big CPU tensors on transparent huge pages. Without a caching allocator, every CPU training step maps fresh
# gradient buffers (GBs at real widths: [N, 2I, H] per layer, and their fp32 copies) and the kernel faults and
# zeroes them 4 KB at a time; PyTorch's allocator puts blocks of 2 MB or more on 2 MB pages when this is set, a
# 1.3-1.8x faster bf16 SFT step at the published widths on CPU, same peak memory (bench/huge_pages.py). PyTorch
# reads it at its first such allocation, so it is set here, before any; an explicit THP_MEM_ALLOC_ENABLE=0 wins.
# No effect where the kernel's transparent_hugepage is "never", nor on GPU memory.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

from zeda.checkpoint import save_checkpoint
from zeda.config import ModelConfig
from zeda.errors import CheckpointError, ConfigError, ZedaError
from zeda.loading import empty_model, load_for_inference, load_model, materialize
from zeda.model import CausalLM, KVCache

__all__ = ["load_model", "load_for_inference", "empty_model", "materialize", "save_checkpoint", "CausalLM",
           "KVCache", "ModelConfig", "ZedaError", "ConfigError", "CheckpointError"]
