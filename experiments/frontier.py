"""The accuracy-compute frontier on a shipped teacher: ZEDA at several zero shares against the baselines a user
would pick instead, every method scored on the same test items (greedy) with expert FLOPs counted the same way.

    python experiments/frontier.py --arch qwen3_moe          # about an hour on a 2-core CPU; run it again to continue
    python experiments/frontier.py --arch glm4_moe_lite
    make frontier                                 # both teachers, one after the other
    python experiments/frontier.py --arch qwen3_moe --report   # only rebuild the table, JSON and plot

Methods (docs/results.md explains each; zeda/baselines.py holds the training-free rules):
  ZEDA SFT / ZEDA SFT+OPD   convert (Z = N/2), SFT with the GA weight w set for each target zero share
                            (w = w_scale * s/(1-s) * N/Z, docs/method.md §4), then OPD; the same rollouts for all
  ZEDA dial                 the 50% ZEDA SFT+OPD model with a zero-expert logit bias B, no retraining
  static top-k'             training-free: the teacher keeps its k' highest-weighted of K slots
  top-p                     training-free: slots in weight order until their cumulative weight reaches p
  static top-k' (fine-tuned)  the teacher fine-tuned under top-k' routing with ZEDA's SFT budget
  AdaMoE                    null experts (real weights renormalised over the real slots) trained with a Switch-style
                            balance loss over all N+Z, Z set for the share (Z/(N+Z) = s), ZEDA's SFT budget
  ablations (50%)           ZEDA SFT without the Group Auxiliary Loss (alpha 0); ZEDA OPD only (from the converted model)
Where OPD pays: at the --seed-shares, SFT and SFT+OPD with --seeds seeds, compared seed by seed on the same items.

Every training stage is one of the repository's scripts, run as its own process (the commands are printed); a
finished model (OUT/<point>/final) or evaluation (OUT/evals/<point>.json) is never redone, so an interrupted run
continues where it stopped. It ends with a table and writes RESULTS/frontier-<arch>.json, .md and, with matplotlib
installed (the `plot` extra), .png.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from zeda_toy import tasks
from zeda.config import ModelConfig
from zeda.data import check_writable, save_figure_atomic, write_report
from zeda.errors import DataError, UsageError, ZedaError, exit_status
from zeda.evaluation import write_json_atomic
from zeda.flags import float_range, int_range
from zeda_toy.stages import ROOT, SHIPPED_TEACHERS, StageFailed, evaluate_folder, run_script, write_prompt_files

HEADLINE_SHARE = 0.5      # the README's comparison: every method within HEADLINE_WINDOW of 50% expert FLOPs saved
HEADLINE_WINDOW = 0.05
METHOD_ORDER = ("teacher", "converted, no training", "ZEDA SFT+OPD", "ZEDA SFT", "ZEDA dial (one model, zero bias B)",
                "static top-k' (fine-tuned)", "AdaMoE (null experts + Switch loss)", "static top-k' (training-free)",
                "top-p (training-free)", "ZEDA SFT without GA loss (alpha 0)", "ZEDA OPD only (no SFT)")


@dataclass
class Job:
    """One training or conversion run: its output folder and the command that makes it."""
    folder: Path
    cmd: list[str]
    done_marker: str = "final/config.json"  # conversions mark themselves with config.json

    @property
    def done(self) -> bool:
        return (self.folder / self.done_marker).exists()

    @property
    def resumable(self) -> bool:
        """A training run (possibly through experiments/variant.py), which continues from its checkpoints."""
        return "train_sft.py" in self.cmd or "train_opd.py" in self.cmd


@dataclass
class Point:
    """One evaluated model: a point on the frontier plot."""
    name: str                # unique; the file OUT/evals/<name>.json
    method: str              # the plot line / table group
    target: float | None     # the zero share (or FLOP saving) aimed at
    model: Path
    routing: str = "native"
    zero_bias: float = 0.0
    seed: int = 0
    needs: list[Job] = field(default_factory=list)


def share_tag(s: float) -> str:
    return f"{100 * s:g}"


def plan(args, teacher: Path, out: Path) -> list[Point]:
    """Every point (and through it, the jobs it needs) of the frontier, in the order they run (the most telling
    first)."""
    cfg = ModelConfig.from_hf_config(teacher)
    N, K = cfg.num_experts, cfg.num_experts_per_tok
    Z = N // 2
    rollouts, prompts_opd = out / "rollouts.jsonl", out / "prompts_opd.jsonl"
    sft_common = ["--rollouts", str(rollouts), "--epochs", str(args.sft_epochs),
                  "--global-batch-size", str(args.sft_batch_size),
                  "--micro-batch-size", str(math.gcd(16, args.sft_batch_size)), "--lr", str(args.sft_lr),
                  "--keep-unfinished"]  # every rollout, as pipeline.py: the measured frontier trained on all of them
    opd_common = ["--teacher", str(teacher), "--prompts", str(prompts_opd), "--max-steps", str(args.opd_steps),
                  "--lr", str(args.opd_lr), "--max-new-tokens", str(args.max_new_tokens)]

    converted = Job(out / "converted", ["convert.py", "--input-dir", str(teacher), "--output-dir",
                                        str(out / "converted"), "--num-zero-experts", str(Z), "--overwrite"],
                    done_marker="config.json")
    points: list[Point] = [Point("teacher", "teacher", 0.0, teacher),
                           Point("converted", "converted, no training", None, converted.folder, needs=[converted])]

    def zeda(s: float, seed: int) -> tuple[Point, Point]:
        w = args.w_scale * s / (1 - s) * N / Z
        tag = f"{share_tag(s)}-s{seed}"
        sft = Job(out / f"zeda-sft-{tag}", ["train_sft.py", "--student", str(converted.folder), "--out",
                                            str(out / f"zeda-sft-{tag}"), *sft_common, "--alpha", str(args.alpha),
                                            "--w", f"{w:.4f}", "--seed", str(seed)])
        opd = Job(out / f"zeda-opd-{tag}", ["train_opd.py", "--student", str(sft.folder / "final"), "--out",
                                            str(out / f"zeda-opd-{tag}"), *opd_common, "--alpha", str(args.alpha),
                                            "--w", f"{w:.4f}", "--seed", str(seed)])
        return (Point(f"zeda-sft-{tag}", "ZEDA SFT", s, sft.folder / "final", seed=seed, needs=[converted, sft]),
                Point(f"zeda-opd-{tag}", "ZEDA SFT+OPD", s, opd.folder / "final", seed=seed,
                      needs=[converted, sft, opd]))

    headline_opd = None
    for s in args.shares:
        sft_point, opd_point = zeda(s, 0)
        points += [sft_point, opd_point]
        if s == HEADLINE_SHARE:
            headline_opd = opd_point
    for k in args.static_ft:
        folder = out / f"static-ft-top{k}"
        job = Job(folder, ["experiments/variant.py", "--routing", f"topk:{k}", "train_sft.py", "--student",
                           str(teacher), "--out", str(folder), *sft_common, "--seed", "0"])
        points.append(Point(f"static-ft-top{k}", "static top-k' (fine-tuned)", 1 - k / K, folder / "final",
                            routing=f"topk:{k}", needs=[job]))
    for s in args.adamoe_shares:
        z = max(1, round(s / (1 - s) * N))
        conv = Job(out / f"adamoe-converted-z{z}", ["experiments/variant.py", "--normalization", "adamoe",
                                                     "convert.py", "--input-dir", str(teacher), "--output-dir",
                                                     str(out / f"adamoe-converted-z{z}"), "--num-zero-experts", str(z),
                                                     "--overwrite"],
                   done_marker="config.json")
        sft = Job(out / f"adamoe-{share_tag(s)}", ["experiments/variant.py", "--aux-loss", "switch", "train_sft.py",
                                                   "--student", str(conv.folder), "--out",
                                                   str(out / f"adamoe-{share_tag(s)}"), *sft_common,
                                                   "--alpha", str(args.alpha), "--seed", "0"])
        points.append(Point(f"adamoe-{share_tag(s)}", "AdaMoE (null experts + Switch loss)", s, sft.folder / "final",
                            needs=[conv, sft]))
    for k in range(K - 1, 0, -1):
        points.append(Point(f"topk{k}", "static top-k' (training-free)", 1 - k / K, teacher, routing=f"topk:{k}"))
    for p in args.top_p:
        points.append(Point(f"topp{p:g}", "top-p (training-free)", None, teacher, routing=f"topp:{p:g}"))
    if headline_opd is not None:
        for b in args.dial:
            points.append(Point(f"dial{b:+g}", "ZEDA dial (one model, zero bias B)", None, headline_opd.model,
                                zero_bias=b, needs=headline_opd.needs))
    if HEADLINE_SHARE in args.shares and not args.no_ablations:
        w = args.w_scale * HEADLINE_SHARE / (1 - HEADLINE_SHARE) * N / Z
        no_ga = Job(out / "ablation-no-ga", ["train_sft.py", "--student", str(converted.folder), "--out",
                                             str(out / "ablation-no-ga"), *sft_common, "--alpha", "0", "--seed", "0"])
        opd_only = Job(out / "ablation-opd-only", ["train_opd.py", "--student", str(converted.folder), "--out",
                                                   str(out / "ablation-opd-only"), *opd_common, "--alpha",
                                                   str(args.alpha), "--w", f"{w:.4f}", "--seed", "0"])
        points += [Point("ablation-no-ga", "ZEDA SFT without GA loss (alpha 0)", None, no_ga.folder / "final",
                         needs=[converted, no_ga]),
                   Point("ablation-opd-only", "ZEDA OPD only (no SFT)", HEADLINE_SHARE, opd_only.folder / "final",
                         needs=[converted, opd_only])]
    for s in args.seed_shares:  # last: the seeds of "where OPD pays" are the most expensive and the least central
        for seed in range(1, args.seeds):
            points += list(zeda(s, seed))
    return points


# ---------------------------------------------------------------------------------------------------------------
# Reading the evaluations.


def summary_row(point: Point, report: dict) -> dict:
    return {**{k: v for k, v in asdict(point).items() if k != "needs"}, "model": str(point.model),
            "accuracy": report["accuracy"], "zero_expert_ratio": report["zero_expert_ratio"],
            "expert_flops_reduction": report["expert_flops_reduction"],
            "forward_flops_reduction": report["forward_flops_reduction"],
            "tokens_per_second": report["tokens_per_second"],
            "correct_items": "".join(report["counts"][f]["correct_items"] for f in tasks.FAMILIES)}


def paired(a: dict, b: dict) -> tuple[float, float]:
    """Mean of b - a over the same items (accuracy points) and its standard error (per-item paired differences)."""
    x, y = a["correct_items"], b["correct_items"]
    if len(x) != len(y) or not x:
        raise ValueError("paired comparison needs the same items")
    d = [int(q) - int(p) for p, q in zip(x, y)]
    n = len(d)
    mean = sum(d) / n
    var = sum((v - mean) ** 2 for v in d) / max(n - 1, 1)
    return 100 * mean, 100 * math.sqrt(var / n)


def where_opd_pays(rows: dict[str, dict]) -> list[dict]:
    """Per target share with both stages measured: SFT+OPD minus SFT, seed by seed (paired over items), and whether
    the mean gain exceeds twice its noise (the larger of the seed-to-seed and the item-level standard error)."""
    found = []
    shares = sorted({r["target"] for r in rows.values() if r["method"] == "ZEDA SFT+OPD"})
    for s in shares:
        per_seed = []
        for r in rows.values():
            if r["method"] == "ZEDA SFT+OPD" and r["target"] == s:
                sft = rows.get(r["name"].replace("zeda-opd-", "zeda-sft-"))
                if sft is not None:
                    gain, se = paired(sft, r)
                    per_seed.append({"seed": r["seed"], "sft": 100 * sft["accuracy"]["average"],
                                     "sft_opd": 100 * r["accuracy"]["average"], "gain": gain, "paired_se": se})
        if not per_seed:
            continue
        gains = [p["gain"] for p in per_seed]
        mean = sum(gains) / len(gains)
        seed_se = (math.sqrt(sum((g - mean) ** 2 for g in gains) / (len(gains) - 1) / len(gains))
                   if len(gains) > 1 else 0.0)
        item_se = math.sqrt(sum(p["paired_se"] ** 2 for p in per_seed)) / len(per_seed)
        noise = max(seed_se, item_se)
        found.append({"target": s, "seeds": len(per_seed), "per_seed": per_seed, "mean_gain": mean,
                      "seed_se": seed_se, "item_se": item_se, "noise_se": noise,
                      "verdict": ("OPD helps" if mean > 2 * noise else "OPD hurts" if mean < -2 * noise
                                  else "within noise")})
    return found


def headline(rows: dict[str, dict]) -> dict | None:
    """Teacher, ZEDA SFT+OPD near 50% expert FLOPs saved, and the best other method in the same window."""
    zeda = rows.get(f"zeda-opd-{share_tag(HEADLINE_SHARE)}-s0")
    if zeda is None or "teacher" not in rows:
        return None
    window = [r for r in rows.values() if abs(r["expert_flops_reduction"] - HEADLINE_SHARE) <= HEADLINE_WINDOW
              and not r["method"].startswith("ZEDA") and r["method"] != "teacher"]
    best = max(window, key=lambda r: r["accuracy"]["average"], default=None)
    trained = [r for r in window if "fine-tuned" in r["method"] or "AdaMoE" in r["method"]]
    best_trained = max(trained, key=lambda r: r["accuracy"]["average"], default=None)

    def brief(r):
        return None if r is None else {"name": r["name"], "method": r["method"],
                                       "accuracy": 100 * r["accuracy"]["average"],
                                       "expert_flops_saved": 100 * r["expert_flops_reduction"]}
    z = brief(zeda)
    return {"teacher": brief(rows["teacher"]), "zeda_sft_opd": z, "best_baseline": brief(best),
            "best_trained_baseline": brief(best_trained),
            "gap_points": None if best is None else z["accuracy"] - 100 * best["accuracy"]["average"],
            "gap_points_trained": (None if best_trained is None
                                   else z["accuracy"] - 100 * best_trained["accuracy"]["average"]),
            "window": f"expert FLOPs saved within {100 * HEADLINE_WINDOW:g} points of {100 * HEADLINE_SHARE:g}%"}


TRAINED_BASELINES = ("static top-k' (fine-tuned)", "AdaMoE (null experts + Switch loss)")


def margins(rows: dict[str, dict]) -> list[dict]:
    """Per ZEDA target share: SFT+OPD (every seed) against the best trained baseline aimed at the same share, paired
    over the same items; the mean over seeds, with the item-level standard error of that mean."""
    found = []
    for s in sorted({r["target"] for r in rows.values() if r["method"] == "ZEDA SFT+OPD"}):
        rivals = [r for r in rows.values() if r["method"] in TRAINED_BASELINES and r["target"] == s]
        if not rivals:
            continue
        best = max(rivals, key=lambda r: r["accuracy"]["average"])
        seeds = [r for r in rows.values() if r["method"] == "ZEDA SFT+OPD" and r["target"] == s]
        pairs = [paired(best, z) for z in seeds]
        found.append({"target": s, "baseline": best["name"], "baseline_method": best["method"],
                      "baseline_accuracy": 100 * best["accuracy"]["average"],
                      "baseline_saved": 100 * best["expert_flops_reduction"],
                      "zeda_accuracy": [100 * z["accuracy"]["average"] for z in seeds],
                      "zeda_saved": [100 * z["expert_flops_reduction"] for z in seeds],
                      "mean_gap": sum(g for g, _ in pairs) / len(pairs),
                      "item_se": math.sqrt(sum(se ** 2 for _, se in pairs)) / len(pairs)})
    return found


def markdown(arch: str, rows: dict[str, dict], opd: list[dict], head: dict | None, n: int,
             margin: list[dict] = ()) -> str:
    lines = [f"# Accuracy-compute frontier: {arch} teacher", "",
             (f"{n} test items per family ({', '.join(tasks.FAMILIES)}), greedy; accuracy in %; expert FLOPs saved "
             "against the static teacher on the same tokens. Made by `python experiments/frontier.py`."), "",
             "| method | point | target | zero share | expert FLOPs saved | forward FLOPs saved | "
             + " | ".join(tasks.FAMILIES) + " | average |",
             "|---|---|---:|---:|---:|---:|" + "---:|" * (len(tasks.FAMILIES) + 1)]
    for r in sorted(rows.values(), key=lambda r: (METHOD_ORDER.index(r["method"]), r["expert_flops_reduction"])):
        target = "" if r["target"] is None else f"{100 * r['target']:g}%"
        acc = " | ".join(f"{100 * r['accuracy'][f]:.1f}" for f in tasks.FAMILIES)
        lines.append(f"| {r['method']} | {r['name']} | {target} | {100 * r['zero_expert_ratio']:.1f}% | "
                     f"{100 * r['expert_flops_reduction']:.1f}% | {100 * r['forward_flops_reduction']:.1f}% | "
                     f"{acc} | **{100 * r['accuracy']['average']:.1f}** |")
    if head:
        lines += ["", f"At ~50% expert FLOPs saved ({head['window']}):", ""]
        for key in ("teacher", "zeda_sft_opd", "best_baseline", "best_trained_baseline"):
            b = head[key]
            if b:
                lines.append(f"- {key.replace('_', ' ')}: {b['method']} ({b['name']}) {b['accuracy']:.1f}% at "
                             f"{b['expert_flops_saved']:.1f}% saved")
        if head["gap_points"] is not None:
            lines.append(f"- ZEDA SFT+OPD minus the best baseline: {head['gap_points']:+.1f} points")
        if head["gap_points_trained"] is not None:
            lines.append(f"- ZEDA SFT+OPD minus the best trained baseline: {head['gap_points_trained']:+.1f} points")
    if margin:
        lines += ["", ("ZEDA SFT+OPD against the best trained baseline at the same target (paired over the same items; "
                  "mean over ZEDA's seeds):"), "",
                  "| target | baseline | baseline acc (saved) | ZEDA acc per seed (saved) | gap, points | item SE |",
                  "|---:|---|---:|---|---:|---:|"]
        for m in margin:
            per_seed = ", ".join(f"{a:.1f} ({v:.1f}%)" for a, v in zip(m["zeda_accuracy"], m["zeda_saved"]))
            lines.append(f"| {100 * m['target']:g}% | {m['baseline']} | {m['baseline_accuracy']:.1f} "
                         f"({m['baseline_saved']:.1f}%) | {per_seed} | {m['mean_gap']:+.2f} | {m['item_se']:.2f} |")
    if opd:
        lines += ["", "Where OPD pays (SFT+OPD minus SFT on the same items, accuracy points):", "",
                  ("| target share | seeds | per seed (SFT -> SFT+OPD, gain ± paired SE) | mean gain | noise SE | "
                  "verdict |"), "|---:|---:|---|---:|---:|---|"]
        for o in opd:
            seeds = "; ".join(f"s{p['seed']}: {p['sft']:.1f} -> {p['sft_opd']:.1f} ({p['gain']:+.1f} ± "
                              f"{p['paired_se']:.1f})" for p in o["per_seed"])
            lines.append(f"| {100 * o['target']:g}% | {o['seeds']} | {seeds} | {o['mean_gain']:+.2f} | "
                         f"{o['noise_se']:.2f} | {o['verdict']} |")
    return "\n".join(lines) + "\n"


def plot(path: Path, arch: str, rows: dict[str, dict]) -> bool:
    """Accuracy against expert FLOPs saved, a line per method, the teacher as a horizontal line. False without
    matplotlib (the `plot` extra)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(8, 5.5))
    by_method: dict[str, list[dict]] = {}
    for r in rows.values():
        if r["seed"] == 0:  # extra seeds are in the table and the OPD verdict, not the lines
            by_method.setdefault(r["method"], []).append(r)
    styles = {"ZEDA SFT+OPD": ("C0", "o", "-"), "ZEDA SFT": ("C1", "s", "-"),
              "ZEDA dial (one model, zero bias B)": ("C0", ".", ":"),
              "static top-k' (training-free)": ("C3", "v", "--"), "top-p (training-free)": ("C4", "^", "--"),
              "static top-k' (fine-tuned)": ("C3", "D", "-"), "AdaMoE (null experts + Switch loss)": ("C2", "P", "-"),
              "converted, no training": ("C7", "x", "none"), "ZEDA SFT without GA loss (alpha 0)": ("C5", "X", "none"),
              "ZEDA OPD only (no SFT)": ("C6", "*", "none")}
    for method, rs in by_method.items():
        if method == "teacher":
            ax.axhline(100 * rs[0]["accuracy"]["average"], color="k", ls="--", lw=1, label="teacher (static)")
            continue
        rs = sorted(rs, key=lambda r: r["expert_flops_reduction"])
        color, marker, ls = styles.get(method, ("C7", "x", "none"))
        ax.plot([100 * r["expert_flops_reduction"] for r in rs], [100 * r["accuracy"]["average"] for r in rs],
                color=color, marker=marker, ls=ls, label=method)
    ax.set_xlabel("expert FLOPs saved (%)")
    ax.set_ylabel("accuracy, mean over task families (%)")
    ax.set_title(f"zeda frontier: {arch} teacher")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    save_figure_atomic(fig, path, dpi=120)
    plt.close(fig)
    return True


RESUME_KEYS = ("n", "max_new_tokens", "sft_prompts", "sft_epochs", "sft_lr", "sft_batch_size", "opd_prompts",
               "opd_steps", "opd_lr", "alpha", "w_scale")


def read_json(path: Path, what: str) -> dict:
    """A JSON object frontier.py wrote before. A damaged one (truncated, hand-edited) is refused, naming it: read
    as "nothing measured", a rerun would silently measure hours of points again."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: damaged {what} ({e}); restore it (git checkout for a committed one), or remove "
                        f"it to measure again") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: damaged {what} (not a JSON object); restore it, or remove it to measure again")
    return data


def committed(args) -> tuple[dict[str, dict], float]:
    """The points already in RESULTS/frontier-<arch>.json, and the seconds they took, when it was made with the
    same settings: a fresh clone continues a frontier from the committed results instead of measuring those
    points again. ({}, 0.0) when there is none, or it was made with other settings."""
    path = args.results / f"frontier-{args.arch}.json"
    if not path.exists():
        return {}, 0.0
    data = read_json(path, "frontier results")
    try:
        if not all(data["settings"].get(k) == getattr(args, k) for k in RESUME_KEYS):
            return {}, 0.0
        return {r["name"]: r for r in data["points"]}, float(data.get("seconds", 0.0))
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise DataError(f"{path}: damaged frontier results (no usable {e}); restore it (git checkout), or remove it "
                        f"to measure again") from None


def report(args, teacher: Path, out: Path, points: list[Point], seconds: float, known: dict[str, dict]) -> int:
    rows = {name: r for name, r in known.items() if name in {p.name for p in points}}
    for p in points:
        f = out / "evals" / f"{p.name}.json"
        if f.exists():
            evaluation = read_json(f, "evaluation")  # refuses a file that is not JSON, naming it
            try:
                rows[p.name] = summary_row(p, evaluation)
            except (KeyError, TypeError, ValueError, AttributeError) as e:
                raise DataError(f"{f}: damaged evaluation (no usable {e}); remove it to measure that point "
                                f"again") from None
    if not rows:
        print(f"frontier.py: nothing measured yet in {out / 'evals'}", file=sys.stderr)
        return 1
    opd, head, margin = where_opd_pays(rows), headline(rows), margins(rows)
    results = args.results
    results.mkdir(parents=True, exist_ok=True)
    stem = results / f"frontier-{args.arch}"
    data = {"arch": args.arch, "teacher": str(teacher.relative_to(ROOT) if teacher.is_relative_to(ROOT) else teacher),
            "n_per_family": args.n, "max_new_tokens": args.max_new_tokens,
            "settings": {k: (v if isinstance(v, (int, float, list)) else str(v)) for k, v in vars(args).items()
                         if k not in ("out", "results", "report")},
            "seconds": round(seconds, 1), "missing": [p.name for p in points if p.name not in rows],
            "headline": head, "margins": margin, "where_opd_pays": opd, "points": list(rows.values())}
    md = markdown(args.arch, rows, opd, head, args.n, margin)
    print("\n" + md)
    # The measured points are safe in --out's evals/; a failed write here loses only this summary, and the
    # summary goes to stdout instead.
    if not (write_report(stem.with_suffix(".json"), json.dumps(data, indent=2, ensure_ascii=False) + "\n",
                         "frontier.py", "results")
            and write_report(stem.with_suffix(".md"), md, "frontier.py", "table")):
        return 2
    try:
        drew = plot(stem.with_suffix(".png"), args.arch, rows)
    except OSError as e:
        print(f"frontier.py: error: cannot write the plot {stem}.png ({e.strerror or e})", file=sys.stderr)
        return 2
    print(f"wrote {stem}.json, {stem}.md" + (f", {stem}.png" if drew else " (no plot: pip install matplotlib)"))
    if data["missing"]:
        print(f"not measured yet: {', '.join(data['missing'])} (run the same command again to continue)")
    print(f"frontier time so far: {seconds / 60:.1f} min")
    return 0


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="frontier.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="qwen3_moe", choices=sorted(SHIPPED_TEACHERS), help="which shipped teacher")
    p.add_argument("--teacher", type=Path, default=None, help="teacher folder (default: the shipped one)")
    p.add_argument("--out", type=Path, default=None, help="work folder (default runs/frontier-<arch>)")
    p.add_argument("--results", type=Path, default=ROOT / "docs" / "results",
                   help="where frontier-<arch>.json/.md/.png go")
    p.add_argument("--shares", type=lambda s: [float(x) for x in s.split(",")], default=[0.25, 0.5, 0.625, 0.75],
                   help="ZEDA target zero shares")
    p.add_argument("--w-scale", type=float_range(above=0), default=1.1,
                   help="w = w_scale * s/(1-s) * N/Z; 1.1 is the main job's w 2.2 at 50%%, chosen on the held-out "
                        "slice of the train split")
    p.add_argument("--static-ft", type=lambda s: [int(x) for x in s.split(",") if x], default=[2, 1],
                   help="k' of the fine-tuned static top-k' baselines")
    p.add_argument("--adamoe-shares", type=lambda s: [float(x) for x in s.split(",") if x], default=[0.5, 0.75],
                   help="zero shares of the AdaMoE baselines (Z = s/(1-s) N)")
    p.add_argument("--top-p", type=lambda s: [float(x) for x in s.split(",") if x], default=[0.8, 0.7, 0.6, 0.5],
                   help="p of the training-free top-p baselines")
    p.add_argument("--dial", type=lambda s: [float(x) for x in s.split(",") if x],
                   default=[-1.0, -0.5, -0.25, 0.25, 0.5, 0.75], help="zero biases B on the 50%% ZEDA SFT+OPD model")
    p.add_argument("--seed-shares", type=lambda s: [float(x) for x in s.split(",") if x], default=[0.75],
                   help="shares where SFT and SFT+OPD are trained with --seeds seeds (where OPD pays)")
    p.add_argument("--seeds", type=int_range(min=1), default=3, help="seeds at --seed-shares")
    p.add_argument("--no-ablations", action="store_true", help="skip the no-GA and OPD-only ablations")
    p.add_argument("--n", type=int_range(min=1), default=300, help="test items per family for each evaluation")
    p.add_argument("--alpha", type=float_range(min=0), default=0.1, help="GA / Switch loss weight")
    p.add_argument("--sft-prompts", type=int_range(min=1), default=6000, help="SFT prompts per family")
    p.add_argument("--sft-epochs", type=int_range(min=1), default=1)
    p.add_argument("--sft-lr", type=float_range(above=0), default=2e-4)
    p.add_argument("--sft-batch-size", type=int_range(min=1), default=32)
    p.add_argument("--opd-prompts", type=int_range(min=1), default=1000, help="OPD prompts per family")
    p.add_argument("--opd-steps", type=int_range(min=1), default=60)
    p.add_argument("--opd-lr", type=float_range(above=0), default=3e-5)
    p.add_argument("--max-new-tokens", type=int_range(min=1), default=160)
    p.add_argument("--batch-size", type=int_range(min=1), default=64, help="prompts per generation batch")
    p.add_argument("--threads", type=int_range(min=1), default=None, help="torch CPU threads per stage")
    p.add_argument("--report", action="store_true", help="train and evaluate nothing: rebuild the outputs")
    args = p.parse_args(argv)
    for name in ("shares", "adamoe_shares", "seed_shares"):
        bad = [s for s in getattr(args, name) if not 0 < s < 1]
        if bad:
            p.error(f"--{name.replace('_', '-')}: shares must be in (0, 1), got {bad}")
    bad = [s for s in args.seed_shares if s not in args.shares]
    if bad:
        p.error(f"--seed-shares {bad} are not among --shares {args.shares}")
    if any(not 0 < x <= 1 for x in args.top_p):
        p.error(f"--top-p: each p must be in (0, 1], got {args.top_p}")
    if any(not math.isfinite(b) for b in args.dial):
        p.error(f"--dial: biases must be finite, got {args.dial}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    teacher = args.teacher or SHIPPED_TEACHERS[args.arch]
    out = args.out or ROOT / "runs" / f"frontier-{args.arch}"
    try:
        check_writable(out, "--out", folder=True)
        check_writable(args.results, "--results", folder=True)
        K = ModelConfig.from_hf_config(teacher).num_experts_per_tok
        if any(not 1 <= k < K for k in args.static_ft):
            raise UsageError(f"--static-ft: each k' must be in [1, {K - 1}] (the teacher's top-k is {K})")
        points = plan(args, teacher, out)
    except (ZedaError, OSError) as e:
        print(f"frontier.py: error: {e}", file=sys.stderr)
        return 2
    clock = out / "seconds.json"  # run time summed over resumed runs
    try:
        known, known_seconds = committed(args)
        spent = float(read_json(clock, "run clock").get("seconds", 0.0)) if clock.exists() else known_seconds
    except (ZedaError, TypeError, ValueError) as e:
        print(f"frontier.py: error: {e}", file=sys.stderr)
        return 2
    t0 = time.time()
    if not args.report:
        try:
            run_all(args, teacher, out, points, known, lambda: write_json_atomic(
                clock, {"seconds": spent + time.time() - t0}))
        except StageFailed as e:
            stopped = e.code in (130, 143)
            print(f"frontier.py: {e}; {'what it saved is kept' if stopped else 'stopping'}. Run the same command "
                  "again to continue", file=sys.stderr)
            return e.code
        except (ZedaError, OSError) as e:
            print(f"frontier.py: error: {e}", file=sys.stderr)
            return 2
    try:
        return report(args, teacher, out, points, spent + (0 if args.report else time.time() - t0), known)
    except ZedaError as e:
        print(f"frontier.py: error: {e}", file=sys.stderr)
        return 2


def run_all(args, teacher: Path, out: Path, points: list[Point], known: dict[str, dict], tick) -> None:
    """For each point not yet measured: the jobs it still needs (the rollouts before the first), then its
    evaluation, in plan order."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "evals").mkdir(exist_ok=True)
    todo = [p for p in points if p.name not in known and not (out / "evals" / f"{p.name}.json").exists()]
    for point in tqdm(todo, desc=f"frontier {args.arch}", unit="point"):
        for job in point.needs:
            if not job.done:
                make_rollouts(args, teacher, out, tick)
                # --resume continues a run a signal stopped; on an empty folder it starts at step 0
                run_script(job.cmd + (["--resume"] if job.resumable else []), args.threads)
                tick()
        rep = evaluate_folder(point.model, args.n, args.max_new_tokens, args.batch_size, 0,
                              routing=point.routing, zero_bias=point.zero_bias)
        saved = out / "evals" / f"{point.name}.json"
        if not write_report(saved, json.dumps(rep, indent=2, ensure_ascii=False) + "\n", "frontier.py",
                            f"evaluation of {point.name}"):
            raise DataError(f"{saved}: not saved (above); fix the disk and run the same command again")
        print(f"[{point.name}] {point.method}: {100 * rep['accuracy']['average']:.1f}% at "
              f"{100 * rep['expert_flops_reduction']:.1f}% expert FLOPs saved", flush=True)
        tick()


def make_rollouts(args, teacher: Path, out: Path, tick) -> None:
    """The teacher's answers to the SFT prompts, once: every SFT run of the frontier trains on the same ones."""
    if (out / "rollouts.done").exists():
        return
    write_prompt_files(out, args.sft_prompts, args.opd_prompts, 0)
    run_script(["rollout.py", "--teacher", str(teacher), "--prompts", str(out / "prompts_sft.jsonl"), "--out",
                str(out / "rollouts.jsonl"), "--max-new-tokens", str(args.max_new_tokens), "--batch-size",
                str(args.batch_size), "--seed", "0"], args.threads)  # appends to what is there: its resume
    (out / "rollouts.done").touch()
    tick()

if __name__ == "__main__":
    sys.exit(exit_status("frontier.py", main))
