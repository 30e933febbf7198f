"""Every numeric flag of every script has a declared range, checked as the arguments are parsed: a bad value
(nan, zero where it must be positive, a negative size, a probability above 1) is refused before any work, with
exit code 2 and a message that names the flag."""

import math

import pytest

import compare
import convert
import evaluate
import pipeline
import rollout
import serve
import train_opd
import train_sft
from zeda.flags import float_range, int_range

REQUIRED = {  # the required flags of each script (dummy paths: parsing comes before any file is opened)
    "evaluate.py": (evaluate.main, ["--model", "m"]),
    "compare.py": (compare.main, ["--reference", "r", "--model", "m"]),
    "serve.py": (serve.main, ["--prompt", "hi"]),
    "rollout.py": (rollout.main, ["--teacher", "t", "--prompts", "p", "--out", "o"]),
    "train_sft.py": (train_sft.main, ["--student", "s", "--rollouts", "r", "--out", "o"]),
    "train_opd.py": (train_opd.main, ["--student", "s", "--teacher", "t", "--prompts", "p", "--out", "o"]),
    "pipeline.py": (pipeline.main, ["--out", "o"]),
    "convert.py": (convert.main, ["--input-dir", "a", "--output-dir", "b"]),
}

BAD = [  # (script, flag, value)
    ("evaluate.py", "--n", "0"), ("evaluate.py", "--batch-size", "0"), ("evaluate.py", "--temperature", "nan"),
    ("evaluate.py", "--temperature", "-1"), ("evaluate.py", "--top-p", "1.5"), ("evaluate.py", "--top-p", "0"),
    ("evaluate.py", "--top-k", "-1"), ("evaluate.py", "--max-new-tokens", "0"), ("evaluate.py", "--seed", "-3"),
    ("compare.py", "--n", "-1"), ("compare.py", "--batch-size", "0"), ("compare.py", "--max-new-tokens", "0"),
    ("serve.py", "--temperature", "inf"), ("serve.py", "--max-new-tokens", "-5"), ("serve.py", "--top-p", "nan"),
    ("rollout.py", "--samples-per-prompt", "0"), ("rollout.py", "--batch-size", "0"),
    ("rollout.py", "--temperature", "nan"),
    ("train_sft.py", "--global-batch-size", "0"), ("train_sft.py", "--micro-batch-size", "0"),
    ("train_sft.py", "--max-steps", "-1"), ("train_sft.py", "--epochs", "0"), ("train_sft.py", "--lr", "0"),
    ("train_sft.py", "--lr", "nan"), ("train_sft.py", "--warmup-ratio", "1"), ("train_sft.py", "--beta2", "1"),
    ("train_sft.py", "--grad-clip", "0"), ("train_sft.py", "--w", "0"), ("train_sft.py", "--alpha", "-0.1"),
    ("train_sft.py", "--save-every", "-1"), ("train_sft.py", "--tp", "0"), ("train_sft.py", "--max-seq-len", "1"),
    ("train_opd.py", "--prompts-per-step", "0"), ("train_opd.py", "--samples-per-prompt", "0"),
    ("train_opd.py", "--max-steps", "0"), ("train_opd.py", "--temperature", "0"), ("train_opd.py", "--clip", "-1"),
    ("train_opd.py", "--lr", "-1e-5"), ("train_opd.py", "--ep", "0"), ("train_opd.py", "--weight-decay", "nan"),
    ("pipeline.py", "--n", "0"), ("pipeline.py", "--sft-batch-size", "0"), ("pipeline.py", "--opd-steps", "0"),
    ("pipeline.py", "--sft-lr", "nan"), ("pipeline.py", "--threads", "0"), ("pipeline.py", "--zero-experts", "0"),
    ("pipeline.py", "--rollout-top-p", "2"),
    ("convert.py", "--num-zero-experts", "0"), ("convert.py", "--new-num-experts", "-8"), ("convert.py", "--seed", "-1"),
]


@pytest.mark.parametrize("script,flag,value", BAD)
def test_bad_numeric_flag_is_refused_by_name(script, flag, value, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # nothing may be written, even by mistake, where the test runs
    main, required = REQUIRED[script]
    with pytest.raises(SystemExit) as exc:
        main([*required, f"{flag}={value}"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}" in err and value in err, err
    assert list(tmp_path.iterdir()) == []


def test_ranges():
    positive = int_range(min=1)
    assert positive("3") == 3
    for bad in ("0", "-2", "1.5", "x"):
        with pytest.raises(Exception):
            positive(bad)
    prob = float_range(above=0, max=1)
    assert prob("1") == 1.0 and prob("0.25") == 0.25
    for bad in ("0", "1.0001", "nan", "inf", "-inf", "one"):
        with pytest.raises(Exception):
            prob(bad)
    assert math.isfinite(float_range()("1e300"))
