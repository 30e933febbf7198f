"""Argument types that check a flag's range as it is parsed, so a bad value is refused before any work with a
message that names the flag (argparse prints `argument --lr: must be > 0, got -1`, exit code 2).

    p.add_argument("--lr", type=float_range(above=0), default=2e-5, help="peak learning rate")
    p.add_argument("--batch-size", type=int_range(min=1), default=32, help="prompts per batch")

Floats must also be finite: `nan` compares false with every bound, so without the check it slips through.
add_chat_template_kwargs(p) adds --chat-template-kwargs JSON, parsed once into a dict for apply_chat_template;
add_compute_args(p) adds where a model runs (--device, --dtype, --expert-backend), the same in every script.
"""

from __future__ import annotations

import argparse
import json
import math


def _bounds(min=None, max=None, above=None, below=None) -> str:
    parts = [f">= {min}" if min is not None else "", f"> {above}" if above is not None else "",
             f"<= {max}" if max is not None else "", f"< {below}" if below is not None else ""]
    return " and ".join(p for p in parts if p)


def _check(value, min, max, above, below, text: str):
    if ((min is not None and value < min) or (max is not None and value > max)
            or (above is not None and value <= above) or (below is not None and value >= below)):
        raise argparse.ArgumentTypeError(f"must be {_bounds(min, max, above, below)}, got {text}")
    return value


def int_range(min: int | None = None, max: int | None = None):
    """An int in [min, max] (either bound optional)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        return _check(value, min, max, None, None, text)

    parse.__name__ = "integer"  # argparse names the type in its own messages
    return parse


def float_range(min: float | None = None, max: float | None = None, above: float | None = None,
                below: float | None = None):
    """A finite float with inclusive (min, max) and exclusive (above, below) bounds, each optional."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        return _check(value, min, max, above, below, text)

    parse.__name__ = "number"
    return parse


# Keys apply_chat_template takes itself: passed again through the template's kwargs they would clash.
_TEMPLATE_RESERVED = ("conversation", "messages", "tokenize", "add_generation_prompt", "continue_final_message")


def chat_template_kwargs(text: str) -> dict:
    """--chat-template-kwargs: a JSON object of variables for the chat template, e.g. '{"enable_thinking": false}'."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e.msg} at column {e.colno}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object like '{{\"enable_thinking\": false}}', got {text!r}")
    clashing = [key for key in value if key in _TEMPLATE_RESERVED]
    if clashing:
        raise argparse.ArgumentTypeError(f"{clashing[0]!r} is set by zeda itself, not through the template's kwargs")
    return value


chat_template_kwargs.__name__ = "JSON object"


def add_chat_template_kwargs(p: argparse.ArgumentParser) -> None:
    """The --chat-template-kwargs flag (one line in any script that renders chats)."""
    p.add_argument("--chat-template-kwargs", type=chat_template_kwargs, default={}, metavar="JSON",
                   help="variables for the model's chat template, as a JSON object, e.g. '{\"enable_thinking\": "
                        "false}' for Qwen3 (default: none)")


# What --expert-backend takes: auto, or one of zeda/moe.py:BACKENDS (zeda/loading.py:resolve_backend picks for auto).
EXPERT_BACKENDS = ("auto", "loop", "grouped_mm", "triton")


def add_compute_args(p: argparse.ArgumentParser, dtype: str = "auto", expert_backend: str = "auto",
                     dtypes: tuple[str, ...] = ("auto", "float32", "bfloat16", "float16")) -> None:
    """--device, --dtype and --expert-backend: where and how a script runs its model. Inference defaults to
    auto (cuda + bfloat16 when there is a GPU, else cpu + float32); the trainers pass their own defaults."""
    p.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default=dtype, choices=dtypes,
                   help="compute dtype (auto: bfloat16 on cuda, float32 on cpu)" if dtype == "auto" else
                   "compute dtype; the optimizer always steps fp32 masters (zeda/precision.py)")
    p.add_argument("--expert-backend", default=expert_backend, choices=EXPERT_BACKENDS,
                   help="routed-expert implementation (auto: grouped_mm when the shapes allow it, else loop)")
