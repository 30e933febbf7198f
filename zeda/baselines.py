"""Training-free routing on a trained or static model: the baselines ZEDA is compared with, and the compute
dial of a trained ZEDA model (docs/method.md §6).

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

from zeda.errors import UsageError
from zeda.model import CausalLM

RULES = ("topk", "topp")


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
            block.mlp.gate.keep_rule = rule
            block.mlp.gate.zero_bias = float(zero_bias)
