"""experiments/compute_use.py, experiments/token_compute.py and zeda/token_picture.py: where a dynamic model spends its compute.

What is checked: the rank correlation against its definition; that the teacher-forced routing of an answer is the
routing generation reported for each of its tokens (the alignment every number here rests on); that a model
measured against itself shows no divergence and no disagreement at the positions that produced its tokens
(an off-by-one would show both); that the dial at a large negative bias spends all K experts everywhere; the
report's per-layer numbers adding up to the summed ones; and the CLI's outputs and errors.
"""

import json
import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import compute_use
from token_compute import correlations, measure, pearson, ranks, real_experts_per_position, spearman
from zeda.baselines import set_routing
from zeda.conversion import convert_checkpoint
from zeda.evaluation import encode_items, pad_id, stop_ids, suite_items
from zeda.generation import generate
from zeda.loading import load_for_inference
from zeda.sampling import SamplingParams
from zeda.token_picture import colour, render_terminal, token_pieces

ROOT = Path(__file__).resolve().parent.parent
TEACHER = ROOT / "assets" / "qwen3_moe_teacher"
MAX_NEW = 48


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(0, 6), min_size=1, max_size=30))
def test_ranks_average_ties_and_sum_to_the_triangle_number(x):
    r = ranks(np.array(x))
    n = len(x)
    assert math.isclose(r.sum(), n * (n + 1) / 2)
    for i in range(n):  # a value's rank: the count below it, plus the mean position among its equals
        below, equal = sum(v < x[i] for v in x), sum(v == x[i] for v in x)
        assert math.isclose(r[i], below + (equal + 1) / 2)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(-1000, 1000), min_size=3, max_size=30, unique=True))
def test_spearman_is_one_for_any_increasing_map_and_minus_one_for_a_decreasing_one(x):
    x = np.array(x, dtype=np.float64)
    assert math.isclose(spearman(x, np.exp(x / 500)), 1.0, abs_tol=1e-9)
    assert math.isclose(spearman(x, -x ** 3), -1.0, abs_tol=1e-9)
    assert math.isnan(pearson(x, np.ones_like(x)))  # a constant side has no correlation


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    converted = tmp_path_factory.mktemp("compute_use") / "converted"
    convert_checkpoint(TEACHER, converted, num_zero=8, progress=False)
    student, tokenizer = load_for_inference(converted)
    teacher, _ = load_for_inference(TEACHER)
    return converted, student, teacher, tokenizer


@pytest.fixture(scope="module")
def items():
    return suite_items(["math", "if"], 2, 0, "test")


def test_teacher_forced_routing_is_what_generation_reported_per_token(models, items):
    _, student, _, tokenizer = models
    cfg = student.config
    prompts = encode_items(tokenizer, items, MAX_NEW, cfg.max_position_embeddings)
    gen = generate(student, prompts[:1], SamplingParams(temperature=0.0, max_new_tokens=MAX_NEW),
                   stop_ids(tokenizer, cfg), pad_id(tokenizer, cfg))
    answer = gen.tokens[0]
    real_LT, _ = real_experts_per_position(student, prompts[0] + answer)
    P = len(prompts[0])
    produced = real_LT[:, P - 1:P - 1 + len(answer)].sum(0)  # position t produced answer token t - P + 1
    assert produced.tolist() == gen.real_slots[0]
    assert 0 < produced.mean() < cfg.num_experts_per_tok * cfg.num_moe_layers  # some zero slots, not all


def test_a_model_against_itself_has_no_divergence_at_the_positions_that_made_its_tokens(models, items):
    _, student, _, tokenizer = models
    answers = measure(student, student, tokenizer, items, MAX_NEW, progress=False)
    assert len(answers) == len(items)
    for a in answers:
        assert a.real_LA.shape == (student.config.num_moe_layers, len(a.answer))
        assert np.all(a.reverse_kl_A < 1e-5)
        assert not a.disagree_A.any()  # greedy: each token is the argmax of the position that produced it
        assert np.all(a.entropy_A >= 0)


def test_report_adds_up_and_the_dial_moves_the_compute(models, items):
    _, student, teacher, tokenizer = models
    cfg = student.config
    answers = measure(student, teacher, tokenizer, items, MAX_NEW, progress=False)
    report = correlations(answers, cfg)
    assert report["tokens"] == sum(len(a.answer) for a in answers)
    assert report["static_real_per_token"] == cfg.num_experts_per_tok * cfg.num_moe_layers
    layer_means = sum(r["mean_real"] for r in report["by_layer"])
    assert math.isclose(layer_means, report["overall"]["mean_real"], rel_tol=1e-3)
    assert sum(r["tokens"] for r in report["by_family"].values()) == report["tokens"]
    assert sum(d["tokens"] for d in report["by_entropy_decile"]) == report["tokens"]
    try:
        set_routing(student, zero_bias=-1e4)  # no zero expert can win a slot: the static model's compute
        full = measure(student, teacher, tokenizer, items[:1], MAX_NEW, progress=False)
    finally:
        set_routing(student)
    assert np.all(full[0].real_LA == cfg.num_experts_per_tok)


def test_pieces_rebuild_the_answer_and_the_terminal_colours_follow_the_counts(models):
    _, _, _, tokenizer = models
    ids = tokenizer.encode("Answer: 42\nok", add_special_tokens=False)
    pieces = token_pieces(tokenizer, ids)
    assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True)
    real = list(range(len(ids)))
    text = render_terminal(pieces, real, len(ids))
    for r in real:
        red, green, blue = colour(r / len(ids))
        assert f"\x1b[48;2;{red};{green};{blue}m" in text
    assert colour(0.0) == (0, 255, 60) and colour(1.0) == (255, 0, 60)


def test_cli_writes_json_png_html_and_refuses_a_static_student(models, tmp_path, capsys):
    converted = models[0]
    out, png, page = tmp_path / "cu.json", tmp_path / "cu.png", tmp_path / "cu.html"
    argv = ["--student", str(converted), "--teacher", str(TEACHER), "--tasks", "math", "--n", "2",
            "--max-new-tokens", str(MAX_NEW), "--out", str(out), "--html", str(page), "--no-progress"]
    try:
        import matplotlib  # noqa: F401  (the plot extra)
        argv += ["--png", str(png)]
    except ModuleNotFoundError:
        png = None
    assert compute_use.main(argv) == 0
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["by_family"].keys() == {"math"} and "\x1b[48;2;" in printed
    assert len(report["example"]["pieces"]) == len(report["example"]["real_per_token"])
    assert "<span" in page.read_text()
    if png is not None:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob("*.tmp*"))  # written under a temporary name, then renamed

    assert compute_use.main(["--student", str(TEACHER), "--teacher", str(TEACHER), "--n", "1"]) == 2
    assert "a static model (no zero experts)" in capsys.readouterr().err
    assert compute_use.main(["--student", str(tmp_path / "nope"), "--teacher", str(TEACHER), "--n", "1"]) == 2
    assert "nope" in capsys.readouterr().err
    assert compute_use.main(["--student", str(converted), "--teacher", str(TEACHER), "--tasks", "math",
                             "--example-family", "code"]) == 2
    assert "--example-family 'code'" in capsys.readouterr().err
