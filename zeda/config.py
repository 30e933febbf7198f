"""Model configuration: one dataclass for both supported architectures, read from an HF config.json.

Qwen3-MoE (`qwen3_moe`) and GLM-4.7-Flash (`glm4_moe_lite`) differ only by fields here: the attention kind
(GQA with q/k norms vs multi-head latent attention), the router (softmax vs sigmoid with a selection bias and
a routed scaling factor), shared experts, and which layers are dense. A converted ZEDA checkpoint adds the
zero-expert fields of docs/method.md §1 (`zce_nums`, `zce_types`, `use_zce_mask`).

Field names follow HF where HF has one name; where releases disagree (Qwen3-30B-A3B's own config.json says
`num_experts`, transformers 5.x writes `num_local_experts`, GLM writes `n_routed_experts`) we read all of them.
Every value we use is checked on reading (sizes are positive integers and not booleans, floats finite, flags
JSON booleans, top-k within 1..N + Z), so a bad config.json is a ConfigError naming the file and the key.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from zeda.errors import ConfigError  # noqa: F401  (re-exported)

SUPPORTED_MODEL_TYPES = ("qwen3_moe", "glm4_moe_lite")
# Keys that name the real routed-expert count N, in the order we look for them.
NUM_EXPERTS_KEYS = ("num_experts", "num_local_experts", "n_routed_experts")
# `architectures` of a static checkpoint, as transformers names the class (tools such as `transformers serve` pick
# the class from it), and of the authors' dynamic checkpoints (docs/method.md §1).
STATIC_ARCHITECTURES = {"qwen3_moe": "Qwen3MoeForCausalLM", "glm4_moe_lite": "Glm4MoeLiteForCausalLM"}
DYNAMIC_ARCHITECTURES = {
    "qwen3_moe": "Qwen3MoePlusPlusForCausalLM",
    "glm4_moe_lite": "Glm4MoeLitePlusPlusForCausalLM",
}
_REQUIRED = object()  # a default meaning "the key must be there"


@dataclass
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int  # H
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int  # Qwen3 per-head dim; for GLM the rope dim (HF maps head_dim -> qk_rope_head_dim)
    intermediate_size: int  # dense MLP layers
    moe_intermediate_size: int  # I, per routed expert
    num_experts: int  # N real routed experts
    num_experts_per_tok: int  # K
    moe_layers: tuple[bool, ...]  # per layer: routed MoE (True) or dense MLP (False)
    norm_topk_prob: bool
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool = False
    # Zero experts (docs/method.md §1): Z parameter-free experts with ids N..N+Z-1.
    num_zero_experts: int = 0  # Z
    use_zce_mask: bool = False  # True: zero-expert logits -> -inf, the model is the original static MoE
    # How the K weights are normalised when zero slots are chosen: "zeda" (zero slots keep their share, real
    # experts are not renormalised, docs/method.md §2) or "adamoe" (the AdaMoE baseline's null experts: real-expert
    # weights renormalised over the real slots). zeda's own extension of config.json ("zce_normalization").
    zero_normalization: str = "zeda"
    # GLM-4.7-Flash only.
    router_scoring: str = "softmax"  # "softmax" (Qwen3) or "sigmoid" (GLM)
    routed_scaling_factor: float = 1.0
    n_shared_experts: int = 0
    q_lora_rank: int | None = None
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    rope_interleave: bool = False
    # GLM-4.7-Flash ships num_nextn_predict_layers multi-token-prediction layers after the last decoder layer, as
    # layers num_hidden_layers.. of the checkpoint: not part of our model (the loader skips them), but convert
    # grows their routers too, as the authors do (docs/method.md §1).
    num_nextn_predict_layers: int = 0
    eos_token_id: list[int] = field(default_factory=list)
    pad_token_id: int | None = None
    hf_config: dict = field(default_factory=dict, repr=False)  # the full config.json, written back on save

    @property
    def is_mla(self) -> bool:
        return self.model_type == "glm4_moe_lite"

    @property
    def num_router_outputs(self) -> int:  # N + Z
        return self.num_experts + self.num_zero_experts

    @property
    def num_moe_layers(self) -> int:
        return sum(self.moe_layers)

    @classmethod
    def from_hf_config(cls, source: str | Path | dict, **overrides) -> "ModelConfig":
        """Read a config.json (a folder, a file, or an already-parsed dict). Keyword overrides win.

        Every value we use is checked here, overrides included, so that a bad one is a ConfigError naming the
        file and the key instead of a shape error (or a silently different model) later."""
        hf, where = _read_json(source)
        hf = {**hf, **{k: v for k, v in overrides.items()}}
        cfg = cls._from_dict(hf, where)
        # The folder's generation_config.json names end tokens too (Qwen3 and GLM list their end-of-turn tokens
        # there): every generation path stops at them, as transformers' generate() does.
        gen_path = Path(where).with_name("generation_config.json") if not isinstance(source, dict) else None
        if gen_path is not None and gen_path.is_file():
            gen, gen_where = _read_json(gen_path)
            cfg.eos_token_id = list(dict.fromkeys(cfg.eos_token_id + _token_ids(gen, gen_where)))
        return cfg

    @classmethod
    def _from_dict(cls, hf: dict, where: str) -> "ModelConfig":
        def size(key: str, default=_REQUIRED) -> int:
            return _integer(hf, key, where, default)

        def flag(key: str, default: bool) -> bool:
            return _flag(hf, key, where, default)

        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"{where}: model_type {model_type!r} is not supported; zeda supports {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        n_key = experts_key(hf)
        if n_key is None:
            raise ConfigError(f"{where}: no routed-expert count (one of {', '.join(NUM_EXPERTS_KEYS)})")
        num_experts = size(n_key)
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        if not isinstance(rope, dict):
            raise ConfigError(f"{where}: rope_parameters must be an object (got {rope!r})")
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ConfigError(f"{where}: rope_type {rope_type!r} is not supported (only 'default' RoPE)")
        rope_theta = rope.get("rope_theta", hf.get("rope_theta"))
        rope_theta = 10000.0 if rope_theta is None else _positive_float(rope_theta, "rope_theta", where)
        if hf.get("use_sliding_window"):
            raise ConfigError(f"{where}: use_sliding_window=true is not supported")
        num_layers = size("num_hidden_layers")
        num_heads = size("num_attention_heads")
        num_zero = _zero_experts(hf, where)
        top_k = size("num_experts_per_tok")
        if top_k > num_experts + num_zero:  # a zero expert is an expert: K may count them (docs/method.md §2)
            raise ConfigError(f"{where}: num_experts_per_tok {top_k} must be at most N + Z = {num_experts + num_zero} "
                              f"({num_experts} real experts, {num_zero} zero experts)")
        eps = hf.get("rms_norm_eps")
        common = dict(
            model_type=model_type,
            vocab_size=size("vocab_size"),
            hidden_size=size("hidden_size"),
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            num_key_value_heads=size("num_key_value_heads", num_heads),
            intermediate_size=size("intermediate_size"),
            moe_intermediate_size=size("moe_intermediate_size"),
            num_experts=num_experts,
            num_experts_per_tok=top_k,
            rms_norm_eps=1e-6 if eps is None else _positive_float(eps, "rms_norm_eps", where),
            rope_theta=rope_theta,
            max_position_embeddings=size("max_position_embeddings", 32768),
            tie_word_embeddings=flag("tie_word_embeddings", False),
            attention_bias=flag("attention_bias", False),
            num_zero_experts=num_zero,
            use_zce_mask=flag("use_zce_mask", False),
            zero_normalization=_choice(hf, "zce_normalization", where, ZERO_NORMALIZATIONS),
            num_nextn_predict_layers=_integer(hf, "num_nextn_predict_layers", where, 0, minimum=0),
            eos_token_id=_token_ids(hf, where),
            pad_token_id=hf.get("pad_token_id"),
            hf_config=hf,
        )
        if model_type == "qwen3_moe":
            kv_heads = common["num_key_value_heads"]
            if num_heads % kv_heads:
                raise ConfigError(f"{where}: num_attention_heads {num_heads} is not a multiple of "
                                  f"num_key_value_heads {kv_heads} (grouped-query attention)")
            head_dim = hf.get("head_dim")
            if head_dim is None and common["hidden_size"] % num_heads:
                raise ConfigError(f"{where}: no head_dim, and hidden_size {common['hidden_size']} is not a multiple "
                                  f"of num_attention_heads {num_heads}")
            mlp_only = _layer_indices(hf, "mlp_only_layers", where)
            step = size("decoder_sparse_step", 1)
            moe_layers = tuple(i not in mlp_only and (i + 1) % step == 0 for i in range(num_layers))
            cfg = cls(
                **common,
                head_dim=size("head_dim", common["hidden_size"] // num_heads),
                moe_layers=moe_layers,
                norm_topk_prob=flag("norm_topk_prob", False),
            )
        else:  # glm4_moe_lite
            if (hf.get("n_group") or 1) != 1 or (hf.get("topk_group") or 1) != 1:
                raise ConfigError(f"{where}: group-limited routing (n_group > 1) is not supported")
            if common["num_key_value_heads"] != num_heads:
                raise ConfigError(f"{where}: MLA needs num_key_value_heads == num_attention_heads")
            layer_types = hf.get("mlp_layer_types")
            if layer_types is None:
                first_dense = _integer(hf, "first_k_dense_replace", where, 1, minimum=0)
                layer_types = ["dense"] * first_dense + ["sparse"] * (num_layers - first_dense)
            if not isinstance(layer_types, list):
                raise ConfigError(f"{where}: mlp_layer_types must be a list of 'dense' and 'sparse' "
                                  f"(got {layer_types!r})")
            for i, t in enumerate(layer_types):
                if t not in ("dense", "sparse"):
                    raise ConfigError(f"{where}: mlp_layer_types[{i}] is {t!r}; expected 'dense' or 'sparse'")
            if len(layer_types) < num_layers:
                raise ConfigError(f"{where}: mlp_layer_types has {len(layer_types)} entries for {num_layers} layers")
            scaling = hf.get("routed_scaling_factor")
            cfg = cls(
                **common,
                head_dim=size("qk_rope_head_dim"),
                moe_layers=tuple(t == "sparse" for t in layer_types[:num_layers]),
                norm_topk_prob=flag("norm_topk_prob", True),
                router_scoring="sigmoid",
                routed_scaling_factor=1.0 if scaling is None else _positive_float(scaling, "routed_scaling_factor",
                                                                                  where),
                n_shared_experts=_integer(hf, "n_shared_experts", where, 0, minimum=0),
                q_lora_rank=size("q_lora_rank", None),  # null: no low-rank query projection
                kv_lora_rank=size("kv_lora_rank"),
                qk_nope_head_dim=size("qk_nope_head_dim"),
                qk_rope_head_dim=size("qk_rope_head_dim"),
                v_head_dim=size("v_head_dim"),
                rope_interleave=flag("rope_interleave", True),
            )
        return cfg

    def to_hf_dict(self) -> dict:
        """The config.json to write: every original field kept, the zero-expert fields set (docs/method.md §1),
        and `architectures` always naming the model class."""
        hf = dict(self.hf_config)
        if self.num_zero_experts:
            hf["zce_nums"] = [self.num_zero_experts]
            hf["zce_types"] = ["zero"]
            hf["use_zce_mask"] = self.use_zce_mask
            if self.zero_normalization != "zeda":
                hf["zce_normalization"] = self.zero_normalization
            hf["architectures"] = [DYNAMIC_ARCHITECTURES[self.model_type]]
        elif not hf.get("architectures"):  # a config written without one still names its class
            hf["architectures"] = [STATIC_ARCHITECTURES[self.model_type]]
        return hf


ZERO_NORMALIZATIONS = ("zeda", "adamoe")


def _choice(hf: dict, key: str, where: str, choices: tuple[str, ...]) -> str:
    """hf[key] if present (one of `choices`), else the first choice."""
    value = hf.get(key, choices[0])
    if value not in choices:
        raise ConfigError(f"{where}: '{key}' is {value!r}; expected one of {', '.join(choices)}")
    return value


def experts_key(hf: dict) -> str | None:
    """The key that names the real routed-expert count N: the first of NUM_EXPERTS_KEYS that is set."""
    return next((k for k in NUM_EXPERTS_KEYS if hf.get(k) is not None), None)


def _integer(hf: dict, key: str, where: str, default=_REQUIRED, minimum: int = 1):
    """hf[key] as an int >= minimum (a size or a count), `default` when absent or null.

    A bool is refused although Python calls it an int: JSON true is no layer count, and accepting it would make
    `"num_hidden_layers": true` a one-layer model."""
    value = hf.get(key)
    if value is None:
        if default is _REQUIRED:
            raise ConfigError(f"{where}: missing required field '{key}'")
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        kind = "a positive integer" if minimum == 1 else "a non-negative integer"
        raise ConfigError(f"{where}: {key} must be {kind} (got {value!r})")
    return value


def _positive_float(value, key: str, where: str) -> float:
    """A finite number > 0 (an epsilon, a RoPE base, a scaling factor); json reads NaN and Infinity too."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{where}: {key} must be a finite positive number (got {value!r})")
    return float(value)


def _flag(hf: dict, key: str, where: str, default: bool) -> bool:
    """A JSON boolean; bool() of the string "false" is True, so strings and numbers are refused."""
    value = hf.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ConfigError(f"{where}: {key} must be true or false (got {value!r})")
    return value


def _layer_indices(hf: dict, key: str, where: str) -> set[int]:
    value = hf.get(key) or []
    if not isinstance(value, list) or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in value):
        raise ConfigError(f"{where}: {key} must be a list of layer indices (got {value!r})")
    return set(value)


def _token_ids(hf: dict, where: str) -> list[int]:
    eos = hf.get("eos_token_id")
    ids = [] if eos is None else ([eos] if isinstance(eos, int) else eos)
    if not isinstance(ids, list) or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in ids):
        raise ConfigError(f"{where}: eos_token_id must be a token id or a list of them (got {eos!r})")
    return list(ids)


def _zero_experts(hf: dict, where: str) -> int:
    """Z from the authors' zce_nums [Z] / zce_types ["zero"] (docs/method.md §1); 0 for a static checkpoint.

    Exactly one group, as in the authors' checkpoints: several groups are a format we have not seen, so [2, 2]
    is refused rather than read as Z = 4."""
    nums, types = hf.get("zce_nums"), hf.get("zce_types")
    if nums is None:
        if types:
            raise ConfigError(f"{where}: zce_types {types!r} without zce_nums")
        return 0
    if (not isinstance(nums, list) or len(nums) != 1 or isinstance(nums[0], bool) or not isinstance(nums[0], int)
            or nums[0] < 0):
        raise ConfigError(f"{where}: zce_nums {nums!r} must be a list of one non-negative integer, [Z]")
    if types is not None and types != ["zero"]:
        raise ConfigError(f"{where}: zce_types {types!r}: only one group of 'zero' experts is supported ([\"zero\"])")
    return nums[0]


def generation_defaults(folder: str | Path) -> dict:
    """The sampling defaults a model folder's generation_config.json sets (temperature, top_p, top_k; those it
    has), checked like config.json's values; {} without the file."""
    path = Path(folder) / "generation_config.json"
    if not path.is_file():
        return {}
    gen, where = _read_json(path)
    out = {}
    for key, minimum in (("temperature", 0.0), ("top_p", 0.0), ("top_k", 0)):
        value = gen.get(key)
        if value is None:
            continue
        ok = (isinstance(value, int) if key == "top_k" else isinstance(value, (int, float)) and math.isfinite(value))
        if isinstance(value, bool) or not ok or value < minimum or (key == "top_p" and not 0 < value <= 1):
            raise ConfigError(f"{where}: {key} {value!r} is not a valid sampling setting")
        out[key] = value
    return out


def _read_json(source: str | Path | dict) -> tuple[dict, str]:
    if isinstance(source, dict):
        return dict(source), "config"
    path = Path(source)
    if path.is_dir():
        path = path / "config.json"
    if not path.exists():
        raise ConfigError(f"{path}: no such file (a model folder needs a config.json)")
    try:
        hf = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(hf, dict):
        raise ConfigError(f"{path}: not a JSON object (got {type(hf).__name__} {hf!r:.40})")
    return hf, str(path)
