"""zeda.plan (the analytic memory planner) and bench/real_shape.py (the real-shape rehearsal it is checked on)."""

import json

import pytest
import torch

from zeda.config import ModelConfig
from zeda.loading import empty_model
from zeda.plan import (Mesh, Setup, activation_bytes, count_parameters, main, plan, rank_params, sft_memory,
                       trained_tensors, training_moments)
from zeda_toy.tiny import tiny_hf_config


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


def student(model_type: str, **overrides) -> ModelConfig:
    """A converted config (Z = 4 zero experts), which the planner takes as it is."""
    hf = tiny_hf_config(model_type, **overrides).to_dict()
    return ModelConfig.from_hf_config(hf, zce_nums=[4], zce_types=["zero"])


@pytest.mark.parametrize("model_type", ["qwen3_moe", "glm4_moe_lite"])
@pytest.mark.parametrize("mesh,bf16_share", [
    (Mesh(1), "all but routers"), (Mesh(2, ep=2), "all but routers"), (Mesh(2, tp=2), "all but routers"),
    (Mesh(2, fsdp=True), "none"), (Mesh(4, tp=2, fsdp=True), "none"), (Mesh(2, ep=2, fsdp=True), "expert shards")])
def test_masters_gradients_and_adamw_state_on_each_mesh(model_type, mesh, bf16_share):
    """bf16 training: without FSDP2 the model holds bf16 parameters (routers fp32), each with a 4-byte fp32
    master; under FSDP2 its fp32 shards are the masters, and only expert shards left to ep are bf16 + master.
    Gradients are in the parameters' dtype in backward and fp32 at the step; AdamW keeps 8 fp32 bytes each."""
    cfg = student(model_type)
    c = count_parameters(cfg)
    on_rank = rank_params(cfg, mesh).total  # split part by part (checked against the model above)
    in_bf16 = {"all but routers": on_rank - c.routers, "none": 0, "expert shards": c.experts / mesh.ep}[bf16_share]
    stays, moments = training_moments(cfg, Setup(mesh, 64, 2))
    # FSDP2's chunks are ceil(rows / dp) on rank 0: a few elements over the average
    assert stays["fp32 master weights of the bf16 parameters"] == pytest.approx(4 * in_bf16, abs=64)
    assert stays["parameters"] == pytest.approx(2 * in_bf16 + 4 * (on_rank - in_bf16), abs=64)
    assert stays["AdamW exp_avg + exp_avg_sq (fp32)"] == pytest.approx(8 * on_rank, abs=128)
    assert moments["backward"]["gradients (in the parameters' dtype)"] == stays["parameters"]
    assert moments["optimizer step"]["gradients (fp32, the masters')"] == pytest.approx(4 * on_rank, abs=64)
    # float32: no masters, fp32 all through
    fp32, _ = training_moments(cfg, Setup(mesh, 64, 2, "float32"))
    assert fp32["fp32 master weights of the bf16 parameters"] == 0
    assert fp32["parameters"] == pytest.approx(4 * on_rank, abs=64)


def test_adamw8bit_state_term_is_the_optimizers_own():
    """The 8-bit state counted tensor by tensor equals torchao's AdamW8bit's on the model (codes, block scales,
    code tables; fp32 moments for the embedding, 4160 elements but not whole 256-blocks, and small tensors);
    the mesh cases are checked against saved rank shards in tests/test_optim.py."""
    from zeda.model import CausalLM
    from zeda.optim import make_optimizer

    cfg = student("qwen3_moe", vocab_size=130)
    model = CausalLM(cfg)
    opt = make_optimizer(list(model.named_parameters()), 1e-3, optimizer="adamw8bit")
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    real = 0
    for state in opt.state.values():
        for v in (state["exp_avg"], state["exp_avg_sq"]):
            real += sum(t.numel() * t.element_size() for t in ((v.codes, v.scale, v.qmap) if hasattr(v, "codes")
                                                                else (v,)))
    stays, _ = training_moments(cfg, Setup(Mesh(1), 64, 2, optimizer="adamw8bit"))
    assert stays["AdamW8bit exp_avg + exp_avg_sq (8-bit codes + block scales)"] == real
    assert real < 0.9 * 8 * count_parameters(cfg).total  # the experts are 8-bit even at this size


def test_optimizer_step_temporaries():
    """foreach AdamW (CUDA, no DTensor parameter) takes sqrt(exp_avg_sq) of every matrix at once; otherwise one
    tensor at a time: 2 fp32 copies for AdamW, measured bytes an element for AdamW8bit (compiled, or eager for a
    small model on a CPU)."""
    cfg = student("qwen3_moe")

    def temporaries(mesh, **kw) -> int:
        step = training_moments(cfg, Setup(mesh, 64, 2, **kw))[1]["optimizer step"]
        return sum(v for k, v in step.items() if "temporaries" in k)

    for mesh in (Mesh(1), Mesh(2, ep=2), Mesh(2, fsdp=True), Mesh(2, tp=2)):
        tensors = trained_tensors(cfg, mesh)
        largest, matrices = max(t.numel for t in tensors), sum(t.numel for t in tensors if t.ndim >= 2)
        foreach = not mesh.fsdp and mesh.tp == 1
        assert temporaries(mesh) == (4 * matrices if foreach else 8 * largest)
        assert temporaries(mesh, device_kind="cpu") == 8 * largest
        assert temporaries(mesh, optimizer="adamw8bit") == 8 * largest
        assert temporaries(mesh, device_kind="cpu", optimizer="adamw8bit") == 53 * largest  # small: eager
    # a CPU compiles AdamW8bit's step for a large model (zeda.optim.step_compiled): 8 bytes an element again
    wide = student("qwen3_moe", vocab_size=4096, hidden_size=1024)  # embedding [4096, 1024]: 2**22 elements
    largest = max(t.numel for t in trained_tensors(wide, Mesh(1)))
    step = training_moments(wide, Setup(Mesh(1), 64, 2, device_kind="cpu", optimizer="adamw8bit"))[1]["optimizer step"]
    assert step["AdamW8bit temporaries, largest tensor (compiled)"] == 8 * largest == 8 * 2**22


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
    # --optimizer adamw8bit: its state term in place of AdamW's, and less memory (hidden 256: 8-bit experts)
    path.write_text(json.dumps(tiny_hf_config("glm4_moe_lite", hidden_size=256).to_dict()))
    totals = {}
    for optimizer in ("adamw", "adamw8bit"):
        assert main(["--config", str(path), "--gpus", "1", "--seq", "8", "--batch", "1", "--optimizer", optimizer,
                     "--json"]) == 0
        out = json.loads(capsys.readouterr().out)
        assert out["optimizer"] == optimizer
        assert any(name.startswith("AdamW8bit exp_avg" if optimizer == "adamw8bit" else "AdamW exp_avg")
                   for name in out["sft"]["terms"])
        totals[optimizer] = out["sft"]["total"]
    assert totals["adamw8bit"] < totals["adamw"]


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
