"""The hybrid's generation cache: a KV cache for softmax layers, a recurrent (and conv) state for linear ones.

Built on transformers' cache layers: softmax layers use ``DynamicLayer`` / ``DynamicSlidingWindowLayer`` exactly as
the teacher would; linear layers use :class:`RecurrentStateLayer`, a ``LinearAttentionLayer`` that also counts the
tokens it has seen, so that position ids and mask sizes are right even when no softmax layer exists (K = 0).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer, DynamicSlidingWindowLayer, LinearAttentionLayer


class RecurrentStateLayer(LinearAttentionLayer):
    """State of one linear layer: the recurrent state [B, H, K, V], the short-conv inputs, and a token count."""

    is_sliding = False
    # The state is replaced (not copied in place) when the batch changes, so no static addresses: generate() must
    # not pre-build 4-D masks for a "compileable" cache, which would hide the 2-D padding mask linear layers need.
    is_compileable = False

    def __init__(self, **kwargs):
        super().__init__(number_of_states=1)
        self.seen_tokens = 0
        self.conv_cache: tuple[torch.Tensor, ...] | None = None

    def get_seq_length(self) -> int:
        return self.seen_tokens

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # Asked before this step's tokens are added, as for a full-attention layer.
        return self.seen_tokens + query_length, 0

    def reset(self) -> None:
        super().reset()
        self.seen_tokens = 0
        self.conv_cache = None

    def _map_states(self, fn) -> None:
        if self.is_recurrent_states_initialized[0]:
            self.recurrent_states[0] = fn(self.recurrent_states[0])
        if self.conv_cache is not None:
            self.conv_cache = tuple(fn(c) for c in self.conv_cache)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_states(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_states(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_states(lambda t: t[indices, ...])

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a recurrent state cannot be cropped (assisted/speculative decoding is unsupported)")


class HybridCache(Cache):
    """One cache layer per decoder layer, by the hybrid's ``layer_types`` (full / sliding / linear attention)."""

    def __init__(self, layer_types: list[str], sliding_window: int | None = None):
        layers = []
        for t in layer_types:
            if t == "linear_attention":
                layers.append(RecurrentStateLayer())
            elif t == "sliding_attention":
                layers.append(DynamicSlidingWindowLayer(sliding_window=sliding_window))
            else:
                layers.append(DynamicLayer())
        super().__init__(layers=layers)

    @classmethod
    def from_config(cls, config) -> "HybridCache":
        return cls(list(config.layer_types), getattr(config, "sliding_window", None))

    # Linear layers track their own length, so every layer can answer (the base class refuses linear layers).
    def get_seq_length(self, layer_idx: int = 0) -> int:
        if layer_idx >= len(self.layers):
            return 0
        return self.layers[layer_idx].get_seq_length()

    def get_mask_sizes(self, query_length: int, layer_idx: int) -> tuple[int, int]:
        if layer_idx >= len(self.layers):
            return query_length, 0
        return self.layers[layer_idx].get_mask_sizes(query_length)

    def get_linear_state(self, layer_idx: int) -> tuple[torch.Tensor | None, tuple | None]:
        layer = self._linear_layer(layer_idx)
        state = layer.recurrent_states[0] if layer.is_recurrent_states_initialized[0] else None
        return state, layer.conv_cache

    def set_linear_state(self, layer_idx: int, state: torch.Tensor, conv_cache: tuple | None, n_tokens: int) -> None:
        layer = self._linear_layer(layer_idx)
        # Assign rather than copy in place: the state's batch size can change between generate() calls.
        layer.recurrent_states[0] = state.detach()
        layer.is_recurrent_states_initialized[0] = True
        layer.has_previous_state[0] = True
        layer.conv_cache = conv_cache
        layer.seen_tokens += n_tokens

    def _linear_layer(self, layer_idx: int) -> RecurrentStateLayer:
        layer = self.layers[layer_idx]
        if not isinstance(layer, RecurrentStateLayer):
            raise TypeError(f"layer {layer_idx} is not a linear-attention layer of this HybridCache")
        return layer
