"""Static HF MoE checkpoint -> dynamic ZEDA checkpoint with Z zero experts (docs/method.md §1).

    from zeda.conversion import convert_checkpoint
    summary = convert_checkpoint("Qwen3-30B-A3B", "Qwen3-30B-A3B-zeda", new_num_experts=192)

Per router the weight grows from [N, H] to [N + Z, H]: rows 0..N-1 are copied bit for bit, the Z new rows are
sampled element-wise from N(mean_h, std_h) with mean and std taken across the N original rows. GLM's
e_score_correction_bias [N] grows to [N + Z] with entries sampled from the scalar N(mean, std) of the N
originals. Every router the checkpoint holds grows, as the authors do: the MoE layers', and GLM's MTP layer's
(layer num_hidden_layers, declared by num_nextn_predict_layers), which our model does not use but a converted
checkpoint must keep consistent for tools that do. Every other tensor is written back byte-identical.
config.json keeps every field (and the key that named N) and gains zce_nums / zce_types / use_zce_mask and the
authors' architecture name.

Streams one shard at a time, so peak memory stays near the largest shard, not the model. Writes into a
temporary folder next to the output and renames it at the end: an interrupted run leaves nothing behind, and
one killed outright leaves a folder that the next run removes (zeda.checkpoint.temporary_sibling).
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import time
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm import tqdm

from zeda.checkpoint import (INDEX_NAME, copy_side_files, mtp_layer, read_shard, replace_folder, shard_files,
                             shard_metadata, temporary_sibling, write_safetensors)
from zeda.config import DYNAMIC_ARCHITECTURES, ZERO_NORMALIZATIONS, ModelConfig, experts_key
from zeda.errors import CheckpointError, ConfigError, UsageError
from zeda.hf import write_remote_code

class ConversionStopped(Exception):
    """A signal stopped the conversion at a clean point; nothing was written."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum


MAX_ZERO_PER_REAL = 8  # Z above 8 N is no adaptation of the model any more, and a typo's 10^8 would allocate GBs
ROUTER_KEY = re.compile(r"^model\.layers\.(\d+)\.mlp\.gate\.(weight|e_score_correction_bias)$")


def grow_router_weight(w_NH: torch.Tensor, num_zero: int, generator: torch.Generator) -> torch.Tensor:
    """[N, H] -> [N + Z, H]: copied rows, then rows ~ N(mean over experts, std over experts) per hidden dim."""
    wf = w_NH.float()
    mean_H, std_H = wf.mean(0), wf.std(0)  # statistics across the N original rows
    new_ZH = torch.normal(mean_H.expand(num_zero, -1), std_H.expand(num_zero, -1), generator=generator)
    return torch.cat([w_NH, new_ZH.to(w_NH.dtype)])


def grow_correction_bias(b_N: torch.Tensor, num_zero: int, generator: torch.Generator) -> torch.Tensor:
    """[N] -> [N + Z]: copied entries, then entries ~ N(mean, std) of the N originals (a scalar Gaussian)."""
    bf = b_N.float()
    new_Z = torch.normal(float(bf.mean()), float(bf.std()), (num_zero,), generator=generator)
    return torch.cat([b_N, new_Z.to(b_N.dtype)])


def layer_generator(seed: int, layer: int, kind: str) -> torch.Generator:
    """One generator per (layer, tensor): results do not depend on shard order or layout. GLM's MTP layer is
    layer num_hidden_layers here, so it gets its own generator like any other layer."""
    return torch.Generator().manual_seed(seed * 1_000_003 + layer * 2 + (kind == "e_score_correction_bias"))


def convert_checkpoint(input_dir: str | Path, output_dir: str | Path, num_zero: int | None = None,
                       new_num_experts: int | None = None, seed: int = 0, overwrite: bool = False,
                       progress: bool = True, normalization: str = "zeda",
                       stop_requested: Callable[[], int | None] | None = None) -> dict:
    """Convert a checkpoint folder; returns a summary dict.

    stop_requested: polled before each shard and before the final rename; a signal number it returns stops the
    conversion there with ConversionStopped, the temporary folder removed. (convert.py's signal handlers set it:
    an exception raised from inside a handler could land anywhere, in a finaliser or between creating the
    temporary folder and guarding it, and leave the folder behind.)

    Give exactly one of num_zero (Z) and new_num_experts (N + Z, the authors' flag). normalization "adamoe" makes
    the new experts the AdaMoE baseline's null experts (real weights renormalised over the real slots; written
    as config.json's "zce_normalization"); "zeda" is the method's own. The input is never
    modified. Raises ConfigError / CheckpointError / UsageError (all ZedaError) for what the user can fix, and
    OSError from the filesystem."""
    t0 = time.time()
    if normalization not in ZERO_NORMALIZATIONS:
        raise UsageError(f"--normalization {normalization!r}: choose one of {', '.join(ZERO_NORMALIZATIONS)}")
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    cfg = ModelConfig.from_hf_config(input_dir)  # refuses unsupported architectures with a clear message
    hf = cfg.hf_config
    config_path = input_dir / "config.json"
    if cfg.num_zero_experts or any(a in DYNAMIC_ARCHITECTURES.values() for a in hf.get("architectures") or []):
        raise ConfigError(f"{config_path}: already converted (zce_nums={hf.get('zce_nums')}); convert a static model")
    N = cfg.num_experts
    if (num_zero is None) == (new_num_experts is None):
        raise UsageError("give exactly one of --new-num-experts M or --num-zero-experts Z")
    Z = num_zero if num_zero is not None else new_num_experts - N
    if Z <= 0:
        raise UsageError(f"--new-num-experts must exceed the {N} real experts of {config_path} (got {N + Z})")
    if Z > MAX_ZERO_PER_REAL * N:
        raise UsageError(f"{Z} zero experts for {N} real ones: at most {MAX_ZERO_PER_REAL * N} ({MAX_ZERO_PER_REAL} per "
                         f"real expert; the method uses N/2)")
    if input_dir.resolve().is_relative_to(output_dir.resolve()):  # equal, or --overwrite would delete the input
        raise UsageError("--output-dir must differ from --input-dir and not contain it (the input is never "
                         "overwritten)")
    if output_dir.resolve().is_relative_to(input_dir.resolve()):  # later conversions would copy it along
        raise UsageError(f"--output-dir {output_dir} is inside --input-dir {input_dir}; write it elsewhere")
    if output_dir.is_symlink():  # --overwrite would replace the link, not what it points to
        raise UsageError(f"--output-dir {output_dir} is a symbolic link; give the folder it points to, or another")
    if output_dir.exists() and not overwrite:
        raise UsageError(f"{output_dir} exists; pass --overwrite to replace it")
    shards = shard_files(input_dir)  # every shard the index lists must exist before we start

    tmp = temporary_sibling(output_dir)
    changed, layers_seen, mtp_grown, added_bytes, added_params = [], set(), 0, 0, 0
    def check_stop():
        signum = stop_requested() if stop_requested is not None else None
        if signum is not None:
            raise ConversionStopped(signum)

    try:
        for path in tqdm(shards, desc="convert", unit="shard", disable=not progress):
            check_stop()
            tensors = read_shard(path)
            for key in list(tensors):
                is_mtp = mtp_layer(cfg, key, path.name, config_path)  # refuses layers the config does not have
                m = ROUTER_KEY.match(key)
                if not m:
                    continue
                layer, kind = int(m.group(1)), m.group(2)
                if not is_mtp and not cfg.moe_layers[layer]:
                    continue
                t = tensors[key]
                expected = (N, cfg.hidden_size) if kind == "weight" else (N,)
                if tuple(t.shape) != expected:
                    raise CheckpointError(f"{path.name}: '{key}' has shape {tuple(t.shape)}, expected {expected}")
                grow = grow_router_weight if kind == "weight" else grow_correction_bias
                tensors[key] = grow(t, Z, layer_generator(seed, layer, kind)).contiguous()
                added_bytes += (tensors[key].numel() - t.numel()) * t.element_size()
                added_params += (tensors[key].numel() - t.numel()) if kind == "weight" else 0  # bias: a buffer
                changed.append(key)
                if is_mtp:
                    mtp_grown += 1
                else:
                    layers_seen.add(layer)
            write_safetensors(tensors, tmp / path.name, metadata=shard_metadata(path))
            del tensors
        # The MoE layers must all have a router; MTP layers may be absent (a checkpoint saved without them).
        missing = [i for i, moe in enumerate(cfg.moe_layers) if moe and i not in layers_seen]
        if missing:
            raise CheckpointError(f"{input_dir}: no router weight for MoE layers {missing[:5]}")
        index_path = input_dir / INDEX_NAME
        if index_path.exists():
            index = json.loads(index_path.read_text())
            metadata = index.setdefault("metadata", {})
            metadata["total_size"] = metadata.get("total_size", 0) + added_bytes
            if "total_parameters" in metadata:  # transformers 5.x also records it (parameters, not buffers)
                metadata["total_parameters"] += added_params
            (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2))
        copied = copy_side_files(input_dir, tmp)
        new_hf = dict(hf)
        new_hf[experts_key(hf)] = N  # keep N under the key the input used
        new_hf.update(zce_nums=[Z], zce_types=["zero"], use_zce_mask=False,
                      architectures=[DYNAMIC_ARCHITECTURES[cfg.model_type]])
        if normalization != "zeda":
            new_hf["zce_normalization"] = normalization
        new_hf = write_remote_code(tmp, new_hf)  # modeling_zeda.py + auto_map: loads in transformers (zeda/hf)
        (tmp / "config.json").write_text(json.dumps(new_hf, indent=2) + "\n")
        check_stop()
        replace_folder(tmp, output_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {
        "input_dir": str(input_dir), "output_dir": str(output_dir), "model_type": cfg.model_type,
        "real_experts": N, "zero_experts": Z, "router_outputs_before": N, "router_outputs_after": N + Z,
        "top_k": cfg.num_experts_per_tok, "tensors_changed": len(changed), "mtp_tensors_changed": mtp_grown,
        "shards": len(shards), "files_copied": copied, "seed": seed, "seconds": round(time.time() - t0, 2),
    }
