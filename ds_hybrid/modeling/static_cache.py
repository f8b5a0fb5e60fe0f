"""A static hybrid cache: every tensor allocated once and then updated in place, so CUDA graphs can replay decode.

Layout, one cache layer per decoder layer:

- softmax layers: transformers' ``StaticLayer``, keys and values [B, H_kv, max_len, D] written with ``index_copy_``
  at a device-side counter (``cumulative_length``, a tensor advanced with ``add_``);
- sliding-window softmax layers (Gemma 3's local layers, Mistral, Qwen2's upper layers), when the window is shorter
  than max_len: :class:`RingSlidingLayer`, keys and values [B, H_kv, window, D] used as a ring. Position p lives in
  slot p % window, written at the same device-side counter, so a decode step reads ``window`` keys, not max_len.
  transformers' ``StaticSlidingWindowLayer`` also keeps only the window, but shifts it and branches on a Python
  counter, which a replayed graph cannot advance. The ring's slots are not in position order, so transformers'
  masks (which index keys by position) do not apply to it: a decode step gets its 4-D masks from
  :func:`decode_masks`, built from the counter on the device. Without a ring (a window >= max_len) a sliding layer
  is a full-length ``StaticLayer`` whose window the mask applies;
- linear layers: :class:`StaticRecurrentLayer`, the recurrent state [B, H, K, V] (fp32, as the kernels return it)
  and, with a short convolution, the last ``conv_size - 1`` inputs of q, k, v ([B, D, conv_size - 1] each), also
  with a device-side token counter.

Buffers are allocated by the first write (the eager prefill), with the shapes and dtypes the model produces; every
later write is a ``copy_`` into them, so their ``data_ptr`` never changes. ``reset()`` zeroes them in place for the
next prompt of the same batch size. Counters are tensors, so a captured decode step advances them on replay; no
Python-side count is read by a decode step. Positions and mask sizes do not depend on Python state either:
``get_mask_sizes`` is (max_len, 0) for every full-length layer and ``get_seq_length`` returns the counter tensor; a ring
layer's prefill (eager, from an empty cache) attends over the prompt itself and keeps its last ``window`` keys.

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


class RingSlidingLayer(StaticLayer):
    """A sliding-window layer's keys and values in ``window`` slots, position p in slot p % window (module docstring).

    The prefill (the first write after a reset: eager, any length) attends over the prompt's own keys, as the dynamic
    cache does, and keeps the last ``window`` of them; every later write is one token at the device-side counter,
    and the layer returns the whole ring, whose mask :func:`decode_masks` builds."""

    is_sliding = True

    def __init__(self, window: int, **kwargs):
        if window < 1:
            raise ConfigError("sliding_window", window, "give the model's attention window, at least 1 token")
        super().__init__(max_cache_len=window)
        self.window = window
        # Python-side, read only by eager prefills (as StaticRecurrentLayer.holds_state): False after reset()
        self.written = False

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        T = key_states.shape[-2]
        if self.written:  # a decode step: one token into its slot, in place; the ring is what it attends over
            if T != 1:
                raise NotImplementedError("a ring layer takes one prefill after a reset, then one token a step")
            slot = self.cumulative_length.remainder(self.window).reshape(1)
            self.keys.index_copy_(2, slot, key_states)
            self.values.index_copy_(2, slot, value_states)
            self.cumulative_length.add_(1)
            return self.keys, self.values
        n = min(T, self.window)  # the prefill: keep the last n positions, attend over all T
        slots = torch.arange(T - n, T, device=self.device).remainder(self.window)
        self.keys.index_copy_(2, slots, key_states[:, :, T - n :])
        self.values.index_copy_(2, slots, value_states[:, :, T - n :])
        self.cumulative_length.add_(T)
        self.written = True
        return key_states, value_states

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        if self.written:  # transformers' masks index keys by position, which the ring's slots are not
            raise NotImplementedError("a ring layer's decode mask comes from ds_hybrid.modeling.static_cache."
                                      "decode_masks (GraphDecoder passes it); transformers' masks do not fit a ring")
        return query_length, 0  # the prefill attends over the prompt's own keys

    def reset(self) -> None:
        super().reset()
        self.written = False

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("the static hybrid cache does not support beam search; use the dynamic cache")

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a ring of keys cannot be cropped (assisted/speculative decoding is unsupported)")


def static_softmax_layer(kind: str, max_cache_len: int, window: int | None) -> StaticLayer:
    """The static layer of a softmax layer of ``kind`` ('full_attention' / 'sliding_attention'): a ring of the
    window where the window is shorter than the cache (``window`` None: no rings, every layer full length)."""
    if kind == "sliding_attention" and window is not None and window < max_cache_len:
        return RingSlidingLayer(window)
    return StaticLayer(max_cache_len)


def decode_masks(cache: Cache, mask: torch.Tensor, float_dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The 4-D masks of one decode step over ``cache`` (before the step's write), [B, 1, 1, keys] each, by kind:
    'full_attention' over the full-length layers' max_len keys (the positions written so far, the query's included,
    that ``mask`` [B, max_len] does not mark as padding), 'sliding_attention' over a ring's ``window`` slots (slot s
    holds position t - (t - s) mod window after the query at position t is written: attended when >= 0 and not
    padding). Boolean (True = attend) for sdpa-style attention; with ``float_dtype``, additive (0 / the dtype's
    minimum) for eager attention. Built on the device from the cache's counter: nothing read on the host."""
    layers = [layer for layer in cache.layers if isinstance(layer, StaticLayer)]
    if not layers:
        raise ValueError("decode_masks: the cache has no softmax layer")
    t = layers[0].cumulative_length  # the query's position: every layer has written the same tokens
    out: dict[str, torch.Tensor] = {}
    full = next((layer for layer in layers if not isinstance(layer, RingSlidingLayer)), None)
    if full is not None:
        keys = torch.arange(full.max_cache_len, device=mask.device)
        out["full_attention"] = (keys <= t) & mask[:, : full.max_cache_len].bool()
    ring = next((layer for layer in layers if isinstance(layer, RingSlidingLayer)), None)
    if ring is not None:
        held = t - (t - torch.arange(ring.window, device=mask.device)).remainder(ring.window)  # [window] positions
        out["sliding_attention"] = (held >= 0) & mask.gather(1, held.clamp(min=0).expand(mask.shape[0], -1)).bool()
    for kind, allowed in out.items():
        allowed = allowed[:, None, None, :]
        if float_dtype is not None:
            allowed = torch.zeros(allowed.shape, dtype=float_dtype, device=mask.device).masked_fill(
                ~allowed, torch.finfo(float_dtype).min)
        out[kind] = allowed
    return out


class StaticHybridCache(HybridCache):
    """The hybrid's cache with static shapes: ``StaticLayer`` for softmax layers, ``StaticRecurrentLayer`` for linear.

    ``max_cache_len`` bounds prompt + generated tokens. A forward through the hybrid with this cache takes explicit
    ``position_ids``; a left-padded prompt is prefilled in one call with its [B, T] attention mask (the linear layers
    read it), and decode steps pass a [B, max_cache_len] mask whose prompt columns are the prompt's mask and whose
    other columns are 1 (the causal mask hides the future ones).
    """

    def __init__(self, layer_types: list[str], max_cache_len: int, window: int | None = None):
        if max_cache_len < 1:
            raise ConfigError("max_len", max_cache_len, "give the largest prompt + generated length, at least 1")
        layers: list = [  # sliding layers: a ring of the window, or full length (module docstring)
            StaticRecurrentLayer(max_cache_len) if t == "linear_attention" else static_softmax_layer(t, max_cache_len,
                                                                                                    window)
            for t in layer_types
        ]
        Cache.__init__(self, layers=layers)

    @classmethod
    def from_config(  # type: ignore[override]
        cls, config, max_cache_len: int, rings: bool = True
    ) -> "StaticHybridCache":
        """``rings``: sliding-window layers as rings of ``config.sliding_window`` (False: full length, masked)."""
        return cls(list(config.layer_types), max_cache_len, getattr(config, "sliding_window", None) if rings else None)

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
