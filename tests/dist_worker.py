"""Run under `torchrun --nproc_per_node=2` by tests/test_parallel.py: sharded models' logits against the
single-process model's, and the all-to-all volume against the count of real slots.

    torchrun --nproc_per_node=2 tests/dist_worker.py OUT.json CHECKPOINT [CHECKPOINT ...]

For every checkpoint and every mesh (ep=2, tp=2, fsdp over dp=2), each rank builds the single-process reference
itself from the checkpoint, then a second copy that zeda.loading.load_model shards. Ranks that hold different data (dp)
take different halves of the batch. The converted checkpoints are also run with the zero experts masked
(zero share 0), to see the all-to-all volume drop once zero experts are used. Rank 0 writes the results.
"""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import zeda  # noqa: E402
from zeda.distributed import Dist, init_distributed, shutdown  # noqa: E402
from zeda.expert_parallel import expert_traffic  # noqa: E402
from zeda.loading import load_model  # noqa: E402

MESHES = {"ep": dict(ep=2), "tp": dict(tp=2), "fsdp": dict(fsdp=True), "ep-fsdp": dict(ep=2, fsdp=True),
          "ep-tp": dict(ep=2, tp=2)}


def local_numel(model) -> int:
    return sum((t.to_local() if hasattr(t, "to_local") else t).numel() for t in model.state_dict().values())


def gradient_difference(reference, sharded, d) -> float:
    """Largest |single-process grad - sharded grad| over all parameters, after the training scripts' own reduction
    (Dist.average_gradients: means over dp, tp's partial head gradients summed). Times dp, every gradient is then
    the whole batch's sum: DTensors (tp, fsdp) are gathered, expert shards compared with their slice."""
    d.average_gradients(sharded.named_parameters())
    ref = {n: p.grad for n, p in reference.named_parameters()}
    worst = 0.0
    for name, p in sharded.named_parameters():
        g = p.grad if p.grad is not None else torch.zeros_like(p)
        g = (g.full_tensor() if hasattr(g, "full_tensor") else g) * d.dp
        r = ref[name] if ref[name] is not None else torch.zeros_like(g)
        if getattr(p, "expert_shard", False):
            lo = (d.rank % d.dims.ep) * g.shape[0]
            r = r[lo:lo + g.shape[0]]
        worst = max(worst, float((g - r).abs().max()))
    return worst


def check(checkpoint: Path, mesh: str, **overrides) -> dict:
    d = init_distributed("cpu", **MESHES[mesh])
    reference = zeda.load_model(checkpoint, **overrides)
    sharded = load_model(checkpoint, dist=d, **overrides)  # split as it loads, as the training scripts do
    bytes_whole = load_model(checkpoint, dist=Dist(), **overrides).bytes_read  # what one process reads
    cfg = reference.config
    ids = torch.randint(4, cfg.vocab_size, (4, 12), generator=torch.Generator().manual_seed(0))  # same on all ranks
    attn = torch.ones_like(ids)
    attn[0, :3] = 0  # left padding: padding tokens are never dispatched either
    rows = slice(d.dp_rank * 4 // d.dp, (d.dp_rank + 1) * 4 // d.dp)  # this rank's share of the batch
    routing = []
    expected_all = reference(ids, attention_mask=attn, routing=routing)  # [B, T, V]
    got = sharded(ids[rows], attention_mask=attn[rows])
    expected = expected_all[rows]
    # Gradients too: a fixed random projection of the logits, summed over the whole batch.
    probe = torch.randn(expected_all.shape, generator=torch.Generator().manual_seed(1))
    (expected_all * probe).sum().backward()
    (got * probe[rows]).sum().backward()
    grad_diff = gradient_difference(reference, sharded, d)
    valid_T = attn[rows].reshape(-1).bool()
    K = cfg.num_experts_per_tok
    real_slots = sum(int((r.ids_TK.view(4, -1, K)[rows].reshape(-1, K)[valid_T] < cfg.num_experts).sum())
                     for r in routing)
    return {"checkpoint": checkpoint.name, "mesh": mesh, "masked": bool(overrides), "rank": d.rank,
            "max_abs_diff": float((got - expected).abs().max()), "max_grad_diff": grad_diff, "real_slots": real_slots,
            **expert_traffic(sharded), "row_bytes": cfg.hidden_size * 4,
            "params_here": local_numel(sharded), "params_full": local_numel(reference),
            "bytes_read": sharded.bytes_read, "bytes_whole": bytes_whole,
            "expert_bytes": sum(p.numel() * p.element_size() for n, p in reference.named_parameters()
                                if ".mlp.experts." in n)}


def main():
    out, checkpoints = Path(sys.argv[1]), [Path(p) for p in sys.argv[2:]]
    torch.set_num_threads(1)
    results = []
    for checkpoint in checkpoints:
        converted = zeda.ModelConfig.from_hf_config(checkpoint).num_zero_experts > 0
        for mesh in MESHES:
            results.append(check(checkpoint, mesh))
        if converted:
            results.append(check(checkpoint, "ep", use_zce_mask=True))
    gathered = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, results)
    if torch.distributed.get_rank() == 0:
        out.write_text(json.dumps([r for part in gathered for r in part], indent=1))
    shutdown()


if __name__ == "__main__":
    main()
