"""The embedded default corpus: freely licensed English prose that installs offline from Debian's archive.

No web crawl is installable on machines without a dataset hub, so ``data.source: embedded`` reads the Python
documentation sources (modern technical prose, about 11 MB, ~500 documents) from Debian's ``python3-doc`` package,
and the Linux kernel documentation (``linux-doc``, 24 MB) when that is installed too. One file is one document.

    apt-get install -y --no-install-recommends python3-doc     # what `make setup` does where apt is available

Users point ``data.source`` at their own corpus (DCLM, FineWeb, ... as local text/json/jsonl/parquet files or a hub
dataset name) with one config line.
"""

from __future__ import annotations

import glob
from pathlib import Path

from ds_hybrid.errors import ConfigError

# (glob pattern, description); every match is one document.
EMBEDDED_SOURCES: tuple[tuple[str, str], ...] = (
    ("/usr/share/doc/python3*/html/_sources/**/*.rst.txt", "Python documentation (Debian python3-doc)"),
    ("/usr/share/doc/linux-doc*/html/_sources/**/*.rst.txt", "Linux kernel documentation (Debian linux-doc)"),
)


def embedded_corpus_files() -> list[Path]:
    files: list[Path] = []
    for pattern, _ in EMBEDDED_SOURCES:
        files.extend(Path(p) for p in glob.glob(pattern, recursive=True))
    # one Python version's docs is enough; several installed versions would repeat most documents
    by_name: dict[str, Path] = {}
    for f in sorted(files):
        key = str(f).split("/html/_sources/", 1)[-1] + ("#linux" if "linux-doc" in str(f) else "")
        by_name.setdefault(key, f)
    out = sorted(by_name.values())
    if not out:
        raise ConfigError(
            "data.source", "embedded",
            "the embedded corpus needs Debian's python3-doc: run `apt-get install -y --no-install-recommends "
            "python3-doc` (as root), or set data.source to your own text/json/jsonl/parquet files",
        )
    return out
