"""Evaluation: accuracy on the task suite or a local benchmark, and what the routing cost (docs/method.md §6).

    model, tokenizer = zeda.load_for_inference("assets/qwen3_moe_teacher")
    report = evaluate_model(model, tokenizer, ("math", "code", "if"), n=300,
                            sampling=SamplingParams(temperature=0.0, max_new_tokens=256), batch_size=32, seed=0)
    report["accuracy"]["average"], report["zero_expert_ratio"], report["expert_flops_reduction"]

What is measured, per run (evaluate.py prints it as a table and writes it as JSON):
- accuracy per task family (tasks.verify on the decoded output) or benchmark (tasks.verify when a record names
  a task family, else data.score_answer against its reference), and the mean over what was evaluated;
- the zero-expert ratio and expert / whole-forward FLOPs, dynamic vs the static original (flops.flop_report),
  over every token the model processed: prompts and generated tokens. `zero_expert_ratio_generated` is the
  same ratio over the generated tokens alone (the forward that produced each one);
- tokens generated and tokens/s over generation wall time (tokenising and verifying excluded).

Prompts are sorted by length before batching, so a batch pads little. Every prompt is checked against the
context (max_position_embeddings - max_new_tokens) before anything runs, and an error names the item
(`bench.jsonl:12`), not its position in some batch; with strict=False (evaluate.py's default) such prompts are
skipped instead, counted and named in the report (`skipped_too_long`, `too_long`), and left out of the accuracy.
chat_template_kwargs (e.g. {"enable_thinking": False}) go to the chat template; answer_regex (data.
compile_answer_regex) picks the final answer of benchmark lines scored by data.score_answer.

"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from tqdm import tqdm

from zeda_toy import tasks
from zeda.config import ModelConfig
from zeda.data import (
    REFERENCE_FIELDS,
    encode_chat,
    iter_records,
    prompt_messages,
    reference_answer,
    score_answer,
    unmatchable_reference,
    write_report,
    write_text_atomic,
)
from zeda.errors import EvaluationError
from zeda.flops import flop_report, merge_stats
from zeda.generation import Generation, generate
from zeda.model import CausalLM
from zeda.sampling import SamplingParams

BENCHMARK = "benchmark"  # the accuracy key of a --benchmark file




# ---------------------------------------------------------------------------------------------------------------
# Tokens that end or pad an answer.


def stop_ids(tokenizer, cfg: ModelConfig) -> set[int]:
    """Tokens that end an answer: the tokenizer's EOS plus config.json's eos_token_id (a list for Qwen3)."""
    ids = set(cfg.eos_token_id)
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def pad_id(tokenizer, cfg: ModelConfig) -> int:
    """What left padding feeds; it is masked out, so any valid id works."""
    for candidate in (tokenizer.pad_token_id, cfg.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return candidate
    return 0


def expert_backend_of(model: CausalLM) -> str:
    return next((block.mlp.experts.backend for block in model.model.layers if block.is_moe), "none")


# ---------------------------------------------------------------------------------------------------------------
# Items: what is asked and how the answer is checked.


@dataclass
class Item:
    group: str  # accuracy key: a task family, or "benchmark"
    where: str  # names the item in errors: "math test item 3", "bench.jsonl:12"
    messages: list[dict]  # the prompt, chat-templated at encode time
    reference: str  # the reference final answer (shown in samples)
    task: tasks.Task | None  # checked with tasks.verify when set, else with data.score_answer
    answer_regex: re.Pattern | None = None  # score_answer's --answer-regex (None: its built-in rules)

    def is_correct(self, output: str) -> bool:
        if self.task is not None:
            return tasks.verify(self.task, output)
        return score_answer(output, self.reference, self.answer_regex)


def check_families(families: Sequence[str]) -> tuple[str, ...]:
    """The families in order, duplicates dropped; EvaluationError for an unknown one."""
    unknown = [f for f in families if f not in tasks.FAMILIES]
    if unknown:
        raise EvaluationError(f"unknown task family {unknown[0]!r}; choose from {', '.join(tasks.FAMILIES)}")
    return tuple(dict.fromkeys(families))


EVAL_SPLITS = ("test", "heldout")


def suite_items(families: Sequence[str], n: int, task_seed: int = 0, split: str = "test") -> list[Item]:
    """n items per family of the test split (or of the held-out slice of the train split, tasks.heldout), the
    same list in every process for a task seed."""
    if split not in EVAL_SPLITS:
        raise EvaluationError(f"unknown split {split!r}; choose from {', '.join(EVAL_SPLITS)}")
    items = []
    for family in families:
        drawn = (tasks.generate(family, "test", n, seed=task_seed) if split == "test"
                 else tasks.heldout(family, n, task_seed))
        for i, task in enumerate(drawn):
            record = tasks.to_prompt_record(task)
            items.append(Item(family, f"{family} {split} item {i}", record["messages"], task.answer, task))
    return items


def record_item(record: dict, messages: list[dict], where: str, answer_regex: re.Pattern | None = None) -> Item | None:
    """The checkable item of one prompt record (authors' format), or None when it has no reference answer.

    A record whose "family" is a zeda task family is checked with tasks.verify (the instruction-following
    family checks constraints, not one string); any other record with data.score_answer."""
    reference = reference_answer(record)
    if reference is None:
        return None
    task = None
    if record.get("family") in tasks.FAMILIES:
        user = [m for m in messages if m["role"] == "user"][-1]  # the task prompt, after any system turn
        task = tasks.task_from_record({"family": record["family"], "messages": [user], "answer": reference})
        try:  # an "if" prompt the verifier cannot parse fails here, not after an hour of generation
            tasks.verify(task, f"{tasks.ANSWER_PREFIX} {reference}")
        except ValueError as e:
            raise EvaluationError(f"{where}: {e}") from None
    return Item(BENCHMARK, where, messages, reference, task, answer_regex)


def benchmark_items(path: str | os.PathLike, answer_regex: re.Pattern | None = None) -> list[Item]:
    """Items of a benchmark JSONL (or Parquet) file in the authors' format (docs/method.md §7): messages + a reference
    answer."""
    items = []
    for lineno, record in iter_records(path):
        item = record_item(record, prompt_messages(record, path, lineno), f"{path}:{lineno}", answer_regex)
        if item is None:
            raise EvaluationError(f"{path}:{lineno}: no reference answer (expected one of "
                                  f"{', '.join(REFERENCE_FIELDS)})")
        items.append(item)
    if not items:
        raise EvaluationError(f"{path}: the benchmark has no records")
    # A reference no answer can match scores 0% in silence: say so before the hour of generation.
    hopeless = [(item.where, item.reference, why) for item in items if item.task is None
                and (why := unmatchable_reference(item.reference)) is not None]
    if hopeless:
        where, reference, why = hopeless[0]
        print(f"warning: {len(hopeless)} reference answer(s) in {path} can never be matched, so those items always "
              f"score wrong; the first, {where}: {reference!r} {why}", file=sys.stderr, flush=True)
    return items


def encode_items(tokenizer, items: list[Item], max_new_tokens: int, max_positions: int,
                 chat_template_kwargs: dict | None = None, strict: bool = True) -> list[list[int]]:
    """Chat-templated prompt ids per item; EvaluationError naming the item if one does not fit the context (unless
    strict=False: the caller skips those)."""
    limit = max_positions - max_new_tokens
    encoded = []
    for item in items:
        ids = encode_chat(tokenizer, item.messages, chat_template_kwargs=chat_template_kwargs).ids
        if strict and len(ids) > limit:
            raise EvaluationError(f"{item.where}: the prompt has {len(ids)} tokens; with max_new_tokens="
                                  f"{max_new_tokens} at most {limit} fit in max_position_embeddings={max_positions}")
        encoded.append(ids)
    return encoded


# ---------------------------------------------------------------------------------------------------------------
# Running: batches sorted by prompt length, statistics merged over batches.


@dataclass
class Outcome:
    output: str
    correct: bool
    new_tokens: int
    finished: bool  # stopped at EOS (False: cut at max_new_tokens)
    real_slots: int  # over the generated tokens, summed over MoE layers
    zero_slots: int
    tokens: list[int]  # the generated ids, EOS included when produced


def run_batches(model: CausalLM, tokenizer, items: list[Item], prompts: list[list[int]], sampling: SamplingParams,
                batch_size: int, seed: int | None, progress: bool = True,
                on_batch: Callable[[Generation], None] | None = None) -> list[Outcome]:
    """Generate and check every item (longest prompts first: an out-of-memory shows up in the first batch).
    on_batch(gen) sees each batch's Generation, for statistics."""
    cfg = model.config
    eos, pad = stop_ids(tokenizer, cfg), pad_id(tokenizer, cfg)
    order = sorted(range(len(items)), key=lambda i: -len(prompts[i]))
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    outcomes: list[Outcome | None] = [None] * len(items)
    new_tokens, seconds = 0, 0.0
    bar = tqdm(batches, desc="evaluate", unit="batch", disable=not progress, dynamic_ncols=True)
    for b, batch in enumerate(bar):
        batch_seed = None if seed is None else seed + b  # distinct draws per batch, reproducible per run
        gen = generate(model, [prompts[i] for i in batch], sampling, eos, pad, seed=batch_seed)
        for row, i in enumerate(batch):
            text = tokenizer.decode(gen.tokens[row], skip_special_tokens=True)
            outcomes[i] = Outcome(text, items[i].is_correct(text), len(gen.tokens[row]), gen.finished[row],
                                  sum(gen.real_slots[row]), sum(gen.zero_slots[row]), gen.tokens[row])
        if on_batch is not None:
            on_batch(gen)
        new_tokens, seconds = new_tokens + gen.new_tokens, seconds + gen.seconds
        bar.set_postfix(tok_s=f"{new_tokens / max(seconds, 1e-9):.1f}")
    return outcomes


def accuracy_by_group(items: list[Item], outcomes: list[Outcome]) -> dict[str, float]:
    """{group: correct / total, ..., "average": the mean over groups}, groups in the order items first name them."""
    groups = list(dict.fromkeys(item.group for item in items))
    correct, total = dict.fromkeys(groups, 0), dict.fromkeys(groups, 0)
    for item, out in zip(items, outcomes):
        correct[item.group] += out.correct
        total[item.group] += 1
    accuracy = {g: correct[g] / total[g] for g in groups}
    return {**accuracy, "average": sum(accuracy.values()) / len(groups)}


def _ratio(zero: int, real: int) -> float:
    return zero / (zero + real) if zero + real else 0.0


def evaluate_model(model: CausalLM, tokenizer, families: Sequence[str], n: int, sampling: SamplingParams,
                   batch_size: int, seed: int | None, benchmark: str | os.PathLike | None = None, *,
                   task_seed: int = 0, split: str = "test", samples_per_group: int = 3,
                   progress: bool = True, chat_template_kwargs: dict | None = None, strict: bool = True,
                   answer_regex: re.Pattern | None = None) -> dict:
    """Evaluate in-process; returns the report dict that evaluate.py writes as JSON (see its docstring).

    families: task families of the test split (or of split="heldout", the held-out slice of the train split), n
    items each (drawn with task_seed, fixed by default so every model sees the same items); benchmark: a JSONL file
    evaluated as one more group. seed: the sampling seed (irrelevant for greedy). Raises EvaluationError for bad
    input before generating anything."""
    families = check_families(families)
    if families and (not isinstance(n, int) or n < 1):
        raise EvaluationError(f"n must be a positive integer, got {n!r}")
    if batch_size < 1:
        raise EvaluationError(f"batch_size must be >= 1, got {batch_size}")
    items = suite_items(families, n, task_seed, split) + (benchmark_items(benchmark, answer_regex)
                                                          if benchmark is not None else [])
    if not items:
        raise EvaluationError("nothing to evaluate: no task families and no benchmark")
    cfg = model.config
    prompts = encode_items(tokenizer, items, sampling.max_new_tokens, cfg.max_position_embeddings,
                           chat_template_kwargs, strict)
    limit = cfg.max_position_embeddings - sampling.max_new_tokens
    too_long = [item.where for item, ids in zip(items, prompts) if len(ids) > limit]
    if too_long:  # only without strict: encode_items has refused them otherwise
        print(f"skipping {len(too_long)} prompt(s) longer than max_position_embeddings "
              f"({cfg.max_position_embeddings}) minus max_new_tokens ({sampling.max_new_tokens}): "
              f"{', '.join(too_long)}", flush=True)
        kept = [(item, ids) for item, ids in zip(items, prompts) if len(ids) <= limit]
        if not kept:
            raise EvaluationError(f"nothing to evaluate: every prompt is longer than the context ({limit} tokens "
                                  f"with max_new_tokens={sampling.max_new_tokens})")
        items, prompts = [item for item, _ in kept], [ids for _, ids in kept]

    totals = {"stats": [], "keys": 0, "new_tokens": 0, "prompt_tokens": 0, "seconds": 0.0}

    def accumulate(gen: Generation) -> None:
        totals["stats"] = merge_stats(totals["stats"], gen.stats)
        totals["keys"] += gen.attended_keys
        totals["new_tokens"] += gen.new_tokens
        totals["prompt_tokens"] += gen.prompt_tokens
        totals["seconds"] += gen.seconds

    outcomes = run_batches(model, tokenizer, items, prompts, sampling, batch_size, seed, progress, accumulate)

    groups = list(dict.fromkeys(item.group for item in items))
    counts, samples = {}, {}
    for group in groups:
        mine = [(item, out) for item, out in zip(items, outcomes) if item.group == group]
        done = [out for _, out in mine]
        counts[group] = {
            "correct": sum(out.correct for out in done),
            "total": len(done),
            "finished": sum(out.finished for out in done),
            "tokens_generated": sum(out.new_tokens for out in done),
            "zero_expert_ratio_generated": _ratio(sum(o.zero_slots for o in done), sum(o.real_slots for o in done)),
            # one character per item, in item order: paired comparisons of two models on the same items
            "correct_items": "".join("1" if out.correct else "0" for out in done),
        }
        samples[group] = [{"where": item.where, "prompt": item.messages[-1]["content"], "output": out.output,
                           "reference": item.reference, "correct": out.correct}
                          for item, out in mine[:samples_per_group]]
    accuracy = accuracy_by_group(items, outcomes)

    flops = flop_report(cfg, totals["stats"], totals["keys"])
    zero_gen, real_gen = sum(o.zero_slots for o in outcomes), sum(o.real_slots for o in outcomes)
    return {
        "model": str(getattr(tokenizer, "name_or_path", "")),
        "architecture": {"model_type": cfg.model_type, "num_experts": cfg.num_experts,
                         "num_zero_experts": cfg.num_zero_experts, "top_k": cfg.num_experts_per_tok,
                         "use_zce_mask": cfg.use_zce_mask},
        "device": str(model.lm_head.weight.device),
        "dtype": str(model.lm_head.weight.dtype).removeprefix("torch."),
        "expert_backend": expert_backend_of(model),
        "families": list(families),
        "n_per_family": n if families else 0,
        "task_seed": task_seed,
        "split": split if families else None,
        "benchmark": None if benchmark is None else str(benchmark),
        "sampling": {**dataclasses.asdict(sampling), "seed": seed},
        "batch_size": batch_size,
        "chat_template_kwargs": chat_template_kwargs or {},
        "answer_regex": None if answer_regex is None else answer_regex.pattern,
        "skipped_too_long": len(too_long),
        "too_long": too_long,
        "accuracy": accuracy,
        "counts": counts,
        "zero_expert_ratio": flops["zero_expert_ratio"],
        "zero_expert_ratio_generated": _ratio(zero_gen, real_gen),
        "expert_flops": {"dynamic": flops["expert_flops_dynamic"], "static": flops["expert_flops_static"]},
        "expert_flops_reduction": flops["expert_flops_reduction"],
        "forward_flops": {"dynamic": flops["forward_flops_dynamic"], "static": flops["forward_flops_static"]},
        "forward_flops_reduction": flops["forward_flops_reduction"],
        "prompt_tokens": totals["prompt_tokens"],
        "tokens_processed": flops["tokens"],  # prompts + fed generated tokens (the FLOPs cover these)
        "tokens_generated": totals["new_tokens"],
        "generation_seconds": totals["seconds"],
        "tokens_per_second": totals["new_tokens"] / totals["seconds"] if totals["seconds"] > 0 else 0.0,
        "samples": samples,
    }


# ---------------------------------------------------------------------------------------------------------------
# Output.


def summary_table(report: dict) -> str:
    """A readable table of a report: accuracy per group, then routing cost and speed."""
    s = report["sampling"]
    mode = "greedy" if s["temperature"] == 0 else f"T={s['temperature']} top-p={s['top_p']} top-k={s['top_k']}"
    lines = [f"model {report['model']} ({report['architecture']['model_type']}, "
             f"{report['architecture']['num_zero_experts']} zero experts) on {report['device']} {report['dtype']}, "
             f"{mode}, max {s['max_new_tokens']} new tokens",
             f"{'group':<12}{'correct':>8}{'total':>7}{'accuracy':>10}{'stopped':>9}{'zero (gen)':>12}"]
    for group, c in report["counts"].items():
        lines.append(f"{group:<12}{c['correct']:>8}{c['total']:>7}{report['accuracy'][group]:>10.1%}"
                     f"{c['finished']:>9}{c['zero_expert_ratio_generated']:>12.1%}")
    lines.append(f"{'average':<12}{'':>15}{report['accuracy']['average']:>10.1%}")
    e, f = report["expert_flops"], report["forward_flops"]
    lines += [
        f"zero-expert ratio   {report['zero_expert_ratio']:.1%} of routed slots "
        f"({report['zero_expert_ratio_generated']:.1%} over generated tokens)",
        f"expert FLOPs        {e['dynamic']:.3e} dynamic / {e['static']:.3e} static: "
        f"{report['expert_flops_reduction']:.1%} saved",
        f"forward FLOPs       {f['dynamic']:.3e} dynamic / {f['static']:.3e} static: "
        f"{report['forward_flops_reduction']:.1%} saved",
        f"tokens generated    {report['tokens_generated']} in {report['generation_seconds']:.1f} s: "
        f"{report['tokens_per_second']:.1f} tokens/s",
    ]
    if report.get("skipped_too_long"):
        lines.append(f"skipped             {report['skipped_too_long']} prompt(s) too long for the context, not "
                     f"counted: {', '.join(report['too_long'])}")
    return "\n".join(lines)


def write_json_atomic(path: str | os.PathLike, obj) -> None:
    """A JSON report, written atomically: readers never see half of it."""
    write_text_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def write_json_report(path: str | os.PathLike, obj, prog: str) -> bool:
    """A run's final JSON report (zeda.data.write_report): on a write error one line, and the report on stdout."""
    ok = write_report(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n", prog)
    if ok:
        print(f"wrote {path}")
    return ok
