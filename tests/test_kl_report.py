"""bench/kl.py --report: issue 21's verdict per shape (ours under the leanest baseline's memory, against the fastest
baseline, and the Llama-3-70B shape's time target) from a run's JSON, without a GPU."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def kl_bench():
    spec = importlib.util.spec_from_file_location("bench_kl", ROOT / "bench" / "kl.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def row(shape: str, impl: str, ms: float | None, gib: float | None) -> dict:
    if ms is None:
        return {"shape": shape, "impl": impl, "error": "OOM: ..."}
    return {"shape": shape, "impl": impl, "median_ms": ms, "extra_peak_gib": gib}


ROWS = [
    # shape a: our fastest row uses more memory than Liger; the one under Liger's memory still beats every baseline
    row("a", "naive", 60.0, 30.0), row("a", "liger", 80.0, 0.6), row("a", "torchtune", 70.0, 6.0),
    row("a", "fla", None, None),  # failed: neither the time bar nor the memory bar
    row("a", "ours", 40.0, 1.2), row("a", "ours_bf16", 42.0, 0.58), row("a", "ours_bf16@512", 45.0, 0.29),
    # shape b: the row that fits is slower than naive: not a win, though our fastest row is faster than naive
    row("b", "naive", 50.0, 10.0), row("b", "liger", 90.0, 1.0),
    row("b", "ours", 45.0, 2.0), row("b", "ours_bf16@512", 51.0, 0.9),
    # shape c: nothing of ours fits under Liger's memory
    row("c", "liger", 90.0, 0.1), row("c", "ours", 30.0, 0.5),
    # shape llama3-70b: the time target is judged on the row that fits (55.1 misses 55, though 54.0 uses more memory)
    row("llama3-70b", "liger", 84.7, 1.10), row("llama3-70b", "naive", 64.7, 13.7),
    row("llama3-70b", "ours_bf16@2048", 55.1, 0.98), row("llama3-70b", "ours_bf16@4096", 54.0, 1.96),
]


def test_verdict_picks_our_fastest_row_under_the_leanest_baselines_memory():
    v = {x["shape"]: x for x in kl_bench().verdict(ROWS, {"llama3-70b": 55.0})}
    a = v["a"]
    assert (a["leanest"], a["fastest_baseline"], a["ours"], a["ours_ms"]) == ("liger", "naive", "ours_bf16", 42.0)
    assert a["beats_all"] and a["ours_fastest"] == "ours" and "target_ms" not in a
    assert v["b"]["ours"] == "ours_bf16@512" and not v["b"]["beats_all"]
    assert v["c"]["ours"] is None and not v["c"]["beats_all"]
    big = v["llama3-70b"]
    assert big["ours"] == "ours_bf16@2048" and big["beats_all"] and not big["target_met"]
    assert kl_bench().verdict(ROWS, {"llama3-70b": 55.2})[-1]["target_met"]


def test_report_prints_the_table_from_a_runs_json(tmp_path):
    p = tmp_path / "run.json"
    p.write_text(json.dumps({"info": {}, "rows": ROWS + [row("d", "ours", 1.0, 0.1)]}))
    png = tmp_path / "kl.png"
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "kl.py"), "--report", str(p), "--plot", str(png)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lines = {ln.split(" | ")[0].lstrip("| "): ln for ln in r.stdout.splitlines() if ln.startswith("| ")}
    assert "ours_bf16 42.0 / 0.58 | yes" in lines["a"]
    assert "none fits | no" in lines["c"]
    assert "<= 55: missed" in lines["llama3-70b"]
    assert "no baseline row" in lines["d"]
