"""Where a trained ZEDA model spends its compute: real experts per answer token, against how hard the token is.

    python experiments/compute_use.py --student runs/pipeline/opd/final --teacher assets/qwen3_moe_teacher
    python experiments/compute_use.py --student runs/pipeline/opd/final --teacher assets/qwen3_moe_teacher --n 100 \\
        --out docs/results/compute_use-qwen3_moe.json --png docs/results/compute_use-qwen3_moe.png

The student answers --n test items per family greedily; a teacher-forced forward of each answer through both
models gives, per answer token, the student's real-expert slots in every MoE layer, the teacher's next-token
entropy and KL(student || teacher) (token_compute.py). It prints the Spearman correlations of real-expert use
with both, per task family and per layer, and one answer coloured by its compute; --out writes the numbers as
JSON, --png a picture of one answer token by token above the entropy relation, --html the coloured answer as a
page. `serve.py --show-compute` colours every answer of a chat the same way. Bad input (a missing folder, an
unknown family, a static --student, different vocabularies) exits with status 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from zeda.baselines import set_routing
from zeda.data import check_writable, write_report
from zeda.errors import EvaluationError, UsageError, ZedaError, exit_status
from zeda.evaluation import EVAL_SPLITS, check_families, suite_items, write_json_report
from zeda.flags import add_compute_args, float_range, int_range
from zeda.loading import load_for_inference, load_tokenizer, same_tokenizer
from zeda.token_picture import render_html, render_terminal, token_pieces
from zeda_toy.tasks import FAMILIES

from token_compute import correlations, measure, pick_example, plot


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="compute_use.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--student", required=True, help="checkpoint folder of a converted (dynamic) model")
    p.add_argument("--teacher", required=True, help="checkpoint folder of its static original")
    p.add_argument("--tasks", default=",".join(FAMILIES), help="comma-separated task families (default: all)")
    p.add_argument("--n", type=int_range(min=1), default=100, help="items per family (default 100)")
    p.add_argument("--split", default="test", choices=EVAL_SPLITS, help="test (default) or heldout")
    p.add_argument("--task-seed", type=int_range(min=0), default=0, help="seed that draws the items (default 0)")
    p.add_argument("--max-new-tokens", type=int_range(min=1), default=160, help="answer limit (default 160)")
    p.add_argument("--batch-size", type=int_range(min=1), default=32, help="prompts per generation batch")
    p.add_argument("--zero-bias", type=float_range(), default=0.0, help="the student's compute dial (default 0)")
    p.add_argument("--example-family", default=None, help="family of the answer shown and plotted (default: any)")
    p.add_argument("--out", default=None, help="write the correlations as JSON to this file")
    p.add_argument("--png", default=None, help="write the picture of one answer and the entropy relation here")
    p.add_argument("--html", default=None, help="write the coloured example answer as an HTML page here")
    add_compute_args(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def summary(report: dict) -> str:
    head = (f"{'':<10} {'tokens':>7} {'mean real':>9} {'rho(H)':>7} {'rho(KL)':>8} {'real|agree':>10} "
            f"{'real|disagree':>13} {'disagree':>8}")

    def line(name: str, r: dict) -> str:
        def num(v, fmt):
            return format(v, fmt) if v is not None else "-"
        return (f"{name:<10} {r['tokens']:>7} {num(r['mean_real'], '.2f'):>9} {num(r['spearman_entropy'], '+.3f'):>7} "
                f"{num(r['spearman_reverse_kl'], '+.3f'):>8} {num(r['mean_real_agree'], '.2f'):>10} "
                f"{num(r['mean_real_disagree'], '.2f'):>13} {num(r['disagree_share'], '.1%'):>8}")

    title = (f"Real experts per answer token (static model: {report['static_real_per_token']}), Spearman rho with "
             "the teacher's entropy H and with KL(student || teacher):")
    rows = [title, head, line("all", report["overall"])]
    rows += [line(g, r) for g, r in report["by_family"].items()]
    rows += [line(f"layer {i}", r) for i, r in enumerate(report["by_layer"])]
    return "\n".join(rows)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        families = check_families([f.strip() for f in args.tasks.split(",") if f.strip()])
        if not families:
            raise EvaluationError("nothing to measure: --tasks is empty")
        if args.example_family is not None and args.example_family not in families:
            raise UsageError(f"--example-family {args.example_family!r} is not one of --tasks ({', '.join(families)})")
        for flag in ("out", "png", "html"):
            if getattr(args, flag):
                check_writable(getattr(args, flag), f"--{flag}")
        items = suite_items(families, args.n, args.task_seed, args.split)
        # before any weight is read: a 30B model loads for minutes
        same_tokenizer(load_tokenizer(args.student), load_tokenizer(args.teacher), args.teacher, "the student's",
                       "the teacher routes the student's answer tokens")
        student, tokenizer = load_for_inference(args.student, args.device, args.dtype, args.expert_backend)
        if not student.config.num_zero_experts:
            raise UsageError(f"--student {args.student}: a static model (no zero experts); it spends K experts on "
                             "every token. Pass a converted checkpoint (convert.py, train_sft.py, train_opd.py)")
        set_routing(student, zero_bias=args.zero_bias)
        teacher, _ = load_for_inference(args.teacher, args.device, args.dtype, args.expert_backend)
        answers = measure(student, teacher, tokenizer, items, args.max_new_tokens, args.batch_size,
                          progress=not args.no_progress)
        report = correlations(answers, student.config)
    except (ZedaError, OSError) as e:
        print(f"compute_use.py: error: {e}", file=sys.stderr)
        return 2
    example = pick_example(answers, args.example_family)
    pieces = token_pieces(tokenizer, example.answer)
    real_T = example.real_LA.sum(0).tolist()
    report = {"student": str(args.student), "teacher": str(args.teacher), "split": args.split, "n_per_family": args.n,
              "task_seed": args.task_seed, "max_new_tokens": args.max_new_tokens, "zero_bias": args.zero_bias,
              **report, "example": {"where": example.where, "pieces": pieces, "real_per_token": real_T,
                                    "real_per_layer": example.real_LA.tolist()}}
    print(summary(report))
    print(f"\n{example.where}:")
    print(render_terminal(pieces, real_T, report["static_real_per_token"]))
    ok = not args.out or write_json_report(args.out, report, "compute_use.py")
    if args.html:
        html = render_html(pieces, real_T, report["static_real_per_token"], example.where)
        if write_report(args.html, html, "compute_use.py", "page"):
            print(f"wrote {args.html}")
        else:
            ok = False
    if args.png:
        title = f"{Path(args.student).name} ({student.config.model_type})"
        try:
            if plot(args.png, example, pieces, report, title):
                print(f"wrote {args.png}")
            else:
                print("compute_use.py: no plot: matplotlib is missing (pip install -e '.[plot]')", file=sys.stderr)
        except OSError as e:  # the numbers are in the report; only the picture is lost
            print(f"compute_use.py: error: cannot write the plot to {args.png} ({e.strerror or e})", file=sys.stderr)
            ok = False
    return 0 if ok else 2


if __name__ == "__main__":
    sys.exit(exit_status("compute_use.py", main))
