"""Stage 1 of ZEDA: SFT of the converted student on teacher rollouts (docs/method.md §3, §4).

    python train_sft.py --student runs/student --rollouts rollouts.jsonl --out runs/sft
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

Data: every rollout is rendered through the student's chat template (data.encode_conversations: a thinking
model's <think> reasoning as its template writes it; loss on the answer and its end-of-turn token). Lines marked
`"finished": false` (cut at the answer limit) are dropped and counted unless --keep-unfinished, which trains on
them with no end token. --show-examples N prints the first N examples, loss tokens marked, and exits.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

import zeda
from zeda.baselines import parse_routing, set_routing
from zeda.data import Example, collate, encode_conversations, iter_records, messages_of, step_indices
from zeda.distributed import Dist
from zeda.errors import DataError, UsageError, ZedaError, exit_status
from zeda.flags import add_chat_template_kwargs, float_range, int_range
from zeda.flops import expert_counts
from zeda.loading import load_tokenizer
from zeda.losses import auxiliary_loss, response_cross_entropy
from zeda.trainer import Swaps, Trainer, add_training_args, lr_at, run_training, zero_share_metrics

DEFAULT_MAX_SEQ_LEN = 4096  # tokens per training sequence unless --max-seq-len: the activations grow with it

# ----------------------------------------------------------------------------- data

def load_rollouts(path: Path, tokenizer, vocab_size: int, max_seq_len: int, truncate: bool,
                  drop_incorrect: bool = False, keep_unfinished: bool = False,
                  chat_template_kwargs: dict | None = None):
    """Rollout JSONL -> examples rendered by the chat template (data.encode_conversations). Returns (examples,
    counts of dropped/truncated/too-long). Lines marked `"finished": false` (answers cut at the answer limit) are
    dropped unless keep_unfinished, which trains on them with no end token; drop_incorrect skips lines marked
    `"correct": false` (rollout.py marks answers to prompts with a reference)."""
    conversations, finished, where = [], [], []
    marked = incorrect = unfinished = total = 0
    for lineno, rec in iter_records(path):
        total += 1
        messages = messages_of(rec, path, lineno)
        if messages[-1]["role"] != "assistant":
            raise DataError(f"{path}:{lineno}: no assistant message at the end (a rollout needs the teacher's answer)")
        for field in ("correct", "finished"):
            if field in rec and not isinstance(rec[field], bool):
                raise DataError(f"{path}:{lineno}: '{field}' must be true or false, not {rec[field]!r}")
        marked += "correct" in rec
        if drop_incorrect and rec.get("correct") is False:
            incorrect += 1
            continue
        done = rec.get("finished", True)
        if not done and not keep_unfinished:
            unfinished += 1
            continue
        conversations.append(messages)
        finished.append(done)
        where.append(f"{path}:{lineno}")
    if drop_incorrect and not marked:
        raise DataError(f"{path}: --drop-incorrect, but no line has a 'correct' field (rollout.py writes one when "
                         f"the prompt record has a reference answer)")
    if not conversations:
        reasons = [f"{unfinished} unfinished (\"finished\": false; --keep-unfinished keeps them)"] if unfinished else []
        reasons += [f"{incorrect} incorrect"] if incorrect else []
        raise DataError(f"{path}: no usable rollouts" + (f": of {total}, dropped {' and '.join(reasons)}"
                                                          if reasons else " (empty dataset)"))
    examples = encode_conversations(tokenizer, conversations, finished, chat_template_kwargs, where)
    biggest = max(max(e.ids) for e in examples)
    if biggest >= vocab_size:
        bad = next(e.where for e in examples if max(e.ids) == biggest)
        raise DataError(f"{bad}: token id {biggest} >= the model's vocab_size {vocab_size}: the rollouts' "
                         f"tokenizer does not fit the student")
    kept, counts = [], {"rollouts": total, "dropped_incorrect": incorrect, "dropped_unfinished": unfinished,
                        "kept_unfinished": finished.count(False), "truncated": 0, "dropped_too_long": 0}
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
        raise DataError(f"{path}: every rollout is longer than --max-seq-len {max_seq_len}")
    return kept, counts


def describe_counts(path: Path, counts: dict, used: int) -> str:
    """The data line a run starts with: how many rollouts it trains on and why the others are left out."""
    return (f"{path}: {counts['rollouts']} rollouts, {used} used; dropped {counts['dropped_unfinished']} unfinished "
            f"(cut at the answer limit; --keep-unfinished keeps them), {counts['dropped_incorrect']} incorrect, "
            f"{counts['dropped_too_long']} too long; {counts['truncated']} truncated, {counts['kept_unfinished']} "
            f"unfinished kept without an end token")


LOSS_OPEN, LOSS_CLOSE = "[[loss>", "<loss]]"  # around the loss tokens when stdout is not a terminal
GREEN, RESET = "\033[32m", "\033[0m"


def render_example(tokenizer, e: Example, color: bool) -> str:
    """One training example as text, its loss tokens (answer + end token) marked: green on a terminal, between
    [[loss> and <loss]] otherwise."""
    prompt = tokenizer.decode(e.ids[:e.num_prompt], skip_special_tokens=False)
    answer = tokenizer.decode(e.ids[e.num_prompt:], skip_special_tokens=False)
    return prompt + (f"{GREEN}{answer}{RESET}" if color else f"{LOSS_OPEN}{answer}{LOSS_CLOSE}")


def show_examples(args) -> int:
    """--show-examples N: print the first N training examples as rendered, loss tokens marked; no weights read."""
    try:
        cfg = zeda.ModelConfig.from_hf_config(args.student)
        tokenizer = load_tokenizer(args.student)
        examples, counts = load_rollouts(args.rollouts, tokenizer, cfg.vocab_size, max_seq_len(args, cfg),
                                         args.truncate, args.drop_incorrect, args.keep_unfinished,
                                         args.chat_template_kwargs)
    except (ZedaError, OSError) as e:
        print(f"train_sft.py: error: {e}", file=sys.stderr)
        return 2
    print(describe_counts(args.rollouts, counts, len(examples)))
    color = sys.stdout.isatty()
    for i, e in enumerate(examples[:args.show_examples], start=1):
        print(f"--- example {i} ({e.where}): {e.num_prompt} prompt tokens, {len(e.ids) - e.num_prompt} loss tokens")
        print(render_example(tokenizer, e, color))
    return 0


def micro_batches(examples, indices: list[int], micro: int, d: Dist):
    """This rank's micro-batches: the global batch sorted by length, cut into micro-batches taken in turn."""
    ordered = sorted(indices, key=lambda i: len(examples[i].ids))
    chunks = [ordered[i:i + micro] for i in range(0, len(ordered), micro)]
    return [[examples[i] for i in c] for c in chunks[d.dp_rank::d.dp]]


# ----------------------------------------------------------------------------- training

def sft_step(model, batches: list[list[Example]], args, d: Dist, pad_id: int,
             routing_loss=auxiliary_loss) -> dict:
    """Forward and backward of one global batch's micro-batches on this rank (docs/method.md §4): response-only
    cross-entropy normalised by the response tokens of the whole global batch, plus the Group Auxiliary Loss.
    Returns the step's metrics, reduced over the data-parallel ranks."""
    cfg = model.config
    local_tokens = sum(sum(len(e.ids) - e.num_prompt for e in b) for b in batches)
    global_tokens = float(d.all_reduce(torch.tensor(float(local_tokens))))
    # Logged sums stay on the device over the micro-batches: one host sync per step, not per micro-batch.
    loss_sums = torch.zeros(2, dtype=torch.float64, device=d.device)  # [ce, ga]
    counts_LE = torch.zeros(cfg.num_moe_layers, cfg.num_router_outputs + 1, dtype=torch.long, device=d.device)
    for b in batches:
        ids, attn, loss_mask = (t.to(d.device) for t in collate(b, pad_id))
        routing = []
        logp = model(ids[:, :-1], attention_mask=attn[:, :-1], routing=routing, targets=ids[:, 1:])  # [B, T-1]
        # x world: gradients are averaged over ranks, the sum over ranks must be the global mean.
        ce = response_cross_entropy(logp, loss_mask, normalizer=global_tokens / d.dp)
        # Routed tokens that count: every input position whose next token is real. (attn[:, :-1] would also
        # count a sequence's final token unless it is the longest in its micro-batch: batching-dependent.)
        valid = attn[:, 1:].reshape(-1).bool()
        ga = routing_loss(routing, cfg, valid, args.alpha, args.w, d.all_reduce if d.dp > 1 else None,
                          args.ga_counts) / len(batches)
        (ce + ga).backward()
        loss_sums += torch.stack([ce.detach(), ga.detach()]).double()
        counts_LE += expert_counts(routing, valid, cfg.num_router_outputs)
    # Each rank's terms are scaled so that their mean over ranks is the global-batch loss.
    ce_val, ga_val = (d.all_reduce(loss_sums) / d.dp).tolist()  # host sync: logging, once per step
    return {"loss": ce_val + ga_val, "ce": ce_val, "ga": ga_val,
            **zero_share_metrics(counts_LE, cfg.num_experts, d), "tokens": int(global_tokens)}


def max_seq_len(args, cfg: zeda.ModelConfig) -> int:
    """--max-seq-len, checked against the student's context: a longer sequence has no positions to train on."""
    context = cfg.max_position_embeddings
    if args.max_seq_len is None:
        return min(DEFAULT_MAX_SEQ_LEN, context)
    if args.max_seq_len > context:
        raise UsageError(f"--max-seq-len {args.max_seq_len} is longer than the student's context ({context} "
                         f"positions, {args.student / 'config.json'}: max_position_embeddings)")
    return args.max_seq_len


def train(args, d: Dist, stop: dict, swaps: Swaps) -> dict:
    student_cfg = zeda.ModelConfig.from_hf_config(args.student)
    args.max_seq_len = max_seq_len(args, student_cfg)
    if student_cfg.num_zero_experts == 0 and parse_routing(swaps.routing, student_cfg.num_experts_per_tok) is None:
        raise UsageError(f"{args.student / 'config.json'}: not a converted checkpoint (no zce_nums); run convert.py "
                         f"first")
    tokenizer = load_tokenizer(args.student)
    rollouts = args.rollouts
    examples, data_counts = load_rollouts(rollouts, tokenizer, student_cfg.vocab_size, args.max_seq_len,
                                          args.truncate, args.drop_incorrect, args.keep_unfinished,
                                          args.chat_template_kwargs)
    d.print(describe_counts(rollouts, data_counts, len(examples)))
    G, micro = args.global_batch_size, args.micro_batch_size
    if G % (micro * d.dp):
        raise UsageError(f"--global-batch-size {G} must be a multiple of --micro-batch-size {micro} x {d.dp} ranks")
    if len(examples) < G:
        raise DataError(f"{rollouts}: {len(examples)} usable rollouts, fewer than one global batch ({G})")
    total_steps = args.max_steps or args.epochs * (len(examples) // G)
    trainer = Trainer("sft", args, d, stop, init_from=args.student, total_steps=total_steps)
    model = trainer.load_student()
    set_routing(model, swaps.routing)  # native, or the rule a baseline trains a static model under
    model.train()
    warmup = int(args.warmup_ratio * total_steps)
    pad_id = tokenizer.pad_token_id or 0

    def step_fn(step: int) -> dict:
        indices = step_indices(len(examples), step, G, args.seed)
        return sft_step(model, micro_batches(examples, indices, micro, d), args, d, pad_id,
                        swaps.routing_loss or auxiliary_loss)

    return trainer.run(step_fn, lambda step: lr_at(step, total_steps, args.lr, warmup, "cosine"),
                       postfix=("loss", "zero_ratio"), summary_extra={**data_counts, "examples_used": len(examples)})


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="train_sft.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--student", type=Path, required=True, help="converted checkpoint folder (convert.py output)")
    p.add_argument("--rollouts", type=Path, required=True,
                   help="rollouts JSONL (messages ending with the teacher's answer; rollout.py writes them)")
    p.add_argument("--out", type=Path, required=True, help="output folder (checkpoints, metrics.jsonl)")
    p.add_argument("--max-steps", type=int_range(min=0), default=0, help="optimizer steps (0: --epochs over the data)")
    p.add_argument("--epochs", type=int_range(min=1), default=1, help="epochs when --max-steps is 0 (paper: 1)")
    p.add_argument("--global-batch-size", type=int_range(min=1), default=128,
                   help="sequences per optimizer step (paper: 128)")
    p.add_argument("--micro-batch-size", type=int_range(min=1), default=8,
                   help="sequences per forward/backward on one rank")
    p.add_argument("--lr", type=float_range(above=0), default=2e-5, help="peak learning rate (paper: 2e-5)")
    p.add_argument("--warmup-ratio", type=float_range(min=0, below=1), default=0.1,
                   help="linear warmup share of the steps")
    add_training_args(p)
    p.add_argument("--max-seq-len", type=int_range(min=2), default=None,
                   help=f"longer rollouts are dropped (or --truncate); at most the student's context (default: "
                        f"the context, capped at {DEFAULT_MAX_SEQ_LEN})")
    p.add_argument("--truncate", action="store_true", help="truncate over-long rollouts instead of dropping them")
    p.add_argument("--drop-incorrect", action="store_true",
                   help="skip rollouts marked \"correct\": false (answers checked against the prompt's reference)")
    p.add_argument("--keep-unfinished", action="store_true",
                   help="train on rollouts marked \"finished\": false too (cut at the answer limit), with no end "
                        "token in the loss (default: they are dropped and counted)")
    add_chat_template_kwargs(p)
    p.add_argument("--show-examples", type=int_range(min=1), default=None, metavar="N",
                   help="print the first N training examples as rendered, loss tokens marked, and exit (reads no "
                        "weights)")
    p.add_argument("--seed", type=int_range(min=0), default=0, help="data order seed")
    args = p.parse_args(argv)
    args.dtype = getattr(torch, args.dtype)
    return args


def main(argv=None, swaps: Swaps | None = None) -> int:
    """swaps: what a baseline replaces (experiments/variant.py); None trains the method."""
    args = parse_args(argv)
    if args.show_examples:
        return show_examples(args)
    return run_training("train_sft.py", train, args, swaps)


if __name__ == "__main__":
    sys.exit(exit_status("train_sft.py", main))
