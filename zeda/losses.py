"""The losses of ZEDA (docs/method.md): the Group Auxiliary Loss (§3), response-only cross-entropy (§4), and
the on-policy distillation losses (§5: per-token reverse-KL advantage in a PPO-clipped policy gradient, and the
exact full-vocabulary reverse KL for comparison); plus the Switch-style balance loss the shipped teachers were
pre-trained with.

Group Auxiliary Loss. Two groups: the N normal experts E and the Z zero experts. Over the real tokens:
    f_E, f_Z  share of the routed *slots* landing in each group (f_E + f_Z = 1; slot convention, so the
              paper's extra 1/K is not needed),
    P_E, P_Z  mean router probability mass on each group, from the full distribution (softmax over N + Z for
              Qwen; sigmoid scores normalised to sum to 1 for GLM), computed once from the raw logits,
    L_GA = alpha * (N + w Z) * (f_E P_E / N + f_Z P_Z / (w Z)),  summed over MoE layers.
f is counted, as the authors count it, on a fresh top-K of the normalised scores P (counts="scores"): for a
softmax router that is the routing actually used; for GLM's sigmoid router it leaves out the selection-only
e_score_correction_bias. counts="routing" counts the slots the router actually chose (bias included).
f carries no gradient (it is a count); P does. Its minimum pushes the zero share toward w Z / (N + w Z)
(50% for w = 2, Z = N / 2) without balancing the normal experts against each other. Counts are reduced over
the whole batch -- and over data-parallel ranks with `all_reduce` -- so the loss does not depend on how the
batch is split (the authors reduce only over tensor/context-parallel ranks: docs/method.md §8). With gradient
accumulation, f is taken per micro-batch (a full global-batch f would need every micro-batch's routing before
the first backward); P is always per micro-batch, as its gradient must be.

OPD losses aggregate per sequence by default, as the authors do: each sequence's mean over its response tokens,
then the mean over sequences (aggregation="sequence"); "token" divides the sum over all response tokens by their
count, which weights long answers more.

Shape letters: T tokens, K top-k, E = N + Z router outputs, V vocabulary.
"""

from __future__ import annotations

from typing import Callable

import torch

GA_COUNTS = ("scores", "routing")
AGGREGATIONS = ("sequence", "token")


def router_probs(logits_TE: torch.Tensor, scoring: str) -> torch.Tensor:
    """The router's full distribution: softmax (Qwen3), or sigmoid scores normalised to sum to 1 (GLM)."""
    if scoring == "softmax":
        return logits_TE.softmax(-1)
    s = logits_TE.sigmoid()
    return s / s.sum(-1, keepdim=True)


def group_shares(routing, num_experts: int, valid_T: torch.Tensor | None, scoring: str, counts: str = "scores"):
    """Per MoE layer: (slots on E, slots on Z, P mass on E summed over tokens, P mass on Z summed, tokens).

    Sums, not means, so they can be added across micro-batches and ranks before dividing."""
    if counts not in GA_COUNTS:
        raise ValueError(f"counts must be one of {GA_COUNTS}, got {counts!r}")
    out = []
    for r in routing:
        probs_TE = router_probs(r.logits_TE, scoring)
        # counts="scores": a fresh top-K of P, no selection bias (the authors' f); "routing": the slots used.
        ids_TK = probs_TE.detach().topk(r.ids_TK.shape[1], dim=-1).indices if counts == "scores" else r.ids_TK
        if valid_T is not None:
            probs_TE, ids_TK = probs_TE[valid_T], ids_TK[valid_T]
        zero_slots = (ids_TK >= num_experts).sum()
        p_zero = probs_TE[:, num_experts:].sum()
        p_real = probs_TE[:, :num_experts].sum()
        out.append((ids_TK.numel() - zero_slots, zero_slots, p_real, p_zero, ids_TK.shape[0]))
    return out


def group_aux_loss(routing, num_experts: int, num_zero: int, valid_T: torch.Tensor | None = None,
                   scoring: str = "softmax", alpha: float = 0.1, w: float = 2.0,
                   all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
                   counts: str = "scores") -> torch.Tensor:
    """L_GA summed over MoE layers (docs/method.md §3). all_reduce sums a tensor over data-parallel ranks;
    counts says which slots f counts (module docstring)."""
    N, Z = num_experts, num_zero
    device = routing[0].logits_TE.device
    shares = group_shares(routing, N, valid_T, scoring, counts)
    # Every count the loss needs, one row per layer: [slots on E, slots on Z, tokens, 1]. One all_reduce sums all
    # layers' rows over the data-parallel ranks at once (the 1s add up to the rank count). No gradient.
    slots_L2 = torch.stack([torch.stack([real_slots, zero_slots]) for real_slots, zero_slots, *_ in shares]).float()
    tokens_L2 = torch.tensor([[float(tokens), 1.0] for *_, tokens in shares], device=device)
    counts_L4 = torch.cat([slots_L2, tokens_L2], dim=1)
    if all_reduce is not None:
        counts_L4 = all_reduce(counts_L4)
    total = torch.zeros((), device=device)
    for (_, _, p_real, p_zero, _), row in zip(shares, counts_L4):
        slots, n_tokens, world = row[:2], row[2], row[3]
        f_E, f_Z = slots / slots.sum().clamp(min=1)
        # P: this rank's probability mass over the global token count, times the world size, so that the
        # mean over ranks (what data-parallel gradient averaging computes) is exactly the global loss.
        scale = world / n_tokens.clamp(min=1)
        P_E, P_Z = p_real * scale, p_zero * scale
        total = total + alpha * (N + w * Z) * (f_E * P_E / N + f_Z * P_Z / (w * Z))
    return total


def auxiliary_loss(routing, cfg, valid_T: torch.Tensor | None, alpha: float = 0.1, w: float = 2.0,
                   all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
                   counts: str = "scores") -> torch.Tensor:
    """The routing loss a training stage adds: ZEDA's Group Auxiliary Loss summed over MoE layers. A model
    without zero experts (a static model fine-tuned under a baseline's routing) gets none. A baseline swaps in
    its own with the same signature (experiments/variant.py: AdaMoE's Switch loss)."""
    if not cfg.num_zero_experts:
        return torch.zeros((), device=routing[0].logits_TE.device)
    return group_aux_loss(routing, cfg.num_experts, cfg.num_zero_experts, valid_T, cfg.router_scoring, alpha, w,
                          all_reduce, counts)


def response_cross_entropy(target_logp_BT: torch.Tensor, loss_mask_BT: torch.Tensor,
                           normalizer: float | None = None) -> torch.Tensor:
    """Sum of -log p(target) over response tokens divided by `normalizer` (default: their count). Prompt and
    padding positions never contribute. target_logp_BT: model(ids, targets=...) (chunked over the vocabulary, so
    [B, T, V] logits never exist). Pass the global response-token count as normalizer under accumulation."""
    nll = -(target_logp_BT.float() * loss_mask_BT).sum()
    return nll / (normalizer if normalizer is not None else loss_mask_BT.sum().clamp(min=1))


def reverse_kl_advantage(teacher_logp: torch.Tensor, student_logp: torch.Tensor) -> torch.Tensor:
    """A_t = log p_teacher(y_t) - log p_student(y_t), detached: a one-sample estimate of -KL(student||teacher)
    at each position, with no discount, no sum over later tokens and no normalisation (docs/method.md §5)."""
    return (teacher_logp - student_logp).detach()


def aggregate(per_token_BT: torch.Tensor, mask_BT: torch.Tensor, aggregation: str = "sequence",
              normalizer: float | None = None) -> torch.Tensor:
    """Reduce a per-token loss over the masked (response) tokens.

    token:    sum over masked tokens / normalizer (default: their count);
    sequence: sum over sequences of each one's mean over its masked tokens / normalizer (default: the number of
              sequences with a masked token). Pass the global count (tokens or sequences) over the data-parallel
              ranks as normalizer, divided by the rank count, so the mean over ranks is the global loss."""
    mask_BT = mask_BT.to(per_token_BT.dtype)
    if aggregation == "token":
        return (per_token_BT * mask_BT).sum() / (normalizer if normalizer is not None else mask_BT.sum().clamp(min=1))
    if aggregation != "sequence":
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
    tokens_B = mask_BT.sum(-1)
    per_sequence_B = (per_token_BT * mask_BT).sum(-1) / tokens_B.clamp(min=1)  # a sequence without tokens adds 0
    return per_sequence_B.sum() / (normalizer if normalizer is not None else (tokens_B > 0).sum().clamp(min=1))


def ppo_clip_loss(new_logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                  clip: float = 0.2, normalizer: float | None = None, aggregation: str = "sequence") -> torch.Tensor:
    """PPO-clipped policy-gradient loss over the masked (response) tokens:
        -min(r A, clip(r, 1 - eps, 1 + eps) A),  r = exp(new_logp - old_logp),
    reduced by `aggregate` (per token, or per sequence then over sequences)."""
    ratio = torch.exp(new_logp - old_logp)
    unclipped = ratio * advantages
    clipped = ratio.clamp(1 - clip, 1 + clip) * advantages
    per_token = -torch.minimum(unclipped, clipped)
    return aggregate(per_token, mask, aggregation, normalizer)


def full_reverse_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor,
                    normalizer: float | None = None, aggregation: str = "sequence") -> torch.Tensor:
    """Exact KL(p_student || p_teacher) over the vocabulary at each masked position, reduced by `aggregate`.

    KL = sum_v p_s(v) (log p_s(v) - log p_t(v)). Needs teacher logits over the vocabulary ([B, T, V]), which is
    what the sampled-token form avoids; kept for tests and ablations (TRL's GKD with beta = 1)."""
    log_s = student_logits.float().log_softmax(-1)
    log_t = teacher_logits.float().log_softmax(-1)
    kl = (log_s.exp() * (log_s - log_t)).sum(-1)
    return aggregate(kl, mask, aggregation, normalizer)


def load_balancing_loss(routing, num_experts: int, valid_T: torch.Tensor | None = None,
                        scoring: str = "softmax") -> torch.Tensor:
    """Switch-Transformer balance loss, averaged over MoE layers: N * sum_e f_e * P_e, where f_e is the share
    of slots routed to expert e and P_e the mean router probability of e (padding masked). The shipped teachers
    were pre-trained with it, so that every expert is used."""
    losses = []
    for r in routing:
        probs_TE = router_probs(r.logits_TE, scoring)
        ids_TK = r.ids_TK
        if valid_T is not None:
            probs_TE, ids_TK = probs_TE[valid_T], ids_TK[valid_T]
        f_E = torch.bincount(ids_TK.flatten(), minlength=probs_TE.shape[1]).float() / max(1, ids_TK.numel())
        losses.append(num_experts * (f_E * probs_TE.mean(0)).sum())
    return torch.stack(losses).mean()
