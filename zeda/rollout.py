"""Teacher rollouts for SFT (docs/method.md §4): the frozen teacher answers the training prompts.

Output lines are the prompt's messages with the teacher's answer appended as the last assistant message (the
authors' rollout format, which train_sft.py --rollouts reads), plus `id`, `finished` (False when the answer hit
max_new_tokens: train_sft.py drops those unless --keep-unfinished) and, when the prompt record carries a reference
answer, `correct` (checked as evaluate.py checks a benchmark line). Batched, sorted by prompt length, with a
progress bar.

Resumable by content: `id` is "<prompt hash>:<sample>", the hash (prompt_hash) taken over the prompt's messages, so
a rerun after the prompt file was edited, reordered or added to answers each prompt exactly samples_per_prompt
times: what is already in the output is skipped, the rest appended (a torn last line is repaired first). A prompt
that occurs k times in the file gets k x samples_per_prompt answers (the k-th occurrence owns samples
k*n .. k*n+n-1). Lines written before ids were hashes ("<line>:<sample>") count by their messages: each one is an
answer to the prompt it holds.

Prompts that do not fit the context with the answer limit are skipped, counted and named (file:line); strict=True
refuses them instead.

rollout_remote asks an OpenAI-compatible server (vLLM, SGLang, zeda's serve.py; zeda/remote.py) instead of a
model in this process, with the same lines, resume and counts; an answer the server's reasoning parser split
keeps its reasoning as the assistant message's `reasoning_content`, which SFT renders through the template.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from zeda.data import append_jsonl, encode_chats, iter_records, prompt_messages
from zeda.errors import DataError
from zeda.evaluation import Item, record_item
from zeda.generation import generate
from zeda.remote import Answer, RemoteError, Server, chat_answer, completion_answer, request_seed, unordered_map
from zeda.sampling import SamplingParams

KEY_RE = re.compile(r"[0-9a-f]{16}:\d+")  # the id of a line rollout.py writes: "<prompt hash>:<sample>"


def prompt_hash(messages: list[dict]) -> str:
    """16 hex digits of SHA-256 over the prompt messages' canonical JSON: what finished work is keyed by."""
    text = json.dumps(messages, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def done_keys(path: Path) -> set[str]:
    """The "<prompt hash>:<sample>" keys of the complete lines already written (a torn last line does not count).
    A line without such an id (a rollout file another tool wrote, in the authors' format) is keyed by its own
    prompt messages, with the next sample index free for that prompt."""
    if not path.exists():
        return set()
    keys, unkeyed = set(), []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.endswith(b"\n"):
                break
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except json.JSONDecodeError:
                raise DataError(f"{path}:{lineno}: not valid JSON; not a rollout file from this tool") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object; not a rollout file from this tool")
            rid = record.get("id")
            if isinstance(rid, str) and KEY_RE.fullmatch(rid):
                keys.add(rid)
            else:
                unkeyed.append(prompt_hash(prompt_messages(record, path, lineno)))
    for digest in unkeyed:
        sample = 0
        while f"{digest}:{sample}" in keys:
            sample += 1
        keys.add(f"{digest}:{sample}")
    return keys


@dataclass
class Todo:
    """One answer still to write: its id, the prompt's line, messages and checkable item (None: no reference)."""

    key: str
    lineno: int
    messages: list[dict]
    item: Item | None


def pending(prompts_path: Path, out_path: Path, samples_per_prompt: int) -> tuple[list[Todo], int]:
    """(the answers not yet in out_path, in prompt-file order; how many answers the file asks for in all)."""
    records = []  # (line, messages, checkable item or None)
    for lineno, rec in iter_records(prompts_path):
        msgs = prompt_messages(rec, prompts_path, lineno)
        records.append((lineno, msgs, record_item(rec, msgs, f"{prompts_path}:{lineno}")))
    if not records:
        raise DataError(f"{prompts_path}: no prompts")
    already = done_keys(out_path)
    todo, occurrences, wanted = [], Counter(), 0
    for lineno, msgs, item in records:
        digest = prompt_hash(msgs)
        k = occurrences[digest]
        occurrences[digest] += 1
        for s in range(k * samples_per_prompt, (k + 1) * samples_per_prompt):
            wanted += 1
            if f"{digest}:{s}" not in already:
                todo.append(Todo(f"{digest}:{s}", lineno, msgs, item))
    return todo, wanted


def fitting(todo: list[Todo], lengths: list[int], context: int, max_new_tokens: int, prompts_path: Path,
            strict: bool) -> tuple[list[int], list[str]]:
    """(indices of the todo whose prompt of lengths[i] tokens leaves room for max_new_tokens in the context;
    file:line of the prompts that do not), printed, or refused under strict."""
    limit = context - max_new_tokens
    too_long = [i for i, n in enumerate(lengths) if n > limit]
    names = list(dict.fromkeys(f"{prompts_path}:{todo[i].lineno}" for i in too_long))
    if too_long and strict:
        raise DataError(f"{names[0]}: prompt of {lengths[too_long[0]]} tokens does not fit the context "
                         f"({context} - {max_new_tokens} new tokens); {len(names)} prompt(s) too long")
    if too_long:
        print(f"skipping {len(names)} prompt(s) longer than the context ({context}) minus --max-new-tokens "
              f"({max_new_tokens}): {', '.join(names)}", flush=True)
    skipped = set(too_long)
    return [i for i in range(len(todo)) if i not in skipped], names


def new_stats(wanted: int, todo: list[Todo], names: list[str]) -> dict:
    return {"written": 0, "skipped_existing": wanted - len(todo), "unfinished": 0,
            "skipped_too_long": len(names), "too_long": names, "checked": 0, "correct": 0, "new_tokens": 0}


def answer_line(todo: Todo, text: str, finished: bool, stats: dict, reasoning: str | None = None) -> dict:
    """The output line of one answer (counted into stats): the prompt's messages and the answer, its id,
    finished, and correct when the prompt has a reference (checked on the answer's text, not its reasoning)."""
    answer = {"role": "assistant", "content": text}
    if reasoning:
        answer["reasoning_content"] = reasoning
    line = {"id": todo.key, "messages": todo.messages + [answer], "finished": finished}
    if todo.item is not None:
        line["correct"] = todo.item.is_correct(text)
        stats["checked"] += 1
        stats["correct"] += line["correct"]
    stats["unfinished"] += not finished
    return line


def rollout(model, tokenizer, prompts_path: Path, out_path: Path, params: SamplingParams, samples_per_prompt: int = 1,
            batch_size: int = 64, seed: int = 0, progress: bool = True, chat_template_kwargs: dict | None = None,
            strict: bool = False) -> dict:
    """Sample `samples_per_prompt` answers per prompt into out_path (appending, resumable). Returns counts:
    written, skipped_existing, unfinished (answers that hit max_new_tokens), skipped_too_long (+ too_long: their
    file:line), checked / correct (answers to prompts with a reference), new_tokens, seconds."""
    todo, wanted = pending(prompts_path, out_path, samples_per_prompt)
    encoded = encode_chats(tokenizer, [t.messages for t in todo], chat_template_kwargs=chat_template_kwargs)
    eos = sorted({tokenizer.eos_token_id, *model.config.eos_token_id} - {None})
    fits, names = fitting(todo, [len(e.ids) for e in encoded], model.config.max_position_embeddings,
                          params.max_new_tokens, prompts_path, strict)
    order = sorted(fits, key=lambda i: len(encoded[i].ids))  # similar lengths batch together
    stats = new_stats(wanted, todo, names)
    t0 = time.time()
    bar = tqdm(total=len(order), desc="rollouts", unit="answer", disable=not progress)
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        gen = generate(model, [encoded[i].ids for i in batch], params, eos, tokenizer.pad_token_id or 0,
                       seed=seed * 100_003 + start)
        lines = []
        for i, tokens, finished in zip(batch, gen.tokens, gen.finished):
            text = tokenizer.decode([t for t in tokens if t not in eos], skip_special_tokens=True)
            lines.append(answer_line(todo[i], text, finished, stats))
        append_jsonl(out_path, lines)  # one fsync per batch: a crash loses at most this batch
        stats["written"] += len(lines)
        stats["new_tokens"] += gen.new_tokens
        bar.update(len(batch))
    bar.close()
    stats["seconds"] = round(time.time() - t0, 1)
    return stats


def rollout_remote(server: Server, model_name: str, prompts_path: Path, out_path: Path, params: SamplingParams,
                   samples_per_prompt: int = 1, concurrency: int = 16, seed: int = 0, progress: bool = True,
                   chat_template_kwargs: dict | None = None, strict: bool = False, tokenizer=None,
                   context: int | None = None, batch_size: int = 64) -> dict:
    """rollout() with the teacher on an OpenAI-compatible server (zeda/remote.py): the same lines, resume and
    counts, `concurrency` requests at a time, each answer appended within at most batch_size answers of its
    arrival (and all of them before an error or interrupt is raised: what arrived is kept).

    Without a tokenizer the server renders each chat itself (POST /v1/chat/completions, chat_template_kwargs
    sent along) and splits off the reasoning when it runs a reasoning parser; a prompt it finds too long is the
    server's 400, which stops the run. With the teacher's tokenizer (and its context) the chats are rendered here,
    as rollout() renders them, too-long prompts are skipped or refused as there, and the token ids go to POST
    /v1/completions. Each answer's seed is request_seed(seed, its id): resumes and concurrency do not change
    what is asked."""
    todo, wanted = pending(prompts_path, out_path, samples_per_prompt)
    ids = None
    if tokenizer is not None:
        ids = [e.ids for e in encode_chats(tokenizer, [t.messages for t in todo],
                                           chat_template_kwargs=chat_template_kwargs)]
        fits, names = fitting(todo, [len(x) for x in ids], context, params.max_new_tokens, prompts_path, strict)
    else:
        fits, names = list(range(len(todo))), []
    stats = new_stats(wanted, todo, names)

    def ask(i: int) -> Answer:
        request = request_seed(seed, todo[i].key)
        try:
            if ids is not None:
                return completion_answer(server, model_name, ids[i], params, request)
            return chat_answer(server, model_name, todo[i].messages, params, request, chat_template_kwargs)
        except RemoteError as e:  # name the prompt the failed request asked
            raise RemoteError(f"{prompts_path}:{todo[i].lineno}: {e}") from None

    t0 = time.time()
    bar = tqdm(total=len(fits), desc="rollouts", unit="answer", disable=not progress)
    lines = []
    try:
        for n, answer in unordered_map(ask, fits, concurrency):
            lines.append(answer_line(todo[fits[n]], answer.content, answer.finished, stats, answer.reasoning))
            stats["new_tokens"] += answer.tokens
            bar.update(1)
            if len(lines) >= batch_size:
                append_jsonl(out_path, lines)
                stats["written"] += len(lines)
                lines = []
    except RemoteError as e:
        raise RemoteError(f"{e} ({stats['written'] + len(lines)} new answers kept in {out_path}; rerun to "
                          f"continue)") from None
    finally:
        if lines:
            append_jsonl(out_path, lines)
            stats["written"] += len(lines)
        bar.close()
    stats["seconds"] = round(time.time() - t0, 1)
    return stats
