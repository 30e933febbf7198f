"""Training pieces shared by the teacher trainer (zeda/teacher.py), train_sft.py and train_opd.py.

- encode_chat: prompt messages + response -> token ids with the prompt/response boundary known, so the loss
  can be restricted to response tokens (the prompt and padding never contribute).
- collate: right-pad a list of examples into [B, T] tensors with a loss mask.
- lr_at: linear warmup then cosine decay (the paper's SFT schedule), or constant.
- make_optimizer: AdamW, weight decay on matrices only.
- save_training_checkpoint / latest_checkpoint / load_optimizer_state: resumable checkpoints, no pickle.
- stop_on_signals: SIGTERM / Ctrl-C end the current step cleanly instead of killing the run.
- add_training_args / run_training: the flags and the main() the two training scripts share.
- load_balancing_loss: the Switch-style balance loss used to pre-train the teachers (so every expert is
  used); the Group Auxiliary Loss of ZEDA lives in zeda/losses.py.

Shape letters: B batch, T tokens, K top-k, E router outputs, N real experts.
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from zeda.checkpoint import save_checkpoint

STATE_FILE, OPTIM_FILE = "trainer_state.json", "optimizer.safetensors"


@dataclass
class Example:
    ids: list[int]  # prompt + response (+ EOS)
    num_prompt: int  # the first num_prompt ids are the prompt: no loss there
    family: str = ""


def encode_chats(tokenizer, prompts: list[list[dict]], responses: list[str | None] | None = None,
                 families: list[str] | None = None) -> list[Example]:
    """Chat-template each prompt (with the assistant header), then append its response and EOS.

    Prompts and responses are tokenised separately and concatenated, so the boundary is exact for any
    tokenizer (a BPE merge across it would blur which tokens are the response's). Batched: one call to the
    fast tokenizer per list, which matters for the ~100k examples of teacher training."""
    texts = [tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in prompts]
    prompt_ids = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    responses = responses or [None] * len(prompts)
    families = families or [""] * len(prompts)
    given = [r for r in responses if r is not None]
    response_ids = iter(tokenizer(given, add_special_tokens=False)["input_ids"] if given else [])
    out = []
    for p, r, f in zip(prompt_ids, responses, families):
        ids = p if r is None else p + next(response_ids) + [tokenizer.eos_token_id]
        out.append(Example(ids, len(p), f))
    return out


def encode_chat(tokenizer, prompt_messages: list[dict], response: str | None = None, family: str = "") -> Example:
    """encode_chats for one example."""
    return encode_chats(tokenizer, [prompt_messages], [response], [family])[0]


def collate(examples: list[Example], pad_id: int):
    """-> input_ids [B, T], attention_mask [B, T], loss_mask [B, T-1] (True where target t+1 is a response token)."""
    T = max(len(e.ids) for e in examples)
    ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    attn = torch.zeros(len(examples), T, dtype=torch.long)
    loss = torch.zeros(len(examples), T, dtype=torch.bool)
    for b, e in enumerate(examples):
        ids[b, : len(e.ids)] = torch.tensor(e.ids)
        attn[b, : len(e.ids)] = 1
        loss[b, e.num_prompt : len(e.ids)] = True
    return ids, attn, loss[:, 1:]


def lr_at(step: int, total: int, peak: float, warmup_steps: int = 0, schedule: str = "cosine") -> float:
    """Linear warmup over warmup_steps, then cosine to 0 over the remaining steps (or constant)."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    if schedule == "constant":
        return peak
    progress = (step - warmup_steps) / max(1, total - warmup_steps)
    return peak * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(model, lr: float, betas=(0.9, 0.98), weight_decay: float = 0.1, eps: float = 1e-8):
    """AdamW; decay on matrices and expert tensors (ndim >= 2), none on norms and biases."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps)


def router_probs(logits_TE: torch.Tensor, scoring: str) -> torch.Tensor:
    """The router's full distribution: softmax (Qwen3), or sigmoid scores normalised to sum to 1 (GLM)."""
    if scoring == "softmax":
        return logits_TE.softmax(-1)
    s = logits_TE.sigmoid()
    return s / s.sum(-1, keepdim=True)


def load_balancing_loss(routing, num_experts: int, valid_T: torch.Tensor | None = None,
                        scoring: str = "softmax") -> torch.Tensor:
    """Switch-Transformer balance loss, averaged over MoE layers: N * sum_e f_e * P_e, where f_e is the share
    of slots routed to expert e and P_e the mean router probability of e (padding masked)."""
    losses = []
    for r in routing:
        probs_TE = router_probs(r.logits_TE, scoring)
        ids_TK = r.ids_TK
        if valid_T is not None:
            probs_TE, ids_TK = probs_TE[valid_T], ids_TK[valid_T]
        f_E = torch.bincount(ids_TK.flatten(), minlength=probs_TE.shape[1]).float() / max(1, ids_TK.numel())
        losses.append(num_experts * (f_E * probs_TE.mean(0)).sum())
    return torch.stack(losses).mean()


def _clean_name(name: str) -> str:
    return name.replace("_checkpoint_wrapped_module.", "")  # activation checkpointing's wrapper adds this


def _optimizer_tensors(model, opt) -> dict[str, torch.Tensor]:
    """This rank's optimizer state keyed '<parameter name>::<field>' (the local shard of a DTensor)."""
    names = {id(p): _clean_name(n) for n, p in model.named_parameters()}
    tensors = {}
    for group in opt.param_groups:
        for p in group["params"]:
            for key, value in opt.state.get(p, {}).items():
                value = value.to_local() if hasattr(value, "to_local") else value
                tensors[f"{names[id(p)]}::{key}"] = value.detach().cpu().contiguous().reshape(value.shape)
    return tensors


def save_training_checkpoint(model, opt, path: Path, copy_from: Path, state: dict, d=None) -> Path:
    """HF-layout checkpoint + optimizer (safetensors) + trainer state (JSON), all in one atomic rename.
    No pickle: optimizer tensors are keyed '<parameter name>::<field>'.

    With a Dist of several ranks every rank must call this: the weights are gathered whole (one folder that a
    single process loads), and when the mesh shards parameters (tp, ep, fsdp) each rank's optimizer shard is
    kept under 'rank<r>/', for a resume on the same mesh. Rank 0 writes."""
    from zeda.parallel import full_state_dict

    distributed = d is not None and d.world > 1
    whole = full_state_dict(model, d) if distributed else None
    optim = _optimizer_tensors(model, opt)
    if distributed and (d.dims.tp > 1 or d.dims.ep > 1 or d.dims.fsdp):
        import torch.distributed as dist

        parts = [None] * d.world if d.is_main else None
        dist.gather_object(optim, parts, dst=0)
        optim = {f"rank{r}/{k}": v for r, part in enumerate(parts or []) for k, v in part.items()}

    def write_state(folder: Path):
        save_file(optim, str(folder / OPTIM_FILE))
        (folder / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")

    if not distributed or d.is_main:
        save_checkpoint(model, path, copy_from=copy_from, extra=write_state, state=whole)
    if distributed:
        d.barrier()
    return path


def load_optimizer_state(opt, model, folder: Path, d=None) -> None:
    """The inverse of save_training_checkpoint, onto a model already parallelized the same way."""
    tensors = load_file(str(folder / OPTIM_FILE))
    prefix = f"rank{d.rank}/" if d is not None and any(k.startswith("rank") for k in tensors) else ""
    params = {_clean_name(n): p for n, p in model.named_parameters()}
    for key, value in tensors.items():
        if not key.startswith(prefix) or (not prefix and key.startswith("rank")):
            continue
        name, field = key[len(prefix):].split("::")
        p = params[name]
        if hasattr(p, "device_mesh") and value.dim() > 0:  # a DTensor parameter: its state is a DTensor too
            from torch.distributed.tensor import DTensor

            value = DTensor.from_local(value.to(p.to_local().device), p.device_mesh, p.placements, run_check=False)
        else:
            value = value.to(p.device)
        opt.state[p][field] = value


def resume_training(opt, model, folder: Path, d) -> int:
    """Load a training checkpoint's optimizer state onto a model parallelized as when it was saved; returns the
    step to continue from. Another mesh is refused: its optimizer shards would not fit."""
    saved = json.loads((folder / STATE_FILE).read_text())
    if saved.get("mesh", d.dims.describe()) != d.dims.describe():
        raise ValueError(f"{folder / STATE_FILE}: saved on mesh {saved['mesh']}, resumed on {d.dims.describe()}; "
                         f"resume on the same mesh")
    load_optimizer_state(opt, model, folder, d)
    return saved["step"]


def check_fresh_out(out: Path, resume: bool) -> None:
    """A run without --resume must not land in a folder that holds another run: its metrics.jsonl would be
    appended to and a later --resume could pick up the other run's checkpoints."""
    if resume:
        return
    found = [p.name for p in (out / "metrics.jsonl", out / "final", *out.glob("step-*")) if p.exists()]
    if found:
        raise ValueError(f"{out} already holds a training run ({', '.join(sorted(found)[:3])}); pass --resume to "
                         f"continue it, or choose another --out")


def latest_checkpoint(out: Path) -> Path | None:
    """The newest OUT/step-N (or OUT/final) that has a trainer state."""
    found = [p for p in out.glob("step-*") if (p / STATE_FILE).exists()]
    if (out / "final" / STATE_FILE).exists():
        found.append(out / "final")
    return max(found, key=lambda p: json.loads((p / STATE_FILE).read_text())["step"], default=None)


@contextmanager
def stop_on_signals():
    """Within the block, SIGTERM / Ctrl-C set flag["signal"] instead of killing the run, so the training loop
    can finish the current step, save a checkpoint and exit cleanly. The previous handlers come back after."""
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
            signal.signal(s, handler)


def add_training_args(p: argparse.ArgumentParser) -> None:
    """The flags train_sft.py and train_opd.py share: optimizer, Group Auxiliary Loss, checkpoints, device."""
    p.add_argument("--beta1", type=float, default=0.9, help="AdamW beta1")
    p.add_argument("--beta2", type=float, default=0.98, help="AdamW beta2")
    p.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay")
    p.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm")
    p.add_argument("--alpha", type=float, default=0.1, help="Group Auxiliary Loss weight")
    p.add_argument("--w", type=float, default=2.0, help="GA zero-group weight: targets zero share wZ/(N+wZ)")
    p.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (0: only at the end)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="training dtype")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda")
    p.add_argument("--expert-backend", default="grouped_mm", choices=["loop", "grouped_mm", "triton"],
                   help="routed-expert implementation")
    p.add_argument("--dp", type=int, default=0, help="data-parallel size (0: world size / --tp)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size (attention heads, dense MLPs)")
    p.add_argument("--ep", type=int, default=1, help="expert-parallel size (splits the routed experts)")
    p.add_argument("--fsdp", action="store_true", help="shard parameters and optimizer state over dp (FSDP2)")
    p.add_argument("--activation-checkpointing", action="store_true",
                   help="recompute block activations in backward (less memory, ~1/3 more compute)")


def run_training(script: str, train, args) -> int:
    """A training script's main(): start the process group, train with clean stops on signals, report errors
    as one line on stderr with exit code 2 (nothing half-written: checkpoints are atomic)."""
    from zeda.checkpoint import CheckpointError
    from zeda.config import ConfigError
    from zeda.parallel import init_distributed, shutdown

    try:
        d = init_distributed(args.device, args.dp, args.tp, args.ep, args.fsdp)
    except ValueError as e:  # a bad mesh: before any work, and before a process group exists
        print(f"{script}: error: {e}", file=sys.stderr)
        return 2
    try:
        with stop_on_signals() as stop:
            summary = train(args, d, stop)
    except (ValueError, OSError, ConfigError, CheckpointError, FloatingPointError) as e:
        print(f"{script}: error: {e}", file=sys.stderr)
        return 2
    finally:
        shutdown()
    d.print(f"\n{script} done: {json.dumps(summary)}")
    return 0
