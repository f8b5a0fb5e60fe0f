"""A sharded token cache: documents -> token ids on disk, one shard per unit of input, built by several processes.

A *unit* is a piece of input that one worker tokenizes on its own: one jsonl/parquet file, a group of text files,
one shard of a hub dataset streamed through `datasets`, or one source of the embedded corpus. Each unit becomes
``<cache>/<source>/uNNNNN.{train,val}.bin`` plus a done marker ``uNNNNN.json`` written last (temp file + rename,
the shards on disk before the marker is), so that:

- a run tokenizes only the units its token budget needs (units in order until their training tokens cover it,
  plus at most one unit per worker of the last wave), plus the held-out set, and a later run with a larger budget
  extends the same cache;
- a killed build resumes where it stopped: finished units have their marker, a unit cut short has none and is
  redone from its start; so is a unit whose marker is unreadable or whose shards are not the size it records (a
  node's crash can leave either);
- two runs that share a cache never corrupt it: a unit is claimed with a file lock, its files are renamed into
  place only when complete, and a run that finds a unit locked waits for its marker;
- memory stays flat: documents stream in batches (pyarrow / json lines / `datasets` streaming), each batch is
  tokenized and appended to the shard file, and nothing accumulates.

Held-out documents come from a source's first units: every 8th document (a seeded choice, fixed by
``data.split_seed`` alone) until the source's share of ``data.val_tokens`` is reached; they are never trained on, nor
are their copies anywhere in the corpus (:func:`doc_hash`).

    units = units_for(source_spec)
    used = build(units, tokenizer, cache_dir, need={"data": 6e8}, val_tokens={"data": 65536}, num_proc=8)
"""

from __future__ import annotations

import errno
import fcntl
import gzip
import hashlib
import itertools
import json
import logging
import math
import os
import signal
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ds_hybrid.errors import ConfigError
from ds_hybrid.folders import FLOCK_FILE_SYSTEMS, atomic_write_text, fsync_dir, fsync_file

log = logging.getLogger("ds_hybrid")

BATCH_DOCS = 256  # documents tokenized per call: bounds memory whatever the unit's size
TEXT_DOCUMENT_CHARS = 100_000  # a text file larger than this is read as several documents (text_documents)
VAL_EVERY = 8  # in a source's first units, every 8th document (seeded) is held out until the source's quota is met


@dataclass(frozen=True)
class Unit:
    source: str  # the mixture source it belongs to
    index: int  # position in the source's unit order
    kind: str  # "jsonl", "json", "parquet", "text", "docs" (the embedded corpus's jsonl.gz), "hub"
    paths: tuple[str, ...] = ()
    hub: tuple = ()  # (dataset name, config or None, split, shard index, number of shards[, data_files])
    text_field: str = "text"
    revision: str = ""  # a hub unit's dataset commit ("" for the others)

    @property
    def name(self) -> str:
        return f"u{self.index:05d}"

    def fingerprint(self) -> str:
        key = [self.source, self.index, self.kind, self.hub, self.text_field] + ([self.revision] if self.revision else [])
        if self.kind == "text":  # how a large file is cut into documents (text_documents) is part of its tokens
            key.append(TEXT_DOCUMENT_CHARS)
        if any(_is_gz(p) and not p.endswith(".gz") for p in self.paths):
            key.append("gz-any-case")  # (read as their compressed bytes until 2026-12-07: those caches are not reused)
        h = hashlib.sha256(json.dumps(key).encode())
        for p in self.paths:
            st = Path(p).stat()
            # (nanoseconds: an edit of the same size within the same second is another input)
            h.update(f"{Path(p).resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
        return h.hexdigest()[:16]


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 while every id fits (SmolLM2's 49,152, Llama-3's 128,256 does not): half the disk and page cache."""
    return np.dtype(np.uint16 if vocab_size <= 65536 else np.uint32)


# ---- reading documents ------------------------------------------------------------------------------------------
def iter_documents(unit: Unit) -> Iterator[str]:
    """The unit's documents, streamed (a batch of rows at a time, never the whole file). A file that cannot be read
    as its kind (not UTF-8, a compressed file cut short or not compressed at all) is a ConfigError naming it."""
    if unit.kind == "hub":
        import datasets

        name, config, split, shard, n_shards = unit.hub[:5]
        files = list(unit.hub[5]) if len(unit.hub) > 5 else None
        ds = datasets.load_dataset(name, config, split=split, streaming=True, data_files=files,
                                   revision=unit.revision or None)
        if n_shards > 1:
            ds = ds.shard(num_shards=n_shards, index=shard)
        for row in ds:
            yield _field(row, unit.text_field, name)
        return
    if unit.kind not in ("text", "docs", "jsonl", "json", "parquet"):
        raise ValueError(f"unknown unit kind {unit.kind!r}")
    for p in unit.paths:
        try:
            yield from _file_documents(unit, p)
        except UnicodeDecodeError as e:
            raise ConfigError("data.source", p, f"is not UTF-8 text ({e.reason} at byte {e.start}): re-encode it "
                              "as UTF-8 (e.g. iconv -f latin1 -t utf-8) or remove it") from None
        except (EOFError, gzip.BadGzipFile, zlib.error) as e:
            raise ConfigError("data.source", p, f"cannot be decompressed ({type(e).__name__}: {e}): a file cut "
                              "short (an interrupted download?) or not gzip despite its name; fix or remove it") \
                from None


def _is_gz(path: str) -> bool:
    return path.lower().endswith(".gz")  # (as the kind is read from the name: BOOK.TXT.GZ is compressed text)


def _file_documents(unit: Unit, p: str) -> Iterator[str]:
    if unit.kind == "text":
        # (UTF-8 whatever the locale: the tokens must not depend on the machine, and the cache key cannot see it)
        with (gzip.open(p, "rt", encoding="utf-8", errors="replace") if _is_gz(p)
              else open(p, encoding="utf-8", errors="replace")) as f:
            yield from text_documents(f)
    elif unit.kind == "docs":
        with gzip.open(p, "rt", encoding="utf-8") as f:
            for line in f:
                yield json.loads(line)["text"]
    elif unit.kind in ("jsonl", "json"):
        opener = gzip.open if _is_gz(p) else open
        # utf-8-sig: a byte-order mark (Excel's and pandas' utf-8-sig exports) is not part of the first record
        with opener(p, "rt", encoding="utf-8-sig") as f:
            head = f.read(1)
            while head and head.isspace():
                head = f.read(1)
            if head == "[":  # one JSON array: it has to be parsed whole
                for i, row in enumerate(_json(head + f.read(), p)):
                    yield _field(row, unit.text_field, f"{p} (item {i})")
                return
            lines = itertools.chain([head + f.readline()] if head else [], f)
            for n, line in enumerate(lines, 1):
                if line.strip():
                    yield _field(_json(line, p, n, one_object=head == "{" and n == 1), unit.text_field, f"{p}:{n}")
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(p)
        if unit.text_field not in pf.schema_arrow.names:
            raise ConfigError("data.text_field", unit.text_field, f"no such column in {p}; it has "
                              f"{pf.schema_arrow.names}")
        kind = pf.schema_arrow.field(unit.text_field).type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_null(kind)
                or getattr(pa.types, "is_string_view", lambda t: False)(kind)):
            raise ConfigError("data.text_field", unit.text_field, f"{p}: the column is of type {kind}, not text (a "
                              "chat's message list, a number): name a column that holds the document's text")
        for batch in pf.iter_batches(batch_size=BATCH_DOCS, columns=[unit.text_field]):
            yield from (t or "" for t in batch.column(0).to_pylist())


def text_documents(f, limit: int = TEXT_DOCUMENT_CHARS) -> Iterator[str]:
    """A text file's documents: the whole file when it holds at most ``limit`` characters, else pieces of at most
    ``limit``, each ended at its last paragraph break in its second half (a blank line; else a line break; else cut
    at ``limit``). A large file (a book, a dump) is read a piece at a time, and its pieces are documents the held-out
    split can draw: as one document it was all training text or all held out, and read into memory whole. The pieces
    concatenate to the file's text; an empty file is one empty document, as before (the split counts documents)."""
    buf = ""
    yielded = False
    while block := f.read(limit):
        buf += block
        while len(buf) > limit:
            cut = buf.rfind("\n\n", limit // 2, limit) + 2
            if cut < 2:
                cut = buf.rfind("\n", limit // 2, limit) + 1
            if cut < 1:
                cut = limit
            yield buf[:cut]
            yielded = True
            buf = buf[cut:]
    if buf or not yielded:
        yield buf


def _json(text: str, path: str, line: int | None = None, one_object: bool = False):
    """A JSON document or line of a corpus file, or a ConfigError naming the file and line (a truncated download;
    ``one_object``: line 1 of a file that starts with '{', which may be one JSON object over many lines)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        where = f"{path}, line {line}" if line is not None else f"{path} ({e.msg} at line {e.lineno})"
        if one_object:
            raise ConfigError("data.source", path, f"{where} is not a complete JSON object ({e.msg}): the file is "
                              "read as JSON Lines (one object a line) or a JSON list of objects; one JSON object "
                              "spread over many lines (e.g. {\"data\": [...]}) is neither: write its records one a "
                              "line, or cut short (an interrupted download?)") from None
        raise ConfigError("data.source", path, f"{where} is not valid JSON ({e.msg}): a file cut short (an "
                          "interrupted download?) or not JSON; fix or remove it") from None


def _field(row, name: str, where: str) -> str:
    """The text of a record: its ``name`` field, text or null (an empty document)."""
    if not isinstance(row, dict):
        raise ConfigError("data.source", where, f"holds a {type(row).__name__}, not a JSON object with a "
                          f"{name!r} field: one object a line (JSONL), or a JSON list of objects")
    if name not in row:
        raise ConfigError("data.text_field", name, f"no such field in {where}; it has {sorted(row)}")
    value = row[name]
    if value is not None and not isinstance(value, str):
        raise ConfigError("data.text_field", name, f"{where}: its value is a {type(value).__name__}, not text (a "
                          "chat's message list, a number): name a field that holds the document's text")
    return value or ""


# ---- one unit ---------------------------------------------------------------------------------------------------
@dataclass
class UnitResult:
    source: str
    index: int
    documents: int = 0
    train_tokens: int = 0
    val_tokens: int = 0
    val_documents: int = 0
    fingerprint: str = ""
    seconds: float = 0.0
    worker: int = field(default_factory=os.getpid)
    itemsize: int = 0  # bytes per token id in the shards (0 in markers written before it was recorded: not checked)
    duplicates: int = 0  # documents left out of training as copies of held-out ones (doc_hash)
    val_hashes: list[str] = field(default_factory=list)  # the doc_hash of each document this unit holds out


def val_share(val_tokens: int, n_sources: int) -> int:
    """Held-out tokens each source owes: an equal share of data.val_tokens (at least one document each)."""
    return max(1, math.ceil(val_tokens / max(1, n_sources)))


def is_held_out(seed: int, source: str, unit: int, i: int) -> bool:
    """Whether document i of a unit is a held-out candidate (held out while its source's share is not met)."""
    digest = hashlib.sha256(f"{seed}|{source}|{unit}|{i}".encode()).digest()
    return int.from_bytes(digest[:4], "little") % VAL_EVERY == 0


def doc_hash(text: str) -> str | None:
    """A document's identity up to case and whitespace (16 hex digits): a training document with the hash of a
    held-out one is a copy of it (a file duplicated in a user's corpus, a boilerplate page) and is left out of
    training, so that the held-out scores are on text never trained on. None for an empty or blank document (no text
    to leak: blank training documents are never left out for a blank held-out one)."""
    norm = " ".join(text.lower().split())
    return hashlib.blake2b(norm.encode(), digest_size=8).hexdigest() if norm else None


def held_out_documents(unit: Unit, tokenizer, add_eos: bool, val_quota: int, split_seed: int,
                       max_documents: int | None = None) -> dict[int, str]:
    """The documents of ``unit`` that it holds out ({position: text}): candidates (:func:`is_held_out`) in order
    while the unit's ``val_quota`` of tokens (each document's, and its end-of-document token under ``add_eos``) is
    not met. Only candidates are tokenized, and the reading stops once the quota is met. The split's one rule: the
    token cache and the evaluation's held-out rows (``ds_hybrid.corpus.held_out_documents``) both read it here."""
    return _held_out(unit, tokenizer, add_eos, val_quota, split_seed, max_documents)[0]


def _held_out(unit: Unit, tokenizer, add_eos: bool, val_quota: int, split_seed: int,
              max_documents: int | None = None) -> tuple[dict[int, str], int]:
    """:func:`held_out_documents`, and the tokens they hold (the count that meets the quota)."""
    held: dict[int, str] = {}
    got = 0
    eos = int(add_eos and getattr(tokenizer, "eos_token_id", None) is not None)
    for i, text in enumerate(iter_documents(unit)):
        if got >= val_quota or (max_documents is not None and i >= max_documents):
            break
        if is_held_out(split_seed, unit.source, unit.index, i):  # (a candidate: 1 in VAL_EVERY, tokenized alone)
            held[i] = text
            got += len(tokenizer(text, add_special_tokens=False)["input_ids"]) + eos
    return held, got


@dataclass(frozen=True)
class HeldOutPlan:
    """What :func:`held_out_plan` finds before any unit is tokenized."""
    quotas: dict[tuple[str, int], int]  # {(source, unit index): held-out tokens the unit owes}; absent: none
    # a unit not done yet: its held-out positions, their tokens, and the fingerprint of the input they were read from
    found: dict[tuple[str, int], tuple[tuple[int, ...], int, str]]
    hashes: frozenset[str]  # the doc_hash of every held-out document of every source


def held_out_plan(units: dict[str, list[Unit]], tokenizer, out_dir: Path, val_tokens: dict[str, int],
                  add_eos: bool, split_seed: int, max_documents: int | None = None) -> HeldOutPlan:
    """Before any unit is tokenized: each source's held-out units with the quota each one owes (in unit order until
    the source's ``val_tokens`` are met), and the :func:`doc_hash` of every held-out document of every source. Done
    units answer from their markers; the others are read until their quota is met (a unit that falls short, whole),
    tokenizing only the candidates, and what they hold out is kept for their tokenizing (not read a third time). A
    function of the input alone (not of what a build, or an interrupted one, had done), so every unit, held-out ones
    included, leaves out of training the copies of every held-out document, whichever unit or source holds it out."""
    quotas: dict[tuple[str, int], int] = {}
    found: dict[tuple[str, int], tuple[tuple[int, ...], int, str]] = {}
    hashes: set[str] = set()
    for source, us in units.items():
        left = val_tokens.get(source, 0)
        for u in us:
            if left <= 0:
                break
            quotas[(source, u.index)] = left
            rec = done_marker(out_dir, u)
            if rec is not None:
                hashes.update(rec.get("val_hashes", ()))
                left -= rec["val_tokens"]
            else:
                held, got = _held_out(u, tokenizer, add_eos, left, split_seed, max_documents)
                hashes.update(h for h in map(doc_hash, held.values()) if h is not None)
                found[(source, u.index)] = (tuple(held), got, u.fingerprint())
                left -= got
    return HeldOutPlan(quotas, found, frozenset(hashes))


def tokenize_unit(unit: Unit, tokenizer, out_dir: str, dtype: str, add_eos: bool, val_quota: int, split_seed: int,
                  max_documents: int | None = None, held_out_hashes: frozenset[str] = frozenset(),
                  found: tuple[tuple[int, ...], int, str] | None = None) -> UnitResult:
    """Tokenize one unit into ``<out_dir>/<source>/<unit>.{train,val}.bin`` and write its done marker last. The unit
    holds out the documents :func:`held_out_documents` finds (``found``, from :func:`build` only: their positions
    and tokens as :func:`held_out_plan` found them, whose ``held_out_hashes`` hold theirs; read again if the input
    changed since); a training document that repeats one of
    them, or one of ``held_out_hashes`` (every source's held-out documents), is left out (counted as
    ``duplicates``)."""
    t0 = time.perf_counter()
    d = Path(out_dir) / unit.source
    d.mkdir(parents=True, exist_ok=True)
    res = UnitResult(unit.source, unit.index, fingerprint=unit.fingerprint(), itemsize=np.dtype(dtype).itemsize)
    tmp = {s: d / f".{unit.name}.{s}.bin.{os.getpid()}" for s in ("train", "val")}
    eos = tokenizer.eos_token_id if add_eos else None
    if val_quota <= 0:
        held, expected = frozenset(), 0
        repeats = set(held_out_hashes)
    elif found is None or found[2] != res.fingerprint:
        texts, expected = _held_out(unit, tokenizer, add_eos, val_quota, split_seed, max_documents)
        held = frozenset(texts)
        repeats = set(held_out_hashes) | {h for h in map(doc_hash, texts.values()) if h is not None}
    else:
        held, expected = frozenset(found[0]), found[1]
        repeats = set(held_out_hashes)
    try:
        with open(tmp["train"], "wb") as ftrain, open(tmp["val"], "wb") as fval:
            batch: list[tuple[bool, str]] = []

            def flush() -> None:
                ids = tokenizer([t for _, t in batch], add_special_tokens=False)["input_ids"]
                for (is_val, _), x in zip(batch, ids):
                    if eos is not None:
                        x = x + [eos]
                    arr = np.asarray(x, dtype=dtype)
                    (fval if is_val else ftrain).write(arr.tobytes())
                    if is_val:
                        res.val_tokens += len(arr)
                        res.val_documents += 1
                    else:
                        res.train_tokens += len(arr)
                batch.clear()

            for i, text in enumerate(iter_documents(unit)):
                if max_documents is not None and i >= max_documents:
                    break
                res.documents += 1
                if i in held:
                    if (h := doc_hash(text)) is not None:
                        res.val_hashes.append(h)
                elif repeats and doc_hash(text) in repeats:
                    res.duplicates += 1
                    continue
                batch.append((i in held, text))
                if len(batch) >= BATCH_DOCS:
                    flush()
            if batch:
                flush()
        if res.val_tokens != expected:  # (the quotas of the units after it are counted from the marker's)
            raise RuntimeError(f"token cache: unit {unit.index} of {unit.source} holds out {res.val_tokens} tokens "
                               f"tokenized in batches and {expected} tokenized one document at a time: this tokenizer "
                               "counts a document's tokens otherwise in a batch, and the held-out split would change "
                               "with how the cache was built")
        for s, p in tmp.items():  # on disk before they are renamed into place and the marker vouches for them
            fsync_file(p)
            os.replace(p, d / f"{unit.name}.{s}.bin")
        fsync_dir(d)
    finally:
        for p in tmp.values():
            if p.exists():
                p.unlink()
    res.seconds = round(time.perf_counter() - t0, 3)
    atomic_write_text(d / f"{unit.name}.json", json.dumps(asdict(res), indent=1))
    return res


def done_marker(out_dir: Path, unit: Unit) -> dict | None:
    """The unit's marker when it vouches for this input and for the shards on disk, else None (the unit is redone):
    no marker, one for other input (a changed file), an unreadable one, or shards of another size than it records."""
    d = Path(out_dir) / unit.source
    p = d / f"{unit.name}.json"
    if not p.is_file():
        return None
    try:
        rec = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        log.warning("token cache: the marker %s is unreadable; unit %s of %s will be tokenized again", p, unit.index,
                    unit.source)
        return None
    if not isinstance(rec, dict) or rec.get("fingerprint") != unit.fingerprint():
        return None
    if rec.get("itemsize"):
        for split in ("train", "val"):
            shard = d / f"{unit.name}.{split}.bin"
            want = rec[f"{split}_tokens"] * rec["itemsize"]
            if (shard.stat().st_size if shard.is_file() else -1) != want:
                log.warning("token cache: %s is not the %d bytes its marker records; unit %s of %s will be tokenized "
                            "again", shard, want, unit.index, unit.source)
                return None
    return rec


def _claim_and_tokenize(args) -> UnitResult | None:
    """Worker entry: lock the unit (another process may be on it), skip it if done, else tokenize it."""
    unit, tokenizer, out_dir, dtype, add_eos, val_quota, split_seed, max_documents, held_out_hashes, found = args
    d = Path(out_dir) / unit.source
    d.mkdir(parents=True, exist_ok=True)
    with open(d / f"{unit.name}.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return None  # someone else is tokenizing it: the driver waits for the marker
        except OSError as e:  # (NFS without its lock service, Lustre without -o flock)
            raise ConfigError("data.cache_dir", str(out_dir), f"cannot lock {d / f'{unit.name}.lock'} ({e}): the "
                              f"token cache takes file locks (flock) while it tokenizes; put data.cache_dir on a file "
                              f"system that has them ({FLOCK_FILE_SYSTEMS})") from None
        try:
            for stale in d.glob(f".{unit.name}.*"):  # left by a process killed while writing this unit (we hold its lock)
                stale.unlink(missing_ok=True)
            if done_marker(Path(out_dir), unit) is not None:
                return None
            return tokenize_unit(unit, tokenizer, out_dir, dtype, add_eos, val_quota, split_seed, max_documents,
                                 held_out_hashes, found)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


# ---- the driver -------------------------------------------------------------------------------------------------
def scan_prefix(units: list[Unit], out_dir: Path, need: float, val_tokens: int,
                row_tokens: int = 1) -> tuple[list[dict], int, int | None]:
    """One source's done prefix, read-only: (markers of the done prefix, held-out tokens still to find, index of the
    first unit not done, or None when the prefix suffices). A function of the markers alone (they never change once
    written), so every rank, and every job sharing the cache, finds the same prefix for the same need.
    ``row_tokens``: the rows' length; a unit counts only the training tokens of its whole rows (a row never spans two
    units), so a corpus of many small files covers the need in rows, not in tokens that are then dropped."""
    got, train, val = [], 0, 0
    for u in units:
        if train >= need and val >= val_tokens:
            return got, 0, None
        rec = done_marker(out_dir, u)
        if rec is None:
            return got, max(0, val_tokens - val), u.index
        got.append(rec)
        train += rec["train_tokens"] // row_tokens * row_tokens
        val += rec["val_tokens"]
    return got, 0, None  # every unit done: as much as the source has


NOT_SHARED = ("the cache must be one folder every rank sees (a shared file system, not a node-local disk; "
              "data.cache_dir or $DS_HYBRID_CACHE), and not changed during the run")


def check_visible(out_dir: Path, markers: list[dict]) -> None:
    """On another rank: the main rank's markers are in the cache folder this rank sees (else a node-local cache)."""
    for rec in markers:
        if not (Path(out_dir) / rec["source"] / f"u{rec['index']:05d}.json").is_file():
            raise ConfigError("data.cache_dir", str(out_dir), f"unit {rec['index']} of {rec['source']} is not "
                              f"tokenized here after the main rank's build (its marker is missing): {NOT_SHARED}")


def done_prefixes(units: dict[str, list[Unit]], out_dir: Path, need: dict[str, float],
                  val_tokens: dict[str, int], row_tokens: int = 1) -> dict[str, list[dict]]:
    """What :func:`build` returned on the rank that built (the other ranks' copy, read from the markers)."""
    used = {}
    for source, us in units.items():
        got, _, first = scan_prefix(us, Path(out_dir), need[source], val_tokens.get(source, 0), row_tokens)
        if first is not None:
            raise ConfigError("data.cache_dir", str(out_dir), f"unit {first} of {source} is not tokenized here after "
                              f"the main rank's build (its marker is missing): {NOT_SHARED}")
        used[source] = got
    return used


def build(units: dict[str, list[Unit]], tokenizer, out_dir: Path, need: dict[str, float], val_tokens: dict[str, int],
          dtype: np.dtype, add_eos: bool = False, split_seed: int = 1234, num_proc: int = 1,
          max_documents: int | None = None, progress: bool = True, row_tokens: int = 1,
          stop: Callable[[], None] | None = None) -> dict[str, list[dict]]:
    """Tokenize, per source, the shortest prefix of its units that holds ``val_tokens[source]`` held-out tokens and
    ``need[source]`` training tokens in whole rows of ``row_tokens`` (all units for an infinite need). Returns, per
    source, the done markers of that prefix. Held-out documents come from the first units (:func:`held_out_plan`,
    found before any unit is tokenized); then the units are tokenized ``num_proc`` at a time, and every one leaves out
    of training the documents that repeat a held-out one of any unit and any source (:func:`doc_hash`). ``stop``:
    called before each wave of units (it raises to stop the build: a signal, Slurm's time-limit warning, that came
    while a corpus of hours is tokenized; the units done are kept)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    used: dict[str, list[dict]] = {}
    plan: HeldOutPlan | None = None

    def scan(source: str) -> tuple[list[dict], int, int | None]:
        return scan_prefix(units[source], out_dir, need[source], val_tokens.get(source, 0), row_tokens)

    bar = None
    try:
        while True:
            jobs, rescan = [], False
            scans = {source: scan(source) for source in units}
            if plan is None and any(first is not None for _, _, first in scans.values()):
                plan = held_out_plan(units, tokenizer, out_dir, val_tokens, add_eos, split_seed, max_documents)
            for source, (got, _, first) in scans.items():
                if first is None:
                    used[source] = got
                    continue
                assert plan is not None
                pending = units[source][first:]
                if sum(r["train_tokens"] // row_tokens * row_tokens for r in got) >= need[source]:
                    # (the training need is met: only the held-out units still owed, not a wave of training units)
                    pending = [u for u in pending if (source, u.index) in plan.quotas] or pending[:1]
                wave = [u for u in pending[:max(1, num_proc)] if done_marker(out_dir, u) is None]
                # (empty: another job sharing the cache finished these units since the scan: scan again, since
                # this source's prefix is not known yet)
                rescan = rescan or not wave
                jobs += [(u, tokenizer, str(out_dir), dtype.str, add_eos, plan.quotas.get((source, u.index), 0),
                          split_seed, max_documents, plan.hashes, plan.found.get((source, u.index))) for u in wave]
            if not jobs:
                if rescan:
                    continue
                break
            if stop is not None:
                stop()
            if bar is None and progress:
                from tqdm import tqdm

                bar = tqdm(desc="tokenizing", unit="unit", dynamic_ncols=True)
            results = _run(jobs, num_proc, leave_signals=stop is not None)
            if bar is not None:
                bar.update(sum(r is not None for r in results))
            if all(r is None for r in results):  # every pending unit belongs to another process: wait for it
                time.sleep(1.0)
    finally:
        if bar is not None:
            bar.close()
    return used


STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def _worker_init(leave_signals: bool = False) -> None:
    """In a worker process: let the fast tokenizer spread each batch of documents over the machine's cores. Launchers
    turn that off (TOKENIZERS_PARALLELISM=false: a process that forks after using it may deadlock), but a spawned
    worker forks nothing, and without it a build waits on its largest unit tokenized on one core while the rest sit
    idle (the embedded corpus: 13 units, gcide 30 % of its tokens). Each document's ids are the same either way.
    ``leave_signals`` (a build with a ``stop`` check): Slurm's time-limit warning (SIGUSR1) and SIGTERM, sent to
    every process of the job, are the parent's to serve between waves: a worker they ended would break the pool, the
    job failing with a traceback instead of stopping where its finished units are kept. (The parent blocks them
    while it spawns the workers, so none arrives before this runs.) Without a stop check the workers end with the
    parent, as before."""
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    if leave_signals:
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


def _run(jobs: list, num_proc: int, leave_signals: bool = False) -> list:
    """The jobs in this process when there is one (or one worker), else in fresh processes (spawn: the caller may
    hold CUDA and NCCL state that a fork must not copy) whose tokenizers use every core (:func:`_worker_init`)."""
    n = min(num_proc, len(jobs), os.cpu_count() or 1)
    if n <= 1:
        return [_claim_and_tokenize(j) for j in jobs]
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    # an executor, not a Pool: a worker that dies (killed for memory) raises BrokenProcessPool here instead of
    # leaving the build waiting forever; a worker's error (a ConfigError naming a field) is raised as itself.
    # leave_signals: the stop signals are held back while the wave runs (the workers are spawned with them blocked,
    # and the parent's handler records one when the wave ends, for the stop check before the next)
    held = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS) if leave_signals else None
    try:
        with ProcessPoolExecutor(n, mp_context=mp.get_context("spawn"), initializer=_worker_init,
                                 initargs=(leave_signals,)) as pool:
            return list(pool.map(_claim_and_tokenize, jobs))
    finally:
        if held is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)


def _open_file_room(n: int) -> None:
    """Each memory map holds a file descriptor: raise the soft limit on open files toward the hard one (Slurm jobs
    often inherit 1,024) so that ``n`` more fit."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        open_now = len(os.listdir("/proc/self/fd"))
    except OSError:
        open_now = 256
    want = open_now + n + 1024
    if soft != resource.RLIM_INFINITY and soft < want:
        new = want if hard == resource.RLIM_INFINITY else min(hard, want)
        if new > soft:
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))


def read_shards(out_dir: Path, markers: list[dict], split: str, dtype: np.dtype) -> list[np.ndarray]:
    """The memory-mapped token shards of the given units (empty ones skipped)."""
    _open_file_room(len(markers))
    shards = []
    for rec in markers:
        p = Path(out_dir) / rec["source"] / f"u{rec['index']:05d}.{split}.bin"
        if p.stat().st_size:
            try:
                shards.append(np.memmap(p, dtype=dtype, mode="r"))
            except OSError as e:
                if e.errno != errno.EMFILE:
                    raise
                import resource

                raise ConfigError("data.source", str(out_dir), f"{len(markers)} token shards to map, more than the "
                                  f"open-file limit ({resource.getrlimit(resource.RLIMIT_NOFILE)}) allows: raise it "
                                  "(ulimit -n in the job script), or merge the corpus into fewer, larger files") from None
    return shards
