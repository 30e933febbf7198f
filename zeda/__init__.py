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

__all__ = ["load_model", "save_checkpoint", "CausalLM", "KVCache", "ModelConfig", "ConfigError", "CheckpointError"]


def load_model(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
               **overrides) -> CausalLM:
    """Load an HF checkpoint folder (static or ZEDA-converted). Keyword overrides (e.g. use_zce_mask=True)
    win over config.json. The router's e_score_correction_bias stays fp32 whatever `dtype` is."""
    cfg = ModelConfig.from_hf_config(path, **overrides)
    with torch.device("meta"):
        model = CausalLM(cfg)
    model = model.to_empty(device=device)
    model.to(dtype)
    for module in model.modules():  # keep the selection bias in fp32 (ZEDA.md §1, PEERS lesson 5)
        if hasattr(module, "e_score_correction_bias"):
            module.e_score_correction_bias.data = module.e_score_correction_bias.data.float().zero_()
    load_weights(model, path)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.eval()
