"""zeda: Zero-Expert Self-Distillation Adaptation for post-trained MoE LLMs, in plain PyTorch.

    model = zeda.load_model("path/to/checkpoint")          # static or converted, qwen3_moe or glm4_moe_lite
    logits = model(input_ids)                             # [B, T, V]

docs/method.md describes the method; README.md maps each of its concepts to the file and function here.
"""

from __future__ import annotations

from zeda.checkpoint import save_checkpoint
from zeda.config import ModelConfig
from zeda.errors import CheckpointError, ConfigError, ZedaError
from zeda.loading import empty_model, load_for_inference, load_model, materialize
from zeda.model import CausalLM, KVCache

__all__ = ["load_model", "load_for_inference", "empty_model", "materialize", "save_checkpoint", "CausalLM",
           "KVCache", "ModelConfig", "ZedaError", "ConfigError", "CheckpointError"]
