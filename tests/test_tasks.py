"""zeda_toy/tasks.py: references verify, corruptions do not, splits are disjoint and deterministic."""

import hashlib
import json
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zeda_toy import tasks
from zeda_toy.tasks import FAMILIES, Task, extract_answer, generate, verify

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
seeds = st.integers(min_value=0, max_value=10**9)


def with_answer(task: Task, answer: str) -> str:
    """The reference response with its final answer replaced."""
    head, _ = task.response.rsplit(tasks.ANSWER_PREFIX, 1)
    return f"{head}{tasks.ANSWER_PREFIX} {answer}"


@SETTINGS
@given(family=st.sampled_from(FAMILIES), split=st.sampled_from(tasks.SPLITS), seed=seeds)
def test_reference_responses_verify(family, split, seed):
    for task in generate(family, split, 4, seed):
        assert task.family == family
        assert verify(task, task.response), task
        assert extract_answer(task.response) == task.answer
        assert task.response.endswith(f"{tasks.ANSWER_PREFIX} {task.answer}")


@SETTINGS
@given(family=st.sampled_from(("math", "code")), seed=seeds, data=st.data())
def test_math_and_code_reject_any_changed_answer(family, seed, data):
    task = generate(family, "train", 1, seed)[0]
    answer = task.answer
    i = data.draw(st.integers(0, len(answer) - 1))
    new_char = data.draw(st.characters(min_codepoint=33, max_codepoint=126).filter(lambda c: c != answer[i]))
    mutated = answer[:i] + new_char + answer[i + 1:]
    assert not verify(task, with_answer(task, mutated))
    assert not verify(task, with_answer(task, answer + "0"))
    assert not verify(task, task.response.replace(tasks.ANSWER_PREFIX, "Result:"))  # no final answer line


def if_parts(task: Task) -> tuple[list[str], str]:
    """The reference answer's items and the separator the prompt asks for."""
    sep = next(sep for name, sep in tasks._SEPARATORS.items() if task.prompt.endswith(f"separated by {name}."))
    return (task.answer.split(sep), sep)


@SETTINGS
@given(seed=seeds, data=st.data())
def test_if_rejects_broken_constraints(seed, data):
    task = generate("if", "train", 1, seed)[0]
    items, sep = if_parts(task)
    # count: one item fewer or one more
    assert not verify(task, with_answer(task, sep.join(items[:-1])))
    assert not verify(task, with_answer(task, sep.join(items + [items[-1]])))
    # case: flip the case of one letter of one item
    i = data.draw(st.integers(0, len(items) - 1))
    j = data.draw(st.integers(0, len(items[i]) - 1))
    flipped = items[i][:j] + items[i][j].swapcase() + items[i][j + 1:]
    assert not verify(task, with_answer(task, sep.join(items[:i] + [flipped] + items[i + 1:])))
    # format: another separator (only visible with two or more items)
    if len(items) > 1:
        other = data.draw(st.sampled_from([s for s in tasks._SEPARATORS.values() if s != sep]))
        assert not verify(task, with_answer(task, other.join(items)))
    # order: swapping two different items breaks ordered tasks; "any order" tasks accept it
    if len(items) > 1 and items[0] != items[1]:
        swapped = with_answer(task, sep.join([items[1], items[0]] + items[2:]))
        any_order = "in any order" in task.prompt or task.prompt.startswith("Write any ")
        assert verify(task, swapped) == any_order


def test_if_checks_constraints_not_the_reference_string():
    pick = Task("if", "Write any 2 different words from: cat dog emu owl. Use uppercase, separated by commas.", "",
                "CAT,DOG")
    assert verify(pick, "Answer: OWL, EMU")  # a different valid choice, spaces after commas allowed
    assert not verify(pick, "Answer: OWL,OWL")  # not different
    assert not verify(pick, "Answer: OWL,Emu")  # wrong case
    assert not verify(pick, "Answer: OWL,ANT")  # not from the list
    filt = Task("if", "From: bat dog bus emu. Write only the words starting with 'b', in any order, "
                      "separated by spaces.", "", "bat bus")
    assert verify(filt, "Answer: bus bat") and not verify(filt, "Answer: bat") and not verify(filt, "Answer: bat,bus")
    with pytest.raises(ValueError, match="not an instruction-following prompt"):
        verify(Task("if", "Tell me a joke.", "", "x"), "Answer: x")


def test_math_worked_lines_are_true_equations():
    # "8+7+0=15", "15-9-0=6" (borrow), "8*7+0=56", "358+67=425": every line before the answer holds.
    for task in generate("math", "train", 200, seed=3):
        assert task.prompt.startswith("Compute ")
        *work, last = task.response.split("\n")
        assert last == f"Answer: {task.answer}"
        for line in work:
            lhs, rhs = line.split("=")
            assert eval(lhs) == int(rhs), (task.prompt, line)  # lines are digits and + - * only
        expr = task.prompt[len("Compute "):-1]
        assert str(eval(expr)) == task.answer


def test_train_and_test_are_disjoint_and_distinct():
    for family in FAMILIES:
        train = generate(family, "train", 2000)
        test = generate(family, "test", 300)
        train_prompts, test_prompts = {t.prompt for t in train}, {t.prompt for t in test}
        assert len(train_prompts) == 2000 and len(test_prompts) == 300
        assert not train_prompts & test_prompts
        assert all(tasks.split_of(family, p) == "test" for p in test_prompts)
        assert all(tasks.split_of(family, p) == "train" for p in train_prompts)


def digest(items: list[Task]) -> str:
    return hashlib.sha256(repr(items).encode()).hexdigest()


def test_deterministic_within_and_across_processes():
    items = [t for f in FAMILIES for t in generate(f, "test", 50, seed=7)]
    assert items == [t for f in FAMILIES for t in generate(f, "test", 50, seed=7)]
    assert items != [t for f in FAMILIES for t in generate(f, "test", 50, seed=8)]
    # A fresh interpreter has a different str-hash salt: the items must not depend on it. tasks.py is
    # loaded by file path so the child skips importing the zeda package (and torch).
    code = ("import hashlib, importlib.util, sys; spec = importlib.util.spec_from_file_location('t', sys.argv[1]); "
            "t = sys.modules['t'] = importlib.util.module_from_spec(spec); "
            "spec.loader.exec_module(t); "
            "print(hashlib.sha256(repr([x for f in t.FAMILIES for x in t.generate(f, 'test', 50, seed=7)]).encode())"
            ".hexdigest())")
    out = subprocess.run([sys.executable, "-c", code, tasks.__file__], capture_output=True, text=True, check=True,
                         env={"PYTHONHASHSEED": "12345"})
    assert out.stdout.strip() == digest(items)


def test_characters_and_lengths_fit_the_tokenizer_and_context():
    from zeda_toy.tokenizer import CHARACTERS

    allowed = set(CHARACTERS)
    for family in FAMILIES:
        for task in generate(family, "train", 1000, seed=1):
            assert set(task.prompt + task.response) <= allowed
            assert 0 < len(task.prompt) <= tasks.MAX_PROMPT_CHARS
            assert 0 < len(task.response) <= tasks.MAX_RESPONSE_CHARS


def test_mixture_and_records():
    mix = tasks.mixture("test", 20, seed=1)
    assert len(mix) == 60 and {t.family for t in mix} == set(FAMILIES)
    assert mix == tasks.mixture("test", 20, seed=1)
    assert sorted(mix, key=repr) == sorted((t for f in FAMILIES for t in generate(f, "test", 20, 1)), key=repr)
    task = mix[0]
    record = tasks.to_prompt_record(task)
    assert record == {"messages": [{"role": "user", "content": task.prompt}], "answer": task.answer,
                      "family": task.family}
    assert verify(tasks.task_from_record(record), task.response)
    rollout = tasks.to_rollout_record(task, "some response")
    assert rollout["messages"][-1] == {"role": "assistant", "content": "some response"}
    assert rollout["messages"][0] == record["messages"][0]


def test_extract_answer():
    assert extract_answer("3+4=7\nAnswer: 7") == "7"
    assert extract_answer("Answer: 1\nAnswer:  [1, 2] \nmore") == "[1, 2]"  # the last one, that line only
    assert extract_answer("Answer:") == ""
    assert extract_answer("no final line") is None


def test_bad_arguments():
    with pytest.raises(ValueError, match="family"):
        generate("poetry", "train", 1)
    with pytest.raises(ValueError, match="split"):
        generate("math", "validation", 1)


def test_heldout_slice_is_train_split_and_left_out_of_training_prompts():
    """The slice the pipeline's settings are chosen on: train-split items (never test), fixed per task seed, and
    mixture(exclude=...) really leaves them out (a mixture drawn with the slice's own seed is then empty)."""
    held = tasks.heldout("code", 50)
    assert held == tasks.heldout("code", 50) and held != tasks.heldout("code", 50, task_seed=1)
    assert all(tasks.split_of("code", t.prompt) == "train" for t in held)
    prompts = tasks.heldout_prompts()
    assert {t.prompt for t in held} <= prompts
    assert len(prompts) >= tasks.HELDOUT_MAX * len(FAMILIES) - 10  # distinct prompts per family (families may share)
    assert tasks.mixture("train", 20, seed=tasks.HELDOUT_SEED, exclude=prompts) == []
    assert len(tasks.mixture("train", 20, seed=tasks.HELDOUT_SEED)) == 60
    with pytest.raises(ValueError, match="held-out slice has"):
        tasks.heldout("math", tasks.HELDOUT_MAX + 1)


def test_checking_a_repeat_item_costs_the_answer_not_the_count():
    """A benchmark item asking for 10^13 repetitions is checked against the answer in hand (it used to build the
    expected list: a MemoryError)."""
    prompt = "Write the word cat exactly 10000000000000 times in lowercase, separated by commas."
    assert tasks._REPEAT_RE.fullmatch(prompt)
    assert tasks._check_if(prompt, "cat, cat") is False
    assert tasks._check_if(prompt.replace("10000000000000", "2"), "cat, cat") is True
    assert tasks._check_if(prompt.replace("10000000000000", "2"), "cat, dog") is False


def test_the_suite_draws_the_items_every_number_was_measured_on():
    """The shipped teachers were trained, and every result in docs/ measured, on these exact items: a change to
    the generators or to their seed strings would silently give another benchmark. Fingerprints of the first
    test items per family, a training mixture and a held-out draw, recorded when the teachers were trained."""
    import hashlib

    def fingerprint(items):
        rows = [[t.family, t.prompt, t.response] for t in items]
        return hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:16]

    assert {f: fingerprint(tasks.generate(f, "test", 20)) for f in tasks.FAMILIES} == {
        "math": "2d4e535a5e629a7e", "code": "f19929789eb452a1", "if": "fdd76933116d96a9"}
    assert fingerprint(tasks.mixture("train", 5, seed=3)) == "d65eaa7332fb3343"
    assert fingerprint(tasks.heldout("math", 5, 2)) == "cb97cf89f5d0e7e5"
