"""zeda checkpoints in plain transformers: zeda/hf/modeling_zeda.py, loaded with trust_remote_code=True.

For both shipped teachers: the conversion (convert.py, Z = N/2), a checkpoint zeda saved after pushing its
zero-expert router rows up (so zero slots are chosen often, and all K slots of some tokens), and an AdaMoE
conversion load in transformers with no missing, unexpected or mismatched key. Their logits match zeda's own
model within 1e-4 with the same K experts per token in every MoE layer, zero experts included; greedy generate()
gives zeda's greedy tokens; with use_zce_mask they are the static teacher's transformers logits. GLM's MTP layer
loads and round-trips through save_pretrained bit for bit. A subprocess in which zeda cannot be imported loads
copies of the checkpoints: the file stands alone. Bad zero-expert fields are refused naming the field.

The reference is always zeda's model (zeda.loading.load_model) or transformers' own static classes.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub.errors import StrictDataclassError
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

import convert
from zeda_toy import tasks
from zeda.checkpoint import save_checkpoint
from zeda.conversion import convert_checkpoint
from zeda.generation import generate
from zeda.hf import MODELING_FILE, write_remote_code
from zeda.loading import load_model
from zeda.sampling import SamplingParams
from zeda_toy.tiny import make_tiny_checkpoint

ROOT = Path(__file__).resolve().parent.parent
TEACHERS = {arch: ROOT / "assets" / f"{arch}_teacher" for arch in ("qwen3_moe", "glm4_moe_lite")}
VARIANTS = ("converted", "pushed", "adamoe")
TOLERANCE = 1e-4


def load_hf(folder, **kwargs):
    """The checkpoint through transformers' Auto class; asserts every key loaded and nothing was left over."""
    model, info = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32,
                                                       output_loading_info=True, **kwargs)
    assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"]), info
    return model.eval()


def push_zero_rows(src: Path, out: Path) -> None:
    """Load src in zeda, double the zero-expert rows of every router, save with zeda's save_checkpoint: the
    zero experts are then chosen about twice as often as after conversion (and the save path is exercised).
    GLM's correction bias (all zeros in the shipped teacher) is drawn at random, so that selection reads it."""
    model = load_model(src, device="cpu", dtype="float32")
    N = model.config.num_experts
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for block in model.model.layers:
            if block.is_moe:
                block.mlp.gate.weight[N:] *= 2.0
                if model.config.router_scoring == "sigmoid":
                    block.mlp.gate.e_score_correction_bias.normal_(0.0, 0.05, generator=generator)
    save_checkpoint(model, out, copy_from=src)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """{(arch, variant): folder} for both teachers: converted by convert.py with Z = N/2, pushed (zeda-saved),
    and an AdaMoE conversion."""
    d = tmp_path_factory.mktemp("hf_remote")
    out = {}
    for arch, teacher in TEACHERS.items():
        N = load_model(teacher, device="cpu", dtype="float32").config.num_experts
        converted = d / f"{arch}-converted"
        assert convert.main(["--input-dir", str(teacher), "--output-dir", str(converted),
                             "--num-zero-experts", str(N // 2)]) == 0
        push_zero_rows(converted, d / f"{arch}-pushed")
        convert_checkpoint(teacher, d / f"{arch}-adamoe", num_zero=N // 2, normalization="adamoe", progress=False)
        out.update({(arch, v): d / f"{arch}-{v}" for v in VARIANTS})
    return out


def teacher_forced_batch(folder: Path, rows: int = 2) -> torch.Tensor:
    """[rows, T]: chat-formatted prompt + reference answer of test tasks, cut to a common length (no padding)."""
    tok = AutoTokenizer.from_pretrained(folder)
    seqs = [tok.apply_chat_template([{"role": "user", "content": t.prompt}, {"role": "assistant", "content":
                                     t.response}], tokenize=True, return_dict=False)
            for t in tasks.mixture("test", 1, seed=3)[:rows]]
    T = min(len(s) for s in seqs)
    return torch.tensor([list(s[:T]) for s in seqs])


def hf_routing(model) -> list:
    """Forward hooks on the routers of the decoder layers; the list fills with each forward's ids_TK per layer."""
    ids = []
    for layer in model.model.layers[: model.config.num_hidden_layers]:
        if hasattr(layer.mlp, "gate"):
            layer.mlp.gate.register_forward_hook(lambda module, args, out: ids.append(out[2]))
    return ids


# ---------------------------------------------------------------------------------------------------------------
# the checkpoints as written


@pytest.mark.parametrize("arch", TEACHERS)
def test_dynamic_checkpoints_carry_the_modeling_file_and_auto_map(checkpoints, arch):
    for variant in VARIANTS:
        folder = checkpoints[arch, variant]
        assert (folder / "modeling_zeda.py").read_bytes() == MODELING_FILE.read_bytes()
        hf = json.loads((folder / "config.json").read_text())
        name = {"qwen3_moe": "Qwen3MoePlusPlus", "glm4_moe_lite": "Glm4MoeLitePlusPlus"}[arch]
        assert hf["auto_map"] == {"AutoConfig": f"modeling_zeda.{name}Config",
                                  "AutoModelForCausalLM": f"modeling_zeda.{name}ForCausalLM"}
        assert hf["architectures"] == [f"{name}ForCausalLM"]


def test_static_checkpoints_get_no_remote_code(tmp_path):
    """A static model loads with transformers' own classes: save_checkpoint writes no file and no auto_map."""
    teacher = TEACHERS["qwen3_moe"]
    save_checkpoint(load_model(teacher, device="cpu", dtype="float32"), tmp_path / "static", copy_from=teacher)
    assert not (tmp_path / "static" / "modeling_zeda.py").exists()
    assert "auto_map" not in json.loads((tmp_path / "static" / "config.json").read_text())
    hf = {"model_type": "qwen3_moe", "num_experts": 8}
    assert write_remote_code(tmp_path, hf) is hf and not (tmp_path / "modeling_zeda.py").exists()


# ---------------------------------------------------------------------------------------------------------------
# the same model as zeda's


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("arch", TEACHERS)
def test_logits_and_routing_match_zeda(checkpoints, arch, variant):
    """Teacher-forced chat text: transformers' logits within 1e-4 of zeda's, and the same K experts per token
    in every MoE layer, among them zero experts (a test that would pass with zero experts never chosen, or
    with their slots computed as real ones, could not fail)."""
    folder = checkpoints[arch, variant]
    ids = teacher_forced_batch(folder)
    ours = load_model(folder, device="cpu", dtype="float32")
    hf = load_hf(folder)
    hf_ids = hf_routing(hf)
    routing = []
    with torch.no_grad():
        expected = ours(ids, routing=routing)
        got = hf(input_ids=ids).logits
    diff = (got - expected).abs().max().item()
    assert diff <= TOLERANCE, diff
    N = ours.config.num_experts
    assert len(hf_ids) == len(routing) == ours.config.num_moe_layers
    for layer, (theirs, r) in enumerate(zip(hf_ids, routing)):
        assert torch.equal(theirs.sort(dim=-1).values, r.ids_TK.sort(dim=-1).values), layer
    zero_TK = torch.cat([r.ids_TK for r in routing]) >= N
    assert zero_TK.any() and not zero_TK.all()
    if variant == "pushed":  # some tokens skip every routed expert of a layer: the whole routed output is zero
        assert zero_TK.all(dim=-1).any()


@pytest.mark.parametrize("arch", TEACHERS)
def test_greedy_generate_matches_zeda(checkpoints, arch):
    """transformers' generate() (KV cache, one token at a time) gives zeda's greedy tokens."""
    folder = checkpoints[arch, "pushed"]
    tok = AutoTokenizer.from_pretrained(folder)
    prompts = [tok.apply_chat_template([{"role": "user", "content": t.prompt}], tokenize=True,
                                       add_generation_prompt=True, return_dict=False)
               for t in tasks.mixture("test", 1, seed=5)[:2]]
    prompts = [list(p) for p in prompts]
    ours = load_model(folder, device="cpu", dtype="float32")
    expected = generate(ours, prompts, SamplingParams(temperature=0, max_new_tokens=12),
                        eos_ids=ours.config.eos_token_id)
    assert sum(map(sum, expected.zero_slots)) > 0  # zero experts were chosen while generating
    hf = load_hf(folder)
    for prompt, tokens in zip(prompts, expected.tokens):
        with torch.no_grad():
            out = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False)
        assert out[0, len(prompt):].tolist() == tokens


@pytest.mark.parametrize("arch", TEACHERS)
def test_zce_mask_gives_the_static_teacher(checkpoints, arch):
    """use_zce_mask=True (as a from_pretrained override) is transformers' own static teacher; without the mask
    the converted model differs from it."""
    ids = teacher_forced_batch(TEACHERS[arch])
    teacher = AutoModelForCausalLM.from_pretrained(TEACHERS[arch], dtype=torch.float32).eval()
    with torch.no_grad():
        expected = teacher(input_ids=ids).logits
        masked = load_hf(checkpoints[arch, "converted"], use_zce_mask=True)(input_ids=ids).logits
        unmasked = load_hf(checkpoints[arch, "converted"])(input_ids=ids).logits
    assert (masked - expected).abs().max().item() <= TOLERANCE
    assert (unmasked - expected).abs().max().item() > 100 * TOLERANCE


def test_router_logits_and_aux_loss(checkpoints):
    """output_router_logits returns each MoE layer's [T, N + Z] logits and HF's aux loss runs over them."""
    folder = checkpoints["qwen3_moe", "pushed"]
    hf = load_hf(folder)
    ids = teacher_forced_batch(folder)
    out = hf(input_ids=ids, labels=ids, output_router_logits=True)
    cfg = load_model(folder, device="cpu", dtype="float32").config
    assert len(out.router_logits) == cfg.num_moe_layers
    assert out.router_logits[0].shape == (ids.numel(), cfg.num_router_outputs)
    assert torch.isfinite(out.loss) and torch.isfinite(out.aux_loss)


# ---------------------------------------------------------------------------------------------------------------
# GLM's MTP layer


def test_glm_mtp_layer_loads_and_round_trips(tmp_path):
    """The MTP layer's tensors (grown router included) load into the held layer with no missing or unexpected
    key, save_pretrained writes every tensor back bit for bit, and the saved folder loads in zeda and in
    transformers with the same logits."""
    make_tiny_checkpoint(tmp_path / "static", "glm4_moe_lite", mtp_layers=1)
    convert_checkpoint(tmp_path / "static", tmp_path / "dyn", num_zero=4, progress=False)
    hf = load_hf(tmp_path / "dyn")
    assert len(hf.model.layers) == hf.config.num_hidden_layers + 1
    hf.save_pretrained(tmp_path / "resaved")
    before, after = load_file(tmp_path / "dyn" / "model.safetensors"), load_file(tmp_path / "resaved" /
                                                                                 "model.safetensors")
    L = hf.config.num_hidden_layers
    assert any(k.startswith(f"model.layers.{L}.eh_proj") for k in before)
    assert before.keys() == after.keys()
    for key, t in before.items():
        assert after[key].dtype == t.dtype and torch.equal(after[key], t), key
    ids = torch.randint(4, 90, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = load_model(tmp_path / "dyn", device="cpu", dtype="float32")(ids)
        assert (load_hf(tmp_path / "resaved")(input_ids=ids).logits - expected).abs().max().item() <= TOLERANCE
        assert (load_model(tmp_path / "resaved", device="cpu", dtype="float32")(ids) - expected).abs().max() <= \
            TOLERANCE


# ---------------------------------------------------------------------------------------------------------------
# the file stands alone


STANDALONE = r"""
import sys
sys.modules["zeda"] = None  # the editable install would find zeda from anywhere: block it
try:
    import zeda
except ImportError:
    pass
else:
    raise SystemExit("zeda is importable")
import torch
from transformers import AutoModelForCausalLM
ids = torch.load(sys.argv[1])
for folder, out in zip(sys.argv[2::2], sys.argv[3::2]):
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()
    assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
    with torch.no_grad():
        torch.save(model(input_ids=ids).logits, out)
assert not any(name == "zeda" or name.startswith("zeda.") for name, m in sys.modules.items() if m is not None)
"""


def test_loads_where_zeda_cannot_be_imported(checkpoints, tmp_path):
    """`python -I` (no cwd, no PYTHONPATH on sys.path) with zeda blocked, in a fresh module cache: copies of both
    pushed checkpoints load through the copied modeling_zeda.py and give zeda's logits."""
    ids = teacher_forced_batch(checkpoints["qwen3_moe", "pushed"])
    torch.save(ids, tmp_path / "ids.pt")
    args, expected = [], {}
    for arch in TEACHERS:
        copy = shutil.copytree(checkpoints[arch, "pushed"], tmp_path / f"standalone-{arch}")
        args += [str(copy), str(tmp_path / f"{arch}.pt")]
        with torch.no_grad():
            expected[arch] = load_model(copy, device="cpu", dtype="float32")(ids)
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONPATH", None)
    proc = subprocess.run([sys.executable, "-I", "-c", STANDALONE, str(tmp_path / "ids.pt"), *args], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for arch in TEACHERS:
        diff = (torch.load(tmp_path / f"{arch}.pt") - expected[arch]).abs().max().item()
        assert diff <= TOLERANCE, (arch, diff)


# ---------------------------------------------------------------------------------------------------------------
# refusals


# modeling_zeda.py's own checks (ValueError), or the type checks of transformers' @strict configs, which run first
REFUSAL = (ValueError, StrictDataclassError)


@pytest.mark.parametrize("field, value", [
    ("zce_nums", [2, 2]), ("zce_nums", ["4"]), ("zce_types", ["null"]), ("use_zce_mask", "yes"),
    ("zce_normalization", "switch"), ("num_nextn_predict_layers", -1), ("n_group", 2),
])
def test_bad_zero_expert_fields_are_refused_by_name(checkpoints, tmp_path, field, value):
    folder = shutil.copytree(checkpoints["glm4_moe_lite", "converted"], tmp_path / "bad")
    hf = json.loads((folder / "config.json").read_text())
    hf[field] = value
    (folder / "config.json").write_text(json.dumps(hf))
    with pytest.raises(REFUSAL, match=f"'?{field}'? "):
        AutoConfig.from_pretrained(folder, trust_remote_code=True)


def test_a_bad_override_is_refused_by_name(checkpoints):
    with pytest.raises(REFUSAL, match="'?use_zce_mask'? "):
        AutoModelForCausalLM.from_pretrained(checkpoints["qwen3_moe", "converted"], trust_remote_code=True,
                                             use_zce_mask="yes")
