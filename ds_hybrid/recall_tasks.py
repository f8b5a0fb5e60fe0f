"""Synthetic associative-recall prompts for the `ar` and `ar_multihop` selectors (teacher ablation).

As the paper describes: a list of key-value pairs (50 by default), then a query asking the sum of 3 values.
Multi-hop: some keys are aliases of other keys (``zuta = bemo`` means zuta has bemo's value), in chains of up to 2
hops, so answering needs the model to follow references through the context.

    >>> p = make_prompt(random.Random(0), pairs=50, multihop=False)
    >>> p.text.endswith("Answer:"), p.answer      # (True, ' 178')
"""

from __future__ import annotations

import random
from dataclasses import dataclass

CONSONANTS = "bdfgklmnprstvz"
VOWELS = "aeiou"


@dataclass
class RecallPrompt:
    text: str  # ends with "Answer:"
    answer: str  # " <sum>" (leading space: how the tokenizer sees the continuation)
    query: tuple[str, ...]
    values: dict[str, int]  # resolved value of every key


MAX_PAIRS = (len(CONSONANTS) * len(VOWELS)) ** 2  # distinct two-syllable keys: 4,900


def _word(rng: random.Random) -> str:
    return "".join(rng.choice(CONSONANTS) + rng.choice(VOWELS) for _ in range(2))


def make_prompt(rng: random.Random, pairs: int = 50, multihop: bool = False, n_query: int = 3) -> RecallPrompt:
    if not 1 <= n_query <= pairs <= MAX_PAIRS:
        raise ValueError(f"pairs={pairs}, n_query={n_query}: need n_query <= pairs <= {MAX_PAIRS} (the distinct "
                         "two-syllable keys)")
    keys: list[str] = []
    seen: set[str] = set()
    while len(keys) < pairs:
        w = _word(rng)
        if w not in seen:
            seen.add(w)
            keys.append(w)
    lines: list[str] = []
    values: dict[str, int] = {}
    refs: dict[str, str] = {}
    depth: dict[str, int] = {}
    for i, k in enumerate(keys):
        # in multi-hop prompts about a third of the keys alias an earlier key, at most 2 hops from a number
        earlier = [e for e in keys[:i] if depth[e] < 2]
        if multihop and earlier and rng.random() < 0.35:
            target = rng.choice(earlier)
            refs[k] = target
            depth[k] = depth[target] + 1
            values[k] = values[target]
            lines.append(f"{k} = {target}")
        else:
            values[k] = rng.randint(10, 99)
            depth[k] = 0
            lines.append(f"{k} = {values[k]}")
    pool = [k for k in keys if depth[k] > 0] if multihop else keys
    if multihop and len(pool) < n_query:
        pool = keys
    query = tuple(rng.sample(pool, n_query))
    total = sum(values[k] for k in query)
    header = ("Memorize these variables. A variable set to another variable has that variable's value.\n"
              if multihop else "Memorize these variables.\n")
    text = header + "\n".join(lines) + f"\nQuestion: what is {' + '.join(query)}?\nAnswer:"
    return RecallPrompt(text=text, answer=f" {total}", query=query, values=values)


def make_prompts(n: int, seed: int = 0, pairs: int = 50, multihop: bool = False) -> list[RecallPrompt]:
    rng = random.Random(seed)
    return [make_prompt(rng, pairs, multihop) for _ in range(n)]


# ---- needle rows: a recall score inside the held-out evaluation of stages kl and finetune --------------------------
NEEDLE = " The access code of {key} is {value}."
MIN_ROW_TOKENS = 128  # a needle, its question and answer take ~50 tokens; the rest is the row's own text
QUERY = "\nQuestion: what is the access code of {key}? Answer: The access code of {key} is"


def encode_split(tokenizer, prompt: str, answer: str) -> tuple[list[int], list[int]]:
    """``prompt + answer`` tokenized as one text, as a model reads it, split after the tokens it shares with the
    prompt tokenized alone: (prompt ids, answer ids). Tokenized apart, the answer " 178" gained a leading word
    boundary token under SentencePiece's legacy normalizer (Llama 2, Mistral v0.1) that the joint text does not have;
    byte-level BPE (SmolLM2, Llama 3, Qwen) gives the same ids either way."""
    enc = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    joint, alone = enc(prompt + answer), enc(prompt)
    k = 0
    while k < min(len(joint), len(alone)) and joint[k] == alone[k]:
        k += 1
    if k == len(joint):
        raise ValueError(f"the answer {answer!r} adds no token to its prompt")
    return joint[:k], joint[k:]


def needle_row(filler: list[int], tokenizer, rng: random.Random,
               bos: int | None = None) -> tuple[list[int], int, int]:
    """One held-out row turned into a retrieval test of the same length: a key-value fact planted at a random depth
    of the row's own text, the text cut to make room, and a question about it at the end. Returns (ids, start, end):
    ``ids[start:end]`` are the answer's tokens (the value, as the tokenizer sees it after "is"). ``bos``: the row
    starts with this token (``data.bos``), which stays first."""
    head: list[int] = []
    if bos is not None:
        if not filler or filler[0] != bos:
            raise ValueError(f"the row does not start with the BOS token {bos}")
        head, filler = filler[:1], filler[1:]
    key = _word(rng).capitalize() + " " + _word(rng).capitalize()
    value = str(rng.randint(100_000, 999_999))
    enc = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    needle = enc(NEEDLE.format(key=key, value=value))
    query, answer = encode_split(tokenizer, QUERY.format(key=key), " " + value)
    room = len(filler) - len(needle) - len(query) - len(answer)
    if room < 16:
        raise ValueError(f"a needle row needs at least {len(filler) - room + 16} tokens; the rows have {len(filler)}")
    depth = rng.randint(0, room * 3 // 4)  # the fact lies in the first three quarters of the text
    ids = head + filler[:depth] + needle + filler[depth:room] + query + answer
    return ids, len(ids) - len(answer), len(ids)


def needle_rows(rows: list[list[int]], tokenizer, seed: int = 0,
                bos: int | None = None) -> list[tuple[list[int], int, int]]:
    """:func:`needle_row` for each held-out row, from one seeded generator (the same facts for every model)."""
    rng = random.Random(seed)
    return [needle_row(list(r), tokenizer, rng, bos) for r in rows]
