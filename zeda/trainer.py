"""The training harness both stages share (train_sft.py, train_opd.py), so each script reads as the paper's
steps and nothing else.

A run lives in one output folder OUT:
    OUT/metrics.jsonl    one JSON line per optimizer step (each step exactly once, also after --resume)
    OUT/step-N/          a resumable checkpoint every --save-every steps, and when a signal stops the run
    OUT/final/           the trained model at the end (an HF checkpoint folder any zeda script loads)
    OUT/summary.json     what the run did, for people and for the pipeline
Checkpoints hold the HF-layout weights, the optimizer state (safetensors, keyed '<parameter>::<field>', no
pickle) and the trainer state (JSON), written to a temporary folder and renamed: a crash never leaves half a
checkpoint (zeda/checkpoint.py:save_training_checkpoint). Data order and sampling seeds are functions of the
step, so a resumed run does exactly what the uninterrupted one would have. SIGTERM / Ctrl-C finish the current step, save, and exit 143 / 130 with the
command to resume; a non-finite loss stops the run naming the step, before anything is saved.

    with stop_on_signals() as stop:                   # run_training(script, train, args) does this part
        trainer = Trainer("sft", args, d, stop, init_from=args.student, total_steps=100)
        model = trainer.load_student()
        summary = trainer.run(step_fn, lr_fn)         # step_fn(step) -> metrics: forward + backward, this rank

Shape letters: L MoE layers, E = N + Z router outputs.
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from zeda.checkpoint import (STATE_FILE, latest_checkpoint, load_optimizer_state, read_trainer_state,
                             remove_old_checkpoints, save_training_checkpoint)
from zeda.data import check_writable, write_text_atomic
from zeda.distributed import Dist, init_distributed, shutdown
from zeda.errors import UsageError, ZedaError
from zeda.flags import add_compute_args, float_range, int_range
from zeda.loading import load_model
from zeda.optim import make_optimizer, set_lr
from zeda.precision import MasterWeights
from zeda.sharding import clip_grad_norm

METRICS_FILE = "metrics.jsonl"
EXIT_ON_SIGNAL = {"SIGINT": 130, "SIGTERM": 143}  # 128 + the signal number, as a shell reports it


# ----------------------------------------------------------------------------- schedule and optimizer

@dataclass(frozen=True)
class Swaps:
    """Pieces of a training stage that a baseline or an ablation replaces (experiments/variant.py builds one);
    the defaults are the method, and the scripts run with none: train_sft.main(argv, swaps),
    train_opd.main(argv, swaps). `name` is kept with the run's settings, so --resume refuses to continue a run
    under other swaps."""
    name: str = "zeda"
    routing: str = "native"  # train_sft: the student trains under this zeda/baselines.py rule (static top-k')
    routing_loss: Callable | None = None  # replaces zeda/losses.py:auxiliary_loss (same signature)
    policy_loss: Callable | None = None  # train_opd: replaces train_opd.py:ppo_policy (same signature)
    # train_opd, --updates-per-rollout > 1: whether policy_loss reads the old policy's and the teacher's log-probs
    # of the rollout (score_rollout, one no-grad forward of each per rollout); a loss that takes its own does not
    reads_rollout_scores: bool = True


def lr_at(step: int, total: int, peak: float, warmup_steps: int = 0, schedule: str = "cosine") -> float:
    """Linear warmup over warmup_steps, then cosine to 0 over the remaining steps (or constant)."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    if schedule == "constant":
        return peak
    progress = (step - warmup_steps) / max(1, total - warmup_steps)
    return peak * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


# ----------------------------------------------------------------------------- the run folder

def finished_steps(out: Path) -> int | None:
    """The steps of the finished run in OUT (its summary.json), or None."""
    try:
        return int(json.loads((out / "summary.json").read_text())["steps"])
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError):
        return None


# What a resumed run may change: where it lives, how long it runs, how often it saves, how it computes (not what).
RESUMABLE_CHANGES = {"out", "resume", "max_steps", "epochs", "save_every", "keep_last", "device", "expert_backend",
                     "activation_checkpointing", "allow_changed_settings", "show_examples"}


def changed_settings(saved_args: dict[str, str], args) -> list[str]:
    """The settings of `args` that differ from a checkpoint's (both as strings, as the trainer state keeps them):
    a resume with another lr, batch, seed or data would silently train a different run."""
    return [f"--{k.replace('_', '-')} {saved_args[k]} -> {v}" for k, v in sorted(vars(args).items())
            if k in saved_args and k not in RESUMABLE_CHANGES and saved_args[k] != str(v)]


def check_fresh_out(out: Path, resume: bool) -> None:
    """A run without --resume must not land in a folder that holds another run: its metrics.jsonl would be
    appended to and a later --resume could pick up the other run's checkpoints."""
    if resume:
        return
    found = [p.name for p in (out / METRICS_FILE, out / "final", *out.glob("step-*")) if p.exists()]
    if found:
        raise UsageError(f"{out} already holds a training run ({', '.join(sorted(found)[:3])}); pass --resume to "
                         f"continue it, or choose another --out")


def trim_metrics(path: Path, last_step: int) -> None:
    """Keep the metrics lines of steps <= last_step: a run killed after logging steps it never saved would
    otherwise log them twice once resumed."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= last_step:
                kept.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            break  # a torn last line from a kill: drop it and everything after
    write_text_atomic(path, "".join(f"{line}\n" for line in kept))


# ----------------------------------------------------------------------------- signals

@contextmanager
def stop_on_signals(restore: bool = True):
    """Within the block, SIGTERM / Ctrl-C set flag["signal"] instead of killing the run, so the training loop
    can finish the current step, save a checkpoint and exit cleanly. The previous handlers come back after;
    with restore=False the signals are ignored from then on instead (a torchrun worker: once one worker has
    exited, torchrun SIGTERMs the others, which are exiting too and must not die of it, even while the
    interpreter shuts down, when Python's own handlers are gone)."""
    flag = {"signal": None}
    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}

    def on_signal(signum, _frame):
        flag["signal"] = signal.Signals(signum).name

    for s in previous:
        signal.signal(s, on_signal)
    try:
        yield flag
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler if restore else signal.SIG_IGN)


# ----------------------------------------------------------------------------- the loop

def zero_share_metrics(counts_LE: torch.Tensor, num_experts: int, d: Dist) -> dict:
    """zero_ratio overall and per MoE layer from per-layer slot counts [L, E + 1] (zeda.flops.expert_counts),
    summed over the dp ranks."""
    counts_LE = d.all_reduce(counts_LE).double()
    real_L, zero_L = counts_LE[:, :num_experts].sum(1), counts_LE[:, num_experts:].sum(1)
    return {"zero_ratio": float(zero_L.sum() / (real_L + zero_L).sum().clamp(min=1)),
            "zero_ratio_per_layer": (zero_L / (real_L + zero_L).clamp(min=1)).tolist()}


class Trainer:
    """One training run in args.out: the output folder, resume, the optimizer (over fp32 masters), the step loop
    and its metrics, checkpoints, clean stops. The stage script supplies what one step computes."""

    def __init__(self, name: str, args, d: Dist, stop: dict, init_from: Path, total_steps: int):
        self.name, self.args, self.d, self.stop = name, args, d, stop
        self.out: Path = args.out
        self.init_from, self.total_steps = Path(init_from), total_steps
        check_fresh_out(self.out, args.resume)
        if d.is_main:
            check_writable(self.out, "--out", folder=True)
        # A finished run (final/ and summary.json, written last, for these steps) is not trained again by --resume;
        # one asked for more steps continues from its newest step-N (final/ holds no optimizer state).
        self.finished = args.resume and (self.out / "final").is_dir() and finished_steps(self.out) == total_steps
        self.resume_from = latest_checkpoint(self.out) if args.resume and not self.finished else None
        if args.resume and not self.finished and self.resume_from is None:
            d.print(f"--resume: no checkpoint in {self.out} yet; starting from step 0")
        if self.resume_from is not None and not args.allow_changed_settings:
            changed = changed_settings(read_trainer_state(self.resume_from).get("args", {}), args)
            if changed:
                raise UsageError(f"{self.resume_from / STATE_FILE}: --resume with other settings than the run's: "
                                 f"{'; '.join(changed)}. Use the run's settings, or pass --allow-changed-settings")
        self.model = self.opt = self.masters = None
        self.start_step = 0

    def load_student(self):
        """The model being trained, split over the mesh as it loads (router in fp32: the paper's recipe), from
        the newest checkpoint when resuming, with its fp32 masters and optimizer (and their state when resuming).
        A finished run's final model, for --resume of a run that has nothing left to do."""
        a = self.args
        if self.finished:
            self.model = load_model(self.out / "final", dtype=a.dtype, dist=self.d, expert_backend=a.expert_backend)
            return self.model
        self.model = load_model(self.resume_from or self.init_from, dtype=a.dtype, dist=self.d,
                                expert_backend=a.expert_backend, router_fp32=True, fp32_masters=True,
                                activation_checkpointing=a.activation_checkpointing)
        self.masters = MasterWeights(self.model)
        self.opt = make_optimizer(self.masters.named_params(), a.lr, betas=(a.beta1, a.beta2),
                                  weight_decay=a.weight_decay, optimizer=a.optimizer)
        if self.resume_from is not None:
            saved = read_trainer_state(self.resume_from)
            if saved.get("mesh", self.d.dims.describe()) != self.d.dims.describe():
                raise UsageError(f"{self.resume_from / STATE_FILE}: saved on mesh {saved['mesh']}, resumed on "
                                 f"{self.d.dims.describe()}; resume on the same mesh")
            load_optimizer_state(self.opt, self.masters, self.resume_from, self.d)
            self.start_step = int(saved["step"])
            self.d.print(f"resuming from {self.resume_from} at step {self.start_step}")
        if self.d.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            trim_metrics(self.out / METRICS_FILE, self.start_step)
        return self.model

    def state(self, step: int) -> dict:
        return {"step": step, "total_steps": self.total_steps, "seed": self.args.seed, "mesh": self.d.dims.describe(),
                "args": {k: str(v) for k, v in vars(self.args).items()}}

    def save(self, step: int) -> Path:
        """A resumable OUT/step-N; then older ones beyond --keep-last go."""
        folder = save_training_checkpoint(self.model, self.masters, self.opt, self.out / f"step-{step}",
                                          self.init_from, self.state(step), self.d)
        if self.d.is_main:
            remove_old_checkpoints(self.out, self.args.keep_last)
        return folder

    def run(self, step_fn: Callable[[int], dict], lr_fn: Callable[[int], float], postfix=("loss",),
            summary_extra: dict | None = None, save_multiple: int = 1) -> dict:
        """For each step from the start (or resume) step: set the lr, zero the gradients, step_fn(step) (forward
        and backward on this rank; returns metrics already reduced over ranks, with "loss"), move the gradients
        to the fp32 masters, average them over the mesh, clip, optimizer step, masters back into the model, log,
        checkpoint. A signal on any rank stops every rank after the same step (checked once per step, over the
        whole world), with one checkpoint. save_multiple: checkpoints (periodic and on a signal) only after steps
        that are a multiple of it (several optimizer steps that share one rollout). Returns the summary."""
        if self.finished:
            self.d.print(f"{self.out / 'final'} exists: this run is finished, nothing to resume")
            return json.loads((self.out / "summary.json").read_text())
        a, d, model, opt, masters = self.args, self.d, self.model, self.opt, self.masters
        bar = tqdm(range(self.start_step, self.total_steps), initial=self.start_step, total=self.total_steps,
                   desc=self.name, unit="step", disable=not d.is_main)
        last: dict = {}
        for step in bar:
            t0 = time.time()
            lr = lr_fn(step)
            set_lr(opt, lr)
            opt.zero_grad(set_to_none=True)
            metrics = step_fn(step)
            masters.grads_to_masters()
            d.average_gradients(masters.named_params())
            if not math.isfinite(metrics["loss"]):
                raise FloatingPointError(f"non-finite loss at step {step + 1} ({metrics}); stopping without saving. "
                                         f"Last good checkpoint: {latest_checkpoint(self.out)}")
            grad_norm = clip_grad_norm(masters.params(), a.grad_clip, d)
            opt.step()
            masters.masters_to_model()
            seconds = time.time() - t0
            last = {"step": step + 1, "lr": lr, **metrics, "grad_norm": float(grad_norm), "step_seconds": seconds}
            if "tokens" in metrics:
                last["tokens_per_s"] = metrics["tokens"] / seconds
            if d.is_main:
                with open(self.out / METRICS_FILE, "a") as f:
                    f.write(json.dumps(last) + "\n")
            bar.set_postfix({k: f"{last[k]:.3f}" for k in postfix if k in last})
            done = step + 1
            at_boundary = done % save_multiple == 0
            signalled = d.agreed_signal(self.stop["signal"]) if at_boundary else None
            if signalled or (a.save_every and at_boundary and done % a.save_every == 0 and done < self.total_steps):
                d.print(f"\nsaved {self.save(done)}")
            if signalled:
                d.print(f"stopped by {signalled} after step {done}; continue with the same command and --resume")
                return {"stopped": signalled, **last}
        bar.close()
        final = save_training_checkpoint(model, masters, opt, self.out / "final", self.init_from, None, d)
        summary = {"final": str(final), "steps": self.total_steps, "mesh": d.dims.describe(),
                   **(summary_extra or {}), **last}
        if d.is_main:
            write_text_atomic(self.out / "summary.json", json.dumps(summary, indent=2) + "\n")
        return summary


# ----------------------------------------------------------------------------- flags and main()

def add_training_args(p: argparse.ArgumentParser) -> None:
    """The flags train_sft.py and train_opd.py share: optimizer, Group Auxiliary Loss, checkpoints, device."""
    p.add_argument("--beta1", type=float_range(min=0, below=1), default=0.9, help="AdamW beta1")
    p.add_argument("--beta2", type=float_range(min=0, below=1), default=0.98, help="AdamW beta2")
    p.add_argument("--weight-decay", type=float_range(min=0), default=0.1, help="AdamW weight decay")
    p.add_argument("--optimizer", default="adamw", choices=["adamw", "adamw8bit"], help="adamw8bit: 8-bit moments")
    p.add_argument("--grad-clip", type=float_range(above=0), default=1.0, help="max gradient norm")
    p.add_argument("--alpha", type=float_range(min=0), default=0.1, help="Group Auxiliary Loss weight")
    p.add_argument("--w", type=float_range(above=0), default=2.0,
                   help="GA zero-group weight: targets zero share wZ/(N+wZ)")
    p.add_argument("--ga-counts", default="scores", choices=["scores", "routing"],
                   help="what the GA loss's f counts: a fresh top-K of the normalised scores, without GLM's "
                        "correction bias (the authors'), or the slots actually routed")
    p.add_argument("--save-every", type=int_range(min=0), default=0,
                   help="checkpoint every N steps (0: only at the end)")
    p.add_argument("--keep-last", type=int_range(min=0), default=2,
                   help="resumable step-N checkpoints kept; older ones are removed after a save (0: keep all)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p.add_argument("--allow-changed-settings", action="store_true",
                   help="--resume even where settings (lr, batch, seed, data, ...) differ from the run's")
    add_compute_args(p, dtype="float32", expert_backend="grouped_mm", dtypes=("float32", "bfloat16"))
    p.add_argument("--dp", type=int_range(min=0), default=0, help="data-parallel size (0: world size / --tp)")
    p.add_argument("--tp", type=int_range(min=1), default=1, help="tensor-parallel size (attention heads, dense MLPs)")
    p.add_argument("--ep", type=int_range(min=1), default=1, help="expert-parallel size (splits the routed experts)")
    p.add_argument("--fsdp", action="store_true", help="shard parameters and optimizer state over dp (FSDP2)")
    p.add_argument("--activation-checkpointing", action="store_true",
                   help="recompute block activations in backward (less memory, ~1/3 more compute)")


def run_training(script: str, train, args, swaps: Swaps | None = None) -> int:
    """A training script's main(): start the process group, train with clean stops on signals, report what a
    user caused as one line on stderr with exit code 2 (nothing half-written: checkpoints are atomic). A run
    stopped by a signal exits 130 (SIGINT) or 143 (SIGTERM) after saving, so a caller can tell it from a
    finished one."""
    try:
        d = init_distributed(args.device, args.dp, args.tp, args.ep, args.fsdp)
    except ZedaError as e:  # a bad mesh or device: before any work, and before a process group exists
        print(f"{script}: error: {e}", file=sys.stderr)
        return 2
    try:
        with stop_on_signals(restore=d.world == 1) as stop:
            swaps = swaps or Swaps()
            args.variant = swaps.name  # kept with the settings: a resume under other swaps is refused
            summary = train(args, d, stop, swaps)
    except (ZedaError, OSError, FloatingPointError) as e:
        print(f"{script}: error: {e}", file=sys.stderr)
        return 2
    finally:
        shutdown()
    d.print(f"\n{script} {'stopped' if 'stopped' in summary else 'done'}: {json.dumps(summary)}")
    return EXIT_ON_SIGNAL.get(summary.get("stopped"), 0)  # stop_on_signals only ever records these two
