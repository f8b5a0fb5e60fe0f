"""RADLADS stage 0: build a hybrid student from a teacher and transfer its weights, one module at a time.

    >>> student = build_hybrid(teacher, softmax_layers=[3, 7], mixer="gdn")

Everything but the replaced attention is copied as is (embeddings, norms, MLPs, lm_head, softmax layers). In each
linear layer the mixer takes W_q and W_o from the teacher's attention, and W_k, W_v repeated over the query-head groups
(GQA: kv head j serves query heads j*g .. j*g+g-1); its gates, decays and norms keep fla's fresh initialisation.
Qwen2's q/k/v biases are dropped unless ``mixer_options.qkv_bias`` is true; Qwen3's q/k RMSNorm weights are not
used by linear layers (GDN L2-normalises q and k itself).

Copies go module by module through :func:`ds_hybrid.zero.gathered`, so the same code fills a ZeRO-3 partitioned
student from a partitioned teacher without any rank holding either model whole.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn
from transformers import PreTrainedModel

from ds_hybrid.modeling import HybridConfig, HybridForCausalLM
from ds_hybrid.modeling.families import check_family, layer_rest
from ds_hybrid.modeling.mixers import LinearMixer
from ds_hybrid.modeling.precision import cast
from ds_hybrid.zero import gathered


@torch.no_grad()
def copy_module(dst: nn.Module, src: nn.Module) -> None:
    """Copy every parameter and buffer of ``src`` into the same-named one of ``dst`` (shapes must match)."""
    src_params = dict(src.named_parameters())
    dst_params = dict(dst.named_parameters())
    if set(src_params) != set(dst_params):
        raise ValueError(f"parameter names differ: {sorted(set(src_params) ^ set(dst_params))}")
    with gathered(src_params.values()), gathered(dst_params.values(), modifier_rank=0):
        for name, p in dst_params.items():
            if p.shape != src_params[name].shape:
                raise ValueError(f"{name}: shape {tuple(p.shape)} != teacher's {tuple(src_params[name].shape)}")
            p.copy_(src_params[name])


@torch.no_grad()
def copy_layer_rest(dst: nn.Module, src: nn.Module) -> None:
    """Copy everything of a decoder layer but its token mixer."""
    d, s = layer_rest(dst), layer_rest(src)
    if set(d) != set(s):
        raise ValueError(f"decoder layers differ: {sorted(set(d) ^ set(s))}")
    for name, m in d.items():
        copy_module(m, s[name])


@torch.no_grad()
def init_mixer_from_teacher(mixer: LinearMixer, attn: nn.Module, num_kv_heads: int) -> None:
    with gathered(attn.parameters()), gathered(mixer.parameters(), modifier_rank=0):
        mixer.init_from_teacher(attn, num_kv_heads)


def hybrid_config(
    teacher_config, softmax_layers: Sequence[int], mixer: str = "gdn", mixer_options: dict | None = None,
    teacher_weights: str | None = None,
) -> HybridConfig:
    check_family(teacher_config)
    d = teacher_config.to_dict()
    d.pop("quantization_config", None)
    return HybridConfig(
        teacher_config=d, softmax_layers=list(softmax_layers), mixer=mixer, mixer_options=mixer_options or {},
        teacher_weights=teacher_weights,
    )


@torch.no_grad()
def transfer_weights(teacher: PreTrainedModel, student: HybridForCausalLM) -> None:
    """Fill ``student`` from ``teacher`` (stage 0). Softmax layers are copied; linear layers get the RADLADS init."""
    t, s = teacher.model, student.model
    if len(t.layers) != len(s.layers):
        raise ValueError(f"teacher has {len(t.layers)} layers, student {len(s.layers)}")
    copy_module(s.embed_tokens, t.embed_tokens)
    copy_module(s.norm, t.norm)
    if not student.config.tie_word_embeddings:
        copy_module(student.lm_head, teacher.lm_head)
    num_kv = teacher.config.num_key_value_heads
    for i, (tl, sl) in enumerate(zip(t.layers, s.layers)):
        copy_layer_rest(sl, tl)
        if isinstance(sl.self_attn, LinearMixer):
            init_mixer_from_teacher(sl.self_attn, tl.self_attn, num_kv)
        else:
            copy_module(sl.self_attn, tl.self_attn)


def build_hybrid(
    teacher: PreTrainedModel,
    softmax_layers: Sequence[int],
    mixer: str = "gdn",
    mixer_options: dict | None = None,
) -> HybridForCausalLM:
    """Stage 0 in one call: a new hybrid (same dtype and device as the teacher) with transferred weights."""
    config = hybrid_config(teacher.config, softmax_layers, mixer, mixer_options)
    p = next(teacher.parameters())
    with torch.device(p.device):  # built where the teacher is (an 8B student initialises in seconds on a GPU)
        student = HybridForCausalLM(config)
    student = cast(student, p.dtype)  # RoPE's buffers stay fp32, as the teacher's (modeling/precision.py)
    transfer_weights(teacher, student)
    return student


@torch.no_grad()
def restore_softmax_layers(student: HybridForCausalLM, teacher: PreTrainedModel, layers: Sequence[int]) -> HybridForCausalLM:
    """A new hybrid with ``layers`` turned back into the teacher's softmax attention; everything else from ``student``.

    Used by stage kl (start from the align checkpoint, restore the selected layers) and by selection probes.
    """
    keep = sorted(set(student.config.softmax_layers) | set(layers))
    if len(teacher.model.layers) != len(student.model.layers):
        raise ValueError(f"the teacher has {len(teacher.model.layers)} layers, the student "
                         f"{len(student.model.layers)}: restore layers from the student's own teacher")
    # the student's own config (its teacher's, with what the student set apart from it: special token ids, a longer
    # max_position_embeddings), not the teacher's: the new hybrid is the student with more softmax layers
    config = hybrid_config(student.config.teacher_config, keep, student.config.mixer, student.config.mixer_options,
                           student.config.teacher_weights)
    p = next(student.parameters())
    new = cast(HybridForCausalLM(config), p.dtype, p.device)
    new.generation_config = copy.deepcopy(student.generation_config)
    copy_module(new.model.embed_tokens, student.model.embed_tokens)
    copy_module(new.model.norm, student.model.norm)
    if not new.config.tie_word_embeddings:
        copy_module(new.lm_head, student.lm_head)
    for i, (nl, sl) in enumerate(zip(new.model.layers, student.model.layers)):
        copy_layer_rest(nl, sl)
        if i in layers and isinstance(sl.self_attn, LinearMixer):
            copy_module(nl.self_attn, teacher.model.layers[i].self_attn)
        else:
            copy_module(nl.self_attn, sl.self_attn)
    return new
