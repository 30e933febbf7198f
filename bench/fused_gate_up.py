"""Would one fused gate+up expert tensor speed the training step? One MoE layer's routed SwiGLU, forward and
backward through torch._grouped_mm, with gate and up as two [N, I, H] tensors (zeda's layout, as checkpoints store
them) against one [N, 2I, H] tensor and one GEMM for both (what transformers 5 does), at Qwen3-30B-A3B's widths.

    python bench/fused_gate_up.py                         # static (4096 slots) and ~50% zero (2048), fp32
    python bench/fused_gate_up.py --reuse-freed-memory    # pages kept for reuse, as a caching allocator would

Each expert gets the same number of rows (slots / N). Both layouts run in turn, --repeats times, fresh
gradients each time (as after an optimizer step); the numbers are the median CPU seconds of this process per
forward + backward (robust to other jobs on the machine; with T threads they are about T x the wall time).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.train_step import reuse_freed_memory  # noqa: E402
from zeda.flags import int_range  # noqa: E402


def swiglu_separate(x_MH, offs_N, gate_NIH, up_NIH, down_NHI):
    a_MI = torch._grouped_mm(x_MH, gate_NIH.transpose(1, 2), offs=offs_N)
    b_MI = torch._grouped_mm(x_MH, up_NIH.transpose(1, 2), offs=offs_N)
    return torch._grouped_mm(F.silu(a_MI) * b_MI, down_NHI.transpose(1, 2), offs=offs_N)


def swiglu_fused(x_MH, offs_N, gate_up_N2IH, down_NHI):
    a_MI, b_MI = torch._grouped_mm(x_MH, gate_up_N2IH.transpose(1, 2), offs=offs_N).chunk(2, dim=1)
    return torch._grouped_mm(F.silu(a_MI) * b_MI, down_NHI.transpose(1, 2), offs=offs_N)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--experts", type=int_range(min=1), default=128)
    p.add_argument("--hidden", type=int_range(min=16), default=2048)
    p.add_argument("--intermediate", type=int_range(min=16), default=768)
    p.add_argument("--slots", type=int_range(min=1), nargs="+", default=[4096, 2048],
                   help="real slots of the layer (default: 512 tokens x top-8, and half of them)")
    p.add_argument("--threads", type=int_range(min=1), default=2)
    p.add_argument("--repeats", type=int_range(min=2), default=10)
    p.add_argument("--reuse-freed-memory", action="store_true")
    args = p.parse_args(argv)
    if args.reuse_freed_memory and not reuse_freed_memory():
        p.error("--reuse-freed-memory: mallopt is not available (glibc only)")
    torch.set_num_threads(args.threads)
    N, H, I = args.experts, args.hidden, args.intermediate
    g = torch.Generator().manual_seed(0)
    gate, up = (torch.randn(N, I, H, generator=g) * 0.02 for _ in range(2))
    down = torch.randn(N, H, I, generator=g) * 0.02
    gate_up = torch.cat([gate, up], dim=1)
    weights = {"separate": [t.requires_grad_() for t in (gate, up, down)],
               "fused": [t.requires_grad_() for t in (gate_up, down)]}
    layers = {"separate": swiglu_separate, "fused": swiglu_fused}
    print(f"N {N}, H {H}, I {I}, fp32, {args.threads} threads"
          + (", freed memory kept for reuse" if args.reuse_freed_memory else ""))
    print("| slots | separate CPU s | fused CPU s | fused / separate |\n| --- | --- | --- | --- |")
    for M in args.slots:
        offs_N = torch.full((N,), M // N, dtype=torch.long).cumsum(0).to(torch.int32)
        x_MH = torch.randn(M // N * N, H, generator=g).requires_grad_()
        dy_MH = torch.randn(x_MH.shape, generator=g)
        with torch.no_grad():  # the same function either way
            torch.testing.assert_close(swiglu_fused(x_MH, offs_N, gate_up, down),
                                       swiglu_separate(x_MH, offs_N, gate, up, down))
        seconds = {name: [] for name in layers}
        for r in range(args.repeats + 1):  # the first round warms up and is not counted
            for name, layer in layers.items():
                for t in [x_MH, *weights[name]]:
                    t.grad = None
                t0 = time.process_time()
                layer(x_MH, offs_N, *weights[name]).backward(dy_MH)
                if r:
                    seconds[name].append(time.process_time() - t0)
        sep, fused = (statistics.median(seconds[k]) for k in ("separate", "fused"))
        print(f"| {M} | {sep:.2f} | {fused:.2f} | {fused / sep:.2f} |", flush=True)


if __name__ == "__main__":
    main()
