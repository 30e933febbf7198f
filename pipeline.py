"""The main job: the whole ZEDA pipeline on a shipped teacher, end to end, on CPU.

    python pipeline.py                          # the qwen3_moe teacher
    python pipeline.py --arch glm4_moe_lite     # the GLM-4.7-Flash-style teacher
    python pipeline.py --stages convert,eval    # just convert and compare before any training

Stages, each a script a user can also run alone (each runs as its own process; the commands are printed):
  convert   convert.py: static teacher -> dynamic student with Z = N/2 zero experts (docs/method.md §1)
  rollouts  rollout.py: the teacher answers the SFT prompts (train split of the task suite)
  sft       train_sft.py: stage 1, CE on the teacher's answers + Group Auxiliary Loss (§4)
  opd       train_opd.py: stage 2, on-policy distillation from the frozen teacher (§5)
  eval      evaluate.py on the test split (or --eval-split heldout): teacher / converted / after SFT / after SFT+OPD
It ends with one table -- per-family and average accuracy, zero-expert ratio, expert-FLOP and whole-forward
FLOP reduction, measured tokens/s -- and writes the same numbers to OUT/results.json. A stage that fails or
is stopped (Ctrl-C, SIGTERM) stops the pipeline with its exit code; what it saved stays, for --resume by hand.

The defaults are sized for a 2-core CPU (12-15 minutes); they are not the paper's recipe (a 30B model,
60k prompts, lr 2e-5 / 5e-6): our ~2M-parameter teachers were trained at lr 3e-3 and need a larger lr to move.
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
import time
from pathlib import Path

import torch

from zeda_toy import tasks
from zeda.config import ModelConfig
from zeda.data import check_writable
from zeda.errors import ZedaError, exit_status
from zeda.evaluation import EVAL_SPLITS, write_json_report
from zeda.flags import float_range, int_range
from zeda.sampling import add_sampling_args
from zeda_toy.stages import SHIPPED_TEACHERS, StageFailed, evaluate_folder, run_script, write_prompt_files

ROOT = Path(__file__).resolve().parent
TEACHERS = SHIPPED_TEACHERS
STAGES = ("convert", "rollouts", "sft", "opd", "eval")


def table(rows: dict[str, dict]) -> str:
    cols = [*tasks.FAMILIES, "average"]
    header = (f"{'stage':<24}" + "".join(f"{c:>9}" for c in cols)
              + f"{'zero %':>8}{'expert FLOPs -':>16}{'fwd FLOPs -':>13}{'tok/s':>8}")
    lines = [header, "-" * len(header)]
    for name, r in rows.items():
        acc = "".join(f"{100 * r['accuracy'][c]:>8.1f}%" for c in cols)
        lines.append(f"{name:<24}{acc}{100 * r['zero_expert_ratio']:>7.1f}%{100 * r['expert_flops_reduction']:>15.1f}%"
                     f"{100 * r['forward_flops_reduction']:>12.1f}%{r['tokens_per_second']:>8.0f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="pipeline.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="qwen3_moe", choices=sorted(TEACHERS), help="which shipped teacher")
    p.add_argument("--teacher", type=Path, default=None, help="teacher folder (default: the shipped one)")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "pipeline", help="output folder")
    p.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    p.add_argument("--zero-experts", type=int_range(min=1), default=None, help="Z (default N/2, the paper's setting)")
    p.add_argument("--n", type=int_range(min=1), default=300, help="test items per family for each evaluation")
    p.add_argument("--eval-split", default="test", choices=EVAL_SPLITS,
                   help="test, or heldout: the held-out slice of the train split (left out of every training prompt "
                        "set) that the defaults below were chosen on")
    p.add_argument("--alpha", type=float_range(min=0), default=0.1,
                   help="Group Auxiliary Loss weight, SFT and OPD (paper: 0.1)")
    # w 2.2 rather than the paper's 2.0, and the SFT / OPD settings below, were chosen on the held-out slice of the
    # train split, never on the test split: docs/experiments.md.
    p.add_argument("--w", type=float_range(above=0), default=2.2,
                   help="GA zero-group weight, SFT and OPD: targets a zero share of "
                   "wZ/(N+wZ) (paper: 2.0, 50%% at Z = N/2)")
    p.add_argument("--sft-prompts", type=int_range(min=1), default=6000, help="SFT prompts per family (train split)")
    p.add_argument("--sft-epochs", type=int_range(min=1), default=1, help="SFT epochs over the rollouts (paper: 1)")
    p.add_argument("--sft-lr", type=float_range(above=0), default=2e-4, help="SFT peak lr (cosine, 10%% warmup)")
    p.add_argument("--sft-batch-size", type=int_range(min=1), default=32, help="SFT global batch (sequences per step)")
    # Off by default: the paper trains on every rollout.
    p.add_argument("--sft-drop-incorrect", action="store_true",
                   help="SFT only on rollouts the task verifier marks correct (train_sft.py --drop-incorrect)")
    add_sampling_args(p, prefix="rollout-", from_model=False)  # how the teacher samples the SFT rollouts (the paper's settings)
    p.add_argument("--opd-prompts", type=int_range(min=1), default=1000, help="OPD prompts per family (train split)")
    p.add_argument("--opd-steps", type=int_range(min=1), default=60, help="OPD optimizer steps")
    p.add_argument("--opd-lr", type=float_range(above=0), default=3e-5, help="OPD constant lr")
    p.add_argument("--max-new-tokens", type=int_range(min=1), default=160,
                   help="answer limit for rollouts, OPD and eval")
    p.add_argument("--batch-size", type=int_range(min=1), default=64, help="prompts per generation batch")
    p.add_argument("--seed", type=int_range(min=0), default=0, help="seed for every stage")
    p.add_argument("--threads", type=int_range(min=1), default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--resume", action="store_true",
                   help="continue the rollouts, SFT and OPD of an interrupted run in --out instead of starting over")
    args = p.parse_args(argv)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        p.error(f"unknown stage(s) {unknown}; choose from {','.join(STAGES)}")
    if args.eval_split == "heldout":  # checked now, not after the training stages
        try:
            tasks.check_heldout_size(args.n)
        except ValueError as e:
            p.error(f"--n: {e}")
    if args.threads:
        torch.set_num_threads(args.threads)
    teacher = args.teacher or TEACHERS[args.arch]
    if not (teacher / "config.json").exists():
        print(f"pipeline.py: error: no teacher at {teacher}; train it with "
              f"`python -m zeda_toy.teacher --arch {args.arch} --out {teacher}`", file=sys.stderr)
        return 2
    t0 = time.time()
    out = args.out
    try:
        check_writable(out, "--out", folder=True)
    except ZedaError as e:
        print(f"pipeline.py: error: {e}", file=sys.stderr)
        return 2
    n_real = ModelConfig.from_hf_config(teacher).num_experts
    zero = args.zero_experts or n_real // 2
    student = out / "converted"
    if args.resume and "convert" in stages and (student / "config.json").exists():
        stages.remove("convert")  # the conversion finished (it is all or nothing): keep it
    seconds = {}
    try:
        rows = run_stages(stages, args, teacher, zero, seconds)
    except StageFailed as e:
        stopped = e.code in (130, 143)
        print(f"pipeline.py: {e}; {'what it saved is kept' if stopped else 'stopping'}. Continue with the same "
              f"command and --resume", file=sys.stderr)
        return e.code
    results = {"arch": args.arch, "teacher": str(teacher), "real_experts": n_real, "zero_experts": zero,
               "n_per_family": args.n, "eval_split": args.eval_split, "stages": rows,
               "stage_seconds": {k: round(v, 1) for k, v in seconds.items()},
               "seconds": round(time.time() - t0, 1), "args": {k: str(v) for k, v in vars(args).items()}}
    out_json = out / "results.json"
    if not write_json_report(out_json, results, "pipeline.py"):
        return 2
    print(f"pipeline done in {results['seconds']} s")
    return 0


def run_stages(stages: list[str], args, teacher: Path, zero: int, seconds: dict) -> dict:
    """Run the chosen stages in order; returns the evaluation rows."""
    out = args.out
    student, sft_out, opd_out = out / "converted", out / "sft", out / "opd"
    prompts_sft, prompts_opd, rollouts = out / "prompts_sft.jsonl", out / "prompts_opd.jsonl", out / "rollouts.jsonl"
    if "convert" in stages:
        t = time.time()
        run_script(["convert.py", "--input-dir", str(teacher), "--output-dir", str(student), "--num-zero-experts", str(zero),
             "--seed", str(args.seed), "--overwrite"], args.threads)
        seconds["convert"] = time.time() - t
    if "rollouts" in stages:
        t = time.time()
        # Train-split prompts, minus the held-out slice that settings are chosen on (--eval-split heldout).
        write_prompt_files(out, args.sft_prompts, args.opd_prompts, args.seed)
        if not args.resume:
            rollouts.unlink(missing_ok=True)  # rollout.py appends to what is there (that is its resume)
        run_script(["rollout.py", "--teacher", str(teacher), "--prompts", str(prompts_sft), "--out", str(rollouts),
             "--max-new-tokens", str(args.max_new_tokens), "--batch-size", str(args.batch_size),
             "--seed", str(args.seed), "--temperature", str(args.rollout_temperature),
             "--top-p", str(args.rollout_top_p), "--top-k", str(args.rollout_top_k)], args.threads)
        seconds["rollouts"] = time.time() - t
    if "sft" in stages:
        t = time.time()
        if not args.resume:
            shutil.rmtree(sft_out, ignore_errors=True)  # the pipeline's own earlier SFT run: a fresh one replaces it
        run_script(["train_sft.py", "--student", str(student), "--rollouts", str(rollouts), "--out", str(sft_out),
             "--epochs", str(args.sft_epochs), "--global-batch-size", str(args.sft_batch_size),
             "--micro-batch-size", str(math.gcd(16, args.sft_batch_size)),
             "--lr", str(args.sft_lr), "--alpha", str(args.alpha), "--w", str(args.w), "--seed", str(args.seed)]
            # every rollout, as before cut-off answers were dropped by default (the shipped teachers' answers end
            # well within --max-new-tokens; a tiny random teacher's never do)
            + ["--keep-unfinished"] + ["--drop-incorrect"] * args.sft_drop_incorrect + ["--resume"] * args.resume,
            args.threads)
        seconds["sft"] = time.time() - t
    if "opd" in stages:
        t = time.time()
        if not args.resume:
            shutil.rmtree(opd_out, ignore_errors=True)
        run_script(["train_opd.py", "--student", str(sft_out / "final"), "--teacher", str(teacher), "--prompts",
             str(prompts_opd), "--out", str(opd_out), "--max-steps", str(args.opd_steps), "--lr", str(args.opd_lr),
             "--max-new-tokens", str(args.max_new_tokens), "--alpha", str(args.alpha), "--w", str(args.w),
             "--seed", str(args.seed)] + ["--resume"] * args.resume, args.threads)
        seconds["opd"] = time.time() - t
    rows = {}
    if "eval" in stages:
        t = time.time()
        candidates = {"teacher (static)": teacher, "converted, no training": student,
                      "after SFT": sft_out / "final", "after SFT + OPD": opd_out / "final"}
        for name, folder in candidates.items():
            if (folder / "config.json").exists():
                rows[name] = evaluate_folder(folder, args.n, args.max_new_tokens, args.batch_size, args.seed,
                                             args.eval_split)
        seconds["eval"] = time.time() - t
        print("\n" + table(rows))
    return rows


if __name__ == "__main__":
    sys.exit(exit_status("pipeline.py", main))
