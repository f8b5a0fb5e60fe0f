"""The bytes of a decode step (ds_hybrid.evaluation.decode_floor) against what the static cache really allocates and
what the models really hold: KV buffers, recurrent states and short-conv windows, weights with tied or untied
embeddings, sliding windows."""

from __future__ import annotations

import pytest
import torch
from conftest import VOCAB, tiny_teacher

from ds_hybrid.evaluation.decode_floor import STATE_BYTES, decode_step_bytes, floor_ratio
from ds_hybrid.graph_decode import GraphDecoder
from ds_hybrid.modeling.static_cache import StaticRecurrentLayer
from ds_hybrid.transfer import build_hybrid


def _cache_parts(model, batch: int, max_len: int) -> tuple[int, int]:
    """(KV bytes, recurrent-state + conv-window bytes) the static cache allocates for ``batch`` prompts."""
    decoder = GraphDecoder(model, max_len=max_len)
    prompt = torch.randint(0, VOCAB, (batch, 5), generator=torch.Generator().manual_seed(0))
    decoder.prefill(prompt, None, 1)
    kv = state = 0
    for layer in decoder.cache(batch).layers:
        if isinstance(layer, StaticRecurrentLayer):
            state += layer.recurrent_states[0].nbytes + sum(c.nbytes for c in layer.conv_cache or ())
        else:
            kv += layer.keys.nbytes + layer.values.nbytes
    return kv, state


@pytest.mark.parametrize("kind", ["teacher", "gdn", "gla_conv", "gla_conv_grouped"])
def test_step_bytes_match_the_static_cache_and_the_parameters(kind):
    teacher = tiny_teacher("llama")  # untied embeddings, 2 KV heads of 4 query heads
    mixer, *opts = kind.split("_")
    model = teacher if kind == "teacher" else build_hybrid(
        teacher, [1], mixer, {"use_short_conv": "conv" in opts, "grouped_kv": "grouped" in opts}).eval()
    batch = 3
    max_len = GraphDecoder(model, max_len=20).cache_len  # the cache's keys span its whole length
    kv, state = _cache_parts(model, batch, max_len)
    got = decode_step_bytes(model, batch, max_len, dtype_bytes=4)  # fp32 on CPU
    assert got.kv_cache == kv
    assert got.recurrent_state == 2 * state  # read and written every step
    assert (state > 0) == (kind != "teacher") and kv > 0
    emb = model.get_input_embeddings().weight
    params = sum(p.numel() for p in model.parameters())
    assert got.weights == (params - emb.numel() + batch * emb.shape[1]) * 4  # untied: the looked-up rows only
    assert got.total == got.weights + got.kv_cache + got.recurrent_state
    assert got.floor_ms(1.0) == pytest.approx(got.total / 1e6)


def test_tied_embeddings_are_read_whole_and_windows_cap_the_keys():
    tied = tiny_teacher("llama", tie_word_embeddings=True)
    params = sum(p.numel() for p in tied.parameters())  # the tied table counted once
    assert decode_step_bytes(tied, 2, 16).weights == params * 2
    gemma = tiny_teacher("gemma3")  # sliding-window layers with a window of the tiny config
    window, types = gemma.config.sliding_window, gemma.config.layer_types
    assert "sliding_attention" in types and window
    short, long = decode_step_bytes(gemma, 1, window), decode_step_bytes(gemma, 1, 4 * window)
    n_full = types.count("full_attention")
    per_token = 2 * gemma.config.num_key_value_heads * gemma.config.head_dim * 2
    assert long.kv_cache - short.kv_cache == n_full * 3 * window * per_token  # only the global layers grow
    # a static cache that holds the sliding layers at full length (no rings): every layer reads every key
    full = decode_step_bytes(gemma, 1, 4 * window, windowed=False)
    assert full.kv_cache == len(types) * 4 * window * per_token


def test_a_window_without_layer_types_slides_in_every_layer_as_its_cache_does():
    """Mistral's config gives a sliding_window and no layer_types: every layer's cache keeps the window, and so do
    the step's bytes (they were counted at the whole context: 8x a 4096 window at 32k)."""
    mistral = tiny_teacher("mistral")
    window = mistral.config.sliding_window
    assert getattr(mistral.config, "layer_types", None) is None
    ids = torch.randint(0, VOCAB, (1, 8 * window), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cache = mistral(ids, use_cache=True).past_key_values
    kept = {layer.keys.shape[-2] for layer in cache.layers}
    assert max(kept) <= window  # (what transformers' cache holds: the window, not the context)
    per_token = 2 * mistral.config.num_key_value_heads * (mistral.config.hidden_size // 4) * 2
    got = decode_step_bytes(mistral, 1, 8 * window)
    assert got.kv_cache == decode_step_bytes(mistral, 1, window).kv_cache == 4 * window * per_token


def test_floor_ratio_grows_with_context_and_the_state_is_fp32():
    teacher = tiny_teacher("llama")
    hybrid = build_hybrid(teacher, [1], "gdn", {}).eval()
    mixer = hybrid.model.layers[0].self_attn
    assert decode_step_bytes(hybrid, 1, 8).recurrent_state == 2 * 3 * mixer.num_heads * mixer.head_dim**2 * STATE_BYTES
    ratios = [floor_ratio(teacher, hybrid, 4, t) for t in (16, 256, 4096, 65536)]
    assert ratios == sorted(ratios)  # KV reads grow with the context, weights and states do not
    assert ratios[0] < 1  # short contexts: the hybrid moves more (larger mixers than attention, and their states)
    assert 3.5 < ratios[-1] < 4  # long ones: towards the KV ratio, 4 layers of keys against 1
    with pytest.raises(ValueError, match="batch and context"):
        decode_step_bytes(teacher, 0, 8)


def test_bench_script_sets_floors_beside_measured_ratios(tmp_path):
    """bench/decode_floor.py on a tiny teacher's config: the floors are decode_floor's, the grouped-k/v variant saves
    the k/v rows above the teacher's KV heads, and a bench-infer JSON's hybrid (matched by its softmax layers, not the
    all-linear model beside it) and teacher rows give the measured ratio."""
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    try:
        import decode_floor as script
    finally:
        sys.path.pop(0)
    teacher = tiny_teacher("llama")
    teacher.config.save_pretrained(tmp_path / "t")
    hybrid = build_hybrid(teacher, [1], "gdn", {}).eval()
    layers = {"softmax_layers": [1], "mixer": "gdn"}
    bench = {"models": {"h": layers, "lin": {"softmax_layers": [], "mixer": "gdn"}, "teacher": {}},
             "rows": [{"model": m, "mode": "cuda_graphs", "context": 64, "batch": 2, "decode_tokens_per_s": v}
                      for m, v in (("h", 300.0), ("lin", 900.0), ("teacher", 200.0))]}
    (tmp_path / "b.json").write_text(json.dumps(bench))
    assert script.main(["--config", str(tmp_path / "t"), "--softmax-layers", "1", "--contexts", "64",
                        "--batches", "2", "--measured", str(tmp_path / "b.json"), "--out", str(tmp_path / "o.json")]) == 0
    row = json.loads((tmp_path / "o.json").read_text())["rows"][0]
    assert row["floor_ratio"] == pytest.approx(floor_ratio(teacher, hybrid, 2, 64))
    cfg = teacher.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    saved = 3 * 2 * (cfg.num_attention_heads - cfg.num_key_value_heads) * head_dim * cfg.hidden_size * 2
    assert row["hybrid"]["weights"] - row["hybrid_grouped_kv"]["weights"] == saved  # 3 linear layers, k and v, bf16
    assert row["floor_ratio_grouped_kv_no_gate"] > row["floor_ratio_no_gate"] > row["floor_ratio"]
    assert row["measured"]["cuda_graphs"]["ratio"] == pytest.approx(1.5)
