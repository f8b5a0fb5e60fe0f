"""Stage select on CPU: a planted align checkpoint whose layer 2 mixer is broken must be found by GA-S2, kept by
successive halving and the zero-training proxy; resumable probes; baselines; selection.json consumed by stage kl."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file, save_file
from trainer_utils import REPO, env, make_corpus, make_tiny_teacher, tail, train, train_in_one_process, write_config

from ds_hybrid.config import load_config
from ds_hybrid.errors import ConfigError
from ds_hybrid.recall_tasks import make_prompts
from ds_hybrid.selection import kendall_tau, read_selection, topk_overlap
from ds_hybrid.stages.scorers import AR_TRUSTED_ACCURACY

pytestmark = pytest.mark.slow
PLANTED = 2
SELECT = dict(ratios=[0.25, 0.5], ks=[1],
              probe={"tokens": 3 * 8 * 64, "seq_len": 64, "global_batch": 8, "micro_batch": 4,
                     "ds_config": "ds_configs/single.json", "teacher_ds_config": "ds_configs/single.json"},
              eval_sequences=8)


def plant_broken_mixer(align_hf, layer: int) -> None:
    """Replace one mixer's output projection by large noise: that layer's linear attention is badly wrong."""
    index = json.loads((align_hf / "model.safetensors.index.json").read_text())["weight_map"]
    key = f"model.layers.{layer}.self_attn.o_proj.weight"
    f = align_hf / index[key]
    tensors = load_file(f)
    g = torch.Generator().manual_seed(0)
    tensors[key] = torch.randn(tensors[key].shape, generator=g) * 0.5
    save_file(tensors, f, metadata={"format": "pt"})


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    root = tmp_path_factory.mktemp("sel")
    teacher = make_tiny_teacher(root / "teacher")
    corpus = make_corpus(root / "corpus")
    cfg = write_config(root / "run.yaml", teacher, corpus, root / "out", select=SELECT,
                       align={"seq_len": 64, "tokens": 8 * 8 * 64})
    p = train("align", cfg, nproc=1)
    assert p.returncode == 0, tail(p)
    plant_broken_mixer(root / "out" / "align" / "hf", PLANTED)
    return {"root": root, "cfg": cfg, "out": root / "out", "teacher": teacher, "corpus": corpus}


def select(cfg, method, *overrides, nproc=1):
    p = train("select", cfg, f"select.method={method}", *overrides, nproc=nproc)
    assert p.returncode == 0, tail(p)
    return read_selection(cfg.parent / "out" / "select" / method / "selection.json")


@pytest.fixture(scope="module")
def ga_s2(planted):
    """The full GA-S2 selection of the planted case (2 ranks); the other selectors are compared with it."""
    sel = select(planted["cfg"], "ga_s2", nproc=2)
    return sel, planted["out"] / "select" / "ga_s2" / "selection.json"


def test_ga_s2_ranks_the_planted_layer_first(planted, ga_s2):
    sel, _ = ga_s2
    assert sel["ranking"][0] == PLANTED
    scores = {int(k): v for k, v in sel["scores"].items()}
    # ranking = ascending order of the measured probe scores
    assert sel["ranking"] == sorted(scores, key=lambda l: (scores[l], l))
    assert sel["baseline"] > scores[PLANTED]  # restoring it is a reduction against the all-linear probe
    # K from a ratio: round-half-up of ratio x L (L = 4)
    assert sel["chosen"]["ratio=0.25"] == [PLANTED] and len(sel["chosen"]["ratio=0.5"]) == 2
    assert sel["tokens_spent"] == 5 * 3 * 8 * 64  # L + 1 probes
    probe = planted["out"] / "select" / "ga_s2" / "probes" / f"layer_{PLANTED:03d}" / "kl"
    val_steps = [r["step"] for r in map(json.loads, (probe / "metrics.jsonl").read_text().splitlines())
                 if r["split"] == "val"]
    assert val_steps == [3]  # probes are scored at their end only (no evaluation before the first step)
    assert sel["teacher"]["fingerprint"] and sel["align"]["fingerprint"]
    assert sel["teacher"]["content"] and sel["align"]["content"]
    out = planted["out"] / "select" / "ga_s2"
    assert (out / "selection.png").stat().st_size > 1000
    assert list((out / "tensorboard").glob("events.*"))


BASELINES = ["uniform", "smart", "mse", "ppl", "ar", "ar_multihop", "retrieval"]


@pytest.fixture(scope="module")
def quick_selections(planted, ga_s2):
    """The selections that train nothing (the baselines; the proxy against GA-S2) and GA-S2's distance-regularized
    reranking of its finished probes, each a run of train.py's main() with the overrides below, one after another
    in one process: they take a second or two each, a Python start of their own ~8 s of CPU more."""
    runs = {m: [f"select.method={m}", "select.ar_prompts=4", "select.ar_pairs=10", "select.retrieval_prompts=6",
                "select.retrieval_seq_len=128"] for m in BASELINES}
    runs["proxy"] = ["select.method=proxy", f"select.reference={ga_s2[1]}"]
    runs["distance_reg"] = ["select.method=ga_s2", "select.distance_reg=5"]
    argvs = [["--stage", "select", "--config", str(planted["cfg"]), *o] for o in runs.values()]
    return dict(zip(runs, train_in_one_process(argvs, planted["root"] / "quick_selections.json")))


def quick_selection(planted, quick_selections, method: str) -> dict:
    p = quick_selections[method]
    assert p.returncode == 0, tail(p)
    return read_selection(planted["out"] / "select" / method / "selection.json")


@pytest.fixture(scope="module")
def halving_one_task(planted, ga_s2):
    """Successive halving (default: survivors retrained) in one task, with agreement against GA-S2."""
    ref = str(ga_s2[1])
    sel = select(planted["cfg"], "halving", f"select.reference={ref}", "select.halving_keep=1",
                 "select.halving_first_tokens=512")
    return sel, ref


def test_halving_and_proxy_keep_the_planted_layer_and_report_agreement(planted, halving_one_task, quick_selections):
    h, ref = halving_one_task
    assert PLANTED in h["ranking"][:1]
    assert h["tokens_spent"] < read_selection(ref)["tokens_spent"]
    r = read_selection(ref)
    assert h["agreement"]["reference"] == ref
    assert h["agreement"]["kendall_tau"] == kendall_tau(h["ranking"], r["ranking"])  # against GA-S2's, not itself
    overlap = h["agreement"]["topk_overlap"]  # {"K": |top-K & GA-S2's top-K| / K} for select.ks
    assert overlap and overlap == {k: len(set(h["ranking"][:int(k)]) & set(r["ranking"][:int(k)])) / int(k)
                                   for k in overlap}
    # rerun over the finished probes: nothing trains again, and every round reads its own scores (a survivor's
    # latest KL, from a later round, must not replace the score it had when the earlier round was decided)
    probes = planted["out"] / "select" / "halving" / "probes"
    stamps = {p: p.stat().st_mtime_ns for p in probes.glob("*/kl/DONE")}
    again = select(planted["cfg"], "halving", f"select.reference={ref}", "select.halving_keep=1",
                   "select.halving_first_tokens=512", "--force")
    assert {p: p.stat().st_mtime_ns for p in probes.glob("*/kl/DONE")} == stamps
    assert again["rounds"] == h["rounds"] and again["ranking"] == h["ranking"]
    # the ended halving's split no longer binds: a rerun as task 0 of 2 reads every round's recorded scores
    split = select(planted["cfg"], "halving", f"select.reference={ref}", "select.halving_keep=1",
                   "select.halving_first_tokens=512", "select.num_tasks=2", "select.task_index=0", "--force")
    assert {p: p.stat().st_mtime_ns for p in probes.glob("*/kl/DONE")} == stamps
    assert split["rounds"] == h["rounds"] and split["ranking"] == h["ranking"]
    assert len(h["rounds"]) >= 2 and h["rounds"][0]["scores"] != h["rounds"][-1]["scores"]
    p = quick_selection(planted, quick_selections, "proxy")  # select.reference = GA-S2's, as ref
    assert p["agreement"]["reference"] == ref
    assert p["ranking"][0] == PLANTED and p["tokens_spent"] == 0
    assert p["agreement"]["kendall_tau"] == kendall_tau(p["ranking"], r["ranking"])
    overlap = p["agreement"]["topk_overlap"]  # {"K": |top-K & GA-S2's top-K| / K} for select.ks
    assert overlap and overlap == {k: len(set(p["ranking"][:int(k)]) & set(r["ranking"][:int(k)])) / int(k)
                                   for k in overlap}


def test_halving_survivors_continue_equals_retrain(planted, halving_one_task, tmp_path):
    """Continuing survivors from checkpoints is exactly retraining them longer (constant lr), for fewer tokens."""
    retrain = halving_one_task[0]
    out = tmp_path / "out"
    shutil.copytree(planted["out"] / "align", out / "align")
    cfg = write_config(tmp_path / "c.yaml", planted["teacher"], planted["corpus"], out,
                       select={**SELECT, "halving_survivors": "continue", "halving_keep": 1, "halving_first_tokens": 512})
    cont = select(cfg, "halving")
    step = 8 * 64
    assert [r["steps"] for r in cont["rounds"]] == [r["steps"] for r in retrain["rounds"]] == [1, 2, 3]
    assert retrain["tokens_spent"] == (4 * 1 + 2 * 2 + 1 * 3) * step  # each round from scratch
    assert cont["tokens_spent"] == (4 * 1 + 2 * 1 + 1 * 1) * step  # each round only its new steps
    for a, b in zip(cont["rounds"], retrain["rounds"]):
        assert a["alive"] == b["alive"]
        for layer, kl in a["scores"].items():
            assert kl == b["scores"][layer], (a["round"], layer)
    assert not list((planted["out"] / "select" / "halving" / "probes").glob("*/kl/checkpoints/*"))  # retrain: none
    assert list((out / "select" / "halving" / "probes").glob("*/kl/checkpoints/*"))  # continue: the finalist's


def test_every_halving_round_reads_the_longest_rounds_corpus_prefix(tmp_path, monkeypatch):
    """The corpus prefix (so the number of rows, so their order) is sized by the longest round's budget in every
    round: on a corpus of many files a shorter budget gives fewer rows, and a survivor continued into the next round
    would see another order than the one longer probe it stands for."""
    from ds_hybrid.stages import probes

    (tmp_path / "align").mkdir()
    (tmp_path / "align" / "config.json").write_text("{}")
    cfg = load_config(None, [f"out_dir={tmp_path / 'out'}", "select.method=halving", "select.halving_keep=1",
                             "select.probe={tokens: 32768, seq_len: 1024, global_batch: 4}",
                             "select.halving_first_tokens=4096"])
    seen = []

    def round_(cfg, d, layer, s, steps, data_tokens):
        seen.append((steps, s.tokens, data_tokens))
        return float(layer)

    monkeypatch.setattr(probes, "_halving_round", round_)
    scores, extra = probes.halving(cfg, tmp_path / "out" / "select" / "halving", 4, tmp_path / "align")
    assert [r["steps"] for r in extra["rounds"]] == [1, 2, 4]
    assert sorted({(st, t) for st, t, _ in seen}) == [(1, 4096), (2, 8192), (4, 16384)]
    assert {d for _, _, d in seen} == {32768}  # the longest probe's, in every round


def test_halving_split_over_two_concurrent_tasks_equals_one_task(planted, halving_one_task, tmp_path):
    """Two tasks share each round's probes, wait for each other's scores, and decide the same survivors."""
    single = halving_one_task[0]
    out = tmp_path / "out"
    shutil.copytree(planted["out"] / "align", out / "align")
    cfg = write_config(tmp_path / "t.yaml", planted["teacher"], planted["corpus"], out,
                       select={**SELECT, "halving_keep": 1, "halving_first_tokens": 512})
    procs = [subprocess.Popen([sys.executable, str(REPO / "ds_hybrid" / "train.py"), "--stage", "select", "--config",
                               str(cfg), "select.method=halving", f"select.task_index={i}", "select.num_tasks=2"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env(), cwd=REPO)
             for i in range(2)]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs[0][-2000:] + logs[1][-2000:]
    assert "task 1 of 2 finished its probes" in logs[1]
    split = read_selection(out / "select" / "halving" / "selection.json")
    assert [r["alive"] for r in split["rounds"]] == [r["alive"] for r in single["rounds"]]
    for a, b in zip(split["rounds"], single["rounds"]):
        for layer, kl in a["scores"].items():
            assert kl == pytest.approx(b["scores"][layer], rel=1e-5), (a["round"], layer)
    assert split["ranking"] == single["ranking"] and split["tokens_spent"] == single["tokens_spent"]


PROBES_IN_ONE_PROCESS = """
import gc, sys
from pathlib import Path
from ds_hybrid.config import load_config
from ds_hybrid.stages import probes
cfg = load_config(sys.argv[1], ["select.probe.ds_config=ds_configs/student_zero1.json"])
s = probes.probe_stage_config(cfg, Path(cfg.out_dir) / "align" / "hf")
for layer in (0, 1):
    probes.run_probe(cfg, Path(sys.argv[2]) / str(layer), layer, s)
gc.collect()
print("live engines", sum(type(o).__name__ == "DeepSpeedEngine" for o in gc.get_objects()))
"""


def test_probes_in_one_process_leave_no_engine_alive(planted, tmp_path):
    """Stage select runs one kl stage per probe in one process: each must free its engines. A ZeRO-1 engine (the
    probes' usual ds_config) is held by its own gradient hooks out of the garbage collector's reach unless the stage
    destroys it (a Gemma-3-270M selection on CPU grew ~4 GiB a probe until it was killed)."""
    p = subprocess.run([sys.executable, "-c", PROBES_IN_ONE_PROCESS, str(planted["cfg"]), str(tmp_path)],
                       capture_output=True, text=True, timeout=600, env=env(), cwd=REPO)
    assert p.returncode == 0, tail(p)
    assert "live engines 0" in p.stdout, p.stdout[-500:]
    assert all((tmp_path / str(layer) / "kl" / "DONE").is_file() for layer in (0, 1))


def test_killed_selection_reruns_only_missing_probes(planted, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(planted["out"] / "align", out / "align")
    cfg = write_config(tmp_path / "k.yaml", planted["teacher"], planted["corpus"], out, select=SELECT)
    cmd = [sys.executable, str(REPO / "ds_hybrid" / "train.py"), "--stage", "select", "--config", str(cfg)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env(), cwd=REPO,
                            start_new_session=True)
    probes = out / "select" / "ga_s2" / "probes"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and len(list(probes.glob("*/kl/DONE"))) < 2:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = {p: p.stat().st_mtime_ns for p in probes.glob("*/kl/DONE")}
    assert 2 <= len(finished) < 5
    p = train("select", cfg, nproc=1)
    assert p.returncode == 0, tail(p)
    assert len(re.findall(r"probe \S+ already done", p.stdout)) == len(finished)
    for f, mtime in finished.items():
        assert f.stat().st_mtime_ns == mtime  # untouched
    assert (out / "select" / "ga_s2" / "selection.json").is_file()


@pytest.mark.parametrize("method", BASELINES)
def test_baselines_give_k_distinct_valid_layers(planted, quick_selections, method):
    sel = quick_selection(planted, quick_selections, method)  # select.ar_prompts=4, select.ar_pairs=10
    assert sorted(sel["ranking"]) == [0, 1, 2, 3]
    for name, layers in sel["chosen"].items():
        k = int(name[2:]) if name.startswith("k=") else {"ratio=0.25": 1, "ratio=0.5": 2}[name]
        assert len(layers) == len(set(layers)) == k and all(0 <= l < 4 for l in layers)
    if method == "uniform":
        assert sel["chosen"]["ratio=0.5"] == [0, 2]
    if method == "smart":
        assert 3 in sel["chosen"]["ratio=0.5"]  # anchored at the last layer
    if method == "mse":  # ranked by the align stage's final held-out error per layer, largest first
        val = json.loads((planted["out"] / "align" / "DONE").read_text())["val"]
        assert sel["ranking"] == sorted(range(4), key=lambda l: -val[f"layer{l:02d}"])
    if method == "ppl":  # replacing the teacher's layer 2 by the broken mixer hurts perplexity most
        assert sel["ranking"][0] == PLANTED
    if method in ("ar", "ar_multihop"):  # a teacher that gets most prompts wrong is named as one (the tiny one: 0 %)
        warned = "not how it recalls" in quick_selections[method].stdout
        assert warned == (sel["teacher_accuracy"] < AR_TRUSTED_ACCURACY), tail(quick_selections[method])
    if method == "retrieval":  # each layer scores its best head's copy rate, the highest first; no align read
        rates = sel["copy_rate"]
        assert sel["prompts"] >= 1 and sel["answer_positions"] >= sel["prompts"] and "align" not in sel
        assert [sel["scores"][str(l)] for l in range(4)] == pytest.approx([max(r) for r in rates])
        assert sel["ranking"] == sorted(range(4), key=lambda l: (-max(rates[l]), l))


def solve(text: str) -> int:
    """An independent reader of a recall prompt: resolve aliases, sum the queried values."""
    defs = dict(re.findall(r"^(\w+) = (\w+)$", text, flags=re.M))
    query = re.search(r"what is (.+)\?", text).group(1).split(" + ")

    def value(k, hops=0):
        v = defs[k]
        assert hops <= 2
        return int(v) if v.isdigit() else value(v, hops + 1)

    return sum(value(k) for k in query)


@pytest.mark.parametrize("multihop", [False, True])
def test_recall_prompts_are_answerable(multihop):
    prompts = make_prompts(20, seed=1, pairs=50, multihop=multihop)
    for p in prompts:
        assert p.text.endswith("Answer:") and len(re.findall(r"^\w+ = \w+$", p.text, flags=re.M)) == 50
        assert solve(p.text) == int(p.answer)
    if multihop:  # the queries really go through aliases
        assert all(any(not re.search(rf"^{k} = \d+$", p.text, flags=re.M) for k in p.query) for p in prompts)


def test_recall_prompts_take_every_distinct_key_and_refuse_more():
    import random

    from ds_hybrid.recall_tasks import MAX_PAIRS, make_prompt

    p = make_prompt(random.Random(0), pairs=MAX_PAIRS)  # every key there is, once (it used to loop past this)
    assert len(p.values) == MAX_PAIRS == 4900 and solve(p.text) == int(p.answer)
    with pytest.raises(ValueError, match="pairs=4901"):
        make_prompt(random.Random(0), pairs=MAX_PAIRS + 1)


def test_kl_consumes_selection_and_rejects_foreign_ones(planted, ga_s2, tmp_path):
    from ds_hybrid.trainer import make_context

    path = ga_s2[1]
    cfg = load_config(planted["cfg"], [f"softmax_layers={{selection: {path}, k: 1}}"])
    ctx = make_context(cfg, "kl")
    assert ctx.softmax_layers == [PLANTED]
    # another teacher
    sel = json.loads(path.read_text())
    sel["teacher"]["content"] = "0" * 16
    other = tmp_path / "other_teacher.json"
    other.write_text(json.dumps(sel))
    with pytest.raises(ConfigError, match=r"softmax_layers\.selection.*computed for teacher"):
        make_context(load_config(planted["cfg"], [f"softmax_layers={{selection: {other}, k: 1}}"]), "kl")
    # another align checkpoint
    sel = json.loads(path.read_text())
    sel["align"]["content"] = "1" * 16
    other.write_text(json.dumps(sel))
    with pytest.raises(ConfigError, match=r"softmax_layers\.selection.*align checkpoint"):
        make_context(load_config(planted["cfg"], [f"softmax_layers={{selection: {other}, k: 1}}"]), "kl")


def test_agreement_measures():
    assert kendall_tau([0, 1, 2, 3], [0, 1, 2, 3]) == 1.0
    assert kendall_tau([0, 1, 2, 3], [3, 2, 1, 0]) == -1.0
    # mixed orders, counted by hand: 6 pairs; one swapped pair (5 - 1) / 6; the last item first, 3 of 6 pairs swapped
    assert kendall_tau([0, 1, 2, 3], [1, 0, 2, 3]) == pytest.approx(4 / 6)
    assert kendall_tau([0, 1, 2, 3], [3, 0, 1, 2]) == pytest.approx(0.0)
    assert kendall_tau([0, 1, 2, 3, 9], [2, 0, 1, 3, 8]) == pytest.approx(2 / 6)  # over the items both rank
    assert topk_overlap([5, 1, 2], [1, 5, 9], 2) == 1.0 and topk_overlap([5, 1, 2], [1, 7, 9], 2) == 0.5


def test_distance_regularized_selection_reuses_the_probes(planted, ga_s2, quick_selections):
    """select.distance_reg reranks the GA-S2 probes (no probe runs again) and is written beside the plain selection."""
    plain, _ = ga_s2
    p = quick_selections["distance_reg"]  # select.method=ga_s2 select.distance_reg=5
    assert p.returncode == 0, tail(p)
    assert not re.findall(r"probe \S+ \(\d+/\d+\)", p.stdout)  # every probe was found done: none trained again
    assert len(re.findall(r"probe \S+ already done", p.stdout)) == 5  # 4 layers + the all-linear baseline
    sel = read_selection(planted["out"] / "select" / "ga_s2" / "distance_reg_5" / "selection.json")
    assert sel["ranking_plain"] == plain["ranking"] and sel["scores"] == plain["scores"]
    assert sel["ranking"][0] == PLANTED and sel["distance_reg"] == 5
    # a weight this large makes the two chosen layers of 4 non-adjacent, whatever the scores
    assert abs(sel["chosen"]["ratio=0.5"][0] - sel["chosen"]["ratio=0.5"][1]) > 1


def test_ga_s2_recall_score_reranks_the_same_probes(planted, tmp_path):
    """With rows long enough for a needle (>= 128 tokens), every probe also records a recall score at its held-out
    evaluation; select.score=recall then ranks by it from the finished probes, beside the plain selection."""
    out = tmp_path / "out"
    shutil.copytree(planted["out"] / "align", out / "align")
    probe = ["select.method=ga_s2", f"out_dir={out}", "select.probe.seq_len=128", f"select.probe.tokens={3 * 8 * 128}"]
    runs = [["--stage", "select", "--config", str(planted["cfg"]), *probe],
            ["--stage", "select", "--config", str(planted["cfg"]), *probe, "select.score=recall"]]
    for p in train_in_one_process(runs, tmp_path / "runs.json"):
        assert p.returncode == 0, tail(p)
    sel_dir = out / "select" / "ga_s2"
    plain, sel = read_selection(sel_dir / "selection.json"), read_selection(sel_dir / "score_recall" / "selection.json")
    assert sel["budget"]["score"] == "recall" and sel["ranking"][0] == PLANTED == plain["ranking"][0]
    done = json.loads((sel_dir / "probes" / f"layer_{PLANTED:03d}" / "kl" / "DONE").read_text())
    assert done["val"]["recall_nll"] > 0 and done["val"]["recall_kl"] >= 0
    # the score: KL to the teacher on the answers' tokens (this random teacher retrieves nothing: its -log p of an
    # answer is ~log V for every probe, recorded as recall_nll)
    assert sel["scores"][str(PLANTED)] == done["val"]["recall_kl"] != plain["scores"][str(PLANTED)]
    # no probe ran again for the second selection
    assert max(f.stat().st_mtime for f in sel_dir.glob("probes/*/kl/DONE")) < \
        (sel_dir / "score_recall" / "selection.json").stat().st_mtime


def test_a_selection_of_an_align_export_retrained_since_is_named_stale(planted, tmp_path):
    """A retrained align export: the kept selection is said to be stale (stage kl would refuse it), and the fix is
    --force, which ranks the new export's layers."""
    from safetensors.torch import load_file, save_file

    out = tmp_path / "out"
    shutil.copytree(planted["out"] / "align", out / "align")
    base = ["--stage", "select", "--config", str(planted["cfg"]), f"out_dir={out}", "select.method=mse", "select.ks=[1]"]
    (first,) = train_in_one_process([base], tmp_path / "r1.json")
    assert first.returncode == 0, tail(first)
    weights = next(w for w in sorted((out / "align" / "hf").glob("*.safetensors"))
                   if any("self_attn" in n for n in load_file(w)))
    tensors = load_file(weights)
    name = next(n for n in tensors if "self_attn" in n)
    tensors[name] = tensors[name] + 1.0  # "retrained"
    save_file(tensors, weights, metadata={"format": "pt"})
    kept, forced = train_in_one_process([base, [*base, "--force"]], tmp_path / "r2.json")
    said = kept.stdout + kept.stderr
    assert kept.returncode == 0 and "computed from an align export that has changed since" in said, tail(kept)
    assert "rerun stage select with --force" in said
    assert forced.returncode == 0, tail(forced)
    assert "changed since" not in forced.stdout + forced.stderr


def test_a_selection_made_from_other_settings_is_kept_with_what_changed_and_force_makes_it_again(planted, tmp_path):
    """A rerun keeps an existing selection.json (a later, unrelated change must not block a pipeline), says which
    settings changed since, and --force makes it again from the new ones."""
    out = tmp_path / "out"
    base = ["--stage", "select", "--config", str(planted["cfg"]), f"out_dir={out}", "select.method=uniform"]
    runs = [[*base, "select.ks=[1]"], [*base, "select.ks=[2]", "data.num_proc=2"], [*base, "select.ks=[2]", "--force"]]
    first, kept, forced = train_in_one_process(runs, tmp_path / "runs.json")
    target = out / "select" / "uniform" / "selection.json"
    assert first.returncode == 0, tail(first)
    # a spacing rule's summary names the rule and what it chose, not its chart order (which is no ranking of it)
    assert re.search(r"select uniform: rule uniform_layers\(L, K\) \| k=1: \[0\], ", first.stdout + first.stderr), \
        tail(first)
    assert kept.returncode == 0 and "made from other settings (select.ks changed since): kept" in kept.stdout + \
        kept.stderr, tail(kept)  # data.num_proc is not a setting a selection depends on
    assert forced.returncode == 0, tail(forced)
    sel = read_selection(target)
    assert "k=2" in sel["chosen"] and sel["settings"]["select.ks"] == [2]
    # a record from before a setting was recorded (data.revision, data.hub_config, kl.dw_fp32: 2026-12-06) is from
    # the same settings where the new ones are at their defaults of then (None; kl.dw_fp32 true)
    raw = json.loads(target.read_text())
    assert raw["settings"]["kl.dw_fp32"] is True
    raw["settings"] = {k: v for k, v in raw["settings"].items()
                       if k not in ("data.revision", "data.hub_config", "kl.dw_fp32")}
    target.write_text(json.dumps(raw))
    again, wide = train_in_one_process([[*base, "select.ks=[2]"], [*base, "select.ks=[2]", "kl.dw_fp32=false"]],
                                       tmp_path / "again.json")
    assert again.returncode == 0 and "from these settings; nothing to do" in again.stdout + again.stderr, tail(again)
    assert wide.returncode == 0 and "(kl.dw_fp32 changed since): kept" in wide.stdout + wide.stderr, tail(wide)
