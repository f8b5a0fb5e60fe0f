"""``mixer_options.grouped_kv``: linear mixers whose k/v projections keep the teacher's KV-head count, repeated over
each group of query heads at run time. At stage 0 the function is the default mixer's (which repeats the weights
instead), the parameters and a decode step's weight bytes are fewer, and caches, static decoding, fused projections
and the HF round trip work as for the default."""

from __future__ import annotations

import pytest
import torch
from conftest import VOCAB, tiny_teacher

from ds_hybrid.errors import ConfigError
from ds_hybrid.evaluation.decode_floor import decode_step_bytes
from ds_hybrid.graph_decode import GraphDecoder
from ds_hybrid.modeling import HybridForCausalLM
from ds_hybrid.modeling.mixers import MixerOptions, build_mixer
from ds_hybrid.transfer import build_hybrid


def _ids(batch: int, T: int, seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("mixer", ["gdn", "gla"])
def test_grouped_kv_is_the_default_mixer_at_stage_0_with_fewer_parameters(mixer):
    teacher = tiny_teacher("llama")  # 4 query heads, 2 KV heads
    plain = build_hybrid(teacher, [1], mixer, {}).eval()
    grouped = build_hybrid(teacher, [1], mixer, {"grouped_kv": True}).eval()
    ours = dict(grouped.named_parameters())
    with torch.no_grad():  # the same fresh gates and decays (k and v: each the teacher's, repeated or not)
        for name, p in plain.named_parameters():
            if ours[name].shape == p.shape:
                ours[name].copy_(p)
    cfg = teacher.config
    D = cfg.hidden_size // cfg.num_attention_heads
    m = grouped.model.layers[0].self_attn
    assert m.k_proj.weight.shape == m.v_proj.weight.shape == (cfg.num_key_value_heads * D, cfg.hidden_size)
    torch.testing.assert_close(m.k_proj.weight, teacher.model.layers[0].self_attn.k_proj.weight, rtol=0, atol=0)
    saved = 3 * 2 * (cfg.num_attention_heads - cfg.num_key_value_heads) * D * cfg.hidden_size  # 3 linear layers
    n = [sum(p.numel() for p in x.parameters()) for x in (plain, grouped)]
    assert n[0] - n[1] == saved
    assert decode_step_bytes(plain, 2, 64).weights - decode_step_bytes(grouped, 2, 64).weights == 2 * saved
    ids = _ids(2, 13, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(grouped(ids).logits, plain(ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mixer,conv", [("gdn", False), ("gla", True)])
def test_grouped_kv_decodes_alike_on_every_path_and_round_trips(mixer, conv, tmp_path):
    teacher = tiny_teacher("llama")
    model = build_hybrid(teacher, [1], mixer, {"grouped_kv": True, "use_short_conv": conv}).eval()
    with torch.no_grad():  # trained-like: the repeated heads' weights differ from any default mixer's
        for layer in model.model.layers:
            if hasattr(layer.self_attn, "k_proj") and hasattr(layer.self_attn, "num_kv_heads"):
                layer.self_attn.k_proj.weight.add_(0.05 * torch.randn_like(layer.self_attn.k_proj.weight))
    model.generation_config.eos_token_id = None
    prompt = _ids(2, 9, seed=2)
    with torch.no_grad():
        ref = model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
        no_cache = model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0, use_cache=False)
    assert torch.equal(ref, no_cache)
    assert torch.equal(GraphDecoder(model, max_len=16).generate(prompt, max_new_tokens=6), ref)
    model.fuse_input_projections()
    assert torch.equal(GraphDecoder(model, max_len=16).generate(prompt, max_new_tokens=6), ref)
    model.unfuse_input_projections()
    model.save_pretrained(tmp_path / "h")
    back = HybridForCausalLM.from_pretrained(tmp_path / "h").eval()
    assert back.config.options.grouped_kv and back.model.layers[0].self_attn.num_kv_heads == 2
    with torch.no_grad():
        torch.testing.assert_close(back(prompt).logits, model(prompt).logits, rtol=0, atol=0)


def test_grouped_kv_refuses_a_teacher_of_other_kv_heads():
    opts = MixerOptions(grouped_kv=True)
    with pytest.raises(ConfigError, match="grouped_kv"):
        build_mixer("gdn", 64, 4, 16, 0, opts, num_kv_heads=3)  # 4 query heads do not split into 3 groups
    mixer = build_mixer("gdn", 64, 4, 16, 0, opts, num_kv_heads=2)
    attn = tiny_teacher("llama").model.layers[0].self_attn
    with pytest.raises(ConfigError, match="2 KV heads|built for 2"):
        mixer.init_from_teacher(attn, 1)
    assert build_mixer("gdn", 64, 4, 16, 0, MixerOptions(), num_kv_heads=2).num_kv_heads == 4  # default: per head


def test_align_then_kl_train_a_grouped_kv_student(tmp_path):
    """Stages align and kl with ``mixer_options.grouped_kv`` (align layer by layer: the stacked pass declines it):
    both finish, the exported hybrid keeps the teacher's KV-head count in its k/v projections and reloads."""
    from trainer_utils import make_corpus, make_tiny_teacher, tail, train_in_one_process, write_config

    teacher = make_tiny_teacher(tmp_path / "teacher")
    corpus = make_corpus(tmp_path / "corpus", n_files=12)
    short = dict(seq_len=64, global_batch=2, micro_batch=2, tokens=3 * 2 * 64, eval_sequences=2,
                 ds_config="ds_configs/single.json", teacher_ds_config="ds_configs/single.json")
    cfg = write_config(tmp_path / "run.yaml", teacher, corpus, tmp_path / "out", align=short, kl=short,
                       mixer_options={"grouped_kv": True})
    runs = train_in_one_process([["--stage", s, "--config", str(cfg)] for s in ("align", "kl")], tmp_path / "r.json")
    for p in runs:
        assert p.returncode == 0, tail(p)
    model = HybridForCausalLM.from_pretrained(tmp_path / "out" / "kl" / "hf")
    cfg = model.config
    m = model.model.layers[model.config.linear_layers[0]].self_attn
    assert cfg.options.grouped_kv and m.num_kv_heads == cfg.num_key_value_heads < cfg.num_attention_heads
    assert m.k_proj.weight.shape[0] == cfg.num_key_value_heads * cfg.head_dim
