"""Tokenization rate of the token-cache build (ds_hybrid/tokencache.py) on the embedded corpus, per worker count.

    python bench/tokenize_rate.py [--num-proc 1,4,8,16] [--tokenizer embedded] [--out rate.json]

Each worker count builds the whole cache from nothing into its own temporary folder (``data.cache_dir``): every
unit of every source plus the held-out split, the way a run's first use does. Prints and writes the wall time,
training + held-out tokens, tokens/s and the machine's core count. Worker counts above the core count are
clipped by the cache builder (docs/DATA.md), so they are skipped here.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-proc", default="1,4,8,16")
    ap.add_argument("--tokenizer", default="embedded")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    import transformers

    from ds_hybrid.config import DataConfig
    from ds_hybrid.corpus import ensure_embedded
    from ds_hybrid.data import prepare_streams
    from ds_hybrid.teacher import load_tokenizer

    ensure_embedded()
    tok = load_tokenizer(args.tokenizer)
    cores = os.cpu_count() or 1
    info = {"cpu": platform.processor() or platform.machine(), "cores": cores, "tokenizer": args.tokenizer,
            "transformers": transformers.__version__, "date": time.strftime("%Y-%m-%d")}
    print(json.dumps(info), flush=True)
    rows = []
    for n in [int(x) for x in args.num_proc.split(",")]:
        if n > cores:
            print(f"num_proc {n} > {cores} cores: skipped")
            continue
        tmp = Path(tempfile.mkdtemp(prefix=f"tokrate{n}_"))
        t0 = time.perf_counter()
        meta = prepare_streams(DataConfig(source="embedded", num_proc=n, cache_dir=str(tmp)), tok).meta
        dt = time.perf_counter() - t0
        tokens = meta["train_tokens"] + meta["val_tokens"]
        row = {"num_proc": n, "seconds": round(dt, 2), "train_tokens": meta["train_tokens"],
               "val_tokens": meta["val_tokens"], "tokens_per_s": round(tokens / dt)}
        rows.append(row)
        print(json.dumps(row), flush=True)
        shutil.rmtree(tmp, ignore_errors=True)
    print("\n| workers | seconds | tokens | tokens/s |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['num_proc']} | {r['seconds']:.1f} | {r['train_tokens'] + r['val_tokens']:,} | "
              f"{r['tokens_per_s']:,} |")
    if args.out:
        Path(args.out).write_text(json.dumps({"info": info, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
