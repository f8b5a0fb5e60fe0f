"""Run-config validation: every bad setting is refused, naming the field, before any model is built."""

from __future__ import annotations

import json
import logging
import re
import sys

import pytest
import yaml
from trainer_utils import REPO, make_tiny_teacher, run

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


def test_a_dotted_override_sets_one_entry_and_a_probe_setting_keeps_the_probe_defaults(tmp_path):
    """mixer_options.x=... keeps the YAML's other mixer options (it replaced the whole mapping: a Qwen2 run lost
    qkv_bias); mixer_options={...} still replaces it. One select.probe setting keeps the other probe defaults (it
    dropped them for the kl defaults: 4096-token rows, a checkpoint every 200 steps)."""
    from ds_hybrid.config import DEFAULT_PROBE

    path = cfg_file(tmp_path, {"mixer_options": {"qkv_bias": True, "conv_size": 3}})
    cfg = load_config(path, ["mixer_options.use_short_conv=true"])
    assert cfg.mixer_options == {"qkv_bias": True, "conv_size": 3, "use_short_conv": True}
    assert load_config(path, ["mixer_options={use_gate: false}"]).mixer_options == {"use_gate": False}
    # softmax_layers takes one form at a time: a dotted key of another form replaces it (a list, a selection);
    # k / ratio keep the selection file they choose from, selection keeps the k
    from ds_hybrid.config import apply_overrides

    sel = {"softmax_layers": {"selection": "x.json", "ratio": 0.25}}
    assert apply_overrides({"softmax_layers": [3, 7]}, ["softmax_layers.uniform=0.125"]) == {
        "softmax_layers": {"uniform": 0.125}}
    assert apply_overrides(sel, ["softmax_layers.uniform=0.125"]) == {"softmax_layers": {"uniform": 0.125}}
    assert apply_overrides(sel, ["softmax_layers.k=2"]) == {"softmax_layers": {"selection": "x.json", "k": 2}}
    assert apply_overrides(sel, ["softmax_layers.selection=y.json"]) == {
        "softmax_layers": {"selection": "y.json", "ratio": 0.25}}
    probe = load_config(None, ["select.probe.tokens=5e6"]).select.probe
    assert probe == {**DEFAULT_PROBE, "tokens": 5_000_000}  # (taken as the stage's type: compared by value)
    probe = load_config(cfg_file(tmp_path, {"select": {"probe": {"seq_len": 2048}}})).select.probe
    assert probe["seq_len"] == 2048 and probe["ckpt_every"] == DEFAULT_PROBE["ckpt_every"]


def test_mixer_options_take_their_types():
    """mixer_options values take the option's type (YAML reads 1e-5 as a string), or are refused naming the option;
    the options a mixer never reads do not count as a difference between two mixers."""
    from ds_hybrid.config import validate_static
    from ds_hybrid.modeling.mixers import MixerOptions

    opts = MixerOptions.from_dict({"norm_eps": "1e-6", "conv_size": "3", "use_gate": False})
    assert opts.norm_eps == 1e-6 and isinstance(opts.norm_eps, float) and opts.conv_size == 3
    for option, bad, kind in (("use_gate", "sure", "a bool"), ("conv_size", 2.5, "an int"), ("norm_eps", "small", "a float"),
                              ("qkv_bias", 1, "a bool"), ("conv_size", "--5", "an int")):
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
    bad.write_text(json.dumps({"checkpoint": {"writer": {"type": "fast"}}}))  # files still written after save returns
    with pytest.raises(ConfigError, match=r"kl\.ds_config.*remove checkpoint\.writer"):
        validate_for_launch(cfg, "kl", 1)
    bad.write_text(json.dumps({"fp16": {"enabled": True}}))  # (DeepSpeed's own assertion, after the models were built)
    with pytest.raises(ConfigError, match=r"kl\.ds_config.*remove the enabled fp16 section"):
        validate_for_launch(cfg, "kl", 1)
    cfg = load_config(None, [f"kl.init_from={tmp_path / 'nothing'}"])
    with pytest.raises(ConfigError, match=r"^kl\.init_from=.*no such folder"):
        validate_for_launch(cfg, "kl", 1)
    validate_for_launch(cfg, "kl", 1, check_init_from=False)  # (a job's up-front check: an earlier stage writes it)
    for field in ("seed", "data.split_seed"):  # (numpy's generators refused it at step 0, exit 1)
        with pytest.raises(ConfigError, match=rf"^{field}=-1: a seed is an integer >= 0"):
            load_config(None, [f"{field}=-1"])
    with pytest.raises(ConfigError, match=r"^align\.lr_rest"):
        validate_for_launch(load_config(None, ["align.lr_rest=1e-5"]), "align", 1)


def test_softmax_layer_specs():
    assert resolve_softmax_layers([5, 1], 30) == [1, 5]
    assert resolve_softmax_layers({"uniform": 0.25}, 30) == [0, 3, 7, 11, 15, 18, 22, 26]
    assert resolve_softmax_layers({"uniform": 4}, 30) == [0, 7, 15, 22]
    # an integer is a count and a float a ratio: 1 is one layer; 1.0 (every layer: the teacher) and 8.0 are refused
    assert resolve_softmax_layers({"uniform": 1}, 30) == [0] and resolve_softmax_layers({"uniform": 0.0}, 30) == []
    for v in (1.0, 8.0, -0.1):
        with pytest.raises(ConfigError, match=r"^softmax_layers\.uniform=.*a ratio lies in \[0, 1\).*an integer"):
            resolve_softmax_layers({"uniform": v}, 30)
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
    # a list holds local files and folders: a hub name or 'embedded' in it is said to be one, not "no network" or
    # "no such file" for what the user wrote; a hub-shaped string is the hub's (its error says no local path either)
    (tmp_path / "a.txt").write_text("some text")
    with pytest.raises(ConfigError, match=r"^data\.source='org/corpus': no such file or folder here .*a hub dataset is "
                                          r"named on its own"):
        source_files(["org/corpus"])
    with pytest.raises(ConfigError, match=r"^data\.source='embedded': the embedded corpus is a source on its own"):
        source_files(["embedded", str(tmp_path / "a.txt")])
    assert source_files("org/corpus") is None and source_files([str(tmp_path / "a.txt")]) == [tmp_path / "a.txt"]


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
    cfg = load_config(None, [f"teacher={ok}", "kl.seq_len=2048"])  # the tiny teacher's context: 1024 positions
    with pytest.raises(ConfigError, match=r"^kl\.seq_len=2048: longer than the teacher's context \(1024 tokens"):
        make_context(cfg, "kl")


def test_select_rows_longer_than_the_teachers_context_are_refused_before_any_model(tmp_path, monkeypatch):
    """select's own rows (retrieval's needle rows, the probes' and proxy's held-out rows) are checked against the
    teacher's context like a stage's seq_len, before a model or the data is touched."""
    from ds_hybrid.stages import select

    def no_model(*a, **k):
        raise AssertionError("a model was built")

    monkeypatch.setattr(select, "_held_out_rows", no_model)
    # no process group in the test process: its MASTER_PORT would leak into the subprocesses launched after it
    monkeypatch.setattr(select.D, "init_distributed", lambda *a, **k: None)
    teacher = make_tiny_teacher(tmp_path / "t")  # 1024 positions
    cases = {"select.retrieval_seq_len=2048": ["select.method=retrieval", "select.retrieval_seq_len=2048"],
             "select.probe.seq_len=4096": ["select.method=proxy", "select.probe={seq_len: 4096, tokens: 65536}"],
             "select.ar_pairs=400": ["select.method=ar", "select.ar_pairs=400"]}  # ~2,900 tokens a prompt
    for field, overrides in cases.items():
        cfg = load_config(None, [f"teacher={teacher}", f"out_dir={tmp_path / 'out'}", *overrides])
        with pytest.raises(ConfigError, match=rf"^{field.replace('.', '[.]')}: (makes prompts of up to \d+ tokens, )?"
                                              rf"longer than the teacher's context \(1024"):
            select.run_select(cfg)
    assert not (tmp_path / "out").exists()


def test_train_script_reports_and_exits_2_before_building_anything(tmp_path):
    out = tmp_path / "out"
    p = run([sys.executable, "ds_hybrid/train.py", "--stage", "kl", f"out_dir={out}", "kl.tokens=100"], timeout=300)
    assert p.returncode == 2, p.stderr[-2000:]
    assert "kl.tokens=100: gives zero optimizer steps" in p.stderr
    assert not out.exists()


def test_malformed_yaml_names_the_file_or_the_override(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("kl:\n  tokens: 1\n   lr: 2\n")
    with pytest.raises(ConfigError, match=rf"^--config='{bad}': not valid YAML: .* at line 3"):
        load_config(bad)
    with pytest.raises(ConfigError, match=r"^kl\.tokens='\[1': not a YAML value .*quote"):
        load_config(None, ["kl.tokens=[1"])


@pytest.mark.parametrize("override, message", [
    ("kl.betas=[0.9]", r"^kl\.betas=\[0\.9\]: AdamW's two betas"),
    ("kl.betas=[0.9, 1.5]", r"^kl\.betas=\[0\.9, 1\.5\]: AdamW's two betas"),
    ("align.eps=0", r"^align\.eps=0: AdamW's epsilon must be positive"),
    ("kl.weight_decay=-0.1", r"^kl\.weight_decay=-0\.1: must not be negative"),
    ("finetune.warmup_steps=-1", r"^finetune\.warmup_steps=-1: must not be negative"),
    ("kl.eval_every=-5", r"^kl\.eval_every=-5: must not be negative"),
    ("kl.keep_checkpoints=-1", r"^kl\.keep_checkpoints=-1: must not be negative"),
    ("kl.eval_sequences=0", r"^kl\.eval_sequences=0: held-out sequences"),
    ("kl.eval_sequences=-3", r"^kl\.eval_sequences=-3: held-out sequences"),
    ("data.max_documents=0", r"^data\.max_documents=0: a cap of 1 or more"),
    ("data.revision=main", r"^data\.revision='main': only a hub dataset source has one; data\.source is 'embedded'"),
    ("data.hub_config=sample-10BT", r"^data\.hub_config='sample-10BT': only a hub dataset source has one"),
    ("dist_timeout_minutes=0", r"^dist_timeout_minutes=0: minutes a rank may wait"),
    ("select.eval_sequences=0", r"^select\.eval_sequences=0: must be a positive integer"),
    ("select.window=0", r"^select\.window=0: must be a positive integer"),
    ("select.recall_sequences=-1", r"^select\.recall_sequences=-1: needle rows: 0 \(none\) or more"),
    ("select.ar_prompts=0", r"^select\.ar_prompts=0: prompts per layer"),
    ("select.ar_pairs=2", r"^select\.ar_pairs=2: key-value pairs per prompt: 3 or more"),
    ("select.ar_pairs=4901", r"^select\.ar_pairs=4901: .* at most 4900 \(the distinct two-syllable keys\)"),
    ("select.probe={tokens: 1000, betas: [0.9]}", r"^select\.probe\.betas=\[0\.9\]: AdamW's two betas"),
    ("select.probe={warmup_steps: -1}", r"^select\.probe\.warmup_steps=-1"),
    ("select.probe={lr_mixer: 1}", r"^select\.probe\.lr_mixer=1: unknown setting"),
    ("select.probe={tokens: 1000, seq_len: 1024, global_batch: 8}",
     r"^select\.probe\.tokens=1000: gives a probe zero optimizer steps.* 8192 tokens"),
    ("select.halving_keep=0", r"^select\.halving_keep=0: a positive number"),
    ("select.halving_first_tokens=-5", r"^select\.halving_first_tokens=-5: a positive number"),
    ("finetune.teacher_overlap=true", r"^finetune\.teacher_overlap=True: applies to stage kl only"),
    ("align.teacher_overlap=true", r"^align\.teacher_overlap=True: applies to stage kl only"),
    ("kl.lr_rest=.nan", r"^kl\.lr_rest=nan: must be a finite number"),  # (NaN passed the >= 0 checks)
    ("kl.clip=.inf", r"^kl\.clip=inf: must be a finite number \(0 turns gradient clipping off\)"),
    ("kl.temperature=.inf", r"^kl\.temperature=inf: must be a finite number"),
    ("kl.ce_weight=-1", r"^kl\.ce_weight=-1(\.0)?: must not be negative .*raise the CE"),
    ("finetune.ce_weight=0.5", r"^finetune\.ce_weight=0\.5: stage finetune trains on the next-token CE alone"),
    ("finetune.temperature=2", r"^finetune\.temperature=2(\.0)?: stage finetune trains on the next-token CE alone"),
])
def test_optimizer_evaluation_and_job_settings_are_checked(override, message):
    """Settings torch or the trainer would otherwise take until a model is built (a one-beta AdamW fails inside
    torch; a negative eval_sequences meant "all held-out rows but N"; a zero timeout failed the first collective)."""
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_selection_specs_take_whole_k_and_numeric_ratio(tmp_path):
    from ds_hybrid.selection import make_selection, write_selection

    path = tmp_path / "selection.json"
    write_selection(path, make_selection("ga_s2", {0: 0.1, 1: 0.4, 2: 0.3, 3: 0.2}, False, 4))  # ranking 1, 2, 3, 0
    assert resolve_softmax_layers({"selection": str(path), "k": 2}, 4) == [1, 2]
    assert resolve_softmax_layers({"selection": str(path), "ratio": 0.25}, 4) == [1]
    for spec, field in (({"k": 2.7}, "k"), ({"k": "abc"}, "k"), ({"k": True}, "k"), ({"ratio": "abc"}, "ratio")):
        with pytest.raises(ConfigError, match=rf"^softmax_layers\.{field}="):
            resolve_softmax_layers({"selection": str(path), **spec}, 4)
    with pytest.raises(ConfigError, match=r"^softmax_layers=.*unknown key\(s\) \['foo'\]"):
        resolve_softmax_layers({"uniform": 0.25, "foo": 1}, 4)
    with pytest.raises(ConfigError, match=r"run stage select first \(it writes <out_dir>/select/<method>/selection"):
        resolve_softmax_layers({"selection": str(tmp_path / "none.json"), "k": 1}, 4)


def test_a_missing_teacher_path_is_not_sent_to_the_hub(tmp_path, monkeypatch):
    """A path-shaped teacher that does not exist is refused at once (relative ones too); an org/name that no folder
    and no hub gives is refused naming the field, not with the hub client's traceback."""
    from ds_hybrid.teacher import load_teacher_config, resolve_teacher

    import ds_hybrid.teacher as teacher_module

    monkeypatch.chdir(tmp_path)
    for spec in ("models/qwen/7b", "./qwen", "C:\\models\\qwen"):
        with pytest.raises(ConfigError, match=rf"^teacher=.*no such folder \(relative paths start at "
                                              rf"{re.escape(str(tmp_path))}\)"):
            resolve_teacher(spec)
    with pytest.raises(ConfigError, match=r"^teacher='~/nope/x': no such folder; give a local HF model folder"):
        resolve_teacher("~/nope/x")

    def no_hub(*args, **kwargs):  # what transformers raises when neither a folder nor the hub has the model
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")

    monkeypatch.setattr(teacher_module.AutoConfig, "from_pretrained", no_hub)
    with pytest.raises(ConfigError, match=r"^teacher='nobody/nothing': not a folder here .* not a model the hub gave "
                                          r"\(We couldn't connect"):
        load_teacher_config("nobody/nothing")
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"^teacher='broken': its config.json could not be read"):
        load_teacher_config("broken")


def test_plan_refuses_an_empty_cluster_and_names_the_training_stages(monkeypatch):
    from ds_hybrid.plan import main

    monkeypatch.setattr("ds_hybrid.plan.plan_for", lambda *a, **k: pytest.fail("planned"))  # refused before
    config = str(REPO / "runs" / "smollm2_quickstart.yaml")
    for argv, message in ((["--nodes", "0"], r"^--nodes=0: plan for at least 1"),
                          (["--gpus-per-node", "-1"], r"^--gpus-per-node=-1"),
                          (["--gpu-gib", "0"], r"^--gpu-gib=0\.0: one GPU's memory"),
                          (["--dtype-bytes", "3"], r"^--dtype-bytes=3: 2 \(bf16")):
        with pytest.raises(ConfigError, match=message):
            main(["--config", config, *argv])
    with pytest.raises(ConfigError, match=r"^--stage='select': choose one of the training stages \('align', 'kl', "
                                          r"'finetune'\)"):
        main(["--config", config, "--stage", "select"])


def in_this_process(monkeypatch) -> None:
    """run_stage / run_select inside pytest's process: no process group (it would set RANK and MASTER_PORT for the
    worker's later subprocesses) and pytest's log capture left in place."""
    from ds_hybrid import distributed, trainer
    from ds_hybrid.stages import select

    monkeypatch.setattr(distributed, "init_distributed", lambda *a, **k: None)
    monkeypatch.setattr(trainer, "setup_logging", lambda *a, **k: None)
    monkeypatch.setattr(select, "setup_logging", lambda *a, **k: None)


def test_kl_stage_refusals_come_before_the_data_and_the_models(tmp_path, monkeypatch):
    """The previous stage's missing export, the Triton kernel without a GPU (or its interpreter) and the teacher
    overlap with a ZeRO-3 teacher: refused by run_stage before the corpus is tokenized or a model is built."""
    from ds_hybrid import trainer
    from ds_hybrid.stages import kl as kl_stage

    in_this_process(monkeypatch)
    teacher = make_tiny_teacher(tmp_path / "t")
    monkeypatch.setattr(trainer, "prepare_streams", lambda *a, **k: pytest.fail("the corpus was read"))
    monkeypatch.setattr(kl_stage, "build_teacher_engine", lambda *a, **k: pytest.fail("the teacher was built"))
    base = [f"teacher={teacher}", f"out_dir={tmp_path / 'out'}", "kl.tokens=64", "kl.seq_len=32", "kl.global_batch=2",
            "kl.micro_batch=1", "kl.ds_config=ds_configs/single.json", "kl.teacher_ds_config=ds_configs/single.json"]
    with pytest.raises(ConfigError, match=r"^kl\.init_from='.*/out/align/hf': no HF export there: run the previous"):
        trainer.run_stage(load_config(None, base), "kl")
    export = tmp_path / "export"
    from transformers import AutoModelForCausalLM

    from ds_hybrid.transfer import build_hybrid

    build_hybrid(AutoModelForCausalLM.from_pretrained(teacher), [], "gdn").save_pretrained(export)
    base.append(f"kl.init_from={export}")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"^kl\.kl_backend='triton': the Triton kernel needs a CUDA GPU"):
        trainer.run_stage(load_config(None, [*base, "kl.kl_backend=triton"]), "kl")
    with pytest.raises(ConfigError, match=r"^kl\.teacher_overlap=True: not with a ZeRO-3 teacher"):
        trainer.run_stage(load_config(None, [*base, "kl.teacher_overlap=true",
                                             "kl.teacher_ds_config=ds_configs/teacher_zero3.json"]), "kl")
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the interpreter runs the kernel on CPU: accepted (the tests' way)
    with pytest.raises(pytest.fail.Exception, match="the corpus was read"):
        trainer.run_stage(load_config(None, [*base, "kl.kl_backend=triton"]), "kl")


def test_generate_eval_and_bench_infer_check_their_arguments_before_loading(tmp_path, capsys, monkeypatch):
    """A missing model folder, a bad length list or count: exit 2 with the option named, before any model is read
    (the loaders are made to fail if called)."""
    import transformers

    from ds_hybrid.cli import main

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: pytest.fail("a model was loaded"))
    model = make_tiny_teacher(tmp_path / "m")
    capsys.readouterr()  # (the save's progress bar)
    cases = [
        (["generate", "--model", str(tmp_path / "none"), "--prompt", "hi"], r"--model='.*none': no such folder"),
        (["generate", "--model", str(model), "--prompt", "hi", "--max-new-tokens", "0"], r"--max-new-tokens=0"),
        (["eval", "--model", str(tmp_path / "none"), "--teacher", "embedded"], r"--model='.*none': no such folder"),
        (["eval", "--model", str(model), "--teacher", str(tmp_path / "t")], r"--teacher='.*t': no such folder"),
        (["eval", "--model", str(tmp_path)], r"--model='.*': this folder has no config.json"),
        (["eval", "--model", "nobody/nothing"], r"--model='nobody/nothing': not an HF model folder"),
        (["eval", "--model", str(model), "--lengths", "2048,abc"], r"--lengths='2048,abc': give comma-separated"),
        (["eval", "--model", str(model), "--lengths", "-5"], r"--lengths='-5'"),
        (["eval", "--model", str(model), "--limit", "0"], r"--limit=0: must be a positive integer"),
        (["bench-infer", "--model", str(model), "--contexts", "0"], r"--contexts='0'"),
        (["bench-infer", "--model", str(model), "--decode-tokens", "0"], r"--decode-tokens=0"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert re.search(r"^ds-hybrid: error: " + message, err, re.M), (argv, err)


def test_stage_select_checks_the_throughput_knobs(tmp_path, monkeypatch):
    from ds_hybrid.stages.select import run_select

    in_this_process(monkeypatch)
    monkeypatch.setenv("DS_HYBRID_SDPA", "flashh")
    with pytest.raises(ConfigError, match=r"^DS_HYBRID_SDPA='flashh': choose one of"):
        run_select(load_config(None, [f"out_dir={tmp_path}", "select.method=uniform"]))


def test_plan_takes_a_selection_not_made_yet_as_uniform_with_its_k(tmp_path):
    """`ds-hybrid plan` before stage select: a missing selection plans its K layers spaced uniformly; a bad k or
    ratio is refused as a run would refuse it (not planned as some other count)."""
    from ds_hybrid.plan import planned_softmax_layers

    missing = str(tmp_path / "select" / "ga_s2" / "selection.json")

    def planned(spec: str) -> list[int]:
        return planned_softmax_layers(load_config(None, [f"softmax_layers={{selection: {missing}, {spec}}}"]), 30)

    assert planned("k: 4") == [0, 7, 15, 22]
    assert planned("ratio: 0.25") == [0, 3, 7, 11, 15, 18, 22, 26]
    for bad, field in (("k: 2.7", "k"), ("k: abc", "k"), ("ratio: 2", "ratio")):
        with pytest.raises(ConfigError, match=rf"^softmax_layers\.{field}="):
            planned(bad)
    with pytest.raises(ConfigError, match=r"^softmax_layers=.*write \{selection: <path>, k: <K>\}"):
        planned_softmax_layers(load_config(None, [f"softmax_layers={{selection: {missing}}}"]), 30)


@pytest.mark.parametrize("path", sorted((REPO / "runs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_run_config_passes_the_checks(path, caplog):
    """What the checks refuse, no shipped run config holds: each loads, and each stage it budgets passes the launch
    checks on one GPU (its DeepSpeed files found, its batch split, its init_from a folder where one is named), and
    none is warned of (a warmup as long as the stage: the quickstart's finetune had 10 steps of 10 warmup steps)."""
    cfg = load_config(path)
    for stage in ("align", "kl", "finetune"):
        s = cfg.stage(stage)
        if s.tokens and (s.init_from is None or s.init_from == "teacher"):
            with caplog.at_level(logging.WARNING, logger="ds_hybrid.config"):
                validate_for_launch(cfg, stage, 1)
    assert not caplog.records, [r.getMessage() for r in caplog.records]


def test_a_warmup_as_long_as_the_stage_is_warned_of_once(caplog, monkeypatch):
    cfg = load_config(None, ["finetune.tokens=262144", "finetune.seq_len=4096", "finetune.global_batch=32"])
    with caplog.at_level(logging.WARNING, logger="ds_hybrid.config"):
        validate_for_launch(cfg, "finetune", 1)  # 2 steps, the default 10 warmup steps
        monkeypatch.setenv("RANK", "1")  # the other ranks validate the same config in silence
        validate_for_launch(cfg, "finetune", 2)
    (said,) = [r.getMessage() for r in caplog.records]
    assert "finetune.warmup_steps=10 >= the stage's 2 steps" in said and "never reaches 1e-05 (at most 2e-06)" in said


def test_the_tools_refuse_bad_outputs_and_inputs_before_writing(tmp_path, monkeypatch):
    """convert, eval-merge, recall-vs-k: an --out that is a file, a malformed eval.json, a rename of a model the file
    lacks, two different models under one name, a merge onto its own input, a task no model scored, a selection named
    twice: each refused with the option named, nothing written."""
    from ds_hybrid.cli import build_parser
    from ds_hybrid.evaluation import by_k, merge

    monkeypatch.setattr("ds_hybrid.teacher.load_teacher", lambda *a, **k: pytest.fail("the teacher was loaded"))
    afile = tmp_path / "afile"
    afile.write_text("x")
    for out in (afile, afile / "sub"):
        with pytest.raises(ConfigError, match=rf"^--out='{re.escape(str(out))}': .*afile is a file, not a folder"):
            args = build_parser().parse_args(["convert", "--ratio", "0.25", "--out", str(out)])
            args.fn(args)  # (ds-hybrid's main prints the error and returns 2)

    def evaluation(folder, model, layers, score, length=2048, **record):
        folder.mkdir(parents=True)
        (folder / "eval.json").write_text(json.dumps({
            "lengths": [length], "tasks": ["niah_single_1"], "scores": {model: {"niah_single_1": {str(length): score}}},
            "prompts": {model: {"niah_single_1": {str(length): 100}}}, "heldout_quality": {},
            "models": {model: {"model_type": "ds_hybrid", "num_layers": 30, "softmax_layers": layers, "mixer": "gdn",
                               **record}}}))
        return folder

    a = evaluation(tmp_path / "a", "hyb", [0, 3], 0.5)
    b = evaluation(tmp_path / "b", "hyb", [2, 5], 0.7, 4096)  # another length: only the layers tell them apart
    with pytest.raises(ConfigError, match=r"model hyb here is not the hyb of an earlier file"):
        merge.merge([str(a), str(b)])
    # the same layers, other weights (two seeds: every export is a folder named hf) or other mixer options: refused
    # where both records say so; a record without them (older) and one with them join, as do other kernel backends
    w1 = evaluation(tmp_path / "w1", "hyb", [0, 3], 0.5, weights="aaaa", mixer_options={"use_gate": True,
                                                                                        "backend": "fla"})
    w2 = evaluation(tmp_path / "w2", "hyb", [0, 3], 0.7, 4096, weights="bbbb")
    with pytest.raises(ConfigError, match=r"model hyb here is not the hyb .*\(weights bbbb against aaaa"):
        merge.merge([str(w1), str(w2)])
    m3 = evaluation(tmp_path / "m3", "hyb", [0, 3], 0.7, 4096, mixer_options={"use_gate": False})
    with pytest.raises(ConfigError, match=r"\(mixer options use_gate: False against True\)"):
        merge.merge([str(w1), str(m3)])
    # an option an older record lacks is at its default (grouped_kv came later); one the mixer never reads is none
    g = evaluation(tmp_path / "g", "hyb", [0, 3], 0.7, 4096, mixer_options={"use_gate": True, "grouped_kv": True})
    with pytest.raises(ConfigError, match=r"\(mixer options grouped_kv: True against None\)"):
        merge.merge([str(w1), str(g)])
    b4 = evaluation(tmp_path / "b4", "hyb", [0, 3], 0.7, 4096, weights="aaaa",
                    mixer_options={"use_gate": True, "backend": "torch", "grouped_kv": False,
                                   "gate_low_rank_dim": 99})
    joined = merge.merge([str(a), str(w1), str(b4)])
    assert joined["models"]["hyb"]["weights"] == "aaaa" and set(joined["scores"]["hyb"]["niah_single_1"]) == {
        "2048", "4096"}
    assert merge.merge([str(a), f"other=hyb@{b}"])["scores"]["other"]["niah_single_1"]["4096"] == 0.7
    with pytest.raises(ConfigError, match=r"renames \['nosuch'\], which .* does not hold"):
        merge.merge([str(a), f"x=nosuch@{b}"])
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "eval.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"not valid JSON"):
        merge.merge([str(bad)])
    (bad / "eval.json").write_text(json.dumps({"scores": [1]}))
    with pytest.raises(ConfigError, match=r"its 'scores' are not"):
        merge.merge([str(bad)])
    with pytest.raises(ConfigError, match=r"^--out=.*afile is a file"):
        merge.main([str(a), "--out", str(afile)])
    with pytest.raises(ConfigError, match=r"^--out=.*is one of the evals being merged"):
        merge.main([str(a), "--out", str(a)])
    (bad / "eval.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"^recall-vs-k=.*not valid JSON"):
        by_k.main([str(bad), "--out", str(tmp_path / "k")])
    with pytest.raises(ConfigError, match=r"^recall-vs-k --task='nosuch': no model has a score for it"):
        by_k.main([str(a), "--task", "nosuch", "--out", str(tmp_path / "k")])
    sel = REPO / "docs" / "data" / "gpu_select_ga_s2_h200.json"
    with pytest.raises(ConfigError, match=r"^recall-vs-k --selection=.*a name of its own"):
        by_k.main([str(a), "--selection", f"g={sel}", "--selection", f"g={sel}", "--out", str(tmp_path / "k")])
    assert not (tmp_path / "k").exists()  # refused before writing anything


def test_run_local_checks_its_stages_ranks_and_config_before_running(tmp_path):
    script = str(REPO / "launchers" / "run_local.sh")
    env = {**__import__("os").environ, "PYTHON": sys.executable}
    for extra, args, message in (({"NPROC": "0"}, [], "NPROC='0': the number of ranks"),
                                 ({"NPROC": "1"}, ["align,kll"], "STAGES='align,kll': no stage 'kll'"),
                                 ({"NPROC": "1"}, ["kl", "kl.tokens=abc"], "kl.tokens='abc': expected int"),
                                 ({"NPROC": "1"}, ["align,select,kl", f"out_dir={tmp_path / 'r'}"],
                                  "softmax_layers={'uniform': 0.25}: stage select writes its ranking"),
                                 # (the Slurm launcher's SELECT_ARRAY in the shell does not reach run_local's check)
                                 ({"NPROC": "1", "SELECT_ARRAY": "16"},
                                  ["align,select,kl", "select.method=proxy", f"out_dir={tmp_path / 'r'}"],
                                  "softmax_layers={'uniform': 0.25}: stage select writes its ranking to")):
        p = subprocess_run(["bash", script, str(REPO / "runs" / "smollm2_quickstart.yaml"), *args], {**env, **extra},
                           tmp_path)
        assert p.returncode == 2 and f"ds-hybrid: error: {message}" in p.stderr, p.stderr[-2000:]
        assert "Traceback" not in p.stderr
    p = subprocess_run(["bash", script, str(tmp_path / "none.yaml")], {**env, "NPROC": "1"}, tmp_path)
    assert p.returncode == 2 and "--config=" in p.stderr and "no such file" in p.stderr, p.stderr[-2000:]


def subprocess_run(argv, env, cwd):
    import subprocess

    return subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True, timeout=300)


def test_corpus_and_extract_text_check_their_options_first(tmp_path, monkeypatch):
    """corpus build/stats/pack and extract-text: an unknown source, zero processes or part size, an --out under a file,
    a NaN shard size, a malformed config.json: refused before the corpus is built, tokenized or packed (pack no
    longer deletes the old parts first) and before a tensor is read."""
    from ds_hybrid.corpus import tools
    from ds_hybrid.text_extract import main as extract_main

    for name in ("build_embedded", "ensure_embedded", "stats", "pack"):
        monkeypatch.setattr(f"ds_hybrid.corpus.{'tools.' if name in ('stats', 'pack') else ''}{name}",
                            lambda *a, **k: pytest.fail("the corpus was touched"), raising=True)
    afile = tmp_path / "afile"
    afile.write_text("x")
    old = tmp_path / "parts"
    old.mkdir()
    (old / "corpus.tar.xz.00").write_text("keep")
    for argv, message in ((["build", "--force", "--sources", "gcide,nosuch"], r"^--sources=.*no source\(s\) \['nosuch'\]"),
                          (["stats", "--num-proc", "0"], r"^--num-proc=0"),
                          (["stats", "--out", str(afile / "t.md")], r"^--out=.*afile is a file"),
                          (["pack", "--out", str(old), "--part-mb", "-1"], r"^--part-mb=-1"),
                          (["pack", "--out", str(afile)], r"^--out=.*afile is a file")):
        with pytest.raises(ConfigError, match=message):
            tools.main(argv)
    assert (old / "corpus.tar.xz.00").read_text() == "keep"
    for bad in ("nan", "inf", "0"):
        with pytest.raises(ConfigError, match=r"^--shard-gib="):
            extract_main(["--model", str(tmp_path), "--out", str(tmp_path / "o"), "--shard-gib", bad])
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"^--model=.*its config.json is not valid JSON"):
        extract_main(["--model", str(tmp_path), "--out", str(tmp_path / "o")])


def test_the_sbatch_examples_of_the_docs_pass_the_launch_checks():
    """Every `sbatch [--nodes=N] launchers/distill_70b.slurm ...` example in docs/SCALE.md and the launcher's header,
    with its overrides and 8 ranks a node, passes the checks its job makes before any model is built."""
    from ds_hybrid import launch

    text = (REPO / "docs" / "SCALE.md").read_text() + (REPO / "launchers" / "distill_70b.slurm").read_text()
    text = re.sub(r"\\\n#?\s*", " ", text)  # continued lines joined
    examples = re.findall(r"sbatch (?:--nodes=(\d+) )?launchers/distill_70b\.slurm([^#\n`]*)", text)
    assert len(examples) >= 6, examples
    for nodes, args in examples:
        words = args.split()
        launcher = dict(w.split("=", 1) for w in words if re.match(r"[A-Z_]+=", w))
        overrides = [w for w in words if re.match(r"[a-z_.]+=", w)]
        config = launcher.get("CONFIG", "runs/llama3_70b_gdn.yaml")
        if config != "runs/llama3_70b_gdn.yaml":  # (placeholders such as runs/x.yaml)
            continue
        cfg = load_config(REPO / config, overrides)
        launch.check_pipeline(cfg, launcher.get("STAGES", "align,select,kl,finetune,eval").split(","),
                              8 * int(nodes or 4), int(launcher.get("SELECT_ARRAY", 0)))


def test_a_launchers_pipeline_check_finds_what_would_stop_or_misdirect_a_later_stage(tmp_path, monkeypatch):
    """ds_hybrid.launch, run by both launchers before their first stage: kl must read the selection that stage select
    writes (not the config's uniform spacing, not another method's file), select's probes are checked against the
    ranks like a stage (the error names select.probe.*), halving is refused as a job array, unknown stages named."""
    from ds_hybrid import launch

    cfg = load_config(None, [f"out_dir={tmp_path / 'run'}"])
    sel = tmp_path / "run" / "select" / cfg.select.method / "selection.json"
    with pytest.raises(ConfigError, match=rf"^softmax_layers=.*select writes its ranking to {re.escape(str(sel))} and "
                                          r"kl would train .*softmax_layers\.ratio=<r>"):
        launch.check_pipeline(cfg, ["align", "select", "kl"], 1)
    launch.check_pipeline(cfg, ["align", "kl"], 1)  # no select: the config's layers are what the user asked for
    other = load_config(None, [f"out_dir={tmp_path / 'run'}", f"softmax_layers.selection={tmp_path}/run/select/ppl/selection.json",
                               "softmax_layers.k=2"])
    with pytest.raises(ConfigError, match=r"kl would read .*/select/ppl/selection.json instead"):
        launch.check_pipeline(other, ["select", "kl"], 1)
    wired = load_config(None, [f"out_dir={tmp_path / 'run'}", f"softmax_layers.selection={sel}", "softmax_layers.k=2"])
    launch.check_pipeline(wired, ["align", "select", "kl", "finetune"], 1)
    # the override the error suggests without its k or ratio: kl would stop on it after align and select
    # (since 2026-12-07 refused with the run config: its form needs no teacher)
    with pytest.raises(ConfigError, match=r"^softmax_layers=.*write \{selection: <path>, k: <K>\}"):
        load_config(None, [f"out_dir={tmp_path / 'run'}", f"softmax_layers.selection={sel}"])
    (tmp_path / "run" / "kl").mkdir(parents=True)
    (tmp_path / "run" / "kl" / "DONE").write_text("{}")
    launch.check_pipeline(cfg, ["align", "select", "kl"], 1)  # kl done: nothing left to misdirect
    with pytest.raises(ConfigError, match=r"^STAGES='align,eval,kll': no stage 'kll'"):
        launch.check_pipeline(cfg, ["align", "eval", "kll"], 1)
    with pytest.raises(ConfigError, match=r"^STAGES=.*no stage 'eval'"):
        launch.check_pipeline(cfg, ["eval"], 1, known=("align", "select", "kl", "finetune"))
    big = load_config(REPO / "runs" / "llama3_70b_gdn.yaml",
                      ["align.global_batch=192", "kl.global_batch=64", "finetune.global_batch=64"])
    big.out_dir = str(tmp_path / "big")
    big.softmax_layers = {"selection": str(tmp_path / "big" / "select" / "halving" / "selection.json"), "ratio": 0.125}
    with pytest.raises(ConfigError, match=r"^select\.probe\.global_batch=32: must be a multiple of .* = 64"):
        launch.check_pipeline(big, ["align", "select", "kl"], 64)
    launch.check_pipeline(big, ["align", "kl"], 64)
    big.select.probe["global_batch"] = 64
    launch.check_pipeline(big, ["align", "select", "kl"], 64)
    with pytest.raises(ConfigError, match=r"^SELECT_ARRAY=16: select.method=halving: its rounds need every task"):
        launch.check_pipeline(big, ["select", "kl"], 64, select_array=16)
    big.select.method = "proxy"
    with pytest.raises(ConfigError, match=r"^SELECT_ARRAY=4: select.method=proxy has no probes to share out"):
        launch.check_pipeline(big, ["select"], 64, select_array=4)
    # another probe score or a distance-regularized ranking is written beside the method's plain one: kl reads that
    rec = load_config(None, [f"out_dir={tmp_path / 'rec'}", "select.score=recall", "select.distance_reg=0.5",
                             f"softmax_layers.selection={tmp_path}/rec/select/ga_s2/score_recall/distance_reg_0.5/selection.json",
                             "softmax_layers.k=2"])
    with pytest.raises(ConfigError, match=r"^STAGES='select,kl': select.method=ga_s2 reads stage align's export "
                                          r".*/rec/align/hf, which is not there, and align is not among the stages"):
        launch.check_pipeline(rec, ["select", "kl"], 1)
    (tmp_path / "rec" / "align" / "hf").mkdir(parents=True)
    (tmp_path / "rec" / "align" / "hf" / "config.json").write_text("{}")  # (align ran in an earlier job)
    launch.check_pipeline(rec, ["select", "kl"], 1)
    # select's own checks against the teacher, before align runs (they came when select started, after align)
    for bad, field in (("select.probe.seq_len=100000", r"select\.probe\.seq_len"),
                       ("select.method=keep_global", r"select\.method"),
                       (f"select.reference={tmp_path / 'none.json'}", r"select\.reference")):
        wrong = load_config(None, [f"out_dir={tmp_path / 'early'}", bad])
        with pytest.raises(ConfigError, match=rf"^{field}="):
            launch.check_pipeline(wrong, ["align", "select"], 1)
    rec.softmax_layers["selection"] = str(tmp_path / "rec" / "select" / "ga_s2" / "selection.json")
    with pytest.raises(ConfigError, match=r"writes its ranking to .*/score_recall/distance_reg_0.5/selection.json"):
        launch.check_pipeline(rec, ["select", "kl"], 1)


def test_the_launch_check_leaves_an_eval_that_cannot_fit_out_of_the_default_stages_and_refuses_it_when_named(
        tmp_path, monkeypatch, capsys):
    from ds_hybrid import launch

    monkeypatch.setattr(launch, "eval_fits", lambda cfg, args=(): (False, "stage eval loads each model whole on one GPU"))
    args = [str(REPO / "runs" / "smollm2_quickstart.yaml"), "align,kl,eval", f"out_dir={tmp_path}"]
    monkeypatch.setenv("STAGES_DEFAULT", "1")
    assert launch.main(args) == 0
    out, err = capsys.readouterr()
    assert out.splitlines() == [str(tmp_path), "ga_s2", "embedded", "align,kl",
                                str(tmp_path / "select" / "ga_s2" / "selection.json")] and "eval left out" in err
    monkeypatch.setenv("STAGES_DEFAULT", "0")
    assert launch.main(args) == 2
    assert "config error: STAGES='align,kl,eval': stage eval loads each model whole" in capsys.readouterr().err
    monkeypatch.setattr(launch, "eval_fits", lambda cfg, args=(): (True, ""))
    assert launch.main(args) == 0 and capsys.readouterr().out.splitlines()[-2] == "align,kl,eval"
    monkeypatch.setenv("LAUNCH_RANKS", "3")  # the job's ranks (not SLURM_NTASKS of an allocation run_local is inside)
    monkeypatch.setenv("SLURM_NTASKS", "4")
    monkeypatch.setenv("ERROR_PREFIX", "ds-hybrid: error: ")
    assert launch.main(args) == 2
    assert capsys.readouterr().err.startswith("ds-hybrid: error: align.global_batch=4: must be a multiple of the world size 3")
    # what the launchers pass that is not a setting: named, no traceback
    monkeypatch.setenv("LAUNCH_RANKS", "1")
    assert launch.main([args[0], ",", *args[2:]]) == 2
    assert capsys.readouterr().err.startswith("ds-hybrid: error: STAGES=',': name the stages to run")
    monkeypatch.setenv("LAUNCH_RANKS", "\u00b2")  # (a digit to str.isdigit, not to int)
    assert launch.main(args) == 2 and "LAUNCH_RANKS='\u00b2'" in capsys.readouterr().err
    monkeypatch.setenv("LAUNCH_RANKS", "1")
    monkeypatch.setenv("EVAL_ARGS", '--haystack "/x')
    assert launch.main(args) == 2 and "EVAL_ARGS=" in capsys.readouterr().err
    # a quoted path with a space: one word to a shell-like split, two to the launcher's (it splits at spaces)
    monkeypatch.setenv("EVAL_ARGS", '--haystack "/data/my essays"')
    assert launch.main(args) == 2 and "the launcher splits it at spaces, with no quoting" in capsys.readouterr().err
    monkeypatch.delenv("EVAL_ARGS")
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "eval.json").write_text("[]")  # (not what eval writes: not done, no traceback)
    assert not launch.eval_done(load_config(None, [f"out_dir={tmp_path}"]))


def test_the_eval_fit_counts_teacher_and_hybrid_together_where_quality_keeps_the_teacher_loaded(monkeypatch):
    from types import SimpleNamespace

    import torch

    from ds_hybrid import launch

    cfg = load_config(None, [])
    both, one = launch.eval_weights_gib(cfg, True), launch.eval_weights_gib(cfg, False)
    # the parameter counts of the loaded HF models (docs/data/compare_smollm2_merged/eval.json): the SmolLM2-135M
    # teacher 134,515,008, its uniform 1/4 hybrid 151,776,076; 2 bytes each
    assert (both, one) == ((134_515_008 + 151_776_076) * 2 / 2**30, 151_776_076 * 2 / 2**30)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace(total_memory=int(0.5 * 2**30)))
    fits, why = launch.eval_fits(cfg, [])
    assert not fits and "teacher and hybrid on one GPU" in why and "--no-quality" in why
    assert not launch.eval_fits(cfg, ["--device", "auto"])[0]  # (eval's default device: the GPU where there is one)
    assert launch.eval_fits(cfg, ["--no-quality"]) == (True, "")  # one model at a time fits 0.5 GiB
    assert launch.eval_fits(cfg, ["--device", "cpu"]) == (True, "")
    assert not launch.eval_fits(cfg, ["--device=cuda:0"])[0]
    fits, why = launch.eval_fits(cfg, ["--no-quality", "--dtype", "fp32"])  # 4 bytes a weight: 0.57 GiB
    assert not fits and "32-bit" in why
    # where no model fits alone, --no-quality is not offered as the way out
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace(total_memory=int(0.25 * 2**30)))
    fits, why = launch.eval_fits(cfg, [])
    assert not fits and "each model whole" in why and "--no-quality" not in why


def test_plan_counts_the_checkpoints_the_trainer_saves():
    """`ds-hybrid plan`'s steps and checkpoints line: its closed-form count equals the trainer's save rule
    (config.checkpoint_due) summed over every step, and a budget raised alone on a CPU-sized batch is called out."""
    from ds_hybrid.config import RunConfig, checkpoint_due, stage_steps
    from ds_hybrid.plan import schedule_line

    cfg = RunConfig()
    for tokens, every, keep, export in [(40960, 20, 2, True), (40960, 7, 0, False), (4096, 20, 2, True),
                                        (1024, 1, 0, True), (10240, 10, 0, False), (5e7, 20, 2, True)]:
        cfg.align.tokens, cfg.align.seq_len, cfg.align.global_batch = int(tokens), 256, 4
        cfg.align.ckpt_every, cfg.align.keep_checkpoints, cfg.align.export = every, keep, export
        steps = stage_steps(cfg.align)
        saves = sum(checkpoint_due(d, steps, cfg.align) for d in range(1, steps + 1))
        line = schedule_line(cfg, "align")
        assert f"steps: {steps:,} " in line and f"checkpoints: {saves:,} (" in line, (line, saves)
        assert ("many; raise align.ckpt_every" in line) == (saves > 100)
    cfg.align.ckpt_every = 0
    assert schedule_line(cfg, "align").endswith("checkpoints: none (ckpt_every 0)")


def test_settings_a_stage_never_reads_are_refused_by_name():
    """align has no logits, no LM loss and no blocks to recompute; a probe's scoring settings are select's: setting
    them where they are ignored is refused (once silently dropped); the same settings where they are read load."""
    from ds_hybrid.config import ALIGN_UNUSED, PROBE_SET_BY_SELECT

    values = {"temperature": 2, "ce_weight": 0.5, "loss_chunk_tokens": 512, "kl_backend": "triton",
              "fp32_logits": "true", "dw_fp32": "false", "gradient_checkpointing": "true", "eval_recall": 16,
              "init_from": "/x/hf"}  # (align always starts from the teacher: an init_from there was ignored)
    assert set(values) == set(ALIGN_UNUSED)
    for f, v in values.items():
        with pytest.raises(ConfigError, match=rf"^align\.{f}=.*stage align does not use it"):
            load_config(None, [f"align.{f}={v}"])
        load_config(None, [f"kl.{f}={v}"])  # (read by kl)
    default = load_config(None, [f"align.{f}={getattr(load_config(None, []).align, f)}" for f in ("kl_backend",)])
    assert default.align.kl_backend == "auto"  # (its default value, written out: accepted)
    probe = {"eval_sequences": 64, "eval_recall": 32, "ce_weight": 0.5, "init_from": "/x/hf", "export": "true",
             "eval_at_start": "true", "keep_checkpoints": 3}
    assert set(probe) == set(PROBE_SET_BY_SELECT)
    for f, v in probe.items():
        with pytest.raises(ConfigError, match=rf"^select\.probe\.{f}=.*stage select sets it for every probe"):
            load_config(None, [f"select.probe.{f}={v}"])
    assert load_config(None, ["select.probe.tokens=65536", "select.eval_sequences=8"]).select.eval_sequences == 8


def test_deepspeed_json_values_that_contradict_the_run_config_are_refused_before_any_model(tmp_path):
    """A DeepSpeed JSON's fixed batch, micro-batch, clipping or bf16 against the run config: refused by the launch
    check (before the corpus and the teacher), as stages.common.deepspeed_config refuses them once the models exist;
    the same values agreeing with the run config, or "auto", pass both."""
    import torch

    from ds_hybrid.stages.common import deepspeed_config

    base = json.loads((REPO / "ds_configs" / "student_zero1.json").read_text())

    def cfg_with(mod, *extra):
        p = tmp_path / f"ds{len(list(tmp_path.iterdir()))}.json"
        p.write_text(json.dumps({**base, **mod}))
        return load_config(None, [f"kl.ds_config={p}", "dtype=bf16", *extra]), str(p)

    for mod, extra, match in [({"train_batch_size": 64}, (), r"train_batch_size=64 contradicts the run config \(32"),
                              ({"gradient_clipping": 0.5}, (), r"gradient_clipping=0.5 contradicts .*\(1.0"),
                              ({"bf16": {"enabled": False}}, (), r"bf16.enabled=False contradicts the run's dtype bf16"),
                              ({"train_micro_batch_size_per_gpu": 2}, ("kl.micro_batch=4",), r"=2 contradicts .*\(4"),
                              ({"gradient_accumulation_steps": 3}, ("kl.micro_batch=4",), r"=3 contradicts .*\(4,"),
                              ({"train_micro_batch_size_per_gpu": 2}, (), r"is fixed while kl\.micro_batch is auto")]:
        cfg, path = cfg_with(mod, *extra)
        with pytest.raises(ConfigError, match=rf"^kl\.ds_config=.*{match}"):
            validate_for_launch(cfg, "kl", 2, check_init_from=False)
        if cfg.kl.micro_batch != "auto":  # (the check the engines' set-up makes, later: the same verdict)
            with pytest.raises(ConfigError):
                deepspeed_config(path, cfg.kl, 2, torch.bfloat16, 64, "kl.ds_config")
    cfg, path = cfg_with({"train_batch_size": 32, "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 4,
                          "gradient_clipping": 1.0, "bf16": {"enabled": True}}, "kl.micro_batch=4")
    validate_for_launch(cfg, "kl", 2, check_init_from=False)
    assert deepspeed_config(path, cfg.kl, 2, torch.bfloat16, 64, "kl.ds_config")["gradient_accumulation_steps"] == 4


def test_a_corpus_too_small_for_training_rows_names_fixes_that_give_it_more(tmp_path, monkeypatch):
    """No training row at this seq_len: the error's fix adds training text (a shorter row, more text, a higher
    max_documents, a smaller held-out share), never "raise data.val_tokens", which takes text away from training; no
    held-out row: raising val_tokens is the fix. Both before any model is built."""
    import types

    import numpy as np

    from ds_hybrid import trainer
    from ds_hybrid.stages import align as align_stage

    in_this_process(monkeypatch)
    teacher = make_tiny_teacher(tmp_path / "t")
    monkeypatch.setattr(align_stage, "build_teacher_engine", lambda *a, **k: pytest.fail("the teacher was built"))

    def streams(train_tokens, val_tokens):
        return lambda *a, **k: types.SimpleNamespace(
            train=np.arange(train_tokens, dtype=np.int32), val=np.arange(val_tokens, dtype=np.int32),
            meta={"train_tokens": train_tokens, "val_tokens": val_tokens})

    base = [f"teacher={teacher}", f"out_dir={tmp_path / 'out'}", "align.tokens=128", "align.seq_len=32",
            "align.global_batch=2", "align.micro_batch=1", "align.ds_config=ds_configs/single.json",
            "align.teacher_ds_config=ds_configs/single.json", "data.max_documents=50"]
    monkeypatch.setattr(trainer, "prepare_streams", streams(20, 200))
    with pytest.raises(ConfigError, match=r"^align\.seq_len=32: the corpus gives 0 training and 6 held-out .* add "
                                          r"text to data\.source, raise data\.max_documents \(now 50\) or lower "
                                          r"data\.val_tokens") as e:
        trainer.run_stage(load_config(None, base), "align")
    assert "raise data.val_tokens" not in str(e.value)
    monkeypatch.setattr(trainer, "prepare_streams", streams(200, 20))
    with pytest.raises(ConfigError, match=r"gives 6 training and 0 held-out .* raise data\.val_tokens"):
        trainer.run_stage(load_config(None, base), "align")
    # rows there, all of a source that data.mixture weights 0 (b, weighted, has no whole row): the mixture named
    monkeypatch.setattr(trainer, "prepare_streams", lambda *a, **k: types.SimpleNamespace(
        train=[("a", np.arange(200, dtype=np.int32)), ("b", np.arange(10, dtype=np.int32))],
        val=[("a", np.arange(200, dtype=np.int32))], meta={"train_tokens": 210, "val_tokens": 200}))
    with pytest.raises(ConfigError, match=r"^data\.mixture=\{'a': 0, 'b': 1\}: leaves no training rows at "
                                          r"align\.seq_len 32"):
        trainer.run_stage(load_config(None, [*base, "data.mixture={a: 0, b: 1}"]), "align")


def test_attention_implementation_and_peak_tflops_are_checked_at_load():
    """attn_implementation: one transformers runs (its registry, and eager) or a hub kernel's name, else refused at
    load with the choices (transformers' own config accepted any string; the teacher's build failed after the
    corpus); peak_tflops: positive and finite (a negative one logged a negative MFU)."""
    from ds_hybrid.config import attention_implementations

    impls = attention_implementations()
    assert {"eager", "sdpa", "flash_attention_2"} <= set(impls) and not any(i.startswith("paged|") for i in impls)
    for impl in (*impls, "kernels-community/flash-attn"):
        assert load_config(None, [f"attn_implementation={impl}"]).attn_implementation == impl
    with pytest.raises(ConfigError, match=r"^attn_implementation='foo': choose one of \['eager', "):
        load_config(None, ["attn_implementation=foo"])
    for bad in ("-1", "0", ".nan", ".inf"):
        with pytest.raises(ConfigError, match=r"^peak_tflops=.*peak dense TFLOP/s"):
            load_config(None, [f"peak_tflops={bad}"])
    assert load_config(None, ["peak_tflops=989"]).peak_tflops == 989


def test_whole_floats_count_as_ints_wherever_an_int_is_taken():
    """YAML reads 1.0e+6 as a float: taken for a plain int before, refused for int-or-null, int-or-'auto' and the
    elements of a list of ints (with "expected list" for a list); now taken for each, and a fraction still refused
    with the element type named."""
    cfg = load_config(None, ["select.halving_first_tokens=1.0e+6", "data.max_documents=1.0e+3", "kl.micro_batch=2.0",
                             "select.ks=[4.0, 8]", "kl.tokens=1.0e+6"])
    assert (cfg.select.halving_first_tokens, cfg.data.max_documents, cfg.kl.micro_batch, cfg.select.ks,
            cfg.kl.tokens) == (1_000_000, 1000, 2, [4, 8], 1_000_000)
    assert all(type(v) is int for v in (cfg.select.halving_first_tokens, cfg.kl.micro_batch, *cfg.select.ks))
    with pytest.raises(ConfigError, match=r"^select\.ks=\[4\.5\]: expected list of int$"):
        load_config(None, ["select.ks=[4.5]"])
    with pytest.raises(ConfigError, match=r"^kl\.micro_batch=2\.5: expected int or 'auto'$"):
        load_config(None, ["kl.micro_batch=2.5"])
    assert load_config(None, ["select.ratios=[0.25]"]).select.ratios == [0.25]  # (a list of floats keeps them)


def test_input_that_used_to_pass_and_fail_later_or_silently_is_refused_by_name(tmp_path):
    """Caught by a 2026-12-07 review, each refused before any model is built, naming the field:
    - a key given twice in a run YAML (YAML kept the last: a second ``kl:`` section replaced the first whole);
    - an empty override value (YAML's null, "the default": ``teacher=$UNSET`` distilled from the embedded 135M);
    - ``select.distance_reg`` NaN or inf (NaN scores kept the plain ranking under a distance_reg_nan folder);
    - a learning rate that trains nothing (DeepSpeed's group error, after the models, under the field ``lr``);
    and ``softmax_layers.check_origin=false`` keeps the selection it applies to (it replaced it with itself alone)."""
    twice = tmp_path / "twice.yaml"
    twice.write_text("kl:\n  tokens: 1000\n  lr: 1.0e-3\nseed: 1\nkl:\n  lr: 2.0e-3\n")
    with pytest.raises(ConfigError, match=r"^--config=.*twice\.yaml.*'kl' is given twice \(first at line 1\).* at "
                                          r"line 5, column 1"):
        load_config(twice)
    (tmp_path / "inner.yaml").write_text("kl:\n  lr: 1.0e-3\n  lr: 2.0e-3\n")
    with pytest.raises(ConfigError, match=r"'lr' is given twice \(first at line 2\)"):
        load_config(tmp_path / "inner.yaml")
    (tmp_path / "once.yaml").write_text("kl: {tokens: 1000}\nseed: 2\n")
    assert load_config(tmp_path / "once.yaml").kl.tokens == 1000  # (one of each: taken)
    for item in ("teacher=", "kl.init_from= ", "data.max_documents="):
        with pytest.raises(ConfigError, match=rf"^{re.escape(item.split('=')[0])}=.*an empty value \(an unset shell "
                                              r"variable\?\): give a value, or null"):
            load_config(None, [item])
    assert load_config(None, ["kl.init_from=null"]).kl.init_from is None
    for bad in (".nan", ".inf"):
        with pytest.raises(ConfigError, match=r"^select\.distance_reg=.*a finite penalty weight >= 0"):
            load_config(None, [f"select.distance_reg={bad}"])
    for overrides, field in ((["align.lr=0"], "align.lr"), (["kl.lr=0", "kl.lr_rest=0"], "kl.lr"),
                             (["finetune.lr=0", "finetune.lr_rest=0"], "finetune.lr")):
        with pytest.raises(ConfigError, match=rf"^{re.escape(field)}=0(\.0)?: nothing would train"):
            load_config(None, overrides)
    assert load_config(None, ["kl.lr_rest=0"]).kl.lr_rest == 0  # (the rest frozen: the paper's option, taken)
    assert load_config(None, ["kl.lr=0"]).kl.lr == 0  # (attention frozen, the rest training: taken)
    sel = {"softmax_layers": {"selection": "s.json", "k": 8}}
    from ds_hybrid.config import apply_overrides

    assert apply_overrides(sel, ["softmax_layers.check_origin=false"])["softmax_layers"] == {
        "selection": "s.json", "k": 8, "check_origin": False}
    assert apply_overrides(sel, ["softmax_layers.uniform=0.25"])["softmax_layers"] == {"uniform": 0.25}
    # and is kept by a k, ratio or selection override, in any order (kl would refuse the origin after align, select)
    kept = {"softmax_layers": {"selection": "s.json", "ratio": 0.125, "check_origin": False}}
    assert apply_overrides(kept, ["softmax_layers.k=10"])["softmax_layers"] == {
        "selection": "s.json", "check_origin": False, "k": 10}
    assert apply_overrides({}, ["softmax_layers.check_origin=false", "softmax_layers.selection=x.json",
                                "softmax_layers.k=3"])["softmax_layers"] == {
        "check_origin": False, "selection": "x.json", "k": 3}
    # YAML anchors and merge keys may override what they merge, at any depth
    (tmp_path / "anchors.yaml").write_text("kl: &kl {tokens: 1000000, lr: 1.0e-3}\n"
                                           "select: {probe: &p {<<: *kl, lr: 5.0e-4}}\nfinetune: {<<: *p}\n")
    anchored = load_config(tmp_path / "anchors.yaml")
    assert (anchored.select.probe["lr"], anchored.finetune.lr, anchored.finetune.tokens) == (5e-4, 5e-4, 1_000_000)


def test_the_form_of_softmax_layers_is_checked_with_the_run_config():
    """A misspelt form ({unifrom: 0.25}) was taken by every stage that does not read the layers (align, select) and
    refused only when kl started, after them; its form needs neither the teacher nor a selection file, so it is
    refused with the run config, as are non-integer indices and a negative K. Forms that need the teacher (an index
    past its last layer) or the file still wait for them."""
    for spec, why in (("{unifrom: 0.25}", r"^softmax_layers=\{'unifrom': 0\.25\}: unknown key\(s\) \['unifrom'\]"),
                      ("[1, 2.5]", r"^softmax_layers=\[1, 2\.5\]: layer indices must be integers"),
                      ("{uniform: -2}", r"^softmax_layers\.uniform=-2: a layer count K is 0 or more"),
                      ("{uniform: 1.5}", r"^softmax_layers\.uniform=1\.5: a ratio lies in \[0, 1\)"),
                      ("{selection: s.json}", r"^softmax_layers=.*write \{selection: <path>, k: <K>\}"),
                      ("7", r"^softmax_layers=7: use a list of layer indices")):
        with pytest.raises(ConfigError, match=why):
            load_config(None, [f"softmax_layers={spec}"])
    for spec in ("[0, 99]", "{uniform: 8}", "{uniform: 0.25}", "{selection: missing.json, k: 4}", "[]"):
        load_config(None, [f"softmax_layers={spec}"])


def test_the_launch_check_holds_every_stage_still_to_run_to_the_teachers_config(tmp_path, capsys, monkeypatch):
    """What the stages check against the teacher when they start is checked by the launchers before align: a softmax
    layer past the teacher's last, a seq_len past its context, a select K past its layer count, kl's teacher_overlap
    with a ZeRO-3 teacher (each found after align and select before). A teacher folder not on this node is said and
    left to the stages; a teacher that is here and refused (another model family) is refused here too."""
    from ds_hybrid import launch

    teacher = make_tiny_teacher(tmp_path / "teacher")  # (4 layers, 1024 positions)
    base = [f"out_dir={tmp_path / 'run'}", f"teacher={teacher}", "align.seq_len=512", "kl.seq_len=512"]
    launch.check_pipeline(load_config(None, [*base, "softmax_layers=[1, 3]"]), ["align", "kl"], 1)
    with pytest.raises(ConfigError, match=r"^softmax_layers=\[1, 9\]: layer index 9 is out of range; the teacher "
                                          r"has layers 0\.\.3"):
        launch.check_pipeline(load_config(None, [*base, "softmax_layers=[1, 9]"]), ["align", "kl"], 1)
    launch.check_pipeline(load_config(None, [*base, "softmax_layers=[1, 9]"]), ["align"], 1)  # (align reads none)
    with pytest.raises(ConfigError, match=r"^kl\.seq_len=4096: "):
        launch.check_pipeline(load_config(None, [*base, "softmax_layers=[1]", "kl.seq_len=4096"]), ["align", "kl"], 1)
    with pytest.raises(ConfigError, match=r"^select\.ks=\[2, 8\]: the teacher has 4 layers"):
        launch.check_pipeline(load_config(None, [*base, "select.ks=[2, 8]", "select.method=uniform"]), ["select"], 1)
    with pytest.raises(ConfigError, match=r"^kl\.teacher_overlap=True: not with a ZeRO-3 teacher"):
        launch.check_pipeline(load_config(None, [*base, "softmax_layers=[1]", "kl.teacher_overlap=true",
                                                 "kl.teacher_ds_config=ds_configs/teacher_zero3.json"]), ["kl"], 1)
    launch.check_pipeline(load_config(None, [f"out_dir={tmp_path / 'run'}", f"teacher={tmp_path / 'nowhere'}",
                                             "softmax_layers=[1, 99]"]), ["kl"], 1)
    assert "note: the teacher's folder is not here" in capsys.readouterr().err
    # a relative folder of the compute nodes ("models/Llama": one slash, taken for a hub id here, which the hub does
    # not give) is said and left to the stages too, not refused
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda *a, **k: (_ for _ in ()).throw(OSError("Repository Not Found")))
    monkeypatch.chdir(tmp_path)
    launch.check_pipeline(load_config(None, [f"out_dir={tmp_path / 'run'}", "teacher=models/Llama",
                                             "softmax_layers=[1]"]), ["kl"], 1)
    assert "note: the teacher's folder is not here" in capsys.readouterr().err
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    (gpt2 / "model.safetensors").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"^teacher=.*gpt2"):
        launch.check_pipeline(load_config(None, [f"out_dir={tmp_path / 'run'}", f"teacher={gpt2}",
                                                 "softmax_layers=[1]"]), ["kl"], 1)


def test_an_empty_teacher_is_refused_and_run_name_names_the_default_out_dir():
    """`teacher:` left empty in a YAML loaded as None, i.e. the embedded 135M model, silently; run_name was read by
    nothing, so two configs differing in it alone shared one out_dir."""
    from ds_hybrid.config import config_from_dict

    for empty in (None, ""):
        with pytest.raises(ConfigError, match=r"^teacher=.*empty: give a local HF folder, a hub id, or `embedded`"):
            config_from_dict({"teacher": empty})
    assert config_from_dict({"run_name": "a"}).out_dir == "outputs/a"
    assert config_from_dict({"run_name": "a", "out_dir": "/tmp/x"}).out_dir == "/tmp/x"
    assert load_config(None, []).out_dir == "outputs/run"
    for bad in ("a/b", "..", ""):
        with pytest.raises(ConfigError, match=r"^run_name=.*names the default out_dir"):
            config_from_dict({"run_name": bad})


def test_settings_a_schedule_or_method_never_reads_are_refused_or_said():
    """kl.min_lr_ratio under kl's default constant schedule did nothing, silently: refused; select settings of other
    methods are listed (one config serves several methods, so they are said, not refused)."""
    from ds_hybrid.config import unused_select_settings

    with pytest.raises(ConfigError, match=r"^kl\.min_lr_ratio=0\.1: the floor of a decay, and kl\.schedule is constant"):
        load_config(None, ["kl.min_lr_ratio=0.1"])
    assert load_config(None, ["kl.min_lr_ratio=0.1", "kl.schedule=cosine"]).kl.min_lr_ratio == 0.1
    assert unused_select_settings(load_config(None, [])) == []
    cfg = load_config(None, ["select.halving_first_tokens=65536", "select.window=5", "select.ar_pairs=20"])
    assert [u.split(" ")[0] for u in unused_select_settings(cfg)] == ["select.halving_first_tokens", "select.ar_pairs",
                                                                     "select.window"]
    assert unused_select_settings(load_config(None, ["select.method=halving", "select.halving_first_tokens=65536"])) \
        == []
    assert unused_select_settings(load_config(None, ["select.score=train_window", "select.window=5"])) == []
