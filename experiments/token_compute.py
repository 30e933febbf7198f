"""Where a dynamic MoE spends its compute: real experts per token, shown over an answer and measured against
how hard the token is (docs/method.md §6).

A ZEDA student decides per token and per layer how many of its K slots go to real experts; the rest are zero
experts and cost nothing. Two questions follow: does it spend more where the next token is hard, and does it
save where it can afford to? For each answer the student gives (greedy), one teacher-forced forward of prompt +
answer through the student gives its routing at every position, and one through the teacher its next-token
distribution there. Position t is the input token whose forward produced answer token t+1, so its real-expert
count is what that token cost (the same count generation reports per token, up to float noise: the same model
sees the same tokens under the same causal mask). Per answer position we record:

    real_L        real-expert slots in each MoE layer (0..K), and their sum over layers (0..K x L)
    entropy       the teacher's next-token entropy, in nats: how uncertain the original model is there
    reverse_kl    KL(student || teacher) over the vocabulary, in nats: the per-token quantity OPD minimises
    disagree      the student's greedy token is not the teacher's argmax

and report Spearman and Pearson correlations of real-expert use with entropy and with reverse KL, overall, per
task family and per layer, plus the mean real-expert use where the two models agree and where they do not.

    measurements = measure(student, teacher, tokenizer, items, max_new_tokens=160)
    report = correlations(measurements, student.config)
    plot("answer.png", example, pieces, report, title)   # one answer token by token, and the aggregate
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from zeda.data import save_figure_atomic
from zeda.evaluation import EvaluationError, Item, run_batches
from zeda.sampling import SamplingParams
from zeda.model import CausalLM
from zeda.token_picture import colour

from divergence import shared_prompts


@dataclass
class AnswerCompute:
    where: str  # the item, as evaluation names it
    group: str  # its task family
    prompt: list[int]
    answer: list[int]  # the student's greedy tokens, EOS included when produced
    real_LA: np.ndarray  # [L_moe, A] int: real-expert slots per MoE layer for each answer token
    entropy_A: np.ndarray  # [A] teacher next-token entropy (nats) at the position that produced each token
    reverse_kl_A: np.ndarray  # [A] KL(student || teacher) there (nats)
    disagree_A: np.ndarray  # [A] bool: the student's token is not the teacher's argmax


@torch.no_grad()
def real_experts_per_position(model: CausalLM, ids: list[int]) -> tuple[np.ndarray, torch.Tensor]:
    """One unpadded forward: ([L_moe, T] real-expert slots per MoE layer and position, [T, V] fp32 log-probs)."""
    device = model.lm_head.weight.device
    routing = []
    logits_TV = model(torch.tensor([ids], device=device), routing=routing)[0]
    N = model.config.num_experts
    # ids >= N are zero experts (or, under a training-free rule, skipped slots): they cost nothing
    real_LT = torch.stack([(r.ids_TK < N).sum(-1) for r in routing]) if routing else torch.zeros(0, len(ids))
    return real_LT.long().cpu().numpy(), logits_TV.float().log_softmax(-1).cpu()


@torch.no_grad()
def measure(student: CausalLM, teacher: CausalLM, tokenizer, items: list[Item], max_new_tokens: int,
            batch_size: int = 32, progress: bool = True) -> list[AnswerCompute]:
    """The student's greedy answer to every item, and per answer token its compute and the teacher's view."""
    prompts = shared_prompts(teacher, student, tokenizer, items, max_new_tokens)
    greedy = SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens)
    outcomes = run_batches(student, tokenizer, items, prompts, greedy, batch_size, None, progress)
    out = []
    for item, prompt, o in tqdm(list(zip(items, prompts, outcomes)), desc="teacher-forced", unit="answer",
                                disable=not progress, dynamic_ncols=True):
        if not o.tokens:
            continue
        ids = prompt + o.tokens
        P, A = len(prompt), len(o.tokens)
        real_LT, lp_student_TV = real_experts_per_position(student, ids)
        _, lp_teacher_TV = real_experts_per_position(teacher, ids)
        span = slice(P - 1, P + A - 1)  # the positions whose forward produced answer tokens 0..A-1
        s_AV, t_AV = lp_student_TV[span], lp_teacher_TV[span]
        entropy_A = -(t_AV.exp() * t_AV).sum(-1)
        reverse_kl_A = (s_AV.exp() * (s_AV - t_AV)).sum(-1)
        disagree_A = t_AV.argmax(-1) != torch.tensor(o.tokens)
        out.append(AnswerCompute(item.where, item.group, prompt, o.tokens, real_LT[:, span],
                                 entropy_A.numpy(), reverse_kl_A.clamp(min=0).numpy(), disagree_A.numpy()))
    return out


# ---------------------------------------------------------------------------------------------------------------
# Correlations: plain numpy (rank correlation with ties averaged, as scipy.stats.spearmanr does).


def ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks, tied values sharing the mean of their ranks."""
    order = np.argsort(x, kind="stable")
    r = np.empty(len(x), dtype=np.float64)
    r[order] = np.arange(1, len(x) + 1)
    values, inverse = np.unique(x, return_inverse=True)
    return (np.bincount(inverse, weights=r) / np.bincount(inverse))[inverse] if len(values) < len(x) else r


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """NaN when either side is constant (no correlation is defined)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if len(x) < 2 or x.std() == 0 or y.std() == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    return pearson(ranks(np.asarray(x)), ranks(np.asarray(y)))


def _finite(v: float) -> float | None:
    return None if math.isnan(v) else round(v, 4)


def _relation(real: np.ndarray, m: dict) -> dict:
    agree, disagree = real[~m["disagree"]], real[m["disagree"]]
    return {
        "tokens": len(real),
        "mean_real": round(float(real.mean()), 4) if len(real) else None,
        "spearman_entropy": _finite(spearman(real, m["entropy"])),
        "pearson_entropy": _finite(pearson(real, m["entropy"])),
        "spearman_reverse_kl": _finite(spearman(real, m["reverse_kl"])),
        "pearson_reverse_kl": _finite(pearson(real, m["reverse_kl"])),
        "mean_real_agree": round(float(agree.mean()), 4) if len(agree) else None,
        "mean_real_disagree": round(float(disagree.mean()), 4) if len(disagree) else None,
        "disagree_share": round(float(m["disagree"].mean()), 4) if len(real) else None,
    }


def flatten(answers: Sequence[AnswerCompute]) -> dict[str, np.ndarray]:
    """Every answer token of every answer, concatenated: real_LX [L, X] and the per-token columns [X]."""
    return {
        "group": np.concatenate([[a.group] * len(a.answer) for a in answers]),
        "real_LX": np.concatenate([a.real_LA for a in answers], axis=1),
        "entropy": np.concatenate([a.entropy_A for a in answers]),
        "reverse_kl": np.concatenate([a.reverse_kl_A for a in answers]),
        "disagree": np.concatenate([a.disagree_A for a in answers]).astype(bool),
    }


def correlations(answers: Sequence[AnswerCompute], cfg) -> dict:
    """Real-expert use (summed over layers) against teacher entropy and student-teacher disagreement, overall and
    per family; and each MoE layer's own use against the same, over all tokens."""
    if not answers:
        raise EvaluationError("no answer tokens to measure (every answer was empty)")
    f = flatten(answers)
    total_X = f["real_LX"].sum(0)
    moe_layers = f["real_LX"].shape[0]
    by_family = {}
    for g in dict.fromkeys(f["group"]):
        keep = f["group"] == g
        by_family[str(g)] = _relation(total_X[keep], {k: f[k][keep] for k in ("entropy", "reverse_kl", "disagree")})
    return {
        "answers": len(answers),
        "tokens": len(total_X),
        "top_k": cfg.num_experts_per_tok,
        "moe_layers": moe_layers,
        "static_real_per_token": cfg.num_experts_per_tok * moe_layers,  # what the teacher spends on every token
        "overall": _relation(total_X, f),
        "by_family": by_family,
        "by_layer": [_relation(f["real_LX"][layer], f) for layer in range(moe_layers)],
        "by_entropy_decile": entropy_deciles(total_X, f["entropy"]),
    }


def entropy_deciles(real_X: np.ndarray, entropy_X: np.ndarray, bins: int = 10) -> list[dict]:
    """Mean real-expert use in each tenth of the tokens ordered by teacher entropy (the plot's lower panel)."""
    order = np.argsort(entropy_X, kind="stable")
    return [{"entropy_mean": round(float(entropy_X[part].mean()), 4), "mean_real": round(float(real_X[part].mean()), 4),
             "tokens": len(part)} for part in np.array_split(order, bins) if len(part)]


def plot(path, example: AnswerCompute, pieces: Sequence[str], report: dict, title: str) -> bool:
    """One answer token by token (real experts summed over layers, and per layer) above the aggregate relation
    with the teacher's entropy. False when matplotlib (the `plot` extra) is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ModuleNotFoundError:
        return False
    max_real = report["static_real_per_token"]
    real_T = example.real_LA.sum(0)
    A = len(real_T)
    fig, (top, mid, low) = plt.subplots(3, 1, figsize=(max(8.0, 0.22 * A + 2), 9.5),
                                        gridspec_kw={"height_ratios": [2.2, 1.6, 2.2]})
    top.bar(range(A), real_T, color=[tuple(c / 255 for c in colour(v / max_real)) for v in real_T], width=0.9)
    top.axhline(max_real, color="black", ls="--", lw=1, label=f"static model ({max_real})")
    top.set_xticks(range(A), [p.replace("\n", "\u21b5") or "\u00b7" for p in pieces], fontsize=8, family="monospace")
    top.set_xlim(-0.6, A - 0.4)
    top.set_ylabel("real experts\n(sum over layers)")
    top.set_title(f"{title}: {example.where}")
    top.legend(loc="lower right", fontsize=8)
    image = mid.imshow(example.real_LA, aspect="auto", cmap="RdYlGn_r", vmin=0, vmax=report["top_k"],
                       interpolation="nearest")
    mid.set_ylabel("MoE layer")
    mid.set_xlabel("answer token")
    fig.colorbar(image, ax=mid, pad=0.01, label="real of K")
    deciles = report["by_entropy_decile"]  # equal token counts: the entropies are far from evenly spread
    rho = report["overall"]["spearman_entropy"]
    low.plot(range(len(deciles)), [d["mean_real"] for d in deciles], "o-",
             label="all answer tokens (Spearman " + ("n/a" if rho is None else f"{rho:+.3f}") + ")")
    low.set_xticks(range(len(deciles)), [f"{d['entropy_mean']:.2g}" for d in deciles], fontsize=8)
    low.set_xlabel("teacher next-token entropy (nats): mean of each tenth of the answer tokens, lowest first")
    low.set_ylabel("mean real experts\n(sum over layers)")
    low.legend(fontsize=8)
    low.grid(alpha=0.3)
    fig.tight_layout()
    save_figure_atomic(fig, path, dpi=110)
    plt.close(fig)
    return True


def pick_example(answers: Sequence[AnswerCompute], group: str | None = None) -> AnswerCompute:
    """The answer with the widest spread of compute across its tokens (the most to look at), of `group` if any;
    short answers are left out so the picture has words in it."""
    pool = [a for a in answers if group is None or a.group == group] or list(answers)
    long_enough = [a for a in pool if 12 <= len(a.answer) <= 60] or pool
    return max(long_enough, key=lambda a: (float(a.real_LA.sum(0).std()), a.where))
