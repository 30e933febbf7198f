"""The main job end to end on a tiny budget: convert -> rollouts -> SFT -> OPD -> evaluate, one table, one JSON.

A tiny random teacher (not the shipped one) keeps it fast; what is checked is that every stage runs, hands its
output to the next, and that the results file has a row per stage with the reported fields.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT

import pipeline
from zeda_toy.tiny import make_tiny_checkpoint
from zeda_toy.tokenizer import save_tokenizer


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pipe") / "teacher"
    make_tiny_checkpoint(folder, "qwen3_moe", vocab_size=104, max_position_embeddings=512)
    save_tokenizer(folder)
    return folder


def test_pipeline_runs_every_stage(tiny_teacher, tmp_path, capsys):
    out = tmp_path / "run"
    code = pipeline.main(["--teacher", str(tiny_teacher), "--out", str(out), "--n", "2", "--sft-prompts", "6",
                          "--sft-epochs", "1", "--sft-batch-size", "8", "--opd-steps", "1", "--max-new-tokens", "12", "--batch-size", "8"])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert list(results["stages"]) == ["teacher (static)", "converted, no training", "after SFT", "after SFT + OPD"]
    for row in results["stages"].values():
        assert set(row["accuracy"]) >= {"math", "code", "if", "average"}
        for key in ("zero_expert_ratio", "expert_flops_reduction", "forward_flops_reduction", "tokens_per_second"):
            assert key in row
    assert results["stages"]["teacher (static)"]["zero_expert_ratio"] == 0.0
    assert results["stages"]["after SFT + OPD"]["zero_expert_ratio"] > 0.0
    assert results["zero_experts"] == 4  # N/2 of the tiny teacher's 8 experts
    for stage in ("convert", "rollouts", "sft", "opd", "eval"):
        assert stage in results["stage_seconds"]
    printed = capsys.readouterr().out
    assert "after SFT + OPD" in printed and "$ python train_opd.py" in printed


def test_pipeline_refuses_a_missing_teacher_and_unknown_stages(tmp_path, capsys):
    assert pipeline.main(["--teacher", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "no teacher at" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        pipeline.main(["--stages", "convert,bogus", "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit):
        pipeline.main(["--eval-split", "heldout", "--n", "1001", "--out", str(tmp_path / "o")])
    assert "held-out slice has 1000 items" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_pipeline_leaves_the_heldout_slice_out_of_its_prompts(tiny_teacher, tmp_path, monkeypatch):
    """--eval-split heldout is only honest if no training prompt is a held-out one: make two prompts the pipeline
    would draw held-out, and they must be gone from both prompt files."""
    from zeda_toy import tasks
    from zeda.data import read_jsonl

    drawn = tasks.mixture("train", 6, seed=1)  # what the SFT prompts are drawn from with --seed 0
    held = {drawn[0].prompt, drawn[1].prompt}
    monkeypatch.setattr(tasks, "heldout_prompts", lambda families=tasks.FAMILIES: held)
    out = tmp_path / "run"
    assert pipeline.main(["--teacher", str(tiny_teacher), "--out", str(out), "--stages", "convert,rollouts",
                          "--sft-prompts", "6", "--opd-prompts", "6", "--max-new-tokens", "4"]) == 0
    sft = {r["messages"][0]["content"] for r in read_jsonl(out / "prompts_sft.jsonl")}
    opd = {r["messages"][0]["content"] for r in read_jsonl(out / "prompts_opd.jsonl")}
    assert len(sft) == len(drawn) - 2 and not (sft | opd) & held


def test_a_failing_stage_stops_the_pipeline_with_its_code(tiny_teacher, tmp_path, capsys):
    """A stage that fails (here: SFT asked for a global batch larger than its rollouts) stops the pipeline with
    that stage's exit code; no later stage runs and no results.json claims a finished run."""
    out = tmp_path / "run"
    code = pipeline.main(["--teacher", str(tiny_teacher), "--out", str(out), "--stages", "convert,rollouts,sft,opd",
                          "--sft-prompts", "2", "--sft-batch-size", "64", "--max-new-tokens", "4"])
    assert code == 2
    err = capsys.readouterr().err
    assert "stage `train_sft.py` exited with code 2" in err and "--resume" in err
    assert not (out / "opd").exists() and not (out / "results.json").exists()


def test_sigterm_reaches_the_running_stage_and_leaves_no_orphan(tiny_teacher, tmp_path):
    """SIGTERM to the pipeline during SFT: the stage gets it, saves a step, exits 143, and so does the pipeline;
    nothing is left running (a stage that kept training would write sft/final later)."""
    out = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "pipeline.py"), "--teacher", str(tiny_teacher), "--out", str(out), "--stages",
           "convert,rollouts,sft", "--sft-prompts", "2", "--sft-epochs", "1000", "--sft-batch-size", "2",
           "--max-new-tokens", "4", "--threads", "1"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"})
    try:
        metrics, deadline = out / "sft" / "metrics.jsonl", time.time() + 180
        while not (metrics.exists() and metrics.read_text().count("\n") >= 1):
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            assert time.time() < deadline, "SFT did not start within 180 s"
            time.sleep(0.05)
        stage = [int(p) for p in os.listdir("/proc") if p.isdigit() and
                 Path(f"/proc/{p}/stat").exists() and
                 Path(f"/proc/{p}/stat").read_text().rpartition(")")[2].split()[1] == str(proc.pid)]
        assert len(stage) == 1
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err[-3000:]
    assert "stage `train_sft.py` exited with code 143" in err and "Traceback" not in err
    assert not Path(f"/proc/{stage[0]}").exists() or "Z" in Path(f"/proc/{stage[0]}/stat").read_text().split()[2]
    assert list((out / "sft").glob("step-*")) and not (out / "sft" / "final").exists()
