"""HybridForCausalLM: the teacher's own transformer with linear mixers in place of some layers' softmax attention.

The hybrid *is* the teacher's model class (``LlamaModel``, ``Qwen2Model``, ...) built from the teacher's config,
with ``layers[i].self_attn`` swapped for a linear mixer in every layer not listed in ``softmax_layers``. Softmax
layers, MLPs, norms, embeddings and the lm_head are the teacher's modules running the teacher's code, so a hybrid
whose layers are all softmax reproduces the teacher's logits exactly, whatever the family (RoPE variants, GQA,
q/k norm, qkv bias, sliding windows). State-dict keys are the teacher's (``model.layers.3.self_attn.q_proj.weight``),
with mixer parameters under the same ``self_attn`` prefix.

    >>> import ds_hybrid  # registers "ds_hybrid" with transformers' Auto classes
    >>> from transformers import AutoModelForCausalLM
    >>> model = AutoModelForCausalLM.from_pretrained("out/hybrid")
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import AutoModel, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from ds_hybrid.errors import ConfigError
from ds_hybrid.modeling.cache import HybridCache
from ds_hybrid.modeling.configuration import HybridConfig
from ds_hybrid.modeling.mixers import GatedRMSNorm, LinearMixer, build_mixer
from ds_hybrid.modeling.static_cache import StaticHybridCache
from ds_hybrid.zero import gathered


class HybridLMHead(nn.Linear):
    """The lm_head. ``lm_head(h)`` gives logits; ``lm_head(h, loss_fn=f, **kw)`` returns ``f(h, self.weight, **kw)``.

    Training losses that read the weight directly (chunked or fused linear+KL) run through the second form, inside
    this module's forward: under ZeRO-3 that is where the weight is gathered and where its gradient enters
    DeepSpeed's partitioned reduction (exactly once), also when the weight is tied to the input embedding.
    """

    def forward(self, x: torch.Tensor, loss_fn: Any = None, **kwargs: Any) -> Any:
        if loss_fn is None:
            return super().forward(x)
        return loss_fn(x, self.weight, **kwargs)


PACKED_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "cu_seqlens")  # transformers' flattened-batch arguments


def check_not_packed(kwargs: dict, position_ids: torch.Tensor | None) -> None:
    """Refuse packed sequences (several documents in one row: flash-attention's ``cu_seq_lens_*`` arguments of
    DataCollatorWithFlattening, or position ids that restart inside a row). The softmax layers would keep the
    documents apart, the linear layers' recurrent and convolution state would flow from one into the next."""
    given = [k for k in PACKED_KWARGS if kwargs.get(k) is not None]
    restart = position_ids is not None and bool((position_ids[..., 1:] < position_ids[..., :-1]).any())
    if given or restart:
        raise ConfigError(given[0] if given else "position_ids", "packed sequences",
                          "a hybrid's linear layers carry their state along the row, across document boundaries; give "
                          "one sequence per row (padded, with an attention mask) instead of a flattened batch")


class HybridPreTrainedModel(PreTrainedModel):
    config: HybridConfig
    config_class = HybridConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True
    _skip_keys_device_placement = ["past_key_values"]
    _can_compile_fullgraph = False

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, LinearMixer):
            module.reset_parameters()  # fla's init for A_log / dt_bias; projections got the std-0.02 normal above

    def _initialize_missing_keys(self, is_quantized: bool) -> None:
        """Parameters a checkpoint lacks get their init. transformers hands the modules under ``self.model`` (a
        model of its own) to the teacher model's ``_init_weights``, which knows no mixer: a mixer's own parameters
        (A_log, dt_bias) missing from a checkpoint kept uninitialised memory. Loaded ones are left as loaded (the
        ``init`` functions skip them)."""
        super()._initialize_missing_keys(is_quantized)
        for m in self.modules():
            if isinstance(m, LinearMixer):
                own = list(m.parameters(recurse=False))
                if any(not getattr(p, "_is_hf_initialized", False) for p in own):
                    with gathered(own, modifier_rank=0):
                        m.reset_parameters()
            elif isinstance(m, GatedRMSNorm):  # (marked initialised as a module, so that Gemma 3's init leaves
                # it alone: a weight missing from the checkpoint, o_norm's or g_norm's, kept uninitialised memory)
                if not getattr(m.weight, "_is_hf_initialized", False):
                    with gathered([m.weight], modifier_rank=0), torch.no_grad():
                        m.weight.fill_(1.0)


class HybridForCausalLM(HybridPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: HybridConfig):
        super().__init__(config)
        # (built at the default dtype, not the teacher config's: a bf16 one made Gemma 3's embedding scale a bf16
        # buffer, which a cast to fp32 kept rounded, so the student's embeddings differed from the teacher's)
        self.model = AutoModel.from_config(config.teacher_config, dtype=torch.get_default_dtype())
        self._no_split_modules = list(getattr(self.model, "_no_split_modules", None) or [])
        options = config.options
        for i in config.linear_layers:
            self.model.layers[i].self_attn = build_mixer(
                config.mixer, config.hidden_size, config.num_attention_heads, config.head_dim, i, options,
                config.num_key_value_heads,
            )
        self.lm_head = HybridLMHead(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    # ---- structure -----------------------------------------------------------------------------------------
    @property
    def layers(self) -> nn.ModuleList:
        return self.model.layers

    def mixer(self, layer_idx: int) -> nn.Module:
        """The token mixer of a layer: a LinearMixer or the teacher's softmax attention module."""
        return self.model.layers[layer_idx].self_attn

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Module) -> None:
        if type(value) is nn.Linear:  # (resize_token_embeddings builds a plain Linear: kl's lm_head(h, loss_fn=...)
            value.__class__ = HybridLMHead  # then raised TypeError; the same module, its weight kept, our forward)
        self.lm_head = value

    def fuse_input_projections(self, enabled: bool = True) -> int:
        """Inference: each linear mixer's projections of x read as one GEMM at decode steps
        (``LinearMixer.fuse_input_projections``; ``enabled=False`` undoes it). Weights move in memory, so a CUDA graph
        decoder kept by ``generate(cuda_graphs=True)`` is dropped (rebuilt on the next call). Returns the number of
        mixers changed."""
        changed = 0
        for m in self.modules():
            if isinstance(m, LinearMixer):
                changed += m.fuse_input_projections() if enabled else m.unfuse_input_projections()
        if changed and "_graph_decoder" in self.__dict__:
            object.__delattr__(self, "_graph_decoder")
        return changed

    def unfuse_input_projections(self) -> int:
        return self.fuse_input_projections(enabled=False)

    def save_pretrained(self, *args: Any, **kwargs: Any):  # fused weights share storage: give each its own first
        self.unfuse_input_projections()
        return super().save_pretrained(*args, **kwargs)

    # ---- forward -------------------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: HybridCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        if use_cache is None:
            use_cache = bool(self.config.use_cache) and not self.training
        if use_cache and past_key_values is None:
            past_key_values = HybridCache.from_config(self.config)
        if past_key_values is not None and not isinstance(past_key_values, HybridCache) and self.config.linear_layers:
            raise TypeError(
                f"past_key_values is a {type(past_key_values).__name__}; a hybrid with linear layers needs a "
                "ds_hybrid HybridCache (generate() makes one; or HybridCache.from_config(model.config))"
            )
        T = (input_ids if input_ids is not None else inputs_embeds).shape[1]
        padding_mask = None
        # A static cache's decode step (T = 1) reads no padding: its token is real (left padding), its mask spans the
        # whole static length (so [:, -T:] is not this token), and the check below syncs with the host, which a CUDA
        # graph capture cannot do. Its prefill goes through the check like any forward.
        static_decode = isinstance(past_key_values, StaticHybridCache) and T == 1
        if (isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2 and self.config.linear_layers
                and not static_decode):
            current = attention_mask[:, -T:]
            if not bool(current.all()):
                padding_mask = current
        if self.config.linear_layers and not static_decode:
            check_not_packed(kwargs, position_ids if T > 1 and padding_mask is None else None)
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            linear_attn_padding_mask=padding_mask,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        slice_indices = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, slice_indices, :])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )

    # ---- generation ----------------------------------------------------------------------------------------
    def generate(self, inputs: torch.Tensor | None = None, generation_config: Any = None, **kwargs: Any):
        """transformers' ``generate``; with ``cuda_graphs=True`` (an argument, or an attribute of the generation
        config) greedy decoding runs through a static cache with the decode step replayed as a CUDA graph
        (:func:`ds_hybrid.graph_decode.generate_static`: same tokens, GPU bound; greedy only)."""
        config = generation_config if generation_config is not None else self.generation_config
        graphs = kwargs.pop("cuda_graphs", None)
        if graphs is None:
            graphs = bool(getattr(config, "cuda_graphs", False))
        if not graphs:
            return super().generate(inputs, generation_config, **kwargs)
        from ds_hybrid.graph_decode import generate_static

        with torch.no_grad():
            return generate_static(self, inputs, config, **kwargs)

    def _prepare_cache_for_generation(self, generation_config, model_kwargs: dict, *args: Any, **kwargs: Any):
        """generate() gets a HybridCache (KV for softmax layers, recurrent state for linear ones)."""
        if model_kwargs.get("past_key_values") is None and generation_config.use_cache is not False:
            if generation_config.cache_implementation not in (None, "dynamic", "dynamic_full"):
                raise ValueError(
                    f"cache_implementation={generation_config.cache_implementation!r} is not supported by ds_hybrid "
                    "models; leave it unset (a HybridCache is used). For a static cache and CUDA graphs pass "
                    "cuda_graphs=True to generate (greedy; ds-hybrid generate --cuda-graphs)"
                )
            model_kwargs["past_key_values"] = HybridCache.from_config(self.config)
            return None
        return super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)
