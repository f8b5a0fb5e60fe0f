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
