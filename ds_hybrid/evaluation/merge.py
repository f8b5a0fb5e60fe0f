"""``ds-hybrid eval-merge``: one table from several ``ds-hybrid eval`` outputs.

    ds-hybrid eval-merge runs/eval_teacher_2048 runs/eval_teacher_4096 runs/eval_uniform8_2048 \
        runs/eval_uniform8_quality --out outputs/eval_uniform8

GPU campaigns evaluate one model and one length per job so that a lost machine keeps what finished; this joins the
pieces: the scores, prompt counts, 95 % intervals and held-out quality of every model, side by side in eval.md, with
recall_vs_length.png, and the sources (file, date, device, CUDA graphs or not, limit) listed in eval.json. A model
may appear in several files as long as no score is given twice with different values; ``NEW=OLD@path`` renames
model OLD of that file on the way in (two seeds of one recipe evaluated under the same name, say).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ds_hybrid.errors import ConfigError, out_folder
from ds_hybrid.evaluation import report


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


def merge(items: list[str]) -> dict[str, Any]:
    """The merged payload (same keys as eval.json, plus 'sources')."""
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
    lengths: set[int] = set()
    tasks: list[str] = []
    versions = None
    for item in items:
        renames, src, p = _load(item)
        name = lambda m: renames.get(m, m)  # noqa: E731
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
        for m, q in (p.get("heldout_quality") or {}).items():
            if name(m) in quality and quality[name(m)] != q:
                raise ConfigError("eval-merge", str(src), f"held-out quality of {name(m)} differs from an earlier "
                                  "file's: rename one model (NEW=OLD@path)")
            quality[name(m)] = q
        for m, info in (p.get("models") or {}).items():
            if name(m) in models and _model_record(models[name(m)]) != _model_record(info):
                raise ConfigError("eval-merge", str(src), f"model {name(m)} here is not the {name(m)} of an earlier file "
                                  f"({_model_record(info)} against {_model_record(models[name(m)])}): rename one "
                                  "(NEW=OLD@path)")
            models.setdefault(name(m), info)
        for task, per_model in (p.get("truncated_prompts") or {}).items():
            for m, k in per_model.items():
                truncated.setdefault(task, {})[name(m)] = k
    return {"versions": versions, "sources": sources, "lengths": sorted(lengths), "tasks": tasks, "models": models,
            "scores": scores, "prompts": counts, "ci95": report.intervals(scores, counts), "heldout_quality": quality,
            "truncated_prompts": truncated}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="ds-hybrid eval-merge", description=__doc__.split("\n\n")[0],
                                 epilog=__doc__.split("\n\n", 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("evals", nargs="+", help="output folders of `ds-hybrid eval` (or their eval.json); "
                    "NEW=OLD@folder renames model OLD")
    ap.add_argument("--out", required=True, help="folder for eval.json, eval.md and recall_vs_length.png")
    args = ap.parse_args(argv)
    out = out_folder(args.out)
    if any(Path(i.split("@", 1)[-1]).expanduser().resolve() in (out.resolve(), out.resolve() / "eval.json")
           for i in args.evals):
        raise ConfigError("--out", args.out, "is one of the evals being merged: write the merge to another folder")
    payload = merge(args.evals)
    md = report.recall_table(payload["scores"], payload["heldout_quality"], payload["prompts"])
    if any(k for d in payload["truncated_prompts"].values() for k in d.values()):
        md += "\n\nprompts longer than the evaluation length: " + json.dumps(payload["truncated_prompts"])
    report.write(out, "eval", payload, md)
    if any(k.isdigit() for s in payload["scores"].values() for d in s.values() for k in d):
        report.plot_recall(payload["scores"], out / "recall_vs_length.png")
    print(md)
    return 0
