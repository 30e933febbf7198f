"""Our model against HF transformers' own Qwen3MoeForCausalLM / Glm4MoeLiteForCausalLM on the same weights.

This is the test that proves we built the real architectures: tiny random models of several shapes, single
and sharded checkpoints, logits within 1e-4 in fp32, with and without padding. Also the load errors.
"""

import json
import re

import pytest
import torch
import transformers

import zeda
from zeda.checkpoint import CheckpointError, save_checkpoint
from zeda.config import ConfigError
from zeda_toy.tiny import make_tiny_checkpoint

QWEN_SHAPES = [
    dict(),
    dict(norm_topk_prob=False, num_experts_per_tok=3, num_experts=6),
    dict(mlp_only_layers=[0], decoder_sparse_step=1, tie_word_embeddings=True),
    dict(decoder_sparse_step=2, num_hidden_layers=4, attention_bias=True, num_key_value_heads=4),
    dict(hidden_size=48, head_dim=16, num_attention_heads=6, num_key_value_heads=3, rope_theta=1e6),
]
GLM_SHAPES = [
    dict(),
    dict(q_lora_rank=None, rope_interleave=False),
    dict(num_experts_per_tok=4, n_routed_experts=12, routed_scaling_factor=2.5, norm_topk_prob=False),
    dict(mlp_layer_types=["dense", "dense", "sparse", "sparse"], num_hidden_layers=4, n_shared_experts=2),
]


def _hf_logits(hf_model, ids, mask=None):
    with torch.no_grad():
        return hf_model(input_ids=ids, attention_mask=mask).logits


@pytest.mark.parametrize("model_type,overrides", [("qwen3_moe", s) for s in QWEN_SHAPES]
                         + [("glm4_moe_lite", s) for s in GLM_SHAPES])
def test_logits_match_transformers(tmp_path, model_type, overrides):
    hf = make_tiny_checkpoint(tmp_path, model_type, seed=len(str(overrides)), **overrides)
    ours = zeda.load_model(tmp_path)
    ids = torch.randint(0, hf.config.vocab_size, (3, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (ours(ids) - _hf_logits(hf, ids)).abs().max().item()
    assert diff <= 1e-4, diff


@pytest.mark.parametrize("model_type", ["qwen3_moe", "glm4_moe_lite"])
def test_sharded_checkpoint_and_left_padding_match(tmp_path, model_type):
    hf = make_tiny_checkpoint(tmp_path, model_type, seed=3, shards=4)
    assert (tmp_path / "model.safetensors.index.json").exists()
    ours = zeda.load_model(tmp_path)
    ids = torch.randint(0, hf.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding on row 0
    with torch.no_grad():
        ref = _hf_logits(hf, ids, mask)
        got = ours(ids, attention_mask=mask)
    real = mask.bool()
    assert (got[real] - ref[real]).abs().max().item() <= 1e-4
    # A padded row's real tokens equal the same tokens run alone.
    with torch.no_grad():
        alone = ours(ids[:1, 4:])
    assert (got[0, 4:] - alone[0]).abs().max().item() <= 1e-5


@pytest.mark.parametrize("model_type", ["qwen3_moe", "glm4_moe_lite"])
def test_saved_checkpoint_round_trips_and_loads_in_transformers(tmp_path, model_type):
    make_tiny_checkpoint(tmp_path / "in", model_type, seed=4)
    ours = zeda.load_model(tmp_path / "in")
    save_checkpoint(ours, tmp_path / "out", copy_from=tmp_path / "in", max_shard_bytes=20_000)
    assert (tmp_path / "out" / "model.safetensors.index.json").exists()  # small shards: really sharded
    again = zeda.load_model(tmp_path / "out")
    cls = getattr(transformers, "Qwen3MoeForCausalLM" if model_type == "qwen3_moe" else "Glm4MoeLiteForCausalLM")
    hf_again = cls.from_pretrained(tmp_path / "out").eval()
    ids = torch.randint(0, 96, (2, 6))
    with torch.no_grad():
        assert torch.equal(ours(ids), again(ids))
        assert (_hf_logits(hf_again, ids) - ours(ids)).abs().max().item() <= 1e-4
    assert not list(tmp_path.glob(".out.tmp-*"))


def test_overrides_win_over_config_json(tmp_path):
    make_tiny_checkpoint(tmp_path, "qwen3_moe")
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert zeda.load_model(tmp_path).config.norm_topk_prob == cfg["norm_topk_prob"]
    assert zeda.load_model(tmp_path, norm_topk_prob=not cfg["norm_topk_prob"]).config.norm_topk_prob != cfg[
        "norm_topk_prob"]


def test_load_errors_name_file_and_key(tmp_path):
    make_tiny_checkpoint(tmp_path / "m", "qwen3_moe", shards=3)
    folder = tmp_path / "m"
    # Unsupported architecture.
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "model_type": "llama"}))
    with pytest.raises(ConfigError, match="config.json.*'llama' is not supported"):
        zeda.load_model(folder)
    # Wrong shape: a config that disagrees with the tensors.
    (folder / "config.json").write_text(json.dumps({**cfg, "moe_intermediate_size": 12}))
    with pytest.raises(CheckpointError, match=r"model-\d{5}-of-\d{5}\.safetensors: tensor 'model\.layers\.\d+\.mlp\.experts\.\d+\.\w+_proj\.weight' has shape"):
        zeda.load_model(folder)
    (folder / "config.json").write_text(json.dumps(cfg))
    # Missing shard.
    shard = sorted(folder.glob("model-*.safetensors"))[1]
    shard.rename(tmp_path / "away")
    with pytest.raises(CheckpointError, match=f"{shard.name}: shard listed .* is missing"):
        zeda.load_model(folder)
    # Corrupt shard.
    shard.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(CheckpointError, match=f"{shard.name}: cannot read"):
        zeda.load_model(folder)
    with pytest.raises(ConfigError, match="nope: no such model folder"):
        zeda.load_model(tmp_path / "nope")


def test_missing_tensor_is_named(tmp_path):
    from safetensors.torch import load_file, save_file

    make_tiny_checkpoint(tmp_path, "glm4_moe_lite")
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.layers.1.mlp.experts.3.up_proj.weight"]
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.experts\.up_proj.*missing experts \[3\]"):
        zeda.load_model(tmp_path)
    # every expert's up projection gone: the HF keys are named, not zeda's fused gate_up_proj
    tensors = {k: t for k, t in tensors.items() if not re.match(r"model\.layers\.1\.mlp\.experts\.\d+\.up_proj", k)}
    save_file(tensors, tmp_path / "model.safetensors")
    want = r"missing tensors \['model\.layers\.1\.mlp\.experts\.\{e\}\.up_proj\.weight'\]"
    with pytest.raises(CheckpointError, match=want):
        zeda.load_model(tmp_path)
