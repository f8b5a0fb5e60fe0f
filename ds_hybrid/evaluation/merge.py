"""``ds-hybrid eval-merge``: one table from several ``ds-hybrid eval`` outputs.

    ds-hybrid eval-merge runs/eval_teacher_2048 runs/eval_teacher_4096 runs/eval_uniform8_2048 \
        runs/eval_uniform8_quality --out outputs/eval_uniform8

GPU campaigns evaluate one model and one length per job so that a lost machine keeps what finished; this joins the
pieces: the scores, prompt counts, 95 % intervals and held-out quality of every model, side by side in eval.md, with
recall_vs_length.png, and the sources (file, date, device, CUDA graphs or not, limit) listed in eval.json. A model
may appear in several files as long as no score is given twice with different values; ``NEW=OLD@path`` renames
model OLD of that file on the way in (two seeds of one recipe evaluated under the same name, say).

Scores are set side by side only where they come from the same prompts: every model's scores of a task and length
must have the same prompt digests (eval.json's ``prompt_digests``; for an eval.json written before them, the answers
of its ``samples_<model>.jsonl[.gz]`` beside it), else the merge is refused, naming the two sources
(``--allow-other-prompts`` merges them anyway and lists the cells in eval.json's ``prompts_differ``; a model with
neither digests nor samples is merged with a warning and listed in ``prompts_unchecked``). Held-out
quality rows must come from the same held-out settings. The strict scores (the first answer must be the gold) are
carried, or computed from the samples files where an eval.json predates them.
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import sys
import zlib
from pathlib import Path
from typing import Any

from ds_hybrid.errors import ConfigError, out_folder
from ds_hybrid.evaluation import recall, report

log = logging.getLogger("ds_hybrid")

# eval.json's "heldout_rows": each model's held-out rows are in its own tokenizer's ids (since 2026-12-06; an
# eval.json without it was written when every model read the first model's ids)
HELDOUT_ROWS = "per_tokenizer"


def stale_heldout_models(payload: dict) -> list[str]:
    """The models of an eval.json whose held-out quality was measured on another tokenizer's ids: in a file written
    before ``heldout_rows`` was recorded, those whose tokenizer is not the first model's (their perplexity and KL
    measure nothing). A model with no tokenizer recorded is not counted stale (such files are of one tokenizer)."""
    if payload.get("heldout_rows") == HELDOUT_ROWS:
        return []
    models = payload.get("models") or {}
    first = next((info.get("tokenizer") for info in models.values()), None)
    quality = payload.get("heldout_quality") or {}
    return [m for m, info in models.items() if m in quality and first is not None
            and info.get("tokenizer") not in (None, first)]


def _without_bos(q: dict) -> dict:
    """A quality record without ``row_bos`` (compared on its own)."""
    return {k: v for k, v in q.items() if k != "row_bos"}


def _load(item: str) -> tuple[dict[str, str], Path, dict[str, Any]]:
    """'[new=old@]path' -> (renames, eval.json path, payload)."""
    renames: dict[str, str] = {}
    spec = item
    if "@" in item and not Path(item).exists():
        rename, spec = item.split("@", 1)
        if "=" not in rename:
            raise ConfigError("eval-merge", item, "write a rename as NEW=OLD@path (e.g. hybrid=uniform8@out/eval)")
        new, old = rename.split("=", 1)
        if not new or not old:
            raise ConfigError("eval-merge", item, "write a rename as NEW=OLD@path, both names given")
        renames[old] = new
    path = Path(spec)
    if path.is_dir():
        path = path / "eval.json"
    if not path.is_file():
        raise ConfigError("eval-merge", item, "no eval.json there: give an output folder of `ds-hybrid eval` or its "
                          "eval.json")
    try:
        payload = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError("eval-merge", str(path), f"not valid JSON ({e})") from None
    scores = payload.get("scores") if isinstance(payload, dict) else None
    if not isinstance(scores, dict) or not all(isinstance(t, dict) and all(isinstance(r, dict) for r in t.values())
                                               for t in scores.values()):
        raise ConfigError("eval-merge", str(path), "not an eval.json of `ds-hybrid eval` (its 'scores' are not "
                          "{model: {task: {length or metric: value}}})")
    if unknown := sorted(set(renames) - set(scores)):
        raise ConfigError("eval-merge", item, f"renames {unknown}, which {path} does not hold (it holds "
                          f"{sorted(scores)})")
    return renames, path, payload


def _put(table: dict, model: str, task: str, metric: str, value: Any, where: dict, src: Path, what: str) -> None:
    cell = table.setdefault(model, {}).setdefault(task, {})
    if metric in cell and cell[metric] != value:
        raise ConfigError("eval-merge", str(src), f"{what} of {model}/{task}/{metric} is {value} here but "
                          f"{cell[metric]} in {where[(model, task, metric)]}: rename one model (NEW=OLD@path)")
    cell[metric] = value
    where[(model, task, metric)] = src


def _model_record(info: dict) -> dict:
    """What makes two eval records the same model: its kind, layers, softmax layers and mixer."""
    return {k: info.get(k) for k in ("model_type", "num_layers", "softmax_layers", "mixer")}


def _other_model(a: dict, b: dict) -> str | None:
    """Why two eval records of one name are not one model (None: nothing says they differ): :func:`_model_record`,
    then, where both records have them, the weights' content fingerprint (two seeds, kl and finetune of one layer
    list: every stage exports to a folder named hf, and a campaign's paths repeat on every machine) and the mixer's
    options (its kernel backend aside)."""
    if _model_record(a) != _model_record(b):
        return f"{_model_record(a)} against {_model_record(b)}"
    if a.get("weights") and b.get("weights") and a["weights"] != b["weights"]:
        return f"weights {a['weights']} against {b['weights']} (content fingerprints)"
    if a.get("mixer_options") is not None and b.get("mixer_options") is not None:
        from ds_hybrid.modeling.mixers import MixerOptions

        try:  # (an option a record lacks is at its default: older versions had fewer; the kernel backend aside)
            differ = MixerOptions.from_dict(a["mixer_options"]).differences(MixerOptions.from_dict(b["mixer_options"]),
                                                                            a.get("mixer") or "gdn")
        except ConfigError:  # (a record of a newer version, options this one does not know: not compared)
            differ = []
        if differ:
            return "mixer options " + ", ".join(f"{k}: {a['mixer_options'].get(k)} against "
                                                f"{b['mixer_options'].get(k)}" for k in differ)
    return None


def _samples(src: Path, model: str) -> list[dict] | None:
    """The per-prompt records of ``model`` beside an eval.json (samples_<model>.jsonl, or .jsonl.gz), if kept."""
    for name in (f"samples_{model}.jsonl", f"samples_{model}.jsonl.gz"):
        p = src.parent / name
        if p.is_file():
            opener = gzip.open if name.endswith(".gz") else open
            try:
                with opener(p, "rt", encoding="utf-8") as f:
                    recs = [json.loads(line) for line in f if line.strip()]
            except (OSError, EOFError, zlib.error, UnicodeDecodeError, json.JSONDecodeError) as e:  # (cut short,
                # damaged, or not ours)
                print(f"eval-merge: {p} is unreadable ({type(e).__name__}: {e}): its prompts are not compared, no "
                      "strict score is computed from it", file=sys.stderr)
                return None
            if all(isinstance(r, dict) and {"task", "id", "gold", "generation"} <= set(r) for r in recs):
                return recs
            print(f"eval-merge: {p} is not a samples file of `ds-hybrid eval` (records without task, id, gold, "
                  "generation): its prompts are not compared, no strict score is computed from it", file=sys.stderr)
    return None


def prompt_differences(digests: dict[str, dict], tokenizers: dict[str, str | None], src: Path) -> list[dict]:
    """The (task, length) cells where models of one tokenizer in one evaluation read other prompts than an earlier
    model of it (``eval`` records them in eval.json as ``prompt_mismatch``; their scores are not comparable)."""
    seen: dict = {}
    differ: list = []
    for model, per_task in digests.items():
        _check_prompts(seen, model, tokenizers.get(model), per_task, src, True, differ)
    return differ


def _check_prompts(digests: dict, model: str, tokenizer: str | None, per_task: dict, src: Path, allow: bool,
                   differ: list) -> None:
    """Every model's scores of a (task, length) come from one set of prompts: compare with what came before. RULER
    sizes its prompts with each model's tokenizer (and draws while sizing), so models of other tokenizers get other
    prompts by design: those are not compared (a model recorded without its tokenizer is compared with all)."""
    for task, row in per_task.items():
        for key, d in row.items():
            seen = digests.setdefault((task, key), [])
            for kind in ("golds", "prompts"):
                if kind not in d:
                    continue
                for other in seen:
                    same_tok = tokenizer is None or other["tokenizer"] is None or tokenizer == other["tokenizer"]
                    if not same_tok or kind not in other["d"] or other["d"][kind] == d[kind]:
                        continue
                    if not allow:
                        raise ConfigError("eval-merge", str(src), f"{model}'s {task} at {key} comes from other prompts "
                                          f"({kind} digest {d[kind]}) than {other['model']}'s in {other['src']} "
                                          f"({other['d'][kind]}): their scores are not comparable. Evaluate both "
                                          "with the same tasks, lengths, limit and haystack (ruler_cwe: in runs "
                                          "of 2026-12-06 or later; before, a run's second model drew other "
                                          "prompts), or pass --allow-other-prompts")
                    differ.append({"task": task, "length": key, "model": model, "file": str(src),
                                   "differs_from": {"model": other["model"], "file": str(other["src"])},
                                   "kind": kind})
                    break
            seen.append({"d": d, "model": model, "src": src, "tokenizer": tokenizer})


def merge(items: list[str], allow_other_prompts: bool = False) -> dict[str, Any]:
    """The merged payload (eval.json's keys, less ``complete``; plus ``sources``, and ``partial_sources`` where an
    input was a partial evaluation)."""
    if not items:
        raise ConfigError("eval-merge", items, "give at least one eval output folder or eval.json")
    scores: dict = {}
    counts: dict = {}
    quality: dict[str, dict] = {}
    models: dict[str, dict] = {}
    truncated: dict = {}
    sources: list[dict[str, Any]] = []
    seen: dict = {}
    seen_n: dict = {}
    seen_strict: dict = {}
    lengths: set[int] = set()
    tasks: list[str] = []
    versions = None
    strict: dict = {}
    digests: dict = {}
    all_digests: dict = {}
    differ: list = []
    heldout = None
    fill: dict = {}
    ruler_cut: dict = {}
    seen_fill: dict = {}
    seen_cut: dict = {}
    seen_trunc: dict = {}
    partial: list[str] = []
    dropped: list[dict] = []  # held-out quality measured on another tokenizer's ids (stale_heldout_models)
    unchecked: list[dict] = []  # models whose prompts could not be compared (no digests, no samples)
    for item in items:
        renames, src, p = _load(item)
        name = lambda m: renames.get(m, m)  # noqa: E731
        if p.get("complete") is False:  # a run that died after some of its models: theirs are whole, kept
            partial.append(str(src))
            log.warning("%s is a partial evaluation (its run stopped after %s): those models' scores are merged",
                        src, ", ".join(p["scores"]) or "no model")
        for m, per_task in (p.get("ruler_fill") or {}).items():
            for task, row in per_task.items():
                fill.setdefault(name(m), {}).setdefault(task, {})
                for length, v in row.items():
                    _put(fill, name(m), task, length, v, seen_fill, src, "the RULER fill")
        for m, per_task in (p.get("ruler_truncated") or {}).items():  # (files written since 2026-12-06)
            ruler_cut.setdefault(name(m), {})  # (a model with none truncated is kept: checked, not unrecorded)
            for task, row in per_task.items():
                ruler_cut[name(m)].setdefault(task, {})
                for length, v in row.items():
                    _put(ruler_cut, name(m), task, length, v, seen_cut, src, "the truncated RULER prompt count")
        for m in p["scores"]:
            samples = None
            d = (p.get("prompt_digests") or {}).get(m)
            st = (p.get("strict_scores") or {}).get(m)
            if (d is None or st is None) and p["scores"][m]:  # (a model with no recall scores has no samples: a
                # samples file beside it is an earlier evaluation's in a reused folder)
                samples = _samples(src, m)
                scored = (p.get("prompts") or {}).get(m)
                if samples and scored and recall.sample_counts(samples) != scored:  # (a file cut at a line's end)
                    print(f"eval-merge: {src.parent}'s samples of {m} do not hold every prompt its scores count (a "
                          "file cut short?): its prompts are not compared, no strict score is computed from it",
                          file=sys.stderr)
                    samples = None
            if d is None and samples:
                d = recall.prompt_digests(samples)
            if st is None and samples:
                st = recall.strict_scores(samples)
            if not d and p["scores"][m]:  # (neither digests nor a samples file: nothing to compare the prompts by)
                log.warning("%s: %s has no prompt digests and no samples file beside it: its prompts are not checked "
                            "against the other models'", src, m)
                unchecked.append({"model": name(m), "file": str(src)})
            if d:
                tok = ((p.get("models") or {}).get(m) or {}).get("tokenizer")
                _check_prompts(digests, name(m), tok, d, src, allow_other_prompts, differ)
                for task, row in d.items():  # every length of every file (a file holds one length, say)
                    all_digests.setdefault(name(m), {}).setdefault(task, {}).update(row)
            for task, row in (st or {}).items():
                for metric, v in row.items():
                    _put(strict, name(m), task, metric, v, seen_strict, src, "the strict score")
        if p.get("heldout_quality"):
            h = p.get("heldout")
            if h is not None and heldout is not None and h != heldout[0]:
                raise ConfigError("eval-merge", str(src), f"its held-out quality rows come from {h}, those of "
                                  f"{heldout[1]} from {heldout[0]}: evaluate them on the same held-out settings")
            if h is not None and heldout is None:
                heldout = (h, src)
        versions = versions or p.get("versions")
        sources.append({"file": str(src), **{k: p.get(k) for k in ("date", "device", "dtype", "cuda_graphs", "limit",
                                                                    "seed", "lengths", "window")},
                        "models": [name(m) for m in p["scores"]], **({"renames": renames} if renames else {})})
        lengths.update(int(x) for x in p.get("lengths", []))
        tasks += [t for t in p.get("tasks", []) if t not in tasks]
        for m, per_task in p["scores"].items():
            for task, row in per_task.items():
                for metric, v in row.items():
                    _put(scores, name(m), task, metric, v, seen, src, "the score")
                    n = p.get("prompts", {}).get(m, {}).get(task, {}).get(metric)
                    if n is not None:
                        _put(counts, name(m), task, metric, n, seen_n, src, "the prompt count")
        stale = stale_heldout_models(p)
        if stale:
            log.warning("%s: held-out quality of %s left out (measured on the first model's tokenizer's ids, as "
                        "evaluations before 2026-12-06 did; evaluate them again for theirs)", src, ", ".join(stale))
            dropped += [{"model": name(m), "file": str(src)} for m in stale]
        for m, q in (p.get("heldout_quality") or {}).items():
            if m in stale:
                continue
            if name(m) in quality and quality[name(m)].get("row_bos") != q.get("row_bos"):
                raise ConfigError("eval-merge", str(src), f"held-out quality of {name(m)} here is of rows that start "
                                  f"with token {q.get('row_bos')}, an earlier file's with {quality[name(m)].get('row_bos')} "
                                  "(row_bos; None: no BOS): evaluate one again with --resume (it computes the "
                                  "quality on today's rows)")
            if name(m) in quality and _without_bos(quality[name(m)]) != _without_bos(q):
                raise ConfigError("eval-merge", str(src), f"held-out quality of {name(m)} differs from an earlier "
                                  "file's: rename one model (NEW=OLD@path)")
            quality[name(m)] = q
        for m, info in (p.get("models") or {}).items():
            why = _other_model(info, models[name(m)]) if name(m) in models else None
            if why:
                raise ConfigError("eval-merge", str(src), f"model {name(m)} here is not the {name(m)} of an earlier file "
                                  f"({why}): rename one (NEW=OLD@path)")
            if name(m) in models:  # (what an older record lacks, a later one gives: compared from then on)
                models[name(m)] = {**models[name(m)], **{k: info[k] for k in ("weights", "mixer_options")
                                                         if models[name(m)].get(k) is None and info.get(k) is not None}}
            models.setdefault(name(m), info)
        for task, per_model in (p.get("truncated_prompts") or {}).items():  # {task: {model: n}}
            for m, k in per_model.items():
                if truncated.get(task, {}).get(name(m), k) != k:
                    raise ConfigError("eval-merge", str(src), f"the truncated prompt count of {name(m)}/{task} is {k} "
                                      f"here but {truncated[task][name(m)]} in {seen_trunc[(task, name(m))]}: rename "
                                      "one model (NEW=OLD@path)")
                truncated.setdefault(task, {})[name(m)] = k
                seen_trunc.setdefault((task, name(m)), src)
    # models of one tokenizer read the same held-out rows: rows that start with another token (another data.bos; a
    # file of before 2026-12-08 read them without BOS, row_bos absent) are other rows
    starts: dict[str, dict[Any, list[str]]] = {}
    for m, q in quality.items():
        starts.setdefault(str((models.get(m) or {}).get("tokenizer")), {}).setdefault(q.get("row_bos"), []).append(m)
    unknown = starts.get("None", {})
    if unknown and any(b is not None for t, per in starts.items() if t != "None" for b in per):
        log.warning("eval-merge: %s record no tokenizer (files of before 2026-12-06) and were read without BOS; "
                    "beside them, models whose held-out rows start with one: if theirs are of one tokenizer, their "
                    "perplexities are of other rows", ", ".join(sorted(m for ms in unknown.values() for m in ms)))
    for per in starts.values():
        if len(per) > 1:
            raise ConfigError("eval-merge", ", ".join(sorted(m for ms in per.values() for m in ms)), "models of one "
                              "tokenizer whose held-out rows start otherwise (row_bos " + "; ".join(
                                  f"{b}: {', '.join(sorted(ms))}" for b, ms in per.items()) + "): evaluate them "
                              "again with --resume (it computes their held-out quality on today's rows)")
    out = {"versions": versions, "sources": sources, "lengths": sorted(lengths), "tasks": tasks, "models": models,
           "scores": scores, "prompts": counts, "ci95": report.intervals(scores, counts), "strict_scores": strict,
           "prompt_digests": all_digests, "heldout_quality": quality, "heldout_rows": HELDOUT_ROWS,
           "heldout": heldout[0] if heldout else None,
           "truncated_prompts": truncated, "ruler_fill": fill, "ruler_truncated": ruler_cut}
    if partial:
        out["partial_sources"] = partial
    if dropped:
        out["heldout_quality_left_out"] = dropped
    if differ:
        out["prompts_differ"] = differ
    if unchecked:
        out["prompts_unchecked"] = unchecked
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="ds-hybrid eval-merge", description=__doc__.split("\n\n")[0],
                                 epilog=__doc__.split("\n\n", 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("evals", nargs="+", help="output folders of `ds-hybrid eval` (or their eval.json); "
                    "NEW=OLD@folder renames model OLD")
    ap.add_argument("--out", required=True, help="folder for eval.json, eval.md and recall_vs_length.png")
    ap.add_argument("--allow-other-prompts", action="store_true",
                    help="merge scores of one task and length that come from other prompts (listed in prompts_differ)")
    args = ap.parse_args(argv)
    out = out_folder(args.out)
    if any(Path(i.split("@", 1)[-1]).expanduser().resolve() in (out.resolve(), out.resolve() / "eval.json")
           for i in args.evals):
        raise ConfigError("--out", args.out, "is one of the evals being merged: write the merge to another folder")
    payload = merge(args.evals, args.allow_other_prompts)
    md = report.recall_table(payload["scores"], payload["heldout_quality"], payload["prompts"])
    if any(payload["strict_scores"].values()):
        md += ("\n\nstrict (the first answer given must be the gold, whole):\n\n"
               + report.recall_table(payload["strict_scores"], {}, payload["prompts"]))
    if payload.get("prompts_differ"):
        md += "\n\n**scores from other prompts set side by side** (--allow-other-prompts): " + json.dumps(
            payload["prompts_differ"])
    if any(k for d in payload["truncated_prompts"].values() for k in d.values()):
        md += "\n\nprompts longer than the evaluation length: " + json.dumps(payload["truncated_prompts"])
    cut = {m: c for m, c in (payload.get("ruler_truncated") or {}).items() if c}
    if cut:
        md += "\n\nRULER prompts left-truncated by lm-eval (scored anyway): " + json.dumps(cut)
    report.write(out, "eval", payload, md)
    if any(k.isdigit() for s in payload["scores"].values() for d in s.values() for k in d):
        report.plot_recall(payload["scores"], out / "recall_vs_length.png")
    print(md)
    return 0
