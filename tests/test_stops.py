"""Stops that every rank agrees on: 2-process `torchrun train_sft.py` (gloo, --ep 2, so each rank also writes its
own optimizer shard) stopped by SIGTERM reaching one worker, every worker at a different moment, or the launcher
(which forwards it to every worker). Each case: no hang, every rank saves the same step (one consistent
step-N with both ranks' shards), every worker exits 143, and --resume continues from there.

Before the stop decision was agreed over the ranks, a signal that reached one worker left the others waiting in
a collective for it: the job hung and saved nothing.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, tiny_sft_setup, torchrun

from zeda.checkpoint import STATE_FILE, rank_optimizer_file

REPEAT = int(os.environ.get("ZEDA_STOP_REPEAT", "1"))  # more tries of each case, for a flakiness hunt
FLAGS = ["--global-batch-size", "2", "--micro-batch-size", "1", "--lr", "1e-4", "--device", "cpu", "--ep", "2"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_sft_setup(tmp_path_factory.mktemp("stops"))


def steps_logged(out: Path) -> list[int]:
    path = out / "metrics.jsonl"
    return [json.loads(line)["step"] for line in path.read_text().split("\n")[:-1]] if path.exists() else []


def workers(launcher: int) -> dict[int, int]:
    """{rank: pid} of the launcher's worker processes, read from /proc."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            ppid = int(Path(f"/proc/{entry}/stat").read_text().rpartition(")")[2].split()[1])
            env = Path(f"/proc/{entry}/environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        rank = [e for e in env if e.startswith(b"RANK=")]
        if ppid == launcher and rank:
            found[int(rank[0][5:])] = int(entry)
    return found


def signal_pid(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:  # already stopped by the other rank's signal: nothing to do
        pass


def stop_run(data: Path, out: Path, how: str) -> tuple[int, str]:
    """Start a long run, signal it `how` after its second step; returns (launcher exit code, its stderr)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train_sft.py",
           "--student", str(data / "student"), "--rollouts", str(data / "r.jsonl"), "--out", str(out), *FLAGS,
           "--max-steps", "1000"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while len(steps_logged(out)) < 2:
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            assert time.time() < deadline, "no training steps within 120 s"
            time.sleep(0.05)
        ranks = workers(proc.pid)
        assert set(ranks) == {0, 1}, ranks
        if how == "one worker":
            signal_pid(ranks[1])
        elif how == "every worker":  # rank 1 now, rank 0 a step or so later
            signal_pid(ranks[1])
            time.sleep(0.1)
            signal_pid(ranks[0])
        else:
            proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=90)  # a hang fails here
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, err


@pytest.mark.parametrize("attempt", range(REPEAT))
@pytest.mark.parametrize("how", ["one worker", "every worker", "launcher"])
def test_a_signal_stops_every_rank_after_the_same_step(data, tmp_path, how, attempt):
    out = tmp_path / "run"
    rc, err = stop_run(data, out, how)
    # What torchrun reports (docs/usage.md): workers that stopped on a signal make it exit 1 naming each worker's
    # exit code, 143; signalled itself, it exits 1 with its own SignalException after the workers have saved.
    assert rc == 1, err[-3000:]
    if how == "launcher":
        assert "SignalException" in err, err[-3000:]
    else:
        assert "exitcode  : 143" in err and "exitcode  : -15" not in err, err[-3000:]
    logged = steps_logged(out)
    n = logged[-1]
    assert logged == list(range(1, n + 1)) and n < 1000
    saved = sorted(out.glob("step-*"))
    assert [p.name for p in saved] == [f"step-{n}"]  # one checkpoint, of the last step every rank finished
    assert json.loads((saved[0] / STATE_FILE).read_text())["step"] == n
    assert all((saved[0] / rank_optimizer_file(r)).exists() for r in (0, 1))
    if how == "one worker":  # and the run goes on from there
        torchrun(ROOT / "train_sft.py", "--student", data / "student", "--rollouts", data / "r.jsonl", "--out", out,
                 *FLAGS, "--max-steps", n + 1, "--resume")
        assert steps_logged(out) == list(range(1, n + 2))
        assert json.loads((out / "summary.json").read_text())["step"] == n + 1
