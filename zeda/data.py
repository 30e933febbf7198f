"""Prompts, rollouts and benchmarks in the authors' formats (docs/method.md §7), with errors that say where;
and the batching of chats into training tensors.

- Prompts: one object per line, `{"messages": [{"role": ..., "content": ...}, ...]}`; a plain
  `{"prompt": "..."}` is accepted too.
- Rollouts (stage-1 SFT data): the same, with the teacher's assistant turn as the last message.
- Benchmarks: prompts plus a reference answer in `answer` (or `reference`, `ground_truth`, `label`).

Every error names `path:line` and the field, because these files are long, hand-edited or produced by
other tools, and "KeyError: 'content'" after an hour of rollouts helps nobody. Writes are atomic (temp
file + `os.replace`) or append-and-fsync, so an interrupted rollout run resumes from what is on disk.

JSONL is read line by line by our own reader (so an error names the line); Parquet files with the same columns
(the authors also release Parquet) are read through the `datasets` library, and an error names the row.

Training batches: encode_chats tokenises prompt and response separately, so the prompt/response boundary is
exact for any tokenizer, and collate right-pads them into [B, T] tensors with a response-only loss mask.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import stat
import sys
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import BinaryIO

import torch

from zeda.errors import DataError, UsageError

Message = dict[str, str]  # {"role": ..., "content": ...}
ROLES = ("system", "user", "assistant", "tool")
REFERENCE_FIELDS = ("answer", "reference", "ground_truth", "label")  # first one present wins
NUMERIC_TOLERANCE = 1e-6


# ----------------------------------------------------------------------------------------------
# Reading


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict]]:
    """(line number, object) for every non-blank line; line numbers start at 1, as editors count."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such JSONL file")
    with open(path, "rb") as f:  # bytes, so a bad encoding is reported with its line number too
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")  # tolerate a leading BOM
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: invalid JSON at column {e.colno}: {e.msg}") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
            yield lineno, record


def iter_parquet(path: str | os.PathLike) -> Iterator[tuple[int, dict]]:
    """(row number from 1, record) for every row of a Parquet file, read with `datasets`."""
    import datasets  # a slow import: only for Parquet input

    try:
        table = datasets.Dataset.from_parquet(str(path), keep_in_memory=True)
    except Exception as e:  # pyarrow raises several types for a file that is not Parquet
        raise DataError(f"{path}: cannot read as Parquet ({type(e).__name__}: {e})") from None
    for row, record in enumerate(table, start=1):
        yield row, record


def iter_records(path: str | os.PathLike) -> Iterator[tuple[int, dict]]:
    """(line or row number, record) of a JSONL or Parquet (`.parquet`) prompts / rollouts / benchmark file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    return iter_parquet(path) if str(path).endswith(".parquet") else iter_jsonl(path)


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """All objects of a JSONL file; blank lines are skipped."""
    return [record for _, record in iter_jsonl(path)]


def messages_of(record: dict, path: str | os.PathLike = "<record>", lineno: int = 0) -> list[Message]:
    """The chat messages of one record, validated; `path` and `lineno` only label errors.

    Accepts `{"messages": [...]}` and `{"prompt": "..."}` (or `{"prompt": [messages]}`, TRL's
    conversational form). Every message needs a known role and string content; at least one user
    message must come before the last turn, and no user message may be empty. An assistant message keeps its
    `reasoning_content` (a thinking model's reasoning, which chat templates such as Qwen3's render in <think>)."""
    where = f"{path}:{lineno}"
    if "messages" in record:
        field, raw = "messages", record["messages"]
    elif "prompt" in record:
        field, raw = "prompt", record["prompt"]
        if isinstance(raw, str):
            raw = [{"role": "user", "content": raw}]
    else:
        raise DataError(f"{where}: expected a 'messages' list or a 'prompt' field; got keys {sorted(record)}")
    if not isinstance(raw, list) or not raw:
        raise DataError(f"{where}: '{field}' must be a non-empty list of messages")
    messages: list[Message] = []
    for i, message in enumerate(raw):
        name = f"{field}[{i}]"
        if not isinstance(message, dict):
            raise DataError(f"{where}: {name} must be an object with 'role' and 'content'")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise DataError(f"{where}: {name}.role is {role!r}; expected one of {ROLES}")
        if not isinstance(content, str):
            raise DataError(f"{where}: {name}.content must be a string, got {type(content).__name__}")
        if role == "user" and not content.strip():
            label = "prompt" if field == "prompt" and isinstance(record["prompt"], str) else f"{name}.content"
            raise DataError(f"{where}: {label} is empty")
        kept = {"role": role, "content": content}
        reasoning = message.get("reasoning_content")
        if reasoning is not None:  # a thinking model's reasoning, kept apart (Qwen3's chat format)
            if role != "assistant" or not isinstance(reasoning, str):
                raise DataError(f"{where}: {name}.reasoning_content must be a string on an assistant message")
            kept["reasoning_content"] = reasoning
        messages.append(kept)
    prompt = messages[:-1] if messages[-1]["role"] == "assistant" else messages
    if not any(m["role"] == "user" for m in prompt):
        raise DataError(f"{where}: '{field}' has no user message before the final turn")
    return messages


def read_messages(path: str | os.PathLike) -> list[list[Message]]:
    """The validated messages of every record of a prompt or rollout file."""
    return [messages_of(record, path, lineno) for lineno, record in iter_records(path)]


def prompt_messages(record: dict, path: str | os.PathLike = "<record>", lineno: int = 0) -> list[Message]:
    """The messages up to (not including) a final assistant turn: what the model is asked."""
    messages = messages_of(record, path, lineno)
    return messages[:-1] if messages[-1]["role"] == "assistant" else messages


def response_of(record: dict, path: str | os.PathLike = "<record>", lineno: int = 0) -> str | None:
    """The final assistant message's content (a rollout's response), or None for a bare prompt."""
    messages = messages_of(record, path, lineno)
    return messages[-1]["content"] if messages[-1]["role"] == "assistant" else None


def reference_answer(record: dict) -> str | None:
    """A benchmark record's reference answer as a string, or None when it has none.
    Non-string values (42, 1.5, lists) come back as their JSON text."""
    for field in REFERENCE_FIELDS:
        value = record.get(field)
        if value is not None:
            return value if isinstance(value, str) else json.dumps(value)
    return None


# ----------------------------------------------------------------------------------------------
# Writing


def _line(record: dict) -> str:
    # ensure_ascii=False keeps non-ASCII text readable; JSON escapes newlines, so one record = one line.
    return json.dumps(record, ensure_ascii=False) + "\n"


def special_file(path: str | os.PathLike) -> str | None:
    """What `path` is when it is neither a regular file nor a folder (followed through links): "a FIFO",
    "a device", "a socket"; None for a regular file, a folder, or nothing there."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return None


def output_path(path: str | os.PathLike, flag: str = "output") -> str:
    """Where an atomic write of `path` really goes. Outputs are written to a temporary file and renamed over the
    path, which would replace whatever is there: a link to a regular file is written through (its target is
    replaced, the link stays), and a FIFO, device or socket (or a link to one, as /dev/stdout is) is refused, so
    `--out /dev/stdout` cannot turn into a file named after a descriptor."""
    kind = special_file(path)
    if kind is not None:
        link = f" (a link to {os.path.realpath(path)})" if os.path.islink(path) else ""
        raise DataError(f"{flag} {path}: is {kind}{link}, not a file; outputs are written to a temporary file and "
                        f"renamed into place, which would replace it: give a file path")
    return os.path.realpath(path) if os.path.islink(path) else os.fspath(path)


def check_writable(path: str | os.PathLike, flag: str, folder: bool = False) -> None:
    """Refuse, before any work, an output path that cannot be written (a read-only or missing parent, a file where
    a folder must go, a FIFO or device): found only after an hour of evaluation or training it would lose that hour.
    Creates the parent folder (or, with folder=True, the folder itself) and probes it with a temporary file."""
    target = os.path.abspath(output_path(path, flag))
    directory = target if folder else os.path.dirname(target)
    if os.path.exists(target) and os.path.isdir(target) != folder:
        raise DataError(f"{flag} {path}: {'not a folder' if folder else 'is a folder'}")
    try:
        os.makedirs(directory, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=directory, prefix=".zeda-write-check-")
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise DataError(f"{flag} {path}: cannot write there ({e.strerror or e})") from None


def umask_file_mode() -> int:
    """The mode open() gives a new file under the process's umask (0644 under the usual 022). tempfile and
    safetensors create 0600 files, which would make every report and weight file private while config files
    are 0644."""
    try:  # Linux reports it without changing it
        with open("/proc/self/status") as f:
            umask = next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        umask = os.umask(0)  # elsewhere, reading it means setting it; put it straight back
        os.umask(umask)
    return 0o666 & ~umask


def new_file_mode(path: str | os.PathLike) -> int:
    """The mode a rewritten file should get: the old file's, or a new file's under the umask."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        return umask_file_mode()


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write `text` to a temporary file beside `path`, fsync, then rename over `path`: readers see the old file
    or the new one, never half of it. A link is written through, a FIFO or device refused (output_path)."""
    path = output_path(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    # The temp file sits in the same directory, so os.replace is a rename on one filesystem (atomic).
    fd, tmp_path = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        os.fchmod(fd, new_file_mode(path))
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        raise


def save_figure_atomic(fig, path: str | os.PathLike, dpi: int = 110) -> None:
    """A matplotlib figure saved like write_text_atomic: to a temporary name beside `path` (with the same suffix,
    from which matplotlib takes the format), then renamed over it."""
    path = output_path(path)
    tmp_path = f"{path}.tmp{os.path.splitext(path)[1]}"
    try:
        fig.savefig(tmp_path, dpi=dpi)
        os.replace(tmp_path, path)
    except BaseException:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        raise


def write_report(path: str | os.PathLike, text: str, prog: str, what: str = "report") -> bool:
    """The last write of a long run (a final report): on a write error (a full disk, a folder removed meanwhile)
    say so in one line and print the report itself on stdout, so the hours that computed it are not lost.
    Returns whether it was written."""
    try:
        write_text_atomic(path, text)
    except OSError as e:
        print(f"{prog}: error: cannot write the {what} to {path} ({e.strerror or e}); it follows on stdout, "
              f"nothing was written there", file=sys.stderr, flush=True)
        sys.stdout.write(text if text.endswith("\n") else text + "\n")
        sys.stdout.flush()
        return False
    return True


def write_jsonl_atomic(path: str | os.PathLike, records: Iterable[dict]) -> None:
    """Write all records as JSONL atomically (write_text_atomic)."""
    write_text_atomic(path, "".join(_line(r) for r in records))


def append_jsonl(path: str | os.PathLike, records: dict | Iterable[dict]) -> None:
    """Append one record or a batch, then flush and fsync once: a resumable rollout log.

    A run killed mid-write can leave a torn last line; it is dropped here before appending (it was never
    a complete record), so the file stays valid JSONL and the resumed run simply redoes that item."""
    batch = [records] if isinstance(records, dict) else list(records)
    path = output_path(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a+b") as f:
        _repair_tail(f)
        f.write("".join(_line(record) for record in batch).encode("utf-8"))
        f.flush()
        os.fsync(f.fileno())


def _repair_tail(f: BinaryIO) -> None:
    """Make a file opened "a+b" end with a newline: terminate a complete last record, drop a torn one."""
    size = f.seek(0, os.SEEK_END)
    if size == 0:
        return
    f.seek(max(0, size - 1))
    if f.read(1) == b"\n":
        return
    # Read back to the last newline (records are short; this reads at most one line).
    start = size
    while start > 0:
        step = min(4096, start)
        f.seek(start - step)
        chunk = f.read(step)
        cut = chunk.rfind(b"\n")
        if cut >= 0:
            start = start - step + cut + 1
            break
        start -= step
    f.seek(start)
    tail = f.read()
    try:
        json.loads(tail)
        f.write(b"\n")  # a complete record that only lacked its newline
    except ValueError:
        f.truncate(start)


# ----------------------------------------------------------------------------------------------
# Scoring free-form answers against a reference

_NUMBER_RE = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?")
_THOUSANDS_RE = re.compile(r"[+-]?\d{1,3}(,\d{3})+(\.\d*)?")


def _as_number(text: str) -> float | None:
    """The value of a plain number ("1234", "-0.5", "1,234", "12.0"), else None. Commas count only as
    thousands separators, so "1,2" stays text (it may be a list)."""
    text = text.strip()
    if _THOUSANDS_RE.fullmatch(text):
        text = text.replace(",", "")
    if not _NUMBER_RE.fullmatch(text):
        return None
    value = float(text)
    return value if math.isfinite(value) else None


def _boxed(text: str) -> str | None:
    """Contents of the last \\boxed{...}, braces balanced (so \\boxed{\\frac{1}{2}} works)."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed{") - 1
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1:j]
    return None


# final_answer's rules, in this order (docs/usage.md has them as a table, with an example of each):
#   1. only the text after the last "</think>" counts: a thinking model's reasoning is not its answer;
#   2. with --answer-regex, group 1 of its last match (no match: an empty answer, scored wrong);
#   3. the rest of the line after the last answer marker: "Answer:", "**Answer:**", "**Answer**:",
#      "The answer is", "The final answer is" (any case);
#   4. else the contents of the last \boxed{...};
#   5. else the last non-blank line, or the last **bold** part of it when it has one.
# normalise_answer then takes off, until nothing changes, what wraps an answer: surrounding spaces, one trailing
# period, **bold**, $...$ / $$...$$ / \(...\) / \[...\], and a \boxed{...} around all of it. Numbers compare
# as numbers ("1,234" == "1234.0"), everything else as text with runs of whitespace collapsed.
_MARKER_RE = re.compile(r"\banswer(?:\*\*)?\s*(?::|\bis\b)(?:\*\*)?", re.IGNORECASE)
_BOLD_RE = re.compile(r"\*\*(.+?)\*\*")
_WRAPPERS = (("**", "**"), ("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"))
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def compile_answer_regex(pattern: str, flag: str = "--answer-regex") -> re.Pattern:
    """A user's answer pattern, compiled; it must have exactly one capture group (the answer)."""
    try:
        compiled = re.compile(pattern)
    except re.error as e:
        raise UsageError(f"{flag} {pattern!r}: not a valid regular expression ({e})") from None
    if compiled.groups != 1:
        raise UsageError(f"{flag} {pattern!r}: needs exactly one capture group (the answer), has {compiled.groups}")
    return compiled


def normalise_answer(text: str) -> str:
    """An answer without what wraps it: spaces, one trailing period, **bold**, LaTeX dollars or brackets, and a
    \\boxed{...} around the whole of it, taken off until nothing changes ("**$\\boxed{42}$.**" -> "42")."""
    while True:
        before = text
        text = text.strip()
        if text.endswith(".") and not text.endswith(".."):
            text = text[:-1]
        for left, right in _WRAPPERS:
            if len(text) > len(left) + len(right) and text.startswith(left) and text.endswith(right):
                text = text[len(left):-len(right)]
                break
        if text.startswith("\\boxed{") and _boxed(text) is not None and text.endswith("}") \
                and len(_boxed(text)) == len(text) - len("\\boxed{}"):
            text = _boxed(text)
        if text == before:
            return text


def final_answer(text: str, answer_regex: re.Pattern | None = None) -> str:
    """The answer part of a model output, by the rules above (before normalise_answer)."""
    text = text.rsplit(THINK_CLOSE, 1)[-1]
    if answer_regex is not None:
        matches = list(answer_regex.finditer(text))
        return matches[-1].group(1) or "" if matches else ""
    markers = list(_MARKER_RE.finditer(text))
    if markers:
        return text[markers[-1].end():].split("\n", 1)[0]
    boxed = _boxed(text)
    if boxed is not None:
        return boxed
    lines = [line for line in text.splitlines() if line.strip()]
    last = lines[-1] if lines else ""
    bold = _BOLD_RE.findall(last)
    return bold[-1] if bold else last


def score_answer(prediction: str, reference: str, answer_regex: re.Pattern | None = None) -> bool:
    """Whether a model output answers like the reference (both sides normalised by normalise_answer).

    Numbers compare numerically when both sides parse ("1,234" == "1234.0"), within 1e-6 absolute or
    relative to the reference, whichever is looser; anything else must match exactly after collapsing runs of
    whitespace."""
    predicted, reference = normalise_answer(final_answer(prediction, answer_regex)), normalise_answer(reference)
    p, r = _as_number(predicted), _as_number(reference)
    if p is not None and r is not None:
        return abs(p - r) <= NUMERIC_TOLERANCE * max(1.0, abs(r))
    return " ".join(predicted.split()) == " ".join(reference.split())


def unmatchable_reference(reference: str) -> str | None:
    """Why no model output can ever score right against `reference` (an empty one, one spanning lines: an answer
    is read from one line), or None when its own "Answer: <reference>" scores right, as every usable one does."""
    if not normalise_answer(reference):
        return "is empty"
    if "\n" in reference.strip():
        return "spans several lines (an answer is read from one line)"
    if not score_answer(f"Answer: {reference}", reference):
        return "is not matched even by itself as an answer"
    return None


# ----------------------------------------------------------------------------------------------
# Training batches


def step_indices(n: int, step: int, per_step: int, seed: int) -> list[int]:
    """The indices of `step`'s batch of `per_step` among n examples (SFT's global batches, OPD's prompts): epochs
    are seeded shuffles, so any step can be recomputed (what makes --resume continue with the same data order).
    With fewer than per_step examples the batch wraps around the shuffle."""
    per_epoch = max(1, n // per_step)
    epoch, k = divmod(step, per_epoch)
    order = list(range(n))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    picked = order[k * per_step:(k + 1) * per_step]
    return picked if len(picked) == per_step else (picked + order)[:per_step]


@dataclass
class Example:
    ids: list[int]  # prompt + response (+ EOS)
    num_prompt: int  # the first num_prompt ids are the prompt: no loss there
    family: str = ""
    where: str = ""  # the record it came from ("rollouts.jsonl:12"), for messages


def encode_chats(tokenizer, prompts: list[list[Message]], responses: list[str | None] | None = None,
                 families: list[str] | None = None, chat_template_kwargs: dict | None = None) -> list[Example]:
    """Chat-template each prompt (with the assistant header), then append its response and EOS.

    Prompts and responses are tokenised separately and concatenated, so the boundary is exact for any
    tokenizer (a BPE merge across it would blur which tokens are the response's). Batched: one call to the
    fast tokenizer per list, which matters for the ~100k examples of teacher training. chat_template_kwargs
    (e.g. {"enable_thinking": False}) go to the template. SFT data goes through encode_conversations instead,
    which renders the answer through the template too."""
    kwargs = chat_template_kwargs or {}
    texts = [tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True, **kwargs) for m in prompts]
    prompt_ids = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    responses = responses or [None] * len(prompts)
    families = families or [""] * len(prompts)
    given = [r for r in responses if r is not None]
    response_ids = iter(tokenizer(given, add_special_tokens=False)["input_ids"] if given else [])
    out = []
    for p, r, f in zip(prompt_ids, responses, families):
        ids = p if r is None else p + next(response_ids) + [tokenizer.eos_token_id]
        out.append(Example(ids, len(p), f))
    return out


def encode_chat(tokenizer, prompt_messages: list[Message], response: str | None = None, family: str = "",
                chat_template_kwargs: dict | None = None) -> Example:
    """encode_chats for one example."""
    return encode_chats(tokenizer, [prompt_messages], [response], [family], chat_template_kwargs)[0]


def encode_conversations(tokenizer, conversations: list[list[Message]], finished: list[bool] | None = None,
                         chat_template_kwargs: dict | None = None, where: list[str] | None = None) -> list[Example]:
    """SFT examples of conversations that end in the assistant answer to learn, rendered by the chat template.

    The prompt part is the template's rendering of the messages before the answer, with its generation prompt:
    what the model sees when it answers. The answer part is what the template adds when the answer message is
    rendered too (the full rendering minus the prompt's), so `reasoning_content`, the template's <think> handling
    and earlier turns dropping their reasoning come out exactly as the template writes them. The loss covers the
    answer's tokens up to and including the first end-of-turn token (the tokenizer's EOS, where generation
    stops; a newline the template writes after it is never generated). A template that ends an assistant turn
    without the EOS gets one appended. The prompt rendering must be a prefix of the full one, else the answer's
    tokens cannot be told apart: a DataError names the record (where[i]).

    An answer that opens with <think> after a generation prompt that already ends in <think> loses its own
    opening tag (a rollout decoded with the tag kept must not teach <think><think>). An unfinished answer
    (finished[i] False: cut at the answer limit) is the raw continuation of the prompt with no end token:
    rendered whole, a template would close a thought that never closed. One with `reasoning_content` is rendered
    by the template (its reasoning did close) with the end token cut off.

    On the toy teachers' template this gives encode_chats' ids and masks exactly (tests/test_thinking.py)."""
    kwargs = chat_template_kwargs or {}
    finished = finished if finished is not None else [True] * len(conversations)
    where = where if where is not None else [f"conversation {i}" for i in range(len(conversations))]
    eos = tokenizer.eos_token_id
    prompt_texts, answer_texts = [], []
    for messages, done, name in zip(conversations, finished, where):
        if not messages or messages[-1]["role"] != "assistant":
            raise DataError(f"{name}: no assistant message at the end to learn")
        prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True, **kwargs)
        answer = messages[-1]
        # The generation prompt already opens a thought and the answer opens one too: the answer without its own.
        doubled = prompt.rstrip().endswith(THINK_OPEN) and answer["content"].lstrip().startswith(THINK_OPEN)
        unopened = {**answer, "content": answer["content"].lstrip()[len(THINK_OPEN):].lstrip("\n")}
        if not done and "reasoning_content" not in answer:
            prompt_texts.append(prompt)
            answer_texts.append((unopened if doubled else answer)["content"])
            continue
        full = tokenizer.apply_chat_template(messages[:-1] + [answer], tokenize=False, **kwargs)
        if doubled and full.startswith(prompt) and full[len(prompt):].lstrip().startswith(THINK_OPEN):
            # The template writes the content as it is after the opened thought: render it without its <think>.
            full = tokenizer.apply_chat_template(messages[:-1] + [unopened], tokenize=False, **kwargs)
        if not full.startswith(prompt):
            raise DataError(f"{name}: the chat template renders the prompt differently with the answer after it (its "
                            f"rendering of the prompt is not a prefix of the whole), so the answer's tokens cannot "
                            f"be told apart; check --chat-template-kwargs against the data (e.g. enable_thinking)")
        prompt_texts.append(prompt)
        answer_texts.append(full[len(prompt):])
    # Tokenised apart, like encode_chats: the boundary is exact for any tokenizer.
    prompt_ids = tokenizer(prompt_texts, add_special_tokens=False)["input_ids"] if prompt_texts else []
    answer_ids = tokenizer(answer_texts, add_special_tokens=False)["input_ids"] if answer_texts else []
    out = []
    for p, a, done, messages, name in zip(prompt_ids, answer_ids, finished, conversations, where):
        raw = not done and "reasoning_content" not in messages[-1]
        if not raw:
            if eos in a:
                a = a[:a.index(eos) + done]  # through the end-of-turn token, or (unfinished) before it
            elif done:
                a = a + [eos]
        out.append(Example(p + a, len(p), where=name))
    return out


def encode_conversation(tokenizer, messages: list[Message], finished: bool = True,
                        chat_template_kwargs: dict | None = None, where: str = "<record>") -> Example:
    """encode_conversations for one conversation."""
    return encode_conversations(tokenizer, [messages], [finished], chat_template_kwargs, [where])[0]


def collate(examples: list[Example], pad_id: int):
    """-> input_ids [B, T], attention_mask [B, T], loss_mask [B, T-1] (True where target t+1 is a response token)."""
    T = max(len(e.ids) for e in examples)
    ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    attn = torch.zeros(len(examples), T, dtype=torch.long)
    loss = torch.zeros(len(examples), T, dtype=torch.bool)
    for b, e in enumerate(examples):
        ids[b, : len(e.ids)] = torch.tensor(e.ids)
        attn[b, : len(e.ids)] = 1
        loss[b, e.num_prompt : len(e.ids)] = True
    return ids, attn, loss[:, 1:]
