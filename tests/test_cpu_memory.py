"""Importing zeda puts PyTorch's big CPU tensors on transparent huge pages (zeda/__init__.py): a CPU training step
re-creates GBs of gradients, and 2 MB pages fault them in 512x less often (bench/huge_pages.py measures it)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import torchrun

from bench.huge_pages import kernel_thp

ROOT = Path(__file__).resolve().parents[1]

# The probes' first lines: this process's anonymous memory on huge pages, in kB.
HUGE_KB = """
def huge_kb():
    for line in open("/proc/self/smaps_rollup"):
        if line.startswith("AnonHugePages:"):
            return int(line.split()[1])
"""

# As a script would: torch first, then zeda, then a 64 MB tensor written through; prints the process's
# AnonHugePages (kB) before and after, and the variable as torch saw it.
PROBE = HUGE_KB + """
import os, torch, zeda
before = huge_kb()
x = torch.empty(16 << 20)  # 64 MB of fp32
x.fill_(1.0)
print(os.environ.get("THP_MEM_ALLOC_ENABLE"), before, huge_kb())
"""


def probe(**env) -> tuple[str, int]:
    """(THP_MEM_ALLOC_ENABLE after `import zeda`, kB of huge pages the 64 MB tensor added)."""
    full = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"} | env
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env=full, capture_output=True, text=True,
                         check=True).stdout.split()
    return out[0], int(out[2]) - int(out[1])


def kernel_thp_mode() -> str:
    """The kernel's transparent-huge-page mode ("madvise", "always", "never"), "unknown" where the probes can't run."""
    return kernel_thp()["enabled"] if Path("/proc/self/smaps_rollup").exists() else "unknown"


@pytest.mark.skipif(kernel_thp_mode() == "unknown", reason="needs Linux with transparent huge pages")
def test_importing_zeda_turns_huge_pages_on_and_a_user_can_turn_them_off():
    setting, _ = probe()
    assert setting == "1"
    setting, _ = probe(THP_MEM_ALLOC_ENABLE="0")
    assert setting == "0"


@pytest.mark.skipif(kernel_thp_mode() != "madvise", reason="the kernel gives huge pages only when asked (madvise)")
def test_a_big_tensor_lands_on_huge_pages_after_importing_zeda():
    """In the kernel's "madvise" mode only a block PyTorch asked for gets huge pages: so this fails if zeda sets the
    variable too late (PyTorch reads it once, at its first block of 2 MB or more) or not at all."""
    _, huge_kb = probe()
    assert huge_kb >= 32 << 10, f"only {huge_kb} kB of the 64 MB tensor on huge pages"
    _, huge_kb_off = probe(THP_MEM_ALLOC_ENABLE="0")
    assert huge_kb_off < 4 << 10, f"{huge_kb_off} kB on huge pages with THP_MEM_ALLOC_ENABLE=0"


RANK_PROBE = HUGE_KB + """
import json, os, torch, torch.distributed as dist, zeda
dist.init_process_group("gloo")
before = huge_kb()
x = torch.empty(32 << 20, dtype=torch.bfloat16)  # 64 MB, as a bf16 gradient would be
x.fill_(1.0)
seen = [None] * dist.get_world_size()
dist.all_gather_object(seen, (os.environ.get("THP_MEM_ALLOC_ENABLE"), huge_kb() - before))
if dist.get_rank() == 0:
    print(json.dumps(seen))
dist.destroy_process_group()
"""


@pytest.mark.skipif(kernel_thp_mode() != "madvise", reason="the kernel gives huge pages only when asked (madvise)")
def test_every_torchrun_rank_puts_big_bf16_tensors_on_huge_pages(tmp_path):
    """Each rank sets the switch on its own import: the launcher (which never imports zeda) passes nothing."""
    import json

    script = tmp_path / "rank_probe.py"
    script.write_text(RANK_PROBE)
    proc = torchrun(script, timeout=300, drop_env=("THP_MEM_ALLOC_ENABLE",))
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [s for s, _ in seen] == ["1", "1"]
    assert all(kb >= 32 << 10 for _, kb in seen), seen
