"""Evaluate a static or converted checkpoint: accuracy, zero-expert ratio, FLOPs and speed (docs/method.md §6).

    python evaluate.py --model assets/qwen3_moe_teacher --out runs/teacher_eval.json
    python evaluate.py --model runs/student --tasks math,code --n 100 --batch-size 64
    python evaluate.py --model runs/student --benchmark bench.jsonl --temperature 0.6 --top-p 0.95 --top-k 20
    python evaluate.py --model assets/qwen3_moe_teacher --routing topk:2     # a training-free baseline
    python evaluate.py --model runs/pipeline/opd/final --zero-bias 1.0        # the compute dial of a ZEDA model

Runs the test split of the task suite (zeda_toy/tasks.py; greedy, 300 items per family by default; --split heldout
for the held-out slice of the train split) and/or a local benchmark JSONL ({"messages": [...], "answer": "..."}
per line), with the model's own tokenizer and chat template, and prints a summary table. --out writes the report
as JSON (atomically); its top-level fields:

    accuracy                  {family or "benchmark": correct / total, ..., "average": mean over them}
    counts                    {group: {correct, total, finished, tokens_generated, zero_expert_ratio_generated,
                                       correct_items: "1"/"0" per item in order, for paired comparisons}}
    zero_expert_ratio         zero slots / routed slots over every processed token (prompts + generated)
    zero_expert_ratio_generated   the same over the generated tokens only
    expert_flops              {dynamic, static};  expert_flops_reduction = 1 - dynamic / static
    forward_flops             {dynamic, static};  forward_flops_reduction (attention, dense layers, head included)
    tokens_generated, prompt_tokens, tokens_processed, generation_seconds, tokens_per_second
    routing, zero_bias         the training-free routing rule and zero-expert bias used (zeda/baselines.py)
    model, architecture, device, dtype, expert_backend, families, n_per_family, task_seed, split, benchmark,
    sampling {temperature, top_p, top_k, max_new_tokens, seed}, batch_size,
    samples                   {group: [{where, prompt, output, reference, correct}, ...]} (first 3 per group)

    skipped_too_long, too_long    prompts that did not fit the context with --max-new-tokens (file:line), left
                              out of the accuracy (--strict refuses them instead)
    chat_template_kwargs, answer_regex

Benchmark answers are scored by data.score_answer's rules (docs/usage.md: "Answer: X", "The answer is X.",
\boxed{X}, bold, LaTeX dollars, thousands separators, a trailing period; reasoning before </think> ignored);
--answer-regex PATTERN (one capture group) picks the answer instead. Task-family items keep tasks.verify.

Bad input (missing model folder, unsupported architecture, unknown family, bad --n, a malformed benchmark line,
a bad --answer-regex, with --strict a prompt longer than the context) exits with status 2 and a message naming
the culprit; nothing is written.
The evaluation logic lives in zeda/evaluation.py (evaluate_model), so the pipeline can run it in-process.
"""

from __future__ import annotations

import argparse
import sys

from zeda.baselines import parse_routing, set_routing
from zeda.config import ModelConfig
from zeda.data import check_writable, compile_answer_regex
from zeda.errors import EvaluationError, ZedaError, exit_status
from zeda.evaluation import EVAL_SPLITS, check_families, evaluate_model, summary_table, write_json_report
from zeda.flags import add_chat_template_kwargs, add_compute_args, float_range, int_range
from zeda.sampling import SamplingParams
from zeda.loading import load_for_inference
from zeda_toy.tasks import FAMILIES, check_heldout_size


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="evaluate.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", required=True, help="checkpoint folder (static or converted), with tokenizer files")
    p.add_argument("--tasks", default=None,
                   help=f"comma-separated task families of {','.join(FAMILIES)} (default: all of them, or none "
                        "when --benchmark is given)")
    p.add_argument("--n", type=int_range(min=1), default=300, help="test items per task family (default 300)")
    p.add_argument("--benchmark", default=None, help="a benchmark JSONL file, reported as accuracy['benchmark']")
    p.add_argument("--out", default=None, help="write the report as JSON to this file")
    p.add_argument("--batch-size", type=int_range(min=1), default=32, help="prompts per generation batch (default 32)")
    p.add_argument("--temperature", type=float_range(min=0), default=0.0,
                   help="sampling temperature; 0 = greedy (default)")
    p.add_argument("--top-p", type=float_range(above=0, max=1), default=1.0,
                   help="nucleus sampling mass (default 1 = off)")
    p.add_argument("--top-k", type=int_range(min=0), default=0, help="keep the k most likely tokens (default 0 = off)")
    p.add_argument("--max-new-tokens", type=int_range(min=1), default=256,
                   help="generation limit per answer (default 256)")
    p.add_argument("--seed", type=int_range(min=0), default=0, help="sampling seed (batch b uses seed + b; default 0)")
    p.add_argument("--split", default="test", choices=EVAL_SPLITS,
                   help="test (default), or heldout: the held-out slice of the train split that the pipeline's "
                        "settings are chosen on (tasks.heldout)")
    p.add_argument("--task-seed", type=int_range(min=0), default=0,
                   help="seed that draws the test items (default 0: every model sees the same items)")
    add_compute_args(p)
    p.add_argument("--routing", default="native",
                   help="native (the model's own), or a training-free baseline: topk:K' keeps the K' highest-weighted "
                        "of the K slots, topp:P keeps slots until their normalised cumulative weight reaches P; "
                        "skipped slots count as skipped expert FLOPs, as zero slots do")
    p.add_argument("--zero-bias", type=float_range(), default=0.0,
                   help="added to every zero-expert router logit (a converted model's compute dial; 0 = as trained)")
    add_chat_template_kwargs(p)
    p.add_argument("--answer-regex", default=None, metavar="PATTERN",
                   help="a regular expression with one capture group: the answer of a benchmark line is group 1 of "
                        "its last match (default: the built-in rules, docs/usage.md)")
    p.add_argument("--strict", action="store_true",
                   help="refuse a prompt that does not fit the context (default: skip it, counted and named)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        # Everything that can be checked without the model is checked first: a typo fails in a second.
        if args.tasks is None:
            families = () if args.benchmark else FAMILIES
        else:
            families = check_families([f.strip() for f in args.tasks.split(",") if f.strip()])
        if families and args.split == "heldout":
            check_heldout_size(args.n)
        if not families and not args.benchmark:
            raise EvaluationError("nothing to evaluate: --tasks is empty and no --benchmark given")
        answer_regex = compile_answer_regex(args.answer_regex) if args.answer_regex is not None else None
        if args.out:
            check_writable(args.out, "--out")
        if args.routing != "native":  # a bad rule fails before the weights are read
            parse_routing(args.routing, ModelConfig.from_hf_config(args.model).num_experts_per_tok)
        sampling = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                                  max_new_tokens=args.max_new_tokens)
        model, tokenizer = load_for_inference(args.model, args.device, args.dtype, args.expert_backend)
        set_routing(model, args.routing, args.zero_bias)
        report = evaluate_model(model, tokenizer, families, args.n, sampling, args.batch_size, args.seed,
                                args.benchmark, task_seed=args.task_seed, split=args.split,
                                progress=not args.no_progress, chat_template_kwargs=args.chat_template_kwargs,
                                strict=args.strict, answer_regex=answer_regex)
    except (ZedaError, OSError) as e:
        print(f"evaluate.py: error: {e}", file=sys.stderr)
        return 2
    report["model"] = args.model
    report["routing"], report["zero_bias"] = args.routing, args.zero_bias
    print(summary_table(report))
    if args.out and not write_json_report(args.out, report, "evaluate.py"):
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(exit_status("evaluate.py", main))
