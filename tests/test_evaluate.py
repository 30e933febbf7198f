"""evaluate.py and zeda/evaluation.py on a tiny random checkpoint with the char-level tokenizer.

A random model answers wrongly, so the plumbing is checked with a generation that is made to answer correctly
for chosen prompts (the real engine still runs, so the routing statistics are real), and the scoring on known
outputs. The CLI runs once as a subprocess, and once more for its missing-folder error.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import evaluate
from zeda import evaluation
from zeda_toy import tasks
from zeda.data import encode_chat
from zeda.evaluation import EvaluationError, benchmark_items, evaluate_model, suite_items
from zeda.sampling import SamplingParams
from zeda.loading import load_for_inference
from zeda_toy.tiny import make_tiny_checkpoint
from zeda_toy.tokenizer import save_tokenizer

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # subprocesses on a shared 2-core machine
GREEDY = SamplingParams(temperature=0.0, max_new_tokens=6)
CONTEXT = 256  # max_position_embeddings of the tiny model: task prompts fit, a 400-character one does not


def make_tiny_folder(path: Path, **overrides) -> Path:
    """A random tiny MoE with the char-level tokenizer (vocabulary 101 <= 104) and its chat template."""
    make_tiny_checkpoint(path, vocab_size=104, eos_token_id=3, pad_token_id=0, max_position_embeddings=CONTEXT,
                         **overrides)
    save_tokenizer(path)
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_folder(tmp_path_factory.mktemp("evaluate") / "tiny")


@pytest.fixture(scope="module")
def loaded(tiny):
    return load_for_inference(tiny, device="cpu")


@pytest.fixture(scope="module")
def report(loaded):
    model, tokenizer = loaded
    return evaluate_model(model, tokenizer, tasks.FAMILIES, 3, GREEDY, batch_size=4, seed=0, progress=False)


def answering(monkeypatch, tokenizer, responses: dict[tuple, str]):
    """Make evaluation's generate answer `responses[prompt ids]` for those prompts (others keep the model's)."""
    real_generate = evaluation.generate

    def fake(model, prompts, params, eos_ids, pad_id=0, seed=None, on_token=None):
        gen = real_generate(model, prompts, params, eos_ids, pad_id, seed)
        for row, ids in enumerate(prompts):
            if tuple(ids) in responses:
                gen.tokens[row] = tokenizer.encode(responses[tuple(ids)], add_special_tokens=False) + [3]
                gen.finished[row] = True
        return gen

    monkeypatch.setattr(evaluation, "generate", fake)


def prompt_ids(tokenizer, messages) -> tuple:
    return tuple(encode_chat(tokenizer, messages).ids)


def write_lines(path: Path, lines: list) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


# ---------------------------------------------------------------------------------------------------------------
# The report


def test_report_has_every_field_with_sane_values(report):
    assert set(report["accuracy"]) == {*tasks.FAMILIES, "average"}
    for family in tasks.FAMILIES:
        c = report["counts"][family]
        assert c["total"] == 3 and 0 <= c["correct"] <= 3 and 0 <= c["finished"] <= 3
        assert report["accuracy"][family] == c["correct"] / c["total"]
        assert 1 <= len(report["samples"][family]) <= 3
        assert set(report["samples"][family][0]) == {"where", "prompt", "output", "reference", "correct"}
    acc = report["accuracy"]
    assert acc["average"] == pytest.approx(sum(acc[f] for f in tasks.FAMILIES) / 3)
    for key in ("zero_expert_ratio", "zero_expert_ratio_generated", "expert_flops_reduction",
                "forward_flops_reduction"):
        assert isinstance(report[key], float) and 0.0 <= report[key] <= 1.0, key
    assert 0 < report["expert_flops"]["dynamic"] <= report["expert_flops"]["static"]
    assert 0 < report["forward_flops"]["dynamic"] <= report["forward_flops"]["static"]
    assert report["expert_flops"]["static"] < report["forward_flops"]["static"]
    # A static model: every slot is real, nothing is saved.
    assert report["zero_expert_ratio"] == report["expert_flops_reduction"] == report["forward_flops_reduction"] == 0
    assert isinstance(report["tokens_generated"], int) and report["tokens_generated"] > 0
    assert report["tokens_generated"] == sum(c["tokens_generated"] for c in report["counts"].values())
    assert report["tokens_generated"] <= 9 * GREEDY.max_new_tokens
    # Processed = prompts + generated tokens fed back, which is all of them but each answer's last one.
    assert report["tokens_processed"] == report["prompt_tokens"] + report["tokens_generated"] - 9
    assert report["tokens_per_second"] > 0 and report["generation_seconds"] > 0
    assert report["n_per_family"] == 3 and report["families"] == list(tasks.FAMILIES)
    assert report["sampling"] == {"temperature": 0.0, "top_p": 1.0, "top_k": 0, "max_new_tokens": 6, "seed": 0}
    assert report["benchmark"] is None and report["device"] == "cpu" and report["dtype"] == "float32"
    json.dumps(report)  # plain JSON types only


def test_correct_answers_are_counted(monkeypatch, loaded):
    """All math answers and one code answer correct (the worked reference solution), the rest the model's."""
    model, tokenizer = loaded
    items = suite_items(tasks.FAMILIES, 3)
    chosen = [it for it in items if it.group == "math"] + [next(it for it in items if it.group == "code")]
    answering(monkeypatch, tokenizer, {prompt_ids(tokenizer, it.messages): it.task.response for it in chosen})
    rep = evaluate_model(model, tokenizer, tasks.FAMILIES, 3, GREEDY, batch_size=2, seed=0, progress=False)
    assert [rep["counts"][f]["correct"] for f in tasks.FAMILIES] == [3, 1, 0]
    assert rep["accuracy"]["math"] == 1.0 and rep["accuracy"]["code"] == pytest.approx(1 / 3)
    assert rep["accuracy"]["average"] == pytest.approx((1 + 1 / 3 + 0) / 3)
    assert rep["counts"]["math"]["finished"] == 3  # the fake answers end with EOS
    assert all(s["correct"] and "Answer:" in s["output"] for s in rep["samples"]["math"])


def test_heldout_split_items():
    """--split heldout: the same families, drawn from the train split's held-out slice, and named so."""
    test, held = suite_items(tasks.FAMILIES, 3), suite_items(tasks.FAMILIES, 3, split="heldout")
    assert [it.group for it in held] == [it.group for it in test]
    assert all(tasks.split_of(it.group, it.messages[0]["content"]) == "train" for it in held)
    assert held[0].where == "math heldout item 0"
    with pytest.raises(EvaluationError, match="unknown split 'val'"):
        suite_items(tasks.FAMILIES, 3, split="val")


def test_scoring_of_known_outputs():
    for item in suite_items(tasks.FAMILIES, 4):
        assert item.is_correct(item.task.response), item.where
        assert not item.is_correct(item.task.response.replace("Answer:", "Result:"))
    plain = evaluation.Item("benchmark", "b:1", [{"role": "user", "content": "6*7?"}], "42", None)
    assert plain.is_correct("6*7 = 42\nAnswer: 42") and plain.is_correct("so \\boxed{42.0}")
    assert not plain.is_correct("Answer: 41")


# ---------------------------------------------------------------------------------------------------------------
# A local benchmark file


def test_benchmark_file_is_read_and_scored(tmp_path, monkeypatch, loaded):
    model, tokenizer = loaded
    if_task = tasks.generate("if", "test", 1, seed=3)[0]
    records = [
        {"messages": [{"role": "user", "content": "Compute 1+2."}], "answer": "3"},
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2*3?"},
                      {"role": "assistant", "content": "a final assistant turn is not part of the prompt"}],
         "ground_truth": 6},
        tasks.to_prompt_record(if_task),  # family "if": checked by tasks.verify, not string equality
        {"prompt": "Say hi.", "label": "hi"},
    ]
    path = write_lines(tmp_path / "bench.jsonl", records[:2] + [""] + records[2:])  # a blank line is skipped
    items = benchmark_items(path)
    assert [it.where for it in items] == [f"{path}:{n}" for n in (1, 2, 4, 5)]
    assert items[1].messages[-1] == {"role": "user", "content": "What is 2*3?"} and items[1].reference == "6"
    assert items[2].task is not None and items[2].is_correct(if_task.response)

    # The first three answered correctly (the "if" one with the reference solution), the last by the model.
    responses = {prompt_ids(tokenizer, items[0].messages): "1+2+0=3\nAnswer: 3",
                 prompt_ids(tokenizer, items[1].messages): "Answer: 6.0",
                 prompt_ids(tokenizer, items[2].messages): if_task.response}
    answering(monkeypatch, tokenizer, responses)
    rep = evaluate_model(model, tokenizer, (), 0, GREEDY, batch_size=3, seed=0, benchmark=path, progress=False)
    assert set(rep["accuracy"]) == {"benchmark", "average"} and rep["benchmark"] == str(path)
    assert rep["counts"]["benchmark"]["correct"] == 3 and rep["counts"]["benchmark"]["total"] == 4
    assert rep["accuracy"]["benchmark"] == rep["accuracy"]["average"] == 0.75

    both = evaluate_model(model, tokenizer, ("math",), 2, GREEDY, batch_size=8, seed=0, benchmark=path,
                          progress=False)
    assert set(both["accuracy"]) == {"math", "benchmark", "average"}
    assert both["accuracy"]["average"] == pytest.approx((both["accuracy"]["math"] + 0.75) / 2)


def test_benchmark_errors_name_the_line(tmp_path, loaded):
    model, tokenizer = loaded
    good = {"messages": [{"role": "user", "content": "Compute 1+2."}], "answer": "3"}
    bad_json = write_lines(tmp_path / "bad.jsonl", [good, '{"messages": [', good])
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: invalid JSON"):
        evaluate_model(model, tokenizer, (), 0, GREEDY, 2, 0, benchmark=bad_json, progress=False)
    no_answer = write_lines(tmp_path / "noref.jsonl", [good, good, {"messages": good["messages"]}])
    with pytest.raises(EvaluationError, match=r"noref\.jsonl:3: no reference answer"):
        benchmark_items(no_answer)
    bad_if = write_lines(tmp_path / "badif.jsonl", [{**good, "family": "if"}])
    with pytest.raises(EvaluationError, match=r"badif\.jsonl:1: not an instruction-following prompt"):
        benchmark_items(bad_if)
    long = write_lines(tmp_path / "long.jsonl", [good, {"messages": [{"role": "user", "content": "x" * 400}],
                                                        "answer": "1"}])
    with pytest.raises(EvaluationError, match=r"long\.jsonl:2: the prompt has \d+ tokens.*max_position_embeddings"):
        evaluate_model(model, tokenizer, (), 0, GREEDY, 2, 0, benchmark=long, progress=False)
    with pytest.raises(EvaluationError, match="no records"):
        evaluate_model(model, tokenizer, (), 0, GREEDY, 2, 0, benchmark=write_lines(tmp_path / "e.jsonl", [""]),
                       progress=False)


# ---------------------------------------------------------------------------------------------------------------
# Errors


def test_bad_input_is_refused(loaded):
    model, tokenizer = loaded
    with pytest.raises(EvaluationError, match="unknown task family 'poetry'"):
        evaluate_model(model, tokenizer, ("math", "poetry"), 2, GREEDY, 2, 0, progress=False)
    with pytest.raises(EvaluationError, match="n must be a positive integer"):
        evaluate_model(model, tokenizer, ("math",), 0, GREEDY, 2, 0, progress=False)
    with pytest.raises(EvaluationError, match="nothing to evaluate"):
        evaluate_model(model, tokenizer, (), 0, GREEDY, 2, 0, progress=False)


def test_cli_errors_exit_2_and_write_nothing(tmp_path, tiny, capsys):
    out = tmp_path / "r.json"
    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 10}))
    cases = [(["--model", str(tiny), "--tasks", "math,poetry"], "unknown task family 'poetry'"),
             (["--model", str(tiny), "--split", "heldout", "--n", "1001"], "the held-out slice has 1000 items"),
             (["--model", str(llama)], "model_type 'llama' is not supported"),
             (["--model", str(tiny), "--benchmark", str(tmp_path / "missing.jsonl")], "missing.jsonl: no such file")]
    for argv, message in cases:
        assert evaluate.main([*argv, "--out", str(out), "--no-progress"]) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("evaluate.py: error:") and message in err, err
    assert not out.exists()


def test_cli_missing_model_dir(tmp_path):
    out = tmp_path / "r.json"
    r = subprocess.run([sys.executable, "evaluate.py", "--model", str(tmp_path / "nope"), "--out", str(out)],
                       cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert r.returncode == 2 and "no such model folder" in r.stderr and str(tmp_path / "nope") in r.stderr
    assert not out.exists()


def test_cli_end_to_end(tmp_path, tiny):
    out = tmp_path / "sub" / "r.json"
    r = subprocess.run([sys.executable, "evaluate.py", "--model", str(tiny), "--n", "2", "--max-new-tokens", "8",
                        "--batch-size", "4", "--out", str(out)], cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    for text in ("math", "code", "if", "average", "zero-expert ratio", "expert FLOPs", "tokens/s"):
        assert text in r.stdout
    rep = json.loads(out.read_text())
    for key in ("accuracy", "zero_expert_ratio", "expert_flops_reduction", "forward_flops_reduction",
                "tokens_generated", "tokens_per_second", "expert_flops", "forward_flops", "model", "n_per_family",
                "sampling", "counts", "samples"):
        assert key in rep, key
    assert rep["model"] == str(tiny) and rep["n_per_family"] == 2 and rep["sampling"]["max_new_tokens"] == 8
    assert all(rep["counts"][f]["total"] == 2 for f in tasks.FAMILIES)
    assert [p.name for p in out.parent.iterdir()] == ["r.json"]  # no temporary file left behind


def test_converted_model_saves_expert_flops(tmp_path, tiny, loaded):
    """Zero experts cost nothing: with a constant cost per real slot the expert-FLOP reduction *is* the
    zero-expert ratio; the whole forward saves less (attention, head and the larger router are unchanged)."""
    from zeda.conversion import convert_checkpoint

    out = tmp_path / "converted"
    convert_checkpoint(tiny, out, num_zero=4, progress=False)
    model, tokenizer = load_for_inference(out, device="cpu")
    rep = evaluate_model(model, tokenizer, ("math",), 2, GREEDY, batch_size=2, seed=0, progress=False)
    assert rep["architecture"]["num_zero_experts"] == 4
    assert 0 < rep["zero_expert_ratio"] < 1
    assert rep["expert_flops_reduction"] == pytest.approx(rep["zero_expert_ratio"])
    assert 0 < rep["forward_flops_reduction"] < rep["expert_flops_reduction"]


def test_references_no_answer_can_match_are_warned_about(tmp_path, capsys):
    """An empty or multi-line reference scores every answer wrong; the benchmark is still run, with a warning
    naming how many and the first."""
    q = [{"role": "user", "content": "Compute 1+2."}]
    path = write_lines(tmp_path / "b.jsonl", [{"messages": q, "answer": "3"}, {"messages": q, "answer": "1\n2"},
                                              {"messages": q, "answer": " "}, {"messages": q, "answer": 122},
                                              {"messages": q, "answer": "**$\\boxed{7}$**"}])
    assert len(benchmark_items(path)) == 5
    err = capsys.readouterr().err
    assert f"2 reference answer(s) in {path} can never be matched" in err and f"{path}:2: '1\\n2' spans" in err
    benchmark_items(write_lines(tmp_path / "ok.jsonl", [{"messages": q, "answer": "3"}]))
    assert capsys.readouterr().err == ""
