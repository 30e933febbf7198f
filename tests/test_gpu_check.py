"""bench/gpu_check.py: its --smoke run (every section's code path, tiny, on CPU) writes one JSON with every
section and sane values; a failing section is recorded and the others still run; without CUDA and without
--smoke it refuses with one line. The GPU sizes themselves only run on a GPU."""

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import bench.generate
import bench.moe_layer
from bench import gpu_check

ROOT = Path(__file__).resolve().parents[1]
TEACHERS = ("qwen3_moe", "glm4_moe_lite")


def run_gpu_check(*args: str) -> subprocess.CompletedProcess:
    """The script as a user runs it, with no GPU visible and without the Triton interpreter (tests/test_kernels.py
    sets TRITON_INTERPRET=1 for the whole session; interpreted, the triton backend takes ~40 s here)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env |= {"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, "bench/gpu_check.py", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check") / "results" / "gpu_check.json"  # a folder not made yet
    proc = run_gpu_check("--smoke", "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert os.listdir(out.parent) == ["gpu_check.json"]  # written by rename: no temporary file left behind
    return json.loads(out.read_text())


def test_smoke_writes_every_section_with_its_machine_and_settings(smoke):
    assert smoke["smoke"] is True and smoke["failed"] == []
    assert list(smoke["sections"]) == ["experts", "training", "decode"]
    for name, section in smoke["sections"].items():
        assert section["status"] == "ok" and section["problems"] == [], (name, section["problems"])
        assert section["device"].startswith("CPU") and section["torch"] == torch.__version__, name
        assert section["settings"] and section["seconds"] > 0, name


def test_smoke_expert_backends_agree_at_every_zero_share(smoke):
    section = smoke["sections"]["experts"]
    assert "TRITON_INTERPRET" in section["skipped_backends"]["triton"]  # skipped, and says why
    settings, K = section["settings"], section["settings"]["layer"]["K"]
    measured = {(r["backend"], r["T"], r["zero_share"]) for r in section["rows"]}
    assert measured == {(b, T, z) for b in ("loop", "grouped_mm") for T in settings["tokens"]
                        for z in settings["zero_shares"]}
    for row in section["rows"]:
        assert row["fwd_ms"] > 0 and row["fwd_bwd_ms"] > 0
        assert row["real_slots"] == round((1 - row["zero_share"]) * row["T"] * K)  # zero slots really dropped
        assert row["agree"] and row["compared_with"] == "loop" and row["reference_max_abs"] > 0
        assert row["max_abs_diff"] <= 0.03 * row["reference_max_abs"] and row["grad_max_rel_diff"] <= 0.03


def test_smoke_decode_gives_transformers_greedy_tokens(smoke):
    section = smoke["sections"]["decode"]
    assert section["compile"].startswith("off")  # recorded, with the reason
    for arch in TEACHERS:
        r = section["runs"]["float32"][arch]
        assert r["identical"] is True and r["identical_by_run"] == {"eager": True}
        assert r["generated_tokens"] > 0 and r["zeda_eager_tokens_per_s"] > 0 and r["transformers_tokens_per_s"] > 0


def test_smoke_training_steps_report_memory_beside_the_plan(smoke):
    model = smoke["sections"]["training"]["models"]["qwen3_moe"]
    assert model["experts"] == 8 and model["checkpoint_bytes"] > 0
    for kind in ("sft", "opd"):
        phase = model[kind]
        assert phase["rc"] == 0 and len(phase["step_seconds"]) == 1 and math.isfinite(phase["loss"][0]), kind
        memory = phase["memory"]
        assert memory["measured_bytes"] == memory["peak_rss_bytes"] > 100 * 2**20  # python + torch at least
        assert memory["predicted_bytes"] == memory["plan"]["total_bytes"] > 0
        assert memory["measured_over_predicted"] == round(memory["measured_bytes"] / memory["predicted_bytes"], 3)
        assert memory["plan"]["command"].startswith("python -m zeda.plan --config")
        assert memory["plan"]["terms_bytes"]["parameters"] > 0
    assert "frozen teacher parameters" in model["opd"]["memory"]["plan"]["terms_bytes"]


def test_refuses_without_cuda_unless_smoke(tmp_path):
    out = tmp_path / "gpu_check.json"
    proc = run_gpu_check("--out", str(out))
    assert proc.returncode == 2 and not out.exists()
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "CUDA" in lines[0] and "--smoke" in lines[0], proc.stderr


def test_a_failing_backend_is_recorded_and_the_rest_still_run(tmp_path, monkeypatch):
    """In process, at the smoke sizes: grouped_mm raises; loop is still measured, the section is failed, the next
    section still runs, and main() exits 1."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    real_get_backend = bench.moe_layer.get_backend

    def broken_grouped_mm(name):
        if name != "grouped_mm":
            return real_get_backend(name)

        def fails(*args):
            raise RuntimeError("grouped_mm is broken")
        return fails, "a broken backend"

    monkeypatch.setattr(bench.moe_layer, "get_backend", broken_grouped_mm)
    ran = []
    monkeypatch.setattr(gpu_check, "check_decode", lambda *args: ran.append("decode") or [])
    out = tmp_path / "gpu_check.json"
    assert gpu_check.main(["--smoke", "--sections", "decode,experts", "--out", str(out)]) == 1
    report = json.loads(out.read_text())
    assert report["failed"] == ["experts"] and ran == ["decode"]
    assert report["sections"]["decode"]["status"] == "ok"
    experts = report["sections"]["experts"]
    assert experts["status"] == "failed" and len(experts["problems"]) == 6
    assert all("grouped_mm is broken" in p for p in experts["problems"])
    loop = [r for r in experts["rows"] if r["backend"] == "loop"]
    assert len(loop) == 6 and all(r["fwd_ms"] > 0 and r["agree"] for r in loop)
    assert all("grouped_mm is broken" in r["error"] for r in experts["rows"] if r["backend"] == "grouped_mm")


def test_a_failing_compiled_decode_is_recorded_and_the_eager_one_still_measured(monkeypatch):
    """What a GPU run may meet first (CUDA-graph capture): the error is kept, the eager numbers are measured, and
    the section is failed. measure_teacher is replaced by one whose compiled path raises."""
    def measure_teacher(arch, *args, compile, **kwargs):
        if compile:
            raise RuntimeError("CUDA graph capture failed")
        return {"identical": True, "identical_by_run": {"eager": True}, "zeda_eager_tokens_per_s": 1.0}

    monkeypatch.setattr(bench.generate, "measure_teacher", measure_teacher)
    record = {}
    sizes = dataclasses.replace(gpu_check.SMOKE, compile=True)
    problems = gpu_check.check_decode(sizes, "cpu", record, deadline=float("inf"))
    assert len(problems) == len(TEACHERS) and all("CUDA graph capture failed" in p for p in problems)
    for arch in TEACHERS:
        run = record["runs"]["float32"][arch]
        assert "CUDA graph capture failed" in run["error"] and run["zeda_eager_tokens_per_s"] == 1.0


def test_an_unknown_section_is_refused_in_one_line(capsys):
    assert gpu_check.main(["--smoke", "--sections", "experts,kernels"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--sections" in err[0] and "kernels" in err[0]
