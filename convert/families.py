"""Per-family Hugging Face checkpoint name maps.

One entry per supported ``model_type``. Everything that differs between families only in
*names* lives here; code that differs in *math* lives in ``mone_jax.model``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FamilyNames:
    """Checkpoint names of one family's MoE block (relative to ``model.layers.<l>.``)."""

    model_type: str
    moe_module: str  # "mlp" or Mixtral's "block_sparse_moe"
    router: str  # router module under moe_module ("gate", GPT-OSS "router")
    proj: tuple[str, str, str]  # per-expert (gate, up, down) projection names
    num_experts_key: str  # config.json key holding the routed expert count
    shared_expert: str | None = None  # shared expert module under moe_module
    shared_expert_gate: str | None = None  # Qwen2-MoE sigmoid gate of the shared expert
    router_bias: bool = False  # GPT-OSS router bias
    score_bias: str | None = None  # DeepSeek-V3 / GLM "e_score_correction_bias" (under router)
    fused_on_disk: bool = False  # GPT-OSS: experts.gate_up_proj [E, d, 2f] interleaved, biases
    dense_mlp_module: str = "mlp"  # module of dense (non-MoE) layers

    def moe_prefix(self, layer: int) -> str:
        return f"model.layers.{layer}.{self.moe_module}"

    def expert_key(self, layer: int, expert: int, which: int) -> str:
        """Key of expert ``expert``'s projection ``which`` (0 gate, 1 up, 2 down), per-expert layout."""
        return f"{self.moe_prefix(layer)}.experts.{expert}.{self.proj[which]}.weight"

    def router_key(self, layer: int, what: str = "weight") -> str:
        return f"{self.moe_prefix(layer)}.{self.router}.{what}"


_STD = ("gate_proj", "up_proj", "down_proj")

FAMILIES: dict[str, FamilyNames] = {
    "olmoe": FamilyNames("olmoe", "mlp", "gate", _STD, "num_experts"),
    "qwen2_moe": FamilyNames(
        "qwen2_moe", "mlp", "gate", _STD, "num_experts",
        shared_expert="shared_expert", shared_expert_gate="shared_expert_gate",
    ),
    "qwen3_moe": FamilyNames("qwen3_moe", "mlp", "gate", _STD, "num_experts"),
    "mixtral": FamilyNames("mixtral", "block_sparse_moe", "gate", ("w1", "w3", "w2"), "num_local_experts"),
    "deepseek_v2": FamilyNames("deepseek_v2", "mlp", "gate", _STD, "n_routed_experts", shared_expert="shared_experts"),
    "deepseek_v3": FamilyNames(
        "deepseek_v3", "mlp", "gate", _STD, "n_routed_experts",
        shared_expert="shared_experts", score_bias="e_score_correction_bias",
    ),
    "glm4_moe": FamilyNames(
        "glm4_moe", "mlp", "gate", _STD, "n_routed_experts",
        shared_expert="shared_experts", score_bias="e_score_correction_bias",
    ),
    "gpt_oss": FamilyNames(
        "gpt_oss", "mlp", "router", _STD, "num_local_experts", router_bias=True, fused_on_disk=True,
    ),
}

# Compressed model types written by the PyTorch reference (zxgx/mode-pd), mapped to their base.
COMPRESSED_SUFFIX = "_compressed"

REFUSED = {
    "llama4": "Llama-4 scales the expert INPUT by the routing weight, so a novice (constant output) is not defined",
    "llama4_text": "Llama-4 scales the expert INPUT by the routing weight, so a novice (constant output) is not defined",
}


def supported() -> str:
    return ", ".join(sorted(FAMILIES))


def family(model_type: str) -> FamilyNames:
    """Name map for ``model_type``; ValueError naming the supported families otherwise."""
    base = model_type.removesuffix(COMPRESSED_SUFFIX)
    if base in REFUSED:
        raise ValueError(f"model_type '{model_type}' is not supported: {REFUSED[base]}. Supported: {supported()}")
    if base not in FAMILIES:
        raise ValueError(f"model_type '{model_type}' is not supported. Supported: {supported()}")
    return FAMILIES[base]
