"""Exact and near-duplicate documents.

- exact: SHA-1 of the text lower-cased with whitespace collapsed;
- near: MinHash over word 5-gram shingles (64 hash functions, multiply-add in uint32), LSH with 16 bands of 4
  rows; a candidate pair counts as duplicate when its signatures agree on >= 80 % of the hashes (the estimated
  Jaccard similarity of the shingle sets, standard error ~0.05 at 0.8). Bands of 4 rows make a pair at Jaccard 0.8
  a candidate with probability 1 - (1 - 0.8^4)^16 = 0.9998, and one at 0.5 with 0.64 (then rejected by the check).

The first document of a duplicate group (in the order given) is kept.

    keep, report = dedup(texts)          # keep: bool per document; report: {"exact": n, "near": m}
"""

from __future__ import annotations

import hashlib
import re
import zlib
from collections import defaultdict

import numpy as np

NUM_HASHES = 64
BANDS = 16
ROWS = NUM_HASHES // BANDS
SHINGLE = 5
NEAR_THRESHOLD = 0.8
_WORD = re.compile(r"\w+", re.UNICODE)
_rng = np.random.default_rng(20261129)
_A = _rng.integers(1, 2**32, NUM_HASHES, dtype=np.uint64).astype(np.uint32) | np.uint32(1)  # odd multipliers
_B = _rng.integers(0, 2**32, NUM_HASHES, dtype=np.uint64).astype(np.uint32)


def exact_key(text: str) -> str:
    return hashlib.sha1(" ".join(text.lower().split()).encode()).hexdigest()


_MIX = np.array([0x9E3779B1, 0x85EBCA77, 0xC2B2AE3D, 0x27D4EB2F, 0x165667B1], dtype=np.uint32)


def shingle_hashes(text: str) -> np.ndarray:
    """The distinct hashes of the text's word 5-grams: CRC-32 of each word, combined position-wise (uint32)."""
    words = _WORD.findall(text.lower())
    w = np.fromiter((zlib.crc32(x.encode()) for x in words), dtype=np.uint32, count=len(words))
    if len(w) < SHINGLE:
        w = np.concatenate([w, np.zeros(SHINGLE - len(w), dtype=np.uint32)])
    n = len(w) - SHINGLE + 1
    h = np.zeros(n, dtype=np.uint32)
    for j in range(SHINGLE):  # h = sum_j mix_j * w[i + j]  (mod 2^32): order-sensitive
        h += w[j:j + n] * _MIX[j]
    return np.unique(h)


def signature(text: str) -> np.ndarray:
    """MinHash signature [NUM_HASHES] (uint32) of the text's word 5-gram set."""
    h = shingle_hashes(text)
    out = np.empty(NUM_HASHES, dtype=np.uint32)
    for i in range(NUM_HASHES):
        out[i] = (h * _A[i] + _B[i]).min()  # uint32 arithmetic wraps: a multiply-add hash mod 2^32
    return out


def dedup(texts: list[str]) -> tuple[list[bool], dict[str, int]]:
    keep = [True] * len(texts)
    seen: dict[str, int] = {}
    exact = 0
    for i, t in enumerate(texts):
        k = exact_key(t)
        if k in seen:
            keep[i] = False
            exact += 1
        else:
            seen[k] = i
    sigs = {i: signature(texts[i]) for i in range(len(texts)) if keep[i]}
    buckets: dict[tuple[int, bytes], list[int]] = defaultdict(list)
    near = 0
    for i, sig in sigs.items():
        dup = False
        for b in range(BANDS):
            key = (b, sig[b * ROWS:(b + 1) * ROWS].tobytes())
            for j in buckets.get(key, ()):
                if keep[j] and np.mean(sigs[j] == sig) >= NEAR_THRESHOLD:
                    dup = True
                    break
            if dup:
                break
        if dup:
            keep[i] = False
            near += 1
            continue
        for b in range(BANDS):
            buckets[(b, sig[b * ROWS:(b + 1) * ROWS].tobytes())].append(i)
    return keep, {"exact": exact, "near": near}
