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


def _projections(mixers: Sequence[LinearMixer], names: Sequence[str], x: torch.Tensor) -> list[torch.Tensor]:
    """Every projection in ``names`` of every layer from x [L, N, H] with one batched GEMM: [L, N, out] each.
    Zero weight columns pad each projection to a multiple of COLUMN_ALIGN; the padding's outputs are dropped."""
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
    return [o + b if b is not None else o for o, b in zip(outs, bs)]


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
    fused kernels that read and write that output with int64 arithmetic (a 64-bit division per element), and the
    backward kernel that gathers the slices' gradients took 34 ms of a 150 ms align step on an H200 at 30 x 49,152
    tokens x 2,328 columns (3.4e9 elements; docs/BENCHMARKS.md). Off until a GPU run shows the groups are faster
    (2147483647 for the int32 limit). Groups split rows, never layers: a compiled pass reused for another group of
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


#: ``DS_HYBRID_ALIGN_CAT`` values: how Inductor builds the gradient of the stacked projections' output
ALIGN_CAT_CHOICES = ("pointwise", "concat")


def cat_options_from_env() -> dict[str, int]:
    """``DS_HYBRID_ALIGN_CAT``: Inductor options for compiling stage align's stacked pass ({} for ``pointwise``, the
    default; checked before any model is built).

    The backward of :func:`_projections` concatenates the gradients of its slices (q, k, v through SiLU, a through
    the decay gate, b through the sigmoid, the output gate; each padded) into the GEMM's [L, rows x T, width]
    gradient. With up to 8 inputs Inductor lowers that concatenation as one pointwise kernel that evaluates every
    slice's math at every element, keeping one result by a chain of masks (``pointwise_cat``): six slices' loads,
    exponentials and index math per element over 3.4e9 elements at SmolLM2's 30 x 49,152 tokens, the align step's
    largest kernel on an H200 (32-35 ms of a 150 ms step; docs/BENCHMARKS.md). ``concat`` makes Inductor build it
    as a ``ConcatKernel`` instead: each slice's gradient computed by its own kernel, written into its columns of the
    output. Same values (it changes which kernel computes each element, not the math); its speed is for a GPU run
    to show, until then opt-in."""
    raw = os.environ.get("DS_HYBRID_ALIGN_CAT", "pointwise").strip() or "pointwise"
    if raw not in ALIGN_CAT_CHOICES:
        raise ConfigError("DS_HYBRID_ALIGN_CAT", raw, f"choose one of {', '.join(ALIGN_CAT_CHOICES)}")
    if raw == "pointwise":
        return {}
    # pointwise_cat stays for concatenations of plain reads (<= 2 ops an input), never for computed slices
    return {"max_complex_pointwise_cat_inputs": 0}


def _input_projections(m0: LinearMixer) -> list[str]:
    """The projections of a mixer that the stacked pass runs as one GEMM, in the order of its output's columns."""
    gate = ["g_proj"] if m0.options.use_gate else []
    if isinstance(m0, GatedDeltaNetMixer):
        return ["q_proj", "k_proj", "v_proj", "a_proj", "b_proj"] + gate
    return ["q_proj", "k_proj", "v_proj", "gk_proj.0"] + gate


def _width(mixers: Sequence[LinearMixer]) -> int:
    """Columns of the stacked projections' output (:func:`_projections`, padded)."""
    m0 = mixers[0]
    return sum(-(-_get(m0, n).weight.shape[0] // COLUMN_ALIGN) * COLUMN_ALIGN for n in _input_projections(m0))


def row_groups(rows: int, elements_per_row: int, limit: int | None) -> list[range]:
    """Consecutive, near-equal groups of the micro-batch's rows whose stacked output (``elements_per_row`` each)
    fits ``limit`` (None: one group; a single row that does not fit is its own group)."""
    n = 1 if limit is None else max(1, min(rows, -(-rows * elements_per_row // limit)))
    bounds = [round(i * rows / n) for i in range(n + 1)]
    return [range(a, b) for a, b in zip(bounds, bounds[1:])]


def stacked_forward(mixers: Sequence[LinearMixer], x: torch.Tensor, check: bool = True,
                    max_elements: int | None = None) -> torch.Tensor:
    """x: [L, B, T, H], layer i's input in x[i] -> [L, B, T, H], mixer i's output in out[i] (no cache, no mask).
    ``check=False`` skips :func:`supports_stacked` (a caller that checked once at setup). With ``max_elements``
    the rows run in groups where one pass would exceed it (:func:`pass_elements_from_env`)."""
    if check and not supports_stacked(mixers):
        raise ValueError("these mixers cannot run stacked (mixed kinds or options, short convolution, or ZeRO-3 "
                         "partitioned parameters); call them one by one")
    L, B, T, _ = x.shape
    groups = row_groups(B, L * T * _width(mixers), max_elements)
    if len(groups) == 1:
        return _stacked_pass(mixers, x)
    return torch.cat([_stacked_pass(mixers, x[:, g.start:g.stop]) for g in groups], dim=1)


def _stacked_pass(mixers: Sequence[LinearMixer], x: torch.Tensor) -> torch.Tensor:
    L, B, T, H = x.shape
    m0 = mixers[0]
    nh, hd, opts = m0.num_heads, m0.head_dim, m0.options
    xf = x.reshape(L, B * T, H)

    def heads(t: torch.Tensor) -> torch.Tensor:  # [L, B*T, nh*hd] -> [L*B, T, nh, hd]
        return t.reshape(L * B, T, nh, hd)

    if isinstance(m0, GatedDeltaNetMixer):
        parts = _projections(mixers, _input_projections(m0), xf)
        q, k, v = (heads(F.silu(t)) for t in parts[:3])
        a, b = parts[3], parts[4]
        beta = b.sigmoid()
        if opts.allow_neg_eigval:
            beta = beta * 2.0
        A_log = torch.stack([m.A_log for m in mixers]).float()[:, None, :]  # [L, 1, nh]
        dt_bias = torch.stack([m.dt_bias for m in mixers]).float()[:, None, :]
        g = -A_log.exp() * F.softplus(a.float() + dt_bias)
        o, _ = ops.gated_delta_rule(q, k, v, g.reshape(L * B, T, nh), beta.reshape(L * B, T, nh).to(q.dtype),
                                    scale=hd**-0.5, backend=opts.backend)
        gate = parts[5].reshape(L, B, T, nh, hd) if opts.use_gate else None
        norm_w = torch.stack([m.o_norm.weight for m in mixers])
        o = _rmsnorm(o.reshape(L, B, T, nh, hd), norm_w, m0.o_norm.eps, gate)
    else:  # GLA
        parts = _projections(mixers, _input_projections(m0), xf)
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
