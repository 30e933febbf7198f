"""Where two models' greedy answers part: the diagnosis behind the README's Stage 1 and Stage 2 findings.

Accuracy says how often a student is wrong where its teacher is right, not why. For every item where exactly
one of two models answers correctly (the reference, usually the teacher, and the model, usually the student),
take the first generated token where their greedy answers differ and read both models' next-token
distributions on the prefix they share. Two kinds of disagreement that look alike in accuracy differ there:

- near ties: the reference itself splits its mass (p of its own token below 0.7). Which answer greedy decoding
  takes is close to a coin flip; over many items such flips go both ways.
- confident errors: the reference puts at least 0.95 on its token and the model most of its mass on another
  (a per-position KL of several nats). The model has learned something else there, and a distillation loss
  that visits this prefix has a large signal to fix it.

Both models must share the tokenizer (the reference's is used); the shared prefix is re-run as one sequence,
so the probabilities are those of an unbatched forward.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from zeda.evaluation import EvaluationError, Item, accuracy_by_group, encode_items, run_batches
from zeda.sampling import SamplingParams
from zeda.model import CausalLM

# (name, lower, upper) on the reference's probability of its own token at the first divergent position.
BUCKETS = (("near tie", 0.0, 0.7), ("in between", 0.7, 0.95), ("confident", 0.95, float("inf")))
CONTEXT_CHARS = 24  # how much of the shared prefix a row shows


@dataclass
class Divergence:
    where: str  # the item, as evaluation names it ("math heldout item 12")
    group: str
    reference_right: bool  # True: the reference answered correctly and the model did not; False: the reverse
    position: int  # index of the first differing generated token
    context: str  # the end of the shared generated prefix
    reference_token: str
    model_token: str
    reference_p: tuple[float, float]  # the reference's probability of (its token, the model's token)
    model_p: tuple[float, float]  # the model's probability of (the reference's token, its token)
    kl: float  # KL(model || reference) over the vocabulary at this position, in nats
    bucket: str
    reference_answer: str  # both greedy answers in full
    model_answer: str


def first_difference(a: Sequence[int], b: Sequence[int]) -> int | None:
    """The first index where a and b differ, len(shorter) when one is a strict prefix of the other, None when
    they are equal."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def bucket_of(reference_p_own: float) -> str:
    return next(name for name, lo, hi in BUCKETS if lo <= reference_p_own < hi)


@torch.no_grad()
def next_token_logprobs(model: CausalLM, ids: list[int]) -> torch.Tensor:
    """[V] fp32 log-probabilities of the token after ids (one unpadded sequence)."""
    device = model.lm_head.weight.device
    return model(torch.tensor([ids], device=device))[0, -1].float().log_softmax(-1).cpu()


def shared_prompts(reference: CausalLM, model: CausalLM, tokenizer, items: list[Item], max_new_tokens: int):
    """Prompt ids for two models compared token by token: EvaluationError if their vocabularies differ or a prompt
    does not fit the shorter context."""
    if reference.config.vocab_size != model.config.vocab_size:
        raise EvaluationError(f"the models' vocabularies differ ({reference.config.vocab_size} against "
                              f"{model.config.vocab_size}): they cannot be compared token by token")
    positions = min(reference.config.max_position_embeddings, model.config.max_position_embeddings)
    return encode_items(tokenizer, items, max_new_tokens, positions)


def compare_models(reference: CausalLM, model: CausalLM, tokenizer, items: list[Item], max_new_tokens: int,
                   batch_size: int = 32, progress: bool = True) -> dict:
    """Greedy answers of both models on items, and a Divergence for every item exactly one of them gets right.

    Returns {"accuracy": {"reference": {...}, "model": {...}}, "discordant", "reference_right", "model_right",
    "buckets": {name: {"reference_right", "model_right"}}, "divergences": [Divergence as dict, ...]}, the
    divergences sorted by KL, largest first. Raises EvaluationError if the vocabularies differ."""
    prompts = shared_prompts(reference, model, tokenizer, items, max_new_tokens)
    greedy = SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens)
    ref_out = run_batches(reference, tokenizer, items, prompts, greedy, batch_size, None, progress)
    model_out = run_batches(model, tokenizer, items, prompts, greedy, batch_size, None, progress)

    divergences = []
    for item, prompt, r, m in zip(items, prompts, ref_out, model_out):
        if r.correct == m.correct:
            continue
        k = first_difference(r.tokens, m.tokens)
        if k is None or k >= min(len(r.tokens), len(m.tokens)):
            # Equal answers are scored alike, and an EOS ends every shorter finished answer, so this needs one
            # truncated answer to be a prefix of the other: not possible at one max_new_tokens, but say so.
            raise EvaluationError(f"{item.where}: answers scored differently without a differing token")
        ids = prompt + r.tokens[:k]
        lp_ref, lp_model = next_token_logprobs(reference, ids), next_token_logprobs(model, ids)
        t_ref, t_model = r.tokens[k], m.tokens[k]
        kl = float((lp_model.exp() * (lp_model - lp_ref)).sum())
        p_ref_own = float(lp_ref[t_ref].exp())
        divergences.append(Divergence(
            where=item.where, group=item.group, reference_right=r.correct, position=k,
            context=tokenizer.decode(r.tokens[:k], skip_special_tokens=False)[-CONTEXT_CHARS:],
            reference_token=tokenizer.decode([t_ref], skip_special_tokens=False),
            model_token=tokenizer.decode([t_model], skip_special_tokens=False),
            reference_p=(p_ref_own, float(lp_ref[t_model].exp())),
            model_p=(float(lp_model[t_ref].exp()), float(lp_model[t_model].exp())),
            kl=kl, bucket=bucket_of(p_ref_own), reference_answer=r.output, model_answer=m.output))
    divergences.sort(key=lambda d: -d.kl)

    buckets = {name: {"reference_right": sum(d.reference_right for d in divergences if d.bucket == name),
                      "model_right": sum(not d.reference_right for d in divergences if d.bucket == name)}
               for name, _, _ in BUCKETS}
    return {
        "accuracy": {"reference": accuracy_by_group(items, ref_out), "model": accuracy_by_group(items, model_out)},
        "items": len(items),
        "discordant": len(divergences),
        "reference_right": sum(d.reference_right for d in divergences),
        "model_right": sum(not d.reference_right for d in divergences),
        "buckets": buckets,
        "divergences": [asdict(d) for d in divergences],
    }


def divergence_table(report: dict, rows: int = 10) -> str:
    """The summary a person reads: accuracy of both, discordant items per bucket, then the largest-KL rows."""
    ref, mod = report["accuracy"]["reference"], report["accuracy"]["model"]
    lines = [f"{'':<12}" + "".join(f"{g:>9}" for g in ref),
             f"{'reference':<12}" + "".join(f"{v:>9.1%}" for v in ref.values()),
             f"{'model':<12}" + "".join(f"{v:>9.1%}" for v in mod.values()),
             (f"{report['discordant']} of {report['items']} items right for exactly one of them: the reference "
             f"{report['reference_right']}, the model {report['model_right']}"),
             f"{'reference p of its token':<28}{'reference right':>16}{'model right':>12}"]
    for (name, lo, hi) in BUCKETS:
        b = report["buckets"][name]
        span = f"{name} ({lo:g}-{hi:g})" if hi != float("inf") else f"{name} (>= {lo:g})"
        lines.append(f"{span:<28}{b['reference_right']:>16}{b['model_right']:>12}")
    if report["divergences"] and rows > 0:
        lines.append(f"largest KL(model || reference) at the first differing token (of {report['discordant']}):")
        for d in report["divergences"][:rows]:
            right = "reference" if d["reference_right"] else "model"
            lines.append(f"  {d['where']:<22} {right:>9} right  ...{d['context']!r} reference {d['reference_token']!r} "
                         f"p {d['reference_p'][0]:.2f}/{d['reference_p'][1]:.2f}, model {d['model_token']!r} "
                         f"p {d['model_p'][0]:.2f}/{d['model_p'][1]:.2f}, KL {d['kl']:.2f}")
    return "\n".join(lines)
