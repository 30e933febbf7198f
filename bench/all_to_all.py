"""Expert-parallel traffic and step time against the zero-expert share.

    torchrun --nproc_per_node=2 -m bench.all_to_all [--tokens 4096 --hidden 512 --inter 256 --experts 16 --top-k 4]

One MoE layer's routed path (dispatch -> grouped experts -> combine, forward + backward) on ep ranks, with
routes drawn so that a given share of the slots lands on zero experts. Zero slots are dropped before the
all-to-all, so the bytes sent fall linearly with the zero share, and the step time with them. Prints a table
(rank 0) and writes runs/all_to_all.json. Measured numbers, never a pass/fail.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from zeda.distributed import init_distributed, shutdown
from zeda.evaluation import write_json_atomic
from zeda.expert_parallel import AllToAllDispatcher
from zeda.flags import int_range
from zeda.moe import routed_experts_forward


def routes(T: int, K: int, N: int, Z: int, zero_share: float, g: torch.Generator):
    """ids [T, K]: each slot is a zero expert with probability zero_share, else a uniformly random real one."""
    real = torch.randint(0, N, (T, K), generator=g)
    zero = N + torch.randint(0, Z, (T, K), generator=g)
    ids = torch.where(torch.rand(T, K, generator=g) < zero_share, zero, real)
    weights = torch.rand(T, K, generator=g)
    return weights / weights.sum(-1, keepdim=True), ids


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int_range(min=1), default=4096, help="tokens per rank")
    p.add_argument("--hidden", type=int_range(min=1), default=512)
    p.add_argument("--inter", type=int_range(min=1), default=256, help="expert intermediate size")
    p.add_argument("--experts", type=int_range(min=1), default=16, help="real experts N")
    p.add_argument("--zero", type=int_range(min=0), default=8, help="zero experts Z")
    p.add_argument("--top-k", type=int_range(min=1), default=4)
    p.add_argument("--repeats", type=int_range(min=1), default=5)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", type=Path, default=Path("runs/all_to_all.json"), help="the rows as JSON")
    args = p.parse_args()
    world = int(__import__("os").environ.get("WORLD_SIZE", "1"))
    d = init_distributed(args.device, ep=world)
    N, H, I = args.experts, args.hidden, args.inter
    g = torch.Generator().manual_seed(1234 + d.rank)
    n_local = N // d.dims.ep
    gate_up = (torch.randn(n_local, 2 * I, H, generator=g) * H**-0.5).to(d.device).requires_grad_()  # [N/ep, 2I, H]
    down = (torch.randn(n_local, H, I, generator=g) * I**-0.5).to(d.device).requires_grad_()
    rows = []
    for share in (0.0, 0.25, 0.5, 0.75):
        x = torch.randn(args.tokens, H, generator=g).to(d.device).requires_grad_()
        w, ids = routes(args.tokens, args.top_k, N, args.zero, share, g)
        w, ids = w.to(d.device), ids.to(d.device)
        disp = AllToAllDispatcher(d.ep_group, d.dims.ep) if d.dims.ep > 1 else None
        times = []
        for i in range(args.repeats + 1):  # the first is a warmup
            d.barrier()
            t0 = time.perf_counter()
            y = routed_experts_forward(x, w, ids, gate_up, down, "grouped_mm", dispatcher=disp, num_experts=N)
            y.backward(torch.ones_like(y))  # a contiguous gradient (grouped_mm's backward rejects stride 0)
            if d.device.type == "cuda":
                torch.cuda.synchronize()
            d.barrier()
            if i:
                times.append(time.perf_counter() - t0)
        sent = disp.bytes_sent / (args.repeats + 1) if disp else 0
        rows.append({"zero_share": share, "real_slots_per_rank": int((ids < N).sum()),
                     "all_to_all_MB_per_rank_per_direction": sent / 2**20,
                     "step_ms": 1000 * sorted(times)[len(times) // 2]})
    if d.is_main:
        device = (torch.cuda.get_device_name() if d.device.type == "cuda"
                  else f"CPU, {torch.get_num_threads()} threads")
        print(f"ep={d.dims.ep}  tokens/rank={args.tokens}  H={H}  I={I}  N={N}  Z={args.zero}  K={args.top_k}  "
              f"({device})")
        print(f"{'zero share':>10}  {'real slots':>10}  {'all-to-all MB':>13}  {'fwd+bwd ms':>10}")
        for r in rows:
            print(f"{r['zero_share']:>10.2f}  {r['real_slots_per_rank']:>10d}  "
                  f"{r['all_to_all_MB_per_rank_per_direction']:>13.2f}  {r['step_ms']:>10.1f}")
        write_json_atomic(args.out, {"config": {k: str(v) for k, v in vars(args).items()}, "ep": d.dims.ep,
                                     "device": device, "rows": rows})
    shutdown()


if __name__ == "__main__":
    main()
