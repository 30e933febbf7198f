"""Model configuration: one dataclass for both supported architectures, read from an HF config.json.

Qwen3-MoE (`qwen3_moe`) and GLM-4.7-Flash (`glm4_moe_lite`) differ only by fields here: the attention kind
(GQA with q/k norms vs multi-head latent attention), the router (softmax vs sigmoid with a selection bias and
a routed scaling factor), shared experts, and which layers are dense. A converted ZEDA checkpoint adds the
zero-expert fields of ZEDA.md §1 (`zce_nums`, `zce_types`, `use_zce_mask`).

Field names follow HF where HF has one name; where releases disagree (Qwen3-30B-A3B's own config.json says
`num_experts`, transformers 5.x writes `num_local_experts`, GLM writes `n_routed_experts`) we read all of them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from zeda.errors import ConfigError  # noqa: F401  (re-exported)

SUPPORTED_MODEL_TYPES = ("qwen3_moe", "glm4_moe_lite")
# Keys that name the real routed-expert count N, in the order we look for them.
NUM_EXPERTS_KEYS = ("num_experts", "num_local_experts", "n_routed_experts")
# `architectures` of the authors' dynamic checkpoints (ZEDA.md §1).
DYNAMIC_ARCHITECTURES = {
    "qwen3_moe": "Qwen3MoePlusPlusForCausalLM",
    "glm4_moe_lite": "Glm4MoeLitePlusPlusForCausalLM",
}




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
    # Zero experts (ZEDA.md §1): Z parameter-free experts with ids N..N+Z-1.
    num_zero_experts: int = 0  # Z
    use_zce_mask: bool = False  # True: zero-expert logits -> -inf, the model is the original static MoE
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
        """Read a config.json (a folder, a file, or an already-parsed dict). Keyword overrides win."""
        hf, where = _read_json(source)
        hf = {**hf, **{k: v for k, v in overrides.items()}}
        return cls._from_dict(hf, where)

    @classmethod
    def _from_dict(cls, hf: dict, where: str) -> "ModelConfig":
        def need(key: str):
            if key not in hf or hf[key] is None:
                raise ConfigError(f"{where}: missing required field '{key}'")
            return hf[key]

        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"{where}: model_type {model_type!r} is not supported; zeda supports {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        num_experts = next((hf[k] for k in NUM_EXPERTS_KEYS if hf.get(k)), None)
        if not num_experts:
            raise ConfigError(f"{where}: no routed-expert count (one of {', '.join(NUM_EXPERTS_KEYS)})")
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ConfigError(f"{where}: rope_type {rope_type!r} is not supported (only 'default' RoPE)")
        rope_theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
        if hf.get("use_sliding_window"):
            raise ConfigError(f"{where}: use_sliding_window=true is not supported")
        num_layers = need("num_hidden_layers")
        num_zero = _zero_experts(hf, where)
        eos = hf.get("eos_token_id")
        eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))

        common = dict(
            model_type=model_type,
            vocab_size=need("vocab_size"),
            hidden_size=need("hidden_size"),
            num_hidden_layers=num_layers,
            num_attention_heads=need("num_attention_heads"),
            num_key_value_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
            intermediate_size=need("intermediate_size"),
            moe_intermediate_size=need("moe_intermediate_size"),
            num_experts=num_experts,
            num_experts_per_tok=need("num_experts_per_tok"),
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta),
            max_position_embeddings=hf.get("max_position_embeddings", 32768),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=bool(hf.get("attention_bias", False)),
            num_zero_experts=num_zero,
            use_zce_mask=bool(hf.get("use_zce_mask", False)),
            eos_token_id=eos,
            pad_token_id=hf.get("pad_token_id"),
            hf_config=hf,
        )
        if model_type == "qwen3_moe":
            mlp_only = set(hf.get("mlp_only_layers") or [])
            step = hf.get("decoder_sparse_step", 1) or 1
            moe_layers = tuple(i not in mlp_only and (i + 1) % step == 0 for i in range(num_layers))
            cfg = cls(
                **common,
                head_dim=hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"],
                moe_layers=moe_layers,
                norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
            )
        else:  # glm4_moe_lite
            if (hf.get("n_group") or 1) != 1 or (hf.get("topk_group") or 1) != 1:
                raise ConfigError(f"{where}: group-limited routing (n_group > 1) is not supported")
            if hf.get("num_key_value_heads", hf["num_attention_heads"]) != hf["num_attention_heads"]:
                raise ConfigError(f"{where}: MLA needs num_key_value_heads == num_attention_heads")
            layer_types = hf.get("mlp_layer_types")
            if layer_types is None:
                first_dense = hf.get("first_k_dense_replace", 1)
                layer_types = ["dense"] * first_dense + ["sparse"] * (num_layers - first_dense)
            if len(layer_types) < num_layers:
                raise ConfigError(f"{where}: mlp_layer_types has {len(layer_types)} entries for {num_layers} layers")
            cfg = cls(
                **common,
                head_dim=need("qk_rope_head_dim"),
                moe_layers=tuple(t == "sparse" for t in layer_types[:num_layers]),
                norm_topk_prob=bool(hf.get("norm_topk_prob", True)),
                router_scoring="sigmoid",
                routed_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)),
                n_shared_experts=hf.get("n_shared_experts") or 0,
                q_lora_rank=hf.get("q_lora_rank"),
                kv_lora_rank=need("kv_lora_rank"),
                qk_nope_head_dim=need("qk_nope_head_dim"),
                qk_rope_head_dim=need("qk_rope_head_dim"),
                v_head_dim=need("v_head_dim"),
                rope_interleave=bool(hf.get("rope_interleave", True)),
            )
        if cfg.num_experts_per_tok > cfg.num_router_outputs:
            raise ConfigError(f"{where}: num_experts_per_tok {cfg.num_experts_per_tok} > number of experts")
        return cfg

    def to_hf_dict(self) -> dict:
        """The config.json to write: every original field kept, the zero-expert fields set (ZEDA.md §1)."""
        hf = dict(self.hf_config)
        if self.num_zero_experts:
            hf["zce_nums"] = [self.num_zero_experts]
            hf["zce_types"] = ["zero"]
            hf["use_zce_mask"] = self.use_zce_mask
            hf["architectures"] = [DYNAMIC_ARCHITECTURES[self.model_type]]
        return hf


def _zero_experts(hf: dict, where: str) -> int:
    nums, types = hf.get("zce_nums") or [], hf.get("zce_types") or []
    if len(nums) != len(types) and types:
        raise ConfigError(f"{where}: zce_nums {nums} and zce_types {types} differ in length")
    if any(t != "zero" for t in types):
        raise ConfigError(f"{where}: zce_types {types}: only 'zero' experts are supported")
    if any((not isinstance(n, int)) or n < 0 for n in nums):
        raise ConfigError(f"{where}: zce_nums {nums} must be non-negative integers")
    return sum(nums)


def _read_json(source: str | Path | dict) -> tuple[dict, str]:
    if isinstance(source, dict):
        return dict(source), "config"
    path = Path(source)
    if path.is_dir():
        path = path / "config.json"
    if not path.exists():
        raise ConfigError(f"{path}: no such file (a model folder needs a config.json)")
    try:
        return json.loads(path.read_text()), str(path)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON: {e}") from None
