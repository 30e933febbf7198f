"""Baselines and ablations through the user's own scripts: one piece of the method swapped, the rest unchanged.

    python experiments/variant.py --routing topk:2 train_sft.py --student assets/qwen3_moe_teacher \\
        --rollouts rollouts.jsonl --out runs/top2            # static top-k', fine-tuned under its rule
    python experiments/variant.py --normalization adamoe convert.py --input-dir T --output-dir runs/adamoe \\
        --num-zero-experts 8                                 # AdaMoE: null experts, real weights renormalised
    python experiments/variant.py --aux-loss switch train_sft.py --student runs/adamoe ...   # AdaMoE's loss
    python experiments/variant.py --loss full-reverse-kl train_opd.py --student ... --teacher ...
    torchrun --nproc_per_node=2 experiments/variant.py --routing topk:1 train_sft.py ... --fsdp

Everything after the script's name is that script's own flags, and the run is that script's run (checkpoints,
--resume, metrics, meshes); the swap is recorded with its settings, so a resume under another swap is refused.
What each flag swaps (zeda/trainer.py:Swaps, or convert.py's normalization):

  --routing RULE          train_sft.py: the student trains under a zeda/baselines.py rule (topk:K' or topp:P)
                          instead of its router's own choice; a static teacher may be the student. Evaluate it
                          with `evaluate.py --routing` the same rule.
  --normalization adamoe  convert.py: zero experts become AdaMoE's null experts (the real slots' weights are
                          renormalised over the real slots; config.json records it and every loader applies it).
  --aux-loss switch       train_sft.py / train_opd.py: a Switch-style balance loss over all N + Z outputs,
                          weighted by --alpha, instead of the Group Auxiliary Loss (AdaMoE's recipe).
  --loss full-reverse-kl  train_opd.py: the exact KL(p_student || p_teacher) over the vocabulary on the sampled
                          sequences instead of the PPO-clipped sampled-token reverse KL (needs the teacher in
                          process: --teacher DIR, not --teacher-url).

experiments/frontier.py trains and scores every baseline this way.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the user's scripts, imported as modules and run with one piece swapped

import convert  # noqa: E402
import train_opd  # noqa: E402
import train_sft  # noqa: E402
from zeda.errors import exit_status  # noqa: E402
from zeda.losses import full_reverse_kl, load_balancing_loss  # noqa: E402
from zeda.trainer import Swaps  # noqa: E402

SCRIPTS = {"convert.py": convert.main, "train_sft.py": train_sft.main, "train_opd.py": train_opd.main}


def switch_loss(routing, cfg, valid_T, alpha: float, w: float, all_reduce=None, counts: str = "scores"):
    """AdaMoE's routing loss in place of zeda/losses.py:auxiliary_loss (same signature; w, all_reduce and counts
    are the Group Auxiliary Loss's and unused): alpha times a Switch-style balance loss over all N + Z router
    outputs, averaged over MoE layers, counted per rank."""
    if not cfg.num_zero_experts:
        return torch.zeros((), device=routing[0].logits_TE.device)
    return alpha * load_balancing_loss(routing, cfg.num_router_outputs, valid_T, cfg.router_scoring)


def full_reverse_kl_policy(student, teacher, ids, attn, mask, *, args, norm: float, forced, routing: list,
                           teacher_logp=None, old_logp=None):
    """The exact reverse KL over the vocabulary in place of train_opd.py:ppo_policy (same signature and
    returns): the teacher's and the student's full logits on the sampled sequences ([B, T-1, V]), the student's
    at the sampling temperature. Nothing is clipped; the old policy's and the teacher's log-probs of the sampled
    tokens are returned for the logged reverse-KL estimate."""
    with torch.no_grad():
        teacher_logits = teacher(ids, attention_mask=attn)[:, :-1]
    student_logits = student(ids, attention_mask=attn, routing=routing, forced_routing=forced)[:, :-1]
    student_logits = student_logits / args.temperature
    loss = full_reverse_kl(student_logits, teacher_logits, mask.float(), norm, args.loss_aggregation)
    with torch.no_grad():
        targets = ids[:, 1:, None]
        old = student_logits.float().log_softmax(-1).gather(-1, targets).squeeze(-1)
        t_logp = teacher_logits.float().log_softmax(-1).gather(-1, targets).squeeze(-1)
    return loss, old, t_logp, torch.zeros((), device=ids.device)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="variant.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__[__doc__.index("What each flag"):])
    p.add_argument("--routing", default="native", metavar="RULE", help="train_sft.py: topk:K' or topp:P")
    p.add_argument("--normalization", choices=["zeda", "adamoe"], default="zeda", help="convert.py")
    p.add_argument("--aux-loss", choices=["ga", "switch"], default="ga", help="train_sft.py / train_opd.py")
    p.add_argument("--loss", choices=["ppo", "full-reverse-kl"], default="ppo", help="train_opd.py")
    p.add_argument("script", choices=sorted(SCRIPTS), help="the user's script to run")
    p.add_argument("script_args", nargs=argparse.REMAINDER, help="its own flags")
    args = p.parse_args(argv)
    used = {"--routing": args.routing != "native", "--normalization": args.normalization != "zeda",
            "--aux-loss": args.aux_loss != "ga", "--loss": args.loss != "ppo"}
    takes = {"convert.py": {"--normalization"}, "train_sft.py": {"--routing", "--aux-loss"},
             "train_opd.py": {"--aux-loss", "--loss"}}[args.script]
    wrong = [flag for flag, on in used.items() if on and flag not in takes]
    if wrong:
        p.error(f"{wrong[0]} does not apply to {args.script} (it swaps a piece of {', '.join(sorted(SCRIPTS))} "
                f"as listed in --help)")
    if args.loss == "full-reverse-kl" and "--teacher-url" in args.script_args:
        p.error("--loss full-reverse-kl needs the teacher's logits over the whole vocabulary, which a server does "
                "not send: give train_opd.py --teacher DIR")
    args.name = " ".join(f"{flag} {value}" for flag, value, on in
                         [("--routing", args.routing, used["--routing"]),
                          ("--normalization", args.normalization, used["--normalization"]),
                          ("--aux-loss", args.aux_loss, used["--aux-loss"]),
                          ("--loss", args.loss, used["--loss"])] if on) or "zeda"
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.script == "convert.py":
        return convert.main(args.script_args, normalization=args.normalization)
    swaps = Swaps(name=args.name, routing=args.routing,
                  routing_loss=switch_loss if args.aux_loss == "switch" else None,
                  policy_loss=full_reverse_kl_policy if args.loss == "full-reverse-kl" else None,
                  reads_rollout_scores=args.loss != "full-reverse-kl")  # it takes both models' full logits itself
    return SCRIPTS[args.script](args.script_args, swaps)


if __name__ == "__main__":
    sys.exit(exit_status("variant.py", main))
