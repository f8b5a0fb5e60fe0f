"""Run-config validation: every bad setting is refused, naming the field, before any model is built."""

from __future__ import annotations

import json
import sys

import pytest
import yaml
from trainer_utils import make_tiny_teacher, run

from ds_hybrid.config import load_config, validate_for_launch
from ds_hybrid.data import source_files
from ds_hybrid.errors import ConfigError
from ds_hybrid.layers import resolve_softmax_layers
from ds_hybrid.trainer import make_context


def cfg_file(tmp_path, data: dict):
    p = tmp_path / "run.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def test_unknown_keys_are_named(tmp_path):
    with pytest.raises(ConfigError, match=r"^data\.sourse=.*unknown setting"):
        load_config(cfg_file(tmp_path, {"data": {"sourse": "x"}}))
    with pytest.raises(ConfigError, match=r"^kl\.lr_mixer=.*unknown setting.*lr_rest"):
        load_config(None, ["kl.lr_mixer=1e-4"])
    with pytest.raises(ConfigError, match=r"^teachr="):
        load_config(None, ["teachr=x"])


def test_types_and_overrides(tmp_path):
    cfg = load_config(cfg_file(tmp_path, {"kl": {"tokens": "2e6"}}), ["seed=3", "kl.lr=2e-4", "align.betas=[0.9, 0.99]"])
    assert cfg.kl.tokens == 2_000_000 and cfg.seed == 3 and cfg.kl.lr == 2e-4 and cfg.align.betas == (0.9, 0.99)
    assert cfg.kl.lr_rest == 7e-6 and cfg.kl.seq_len == 4096  # the paper's stage-2 defaults survive
    with pytest.raises(ConfigError, match=r"^kl\.micro_batch='two': expected int or 'auto'"):
        load_config(None, ["kl.micro_batch=two"])
    with pytest.raises(ConfigError, match="override"):
        load_config(None, ["kl.tokens"])
    with pytest.raises(ConfigError, match=r"--config.*no such file"):
        load_config(tmp_path / "missing.yaml")


def test_mixer_options_take_their_types():
    """mixer_options values take the option's type (YAML reads 1e-5 as a string), or are refused naming the option;
    the options a mixer never reads do not count as a difference between two mixers."""
    from ds_hybrid.config import validate_static
    from ds_hybrid.modeling.mixers import MixerOptions

    opts = MixerOptions.from_dict({"norm_eps": "1e-6", "conv_size": "3", "use_gate": False})
    assert opts.norm_eps == 1e-6 and isinstance(opts.norm_eps, float) and opts.conv_size == 3
    for option, bad, kind in (("use_gate", "sure", "a bool"), ("conv_size", 2.5, "an int"), ("norm_eps", "small", "a float"),
                              ("qkv_bias", 1, "a bool")):
        with pytest.raises(ConfigError, match=rf"^mixer_options\.{option}=.*expected {kind}"):
            validate_static(load_config(None, [f"mixer_options.{option}={bad}"]))
    base = MixerOptions()
    assert base.differences(MixerOptions(gate_low_rank_dim=8, allow_neg_eigval=True), "gdn") == ["allow_neg_eigval"]
    assert base.differences(MixerOptions(gate_low_rank_dim=8, allow_neg_eigval=True), "gla") == ["gate_low_rank_dim"]
    assert base.differences(MixerOptions(conv_size=3), "gdn") == []  # no short convolution: its size is unused
    assert base.differences(MixerOptions(conv_size=3, use_short_conv=True), "gdn") == ["use_short_conv", "conv_size"]
    assert base.differences(MixerOptions(backend="torch"), "gla") == []  # the kernels, not the function


def test_retrieval_selection_needs_room_for_a_needle():
    from ds_hybrid.config import validate_static

    with pytest.raises(ConfigError, match=r"^select\.retrieval_seq_len=64: .*>= 128 tokens"):
        validate_static(load_config(None, ["select.method=retrieval", "select.retrieval_seq_len=64"]))
    with pytest.raises(ConfigError, match=r"^select\.retrieval_prompts=0"):
        validate_static(load_config(None, ["select.method=retrieval", "select.retrieval_prompts=0"]))
    validate_static(load_config(None, ["select.method=retrieval"]))


def test_zero_steps_budget():
    cfg = load_config(None, ["kl.tokens=1000", "kl.seq_len=512", "kl.global_batch=4"])
    with pytest.raises(ConfigError, match=r"^kl\.tokens=1000: gives zero optimizer steps.*2048"):
        validate_for_launch(cfg, "kl", world_size=1)


def test_batch_must_divide_over_world():
    cfg = load_config(None, ["kl.global_batch=12", "kl.micro_batch=2"])
    with pytest.raises(ConfigError, match=r"^kl\.global_batch=12: must be a multiple of .* 2 x 4 = 8"):
        validate_for_launch(cfg, "kl", world_size=4)
    validate_for_launch(cfg, "kl", world_size=3)


def test_missing_and_bad_deepspeed_files(tmp_path):
    cfg = load_config(None, ["kl.ds_config=nope.json"])
    with pytest.raises(ConfigError, match=r"^kl\.ds_config='nope.json': no such DeepSpeed JSON"):
        validate_for_launch(cfg, "kl", 1)
    bad = tmp_path / "opt.json"
    bad.write_text(json.dumps({"optimizer": {"type": "Adam"}}))
    cfg = load_config(None, [f"kl.ds_config={bad}"])
    with pytest.raises(ConfigError, match=r"kl\.ds_config.*remove the 'optimizer' section"):
        validate_for_launch(cfg, "kl", 1)
    cfg = load_config(None, [f"kl.init_from={tmp_path / 'nothing'}"])
    with pytest.raises(ConfigError, match=r"^kl\.init_from=.*no such folder"):
        validate_for_launch(cfg, "kl", 1)
    with pytest.raises(ConfigError, match=r"^align\.lr_rest"):
        validate_for_launch(load_config(None, ["align.lr_rest=1e-5"]), "align", 1)


def test_softmax_layer_specs():
    assert resolve_softmax_layers([5, 1], 30) == [1, 5]
    assert resolve_softmax_layers({"uniform": 0.25}, 30) == [0, 3, 7, 11, 15, 18, 22, 26]
    assert resolve_softmax_layers({"uniform": 4}, 30) == [0, 7, 15, 22]
    with pytest.raises(ConfigError, match=r"^softmax_layers=\[3, 30\].*out of range"):
        resolve_softmax_layers([3, 30], 30)
    with pytest.raises(ConfigError, match=r"^softmax_layers="):
        resolve_softmax_layers("every other", 30)


def test_missing_data_source(tmp_path):
    with pytest.raises(ConfigError, match=r"^data\.source=.*no such file or folder"):
        source_files(str(tmp_path / "corpus.txt"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"^data\.source=.*holds no files"):
        source_files(str(tmp_path / "empty"))


def test_vocab_mismatch_and_layers_checked_against_the_teacher(tmp_path):
    small = make_tiny_teacher(tmp_path / "t", vocab_size=1000)  # the SmolLM2 tokenizer has 49152 tokens
    cfg = load_config(None, [f"teacher={small}", "kl.ds_config=ds_configs/single.json"])
    with pytest.raises(ConfigError, match=r"^tokenizer=.*more tokens than the model's vocab_size=1000"):
        make_context(cfg, "kl")
    ok = make_tiny_teacher(tmp_path / "t2")
    cfg = load_config(None, [f"teacher={ok}", "softmax_layers=[0, 4]"])
    with pytest.raises(ConfigError, match=r"^softmax_layers=\[0, 4\].*0\.\.3"):
        make_context(cfg, "kl")
    with pytest.raises(ConfigError, match=r"^teacher=.*no such folder"):
        make_context(load_config(None, [f"teacher={tmp_path / 'none'}"]), "kl")


def test_train_script_reports_and_exits_2_before_building_anything(tmp_path):
    out = tmp_path / "out"
    p = run([sys.executable, "ds_hybrid/train.py", "--stage", "kl", f"out_dir={out}", "kl.tokens=100"], timeout=300)
    assert p.returncode == 2, p.stderr[-2000:]
    assert "kl.tokens=100: gives zero optimizer steps" in p.stderr
    assert not out.exists()
