"""A static hybrid cache: every tensor allocated once and then updated in place, so CUDA graphs can replay decode.

Layout, one cache layer per decoder layer:

- softmax layers: transformers' ``StaticLayer``, keys and values [B, H_kv, max_len, D] written with ``index_copy_``
  at a device-side counter (``cumulative_length``, a tensor advanced with ``add_``). Sliding-window layers (Gemma 3's
  local layers, Mistral, Qwen2's upper layers) get the same full-length layer: the window is applied by the mask
  (transformers' sliding-window causal mask over absolute positions, as for any layer of this cache), not by a ring
  buffer, so they hold max_len positions like a global layer (transformers' ``StaticSlidingWindowLayer`` keeps only
  the window, but branches on a Python counter, which a replayed graph cannot advance);
- linear layers: :class:`StaticRecurrentLayer`, the recurrent state [B, H, K, V] (fp32, as the kernels return it)
  and, with a short convolution, the last ``conv_size - 1`` inputs of q, k, v ([B, D, conv_size - 1] each), also
  with a device-side token counter.

Buffers are allocated by the first write (the eager prefill), with the shapes and dtypes the model produces; every
later write is a ``copy_`` into them, so their ``data_ptr`` never changes. ``reset()`` zeroes them in place for the
next prompt of the same batch size. Counters are tensors, so a captured decode step advances them on replay; no
Python-side count is kept. Positions and mask sizes do not depend on Python state either: ``get_mask_sizes`` is
(max_len, 0) for every layer and ``get_seq_length`` returns the counter tensor.

Not supported: beam search and cropping.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, LinearAttentionLayer, StaticLayer

from ds_hybrid.errors import ConfigError
from ds_hybrid.modeling.cache import HybridCache


class StaticRecurrentLayer(LinearAttentionLayer):
    """Fixed-address state of one linear layer: recurrent state, short-conv window, token counter (a tensor)."""

    is_sliding = False
    is_compileable = True

    def __init__(self, max_cache_len: int, **kwargs):
        super().__init__(number_of_states=1)
        self.max_cache_len = max_cache_len
        self.cumulative_length = torch.zeros((), dtype=torch.long)
        self.conv_cache: tuple[torch.Tensor, ...] | None = None
        # Python-side, read only by eager prefills: False after reset(), so a new prompt starts from no state
        # (exactly as the dynamic cache does) while the buffers keep their addresses.
        self.holds_state = False

    def get_seq_length(self) -> torch.Tensor:
        return self.cumulative_length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.max_cache_len, 0  # as StaticLayer: masks span the whole static KV length

    def get_max_length(self) -> int:
        return self.max_cache_len

    def read(self) -> tuple[torch.Tensor | None, tuple[torch.Tensor, ...] | None]:
        if not self.holds_state:
            return None, None
        return self.recurrent_states[0], self.conv_cache

    def write(self, state: torch.Tensor, conv_cache: tuple[torch.Tensor, ...] | None, n_tokens: int) -> None:
        state = state.detach()
        if not self.is_recurrent_states_initialized[0]:  # first write: allocate the buffers for good
            self.recurrent_states[0] = state.clone()
            self.conv_cache = None if conv_cache is None else tuple(c.detach().clone() for c in conv_cache)
            self.cumulative_length = self.cumulative_length.to(state.device)
            self.is_recurrent_states_initialized[0] = True
            self.batch_size = state.shape[0]
        else:
            _copy_into(self.recurrent_states[0], state, "recurrent state")
            if conv_cache is not None:
                if self.conv_cache is None:
                    raise RuntimeError("a short-conv window appeared after the first write; the model changed")
                for buf, new in zip(self.conv_cache, conv_cache):
                    _copy_into(buf, new, "short-conv window")
        self.cumulative_length.add_(n_tokens)
        self.holds_state = True
        self.has_previous_state[0] = True

    def reset(self) -> None:
        if self.is_recurrent_states_initialized[0]:
            self.recurrent_states[0].zero_()
        for c in self.conv_cache or ():
            c.zero_()
        self.cumulative_length.zero_()
        self.holds_state = False
        self.has_previous_state[0] = False

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("the static hybrid cache does not support beam search; use the dynamic cache")

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a recurrent state cannot be cropped (assisted/speculative decoding is unsupported)")


def _copy_into(buf: torch.Tensor, new: torch.Tensor, what: str) -> None:
    if buf.shape != new.shape:
        raise ValueError(
            f"{what} of shape {tuple(new.shape)} does not fit the static buffer {tuple(buf.shape)}: a static cache "
            "serves one batch size; make a new StaticHybridCache for another"
        )
    buf.copy_(new)


class StaticHybridCache(HybridCache):
    """The hybrid's cache with static shapes: ``StaticLayer`` for softmax layers, ``StaticRecurrentLayer`` for linear.

    ``max_cache_len`` bounds prompt + generated tokens. A forward through the hybrid with this cache takes explicit
    ``position_ids``; a left-padded prompt is prefilled in one call with its [B, T] attention mask (the linear layers
    read it), and decode steps pass a [B, max_cache_len] mask whose prompt columns are the prompt's mask and whose
    other columns are 1 (the causal mask hides the future ones).
    """

    def __init__(self, layer_types: list[str], max_cache_len: int):
        if max_cache_len < 1:
            raise ConfigError("max_len", max_cache_len, "give the largest prompt + generated length, at least 1")
        layers: list = [  # sliding layers too: full length, their window applied by the mask (module docstring)
            StaticRecurrentLayer(max_cache_len) if t == "linear_attention" else StaticLayer(max_cache_len)
            for t in layer_types
        ]
        Cache.__init__(self, layers=layers)

    @classmethod
    def from_config(cls, config, max_cache_len: int) -> "StaticHybridCache":  # type: ignore[override]
        return cls(list(config.layer_types), max_cache_len)

    def get_linear_state(self, layer_idx: int) -> tuple[torch.Tensor | None, tuple | None]:
        return self._static_linear_layer(layer_idx).read()

    def set_linear_state(self, layer_idx: int, state: torch.Tensor, conv_cache: tuple | None, n_tokens: int) -> None:
        self._static_linear_layer(layer_idx).write(state, conv_cache, n_tokens)

    def _static_linear_layer(self, layer_idx: int) -> StaticRecurrentLayer:
        layer = self.layers[layer_idx]
        if not isinstance(layer, StaticRecurrentLayer):
            raise TypeError(f"layer {layer_idx} is not a linear-attention layer of this StaticHybridCache")
        return layer


def static_tensors(cache: Cache) -> list[torch.Tensor]:
    """Every allocated tensor of a static cache (KV, states, conv windows, counters), this hybrid's or transformers'
    ``StaticCache``: a CUDA graph replays their addresses, so these must never move."""
    out: list[torch.Tensor] = []
    for layer in cache.layers:
        if isinstance(layer, StaticRecurrentLayer):
            if layer.is_recurrent_states_initialized[0]:
                out.append(layer.recurrent_states[0])
            out += list(layer.conv_cache or ())
        elif layer.is_initialized:
            out += [layer.keys, layer.values]
        out.append(layer.cumulative_length)
    return out
