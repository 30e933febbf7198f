"""The losses of ZEDA: the Group Auxiliary Loss (§3), response-only cross-entropy (§4), and the on-policy
distillation losses (§5: per-token reverse-KL advantage in a PPO-clipped policy gradient, and the exact
full-vocabulary reverse KL for comparison).

Group Auxiliary Loss. Two groups: the N normal experts E and the Z zero experts. Over the real tokens:
    f_E, f_Z  share of the routed *slots* landing in each group (f_E + f_Z = 1; slot convention, so the
              paper's extra 1/K is not needed),
    P_E, P_Z  mean router probability mass on each group, from the full distribution (softmax over N + Z for
              Qwen; sigmoid scores normalised to sum to 1 for GLM), computed once from the raw logits,
    L_GA = alpha * (N + w Z) * (f_E P_E / N + f_Z P_Z / (w Z)),  summed over MoE layers.
f carries no gradient (it is a count); P does. Its minimum pushes the zero share toward w Z / (N + w Z)
(50% for w = 2, Z = N / 2) without balancing the normal experts against each other. Counts are reduced over
the whole batch -- and over data-parallel ranks with `all_reduce` -- so the loss does not depend on how the
batch is split. With gradient accumulation, f is taken per micro-batch (a full global-batch f would need every
micro-batch's routing before the first backward); P is always per micro-batch, as its gradient must be.

Shape letters: T tokens, K top-k, E = N + Z router outputs, V vocabulary.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from zeda.training import router_probs


def group_shares(routing, num_experts: int, valid_T: torch.Tensor | None, scoring: str):
    """Per MoE layer: (slots on E, slots on Z, P mass on E summed over tokens, P mass on Z summed, tokens).

    Sums, not means, so they can be added across micro-batches and ranks before dividing."""
    out = []
    for r in routing:
        probs_TE = router_probs(r.logits_TE, scoring)
        ids_TK = r.ids_TK
        if valid_T is not None:
            probs_TE, ids_TK = probs_TE[valid_T], ids_TK[valid_T]
        zero_slots = (ids_TK >= num_experts).sum()
        p_zero = probs_TE[:, num_experts:].sum()
        p_real = probs_TE[:, :num_experts].sum()
        out.append((ids_TK.numel() - zero_slots, zero_slots, p_real, p_zero, ids_TK.shape[0]))
    return out


def group_aux_loss(routing, num_experts: int, num_zero: int, valid_T: torch.Tensor | None = None,
                   scoring: str = "softmax", alpha: float = 0.1, w: float = 2.0,
                   all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """L_GA summed over MoE layers (ZEDA.md §3). all_reduce sums a tensor over data-parallel ranks."""
    N, Z = num_experts, num_zero
    device = routing[0].logits_TE.device
    world = all_reduce(torch.ones((), device=device)) if all_reduce is not None else 1.0
    total = torch.zeros((), device=device)
    for real_slots, zero_slots, p_real, p_zero, tokens in group_shares(routing, N, valid_T, scoring):
        counts = torch.stack([real_slots, zero_slots]).float()  # [2], no gradient
        n_tokens = torch.tensor(float(tokens), device=device)
        if all_reduce is not None:
            counts, n_tokens = all_reduce(counts), all_reduce(n_tokens)
        f_E, f_Z = counts / counts.sum().clamp(min=1)
        # P: this rank's probability mass over the global token count, times the world size, so that the
        # mean over ranks (what data-parallel gradient averaging computes) is exactly the global loss.
        scale = world / n_tokens.clamp(min=1)
        P_E, P_Z = p_real * scale, p_zero * scale
        total = total + alpha * (N + w * Z) * (f_E * P_E / N + f_Z * P_Z / (w * Z))
    return total


def response_cross_entropy(logits_BTV: torch.Tensor, targets_BT: torch.Tensor, loss_mask_BT: torch.Tensor,
                           normalizer: float | None = None) -> torch.Tensor:
    """Sum of CE over response tokens divided by `normalizer` (default: their count). Prompt and padding
    positions never contribute. Pass the global response-token count as normalizer under accumulation."""
    ce = F.cross_entropy(logits_BTV[loss_mask_BT].float(), targets_BT[loss_mask_BT], reduction="sum")
    return ce / (normalizer if normalizer is not None else loss_mask_BT.sum().clamp(min=1))


def reverse_kl_advantage(teacher_logp: torch.Tensor, student_logp: torch.Tensor) -> torch.Tensor:
    """A_t = log p_teacher(y_t) - log p_student(y_t), detached: a one-sample estimate of -KL(student||teacher)
    at each position, with no discount, no sum over later tokens and no normalisation (ZEDA.md §5)."""
    return (teacher_logp - student_logp).detach()


def ppo_clip_loss(new_logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                  clip: float = 0.2, normalizer: float | None = None) -> torch.Tensor:
    """PPO-clipped policy-gradient loss over the masked (response) tokens:
        -min(r A, clip(r, 1 - eps, 1 + eps) A),  r = exp(new_logp - old_logp),
    summed and divided by `normalizer` (default: the number of masked tokens)."""
    ratio = torch.exp(new_logp - old_logp)
    unclipped = ratio * advantages
    clipped = ratio.clamp(1 - clip, 1 + clip) * advantages
    per_token = -torch.minimum(unclipped, clipped)
    return (per_token * mask).sum() / (normalizer if normalizer is not None else mask.sum().clamp(min=1))


def full_reverse_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor,
                    normalizer: float | None = None) -> torch.Tensor:
    """Exact KL(p_student || p_teacher) over the vocabulary at each masked position, averaged.

    KL = sum_v p_s(v) (log p_s(v) - log p_t(v)). Needs teacher logits over the vocabulary ([B, T, V]), which is
    what the sampled-token form avoids; kept for tests and ablations (TRL's GKD with beta = 1)."""
    log_s = student_logits.float().log_softmax(-1)
    log_t = teacher_logits.float().log_softmax(-1)
    kl = (log_s.exp() * (log_s - log_t)).sum(-1)
    return (kl * mask).sum() / (normalizer if normalizer is not None else mask.sum().clamp(min=1))
