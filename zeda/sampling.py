"""Sampling: what turns a row of logits into the next token, shared by every generation path (zeda/generation.py's
decode loop: evaluation, rollouts, OPD sampling, the server) and the command-line flags that set it.

    params = SamplingParams(temperature=0.6, top_p=0.95, top_k=20, max_new_tokens=256)
    tokens_B, logprobs_B = sample(logits_BV, params, make_generator(seed, device))

How it samples (gpt-fast style): temperature, top-k, top-p, then the exponential trick (argmax(p / q), q ~ Exp(1))
from a torch.Generator, which is a categorical draw without torch.multinomial's host sync. A fixed seed
reproduces the samples exactly; one generator per row (a list of seeds) makes a row's samples independent of its
batch-mates. Everything here is a pure function of its arguments: no model, no cache.

Shape letters: B rows, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from zeda.errors import UsageError
from zeda.flags import float_range, int_range

# How a teacher samples its answers for SFT: the paper's sampling settings (docs/method.md §6), which are also Qwen3's
# recommended thinking-mode ones. At temperature 1 a small teacher's answers are markedly less accurate than its
# greedy ones, and SFT teaches the student those mistakes.
ROLLOUT_SAMPLING = {"temperature": 0.6, "top_p": 0.95, "top_k": 20}


def add_sampling_args(parser, prefix: str = "", from_model: bool = True) -> None:
    """--{prefix}temperature, --{prefix}top-p, --{prefix}top-k. from_model: a flag not given takes the model
    folder's generation_config.json value, else the rollout default above (sampling_from_args resolves it)."""
    t, p, k = ROLLOUT_SAMPLING.values()
    source = "the model's generation_config.json, else " if from_model else ""
    parser.add_argument(f"--{prefix}temperature", type=float_range(min=0), default=None if from_model else t,
                        help=f"sampling temperature (0 = greedy; default: {source}{t}, the paper's)")
    parser.add_argument(f"--{prefix}top-p", type=float_range(above=0, max=1), default=None if from_model else p,
                        help=f"nucleus sampling mass (1 = off; default: {source}{p})")
    parser.add_argument(f"--{prefix}top-k", type=int_range(min=0), default=None if from_model else k,
                        help=f"top-k sampling (0 = off; default: {source}{k})")


def sampling_from_args(args, max_new_tokens: int, prefix: str = "", model_dir=None) -> SamplingParams:
    """The SamplingParams of the flags add_sampling_args(parser, prefix) added: what the user gave, else the
    model folder's generation_config.json (its temperature, top_p, top_k), else ROLLOUT_SAMPLING."""
    from zeda.config import generation_defaults

    attr = prefix.replace("-", "_")
    given = {key: getattr(args, f"{attr}{key}") for key in ROLLOUT_SAMPLING}
    folder = generation_defaults(model_dir) if model_dir is not None else {}
    values = {key: v if v is not None else folder.get(key, ROLLOUT_SAMPLING[key]) for key, v in given.items()}
    return SamplingParams(**values, max_new_tokens=max_new_tokens)


@dataclass
class SamplingParams:
    temperature: float = 1.0  # 0 = greedy argmax
    top_p: float = 1.0  # nucleus: keep the smallest set of tokens whose probability reaches top_p (1 = off)
    top_k: int = 0  # keep the k most likely tokens (0 = off)
    max_new_tokens: int = 128

    def __post_init__(self):
        if self.temperature < 0:
            raise UsageError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise UsageError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise UsageError(f"top_k must be >= 0, got {self.top_k}")
        if self.max_new_tokens < 1:
            raise UsageError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def filter_logits(logits_BV: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set every logit outside the top-k and outside the top-p nucleus to -inf (0 / 1.0 switch a filter off).

    Top-k keeps ties with the k-th value. Top-p keeps a token if the probability mass of the tokens ranked
    strictly before it is < top_p, so the most likely token always survives."""
    if top_k > 0 and top_k < logits_BV.shape[-1]:
        kth_B1 = logits_BV.topk(top_k, dim=-1).values[:, -1:]  # [B, 1]
        logits_BV = logits_BV.masked_fill(logits_BV < kth_B1, float("-inf"))
    if top_p < 1.0:
        sorted_BV, order_BV = logits_BV.sort(dim=-1, descending=True)
        probs_BV = sorted_BV.softmax(dim=-1)
        before_BV = probs_BV.cumsum(dim=-1) - probs_BV  # mass ranked strictly above each token
        sorted_BV = sorted_BV.masked_fill(before_BV >= top_p, float("-inf"))
        logits_BV = torch.full_like(logits_BV, float("-inf")).scatter(-1, order_BV, sorted_BV)
    return logits_BV


def sample(logits_BV: torch.Tensor, params: SamplingParams | list[SamplingParams],
           generator: torch.Generator | list[torch.Generator] | None = None):
    """One token per row, and its log-probability. Returns (tokens [B] int64, logprobs [B] fp32); no host sync.

    logprob = log_softmax(logits / T)[token], at the sampling temperature T but *before* the top-k/top-p
    truncation (T = 1 for greedy). At T = 1 -- what OPD samples with (docs/method.md §5) -- that is exactly
    log p_student(y_t), the quantity the advantage log p_teacher - log p_student needs; the truncated
    distribution's log-prob would be biased upwards by the dropped mass.
    params: one for the batch, or one per row (a server's independent requests).
    generator: one for the batch, or one per row (a row's samples then do not depend on its batch-mates).
    """
    logits_BV = logits_BV.float()
    if isinstance(params, list):
        if len(params) != logits_BV.shape[0]:
            raise UsageError(f"sample() got {len(params)} SamplingParams for {logits_BV.shape[0]} rows")
        if any(p != params[0] for p in params):
            return _sample_rows(logits_BV, params, generator)
        params = params[0]
    if params.greedy:
        tokens_B = logits_BV.argmax(dim=-1)
        logprobs_BV = logits_BV.log_softmax(dim=-1)
    else:
        scaled_BV = logits_BV / params.temperature
        logprobs_BV = scaled_BV.log_softmax(dim=-1)
        probs_BV = filter_logits(scaled_BV, params.top_k, params.top_p).softmax(dim=-1)
        tokens_B = (probs_BV / _exponential(probs_BV, generator)).argmax(dim=-1)
    return tokens_B, logprobs_BV.gather(-1, tokens_B[:, None]).squeeze(-1)


def _exponential(probs_BV: torch.Tensor, generator) -> torch.Tensor:
    """q ~ Exp(1) [B, V]: argmax(p / q) is a draw from p (gpt-fast), without torch.multinomial's host sync.
    With one generator per row, row b's draws come from generator b alone."""
    if isinstance(generator, list):
        return torch.stack([torch.empty_like(row).exponential_(1, generator=g) for row, g in zip(probs_BV, generator)])
    return torch.empty_like(probs_BV).exponential_(1, generator=generator)


def _sample_rows(logits_BV: torch.Tensor, params: list[SamplingParams], generator):
    """sample() with each row's own temperature, top-k and top-p, computed so that every row gets bit for bit
    what sample() gives it alone: the same scaling, the same filter over the same values, its own draws."""
    device = logits_BV.device
    greedy_B = torch.tensor([p.greedy for p in params], device=device)
    T_B1 = torch.tensor([[p.temperature if not p.greedy else 1.0] for p in params], device=device)  # greedy: T=1
    scaled_BV = logits_BV / T_B1
    logprobs_BV = scaled_BV.log_softmax(dim=-1)
    tokens_B = logits_BV.argmax(dim=-1)
    if not all(p.greedy for p in params):
        filtered_BV = scaled_BV.clone()
        by_filter: dict[tuple[int, float], list[int]] = {}  # rows sharing a (top_k, top_p) are filtered together
        for row, p in enumerate(params):
            by_filter.setdefault((p.top_k, p.top_p), []).append(row)
        for (top_k, top_p), rows in by_filter.items():
            index = torch.tensor(rows, device=device)
            filtered_BV[index] = filter_logits(scaled_BV[index], top_k, top_p)
        probs_BV = filtered_BV.softmax(dim=-1)
        sampled_B = (probs_BV / _exponential(probs_BV, generator)).argmax(dim=-1)
        tokens_B = torch.where(greedy_B, tokens_B, sampled_B)
    return tokens_B, logprobs_BV.gather(-1, tokens_B[:, None]).squeeze(-1)


def make_generator(seed: int | list[int] | None, device):
    """A generator on `device` seeded with `seed` (a list of seeds: one generator per row); None (torch's global
    RNG) when no seed is given."""
    if isinstance(seed, list):
        return [torch.Generator(device=device).manual_seed(s) for s in seed]
    return None if seed is None else torch.Generator(device=device).manual_seed(seed)
