"""zeda.plan (the analytic memory planner) and bench/real_shape.py (the real-shape rehearsal it is checked on)."""

import json

import pytest

from zeda.config import ModelConfig
from zeda.loading import empty_model
from zeda.plan import Mesh, Setup, activation_bytes, count_parameters, main, plan, rank_params, sft_memory
from zeda.tiny import tiny_hf_config


def config(model_type: str, **overrides) -> ModelConfig:
    return ModelConfig.from_hf_config(tiny_hf_config(model_type, **overrides).to_dict())


@pytest.mark.parametrize("model_type", ["qwen3_moe", "glm4_moe_lite"])
@pytest.mark.parametrize("overrides", [{}, {"attention_bias": True}, {"tie_word_embeddings": True},
                                       {"zce_nums": [4], "zce_types": ["zero"]}])
def test_parameter_count_is_the_models_own(model_type, overrides):
    hf = tiny_hf_config(model_type, **{k: v for k, v in overrides.items() if not k.startswith("zce")}).to_dict()
    cfg = ModelConfig.from_hf_config(hf, **{k: v for k, v in overrides.items() if k.startswith("zce")})
    model = empty_model(cfg)  # meta: shapes only
    assert count_parameters(cfg).total == sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for n, p in model.named_parameters() if ".mlp.experts." in n)
    assert count_parameters(cfg).experts == experts


def test_glm_without_q_lora_counts_q_proj():
    cfg = config("glm4_moe_lite", q_lora_rank=None)
    assert count_parameters(cfg).total == sum(p.numel() for p in empty_model(cfg).parameters())


@pytest.mark.parametrize("model_type", ["qwen3_moe", "glm4_moe_lite"])
def test_the_mesh_splits_what_it_must(model_type):
    cfg = config(model_type)
    c = count_parameters(cfg)
    one = rank_params(cfg, Mesh(1)).total
    assert one == c.total
    # FSDP2 over 2 and 4 ranks: everything sharded, a half and a quarter (up to integer rounding)
    assert rank_params(cfg, Mesh(2, fsdp=True)).total == pytest.approx(c.total / 2, abs=2)
    assert rank_params(cfg, Mesh(4, fsdp=True)).total == pytest.approx(c.total / 4, abs=4)
    # ep: only the experts are split
    assert rank_params(cfg, Mesh(2, ep=2)).total == pytest.approx(c.total - c.experts / 2, abs=1)
    # ep + FSDP2: experts to ep, the rest to FSDP2
    assert rank_params(cfg, Mesh(2, ep=2, fsdp=True)).total == pytest.approx(c.total / 2, abs=2)
    # plain data parallel keeps a whole replica
    assert rank_params(cfg, Mesh(2)).total == c.total
    # SFT memory per rank falls with FSDP2 and with more GPUs, and activation checkpointing saves activations
    setup = lambda mesh, ckpt=False: Setup(mesh, 64, 2, checkpointing=ckpt)
    total = lambda s: sum(sft_memory(cfg, s).values())
    assert total(setup(Mesh(4, fsdp=True))) < total(setup(Mesh(2, fsdp=True))) < total(setup(Mesh(2)))
    assert total(setup(Mesh(2, ep=2))) < total(setup(Mesh(2)))
    kept = lambda ckpt: activation_bytes(cfg, 2 * 64, 64, 2, 1, ckpt)["activations"]
    assert kept(True) < kept(False)


def test_the_published_qwen_scale():
    """The paper's teacher: 30.5B parameters (Qwen's own figure), 29B of them in the routed experts."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from bench.real_shape import GLM_47_FLASH, QWEN3_30B_A3B

    qwen = count_parameters(ModelConfig.from_hf_config(QWEN3_30B_A3B))
    assert 30.3e9 < qwen.total < 30.7e9 and 28.5e9 < qwen.experts < 29.5e9
    glm = count_parameters(ModelConfig.from_hf_config(GLM_47_FLASH))
    assert 29e9 < glm.total < 31e9  # "30B-A3B" (the MTP layer is not part of the model)


def test_fits_flips_at_the_boundary():
    cfg = config("qwen3_moe")
    setup = Setup(Mesh(1), 64, 2)
    need = plan(cfg, setup)["sft"]["total"]
    assert plan(cfg, setup, gpu_memory=need)["sft"]["fits"] is True
    assert plan(cfg, setup, gpu_memory=need - 1)["sft"]["fits"] is False


def test_cli_table_and_json(tmp_path, capsys):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(tiny_hf_config("glm4_moe_lite").to_dict()))
    assert main(["--config", str(path), "--gpus", "2", "--ep", "2", "--seq", "64", "--batch", "2",
                 "--gpu-memory-gb", "80"]) == 0
    table = capsys.readouterr().out
    assert "SFT" in table and "OPD" in table and "SERVE" in table and "fits" in table
    assert main(["--config", str(path), "--gpus", "2", "--fsdp", "--seq", "64", "--batch", "2", "--layers", "5",
                 "--device-kind", "cpu", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["mesh"]["dp"] == 2 and out["sft"]["fits"] is None and out["opd"]["total"] > out["sft"]["total"]


def test_cli_errors_name_the_file_and_the_field(tmp_path, capsys):
    missing = tmp_path / "nope.json"
    assert main(["--config", str(missing), "--gpus", "1", "--seq", "8", "--batch", "1"]) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "Traceback" not in err
    bad = tmp_path / "config.json"
    bad.write_text(json.dumps({**tiny_hf_config("qwen3_moe").to_dict(), "model_type": "llama"}))
    assert main(["--config", str(bad), "--gpus", "1", "--seq", "8", "--batch", "1"]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "model_type" in err and "llama" in err
    # a mesh the model cannot take: named like train_sft.py names it
    good = tmp_path / "good.json"
    good.write_text(json.dumps(tiny_hf_config("qwen3_moe").to_dict()))
    assert main(["--config", str(good), "--gpus", "3", "--ep", "3", "--seq", "8", "--batch", "1"]) == 2
    assert "--ep 3" in capsys.readouterr().err


TINY = {"qwen3_moe": dict(vocab_size=128, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=8,
                          num_experts_per_tok=2)}


def test_a_tiny_rehearsal_runs_every_step_and_reports_them(tmp_path):
    """bench/real_shape.py's code path end to end at a tiny shape: checkpoint (per-expert keys, several shards,
    an index), convert, load + decode, SFT and OPD under torchrun with ep 2 and FSDP2, bf16."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from bench.real_shape import rehearse

    r = rehearse("qwen3_moe", 2, tmp_path, seq=64, batch=2, answer_tokens=4, decode_steps=4, shard_mb=0.25,
                 config_overrides=TINY["qwen3_moe"] | {"vocab_size": 4096})  # 0.5 MB embedding: 2 shards
    assert r["shards"] >= 2 and r["baseline_rss_mb"] > 100
    index = json.loads((tmp_path / "teacher" / "model.safetensors.index.json").read_text())
    assert "model.layers.1.mlp.experts.7.down_proj.weight" in index["weight_map"]
    assert set(r["phases"]) == {"convert", "generate", "sft_ep2", "sft_fsdp", "opd_ep2", "opd_fsdp"}
    for name, phase in r["phases"].items():
        assert phase.get("rc", 0) == 0, (name, phase.get("error"))
        assert phase["peak_rss_mb"] and phase["predicted_mb"], name
    for name in ("sft_ep2", "sft_fsdp", "opd_ep2", "opd_fsdp"):
        assert set(r["phases"][name]["peak_rss_mb"]) == {"rank0", "rank1"}
        assert len(r["phases"][name]["step_seconds"]) == 2
    assert r["phases"]["generate"]["decode_tokens_per_s"] > 0
