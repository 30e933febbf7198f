"""zeda checkpoints in plain transformers: `AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)`.

zeda copies this file into every dynamic checkpoint it writes (zeda/hf/__init__.py:write_remote_code) and names
its classes in config.json's `auto_map`, so a converted or trained checkpoint loads with torch and transformers
alone, zeda not installed. It needs nothing else: no import of zeda, no other file.

A converted checkpoint is the static model plus Z parameter-free zero experts per MoE layer (docs/method.md §1-§2
in the zeda repository): the router `mlp.gate.weight` is [N + Z, H] instead of [N, H] (GLM's
`mlp.gate.e_score_correction_bias` [N + Z]), expert ids N..N+Z-1 are zero experts, and the experts are still
the N real ones. So the classes here are transformers' own Qwen3MoeForCausalLM / Glm4MoeLiteForCausalLM with two
parts of each sparse MoE block replaced, and nothing else:

- the router scores all N + Z outputs in fp32 and picks K of them, zero experts included:
    Qwen3 (softmax): top-K of softmax(logits); with norm_topk_prob the K weights are divided by their sum, zero
        slots included, so the real experts are not renormalised and the layer output shrinks.
    GLM (sigmoid): top-K of sigmoid(logits) + e_score_correction_bias; weights are the sigmoid scores at the
        chosen ids over their sum (zero slots included, + 1e-20), times routed_scaling_factor.
  `use_zce_mask: true` scores the N real rows only: zero experts are never chosen (for GLM, not even on their
  correction bias) and the model is exactly the original static one. `zce_normalization: "adamoe"` (zeda's
  AdaMoE baseline) gives zero slots no weight and renormalises the real ones over the real slots.
- the experts are the N real ones, one MLP module each (keys `mlp.experts.{e}.gate_proj.weight`, as zeda and
  the original release write them); a zero slot has no module, is skipped and adds exactly zero.

GLM-4.7-Flash also ships a multi-token-prediction (MTP) layer as layer `num_hidden_layers`, declared by
`num_nextn_predict_layers`. transformers has no MTP module; the classes here hold its tensors (a decoder layer
with a zero-expert MoE, plus enorm, hnorm, eh_proj, embed_tokens, shared_head) so that they load with no
unexpected keys and save_pretrained writes them back. They are never run.
"""

import torch
import torch.nn.functional as F
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import Glm4MoeLiteConfig, Glm4MoeLiteForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM
from transformers.models.glm4_moe_lite.modeling_glm4_moe_lite import (
    Glm4MoeLiteAttention,
    Glm4MoeLiteMLP,
    Glm4MoeLiteModel,
    Glm4MoeLiteMoE,
    Glm4MoeLiteRMSNorm,
    Glm4MoeLiteTopkRouter,
)
from transformers.models.qwen3_moe.modeling_qwen3_moe import (
    Qwen3MoeMLP,
    Qwen3MoeModel,
    Qwen3MoeSparseMoeBlock,
    Qwen3MoeTopKRouter,
)

ZERO_NORMALIZATIONS = ("zeda", "adamoe")


# ---------------------------------------------------------------------------------------------------------------
# Configuration: transformers' own config plus the zero-expert fields of a converted checkpoint.


def check_zero_expert_fields(config) -> None:
    """Refuse what this file cannot run, naming the config.json field. @strict checks the declared types first;
    the types are checked here again for the model classes, which see from_pretrained's keyword overrides."""
    nums, types = config.zce_nums, config.zce_types
    if nums is not None and (not isinstance(nums, list) or len(nums) != 1 or isinstance(nums[0], bool)
                             or not isinstance(nums[0], int) or nums[0] < 0):
        raise ValueError(f"config.json: zce_nums {nums!r} must be a list of one non-negative integer, [Z]")
    if nums is None and types:
        raise ValueError(f"config.json: zce_types {types!r} without zce_nums")
    if types is not None and types != ["zero"]:
        raise ValueError(f"config.json: zce_types {types!r}: only one group of 'zero' experts is supported "
                         f"([\"zero\"])")
    if not isinstance(config.use_zce_mask, bool):
        raise ValueError(f"config.json: use_zce_mask must be true or false (got {config.use_zce_mask!r})")
    if config.zce_normalization not in ZERO_NORMALIZATIONS:
        raise ValueError(f"config.json: zce_normalization {config.zce_normalization!r}; expected one of "
                         f"{', '.join(ZERO_NORMALIZATIONS)}")


def num_zero_experts(config) -> int:  # Z
    return config.zce_nums[0] if config.zce_nums else 0


@strict
class Qwen3MoePlusPlusConfig(Qwen3MoeConfig):
    zce_nums: list[int] | None = None  # [Z]: Z zero experts per MoE layer, ids N..N+Z-1
    zce_types: list[str] | None = None  # ["zero"]
    use_zce_mask: bool = False  # True: zero experts are never chosen, the model is the original static one
    zce_normalization: str = "zeda"  # "adamoe": zero slots get no weight, real experts renormalised

    def __post_init__(self, **kwargs):
        check_zero_expert_fields(self)
        super().__post_init__(**kwargs)


@strict
class Glm4MoeLitePlusPlusConfig(Glm4MoeLiteConfig):
    zce_nums: list[int] | None = None
    zce_types: list[str] | None = None
    use_zce_mask: bool = False
    zce_normalization: str = "zeda"
    num_nextn_predict_layers: int = 0  # MTP layers stored after the last decoder layer (held, not run)

    def __post_init__(self, **kwargs):
        check_zero_expert_fields(self)
        mtp = self.num_nextn_predict_layers
        if isinstance(mtp, bool) or not isinstance(mtp, int) or mtp < 0:
            raise ValueError(f"config.json: num_nextn_predict_layers must be a non-negative integer (got {mtp!r})")
        if num_zero_experts(self) and (self.n_group != 1 or self.topk_group != 1):
            raise ValueError(f"config.json: n_group {self.n_group} / topk_group {self.topk_group}: group-limited "
                             f"routing is not supported with zero experts (both must be 1)")
        super().__post_init__(**kwargs)


# ---------------------------------------------------------------------------------------------------------------
# Routing with zero experts, and the real experts.


def route_with_zero_experts(x_TH, weight_EH, num_real: int, top_k: int, *, sigmoid: bool, norm_topk_prob: bool,
                            use_zce_mask: bool, renormalize_real: bool, correction_bias_E=None,
                            routed_scaling_factor: float = 1.0):
    """Scores the N real + Z zero router outputs in fp32 and picks K (see the module docstring).

    Returns logits_TE (fp32; -inf at the zero experts under use_zce_mask), weights_TK (fp32) and ids_TK, where an
    id >= N is a zero expert."""
    if use_zce_mask:
        # The N real rows only, the original computation bit for bit; -inf-padding before softmax/top-k could
        # round differently.
        scored_TN = F.linear(x_TH.float(), weight_EH[:num_real].float())
        logits_TE = F.pad(scored_TN, (0, weight_EH.shape[0] - num_real), value=float("-inf"))
        scored = scored_TN
    else:
        logits_TE = scored = F.linear(x_TH.float(), weight_EH.float())  # [T, N + Z]
    if sigmoid:
        scores = scored.sigmoid()
        choice = scores + correction_bias_E[: scores.shape[1]]  # selection only, never a weight
        ids_TK = choice.topk(top_k, dim=-1, sorted=False).indices
        raw_TK = scores.gather(1, ids_TK)
        eps = 1e-20  # HF's epsilon
    else:
        raw_TK, ids_TK = scored.softmax(dim=-1).topk(top_k, dim=-1)
        eps = 0.0
    if renormalize_real:  # AdaMoE: zero slots carry no weight, the real ones share all of it
        raw_TK = raw_TK * (ids_TK < num_real)
        eps = 1e-20  # a token whose K slots are all zero experts gets all-zero weights, not NaN
    weights_TK = raw_TK / (raw_TK.sum(dim=-1, keepdim=True) + eps) if norm_topk_prob else raw_TK
    if sigmoid:
        weights_TK = weights_TK * routed_scaling_factor
    return logits_TE, weights_TK, ids_TK


class Qwen3MoePlusPlusRouter(Qwen3MoeTopKRouter):
    """transformers' Qwen3 router with N + Z outputs (a subclass, so output_router_logits still records it)."""

    def __init__(self, config):
        super().__init__(config)
        self.weight = nn.Parameter(torch.zeros(self.num_experts + num_zero_experts(config), self.hidden_dim))
        self.use_zce_mask = config.use_zce_mask
        self.renormalize_real = config.zce_normalization == "adamoe"

    def forward(self, hidden_states):
        x_TH = hidden_states.reshape(-1, self.hidden_dim)
        return route_with_zero_experts(x_TH, self.weight, self.num_experts, self.top_k, sigmoid=False,
                                       norm_topk_prob=self.norm_topk_prob, use_zce_mask=self.use_zce_mask,
                                       renormalize_real=self.renormalize_real)


class Glm4MoeLitePlusPlusRouter(Glm4MoeLiteTopkRouter):
    """transformers' GLM router with N + Z outputs and an [N + Z] correction bias (fp32, a buffer)."""

    def __init__(self, config):
        super().__init__(config)
        num_outputs = self.num_experts + num_zero_experts(config)
        self.weight = nn.Parameter(torch.zeros(num_outputs, self.hidden_dim, dtype=torch.float32))
        self.e_score_correction_bias = nn.Buffer(torch.zeros(num_outputs, dtype=torch.float32))
        self.use_zce_mask = config.use_zce_mask
        self.renormalize_real = config.zce_normalization == "adamoe"

    def forward(self, hidden_states):
        x_TH = hidden_states.view(-1, self.hidden_dim)
        return route_with_zero_experts(x_TH, self.weight, self.num_experts, self.top_k, sigmoid=True,
                                       norm_topk_prob=self.norm_topk_prob, use_zce_mask=self.use_zce_mask,
                                       renormalize_real=self.renormalize_real,
                                       correction_bias_E=self.e_score_correction_bias,
                                       routed_scaling_factor=self.routed_scaling_factor)


class RealExperts(nn.ModuleList):
    """The N real experts, one SwiGLU MLP each; zero experts (ids >= N) have no module and add exactly zero.

    Called as transformers' own experts are: experts(hidden_states [T, H], top_k_index [T, K], top_k_weights)."""

    def __init__(self, config, mlp_class):
        super().__init__(mlp_class(config, intermediate_size=config.moe_intermediate_size)
                         for _ in range(config.num_local_experts))

    def forward(self, hidden_states, top_k_index, top_k_weights):
        x_TH = hidden_states
        y_TH = torch.zeros(x_TH.shape, dtype=torch.float32, device=x_TH.device)  # fp32 sum of weighted outputs
        for e, expert in enumerate(self):
            token_M, slot_M = torch.where(top_k_index == e)  # zero-expert ids never match: skipped
            if token_M.numel() == 0:
                continue
            y_MH = expert(x_TH[token_M]).float() * top_k_weights[token_M, slot_M, None].float()
            y_TH.index_add_(0, token_M, y_MH)
        return y_TH.to(x_TH.dtype)


def add_zero_experts(layers, config, block_class, router_class, mlp_class) -> None:
    """Give every sparse MoE block of `layers` the zero-expert router and the per-expert real experts."""
    for layer in layers:
        if isinstance(layer.mlp, block_class):
            layer.mlp.gate = router_class(config)
            layer.mlp.experts = RealExperts(config, mlp_class)


# ---------------------------------------------------------------------------------------------------------------
# Models. The inner models are subclassed too: transformers applies its checkpoint conversions (per-expert keys
# fused into 3D tensors) to its own classes, and must not to these, whose experts stay per-expert modules.


class Qwen3MoePlusPlusModel(Qwen3MoeModel):
    config_class = Qwen3MoePlusPlusConfig

    def __init__(self, config):
        check_zero_expert_fields(config)  # again: from_pretrained(..., use_zce_mask=x) sets x after the config's checks
        super().__init__(config)
        add_zero_experts(self.layers, config, Qwen3MoeSparseMoeBlock, Qwen3MoePlusPlusRouter, Qwen3MoeMLP)
        self.post_init()


class Qwen3MoePlusPlusForCausalLM(Qwen3MoeForCausalLM):
    config_class = Qwen3MoePlusPlusConfig

    def __init__(self, config):
        super().__init__(config)
        # Replaces the transformers model built above (from_pretrained builds both on the meta device: no memory).
        self.model = Qwen3MoePlusPlusModel(config)
        # HF's Switch aux loss (output_router_logits=True) reads every router output, zero experts included.
        self.num_experts = config.num_experts + num_zero_experts(config)
        self.post_init()


class Glm4MoeLiteMtpLayer(nn.Module):
    """GLM's multi-token-prediction layer (layer num_hidden_layers + i of the checkpoint), held but never run:
    a decoder layer with a zero-expert MoE, plus the DeepSeek-V3 MTP tensors."""

    def __init__(self, config, layer_idx: int):
        super().__init__()
        H, V, eps = config.hidden_size, config.vocab_size, config.rms_norm_eps
        self.self_attn = Glm4MoeLiteAttention(config, layer_idx)
        self.mlp = Glm4MoeLiteMoE(config)
        add_zero_experts([self], config, Glm4MoeLiteMoE, Glm4MoeLitePlusPlusRouter, Glm4MoeLiteMLP)
        self.input_layernorm = Glm4MoeLiteRMSNorm(H, eps)
        self.post_attention_layernorm = Glm4MoeLiteRMSNorm(H, eps)
        self.enorm = Glm4MoeLiteRMSNorm(H, eps)  # normalises the next token's embedding
        self.hnorm = Glm4MoeLiteRMSNorm(H, eps)  # normalises the main model's hidden state
        self.eh_proj = nn.Linear(2 * H, H, bias=False)
        self.embed_tokens = nn.Embedding(V, H)
        self.shared_head = nn.Module()
        self.shared_head.norm = Glm4MoeLiteRMSNorm(H, eps)
        self.shared_head.head = nn.Linear(H, V, bias=False)

    def forward(self, *args, **kwargs):
        raise NotImplementedError("the MTP layer is kept for its weights only; transformers does not run it")


class Glm4MoeLitePlusPlusModel(Glm4MoeLiteModel):
    config_class = Glm4MoeLitePlusPlusConfig

    def __init__(self, config):
        check_zero_expert_fields(config)  # again: from_pretrained(..., use_zce_mask=x) sets x after the config's checks
        super().__init__(config)
        add_zero_experts(self.layers, config, Glm4MoeLiteMoE, Glm4MoeLitePlusPlusRouter, Glm4MoeLiteMLP)
        # The forward runs self.layers[:num_hidden_layers] only, so the MTP layers appended here are never run.
        for i in range(config.num_nextn_predict_layers):
            self.layers.append(Glm4MoeLiteMtpLayer(config, config.num_hidden_layers + i))
        self.post_init()


class Glm4MoeLitePlusPlusForCausalLM(Glm4MoeLiteForCausalLM):
    config_class = Glm4MoeLitePlusPlusConfig

    def __init__(self, config):
        super().__init__(config)
        self.model = Glm4MoeLitePlusPlusModel(config)  # replaces the one built above (meta device: no memory)
        self.post_init()
