"""launchers/distill_70b.slurm's control flow with stand-ins for Slurm's commands and the trainer (no cluster): the
time-limit warning (SIGUSR1) requeues the job whenever it comes, not only when it stops a stage with an error.
tests/test_slurm.py runs the same script on a real two-node Slurm cluster."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

from trainer_utils import REPO

# the trainer's stand-in: the launch check prints out_dir, select method, teacher, the stages it was given and where
# select writes (under a score_ folder, as select.score=... makes it); a
# stage appends its name to stages.log, sends the batch script SIGUSR1 (as Slurm does 10 minutes before the limit)
# if it is $WARN_IN, notes the signal the script passes on, and finishes (DONE, exit 0) as the trainer does when the
# warning comes after its last step, during its export; a stage that is $STOP_IN exits 143 (SIGTERM, checkpointed)
PYTHON = """#!/bin/bash
if [ "$1 $2" = "-m ds_hybrid.launch" ]; then printf '%s\\nga_s2\\nembedded\\n%s\\n%s\\n' "$OUT" "$4" \\
  "$OUT/select/ga_s2/score_recall/selection.json"; exit 0; fi
if [ "$1 $2 $3" = "-m ds_hybrid.cli eval" ]; then  # the evaluation: a complete eval.json
  echo eval >> "$OUT/stages.log"; echo "$*" >> "$OUT/eval_args.log"; mkdir -p "$OUT/eval"
  echo '{"complete": true}' > "$OUT/eval/eval.json"; exit 0
fi
echo "$*" >> "$OUT/train_args.log"
while [ $# -gt 0 ]; do [ "$1" = --stage ] && stage=$2; shift; done
echo "$stage" >> "$OUT/stages.log"
trap 'echo "$stage" >> "$OUT/stage_warned.log"' USR1  # past its last step the trainer only notes it
if [ "$stage" = "${WARN_IN:-}" ]; then  # then wait (up to 30 s) until the script has passed the signal on
  kill -USR1 "$BATCH_PID"
  for _ in $(seq 300); do [ -s "$OUT/stage_warned.log" ] && break; sleep 0.1; done
fi
[ "$stage" = "${STOP_IN:-}" ] && exit 143  # stopped by a SIGTERM of its own (a preemption), checkpointed
mkdir -p "$OUT/$stage" && touch "$OUT/$stage/DONE"
"""
SCONTROL = """#!/bin/bash
case "$1 $2" in
  "show hostnames") echo node1 ;;
  "show node") echo "NodeName=node1 NodeAddr=127.0.0.1" ;;
  "requeue "*) [ -n "${REQUEUE_FAILS:-}" ] && exit 1; echo "$2" >> "$OUT/requeued.log" ;;
esac
"""
SRUN = """#!/bin/bash
while [[ $1 == --* ]]; do shift; done
exec "$@"
"""


def run_launcher(tmp_path: Path, warn_in: str | None, *args: str, python: str | None = None,
                 **env: str) -> tuple[subprocess.CompletedProcess, Path]:
    bin_dir, out = tmp_path / "bin", tmp_path / "out"
    bin_dir.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    for name, text in (("python", PYTHON), ("scontrol", SCONTROL), ("srun", SRUN)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(stat.S_IRWXU)
    # the batch script tells the stand-in its PID through a wrapper that execs it (so $$ there is the script's)
    wrapper = tmp_path / "job.sh"
    wrapper.write_text(f'#!/bin/bash\nexport BATCH_PID=$$\nexec bash {REPO / "launchers" / "distill_70b.slurm"} "$@"\n')
    e = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", OUT=str(out), SLURM_JOB_ID="42",
             SLURM_JOB_NODELIST="node1", SLURM_NNODES="1", SLURM_NTASKS_PER_NODE="1", SLURM_NTASKS="1",
             SLURM_SUBMIT_DIR=str(REPO))
    if warn_in:
        e["WARN_IN"] = warn_in
    e.update(env)
    p = subprocess.run(["bash", str(wrapper), f"PYTHON={python or bin_dir / 'python'}", "STAGES=align,kl,finetune",
                        *args], capture_output=True, text=True, env=e, timeout=120)
    return p, out


def lines(path: Path) -> list[str]:
    return path.read_text().split() if path.exists() else []


def test_a_warning_in_a_stages_last_moments_requeues_before_the_next_stage(tmp_path):
    """The warning during align's final evaluation or export: align finishes (DONE, exit 0), and the job requeues
    instead of starting kl, which the time limit would kill (the job then ended TIMEOUT, never requeued)."""
    p, out = run_launcher(tmp_path, warn_in="align")
    assert p.returncode == 0, p.stdout + p.stderr
    assert lines(out / "stages.log") == ["align"]
    assert lines(out / "requeued.log") == ["42"]
    assert lines(out / "stage_warned.log") == ["align"]  # passed on to the stage, which finished anyway
    assert "time limit near" in (out / "align" / "slurm-42.log").read_text()  # (said inside the stage's step)
    assert "requeued during align (before kl)" in p.stdout


def test_without_a_warning_every_stage_runs_and_nothing_is_requeued(tmp_path):
    p, out = run_launcher(tmp_path, warn_in=None)
    assert p.returncode == 0, p.stdout + p.stderr
    assert lines(out / "stages.log") == ["align", "kl", "finetune"]
    assert lines(out / "requeued.log") == []
    assert "all stages done" in p.stdout


def test_slurm_variables_give_torch_its_rank_and_rendezvous(monkeypatch):
    """Under srun without a launcher's exports: rank, world, local rank and ranks per node from Slurm's variables,
    the rendezvous at the job's first node on a port from the job id; what the launch exported is kept."""
    from ds_hybrid import distributed as D

    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
              "SLURM_STEP_NODELIST", "SLURM_NODELIST", "SLURM_TASKS_PER_NODE"):
        monkeypatch.setenv(k, "")  # (recorded, so that what the code sets is undone after the test)
        monkeypatch.delenv(k)
    monkeypatch.setattr(D, "node_address", lambda host: f"addr-of-{host}")
    monkeypatch.setenv("SLURM_PROCID", "9")
    monkeypatch.setenv("SLURM_NTASKS", "16")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "8(x2)")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "gpu[007-008,020],cpu3")
    monkeypatch.setenv("SLURM_JOB_ID", "123456")
    D._env_from_slurm()
    import os

    got = {k: os.environ[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                                      "MASTER_PORT")}
    assert got == {"RANK": "9", "WORLD_SIZE": "16", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "8",
                   "MASTER_ADDR": "addr-of-gpu007", "MASTER_PORT": str(20000 + 123456 % 20000)}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k)
    monkeypatch.setenv("MASTER_ADDR", "10.0.0.1")  # exported by the launch: kept
    D._env_from_slurm()
    assert os.environ["MASTER_ADDR"] == "10.0.0.1"
    assert D.first_host("a[1-2]-ib[3-4],b") == "a1-ib3" and D.first_host("node01,node02") == "node01"


def test_a_mistyped_launcher_setting_or_a_bad_stage_setting_stops_the_job_before_any_stage(tmp_path):
    """STAGE=kl (for STAGES) was declared and ignored: the whole pipeline ran. A kl setting that the job's ranks
    cannot run (global batch 33 over 2 ranks) was found only when kl started, after align; now the job checks every
    training stage it will run before the first (with the real config reader)."""
    import sys

    p, out = run_launcher(tmp_path / "a", None, "STAGE=kl")
    assert p.returncode == 2 and "STAGE: not a launcher setting" in p.stdout, p.stdout + p.stderr
    assert not (out / "stages.log").exists()
    p, out = run_launcher(tmp_path / "b", None, "kl.global_batch=33", python=sys.executable, SLURM_NTASKS="2")
    assert p.returncode == 2 and "kl.global_batch=33" in p.stderr, p.stdout + p.stderr
    assert not (out / "stages.log").exists() and not list(out.glob("*/slurm-42.log"))
    # a stage already done is skipped, not checked (a resubmission on another number of nodes)
    runs = tmp_path / "runs"
    (runs / "kl").mkdir(parents=True)
    (runs / "kl" / "DONE").write_text("{}")
    p, out = run_launcher(tmp_path / "c", None, "STAGES=kl", "kl.global_batch=33", f"out_dir={runs}",
                          python=sys.executable, SLURM_NTASKS="2")
    assert p.returncode == 0 and "== kl: done, skipped" in p.stdout, p.stdout + p.stderr


def test_a_failed_requeue_fails_the_job(tmp_path):
    """scontrol requeue refused (e.g. a job submitted with --no-requeue): the job exits 1, not 0 (it showed
    COMPLETED with its stages unfinished)."""
    p, out = run_launcher(tmp_path, warn_in="align", REQUEUE_FAILS="1")
    assert p.returncode == 1 and "requeue failed during align" in p.stdout, p.stdout + p.stderr
    assert lines(out / "stages.log") == ["align"]


def test_a_rank_bound_to_one_gpu_uses_it_and_too_few_gpus_are_refused(monkeypatch):
    """--gpus-per-task=1 shows each rank one device: LOCAL_RANK 3 becomes 0 for DeepSpeed and torch (cuda:3 was an
    invalid ordinal); 8 ranks on a node showing 4 GPUs are refused by name instead of sharing GPUs."""
    import os

    import pytest
    import torch

    from ds_hybrid import distributed as D
    from ds_hybrid.errors import ConfigError

    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setenv("DS_HYBRID_LOCAL_INDEX", "")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    D.bind_local_gpu()
    assert os.environ["LOCAL_RANK"] == "0" and os.environ["DS_HYBRID_LOCAL_INDEX"] == "3"
    monkeypatch.setenv("LOCAL_RANK", "5")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    with pytest.raises(ConfigError, match=r"LOCAL_RANK=5: this rank sees 4 GPUs"):
        D.bind_local_gpu()
    monkeypatch.setenv("LOCAL_RANK", "2")
    D.bind_local_gpu()
    assert os.environ["LOCAL_RANK"] == "2"


def test_an_evaluation_stopped_between_models_runs_again(tmp_path):
    """eval.json is written after each model ("complete": false until the last): a job requeued in the middle of its
    evaluation skipped it as done, and the hybrid's row never came; now only a complete one is skipped, and the rerun
    passes --resume (the models already done are kept, the rest evaluated)."""
    out = tmp_path / "out"
    (out / "eval").mkdir(parents=True)
    (out / "eval" / "eval.json").write_text('{"models": {"teacher": {}}, "complete": false}')
    p, out = run_launcher(tmp_path, None, "STAGES=eval")
    assert p.returncode == 0 and lines(out / "stages.log") == ["eval"], p.stdout + p.stderr
    assert "--resume" in (out / "eval_args.log").read_text().split()  # the models it had finished are kept
    p, out = run_launcher(tmp_path, None, "STAGES=eval")  # complete now: skipped
    assert "== eval: done, skipped" in p.stdout and lines(out / "stages.log") == ["eval"]


def test_select_counts_as_done_where_the_launch_check_says_it_writes(tmp_path):
    """The select stage is skipped where its selection exists at the path the launch check's fifth line names (a
    score_ folder here, not the method's plain file), and runs where it does not."""
    p, out = run_launcher(tmp_path, None, "STAGES=select,kl")
    assert p.returncode == 0, p.stdout + p.stderr
    assert lines(out / "stages.log") == ["select", "kl"]
    (out / "stages.log").unlink()
    (out / "kl" / "DONE").unlink()
    written = out / "select" / "ga_s2" / "score_recall" / "selection.json"
    written.parent.mkdir(parents=True)
    written.write_text("{}")
    (out / "select" / "ga_s2" / "selection.json").write_text("{}")  # (the plain file alone would not count)
    written.unlink()
    p, out = run_launcher(tmp_path, None, "STAGES=select,kl")
    assert lines(out / "stages.log") == ["select", "kl"], p.stdout
    written.write_text("{}")
    (out / "stages.log").unlink()
    (out / "kl" / "DONE").unlink()
    p, out = run_launcher(tmp_path, None, "STAGES=select,kl")
    assert p.returncode == 0, p.stdout + p.stderr
    assert lines(out / "stages.log") == ["kl"]
    assert "select: done, skipped" in p.stdout


def test_a_stage_stopped_by_a_signal_says_it_checkpointed_and_how_to_resume(tmp_path):
    """A stage that exits 128 + SIGTERM (a preemption's signal, no time-limit warning: no requeue) stopped where
    nothing is unsaved: the job says so and how to resume, not "failed"; the next stages are not started."""
    p, out = run_launcher(tmp_path, None, STOP_IN="kl")
    assert p.returncode == 143, p.stdout + p.stderr
    assert lines(out / "stages.log") == ["align", "kl"] and not lines(out / "requeued.log")
    assert "stage kl stopped on a signal (exit 143) after checkpointing; resubmit this script with the same " \
        "arguments to resume it" in p.stdout
    assert "failed" not in p.stdout


def test_a_select_array_task_gets_its_place_from_0_whatever_the_arrays_first_id_and_step(tmp_path):
    """sbatch --array=1-4 (or 0-6:2) of the select stage: the raw task id was passed as select.task_index, so task 4
    of 1-4 was out of range and share 0 ran in no task (no selection ever written)."""
    for first, step, task, count, want in (("1", "1", "4", "4", 3), ("0", "2", "6", "4", 3), ("0", "1", "0", "2", 0)):
        out = tmp_path / f"a{first}{step}{task}"
        p, out = run_launcher(out, None, "STAGES=select", SLURM_ARRAY_JOB_ID="7", SLURM_ARRAY_TASK_ID=task,
                              SLURM_ARRAY_TASK_MIN=first, SLURM_ARRAY_TASK_STEP=step, SLURM_ARRAY_TASK_COUNT=count)
        assert p.returncode == 0, p.stdout + p.stderr
        args = (out / "train_args.log").read_text()
        assert f"select.task_index={want} select.num_tasks={count}" in args, args
