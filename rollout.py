"""Teacher rollouts for SFT (ZEDA.md §4): the frozen teacher answers the training prompts.

    python rollout.py --teacher assets/qwen3_moe_teacher --prompts prompts.jsonl --out rollouts.jsonl

Prompts: JSONL in the authors' format (`{"messages": [...]}`) or with a plain `{"prompt": "..."}`. Output:
the same messages with the teacher's answer appended as the last assistant message (the authors' rollout
format, which train_sft.py --rollouts reads), plus `id` ("<prompt line>:<sample>"), `finished` (False when
the answer hit --max-new-tokens) and, when the prompt record carries a reference answer, `correct` (checked as
evaluate.py checks a benchmark line; train_sft.py --drop-incorrect then trains on right answers only).
Batched, with a progress bar. Resumable: a rerun skips the ids already in the output file and appends the rest,
so an interrupted run never duplicates a line (a torn last line is repaired before appending).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

import zeda
from zeda.data import append_jsonl, iter_jsonl, prompt_messages
from zeda.evaluation import record_item
from zeda.generation import SamplingParams, add_sampling_args, generate, sampling_from_args
from zeda.training import encode_chats


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
                raise ValueError(f"{path}: a line without a valid 'id'; not a rollout file from this tool") from None
    return ids


def rollout(model, tokenizer, prompts_path: Path, out_path: Path, params: SamplingParams, samples_per_prompt: int = 1,
            batch_size: int = 64, seed: int = 0, progress: bool = True) -> dict:
    """Sample `samples_per_prompt` answers per prompt into out_path (appending, resumable). Returns counts."""
    records = []  # (line, messages, checkable item or None)
    for lineno, rec in iter_jsonl(prompts_path):
        msgs = prompt_messages(rec, prompts_path, lineno)
        records.append((lineno, msgs, record_item(rec, msgs, f"{prompts_path}:{lineno}")))
    if not records:
        raise ValueError(f"{prompts_path}: no prompts")
    already = done_ids(out_path)
    todo = [(f"{lineno}:{s}", msgs, item) for lineno, msgs, item in records for s in range(samples_per_prompt)
            if f"{lineno}:{s}" not in already]
    encoded = encode_chats(tokenizer, [m for _, m, _ in todo])
    eos = sorted({tokenizer.eos_token_id, *model.config.eos_token_id} - {None})
    limit = model.config.max_position_embeddings - params.max_new_tokens
    too_long = [i for i, e in enumerate(encoded) if len(e.ids) > limit]
    if too_long:
        first = todo[too_long[0]][0].split(":")[0]
        raise ValueError(f"{prompts_path}:{first}: prompt of {len(encoded[too_long[0]].ids)} tokens does not fit the "
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", type=Path, required=True, help="teacher checkpoint folder (static model)")
    p.add_argument("--prompts", type=Path, required=True, help="prompts JSONL ({'messages': ...} or {'prompt': ...})")
    p.add_argument("--out", type=Path, required=True, help="rollouts JSONL to write (appended to when resuming)")
    p.add_argument("--samples-per-prompt", type=int, default=1, help="answers sampled per prompt")
    add_sampling_args(p)
    p.add_argument("--max-new-tokens", type=int, default=256, help="answer length limit")
    p.add_argument("--batch-size", type=int, default=64, help="prompts per generation batch")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    args = p.parse_args(argv)
    try:
        from transformers import AutoTokenizer

        model = zeda.load_model(args.teacher)
        tokenizer = AutoTokenizer.from_pretrained(args.teacher)
        params = sampling_from_args(args, args.max_new_tokens)
        with torch.no_grad():
            stats = rollout(model, tokenizer, args.prompts, args.out, params, args.samples_per_prompt,
                            args.batch_size, args.seed)
    except (ValueError, OSError, zeda.ConfigError, zeda.CheckpointError) as e:
        print(f"rollout.py: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {stats['written']} rollouts to {args.out} ({stats['skipped_existing']} already there, "
          f"{stats['truncated']} hit --max-new-tokens, {stats['new_tokens']} tokens, {stats['seconds']} s)")
    if stats["checked"]:
        print(f"{stats['correct']} of the {stats['checked']} answers with a reference are correct "
              f"({stats['correct'] / stats['checked']:.1%})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
