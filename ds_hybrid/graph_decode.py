"""Greedy decoding with a static cache, its decode step optionally captured in a CUDA graph.

Eager decoding is host bound: a decode step launches 1,500-2,000 kernels, and at batch 1-8 launching them takes
longer than running them (docs/BENCHMARKS.md). A CUDA graph launches a whole recorded step at once. A graph replays
fixed addresses, so everything a step reads or writes lives in a buffer allocated once: the static cache
(:mod:`ds_hybrid.modeling.static_cache` for hybrids, transformers' ``StaticCache`` for plain HF models), the input
token, the positions and the attention mask.

    decoder = GraphDecoder(model, max_len=4096, cuda_graphs=True)
    out = decoder.generate(input_ids, attention_mask, max_new_tokens=64)   # [B, prompt + 64]

What is supported:
- models: a ds_hybrid ``HybridForCausalLM`` (softmax + linear layers, any K including 0) and the HF causal LMs of
  the supported families, sliding-window layers included (Gemma 3, Mistral, Qwen2: such a layer's static KV is a
  ring of its window, so a step reads the window, not max_len; with sdpa and eager mixed, or DS_HYBRID_STATIC_RINGS=0,
  it holds max_len positions and the mask applies the window, as a global layer's memory and reads); attention
  through sdpa or eager only (flash attention takes the static mask, all ones past the prompt, as none, and would
  attend to unwritten slots: refused, naming attn_implementation);
- greedy only, exactly ``max_new_tokens`` tokens per row (no stop at EOS: cut the output afterwards);
- batch sizes: exact. One static cache, buffer set and graph per batch size met, kept for the next call with that
  batch size (memory: one cache of [B, max_len] per batch size used); ``generate_static`` (``generate(...,
  cuda_graphs=True)``, ``eval --cuda-graphs``) runs a smaller batch in a larger one it holds, so a caller's
  remainder batches add none;
- prompts of different lengths: left padding with a [B, T] attention mask (1 = token, 0 = pad). Softmax layers mask
  the pads; linear layers skip them in the prefill (no write, no decay), so a padded row decodes as it would alone;
- ``max_len`` bounds prompt + new tokens; a longer request raises a ConfigError naming ``max_len``.

The step is the same code with and without graphs: a model forward of [B, 1] tokens with explicit positions and the
static [B, max_len] mask, argmax written back into the input buffer and positions advanced in place. The cache
counters are device tensors advanced inside the forward, so a replay advances them too. On CPU, or with
``cuda_graphs=False``, the step runs eagerly. With graphs, the first call at a batch size runs ``warmup_steps``
eager steps on a side stream (kernel compilation and autotuning happen there; they are real decode steps), then
captures one step (capture records and runs nothing) and replays it for the remaining steps.

``compile=True`` hands the step to torch.compile first (backend ``DS_HYBRID_COMPILE_BACKEND``, default inductor,
static shapes), then captures the compiled step: a decode step is ~60 small kernels a layer (norms, activations,
casts, copies) that Inductor fuses into a few. The whole step is one graph (the linear layers' recurrent ops are
custom ops, ``ds_hybrid::gated_delta_rule_step`` and ``ds_hybrid::gated_linear_attention_step``, opaque to the
tracer), compiled once per decoder and batch size during the warm-up steps (a minute or more at 8B). Fused kernels
round differently from the eager ones, so greedy tokens may part from the eager path's at a near-tie; they are
checked equal on CPU, and ``bench/graph_decode_check.py --compile`` reports where they part on a GPU.
"""

from __future__ import annotations

import gc
import itertools
import os
import warnings
from dataclasses import dataclass

import torch
from transformers.cache_utils import StaticLayer

from ds_hybrid.errors import ConfigError
from ds_hybrid.modeling.decode_attention import decode_attention, fp32_out_bmm, sdpa_configs
from ds_hybrid.modeling.mixers import LinearMixer
from ds_hybrid.modeling.static_cache import RingSlidingLayer, StaticHybridCache, decode_masks, static_softmax_layer
from ds_hybrid.stages.common import compile_backend
from ds_hybrid.triton_env import triton_interpreted


@dataclass
class _Slot:
    """What one batch size's decode step reads and writes; addresses fixed for the slot's life."""

    cache: object
    tokens: torch.Tensor  # [B, 1] long: the step's input, overwritten by its argmax
    positions: torch.Tensor  # [B, 1] long: the input's position ids, advanced in place
    mask: torch.Tensor  # [B, max_len] long: the prompt's padding mask, ones after it
    graph: torch.cuda.CUDAGraph | None = None
    steps_left: int = 0  # decode steps that still fit in max_len after the last prefill


#: attention implementations whose decode step takes the 4-D masks of a ring cache (decode_masks): bool masks for
#: sdpa (and ds_hybrid's decode attention, which replaces it in a step), additive float masks for eager
RING_MASKS = {"sdpa": "bool", "eager": "float"}


def attention_implementations(model) -> set[str]:
    """The attention implementations the model's (sub-)configs name."""
    impls = {getattr(m.config, "_attn_implementation", None) for m in model.modules() if hasattr(m, "config")}
    return {i for i in impls if i is not None}


#: the attention implementations the static step supports (each reads the static cache's 2-D or 4-D mask)
STATIC_ATTENTION = frozenset({"sdpa", "eager"})


def ring_mask_format(model) -> str | None:
    """'bool' / 'float': the model's sliding-window layers get ring caches in the static path, their decode masks in
    that format; None: full-length layers, their window applied by transformers' own masks (flash attention and
    other implementations, which read no 4-D mask, or a mix of sdpa and eager; or DS_HYBRID_STATIC_RINGS=0)."""
    if os.environ.get("DS_HYBRID_STATIC_RINGS", "1") == "0":  # full-length sliding layers (to measure the rings)
        return None
    formats = {RING_MASKS.get(i) for i in attention_implementations(model)}
    return formats.pop() if len(formats) == 1 and None not in formats else None


def eager_masks_made_here(model) -> bool:
    """Whether the static decode step builds eager attention's 4-D masks itself (decode_masks, or a stand-in where
    no layer reads one): every layer eager, and either its sliding-window layers held as rings (ring_mask_format;
    where the window covers the cache they are full length, and the full mask is exact) or no sliding layer at all.
    Otherwise transformers builds them, from a host scalar copied to the device in every step."""
    return attention_implementations(model) == {"eager"} and (
        ring_mask_format(model) == "float" or full_kv_sliding_layers(model) == 0)


def eager_graph_refusal(model, compile: bool) -> str | None:
    """Why CUDA graphs cannot capture this model's decode step (None: they can): transformers' eager mask copies a
    host scalar to the device in every step, which a capture refuses (a compiled step folds it into a constant)."""
    impls = attention_implementations(model)
    if compile or "eager" not in impls or eager_masks_made_here(model):
        return None
    return (f"this model's eager attention (implementations {sorted(impls)}, DS_HYBRID_STATIC_RINGS="
            f"{os.environ.get('DS_HYBRID_STATIC_RINGS', 'unset')}) takes transformers' eager mask in every decode "
            "step, which CUDA graph capture refuses: load the model with attn_implementation='sdpa', compile the step "
            "(`ds-hybrid generate|bench-infer --cuda-graphs --compile`, GraphDecoder(compile=True)), or use one "
            "implementation for every layer with the ring caches on (DS_HYBRID_STATIC_RINGS unset or not 0)")


def interpreter_graph_refusal(model) -> str | None:
    """Why CUDA graphs cannot capture this model's decode step under Triton's interpreter (None: they can): its
    linear-attention layers run fla's Triton kernels (backend auto or fla on CUDA), which the interpreter runs on host
    copies of their tensors (a device-to-host copy per kernel, which a capture refuses)."""
    if not triton_interpreted() or not any(isinstance(m, LinearMixer) and m.options.backend != "torch"
                                           for m in model.modules()):
        return None
    return (f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')} runs the linear-attention layers' Triton kernels "
            "in Triton's interpreter, on host copies of their tensors, which CUDA graph capture refuses: set "
            "TRITON_INTERPRET=0 (before Triton is imported) to decode through CUDA graphs, or decode without them")


def make_static_cache(model, max_len: int, rings: bool = True):
    """A static cache for ``model``: StaticHybridCache for a hybrid, transformers' StaticCache otherwise; its
    sliding-window layers as rings of the window (``rings`` and the window shorter than max_len) or full length."""
    if getattr(model.config, "model_type", None) == "ds_hybrid":
        return StaticHybridCache.from_config(model.config, max_len, rings=rings)
    from transformers import StaticCache

    cache = StaticCache(config=model.config, max_cache_len=max_len)
    # transformers' own sliding layer keeps a Python-side counter, which a replayed graph would not advance
    window = getattr(model.config, "sliding_window", None) if rings else None
    cache.layers = [static_softmax_layer("sliding_attention", max_len, window) if getattr(layer, "is_sliding", False)
                    else layer for layer in cache.layers]
    return cache


def full_kv_sliding_layers(model) -> int:
    """How many of the model's softmax layers are sliding-window layers, which the static cache holds at full length
    when it keeps no rings (their window applied by the mask): a step reads max_len keys there, not the window."""
    from ds_hybrid.modeling.families import teacher_layer_types

    cfg = model.config
    types = list(cfg.layer_types) if getattr(cfg, "model_type", None) == "ds_hybrid" else teacher_layer_types(cfg)
    return sum(t == "sliding_attention" for t in types)


def padding_positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids of a left-padded batch as transformers' generate() makes them: 0.. on real tokens, 0 on pads."""
    return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)


def check_left_padded(mask: torch.Tensor) -> None:
    if mask.dim() != 2:
        raise ConfigError("attention_mask", tuple(mask.shape), "give a [batch, prompt_len] mask of 0 (pad) / 1")
    if not bool((mask[:, -1] == 1).all()):
        raise ConfigError("attention_mask", "right padding", "pad prompts on the left (tokenizer.padding_side='left')")
    if not bool((mask[:, 1:] >= mask[:, :-1]).all()):
        raise ConfigError("attention_mask", "holes", "each row must be zeros (pads) then ones (tokens), left padded")


#: a static cache's length is rounded up to a multiple of this: decode attention's score rows are then 16-byte
#: aligned for the GPU's matmuls (an odd length, e.g. 32,801, coincided with a decode step 2-3x its GPU time at
#: Llama-3-8B shape, docs/SERVING.md) and divide into its key blocks (decode_attention.KEY_BLOCKS)
CACHE_MULTIPLE = 256


#: with ``compile=True``: dynamo's recompile limit is raised to at least this many compiled decode steps per process
COMPILED_STEPS_LIMIT = 64


def weights_key(model: torch.nn.Module) -> int:
    """Where and how the model's weights are held (each parameter's device, dtype and storage address): a decoder's
    static buffers and captured graphs are for one such layout; ``.to()``, ``.half()``, fusing projections or
    ``load_state_dict(assign=True)`` make another (an in-place load keeps it, and the graphs read the new values).
    Buffers too: a ``.to()`` that leaves bf16 weights where they are may still move the RoPE frequencies (and Gemma's
    embedding scale), which a captured graph reads."""
    return hash(tuple((t.device, t.dtype, t.data_ptr())
                      for t in itertools.chain(model.parameters(), model.buffers())))


class GraphDecoder:
    """Greedy generation through a static cache; see the module docstring for what is supported."""

    def __init__(self, model, max_len: int, cuda_graphs: bool = False, warmup_steps: int = 2,
                 compile: bool = False):
        if max_len < 2:
            raise ConfigError("max_len", max_len, "give the largest prompt + new-token count to serve, at least 2")
        if warmup_steps < 1:
            raise ConfigError("warmup_steps", warmup_steps, "use at least 1 eager step before a capture")
        other = sorted(attention_implementations(model) - STATIC_ATTENTION)
        if other:  # (flash attention takes the 2-D mask, all ones past the prompt, as "no mask", and attends to the
            # static cache's unwritten slots: every softmax layer's output diluted by zero keys, tokens wrong)
            raise ConfigError("attn_implementation", other[0], "the static cache decodes through sdpa or eager "
                              "attention, which read its mask of the positions written so far: load the model with "
                              "attn_implementation='sdpa' (or 'eager')")
        self.model = model
        self.max_len = max_len
        self.weights = weights_key(model)
        # the cache holds a multiple of CACHE_MULTIPLE positions (the ones past max_len are never attended to)
        self.cache_len = -(-max_len // CACHE_MULTIPLE) * CACHE_MULTIPLE
        self.device = next(model.parameters()).device
        # graphs need CUDA; elsewhere the same static step runs eagerly
        self.uses_graphs = bool(cuda_graphs) and self.device.type == "cuda"
        self.warmup_steps = warmup_steps
        self._slots: dict[int, _Slot] = {}
        # decode steps attend through ds_hybrid.modeling.decode_attention (no KV-head expansion over the static cache)
        self._sdpa_configs = sdpa_configs(model)
        # sliding-window layers as rings of their window, their decode masks built in the step (None: full length)
        self._ring_format = ring_mask_format(model)
        # eager attention: every step's 4-D masks are built here where they can be (eager_masks_made_here), rings or
        # not: transformers' eager mask makes a host scalar into a device tensor per call, a copy that CUDA graph
        # capture refuses; where they cannot be, an uncompiled capture is refused here rather than at the capture
        self._own_masks = eager_masks_made_here(model)
        float_masks = self._ring_format == "float" or self._own_masks
        self._mask_dtype = next(model.parameters()).dtype if float_masks else None
        refusals = [r for r in (eager_graph_refusal(model, compile), interpreter_graph_refusal(model))
                    if r] if self.uses_graphs else []
        if refusals:
            raise ConfigError("cuda_graphs", True, "; and ".join(refusals))
        self.compiled = bool(compile)
        self._forward = self._forward_step
        self._logits = self._step_logits  # score()'s forward: compiled alike with compile=True (on first use)
        if self.compiled:
            fp32_out_bmm(self.device)  # decided eagerly: the probe's try/except is not traced
            # one compiled step per (decoder, batch size): past dynamo's default of 8 for the step's code, later
            # decoders would silently run eagerly (bench-infer meets models x contexts x batches of them)
            dynamo_config = torch._dynamo.config
            dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, COMPILED_STEPS_LIMIT)
            self._forward = torch.compile(self._forward_step, backend=compile_backend(), dynamic=False)

    # ---- public -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, max_new_tokens: int = 32
    ) -> torch.Tensor:
        """[B, T] prompt ids (left padded if ``attention_mask`` has zeros) -> [B, T + max_new_tokens] ids."""
        first = self.prefill(input_ids, attention_mask, max_new_tokens)
        rest = self.decode(input_ids.shape[0], max_new_tokens - 1)
        return torch.cat([input_ids.to(self.device), first, rest], dim=1)

    @torch.no_grad()
    def prefill(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, max_new_tokens: int = 1
    ) -> torch.Tensor:
        """Fill the batch size's static cache with the prompt (eagerly) -> the first new token [B, 1]."""
        if input_ids.dim() != 2:
            raise ConfigError("input_ids", tuple(input_ids.shape), "give a [batch, prompt_len] tensor of token ids")
        B, T = input_ids.shape
        if max_new_tokens < 1:
            raise ConfigError("max_new_tokens", max_new_tokens, "generate at least 1 token")
        if T + max_new_tokens > self.max_len:
            raise ConfigError(
                "max_len", self.max_len,
                f"the prompt ({T} tokens) + max_new_tokens ({max_new_tokens}) = {T + max_new_tokens} do not fit; "
                "raise max_len (--max-len) or shorten the request",
            )
        ids = input_ids.to(self.device)
        mask = torch.ones_like(ids) if attention_mask is None else attention_mask.to(self.device).long()
        if mask.shape != ids.shape:
            raise ConfigError("attention_mask", tuple(mask.shape), f"give the shape of input_ids, {tuple(ids.shape)}")
        check_left_padded(mask)
        slot = self._slot(B)
        slot.cache.reset()  # in place: the buffers keep their addresses
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=padding_positions(mask),
                         past_key_values=slot.cache, use_cache=True, logits_to_keep=1)
        first = out.logits[:, -1:].float().argmax(-1)
        slot.tokens.copy_(first)
        slot.positions.copy_(mask.sum(-1, keepdim=True))  # the next real position of every row
        slot.mask.fill_(1)
        slot.mask[:, :T].copy_(mask)
        slot.steps_left = self.max_len - T - 1
        return first.clone()

    @torch.no_grad()
    def decode(self, batch: int, steps: int) -> torch.Tensor:
        """``steps`` greedy steps after :meth:`prefill` at this batch size -> their tokens [B, steps]."""
        if batch not in self._slots:
            raise ConfigError("batch", batch, "call prefill() with a prompt of this batch size first")
        slot = self._slots[batch]
        if steps > slot.steps_left:
            raise ConfigError("max_len", self.max_len, f"{steps} more steps do not fit; raise max_len (--max-len)")
        slot.steps_left -= steps
        out: list[torch.Tensor] = []
        if self.uses_graphs and slot.graph is None and steps > self.warmup_steps:
            out += self._capture(slot)
        while len(out) < steps:
            if slot.graph is not None:
                slot.graph.replay()
            else:
                self._step(slot)
            out.append(slot.tokens.clone())
        if not out:
            return torch.empty(batch, 0, dtype=torch.long, device=self.device)
        return torch.cat(out, dim=1)

    @torch.no_grad()
    def score(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, continuation: torch.Tensor
    ) -> torch.Tensor:
        """Teacher forcing through the static step: prefill the prompt, then feed ``continuation`` [B, S] one token a
        step (no CUDA graph) -> fp32 logits [B, S, V], row s predicting the token after ``continuation[:, s]``.

        The same forward as a decode step, so its logits can be set beside another path's on one token sequence
        (``bench/graph_decode_check.py`` compares them with the dynamic cache's and an fp32 reference's). The batch
        size's cache then holds the forced tokens: decode() after score() is refused until the next prefill.
        With ``compile=True`` the step's logits come from the same code compiled the same way (torch.compile, static
        shapes; without the argmax, so one more compile per batch size on first use): what the compiled step's
        rounding does to the logits is measured, not only where its greedy tokens part."""
        if continuation.dim() != 2 or continuation.shape[0] != input_ids.shape[0]:
            raise ConfigError("continuation", tuple(continuation.shape),
                              f"give [batch, steps] token ids with the prompt's batch size {input_ids.shape[0]}")
        B, S = continuation.shape
        self.prefill(input_ids, attention_mask, max(S, 1))
        slot = self._slots[B]
        slot.steps_left = 0  # the input buffer holds the last forced token, not a greedy choice
        if self.compiled and self._logits == self._step_logits:
            self._logits = torch.compile(self._step_logits, backend=compile_backend(), dynamic=False)
        out = []
        with decode_attention(configs=self._sdpa_configs):
            for s in range(S):
                slot.tokens.copy_(continuation[:, s : s + 1])
                out.append(self._logits(slot.tokens, slot.mask, slot.positions, slot.cache).float())
                slot.positions.add_(1)
        if not out:
            return torch.empty(B, 0, self.model.config.vocab_size, device=self.device)
        return torch.stack(out, dim=1)

    def cache(self, batch: int):
        """The static cache of a batch size (after a prefill at that size)."""
        return self._slots[batch].cache

    def release(self) -> None:
        """Let go of every batch size's cache, buffers and graph now, and of the bound steps through which the
        decoder refers to itself (else freed only at a collection); the decoder is not used after."""
        self._slots.clear()
        self._forward = self._logits = None

    @property
    def batch_sizes(self) -> list[int]:
        """The batch sizes this decoder holds a static cache (and graphs) for."""
        return sorted(self._slots)

    @property
    def full_kv_sliding_layers(self) -> int:
        """Sliding-window layers this decoder's caches hold at full length (no rings: see ring_mask_format)."""
        return 0 if self._ring_format is not None else full_kv_sliding_layers(self.model)

    # ---- internals ----------------------------------------------------------------------------------------
    def _slot(self, batch: int) -> _Slot:
        if batch not in self._slots:
            dev = self.device
            self._slots[batch] = _Slot(
                cache=make_static_cache(self.model, self.cache_len, rings=self._ring_format is not None),
                tokens=torch.zeros(batch, 1, dtype=torch.long, device=dev),
                positions=torch.zeros(batch, 1, dtype=torch.long, device=dev),
                mask=torch.ones(batch, self.cache_len, dtype=torch.long, device=dev),
            )
        return self._slots[batch]

    def _step(self, slot: _Slot) -> None:
        """One decode step reading and writing only the slot's buffers: the region a CUDA graph captures."""
        with decode_attention(configs=self._sdpa_configs):
            self._forward(slot.tokens, slot.mask, slot.positions, slot.cache)

    def _forward_step(self, tokens: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache) -> None:
        """The step's work, in place: what ``compile=True`` hands to torch.compile (the same code either way)."""
        logits = self._step_logits(tokens, mask, positions, cache)
        tokens.copy_(logits.float().argmax(-1, keepdim=True))
        positions.add_(1)

    def _step_logits(self, tokens: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache) -> torch.Tensor:
        """[B, V] logits of one decode step (the cache advances by one token)."""
        attention_mask: torch.Tensor | dict[str, torch.Tensor] = mask
        layers = cache.layers
        if any(isinstance(layer, RingSlidingLayer) for layer in layers) or (
                self._own_masks and any(isinstance(layer, StaticLayer) for layer in layers)):
            # transformers' masks index keys by position, a ring's slots are not in that order: the step's 4-D
            # masks by kind (a model of one kind of softmax layer takes its 4-D mask as such: Llama, Mistral)
            masks = decode_masks(cache, mask, self._mask_dtype)
            attention_mask = masks if len(masks) > 1 else next(iter(masks.values()))
        elif self._own_masks:  # eager, no softmax layer (all-linear): no layer reads a mask, but transformers would
            # still build its eager one from the 2-D mask; a 4-D one is taken as it is
            attention_mask = torch.zeros(mask.shape[0], 1, 1, 1, dtype=self._mask_dtype, device=mask.device)
        return self.model(input_ids=tokens, attention_mask=attention_mask, position_ids=positions,
                          past_key_values=cache, use_cache=True).logits[:, -1]

    def _capture(self, slot: _Slot) -> list[torch.Tensor]:
        """Warm up on a side stream (real steps, their tokens returned), then capture one step into slot.graph."""
        out = []
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(self.warmup_steps):
                self._step(slot)
                out.append(slot.tokens.clone())
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # on the model's device (cuda:N where the current device is another: a capture stream of the current device
        # records none of the step's kernels, which run eagerly, and every replay would do nothing)
        with torch.cuda.device(self.device), torch.cuda.graph(graph, stream=torch.cuda.Stream(self.device)):
            self._step(slot)  # records the step's kernels; nothing runs, so no state advances
        slot.graph = graph
        return out


# ---- generate() with cuda_graphs ----------------------------------------------------------------------------------
#: max_len is rounded up to a multiple of this, so that requests of nearby lengths reuse one decoder and its graphs
MAX_LEN_BUCKET = 256
_COUNTS = ("num_beams", "num_return_sequences")  # fine at 1
_UNSUPPORTED = ("logits_processor", "stopping_criteria", "streamer", "assistant_model", "prefix_allowed_tokens_fn",
                "negative_prompt_ids", "inputs_embeds")
# generation settings that change greedy tokens (logits processors, stop strings), with the values that leave them
# off: the static step takes the argmax of the raw logits, so any other value is refused, not ignored
_NEUTRAL: dict[str, tuple] = {
    "repetition_penalty": (None, 1.0), "encoder_repetition_penalty": (None, 1.0), "min_length": (None, 0),
    "min_new_tokens": (None, 0), "no_repeat_ngram_size": (None, 0), "encoder_no_repeat_ngram_size": (None, 0),
    "bad_words_ids": (None,), "suppress_tokens": (None,), "begin_suppress_tokens": (None,),
    "forced_bos_token_id": (None,), "forced_eos_token_id": (None,), "sequence_bias": (None,),
    "exponential_decay_length_penalty": (None,), "guidance_scale": (None, 1.0), "stop_strings": (None,),
}


def active_settings(generation_config, kwargs: dict) -> list[str]:
    """The settings of ``generation_config`` (or ``kwargs``, which win) that greedy decoding through the static step
    would ignore: each named as ``name=value``."""
    out = []
    for name, neutral in _NEUTRAL.items():
        value = kwargs[name] if name in kwargs else getattr(generation_config, name, None)
        if value is not None and not (isinstance(value, (list, tuple, dict)) and not value) and value not in neutral:
            out.append(f"{name}={value!r}")
    return out


def finish_at_eos(out: torch.Tensor, prompt_len: int, eos_ids: list[int], pad_id: int | None) -> torch.Tensor:
    """What ``generate`` returns for greedy tokens ``out`` [B, T + N]: after a row's first EOS its tokens become
    ``pad_id``, and the output ends once every row has ended (or at N new tokens)."""
    if not eos_ids:
        return out
    new = out[:, prompt_len:]
    is_eos = torch.isin(new, torch.tensor(eos_ids, device=new.device))
    ended_before = (is_eos.long().cumsum(1) - is_eos.long()) > 0  # an EOS earlier in the row
    if pad_id is None:
        pad_id = eos_ids[0]
    new = new.masked_fill(ended_before, pad_id)
    ended_by = is_eos.long().cumsum(1) > 0  # [B, N]: the row has produced its EOS at or before this step
    done = ended_by.all(0).nonzero()
    n = int(done[0]) + 1 if len(done) else new.shape[1]
    return torch.cat([out[:, :prompt_len], new[:, :n]], dim=1)


def generate_static(model, inputs: torch.Tensor | None, generation_config, **kwargs) -> torch.Tensor:
    """``model.generate(..., cuda_graphs=True)``: greedy decoding through a :class:`GraphDecoder` kept on the model
    (CUDA graphs on a GPU, the same static step eagerly elsewhere). Returns what greedy ``generate`` returns: the
    prompt and the new tokens, pads after each row's EOS, ending when every row has ended."""
    bad = [k for k in _UNSUPPORTED if kwargs.get(k) is not None]
    bad += [k for k in _COUNTS if kwargs.get(k, getattr(generation_config, k, None)) not in (None, 1)]
    if kwargs.get("do_sample", getattr(generation_config, "do_sample", False)) is True:
        bad.append("do_sample")
    if bad:
        raise ConfigError("cuda_graphs", True, f"graph decoding is greedy only; drop {', '.join(bad)} or cuda_graphs")
    if active := active_settings(generation_config, kwargs):
        raise ConfigError("cuda_graphs", True, f"graph decoding takes the argmax of the raw logits and would ignore "
                          f"{', '.join(active)} (the generation config's or the call's): pass each as its neutral "
                          "value to generate() or set it so in the model's generation_config.json, or drop "
                          "cuda_graphs")
    input_ids = kwargs.pop("input_ids", inputs)
    if input_ids is None:
        raise ConfigError("input_ids", None, "give the prompt ids (inputs_embeds are not supported with cuda_graphs)")
    max_new = kwargs.get("max_new_tokens") or getattr(generation_config, "max_new_tokens", None)
    if not max_new:
        raise ConfigError("max_new_tokens", max_new, "give max_new_tokens with cuda_graphs (max_length is not used)")
    eos = kwargs.get("eos_token_id", getattr(generation_config, "eos_token_id", None))
    eos_ids = [] if eos is None else ([int(eos)] if isinstance(eos, int) else [int(e) for e in eos])
    pad = kwargs.get("pad_token_id", getattr(generation_config, "pad_token_id", None))
    T = input_ids.shape[1]
    need = -(-(T + max_new) // MAX_LEN_BUCKET) * MAX_LEN_BUCKET
    decoder = getattr(model, "_graph_decoder", None)
    # reuse a long enough one (and its graphs) made for these weights where they are now, else replace it
    if decoder is None or decoder.max_len < T + max_new or decoder.weights != weights_key(model):
        if decoder is not None:  # its caches and graph pool go before the new ones are made (it refers to itself
            # through its bound step, so dropping it frees nothing until a collection)
            model.__dict__.pop("_graph_decoder", None)
            decoder.release()
            del decoder
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        decoder = GraphDecoder(model, max_len=need, cuda_graphs=True)
        object.__setattr__(model, "_graph_decoder", decoder)
        if not decoder.uses_graphs:
            warnings.warn("cuda_graphs: the model is not on a CUDA device; the static-cache step runs eagerly (same "
                          "tokens, no speed-up)", stacklevel=2)
    mask = kwargs.get("attention_mask")
    if mask is None and pad is not None and not (eos_ids and int(pad) in eos_ids) and bool((input_ids == pad).any()):
        mask = (input_ids != pad).long()  # (as generate infers it: pads present, the pad token not an EOS)
    B = input_ids.shape[0]
    # a batch smaller than one the decoder already holds runs in that one's cache, its last row repeated and the
    # repeats dropped (rows decode independently): a caller whose batches end in a remainder (lm-eval, one per task
    # group) keeps one [B, max_len] cache and graph set, not one more per remainder size
    wider = [b for b in decoder.batch_sizes if b > B]
    if wider:
        extra = min(wider) - B
        input_ids = torch.cat([input_ids, input_ids[-1:].expand(extra, -1)])
        if mask is not None:
            mask = torch.cat([mask, mask[-1:].expand(extra, -1)])
    out = decoder.generate(input_ids, mask, int(max_new))[:B]
    return finish_at_eos(out, T, eos_ids, pad)
