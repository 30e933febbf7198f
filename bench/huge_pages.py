"""CPU training and the kernel's memory pages: the same bf16 SFT run at published widths under three settings of
the CPU allocator, side by side, alternated round by round.

    python bench/huge_pages.py                                     # Qwen3-30B-A3B widths, 1 layer (~3 min)
    python bench/huge_pages.py --arch glm4_moe_lite --rounds 3 --json /tmp/huge_pages.json

PyTorch has no caching allocator on CPU: every block of 32 MB or more comes from a fresh mmap and goes back to the
kernel when freed. A training step frees and re-creates its gradients ([N, 2I, H] and [N, H, I] per MoE layer in
bf16, then their fp32 copies for the masters), GBs at real widths, and the kernel faults in and zeroes each new
mapping 4 KB at a time. The settings, each a fresh `train_sft.py` process:
  4 KB pages     THP_MEM_ALLOC_ENABLE=0: PyTorch's own default.
  huge pages     THP_MEM_ALLOC_ENABLE=1: blocks of 2 MB or more are 2 MB aligned and madvise'd for transparent huge
                 pages, so a fault maps 2 MB. zeda sets this on import (zeda/__init__.py) unless the variable is set.
  heap reuse     THP_MEM_ALLOC_ENABLE=0 and GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=
                 1099511627776: big blocks from the heap, never given back, so later steps reuse pages already
                 mapped (fewest faults; the heap fragments, so the peak RSS grows). Opt-in: glibc only.
Per setting: the median step time (the first step, with its loads and warm-up, left out), tokens/s and the
process's peak RSS (VmHWM, bench/convert_memory.py:run_peak_rss). Huge pages need the kernel's
/sys/kernel/mm/transparent_hugepage/enabled at "madvise" or "always" (recorded in the JSON); at "never" the
second setting is the first.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.convert_memory import run_peak_rss
from bench.real_shape import rehearsal_config, training_script, write_checkpoint, write_data
from zeda.config import ModelConfig
from zeda.conversion import convert_checkpoint
from zeda.evaluation import write_json_atomic
from zeda.flags import int_range

# Environment of each setting's process. Heap reuse through glibc's tunables, as a user would set them: no mmap
# for big blocks, and a trim threshold (1 TiB) that is never reached.
HEAP_REUSE = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=1099511627776"
SETTINGS = {"4 KB pages": {"THP_MEM_ALLOC_ENABLE": "0"},
            "huge pages": {"THP_MEM_ALLOC_ENABLE": "1"},
            "heap reuse": {"THP_MEM_ALLOC_ENABLE": "0", "GLIBC_TUNABLES": HEAP_REUSE}}


def log(msg: str) -> None:
    print(msg, flush=True)


def kernel_thp() -> dict:
    """The kernel's transparent-huge-page modes, e.g. {"enabled": "madvise", "defrag": "madvise"}."""
    modes = {}
    for name in ("enabled", "defrag"):
        try:
            text = Path(f"/sys/kernel/mm/transparent_hugepage/{name}").read_text()
            modes[name] = text[text.index("[") + 1:text.index("]")]
        except (OSError, ValueError):
            modes[name] = "unknown"
    return modes


def run_setting(setting: str, script: list[str]) -> dict:
    """One train_sft.py process under `setting`; its step times, tokens/s and peak RSS."""
    env = [f"{k}={v}" for k, v in SETTINGS[setting].items()]
    cmd = ["env", *env, sys.executable, *script]  # env execs python: the same pid, which is polled
    t0 = time.perf_counter()
    [(peak_mb, code, tail)] = run_peak_rss(cmd)
    if code != 0:
        raise SystemExit(f"{setting}: train_sft.py exited {code}:\n{tail}")
    out = Path(script[script.index("--out") + 1])
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    seconds = [round(m["step_seconds"], 2) for m in metrics]
    return {"setting": setting, "step_seconds": seconds, "step_s": statistics.median(seconds[1:]),
            "tokens_per_step": metrics[-1]["tokens"], "peak_rss_gb": peak_mb / 1024,
            "wall_s": time.perf_counter() - t0}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="bf16 SFT steps at published widths on CPU under three allocator "
                                "settings (see the module docstring)")
    p.add_argument("--arch", choices=["qwen3_moe", "glm4_moe_lite"], default="qwen3_moe")
    p.add_argument("--layers", type=int_range(min=1, max=4), default=1, help="decoder layers (default 1)")
    p.add_argument("--vocab", type=int_range(min=256), default=8192, help="vocabulary (default 8192)")
    p.add_argument("--batch", type=int_range(min=1), default=4, help="sequences per step (default 4)")
    p.add_argument("--seq", type=int_range(min=16), default=256, help="tokens per sequence (default 256)")
    p.add_argument("--steps", type=int_range(min=2), default=4, help="optimizer steps per run (default 4)")
    p.add_argument("--rounds", type=int_range(min=1), default=2, help="runs per setting, alternated (default 2)")
    p.add_argument("--threads", type=int_range(min=1), default=None, help="OMP_NUM_THREADS of the runs")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)

    modes = kernel_thp()
    log(f"kernel transparent huge pages: enabled [{modes['enabled']}], defrag [{modes['defrag']}]")
    runs = []
    with tempfile.TemporaryDirectory(prefix="zeda-huge-pages-") as tmp:
        tmp = Path(tmp)
        hf = rehearsal_config(args.arch, args.layers, args.vocab)
        if args.arch == "glm4_moe_lite":  # every layer a MoE one, no MTP layer: the step is the experts'
            hf.update(first_k_dense_replace=0, mlp_layer_types=["sparse"] * args.layers, num_nextn_predict_layers=0)
        write_checkpoint(tmp / "static", hf, shard_bytes=4 << 30)
        num_zero = ModelConfig.from_hf_config(tmp / "static").num_experts // 2
        convert_checkpoint(tmp / "static", tmp / "student", num_zero=num_zero, progress=False)
        rollouts, prompts = write_data(tmp, args.seq)
        for r in range(args.rounds):
            for setting in SETTINGS:
                script = training_script("sft", tmp / "student", tmp / "static", rollouts, prompts,
                                         tmp / f"out-{r}-{setting.split()[0]}",
                                         ranks=1, batch=args.batch, seq=args.seq, answer_tokens=0,
                                         steps=args.steps, device="cpu")
                run = run_setting(setting, script)
                runs.append({"round": r, **run})
                log(f"round {r + 1}/{args.rounds} {setting:<11} steps {run['step_seconds']} s, "
                    f"peak RSS {run['peak_rss_gb']:.2f} GB")

    base = statistics.median(x["step_s"] for x in runs if x["setting"] == "4 KB pages")
    summary = []
    for setting in SETTINGS:
        mine = [x for x in runs if x["setting"] == setting]
        step_s = statistics.median(x["step_s"] for x in mine)
        summary.append({"setting": setting, "step_s": step_s, "tokens_per_s": mine[0]["tokens_per_step"] / step_s,
                        "vs_4kb": base / step_s, "peak_rss_gb": max(x["peak_rss_gb"] for x in mine)})
    log(f"\n{args.arch}, {args.layers} layer(s), V {args.vocab}, bf16 SFT, {args.batch} x {args.seq} tokens a step, "
        f"median over {args.rounds} run(s) of each run's median step:")
    log(f"{'setting':<12} {'step s':>7} {'tok/s':>7} {'x 4KB':>6} {'peak RSS GB':>12}")
    for s in summary:
        log(f"{s['setting']:<12} {s['step_s']:>7.2f} {s['tokens_per_s']:>7.1f} {s['vs_4kb']:>6.2f} "
            f"{s['peak_rss_gb']:>12.2f}")
    if args.json:
        write_json_atomic(args.json, {"date": time.strftime("%Y-%m-%d %H:%M"), "kernel_thp": modes,
                                      "cpu_count": os.cpu_count(), "args": vars(args), "summary": summary,
                                      "runs": runs})
        log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
