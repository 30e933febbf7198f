"""Training-step speed: one forward + backward of next-token cross-entropy, zeda against transformers, and
zeda's converted (zero-expert) model against the static one.

    python bench/train_step.py                                   # teachers + 1-layer real widths, fp32 (4-9 min)
    python bench/train_step.py --threads 1 --profile 15 --json /tmp/train_step.json       # + top ops per model
    python bench/train_step.py --configs qwen_real,glm_real --real-batch 8 --dtype bfloat16
    python bench/train_step.py --configs qwen_teacher --hf-experts eager,batched_mm,grouped_mm
    python bench/train_step.py --smoke                           # seconds: both teachers, a tiny batch (the test)

One step: loss = mean next-token cross-entropy over the B*T tokens of a batch, then loss.backward(); no optimizer,
no Group Auxiliary Loss. Gradients are dropped before and after each step (as after an optimizer step), outside
the clock. tokens/s = B*T over the median wall time of --repeats steps, after --warmup untimed ones; on each
repeat every row of a config runs once in turn, so that load from other jobs on the machine hits them alike.

Rows of a config (`model / impl / head`):
  transformers   Qwen3MoeForCausalLM / Glm4MoeLiteForCausalLM from the static folder, attn_implementation="sdpa",
                 experts_implementation from --hf-experts. transformers 5 picks "grouped_mm" by default wherever
                 torch._grouped_mm runs (on CPU: torch >= 2.9), and it is its fastest on CPU here: "eager" (a
                 Python loop over the experts hit) ties it on the toy teachers but indexes the 3D weights per
                 expert, so its backward builds a full-size gradient per expert (~40x slower at real widths);
                 "batched_mm" gathers a [2I, H] weight per slot (14-28x slower on the teachers, ~100 GB at real
                 widths, refused there). Head "logits": F.cross_entropy(logits.float()), which is what
                 transformers' ForCausalLMLoss computes.
  zeda static    zeda.loading.load_model on the same folder, expert backends --backends ("auto" picks grouped_mm
                 where H and I are 16-byte aligned, else loop; marked "*"), and head "chunked": model(x, targets=y)
                 -> zeda/model.py:target_logprobs -> zeda.losses.response_cross_entropy, as the trainers compute it,
                 or "logits": model(x) then the same F.cross_entropy as transformers (like for like).
  zeda dynamic   convert.py's output of the same folder (Z = N/2 zero experts), with the zero-expert bias
                 (zeda/baselines.py's dial) set so that about --zero-share of the slots go to zero experts;
                 `zero` is the share measured on the benchmark's own batch.

Columns: tok/s; `x hf`: over transformers' on the same config; `dyn/st`: a dynamic row over the static row with
the same backend and head; the same three per CPU second of this process (robust to other jobs taking the CPU);
GF/s: 3x the forward's matmul FLOPs (zeda/flops.py) per wall second. `loss` is the first step's: on the static
model every row computes the same function of the same weights, so its loss must equal transformers' (fp32:
within ~1e-6; `d loss` is the gap; in bf16 transformers routes in bf16 and zeda in fp32, so they differ). Each
config also prints its FLOP ceiling: what dyn/st would be if time followed the FLOPs (the experts' share of the
static model's FLOPs sets it: ~1.33 at 50% zero slots for one Qwen3-30B-A3B layer with an 8192 vocabulary).

Configs: qwen_teacher and glm_teacher are the shipped toy teachers (assets/), fed packed chat-templated training
text. qwen_real and glm_real have the published widths of Qwen3-30B-A3B and GLM-4.7-Flash (bench/real_shape.py's
configs and random bf16 checkpoint writer) with --real-layers decoder layers, all of them MoE (GLM-4.7-Flash's
first layer is dense; it is left out so that each layer measured is a MoE one), a --real-vocab vocabulary (the
published ~152k would make the head ~85% of a 1-layer step's FLOPs; at 48 layers it is ~10%) and random
token ids. Memory: at real widths a 1-layer fp32 model and its gradients take ~5 GB, so the converted model
serves the static rows too, with its zero experts masked (use_zce_mask: exactly the static model, and its loss
is checked against transformers' on the static folder), and transformers' model is loaded beside it only when
both fit in 70% of the free memory (else one after the other). Teachers: three models at once.

Freed memory is kept for reuse (glibc's mallopt; --no-reuse-freed-memory turns it off). PyTorch has no caching
allocator on CPU, so otherwise every step maps its gradients afresh (a full [N, 2I, H] and [N, H, I] per MoE
layer whatever the rows, GBs at real widths) and the kernel faults them in; on a VM how long that takes varies
step to step (the same step at real widths in bf16 took 1.0 s or 2.3-3.0 s in one run, whichever model it was),
which swamps the models' own difference. Kept pages are what a GPU's caching allocator gives; what the pages cost
a CPU training run, and the settings that cut it, is bench/huge_pages.py's measure.

--profile N: after timing, one step of transformers, zeda static and zeda dynamic (auto backend, chunked head)
under torch.profiler; prints and stores the N ops with the most self CPU time.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# zeda is imported here, whole, before any work: a run that takes minutes must not mix the code it started with
# and code edited meanwhile (transformers, slow to import, is imported where it is first used).
from bench.real_shape import rehearsal_config, write_checkpoint
from zeda_toy import tasks
from zeda.baselines import set_routing
from zeda.config import ModelConfig
from zeda.conversion import convert_checkpoint
from zeda.evaluation import write_json_atomic
from zeda.flags import float_range, int_range
from zeda.flops import attended_keys, flop_report, routing_stats
from zeda.loading import empty_model, free_memory, load_model, load_tokenizer, resolve_backend
from zeda.losses import response_cross_entropy

TEACHERS = {"qwen_teacher": ("qwen3_moe", ROOT / "assets/qwen3_moe_teacher"),
            "glm_teacher": ("glm4_moe_lite", ROOT / "assets/glm4_moe_lite_teacher")}
REAL = {"qwen_real": "qwen3_moe", "glm_real": "glm4_moe_lite"}
CONFIGS = (*TEACHERS, *REAL)
HF_EXPERTS = ("eager", "batched_mm", "grouped_mm")
ZEDA_BACKENDS = ("loop", "grouped_mm")
HEADS = ("chunked", "logits")


def log(msg: str) -> None:
    print(msg, flush=True)


def comma_list(choices: tuple[str, ...]):
    """An argparse type: a comma-separated subset of `choices`, in the order given, refused by name otherwise."""
    def parse(text: str) -> list[str]:
        items = [s for s in text.split(",") if s]
        bad = [s for s in items if s not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"{text!r}: choose a comma-separated subset of {', '.join(choices)}")
        return list(dict.fromkeys(items))

    parse.__name__ = "list"
    return parse


# ------------------------------------------------------------------------------------------------- inputs


def teacher_batch(path: Path, batch: int, seq_len: int) -> torch.Tensor:
    """[B, T+1] token ids: training prompts and reference answers, chat-templated as SFT renders them, packed
    end to end, so the routing is the trained teacher's on text it was trained on."""
    tokenizer = load_tokenizer(path)
    need = batch * (seq_len + 1)
    stream: list[int] = []
    per_family = 8
    while len(stream) < need:
        stream = []
        for t in tasks.mixture("train", per_family, seed=0):
            text = tokenizer.apply_chat_template(tasks.to_rollout_record(t, t.response)["messages"], tokenize=False)
            stream += tokenizer.encode(text, add_special_tokens=False)
        per_family *= 2
    return torch.tensor(stream[:need]).view(batch, seq_len + 1)


def real_checkpoint(folder: Path, arch: str, layers: int, vocab: int) -> Path:
    """A random bf16 checkpoint at the published widths (bench/real_shape.py), every layer MoE, no MTP layer."""
    hf = rehearsal_config(arch, layers, vocab)
    hf["max_position_embeddings"] = 4096
    if arch == "glm4_moe_lite":
        hf.update(first_k_dense_replace=0, mlp_layer_types=["sparse"] * layers, num_nextn_predict_layers=0)
    write_checkpoint(folder, hf, shard_bytes=4 << 30)
    return folder


def converted(static: Path, out: Path) -> Path:
    """convert.py's output of `static` with Z = N/2 zero experts (docs/method.md §1)."""
    convert_checkpoint(static, out, num_zero=ModelConfig.from_hf_config(static).num_experts // 2, progress=False)
    return out


# ------------------------------------------------------------------------------------------------- models


def load_hf(path: Path, arch: str, dtype: torch.dtype, experts: str):
    import transformers

    cls = transformers.Qwen3MoeForCausalLM if arch == "qwen3_moe" else transformers.Glm4MoeLiteForCausalLM
    model = cls.from_pretrained(path, dtype=dtype, attn_implementation="sdpa", experts_implementation=experts)
    return model.train()


def load_zeda(path: Path, dtype: torch.dtype):
    return load_model(path, device="cpu", dtype=dtype).train()


def measure_routing(model, x_BT: torch.Tensor) -> dict:
    """zeda.flops.flop_report of one forward on x_BT: the zero share and the forward FLOPs, dynamic (this
    routing) and static (the original model: K real slots per token)."""
    routing = []
    with torch.no_grad():
        model(x_BT, routing=routing, hidden_only=True)
    B, T = x_BT.shape
    stats = routing_stats(routing, model.config.num_experts)
    return flop_report(model.config, stats, B * attended_keys(num_tokens=T))


def set_zero_share(model, x_BT: torch.Tensor, target: float, rounds: int = 2) -> float:
    """Set the zero-expert bias (zeda.baselines.set_routing) so that about `target` of the slots on x_BT go to
    zero experts: bisection on the routers' captured inputs (each try re-runs only the routers), then once more
    on the inputs at the found bias, since a bias in layer l moves the inputs of layer l+1. Returns the bias."""
    N, bias = model.config.num_experts, 0.0
    gates = [b.mlp.gate for b in model.model.layers if b.is_moe]
    for _ in range(rounds):
        inputs = []
        hooks = [g.register_forward_hook(lambda m, a, out: inputs.append((m, a[0]))) for g in gates]
        with torch.no_grad():
            model(x_BT, hidden_only=True)
        for h in hooks:
            h.remove()
        lo, hi = -20.0, 20.0
        for _ in range(24):
            bias = (lo + hi) / 2
            set_routing(model, zero_bias=bias)
            with torch.no_grad():
                share = sum(int((g(x).ids_TK >= N).sum()) for g, x in inputs) / sum(x.shape[0] for _, x in inputs)
            share /= model.config.num_experts_per_tok
            lo, hi = (bias, hi) if share < target else (lo, bias)
    set_routing(model, zero_bias=bias)
    return bias


# --------------------------------------------------------------------------------------------- the steps


def hf_step(model, x_BT, y_BT):
    """transformers' forward to logits, then its causal-LM loss (ForCausalLMLoss: fp32 logits, mean CE)."""
    def step():
        logits_BTV = model(input_ids=x_BT).logits
        loss = F.cross_entropy(logits_BTV.float().flatten(0, 1), y_BT.flatten())
        loss.backward()
        return loss.detach()

    return step


def mask_zero_experts(model, mask: bool) -> None:
    """use_zce_mask on every router: the zero experts are never chosen, and a converted model is exactly the
    static one it came from (docs/method.md §1, `use_zce_mask`)."""
    for block in model.model.layers:
        if block.is_moe:
            block.mlp.gate.use_zce_mask = mask


def zeda_step(model, backend: str, head: str, x_BT, y_BT, static: bool | None = None):
    """zeda's forward + backward with `backend` for the routed experts; head "chunked" is the trainers' loss
    (target_logprobs, never [B, T, V]), "logits" the same loss through full logits, as transformers.
    static: for a converted model serving both kinds of rows, mask its zero experts (True) or not (False)."""
    mask_BT = torch.ones(y_BT.shape)

    def step():
        model.set_expert_backend(backend)
        if static is not None:
            mask_zero_experts(model, static)
        if head == "chunked":
            loss = response_cross_entropy(model(x_BT, targets=y_BT), mask_BT)
        else:
            loss = F.cross_entropy(model(x_BT).float().flatten(0, 1), y_BT.flatten())
        loss.backward()
        return loss.detach()

    return step


def time_rows(rows: list[dict], steps: dict, warmup: int, repeats: int) -> None:
    """Run the rows in turn, warmup + repeats times; fill each row's loss (first step), wall and CPU seconds
    (all and median) and tokens per wall and per CPU second. Gradients are dropped after each step, outside the
    clock, so that only one model holds them at a time."""
    wall, cpu = {id(r): [] for r in rows}, {id(r): [] for r in rows}
    for i in range(warmup + repeats):
        for r in rows:
            model, step = steps[id(r)]
            model.zero_grad(set_to_none=True)
            t0, c0 = time.perf_counter(), time.process_time()
            loss = step()
            seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
            model.zero_grad(set_to_none=True)
            if i == 0:
                r["loss"] = float(loss)
            if i >= warmup:
                wall[id(r)].append(seconds)
                cpu[id(r)].append(cpu_seconds)
    for r in rows:
        r["steps_s"] = [round(t, 4) for t in wall[id(r)]]
        r["steps_cpu_s"] = [round(t, 4) for t in cpu[id(r)]]
        r["step_s"], r["step_cpu_s"] = statistics.median(wall[id(r)]), statistics.median(cpu[id(r)])
        r["tokens_per_s"], r["tokens_per_cpu_s"] = r["tokens"] / r["step_s"], r["tokens"] / r["step_cpu_s"]


def profile_step(model, step, top: int) -> list[dict]:
    """The `top` ops by self CPU time of one step (after one untimed step), with their share of the total."""
    model.zero_grad(set_to_none=True)
    step()
    model.zero_grad(set_to_none=True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step()
    model.zero_grad(set_to_none=True)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) or 1
    events = sorted(events, key=lambda e: -e.self_cpu_time_total)[:top]
    return [{"op": e.key, "self_ms": round(e.self_cpu_time_total / 1e3, 2),
             "share": round(e.self_cpu_time_total / total, 3), "calls": e.count} for e in events]


# ---------------------------------------------------------------------------------------------- a config


def weight_bytes(cfg, dtype: torch.dtype) -> int:
    """Bytes of one model's parameters in `dtype` (zeda's model on the meta device: no memory)."""
    return sum(t.numel() * t.element_size() for t in empty_model(cfg, dtype).parameters())


def bench_config(name: str, args, dtype: torch.dtype, workdir: Path) -> tuple[dict, list[dict], dict]:
    """(config description, rows, profiles) of one config."""
    t_setup = time.perf_counter()
    teacher = name in TEACHERS
    if teacher:
        arch, static = TEACHERS[name]
        ids = teacher_batch(static, args.batch, args.seq_len)
    else:
        arch = REAL[name]
        static = real_checkpoint(workdir / f"{name}-static", arch, args.real_layers, args.real_vocab)
        ids = torch.randint(0, args.real_vocab, (args.real_batch, args.real_seq_len + 1),
                            generator=torch.Generator().manual_seed(0))
    dynamic = converted(static, workdir / f"{name}-dynamic")
    x_BT, y_BT = ids[:, :-1].contiguous(), ids[:, 1:].contiguous()
    cfg = ModelConfig.from_hf_config(static)
    auto = resolve_backend("auto", cfg, dtype)
    backends = args.backends or (list(ZEDA_BACKENDS) if teacher else [auto])
    warmup = args.warmup if args.warmup is not None else (2 if teacher else 1)
    repeats = args.repeats or (5 if teacher else 3)
    B, T = x_BT.shape

    # The models. Teachers: transformers', zeda's on the static folder and zeda's on the converted one, all at
    # once. Real widths (a 1-layer fp32 model and its gradients take ~5 GB): the converted model serves the
    # static rows too, with its zero experts masked, which is exactly the static model (its loss is checked
    # against transformers' on the static folder below); transformers' model beside it when both fit.
    models = {("transformers", e): lambda e=e: load_hf(static, arch, dtype, e) for e in args.hf_experts}
    if teacher:
        models["zeda static", ""] = lambda: load_zeda(static, dtype)
    models["zeda dynamic", ""] = lambda: load_zeda(dynamic, dtype)
    need = (len(models) + 2) * weight_bytes(cfg, dtype)  # the models, one model's gradients, activations
    free = free_memory(torch.device("cpu"))
    together = teacher or free is None or need < 0.7 * free
    desc = {"arch": arch, "static": str(static.relative_to(ROOT)) if static.is_relative_to(ROOT) else "random",
            "zeda_static": "static folder" if teacher else "converted model, zero experts masked (use_zce_mask)",
            "layers": cfg.num_hidden_layers, "moe_layers": cfg.num_moe_layers, "hidden": cfg.hidden_size,
            "experts": cfg.num_experts, "zero_experts": cfg.num_experts // 2, "top_k": cfg.num_experts_per_tok,
            "expert_intermediate": cfg.moe_intermediate_size, "vocab": cfg.vocab_size, "batch": B, "seq_len": T,
            "auto_backend": auto, "warmup": warmup, "repeats": repeats, "models_at_once": together}
    log(f"[{name}] {arch}, {cfg.num_hidden_layers} layers, H {cfg.hidden_size}, N {cfg.num_experts}, "
        f"K {cfg.num_experts_per_tok}, I {cfg.moe_intermediate_size}, V {cfg.vocab_size}; B {B} x T {T}; "
        f"zeda auto backend: {auto}; models {'at once' if together else 'one at a time'} "
        f"(~{need / 2**30:.1f} GiB needed, {(free or 0) / 2**30:.1f} GiB free)")

    def row(model: str, impl: str, head: str) -> dict:
        return {"config": name, "model": model, "impl": impl, "head": head,
                "auto": model != "transformers" and impl == auto, "tokens": B * T}

    hf_rows = {e: row("transformers", e, "logits") for e in args.hf_experts}
    zeda_rows = {k: [row(f"zeda {k}", b, h) for b in backends for h in args.heads] for k in ("static", "dynamic")}
    profiles, flops = {}, {}

    def steps_of(key, model) -> dict:
        """{id(row): (model, step)} of the rows this model serves; sets up its routing first."""
        kind, experts = key
        if kind == "transformers":
            return {id(hf_rows[experts]): (model, hf_step(model, x_BT, y_BT))}
        steps = {}
        for k in ("static", "dynamic") if kind == "zeda dynamic" and not teacher else (kind.split()[1],):
            mask = None if teacher else k == "static"
            if k == "dynamic":
                mask_zero_experts(model, False)
                desc["zero_bias"] = round(set_zero_share(model, x_BT, args.zero_share), 4)
            if mask is not None:
                mask_zero_experts(model, mask)
            flops[k] = measure_routing(model, x_BT)
            for r in zeda_rows[k]:
                r["zero_share"] = flops[k]["zero_expert_ratio"]
                steps[id(r)] = (model, zeda_step(model, r["impl"], r["head"], x_BT, y_BT, mask))
        return steps

    def profile(key, model) -> None:
        if not args.profile:
            return
        if key[0] == "transformers":
            profiles[f"transformers {key[1]}"] = profile_step(model, hf_step(model, x_BT, y_BT), args.profile)
            return
        for k in ("static", "dynamic") if key[0] == "zeda dynamic" and not teacher else (key[0].split()[1],):
            step = zeda_step(model, auto, "chunked", x_BT, y_BT, None if teacher else k == "static")
            profiles[f"zeda {k} {auto} chunked"] = profile_step(model, step, args.profile)

    log(f"[{name}] setup (checkpoint, conversion, batch) {time.perf_counter() - t_setup:.1f} s")
    all_rows = list(hf_rows.values()) + zeda_rows["static"] + zeda_rows["dynamic"]
    for group in [list(models)] if together else [[key] for key in models]:
        t0 = time.perf_counter()
        loaded, steps = {key: models[key]() for key in group}, {}
        for key, model in loaded.items():
            steps |= steps_of(key, model)
        group_rows = [r for r in all_rows if id(r) in steps]
        time_rows(group_rows, steps, warmup, repeats)
        for key, model in loaded.items():
            profile(key, model)
        done = ", ".join(f"{r['model']} {r['impl']}/{r['head']} {r['tokens_per_s']:.0f}" for r in group_rows)
        log(f"[{name}] tok/s: {done} ({time.perf_counter() - t0:.0f} s with the loads)")
        del loaded, steps
        gc.collect()

    best_hf = max(hf_rows.values(), key=lambda r: r["tokens_per_s"])
    desc["transformers_experts"] = best_hf["impl"]
    # FLOPs of the step: 3x the forward's matmul FLOPs (backward = 2 forwards), the static model's for every
    # static row. The ceiling is what dynamic/static would be if time followed the FLOPs.
    fwd_static, fwd_dynamic = flops["dynamic"]["forward_flops_static"], flops["dynamic"]["forward_flops_dynamic"]
    desc["zero_share_dynamic"] = round(flops["dynamic"]["zero_expert_ratio"], 4)
    desc["forward_gflops_static"], desc["forward_gflops_dynamic"] = fwd_static / 1e9, fwd_dynamic / 1e9
    desc["expert_flop_share_static"] = round(flops["dynamic"]["expert_flops_static"] / fwd_static, 4)
    desc["dynamic_vs_static_flop_ceiling"] = round(fwd_static / fwd_dynamic, 3)
    log(f"[{name}] zero share {desc['zero_share_dynamic']:.1%}; experts are {desc['expert_flop_share_static']:.0%} "
        f"of the static model's FLOPs, so dynamic/static cannot exceed {desc['dynamic_vs_static_flop_ceiling']:.2f} "
        f"where time follows FLOPs")
    for r in all_rows:
        r["gflops_per_s"] = 3 * (fwd_dynamic if r["model"] == "zeda dynamic" else fwd_static) / r["step_s"] / 1e9
        r["vs_transformers"] = r["tokens_per_s"] / best_hf["tokens_per_s"]
        r["vs_transformers_cpu"] = r["tokens_per_cpu_s"] / best_hf["tokens_per_cpu_s"]
        r["loss_diff_vs_transformers"] = r["loss"] - best_hf["loss"]
        if r["model"] == "zeda dynamic":
            same = next(s for s in zeda_rows["static"] if (s["impl"], s["head"]) == (r["impl"], r["head"]))
            r["dynamic_vs_static"] = r["tokens_per_s"] / same["tokens_per_s"]
            r["dynamic_vs_static_cpu"] = r["tokens_per_cpu_s"] / same["tokens_per_cpu_s"]
    return desc, all_rows, profiles


# ------------------------------------------------------------------------------------------------ report


def table(rows: list[dict]) -> str:
    """One line per row: wall-clock tok/s and ratios, then the same per CPU second of this process (robust to
    other jobs taking the CPU; with several threads it also counts their spinning)."""
    ratio = lambda r, key: f"{r[key]:.2f}" if key in r else "-"
    header = (f"{'config':<13} {'model':<13} {'impl':<11} {'head':<8} {'tok/s':>8} {'x hf':>5} {'dyn/st':>6} "
              f"{'tok/cpu-s':>9} {'x hf':>5} {'dyn/st':>6} {'GF/s':>6} {'zero':>5} {'loss':>8} {'d loss':>8}")
    lines = [header, "-" * len(header)]
    for r in rows:
        impl = r["impl"] + ("*" if r["auto"] else "")
        zero = f"{r['zero_share']:.0%}" if "zero_share" in r else "-"
        d_loss = f"{r['loss_diff_vs_transformers']:+.0e}" if r["model"] != "zeda dynamic" else "-"
        lines.append(f"{r['config']:<13} {r['model']:<13} {impl:<11} {r['head']:<8} {r['tokens_per_s']:>8.0f} "
                     f"{r['vs_transformers']:>5.2f} {ratio(r, 'dynamic_vs_static'):>6} {r['tokens_per_cpu_s']:>9.0f} "
                     f"{r['vs_transformers_cpu']:>5.2f} {ratio(r, 'dynamic_vs_static_cpu'):>6} "
                     f"{r['gflops_per_s']:>6.1f} {zero:>5} "
                     f"{r['loss']:>8.4f} {d_loss:>8}")
    return "\n".join(lines)


def profile_text(profiles: dict) -> str:
    out = []
    for config, by_model in profiles.items():
        for label, ops in by_model.items():
            out.append(f"\n[{config}] {label}: top ops by self CPU time")
            out += [f"  {o['self_ms']:>9.1f} ms {o['share']:>6.1%} {o['calls']:>6}x  {o['op']}" for o in ops]
    return "\n".join(out)


def reuse_freed_memory() -> bool:
    """glibc only: serve big blocks from the heap instead of fresh mmaps, and never give freed memory back, so
    that each step's gradient and activation buffers reuse the previous step's pages instead of page-faulting
    (and zeroing) new ones. Returns False where mallopt is not there (not glibc)."""
    import ctypes
    import ctypes.util

    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's malloc.h
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        # a trim threshold of -1 is SIZE_MAX to glibc: never trim
        return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, -1))
    except (OSError, AttributeError):
        return False


def machine() -> dict:
    import transformers

    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
            "platform": platform.platform()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Training-step tokens/s: zeda against transformers, dynamic against "
                                "static (see the module docstring).")
    p.add_argument("--configs", type=comma_list(CONFIGS), default=list(CONFIGS),
                   help=f"comma-separated subset of {', '.join(CONFIGS)} (default: all)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="weights and compute")
    p.add_argument("--threads", type=int_range(min=1), default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--batch", type=int_range(min=1), default=16, help="teachers: sequences per step (default 16)")
    p.add_argument("--seq-len", type=int_range(min=2), default=256, help="teachers: tokens per sequence (default 256)")
    p.add_argument("--real-batch", type=int_range(min=1), default=2, help="real widths: sequences (default 2)")
    p.add_argument("--real-seq-len", type=int_range(min=2), default=256, help="real widths: tokens per sequence")
    p.add_argument("--real-layers", type=int_range(min=1, max=8), default=1, help="real widths: layers (default 1)")
    p.add_argument("--real-vocab", type=int_range(min=16), default=8192,
                   help="real widths: vocabulary (default 8192; the published 151936 makes the head dominate)")
    p.add_argument("--hf-experts", type=comma_list(HF_EXPERTS), default=["grouped_mm"],
                   help="transformers experts_implementation(s) to time; the fastest is the reference "
                   "(default grouped_mm, transformers' own default and its fastest on CPU)")
    p.add_argument("--backends", type=comma_list(ZEDA_BACKENDS), default=None,
                   help="zeda expert backends (default: loop,grouped_mm on the teachers, the auto one at real widths)")
    p.add_argument("--heads", type=comma_list(HEADS), default=list(HEADS),
                   help="zeda loss heads: chunked (the trainers'), logits (as transformers)")
    p.add_argument("--zero-share", type=float_range(min=0, below=1), default=0.5,
                   help="dynamic model: target share of zero slots (default 0.5)")
    p.add_argument("--warmup", type=int_range(min=0), default=None,
                   help="untimed steps per row (default: 2 on the teachers, 1 at real widths)")
    p.add_argument("--repeats", type=int_range(min=1), default=None,
                   help="timed steps per row, median (default: 5 on the teachers, 3 at real widths)")
    p.add_argument("--profile", type=int_range(min=0), default=0, metavar="N",
                   help="profile one step per model, print the N ops with the most self CPU time (default 0: off)")
    p.add_argument("--reuse-freed-memory", action=argparse.BooleanOptionalAction, default=True,
                   help="glibc mallopt: no mmap for big blocks, no trimming, so steps reuse pages instead of "
                   "page-faulting fresh gradient buffers (default: on; see the module docstring)")
    p.add_argument("--workdir", type=Path, default=None, help="where checkpoints are written (default: a temp dir)")
    p.add_argument("--smoke", action="store_true",
                   help="seconds: both teachers, batch 2 x 32 tokens, no warm-up, one repeat")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    if args.smoke:
        args.configs = [c for c in args.configs if c in TEACHERS] or list(TEACHERS)
        args.batch, args.seq_len, args.warmup, args.repeats = 2, 32, 0, 1
        args.reuse_freed_memory = False  # toy tensors; and a smoke run (the test) leaves its process's malloc alone
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    if any(c in REAL for c in args.configs) and "batched_mm" in args.hf_experts:
        p.error("--hf-experts batched_mm: not at real widths (it gathers a [2I, H] weight per slot: ~100 GB)")
    if args.reuse_freed_memory and not reuse_freed_memory():
        log("mallopt is not available (not glibc): every step maps fresh pages")
        args.reuse_freed_memory = False
    log(f"{args.dtype}, {torch.get_num_threads()} torch threads"
        + (", freed memory kept for reuse (mallopt)" if args.reuse_freed_memory else ""))

    report = {"machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M"), "dtype": args.dtype,
              "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "configs": {}, "rows": [], "profiles": {}}
    with tempfile.TemporaryDirectory(prefix="zeda-train-step-", dir=args.workdir) as tmp:
        for name in args.configs:
            desc, rows, profiles = bench_config(name, args, dtype, Path(tmp))
            report["configs"][name], report["profiles"][name] = desc, profiles
            report["rows"] += rows
            log(table(rows))
    log("\n" + table(report["rows"]))
    if args.profile:
        log(profile_text(report["profiles"]))
    if args.json:
        write_json_atomic(args.json, report)
        log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
