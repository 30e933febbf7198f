"""Bounded memory for long answers: the loss heads (SFT cross-entropy, OPD log-probs) never hold [B, T, V]
logits. At the Qwen3 vocabulary (V = 151,936) and T = 4096 the chunked head's peak extra memory, forward and
backward, stays under a bound that the plain log_softmax head exceeds several times over (measured as each
process's peak RSS)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
V, T, H = 151_936, 4096, 64
BOUND_MB = 1500  # the unchunked head needs ~2.5 GB for the fp32 logits alone, and as much again for log_softmax

PROBE = """
import json, resource, sys, torch
from zeda.model import target_logprobs
torch.manual_seed(0)
V, T, H, mode = {V}, {T}, {H}, sys.argv[1]
hidden = torch.randn(1, T, H, requires_grad=True)
weight = (torch.randn(V, H) * 0.02).requires_grad_(True)
targets = torch.randint(0, V, (1, T))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
if mode == "chunked":
    logp = target_logprobs(hidden, weight, targets)
else:
    logp = (hidden @ weight.T).float().log_softmax(-1).gather(-1, targets[..., None]).squeeze(-1)
(-logp.mean()).backward()
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({{"extra_mb": (after - before) / 1024, "loss": float(-logp.mean())}}))
""".format(V=V, T=T, H=H)


def peak(mode: str) -> dict:
    r = subprocess.run([sys.executable, "-c", PROBE, mode], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_chunked_head_stays_under_the_bound_the_full_one_exceeds():
    chunked, full = peak("chunked"), peak("full")
    assert chunked["loss"] == pytest.approx(full["loss"], rel=1e-4)  # the same loss
    assert chunked["extra_mb"] < BOUND_MB < full["extra_mb"], (chunked, full)
