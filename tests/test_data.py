"""zeda_toy/tokenizer.py and zeda/data.py: the saved tokenizer, JSONL errors, atomic writes, answer scoring."""

import os

import pytest
from transformers import AutoTokenizer

from zeda import data
from zeda_toy import tasks
from zeda_toy.tokenizer import CHARACTERS, SPECIAL_TOKENS, save_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tokenizer")
    save_tokenizer(directory)
    return AutoTokenizer.from_pretrained(directory)  # offline: a local folder only


# ----------------------------------------------------------------------------------------------
# tokenizer


def test_vocab_and_special_tokens(tokenizer):
    assert len(tokenizer) == len(SPECIAL_TOKENS) + len(CHARACTERS) == 101 < 128
    ids = {tok: tokenizer.convert_tokens_to_ids(tok) for tok in SPECIAL_TOKENS}
    assert ids == {"<|pad|>": 0, "<|endoftext|>": 1, "<|im_start|>": 2, "<|im_end|>": 3, "<|unk|>": 4}
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 3, 4)
    assert tokenizer.encode("ab\n") == [tokenizer.convert_tokens_to_ids(c) for c in "ab\n"]  # one id per char
    assert tokenizer.encode("a\tb") == [tokenizer.convert_tokens_to_ids("a"), 4, tokenizer.convert_tokens_to_ids("b")]


def test_chat_template_renders_qwen_style(tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Compute 1+2."}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nCompute 1+2.<|im_end|>\n"
                    "<|im_start|>assistant\n")
    full = messages + [{"role": "assistant", "content": "Answer: 3"}]
    assert tokenizer.apply_chat_template(full, tokenize=False) == text + "Answer: 3<|im_end|>\n"
    encoded = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    assert encoded["input_ids"] == tokenizer.encode(text)  # transformers 5 returns a BatchEncoding
    ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=False)
    assert ids == tokenizer.encode(text)
    assert ids[0] == 2 and ids.count(3) == 2  # <|im_start|> is one token, each turn ends with <|im_end|>


def test_task_text_round_trips(tokenizer):
    for task in tasks.mixture("test", 30, seed=2):
        for text in (task.prompt, task.response):
            ids = tokenizer.encode(text)
            assert len(ids) == len(text)
            assert max(ids) < len(tokenizer) and tokenizer.unk_token_id not in ids
            assert tokenizer.decode(ids) == text
    tricky = "  two  spaces , before comma\n\n'quotes' \"double\" {braces} \\ ~`"
    assert tokenizer.decode(tokenizer.encode(tricky)) == tricky
    assert tokenizer.decode(tokenizer.encode("ok<|im_end|>"), skip_special_tokens=True) == "ok"


# ----------------------------------------------------------------------------------------------
# reading


def write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_read_jsonl_skips_blank_lines_and_names_bad_lines(tmp_path):
    good = write_lines(tmp_path / "good.jsonl", ['{"prompt": "a"}', "", "   ", '{"prompt": "b"}'])
    assert data.read_jsonl(good) == [{"prompt": "a"}, {"prompt": "b"}]
    bad = write_lines(tmp_path / "bad.jsonl", ['{"prompt": "a"}', "", '{"prompt": "b",}'])
    with pytest.raises(ValueError, match=r"bad\.jsonl:3: invalid JSON"):
        data.read_jsonl(bad)
    not_object = write_lines(tmp_path / "list.jsonl", ["[1, 2]"])
    with pytest.raises(ValueError, match=r"list\.jsonl:1: expected a JSON object, got list"):
        data.read_jsonl(not_object)
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        data.read_jsonl(tmp_path / "missing.jsonl")
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes(b'{"prompt": "a"}\n{"prompt": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=r"latin1\.jsonl:2: not valid UTF-8"):
        data.read_jsonl(latin1)
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b'\xef\xbb\xbf{"prompt": "a"}\n')
    assert data.read_jsonl(bom) == [{"prompt": "a"}]


def test_empty_prompt_is_an_error_naming_the_line(tmp_path):
    path = write_lines(tmp_path / "p.jsonl", [
        '{"messages": [{"role": "user", "content": "hi"}]}',
        '{"prompt": "ok"}',
        '{"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "  "}]}',
    ])
    with pytest.raises(ValueError, match=r"p\.jsonl:3: messages\[1\]\.content is empty"):
        data.read_messages(path)
    plain = write_lines(tmp_path / "q.jsonl", ['{"prompt": "ok"}', '{"prompt": ""}'])
    with pytest.raises(ValueError, match=r"q\.jsonl:2: prompt is empty"):
        data.read_messages(plain)


@pytest.mark.parametrize("record, message", [
    ({"text": "x"}, "expected a 'messages' list or a 'prompt' field"),
    ({"messages": []}, "non-empty list"),
    ({"messages": ["hi"]}, r"messages\[0\] must be an object"),
    ({"messages": [{"role": "human", "content": "x"}]}, r"messages\[0\]\.role is 'human'"),
    ({"messages": [{"role": "user", "content": None}]}, r"messages\[0\]\.content must be a string"),
    ({"messages": [{"role": "user"}]}, r"messages\[0\]\.content must be a string"),
    ({"messages": [{"role": "assistant", "content": "x"}]}, "no user message"),
])
def test_messages_of_errors_name_file_line_and_field(record, message):
    with pytest.raises(ValueError, match=r"f\.jsonl:7: .*" + message):
        data.messages_of(record, "f.jsonl", 7)


def test_messages_prompt_and_response():
    user = {"role": "user", "content": "Compute 1+2."}
    reply = {"role": "assistant", "content": "Answer: 3"}
    rollout = {"messages": [user, reply]}
    assert data.messages_of({"prompt": "Compute 1+2."}) == [user]
    assert data.messages_of({"prompt": [user]}) == [user]
    assert data.prompt_messages(rollout) == [user] and data.response_of(rollout) == "Answer: 3"
    assert data.prompt_messages({"messages": [user]}) == [user] and data.response_of({"messages": [user]}) is None
    record = tasks.to_rollout_record(tasks.generate("code", "test", 1)[0], "Answer: 1")
    assert data.response_of(record) == "Answer: 1"


def test_reference_answer():
    assert data.reference_answer({"answer": "7"}) == "7"
    assert data.reference_answer({"ground_truth": 42}) == "42"
    assert data.reference_answer({"label": [1, 2]}) == "[1, 2]"
    assert data.reference_answer({"reference": "x", "answer": None}) == "x"
    assert data.reference_answer({"messages": []}) is None


# ----------------------------------------------------------------------------------------------
# writing


def test_write_jsonl_atomic_round_trips_and_leaves_no_temp_files(tmp_path):
    path = tmp_path / "out" / "prompts.jsonl"
    records = [tasks.to_prompt_record(t) for t in tasks.mixture("test", 3)] + [{"note": "héllo\nworld"}]
    data.write_jsonl_atomic(path, records)
    assert data.read_jsonl(path) == records
    assert os.listdir(path.parent) == ["prompts.jsonl"]

    def failing():
        yield {"a": 1}
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        data.write_jsonl_atomic(path, failing())
    assert data.read_jsonl(path) == records  # the old file is untouched
    assert os.listdir(path.parent) == ["prompts.jsonl"]


def test_append_jsonl_batches_and_repairs_a_torn_tail(tmp_path):
    path = tmp_path / "rollouts.jsonl"
    data.append_jsonl(path, {"i": 0})
    data.append_jsonl(path, [{"i": 1}, {"i": 2}])
    with open(path, "a", encoding="utf-8") as f:
        f.write('{"i": 3, "messa')  # a run killed mid-write
    data.append_jsonl(path, {"i": 3})
    assert data.read_jsonl(path) == [{"i": i} for i in range(4)]
    with open(path, "a", encoding="utf-8") as f:
        f.write('{"i": 4}')  # complete, only missing its newline: kept
    data.append_jsonl(path, [])
    assert data.read_jsonl(path) == [{"i": i} for i in range(5)]
    assert path.read_text().endswith("}\n")


# ----------------------------------------------------------------------------------------------
# scoring


@pytest.mark.parametrize("prediction, reference, expected", [
    ("work\nAnswer: 1234", "1234", True),
    ("Answer: 1,234", "1234", True),
    ("Answer: 1234.0", "1,234", True),
    ("Answer: 0.1000000001", "0.1", True),
    ("Answer: 1234.01", "1234", False),
    ("Answer: 1235", "1234", False),
    ("Answer: -5", "5", False),
    ("so the result is \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}", True),
    ("so \\boxed{12} done", "12.0", True),
    ("line one\n  42  \n\n", "42", True),
    ("Answer:  CAT,   DOG ", "CAT, DOG", True),
    ("Answer: CAT,DOG", "CAT, DOG", False),  # text compares exactly (whitespace runs aside)
    ("Answer: cat", "CAT", False),
    ("Answer: 1,2", "12", False),  # a comma is a thousands separator only in groups of three
    ("Answer: nan", "nan", True),  # not numbers: plain text match
    ("Answer:", "0", False),
])
def test_score_answer(prediction, reference, expected):
    assert data.score_answer(prediction, reference) is expected


def test_score_answer_accepts_reference_responses():
    for task in tasks.mixture("test", 20, seed=4):
        assert data.score_answer(task.response, task.answer)


# ----------------------------------------------------------------------------------------------
# Parquet: the same records, read through `datasets`


def test_parquet_records_read_like_jsonl(tmp_path):
    import datasets

    records = [{"messages": [{"role": "user", "content": "Compute 2+3."}, {"role": "assistant", "content": "5"}]},
               {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]}]
    path = tmp_path / "rollouts.parquet"
    datasets.Dataset.from_list(records).to_parquet(str(path))
    (tmp_path / "rollouts.jsonl").write_text("".join(data._line(r) for r in records))
    from_parquet = list(data.iter_records(path))
    assert from_parquet == list(data.iter_records(tmp_path / "rollouts.jsonl"))
    assert [n for n, _ in from_parquet] == [1, 2]  # row numbers, for errors
    assert data.response_of(from_parquet[0][1]) == "5"
    assert data.prompt_messages(from_parquet[1][1]) == records[1]["messages"]


def test_a_file_that_is_not_parquet_is_named(tmp_path):
    path = tmp_path / "broken.parquet"
    path.write_bytes(b"not parquet at all")
    with pytest.raises(data.DataError, match="broken.parquet: cannot read as Parquet"):
        list(data.iter_records(path))
    with pytest.raises(FileNotFoundError, match="missing.parquet: no such file"):
        list(data.iter_records(tmp_path / "missing.parquet"))
