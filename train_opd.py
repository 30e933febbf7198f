"""Stage 2 of ZEDA: on-policy distillation of the SFT student from the frozen static teacher (docs/method.md §5).

    python train_opd.py --student runs/sft/final --teacher assets/qwen3_moe_teacher --prompts p.jsonl --out runs/opd
    torchrun --nproc_per_node=2 train_opd.py --student ... --teacher ... --prompts ... --out runs/opd
    python train_opd.py --student ... --teacher-url http://127.0.0.1:8000 --prompts ... --out runs/opd

Each rollout batch:
  1. the current student samples --samples-per-prompt answers (temperature 1) to --prompts-per-step prompts,
     with the shared generation engine (zeda/generation.py), keeping the log-prob of every sampled token (under
     --fsdp with the student gathered once for the whole phase, not at every decoded token; with
     --routing-replay also the experts every token was routed to);
  2. the frozen teacher (the original static model, in process, no gradients) scores the sampled tokens; with
     --teacher-url an OpenAI-compatible server that serves it does (served_teacher_logprobs), once per rollout;
  3. per-token advantage A_t = log p_teacher(y_t) - log p_student_old(y_t), detached, no discount -- a one-sample
     estimate of the negative reverse KL at each position;
  4. --updates-per-rollout K optimizer steps (the paper: 1), each on a K-th of the batch, on the PPO-clipped
     policy-gradient loss (clip 0.2) over the response tokens, each answer's mean over its tokens then the mean
     over answers (--loss-aggregation), plus the Group Auxiliary Loss. The old policy's log-probs come from a
     training-mode forward, not the sampler: with K = 1 the training forward's own, detached (the weights have
     not moved since sampling: ratio 1), so a step runs one student and one teacher forward; with K > 1 a
     no-grad forward over the whole batch before its first update, and the later updates' ratios leave 1.
Forwards and backward run over micro-batches of at most --max-tokens-per-micro-batch padded tokens, with the
loss normalised over the whole update, so the cap changes memory, not the result (up to the Group Auxiliary
Loss's f, counted per micro-batch as the authors do).
(The exact KL(p_student || p_teacher) over the vocabulary, an ablation of 3-4, is swapped in by
experiments/variant.py --loss full-reverse-kl.) EOS-terminated and truncated answers
are both trained on; truncations are counted. Defaults follow the paper: 16 prompts x 2 samples per rollout,
one update each, constant lr 5e-6 (Qwen; the paper uses 1e-6 for GLM), AdamW (0.9, 0.98). Outputs are as
train_sft.py's: OUT/step-N and OUT/final checkpoints (atomic), --resume (prompt order and sampling seeds are
functions of the rollout, so a resumed run samples what the uninterrupted one would have; checkpoints and signal
stops fall between rollouts), OUT/metrics.jsonl, clean stop on SIGTERM/Ctrl-C, a non-finite loss stops the run
naming the step.
"""

from __future__ import annotations

import argparse
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.distributed.fsdp import FSDPModule

import zeda
from zeda.data import Example, collate, encode_chats, iter_records, prompt_messages, step_indices
from zeda.distributed import Dist
from zeda.errors import DataError, UsageError, ZedaError, exit_status
from zeda.flags import add_chat_template_kwargs, float_range, int_range
from zeda.flops import expert_counts
from zeda.generation import generate
from zeda.loading import load_model, load_tokenizer, same_tokenizer
from zeda.losses import AGGREGATIONS, auxiliary_loss, ppo_clip_loss, reverse_kl_advantage
from zeda.model import token_logprobs
from zeda.remote import Server, add_connection_args, check_token_texts, prompt_logprobs, unordered_map
from zeda.sampling import SamplingParams
from zeda.trainer import Swaps, Trainer, add_training_args, run_training, zero_share_metrics


def load_prompts(path: Path, tokenizer, max_prompt_len: int, strict: bool = False,
                 chat_template_kwargs: dict | None = None) -> tuple[list[Example], list[str]]:
    """Prompts JSONL -> chat-templated prompt ids, and the file:line of those skipped because they leave no room
    to answer within the context (strict: refused instead, naming the first)."""
    lines, messages = [], []
    for lineno, rec in iter_records(path):
        lines.append(lineno)
        messages.append(prompt_messages(rec, path, lineno))
    if not messages:
        raise DataError(f"{path}: no prompts")
    kept, too_long = [], []
    for lineno, e in zip(lines, encode_chats(tokenizer, messages, chat_template_kwargs=chat_template_kwargs)):
        if len(e.ids) <= max_prompt_len:
            kept.append(e)
        elif strict:
            raise DataError(f"{path}:{lineno}: prompt of {len(e.ids)} tokens leaves no room for --max-new-tokens "
                             f"(context limit {max_prompt_len} for the prompt)")
        else:
            too_long.append(f"{path}:{lineno}")
    if not kept:
        raise DataError(f"{path}: every prompt is longer than the context leaves room for ({max_prompt_len} tokens "
                         f"with --max-new-tokens)")
    return kept, too_long


def show_prompts(args) -> int:
    """--show-examples N: the first N prompts as the student will see them (chat template and its options
    applied); no weights read."""
    try:
        cfg = zeda.ModelConfig.from_hf_config(args.student)
        tokenizer = load_tokenizer(args.student)
        prompts, too_long = load_prompts(args.prompts, tokenizer, cfg.max_position_embeddings - args.max_new_tokens,
                                         args.strict, args.chat_template_kwargs)
    except (ZedaError, OSError) as e:
        print(f"train_opd.py: error: {e}", file=sys.stderr)
        return 2
    print(f"{args.prompts}: {len(prompts)} prompts used, {len(too_long)} skipped as too long")
    for i, e in enumerate(prompts[:args.show_examples], start=1):
        print(f"--- prompt {i}: {len(e.ids)} tokens; the student answers after it")
        print(tokenizer.decode(e.ids, skip_special_tokens=False))
    return 0


def align(values, examples: list[Example], shape, device=None) -> torch.Tensor:
    """Per-answer-token values (a list or a 1D tensor per sequence) -> [B, T-1] aligned with collate's loss mask
    (target t+1 at column t)."""
    out = torch.zeros(shape, device=device)
    for b, (vals, e) in enumerate(zip(values, examples)):
        out[b, e.num_prompt - 1:e.num_prompt - 1 + len(vals)] = torch.as_tensor(vals, dtype=out.dtype, device=device)
    return out


def micro_batches(examples: list[Example], max_tokens: int, d: Dist) -> list[list[int]]:
    """This rank's sequences (indices) in micro-batches whose padded size, rows x longest, is at most max_tokens
    (0: one micro-batch); a sequence longer than that is a micro-batch of its own. Sorted by length first, so
    that sequences of like length share one (little padding). Every rank gets as many micro-batches as the rank
    that needs the most: each forward is a collective (GA's counts over dp, FSDP's gathers, ep's all-to-all)."""
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].ids))
    batches: list[list[int]] = [[]]
    for i in order:  # ascending: sequence i is the longest of the micro-batch it joins
        if batches[-1] and max_tokens and (len(batches[-1]) + 1) * len(examples[i].ids) > max_tokens:
            batches.append([])
        batches[-1].append(i)
    if d.dp > 1:
        counts = torch.zeros(d.dp, device=d.device)
        counts[d.dp_rank] = len(batches)  # each rank's count in its own slot: the sum over ranks shows them all
        needed = int(d.all_reduce(counts).max())  # never more than the sequences a rank holds
        while len(batches) < needed:  # halve the micro-batch with the most rows (stays within the cap)
            big = max(range(len(batches)), key=lambda j: len(batches[j]))
            half = len(batches[big]) // 2
            batches[big:big + 1] = [batches[big][:half], batches[big][half:]]
    return batches


def replay_routing(routed_ids: list[torch.Tensor], shape, device) -> torch.Tensor:
    """The sampler's expert ids, per sequence [L, n, K] for its first n tokens, as [L, B, T, K] for the batch
    (shape = (B, T) of its input ids); -1 (the router chooses) where the sampler never processed a token: the
    last answer token (it is never fed back) and padding."""
    L, _, K = routed_ids[0].shape
    forced_LBTK = torch.full((L, *shape, K), -1, dtype=torch.long, device=device)
    for b, ids_LnK in enumerate(routed_ids):
        forced_LBTK[:, b, :ids_LnK.shape[1]] = ids_LnK.to(device)
    return forced_LBTK


def clip_binds(new_logp, old_logp, advantages, clip: float) -> torch.Tensor:
    """Where the PPO clip takes the gradient away: the ratio has left [1 - clip, 1 + clip] in the direction the
    advantage pushes it (the clipped term is then the smaller, and constant)."""
    ratio = torch.exp(new_logp - old_logp)
    return ((ratio > 1 + clip) & (advantages > 0)) | ((ratio < 1 - clip) & (advantages < 0))


@torch.no_grad()
def score_rollout(student, teacher, examples: list[Example], routed_ids, args, d: Dist, pad_id: int):
    """The teacher's and the old policy's log-probs of each sequence's answer tokens (1D tensors), computed once
    for a rollout that several updates train on (--updates-per-rollout > 1): the old policy is the student that
    sampled, in training mode, before any of those updates. teacher None (--teacher-url): the old policy's only,
    and None for the teacher's (served_teacher_logprobs has them)."""
    teacher_logp, old_logp = [None] * len(examples), [None] * len(examples)
    for mb in micro_batches(examples, args.max_tokens_per_micro_batch, d):
        part = [examples[i] for i in mb]
        ids, attn, _ = (t.to(d.device) for t in collate(part, pad_id))
        forced = replay_routing([routed_ids[i] for i in mb], ids.shape, d.device) if routed_ids else None
        t_logp = token_logprobs(teacher, ids, attn) if teacher is not None else None
        s_logp = token_logprobs(student, ids, attn, temperature=args.temperature, forced_routing=forced)
        for b, (i, e) in enumerate(zip(mb, part)):
            answer = slice(e.num_prompt - 1, len(e.ids) - 1)
            old_logp[i] = s_logp[b, answer]
            if t_logp is not None:
                teacher_logp[i] = t_logp[b, answer]
    return (teacher_logp if teacher is not None else None), old_logp


def served_teacher_logprobs(server: Server, model: str, examples: list[Example], concurrency: int,
                            tokenizer=None) -> list[torch.Tensor]:
    """2. with --teacher-url: the teacher's log-probs of each sequence's answer tokens (1D tensors, as
    score_rollout gives them) from the server. Each whole sequence, prompt + answer, goes as token ids to
    /v1/completions with echo and max_tokens 0 (zeda/remote.py:prompt_logprobs), `concurrency` requests at a time;
    the server's numbers are its model's own distribution, temperature 1, as the in-process teacher's. With a
    tokenizer, the server's text of every token is checked against it (zeda/remote.py:check_token_texts)."""
    def score(e: Example):
        return prompt_logprobs(server, model, e.ids)

    out = [None] * len(examples)
    for i, (values, tokens) in unordered_map(score, examples, concurrency):
        if tokenizer is not None:
            check_token_texts(tokens, examples[i].ids, tokenizer, server.base)
        # values[t - 1] = log p(ids[t] | ids[:t]): the answer's tokens are t = num_prompt .. len - 1
        out[i] = torch.tensor(values[examples[i].num_prompt - 1:], dtype=torch.float32)
    return out


def ppo_policy(student, teacher, ids, attn, mask, *, args, norm: float, forced, routing: list, teacher_logp=None,
               old_logp=None):
    """Steps 3-5 on one micro-batch (ids, attn, mask [B, T]; log-probs [B, T-1], answer tokens where mask):
    the teacher's log-probs of the sampled tokens (unless given), the student's at the sampling temperature in a
    training forward (routing collects its routers' outputs; forced replays the sampler's experts), the
    reverse-KL advantage and the PPO-clipped loss, normalised by norm. Returns (loss, the old policy's
    log-probs, the teacher's, the count of clipped answer tokens)."""
    if teacher_logp is None:
        with torch.no_grad():
            teacher_logp = token_logprobs(teacher, ids, attn)  # only the sampled tokens' log-probs
    new_logp = token_logprobs(student, ids, attn, temperature=args.temperature, routing=routing,
                              forced_routing=forced)
    # the behaviour policy: this forward itself while the weights are those that sampled
    old = new_logp.detach() if old_logp is None else old_logp
    advantages = reverse_kl_advantage(teacher_logp, old)
    loss = ppo_clip_loss(new_logp, old, advantages, mask.float(), args.clip, norm, args.loss_aggregation)
    clipped = (clip_binds(new_logp.detach(), old, advantages, args.clip) & mask).sum()
    return loss, old, teacher_logp, clipped


def opd_step(student, teacher, examples: list[Example], sampler_logp: list[list[float]] | None, args, d: Dist,
             pad_id: int, global_count: float, teacher_logp=None, old_logp=None, routed_ids=None,
             policy_loss=ppo_policy, routing_loss=auxiliary_loss) -> dict:
    """Forward and backward of one update's sequences on this rank (docs/method.md §5, steps 2-5).

    The old policy is the student that sampled, scored by a training-mode forward as the authors do, not by the
    sampler: the KV-cache decode rounds differently (in bf16 by up to ~0.15 nats a token), and that error would
    enter both the advantage and the PPO ratio. With one update per rollout (old_logp None) the weights have not
    moved since sampling, so the training forward is that forward: its log-probs, detached, are the old ones
    (ratio 1, one forward fewer). With several, score_rollout computed teacher_logp and old_logp once per rollout
    (per sequence, answer tokens); the teacher is otherwise scored here. The student's log-probs are taken at
    the sampling temperature (logits / T: the policy that sampled), the teacher's at 1. The sampler's log-probs
    only feed the metric sampler_logp_gap. routed_ids (--routing-replay): per sequence, the experts the sampler
    chose, which the student's forward then uses.

    Runs over micro-batches of at most --max-tokens-per-micro-batch padded tokens, one backward each. The policy
    loss is normalised by global_count -- the response tokens (--loss-aggregation token) or sequences (sequence)
    of this update over all ranks -- so the micro-batches add up to the one-forward loss. The Group Auxiliary
    Loss counts f per micro-batch, as the authors do, and weighs each by its share of the update's tokens.
    policy_loss and routing_loss are the method's unless an ablation swaps them (experiments/variant.py)."""
    cfg = student.config
    norm = global_count / d.dp  # x world: the mean over ranks of each rank's loss is the global mean
    batches = micro_batches(examples, args.max_tokens_per_micro_batch, d)
    tokens_M = d.all_reduce(torch.tensor([float(sum(len(examples[i].ids) for i in mb)) for mb in batches],
                                         dtype=torch.float64, device=d.device))
    sums = torch.zeros(5, dtype=torch.float64, device=d.device)  # policy, ga, reverse KL, sampler gap, clipped
    counts_LE = torch.zeros(cfg.num_moe_layers, cfg.num_router_outputs + 1, dtype=torch.long, device=d.device)
    for mb, share in zip(batches, (tokens_M / tokens_M.sum()).tolist()):
        part = [examples[i] for i in mb]
        ids, attn, mask = (t.to(d.device) for t in collate(part, pad_id))
        mask_f = mask.float()
        forced = replay_routing([routed_ids[i] for i in mb], ids.shape, d.device) if routed_ids else None
        routing = []
        policy, old, t_logp, clipped = policy_loss(
            student, teacher, ids, attn, mask, args=args, norm=norm, forced=forced, routing=routing,
            teacher_logp=None if teacher_logp is None else align([teacher_logp[i] for i in mb], part, mask.shape,
                                                                 d.device),
            old_logp=None if old_logp is None else align([old_logp[i] for i in mb], part, mask.shape, d.device))
        valid = attn.reshape(-1).bool()  # every real token was routed (the student's forward runs whole sequences)
        ga = share * routing_loss(routing, cfg, valid, args.alpha, args.w, d.all_reduce if d.dp > 1 else None,
                                  args.ga_counts)
        (policy + ga).backward()
        gap = torch.zeros((), device=d.device)
        if sampler_logp is not None:  # how far the sampler's log-probs were from the old policy's (a metric only)
            sampled = align([sampler_logp[i] for i in mb], part, mask.shape, d.device)
            gap = ((sampled - old).abs() * mask_f).sum()
        sums += torch.stack([policy.detach().double(), ga.detach().double(),
                             ((old - t_logp) * mask_f).sum().double(),  # reverse KL estimate, summed over tokens
                             gap.double(), clipped.double()])
        counts_LE += expert_counts(routing, valid, cfg.num_router_outputs)
    return {"sums": sums, "counts_LE": counts_LE}


@contextmanager
def gathered(model):
    """Under FSDP2 (--fsdp), every unit of `model` all-gathered once for the block, not at each forward:
    sampling runs a forward per decoded token, each of which would gather every block again. The block holds
    the whole model on each rank, as inference needs anyway. Nothing happens without FSDP2."""
    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)  # else each forward frees what was gathered
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()
            # back to fully_shard's defaults, as zeda/sharding.py:apply_fsdp leaves them: the root keeps its
            # parameters after forward (its backward follows at once), every other unit frees them
            unit.set_reshard_after_forward(unit is not model, recurse=False)


@dataclass
class Rollout:
    """One rollout batch on this rank: sampled once, trained on by --updates-per-rollout optimizer steps."""

    index: int
    examples: list[Example]  # prompt + answer, in sampling order
    finished: list[bool]
    sampler_logp: list[list[float]]
    routed_ids: list[torch.Tensor] | None  # --routing-replay
    teacher_logp: list[torch.Tensor] | None  # score_rollout (several updates) or the teacher server (--teacher-url)
    old_logp: list[torch.Tensor] | None
    sample_tokens_per_s: float


def train(args, d: Dist, stop: dict, swaps: Swaps) -> dict:
    cfg = zeda.ModelConfig.from_hf_config(args.student)
    if cfg.num_zero_experts == 0:
        raise UsageError(f"{args.student / 'config.json'}: not a converted checkpoint (no zce_nums)")
    server = None
    if args.teacher_url is None:
        teacher_cfg = zeda.ModelConfig.from_hf_config(args.teacher)
        if teacher_cfg.vocab_size != cfg.vocab_size:
            raise UsageError(f"{args.teacher}: vocab_size {teacher_cfg.vocab_size} differs from the student's "
                             f"{cfg.vocab_size}: teacher and student must share the tokenizer")
    else:  # the server's tokenizer cannot be loaded: the first rollout's token texts are checked instead
        server = Server(args.teacher_url, "--teacher-url", args.request_timeout, args.retries)
        teacher_name, teacher_context = server.model(args.teacher_model, "--teacher-model")
        d.print(f"teacher: {teacher_name!r} served at {server.base}")
    tokenizer = load_tokenizer(args.student)
    pad_id = tokenizer.pad_token_id or 0
    eos = sorted({tokenizer.eos_token_id, *cfg.eos_token_id} - {None})
    prompts, too_long = load_prompts(args.prompts, tokenizer, cfg.max_position_embeddings - args.max_new_tokens,
                                     args.strict, args.chat_template_kwargs)
    longest = max(len(p.ids) for p in prompts) + args.max_new_tokens
    if server is None:
        same_tokenizer(tokenizer, load_tokenizer(args.teacher), args.teacher, "the student's",
                       "the teacher scores the student's token ids")
        if teacher_cfg.max_position_embeddings < longest:
            raise UsageError(f"{args.teacher / 'config.json'}: the teacher's context "
                             f"({teacher_cfg.max_position_embeddings} tokens) is shorter than the longest prompt plus "
                             f"--max-new-tokens ({longest}): it cannot score those answers")
    elif teacher_context is not None and teacher_context < longest:
        raise UsageError(f"{server.base}/models: the teacher server's context ({teacher_context} tokens, its "
                         f"max_model_len) is shorter than the longest prompt plus --max-new-tokens ({longest}): it "
                         f"cannot score those answers")
    if too_long:
        d.print(f"{args.prompts}: skipped {len(too_long)} prompt(s) too long for the context with --max-new-tokens "
                f"(--strict refuses them): {', '.join(too_long[:10])}{' ...' if len(too_long) > 10 else ''}")
    if args.prompts_per_step % d.dp:
        raise UsageError(f"--prompts-per-step {args.prompts_per_step} must be a multiple of the {d.dp} ranks")
    per_rank = args.prompts_per_step // d.dp
    K = args.updates_per_rollout
    if per_rank * args.samples_per_prompt % K:
        raise UsageError(f"--updates-per-rollout {K}: the {per_rank * args.samples_per_prompt} sequences per rank "
                         f"(--prompts-per-step {args.prompts_per_step} x --samples-per-prompt "
                         f"{args.samples_per_prompt} over {d.dp} ranks) do not split into {K} equal mini-batches")
    trainer = Trainer("opd", args, d, stop, init_from=args.student, total_steps=args.max_steps)
    student = trainer.load_student()
    if trainer.start_step % K:
        raise UsageError(f"--updates-per-rollout {K}: the checkpoint is at step {trainer.start_step}, inside a "
                         f"rollout; resume with the --updates-per-rollout it was saved with")
    # The frozen teacher, split over the mesh the same way, on the same device (or on its server).
    teacher = None if server is not None else load_model(args.teacher, dtype=args.dtype, dist=d,
                                                         expert_backend=args.expert_backend, trainable=False)
    check_tokens = server is not None  # the server's token texts: checked on this process's first rollout
    sampling = SamplingParams(temperature=args.temperature, max_new_tokens=args.max_new_tokens)

    def sample_rollout(index: int) -> Rollout:
        """1. the current student answers this rollout's prompts (2.-3. once here when several updates share it,
        or when the teacher is a server)."""
        nonlocal check_tokens
        picked = step_indices(len(prompts), index, args.prompts_per_step, args.seed)
        mine = [prompts[i] for i in picked[d.dp_rank * per_rank:(d.dp_rank + 1) * per_rank] for _ in
                range(args.samples_per_prompt)]
        t0 = time.time()
        student.eval()
        # One seed per sample, from its place in the global batch: the samples do not depend on the rank layout,
        # so a dp=2 run samples what a single process samples.
        first = d.dp_rank * len(mine)
        seeds = [((args.seed * 1_000_003 + index) * 1_000_003 + first + i) % 2**63 for i in range(len(mine))]
        with gathered(student):
            gen = generate(student, [p.ids for p in mine], sampling, eos, pad_id, seed=seeds,
                           all_done=d.ep_all_done if d.dims.ep > 1 else None,  # ep ranks decode in lockstep
                           record_routing=args.routing_replay)
        t_sample = time.time() - t0
        tokens = d.all_reduce(torch.tensor(float(sum(len(t) for t in gen.tokens)), dtype=torch.float64,
                                           device=d.device))
        examples = [Example(p.ids + toks, len(p.ids)) for p, toks in zip(mine, gen.tokens)]
        teacher_logp = old_logp = None
        if server is not None:
            teacher_logp = served_teacher_logprobs(server, teacher_name, examples, args.teacher_concurrency,
                                                   tokenizer if check_tokens else None)
            check_tokens = False
        if K > 1 and swaps.reads_rollout_scores:
            student.train()
            scored, old_logp = score_rollout(student, teacher, examples, gen.routed_ids, args, d, pad_id)
            teacher_logp = scored if server is None else teacher_logp
        return Rollout(index, examples, gen.finished, gen.logprobs, gen.routed_ids, teacher_logp, old_logp,
                       float(tokens) / max(t_sample, 1e-9))

    rollout: Rollout | None = None

    def step_fn(step: int) -> dict:
        nonlocal rollout
        index, update = divmod(step, K)
        if rollout is None or rollout.index != index:
            rollout = sample_rollout(index)
        r = rollout

        # This update's K-th of the rollout: every K-th sequence. A rank holds a multiple of K sequences, so the
        # global mini-batch is the same on any mesh.
        def pick(values):
            return None if values is None else values[update::K]

        examples = pick(r.examples)
        n = d.all_reduce(torch.tensor([float(sum(len(e.ids) - e.num_prompt for e in examples)), float(len(examples)),
                                       float(sum(not f for f in pick(r.finished)))], dtype=torch.float64,
                                      device=d.device))
        tokens, sequences, truncated = n.tolist()
        # 2-5. score under teacher and student, backward (the harness steps the optimizer)
        t1 = time.time()
        student.train()
        out = opd_step(student, teacher, examples, pick(r.sampler_logp), args, d, pad_id,
                       sequences if args.loss_aggregation == "sequence" else tokens, pick(r.teacher_logp),
                       pick(r.old_logp), pick(r.routed_ids), swaps.policy_loss or ppo_policy,
                       swaps.routing_loss or auxiliary_loss)
        sums = d.all_reduce(out["sums"])
        policy, ga = float(sums[0]) / d.dp, float(sums[1]) / d.dp
        return {"loss": policy + ga, "policy_loss": policy, "ga": ga, "reverse_kl": float(sums[2]) / max(1.0, tokens),
                "sampler_logp_gap": float(sums[3]) / max(1.0, tokens), "clipfrac": float(sums[4]) / max(1.0, tokens),
                **zero_share_metrics(out["counts_LE"], cfg.num_experts, d),
                "mean_response_length": tokens / sequences, "truncation_rate": truncated / sequences,
                "sample_tokens_per_s": r.sample_tokens_per_s,
                "train_tokens_per_s": tokens / max(time.time() - t1, 1e-9)}

    # Checkpoints and signal stops only between rollouts: a resume always starts a new one.
    return trainer.run(step_fn, lambda step: args.lr, postfix=("reverse_kl", "zero_ratio"), save_multiple=K,
                       summary_extra={"prompts_used": len(prompts), "skipped_too_long": too_long})


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="train_opd.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--student", type=Path, required=True, help="converted (usually SFT'd) student folder")
    p.add_argument("--teacher", type=Path, help="the original static model (frozen)")
    p.add_argument("--teacher-url", metavar="URL",
                   help="instead of --teacher: an OpenAI-compatible server (vLLM, SGLang, zeda's serve.py) serving "
                        "the teacher with the student's tokenizer, e.g. http://127.0.0.1:8000; it scores the "
                        "sampled tokens (/v1/completions, echo, max_tokens 0)")
    p.add_argument("--teacher-model", metavar="NAME",
                   help="--teacher-url: the model name to ask for (default: the only one the server lists)")
    p.add_argument("--teacher-concurrency", type=int_range(min=1), default=16,
                   help="--teacher-url: scoring requests at a time, one sequence each")
    add_connection_args(p, timeout=600.0)
    p.add_argument("--prompts", type=Path, required=True, help="prompts JSONL ({'messages': ...} or {'prompt': ...})")
    p.add_argument("--out", type=Path, required=True, help="output folder (checkpoints, metrics.jsonl)")
    p.add_argument("--max-steps", type=int_range(min=1), default=321, help="optimizer steps (paper: 321)")
    p.add_argument("--prompts-per-step", type=int_range(min=1), default=16,
                   help="prompts per rollout batch, over all ranks (paper: 16)")
    p.add_argument("--samples-per-prompt", type=int_range(min=1), default=2,
                   help="answers sampled per prompt (paper: 2)")
    p.add_argument("--max-new-tokens", type=int_range(min=1), default=256,
                   help="answer length limit (longer: truncated)")
    p.add_argument("--temperature", type=float_range(above=0), default=1.0, help="sampling temperature (paper: 1)")
    p.add_argument("--clip", type=float_range(above=0), default=0.2, help="PPO ratio clip")
    p.add_argument("--updates-per-rollout", type=int_range(min=1), default=1,
                   help="optimizer steps per rollout batch, each on a K-th of it (paper: 1); --max-steps counts "
                        "optimizer steps, and checkpoints fall between rollouts")
    p.add_argument("--max-tokens-per-micro-batch", type=int_range(min=0), default=32768,
                   help="padded tokens (rows x longest) per scoring forward and backward; a longer sequence runs "
                        "alone (the authors' per-GPU cap; 0: no cap). The loss does not change")
    p.add_argument("--routing-replay", action="store_true",
                   help="the training forward routes each sampled token to the experts the sampler chose "
                        "(the authors' --use-rollout-routing-replay; docs/method.md §8)")
    p.add_argument("--loss-aggregation", default="sequence", choices=AGGREGATIONS,
                   help="sequence: each answer's mean over its tokens, then the mean over answers (the authors'); "
                        "token: the mean over all answer tokens")
    p.add_argument("--lr", type=float_range(above=0), default=5e-6,
                   help="constant learning rate (paper: 5e-6 Qwen, 1e-6 GLM)")
    add_training_args(p)
    p.add_argument("--seed", type=int_range(min=0), default=0, help="prompt order and sampling seed")
    add_chat_template_kwargs(p)
    p.add_argument("--strict", action="store_true",
                   help="refuse a prompt too long for the context with --max-new-tokens (default: skip and name it)")
    p.add_argument("--show-examples", type=int_range(min=1), default=0, metavar="N",
                   help="print the first N prompts as rendered for the student and exit (no training)")
    args = p.parse_args(argv)
    if (args.teacher is None) == (args.teacher_url is None):
        p.error("give the teacher as --teacher DIR (in process) or --teacher-url URL (a server), not both"
                if args.teacher is not None else "one of --teacher (a model folder) or --teacher-url (a URL) is "
                                                 "required")
    if args.teacher_url is None and args.teacher_model is not None:
        p.error("--teacher-model names the model a --teacher-url serves; without --teacher-url there is none")
    args.dtype = getattr(torch, args.dtype)
    return args


def main(argv=None, swaps: Swaps | None = None) -> int:
    """swaps: what an ablation replaces (experiments/variant.py); None trains the method."""
    args = parse_args(argv)
    return show_prompts(args) if args.show_examples else run_training("train_opd.py", train, args, swaps)


if __name__ == "__main__":
    sys.exit(exit_status("train_opd.py", main))
