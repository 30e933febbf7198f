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
