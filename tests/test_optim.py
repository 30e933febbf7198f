"""zeda/optim.py: --optimizer adamw8bit (torchao's AdamW8bit) and its checkpoint tensors.

Checked: a run stopped halfway, its state saved as plain safetensors tensors and loaded into a fresh optimizer,
continues bit for bit as the uninterrupted one; set_lr changes torchao's tensor lr in place; the 8-bit state
is ~2 bytes a parameter against AdamW's 8; its loss falls like AdamW's; state of the other optimizer is refused
with the flag to use; under torchrun with --ep 2 --fsdp each rank's saved state is what zeda.plan counts.
"""

import json

import pytest
import torch
from conftest import ROOT, torchrun
from safetensors.torch import load_file, save_file

from zeda_toy import tasks
from zeda.config import ModelConfig
from zeda.conversion import convert_checkpoint
from zeda.errors import CheckpointError, UsageError
from zeda.model import CausalLM
from zeda.optim import load_optimizer_tensors, make_optimizer, optimizer_tensors, set_lr
from zeda.plan import Mesh, optimizer_state_bytes, trained_tensors
from zeda_toy.tiny import make_tiny_checkpoint, tiny_hf_config
from zeda_toy.tokenizer import save_tokenizer

# vocab 130 x hidden 32: 4160 elements, over 4096 but not a whole number of 256-blocks (fp32 moments); the
# experts [8, 16, 32] are 4096 (8-bit); norms and attention are under 4096 (fp32)
CFG = ModelConfig.from_hf_config(tiny_hf_config("qwen3_moe", vocab_size=130).to_dict())
IDS = torch.randint(0, 130, (2, 17), generator=torch.Generator().manual_seed(1))


def tiny_model() -> CausalLM:
    model = CausalLM(CFG)
    model.init_weights(seed=0)
    return model


def train(model, opt, steps: range) -> list[float]:
    """Next-token loss on a fixed batch, lr decaying with the step (so a lost lr or step count shows)."""
    losses = []
    for step in steps:
        set_lr(opt, 1e-2 * (1 - step / 20))
        opt.zero_grad(set_to_none=True)
        loss = -model(IDS[:, :-1], targets=IDS[:, 1:]).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_adamw8bit_resumes_bit_exactly(tmp_path):
    straight = tiny_model()
    opt = make_optimizer(list(straight.named_parameters()), 1e-2, optimizer="adamw8bit")
    train(straight, opt, range(6))

    first = tiny_model()
    opt = make_optimizer(list(first.named_parameters()), 1e-2, optimizer="adamw8bit")
    train(first, opt, range(3))
    tensors = optimizer_tensors(opt, list(first.named_parameters()))
    assert all(type(t) is torch.Tensor for t in tensors.values())  # plain tensors: safetensors takes them
    experts = "model.layers.0.mlp.experts.gate_up_proj"
    assert tensors[f"{experts}::exp_avg.codes"].dtype == torch.uint8
    assert tensors[f"{experts}::exp_avg_sq.scale"].shape == (8 * 2 * 16 * 32 // 256,)
    assert tensors["model.embed_tokens.weight::exp_avg"].dtype == torch.float32  # 4160: not whole blocks
    save_file(tensors, str(tmp_path / "optimizer.safetensors"))

    def resumed(load_state: bool) -> CausalLM:
        model = tiny_model()
        model.load_state_dict(first.state_dict())
        opt = make_optimizer(list(model.named_parameters()), 1e-2, optimizer="adamw8bit")
        if load_state:
            file = tmp_path / "optimizer.safetensors"
            load_optimizer_tensors(opt, list(model.named_parameters()), load_file(str(file)), file)
            assert type(opt.state[model.model.layers[0].mlp.experts.gate_up_proj]["exp_avg"]).__name__ == "OptimState8bit"
        train(model, opt, range(3, 6))
        return model

    for (name, a), b in zip(straight.named_parameters(), resumed(True).parameters()):
        assert torch.equal(a, b), name
    # the check can fail: without the saved state the run goes elsewhere
    assert not all(torch.equal(a, b) for a, b in zip(straight.parameters(), resumed(False).parameters()))


def test_set_lr_fills_torchaos_tensor_lr_in_place():
    model = tiny_model()
    opt = make_optimizer(list(model.named_parameters()), 1e-2, optimizer="adamw8bit")
    lr = opt.param_groups[0]["lr"]
    before = [p.detach().clone() for p in model.parameters()]
    train(model, opt, range(1))  # a first step at lr 1e-2
    set_lr(opt, 0.0)
    assert opt.param_groups[0]["lr"] is lr and float(lr) == 0.0
    after_one = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    (-model(IDS[:, :-1], targets=IDS[:, 1:]).mean()).backward()
    opt.step()  # lr 0: nothing moves
    assert not all(torch.equal(a, b) for a, b in zip(before, after_one))
    assert all(torch.equal(a, b) for a, b in zip(after_one, model.parameters()))


def test_the_step_is_compiled_for_a_large_model_only():
    """On a CPU an inductor build per shape costs more than a small model's eager steps; a large one compiles."""
    small = make_optimizer([("w", torch.nn.Parameter(torch.zeros(64, 64)))], 1e-3, optimizer="adamw8bit")
    large = make_optimizer([("w", torch.nn.Parameter(torch.zeros(4096, 1024)))], 1e-3, optimizer="adamw8bit")
    assert not small.compiled and large.compiled


def state_bytes(opt) -> int:
    """Bytes of exp_avg and exp_avg_sq (codes, scales and code tables of an 8-bit moment; the step count is a CPU
    scalar, left out)."""
    total = 0
    for state in opt.state.values():
        for key in ("exp_avg", "exp_avg_sq"):
            v = state[key]
            parts = (v.codes, v.scale, v.qmap) if hasattr(v, "codes") else (v,)
            total += sum(t.numel() * t.element_size() for t in parts)
    return total


def test_adamw8bit_state_is_about_2_bytes_a_parameter():
    p = torch.nn.Parameter(torch.randn(64, 4096))
    per_param = {}
    for name in ("adamw", "adamw8bit"):
        opt = make_optimizer([("w", p)], 1e-3, optimizer=name)
        p.grad = torch.randn_like(p)
        opt.step()
        per_param[name] = state_bytes(opt) / p.numel()
    assert per_param["adamw"] == 8.0
    assert 2.0 < per_param["adamw8bit"] < 2.1


def test_adamw8bit_loss_falls_like_adamws():
    losses = {}
    for name in ("adamw", "adamw8bit"):
        model = tiny_model()
        losses[name] = train(model, make_optimizer(list(model.named_parameters()), 1e-2, optimizer=name), range(15))
    drop = {name: curve[0] - curve[-1] for name, curve in losses.items()}
    assert drop["adamw"] > 0.5  # the task is learnable at this lr
    assert drop["adamw8bit"] > 0.8 * drop["adamw"]
    assert max(abs(a - b) for a, b in zip(losses["adamw"], losses["adamw8bit"])) < 0.1 * losses["adamw"][0]


def test_state_of_the_other_optimizer_is_refused(tmp_path):
    file = tmp_path / "optimizer.safetensors"
    saved = {}
    for name in ("adamw", "adamw8bit"):
        model = tiny_model()
        opt = make_optimizer(list(model.named_parameters()), 1e-2, optimizer=name)
        train(model, opt, range(1))
        saved[name] = optimizer_tensors(opt, list(model.named_parameters()))
    model = tiny_model()
    with pytest.raises(CheckpointError, match=r"optimizer.safetensors.*--optimizer adamw8bit"):
        load_optimizer_tensors(make_optimizer(list(model.named_parameters()), 1e-2), list(model.named_parameters()),
                               saved["adamw8bit"], file)
    with pytest.raises(CheckpointError, match=r"optimizer.safetensors.*--optimizer adamw\b"):
        load_optimizer_tensors(make_optimizer(list(model.named_parameters()), 1e-2, optimizer="adamw8bit"),
                               list(model.named_parameters()), saved["adamw"], file)
    with pytest.raises(UsageError, match="--optimizer sgd"):
        make_optimizer(list(model.named_parameters()), 1e-2, optimizer="sgd")


def test_sft_on_an_ep_fsdp_mesh_keeps_what_the_planner_counts(tmp_path):
    """train_sft.py --optimizer adamw8bit under torchrun: ep 2 (bf16 expert shards with fp32 masters) and FSDP2
    (fp32 DTensor shards); each rank's saved 8-bit state is, byte for byte, zeda.plan's count for the mesh."""
    # hidden 128: the embedding's FSDP2 shard [52, 128] and the expert shards [4, 32, 128] are 8-bit
    make_tiny_checkpoint(tmp_path / "teacher", "qwen3_moe", vocab_size=104, max_position_embeddings=512,
                         hidden_size=128, num_experts=8, moe_intermediate_size=32)
    save_tokenizer(tmp_path / "teacher")
    convert_checkpoint(tmp_path / "teacher", tmp_path / "student", num_zero=4, progress=False)
    items = tasks.mixture("train", 4, seed=1)
    (tmp_path / "r.jsonl").write_text("".join(json.dumps(tasks.to_rollout_record(t, t.response)) + "\n"
                                              for t in items))
    torchrun(ROOT / "train_sft.py", "--student", tmp_path / "student", "--rollouts", tmp_path / "r.jsonl",
             "--global-batch-size", "4", "--micro-batch-size", "2", "--lr", "1e-3", "--max-steps", "2",
             "--save-every", "1", "--device", "cpu", "--dtype", "bfloat16", "--ep", "2", "--fsdp",
             "--optimizer", "adamw8bit", "--out", tmp_path / "out")
    losses = [json.loads(line)["loss"] for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 2 and all(map(torch.isfinite, torch.tensor(losses)))
    planned = optimizer_state_bytes(trained_tensors(ModelConfig.from_hf_config(tmp_path / "student"),
                                                    Mesh(2, ep=2, fsdp=True)), "adamw8bit")
    for rank in (0, 1):
        saved = load_file(str(tmp_path / "out" / "step-1" / f"optimizer-rank{rank}.safetensors"))
        assert saved["model.embed_tokens.weight::exp_avg.codes"].shape == (52, 128)  # a DTensor shard
        assert saved["model.layers.0.mlp.experts.gate_up_proj::exp_avg_sq.codes"].shape == (4, 64, 128)  # ep's
        state = sum(t.numel() * t.element_size() for k, t in saved.items()
                    if k.rpartition("::")[2].partition(".")[0] in ("exp_avg", "exp_avg_sq")
                    and not k.endswith(".signed"))
        assert state == planned, rank
