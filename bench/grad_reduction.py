"""Gradient reduction per training step: one all_reduce per parameter (before) against one per flat bucket
(Dist.average_gradients, after), side by side in one run, on 2 gloo processes.

    torchrun --nproc_per_node=2 -m bench.grad_reduction [--layers 1] [--vocab-size 16384] [--repeats 3]

Run it under torchrun (it launches none itself); it needs a world of 2. For each model and mesh (dp=2, and dp=2
with --ep 2, where each rank holds half of the experts):
  toy   assets/qwen3_moe_teacher (zeda.loading.load_model, fp32): the reduction alone, and one SFT-like step
        (forward, backward, reduce) with each reduction;
  real  --layers layers at Qwen3-30B-A3B widths (hidden 2048, 128 experts of 768, top-8, 32/4 heads of 128), the
        vocabulary shrunk to --vocab-size: fp32 gradients of its parameters' shapes (what the trainer's fp32
        masters carry), the reduction alone; about 2.5 GB of gradients per process per layer without --ep;
  GA    the Group Auxiliary Loss's counts for the model's MoE layers: before, a rank count then two reductions
        per layer (1 + 2L); after, one [L, 4] reduction (zeda/losses.py).
all_reduce calls are counted per step (torch.distributed.all_reduce wrapped) and the reduction is timed on the
slowest rank, median over --repeats. Prints a table on rank 0 and writes --json. Measured numbers, not a pass/fail.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.real_shape import QWEN3_30B_A3B  # noqa: E402
from zeda.config import ModelConfig  # noqa: E402
from zeda.distributed import BUCKET_BYTES, TP_PARTIAL_GRAD, Dist, init_distributed, shutdown  # noqa: E402
from zeda.evaluation import write_json_atomic  # noqa: E402
from zeda.expert_parallel import apply_expert_parallel  # noqa: E402
from zeda.flags import int_range  # noqa: E402
from zeda.loading import empty_model, load_model  # noqa: E402
from zeda.losses import auxiliary_loss  # noqa: E402
from zeda.moe import RouterOutput  # noqa: E402

TOY = ROOT / "assets/qwen3_moe_teacher"
MESHES = {"dp=2": dict(), "dp=2 ep=2": dict(ep=2)}


def average_per_parameter(d: Dist, named_params) -> None:
    """The reduction before buckets, kept as the reference: Dist.average_gradients as it was, one blocking
    all_reduce per parameter."""
    named_params = list(named_params)
    if d.dims.tp > 1:
        for name, p in named_params:
            if p.grad is not None and name.endswith(TP_PARTIAL_GRAD):
                grad = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
                dist.all_reduce(grad, group=d.mesh["tp"].get_group())
    if d.dp == 1:
        return
    for _, p in named_params:
        if not p.requires_grad or (d.dims.fsdp and not getattr(p, "expert_shard", False)):
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        grad = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
        dist.all_reduce(grad, group=d.edp_group if getattr(p, "expert_shard", False) else d._dp_group())
        grad /= d.dp


class CountAllReduce:
    """Counts torch.distributed.all_reduce calls (zeda's modules call it through `torch.distributed`)."""

    def __enter__(self):
        self.calls, self.original = 0, dist.all_reduce

        def counted(*args, **kwargs):
            self.calls += 1
            return self.original(*args, **kwargs)
        dist.all_reduce = counted
        return self

    def __exit__(self, *exc):
        dist.all_reduce = self.original


def calls_of(fn) -> int:
    """all_reduce calls in one run of fn (which also warms it up)."""
    with CountAllReduce() as count:
        fn()
    return count.calls


def seconds_of(fn) -> float:
    """fn's wall time on the slowest rank."""
    dist.barrier()
    t0 = time.perf_counter()
    fn()
    elapsed = torch.tensor(time.perf_counter() - t0, dtype=torch.float64)
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    return float(elapsed)


def before_after(name: str, mesh: str, what: str, before, after, repeats: int, **extra) -> dict:
    """One row: the same work with the per-parameter reference and with buckets, timed in alternation (so that
    a shared machine's load falls on both alike), median over repeats."""
    calls = calls_of(before), calls_of(after)
    times = [], []
    for _ in range(repeats):
        times[0].append(seconds_of(before))
        times[1].append(seconds_of(after))
    b, a = statistics.median(times[0]), statistics.median(times[1])
    return {"model": name, "mesh": mesh, "what": what, **extra, "before_calls": calls[0], "after_calls": calls[1],
            "before_s": b, "after_s": a, "speedup": b / max(a, 1e-12),
            "before_each_s": times[0], "after_each_s": times[1]}


def gradient_bytes(named_params) -> int:
    return sum(p.grad.numel() * p.grad.element_size() for _, p in named_params if p.grad is not None)


def toy_rows(d: Dist, mesh: str, repeats: int) -> list[dict]:
    model = load_model(TOY, device="cpu", dist=d)
    g = torch.Generator().manual_seed(d.rank)
    ids = torch.randint(4, model.config.vocab_size, (4, 65), generator=g)  # [B, T + 1], this rank's batch

    def forward_backward():
        model.zero_grad(set_to_none=True)
        logp = model(ids[:, :-1], targets=ids[:, 1:])  # [B, T]
        (-logp.mean()).backward()

    forward_backward()
    params = list(model.named_parameters())
    info = dict(parameters=len(params), grad_mb=gradient_bytes(params) / 2**20)
    def step_before():
        forward_backward()
        average_per_parameter(d, params)

    def step_after():
        forward_backward()
        d.average_gradients(params)

    rows = [before_after("toy", mesh, "reduce", lambda: average_per_parameter(d, params),
                         lambda: d.average_gradients(params), repeats, **info),
            before_after("toy", mesh, "SFT-like step", step_before, step_after, repeats, **info)]
    rows.append(ga_row("toy", mesh, model.config.num_moe_layers, d, repeats))
    return rows


def real_config(layers: int, vocab_size: int) -> ModelConfig:
    return ModelConfig.from_hf_config({**QWEN3_30B_A3B, "num_hidden_layers": layers, "vocab_size": vocab_size})


def real_rows(d: Dist, mesh: str, layers: int, vocab_size: int, repeats: int) -> list[dict]:
    """fp32 gradients of the shapes this rank holds (experts split under ep), on stand-in parameters that are
    never touched (torch.empty: no memory is committed for them)."""
    cfg = real_config(layers, vocab_size)
    model = empty_model(cfg)  # meta: shapes only
    apply_expert_parallel(model, d)
    params = []
    for name, p in model.named_parameters():
        master = torch.nn.Parameter(torch.empty(p.shape))
        master.grad = torch.ones(p.shape)
        if getattr(p, "expert_shard", False):
            master.expert_shard = True
        params.append((name, master))
    info = dict(parameters=len(params), grad_mb=gradient_bytes(params) / 2**20)
    rows = [before_after(f"Qwen3-30B-A3B widths, L={layers}, V={vocab_size}", mesh, "reduce",
                         lambda: average_per_parameter(d, params), lambda: d.average_gradients(params), repeats,
                         **info)]
    rows.append(ga_row(rows[0]["model"], mesh, cfg.num_moe_layers, d, repeats))
    return rows


def ga_row(name: str, mesh: str, layers: int, d: Dist, repeats: int) -> dict:
    """The Group Auxiliary Loss's count reductions for `layers` MoE layers: the old pattern (a rank count, then
    each layer's [2] slot counts and its token count) against one auxiliary_loss call's (counted for real)."""
    def before():
        d.all_reduce(torch.ones(()))
        for _ in range(layers):
            d.all_reduce(torch.zeros(2)), d.all_reduce(torch.zeros(()))

    g = torch.Generator().manual_seed(d.rank)
    routing = [RouterOutput(torch.ones(64, 8), torch.randint(0, 192, (64, 8), generator=g),
                            torch.randn(64, 192, generator=g)) for _ in range(layers)]
    cfg = SimpleNamespace(num_experts=128, num_zero_experts=64, router_scoring="softmax")
    return before_after(name, mesh, f"GA counts ({layers} MoE layers)", before,
                        lambda: auxiliary_loss(routing, cfg, None, all_reduce=d.all_reduce), repeats)


def table(rows: list[dict]) -> str:
    lines = [f"{'model':<36} {'mesh':<10} {'what':<22} {'params':>6} {'grad MB':>8} {'calls before':>12} "
             f"{'after':>5} {'s before':>9} {'s after':>9} {'speedup':>7}"]
    for r in rows:
        grad_mb = f"{r['grad_mb']:.1f}" if "grad_mb" in r else ""
        lines.append(f"{r['model']:<36} {r['mesh']:<10} {r['what']:<22} {r.get('parameters', ''):>6} "
                     f"{grad_mb:>8} {r['before_calls']:>12} {r['after_calls']:>5} "
                     f"{r['before_s']:>9.4f} {r['after_s']:>9.4f} {r['speedup']:>6.2f}x")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int_range(min=0, max=4), default=1,
                   help="layers at Qwen3-30B-A3B widths (0: toy model only)")
    p.add_argument("--vocab-size", type=int_range(min=16), default=16384)
    p.add_argument("--repeats", type=int_range(min=1), default=3, help="timed runs of each (median)")
    p.add_argument("--toy-repeats", type=int_range(min=1), default=20, help="timed runs for the toy model")
    p.add_argument("--json", type=Path, default=ROOT / "docs/results/grad_reduction.json")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for mesh, flags in MESHES.items():
        d = init_distributed("cpu", **flags)
        if d.world != 2:
            raise SystemExit("run under torchrun --nproc_per_node=2 (a world of 2)")
        rows += toy_rows(d, mesh, args.toy_repeats)
        if args.layers:
            rows += real_rows(d, mesh, args.layers, args.vocab_size, args.repeats)
        d.print(table(rows[-(5 if args.layers else 3):]))
    if d.is_main:
        print("\n" + table(rows))
        write_json_atomic(args.json, {"machine": f"{os.cpu_count()}-core CPU, gloo, 2 processes of 1 thread",
                                      "torch": torch.__version__, "bucket_bytes": BUCKET_BYTES, "rows": rows})
        print(f"wrote {args.json}")
    shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
