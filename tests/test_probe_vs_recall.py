"""bench/probe_vs_recall.py: each hybrid's end-of-kl recall probe found beside the evaluation a merge read, and
Spearman's rho (ties as mean ranks) of the probe and of the text KL against recall."""

from __future__ import annotations

import gzip
import importlib.util
import json
import math
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("probe_vs_recall", ROOT / "bench" / "probe_vs_recall.py")
pvr = importlib.util.module_from_spec(spec)
spec.loader.exec_module(pvr)


def test_spearman_with_ties_against_hand_computed_values():
    assert pvr.ranks([3.0, 1.0, 3.0, 2.0]) == [3.5, 1.0, 3.5, 2.0]
    assert math.isclose(pvr.spearman([1, 2, 3, 4], [1, 3, 2, 4]), 0.8)  # 1 - 6 * 2 / (4 * 15)
    assert math.isclose(pvr.spearman([1, 2, 3], [3, 2, 1]), -1.0)
    # ties: ranks [1.5, 1.5, 3, 4] against [1, 2, 3, 4]: Pearson of the ranks = 4.5 / sqrt(4.5 * 5)
    assert math.isclose(pvr.spearman([5, 5, 6, 7], [1, 2, 3, 4]), 4.5 / math.sqrt(4.5 * 5))
    assert math.isnan(pvr.spearman([1, 1, 1], [1, 2, 3]))


def write_lease(root: Path, folder: str, models: dict[str, float], shared: bool = False) -> list[dict]:
    """A lease folder with one quality evaluation per hybrid and its kl metrics (``models``: name -> recall_kl, None:
    no probe logged); returns the merge's sources."""
    sources = []
    for name, probe in models.items():
        ev = root / folder / f"eval_{name}_quality"
        ev.mkdir(parents=True)
        (ev / "eval.json").write_text("{}")
        val = {"step": 8, "split": "val", "kl": 0.1 + (probe or 1.0) / 10}
        if probe is not None:
            val["recall_kl"] = probe
        rows = [{"step": 4, "split": "val", "kl": 9.0, "recall_kl": 9.0}, {"step": 8, "split": "train"}, val]
        metrics = root / folder / ("kl_metrics.jsonl.gz" if shared else f"{name}_kl_metrics.jsonl.gz")
        with gzip.open(metrics, "wt") as f:
            f.write("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 9, "spl')  # (a torn last line)
        sources.append({"file": str(ev / "eval.json"), "models": [name, "teacher"]})
    return sources


def test_probes_found_beside_each_source_and_rho_computed(tmp_path, capsys):
    sources = write_lease(tmp_path, "lease_a", {"good": 0.2, "mid": 0.5}) + \
        write_lease(tmp_path, "lease_b", {"old_name": 0.9}) + write_lease(tmp_path, "lease_c", {"first": None}, True)
    sources[2]["renames"] = {"old_name": "bad"}  # (merged as bad: its metrics file keeps the lease's name)
    sources[2]["models"] = ["bad", "teacher"]
    recall = {"good": 0.9, "mid": 0.7, "bad": 0.1, "first": 0.5, "teacher": 1.0}
    merged = tmp_path / "merged" / "eval.json"
    merged.parent.mkdir()
    merged.write_text(json.dumps({"sources": sources, "scores": {
        m: {"niah_single_1": {"8192": s}} for m, s in recall.items()}}))
    rows = pvr.probe_rows(merged, "niah_single_1", 8192)
    assert [(r["model"], r["recall_kl"], r["score"]) for r in rows] == [
        ("good", 0.2, 0.9), ("mid", 0.5, 0.7), ("bad", 0.9, 0.1), ("first", None, 0.5)]
    assert pvr.main([str(merged)]) == 0
    out = capsys.readouterr().out
    assert "| first | no probe logged |" in out and "3 hybrids with a recall probe" in out
    assert "recall probe 1.00, text KL 1.00" in out
    assert pvr.main([str(merged), "--length", "4096"]) == 1  # no scores there: too few
