"""HF checkpoint folders: read shards (streaming), load into our model, save atomically.

A checkpoint folder is config.json + model.safetensors, or + model-0000i-of-0000n.safetensors with
model.safetensors.index.json. Routed experts are stored per expert (HF's hub format, and what
transformers 5.x writes back), `model.layers.{l}.mlp.experts.{e}.{gate,up,down}_proj.weight`; we stack them
into our 3D tensors on load, gate_up_proj [N, 2I, H] (gate rows, then up rows) and down_proj [N, H, I], and split
them again on save. transformers 5.x's fused in-memory names (`mlp.experts.gate_up_proj [N, 2I, H]`,
`mlp.experts.down_proj [N, H, I]`), which are ours, are accepted too.
GLM-4.7-Flash ships its MTP layer as layer `num_hidden_layers` (config `num_nextn_predict_layers`); it is not
part of the model and is skipped. Any other layer past the last one means config.json and the checkpoint
disagree, and is refused (mtp_layer).

Folders are written into a hidden temporary sibling and renamed into place. A run killed outright (kill -9, a
power cut) cannot clean up after itself, so the sibling is named after its host and process,
`.<name>.tmp-<host>-<pid>-<random>`, and the next write of the same output removes those whose process is gone.
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
import shutil
import socket
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from zeda.config import ModelConfig
from zeda.data import umask_file_mode
from zeda.distributed import Dist
from zeda.errors import CheckpointError  # noqa: F401  (re-exported)
from zeda.hf import write_remote_code
from zeda.optim import load_optimizer_tensors, optimizer_tensors
from zeda.precision import MasterWeights
from zeda.sharding import full_state_dict

INDEX_NAME = "model.safetensors.index.json"
STATE_FILE, OPTIM_FILE = "trainer_state.json", "optimizer.safetensors"  # in a training checkpoint
SINGLE_NAME = "model.safetensors"
EXPERT_KEY = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
FUSED_KEY = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(gate_up_proj|down_proj)$")
LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.")
# The host part of a temporary folder's name: no "-", so that the name splits back unambiguously.
HOST = re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname()) or "host"


def mtp_layer(cfg: ModelConfig, key: str, where: str, config_path: str | Path) -> bool:
    """Whether checkpoint key `key` (in shard `where`) belongs to one of GLM's MTP layers, which the model does
    not have; a layer index past the model's last layer that the config does not declare as MTP is an error.

    The MTP layers are [num_hidden_layers, num_hidden_layers + num_nextn_predict_layers). Skipping every index
    past num_hidden_layers, as we once did, made a config.json with too few layers load a truncated model."""
    m = LAYER_KEY.match(key)
    if not m or int(m.group(1)) < cfg.num_hidden_layers:
        return False
    layer, first, n = int(m.group(1)), cfg.num_hidden_layers, cfg.num_nextn_predict_layers
    if layer < first + n:
        return True
    declared = (f"num_nextn_predict_layers {n} declares MTP layers {first}..{first + n - 1} only" if n else
                "only the MTP layers that num_nextn_predict_layers declares may follow the last layer")
    raise CheckpointError(f"{config_path} says num_hidden_layers {first} but {where} holds layer {layer} ('{key}'); "
                          f"{declared}")


def shard_files(folder: str | Path) -> list[Path]:
    """The safetensors shards of a checkpoint folder, in index order; every listed shard must exist."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such model folder")
    index = folder / INDEX_NAME
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: not a safetensors index ({e})") from None
        names = list(dict.fromkeys(weight_map.values()))
    elif (folder / SINGLE_NAME).exists():
        names = [SINGLE_NAME]
    else:
        raise CheckpointError(f"{folder}: no {SINGLE_NAME} or {INDEX_NAME}")
    paths = [folder / n for n in names]
    for p in paths:
        if not p.exists():
            raise CheckpointError(f"{p}: shard listed in {INDEX_NAME} is missing")
    return paths


def read_shard(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of one shard, or a CheckpointError naming the file when it is corrupt."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, RuntimeError) as e:
        raise CheckpointError(f"{path}: cannot read safetensors shard ({e})") from None


def shard_metadata(path: Path) -> dict | None:
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata()
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: cannot read safetensors shard ({e})") from None


SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}


def checkpoint_dtype(folder: str | Path) -> torch.dtype:
    """The floating dtype that holds most of a checkpoint's weights, read from the shards' headers (no tensor is
    read): what a training run writes its checkpoints in, so a bf16 model stays a bf16 checkpoint."""
    elements: dict[torch.dtype, int] = {}
    for path in shard_files(folder):
        try:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    s = f.get_slice(key)
                    if s.get_dtype() in SAFETENSORS_DTYPES:
                        dtype = SAFETENSORS_DTYPES[s.get_dtype()]
                        elements[dtype] = elements.get(dtype, 0) + math.prod(s.get_shape())
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{path}: cannot read safetensors shard ({e})") from None
    return max(elements, key=elements.get, default=torch.float32)


def load_weights(model: torch.nn.Module, folder: str | Path) -> int:
    """Fill `model` from a checkpoint folder, tensor by tensor, checking every key and shape; returns the bytes read.

    Routed experts may be split over expert-parallel ranks (zeda.expert_parallel, via zeda.load_model): a
    GroupedExperts that holds experts [expert_offset, expert_offset + n) of num_experts reads only those, so a
    rank never holds another rank's experts, not even for a moment (per-expert keys are skipped unread; fused
    ones are sliced). A tensor of a layer past the model's last is skipped only if it is a declared MTP layer
    (mtp_layer)."""
    cfg: ModelConfig = model.config
    params = dict(model.named_parameters()) | {k: b for k, b in model.named_buffers()}
    filled: set[str] = set()
    experts_seen: dict[str, set[int]] = {}
    bytes_read = 0

    def check_shape(shape, expected, where: str, key: str):
        if tuple(shape) != tuple(expected):
            raise CheckpointError(f"{where}: tensor '{key}' has shape {tuple(shape)}, expected {tuple(expected)}")

    def put(name: str, tensor: torch.Tensor, where: str, key: str, index: int | None = None, rows=slice(None)):
        """Copy `tensor` (checkpoint key `key`) into our parameter `name` (expert `index` of a 3D expert tensor,
        and of that its `rows`: the gate or the up half of gate_up_proj)."""
        nonlocal bytes_read
        target = params[name] if index is None else params[name][index][rows]
        check_shape(tensor.shape, target.shape, where, key)
        # Integer weights would be cast silently and NaN / inf ones would answer nonsense with exit 0: name them.
        if not tensor.is_floating_point():
            raise CheckpointError(f"{where}: tensor '{key}' is {tensor.dtype}, not floating point")
        if not torch.isfinite(tensor).all():
            raise CheckpointError(f"{where}: tensor '{key}' holds NaN or infinite values")
        with torch.no_grad():
            target.copy_(tensor)
        bytes_read += tensor.numel() * tensor.element_size()

    def expert_range(prefix: str, where: str, key: str) -> tuple[int, int, int]:
        """(first expert held here, experts held here, experts in the model) of the GroupedExperts at prefix."""
        if f"{prefix}.gate_up_proj" not in params:
            raise CheckpointError(f"{where}: unexpected tensor '{key}' for a {cfg.model_type} model")
        experts = model.get_submodule(prefix)
        return experts.expert_offset, experts.gate_up_proj.shape[0], experts.num_experts

    def expert_rows(prefix: str, proj: str) -> tuple[str, slice]:
        """Our parameter that HF's per-expert projection `proj` goes into, and its rows there."""
        if proj == "down_proj":
            return f"{prefix}.down_proj", slice(None)
        I = params[f"{prefix}.down_proj"].shape[2]
        return f"{prefix}.gate_up_proj", slice(0, I) if proj == "gate_proj" else slice(I, 2 * I)

    config_path = Path(folder) / "config.json"
    for path in shard_files(folder):
        where = path.name
        try:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    if mtp_layer(cfg, key, where, config_path):
                        continue  # GLM's MTP layer: not part of our model
                    if key.endswith("rotary_emb.inv_freq"):
                        continue
                    if m := EXPERT_KEY.match(key):  # one expert's 2D weight: expert e of our 3D tensor
                        prefix, e, proj = m.group(1), int(m.group(2)), m.group(3)
                        lo, n, total = expert_range(prefix, where, key)
                        if e >= total:
                            raise CheckpointError(f"{where}: '{key}': expert {e} >= num_experts {total}")
                        experts_seen.setdefault(f"{prefix}.{proj}", set()).add(e)
                        name, rows = expert_rows(prefix, proj)
                        check_shape(f.get_slice(key).get_shape(), params[name][0][rows].shape, where, key)
                        if lo <= e < lo + n:  # another rank's expert is never read
                            put(name, f.get_tensor(key), where, key, e - lo, rows)
                        continue
                    if m := FUSED_KEY.match(key):  # transformers 5.x's fused names: all experts in one tensor
                        prefix, proj = m.group(1), m.group(2)
                        lo, n, total = expert_range(prefix, where, key)
                        sl = f.get_slice(key)
                        if sl.get_shape()[0] != total:
                            raise CheckpointError(f"{where}: '{key}' holds {sl.get_shape()[0]} experts, "
                                                  f"expected {total}")
                        put(f"{prefix}.{proj}", sl[lo:lo + n], where, key)  # only the experts held here
                        filled.add(f"{prefix}.{proj}")
                        continue
                    if key not in params:
                        raise CheckpointError(f"{where}: unexpected tensor '{key}' for a {cfg.model_type} model")
                    put(key, f.get_tensor(key), where, key)
                    filled.add(key)
        except (SafetensorError, OSError, RuntimeError) as e:
            raise CheckpointError(f"{path}: cannot read safetensors shard ({e})") from None
    for name, seen in experts_seen.items():  # name: one layer's HF projection, e.g. '...mlp.experts.up_proj'
        total = model.get_submodule(name.rpartition(".")[0]).num_experts
        if len(seen) < total:
            missing = sorted(set(range(total)) - seen)[:5]
            raise CheckpointError(f"{folder}: '{name}' is missing experts {missing}")
    for name in experts_seen:  # every expert of it was read; gate_up_proj is filled once both its halves are
        prefix, _, proj = name.rpartition(".")
        if proj == "down_proj" or {f"{prefix}.gate_proj", f"{prefix}.up_proj"} <= experts_seen.keys():
            filled.add(expert_rows(prefix, proj)[0])
    for name in params:  # a gate_up_proj not filled: name the HF keys that were absent, not our fused name
        prefix, _, proj = name.rpartition(".")
        if proj == "gate_up_proj" and name not in filled:
            absent = [f"{prefix}.{{e}}.{p}.weight" for p in ("gate_proj", "up_proj")
                      if f"{prefix}.{p}" not in experts_seen]
            raise CheckpointError(f"{folder}: missing tensors {absent}")
    if cfg.tie_word_embeddings:
        filled.add("lm_head.weight")
    missing = [k for k in params if k not in filled and not k.endswith("e_score_correction_bias")]
    if missing:
        raise CheckpointError(f"{folder}: missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    return bytes_read


def hf_state_dict(model: torch.nn.Module, state: dict | None = None) -> dict[str, torch.Tensor]:
    """Our parameters under HF's hub keys: 3D expert tensors split back into per-expert 2D weights (gate_up_proj
    into gate_proj and up_proj).
    state: the whole tensors to write instead of model.state_dict() (a sharded model gathers them first)."""
    out = {}
    for name, t in (model.state_dict() if state is None else state).items():
        if model.config.tie_word_embeddings and name == "lm_head.weight":
            continue
        prefix, _, proj = name.rpartition(".")
        if prefix.endswith("mlp.experts") and proj == "gate_up_proj":
            for e in range(t.shape[0]):
                gate, up = t[e].chunk(2, dim=0)  # [I, H] each
                out[f"{prefix}.{e}.gate_proj.weight"] = gate.contiguous()
                out[f"{prefix}.{e}.up_proj.weight"] = up.contiguous()
        elif prefix.endswith("mlp.experts") and proj == "down_proj":
            for e in range(t.shape[0]):
                out[f"{prefix}.{e}.{proj}.weight"] = t[e].contiguous()
        else:
            out[name] = t.contiguous()
    return out


def write_safetensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict | None = None) -> None:
    """safetensors' save_file, with its write errors (a full disk: SafetensorError, not an OSError) raised as the
    OSError they are, naming the file, so every script reports them in one line; the file gets the umask's mode."""
    try:
        save_file(tensors, str(path), metadata=metadata)
    except SafetensorError as e:
        raise OSError(f"cannot write {path}: {e}") from None
    os.chmod(path, umask_file_mode())  # safetensors creates its files 0600


def temporary_sibling(out: Path) -> Path:
    """A fresh hidden folder next to `out` (same filesystem, so the final rename is atomic).

    Named `.<name>.tmp-<host>-<pid>-<random>`: the random part keeps two writes of one process apart, host and pid
    let a later write tell a dead run's folder (removed here, with remove_dead_siblings) from a live one's."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_dead_siblings(out)
    tmp = out.parent / f".{out.name}.tmp-{HOST}-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    return tmp


def remove_dead_siblings(out: Path) -> list[str]:
    """Remove the temporary and backup folders of `out` left by runs on this host that were killed outright;
    returns their names.

    Only this host's: on a shared filesystem another node's pid means nothing here. A live process's folder is
    kept (a concurrent write of the same output). A dead backup `.<name>.old-...` while `out` is missing means
    the run died between replace_folder's two renames: that backup is the last complete output, so it is put
    back rather than deleted."""
    out = Path(out)
    pattern = re.compile(rf"^\.{re.escape(out.name)}\.(tmp|old)-([A-Za-z0-9._]+)-(\d+)-[0-9a-f]+$")
    removed = []
    for p in sorted(out.parent.iterdir()):
        m = pattern.match(p.name)
        if not m or m.group(2) != HOST or process_alive(int(m.group(3))):
            continue
        if m.group(1) == "old" and not out.exists():
            try:
                p.rename(out)
                continue
            except OSError:
                pass
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p.name)
    return removed


def process_alive(pid: int) -> bool:
    """Whether process `pid` of this host still runs. A zombie (killed, not yet reaped by its parent) does not."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return True  # no /proc (not Linux): os.kill said it exists
    return state not in ("Z", "X")


def replace_folder(tmp: Path, out: Path) -> None:
    """Move a finished temporary folder into place; an existing `out` is removed only after success."""
    if out.exists():
        old = out.parent / f".{out.name}.old-{HOST}-{os.getpid()}-{secrets.token_hex(4)}"
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old)
    else:
        tmp.rename(out)


def save_checkpoint(model: torch.nn.Module, out: str | Path, copy_from: str | Path | None = None,
                    max_shard_bytes: int = 2 << 30, dtype: torch.dtype | None = None, extra=None,
                    state: dict | None = None) -> Path:
    """Write an HF-layout folder atomically (temporary folder, then rename).

    copy_from: a checkpoint folder whose other files (tokenizer, generation config, ...) are copied along, and
    whose MTP-layer tensors (GLM's multi-token prediction layer, which the model does not run or train) are
    carried over unchanged, so a trained GLM checkpoint keeps its MTP layer for the authors' serving code.
    extra: a function called with the temporary folder before the rename, to add files (trainer state) that
    must appear together with the weights or not at all.
    state: whole tensors under our parameter names (zeda.sharding.full_state_dict of a sharded model).
    """
    out = Path(out)
    tmp = temporary_sibling(out)
    try:
        tensors = hf_state_dict(model, state)
        if copy_from is not None:
            tensors.update(mtp_tensors(Path(copy_from), model.config))
        if dtype is not None:
            # the router's selection bias stays fp32 (docs/method.md §1); everything else takes the asked dtype
            tensors = {k: (v.to(dtype) if v.is_floating_point() and not k.endswith("e_score_correction_bias") else v)
                       for k, v in tensors.items()}
        shards, current, size = [], {}, 0
        for k, v in tensors.items():
            nbytes = v.numel() * v.element_size()
            if current and size + nbytes > max_shard_bytes:
                shards.append(current)
                current, size = {}, 0
            current[k] = v
            size += nbytes
        shards.append(current)
        if len(shards) == 1:
            write_safetensors(shards[0], tmp / SINGLE_NAME, metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, shard in enumerate(shards):
                name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                write_safetensors(shard, tmp / name, metadata={"format": "pt"})
                weight_map.update({k: name for k in shard})
            total = sum(v.numel() * v.element_size() for v in tensors.values())
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2))
        if copy_from is not None:
            copy_side_files(Path(copy_from), tmp)
        hf = write_remote_code(tmp, model.config.to_hf_dict())  # dynamic: loads in transformers (zeda/hf)
        if dtype is not None:
            hf["dtype"] = str(dtype).removeprefix("torch.")
        (tmp / "config.json").write_text(json.dumps(hf, indent=2, sort_keys=True) + "\n")
        if extra is not None:
            extra(tmp)
        replace_folder(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def mtp_tensors(folder: Path, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The tensors of the MTP layers that `folder`'s checkpoint holds (none for most models), read one at a time."""
    if not cfg.num_nextn_predict_layers or not (folder / "config.json").exists():
        return {}
    out = {}
    for path in shard_files(folder):
        try:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    if mtp_layer(cfg, key, path.name, folder / "config.json"):
                        out[key] = f.get_tensor(key)
        except (SafetensorError, OSError, RuntimeError) as e:
            raise CheckpointError(f"{path}: cannot read safetensors shard ({e})") from None
    return out


def copy_side_files(src: Path, dst: Path) -> list[str]:
    """Copy everything that is not weights or config.json (tokenizer, chat template, generation config...).
    A linked file is copied as the file it points to (the Hub's cache links every file into its blob store); a
    linked folder is not followed (it may be anything: a system folder), and links inside folders stay links."""
    copied = []
    for p in sorted(src.iterdir()):
        if p.name == "config.json" or p.name == INDEX_NAME or p.suffix == ".safetensors" or p.name.startswith("."):
            continue
        if p.is_dir() and p.is_symlink():
            continue
        if p.is_dir():
            shutil.copytree(p, dst / p.name, symlinks=True)
        else:
            shutil.copy2(p, dst / p.name)
        copied.append(p.name)
    return copied


# ---------------------------------------------------------------------------------------------------------------
# Training checkpoints: OUT/step-N is an HF folder plus the optimizer state and the trainer state, written in the
# same atomic rename, so a step-N is whole or absent.

def rank_optimizer_file(rank: int) -> str:
    """The file of one rank's optimizer shard in a checkpoint saved on a sharding mesh (tp, ep, fsdp)."""
    return f"optimizer-rank{rank}.safetensors"


def save_training_checkpoint(model, masters: MasterWeights, opt, path: Path, copy_from: Path, state: dict | None,
                             d: Dist | None = None) -> Path:
    """HF-layout checkpoint (+ optimizer and trainer state when `state` is given: a resumable step-N), all in one
    atomic rename.

    The weights are the fp32 masters, written in the dtype of the checkpoint the run started from (`copy_from`),
    so a bf16 model stays a bf16 checkpoint and config.json says so. When that rounds them (a bf16 checkpoint), a
    resumable checkpoint also holds the exact fp32 masters beside the optimizer state ('<name>::master'), so
    --resume continues bit for bit. With a Dist of several ranks every rank must call this: the weights are
    gathered whole onto rank 0 (one folder that a single process loads). When the mesh shards parameters (tp,
    ep, fsdp) each rank writes its own optimizer shard, `optimizer-rank<r>.safetensors`, for a resume on the same
    mesh: next to the checkpoint first, then rank 0 moves the shards into the folder before its atomic rename
    (never the whole model's AdamW state on one rank)."""
    d = d or Dist()
    dtype = checkpoint_dtype(copy_from)
    separate = {name: master for name, p, master in masters.pairs if master is not p}
    whole = full_state_dict(model, d, replace=separate)
    optim = None
    if state is not None:
        optim = optimizer_tensors(opt, masters.named_params())
        # The weights are rounded (a bf16 checkpoint), or the model holds rounded copies that a resume would
        # rebuild the masters from (bf16 compute from an fp32 checkpoint): keep the exact masters.
        if dtype != torch.float32 or masters.copies:
            optim |= {f"{name}::master": t for name, t in masters.master_tensors().items()}
    per_rank = state is not None and d.world > 1 and (d.dims.tp > 1 or d.dims.ep > 1 or d.dims.fsdp)
    staged = [path.parent / f".{path.name}.{rank_optimizer_file(r)}" for r in range(d.world)] if per_rank else []
    try:
        if per_rank:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_safetensors(optim, staged[d.rank])
            optim = None  # this rank's shard is on disk; rank 0 moves it into the folder
            d.barrier()

        def write_state(folder: Path):
            if state is None:
                return
            if per_rank:
                for r, shard in enumerate(staged):
                    shard.replace(folder / rank_optimizer_file(r))
            else:
                write_safetensors(optim, folder / OPTIM_FILE)
            (folder / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")

        if d.is_main:
            save_checkpoint(model, path, copy_from=copy_from, dtype=dtype, extra=write_state, state=whole)
    finally:
        if per_rank and d.is_main:  # after rank 0's save: moved into the folder, or left over by a failure
            for shard in staged:
                shard.unlink(missing_ok=True)
    d.barrier()
    return path


def read_trainer_state(folder: Path) -> dict:
    """A checkpoint's trainer_state.json; a corrupt one is named, not a traceback."""
    path = folder / STATE_FILE
    try:
        state = json.loads(path.read_text())
        int(state["step"])
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable trainer state ({type(e).__name__}: {e}); delete {folder} to "
                              f"resume from an earlier checkpoint") from None
    return state


def load_optimizer_state(opt, masters: MasterWeights, folder: Path, d: Dist | None = None) -> None:
    """The inverse of save_training_checkpoint, onto a model already parallelized the same way: the optimizer
    state, and the exact fp32 masters where the checkpoint's weights were rounded."""
    file = folder / OPTIM_FILE
    if d is not None and (folder / rank_optimizer_file(d.rank)).exists():  # a sharding mesh: this rank's own shard
        file = folder / rank_optimizer_file(d.rank)
    try:
        tensors = load_file(str(file))
    except Exception as e:  # safetensors raises its own error type for a corrupt file
        raise CheckpointError(f"{file}: cannot read the optimizer state ({e})") from None
    saved_masters = {k.removesuffix("::master"): tensors.pop(k) for k in list(tensors) if k.endswith("::master")}
    if saved_masters:
        masters.load_masters(saved_masters, file)
    elif checkpoint_dtype(folder) != torch.float32 or masters.copies:
        raise CheckpointError(f"{file}: no fp32 masters were saved beside the weights of {folder}, and this run "
                              f"holds rounded ones: cannot resume exactly (resume with the run's --dtype)")
    load_optimizer_tensors(opt, masters.named_params(), tensors, file)


def step_folders(out: Path) -> list[Path]:
    """OUT/step-N folders that hold a trainer state, oldest first."""
    found = [p for p in out.glob("step-*") if (p / STATE_FILE).exists()]
    return sorted(found, key=lambda p: read_trainer_state(p)["step"])


def latest_checkpoint(out: Path) -> Path | None:
    """The newest resumable OUT/step-N."""
    found = step_folders(out)
    return found[-1] if found else None


def remove_old_checkpoints(out: Path, keep_last: int) -> list[Path]:
    """After a successful save: all but the newest keep_last step-N folders go (0 keeps every one)."""
    old = step_folders(out)[:-keep_last] if keep_last else []
    for folder in old:
        shutil.rmtree(folder, ignore_errors=True)
    return old
