"""Stage 2 of ZEDA: on-policy distillation of the SFT student from the frozen static teacher (ZEDA.md §5).

    python train_opd.py --student runs/sft/final --teacher assets/qwen3_moe_teacher --prompts p.jsonl --out runs/opd
    torchrun --nproc_per_node=2 train_opd.py --student ... --teacher ... --prompts ... --out runs/opd

Each step:
  1. the current student samples --samples-per-prompt answers (temperature 1) to --prompts-per-step prompts,
     with the shared generation engine (zeda/generation.py), keeping the log-prob of every sampled token;
  2. the frozen teacher (the original static model, in process, no gradients) scores the sampled tokens;
  3. per-token advantage A_t = log p_teacher(y_t) - log p_student(y_t), detached, no discount -- a one-sample
     estimate of the negative reverse KL at each position;
  4. one optimizer step on the PPO-clipped policy-gradient loss (clip 0.2) over the response tokens, with the
     sampler's log-probs as the old policy, plus the Group Auxiliary Loss.
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
import json
import math
import random
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

import zeda
from zeda.data import iter_jsonl, prompt_messages
from zeda.flops import routing_stats
from zeda.generation import SamplingParams, generate, token_logprobs
from zeda.losses import full_reverse_kl, group_aux_loss, ppo_clip_loss, reverse_kl_advantage
from zeda.parallel import Dist, clip_grad_norm, load_parallel
from zeda.training import (add_training_args, check_fresh_out, collate, encode_chats, Example, latest_checkpoint,
                           resume_training, make_optimizer, run_training, save_training_checkpoint)


def load_prompts(path: Path, tokenizer, max_prompt_len: int) -> list[Example]:
    """Prompts JSONL -> chat-templated prompt ids; a prompt that leaves no room to answer is an error."""
    lines, messages = [], []
    for lineno, rec in iter_jsonl(path):
        lines.append(lineno)
        messages.append(prompt_messages(rec, path, lineno))
    if not messages:
        raise ValueError(f"{path}: no prompts")
    examples = encode_chats(tokenizer, messages)
    for lineno, e in zip(lines, examples):
        if len(e.ids) > max_prompt_len:
            raise ValueError(f"{path}:{lineno}: prompt of {len(e.ids)} tokens leaves no room for --max-new-tokens "
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


def sequences_from(prompts: list[Example], gen) -> tuple[list[Example], list[list[float]]]:
    """prompt + sampled answer as training examples (num_prompt marks where the answer starts)."""
    examples = [Example(p.ids + toks, len(p.ids)) for p, toks in zip(prompts, gen.tokens)]
    return examples, gen.logprobs


def align(values: list[list[float]], examples: list[Example], shape) -> torch.Tensor:
    """Per-answer-token values -> [B, T-1] aligned with collate's loss mask (target t+1 at column t)."""
    out = torch.zeros(shape)
    for b, (vals, e) in enumerate(zip(values, examples)):
        out[b, e.num_prompt - 1:e.num_prompt - 1 + len(vals)] = torch.tensor(vals)
    return out


def opd_step(student, teacher, examples, old_logp_values, args, d: Dist, pad_id: int, global_tokens: float):
    """Forward/backward of one rollout batch on this rank. Returns loss terms and routing for metrics."""
    cfg = student.config
    ids, attn, mask = collate(examples, pad_id)
    ids, attn, mask = ids.to(d.device), attn.to(d.device), mask.to(d.device)
    mask_f = mask.float()
    norm = global_tokens / d.dp  # x world: the mean over ranks of each rank's loss is the global mean
    routing = []
    if args.loss == "full-reverse-kl":
        with torch.no_grad():
            teacher_logits = teacher(ids[:, :-1], attention_mask=attn[:, :-1])
        student_logits = student(ids[:, :-1], attention_mask=attn[:, :-1], routing=routing)
        policy = full_reverse_kl(student_logits, teacher_logits, mask_f, normalizer=norm)
        routed_mask = attn[:, :-1]  # the tokens the student's forward routed
        with torch.no_grad():
            targets = ids[:, 1:, None]
            s_logp = student_logits.float().log_softmax(-1).gather(-1, targets).squeeze(-1)
            t_logp = teacher_logits.float().log_softmax(-1).gather(-1, targets).squeeze(-1)
    else:
        with torch.no_grad():
            t_logp = token_logprobs(teacher, ids, attn)  # [B, T-1], only the sampled tokens' log-probs
        new_logp = token_logprobs(student, ids, attn, routing=routing)
        s_logp = align(old_logp_values, examples, mask.shape).to(d.device)  # the sampler's (behaviour) log-probs
        advantages = reverse_kl_advantage(t_logp, s_logp)
        policy = ppo_clip_loss(new_logp, s_logp, advantages, mask_f, args.clip, normalizer=norm)
        routed_mask = attn  # token_logprobs runs the whole sequence
    valid = routed_mask.reshape(-1).bool()
    ga = group_aux_loss(routing, cfg.num_experts, cfg.num_zero_experts, valid, cfg.router_scoring, args.alpha, args.w,
                        d.all_reduce if d.dp > 1 else None)
    (policy + ga).backward()
    reverse_kl_sum = float(((s_logp - t_logp) * mask_f).sum())  # host sync: metrics
    stats = routing_stats(routing, cfg.num_experts, routed_mask)
    return float(policy.detach()), float(ga.detach()), reverse_kl_sum, stats


def train(args, d: Dist, stop: dict) -> dict:
    from transformers import AutoTokenizer

    out: Path = args.out
    cfg = zeda.ModelConfig.from_hf_config(args.student)
    if cfg.num_zero_experts == 0:
        raise ValueError(f"{args.student / 'config.json'}: not a converted checkpoint (no zce_nums)")
    teacher_cfg = zeda.ModelConfig.from_hf_config(args.teacher)
    if teacher_cfg.vocab_size != cfg.vocab_size:
        raise ValueError(f"{args.teacher}: vocab_size {teacher_cfg.vocab_size} differs from the student's "
                         f"{cfg.vocab_size}: teacher and student must share the tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(args.student)
    pad_id = tokenizer.pad_token_id or 0
    eos = sorted({tokenizer.eos_token_id, *cfg.eos_token_id} - {None})
    prompts = load_prompts(args.prompts, tokenizer, cfg.max_position_embeddings - args.max_new_tokens)
    if args.prompts_per_step % d.dp:
        raise ValueError(f"--prompts-per-step {args.prompts_per_step} must be a multiple of the {d.dp} ranks")

    check_fresh_out(out, args.resume)
    resume_from = latest_checkpoint(out) if args.resume else None
    if args.resume and resume_from is None:
        d.print(f"--resume: no checkpoint in {out} yet; starting from step 0")
    # Both split over the mesh as they load; the student's router in fp32 (paper recipe); the frozen teacher is
    # split the same way.
    student = load_parallel(resume_from or args.student, d, args.dtype, args.activation_checkpointing,
                            router_fp32=True, expert_backend=args.expert_backend)
    teacher = load_parallel(args.teacher, d, args.dtype, expert_backend=args.expert_backend, trainable=False)
    opt = make_optimizer(student, args.lr, betas=(args.beta1, args.beta2), weight_decay=args.weight_decay)
    start_step = 0
    if resume_from is not None:
        start_step = resume_training(opt, student, resume_from, d)
        d.print(f"resuming from {resume_from} at step {start_step}")
    if d.is_main:
        out.mkdir(parents=True, exist_ok=True)
    sampling = SamplingParams(temperature=args.temperature, max_new_tokens=args.max_new_tokens)
    per_rank = args.prompts_per_step // d.dp

    def state(step):
        return {"step": step, "total_steps": args.max_steps, "seed": args.seed, "mesh": d.dims.describe(),
                "args": {k: str(v) for k, v in vars(args).items()}}

    bar = tqdm(range(start_step, args.max_steps), initial=start_step, total=args.max_steps, desc="opd",
               unit="step", disable=not d.is_main)
    last = {}
    for step in bar:
        picked = step_prompts(len(prompts), step, args.prompts_per_step, args.seed)
        mine = [prompts[i] for i in picked[d.dp_rank * per_rank:(d.dp_rank + 1) * per_rank] for _ in
                range(args.samples_per_prompt)]
        # 1. sample from the current student (eval mode: no dropout exists, but keep the habit)
        t0 = time.time()
        student.eval()
        # One seed per sample, from its place in the global batch: the samples do not depend on the rank layout,
        # so a dp=2 run samples what a single process samples.
        first = d.dp_rank * len(mine)
        seeds = [((args.seed * 1_000_003 + step) * 1_000_003 + first + i) % 2**63 for i in range(len(mine))]
        gen = generate(student, [p.ids for p in mine], sampling, eos, pad_id, seed=seeds,
                       all_done=d.ep_all_done if d.dims.ep > 1 else None)  # ep ranks decode in lockstep
        t_sample = time.time() - t0
        examples, old_logp = sequences_from(mine, gen)
        local_tokens = sum(len(t) for t in gen.tokens)
        global_tokens = float(d.all_reduce(torch.tensor(float(local_tokens))))
        # 2-4. score under teacher and student, one optimizer step
        t1 = time.time()
        student.train()
        opt.zero_grad(set_to_none=True)
        policy, ga, rkl_sum, stats = opd_step(student, teacher, examples, old_logp, args, d, pad_id, global_tokens)
        d.average_gradients(student)
        sums = d.all_reduce(torch.tensor([policy, ga, rkl_sum, float(sum(not f for f in gen.finished)),
                                          float(len(gen.finished))], dtype=torch.float64))
        policy_val, ga_val = float(sums[0]) / d.dp, float(sums[1]) / d.dp
        if not math.isfinite(policy_val + ga_val):
            raise FloatingPointError(f"non-finite loss at step {step} (policy {policy_val}, ga {ga_val}); stopping "
                                     f"without saving. Last good checkpoint: {latest_checkpoint(out)}")
        grad_norm = clip_grad_norm(student, args.grad_clip, d)
        opt.step()
        t_train = time.time() - t1
        # routing over every real token of this step's training forward (prompts and answers), as evaluate counts
        real = d.all_reduce(torch.tensor([s.real_slots for s in stats], dtype=torch.float64))
        zero = d.all_reduce(torch.tensor([s.zero_slots for s in stats], dtype=torch.float64))
        last = {"step": step + 1, "lr": args.lr, "loss": policy_val + ga_val, "policy_loss": policy_val, "ga": ga_val,
                "reverse_kl": float(sums[2]) / max(1.0, global_tokens), "grad_norm": float(grad_norm),
                "zero_ratio": float(zero.sum() / (real + zero).sum().clamp(min=1)),
                "zero_ratio_per_layer": (zero / (real + zero).clamp(min=1)).tolist(),
                "mean_response_length": global_tokens / float(sums[4]), "truncation_rate": float(sums[3] / sums[4]),
                "sample_tokens_per_s": global_tokens / max(t_sample, 1e-9),
                "train_tokens_per_s": global_tokens / max(t_train, 1e-9)}
        if d.is_main:
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(last) + "\n")
        bar.set_postfix(rkl=f"{last['reverse_kl']:.3f}", zero=f"{last['zero_ratio']:.2f}")
        done = step + 1
        if stop["signal"] is not None or (args.save_every and done % args.save_every == 0 and done < args.max_steps):
            path = save_training_checkpoint(student, opt, out / f"step-{done}", args.student, state(done), d)
            d.print(f"\nsaved {path}")
        if stop["signal"] is not None:
            d.print(f"stopped by {stop['signal']} after step {done}; resume with --resume")
            return {"stopped": stop["signal"], **last}
    bar.close()
    final = out / "final"
    save_training_checkpoint(student, opt, final, args.student, state(args.max_steps), d)
    summary = {"final": str(final), "steps": args.max_steps, **last}
    if d.is_main:
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--student", type=Path, required=True, help="converted (usually SFT'd) student folder")
    p.add_argument("--teacher", type=Path, required=True, help="the original static model (frozen)")
    p.add_argument("--prompts", type=Path, required=True, help="prompts JSONL ({'messages': ...} or {'prompt': ...})")
    p.add_argument("--out", type=Path, required=True, help="output folder (checkpoints, metrics.jsonl)")
    p.add_argument("--max-steps", type=int, default=321, help="optimizer steps (paper: 321)")
    p.add_argument("--prompts-per-step", type=int, default=16, help="prompts per step, over all ranks (paper: 16)")
    p.add_argument("--samples-per-prompt", type=int, default=2, help="answers sampled per prompt (paper: 2)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="answer length limit (longer: truncated)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (paper: 1)")
    p.add_argument("--loss", default="ppo", choices=["ppo", "full-reverse-kl"],
                   help="ppo: sampled-token reverse-KL advantage, PPO-clipped; full-reverse-kl: exact KL over V")
    p.add_argument("--clip", type=float, default=0.2, help="PPO ratio clip")
    p.add_argument("--lr", type=float, default=5e-6, help="constant learning rate (paper: 5e-6 Qwen, 1e-6 GLM)")
    add_training_args(p)
    p.add_argument("--seed", type=int, default=0, help="prompt order and sampling seed")
    args = p.parse_args(argv)
    args.dtype = getattr(torch, args.dtype)
    return args


def main(argv=None) -> int:
    return run_training("train_opd.py", train, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
