"""bench/gpu_session.sh wait: how a poll ends. A lease's minutes are the dearest thing a session has: a poll must not
sleep its whole span on a machine where nothing runs (a fresh one after the lease's machine was lost) or after the
campaign died."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def wait(res: Path, out: Path, seconds: int = 60) -> tuple[int, str, float]:
    env = dict(os.environ, CAMPAIGN_RES=str(res), OUT=str(out), WAIT_TICK_S="0.2",
               CAMPAIGN_CARRY_OUT=str(res.parent / "carry"))
    t0 = time.monotonic()
    p = subprocess.run(["bash", str(ROOT / "bench" / "gpu_session.sh"), "wait", str(seconds)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    return p.returncode, p.stdout + p.stderr, time.monotonic() - t0


def campaign(res: Path, script: str) -> subprocess.Popen:
    """A stand-in campaign in its own session, as `start` runs one; its pid where `start` writes it."""
    res.mkdir(exist_ok=True)
    proc = subprocess.Popen(["setsid", "bash", "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    (res / "campaign.pid").write_text(f"{proc.pid}\n")
    return proc


def test_a_fresh_machine_answers_at_once(tmp_path):
    res = tmp_path / "res"
    res.mkdir()
    rc, text, took = wait(res, tmp_path / "out")
    assert rc == 3 and "no campaign was started on this machine" in text and took < 20


def test_a_finished_campaign_returns_on_its_marker(tmp_path):
    res = tmp_path / "res"
    proc = campaign(res, "sleep 30")
    threading.Timer(1.0, lambda: (res / "CAMPAIGN_DONE").touch()).start()
    try:
        rc, text, took = wait(res, tmp_path / "out")
    finally:
        proc.kill()
    assert rc == 0 and "ended without" not in text and took < 20
    assert (tmp_path / "out").is_dir()  # the results packed either way


def test_a_dead_campaign_ends_the_poll_but_its_background_jobs_are_waited_for(tmp_path):
    res = tmp_path / "res"
    proc = campaign(res, "exit 1")
    proc.wait()
    rc, text, took = wait(res, tmp_path / "out")
    assert rc == 0 and "the campaign ended without CAMPAIGN_DONE" in text and took < 20
    # the campaign's own process gone, one of its jobs still running (an evaluation in the background): keep waiting
    res2 = tmp_path / "res2"
    proc = campaign(res2, "sleep 3 & exit 1")
    proc.wait()
    rc, text, took = wait(res2, tmp_path / "out2")
    assert "the campaign ended without CAMPAIGN_DONE" in text and took >= 2.5


def test_a_second_start_beside_a_running_campaign_is_refused(tmp_path):
    """A start repeated after a lost reply would put two campaigns on one GPU and one run folder."""
    res = tmp_path / "res"
    proc = campaign(res, "sleep 30")
    try:
        p = subprocess.run(["bash", str(ROOT / "bench" / "gpu_session.sh"), "start"], cwd=ROOT, capture_output=True,
                           text=True, timeout=60, env=dict(os.environ, CAMPAIGN_RES=str(res)))
    finally:
        proc.kill()
    assert p.returncode == 1 and "a campaign is running on this machine already" in p.stderr
    assert (res / "campaign.pid").read_text().strip() == str(proc.pid)  # (the running one's pid kept)


def test_carry_parts_ride_home_once_each(tmp_path):
    res = tmp_path / "res"
    proc = campaign(res, "exit 0")
    proc.wait()
    (res / "CAMPAIGN_DONE").touch()
    carry = tmp_path / "carry"
    carry.mkdir()
    for i in range(2):
        (carry / f"align.part0{i}-of-02").write_bytes(bytes([i]) * 1000)
    rc, text, _ = wait(res, tmp_path / "out1")
    assert rc == 0 and text.count("carried home: align.part0") == 2
    assert (tmp_path / "out1" / "align.part01-of-02").read_bytes() == b"\x01" * 1000
    rc, text, _ = wait(res, tmp_path / "out2")
    assert "carried home" not in text and not list((tmp_path / "out2").glob("align.part*"))
