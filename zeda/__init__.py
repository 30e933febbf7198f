"""zeda: Zero-Expert Self-Distillation Adaptation for post-trained MoE LLMs, in plain PyTorch.

    model = zeda.load_model("path/to/checkpoint")          # static or converted, qwen3_moe or glm4_moe_lite
    logits = model(input_ids)                             # [B, T, V]
"""

from __future__ import annotations

from pathlib import Path

import torch

from zeda.checkpoint import CheckpointError, load_weights, save_checkpoint
from zeda.config import ConfigError, ModelConfig
from zeda.model import CausalLM, KVCache

__all__ = ["load_model", "empty_model", "materialize", "save_checkpoint", "CausalLM", "KVCache", "ModelConfig",
           "ConfigError", "CheckpointError"]


def load_model(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
               **overrides) -> CausalLM:
    """Load an HF checkpoint folder (static or ZEDA-converted). Keyword overrides (e.g. use_zce_mask=True)
    win over config.json. The router's e_score_correction_bias stays fp32 whatever `dtype` is.
    (Under torchrun, zeda.parallel.load_parallel loads a model already split over the mesh.)"""
    model = empty_model(ModelConfig.from_hf_config(path, **overrides), dtype)
    materialize(model, device)
    load_weights(model, path)
    return model.eval()


def empty_model(cfg: ModelConfig, dtype: torch.dtype = torch.float32) -> CausalLM:
    """The model on the meta device: shapes and dtypes, no memory. Split it (zeda.parallel) before materialize."""
    with torch.device("meta"):
        model = CausalLM(cfg)
    return model.to(dtype)


def materialize(model: CausalLM, device: str | torch.device) -> None:
    """Allocate a meta model's tensors on `device` (uninitialised: load_weights fills them)."""
    model.to_empty(device=device)
    for module in model.modules():  # keep the selection bias in fp32 (ZEDA.md §1, PEERS lesson 5)
        if hasattr(module, "e_score_correction_bias"):
            module.e_score_correction_bias.data = module.e_score_correction_bias.data.float().zero_()
    if model.config.tie_word_embeddings:  # to_empty makes new Parameters: tie them again
        model.lm_head.weight = model.model.embed_tokens.weight
