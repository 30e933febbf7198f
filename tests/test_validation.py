"""A config.json and its checkpoint are checked before a weight is used: every value a user can get wrong is
refused with a ConfigError or CheckpointError naming the file and the key.

ModelConfig.from_hf_config refuses a config.json that is not a JSON object, sizes that are not positive
integers (JSON true is an int in Python: refused too), a top-k outside 1..N + Z, zce_nums that is not a list of
one non-negative integer, and non-finite or non-positive floats. load_weights refuses a tensor at a layer index
>= num_hidden_layers unless it is an MTP layer the config declares (num_nextn_predict_layers); before, such a
config loaded silently with the extra layers dropped. Expert-count and shape mismatches keep their errors.
A property test draws valid tiny configs of both architectures (with MTP layers and zero experts) and
checks that they still load.
"""

import json
import math
import re
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import zeda
from zeda.config import ModelConfig
from zeda.conversion import convert_checkpoint
from zeda.errors import CheckpointError, ConfigError
from zeda_toy.tiny import make_tiny_checkpoint

DROP = object()  # a change that deletes the key


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """tiny(model_type, **overrides) -> a tiny HF checkpoint folder, built once; a test that edits it copies it."""
    cache = {}

    def make(model_type: str, **overrides) -> Path:
        key = (model_type, tuple(sorted(overrides.items())))
        if key not in cache:
            path = tmp_path_factory.mktemp(model_type)
            make_tiny_checkpoint(path, model_type, seed=2, **overrides)
            cache[key] = path
        return cache[key]

    return make


def edited_config(src: Path, dst: Path, changes: dict) -> Path:
    """A config.json in `dst` (no weights): the one of `src` with `changes` applied (DROP deletes a key)."""
    hf = json.loads((src / "config.json").read_text())
    for k, v in changes.items():
        if v is DROP:
            hf.pop(k, None)
        else:
            hf[k] = v
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "config.json").write_text(json.dumps(hf))  # NaN and Infinity are written as JSON's extensions
    return dst


def edited_checkpoint(src: Path, dst: Path, changes: dict) -> Path:
    """A copy of the checkpoint folder `src` whose config.json has `changes` applied."""
    shutil.copytree(src, dst)
    return edited_config(src, dst, changes)


# ----------------------------------------------------------------------------------------------
# config.json: values


def test_config_that_is_not_a_json_object_is_refused(tmp_path):
    for text in ("[1, 2]", '"qwen3_moe"', "null", "3"):
        (tmp_path / "config.json").write_text(text)
        with pytest.raises(ConfigError, match=rf"{re.escape(str(tmp_path / 'config.json'))}: not a JSON object"):
            ModelConfig.from_hf_config(tmp_path)


QWEN_SIZES = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size",
              "moe_intermediate_size", "vocab_size", "num_local_experts", "num_experts_per_tok",
              "max_position_embeddings", "head_dim")
GLM_SIZES = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size",
             "moe_intermediate_size", "vocab_size", "n_routed_experts", "num_experts_per_tok",
             "max_position_embeddings", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim", "kv_lora_rank",
             "q_lora_rank")
BAD_SIZES = (0, -2, True, 2.5, "8")  # True: JSON true is the int 1 in Python, and no size is meant as a flag


@pytest.mark.parametrize("bad", BAD_SIZES, ids=repr)
@pytest.mark.parametrize("model_type,key", [("qwen3_moe", k) for k in QWEN_SIZES]
                         + [("glm4_moe_lite", k) for k in GLM_SIZES])
def test_size_that_is_not_a_positive_integer_is_refused(tiny, tmp_path, model_type, key, bad):
    folder = edited_config(tiny(model_type), tmp_path, {key: bad})
    message = rf"config\.json: {key} must be a positive integer \(got {re.escape(repr(bad))}\)"
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_hf_config(folder)


@pytest.mark.parametrize("bad", BAD_SIZES, ids=repr)
def test_num_experts_under_qwen3_30b_a3b_key_must_be_a_positive_integer(tiny, tmp_path, bad):
    """Qwen3-30B-A3B's own config says num_experts (transformers 5.x writes num_local_experts): same rule.
    Before, num_experts 0 was passed over silently and a later key's count used."""
    folder = edited_config(tiny("qwen3_moe"), tmp_path, {"num_experts": bad})
    with pytest.raises(ConfigError, match=r"config\.json: num_experts must be a positive integer"):
        ModelConfig.from_hf_config(folder)


def test_size_given_as_a_keyword_override_is_checked_too(tiny):
    with pytest.raises(ConfigError, match=r"num_hidden_layers must be a positive integer \(got True\)"):
        ModelConfig.from_hf_config(tiny("qwen3_moe"), num_hidden_layers=True)


@pytest.mark.parametrize("model_type,changes,message", [
    ("qwen3_moe", {"num_experts_per_tok": 9}, r"num_experts_per_tok 9 must be at most N \+ Z = 8"),
    ("glm4_moe_lite", {"num_experts_per_tok": 13, "zce_nums": [4], "zce_types": ["zero"]},
     r"num_experts_per_tok 13 must be at most N \+ Z = 12"),
], ids=["qwen-above-N", "glm-above-N+Z"])
def test_top_k_above_the_router_outputs_is_refused(tiny, tmp_path, model_type, changes, message):
    """Top-k <= 0 is a size (above); top-k > N + Z was refused before too, with a message that named neither."""
    with pytest.raises(ConfigError, match=rf"config\.json: {message}"):
        ModelConfig.from_hf_config(edited_config(tiny(model_type), tmp_path, changes))


def test_top_k_up_to_n_plus_z_is_accepted(tiny, tmp_path):
    hf = {"num_experts_per_tok": 12, "zce_nums": [4], "zce_types": ["zero"]}
    cfg = ModelConfig.from_hf_config(edited_config(tiny("qwen3_moe"), tmp_path, hf))
    assert (cfg.num_experts_per_tok, cfg.num_router_outputs) == (12, 12)


@pytest.mark.parametrize("nums,types", [
    (4, ["zero"]), ([], []), ([2, 2], ["zero", "zero"]), ([-1], ["zero"]), ([True], ["zero"]),
    (["4"], ["zero"]), ([2.0], ["zero"]), ({"zero": 4}, ["zero"]),
], ids=repr)
def test_zce_nums_that_is_not_one_non_negative_integer_is_refused(tiny, tmp_path, nums, types):
    """The authors' format has exactly one group of zero experts: zce_nums [Z], zce_types ["zero"]."""
    folder = edited_config(tiny("glm4_moe_lite"), tmp_path, {"zce_nums": nums, "zce_types": types})
    with pytest.raises(ConfigError, match=r"config\.json: zce_nums .* must be a list of one non-negative integer"):
        ModelConfig.from_hf_config(folder)


BAD_FLOATS = (math.nan, math.inf, -math.inf, 0.0, -1.0, True, "1e-6")


@pytest.mark.parametrize("bad", BAD_FLOATS, ids=repr)
@pytest.mark.parametrize("model_type,key,changes", [
    ("qwen3_moe", "rms_norm_eps", lambda v: {"rms_norm_eps": v}),
    ("glm4_moe_lite", "rms_norm_eps", lambda v: {"rms_norm_eps": v}),
    ("qwen3_moe", "rope_theta", lambda v: {"rope_parameters": {"rope_type": "default", "rope_theta": v}}),
    ("qwen3_moe", "rope_theta", lambda v: {"rope_parameters": DROP, "rope_theta": v}),  # transformers 4.x's place
    ("glm4_moe_lite", "routed_scaling_factor", lambda v: {"routed_scaling_factor": v}),
], ids=["qwen-eps", "glm-eps", "rope_parameters", "top-level-rope_theta", "glm-scaling"])
def test_float_that_is_not_finite_and_positive_is_refused(tiny, tmp_path, model_type, key, changes, bad):
    folder = edited_config(tiny(model_type), tmp_path, changes(bad))
    with pytest.raises(ConfigError, match=rf"config\.json: {key} must be a finite positive number"):
        ModelConfig.from_hf_config(folder)


@pytest.mark.parametrize("key,bad", [("use_zce_mask", "false"), ("use_zce_mask", 1), ("norm_topk_prob", "yes"),
                                     ("tie_word_embeddings", "true"), ("rope_interleave", 0)], ids=repr)
def test_flag_that_is_not_a_json_boolean_is_refused(tiny, tmp_path, key, bad):
    """bool("false") is True: a quoted flag would have loaded as the opposite of what it says."""
    folder = edited_config(tiny("glm4_moe_lite"), tmp_path, {key: bad})
    with pytest.raises(ConfigError, match=rf"config\.json: {key} must be true or false"):
        ModelConfig.from_hf_config(folder)


@pytest.mark.parametrize("bad", [-1, True, "1", 1.0], ids=repr)
def test_num_nextn_predict_layers_must_be_a_non_negative_integer(tiny, tmp_path, bad):
    folder = edited_config(tiny("glm4_moe_lite"), tmp_path, {"num_nextn_predict_layers": bad})
    with pytest.raises(ConfigError, match=r"config\.json: num_nextn_predict_layers must be a non-negative integer"):
        ModelConfig.from_hf_config(folder)


def test_unknown_mlp_layer_type_is_refused(tiny, tmp_path):
    """Anything but "sparse" used to mean a dense layer, so a typo turned an MoE layer into a missing-tensor error."""
    folder = edited_config(tiny("glm4_moe_lite"), tmp_path, {"mlp_layer_types": ["dense", "moe", "sparse"]})
    with pytest.raises(ConfigError, match=r"config\.json: mlp_layer_types\[1\] is 'moe'; expected 'dense' or 'sparse'"):
        ModelConfig.from_hf_config(folder)


# ----------------------------------------------------------------------------------------------
# config.json against the checkpoint: layers


def test_fewer_layers_in_config_than_in_checkpoint_is_refused(tiny, tmp_path):
    """The 3-layer checkpoint with a config that says 2: before, layer 2 was skipped as if it were GLM's MTP
    layer, and the 2-layer model loaded (evaluate then scored 0% and exited 0)."""
    folder = edited_checkpoint(tiny("qwen3_moe"), tmp_path / "m", {"num_hidden_layers": 2})
    with pytest.raises(CheckpointError, match=r"config\.json says num_hidden_layers 2 but model\.safetensors holds "
                                              r"layer 2 \('model\.layers\.2\.[\w.]+'\)"):
        zeda.load_model(folder)


def test_layers_past_the_declared_mtp_layers_are_refused(tiny, tmp_path):
    """num_hidden_layers 1 + num_nextn_predict_layers 1 declares layer 1 as the MTP layer; layer 2 is still extra."""
    folder = edited_checkpoint(tiny("glm4_moe_lite"), tmp_path / "m", {"num_hidden_layers": 1,
                                                                       "num_nextn_predict_layers": 1})
    with pytest.raises(CheckpointError, match=r"config\.json says num_hidden_layers 1 but model\.safetensors holds "
                                              r"layer 2 .*num_nextn_predict_layers 1"):
        zeda.load_model(folder)


def test_mtp_layer_the_config_does_not_declare_is_refused(tiny, tmp_path):
    """A checkpoint with GLM's MTP layer whose config lost num_nextn_predict_layers: layer 3 is not declared."""
    folder = edited_checkpoint(tiny("glm4_moe_lite", mtp_layers=1), tmp_path / "m", {"num_nextn_predict_layers": DROP})
    with pytest.raises(CheckpointError, match=r"config\.json says num_hidden_layers 3 but model\.safetensors holds "
                                              r"layer 3 \('model\.layers\.3\."):
        zeda.load_model(folder)


def test_declared_mtp_layer_is_skipped(tiny):
    """The MTP layer is not part of our model: it loads, and the model has num_hidden_layers layers."""
    model = zeda.load_model(tiny("glm4_moe_lite", mtp_layers=1))
    assert len(model.model.layers) == 3 and model.config.num_nextn_predict_layers == 1


# ----------------------------------------------------------------------------------------------
# config.json against the checkpoint: experts and shapes (these raised before; kept)


def test_fewer_experts_in_config_than_in_checkpoint_is_refused(tiny, tmp_path):
    folder = edited_checkpoint(tiny("qwen3_moe"), tmp_path / "m", {"num_local_experts": 6})
    with pytest.raises(CheckpointError, match=r"model\.safetensors: 'model\.layers\.0\.mlp\.experts\.6\.\w+_proj"
                                              r"\.weight': expert 6 >= num_experts 6"):
        zeda.load_model(folder)


def test_more_experts_in_config_than_in_checkpoint_is_refused(tiny, tmp_path):
    folder = edited_checkpoint(tiny("glm4_moe_lite"), tmp_path / "m", {"n_routed_experts": 10})
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor 'model\.layers\.1\.mlp\.[\w.]+' has shape "
                                              r"\(8(,|, 32)\), expected \(10(,|, 32)\)"):
        zeda.load_model(folder)


def test_fused_experts_with_the_wrong_count_are_refused(tiny, tmp_path):
    """transformers 5.x's fused names hold all experts in one tensor: one with 7 of the 8 is named."""
    folder = tmp_path / "m"
    shutil.copytree(tiny("qwen3_moe"), folder)
    tensors = load_file(folder / "model.safetensors")
    for layer in range(3):
        p = f"model.layers.{layer}.mlp.experts"
        gate, up, down = ([tensors.pop(f"{p}.{e}.{proj}.weight") for e in range(8)]
                          for proj in ("gate_proj", "up_proj", "down_proj"))
        tensors[f"{p}.gate_up_proj"] = torch.stack([torch.cat([g, u]) for g, u in zip(gate, up)])[:7]  # [7, 2I, H]
        tensors[f"{p}.down_proj"] = torch.stack(down)  # [8, H, I]
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"'model\.layers\.0\.mlp\.experts\.gate_up_proj' holds 7 experts, "
                                              r"expected 8"):
        zeda.load_model(folder)


def test_dense_shape_mismatch_is_refused(tiny, tmp_path):
    folder = edited_checkpoint(tiny("glm4_moe_lite"), tmp_path / "m", {"intermediate_size": 48})
    with pytest.raises(CheckpointError, match=r"tensor 'model\.layers\.0\.mlp\.\w+_proj\.weight' has shape "
                                              r"\((64, 32|32, 64)\), expected \((48, 32|32, 48)\)"):
        zeda.load_model(folder)


# ----------------------------------------------------------------------------------------------
# property: every valid tiny config still loads


@st.composite
def tiny_configs(draw):
    """(model_type, transformers config overrides, MTP layers, zero experts Z): valid by construction."""
    model_type = draw(st.sampled_from(["qwen3_moe", "glm4_moe_lite"]))
    layers = draw(st.integers(1, 3))
    experts = draw(st.integers(2, 8))
    z = draw(st.integers(0, 4))
    heads = draw(st.sampled_from([2, 4]))
    o = dict(num_hidden_layers=layers, num_attention_heads=heads, hidden_size=draw(st.sampled_from([16, 32])),
             moe_intermediate_size=draw(st.sampled_from([8, 16])), intermediate_size=draw(st.sampled_from([16, 48])),
             num_experts_per_tok=draw(st.integers(1, experts)), norm_topk_prob=draw(st.booleans()),
             tie_word_embeddings=draw(st.booleans()), rms_norm_eps=draw(st.sampled_from([1e-6, 1e-5])))
    if model_type == "qwen3_moe":
        kv_heads = draw(st.sampled_from([h for h in (1, 2, 4) if heads % h == 0]))
        o |= dict(num_experts=experts, num_key_value_heads=kv_heads,
                  head_dim=draw(st.sampled_from([4, 8])), decoder_sparse_step=draw(st.integers(1, 2)),
                  mlp_only_layers=draw(st.lists(st.integers(0, layers - 1), unique=True, max_size=layers - 1)))
        mtp = 0
    else:
        dense = draw(st.integers(0, layers - 1))
        o |= dict(n_routed_experts=experts, num_key_value_heads=heads, mlp_layer_types=["dense"] * dense
                  + ["sparse"] * (layers - dense), n_shared_experts=draw(st.integers(1, 2)),
                  q_lora_rank=draw(st.sampled_from([None, 8])), kv_lora_rank=draw(st.sampled_from([8, 16])),
                  qk_rope_head_dim=draw(st.sampled_from([2, 4])), qk_nope_head_dim=draw(st.sampled_from([4, 8])),
                  v_head_dim=draw(st.sampled_from([4, 8])), routed_scaling_factor=draw(st.sampled_from([1.0, 2.5])),
                  rope_interleave=draw(st.booleans()))
        mtp = draw(st.integers(0, 1))
    return model_type, o, mtp, z


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=tiny_configs())
def test_every_valid_tiny_config_still_loads(case):
    """Drawn tiny checkpoints of both architectures (GLM with and without its MTP layer) load; converted with Z
    zero experts they load too, and with use_zce_mask=True give exactly the static model's logits."""
    model_type, overrides, mtp, z = case
    with tempfile.TemporaryDirectory() as tmp:
        static = Path(tmp) / "static"
        make_tiny_checkpoint(static, model_type, seed=0, mtp_layers=mtp, **overrides)
        model = zeda.load_model(static)
        assert len(model.model.layers) == overrides["num_hidden_layers"]
        assert model.config.num_nextn_predict_layers == mtp
        ids = torch.randint(0, 96, (1, 5), generator=torch.Generator().manual_seed(0))
        if z:
            convert_checkpoint(static, Path(tmp) / "dynamic", num_zero=z, progress=False)
            masked = zeda.load_model(Path(tmp) / "dynamic", use_zce_mask=True)
            assert masked.config.num_router_outputs == overrides.get("num_experts",
                                                                     overrides.get("n_routed_experts")) + z
            with torch.no_grad():
                assert torch.equal(model(ids), masked(ids))


@pytest.mark.parametrize("damage", ["nan", "inf", "int"])
def test_weights_that_are_not_finite_floats_are_refused_naming_the_tensor(tmp_path, damage):
    """Integer-typed or NaN / inf weights used to load silently and evaluate to 0% with exit 0."""
    from safetensors.torch import load_file, save_file

    from zeda.errors import CheckpointError
    from zeda_toy.tiny import make_tiny_checkpoint

    make_tiny_checkpoint(tmp_path, "qwen3_moe", vocab_size=64)
    file = tmp_path / "model.safetensors"
    tensors = load_file(str(file))
    key = "model.layers.0.self_attn.q_proj.weight"
    t = tensors[key]
    tensors[key] = {"nan": t.index_fill(0, torch.tensor([1]), float("nan")),
                    "inf": t.index_fill(0, torch.tensor([1]), float("inf")), "int": t.long()}[damage]
    save_file(tensors, str(file), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=rf"model.safetensors: tensor '{key}' (holds NaN|is torch.int64)"):
        zeda.load_model(tmp_path)


@pytest.mark.parametrize("damage", ["template", "tokenizer"])
def test_a_broken_chat_template_or_a_missing_tokenizer_file_is_one_line(tmp_path, damage):
    from zeda.errors import ConfigError
    from zeda.loading import load_tokenizer
    from zeda_toy.tiny import make_tiny_checkpoint
    from zeda_toy.tokenizer import save_tokenizer

    make_tiny_checkpoint(tmp_path, "qwen3_moe", vocab_size=104)
    save_tokenizer(tmp_path)
    if damage == "template":
        for name in ("chat_template.jinja",):
            if (tmp_path / name).exists():
                (tmp_path / name).write_text("{% for m in messages %}{{ m.content }")
        cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
        if "chat_template" in cfg:
            cfg["chat_template"] = "{% for m in messages %}{{ m.content }"
            (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
        match = "the chat template cannot render a conversation"
    else:
        (tmp_path / "tokenizer.json").unlink()
        match = "cannot load the tokenizer"
    with pytest.raises(ConfigError, match=match):
        load_tokenizer(tmp_path)
