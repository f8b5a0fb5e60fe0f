"""Offline replacements for what RULER downloads: an essay haystack and NLTK's sentence splitter.

- Haystack: RULER's essay NIAH variants read Paul Graham's essays from the hub. ds-hybrid reads any local prose
  instead (default: the held-out documents of the embedded corpus's prose sources, so a model is never tested on
  text it was distilled on); words are whitespace-separated as in RULER.
- Sentence splitter: RULER's NIAH code imports NLTK's ``punkt_tab`` and downloads it when missing. A Punkt model is
  trained here, once, on the haystack text (unsupervised, as NLTK's own English model was) and saved in the
  ``punkt_tab`` layout under ``$DS_HYBRID_CACHE/nltk_data``; ``NLTK_DATA`` points there before lm-eval is imported.
"""

from __future__ import annotations

import gzip
import os
import re
import shutil
from pathlib import Path

from ds_hybrid.errors import ConfigError


def nltk_dir() -> Path:
    from ds_hybrid.teacher import cache_dir

    return cache_dir() / "nltk_data"


def _read_text(f: Path) -> str:
    with (gzip.open(f, "rt", errors="ignore") if f.name.lower().endswith(".gz") else open(f, errors="ignore")) as h:
        return h.read()


def held_out_prose(tokenizers: list | tuple = (), val_tokens: int | None = None,
                   split_seed: int | None = None, add_eos: bool = False) -> list[str]:
    """The embedded corpus's held-out prose documents that every one of ``tokenizers`` holds out (none given: the
    embedded teacher's): a source's held-out share is counted in tokens, so a tokenizer that makes more tokens of a
    document holds out fewer of them, and a haystack chosen with another model's tokenizer, or another run's
    ``data.val_tokens`` / ``data.split_seed`` / ``data.add_eos``, could hold text a model trained on."""
    from ds_hybrid.corpus import held_out_texts

    kept: list[str] | None = None
    for tok in list(tokenizers) or [None]:
        texts = list(held_out_texts(tok, val_tokens, split_seed, add_eos=add_eos))
        seen = set(texts)
        kept = texts if kept is None else [t for t in kept if t in seen]
    return kept or []


def haystack_text(source: str | list[str] | None = None, max_chars: int = 4_000_000, tokenizers: list | tuple = (),
                  val_tokens: int | None = None, split_seed: int | None = None, add_eos: bool = False) -> str:
    """Prose from local files (or, by default, the embedded corpus's held-out prose documents that every one of
    ``tokenizers`` holds out under ``val_tokens`` / ``split_seed``: :func:`held_out_prose`), whitespace-normalised."""
    from ds_hybrid.data import _kind, source_files

    if source is None or source == "embedded":
        texts = held_out_prose(tokenizers, val_tokens, split_seed, add_eos)
    else:
        files = source_files(source, "--haystack")
        if files is None:
            raise ConfigError("--haystack", source, "give local text files or folders (no hub download here)")
        other = [f for f in files if _kind(f) != "text"]
        if other:
            raise ConfigError("--haystack", str(other[0]), "not a plain-text file (.txt/.md/.rst/.text or no suffix, "
                              "optionally .gz): the haystack is prose read as it is, not JSON or parquet records")
        texts = (_read_text(f) for f in files)
    chunks, total = [], 0
    for text in texts:
        chunks.append(text)
        total += len(text)
        if total >= max_chars:
            break
    text = re.sub(r"\s+", " ", " ".join(chunks)).strip()
    if len(text.split(" ")) < 2000:
        raise ConfigError("--haystack", source, "needs at least 2000 words of prose")
    return text


def haystack_words(source: str | list[str] | None = None, tokenizers: list | tuple = (),
                   val_tokens: int | None = None, split_seed: int | None = None, add_eos: bool = False) -> list[str]:
    return haystack_text(source, tokenizers=tokenizers, val_tokens=val_tokens, split_seed=split_seed,
                         add_eos=add_eos).split(" ")


def check_haystack_tokens(words: list[str], tokenizer, need: int, source: str | list[str] | None, model: str,
                          chunk: int = 20_000) -> int:
    """Refuse a haystack of fewer than ``need`` tokens with ``tokenizer`` (the caller passes the longest length less
    RULER's 128 generated tokens): lm-eval's essay generator stops growing a prompt where the haystack ends, and its
    score would be filed under a length the prompt never reached.
    Returns the tokens counted (tokenized a chunk of words at a time, only until ``need`` is reached)."""
    n = 0
    for i in range(0, len(words), chunk):
        n += len(tokenizer(" ".join(words[i:i + chunk]), add_special_tokens=False)["input_ids"])
        if n >= need:
            return n
    raise ConfigError("--haystack", source or "embedded", f"holds {n} tokens ({len(words)} words) with {model}'s "
                      f"tokenizer, fewer than the {need} the longest of --lengths needs: the essay prompts would stop short "
                      "of the length their scores are filed under; give more prose, or drop the longer lengths")


def ensure_punkt(train_text: str | None = None) -> Path:
    """A Punkt sentence splitter in NLTK's punkt_tab layout; trained on local prose the first time."""
    root = nltk_dir()
    target = root / "tokenizers" / "punkt_tab" / "english"
    os.environ["NLTK_DATA"] = str(root)
    files = ("collocations.tab", "sent_starters.txt", "abbrev_types.txt", "ortho_context.tab")
    if target.is_dir() and not all((target / f).is_file() for f in files):  # a partial one (older ds-hybrid)
        shutil.rmtree(target, ignore_errors=True)
    if not target.is_dir():  # written whole into a temp folder, then renamed: never a partial model
        from nltk.tokenize.punkt import PunktTrainer, TabEncoder

        trainer = PunktTrainer()
        trainer.INCLUDE_ALL_COLLOCS = True
        trainer.train(train_text or haystack_text(None, max_chars=2_000_000), finalize=True)
        params = trainer.get_params()
        tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
        tmp.mkdir(parents=True, exist_ok=True)
        enc = TabEncoder()
        (tmp / "collocations.tab").write_text(enc.tups2tab(params.collocations))
        (tmp / "sent_starters.txt").write_text(enc.set2txt(params.sent_starters))
        (tmp / "abbrev_types.txt").write_text(enc.set2txt(params.abbrev_types))
        (tmp / "ortho_context.tab").write_text(enc.ivdict2tab(params.ortho_context))
        try:
            os.rename(tmp, target)
        except OSError:  # another process renamed its own first: theirs is as good
            shutil.rmtree(tmp, ignore_errors=True)
    import nltk

    if str(root) not in nltk.data.path:
        nltk.data.path.insert(0, str(root))
    return target
