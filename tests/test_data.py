"""Data: the sharded token cache (budget, resume after a kill, two builds sharing a cache, flat memory, held-out
documents), the embedded corpus (sources, markup, duplicates, manifest) and mixtures."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from trainer_utils import REPO, env

from ds_hybrid.config import DataConfig, load_config
from ds_hybrid.data import DATA_SOURCE, PackedSequences, prepare_streams, units_for
from ds_hybrid.errors import ConfigError
from ds_hybrid.tokencache import Unit, done_marker, iter_documents

WORDS = ("alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa quebec "
         "romeo sierra tango uniform victor whiskey xray yankee zulu the of and to in is was for on that").split()


@pytest.fixture(scope="module")
def tok():
    from ds_hybrid.teacher import load_tokenizer

    return load_tokenizer("embedded")


def write_jsonl(folder: Path, n_files: int, docs_per_file: int, words_per_doc: int, seed: int = 0) -> Path:
    """Files of documents of random words, each document opening with a unique id word (doc<file>x<n>)."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for f in range(n_files):
        with open(folder / f"shard{f:03d}.jsonl", "w") as out:
            for d in range(docs_per_file):
                text = f"doc{f}x{d} " + " ".join(rng.choice(WORDS) for _ in range(words_per_doc))
                out.write(json.dumps({"text": text, "meta": f}) + "\n")
    return folder


def data_cfg(source, cache: Path, **kw) -> DataConfig:
    return DataConfig(source=str(source), cache_dir=str(cache), val_tokens=kw.pop("val_tokens", 2000),
                      num_proc=kw.pop("num_proc", 1), **kw)


def test_local_sources_become_units(tmp_path):
    docs = tmp_path / "texts"
    docs.mkdir()
    for i in range(300):
        (docs / f"d{i}.txt").write_text(f"text {i}")
    assert [len(u.paths) for u in units_for(data_cfg(docs, tmp_path))[DATA_SOURCE]] == [256, 44]
    jl = write_jsonl(tmp_path / "jl", 3, 2, 5)
    units = units_for(data_cfg(jl, tmp_path))[DATA_SOURCE]
    assert [(u.index, u.kind, Path(u.paths[0]).name) for u in units] == [(i, "jsonl", f"shard00{i}.jsonl") for i in range(3)]
    assert list(iter_documents(units[1]))[1].startswith("doc1x1 ")


def test_parquet_and_hub_style_streams_read_the_same_documents(tmp_path):
    import datasets

    jl = write_jsonl(tmp_path / "jl", 2, 50, 8)
    ds = datasets.load_dataset("json", data_files=[str(jl / "shard001.jsonl")], split="train")
    ds.to_parquet(str(tmp_path / "s.parquet"))
    want = list(iter_documents(Unit("s", 0, "jsonl", (str(jl / "shard001.jsonl"),))))
    assert list(iter_documents(Unit("s", 0, "parquet", (str(tmp_path / "s.parquet"),)))) == want
    files = (str(jl / "shard000.jsonl"), str(jl / "shard001.jsonl"))
    hub = [list(iter_documents(Unit("s", i, "hub", (), ("json", None, "train", i, 2, files)))) for i in range(2)]
    assert hub[1] == want and hub[0][0].startswith("doc0x0 ")  # datasets' streaming shards = the files


class HfHubHTTPError(Exception):
    """Stand-ins for huggingface_hub's errors, known by their class names along the hierarchy."""


class RevisionNotFoundError(HfHubHTTPError):
    pass


class RepositoryNotFoundError(HfHubHTTPError):
    pass


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    """A hub dataset "org/corpus" (configuration "sample") whose commits are local jsonl folders read by `datasets`'
    json builder: (branch {name: commit}, folders {commit: folder}, the revisions opened)."""
    import datasets
    import huggingface_hub

    old, new = write_jsonl(tmp_path / "old", 2, 30, 20, seed=0), write_jsonl(tmp_path / "new", 2, 30, 20, seed=1)
    branch = {"main": "a" * 40}
    folders = {"a" * 40: old, "b" * 40: new}
    opened: list[str] = []

    class Info:
        def __init__(self, sha):
            self.sha = sha

    def dataset_info(self, name, revision=None, **kw):
        if name != "org/corpus":
            raise RepositoryNotFoundError(f"{name} not found")
        sha = branch.get(revision or "main", revision)
        if sha not in folders:
            raise RevisionNotFoundError(f"revision {revision} not found")
        return Info(sha)

    real = datasets.load_dataset

    def load_dataset(name, config=None, split=None, streaming=False, data_files=None, revision=None, **kw):
        assert name == "org/corpus" and config == "sample" and streaming
        opened.append(revision)
        return real("json", data_files=sorted(str(f) for f in folders[revision].glob("*.jsonl")), split=split,
                    streaming=True)

    monkeypatch.setattr(huggingface_hub.HfApi, "dataset_info", dataset_info)
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return branch, folders, opened


def test_a_hub_source_is_tokenized_at_one_commit_and_an_update_is_a_new_cache(tmp_path, tok, fake_hub):
    """A hub dataset's tokens are keyed by the commit its revision is at: every worker streams that commit, and the
    dataset moving on (a new commit on its default branch) tokenizes again instead of reusing or mixing the old
    tokens."""
    branch, folders, opened = fake_hub
    old = folders["a" * 40]
    cfg = DataConfig(source="org/corpus", hub_config="sample", cache_dir=str(tmp_path / "cache"), val_tokens=500,
                     num_proc=1)
    first = prepare_streams(cfg, tok)
    assert first.meta["hub"] == {"config": "sample", "revision": None, "commit": "a" * 40}
    assert set(opened) == {"a" * 40}  # the units' listing and every shard's stream: the resolved commit
    want = np.concatenate([a for _, a in prepare_streams(data_cfg(old, tmp_path / "local"), tok).train])
    assert np.array_equal(np.concatenate([a for _, a in first.train]), want)  # the commit's documents, in order
    branch["main"] = "b" * 40  # the dataset moves on
    moved = prepare_streams(cfg, tok)
    assert moved.path != first.path and moved.meta["hub"]["commit"] == "b" * 40
    assert not np.array_equal(np.concatenate([a for _, a in moved.train])[:100], want[:100])
    pinned = prepare_streams(dataclasses.replace(cfg, revision="a" * 40), tok)  # data.revision pins the old commit: reused
    assert pinned.path == first.path and pinned.meta["hub"]["revision"] == "a" * 40
    with pytest.raises(ConfigError, match=r"^data\.revision='v9': the hub dataset 'org/corpus' has no such branch"):
        units_for(dataclasses.replace(cfg, revision="v9"))


def test_a_run_reads_one_commit_of_a_hub_dataset_in_every_stage_and_resume(tmp_path, fake_hub, caplog):
    """The commit is resolved once per run (the main rank; kept in out_dir/hub_commit.json): a later stage, probe or
    resume reads the same commit after the dataset moved on, and the probes' data identity holds it; a data.revision
    changed since resolves again, said in a warning."""
    from ds_hybrid.data import HUB_PIN, hub_commit, pin_hub_commit
    from ds_hybrid.stages.probes import DATA_FIELDS

    branch, _, _ = fake_hub
    over = [f"out_dir={tmp_path / 'run'}", "data.source=org/corpus", "data.hub_config=sample"]
    align = load_config(None, over)
    pin_hub_commit(align)
    assert align.data.revision == "a" * 40 and json.loads((tmp_path / "run" / HUB_PIN).read_text())["commit"] == "a" * 40
    branch["main"] = "b" * 40  # the dataset moves on between the run's stages
    kl = load_config(None, over)
    pin_hub_commit(kl)
    assert kl.data.revision == "a" * 40 and "revision" in DATA_FIELDS and "earlier stages read" not in caplog.text
    moved = load_config(None, over + ["data.revision=main"])  # another revision asked for: resolved, and said
    pin_hub_commit(moved)
    assert moved.data.revision == "b" * 40 and "this run's earlier stages read other data settings" in caplog.text
    with pytest.raises(ConfigError, match=r"^data\.revision='v9': .* has no such branch, tag or commit"):
        pin_hub_commit(load_config(None, over + ["data.revision=v9"]))
    with pytest.raises(ConfigError, match=r"^data\.source='org/none': .* not a dataset this machine may read .*and "
                                          r"no local file or folder has that path here"):
        pin_hub_commit(load_config(None, [f"out_dir={tmp_path / 'other'}", "data.source=org/none"]))
    assert hub_commit("org/corpus", "c" * 40) == "c" * 40  # a full commit: no call (the fake hub has no such one)
    (tmp_path / "run" / HUB_PIN).write_text("{not json")  # a damaged pin: taken as absent, resolved again
    again = load_config(None, over + ["data.revision=main"])
    pin_hub_commit(again)
    assert again.data.revision == "b" * 40 and "is unreadable" in caplog.text
    (tmp_path / "afile").write_text("")  # an out_dir that cannot be a folder: named as out_dir, not data.source
    with pytest.raises(ConfigError, match=r"^out_dir='.*afile': the hub dataset's commit cannot be recorded in .* "
                                          r"make out_dir a writable folder"):
        pin_hub_commit(load_config(None, [f"out_dir={tmp_path / 'afile'}", *over[1:]]))


def test_prepare_data_of_a_hub_run_pins_the_commit_it_tokenizes(tmp_path, fake_hub, monkeypatch):
    """`train.py --prepare-data` (a CPU node, before the GPU job) pins the commit too: the stage after it reads the
    tokens it prepared even where the dataset moved on in between."""
    from ds_hybrid.data import HUB_PIN
    from ds_hybrid.trainer import prepare_data

    branch, _, _ = fake_hub
    over = [f"out_dir={tmp_path / 'run'}", "data.source=org/corpus", "data.hub_config=sample", "data.val_tokens=500",
            f"data.cache_dir={tmp_path / 'cache'}", "data.num_proc=1", "align.tokens=2000", "align.seq_len=64"]
    rec = prepare_data(load_config(None, over), "align")
    assert rec["hub"]["commit"] == "a" * 40 and json.loads((tmp_path / "run" / HUB_PIN).read_text())["commit"] == "a" * 40
    assert rec["hub"]["requested"] is None  # (the default branch: the run's records say what was asked, beside the commit)
    branch["main"] = "b" * 40
    assert prepare_data(load_config(None, over), "align")["data_cache"] == rec["data_cache"]
    tagged = prepare_data(load_config(None, over + [f"out_dir={tmp_path / 'run2'}", "data.revision=main"]), "align")
    assert tagged["hub"]["requested"] == "main" and tagged["hub"]["commit"] == "b" * 40
    named = prepare_data(load_config(None, over + [f"out_dir={tmp_path / 'run3'}", f"data.revision={'a' * 40}"]),
                         "align")  # (a commit named: nothing resolved, no pin; the record says the commit asked for)
    assert named["hub"]["requested"] == named["hub"]["commit"] == "a" * 40
    # the GPU job on offline nodes: the run is pinned and its tokens are built, so neither the commit nor the shard
    # listing is asked of the hub again (each stage, probe and resume listed the shards online before)
    import datasets
    import huggingface_hub

    def offline(*a, **k):
        raise OSError("offline (simulated)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    monkeypatch.setattr(huggingface_hub.HfApi, "dataset_info", offline)
    assert prepare_data(load_config(None, over), "align")["data_cache"] == rec["data_cache"]


@pytest.mark.parametrize("revision", [None, "main"])
def test_eval_reads_a_hub_runs_held_out_rows_at_the_runs_commit(tmp_path, tok, fake_hub, revision):
    """`eval --run-config` of a hub run reads the commit the run pinned (not the default branch's newest), so its
    held-out rows are the run's and pass the check against its run_info."""
    from argparse import Namespace

    import yaml

    from ds_hybrid.data import pin_hub_commit
    from ds_hybrid.evaluation.run import _heldout_rows

    branch, _, _ = fake_hub
    data = {"source": "org/corpus", "hub_config": "sample", "val_tokens": 500, "cache_dir": str(tmp_path / "cache"),
            "num_proc": 1, "revision": revision}
    run_yaml = tmp_path / "run.yaml"
    run_yaml.write_text(yaml.safe_dump({"data": data, "out_dir": str(tmp_path / "run")}))
    run = load_config(str(run_yaml))
    pin_hub_commit(run)  # the run's first stage
    meta = prepare_streams(run.data, tok, need_tokens=0).meta
    (tmp_path / "run" / "kl").mkdir(parents=True)
    (tmp_path / "run" / "kl" / "run_info.json").write_text(json.dumps({"data": meta}))
    branch["main"] = "b" * 40  # the dataset moved on after the run
    args = Namespace(data="embedded", run_config=str(run_yaml), heldout_seq_len=32, heldout_sequences=4)
    got = torch.cat(_heldout_rows(args, tok)[0])  # (a row of the new commit would fail the run_info check)
    want = PackedSequences(prepare_streams(run.data, tok, need_tokens=0).val, 32, max_rows=4)
    assert torch.equal(got, torch.cat([want[[i]] for i in range(len(want))]))


def test_budget_tokenizes_only_the_units_it_needs_and_a_larger_one_extends_the_cache(tmp_path, tok):
    jl = write_jsonl(tmp_path / "jl", 20, 40, 60)
    cfg = data_cfg(jl, tmp_path / "cache")
    small = prepare_streams(cfg, tok, need_tokens=25_000)
    per_unit = small.meta["sources"][DATA_SOURCE]["train_tokens"] / small.meta["sources"][DATA_SOURCE]["units"]
    assert small.meta["sources"][DATA_SOURCE]["units"] == int(np.ceil(25_000 / per_unit)) < 20
    assert small.meta["train_tokens"] >= 25_000
    done = sorted(p.name for p in small.path.glob(f"{DATA_SOURCE}/u*.json"))
    assert len(done) == small.meta["sources"][DATA_SOURCE]["units"]
    mtimes = {p: p.stat().st_mtime_ns for p in small.path.glob(f"{DATA_SOURCE}/u*.bin")}
    big = prepare_streams(cfg, tok, need_tokens=60_000)
    assert big.path == small.path and big.meta["sources"][DATA_SOURCE]["units"] > len(done)
    assert all(p.stat().st_mtime_ns == m for p, m in mtimes.items())  # what was there is reused, not redone
    again = prepare_streams(cfg, tok, need_tokens=25_000)  # a rerun of the small budget sees the same prefix
    assert again.meta["train_tokens"] == small.meta["train_tokens"]
    assert np.array_equal(np.concatenate([a for _, a in again.train]), np.concatenate([a for _, a in small.train]))


def test_a_stop_during_a_build_keeps_the_units_done_and_a_rerun_goes_on_from_them(tmp_path, tok):
    """Slurm's time-limit warning while a corpus of hours is tokenized: the build went on past it (to be killed at
    the limit, not requeued). ``stop`` is asked before each wave of units; what it raises ends the build there, the
    units done kept for the next run."""
    jl = write_jsonl(tmp_path / "jl", 6, 40, 60)
    cfg = data_cfg(jl, tmp_path / "cache")  # (num_proc 1: a wave of one unit)
    asked = []

    def stop():
        asked.append(1)
        if len(asked) == 3:
            raise KeyboardInterrupt("the warning came (simulated)")

    with pytest.raises(KeyboardInterrupt, match="simulated"):
        prepare_streams(cfg, tok, stop=stop)
    done = list((tmp_path / "cache").glob(f"*/{DATA_SOURCE}/u*.json"))
    assert len(done) == 2 and len(asked) == 3
    stamps = {p: p.stat().st_mtime_ns for p in done}
    whole = prepare_streams(cfg, tok, stop=lambda: None)
    assert whole.meta["sources"][DATA_SOURCE]["units"] == 6
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())  # (kept, not tokenized again)


def test_tokenizer_workers_leave_the_time_limit_warning_to_the_build():
    """SIGUSR1 or SIGTERM sent to every process of a Slurm job killed the spawned tokenizer workers (their default
    action): the pool broke and the job failed with a traceback instead of stopping between waves."""
    import multiprocessing as mp
    import signal
    from concurrent.futures import ProcessPoolExecutor

    from ds_hybrid.tokencache import _worker_init

    with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn"), initializer=_worker_init,
                             initargs=(True,)) as pool:  # (a build with a stop check)
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            assert pool.submit(signal.raise_signal, sig).result(timeout=120) is None


def test_the_budget_is_met_in_whole_rows_when_each_file_leaves_a_remainder(tmp_path, tok):
    """A row never spans two files (units): the prefix is sized by the rows it gives, not by tokens that are then
    dropped, so a corpus of many small files does not wrap into a second epoch while unread files remain."""
    jl = write_jsonl(tmp_path / "jl", 40, 10, 100)  # ~1,500 tokens a file: one 1,024-token row each, ~500 dropped
    cfg = data_cfg(jl, tmp_path / "cache")
    s = prepare_streams(cfg, tok, need_tokens=25_000, seq_len=1024)
    rows = len(PackedSequences(s.train, 1024))
    units = s.meta["sources"][DATA_SOURCE]["units"]
    assert rows * 1024 >= 25_000 and units < 40
    by_tokens = prepare_streams(cfg, tok, need_tokens=25_000)  # counted in tokens: too few rows
    assert len(PackedSequences(by_tokens.train, 1024)) * 1024 < 25_000


def test_prepare_data_builds_the_cache_a_stage_then_reuses(tmp_path, tok, capsys):
    from ds_hybrid import train
    from ds_hybrid.trainer import prepare_data

    jl = write_jsonl(tmp_path / "jl", 20, 40, 60)
    over = [f"data.source={jl}", f"data.cache_dir={tmp_path / 'cache'}", "data.val_tokens=2000", "data.num_proc=1",
            "align.tokens=25000"]
    assert train.main(["--stage", "align", *over[:2], "--prepare-data", *over[2:]]) == 0  # options after overrides
    rec = json.loads(capsys.readouterr().out)
    cfg = load_config(None, over)
    stage_streams = prepare_streams(cfg.data, tok, need_tokens=25_000, seq_len=cfg.align.seq_len)  # what align reads
    assert rec["data_cache"] == str(stage_streams.path) and rec["train_tokens"] == stage_streams.meta["train_tokens"]
    assert 25_000 <= rec["train_tokens"] and rec["sources"][DATA_SOURCE]["units"] < 20  # only what the budget needs
    mtimes = {p: p.stat().st_mtime_ns for p in stage_streams.path.glob(f"{DATA_SOURCE}/u*.bin")}
    assert prepare_data(load_config(None, over), "align")["train_tokens"] == rec["train_tokens"]
    assert all(p.stat().st_mtime_ns == m for p, m in mtimes.items())  # reused, not redone
    # stage select: what its probes read (select.probe.tokens at their row length), not the whole corpus
    probes = prepare_data(load_config(None, [*over, "select.probe.tokens=25000", "select.probe.seq_len=1024"]),
                          "select")
    assert probes["train_tokens"] == rec["train_tokens"] and probes["sources"][DATA_SOURCE]["units"] < 20


def test_held_out_documents_are_never_trained_on_and_depend_only_on_split_seed(tmp_path, tok):
    jl = write_jsonl(tmp_path / "jl", 3, 200, 40)  # ~1,500 held-out tokens a file: the first two hold them out
    a = prepare_streams(data_cfg(jl, tmp_path / "c1"), tok)
    text = tok.decode(np.concatenate([x for _, x in a.train]).tolist())
    held = tok.decode(np.concatenate([x for _, x in a.val]).tolist())
    ids = __import__("re").findall(r"doc\d+x\d+", held)  # documents are concatenated without separators
    assert 2000 <= a.meta["val_tokens"] and len(ids) == a.meta["val_documents"] >= 2
    assert all(f"{i} " not in text for i in ids)  # no held-out document in the training stream
    b = prepare_streams(data_cfg(jl, tmp_path / "c2"), tok, need_tokens=1)  # another budget, another cache
    assert np.array_equal(np.concatenate([x for _, x in b.val]), np.concatenate([x for _, x in a.val]))
    c = prepare_streams(data_cfg(jl, tmp_path / "c3", split_seed=7), tok)
    assert not np.array_equal(np.concatenate([x for _, x in c.val]), np.concatenate([x for _, x in a.val]))


BUILD = """
import sys, json
from ds_hybrid.config import DataConfig
from ds_hybrid.data import prepare_streams
from ds_hybrid.teacher import load_tokenizer
cfg = DataConfig(source=sys.argv[1], cache_dir=sys.argv[2], val_tokens=2000, num_proc=int(sys.argv[3]))
s = prepare_streams(cfg, load_tokenizer("embedded"))
print(json.dumps({"train": s.meta["train_tokens"], "path": str(s.path)}))
"""


def _build_proc(jl: Path, cache: Path, num_proc: int = 1) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", BUILD, str(jl), str(cache), str(num_proc)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env(), cwd=REPO, start_new_session=True)


def _tokens(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.glob(f"{DATA_SOURCE}/u*.bin"))}


@pytest.mark.slow
def test_a_killed_build_resumes_and_two_builds_can_share_a_cache(tmp_path):
    jl = write_jsonl(tmp_path / "jl", 12, 150, 120)
    proc = _build_proc(jl, tmp_path / "cache")
    deadline = time.time() + 120
    markers = []
    while time.time() < deadline and proc.poll() is None:
        markers = list((tmp_path / "cache").glob(f"*/{DATA_SOURCE}/u*.json"))
        if len(markers) >= 3:
            break
        time.sleep(0.05)
    assert 3 <= len(markers) < 12, "the build finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    kept = {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").glob(f"*/{DATA_SOURCE}/u*.json")}
    procs = [_build_proc(jl, tmp_path / "cache", 2), _build_proc(jl, tmp_path / "cache", 1)]  # resume, twice at once
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    res = [json.loads(o[0].strip().splitlines()[-1]) for o in outs]
    assert res[0] == res[1]
    for p, m in kept.items():
        assert p.stat().st_mtime_ns == m  # units finished before the kill were not redone
    path = Path(res[0]["path"])
    assert not [p for p in path.rglob(".*") if p.is_file()]  # no temp files left behind
    clean = _build_proc(jl, tmp_path / "clean")
    out, err = clean.communicate(timeout=300)
    assert clean.returncode == 0, err
    assert _tokens(path) == _tokens(Path(json.loads(out.strip().splitlines()[-1])["path"]))


BAD_FIELD = """
import sys
from ds_hybrid.config import DataConfig
from ds_hybrid.data import prepare_streams
from ds_hybrid.errors import ConfigError
from ds_hybrid.teacher import load_tokenizer
try:
    prepare_streams(DataConfig(source=sys.argv[1], cache_dir=sys.argv[2], val_tokens=200, num_proc=2),
                    load_tokenizer("embedded"))
except ConfigError as e:
    print("ConfigError", e.field)
"""


@pytest.mark.slow
def test_a_workers_config_error_reaches_the_user_by_name(tmp_path):
    """A later file without the text field fails in a tokenizer worker: its ConfigError comes back as itself (it
    pickles by its fields) instead of killing the pool's result thread and leaving the build waiting forever."""
    import pickle

    e = pickle.loads(pickle.dumps(ConfigError("data.text_field", "text", "fix it")))
    assert (type(e), e.field, e.value, e.fix, str(e)) == (ConfigError, "data.text_field", "text", "fix it",
                                                          "data.text_field='text': fix it")
    jl = write_jsonl(tmp_path / "jl", 3, 40, 50)
    lines = (jl / "shard002.jsonl").read_text().replace('"text"', '"content"')
    (jl / "shard002.jsonl").write_text(lines)
    p = subprocess.run([sys.executable, "-c", BAD_FIELD, str(jl), str(tmp_path / "cache")], capture_output=True,
                       text=True, env=env(), cwd=REPO, timeout=240)
    assert p.stdout.strip().splitlines()[-1:] == ["ConfigError data.text_field"], (p.stdout, p.stderr[-2000:])


MANY_SHARDS = """
import resource, sys
import numpy as np
from ds_hybrid.tokencache import read_shards
root = sys.argv[1]
resource.setrlimit(resource.RLIMIT_NOFILE, (int(sys.argv[2]), resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
shards = read_shards(root, [{"source": "data", "index": i} for i in range(300)], "train", np.dtype("uint16"))
print(len(shards), sum(int(a[0]) for a in shards))
"""


def test_a_prefix_of_more_files_than_the_open_file_limit_maps(tmp_path):
    """Each memory-mapped shard holds a file descriptor: 300 shards under a soft limit of 128 still map (the limit
    is raised toward the hard one)."""
    import resource

    if resource.getrlimit(resource.RLIMIT_NOFILE)[1] not in (resource.RLIM_INFINITY,) and \
            resource.getrlimit(resource.RLIMIT_NOFILE)[1] < 2048:
        pytest.skip("the hard open-file limit is too low to raise")
    (tmp_path / "data").mkdir()
    for i in range(300):
        np.full(4, i, dtype=np.uint16).tofile(tmp_path / "data" / f"u{i:05d}.train.bin")
    p = subprocess.run([sys.executable, "-c", MANY_SHARDS, str(tmp_path), "128"], capture_output=True, text=True,
                       env=env(), cwd=REPO, timeout=120)
    assert p.returncode == 0 and p.stdout.split() == ["300", str(sum(range(300)))], p.stderr[-2000:]


MEASURE = """
import sys, json, threading, time, psutil
from ds_hybrid.config import DataConfig
from ds_hybrid.data import prepare_streams
from ds_hybrid.teacher import load_tokenizer
tok = load_tokenizer("embedded")
proc, peak, stop = psutil.Process(), [0], []
base = proc.memory_info().rss
def watch():
    while not stop:
        peak[0] = max(peak[0], proc.memory_info().rss)
        time.sleep(0.02)
t = threading.Thread(target=watch, daemon=True); t.start()
s = prepare_streams(DataConfig(source=sys.argv[1], cache_dir=sys.argv[2], val_tokens=2000), tok,
                    need_tokens=float(sys.argv[3]))
stop.append(1); t.join()
print(json.dumps({"growth": peak[0] - base, "train": s.meta["train_tokens"], "units": s.meta["sources"]["data"]["units"]}))
"""


@pytest.mark.slow
def test_memory_stays_flat_while_a_corpus_ten_times_the_budget_streams(tmp_path):
    jl = write_jsonl(tmp_path / "jl", 4, 1500, 300)  # 4 files of ~0.45M tokens each
    runs = {}
    for name, need in (("budget", 1.8e5), ("whole", float("inf"))):
        p = subprocess.run([sys.executable, "-c", MEASURE, str(jl), str(tmp_path / name), str(need)],
                           capture_output=True, text=True, env=env(), cwd=REPO, timeout=600)
        assert p.returncode == 0, p.stderr[-3000:]
        runs[name] = json.loads(p.stdout.strip().splitlines()[-1])
    assert runs["budget"]["units"] == 1 and runs["whole"]["units"] == 4
    assert runs["whole"]["train"] >= 10 * 1.8e5 * 0.9  # the corpus is ~10x the budget, and all of it was tokenized
    # the whole corpus (~1.8M tokens, 7 MB as text) costs no more memory than one file of it: batches, not files
    assert runs["whole"]["growth"] < runs["budget"]["growth"] + 64 * 2**20
    assert runs["whole"]["growth"] < 256 * 2**20


def test_mixture_reweights_sources_and_evaluation_covers_every_source():
    a = np.arange(100 * 10, dtype=np.uint16)
    b = np.arange(300 * 10, dtype=np.uint16)
    shards = [("a", a), ("b", b[:1500]), ("b", b[1500:])]
    natural = PackedSequences(shards, 10)
    assert natural.source_rows == {"a": 100, "b": 300} and len(natural) == 400
    mixed = PackedSequences(shards, 10, mixture={"a": 2.0}, seed=0)
    assert mixed.source_rows == {"a": 200, "b": 300}  # a's share doubles: 2 x 100 / (2 x 100 + 300) of the rows
    rows = mixed[np.arange(200)]
    assert len({tuple(r.tolist()) for r in rows}) == 100  # a's 100 rows, each twice
    # b, weight 1, keeps each of its rows once a pass (it used to be scaled to 240 of them: 60 lost)
    assert len({tuple(r.tolist()) for r in mixed[np.arange(200, 500)]}) == 300
    half = PackedSequences(shards, 10, mixture={"b": 0.5}, seed=0)
    assert half.source_rows == {"a": 100, "b": 150}  # a once each (it used to be 160: 60 of them twice), b a subset
    assert len({tuple(r.tolist()) for r in half[np.arange(100)]}) == 100
    assert PackedSequences(shards, 10, mixture={"b": 0}, seed=0).source_rows == {"a": 100, "b": 0}
    ev = PackedSequences(shards, 10, max_rows=4)
    assert [int(ev[[i]][0, 0]) for i in range(4)] == [0, 0, 10, 10]  # a, b, a, b
    with pytest.raises(ConfigError, match=r"data\.mixture\.x=-1"):
        load_config(None, ["data.mixture={x: -1}"])
    for bad in (".nan", ".inf"):  # (NaN < 0 is False: they reached the row count, a ValueError or OverflowError)
        with pytest.raises(ConfigError, match=r"^data\.mixture\.x=(nan|inf): weights are finite numbers"):
            load_config(None, [f"data.mixture={{x: {bad}, y: 1}}"])
    # a positive weight that rounds to no row is refused by name, not a source silently left out
    with pytest.raises(ConfigError, match=r"^data\.mixture\.b=0\.001: gives 0 of the source's 300 rows .*at least "
                                          r"0\.00333"):
        PackedSequences(shards, 10, mixture={"b": 0.001}, seed=0)
    for n in (1, 7, 300):  # the weight suggested gives a row (0.5 / rows, suggested until 2026-12-07, rounded to 0)
        rows = [("a", np.arange(1000, dtype=np.uint16)), ("b", np.arange(10 * n, dtype=np.uint16))]
        assert PackedSequences(rows, 10, mixture={"b": float(f"{1 / n:.3g}")}, seed=0).source_rows["b"] >= 1


def test_sources_whose_held_out_share_is_shorter_than_a_row_are_warned_of(caplog, monkeypatch):
    """At a long seq_len a source's held-out share may hold no whole row: its text then drops out of the held-out
    score; the main process says which sources, with the fix."""
    import logging

    from ds_hybrid.data import TokenStreams, warn_unrepresented

    val = [("poetry", np.zeros(3000, np.uint16)), ("code", np.zeros(9000, np.uint16)), ("empty", np.zeros(0, np.uint16))]
    streams = TokenStreams(train=[], val=val, meta={}, path=Path("."))
    with caplog.at_level(logging.WARNING, logger="ds_hybrid"):
        assert warn_unrepresented(streams, PackedSequences(val, 2048, max_rows=16), "kl.seq_len") == []
        assert warn_unrepresented(streams, PackedSequences(val, 4096, max_rows=16), "kl.seq_len") == ["poetry"]
        monkeypatch.setenv("RANK", "1")
        assert warn_unrepresented(streams, PackedSequences(val, 4096, max_rows=16), "kl.seq_len") == ["poetry"]
    (said,) = [r.getMessage() for r in caplog.records]
    assert said.startswith("kl.seq_len=4096: 1 of 2 sources hold out less than one row of text (poetry)")
    assert "raise data.val_tokens" in said


def test_a_rank_that_cannot_see_the_main_ranks_cache_says_it_must_be_shared(tmp_path):
    """Another node's rank reading a node-local cache folder finds no markers: named as data.cache_dir, with why."""
    from ds_hybrid.tokencache import done_prefixes

    units = {DATA_SOURCE: [Unit(DATA_SOURCE, 0, "jsonl", (str(tmp_path / "a.jsonl"),))]}
    with pytest.raises(ConfigError, match=r"^data\.cache_dir=.*unit 0 of data is not tokenized here.*shared file system"):
        done_prefixes(units, tmp_path / "cache", {DATA_SOURCE: 100.0}, {DATA_SOURCE: 10})


def test_a_node_whose_copy_of_the_corpus_has_other_times_reads_the_main_ranks_cache(tmp_path, tok, caplog):
    """Node-local copies of data.source: another node's files have other modification times, so its own cache key
    and unit fingerprints differ; it reads the main rank's folder and prefix (passed through from_main), with a
    warning, not a folder that nobody built. A cache folder this rank does not see is named as data.cache_dir."""
    import logging

    main_copy, other_copy = write_jsonl(tmp_path / "node0", 2, 30, 20), write_jsonl(tmp_path / "node1", 2, 30, 20)
    for f in other_copy.iterdir():
        os.utime(f, (1e9, 1e9))
    cache = tmp_path / "shared_cache"
    passed: list[str] = []

    def main_from_main(value: str) -> str:
        passed.append(value)
        return value

    built = prepare_streams(data_cfg(str(main_copy), cache), tok, from_main=main_from_main)
    (value,) = passed
    with caplog.at_level(logging.WARNING, logger="ds_hybrid"):
        seen = prepare_streams(data_cfg(str(other_copy), cache), tok, is_main=False, from_main=lambda _: value)
    assert json.loads(value)["key"] == built.path.name
    assert seen.path == built.path and seen.meta | {"source": "copy"} == built.meta | {"source": "copy"}
    assert [a.tolist() for _, a in seen.train] == [a.tolist() for _, a in built.train]
    assert "reads the main rank's token cache" in caplog.text
    with pytest.raises(ConfigError, match=r"^data\.cache_dir=.*unit 0 of data is not tokenized here.*shared file"):
        prepare_streams(data_cfg(str(other_copy), tmp_path / "node1_cache"), tok, is_main=False,
                        from_main=lambda _: value)


def test_unknown_mixture_source_is_named(tmp_path, tok):
    jl = write_jsonl(tmp_path / "jl", 1, 30, 20)
    with pytest.raises(ConfigError, match=r"data\.mixture\.poetry.*its sources: data"):
        prepare_streams(DataConfig(source=str(jl), cache_dir=str(tmp_path), val_tokens=500, mixture={"poetry": 1}),
                        tok)



def test_a_corpus_without_text_is_refused_by_its_source(tmp_path, tok):
    """A data.source whose files hold no text (an empty JSONL, rows of empty text): a ConfigError naming data.source, not a
    cache of 0 tokens published as a success and a seq_len error at the first stage."""
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.jsonl").write_text("")
    (empty / "b.jsonl").write_text('{"text": ""}\n{"text": ""}\n')
    with pytest.raises(ConfigError, match=r"^data\.source=.*: no text in its 2 file\(s\) \(\d+ documents, all empty; "
                                          r"data\.text_field='text'\)"):
        prepare_streams(DataConfig(source=str(empty), cache_dir=str(tmp_path / "cache"), val_tokens=500), tok)

# ---- the embedded corpus --------------------------------------------------------------------------------------
def test_duplicates_exact_and_near_are_removed_first_kept():
    from ds_hybrid.corpus.dedup import dedup

    rng = random.Random(1)
    base = [" ".join(rng.choice(WORDS) + str(rng.randint(0, 50)) for _ in range(400)) for _ in range(6)]
    words = base[2].split()
    near = " ".join(w if i % 150 else "CHANGED" for i, w in enumerate(words))  # 3 of 400 words differ: J ~ 0.93
    exact = "  " + base[4].upper().replace(" ", "\n ")  # case and whitespace only
    far = " ".join(words[:200] + base[5].split()[:200])  # half of each of two documents: J ~ 0.33 with each
    keep, report = dedup(base + [near, exact, far])
    assert keep == [True] * 6 + [False, False, True]
    assert report == {"exact": 1, "near": 1}


def test_markup_is_removed():
    from ds_hybrid.corpus.sources import strip_markup, strip_osis, strip_pod

    osis = ('<w lemma="strong:H0430">God</w> <w lemma="x">said</w>, “<w>Let</w> there be light,”<note placement="foot">'
            '<reference>1:3</reference>a footnote</note> and there was light.<div eID="gen26" type="x-p"/>')
    assert strip_markup(osis, skip=("note",)) == "God said, “Let there be light,” and there was light."
    assert strip_osis(osis).strip() == "God said, “Let there be light,” and there was light."
    assert strip_osis('<w>Yahweh</w><note n="a">note</note><w>called</w> &amp; <title>Psalm 2</title>') == \
        "Yahweh called & \nPsalm 2\n"
    pod = "=head1 NAME\n\nperlfoo - B<bold> and C<code> and L<perlsyn|perlsyn/For Loops>\n\n=cut\n\nTail I<x>."
    assert strip_pod(pod) == "NAME\n\nperlfoo - bold and code and perlsyn\n\nTail x."


def test_embedded_corpus_build_records_every_source(tmp_path, monkeypatch):
    from ds_hybrid.corpus import build_embedded, manifest, select_sources
    from ds_hybrid.corpus.sources import BY_NAME

    names = [n for n in ("devils_dictionary", "fortunes", "python_docs") if BY_NAME[n].installed()]
    if len(names) < 2:
        pytest.skip("needs the Debian packages of `make setup`")
    path = build_embedded(tmp_path / "corpus", names=names, progress=False)
    m = manifest(path)
    assert list(m["sources"]) == names
    for n in names:
        s = m["sources"][n]
        assert s["documents"] > 0 and s["characters"] > 0 and s["license"] and s["register"]
        assert all(v not in ("", "not installed") for v in s["packages"].values())
        rows = [json.loads(x) for x in __import__("gzip").open(path / f"{n}.jsonl.gz", "rt")]
        assert len(rows) == s["documents"] and all(len(r["text"]) >= 200 for r in rows)
        assert not any("<w " in r["text"] or "=head1" in r["text"] for r in rows)
    monkeypatch.setenv("DS_HYBRID_CORPUS_DIR", str(path))
    assert select_sources("embedded", path) == names
    assert select_sources(f"embedded:{names[0]}", path) == [names[0]]
    with pytest.raises(ConfigError, match=r"'poetry' is not a corpus source"):
        select_sources("embedded:poetry", path)
    units = units_for(DataConfig(source=f"embedded:{names[0]},{names[1]}"))
    assert list(units) == names[:2] and all(u[0].kind == "docs" for u in units.values())
    assert done_marker(tmp_path, units[names[0]][0]) is None
    # the documents a run holds out are the ones the essay haystack reads (never trained on)
    from ds_hybrid.corpus import held_out_texts
    from ds_hybrid.teacher import load_tokenizer

    tok = load_tokenizer("embedded")
    streams = prepare_streams(DataConfig(source="embedded", cache_dir=str(tmp_path / "cache")), tok)
    registers = tuple({m["sources"][n]["register"] for n in names})
    held = [tok(t, add_special_tokens=False)["input_ids"] for t in held_out_texts(tok, registers=registers)]
    assert np.array_equal(np.concatenate([a for _, a in streams.val]), np.concatenate(held))


def test_a_file_named_twice_is_refused(tmp_path):
    """A folder and a file in it: the file would be unit 0 (its documents held out) and, again, a training unit."""
    jl = write_jsonl(tmp_path / "jl", 2, 3, 10)
    with pytest.raises(ConfigError, match=r"^data\.source=.*names .*shard000\.jsonl twice"):
        units_for(DataConfig(source=[str(jl / "shard000.jsonl"), str(jl)]))
    assert len(units_for(DataConfig(source=[str(jl / "shard000.jsonl"), str(jl / "shard001.jsonl")]))[DATA_SOURCE]) == 2


def test_the_tokenizer_keys_the_same_cache_before_and_after_a_truncating_call(tok):
    """A call with truncation or padding changes the fast tokenizer's settings in place (not a document's ids)."""
    import copy

    from ds_hybrid.data import tokenizer_fingerprint

    t = copy.deepcopy(tok)
    before = tokenizer_fingerprint(t)
    t("some words " * 20, truncation=True, max_length=8)
    t(["a", "b c d"], padding="max_length", max_length=6)
    assert tokenizer_fingerprint(t) == before
    other = copy.deepcopy(tok)
    other.add_tokens(["<new_token_here>"])
    assert tokenizer_fingerprint(other) != before


def test_files_of_unknown_kinds_are_refused_by_name_and_hidden_folders_skipped(tmp_path):
    """A compressed corpus (DCLM ships .jsonl.zst) used to be read as text, its compressed bytes tokenized; now the
    files are named with the fix before anything is tokenized. Hidden folders (`hf download`'s .cache/) are skipped;
    suffix-less files stay text."""
    docs = tmp_path / "texts"
    (docs / ".cache" / "huggingface").mkdir(parents=True)
    (docs / ".cache" / "huggingface" / "a.metadata").write_text("x")
    (docs / "a.txt").write_text("text a")
    (docs / "NOTES").write_text("text b")
    for card in ("README.md", "LICENSE", "CITATION.cff"):  # a downloaded dataset's card, licence, citation: skipped
        (docs / card).write_text("not a document")
    assert [Path(p).name for u in units_for(data_cfg(docs, tmp_path))[DATA_SOURCE] for p in u.paths] == ["NOTES", "a.txt"]
    (docs / "shard_00.jsonl.zst").write_bytes(b"\x28\xb5\x2f\xfd binary")
    with pytest.raises(ConfigError, match=r"data\.source.*shard_00\.jsonl\.zst.*zstd -d"):
        units_for(data_cfg(docs, tmp_path))


def test_a_large_text_file_is_read_as_documents_at_paragraph_breaks(tmp_path, tok):
    """A text file over TEXT_DOCUMENT_CHARS (a book) is several documents, each ended at a paragraph break in its
    second half, else a line break, else cut at the limit; they concatenate to the file. One such file now gives
    held-out rows (as one document it was all training text), and a small file stays one document."""
    import io

    from ds_hybrid.tokencache import TEXT_DOCUMENT_CHARS, text_documents

    rng = random.Random(0)
    paragraphs = ["\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 40)))
                             for _ in range(rng.randint(1, 12))) for _ in range(900)]
    book = "\n\n".join(paragraphs)
    assert len(book) > 3 * TEXT_DOCUMENT_CHARS
    docs = list(text_documents(io.StringIO(book)))
    assert "".join(docs) == book and len(docs) > 3
    assert all(TEXT_DOCUMENT_CHARS // 2 < len(d) <= TEXT_DOCUMENT_CHARS and d.endswith("\n\n") for d in docs[:-1])
    assert list(text_documents(io.StringIO(book), limit=len(book))) == [book]
    lines = "abcdefghi\n" * 10  # no blank line: cut after a line break in the second half
    assert list(text_documents(io.StringIO(lines), limit=25)) == ["abcdefghi\n" * 2] * 5
    assert list(text_documents(io.StringIO("x" * 60), limit=25)) == ["x" * 25, "x" * 25, "x" * 10]
    assert list(text_documents(io.StringIO(""))) == [""]  # an empty file is one (empty) document, as it was

    (tmp_path / "books").mkdir()
    (tmp_path / "books" / "book.txt").write_text(book)
    streams = prepare_streams(data_cfg(tmp_path / "books", tmp_path / "cache", val_tokens=5000), tok)
    assert streams.meta["documents"] == len(docs) and streams.meta["val_documents"] >= 1
    assert streams.meta["val_tokens"] > 0 and streams.meta["train_tokens"] > streams.meta["val_tokens"]


def test_a_training_document_that_repeats_a_held_out_one_is_left_out(tmp_path, tok):
    """A user's corpus with copies (a file duplicated, boilerplate): a held-out document's copies, case and whitespace
    aside, in the unit that holds it out (before and after it) and in later units, are left out of training and
    counted, so the held-out scores are on text never trained on; the held-out documents are the ones the split
    chose without them, and a corpus without copies gives the same tokens as before."""
    from ds_hybrid.tokencache import held_out_documents

    folder = write_jsonl(tmp_path / "jl", 6, 40, 30)
    cfg = data_cfg(folder, tmp_path / "clean", val_tokens=3000)
    clean = prepare_streams(cfg, tok)
    assert clean.meta["sources"][DATA_SOURCE]["duplicates_of_held_out"] == 0
    first = units_for(cfg)[DATA_SOURCE][0]
    held = held_out_documents(first, tok, False, 3000 // 1, 1234)
    docs = list(iter_documents(first))
    picked = [docs[i] for i in sorted(held)[:2]]  # two held-out documents of the first unit
    assert picked and clean.meta["val_documents"] >= 2
    copies = tmp_path / "copies"
    shutil.copytree(folder, copies)
    with open(copies / "shard000.jsonl", "a") as f:  # after them in their own unit, one with other case and spacing
        f.write(json.dumps({"text": "  " + picked[0].upper().replace(" ", "\n ")}) + "\n")
    with open(copies / "shard005.jsonl", "a") as f:  # and in a later unit, twice
        for text in (picked[1], picked[1]):
            f.write(json.dumps({"text": text}) + "\n")
    dup = prepare_streams(data_cfg(copies, tmp_path / "dup", val_tokens=3000), tok)
    assert dup.meta["sources"][DATA_SOURCE]["duplicates_of_held_out"] == 3
    assert dup.meta["val_digest"] == clean.meta["val_digest"]  # the same held-out documents
    assert dup.meta["train_tokens"] == clean.meta["train_tokens"]  # and not one token of their copies trained on
    train = np.concatenate([a for _, a in dup.train])
    assert np.array_equal(train, np.concatenate([a for _, a in clean.train]))
    # a blank document has no identity: blank training documents stay whatever the held-out ones are
    from ds_hybrid.tokencache import doc_hash

    assert doc_hash(" \n\t") is None and doc_hash("A  b") == doc_hash("a\nB ")


def test_a_copy_of_a_document_held_out_by_a_later_unit_or_another_source_is_left_out(tmp_path, tok, monkeypatch):
    """The held-out documents are all known before any unit is tokenized (tokencache.held_out_plan): a training
    document of a source's first unit that repeats one its second unit holds out, or one another source holds out, is
    left out of training too (until 2026-12-07 a held-out unit saw only its own source's earlier held-out documents),
    and the held-out documents themselves are the ones the split chose without the copies. Two workers, a build cut
    off after its first unit and resumed, give the same shards byte for byte; a build that needs no training tokens
    (the evaluation's held-out rows) tokenizes the held-out units only."""
    from ds_hybrid import tokencache
    from ds_hybrid.tokencache import build, held_out_plan, is_held_out, token_dtype

    a = write_jsonl(tmp_path / "a", 3, 40, 30, seed=1)
    b = write_jsonl(tmp_path / "b", 1, 40, 30, seed=2)

    def units(a_dir: Path, b_dir: Path) -> dict[str, list[Unit]]:
        return {"a": [Unit("a", i, "jsonl", (str(a_dir / f"shard{i:03d}.jsonl"),)) for i in range(3)],
                "b": [Unit("b", 0, "jsonl", (str(b_dir / "shard000.jsonl"),))]}

    def run(a_dir: Path, b_dir: Path, cache: str, num_proc: int = 1, need: float = float("inf")
            ) -> dict[str, list[dict]]:
        return build(units(a_dir, b_dir), tok, tmp_path / cache, need={"a": need, "b": need}, val_tokens=quota,
                     dtype=token_dtype(len(tok)), split_seed=7, progress=False, num_proc=num_proc)

    first = units(a, b)["a"][0]
    candidates = sum(len(tok(t, add_special_tokens=False)["input_ids"]) for i, t in enumerate(iter_documents(first))
                     if is_held_out(7, "a", 0, i))
    quota = {"a": candidates + 1, "b": 200}  # a's share spans its first two units: every candidate of the first, more
    plan = held_out_plan(units(a, b), tok, tmp_path / "plan", quota, False, 7)
    plans, held = plan.quotas, plan.hashes
    assert sorted(plans) == sorted(plan.found) == [("a", 0), ("a", 1), ("b", 0)]
    clean = run(a, b, "clean")
    assert [r["val_documents"] > 0 for r in clean["a"]] == [True, True, False] and clean["b"][0]["val_documents"]
    assert not any(r["duplicates"] for rs in clean.values() for r in rs)
    assert held == {h for rs in clean.values() for r in rs for h in r["val_hashes"]}

    def held_text(unit: Unit) -> str:  # the last document the unit holds out
        from ds_hybrid.tokencache import held_out_documents

        docs = held_out_documents(unit, tok, False, plans[(unit.source, unit.index)], 7)
        return docs[max(docs)]

    later, other = held_text(units(a, b)["a"][1]), held_text(units(a, b)["b"][0])
    rows = [json.loads(line) for line in (a / "shard000.jsonl").read_text().splitlines()]
    slots = [i for i in range(len(rows)) if not is_held_out(7, "a", 0, i)][:2]  # two training documents of a's unit 0
    dropped = [rows[i]["text"] for i in slots]
    for i, text in zip(slots, (later, other)):
        rows[i]["text"] = text
    copies = tmp_path / "a_copies"
    shutil.copytree(a, copies)
    (copies / "shard000.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    dup = run(copies, b, "dup")
    assert [r["duplicates"] for r in dup["a"]] == [2, 0, 0] and dup["b"][0]["duplicates"] == 0
    for source in ("a", "b"):  # the same held-out documents, and a's unit 0 trains on its other documents only
        assert [r["val_hashes"] for r in dup[source]] == [r["val_hashes"] for r in clean[source]]
    lost = sum(len(tok(t, add_special_tokens=False)["input_ids"]) for t in dropped)
    assert dup["a"][0]["train_tokens"] == clean["a"][0]["train_tokens"] - lost

    def shards(cache: str) -> dict[str, bytes]:
        return {str(p.relative_to(tmp_path / cache)): p.read_bytes() for p in sorted((tmp_path / cache).rglob("*.bin"))}

    waves = []

    def in_process(jobs, num_proc, leave_signals=False):  # (the waves two workers get, run here: spawning
        # workers is other tests' part)
        waves.append(sorted((j[0].source, j[0].index) for j in jobs))
        return [tokencache._claim_and_tokenize(j) for j in jobs]

    def first_unit_then_killed(jobs, num_proc, leave_signals=False):
        in_process(jobs[:1], 1)
        raise KeyboardInterrupt

    monkeypatch.setattr(tokencache, "_run", first_unit_then_killed)
    with pytest.raises(KeyboardInterrupt):
        run(copies, b, "resumed", num_proc=2)
    assert len(list((tmp_path / "resumed").rglob("u*.json"))) == 1
    monkeypatch.setattr(tokencache, "_run", in_process)
    resumed = run(copies, b, "resumed", num_proc=2)
    assert resumed == {s: [{**r, "seconds": r2["seconds"], "worker": r2["worker"]} for r, r2 in zip(dup[s], resumed[s])]
                       for s in dup}
    assert shards("resumed") == shards("dup") and len(shards("dup")) == 2 * 4
    assert waves[1] == [("a", 1), ("a", 2), ("b", 0)]  # a's second held-out unit beside its training one
    # no training tokens needed: the three held-out units, not a wave of three workers' units
    run(copies, b, "held_out_only", num_proc=3, need=0)
    assert sorted(p.parent.name + "/" + p.name for p in (tmp_path / "held_out_only").rglob("u*.json")) == [
        "a/u00000.json", "a/u00001.json", "b/u00000.json"]


def test_a_tokenizer_that_counts_otherwise_in_a_batch_is_refused(tmp_path, tok):
    """The held-out quotas of a source's later units are counted from its earlier units' markers (tokens written in
    batches) and, for units not done, from the split's own count (one document at a time): a tokenizer for which the
    two differ would make the held-out split depend on how the cache was built, so it is refused, naming the unit."""
    from ds_hybrid.tokencache import build, token_dtype

    class Padded:  # a batch call that adds a token to each document (as a tokenizer set to pad would)
        eos_token_id = tok.eos_token_id

        def __call__(self, texts, **kw):
            out = tok(texts, **kw)
            if isinstance(texts, list):
                out["input_ids"] = [ids + [0] for ids in out["input_ids"]]
            return out

    folder = write_jsonl(tmp_path / "jl", 1, 40, 30)
    units = {"data": [Unit("data", 0, "jsonl", (str(folder / "shard000.jsonl"),))]}
    with pytest.raises(RuntimeError, match=r"unit 0 of data holds out \d+ tokens tokenized in batches and \d+ "
                                           r"tokenized one document at a time"):
        build(units, Padded(), tmp_path / "cache", {"data": float("inf")}, {"data": 500}, token_dtype(len(tok)),
              progress=False)
    assert not list((tmp_path / "cache").rglob("u*.json"))  # nothing vouches for the unit


def test_held_out_positions_found_before_a_file_changed_are_found_again(tmp_path, tok):
    """build hands each unit the held-out positions its plan read; a unit whose file changed since (another
    fingerprint) finds them again from what it reads, and holds out what the split's rule picks there."""
    from ds_hybrid.tokencache import doc_hash, held_out_documents, token_dtype, tokenize_unit

    folder = write_jsonl(tmp_path / "jl", 1, 40, 30)
    unit = Unit("data", 0, "jsonl", (str(folder / "shard000.jsonl"),))
    held = held_out_documents(unit, tok, False, 500, 7)
    stale = ((0, 1, 2), 3, "another input")  # (positions, tokens and fingerprint of a file since rewritten)
    res = tokenize_unit(unit, tok, str(tmp_path / "cache"), token_dtype(len(tok)).str, False, 500, 7, found=stale)
    assert sorted(held) != [0, 1, 2] and res.val_hashes == [doc_hash(t) for t in held.values()]
    assert res.val_tokens == sum(len(tok(t, add_special_tokens=False)["input_ids"]) for t in held.values())


def test_an_edit_of_the_same_size_within_the_same_second_is_tokenized_again(tmp_path, tok):
    """The token cache knows a file by its path, size and modification time to the nanosecond: a file rewritten with
    as many bytes within the same second (a script regenerating its corpus) is new input, not the old tokens."""
    folder = tmp_path / "texts"
    folder.mkdir()
    f = folder / "a.txt"
    second = 1_700_000_000 * 10**9
    f.write_text("alpha beta gamma delta " * 40)
    os.utime(f, ns=(second + 100, second + 100))
    cfg = data_cfg(folder, tmp_path / "cache", val_tokens=1)
    before = prepare_streams(cfg, tok)
    f.write_text("omega sigma kappa zeta " * 40)  # (as many bytes)
    os.utime(f, ns=(second + 200, second + 200))
    after = prepare_streams(cfg, tok)
    text = lambda s: tok.decode(np.concatenate([a for _, a in s.train + s.val]).tolist())  # noqa: E731
    assert "alpha" in text(before) and "alpha" not in text(after) and "omega" in text(after)


def test_gzipped_text_is_read_through_gzip(tmp_path):
    import gzip

    docs = tmp_path / "texts"
    docs.mkdir()
    with gzip.open(docs / "a.txt.gz", "wt") as f:
        f.write("the quick brown fox")
    (unit,) = units_for(data_cfg(docs, tmp_path))[DATA_SOURCE]
    assert unit.kind == "text" and list(iter_documents(unit)) == ["the quick brown fox"]


def test_other_ranks_read_the_prefix_from_the_markers_not_a_shared_file(tmp_path, tok):
    """Rank 0 builds; the others take the same prefix from the done markers (no used.json, which another job on the
    same cache with another budget could rewrite between the barrier and the read)."""
    jl = write_jsonl(tmp_path / "jl", 20, 40, 60)
    cfg = data_cfg(jl, tmp_path / "cache")
    main = prepare_streams(cfg, tok, need_tokens=25_000)
    prepare_streams(cfg, tok, need_tokens=60_000)  # another job extends the cache meanwhile
    other = prepare_streams(cfg, tok, is_main=False, need_tokens=25_000)
    assert not (main.path / "used.json").exists()
    assert other.meta == main.meta
    assert np.array_equal(np.concatenate([a for _, a in other.train]), np.concatenate([a for _, a in main.train]))
    assert np.array_equal(np.concatenate([a for _, a in other.val]), np.concatenate([a for _, a in main.val]))


def test_a_build_whose_units_another_job_finishes_between_scan_and_wave_scans_again(tmp_path, tok, monkeypatch):
    """Two jobs on one cache: between this build's scan (a unit not done) and its wave (units not done), the other job
    finishes the units. The build scans again and returns the source's prefix; it returned without the source (a
    KeyError at the read) when the wave came out empty."""
    from ds_hybrid import tokencache

    jl = write_jsonl(tmp_path / "jl", 6, 30, 60)
    cfg = data_cfg(jl, tmp_path / "cache")
    want = prepare_streams(cfg, tok, need_tokens=8_000)  # "the other job": these units are done
    real, stale = tokencache.scan_prefix, []

    def scan_before_the_other_job_finished(units, out_dir, need, val_tokens, row_tokens=1):
        got, val_left, first = real(units, out_dir, need, val_tokens, row_tokens)
        if not stale and len(got) > 1:  # the first scan: as it was before the last units of the prefix were done
            stale.append(True)
            return got[:-1], 0, got[-1]["index"]
        return got, val_left, first

    monkeypatch.setattr(tokencache, "scan_prefix", scan_before_the_other_job_finished)
    again = prepare_streams(cfg, tok, need_tokens=8_000)
    assert stale and again.meta == want.meta
    assert np.array_equal(np.concatenate([a for _, a in again.train]), np.concatenate([a for _, a in want.train]))


def test_units_a_crash_left_unvouched_are_tokenized_again_and_shards_reach_the_disk_first(tmp_path, tok, monkeypatch):
    """A node's crash can leave an empty marker, or a marker over shards that never reached the disk (short files):
    such units are redone, the others kept; and a unit's shards are fsynced before its marker exists."""
    from ds_hybrid import tokencache

    synced: list[tuple[str, bool]] = []
    real = tokencache.fsync_file

    def record(path):
        p = Path(path)
        marker = p.parent / (p.name.split(".")[1] + ".json")  # .uNNNNN.train.bin.<pid> -> uNNNNN.json
        synced.append((p.name.split(".")[2], marker.exists()))
        real(path)

    monkeypatch.setattr(tokencache, "fsync_file", record)
    jl = write_jsonl(tmp_path / "jl", 6, 30, 60)
    cfg = data_cfg(jl, tmp_path / "cache")
    first = prepare_streams(cfg, tok, need_tokens=float("inf"))
    units = first.meta["sources"][DATA_SOURCE]["units"]
    assert units == 6 and sorted(synced) == sorted([("train", False), ("val", False)] * units)
    clean = _tokens(first.path)
    d = first.path / DATA_SOURCE
    (d / "u00002.json").write_text("")  # the crash came before the marker's data reached the disk
    short = d / "u00004.train.bin"
    short.write_bytes(short.read_bytes()[: short.stat().st_size // 2])  # ... or before the shard's did
    kept = {p: p.stat().st_mtime_ns for p in d.glob("u*.json") if p.name not in ("u00002.json", "u00004.json")}
    for u in units_for(cfg)[DATA_SOURCE]:
        assert (done_marker(first.path, u) is None) == (u.index in (2, 4))
    again = prepare_streams(cfg, tok, need_tokens=float("inf"))
    assert _tokens(again.path) == clean  # redone to the same tokens
    assert all(p.stat().st_mtime_ns == m for p, m in kept.items())  # the intact units were not redone
    assert again.meta == first.meta


def test_the_cache_key_follows_the_document_separator_under_add_eos(tmp_path, tok):
    from ds_hybrid.data import cache_key

    jl = write_jsonl(tmp_path / "jl", 2, 4, 10)
    cfg, sep = data_cfg(jl, tmp_path / "cache"), data_cfg(jl, tmp_path / "cache", add_eos=True)
    units = units_for(cfg)
    other = copy.deepcopy(tok)
    other.eos_token = tok.convert_ids_to_tokens(2 if tok.eos_token_id != 2 else 1)
    assert other.eos_token_id != tok.eos_token_id
    assert cache_key(cfg, units, tok) == cache_key(cfg, units, other)  # no separator: the same tokens
    assert cache_key(sep, units, tok) != cache_key(sep, units, other) != cache_key(cfg, units, other)


def test_eval_scores_the_held_out_documents_of_the_runs_own_split(tmp_path, tok):
    """`eval --run-config RUN.yaml` takes the run's data section (here split_seed 7, val_tokens 3000), so the held-out
    rows are those the run never trained on; without it, the default split's (other documents here)."""
    from argparse import Namespace

    import yaml
    from trainer_utils import make_tiny_teacher
    from transformers import AutoTokenizer

    from ds_hybrid.evaluation.run import _heldout_rows

    teacher = make_tiny_teacher(tmp_path / "teacher")
    jl = write_jsonl(tmp_path / "jl", 6, 40, 60)
    data = {"source": str(jl), "val_tokens": 3000, "split_seed": 7, "cache_dir": str(tmp_path / "cache"), "num_proc": 1}
    run_yaml = tmp_path / "run.yaml"
    run_yaml.write_text(yaml.safe_dump({"data": data}))
    args = Namespace(data=str(jl), run_config=str(run_yaml), heldout_seq_len=64, heldout_sequences=4)
    got = torch.cat(_heldout_rows(args, AutoTokenizer.from_pretrained(teacher))[0])
    want = PackedSequences(prepare_streams(DataConfig(**data), tok, need_tokens=0).val, 64, max_rows=4)
    assert torch.equal(got, torch.cat([want[[i]] for i in range(len(want))]))
    default = torch.cat(_heldout_rows(Namespace(**{**vars(args), "run_config": None}),
                                      AutoTokenizer.from_pretrained(teacher))[0])
    assert not torch.equal(default, got)


def test_eval_refuses_held_out_rows_that_are_not_the_runs(tmp_path, tok, caplog):
    """`eval --run-config` derives the held-out documents from this machine's corpus: when the run's run_info.json is
    here, what it held out (token digests; token counts in records before them) must be what is derived, else the
    rows could be text the models trained on (a corpus changed since the run); without it, a warning."""
    from argparse import Namespace

    import yaml

    from ds_hybrid.evaluation.run import _heldout_rows

    jl = write_jsonl(tmp_path / "jl", 4, 40, 60)
    data = {"source": str(jl), "val_tokens": 3000, "split_seed": 7, "cache_dir": str(tmp_path / "cache"), "num_proc": 1}
    run_yaml = tmp_path / "run.yaml"
    run_yaml.write_text(yaml.safe_dump({"data": data, "out_dir": str(tmp_path / "run")}))
    args = Namespace(data=str(jl), run_config=str(run_yaml), heldout_seq_len=64, heldout_sequences=4)
    _heldout_rows(args, tok)
    assert "no run_info.json under its out_dir" in caplog.text
    meta = prepare_streams(DataConfig(**data), tok, need_tokens=0).meta
    info = tmp_path / "run" / "kl" / "run_info.json"
    info.parent.mkdir(parents=True)
    info.write_text(json.dumps({"data": meta}))
    _heldout_rows(args, tok)  # the run's own corpus: accepted
    write_jsonl(jl, 4, 40, 60, seed=5)  # the files rewritten since the run: other documents
    with pytest.raises(ConfigError, match=r"^--run-config=.*not those the run held out \(source data: held-out "
                                          r"token digest \w+ here, \w+ in the run"):
        _heldout_rows(args, tok)
    info.write_text(json.dumps({"data": {k: v for k, v in meta.items() if k != "val_digest"}}))  # an older record
    write_jsonl(jl, 4, 40, 61, seed=5)  # (documents of another length: other counts)
    with pytest.raises(ConfigError, match=r"held-out tokens here, \d+ in the run"):
        _heldout_rows(args, tok)


def test_a_local_folder_named_like_the_corpus_is_local_data(tmp_path, tok, monkeypatch):
    """A relative path that begins with "embedded" (embedded_notes/) is the user's files: it was taken for the
    embedded corpus after tokenizing (a KeyError); "embedded:" with no source named is refused by name."""
    from ds_hybrid.corpus import ensure_embedded, select_sources

    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "embedded_notes", 1, 30, 20)
    streams = prepare_streams(DataConfig(source="embedded_notes", cache_dir=str(tmp_path / "c"), val_tokens=500), tok)
    assert streams.meta["train_tokens"] > 0 and "description" not in next(iter(streams.meta["sources"].values()))
    with pytest.raises(ConfigError, match=r"^data\.source='embedded:': name the sources after 'embedded:'"):
        select_sources("embedded:", ensure_embedded())


def test_step_rows_are_one_permutation_per_epoch_whatever_the_order_asked():
    """The epoch's permutation is kept between steps: asking the steps in any order (a resume, the teacher's look
    ahead) gives the same rows, each epoch a permutation of every row, and the kept array cannot be written."""
    from ds_hybrid.data import _epoch_permutation, step_rows

    n, gb = 1003, 96
    forward = [step_rows(s, n, gb, 7) for s in range(25)]
    backward = [step_rows(s, n, gb, 7) for s in reversed(range(25))][::-1]
    assert all(np.array_equal(a, b) for a, b in zip(forward, backward))
    flat = np.concatenate(forward)
    assert sorted(flat[:n].tolist()) == list(range(n)) and sorted(flat[n:2 * n].tolist()) == list(range(n))
    with pytest.raises(ValueError):
        _epoch_permutation(7, 0, n)[0] = 1


def test_add_eos_without_an_eos_token_is_refused(tmp_path, tok):
    """data.add_eos with a tokenizer that has no EOS token did nothing, silently: refused by name."""
    import copy

    tok = copy.deepcopy(tok)
    tok.eos_token = None
    assert tok.eos_token_id is None
    with pytest.raises(ConfigError, match=r"^data\.add_eos=True: this tokenizer has no end-of-sequence token"):
        prepare_streams(DataConfig(source=str(write_jsonl(tmp_path / "jl", 1, 5, 5)), cache_dir=str(tmp_path),
                                   add_eos=True), tok)


def test_a_folder_holding_a_datasets_other_splits_beside_train_is_refused(tmp_path):
    """A whole download (c4's c4-train.* and c4-validation.*, wikitext's train-/test-/validation-*.parquet, split
    folders) put its test and validation text in training, every file of a folder being read: refused, naming a file
    of the other split and how to list the train files. Documents merely named like a split (the Python docs'
    test.txt) and a folder of one split are read."""
    from ds_hybrid.data import source_files

    def folder(name, files):
        d = tmp_path / name
        for f in files:
            (d / f).parent.mkdir(parents=True, exist_ok=True)
            (d / f).write_text(json.dumps({"text": "x"}) + "\n")
        return d

    for name, files, other in (
            ("c4", ["en/c4-train.00000-of-01024.json.gz", "en/c4-validation.00000-of-00008.json.gz"], "validation"),
            ("wiki", ["train-00000-of-00001.parquet", "test-00000-of-00001.parquet"], "test"),
            ("plain", ["train.jsonl", "dev.jsonl"], "dev"),
            ("dirs", ["data/train/a.jsonl", "data/validation/b.jsonl"], "validation")):
        with pytest.raises(ConfigError, match=rf"^data\.source=.*{name}': holds a dataset's train split and its "
                                              rf"{other} split too .*List the train files"):
            source_files(str(folder(name, files)))
    docs = folder("docs", ["test.txt", "unittest.txt", "train.txt"])  # documents named so, not splits
    assert [f.name for f in source_files(str(docs))] == ["test.txt", "train.txt", "unittest.txt"]
    only = folder("only", ["train-00000-of-00002.parquet", "train-00001-of-00002.parquet"])
    assert len(source_files(str(only))) == 2
    wiki = tmp_path / "wiki"
    assert source_files([str(wiki / "train-00000-of-00001.parquet")]) == [wiki / "train-00000-of-00001.parquet"]


def test_malformed_corpus_files_are_named_with_their_line(tmp_path):
    """A truncated JSONL (an interrupted download) raised a bare JSONDecodeError, a text_field naming a list
    column a tokenizer TypeError, a line that is a bare string a TypeError: each now names the file, its line and
    the setting to fix."""
    def docs(name, text):
        d = tmp_path / name
        d.mkdir()
        (d / "a.jsonl").write_text(text)
        return list(iter_documents(units_for(data_cfg(d, tmp_path))[DATA_SOURCE][0]))

    assert docs("ok", '{"text": "one"}\n\n{"text": null}\n') == ["one", ""]
    with pytest.raises(ConfigError, match=r"^data\.source=.*a\.jsonl': .*a\.jsonl, line 2 is not valid JSON .*cut "
                                          r"short"):
        docs("cut", '{"text": "one"}\n{"text": "tw')
    with pytest.raises(ConfigError, match=r"^data\.text_field='text': .*a\.jsonl:1: its value is a list, not text"):
        docs("chat", '{"text": [{"role": "user", "content": "hi"}]}\n')
    with pytest.raises(ConfigError, match=r"^data\.source=.*a\.jsonl:1': holds a str, not a JSON object"):
        docs("bare", '"just text"\n')
    with pytest.raises(ConfigError, match=r"^data\.source=.*a\.jsonl': .*a\.jsonl \(.* at line 1\) is not valid "
                                          r"JSON"):
        docs("array", '[{"text": "one"}, {"text"')


def test_unreadable_corpus_files_are_named_and_bom_or_upper_case_gz_files_read(tmp_path):
    """A Latin-1 JSONL, a .gz cut short, a .gz that is not gzip, a pretty-printed JSON object and a non-text parquet
    column raised raw UnicodeDecodeError / EOFError / BadGzipFile / JSON / tokenizer errors naming no file; an
    upper-case .GZ text file was read as its compressed bytes and trained on, a UTF-8-BOM JSONL refused."""
    import gzip

    def docs(name, filename, data: bytes):
        d = tmp_path / name
        d.mkdir()
        (d / filename).write_bytes(data)
        return list(iter_documents(units_for(data_cfg(d, tmp_path))[DATA_SOURCE][0]))

    good = gzip.compress(b'{"text": "one"}\n{"text": "two"}\n')
    assert docs("bom", "a.jsonl", b"\xef\xbb\xbf" + b'{"text": "caf\xc3\xa9"}\n') == ["caf\u00e9"]
    assert docs("upper", "BOOK.TXT.GZ", gzip.compress(b"the quick brown fox")) == ["the quick brown fox"]
    # a cache of BOOK.TXT.GZ tokenized before (its compressed bytes) is not reused; other files' keys are unchanged
    from ds_hybrid import tokencache

    (tmp_path / "upper" / "b.txt.gz").write_bytes(gzip.compress(b"x"))
    units = [tokencache.Unit(DATA_SOURCE, 0, "text", (str(tmp_path / "upper" / n),)) for n in ("BOOK.TXT.GZ", "b.txt.gz")]
    now = [u.fingerprint() for u in units]
    with pytest.MonkeyPatch.context() as m:
        m.setattr(tokencache, "_is_gz", lambda p: p.endswith(".gz"))  # the old test
        before = [u.fingerprint() for u in units]
    assert now[0] != before[0] and now[1] == before[1]
    assert docs("upper_jl", "ROWS.JSONL.GZ", good) == ["one", "two"]
    with pytest.raises(ConfigError, match=r"^data\.source=.*a\.jsonl': is not UTF-8 text .*iconv"):
        docs("latin1", "a.jsonl", '{"text": "caf\u00e9"}\n'.encode("latin-1"))
    for name, data in (("cut", good[:len(good) // 2]), ("notgz", b'{"text": "one"}\n')):
        with pytest.raises(ConfigError, match=r"^data\.source=.*a\.jsonl\.gz': cannot be decompressed .*cut short"):
            docs(name, "a.jsonl.gz", data)
    with pytest.raises(ConfigError, match=r"^data\.source=.*t\.txt\.gz': cannot be decompressed"):
        body = gzip.compress(" ".join(str(i * 7919 % 10007) for i in range(3000)).encode())
        docs("cut_text", "t.txt.gz", body[:len(body) // 2])
    with pytest.raises(ConfigError, match=r"^data\.source=.*a\.jsonl': .*line 1 is not a complete JSON object .*one "
                                          r"JSON object spread over many lines"):
        docs("object", "a.jsonl", b'{\n  "data": [{"text": "one"}]\n}\n')

    import pyarrow as pa
    import pyarrow.parquet as pq

    d = tmp_path / "pq"
    d.mkdir()
    pq.write_table(pa.table({"text": [[1, 2], [3]]}), d / "train.parquet")
    with pytest.raises(ConfigError, match=r"^data\.text_field='text': .*train\.parquet: the column is of type "
                                          r"list<.*not text"):
        list(iter_documents(units_for(data_cfg(d, tmp_path))[DATA_SOURCE][0]))


def test_an_embedded_corpus_extracted_short_is_refused_and_its_pack_ends_with_the_manifest(tmp_path, monkeypatch):
    import io
    import json
    import tarfile

    from ds_hybrid import corpus
    from ds_hybrid.corpus import tools

    built = tmp_path / "corpus" / "v"
    built.mkdir(parents=True)
    for name, body in (("a.jsonl.gz", b"A" * 300), ("b.jsonl.gz", b"B" * 200)):
        (built / name).write_bytes(body)
    (built / "manifest.json").write_text(json.dumps({"sources": {}, "files": {"a.jsonl.gz": 300, "b.jsonl.gz": 200}}))
    monkeypatch.setattr(corpus, "embedded_dir", lambda: built)
    assert corpus.ensure_embedded() == built
    packed = tmp_path / "packed"
    packed.mkdir()
    for i in range(3):  # an earlier pack of three parts
        (packed / f"corpus.tar.xz.{i:02d}").write_bytes(b"old")
    real_run = tools.subprocess.run
    monkeypatch.setattr(tools.subprocess, "run", lambda *a, **k: (_ for _ in ()).throw(OSError("xz failed")))
    with pytest.raises(OSError, match="xz failed"):
        tools.pack(packed, part_bytes=10**6)
    assert sorted(p.name for p in packed.iterdir()) == [f"corpus.tar.xz.{i:02d}" for i in range(3)]  # kept whole
    monkeypatch.setattr(tools.subprocess, "run", real_run)
    parts = tools.pack(packed, part_bytes=10**6)
    assert sorted(p.name for p in packed.iterdir()) == ["corpus.tar.xz.00"] == [p.name for p in parts]
    data = b"".join(p.read_bytes() for p in parts)
    import lzma

    with tarfile.open(fileobj=io.BytesIO(lzma.decompress(data))) as tar:
        assert [m.name for m in tar.getmembers()][-1] == "v/manifest.json"
    (built / "b.jsonl.gz").write_bytes(b"B" * 120)  # an extraction cut short
    with pytest.raises(ConfigError, match=r"^data\.source='embedded': the corpus at .* is incomplete: b\.jsonl\.gz "
                                          r"holds 120 of its 200 bytes"):
        corpus.ensure_embedded()
    (built / "b.jsonl.gz").unlink()
    with pytest.raises(ConfigError, match=r"b\.jsonl\.gz is missing"):
        corpus.ensure_embedded()
    (built / "manifest.json").write_text(json.dumps({"sources": {}}))  # a manifest from before sizes were recorded
    assert corpus.ensure_embedded() == built


def test_a_cache_dir_without_file_locks_is_refused_by_name(tmp_path, tok, monkeypatch):
    """The token cache's unit lock on a file system without flock (ENOLCK, ENOSYS) raised a raw OSError from a
    worker; now a ConfigError naming data.cache_dir and the fix."""
    import errno

    from ds_hybrid import tokencache

    def no_locks(*a):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(tokencache.fcntl, "flock", no_locks)
    jl = write_jsonl(tmp_path / "jl", 1, 4, 5)
    unit = units_for(data_cfg(jl, tmp_path))[DATA_SOURCE][0]
    with pytest.raises(ConfigError, match=r"^data\.cache_dir=.*cannot lock .*Function not implemented.*-o flock"):
        tokencache._claim_and_tokenize((unit, tok, str(tmp_path / "cache"), np.dtype("uint16"), False, 100, 0, None,
                                         frozenset(), None))


def test_a_budget_larger_than_the_corpus_is_warned_of_with_its_passes(caplog):
    """The rows wrap around epoch after epoch: a stage whose budget exceeds its corpus (the default kl's 600M tokens
    over the embedded corpus) repeated every row many times without a word."""
    from ds_hybrid.trainer import warn_repeats

    assert warn_repeats("kl", 100, 32, 4096, 3200) == 1.0 and "passes" not in caplog.text
    assert warn_repeats("kl", 4578, 32, 4096, 10_250) == pytest.approx(14.29, abs=0.01)
    assert ("kl reads 14.3 passes over the corpus's 10250 training rows of 4096 tokens (600,047,616 tokens of "
            "41,984,000): every row is trained on that many times") in caplog.text


def test_corpus_build_with_sources_over_a_built_corpus_needs_force(tmp_path, monkeypatch):
    """`corpus build --sources a,b` over a built corpus printed the whole corpus, as if built from a and b."""
    import json

    from ds_hybrid import corpus
    from ds_hybrid.corpus import BY_NAME, tools

    built = tmp_path / "v"
    built.mkdir()
    (built / "manifest.json").write_text(json.dumps({"sources": {}, "missing": []}))
    monkeypatch.setattr(corpus, "embedded_dir", lambda: built)
    monkeypatch.setattr(corpus, "build_embedded", lambda **k: pytest.fail("the corpus was rebuilt"))
    name = sorted(BY_NAME)[0]
    with pytest.raises(ConfigError, match=rf"^--sources='{name}': a corpus is already built at .*add --force"):
        tools.main(["build", "--sources", name])


def test_rows_start_with_bos_where_the_tokenizer_puts_one(tok):
    """data.bos: a row is BOS + seq_len - 1 tokens of the stream (Gemma's and Llama 3's prompts all start with BOS,
    and rows cut from the stream never did); auto follows the tokenizer, SmolLM2's puts none; the needle rows keep
    the BOS first."""
    import random

    from ds_hybrid.data import PackedSequences, row_bos
    from ds_hybrid.recall_tasks import needle_row

    class AddsBos:  # a tokenizer that puts BOS (7) before every text, as Gemma's
        bos_token_id = 7

        def __call__(self, text, **kw):
            return {"input_ids": [7, *tok(text, add_special_tokens=False)["input_ids"]]}

    assert row_bos("auto", tok) is None and row_bos(False, AddsBos()) is None
    assert row_bos("auto", AddsBos()) == 7 and row_bos(True, tok) == tok.bos_token_id
    stream = np.arange(100, 150, dtype=np.uint32)
    plain, with_bos = PackedSequences(stream, 10), PackedSequences(stream, 10, bos=7)
    assert len(plain) == 5 and len(with_bos) == 50 // 9
    rows = with_bos[np.arange(len(with_bos))]
    assert rows.shape == (5, 10) and (rows[:, 0] == 7).all()
    assert rows[:, 1:].flatten().tolist() == list(range(100, 145))  # the stream in order, 9 tokens a row
    assert torch.equal(plain[np.arange(5)].flatten(), torch.arange(100, 150))  # bos=None: as before
    filler = [7] + tok("word " * 200, add_special_tokens=False)["input_ids"][:199]
    for seed in range(20):  # depth 0 included in some: the fact never goes before the BOS
        ids, start, end = needle_row(filler, tok, random.Random(seed), bos=7)
        assert ids[0] == 7 and 7 not in ids[1:] and len(ids) == len(filler) and 0 < start < end == len(ids)
    with pytest.raises(ValueError, match="does not start with the BOS token 7"):
        needle_row(filler[1:], tok, random.Random(0), bos=7)
    with pytest.raises(ConfigError, match=r"^data\.bos='maybe': true, false, or auto"):
        load_config(None, ["data.bos=maybe"])
    assert load_config(None, ["data.bos=true"]).data.bos is True
