"""Tiny random HF checkpoints of both architectures, built with transformers' own classes.

Used by the tests (parity against the reference implementation), the conversion demo and the benchmarks,
so that every stage has a CPU path without downloading anything.

    python -m zeda_toy.tiny --model-type glm4_moe_lite --out /tmp/tiny_glm --shards 3
    python -m zeda_toy.tiny --model-type glm4_moe_lite --out /tmp/tiny_glm_mtp --mtp-layers 1

--mtp-layers writes GLM-4.7-Flash's multi-token-prediction layer the way its release does: layer
num_hidden_layers of the checkpoint, declared by `num_nextn_predict_layers` in config.json, holding a whole MoE
decoder layer (`mlp.gate.weight [N, H]`, `mlp.gate.e_score_correction_bias [N]`, experts, shared experts)
plus the DeepSeek-V3 MTP tensors `enorm`, `hnorm`, `eh_proj [H, 2H]`, `embed_tokens [V, H]`,
`shared_head.norm`, `shared_head.head [V, H]`. transformers does not build that layer and loads the
checkpoint without it, as our loader does.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from zeda.errors import UsageError, ZedaError
from zeda.flags import int_range


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
    raise UsageError(f"--model-type: unknown model_type {model_type!r}; choose qwen3_moe or glm4_moe_lite")


def make_tiny_checkpoint(out: str | Path, model_type: str = "qwen3_moe", seed: int = 0, shards: int = 1,
                         mtp_layers: int = 0, **overrides):
    """Save a random transformers model of `model_type` to `out` (split into `shards` safetensors files).

    Router correction biases (GLM) are randomised too, so the selection bias is exercised. mtp_layers (GLM
    only): add that many MTP layers after the last decoder layer (see the module docstring). Returns the HF
    model (without its MTP layers, which transformers does not run).
    """
    import transformers

    if mtp_layers < 0:
        raise UsageError(f"--mtp-layers must be >= 0 (got {mtp_layers})")
    if mtp_layers and model_type != "glm4_moe_lite":
        raise UsageError(f"--mtp-layers: only glm4_moe_lite checkpoints have MTP layers, not {model_type}")
    torch.manual_seed(seed)
    cfg = tiny_hf_config(model_type, **overrides)
    cls = transformers.Qwen3MoeForCausalLM if model_type == "qwen3_moe" else transformers.Glm4MoeLiteForCausalLM
    num_layers = cfg.num_hidden_layers
    if mtp_layers:  # build the MTP layers as ordinary sparse decoder layers past the last one, then add the rest
        cfg = tiny_hf_config(model_type, **{**overrides, "num_hidden_layers": num_layers + mtp_layers,
                                            "mlp_layer_types": cfg.mlp_layer_types + ["sparse"] * mtp_layers})
    model = cls(cfg).eval()
    with torch.no_grad():
        for layer in model.model.layers[num_layers:]:
            add_mtp_tensors(layer, cfg)
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.normal_(0.0, 0.1)
    out = Path(out)
    if shards > 1:
        total = sum(p.numel() * p.element_size() for p in model.parameters())
        model.save_pretrained(out, max_shard_size=max(1, total // shards))
    else:
        model.save_pretrained(out)
    if not mtp_layers:
        return model
    # config.json as GLM-4.7-Flash's: num_hidden_layers counts the decoder layers only, the MTP ones are declared.
    hf = json.loads((out / "config.json").read_text())
    hf.update(num_hidden_layers=num_layers, mlp_layer_types=hf["mlp_layer_types"][:num_layers],
              num_nextn_predict_layers=mtp_layers)
    (out / "config.json").write_text(json.dumps(hf, indent=2, sort_keys=True) + "\n")
    static = cls(tiny_hf_config(model_type, **overrides)).eval()
    mtp_prefixes = tuple(f"model.layers.{i}." for i in range(num_layers, num_layers + mtp_layers))
    static.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith(mtp_prefixes)})
    return static


def add_mtp_tensors(layer: torch.nn.Module, cfg) -> None:
    """Give a decoder layer the extra tensors of a DeepSeek-V3 / GLM MTP layer, random (norms near 1), so that a
    test can tell them apart: enorm/hnorm normalise the token embedding and the hidden state, eh_proj [H, 2H]
    mixes them, embed_tokens and shared_head.head [V, H] are the layer's own copies of the embedding and the head."""
    H, V = cfg.hidden_size, cfg.vocab_size
    norms = [torch.nn.Parameter(1 + 0.1 * torch.randn(H)) for _ in range(3)]
    layer.enorm, layer.hnorm = torch.nn.Module(), torch.nn.Module()
    layer.enorm.weight, layer.hnorm.weight = norms[0], norms[1]
    layer.eh_proj = torch.nn.Linear(2 * H, H, bias=False)
    layer.embed_tokens = torch.nn.Embedding(V, H)
    layer.shared_head = torch.nn.Module()
    layer.shared_head.norm = torch.nn.Module()
    layer.shared_head.norm.weight = norms[2]
    layer.shared_head.head = torch.nn.Linear(H, V, bias=False)


def main():
    p = argparse.ArgumentParser(description="Write a tiny random HF MoE checkpoint.")
    p.add_argument("--model-type", default="qwen3_moe", choices=["qwen3_moe", "glm4_moe_lite"], help="architecture")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--shards", type=int_range(min=1), default=1, help="number of safetensors shards")
    p.add_argument("--seed", type=int_range(min=0), default=0, help="random seed")
    p.add_argument("--mtp-layers", type=int_range(min=0), default=0,
                   help="GLM only: MTP layers after the last layer (default 0)")
    args = p.parse_args()
    try:
        make_tiny_checkpoint(args.out, args.model_type, args.seed, args.shards, args.mtp_layers)
    except ZedaError as e:
        print(f"zeda_toy.tiny: error: {e}", file=sys.stderr)
        return 2
    mtp = f" with {args.mtp_layers} MTP layer(s)" if args.mtp_layers else ""
    print(f"wrote a tiny {args.model_type} checkpoint to {args.out}{mtp}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
