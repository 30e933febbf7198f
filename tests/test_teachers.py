"""The shipped teachers: real HF checkpoints, genuinely good at the tasks, and using their experts.

Greedy decoding on a fixed sample of the test split is deterministic, so the accuracy bar below is a
measurement, not a flaky threshold: the same items give the same answers on every machine (fp32, CPU).
The full measurement (300 items per family) is in the README, made with evaluate.py.
"""

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoTokenizer

import zeda
from zeda_toy import tasks
from zeda.evaluation import evaluate_model
from zeda.sampling import SamplingParams
from zeda.loading import load_for_inference

ROOT = Path(__file__).resolve().parent.parent
TEACHERS = [ROOT / "assets" / "qwen3_moe_teacher", ROOT / "assets" / "glm4_moe_lite_teacher"]
N_SAMPLE = 300  # per family: the README's measurement itself (40 items swung the average by ~10 points)


def _present(folder: Path):
    if not (folder / "model.safetensors").exists():
        pytest.fail(f"{folder} is missing: the teachers ship in the repository (python -m zeda_toy.teacher ...)")


@pytest.mark.parametrize("folder", TEACHERS, ids=lambda p: p.name)
def test_teacher_is_a_real_hf_checkpoint(folder):
    _present(folder)
    assert sum(f.stat().st_size for f in folder.iterdir()) <= 8 * 2**20  # <= 8 MB each
    cfg = AutoConfig.from_pretrained(folder)  # transformers reads it as its own architecture
    tok = AutoTokenizer.from_pretrained(folder)
    text = tok.apply_chat_template([{"role": "user", "content": "Compute 1+2."}], tokenize=False,
                                   add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n")
    model = zeda.load_model(folder)
    assert model.config.num_zero_experts == 0 and model.config.num_experts_per_tok > 1
    assert model.config.num_experts >= 8
    assert cfg.model_type == model.config.model_type
    record = json.loads((folder / "training.json").read_text())
    assert record["train_seconds"] > 0 and "machine" in record


@pytest.mark.parametrize("folder", TEACHERS, ids=lambda p: p.name)
def test_teacher_uses_its_experts(folder):
    """Every MoE layer spreads real text over many experts: skipping experts has a cost."""
    _present(folder)
    model, tokenizer = load_for_inference(folder, expert_backend="loop")
    ids = tokenizer(["Compute 843-618+227. Write the words yak bell jar in reverse order."],
                    return_tensors="pt")["input_ids"]
    routing = []
    with torch.no_grad():
        model(ids, routing=routing)
    for r in routing:
        assert torch.unique(r.ids_TK).numel() >= model.config.num_experts // 2


# The bar of the embedded-default issue. On the full test split (README) the shipped qwen3_moe teacher measures
# 90.7% average (code 85%) after three sittings, the glm4_moe_lite one 94.0% (code 92.3%) after three.
@pytest.mark.parametrize("folder", TEACHERS, ids=lambda p: p.name)
def test_teacher_accuracy(folder):
    _present(folder)
    model, tokenizer = load_for_inference(folder)
    with torch.no_grad():
        report = evaluate_model(model, tokenizer, list(tasks.FAMILIES), N_SAMPLE,
                                SamplingParams(temperature=0.0, max_new_tokens=160), batch_size=64, seed=0,
                                progress=False)
    acc = report["accuracy"]
    assert acc["average"] >= 0.85, acc
    assert min(acc[f] for f in tasks.FAMILIES) >= 0.70, acc


def test_teacher_training_continues_from_an_earlier_run(tmp_path, monkeypatch):
    """zeda_toy.teacher --init-from: a second sitting starts from the first one's weights (its first loss is the
    first sitting's last, not a fresh model's), records both sittings, and refuses a mismatched start."""
    from zeda_toy import teacher

    monkeypatch.setattr(teacher, "TEACHER_SHAPES", {"qwen3_moe": dict(
        teacher.TEACHER_SHAPES["qwen3_moe"], hidden_size=32, head_dim=8, num_hidden_layers=1, num_experts=4,
        num_experts_per_tok=2, moe_intermediate_size=16, intermediate_size=32)})
    kw = dict(minutes=None, batch_size=4, lr=3e-3, n_per_family=20, seed=0, balance_coef=0.01, threads=None,
              backend="grouped_mm")
    first = teacher.train("qwen3_moe", tmp_path / "a", steps=6, **kw)
    second = teacher.train("qwen3_moe", tmp_path / "b", steps=2, init_from=tmp_path / "a", **kw)
    assert [r["steps"] for r in second["lineage"]] == [6, 2]
    assert second["total_steps"] == 8
    assert "--init-from" in second["command"]
    a, b = zeda.load_model(tmp_path / "a"), zeda.load_model(tmp_path / "b")
    assert a.config.to_hf_dict()["hidden_size"] == b.config.to_hf_dict()["hidden_size"] == 32
    moved = max(float((pa - pb).abs().max()) for pa, pb in zip(a.parameters(), b.parameters()))
    assert 0 < moved < 0.01  # two warmup steps from the first sitting's weights, not a fresh initialisation
    assert first["lineage"][0]["steps"] == 6
    with pytest.raises(ValueError, match="arch is 'qwen3_moe'"):
        teacher.warm_start("glm4_moe_lite", tmp_path / "a", b.config)
