"""Tiny random HF checkpoints of both architectures, built with transformers' own classes.

Used by the tests (parity against the reference implementation), the conversion demo and the benchmarks,
so that every stage has a CPU path without downloading anything.

    python -m zeda.tiny --model-type glm4_moe_lite --out /tmp/tiny_glm --shards 3
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch


def tiny_hf_config(model_type: str = "qwen3_moe", **overrides):
    """A small transformers config of the given architecture; keyword overrides win."""
    import transformers

    if model_type == "qwen3_moe":
        base = dict(vocab_size=96, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                    num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=8,
                    num_experts_per_tok=2, norm_topk_prob=True, mlp_only_layers=[], rope_theta=10000.0)
        return transformers.Qwen3MoeConfig(**{**base, **overrides})
    if model_type == "glm4_moe_lite":
        base = dict(vocab_size=96, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                    num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8,
                    num_experts_per_tok=2, kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=4, qk_nope_head_dim=8,
                    v_head_dim=8, n_shared_experts=1, routed_scaling_factor=1.8)
        return transformers.Glm4MoeLiteConfig(**{**base, **overrides})
    raise ValueError(f"unknown model_type {model_type!r}")


def make_tiny_checkpoint(out: str | Path, model_type: str = "qwen3_moe", seed: int = 0, shards: int = 1,
                         **overrides):
    """Save a random transformers model of `model_type` to `out` (split into `shards` safetensors files).

    Router correction biases (GLM) are randomised too, so the selection bias is exercised. Returns the HF model.
    """
    import transformers

    torch.manual_seed(seed)
    cfg = tiny_hf_config(model_type, **overrides)
    cls = transformers.Qwen3MoeForCausalLM if model_type == "qwen3_moe" else transformers.Glm4MoeLiteForCausalLM
    model = cls(cfg).eval()
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.normal_(0.0, 0.1)
    out = Path(out)
    if shards > 1:
        total = sum(p.numel() * p.element_size() for p in model.parameters())
        model.save_pretrained(out, max_shard_size=max(1, total // shards))
    else:
        model.save_pretrained(out)
    return model


def main():
    p = argparse.ArgumentParser(description="Write a tiny random HF MoE checkpoint.")
    p.add_argument("--model-type", default="qwen3_moe", choices=["qwen3_moe", "glm4_moe_lite"], help="architecture")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--shards", type=int, default=1, help="number of safetensors shards")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    args = p.parse_args()
    make_tiny_checkpoint(args.out, args.model_type, args.seed, args.shards)
    print(f"wrote a tiny {args.model_type} checkpoint to {args.out}")


if __name__ == "__main__":
    main()
