"""Fused linear + KL (and CE) loss: the vocabulary-wide loss of stage kl without [tokens x vocab] for all tokens.

    loss, stats = fused_linear_loss(h_s, w_s, h_t, w_t, labels=labels, temperature=1.0, kl_weight=1.0,
                                    ce_weight=0.0, chunk=1024)

Same interface and math as the torch reference :func:`ds_hybrid.losses.chunked_linear_loss`:
T^2 KL(softmax(z_t/T) || softmax(z_s/T)) averaged over unmasked tokens, plus ce_weight x next-token CE, with
z = h @ W^T; gradients for h_s and w_s are formed in the forward pass (chunk by chunk), so the autograd graph keeps
only dh [N, H] and dW [V, H].

Per chunk of C tokens:
1. logits z_s, z_t = h @ W^T by cuBLAS with bf16 inputs and fp32 outputs (``torch.mm(..., out_dtype=float32)``);
   ``fp32_logits=False``: in the inputs' 16-bit dtype (each logit rounded once, fp32 accumulation inside the GEMM),
   half the logits' bytes for the GEMM to write and the row kernel to read, dz then written over z_s element for
   element;
2. one Triton program per token row streams its logits in vocab tiles of BLOCK_V: pass 1 keeps online (max, sum)
   for z_s/T, z_t/T (and z_s at T=1 for CE) plus the running sum of p_t (z_t - z_s)/T, which give both
   log-normalisers and the token's KL in fp32; pass 2 writes dL/dz = T (p_s - p_t) w_kl + (softmax(z_s) - onehot) w_ce;
3. dh = dz @ W_s and dW += dz^T @ h_s by cuBLAS (the first chunk's GEMM writes dW, the others accumulate by addmm,
   fp32 inside each GEMM; a 16-bit W's dW over several GEMMs accumulates in an fp32 [V, H] buffer, rounded once at
   the end, ``dw_fp32=False``: in W's dtype, each GEMM's sum rounded).

Work: 8 N H V FLOPs in GEMMs (the floor) plus a memory-bound 18 bytes per logit in the row kernel (10 with 16-bit
logits). Extra memory: 2 x C x V fp32 logits (16-bit: half) + dW (+ its fp32 accumulator), dz written over z_s (the default; ``in_place=False``:
a C x V dz buffer of its own). The row
kernel runs in Triton's interpreter on CPU (TRITON_INTERPRET=1): one BLOCK_V, no autotuning, plain ``range`` loops,
so tests check it against an fp64 reference on CPU.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from ds_hybrid.kernels import triton_interpreted
from ds_hybrid.losses import LossStats, check_kl_mask, check_labels

INTERPRET = triton_interpreted()


@triton.jit
def _row_loss_kernel(
    zs_ptr, zt_ptr, dz_ptr, kl_ptr, ce_ptr, klw_ptr, labels_ptr, scale_ptr,
    V, stride_z, stride_dz, inv_t, t_sq,
    HAS_KL: tl.constexpr, HAS_CE: tl.constexpr, WRITE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr,
    HALF_IN_PLACE: tl.constexpr = False, IN_PLACE: tl.constexpr = False,
):
    row = tl.program_id(0).to(tl.int64)  # row * stride passes 2**31 where C x V (x2 in place) does
    zs_row = zs_ptr + row * stride_z
    zt_row = zt_ptr + row * stride_z
    dz_row = dz_ptr + row * stride_dz
    offs = tl.arange(0, BLOCK_V)
    neg_inf = float("-inf")
    # pass 1: online log-sum-exp of z_s/T, z_t/T (KL) and z_s (CE); running sum of exp(z_t/T - m_t) (z_t - z_s)/T
    m_s = tl.full((), neg_inf, tl.float32)
    s_s = tl.zeros((), tl.float32)
    m_t = tl.full((), neg_inf, tl.float32)
    s_t = tl.zeros((), tl.float32)
    acc = tl.zeros((), tl.float32)
    m_c = tl.full((), neg_inf, tl.float32)
    s_c = tl.zeros((), tl.float32)
    for start in range(0, V, BLOCK_V):
        cols = start + offs
        valid = cols < V
        zs = tl.load(zs_row + cols, mask=valid, other=neg_inf).to(tl.float32)
        if HAS_KL:
            zt = tl.load(zt_row + cols, mask=valid, other=neg_inf).to(tl.float32)
            a = zs * inv_t
            b = zt * inv_t
            new_m_s = tl.maximum(m_s, tl.max(a, 0))
            s_s = s_s * tl.exp(m_s - new_m_s) + tl.sum(tl.exp(a - new_m_s), 0)
            m_s = new_m_s
            new_m_t = tl.maximum(m_t, tl.max(b, 0))
            scale = tl.exp(m_t - new_m_t)
            e_t = tl.exp(b - new_m_t)
            diff = tl.where(valid, b - a, 0.0)
            s_t = s_t * scale + tl.sum(e_t, 0)
            acc = acc * scale + tl.sum(e_t * diff, 0)
            m_t = new_m_t
        if HAS_CE:
            new_m_c = tl.maximum(m_c, tl.max(zs, 0))
            s_c = s_c * tl.exp(m_c - new_m_c) + tl.sum(tl.exp(zs - new_m_c), 0)
            m_c = new_m_c
    kl_coef = 0.0
    lse_s = 0.0
    lse_t = 0.0
    if HAS_KL:
        lse_s = m_s + tl.log(s_s)
        lse_t = m_t + tl.log(s_t)
        w = tl.load(klw_ptr + row)
        kl = (acc / s_t - lse_t + lse_s) * t_sq * w
        tl.store(kl_ptr + row, kl)
        kl_coef = tl.load(scale_ptr) * w
    lse_c = 0.0
    label = -100
    ce_coef = 0.0
    if HAS_CE:
        lse_c = m_c + tl.log(s_c)
        label = tl.load(labels_ptr + row)
        has_label = label != -100
        safe = tl.where(has_label, label, 0)
        z_label = tl.load(zs_row + safe).to(tl.float32)
        ce = tl.where(has_label, lse_c - z_label, 0.0)
        tl.store(ce_ptr + row, ce)
        ce_coef = tl.where(has_label, tl.load(scale_ptr + 1), 0.0)
    # pass 2: dL/dz_s
    if not WRITE_GRAD:
        return
    if IN_PLACE:
        # dz is stored over z_s: every thread's load of z_label (a column another warp may own) before any store
        tl.debug_barrier()
    for start in range(0, V, BLOCK_V):
        cols = start + offs
        valid = cols < V
        zs = tl.load(zs_row + cols, mask=valid, other=0.0).to(tl.float32)
        g = tl.zeros((BLOCK_V,), tl.float32)
        if HAS_KL:
            zt = tl.load(zt_row + cols, mask=valid, other=0.0).to(tl.float32)
            p_s = tl.exp(zs * inv_t - lse_s)
            p_t = tl.exp(zt * inv_t - lse_t)
            g += (p_s - p_t) * kl_coef
        if HAS_CE:
            p = tl.exp(zs - lse_c)
            g += tl.where(cols == label, p - 1.0, p) * ce_coef
        if HALF_IN_PLACE:
            # dz (2 bytes) is written over the row's fp32 z_s: dz column c sits in the bytes of z_s column c // 2,
            # read by this tile or an earlier one, possibly by another warp: every warp's loads of this tile come
            # before any warp's stores (later tiles' columns are never written before they are read)
            tl.debug_barrier()
        tl.store(dz_row + cols, g.to(dz_ptr.dtype.element_ty), mask=valid)


@triton.jit
def _scale_unless_one_kernel(x_ptr, g_ptr, n, BLOCK: tl.constexpr):
    """x *= g in place, g read on the device; where g is exactly 1 (a loss backpropagated alone) nothing is read or
    written: each program loads g and returns."""
    g = tl.load(g_ptr).to(tl.float32)
    if g != 1.0:
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        valid = offs < n
        x = tl.load(x_ptr + offs, mask=valid)
        tl.store(x_ptr + offs, (x.to(tl.float32) * g).to(x_ptr.dtype.element_ty), mask=valid)


def scale_unless_one_(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``x *= g`` for the gradient a loss's backward receives (``g``: one element, on x's device), without reading
    ``g`` on the host and without touching ``x`` where g == 1. The backward's gradients dh [N, H] and dW [V, H] were
    formed in the forward; multiplying dW by a g of 1 was a pass over [V, H] (4.2 GB at Llama-3-70B's 128,256 x
    8,192 in bf16, ~1 ms on an H200) for nothing. The product is taken in fp32 and rounded once (torch's
    ``x.mul_(g.to(x.dtype))``, the reference, rounds g to x's dtype first; Triton's interpreter rounds a 16-bit
    result toward zero, a GPU to nearest). Tensors Triton cannot address (not
    contiguous, fp64, or on CPU outside the interpreter) take the reference. Like ``mul_``, it counts as an in-place
    change of ``x`` for autograd (a second backward through tensors saved as ``x`` fails as it did with ``mul_``)."""
    if g.numel() != 1:
        raise ValueError(f"scale_unless_one_: g has {g.numel()} elements, a loss's gradient has one")
    if not x.is_contiguous() or not (x.is_cuda or INTERPRET) or x.numel() == 0 or x.dtype == torch.float64:
        return x.mul_(g.to(x.dtype))
    block = 4096
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        _scale_unless_one_kernel[(triton.cdiv(x.numel(), block),)](x, g.reshape(()).contiguous(), x.numel(),
                                                                  BLOCK=block, num_warps=4)
    torch.autograd.graph.increment_version(x)  # (written behind autograd's back: say so, as mul_ would)
    return x


def _block_v(block_v: int | None) -> tuple[int, int]:
    """Vocab tile and warps. In the interpreter every tile is a numpy step, so large tiles are much faster there."""
    if block_v is not None:
        return block_v, 1 if INTERPRET else 8
    return (4096, 1) if INTERPRET else (2048, 8)


def _mm32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b with fp32 output and fp32 accumulation; bf16 inputs stay bf16 on CUDA (tensor cores)."""
    if a.dtype == torch.float32:
        return a @ b
    if a.is_cuda:
        return torch.mm(a, b, out_dtype=torch.float32)
    return a.float() @ b.float()


_GEMM_INTO_FP32: dict[tuple[torch.device, torch.dtype], bool] = {}  # (device, input dtype): its in-place fp32 GEMM works?
FALLBACK_ROWS = 8192  # the fallback's rows of dW per fp32 product: a [rows, H] temporary, not a second [V, H]


def _gemm_into_fp32_ok(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether this torch's CUDA GEMM writes and adds 16-bit products into an fp32 ``out`` in place (``mm`` /
    ``addmm`` with ``out_dtype``: torch < 2.8 has no ``out_dtype``, and addmm refused an fp32 ``self`` until late
    2025): tried once per device and dtype, with a first operand laid out as dz^T is (a transposed view with a row
    pitch twice its width), against the fp32 product plus an add; a refusal or a different sum sends dW to
    :func:`_mm32_into_`'s fallback."""
    key = (torch.device(device), dtype)
    if key not in _GEMM_INTO_FP32:
        g = torch.Generator(device=device).manual_seed(0)
        a = torch.randn(64, 128, generator=g, device=device).to(dtype)[:, :64].t()  # strides (1, 128), as dz.t()
        b = torch.randn(64, 64, generator=g, device=device).to(dtype)
        acc = torch.randn(64, 64, generator=g, device=device)
        product = a.float() @ b.float()  # 16-bit values are exact in fp32 (and in TF32): the reference product
        try:
            got = acc.clone()
            torch.addmm(got, a, b, out_dtype=torch.float32, out=got)
            first = torch.empty_like(acc)
            torch.mm(a, b, out_dtype=torch.float32, out=first)
            ok = bool(torch.allclose(got, acc + product, rtol=1e-5, atol=1e-4)
                      and torch.allclose(first, product, rtol=1e-5, atol=1e-4))
            why = "a different sum"
        except (RuntimeError, TypeError) as e:
            ok, why = False, str(e)
        if not ok:
            import logging

            logging.getLogger("ds_hybrid").warning(
                "fused KL: this torch's GEMM into an fp32 output is not usable (%s); dW's fp32 sum takes fp32 "
                "products of %d rows at a time instead (slower)", why[:200], FALLBACK_ROWS)
        _GEMM_INTO_FP32[key] = ok
    return _GEMM_INTO_FP32[key]


def _mm32_into_(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, accumulate: bool) -> None:
    """``out`` (fp32) = a @ b, or += a @ b with ``accumulate``, for 16-bit ``a``, ``b``: dW's accumulator. On CUDA
    one cuBLAS GEMM with fp32 output into ``out`` (``out_dtype``; beta = 1 reads ``out`` in fp32) where
    :func:`_gemm_into_fp32_ok`; elsewhere (CPU, or a torch without it) fp32 products of FALLBACK_ROWS rows of ``out``
    at a time, so that no second [V, H] fp32 tensor is made."""
    if a.is_cuda and _gemm_into_fp32_ok(a.device, a.dtype):
        if accumulate:
            torch.addmm(out, a, b, out_dtype=torch.float32, out=out)
        else:
            torch.mm(a, b, out_dtype=torch.float32, out=out)
        return
    if a.is_cuda:  # bf16 products on the tensor cores into an fp32 temporary of FALLBACK_ROWS rows, then the add
        for r in range(0, a.shape[0], FALLBACK_ROWS):
            product = _mm32(a[r:r + FALLBACK_ROWS], b)
            out[r:r + FALLBACK_ROWS].add_(product) if accumulate else out[r:r + FALLBACK_ROWS].copy_(product)
        return
    b32 = b.float()
    for r in range(0, a.shape[0], FALLBACK_ROWS):
        rows = out[r:r + FALLBACK_ROWS]
        if accumulate:
            rows.addmm_(a[r:r + FALLBACK_ROWS].float(), b32)
        else:
            torch.mm(a[r:r + FALLBACK_ROWS].float(), b32, out=rows)


def _mm_logits(a: torch.Tensor, b: torch.Tensor, fp32: bool) -> torch.Tensor:
    """The logits a @ b: fp32 (``fp32``, or inputs of 32 bits or more), else in the inputs' 16-bit dtype: on CUDA
    cuBLAS's 16-bit GEMM (fp32 accumulation; its split-K partial sums may be reduced in 16 bits where PyTorch allows
    it, ``torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction``, on by default), on CPU the fp32
    product rounded once."""
    if fp32 or a.dtype.itemsize >= 4:
        return _mm32(a, b)
    return a @ b if a.is_cuda else (a.float() @ b.float()).to(a.dtype)


def _mm_logits_into(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """:func:`_mm_logits` written into ``out`` (a row block of a group's logit buffer), of ``out``'s dtype: the
    inputs' own (16-bit logits, or fp32 inputs). The same values as :func:`_mm_logits` gives."""
    if a.is_cuda or a.dtype.itemsize >= 4:
        return torch.mm(a, b, out=out)
    return out.copy_(a.float() @ b.float())  # CPU 16-bit: the fp32 product rounded once, as _mm_logits


def run_row_kernel(zs, zt, kl_w, labels, temperature: float, scales: torch.Tensor, dz_dtype: torch.dtype,
                   need_grad: bool = True, block_v: int | None = None, in_place: bool = False):
    """Per-token KL / CE and dL/dz for a chunk of logits (fp32 [C, V]). ``scales`` (fp32 [2], on the device): the
    gradient scale of the KL and CE terms, read by the kernel so that no token count has to reach the host.
    ``in_place``: dz is written into z_s's memory (a [C, V] view with z_s's row pitch; z_s is overwritten), saving
    the C x V dz buffer. Returns (dz, kl [C], ce [C])."""
    C, V = zs.shape
    has_kl, has_ce = zt is not None, labels is not None
    half = False
    if need_grad and in_place:
        if not zs.is_contiguous():
            raise ValueError("in_place needs contiguous logits")
        if dz_dtype == zs.dtype:
            dz = zs
        elif dz_dtype.itemsize * 2 == zs.dtype.itemsize:  # bf16/fp16 dz in the first half of each fp32 row's bytes
            dz, half = zs.view(dz_dtype)[:, :V], True
        else:
            raise ValueError(f"in_place: dz of {dz_dtype} does not fit in logits of {zs.dtype}")
    else:
        dz = torch.empty((C, V) if need_grad else (1, 1), dtype=dz_dtype, device=zs.device)
    kl = torch.zeros(C, dtype=torch.float32, device=zs.device)
    ce = torch.zeros(C, dtype=torch.float32, device=zs.device)
    block, warps = _block_v(block_v)
    _row_loss_kernel[(C,)](
        zs, zt if has_kl else zs, dz, kl, ce,
        kl_w if has_kl else kl, labels if has_ce else kl, scales,
        V, zs.stride(0), dz.stride(0), 1.0 / temperature, temperature * temperature,
        HAS_KL=has_kl, HAS_CE=has_ce, WRITE_GRAD=need_grad, BLOCK_V=block, HALF_IN_PLACE=half,
        IN_PLACE=need_grad and in_place, num_warps=warps,
    )
    return dz, kl, ce


def _dw_gemm_(dw: torch.Tensor, dz_t: torch.Tensor, h: torch.Tensor, accumulate: bool, acc32: bool) -> None:
    """dW = dz^T h (the first GEMM) or dW += dz^T h: in dW's dtype, or into the fp32 accumulator (``acc32``)."""
    if acc32:
        _mm32_into_(dw, dz_t, h, accumulate)
    elif accumulate:
        dw.addmm_(dz_t, h)
    else:
        torch.mm(dz_t, h, out=dw)


class FusedLinearLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_s, w_s, h_t, w_t, kl_mask, labels, temperature, kl_weight, ce_weight, chunk, stats):
        N = h_s.shape[0]
        block_v = stats.get("block_v")
        fp32 = stats.get("fp32_logits", True)
        need_grad = stats.get("need_grad", True)
        in_place = stats.get("in_place")
        if in_place is None:  # wherever dz fits in the fp32 logits' bytes: bf16, fp16 and fp32 inputs (not fp64)
            in_place = h_s.dtype.itemsize <= 4
        use_kl = kl_weight != 0 and h_t is not None
        use_ce = ce_weight != 0 and labels is not None
        kl_w = kl_mask.to(torch.float32) if use_kl else None
        # token counts stay on the device (no host sync per micro-batch); the kernel reads the gradient scales
        zero = torch.zeros((), dtype=torch.float32, device=h_s.device)
        n_kl = kl_mask.sum().float() if use_kl else zero
        n_ce = (labels != -100).sum().float() if use_ce else zero
        scales = torch.stack([temperature * kl_weight / n_kl.clamp(min=1), ce_weight / n_ce.clamp(min=1)])
        dz_dtype = h_s.dtype
        # dW's GEMM over `group` chunks at once (dw_chunk tokens): the chunks' dz stay in one logit buffer until it
        # runs, so dW is read and written once per group instead of once per chunk (group - 1 passes over [V, H] fewer)
        group = max(1, (stats.get("dw_chunk") or chunk) // chunk) if need_grad else 1
        logit_dtype = torch.float32 if (fp32 or h_s.dtype.itemsize >= 4) else h_s.dtype
        # (group > 1 only where dz lands in place over logits of its dtype: fused_linear_loss refuses the rest)
        zs_group = (torch.empty((min(N, group * chunk), w_s.shape[0]), dtype=logit_dtype, device=h_s.device)
                    if group > 1 else None)
        # dh and dW only where their inputs take a gradient: a frozen LM head (lr_rest 0) gets no dW, its [V, H]
        # buffers and GEMMs (dW^T's N x V x H multiply-adds) skipped
        need_dh, need_dw = need_grad and h_s.requires_grad, need_grad and w_s.requires_grad
        dh = torch.empty_like(h_s) if need_dh else None
        # dW: the first chunk's GEMM writes it (no [V, H] zero fill, no read of zeros), the others accumulate; a
        # 16-bit W's dW summed over several GEMMs (groups) is summed in fp32 and rounded once at the end (summed in
        # 16 bits, each GEMM's addition rounded: 0.95 % relative error over 64 GEMMs against 0.17 % for one rounding)
        acc32 = (need_dw and w_s.dtype.itemsize < 4 and N > group * chunk and stats.get("dw_fp32", True))
        dw = None
        if need_dw:
            dw = (torch.empty(w_s.shape, dtype=torch.float32, device=w_s.device) if acc32
                  else torch.empty_like(w_s) if N else torch.zeros_like(w_s))
        kl_tok = torch.zeros(N, dtype=torch.float32, device=h_s.device) if use_kl else None
        ce_tok = torch.zeros(N, dtype=torch.float32, device=h_s.device) if use_ce else None
        w_s_t = w_s.t()
        w_t_t = w_t.t() if use_kl else None
        for a in range(0, N, chunk):
            b = min(N, a + chunk)
            hs = h_s[a:b]
            g0 = a - a % (group * chunk)  # the first token of this chunk's group
            if zs_group is not None:
                zs = _mm_logits_into(hs, w_s_t, zs_group[a - g0:b - g0])
            else:
                zs = _mm_logits(hs, w_s_t, fp32)
            zt = _mm_logits(h_t[a:b].to(w_t.dtype), w_t_t, fp32) if use_kl else None
            dz, kl, ce = run_row_kernel(zs, zt, kl_w[a:b] if use_kl else None,
                                        labels[a:b].contiguous() if use_ce else None, temperature,
                                        scales, dz_dtype, need_grad, block_v, in_place)
            del zs, zt
            if use_kl:
                kl_tok[a:b] = kl
            if use_ce:
                ce_tok[a:b] = ce
            if need_grad and zs_group is not None:
                if b == N or (b - g0) == group * chunk:  # the group's last chunk: its dz are all in the buffer
                    dz_g, hs_g = zs_group[:b - g0], h_s[g0:b]
                    if need_dh:
                        torch.mm(dz_g, w_s, out=dh[g0:b])
                    if need_dw:
                        _dw_gemm_(dw, dz_g.t(), hs_g, g0 > 0, acc32)
            elif need_grad:
                if need_dh:
                    torch.mm(dz, w_s, out=dh[a:b])
                if need_dw:
                    _dw_gemm_(dw, dz.t(), hs, a > 0, acc32)
            del dz
        if acc32:
            dw = dw.to(w_s.dtype)  # rounded once
        loss = torch.zeros((), dtype=torch.float32, device=h_s.device)
        if use_kl:  # masked tokens hold 0, so an all-masked chunk adds 0
            loss = loss + kl_weight * kl_tok.sum() / n_kl.clamp(min=1)
        if use_ce:
            loss = loss + ce_weight * ce_tok.sum() / n_ce.clamp(min=1)
        stats.update(kl_per_token=kl_tok, ce_per_token=ce_tok, n_kl=n_kl, n_ce=n_ce)
        if need_grad:
            ctx.save_for_backward(dh, dw)
        ctx.need_grad = need_grad
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        if not ctx.need_grad:
            return (None,) * 11
        dh, dw = ctx.saved_tensors
        # in place: the saved gradients are used once, and a copy of dW ([V, H]) would cost as much as dW itself;
        # a grad_out of 1 (the loss backpropagated alone, as with one micro-batch a step) leaves them untouched
        # (else a 16-bit dW is rounded a second time: exactly where grad_out is a power of two, as 1 / the
        # accumulation steps of the shipped configs is)
        return (None if dh is None else scale_unless_one_(dh, grad_out),
                None if dw is None else scale_unless_one_(dw, grad_out), *(None,) * 9)


def fused_linear_loss(
    h_s: torch.Tensor, w_s: torch.Tensor, h_t: torch.Tensor | None = None, w_t: torch.Tensor | None = None,
    kl_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None, temperature: float = 1.0,
    kl_weight: float = 1.0, ce_weight: float = 0.0, chunk: int = 1024, block_v: int | None = None,
    in_place: bool | None = None, fp32_logits: bool = True, dw_chunk: int | None = None, dw_fp32: bool = True,
) -> tuple[torch.Tensor, LossStats]:
    """[N, H] hidden states + lm_head weights -> (scalar loss, per-token stats). See the module docstring.

    ``block_v`` overrides the vocab tile of the row kernel (tests use small tiles to exercise the online softmax).
    ``in_place`` writes each chunk's dL/dz over its student logits instead of a buffer of its own: 8 bytes a logit
    of extra memory instead of 10, at the same speed and bit for bit the same dz on an H200 (docs/BENCHMARKS.md).
    None (default): in place wherever dz fits in the logits (bf16, fp16 and fp32 inputs; fp64 ones use a buffer);
    True: in place or an error; False: the separate buffer (the reference the in-place path is checked against).
    ``fp32_logits=False``: 16-bit inputs give 16-bit logits (module docstring; the loss and dz are computed in fp32
    from the rounded logits, as :func:`ds_hybrid.losses.chunked_linear_loss` with the same option).
    ``dw_chunk``: tokens per dW GEMM, a multiple of ``chunk`` (None: ``chunk``). Each chunk's dz stays in a logit
    buffer of min(N, dw_chunk) rows until the group's GEMMs (dh, dW) run, so the [V, H] dW is read and written once
    per group: (min(N, dw_chunk) / chunk - 1) x chunk x V logits more extra memory, a read and a write of dW fewer
    for each chunk folded into a group. Needs dz written in place over logits of its dtype (16-bit logits,
    ``fp32_logits=False``, or fp32 inputs): checked here, with or without gradients.
    ``dw_fp32`` (default): a 16-bit ``w_s``'s dW over more than one GEMM (N > dw_chunk, or chunk) is summed in an
    fp32 [V, H] buffer and rounded once (4 V H bytes more while the loss runs); False: summed in 16 bits."""
    if kl_mask is None:
        kl_mask = torch.ones(h_s.shape[0], dtype=torch.bool, device=h_s.device)
    check_kl_mask(kl_mask)
    check_labels(labels, w_s.shape[0], ce_weight)
    if chunk < 1:
        raise ValueError(f"chunk={chunk}: give the tokens per chunk as a positive number (1024 is the default)")
    if w_s.dtype != h_s.dtype:
        raise TypeError(f"h_s is {h_s.dtype} but w_s is {w_s.dtype}; use one dtype (bf16 or fp32)")
    if h_t is not None and (w_t is None or w_t.shape != w_s.shape or h_t.shape != h_s.shape):
        # (the kernel reads the teacher's logits with the student's row pitch and vocabulary: another shape would
        # be read misaligned or past its end, where the reference path raises)
        raise ValueError(f"teacher h_t {tuple(h_t.shape)} / w_t {None if w_t is None else tuple(w_t.shape)} must "
                         f"match the student's h_s {tuple(h_s.shape)} / w_s {tuple(w_s.shape)} (one vocabulary, one "
                         "hidden size, one row per token)")
    if dw_chunk is not None and (dw_chunk < chunk or dw_chunk % chunk):
        raise ValueError(f"dw_chunk={dw_chunk}: tokens per dW GEMM must be a multiple of chunk={chunk} (e.g. "
                         f"{2 * chunk}), or None")
    if dw_chunk is not None and dw_chunk > chunk:  # before any work, with or without gradients
        logits = torch.float32 if (fp32_logits or h_s.dtype.itemsize >= 4) else h_s.dtype
        if logits != h_s.dtype or in_place is False:
            raise ValueError(f"dw_chunk > chunk keeps each chunk's dz in its logits' place: it needs dz of the "
                             f"logits' dtype written in place (16-bit logits, fp32_logits=False, or fp32 inputs); "
                             f"these are {h_s.dtype} inputs with {logits} logits (in_place={in_place})")
    stats: dict = {"need_grad": torch.is_grad_enabled() and (h_s.requires_grad or w_s.requires_grad),
                   "block_v": block_v, "in_place": in_place, "fp32_logits": fp32_logits, "dw_chunk": dw_chunk,
                   "dw_fp32": dw_fp32}
    loss = FusedLinearLoss.apply(h_s, w_s, h_t, w_t, kl_mask, labels, temperature, kl_weight, ce_weight, chunk, stats)
    return loss, LossStats(stats["kl_per_token"], stats["ce_per_token"], stats["n_kl"], stats["n_ce"])
