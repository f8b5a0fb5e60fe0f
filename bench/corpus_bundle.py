"""Pack the embedded corpus for a machine without network (a lent GPU): every file `data.source: embedded` reads,
under its absolute path, in one xz tar that `tar -xJf corpus.tar.xz -C /` restores.

    python bench/corpus_bundle.py --out /tmp/dsh_bundle/stage/corpus
"""

from __future__ import annotations

import argparse
import subprocess
from pathlib import Path

from ds_hybrid.corpus import embedded_corpus_files


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", required=True, help="folder to write corpus.tar.xz into")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    files = [str(f.resolve()).lstrip("/") for f in embedded_corpus_files()]
    (out / "files.txt").write_text("\n".join(files) + "\n")
    subprocess.run(["tar", "-cJf", str(out / "corpus.tar.xz"), "-C", "/", "-T", str(out / "files.txt")], check=True)
    print(f"{len(files)} files -> {out / 'corpus.tar.xz'} ({(out / 'corpus.tar.xz').stat().st_size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
