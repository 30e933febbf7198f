"""JSONL prompts, rollouts and benchmarks in the authors' formats (ZEDA.md §7), with errors that say where.

- Prompts: one object per line, `{"messages": [{"role": ..., "content": ...}, ...]}`; a plain
  `{"prompt": "..."}` is accepted too.
- Rollouts (stage-1 SFT data): the same, with the teacher's assistant turn as the last message.
- Benchmarks: prompts plus a reference answer in `answer` (or `reference`, `ground_truth`, `label`).

Every error names `path:line` and the field, because these files are long, hand-edited or produced by
other tools, and "KeyError: 'content'" after an hour of rollouts helps nobody. Writes are atomic (temp
file + `os.replace`) or append-and-fsync, so an interrupted rollout run resumes from what is on disk.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from collections.abc import Iterable, Iterator
from typing import BinaryIO

from zeda.tasks import ANSWER_PREFIX, extract_answer

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
                raise ValueError(f"{path}:{lineno}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: invalid JSON at column {e.colno}: {e.msg}") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
            yield lineno, record


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """All objects of a JSONL file; blank lines are skipped."""
    return [record for _, record in iter_jsonl(path)]


def messages_of(record: dict, path: str | os.PathLike = "<record>", lineno: int = 0) -> list[Message]:
    """The chat messages of one record, validated; `path` and `lineno` only label errors.

    Accepts `{"messages": [...]}` and `{"prompt": "..."}` (or `{"prompt": [messages]}`, TRL's
    conversational form). Every message needs a known role and string content; at least one user
    message must come before the last turn, and no user message may be empty."""
    where = f"{path}:{lineno}"
    if "messages" in record:
        field, raw = "messages", record["messages"]
    elif "prompt" in record:
        field, raw = "prompt", record["prompt"]
        if isinstance(raw, str):
            raw = [{"role": "user", "content": raw}]
    else:
        raise ValueError(f"{where}: expected a 'messages' list or a 'prompt' field; got keys {sorted(record)}")
    if not isinstance(raw, list) or not raw:
        raise ValueError(f"{where}: '{field}' must be a non-empty list of messages")
    messages: list[Message] = []
    for i, message in enumerate(raw):
        name = f"{field}[{i}]"
        if not isinstance(message, dict):
            raise ValueError(f"{where}: {name} must be an object with 'role' and 'content'")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise ValueError(f"{where}: {name}.role is {role!r}; expected one of {ROLES}")
        if not isinstance(content, str):
            raise ValueError(f"{where}: {name}.content must be a string, got {type(content).__name__}")
        if role == "user" and not content.strip():
            label = "prompt" if field == "prompt" and isinstance(record["prompt"], str) else f"{name}.content"
            raise ValueError(f"{where}: {label} is empty")
        messages.append({"role": role, "content": content})
    prompt = messages[:-1] if messages[-1]["role"] == "assistant" else messages
    if not any(m["role"] == "user" for m in prompt):
        raise ValueError(f"{where}: '{field}' has no user message before the final turn")
    return messages


def read_messages(path: str | os.PathLike) -> list[list[Message]]:
    """The validated messages of every record of a prompt or rollout file."""
    return [messages_of(record, path, lineno) for lineno, record in iter_jsonl(path)]


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


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write `text` to a temporary file beside `path`, fsync, then rename over `path`: readers see the old file
    or the new one, never half of it."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    # The temp file sits in the same directory, so os.replace is a rename on one filesystem (atomic).
    fd, tmp_path = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        raise


def write_jsonl_atomic(path: str | os.PathLike, records: Iterable[dict]) -> None:
    """Write all records as JSONL atomically (write_text_atomic)."""
    write_text_atomic(path, "".join(_line(r) for r in records))


def append_jsonl(path: str | os.PathLike, records: dict | Iterable[dict]) -> None:
    """Append one record or a batch, then flush and fsync once: a resumable rollout log.

    A run killed mid-write can leave a torn last line; it is dropped here before appending (it was never
    a complete record), so the file stays valid JSONL and the resumed run simply redoes that item."""
    batch = [records] if isinstance(records, dict) else list(records)
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


def final_answer(text: str) -> str:
    """The answer part of a model output: after the last "Answer:", else the last \\boxed{...}, else the
    last non-blank line."""
    if ANSWER_PREFIX in text:
        return extract_answer(text) or ""
    boxed = _boxed(text)
    if boxed is not None:
        return boxed
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def score_answer(prediction: str, reference: str) -> bool:
    """Whether a model output answers like the reference.

    Numbers compare numerically when both sides parse ("1,234" == "1234.0"), within 1e-6 absolute or
    relative to the reference, whichever is looser; anything else must match exactly after stripping
    and collapsing runs of whitespace."""
    predicted, reference = final_answer(prediction).strip(), reference.strip()
    p, r = _as_number(predicted), _as_number(reference)
    if p is not None and r is not None:
        return abs(p - r) <= NUMERIC_TOLERANCE * max(1.0, abs(r))
    return " ".join(predicted.split()) == " ".join(reference.split())
