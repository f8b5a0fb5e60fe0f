"""The CPU mixer path against fla's other reference formulation, on fresh random inputs (fp32)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from fla.ops.gated_delta_rule.naive import naive_recurrent_gated_delta_rule
from fla.ops.gla.naive import naive_recurrent_gla

from ds_hybrid.modeling import ops


def gdn_inputs(B, T, H, K, V, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, K, generator=g)
    k = torch.randn(B, T, H, K, generator=g)
    v = torch.randn(B, T, H, V, generator=g)
    beta = torch.rand(B, T, H, generator=g).clamp(0.05, 0.95)
    gate = -F.softplus(torch.randn(B, T, H, generator=g)) * 0.5
    h0 = torch.randn(B, H, K, V, generator=g) * 0.1
    return q, k, v, gate, beta, h0


@pytest.mark.parametrize("T", [5, 64, 100])  # recurrent path, one chunk, ragged chunks
def test_gdn_torch_path_matches_fla_recurrent(T):
    q, k, v, gate, beta, h0 = gdn_inputs(2, T, 3, 16, 8, seed=T)
    scale = 16**-0.5
    o, s = ops.gated_delta_rule(q, k, v, gate, beta, scale, h0, True, backend="torch")
    ro, rs = naive_recurrent_gated_delta_rule(ops.l2norm(q), ops.l2norm(k), v, beta, gate, scale, h0, True)
    assert (o - ro).abs().max() < 2e-5
    assert (s - rs).abs().max() < 2e-5


def gdn_fp64_recurrence(q, k, v, g, beta, scale, h0):
    """S_t = a_t S_{t-1} + beta_t k_t (v_t - a_t S_{t-1}^T k_t)^T, o_t = S_t^T q_t scale, one token at a time."""
    q, k, v, g, beta, S = (x.double() for x in (q, k, v, g, beta, h0))
    out = []
    for t in range(q.shape[1]):
        S = S * g[:, t].exp()[..., None, None]
        u = beta[:, t, :, None] * (v[:, t] - torch.einsum("bhkv,bhk->bhv", S, k[:, t]))
        S = S + k[:, t, ..., None] * u[..., None, :]
        out.append(torch.einsum("bhkv,bhk->bhv", S, q[:, t] * scale))
    return torch.stack(out, 1), S


@pytest.mark.parametrize("T,C", [(1, 64), (5, 64), (64, 64), (100, 64), (130, 16)])
@pytest.mark.parametrize("strong", [False, True])  # strong: decays down to exp(-20) a token, beta up to 1
def test_gdn_chunked_torch_path_matches_an_fp64_recurrence(T, C, strong):
    q, k, v, gate, beta, h0 = gdn_inputs(2, T, 3, 16, 8, seed=T + C)
    if strong:
        gate, beta = gate * 40, beta.clamp(max=1.0) ** 0.1
    q, k = ops.l2norm(q), ops.l2norm(k)
    o, s = ops.chunk_gated_delta_rule_torch(q, k, v, gate, beta, 0.25, h0, True, chunk_size=C)
    ro, rs = gdn_fp64_recurrence(q, k, v, gate, beta, 0.25, h0)
    assert (o.double() - ro).abs().max() < 1e-5
    assert (s.double() - rs).abs().max() < 1e-5


def test_gdn_chunked_torch_path_gradients_match_the_fp64_recurrence():
    q, k, v, gate, beta, h0 = gdn_inputs(1, 37, 2, 8, 8, seed=3)
    q, k = ops.l2norm(q), ops.l2norm(k)
    leaves = [x.clone().requires_grad_() for x in (q, k, v, gate, beta, h0)]
    o, s = ops.chunk_gated_delta_rule_torch(*leaves[:5], 0.3, leaves[5], True, chunk_size=16)
    (o.square().sum() + s.sum()).backward()
    ref = [x.double().detach().requires_grad_() for x in (q, k, v, gate, beta, h0)]
    ro, rs = gdn_fp64_recurrence(*ref[:5], 0.3, ref[5])
    (ro.square().sum() + rs.sum()).backward()
    for a, b in zip(leaves, ref):
        assert (a.grad.double() - b.grad).abs().max() < 1e-4


@pytest.mark.parametrize("T", [7, 48, 53])
def test_gla_torch_chunk_matches_fla_recurrent(T):
    g = torch.Generator().manual_seed(T)
    B, H, K, V = 2, 3, 16, 8
    q, k = torch.randn(B, T, H, K, generator=g), torch.randn(B, T, H, K, generator=g)
    v = torch.randn(B, T, H, V, generator=g)
    gk = F.logsigmoid(torch.randn(B, T, H, K, generator=g) * 3) / 4
    h0 = torch.randn(B, H, K, V, generator=g) * 0.1
    o, s = ops.chunk_gla_torch(q, k, v, gk, K**-0.5, h0, True)
    ro, rs = naive_recurrent_gla(q, k, v, gk, h0, True)  # fla's reference uses scale K^-0.5 too
    assert (o - ro).abs().max() < 2e-5
    assert (s - rs).abs().max() < 2e-5


def test_split_sequence_through_state_equals_whole():
    """Prefill in two pieces through the returned state gives the same outputs as one call (cache semantics)."""
    q, k, v, gate, beta, _ = gdn_inputs(1, 90, 2, 16, 16, seed=0)
    whole, _ = ops.gated_delta_rule(q, k, v, gate, beta, 0.25, None, False, backend="torch")
    a, s = ops.gated_delta_rule(q[:, :70], k[:, :70], v[:, :70], gate[:, :70], beta[:, :70], 0.25, None, True, "torch")
    b, _ = ops.gated_delta_rule(q[:, 70:], k[:, 70:], v[:, 70:], gate[:, 70:], beta[:, 70:], 0.25, s, False, "torch")
    assert (torch.cat([a, b], 1) - whole).abs().max() < 2e-5


def test_fla_backend_refuses_cpu_tensors():
    q, k, v, gate, beta, _ = gdn_inputs(1, 4, 1, 8, 8, seed=0)
    with pytest.raises(ValueError, match="CUDA"):
        ops.gated_delta_rule(q, k, v, gate, beta, 1.0, backend="fla")
