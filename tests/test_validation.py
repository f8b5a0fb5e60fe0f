"""Bad model settings are refused with errors that name the field, before any model is built."""

from __future__ import annotations

import pytest
from conftest import tiny_config
from transformers import GPT2Config

from ds_hybrid.errors import ConfigError
from ds_hybrid.layers import k_for_ratio, uniform_layers
from ds_hybrid.modeling import HybridConfig
from ds_hybrid.teacher import check_same_vocab, check_vocab, resolve_teacher
from ds_hybrid.transfer import hybrid_config


def test_softmax_layer_out_of_range():
    with pytest.raises(ConfigError, match=r"softmax_layers.*out of range.*0\.\.3"):
        hybrid_config(tiny_config("llama"), [1, 4])


def test_softmax_layer_negative_and_duplicate():
    with pytest.raises(ConfigError, match="softmax_layers"):
        hybrid_config(tiny_config("llama"), [-1])
    with pytest.raises(ConfigError, match=r"softmax_layers.*\[2\] listed twice"):
        hybrid_config(tiny_config("llama"), [2, 2])


def test_unknown_mixer():
    with pytest.raises(ConfigError, match=r"mixer='mamba'.*gdn"):
        hybrid_config(tiny_config("llama"), [0], mixer="mamba")


def test_unknown_mixer_option():
    with pytest.raises(ConfigError, match=r"mixer_options\.use_conv"):
        hybrid_config(tiny_config("llama"), [0], mixer_options={"use_conv": True})


def test_unsupported_architecture_lists_supported():
    with pytest.raises(ConfigError, match=r"teacher.*'gpt2'.*llama.*qwen2.*qwen3.*mistral.*gemma3_text"):
        hybrid_config(GPT2Config(), [0])
    from transformers import Gemma3Config  # the multimodal one: refused with what to convert instead

    with pytest.raises(ConfigError, match=r"teacher.*'gemma3'.*multimodal.*ds-hybrid extract-text --model"):
        hybrid_config(Gemma3Config(), [0])


def test_teacher_attention_biases_and_a_logit_soft_cap_are_refused_by_name():
    """A Llama (or Qwen3, Gemma 3) teacher with attention_bias has an o_proj bias, which a linear mixer's output
    projection cannot hold: it was refused by a plain ValueError after the teacher's weights had loaded. A final logit
    soft cap is applied by neither the hybrid nor the fused KL loss: it was ignored."""
    for family in ("llama", "qwen3", "gemma3"):
        with pytest.raises(ConfigError, match=r"teacher\.attention_bias=True.*o_proj"):
            hybrid_config(tiny_config(family, attention_bias=True), [0])
    with pytest.raises(ConfigError, match=r"teacher\.final_logit_softcapping=30\.0.*not supported"):
        hybrid_config(tiny_config("gemma3", final_logit_softcapping=30.0), [0])
    hybrid_config(tiny_config("gemma3", attn_logit_softcapping=50.0), [0])  # applied in the copied attention: fine
    # a saved hybrid config whose teacher model type this transformers does not know (a KeyError before)
    from ds_hybrid.modeling import HybridConfig

    with pytest.raises(ConfigError, match=r"teacher_config\.model_type='mamba2x'.*supported: llama"):
        HybridConfig(teacher_config={"model_type": "mamba2x"}, softmax_layers=[0])
    # an encoder-style Gemma 3 (EmbeddingGemma) attends both ways, the mixers causally
    with pytest.raises(ConfigError, match=r"teacher\.use_bidirectional_attention=True.*causal"):
        hybrid_config(tiny_config("gemma3", use_bidirectional_attention=True), [0])


@pytest.mark.parametrize("option,value", [("gate_logit_normalizer", 0.0), ("gate_logit_normalizer", -1.0),
                                          ("norm_eps", -1.0), ("norm_eps", float("nan"))])
def test_mixer_options_that_give_nan_or_growth_are_refused(option, value):
    with pytest.raises(ConfigError, match=rf"mixer_options\.{option}=.*positive, finite"):
        hybrid_config(tiny_config("llama"), [0], mixer="gla", mixer_options={option: value})


def test_head_dim_the_mixer_cannot_take():
    with pytest.raises(ConfigError, match=r"teacher\.head_dim=512"):
        hybrid_config(tiny_config("qwen3", head_dim=512), [0])
    with pytest.raises(ConfigError, match=r"teacher\.head_dim=12"):
        hybrid_config(tiny_config("qwen3", head_dim=12), [0])


def test_vocab_mismatch():
    class Tok:
        def __len__(self):
            return 500

    with pytest.raises(ConfigError, match=r"tokenizer.*vocab_size=101"):
        check_vocab(tiny_config("llama"), Tok())
    with pytest.raises(ConfigError, match=r"student.*vocab_size=120.*teacher has vocab_size=101"):
        check_same_vocab(tiny_config("llama"), tiny_config("llama", vocab_size=120))


def test_missing_teacher_folder(tmp_path):
    with pytest.raises(ConfigError, match="teacher.*no such folder"):
        resolve_teacher(str(tmp_path / "nope"))
    with pytest.raises(ConfigError, match="teacher.*no config.json"):
        resolve_teacher(str(tmp_path))


def test_a_hub_teacher_is_downloaded_for_training_and_a_folder_without_safetensors_refused(tmp_path, monkeypatch):
    """Training reads the teacher's safetensors directly (its fingerprint, the weight transfer): a hub id, taken by
    every check, crashed there on Path('org/name'); it is now downloaded first (config, safetensors, tokenizer files),
    a hub that does not give it is named with the way around, and a pytorch_model.bin-only folder is refused by name
    before the data and the models (it failed after the teacher had loaded)."""
    import huggingface_hub

    from ds_hybrid.teacher import HUB_FILES, HUB_SKIP, local_teacher

    snap = tmp_path / "snapshot"
    snap.mkdir()
    (snap / "config.json").write_text("{}")
    (snap / "model.safetensors").write_bytes(b"")
    calls = []

    def snapshot_download(repo_id, allow_patterns, ignore_patterns, revision=None):
        calls.append((repo_id, allow_patterns, ignore_patterns))
        if repo_id == "org/offline":
            raise OSError("We couldn't connect to 'https://huggingface.co'")
        return str(snap)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.chdir(tmp_path)
    assert local_teacher("org/name") == str(snap) and calls == [("org/name", HUB_FILES, HUB_SKIP)]
    assert "original/*" in HUB_SKIP and "consolidated*" in HUB_SKIP  # (a repo's original checkpoint: as large again)
    with pytest.raises(ConfigError, match=r"^teacher='org/offline': not a folder here and the hub did not give it "
                                          r"\(We couldn't connect.*huggingface-cli download org/offline --local-dir"):
        local_teacher("org/offline")
    assert local_teacher(str(snap)) == str(snap)  # a local folder: as it is, nothing downloaded
    assert len(calls) == 2
    (snap / "model.safetensors").unlink()
    (snap / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"^teacher=.*has no \*\.safetensors weights \(pytorch_model\.bin only\?\)"):
        local_teacher(str(snap))


def test_a_jobs_ranks_take_the_main_ranks_teacher_commit_and_error_without_a_collective(tmp_path, monkeypatch):
    """job_teacher: the main rank downloads a hub teacher while the others wait in the store (a broadcast under the
    collectives' 30-minute timeout ended a job whose 70B download took longer); a rank that does not see the main
    rank's snapshot downloads the same commit, not the branch's latest; the main rank's error is every rank's."""
    import json

    import huggingface_hub

    from ds_hybrid import distributed as D
    from ds_hybrid.teacher import job_teacher

    mine = tmp_path / "mine" / "snapshots" / "c0ffee"
    mine.mkdir(parents=True)
    (mine / "config.json").write_text("{}")
    (mine / "model.safetensors").write_bytes(b"")
    asked = []

    def snapshot_download(repo_id, allow_patterns, ignore_patterns, revision=None):
        asked.append(revision)
        return str(mine)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    said = []
    monkeypatch.setattr(D, "is_main", lambda: True)
    monkeypatch.setattr(D, "wait_for_main", lambda value="1": said.append(value) or value)
    assert job_teacher("org/name") == str(mine) and asked == [None] and json.loads(said[-1]) == {"path": str(mine)}
    with pytest.raises(ConfigError, match=r"^teacher='\./none': no such folder"):
        job_teacher("./none")
    assert json.loads(said[-1])["error"][0] == "teacher"  # (the others raise it too, below)
    monkeypatch.setattr(D, "is_main", lambda: False)
    for main_said in (json.dumps({"path": "/elsewhere/snapshots/c0ffee"}),):  # a node that does not see it
        monkeypatch.setattr(D, "wait_for_main", lambda value="1": main_said)
        assert job_teacher("org/name") == str(mine) and asked[-1] == "c0ffee"
    monkeypatch.setattr(D, "wait_for_main", lambda value="1": said[-1])
    with pytest.raises(ConfigError, match=r"^teacher='\./none': no such folder"):
        job_teacher("./none")


def test_ratio_round_half_up_as_paper_configs():
    assert [k_for_ratio(r, 36) for r in (1 / 8, 1 / 4, 1 / 3, 1 / 2)] == [5, 9, 12, 18]
    assert [k_for_ratio(r, 28) for r in (1 / 8, 1 / 4, 1 / 3, 1 / 2)] == [4, 7, 9, 14]
    assert uniform_layers(36, 9) == [0, 4, 8, 12, 16, 20, 24, 28, 32]
    with pytest.raises(ConfigError, match="ratio"):
        k_for_ratio(1.5, 30)


def test_config_records_family_mixer_and_layers():
    cfg = hybrid_config(tiny_config("mistral"), [3, 1], mixer="gla", mixer_options={"use_short_conv": True})
    assert isinstance(cfg, HybridConfig)
    assert cfg.teacher_family == "mistral" and cfg.mixer == "gla" and cfg.softmax_layers == [1, 3]
    assert cfg.mixer_options["use_short_conv"] is True
    assert cfg.layer_types == ["linear_attention", "sliding_attention", "linear_attention", "sliding_attention"]
    again = HybridConfig.from_dict(cfg.to_dict())
    assert again.layer_types == cfg.layer_types and again.teacher_config.sliding_window == 8


def test_a_teachers_trained_context_counts_its_rope_scaling():
    """seq_len is refused past the teacher's context (trainer.make_context): max_position_embeddings, or the original
    length times the RoPE factor where a run-time scaling extends it (Qwen2.5 ships 32,768 positions with YaRN x 4
    documented), so a long-context distillation the teacher supports is not refused, and one past a llama3 or linear
    config's stated length (already the extended one) is."""
    from transformers import Gemma3TextConfig, Qwen2Config

    from ds_hybrid.modeling.families import trained_context

    assert trained_context(tiny_config("llama", max_position_embeddings=2048)) == 2048
    yarn = Qwen2Config(max_position_embeddings=32768, rope_scaling={"type": "yarn", "factor": 4.0,
                                                                     "original_max_position_embeddings": 32768})
    assert trained_context(yarn) == 131072
    qwen3 = Qwen2Config(max_position_embeddings=40960, rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                                                      "original_max_position_embeddings": 32768})
    assert trained_context(qwen3) == 131072
    # (no original length: YaRN and dynamic NTK scale max_position_embeddings)
    dynamic = Qwen2Config(max_position_embeddings=4096, rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    assert trained_context(dynamic) == 8192
    # linear and llama3 configs state the extended length themselves (Gemma-3-4B: 131,072 with linear x 8; Llama
    # 3.1: 131,072 over an original 8,192 with llama3 x 8; Llama 3.2: the same with x 32)
    gemma = Gemma3TextConfig(max_position_embeddings=131072, rope_scaling={"rope_type": "linear", "factor": 8.0})
    assert trained_context(gemma) == 131072
    for factor in (8.0, 32.0):
        llama31 = tiny_config("llama", max_position_embeddings=131072, rope_scaling={
            "rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192})
        assert trained_context(llama31) == 131072
    assert trained_context(Gemma3TextConfig(max_position_embeddings=32768)) == 32768


def test_an_init_from_of_a_teacher_of_another_width_is_refused_by_name(tmp_path):
    """check_init_from compared only the vocabulary and the layer count: an align export of a teacher as deep, of
    the same vocabulary and another width, passed and the weights failed to load with a raw shape error."""
    import types

    from transformers import AutoConfig, AutoModelForCausalLM
    from trainer_utils import make_tiny_teacher

    from ds_hybrid.config import load_config
    from ds_hybrid.stages.base import check_init_from
    from ds_hybrid.transfer import build_hybrid

    teacher = make_tiny_teacher(tmp_path / "teacher")
    export = tmp_path / "align_hf"
    build_hybrid(AutoModelForCausalLM.from_pretrained(teacher), softmax_layers=[]).save_pretrained(export)
    cfg = load_config(None, [])
    same = AutoConfig.from_pretrained(teacher)
    ctx = types.SimpleNamespace(cfg=cfg, teacher_config=same, softmax_layers=[1], teacher_weights=None)
    assert check_init_from(ctx, export, "kl.init_from").softmax_layers == []
    wider = AutoConfig.from_pretrained(teacher)
    wider.hidden_size, wider.intermediate_size = 128, 256
    ctx.teacher_config = wider
    with pytest.raises(ConfigError, match=r"^kl\.init_from=.*was made from a different teacher \(hidden_size 64 "
                                          r"there, 128 in this run's teacher\)"):
        check_init_from(ctx, export, "kl.init_from")
