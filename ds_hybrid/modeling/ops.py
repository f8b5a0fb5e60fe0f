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


def _traced_decode(q: torch.Tensor) -> bool:
    """A compiled no-grad call over a few tokens (a compiled decode step, ``GraphDecoder(compile=True)``): the ops
    then go through the opaque custom ops below, so torch.compile traces the whole step as one graph. Elsewhere
    compiled code breaks its graph at these ops (compiled training blocks: fla's kernels are already fused), and
    eager calls go straight to the implementations."""
    return torch.compiler.is_compiling() and not torch.is_grad_enabled() and q.shape[1] <= RECURRENT_MAX_TOKENS


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
    if _traced_decode(q):
        o, state = torch.ops.ds_hybrid.gated_delta_rule_step(q, k, v, g, beta, scale, initial_state, backend)
        return o, (state if output_final_state else None)
    return _gated_delta_rule(q, k, v, g, beta, scale, initial_state, output_final_state, backend)


@torch.compiler.disable  # compiled blocks (``compile: true``) break here: fla's kernels are already fused
def _gated_delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                      scale: float, initial_state: torch.Tensor | None, output_final_state: bool,
                      backend: str) -> tuple[torch.Tensor, torch.Tensor | None]:
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

    o, state = chunk_gated_delta_rule_torch(l2norm(q), l2norm(k), v, g, beta, scale, initial_state,
                                            output_final_state)
    return o.to(v.dtype), state


def chunk_gated_delta_rule_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunked gated delta rule in plain torch (fp32), the CPU path; q and k already normalised. O(T/C) steps.

    Per chunk with state S (before it), cumulative log decay b_t and written values u_t = beta_t (v_t - (a_t S_{t-1})^T
    k_t): (I + L) U = beta V - (beta exp(b) K) S with L[t, j] = beta_t exp(b_t - b_j) k_t.k_j (j < t), solved by
    forward substitution; then O = (exp(b) Q) S + (Q K^T * exp(b_t - b_j), j <= t) U and
    S' = exp(b_C) S + (exp(b_C - b) K)^T U. Every exponent is <= 0 (gates are log decays), so nothing overflows.
    Padding at the end has beta = g = 0: it writes nothing and does not decay the state.
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    C = min(chunk_size, T)
    pad = (-T) % C
    qf, kf, vf = (x.float().transpose(1, 2) for x in (q, k, v))  # [B, H, T, D]
    gf, bf = (x.float().transpose(1, 2) for x in (g, beta))  # [B, H, T]
    if pad:
        qf, kf, vf = (torch.nn.functional.pad(x, (0, 0, 0, pad)) for x in (qf, kf, vf))
        gf, bf = (torch.nn.functional.pad(x, (0, pad)) for x in (gf, bf))
    n = (T + pad) // C
    qf, kf, vf = (x.reshape(B, H, n, C, x.shape[-1]) for x in (qf, kf, vf))
    gf, bf = gf.reshape(B, H, n, C), bf.reshape(B, H, n, C)
    qf = qf * scale
    b = gf.cumsum(-1)  # [B, H, n, C]
    idx = torch.arange(C, device=q.device)
    lower = idx[:, None] >= idx[None, :]
    decay = (b[..., :, None] - b[..., None, :]).masked_fill(~lower, float("-inf")).exp()  # exp(b_t - b_j), j <= t
    kk = kf @ kf.transpose(-1, -2)
    eye = torch.eye(C, device=q.device)
    system = eye + (bf[..., :, None] * kk * decay).masked_fill(lower.logical_not() | (idx[:, None] == idx[None, :]), 0)
    rhs = torch.cat([vf * bf[..., None], kf * (bf * b.exp())[..., None]], dim=-1)
    solved = torch.linalg.solve_triangular(system, rhs, upper=False, unitriangular=True)
    u_part, w = solved[..., :V], solved[..., V:]  # U = u_part - w S
    qk = (qf @ kf.transpose(-1, -2)) * decay
    q_decayed = qf * b.exp()[..., None]
    k_to_end = kf * (b[..., -1:] - b).exp()[..., None]
    S = q.new_zeros(B, H, K, V, dtype=torch.float32) if initial_state is None else initial_state.float()
    outs = []
    for c in range(n):
        U = u_part[:, :, c] - w[:, :, c] @ S
        outs.append(q_decayed[:, :, c] @ S + qk[:, :, c] @ U)
        S = S * b[:, :, c, -1, None, None].exp() + k_to_end[:, :, c].transpose(-1, -2) @ U
    o = torch.stack(outs, dim=2).reshape(B, H, n * C, V)[:, :, :T].transpose(1, 2)
    return o, (S if output_final_state else None)


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
    if _traced_decode(q):
        o, state = torch.ops.ds_hybrid.gated_linear_attention_step(q, k, v, gk, scale, initial_state, backend)
        return o, (state if output_final_state else None)
    return _gated_linear_attention(q, k, v, gk, scale, initial_state, output_final_state, backend)


@torch.compiler.disable
def _gated_linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gk: torch.Tensor, scale: float,
                            initial_state: torch.Tensor | None, output_final_state: bool,
                            backend: str) -> tuple[torch.Tensor, torch.Tensor | None]:
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


# ---- the decode-step ops as custom ops: opaque to torch.compile, so a compiled decode step has no graph break ----
# (fresh outputs, no input mutated; the state is fp32 [B, H, K, V] on both paths, o has v's dtype and shape)


@torch.library.custom_op("ds_hybrid::gated_delta_rule_step", mutates_args=())
def gated_delta_rule_step(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor, scale: float,
    initial_state: torch.Tensor | None, backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    o, state = _gated_delta_rule(q, k, v, g, beta, scale, initial_state, True, backend)
    return o.to(v.dtype).contiguous(), state.float().contiguous()


@gated_delta_rule_step.register_fake
def _(q, k, v, g, beta, scale, initial_state, backend):
    return v.new_empty(v.shape), v.new_empty((q.shape[0], q.shape[2], q.shape[3], v.shape[3]), dtype=torch.float32)


@torch.library.custom_op("ds_hybrid::gated_linear_attention_step", mutates_args=())
def gated_linear_attention_step(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gk: torch.Tensor, scale: float,
    initial_state: torch.Tensor | None, backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    o, state = _gated_linear_attention(q, k, v, gk, scale, initial_state, True, backend)
    return o.to(v.dtype).contiguous(), state.float().contiguous()


@gated_linear_attention_step.register_fake
def _(q, k, v, gk, scale, initial_state, backend):
    return v.new_empty(v.shape), v.new_empty((q.shape[0], q.shape[2], q.shape[3], v.shape[3]), dtype=torch.float32)
