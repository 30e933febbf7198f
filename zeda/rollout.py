"""Teacher rollouts for SFT (docs/method.md §4): the frozen teacher answers the training prompts.

Output lines are the prompt's messages with the teacher's answer appended as the last assistant message (the
authors' rollout format, which train_sft.py --rollouts reads), plus `id` ("<prompt line>:<sample>"),
`finished` (False when the answer hit max_new_tokens) and, when the prompt record carries a reference answer,
`correct` (checked as evaluate.py checks a benchmark line). Batched, sorted by prompt length, with a progress
bar. Resumable: a rerun skips the ids already in the output file and appends the rest, so an interrupted run
never duplicates a line (a torn last line is repaired before appending).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from tqdm import tqdm

from zeda.data import append_jsonl, encode_chats, iter_records, prompt_messages
from zeda.errors import DataError
from zeda.evaluation import record_item
from zeda.generation import SamplingParams, generate


def done_ids(path: Path) -> set[str]:
    """Ids of the complete lines already written (a torn last line does not count)."""
    if not path.exists():
        return set()
    ids = set()
    with open(path, "rb") as f:
        for raw in f:
            if not raw.endswith(b"\n"):
                break
            try:
                ids.add(json.loads(raw)["id"])
            except (json.JSONDecodeError, KeyError, TypeError):
                raise DataError(f"{path}: a line without a valid 'id'; not a rollout file from this tool") from None
    return ids


def rollout(model, tokenizer, prompts_path: Path, out_path: Path, params: SamplingParams, samples_per_prompt: int = 1,
            batch_size: int = 64, seed: int = 0, progress: bool = True) -> dict:
    """Sample `samples_per_prompt` answers per prompt into out_path (appending, resumable). Returns counts."""
    records = []  # (line, messages, checkable item or None)
    for lineno, rec in iter_records(prompts_path):
        msgs = prompt_messages(rec, prompts_path, lineno)
        records.append((lineno, msgs, record_item(rec, msgs, f"{prompts_path}:{lineno}")))
    if not records:
        raise DataError(f"{prompts_path}: no prompts")
    already = done_ids(out_path)
    todo = [(f"{lineno}:{s}", msgs, item) for lineno, msgs, item in records for s in range(samples_per_prompt)
            if f"{lineno}:{s}" not in already]
    encoded = encode_chats(tokenizer, [m for _, m, _ in todo])
    eos = sorted({tokenizer.eos_token_id, *model.config.eos_token_id} - {None})
    limit = model.config.max_position_embeddings - params.max_new_tokens
    too_long = [i for i, e in enumerate(encoded) if len(e.ids) > limit]
    if too_long:
        first = todo[too_long[0]][0].split(":")[0]
        raise DataError(f"{prompts_path}:{first}: prompt of {len(encoded[too_long[0]].ids)} tokens does not fit the "
                         f"context ({model.config.max_position_embeddings} - {params.max_new_tokens} new tokens); "
                         f"{len(too_long)} prompt(s) too long")
    order = sorted(range(len(todo)), key=lambda i: len(encoded[i].ids))  # similar lengths batch together
    stats = {"written": 0, "skipped_existing": len(already), "truncated": 0, "checked": 0, "correct": 0,
             "new_tokens": 0}
    t0 = time.time()
    bar = tqdm(total=len(todo), desc="rollouts", unit="answer", disable=not progress)
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        gen = generate(model, [encoded[i].ids for i in batch], params, eos, tokenizer.pad_token_id or 0,
                       seed=seed * 100_003 + start)
        lines = []
        for i, tokens, finished in zip(batch, gen.tokens, gen.finished):
            text = tokenizer.decode([t for t in tokens if t not in eos], skip_special_tokens=True)
            rid, msgs, item = todo[i]
            line = {"id": rid, "messages": msgs + [{"role": "assistant", "content": text}], "finished": finished}
            if item is not None:
                line["correct"] = item.is_correct(text)
                stats["checked"] += 1
                stats["correct"] += line["correct"]
            lines.append(line)
            stats["truncated"] += not finished
        append_jsonl(out_path, lines)  # one fsync per batch: a crash loses at most this batch
        stats["written"] += len(lines)
        stats["new_tokens"] += gen.new_tokens
        bar.update(len(batch))
    bar.close()
    stats["seconds"] = round(time.time() - t0, 1)
    return stats
