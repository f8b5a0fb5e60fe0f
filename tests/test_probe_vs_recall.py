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


def write_lease(repo: Path, folder: str, models: dict[str, tuple[float | None, float]],
                shared: bool = False) -> list[dict]:
    """A lease folder under repo/docs/data with one quality evaluation per hybrid and kl metrics (``models``: name ->
    (recall_kl or None: no probe logged, text kl)); returns the merge's sources, recorded relative to the repository
    as eval-merge records them."""
    sources = []
    for name, (probe, kl) in models.items():
        rel = Path("docs/data") / folder / f"eval_{name}_quality" / "eval.json"
        (repo / rel).parent.mkdir(parents=True)
        (repo / rel).write_text("{}")
        val = {"step": 8, "split": "val", "kl": kl} | ({} if probe is None else {"recall_kl": probe})
        rows = [{"step": 4, "split": "val", "kl": 9.0, "recall_kl": 9.0}, {"step": 8, "split": "train"}, val]
        metrics = repo / "docs/data" / folder / ("kl_metrics.jsonl.gz" if shared else f"{name}_kl_metrics.jsonl.gz")
        with gzip.open(metrics, "wt") as f:
            f.write("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 9, "spl')  # (a torn last line)
        sources.append({"file": str(rel), "models": [name, "teacher"]})
    return sources


def test_probes_found_beside_each_source_and_rho_computed(tmp_path, monkeypatch, capsys):
    repo = tmp_path / "repo"
    sources = (write_lease(repo, "a", {"good": (0.2, 0.30), "mid": (0.5, 0.10)})
               + write_lease(repo, "b", {"old_name": (0.9, 0.20)})
               + write_lease(repo, "c", {"first": (None, 0.5)}, shared=True)
               + write_lease(repo, "d", {"x": (0.1, 0.1), "y": (0.3, 0.1)}, shared=True))  # one file, two hybrids
    sources[2] |= {"renames": {"old_name": "bad"}, "models": ["bad", "teacher"]}  # its file keeps the lease's name
    recall = {"good": 0.9, "mid": 0.7, "bad": 0.1, "first": 0.5, "x": 0.8, "y": 0.6, "teacher": 1.0}
    merged = repo / "docs/data/merged/eval.json"
    merged.parent.mkdir()
    merged.write_text(json.dumps({"sources": sources, "scores": {
        m: {"niah_single_1": {"8192": s}} for m, s in recall.items()}}))
    monkeypatch.chdir(tmp_path)  # (not the repository: sources are found from the merged file's folders above)
    rows = pvr.probe_rows(merged, "niah_single_1", 8192)
    assert [(r["model"], r["recall_kl"], r["kl"], r["score"]) for r in rows] == [
        ("good", 0.2, 0.30, 0.9), ("mid", 0.5, 0.10, 0.7), ("bad", 0.9, 0.20, 0.1), ("first", None, 0.5, 0.5),
        ("x", None, None, 0.8), ("y", None, None, 0.6)]  # x, y: a shared file of two hybrids is neither's
    assert pvr.main([str(merged)]) == 0
    out = capsys.readouterr().out
    assert "| first | no probe logged |" in out and "| x | no kl metrics found |" in out
    # probe order = recall order (rho 1); text KL 0.30, 0.10, 0.20 against recall 0.9, 0.7, 0.1: ranks of -kl
    # [1, 3, 2] against [3, 2, 1]: rho -0.5
    assert "3 hybrids with a recall probe" in out and "recall probe 1.00, text KL -0.50" in out
    assert pvr.main([str(merged), "--length", "4096"]) == 1  # no scores there: too few
