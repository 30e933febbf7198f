"""Peak memory of `python convert.py` on a multi-shard checkpoint: near one shard, not the whole model.

    python bench/convert_memory.py                                   # ~200 MB fp32 in 8 shards
    python bench/convert_memory.py --size-mb 96 --shards 8 --json runs/convert_memory.json

convert.py (zeda.conversion.convert_checkpoint) streams the checkpoint one shard at a time (docs/method.md §1),
so converting Qwen3-30B-A3B (61 GB in bf16) must not need 61 GB of RAM. To check that, we write a random
qwen3_moe checkpoint of `--size-mb` MB in `--shards` shards (one decoder layer per shard, written directly with
safetensors: no transformers model is built, so it takes seconds), run `python convert.py` on it in a
subprocess, and poll that subprocess's peak RSS (VmHWM; see run_peak_rss for why not ru_maxrss). A baseline
subprocess that only runs `import convert` (which imports zeda.conversion: torch, safetensors, tqdm, zeda) gives
the RSS that is not the conversion's doing; (peak - baseline) / largest shard says how many shards' worth of
memory the conversion held at once (2 to 3 here: the tensors read from one shard, that shard's mmapped pages,
the allocator's slack).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors.torch import save_file

from zeda.flags import float_range, int_range

ROOT = Path(__file__).resolve().parents[1]  # the repository root, where convert.py lives
MB = 1 << 20

# The fixed part of the shape; moe_intermediate_size I is solved from the requested size.
HIDDEN, EXPERTS, TOP_K, HEADS, KV_HEADS, HEAD_DIM, VOCAB = 256, 64, 8, 4, 2, 64, 1024


def checkpoint_config(num_layers: int, moe_intermediate: int) -> dict:
    """A qwen3_moe config.json (the keys Qwen3-30B-A3B's own config uses, `num_experts` included)."""
    return {
        "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "dtype": "float32",
        "vocab_size": VOCAB, "hidden_size": HIDDEN, "intermediate_size": 4 * HIDDEN,
        "moe_intermediate_size": moe_intermediate, "num_hidden_layers": num_layers,
        "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS, "head_dim": HEAD_DIM,
        "num_experts": EXPERTS, "num_experts_per_tok": TOP_K, "norm_topk_prob": True, "decoder_sparse_step": 1,
        "mlp_only_layers": [], "rms_norm_eps": 1e-6, "rope_theta": 1e6, "max_position_embeddings": 4096,
        "tie_word_embeddings": False,
    }


def layer_tensors(layer: int, moe_intermediate: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Every tensor of one qwen3_moe decoder layer under its HF key (experts stored one per key, as on the hub)."""
    H, I, N, D = HIDDEN, moe_intermediate, EXPERTS, HEAD_DIM
    p = f"model.layers.{layer}."
    shapes = {
        "input_layernorm.weight": (H,), "post_attention_layernorm.weight": (H,),
        "self_attn.q_proj.weight": (HEADS * D, H), "self_attn.k_proj.weight": (KV_HEADS * D, H),
        "self_attn.v_proj.weight": (KV_HEADS * D, H), "self_attn.o_proj.weight": (H, HEADS * D),
        "self_attn.q_norm.weight": (D,), "self_attn.k_norm.weight": (D,),
        "mlp.gate.weight": (N, H),
    }
    for e in range(N):
        shapes |= {f"mlp.experts.{e}.gate_proj.weight": (I, H), f"mlp.experts.{e}.up_proj.weight": (I, H),
                   f"mlp.experts.{e}.down_proj.weight": (H, I)}
    # One randn per key: safetensors refuses to save views that share storage.
    return {p + k: torch.randn(s, generator=gen) * 0.02 for k, s in shapes.items()}


def build_checkpoint(out: Path, size_mb: float, shards: int, seed: int = 0) -> dict:
    """Write a random fp32 qwen3_moe checkpoint of about `size_mb` MB to `out`: `shards` layers, one per shard
    (the embedding rides in the first shard, the final norm and lm_head in the last). Returns sizes in bytes."""
    attention = (2 * HEADS + 2 * KV_HEADS) * HEAD_DIM * HIDDEN  # q, k, v, o weights of one layer
    fixed_bytes = 4 * (shards * attention + 2 * VOCAB * HIDDEN)  # + embedding and lm_head (norms are noise)
    expert_bytes = size_mb * MB - fixed_bytes  # what is left goes to the routed experts, 3 * N * I * H per layer
    moe_intermediate = max(1, round(expert_bytes / (shards * 4 * 3 * EXPERTS * HIDDEN)))
    gen = torch.Generator().manual_seed(seed)
    out.mkdir(parents=True)
    weight_map, shard_bytes = {}, []
    for layer in range(shards):
        tensors = layer_tensors(layer, moe_intermediate, gen)
        if layer == 0:
            tensors["model.embed_tokens.weight"] = torch.randn(VOCAB, HIDDEN, generator=gen) * 0.02
        if layer == shards - 1:
            tensors["model.norm.weight"] = torch.ones(HIDDEN)
            tensors["lm_head.weight"] = torch.randn(VOCAB, HIDDEN, generator=gen) * 0.02
        name = f"model-{layer + 1:05d}-of-{shards:05d}.safetensors"
        save_file(tensors, str(out / name), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(tensors, name)
        shard_bytes.append(sum(t.numel() * t.element_size() for t in tensors.values()))
        del tensors
    index = {"metadata": {"total_size": sum(shard_bytes)}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (out / "config.json").write_text(json.dumps(checkpoint_config(shards, moe_intermediate), indent=2))
    return {"model_bytes": sum(shard_bytes), "largest_shard_bytes": max(shard_bytes), "shards": shards,
            "num_experts": EXPERTS}


def run_peak_rss(*cmds: list[str]) -> list[tuple[float, int, str]]:
    """Run the commands side by side in the repository root; per command (peak RSS in MB, exit code, stderr tail).

    Not ru_maxrss from wait4/getrusage: Linux carries the parent's high-water mark into the child across
    fork + exec, so a child of a 500 MB process (this one holds torch; pytest holds more) reports at least
    500 MB whatever it does. VmHWM in /proc/PID/status is the high-water mark of the child's own address
    space since exec; it only grows, so polling it until the child exits misses nothing but the last few
    milliseconds (interpreter teardown, which allocates nothing). RSS is per process, so running the
    commands at the same time changes no number, only the wall time.
    """
    with ExitStack() as stack:
        errs = [stack.enter_context(tempfile.TemporaryFile()) for _ in cmds]
        # Popen returns after the child has exec'd, so /proc/PID/status already describes the new program.
        procs = [subprocess.Popen(c, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=e) for c, e in zip(cmds, errs)]
        peaks_kib = [0] * len(procs)
        while any(p.returncode is None for p in procs):
            for i, p in enumerate(procs):
                if p.poll() is None:
                    peaks_kib[i] = max(peaks_kib[i], vm_hwm_kib(Path(f"/proc/{p.pid}/status")))
            time.sleep(0.005)
        tails = []
        for e in errs:
            e.seek(0)
            tails.append(e.read().decode(errors="replace")[-2000:])
    return [(kib / 1024, p.returncode, tail) for kib, p, tail in zip(peaks_kib, procs, tails)]


def vm_hwm_kib(status: Path) -> int:
    """VmHWM of a running process in KiB; 0 once it has exited (a zombie has no address space)."""
    try:
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def measure(size_mb: float = 200, shards: int = 8, workdir: str | Path | None = None) -> dict:
    """Build a checkpoint under `workdir` (a temporary folder if None), convert it, and return the numbers."""
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        t0 = time.time()
        sizes = build_checkpoint(Path(tmp) / "in", size_mb, shards)
        build_s = time.time() - t0
        convert_cmd = [sys.executable, "convert.py", "--input-dir", f"{tmp}/in", "--output-dir", f"{tmp}/out",
                       "--num-zero-experts", str(EXPERTS // 2)]
        t0 = time.time()
        (baseline_mb, base_rc, base_err), (peak_mb, rc, err) = run_peak_rss(
            [sys.executable, "-c", "import convert"], convert_cmd)
        convert_s = time.time() - t0
        if base_rc != 0:
            raise RuntimeError(f"baseline `import convert` failed ({base_rc}):\n{base_err}")
        if rc != 0:
            raise RuntimeError(f"convert.py failed ({rc}):\n{err}")
    model_mb, shard_mb = sizes["model_bytes"] / MB, sizes["largest_shard_bytes"] / MB
    return {
        "model_mb": round(model_mb, 1), "shards": shards, "largest_shard_mb": round(shard_mb, 1),
        "peak_rss_mb": round(peak_mb, 1), "baseline_rss_mb": round(baseline_mb, 1),
        "above_baseline_mb": round(peak_mb - baseline_mb, 1),
        "above_baseline_per_largest_shard": round((peak_mb - baseline_mb) / shard_mb, 2),
        "above_baseline_per_model": round((peak_mb - baseline_mb) / model_mb, 3),
        "build_s": round(build_s, 1), "convert_s": round(convert_s, 1),
    }


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size-mb", type=float_range(above=0), default=200, help="model size in MB, fp32 (default 200)")
    p.add_argument("--shards", type=int_range(min=1), default=8,
                   help="number of safetensors shards, one layer each (default 8)")
    p.add_argument("--workdir", default=None, help="where the temporary checkpoints go (default: system temp)")
    p.add_argument("--json", type=Path, default=None, help="also write the numbers to this JSON file")
    args = p.parse_args()
    r = measure(args.size_mb, args.shards, args.workdir)
    print(f"model {r['model_mb']} MB in {r['shards']} shards, largest shard {r['largest_shard_mb']} MB "
          f"(built in {r['build_s']} s, converted in {r['convert_s']} s)")
    print(f"peak RSS of convert.py {r['peak_rss_mb']} MB, baseline (import only) {r['baseline_rss_mb']} MB")
    print(f"above baseline {r['above_baseline_mb']} MB = {r['above_baseline_per_largest_shard']} x largest shard "
          f"= {r['above_baseline_per_model']} x model")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.json.with_name(f".{args.json.name}.tmp")
        tmp.write_text(json.dumps(r, indent=2) + "\n")
        tmp.replace(args.json)  # atomic: a reader never sees half a file
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
