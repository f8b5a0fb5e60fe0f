"""Data: sources -> units -> token cache (shards) -> packed sequences, mixed over sources.

    streams = prepare_streams(cfg.data, tokenizer, need_tokens=2e8)   # cached on disk (rank 0 builds), shared
    train = PackedSequences(streams.train, seq_len=512, mixture=cfg.data.mixture, seed=cfg.seed)
    rows = step_rows(step, len(train), global_batch=96, seed=0)
    for micro in rank_micro_batches(rows, rank, world, micro_batch=4): batch = train[micro]

- Sources: ``embedded`` (the offline mixture, :mod:`ds_hybrid.corpus`; ``embedded:<name>,...`` for some of its
  sources), local text/json/jsonl/parquet files or folders (one text file = one document; json/jsonl/parquet rows
  read ``data.text_field``), or a hub dataset name where a hub is reachable (streamed through `datasets`).
- Tokenization (:mod:`ds_hybrid.tokencache`): one unit per jsonl/parquet file, per 256 text files, per hub shard or
  per embedded source, by ``data.num_proc`` processes; a run tokenizes only the units its budget needs (plus the
  held-out set), resumes a killed build, and shares the cache safely with other runs.
- Held out by *document*, per source, fixed by ``data.split_seed`` alone: every 8th document of a source's first
  unit until the source's share of ``data.val_tokens``; the same documents for every stage, seq_len and run seed,
  never trained on.
- Documents are concatenated (without separators unless ``data.add_eos``, as the paper) and cut into rows of
  seq_len within each shard; ``data.mixture`` reweights the sources' rows (1 = the source's natural share).
- Order: the rows of step s are a pure function of (seed, s): resuming at step s continues at the exact position.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ds_hybrid.config import DataConfig, RunConfig
from ds_hybrid.folders import atomic_write_text
from ds_hybrid.errors import ConfigError
from ds_hybrid.tokencache import Unit, build, check_visible, done_prefixes, read_shards, token_dtype, val_share

log = logging.getLogger("ds_hybrid")

TEXT_SUFFIXES = {".txt", ".md", ".rst", ".text"}
JSON_SUFFIXES = {".json", ".jsonl"}
PARQUET_SUFFIXES = {".parquet"}
TEXT_FILES_PER_UNIT = 256
CACHE_VERSION = 4  # 3: training documents that repeat a held-out one are left out (tokencache.doc_hash); 4: in
# every unit, those of every source (held-out units saw their own source's earlier ones only), files keyed by mtime_ns
DATA_SOURCE = "data"  # the source name of a user corpus (one source)

Shards = list[tuple[str, np.ndarray]]  # (source, token shard)


@dataclass
class TokenStreams:
    train: Shards
    val: Shards
    meta: dict
    path: Path


def _default_cache_dir() -> Path:
    from ds_hybrid.teacher import cache_dir

    return cache_dir() / "data"


def _hub_name_shape(item: str) -> bool:
    """A name that is not a path here could be a hub dataset's: not written as a path, no file suffix."""
    return not item.startswith((".", "/", "~")) and Path(item).suffix.lower() not in (
        TEXT_SUFFIXES | JSON_SUFFIXES | PARQUET_SUFFIXES)


DATASET_PAPERS = ("README", "LICENSE", "LICENCE", "CITATION")  # (a downloaded dataset's card, licence, citation)
# a dataset's split, as downloads name it: a folder (validation/), a shard (test-00000-of-00001.parquet,
# c4-validation.00000-of-00008.json.gz) or a data file named for it (test.jsonl)
SPLIT_NAMES = ("train", "validation", "valid", "val", "test", "dev", "eval")
_SPLIT_SHARD = re.compile(r"(?:^|[-_.])(" + "|".join(SPLIT_NAMES) + r")(?:[-_.]\d|$)")


def dataset_split(rel: Path) -> str | None:
    """The split a corpus file's path (relative to its folder) names, or None."""
    for part in rel.parts[:-1]:
        if part.lower() in SPLIT_NAMES:
            return part.lower()
    stem = rel.name.lower()
    for suffix in (".gz", ".jsonl", ".json", ".parquet"):
        stem = stem.removesuffix(suffix)
    if stem != rel.name.lower() and stem in SPLIT_NAMES:  # (test.jsonl; not test.txt, a document's name)
        return stem
    m = _SPLIT_SHARD.search(stem)
    return m.group(1) if m else None


def check_one_split(folder: Path, files: list[Path], field: str) -> None:
    """A folder that holds a dataset's training split beside its other splits (a whole download: c4's
    c4-train.* and c4-validation.*, wikitext's train-/test-/validation-*.parquet): refused, since every file of a
    folder is read and the other splits would be trained on."""
    splits: dict[str, list[Path]] = {}
    for f in files:
        if (name := dataset_split(f.relative_to(folder))) is not None:
            splits.setdefault(name, []).append(f)
    others = {k: v for k, v in splits.items() if k != "train"}
    if "train" in splits and others:
        example = next(iter(others.values()))[0]
        raise ConfigError(field, str(folder), f"holds a dataset's train split and its {', '.join(sorted(others))} "
                          f"split{'s' if len(others) > 1 else ''} too (e.g. {example}): every file of a folder is "
                          f"read, so those would be trained on. List the train files (data.source: "
                          f"[{splits['train'][0]}, ...]) or move the other splits out of the folder")


def source_files(source: str | list[str], field: str = "data.source") -> list[Path] | None:
    """Local files a source names (sorted), or None for a hub dataset name; a file named twice (a folder and a file
    in it) is refused: its documents would be read twice, held out in one place and trained on in the other."""
    items = [source] if isinstance(source, str) else list(source)
    files: list[Path] = []
    for item in items:
        if not isinstance(source, str) and (item == "embedded" or str(item).startswith("embedded:")):
            raise ConfigError(field, item, "the embedded corpus is a source on its own (data.source: embedded, or "
                              "embedded:<its sources>), not an item of a list of local files; to train on both, list "
                              "its built files beside yours (<source>.jsonl.gz in the folder `ds-hybrid corpus build` "
                              "writes, ~/.cache/ds_hybrid/corpus/ by default)")
        p = Path(item).expanduser()
        if p.is_dir():
            # (hidden files and folders skipped: e.g. the .cache/ of `hf download --local-dir`; and a downloaded
            # dataset's card and licence, which are not its documents)
            found = sorted(f for f in p.rglob("*")
                           if f.is_file() and not any(part.startswith(".") for part in f.relative_to(p).parts)
                           and f.name.split(".")[0].upper() not in DATASET_PAPERS)
            if not found:
                raise ConfigError(field, item, "this folder holds no files")
            check_one_split(p, found, field)
            files.extend(found)
        elif p.is_file():
            files.append(p)
        elif isinstance(source, str) and _hub_name_shape(item):
            return None  # a hub dataset name, e.g. "mlfoundations/dclm-baseline-1.0"
        elif _hub_name_shape(item):
            raise ConfigError(field, item, f"no such file or folder here ({os.getcwd()}); a hub dataset is named on "
                              "its own (data.source: org/name), not in a list, which holds local files and folders")
        else:
            raise ConfigError(field, item, "no such file or folder (give local files/folders, 'embedded', or a hub dataset name)")
    resolved: dict[Path, Path] = {}
    for f in files:
        r = Path(os.path.abspath(f))  # (not resolve(): a hub snapshot's files are links, two of them to one blob)
        if r in resolved:
            raise ConfigError(field, source, f"names {f} twice (as {resolved[r]} too): a folder and a file in it, or "
                              "one file twice; name each file once")
        resolved[r] = f
    return files


def _kind(f: Path) -> str | None:
    """The reader of a corpus file, from its name: text (.txt, .md, .rst, .text or no suffix), jsonl, json (each
    optionally .gz) or parquet; None for anything else (.zst, .xz, .arrow, ...), which is refused, not read as text."""
    name = f.name.lower()
    base = name.removesuffix(".gz")
    suffix = Path(base).suffix
    if suffix in PARQUET_SUFFIXES:
        return "parquet" if base == name else None
    if suffix in (".jsonl", ".json"):
        return suffix[1:]
    return "text" if suffix in TEXT_SUFFIXES or suffix == "" else None


def _check_kinds(files: list[Path]) -> None:
    bad = [f for f in files if _kind(f) is None]
    if bad:
        shown = ", ".join(str(f) for f in bad[:5]) + (f" (+{len(bad) - 5} more)" if len(bad) > 5 else "")
        raise ConfigError("data.source", shown, "files of a kind ds-hybrid does not read (it reads .txt/.md/.rst/.text "
                          "and suffix-less text, .json/.jsonl, each optionally .gz, and .parquet): decompress them "
                          "(e.g. `zstd -d` for DCLM's .jsonl.zst) or move them out of the folder")


def units_for(cfg: DataConfig, is_main: bool = True, barrier: Callable[[], None] | None = None) -> dict[str, list[Unit]]:
    """The units of every source of ``data.source``, in their fixed order."""
    src = cfg.source
    if isinstance(src, str) and (src == "embedded" or src.startswith("embedded:")):
        from ds_hybrid.corpus import ensure_embedded, select_sources

        path = ensure_embedded(is_main, barrier)
        return {name: [Unit(name, 0, "docs", (str(path / f"{name}.jsonl.gz"),))] for name in select_sources(src, path)}
    files = source_files(src)
    if files is None:
        return {DATA_SOURCE: _hub_units(src, cfg.text_field, cfg.hub_config, cfg.revision, cache_root(cfg))}
    _check_kinds(files)
    text = [f for f in files if _kind(f) == "text"]
    units = [Unit(DATA_SOURCE, 0, "text", tuple(str(f) for f in text[i:i + TEXT_FILES_PER_UNIT]))
             for i in range(0, len(text), TEXT_FILES_PER_UNIT)]
    units += [Unit(DATA_SOURCE, 0, _kind(f), (str(f),), text_field=cfg.text_field) for f in files if _kind(f) != "text"]
    return {DATA_SOURCE: [Unit(u.source, i, u.kind, u.paths, u.hub, u.text_field) for i, u in enumerate(units)]}


COMMIT_RE = re.compile(r"[0-9a-f]{40}")


def hub_commit(name: str, revision: str | None) -> str:
    """The commit a hub dataset's ``revision`` (branch, tag or commit; None = its default branch) is at now; a full
    commit is its own answer (no call to the hub)."""
    if revision and COMMIT_RE.fullmatch(revision):
        return revision
    from huggingface_hub import HfApi

    try:
        sha = HfApi().dataset_info(name, revision=revision).sha
    except Exception as e:  # noqa: BLE001 - offline machines, unknown names and unknown revisions all land here
        # (by class name along the hierarchy: huggingface_hub has moved its error classes between versions)
        names = {c.__name__ for c in type(e).__mro__}
        if "RevisionNotFoundError" in names:
            field, value, what = "data.revision", revision, "has no such branch, tag or commit"
        elif names & {"RepositoryNotFoundError", "GatedRepoError"}:
            field, value, what = "data.source", name, "is not a dataset this machine may read (unknown, private or gated)"
        else:
            field, value, what = "data.source", name, "could not be reached (no network or hub here?)"
        raise ConfigError(field, value, f"the hub dataset {name!r} {what} at {revision or 'its default branch'} "
                          f"({type(e).__name__}: {str(e)[:200]}), and no local file or folder has that path here "
                          f"({os.getcwd()}); give local files or 'embedded', or a dataset and revision the hub "
                          "has") from None
    if not sha:
        raise ConfigError("data.source", name, "the hub returned no commit for this dataset: pin one with data.revision")
    return sha


def _on_main(fn):
    """``fn()`` on the main rank only, its result on every rank; an error there is raised on every rank (as a
    ConfigError where it was one), so that no rank waits in a collective for a result that never comes."""
    from ds_hybrid import distributed as D

    def run():
        try:
            return fn(), None
        except ConfigError as e:
            return None, (e.field, e.value, e.fix)
        except Exception as e:  # noqa: BLE001 - e.g. an unwritable out_dir: said everywhere, named
            return None, ("data.source", "(main rank)", f"{type(e).__name__}: {e}")

    out, error = D.main_reads(run)
    if error is not None:
        raise ConfigError(*error)
    return out


HUB_PIN = "hub_commit.json"  # in a run's out_dir: the commit every stage, probe and resume of the run reads


def is_hub_source(source: str | list[str]) -> bool:
    """Whether data.source names a hub dataset (not the embedded corpus, nor local files): one name that is no
    path here (one stat; :func:`source_files` says the rest, with its errors, when the data is read)."""
    if not isinstance(source, str) or source == "embedded" or source.startswith("embedded:"):
        return False
    return not Path(source).expanduser().exists() and _hub_name_shape(source)


def _hub_pin_key(d: DataConfig) -> dict:
    return {"source": d.source, "hub_config": d.hub_config, "revision": d.revision}


def read_hub_pin(cfg: RunConfig) -> str | None:
    """The commit a run pinned for its data settings as they are now (its ``out_dir``/hub_commit.json), else None."""
    pin = Path(cfg.out_dir) / HUB_PIN
    try:
        rec = json.loads(pin.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        log.warning("data: %s is unreadable (%s): taken as absent", pin, e)
        return None
    same = isinstance(rec, dict) and {k: rec.get(k) for k in _hub_pin_key(cfg.data)} == _hub_pin_key(cfg.data)
    commit = rec.get("commit") if same else None
    return commit if isinstance(commit, str) and COMMIT_RE.fullmatch(commit) else None


def pin_hub_commit(cfg: RunConfig) -> None:
    """A hub source is read at one commit for the whole run: ``data.revision`` (null: the default branch) is
    resolved once, on the main rank, kept in ``out_dir``/hub_commit.json and read back by every later stage, probe,
    Slurm array task, resume and ``eval --run-config`` of the run, and ``cfg.data.revision`` becomes that commit (so
    the probes' and the selection's identities hold it). Data settings changed since (source, hub_config, revision)
    resolve again, said in a warning; delete the file (or set ``data.revision``) to read a newer commit."""
    d = cfg.data
    if d.revision and COMMIT_RE.fullmatch(d.revision):
        return  # a commit does not move (a pinned config, e.g. a probe's copy): nothing to resolve

    def resolve() -> str | None:
        if not is_hub_source(d.source):
            return None
        commit = read_hub_pin(cfg)
        if commit is not None:
            return commit
        pin = Path(cfg.out_dir) / HUB_PIN
        commit = hub_commit(d.source, d.revision)
        if pin.is_file():
            log.warning("data: %s (configuration %s) at %s is commit %s; this run's earlier stages read other data "
                        "settings (%s): from now on this commit", d.source, d.hub_config,
                        d.revision or "the default branch", commit[:12], pin.read_text().strip()[:300])
        try:
            pin.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(pin, json.dumps({**_hub_pin_key(d), "commit": commit}, indent=1))
        except OSError as e:
            raise ConfigError("out_dir", cfg.out_dir, f"the hub dataset's commit cannot be recorded in {pin} "
                              f"({e.strerror or e}): make out_dir a writable folder") from None
        return commit

    commit = _on_main(resolve)  # (every rank calls it, hub source or not: one decision, the main rank's)
    if commit is not None:
        log.info("data: %s at commit %s (%s)", d.source, commit, Path(cfg.out_dir) / HUB_PIN)
        d.revision = commit


def with_hub_request(meta: dict, cfg: RunConfig) -> dict:
    """A token cache's ``meta`` for a run's records, with, for a hub dataset, the ``data.revision`` the run asked for
    (``hub.requested``: a branch or tag, None for the default branch, as kept in ``out_dir``/hub_commit.json; the
    commit itself where the configuration named one and nothing was resolved) beside the commit it was read at
    (``hub.commit``; ``hub.revision`` is that commit once pinned)."""
    hub = meta.get("hub")
    if not hub:
        return meta
    try:
        rec = json.loads((Path(cfg.out_dir) / HUB_PIN).read_text())
    except (OSError, ValueError):
        rec = None  # (no pin: the config named a commit, nothing was resolved)
    mine = isinstance(rec, dict) and rec.get("commit") == hub.get("commit") and \
        (rec.get("source"), rec.get("hub_config")) == (cfg.data.source, cfg.data.hub_config)
    return {**meta, "hub": {**hub, "requested": rec.get("revision") if mine else cfg.data.revision}}


def cache_root(cfg: DataConfig) -> Path:
    """The folder that holds a run's token caches (``data.cache_dir``, else the ds-hybrid cache's data/)."""
    return Path(cfg.cache_dir).expanduser() if cfg.cache_dir else _default_cache_dir()


def _hub_units(name: str, text_field: str, config: str | None = None, revision: str | None = None,
               root: Path | None = None) -> list[Unit]:
    """One unit per shard of the dataset's train split at one commit (``revision`` resolved now, on the main rank,
    which also lists the shards): the units, and so the token cache's key, name the commit, and every worker streams
    that commit, whatever the hub has later. A commit's shard count is kept under ``root`` (hub_listings/): a run
    pinned to a commit (every stage after the first, probes, resumes) lists nothing again, so a GPU job on offline
    nodes reads a cache `--prepare-data` built online, and a selection's probes do not each ask the hub."""

    def listing() -> tuple[str, int]:
        import datasets

        commit = hub_commit(name, revision)
        kept = root / "hub_listings" / (hashlib.sha256(json.dumps([name, config, commit]).encode()).hexdigest()[:16]
                                        + ".json") if root is not None else None
        if kept is not None and kept.is_file():
            try:
                return commit, int(json.loads(kept.read_text())["n_shards"])
            except (ValueError, KeyError, TypeError):
                pass  # (unreadable: listed again)
        try:
            ds = datasets.load_dataset(name, config, split="train", streaming=True, revision=commit)
        except Exception as e:  # noqa: BLE001
            field, value = ("data.hub_config", config) if config else ("data.source", name)
            raise ConfigError(field, value, f"the hub dataset {name!r} at commit {commit[:12]} could not be streamed "
                              f"({type(e).__name__}: {str(e)[:200]})") from None
        n = max(1, int(getattr(ds, "n_shards", 1) or 1))
        if kept is not None:
            try:
                kept.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_text(kept, json.dumps({"name": name, "config": config, "commit": commit,
                                                    "n_shards": n}))
            except OSError as e:
                raise ConfigError("data.cache_dir", str(root), f"the hub dataset's shard listing cannot be kept in "
                                  f"{kept} ({e.strerror or e}): set data.cache_dir to a writable folder") from None
        return commit, n

    commit, n = _on_main(listing)
    return [Unit(DATA_SOURCE, i, "hub", (), (name, config, "train", i, n), text_field, revision=commit)
            for i in range(n)]


def tokenizer_fingerprint(tokenizer) -> str:
    """A digest of what turns text into ids: the fast tokenizer's definition without its truncation and padding
    settings, which a call with ``truncation=True`` or ``padding=...`` changes in place (and which leave the ids of a
    document alone), so a tokenizer keys the same cache before and after use."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        from tokenizers import Tokenizer

        backend = Tokenizer.from_str(backend.to_str())
        backend.no_truncation()
        backend.no_padding()
    blob = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def cache_key(cfg: DataConfig, units: dict[str, list[Unit]], tokenizer) -> str:
    h = hashlib.sha256()
    for source, us in units.items():
        h.update(source.encode())
        for u in us:
            h.update(u.fingerprint().encode())
    # add_eos: which token separates the documents is part of the cached tokens (the fingerprint omits it)
    eos = tokenizer.eos_token_id if cfg.add_eos else False
    h.update(json.dumps({"v": CACHE_VERSION, "tok": tokenizer_fingerprint(tokenizer), "eos": eos,
                         "val": cfg.val_tokens, "split": cfg.split_seed, "max_docs": cfg.max_documents},
                        sort_keys=True).encode())
    return h.hexdigest()[:20]


def prepare_streams(cfg: DataConfig, tokenizer, is_main: bool = True, barrier: Callable[[], object] | None = None,
                    need_tokens: float = math.inf, seq_len: int = 1,
                    from_main: Callable[[str], str] | None = None,
                    stop: Callable[[], None] | None = None) -> TokenStreams:
    """Tokenize what a run needs (rank 0; other ranks wait at ``barrier``), then memory-map it everywhere.

    ``need_tokens``: training tokens the run will read; a source made of several units (a large corpus) is tokenized
    only until its units cover it, counted in whole rows of ``seq_len`` tokens (a row never spans two units). The
    embedded corpus is always tokenized whole (its sources are single units).

    ``from_main(value)``: the main rank's value on every rank once it gets there (``distributed.wait_for_main``; in
    place of ``barrier`` for the build). The main rank passes its cache folder and the prefix it built, so every
    rank reads the same shards: a node whose copy of the corpus files differs in size or modification time
    (node-local copies) would compute another key and fingerprints, and look for units that nobody built. Without
    it, the other ranks find the prefix from the done markers. ``stop``: the build's check between waves of units
    (:func:`ds_hybrid.tokencache.build`; on the main rank, which alone builds: a local check, no collective)."""
    if cfg.add_eos and tokenizer.eos_token_id is None:
        raise ConfigError("data.add_eos", True, "this tokenizer has no end-of-sequence token to put between the "
                          "documents: set add_eos: false (documents concatenated as the paper does)")
    units = units_for(cfg, is_main, barrier)
    if cfg.mixture:
        unknown = sorted(set(cfg.mixture) - set(units))
        if unknown:
            raise ConfigError(f"data.mixture.{unknown[0]}", cfg.mixture[unknown[0]],
                              f"not a source of this corpus; its sources: {', '.join(units)}")
    root = cache_root(cfg)
    key = cache_key(cfg, units, tokenizer)
    out = root / key
    dtype = token_dtype(len(tokenizer))
    share = need_tokens / len(units) if math.isfinite(need_tokens) else math.inf
    need = {s: (share if len(us) > 1 else math.inf) for s, us in units.items()}
    vals = {s: val_share(cfg.val_tokens, len(units)) for s in units}
    used = None
    if is_main:
        used = build(units, tokenizer, out, need, vals, dtype, cfg.add_eos, cfg.split_seed, cfg.num_proc,
                     cfg.max_documents, row_tokens=seq_len, stop=stop)
    if from_main is not None:  # the main rank's folder and prefix, passed when its build is done
        shared = json.loads(from_main(json.dumps({"key": key, "used": used})))
        if shared["key"] != key:
            log.warning("this rank sees the files of data.source otherwise (sizes or modification times) than the "
                        "main rank: it reads the main rank's token cache %s (its own key would be %s); the files "
                        "must hold the same text on every node", shared["key"], key)
        out, used = root / shared["key"], shared["used"]
        check_visible(out, [r for rs in used.values() for r in rs])
    else:
        if barrier is not None:
            barrier()
        if used is None:  # the same prefix from the markers (a file written by rank 0 could be another job's by now)
            used = done_prefixes(units, out, need, vals, seq_len)
    train = [(s, a) for s in units for a in read_shards(out, used[s], "train", dtype)]
    val = [(s, a) for s in units for a in read_shards(out, used[s], "val", dtype)]
    meta = {"version": CACHE_VERSION, "source": cfg.source if isinstance(cfg.source, str) else list(cfg.source),
            "token_dtype": dtype.name, "tokenizer": tokenizer_fingerprint(tokenizer), "add_eos": cfg.add_eos,
            "split_seed": cfg.split_seed, "mixture": cfg.mixture,
            "train_tokens": sum(len(a) for _, a in train), "val_tokens": sum(len(a) for _, a in val),
            "val_digest": val_digest(val),
            "documents": sum(r["documents"] for rs in used.values() for r in rs),
            "val_documents": sum(r["val_documents"] for rs in used.values() for r in rs),
            "sources": {s: {"units": len(rs), "units_available": len(units[s]),
                            "documents": sum(r["documents"] for r in rs),
                            "train_tokens": sum(r["train_tokens"] for r in rs),
                            "val_tokens": sum(r["val_tokens"] for r in rs),
                            "val_documents": sum(r["val_documents"] for r in rs),
                            # training documents left out as copies of held-out ones (tokencache.doc_hash)
                            "duplicates_of_held_out": sum(r.get("duplicates", 0) for r in rs)}
                        for s, rs in used.items()}}
    if meta["train_tokens"] + meta["val_tokens"] == 0:  # (not a seq_len problem: there is no text to cut rows from)
        raise ConfigError("data.source", cfg.source if isinstance(cfg.source, str) else list(cfg.source),
                          f"no text in its {sum(len(u.paths) or 1 for us in units.values() for u in us)} file(s) "
                          f"({meta['documents']} "
                          f"documents, all empty; data.text_field={cfg.text_field!r}): point it at files of text, or "
                          "name the field that holds the text")
    commits = {u.revision for us in units.values() for u in us if u.revision}
    if commits:  # a hub dataset: the commit its tokens came from (data.revision, or what the default branch was at)
        meta["hub"] = {"config": cfg.hub_config, "revision": cfg.revision, "commit": commits.pop()}
    if isinstance(cfg.source, str) and (cfg.source == "embedded" or cfg.source.startswith("embedded:")):
        from ds_hybrid.corpus import embedded_dir, manifest

        described = manifest(embedded_dir())["sources"]
        for s in meta["sources"]:
            meta["sources"][s].update({k: described[s][k] for k in ("description", "license", "packages")})
    return TokenStreams(train=train, val=val, meta=meta, path=out)


def val_digest(val: list[tuple[str, np.ndarray]]) -> dict[str, str]:
    """Per source, a digest of its held-out token ids in order (whatever the shards' integer width): what
    ``ds-hybrid eval --run-config`` checks that the held-out documents it derives are the run's."""
    out: dict = {}
    for source, a in val:
        out.setdefault(source, hashlib.sha256()).update(np.asarray(a, dtype=np.uint32).tobytes())
    return {s: h.hexdigest()[:16] for s, h in out.items()}


def val_mismatch(recorded: dict, val: list[tuple[str, np.ndarray]]) -> str | None:
    """How held-out tokens derived now differ from a run's (its run_info ``data``: the digests since 2026-12-06,
    else the per-source token counts), or None when they agree. Only meaningful for the run's tokenizer."""
    now = val_digest(val)
    if "val_digest" in recorded:
        for s in sorted(set(now) | set(recorded["val_digest"])):
            if now.get(s) != recorded["val_digest"].get(s):
                return f"source {s}: held-out token digest {now.get(s)} here, {recorded['val_digest'].get(s)} in the run"
        return None
    counts: dict[str, int] = {}
    for s, a in val:
        counts[s] = counts.get(s, 0) + len(a)
    for s, rec in sorted(recorded.get("sources", {}).items()):
        if counts.get(s, 0) != rec.get("val_tokens"):
            return f"source {s}: {counts.get(s, 0)} held-out tokens here, {rec.get('val_tokens')} in the run"
    return None


def warn_unrepresented(streams: TokenStreams, val: PackedSequences, field: str) -> list[str]:
    """Warn (main process) of the sources whose held-out share is shorter than one row: at a long seq_len the
    held-out score then comes from the other sources only. Returns those sources."""
    held = {s for s, a in streams.val if len(a)}
    empty = sorted(s for s in held if not val.source_rows.get(s))
    if empty and os.environ.get("RANK", "0") in ("0", ""):
        log.warning("%s=%d: %d of %d sources hold out less than one row of text (%s), so the held-out score leaves "
                    "them out; raise data.val_tokens (each source holds out an equal share of it) for every source "
                    "to count", field, val.seq_len, len(empty), len(held), ", ".join(empty))
    return empty


def row_bos(setting: bool | str, tokenizer) -> int | None:
    """The token each row starts with (``data.bos``), or None: ``auto`` gives the tokenizer's BOS where it puts one
    before every text it encodes (Gemma, Llama 3: every prompt at use starts with it, and a model never shown it in
    training meets it first at every generation), none where it does not (SmolLM2, Qwen)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if setting == "auto":
        if bos is None:
            return None
        ids = tokenizer("a")["input_ids"]
        return bos if ids and ids[0] == bos else None
    if setting and bos is None:
        raise ConfigError("data.bos", True, "this tokenizer has no BOS token: set data.bos to false or auto")
    return bos if setting else None


class PackedSequences:
    """Rows of ``seq_len`` tokens cut from token shards (a row never spans two shards; each shard's remainder is
    dropped), over one stream or several sources. Indexing returns int64 tensors.

    ``mixture`` ({source: weight}, 1 = natural): a source's rows are repeated or subsampled (seeded) to weight x its
    row count, each pass over the data; the shares are then those weighted counts over their sum. Weights are not
    normalised: {a: 0.5, b: 0.5} trains on half of each source's rows, not on all of them. ``max_rows``
    (evaluation): the first rows taken round-robin over the
    sources, so that every source is represented."""

    def __init__(self, streams: np.ndarray | Shards, seq_len: int, max_rows: int | None = None,
                 mixture: dict[str, float] | None = None, seed: int = 0, bos: int | None = None):
        if isinstance(streams, np.ndarray):
            streams = [(DATA_SOURCE, streams)]
        self.shards = [a for _, a in streams]
        self.seq_len = seq_len
        self.bos = bos  # (row_bos: each row is then bos + seq_len - 1 tokens of its shard)
        self.span = seq_len - (bos is not None)
        by_source: dict[str, list[np.ndarray]] = {}
        for k, (s, a) in enumerate(streams):
            n = len(a) // self.span if self.span > 0 else 0
            rows = np.stack([np.full(n, k, dtype=np.int64), np.arange(n, dtype=np.int64)], axis=1)
            by_source.setdefault(s, []).append(rows)
        per = {s: np.concatenate(r) if r else np.zeros((0, 2), np.int64) for s, r in by_source.items()}
        if mixture:
            per = _reweighted(per, mixture, seed)
        if max_rows is not None:
            order = [r for i in range(max((len(v) for v in per.values()), default=0)) for v in per.values() if i < len(v)
                     for r in [v[i]]]
            table = np.array(order[:max_rows], dtype=np.int64).reshape(-1, 2)
        else:
            table = np.concatenate(list(per.values())) if per else np.zeros((0, 2), np.int64)
        self.table = table
        self.n = len(table)
        self.source_rows = {s: len(v) for s, v in per.items()}

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, rows: np.ndarray) -> torch.Tensor:
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= self.n):
            raise IndexError(f"rows out of range 0..{self.n - 1}")
        L, S = self.seq_len, self.span
        out = np.stack([self.shards[k][r * S:(r + 1) * S] for k, r in self.table[rows].tolist()]) if rows.size else \
            np.zeros((0, S), dtype=np.int64)
        out = out.astype(np.int64)
        if self.bos is not None:
            out = np.concatenate([np.full((len(out), 1), self.bos, dtype=np.int64), out], axis=1)
        return torch.from_numpy(out.reshape(-1, L))


def _reweighted(per: dict[str, np.ndarray], mixture: dict[str, float], seed: int) -> dict[str, np.ndarray]:
    """Each source's rows, weight x its row count of them a pass: a weight of 1 (unlisted) keeps each row once, under
    1 a seeded subset, over 1 whole copies and a seeded remainder. (Until 2026-12-06 the counts were scaled back to
    the natural total, which repeated rows of weight-1 sources within a pass; the shares are the same.)"""
    out = {}
    for s, v in per.items():
        w = float(mixture.get(s, 1.0))
        want = int(round(w * len(v)))
        if want == 0 and w > 0 and len(v):  # (a source asked for, silently gone: a weight of 0 is how to leave it out)
            raise ConfigError(f"data.mixture.{s}", mixture[s], f"gives 0 of the source's {len(v)} rows at this "
                              f"seq_len (weight x rows rounds to 0): raise it to at least {1 / len(v):.3g}, or set "
                              "0 to leave the source out")
        if want == 0 or len(v) == 0:
            out[s] = v[:0]
            continue
        perm = np.random.default_rng([seed, int(hashlib.sha256(s.encode()).hexdigest()[:8], 16)]).permutation(len(v))
        out[s] = v[perm[np.arange(want) % len(v)]]
    return out


def device_micro_batches(seqs: PackedSequences, micro: list[np.ndarray], device: torch.device) -> list[torch.Tensor]:
    """A step's micro-batches on ``device`` with one host-to-device copy: the rows are gathered into one tensor,
    pinned and copied without blocking (a copy from pageable memory waits for the GPU to drain first), then split
    into views. On CPU the rows are simply returned as tensors."""
    sizes = [len(m) for m in micro]
    batch = seqs[np.concatenate(micro)] if micro else seqs[np.zeros(0, dtype=np.int64)]
    if device.type == "cuda":
        batch = batch.pin_memory().to(device, non_blocking=True)
    return list(batch.split(sizes))


@functools.lru_cache(maxsize=2)
def _epoch_permutation(seed: int, epoch: int, n_rows: int) -> np.ndarray:
    """An epoch's row order (kept: every step of an epoch reads the same one; a fresh permutation of 2e7 rows a step
    was over a second of the step's host time)."""
    perm = np.random.default_rng([seed, epoch]).permutation(n_rows)
    perm.setflags(write=False)
    return perm


def step_rows(step: int, n_rows: int, global_batch: int, seed: int) -> np.ndarray:
    """The rows of optimizer step ``step``: a seeded permutation per epoch, consumed in order, wrapping epochs."""
    if n_rows < 1:
        raise ValueError("no training rows")
    pos = np.arange(step * global_batch, (step + 1) * global_batch, dtype=np.int64)
    epochs, offsets = pos // n_rows, pos % n_rows
    out = np.empty(global_batch, dtype=np.int64)
    for e in np.unique(epochs):
        perm = _epoch_permutation(seed, int(e), n_rows)
        sel = epochs == e
        out[sel] = perm[offsets[sel]]
    return out


def rank_micro_batches(rows: np.ndarray, rank: int, world: int, micro_batch: int) -> list[np.ndarray]:
    """Split a step's rows: accumulation step a, rank r gets rows[(a * world + r) * micro : ... + micro]."""
    per = world * micro_batch
    if len(rows) % per:
        raise ValueError(f"global batch {len(rows)} is not a multiple of world x micro = {per}")
    return [rows[(a * world + rank) * micro_batch:(a * world + rank + 1) * micro_batch] for a in range(len(rows) // per)]
