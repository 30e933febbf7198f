"""bench/harness.py's export, without lm_eval: the exported items are evaluate.py's, the answer regex extracts what
tasks.verify extracts, the multiple-choice items hold the reference answer once among distractors no choice is a
prefix of, the context + correct choice is the reference answer as SFT encodes it, and the task YAMLs read back to
what the harness meant (absolute data paths, greedy, no stop string but EOS)."""

import json
import re
from pathlib import Path

import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from bench import harness
from zeda_toy import tasks
from zeda.data import encode_chat
from zeda.loading import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def regex_filter(text: str) -> str | None:
    """lm-eval's regex filter as the task configures it (findall, group_select -1, strip); None: its fallback."""
    matches = re.findall(harness.ANSWER_REGEX, text)
    return matches[-1].strip() if matches else None


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(["Answer:", "Answer: ", " 12", "x", "\n", " ", "Answer:Answer: 7", "\r", "A"]),
                max_size=12))
def test_answer_regex_extracts_what_tasks_verify_reads(parts):
    text = "".join(parts)
    assert regex_filter(text) == tasks.extract_answer(text)


def test_answer_regex_on_the_reference_responses():
    for family in harness.GEN_FAMILIES:
        for task in tasks.generate(family, "test", 50):
            assert regex_filter(task.response) == task.answer
            assert regex_filter(task.response + "\nAnswer: wrong\n") == "wrong"  # the last answer counts
            assert regex_filter(task.response.replace("Answer:", "Result:")) is None


def test_distractors_are_distinct_non_negative_and_never_a_prefix():
    answers = [str(v) for v in range(0, 1200)] + [t.answer for t in tasks.generate("math", "test", 300)]
    for answer in answers:
        distractors = harness.math_distractors(answer)
        assert distractors == harness.math_distractors(answer)  # the same in every run
        choices = [answer, *distractors]
        assert len(set(choices)) == 4 and all(int(c) >= 0 for c in choices)
        assert not any(a != b and b.startswith(a) for a in choices for b in choices), choices


def test_export_is_evaluate_items_in_order():
    n = 20
    records = harness.export_records(n, task_seed=3)
    for family in harness.GEN_FAMILIES:
        drawn = tasks.generate(family, "test", n, seed=3)  # what evaluate.py --task-seed 3 --n 20 scores
        assert [r["prompt"] for r in records[family]] == [t.prompt for t in drawn]
        assert [r["answer"] for r in records[family]] == [t.answer for t in drawn]
        assert [r["messages"] for r in records[family]] == [[{"role": "user", "content": t.prompt}] for t in drawn]
    math = tasks.generate("math", "test", n, seed=3)
    ll = records["math_ll"]
    assert [r["prompt"] for r in ll] == [t.prompt for t in math]
    for r, task in zip(ll, math):
        assert r["choices"][r["label"]] == task.answer and r["choices"].count(task.answer) == 1
        assert r["prefix"] + " " + task.answer == task.response  # the worked solution, cut before the answer
    assert len({r["label"] for r in ll}) > 1  # the right choice is not always in the same place


def test_context_plus_correct_choice_is_the_reference_answer_as_sft_encodes_it():
    tokenizer = load_tokenizer(ROOT / "assets" / "qwen3_moe_teacher")
    for r, task in zip(harness.export_records(10)["math_ll"], tasks.generate("math", "test", 10)):
        context = tokenizer.apply_chat_template([{"role": "user", "content": r["prompt"]}], tokenize=False,
                                                add_generation_prompt=True) + r["prefix"]
        ids = tokenizer(context + " " + r["choices"][r["label"]], add_special_tokens=False)["input_ids"]
        reference = encode_chat(tokenizer, [{"role": "user", "content": task.prompt}], task.response).ids
        assert ids == reference[:-1]  # everything but the EOS that ends the answer


def test_task_folder_reads_back(tmp_path):
    assert harness.main(["--export-only", "--tasks-dir", str(tmp_path / "t"), "--n", "4",
                         "--max-new-tokens", "99"]) == 0
    folder = (tmp_path / "t").resolve()
    configs = {p.stem: yaml.safe_load(p.read_text()) for p in folder.glob("*.yaml")}
    assert set(configs) == {*harness.GEN_TASKS.values(), harness.LL_TASK}
    for name, config in configs.items():
        assert config["task"] == name and config["dataset_path"] == "json"
        data = Path(config["dataset_kwargs"]["data_files"]["test"])
        assert data.is_absolute() and data.parent == folder
        rows = [json.loads(line) for line in data.read_text().splitlines()]
        assert len(rows) == 4
        fields = {config["doc_to_text"], config["doc_to_target"]} | ({config["gen_prefix"], config["doc_to_choice"]}
                                                                     if name == harness.LL_TASK else set())
        assert fields <= set(rows[0])  # field names, read verbatim by lm-eval
    for name in harness.GEN_TASKS.values():
        gen = configs[name]["generation_kwargs"]
        assert gen == {"until": [], "max_gen_toks": 99, "do_sample": False, "temperature": 0.0}
        regex = configs[name]["filter_list"][0]["filter"][0]
        assert regex == {"function": "regex", "regex_pattern": harness.ANSWER_REGEX, "group_select": -1}
    assert configs[harness.LL_TASK]["output_type"] == "multiple_choice"


def test_export_only_needs_a_folder(capsys):
    assert harness.main(["--export-only"]) == 2
    assert "--tasks-dir" in capsys.readouterr().err
