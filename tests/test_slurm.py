"""launchers/distill_70b.slurm on a real two-node Slurm cluster started on this machine (Debian slurm-wlm).

The same script users submit, with CPU overrides (gloo, one rank per node, a tiny teacher): align -> select -> kl ->
finetune across 2 nodes; then scancel in the middle of kl and resubmit: finished stages are skipped and kl resumes
from its checkpoint to the same losses as the uninterrupted run; the time-limit signal makes the job checkpoint,
requeue itself and finish to the same losses; SELECT_ARRAY runs the probes as a job array and continues after it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from trainer_utils import REPO, env, make_corpus, make_tiny_teacher, metrics, write_config

pytestmark = pytest.mark.slow
if shutil.which("sbatch") is None or shutil.which("slurmctld") is None or os.geteuid() != 0:
    pytest.skip("needs root and Debian's slurm-wlm (CI installs them: see .ci/run)", allow_module_level=True)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    d = tmp_path_factory.mktemp("slurm")
    p = subprocess.run([str(REPO / "launchers" / "local_slurm.sh"), "start", str(d)], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    e = env()
    e["SLURM_CONF"] = str(d / "slurm.conf")
    yield e
    subprocess.run([str(REPO / "launchers" / "local_slurm.sh"), "stop", str(d)], timeout=60)


SBATCH = ["sbatch", "--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=1", "--mem=0",
          "--time=30"]


def submit(e, log, *args, wait=True):
    """sbatch the launcher; ``wait``: until the job has ended, then its exit code is the returncode (as sbatch
    --wait, whose polling backs off to 32 s between looks: up to half a minute idle after a job of a minute or two)."""
    cmd = [*SBATCH, "--parsable", f"--output={log}", "launchers/distill_70b.slurm", f"PYTHON={sys.executable}", *args]
    p = subprocess.run(cmd, capture_output=True, text=True, env=e, cwd=REPO, timeout=120)
    if not wait or p.returncode != 0:
        return p
    job = p.stdout.strip().split(";")[0]
    deadline = time.time() + 1500
    while (state := _job_field(e, job, "JobState")) not in ENDED:
        assert time.time() < deadline, f"job {job} still {state}"
        time.sleep(0.5)
    code, sig = (int(x) for x in _job_field(e, job, "ExitCode").split(":"))
    return subprocess.CompletedProcess(cmd, code or (128 + sig if sig else 0), p.stdout,
                                       p.stderr + f"job {job}: {state}")


ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "BOOT_FAIL", "DEADLINE",
         "OUT_OF_MEMORY"}


@pytest.fixture(scope="module")
def conversion(cluster, tmp_path_factory):
    root = tmp_path_factory.mktemp("conv")
    teacher = make_tiny_teacher(root / "teacher")
    corpus = make_corpus(root / "corpus", n_files=20)
    out = root / "out"
    sel = str(out / "select" / "ga_s2" / "selection.json")
    cfg = write_config(root / "run.yaml", teacher, corpus, out, softmax_layers={"selection": sel, "k": 1},
                       align={"tokens": 4 * 8 * 64, "seq_len": 64},
                       kl={"tokens": 8 * 8 * 64, "seq_len": 64, "ckpt_every": 2},
                       finetune={"tokens": 2 * 8 * 64, "seq_len": 64},
                       select={"probe": {"tokens": 2 * 8 * 64, "seq_len": 64, "global_batch": 8, "micro_batch": 4},
                               "ratios": [0.25], "eval_sequences": 4})
    p = submit(cluster, root / "job.log", f"CONFIG={cfg}", "STAGES=align,select,kl,finetune")
    log = (root / "job.log").read_text() if (root / "job.log").exists() else ""
    assert p.returncode == 0, p.stdout + p.stderr + log
    return {"root": root, "cfg": cfg, "out": out, "teacher": teacher, "corpus": corpus}


def test_every_stage_ran_across_both_nodes(conversion):
    out = conversion["out"]
    for stage in ("align", "kl", "finetune"):
        assert (out / stage / "DONE").is_file() and (out / stage / "hf" / "config.json").is_file(), stage
        ranks = json.loads((out / stage / "run_info.json").read_text())["ranks"]
        assert sorted(r["slurm_node"] for r in ranks) == ["n1", "n2"], (stage, ranks)
    sel = json.loads((out / "select" / "ga_s2" / "selection.json").read_text())
    kl = json.loads((out / "kl" / "DONE").read_text())
    assert kl["softmax_layers"] == sel["ranking"][:1]  # kl used the selection
    assert list((out / "kl").glob("slurm-*.log"))  # per-stage logs under the run dir


def start_kl_job(cluster, conversion, tmp_path, until_step: int):
    """A job over align,select,kl whose align and select are already done (copied from the conversion: same
    weights, so the selection's fingerprints agree), left running until kl has checkpointed step ``until_step``."""
    out = tmp_path / "out"
    out.mkdir()
    for stage in ("align", "select"):
        shutil.copytree(conversion["out"] / stage, out / stage)
    sel = str(out / "select" / "ga_s2" / "selection.json")
    cfg = write_config(tmp_path / "run.yaml", conversion["teacher"], conversion["corpus"], out,
                       softmax_layers={"selection": sel, "k": 1}, kl={"tokens": 8 * 8 * 64, "seq_len": 64, "ckpt_every": 2},
                       select={"probe": {"tokens": 2 * 8 * 64, "seq_len": 64, "global_batch": 8, "micro_batch": 4},
                               "ratios": [0.25], "eval_sequences": 4})
    p = submit(cluster, tmp_path / "job1.log", f"CONFIG={cfg}", "STAGES=align,select,kl", wait=False)
    assert p.returncode == 0, p.stderr
    job = p.stdout.strip().split(";")[0]
    marker = out / "kl" / "checkpoints" / f"step{until_step:08d}" / "COMPLETE"
    deadline = time.time() + 600
    while not marker.exists() and time.time() < deadline:
        time.sleep(0.3)
    assert marker.exists(), (tmp_path / "job1.log").read_text()[-3000:]
    return out, cfg, job


def test_scancel_mid_kl_then_resubmit_resumes_to_the_same_losses(cluster, conversion, tmp_path):
    out, cfg, job = start_kl_job(cluster, conversion, tmp_path, 4)
    subprocess.run(["scancel", job], env=cluster, check=True)
    while subprocess.run(["squeue", "-h", "-j", job], capture_output=True, text=True, env=cluster).stdout.strip():
        time.sleep(0.5)
    assert not (out / "kl" / "DONE").exists()
    p = submit(cluster, tmp_path / "job2.log", f"CONFIG={cfg}", "STAGES=align,select,kl")
    log2 = (tmp_path / "job2.log").read_text()
    assert p.returncode == 0, log2
    assert "== align: done, skipped" in log2 and "== select: done, skipped" in log2
    kl_logs = "".join(f.read_text() for f in (out / "kl").glob("slurm-*.log"))
    assert "resumed kl from step" in kl_logs
    resumed, ref = metrics(out / "kl"), metrics(conversion["out"] / "kl")
    assert sorted(resumed) == sorted(ref) == list(range(1, 9))
    for step in ref:
        assert resumed[step]["loss"] == ref[step]["loss"], step


def _job_field(e, job, field):
    show = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True, env=e).stdout
    for tok in show.split():
        if tok.startswith(field + "="):
            return tok.split("=", 1)[1]
    return None


def test_time_limit_signal_checkpoints_requeues_and_resumes(cluster, conversion, tmp_path):
    """Slurm's time-limit warning (--signal=B:USR1@600) reaches the batch shell as USR1; here it is sent the same way
    (scancel --batch --signal=USR1) in the middle of kl. The ranks checkpoint and exit, the job requeues itself,
    the restarted job skips finished stages, resumes kl and ends with the uninterrupted run's losses."""
    out, _, job = start_kl_job(cluster, conversion, tmp_path, 2)
    subprocess.run(["scancel", "--batch", "--signal=USR1", job], env=cluster, check=True)
    # Slurm holds a requeued job for ~120 s (EligibleTime = requeue time + 121 s, measured on Slurm 22.05); the test
    # releases it after 3 s instead: nothing of what is tested happens in that wait. Not at once: slurmd revokes the
    # first run's credential with a time in whole seconds, and a launch within that second is refused ("Killing
    # non-startable batch JobId=..: Job credential revoked", seen once here under load), which ends the job
    deadline = time.time() + 300
    while not (_job_field(cluster, job, "Restarts") == "1" and _job_field(cluster, job, "JobState") == "PENDING"):
        assert time.time() < deadline, "the job did not requeue itself after USR1"
        time.sleep(0.5)
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now+3"], env=cluster, check=True)
    deadline = time.time() + 900
    while not (out / "kl" / "DONE").exists() and time.time() < deadline:
        if _job_field(cluster, job, "JobState") in ENDED:  # ended without kl's DONE: no point in waiting on
            break
        time.sleep(1)
    kl_logs = "".join(f.read_text() for f in sorted((out / "kl").glob("slurm-*.log")))
    state = subprocess.run(["scontrol", "show", "job", job], env=cluster, capture_output=True, text=True).stdout
    assert (out / "kl" / "DONE").exists(), kl_logs[-3000:] + "\n" + state
    assert "stopped kl at step" in kl_logs and "resumed kl from step" in kl_logs
    assert _job_field(cluster, job, "Restarts") == "1"
    resumed, ref = metrics(out / "kl"), metrics(conversion["out"] / "kl")
    assert sorted(resumed) == sorted(ref) == list(range(1, 9))
    for step in ref:
        assert resumed[step]["loss"] == ref[step]["loss"], step


def test_select_array_runs_probes_as_array_tasks_then_continues(cluster, conversion, tmp_path):
    """SELECT_ARRAY=2: the job submits the probes as a 2-task array plus a job that collects them and goes on with
    kl once the array is done; every probe runs once, in one of the two tasks, and the selection equals the one made
    in a single job."""
    out = tmp_path / "out"
    out.mkdir()
    shutil.copytree(conversion["out"] / "align", out / "align")
    sel = str(out / "select" / "ga_s2" / "selection.json")
    cfg = write_config(tmp_path / "run.yaml", conversion["teacher"], conversion["corpus"], out,
                       softmax_layers={"selection": sel, "k": 1}, kl={"tokens": 8 * 64, "seq_len": 64},
                       select={"probe": {"tokens": 2 * 8 * 64, "seq_len": 64, "global_batch": 8, "micro_batch": 4},
                               "ratios": [0.25], "eval_sequences": 4})
    before = set(REPO.glob("ds-hybrid-*.out"))
    p = submit(cluster, tmp_path / "job.log", f"CONFIG={cfg}", "STAGES=select,kl", "SELECT_ARRAY=2")
    log = (tmp_path / "job.log").read_text()
    assert p.returncode == 0 and "probes in array job" in log, log
    deadline = time.time() + 900
    while not (out / "kl" / "DONE").exists() and time.time() < deadline:
        time.sleep(1)
    select_logs = sorted((out / "select").glob("slurm-*.log"))
    assert (out / "kl" / "DONE").exists(), "".join(f.read_text()[-2000:] for f in select_logs)
    probes = sorted(d for d in (out / "select" / "ga_s2" / "probes").iterdir() if d.is_dir())
    assert (out / "select" / "ga_s2" / "probes" / "PROBES.json").is_file()  # the settings they all ran from
    ran_in = {}
    for log_file in select_logs:  # which job ran which probe
        for line in log_file.read_text().splitlines():
            if "] probe " in line and "already done" not in line:
                ran_in.setdefault(line.split("] probe ")[1].split()[0], []).append(log_file.name)
    assert len(probes) == 5 and all((d / "kl" / "DONE").is_file() for d in probes)  # 4 layers + baseline
    assert len({n for names in ran_in.values() for n in names}) >= 2  # spread over the array's tasks
    assert all(len(v) == 1 for v in ran_in.values()), ran_in  # and none ran twice
    got = json.loads(Path(sel).read_text())
    want = json.loads((conversion["out"] / "select" / "ga_s2" / "selection.json").read_text())
    assert got["ranking"] == want["ranking"]
    for layer, score in want["scores"].items():
        assert got["scores"][layer] == pytest.approx(score, rel=1e-6)
    assert json.loads((out / "kl" / "DONE").read_text())["softmax_layers"] == want["ranking"][:1]
    # the follow-up jobs (2 array tasks, the collector) log next to the submitting job, not in the submit directory
    assert len(list(tmp_path.glob("ds-hybrid-*.out"))) == 3 and set(REPO.glob("ds-hybrid-*.out")) == before


def test_a_plain_srun_of_train_finds_its_rendezvous_from_slurm(cluster, conversion, tmp_path):
    """A batch script of the user's own (not the launcher): `srun python -m ds_hybrid.train ...` from another
    directory, no MASTER_ADDR / MASTER_PORT exported. The ranks take the rendezvous from Slurm (the first node's
    address, a port from the job id); before, DeepSpeed fell back to MPI discovery and every rank failed on a missing
    mpi4py."""
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "run.yaml", conversion["teacher"], conversion["corpus"], out,
                       kl={"tokens": 2 * 8 * 64, "seq_len": 64, "ckpt_every": 0, "eval_sequences": 2,
                           "init_from": str(conversion["out"] / "align" / "hf")})
    script = tmp_path / "mine.sbatch"
    script.write_text("#!/bin/bash\nunset MASTER_ADDR MASTER_PORT\n"
                      f"srun --kill-on-bad-exit=1 {sys.executable} -m ds_hybrid.train --stage kl --config {cfg}\n")
    log = tmp_path / "mine.log"
    p = subprocess.run([*SBATCH, "--parsable", f"--output={log}", str(script)], capture_output=True, text=True,
                       env=cluster, cwd=tmp_path, timeout=120)
    assert p.returncode == 0, p.stderr
    job = p.stdout.strip().split(";")[0]
    deadline = time.time() + 600
    while _job_field(cluster, job, "JobState") not in ENDED:
        assert time.time() < deadline
        time.sleep(0.5)
    assert (out / "kl" / "DONE").is_file(), log.read_text()[-3000:]
    ranks = json.loads((out / "kl" / "run_info.json").read_text())["ranks"]
    assert sorted(r["slurm_node"] for r in ranks) == ["n1", "n2"], ranks
