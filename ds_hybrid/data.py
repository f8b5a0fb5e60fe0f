"""Data: sources -> tokenized with the teacher's tokenizer -> one token stream -> fixed-length packed sequences.

    streams = prepare_streams(cfg.data, tokenizer)          # cached on disk, built once (rank 0), shared by all
    train = PackedSequences(streams.train, seq_len=512)     # a view: any seq_len, no re-tokenization
    rows = step_rows(step, len(train), global_batch=96, seed=0)
    for micro in rank_micro_batches(rows, rank, world, micro_batch=4): batch = train[micro]

- Sources: "embedded" (see :mod:`ds_hybrid.corpus`), local text/json/jsonl/parquet files or folders (one text file
  = one document; json/jsonl/parquet rows read ``data.text_field``), or a hub dataset name where a hub is reachable.
- Documents are concatenated (without separators unless ``data.add_eos``, as the paper) into one stream per split.
- Held-out split by *document*, fixed by ``data.split_seed`` alone: the same documents are held out for every stage,
  seq_len and run seed, and are never trained on.
- Cache: ``<cache_dir>/<key>/{train,val}.bin`` (uint32) + ``meta.json``, keyed by the source files (paths, sizes,
  mtimes), the tokenizer (its serialized vocabulary/rules) and the split settings; written to a temp folder and
  renamed, so a crash never leaves a cache that looks complete.
- Order: the rows of step s are a pure function of (seed, s): resuming at step s continues at the exact position.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ds_hybrid.config import DataConfig
from ds_hybrid.errors import ConfigError

TOKEN_DTYPE = np.uint32
TEXT_SUFFIXES = {".txt", ".md", ".rst", ".text"}
JSON_SUFFIXES = {".json", ".jsonl"}
PARQUET_SUFFIXES = {".parquet"}
CACHE_VERSION = 1


@dataclass
class TokenStreams:
    train: np.ndarray
    val: np.ndarray
    meta: dict
    path: Path


def _default_cache_dir() -> Path:
    from ds_hybrid.teacher import cache_dir

    return cache_dir() / "data"


def source_files(source: str | list[str]) -> list[Path] | None:
    """Local files a source names (sorted), or None for a hub dataset name."""
    from ds_hybrid.corpus import embedded_corpus_files

    items = [source] if isinstance(source, str) else list(source)
    if items == ["embedded"]:
        return embedded_corpus_files()
    files: list[Path] = []
    for item in items:
        p = Path(item).expanduser()
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith("."))
            if not found:
                raise ConfigError("data.source", item, "this folder holds no files")
            files.extend(found)
        elif p.is_file():
            files.append(p)
        elif len(items) == 1 and not item.startswith((".", "/", "~")) and p.suffix.lower() not in (
                TEXT_SUFFIXES | JSON_SUFFIXES | PARQUET_SUFFIXES):
            return None  # a hub dataset name, e.g. "mlfoundations/dclm-baseline-1.0"
        else:
            raise ConfigError("data.source", item, "no such file or folder (give local files/folders, 'embedded', or a hub dataset name)")
    return files


def tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    blob = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def cache_key(cfg: DataConfig, files: list[Path] | None, tokenizer) -> str:
    h = hashlib.sha256()
    if files is None:
        h.update(f"hub:{cfg.source}".encode())
    else:
        for f in files:
            st = f.stat()
            h.update(f"{f.resolve()}|{st.st_size}|{int(st.st_mtime)}\n".encode())
    h.update(json.dumps({
        "v": CACHE_VERSION, "tok": tokenizer_fingerprint(tokenizer), "field": cfg.text_field, "eos": cfg.add_eos,
        "val": cfg.val_tokens, "split": cfg.split_seed, "max_docs": cfg.max_documents,
    }, sort_keys=True).encode())
    return h.hexdigest()[:20]


def _load_documents(cfg: DataConfig, files: list[Path] | None):
    """A `datasets.Dataset` with one document per row in a `text` column."""
    import datasets

    if files is None:
        ds = datasets.load_dataset(cfg.source, split="train")
        parts = [ds]
    else:
        groups: dict[str, list[str]] = {}
        for f in files:
            suffix = "".join(f.suffixes[-1:]).lower()
            kind = "json" if suffix in JSON_SUFFIXES else "parquet" if suffix in PARQUET_SUFFIXES else "text"
            groups.setdefault(kind, []).append(str(f))
        parts = []
        for kind, paths in groups.items():
            if kind == "text":
                ds = datasets.load_dataset("text", data_files=paths, sample_by="document", split="train")
            else:
                ds = datasets.load_dataset(kind, data_files=paths, split="train")
            parts.append(ds)
    out = []
    for ds in parts:
        col = "text" if "text" in ds.column_names and cfg.text_field not in ds.column_names else cfg.text_field
        if col not in ds.column_names:
            raise ConfigError("data.text_field", cfg.text_field, f"no such column; the source has {ds.column_names}")
        ds = ds.select_columns([col])
        if col != "text":
            ds = ds.rename_column(col, "text")
        out.append(ds)
    docs = datasets.concatenate_datasets(out) if len(out) > 1 else out[0]
    if cfg.max_documents is not None:
        docs = docs.select(range(min(cfg.max_documents, len(docs))))
    return docs


def build_streams(cfg: DataConfig, tokenizer, out: Path, files: list[Path] | None) -> None:
    """Tokenize every document, split documents into train / held-out, write both streams (atomic)."""
    docs = _load_documents(cfg, files)
    eos = tokenizer.eos_token_id

    def tok(batch):
        ids = tokenizer(batch["text"], add_special_tokens=False)["input_ids"]
        if cfg.add_eos and eos is not None:
            ids = [x + [eos] for x in ids]
        return {"ids": ids, "n": [len(x) for x in ids]}

    tokenized = docs.map(tok, batched=True, num_proc=cfg.num_proc if cfg.num_proc > 1 else None,
                         remove_columns=["text"], desc="tokenizing")
    lengths = np.asarray(tokenized["n"], dtype=np.int64)
    total = int(lengths.sum())
    if total < 2 * cfg.val_tokens:
        raise ConfigError("data.val_tokens", cfg.val_tokens,
                          f"the corpus has only {total} tokens; hold out less than half of it")
    order = np.random.default_rng(cfg.split_seed).permutation(len(lengths))
    held = np.zeros(len(lengths), dtype=bool)
    acc = 0
    for i in order:  # whole documents, in a seed-fixed order, until val_tokens are held out
        if acc >= cfg.val_tokens:
            break
        held[i] = True
        acc += int(lengths[i])
    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=out.parent))
    try:
        counts = {"train": 0, "val": 0}
        with open(tmp / "train.bin", "wb") as ftrain, open(tmp / "val.bin", "wb") as fval:
            for start in range(0, len(tokenized), 1000):
                rows = tokenized[start:start + 1000]["ids"]
                for j, ids in enumerate(rows):
                    arr = np.asarray(ids, dtype=TOKEN_DTYPE)
                    split = "val" if held[start + j] else "train"
                    (fval if split == "val" else ftrain).write(arr.tobytes())
                    counts[split] += len(arr)
        meta = {
            "version": CACHE_VERSION, "source": cfg.source if isinstance(cfg.source, str) else list(cfg.source),
            "files": len(files) if files is not None else None, "documents": int(len(lengths)),
            "val_documents": int(held.sum()), "train_tokens": counts["train"], "val_tokens": counts["val"],
            "tokenizer": tokenizer_fingerprint(tokenizer), "add_eos": cfg.add_eos, "split_seed": cfg.split_seed,
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        if not out.exists():
            try:
                os.replace(tmp, out)
            except OSError:  # another process finished the same cache first: keep theirs
                if not (out / "meta.json").is_file():
                    raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def prepare_streams(
    cfg: DataConfig, tokenizer, is_main: bool = True, barrier: Callable[[], None] | None = None
) -> TokenStreams:
    """Build the cached streams on the main rank (others wait at ``barrier``), then memory-map them everywhere."""
    files = source_files(cfg.source)
    root = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else _default_cache_dir()
    out = root / cache_key(cfg, files, tokenizer)
    if is_main and not (out / "meta.json").is_file():
        root.mkdir(parents=True, exist_ok=True)
        build_streams(cfg, tokenizer, out, files)
    if barrier is not None:
        barrier()
    meta = json.loads((out / "meta.json").read_text())
    train = np.memmap(out / "train.bin", dtype=TOKEN_DTYPE, mode="r")
    val = np.memmap(out / "val.bin", dtype=TOKEN_DTYPE, mode="r")
    return TokenStreams(train=train, val=val, meta=meta, path=out)


class PackedSequences:
    """A token stream cut into rows of ``seq_len`` (the remainder is dropped). Indexing returns int64 tensors."""

    def __init__(self, stream: np.ndarray, seq_len: int, max_rows: int | None = None):
        self.stream = stream
        self.seq_len = seq_len
        n = len(stream) // seq_len
        self.n = n if max_rows is None else min(n, max_rows)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, rows: np.ndarray) -> torch.Tensor:
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= self.n):
            raise IndexError(f"rows out of range 0..{self.n - 1}")
        out = np.stack([self.stream[r * self.seq_len:(r + 1) * self.seq_len] for r in rows.tolist()])
        return torch.from_numpy(out.astype(np.int64))


def device_micro_batches(seqs: PackedSequences, micro: list[np.ndarray], device: torch.device) -> list[torch.Tensor]:
    """A step's micro-batches on ``device`` with one host-to-device copy: the rows are gathered into one tensor,
    pinned and copied without blocking (a copy from pageable memory waits for the GPU to drain first), then split
    into views. On CPU the rows are simply returned as tensors."""
    sizes = [len(m) for m in micro]
    batch = seqs[np.concatenate(micro)] if micro else seqs[np.zeros(0, dtype=np.int64)]
    if device.type == "cuda":
        batch = batch.pin_memory().to(device, non_blocking=True)
    return list(batch.split(sizes))


def step_rows(step: int, n_rows: int, global_batch: int, seed: int) -> np.ndarray:
    """The rows of optimizer step ``step``: a seeded permutation per epoch, consumed in order, wrapping epochs."""
    if n_rows < 1:
        raise ValueError("no training rows")
    pos = np.arange(step * global_batch, (step + 1) * global_batch, dtype=np.int64)
    epochs, offsets = pos // n_rows, pos % n_rows
    out = np.empty(global_batch, dtype=np.int64)
    for e in np.unique(epochs):
        perm = np.random.default_rng([seed, int(e)]).permutation(n_rows)
        sel = epochs == e
        out[sel] = perm[offsets[sel]]
    return out


def rank_micro_batches(rows: np.ndarray, rank: int, world: int, micro_batch: int) -> list[np.ndarray]:
    """Split a step's rows: accumulation step a, rank r gets rows[(a * world + r) * micro : ... + micro]."""
    per = world * micro_batch
    if len(rows) % per:
        raise ValueError(f"global batch {len(rows)} is not a multiple of world x micro = {per}")
    return [rows[(a * world + rank) * micro_batch:(a * world + rank + 1) * micro_batch] for a in range(len(rows) // per)]
