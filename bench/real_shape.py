"""Real-shape rehearsal: the published Qwen3-30B-A3B / GLM-4.7-Flash shapes, with only L decoder layers, through
every script on CPU, timed, with each process's peak RSS next to zeda.plan's prediction.

    python bench/real_shape.py --arch qwen3_moe                      # L = 1
    python bench/real_shape.py --arch glm4_moe_lite --layers 2 --json docs/results/real_shape-glm4_moe_lite.json
    python bench/real_shape.py --arch qwen3_moe --vocab-size 32768 --workdir /tmp/rehearsal

What it does, each step a subprocess whose peak RSS (VmHWM, polled; bench/convert_memory.py says why) is kept:
  1. writes a random bf16 checkpoint in the real on-disk HF layout: config.json with the published values (and
     `num_hidden_layers` L), per-expert keys, several shards and model.safetensors.index.json, GLM's MTP layer
     after the last one; the tokenizer is the shipped teacher's (the scripts need one; its ids are < 104);
  2. convert.py to N + N/2 router outputs (peak RSS against the largest shard);
  3. load + a prefill + 32 decode steps (one process, bf16);
  4. two SFT steps and two OPD steps under `torchrun --nproc_per_node=2` (gloo), once with --ep 2 and once
     with --fsdp, bf16, each rank's peak RSS.
Before each step zeda.plan predicts its peak per process (the Python/torch baseline, measured here first as
the RSS of `import train_sft, train_opd`, included); a step whose predicted sum over its processes exceeds
--budget-gb is skipped and recorded with that prediction, and a running one is stopped if the machine's free
memory falls under --min-free-gb. Prints progress and one JSON line; --json writes it too. Intermediate files
go to a temporary folder, removed at the end, unless --workdir is given.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]  # the repository root, where the scripts live
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.convert_memory import run_peak_rss, vm_hwm_kib
from zeda.checkpoint import hf_state_dict
from zeda.config import ModelConfig
from zeda.flags import float_range, int_range
from zeda.loading import empty_model
from zeda.plan import GiB, Mesh, Setup, convert_memory, opd_memory, serve_memory, sft_memory

MB = 1 << 20
TOKENIZER_FROM = {"qwen3_moe": ROOT / "assets/qwen3_moe_teacher", "glm4_moe_lite": ROOT / "assets/glm4_moe_lite_teacher"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")

# Qwen/Qwen3-30B-A3B config.json. Sources: the Hugging Face config.json as reproduced in public derivatives
# (e.g. a "Qwen3-30B-A3B-tiny" profiling config that keeps every value but layers/experts, and the
# Qwen3-Coder-30B-A3B configs on the Hub), MindSpeed-RL's configs/model/qwen3_30b_a3b.yaml (48 layers, hidden
# 2048, 32 heads / 4 query groups, kv_channels 128, 128 experts, top-8, moe_ffn_hidden_size 768, vocab 151936,
# rotary base 1e6, max positions 40960, untied embeddings), and transformers 5.24's Qwen3MoeConfig defaults
# (documented as Qwen/Qwen3-30B-A3B-Base: vocab 151936, hidden 2048, intermediate 6144, 32/4 heads,
# moe_intermediate_size 768, top-8, 128 experts, rms_norm_eps 1e-6).
QWEN3_30B_A3B = {
    "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "dtype": "bfloat16",
    "vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 6144, "moe_intermediate_size": 768,
    "num_hidden_layers": 48, "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128,
    "num_experts": 128, "num_experts_per_tok": 8, "norm_topk_prob": True, "decoder_sparse_step": 1,
    "mlp_only_layers": [], "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "max_position_embeddings": 40960,
    "tie_word_embeddings": False, "attention_bias": False, "use_sliding_window": False, "sliding_window": None,
    "hidden_act": "silu", "bos_token_id": 151643, "eos_token_id": 151645, "router_aux_loss_coef": 0.001,
}

# zai-org/GLM-4.7-Flash config.json. Sources: transformers 5.24's Glm4MoeLiteConfig defaults, which are GLM-4.7-Flash's
# (vocab 154880, hidden 2048, intermediate 10240, moe_intermediate 1536, 47 layers, 20 heads, 64 routed + 1
# shared expert, top-4, routed_scaling_factor 1.8, q_lora 768, kv_lora 512, qk_nope 192, qk_rope 64, v 256,
# first layer dense, rms_norm_eps 1e-5, max positions 202752), and the release's config.json as reproduced in
# public Glm4MoeLiteForCausalLM derivatives on the Hub (the same values, plus rope_theta 1e6, sigmoid scoring,
# noaux_tc, n_group 1, num_nextn_predict_layers 1, eos [154820, 154827, 154829], pad 154820); NVIDIA
# Megatron-Bridge's GLM-4.7-Flash notes (MLA + MoE, per-expert keys on disk, ~30B total / 3B active).
GLM_47_FLASH = {
    "architectures": ["Glm4MoeLiteForCausalLM"], "model_type": "glm4_moe_lite", "dtype": "bfloat16",
    "vocab_size": 154880, "hidden_size": 2048, "intermediate_size": 10240, "moe_intermediate_size": 1536,
    "num_hidden_layers": 47, "num_attention_heads": 20, "num_key_value_heads": 20, "n_routed_experts": 64,
    "n_shared_experts": 1, "num_experts_per_tok": 4, "first_k_dense_replace": 1, "routed_scaling_factor": 1.8,
    "norm_topk_prob": True, "topk_method": "noaux_tc", "scoring_func": "sigmoid", "n_group": 1, "topk_group": 1,
    "q_lora_rank": 768, "kv_lora_rank": 512, "qk_nope_head_dim": 192, "qk_rope_head_dim": 64, "v_head_dim": 256,
    "num_nextn_predict_layers": 1, "partial_rotary_factor": 1.0, "rms_norm_eps": 1e-5, "rope_theta": 1000000,
    "max_position_embeddings": 202752, "tie_word_embeddings": False, "attention_bias": False, "hidden_act": "silu",
    "eos_token_id": [154820, 154827, 154829], "pad_token_id": 154820,
}
PUBLISHED = {"qwen3_moe": QWEN3_30B_A3B, "glm4_moe_lite": GLM_47_FLASH}
DEFAULT_LAYERS = {"qwen3_moe": 1, "glm4_moe_lite": 2}  # GLM's first layer is dense: 2 gives one MoE layer


def rehearsal_config(arch: str, layers: int, vocab_size: int | None = None) -> dict:
    """The published config.json with `layers` decoder layers (and optionally a smaller vocabulary).

    The token ids are the shipped teacher tokenizer's (the rehearsal feeds it): eos 3, pad 0, as in
    assets/*/config.json, since the published ids would name tokens this tokenizer does not have."""
    hf = dict(PUBLISHED[arch], num_hidden_layers=layers, eos_token_id=3, pad_token_id=0)
    hf.pop("bos_token_id", None)
    if vocab_size is not None:
        hf["vocab_size"] = vocab_size
    return hf


# ----------------------------------------------------------------------------- the checkpoint

def checkpoint_shapes(hf: dict) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    """(HF key, shape, dtype) of every tensor of the checkpoint, in on-disk order: the names and shapes of zeda's
    model on the meta device (which the parity tests hold to transformers'), 3D experts split into per-expert
    keys as the Hub stores them (zeda/checkpoint.py:hf_state_dict, as zeda saves), and for GLM the MTP layer(s)
    after the last decoder layer (zeda_toy/tiny.py)."""
    L, mtp = hf["num_hidden_layers"], hf.get("num_nextn_predict_layers", 0)
    extra = {}
    if mtp:  # an MoE decoder layer per MTP layer: build the model with them as ordinary sparse layers
        first_dense = hf.get("first_k_dense_replace", 1)
        extra = {"num_hidden_layers": L + mtp, "num_nextn_predict_layers": 0,
                 "mlp_layer_types": ["dense"] * first_dense + ["sparse"] * (L + mtp - first_dense)}
    model = empty_model(ModelConfig.from_hf_config(hf, **extra), torch.bfloat16)
    # the keys zeda saves under (per-expert 2D weights), on the meta device; the selection bias is fp32 on disk
    out = [(name, tuple(t.shape), torch.float32 if name.endswith("e_score_correction_bias") else torch.bfloat16)
           for name, t in hf_state_dict(model).items()]
    H, V = hf["hidden_size"], hf["vocab_size"]
    for i in range(L, L + mtp):  # the DeepSeek-V3 MTP tensors (zeda_toy/tiny.py:add_mtp_tensors)
        p = f"model.layers.{i}."
        out += [(p + "enorm.weight", (H,), torch.bfloat16), (p + "hnorm.weight", (H,), torch.bfloat16),
                (p + "eh_proj.weight", (H, 2 * H), torch.bfloat16), (p + "embed_tokens.weight", (V, H), torch.bfloat16),
                (p + "shared_head.norm.weight", (H,), torch.bfloat16),
                (p + "shared_head.head.weight", (V, H), torch.bfloat16)]
    layer = lambda k: int(k.split(".")[2]) if k.startswith("model.layers.") else (-1 if "embed" in k else 10**9)
    return sorted(out, key=lambda x: layer(x[0]))  # embedding first, layers in order, norm and head last


def shard_plan(hf: dict, shard_bytes: int) -> list[tuple[list, int]]:
    """The tensors of each shard and its bytes: cut between tensors at `shard_bytes`, as the Hub's are."""
    shapes = checkpoint_shapes(hf)
    shards, current, size = [], [], 0
    for key, shape, dtype in shapes:
        nbytes = torch.Size(shape).numel() * (4 if dtype == torch.float32 else 2)
        if current and size + nbytes > shard_bytes:
            shards.append((current, size))
            current, size = [], 0
        current.append((key, shape, dtype))
        size += nbytes
    shards.append((current, size))
    return shards


def shard_memory(shard_sizes: list[int]) -> dict[str, int]:
    """What the planner needs to know of the shards (zeda.plan: convert_memory, _load_pages): the largest two
    consecutive ones (convert.py holds both at the handover), and the mapped pages on top of the model at the
    load's peak (while shard i is open the model holds shards 0..i and the pages of shard i are mapped)."""
    filled, above = 0, 0
    for n in shard_sizes:
        filled += n
        above = max(above, filled + n - sum(shard_sizes))
    pairs = [a + b for a, b in itertools.pairwise(shard_sizes)] or shard_sizes
    return {"two_consecutive_shards_bytes": max(pairs), "mapped_above_model_bytes": above}


def write_checkpoint(out: Path, hf: dict, shard_bytes: int, seed: int = 0) -> dict:
    """Write the random bf16 checkpoint (shard_plan), plus config.json, the index and the shipped tokenizer.
    Returns its sizes."""
    shards = shard_plan(hf, shard_bytes)
    out.mkdir(parents=True)
    gen = torch.Generator().manual_seed(seed)
    weight_map = {}
    for i, (keys, nbytes) in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for key, shape, dtype in keys:
            if key.endswith("norm.weight"):
                tensors[key] = torch.ones(shape, dtype=dtype)
            elif key.endswith("e_score_correction_bias"):
                tensors[key] = torch.randn(shape, generator=gen) * 0.1
            else:  # N(0, 0.02), drawn in bf16 directly: no fp32 copy of a shard
                tensors[key] = torch.randn(shape, generator=gen, dtype=dtype).mul_(0.02)
        save_file(tensors, str(out / name), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(tensors, name)
        del tensors
        print(f"  wrote {name} ({nbytes / MB:.0f} MB)", flush=True)
    total = sum(n for _, n in shards)
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (out / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    for f in TOKENIZER_FILES:  # the scripts load the checkpoint's own tokenizer
        if (TOKENIZER_FROM[hf["model_type"]] / f).exists():
            shutil.copy(TOKENIZER_FROM[hf["model_type"]] / f, out / f)
    sizes = [n for _, n in shards]
    return {"checkpoint_bytes": total, "shards": len(shards), "shard_bytes": sizes,
            "largest_shard_bytes": max(sizes), **shard_memory(sizes)}


def write_data(folder: Path, seq: int) -> tuple[Path, Path]:
    """8 SFT rollouts (truncated to --seq tokens by train_sft.py --truncate) and 4 OPD prompts of ~20 tokens."""
    rollouts, prompts = folder / "rollouts.jsonl", folder / "prompts.jsonl"
    digits = "0123456789 + "
    with open(rollouts, "w") as f:
        for i in range(8):
            answer = "".join(digits[(i * 7 + j * 3) % len(digits)] for j in range(2 * seq))
            f.write(json.dumps({"messages": [{"role": "user", "content": f"{i}+{i * 3}"},
                                             {"role": "assistant", "content": answer}]}) + "\n")
    with open(prompts, "w") as f:
        for i in range(4):
            f.write(json.dumps({"prompt": f"Compute {i + 11} + {i * 7}."}) + "\n")
    return rollouts, prompts


# ----------------------------------------------------------------------------- measuring a process tree

def descendants(pid: int) -> list[int]:
    """pid and every process under it (torchrun's ranks are its children)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError):
            pass
    return out


def rank_of(pid: int) -> str | None:
    """"rank0", "rank1" for a torchrun worker (its RANK variable), None for anything else."""
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    for item in env:
        if item.startswith(b"RANK="):
            return f"rank{item[5:].decode()}"
    return None


def mem_available_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 1 << 62


def run_tree(cmd: list[str], env: dict | None = None, min_free: float = 0.0, timeout: float | None = None) -> dict:
    """Run `cmd` (its own session), polling the peak RSS of every process under it; kill them all if the
    machine's MemAvailable falls under `min_free` bytes, or after `timeout` seconds. Returns seconds, rc, peaks
    (MB, by rank or by "main" for the top process), stdout and a stderr tail."""
    t0 = time.time()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=err, env={**os.environ, **(env or {})},
                                start_new_session=True)
        peaks: dict[int, int] = {}
        names: dict[int, str] = {}
        stopped = None
        while proc.poll() is None:
            tree = descendants(proc.pid)
            for pid in tree:
                peaks[pid] = max(peaks.get(pid, 0), vm_hwm_kib(Path(f"/proc/{pid}/status")))
                if names.get(pid, "pid").startswith("pid"):  # again until it has exec'd with its RANK
                    names[pid] = "main" if pid == proc.pid else (rank_of(pid) or f"pid{pid}")
            reason = None
            if min_free and mem_available_bytes() < min_free:
                reason = f"stopped: the machine's free memory fell under {min_free / GiB:.1f} GiB"
            elif timeout is not None and time.time() - t0 > timeout:
                reason = f"stopped: still running after {timeout:.0f} s"
            if reason is not None and stopped is None:
                stopped = reason
                for pid in tree:  # by pid: torchrun starts each worker in a session of its own
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
            time.sleep(0.02)
        out.seek(0), err.seek(0)
        stdout, stderr = out.read().decode(errors="replace"), err.read().decode(errors="replace")
    # torchrun's own traceback hides the ranks' one-line errors: keep those first
    said = [line for line in stderr.splitlines() if "error:" in line or line.startswith("[rank")]
    stderr = "\n".join(said[-6:]) + "\n" + stderr[-1500:]
    by_name: dict[str, float] = {}
    for pid, kib in peaks.items():
        name = names.get(pid, f"pid{pid}")
        if name.startswith("pid") and kib < 200 * 1024:
            continue  # small helpers (a shell, torchrun's watchdogs)
        by_name[name] = round(max(by_name.get(name, 0), kib / 1024), 1)
    return {"seconds": round(time.time() - t0, 1), "rc": proc.returncode, "peak_rss_mb": by_name,
            "stdout": stdout, "stderr_tail": stderr, "stopped": stopped}


# ----------------------------------------------------------------------------- load and generate (one process)

def generate_probe(model_dir: str, prompt_len: int, new_tokens: int, batch: int) -> None:
    """Load in bf16, one prefill of `batch` x `prompt_len` tokens, `new_tokens` greedy decode steps with zeda's
    static KV cache; prints one JSON line with the times and the peak RSS right after loading."""
    from zeda.loading import load_model
    from zeda.model import KVCache

    torch.manual_seed(0)
    t0 = time.time()
    model = load_model(model_dir, device="cpu", dtype=torch.bfloat16)
    load_s = time.time() - t0
    load_peak_mb = vm_hwm_kib(Path("/proc/self/status")) / 1024
    cfg = model.config
    ids = torch.randint(0, 100, (batch, prompt_len))
    cache = KVCache(cfg, batch, prompt_len + new_tokens, torch.bfloat16, "cpu")
    with torch.no_grad():
        t0 = time.time()
        hidden = model(ids, cache=cache, hidden_only=True)[:, -1]  # [B, H]: no [B, T, V] logits
        next_ids = model.lm_head(hidden).argmax(-1, keepdim=True)  # [B, 1]
        prefill_s = time.time() - t0
        t0 = time.time()
        for _ in range(new_tokens):
            next_ids = model(next_ids, cache=cache)[:, -1].argmax(-1, keepdim=True)
        decode_s = time.time() - t0
    print(json.dumps({"load_s": round(load_s, 2), "load_peak_rss_mb": round(load_peak_mb, 1),
                      "prefill_s": round(prefill_s, 3), "decode_s": round(decode_s, 3),
                      "decode_tokens_per_s": round(batch * new_tokens / decode_s, 1)}))


# ----------------------------------------------------------------------------- the rehearsal

def training_script(kind: str, student: Path, teacher: Path, rollouts: Path, prompts: Path, out: Path, *,
                    ranks: int, batch: int, seq: int, answer_tokens: int, steps: int, device: str) -> list[str]:
    """train_sft.py or train_opd.py and its flags (to follow `python` or `torchrun`) for `steps` bf16 steps of
    `batch` sequences per rank on `ranks` ranks: SFT micro-batches of `seq` tokens (write_data's rollouts,
    truncated), OPD one prompt per rank with `batch` answers of `answer_tokens` each."""
    if kind == "sft":
        script = ["train_sft.py", "--rollouts", str(rollouts), "--global-batch-size", str(ranks * batch),
                  "--micro-batch-size", str(batch), "--max-seq-len", str(seq), "--truncate"]
    else:
        script = ["train_opd.py", "--teacher", str(teacher), "--prompts", str(prompts),
                  "--prompts-per-step", str(ranks), "--samples-per-prompt", str(batch),
                  "--max-new-tokens", str(answer_tokens)]
    return script + ["--student", str(student), "--out", str(out), "--max-steps", str(steps), "--dtype", "bfloat16",
                     "--device", device]


def read_metrics(out: Path) -> dict:
    """The step times and losses of a finished training run's metrics.jsonl."""
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"step_seconds": [round(s["step_seconds"], 2) for s in steps], "loss": [round(s["loss"], 4) for s in steps]}


MESHES = {"ep2": (["--ep", "2"], Mesh(2, 1, 2, False)), "fsdp": (["--fsdp"], Mesh(2, 1, 1, True))}
OPD_PROMPT_TOKENS = 20  # the chat-templated prompts of write_data, ~20 tokens with the shipped tokenizer


def predict(result: dict, phase: str) -> dict[str, float]:
    """zeda.plan's peak RSS per process (MB) of one step, from what `result` records (the config, the shard
    sizes, the measured baseline): rank 0 also holds the checkpoint gather at the end of training. A function
    of the result alone, so `--repredict` can redo it after a planner change."""
    hf = rehearsal_config(result["arch"], result["layers"], result["vocab_size"]) | result.get("config_overrides", {})
    teacher = ModelConfig.from_hf_config(hf)
    student = ModelConfig.from_hf_config(hf, zce_nums=[teacher.num_experts // 2], zce_types=["zero"])
    baseline, mapped = result["baseline_rss_mb"] * MB, result["mapped_above_model_bytes"]
    if phase == "convert":
        return {"main": round(sum(convert_memory(result["two_consecutive_shards_bytes"], baseline).values()) / MB, 1)}
    kind, _, mesh_name = phase.partition("_")
    mesh = MESHES[mesh_name][1] if mesh_name else Mesh(1)
    if kind == "generate":
        fn, cfg, seq = serve_memory, student, result["seq"] + result["decode_steps"]
    elif kind == "sft":
        fn, cfg, seq = sft_memory, student, result["seq"]
    else:  # the planner takes the teacher's config and converts it as convert.py does
        fn, cfg, seq = opd_memory, teacher, OPD_PROMPT_TOKENS + result["opd_answer_tokens"]
    setup = Setup(mesh, seq, result["batch_per_rank"], "bfloat16", False, "cpu", baseline, mapped)
    ranks = ["rank0", "rank1"] if mesh.gpus == 2 else ["main"]
    return {r: round(sum(fn(cfg, setup, rank0=(i == 0)).values()) / MB, 1) for i, r in enumerate(ranks)}


def repredict(path: Path) -> dict:
    """Redo every step's prediction of a saved result with the current planner (measurements untouched)."""
    result = json.loads(path.read_text())
    if "mapped_above_model_bytes" not in result:  # a result written before the shard figures were recorded
        hf = rehearsal_config(result["arch"], result["layers"], result["vocab_size"])
        hf |= result.get("config_overrides", {})
        sizes = [n for _, n in shard_plan(hf, result.get("shard_mb", 1024) * MB)]
        result |= {"shard_bytes": sizes, **shard_memory(sizes)}
    for name, phase in result["phases"].items():
        phase["predicted_mb"] = predict(result, name)
        if "skipped" in phase:
            phase["skipped"] = skip_reason(phase["predicted_mb"], result["budget_gb"])
    return result


def skip_reason(predicted_mb: dict, budget_gb: float) -> str | None:
    """Why a step is not run: its predicted RSS over its processes exceeds the budget (None: it fits)."""
    total = sum(predicted_mb.values()) / 1024
    return f"predicted {total:.1f} GiB over both ranks > --budget-gb {budget_gb}" if total > budget_gb else None


def rehearse(arch: str, layers: int, workdir: Path, seq: int = 128, batch: int = 2, answer_tokens: int = 32,
             decode_steps: int = 32, vocab_size: int | None = None, shard_mb: int = 1024, budget_gb: float = 14.0,
             min_free_gb: float = 2.0, phases: tuple[str, ...] = ("generate", "sft", "opd"),
             config_overrides: dict | None = None) -> dict:
    """Every step in `workdir`; returns the result dict (the JSON line). convert.py always runs: the training
    steps need its student. config_overrides (tests: a tiny shape through the same code) win over the config."""
    hf = rehearsal_config(arch, layers, vocab_size) | (config_overrides or {})
    teacher, student = workdir / "teacher", workdir / "student"
    result: dict = {"arch": arch, "layers": layers, "vocab_size": hf["vocab_size"], "dtype": "bfloat16",
                    "config_overrides": config_overrides or {}, "shard_mb": shard_mb, "seq": seq, "batch_per_rank": batch, "opd_answer_tokens": answer_tokens,
                    "decode_steps": decode_steps, "budget_gb": budget_gb, "phases": {}}
    min_free = min_free_gb * GiB

    print(f"[1/5] writing a random {arch} checkpoint, {layers} layer(s), published shapes -> {teacher}", flush=True)
    t0 = time.time()
    result |= write_checkpoint(teacher, hf, shard_mb * MB)
    result["write_s"] = round(time.time() - t0, 1)
    cfg = ModelConfig.from_hf_config(teacher)
    result["parameters"] = sum(p.numel() for p in empty_model(cfg).parameters())
    shard = result["largest_shard_bytes"]
    rollouts, prompts = write_data(workdir, seq)

    print("[2/5] baseline RSS (import train_sft, train_opd) and convert.py", flush=True)
    N = cfg.num_experts
    convert_cmd = [sys.executable, "convert.py", "--input-dir", str(teacher), "--output-dir", str(student),
                   "--num-zero-experts", str(N // 2)]
    (base_mb, base_rc, base_err), (conv_mb, rc, err) = run_peak_rss(
        [sys.executable, "-c", "import train_sft, train_opd"], convert_cmd)
    if base_rc != 0 or rc != 0:
        raise RuntimeError(f"baseline or convert.py failed:\n{base_err}\n{err}")
    result["baseline_rss_mb"] = round(base_mb, 1)
    predicted = predict(result, "convert")["main"]
    result["phases"]["convert"] = {"peak_rss_mb": {"main": round(conv_mb, 1)}, "predicted_mb": {"main": predicted},
                                   "largest_shard_mb": round(shard / MB, 1),
                                   "above_baseline_per_largest_shard": round((conv_mb - base_mb) * MB / shard, 2)}
    print(f"  convert peak {conv_mb:.0f} MB (predicted {predicted:.0f}), baseline {base_mb:.0f} MB", flush=True)

    if "generate" in phases:
        print(f"[3/5] load + prefill ({batch} x {seq}) + {decode_steps} decode steps, bf16", flush=True)
        code = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); from bench.real_shape import generate_probe; "
                f"generate_probe({str(student)!r}, {seq}, {decode_steps}, {batch})")
        r = run_tree([sys.executable, "-c", code], min_free=min_free)
        pred = predict(result, "generate")
        phase = {"peak_rss_mb": r["peak_rss_mb"], "predicted_mb": pred, "seconds": r["seconds"], "rc": r["rc"]}
        if r["rc"] == 0:
            phase |= json.loads(r["stdout"].strip().splitlines()[-1])
        else:
            phase["error"] = r["stopped"] or r["stderr_tail"][-800:]
        result["phases"]["generate"] = phase
        print(f"  {json.dumps(phase)}", flush=True)

    step = 4
    for kind in ("sft", "opd"):
        if kind not in phases:
            continue
        for mesh_name, (flags, mesh) in MESHES.items():
            name = f"{kind}_{mesh_name}"
            out = workdir / f"run-{name}"
            print(f"[{step}/5] {name}: 2 steps, torchrun --nproc_per_node=2 {' '.join(flags)}, bf16", flush=True)
            script = training_script(kind, student, teacher, rollouts, prompts, out, ranks=2, batch=batch, seq=seq,
                                     answer_tokens=answer_tokens, steps=2, device="cpu")
            pred = predict(result, name)
            phase = {"predicted_mb": pred}
            if skip_reason(pred, budget_gb):
                phase["skipped"] = skip_reason(pred, budget_gb)
                print(f"  skipped: {phase['skipped']}", flush=True)
            else:
                cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *script,
                       *flags]
                r = run_tree(cmd, env={"OMP_NUM_THREADS": "1"}, min_free=min_free)
                phase |= {"peak_rss_mb": {k: v for k, v in r["peak_rss_mb"].items() if k.startswith("rank")},
                          "seconds": r["seconds"], "rc": r["rc"]}
                if r["rc"] == 0:
                    phase |= read_metrics(out)
                else:
                    phase["error"] = r["stopped"] or r["stderr_tail"][-1500:]
                print(f"  {json.dumps(phase)}", flush=True)
            shutil.rmtree(out, ignore_errors=True)  # a final checkpoint + optimizer shards: GBs of disk
            result["phases"][name] = phase
        step += 1
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", choices=sorted(PUBLISHED), help="qwen3_moe or glm4_moe_lite (required)")
    p.add_argument("--layers", type=int_range(min=1), default=None,
                   help="decoder layers (default: 1 for qwen3_moe, 2 for glm4_moe_lite, whose first is dense)")
    p.add_argument("--vocab-size", type=int_range(min=128), default=None,
                   help="override the published vocabulary (default: the published one)")
    p.add_argument("--seq", type=int_range(min=8), default=128, help="SFT tokens per sequence and prefill length")
    p.add_argument("--batch", type=int_range(min=1), default=2, help="sequences per rank (SFT micro-batch, OPD "
                                                                   "samples, prefill batch)")
    p.add_argument("--answer-tokens", type=int_range(min=1), default=32, help="OPD answer length")
    p.add_argument("--shard-mb", type=int_range(min=16), default=1024, help="largest safetensors shard (MB)")
    p.add_argument("--budget-gb", type=float_range(above=0), default=14.0,
                   help="skip a step whose predicted RSS over its processes exceeds this (GiB, default 14)")
    p.add_argument("--min-free-gb", type=float_range(min=0), default=2.0,
                   help="stop a running step when the machine's free memory falls under this (GiB)")
    p.add_argument("--phases", default="generate,sft,opd",
                   help="comma-separated subset of generate, sft, opd (convert.py always runs)")
    p.add_argument("--workdir", type=Path, default=None, help="keep the intermediate files here")
    p.add_argument("--json", type=Path, default=None, help="also write the JSON line to this file")
    p.add_argument("--repredict", type=Path, default=None,
                   help="only redo the predictions of this saved result with the current zeda.plan, in place")
    args = p.parse_args(argv)
    if args.repredict is not None:
        if not args.repredict.is_file():
            p.error(f"--repredict {args.repredict}: no such file")
        args.repredict.write_text(json.dumps(repredict(args.repredict), indent=2) + "\n")
        print(f"re-predicted {args.repredict}")
        return 0
    if args.arch is None:
        p.error("--arch is required (qwen3_moe or glm4_moe_lite)")
    layers = args.layers or DEFAULT_LAYERS[args.arch]
    phases = tuple(x.strip() for x in args.phases.split(",") if x.strip())
    unknown = set(phases) - {"generate", "sft", "opd"}
    if unknown:
        p.error(f"--phases: unknown {sorted(unknown)}; choose from generate, sft, opd")
    if args.workdir is not None and args.workdir.exists() and any(args.workdir.iterdir()):
        p.error(f"--workdir {args.workdir} is not empty; give a new or empty folder")
    t0 = time.time()
    if args.workdir is None:
        with tempfile.TemporaryDirectory(prefix="real_shape-") as tmp:
            result = rehearse(args.arch, layers, Path(tmp), args.seq, args.batch, args.answer_tokens,
                              vocab_size=args.vocab_size, shard_mb=args.shard_mb, budget_gb=args.budget_gb,
                              min_free_gb=args.min_free_gb, phases=phases)
    else:
        args.workdir.mkdir(parents=True, exist_ok=True)
        result = rehearse(args.arch, layers, args.workdir, args.seq, args.batch, args.answer_tokens,
                          vocab_size=args.vocab_size, shard_mb=args.shard_mb, budget_gb=args.budget_gb,
                          min_free_gb=args.min_free_gb, phases=phases)
    result["total_s"] = round(time.time() - t0, 1)
    result["machine"] = f"{os.cpu_count()}-core CPU, torch {torch.__version__}"
    line = json.dumps(result)
    print(line)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.json.with_name(f".{args.json.name}.tmp")
        tmp.write_text(json.dumps(result, indent=2) + "\n")
        tmp.replace(args.json)
        print(f"wrote {args.json}")
    failed = [k for k, v in result["phases"].items() if v.get("rc", 0) != 0]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
