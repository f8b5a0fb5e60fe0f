"""``ds-hybrid recall-vs-k``: the comparison's table (selector x K x task) and its plot of recall vs K.

    ds-hybrid recall-vs-k outputs/merged/eval.json \
        --selection ga_s2=runs/compare/select/ga_s2/selection.json --selection proxy=.../proxy/selection.json \
        --task niah_single_1 --out outputs/by_k

Each model of an eval.json (one of ``ds-hybrid eval`` or ``ds-hybrid eval-merge``) is placed by what it is, read
from the eval's own record of the model, not from its name: the teacher (K = its layer count), the all-linear
student (K = 0), or a hybrid with K softmax layers whose layers are those some selector keeps at that K: a
``--selection`` file (its top-K; for the spacing rules the rule at K) or the built-in rules uniform and smart. A
hybrid that no selector explains is listed under its own name. Two models of one selector and K (two seeds) are
both kept; the plot draws each and the line through their mean.

Writes recall_vs_k.md (one table per length: a row per model, a column per task, each score with its 95 % Wilson
interval; then every other selector's hybrid minus the uniform hybrid of the same K, or of each ``--against``
selector, with the 95 % interval of the difference: Newcombe's, from the two Wilson intervals; with ``--paired``, from
the two models' answers prompt by prompt where their samples files are at hand, Newcombe 1998b; ``--pair A:B``: also
model A minus model B whatever their selectors, K or seeds, with the count of cells whose interval excludes 0),
recall_vs_k.json and
recall_vs_k.png (one panel per length:
the task's score vs K for every selector, from the all-linear student at K = 0 to the teacher at K = L).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ds_hybrid.errors import ConfigError, out_folder
from ds_hybrid.folders import atomic_write_text
from ds_hybrid.evaluation.report import difference_interval, paired_difference_interval, score_cell, wilson_interval
from ds_hybrid.layers import selection_top_k, smart_layers, uniform_layers
from ds_hybrid.selection import read_selection

TEACHER, ALL_LINEAR = "teacher", "all_linear"


def place_models(models: dict[str, dict], selections: dict[str, dict]) -> list[dict]:
    """[{model, selector, k, layers}] for every model of an eval.json's ``models`` record. The teacher row: the
    model named teacher, else the only model that is not a hybrid; another model that is not a hybrid (a second
    baseline LM) is listed under its own name, not as the teacher."""
    rows = []
    plain = [n for n, info in models.items() if info.get("model_type") != "ds_hybrid"]
    teacher = TEACHER if TEACHER in plain else plain[0] if len(plain) == 1 else None
    for name, info in models.items():
        if "num_layers" not in info:
            raise ConfigError("recall-vs-k", name, "the eval.json records no layer count for this model: evaluate "
                              "it again with this version of `ds-hybrid eval`")
        L = int(info["num_layers"])
        if info.get("model_type") != "ds_hybrid":
            rows.append({"model": name, "selector": TEACHER if name == teacher else name, "k": L,
                         "layers": list(range(L)), "matched": name == teacher, "baseline": name != teacher})
            continue
        layers = sorted(int(x) for x in info.get("softmax_layers", []))
        k = len(layers)
        if k == 0:
            rows.append({"model": name, "selector": ALL_LINEAR, "k": 0, "layers": [], "matched": True})
            continue
        rules = {"uniform": uniform_layers(L, k), "smart": smart_layers(L, k)}
        for sel_name, sel in selections.items():
            if sel["num_layers"] != L:
                raise ConfigError("recall-vs-k --selection", sel_name,
                                  f"ranks {sel['num_layers']} layers; model {name} has {L}")
            rules[sel_name] = selection_top_k(sel, k)
        matched = [s for s, chosen in rules.items() if chosen == layers]
        rows.append({"model": name, "selector": "=".join(matched) if matched else name, "k": k, "layers": layers,
                     "matched": bool(matched)})
    return rows


def _order(rows: list[dict]) -> list[dict]:
    first = {TEACHER: 0, ALL_LINEAR: 1}
    return sorted(rows, key=lambda r: (first.get(r["selector"], 2), r["selector"], r["k"], r["model"]))


# {model: {(task, length): {prompt (id and answers): (0 or 1, the prompt's document digest or None)}}}
Outcomes = dict[str, dict[tuple[str, str], dict[str, tuple[float, str | None]]]]


def source_file(path: Path, merged: Path) -> Path | None:
    """A merge's source as recorded (relative to where eval-merge ran, e.g. docs/data/...): found from here, else from
    a folder above the merged eval.json (the repository it lies in)."""
    if path.is_absolute() or path.is_file():
        return path if path.is_file() else None
    return next((d / path for d in merged.resolve().parents if (d / path).is_file()), None)


def prompt_outcomes(payload: dict[str, Any], src: Path, strict: bool = False) -> Outcomes:
    """Each model's per-prompt scores, from the samples files beside its eval.json (an eval-merge's: beside each of
    its sources, their renames undone): what paired differences are computed from. A prompt is known by its id and
    answers, with its document's digest (``doc_sha``, in records since it was written), so that two models' prompts
    pair only where they are the same prompt (models of other tokenizers get other prompts under the same ids).
    Strict scores are recomputed from each record's gold
    and generation, as ``recall.strict_scores`` does. A model or cell without samples is absent (its differences stay
    unpaired)."""
    from ds_hybrid.evaluation import recall
    from ds_hybrid.evaluation.merge import _samples

    sources = [(Path(s["file"]), s.get("models") or [], s.get("renames") or {}) for s in payload.get("sources") or []]
    sources = sources or [(src, list(payload.get("scores", {})), {})]
    out: Outcomes = {}
    missing = []
    for recorded, models, renames in sources:
        file = source_file(recorded, src)
        if file is None:
            missing.append(str(recorded))
            continue
        old_name = {new: old for old, new in renames.items()}
        for model in models:
            for rec in _samples(file, old_name.get(model, model)) or []:
                length = rec.get("length")
                if length is None:  # (SWDE / FDA: no length, not in the by-K tables)
                    continue
                v = recall.strict_score(rec["gold"], rec["generation"]) if strict else \
                    (rec.get("score") or {}).get(str(length))
                if v is not None:
                    prompt = json.dumps([rec.get("id"), rec.get("gold")], default=str)
                    out.setdefault(model, {}).setdefault((rec["task"], str(length)), {})[prompt] = \
                        (v, rec.get("doc_sha"))
    if missing:
        print(f"--paired: {len(missing)} source(s) of {src} not found from here or above it, their models' "
              f"differences unpaired: {missing[:3]}{' ...' if len(missing) > 3 else ''}", file=sys.stderr)
    return out


def paired_cell(first: dict[str, tuple[float, str | None]] | None, second: dict[str, tuple[float, str | None]] | None,
                expected: tuple[tuple[float, int], tuple[float, int]] | None = None
                ) -> tuple[float, float, float] | None:
    """The paired difference of two models' 0/1 outcomes on the same prompts; None where they are not (other
    prompts: other ids or answers, or documents whose digests both records hold and differ; a score that is not 0
    or 1; or outcomes that do not add up to the table's ``expected`` (score, prompt count) of each model)."""
    if not first or not second or first.keys() != second.keys():
        return None
    if any(v not in (0, 1) for v, _ in (*first.values(), *second.values())) or \
            any(None not in (first[k][1], second[k][1]) and first[k][1] != second[k][1] for k in first):
        return None
    if expected is not None and any(len(o) != n or abs(sum(v for v, _ in o.values()) / len(o) - p) > 1e-9
                                    for o, (p, n) in zip((first, second), expected)):
        return None
    table = [0, 0, 0, 0]  # both right, only the first, only the second, neither
    for k, (v, _) in first.items():
        w = second[k][0]
        table[(0 if w else 1) if v else (2 if w else 3)] += 1
    return paired_difference_interval(*table)


def tables(payload: dict[str, Any], rows: list[dict], against: tuple[str, ...] = ("uniform",),
           outcomes: Outcomes | None = None, pairs: list[tuple[str, str]] | None = None) -> str:
    scores, counts = payload["scores"], payload.get("prompts", {})
    tasks = payload.get("tasks") or sorted({t for s in scores.values() for t in s})
    out = []
    for length in _lengths(payload):
        present = [t for t in tasks if any(str(length) in scores.get(r["model"], {}).get(t, {}) for r in rows)]
        out += [f"### {length} tokens", "", "| selector | K | model | " + " | ".join(present) + " |",
                "|---|---|---|" + "---|" * len(present)]
        for r in _order(rows):
            cells = [score_cell(scores.get(r["model"], {}).get(t, {}).get(str(length)),
                                counts.get(r["model"], {}).get(t, {}).get(str(length), 0), digits=2, show_n=False)
                     for t in present]
            if any(cells):  # a model not evaluated at this length has no row here
                out.append(f"| {r['selector']} | {r['k']} | {r['model']} | " + " | ".join(cells) + " |")
        out.append("")
    for base in against:
        out += differences(payload, rows, base, outcomes)
    out += pair_tables(payload, pairs or [], outcomes)
    quality = payload.get("heldout_quality") or {}
    if quality:
        out += ["### held-out quality", "", "| selector | K | model | perplexity | KL to the teacher |", "|---|---|---|---|---|"]
        for r in _order(rows):
            q = quality.get(r["model"], {})
            cell = lambda key: f"{q[key]:.3f}" if key in q else ""  # noqa: E731
            out.append(f"| {r['selector']} | {r['k']} | {r['model']} | {cell('ppl')} | {cell('kl_to_teacher')} |")
    return "\n".join(out).rstrip() + "\n"


def differences(payload: dict[str, Any], rows: list[dict], against: str = "uniform",
                outcomes: Outcomes | None = None) -> list[str]:
    """Markdown lines: each other selector's hybrid minus the ``against`` hybrid of the same K (``against`` teacher
    or all_linear: every hybrid, whatever its K, minus that model), per length and task, with the 95 % interval of
    the difference (``difference_interval``); [] when no such pair was evaluated."""
    scores = payload["scores"]
    # a hybrid two rules explain (selector "uniform=ga_s2") is the base of both, and compared with neither
    # (only a placed model: one that no selector explains is listed under its own name, which may be a selector's)
    base = [r for r in rows if r.get("matched", True) and against in r["selector"].split("=")]
    any_k = against in (TEACHER, ALL_LINEAR)
    pairs = [(r, b) for r in _order(rows) if r["selector"] not in (TEACHER, ALL_LINEAR)
             and (r.get("matched") or any_k) and against not in r["selector"].split("=")
             for b in base if any_k or b["k"] == r["k"]]
    out: list[str] = []
    tasks = payload.get("tasks") or sorted({t for s in scores.values() for t in s})
    for length in _lengths(payload):
        lines = []
        for r, b in pairs:
            cells = [difference_cell(payload, r["model"], b["model"], t, length, outcomes)[0] for t in tasks]
            if any(cells):
                lines.append(f"| {r['selector']} - {against} | {r['k']} | {r['model']} - {b['model']} | "
                             + " | ".join(cells) + " |")
        if lines:
            same = "" if any_k else " at the same K"
            out += [f"### {length} tokens: difference to {against}{same} (95 % interval; * excludes 0"
                    f"{_how(outcomes)})", "",
                    "| selectors | K | models | " + " | ".join(tasks) + " |", "|---|---|---|" + "---|" * len(tasks),
                    *lines, ""]
    return out


def _lengths(payload: dict[str, Any]) -> list[int]:
    return sorted({int(m) for s in payload["scores"].values() for d in s.values() for m in d if m.isdigit()})


def _how(outcomes: Outcomes | None) -> str:
    return "" if outcomes is None else ("; paired: from the two models' answers prompt by prompt, Newcombe 1998b; u: "
                                        "unpaired, no per-prompt answers of both")


def difference_cell(payload: dict[str, Any], first: str, second: str, task: str, length: int,
                    outcomes: Outcomes | None = None) -> tuple[str, int]:
    """``first`` minus ``second`` on a task at a length, with its 95 % interval (paired where ``outcomes`` pair the
    two models' answers, else Newcombe's unpaired one) -> (the table cell, '' where either model lacks the score;
    +1 / -1 where the interval lies above / below 0, else 0)."""
    scores, counts, key = payload["scores"], payload.get("prompts", {}), str(length)
    a, c = scores.get(first, {}).get(task, {}).get(key), scores.get(second, {}).get(task, {}).get(key)
    na, nc = (counts.get(m, {}).get(task, {}).get(key, 0) for m in (first, second))
    if a is None or c is None or a < 0 or c < 0 or not na or not nc:
        return "", 0
    paired = None
    if outcomes is not None:  # (--paired: the 2 x 2 table of the two models' answers, prompt by prompt)
        paired = paired_cell(outcomes.get(first, {}).get((task, key)), outcomes.get(second, {}).get((task, key)),
                             ((a, na), (c, nc)))
    d, lo, hi = paired or difference_interval(a, na, c, nc)
    sign = 1 if lo > 0 else -1 if hi < 0 else 0
    return (f"{d:+.2f} [{lo:+.2f}, {hi:+.2f}]" + (" *" if sign else "")
            + (" u" if outcomes is not None and paired is None else "")), sign


def pair_tables(payload: dict[str, Any], pairs: list[tuple[str, str]], outcomes: Outcomes | None = None) -> list[str]:
    """Markdown lines for ``--pair``: each named pair's difference (first minus second, whatever their selectors, K or
    seeds) per length and task, then how many cells each is ahead and behind on (95 % interval excluding 0)."""
    if not pairs:
        return []
    tasks = payload.get("tasks") or sorted({t for s in payload["scores"].values() for t in s})
    counted = {p: [0, 0, 0] for p in pairs}  # ahead, behind, cells
    out: list[str] = []
    for length in _lengths(payload):
        lines = []
        for first, second in pairs:
            got = [difference_cell(payload, first, second, t, length, outcomes) for t in tasks]
            for cell, sign in got:
                if cell:
                    counted[first, second][0 if sign > 0 else 1 if sign < 0 else 2] += 1
            if any(cell for cell, _ in got):
                lines.append(f"| {first} - {second} | " + " | ".join(cell for cell, _ in got) + " |")
        if lines:
            out += [f"### {length} tokens: named pairs (95 % interval; * excludes 0{_how(outcomes)})", "",
                    "| models | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks), *lines, ""]
    out += ["### named pairs: cells whose 95 % interval excludes 0", "", "| models | ahead | behind | cells |",
            "|---|---|---|---|"]
    out += [f"| {a} - {b} | {up} | {down} | {up + down + level} |" for (a, b), (up, down, level) in counted.items()]
    return out + [""]


def end_levels(ends: list[dict], point) -> dict[str, tuple[int, float]]:
    """{teacher or all_linear: (K, level)} of the plot's ends: the mean score where there are several models of
    one (the all-linear students of two seeds), from ``point(row)`` -> (K, score, ...) or None."""
    out = {}
    for s in (TEACHER, ALL_LINEAR):
        pts = [p for r in ends if r["selector"] == s and (p := point(r))]
        if pts:
            out[s] = (pts[0][0], sum(p[1] for p in pts) / len(pts))
    return out


def plot(payload: dict[str, Any], rows: list[dict], task: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scores, counts = payload["scores"], payload.get("prompts", {})
    lengths = sorted({int(m) for r in rows for m in scores.get(r["model"], {}).get(task, {}) if m.isdigit()})
    if not lengths:
        raise ConfigError("recall-vs-k --task", task, f"no model has a score for it; tasks: {payload.get('tasks')}")
    fig, axes = plt.subplots(1, len(lengths), figsize=(4.2 * len(lengths), 3.6), squeeze=False)
    ends = [r for r in rows if r.get("matched", True) and r["selector"] in (TEACHER, ALL_LINEAR)]
    # a line per selector through its hybrids (one two rules explain, "uniform=ga_s2", on both lines); one that no
    # selector explains alone, under its name (which may be a selector's: it is not that selector's point)
    series: dict[str, list[dict]] = {}
    baselines = [r for r in rows if r.get("baseline")]  # (models that are not hybrids, besides the teacher: levels)
    for r in rows:
        if r in ends or r in baselines:
            continue
        for s in r["selector"].split("=") if r.get("matched", True) else [f"{r['model']} (no selector)"]:
            series.setdefault(s, []).append(r)
    for ax, length in zip(axes[0], lengths):
        def point(r):
            v = scores.get(r["model"], {}).get(task, {}).get(str(length))
            n = counts.get(r["model"], {}).get(task, {}).get(str(length), 0)
            if v is None or v < 0:
                return None
            lo, hi = wilson_interval(v, n) if n else (v, v)
            return r["k"], v, v - lo, hi - v

        end_pts = end_levels(ends, point)
        for i, (s, members) in enumerate(sorted(series.items())):
            pts = [p for r in members if (p := point(r))]
            if not pts:
                continue
            ks = sorted({p[0] for p in pts})
            mean = [sum(p[1] for p in pts if p[0] == k) / sum(1 for p in pts if p[0] == k) for k in ks]
            line_x, line_y = ks, mean
            if ALL_LINEAR in end_pts:
                line_x, line_y = [0, *line_x], [end_pts[ALL_LINEAR][1], *line_y]
            ax.plot(line_x, line_y, color=f"C{i}", lw=1.2, label=s)
            ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[[p[2] for p in pts], [p[3] for p in pts]],
                        fmt="o", ms=4, color=f"C{i}", capsize=2)
        for s, ls in ((TEACHER, "--"), (ALL_LINEAR, ":")):
            if s in end_pts:
                ax.axhline(end_pts[s][1], color="k", ls=ls, lw=0.8, label=f"{s} (K = {end_pts[s][0]})")
        for r in baselines:
            if p := point(r):
                ax.axhline(p[1], color="0.5", ls="-.", lw=0.8, label=f"{r['model']} (not a hybrid)")
        L = max(r["k"] for r in rows)
        ax.set(xlabel="K (softmax layers)", ylabel=f"{task} score", ylim=(-0.02, 1.02), xlim=(-0.5, L + 0.5),
               title=f"{length} tokens")
        ax.set_xticks(sorted({0, L, *(r["k"] for r in rows)}))
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"recall vs K ({task}; bars: 95 % Wilson intervals)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="ds-hybrid recall-vs-k", description=__doc__.split("\n\n")[0],
                                 epilog=__doc__.split("\n\n", 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("eval", help="an eval.json (or its folder) of `ds-hybrid eval` or `ds-hybrid eval-merge`")
    ap.add_argument("--selection", action="append", default=[], metavar="NAME=PATH",
                    help="a selector's selection.json (repeatable); uniform and smart are built in")
    ap.add_argument("--task", default=None, help="the task plotted (default: the eval's first)")
    ap.add_argument("--against", default="uniform", metavar="SELECTOR[,SELECTOR]",
                    help="the selectors every other one is compared with at the same K (default: uniform; e.g. "
                         "uniform,ga_s2 for the baselines against KL-guided selection too); teacher or all_linear: "
                         "every hybrid against that model, whatever its K")
    ap.add_argument("--paired", action="store_true",
                    help="differences from each pair's answers prompt by prompt (the samples files beside the eval.json "
                         "or a merge's sources; Newcombe 1998b), where both have them: narrower where two models "
                         "get the same prompts right; without it the two sets of answers are taken as independent")
    ap.add_argument("--strict", action="store_true",
                    help="use the strict scores (the first answer given must be the gold, whole) instead of RULER's "
                         "string match")
    ap.add_argument("--pair", action="append", default=[], metavar="FIRST:SECOND",
                    help="two models of the eval by name (repeatable): FIRST minus SECOND on every task and length, "
                         "whatever their selectors, K or seeds, and the count of cells where it excludes 0")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    src = Path(args.eval)
    src = src / "eval.json" if src.is_dir() else src
    if not src.is_file():
        raise ConfigError("recall-vs-k", args.eval, "no eval.json there: give an output of `ds-hybrid eval` or "
                          "`ds-hybrid eval-merge`")
    out = out_folder(args.out)
    try:
        payload = json.loads(src.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError("recall-vs-k", str(src), f"not valid JSON ({e})") from None
    if not isinstance(payload, dict) or not payload.get("models") or "scores" not in payload:
        raise ConfigError("recall-vs-k", str(src), "not an eval.json with a 'models' record and 'scores'")
    if args.strict:
        if not payload.get("strict_scores"):
            raise ConfigError("recall-vs-k --strict", str(src), "holds no strict scores: merge the evals again with "
                              "this version of `ds-hybrid eval-merge` (it computes them from the samples files)")
        payload = {**payload, "scores": payload["strict_scores"]}
    selections = {}
    for item in args.selection:
        if "=" not in item:
            raise ConfigError("recall-vs-k --selection", item, "write NAME=PATH (e.g. ga_s2=out/select/ga_s2/selection.json)")
        name, path = item.split("=", 1)
        if not name or name in selections or name in ("uniform", "smart", TEACHER, ALL_LINEAR):
            raise ConfigError("recall-vs-k --selection", item, "give each selection a name of its own (not empty, "
                              "not twice, not uniform or smart: those are the built-in spacing rules; not teacher "
                              "or all_linear: the ends of the plot)")
        selections[name] = read_selection(path, "recall-vs-k --selection")
    unrecorded = sorted(set(payload["scores"]) - set(payload["models"]))
    if unrecorded:
        raise ConfigError("recall-vs-k", str(src), f"models {unrecorded} have scores but no record of their layers "
                          "in 'models': evaluate them again with this version of `ds-hybrid eval`")
    rows = place_models(payload["models"], selections)
    task = args.task or (payload.get("tasks") or [None])[0]
    if not any(str(k).isdigit() for r in rows for k in payload["scores"].get(r["model"], {}).get(task, {})):
        raise ConfigError("recall-vs-k --task", task, f"no model has a score for it by length; tasks: "
                          f"{payload.get('tasks')}")
    against = tuple(dict.fromkeys(a for a in args.against.split(",") if a))
    if not against:
        raise ConfigError("recall-vs-k --against", args.against, "name at least one selector (e.g. uniform)")
    known = {s for r in rows if r.get("matched", True) for s in r["selector"].split("=")} | {"uniform", "smart",
                                                                                               *selections}
    if unknown := [a for a in against if a not in known]:
        raise ConfigError("recall-vs-k --against", unknown[0], f"no such selector; known: {sorted(known)}")
    for a in against:  # (said, not refused: the default, uniform, may simply not be among the models)
        if not any(a in r["selector"].split("=") for r in rows):
            print(f"--against {a}: no model of this eval is explained by it, so no differences to it; selectors of "
                  f"its models: {sorted({s for r in rows for s in r['selector'].split('=')})}")
    pairs = []
    for item in args.pair:
        first, sep, second = item.partition(":")
        if not sep or first == second or {first, second} - set(payload["scores"]):
            raise ConfigError("recall-vs-k --pair", item, f"write FIRST:SECOND, two models of the eval; its models: "
                              f"{sorted(payload['scores'])}")
        if (first, second) not in pairs:  # (a pair given twice: one row, counted once)
            pairs.append((first, second))
    out.mkdir(parents=True, exist_ok=True)
    outcomes = prompt_outcomes(payload, src, args.strict) if args.paired else None
    md = tables(payload, rows, against, outcomes, pairs)
    atomic_write_text(out / "recall_vs_k.md", md)
    atomic_write_text(out / "recall_vs_k.json", json.dumps({"source": str(src), "task": task, "models": rows,
                                                            "selections": {n: p.split("=", 1)[1] for n, p in
                                                                           zip(selections, args.selection)}}, indent=1))
    plot(payload, rows, task, out / "recall_vs_k.png")
    print(md)
    unmatched = [r["model"] for r in rows if r.get("matched") is False and not r.get("baseline")]
    if unmatched:
        print(f"hybrids no selector explains (listed under their names): {unmatched}")
    return 0
