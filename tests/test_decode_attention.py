"""The static cache's decode attention (ds_hybrid.modeling.decode_attention) against transformers' sdpa function in
fp64, and the decode steps of GraphDecoder going through it (same greedy tokens as generate, configs restored)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from conftest import VOCAB, tiny_config
from transformers import AutoModelForCausalLM
from transformers.integrations.sdpa_attention import sdpa_attention_forward

import ds_hybrid.modeling.decode_attention as DA
from ds_hybrid.graph_decode import GraphDecoder
from ds_hybrid.transfer import build_hybrid


def case(B: int, H: int, Hkv: int, S: int, D: int, dtype=torch.float64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, 1, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, Hkv, S, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, Hkv, S, D, generator=g, dtype=torch.float64)
    # a static cache's mask: row b has pads[b] left pads, positions >= written[b] are not written yet
    pads, written = [0, 3, 1][:B], [S - 4, S - 1, S][:B]
    keep = torch.zeros(B, 1, 1, S, dtype=torch.bool)
    for b in range(B):
        keep[b, 0, 0, pads[b]:written[b]] = True
    return q.to(dtype), k.to(dtype), v.to(dtype), keep


def reference(q, k, v, mask, scaling):
    module = SimpleNamespace(num_key_value_groups=q.shape[1] // k.shape[1], training=False, is_causal=True)
    return sdpa_attention_forward(module, q, k, v, mask, dropout=0.0, scaling=scaling)[0]


@pytest.mark.parametrize("H,Hkv", [(6, 2), (4, 4), (8, 1)])
@pytest.mark.parametrize("mask_kind", ["bool", "additive"])
def test_grouped_decode_attention_equals_sdpa_in_fp64(H, Hkv, mask_kind):
    q, k, v, keep = case(3, H, Hkv, 19, 8)
    mask = keep if mask_kind == "bool" else torch.zeros(keep.shape, dtype=torch.float64).masked_fill(~keep, -1e30)
    out = DA.grouped_decode_attention(q, k, v, mask, scaling=0.35)
    ref = reference(q, k, v, keep, 0.35)
    assert out.shape == ref.shape == (3, 1, H, 8)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    # and through transformers' function signature, with a per-head mask broadcast to every head
    per_head = keep.expand(3, H, 1, 19)
    module = SimpleNamespace(num_key_value_groups=H // Hkv, training=False, is_causal=True)
    out2, _ = DA.attention_forward(module, q, k, v, per_head, scaling=0.35)
    torch.testing.assert_close(out2, ref, rtol=1e-12, atol=1e-12)


def test_probs_times_values_split_over_key_blocks_only_where_it_pays():
    assert DA.key_splits(3, 32768) == 32  # few (row, KV head) problems over a long cache: blocks of 1024 keys
    assert DA.key_splits(3, 16640) == 65  # 65 x 256: the largest block that divides
    assert DA.key_splits(3, 16641) == 1  # no block divides
    assert DA.key_splits(3, 8192) == 1  # short cache
    assert DA.key_splits(32, 32768) == 1  # enough problems for one matmul


def test_split_over_key_blocks_equals_sdpa_in_fp64():
    S = DA.SPLIT_FROM_KEYS + 512
    assert DA.key_splits(2, S) > 1
    q, k, v, keep = case(2, 6, 1, S, 4)
    out = DA.grouped_decode_attention(q, k, v, keep, scaling=0.5)
    torch.testing.assert_close(out, reference(q, k, v, keep, 0.5), rtol=1e-12, atol=1e-12)


def test_half_precision_inputs_stay_within_bf16_rounding_of_fp64():
    q, k, v, keep = case(2, 6, 2, 40, 16, dtype=torch.bfloat16, seed=1)
    out = DA.grouped_decode_attention(q, k, v, keep, scaling=0.25)
    assert out.dtype == torch.bfloat16
    ref = reference(q.double(), k.double(), v.double(), keep, 0.25)
    torch.testing.assert_close(out.double(), ref, rtol=0.0, atol=2e-2)


def test_other_calls_go_to_sdpa_unchanged(monkeypatch):
    """Prefill (several query tokens), no mask, dropout, training: transformers' sdpa function, untouched."""
    calls = []
    monkeypatch.setattr(DA, "grouped_decode_attention", lambda *a, **k: calls.append(1))
    q, k, v, keep = case(2, 4, 2, 9, 8)
    module = SimpleNamespace(num_key_value_groups=2, training=False, is_causal=True)
    q3 = torch.randn(2, 4, 3, 8, dtype=torch.float64)
    mask3 = keep.expand(2, 1, 3, 9)
    for args in [(q3, k, v, mask3), (q, k, v, None)]:
        out, _ = DA.attention_forward(module, *args, scaling=0.3)
        torch.testing.assert_close(out, reference(*args, 0.3))
    DA.attention_forward(SimpleNamespace(num_key_value_groups=2, training=True, is_causal=True), q, k, v, keep,
                         scaling=0.3)
    assert calls == []


@pytest.fixture(scope="module")
def sdpa_teacher():
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_config("llama"), attn_implementation="sdpa").eval()


@pytest.mark.parametrize("kind", ["teacher", "gdn"])
def test_static_decode_steps_attend_through_it_and_match_generate(sdpa_teacher, kind, monkeypatch):
    model = sdpa_teacher if kind == "teacher" else build_hybrid(sdpa_teacher, [1, 3], "gdn").eval()
    model.generation_config.eos_token_id = None
    softmax_layers = 4 if kind == "teacher" else 2
    calls = []
    real = DA.grouped_decode_attention

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(DA, "grouped_decode_attention", spy)
    prompt = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(7))
    mask = torch.ones_like(prompt)
    mask[1, :4] = 0  # a left-padded row: the decode mask has pads and the unwritten tail
    with torch.no_grad():
        ref = model.generate(prompt, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert calls == []  # dynamic-cache generate is untouched
    decoder = GraphDecoder(model, max_len=20)
    out = decoder.generate(prompt, mask, max_new_tokens=6)
    assert torch.equal(out, ref)
    # the cache is allocated at a multiple of CACHE_MULTIPLE positions (aligned score rows), the mask to match
    assert decoder.cache_len == 256 and decoder._slots[2].mask.shape == (2, 256)
    assert len(calls) == 5 * softmax_layers  # every decode step after the prefill, every softmax layer
    assert {cfg._attn_implementation for cfg in DA.sdpa_configs(model)} == {"sdpa"}  # restored after each step


def test_configs_come_back_after_an_error(sdpa_teacher):
    configs = DA.sdpa_configs(sdpa_teacher)
    assert configs
    with pytest.raises(RuntimeError):
        with DA.decode_attention(sdpa_teacher):
            assert {cfg._attn_implementation for cfg in configs} == {DA.NAME}
            raise RuntimeError("boom")
    assert {cfg._attn_implementation for cfg in configs} == {"sdpa"}
