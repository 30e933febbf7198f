"""One collective per bucket: Dist.average_gradients (zeda/distributed.py) and the Group Auxiliary Loss's counts
(zeda/losses.py) under a real 2-process gloo group.

This file is also the worker: the test runs it under `torchrun --nproc_per_node=2` (conftest.torchrun), each rank
checks itself and rank 0 writes every rank's results to a JSON file. Checked there:
- bucketed averaging equals a per-parameter all_reduce-and-divide bitwise, for fp32 and bf16 gradients of mixed
  shapes (one not contiguous), a parameter that got no gradient (zero), a frozen one (untouched) and an expert
  shard (its own group), both with buckets small enough to force several and with the default size;
- the all_reduce calls issued (torch.distributed.all_reduce wrapped): one per bucket;
- auxiliary_loss issues one all_reduce per call for all its MoE layers, and the ranks' mean loss is the
  one-process loss over both ranks' tokens.
"""

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from conftest import torchrun

from bench.grad_reduction import CountAllReduce
from zeda.distributed import init_distributed, shutdown
from zeda.losses import auxiliary_loss
from zeda.moe import RouterOutput

SMALL_BUCKET = 512  # bytes

# (name, shape, dtype, kind) in the order the optimizer would list them; fp32, bf16 and the expert shard are
# interleaved so that grouping by (process group, dtype) is exercised.
PARAMS = [
    ("a", (3,), torch.float32, "grad"),                 # 12 B
    ("f", (10, 10), torch.bfloat16, "grad"),            # 200 B
    ("b", (5, 7), torch.float32, "grad"),               # 140 B
    ("expert", (4, 8), torch.float32, "expert_shard"),  # 128 B, summed over the shard's replicas (edp group)
    ("c", (64, 33), torch.float32, "grad"),             # 8448 B: larger than a small bucket, a bucket alone
    ("g", (4,), torch.bfloat16, "grad"),                # 8 B
    ("d", (5, 7), torch.float32, "transposed_grad"),    # 140 B, its gradient not contiguous
    ("h", (300,), torch.bfloat16, "grad"),              # 600 B: over a small bucket with f and g
    ("unused", (6,), torch.float32, "no_grad"),         # 24 B: no token reached it, counts as zero
    ("frozen", (2, 2), torch.float32, "frozen"),        # requires_grad False: skipped
]
# Greedy buckets of at most 512 B, per (group, dtype), by hand from the sizes above:
#   fp32 dp: [a, b] [c] [d, unused];  bf16 dp: [f, g] [h];  fp32 expert group: [expert]
BUCKETS_SMALL = 6
BUCKETS_DEFAULT = 3  # one per (group, dtype)


def make_params(rank: int):
    """The parameters, with gradients that differ between ranks (seeded by rank)."""
    gen = torch.Generator().manual_seed(100 + rank)
    out = []
    for name, shape, dtype, kind in PARAMS:
        p = torch.nn.Parameter(torch.zeros(shape, dtype=dtype), requires_grad=kind != "frozen")
        if kind in ("grad", "expert_shard"):
            p.grad = (torch.randn(shape, generator=gen) * 10 ** (rank - 1)).to(dtype)
        if kind == "transposed_grad":
            p.grad = torch.randn(shape[::-1], generator=gen).t()
        if kind == "expert_shard":
            p.expert_shard = True
        out.append((name, p))
    return out


def per_parameter_reference(named_params, d):
    """What averaging was before buckets: one all_reduce and one division per parameter, on copies."""
    ref = {}
    for name, p in named_params:
        if not p.requires_grad:
            continue
        g = p.grad.clone() if p.grad is not None else torch.zeros_like(p)
        dist.all_reduce(g, group=d.edp_group if getattr(p, "expert_shard", False) else d._dp_group())
        ref[name] = g / d.dp
    return ref


def check_average_gradients(d, bucket_bytes) -> dict:
    named = make_params(d.rank)
    ref = per_parameter_reference(named, d)
    with CountAllReduce() as count:
        if bucket_bytes is None:
            d.average_gradients(named)
        else:
            d.average_gradients(named, bucket_bytes=bucket_bytes)
    grads = dict(named)
    return {"calls": count.calls, "per_parameter_calls": len(ref),
            "bitwise_equal": {n: torch.equal(grads[n].grad, r) and grads[n].grad.dtype == r.dtype
                              for n, r in ref.items()},
            "frozen_untouched": grads["frozen"].grad is None}


def routing_for(rank: int, layers: int = 3, tokens: int = 5, E: int = 6, K: int = 2):
    gen = torch.Generator().manual_seed(7 + rank)
    return [RouterOutput(torch.ones(tokens, K), torch.randint(0, E, (tokens, K), generator=gen),
                         torch.randn(tokens, E, generator=gen)) for _ in range(layers)]


def check_auxiliary_loss(d) -> dict:
    cfg = SimpleNamespace(num_experts=4, num_zero_experts=2, router_scoring="softmax")
    valid = torch.tensor([True, True, False, True, True])  # one padding token per rank
    with CountAllReduce() as count:
        loss = auxiliary_loss(routing_for(d.rank), cfg, valid, all_reduce=d.all_reduce)
    mean = float(d.all_reduce(loss)) / d.dp
    # One process over both ranks' tokens, each layer's tokens concatenated.
    both = [RouterOutput(*(torch.cat(pair) for pair in zip(r0, r1))) for r0, r1 in zip(routing_for(0), routing_for(1))]
    union = float(auxiliary_loss(both, cfg, torch.cat([valid, valid])))
    return {"calls": count.calls, "mean_loss": mean, "union_loss": union, "own_loss": float(loss)}


def worker(out: Path) -> None:
    torch.set_num_threads(1)
    d = init_distributed("cpu")  # dp = 2
    results = {"rank": d.rank, "small": check_average_gradients(d, SMALL_BUCKET),
               "default": check_average_gradients(d, None), "ga": check_auxiliary_loss(d)}
    gathered = [None] * d.world
    dist.all_gather_object(gathered, results)
    if d.is_main:
        out.write_text(json.dumps(gathered, indent=1))
    shutdown()


# ----------------------------------------------------------------------------------------------
# the test (one torchrun launch for all checks)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("grad_reduction") / "results.json"
    torchrun(Path(__file__), out)
    return json.loads(out.read_text())


@pytest.mark.parametrize("size", ["small", "default"])
def test_bucketed_average_is_the_per_parameter_average_bitwise(ranks, size):
    for r in ranks:
        res = r[size]
        assert all(res["bitwise_equal"].values()), res["bitwise_equal"]
        assert set(res["bitwise_equal"]) == {n for n, *_, kind in PARAMS if kind != "frozen"}
        assert res["frozen_untouched"]


@pytest.mark.parametrize("size,buckets", [("small", BUCKETS_SMALL), ("default", BUCKETS_DEFAULT)])
def test_one_all_reduce_per_bucket(ranks, size, buckets):
    for r in ranks:
        assert r[size]["calls"] == buckets
        assert r[size]["per_parameter_calls"] == len(PARAMS) - 1  # what it was: one per trainable parameter


def test_group_auxiliary_loss_reduces_all_layers_at_once(ranks):
    for r in ranks:
        assert r["ga"]["calls"] == 1  # was 1 + 2 per layer (rank count, then counts and tokens of each layer)
        assert r["ga"]["mean_loss"] == pytest.approx(r["ga"]["union_loss"], rel=1e-6)
    assert ranks[0]["ga"]["own_loss"] != pytest.approx(ranks[1]["ga"]["own_loss"], rel=1e-3)  # different data


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
