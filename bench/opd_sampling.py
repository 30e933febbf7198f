"""OPD's sampling phase under FSDP2: the student all-gathered at every decoded token (each forward gathers every
block again, the default) against gathered once for the whole phase (train_opd.py:gathered), side by side.

    python bench/opd_sampling.py --json docs/results/opd_sampling.json
    python bench/opd_sampling.py --prompts 4 --max-new-tokens 32 --repeats 2          # quicker

The shipped Qwen3-MoE teacher converted with Z = N/2 zero experts (what pipeline.py trains) is the student,
sharded by FSDP2 over 2 gloo processes (torchrun on this machine's CPUs), loaded as train_opd.py loads it
(fp32 masters, router in fp32). For each rollout size in --prompts, each rank samples its half of a batch of
that many prompts x --samples answers (temperature 1, one seed per answer as train_opd.py), --repeats times per
variant, the variants taken in turn so that load from other jobs hits both alike. The paper's rollout, 16
prompts x 2 answers, is 4 answers per GPU on 8 GPUs (--prompts 4 here: 4 per rank) and 16 on 2 (--prompts 16).
tokens/s = generated tokens over both ranks / the slower rank's wall-clock seconds of the whole generate() call,
median over repeats. all_gathers: collective all-gathers per rank in one sampling phase. identical: every
sampled token of every repeat equal between the variants.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import train_opd  # noqa: E402
from zeda_toy import tasks  # noqa: E402
from zeda.config import ModelConfig  # noqa: E402
from zeda.flags import int_range  # noqa: E402
from zeda.generation import generate  # noqa: E402
from zeda.sampling import SamplingParams  # noqa: E402

TEACHER = ROOT / "assets" / "qwen3_moe_teacher"


def count_all_gathers():
    """Wrap torch.distributed.all_gather_single (FSDP2's all-gather) with a counter: returns the counter."""
    import torch.distributed as dist

    counter = {"n": 0}
    real = dist.all_gather_single

    def counted(*a, **kw):
        counter["n"] += 1
        return real(*a, **kw)

    dist.all_gather_single = counted
    return counter


def worker(args) -> None:
    """One rank: load the sharded student, sample the rollout both ways, rank 0 writes the results."""
    torch.set_num_threads(1)
    from zeda.distributed import init_distributed, shutdown
    from zeda.loading import load_model, load_tokenizer

    d = init_distributed("cpu", fsdp=True)
    student_dir = Path(args.worker)
    student = load_model(student_dir, dtype=torch.float32, dist=d, router_fp32=True, fp32_masters=True)
    student.eval()
    tokenizer = load_tokenizer(student_dir)
    cfg = ModelConfig.from_hf_config(student_dir)
    eos = sorted({tokenizer.eos_token_id, *cfg.eos_token_id} - {None})
    all_prompts, _ = train_opd.load_prompts(student_dir / "prompts.jsonl", tokenizer,
                                          cfg.max_position_embeddings - args.max_new_tokens)
    params = SamplingParams(temperature=1.0, max_new_tokens=args.max_new_tokens)
    gathers = count_all_gathers()
    results = []
    for size in args.prompts:
        per_rank = size // d.dp
        mine = [p for p in all_prompts[d.dp_rank * per_rank:(d.dp_rank + 1) * per_rank] for _ in range(args.samples)]
        results.append({"prompts": size, "answers_per_rank": len(mine),
                        **measure(student, mine, params, eos, d, gathers, args.repeats)})
    if d.is_main:
        Path(args.result).write_text(json.dumps(results))
    shutdown()


def measure(student, mine, params, eos, d, gathers, repeats: int) -> dict:
    """Sample `mine` both ways, in turn, `repeats` times each (after one untimed warm-up)."""
    seeds = [d.dp_rank * len(mine) + i for i in range(len(mine))]

    def sample(gather_once: bool):
        d.barrier()
        before, t0 = gathers["n"], time.perf_counter()
        if gather_once:
            with train_opd.gathered(student):
                gen = generate(student, [p.ids for p in mine], params, eos, 0, seed=seeds)
        else:
            gen = generate(student, [p.ids for p in mine], params, eos, 0, seed=seeds)
        seconds = time.perf_counter() - t0
        tokens = d.all_reduce(torch.tensor(float(sum(map(len, gen.tokens))), dtype=torch.float64))  # both ranks'
        slowest = torch.tensor(seconds, dtype=torch.float64)
        torch.distributed.all_reduce(slowest, op=torch.distributed.ReduceOp.MAX)
        return gen.tokens, float(tokens), float(slowest), gathers["n"] - before

    variants = {"per_token_gather": False, "gathered_once": True}
    sample(True)  # warm-up (allocations, FSDP's lazy init), not timed
    runs = {name: [] for name in variants}
    for _ in range(repeats):
        for name, once in variants.items():
            runs[name].append(sample(once))
    reference = runs["per_token_gather"][0][0]
    identical = all(tokens == reference for rows in runs.values() for tokens, *_ in rows)
    identical = bool(d.all_reduce(torch.tensor(float(not identical))) == 0)  # on every rank
    out = {}
    for name, rows in runs.items():
        tps = [tokens / seconds for _, tokens, seconds, _ in rows]
        out[name] = {"tokens_per_s": round(statistics.median(tps), 1), "tokens_per_s_runs": [round(t, 1) for t in tps],
                     "generated_tokens": int(rows[0][1]), "all_gathers_per_rank": rows[0][3]}
    out["speedup"] = round(out["gathered_once"]["tokens_per_s"] / out["per_token_gather"]["tokens_per_s"], 2)
    return {**out, "identical": identical}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", type=int_range(min=2), nargs="+", default=[4, 16],
                   help="rollout sizes in prompts, over both ranks (even)")
    p.add_argument("--samples", type=int_range(min=1), default=2, help="answers per prompt")
    p.add_argument("--max-new-tokens", type=int_range(min=1), default=64)
    p.add_argument("--repeats", type=int_range(min=1), default=3)
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # set when torchrun runs this file as a rank
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return 0

    from zeda.conversion import convert_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        student = Path(tmp) / "student"
        n_real = ModelConfig.from_hf_config(TEACHER).num_experts
        convert_checkpoint(TEACHER, student, num_zero=n_real // 2, progress=False)
        items = tasks.mixture("train", max(args.prompts), seed=0)[:max(args.prompts)]
        (student / "prompts.jsonl").write_text("".join(json.dumps(tasks.to_prompt_record(t)) + "\n" for t in items))
        result = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__,
               "--worker", str(student), "--result", str(result), "--prompts", *map(str, args.prompts),
               "--samples", str(args.samples),
               "--max-new-tokens", str(args.max_new_tokens), "--repeats", str(args.repeats)]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        load = os.getloadavg()[0]
        subprocess.run(cmd, check=True, env=env, cwd=ROOT)
        measured = json.loads(result.read_text())
    report = {"machine": f"{platform.machine()} CPU, {os.cpu_count()} cores, 2 gloo processes (torchrun), "
                         f"1 thread each", "load_average_1min": round(load, 2),  # other jobs on the machine
              "torch": torch.__version__, "student": f"{TEACHER.name} converted, Z = {n_real // 2}", "dtype": "float32",
              "samples_per_prompt": args.samples, "max_new_tokens": args.max_new_tokens, "repeats": args.repeats,
              "runs": measured}
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
