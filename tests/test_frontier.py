"""experiments/frontier.py: the paired statistics behind "where OPD pays", the headline choice, and a tiny frontier end to end
that a second run continues without retraining or re-evaluating anything."""

import json
import shutil

import pytest

import frontier
from zeda_toy.tiny import make_tiny_checkpoint
from zeda_toy.tokenizer import save_tokenizer


def row(name, method, target, correct, saved=0.5, seed=0):
    acc = correct.count("1") / len(correct)
    return {"name": name, "method": method, "target": target, "seed": seed, "correct_items": correct,
            "accuracy": {"average": acc}, "expert_flops_reduction": saved}


def test_paired_difference_and_its_standard_error():
    a, b = row("a", "x", 0.5, "0011"), row("b", "x", 0.5, "0111")
    mean, se = frontier.paired(a, b)
    assert mean == pytest.approx(25.0)
    # d = [0, 1, 0, 0]: sample sd = 0.5, se = 0.5 / 2 = 0.25
    assert se == pytest.approx(25.0)
    assert frontier.paired(a, a) == (0.0, 0.0)
    with pytest.raises(ValueError):
        frontier.paired(a, row("c", "x", 0.5, "01"))


def test_where_opd_pays_separates_a_clear_gain_from_noise():
    n = 400
    rows = {}
    for seed in range(3):  # SFT gets the first half right; OPD the first 70% (+20 points every seed)
        rows[f"zeda-sft-75-s{seed}"] = row(f"zeda-sft-75-s{seed}", "ZEDA SFT", 0.75, "1" * 200 + "0" * 200, seed=seed)
        rows[f"zeda-opd-75-s{seed}"] = row(f"zeda-opd-75-s{seed}", "ZEDA SFT+OPD", 0.75, "1" * 280 + "0" * 120,
                                           seed=seed)
    # At 50%, OPD flips one item each way: no gain
    rows["zeda-sft-50-s0"] = row("zeda-sft-50-s0", "ZEDA SFT", 0.5, "10" + "1" * (n - 2))
    rows["zeda-opd-50-s0"] = row("zeda-opd-50-s0", "ZEDA SFT+OPD", 0.5, "01" + "1" * (n - 2))
    found = {o["target"]: o for o in frontier.where_opd_pays(rows)}
    assert found[0.75]["seeds"] == 3 and found[0.75]["mean_gain"] == pytest.approx(20.0)
    assert found[0.75]["verdict"] == "OPD helps"
    assert found[0.5]["verdict"] == "within noise" and found[0.5]["mean_gain"] == 0.0


def test_headline_picks_the_best_baseline_inside_the_window():
    rows = {"teacher": row("teacher", "teacher", 0.0, "1111", saved=0.0),
            "zeda-opd-50-s0": row("zeda-opd-50-s0", "ZEDA SFT+OPD", 0.5, "1110", saved=0.52),
            "topk2": row("topk2", "static top-k' (training-free)", 0.5, "1100", saved=0.5),
            "static-ft-top2": row("static-ft-top2", "static top-k' (fine-tuned)", 0.5, "1000", saved=0.5),
            "topk3": row("topk3", "static top-k' (training-free)", 0.25, "1111", saved=0.25)}  # outside the window
    head = frontier.headline(rows)
    assert head["best_baseline"]["name"] == "topk2"
    assert head["best_trained_baseline"]["name"] == "static-ft-top2"
    assert head["gap_points"] == pytest.approx(25.0) and head["gap_points_trained"] == pytest.approx(50.0)


def test_margins_compare_every_zeda_seed_with_the_best_trained_baseline_at_its_share():
    rows = {"static-ft-top1": row("static-ft-top1", "static top-k' (fine-tuned)", 0.75, "1100"),
            "adamoe-75": row("adamoe-75", "AdaMoE (null experts + Switch loss)", 0.75, "1000"),
            "topk1": row("topk1", "static top-k' (training-free)", 0.75, "1110"),  # not trained: not a rival here
            "zeda-opd-75-s0": row("zeda-opd-75-s0", "ZEDA SFT+OPD", 0.75, "1110"),
            "zeda-opd-75-s1": row("zeda-opd-75-s1", "ZEDA SFT+OPD", 0.75, "1111", seed=1),
            "zeda-opd-50-s0": row("zeda-opd-50-s0", "ZEDA SFT+OPD", 0.5, "1111")}  # no trained baseline at 50%
    (m,) = frontier.margins(rows)
    assert m["target"] == 0.75 and m["baseline"] == "static-ft-top1"
    assert m["mean_gap"] == pytest.approx((25.0 + 50.0) / 2)
    assert m["item_se"] > 0


def test_bad_frontier_flags_are_refused():
    for argv in (["--shares", "0.5,1.2"], ["--seed-shares", "0.3"], ["--top-p", "0"], ["--dial", "nan"]):
        with pytest.raises(SystemExit):
            frontier.parse_args(argv)


def test_a_tiny_frontier_runs_and_resumes(tmp_path, capsys):
    teacher = tmp_path / "teacher"
    make_tiny_checkpoint(teacher, "qwen3_moe", vocab_size=104, max_position_embeddings=512)
    save_tokenizer(teacher)
    out, results = tmp_path / "run", tmp_path / "results"
    argv = ["--teacher", str(teacher), "--out", str(out), "--results", str(results), "--n", "2", "--sft-prompts", "6",
            "--sft-batch-size", "8", "--opd-steps", "1", "--opd-prompts", "2", "--max-new-tokens", "8",
            "--batch-size", "8", "--shares", "0.5", "--seed-shares", "", "--static-ft", "1", "--adamoe-shares", "0.5",
            "--top-p", "0.5", "--dial", "0.5", "--no-ablations"]
    assert frontier.main(argv) == 0
    data = json.loads((results / "frontier-qwen3_moe.json").read_text())
    names = {p["name"] for p in data["points"]}
    assert names == {"teacher", "converted", "zeda-sft-50-s0", "zeda-opd-50-s0", "static-ft-top1", "adamoe-50",
                     "topk1", "topp0.5", "dial+0.5"}
    assert not data["missing"]
    by_name = {p["name"]: p for p in data["points"]}
    assert by_name["teacher"]["expert_flops_reduction"] == 0.0
    assert by_name["topk1"]["expert_flops_reduction"] == pytest.approx(0.5)  # K = 2, keep 1
    assert by_name["static-ft-top1"]["routing"] == "topk:1"
    assert json.loads((out / "adamoe-converted-z8" / "config.json").read_text())["zce_normalization"] == "adamoe"
    assert "| ZEDA SFT+OPD |" in (results / "frontier-qwen3_moe.md").read_text()
    assert data["where_opd_pays"] and data["where_opd_pays"][0]["target"] == 0.5
    capsys.readouterr()
    stamps = {f.name: f.stat().st_mtime_ns for f in (out / "evals").iterdir()}
    assert frontier.main(argv) == 0  # everything is measured: nothing is trained or evaluated again
    printed = capsys.readouterr().out
    assert "$ python" not in printed and "[eval]" not in printed
    assert stamps == {f.name: f.stat().st_mtime_ns for f in (out / "evals").iterdir()}

    # A fresh clone has the committed results but no work folder: it measures nothing again either
    shutil.rmtree(out)
    assert frontier.main(argv) == 0
    printed = capsys.readouterr().out
    assert "[eval]" not in printed
    assert {p["name"] for p in json.loads((results / "frontier-qwen3_moe.json").read_text())["points"]} == names

    # A damaged committed file or point is refused, naming it, never read as "nothing measured" (a rerun would
    # measure every point again)
    committed_json = results / "frontier-qwen3_moe.json"
    whole = committed_json.read_text()
    for damaged in (whole[:len(whole) // 2], "[]", '{"settings": 3}'):
        committed_json.write_text(damaged)
        assert frontier.main(argv) == 2
        err = capsys.readouterr().err
        assert f"{committed_json}: damaged" in err and len(err.strip().splitlines()) == 1
    committed_json.write_text(whole)
    (out / "evals" / "teacher.json").write_text('{"accuracy": ')
    assert frontier.main(argv) == 2
    assert f"{out / 'evals' / 'teacher.json'}: damaged" in capsys.readouterr().err
