"""Compare two checkpoints' greedy answers item by item: where the model's answer parts from the reference's.

    python experiments/compare.py --reference assets/qwen3_moe_teacher --model runs/pipeline/sft/final \
        --max-new-tokens 160
    python experiments/compare.py --reference runs/pipeline/sft/final --model runs/pipeline/opd/final \
        --tasks math --n 1000

For every item of the task suite that exactly one of the two answers correctly, it finds the first generated
token where their greedy answers differ and reads both models' probabilities there (divergence.py): a near
tie of the reference (p of its own token < 0.7) is close to a coin flip, a confident disagreement (reference
p >= 0.95, several nats of KL) is something the model learned differently. The held-out slice of the train split
is the default split, since this is for deciding what to change; --split test reads the test split.

Prints accuracy of both, the discordant items per bucket and the largest-KL rows; --out writes everything as
JSON (accuracy, discordant, reference_right, model_right, buckets, divergences: one record per discordant item).
Bad input (missing folder, unknown family, bad --n, different vocabularies) exits with status 2.
"""

from __future__ import annotations

import argparse
import sys

from zeda.data import check_writable
from zeda.errors import EvaluationError, ZedaError, exit_status
from zeda.evaluation import EVAL_SPLITS, check_families, suite_items, write_json_report
from zeda.flags import add_compute_args, int_range
from zeda.loading import load_for_inference, load_tokenizer, same_tokenizer
from zeda_toy.tasks import FAMILIES, check_heldout_size

from divergence import compare_models, divergence_table


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="compare.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--reference", required=True, help="checkpoint folder of the reference (usually the teacher)")
    p.add_argument("--model", required=True, help="checkpoint folder of the model compared with it")
    p.add_argument("--tasks", default=",".join(FAMILIES), help="comma-separated task families (default: all)")
    p.add_argument("--n", type=int_range(min=1), default=300, help="items per family (default 300)")
    p.add_argument("--split", default="heldout", choices=EVAL_SPLITS, help="heldout (default) or test")
    p.add_argument("--task-seed", type=int_range(min=0), default=0, help="seed that draws the items (default 0)")
    p.add_argument("--max-new-tokens", type=int_range(min=1), default=256,
                   help="generation limit per answer (default 256)")
    p.add_argument("--batch-size", type=int_range(min=1), default=32, help="prompts per generation batch (default 32)")
    p.add_argument("--rows", type=int_range(min=0), default=10, help="largest-KL divergences to print (default 10)")
    p.add_argument("--out", default=None, help="write the report as JSON to this file")
    add_compute_args(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        families = check_families([f.strip() for f in args.tasks.split(",") if f.strip()])
        if not families:
            raise EvaluationError("nothing to compare: --tasks is empty")
        if args.split == "heldout":
            check_heldout_size(args.n)
        if args.out:
            check_writable(args.out, "--out")
        items = suite_items(families, args.n, args.task_seed, args.split)
        # before any weight is read: a 30B model loads for minutes
        same_tokenizer(load_tokenizer(args.reference), load_tokenizer(args.model), args.model, "the reference's",
                       "answers are compared token by token")
        reference, tokenizer = load_for_inference(args.reference, args.device, args.dtype, args.expert_backend)
        model, _ = load_for_inference(args.model, args.device, args.dtype, args.expert_backend)
        report = compare_models(reference, model, tokenizer, items, args.max_new_tokens, args.batch_size,
                                progress=not args.no_progress)
    except (ZedaError, OSError) as e:
        print(f"compare.py: error: {e}", file=sys.stderr)
        return 2
    report = {"reference": args.reference, "model": args.model, "split": args.split, "n_per_family": args.n,
              "task_seed": args.task_seed, "max_new_tokens": args.max_new_tokens, **report}
    print(divergence_table(report, args.rows))
    if args.out and not write_json_report(args.out, report, "compare.py"):
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(exit_status("compare.py", main))
