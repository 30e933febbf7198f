"""Shared test setup: the repository root and experiments/ on sys.path, so tests can import the scripts
(convert.py, experiments/compare.py, ...) and the experiments' modules as those scripts do (`import divergence`)."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for folder in (ROOT, ROOT / "experiments"):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

# Tiny models on a 2-core machine: one thread is ~10x faster than two threads fighting over a core (a tiny
# forward takes a second instead of 10 ms with 2 contended threads), and
# CI runs on 2 cores. Tests that need more set it themselves.
import torch  # noqa: E402

torch.set_num_threads(1)

# Without a GPU the Triton kernels run in Triton's interpreter, which must be chosen before anything imports
# triton: set here, for the whole session, so that no test's order decides it (tests/test_kernels.py).
if not torch.cuda.is_available():
    import os

    os.environ["TRITON_INTERPRET"] = "1"


def torchrun(*args, timeout=600, nproc=2, drop_env=()):
    """Run a script under `torchrun --standalone` with nproc CPU processes (gloo); asserts it exits 0.
    drop_env: variables of this process's environment the ranks must not inherit."""
    import os
    import subprocess

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *map(str, args)]
    env = {k: v for k, v in os.environ.items() if k not in drop_env}
    env |= {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def tiny_sft_setup(d: Path, per_family: int = 2) -> Path:
    """In d: a tiny static qwen3_moe teacher with the toy tokenizer, its conversion with 4 zero experts
    (student/), and r.jsonl, reference answers to per_family train prompts of each task family."""
    import json

    from zeda_toy import tasks
    from zeda.conversion import convert_checkpoint
    from zeda_toy.tiny import make_tiny_checkpoint
    from zeda_toy.tokenizer import save_tokenizer

    make_tiny_checkpoint(d / "teacher", "qwen3_moe", vocab_size=104, max_position_embeddings=512)
    save_tokenizer(d / "teacher")
    convert_checkpoint(d / "teacher", d / "student", num_zero=4, progress=False)
    items = tasks.mixture("train", per_family, seed=1)
    (d / "r.jsonl").write_text("".join(json.dumps(tasks.to_rollout_record(t, t.response)) + "\n" for t in items))
    return d
