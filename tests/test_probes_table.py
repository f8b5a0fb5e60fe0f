"""bench/probes_table.py: GA-S2's finished single-layer probes ranked by held-out KL, unfinished ones named."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def probe(root: Path, name: str, layers: list[int], kl: float | None, recall: bool = True, done: bool = True) -> None:
    d = root / name / "kl"
    d.mkdir(parents=True)
    rows = [{"step": 4, "split": "train", "tokens": 1024, "peak_gpu_gib": 1.5, "tokens_per_s": 10.0}]
    if kl is not None:
        val = {"step": 4, "split": "val", "ce": 3.0 + kl, "ppl": 20.0, "kl": kl}
        if recall:
            val |= {"recall_nll": 2.0, "recall_kl": 2 * kl}
        rows.append(val)
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "run_info.json").write_text(json.dumps({"softmax_layers": layers}))
    if done:
        (d / "DONE").write_text("{}")


def table(src: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "bench" / "probes_table.py"), str(src), str(out), "--layers",
                           "4", *extra], capture_output=True, text=True)


def test_ranking_of_finished_probes_with_the_missing_ones_named(tmp_path):
    src = tmp_path / "probes"
    probe(src, "baseline", [], 0.9)
    probe(src, "layer_000", [0], 0.7)
    probe(src, "layer_001", [1], 0.5)
    probe(src, "layer_002", [2], 0.8)
    probe(src, "layer_003", [3], 0.1, done=False)  # the lease ended during it: not ranked
    p = table(src, tmp_path / "out", "--global-layers", "1,3")
    assert p.returncode == 0, p.stderr
    md = (tmp_path / "out" / "probes.md").read_text().splitlines()
    ranked = [line.split(" | ")[1:3] for line in md[2:5]]
    assert ranked == [["1", "global"], ["0", "sliding"], ["2", "sliding"]]
    assert "| 1 | 1 | global | 0.500 | -0.400 | 1.00 |" in md[2]
    assert md[5].startswith("| - | 3 | global | not measured")
    assert md[6].startswith("| - | none (all-linear) | | 0.900 |")
    assert len((tmp_path / "out" / "probes.jsonl").read_text().splitlines()) == 4
    assert (tmp_path / "out" / "probes.png").stat().st_size > 0


def test_probes_without_recall_scores_and_without_a_baseline(tmp_path):
    src = tmp_path / "probes"
    probe(src, "layer_000", [0], 0.7, recall=False)
    probe(src, "layer_001", [1], 0.5, recall=False)
    p = table(src, tmp_path / "out")
    assert p.returncode != 0 and "no finished all-linear probe" in p.stderr
    probe(src, "baseline", [], 0.9, recall=False)
    p = table(src, tmp_path / "out")
    assert p.returncode == 0, p.stderr
    assert "| 1 | 1 |  | 0.500 | -0.400 | - |" in (tmp_path / "out" / "probes.md").read_text()
