"""Train the small post-trained MoE teachers that ship in assets/ (the embedded default).

    python -m zeda_toy.teacher --arch qwen3_moe --out assets/qwen3_moe_teacher
    python -m zeda_toy.teacher --arch glm4_moe_lite --out assets/glm4_moe_lite_teacher

From scratch on the task suite (zeda_toy/tasks.py), on CPU, in about 20 minutes each: a char-level tokenizer with
a chat template (zeda_toy/tokenizer.py), cross-entropy on the answer tokens only, a small Switch balance loss so
every expert is used, AdamW (0.9, 0.98) with warmup + cosine. Batches hold one task family at a time (less
padding: ~35% faster in a probe). The result is an ordinary HF checkpoint folder (config.json from
transformers' own config class, safetensors with per-expert keys, tokenizer files) that zeda.load_model,
convert.py and transformers read like any real checkpoint. training.json records the command, the steps,
the time and the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from zeda_toy import tasks
from zeda.checkpoint import save_checkpoint
from zeda.config import ModelConfig
from zeda.data import collate, encode_chats
from zeda.errors import UsageError
from zeda.flags import float_range, int_range
from zeda.losses import load_balancing_loss
from zeda.model import CausalLM
from zeda_toy.tiny import tiny_hf_config
from zeda_toy.tokenizer import build_tokenizer, save_tokenizer
from zeda.optim import make_optimizer
from zeda.trainer import lr_at

# ~1.8M parameters each (~7 MB fp32): the size a probe trained to ~86% on 2 cores in 15 minutes.
TEACHER_SHAPES = {
    "qwen3_moe": dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                      head_dim=32, num_experts=16, num_experts_per_tok=4, moe_intermediate_size=64,
                      intermediate_size=256, norm_topk_prob=True, tie_word_embeddings=True,
                      max_position_embeddings=512, rope_theta=10000.0),
    "glm4_moe_lite": dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                          n_routed_experts=16, num_experts_per_tok=4, moe_intermediate_size=64,
                          intermediate_size=256, n_shared_experts=1, routed_scaling_factor=1.8,
                          # A 32-dim latent and 16 rotary dims learned too slowly to copy digits (4% after
                          # 2000 steps): a wider latent and rope, still ~7 MB.
                          q_lora_rank=96, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=32,
                          v_head_dim=32, tie_word_embeddings=True, max_position_embeddings=512,
                          mlp_layer_types=["dense", "sparse", "sparse", "sparse"]),
}


def teacher_hf_config(arch: str, tokenizer):
    """A genuine transformers config for the teacher (vocabulary rounded up to a multiple of 8)."""
    vocab = (len(tokenizer) + 7) // 8 * 8
    return tiny_hf_config(arch, vocab_size=vocab, pad_token_id=tokenizer.pad_token_id,
                          eos_token_id=tokenizer.eos_token_id, bos_token_id=None, **TEACHER_SHAPES[arch])


def build_examples(tokenizer, n_per_family: int, seed: int) -> dict[str, list]:
    """Training examples per family: chat-templated prompt + worked answer + EOS."""
    out = {}
    for family in tasks.FAMILIES:
        items = tasks.generate(family, "train", n_per_family, seed=seed)
        out[family] = encode_chats(tokenizer, [[{"role": "user", "content": t.prompt}] for t in items],
                                   [t.response for t in items], [family] * len(items))
    return out


def warm_start(arch: str, init_from: Path, cfg: ModelConfig) -> tuple[CausalLM, list]:
    """The weights of an earlier teacher run (same architecture and shape) and that run's lineage, so a long
    training can be done in several sittings; training.json then lists every command in order."""
    from zeda import load_model

    record_path = Path(init_from) / "training.json"
    if not record_path.is_file():
        raise FileNotFoundError(f"{record_path}: --init-from must be a folder written by zeda_toy.teacher")
    earlier = json.loads(record_path.read_text())
    if earlier.get("arch") != arch:
        raise UsageError(f"{record_path}: arch is {earlier.get('arch')!r}, but --arch is {arch!r}")
    model = load_model(init_from, device="cpu", dtype=torch.float32)  # the teacher trainer's own device
    theirs, ours = model.config.to_hf_dict(), cfg.to_hf_dict()
    differ = [k for k in [*TEACHER_SHAPES[arch], "vocab_size"] if theirs.get(k) != ours.get(k)]
    if differ:
        raise UsageError(f"{init_from}/config.json: {', '.join(differ)} differ from TEACHER_SHAPES[{arch!r}]")
    return model, earlier.get("lineage", [earlier])


def train(arch: str, out: Path, steps: int, minutes: float | None, batch_size: int, lr: float, n_per_family: int,
          seed: int, balance_coef: float, threads: int | None, backend: str, init_from: Path | None = None,
          save_every: int = 0) -> dict:
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    rng = random.Random(seed)
    tokenizer = build_tokenizer()
    hf_cfg = teacher_hf_config(arch, tokenizer)
    cfg = ModelConfig.from_hf_config(hf_cfg.to_dict())
    lineage = []
    if init_from is None:
        model = CausalLM(cfg)
        model.init_weights(seed)
    else:
        model, lineage = warm_start(arch, init_from, cfg)
    model.set_expert_backend(backend)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    examples = build_examples(tokenizer, n_per_family, seed)
    opt = make_optimizer(model.named_parameters(), lr, betas=(0.9, 0.98), weight_decay=0.1)
    t0 = time.time()
    losses = []
    # With a time budget, the first 20 steps are timed and fix the step count (and so the cosine schedule);
    # training.json records it, and `--steps N` then reproduces the run exactly.
    total = steps if minutes is None else 10**9
    bar = tqdm(total=None if minutes else steps, desc=f"teacher {arch}", unit="step")
    step = 0
    while step < total:
        if minutes is not None and step == 20:
            total = max(40, int(minutes * 60 / ((time.time() - t0) / 20)))
            bar.total = total
            bar.refresh()
        family = tasks.FAMILIES[step % len(tasks.FAMILIES)]  # one family per batch: little padding
        batch = rng.sample(examples[family], batch_size)
        ids, attn, loss_mask = collate(batch, tokenizer.pad_token_id)
        for group in opt.param_groups:  # warmup is a fixed 100 steps, so it does not depend on the budget
            group["lr"] = lr_at(step, total, lr, warmup_steps=100)
        routing = []
        logits = model(ids[:, :-1], attention_mask=attn[:, :-1], routing=routing)  # [B, T-1, V]
        ce = F.cross_entropy(logits[loss_mask], ids[:, 1:][loss_mask])
        balance = load_balancing_loss(routing, cfg.num_experts, attn[:, :-1].reshape(-1).bool(), cfg.router_scoring)
        loss = ce + balance_coef * balance
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(ce.item())  # host sync: logging
        if step % 20 == 0:
            bar.set_postfix(ce=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}", bal=f"{balance.item():.3f}")
        bar.update(1)
        step += 1
        if save_every and step % save_every == 0 and step < total:  # a killed run keeps its latest weights
            save_teacher(model, out, tokenizer, teacher_record(arch, out, step, batch_size, lr, seed, n_params,
                                                               time.time() - t0, losses, init_from, lineage))
            model.train()
    bar.close()
    record = teacher_record(arch, out, total, batch_size, lr, seed, n_params, time.time() - t0, losses, init_from,
                            lineage)
    save_teacher(model, out, tokenizer, record)
    return record


def teacher_record(arch, out, steps, batch_size, lr, seed, n_params, seconds, losses, init_from, lineage) -> dict:
    """training.json: this sitting's command and numbers, and (warm-started) every earlier sitting's."""
    init = f" --init-from {init_from}" if init_from else ""
    this = {
        "command": f"python -m zeda_toy.teacher --arch {arch} --out {out} --steps {steps} --batch-size {batch_size} "
                   f"--lr {lr} --seed {seed}{init}",
        "arch": arch, "parameters": n_params, "steps": steps, "batch_size": batch_size, "lr": lr,
        "seed": seed, "train_seconds": round(seconds, 1), "final_ce": sum(losses[-50:]) / len(losses[-50:]),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
                   f"torch {torch.__version__}, {torch.get_num_threads()} threads",
    }
    earlier = [{k: v for k, v in r.items() if k not in ("lineage", "total_steps", "total_train_seconds")}
               for r in lineage]
    this["lineage"] = earlier + [dict(this)]
    this["total_steps"] = sum(r["steps"] for r in this["lineage"])
    this["total_train_seconds"] = round(sum(r["train_seconds"] for r in this["lineage"]), 1)
    return this


def save_teacher(model, out: Path, tokenizer, record: dict) -> None:
    with tempfile.TemporaryDirectory() as side:  # tokenizer + record, copied along by the atomic save
        save_tokenizer(side)
        (Path(side) / "training.json").write_text(json.dumps(record, indent=2) + "\n")
        save_checkpoint(model.eval(), out, copy_from=side)


def main():
    p = argparse.ArgumentParser(description="Train a small MoE teacher from scratch on the task suite (CPU).")
    p.add_argument("--arch", default="qwen3_moe", choices=sorted(TEACHER_SHAPES), help="architecture")
    p.add_argument("--out", type=Path, required=True, help="checkpoint folder to write")
    p.add_argument("--steps", type=int_range(min=1), default=3000, help="optimizer steps")
    p.add_argument("--minutes", type=float_range(above=0), default=None,
                   help="time budget instead of --steps: the first 20 steps are timed and fix the step count")
    p.add_argument("--batch-size", type=int_range(min=1), default=32, help="sequences per step")
    p.add_argument("--lr", type=float_range(above=0), default=3e-3, help="peak learning rate")
    p.add_argument("--train-per-family", type=int_range(min=1), default=30000,
                   help="training items generated per family")
    p.add_argument("--balance-coef", type=float_range(min=0), default=0.01, help="weight of the expert balance loss")
    p.add_argument("--seed", type=int_range(min=0), default=0, help="seed for data, init and batches")
    p.add_argument("--threads", type=int_range(min=1), default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--backend", default="grouped_mm", choices=["loop", "grouped_mm"], help="expert backend")
    p.add_argument("--init-from", type=Path, default=None,
                   help="continue from an earlier teacher folder (fresh warmup + cosine); lineage is recorded")
    p.add_argument("--save-every", type=int_range(min=0), default=0,
                   help="also save to --out every N steps (0: only at the end)")
    args = p.parse_args()
    if args.init_from is not None and args.init_from.resolve() == args.out.resolve():
        p.error("--out must differ from --init-from: the input teacher is never overwritten")
    record = train(args.arch, args.out, args.steps, args.minutes, args.batch_size, args.lr, args.train_per_family,
                   args.seed, args.balance_coef, args.threads, args.backend, args.init_from, args.save_every)
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
