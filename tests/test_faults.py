"""Faults: damaged checkpoints (fall back to the newest intact one, or stop saying what to do), a full disk (refused
before writing, or reported when a write fails; the previous checkpoint stays), a teacher folder with its own code,
and a real resume past a damaged checkpoint. A rank SIGKILLed mid-step is in test_trainer.py (it needs the 2-rank
pipeline)."""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from ds_hybrid.checkpoint import MARKER, Checkpointer, CheckpointError
from ds_hybrid.errors import ConfigError
from ds_hybrid.manifest import MANIFEST


class FakeEngine:
    """What Checkpointer needs of a DeepSpeed engine: writes `size` bytes of a known pattern, and reads them back."""

    def __init__(self, size: int = 4096):
        self.size = size
        self.loaded = None

    def save_checkpoint(self, path, tag, client_state, save_latest):
        d = Path(path) / tag
        d.mkdir(parents=True, exist_ok=True)
        step = client_state["step"]
        (d / "model_states.pt").write_bytes(bytes([step % 256]) * self.size)
        (d / "optim_states.pt").write_bytes(bytes([(step + 1) % 256]) * (self.size // 2))

    def load_checkpoint(self, path, tag, load_optimizer_states, load_lr_scheduler_states):
        data = (Path(path) / tag / "model_states.pt").read_bytes()
        self.loaded = data[0]
        return str(Path(path) / tag), {"step": data[0]}


def two_checkpoints(root: Path, size: int = 4096) -> Checkpointer:
    ck = Checkpointer(root / "checkpoints", keep=3)
    for step in (2, 4):
        ck.save({"student": FakeEngine(size)}, step, {"step": step})
    return ck


def damage(path: Path, how: str) -> str:
    """Damage step 4 after it was written (its COMPLETE marker stays); returns the file the warning must name."""
    f = path / "student" / "model_states.pt"
    if how == "truncated":
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    elif how == "flipped_byte":
        data = bytearray(f.read_bytes())
        data[100] ^= 0x01
        f.write_bytes(bytes(data))
    elif how == "missing_file":
        f.unlink()
    elif how == "missing_manifest":
        (path / MANIFEST).unlink()
        return MANIFEST
    return "model_states.pt"


def test_every_checkpoint_file_is_forced_to_disk_before_the_marker_vouches_for_it(tmp_path, monkeypatch):
    """DeepSpeed's writes are not fsynced: after a node's crash a COMPLETE marker on disk could vouch for files still in
    the page cache (and the older checkpoints would already be pruned). Each file is fsynced, and its folder, before
    the marker is written."""
    import ds_hybrid.checkpoint as checkpoint
    import ds_hybrid.manifest as manifest

    events = []
    monkeypatch.setattr(manifest, "fsync_file", lambda p: events.append(("file", Path(p).name)))
    monkeypatch.setattr(manifest, "fsync_dir", lambda p: events.append(("dir", Path(p).name)))
    real_write = checkpoint.atomic_write_text
    monkeypatch.setattr(checkpoint, "atomic_write_text",
                        lambda p, text: (events.append(("marker", Path(p).name)), real_write(p, text)))
    Checkpointer(tmp_path / "checkpoints", keep=2).save({"student": FakeEngine()}, 2, {"step": 2})
    marker = events.index(("marker", MARKER))
    synced = {name for kind, name in events[:marker] if kind == "file"}
    assert synced == {"model_states.pt", "optim_states.pt", "rng_rank0.pt"}
    assert {name for kind, name in events[:marker] if kind == "dir"} == {"checkpoints", "step00000002", "student"}


def test_each_checkpoint_file_is_hashed_and_fsynced_by_the_rank_that_wrote_it(monkeypatch):
    """On a shared file system an fsync flushes only the calling node's cached writes: a rank's own shards are
    hashed and fsynced by that rank, the files rank 0 writes by rank 0, and every file by exactly one rank."""
    import ds_hybrid.manifest as manifest

    files = ["student/bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt", "student/zero_pp_rank_1_mp_rank_00_model_states.pt",
             "student/zero_pp_rank_0_mp_rank_00_model_states.pt", "student/zero_pp_rank_12_mp_rank_00_model_states.pt",
             "student/mp_rank_00_model_states.pt", "student/zero_to_fp32.py", "rng_rank1.pt", "rng_rank0.pt",
             "rng_rank12.pt", "student/mp_rank_01_model_states.pt"]
    shares = {}
    for r in range(2):
        monkeypatch.setattr(manifest.D, "rank", lambda r=r: r)
        monkeypatch.setattr(manifest.D, "world_size", lambda: 2)
        shares[r] = manifest._my_share(files)
    assert shares[1] == ["student/bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt",
                         "student/zero_pp_rank_1_mp_rank_00_model_states.pt", "rng_rank1.pt"]
    assert sorted(shares[0] + shares[1]) == sorted(files)  # rank 12 of a larger world: modulo 2 -> 0
    assert [manifest.owner(f, 16) for f in files] == [1, 1, 0, 12, 0, 0, 1, 0, 12, 0]
    assert {manifest.owner(f, 1) for f in files} == {0}
    assert manifest.owner("student/offloaded_tensors/rank3/param_7.tensor.swp", 4) == 3  # NVMe offload's folders


def test_a_file_that_cannot_be_read_back_is_a_problem_named_not_an_exception(tmp_path, monkeypatch, caplog):
    """An I/O error while checking one file (ESTALE, EIO on one node) is reported as damage, so every rank reaches
    the gather with its findings instead of one rank raising while the others wait; the resume falls back."""
    import ds_hybrid.manifest as manifest

    ck = two_checkpoints(tmp_path)
    real = manifest.file_digest

    def flaky(p):
        if "step00000004" in str(p) and p.name == "optim_states.pt":
            raise OSError(5, "Input/output error")
        return real(p)

    monkeypatch.setattr(manifest, "file_digest", flaky)
    problems = manifest.verify_manifest(ck.latest()[1])
    assert len(problems) == 1 and "optim_states.pt could not be read on rank 0 (OSError" in problems[0]
    eng = FakeEngine()
    with caplog.at_level("WARNING", logger="ds_hybrid"):
        assert ck.load({"student": eng}) == {"step": 2} and eng.loaded == 2


@pytest.mark.parametrize("how", ["truncated", "flipped_byte", "missing_file", "missing_manifest"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous(tmp_path, how, caplog):
    ck = two_checkpoints(tmp_path)
    newest = ck.latest()[1]
    files = [p for p in newest.rglob("*") if p.is_file() and p.name not in (MANIFEST, MARKER)]
    assert len(files) == 3 and json.loads((newest / MARKER).read_text())["bytes"] == sum(p.stat().st_size for p in files)
    named = damage(newest, how)
    eng = FakeEngine()
    with caplog.at_level("WARNING", logger="ds_hybrid"):
        state = ck.load({"student": eng})
    assert state == {"step": 2} and eng.loaded == 2
    assert any(named in r.message and "damaged" in r.message for r in caplog.records), caplog.text
    aside = newest.with_name(newest.name + ".damaged")  # kept, nothing written is deleted, but no longer a tag
    assert not newest.exists() and aside.is_dir() and (aside / MARKER).is_file()
    assert [s for s, _ in ck.complete_tags()] == [2] and any("set the damaged checkpoint aside" in r.message
                                                             for r in caplog.records)


@pytest.mark.parametrize("keep", [1, 2])
def test_saves_after_a_fallback_past_a_damaged_manifest_keep_the_good_checkpoints(tmp_path, keep):
    """Resumed from step 2 past a step-4 checkpoint whose manifest is garbage: the next saves size themselves (no
    crash on the manifest), prune only what is older than themselves, and the next resume finds the newest save."""
    ck = two_checkpoints(tmp_path)
    (ck.latest()[1] / MANIFEST).write_text("{not json")
    assert ck.load({"student": FakeEngine()}) == {"step": 2}
    ck = Checkpointer(ck.dir, keep=keep)
    for step in (3, 4, 5):
        ck.save({"student": FakeEngine()}, step, {"step": step})
    assert [s for s, _ in ck.complete_tags()] == [5, 4, 3, 2][:keep][::-1]
    eng = FakeEngine()
    assert ck.load({"student": eng}) == {"step": 5} and eng.loaded == 5
    assert (ck.dir / "step00000004.damaged").is_dir()  # the first step-4 checkpoint, set aside before step 4 was saved


def test_an_unreadable_marker_is_damage_not_a_crash(tmp_path, caplog):
    ck = two_checkpoints(tmp_path)
    (ck.latest()[1] / MARKER).write_text("")  # a node crash before the marker reached the disk
    eng = FakeEngine()
    with caplog.at_level("WARNING", logger="ds_hybrid"):
        assert ck.load({"student": eng}) == {"step": 2} and eng.loaded == 2
    assert any("unreadable COMPLETE marker" in r.message for r in caplog.records), caplog.text
    unchecked = Checkpointer(ck.dir, keep=3, verify=False)  # unverified resumes refuse it too
    assert unchecked.load({"student": FakeEngine()}) == {"step": 2}


def test_a_save_never_prunes_a_later_checkpoint(tmp_path):
    """A save at a step below an existing checkpoint (one resumed unverified past nothing, or copied in) keeps the
    later one: pruning takes only older steps."""
    ck = two_checkpoints(tmp_path)  # steps 2 and 4
    ck = Checkpointer(ck.dir, keep=1)
    ck.save({"student": FakeEngine()}, 3, {"step": 3})
    assert [s for s, _ in ck.complete_tags()] == [3, 4]


def test_all_checkpoints_damaged_stops_and_says_what_to_do(tmp_path):
    ck = two_checkpoints(tmp_path)
    for _, path in ck.complete_tags():
        damage(path, "truncated")
    with pytest.raises(CheckpointError, match=r"every checkpoint .* is damaged .*step00000004: .*model_states\.pt.*"
                                              r"Nothing was deleted.*move .* away.*ckpt_verify: false"):
        ck.load({"student": FakeEngine()})
    unchecked = Checkpointer(ck.dir, keep=3, verify=False)  # the escape hatch the message names
    eng = FakeEngine()
    unchecked.load({"student": eng})
    assert eng.loaded == 4


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs: the disk a checkpoint does not fit on."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)],
                                           capture_output=True).returncode != 0:
        pytest.skip("needs root to mount a tmpfs")
    yield mnt
    subprocess.run(["umount", str(mnt)], capture_output=True)


def test_a_full_disk_is_refused_before_writing_and_the_previous_checkpoint_stays(small_disk):
    ck = Checkpointer(small_disk / "checkpoints", keep=3)
    ck.save({"student": FakeEngine(400_000)}, 2, {"step": 2})  # 600 kB of 1 MiB: the next one cannot fit
    with pytest.raises(CheckpointError, match=r"step 4 not written: the disk holding .* is full or nearly so.*"
                                              r"\(0\.\d+ GiB free on the disk, .*; it needs about 0\.00 GiB\)"
                                              r".*step00000002 stays the resume point"):
        ck.save({"student": FakeEngine(400_000)}, 4, {"step": 4})
    assert [s for s, _ in ck.complete_tags()] == [2] and not (ck.dir / "step00000004").exists()
    eng = FakeEngine()
    assert ck.load({"student": eng}) == {"step": 2}


def test_a_write_that_fills_the_disk_is_reported_and_leaves_nothing_partial(small_disk):
    ck = Checkpointer(small_disk / "checkpoints", keep=3)  # no previous checkpoint, no estimate: the write is tried
    with pytest.raises(CheckpointError, match=r"step 2 not written: the disk holding .* is full.*OSError.*No space "
                                              r"left.*no earlier checkpoint exists"):
        ck.save({"student": FakeEngine(2_000_000)}, 2, {"step": 2})
    assert not (ck.dir / "step00000002").exists()  # the partial folder is gone: a resume cannot pick it


class DiskFullEngine(FakeEngine):
    """Writes half of its first file, then fails as a full disk (ENOSPC) or a spent quota (EDQUOT) does."""

    def __init__(self, size: int, code: int = errno.ENOSPC):
        super().__init__(size)
        self.code = code

    def save_checkpoint(self, path, tag, client_state, save_latest):
        d = Path(path) / tag
        d.mkdir(parents=True, exist_ok=True)
        (d / "model_states.pt").write_bytes(b"\0" * (self.size // 2))
        raise OSError(self.code, os.strerror(self.code))


def test_a_full_disk_without_root(tmp_path, monkeypatch):
    """The same two cases as on the tmpfs above (which needs root), with the free space and the failing write faked:
    refused before writing when the last checkpoint's size does not fit; a write that runs out of space leaves nothing
    partial; the previous checkpoint stays the resume point in both."""
    import shutil

    ck = Checkpointer(tmp_path / "checkpoints", keep=3)
    ck.save({"student": FakeEngine(400_000)}, 2, {"step": 2})
    real = shutil.disk_usage
    monkeypatch.setattr("ds_hybrid.checkpoint.shutil.disk_usage",
                        lambda p: real(p)._replace(free=500_000))  # 600 kB written a checkpoint, 500 kB free
    with pytest.raises(CheckpointError, match=r"step 4 not written: the disk holding .* is full or nearly so, or "
                                              r"the quota there is spent \(0\.00 GiB free on the disk, quotas aside: "
                                              r".*; it needs about 0\.00 GiB\).*step00000002 stays"):
        ck.save({"student": FakeEngine(400_000)}, 4, {"step": 4})
    assert [s for s, _ in ck.complete_tags()] == [2] and not (ck.dir / "step00000004").exists()
    monkeypatch.setattr("ds_hybrid.checkpoint.shutil.disk_usage", real)  # room by the estimate; the write fails
    with pytest.raises(CheckpointError, match=r"step 6 not written: .* is full.*OSError.*No space left.*"
                                              r"step00000002 stays the resume point"):
        ck.save({"student": DiskFullEngine(400_000)}, 6, {"step": 6})
    assert [s for s, _ in ck.complete_tags()] == [2] and not (ck.dir / "step00000006").exists()
    # a spent quota (EDQUOT: Lustre/NFS user or project quotas, which disk_usage does not see), in the write or first
    # reported by the manifest's fsync, is the same error, not a raw traceback
    with pytest.raises(CheckpointError, match=r"step 8 not written: .*quota there is spent.*Disk quota exceeded"):
        ck.save({"student": DiskFullEngine(400_000, errno.EDQUOT)}, 8, {"step": 8})

    def quota_at_fsync(path):
        raise OSError(errno.EDQUOT, "Disk quota exceeded")

    monkeypatch.setattr("ds_hybrid.checkpoint.write_manifest", quota_at_fsync)
    with pytest.raises(CheckpointError, match=r"step 10 not written: .*quota there is spent.*Disk quota exceeded"):
        ck.save({"student": FakeEngine(400_000)}, 10, {"step": 10})
    assert [s for s, _ in ck.complete_tags()] == [2]
    eng = FakeEngine()
    assert ck.load({"student": eng}) == {"step": 2} and eng.loaded == 2


def test_a_teacher_folder_with_its_own_code_is_refused(tmp_path):
    from conftest import tiny_teacher

    from ds_hybrid.teacher import load_teacher_config

    folder = tmp_path / "t"
    tiny_teacher("llama").save_pretrained(folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (folder / "config.json").write_text(json.dumps(cfg))
    (folder / "modeling_evil.py").write_text("raise SystemExit('ran untrusted code')\n")
    with pytest.raises(ConfigError, match=r"teacher=.*auto_map.*never runs a model folder's code"):
        load_teacher_config(str(folder))



def test_a_teacher_whose_code_is_not_checked_locally_is_refused_by_transformers_not_run(tmp_path, monkeypatch):
    """A hub id's files are not local, so check_no_remote_code cannot read its auto_map: the config is loaded with
    trust_remote_code=False (None asked "run the custom code?" in a terminal) and the refusal names the teacher."""
    from ds_hybrid import teacher as teacher_mod

    folder = tmp_path / "t"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "evil_model",
                                                    "auto_map": {"AutoConfig": "configuration_evil.EvilConfig"}}))
    (folder / "configuration_evil.py").write_text("raise SystemExit('ran untrusted code')\n")
    monkeypatch.setattr(teacher_mod, "check_no_remote_code", lambda *a, **k: None)  # (as for a hub id)
    with pytest.raises(ConfigError, match=r"^teacher=.*auto_map.*never runs a model's code"):
        teacher_mod.load_teacher_config(str(folder))


@pytest.mark.slow
def test_a_real_run_resumes_past_a_damaged_checkpoint_to_the_same_losses(tmp_path):
    from trainer_utils import make_corpus, make_tiny_teacher, metrics, tail, train, write_config

    teacher = make_tiny_teacher(tmp_path / "teacher")
    corpus = make_corpus(tmp_path / "corpus", n_files=12)
    kl = {"init_from": "teacher", "seq_len": 64, "tokens": 4 * 8 * 64, "ckpt_every": 2, "keep_checkpoints": 3,
          "ds_config": "ds_configs/single.json", "teacher_ds_config": "ds_configs/single.json"}
    cfg = write_config(tmp_path / "r.yaml", teacher, corpus, tmp_path / "out", kl=kl)
    p = train("kl", cfg, nproc=1)
    assert p.returncode == 0, tail(p)
    run_dir = tmp_path / "out" / "kl"
    ref = metrics(run_dir)
    (run_dir / "DONE").unlink()  # as if the stage had stopped after its step-4 checkpoint
    newest = run_dir / "checkpoints" / "step00000004"
    f = max((p for p in newest.rglob("*.pt")), key=lambda p: p.stat().st_size)
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    p = train("kl", cfg, nproc=1)
    assert p.returncode == 0, tail(p)
    assert "is damaged" in p.stdout and f.name in p.stdout and "resumed kl from step 2" in p.stdout
    assert "in the run that wrote this checkpoint" not in p.stdout  # the same micro-batch: an exact resume
    resumed = metrics(run_dir)
    for step in (3, 4):
        assert resumed[step]["loss"] == ref[step]["loss"], step
    # a resume whose micro-batch differs (`auto` resolved again on other GPUs after a requeue) says it is not exact
    (run_dir / "DONE").unlink()
    was = json.loads((run_dir / "run_info.json").read_text())["micro_batch"]
    p = train("kl", cfg, "kl.micro_batch=1", nproc=1)
    assert p.returncode == 0, tail(p)
    assert was != 1 and f"kl.micro_batch is 1 here, {was} in the run that wrote this checkpoint" in p.stdout


def test_a_signal_between_two_stages_is_kept_for_the_next_ones_first_step():
    """Stage select runs its probes one after the other in one process: SIGUSR1 (Slurm's warning) arriving after
    one probe's steps, during the next one's setup, must still stop the next one (before its models are built), not
    be dropped by a fresh handler (trainer.run_stage installs them before the setup)."""
    from ds_hybrid.trainer import _Signals

    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        first = _Signals.install()  # probe N's stage
        assert first.received is None
        os.kill(os.getpid(), signal.SIGUSR1)  # after its last step, before probe N + 1's loop
        second = _Signals.install()  # probe N + 1's stage
        assert second.received == signal.SIGUSR1
    finally:
        _Signals.received = None
        for sig, handler in before.items():
            signal.signal(sig, handler)


def test_force_reruns_a_finished_stage_from_step_0_and_keeps_the_first_run(tmp_path):
    """`train.py --force` on a finished stage trains again from step 0 (it used to resume from the finished run's
    final checkpoint and train nothing); the first run's DONE, checkpoints and metrics move to previous/<time>/."""
    from trainer_utils import (make_corpus, make_tiny_teacher, metrics, one_process_stage, tail, train_in_one_process,
                                write_config)

    teacher = make_tiny_teacher(tmp_path / "teacher")
    corpus = make_corpus(tmp_path / "corpus", n_files=12)
    cfg = write_config(tmp_path / "run.yaml", teacher, corpus, tmp_path / "out", dtype="fp32",
                       align=one_process_stage(2, ckpt_every=1))
    args = ["--stage", "align", "--config", str(cfg)]
    first, again, forced = train_in_one_process([args, args, [*args, "--force"]], tmp_path / "runs.json")
    assert first.returncode == again.returncode == forced.returncode == 0, tail(forced)
    assert "already finished" in again.stdout + again.stderr
    said = forced.stdout + forced.stderr
    assert "rerunning from step 0" in said and "resumed align" not in said
    run_dir = tmp_path / "out" / "align"
    assert sorted(metrics(run_dir)) == [1, 2]  # the rerun's own steps, in a fresh metrics.jsonl
    (previous,) = (run_dir / "previous").iterdir()
    assert (previous / "DONE").is_file() and sorted(metrics(previous)) == [1, 2]
    assert [p.name for p in sorted((previous / "checkpoints").iterdir())] == ["step00000001", "step00000002"]
    assert (run_dir / "DONE").is_file()


def test_a_finished_stage_of_another_model_is_refused_and_changed_settings_are_said(tmp_path):
    """A finished stage is skipped: with another seed or teacher in the config it is refused by name (the next stage
    would build on another model), with only the stage's own settings changed a warning names them; neither trains."""
    from trainer_utils import (make_corpus, make_tiny_teacher, metrics, one_process_stage, tail, train_in_one_process,
                                write_config)

    teacher = make_tiny_teacher(tmp_path / "teacher")
    other = make_tiny_teacher(tmp_path / "other", tie=False)
    corpus = make_corpus(tmp_path / "corpus", n_files=12)
    cfg = write_config(tmp_path / "run.yaml", teacher, corpus, tmp_path / "out", dtype="fp32",
                       align=one_process_stage(2, ckpt_every=1))
    args = ["--stage", "align", "--config", str(cfg)]
    first, seed, swapped, lr = train_in_one_process(
        [args, [*args, "seed=1"], [*args, f"teacher={other}"], [*args, "align.lr=0.5"]], tmp_path / "runs.json")
    assert first.returncode == 0, tail(first)
    for run, field in ((seed, "seed=1"), (swapped, "teacher=")):
        said = run.stdout + run.stderr
        assert run.returncode != 0 and field in said and "give another out_dir" in said and "--force" in said, tail(run)
    said = lr.stdout + lr.stderr
    assert lr.returncode == 0 and "with other settings (align.lr" in said and "already finished" in said, tail(lr)
    assert sorted(metrics(tmp_path / "out" / "align")) == [1, 2]  # nothing trained again


FINISHED_SCRIPT = """
import json, sys
from pathlib import Path
from ds_hybrid import distributed as D
from ds_hybrid.trainer import finished_on_main
D.init_distributed(1)
run_dir = Path(sys.argv[1]) / f"rank{D.rank()}"   # each rank's own view of the run folder
Path(sys.argv[1], f"verdict{D.rank()}.json").write_text(json.dumps(finished_on_main(run_dir)))
D.shutdown()
"""


def test_every_rank_takes_the_main_ranks_look_at_done(tmp_path):
    """`train.py --force` on several ranks: the main rank moves DONE away and waits at a barrier; a rank that looked
    for DONE itself after the move skipped that barrier and met the others in another collective (a hang until the
    timeout). Every rank now takes the main rank's look: here rank 0 sees DONE and rank 1 does not (its own view,
    as after the move), and both are told the stage has finished."""
    from trainer_utils import env, free_port, tail

    (tmp_path / "rank0").mkdir()
    (tmp_path / "rank0" / "DONE").write_text("{}")
    (tmp_path / "rank1").mkdir()
    script = tmp_path / "finished.py"
    script.write_text(FINISHED_SCRIPT)
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                        str(free_port()), str(script), str(tmp_path)], env=env(), capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, tail(p)
    assert [json.loads((tmp_path / f"verdict{r}.json").read_text()) for r in (0, 1)] == [True, True]


WAIT_SCRIPT = """
import json, sys, time
from pathlib import Path
from ds_hybrid import distributed as D
mode, out = sys.argv[1], Path(sys.argv[2])
D.init_distributed(2 / 60)  # the training collectives' timeout: 2 seconds
t0 = time.time()
if D.rank() == 0:
    time.sleep(5)  # the main rank's one-off work (the token cache of a large corpus), longer than that
    if mode == "fail":
        raise SystemExit(3)
got = None
try:
    got = D.barrier() if mode == "barrier" else D.wait_for_main(f"value of rank {D.rank()}")
    verdict = "ok"
except RuntimeError as e:
    verdict = str(e)
Path(out, f"rank{D.rank()}.json").write_text(json.dumps({"verdict": verdict, "waited": time.time() - t0, "got": got}))
D.shutdown()
"""


@pytest.mark.parametrize("mode", ["wait", "barrier", "fail"])
def test_ranks_wait_for_the_main_ranks_one_off_work_past_the_collective_timeout(tmp_path, mode):
    """The other ranks wait while rank 0 builds the token cache: at a plain barrier they fail once the training
    collectives' timeout (dist_timeout_minutes; 2 s here) passes, as a large corpus's first tokenization would have
    ended a job; in wait_for_main (a key in the group's store, hours) they wait for it, and get the main rank's value
    (the token cache's folder); and a main rank that fails ends their wait at once (the store's connection closes),
    not hours later."""
    from trainer_utils import env, free_port

    script = tmp_path / "wait.py"
    script.write_text(WAIT_SCRIPT)
    port, procs = str(free_port()), []
    for r in (0, 1):
        e = dict(env(), RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r), LOCAL_WORLD_SIZE="2",
                 MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        procs.append(subprocess.Popen([sys.executable, str(script), mode, str(tmp_path)], env=e, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    rcs = [p.wait(timeout=300) for p in procs]
    logs = [p.stdout.read()[-2000:] for p in procs]
    waiting = json.loads((tmp_path / "rank1.json").read_text())
    if mode == "wait":
        assert rcs == [0, 0] and waiting["verdict"] == "ok" and waiting["waited"] >= 4.5, logs
        assert waiting["got"] == "value of rank 0"
        assert json.loads((tmp_path / "rank0.json").read_text()) | {"waited": 0} == {
            "verdict": "ok", "waited": 0, "got": "value of rank 0"}
    elif mode == "barrier":
        assert "Timed out" in waiting["verdict"] and waiting["waited"] < 4.5, waiting
    else:
        assert rcs[0] == 3 and "closed" in waiting["verdict"] and waiting["waited"] < 60, waiting


def test_a_published_folder_is_forced_to_disk_before_its_rename(tmp_path, monkeypatch):
    """atomic_folder (a stage's hf/ export, a converted teacher): every file and folder under the temporary folder is
    fsynced before the rename that publishes it, and the parent after it, so a DONE written next never vouches for
    an export still in the page cache."""
    import ds_hybrid.folders as folders

    events = []
    monkeypatch.setattr(folders, "fsync_file", lambda p: events.append(("file", Path(p).name)))
    real_dir, real_replace = folders.fsync_dir, os.replace
    monkeypatch.setattr(folders, "fsync_dir", lambda p: (events.append(("dir", Path(p).name)), real_dir(p)))
    monkeypatch.setattr(folders.os, "replace", lambda a, b: (events.append(("rename", Path(b).name)), real_replace(a, b)))
    with folders.atomic_folder(tmp_path / "hf", "hf") as tmp:
        (tmp / "model.safetensors").write_bytes(b"x" * 10)
        (tmp / "sub").mkdir()
        (tmp / "sub" / "config.json").write_text("{}")
    rename = events.index(("rename", "hf"))
    assert {n for k, n in events[:rename] if k == "file"} == {"model.safetensors", "config.json"}
    assert {n for k, n in events[:rename] if k == "dir"} >= {"sub"} and ("dir", tmp_path.name) in events[rename:]
    assert (tmp_path / "hf" / "sub" / "config.json").read_text() == "{}"


def test_a_prune_cut_short_leaves_no_folder_that_looks_complete(tmp_path, monkeypatch, caplog):
    """Pruning renames a checkpoint out of the tag names before deleting it: a delete that stops half way (killed, an
    NFS leftover) leaves `.pruning-<tag>`, not a `stepN` folder whose COMPLETE vouches for deleted shards; the next
    resume removes it; a failure is said."""
    import shutil

    import ds_hybrid.checkpoint as checkpoint

    ck = two_checkpoints(tmp_path)  # steps 2 and 4, keep 3
    ck = Checkpointer(ck.dir, keep=1)
    real = shutil.rmtree
    monkeypatch.setattr(checkpoint.shutil, "rmtree",  # a delete that gives up after the shards
                        lambda p, ignore_errors=False: [f.unlink() for f in Path(p).rglob("*.pt")])
    with caplog.at_level("WARNING", logger="ds_hybrid"):
        ck.save({"student": FakeEngine()}, 6, {"step": 6})
    assert [s for s, _ in ck.complete_tags()] == [6]  # (steps 2 and 4 no longer look complete)
    assert sorted(p.name for p in ck.dir.iterdir()) == [".pruning-step00000002", ".pruning-step00000004",
                                                        "step00000006"]
    assert "could not be deleted whole" in caplog.text
    monkeypatch.setattr(checkpoint.shutil, "rmtree", real)
    assert ck.load({"student": FakeEngine()}) == {"step": 6}
    assert sorted(p.name for p in ck.dir.iterdir()) == ["step00000006"]


@pytest.mark.parametrize("how", ["marker", "flipped_byte"])
def test_the_resume_point_is_picked_before_any_model_and_restored_after(tmp_path, how):
    """pick() runs before the models are built: the newest checkpoint whose marker reads and (verified) whose files
    match their manifest, the damaged newer one set aside there and then, and that marker handed to the settings
    check (an unreadable one once turned the check off); restore() then loads exactly the picked one."""
    ck = two_checkpoints(tmp_path)
    if how == "marker":
        (ck.latest()[1] / MARKER).write_text("{not json")
    else:
        damage(ck.latest()[1], how)
    path, marker = ck.pick()
    assert path.name == "step00000002" and marker["step"] == 2 and marker["world_size"] == 1
    assert sorted(p.name for p in ck.dir.iterdir()) == ["step00000002", "step00000004.damaged"]
    eng = FakeEngine()
    assert ck.restore({"student": eng}, (path, marker)) == {"step": 2} and eng.loaded == 2
    assert ck.restore({"student": FakeEngine()}, None) is None



def test_pick_checks_the_newest_marker_before_hashing_any_file(tmp_path, monkeypatch):
    """Another world size or settings (the run's check, which raises to refuse) are refused from the newest marker
    before any file is hashed (a 70B checkpoint's verification reads a terabyte) and with nothing renamed; where the
    newest is damaged, the check runs again on the older checkpoint picked."""
    from ds_hybrid import checkpoint

    ck = two_checkpoints(tmp_path)
    newest = ck.latest()[1] / MARKER
    good = newest.read_text()
    monkeypatch.setattr(checkpoint, "verify_manifest", lambda path: pytest.fail(f"{path} hashed before the checks"))
    newest.write_text(json.dumps({**json.loads(good), "world_size": 4}))
    with pytest.raises(CheckpointError, match="written by 4 ranks, this job has 1"):
        ck.pick()
    newest.write_text(good)
    seen: list[str] = []

    def refuse(path: Path, marker: dict) -> None:
        seen.append(path.name)
        raise ConfigError("kl.global_batch", 8, f"the checkpoint {path} was written with 16")

    with pytest.raises(ConfigError, match="written with 16"):
        ck.pick(check=refuse)
    assert seen == ["step00000004"] and sorted(p.name for p in ck.dir.iterdir()) == ["step00000002", "step00000004"]
    monkeypatch.undo()
    damage(ck.latest()[1], "flipped_byte")
    seen.clear()
    path, marker = ck.pick(check=lambda path, marker: seen.append(path.name))
    assert path.name == "step00000002" and seen == ["step00000004", "step00000002"]

SIGNAL_SCRIPT = """
import json, os, signal, sys
from ds_hybrid import trainer
from ds_hybrid.config import load_config
cfg_path, mode, out = sys.argv[1:4]
cfg = load_config(cfg_path, [])
if mode == "setup":  # Slurm's warning while the job sets up (the token cache, the models' build)
    trainer._Signals.install()
    os.kill(os.getpid(), signal.SIGUSR1)
elif mode == "final":  # ... while it runs its final evaluation, after the last step's checkpoint
    real = trainer.held_out
    def held_out(*a, **k):
        os.kill(os.getpid(), signal.SIGUSR1)
        return real(*a, **k)
    trainer.held_out = held_out
try:
    trainer.run_stage(cfg, "align")
    code = 0
except trainer.StopRequested as e:
    code = e.code
open(out, "w").write(json.dumps(code))
"""


def test_a_signal_outside_the_steps_stops_the_stage_where_nothing_is_unsaved(tmp_path):
    """SIGUSR1 (Slurm's warning) during the set-up stops the stage before its models are built (no step trained, no
    checkpoint written: at 70B that save could outlast the warning, and a job that reaches its time limit is not
    requeued); during the final evaluation, after the last step's checkpoint, it stops before the export. Both exit
    128 + 10 for the launcher's requeue, and a rerun resumes: from step 0, and from the last step to the export."""
    from trainer_utils import env, make_corpus, make_tiny_teacher, one_process_stage, write_config

    teacher = make_tiny_teacher(tmp_path / "teacher")
    corpus = make_corpus(tmp_path / "corpus", n_files=12)
    cfg = write_config(tmp_path / "run.yaml", teacher, corpus, tmp_path / "out", dtype="fp32",
                       align=one_process_stage(2, ckpt_every=2, export=True, eval_at_start=False, eval_every=0))
    script = tmp_path / "stop_on_signal.py"  # (not signal.py: the script's folder comes first on sys.path)
    script.write_text(SIGNAL_SCRIPT)
    run_dir = tmp_path / "out" / "align"

    def run(mode: str) -> tuple[int, str]:
        p = subprocess.run([sys.executable, str(script), str(cfg), mode, str(tmp_path / "code.json")], env=env(),
                           capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr[-3000:]
        return json.loads((tmp_path / "code.json").read_text()), p.stdout + p.stderr

    code, said = run("setup")  # (here the signal comes before the token cache's build: it stops there, before
    # tokenizing; one that came after the build would stop the stage before its models are built)
    assert code == 128 + signal.SIGUSR1 and re.search(r"stopped align's token cache build on a signal|stopped align "
                                                       r"before building its models on a signal", said), said[-3000:]
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "metrics.jsonl").exists()
    code, said = run("final")
    assert code == 128 + signal.SIGUSR1, said[-3000:]
    assert "stopped align after its last step (2, checkpointed), before its export on a signal" in said
    assert [p.parent.name for p in (run_dir / "checkpoints").glob("step*/COMPLETE")] == ["step00000002"]
    assert not (run_dir / "DONE").exists() and not (run_dir / "hf").exists()
    code, said = run("plain")
    assert code == 0 and "resumed align from step 2" in said
    assert (run_dir / "DONE").is_file() and (run_dir / "hf" / "config.json").is_file()


def test_a_second_copy_of_a_running_stage_is_refused(tmp_path):
    """The same stage started again while it runs (a job submitted twice, a requeued job resubmitted by hand) would
    resume from the same checkpoint and write the same checkpoints and logs at once: refused, naming the holder,
    before anything is read or written; once the first has ended, it runs."""
    from trainer_utils import env, make_corpus, make_tiny_teacher, one_process_stage, tail, train, write_config

    from ds_hybrid.trainer import stage_held

    teacher = make_tiny_teacher(tmp_path / "teacher")
    corpus = make_corpus(tmp_path / "corpus", n_files=12)
    cfg = write_config(tmp_path / "run.yaml", teacher, corpus, tmp_path / "out", dtype="fp32",
                       align=one_process_stage(1))
    run_dir = tmp_path / "out" / "align"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from ds_hybrid.trainer import stage_held\n"
         "with stage_held(Path(sys.argv[1]), 'align'):\n    print('held', flush=True); time.sleep(120)", str(run_dir)],
        stdout=subprocess.PIPE, text=True, env=env())
    try:
        assert holder.stdout.readline().strip() == "held"
        p = train("align", cfg, nproc=1)
        assert p.returncode == 2, tail(p)
        assert re.search(rf"out_dir=.*: stage align already runs in .*\(host .*, pid {holder.pid}, since .*a second "
                         r"copy would write the same checkpoints and logs at once", p.stderr), tail(p)
        assert sorted(p.name for p in run_dir.iterdir()) == [".stage.lock"]
    finally:
        holder.kill()
        holder.wait()
    with stage_held(run_dir, "align"):  # its process gone, the lock went with it; re-entrant in one process
        with stage_held(run_dir, "align"):
            assert f"pid {os.getpid()}," in (run_dir / ".stage.lock").read_text()
    p = train("align", cfg, nproc=1)
    assert p.returncode == 0 and (run_dir / "DONE").is_file(), tail(p)


def test_a_resumed_run_logs_each_step_once_whatever_the_interrupted_one_left(tmp_path):
    """metrics.jsonl and TensorBoard on a resume: a run killed before its first checkpoint restarts at step 0 and its
    earlier rows go (they were logged twice); a resume at step k drops later rows, and the held-out rows at k where the
    trainer scores k again (an evaluation step: a stop there skipped them), else keeps them; a torn last line
    (killed, or a full disk, mid-write) is dropped rather than glued to the resumed run's first row."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from ds_hybrid.monitor import Monitor

    run_dir = tmp_path / "kl"

    def log(start: int, steps: range, torn: bool = False, scores_start: bool = False) -> None:
        m = Monitor(run_dir, 10, start, 1, "kl", scores_start=scores_start)
        m.record_run({"seed": start}, {"total_steps": 10})
        for k in steps:
            m.scalars(k, {"loss": float(k)})
            if k % 2 == 0:
                m.scalars(k, {"loss": float(k)}, prefix="val")
        m.close()
        if torn:
            with open(run_dir / "metrics.jsonl", "a") as f:
                f.write('{"step": 9, "split": "tr')

    def rows() -> list[tuple[int, str]]:
        return [(r["step"], r["split"]) for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())]

    log(0, range(0, 4), torn=True)  # killed before its first checkpoint
    log(0, range(0, 3))  # started again at step 0
    assert rows() == [(0, "train"), (0, "val"), (1, "train"), (2, "train"), (2, "val")]
    log(2, range(3, 6), torn=True)  # resumed at step 2 (not scored again there), stopped after step 5, torn
    log(4, [], scores_start=True)  # resumed at step 4, an evaluation step: the trainer scores val at 4 again
    assert rows() == [(0, "train"), (0, "val"), (1, "train"), (2, "train"), (2, "val"), (3, "train"), (4, "train")]
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [0, 1, 2, 3, 4]
    # every start's provenance kept (runs.jsonl), the latest as run_info.json and config.yaml
    runs = [json.loads(x) for x in (run_dir / "runs.jsonl").read_text().splitlines()]
    assert [(r["start_step"], r["config"]) for r in runs] == [(0, {"seed": 0}), (0, {"seed": 0}), (2, {"seed": 2}),
                                                              (4, {"seed": 4})]
    assert json.loads((run_dir / "run_info.json").read_text())["total_steps"] == 10 and "git_commit" in runs[-1]
    assert (run_dir / "config.yaml").read_text() == "seed: 4\n"


def test_a_checkpoint_deepspeed_loads_nothing_from_is_an_error_not_step_0(tmp_path):
    """DeepSpeed's load_checkpoint answers (None, None) where it finds nothing to load (files renamed by another
    version, a tag folder emptied): the stage restarted at step 0 without a word. Now an error naming the folder."""
    ck = two_checkpoints(tmp_path)

    class LoadsNothing(FakeEngine):
        def load_checkpoint(self, path, tag, load_optimizer_states, load_lr_scheduler_states):
            return None, None

    with pytest.raises(CheckpointError, match=r"step00000004 is complete by its marker, but DeepSpeed loaded no "
                                              r"student state from .*: move .* away to resume from the one before it"):
        ck.load({"student": LoadsNothing()})
    eng = FakeEngine()
    assert ck.load({"student": eng}) == {"step": 4} and eng.loaded == 4


class _Unpicklable(RuntimeError):
    """An error that does not cross processes as itself (a required argument its pickle leaves out)."""

    def __init__(self, what: str, extra: int):
        super().__init__(what)
        self.extra = extra


def _main_reads_rank(rank: int, port: int, queue) -> None:
    """One of two gloo ranks: what each of a few main_reads gives it (a value, or the error it raised)."""
    import datetime

    import torch.distributed as dist

    from ds_hybrid import distributed as D

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))

    def raising(e):
        def read():
            if not D.is_main():
                raise AssertionError("read on a rank other than the main one")
            raise e
        return read

    got = {"value": D.main_reads(lambda: ("read on rank", D.rank()))}
    for name, e in (("config", ConfigError("teacher", "org/none", "the hub gave no such model")),
                    ("os", FileNotFoundError(2, "No such file", "/x/DONE")), ("unpicklable", _Unpicklable("bad", 3))):
        try:
            D.main_reads(raising(e))
            got[name] = "returned"
        except Exception as err:  # noqa: BLE001
            got[name] = (type(err).__name__, str(err), err is e)
    got["after"] = D.main_reads(lambda: "still in step")  # (the ranks' collectives still pair up)
    queue.put((rank, got))
    dist.destroy_process_group()


def test_an_error_in_a_main_rank_read_reaches_every_rank_instead_of_a_hang():
    """D.main_reads: where the main rank's read raises (a hub teacher that fails to download, a probe's non-finite
    score), every rank raises it, the main rank its own error and the others a copy (a ConfigError as itself, naming
    the field; an error that does not pickle back as a MainRankFailed naming it), and the ranks stay in step; before,
    the other ranks waited in the broadcast until a time-out or the launcher killed them."""
    import torch.multiprocessing as mp

    from trainer_utils import free_port

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_main_reads_rank, args=(r, free_port_once, queue))
             for free_port_once in [free_port()] for r in (0, 1)]
    for p in procs:
        p.start()
    try:
        got = dict(queue.get(timeout=120) for _ in procs)  # (a rank left waiting: queue.Empty after 2 minutes)
        for p in procs:
            p.join(timeout=60)
            assert p.exitcode == 0
    finally:
        for p in procs:
            p.kill()
    assert got[0]["value"] == got[1]["value"] == ("read on rank", 0)
    assert got[0]["config"] == ("ConfigError", "teacher='org/none': the hub gave no such model", True)
    assert got[1]["config"] == ("ConfigError", "teacher='org/none': the hub gave no such model", False)
    assert got[0]["os"][:2] == got[1]["os"][:2] == ("FileNotFoundError", "[Errno 2] No such file: '/x/DONE'")
    assert got[0]["unpicklable"] == ("_Unpicklable", "bad", True)
    assert got[1]["unpicklable"] == ("MainRankFailed", "the main rank failed: _Unpicklable: bad", False)
    assert got[0]["after"] == got[1]["after"] == "still in step"


def test_a_device_index_past_the_gpus_here_is_refused_naming_the_option(monkeypatch):
    """--device cuda:N with N past the machine's GPUs is refused naming the option, before any model (it failed in
    from_pretrained with CUDA's invalid-ordinal error); no GPU at all, and a malformed name, are refused alike."""
    import torch

    from ds_hybrid.distributed import parse_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"^--device='cuda:0': no CUDA device here"):
        parse_device("cuda:0")
    with pytest.raises(ConfigError, match=r"^--device='gpu0': give cpu, cuda or cuda:N"):
        parse_device("gpu0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert parse_device("cuda:1") == torch.device("cuda", 1) and parse_device("cuda") == torch.device("cuda")
    with pytest.raises(ConfigError, match=r"^--device='cuda:2': this machine has 2 CUDA device\(s\): use "
                                          r"cuda:0\.\.cuda:1"):
        parse_device("cuda:2")


def test_an_align_with_bos_rows_trains_and_its_checkpoint_records_the_token(tmp_path):
    """data.bos: true on a tokenizer that puts none by default (SmolLM2's): the stage trains on BOS-led rows and
    its checkpoint records the token, so a resume under another data.bos is refused by name."""
    from trainer_utils import make_corpus, make_tiny_teacher, one_process_stage, tail, train_in_one_process, write_config

    from ds_hybrid.teacher import load_tokenizer

    teacher = make_tiny_teacher(tmp_path / "teacher")
    corpus = make_corpus(tmp_path / "corpus", n_files=12)
    cfg = write_config(tmp_path / "run.yaml", teacher, corpus, tmp_path / "out", dtype="fp32",
                       align=one_process_stage(2, ckpt_every=1, keep_checkpoints=2))
    args = ["--stage", "align", "--config", str(cfg), "data.bos=true"]
    (first,) = train_in_one_process([args], tmp_path / "runs.json")
    assert first.returncode == 0, tail(first)
    marks = sorted((tmp_path / "out" / "align" / "checkpoints").glob("*/COMPLETE"))
    assert marks and all(json.loads(m.read_text())["settings"]["row_bos"] == load_tokenizer(str(teacher)).bos_token_id
                         for m in marks)
    (tmp_path / "out" / "align" / "DONE").unlink()  # as if killed after its last checkpoint: the next run resumes
    (again,) = train_in_one_process([[*args[:-1], "data.bos=false"]], tmp_path / "runs2.json")
    said = again.stdout + again.stderr
    assert again.returncode != 0 and "data.bos='rows with no BOS': the checkpoint" in said and "with BOS token" in said and "set it back to resume" in said, \
        tail(again)


def test_a_finished_kl_of_other_softmax_layers_is_refused_however_its_spec_is_written(tmp_path):
    """The recorded layers (run_info) against what the spec resolves to now: the same layers written otherwise pass,
    other layers under any spec (a selection made again under the same {selection, k}) are refused by name."""
    import yaml
    from trainer_utils import make_tiny_teacher

    from ds_hybrid.config import load_config
    from ds_hybrid.errors import ConfigError
    from ds_hybrid.trainer import _finished_run_changes

    teacher = make_tiny_teacher(tmp_path / "teacher")
    run = tmp_path / "kl"
    run.mkdir()
    was = load_config(None, [f"teacher={teacher}", "softmax_layers=[1]"])
    (run / "config.yaml").write_text(yaml.safe_dump(was.to_dict()))
    (run / "run_info.json").write_text(json.dumps({"softmax_layers": [1]}))
    def selection(name: str, ranking: list[int]) -> str:
        path = tmp_path / name
        path.write_text(json.dumps({"format": 1, "method": "ga_s2", "ranking": ranking, "num_layers": 4,
                                    "scores": {}, "lower_is_better": True}))
        return f"{{selection: {path}, k: 1, check_origin: false}}"

    same = selection("same.json", [1, 2, 0, 3])  # layer 1 again, as a selection's top-1
    assert _finished_run_changes(run, load_config(None, [f"teacher={teacher}", f"softmax_layers={same}",
                                                         "kl.lr=2e-4"]), "kl") == ["kl.lr 0.0001 -> 0.0002"]
    for spec in ("[2]", selection("other.json", [2, 1, 0, 3])):
        with pytest.raises(ConfigError, match=r"^softmax_layers=.*the stage finished in .* with softmax_layers=\[1\]"):
            _finished_run_changes(run, load_config(None, [f"teacher={teacher}", f"softmax_layers={spec}"]), "kl")
