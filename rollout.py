"""Teacher rollouts for SFT (docs/method.md §4): the frozen teacher answers the training prompts.

    python rollout.py --teacher assets/qwen3_moe_teacher --prompts prompts.jsonl --out rollouts.jsonl

Prompts: JSONL or Parquet in the authors' format (`{"messages": [...]}`) or with a plain `{"prompt": "..."}`.
Output: the same messages with the teacher's answer appended (zeda/rollout.py says exactly what a line holds).
Resumable: a rerun skips the answers already written and appends the rest.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from zeda.data import check_writable
from zeda.errors import ZedaError
from zeda.flags import int_range
from zeda.generation import add_sampling_args, sampling_from_args
from zeda.loading import load_for_inference
from zeda.rollout import rollout


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
    args = p.parse_args(argv)
    try:
        check_writable(args.out, "--out")
        model, tokenizer = load_for_inference(args.teacher, args.device)
        params = sampling_from_args(args, args.max_new_tokens)
        with torch.no_grad():
            stats = rollout(model, tokenizer, args.prompts, args.out, params, args.samples_per_prompt,
                            args.batch_size, args.seed)
    except (ZedaError, OSError) as e:
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
