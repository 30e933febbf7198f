"""bench/train_step.py --smoke: every row is there and timed, and on the static teachers zeda's training loss (both
heads, both expert backends) is transformers' own loss on the same batch, so the speed comparison compares the
same computation."""

from __future__ import annotations

import json
import math

import pytest

from bench import train_step

ZEDA_ROWS = {(f"zeda {kind}", backend, head) for kind in ("static", "dynamic") for backend in train_step.ZEDA_BACKENDS
             for head in train_step.HEADS}


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("train_step") / "train_step.json"
    assert train_step.main(["--smoke", "--threads", "1", "--json", str(out)]) == 0
    return json.loads(out.read_text())


@pytest.mark.parametrize("config", ["qwen_teacher", "glm_teacher"])
def test_smoke_has_every_row_timed(report, config):
    rows = [r for r in report["rows"] if r["config"] == config]
    assert {(r["model"], r["impl"], r["head"]) for r in rows} == {("transformers", "grouped_mm", "logits")} | ZEDA_ROWS
    hf = next(r for r in rows if r["model"] == "transformers")
    for r in rows:
        assert r["tokens"] == 2 * 32 and len(r["steps_s"]) == 1
        assert r["tokens_per_s"] == pytest.approx(r["tokens"] / r["step_s"])
        assert r["vs_transformers"] == pytest.approx(r["tokens_per_s"] / hf["tokens_per_s"])
    for r in rows:
        if r["model"] == "zeda dynamic":
            static = next(s for s in rows
                          if (s["model"], s["impl"], s["head"]) == ("zeda static", r["impl"], r["head"]))
            assert r["dynamic_vs_static"] == pytest.approx(r["tokens_per_s"] / static["tokens_per_s"])
    desc = report["configs"][config]
    assert desc["batch"] == 2 and desc["seq_len"] == 32 and desc["auto_backend"] == "grouped_mm"
    assert report["machine"]["cpu_count"] >= 1 and report["machine"]["torch"] and report["dtype"] == "float32"


@pytest.mark.parametrize("config", ["qwen_teacher", "glm_teacher"])
def test_static_losses_agree_with_transformers(report, config):
    """The same weights, batch and loss: zeda's trainer loss (chunked head) and plain-logits loss, with either
    expert backend, equal transformers' F.cross_entropy over its own logits in fp32."""
    rows = [r for r in report["rows"] if r["config"] == config]
    hf = next(r for r in rows if r["model"] == "transformers")
    assert math.isfinite(hf["loss"]) and hf["loss"] > 0
    static = [r for r in rows if r["model"] == "zeda static"]
    assert len(static) == 4
    for r in static:
        assert abs(r["loss"] - hf["loss"]) < 1e-4, r
        assert r["zero_share"] == 0


@pytest.mark.parametrize("config", ["qwen_teacher", "glm_teacher"])
def test_dynamic_rows_route_about_half_to_zero_experts(report, config):
    rows = [r for r in report["rows"] if r["config"] == config and r["model"] == "zeda dynamic"]
    assert all(0.4 <= r["zero_share"] <= 0.6 for r in rows)
    hf = next(r for r in report["rows"] if r["config"] == config and r["model"] == "transformers")
    assert all(abs(r["loss"] - hf["loss"]) > 1e-3 for r in rows)  # another model: half of its slots skipped
    desc = report["configs"][config]
    assert desc["forward_gflops_dynamic"] < desc["forward_gflops_static"]
    assert desc["dynamic_vs_static_flop_ceiling"] > 1


def test_a_bad_flag_is_refused_by_name(capsys):
    with pytest.raises(SystemExit) as e:
        train_step.main(["--configs", "qwen_teacher,nope"])
    assert e.value.code == 2
    assert "--configs" in capsys.readouterr().err
