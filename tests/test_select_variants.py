"""Selection variants of the paper: the distance regularizer (lambda = 0 is GA-S2; a planted case where the penalty
must change the choice) and `ds-hybrid select-compare` (top-K overlap and Kendall tau between selection.json files)."""

from __future__ import annotations

import json
import logging
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
    # halving's early-stopped layers carry round offsets, not KLs: the rescaled importance would be the offsets'
    with pytest.raises(ConfigError, match=r"select\.distance_reg=0\.2: not with halving"):
        load_config(None, ["select.distance_reg=0.2", "select.method=halving"])
    with pytest.raises(ConfigError, match="select.score"):
        load_config(None, ["select.score=recall", "select.method=proxy"])
    with pytest.raises(ConfigError, match="select.recall_sequences"):
        load_config(None, ["select.score=recall", "select.recall_sequences=0"])
    with pytest.raises(ConfigError, match="kl.eval_recall"):
        load_config(None, ["kl.eval_recall=-1"])
    with pytest.raises(ConfigError, match="kl.eval_recall=4.*seq_len >= 128"):
        load_config(None, ["kl.eval_recall=4", "kl.seq_len=64"])


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

    # a spacing rule's K layers are the rule applied for K, not a prefix of its (non-nested) ranking
    from ds_hybrid.layers import uniform_layers, uniform_ranking
    from ds_hybrid.select_compare import compare

    u = make_selection("uniform", {l: float(i) for i, l in enumerate(uniform_ranking(12))}, True, 12)
    assert sorted(u["ranking"][:4]) != uniform_layers(12, 4)  # the case that matters: prefix and rule differ
    g = make_selection("ga_s2", {l: 0.0 if l in uniform_layers(12, 4) else 1.0 + l for l in range(12)}, True, 12)
    ug = compare({"uniform": u, "ga_s2": g}, [4])[0]
    assert ug["top4"] == 1.0 and ug["top4_layers"] == {"a": uniform_layers(12, 4), "b": uniform_layers(12, 4)}
    # and its ranking is an order for the chart (smart's: later layers first), not an importance: no Kendall tau
    from ds_hybrid.select_compare import table

    assert ug["kendall_tau"] is None and "| uniform | ga_s2 | 1.00 (4/4) | n/a (a spacing rule) |" in table(
        [ug], [4], {"uniform": u, "ga_s2": g})

    from ds_hybrid.cli import main  # the refusal: the command's main() in this process (run as one just above)

    code = main(["select-compare", str(tmp_path / "a" / "selection.json"), str(tmp_path / "b" / "selection.json"),
                 "--ks", "13"])
    assert code == 2 and "--ks" in capsys.readouterr().err


def test_select_compare_re_ranks_a_selection_with_the_distance_regularizer(tmp_path, capsys):
    """--distance-reg: one selection's scores re-ranked at each lambda (what stage select writes for that lambda),
    compared beside it and written as a selection.json that stage kl reads; spacing rules are refused."""
    from ds_hybrid.cli import main
    from ds_hybrid.layers import resolve_softmax_layers, uniform_ranking
    from ds_hybrid.selection import regularized_order

    # layers 4 and 5 score best, neighbours: a penalty must trade 5 for the distant third best, 9
    scores = {l: {4: 1.0, 5: 0.95, 9: 0.9}.get(l, 0.1 + 0.01 * l) for l in range(12)}
    sel = make_selection("ga_s2", scores, False, 12, budget={"probe_tokens": 1}, probes=13)
    write_selection(tmp_path / "a" / "selection.json", sel)
    out = tmp_path / "cmp"
    assert main(["select-compare", f"gdn={tmp_path / 'a' / 'selection.json'}", "--ks", "2,4", "--distance-reg",
                 "0.5", "--out", str(out)]) == 0
    reg = json.loads((out / "gdn_reg0.5" / "selection.json").read_text())
    assert reg["ranking"] == regularized_order(scores, False, 0.5) and reg["ranking_plain"] == sel["ranking"]
    assert sorted(sel["ranking"][:2]) == [4, 5]
    assert reg["chosen"]["k=2"] == [4, 9]
    assert (reg["distance_reg"], reg["derived_from"], reg["probes"], reg["method"]) == (0.5, "gdn", 13, "ga_s2")
    pair = json.loads((out / "compare.json").read_text())["pairs"][0]
    assert (pair["a"], pair["b"]) == ("gdn", "gdn_reg0.5") and pair["top2"] == 0.5
    spec = {"selection": str(out / "gdn_reg0.5" / "selection.json"), "k": 2}
    assert resolve_softmax_layers(spec, 12) == reg["chosen"]["k=2"]
    u = make_selection("uniform", {l: float(i) for i, l in enumerate(uniform_ranking(12))}, True, 12)
    write_selection(tmp_path / "u" / "selection.json", u)
    capsys.readouterr()
    assert main(["select-compare", str(tmp_path / "u" / "selection.json"), "--distance-reg", "0.3"]) == 2
    assert "spacing rules" in capsys.readouterr().err
    assert main(["select-compare", str(tmp_path / "a" / "selection.json"), "--distance-reg", "0"]) == 2
    assert "--distance-reg" in capsys.readouterr().err
    # a halving selection's scores carry round offsets: refused here as stage select refuses it
    h = make_selection("halving", {l: float(l) for l in range(12)}, True, 12)
    write_selection(tmp_path / "h" / "selection.json", h)
    assert main(["select-compare", str(tmp_path / "h" / "selection.json"), "--distance-reg", "0.1"]) == 2
    assert "is a halving selection: its layers stopped in earlier rounds" in capsys.readouterr().err


def test_recall_score_is_the_answer_tokens_nll_and_kl():
    """Stage kl's recall score (``eval_recall``) against a direct computation from the models' logits: the needle
    rows' answer tokens only, -log p under the student and KL(teacher || student), summed over the rows."""
    from types import SimpleNamespace

    import torch
    from conftest import tiny_teacher
    from transformers import AutoTokenizer

    from ds_hybrid.losses import chunked_linear_loss
    from ds_hybrid.recall_tasks import needle_rows
    from ds_hybrid.stages.base import HeldOut
    from ds_hybrid.stages.kl import KLStage, LMStudent
    from ds_hybrid.teacher import embedded_teacher_dir
    from ds_hybrid.transfer import build_hybrid

    tok = AutoTokenizer.from_pretrained(embedded_teacher_dir())
    teacher = tiny_teacher("llama", vocab_size=len(tok))
    student = LMStudent(build_hybrid(teacher, [1]), 1.0, 1.0, 0.0, 64, chunked_linear_loss).eval()
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, len(tok), (1, 96), generator=g) for _ in range(4)]

    def losses(ids, kl_weight, ce_weight):
        h_t = teacher.model(input_ids=ids).last_hidden_state
        return student(ids, h_t=h_t, w_t=teacher.lm_head.weight, kl_weight=kl_weight, ce_weight=ce_weight)

    stage = SimpleNamespace(ctx=SimpleNamespace(s=SimpleNamespace(eval_recall=3, micro_batch=2), tokenizer=tok,
                                                cfg=SimpleNamespace(seed=5), device=torch.device("cpu")),
                            teacher=teacher, _losses=losses)
    with torch.no_grad():
        got = KLStage._recall(stage, HeldOut(torch.cat(batches), batches, len(batches)))
        nll = kl = n = 0.0
        for ids, start, end in needle_rows([b[0].tolist() for b in batches[:3]], tok, seed=5):
            x = torch.tensor([ids])
            log_s = torch.log_softmax(student.hybrid(x).logits[0].double(), -1)
            log_t = torch.log_softmax(teacher(x).logits[0].double(), -1)
            for p in range(start - 1, end - 1):  # position p predicts token p + 1
                nll -= float(log_s[p, ids[p + 1]])
                kl += float((log_t[p].exp() * (log_t[p] - log_s[p])).sum())
                n += 1
    assert got[2] == n > 0
    assert float(got[0]) == pytest.approx(nll, rel=1e-4) and float(got[1]) == pytest.approx(kl, rel=1e-3, abs=1e-5)
    assert len(stage._needles[0]) == 3  # built once from the first eval_recall rows, kept for later evaluations


def test_probe_convergence_reads_the_ranking_a_shorter_probe_gives(tmp_path):
    """bench/probe_convergence.py: the training KL around step s ranks the layers as an s-step probe would."""
    import importlib.util

    from trainer_utils import REPO

    spec = importlib.util.spec_from_file_location("probe_convergence", REPO / "bench" / "probe_convergence.py")
    pc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pc)
    # layer 3 only overtakes layer 0 after step 4 (lower KL = more important)
    curves = {0: [1.0] * 8, 1: [2.0] * 8, 2: [3.0] * 8, 3: [1.5] * 4 + [0.5] * 4}
    for layer, c in curves.items():
        d = tmp_path / "probes" / f"layer_{layer:03d}" / "kl"
        d.mkdir(parents=True)
        (d / "DONE").write_text(json.dumps({"softmax_layers": [layer]}))
        rows = [{"step": s + 1, "split": "train", "kl": v} for s, v in enumerate(c)] + [{"step": 8, "split": "val", "kl": 9}]
        (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in reversed(rows)))
    assert pc.train_curves(tmp_path) == curves
    rows = pc.convergence(curves, reference=[3, 0, 1, 2], ks=[1, 2], window=4)
    assert [(r["steps"], r["top1"], r["top2"]) for r in rows] == [(4, 0, 2), (8, 1, 2)]
    assert rows[-1]["kendall_tau"] == 1.0 and rows[-1]["top_layers"] == [0, 3]


def test_halving_rule_and_order_as_stage_select_applies_them():
    """ds_hybrid.selection's halving rule (shared by stage select and bench/probe_convergence.py's replay): the better
    half survives, never fewer than keep, at twice the steps capped at a full probe; the last round is the one with keep
    or fewer alive or full-length probes; layers stopped earlier rank below every layer that went further, whatever
    their scores."""
    from ds_hybrid.selection import halving_first_steps, halving_next, halving_order, rank_layers

    scores = {0: 0.5, 1: 0.1, 2: 0.4, 3: 0.2, 4: 0.3, 5: 0.05}
    assert halving_next(list(range(6)), scores, 2, 16, keep=2) == ([5, 1, 3], 4)
    assert halving_next(list(range(6)), scores, 2, 16, keep=4) == ([5, 1, 3, 4], 4)  # never fewer than keep
    assert halving_next([5, 1, 3], scores, 12, 16, keep=2) == ([5, 1], 16)  # doubled, capped at the full probe
    assert halving_next([5, 1], scores, 4, 16, keep=2) is None  # keep reached
    odd = {l: float(l) for l in range(7)}
    assert halving_next(list(range(7)), odd, 1, 16, keep=1) == ([0, 1, 2], 2)  # 7 alive: the better 3, rounded down
    assert halving_next([5, 1, 3], scores, 16, 16, keep=2) is None  # full length reached
    # round 0: layer 0 best of all, but stopped; round 1: 1 and 2 go on with worse scores than layer 0's round-0 one
    rounds = [{"alive": [0, 1, 2, 3], "scores": {"0": 0.9, "1": 0.2, "2": 0.3, "3": 1.5}},
              {"alive": [1, 2], "scores": {"1": 2.0, "2": 1.0}}]
    order = halving_order(rounds, 4)
    assert rank_layers(order, lower_is_better=True) == [2, 1, 0, 3]
    assert order[2] == 1.0 and order[1] == 2.0  # finalists keep their last round's scores
    # three rounds: a layer stopped after round 0 ranks below one stopped after round 1, whatever their scores
    rounds3 = [{"alive": [0, 1, 2, 3, 4, 5], "scores": {"0": 0.0, "1": 5.0, "2": 5.0, "3": 5.0, "4": 5.0, "5": 9.0}},
               {"alive": [1, 2, 3, 4], "scores": {"1": 9.0, "2": 9.0, "3": 6.0, "4": 6.0}},
               {"alive": [3, 4], "scores": {"3": 8.0, "4": 7.0}}]
    assert rank_layers(halving_order(rounds3, 6), lower_is_better=True) == [4, 3, 1, 2, 0, 5]
    # the first round: 1/4 of a probe unless set, at least a step, never past a full probe
    assert halving_first_steps(None, 40, 1000) == 10
    assert halving_first_steps(None, 3, 1000) == 1
    assert halving_first_steps(2500, 40, 1000) == 2
    assert halving_first_steps(400, 40, 1000) == 1  # less than a step: one step
    assert halving_first_steps(10**9, 40, 1000) == 40


def test_probe_convergence_replays_halving_with_stage_selects_rule():
    """bench/probe_convergence.py --halving: a late-blooming layer (its KL falls below the others' only after step 4)
    is stopped by a 2-step first round and kept by an 8-step one; the rounds and their cost in probe steps follow the
    schedule (retrain: every round from step 0; continue: survivors resumed)."""
    import importlib.util

    from trainer_utils import REPO

    spec = importlib.util.spec_from_file_location("probe_convergence", REPO / "bench" / "probe_convergence.py")
    pc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pc)
    steps = 16
    curves = {l: [1.0 + 0.01 * l] * steps for l in range(8)}
    curves[7] = [1.5] * 4 + [0.5] * (steps - 4)  # worst for 4 steps, then the best
    short = pc.replay_halving(curves, first_steps=2, keep=2, window=2)
    assert [(r["steps"], len(r["alive"])) for r in short["rounds"]] == [(2, 8), (4, 4), (8, 2)]
    assert 7 not in short["rounds"][1]["alive"] and short["ranking"][:2] == [0, 1]
    assert short["probe_steps"] == {"retrain": 2 * 8 + 4 * 4 + 8 * 2, "continue": 2 * 8 + 2 * 4 + 4 * 2}
    long = pc.replay_halving(curves, first_steps=8, keep=2, window=2)
    assert [(r["steps"], len(r["alive"])) for r in long["rounds"]] == [(8, 8), (16, 4)]  # full length: the last
    assert long["ranking"][0] == 7
    table = pc.halving_table(curves, [7, 0, 1, 2, 3, 4, 5, 6], [1, 2], 2, [2, 8, 50], steps_tokens=1000)
    assert "| 2 steps (0.00M) | 2 x 8, 4 x 4, 8 x 2 |" in table and "[0] (0/1)" in table and "[7] (1/1)" in table
    assert "| 16 steps (0.02M) | 16 x 8 |" in table and "50 steps" not in table  # (past the probes: a whole probe)
    # the score of an s-step probe is its training KL over steps s-w+1..s: here step 3's and 4's values only
    assert pc.window_score([9.0, 9.0, 1.0, 3.0, 7.0], 4, 2) == 2.0 and pc.window_score([4.0, 8.0], 1, 4) == 4.0


def test_retrieval_layers_reads_each_heads_copy_and_needle_mass_from_the_attention():
    """bench/retrieval_layers.py: the per-head copy rate and needle mass its hooks read during one forward equal
    those computed from the attention weights transformers returns (output_attentions=True), and needle_sources
    finds the planted tokens an answer repeats, a leading token that differs included."""
    import importlib.util
    import random

    import torch
    from conftest import VOCAB, tiny_teacher
    from trainer_utils import REPO

    spec = importlib.util.spec_from_file_location("retrieval_layers", REPO / "bench" / "retrieval_layers.py")
    rl = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rl)
    rng = random.Random(0)
    ids = [rng.randrange(10, VOCAB) for _ in range(60)]
    ids[20:24] = [5, 7, 8, 9]  # the planted value, after a token the answer does not repeat
    ids += [3, 4, 6, 7, 8, 9]  # the question, then the answer: 6 7 8 9
    start, end = len(ids) - 4, len(ids)
    src = rl.needle_sources(ids, start, end)
    assert src == [-1, 21, 22, 23]
    assert rl.needle_sources(ids[:20] + [1] * 4 + ids[24:], start, end) == []  # no planted value: no prompt
    model = tiny_teacher("llama", num_hidden_layers=3)
    res = rl.score(model, [(ids, start, end, src)])
    att = model(torch.tensor([ids]), output_attentions=True).attentions
    pos, tgt = [start, start + 1, start + 2], torch.tensor([21, 22, 23])  # the positions predicting 7, 8, 9
    assert res["positions"] == 3 and len(res["copy_rate"]) == 3
    for layer, a in enumerate(att):
        w = a[0, :, pos, :].float()
        assert res["copy_rate"][layer] == pytest.approx((w.argmax(-1) == tgt).float().mean(-1).tolist())
        assert res["needle_mass"][layer] == pytest.approx(w[:, :, [21, 22, 23]].sum(-1).mean(-1).tolist(), rel=1e-5)
    assert 0.0 <= res["teacher_answer_accuracy"] <= 1.0


def test_retrieval_ranks_first_the_layer_whose_heads_copy_the_needle():
    """ds_hybrid.retrieval_heads on a planted case: one layer's attention made to put its weight on the needle's
    token that each answer token repeats (a retrieval head) gets copy rate 1 and the top of the ranking; the
    prompts come from rows of text with a fact planted (needle_row), each answer token traced to its source."""
    import torch
    from conftest import tiny_teacher
    from transformers import AutoTokenizer

    from ds_hybrid.retrieval_heads import copy_counts, retrieval_prompts
    from ds_hybrid.teacher import embedded_teacher_dir

    tok = AutoTokenizer.from_pretrained(embedded_teacher_dir())
    text = tok(" the quick brown fox jumps over the lazy dog and runs far away" * 12, add_special_tokens=False)
    prompts = retrieval_prompts([text["input_ids"][:120]] * 3, tok, seed=1)
    assert len(prompts) == 3
    for ids, start, end, src in prompts:
        assert all(ids[s] == ids[start + j] for j, s in enumerate(src) if s >= 0) and sum(s >= 0 for s in src) >= 2
    model = tiny_teacher("llama", num_hidden_layers=4, vocab_size=len(tok))
    planted, current = 2, {}
    attn = model.model.layers[planted].self_attn
    forward = attn.forward

    def copying(*args, **kwargs):  # the planted head(s): all weight on the repeated token at every answer position
        out, weights = forward(*args, **kwargs)
        weights = torch.zeros_like(weights)
        for p, s in current["pairs"]:
            weights[0, :, p, s] = 1.0
        return out, weights

    attn.forward = copying
    counts = None
    for prompt in prompts:
        ids, start, end, src = prompt
        current["pairs"] = [(start + j - 1, s) for j, s in enumerate(src) if s >= 0]
        c = copy_counts(model, [prompt])
        counts = c if counts is None else type(c)(counts.hits + c.hits, counts.mass + c.mass,
                                                   counts.positions + c.positions, 0, 0)
    scores = counts.layer_scores()
    assert scores[planted] == 1.0 and max(s for l, s in enumerate(scores) if l != planted) < 1.0
    assert sorted(range(4), key=lambda l: -scores[l])[0] == planted


def _tiny_folder(path, scale: float = 1.0, big: bool = True):
    """An HF-like folder: config.json and one safetensors file holding a large copied tensor and a small one."""
    import torch
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 2}))
    g = torch.Generator().manual_seed(0)
    tensors = {"embed.weight": torch.randn(4096, 64, generator=g) if big else torch.zeros(1),
               "mixer.weight": torch.randn(8, 8, generator=g) * scale}
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    return path


def test_content_fingerprint_tells_retrained_weights_from_a_copy(tmp_path):
    """A retrained align export of the same shapes: the size-based fingerprint cannot tell it apart, the content one
    does, even when the trained tensor is 0.02 % of the file (a sample of the file's bytes would miss it); a copy is
    the same folder."""
    import shutil

    from ds_hybrid.selection import content_fingerprint, folder_fingerprint

    a = _tiny_folder(tmp_path / "a")
    b = _tiny_folder(tmp_path / "b", scale=1.001)
    c = tmp_path / "c"
    shutil.copytree(a, c)
    assert folder_fingerprint(a) == folder_fingerprint(b) == folder_fingerprint(c)
    assert content_fingerprint(a) != content_fingerprint(b)
    assert content_fingerprint(a) == content_fingerprint(c)


def test_kl_refuses_a_selection_of_a_retrained_align_and_reads_old_ones_by_size(tmp_path, caplog):
    from ds_hybrid.selection import check_selection_origin, folder_identity

    teacher, align, retrained = (_tiny_folder(tmp_path / n, scale=s) for n, s in
                                 (("teacher", 1.0), ("align", 2.0), ("retrained", 3.0)))
    sel = make_selection("ga_s2", {0: 1.0, 1: 2.0}, True, 2)
    sel.update(teacher=folder_identity(teacher), align=folder_identity(align))
    path = tmp_path / "selection.json"
    write_selection(path, sel)
    spec = {"selection": str(path), "k": 1}
    check_selection_origin(spec, str(teacher), align)
    with pytest.raises(ConfigError, match=r"softmax_layers\.selection=.*align checkpoint"):
        check_selection_origin(spec, str(teacher), retrained)
    with caplog.at_level("WARNING", logger="ds_hybrid"):  # kl.init_from: teacher (no align folder): said, not silent
        check_selection_origin(spec, str(teacher), "teacher")
    assert "was computed from align checkpoint" in caplog.text and "its origin there is not checked" in caplog.text
    with pytest.raises(ConfigError, match=r"softmax_layers\.selection=.*computed for teacher"):
        check_selection_origin(spec, str(retrained), align)
    for rec in (sel["teacher"], sel["align"]):  # a selection written before the content fingerprint
        del rec["content"]
    write_selection(path, sel)
    check_selection_origin(spec, str(teacher), retrained)  # same sizes: what it can check passes
    with pytest.raises(ConfigError, match=r"align checkpoint"):
        check_selection_origin(spec, str(teacher), _tiny_folder(tmp_path / "other_shape", big=False))
    # used on purpose from another run of the recipe: not checked, and the spec takes the key
    check_selection_origin({**spec, "check_origin": False}, str(teacher), _tiny_folder(tmp_path / "o2", big=False))
    from ds_hybrid.layers import layers_from_selection

    assert layers_from_selection({**spec, "check_origin": False}, 2) == layers_from_selection(spec, 2)
    with pytest.raises(ConfigError, match=r"softmax_layers\.check_origin='no': true"):
        layers_from_selection({**spec, "check_origin": "no"}, 2)


@pytest.mark.parametrize("env, want", [({}, 0), ({"SLURM_ARRAY_TASK_ID": "3"}, 3),
                                       ({"SLURM_ARRAY_TASK_ID": "4", "SLURM_ARRAY_TASK_MIN": "1"}, 3),
                                       ({"SLURM_ARRAY_TASK_ID": "6", "SLURM_ARRAY_TASK_MIN": "0",
                                         "SLURM_ARRAY_TASK_STEP": "2"}, 3)])
def test_probe_tasks_count_from_the_arrays_first_id(monkeypatch, env, want):
    """sbatch --array=1-4 gave task 4 an index of 4 of 4 (refused) and left slot 0's probes to nobody."""
    from ds_hybrid.stages.probes import task_slot

    for k in ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_MIN", "SLURM_ARRAY_TASK_STEP"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "4")
    assert task_slot(load_config(None, [])) == (want, 4)


def test_halving_waits_for_another_tasks_probe_while_it_still_writes(tmp_path, monkeypatch):
    """A task waiting for another task's probe of a long round waits as long as that probe keeps writing, and gives
    up after dist_timeout_minutes of silence."""
    import os

    from ds_hybrid.stages import probes

    cfg = load_config(None, ["dist_timeout_minutes=1"])
    out = tmp_path / "halving"
    work = out / "probes" / probes.probe_name(3) / "kl"
    work.mkdir(parents=True)
    (work / "metrics.jsonl").write_text("{}")
    import time

    clock = [1000.0]
    start = time.time() + 1e5  # file times ahead of the folders' real ones: the file's writes are the newest
    mtime = [start]
    os.utime(work / "metrics.jsonl", (mtime[0], mtime[0]))

    def sleep(seconds, writes_until=300.0):  # the other task writes every 50 s for 300 s of a 60 s timeout
        clock[0] += 50.0
        if clock[0] - 1000.0 <= writes_until:
            mtime[0] += 50.0
            os.utime(work / "metrics.jsonl", (mtime[0], mtime[0]))
        elif clock[0] - 1000.0 >= 400.0 and finish[0]:
            (out / "probes" / probes.probe_name(3) / "round_0000004.json").write_text('{"steps": 4, "kl": 0.5}')

    monkeypatch.setattr(probes.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(probes.time, "sleep", sleep)
    finish = [False]  # silent after 300 s and never done: refused once 60 s passed without a write
    with pytest.raises(RuntimeError, match=r"probes \[3\] of the 4-step round wrote nothing for dist_timeout_minutes=1"):
        probes._round_scores_of_others(cfg, out, [3], 4)
    assert 300.0 < clock[0] - 1000.0 <= 400.0  # it had waited through the five minutes of writes
    clock[0], finish[0] = 1000.0, True
    mtime[0] = start
    os.utime(work / "metrics.jsonl", (mtime[0], mtime[0]))
    monkeypatch.setattr(probes.time, "sleep", lambda s: sleep(s, writes_until=1e9) if clock[0] < 1400 else
                        (out / "probes" / probes.probe_name(3) / "round_0000004.json").write_text('{"steps": 4, "kl": 0.5}'))
    assert probes._round_scores_of_others(cfg, out, [3], 4) == {3: 0.5}


def test_halving_stops_waiting_at_once_when_another_task_failed(tmp_path, monkeypatch):
    """A task of a split halving that fails leaves a marker; the others stop at their next look instead of waiting
    dist_timeout_minutes for its probes; a marker of an earlier attempt (older than this task's start) is not one."""
    import os
    import time

    from ds_hybrid.stages import probes

    cfg = load_config(None, ["select.num_tasks=2", "select.task_index=0", "select.method=halving"])
    out = tmp_path / "halving"
    marker = out / "probes" / "TASK_1_of_2.failed"
    marker.parent.mkdir(parents=True)
    marker.write_text("OutOfMemoryError: CUDA out of memory")
    os.utime(marker, (time.time() - 3600, time.time() - 3600))  # an earlier attempt's
    record = out / "probes" / probes.probe_name(3) / "round_0000004.json"
    looks = []

    def sleep(seconds):
        looks.append(seconds)
        if len(looks) == 3:
            record.parent.mkdir(parents=True, exist_ok=True)
            record.write_text('{"steps": 4, "kl": 0.5}')

    monkeypatch.setattr(probes.time, "sleep", sleep)
    assert probes._round_scores_of_others(cfg, out, [3], 4, since=time.time() - 1) == {3: 0.5}
    assert len(looks) == 3
    record.unlink()
    looks.clear()
    marker.write_text("OutOfMemoryError: CUDA out of memory")  # this attempt's
    with pytest.raises(RuntimeError, match=r"task 1 of 2 failed .*CUDA out of memory.*probes \[3\] of the 4-step round "
                                           r"will not come"):
        probes._round_scores_of_others(cfg, out, [3], 4, since=time.time() - 5)
    assert looks == []  # at the first look
    # the failing task writes the marker, whatever stopped it; a task that runs alone writes none
    def boom(*a, **k):
        raise RuntimeError("a probe crashed")

    monkeypatch.setattr(probes, "_halving", boom)
    for task, tasks, want in ((0, 2, "RuntimeError (rank 0): a probe crashed"), (0, 1, None)):
        cfg = load_config(None, [f"select.num_tasks={tasks}", f"select.task_index={task}", "select.method=halving"])
        with pytest.raises(RuntimeError, match="a probe crashed"):
            probes.halving(cfg, out, 4, tmp_path / "align")
        mine = out / "probes" / f"TASK_{task}_of_{tasks}.failed"
        assert (mine.read_text() if mine.exists() else None) == want
    # run again, the task's own marker goes at its start; a time limit's stop-and-requeue leaves none (it comes back)
    from ds_hybrid.trainer import StopRequested

    def requeued(*a, **k):
        assert not (out / "probes" / "TASK_0_of_2.failed").exists()
        raise StopRequested(0)

    monkeypatch.setattr(probes, "_halving", requeued)
    cfg = load_config(None, ["select.num_tasks=2", "select.task_index=0", "select.method=halving"])
    with pytest.raises(StopRequested):
        probes.halving(cfg, out, 4, tmp_path / "align")
    assert not (out / "probes" / "TASK_0_of_2.failed").exists()


HALVING_WAIT_SCRIPT = """
import json, sys, threading
from pathlib import Path
from ds_hybrid import distributed as D
from ds_hybrid.config import load_config
from ds_hybrid.stages import probes
out = Path(sys.argv[1])
D.init_distributed(2 / 60)  # collectives time out after 2 s: the 5 s wait must not sit in one
cfg = load_config(None, [])
cfg.dist_timeout_minutes = 0.25  # 15 s without a write: the other task taken as dead
record = out / "probes" / probes.probe_name(3) / "round_0000004.json"
if D.rank() == 0:  # the other task's probe finishes 5 s from now
    record.parent.mkdir(parents=True, exist_ok=True)
    threading.Timer(5.0, lambda: record.write_text('{"steps": 4, "kl": 0.5}')).start()
else:  # a node that does not see the record (yet): it must follow the main rank's look, not its own
    real = Path.is_file
    Path.is_file = lambda self: False if self.name.startswith("round_") else real(self)
try:
    verdict = probes._round_scores_of_others(cfg, out, [3], 4)
except Exception as e:
    verdict = repr(e)
Path(out, f"rank{D.rank()}.json").write_text(json.dumps(str(verdict)))
D.shutdown()
"""


def test_halvings_ranks_follow_the_main_ranks_look_at_the_other_tasks_records(tmp_path):
    """Two ranks of a halving task wait for another task's record of a round: the main rank looks (one short
    collective per look), so a rank whose node sees the file late or never still returns the same scores at the same
    time; each rank polled for itself before, and such a rank gave up alone while the other went on."""
    from trainer_utils import free_port

    script = tmp_path / "wait.py"
    script.write_text(HALVING_WAIT_SCRIPT)
    p = run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
             str(script), str(tmp_path)], timeout=300)
    assert p.returncode == 0, tail(p)
    assert [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)] == ["{3: 0.5}", "{3: 0.5}"], tail(p)


def test_an_array_split_is_said_and_num_tasks_checked(monkeypatch, caplog):
    """Any Slurm job array splits the probes: said at warning level with the opt-out; num_tasks 0 named as itself."""
    from ds_hybrid.stages.probes import task_slot

    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "1")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "3")
    with caplog.at_level(logging.WARNING, logger="ds_hybrid"):
        assert task_slot(load_config(None, [])) == (1, 3)
        assert task_slot(load_config(None, ["select.num_tasks=1", "select.task_index=0"])) == (0, 1)
        # the opt-out as the warning words it, num_tasks alone: this task is 0 of 1, not its array task's index
        assert task_slot(load_config(None, ["select.num_tasks=1"])) == (0, 1)
    (said,) = [r.getMessage() for r in caplog.records]
    assert "task 1 of a 3-task Slurm array" in said and "set select.num_tasks: 1" in said
    with pytest.raises(ConfigError, match=r"^select\.num_tasks=0: tasks sharing the probes: 1 or more"):
        task_slot(load_config(None, ["select.num_tasks=0", "select.task_index=0"]))


def test_probes_run_from_other_settings_are_refused_by_name_or_set_aside(tmp_path):
    from ds_hybrid.stages.probes import PROBES_KEY, claim_probes, probe_identity, probe_stage_config

    align = _tiny_folder(tmp_path / "align")
    out = tmp_path / "select" / "ga_s2"
    cfg = load_config(None, [])
    ident = probe_identity(cfg, probe_stage_config(cfg, align), align)
    claim_probes(out, ident, force=False)
    (out / "probes" / "layer_000" / "kl").mkdir(parents=True)
    (out / "probes" / "layer_000" / "kl" / "DONE").write_text("{}")
    claim_probes(out, probe_identity(cfg, probe_stage_config(cfg, align), align), force=False)  # the same: reused
    from ds_hybrid.stages.probes import still_claimed

    still_claimed(out, ident)  # a task checks before each probe that the folder still holds its settings
    # the same settings spelt otherwise are the same probes (refused as "other settings" before, forcing a retrain):
    # the kernels' backend, a probe's number as text, the embedded teacher by name
    for same in (["mixer_options.backend=fla"], ["select.probe.tokens=2e6"], ["teacher=embedded"]):
        spelt = load_config(None, same)
        claim_probes(out, probe_identity(spelt, probe_stage_config(spelt, align), align), force=False)
    assert load_config(None, ["select.probe.tokens=2e6"]).select.probe["tokens"] == 2_000_000
    old = json.loads(json.dumps(ident))
    old["probe"]["tokens"], old["teacher"] = "2e6", None  # a record from before values were coerced
    from ds_hybrid.stages.probes import _changed

    assert _changed(old, ident) == []
    assert [k for k, *_ in _changed(ident, {**ident, "mixer_options": {"use_gate": False}})] == ["mixer_options"]
    # rows with BOS are other probes (data.bos resolved: SmolLM2's tokenizer puts none, so auto is no BOS)
    assert ident["data"]["row_bos"] is None
    bos = load_config(None, ["data.bos=true"])
    assert [k for k, *_ in _changed(ident, probe_identity(bos, probe_stage_config(bos, align), align))] == [
        "data.row_bos"]
    other = load_config(None, ["select.probe={tokens: 2000000, seq_len: 1024, global_batch: 8, lr: 5e-4}"])
    with pytest.raises(ConfigError, match=r"^select\.probe\.lr=0\.0005: .* other settings \(select\.probe\.lr: 0\.0001 -> 0\.0005\).*--force"):
        claim_probes(out, probe_identity(other, probe_stage_config(other, align), align), force=False)
    # a later kl.lr, which the probes took over (select.probe sets none): named as kl.lr, with the value to pin
    from ds_hybrid.stages.probes import inherited_names

    tuned = load_config(None, ["kl.lr=2e-4"])
    assert "lr" not in tuned.select.probe
    with pytest.raises(ConfigError, match=r"^kl\.lr=0\.0002: .*\(kl\.lr: 0\.0001 -> 0\.0002\).*set select\.probe\.lr: "
                                          r"0\.0001, the values they ran with"):
        claim_probes(out, probe_identity(tuned, probe_stage_config(tuned, align), align), False, inherited_names(tuned))
    # the run's dtype (resolved: auto is fp32 on this CPU) is part of what a probe's score depends on
    with pytest.raises(ConfigError, match=r"^dtype='bf16': .*\(dtype: 'fp32' -> 'bf16'; "):
        claim_probes(out, probe_identity(bf16 := load_config(None, ["dtype=bf16"]), probe_stage_config(bf16, align),
                                         align), force=False)
    _tiny_folder(align, scale=2.0)  # the align export retrained, same shapes
    with pytest.raises(ConfigError, match=r"^align \(its export's content fingerprint\)="):
        claim_probes(out, probe_identity(cfg, probe_stage_config(cfg, align), align), force=False)
    assert (out / "probes" / "layer_000" / "kl" / "DONE").is_file()  # refusing touched nothing
    new = probe_identity(cfg, probe_stage_config(cfg, align), align)
    # the selections made from the old probes (the plain one, a re-scored one) go aside with them: a --force run
    # killed before writing its own left them, and a plain rerun kept the old selection instead of running probes
    for rel in ("selection.json", "selection.png", "distance_reg_5/selection.json"):
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_text("old")
    claim_probes(out, new, force=True)
    with pytest.raises(ConfigError, match=r"no longer holds the settings this task started from"):
        still_claimed(out, ident)  # an older task, still running, stops instead of mixing its probes in
    still_claimed(out, new)
    aside = list((out / "previous").glob("*/probes/layer_000/kl/DONE"))
    assert len(aside) == 1 and not (out / "probes" / "layer_000").exists()
    for rel in ("selection.json", "selection.png", "distance_reg_5/selection.json"):
        assert not (out / rel).exists() and (aside[0].parents[3] / "selections" / rel).read_text() == "old"
    assert json.loads((out / "probes" / PROBES_KEY).read_text()) == json.loads(json.dumps(new, sort_keys=True))
    # a folder written before the dtype was recorded: its probes are reused as run with this run's dtype, said once
    legacy = {k: v for k, v in new.items() if k != "dtype"}
    (out / "probes" / PROBES_KEY).write_text(json.dumps(legacy))
    claim_probes(out, new, force=False)
    assert json.loads((out / "probes" / PROBES_KEY).read_text())["dtype"] == "fp32"
    (out / "probes" / PROBES_KEY).write_text(json.dumps({**new, "dtype": "float32"}))  # torch's spelling (a few
    claim_probes(out, new, force=False)                                              # commits of 2026-12-06)
    # the losses' precision switches: part of a 16-bit run's identity (named as the setting the user sets: kl's,
    # inherited; select.probe's, pinned), recorded as None in an fp32 run's, where they change nothing
    def ident(*over):
        c = load_config(None, ["dtype=bf16", *over])
        return probe_identity(c, probe_stage_config(c, align), align), False, inherited_names(c)  # (force: no)

    assert new["probe"]["dw_fp32"] is None and new["probe"]["fp32_logits"] is None
    fp32_wide = load_config(None, ["kl.dw_fp32=false", "kl.fp32_logits=true"])
    claim_probes(out, probe_identity(fp32_wide, probe_stage_config(fp32_wide, align), align), False)  # (the same)
    bf16 = ident()[0]
    assert bf16["probe"]["dw_fp32"] is True and bf16["probe"]["fp32_logits"] is False
    claim_probes(out, bf16, force=True)
    with pytest.raises(ConfigError, match=r"^kl\.dw_fp32=False: .*\(kl\.dw_fp32: True -> False\)"):
        claim_probes(out, *ident("kl.dw_fp32=false"))
    with pytest.raises(ConfigError, match=r"^select\.probe\.fp32_logits=True: "):
        claim_probes(out, *ident("select.probe={tokens: 2000000, seq_len: 1024, global_batch: 8, fp32_logits: true}"))
    # a folder from before they were recorded is taken as run with the defaults of then (fp32_logits false,
    # dw_fp32 true): reused where the run has those, said once, and recorded; refused where it changed one
    older = {**bf16, "probe": {k: v for k, v in bf16["probe"].items() if k not in ("fp32_logits", "dw_fp32")}}
    (out / "probes" / PROBES_KEY).write_text(json.dumps(older))
    with pytest.raises(ConfigError, match=r"^kl\.dw_fp32=False: .*\(kl\.dw_fp32: True -> False\)"):
        claim_probes(out, *ident("kl.dw_fp32=false"))
    claim_probes(out, bf16, force=False)
    assert json.loads((out / "probes" / PROBES_KEY).read_text())["probe"]["dw_fp32"] is True


def test_each_probe_gets_its_own_stage_settings():
    """micro_batch: auto is resolved per probe (for its layers) by writing it into the probe's stage settings: the
    probes of one task shared one object, so every probe ran at the first probe's micro-batch."""
    from pathlib import Path

    from ds_hybrid.stages.probes import probe_run_config, probe_stage_config

    cfg = load_config(None, [])
    s = probe_stage_config(cfg, Path("/tmp/align"))
    a, b = (probe_run_config(cfg, Path(f"/tmp/p{i}"), [i], s) for i in (3, 5))
    assert a.kl is not s and b.kl is not s and a.kl is not b.kl and a.kl == s
    a.kl.micro_batch = 4
    assert s.micro_batch == b.kl.micro_batch == "auto"


def test_a_probes_errors_name_the_setting_the_user_sets():
    """Probes run as stage kl, so their refusals named kl.<x> (kl.global_batch=8 for a probe batch no rank count
    divides, while kl.global_batch was fine): the select.probe.<x> setting, select's own, or kl's where inherited."""
    from ds_hybrid.stages.probes import probe_field

    cfg = load_config(None, ["kl.global_batch=48", "select.probe.lr=3e-4"])
    assert probe_field(cfg, "kl.global_batch") == "select.probe.global_batch"  # a probe default
    assert probe_field(cfg, "kl.lr") == "select.probe.lr"  # set in select.probe
    assert probe_field(cfg, "kl.lr_rest") == "kl.lr_rest"  # taken over from kl
    assert probe_field(cfg, "kl.eval_sequences") == "select.eval_sequences"
    assert probe_field(cfg, "data.source") == "data.source"


def test_the_proxy_scores_at_the_probes_temperature(caplog):
    """The proxy's KL with layer l restored is kl's held-out quantity at the probes' temperature (T^2 x KL of the
    softened distributions; the proxy read T = 1 whatever kl.temperature was): checked against the fp64 reference
    with the teacher's attention put in the student's layer by hand."""
    import copy

    import torch
    from conftest import tiny_teacher

    from ds_hybrid.losses import reference_kl_ce
    from ds_hybrid.stages.scorers import proxy_scores

    teacher = tiny_teacher("llama", seed=0).double()
    student = tiny_teacher("llama", seed=1).double()  # another model of the same shapes: its attention differs
    with torch.no_grad():  # logits of a trained model's size (a fresh init's are so small that T^2 KL hardly moves)
        teacher.lm_head.weight.mul_(40)
        student.lm_head.weight.copy_(teacher.lm_head.weight)
    rows = [torch.randint(0, 101, (1, 24), generator=torch.Generator().manual_seed(i)) for i in range(2)]

    @torch.no_grad()
    def want(model, T):
        h_s = torch.cat([model.model(input_ids=r).last_hidden_state.flatten(0, 1) for r in rows])
        h_t = torch.cat([teacher.model(input_ids=r).last_hidden_state.flatten(0, 1) for r in rows])
        mask = torch.ones(len(h_s), dtype=torch.float64)
        return float(reference_kl_ce(h_s, model.lm_head.weight, h_t, teacher.lm_head.weight, mask, None,
                                     temperature=T)[0])

    restored = copy.deepcopy(student)
    restored.model.layers[2].self_attn = teacher.model.layers[2].self_attn
    for T in (1.0, 2.0):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="ds_hybrid"):
            scores, baseline = proxy_scores(teacher, student, rows, temperature=T)
        assert baseline == pytest.approx(want(student, T), rel=1e-9)
        assert scores[2] == pytest.approx(want(restored, T), rel=1e-9)
        said = [r.getMessage() for r in caplog.records]  # the all-linear pass is said before the first layer's
        assert said[0].startswith(f"proxy all-linear: KL {baseline:.4f}") and said[1].startswith("proxy layer 0:")
    assert want(student, 2.0) != pytest.approx(want(student, 1.0), rel=1e-3)  # (T matters on these models)


def test_a_proxy_selection_scored_at_t1_before_the_fix_is_said_when_the_probes_temperature_is_not_1(tmp_path):
    """A proxy selection.json made before 2026-12-06 scored at T = 1 whatever the probes' temperature; its recorded
    settings (which hold kl.temperature) match today's, so only its budget (no temperature) tells it apart."""
    from ds_hybrid.stages.select import _proxy_at_t1

    target = tmp_path / "selection.json"
    hot = load_config(None, ["select.method=proxy", "kl.temperature=2"])
    target.write_text(json.dumps({"budget": {"heldout_sequences": 32, "seq_len": 1024}}))
    assert _proxy_at_t1(target, hot)
    assert not _proxy_at_t1(target, load_config(None, ["select.method=proxy"]))  # T = 1: the same scores
    assert not _proxy_at_t1(target, load_config(None, ["select.method=ppl", "kl.temperature=2"]))
    target.write_text(json.dumps({"budget": {"heldout_sequences": 32, "seq_len": 1024, "temperature": 2.0}}))
    assert not _proxy_at_t1(target, hot)


def test_tasks_of_one_probes_folder_must_split_it_alike(tmp_path):
    """Probes are dealt by position modulo num_tasks: a task of another split while the probes are unfinished is
    refused (task 0 of 2 and task 1 of 3 would train one probe at once and leave others to none), naming the split;
    the same split, or any once the probes are done, goes on."""
    from ds_hybrid.stages.probes import SPLIT_KEY, bind_split

    (tmp_path / "probes").mkdir()
    bind_split(tmp_path, 2, lambda: False)
    bind_split(tmp_path, 2, lambda: False)
    with pytest.raises(ConfigError, match=r"^select\.num_tasks=3: the probes in .* are dealt over 2 tasks"):
        bind_split(tmp_path, 3, lambda: False)
    bind_split(tmp_path, 3, lambda: True)  # finished: a new split (e.g. to re-score) is free
    assert json.loads((tmp_path / "probes" / SPLIT_KEY).read_text()) == {"num_tasks": 3}
    # halving's tasks each work out the next round's survivors from keep: another keep is refused alike (task 0
    # with 8 finalists waited for ever on a probe task 1, with 4, never ran)
    bind_split(tmp_path, 3, lambda: False, {"select.halving_keep": 8})
    bind_split(tmp_path, 3, lambda: False, {"select.halving_keep": 8})
    with pytest.raises(ConfigError, match=r"^select\.halving_keep=4: the tasks sharing .* run with "
                                          r"select\.halving_keep = 8"):
        bind_split(tmp_path, 3, lambda: False, {"select.halving_keep": 4})


def test_a_halving_that_ended_frees_its_split_for_a_later_run(tmp_path):
    """Halving's split binds until a task has written HALVING_DONE at its finalists (a rerun as one task over a
    finished four-task halving was refused for ever); a halving of other finalists started since binds its own. The
    marker counts only for the folder's claim and split it was written under: a task that lagged behind a --force run
    of other settings, or behind a halving of other finalists, writes none, and one carried into a new claim is void."""
    from ds_hybrid.stages.probes import (HALVING_DONE, SPLIT_KEY, bind_split, claim_probes, halving_ended,
                                         mark_halving_ended)

    ident, other = {"probe": {"lr": 1e-3}}, {"probe": {"lr": 2e-3}}
    claim_probes(tmp_path, ident, force=False)
    ended = lambda: halving_ended(tmp_path)  # noqa: E731
    keep8, keep4 = {"select.halving_keep": 8}, {"select.halving_keep": 4}
    bind_split(tmp_path, 4, ended, keep8)
    with pytest.raises(ConfigError, match=r"^select\.num_tasks=1: the probes in .* are dealt over 4 tasks"):
        bind_split(tmp_path, 1, ended, keep8)
    mark_halving_ended(tmp_path, other, keep8)  # (the folder is not that run's)
    mark_halving_ended(tmp_path, ident, keep4)  # (the split is not that halving's)
    assert not (tmp_path / "probes" / HALVING_DONE).exists() and not halving_ended(tmp_path)
    mark_halving_ended(tmp_path, ident, keep8)
    assert halving_ended(tmp_path)
    bind_split(tmp_path, 1, ended, keep8)
    assert json.loads((tmp_path / "probes" / SPLIT_KEY).read_text()) == {"num_tasks": 1, "select.halving_keep": 8}
    bind_split(tmp_path, 2, ended, keep4)  # other finalists, over the ended halving
    assert not halving_ended(tmp_path)  # (its rounds run now: its split binds)
    with pytest.raises(ConfigError, match=r"^select\.halving_keep=8: the tasks sharing"):
        bind_split(tmp_path, 2, ended, keep8)
    with pytest.raises(ConfigError, match=r"^select\.num_tasks=1: the probes in .* are dealt over 2 tasks"):
        bind_split(tmp_path, 1, ended, keep4)
    mark_halving_ended(tmp_path, ident, keep8)  # a keep-8 task lagging behind the keep-4 halving: no marker
    assert not halving_ended(tmp_path)
    mark_halving_ended(tmp_path, ident, keep4)
    assert halving_ended(tmp_path)
    # a --force run of other settings: a new folder; the old marker carried into it (a lagging task's) is void
    marker = (tmp_path / "probes" / HALVING_DONE).read_text()
    claim_probes(tmp_path, other, force=True)
    bind_split(tmp_path, 3, ended, keep4)
    (tmp_path / "probes" / HALVING_DONE).write_text(marker)
    assert not halving_ended(tmp_path)
    with pytest.raises(ConfigError, match=r"^select\.num_tasks=1: the probes in .* are dealt over 3 tasks"):
        bind_split(tmp_path, 1, ended, keep4)
    mark_halving_ended(tmp_path, other, keep4)
    assert halving_ended(tmp_path)
    done = json.loads((tmp_path / "probes" / HALVING_DONE).read_text())
    (tmp_path / "probes" / HALVING_DONE).write_text(json.dumps({"probes": done["probes"]}))
    assert not halving_ended(tmp_path)  # (no settings recorded: not an ended halving)


def test_a_non_finite_probe_score_is_refused_as_it_is_read_naming_the_probe(tmp_path):
    from ds_hybrid.stages.probes import probe_score

    probe = tmp_path / "layer_004"
    (probe / "kl").mkdir(parents=True)
    (probe / "kl" / "DONE").write_text(json.dumps({"val": {"kl": float("nan")}}))
    with pytest.raises(ConfigError, match=r"^select=.*layer_004.*heldout score is nan: delete the folder"):
        probe_score(probe, "heldout", 1)
    (probe / "kl" / "DONE").write_text(json.dumps({"val": {"kl": 0.25}}))
    assert probe_score(probe, "heldout", 1) == 0.25


def test_a_second_copy_of_a_running_probe_task_is_refused_naming_the_first(tmp_path):
    """The same task_index of num_tasks started twice (a job submitted twice, an array task started again by hand)
    would train the same probes at once in the same folders: refused while the first runs, by ga_s2 and halving
    alike, the running one's host and pid named and halving's failure marker not written (the first task has not
    failed); another task of the split goes on, and once the first process is gone (killed: nothing to clean up)
    the task runs again."""
    import os
    import subprocess
    import sys

    from ds_hybrid.stages import probes

    align = _tiny_folder(tmp_path / "align")
    out = tmp_path / "select" / "ga_s2"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from ds_hybrid.stages.probes import "
         "task_held\nwith task_held(Path(sys.argv[1]), 1, 2):\n    print('held', flush=True); time.sleep(120)",
         str(out)], stdout=subprocess.PIPE, text=True, cwd=os.getcwd())
    try:
        assert holder.stdout.readline().strip() == "held"
        for method in ("ga_s2", "halving"):
            cfg = load_config(None, ["select.num_tasks=2", "select.task_index=1", f"select.method={method}"])
            with pytest.raises(ConfigError, match=rf"^select\.task_index=1: task 1 of 2 already runs on .*\(host "
                                                  rf".*, pid {holder.pid}, since .*a second copy, of these settings or "
                                                  r"others \(--force\), would train in the same probe folders at once"):
                getattr(probes, method)(cfg, out, 2, align)
        assert not list(out.glob("probes/TASK_*.failed"))
        assert not (out / "probes").exists()  # refused before claiming the folder: nothing written
        with probes.task_held(out, 0, 2):  # the other task of the split
            pass
    finally:
        holder.kill()
        holder.wait()
    with probes.task_held(out, 1, 2):  # its process gone, the lock went with it
        with probes.task_held(out, 1, 2):  # (re-entered in one process: stage select holds it around the method)
            pass
        assert f"pid {os.getpid()}," in (out / ".task-1-of-2.lock").read_text()


def test_a_file_system_without_locks_is_refused_naming_out_dir(tmp_path, monkeypatch):
    """flock on NFS without its lock service (ENOLCK) or Lustre without -o flock (ENOSYS) raised on the main rank
    before the broadcast the other ranks wait in: now a refusal every rank raises, naming out_dir."""
    import errno

    from ds_hybrid.stages import probes

    def no_locks(*a):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(probes.fcntl, "flock", no_locks)
    out = tmp_path / "run" / "select" / "ga_s2"
    with pytest.raises(ConfigError, match=rf"^out_dir='{tmp_path / 'run'}': cannot lock .*No locks available.*a "
                                          r"file system that has them"):
        with probes.task_held(out, 0, 1):
            pass


@pytest.mark.parametrize("change", ["takeover", "align"])
def test_a_selection_is_not_made_from_probes_whose_folder_or_align_changed_since_they_started(tmp_path, monkeypatch,
                                                                                             change):
    """A task checked its claim before each probe only: one that waited for the others' probes, then read every
    score, would write a selection after a --force run of other settings had taken the folder over, or after the
    align export was written again (its new fingerprint recorded for the old export's ranking). Checked once more
    before the scores are used."""
    from ds_hybrid.stages import probes
    from ds_hybrid.stages.probes import (PROBES_KEY, _ga_s2, probe_identity, probe_name, probe_stage_config,
                                         task_slot)

    align = _tiny_folder(tmp_path / "align")
    out = tmp_path / "select" / "ga_s2"
    cfg = load_config(None, [])
    s = probe_stage_config(cfg, align)
    ident = probe_identity(cfg, s, align)
    for layer in [None, 0, 1]:  # every probe done (2 layers)
        (out / "probes" / probe_name(layer) / "kl").mkdir(parents=True)
        (out / "probes" / probe_name(layer) / "kl" / "DONE").write_text("{}")
    read = []

    def score(d, *a):  # each probe's score; the change lands while the scores are read
        if not read:
            if change == "takeover":
                (out / "probes" / PROBES_KEY).write_text(json.dumps({**ident, "seed": 99}, sort_keys=True))
            else:
                _tiny_folder(align, scale=2.0)
        read.append(d.name)
        return 1.0

    monkeypatch.setattr(probes, "probe_score", score)
    with pytest.raises(ConfigError, match="no longer holds the settings" if change == "takeover" else
                       r"the align export changed while the probes ran"):
        _ga_s2(cfg, out, 2, align, False, s, ident, *task_slot(cfg))
    assert len(read) == 3  # (the scores were read: the check is the one after them)


@pytest.mark.parametrize("method", ["ar", "proxy"])
def test_scorers_that_load_models_whole_refuse_a_gpu_their_weights_do_not_fit(method):
    import torch
    from conftest import tiny_config
    from transformers import AutoModelForCausalLM

    from ds_hybrid.modeling import HybridForCausalLM
    from ds_hybrid.stages.scorers import WHOLE_MODEL_FRACTION, check_whole_models_fit
    from ds_hybrid.transfer import hybrid_config

    tc = tiny_config("llama")
    cfg = load_config(None, [f"select.method={method}"])
    teacher = sum(p.numel() for p in AutoModelForCausalLM.from_config(tc).parameters())
    student = sum(p.numel() for p in HybridForCausalLM(hybrid_config(tc, [], cfg.mixer, cfg.mixer_options)).parameters())
    want = 2 * (teacher + (student if method == "proxy" else 0))  # bf16; proxy holds the align export beside it
    assert check_whole_models_fit(cfg, tc, torch.bfloat16, int(want / WHOLE_MODEL_FRACTION) + 1) == want
    assert check_whole_models_fit(cfg, tc, torch.float32, 10**9) == 2 * want
    with pytest.raises(ConfigError, match=r"select\.method.*whole on every GPU.*ga_s2 or halving") as e:
        check_whole_models_fit(cfg, tc, torch.bfloat16, int(want / WHOLE_MODEL_FRACTION) - 64)
    assert ("align export" in str(e.value)) == (method == "proxy")


def test_ppl_and_retrieval_count_their_largest_pass_beside_the_weights():
    """ppl's whole-row logits (bf16, fp32, fp32 log-softmax) and retrieval's eager attention of one layer (bf16
    scores, fp32 softmax, bf16 copy) beside its row's logits grow with the rows' length: at 8k tokens they outgrow the
    tiny teacher's weights, and a retrieval that does not fit is refused naming select.retrieval_seq_len."""
    import torch
    from conftest import tiny_config

    from ds_hybrid.stages.scorers import WHOLE_MODEL_FRACTION, check_whole_models_fit, whole_models_bytes

    tc = tiny_config("llama")
    T, V, H = 8192, tc.vocab_size, tc.num_attention_heads
    ppl, retrieval = (load_config(None, [f"select.method={m}", f"select.retrieval_seq_len={T}"])
                      for m in ("ppl", "retrieval"))
    w_ppl, work_ppl = whole_models_bytes(ppl, tc, torch.bfloat16, T)
    assert work_ppl == (2 + 4 + 4) * T * V
    w_ret, work_ret = whole_models_bytes(retrieval, tc, torch.bfloat16, T)
    assert work_ret == (2 + 4 + 2) * H * T * T + 2 * T * V and work_ret > w_ret
    assert w_ret < w_ppl  # (the teacher alone; ppl holds the align export too)
    assert whole_models_bytes(load_config(None, ["select.method=ar"]), tc, torch.bfloat16, T)[1] == 0
    assert check_whole_models_fit(retrieval, tc, torch.bfloat16, 10**10, T) == w_ret + work_ret
    with pytest.raises(ConfigError, match=r"^select\.retrieval_seq_len=8192: select\.method=retrieval loads the "
                                          r"teacher whole .* GiB for a row's pass at 8,192 tokens.*or shorter rows"):
        check_whole_models_fit(retrieval, tc, torch.bfloat16, int((w_ret + work_ret) / WHOLE_MODEL_FRACTION) - 64, T)


def test_answers_are_tokenized_as_the_model_reads_them_after_their_prompt():
    """ar's prompts and retrieval's questions: the answer's ids are those of prompt + answer read as one text. Under
    SentencePiece's legacy normalizer (a word boundary prepended to each text tokenized) the answer tokenized alone
    began with a boundary token the joint text lacks; byte-level BPE (the embedded teacher) gives the same ids."""
    from tokenizers import Tokenizer, models, normalizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from ds_hybrid.recall_tasks import QUERY, encode_split, make_prompts
    from ds_hybrid.teacher import embedded_teacher_dir

    chars = "\u2581?:ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789\n"
    sp = Tokenizer(models.BPE({c: i for i, c in enumerate(chars)}, [], unk_token="?"))
    sp.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    legacy = PreTrainedTokenizerFast(tokenizer_object=sp, unk_token="?")
    ids = lambda s: legacy(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    prompt, answer = "Answer: The code is", " 178"
    assert legacy.convert_ids_to_tokens(ids(answer)) == ["\u2581", "\u2581", "1", "7", "8"]  # alone: two boundaries
    p, a = encode_split(legacy, prompt, answer)
    assert p + a == ids(prompt + answer) and legacy.convert_ids_to_tokens(a) == ["\u2581", "1", "7", "8"]

    bpe = AutoTokenizer.from_pretrained(embedded_teacher_dir())
    enc = lambda s: bpe(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    for q in make_prompts(20, seed=3, pairs=20, multihop=True):
        assert encode_split(bpe, q.text, q.answer) == (enc(q.text), enc(q.answer))
    assert encode_split(bpe, QUERY.format(key="Amber Falcon"), " 123456") == (
        enc(QUERY.format(key="Amber Falcon")), enc(" 123456"))
