"""The bytes a decode step must move, and the speed ratio they allow: the bandwidth floor of hybrid decoding.

At batch sizes where decode is bound by memory bandwidth (a GPU step of an 8B model at batch 1-16), a step costs at
least (bytes read and written) / bandwidth. Per step and model, counted from the model's modules (meta-device models
work: no weights are needed):

- weights: every parameter once (the input embedding only as the B rows it looks up, unless it is tied to the LM
  head, which reads it whole);
- KV cache: each softmax layer reads its keys and values at the context length (a sliding-window layer: at most its
  window), [B, H_kv, T, D] each, in the cache dtype;
- recurrent state: each linear layer reads and writes its state [B, H, D, D] in fp32 (as the static cache holds it),
  plus its short-convolution windows if it has them.

``floor_ratio(teacher, hybrid)`` is teacher bytes / hybrid bytes: the decode speed-up a hybrid can reach at best
when both models are bandwidth bound at the same efficiency. It depends on the shapes alone, so it tells before any
training which targets a mixer shape can meet (docs/SERVING.md: at Llama-3-8B width the GDN mixer holds twice the
attention's parameters, which caps 4-of-32 hybrids at 1.61x at 32k tokens and batch 4). Activations and logits are
left out (a few MB at these batch sizes), so the floors are lower bounds of both steps.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from torch import nn

from ds_hybrid.modeling.families import teacher_layer_types

#: bytes of a recurrent-state element: the static cache keeps the state in fp32, as fla's kernels return it
STATE_BYTES = 4


@dataclass(frozen=True)
class StepBytes:
    """Bytes one decode step moves, by kind."""

    weights: int
    kv_cache: int
    recurrent_state: int

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.recurrent_state

    def floor_ms(self, bandwidth_gb_s: float) -> float:
        """The step's time at ``bandwidth_gb_s`` (1e9 bytes/s) if it only moved these bytes."""
        return self.total / (bandwidth_gb_s * 1e9) * 1e3

    def to_dict(self) -> dict:
        return {**asdict(self), "total": self.total}


def _is_linear_mixer(attn: nn.Module) -> bool:
    from ds_hybrid.modeling.mixers import LinearMixer

    return isinstance(attn, LinearMixer)


def decode_step_bytes(model: nn.Module, batch: int, context: int, dtype_bytes: int = 2,
                      windowed: bool = True) -> StepBytes:
    """What one decode step of ``model`` (a teacher or a hybrid) moves at ``batch`` sequences of ``context`` tokens,
    with weights and KV cache in ``dtype_bytes`` per element (2: bf16). ``windowed=False``: sliding-window layers
    read all ``context`` keys too (a static cache that holds them at full length, the window applied by the mask)."""
    if batch < 1 or context < 1:
        raise ValueError(f"batch and context must be >= 1 (got {batch}, {context})")
    cfg = model.config
    params = {id(p): p for p in model.parameters()}
    weights = sum(p.numel() for p in params.values()) * dtype_bytes
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    if head is None or head.weight is not emb:  # an untied embedding: only the B looked-up rows are read
        weights -= (emb.numel() - batch * emb.shape[1]) * dtype_bytes
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    # (a config without layer_types but with a window, Mistral's, slides in every layer: as transformers' cache does)
    types = teacher_layer_types(cfg)
    window = getattr(cfg, "sliding_window", None)
    kv = state = 0
    for layer, kind in zip(model.model.layers, types):
        attn = layer.self_attn
        if _is_linear_mixer(attn):
            state += 2 * batch * attn.num_heads * attn.head_dim * attn.head_dim * STATE_BYTES  # read + write
            if attn.options.use_short_conv:  # q, k, v windows of conv_size - 1 inputs, read + write
                channels = (attn.num_heads + 2 * attn.num_kv_heads) * attn.head_dim  # k, v: grouped_kv's heads
                state += 2 * batch * channels * (attn.options.conv_size - 1) * dtype_bytes
        else:
            seen = min(context, window) if kind == "sliding_attention" and window and windowed else context
            kv += 2 * batch * kv_heads * head_dim * seen * dtype_bytes  # keys and values
    return StepBytes(weights=weights, kv_cache=kv, recurrent_state=state)


def floor_ratio(teacher: nn.Module, hybrid: nn.Module, batch: int, context: int, dtype_bytes: int = 2) -> float:
    """Teacher bytes / hybrid bytes per decode step: the hybrid's best decode speed-up where both are bandwidth bound."""
    return (decode_step_bytes(teacher, batch, context, dtype_bytes).total
            / decode_step_bytes(hybrid, batch, context, dtype_bytes).total)
