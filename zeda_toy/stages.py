"""Running the stage scripts as their own processes, the way a user would, and the shared pieces of the jobs that
chain them (pipeline.py, the main job; frontier.py, the accuracy-compute frontier).

    run_script(["train_sft.py", "--student", ...], threads=1)   # prints the command; StageFailed on a non-zero exit
    write_prompt_files(out, sft_per_family=6000, opd_per_family=1000, seed=0)
    report = evaluate_folder(folder, n=300, max_new_tokens=160, batch_size=64, seed=0)
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import torch

from zeda_toy import tasks
from zeda.baselines import set_routing
from zeda.data import write_jsonl_atomic
from zeda.evaluation import evaluate_model
from zeda.sampling import SamplingParams
from zeda.loading import load_for_inference

ROOT = Path(__file__).resolve().parent.parent
SHIPPED_TEACHERS = {"qwen3_moe": ROOT / "assets" / "qwen3_moe_teacher",
                    "glm4_moe_lite": ROOT / "assets" / "glm4_moe_lite_teacher"}


class StageFailed(Exception):
    def __init__(self, script: str, code: int):
        super().__init__(f"stage `{script}` exited with code {code}")
        self.script, self.code = script, code


def run_script(cmd: list[str], threads: int | None) -> None:
    """Run one of the repository's scripts (cmd[0], relative to the root) as its own process, printing the command.

    SIGTERM and Ctrl-C reach the stage exactly once, through us: it runs in its own process group (a terminal's
    Ctrl-C goes to ours only), and we forward what we receive and wait for it, so a training stage saves and exits
    143 / 130 and the caller gets that code (StageFailed), never an orphan that trains on."""
    print(f"\n$ python {' '.join(cmd)}", flush=True)
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
    proc = subprocess.Popen([sys.executable, str(ROOT / cmd[0]), *cmd[1:]], env=env, process_group=0)
    forward = lambda signum, _frame: proc.send_signal(signum)  # noqa: E731
    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        code = proc.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if proc.poll() is None:  # we are leaving for another reason (an error in this process): do not orphan it
            proc.terminate()
            proc.wait()
    if code:
        raise StageFailed(cmd[0], code)


def write_prompt_files(out: Path, sft_per_family: int, opd_per_family: int, seed: int) -> tuple[Path, Path]:
    """The SFT and OPD prompt sets (train split, minus the held-out slice that settings are chosen on)."""
    heldout = tasks.heldout_prompts()
    prompts_sft, prompts_opd = out / "prompts_sft.jsonl", out / "prompts_opd.jsonl"
    items = tasks.mixture("train", sft_per_family, seed=seed + 1, exclude=heldout)
    write_jsonl_atomic(prompts_sft, [tasks.to_prompt_record(x) for x in items])
    opd_items = tasks.mixture("train", opd_per_family, seed=seed + 2, exclude=heldout)
    write_jsonl_atomic(prompts_opd, [tasks.to_prompt_record(x) for x in opd_items])
    return prompts_sft, prompts_opd


def evaluate_folder(folder: Path, n: int, max_new_tokens: int, batch_size: int, seed: int, split: str = "test",
                    routing: str = "native", zero_bias: float = 0.0) -> dict:
    """evaluate.py in-process: every task family, n items each, greedy, under a routing rule and zero bias."""
    model, tokenizer = load_for_inference(folder)
    set_routing(model, routing, zero_bias)
    extra = "" if routing == "native" and not zero_bias else f", routing {routing}, zero bias {zero_bias:+g}"
    print(f"\n[eval] {folder}: {n} {split} items per family, greedy{extra}", flush=True)
    with torch.no_grad():
        report = evaluate_model(model, tokenizer, list(tasks.FAMILIES), n,
                                SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens),
                                batch_size, seed, split=split)
    report["model"] = str(folder)
    report["routing"], report["zero_bias"] = routing, zero_bias
    return report
