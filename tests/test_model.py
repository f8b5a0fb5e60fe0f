"""The hybrid model against its teacher: exact logits when all layers are softmax, weight transfer, cache, padding."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import VOCAB, tiny_teacher
from transformers import AutoModelForCausalLM

from ds_hybrid import HybridForCausalLM
from ds_hybrid.modeling.mixers import GatedDeltaNetMixer, GLAMixer, LinearMixer
from ds_hybrid.transfer import build_hybrid, restore_softmax_layers


def ids(batch=2, T=37, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, T), generator=g)


def test_all_softmax_hybrid_equals_teacher(family):
    teacher = tiny_teacher(family)
    hybrid = build_hybrid(teacher, softmax_layers=range(4)).eval()
    assert hybrid.config.linear_layers == []
    x = ids()
    with torch.no_grad():
        diff = (hybrid(x).logits - teacher(x).logits).abs().max().item()
    assert diff <= 1e-5


@pytest.mark.parametrize("mixer", ["gdn", "gla"])
def test_partial_hybrid_forward_backward(family, mixer):
    teacher = tiny_teacher(family)
    hybrid = build_hybrid(teacher, softmax_layers=[1], mixer=mixer).train()
    assert [isinstance(l.self_attn, LinearMixer) for l in hybrid.layers] == [True, False, True, True]
    assert isinstance(hybrid, HybridForCausalLM)
    assert type(hybrid.layers[0].self_attn) is {"gdn": GatedDeltaNetMixer, "gla": GLAMixer}[mixer]
    x = ids()
    out = hybrid(x, labels=x)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    grads = [p.grad for p in hybrid.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    # every mixer parameter, including fresh gates/decays, receives a gradient
    mixer0 = hybrid.layers[0].self_attn
    assert all(p.grad.abs().sum() > 0 for p in mixer0.parameters())


@pytest.mark.parametrize("mixer", ["gdn", "gla"])
def test_transfer_copies_qo_and_repeats_kv_headwise(family, mixer):
    teacher = tiny_teacher(family)
    hybrid = build_hybrid(teacher, softmax_layers=[2], mixer=mixer)
    cfg = teacher.config
    H, KV = cfg.num_attention_heads, cfg.num_key_value_heads
    d = hybrid.config.head_dim
    for i in (0, 1, 3):
        t, m = teacher.model.layers[i].self_attn, hybrid.layers[i].self_attn
        assert torch.equal(m.q_proj.weight, t.q_proj.weight)
        assert torch.equal(m.o_proj.weight, t.o_proj.weight)
        for name in ("k_proj", "v_proj"):
            mw = getattr(m, name).weight.view(H, d, -1)
            tw = getattr(t, name).weight.view(KV, d, -1)
            for h in range(H):  # query head h reads kv head h // (H / KV), as HF's repeat_kv
                assert torch.equal(mw[h], tw[h // (H // KV)])
    # the softmax layer and the rest are the teacher's own
    sd_t = teacher.state_dict()
    for k, v in hybrid.state_dict().items():
        if ".self_attn." in k and not k.startswith("model.layers.2."):
            continue
        assert torch.equal(v, sd_t[k]), k


@pytest.mark.parametrize("mixer", ["gdn", "gla"])
def test_cached_generation_equals_full_reforward_greedy(family, mixer):
    teacher = tiny_teacher(family)
    hybrid = build_hybrid(teacher, softmax_layers=[1, 3], mixer=mixer).eval()
    hybrid.generation_config.eos_token_id = None  # compare raw greedy choices: no EOS stop or suppression
    prompt = ids(batch=1, T=21, seed=3)
    n_new = 12
    with torch.no_grad():
        cached = hybrid.generate(prompt, max_new_tokens=n_new, do_sample=False)
        seq = prompt
        for _ in range(n_new):  # greedy by full re-forward, no cache
            nxt = hybrid(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
    assert torch.equal(cached, seq)


def test_all_linear_hybrid_generates_with_cache():
    """K = 0: no softmax layer answers the cache length; the recurrent layers must."""
    teacher = tiny_teacher("llama")
    hybrid = build_hybrid(teacher, softmax_layers=[]).eval()
    hybrid.generation_config.eos_token_id = None
    prompt = ids(batch=1, T=9)
    with torch.no_grad():
        out = hybrid.generate(prompt, max_new_tokens=5, do_sample=False)
        seq = prompt
        for _ in range(5):
            seq = torch.cat([seq, hybrid(seq, use_cache=False).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(out, seq)


@pytest.mark.parametrize("mixer", ["gdn", "gla"])
@pytest.mark.parametrize("short_conv", [False, True])
def test_left_padding_is_exact(mixer, short_conv):
    """A left-padded row gives the same logits on its real tokens as the same row alone."""
    teacher = tiny_teacher("llama")
    hybrid = build_hybrid(teacher, [2], mixer, {"use_short_conv": short_conv}).eval()
    hybrid.generation_config.eos_token_id = None
    full = ids(batch=1, T=30, seed=5)
    short = ids(batch=1, T=22, seed=6)
    pad = 8
    batch = torch.cat([full, torch.cat([torch.zeros(1, pad, dtype=torch.long), short], dim=1)])
    mask = torch.ones_like(batch)
    mask[1, :pad] = 0
    with torch.no_grad():
        both = hybrid(batch, attention_mask=mask).logits
        alone = hybrid(short).logits
    assert (both[1, pad:] - alone[0]).abs().max() < 2e-6
    # and batched generation with padding equals generating the short row alone
    with torch.no_grad():
        g_both = hybrid.generate(batch, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
        g_alone = hybrid.generate(short, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(g_both[1, pad:], g_alone[0])


def test_packed_sequences_are_refused_by_a_hybrid_with_linear_layers():
    """Two documents in one row (position ids restarting, or a flattened batch's cu_seq_lens): the softmax layers
    would keep them apart, the linear layers' state would flow across; refused by name instead of a silent leak.
    Ordinary rows, left-padded rows and an all-softmax model pass."""
    from ds_hybrid.errors import ConfigError

    teacher = tiny_teacher("llama")
    hybrid = build_hybrid(teacher, softmax_layers=[1]).eval()
    x = ids(batch=2, T=8)
    restart = torch.cat([torch.arange(4), torch.arange(4)]).expand(2, 8)
    with torch.no_grad():
        hybrid(x, position_ids=torch.arange(8).expand(2, 8))
        with pytest.raises(ConfigError, match="position_ids.*one sequence per row"):
            hybrid(x, position_ids=restart)
        with pytest.raises(ConfigError, match="cu_seq_lens_q"):
            hybrid(x, cu_seq_lens_q=torch.tensor([0, 4, 8]))
        mask = torch.ones(2, 8, dtype=torch.long)
        mask[0, :3] = 0
        hybrid.generate(x, attention_mask=mask, max_new_tokens=2, do_sample=False, pad_token_id=0)
        all_softmax = build_hybrid(teacher, softmax_layers=list(range(teacher.config.num_hidden_layers))).eval()
        all_softmax(x, position_ids=restart)


def test_a_qwen2_teachers_dropped_qkv_biases_are_warned_about():
    """Qwen2's q/k/v biases (large on k) are dropped by the transfer unless mixer_options.qkv_bias keeps them: said,
    not silent; kept, no warning and the biases copied."""
    import warnings

    teacher = tiny_teacher("qwen2")
    with pytest.warns(UserWarning, match="mixer_options.qkv_bias: true keeps them"):
        build_hybrid(teacher, softmax_layers=[0], mixer="gdn")
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*q/k/v projections have biases")
        kept = build_hybrid(teacher, softmax_layers=[0], mixer="gdn", mixer_options={"qkv_bias": True})
    assert torch.equal(kept.model.layers[1].self_attn.q_proj.bias, teacher.model.layers[1].self_attn.q_proj.bias)


@pytest.mark.parametrize("fam", ["qwen2", "gemma3"])  # gemma3: tied head, scaled embedding, per-type RoPE, 4 norms
def test_save_load_in_fresh_process_gives_identical_logits(tmp_path, fam):
    teacher = tiny_teacher(fam)
    hybrid = build_hybrid(teacher, softmax_layers=[0, 3], mixer="gdn").eval()
    hybrid.save_pretrained(tmp_path / "h")
    x = ids()
    with torch.no_grad():
        ref = hybrid(x).logits
    torch.save({"x": x, "ref": ref}, tmp_path / "io.pt")
    assert (tmp_path / "h" / "model.safetensors").is_file()
    code = textwrap.dedent(f"""
        import torch, ds_hybrid
        from transformers import AutoModelForCausalLM
        m = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'h')!r}).eval()
        assert type(m).__name__ == "HybridForCausalLM", type(m)
        assert m.config.softmax_layers == [0, 3] and m.config.mixer == "gdn"
        assert m.config.teacher_family == {teacher.config.model_type!r}
        io = torch.load({str(tmp_path / 'io.pt')!r}, weights_only=True)
        with torch.no_grad():
            out = m(io["x"]).logits
        assert torch.equal(out, io["ref"]), (out - io["ref"]).abs().max()
        print("OK")
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "OK" in res.stdout, res.stderr[-3000:]


def test_restore_softmax_layers_takes_teacher_attention():
    teacher = tiny_teacher("llama")
    student = build_hybrid(teacher, softmax_layers=[])
    with torch.no_grad():  # pretend stage align changed the mixers
        for p in student.layers[1].self_attn.parameters():
            p.add_(0.01)
    restored = restore_softmax_layers(student, teacher, [2])
    assert restored.config.softmax_layers == [2]
    assert isinstance(restored.layers[1].self_attn, GatedDeltaNetMixer)
    assert torch.equal(restored.layers[1].self_attn.q_proj.weight, student.layers[1].self_attn.q_proj.weight)
    assert torch.equal(restored.layers[2].self_attn.q_proj.weight, teacher.model.layers[2].self_attn.q_proj.weight)
    # what the student set apart from its teacher stays the student's (the config was rebuilt from the teacher's)
    student.config.eos_token_id, student.config.max_position_embeddings = 7, 4 * teacher.config.max_position_embeddings
    student.generation_config.max_new_tokens = 33
    again = restore_softmax_layers(student, teacher, [2])
    assert again.config.eos_token_id == 7 and again.config.max_position_embeddings == student.config.max_position_embeddings
    assert again.generation_config.max_new_tokens == 33 and again.config.softmax_layers == [2]


def test_a_bf16_hybrid_keeps_the_teachers_fp32_rope_and_equals_it(family, tmp_path):
    """A teacher loaded in bf16 (from_pretrained) computes RoPE's inverse frequencies in fp32; `Module.to(bf16)`
    rounded the hybrid's to bf16, so its softmax layers attended with other positions than the layers they copy (a
    rotation off by up to p * inv_freq * 2^-8 radians at position p). Stage 0 and restore_softmax_layers keep them
    fp32 (modeling/precision.py): the all-softmax hybrid equals its bf16 teacher to the last bit."""
    tiny_teacher(family).save_pretrained(tmp_path)
    teacher = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16, attn_implementation="sdpa").eval()
    hybrid = build_hybrid(teacher, softmax_layers=range(4)).eval()
    linear = build_hybrid(teacher, softmax_layers=[])
    restored = restore_softmax_layers(linear, teacher, range(4)).eval()
    freqs = {n: b for n, b in teacher.named_buffers() if n.endswith("inv_freq")}
    assert freqs and all(b.dtype == torch.float32 for b in freqs.values())
    x = ids(T=250)  # far enough for bf16-rounded frequencies to turn the fast components by radians
    with torch.no_grad():
        want = teacher(x).logits
        for model in (hybrid, restored):
            assert next(model.parameters()).dtype == torch.bfloat16
            mine = dict(model.named_buffers())
            for name, b in freqs.items():
                assert mine[name].dtype == torch.float32 and torch.equal(mine[name], b), name
            assert torch.equal(model(x).logits, want)


def test_a_resized_hybrid_and_its_set_pad_token_survive_save_and_reload(tmp_path):
    """The hybrid is built from its teacher config: a mirrored field set on the hybrid's config (resize_token_embeddings
    sets vocab_size; a user sets pad_token_id) reaches the teacher config, so the saved model reloads as it was (a
    resized one failed to load: embeddings of 120 rows against a model built for 101)."""
    hybrid = build_hybrid(tiny_teacher("gemma3"), softmax_layers=[1])
    hybrid.resize_token_embeddings(VOCAB + 19)
    hybrid.config.pad_token_id = 7
    hybrid.save_pretrained(tmp_path)
    again = HybridForCausalLM.from_pretrained(tmp_path)
    assert again.config.vocab_size == again.config.teacher_config.vocab_size == VOCAB + 19
    assert again.config.pad_token_id == again.config.teacher_config.pad_token_id == 7
    assert torch.equal(again.model.embed_tokens.weight, hybrid.model.embed_tokens.weight)


def test_a_hybrid_configs_own_token_ids_win_and_its_shapes_must_agree(tmp_path):
    """Mirrored fields given to HybridConfig or edited in a saved config.json: token ids and the context length are
    the hybrid's (written into its teacher config, which the model is built from; they were silently replaced by the
    teacher's before), a shape that disagrees with the teacher config is refused by name."""
    import json

    from ds_hybrid.errors import ConfigError
    from ds_hybrid.modeling import HybridConfig

    teacher = tiny_teacher("llama")
    config = HybridConfig(teacher_config=teacher.config, softmax_layers=[1], eos_token_id=7,
                          max_position_embeddings=99)
    assert config.eos_token_id == config.teacher_config.eos_token_id == 7
    assert config.max_position_embeddings == config.teacher_config.max_position_embeddings == 99
    assert teacher.config.eos_token_id != 7  # the caller's config is left as it was
    hybrid = build_hybrid(teacher, softmax_layers=[1])
    hybrid.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    saved["eos_token_id"] = 5  # a hand edit of the top-level field only
    (tmp_path / "config.json").write_text(json.dumps(saved))
    again = HybridForCausalLM.from_pretrained(tmp_path)
    assert again.config.eos_token_id == again.config.teacher_config.eos_token_id == 5
    with pytest.raises(ConfigError, match="hidden_size.*teacher_config.hidden_size"):
        HybridConfig(teacher_config=teacher.config, softmax_layers=[1], hidden_size=teacher.config.hidden_size * 2)


def test_mixer_parameters_missing_from_a_checkpoint_get_their_init(tmp_path):
    """A checkpoint without a mixer's A_log or its output norm's weight (an older export, a hand-pruned file):
    from_pretrained reports them newly initialised, and they now are (fla's A ~ U(0, 16); the norm's ones); they kept
    uninitialised memory before (the norm's: -1.9e38 on Gemma 3). The loaded ones stay."""
    from safetensors.torch import load_file, save_file

    hybrid = build_hybrid(tiny_teacher("llama"), softmax_layers=[1])
    with torch.no_grad():
        hybrid.model.layers[2].self_attn.o_norm.weight.fill_(0.5)  # a loaded norm weight, not the init's ones
    hybrid.save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    gone = ("layers.0.self_attn.A_log", "layers.0.self_attn.o_norm.weight")
    tensors = {k: v for k, v in load_file(path).items() if not k.endswith(gone)}
    save_file(tensors, path, metadata={"format": "pt"})
    for _ in range(2):  # (memory that held large values before, as a reused allocation would)
        torch.full((1 << 16,), 3e38).sum()
        again = HybridForCausalLM.from_pretrained(tmp_path)
        mixer = again.model.layers[0].self_attn
        A = mixer.A_log.detach().exp()
        assert torch.isfinite(mixer.A_log).all() and (A > 0).all() and (A <= 16).all(), mixer.A_log
        assert torch.equal(mixer.o_norm.weight, torch.ones_like(mixer.o_norm.weight)), mixer.o_norm.weight
        assert (again.model.layers[2].self_attn.o_norm.weight == 0.5).all()
        assert torch.equal(mixer.dt_bias, hybrid.model.layers[0].self_attn.dt_bias)
        assert torch.equal(mixer.q_proj.weight, hybrid.model.layers[0].self_attn.q_proj.weight)


def test_a_config_object_as_teacher_config_is_copied_and_left_as_it_was():
    """HybridConfig(teacher_config=teacher.config, ...) (its docstring's form): transformers sets the fields one by one
    before __post_init__, and the mirrored ones (None then) must not be written into the caller's config (a strict
    LlamaConfig refused vocab_size=None); later edits of the hybrid's config stay the hybrid's."""
    from ds_hybrid.modeling import HybridConfig

    teacher = tiny_teacher("llama")
    before = teacher.config.to_dict()
    config = HybridConfig(teacher_config=teacher.config, softmax_layers=[1], mixer="gdn")
    assert config.vocab_size == VOCAB and config.teacher_config is not teacher.config
    config.vocab_size = VOCAB + 3
    assert config.teacher_config.vocab_size == VOCAB + 3 and teacher.config.to_dict() == before
    assert "_mirror_to_teacher" not in config.to_dict()


def test_unfusing_gives_the_biases_their_own_storage_too():
    """fuse_input_projections shares one weight and one bias buffer among q/k/v...; unfusing cloned what shared the
    fused weight only: a Qwen2 teacher's q/k/v biases stayed views of one buffer (safetensors' save_file refuses
    shared tensors)."""
    hybrid = build_hybrid(tiny_teacher("qwen2"), softmax_layers=[1], mixer_options={"qkv_bias": True})
    mixer = hybrid.model.layers[0].self_attn
    assert mixer.q_proj.bias is not None and mixer.fuse_input_projections()
    assert mixer.q_proj.bias.untyped_storage().data_ptr() == mixer.k_proj.bias.untyped_storage().data_ptr()
    before = {n: p.detach().clone() for n, p in mixer.named_parameters()}
    assert mixer.unfuse_input_projections()
    ptrs = [p.untyped_storage().data_ptr() for p in mixer.parameters()]
    assert len(set(ptrs)) == len(ptrs)
    assert all(torch.equal(p, before[n]) for n, p in mixer.named_parameters())


def test_softmax_layers_given_to_from_pretrained_build_those_layers_and_survive_a_reload(tmp_path):
    """transformers sets from_pretrained's config overrides after __post_init__: softmax_layers changed while
    layer_types, which the model is built from, kept the old layers (layer 0 stayed a mixer), and a save and reload
    then built a softmax layer 0 from the mixer's weights; mixer_options were not checked."""
    from ds_hybrid.errors import ConfigError

    hybrid = build_hybrid(tiny_teacher("llama", num_key_value_heads=4), softmax_layers=[1])  # (MHA: q/k/v/o load)
    hybrid.save_pretrained(tmp_path / "h")
    moved = HybridForCausalLM.from_pretrained(tmp_path / "h", softmax_layers=[0, 1])
    assert moved.config.layer_types[:2] != ["linear_attention"] * 2 and moved.config.softmax_layers == [0, 1]
    assert not isinstance(moved.model.layers[0].self_attn, type(hybrid.model.layers[0].self_attn))
    moved.save_pretrained(tmp_path / "m")
    back = HybridForCausalLM.from_pretrained(tmp_path / "m")
    assert back.config.layer_types == moved.config.layer_types
    ids = torch.randint(0, VOCAB, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, moved(ids).logits, rtol=0, atol=0)
    with pytest.raises(ConfigError, match="bogus"):
        HybridForCausalLM.from_pretrained(tmp_path / "h", mixer_options={"bogus": 1})
    with pytest.raises(ConfigError, match="softmax_layers"):
        HybridForCausalLM.from_pretrained(tmp_path / "h", softmax_layers=[9])


def test_a_resized_untied_head_stays_the_hybrids_head():
    """resize_token_embeddings installs a plain nn.Linear through set_output_embeddings: stage kl's
    lm_head(h, loss_fn=...) then raised TypeError. It is the hybrid's head again, its resized weight kept."""
    from ds_hybrid.modeling.modeling import HybridLMHead

    hybrid = build_hybrid(tiny_teacher("llama"), softmax_layers=[1])
    assert not hybrid.config.tie_word_embeddings
    hybrid.resize_token_embeddings(VOCAB + 7)
    head = hybrid.get_output_embeddings()
    assert isinstance(head, HybridLMHead) and head.weight.shape[0] == VOCAB + 7
    h = torch.randn(3, head.weight.shape[1])
    assert torch.equal(head(h, loss_fn=lambda x, w: x @ w.t()), head(h))
