"""Triton MoE kernels (zeda/kernels) against a dumb per-slot Python loop: output and every gradient.

Without a GPU the kernels run under Triton's interpreter (TRITON_INTERPRET=1, set below before anything imports
triton). The interpreter pays per program, so shapes are tiny and odd; a few tests force 16-wide tiles so that
experts span several M-tiles and tiles end mid-expert (the classic tile-straddling bug of grouped GEMMs).

Shape letters: T tokens, K top-k, N real experts, Z zero experts (ids N .. N+Z-1), H hidden, I intermediate.
"""

import inspect
import os
import shutil
import subprocess
import sys
import textwrap

import torch

if not torch.cuda.is_available():  # must happen before triton (and so zeda.kernels) is imported
    os.environ["TRITON_INTERPRET"] = "1"

import pytest
import torch.nn.functional as F
from hypothesis import Phase, given, settings
from hypothesis import strategies as st

pytest.importorskip("triton")

from zeda.kernels import triton_available, triton_moe
from zeda.kernels.grouped_gemm import TileConfig
from zeda.kernels.permute import moe_permute

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# 16-row tiles (tl.dot's minimum); wide N/K tiles, since only the row tiling can straddle experts.
SHORT_TILES = TileConfig(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=1)


# ------------------------------------------------------------------------------------------------ helpers


def reference_moe(x_TH, weights_TK, ids_TK, gate_up_proj, down_proj):
    """The semantics, one slot at a time, in fp32: y[t] = sum_k [e < N] w[t,k] down[e] (silu(gate[e] x) * up[e] x),
    gate and up the two halves of gate_up_proj [N, 2I, H]."""
    gate_proj, up_proj = gate_up_proj.chunk(2, dim=1)
    N = gate_proj.shape[0]
    T, K = ids_TK.shape
    rows = []
    for t in range(T):
        acc = torch.zeros(x_TH.shape[1], dtype=torch.float32, device=x_TH.device)
        for k in range(K):
            e = int(ids_TK[t, k])
            if e >= N:  # zero expert: contributes nothing
                continue
            xt = x_TH[t].float()
            h = F.silu(gate_proj[e].float() @ xt) * (up_proj[e].float() @ xt)  # [I]
            acc = acc + weights_TK[t, k] * (down_proj[e].float() @ h)  # [H]
        rows.append(acc)
    return torch.stack(rows)


def make_routing(T, K, N, Z, zero_share, gen, skip_experts=(), hot_expert=None):
    """ids_TK [T, K] with distinct ids per row; about zero_share of the slots on zero experts (ids >= N)."""
    ids = torch.empty(T, K, dtype=torch.int64)
    real = [e for e in range(N) if e not in skip_experts]
    for t in range(T):
        row = []
        for _ in range(K):
            use_zero = Z > 0 and float(torch.rand(1, generator=gen)) < zero_share
            pool = [e for e in (range(N, N + Z) if use_zero else real) if e not in row]
            if not pool:
                pool = [e for e in list(range(N + Z)) if e not in row and e not in skip_experts]
            if hot_expert is not None and hot_expert not in row and not use_zero:
                row.append(hot_expert)  # one expert gets most tokens: several M-tiles, a partial last one
                continue
            row.append(pool[int(torch.randint(len(pool), (1,), generator=gen))])
        ids[t] = torch.tensor(row)
    return ids


def make_case(T, K, N, Z, H, I, zero_share=0.5, seed=0, dtype=torch.float32, **routing):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=gen)
    logits = torch.randn(T, K, generator=gen)
    weights = logits.softmax(-1)  # fp32, zero slots keep their share (docs/method.md §2)
    ids = make_routing(T, K, N, Z, zero_share, gen, **routing)
    gate_up = torch.randn(N, 2 * I, H, generator=gen) / H**0.5  # gate rows, then up rows
    down = torch.randn(N, H, I, generator=gen) / I**0.5
    dy = torch.randn(T, H, generator=gen)
    cast = [t.to(DEVICE, dtype) for t in (x, gate_up, down)]
    return cast[0], weights.to(DEVICE), ids.to(DEVICE), cast[1], cast[2], dy.to(DEVICE, dtype)


def forward_backward(fn, x, weights, ids, gate_up, down, dy):
    """Output and the four gradients (x, weights, gate_up, down) of fn with fresh leaves."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, weights, gate_up, down)]
    y = fn(leaves[0], leaves[1], ids, *leaves[2:])
    if not y.requires_grad:  # the loop reference with every slot on a zero expert depends on nothing
        return y.detach(), tuple(torch.zeros_like(t) for t in leaves)
    grads = torch.autograd.grad(y, leaves, dy, allow_unused=True, materialize_grads=True)
    return y.detach(), grads


def assert_rel_close(actual, expected, tol, name):
    """max |a - e| <= tol * max(max |e|, 1): relative to the tensor's scale, robust to cancellation."""
    assert actual.shape == expected.shape, name
    err = (actual.float() - expected.float()).abs().max().item() if actual.numel() else 0.0
    scale = max(expected.float().abs().max().item() if expected.numel() else 0.0, 1.0)
    assert err <= tol * scale, f"{name}: max error {err:.3g} > {tol:g} * {scale:.3g}"


def check_against_reference(case, tol, config=None):
    x, weights, ids, gate_up, down, dy = case
    y, grads = forward_backward(lambda *a: triton_moe(*a, config=config), *case)
    assert y.dtype == x.dtype and y.shape == x.shape
    # The reference runs in fp32 on the same (possibly bf16-rounded) values.
    y_ref, grads_ref = forward_backward(reference_moe, x.float(), weights, ids, gate_up.float(), down.float(),
                                        dy.float())
    assert_rel_close(y, y_ref, tol, "y")
    for name, g, g_ref, leaf in zip(("dx", "dweights", "dgate_up", "ddown"), grads, grads_ref,
                                    (x, weights, gate_up, down)):
        assert g.dtype == leaf.dtype, name
        assert_rel_close(g, g_ref, tol, name)
    return y, grads


FP32_TOL, BF16_TOL = 1e-5, 3e-2


# -------------------------------------------------------------------------------------------------- tests


def test_triton_available():
    assert triton_available()


CASES = {
    # name: (T, K, N, Z, H, I, zero_share, routing kwargs)
    "ragged_empty_experts": (37, 4, 7, 4, 48, 40, 0.3, {"skip_experts": (1, 4), "hot_expert": 2}),
    "no_zero_routing": (37, 2, 5, 0, 48, 40, 0.0, {}),
    "one_token": (1, 4, 8, 4, 32, 24, 0.5, {}),
    "top1_odd_sizes": (20, 1, 4, 2, 33, 17, 0.4, {}),
    "multi_tile_H_I": (9, 2, 3, 3, 70, 65, 0.3, {}),  # two column tiles and two reduction chunks, masked
    "mostly_zero": (16, 4, 4, 8, 32, 24, 0.9, {}),
}


@pytest.mark.parametrize("name", list(CASES))
def test_matches_loop_fp32(name):
    T, K, N, Z, H, I, share, routing = CASES[name]
    check_against_reference(make_case(T, K, N, Z, H, I, share, seed=1, **routing), FP32_TOL)


@pytest.mark.parametrize("name", ["ragged_empty_experts", "one_token"])
def test_matches_loop_bf16(name):
    T, K, N, Z, H, I, share, routing = CASES[name]
    check_against_reference(make_case(T, K, N, Z, H, I, share, seed=2, dtype=torch.bfloat16, **routing), BF16_TOL)


def test_tiles_never_straddle_experts():
    """16-row tiles over experts of ~0..60 rows: most tiles end mid-expert or hold an expert's tail."""
    case = make_case(37, 4, 6, 3, 40, 36, 0.25, seed=3, skip_experts=(3,), hot_expert=0)
    check_against_reference(case, FP32_TOL, config=SHORT_TILES)


def test_all_zero_routing():
    """Every slot on a zero expert: output exactly zero, every gradient exactly zero, no GEMM rows."""
    T, K, N, Z, H, I = 11, 3, 4, 4, 32, 24
    x, weights, _, gate_up, down, dy = make_case(T, K, N, Z, H, I, seed=4)
    ids = torch.stack([torch.randperm(Z)[:K] + N for _ in range(T)]).to(DEVICE)  # [T, K], all >= N
    y, grads = forward_backward(triton_moe, x, weights, ids, gate_up, down, dy)
    assert torch.equal(y, torch.zeros_like(y))
    for g in grads:
        assert torch.equal(g, torch.zeros_like(g))
    perm = moe_permute(ids, N)
    assert perm.expert_offsets_N1.tolist() == [0] * (N + 1)
    assert torch.equal(perm.slot_row_S, torch.full_like(perm.slot_row_S, -1))


def test_duplicate_ids_in_a_row():
    """Real routers pick distinct ids per row, but nothing in the kernels relies on it."""
    x, weights, ids, gate_up, down, dy = make_case(10, 3, 3, 2, 32, 24, 0.3, seed=10)
    ids[:, 1] = ids[:, 0]  # slot 1 repeats slot 0 (a real or a zero expert)
    check_against_reference((x, weights, ids, gate_up, down, dy), FP32_TOL)


def test_zero_slots_are_never_read():
    """NaN in the x rows of tokens routed only to zero experts, and NaN router weights on every zero slot:
    if any zero slot reached a permute buffer, tile or combine, NaN would leak into y or a gradient."""
    T, K, N, Z, H, I = 24, 2, 4, 4, 32, 24
    x, weights, ids, gate_up, down, dy = make_case(T, K, N, Z, H, I, 0.5, seed=5)
    ids[:6] = torch.tensor([N, N + 1], device=DEVICE)  # tokens 0..5 are all-zero
    x[:6] = float("nan")
    weights = torch.where(ids >= N, float("nan"), weights)
    y, grads = forward_backward(triton_moe, x, weights, ids, gate_up, down, dy)
    assert torch.isfinite(y).all() and all(torch.isfinite(g).all() for g in grads)
    assert torch.equal(y[:6], torch.zeros_like(y[:6]))
    assert torch.equal(grads[0][:6], torch.zeros_like(grads[0][:6]))  # dx of never-read tokens
    assert torch.equal(grads[1][ids >= N], torch.zeros_like(grads[1][ids >= N]))  # dweights of zero slots
    y_ref = reference_moe(x[6:], weights[6:], ids[6:], gate_up, down)
    assert_rel_close(y[6:], y_ref, FP32_TOL, "y")


def test_permute_keeps_exactly_the_real_slots():
    """Counting sort: M = number of real slots, rows grouped by expert in slot order, zero slots absent."""
    T, K, N, Z = 300, 4, 7, 5  # S = 1200 slots: several permute blocks
    gen = torch.Generator().manual_seed(6)
    ids = make_routing(T, K, N, Z, 0.4, gen, skip_experts=(5,)).to(DEVICE)
    for ids_in in (ids, ids.int()):  # topk gives int64; int32 ids work too
        perm = moe_permute(ids_in, N)
        flat = ids.view(-1).cpu()
        real_slots = (flat < N).nonzero().squeeze(1)
        M = real_slots.numel()
        offsets = perm.expert_offsets_N1.cpu()
        assert offsets[-1].item() == M
        assert torch.equal(offsets.diff(), torch.bincount(flat[flat < N], minlength=N).int())
        rows = perm.row_slot_S[:M].cpu().long()  # exactly the rows the GEMM tiles cover
        expected = torch.cat([(flat == e).nonzero().squeeze(1) for e in range(N)])  # by expert, then slot
        assert torch.equal(rows, expected)
        assert (flat[rows] < N).all()
        slot_row = perm.slot_row_S.cpu().long()
        assert torch.equal(slot_row[rows], torch.arange(M))
        assert (slot_row[flat >= N] == -1).all()


def test_deterministic():
    """Two runs are bit-identical: stable sort, fixed-order combine, per-expert row reductions, no atomics."""
    case = make_case(37, 4, 5, 3, 40, 36, 0.3, seed=7)
    y1, g1 = forward_backward(triton_moe, *case)
    y2, g2 = forward_backward(triton_moe, *case)
    assert torch.equal(y1, y2)
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)


def test_inference_and_partial_grads():
    """no_grad skips the saved pre-activations; a stride-0 upstream gradient (y.sum()) and grads w.r.t.
    a subset of the inputs work."""
    x, weights, ids, gate_up, down, _ = make_case(13, 2, 3, 2, 32, 24, 0.3, seed=8)
    y_ref = reference_moe(x, weights, ids, gate_up, down)
    with torch.no_grad():
        assert_rel_close(triton_moe(x, weights, ids, gate_up, down), y_ref, FP32_TOL, "y no_grad")
    xg = x.clone().requires_grad_()
    triton_moe(xg, weights, ids, gate_up, down).sum().backward()  # expanded (stride-0) dy
    xr = x.clone().requires_grad_()
    reference_moe(xr, weights, ids, gate_up, down).sum().backward()
    assert_rel_close(xg.grad, xr.grad, FP32_TOL, "dx")


# No shrinking: each example costs ~1 s in the interpreter; a failure prints its arguments anyway.
@settings(max_examples=10, deadline=None, derandomize=True, phases=[Phase.explicit, Phase.generate])
@given(T=st.integers(1, 12), K=st.integers(1, 3), N=st.integers(1, 5), Z=st.integers(0, 3),
       H=st.integers(16, 40), I=st.integers(16, 40), share=st.sampled_from([0.0, 0.3, 0.7, 1.0]),
       seed=st.integers(0, 2**16))
def test_property_random_shapes(T, K, N, Z, H, I, share, seed):
    K = min(K, N + Z)  # ids within a row are distinct
    check_against_reference(make_case(T, K, N, Z, H, I, share, seed=seed), FP32_TOL, config=SHORT_TILES)


def test_matches_zeda_moe_routed_experts_forward():
    """zeda/moe.py's loop backend and the fused path agree, forward and all gradients."""
    from zeda.moe import routed_experts_forward

    case = make_case(29, 4, 6, 3, 32, 24, 0.4, seed=9)
    y, grads = forward_backward(triton_moe, *case)
    y_ref, grads_ref = forward_backward(lambda *a: routed_experts_forward(*a, backend="loop"), *case)
    assert_rel_close(y, y_ref, FP32_TOL, "y")
    for name, g, g_ref in zip(("dx", "dweights", "dgate_up", "ddown"), grads, grads_ref):
        assert_rel_close(g, g_ref, FP32_TOL, name)


def _compile_all_for_sm90():
    """Run in a subprocess without TRITON_INTERPRET: compile every kernel, at every tile config tile_config can
    return, for an H100 (sm_90) -- no GPU needed -- and check the shared memory fits (227 KiB per block)."""
    from triton import compile as triton_compile
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from zeda.kernels import grouped_gemm as G
    from zeda.kernels import permute as P
    from zeda.kernels.moe_triton import tile_config

    int_ptrs = {"row_slot_ptr", "offsets_ptr", "slot_row_ptr", "counts_ptr", "base_ptr"}
    fp32_ptrs = {"weights_ptr", "dw_part_ptr"}

    def compile_one(fn, dtype, constexprs, num_warps=4, num_stages=1):
        sig = {}
        for name, param in zip(fn.arg_names, fn.params):
            if param.is_constexpr:
                sig[name] = "constexpr"
            elif not name.endswith("_ptr"):
                sig[name] = "i32"
            else:
                sig[name] = ("*i32" if name in int_ptrs else "*fp32" if name in fp32_ptrs
                             else "*i64" if name == "ids_ptr" else "*" + dtype)
        kernel = triton_compile(ASTSource(fn, sig, constexprs), target=GPUTarget("cuda", 90, 32),
                                options={"num_warps": num_warps, "num_stages": num_stages})
        assert kernel.metadata.shared <= 232448, f"{fn.__name__} {constexprs}: {kernel.metadata.shared} B smem"

    for dtype, torch_dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        prec = G._dot_precision(torch_dtype)
        for T in (1, 4096):  # decode and prefill configs
            cfg = tile_config(T, 8, torch_dtype)
            common = {"INTERPRET": False, "PRECISION": prec,
                      "BLOCK_M": cfg.BLOCK_M, "BLOCK_N": cfg.BLOCK_N, "BLOCK_K": cfg.BLOCK_K}
            launch = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
            compile_one(G._gate_up_kernel, dtype, {"K": 8, "N_PAD": 128, "SAVE_PREACT": True, **common}, **launch)
            compile_one(G._rows_gemm_kernel, dtype, {"N_PAD": 128, "TWO": True, **common}, **launch)
            compile_one(G._down_bwd_kernel, dtype, {"K": 8, "N_PAD": 128, **common}, **launch)
            compile_one(G._wgrad_kernel, dtype, {"K": 8, "GATHER_L": False, "GATHER_R": True, "TWO": True, **common},
                        **launch)
            if dtype == "bf16":  # the other variant and the combine differ from fp32 only in loads and stores
                compile_one(G._wgrad_kernel, dtype,
                            {"K": 8, "GATHER_L": True, "GATHER_R": False, "TWO": False, **common}, **launch)
    compile_one(P._combine_kernel, "bf16", {"K": 8, "HAS_WEIGHTS": True, "BLOCK_T": 16, "BLOCK_H": 256})
    compile_one(P._histogram_kernel, "i64", {"N_PAD": 128, "BLOCK_S": P.PERMUTE_BLOCK_S})
    compile_one(P._scatter_kernel, "i64", {"N_PAD": 128, "BLOCK_S": P.PERMUTE_BLOCK_S})


def test_kernels_compile_for_h100():
    """The interpreter skips Triton's compiler; this catches what only compilation sees (constexpr control
    flow, tl.dot shape limits, shared memory per tile config). ~1 min cold, seconds with Triton's cache warm."""
    import triton

    if torch.cuda.is_available():
        pytest.skip("on a GPU every other test already runs compiled kernels")
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not (os.path.exists(ptxas) or shutil.which("ptxas")):
        pytest.skip("no ptxas to compile with")
    code = textwrap.dedent(inspect.getsource(_compile_all_for_sm90)) + "\n_compile_all_for_sm90()\n"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    result = subprocess.run([sys.executable, "-c", "import torch\n" + code], env=env, capture_output=True,
                            text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
