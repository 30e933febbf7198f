"""Stage 2 of ZEDA: on-policy distillation of the SFT student from the frozen static teacher (docs/method.md §5).

    python train_opd.py --student runs/sft/final --teacher assets/qwen3_moe_teacher --prompts p.jsonl --out runs/opd
    torchrun --nproc_per_node=2 train_opd.py --student ... --teacher ... --prompts ... --out runs/opd

Each step:
  1. the current student samples --samples-per-prompt answers (temperature 1) to --prompts-per-step prompts,
     with the shared generation engine (zeda/generation.py), keeping the log-prob of every sampled token;
  2. the frozen teacher (the original static model, in process, no gradients) scores the sampled tokens;
  3. per-token advantage A_t = log p_teacher(y_t) - log p_student(y_t), detached, no discount -- a one-sample
     estimate of the negative reverse KL at each position;
  4. one optimizer step on the PPO-clipped policy-gradient loss (clip 0.2) over the response tokens, with the
     old policy's log-probs recomputed by a training-mode forward (not the sampler's), each answer's mean over
     its tokens then the mean over answers (--loss-aggregation), plus the Group Auxiliary Loss.
`--loss full-reverse-kl` replaces 3-4 by the exact KL(p_student || p_teacher) over the vocabulary on the
sampled sequences (needs the teacher's full logits; for comparison). EOS-terminated and truncated answers are
both trained on; truncations are counted. Defaults follow the paper: 16 prompts x 2 samples per step, constant
lr 5e-6 (Qwen; the paper uses 1e-6 for GLM), AdamW (0.9, 0.98). Outputs are as train_sft.py's: OUT/step-N and
OUT/final checkpoints (atomic), --resume (prompt order and sampling seeds are functions of the step, so a
resumed run samples what the uninterrupted one would have), OUT/metrics.jsonl, clean stop on SIGTERM/Ctrl-C,
a non-finite loss stops the run naming the step.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch

import zeda
from zeda.data import Example, collate, encode_chats, iter_records, prompt_messages
from zeda.distributed import Dist
from zeda.errors import DataError, UsageError
from zeda.flags import float_range, int_range
from zeda.flops import expert_counts
from zeda.generation import SamplingParams, generate, token_logprobs
from zeda.loading import load_model, load_tokenizer
from zeda.losses import AGGREGATIONS, auxiliary_loss, full_reverse_kl, ppo_clip_loss, reverse_kl_advantage
from zeda.trainer import Trainer, add_training_args, run_training, zero_share_metrics


def load_prompts(path: Path, tokenizer, max_prompt_len: int) -> list[Example]:
    """Prompts JSONL -> chat-templated prompt ids; a prompt that leaves no room to answer is an error."""
    lines, messages = [], []
    for lineno, rec in iter_records(path):
        lines.append(lineno)
        messages.append(prompt_messages(rec, path, lineno))
    if not messages:
        raise DataError(f"{path}: no prompts")
    examples = encode_chats(tokenizer, messages)
    for lineno, e in zip(lines, examples):
        if len(e.ids) > max_prompt_len:
            raise DataError(f"{path}:{lineno}: prompt of {len(e.ids)} tokens leaves no room for --max-new-tokens "
                             f"(context limit {max_prompt_len} for the prompt)")
    return examples


def step_prompts(n: int, step: int, per_step: int, seed: int) -> list[int]:
    """Prompt indices for `step`: epochs are seeded shuffles, so any step can be recomputed on resume."""
    per_epoch = max(1, n // per_step)
    epoch, k = divmod(step, per_epoch)
    order = list(range(n))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    picked = order[k * per_step:(k + 1) * per_step]
    return picked if len(picked) == per_step else (picked + order)[:per_step]


def align(values: list[list[float]], examples: list[Example], shape) -> torch.Tensor:
    """Per-answer-token values -> [B, T-1] aligned with collate's loss mask (target t+1 at column t)."""
    out = torch.zeros(shape)
    for b, (vals, e) in enumerate(zip(values, examples)):
        out[b, e.num_prompt - 1:e.num_prompt - 1 + len(vals)] = torch.tensor(vals)
    return out


def opd_step(student, teacher, examples: list[Example], sampler_logp: list[list[float]] | None, args, d: Dist,
             pad_id: int, global_count: float) -> dict:
    """Forward and backward of one rollout batch on this rank (docs/method.md §5, steps 2-4).

    The old policy's log-probs are recomputed by a no-grad forward of the student in training mode, as the
    authors do, not taken from the sampler: the KV-cache decode rounds differently (in bf16 by up to ~0.15 nats
    a token), and that error would enter both the advantage and the PPO ratio. The student's log-probs are
    taken at the sampling temperature (logits / T: the policy that sampled), the teacher's at 1. The sampler's
    log-probs are kept only to report how far they were from the recomputed ones (sampler_logp_gap).
    global_count: the response tokens (--loss-aggregation token) or sequences (sequence) over all ranks."""
    cfg, T = student.config, args.temperature
    ids, attn, mask = (t.to(d.device) for t in collate(examples, pad_id))
    mask_f = mask.float()
    norm = global_count / d.dp  # x world: the mean over ranks of each rank's loss is the global mean
    routing = []
    if args.loss == "full-reverse-kl":
        with torch.no_grad():
            teacher_logits = teacher(ids[:, :-1], attention_mask=attn[:, :-1])
        student_logits = student(ids[:, :-1], attention_mask=attn[:, :-1], routing=routing) / T
        policy = full_reverse_kl(student_logits, teacher_logits, mask_f, norm, args.loss_aggregation)
        routed_mask = attn[:, :-1]  # the tokens the student's forward routed
        with torch.no_grad():
            targets = ids[:, 1:, None]
            old_logp = student_logits.float().log_softmax(-1).gather(-1, targets).squeeze(-1)
            t_logp = teacher_logits.float().log_softmax(-1).gather(-1, targets).squeeze(-1)
    else:
        with torch.no_grad():
            t_logp = token_logprobs(teacher, ids, attn)  # [B, T-1], only the sampled tokens' log-probs
            old_logp = token_logprobs(student, ids, attn, temperature=T)  # the behaviour policy, recomputed
        new_logp = token_logprobs(student, ids, attn, temperature=T, routing=routing)
        advantages = reverse_kl_advantage(t_logp, old_logp)
        policy = ppo_clip_loss(new_logp, old_logp, advantages, mask_f, args.clip, norm, args.loss_aggregation)
        routed_mask = attn  # token_logprobs runs the whole sequence
    valid = routed_mask.reshape(-1).bool()
    ga = auxiliary_loss(routing, cfg, valid, args.aux_loss, args.alpha, args.w, d.all_reduce if d.dp > 1 else None,
                        args.ga_counts)
    (policy + ga).backward()
    gap = torch.zeros((), device=d.device)
    if sampler_logp is not None:  # how far the sampler's log-probs were from the recomputed ones (a metric only)
        gap = ((align(sampler_logp, examples, mask.shape).to(d.device) - old_logp).abs() * mask_f).sum()
    sums = torch.stack([policy.detach().double(), ga.detach().double(),
                        ((old_logp - t_logp) * mask_f).sum().double(),  # reverse KL estimate, summed over tokens
                        gap.double()])
    counts_LE = expert_counts(routing, valid, cfg.num_router_outputs)
    return {"sums": sums, "counts_LE": counts_LE}


def train(args, d: Dist, stop: dict) -> dict:
    cfg = zeda.ModelConfig.from_hf_config(args.student)
    if cfg.num_zero_experts == 0:
        raise UsageError(f"{args.student / 'config.json'}: not a converted checkpoint (no zce_nums)")
    teacher_cfg = zeda.ModelConfig.from_hf_config(args.teacher)
    if teacher_cfg.vocab_size != cfg.vocab_size:
        raise UsageError(f"{args.teacher}: vocab_size {teacher_cfg.vocab_size} differs from the student's "
                         f"{cfg.vocab_size}: teacher and student must share the tokenizer")
    tokenizer = load_tokenizer(args.student)
    pad_id = tokenizer.pad_token_id or 0
    eos = sorted({tokenizer.eos_token_id, *cfg.eos_token_id} - {None})
    prompts = load_prompts(args.prompts, tokenizer, cfg.max_position_embeddings - args.max_new_tokens)
    if args.prompts_per_step % d.dp:
        raise UsageError(f"--prompts-per-step {args.prompts_per_step} must be a multiple of the {d.dp} ranks")
    trainer = Trainer("opd", args, d, stop, init_from=args.student, total_steps=args.max_steps)
    student = trainer.load_student()
    # The frozen teacher, split over the mesh the same way, on the same device.
    teacher = load_model(args.teacher, dtype=args.dtype, dist=d, expert_backend=args.expert_backend, trainable=False)
    sampling = SamplingParams(temperature=args.temperature, max_new_tokens=args.max_new_tokens)
    per_rank = args.prompts_per_step // d.dp

    def step_fn(step: int) -> dict:
        picked = step_prompts(len(prompts), step, args.prompts_per_step, args.seed)
        mine = [prompts[i] for i in picked[d.dp_rank * per_rank:(d.dp_rank + 1) * per_rank] for _ in
                range(args.samples_per_prompt)]
        # 1. sample from the current student
        t0 = time.time()
        student.eval()
        # One seed per sample, from its place in the global batch: the samples do not depend on the rank layout,
        # so a dp=2 run samples what a single process samples.
        first = d.dp_rank * len(mine)
        seeds = [((args.seed * 1_000_003 + step) * 1_000_003 + first + i) % 2**63 for i in range(len(mine))]
        gen = generate(student, [p.ids for p in mine], sampling, eos, pad_id, seed=seeds,
                       all_done=d.ep_all_done if d.dims.ep > 1 else None)  # ep ranks decode in lockstep
        t_sample = time.time() - t0
        examples = [Example(p.ids + toks, len(p.ids)) for p, toks in zip(mine, gen.tokens)]
        n = d.all_reduce(torch.tensor([float(sum(len(t) for t in gen.tokens)), float(len(gen.tokens)),
                                       float(sum(not f for f in gen.finished))], dtype=torch.float64))
        tokens, sequences, truncated = n.tolist()
        # 2-4. score under teacher and student, backward (the harness steps the optimizer)
        t1 = time.time()
        student.train()
        out = opd_step(student, teacher, examples, gen.logprobs, args, d, pad_id,
                       sequences if args.loss_aggregation == "sequence" else tokens)
        sums = d.all_reduce(out["sums"])
        policy, ga = float(sums[0]) / d.dp, float(sums[1]) / d.dp
        return {"loss": policy + ga, "policy_loss": policy, "ga": ga, "reverse_kl": float(sums[2]) / max(1.0, tokens),
                "sampler_logp_gap": float(sums[3]) / max(1.0, tokens),
                **zero_share_metrics(out["counts_LE"], cfg.num_experts, d),
                "mean_response_length": tokens / sequences, "truncation_rate": truncated / sequences,
                "sample_tokens_per_s": tokens / max(t_sample, 1e-9),
                "train_tokens_per_s": tokens / max(time.time() - t1, 1e-9)}

    return trainer.run(step_fn, lambda step: args.lr, postfix=("reverse_kl", "zero_ratio"))


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="train_opd.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--student", type=Path, required=True, help="converted (usually SFT'd) student folder")
    p.add_argument("--teacher", type=Path, required=True, help="the original static model (frozen)")
    p.add_argument("--prompts", type=Path, required=True, help="prompts JSONL ({'messages': ...} or {'prompt': ...})")
    p.add_argument("--out", type=Path, required=True, help="output folder (checkpoints, metrics.jsonl)")
    p.add_argument("--max-steps", type=int_range(min=1), default=321, help="optimizer steps (paper: 321)")
    p.add_argument("--prompts-per-step", type=int_range(min=1), default=16,
                   help="prompts per step, over all ranks (paper: 16)")
    p.add_argument("--samples-per-prompt", type=int_range(min=1), default=2,
                   help="answers sampled per prompt (paper: 2)")
    p.add_argument("--max-new-tokens", type=int_range(min=1), default=256,
                   help="answer length limit (longer: truncated)")
    p.add_argument("--temperature", type=float_range(above=0), default=1.0, help="sampling temperature (paper: 1)")
    p.add_argument("--loss", default="ppo", choices=["ppo", "full-reverse-kl"],
                   help="ppo: sampled-token reverse-KL advantage, PPO-clipped; full-reverse-kl: exact KL over V")
    p.add_argument("--clip", type=float_range(above=0), default=0.2, help="PPO ratio clip")
    p.add_argument("--loss-aggregation", default="sequence", choices=AGGREGATIONS,
                   help="sequence: each answer's mean over its tokens, then the mean over answers (the authors'); "
                        "token: the mean over all answer tokens")
    p.add_argument("--lr", type=float_range(above=0), default=5e-6,
                   help="constant learning rate (paper: 5e-6 Qwen, 1e-6 GLM)")
    add_training_args(p)
    p.add_argument("--seed", type=int_range(min=0), default=0, help="prompt order and sampling seed")
    args = p.parse_args(argv)
    args.dtype = getattr(torch, args.dtype)
    return args


def main(argv=None) -> int:
    return run_training("train_opd.py", train, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
