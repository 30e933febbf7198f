"""What only a GPU can measure, in one run on one H100 (meant to finish in under 8 minutes), into one JSON file.

    python bench/gpu_check.py                                      # everything -> docs/results/gpu_check.json
    python bench/gpu_check.py --sections experts,decode --out runs/gpu_check.json
    python bench/gpu_check.py --smoke --out /tmp/gpu_check.json    # the same code paths, tiny, on CPU

Three sections, run in this order. Each records the device, the torch version and its settings; one that fails
records its error (after what it measured) and the others still run; the exit code is 1 if any failed.

experts   The three routed-expert backends (loop, grouped_mm, triton: zeda/moe.py, zeda/kernels/) on one MoE
          layer at Qwen3-30B-A3B's widths (hidden 2048, expert width 768, 128 real experts, top-8), bf16, at 0,
          50 and 75% zero slots, for 4096 tokens (prefill-like) and 64 (decode-like): forward and
          forward+backward ms per call (CUDA events, median of 10), and how far each backend's output and five
          gradients are from the loop reference's ("agree": max |diff| within 3% of the reference's largest
          value, the bf16 tolerance of tests/test_kernels.py). The timing pieces are bench/moe_layer.py's.
training  One bf16 SFT step and one OPD step on one GPU, of random checkpoints at the published widths
          (Qwen3-30B-A3B with 1 layer, GLM-4.7-Flash with 2, full vocabularies), through train_sft.py and
          train_opd.py as subprocesses: torch.cuda.max_memory_allocated beside the prediction of
          `python -m zeda.plan` for the same shapes, less the planner's fixed runtime reserve (CUDA context,
          allocator slack), which max_memory_allocated does not see. Checkpoint, data and command lines are
          bench/real_shape.py's.
decode    zeda.generation.generate(compile=True) (torch.compile of the decode step; on CUDA with
          mode="reduce-overhead", i.e. CUDA graphs) against transformers' generate() on both shipped teachers: 32
          test prompts in one batch, greedy, 64 new tokens, median of 3 runs, in bf16 (what is served) and fp32:
          tokens/s, and whether every row's tokens are identical to transformers'. Identical is required in
          fp32 only: in bf16 two implementations may round a near-tie apart. "cudagraph_skips" counts the
          compiled graphs Inductor ran without CUDA graphs (TORCH_LOGS=cudagraphs says why). If the compiled
          step fails, the error is recorded and the eager one is still measured. bench/generate.py's
          measure_teacher. Last, because a failed CUDA-graph capture may leave the GPU unusable after it.

Without CUDA the script refuses (exit 2) unless --smoke is given. --smoke runs every section on CPU at tiny
sizes (hidden 64, 8 experts; 4 prompts of 8 new tokens; a 1-layer SFT/OPD model of hidden 64): the triton
backend only when TRITON_INTERPRET=1 is set (otherwise recorded as skipped), the decode step not compiled
(compiling takes 20-70 s per teacher on a CPU; recorded), the peak RSS in place of GPU memory.
--budget-minutes (default 8) bounds a GPU run: past it, nothing new starts and a running training step is
stopped, each recorded as a failure. The JSON is rewritten (atomically) after every section.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.moe_layer import SHAPES, Shape  # noqa: E402
from zeda.data import write_text_atomic  # noqa: E402
from zeda.errors import UsageError  # noqa: E402
from zeda.flags import float_range  # noqa: E402

SECTIONS = ("experts", "training", "decode")  # the order they run in (the module docstring says why)
AGREE_TOL = {torch.bfloat16: 3e-2, torch.float32: 1e-4}  # max |diff| / max |reference| (tests/test_kernels.py)


@dataclass(frozen=True)
class Sizes:
    """Everything a run measures at; FULL on a GPU, SMOKE on a CPU. Recorded in each section's settings."""

    layer: Shape  # experts: the MoE layer
    tokens: tuple[int, ...]  # experts: T per call
    zero_shares: tuple[float, ...]
    warmup: int
    repeats: int
    decode_prompts: int  # decode: test prompts per teacher (one batch)
    decode_new_tokens: int
    decode_repeats: int
    decode_dtypes: tuple[str, ...]
    compile: bool  # decode: run generate(compile=True) too
    train_layers: dict = field(default_factory=dict)  # training: arch -> decoder layers
    train_seq: int = 2048  # SFT tokens per sequence
    train_batch: int = 2  # sequences per step (SFT micro-batch, OPD answers)
    train_answer_tokens: int = 256  # OPD answer length
    train_overrides: dict = field(default_factory=dict)  # config.json values over the published ones


FULL = Sizes(layer=SHAPES["qwen"], tokens=(4096, 64), zero_shares=(0.0, 0.5, 0.75), warmup=3, repeats=10,
             decode_prompts=32, decode_new_tokens=64, decode_repeats=3, decode_dtypes=("bfloat16", "float32"),
             compile=True, train_layers={"qwen3_moe": 1, "glm4_moe_lite": 2})
SMOKE = Sizes(layer=Shape("tiny", H=64, I=32, N=8, K=2), tokens=(32, 4), zero_shares=(0.0, 0.5, 0.75), warmup=0,
              repeats=1, decode_prompts=4, decode_new_tokens=8, decode_repeats=1, decode_dtypes=("float32",),
              compile=False, train_layers={"qwen3_moe": 1}, train_seq=32, train_batch=2, train_answer_tokens=4,
              train_overrides=dict(vocab_size=128, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=8,
                                   num_experts_per_tok=2))
COMPILE_OFF_ON_CPU = "off: --smoke on CPU, where compiling the decode step takes 20-70 s per teacher"


def log(msg: str) -> None:
    print(msg, flush=True)


def environment(device: str) -> dict:
    """Where a section ran: recorded in each, since a GPU run may be read apart from its machine."""
    if device == "cuda":
        name = torch.cuda.get_device_name()
    else:
        name = f"CPU ({platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"
    try:
        triton_version = importlib.metadata.version("triton")  # without importing it
    except importlib.metadata.PackageNotFoundError:
        triton_version = None
    return {"device": name, "torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton_version}


def error_text(e: BaseException) -> str:
    """One line for the JSON: the exception, and where in the code it came from."""
    where = traceback.extract_tb(e.__traceback__)[-1] if e.__traceback__ else None
    at = f" (at {Path(where.filename).name}:{where.lineno})" if where else ""
    return f"{type(e).__name__}: {str(e).strip()[:600]}{at}"


# ------------------------------------------------------------------------------------------------ experts


def expert_backends(device: str) -> tuple[list[str], dict[str, str]]:
    """The backends to run here, loop (the reference) first, and the skipped ones with the reason."""
    from zeda.kernels import triton_available

    if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return ["loop", "grouped_mm"], {"triton": "CPU without TRITON_INTERPRET=1 (set it to run the interpreter)"}
    if not triton_available():
        return ["loop", "grouped_mm"], {"triton": "triton does not import here"}
    return ["loop", "grouped_mm", "triton"], {}


def output_and_grads(fn, inputs, dy):
    """fn(*inputs) and the gradients of every input that requires one (x, weights, gate_up, down)."""
    leaves = [t for t in inputs if t.requires_grad]
    y = fn(*inputs)
    return y.detach(), torch.autograd.grad(y, leaves, dy)


def agreement(got, reference, tol: float) -> dict:
    """How far a backend's (output, gradients) are from the reference's: max |diff| of the output, and of each
    gradient relative to that gradient's largest value."""
    (y, grads), (y_ref, grads_ref) = got, reference
    diff = (y.float() - y_ref.float()).abs().max().item()
    scale = y_ref.float().abs().max().item()
    grad_rel = max((g.float() - r.float()).abs().max().item() / max(r.float().abs().max().item(), 1e-30)
                   for g, r in zip(grads, grads_ref))
    return {"max_abs_diff": diff, "reference_max_abs": scale, "grad_max_rel_diff": grad_rel,
            "agree": diff <= tol * scale and grad_rel <= tol}


def check_experts(sizes: Sizes, device: str, record: dict) -> list[str]:
    """Section 1 (module docstring). Fills record["rows"]; returns the problems found."""
    from bench.moe_layer import bench_one, get_backend, layer_row, make_routing, make_weights, routing_counts

    s, dtype = sizes.layer, torch.bfloat16
    backends, record["skipped_backends"] = expert_backends(device)
    fns = {b: get_backend(b)[0] for b in backends}
    elem = torch.finfo(dtype).bits // 8
    rows, problems = record.setdefault("rows", []), []
    gen = torch.Generator().manual_seed(0)
    gate_up = make_weights(s.N, 2 * s.I, s.H, dtype=dtype, device=device, gen=gen, requires_grad=True)  # [N, 2I, H]
    down = make_weights(s.N, s.H, s.I, dtype=dtype, device=device, gen=gen, requires_grad=True)  # [N, H, I]
    for T in sizes.tokens:
        x = torch.randn(T, s.H, generator=gen).to(device, dtype).requires_grad_()
        weights = torch.randn(T, s.K, generator=gen).softmax(-1).to(device).requires_grad_()  # fp32, as the router's
        dy = torch.randn(T, s.H, generator=gen).to(device, dtype)
        base = {}
        for share in sizes.zero_shares:
            ids = make_routing(T, s.K, s.N, share, device, gen)
            M, active = routing_counts(ids, s.N)
            inputs = (x, weights, ids, gate_up, down)
            reference = reference_name = None
            for b in backends:
                where = f"{b}, T={T}, zero share {share:.0%}"
                try:
                    got = output_and_grads(fns[b], inputs, dy)
                    if reference is None:  # loop comes first: the others are compared with it
                        reference, reference_name = got, b
                    check = agreement(got, reference, AGREE_TOL[dtype]) | {"compared_with": reference_name}
                    f_ms, fb_ms = bench_one(fns[b], inputs, dy, device, sizes.warmup, sizes.repeats)
                except Exception as e:  # a backend that fails here is a finding, not the end
                    problems.append(f"{where}: {error_text(e)}")
                    rows.append({"T": T, "zero_share": share, "backend": b, "error": error_text(e)})
                    log(f"  {where}: FAILED {error_text(e)}")
                    continue
                base.setdefault(b, (f_ms, fb_ms))
                rows.append(layer_row(s.name, T, share, b, f_ms, fb_ms, M, active, s.H, s.I, elem, base[b]) | check)
                if not check["agree"]:
                    problems.append(f"{where}: differs from the loop reference ({check})")
                log(f"  {where}: fwd {f_ms:.3f} ms, fwd+bwd {fb_ms:.3f} ms, x{base[b][0] / f_ms:.2f} / "
                    f"x{base[b][1] / fb_ms:.2f} vs 0%, max |diff| {check['max_abs_diff']:.2e}")
    return problems


# ----------------------------------------------------------------------------------------------- training


def run_recording_peak() -> None:
    """Child process entry: `python -c "...run_recording_peak()" PEAK_JSON SCRIPT ARGS...` runs SCRIPT as
    `python SCRIPT ARGS` would, then writes its peak memory to PEAK_JSON: torch.cuda.max_memory_allocated and
    max_memory_reserved (the caching allocator's; the CUDA context is in neither) and the peak RSS."""
    import runpy

    from bench.convert_memory import vm_hwm_kib

    peak_file, script = sys.argv[1], sys.argv[2]
    sys.argv = sys.argv[2:]
    code = 0
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as e:
        code = e.code
    finally:
        peak = {"peak_rss_bytes": vm_hwm_kib(Path("/proc/self/status")) * 1024}
        if torch.cuda.is_initialized():
            peak |= {"max_memory_allocated_bytes": torch.cuda.max_memory_allocated(),
                     "max_memory_reserved_bytes": torch.cuda.max_memory_reserved()}
        write_text_atomic(peak_file, json.dumps(peak) + "\n")
    sys.exit(code)


PUBLISHED_NAMES = {"qwen3_moe": "Qwen3-30B-A3B", "glm4_moe_lite": "GLM-4.7-Flash"}


def predicted_memory(kind: str, teacher_dir: Path, config_name: str, layers: int, seq: int, batch: int, answer: int,
                     device_kind: str) -> dict:
    """zeda.plan's prediction of one GPU's peak for this SFT or OPD step, and the command line that prints it
    (config_name: the folder that command names)."""
    from zeda.config import ModelConfig
    from zeda.plan import GPU_RUNTIME_RESERVE, Mesh, Setup, plan

    cfg = ModelConfig.from_hf_config(teacher_dir)  # the static checkpoint: the planner converts it as convert.py
    setup = Setup(Mesh(1), seq, batch, "bfloat16", False, device_kind, answer_tokens=answer)
    stage = plan(cfg, setup)[kind]
    # max_memory_allocated does not see the CUDA context or the allocator's slack: compare without them
    reserve = GPU_RUNTIME_RESERVE if device_kind == "gpu" else 0
    flags = f"--gpus 1 --seq {seq} --batch {batch}" + (f" --answer-tokens {answer}" if answer else "")
    return {"command": f"python -m zeda.plan --config {config_name}/config.json --layers {layers} {flags}"
                       + (" --device-kind cpu" if device_kind == "cpu" else ""),
            "total_bytes": int(stage["total"]), "without_runtime_reserve_bytes": int(stage["total"] - reserve),
            "terms_bytes": {k: int(v) for k, v in stage["terms"].items() if v}}


def train_step(kind: str, arch: str, layers: int, folder: Path, sizes: Sizes, device: str, timeout: float) -> dict:
    """One train_sft.py / train_opd.py step in a subprocess, its peak memory and the planner's prediction."""
    from bench.real_shape import OPD_PROMPT_TOKENS, read_metrics, run_tree, training_script

    out, peak_file = folder / f"run-{kind}", folder / f"{kind}-peak.json"
    script = training_script(kind, folder / "student", folder / "teacher", folder / "rollouts.jsonl",
                             folder / "prompts.jsonl", out, ranks=1, batch=sizes.train_batch, seq=sizes.train_seq,
                             answer_tokens=sizes.train_answer_tokens, steps=1, device=device)
    code = f"import sys; sys.path.insert(0, {str(ROOT)!r}); from bench.gpu_check import run_recording_peak; " \
           "run_recording_peak()"
    env = {"TOKENIZERS_PARALLELISM": "false"} | ({"OMP_NUM_THREADS": "1"} if device == "cpu" else {})
    log(f"  {arch} {kind}: python {' '.join(script[:1])} ... --device {device} --dtype bfloat16 (1 step)")
    r = run_tree([sys.executable, "-c", code, str(peak_file), *script], env=env, timeout=timeout)
    answer = sizes.train_answer_tokens if kind == "opd" else 0
    seq = OPD_PROMPT_TOKENS + answer if kind == "opd" else sizes.train_seq
    phase = {"seconds": r["seconds"], "rc": r["rc"], "seq": seq, "batch": sizes.train_batch}
    peak = json.loads(peak_file.read_text()) if peak_file.exists() else {}
    if r["rc"] != 0 or not peak:
        return phase | {"error": r["stopped"] or r["stderr_tail"][-1500:], **peak}  # the peak of an OOM: useful
    phase |= read_metrics(out)
    config_name = "SMOKE_CHECKPOINT" if sizes.train_overrides else PUBLISHED_NAMES[arch]
    predicted = predicted_memory(kind, folder / "teacher", config_name, layers, seq, sizes.train_batch, answer,
                                 "gpu" if device == "cuda" else "cpu")
    if device == "cuda":
        measured, what = peak["max_memory_allocated_bytes"], "torch.cuda.max_memory_allocated"
        compared, against = predicted["without_runtime_reserve_bytes"], "zeda.plan total less its runtime reserve"
    else:
        measured, what = peak["peak_rss_bytes"], "peak RSS (VmHWM; --smoke on CPU)"
        compared, against = predicted["total_bytes"], "zeda.plan --device-kind cpu total"
    phase["memory"] = {"measured_bytes": measured, "measured": what, "predicted_bytes": compared,
                       "predicted": against, "measured_over_predicted": round(measured / compared, 3),
                       **peak, "plan": predicted}
    shutil.rmtree(out, ignore_errors=True)  # a final checkpoint: GBs at real widths
    return phase


def prepare(arch: str, layers: int, folder: Path, sizes: Sizes) -> dict:
    """A random static checkpoint at the published widths in folder/teacher (bench/real_shape.py's builder),
    converted to N + N/2 router outputs in folder/student, and the SFT/OPD data files. Returns its shape."""
    from bench.real_shape import rehearsal_config, write_checkpoint, write_data
    from zeda.config import ModelConfig
    from zeda.conversion import convert_checkpoint

    hf = rehearsal_config(arch, layers) | sizes.train_overrides
    cfg = ModelConfig.from_hf_config(hf)
    log(f"  {arch}: writing a random {layers}-layer bf16 checkpoint at the published widths, converting it")
    t0 = time.time()
    written = write_checkpoint(folder / "teacher", hf, 1 << 30)
    write_data(folder, sizes.train_seq)
    convert_checkpoint(folder / "teacher", folder / "student", num_zero=cfg.num_experts // 2, progress=False)
    return {"hidden": cfg.hidden_size, "expert_width": cfg.moe_intermediate_size, "experts": cfg.num_experts,
            "top_k": cfg.num_experts_per_tok, "vocab": cfg.vocab_size, "checkpoint_bytes": written["checkpoint_bytes"],
            "prepare_seconds": round(time.time() - t0, 1)}  # convert.py's code, in this process: one start less


def check_training(sizes: Sizes, device: str, record: dict, deadline: float) -> list[str]:
    """Section 2 (module docstring). Fills record["models"][arch]; returns the problems found."""
    problems = []
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as tmp:
        for arch, layers in sizes.train_layers.items():
            folder = Path(tmp) / arch
            result = record.setdefault("models", {}).setdefault(arch, {"layers": layers})
            if deadline - time.time() < 60:
                result["skipped"] = "out of time (--budget-minutes)"
                problems.append(f"{arch}: not run, out of time (--budget-minutes)")
                continue
            try:
                result |= prepare(arch, layers, folder, sizes)
            except Exception as e:  # the other architecture still runs
                result["error"] = error_text(e)
                problems.append(f"{arch}: preparing the checkpoint: {error_text(e)}")
                continue
            for kind in ("sft", "opd"):
                try:
                    phase = train_step(kind, arch, layers, folder, sizes, device,
                                       timeout=max(60.0, deadline - time.time()))
                except Exception as e:  # e.g. a peak file without GPU figures
                    phase = {"rc": None, "error": error_text(e)}
                result[kind] = phase
                if "error" in phase:
                    problems.append(f"{arch} {kind}: exit code {phase['rc']}: {phase['error'][-300:]}")
                    continue
                m = phase["memory"]
                log(f"  {arch} {kind}: {m['measured']} {m['measured_bytes'] / 2**30:.2f} GiB, predicted "
                    f"{m['predicted_bytes'] / 2**30:.2f} GiB ({m['measured_over_predicted']:.2f}x), "
                    f"step {phase['step_seconds'][0]:.1f} s")
            shutil.rmtree(folder, ignore_errors=True)  # GBs at real widths
    return problems


# ------------------------------------------------------------------------------------------------- decode


def cudagraph_skips() -> int:
    """Inductor's count of compiled graphs run without CUDA graphs (it logs why under TORCH_LOGS=cudagraphs)."""
    from torch._dynamo.utils import counters

    return int(counters["inductor"]["cudagraph_skips"])


def check_decode(sizes: Sizes, device: str, record: dict, deadline: float) -> list[str]:
    """Section 3 (module docstring). Fills record["runs"][dtype][teacher]; returns the problems found."""
    from bench.generate import measure_teacher
    from zeda_toy.stages import SHIPPED_TEACHERS

    problems = []
    if not sizes.compile:
        record["compile"] = COMPILE_OFF_ON_CPU
    else:  # what zeda.generation.compiled_forward_step picks
        record["compile"] = "mode reduce-overhead (CUDA graphs)" if device == "cuda" else "default mode"
    for dtype in sizes.decode_dtypes:
        runs = record.setdefault("runs", {}).setdefault(dtype, {})
        for arch in SHIPPED_TEACHERS:
            where = f"{arch}, {dtype}"
            if deadline - time.time() < 30:
                runs[arch] = {"skipped": "out of time (--budget-minutes)"}
                problems.append(f"{where}: not run, out of time (--budget-minutes)")
                continue
            args = (arch, sizes.decode_prompts, sizes.decode_prompts, sizes.decode_new_tokens, sizes.decode_repeats)
            skips = cudagraph_skips()
            try:
                result = measure_teacher(*args, device=device, dtype=dtype, compile=sizes.compile)
            except Exception as e:  # recorded; then the eager step is measured without it
                problems.append(f"{where}: {error_text(e)}")
                runs[arch] = {"error": error_text(e)}
                if not sizes.compile:
                    continue
                log(f"  {where}: FAILED ({error_text(e)}); measuring again without compile=True")
                torch._dynamo.reset()
                try:
                    runs[arch] |= measure_teacher(*args, device=device, dtype=dtype, compile=False)
                except Exception as e2:
                    runs[arch]["error_without_compile"] = error_text(e2)
                continue
            if sizes.compile:
                result["cudagraph_skips"] = cudagraph_skips() - skips
            runs[arch] = result
            if dtype == "float32" and not result["identical"]:
                problems.append(f"{where}: greedy tokens differ from transformers' ({result['identical_by_run']})")
    return problems


# --------------------------------------------------------------------------------------------------- main


def section_settings(name: str, sizes: Sizes) -> dict:
    """The part of `sizes` a section runs at, with what is fixed in its code."""
    every = asdict(sizes)
    if name == "experts":
        return {k: every[k] for k in ("layer", "tokens", "zero_shares", "warmup", "repeats")} | {"dtype": "bfloat16"}
    if name == "decode":
        return {k: v for k, v in every.items() if k.startswith("decode_") or k == "compile"} | {"greedy": True}
    return {k: v for k, v in every.items() if k.startswith("train_")} | {"dtype": "bfloat16", "steps": 1, "gpus": 1}


def run(sections: list[str], sizes: Sizes, device: str, out: Path, deadline: float, argv: list[str]) -> dict:
    report = {"script": "bench/gpu_check.py", "argv": argv, "date": time.strftime("%Y-%m-%d %H:%M"),
              "smoke": sizes is SMOKE, **environment(device), "sections": {}, "failed": []}
    t_start = time.time()
    for name in sections:
        settings = section_settings(name, sizes)
        record = {**environment(device), "settings": settings}
        report["sections"][name] = record
        log(f"[{name}] {json.dumps(settings)}")
        t0 = time.time()
        try:
            if name == "experts":
                problems = check_experts(sizes, device, record)
            elif name == "decode":
                problems = check_decode(sizes, device, record, deadline)
            else:
                problems = check_training(sizes, device, record, deadline)
        except Exception as e:  # record it; the next section still runs
            problems = [error_text(e)]
            record["error"] = error_text(e)
            traceback.print_exc()
        record["seconds"] = round(time.time() - t0, 1)
        record["status"] = "failed" if problems else "ok"
        record["problems"] = problems
        if problems:
            report["failed"].append(name)
        log(f"[{name}] {record['status']} in {record['seconds']} s" + "".join(f"\n  problem: {p}" for p in problems))
        if device == "cuda":
            torch.cuda.empty_cache()  # the training subprocesses need the memory this one cached
        report["total_seconds"] = round(time.time() - t_start, 1)
        write_text_atomic(out, json.dumps(report, indent=1) + "\n")  # after every section: nothing lost
    return report


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="bench/gpu_check.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "gpu_check.json",
                   help="the JSON to write (default docs/results/gpu_check.json)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes on CPU: the same code paths, in seconds")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {', '.join(SECTIONS)}")
    p.add_argument("--budget-minutes", type=float_range(above=0), default=8.0,
                   help="past this (from the start), no new training step or decode run starts and a running "
                   "training step is stopped (default 8)")
    args = p.parse_args(argv)
    asked = [s for s in args.sections.split(",") if s]
    sections = [s for s in SECTIONS if s in asked]  # always in SECTIONS' order
    try:
        unknown = sorted(set(asked) - set(SECTIONS))
        if unknown or not sections:
            raise UsageError(f"--sections: unknown {unknown or 'none given'}; choose from {', '.join(SECTIONS)}")
        if not args.smoke and not torch.cuda.is_available():
            raise UsageError("no CUDA device here: this script measures what only a GPU can; run it on one, or "
                             "pass --smoke for the tiny CPU run of the same code paths")
    except UsageError as e:
        print(f"gpu_check.py: error: {e}", file=sys.stderr)
        return 2
    sizes, device = (SMOKE, "cpu") if args.smoke else (FULL, "cuda")
    if device == "cpu":
        torch.set_num_threads(1)  # tiny tensors on a shared CPU: one thread (tests/conftest.py says why)
    deadline = time.time() + args.budget_minutes * 60
    report = run(sections, sizes, device, args.out, deadline, sys.argv[1:] if argv is None else list(argv))
    log(f"wrote {args.out} ({report['total_seconds']} s); failed: {', '.join(report['failed']) or 'none'}")
    return 1 if report["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
