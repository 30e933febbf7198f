"""Stage 1 of ZEDA: SFT of the converted student on teacher rollouts (ZEDA.md §3, §4).

    python train_sft.py --student runs/student --rollouts rollouts.jsonl --out runs/sft
    python train_sft.py --student runs/student --teacher assets/qwen3_moe_teacher --prompts prompts.jsonl --out runs/sft
    torchrun --nproc_per_node=2 train_sft.py --student runs/student --rollouts rollouts.jsonl --out runs/sft

Loss: cross-entropy on the response tokens only (prompt and padding masked), normalised by the response tokens
of the whole global batch, plus the Group Auxiliary Loss (alpha, w) summed over MoE layers with its counts
reduced over the data-parallel ranks. Defaults follow the paper: AdamW betas (0.9, 0.98), weight decay 0.1,
lr 2e-5 cosine to 0 with 10% warmup, grad clip 1.0, global batch 128 sequences, router in fp32.
Global batches are cut from a seeded shuffle of the data; inside one, sequences are sorted by length and split
into micro-batches (length bucketing: little padding), which ranks take in turn; gradient accumulation covers
the rest. --drop-incorrect skips rollouts that rollout.py marked `"correct": false` (the teacher's wrong answers
to prompts with a reference; not in the paper's recipe). Checkpoints (HF layout + optimizer and trainer state,
written atomically) go to OUT/step-N every --save-every steps and OUT/final at the end; --resume continues from
the newest with the same data order. OUT/metrics.jsonl gets one line per step. SIGTERM or Ctrl-C stops after
the current step with a checkpoint; a non-finite loss stops the run naming the step, before anything is saved.
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
from zeda.data import iter_jsonl, prompt_messages, response_of
from zeda.flops import expert_counts
from zeda.generation import add_sampling_args, sampling_from_args
from zeda.losses import group_aux_loss, response_cross_entropy
from zeda.parallel import Dist, clip_grad_norm, load_parallel
from zeda.training import (add_training_args, check_fresh_out, collate, encode_chats, latest_checkpoint,
                           resume_training, lr_at, make_optimizer, run_training, save_training_checkpoint)

# ----------------------------------------------------------------------------- data

def load_rollouts(path: Path, tokenizer, vocab_size: int, max_seq_len: int, truncate: bool,
                  drop_incorrect: bool = False):
    """Rollout JSONL -> encoded examples. Returns (examples, counts of dropped/truncated/too-long).
    drop_incorrect skips lines marked `"correct": false` (rollout.py marks answers to prompts with a reference)."""
    prompts, responses, lines = [], [], []
    marked = incorrect = 0
    for lineno, rec in iter_jsonl(path):
        response = response_of(rec, path, lineno)
        if response is None:
            raise ValueError(f"{path}:{lineno}: no assistant message at the end (a rollout needs the teacher's answer)")
        if "correct" in rec:
            marked += 1
            if not isinstance(rec["correct"], bool):
                raise ValueError(f"{path}:{lineno}: 'correct' must be true or false, not {rec['correct']!r}")
        if drop_incorrect and rec.get("correct") is False:
            incorrect += 1
            continue
        prompts.append(prompt_messages(rec, path, lineno))
        responses.append(response)
        lines.append(lineno)
    if drop_incorrect and not marked:
        raise ValueError(f"{path}: --drop-incorrect, but no line has a 'correct' field (rollout.py writes one when "
                         f"the prompt record has a reference answer)")
    if not prompts:
        raise ValueError(f"{path}: empty dataset (no rollouts" + (", or none correct)" if incorrect else ")"))
    examples = encode_chats(tokenizer, prompts, responses)
    biggest = max(max(e.ids) for e in examples)
    if biggest >= vocab_size:
        bad = next(line for line, e in zip(lines, examples) if max(e.ids) == biggest)
        raise ValueError(f"{path}:{bad}: token id {biggest} >= the model's vocab_size {vocab_size}: the rollouts' "
                         f"tokenizer does not fit the student")
    kept, counts = [], {"rollouts": len(examples) + incorrect, "dropped_incorrect": incorrect, "truncated": 0,
                        "dropped_too_long": 0}
    for e in examples:
        if len(e.ids) > max_seq_len:
            if truncate and e.num_prompt < max_seq_len:
                e.ids = e.ids[:max_seq_len]
                counts["truncated"] += 1
            else:
                counts["dropped_too_long"] += 1
                continue
        kept.append(e)
    if not kept:
        raise ValueError(f"{path}: every rollout is longer than --max-seq-len {max_seq_len}")
    return kept, counts


def global_batch_indices(n: int, step: int, global_batch: int, seed: int) -> list[int]:
    """The example indices of global batch `step`: epochs are seeded shuffles, so any step can be recomputed
    (this is what makes --resume continue with the same data order)."""
    per_epoch = n // global_batch
    epoch, k = divmod(step, per_epoch)
    order = list(range(n))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order[k * global_batch:(k + 1) * global_batch]


def micro_batches(examples, indices: list[int], micro: int, d: Dist):
    """This rank's micro-batches: the global batch sorted by length, cut into micro-batches taken in turn."""
    ordered = sorted(indices, key=lambda i: len(examples[i].ids))
    chunks = [ordered[i:i + micro] for i in range(0, len(ordered), micro)]
    return [[examples[i] for i in c] for c in chunks[d.dp_rank::d.dp]]


# ----------------------------------------------------------------------------- training

def train(args, d: Dist, stop: dict) -> dict:
    from transformers import AutoTokenizer

    out: Path = args.out
    student_cfg = zeda.ModelConfig.from_hf_config(args.student)
    if student_cfg.num_zero_experts == 0:
        raise ValueError(f"{args.student / 'config.json'}: not a converted checkpoint (no zce_nums); run convert.py "
                         f"first")
    tokenizer = AutoTokenizer.from_pretrained(args.student)
    rollouts = args.rollouts
    if rollouts is None:  # --teacher/--prompts: sample the rollouts first (rank 0), resumable
        rollouts = out / "rollouts.jsonl"
        if d.is_main:
            from rollout import rollout

            teacher = zeda.load_model(args.teacher)
            params = sampling_from_args(args, args.max_new_tokens, prefix="rollout-")
            with torch.no_grad():
                stats = rollout(teacher, AutoTokenizer.from_pretrained(args.teacher), args.prompts, rollouts, params,
                                seed=args.seed)
            d.print(f"rollouts: {stats}")
            del teacher
        d.barrier()
    examples, data_counts = load_rollouts(rollouts, tokenizer, student_cfg.vocab_size, args.max_seq_len,
                                          args.truncate, args.drop_incorrect)
    G, micro = args.global_batch_size, args.micro_batch_size
    if G % (micro * d.dp):
        raise ValueError(f"--global-batch-size {G} must be a multiple of --micro-batch-size {micro} x {d.dp} ranks")
    if len(examples) < G:
        raise ValueError(f"{rollouts}: {len(examples)} usable rollouts, fewer than one global batch ({G})")
    total_steps = args.max_steps or args.epochs * (len(examples) // G)

    check_fresh_out(out, args.resume)
    resume_from = latest_checkpoint(out) if args.resume else None
    if args.resume and resume_from is None:
        d.print(f"--resume: no checkpoint in {out} yet; starting from step 0")
    # Split over the mesh as it loads (tp, ep, fsdp; nothing on one rank); router in fp32 (paper recipe).
    model = load_parallel(resume_from or args.student, d, args.dtype, args.activation_checkpointing,
                          router_fp32=True, expert_backend=args.expert_backend)
    model.train()
    cfg = model.config
    opt = make_optimizer(model, args.lr, betas=(args.beta1, args.beta2), weight_decay=args.weight_decay)
    start_step = 0
    if resume_from is not None:
        start_step = resume_training(opt, model, resume_from, d)
        d.print(f"resuming from {resume_from} at step {start_step}")
    if d.is_main:
        out.mkdir(parents=True, exist_ok=True)
    warmup = int(args.warmup_ratio * total_steps)


    def state(step):
        return {"step": step, "total_steps": total_steps, "seed": args.seed, "mesh": d.dims.describe(),
                "args": {k: str(v) for k, v in vars(args).items()}}

    metrics_path = out / "metrics.jsonl"
    bar = tqdm(range(start_step, total_steps), initial=start_step, total=total_steps, desc="sft", unit="step",
               disable=not d.is_main)
    last = {}
    for step in bar:
        t0 = time.time()
        lr = lr_at(step, total_steps, args.lr, warmup, "cosine")
        for group in opt.param_groups:
            group["lr"] = lr
        batches = micro_batches(examples, global_batch_indices(len(examples), step, G, args.seed), micro, d)
        local_tokens = sum(sum(len(e.ids) - e.num_prompt for e in b) for b in batches)
        global_tokens = float(d.all_reduce(torch.tensor(float(local_tokens))))
        opt.zero_grad(set_to_none=True)
        # Logged sums stay on the device over the micro-batches: one host sync per step, not per micro-batch.
        loss_sums = torch.zeros(2, dtype=torch.float64, device=d.device)  # [ce, ga]
        counts_LE = torch.zeros(cfg.num_moe_layers, cfg.num_router_outputs, dtype=torch.long, device=d.device)
        for b in batches:
            ids, attn, loss_mask = collate(b, tokenizer.pad_token_id or 0)
            ids, attn, loss_mask = ids.to(d.device), attn.to(d.device), loss_mask.to(d.device)
            routing = []
            logits = model(ids[:, :-1], attention_mask=attn[:, :-1], routing=routing)
            # x world: gradients are averaged over ranks, the sum over ranks must be the global mean.
            ce = response_cross_entropy(logits, ids[:, 1:], loss_mask, normalizer=global_tokens / d.dp)
            # Routed tokens that count: every input position whose next token is real. (attn[:, :-1] would also
            # count a sequence's final token unless it is the longest in its micro-batch: batching-dependent.)
            valid = attn[:, 1:].reshape(-1).bool()
            ga = group_aux_loss(routing, cfg.num_experts, cfg.num_zero_experts, valid, cfg.router_scoring,
                                args.alpha, args.w, d.all_reduce if d.dp > 1 else None) / len(batches)
            (ce + ga).backward()
            loss_sums += torch.stack([ce.detach(), ga.detach()]).double()
            counts_LE += expert_counts(routing, valid, cfg.num_router_outputs)
        d.average_gradients(model)
        # Each rank's terms are scaled so that their mean over ranks is the global-batch loss.
        ce_val, ga_val = (d.all_reduce(loss_sums) / d.dp).tolist()  # host sync: logging, once per step
        if not math.isfinite(ce_val + ga_val):
            raise FloatingPointError(f"non-finite loss at step {step + 1} (ce {ce_val}, ga {ga_val}); stopping without "
                                     f"saving. Last good checkpoint: {latest_checkpoint(out)}")
        grad_norm = clip_grad_norm(model, args.grad_clip, d)
        opt.step()
        counts_LE = d.all_reduce(counts_LE).double()
        layer_real = counts_LE[:, :cfg.num_experts].sum(1)
        layer_zero = counts_LE[:, cfg.num_experts:].sum(1)
        per_layer = (layer_zero / (layer_real + layer_zero).clamp(min=1)).tolist()
        zero_ratio = float(layer_zero.sum() / (layer_real + layer_zero).sum().clamp(min=1))
        seconds = time.time() - t0
        last = {"step": step + 1, "lr": lr, "loss": ce_val + ga_val, "ce": ce_val, "ga": ga_val,
                "grad_norm": float(grad_norm), "zero_ratio": zero_ratio, "zero_ratio_per_layer": per_layer,
                "tokens": int(global_tokens), "tokens_per_s": global_tokens / seconds}
        if d.is_main:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(last) + "\n")
        bar.set_postfix(loss=f"{last['loss']:.3f}", zero=f"{zero_ratio:.2f}")
        done = step + 1
        if stop["signal"] is not None or (args.save_every and done % args.save_every == 0 and done < total_steps):
            path = save_training_checkpoint(model, opt, out / f"step-{done}", args.student, state(done), d)
            d.print(f"\nsaved {path}")
        if stop["signal"] is not None:
            d.print(f"stopped by {stop['signal']} after step {done}; resume with --resume")
            return {"stopped": stop["signal"], "step": done, **last}
    bar.close()
    final = out / "final"
    save_training_checkpoint(model, opt, final, args.student, state(total_steps), d)
    summary = {"final": str(final), "steps": total_steps, **data_counts, "examples_used": len(examples), **last}
    if d.is_main:
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--student", type=Path, required=True, help="converted checkpoint folder (convert.py output)")
    p.add_argument("--rollouts", type=Path, help="rollouts JSONL (messages ending with the teacher's answer)")
    p.add_argument("--teacher", type=Path, help="teacher folder: sample rollouts first (with --prompts)")
    p.add_argument("--prompts", type=Path, help="prompts JSONL for --teacher")
    p.add_argument("--out", type=Path, required=True, help="output folder (checkpoints, metrics.jsonl)")
    p.add_argument("--max-steps", type=int, default=0, help="optimizer steps (0: --epochs over the data)")
    p.add_argument("--epochs", type=int, default=1, help="epochs when --max-steps is 0 (paper: 1)")
    p.add_argument("--global-batch-size", type=int, default=128, help="sequences per optimizer step (paper: 128)")
    p.add_argument("--micro-batch-size", type=int, default=8, help="sequences per forward/backward on one rank")
    p.add_argument("--lr", type=float, default=2e-5, help="peak learning rate (paper: 2e-5)")
    p.add_argument("--warmup-ratio", type=float, default=0.1, help="linear warmup share of the steps")
    add_training_args(p)
    p.add_argument("--max-seq-len", type=int, default=4096, help="longer rollouts are dropped (or --truncate)")
    p.add_argument("--truncate", action="store_true", help="truncate over-long rollouts instead of dropping them")
    p.add_argument("--drop-incorrect", action="store_true",
                   help="skip rollouts marked \"correct\": false (answers checked against the prompt's reference)")
    p.add_argument("--seed", type=int, default=0, help="data order and rollout sampling seed")
    p.add_argument("--max-new-tokens", type=int, default=256, help="rollout answer limit (--teacher mode)")
    add_sampling_args(p, prefix="rollout-")  # --rollout-temperature/-top-p/-top-k (--teacher mode)
    args = p.parse_args(argv)
    if (args.rollouts is None) == (args.teacher is None or args.prompts is None):
        p.error("give --rollouts FILE, or --teacher DIR with --prompts FILE")
    args.dtype = getattr(torch, args.dtype)
    return args


def main(argv=None) -> int:
    return run_training("train_sft.py", train, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
