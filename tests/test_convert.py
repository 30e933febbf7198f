"""convert.py / zeda.conversion (docs/method.md §1): a static checkpoint in, a dynamic one out, nothing else touched.

On tiny random checkpoints of both architectures, single and multi-shard: the converted model with
use_zce_mask=True gives exactly the original logits; router rows 0..N-1 and every other tensor are
byte-identical; the new rows follow the per-dimension statistics of the old ones; the seed reproduces the
output byte for byte; config.json, the index and the side files are right. Every refusal leaves nothing
behind, and so does an interrupted run; a run (or a save_checkpoint) killed with kill -9 leaves a temporary
folder that the next write of the same output removes. GLM's MTP layer's router grows like the others. The
memory test runs bench/convert_memory.py at a small size.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import zeda
import zeda.checkpoint
from zeda import conversion
from zeda.config import ModelConfig
from zeda.conversion import convert_checkpoint
from zeda.errors import UsageError, ZedaError
from zeda_toy.tiny import make_tiny_checkpoint

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # convert.py and bench/ live in the repository root, not in the package
    sys.path.insert(0, str(ROOT))

import convert  # noqa: E402
from bench import convert_memory  # noqa: E402

ARCHS = ("qwen3_moe", "glm4_moe_lite")
Z = 4  # zero experts added to the tiny checkpoints (N = 8 real ones)
DYNAMIC_NAMES = {"qwen3_moe": "Qwen3MoePlusPlusForCausalLM", "glm4_moe_lite": "Glm4MoeLitePlusPlusForCausalLM"}
ROUTER = re.compile(r"^model\.layers\.\d+\.mlp\.gate\.(weight|e_score_correction_bias)$")
TOKENIZER_CONFIG = '{"model_max_length": 128, "tokenizer_class": "PreTrainedTokenizerFast"}\n'


# ----------------------------------------------------------------------------------------------
# helpers


def folder_bytes(folder: Path) -> dict[str, bytes]:
    """Every file of a folder (recursively) by relative path: two folders are equal iff these are."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def tensors_by_key(folder: Path) -> dict[str, tuple[str, torch.Tensor]]:
    """key -> (shard file name, tensor), over every safetensors shard of a folder."""
    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                assert key not in out, f"{key} is in two shards"
                out[key] = (path.name, f.get_tensor(key))
    return out


def raw(t: torch.Tensor) -> torch.Tensor:
    """The bytes of a tensor, so that equality is bit equality (-0.0 != 0.0, NaN == same NaN)."""
    return t.contiguous().reshape(-1).view(torch.uint8)


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(raw(a), raw(b))


def leftovers(out: Path) -> list[str]:
    """Temporary or backup folders convert may have left next to `out`."""
    out = out.resolve()
    return sorted(p.name for p in out.parent.iterdir() if re.match(rf"^\.{re.escape(out.name)}\.(tmp|old)-", p.name))


def num_experts(folder: Path) -> int:
    return ModelConfig.from_hf_config(folder).num_experts


def random_batch(seed: int = 0):
    """ids [3, 11] over the tiny vocabulary, and an attention mask with one left-padded row."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 96, (3, 11), generator=g)
    mask = torch.ones(3, 11, dtype=torch.long)
    mask[1, :4] = 0
    return ids, mask


# ----------------------------------------------------------------------------------------------
# fixtures: tiny static checkpoints and their conversions, built once per session


@pytest.fixture(scope="session")
def static_ckpt(tmp_path_factory):
    """static_ckpt(model_type, shards, **overrides) -> a tiny HF checkpoint with a dummy tokenizer_config.json.

    Shared by tests: a test that edits an input copies it first.
    """
    cache = {}

    def make(model_type: str, shards: int = 1, **overrides) -> Path:
        key = (model_type, shards, tuple(sorted(overrides.items())))
        if key not in cache:
            path = tmp_path_factory.mktemp(f"{model_type}-{shards}shards")
            make_tiny_checkpoint(path, model_type, seed=1, shards=shards, **overrides)
            (path / "tokenizer_config.json").write_text(TOKENIZER_CONFIG)
            assert (path / "generation_config.json").exists()  # transformers writes one; it must be copied too
            cache[key] = path
        return cache[key]

    return make


@pytest.fixture(scope="session")
def converted(static_ckpt, tmp_path_factory):
    """converted(model_type, shards) -> (input, output, summary, input bytes before): Z zero experts, seed 0."""
    cache = {}

    def make(model_type: str, shards: int = 1):
        if (model_type, shards) not in cache:
            src = static_ckpt(model_type, shards)
            before = folder_bytes(src)
            out = tmp_path_factory.mktemp("converted") / f"{model_type}-{shards}shards-zeda"
            summary = convert_checkpoint(src, out, num_zero=Z, seed=0, progress=False)
            cache[model_type, shards] = (src, out, summary, before)
        return cache[model_type, shards]

    return make


# ----------------------------------------------------------------------------------------------
# the growth rules on their own


@settings(max_examples=40, deadline=None)
@given(n=st.integers(2, 12), h=st.integers(1, 10), z=st.integers(1, 12), seed=st.integers(0, 2**31 - 1),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
       scale=st.floats(1e-3, 10.0), shift=st.floats(-10.0, 10.0))
def test_grow_router_weight_copies_rows_and_is_seeded(n, h, z, seed, dtype, scale, shift):
    """[N, H] -> [N + Z, H] in the input dtype: old rows bit-identical, new rows finite, same seed same rows."""
    w = (torch.randn(n, h, generator=torch.Generator().manual_seed(seed)) * scale + shift).to(dtype)
    w_before = w.clone()
    grown = conversion.grow_router_weight(w, z, torch.Generator().manual_seed(seed))
    assert grown.shape == (n + z, h) and grown.dtype == dtype
    assert same_bytes(grown[:n], w) and same_bytes(w, w_before)  # copied, and the input left alone
    assert torch.isfinite(grown[n:].float()).all()
    assert same_bytes(grown, conversion.grow_router_weight(w, z, torch.Generator().manual_seed(seed)))


@settings(max_examples=40, deadline=None)
@given(n=st.integers(2, 64), z=st.integers(1, 64), seed=st.integers(0, 2**31 - 1),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), scale=st.floats(0.0, 5.0), shift=st.floats(-5, 5))
def test_grow_correction_bias_copies_entries_and_is_seeded(n, z, seed, dtype, scale, shift):
    """[N] -> [N + Z]: old entries bit-identical, new ones finite (also when all N are equal), seeded."""
    b = (torch.randn(n, generator=torch.Generator().manual_seed(seed)) * scale + shift).to(dtype)
    grown = conversion.grow_correction_bias(b, z, torch.Generator().manual_seed(seed))
    assert grown.shape == (n + z,) and grown.dtype == dtype
    assert same_bytes(grown[:n], b) and torch.isfinite(grown[n:].float()).all()
    assert same_bytes(grown, conversion.grow_correction_bias(b, z, torch.Generator().manual_seed(seed)))


# ----------------------------------------------------------------------------------------------
# a converted checkpoint: the model, the tensors, the files


@pytest.mark.parametrize("shards", [1, 3])
@pytest.mark.parametrize("model_type", ARCHS)
def test_masked_conversion_gives_exactly_the_original_logits(converted, model_type, shards):
    """use_zce_mask=True makes the converted model the original static MoE, bit for bit (docs/method.md §1)."""
    src, out, _, _ = converted(model_type, shards)
    original, masked = zeda.load_model(src), zeda.load_model(out, use_zce_mask=True)
    ids, mask = random_batch()
    routing = []
    with torch.no_grad():
        assert torch.equal(original(ids, mask), masked(ids, mask, routing=routing))
    assert routing and all((r.ids_TK < num_experts(src)).all() for r in routing)  # no zero expert chosen


@pytest.mark.parametrize("shards", [1, 3])
@pytest.mark.parametrize("model_type", ARCHS)
def test_only_router_tensors_change(converted, model_type, shards):
    """Same keys in the same shard files; router rows 0..N-1 (and GLM bias entries) bit-identical, Z new ones
    finite; every other tensor byte-identical; the input folder untouched."""
    src, out, summary, before = converted(model_type, shards)
    N = num_experts(src)
    old, new = tensors_by_key(src), tensors_by_key(out)
    assert {k: shard for k, (shard, _) in new.items()} == {k: shard for k, (shard, _) in old.items()}
    changed = []
    for key, (_, t) in old.items():
        grown = new[key][1]
        if ROUTER.match(key):
            changed.append(key)
            assert grown.dtype == t.dtype and grown.shape == (N + Z, *t.shape[1:])
            assert same_bytes(grown[:N], t), key
            assert torch.isfinite(grown[N:]).all(), key
            assert not any(torch.equal(new_row, old_row) for new_row in grown[N:] for old_row in t), key  # sampled
        else:
            assert same_bytes(grown, t), key
    moe_layers = ModelConfig.from_hf_config(src).num_moe_layers
    assert len(changed) == summary["tensors_changed"] == moe_layers * (2 if model_type == "glm4_moe_lite" else 1)
    assert folder_bytes(src) == before


@pytest.mark.parametrize("model_type", ARCHS)
def test_index_lists_every_key_and_counts_the_new_rows(converted, model_type):
    """The multi-shard index maps every key to its shard; total_size (and transformers' total_parameters,
    which counts parameters, not the GLM bias buffer) grow by exactly what was added."""
    src, out, _, _ = converted(model_type, 3)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    old_index = json.loads((src / "model.safetensors.index.json").read_text())
    tensors = tensors_by_key(out)
    assert index["weight_map"] == {k: shard for k, (shard, _) in tensors.items()} == old_index["weight_map"]
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for _, t in tensors.values())
    cfg = ModelConfig.from_hf_config(src)
    added_params = cfg.num_moe_layers * Z * cfg.hidden_size
    assert index["metadata"]["total_parameters"] == old_index["metadata"]["total_parameters"] + added_params


@pytest.mark.parametrize("model_type", ARCHS)
def test_side_files_are_copied(converted, model_type):
    """tokenizer and generation configs come along byte-identical; nothing else appears or disappears, but the
    modeling file that lets transformers load the checkpoint (zeda/hf)."""
    src, out, summary, _ = converted(model_type, 3)
    assert sorted(p.name for p in out.iterdir()) == sorted([p.name for p in src.iterdir()] + ["modeling_zeda.py"])
    for name in ("tokenizer_config.json", "generation_config.json"):
        assert (out / name).read_bytes() == (src / name).read_bytes()
    assert summary["files_copied"] == ["generation_config.json", "tokenizer_config.json"]


@pytest.mark.parametrize("model_type", ARCHS)
def test_config_keeps_every_field_and_adds_the_zero_experts(converted, model_type):
    """The authors' format: original fields kept, zce_nums/zce_types/use_zce_mask added, architecture renamed;
    auto_map names modeling_zeda.py's classes (zeda/hf)."""
    src, out, _, _ = converted(model_type, 1)
    old, new = json.loads((src / "config.json").read_text()), json.loads((out / "config.json").read_text())
    assert set(new) == set(old) | {"zce_nums", "zce_types", "use_zce_mask", "auto_map"}
    assert {k: v for k, v in new.items() if k in old and k != "architectures"} == {
        k: v for k, v in old.items() if k != "architectures"}
    assert new["zce_nums"] == [Z] and new["zce_types"] == ["zero"] and new["use_zce_mask"] is False
    assert new["architectures"] == [DYNAMIC_NAMES[model_type]]


@pytest.mark.parametrize("n_key", ["num_experts", "num_local_experts"])
def test_num_experts_stays_under_the_key_the_input_used(static_ckpt, tmp_path, n_key):
    """Qwen3-30B-A3B's own config.json says num_experts, transformers 5.x writes num_local_experts: keep it."""
    src = tmp_path / "in"
    shutil.copytree(static_ckpt("qwen3_moe"), src)
    hf = json.loads((src / "config.json").read_text())
    hf[n_key] = hf.pop("num_local_experts")
    (src / "config.json").write_text(json.dumps(hf, indent=2))
    convert_checkpoint(src, tmp_path / "out", num_zero=Z, progress=False)
    new = json.loads((tmp_path / "out" / "config.json").read_text())
    other = {"num_experts", "num_local_experts"} - {n_key}
    assert new[n_key] == 8 and not other & set(new)
    ids, mask = random_batch(1)
    with torch.no_grad():
        assert torch.equal(zeda.load_model(src)(ids, mask), zeda.load_model(tmp_path / "out", use_zce_mask=True)(
            ids, mask))


@pytest.mark.parametrize("model_type", ARCHS)
def test_new_num_experts_and_num_zero_experts_agree(converted, tmp_path, model_type):
    """--new-num-experts N+Z (the authors' flag) and --num-zero-experts Z write the same bytes."""
    src, out, _, _ = converted(model_type, 1)
    convert_checkpoint(src, tmp_path / "m", new_num_experts=num_experts(src) + Z, seed=0, progress=False)
    assert folder_bytes(tmp_path / "m") == folder_bytes(out)


@pytest.mark.parametrize("model_type", ARCHS)
def test_seed_reproduces_bytes_and_another_seed_changes_only_new_rows(converted, tmp_path, model_type):
    """Same seed: the same bytes in every file. Another seed: new router rows and bias entries differ, the rest not."""
    src, out, _, _ = converted(model_type, 3)
    convert_checkpoint(src, tmp_path / "again", num_zero=Z, seed=0, progress=False)
    assert folder_bytes(tmp_path / "again") == folder_bytes(out)
    convert_checkpoint(src, tmp_path / "seed1", num_zero=Z, seed=1, progress=False)
    N = num_experts(src)
    seed0, seed1 = tensors_by_key(out), tensors_by_key(tmp_path / "seed1")
    for key, (_, t) in seed0.items():
        t1 = seed1[key][1]
        if ROUTER.match(key):
            assert same_bytes(t[:N], t1[:N])
            assert (t[N:] != t1[N:]).reshape(Z, -1).any(1).all(), key  # every new row (or bias entry) moved
        else:
            assert same_bytes(t, t1), key


@pytest.mark.parametrize("model_type", ARCHS)
def test_layout_does_not_change_the_result(converted, model_type):
    """The same model in 1 and in 3 shards converts to the same tensors: one generator per (layer, tensor)."""
    one, three = tensors_by_key(converted(model_type, 1)[1]), tensors_by_key(converted(model_type, 3)[1])
    assert one.keys() == three.keys()
    assert all(same_bytes(one[k][1], three[k][1]) for k in one)


@pytest.mark.parametrize("model_type", ARCHS)
def test_new_rows_follow_the_per_dimension_statistics(static_ckpt, tmp_path, model_type):
    """New router rows ~ N(mean_h, std_h) with mean and std across the N original rows, per hidden dim h;
    new GLM bias entries ~ N(mean, std) of the N original entries.

    The input router rows get a different mean and std in every hidden dim (std spanning 10x), so statistics
    taken over the whole matrix instead of per dimension would fail. N = Z = 64, H = 64; tolerances are 5
    standard errors per dimension (mean: std_h / sqrt(Z); std ratio: 1 / sqrt(2 (Z - 1))).
    """
    N = H = n_zero = 64
    n_key = "num_experts" if model_type == "qwen3_moe" else "n_routed_experts"
    src = tmp_path / "in"
    shutil.copytree(static_ckpt(model_type, **{n_key: N, "hidden_size": H}), src)
    g = torch.Generator().manual_seed(7)
    mean_H = torch.linspace(-0.05, 0.05, H)[torch.randperm(H, generator=g)]
    std_H = torch.linspace(0.005, 0.05, H)[torch.randperm(H, generator=g)]
    tensors = load_file(src / "model.safetensors")
    for key in tensors:
        if key.endswith("mlp.gate.weight"):
            tensors[key] = mean_H + std_H * torch.randn(N, H, generator=g)  # [N, H]
        if key.endswith("e_score_correction_bias"):
            tensors[key] = 0.3 + 0.07 * torch.randn(N, generator=g)
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    convert_checkpoint(src, tmp_path / "out", num_zero=n_zero, seed=3, progress=False)

    checked = 0
    for key, (_, grown) in tensors_by_key(tmp_path / "out").items():
        if not ROUTER.match(key):
            continue
        old, new = grown[:N].double(), grown[N:].double()
        m, s = old.mean(0), old.std(0)  # per hidden dim for the weight, a scalar for the bias
        assert ((new.mean(0) - m).abs() < 5 * s / n_zero**0.5).all(), key
        assert ((new.std(0) / s - 1).abs() < 5 / (2 * (n_zero - 1)) ** 0.5).all(), key
        if grown.dim() == 2:  # per-dimension, not pooled: the new stats track the old ones across h
            assert torch.corrcoef(torch.stack([new.mean(0), m]))[0, 1] > 0.9, key
            assert torch.corrcoef(torch.stack([new.std(0), s]))[0, 1] > 0.9, key
        checked += 1
    assert checked == ModelConfig.from_hf_config(src).num_moe_layers * (2 if model_type == "glm4_moe_lite" else 1)


@pytest.mark.parametrize("model_type", ARCHS)
def test_converted_model_is_dynamic(converted, model_type):
    """As written (use_zce_mask false), the model routes some slots to zero experts and still runs."""
    src, out, _, _ = converted(model_type, 1)
    model = zeda.load_model(out)
    N = num_experts(src)
    assert not model.config.use_zce_mask and model.config.num_router_outputs == N + Z
    ids, mask = random_batch(2)
    routing = []
    with torch.no_grad():
        logits = model(ids, mask, routing=routing)
        original = zeda.load_model(src)(ids, mask)
    assert logits.shape == original.shape and torch.isfinite(logits).all()
    zero_slots = sum(int((r.ids_TK >= N).sum()) for r in routing)  # host sync
    assert 0 < zero_slots < sum(r.ids_TK.numel() for r in routing)
    assert not torch.equal(logits, original)  # a zero slot drops its expert: the output moves


# ----------------------------------------------------------------------------------------------
# GLM's MTP layer: its router grows too (the authors grow every router the checkpoint holds)


@pytest.mark.parametrize("shards", [1, 3])
def test_glm_mtp_layer_router_grows_too(static_ckpt, tmp_path, shards):
    """Layer num_hidden_layers is GLM's MTP layer (num_nextn_predict_layers 1): its router weight grows to
    [N + Z, H] and its correction bias to [N + Z], the first N rows copied bit for bit, the new ones drawn from
    its own generator (not a copy of another layer's); its other tensors are copied byte-identical. The
    converted folder loads (the MTP layer skipped) and with use_zce_mask=True gives exactly the original logits."""
    src = static_ckpt("glm4_moe_lite", shards, mtp_layers=1)
    cfg = ModelConfig.from_hf_config(src)
    L, N, H = cfg.num_hidden_layers, cfg.num_experts, cfg.hidden_size
    summary = convert_checkpoint(src, tmp_path / "out", num_zero=Z, seed=0, progress=False)
    old, new = tensors_by_key(src), tensors_by_key(tmp_path / "out")
    assert old.keys() == new.keys() and any(k.startswith(f"model.layers.{L}.eh_proj") for k in old)
    for kind, shape in (("weight", (N + Z, H)), ("e_score_correction_bias", (N + Z,))):
        key = f"model.layers.{L}.mlp.gate.{kind}"
        before, after = old[key][1], new[key][1]
        assert after.shape == shape and same_bytes(after[:N], before), key
        assert torch.isfinite(after[N:]).all(), key
        last_moe = new[f"model.layers.{L - 1}.mlp.gate.{kind}"][1]
        assert not torch.equal(after[N:], last_moe[N:]), key  # its own seeded generator
    for key, (_, t) in old.items():
        if not ROUTER.match(key):
            assert same_bytes(new[key][1], t), key
    assert summary["tensors_changed"] == 2 * (cfg.num_moe_layers + 1) and summary["mtp_tensors_changed"] == 2
    if shards > 1:  # the index counts the MTP layer's new router rows too
        index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
        old_index = json.loads((src / "model.safetensors.index.json").read_text())
        added = (cfg.num_moe_layers + 1) * Z * H
        assert index["metadata"]["total_parameters"] == old_index["metadata"]["total_parameters"] + added

    ids, mask = random_batch(3)
    with torch.no_grad():
        assert torch.equal(zeda.load_model(src)(ids, mask), zeda.load_model(tmp_path / "out", use_zce_mask=True)(
            ids, mask))
        assert torch.isfinite(zeda.load_model(tmp_path / "out")(ids, mask)).all()


def test_cli_reports_the_mtp_routers(static_ckpt, tmp_path, capsys):
    assert convert.main(cli_args(static_ckpt("glm4_moe_lite", 1, mtp_layers=1), tmp_path / "out",
                                 dict(num_zero=Z))) == 0
    line = capsys.readouterr().out.splitlines()[2]
    assert line.startswith("  tensors changed: 6 (router weights and correction biases, 2 of them in the MTP layer)")


def test_tiny_mtp_checkpoint_loads_in_transformers(static_ckpt):
    """transformers builds no MTP layer and loads the checkpoint without it (it reports the keys as unexpected):
    the tiny MTP checkpoint is a real GLM checkpoint to it, with our logits."""
    import transformers

    src = static_ckpt("glm4_moe_lite", 1, mtp_layers=1)
    hf = transformers.Glm4MoeLiteForCausalLM.from_pretrained(src).eval()
    ids, mask = random_batch(4)
    with torch.no_grad():
        diff = (hf(input_ids=ids).logits - zeda.load_model(src)(ids)).abs().max().item()
    assert diff <= 1e-4, diff


# ----------------------------------------------------------------------------------------------
# refusals: a clear message, exit code 2 from the CLI, and nothing written


def cli_args(src: Path, out: Path, kwargs: dict) -> list[str]:
    argv = ["--input-dir", str(src), "--output-dir", str(out)]
    if "num_zero" in kwargs:
        argv += ["--num-zero-experts", str(kwargs["num_zero"])]
    if "new_num_experts" in kwargs:
        argv += ["--new-num-experts", str(kwargs["new_num_experts"])]
    return argv + (["--overwrite"] if kwargs.get("overwrite") else [])


def copy_input(static_ckpt, tmp_path, model_type="qwen3_moe", shards=1) -> Path:
    src = tmp_path / "in"
    shutil.copytree(static_ckpt(model_type, shards), src)
    return src


def second_shard(src: Path) -> Path:
    """The second shard in index order: the first is already written to the temporary folder when it fails."""
    index = json.loads((src / "model.safetensors.index.json").read_text())
    return src / sorted(set(index["weight_map"].values()))[1]


def existing_output(static_ckpt, converted, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    return static_ckpt("qwen3_moe"), out, dict(num_zero=Z), r"out exists; pass --overwrite to replace it"


def already_converted(static_ckpt, converted, tmp_path):
    return converted("glm4_moe_lite", 1)[1], tmp_path / "out", dict(num_zero=Z), r"already converted"


def unsupported_model_type(static_ckpt, converted, tmp_path):
    src = copy_input(static_ckpt, tmp_path)
    hf = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps(hf | {"model_type": "llama"}))
    return src, tmp_path / "out", dict(num_zero=Z), r"model_type 'llama' is not supported"


def missing_shard(static_ckpt, converted, tmp_path):
    src = copy_input(static_ckpt, tmp_path, "glm4_moe_lite", 3)
    shard = second_shard(src)
    shard.unlink()
    return src, tmp_path / "out", dict(num_zero=Z), rf"{re.escape(shard.name)}: shard listed in .* is missing"


def truncated_shard(static_ckpt, converted, tmp_path):
    src = copy_input(static_ckpt, tmp_path, "qwen3_moe", 3)
    shard = second_shard(src)
    shard.write_bytes(shard.read_bytes()[:-100])
    return src, tmp_path / "out", dict(num_zero=Z), rf"{re.escape(shard.name)}: cannot read safetensors shard"


def garbage_shard(static_ckpt, converted, tmp_path):
    src = copy_input(static_ckpt, tmp_path, "glm4_moe_lite", 3)
    shard = second_shard(src)
    shard.write_bytes(bytes(range(256)) * 40)
    return src, tmp_path / "out", dict(num_zero=Z), rf"{re.escape(shard.name)}: cannot read safetensors shard"


def m_equals_n(static_ckpt, converted, tmp_path):
    return static_ckpt("qwen3_moe"), tmp_path / "out", dict(new_num_experts=8), r"must exceed the 8 real experts"


def m_below_n(static_ckpt, converted, tmp_path):
    return static_ckpt("glm4_moe_lite"), tmp_path / "out", dict(new_num_experts=5), r"must exceed the 8 real"


def zero_zero_experts(static_ckpt, converted, tmp_path):
    return static_ckpt("qwen3_moe"), tmp_path / "out", dict(num_zero=0), r"must exceed the 8 real experts"


def output_is_input(static_ckpt, converted, tmp_path):
    src = copy_input(static_ckpt, tmp_path)
    return src, src / ".." / "in", dict(num_zero=Z, overwrite=True), r"must differ from --input-dir"


def output_contains_input(static_ckpt, converted, tmp_path):
    """--overwrite on a parent of the input would delete the input after the rename: refused up front."""
    src = tmp_path / "models" / "in"
    shutil.copytree(static_ckpt("qwen3_moe"), src)
    return src, tmp_path / "models", dict(num_zero=Z, overwrite=True), r"not contain it"


def output_inside_input(static_ckpt, converted, tmp_path):
    """Accepted, a nested output was copied into every later conversion of the same input."""
    src = copy_input(static_ckpt, tmp_path)
    return src, src / "converted", dict(num_zero=Z), r"is inside --input-dir"


def output_is_a_link(static_ckpt, converted, tmp_path):
    """--overwrite onto a link used to fail after writing everything, leaving a backup folder behind."""
    target = tmp_path / "target"
    target.mkdir()
    (tmp_path / "link").symlink_to(target)
    return static_ckpt("qwen3_moe"), tmp_path / "link", dict(num_zero=Z, overwrite=True), r"is a symbolic link"


def too_many_zero_experts(static_ckpt, converted, tmp_path):
    """10^8 zero experts was a 51 GB allocation and a traceback."""
    return static_ckpt("qwen3_moe"), tmp_path / "out", dict(new_num_experts=100_000_000), r"at most 64 \(8 per real"


REFUSALS = [existing_output, already_converted, unsupported_model_type, missing_shard, truncated_shard,
            garbage_shard, m_equals_n, m_below_n, zero_zero_experts, output_is_input, output_contains_input,
            output_inside_input, output_is_a_link, too_many_zero_experts]


@pytest.mark.parametrize("case", REFUSALS, ids=lambda f: f.__name__)
def test_refusal_writes_nothing(static_ckpt, converted, tmp_path, capsys, case):
    """Each refusal, through the function and through the CLI's main(): same message, exit code 2 on stderr,
    no output folder (or the existing one untouched), the input untouched, no temporary folder left."""
    src, out, kwargs, message = case(static_ckpt, converted, tmp_path)
    src_before = folder_bytes(src)
    out_before = folder_bytes(out) if out.exists() else None
    with pytest.raises(ZedaError, match=message):
        convert_checkpoint(src, out, progress=False, **kwargs)
    try:
        code = convert.main(cli_args(src, out, kwargs))
    except SystemExit as e:  # a value outside the flag's declared range is refused by the parser itself
        code, message = e.code, r"argument --num-zero-experts: must be >= 1"
    assert code == 2
    captured = capsys.readouterr()
    last = captured.err.splitlines()[-1]  # after tqdm's progress bar, when a shard was already being read
    assert captured.out == "" and last.startswith("convert.py: error: ") and re.search(message, last)
    assert (folder_bytes(out) if out.exists() else None) == out_before
    assert folder_bytes(src) == src_before
    assert leftovers(out) == []


def test_giving_both_or_neither_count_is_refused(static_ckpt, tmp_path, capsys):
    src, out = static_ckpt("qwen3_moe"), tmp_path / "out"
    with pytest.raises(UsageError, match="exactly one of"):
        convert_checkpoint(src, out, num_zero=Z, new_num_experts=12, progress=False)
    with pytest.raises(SystemExit) as e:  # argparse: mutually exclusive flags
        convert.main(cli_args(src, out, dict(num_zero=Z, new_num_experts=12)))
    assert e.value.code == 2 and "not allowed with argument" in capsys.readouterr().err
    assert not out.exists()


def test_overwrite_replaces_an_existing_output(converted, tmp_path):
    src, reference, _, _ = converted("qwen3_moe", 3)
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("from an older run")
    convert_checkpoint(src, out, num_zero=Z, overwrite=True, progress=False)
    assert folder_bytes(out) == folder_bytes(reference) and leftovers(out) == []


@pytest.mark.parametrize("existing", [False, True])
def test_interrupted_conversion_leaves_nothing(converted, tmp_path, monkeypatch, existing):
    """A crash (Ctrl-C, a full disk) while writing the second shard: no output, no temporary folder; with
    --overwrite the previous output is still there, whole."""
    src, reference, _, _ = converted("glm4_moe_lite", 3)
    out = tmp_path / "out"
    if existing:
        shutil.copytree(reference, out)
    crash = OSError(28, "No space left on device") if existing else KeyboardInterrupt()
    calls = []

    def save_then_fail(tensors, filename, **kwargs):
        calls.append(filename)
        if len(calls) == 2:
            raise crash
        return save_file(tensors, filename, **kwargs)

    monkeypatch.setattr(zeda.checkpoint, "save_file", save_then_fail)  # under write_safetensors
    with pytest.raises(type(crash)):
        convert_checkpoint(src, out, num_zero=Z, overwrite=existing, progress=False)
    assert len(calls) == 2 and Path(calls[0]).parent.name.startswith(".out.tmp-")  # one shard was written
    assert (folder_bytes(out) == folder_bytes(reference)) if existing else not out.exists()
    assert leftovers(out) == []


# ----------------------------------------------------------------------------------------------
# the command line, as a real process


def test_cli_as_a_process(converted, static_ckpt, tmp_path):
    """`python convert.py --new-num-experts M` exits 0, prints the summary and writes the same bytes as
    convert(num_zero=M-N); a refusal exits 2 with the message on stderr. The two processes run side by side
    (each spends ~3 s importing torch)."""
    src, reference, _, _ = converted("glm4_moe_lite", 3)
    out, existing = tmp_path / "out", tmp_path / "existing"
    existing.mkdir()
    ok, refused = [subprocess.Popen([sys.executable, "convert.py", *cli_args(a, b, kwargs)], cwd=ROOT, text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                   for a, b, kwargs in [(src, out, dict(new_num_experts=8 + Z)),
                                        (static_ckpt("qwen3_moe"), existing, dict(num_zero=Z))]]
    (stdout, stderr), (refused_out, refused_err) = ok.communicate(timeout=120), refused.communicate(timeout=120)

    assert ok.returncode == 0, stderr
    lines = stdout.splitlines()
    assert lines[0] == f"converted glm4_moe_lite {src} -> {out}"
    assert lines[1] == f"  experts: 8 real -> 8 real + {Z} zero (8 -> {8 + Z} router outputs), top-k 2 kept"
    assert lines[2].startswith("  tensors changed: 4 (router weights and correction biases)")
    assert lines[2].endswith("from 4 shard(s)")
    assert lines[3] == "  files copied: generation_config.json, tokenizer_config.json"
    assert lines[4].startswith("  seed 0, ") and len(lines) == 5
    assert folder_bytes(out) == folder_bytes(reference)

    assert refused.returncode == 2 and refused_out == ""
    assert f"convert.py: error: {existing} exists; pass --overwrite to replace it" in refused_err
    assert list(existing.iterdir()) == [] and leftovers(existing) == []


# ----------------------------------------------------------------------------------------------
# kill -9: nothing can clean up, so the next write of the same output does (zeda.checkpoint.temporary_sibling)


def kill_mid_write(argv: list[str], out: Path, files: int = 1, timeout: float = 60) -> Path:
    """Start `argv` in the repository root, SIGKILL it as soon as the temporary folder of `out` holds `files`
    safetensors files, and return that folder (which the killed process could not remove)."""
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    found, deadline = None, time.monotonic() + timeout
    try:
        while found is None and proc.poll() is None and time.monotonic() < deadline:
            for p in out.parent.glob(f".{out.name}.tmp-*"):
                if len(list(p.glob("*.safetensors"))) >= files:
                    found = p
            time.sleep(0.001)
    finally:
        proc.kill()  # SIGKILL: no except clause, no atexit, no finally runs in the child
        _, err = proc.communicate(timeout=30)
    assert found is not None, f"the write ended (rc {proc.returncode}) before it could be killed:\n{err[-2000:]}"
    assert proc.returncode == -signal.SIGKILL
    return found


def test_killed_conversion_is_cleaned_up_by_the_next_run(tmp_path):
    """convert.py killed mid-write leaves its temporary folder and no output; the next run succeeds and leaves
    only the output. 256 MB in 32 shards (~0.5 s of writing), killed once the first shard is out."""
    src, out = tmp_path / "in", tmp_path / "out"
    convert_memory.build_checkpoint(src, size_mb=256, shards=32)
    argv = [sys.executable, "convert.py", "--input-dir", str(src), "--output-dir", str(out), "--num-zero-experts", "8"]
    stale = kill_mid_write(argv, out)
    assert not out.exists() and stale.is_dir() and leftovers(out) == [stale.name]

    rerun = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "out"]  # the dead run's folder is gone
    assert ModelConfig.from_hf_config(out).num_zero_experts == 8 and len(list(out.glob("*.safetensors"))) == 32


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGINT])
def test_a_stopped_conversion_removes_its_temporary_folder(tmp_path, how):
    """SIGTERM (and Ctrl-C) mid-write: exit 143 (130), one line, no traceback, no output and no temporary folder
    left (SIGTERM used to kill the process and leave the folder for the next run to find)."""
    src, out = tmp_path / "in", tmp_path / "out"
    convert_memory.build_checkpoint(src, size_mb=256, shards=32)
    argv = [sys.executable, "convert.py", "--input-dir", str(src), "--output-dir", str(out), "--num-zero-experts", "8"]
    # SIGINT restored in the child: a suite run in the background starts its children with SIGINT ignored
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 60
        while not any(p.glob("*.safetensors") for p in tmp_path.glob(".out.tmp-*")):
            assert proc.poll() is None and time.monotonic() < deadline, "finished before it could be stopped"
            time.sleep(0.001)
        proc.send_signal(how)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + how, err[-2000:]
    assert "Traceback" not in err and "nothing was written" in err.splitlines()[-1]
    assert not (tmp_path / "out").exists()
    assert list(tmp_path.glob(".out.tmp-*")) == []  # the temporary folder is gone, every time


def test_a_linked_folder_in_the_input_is_not_followed(static_ckpt, tmp_path):
    """A side folder that links elsewhere (here: to a system folder) is not copied into the output."""
    src = copy_input(static_ckpt, tmp_path)
    (src / "extras").symlink_to("/usr/share")
    convert_checkpoint(src, tmp_path / "out", num_zero=Z, progress=False)
    assert not (tmp_path / "out" / "extras").exists()


# Saves a tiny checkpoint in many small shards, sleeping after each: a save of a big model, slowed so that the
# test can kill it half-way.
SLOW_SAVE = """
import sys, time
import zeda, zeda.checkpoint as ck
write = ck.save_file
def slow_write(*args, **kwargs):
    write(*args, **kwargs)
    time.sleep(0.3)
ck.save_file = slow_write
ck.save_checkpoint(zeda.load_model(sys.argv[1]), sys.argv[2], max_shard_bytes=20_000)
"""


@pytest.mark.parametrize("existing", [False, True])
def test_killed_save_is_cleaned_up_by_the_next_save(static_ckpt, tmp_path, existing):
    """save_checkpoint killed mid-save: no output (or the previous one, whole); the next save to the same output
    leaves exactly one complete folder and no temporary one."""
    src = static_ckpt("glm4_moe_lite", 1)
    out = tmp_path / "saves" / "out"
    model = zeda.load_model(src)
    if existing:
        zeda.save_checkpoint(model, out)
    before = folder_bytes(out) if existing else None
    stale = kill_mid_write([sys.executable, "-c", SLOW_SAVE, str(src), str(out)], out, files=2)
    assert stale.is_dir() and ((folder_bytes(out) == before) if existing else not out.exists())

    zeda.save_checkpoint(model, out, max_shard_bytes=20_000)
    assert [p.name for p in out.parent.iterdir()] == ["out"]
    ids, mask = random_batch(5)
    with torch.no_grad():
        assert torch.equal(zeda.load_model(out)(ids, mask), model(ids, mask))


def test_only_dead_siblings_of_this_host_are_removed(tmp_path):
    """A live process's folder (a concurrent write), another host's (a shared filesystem: its pid means nothing
    here) and another output's are kept; a dead run's are removed, and a dead run's backup is put back when it
    died between replace_folder's two renames (the output missing: the backup is the last complete one)."""
    from zeda.checkpoint import HOST, remove_dead_siblings

    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead, alive = int(done.stdout), os.getpid()  # Linux hands out pids in increasing order: not reused so soon
    names = {
        f".out.tmp-{HOST}-{dead}-0a1b2c3d": False, f".out.tmp-{HOST}-{alive}-0a1b2c3d": True,
        f".out.tmp-otherhost-{dead}-0a1b2c3d": True, f".out2.tmp-{HOST}-{dead}-0a1b2c3d": True,
        f".out.old-{HOST}-{dead}-0a1b2c3d": False, "unrelated": True,
    }
    for name in names:
        (tmp_path / name).mkdir()
        (tmp_path / name / "f").write_text(name)
    assert remove_dead_siblings(tmp_path / "out") == [f".out.tmp-{HOST}-{dead}-0a1b2c3d"]
    assert (tmp_path / "out" / "f").read_text() == f".out.old-{HOST}-{dead}-0a1b2c3d"  # the backup, put back
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out"] + [n for n, kept in names.items() if kept])
    (tmp_path / f".out.old-{HOST}-{dead}-0a1b2c3d").mkdir()  # with the output there, a dead backup is stale
    assert remove_dead_siblings(tmp_path / "out") == [f".out.old-{HOST}-{dead}-0a1b2c3d"]


# ----------------------------------------------------------------------------------------------
# memory: bench/convert_memory.py at a small size


def test_conversion_memory_stays_near_one_shard(tmp_path):
    """Streaming: the conversion holds a few shards, not the model. 96 MB in 12 shards of 8 MB; we measured
    about 3 shards (the tensors read, the shard's mmapped pages, the allocator's slack), 0.3 x the model.
    The lower bound proves the measurement sees the conversion at all (a shard must be resident to be written)."""
    r = convert_memory.measure(size_mb=96, shards=12, workdir=tmp_path)
    print(r)
    assert 0.8 * r["largest_shard_mb"] < r["above_baseline_mb"] < 0.5 * r["model_mb"], r
