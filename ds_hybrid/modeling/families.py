"""Teacher families a hybrid can be made from, and the facts about a teacher config the hybrid needs."""

from __future__ import annotations

from torch import nn
from transformers import PreTrainedConfig

from ds_hybrid.errors import ConfigError

# model_type -> what it is. All share the decoder layer shape the hybrid relies on: residual blocks whose token
# mixer is `self_attn` (q/k/v/o projections, RoPE, GQA; Qwen2 adds q/k/v bias and per-layer sliding windows; Qwen3
# adds q/k RMSNorm; Mistral a global sliding window; Gemma 3 q/k RMSNorm, sliding and global layers with their own
# RoPE bases, extra pre/post norms around attention and MLP, a scaled embedding), beside the other modules of the
# layer (`mlp` and the norms), which the hybrid copies as they are.
SUPPORTED_FAMILIES: dict[str, str] = {
    "llama": "Llama 2/3, SmolLM2",
    "qwen2": "Qwen2 / Qwen2.5",
    "qwen3": "Qwen3 (dense)",
    "mistral": "Mistral",
    "gemma3_text": "Gemma 3 (text: Gemma3ForCausalLM)",
}
# model_type -> why it is refused and what to use instead
NEAR_MISSES: dict[str, str] = {
    "gemma3": "this is the multimodal Gemma 3 (Gemma3ForConditionalGeneration: the 4B, 12B and 27B checkpoints); "
              "take its language model out once with `ds-hybrid extract-text --model <this folder> --out <new "
              "folder>` and use the new folder as the teacher",
}


# families whose `attention_bias` puts a bias on o_proj too (Qwen2's q/k/v biases are fixed, Mistral has none: both
# ignore the field)
O_PROJ_BIAS_FAMILIES: tuple[str, ...] = ("llama", "qwen3", "gemma3_text")


def check_family(config: PreTrainedConfig, field: str = "teacher") -> str:
    model_type = getattr(config, "model_type", None)
    if model_type in NEAR_MISSES:
        raise ConfigError(field, model_type, NEAR_MISSES[model_type])
    if model_type not in SUPPORTED_FAMILIES:
        supported = ", ".join(f"{k} ({v})" for k, v in SUPPORTED_FAMILIES.items())
        raise ConfigError(field, model_type, f"unsupported teacher architecture; supported: {supported}")
    prefix = field.rsplit(".", 1)[0] if field.endswith(".model_type") else field
    if model_type in O_PROJ_BIAS_FAMILIES and getattr(config, "attention_bias", False):
        raise ConfigError(f"{prefix}.attention_bias", True,
                          "this teacher's attention has biases, o_proj's included; a linear mixer's output "
                          "projection has none, so the transfer would drop them: not supported (Qwen2's q/k/v "
                          "biases, kept with mixer_options.qkv_bias, are)")
    if getattr(config, "use_bidirectional_attention", False):
        raise ConfigError(f"{prefix}.use_bidirectional_attention", True,
                          "an encoder-style teacher (EmbeddingGemma) attends both ways; the linear mixers are causal, "
                          "so its hybrid would be a different model: use a causal language model as the teacher")
    if getattr(config, "final_logit_softcapping", None):
        raise ConfigError(f"{prefix}.final_logit_softcapping", config.final_logit_softcapping,
                          "a soft cap on the logits (tanh(z / c) * c) is not applied by the hybrid or the fused KL "
                          "loss: not supported (Gemma 3's published configs have none)")
    return model_type


# rope types whose published configs already give the extended length as max_position_embeddings (Llama 3.1/3.2's
# llama3 with 131,072 positions over an original 8,192; Gemma 3 4B+'s linear x 8 with 131,072; Phi-3's longrope)
_EXTENDED_IN_PLACE = {"linear", "llama3", "longrope"}


def trained_context(config: PreTrainedConfig) -> int | None:
    """The longest sequence the teacher's positions are meant for: ``max_position_embeddings``; for a RoPE type that
    extends past it at run time (YaRN, dynamic NTK), the original length (``original_max_position_embeddings``, else
    ``max_position_embeddings``) times the factor where that is longer (Qwen2.5 ships 32,768 positions and documents
    YaRN x 4 for 131,072; Qwen3 40,960 with YaRN x 4 over 32,768). linear, llama3 and longrope configs already state
    the extended length as ``max_position_embeddings``. None where the config does not say."""
    n = getattr(config, "max_position_embeddings", None)
    if not n:
        return None
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    # one set of parameters, or one per layer type (Gemma 3: {"full_attention": {...}, "sliding_attention": {...}})
    one = "rope_type" in params or "type" in params
    sets = [params] if one else [v for v in params.values() if isinstance(v, dict)]
    context = int(n)
    for p in sets:
        kind = p.get("rope_type", p.get("type", "default"))
        if kind == "default" or kind in _EXTENDED_IN_PLACE:
            continue
        original = p.get("original_max_position_embeddings") or getattr(config, "original_max_position_embeddings",
                                                                         None) or n
        context = max(context, int(original * float(p.get("factor") or 1.0)))
    return context


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


def layer_rest(layer: nn.Module) -> dict[str, nn.Module]:
    """A decoder layer's modules other than its token mixer ``self_attn``: the MLP and every norm (Llama: input and
    post-attention; Gemma 3 also the pre/post feed-forward norms), in the layer's order."""
    return {name: m for name, m in layer.named_children() if name != "self_attn"}


def check_context(field: str, seq_len: int, config: PreTrainedConfig) -> None:
    """Refuse ``seq_len`` (the setting ``field``) beyond the teacher's :func:`trained_context`: its targets there are
    positions the teacher never trained on."""
    context = trained_context(config)
    if context and seq_len > context:
        raise ConfigError(field, seq_len,
                          f"longer than the teacher's context ({context} tokens: max_position_embeddings, or the "
                          f"original length times its YaRN/dynamic RoPE factor); its targets past that are positions "
                          f"it never trained on: use {field.rsplit('.', 1)[-1]} <= {context}, or give the teacher's config the RoPE scaling it "
                          f"supports")
