"""Recall evaluation through lm-evaluation-harness, offline, on models built in-process.

RULER tasks that need no download (niah_single_1, niah_multikey_2, niah_multikey_3, ruler_vt, ruler_cwe, ruler_fwe)
run on lm-eval's own generators at the lengths asked for, with the model's tokenizer. The essay-haystack NIAH
variants (``niah_essay_single``, ``niah_essay_multikey``) use lm-eval's generator on a local haystack
(:mod:`ds_hybrid.evaluation.haystack`). SWDE and FDA ("based" recall tasks) read local JSON/JSONL/parquet files.

Each RULER task is given as a task config (not by name) so that any list of lengths gets its own metric; the
scoring functions are lm-eval's (string match over every gold answer anywhere in the 128 generated tokens). Beside
them, :func:`strict_score` (the first answer the model gives must be the gold, matched whole) is kept per prompt and
reported as ``strict_scores``: RULER's metric credits a right value said after a wrong one, or inside a longer one.

Which prompts a score comes from is recorded (:func:`prompt_digests`): lm-eval's generators draw from one seeded
stream, so a task's prompts depend on the tasks, lengths, limit and haystack of the run; ``ds-hybrid eval-merge``
refuses to set side by side scores of one task and length that come from other prompts.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib
import json
import os
import re
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from ds_hybrid.errors import ConfigError

RULER_TASKS: dict[str, tuple[str, str, int]] = {
    # name: (module, generator, max_gen_toks) -- as lm-eval's YAMLs
    "niah_single_1": ("niah_utils", "niah_single_1", 128),
    "niah_multikey_2": ("niah_utils", "niah_multikey_2", 128),
    "niah_multikey_3": ("niah_utils", "niah_multikey_3", 128),
    "ruler_vt": ("vt_utils", "get_vt_dataset", 30),
    "ruler_cwe": ("cwe_utils", "get_cw_dataset", 120),
    "ruler_fwe": ("fwe_utils", "fwe_download", 50),
}
# the text between a RULER question and its gen_prefix: " " in lm-eval's YAMLs, but for cwe (cwe.yaml)
TARGET_DELIMITERS = {"ruler_cwe": "\n\n"}
ESSAY_TASKS: dict[str, dict[str, Any]] = {
    "niah_essay_single": dict(type_needle_k="words", type_needle_v="numbers", num_needle_k=1),
    "niah_essay_multikey": dict(type_needle_k="words", type_needle_v="numbers", num_needle_k=4),
    "niah_essay_uuid": dict(type_needle_k="words", type_needle_v="uuids", num_needle_k=1),
}
# lm-eval's RULER wrappers draw 500 samples per length whatever --limit says; this is the generator each module's
# wrapper calls, so a limited run can draw only what it keeps (minutes saved per model at 4k+ tokens)
RULER_SAMPLES = 500
RULER_GENERATORS = {"niah_utils": "generate_samples", "cwe_utils": "sys_word_pair_random", "fwe_utils": "sys_kwext",
                    "vt_utils": "sys_vartrack_w_noise_random"}
BASED_TASKS = ("swde", "fda")
BASED_MAX_GEN_TOKS = 48
SUITES = {
    "recall": list(RULER_TASKS) + list(ESSAY_TASKS),
    "ruler": list(RULER_TASKS),
    "niah": ["niah_single_1", "niah_multikey_2", "niah_multikey_3", *ESSAY_TASKS],
    # RULER's six NIAH variants; the three on Paul Graham's essays (single_2, single_3, multikey_1) on the local
    # haystack instead: niah_essay_single, niah_essay_uuid, niah_essay_multikey (issue 16's evaluation)
    "niah6": ["niah_single_1", "niah_essay_single", "niah_essay_uuid", "niah_essay_multikey", "niah_multikey_2",
              "niah_multikey_3"],
}


def prepare_offline() -> None:
    """Environment for offline lm-eval: no hub, a local punkt model (RULER's NIAH imports NLTK at import time)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    from ds_hybrid.evaluation.haystack import ensure_punkt

    ensure_punkt()


# ---- RULER ------------------------------------------------------------------------------------------------------
def _process_results(lengths: list[int], doc: dict, results: list[str]) -> dict[str, float]:
    from lm_eval.tasks.ruler.common_utils import postprocess_pred, string_match_all

    metrics = {str(L): -1.0 for L in lengths}
    metrics[str(doc["max_length"])] = string_match_all(postprocess_pred(results), [doc["outputs"]])
    return metrics


def _ruler_config(task: str, dataset_fn: Callable, lengths: list[int], tokenizer_path: str, max_gen_toks: int) -> dict:
    from lm_eval.tasks.ruler.common_utils import aggregate_metrics

    return {
        "task": task, "dataset_path": "", "test_split": "test", "output_type": "generate_until",
        "custom_dataset": dataset_fn,
        "metadata": {"max_seq_lengths": list(lengths), "tokenizer": tokenizer_path, "version": 1.0},
        "doc_to_text": "{{input}}", "doc_to_target": "{{outputs}}", "gen_prefix": "{{gen_prefix}}",
        "target_delimiter": TARGET_DELIMITERS.get(task, " "), "process_results": partial(_process_results, list(lengths)),
        "metric_list": [{"metric": str(L), "aggregation": aggregate_metrics, "higher_is_better": True}
                        for L in lengths],
        "generation_kwargs": {"do_sample": False, "temperature": 0.0, "max_gen_toks": max_gen_toks, "until": []},
        "repeats": 1,
    }


def _essay_dataset(spec: dict[str, Any], haystack: list[str], num_samples: int = RULER_SAMPLES, **kwargs) -> dict:
    from lm_eval.tasks.ruler.common_utils import get_tokenizer, resolve_tokenizer_name
    from lm_eval.tasks.ruler.niah_utils import TEMPLATE, download_dataset
    from lm_eval.tasks.ruler.prepare_niah import generate_samples

    lengths = kwargs.pop("max_seq_lengths")
    tok = get_tokenizer(resolve_tokenizer_name(kwargs))
    return download_dataset(
        generate_samples(haystack, max_seq_length=L, template=TEMPLATE, type_haystack="essay",
                         num_samples=min(num_samples, RULER_SAMPLES), TOKENIZER=tok, **spec)
        for L in lengths
    )


@contextlib.contextmanager
def capped_samples(module_name: str | None, cap: int | None):
    """While active, the RULER generator of ``lm_eval.tasks.ruler.<module_name>`` draws at most ``cap`` samples
    per call (its wrappers ask for 500)."""
    if module_name is None or cap is None:
        yield
        return
    module = importlib.import_module(f"lm_eval.tasks.ruler.{module_name}")
    name = RULER_GENERATORS[module_name]
    original = getattr(module, name)

    def capped(*args, **kwargs):
        kwargs["num_samples"] = min(kwargs.get("num_samples", RULER_SAMPLES), cap)
        return original(*args, **kwargs)

    setattr(module, name, capped)
    try:
        yield
    finally:
        setattr(module, name, original)


_MODULE_RNG_STATES: dict[str, object] = {}


def restore_module_rng(module_name: str | None) -> None:
    """lm-eval's ``cwe_utils`` shuffles each word list with a module-level ``random.Random(42)`` that nothing
    reseeds (lm-eval reseeds ``random`` and numpy per evaluation, not it): the second model of one process drew
    other ruler_cwe prompts than the first (the same golds, in another order). Each build now starts from the state
    the generator had before this process's first build, so every model of a run, and a run of one model, reads the
    same prompts."""
    if module_name is None:
        return
    import random

    rng = getattr(importlib.import_module(f"lm_eval.tasks.ruler.{module_name}"), "RNG", None)
    if isinstance(rng, random.Random):
        rng.setstate(_MODULE_RNG_STATES.setdefault(module_name, rng.getstate()))


def _per_length_limit(dataset_fn: Callable, limit: int | None, module_name: str | None = None, **kwargs) -> dict:
    """RULER generators put all samples of one length before the next; lm-eval's limit would then see only the
    first length. Keep the first ``limit`` samples of every length instead (and draw no more than that)."""
    restore_module_rng(module_name)
    with capped_samples(module_name, limit):
        data = dataset_fn(**kwargs)
    if limit is None:
        return data
    test = data["test"]
    seen: dict[int, int] = {}
    keep = []
    for i, L in enumerate(test["max_length"]):
        if seen.get(L, 0) < limit:
            keep.append(i)
            seen[L] = seen.get(L, 0) + 1
    return {"test": test.select(keep)}


def check_tasks(tasks: list[str]) -> None:
    """Every name a RULER or essay task, before any model is loaded (SWDE and FDA come from files: --swde, --fda)."""
    for t in tasks:
        if t in BASED_TASKS:
            raise ConfigError("--tasks", t, f"{t} reads a local file: pass --{t} FILE (JSON, JSONL or parquet in the "
                              "based-* layout) instead of naming it in --tasks")
        if t not in RULER_TASKS and t not in ESSAY_TASKS:
            raise ConfigError("--tasks", t, f"unknown task; known: {sorted(RULER_TASKS) + sorted(ESSAY_TASKS)} "
                              f"(and --swde / --fda FILE), or --suite {'/'.join(SUITES)}")


def ruler_configs(tasks: list[str], lengths: list[int], tokenizer_path: str, haystack: list[str] | None,
                  limit: int | None = None) -> list[dict]:
    """Task configs; ``limit`` = samples per task *and length* (pass no lm-eval limit for these tasks then)."""
    out = []
    for t in tasks:
        if t in RULER_TASKS:
            mod, fn, gen = RULER_TASKS[t]
            f = getattr(importlib.import_module(f"lm_eval.tasks.ruler.{mod}"), fn)
            out.append(_ruler_config(t, partial(_per_length_limit, f, limit, mod), lengths, tokenizer_path, gen))
        elif t in ESSAY_TASKS:
            if haystack is None:
                raise ValueError("essay tasks need a haystack")
            f = partial(_essay_dataset, ESSAY_TASKS[t], haystack, limit or RULER_SAMPLES)
            out.append(_ruler_config(t, partial(_per_length_limit, f, limit), lengths, tokenizer_path, 128))
        else:
            check_tasks([t])
    return out


# ---- SWDE / FDA from local files --------------------------------------------------------------------------------
def _text(v) -> bool:
    return isinstance(v, str) and bool(v.strip())


def based_prompt(doc: dict) -> str:
    """The whole prompt: ``text`` as given, or ``context`` + newline + ``key`` + ':' (the based-* layout)."""
    if _text(doc.get("text")):
        return doc["text"].strip()
    return f"{doc['context'].strip()}\n{doc['key'].strip()}:"


def contains_score(prediction: str, label: str) -> int:
    return int(bool(re.search(re.escape(label.strip()), prediction, re.IGNORECASE)))


def _based_results(doc: dict, results: list[str]) -> dict[str, int]:
    return {"contains": contains_score(results[0], doc["value"])}


def load_based_records(path: str | Path, field: str, rebuilt: bool = False) -> list[dict]:
    """Records of a local SWDE/FDA file (json list, jsonl, or parquet), checked for the based-* fields. ``rebuilt``:
    each prompt is rebuilt as one text (``--window answer``), so records of both layouts in one file are fine."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(field, str(path), "no such file (JSON, JSONL or parquet in the based-* layout)")
    if p.suffix == ".parquet":
        import pyarrow.parquet as pq

        rows = pq.read_table(p).to_pylist()
    else:
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError(field, str(path), f"not UTF-8 text ({e}); a compressed file? Give it uncompressed: a "
                              "JSON list, JSONL (a record a line) or parquet") from None
        if p.suffix == ".jsonl":
            rows = []
            for n, line in enumerate(text.splitlines(), 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise ConfigError(field, str(path), f"line {n} is not a JSON record ({e.msg}): JSONL holds "
                                          "one JSON object a line") from None
        else:
            try:
                data = json.loads(text)
            except json.JSONDecodeError as e:
                hint = (" (a record a line? name the file .jsonl)" if e.msg == "Extra data" else "")
                raise ConfigError(field, str(path), f"not JSON: {e.msg} at line {e.lineno}{hint}") from None
            rows = data if isinstance(data, list) else data.get("data", []) if isinstance(data, dict) else []
    if not rows:
        raise ConfigError(field, str(path), "holds no records: give a JSON list, JSONL (a record a line), "
                          "{\"data\": [...]} or parquet, each record with 'value' and 'text' or 'context'+'key'")
    for i, r in enumerate(rows):
        if not isinstance(r, dict) or "value" not in r or not (_text(r.get("text")) or
                                                               (_text(r.get("context")) and _text(r.get("key")))):
            raise ConfigError(field, str(path), f"record {i} needs 'value' and either a non-empty text 'text' or "
                              f"non-empty text 'context' and 'key' (it has {sorted(r) if isinstance(r, dict) else r!r})")
        if isinstance(r["value"], (int, float)) and not isinstance(r["value"], bool):
            r["value"] = str(r["value"])  # a number in JSON or parquet: scored as its text
        if not isinstance(r["value"], str) or not r["value"].strip():
            raise ConfigError(field, str(path), f"record {i} has the value {r['value']!r}: the answer must be "
                              "non-empty text (an empty one would match every generation)")
    # the dataset of the prompts takes its columns from the first record: a later record holding a prompt field the
    # first lacks (the other layout) would lose it (a KeyError inside lm-eval, after the model loaded); a field
    # present but empty (parquet's null) is kept, and `--window answer` rebuilds every prompt as one text
    first = {k for k in ("text", "context", "key") if k in rows[0]}
    lost = next((i for i, r in enumerate(rows) if {k for k in ("text", "context", "key") if k in r} - first), None)
    if lost is not None and not rebuilt:
        layout = lambda r: "text" if _text(r.get("text")) else "context+key"  # noqa: E731
        raise ConfigError(field, str(path), f"record 0 is of the {layout(rows[0])!r} layout and record {lost} of the "
                          f"{layout(rows[lost])!r} one: give every record the same layout ('value' with 'text', or "
                          "with 'context' and 'key'; or the fields of both, empty where unused)")
    return rows


def answer_window(doc: dict, tokenizer, budget: int) -> tuple[str, bool]:
    """The prompt of a SWDE/FDA record cut to ``budget`` tokens around the answer (JRT-style): the context tokens
    centred on the first occurrence of the gold value (the start when it does not occur), then the question line.
    A single text without a question line short enough (no newline, or a last line of more than half the budget)
    keeps its last ``budget // 4`` tokens as the question. The result fits the budget.
    Returns (prompt, whether it was cut)."""
    prompt = based_prompt(doc)
    if len(tokenizer(prompt)["input_ids"]) <= budget:
        return prompt, False
    if doc.get("context") and doc.get("key"):
        context, question = doc["context"].strip(), f"\n{doc['key'].strip()}:"
    else:  # a single text: its last line is the question
        context, _, last = prompt.rpartition("\n")
        question = "\n" + last
    if not context.strip() or len(tokenizer(question)["input_ids"]) > budget // 2:
        enc = tokenizer(prompt, return_offsets_mapping=True, add_special_tokens=False)
        cut = enc["offset_mapping"][len(enc["input_ids"]) - max(1, budget // 4)][0]
        context, question = prompt[:cut], prompt[cut:]
    enc = tokenizer(context, return_offsets_mapping=True, add_special_tokens=False)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    at = context.lower().find(doc["value"].strip().lower())
    centre = next((i for i, (a, b) in enumerate(offsets) if b > at), 0) if at >= 0 else 0
    room = budget - len(tokenizer(question)["input_ids"])
    while True:  # (tokens may merge across the join: shrink until the whole fits)
        room = max(1, min(room, len(ids)))
        start = max(0, min(centre - room // 2, len(ids) - room))
        window = context[offsets[start][0]:offsets[start + room - 1][1]]
        over = len(tokenizer(window + question)["input_ids"]) - budget
        if over <= 0 or room == 1:
            return window + question, True
        room -= over


def based_config(name: str, path: str | Path, limit: int | None = None, window: tuple | None = None) -> dict:
    """An lm-eval task over a local SWDE/FDA file. ``window=(tokenizer, budget)``: prompts longer than the budget
    are cut to an answer-centred window (:func:`answer_window`) instead of left-truncated by lm-eval."""
    p = Path(path).expanduser()
    records = load_based_records(p, f"--{name}", rebuilt=window is not None)
    rows = records[:limit] if limit else records

    def dataset(**kwargs) -> dict:
        import datasets

        out = []
        for i, r in enumerate(rows):
            d = {k: r[k] for k in ("text", "context", "key", "value") if k in r}
            if window is not None:
                d = {"text": answer_window(r, *window)[0], "value": r["value"]}
            out.append({**d, "id": str(r.get("id", i))})
        return {"test": datasets.Dataset.from_list(out)}

    return {
        "task": f"{name}_local", "custom_dataset": dataset, "dataset_path": "",
        "test_split": "test", "output_type": "generate_until",
        "doc_to_text": based_prompt, "doc_to_target": lambda d: d["value"].strip(), "target_delimiter": "",
        "process_results": _based_results,
        "metric_list": [{"metric": "contains", "aggregation": "mean", "higher_is_better": True}],
        "generation_kwargs": {"until": ["\n"], "max_gen_toks": BASED_MAX_GEN_TOKS, "do_sample": False},
        "metadata": {"version": 1.0},
    }


def count_truncated(records: list[dict], tokenizer, max_length: int, limit: int | None = None) -> int:
    """How many prompts do not fit the evaluation length (prompt + max_gen_toks longer than ``max_length``): lm-eval
    left-truncates them, unless ``--window answer`` cuts them around the answer first."""
    rows = records[:limit] if limit else records
    budget = max_length - BASED_MAX_GEN_TOKS
    return sum(len(tokenizer(based_prompt(r))["input_ids"]) > budget for r in rows)


def _request_args(sample: dict) -> tuple[str | None, dict]:
    """The context and generation kwargs of a logged generate_until sample (a list of (context, kwargs) tuples in
    memory; {"gen_args_0": {"arg_0", "arg_1"}} once serialised)."""
    args = sample.get("arguments")
    first = args[0] if isinstance(args, (list, tuple)) and args else None
    if isinstance(args, dict) and args:
        first = list(next(iter(args.values())).values())
    if isinstance(first, (list, tuple)) and first and isinstance(first[0], str):
        return first[0], first[1] if len(first) > 1 and isinstance(first[1], dict) else {}
    return None, {}


def samples_from(results: dict, tokenizer=None) -> list[dict]:
    """One record per prompt from lm-eval's logged samples: task, id, gold, generation, score, the strict score
    (RULER tasks) and ``doc_sha``, a digest of the whole document (prompt and answers); with ``tokenizer``, RULER
    records also ``context_tokens`` (the prompt as the model reads it: lm-eval's context, its delimiter and
    generation prefix included, tokenized as HFLM does) and ``max_gen_toks`` (the task's, where it sets one)."""
    out = []
    for task, samples in (results.get("samples") or {}).items():
        for s in samples:
            doc = s.get("doc", {})
            gold = doc.get("value", doc.get("outputs", s.get("target")))
            gen = s.get("filtered_resps") or s.get("resps")
            while isinstance(gen, list) and gen:
                gen = gen[0]
            metrics = {k: v for k, v in s.items() if isinstance(v, (int, float)) and k not in ("doc_id",)}
            rec = {"task": task, "id": doc.get("id", s.get("doc_id")), "length": doc.get("max_length"),
                   "gold": gold, "generation": gen, "score": metrics,
                   "doc_sha": _digest(json.dumps(doc, sort_keys=True, default=str)
                                      + TARGET_DELIMITERS.get(task, ""))}  # (cwe's prompts: their delimiter too)
            if isinstance(doc.get("length"), int):  # RULER's size of the prompt: its tokens + the generation's
                rec["ruler_length"] = doc["length"]
            if rec["length"] is not None:
                rec["strict"] = strict_score(gold, gen)
            context, gen_kwargs = _request_args(s)
            # (RULER prompts only: SWDE/FDA prompts were counted against the length already, count_truncated)
            if tokenizer is not None and context is not None and rec["length"] is not None:
                rec["context_tokens"] = len(tokenizer(context)["input_ids"])
                if isinstance(gen_kwargs.get("max_gen_toks"), int):
                    rec["max_gen_toks"] = gen_kwargs["max_gen_toks"]
            out.append(rec)
    return out


def cut_ruler_prompts(samples: list[dict], max_length: int, default_gen_toks: int) -> dict[str, dict[str, int]]:
    """{task: {length: prompts}} of RULER prompts that lm-eval cut from the left: RULER sizes a prompt as its text
    plus the generation within the length, but the prompt read also holds the delimiter and generation prefix, and
    HFLM keeps only the last ``max_length - max_gen_toks`` tokens of it (its instructions, or the needle, lost).
    Where the evaluation length is the longest RULER length, a few do not fit."""
    out: dict[str, dict[str, int]] = {}
    for rec in samples:
        if rec.get("length") is None or "context_tokens" not in rec:
            continue
        if rec["context_tokens"] > max_length - rec.get("max_gen_toks", default_gen_toks):
            row = out.setdefault(rec["task"], {})
            row[str(rec["length"])] = row.get(str(rec["length"]), 0) + 1
    return out


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


_UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"


def strict_score(golds: list[str] | str, generation: str | None) -> float:
    """The share of gold values the generation states as themselves: each matched whole (no letter or digit joined
    to either side: "1363000" is not in "13630000"), and with one gold, the first value of its shape the model gives
    (the first number for a number, the first UUID for a UUID) must be it: "12. No, 6057437" scores 0, where RULER's
    string match scores 1. A model that restates a UUID key before its value (niah_multikey_3) scores 0 too."""
    golds = [golds] if isinstance(golds, str) else list(golds)
    text = (generation or "").lower()
    if not golds:
        return 0.0

    def whole(g: str) -> bool:
        return re.search(rf"(?<![0-9a-z]){re.escape(g.strip().lower())}(?![0-9a-z])", text) is not None

    if len(golds) == 1:
        g = golds[0].strip().lower()
        shape = _UUID if re.fullmatch(_UUID, g) else r"\d+" if g.isdigit() else None
        if shape is not None:  # the first value of that shape standing alone ("key2" holds no number)
            first = re.search(rf"(?<![0-9a-z]){shape}(?![0-9a-z])", text)
            return float(first is not None and first.group(0) == g)
        return float(whole(g))
    return sum(whole(g) for g in golds) / len(golds)


def strict_scores(samples: list[dict]) -> dict[str, dict[str, float]]:
    """{task: {length: mean strict score}} over the RULER records of :func:`samples_from` (recomputed from gold and
    generation, so records written before the strict score existed are scored the same way)."""
    sums: dict[str, dict[str, list[float]]] = {}
    for rec in samples:
        if rec.get("length") is None:
            continue
        cell = sums.setdefault(rec["task"], {}).setdefault(str(rec["length"]), [0.0, 0.0])
        cell[0] += strict_score(rec["gold"], rec["generation"])
        cell[1] += 1
    return {t: {L: v[0] / v[1] for L, v in row.items()} for t, row in sums.items()}


def prompt_digests(samples: list[dict]) -> dict[str, dict[str, dict[str, str]]]:
    """{task: {length or 'contains': {"golds": digest, "prompts": digest}}}: which prompts a score comes from.
    ``golds`` hashes each prompt's id and answers (computable from any samples file), ``prompts`` the whole
    documents (records with ``doc_sha`` only)."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for rec in samples:
        key = str(rec["length"]) if rec.get("length") is not None else "contains"
        groups.setdefault((rec["task"], key), []).append(rec)
    out: dict[str, dict[str, dict[str, str]]] = {}
    for (task, key), recs in groups.items():
        recs = sorted(recs, key=lambda r: str(r.get("id")))
        d = {"golds": _digest(json.dumps([[str(r.get("id")), r.get("gold")] for r in recs], default=str))}
        if all("doc_sha" in r for r in recs):
            d["prompts"] = _digest(json.dumps([[str(r.get("id")), r["doc_sha"]] for r in recs]))
        out.setdefault(task, {})[key] = d
    return out


def cut_prompts_digest(cell: dict[str, str], window: str | None, max_length: int) -> dict[str, str]:
    """A SWDE/FDA ``contains`` digest of a run in which some prompts did not fit: what the model read depends on the
    evaluation length (and on the window), so they join the ``prompts`` digest, and eval-merge refuses to set side
    by side scores of prompts cut otherwise. (A run whose prompts all fit keeps the document digest.)"""
    if "prompts" not in cell:
        return cell
    return {**cell, "prompts": _digest(json.dumps([cell["prompts"], window, int(max_length)]))}


# ---- running -----------------------------------------------------------------------------------------------------
@functools.cache
def _task_manager():
    """lm-eval's task index (it reads ~10k task YAMLs: 8-10 s): built once per process, shared by every model."""
    from lm_eval.tasks import TaskManager

    return TaskManager()


def run_tasks(lm, task_specs: list, limit: int | None, seed: int = 0) -> dict[str, Any]:
    """lm: an lm-eval LM (HFLM around an in-process model, or any LM subclass). Returns lm-eval's results dict."""
    import lm_eval

    return lm_eval.simple_evaluate(model=lm, tasks=task_specs, limit=limit, task_manager=_task_manager(),
                                   random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                                   fewshot_random_seed=seed, log_samples=True, bootstrap_iters=0)


def prompt_fill(samples: list[dict]) -> dict[str, dict[str, float]]:
    """{task: {length: mean RULER length / length}} over the RULER records that carry their size (prompt tokens plus
    the generation's budget, as RULER sizes them): how much of the length asked for the prompts fill (lm-eval's generators stop short where the haystack runs out, or in steps:
    niah_multikey_3 grows its haystack 25 UUID lines at a time)."""
    sums: dict[str, dict[str, list[float]]] = {}
    for rec in samples:
        if rec.get("length") is None or not isinstance(rec.get("ruler_length"), int):
            continue
        cell = sums.setdefault(rec["task"], {}).setdefault(str(rec["length"]), [0.0, 0])
        cell[0] += rec["ruler_length"] / int(rec["length"])
        cell[1] += 1
    return {t: {L: round(v[0] / v[1], 4) for L, v in row.items()} for t, row in sums.items()}


def sample_counts(samples: list[dict]) -> dict[str, dict[str, int]]:
    """{task: {length or 'contains': prompts scored}} from :func:`samples_from`'s records (the n behind a score)."""
    out: dict[str, dict[str, int]] = {}
    for rec in samples:
        key = str(rec["length"]) if rec.get("length") is not None else "contains"
        row = out.setdefault(rec["task"], {})
        row[key] = row.get(key, 0) + 1
    return out


def scores_from(results: dict, lengths: list[int]) -> dict[str, dict[str, float]]:
    """{task: {length or 'contains': score}} from lm-eval's results."""
    out: dict[str, dict[str, float]] = {}
    for task, res in results["results"].items():
        row = {}
        for k, v in res.items():
            if not k.endswith(",none") or not isinstance(v, (int, float)):
                continue
            metric = k.split(",")[0]
            if metric in {str(L) for L in lengths} or metric == "contains":
                row[metric] = float(v)
        out[task] = row
    return out
