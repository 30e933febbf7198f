"""Time one MoE layer's routed experts at 0/25/50/75% zero-expert share (docs/method.md §6),
at prefill and decode sizes, on both layer shapes.

    python -m bench.moe_layer                                  # CPU defaults: H, I / 8, T in 256, 1, 16 (< 3 min)
    python -m bench.moe_layer --device cuda --dtype bfloat16   # GPU: full Qwen3/GLM shapes, prefill and decode
    python -m bench.moe_layer --device cuda --shapes qwen --tokens 4096 --backends triton,grouped_mm --json out.json

Backends: loop and grouped_mm through zeda.moe.routed_experts_forward, triton through zeda.kernels.triton_moe
(CUDA only: the interpreter is far too slow to time).
The routing of each row has exactly the requested share of its slots on zero experts (ids >= N) overall,
random distinct real experts otherwise, so the real FLOPs fall linearly with the share; a kernel that really
skips zero slots should speed up accordingly ("speedup" column, vs the same backend at 0%).

Counted per real slot (docs/method.md §6): FLOPs 2*3*H*I forward, x3 for forward+backward (TFLOP/s on real FLOPs).
Bytes (a minimum-traffic model, GB/s): expert weights of the experts that got >= 1 real slot, plus x read
and y written; forward+backward counts the weights 3x (read, read, gradient write) and the activations 2x
(plus dy, dx). Intermediate [M, I] buffers are not counted. The GLM shared expert is timed as one dense
SwiGLU (I = 1536) over all T tokens, for scale. Timings never fail the script.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from zeda.flags import int_range


@dataclass(frozen=True)
class Shape:
    name: str
    H: int  # hidden size
    I: int  # routed expert intermediate size
    N: int  # real routed experts
    K: int  # top-k
    shared_I: int = 0  # shared-expert intermediate size (0: none)


SHAPES = {
    "qwen": Shape("Qwen3-30B-A3B", H=2048, I=768, N=128, K=8),
    "glm": Shape("GLM-4.7-Flash", H=2048, I=1536, N=64, K=4, shared_I=1536),
}
ZERO_SHARES = (0.0, 0.25, 0.5, 0.75)
GPU_TOKENS = (4096, 16384, 1, 16, 64)  # prefill, then decode
CPU_TOKENS = (256, 1, 16)


# ------------------------------------------------------------------------------------------ backends


def get_backend(name: str):
    """fn(x_TH, weights_TK, ids_TK, gate_up, down) -> y_TH for one backend name, and where it comes from."""
    if name == "triton":
        from zeda.kernels import triton_moe

        return triton_moe, "zeda.kernels.triton_moe"
    from zeda.moe import routed_experts_forward

    return (lambda *args: routed_experts_forward(*args, backend=name)), "zeda.moe.routed_experts_forward"


def dense_swiglu(x_TH, gate_proj, up_proj, down_proj):
    """The shared expert: gate, up [I, H], down [H, I]."""
    return F.linear(F.silu(F.linear(x_TH, gate_proj)) * F.linear(x_TH, up_proj), down_proj)


# ------------------------------------------------------------------------------------------- inputs


def make_routing(T: int, K: int, N: int, zero_share: float, device, gen) -> torch.Tensor:
    """ids_TK with round(share * T * K) slots on distinct zero experts (ids N..N+K-1) and distinct random
    real experts elsewhere (ZEDA uses Z = N / 2 >= K zero experts)."""
    real_TK = torch.rand(T, N, generator=gen).argsort(dim=1)[:, :K]  # [T, K] distinct real experts per row
    zero_TK = N + torch.arange(K).expand(T, K)  # [T, K] distinct zero experts per row
    n_zero = round(zero_share * T * K)
    is_zero = torch.zeros(T * K, dtype=torch.bool)
    is_zero[torch.randperm(T * K, generator=gen)[:n_zero]] = True
    return torch.where(is_zero.view(T, K), zero_TK, real_TK).to(device)


def make_weights(*shape, dtype, device, gen, requires_grad):
    w = (torch.rand(*shape, generator=gen) - 0.5) * 0.04  # uniform is cheap; values do not matter for timing
    return w.to(device, dtype).requires_grad_(requires_grad)


# ------------------------------------------------------------------------------------------- timing


def time_ms(fn, device: str, warmup: int, repeats: int) -> float:
    """Median wall time of fn() in ms: CUDA events on GPU, perf_counter on CPU."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.startswith("cuda"):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def bench_one(fn, inputs, dy, device, warmup, repeats):
    """(forward ms, forward+backward ms) of fn(*inputs) with gradients w.r.t. every floating input."""
    leaves = [t for t in inputs if t.requires_grad]

    def fwd():
        with torch.no_grad():
            fn(*inputs)

    def fwd_bwd():
        torch.autograd.grad(fn(*inputs), leaves, dy)  # autograd.grad: no .grad accumulation between repeats

    return time_ms(fwd, device, warmup, repeats), time_ms(fwd_bwd, device, warmup, repeats)


def routing_counts(ids_TK: torch.Tensor, N: int) -> tuple[int, int]:
    """(real slots M, experts with >= 1 real slot) of a routing: host syncs, kept outside any timed region."""
    real = ids_TK < N
    return int(real.sum()), int(ids_TK[real].unique().numel())


def layer_row(shape_name: str, T: int, share: float, backend: str, f_ms: float, fb_ms: float, M: int, active: int,
              H: int, I: int, elem: int, base_ms: tuple[float, float]) -> dict:
    """One result row: times, TFLOP/s on real FLOPs, GB/s of the minimum-traffic model (see the module
    docstring) and the speedup over base_ms, the same backend's (fwd, f+b) ms at the first zero share."""
    flops = 2 * 3 * H * I * M
    act_bytes = 2 * T * H * elem
    w_bytes = active * 3 * H * I * elem
    return {"shape": shape_name, "T": T, "zero_share": share, "backend": backend,
            "fwd_ms": f_ms, "fwd_bwd_ms": fb_ms, "real_slots": M, "active_experts": active,
            "fwd_tflops": flops / f_ms / 1e9, "fwd_bwd_tflops": 3 * flops / fb_ms / 1e9,
            "fwd_gbs": (w_bytes + act_bytes) / f_ms / 1e6,
            "fwd_bwd_gbs": (3 * w_bytes + 2 * act_bytes) / fb_ms / 1e6,
            "speedup_fwd": base_ms[0] / f_ms, "speedup_fwd_bwd": base_ms[1] / fb_ms}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    p.add_argument("--dtype", default=None, help="float32 or bfloat16 (default: bfloat16 on cuda, float32 on cpu)")
    p.add_argument("--tokens", default=None, help="comma-separated T list (default: 4096,16384,1,16,64 on cuda; "
                   "256,1,16 on cpu)")
    p.add_argument("--shapes", default="qwen,glm", help="comma-separated subset of: " + ",".join(SHAPES))
    p.add_argument("--backends", default="loop,grouped_mm,triton", help="comma-separated: loop, grouped_mm, triton")
    p.add_argument("--zero-shares", default=",".join(str(s) for s in ZERO_SHARES), help="zero-slot shares")
    p.add_argument("--scale", type=int_range(min=1), default=None,
                   help="divide H and I by this (default: 1 on cuda, 8 on cpu, "
                   "where the full 600M-parameter layers take minutes per call)")
    p.add_argument("--warmup", type=int_range(min=0), default=None, help="untimed calls (default: 5 on cuda, 1 on cpu)")
    p.add_argument("--repeats", type=int_range(min=1), default=None,
                   help="timed calls, median kept (default: 20 cuda, 2 cpu)")
    p.add_argument("--threads", type=int_range(min=1), default=None,
                   help="torch CPU threads (default on cpu: 1, because on a "
                   "shared, oversubscribed machine spinning OpenMP threads make small matmuls 100x slower)")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = p.parse_args()

    on_gpu = args.device.startswith("cuda")
    dtype = getattr(torch, args.dtype or ("bfloat16" if on_gpu else "float32"))
    tokens = [int(t) for t in args.tokens.split(",")] if args.tokens else list(GPU_TOKENS if on_gpu else CPU_TOKENS)
    shares = [float(s) for s in args.zero_shares.split(",")]
    scale = args.scale or (1 if on_gpu else 8)
    warmup = args.warmup if args.warmup is not None else (5 if on_gpu else 1)
    repeats = args.repeats or (20 if on_gpu else 2)
    backends = [b for b in args.backends.split(",") if b]
    if args.threads or not on_gpu:
        torch.set_num_threads(args.threads or 1)
    if "triton" in backends and not on_gpu:
        print("triton: skipped on CPU (TRITON_INTERPRET runs ~1e5x slower than a GPU; nothing to time)")
        backends.remove("triton")
    fns = {}
    for b in backends:
        fns[b], source = get_backend(b)
        print(f"{b}: {source}")
    elem = torch.finfo(dtype).bits // 8
    print(f"device {args.device}, dtype {dtype}, H and I divided by {scale}, warmup {warmup}, repeats {repeats}, "
          f"{torch.get_num_threads()} CPU threads")

    rows = []
    header = (f"{'shape':<14} {'T':>6} {'zero':>5} {'backend':<11} {'fwd ms':>9} {'f+b ms':>9} "
              f"{'fwd TF/s':>8} {'f+b TF/s':>8} {'fwd GB/s':>8} {'f+b GB/s':>8} {'x fwd':>6} {'x f+b':>6}")
    print(header)
    print("-" * len(header))
    gen = torch.Generator().manual_seed(0)
    for key in args.shapes.split(","):
        s = SHAPES[key]
        H, I = s.H // scale, s.I // scale
        gate_up = make_weights(s.N, 2 * I, H, dtype=dtype, device=args.device, gen=gen, requires_grad=True)  # [N, 2I, H]
        down = make_weights(s.N, H, I, dtype=dtype, device=args.device, gen=gen, requires_grad=True)  # [N, H, I]
        for T in tokens:
            x = torch.randn(T, H, generator=gen).to(args.device, dtype).requires_grad_()
            weights = torch.randn(T, s.K, generator=gen).softmax(-1).to(args.device).requires_grad_()  # fp32
            dy = torch.randn(T, H, generator=gen).to(args.device, dtype)
            base = {}
            for share in shares:
                ids = make_routing(T, s.K, s.N, share, args.device, gen)
                M, active = routing_counts(ids, s.N)
                for b in backends:
                    f_ms, fb_ms = bench_one(fns[b], (x, weights, ids, gate_up, down), dy, args.device, warmup,
                                            repeats)
                    base.setdefault(b, (f_ms, fb_ms))
                    row = layer_row(s.name, T, share, b, f_ms, fb_ms, M, active, H, I, elem, base[b])
                    rows.append(row)
                    print(f"{s.name:<14} {T:>6} {share:>5.2f} {b:<11} {f_ms:>9.3f} {fb_ms:>9.3f} "
                          f"{row['fwd_tflops']:>8.3f} {row['fwd_bwd_tflops']:>8.3f} {row['fwd_gbs']:>8.1f} "
                          f"{row['fwd_bwd_gbs']:>8.1f} {row['speedup_fwd']:>6.2f} {row['speedup_fwd_bwd']:>6.2f}",
                          flush=True)
            if s.shared_I:
                sI = s.shared_I // scale
                sg = make_weights(sI, H, dtype=dtype, device=args.device, gen=gen, requires_grad=True)
                su = make_weights(sI, H, dtype=dtype, device=args.device, gen=gen, requires_grad=True)
                sd = make_weights(H, sI, dtype=dtype, device=args.device, gen=gen, requires_grad=True)
                f_ms, fb_ms = bench_one(dense_swiglu, (x, sg, su, sd), dy, args.device, warmup, repeats)
                flops = 2 * 3 * H * sI * T
                bytes_ = 3 * H * sI * elem + 2 * T * H * elem
                row = {"shape": s.name, "T": T, "zero_share": None, "backend": "shared",
                       "fwd_ms": f_ms, "fwd_bwd_ms": fb_ms,
                       "fwd_tflops": flops / f_ms / 1e9, "fwd_bwd_tflops": 3 * flops / fb_ms / 1e9,
                       "fwd_gbs": bytes_ / f_ms / 1e6, "fwd_bwd_gbs": 3 * bytes_ / fb_ms / 1e6}
                rows.append(row)
                print(f"{s.name:<14} {T:>6} {'-':>5} {'shared':<11} {f_ms:>9.3f} {fb_ms:>9.3f} "
                      f"{row['fwd_tflops']:>8.3f} {row['fwd_bwd_tflops']:>8.3f} {row['fwd_gbs']:>8.1f} "
                      f"{row['fwd_bwd_gbs']:>8.1f} {'-':>6} {'-':>6}", flush=True)
        del gate_up, down
    if args.json:
        meta = {"device": args.device, "dtype": str(dtype), "scale": scale, "warmup": warmup, "repeats": repeats}
        with open(args.json + ".tmp", "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
        os.replace(args.json + ".tmp", args.json)  # atomic: no half-written file on interrupt


if __name__ == "__main__":
    main()
