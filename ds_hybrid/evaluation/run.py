"""`ds-hybrid eval` and `ds-hybrid bench-infer`: a hybrid (or any causal LM) next to its teacher.

    ds-hybrid eval --model out/kl/hf --teacher embedded --suite recall --lengths 2048,4096 --swde swde.jsonl --limit 50
    ds-hybrid bench-infer --model out/kl/hf --teacher embedded --contexts 4096,16384,32768 --batches 1
"""

from __future__ import annotations

import argparse
import json
import gc
import logging
import re
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ds_hybrid.errors import ConfigError, out_folder
from ds_hybrid.evaluation.merge import HELDOUT_ROWS, stale_heldout_models
from ds_hybrid.folders import atomic_write_text

log = logging.getLogger("ds_hybrid")
ESSAY_GEN_TOKENS = 128  # what RULER's essay prompts leave of a length for the answer
SHORT_FILL = 0.9  # RULER prompts filling less of their length than this, on average, are warned of


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    from ds_hybrid.distributed import parse_device

    return parse_device(name)


def positive_ints(text: str, field: str) -> list[int]:
    """'2048,4096' -> [2048, 4096], or a ConfigError naming the option."""
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise ConfigError(field, text, "give comma-separated positive integers, e.g. 2048,4096")
    return values


def check_args(args: argparse.Namespace, models: dict[str, str]) -> dict[str, str]:
    """Every count positive and every model an HF folder ('embedded' and 'gemma3-270m' resolved), before the first
    model is loaded: {name: its local folder}."""
    for name in ("limit", "max_length", "heldout_sequences", "heldout_seq_len", "batch_size", "decode_tokens"):
        v = getattr(args, name, None)
        if v is not None and v < 1:
            raise ConfigError(f"--{name.replace('_', '-')}", v, "must be a positive integer")
    seed = getattr(args, "seed", None)
    if seed is not None and not 0 <= seed < 2**32:  # (lm-eval seeds numpy with it, after a model is loaded)
        raise ConfigError("--seed", seed, "must be between 0 and 2**32 - 1")
    return {name: model_folder(path, model_field(args, name)) for name, path in models.items()}


def _complete(path: Path) -> bool:
    try:
        return json.loads(path.read_text()).get("complete", True) is not False
    except (OSError, ValueError, AttributeError):
        return True  # (unreadable: not known to be a partial run's)


def check_out(args: argparse.Namespace, record: str, partial_ok: bool = False) -> Path:
    """``--out``, refused (before any model is loaded) where it holds an earlier run's ``record``.json that this run
    would replace, unless --resume (eval: keep its finished models) or --overwrite says so. ``partial_ok``
    (bench-infer, which has no --resume): a run that stopped part way is replaced by running it again."""
    out = out_folder(args.out)
    path = out / f"{record}.json"
    if path.exists() and not getattr(args, "resume", False) and not getattr(args, "overwrite", False) \
            and not (partial_ok and not _complete(path)):
        keep = "add --resume to keep its finished models and run the rest, " if hasattr(args, "resume") else ""
        raise ConfigError("--out", args.out, f"it holds an earlier run ({record}.json) that this one would replace: "
                          f"{keep}give another --out (`ds-hybrid eval-merge` combines folders), or add --overwrite")
    return out


def model_field(args: argparse.Namespace, name: str) -> str:
    """The option that gave model ``name``: --teacher for the teacher's row where --teacher gave it, else --model."""
    return "--teacher" if name == "teacher" and getattr(args, "teacher", None) is not None else "--model"


def model_folder(spec: str, field: str = "--model") -> str:
    """A model spec (a folder, 'embedded', 'gemma3-270m') -> its local HF folder, or a ConfigError naming ``field``."""
    from ds_hybrid.teacher import resolve_teacher

    local = resolve_teacher(spec, field)
    if not (Path(local) / "config.json").is_file():
        raise ConfigError(field, spec, "not an HF model folder (no config.json): give a stage's hf/ export, a "
                                       "model folder, or 'embedded'")
    return local


def _dtype(name: str, dev: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if dev.type == "cuda" else torch.float32
    return {"bf16": torch.bfloat16, "fp32": torch.float32}[name]


def parse_models(model_args: list[str], teacher: str | None) -> dict[str, str]:
    """['name=path', 'path', ...] (+ the teacher) -> {name: path or 'embedded'}; names that cannot name files or
    that take the teacher's row refused."""
    out: dict[str, str] = {}
    for m in model_args:
        named = "=" in m and not Path(m).exists()
        name, path = m.split("=", 1) if named else (Path(m).resolve().name or m, m)
        if name == "teacher" and named and (teacher is not None or "teacher" in out):
            raise ConfigError("--model", m, "'teacher' is the name of the teacher's row (the KL and the comparisons "
                              "read it), given once: by --teacher or by one --model teacher=PATH; name this model "
                              "otherwise")
        if name in out or (name == "teacher" and not named):  # (a folder named teacher/, or a name given twice:
            base, i = name, len(out)                            # renamed to one not taken)
            while (name := f"{base}_{i}") in out or name == "teacher":
                i += 1
        out[name] = path
    if teacher is not None:
        out["teacher"] = teacher
    for name in out:
        if not re.fullmatch(r"[A-Za-z0-9_+=-][A-Za-z0-9_.+=-]*", name):
            raise ConfigError("--model", name, "a model's name names its rows and files (eval's samples_<name>.jsonl): "
                              "use letters, digits and _ . + = - (name=path)")
    return out


def _tokenizer_and_path(path: str):
    from transformers import AutoTokenizer

    local = model_folder(path)
    return AutoTokenizer.from_pretrained(local), local


def load_model(path: str, dev: torch.device, dtype: torch.dtype):
    import ds_hybrid  # noqa: F401  (registers the hybrid)
    from transformers import AutoModelForCausalLM

    tok, local = _tokenizer_and_path(path)
    # straight onto the device (not built in host memory first: a parked teacher may fill it already)
    model = AutoModelForCausalLM.from_pretrained(local, dtype=dtype, device_map=dev).eval()
    return model, tok, local


PARK = torch.device("cpu")  # where the teacher waits between the held-out passes that need it


def park(model, dev: torch.device) -> None:
    """Move ``model`` to host memory and give its accelerator memory back (nothing to do when ``dev`` is the host)."""
    if dev == PARK:
        return
    model.to(PARK)
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()


def describe(model) -> dict:
    from ds_hybrid.evaluation.quality import text_config

    cfg = model.config
    d = {"model_type": cfg.model_type, "num_layers": text_config(model).num_hidden_layers,
         "params": sum(p.numel() for p in model.parameters())}
    if text_config(model) is not cfg:  # a multimodal model: its language model's (what a hybrid made from it has)
        lm = model.get_decoder()
        head = model.get_output_embeddings()
        d["text_params"] = sum(p.numel() for p in {id(p): p for p in [*lm.parameters(), *head.parameters()]}.values())
    if cfg.model_type == "ds_hybrid":
        d.update(softmax_layers=cfg.softmax_layers, mixer=cfg.mixer, mixer_options=cfg.mixer_options)
    return d


MIN_RULER_LENGTH = 1024  # the shortest --lengths value a RULER or essay task is generated at


def eval_request(args: argparse.Namespace) -> tuple[list[int], list[str], dict[str, list], dict[str, str]]:
    """`ds-hybrid eval`'s arguments checked before any model folder is read -> (lengths, tasks, the SWDE/FDA records
    by option, {model name: spec})."""
    from ds_hybrid.evaluation import recall

    lengths = positive_ints(args.lengths, "--lengths")
    tasks = recall.SUITES[args.suite] if args.tasks is None else [t for t in args.tasks.split(",") if t]
    recall.check_tasks(tasks)
    ruler = [t for t in tasks if t in recall.RULER_TASKS or t in recall.ESSAY_TASKS]
    if ruler and lengths and min(lengths) < MIN_RULER_LENGTH:  # (found after a model had loaded, or not at all:
        # ruler_cwe's word search can loop for ever at a few hundred tokens)
        raise ConfigError("--lengths", args.lengths, f"{min(lengths)} is too short for a RULER or essay prompt "
                          f"({', '.join(ruler)}): use lengths of {MIN_RULER_LENGTH} tokens and up")
    based = {name: getattr(args, name) for name in recall.BASED_TASKS if getattr(args, name)}
    records = {name: recall.load_based_records(p, f"--{name}", rebuilt=args.window == "answer")  # checked up front
               for name, p in based.items()}
    return lengths, tasks, records, parse_models(args.model, args.teacher)


def run_eval(args: argparse.Namespace) -> dict:
    from ds_hybrid.data import tokenizer_fingerprint
    from ds_hybrid.evaluation import recall, report
    from ds_hybrid.monitor import versions

    lengths, tasks, records, models = eval_request(args)
    based = {name: getattr(args, name) for name in records}
    folders = check_args(args, models)
    check_out(args, "eval")
    ruler = [t for t in tasks if t in recall.RULER_TASKS or t in recall.ESSAY_TASKS]
    for name, folder in folders.items():  # before any model is loaded
        if ruler and lengths and max(lengths) > eval_length(folder, args.max_length):
            raise ConfigError("--lengths", args.lengths,
                              f"{name} is evaluated at {eval_length(folder, args.max_length)} tokens (--max-length, "
                              f"else its context), shorter than the longest RULER length, whose prompts lm-eval would "
                              f"cut from the left (the needle with them) and score under the length asked: drop the "
                              f"longer lengths, or raise --max-length to {max(lengths)} or more (past the model's "
                              "context, the scores measure extrapolation; at exactly the longest length a few prompts "
                              "may still be cut, by their delimiter and generation prefix: eval.json's "
                              "ruler_truncated counts them)")
    for name, folder in folders.items() if not args.no_quality else ():
        if args.heldout_seq_len > eval_length(folder, None):  # (scored past its positions: not its quality)
            raise ConfigError("--heldout-seq-len", args.heldout_seq_len, f"longer than {name}'s context "
                              f"({eval_length(folder, None)} tokens): its held-out perplexity and KL would be of "
                              "positions it was never trained at; use a --heldout-seq-len within it")
    for name, folder in folders.items() if based else ():
        if eval_length(folder, args.max_length) <= recall.BASED_MAX_GEN_TOKS:
            raise ConfigError("--max-length", args.max_length, f"{name} would be evaluated at "
                              f"{eval_length(folder, args.max_length)} tokens, which leaves no room for a "
                              f"{'/'.join(based)} prompt beside its {recall.BASED_MAX_GEN_TOKS} generated tokens: "
                              "raise --max-length (the model's context, when it is not given)")
    dev = _device(args.device)
    dtype = _dtype(args.dtype, dev)
    recall.prepare_offline()
    from lm_eval.models.huggingface import HFLM

    from transformers import AutoTokenizer

    from ds_hybrid.evaluation.haystack import check_haystack_tokens, haystack_words

    haystack = None
    if any(t in recall.ESSAY_TASKS for t in tasks):
        # the default, the embedded corpus's held-out prose: what every model's tokenizer holds out under the run's
        # split (--run-config), so that no model reads a haystack of text it trained on
        from ds_hybrid.config import load_config

        split = load_config(args.run_config).data if getattr(args, "run_config", None) else None
        toks = {}
        if args.haystack in (None, "embedded"):
            for folder in folders.values():
                tok = AutoTokenizer.from_pretrained(folder)
                toks.setdefault(tokenizer_fingerprint(tok), tok)
        haystack = haystack_words(args.haystack, list(toks.values()), split.val_tokens if split else None,
                                  split.split_seed if split else None, bool(split and split.add_eos))
    if haystack is not None and lengths:  # still before any model: each model's tokenizer sizes its prompts
        for name, folder in folders.items():
            check_haystack_tokens(haystack, AutoTokenizer.from_pretrained(folder), max(lengths) - ESSAY_GEN_TOKENS,
                                  args.haystack, name)
    out_dir = Path(args.out)
    scores, quality, info, truncated, counts, strict, digests, fill = {}, {}, {}, {}, {}, {}, {}, {}
    ruler_cut: dict[str, dict] = {}  # per model, {task: {length: prompts}} cut from the left by lm-eval
    settings = {"device": str(dev), "dtype": str(dtype), "lengths": lengths, "tasks": tasks, "limit": args.limit,
                "seed": args.seed, "batch_size": args.batch_size, "based_files": based, "window": args.window,
                "cuda_graphs": args.cuda_graphs,
                "haystack": args.haystack, "run_config": getattr(args, "run_config", None),
                "heldout": None if args.no_quality else heldout_settings(args)}
    quality_pending: set[str] = set()  # (--resume: models whose recall is kept and held-out quality is not)
    if args.resume:  # the models an earlier run of this same evaluation finished, as it left them
        from ds_hybrid.data import row_bos

        bos_setting = heldout_bos_setting(getattr(args, "run_config", None))
        earlier = resumable_models(out_dir, settings, models, folders, args.max_length,
                                   row_bos_of=lambda name: row_bos(bos_setting, _tokenizer_and_path(folders[name])[0]))
        for name, rec in earlier.items():
            info[name] = rec["models"]
            if rec["quality_pending"]:
                quality_pending.add(name)
            for into, key in ((scores, "scores"), (counts, "prompts"), (strict, "strict_scores"),
                              (digests, "prompt_digests"), (fill, "ruler_fill"), (quality, "heldout_quality"),
                              (ruler_cut, "ruler_truncated")):
                if key in rec:
                    into[name] = rec[key]
            for bname, n in rec.get("truncated_prompts", {}).items():
                truncated.setdefault(bname, {})[name] = n
        if earlier:
            log.info("--resume: %s kept from %s%s", ", ".join(earlier), out_dir / "eval.json",
                     f" (held-out quality still to compute: {', '.join(sorted(quality_pending))})"
                     if quality_pending else "")

    def write_report(complete: bool) -> tuple[dict, str]:
        """eval.json and eval.md of the models done so far (rewritten after each: a crash keeps what finished)."""
        payload = {"versions": versions(), "date": time.strftime("%Y-%m-%d %H:%M:%S"), **settings,
                   "truncated_prompts": truncated, "ruler_truncated": ruler_cut, "models": info,
                   "complete": complete,
                   "scores": scores, "prompts": counts, "ci95": report.intervals(scores, counts),
                   "strict_scores": strict, "prompt_digests": digests, "ruler_fill": fill,
                   "heldout_quality": quality, "heldout_rows": HELDOUT_ROWS}
        from ds_hybrid.evaluation.merge import prompt_differences

        mismatch = prompt_differences(digests, {m: info.get(m, {}).get("tokenizer") for m in digests},
                                      out_dir / "eval.json")
        payload["prompt_mismatch"] = mismatch
        md = report.recall_table(scores, quality, counts)
        if any(strict.values()):
            md += ("\n\nstrict (the first answer given must be the gold, whole):\n\n" +
                   report.recall_table(strict, {}, counts))
        if any(ruler_cut.values()):
            md += ("\n\nRULER prompts longer than the evaluation length less the generation, left-truncated by "
                   "lm-eval (their start lost; scored anyway): " + json.dumps({m: c for m, c in ruler_cut.items() if c}))
        if truncated:
            what = "cut to an answer-centred window" if args.window == "answer" else "left-truncated by lm-eval"
            md += f"\n\nprompts longer than the evaluation length ({what}): " + json.dumps(truncated)
        short = {m: {t: {L: f for L, f in row.items() if f < SHORT_FILL} for t, row in per.items()}
                 for m, per in fill.items()}
        short = {m: {t: row for t, row in per.items() if row} for m, per in short.items()}
        if any(short.values()):
            md += (f"\n\nRULER prompts filling less than {SHORT_FILL:.0%} of their length on average (prompt + "
                   "generation tokens / length): " + json.dumps({m: per for m, per in short.items() if per}))
        if mismatch:
            cells = sorted({f"{d['task']} at {d['length']}: {d['model']} vs {d['differs_from']['model']}"
                            for d in mismatch})
            log.warning("models of one tokenizer read other prompts (their scores are not comparable): %s",
                        "; ".join(cells))
            md += "\n\nNOT COMPARABLE, other prompts for models of one tokenizer: " + "; ".join(cells)
        if not complete:
            waiting = [m for m in info if m in quality_pending]
            md += (f"\n\n(partial: {len(info) - len(waiting)} of {len(models)} models done"
                   + (f"; the held-out quality of {', '.join(waiting)} still to compute)" if waiting else ")"))
        report.write(out_dir, "eval", payload, md)
        return payload, md
    pending = [m for m in models if m not in info or m in quality_pending]  # (--resume: those still to evaluate)
    # held-out rows per tokenizer (each model reads the documents in its own ids), built (and checked against the
    # run's split) before any model is loaded; the KL to the teacher only for models of the teacher's tokenizer
    # (another vocabulary has no token-by-token KL to it)
    rows_by_tok: dict[str, tuple[list[torch.Tensor], int | None]] = {}
    tok_of: dict[str, str] = {}
    for name in pending if not args.no_quality else []:
        tok = _tokenizer_and_path(folders[name])[0]
        tok_of[name] = tokenizer_fingerprint(tok)
        if tok_of[name] not in rows_by_tok:
            rows_by_tok[tok_of[name]] = _heldout_rows(args, tok)
    teacher_model = teacher_tok = None
    if "teacher" in models and not args.no_quality:
        teacher_tok = tokenizer_fingerprint(_tokenizer_and_path(folders["teacher"])[0])
    # the teacher is loaded once, before the others, where a pending model of its tokenizer takes a KL to it; it is
    # parked in host memory between its KL passes (each model's recall runs without it beside on the accelerator)
    if teacher_tok is not None and any(m != "teacher" and tok_of[m] == teacher_tok for m in pending):
        teacher_model, _, _ = load_model(folders["teacher"], PARK, dtype)
    def recall_of(name: str, path: str, model, tok, local: str) -> None:
        """One model's recall (RULER, the essay needles, SWDE/FDA) into the tables, its samples beside them."""
        info[name] = {"path": path, **describe(model), "tokenizer": tokenizer_fingerprint(tok),
                      "weights": weights_fingerprint(folders[name])}
        # the evaluation length: --max-length, else the model's context (at least RULER's longest length: checked)
        max_length = eval_length(folders[name], args.max_length)
        info[name]["max_length"] = max_length
        lm_class = HFLM
        if args.cuda_graphs:  # greedy decoding through the static cache, CUDA graphs on a GPU (same tokens)
            from ds_hybrid.evaluation.graph_lm import graph_hflm_class

            lm_class = graph_hflm_class()
        lm = lm_class(pretrained=model, tokenizer=tok, batch_size=args.batch_size, max_length=max_length,
                      device=str(dev))
        specs = recall.ruler_configs(tasks, lengths, local, haystack, args.limit) if tasks and lengths else []
        budget = max_length - recall.BASED_MAX_GEN_TOKS
        for bname, p in based.items():
            window = (tok, budget) if args.window == "answer" else None
            specs.append(recall.based_config(bname, p, args.limit, window))
            truncated.setdefault(bname, {})[name] = recall.count_truncated(records[bname], tok, max_length, args.limit)
        t0 = time.time()
        try:
            res = recall.run_tasks(lm, specs, None, args.seed) if specs else {"results": {}}  # limits applied above
        except ValueError as e:
            if "max_seq_lengths" not in str(e):
                raise
            raise ConfigError("--lengths", args.lengths, f"too short for a RULER prompt ({e}); use longer lengths "
                              "(1024 and up)") from None
        scores[name] = recall.scores_from(res, lengths)
        samples = recall.samples_from(res, tok)
        counts[name] = recall.sample_counts(samples)
        if samples:
            strict[name] = recall.strict_scores(samples)
            digests[name] = recall.prompt_digests(samples)
            for bname in based:  # prompts cut to the evaluation length: which length is part of what was read
                cell = digests[name].get(f"{bname}_local", {}).get("contains")
                if cell and truncated[bname][name]:
                    digests[name][f"{bname}_local"]["contains"] = recall.cut_prompts_digest(cell, args.window,
                                                                                              max_length)
            fill[name] = recall.prompt_fill(samples)
            ruler_cut[name] = recall.cut_ruler_prompts(samples, max_length, lm.max_gen_toks)
            if ruler_cut[name]:
                log.warning("%s: RULER prompts cut from the left by lm-eval (longer than %d tokens less the "
                            "generation): %s; raise --max-length past the longest --lengths", name, max_length,
                            ruler_cut[name])
            for task, row in fill[name].items():
                for L, f in row.items():
                    if f < SHORT_FILL:
                        log.warning("%s: %s's prompts at %s tokens fill %.0f %% of it on average (lm-eval's "
                                    "generator stopped short): its score there is of shorter prompts", name, task,
                                    L, 100 * f)
        if samples:  # what the model said, prompt by prompt, next to eval.json
            out_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(out_dir / f"samples_{name}.jsonl",
                              "".join(json.dumps(rec, default=str) + "\n" for rec in samples))
            info[name]["samples"] = str(out_dir / f"samples_{name}.jsonl")
        else:  # (an earlier evaluation's in a reused folder would be read by eval-merge as this one's)
            (out_dir / f"samples_{name}.jsonl").unlink(missing_ok=True)
        info[name]["eval_seconds"] = time.time() - t0

    for name, path in models.items():
        if name in info and name not in quality_pending:  # (--resume: finished by an earlier run)
            continue
        if name == "teacher" and teacher_model is not None:  # already loaded for the KL: load it once
            model, tok, local = teacher_model.to(dev), *_tokenizer_and_path(folders[name])
        else:
            model, tok, local = load_model(folders[name], dev, dtype)
        if name not in info:
            recall_of(name, path, model, tok, local)
            # the static decoder's caches and graphs go before the held-out pass (the teacher may sit beside it)
            if (decoder := model.__dict__.pop("_graph_decoder", None)) is not None:
                decoder.release()  # (GraphDecoder.release: what generate_static does before a replacement)
                del decoder
                gc.collect()
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
            if not args.no_quality:  # (its recall kept, should the held-out quality fail: --resume computes it)
                quality_pending.add(name)
                write_report(complete=False)
        if not args.no_quality:
            from ds_hybrid.evaluation.quality import heldout_quality

            fp = tokenizer_fingerprint(tok)  # (as rows_by_tok is keyed: today's, not a resumed record's)
            kl_to = teacher_model if name != "teacher" and fp == teacher_tok else None
            if teacher_tok is not None and name != "teacher" and fp != teacher_tok:
                log.warning("%s: its tokenizer is not the teacher's: held-out perplexity only (per token of its own "
                            "tokenizer), no KL to the teacher", name)
            if kl_to is not None and output_rows(model) != output_rows(kl_to):
                log.warning("%s: its output layer has %d rows, the teacher's %d (one tokenizer, its vocabulary "
                            "padded to other sizes, as Qwen2.5's 0.5B and 7B): held-out perplexity only, no KL to "
                            "the teacher", name, output_rows(model), output_rows(kl_to))
                kl_to = None
            rows, bos = rows_by_tok[fp]  # (row_bos recorded where the rows start with one: a file without it and
            # one of rows without BOS hold the same quality record)
            quality[name] = {**heldout_quality(model, rows, kl_to.to(dev) if kl_to is not None else None),
                             **({"row_bos": bos} if bos is not None else {})}
            quality_pending.discard(name)
        del model
        if teacher_model is not None:
            park(teacher_model, dev)
        if len(info) < len(models) or quality_pending:
            write_report(complete=False)
    payload, md = write_report(complete=True)
    if any(any(k.isdigit() for d in s.values() for k in d) for s in scores.values()):
        report.plot_recall(scores, out_dir / "recall_vs_length.png")
    print(md)
    return payload


# (batch_size: lm-eval left-pads a batch's prompts, and bf16 greedy tokens may depend on the batch they ran in)
RESUME_SETTINGS = ("device", "dtype", "lengths", "tasks", "limit", "seed", "batch_size", "based_files", "window",
                   "cuda_graphs", "haystack", "run_config", "heldout")
# what an eval.json written before a setting was recorded ran with
RESUME_DEFAULTS = {"based_files": {}, "window": "none", "cuda_graphs": False, "haystack": None, "run_config": None}


def weights_fingerprint(folder: str) -> str | None:
    """The identity of a model folder's weights (a re-export into the same folder differs): for --resume."""
    from ds_hybrid.selection import content_fingerprint

    return content_fingerprint(folder) if any(Path(folder).glob("*.safetensors")) else None


def resumable_models(out_dir: Path, settings: dict, models: dict[str, str], folders: dict[str, str],
                     max_length: int | None, row_bos_of: Callable[[str], int | None] | None = None) -> dict[str, dict]:
    """``--resume``: each model that ``out_dir/eval.json`` (an earlier run, partial or complete) holds, of the same
    name, path and evaluation length, as that run left it (its entries of every per-model table). The evaluation's
    settings must be the same as that run's (a difference is an error naming it: scores of other prompts, lengths or
    held-out rows would sit in one table as if comparable); no eval.json: nothing to keep. ``row_bos_of``: the token
    a model's held-out rows start with now (a kept quality whose rows started otherwise is computed again)."""
    path = out_dir / "eval.json"
    if not path.is_file():
        return {}
    try:
        old = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError("--resume", str(path), f"unreadable ({e}): remove it, or run without --resume into a "
                          "new --out") from None
    for key in RESUME_SETTINGS:
        was = old.get(key, RESUME_DEFAULTS.get(key))
        if key == "heldout" and was is None and not old.get("heldout_quality"):
            continue  # (no model of it had held-out rows yet: written so before 2026-12-06; its models run again)
        if key == "batch_size" and key not in old:
            continue  # (recorded since 2026-12-07: an earlier file's batch size is not known, and is not assumed)
        if was != settings[key]:
            raise ConfigError("--resume", str(path), f"that evaluation ran with {key} = {was!r}, this one "
                              f"asks for {settings[key]!r}: evaluate into another --out, or ask for the same "
                              "settings")
    from ds_hybrid.monitor import versions

    now, was = versions(), old.get("versions") or {}
    moved = [f"{k} {was[k]} -> {now.get(k)}" for k in ("ds_hybrid", "torch", "transformers", "lm_eval", "gpu")
             if k in was and was[k] != now.get(k)]
    if moved and old.get("models"):  # (the table holds both: said, since eval.json records this run's alone)
        log.warning("--resume: the models kept from %s were evaluated under other versions or another GPU than the "
                    "rest will be (%s): their scores sit in one table; evaluate into another --out to keep them "
                    "apart", path, "; ".join(moved))
    kept: dict[str, dict] = {}
    stale = set(stale_heldout_models(old)) if settings["heldout"] is not None else set()
    if stale:
        log.info("--resume: %s held-out quality computed again (their held-out rows were the first model's "
                 "tokenizer's ids: an eval.json of before 2026-12-06)", ", ".join(sorted(stale)))
    # rows that would start otherwise now (an eval.json of before 2026-12-08 read them without BOS; another data.bos)
    if settings["heldout"] is not None and row_bos_of is not None:
        other_bos = {n for n, q in old.get("heldout_quality", {}).items() if n in models and n not in stale
                     and q.get("row_bos") != row_bos_of(n)}
        if other_bos:
            log.info("--resume: %s held-out quality computed again (their rows start with another token now: "
                     "data.bos)", ", ".join(sorted(other_bos)))
            stale |= other_bos
    # a teacher named now where the earlier run had none: the kept models of its tokenizer and vocabulary get their
    # KL to it (their held-out quality computed again); where it had one, a model without a KL had none to take
    kl_now: set[str] = set()
    if "teacher" in models and "teacher" not in old.get("models", {}) and settings["heldout"] is not None:
        held = old.get("heldout_quality", {})
        lack = [n for n, rec in old.get("models", {}).items()
                if n != "teacher" and n in models and n in held and "kl_to_teacher" not in held[n]]
        if lack:
            from ds_hybrid.data import tokenizer_fingerprint

            t_fp = tokenizer_fingerprint(_tokenizer_and_path(folders["teacher"])[0])
            t_rows = config_output_rows(folders["teacher"])
            kl_now = {n for n in lack if old["models"][n].get("tokenizer") == t_fp
                      and config_output_rows(folders[n]) == t_rows}
        if kl_now:
            log.info("--resume: %s held-out quality computed again, with the KL to the teacher named now",
                     ", ".join(sorted(kl_now)))
    dropped = [name for name in old.get("models", {}) if name not in models]
    if dropped:  # (eval.json is rewritten with the models named here: theirs would be lost)
        raise ConfigError("--resume", str(path), f"it holds {', '.join(dropped)}, not named in this command, whose "
                          "scores rewriting it would lose: name every model of that evaluation again (the finished "
                          "ones are kept, not run), or evaluate into another --out")
    for name, rec in old.get("models", {}).items():
        if rec.get("path") != models[name] or rec.get("max_length") != eval_length(folders[name], max_length):
            raise ConfigError("--resume", str(path), f"its model {name!r} was {rec.get('path')!r} at "
                              f"{rec.get('max_length')} tokens, this one is {models[name]!r} at "
                              f"{eval_length(folders[name], max_length)}: name it differently, or use another --out")
        if "weights" in rec and rec["weights"] != weights_fingerprint(folders[name]):
            raise ConfigError("--resume", str(path), f"its model {name!r} ({rec['path']}) has other weights now (the "
                              "folder was written again since): evaluate into another --out, or without --resume")
        # (a model is written into eval.json once its recall is done) its recall kept; its held-out quality computed again where it has none (the run stopped between the two)
        # or another tokenizer's
        redo = settings["heldout"] is not None and (name not in old.get("heldout_quality", {}) or name in stale
                                                    or name in kl_now)
        kept[name] = {"models": rec, "quality_pending": redo,
                      **{k: old[k][name] for k in ("scores", "prompts", "strict_scores", "prompt_digests",
                                                   "ruler_fill", "heldout_quality", "ruler_truncated")
                         if name in old.get(k, {}) and not (redo and k == "heldout_quality")},
                      "truncated_prompts": {b: per[name] for b, per in old.get("truncated_prompts", {}).items()
                                            if name in per}}
    return kept


def output_rows(model) -> int:
    """The rows of a causal LM's output layer (its logits' width: the vocabulary, padded as the checkpoint has it)."""
    return int(model.get_output_embeddings().weight.shape[0])


def config_output_rows(folder: str) -> int | None:
    """The same from a model folder's config (``vocab_size``), without loading the weights."""
    from transformers import AutoConfig

    return getattr(AutoConfig.from_pretrained(folder).get_text_config(), "vocab_size", None)


def eval_length(folder: str, max_length: int | None) -> int:
    """The length a model is evaluated at: ``--max-length``, else its context (max_position_embeddings) as
    transformers reads the config, i.e. as the loaded model has it. Not from config.json's text: a field the file
    leaves out takes its class's default (google/gemma-3-4b-it's text_config gives no max_position_embeddings:
    131,072 by Gemma3TextConfig), and a multimodal config's is its text model's. 4096 where the config has none."""
    if max_length:
        return max_length
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(folder).get_text_config()
    return int(getattr(cfg, "max_position_embeddings", None) or 4096)


def heldout_settings(args) -> dict:
    """What the held-out quality rows are (``eval-merge`` sets only rows of the same ones side by side)."""
    return {"sequences": args.heldout_sequences, "seq_len": args.heldout_seq_len, "data": args.data,
            "run_config": getattr(args, "run_config", None)}


def heldout_bos_setting(run_config: str | None) -> bool | str:
    """``data.bos`` of the held-out rows: the run's (``--run-config``), else the default (``auto``)."""
    from ds_hybrid.config import DataConfig, load_config

    return load_config(run_config).data.bos if run_config else DataConfig().bos


def _run_data_record(run) -> tuple[Path, dict] | None:
    """(path, ``data``) of the run_info.json a run's stages wrote (kl's, else finetune's, else align's: every stage
    of a run reads the same data), where this machine has one."""
    for stage in ("kl", "finetune", "align"):
        p = run.stage_dir(stage) / "run_info.json"
        if p.is_file():
            return p, json.loads(p.read_text()).get("data") or {}
    return None


def check_run_split(run, run_config: str, tok, shards) -> None:
    """Refuse held-out rows that are not the ones the run held out: the documents are derived here from this
    machine's corpus, which may not be the one the run trained on (another corpus build, changed files); its
    run_info.json (``out_dir``/<stage>/, when this machine has it) records what it held out."""
    from ds_hybrid.data import tokenizer_fingerprint, val_mismatch

    found = _run_data_record(run)
    if found is None:
        log.warning("--run-config %s: no run_info.json under its out_dir (%s) on this machine, so the held-out rows "
                    "derived here are not checked against the run's", run_config, run.out_dir)
        return
    path, recorded = found
    if recorded.get("tokenizer") != tokenizer_fingerprint(tok):  # (the run recorded its own tokenizer's ids)
        log.warning("--run-config %s: the held-out rows in this tokenizer's ids are not checked against the run's "
                    "(%s records another tokenizer's)", run_config, path)
        return
    why = val_mismatch(recorded, shards)
    if why:
        raise ConfigError("--run-config", run_config, f"the held-out rows derived on this machine are not those the "
                          f"run held out ({why}; {path}): this corpus is not the one the run trained on (another "
                          "build of the embedded corpus, changed files, another commit of a hub dataset), so some "
                          "rows could be training text. "
                          "Evaluate where the run's corpus is, or drop --run-config to score this corpus's default "
                          "split (not held out from these models)")


def _heldout_rows(args, tok) -> tuple[list[torch.Tensor], int | None]:
    """Held-out rows of the corpus (never trained on) in ``tok``'s ids: the documents the split (the run's, with
    --run-config) holds out when counted in this tokenizer's tokens, and the BOS token each row starts with as the
    run's training rows do (its ``data.bos``; ``auto`` without --run-config), or None. For the embedded corpus only
    its held-out documents are read and tokenized (a few hundred thousand tokens, not the corpus)."""
    import numpy as np

    from ds_hybrid.config import DataConfig
    from ds_hybrid.data import PackedSequences, prepare_streams, row_bos

    data, run = DataConfig(source=args.data), None
    if getattr(args, "run_config", None):  # the split the models were trained with: their held-out documents
        from ds_hybrid.config import load_config
        from ds_hybrid.data import is_hub_source, read_hub_pin

        run = load_config(args.run_config)
        data = run.data
        if is_hub_source(data.source):  # the commit the run read (its pin, else a stage's run_info), not today's
            record = (_run_data_record(run) or (None, {}))[1]
            data.revision = read_hub_pin(run) or (record.get("hub") or {}).get("commit") or data.revision
    if data.source == "embedded" and not data.add_eos and data.max_documents is None:
        from ds_hybrid.corpus import held_out_documents
        from ds_hybrid.tokencache import token_dtype

        per: dict[str, list[int]] = {}
        for source, text in held_out_documents(tok, data.val_tokens, data.split_seed):
            per.setdefault(source, []).extend(tok(text, add_special_tokens=False)["input_ids"])
        shards = [(s, np.asarray(ids, dtype=token_dtype(len(tok)))) for s, ids in per.items()]
    else:  # the token cache's held-out slice (only the units that hold it are tokenized)
        shards = prepare_streams(data, tok, need_tokens=0).val
    if run is not None:
        check_run_split(run, args.run_config, tok, shards)
    # rows start as the run's training rows do (data.bos; auto without --run-config: BOS where the tokenizer puts one)
    val = PackedSequences(shards, args.heldout_seq_len, max_rows=args.heldout_sequences, bos=row_bos(data.bos, tok))
    held: dict[str, int] = {}  # held-out tokens per source
    for src, ids in [("data", shards)] if isinstance(shards, np.ndarray) else shards:
        held[str(src)] = held.get(str(src), 0) + len(ids)
    if len(val) == 0:  # (a row never spans two documents' shards: one must hold a whole row)
        raise ConfigError("--heldout-seq-len", args.heldout_seq_len, f"no held-out shard holds a whole row of that "
                          f"many tokens (held-out tokens per source: {held}): use a shorter --heldout-seq-len, or "
                          "--no-quality")
    if len(val) < args.heldout_sequences:
        log.warning("held-out quality: %d rows of %d tokens, not the %d asked (--heldout-sequences): a row never "
                    "spans two shards, and the held-out tokens per source are %s; a shorter --heldout-seq-len gives "
                    "more rows", len(val), args.heldout_seq_len, args.heldout_sequences, held)
    return [val[[i]] for i in range(len(val))], val.bos


def run_bench_infer(args: argparse.Namespace) -> list[dict]:
    from ds_hybrid.evaluation import report
    from ds_hybrid.evaluation.speed import bench_pair
    from ds_hybrid.monitor import versions

    models = parse_models(args.model, args.teacher)
    dev = _device(args.device)
    dtype = _dtype(args.dtype, dev)
    contexts = positive_ints(args.contexts, "--contexts")
    batches = positive_ints(args.batches, "--batches")
    modes = ("eager",)
    if args.cuda_graphs:  # checked before any model is loaded
        if dev.type != "cuda":
            raise ConfigError("--cuda-graphs", True, "CUDA graphs need a GPU: use --device cuda, or drop --cuda-graphs")
        if args.decode_tokens <= 2:  # (the first two steps run eagerly before the capture: no graph would be timed)
            raise ConfigError("--decode-tokens", args.decode_tokens, "with --cuda-graphs, 3 or more: the first two "
                              "steps run eagerly before the graph is captured, and the rows would time no graph")
        modes = ("eager", "cuda_graphs") + (("cuda_graphs_compiled",) if args.compile else ())
    elif args.compile:
        raise ConfigError("--compile", True, "it compiles the CUDA-graph decode step: add --cuda-graphs")
    if args.fuse_projections:  # the last (fastest) mode again with the hybrids' input projections fused
        modes = modes + (modes[-1] + "_fused",)
    folders = check_args(args, models)
    check_out(args, "bench_infer", partial_ok=True)
    for name, folder in folders.items():
        if "text_config" in json.loads((Path(folder) / "config.json").read_text()):
            raise ConfigError(model_field(args, name), models[name],
                              "a multimodal checkpoint: bench-infer times a text model's decoding (a hybrid's teacher "
                              "is its language model alone); write that with `ds-hybrid extract-text --model "
                              f"{models[name]} --out <folder>` and give the folder")
    out_dir = Path(args.out)
    rows: list[dict] = []
    info: dict[str, dict] = {}
    done = 0  # models whose rows are all in

    def write(complete: bool, plot: bool = True) -> str:
        payload = {"versions": versions(), "date": time.strftime("%Y-%m-%d %H:%M:%S"), "device": str(dev),
                   "dtype": str(dtype), "contexts": contexts, "batches": batches, "decode_tokens": args.decode_tokens,
                   "modes": list(modes), "models": info, "rows": rows, "complete": complete}
        shown = rows  # the table and plot name rows by model: with two modes, the mode goes into the name
        if len(modes) > 1:
            shown = [{**r, "model": f"{r['model']} ({r['mode']})"} for r in rows]
        md = report.speed_table(shown)
        if not complete:
            md += f"\n\n(partial: {done} of {len(models)} models done; rows so far: {len(rows)})"
        report.write(out_dir, "bench_infer", payload, md)
        if plot:
            report.plot_speed(shown, out_dir / "bench_infer.png")
        return md

    def landed(row: dict) -> None:  # each row written as it lands: a run stopped part way (a failure in a later
        rows.append(row)            # row, a lease's time limit) keeps every row it measured
        write(complete=False, plot=False)

    # one model on the device at a time (another's weights beside it would take the memory a long context needs,
    # and its rows would not be the model's alone)
    for name in models:
        m, _, _ = load_model(folders[name], dev, dtype)
        if args.cuda_graphs:  # (refused now, not after its eager rows were timed: when the first graph is made)
            from ds_hybrid.graph_decode import eager_graph_refusal, interpreter_graph_refusal

            why = [r for r in (eager_graph_refusal(m, False), interpreter_graph_refusal(m)) if r]
            if why:
                raise ConfigError("--cuda-graphs", True, f"{name}: " + "; and ".join(why))
        info[name] = describe(m)
        bench_pair({name: m}, contexts, batches, args.decode_tokens, modes, on_row=landed)
        del m
        gc.collect()  # (a static decoder and its model hold each other: freed by a collection, not by del)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        done += 1
        md = write(complete=done == len(models))  # (the plot too, once a model's rows are in)
    print(md)
    return rows


def add_eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", action="append", required=True, help="HF folder (hybrid or any causal LM), or name=path; repeatable")
    p.add_argument("--teacher", default=None, help="the teacher to compare with: HF folder or 'embedded'")
    p.add_argument("--suite", default="recall", choices=["recall", "ruler", "niah", "niah6"])
    p.add_argument("--tasks", default=None, help="comma-separated task names instead of a suite ('' for none)")
    p.add_argument("--cuda-graphs", action="store_true", help="greedy generation with a static cache, each decode "
                   "step replayed as a CUDA graph (same tokens, GPU bound; on CPU the same static step runs eagerly)")
    p.add_argument("--lengths", default="2048,4096")
    p.add_argument("--swde", default=None, help="local SWDE file (JSON/JSONL/parquet: text+value or context+key+value)")
    p.add_argument("--fda", default=None, help="local FDA file, same layout")
    p.add_argument("--limit", type=int, default=None, help="examples per task and per length (quick runs)")
    p.add_argument("--max-length", type=int, default=None, help="evaluation length for SWDE/FDA prompts (default: "
                   "the model's context, max_position_embeddings); RULER's haystack lengths are --lengths")
    p.add_argument("--window", default="none", choices=["none", "answer"], help="SWDE/FDA prompts longer than "
                   "--max-length: left-truncated by lm-eval (none), or cut to a window centred on the answer (answer, "
                   "JRT-style)")
    p.add_argument("--haystack", default=None, help="prose files/folders for the essay NIAH (default: embedded held-out)")
    p.add_argument("--data", default="embedded", help="corpus for held-out perplexity / KL (its held-out documents "
                   "under the default split: data.val_tokens 65,536, data.split_seed; see --run-config)")
    p.add_argument("--run-config", default=None, metavar="RUN.yaml", help="the run config the models were trained "
                   "with: its data section (source, val_tokens, split_seed, ...) picks the held-out documents, so "
                   "that a run with other data settings is scored on text it never trained on (overrides --data)")
    p.add_argument("--heldout-sequences", type=int, default=16)
    p.add_argument("--heldout-seq-len", type=int, default=1024)
    p.add_argument("--no-quality", action="store_true", help="skip held-out perplexity and KL")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="outputs/eval")
    p.add_argument("--resume", action="store_true", help="keep the models that an earlier run of the same "
                   "evaluation into --out finished (its eval.json, partial or complete: same settings, a model by "
                   "its name, path and length) and evaluate the rest; a difference in settings is refused by name")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier evaluation in --out (refused without "
                   "this or --resume)")


def add_bench_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", action="append", required=True)
    p.add_argument("--teacher", default=None)
    p.add_argument("--contexts", default="4096,16384,32768")
    p.add_argument("--batches", default="1")
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--cuda-graphs", action="store_true", help="also time decoding with a static cache and the step "
                   "replayed as a CUDA graph: rows with mode eager and cuda_graphs side by side (CUDA only)")
    p.add_argument("--compile", action="store_true", help="with --cuda-graphs: also rows of the step compiled by "
                   "torch.compile before its capture (mode cuda_graphs_compiled; compiles once per shape)")
    p.add_argument("--fuse-projections", action="store_true", help="also rows of the last mode with each linear "
                   "layer's input projections read as one GEMM (mode <last>_fused; hybrids only)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"])
    p.add_argument("--out", default="outputs/bench_infer")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier bench_infer.json in --out (refused "
                   "without it)")
