"""Selection variants of the paper: the distance regularizer (lambda = 0 is GA-S2; a planted case where the penalty
must change the choice) and `ds-hybrid select-compare` (top-K overlap and Kendall tau between selection.json files)."""

from __future__ import annotations

import json
import sys

import pytest
from trainer_utils import run, tail

from ds_hybrid.config import load_config
from ds_hybrid.errors import ConfigError
from ds_hybrid.layers import chosen_sets
from ds_hybrid.selection import (kendall_tau, make_selection, rank_layers, regularized_order, topk_overlap,
                                 write_selection)


def test_lambda_zero_is_the_plain_ranking():
    import random

    rng = random.Random(0)
    for _ in range(20):
        scores = {l: rng.random() for l in range(30)}
        for lower in (True, False):
            assert regularized_order(scores, lower, 0.0) == rank_layers(scores, lower)
    ties = {0: 1.0, 1: 0.5, 2: 0.5, 3: 2.0}
    assert regularized_order(ties, True, 0.0) == rank_layers(ties, True) == [1, 2, 0, 3]


def test_the_penalty_spreads_a_planted_adjacent_pair():
    # KL after a probe (lower = more important): layers 5 and 6 are the two best, 15 a close third
    scores = {l: 2.0 for l in range(20)}
    scores.update({5: 1.00, 6: 1.05, 15: 1.10})
    plain = rank_layers(scores, True)
    assert sorted(plain[:2]) == [5, 6]
    # importance rescaled to [0, 1]: 5 -> 1, 6 -> 0.95, 15 -> 0.90; adjacency costs lambda x 1
    assert sorted(regularized_order(scores, True, 0.04)[:2]) == [5, 6]  # 0.95 - 0.04 > 0.90 - 0.04 / 10
    assert sorted(regularized_order(scores, True, 0.2)[:2]) == [5, 15]  # 0.95 - 0.2 < 0.90 - 0.02
    reg = regularized_order(scores, True, 0.2)
    assert sorted(reg) == list(range(20)) and reg[:3] == [5, 15, 6]  # a full order: every prefix is a top-K


def test_selection_records_the_regularizer_and_stays_nested():
    scores = {l: float(abs(l - 10)) for l in range(24)}  # a bump at 10: the plain top-4 are 9..11 neighbours
    sel = make_selection("ga_s2", scores, True, 24, distance_reg=0.5)
    assert sel["distance_reg"] == 0.5 and sel["ranking_plain"] == rank_layers(scores, True)
    chosen = chosen_sets(sel["ranking"], 24, [2, 4], [0.25])
    plain = chosen_sets(sel["ranking_plain"], 24, [2, 4], [0.25])
    assert set(chosen["k=2"]) < set(chosen["k=4"]) < set(chosen["ratio=0.25"])  # one order, nested sets
    assert plain["k=4"] == [8, 9, 10, 11] and chosen["k=4"] != plain["k=4"]  # the bump's neighbours, spread apart
    assert chosen["k=4"] == [7, 9, 10, 13]  # 10; then 7 and 13 (importance 10/13 - 0.5/3); then 9 (12/13 - 0.5)
    assert "distance_reg" not in make_selection("ga_s2", scores, True, 24)


def test_distance_reg_is_checked():
    with pytest.raises(ConfigError, match=r"select\.distance_reg=-0\.1"):
        load_config(None, ["select.distance_reg=-0.1"])
    with pytest.raises(ConfigError, match=r"select\.distance_reg=0\.2.*score"):
        load_config(None, ["select.distance_reg=0.2", "select.method=uniform"])


def test_select_compare_table_and_plot(tmp_path, capsys):
    a = make_selection("ga_s2", {l: float(l) for l in range(12)}, True, 12)
    b = make_selection("proxy", {l: float((l * 5) % 12) for l in range(12)}, True, 12)
    c = make_selection("ga_s2", {l: float(l) for l in range(12)}, True, 12, distance_reg=0.3)
    for name, sel in (("a", a), ("b", b), ("c", c)):
        write_selection(tmp_path / name / "selection.json", sel)
    out = tmp_path / "cmp"
    p = run([sys.executable, "-m", "ds_hybrid.cli", "select-compare", f"gdn={tmp_path / 'a' / 'selection.json'}",
             f"gla={tmp_path / 'b' / 'selection.json'}", str(tmp_path / "c" / "selection.json"), "--ks", "2,4",
             "--out", str(out)])
    assert p.returncode == 0, tail(p)
    res = json.loads((out / "compare.json").read_text())
    assert len(res["pairs"]) == 3
    ab = res["pairs"][0]
    assert (ab["a"], ab["b"]) == ("gdn", "gla")
    assert ab["kendall_tau"] == pytest.approx(kendall_tau(a["ranking"], b["ranking"]), abs=1e-4)
    assert ab["top4"] == topk_overlap(a["ranking"], b["ranking"], 4)
    md = (out / "compare.md").read_text()
    assert "| gdn | gla |" in md and "distance_reg 0.3" in md
    assert (out / "compare.png").stat().st_size > 1000

    from ds_hybrid.cli import main  # the refusal: the command's main() in this process (run as one just above)

    code = main(["select-compare", str(tmp_path / "a" / "selection.json"), str(tmp_path / "b" / "selection.json"),
                 "--ks", "13"])
    assert code == 2 and "--ks" in capsys.readouterr().err
