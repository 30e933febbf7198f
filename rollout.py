"""Teacher rollouts for SFT (docs/method.md §4): the frozen teacher answers the training prompts.

    python rollout.py --teacher assets/qwen3_moe_teacher --prompts prompts.jsonl --out rollouts.jsonl

Prompts: JSONL or Parquet in the authors' format (`{"messages": [...]}`) or with a plain `{"prompt": "..."}`.
Output: the same messages with the teacher's answer appended (zeda/rollout.py says exactly what a line holds).
Resumable by content: a rerun skips the answers already written (keyed by a hash of the prompt's messages and
the sample index, so an edited or reordered prompt file is answered exactly --samples-per-prompt times per prompt)
and appends the rest. Prompts that do not fit the context with --max-new-tokens are skipped and named (--strict
refuses them). The last line printed is the run's counts as JSON (`unfinished`: answers that hit
--max-new-tokens, marked "finished": false, which train_sft.py drops unless --keep-unfinished).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from zeda.data import check_writable
from zeda.errors import ZedaError, exit_status
from zeda.flags import add_chat_template_kwargs, int_range
from zeda.loading import load_for_inference
from zeda.rollout import rollout
from zeda.sampling import add_sampling_args, sampling_from_args


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="rollout.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", type=Path, required=True, help="teacher checkpoint folder (static model)")
    p.add_argument("--prompts", type=Path, required=True, help="prompts JSONL ({'messages': ...} or {'prompt': ...})")
    p.add_argument("--out", type=Path, required=True, help="rollouts JSONL to write (appended to when resuming)")
    p.add_argument("--samples-per-prompt", type=int_range(min=1), default=1, help="answers sampled per prompt")
    add_sampling_args(p)
    p.add_argument("--max-new-tokens", type=int_range(min=1), default=256, help="answer length limit")
    p.add_argument("--batch-size", type=int_range(min=1), default=64, help="prompts per generation batch")
    p.add_argument("--seed", type=int_range(min=0), default=0, help="sampling seed")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda")
    add_chat_template_kwargs(p)
    p.add_argument("--strict", action="store_true",
                   help="refuse a prompt that does not fit the context (default: skip it, counted and named)")
    args = p.parse_args(argv)
    try:
        check_writable(args.out, "--out")
        model, tokenizer = load_for_inference(args.teacher, args.device)
        params = sampling_from_args(args, args.max_new_tokens, model_dir=args.teacher)
        with torch.no_grad():
            stats = rollout(model, tokenizer, args.prompts, args.out, params, args.samples_per_prompt,
                            args.batch_size, args.seed, chat_template_kwargs=args.chat_template_kwargs,
                            strict=args.strict)
    except (ZedaError, OSError) as e:
        print(f"rollout.py: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {stats['written']} rollouts to {args.out} ({stats['skipped_existing']} already there, "
          f"{stats['unfinished']} unfinished: hit --max-new-tokens, {stats['new_tokens']} tokens, {stats['seconds']} s)")
    if stats["skipped_too_long"]:
        print(f"skipped {stats['skipped_too_long']} prompt(s) too long for the context: {', '.join(stats['too_long'])}")
    if stats["checked"]:
        print(f"{stats['correct']} of the {stats['checked']} answers with a reference are correct "
              f"({stats['correct'] / stats['checked']:.1%})")
    print(json.dumps(stats))
    return 0


if __name__ == "__main__":
    sys.exit(exit_status("rollout.py", main, "interrupted; the answers so far are kept in --out, rerun to continue"))
