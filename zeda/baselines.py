"""The routing variants beside the method: the training-free baselines ZEDA is compared with, the compute dial
of a trained ZEDA model (docs/method.md §6), and AdaMoE's null experts (a checkpoint's
`zce_normalization: "adamoe"`, applied as it loads). zeda/moe.py:Router is the paper's router alone;
RoutingVariant subclasses it and overrides its two hooks, and routing_variant turns a model's routers into
variants in place (same parameters, so a baseline can be trained too: train_sft.py --routing).

    set_routing(model, "topk:2")      # static top-k': keep the 2 highest-weighted of the K slots
    set_routing(model, "topp:0.6")    # top-p: keep slots until their normalised cumulative weight reaches 0.6
    set_routing(model, zero_bias=1.5) # ZEDA's dial: +1.5 on every zero-expert logit, more zero slots
    set_routing(model)                # back to the model's own routing, bit for bit

Kept weights are renormalised by the model's own rule (Qwen3's norm_topk_prob, GLM's sum and scaling factor);
a skipped slot costs no FLOPs and is counted as a skipped expert slot exactly as a zero slot is
(zeda/moe.py:Router, zeda/flops.py:expert_counts), so every method's "expert FLOPs saved" is measured the same
way.
"""

from __future__ import annotations

import math

import torch

from zeda.errors import UsageError
from zeda.model import CausalLM
from zeda.moe import Router

RULES = ("topk", "topp")


def keep_slots(weights_TK: torch.Tensor, rule: str, value: float) -> torch.Tensor:
    """[T, K] bool: the slots a training-free routing rule keeps. topk: the `value` highest-weighted of the K;
    topp: in descending weight until the normalised cumulative weight reaches `value` (the slot that crosses it
    is kept, so at least one always is)."""
    order_TK = weights_TK.argsort(dim=-1, descending=True, stable=True)
    if rule == "topk":
        keep_sorted_TK = torch.arange(weights_TK.shape[1], device=weights_TK.device) < int(value)
        keep_sorted_TK = keep_sorted_TK.expand_as(weights_TK)
    elif rule == "topp":
        sorted_TK = weights_TK.gather(1, order_TK)
        share_TK = sorted_TK / sorted_TK.sum(dim=-1, keepdim=True)
        keep_sorted_TK = (share_TK.cumsum(dim=-1) - share_TK) < value  # mass before this slot is short of p
    else:
        raise UsageError(f"unknown routing rule {rule!r}; choose topk or topp")
    return torch.zeros_like(keep_sorted_TK).scatter(1, order_TK, keep_sorted_TK)


class RoutingVariant(Router):
    """The Router with the variants' knobs, each off by default (then it routes exactly as the Router):

    zero_bias         added to the zero-expert logits before scoring: one trained model moves along the
                      accuracy-compute frontier without retraining (0: the exact trained routing, bit for bit).
    keep_rule         a training-free baseline on the K chosen slots: ("topk", k') keeps the k' highest-weighted,
                      ("topp", p) keeps slots in descending weight until their normalised cumulative weight
                      reaches p (at least one). Kept weights are renormalised by the model's own rule; a skipped
                      slot gets id E (one past the last router output) and weight 0, and costs nothing.
    renormalize_real  AdaMoE: null (zero) slots carry no weight, the real slots share all of it.
    """

    zero_bias: float = 0.0
    keep_rule: tuple[str, float] | None = None
    renormalize_real: bool = False

    def adjust_logits(self, logits_TE):
        if not self.zero_bias:
            return logits_TE
        N = self.num_experts
        return torch.cat([logits_TE[:, :N], logits_TE[:, N:] + self.zero_bias], dim=-1)

    def adjust_slots(self, raw_TK, ids_TK, eps):
        if self.keep_rule is not None:
            keep_TK = keep_slots(raw_TK, *self.keep_rule)
            raw_TK = raw_TK * keep_TK
            ids_TK = torch.where(keep_TK, ids_TK, self.weight.shape[0])  # id E: skipped, costs nothing
        if self.renormalize_real:
            raw_TK = raw_TK * (ids_TK < self.num_experts)
            eps = max(eps, 1e-20)  # a token whose K slots are all null gets all-zero weights, not NaN
        return raw_TK, ids_TK, eps


def routing_variant(router: Router) -> RoutingVariant:
    """`router` as a RoutingVariant, in place: the same module, parameters and buffers, with the variants'
    hooks (every knob off until set). A router FSDP2 has wrapped (its class is a subclass FSDP2 made) keeps that
    class too, under the variant."""
    cls = type(router)
    if not issubclass(cls, RoutingVariant):
        if cls not in _VARIANT_CLASSES:
            _VARIANT_CLASSES[cls] = RoutingVariant if cls is Router else type(f"RoutingVariant{cls.__name__}",
                                                                               (RoutingVariant, cls), {})
        router.__class__ = _VARIANT_CLASSES[cls]
    return router


_VARIANT_CLASSES: dict[type, type] = {}


def use_adamoe_routing(model: CausalLM) -> None:
    """A checkpoint converted with --normalization adamoe (config.json `zce_normalization`): its routers give
    null slots no weight (zeda/loading.py applies this as the model is built)."""
    for block in model.model.layers:
        if block.is_moe:
            routing_variant(block.mlp.gate).renormalize_real = True


def parse_routing(text: str | None, top_k: int) -> tuple[str, float] | None:
    """'topk:K2' or 'topp:P' -> (rule, value), checked against the model's K; None or 'native' -> None."""
    if text is None or text == "native":
        return None
    rule, _, value = text.partition(":")
    if rule not in RULES or not value:
        raise UsageError(f"--routing {text!r}: expected topk:K' (1 <= K' <= {top_k}), topp:P (0 < P <= 1) or native")
    try:
        number = float(value)
    except ValueError:
        raise UsageError(f"--routing {text!r}: {value!r} is not a number") from None
    if rule == "topk" and not (number.is_integer() and 1 <= number <= top_k):
        raise UsageError(f"--routing {text!r}: K' must be an integer in [1, {top_k}] (the model's top-k)")
    if rule == "topp" and not (math.isfinite(number) and 0 < number <= 1):
        raise UsageError(f"--routing {text!r}: P must be in (0, 1]")
    return rule, number


def set_routing(model: CausalLM, routing: str | None = None, zero_bias: float = 0.0) -> None:
    """Apply a training-free routing rule and/or the zero-expert bias to every MoE layer (see the docstring)."""
    cfg = model.config
    rule = parse_routing(routing, cfg.num_experts_per_tok)
    if not math.isfinite(zero_bias):
        raise UsageError(f"--zero-bias must be finite, got {zero_bias}")
    if zero_bias and not cfg.num_zero_experts:
        raise UsageError("--zero-bias needs a converted model (this one has no zero experts)")
    for block in model.model.layers:
        if block.is_moe:
            gate = routing_variant(block.mlp.gate)
            gate.keep_rule = rule
            gate.zero_bias = float(zero_bias)
