"""Loading a checkpoint folder: one path for every script, device and mesh.

    model = load_model("assets/qwen3_moe_teacher")                     # auto device and dtype, one process
    model = load_model(path, dist=d, dtype=torch.bfloat16, router_fp32=True, activation_checkpointing=True)
    model, tokenizer = load_for_inference(path)                        # + its own tokenizer, checked

The model is built on the meta device (shapes, no memory), split over the mesh in torchtitan's order with expert
parallelism first, so each rank allocates and reads only its own experts (~95% of Qwen3-30B-A3B's weights);
then the dense part is read whole, one tensor at a time, and tensor parallelism, activation checkpointing and
FSDP2 (last) keep their part of it. Without torchrun every split is a no-op. Device and dtype default to
"auto" (zeda/device.py), so a teacher loaded for rollouts on a GPU machine runs on the GPU, where the student
does.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from zeda.baselines import use_adamoe_routing
from zeda.checkpoint import load_weights
from zeda.config import ModelConfig
from zeda.device import pick_device, resolve_dtype
from zeda.distributed import Dist
from zeda.errors import ConfigError, UsageError
from zeda.flags import EXPERT_BACKENDS
from zeda.expert_parallel import apply_expert_parallel, mark_expert_shards
from zeda.model import CausalLM
from zeda.sharding import apply_activation_checkpointing, apply_fsdp
from zeda.tensor_parallel import apply_tensor_parallel

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def resolve_backend(name: str, cfg: ModelConfig, dtype: torch.dtype) -> str:
    """"auto": grouped_mm when the expert shapes meet its 16-byte alignment (moe.expert_swiglu_grouped_mm),
    else the loop reference, which takes any shape."""
    if name not in EXPERT_BACKENDS:
        raise UsageError(f"--expert-backend: unknown backend {name!r}; choose one of {', '.join(EXPERT_BACKENDS)}")
    if name != "auto":
        return name
    size = torch.tensor([], dtype=dtype).element_size()
    aligned = (cfg.hidden_size * size) % 16 == 0 and (cfg.moe_intermediate_size * size) % 16 == 0
    return "grouped_mm" if aligned else "loop"


def empty_model(cfg: ModelConfig, dtype: torch.dtype = torch.float32) -> CausalLM:
    """The model on the meta device: shapes and dtypes, no memory. Split it (expert parallelism) before
    materialize."""
    with torch.device("meta"):
        model = CausalLM(cfg)
    if cfg.zero_normalization == "adamoe":  # the AdaMoE baseline's checkpoint (zeda/baselines.py)
        use_adamoe_routing(model)
    return model.to(dtype)


def materialize(model: CausalLM, device: str | torch.device) -> None:
    """Allocate a meta model's tensors on `device` (uninitialised: load_weights fills them)."""
    model.to_empty(device=device)
    for module in model.modules():  # the selection bias stays fp32 whatever the dtype (docs/method.md §1)
        if hasattr(module, "e_score_correction_bias"):
            module.e_score_correction_bias.data = module.e_score_correction_bias.data.float().zero_()
    if model.config.tie_word_embeddings:  # to_empty makes new Parameters: tie them again
        model.lm_head.weight = model.model.embed_tokens.weight


def free_memory(device: torch.device) -> int | None:
    """Bytes free for new tensors on `device`: CUDA's own count, or MemAvailable on a Linux host (what can be
    allocated without swapping, page cache included); None where we cannot tell."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
    return None


def check_fits(model: CausalLM, device: torch.device, where: str) -> None:
    """Refuse, before anything is allocated, weights that cannot fit: a config with a typo'd size (or a 30B model
    on a laptop) would otherwise fail minutes later inside an allocation, or swap the machine to a halt. Counts
    this rank's share (the meta model is already split over the mesh), times the ranks sharing a host's memory."""
    need = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    if device.type == "cpu":
        need *= int(os.environ.get("LOCAL_WORLD_SIZE", "1"))  # torchrun's ranks on this host share its memory
    free = free_memory(device)
    if free is not None and need > free:
        raise UsageError(f"{where}: the weights need {need / 2**30:.1f} GiB on {device} but {free / 2**30:.1f} GiB "
                         f"is free; split them over a mesh (--ep, --fsdp, --tp), load a smaller --dtype, or use a "
                         f"bigger machine (python -m zeda.plan estimates what fits)")


def load_model(path: str | os.PathLike, device: str | torch.device = "auto", dtype: str | torch.dtype = "auto", *,
               dist: Dist | None = None, expert_backend: str = "auto", trainable: bool = True,
               router_fp32: bool = False, activation_checkpointing: bool = False, fp32_masters: bool = False,
               **overrides) -> CausalLM:
    """An HF checkpoint folder (static or converted, qwen3_moe or glm4_moe_lite) as a model in eval mode.

    device/dtype: "auto" (cuda + bfloat16 when there is a GPU, else cpu + float32), a name, or a torch object;
    under a mesh (`dist`, from zeda.distributed.init_distributed) the rank's own device is used. router_fp32:
    the router weights in fp32 whatever dtype (the paper's training recipe). trainable=False freezes every
    parameter (the OPD teacher). fp32_masters (training in a low-precision dtype under FSDP2): the parameters
    are kept in fp32 and FSDP2 computes in `dtype` (zeda/precision.py); expert shards left out of FSDP2 (ep) take
    `dtype` and get their masters from the trainer. Without FSDP2 it changes nothing. Keyword overrides (e.g. use_zce_mask=True) win over config.json. The router's
    e_score_correction_bias stays fp32."""
    path = Path(path)
    if not path.is_dir():
        raise ConfigError(f"{path}: no such model folder")
    d = dist if dist is not None else Dist(device=pick_device(device))
    dt = resolve_dtype(dtype, d.device)
    cfg = ModelConfig.from_hf_config(path, **overrides)  # refuses unsupported architectures before any weight
    d.dims.check_model(cfg, where=str(path))
    fsdp_masters = fp32_masters and d.dims.fsdp and d.dims.dp > 1 and dt != torch.float32
    model = empty_model(cfg, torch.float32 if fsdp_masters else dt)
    if router_fp32:
        for block in model.model.layers:
            if block.is_moe:
                block.mlp.gate.float()
    apply_expert_parallel(model, d)
    check_fits(model, d.device, str(path))
    materialize(model, d.device)
    mark_expert_shards(model)
    model.bytes_read = load_weights(model, path)  # what this rank read: a test checks it is only its share
    model.requires_grad_(trainable)
    if fsdp_masters and d.dims.ep > 1:  # the expert shards FSDP2 leaves out compute in dtype like the rest
        for block in model.model.layers:
            if block.is_moe:
                block.mlp.experts.to(dt)
    model.set_expert_backend(resolve_backend(expert_backend, cfg, dt))
    apply_tensor_parallel(model, d)
    if activation_checkpointing:
        apply_activation_checkpointing(model)
    apply_fsdp(model, d, compute_dtype=dt if fsdp_masters else None)
    return model.eval()


def load_tokenizer(path: str | os.PathLike):
    """A checkpoint folder's own tokenizer, never from the Hub; it must have a chat template."""
    from transformers import AutoTokenizer  # a slow import: only when a tokenizer is actually loaded

    path = Path(path)
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise ConfigError(f"{path}: no tokenizer files ({' or '.join(TOKENIZER_FILES)})")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as e:  # a missing tokenizer.json, a damaged file: transformers raises many kinds
        raise ConfigError(f"{path}: cannot load the tokenizer ({type(e).__name__}: {str(e)[:300]})") from None
    if not tokenizer.chat_template:
        raise ConfigError(f"{path}: the tokenizer has no chat template")
    try:  # a broken template fails here, in one line, not mid-run
        tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    except Exception as e:
        raise ConfigError(f"{path}: the chat template cannot render a conversation ({type(e).__name__}: "
                          f"{str(e)[:300]})") from None
    return tokenizer


def same_tokenizer(ours, theirs_tokenizer, theirs: str | os.PathLike, whose: str, why: str) -> None:
    """Two models compared or distilled token by token must give every token the same id; the same size is not
    enough (a permuted tokenizer.json has it). Special tokens' roles and chat templates may differ: only the first
    model's (`whose`) template renders prompts."""
    a, b = ours.get_vocab(), theirs_tokenizer.get_vocab()
    if a != b:
        differ = sorted(set(a.items()) ^ set(b.items()), key=lambda kv: kv[1])[:3]
        raise UsageError(f"{theirs}: its tokenizer is not {whose} ({len(b)} and {len(a)} tokens; first differences "
                         f"{differ}): {why}, so both need one vocabulary with the same ids")


def load_for_inference(path: str | os.PathLike, device: str = "auto", dtype: str = "auto",
                       expert_backend: str = "auto", dist: Dist | None = None) -> tuple[CausalLM, object]:
    """(model in eval mode, its own tokenizer), both checked before any weight is read."""
    path = Path(path)
    if not path.is_dir():
        raise ConfigError(f"{path}: no such model folder")
    cfg = ModelConfig.from_hf_config(path)
    tokenizer = load_tokenizer(path)
    if len(tokenizer) > cfg.vocab_size:  # ids past the embedding would index out of range mid-generation
        raise ConfigError(f"{path}: the tokenizer has {len(tokenizer)} tokens but config.json's vocab_size is "
                          f"{cfg.vocab_size}: tokenizer and model do not belong together")
    return load_model(path, device, dtype, dist=dist, expert_backend=expert_backend), tokenizer
