"""Many independent linear mixers in one pass: stage align's fast path.

Stage align trains every layer's mixer on that layer's own teacher input; the L mixers share no data, so their
forward passes can run as one: the L inputs stacked to [L, B, T, H], every input projection of every layer as one
batched GEMM ([L, B*T, H] @ [L, H, sum of outputs]), the recurrence as one fla call over L*B sequences, the output
projection as one more batched GEMM. A 30-layer align step then issues a few dozen kernels per micro-batch instead
of thousands, and its GEMMs are large enough to run near the GPU's rate.

    out = stacked_forward(mixers, x)        # x: [L, B, T, H] -> [L, B, T, H]; == [m(hidden_states=x[i])[0] ...]

The math is each mixer's own ``mix`` (the reference path, tested against this one on fresh random inputs): same
projections, activations, gates, normalisation and kernels. Parameters are read through ``torch.stack``, so every
mixer keeps its own parameters and gradients (checkpoints and exports are unchanged). Not for ZeRO-3 (a parameter
read outside its module's forward is an empty shard there) nor short convolutions: :func:`supports_stacked` says
when this path applies, and stage align falls back to calling the mixers one by one otherwise.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ds_hybrid.errors import ConfigError
from ds_hybrid.modeling import ops
from ds_hybrid.modeling.mixers import GatedDeltaNetMixer, GLAMixer, LinearMixer


def supports_stacked(mixers: Sequence[LinearMixer]) -> bool:
    """True when every mixer has the same class and options, no short convolution and unpartitioned parameters."""
    if not mixers:
        return False
    first = mixers[0]
    if type(first) not in (GatedDeltaNetMixer, GLAMixer) or first.options.use_short_conv or first.options.grouped_kv:
        return False  # (the stacked pass reshapes k and v by query heads)
    same = all(type(m) is type(first) and m.options == first.options and m.num_heads == first.num_heads
               and m.head_dim == first.head_dim for m in mixers)
    partitioned = any(hasattr(p, "ds_tensor") for m in mixers for p in m.parameters())
    return same and not partitioned


def _stack_linear(layers: Sequence[torch.nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """[L, in, out] weights (transposed for bmm) and [L, 1, out] biases (or None) of one projection of every layer."""
    w = torch.stack([m.weight for m in layers]).transpose(1, 2)
    b = torch.stack([m.bias for m in layers]).unsqueeze(1) if layers[0].bias is not None else None
    return w, b


#: each projection's columns in the stacked GEMM's output start at a multiple of this (16 bytes of bf16): GDN's a/b
#: projections have one column per head (9 at SmolLM2), and unpadded they leave every later slice, and the row
#: (2,322 columns), misaligned for vector loads, in the GEMM and in the fused backward kernel that gathers the
#: slices' gradients (the align step's largest non-GEMM kernel on an H200)
COLUMN_ALIGN = 8


def _projections(mixers: Sequence[LinearMixer], names: Sequence[str],
                 x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Every projection in ``names`` of every layer from x [L, N, H] with one batched GEMM: (the GEMM's output, each
    projection's [L, N, out]). Zero weight columns pad each projection to a multiple of COLUMN_ALIGN; the padding's
    outputs are dropped."""
    ws, bs, sizes, padded = [], [], [], []
    for name in names:
        w, b = _stack_linear([_get(m, name) for m in mixers])
        size = w.shape[-1]
        pad = -size % COLUMN_ALIGN
        ws.append(F.pad(w, (0, pad)) if pad else w)
        sizes.append(size)
        padded.append(size + pad)
        bs.append(b)
    y = torch.bmm(x, torch.cat(ws, dim=2))
    outs = [o[..., :size] for o, size in zip(y.split(padded, dim=2), sizes)]
    return y, [o + b if b is not None else o for o, b in zip(outs, bs)]


def _get(m: torch.nn.Module, dotted: str) -> torch.nn.Module:
    for part in dotted.split("."):
        m = m[int(part)] if part.isdigit() else getattr(m, part)
    return m


def _rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float, gate: torch.Tensor | None) -> torch.Tensor:
    """GatedRMSNorm with a per-layer weight: x [L, B, T, nh, hd], weight [L, hd], gate like x or None."""
    xf = x.float()
    w = weight.float()[:, None, None, None, :]
    y = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps) * w
    if gate is not None:
        y = y * F.silu(gate.float())
    return y.to(x.dtype)


def pass_elements_from_env() -> int | None:
    """``DS_HYBRID_ALIGN_PASS_ELEMENTS``: :func:`stacked_forward`'s ``max_elements`` for stage align (unset: None).

    When set, the stacked projections' output of one pass ([L, rows x T, width]) stays below that many elements:
    the micro-batch's rows run in groups, every group through all L layers. Past 2^31 elements Inductor indexes the
    fused kernels that read and write that output with int64 arithmetic; groups under the int32 limit (2147483647)
    ran at the one pass's speed on an H200 under the one-GEMM layout and held 7 GiB less at SmolLM2's 96 x 512
    (docs/BENCHMARKS.md; under the split layout, the default since 2026-12-04, ~7 % slower: 379k against 407k
    tokens/s on 2026-12-05): a memory option, off by default. Groups split rows, never layers: a compiled pass reused for another group of
    layers reads other parameters, at other alignments than the ones Inductor compiled it for (parameters are
    static inputs it does not re-check), which faulted on an H200 with "misaligned address" (DeepSpeed's flat
    buffers leave a 9-element A_log or dt_bias at any 2-byte offset)."""
    raw = os.environ.get("DS_HYBRID_ALIGN_PASS_ELEMENTS", "").strip()
    if not raw:
        return None
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value <= 0:
        raise ConfigError("DS_HYBRID_ALIGN_PASS_ELEMENTS", raw, "a positive element count (e.g. 2147483647) or unset")
    return value


#: ``DS_HYBRID_ALIGN_STACKED`` values: ``auto`` (the stacked pass on CUDA), ``1`` (wherever supported), ``0`` (never)
STACKED_CHOICES = ("auto", "1", "0")


def stacked_choice_from_env() -> str:
    """``DS_HYBRID_ALIGN_STACKED`` (default ``auto``), checked before any model is built."""
    value = os.environ.get("DS_HYBRID_ALIGN_STACKED", "auto").strip() or "auto"
    if value not in STACKED_CHOICES:
        raise ConfigError("DS_HYBRID_ALIGN_STACKED", value, f"choose one of {', '.join(STACKED_CHOICES)}")
    return value


#: ``DS_HYBRID_ALIGN_LAYOUT`` values: how the stacked pass groups a GDN mixer's input projections into GEMMs
ALIGN_LAYOUTS = ("split", "one_gemm")


def layout_from_env() -> str:
    """``DS_HYBRID_ALIGN_LAYOUT``: ``split`` (the default) or ``one_gemm`` (the layout before 2026-12-04, to measure
    against); checked before any model is built.

    The backward of a GEMM whose output is sliced concatenates the slices' gradients, and Inductor builds a
    concatenation of up to 8 inputs (torch 2.11: a constant) as one pointwise kernel that evaluates every slice's
    gradient expression at every element and keeps one by a chain of masks (``pointwise_cat``). With ``one_gemm``
    (q, k, v, a, b and the output gate in one GEMM) that is six expressions per element over [L, rows x T, 2,328]:
    q, k and v each through SiLU, a through the decay gate (two exponentials), b through the sigmoid; align's
    largest kernel on an H200, 32-35 ms of a 150 ms step (docs/BENCHMARKS.md). ``split``: q, k, v and the output
    gate in one GEMM whose q|k|v block goes through one SiLU (its gradient: one expression over the three slices'
    gradients, read as they are), a and b in a GEMM of their own (two 16-column slices): the large concatenation
    evaluates one SiLU gradient per element. The same math (tests compare both with the mixers one by one in fp64),
    for one more GEMM of 32 columns and the sum of the two GEMMs' input gradients (GLA's projections have no
    activation before the kernel: one GEMM in both layouts)."""
    value = os.environ.get("DS_HYBRID_ALIGN_LAYOUT", "split").strip() or "split"
    if value not in ALIGN_LAYOUTS:
        raise ConfigError("DS_HYBRID_ALIGN_LAYOUT", value, f"choose one of {', '.join(ALIGN_LAYOUTS)}")
    return value


def _gemm_groups(m0: LinearMixer, layout: str = "split") -> list[list[str]]:
    """The projections of a mixer that the stacked pass runs together, one batched GEMM per group, each group in the
    order of its output's columns."""
    gate = ["g_proj"] if m0.options.use_gate else []
    if not isinstance(m0, GatedDeltaNetMixer):
        return [["q_proj", "k_proj", "v_proj", "gk_proj.0"] + gate]
    if layout == "one_gemm":
        return [["q_proj", "k_proj", "v_proj", "a_proj", "b_proj"] + gate]
    return [["q_proj", "k_proj", "v_proj"] + gate, ["a_proj", "b_proj"]]


def _width(mixers: Sequence[LinearMixer], layout: str = "split") -> int:
    """Columns of the widest GEMM output of the stacked pass (:func:`_projections`, padded)."""
    m0 = mixers[0]
    return max(sum(-(-_get(m0, n).weight.shape[0] // COLUMN_ALIGN) * COLUMN_ALIGN for n in group)
               for group in _gemm_groups(m0, layout))


def _silu_heads(m0: LinearMixer, y: torch.Tensor, parts: list[torch.Tensor], heads) -> list[torch.Tensor]:
    """q, k, v (``parts``, the first columns of the GEMM output ``y``) through SiLU, in heads. Where they are
    adjacent (no bias, no padding), one SiLU over the block and a contiguous copy of each slice for the kernel: the
    block's gradient is one expression over the three slices' gradients; otherwise a SiLU per slice."""
    names = ("q_proj", "k_proj", "v_proj")
    if not all(_get(m0, n).bias is None and _get(m0, n).weight.shape[0] % COLUMN_ALIGN == 0 for n in names):
        return [heads(F.silu(t)) for t in parts]
    widths = [t.shape[-1] for t in parts]
    return [heads(t.contiguous()) for t in F.silu(y[..., :sum(widths)]).split(widths, dim=-1)]


def row_groups(rows: int, elements_per_row: int, limit: int | None) -> list[range]:
    """Consecutive, near-equal groups of the micro-batch's rows whose stacked output (``elements_per_row`` each)
    fits ``limit`` (None: one group; a single row that does not fit is its own group)."""
    n = 1 if limit is None else max(1, min(rows, -(-rows * elements_per_row // limit)))
    bounds = [round(i * rows / n) for i in range(n + 1)]
    return [range(a, b) for a, b in zip(bounds, bounds[1:])]


def stacked_forward(mixers: Sequence[LinearMixer], x: torch.Tensor, check: bool = True,
                    max_elements: int | None = None, layout: str = "split") -> torch.Tensor:
    """x: [L, B, T, H], layer i's input in x[i] -> [L, B, T, H], mixer i's output in out[i] (no cache, no mask).
    ``check=False`` skips :func:`supports_stacked` (a caller that checked once at setup). With ``max_elements``
    the rows run in groups where one pass would exceed it (:func:`pass_elements_from_env`). ``layout``: the GEMMs
    of GDN's input projections (:func:`layout_from_env`)."""
    if check and not supports_stacked(mixers):
        raise ValueError("these mixers cannot run stacked (mixed kinds or options, short convolution, or ZeRO-3 "
                         "partitioned parameters); call them one by one")
    if layout not in ALIGN_LAYOUTS:
        raise ValueError(f"layout {layout!r}: one of {ALIGN_LAYOUTS}")
    L, B, T, _ = x.shape
    groups = row_groups(B, L * T * _width(mixers, layout), max_elements)
    if len(groups) == 1:
        return _stacked_pass(mixers, x, layout)
    return torch.cat([_stacked_pass(mixers, x[:, g.start:g.stop], layout) for g in groups], dim=1)


def _stacked_pass(mixers: Sequence[LinearMixer], x: torch.Tensor, layout: str = "split") -> torch.Tensor:
    L, B, T, H = x.shape
    m0 = mixers[0]
    nh, hd, opts = m0.num_heads, m0.head_dim, m0.options
    xf = x.reshape(L, B * T, H)

    def heads(t: torch.Tensor) -> torch.Tensor:  # [L, B*T, nh*hd] -> [L*B, T, nh, hd]
        return t.reshape(L * B, T, nh, hd)

    if isinstance(m0, GatedDeltaNetMixer):
        groups = _gemm_groups(m0, layout)
        y, parts = _projections(mixers, groups[0], xf)
        if layout == "one_gemm":  # q, k, v, a, b, gate
            q, k, v = (heads(F.silu(t)) for t in parts[:3])
            a, b = parts[3], parts[4]
            gate_in = parts[5] if opts.use_gate else None
        else:  # q, k, v, gate; then a, b
            q, k, v = _silu_heads(m0, y, parts[:3], heads)
            gate_in = parts[3] if opts.use_gate else None
            _, (a, b) = _projections(mixers, groups[1], xf)
        beta = b.sigmoid()
        if opts.allow_neg_eigval:
            beta = beta * 2.0
        A_log = torch.stack([m.A_log for m in mixers]).float()[:, None, :]  # [L, 1, nh]
        dt_bias = torch.stack([m.dt_bias for m in mixers]).float()[:, None, :]
        g = -A_log.exp() * F.softplus(a.float() + dt_bias)
        o, _ = ops.gated_delta_rule(q, k, v, g.reshape(L * B, T, nh), beta.reshape(L * B, T, nh).to(q.dtype),
                                    scale=hd**-0.5, backend=opts.backend)
        gate = gate_in.reshape(L, B, T, nh, hd) if gate_in is not None else None
        norm_w = torch.stack([m.o_norm.weight for m in mixers])
        o = _rmsnorm(o.reshape(L, B, T, nh, hd), norm_w, m0.o_norm.eps, gate)
    else:  # GLA
        _, parts = _projections(mixers, _gemm_groups(m0)[0], xf)
        q, k, v = (heads(t) for t in parts[:3])
        w2, b2 = _stack_linear([m.gk_proj[1] for m in mixers])
        gk = torch.baddbmm(b2, parts[3], w2) if b2 is not None else torch.bmm(parts[3], w2)
        gk = F.logsigmoid(heads(gk).float()) / opts.gate_logit_normalizer
        o, _ = ops.gated_linear_attention(q, k, v, gk, scale=hd**-0.5, backend=opts.backend)
        o = o.reshape(L, B, T, nh, hd)
        if opts.use_gate:
            norm = [m.g_norm_swish_gate for m in mixers]
            o = _rmsnorm(o, torch.stack([n.weight for n in norm]), norm[0].eps, parts[4].reshape(L, B, T, nh, hd))
        else:
            norm = [m.g_norm for m in mixers]
            o = _rmsnorm(o, torch.stack([n.weight for n in norm]), norm[0].eps, None)
    w_o, _ = _stack_linear([m.o_proj for m in mixers])
    return torch.bmm(o.reshape(L, B * T, nh * hd), w_o).reshape(L, B, T, H)
