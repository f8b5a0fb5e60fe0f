"""bench/gpu_campaign.sh's control flow on a CPU, with a stub python3 (tests/fixtures/campaign_stub), for the gemma
and compare campaigns: which steps run, in what order, beside what, on which GPU, and what a failed step skips. A
GPU lease is too dear a place to find a shell bug."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STUB = ROOT / "tests" / "fixtures" / "campaign_stub"


def campaign(tmp_path: Path, name: str, rc: int = 0, **env: str) -> list[str]:
    """Runs `bench/gpu_campaign.sh NAME` (its exit status must be RC); returns progress.log's events without their
    timestamps."""
    res = tmp_path / "res"
    res.mkdir(exist_ok=True)
    (res / "t0").write_text("0")
    full = dict(os.environ, PATH=f"{STUB}:{os.environ['PATH']}", CAMPAIGN_RES=str(res),
                CAMPAIGN_CARRY_OUT=str(tmp_path / "carry"), STUB_LOG=str(tmp_path / "calls.log"),
                RG=str(tmp_path / "run"), TASK_STAGGER_S="0.2", HOME=str(tmp_path), REAL_PYTHON=sys.executable,
                **env)  # (gpu_env.sh puts
    # $HOME/.local/bin first on PATH)
    p = subprocess.run(["bash", str(ROOT / "bench" / "gpu_campaign.sh"), name], cwd=ROOT, env=full,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == rc, p.stdout + p.stderr
    return [line.split(" ", 2)[2] for line in (res / "progress.log").read_text().splitlines()]


def calls_of(tmp_path: Path, program: str) -> list[list[str]]:
    """The stub's calls of ``program`` (e.g. `-m ds_hybrid.cli eval`, `ds_hybrid/train.py`): each call's arguments
    after it, as the campaign passed them."""
    lines = (tmp_path / "calls.log.argv").read_text().splitlines()
    head = shlex.split(program)
    calls = [line for line in lines if line.split()[:len(head)] == head]
    assert not any("$'" in line for line in calls), calls  # (bash's $'...' quoting, which shlex would misread)
    return [shlex.split(line)[len(head):] for line in calls]


def evaluations_pass_the_clis_checks(tmp_path: Path, monkeypatch) -> int:
    """Every `ds-hybrid eval` the campaign ran, through the real CLI's parser and the checks made before a model
    folder is read (eval_request: lengths, tasks, the SWDE/FDA files, model names) -> how many: on 2026-12-07 a
    lease's campaign stopped at its evaluation preflight, whose model name the CLI had begun to refuse."""
    from ds_hybrid.cli import build_parser
    from ds_hybrid.evaluation.run import eval_request

    monkeypatch.chdir(ROOT)  # (the campaign's working directory: its fixture paths are relative)
    calls = calls_of(tmp_path, "-m ds_hybrid.cli eval")
    for argv in calls:
        eval_request(build_parser().parse_args(["eval", *argv]))
    return len(calls)


def trainings_pass_the_config_checks(tmp_path: Path, monkeypatch) -> int:
    """Every `ds_hybrid/train.py` the campaign ran, through train.py's parser and the run config's checks with its
    overrides (load_config: fields, types, ranges, cross-field rules) -> how many: a misspelt override would otherwise
    first fail on a lease."""
    from ds_hybrid.config import load_config
    from ds_hybrid.train import parse_args

    monkeypatch.chdir(ROOT)
    calls = calls_of(tmp_path, "ds_hybrid/train.py")
    for argv in calls:
        args = parse_args(argv)
        load_config(args.config, args.overrides)
    return len(calls)


def at(events: list[str], event: str) -> int:
    assert event in events, (event, events)
    return events.index(event)


def test_gemma_campaign_order_and_overlaps(tmp_path, monkeypatch):
    ev = campaign(tmp_path, "gemma")
    assert ev[-1] == "campaign done"
    for job in ("gemma_teacher", "data_cache", "align", "carry_pack", "eval_preflight", "ga_s2_task0", "ga_s2_task1",
                "select_keep_global", "select_uniform", "select_proxy", "select_retrieval", "kl_ga_s2_3",
                "kl_keep_global_3", *(f"eval_{m}_{part}" for m in ("teacher", "ga_s2_3", "keep_global_3")
                                      for part in ("2048", "4096", "8192", "quality"))):
        assert at(ev, f"start {job} (GPU 0)") < at(ev, f"end {job} rc=0")
    # GA-S2 before everything that reads its selection; its two tasks side by side
    assert at(ev, "start ga_s2_task1 (GPU 0)") < at(ev, "end ga_s2_task0 rc=0")
    first_after = min(at(ev, f"start {j} (GPU 0)") for j in ("select_keep_global", "kl_ga_s2_3", "eval_teacher_2048"))
    assert first_after > at(ev, "end ga_s2_task1 rc=0")
    # the selectors beside GA-S2's kl; keep_global's kl only once its selection exists; each evaluation after its kl
    assert at(ev, "start kl_ga_s2_3 (GPU 0)") < at(ev, "end select_keep_global rc=0")
    assert at(ev, "end select_keep_global rc=0") < at(ev, "start kl_keep_global_3 (GPU 0)")
    assert at(ev, "end kl_ga_s2_3 rc=0") < at(ev, "start eval_ga_s2_3_8192 (GPU 0)") < at(ev, "end kl_keep_global_3 rc=0")
    assert at(ev, "end kl_keep_global_3 rc=0") < at(ev, "start eval_keep_global_3_quality (GPU 0)")
    calls = (tmp_path / "calls.log").read_text()
    # every call through the real checks: the preflight and three models at three lengths and quality; the token
    # cache, align, GA-S2 as two tasks, four selectors and two kl
    assert evaluations_pass_the_clis_checks(tmp_path, monkeypatch) == 1 + 3 * 4
    assert trainings_pass_the_config_checks(tmp_path, monkeypatch) == 1 + 1 + 2 + 4 + 2
    # evaluated as in docs/RESULTS.md: 100 prompts a task and length; a hybrid's held-out KL against the teacher
    evals = [c for c in calls.splitlines() if "ds_hybrid.cli eval" in c]
    assert any("--model ga_s2_3=" in c and "--lengths 8192 --limit 100" in c for c in evals)
    quality = {c.split("--model ")[1].split("=")[0]: c for c in evals if "--heldout-sequences 64" in c}
    assert set(quality) == {"teacher", "ga_s2_3", "keep_global_3"}
    assert "--teacher /tmp/stub_teacher" in quality["ga_s2_3"] and "--teacher" not in quality["teacher"]
    for m in ("ga_s2", "keep_global"):
        assert f"softmax_layers={{selection: {tmp_path}/run/select/{m}/selection.json, k: 3}}" in calls


def test_gemma_campaign_without_keep_global_still_trains_ga_s2(tmp_path):
    ev = campaign(tmp_path, "gemma", STUB_FAIL="keep_global")
    assert "end select_keep_global rc=1" in ev and "no keep_global selection (logs/select_keep_global.log)" in ev
    assert "end eval_ga_s2_3_quality rc=0" in ev and not any("kl_keep_global" in e for e in ev)
    assert ev[-1] == "campaign done"


def test_gemma_campaign_baseline_is_uniform_where_ga_s2_keeps_the_global_layers(tmp_path):
    ev = campaign(tmp_path, "gemma", STUB_KEEP_GLOBAL_K3="[12, 5, 11]")
    assert "keep_global chose ga_s2's layers at K = 3: not trained again" in ev
    assert not any("kl_keep_global" in e for e in ev)
    assert at(ev, "end select_uniform rc=0") < at(ev, "start kl_uniform_3 (GPU 0)")
    assert at(ev, "end kl_uniform_3 rc=0") < at(ev, "start eval_uniform_3_2048 (GPU 0)")
    assert ev[-1] == "campaign done"
    assert f"softmax_layers={{selection: {tmp_path}/run/select/uniform/selection.json, k: 3}}" in (
        tmp_path / "calls.log").read_text()


def test_gemma_campaign_from_an_earlier_selection_trains_every_baseline_once(tmp_path):
    earlier = tmp_path / "earlier.json"
    earlier.write_text('{"chosen": {"k=3": [5, 11, 12]}}')
    ev = campaign(tmp_path, "gemma", GA_S2_FROM=str(earlier), GEMMA_BASELINES="keep_global uniform proxy",
                  STUB_KEEP_GLOBAL_K3="[5, 11, 17]")
    assert not any("ga_s2_task" in e for e in ev) and f"GA-S2 from {earlier}" in ev
    assert (tmp_path / "run" / "select" / "ga_s2" / "selection.json").read_text() == earlier.read_text()
    order = [e.split()[1] for e in ev if e.startswith("start kl_")]
    assert order == ["kl_ga_s2_3", "kl_keep_global_3", "kl_uniform_3"]  # the stub's proxy = its uniform
    assert "proxy chose uniform's layers at K = 3: not trained again" in ev
    assert at(ev, "end kl_uniform_3 rc=0") < at(ev, "start eval_uniform_3_2048 (GPU 0)")
    assert ev[-1] == "campaign done"
    # this lease's align is the same recipe, not the same bytes: the earlier selection is used knowingly
    calls = (tmp_path / "calls.log").read_text()
    assert f"softmax_layers={{selection: {tmp_path}/run/select/ga_s2/selection.json, k: 3, check_origin: false}}" \
        in calls
    assert f"softmax_layers={{selection: {tmp_path}/run/select/uniform/selection.json, k: 3}}" in calls


@pytest.mark.parametrize("keep_global,baselines,trained", [
    ("[12, 11, 5]", "keep_global uniform", ["uniform"]),  # keep_global = GA-S2: uniform once
    ("[5, 11, 17]", "keep_global retrieval", ["keep_global", "retrieval"]),  # retrieval (stub: [0, 8, 16]) differs
    ("[0, 16, 8]", "keep_global retrieval uniform", ["keep_global"]),  # = keep_global = uniform: once
])
def test_gemma_campaign_never_trains_the_same_layers_twice(tmp_path, keep_global, baselines, trained):
    ev = campaign(tmp_path, "gemma", GEMMA_BASELINES=baselines, STUB_KEEP_GLOBAL_K3=keep_global)
    order = [e.split()[1] for e in ev if e.startswith("start kl_")]
    assert order == ["kl_ga_s2_3"] + [f"kl_{m}_3" for m in trained]
    assert ev[-1] == "campaign done"


def test_gemma_campaign_refuses_what_it_would_wait_on_forever(tmp_path):
    """A baseline no selector makes (a typo, ppl) would be waited for without end; a missing GA_S2_FROM would stop
    the campaign after align: both stop it before anything runs."""
    (tmp_path / "a").mkdir()
    ev = campaign(tmp_path / "a", "gemma", rc=1, GEMMA_BASELINES="keep_global ppl")
    assert ev == ["GEMMA_BASELINES: ppl is not one of keep_global uniform proxy retrieval: stopping"]
    (tmp_path / "b").mkdir()
    ev = campaign(tmp_path / "b", "gemma", rc=1, GA_S2_FROM=str(tmp_path / "nowhere.json"))
    assert ev == [f"GA_S2_FROM: no file {tmp_path / 'nowhere.json'}: stopping"]


def test_gemma_campaign_forgets_an_earlier_runs_markers(tmp_path):
    res = tmp_path / "res"
    res.mkdir()
    (res / "keep_global.tried").touch()  # from an earlier campaign on this machine: not this run's
    ev = campaign(tmp_path, "gemma")
    assert at(ev, "end select_keep_global rc=0") < at(ev, "start kl_keep_global_3 (GPU 0)")


@pytest.mark.parametrize("value,kl", [("0", False), ("1", True)])
def test_gemma_kl_switch(tmp_path, value, kl):
    ev = campaign(tmp_path, "gemma", GEMMA_KL=value)
    assert any(e.startswith("start kl_") for e in ev) == kl
    assert ev[-1] == ("campaign done" if kl else "campaign done (GEMMA_KL=0: selections only)")
    assert "end select_retrieval rc=0" in ev and "end eval_teacher_quality rc=0" in ev


@pytest.mark.parametrize("gpus", [1, 2])
def test_compare_campaign_deals_hybrids_over_the_gpus_from_carried_align_parts(tmp_path, gpus, monkeypatch):
    ev = campaign(tmp_path, "compare", STUB_GPUS=str(gpus), RUNC=str(tmp_path / "run"), ALL_LINEAR_EVAL="0",
                  ALIGN_PARTS=str(tmp_path / "parts"), HYBRIDS="a_4=[1,2,3,4] b_4=[5,6,7,8] c_8=[1,2,3,4,5,6,7,8]")
    assert ev[-1] == "campaign done"
    assert not any(e.startswith("start align (") for e in ev)  # the carried align, unpacked and its seed checked
    assert at(ev, "end align_seed rc=0") < at(ev, "end data_cache rc=0") < min(
        i for i, e in enumerate(ev) if e.startswith("start kl_"))
    chains = {0: ["a_4", "c_8"], 1: ["b_4"]} if gpus == 2 else {0: ["a_4", "b_4", "c_8"]}
    for gpu, names in chains.items():
        for n in names:
            assert f"start kl_{n} (GPU {gpu})" in ev
            for part in ("2048", "4096", "8192", "quality"):  # every evaluation after its own kl, on its chain's GPU
                assert at(ev, f"end kl_{n} rc=0") < at(ev, f"start eval_{n}_{part} (GPU {gpu})")
        for first, second in zip(names, names[1:]):  # one chain: kl runs one after the other, evaluations beside
            assert at(ev, f"end kl_{first} rc=0") < at(ev, f"start kl_{second} (GPU {gpu})")
    calls = (tmp_path / "calls.log").read_text()
    # two preflights (the teacher) and three hybrids' evaluations; the token cache and three kl
    assert evaluations_pass_the_clis_checks(tmp_path, monkeypatch) == 2 + 3 * 4
    assert trainings_pass_the_config_checks(tmp_path, monkeypatch) == 1 + 3
    assert f"out_dir={tmp_path}/run/kl_runs/c_8 kl.init_from={tmp_path}/run/align/hf softmax_layers=[1,2,3,4,5,6,7,8]" \
        in calls


def test_compare_campaign_goes_on_to_the_next_hybrid_when_a_kl_fails(tmp_path):
    """A kl that fails (out of memory, say) costs its own hybrid only: the next one trains and is evaluated, and the
    campaign ends as done (a poll stops at that marker), not in the middle of the lease's minutes."""
    ev = campaign(tmp_path, "compare", RUNC=str(tmp_path / "run"), ALL_LINEAR_EVAL="0",
                  ALIGN_PARTS=str(tmp_path / "parts"), HYBRIDS="a_4=[1,2,3,4] b_4=[5,6,7,8]", STUB_FAIL="a_4")
    assert "end kl_a_4 rc=1" in ev and not any(e.startswith("start eval_a_4") for e in ev)
    assert at(ev, "end kl_a_4 rc=1") < at(ev, "start kl_b_4 (GPU 0)") < at(ev, "end kl_b_4 rc=0")
    for part in ("2048", "4096", "8192", "quality"):
        assert f"end eval_b_4_{part} rc=0" in ev
    assert "a hybrid's kl failed (above): the other hybrids ran" in ev and ev[-1] == "campaign done"
    assert (tmp_path / "res" / "CAMPAIGN_DONE").exists()


@pytest.mark.parametrize("mib", [81559, 143771])
def test_compare_campaign_evaluates_one_length_at_a_time_beside_a_kl_on_an_80gb_card(tmp_path, mib):
    """On an H100 (80 GB) a hybrid's evaluations beside the next kl (~50 GiB) run one length after another (lease 23:
    at once, the 8192 one ran out of memory); on an H200 they start together; the last hybrid's, alone on the card,
    start together on either."""
    ev = campaign(tmp_path, "compare", RUNC=str(tmp_path / "run"), ALL_LINEAR_EVAL="0", STUB_GPU_MIB=str(mib),
                  ALIGN_PARTS=str(tmp_path / "parts"), HYBRIDS="a_4=[1,2,3,4] b_4=[5,6,7,8]")
    assert ev[-1] == "campaign done"
    for n in ("a_4", "b_4"):
        for part in ("2048", "4096", "8192", "quality"):
            assert f"end eval_{n}_{part} rc=0" in ev
    serial = mib < 122880
    for n, beside_kl in (("a_4", True), ("b_4", False)):
        ends_before_next_starts = [at(ev, f"end eval_{n}_{a} rc=0") < at(ev, f"start eval_{n}_{b} (GPU 0)")
                                   for a, b in (("2048", "4096"), ("4096", "8192"))]
        assert ends_before_next_starts == [serial and beside_kl] * 2, (n, ev)


def test_compare_campaign_starts_no_kl_that_would_pass_the_leases_deadline(tmp_path):
    """DEADLINE_S (the lease's device time left at `start`): after the first kl (5 s here) the second would end past
    it by the first's measured time, so it is not started, and the campaign ends as done with what finished."""
    ev = campaign(tmp_path, "compare", RUNC=str(tmp_path / "run"), ALL_LINEAR_EVAL="0",
                  ALIGN_PARTS=str(tmp_path / "parts"), HYBRIDS="a_4=[1,2,3,4] b_4=[5,6,7,8]", STUB_KL_S="5",
                  DEADLINE_S="10", KL_EST_S="0", EVAL_EST_S="0")
    assert "end kl_a_4 rc=0" in ev and "end eval_a_4_quality rc=0" in ev
    assert not any(e.startswith("start kl_b_4") for e in ev)
    assert any(e.startswith("kl_b_4 not started: ") and "pass DEADLINE_S=10" in e for e in ev), ev
    assert ev[-1] == "campaign done"
    (tmp_path / "none").mkdir()
    ev = campaign(tmp_path / "none", "compare", RUNC=str(tmp_path / "run0"), ALL_LINEAR_EVAL="0",
                  ALIGN_PARTS=str(tmp_path / "parts"), HYBRIDS="a_4=[1,2,3,4]", DEADLINE_S="0")
    assert not any(e.startswith("start kl_") for e in ev) and ev[-1] == "campaign done"
    # a kl of another budget is not estimated by the last one's time: KL_EST_S, 10 % more, is its estimate
    (tmp_path / "other").mkdir()
    ev = campaign(tmp_path / "other", "compare", RUNC=str(tmp_path / "run1"), ALL_LINEAR_EVAL="0",
                  ALIGN_PARTS=str(tmp_path / "parts"), HYBRIDS="a_4=[1,2,3,4]@2e6 b_4=[5,6,7,8]", STUB_KL_S="1",
                  DEADLINE_S="60", KL_EST_S="100", EVAL_EST_S="0")
    assert not any(e.startswith("start kl_") for e in ev), ev  # (110 s of a first kl past 60: neither starts)
    ev = campaign(tmp_path / "other", "compare", RUNC=str(tmp_path / "run2"), ALL_LINEAR_EVAL="0",
                  ALIGN_PARTS=str(tmp_path / "parts"), HYBRIDS="a_4=[1,2,3,4]@2e6 b_4=[5,6,7,8]@2e6",
                  STUB_KL_S="1", DEADLINE_S="60", KL_EST_S="40", EVAL_EST_S="0")
    assert "end kl_a_4 rc=0" in ev and "end kl_b_4 rc=0" in ev, ev  # (44 s, then the measured ~1 s again)


@pytest.mark.parametrize("hybrids,why", [("a_4=[1, 2,3,4]", "'a_4=[1,' is not NAME=LAYERS"),
                                         ("a_4=[1,2,3,4] a_4=[5,6,7,8]", "the name a_4 is given twice"),
                                         ("a_4=1,2,3,4", "'a_4=1,2,3,4' is not NAME=LAYERS"),
                                         ("a_4=[1,2,3,4]@2e6 deadline=25m", "DEADLINE_S=25m is not a number"),
                                         ("a_4=[1,2,3,4] kl_est=10m", "KL_EST_S=10m is not a number"),
                                         ("teacher=[1,2,3,4]", "the name teacher is the campaign's own"),
                                         ("-x=[1,2,3,4]", "'-x=[1,2,3,4]' is not NAME=LAYERS")])
def test_compare_campaign_refuses_hybrids_it_cannot_read_before_any_gpu_work(tmp_path, hybrids, why):
    hybrids, _, deadline = hybrids.partition(" deadline=")  # (@2e6: kl.tokens as the config reads it, accepted)
    hybrids, _, kl_est = hybrids.partition(" kl_est=")
    env = {**({"DEADLINE_S": deadline} if deadline else {}), **({"KL_EST_S": kl_est} if kl_est else {})}
    ev = campaign(tmp_path, "compare", rc=1, RUNC=str(tmp_path / "run"), ALL_LINEAR_EVAL="0",
                  ALIGN_PARTS=str(tmp_path / "parts"), HYBRIDS=hybrids, **env)
    assert any(why in e for e in ev), ev
    assert not any(e.startswith("start ") for e in ev)


@pytest.mark.parametrize("then_rc", [0, 3])
def test_compare_campaign_runs_then_on_the_idle_gpu_before_it_is_done(tmp_path, then_rc):
    """THEN runs after every kl and evaluation has ended and before CAMPAIGN_DONE (a poll would stop following the
    lease at that marker); its failure is logged and the campaign still ends as done (its hybrids are finished)."""
    res = tmp_path / "res"
    then = f'[ ! -f "{res}/CAMPAIGN_DONE" ] && [ "$IN_SESSION" = 1 ] && touch "{tmp_path}/then_ran"; exit {then_rc}'
    ev = campaign(tmp_path, "compare", RUNC=str(tmp_path / "run"), ALL_LINEAR_EVAL="0",
                  ALIGN_PARTS=str(tmp_path / "parts"), HYBRIDS="a_4=[1,2,3,4] b_4=[5,6,7,8]", THEN=then)
    assert (tmp_path / "then_ran").exists() and (res / "CAMPAIGN_DONE").exists()
    assert ev[-2:] == [f"end then rc={then_rc}", "campaign done"]
    last_step = max(i for i, e in enumerate(ev) if e.startswith("end eval_") or e.startswith("end kl_"))
    assert last_step < at(ev, f"start then: {then}")


@pytest.mark.parametrize("fail", ["", "pytest", "kl_chunk4096_overlap_syncfree_dwfp32_gb64_r2"])
def test_the_dwfp32_timing_says_when_a_case_or_the_gpu_tests_failed(tmp_path, fail):
    """bench/gpu_throughput.sh dwfp32 (a compare campaign's THEN=): kl.dw_fp32 off and on alternated twice, then the
    GPU-only tests; its exit status is 1 when a case wrote no record or pytest failed (the campaign logs it as THEN's
    rc: on 2026-12-06 a collection error of the tests ended as `then rc=0`)."""
    res = tmp_path / "res"
    res.mkdir()
    (res / "t0").write_text("0")
    env = dict(os.environ, PATH=f"{STUB}:{os.environ['PATH']}", CAMPAIGN_RES=str(res), STUB_LOG=str(tmp_path / "calls"),
               HOME=str(tmp_path), IN_SESSION="1",
               STUB_PYTEST_RC="4" if fail == "pytest" else "0", STUB_FAIL=fail if fail.startswith("kl_") else "none")
    if fail.startswith("kl_"):  # a record of an earlier run on the machine does not stand for this one's
        (res / "tp").mkdir()
        (res / "tp" / f"{fail}.json").write_text("{}")
    p = subprocess.run(["bash", str(ROOT / "bench" / "gpu_throughput.sh"), "dwfp32"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == (1 if fail else 0), p.stdout + p.stderr
    ev = [line.split(" ", 2)[2] for line in (res / "progress.log").read_text().splitlines()]
    cases = [e.split()[1] for e in ev if e.startswith("start kl_")]
    assert cases == [f"kl_chunk4096_overlap_syncfree{dw}_gb64_r{r}" for r in (1, 2) for dw in ("", "_dwfp32")]
    assert ev[-1] == f"end cuda_tests rc={4 if fail == 'pytest' else 0}"
    assert not (res / "CAMPAIGN_DONE").exists()  # (IN_SESSION: the campaign around it says when it is done)


def test_ga_s2_campaign_from_a_committed_selection_runs_only_the_selectors_against_it(tmp_path):
    ref = tmp_path / "ga_s2_selection.json"
    ref.write_text('{"ranking": [1, 2, 3]}')
    ev = campaign(tmp_path, "ga_s2", RUNC=str(tmp_path / "run"), ALIGN_PARTS=str(tmp_path / "parts"),
                  SEL_REF=str(ref), SELECTORS="halving ppl", SELECT_OVERRIDES="select.halving_first_tokens=262144",
                  SEED="1", OVERRIDES="mixer_options.use_gate=false")
    assert ev[-1] == "campaign done"
    assert not any(e.startswith(("start align (", "start ga_s2_task")) for e in ev)  # carried align, no GA-S2
    assert at(ev, "end align_seed rc=0") < at(ev, "end data_cache rc=0") < at(ev, "start select_halving_task0 (GPU 0)")
    # halving's two tasks side by side, the next selector after both
    assert at(ev, "start select_halving_task1 (GPU 0)") < at(ev, "end select_halving_task0 rc=0")
    assert max(at(ev, f"end select_halving_task{t} rc=0") for t in (0, 1)) < at(ev, "start select_ppl (GPU 0)")
    calls = (tmp_path / "calls.log").read_text()
    # the seed and overrides of the align reach every step that starts from it (the token cache, each selector)
    for t in (0, 1):
        assert (f"select.method=halving select.reference={ref} select.num_tasks=2 select.task_index={t} "
                "select.probe.micro_batch=16 seed=1 mixer_options.use_gate=false "
                "select.halving_first_tokens=262144") in calls
    assert (f"select.method=ppl select.reference={ref} seed=1 mixer_options.use_gate=false "
            "select.halving_first_tokens=262144") in calls
    assert "--prepare-data data.num_proc=16 seed=1 mixer_options.use_gate=false" in calls
    # on an 80 GB card two probe tasks at micro-batch 16 do not fit: 8 each; one task failing: said, the rest runs
    (tmp_path / "c").mkdir()
    ev = campaign(tmp_path / "c", "ga_s2", RUNC=str(tmp_path / "run_c"), ALIGN_PARTS=str(tmp_path / "parts"),
                  SEL_REF=str(ref), SELECTORS="halving ppl", STUB_GPU_MIB="81559", STUB_FAIL_TASK="0")
    assert "no halving selection (logs/select_halving_task*.log)" in ev and "end select_ppl rc=0" in ev
    assert ev[-1] == "campaign done"
    calls = (tmp_path / "c" / "calls.log").read_text()
    assert "select.task_index=1 select.probe.micro_batch=8" in calls and "micro_batch=16" not in calls
    (tmp_path / "b").mkdir()
    ev = campaign(tmp_path / "b", "ga_s2", rc=1, RUNC=str(tmp_path / "run_b"), SEL_REF=str(tmp_path / "nowhere.json"))
    assert ev[-1].startswith("SEL_REF=") and "no such file" in ev[-1]
