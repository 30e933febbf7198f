"""Shared test setup: the repository root on sys.path, so tests can import the scripts (convert.py, ...)."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Tiny models on a 2-core machine: one thread is ~10x faster than two threads fighting over a core (a tiny
# forward takes a second instead of 10 ms with 2 contended threads), and
# CI runs on 2 cores. Tests that need more set it themselves.
import torch  # noqa: E402

torch.set_num_threads(1)


def torchrun(*args, timeout=600, nproc=2):
    """Run a script under `torchrun --standalone` with nproc CPU processes (gloo); asserts it exits 0."""
    import os
    import subprocess

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *map(str, args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc
