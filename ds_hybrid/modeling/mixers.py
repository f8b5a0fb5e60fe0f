"""Linear-attention mixers that replace a teacher layer's softmax attention (RADLADS stage 0 lives here too).

Two mixers, parameter-for-parameter the layers of flash-linear-attention (fla) so checkpoints map one to one:

- ``gdn``: Gated DeltaNet (fla ``GatedDeltaNet``). The paper's main student ("gdn_v4" in its reference code):
  output gate on, no short convolution, expand_v = 1, one head per teacher query head, head_dim = the teacher's.
- ``gla``: Gated Linear Attention (fla ``GatedLinearAttention`` with expand_k = expand_v = 1, output gate on).

Variants are options (:class:`MixerOptions`): short convolution, output gate, negative eigenvalues (GDN), gate rank
and normaliser (GLA), projection bias.

A mixer is called where the teacher calls its attention (``layer.self_attn(hidden_states=..., **kwargs)``) and
returns ``(output, None)``. It ignores RoPE (linear layers use no positional rotation, as in RADLADS) and the 4-D
causal mask; it reads the 2-D padding mask from ``linear_attn_padding_mask`` so that left-padded batches are exact:
a padded position leaves the recurrent state untouched (k = v = 0, no decay).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init

from ds_hybrid.errors import ConfigError
from ds_hybrid.modeling import ops

MIXERS: tuple[str, ...] = ("gdn", "gla")
# fla's chunk kernels keep a [K, V] state tile per head in shared memory; they are written for head dims <= 256.
MAX_HEAD_DIM = 256
#: GDN's a and b projections have one output column per head; with a head count that is not a multiple of this
#: (SmolLM2: 9) their GEMMs' rows are misaligned and cuBLAS runs its slowest kernels (docs/BENCHMARKS.md, explore
#: lease), so both run as one GEMM whose output is padded to a multiple of it
AB_ALIGN = 8


@dataclass
class MixerOptions:
    """Options of a linear mixer. Defaults are the paper's main form for GDN and fla's defaults for GLA."""

    use_gate: bool = True  # output gate: o = RMSNorm(o) * silu(W_g x)
    use_short_conv: bool = False  # depthwise causal conv (kernel conv_size) + silu on q, k, v
    conv_size: int = 4
    allow_neg_eigval: bool = False  # GDN only: beta in (0, 2)
    gate_low_rank_dim: int = 16  # GLA only: rank of the forget-gate projection
    gate_logit_normalizer: float = 16.0  # GLA only: gk = logsigmoid(W x) / normalizer
    norm_eps: float = 1e-5
    # Qwen2/2.5 teachers have q/k/v biases. The paper's reference code drops them (fla's projections have none);
    # qkv_bias=True keeps them (k/v biases repeated over query groups like the weights).
    qkv_bias: bool = False
    backend: str = "auto"  # "auto" (fla kernels on CUDA, torch references elsewhere), "fla" or "torch"
    # k/v projections at the teacher's KV-head count, repeated over the query heads of each group at run time (GQA
    # for linear attention): the same function at stage 0, k and v tied within a group afterwards, and fewer weight
    # bytes a decode step (docs/SERVING.md, the bandwidth floor). False: one k/v row block per query head (the paper)
    grouped_kv: bool = False

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None, field_prefix: str = "mixer_options") -> "MixerOptions":
        d = dict(d or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"{field_prefix}.{unknown[0]}", d[unknown[0]], f"unknown option; known: {sorted(known)}")
        types = {f.name: f.type for f in fields(cls)}
        for name, value in d.items():  # YAML reads 1e-5 as a string (1.0e-5 as a float): values take the option's type
            d[name] = _typed(value, types[name], f"{field_prefix}.{name}")
        opts = cls(**d)
        if opts.conv_size < 2:
            raise ConfigError(f"{field_prefix}.conv_size", opts.conv_size, "use a kernel size of at least 2")
        if opts.backend not in ops.BACKENDS:
            raise ConfigError(f"{field_prefix}.backend", opts.backend, f"choose one of {ops.BACKENDS}")
        if opts.gate_low_rank_dim < 1:
            raise ConfigError(f"{field_prefix}.gate_low_rank_dim", opts.gate_low_rank_dim, "use a positive rank")
        for name in ("gate_logit_normalizer", "norm_eps"):  # 0 or below: NaN logits, or GLA's decay turned growth
            if not (math.isfinite(getattr(opts, name)) and getattr(opts, name) > 0):
                raise ConfigError(f"{field_prefix}.{name}", getattr(opts, name), "use a positive, finite number")
        return opts

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def differences(self, other: "MixerOptions", mixer: str) -> list[str]:
        """The options where ``other``'s ``mixer`` mixers would be a different function or hold other weights: every
        option the mixer uses but ``backend`` (it only picks the kernels), where the two differ."""
        unused = {"backend", *UNUSED_OPTIONS.get(mixer, ())}
        if not (self.use_short_conv or other.use_short_conv):
            unused.add("conv_size")
        return [f.name for f in fields(self) if f.name not in unused and getattr(self, f.name) != getattr(other, f.name)]


# options a mixer never reads (a difference in them changes nothing)
UNUSED_OPTIONS: dict[str, tuple[str, ...]] = {"gdn": ("gate_low_rank_dim", "gate_logit_normalizer"),
                                              "gla": ("allow_neg_eigval",)}


def _typed(value: Any, kind: str, field: str) -> Any:
    """``value`` as the option type ``kind`` ("bool", "int", "float" or "str"), or a ConfigError naming the field."""
    want = {"bool": bool, "int": int, "float": float, "str": str}[kind]
    if isinstance(value, want) and not (want is int and isinstance(value, bool)):
        return value
    if want is float and not isinstance(value, bool):
        try:
            return float(value)
        except (TypeError, ValueError):
            pass
    if want is int and isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
    raise ConfigError(field, value, f"expected {'an' if kind == 'int' else 'a'} {kind}")


def check_mixer(mixer: str, head_dim: int, field: str = "mixer") -> None:
    if mixer not in MIXERS:
        raise ConfigError(field, mixer, f"unknown mixer; choose one of {MIXERS}")
    if head_dim > MAX_HEAD_DIM:
        raise ConfigError(
            "teacher.head_dim", head_dim,
            f"linear mixers take head dims up to {MAX_HEAD_DIM} (fla's kernels); this teacher cannot be converted",
        )
    if head_dim % 8 != 0:
        raise ConfigError("teacher.head_dim", head_dim, "linear mixers need a head dim that is a multiple of 8")


class ShortConvolution(nn.Conv1d):
    """Depthwise causal conv + silu, fla's ``ShortConvolution`` parameter layout (weight [D, 1, K])."""

    def __init__(self, hidden_size: int, kernel_size: int, bias: bool = False):
        super().__init__(hidden_size, hidden_size, kernel_size, groups=hidden_size, bias=bias, padding=0)

    def forward(self, x: torch.Tensor, cache: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [B, T, D]; cache: the last K-1 inputs [B, D, K-1] or None. Returns (silu(conv(x)), new cache)."""
        K = self.kernel_size[0]
        xt = x.transpose(1, 2)
        left = cache if cache is not None else xt.new_zeros(xt.shape[0], xt.shape[1], K - 1)
        full = torch.cat([left.to(xt.dtype), xt], dim=-1)
        y = F.conv1d(full, self.weight, self.bias, groups=self.groups)
        return F.silu(y).transpose(1, 2), full[..., -(K - 1):].detach()


class GatedRMSNorm(nn.Module):
    """RMSNorm over the head dim, optionally gated: norm(x) * weight * silu(g) (fla's FusedRMSNormGated math)."""

    def __init__(self, hidden_size: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))
        # initialised here: transformers' init must leave it alone, because Gemma 3's zeroes every "*RMSNorm" module
        # (its norms scale by 1 + weight; this one scales by weight)
        self._is_hf_initialized = True

    def forward(self, x: torch.Tensor, g: torch.Tensor | None = None) -> torch.Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + self.eps) * self.weight.float()
        if g is not None:
            y = y * F.silu(g.float())
        return y.to(x.dtype)


def _shares(p: torch.Tensor, base: torch.Tensor) -> bool:
    """Whether ``p`` lies in ``base``'s memory (a view made by fuse_input_projections)."""
    return p.device == base.device and p.untyped_storage().data_ptr() == base.untyped_storage().data_ptr()


def repeat_kv_weight(w: torch.Tensor, num_kv_heads: int, groups: int) -> torch.Tensor:
    """[n_kv * d, ...] -> [n_kv * groups * d, ...]: KV head j serves query heads j*groups .. j*groups+groups-1.

    This is the head-wise GQA repeat that HF attention applies at run time (``repeat_kv``). The paper's reference
    code instead repeats each *row* (einops ``'h d -> (h g) d'`` on the weight), which mixes head dims across heads;
    we follow the attention math.
    """
    d = w.shape[0] // num_kv_heads
    return w.reshape(num_kv_heads, d, *w.shape[1:]).repeat_interleave(groups, dim=0).reshape(-1, *w.shape[1:])


class LinearMixer(nn.Module):
    """Shared plumbing: projections q/k/v/o shaped like the teacher's (after the GQA repeat, or with
    ``grouped_kv`` before it), cache I/O, padding."""

    def __init__(self, hidden_size: int, num_heads: int, head_dim: int, layer_idx: int, options: MixerOptions,
                 num_kv_heads: int | None = None):
        super().__init__()
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.layer_idx = layer_idx
        self.options = options
        # the k/v heads the projections hold: the teacher's KV heads with grouped_kv, else one per query head
        self.num_kv_heads = (num_kv_heads or num_heads) if options.grouped_kv else num_heads
        if num_heads % self.num_kv_heads:
            raise ConfigError("mixer_options.grouped_kv", True,
                              f"{num_heads} query heads do not split into groups of {self.num_kv_heads} KV heads")
        inner, kv_inner = num_heads * head_dim, self.num_kv_heads * head_dim
        self.q_proj = nn.Linear(hidden_size, inner, bias=options.qkv_bias)
        self.k_proj = nn.Linear(hidden_size, kv_inner, bias=options.qkv_bias)
        self.v_proj = nn.Linear(hidden_size, kv_inner, bias=options.qkv_bias)
        self.o_proj = nn.Linear(inner, hidden_size, bias=False)
        if options.use_short_conv:
            self.q_conv1d = ShortConvolution(inner, options.conv_size)
            self.k_conv1d = ShortConvolution(kv_inner, options.conv_size)
            self.v_conv1d = ShortConvolution(kv_inner, options.conv_size)

    # ---- stage 0: RADLADS weight transfer -------------------------------------------------------------------
    @torch.no_grad()
    def init_from_teacher(self, attn: nn.Module, num_kv_heads: int) -> None:
        """Copy W_q and W_o; repeat W_k and W_v over the query-head groups (with ``grouped_kv``: copy them, the
        repeat happens at run time). Fresh parameters keep their init."""
        if self.options.grouped_kv and num_kv_heads != self.num_kv_heads:
            raise ConfigError("mixer_options.grouped_kv", True, f"the teacher has {num_kv_heads} KV heads, this mixer "
                              f"was built for {self.num_kv_heads}: build it from the same teacher config")
        groups = self.num_heads // num_kv_heads if self.num_kv_heads == self.num_heads else 1
        self.q_proj.weight.copy_(attn.q_proj.weight)
        self.o_proj.weight.copy_(attn.o_proj.weight)
        self.k_proj.weight.copy_(repeat_kv_weight(attn.k_proj.weight, num_kv_heads, groups))
        self.v_proj.weight.copy_(repeat_kv_weight(attn.v_proj.weight, num_kv_heads, groups))
        if self.options.qkv_bias:
            for name in ("q_proj", "k_proj", "v_proj"):
                src = getattr(attn, name).bias
                dst = getattr(self, name).bias
                if src is None:
                    dst.zero_()
                else:
                    dst.copy_(src if name == "q_proj" else repeat_kv_weight(src, num_kv_heads, groups))
        elif any(getattr(getattr(attn, n), "bias", None) is not None for n in ("q_proj", "k_proj", "v_proj")):
            warnings.warn("the teacher's q/k/v projections have biases (Qwen2's): the linear mixers drop them, so "
                          "their stage-0 start is further from the teacher; mixer_options.qkv_bias: true keeps them "
                          "(ds-hybrid convert: --qkv-bias)",
                          stacklevel=2)
        if getattr(attn.o_proj, "bias", None) is not None:
            raise ValueError("teacher o_proj has a bias; linear mixers have none (no supported family has one)")

    def reset_parameters(self) -> None:  # overridden: fresh mixer-only parameters
        pass

    # ---- inference: the projections of x as one GEMM ----------------------------------------------------------
    #: besides q/k/v, the Linear modules (dotted names) that read the layer input x, wide ones first; subclasses extend
    extra_input_linears: tuple[str, ...] = ()
    #: (fused weight, fused bias or None, row counts, (name, module) pairs), set by fuse_input_projections
    _fused: tuple[torch.Tensor, torch.Tensor | None, list[int], list[tuple[str, nn.Linear]]] | None = None

    def input_linears(self) -> list[tuple[str, nn.Linear]]:
        """The projections of the layer input x, in the order of the fused weight's rows."""
        names = ("q_proj", "k_proj", "v_proj") + self.extra_input_linears
        return [(n, self.get_submodule(n)) for n in names if hasattr(self, n.split(".")[0])]

    @torch.no_grad()
    def fuse_input_projections(self) -> bool:
        """Inference: the projections of x (q, k, v and the gates' inputs) become row blocks of one weight, so that
        a decode step (autograd off, at most ``ops.RECURRENT_MAX_TOKENS`` tokens) reads them with one GEMM. At
        decode, x has a few rows and each projection alone is a small, memory-bound GEMM that cuBLAS runs with
        split-K and a reduce kernel; one taller weight runs nearer the memory bandwidth (docs/SERVING.md). The rows
        are padded with zeros to a multiple of AB_ALIGN (aligned output rows).

        Each module keeps its Parameter object, whose data becomes a view of the fused weight (no copy is kept), so
        optimizers and hooks still hold the live weights and a state dict is unchanged. Where a weight stops being
        that view (``load_state_dict(assign=True)``, a cast or a move, DeepSpeed flattening), the fusion is dropped
        and the modules are called. A CUDA graph captured before fusing (or unfusing) replays freed addresses:
        build a new GraphDecoder after either. Returns whether this call fused."""
        if self._fused is not None:
            return False
        mods = self.input_linears()
        if any(hasattr(m.weight, "ds_id") for _, m in mods):
            return False  # ZeRO-3 partitions: a shard is not a weight (the modules gather theirs in their own forward)
        rows = [m.out_features for _, m in mods]
        pad = -sum(rows) % AB_ALIGN
        first = mods[0][1].weight
        weight = torch.cat([m.weight for _, m in mods] + [first.new_zeros(pad, first.shape[1])])
        bias = None
        if any(m.bias is not None for _, m in mods):
            parts = [m.bias if m.bias is not None else first.new_zeros(m.out_features) for _, m in mods]
            bias = torch.cat(parts + [first.new_zeros(pad)])
        start = 0
        for (_, m), n in zip(mods, rows):
            m.weight.data = weight[start : start + n]
            if m.bias is not None:
                m.bias.data = bias[start : start + n]
            start += n
        self._fused = (weight, bias, rows + ([pad] if pad else []), mods)
        return True

    @torch.no_grad()
    def unfuse_input_projections(self) -> bool:
        """Give every projection its own storage again (what :meth:`fuse_input_projections` shared). Returns whether
        this call unfused."""
        if self._fused is None:
            return False
        weight, bias = self._fused[:2]
        for _, m in self.input_linears():
            for p, fused in ((m.weight, weight), (m.bias, bias)):  # (the biases share the fused bias, not the weight)
                if p is not None and fused is not None and _shares(p, fused):
                    p.data = p.data.clone()
        self._fused = None
        return True

    def _apply(self, fn, recurse: bool = True):
        out = super()._apply(fn, recurse)
        if self._fused is not None and not self._fused_intact():  # cast or moved: the weights have their own memory
            self._fused = None
        return out

    def _fused_intact(self) -> bool:  # (per eager decode step and layer: the modules are kept, not looked up)
        weight, _, _, mods = self._fused
        return all(_shares(m.weight, weight) for _, m in mods)

    def _fused_inputs(self, x: torch.Tensor) -> dict[str, torch.Tensor] | None:
        """The fused projections of x by name, or None where the modules are to be called (autograd on, more than
        a decode step's tokens, not fused, or a weight no longer the fused one's view)."""
        if self._fused is None or torch.is_grad_enabled() or x.shape[1] > ops.RECURRENT_MAX_TOKENS:
            return None
        if not torch.compiler.is_compiling() and not self._fused_intact():  # rebound: the modules hold the truth
            self._fused = None
            return None
        weight, bias, rows, mods = self._fused
        return {name: out for (name, _), out in zip(mods, F.linear(x, weight, bias).split(rows, dim=-1))}

    # ---- forward plumbing -----------------------------------------------------------------------------------
    def _qkv(self, x: torch.Tensor, mask: torch.Tensor | None, conv_cache: tuple | None,
             fused: dict[str, torch.Tensor] | None = None):
        if fused is not None:
            q, k, v = fused["q_proj"], fused["k_proj"], fused["v_proj"]
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        new_conv = None
        if self.options.use_short_conv:
            if mask is not None:  # padded inputs must not leak into real tokens through the conv window
                q, k, v = q * mask, k * mask, v * mask
            cq, ck, cv = conv_cache if conv_cache is not None else (None, None, None)
            q, cq = self.q_conv1d(q, cq)
            k, ck = self.k_conv1d(k, ck)
            v, cv = self.v_conv1d(v, cv)
            new_conv = (cq, ck, cv)
        return q, k, v, new_conv

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(*x.shape[:2], self.num_heads, self.head_dim)

    def _kv_heads(self, x: torch.Tensor) -> torch.Tensor:
        """k or v [B, T, kv_heads * D] -> [B, T, H, D], each KV head serving its group of query heads (as HF's
        ``repeat_kv``; the identity without ``grouped_kv``)."""
        x = x.reshape(*x.shape[:2], self.num_kv_heads, self.head_dim)
        groups = self.num_heads // self.num_kv_heads
        return x if groups == 1 else x.repeat_interleave(groups, dim=2)

    def mix(self, x: torch.Tensor, mask: torch.Tensor | None, state, conv_cache, output_final_state: bool):
        raise NotImplementedError

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,  # the teacher's 4-D causal mask: not used by linear mixers
        past_key_values: Any = None,
        use_cache: bool | None = None,  # unused: the cache is updated whenever one is given
        linear_attn_padding_mask: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, None]:
        T = hidden_states.shape[1]
        mask = None
        if linear_attn_padding_mask is not None:
            mask = linear_attn_padding_mask[:, -T:, None].to(hidden_states.dtype)
        state, conv_cache = None, None
        # as softmax attention updates its KV cache whenever it is given one (Gemma 3's layers never see use_cache)
        keep = past_key_values is not None
        if keep:
            state, conv_cache = past_key_values.get_linear_state(self.layer_idx)
        o, state, conv_cache = self.mix(hidden_states, mask, state, conv_cache, output_final_state=keep)
        if keep:
            past_key_values.set_linear_state(self.layer_idx, state, conv_cache, T)
        return o, None


class GatedDeltaNetMixer(LinearMixer):
    """Gated DeltaNet, fla's ``GatedDeltaNet`` parameters: q/k/v/a/b/g/o projections, A_log, dt_bias, o_norm."""

    fuse_ab: bool = True  # False: a and b through their modules (the reference path of :meth:`_ab`)
    extra_input_linears = ("g_proj", "a_proj", "b_proj")

    def __init__(self, hidden_size: int, num_heads: int, head_dim: int, layer_idx: int, options: MixerOptions,
                 num_kv_heads: int | None = None):
        super().__init__(hidden_size, num_heads, head_dim, layer_idx, options, num_kv_heads)
        self.a_proj = nn.Linear(hidden_size, num_heads, bias=False)
        self.b_proj = nn.Linear(hidden_size, num_heads, bias=False)
        self.A_log = nn.Parameter(torch.empty(num_heads))
        self.dt_bias = nn.Parameter(torch.empty(num_heads))
        self.A_log._no_weight_decay = True
        self.dt_bias._no_weight_decay = True
        if options.use_gate:
            self.g_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=False)
        self.o_norm = GatedRMSNorm(head_dim, eps=options.norm_eps)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """fla's init: A ~ U(0, 16); dt log-uniform in [1e-3, 1e-1], stored as softplus^-1(dt)."""
        A = torch.empty(self.num_heads, dtype=torch.float32).uniform_(0, 16)
        init.copy_(self.A_log, torch.log(A))
        dt_min, dt_max, dt_floor = 1e-3, 1e-1, 1e-4
        dt = torch.exp(torch.rand(self.num_heads) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=dt_floor)
        init.copy_(self.dt_bias, dt + torch.log(-torch.expm1(-dt)))

    def _ab(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """a_proj(x), b_proj(x). Where the head count is not a multiple of AB_ALIGN, one GEMM over both weights and
        zero rows up to the next multiple (the reference: the two module calls, also used for weights partitioned by
        ZeRO-3, which are whole only inside their own module's forward)."""
        H = self.num_heads
        wa, wb = self.a_proj.weight, self.b_proj.weight
        if H % AB_ALIGN == 0 or not self.fuse_ab or hasattr(wa, "ds_id"):
            return self.a_proj(x), self.b_proj(x)
        pad = wa.new_zeros(-(2 * H) % AB_ALIGN, wa.shape[1])
        ab = F.linear(x, torch.cat([wa, wb, pad]))
        return ab[..., :H], ab[..., H:2 * H]

    def mix(self, x, mask, state, conv_cache, output_final_state):
        fused = self._fused_inputs(x)
        q, k, v, conv_cache = self._qkv(x, mask, conv_cache, fused)
        if not self.options.use_short_conv:
            q, k, v = F.silu(q), F.silu(k), F.silu(v)
        q, k, v = self._heads(q), self._kv_heads(k), self._kv_heads(v)
        a, b = (fused["a_proj"], fused["b_proj"]) if fused is not None else self._ab(x)
        beta = b.sigmoid()
        if self.options.allow_neg_eigval:
            beta = beta * 2.0
        g = -self.A_log.float().exp() * F.softplus(a.float() + self.dt_bias.float())
        if mask is not None:  # padded positions: no write (k = v = beta = 0) and no decay (g = 0)
            k, v = k * mask[..., None], v * mask[..., None]
            beta, g = beta * mask, g * mask.float()
        o, state = ops.gated_delta_rule(
            q, k, v, g, beta.to(q.dtype), scale=self.head_dim**-0.5, initial_state=state,
            output_final_state=output_final_state, backend=self.options.backend,
        )
        gate = None
        if self.options.use_gate:
            gate = self._heads(fused["g_proj"] if fused is not None else self.g_proj(x))
        o = self.o_norm(o, gate)
        return self.o_proj(o.reshape(*x.shape[:2], -1)), state, conv_cache


class GLAMixer(LinearMixer):
    """Gated Linear Attention, fla's ``GatedLinearAttention`` parameters (expand_k = expand_v = 1)."""

    extra_input_linears = ("g_proj", "gk_proj.0")

    def __init__(self, hidden_size: int, num_heads: int, head_dim: int, layer_idx: int, options: MixerOptions,
                 num_kv_heads: int | None = None):
        super().__init__(hidden_size, num_heads, head_dim, layer_idx, options, num_kv_heads)
        inner = num_heads * head_dim
        self.gk_proj = nn.Sequential(
            nn.Linear(hidden_size, options.gate_low_rank_dim, bias=False),
            nn.Linear(options.gate_low_rank_dim, inner, bias=True),
        )
        if options.use_gate:
            self.g_proj = nn.Linear(hidden_size, inner, bias=False)
            self.g_norm_swish_gate = GatedRMSNorm(head_dim, eps=options.norm_eps)
        else:
            self.g_norm = GatedRMSNorm(head_dim, eps=options.norm_eps)

    def mix(self, x, mask, state, conv_cache, output_final_state):
        fused = self._fused_inputs(x)
        q, k, v, conv_cache = self._qkv(x, mask, conv_cache, fused)
        q, k, v = self._heads(q), self._kv_heads(k), self._kv_heads(v)
        gk = self.gk_proj[1](fused["gk_proj.0"]) if fused is not None else self.gk_proj(x)
        gk = F.logsigmoid(self._heads(gk).float()) / self.options.gate_logit_normalizer
        if mask is not None:
            k, v, gk = k * mask[..., None], v * mask[..., None], gk * mask[..., None].float()
        o, state = ops.gated_linear_attention(
            q, k, v, gk, scale=self.head_dim**-0.5, initial_state=state,
            output_final_state=output_final_state, backend=self.options.backend,
        )
        if self.options.use_gate:
            o = self.g_norm_swish_gate(o, self._heads(fused["g_proj"] if fused is not None else self.g_proj(x)))
        else:
            o = self.g_norm(o)
        return self.o_proj(o.reshape(*x.shape[:2], -1)), state, conv_cache


MIXER_CLASSES: dict[str, type[LinearMixer]] = {"gdn": GatedDeltaNetMixer, "gla": GLAMixer}


def build_mixer(
    mixer: str, hidden_size: int, num_heads: int, head_dim: int, layer_idx: int, options: MixerOptions,
    num_kv_heads: int | None = None,
) -> LinearMixer:
    """``num_kv_heads``: the teacher's KV heads (used with ``options.grouped_kv``)."""
    return MIXER_CLASSES[mixer](hidden_size, num_heads, head_dim, layer_idx, options, num_kv_heads)
