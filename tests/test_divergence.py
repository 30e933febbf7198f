"""experiments/compare.py and experiments/divergence.py: where two models' greedy answers part.

The models are the shipped qwen3_moe teacher and a copy with seeded noise on its weights (a model that answers
some items differently). What is checked are consequences of greedy decoding that a wrong divergence position,
a mixed-up probability or a miscounted item would break: at the first differing token each model's own token is
its argmax, the discordant counts add up to the accuracy difference, the teacher against itself has none.
"""

import json
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import compare
from divergence import BUCKETS, bucket_of, compare_models, divergence_table, first_difference
from zeda.evaluation import EvaluationError, encode_items, suite_items
from zeda.loading import load_for_inference

ROOT = Path(__file__).resolve().parent.parent
TEACHER = ROOT / "assets" / "qwen3_moe_teacher"
N = 20  # items per family
MAX_NEW = 160


@given(st.lists(st.integers(0, 3), max_size=8), st.lists(st.integers(0, 3), max_size=8))
def test_first_difference_is_the_first_index_where_lists_differ(a, b):
    k = first_difference(a, b)
    if k is None:
        assert a == b
    else:
        assert a[:k] == b[:k] and (k == min(len(a), len(b)) or a[k] != b[k])
        assert a != b


def test_buckets_cover_every_probability():
    assert [bucket_of(p) for p in (0.0, 0.69, 0.7, 0.949, 0.95, 1.0)] == [
        "near tie", "near tie", "in between", "in between", "confident", "confident"]
    assert len(BUCKETS) == 3


@pytest.fixture(scope="module")
def models():
    teacher, tokenizer = load_for_inference(TEACHER)
    noisy, _ = load_for_inference(TEACHER)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in noisy.parameters():
            p.add_(0.15 * p.std() * torch.randn(p.shape, generator=g))
    return teacher, noisy, tokenizer


def test_compare_against_a_different_model(models):
    teacher, noisy, tokenizer = models
    items = suite_items(("math", "code", "if"), N, split="heldout")
    report = compare_models(teacher, noisy, tokenizer, items, MAX_NEW, batch_size=64, progress=False)
    assert report["discordant"] > 0, "the noise should change some answers (else this test checks nothing)"
    # Discordant items account for the whole accuracy difference, per side.
    acc_ref, acc_model = report["accuracy"]["reference"], report["accuracy"]["model"]
    correct = {side: round(sum(acc[g] * N for g in ("math", "code", "if"))) for side, acc in
               (("reference", acc_ref), ("model", acc_model))}
    assert report["reference_right"] - report["model_right"] == correct["reference"] - correct["model"]
    assert report["reference_right"] + report["model_right"] == report["discordant"] == len(report["divergences"])
    assert sum(b["reference_right"] + b["model_right"] for b in report["buckets"].values()) == report["discordant"]
    kls = [d["kl"] for d in report["divergences"]]
    assert kls == sorted(kls, reverse=True)
    for d in report["divergences"]:
        # Greedy: at the first differing token each model took its own argmax, so it prefers its token.
        assert d["reference_p"][0] >= d["reference_p"][1] - 1e-4
        assert d["model_p"][1] >= d["model_p"][0] - 1e-4
        assert d["reference_token"] != d["model_token"]
        assert d["kl"] >= -1e-6 and d["bucket"] == bucket_of(d["reference_p"][0])
    # The reported position and probabilities, recomputed independently: one teacher-forced forward over the
    # prompt and the reference's whole answer (a wrong position or context gives other numbers).
    by_where = {item.where: item for item in items}
    for d in report["divergences"][:5]:
        prompt = encode_items(tokenizer, [by_where[d["where"]]], MAX_NEW, teacher.config.max_position_embeddings)[0]
        answer = tokenizer(d["reference_answer"], add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            probs = teacher(torch.tensor([prompt + answer]))[0, len(prompt) - 1 + d["position"]].softmax(-1)
        assert tokenizer.decode([int(probs.argmax())]) == d["reference_token"]
        assert float(probs.max()) == pytest.approx(d["reference_p"][0], abs=1e-4)
        assert d["model_answer"].startswith(tokenizer.decode(answer[:d["position"]]))
    text = divergence_table({"items": len(items), **report}, rows=3)
    assert f"{report['discordant']} of {len(items)} items" in text


def test_a_model_against_itself_has_no_divergence(models):
    teacher, _, tokenizer = models
    items = suite_items(("math",), 10, split="heldout")
    report = compare_models(teacher, teacher, tokenizer, items, MAX_NEW, progress=False)
    assert report["discordant"] == 0 and report["accuracy"]["reference"] == report["accuracy"]["model"]


def test_cli_writes_json_and_refuses_bad_input(tmp_path, capsys):
    out = tmp_path / "c.json"
    assert compare.main(["--reference", str(TEACHER), "--model", str(TEACHER), "--tasks", "code", "--n", "4",
                         "--max-new-tokens", str(MAX_NEW), "--no-progress", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["split"] == "heldout" and report["items"] == 4 and report["discordant"] == 0
    assert compare.main(["--reference", str(tmp_path / "nope"), "--model", str(TEACHER)]) == 2
    assert "nope" in capsys.readouterr().err
    assert compare.main(["--reference", str(TEACHER), "--model", str(TEACHER), "--tasks", "poetry"]) == 2
    assert "poetry" in capsys.readouterr().err
    assert compare.main(["--reference", str(TEACHER), "--model", str(TEACHER), "--n", "5000"]) == 2
    assert "held-out" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:  # refused by the flag's declared range, as the parser reads it
        compare.main(["--reference", str(TEACHER), "--model", str(TEACHER), "--batch-size", "0"])
    assert exc.value.code == 2 and "argument --batch-size" in capsys.readouterr().err


def test_different_vocabularies_are_refused(models, tmp_path):
    teacher, noisy, tokenizer = models
    noisy.config.vocab_size += 1  # only the check reads it; restored below
    try:
        with pytest.raises(EvaluationError, match="vocabularies differ"):
            compare_models(teacher, noisy, tokenizer, suite_items(("math",), 1, split="heldout"), MAX_NEW)
    finally:
        noisy.config.vocab_size -= 1
