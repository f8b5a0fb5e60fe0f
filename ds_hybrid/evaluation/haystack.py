"""Offline replacements for what RULER downloads: an essay haystack and NLTK's sentence splitter.

- Haystack: RULER's essay NIAH variants read Paul Graham's essays from the hub. ds-hybrid reads any local prose
  instead (default: the held-out documents of the embedded corpus's prose sources, so a model is never tested on
  text it was distilled on); words are whitespace-separated as in RULER.
- Sentence splitter: RULER's NIAH code imports NLTK's ``punkt_tab`` and downloads it when missing. A Punkt model is
  trained here, once, on the haystack text (unsupervised, as NLTK's own English model was) and saved in the
  ``punkt_tab`` layout under ``$DS_HYBRID_CACHE/nltk_data``; ``NLTK_DATA`` points there before lm-eval is imported.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from ds_hybrid.errors import ConfigError


def nltk_dir() -> Path:
    from ds_hybrid.teacher import cache_dir

    return cache_dir() / "nltk_data"


def haystack_text(source: str | list[str] | None = None, max_chars: int = 4_000_000) -> str:
    """Prose from local files (or, by default, the embedded corpus's held-out prose documents), whitespace-normalised."""
    from ds_hybrid.data import source_files

    if source is None or source == "embedded":
        from ds_hybrid.corpus import held_out_texts

        texts = held_out_texts()
    else:
        files = source_files(source)
        if files is None:
            raise ConfigError("--haystack", source, "give local text files or folders (no hub download here)")
        texts = (f.read_text(errors="ignore") for f in files)
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


def haystack_words(source: str | list[str] | None = None) -> list[str]:
    return haystack_text(source).split(" ")


def ensure_punkt(train_text: str | None = None) -> Path:
    """A Punkt sentence splitter in NLTK's punkt_tab layout; trained on local prose the first time."""
    root = nltk_dir()
    target = root / "tokenizers" / "punkt_tab" / "english"
    os.environ["NLTK_DATA"] = str(root)
    if not (target / "sent_starters.txt").is_file():
        from nltk.tokenize.punkt import PunktTrainer, TabEncoder

        trainer = PunktTrainer()
        trainer.INCLUDE_ALL_COLLOCS = True
        trainer.train(train_text or haystack_text(None, max_chars=2_000_000), finalize=True)
        params = trainer.get_params()
        target.mkdir(parents=True, exist_ok=True)
        enc = TabEncoder()
        (target / "collocations.tab").write_text(enc.tups2tab(params.collocations))
        (target / "sent_starters.txt").write_text(enc.set2txt(params.sent_starters))
        (target / "abbrev_types.txt").write_text(enc.set2txt(params.abbrev_types))
        (target / "ortho_context.tab").write_text(enc.ivdict2tab(params.ortho_context))
    import nltk

    if str(root) not in nltk.data.path:
        nltk.data.path.insert(0, str(root))
    return target
