"""The fused linear+KL Triton kernel under Triton's interpreter (CPU) against an fp64 reference, the torch reference
path against the same, and the switch between them. (conftest sets TRITON_INTERPRET=1 before Triton is imported.)"""

from __future__ import annotations

from functools import partial

import pytest
import torch

from ds_hybrid.kernels import fused_kl, triton_interpreted
from ds_hybrid.losses import chunked_linear_loss, reference_kl_ce
from ds_hybrid.stages.kl import loss_function

# vocab tiles of 128 so that every row streams several tiles through the online (max, sum) update
fused_linear_loss = partial(fused_kl.fused_linear_loss, block_v=128)
# without a GPU the kernel can only run interpreted; on a GPU, TRITON_INTERPRET=0 runs the *_on_cuda tests compiled
# (interpreted, the 4,096-token one took over 150 s on an H100) and skips the CPU ones, whose tensors a compiled
# kernel cannot read
assert triton_interpreted() or torch.cuda.is_available()


@pytest.fixture(autouse=True)
def _interpreter_for_cpu_tests(request):
    if not triton_interpreted() and not request.node.originalname.endswith("_on_cuda"):
        pytest.skip("TRITON_INTERPRET=0 (compiled kernels): only the *_on_cuda tests run")


def inputs(N, H, V, seed, masked=True, labels=True):
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(N, H, generator=g, dtype=torch.float64)
    ws = torch.randn(V, H, generator=g, dtype=torch.float64) * 0.4
    ht = torch.randn(N, H, generator=g, dtype=torch.float64)
    wt = torch.randn(V, H, generator=g, dtype=torch.float64) * 0.4
    mask = torch.rand(N, generator=g) > 0.25 if masked else torch.ones(N, dtype=torch.bool)
    lab = torch.randint(0, V, (N,), generator=g) if labels else None
    if lab is not None:
        lab[::4] = -100
    return hs, ws, ht, wt, mask, lab


def reference(hs, ws, ht, wt, mask, lab, T, kl_w, ce_w):
    h, w = hs.clone().requires_grad_(), ws.clone().requires_grad_()
    loss, kl = reference_kl_ce(h, w, ht, wt, mask.double(), lab, T, kl_w, ce_w)
    loss.backward()
    return loss.detach(), kl, h.grad, w.grad


def rel(a, b):
    return float((a.double() - b).norm() / b.norm().clamp_min(1e-30))


# N and V are not multiples of the chunk (16) or of the interpreter's vocab tile (128)
@pytest.mark.parametrize("fn", [fused_linear_loss, chunked_linear_loss], ids=["triton", "torch"])
@pytest.mark.parametrize("T,kl_w,ce_w", [(1.0, 1.0, 0.0), (2.3, 1.0, 0.0), (1.0, 1.0, 0.5), (1.0, 0.0, 1.0)])
def test_loss_kl_and_grads_match_fp64(fn, T, kl_w, ce_w):
    N, H, V = 45, 24, 333
    hs, ws, ht, wt, mask, lab = inputs(N, H, V, seed=int(T * 10 + ce_w * 7))
    r_loss, r_kl, r_dh, r_dw = reference(hs, ws, ht, wt, mask, lab if ce_w else None, T, kl_w, ce_w)
    h, w = hs.float().requires_grad_(), ws.float().requires_grad_()
    loss, st = fn(h, w, ht.float(), wt.float(), mask, lab if ce_w else None, T, kl_w, ce_w, chunk=16)
    loss.backward()
    assert abs(float(loss) - float(r_loss)) <= 1e-5 * abs(float(r_loss))
    if kl_w:
        assert (st.kl_per_token.double() - r_kl).abs().max() < 1e-5
        assert (st.kl_per_token[~mask] == 0).all() and st.n_kl == int(mask.sum())
    assert rel(h.grad, r_dh) < 1e-5 and rel(w.grad, r_dw) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_scale_leaves_gradients_untouched_at_one_and_scales_otherwise(dtype):
    """The backward's gradients dh and dW are formed in the forward and scaled by the gradient the loss receives
    (fused_kl.scale_unless_one_, g read on the device): a g of exactly 1 leaves them bit for bit (that it also skips
    the pass over them is a GPU time, for bench/kl.py); 0.3 gives x * 0.3
    (fp32 product, one rounding: exact in fp32; bf16 within one unit in the last place: the interpreter rounds toward
    zero); NaN spreads as torch's multiply would; a non-contiguous tensor takes torch's multiply."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 5000, generator=g).to(dtype)  # 15,000 elements: 4 programs, the last one partial
    y = x.clone()
    assert fused_kl.scale_unless_one_(y, torch.tensor(1.0)) is y and torch.equal(y, x)
    fused_kl.scale_unless_one_(y, torch.tensor(0.3))
    want = x.float() * torch.tensor(0.3)
    if dtype == torch.float32:
        assert torch.equal(y, want)
    else:
        assert ((y.float() - want).abs() <= want.abs() * 2.0**-7).all() and not torch.equal(y, x)
    y = x.clone()
    assert fused_kl.scale_unless_one_(y, torch.tensor([float("nan")])).isnan().all()
    t = x.clone().t()
    assert torch.equal(fused_kl.scale_unless_one_(t, torch.tensor(0.5)), x.t() * 0.5)
    with pytest.raises(ValueError, match="one"):
        fused_kl.scale_unless_one_(x.clone(), torch.ones(2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_scaled_loss_scales_the_gradients(dtype):
    """(loss x 0.25).backward(), as DeepSpeed's accumulation over 4 micro-batches calls it, and x 0.3: the gradients
    are those of loss.backward() x s to the last bit (s as the fp32 loss hands it on; one rounding in the inputs'
    dtype: fp64 ones are not cut to fp32) and the fp64 reference's x s; a second backward through the same graph (retain_graph) is refused as it was
    with torch's in-place multiply, not answered with gradients scaled twice."""
    N, H, V = 45, 24, 333
    hs, ws, ht, wt, mask, lab = inputs(N, H, V, seed=11)
    _, _, r_dh, r_dw = reference(hs, ws, ht, wt, mask, None, 1.0, 1.0, 0.0)
    grads = {}
    for s in (1.0, 0.25, 0.3):
        h, w = hs.to(dtype, copy=True).requires_grad_(), ws.to(dtype, copy=True).requires_grad_()
        loss, _ = fused_linear_loss(h, w, ht.to(dtype), wt.to(dtype), mask, None, 1.0, 1.0, 0.0, chunk=16)
        (loss * s).backward(retain_graph=True)
        grads[s] = h.grad.clone(), w.grad.clone()
        assert rel(h.grad, r_dh * s) < 1e-5 and rel(w.grad, r_dw * s) < 1e-5
        g = torch.tensor(s, dtype=loss.dtype).to(dtype)  # (what the fp32 loss hands its backward)
        assert torch.equal(h.grad, grads[1.0][0] * g) and torch.equal(w.grad, grads[1.0][1] * g)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            (loss * s).backward()


def test_no_tokens_give_zero_loss_and_zero_gradients(monkeypatch):
    """dW is written by the first chunk's GEMM (no zero fill); with no chunk at all it must still be zeros (fresh
    tensors filled with NaN here, so that an unwritten dW cannot pass by holding zeros by chance)."""
    empty_like = torch.empty_like
    monkeypatch.setattr(torch, "empty_like", lambda t, **kw: empty_like(t, **kw).fill_(float("nan")))
    hs, ws, ht, wt, mask, _ = inputs(0, 8, 150, seed=5)
    h, w = hs.float().requires_grad_(), ws.float().requires_grad_()
    loss, _ = fused_linear_loss(h, w, ht.float(), wt.float(), mask, chunk=8)
    loss.backward()
    assert float(loss) == 0 and h.grad.shape == (0, 8) and torch.equal(w.grad, torch.zeros_like(w))
    with pytest.raises(ValueError, match="chunk=0"):
        fused_linear_loss(h, w, ht.float(), wt.float(), mask, chunk=0)


def test_masked_tokens_contribute_nothing():
    hs, ws, ht, wt, mask, _ = inputs(30, 8, 150, seed=3)
    h = hs.float().requires_grad_()
    loss, _ = fused_linear_loss(h, ws.float(), ht.float(), wt.float(), mask, chunk=8)
    loss.backward()
    assert (h.grad[~mask] == 0).all() and (h.grad[mask] != 0).any()
    # changing a masked token's teacher changes nothing
    ht2 = ht.clone()
    ht2[~mask] += 5
    loss2, _ = fused_linear_loss(hs.float(), ws.float(), ht2.float(), wt.float(), mask, chunk=8)
    assert float(loss2) == pytest.approx(float(loss), rel=1e-7)


def test_no_grad_mode_gives_the_same_values_without_gradients():
    hs, ws, ht, wt, mask, lab = inputs(20, 8, 140, seed=4)
    with torch.no_grad():
        loss, st = fused_linear_loss(hs.float(), ws.float(), ht.float(), wt.float(), mask, lab, 1.0, 1.0, 1.0)
    ref, _ = chunked_linear_loss(hs.float(), ws.float(), ht.float(), wt.float(), mask, lab, 1.0, 1.0, 1.0)
    assert float(loss) == pytest.approx(float(ref), rel=1e-6)
    assert st.ce_per_token.shape == (20,)


def test_bf16_inputs_within_bf16_tolerance():
    """bf16 hidden states and weights (what GPUs feed): loss within 1e-3, gradients within 1e-2 of fp64."""
    hs, ws, ht, wt, mask, _ = inputs(40, 32, 260, seed=5)
    r_loss, _, r_dh, r_dw = reference(hs.bfloat16().double(), ws.bfloat16().double(), ht.bfloat16().double(),
                                      wt.bfloat16().double(), mask, None, 1.0, 1.0, 0.0)
    h, w = hs.bfloat16().requires_grad_(), ws.bfloat16().requires_grad_()
    loss, _ = fused_linear_loss(h, w, ht.bfloat16(), wt.bfloat16(), mask, chunk=16)
    loss.backward()
    assert abs(float(loss) - float(r_loss)) < 1e-3 * float(r_loss)
    assert rel(h.grad.float(), r_dh) < 1e-2 and rel(w.grad.float(), r_dw) < 1e-2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("ce_w", [0.0, 0.5])
def test_in_place_dz_gives_the_same_loss_and_gradients(dtype, ce_w):
    """in_place=True writes dL/dz over the student logits (bf16 dz: into the first half of each fp32 row's bytes):
    the loss and gradients equal the separate buffer's, and the returned dz is a view of the logits' memory."""
    hs, ws, ht, wt, mask, lab = inputs(37, 24, 333, seed=9)
    lab = lab if ce_w else None
    out = []
    for in_place in (False, True):
        h, w = hs.to(dtype).requires_grad_(), ws.to(dtype).requires_grad_()
        loss, st = fused_linear_loss(h, w, ht.to(dtype), wt.to(dtype), mask, lab, 1.7, 1.0, ce_w, chunk=16,
                                     in_place=in_place)
        loss.backward()
        out.append((loss.detach(), st.kl_per_token, h.grad, w.grad))
    for a, b in zip(*out):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    # the kernel's own output: dz shares z_s's storage, with z_s's row pitch
    zs = torch.randn(5, 333) * 3
    zt = torch.randn(5, 333) * 3
    scales = torch.tensor([0.2, 0.0])
    ref, _, _ = fused_kl.run_row_kernel(zs.clone(), zt, torch.ones(5), None, 1.0, scales, dtype, block_v=128)
    dz, _, _ = fused_kl.run_row_kernel(zs, zt, torch.ones(5), None, 1.0, scales, dtype, block_v=128, in_place=True)
    assert dz.untyped_storage().data_ptr() == zs.untyped_storage().data_ptr() and dz.shape == (5, 333)
    assert dz.stride(0) == 333 * zs.element_size() // dz.element_size()
    assert torch.equal(dz, ref)
    with pytest.raises(ValueError, match="in_place"):
        fused_kl.run_row_kernel(zs.half().float()[:, :300], zt[:, :300], torch.ones(5), None, 1.0, scales, dtype,
                                in_place=True)
    with pytest.raises(ValueError, match="does not fit"):
        fused_kl.run_row_kernel(zs, zt, torch.ones(5), None, 1.0, scales, torch.float64, in_place=True)



@pytest.mark.parametrize("dw_chunk", [32, 48, 64])
@pytest.mark.parametrize("ce_w", [0.0, 0.5])
def test_dw_over_several_chunks_matches_fp64(dw_chunk, ce_w):
    """dw_chunk: dh and dW formed once per group of chunks from their dz kept in one logit buffer (45 tokens, chunks
    of 16: groups of 2 chunks and a short last one, and one group of all three, the last chunk short). fp32 inputs: the loss equals the per-chunk path's
    exactly, the gradients fp64's within 1e-5; bf16 with 16-bit logits: within bf16 tolerance of fp64 on the rounded
    logits, the loss and per-token KL bit for bit the per-chunk path's (the logits are the same)."""
    hs, ws, ht, wt, mask, lab = inputs(45, 24, 333, seed=21)
    lab = lab if ce_w else None
    r_loss, _, r_dh, r_dw = reference(hs, ws, ht, wt, mask, lab, 1.4, 1.0, ce_w)
    out = {}
    for name, kw in (("per_chunk", {}), ("grouped", {"dw_chunk": dw_chunk})):
        h, w = hs.float().requires_grad_(), ws.float().requires_grad_()
        loss, _ = fused_linear_loss(h, w, ht.float(), wt.float(), mask, lab, 1.4, 1.0, ce_w, chunk=16, **kw)
        loss.backward()
        out[name] = (loss.detach(), h.grad, w.grad)
    assert float(out["grouped"][0]) == float(out["per_chunk"][0])
    assert rel(out["grouped"][1], r_dh) < 1e-5 and rel(out["grouped"][2], r_dw) < 1e-5
    hb, wb, htb, wtb = hs.bfloat16(), ws.bfloat16(), ht.bfloat16(), wt.bfloat16()
    got = {}
    for name, kw in (("per_chunk", {}), ("grouped", {"dw_chunk": dw_chunk})):
        h, w = hb.clone().requires_grad_(), wb.clone().requires_grad_()
        loss, st = fused_linear_loss(h, w, htb, wtb, mask, lab, 1.4, 1.0, ce_w, chunk=16, fp32_logits=False, **kw)
        loss.backward()
        got[name] = (loss.detach(), st.kl_per_token, h.grad, w.grad)
    assert torch.equal(got["grouped"][0], got["per_chunk"][0]) and torch.equal(got["grouped"][1], got["per_chunk"][1])
    assert rel(got["grouped"][2].float(), r_dh) < 2e-2 and rel(got["grouped"][3].float(), r_dw) < 2e-2


@pytest.mark.parametrize("N", [0, 5, 64])
def test_dw_over_several_chunks_at_the_edges(N):
    """N = 0, N shorter than a chunk, and four whole chunks in one group: the same loss and dh as the per-chunk path,
    dW within rounding; without gradients no buffer and the same loss."""
    hs, ws, ht, wt, mask, lab = inputs(max(N, 1), 16, 150, seed=5)
    hs, ht, mask, lab = hs[:N], ht[:N], mask[:N], lab[:N]
    out = []
    for kw in ({}, {"dw_chunk": 64}):
        h, w = hs.float().requires_grad_(), ws.float().requires_grad_()
        loss, _ = fused_linear_loss(h, w, ht.float(), wt.float(), mask, lab, 1.0, 1.0, 0.5, chunk=16, **kw)
        loss.backward()
        out.append((loss.detach(), h.grad, w.grad))
        with torch.no_grad():
            again, _ = fused_linear_loss(hs.float(), ws.float(), ht.float(), wt.float(), mask, lab, 1.0, 1.0, 0.5,
                                         chunk=16, **kw)
        assert float(again) == float(loss)
    assert float(out[0][0]) == float(out[1][0]) and torch.equal(out[0][1], out[1][1])
    torch.testing.assert_close(out[1][2], out[0][2], rtol=1e-6, atol=1e-7)
    if N == 0:
        assert not out[1][2].any()


@pytest.mark.parametrize("rows", [8192, 100])
def test_bf16_dw_over_many_gemms_is_summed_in_fp32(rows, monkeypatch):
    """A bf16 W's dW over 64 GEMMs (1,024 tokens, chunks of 16) summed in fp32 and rounded once: as close to fp64
    (on the same bf16 inputs) as dh, which no sum across chunks touches (~3.5e-3, the bf16 dz's rounding); summed in
    bf16 (``dw_fp32=False``, the old path) each GEMM's addition rounds, 2.5x further (~9e-3). The fp32 products made
    ``rows`` rows of dW at a time (CPU, and CUDA without an in-place fp32 GEMM): 100 of the 256 rows, three blocks."""
    monkeypatch.setattr(fused_kl, "FALLBACK_ROWS", rows)
    hs, ws, ht, wt, mask, _ = inputs(1024, 32, 256, seed=2)
    hb, wb, htb, wtb = hs.bfloat16(), ws.bfloat16(), ht.bfloat16(), wt.bfloat16()
    _, _, r_dh, r_dw = reference(hb.double(), wb.double(), htb.double(), wtb.double(), mask, None, 1.0, 1.0, 0.0)
    err = {}
    for acc in (True, False):
        h, w = hb.clone().requires_grad_(), wb.clone().requires_grad_()
        loss, _ = fused_linear_loss(h, w, htb, wtb, mask, None, 1.0, 1.0, 0.0, chunk=16, dw_fp32=acc)
        loss.backward()
        assert w.grad.dtype == torch.bfloat16
        err[acc] = (rel(h.grad, r_dh), rel(w.grad, r_dw))
    assert err[True][1] < 1.25 * err[True][0] and err[True][1] < 5e-3, err
    assert err[False][1] > 2 * err[True][1], err  # (the option reaches the kernel)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="cuBLAS's GEMM into an fp32 output needs a GPU")
def test_bf16_dw_fp32_sum_on_cuda():
    """On a GPU (not in CI): this torch's GEMM adds into dW's fp32 accumulator in place (the fast path, checked once
    per device by _gemm_into_fp32_ok), and a bf16 dW over 64 chunks is as close to fp64 as dh, as on CPU."""
    assert fused_kl._gemm_into_fp32_ok(torch.device("cuda", 0), torch.bfloat16)
    hs, ws, ht, wt, mask, _ = inputs(4096, 256, 4000, seed=3)
    hb, wb, htb, wtb = (x.bfloat16() for x in (hs, ws, ht, wt))
    _, _, r_dh, r_dw = reference(hb.double(), wb.double(), htb.double(), wtb.double(), mask, None, 1.0, 1.0, 0.0)
    err = {}
    for acc in (True, False):
        h, w = hb.cuda().requires_grad_(), wb.cuda().requires_grad_()
        loss, _ = fused_linear_loss(h, w, htb.cuda(), wtb.cuda(), mask.cuda(), None, 1.0, 1.0, 0.0, chunk=64,
                                    dw_fp32=acc)
        loss.backward()
        err[acc] = (rel(h.grad.cpu(), r_dh), rel(w.grad.cpu(), r_dw))
    assert err[True][1] < 1.25 * err[True][0] and err[False][1] > 2 * err[True][1], err


@pytest.mark.parametrize("grad_scale", [1.0, 0.5])
def test_a_frozen_lm_head_gets_no_dw(grad_scale):
    """w_s without a gradient (lr_rest 0 freezes the LM head): no dW is formed, and the loss and dh are bit for bit
    those of a run that forms it (also when the loss is scaled before its backward, as under accumulation)."""
    hs, ws, ht, wt, mask, lab = inputs(45, 24, 333, seed=8)
    out = []
    for w_grad in (True, False):
        h, w = hs.bfloat16().requires_grad_(), ws.bfloat16().requires_grad_(w_grad)
        loss, _ = fused_linear_loss(h, w, ht.bfloat16(), wt.bfloat16(), mask, lab, 1.0, 1.0, 0.5, chunk=16)
        (loss * grad_scale).backward()
        out.append((loss.detach(), h.grad, w.grad))
    assert torch.equal(out[0][0], out[1][0]) and torch.equal(out[0][1], out[1][1])
    assert out[0][2] is not None and out[1][2] is None


def test_dw_chunk_is_checked():
    hs, ws, ht, wt, mask, _ = inputs(20, 8, 200, seed=3)
    h, w = hs.bfloat16().requires_grad_(), ws.bfloat16().requires_grad_()
    with pytest.raises(ValueError, match=r"dw_chunk=24: .* multiple of chunk=16"):
        fused_linear_loss(h, w, ht.bfloat16(), wt.bfloat16(), mask, chunk=16, dw_chunk=24)
    with pytest.raises(ValueError, match=r"dw_chunk > chunk .*\(16-bit logits"):  # bf16 dz cannot stay in fp32 logits
        fused_linear_loss(h, w, ht.bfloat16(), wt.bfloat16(), mask, chunk=8, dw_chunk=16, fp32_logits=True)
    with torch.no_grad(), pytest.raises(ValueError, match=r"dw_chunk > chunk"):  # refused without gradients too
        fused_linear_loss(h, w, ht.bfloat16(), wt.bfloat16(), mask, chunk=8, dw_chunk=16, fp32_logits=True)
    with pytest.raises(ValueError, match=r"dw_chunk > chunk .*in_place=False"):
        fused_linear_loss(hs.float(), ws.float(), ht.float(), wt.float(), mask, chunk=8, dw_chunk=16, in_place=False)


def test_a_teacher_of_another_shape_is_refused_not_read_misaligned():
    """The kernel reads the teacher's logits with the student's row pitch and vocabulary: a teacher head of another
    vocabulary (or hidden states of other rows) gave a loss from misaligned memory; now an error, as the torch path
    raises."""
    hs, ws, ht, wt, mask, _ = inputs(20, 8, 100, seed=3)
    wider = torch.randn(128, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"teacher h_t \(20, 8\) / w_t \(128, 8\) must match the student's"):
        fused_linear_loss(hs.float(), ws.float(), ht.float(), wider.float(), mask, chunk=8)
    with pytest.raises(ValueError, match=r"teacher h_t \(19, 8\)"):
        fused_linear_loss(hs.float(), ws.float(), ht[:19].float(), wt.float(), mask, chunk=8)
    with pytest.raises(RuntimeError):
        chunked_linear_loss(hs.float(), ws.float(), ht.float(), wider.float(), mask, chunk=8)


def test_the_reference_has_no_ce_term_where_no_token_has_a_label():
    """reference_kl_ce (what the kernels are checked against) gave NaN with every label -100 (a mean over nothing);
    the real paths give the KL alone, and so does the reference now."""
    hs, ws, ht, wt, mask, _ = inputs(6, 8, 50, seed=4)
    none = torch.full((6,), -100)
    kl_only, _ = reference_kl_ce(hs, ws, ht, wt, mask.double(), None, 1.0, 1.0, 0.0)
    loss, _ = reference_kl_ce(hs, ws, ht, wt, mask.double(), none, 1.0, 1.0, 0.5)
    assert torch.isfinite(loss) and float(loss) == float(kl_only)
    fused, _ = fused_linear_loss(hs.float(), ws.float(), ht.float(), wt.float(), mask, labels=none, ce_weight=0.5,
                                 chunk=4)
    assert float(fused) == pytest.approx(float(kl_only), rel=1e-5)


@pytest.mark.parametrize("dtype,expected", [(torch.bfloat16, True), (torch.float32, True), (torch.float64, False)])
def test_in_place_is_the_default_where_dz_fits(monkeypatch, dtype, expected):
    """By default each chunk's dz goes over its logits wherever it fits (bf16/fp32 inputs, the training path) and into
    a buffer of its own for fp64 inputs (whose dz cannot fit in fp32 logits); no-grad calls write no dz at all."""
    seen = []
    real = fused_kl.run_row_kernel

    def spy(*args):
        seen.append((args[7], args[9]))  # (need_grad, in_place)
        return real(*args)

    monkeypatch.setattr(fused_kl, "run_row_kernel", spy)
    hs, ws, ht, wt, mask, _ = inputs(20, 8, 200, seed=3)
    h, w = hs.to(dtype).requires_grad_(), ws.to(dtype).requires_grad_()
    loss, _ = fused_linear_loss(h, w, ht.to(dtype), wt.to(dtype), mask, chunk=8)
    loss.backward()
    assert seen == [(True, expected)] * 3
    with torch.no_grad():
        fused_linear_loss(hs.to(dtype), ws.to(dtype), ht.to(dtype), wt.to(dtype), mask, chunk=8)
    assert seen[3:] == [(False, expected)] * 3

def test_backend_switch():
    assert loss_function("torch") is chunked_linear_loss
    assert loss_function("torch", dw_fp32=False) is chunked_linear_loss  # (the reference always sums dW in fp32)
    assert loss_function("triton", dw_fp32=False).keywords == {"dw_fp32": False}
    assert loss_function("triton", False, False).keywords == {"fp32_logits": False, "dw_fp32": False}
    assert loss_function("triton") is fused_kl.fused_linear_loss
    expected = fused_kl.fused_linear_loss if torch.cuda.is_available() else chunked_linear_loss
    assert loss_function("auto") is expected


@pytest.mark.parametrize("fn", [fused_linear_loss, chunked_linear_loss], ids=["triton", "torch"])
@pytest.mark.parametrize("ce_w", [0.0, 0.5])
def test_16bit_logits_match_fp64_from_the_rounded_logits(fn, ce_w):
    """fp32_logits=False (kl.fp32_logits: false): bf16 inputs give bf16 logits, each rounded once from the fp32
    product. The loss and per-token KL then equal fp64 math on exactly those rounded logits (2e-6), the gradients
    within bf16 tolerance; the rounding is visible (the fp32-logits loss is 5x further from that reference)."""
    hs, ws, ht, wt, mask, lab = inputs(45, 32, 333, seed=11)
    lab = lab if ce_w else None
    hb, wb, htb, wtb = hs.bfloat16(), ws.bfloat16(), ht.bfloat16(), wt.bfloat16()
    zs = (hb.float() @ wb.float().t()).bfloat16().double().requires_grad_()
    zt = (htb.float() @ wtb.float().t()).bfloat16().double()
    eye = torch.eye(333, dtype=torch.float64)  # the rounded logits through an identity head: fp64 reference math
    r_loss, r_kl = reference_kl_ce(zs, eye, zt, eye, mask.double(), lab, 1.3, 1.0, ce_w)
    r_loss.backward()
    r_dh, r_dw = zs.grad @ wb.double(), zs.grad.t() @ hb.double()
    h, w = hb.clone().requires_grad_(), wb.clone().requires_grad_()
    loss, st = fn(h, w, htb, wtb, mask, lab, 1.3, 1.0, ce_w, chunk=16, fp32_logits=False)
    loss.backward()
    assert abs(float(loss) - float(r_loss)) <= 2e-6 * abs(float(r_loss))
    assert (st.kl_per_token.double() - r_kl).abs().max() < 1e-5
    assert rel(h.grad.float(), r_dh) < 1e-2 and rel(w.grad.float(), r_dw) < 1e-2
    fp32_loss, _ = fn(hb, wb, htb, wtb, mask, lab, 1.3, 1.0, ce_w, chunk=16)
    assert abs(float(fp32_loss) - float(r_loss)) > 1e-5 * abs(float(r_loss))  # (2e-5 to 4e-5 here)
    # fp32 inputs: the option changes nothing (their logits are fp32 either way)
    a, _ = fn(hs.float(), ws.float(), ht.float(), wt.float(), mask, lab, 1.3, 1.0, ce_w, chunk=16, fp32_logits=False)
    b, _ = fn(hs.float(), ws.float(), ht.float(), wt.float(), mask, lab, 1.3, 1.0, ce_w, chunk=16)
    assert float(a) == float(b)


def test_kl_fp32_logits_reaches_the_loss_function():
    """kl.fp32_logits: false gives the stage a loss function that computes 16-bit logits, for either backend."""
    hs, ws, ht, wt, mask, _ = inputs(20, 16, 140, seed=12)
    args = (hs.bfloat16(), ws.bfloat16(), ht.bfloat16(), wt.bfloat16(), mask)
    for backend in ("torch", "triton"):
        got, _ = loss_function(backend, fp32_logits=False)(*args, chunk=8)
        want, _ = loss_function(backend)(*args, chunk=8)
        ref, _ = chunked_linear_loss(*args, chunk=8, fp32_logits=False)
        assert float(got) == pytest.approx(float(ref), rel=1e-5) and float(got) != float(want)
    # an fp32 teacher head beside a bf16 student: the teacher's logits stay fp32 in both backends
    mixed = (hs.bfloat16(), ws.bfloat16(), ht.float(), wt.float(), mask)
    a, _ = loss_function("triton", fp32_logits=False)(*mixed, chunk=8)
    b, _ = loss_function("torch", fp32_logits=False)(*mixed, chunk=8)
    assert float(a) == pytest.approx(float(b), rel=1e-5)


def test_the_torch_reference_scales_bf16_gradients_in_fp32_and_forms_no_dw_for_a_frozen_head():
    """The reference's backward multiplied its bf16 dh and dW by grad_out rounded to bf16 (a 1/3 accumulation scale:
    0.33398, every gradient 0.2 % large); and it formed dW (an fp32 [V, H] and its copy) for an LM head that takes no
    gradient (lr_rest 0), as the kernel does not. Both paths refuse a mask of weights (they count its tokens
    differently)."""
    hs, ws, ht, wt, mask, lab = inputs(40, 16, 200, seed=5)
    h, w = hs.bfloat16().requires_grad_(), ws.bfloat16().requires_grad_()
    args = (ht.bfloat16(), wt.bfloat16(), mask, lab, 1.3, 1.0, 0.5)
    chunked_linear_loss(h, w, *args, chunk=16)[0].backward()
    g1h, g1w = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    third = torch.tensor(1 / 3, dtype=torch.float32)
    (chunked_linear_loss(h, w, *args, chunk=16)[0] * third).backward()
    assert torch.equal(h.grad, (g1h.float() * third).bfloat16()) and torch.equal(w.grad, (g1w.float() * third).bfloat16())
    frozen = ws.bfloat16()  # (no gradient: no dW formed or returned; dh unchanged)
    h.grad = None
    chunked_linear_loss(h, frozen, *args, chunk=16)[0].backward()
    assert frozen.grad is None and torch.equal(h.grad, g1h)
    for fn in (chunked_linear_loss, fused_linear_loss):
        with pytest.raises(TypeError, match="kl_mask must be a bool tensor .* not torch.float32"):
            fn(hs.float(), ws.float(), ht.float(), wt.float(), mask.float(), chunk=16)


def test_labels_outside_the_vocabulary_are_refused_by_both_paths():
    """The fused kernel read the logit at any label's column: a negative label other than -100 or one >= V read
    another row's logit (or past the buffer) where the reference's cross entropy raised. Both paths refuse it now;
    -100 and every id in [0, V) pass, and without a CE term the labels are not read."""
    hs, ws, ht, wt, mask, lab = inputs(40, 16, 200, seed=5)
    for fn in (chunked_linear_loss, fused_linear_loss):
        fn(hs, ws, ht, wt, mask, lab, 1.0, 1.0, 0.5, chunk=16)  # (inputs' labels: ids and -100)
        for bad in (-1, 200):
            wrong = lab.clone()
            wrong[3] = bad
            with pytest.raises(RuntimeError, match=r"labels must be token ids in \[0, 200\) or -100"):
                fn(hs, ws, ht, wt, mask, wrong, 1.0, 1.0, 0.5, chunk=16)
            fn(hs, ws, ht, wt, mask, wrong, 1.0, 1.0, 0.0, chunk=16)  # ce_weight 0: labels unread
