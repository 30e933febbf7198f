"""Thinking models' data: SFT examples rendered through the chat template (with <think> reasoning), cut-off
answers, --chat-template-kwargs, rollouts resumed by content, prompts too long for the context, the benchmark
answer rules, and train_sft.py --show-examples.

The template is tests/assets/thinking_template.jinja, modelled on Qwen3's (a thought opened by the generation
prompt, enable_thinking, reasoning_content, system prompts, earlier assistant turns without their reasoning), on
the char-level tokenizer with <think> and </think> added as single tokens. Models are tiny and random; what is
generated does not matter here, only what is rendered, written, counted and skipped.
"""

import json
import re
from pathlib import Path

import pytest
import torch

import evaluate
import rollout as rollout_script
import train_sft
import zeda
from zeda import data, rollout
from zeda_toy import tasks
from zeda.data import DataError, collate, encode_chat, encode_chats, encode_conversation, encode_conversations
from zeda.errors import UsageError
from zeda.evaluation import record_item, suite_items
from zeda.sampling import SamplingParams
from zeda_toy.tiny import make_tiny_checkpoint
from zeda_toy.tokenizer import build_tokenizer, save_tokenizer

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = (ROOT / "tests" / "assets" / "thinking_template.jinja").read_text()
CONTEXT = 160  # the tiny models' max_position_embeddings: task prompts fit, a 200-character one does not


def thinking_tokenizer():
    tokenizer = build_tokenizer()
    tokenizer.add_tokens(["<think>", "</think>"], special_tokens=True)  # ids 101, 102: one token each, as in Qwen3
    tokenizer.chat_template = TEMPLATE
    return tokenizer


@pytest.fixture(scope="module")
def tok():
    return thinking_tokenizer()


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


# ----------------------------------------------------------------------------------------------
# 1. Rendering through the template: the loss mask token by token


def test_multi_turn_with_system_prompt_masks_exactly_the_answer_and_its_end_token(tok):
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "<think>\nold thought\n</think>\n\nA1"},
                {"role": "user", "content": "Q2"},
                {"role": "assistant", "content": "A2", "reasoning_content": "r2"}]
    e = encode_conversation(tok, messages)
    # Written out by hand: the earlier turn without its reasoning, the last one with it, in <think>.
    prompt = ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
              "<|im_start|>assistant\nA1<|im_end|>\n<|im_start|>user\nQ2<|im_end|>\n<|im_start|>assistant\n<think>\n")
    answer = ids(tok, "r2\n</think>\n\nA2") + [tok.eos_token_id]  # not the newline the template writes after it
    assert e.ids == ids(tok, prompt) + answer and e.num_prompt == len(ids(tok, prompt))
    assert "old thought" not in tok.decode(e.ids, skip_special_tokens=False)
    input_ids, _, loss_mask = collate([e], pad_id=0)
    assert input_ids[0, 1:][loss_mask[0]].tolist() == answer  # the mask, token by token
    assert tok.convert_ids_to_tokens(answer)[-3:] == ["A", "2", "<|im_end|>"]


def test_reasoning_in_the_content_renders_like_reasoning_content(tok):
    prompt = [{"role": "user", "content": "Q"}]
    split = encode_conversation(tok, prompt + [{"role": "assistant", "content": "A", "reasoning_content": "r"}])
    for content in ("<think>\nr\n</think>\n\nA", "r\n</think>\n\nA"):  # tag kept or not when decoded
        assert encode_conversation(tok, prompt + [{"role": "assistant", "content": content}]).ids == split.ids


def test_an_answer_opening_with_think_does_not_open_a_second_thought(tok):
    """A template that writes the content as it is after `<think>\n` (DeepSeek-R1 style) and the raw rendering of
    an unfinished answer must not give <think><think>; nor may the Qwen-style one."""
    naive = thinking_tokenizer()
    naive.chat_template = ("{%- for m in messages %}{{- '<|im_start|>' + m.role + '\\n' }}"
                           "{%- if m.role == 'assistant' %}{{- '<think>\\n' }}{%- endif %}"
                           "{{- m.content + '<|im_end|>\\n' }}{%- endfor %}"
                           "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n<think>\\n' }}{%- endif %}")
    think = tok.convert_tokens_to_ids("<think>")
    messages = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "<think>\nr\n</think>\n\nA"}]
    for tokenizer in (tok, naive):
        for finished in (True, False):
            e = encode_conversation(tokenizer, messages, finished)
            assert e.ids.count(think) == 1, (tokenizer.chat_template[:30], finished)
            assert tokenizer.decode(e.ids[e.num_prompt:], skip_special_tokens=False).startswith("r\n</think>")


def test_toy_teachers_encode_exactly_as_before(tmp_path):
    """The shipped teachers' template through the new rendering: encode_chats' ids and masks, so the main job's
    numbers do not move."""
    from transformers import AutoTokenizer

    items = tasks.mixture("train", 2, seed=5)
    prompts = [[{"role": "user", "content": t.prompt}] for t in items]
    prompts[0] = [{"role": "system", "content": "Be brief."}] + prompts[0]
    prompts[1] = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}] + prompts[1]
    for teacher in ("qwen3_moe_teacher", "glm4_moe_lite_teacher"):
        tokenizer = AutoTokenizer.from_pretrained(ROOT / "assets" / teacher)
        before = encode_chats(tokenizer, prompts, [t.response for t in items])
        after = encode_conversations(tokenizer, [p + [{"role": "assistant", "content": t.response}]
                                                 for p, t in zip(prompts, items)])
        assert [(e.ids, e.num_prompt) for e in after] == [(e.ids, e.num_prompt) for e in before]
        assert all(torch.equal(a, b) for a, b in zip(collate(after, 0), collate(before, 0)))


def test_a_prompt_rendered_differently_with_its_answer_is_refused_naming_the_record(tok):
    messages = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A", "reasoning_content": "r"}]
    with pytest.raises(DataError, match=r"rollouts\.jsonl:7: the chat template renders the prompt differently"):
        encode_conversation(tok, messages, chat_template_kwargs={"enable_thinking": False},
                            where="rollouts.jsonl:7")


# ----------------------------------------------------------------------------------------------
# 3. --chat-template-kwargs


def test_enable_thinking_false_changes_the_rendered_prompt(tok):
    prompt = [{"role": "user", "content": "Q"}]
    thinking = tok.decode(encode_chat(tok, prompt).ids, skip_special_tokens=False)
    plain = tok.decode(encode_chat(tok, prompt, chat_template_kwargs={"enable_thinking": False}).ids,
                       skip_special_tokens=False)
    assert thinking.endswith("assistant\n<think>\n") and plain.endswith("assistant\n<think>\n\n</think>\n\n")
    e = encode_conversation(tok, prompt + [{"role": "assistant", "content": "A"}],
                            chat_template_kwargs={"enable_thinking": False})
    assert tok.decode(e.ids[e.num_prompt:], skip_special_tokens=False) == "A<|im_end|>"


@pytest.mark.parametrize("main, required", [
    (rollout_script.main, ["--teacher", "t", "--prompts", "p", "--out", "o"]),
    (train_sft.main, ["--student", "s", "--rollouts", "r", "--out", "o"]),
    (evaluate.main, ["--model", "m"]),
])
@pytest.mark.parametrize("bad", ["[1]", "{not json", '{"tokenize": true}'])
def test_chat_template_kwargs_must_be_a_json_object(main, required, bad, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        main([*required, "--chat-template-kwargs", bad])
    assert exc.value.code == 2 and "argument --chat-template-kwargs" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------------------
# Tiny models for rollouts, training data and evaluation


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """teacher: a static tiny model with the toy tokenizer; student: converted, with the thinking template."""
    from zeda.conversion import convert_checkpoint

    d = tmp_path_factory.mktemp("thinking")
    make_tiny_checkpoint(d / "teacher", vocab_size=104, eos_token_id=3, pad_token_id=0,
                         max_position_embeddings=CONTEXT)
    save_tokenizer(d / "teacher")
    convert_checkpoint(d / "teacher", d / "student", num_zero=2, progress=False)
    thinking_tokenizer().save_pretrained(d / "student")
    (d / "student" / "chat_template.jinja").write_text(TEMPLATE)
    return d


def teacher_and_tokenizer(models):
    return zeda.load_model(models / "teacher"), zeda.loading.load_tokenizer(models / "teacher")


# ----------------------------------------------------------------------------------------------
# 2. Cut-off answers


def rollout_lines(finished: list[bool]) -> list[dict]:
    items = tasks.mixture("train", 2, seed=7)[:len(finished)]
    return [{**tasks.to_rollout_record(t, t.response[:40] if not done else t.response), "finished": done}
            for t, done in zip(items, finished)]


def test_unfinished_rollouts_are_dropped_or_kept_without_an_end_token(models, tmp_path):
    tokenizer = zeda.loading.load_tokenizer(models / "student")
    finished = [True, False, True, False, True]
    path = write_jsonl(tmp_path / "r.jsonl", rollout_lines(finished))
    kept, counts = train_sft.load_rollouts(path, tokenizer, 104, 10**6, False)
    assert counts["dropped_unfinished"] == 2 and len(kept) == 3 and counts["kept_unfinished"] == 0
    assert [e.where for e in kept] == [f"{path}:{n}" for n in (1, 3, 5)]
    everything, counts = train_sft.load_rollouts(path, tokenizer, 104, 10**6, False, keep_unfinished=True)
    assert counts["dropped_unfinished"] == 0 and counts["kept_unfinished"] == 2 and len(everything) == 5
    records = rollout_lines(finished)
    for e, record, done in zip(everything, records, finished):
        loss_tokens = e.ids[e.num_prompt:]
        assert (loss_tokens[-1] == tokenizer.eos_token_id) is done
        if not done:  # the raw continuation of the prompt: exactly what the teacher wrote, nothing closed
            assert loss_tokens == ids(tokenizer, record["messages"][-1]["content"])


def test_train_sft_refuses_when_every_rollout_is_unfinished(models, tmp_path, capsys):
    path = write_jsonl(tmp_path / "cut.jsonl", rollout_lines([False, False]))
    rc = train_sft.main(["--student", str(models / "student"), "--rollouts", str(path), "--out",
                         str(tmp_path / "o"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1
    assert f"{path}: no usable rollouts" in err and "2 unfinished" in err and "--keep-unfinished" in err


def test_rollout_counts_the_answers_that_hit_the_limit(models, tmp_path, capsys):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"Say {w}."} for w in ("a", "bb", "ccc")])
    out = tmp_path / "r.jsonl"
    assert rollout_script.main(["--teacher", str(models / "teacher"), "--prompts", str(prompts), "--out", str(out),
                                "--max-new-tokens", "3", "--device", "cpu", "--temperature", "1"]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    stats = json.loads(printed[-1])
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert stats["unfinished"] == sum(not r["finished"] for r in lines) > 0  # a random model rarely stops in 3
    assert f"{stats['unfinished']} unfinished: hit --max-new-tokens" in printed[0]


# ----------------------------------------------------------------------------------------------
# 4. Resume by content


def test_inserting_a_prompt_at_the_top_answers_each_prompt_exactly_once(models, tmp_path):
    teacher, tokenizer = teacher_and_tokenizer(models)
    params = SamplingParams(temperature=1.0, max_new_tokens=2)
    first = [{"prompt": f"Compute {i}+{i}."} for i in range(4)]
    prompts, out = write_jsonl(tmp_path / "p.jsonl", first), tmp_path / "r.jsonl"
    with torch.no_grad():
        rollout.rollout(teacher, tokenizer, prompts, out, params, batch_size=2, progress=False)
        write_jsonl(prompts, [{"prompt": "A new one."}] + first)  # every old prompt moves down a line
        stats = rollout.rollout(teacher, tokenizer, prompts, out, params, batch_size=2, progress=False)
    assert stats["written"] == 1 and stats["skipped_existing"] == 4
    asked = [json.loads(line)["messages"][0]["content"] for line in out.read_text().splitlines()]
    assert sorted(asked) == sorted(["A new one."] + [r["prompt"] for r in first])


def test_old_lines_without_a_content_key_count_by_their_messages(models, tmp_path):
    """Lines written when ids were "<line>:<sample>" still count: each is one answer to the prompt it holds."""
    teacher, tokenizer = teacher_and_tokenizer(models)
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "One."}, {"prompt": "Two."}])
    out = write_jsonl(tmp_path / "r.jsonl", [{"id": "2:0", "messages": [{"role": "user", "content": "Two."},
                                                                        {"role": "assistant", "content": "2"}],
                                              "finished": True}])
    with torch.no_grad():
        stats = rollout.rollout(teacher, tokenizer, prompts, out, SamplingParams(max_new_tokens=2), 2,
                                progress=False)
    assert stats["skipped_existing"] == 1 and stats["written"] == 3  # Two. once more, One. twice
    asked = [json.loads(line)["messages"][0]["content"] for line in out.read_text().splitlines()]
    assert sorted(asked) == ["One.", "One.", "Two.", "Two."]


# ----------------------------------------------------------------------------------------------
# 5. Prompts that do not fit the context


def test_rollout_skips_and_names_prompts_too_long_unless_strict(models, tmp_path, capsys):
    teacher, tokenizer = teacher_and_tokenizer(models)
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Short."}, {"prompt": "x" * 200}, {"prompt": "Hi."}])
    out = tmp_path / "r.jsonl"
    params = SamplingParams(max_new_tokens=2)
    with torch.no_grad():
        with pytest.raises(DataError, match=rf"{re.escape(str(prompts))}:2: prompt of \d+ tokens does not fit"):
            rollout.rollout(teacher, tokenizer, prompts, out, params, progress=False, strict=True)
        assert not out.exists()
        stats = rollout.rollout(teacher, tokenizer, prompts, out, params, progress=False)
    assert stats["skipped_too_long"] == 1 and stats["too_long"] == [f"{prompts}:2"] and stats["written"] == 2
    assert f"skipping 1 prompt(s) longer than the context ({CONTEXT})" in capsys.readouterr().out


def test_evaluate_skips_and_names_prompts_too_long_unless_strict(models, tmp_path, capsys):
    bench = write_jsonl(tmp_path / "b.jsonl", [{"prompt": "1+1?", "answer": "2"},
                                               {"prompt": "x" * 200, "answer": "1"}])
    argv = ["--model", str(models / "teacher"), "--benchmark", str(bench), "--max-new-tokens", "2", "--no-progress",
            "--device", "cpu", "--out", str(tmp_path / "r.json")]
    assert evaluate.main(argv) == 0
    printed = capsys.readouterr().out
    assert "skipping 1 prompt(s)" in printed and f"{bench}:2" in printed.split("\n")[0]
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["skipped_too_long"] == 1 and report["too_long"] == [f"{bench}:2"]
    assert report["counts"]["benchmark"]["total"] == 1
    assert evaluate.main([*argv, "--strict"]) == 2
    assert f"{bench}:2: the prompt has" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# 6. Scoring a user can predict


@pytest.mark.parametrize("form, right, wrong", [
    ("Answer: X", "work\nAnswer: 42", "work\nAnswer: 41"),
    ("answer in any case", "so the answer: 42", "so the answer: 4"),
    ("The answer is X.", "So the answer is 42.", "So the answer is 24."),
    ("The final answer is X", "The final answer is 42", "The final answer is 42.5"),
    ("**Answer:** X", "**Answer:** 42", "**Answer:** 43"),
    ("**Answer**: X", "**Answer**: 42", "**Answer**: -42"),
    ("Answer: $X$", "Answer: $42$", "Answer: $4$"),
    ("last \\boxed{X}", "first \\boxed{7}, then \\boxed{42}", "first \\boxed{42}, then \\boxed{7}"),
    ("boxed inside dollars", "thus $\\boxed{42}$.", "thus $\\boxed{41}$."),
    ("**bold** on the last line", "hmm\nit is **42**", "hmm\nit is **4**2"),
    ("thousands separators", "Answer: 42,000", "Answer: 42,00"),
    ("trailing period", "Answer: 42.", "Answer: 42.."),
    ("last line", "I counted.\n42\n", "I counted.\n42 apples\n"),
    ("reasoning ignored", "<think>Answer: 7</think>\n\nAnswer: 42", "<think>Answer: 42</think>\n\nAnswer: 7"),
])
def test_answer_form(form, right, wrong):
    reference = "42,000" if "thousands" in form else "42"
    assert data.score_answer(right, reference), form
    assert not data.score_answer(wrong, reference), form


def test_answer_regex_picks_the_answer_and_is_checked():
    pattern = data.compile_answer_regex(r"RESULT=(\w+)")
    assert data.score_answer("RESULT=1 then RESULT=cat", "cat", pattern)
    assert not data.score_answer("Answer: cat", "cat", pattern)  # no match: no answer
    with pytest.raises(UsageError, match="--answer-regex .*: needs exactly one capture group"):
        data.compile_answer_regex(r"RESULT=\w+")
    with pytest.raises(UsageError, match="not a valid regular expression"):
        data.compile_answer_regex(r"(unclosed")


def test_evaluate_refuses_a_bad_answer_regex_before_loading(tmp_path, capsys):
    assert evaluate.main(["--model", str(tmp_path / "missing"), "--benchmark", "b.jsonl", "--answer-regex", "x"]) == 2
    assert "evaluate.py: error: --answer-regex 'x': needs exactly one capture group" in capsys.readouterr().err


def test_task_suite_items_score_exactly_as_their_verifiers():
    """Items of the shipped task families are still checked by tasks.verify, as before; and on math and code
    the free-form rules agree with it on right and wrong answers."""
    for item in suite_items(tasks.FAMILIES, 10):
        spoiled = item.task.response.rsplit(tasks.ANSWER_PREFIX, 1)[0] + f"{tasks.ANSWER_PREFIX} 98765"
        record = record_item(tasks.to_prompt_record(item.task), item.messages, item.where)
        for output in (item.task.response, spoiled, item.task.response.replace("Answer:", "Result:")):
            assert item.is_correct(output) == record.is_correct(output) == tasks.verify(item.task, output)
            if item.group != "if":
                assert data.score_answer(output, item.reference) == tasks.verify(item.task, output), output


# ----------------------------------------------------------------------------------------------
# 7. train_sft.py --show-examples


def test_show_examples_prints_the_rendered_examples_and_trains_nothing(models, tmp_path, capsys):
    student = tmp_path / "student"  # config and tokenizer only: no weights to load
    student.mkdir()
    for f in (models / "student").iterdir():
        if not f.name.endswith(".safetensors"):
            (student / f.name).write_bytes(f.read_bytes())
    path = write_jsonl(tmp_path / "r.jsonl", [
        {"messages": [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1",
                                                          "reasoning_content": "r1"}]},
        {"messages": [{"role": "user", "content": "Q2"}, {"role": "assistant", "content": "cut"}], "finished": False},
        {"messages": [{"role": "user", "content": "Q3"}, {"role": "assistant", "content": "A3"}]}])
    out = tmp_path / "out"
    assert train_sft.main(["--student", str(student), "--rollouts", str(path), "--out", str(out),
                           "--show-examples", "1"]) == 0
    printed = capsys.readouterr().out
    assert "3 rollouts, 2 used; dropped 1 unfinished" in printed
    assert "<|im_start|>user\nQ1<|im_end|>\n<|im_start|>assistant\n<think>\n[[loss>r1\n</think>\n\nA1<|im_end|><loss]]" \
        in printed
    assert "Q3" not in printed and not out.exists()
