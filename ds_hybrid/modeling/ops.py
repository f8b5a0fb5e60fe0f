"""Linear-attention token mixing ops: fla's Triton kernels on CUDA, pure-torch references elsewhere.

Both paths take the same inputs and return the same quantities, so a mixer's parameters and math do not depend on
the device:

    gated_delta_rule(q, k, v, g, beta, ...)   # Gated DeltaNet: S_t = a_t S_{t-1} + beta_t k_t (v_t - S_{t-1}^T k_t)^T
    gated_linear_attention(q, k, v, gk, ...)  # GLA:             S_t = diag(exp(gk_t)) S_{t-1} + k_t v_t^T

Layouts follow fla: q, k, v are [B, T, H, D]; GDN gates g and beta are [B, T, H]; GLA's gk is [B, T, H, K]; the
recurrent state is [B, H, K, V] (fla's default "K first" layout) on both paths, so a cache filled on one path can be
continued on the other.

The backend is chosen per call: "fla" (CUDA tensors only), "torch", or "auto" (fla on CUDA, torch otherwise).
"""

from __future__ import annotations

from typing import Literal

import torch

Backend = Literal["auto", "fla", "torch"]
BACKENDS: tuple[str, ...] = ("auto", "fla", "torch")

# fla's l2norm kernel computes x * rsqrt(sum(x^2) + eps) with this eps; the torch path does the same.
L2NORM_EPS = 1e-6
# Below this many new tokens the recurrent form is cheaper than the chunked one (decode steps).
RECURRENT_MAX_TOKENS = 16


def resolve_backend(backend: str, x: torch.Tensor) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"mixer backend {backend!r} is not one of {BACKENDS}")
    if backend == "auto":
        return "fla" if x.is_cuda else "torch"
    if backend == "fla" and not x.is_cuda:
        raise ValueError("mixer backend 'fla' runs Triton kernels and needs CUDA tensors; use 'torch' or 'auto' on CPU")
    return backend


def l2norm(x: torch.Tensor, eps: float = L2NORM_EPS) -> torch.Tensor:
    """Row-wise L2 normalisation exactly as fla's kernel: x * rsqrt(sum(x^2) + eps), computed in fp32."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.square().sum(-1, keepdim=True) + eps)).to(x.dtype)


@torch.compiler.disable  # compiled blocks (``compile: true``) break here: fla's kernels are already fused
def gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gated delta rule with q/k L2-normalised inside. g: log decay (<= 0), beta in (0, 1). Returns (o, state)."""
    T = q.shape[1]
    if resolve_backend(backend, q) == "fla":
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule, fused_recurrent_gated_delta_rule

        if T <= RECURRENT_MAX_TOKENS and not torch.is_grad_enabled():
            fn = fused_recurrent_gated_delta_rule
        else:
            fn = chunk_gated_delta_rule
        o, state = fn(
            q=q, k=k, v=v, g=g, beta=beta, scale=scale, initial_state=initial_state,
            output_final_state=output_final_state, use_qk_l2norm_in_kernel=True,
        )
        return o, state

    from fla.ops.gated_delta_rule.naive import naive_chunk_gated_delta_rule, naive_recurrent_gated_delta_rule

    q, k = l2norm(q), l2norm(k)
    if T <= RECURRENT_MAX_TOKENS:
        o, state = naive_recurrent_gated_delta_rule(
            q, k, v, beta, g, scale=scale, initial_state=initial_state, output_final_state=output_final_state
        )
    else:
        o, state = naive_chunk_gated_delta_rule(
            q, k, v, g, beta, chunk_size=64, scale=scale, initial_state=initial_state,
            output_final_state=output_final_state,
        )
    return o.to(v.dtype), state


def chunk_gla_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gk: torch.Tensor,
    scale: float,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int = 16,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunked GLA in plain torch (fp32), the CPU path. Same math as fla's naive_recurrent_gla, O(T/C) steps.

    Within a chunk, the decay between positions i >= j is exp(b_i - b_j) with b the cumulative log gate; it is
    formed pairwise ([C, C, K] per head) rather than as exp(b_i) * exp(-b_j), which would overflow for strong gates.
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    C = chunk_size
    pad = (-T) % C
    qf, kf, vf, gf = (x.float().transpose(1, 2) for x in (q, k, v, gk))  # [B, H, T, D]
    if pad:
        qf, kf, vf, gf = (torch.nn.functional.pad(x, (0, 0, 0, pad)) for x in (qf, kf, vf, gf))
    n = (T + pad) // C
    qf, kf, vf, gf = (x.reshape(B, H, n, C, x.shape[-1]) for x in (qf, kf, vf, gf))
    qf = qf * scale
    b = gf.cumsum(-2)  # [B, H, n, C, K] cumulative log decay inside each chunk
    causal = torch.tril(torch.ones(C, C, dtype=torch.bool, device=q.device))
    # decay[i, j, :] = exp(b_i - b_j) for i >= j, 0 above the diagonal
    diff = (b.unsqueeze(-2) - b.unsqueeze(-3)).masked_fill(~causal[..., None], float("-inf"))
    intra = torch.einsum("bhnik,bhnjk,bhnijk->bhnij", qf, kf, diff.exp())
    S = q.new_zeros(B, H, K, V, dtype=torch.float32) if initial_state is None else initial_state.float()
    outs = []
    for c in range(n):
        qc, kc, vc, bc = qf[:, :, c], kf[:, :, c], vf[:, :, c], b[:, :, c]
        o_inter = (qc * bc.exp()) @ S
        outs.append(o_inter + intra[:, :, c] @ vc)
        last = bc[:, :, -1:, :]  # [B, H, 1, K]
        S = S * last.squeeze(-2).exp().unsqueeze(-1) + (kc * (last - bc).exp()).transpose(-1, -2) @ vc
    o = torch.stack(outs, dim=2).reshape(B, H, n * C, V)[:, :, :T].transpose(1, 2)
    return o, (S if output_final_state else None)


@torch.compiler.disable
def gated_linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gk: torch.Tensor,
    scale: float,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """GLA with a per-key-channel log gate gk (<= 0). Returns (o, state)."""
    T = q.shape[1]
    if resolve_backend(backend, q) == "fla":
        from fla.ops.gla import chunk_gla, fused_recurrent_gla

        if T <= RECURRENT_MAX_TOKENS and not torch.is_grad_enabled():
            return fused_recurrent_gla(q=q, k=k, v=v, gk=gk, scale=scale, initial_state=initial_state,
                                       output_final_state=output_final_state)
        return chunk_gla(q=q, k=k, v=v, g=gk, scale=scale, initial_state=initial_state,
                         output_final_state=output_final_state)
    o, state = chunk_gla_torch(q, k, v, gk, scale, initial_state, output_final_state)
    return o.to(v.dtype), state
