"""Teacher families a hybrid can be made from, and the facts about a teacher config the hybrid needs."""

from __future__ import annotations

from transformers import PreTrainedConfig

from ds_hybrid.errors import ConfigError

# model_type -> what it is. All four share the decoder layer shape the hybrid relies on: pre-norm residual blocks
# with `self_attn` (q/k/v/o projections, RoPE, GQA; Qwen2 adds q/k/v bias and per-layer sliding windows; Qwen3 adds
# q/k RMSNorm; Mistral a global sliding window), `mlp`, `input_layernorm`, `post_attention_layernorm`.
SUPPORTED_FAMILIES: dict[str, str] = {
    "llama": "Llama 2/3, SmolLM2",
    "qwen2": "Qwen2 / Qwen2.5",
    "qwen3": "Qwen3 (dense)",
    "mistral": "Mistral",
}


def check_family(config: PreTrainedConfig, field: str = "teacher") -> str:
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_FAMILIES:
        supported = ", ".join(f"{k} ({v})" for k, v in SUPPORTED_FAMILIES.items())
        raise ConfigError(field, model_type, f"unsupported teacher architecture; supported: {supported}")
    return model_type


def head_dim(config: PreTrainedConfig) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def teacher_layer_types(config: PreTrainedConfig) -> list[str]:
    """Per-layer attention kind of the teacher: 'full_attention' or 'sliding_attention'."""
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return list(layer_types)
    if getattr(config, "sliding_window", None) is not None:  # Mistral: one window for every layer
        return ["sliding_attention"] * config.num_hidden_layers
    return ["full_attention"] * config.num_hidden_layers
