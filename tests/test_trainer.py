"""The DeepSpeed trainer on CPU: 2 gloo ranks, a tiny teacher with the real SmolLM2 tokenizer, real prose.

One pipeline (align -> kl -> finetune; student ZeRO-2, teacher ZeRO-3; one launch) is run once per module and
inspected by several tests; resume, ZeRO-3 equivalence, failures and bad configs get their own runs.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from trainer_utils import (REPO, env, make_corpus, make_tiny_teacher, metrics, tail, torchrun_cmd, train,
                           train_in_one_process, write_config)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipe")
    teacher = make_tiny_teacher(root / "teacher")
    corpus = make_corpus(root / "corpus")
    cfg = write_config(root / "run.yaml", teacher, corpus, root / "out")
    # the three stages one after another in one launch of 2 ranks, each run by train.py's main() (tests/train_runs.py)
    runs = [["--stage", stage, "--config", str(cfg)] for stage in ("align", "kl", "finetune")]
    for p in train_in_one_process(runs, root / "pipeline.json", nproc=2):
        assert p.returncode == 0, tail(p)
    return {"root": root, "teacher": teacher, "corpus": corpus, "cfg": cfg, "out": root / "out"}


def test_align_lowers_every_layers_loss(pipeline):
    val = metrics(pipeline["out"] / "align", "val")
    first, last = val[0], val[max(val)]
    layers = [k for k in first if k.startswith("layer")]
    assert len(layers) == 4
    for k in layers:
        assert last[k] < first[k], (k, first[k], last[k])


def test_kl_lowers_kl_and_finetune_lowers_ce(pipeline):
    kl = metrics(pipeline["out"] / "kl", "val")
    assert kl[max(kl)]["kl"] < kl[0]["kl"]
    ft = metrics(pipeline["out"] / "finetune", "val")
    assert ft[max(ft)]["ce"] < ft[0]["ce"]


def test_teacher_is_partitioned_under_zero3(pipeline):
    info = json.loads((pipeline["out"] / "kl" / "run_info.json").read_text())
    ranks = info["params_per_rank"]
    assert len(ranks) == 2
    for r in ranks:
        t = r["teacher"]
        assert t["local"] <= 0.51 * t["full"]  # each rank holds its half of the teacher
        assert r["student"]["local"] == r["student"]["full"]  # ZeRO-2: parameters whole


def test_each_rank_owns_the_checkpoint_shards_it_wrote(pipeline):
    """DeepSpeed's file names carry the rank that wrote them (ds_hybrid.manifest.owner hashes and fsyncs by them): in
    a real 2-rank checkpoint each rank owns its ZeRO shard and its RNG state."""
    from ds_hybrid.manifest import MANIFEST, owner

    (manifest,) = sorted((pipeline["out"] / "kl" / "checkpoints").glob(f"*/{MANIFEST}"))[-1:]
    files = json.loads(manifest.read_text())["files"]
    mine = {r: sorted(f for f in files if owner(f, 2) == r) for r in range(2)}
    assert any("zero_pp_rank_1_" in f for f in mine[1]) and "rng_rank1.pt" in mine[1], mine
    assert all("rank1" in f.replace("_", "") for f in mine[1]), mine
    assert any("zero_pp_rank_0_" in f for f in mine[0]) and "rng_rank0.pt" in mine[0], mine


def test_tensorboard_events_have_the_scalars(pipeline):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ev = EventAccumulator(str(pipeline["out"] / "kl" / "tensorboard"))
    ev.Reload()
    tags = set(ev.Tags()["scalars"])
    for tag in ("train/loss", "train/kl", "train/lr", "train/lr_rest", "train/grad_norm", "train/tokens_per_s",
                "train/step_time_s", "train/rss_gib", "val/kl", "val/ppl"):
        assert tag in tags, tag
    assert [e.step for e in ev.Scalars("train/loss")] == list(range(1, 9))
    assert [e.step for e in ev.Scalars("val/kl")] == [0, 8]
    assert "train/kl_per_token" in ev.Tags()["histograms"]
    align = EventAccumulator(str(pipeline["out"] / "align" / "tensorboard"))
    align.Reload()
    assert {f"train/layer{i:02d}" for i in range(4)} <= set(align.Tags()["scalars"])


def test_run_records_config_versions_commit(pipeline):
    d = pipeline["out"] / "kl"
    info = json.loads((d / "run_info.json").read_text())
    assert info["versions"]["deepspeed"] and info["versions"]["transformers"]
    assert "git_commit" in info and info["softmax_layers"] == [1]
    assert (d / "config.yaml").is_file() and (d / "DONE").is_file()
    phases = json.loads((d / "DONE").read_text())["phase_s"]  # where the run's time went
    assert {"setup", "first_eval", "train", "final_eval", "export", "total"} <= set(phases)
    parts = sum(v for k, v in phases.items() if k != "total")
    assert all(v >= 0 for v in phases.values()) and parts <= phases["total"] + 1e-3


def test_exports_reload_with_transformers(pipeline):
    import ds_hybrid  # noqa: F401
    from transformers import AutoModelForCausalLM

    align = AutoModelForCausalLM.from_pretrained(pipeline["out"] / "align" / "hf")
    kl = AutoModelForCausalLM.from_pretrained(pipeline["out"] / "kl" / "hf")
    teacher = AutoModelForCausalLM.from_pretrained(pipeline["teacher"])
    assert align.config.softmax_layers == [] and kl.config.softmax_layers == [1]
    # align trains only mixers: the rest is the teacher's
    assert torch.equal(align.model.layers[2].mlp.up_proj.weight, teacher.model.layers[2].mlp.up_proj.weight)
    # kl restored layer 1 from the teacher, then trained it
    assert kl.model.layers[1].self_attn.__class__.__name__ == "LlamaAttention"
    assert kl.lm_head.weight.data_ptr() == kl.model.embed_tokens.weight.data_ptr()  # tied, as the teacher
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    assert kl.generate(ids, max_new_tokens=3, do_sample=False).shape == (1, 8)
    # both exports stop where the teacher stops (its generation_config, not one derived from the config)
    assert len(teacher.generation_config.eos_token_id) == 2
    for model in (align, kl):
        assert model.generation_config.eos_token_id == teacher.generation_config.eos_token_id


def test_zero3_student_with_kernel_equals_single_process(pipeline, tmp_path):
    """Same batches, same init: 2 ranks with ZeRO-3 student+teacher end where one process without ZeRO does."""
    init = str(pipeline["out"] / "align" / "hf")
    outs = {}
    # the ZeRO-3 run uses the Triton kernel (interpreted on CPU) on the partitioned, tied lm_head; the single
    # process uses the torch reference
    for name, nproc, ds, tds, backend in (
            ("z3", 2, "ds_configs/student_zero3.json", "ds_configs/teacher_zero3.json", "triton"),
            ("single", 1, "ds_configs/single.json", "ds_configs/single.json", "torch")):
        cfg = write_config(tmp_path / f"{name}.yaml", pipeline["teacher"], pipeline["corpus"], tmp_path / name,
                           kl={"tokens": 2 * 8 * 32, "seq_len": 32, "eval_sequences": 2, "init_from": init,
                               "ds_config": ds, "teacher_ds_config": tds, "kl_backend": backend})
        p = train("kl", cfg, nproc=nproc)
        assert p.returncode == 0, tail(p)
        outs[name] = tmp_path / name / "kl"
    a, b = metrics(outs["z3"]), metrics(outs["single"])
    for step in (1, 2):
        assert a[step]["loss"] == pytest.approx(b[step]["loss"], rel=1e-5)
        assert a[step]["grad_norm"] == pytest.approx(b[step]["grad_norm"], rel=1e-4)
    from ds_hybrid.hf_io import SafetensorsReader

    ra, rb = SafetensorsReader(outs["z3"] / "hf"), SafetensorsReader(outs["single"] / "hf")
    assert set(ra.weight_map) == set(rb.weight_map)
    for k in ra.weight_map:
        assert torch.allclose(ra.get(k), rb.get(k), atol=1e-6, rtol=1e-5), k


def test_sigterm_checkpoints_and_exits_then_resumes(pipeline, tmp_path):
    cfg = write_config(tmp_path / "s.yaml", pipeline["teacher"], pipeline["corpus"], tmp_path / "out",
                       kl={"init_from": str(pipeline["out"] / "align" / "hf"), "ckpt_every": 100,
                           "ds_config": "ds_configs/single.json", "teacher_ds_config": "ds_configs/single.json"})
    import sys

    proc = subprocess.Popen([sys.executable, str(REPO / "ds_hybrid" / "train.py"), "--stage", "kl", "--config",
                             str(cfg)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env(), cwd=REPO, text=True)
    run_dir = tmp_path / "out" / "kl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if (run_dir / "metrics.jsonl").exists() and len(metrics(run_dir)) >= 2:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, out[-3000:]
    ckpts = sorted((run_dir / "checkpoints").glob("step*/COMPLETE"))
    assert len(ckpts) == 1 and not (run_dir / "DONE").exists()  # a checkpoint though ckpt_every=100
    saved = int(ckpts[0].parent.name.removeprefix("step"))
    # settings that would make the checkpoint's steps stand for other rows are refused before any model is built
    p = train("kl", cfg, "kl.global_batch=4", nproc=1)
    assert p.returncode == 2 and "kl.global_batch" in p.stderr and "was written with 8" in p.stderr, tail(p)
    # rows logged after the checkpoint by the interrupted run (a step logged, then killed before its checkpoint) are
    # dropped on resume, as TensorBoard's events of those steps (purge_step): the resumed run logs them again
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": saved + 1, "split": "train", "loss": -1.0}) + "\n")
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(run_dir / "tensorboard")) as w:
        w.add_scalar("train/loss", -1.0, saved + 1)
    p = train("kl", cfg, nproc=1)
    assert p.returncode == 0 and (run_dir / "DONE").exists(), tail(p)
    assert f"resumed kl from step {saved}" in p.stdout, tail(p)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    scalars = events.Scalars("train/loss")
    steps = [e.step for e in scalars]
    assert steps == sorted(set(steps)) and steps[-1] == max(metrics(run_dir)), steps
    assert all(e.value != -1.0 for e in scalars)
    # the rerun starts after the checkpoint: steps up to it are logged once (by the interrupted run), none is redone
    logged = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
              if json.loads(line)["split"] == "train"]
    assert all(logged.count(s) == 1 for s in range(1, max(logged) + 1)), logged
    resumed, ref = metrics(run_dir), metrics(pipeline["out"] / "kl")
    assert sorted(resumed) == sorted(ref)
    for step in ref:  # one process here, two ranks in the reference: equal up to fp32 reduction order
        assert resumed[step]["loss"] == pytest.approx(ref[step]["loss"], rel=1e-5), step


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(pipeline, tmp_path):
    cfg = write_config(tmp_path / "n.yaml", pipeline["teacher"], pipeline["corpus"], tmp_path / "out",
                       kl={"init_from": str(pipeline["out"] / "align" / "hf"), "ckpt_every": 1, "lr": 1e30,
                           "lr_rest": 1e30, "clip": 0.0})
    p = train("kl", cfg)
    assert p.returncode != 0
    import re

    m = re.search(r"non-finite loss at kl step (\d+)", p.stderr + p.stdout)
    assert m, tail(p)
    bad = int(m.group(1))
    good = sorted(int(c.parent.name[4:]) for c in (tmp_path / "out" / "kl" / "checkpoints").glob("step*/COMPLETE"))
    assert good and good[-1] == bad - 1  # every good step was saved (ckpt_every=1); the bad one was not
    assert f"The last good checkpoint is {tmp_path / 'out' / 'kl' / 'checkpoints'}/step{bad - 1:08d} (step {bad - 1})" \
        in p.stderr + p.stdout and "Lower kl.lr (and kl.lr_rest), or kl.clip" in p.stderr + p.stdout


def test_kl_init_from_must_have_the_runs_mixer_options(tmp_path, monkeypatch):
    """init_from's mixers were trained with its options, so a run asking for others (a leaner mixer after an align
    with the default one) is refused by name before any model is built, where it used to run silently with
    init_from's; the kernels' backend is not a property of the weights and is the run's own."""
    from transformers import AutoModelForCausalLM

    from ds_hybrid.config import load_config
    from ds_hybrid.errors import ConfigError
    from ds_hybrid.stages import kl as kl_stage
    from ds_hybrid.stages.base import check_init_from, load_hybrid
    from ds_hybrid.trainer import make_context
    from ds_hybrid.transfer import build_hybrid

    teacher = make_tiny_teacher(tmp_path / "teacher")
    export = tmp_path / "align_hf"  # an all-linear export with the default options, as stage align writes
    build_hybrid(AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32), [], "gdn").save_pretrained(export)

    def ctx(*overrides: str):
        cfg = load_config(None, [f"teacher={teacher}", "softmax_layers=[2]", "dtype=fp32", f"kl.init_from={export}",
                                 "kl.ds_config=ds_configs/single.json", "kl.global_batch=1", "kl.seq_len=64",
                                 "kl.tokens=64", *overrides])
        return make_context(cfg, "kl")

    for option, asked, had in (("use_gate", "false", True), ("grouped_kv", "true", False),
                               ("use_short_conv", "true", False), ("norm_eps", "1e-6", 1e-5)):
        with pytest.raises(ConfigError, match=rf"^mixer_options\.{option}=.*was trained with {option}={had!r}"):
            check_init_from(ctx(f"mixer_options.{option}={asked}"), export, "kl.init_from")
    # the stage refuses in its setup before it builds the teacher
    monkeypatch.setattr(kl_stage, "build_teacher_engine", lambda c: pytest.fail("the teacher was built"))
    with pytest.raises(ConfigError, match=r"^mixer_options\.use_gate="):
        kl_stage.KLStage(ctx("mixer_options.use_gate=false")).setup()
    with pytest.raises(ConfigError, match=r"^softmax_layers=.*layer 2 is softmax in"):  # removing one: refused too
        check_init_from(ctx("softmax_layers=[1]"), _softmax_export(teacher, tmp_path), "kl.init_from")
    # the same options, spelled out or not (1e-5: a string to YAML), one GDN never reads, and another backend:
    # accepted; the model takes the run's backend
    for same in ("mixer_options.use_gate=true", "mixer_options.norm_eps=1e-5", "mixer_options.gate_low_rank_dim=8"):
        assert check_init_from(ctx(same), export, "kl.init_from").mixer == "gdn"
    student = load_hybrid(ctx("mixer_options.backend=torch"), export, "kl.init_from")
    assert student.config.options.backend == "torch" and student.config.softmax_layers == [2]



def test_an_export_records_its_teachers_weights_and_one_of_other_weights_is_refused(tmp_path):
    """A hybrid export records its teacher's tensors fingerprint: a stage that starts from an export of another
    teacher of the same shapes (a base model's align for its instruct teacher) is refused by name, where the shape
    checks passed it; the same teacher resharded or with another config.json, and an export from before it was
    recorded, are accepted."""
    import json
    import shutil

    from transformers import AutoModelForCausalLM

    from ds_hybrid.config import load_config
    from ds_hybrid.errors import ConfigError
    from ds_hybrid.selection import tensors_fingerprint
    from ds_hybrid.stages.base import check_init_from, load_hybrid
    from ds_hybrid.trainer import make_context
    from ds_hybrid.transfer import build_hybrid, restore_softmax_layers

    teacher = make_tiny_teacher(tmp_path / "teacher")
    other = tmp_path / "other"  # the same shapes, other weights
    model = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight.mul_(1.01)
    model.save_pretrained(other)
    shutil.copy(teacher / "tokenizer.json", other)
    shutil.copy(teacher / "tokenizer_config.json", other)
    resharded = tmp_path / "resharded"  # the same tensors in other files, a config.json written otherwise
    AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32).save_pretrained(resharded, max_shard_size="100KB")
    shutil.copy(teacher / "tokenizer.json", resharded)
    shutil.copy(teacher / "tokenizer_config.json", resharded)
    spec = json.loads((resharded / "config.json").read_text())
    (resharded / "config.json").write_text(json.dumps({**spec, "note": "written again"}, indent=1))
    assert len(list(resharded.glob("*.safetensors"))) > 1
    # a hub repo's other copy beside the HF shards (Mistral's consolidated.safetensors): not the model's files
    shutil.copy(other / "model.safetensors", resharded / "consolidated.safetensors")
    assert tensors_fingerprint(resharded) == tensors_fingerprint(teacher) != tensors_fingerprint(other)

    def ctx(t, layers: str = "[2]"):
        cfg = load_config(None, [f"teacher={t}", f"softmax_layers={layers}", "dtype=fp32",
                                 "kl.ds_config=ds_configs/single.json", "kl.global_batch=1", "kl.seq_len=64",
                                 "kl.tokens=64"])
        return make_context(cfg, "kl")

    export = tmp_path / "hf"
    student = load_hybrid(ctx(teacher, "[]"), "teacher", "kl.init_from")  # stage 0 from the teacher's safetensors
    assert student.config.teacher_weights == tensors_fingerprint(teacher)
    student.save_pretrained(export)
    # kept through a layer restore (select's probes, kl from align) and through a stage that starts from it
    restored = restore_softmax_layers(student, AutoModelForCausalLM.from_pretrained(teacher), [1])
    assert restored.config.teacher_weights == student.config.teacher_weights
    assert load_hybrid(ctx(teacher), export, "kl.init_from").config.teacher_weights == tensors_fingerprint(teacher)
    with pytest.raises(ConfigError, match=r"^kl\.init_from=.*was made from a teacher of these shapes with other "
                                          rf"weights \(fingerprint {tensors_fingerprint(teacher)} there, "
                                          rf"{tensors_fingerprint(other)} for this run's teacher, {other}\)"):
        check_init_from(ctx(other), export, "kl.init_from")
    assert check_init_from(ctx(resharded), export, "kl.init_from").teacher_weights == tensors_fingerprint(teacher)
    older = tmp_path / "older"  # an export without the record (before 2026-12-08): not checked
    build_hybrid(AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32), []).save_pretrained(older)
    assert json.loads((older / "config.json").read_text()).get("teacher_weights") is None
    assert check_init_from(ctx(other), older, "kl.init_from").softmax_layers == []


def _softmax_export(teacher, tmp_path):
    from transformers import AutoModelForCausalLM

    from ds_hybrid.transfer import build_hybrid

    out = tmp_path / "softmax2_hf"
    build_hybrid(AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32), [2], "gdn").save_pretrained(out)
    return out


def test_kl_from_teacher_is_stage0_transfer(tmp_path):
    """kl.init_from=teacher (no align): every transferred weight of the student built from the teacher's safetensors
    equals the in-memory stage-0 transfer (transfer.build_hybrid); fresh mixer parameters are initialised (finite,
    fla's A_log range) and a function of the seed alone."""
    from transformers import AutoModelForCausalLM

    from ds_hybrid.config import load_config
    from ds_hybrid.stages.base import load_hybrid
    from ds_hybrid.trainer import make_context
    from ds_hybrid.transfer import build_hybrid

    teacher = make_tiny_teacher(tmp_path / "teacher", tie=False)

    def student(seed: int):
        cfg = load_config(None, [f"teacher={teacher}", "softmax_layers=[2]", "dtype=fp32", f"seed={seed}",
                                 "kl.init_from=teacher", "kl.ds_config=ds_configs/single.json", "kl.global_batch=1",
                                 "kl.seq_len=64", "kl.tokens=64"])
        return load_hybrid(make_context(cfg, "kl"), "teacher", "kl.init_from").state_dict()

    got, again, other = student(7), student(7), student(8)
    want = build_hybrid(AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32), [2], "gdn").state_dict()
    assert got.keys() == want.keys()
    transferred = ("q_proj", "k_proj", "v_proj", "o_proj", "mlp", "layernorm", "embed_tokens", "model.norm", "lm_head")
    fresh = [k for k in want if ".self_attn." in k and not any(t in k for t in transferred)]
    assert fresh and all(".layers.2." not in k for k in fresh)  # layer 2 is softmax: all of it from the teacher
    for k in want:
        assert torch.isfinite(got[k]).all(), k
        assert torch.equal(got[k], again[k]), k
        if k not in fresh:
            assert torch.equal(got[k], want[k]), k
    for k in fresh:
        if k.endswith("A_log"):
            assert (got[k].exp() > 0).all() and (got[k].exp() <= 16).all(), k
    assert any(not torch.equal(got[k], other[k]) for k in fresh)  # a different seed draws other gates


def test_kl_from_teacher_zero3_matches_single_process(tmp_path):
    """The same student built into ZeRO-3 partitions over 2 ranks: the held-out KL before any step equals the
    single-process one (a partitioned build left uninitialised mixer parameters here once: NaN from step 0). Three
    held-out rows over two ranks: the scores are over the same three rows at any world size (one rank runs a pad it
    does not count; each rank once scored len // world rows of its own, here two of the three), the recall rows
    too."""
    teacher = make_tiny_teacher(tmp_path / "teacher")
    corpus = make_corpus(tmp_path / "corpus", n_files=10)
    vals, cfgs = {}, {}
    # (world, micro batch): held-out rows are evaluated micro_batch at a time; one at a time must give the same KL
    for world, mb, ds in ((1, 2, "single"), (2, 2, "student_zero3"), (1, 1, "single")):
        cfgs[world, mb] = write_config(
            tmp_path / f"run{world}_{mb}.yaml", teacher, corpus, tmp_path / f"out{world}_{mb}",
            kl={"init_from": "teacher", "tokens": 8 * 128, "ckpt_every": 0, "export": False, "micro_batch": mb,
                "eval_sequences": 3, "eval_recall": 3, "ds_config": f"ds_configs/{ds}.json",
                "teacher_ds_config": f"ds_configs/{'single' if world == 1 else 'teacher_zero3'}.json"})
    p = train("kl", cfgs[2, 2], nproc=2)
    assert p.returncode == 0, tail(p)
    # the two single-process runs one after another in one process (tests/train_runs.py)
    for p in train_in_one_process([["--stage", "kl", "--config", str(cfgs[k])] for k in ((1, 2), (1, 1))],
                                  tmp_path / "single.json"):
        assert p.returncode == 0, tail(p)
    for world, mb in cfgs:
        vals[world, mb] = metrics(tmp_path / f"out{world}_{mb}" / "kl", "val")[0]
    for key in ("kl", "ce", "recall_kl", "recall_nll"):
        assert vals[1, 2][key] > 0 and vals[2, 2][key] == pytest.approx(vals[1, 2][key], rel=1e-4), key
        assert vals[1, 1][key] == pytest.approx(vals[1, 2][key], rel=1e-5), key


def test_align_zero3_matches_single_process(tmp_path):
    """Align with its mixers built into ZeRO-3 partitions over 2 ranks starts and steps where one process without
    ZeRO does: the same seeded gates and decays (a partitioned build once left them uninitialised memory, NaN or
    garbage from step 0), the same per-layer held-out losses before any step and the same losses after."""
    teacher = make_tiny_teacher(tmp_path / "teacher")
    corpus = make_corpus(tmp_path / "corpus", n_files=10)
    cfgs = {}
    for world, ds, tds in ((2, "student_zero3", "teacher_zero3"), (1, "single", "single")):
        cfgs[world] = write_config(
            tmp_path / f"a{world}.yaml", teacher, corpus, tmp_path / f"out{world}",
            align={"tokens": 2 * 8 * 64, "seq_len": 64, "ckpt_every": 0, "eval_sequences": 2,
                   "ds_config": f"ds_configs/{ds}.json", "teacher_ds_config": f"ds_configs/{tds}.json"})
    p = train("align", cfgs[2], nproc=2)
    assert p.returncode == 0, tail(p)
    p = train("align", cfgs[1], nproc=1)
    assert p.returncode == 0, tail(p)
    runs = {w: tmp_path / f"out{w}" / "align" for w in cfgs}
    v2, v1 = metrics(runs[2], "val")[0], metrics(runs[1], "val")[0]
    layers = [k for k in v1 if k.startswith("layer")]
    assert layers
    for k in layers:
        assert v1[k] > 0 and v2[k] == pytest.approx(v1[k], rel=1e-5), k
    a, b = metrics(runs[2]), metrics(runs[1])
    for step in (1, 2):
        assert a[step]["loss"] == pytest.approx(b[step]["loss"], rel=1e-5)
    from ds_hybrid.hf_io import SafetensorsReader

    ra, rb = SafetensorsReader(runs[2] / "hf"), SafetensorsReader(runs[1] / "hf")
    assert set(ra.weight_map) == set(rb.weight_map)
    for k in ra.weight_map:
        # (Adam's steps of lr 3e-3 amplify the ranks' summation order in near-zero gradients to ~3e-6 here)
        assert torch.allclose(ra.get(k), rb.get(k), atol=1e-5, rtol=1e-4), k


def test_weight_decay_groups_judge_a_zero3_parameter_by_its_whole_shape():
    """A ZeRO-3 parameter outside its module's forward is a 1-D shard: judged by that, every weight went without decay
    (the 2-rank ZeRO-3 align test above caught it by its losses). shard_shape_decay keeps the old groups for the
    resume of a checkpoint written then: checked by hand on 2026-12-06, a 2-rank ZeRO-3 kl checkpoint written by the
    old code resumed to the same losses, and without the old groups DeepSpeed refused it ("a different number of
    parameter groups")."""
    from torch import nn

    from ds_hybrid.config import StageConfig
    from ds_hybrid.stages.common import param_groups, shard_shape_decay

    def shard(shape):  # what zero.Init leaves in a module: an empty 1-D tensor, the whole shape in ds_shape
        p = nn.Parameter(torch.empty(0))
        p.ds_id, p.ds_shape = 0, torch.Size(shape)
        return p

    named = [("mixers.0.q_proj.weight", shard((8, 8))), ("mixers.0.A_log", shard((4,)))]
    s = StageConfig(lr=1e-3, lr_rest=0.0, weight_decay=0.01)
    groups = {g["name"]: len(g["params"]) for g in param_groups(named, s)}
    assert groups == {"attn": 1, "attn_nodecay": 1}
    with shard_shape_decay(True):
        assert {g["name"]: len(g["params"]) for g in param_groups(named, s)} == {"attn_nodecay": 2}
    assert {g["name"] for g in param_groups(named, s)} == {"attn", "attn_nodecay"}  # (the block ended)


def test_one_rank_killed_mid_step_ends_the_job_then_it_resumes_to_the_same_losses(pipeline, tmp_path):
    """A rank lost mid-step (SIGKILL, as an OOM killer or a dead node): the job exits non-zero within the
    collective timeout, and the next run resumes to losses identical to the uninterrupted run. (It replaces the test
    that SIGKILLed every process at once: the resume from an abrupt death is the same, and this case is harder.)"""
    import psutil

    cfg = write_config(tmp_path / "k.yaml", pipeline["teacher"], pipeline["corpus"], tmp_path / "out",
                       kl={"init_from": str(pipeline["out"] / "align" / "hf"), "ckpt_every": 2},
                       dist_timeout_minutes=1)
    proc = subprocess.Popen(torchrun_cmd(2, "--stage", "kl", "--config", str(cfg)), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, env=env(), cwd=REPO, start_new_session=True, text=True)
    marker = tmp_path / "out" / "kl" / "checkpoints" / "step00000004" / "COMPLETE"
    deadline = time.time() + 300
    while not marker.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert marker.exists(), "no checkpoint at step 4"
    rank1 = [c for c in psutil.Process(proc.pid).children(recursive=True) if c.environ().get("RANK") == "1"]
    assert len(rank1) == 1
    t0 = time.time()
    rank1[0].kill()
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode != 0 and time.time() - t0 < 120, out[-3000:]
    run_dir = tmp_path / "out" / "kl"
    assert not (run_dir / "DONE").exists()
    p = train("kl", cfg)
    assert p.returncode == 0, tail(p)
    assert "resumed kl from step" in p.stdout
    resumed, ref = metrics(run_dir), metrics(pipeline["out"] / "kl")
    assert sorted(resumed) == sorted(ref)
    for step in ref:
        assert resumed[step]["loss"] == ref[step]["loss"], step


def test_plan_predicts_the_checkpoint_size(pipeline):
    from ds_hybrid.config import load_config
    from ds_hybrid.plan import plan_for

    ckpts = sorted((pipeline["out"] / "kl" / "checkpoints").glob("step*/COMPLETE"))
    written = json.loads(ckpts[-1].read_text())["bytes"]
    plan = plan_for(load_config(pipeline["cfg"]), "kl", 2, 80.0, dtype_bytes=4)  # CPU: fp32
    assert 0.8 <= written / plan.checkpoint_bytes <= 1.25, (written, plan.checkpoint_bytes)


def test_a_resume_is_checked_against_its_checkpoints_settings_before_any_model(tmp_path):
    """check_resume (run before the models are built): another world size is a CheckpointError (exit 4), another
    global batch or corpus a ConfigError naming the setting; a marker without settings (older checkpoints) passes."""
    from ds_hybrid.checkpoint import CheckpointError
    from ds_hybrid.errors import ConfigError
    from ds_hybrid.trainer import check_resume

    now = {"global_batch": 8, "seq_len": 64, "seed": 0, "total_steps": 8, "train_sequences": 100,
           "data_cache": "abc", "mixture": None}
    path = tmp_path / "checkpoints" / "step00000004"
    check_resume("kl", None, now)
    check_resume("kl", (path, {"world_size": 1}), now)
    check_resume("kl", (path, {"world_size": 1, "settings": dict(now)}), now)
    with pytest.raises(CheckpointError, match="written by 4 ranks, this job has 1"):
        check_resume("kl", (path, {"world_size": 4, "settings": dict(now)}), now)
    with pytest.raises(ConfigError, match=r"^kl\.global_batch=8: .*written with 16"):
        check_resume("kl", (path, {"world_size": 1, "settings": {**now, "global_batch": 16}}), now)
    with pytest.raises(ConfigError, match=r"^data=.*written over 90 rows"):
        check_resume("kl", (path, {"world_size": 1, "settings": {**now, "train_sequences": 90}}), now)
    # rows with BOS (data.bos) against a checkpoint recorded before row_bos was kept (its rows had none)
    with pytest.raises(ConfigError, match=r"^data\.bos='rows with BOS token 2': .*written with no BOS"):
        check_resume("kl", (path, {"world_size": 1, "settings": dict(now)}), {**now, "row_bos": 2})
    check_resume("kl", (path, {"world_size": 1, "settings": dict(now)}), {**now, "row_bos": None})
    # a checkpoint past this run's last step (kl.tokens lowered; one corpus file keeps the rows): nothing would train
    # and the stage would end marked done at step 6 over the model of step 7
    fewer = {**now, "total_steps": 6}
    check_resume("kl", (path, {"world_size": 1, "step": 6, "settings": dict(now)}), fewer)  # (at the end: rescored)
    with pytest.raises(ConfigError, match=r"^kl\.tokens='6 steps': the checkpoint .*step00000004 is at step 7, past this "
                                          r"run's last step: raise kl\.tokens"):
        check_resume("kl", (path, {"world_size": 1, "step": 7, "settings": dict(now)}), fewer)
    # the token cache's key hashes the files' paths and times: a corpus moved or re-timestamped gives another key
    # over the same tokens; with the same held-out digest and row count it is taken (said), otherwise refused
    now_d = {**now, "val_digest": {"data": "d1"}}
    check_resume("kl", (path, {"world_size": 1, "settings": {**now_d, "data_cache": "moved"}}), now_d)
    with pytest.raises(ConfigError, match=r"^data=.*token cache moved"):
        check_resume("kl", (path, {"world_size": 1, "settings": {**now_d, "data_cache": "moved",
                                                                 "val_digest": {"data": "d2"}}}), now_d)
    with pytest.raises(ConfigError, match=r"^data=.*token cache"):  # (no digest recorded: as before)
        check_resume("kl", (path, {"world_size": 1, "settings": {**now, "data_cache": "moved"}}), now)
    # another model or loss: refused by the field, the teacher by its weights' fingerprint
    model = {**now, "teacher": "fp1", "softmax_layers": [1, 5], "mixer": "gdn", "mixer_options": {},
             "temperature": 1.0, "ce_weight": 0.0}
    check_resume("kl", (path, {"world_size": 1, "settings": dict(model)}), model)
    for key, value, field in [("teacher", "fp2", "teacher"), ("softmax_layers", [1, 6], "softmax_layers"),
                              ("mixer", "gla", "mixer"),
                              ("mixer_options", {"use_gate": False}, r"mixer_options\.use_gate"),
                              ("temperature", 2.0, r"kl\.temperature"), ("ce_weight", 0.5, r"kl\.ce_weight")]:
        with pytest.raises(ConfigError, match=rf"^{field}=.*is of another model or loss"):
            check_resume("kl", (path, {"world_size": 1, "settings": {**model, key: value}}), model)
    # the same model, its options written otherwise: 1e-5 as text (a command-line override) against YAML's float, a
    # default spelt out, an option GDN never reads; the advice moves the stage folder (its logs with it)
    for then, now_opts in [({"norm_eps": 1e-5}, {"norm_eps": "1e-5"}), ({}, {"use_gate": True}),
                           ({}, {"gate_low_rank_dim": 32})]:
        check_resume("kl", (path, {"world_size": 1, "settings": {**model, "mixer_options": then}}),
                     {**model, "mixer_options": now_opts})
    with pytest.raises(ConfigError, match=r"^mixer_options\.norm_eps=0\.001: .*had norm_eps=1e-05; set it back to "
                                          rf"resume, or move {re.escape(str(tmp_path))} away"):
        check_resume("kl", (path, {"world_size": 1, "settings": {**model, "mixer_options": {}}}),
                     {**model, "mixer_options": {"norm_eps": "1e-3"}})
    # a learning rate set to or from 0 between the run and its resume: other optimizer groups, refused by name
    # (the hint of a small rate only where the checkpoint has the group: set to 0 now, not from 0)
    for then, now_frozen, key, rate, was, hint in [([], ["lr_rest"], "lr_rest", 0.0, "above 0", True),
                                                   (["lr_rest"], [], "lr_rest", 7e-6, "0", False),
                                                   (["lr"], ["lr", "lr_rest"], "lr_rest", 0.0, "above 0", True),
                                                   (["lr_rest"], ["lr", "lr_rest"], "lr", 0.0, "above 0", True)]:
        with pytest.raises(ConfigError, match=rf"^kl\.{key}={rate}: .*written with kl\.{key} {was}: .*would not "
                                              "load") as e:
            check_resume("kl", (path, {"world_size": 1, "settings": {**model, "frozen": then}}),
                         {**model, "frozen": now_frozen, key: rate})
        assert ("a small rate instead of 0 resumes" in str(e.value)) is hint
    check_resume("kl", (path, {"world_size": 1, "settings": {**model, "frozen": ["lr_rest"]}}),
                 {**model, "frozen": ["lr_rest"]})
    # the optimizer state's layout on disk: another ZeRO stage or dtype, refused by its field before the models
    # (DeepSpeed's load failed after both were built); a checkpoint that did not record them passes
    laid = {**model, "zero_stage": 2, "dtype": "bfloat16"}
    check_resume("kl", (path, {"world_size": 1, "settings": dict(laid)}), laid)
    check_resume("kl", (path, {"world_size": 1, "settings": dict(model)}), laid)
    check_resume("kl", (path, {"world_size": 1, "settings": dict(laid)}), {**laid, "zero_stage": 1})  # (same files)
    for key, value, field in [("zero_stage", 3, r"kl\.ds_config='ZeRO stage 3'"),
                              ("dtype", "float32", "dtype='dtype float32'")]:
        with pytest.raises(ConfigError, match=rf"^{field}: .*written under \S+( stage)? {laid[key]}, and DeepSpeed loads its "
                                              "optimizer state .* only under the same; set it back"):
            check_resume("kl", (path, {"world_size": 1, "settings": dict(laid)}), {**laid, key: value})


def test_a_resume_runs_at_the_run_configs_learning_rate_and_refuses_another_model(tmp_path):
    """DeepSpeed restores the checkpoint's learning rates; "lower the learning rate" (the non-finite loss's advice)
    then did nothing on the rerun. Now the resumed steps run at the config's rate, said in the log, as another
    clipping is; another mixer option (another model) is refused by name before any model is built."""
    import shutil

    from trainer_utils import one_process_stage

    teacher, corpus = make_tiny_teacher(tmp_path / "t"), make_corpus(tmp_path / "c", n_files=8)
    stage = one_process_stage(2, ckpt_every=1, keep_checkpoints=2, schedule="constant", lr=1e-3, eval_at_start=False)
    cfg = write_config(tmp_path / "r.yaml", teacher, corpus, tmp_path / "out", align=stage)
    run_dir = tmp_path / "out" / "align"
    p = train("align", cfg, nproc=1)
    assert p.returncode == 0 and (run_dir / "DONE").exists(), tail(p)
    (run_dir / "DONE").unlink()  # as if stopped after its checkpoint at step 2 (it keeps steps 1 and 2)
    p = train("align", cfg, "mixer_options={use_gate: false}", nproc=1)
    assert p.returncode == 2 and "mixer_options.use_gate=False: the checkpoint" in p.stderr, tail(p)
    assert "another model or loss: its mixer options had use_gate=True" in p.stderr, tail(p)
    # (the clipping the resumed steps apply: ZeRO-1's optimizer took the checkpoint's 1.0 on load, whatever the log said)
    p, _, _ = align_with_hook(tmp_path, cfg, "from ds_hybrid.stages import common\n"
                                             "_restore = common.restore_optimizer_settings\n"
                                             "def restore(engine, fresh):\n"
                                             "    out = _restore(engine, fresh)\n"
                                             "    print('clip applied', type(engine.optimizer).__name__,\n"
                                             "          engine.optimizer.clip_grad, flush=True)\n"
                                             "    return out\n"
                                             "common.restore_optimizer_settings = restore\n",
                              f"align.tokens={64 * 4 * 4}", "align.lr=5e-4", "align.clip=0.5")
    assert p.returncode == 0 and "resumed align from step 2" in p.stdout + p.stderr, tail(p)
    assert "clip applied DeepSpeedZeroOptimizer 0.5" in p.stdout, tail(p)
    assert "resumed with this run config's step settings, not those the checkpoint" in p.stdout + p.stderr
    assert "align.clip 1.0 -> 0.5" in p.stdout + p.stderr, tail(p)
    assert "resumed with this run config's optimizer settings, not the checkpoint's: attn_nodecay: lr 0.001 -> 0.0005; attn: lr 0.001 " \
        "-> 0.0005" in \
        p.stdout + p.stderr, tail(p)
    lr = {step: row["lr"] for step, row in metrics(run_dir).items()}
    assert lr[1] == lr[2] == pytest.approx(1e-3) and lr[3] == lr[4] == pytest.approx(5e-4), lr
    shutil.rmtree(run_dir)


def test_a_signal_during_a_save_is_served_by_that_save(tmp_path):
    """SIGUSR1 arriving while a periodic checkpoint is written (sent here from inside the save): the stage stops
    at that step with that checkpoint, not after one more step and a second save (at 70B two saves may outlast the
    time-limit warning, and a job killed at its limit is not requeued)."""
    teacher, corpus = make_tiny_teacher(tmp_path / "t"), make_corpus(tmp_path / "c", n_files=8)
    from trainer_utils import one_process_stage

    cfg = write_config(tmp_path / "r.yaml", teacher, corpus, tmp_path / "out",
                       align=one_process_stage(6, ckpt_every=2, keep_checkpoints=5, eval_at_start=False))
    p, run_dir, saved = align_with_hook(tmp_path, cfg, "from ds_hybrid import checkpoint\n"
                                                       "_save = checkpoint.Checkpointer.save\n"
                                                       "def save(self, engines, step, *a, **k):\n"
                                                       "    out = _save(self, engines, step, *a, **k)\n"
                                                       "    if step == 2:\n"
                                                       "        os.kill(os.getpid(), signal.SIGUSR1)\n"
                                                       "    return out\n"
                                                       "checkpoint.Checkpointer.save = save\n")
    assert p.returncode == 128 + signal.SIGUSR1, tail(p)
    assert saved == ["step00000002"] and max(metrics(run_dir)) == 2, (saved, sorted(metrics(run_dir)))


#: a hook for align_with_hook: SIGUSR1 sent from inside the process's first held-out evaluation, once
SIGNAL_IN_FIRST_HELD_OUT = ("from ds_hybrid import trainer\n"
                            "_held_out = trainer.held_out\n"
                            "def held_out(*a, **k):\n"
                            "    out = _held_out(*a, **k)\n"
                            "    if not os.environ.get('SENT'):\n"
                            "        os.environ['SENT'] = '1'\n"
                            "        os.kill(os.getpid(), signal.SIGUSR1)\n"
                            "    return out\n"
                            "trainer.held_out = held_out\n")


def align_with_hook(tmp_path, cfg, hook: str, *overrides: str):
    """Stage align of ``cfg`` (and ``overrides``) in a process that first runs ``hook`` (a sitecustomize.py, ``os``
    and ``signal`` imported): its result, its run folder and the steps of its complete checkpoints."""
    from trainer_utils import TRAIN

    folder = tmp_path / "hook"
    folder.mkdir(exist_ok=True)
    (folder / "sitecustomize.py").write_text("import os, signal\n" + hook)
    e = env()
    e["PYTHONPATH"] = f"{folder}:{e.get('PYTHONPATH', '')}"
    p = subprocess.run([sys.executable, str(TRAIN), "--stage", "align", "--config", str(cfg), *overrides],
                       capture_output=True, text=True, timeout=600, env=e, cwd=REPO)
    run_dir = tmp_path / "out" / "align"
    return p, run_dir, sorted(c.parent.name for c in (run_dir / "checkpoints").glob("step*/COMPLETE"))


def test_a_signal_during_a_mid_run_evaluation_stops_at_that_step_with_its_checkpoint(tmp_path):
    """SIGUSR1 arriving during the held-out evaluation of step 3 (eval_every 3, checkpoints every 4: none due at 3):
    the stage saves step 3 and stops there, not after step 4 and its save; the resumed run goes on from step 3,
    scores step 3 again, and ends with every step's training row written once and one held-out row of step 3."""
    teacher, corpus = make_tiny_teacher(tmp_path / "t"), make_corpus(tmp_path / "c", n_files=8)
    from trainer_utils import one_process_stage

    cfg = write_config(tmp_path / "r.yaml", teacher, corpus, tmp_path / "out",
                       align=one_process_stage(6, ckpt_every=4, keep_checkpoints=5, eval_every=3,
                                               eval_at_start=False))
    p, run_dir, saved = align_with_hook(tmp_path, cfg, SIGNAL_IN_FIRST_HELD_OUT)
    assert p.returncode == 128 + signal.SIGUSR1, tail(p)
    assert saved == ["step00000003"] and max(metrics(run_dir)) == 3, (saved, sorted(metrics(run_dir)))
    p = train("align", cfg, nproc=1)
    assert p.returncode == 0 and "resumed align from step 3" in p.stdout + p.stderr, tail(p)
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["split"] == "train"] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in rows if r["split"] == "val"].count(3) == 1


def test_a_signal_during_the_evaluation_before_the_first_step_stops_there_with_no_save(tmp_path):
    """SIGUSR1 arriving during eval_at_start's held-out evaluation: the stage stops before its first step (nothing
    is unsaved, no checkpoint written), not after step 1 and a save."""
    teacher, corpus = make_tiny_teacher(tmp_path / "t"), make_corpus(tmp_path / "c", n_files=8)
    from trainer_utils import one_process_stage

    cfg = write_config(tmp_path / "r.yaml", teacher, corpus, tmp_path / "out",
                       align=one_process_stage(4, ckpt_every=2, keep_checkpoints=5, eval_at_start=True))
    p, run_dir, saved = align_with_hook(tmp_path, cfg, SIGNAL_IN_FIRST_HELD_OUT)
    assert p.returncode == 128 + signal.SIGUSR1, tail(p)
    assert saved == [] and metrics(run_dir) == {}, (saved, sorted(metrics(run_dir)))
    assert "after its held-out evaluation, before its next step" in p.stdout + p.stderr, tail(p)


def test_a_damaged_newest_checkpoint_is_set_aside_before_the_models_are_built(tmp_path):
    """A resume whose newest checkpoint has a flipped byte: the checkpoint is verified and set aside before the
    student's engine is built (seen from inside the build), and the stage resumes from the one before it."""
    teacher, corpus = make_tiny_teacher(tmp_path / "t"), make_corpus(tmp_path / "c", n_files=8)
    from trainer_utils import one_process_stage

    cfg = write_config(tmp_path / "r.yaml", teacher, corpus, tmp_path / "out",
                       align=one_process_stage(3, ckpt_every=1, keep_checkpoints=3, eval_at_start=False))
    run_dir = tmp_path / "out" / "align"
    p = train("align", cfg, nproc=1)
    assert p.returncode == 0, tail(p)
    (run_dir / "DONE").unlink()  # as if stopped after its last checkpoint
    newest = run_dir / "checkpoints" / "step00000003"
    victim = newest / next(iter(json.loads((newest / "MANIFEST.json").read_text())["files"]))
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    p, _, saved = align_with_hook(tmp_path, cfg, "from pathlib import Path\n"
                                                 "from ds_hybrid.stages import common\n"
                                                 "_engine = common.student_engine\n"
                                                 "def student_engine(*a, **k):\n"
                                                 f"    aside = list(Path({str(newest.parent)!r}).glob('*.damaged'))\n"
                                                 "    print('SET_ASIDE_BEFORE_MODELS', bool(aside), flush=True)\n"
                                                 "    return _engine(*a, **k)\n"
                                                 "common.student_engine = student_engine\n")
    assert p.returncode == 0 and "SET_ASIDE_BEFORE_MODELS True" in p.stdout, tail(p)
    assert "resumed align from step 2" in p.stdout + p.stderr and (run_dir / "DONE").is_file(), tail(p)
    assert (newest.parent / "step00000003.damaged").is_dir()

def test_set_aside_moves_done_last_so_a_cut_short_set_aside_leaves_the_stage_finished(tmp_path, monkeypatch):
    """--force's set-aside of a finished stage, killed after its first move: DONE is still in place (the stage is
    finished, not a half-moved run that a rerun would resume from its checkpoints), and the next --force moves the
    rest; nothing is deleted."""
    import os

    from ds_hybrid import trainer

    run_dir = tmp_path / "kl"
    (run_dir / "checkpoints" / "step00000004").mkdir(parents=True)
    for name in ("DONE", "metrics.jsonl", "config.yaml"):
        (run_dir / name).write_text(name)
    real, calls = os.replace, []

    def cut(src, dst):
        if calls:
            raise KeyboardInterrupt  # (the kill, after one move)
        calls.append(src)
        real(src, dst)

    monkeypatch.setattr(trainer.os, "replace", cut)
    with pytest.raises(KeyboardInterrupt):
        trainer.set_aside_finished_run(run_dir)
    assert (run_dir / "DONE").is_file() and not (run_dir / "checkpoints").exists()
    monkeypatch.setattr(trainer.os, "replace", real)
    dest = trainer.set_aside_finished_run(run_dir)
    assert not (run_dir / "DONE").exists() and (dest / "DONE").read_text() == "DONE"
    assert (dest / "metrics.jsonl").read_text() == "metrics.jsonl"
    assert len(list((run_dir / "previous").glob("*/checkpoints/step00000004"))) == 1
