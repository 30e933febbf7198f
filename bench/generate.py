"""Decode speed: zeda's generate() (eager and compiled) against Hugging Face transformers' generate(), and the static
model against a converted one at ~50% zero share at the real Qwen3-30B-A3B expert widths.

    python bench/generate.py --json docs/results/generate.json
    python bench/generate.py --arch qwen3_moe --max-new-tokens 32 --repeats 2      # quicker

Part 1, per shipped teacher: the same prompts (the test split, chat-templated, as evaluation encodes them), batch
32, greedy, the same max_new_tokens and EOS ids, fp32, the same thread count. tokens/s = generated tokens (each
row up to and including its EOS) over wall-clock seconds of the whole call (prefill included), the median over
--repeats runs taken in turn (zeda eager, zeda compiled, transformers), so that load from other jobs hits all
three alike. `identical`: every row's tokens equal transformers' up to EOS (compare_rows).

Part 2: a random model with Qwen3-30B-A3B's attention and expert shapes (hidden 2048, 128 experts of width 768,
top-8, --real-layers layers, a small vocabulary) and 64 zero experts. "static" masks the zero experts
(use_zce_mask: exactly the original MoE); "dynamic" routes to them with the zero-expert bias set so that about
half of the slots are zero (zeda/baselines.py's dial). Decode tokens/s exclude the prefill.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from zeda_toy import tasks
from zeda.baselines import set_routing
from zeda.config import ModelConfig
from zeda.evaluation import encode_items, pad_id, stop_ids, suite_items, write_json_atomic
from zeda.flags import int_range
from zeda.generation import generate
from zeda.loading import load_for_inference
from zeda.model import CausalLM
from zeda.sampling import SamplingParams
from zeda_toy.stages import SHIPPED_TEACHERS

# Qwen3-30B-A3B's shapes (its config.json), with a small vocabulary and few layers so that it fits a CPU.
REAL_WIDTHS = dict(hidden_size=2048, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                   moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8, zero_experts=64)


def log(msg: str) -> None:
    print(msg, flush=True)


def up_to_eos(row: list[int], eos_ids: set[int]) -> list[int]:
    """A row cut after its first EOS (kept), as generate() returns it; what follows is padding."""
    for i, tok in enumerate(row):
        if tok in eos_ids:
            return row[:i + 1]
    return row


def compare_rows(ours: list[list[int]], theirs: list[list[int]], eos_ids: set[int]) -> bool:
    """True iff every row's tokens are the same up to (and including) its first EOS, and there are as many rows."""
    return len(ours) == len(theirs) and all(up_to_eos(a, eos_ids) == up_to_eos(b, eos_ids)
                                            for a, b in zip(ours, theirs))


def hf_generate(hf_model, prompts: list[list[int]], max_new_tokens: int, eos_ids: set[int], pad: int):
    """transformers' greedy generate() on the same left-padded batch: (rows of new ids up to EOS, seconds)."""
    P = max(map(len, prompts))
    ids_BP = torch.tensor([[pad] * (P - len(p)) + p for p in prompts]).to(hf_model.device)
    mask_BP = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts]).to(hf_model.device)
    t0 = time.perf_counter()
    with torch.no_grad():
        out = hf_model.generate(input_ids=ids_BP, attention_mask=mask_BP, do_sample=False,
                                max_new_tokens=max_new_tokens, eos_token_id=sorted(eos_ids), pad_token_id=pad)
    if out.is_cuda:
        torch.cuda.synchronize()  # the clock stops when the tokens exist, as zeda's (whose .tolist() waits)
    seconds = time.perf_counter() - t0
    return [up_to_eos(row, eos_ids) for row in out[:, P:].tolist()], seconds


def bench_teacher(arch: str, args) -> dict:
    return measure_teacher(arch, args.prompts, args.batch, args.max_new_tokens, args.repeats)


def measure_teacher(arch: str, n_prompts: int = 32, batch: int = 32, max_new_tokens: int = 64, repeats: int = 3,
                    device: str = "cpu", dtype: str = "float32", compile: bool = True) -> dict:
    """Part 1 for one shipped teacher (the module docstring). device/dtype: where and in what both contenders
    run; compile=False leaves out the compiled runs (the keys of "compiled" with them)."""
    import transformers

    path = SHIPPED_TEACHERS[arch]
    model, tokenizer = load_for_inference(path, device=device, dtype=dtype)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).to(device).eval()
    cfg = model.config
    per_family = -(-n_prompts // len(tasks.FAMILIES))
    items = suite_items(list(tasks.FAMILIES), per_family, split="test")[:n_prompts]
    prompts = encode_items(tokenizer, items, max_new_tokens, cfg.max_position_embeddings)
    batches = [prompts[i:i + batch] for i in range(0, len(prompts), batch)]
    eos, pad = stop_ids(tokenizer, cfg), pad_id(tokenizer, cfg)
    greedy = SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens)
    log(f"[{arch}] {len(prompts)} test prompts in batches of {batch}, max_new_tokens {max_new_tokens}, "
        f"expert backend {model.model.layers[-1].mlp.experts.backend}")

    def run_zeda(compile: bool):
        t0 = time.perf_counter()
        rows = [row for batch in batches for row in generate(model, batch, greedy, eos, pad, compile=compile).tokens]
        return rows, time.perf_counter() - t0

    def run_hf():
        rows, seconds = [], 0.0
        for chunk in batches:
            got, s = hf_generate(hf_model, chunk, max_new_tokens, eos, pad)
            rows, seconds = rows + got, seconds + s
        return rows, seconds

    if compile:
        t0 = time.perf_counter()
        compiled_rows, _ = run_zeda(compile=True)  # the first call per batch shape compiles
        compile_seconds = time.perf_counter() - t0
        log(f"[{arch}] compiled the decode step (first call, all batches): {compile_seconds:.1f} s")
    contenders = ([("eager", lambda: run_zeda(False))] + ([("compiled", lambda: run_zeda(True))] if compile else [])
                  + [("transformers", run_hf)])
    runs = {name: [] for name, _ in contenders}
    outputs = {}
    for r in range(repeats):  # in turn, so that the other jobs' load hits all three alike
        for name, fn in contenders:
            rows, seconds = fn()
            outputs[name] = rows
            runs[name].append(sum(map(len, rows)) / seconds)
        log(f"[{arch}] repeat {r + 1}/{repeats}: " + ", ".join(f"{k} {v[-1]:.0f} tok/s" for k, v in runs.items()))
    tok_s = {k: statistics.median(v) for k, v in runs.items()}
    identical = {k: compare_rows(outputs[k], outputs["transformers"], eos) for k in runs if k != "transformers"}
    if compile:
        identical["compiled_first_call"] = compare_rows(compiled_rows, outputs["transformers"], eos)
    report = {
        "prompts": len(prompts), "batch": batch, "max_new_tokens": max_new_tokens,
        "generated_tokens": sum(map(len, outputs["transformers"])),
        "zeda_eager_tokens_per_s": round(tok_s["eager"], 1),
        "zeda_compiled_tokens_per_s": round(tok_s["compiled"], 1) if compile else None,
        "transformers_tokens_per_s": round(tok_s["transformers"], 1),
        "compiled_vs_transformers": round(tok_s["compiled"] / tok_s["transformers"], 2) if compile else None,
        "eager_vs_transformers": round(tok_s["eager"] / tok_s["transformers"], 2),
        "identical": all(identical.values()), "identical_by_run": identical,
        "compile_seconds": round(compile_seconds, 1) if compile else None, "runs_tokens_per_s": runs,
    }
    return {k: v for k, v in report.items() if v is not None}  # without compile: no compiled keys at all


def real_width_model(layers: int) -> CausalLM:
    w = REAL_WIDTHS
    cfg = ModelConfig.from_hf_config({
        "model_type": "qwen3_moe", "vocab_size": 256, "hidden_size": w["hidden_size"], "num_hidden_layers": layers,
        "num_attention_heads": w["num_attention_heads"], "num_key_value_heads": w["num_key_value_heads"],
        "head_dim": w["head_dim"], "intermediate_size": 6144, "moe_intermediate_size": w["moe_intermediate_size"],
        "num_experts": w["num_experts"], "num_experts_per_tok": w["num_experts_per_tok"], "norm_topk_prob": True,
        "rms_norm_eps": 1e-6, "rope_theta": 1e6, "max_position_embeddings": 512, "tie_word_embeddings": False,
        "mlp_only_layers": [], "decoder_sparse_step": 1, "eos_token_id": 0,
        "zce_nums": [w["zero_experts"]], "zce_types": ["zero"]})
    model = CausalLM(cfg)
    model.init_weights(seed=0)
    model.set_expert_backend("grouped_mm")
    return model.eval()


def set_static(model: CausalLM, static: bool) -> None:
    """static: zero experts masked (use_zce_mask), the router scores the N real experts only, as the original."""
    for block in model.model.layers:
        block.mlp.gate.use_zce_mask = static


def zero_share_bias(model: CausalLM, ids_BT: torch.Tensor, target: float) -> float:
    """The zero-expert bias at which about `target` of the slots go to zero experts, by bisection on the routers'
    inputs of one forward (captured with hooks, so each try only re-runs the routers)."""
    inputs, hooks = [], [block.mlp.gate.register_forward_hook(lambda m, a, out: inputs.append((m, a[0])))
                         for block in model.model.layers]
    with torch.no_grad():
        model(ids_BT[:, :4])  # a few positions are enough to place the bias
    for h in hooks:
        h.remove()
    N = model.config.num_experts
    lo, hi = -10.0, 10.0
    for _ in range(20):
        mid = (lo + hi) / 2
        set_routing(model, zero_bias=mid)
        with torch.no_grad():
            share = sum(float((gate(x).ids_TK >= N).float().mean()) for gate, x in inputs) / len(inputs)
        lo, hi = (mid, hi) if share < target else (lo, mid)
    return (lo + hi) / 2


def bench_real_widths(args) -> dict:
    log(f"[real widths] building a {args.real_layers}-layer model at Qwen3-30B-A3B's widths {REAL_WIDTHS}")
    model = real_width_model(args.real_layers)
    B, M = args.batch, args.real_new_tokens
    prompts = torch.randint(1, 256, (B, args.real_prompt_len), generator=torch.Generator().manual_seed(0)).tolist()
    params = SamplingParams(temperature=0.0, max_new_tokens=M)
    set_static(model, False)
    bias = zero_share_bias(model, torch.tensor(prompts), 0.5)
    log(f"[real widths] zero-expert bias {bias:+.3f} for ~50% zero slots")

    def run(kind: str, compile: bool):
        set_static(model, kind == "static")
        set_routing(model, zero_bias=0.0 if kind == "static" else bias)
        gen = generate(model, prompts, params, eos_ids=[], compile=compile)
        decode_tokens = gen.new_tokens - B  # the first token of each row comes from the prefill's logits
        zero = sum(map(sum, gen.zero_slots)) / max(1, sum(map(sum, gen.zero_slots)) + sum(map(sum, gen.real_slots)))
        return decode_tokens / (gen.seconds - gen.prefill_seconds), zero

    for kind in ("static", "dynamic"):
        t0 = time.perf_counter()
        run(kind, True)
        log(f"[real widths] {kind}: compiled (first call) in {time.perf_counter() - t0:.1f} s")
    runs = {f"{k}_{m}": [] for k in ("static", "dynamic") for m in ("eager", "compiled")}
    share = {}
    for r in range(args.repeats):
        for key in runs:
            kind, mode = key.split("_")
            tok_s, share[kind] = run(kind, mode == "compiled")
            runs[key].append(tok_s)
        log(f"[real widths] repeat {r + 1}/{args.repeats}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in runs.items())
            + " decode tok/s")
    med = {k: statistics.median(v) for k, v in runs.items()}
    return {
        "shape": {**REAL_WIDTHS, "layers": args.real_layers, "vocab": 256}, "batch": B, "new_tokens": M,
        "prompt_len": args.real_prompt_len, "zero_bias": round(bias, 3),
        "zero_share_static": round(share["static"], 3), "zero_share_dynamic": round(share["dynamic"], 3),
        **{f"{k}_decode_tokens_per_s": round(v, 2) for k, v in med.items()},
        "dynamic_vs_static_eager": round(med["dynamic_eager"] / med["static_eager"], 2),
        "dynamic_vs_static_compiled": round(med["dynamic_compiled"] / med["static_compiled"], 2),
        "runs_decode_tokens_per_s": runs,
    }


def summary(report: dict) -> str:
    lines = ["| teacher | zeda eager tok/s | zeda compiled tok/s | transformers tok/s | compiled / transformers "
             "| identical |", "| --- | --- | --- | --- | --- | --- |"]
    for arch, r in report.get("teachers", {}).items():
        lines.append(f"| {arch} | {r['zeda_eager_tokens_per_s']:.0f} | {r['zeda_compiled_tokens_per_s']:.0f} | "
                     f"{r['transformers_tokens_per_s']:.0f} | {r['compiled_vs_transformers']:.2f}x | {r['identical']} |")
    if "real_widths" in report:
        r = report["real_widths"]
        lines += ["", "| real widths, decode | static tok/s | dynamic tok/s (zero share) | dynamic / static |",
                  "| --- | --- | --- | --- |"]
        for mode in ("eager", "compiled"):
            lines.append(f"| {mode} | {r[f'static_{mode}_decode_tokens_per_s']:.1f} | "
                         f"{r[f'dynamic_{mode}_decode_tokens_per_s']:.1f} ({r['zero_share_dynamic']:.0%}) | "
                         f"{r[f'dynamic_vs_static_{mode}']:.2f}x |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Decode tokens/s: zeda against transformers, dynamic against static.")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--arch", nargs="*", choices=list(SHIPPED_TEACHERS), default=list(SHIPPED_TEACHERS),
                   help="shipped teachers to measure (default: both; none: skip part 1)")
    p.add_argument("--batch", type=int_range(min=1), default=32, help="prompts per generate() call")
    p.add_argument("--prompts", type=int_range(min=1), default=32, help="test prompts per teacher")
    p.add_argument("--max-new-tokens", type=int_range(min=1), default=64, help="per prompt (default 64)")
    p.add_argument("--repeats", type=int_range(min=1), default=3, help="timed runs of each, median (default 3)")
    p.add_argument("--threads", type=int_range(min=1), default=1, help="torch threads, for every contender")
    p.add_argument("--real-layers", type=int_range(min=0), default=2,
                   help="layers of the real-width model (0: skip part 2; default 2)")
    p.add_argument("--real-new-tokens", type=int_range(min=2), default=8, help="real widths: tokens per row")
    p.add_argument("--real-prompt-len", type=int_range(min=1), default=16, help="real widths: prompt tokens")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    report = {"machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}",
              "date": time.strftime("%Y-%m-%d"), "dtype": "float32", "sampling": "greedy", "teachers": {}}
    for arch in args.arch:
        report["teachers"][arch] = bench_teacher(arch, args)
    if args.real_layers:
        report["real_widths"] = bench_real_widths(args)
    log("\n" + summary(report))
    if args.json:
        write_json_atomic(args.json, report)
        log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
