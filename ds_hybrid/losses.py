"""Losses of the three training stages, on the final hidden states (never [tokens x vocab] logits at once).

- align (RADLADS stage 1): per layer, mean over tokens of ||t - s||_2 / sqrt(d) (the reference code's form: an RMS
  error per token; the paper writes a squared L2 sum, which weights outlier tokens more and scales with d).
- kl (stage 2): T^2 * KL(p_t^T || p_s^T) per token over the full vocabulary, averaged over real tokens
  ("batchmean" over tokens, masked positions excluded), plus optionally ce_weight * next-token cross-entropy.
  At the paper's T = 1 the T^2 factor is 1; above 1 it keeps gradient scale comparable (Hinton et al.).
- finetune (stage 3): next-token cross-entropy.

:class:`ChunkedLinearLoss` is the torch path: logits are formed chunk by chunk of tokens from the hidden states and
the lm_head weights, in fp32, and the gradients w.r.t. the student's hidden states and lm_head are formed in the
forward pass (so nothing of size [tokens x vocab] survives a chunk). It must run inside the student lm_head module's
forward (see :class:`ds_hybrid.stages.common.LossHead`): under ZeRO-3 that is where the weight is gathered and where
its gradient enters DeepSpeed's partitioned reduction, once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def align_loss(student_out: torch.Tensor, teacher_out: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of the L2 distance over the hidden size, times d^-1/2 (fp32)."""
    d = teacher_out.shape[-1]
    diff = student_out.float() - teacher_out.float()
    return diff.norm(dim=-1).mean() / d**0.5


def align_losses(student_out: torch.Tensor, teacher_out: torch.Tensor) -> torch.Tensor:
    """:func:`align_loss` of every layer at once: [L, ..., d] stacked outputs -> [L] losses."""
    d = teacher_out.shape[-1]
    diff = student_out.float() - teacher_out.float()
    return diff.norm(dim=-1).flatten(1).mean(1) / d**0.5


@dataclass
class LossStats:
    kl_per_token: torch.Tensor | None  # [N] fp32, 0 where masked (detached)
    ce_per_token: torch.Tensor | None  # [N] fp32, 0 where no label
    n_kl: torch.Tensor  # 0-d, on the loss's device: tokens in the KL mean (a tensor, so reading it costs no sync)
    n_ce: torch.Tensor  # 0-d: tokens with a CE label


class ChunkedLinearLoss(torch.autograd.Function):
    """loss = kl_weight * mean_kl + ce_weight * mean_ce, from hidden states and lm_head weights, chunked.

    Inputs: h_s [N, D], w_s [V, D] (student, with grad); h_t [N, D], w_t [V, D] (teacher, no grad, or None);
    kl_mask [N] bool; labels [N] long (-100 = none). Returns the scalar loss; per-token values go to ``stats``.
    """

    @staticmethod
    def forward(ctx, h_s, w_s, h_t, w_t, kl_mask, labels, temperature: float, kl_weight: float, ce_weight: float,
                chunk: int, stats: dict):
        N = h_s.shape[0]
        need_grad = stats.get("need_grad", True)
        # dh and dW only where their inputs take a gradient (as the kernel: a frozen LM head, lr_rest 0, forms no dW)
        need_dh, need_dw = need_grad and h_s.requires_grad, need_grad and w_s.requires_grad
        ctx.need = (need_dh, need_dw)
        use_kl = kl_weight != 0 and h_t is not None
        use_ce = ce_weight != 0 and labels is not None
        n_kl = int(kl_mask.sum()) if use_kl else 0
        ce_valid = labels != -100 if use_ce else None
        n_ce = int(ce_valid.sum()) if use_ce else 0
        acc = torch.float64 if h_s.dtype == torch.float64 else torch.float32  # fp64 in, fp64 reference
        # fp32_logits=False with 16-bit weights: each logit rounded to the LM head's dtype, as the kernel's GEMM does
        half = not stats.get("fp32_logits", True)
        round_to = w_s.dtype if half and w_s.dtype.itemsize < 4 else None
        round_t = w_t.dtype if half and w_t is not None and w_t.dtype.itemsize < 4 else None
        ws = w_s.to(acc)
        wt = w_t.to(acc) if use_kl else None
        dh = torch.zeros(N if need_dh else 0, w_s.shape[1], dtype=acc, device=h_s.device)
        dw = torch.zeros_like(ws) if need_dw else ws.new_zeros(0)
        kl_tok = torch.zeros(N, dtype=acc, device=h_s.device) if use_kl else None
        ce_tok = torch.zeros(N, dtype=acc, device=h_s.device) if use_ce else None
        T = float(temperature)
        # [chunk x V] workspaces, allocated once per call and reused by every chunk; the chunk's arithmetic is done
        # in place in them, in the same order as out of place (the same values, bit for bit). One temporary per
        # elementwise step was ~14 fresh [chunk x V] tensors a chunk: page faults (CPU) cost more than the math.
        rows, V = min(N, chunk), ws.shape[0]
        kl_on, ce_on = use_kl and n_kl > 0, use_ce and n_ce > 0

        def buf(wanted: bool) -> torch.Tensor | None:
            return torch.empty(rows, V, dtype=acc, device=h_s.device) if wanted else None

        zbuf, abuf, bbuf, pbuf, gbuf = buf(True), buf(ce_on), buf(kl_on), buf(kl_on), buf(need_grad)
        for a in range(0, N, chunk):
            b = min(N, a + chunk)
            hs = h_s[a:b].to(acc)
            zs = torch.matmul(hs, ws.t(), out=zbuf[:b - a])  # [C, V] student logits
            if round_to is not None:  # fp32_logits=False: the logits as a 16-bit GEMM writes them
                zs.copy_(zs.to(round_to))
            g = gbuf[:b - a].zero_() if need_grad else None  # d loss / d zs
            if kl_on:
                m = kl_mask[a:b].to(acc)
                scratch = (abuf if ce_on else zbuf)[:b - a]  # without CE, zs is not needed after zs / T
                log_ps = torch.log_softmax(torch.div(zs, T, out=scratch), -1, out=bbuf[:b - a])
                zt = torch.matmul(h_t[a:b].to(acc), wt.t(), out=scratch)
                if round_t is not None:
                    zt.copy_(zt.to(round_t))
                zt = zt.div_(T)
                log_pt = torch.log_softmax(zt, -1, out=pbuf[:b - a])
                pt = torch.exp(log_pt, out=scratch)
                kl = log_pt.sub_(log_ps).mul_(pt).sum(-1) * (T * T) * m  # (pt * (log_pt - log_ps)).sum(-1) ...
                kl_tok[a:b] = kl
                # d/dzs of T^2 KL(pt || softmax(zs/T)) = T (ps - pt)
                if need_grad:
                    g += log_ps.exp_().sub_(pt).mul_(T * kl_weight / n_kl).mul_(m[:, None])
            if ce_on:
                lab = labels[a:b]
                valid = ce_valid[a:b]
                log_p = torch.log_softmax(zs, -1, out=abuf[:b - a])
                safe = lab.clamp(min=0)
                ce = -log_p.gather(-1, safe[:, None]).squeeze(-1) * valid.to(acc)
                ce_tok[a:b] = ce
                if need_grad:
                    gce = log_p.exp_()
                    gce[torch.arange(b - a, device=zs.device), safe] -= 1.0
                    g += gce.mul_(ce_weight / n_ce).mul_(valid.to(acc)[:, None])
            if need_dh:
                dh[a:b] = g @ ws
            if need_dw:
                dw += g.t() @ hs
        loss = torch.zeros((), dtype=acc, device=h_s.device)
        if use_kl and n_kl:
            loss = loss + kl_weight * kl_tok.sum() / n_kl
        if use_ce and n_ce:
            loss = loss + ce_weight * ce_tok.sum() / n_ce
        stats["kl_per_token"] = kl_tok
        stats["ce_per_token"] = ce_tok
        stats["n_kl"] = torch.tensor(float(n_kl), device=h_s.device)
        stats["n_ce"] = torch.tensor(float(n_ce), device=h_s.device)
        ctx.save_for_backward(dh.to(h_s.dtype), dw.to(w_s.dtype))
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        dh, dw = ctx.saved_tensors
        need_dh, need_dw = ctx.need

        def scaled(d: torch.Tensor) -> torch.Tensor:  # (in fp32: grad_out rounded to bf16 first, 1/3 -> 0.33398,
            return (d.to(torch.promote_types(d.dtype, torch.float32)) * grad_out).to(d.dtype)  # scaled all by 1.002)

        return (scaled(dh) if need_dh else None), (scaled(dw) if need_dw else None), *(None,) * 9


def check_kl_mask(kl_mask: torch.Tensor) -> None:
    """A token mask, not weights: the two paths count its tokens (the reference as an integer, the kernel as a
    float), which agree for a bool mask only."""
    if kl_mask.dtype != torch.bool:
        raise TypeError(f"kl_mask must be a bool tensor (which tokens the KL covers), not {kl_mask.dtype}")


def check_labels(labels: torch.Tensor | None, vocab: int, ce_weight: float) -> None:
    """Labels the CE reads must be token ids of the vocabulary or -100 (ignored): the fused kernel reads the logit
    at the label's column and would read another row's (or past the end) for any other value, where the reference
    path's cross entropy raises. Checked on the device without waiting for it (a failure surfaces at the next sync,
    as CUDA's own device asserts do)."""
    if labels is None or not ce_weight:
        return
    ok = ((labels == -100) | ((labels >= 0) & (labels < vocab))).all()
    torch._assert_async(ok, f"labels must be token ids in [0, {vocab}) or -100 (ignored)")


def chunked_linear_loss(
    h_s: torch.Tensor, w_s: torch.Tensor, h_t: torch.Tensor | None = None, w_t: torch.Tensor | None = None,
    kl_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None, temperature: float = 1.0,
    kl_weight: float = 1.0, ce_weight: float = 0.0, chunk: int = 1024, fp32_logits: bool = True,
) -> tuple[torch.Tensor, LossStats]:
    """Flattened [N, D] hidden states -> (scalar loss, per-token stats). See :class:`ChunkedLinearLoss`.
    ``fp32_logits=False``: with 16-bit inputs, each logit is first rounded to their dtype (the fused kernel's
    16-bit logits, computed the same way); the loss and gradients are then computed in fp32 as usual."""
    if kl_mask is None:
        kl_mask = torch.ones(h_s.shape[0], dtype=torch.bool, device=h_s.device)
    check_kl_mask(kl_mask)
    check_labels(labels, w_s.shape[0], ce_weight)
    stats: dict = {"need_grad": torch.is_grad_enabled() and (h_s.requires_grad or w_s.requires_grad),
                   "fp32_logits": fp32_logits}
    loss = ChunkedLinearLoss.apply(h_s, w_s, h_t, w_t, kl_mask, labels, temperature, kl_weight, ce_weight, chunk,
                                   stats)
    return loss, LossStats(stats["kl_per_token"], stats["ce_per_token"], stats["n_kl"], stats["n_ce"])


def reference_kl_ce(h_s, w_s, h_t, w_t, kl_mask, labels, temperature=1.0, kl_weight=1.0, ce_weight=0.0):
    """Materialized reference (any dtype, e.g. fp64), autograd-differentiable. For tests."""
    zs = h_s @ w_s.t()
    loss = zs.new_zeros(())
    kl_tok = None
    if kl_weight and h_t is not None:
        zt = h_t @ w_t.t()
        log_ps = F.log_softmax(zs / temperature, -1)
        log_pt = F.log_softmax(zt / temperature, -1)
        kl_tok = (log_pt.exp() * (log_pt - log_ps)).sum(-1) * temperature**2 * kl_mask
        loss = loss + kl_weight * kl_tok.sum() / kl_mask.sum()
    if ce_weight and labels is not None and bool((labels != -100).any()):  # (no label: no CE term, as the real paths)
        valid = labels != -100
        ce = F.cross_entropy(zs[valid], labels[valid], reduction="mean")
        loss = loss + ce_weight * ce
    return loss, kl_tok


def next_token_labels(input_ids: torch.Tensor, ignore_mask: torch.Tensor | None = None) -> torch.Tensor:
    """[B, T] -> [B, T] labels: position t predicts token t+1; the last position (and masked targets) get -100."""
    labels = torch.full_like(input_ids, -100)
    labels[:, :-1] = input_ids[:, 1:]
    if ignore_mask is not None:
        labels[:, :-1][~ignore_mask[:, 1:].bool()] = -100
    return labels
