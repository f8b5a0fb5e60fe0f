"""Pack the raw Python documentation sources (the corpus before 2026-11-29, read by runs/smollm2_throughput.yaml) for a
machine without network, under their absolute paths: `tar -xJf pydocs.tar.xz -C /` restores them. The embedded
corpus itself travels as `ds-hybrid corpus pack` parts.

    python bench/corpus_bundle.py --out /tmp/dsh_bundle/stage/corpus
"""

from __future__ import annotations

import argparse
import subprocess
from pathlib import Path

from ds_hybrid.corpus import python_docs_files


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", required=True, help="folder to write pydocs.tar.xz into")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    files = [str(f.resolve()).lstrip("/") for f in python_docs_files()]
    (out / "pydocs.txt").write_text("\n".join(files) + "\n")
    subprocess.run(["tar", "-cJf", str(out / "pydocs.tar.xz"), "-C", "/", "-T", str(out / "pydocs.txt")], check=True)
    print(f"{len(files)} files -> {out / 'pydocs.tar.xz'} ({(out / 'pydocs.tar.xz').stat().st_size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
