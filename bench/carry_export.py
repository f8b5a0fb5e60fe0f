"""Carry a stage's output folder off a GPU lease and back onto the next one, in parts small enough for the device
tool (at most 8 files of 16 MiB come back per call; a call carries at most 64 MiB).

A stage's HF export is mostly the teacher's own weights (stage align trains only the mixers), and the teacher is on
every lease machine anyway. ``pack`` therefore stores only the tensors that differ from a base folder (the
teacher), every other file of the folder as it is, and a SHA-256 of every tensor; ``unpack`` rebuilds the folder
from the base and the parts and checks every tensor against its hash, so a wrong or changed base stops it with the
tensor's name instead of giving a silently different model.

    python bench/carry_export.py pack /tmp/run/compare/align --base /tmp/dsh/smollm2-135m-instruct-v2 --out /tmp/res/carry
    python bench/carry_export.py unpack '/tmp/carry/align.part*' --base /tmp/dsh/smollm2-135m-instruct-v2 \
        --out /tmp/run/compare/align

On SmolLM2-135M -> GDN the align folder (316 MB of weights) packs to ~100 MB: the mixers.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import io
import json
import os
import re
import shutil
import signal
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load, save, save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ds_hybrid.folders import atomic_folder  # noqa: E402
from ds_hybrid.hf_io import SafetensorsReader  # noqa: E402

FORMAT = 1
MANIFEST = "carry_manifest.json"
DELTA = "carry_delta.safetensors"
SKIP_DIRS = ("checkpoints",)  # training states are not carried: a carried stage is finished, its export is what counts


def _bytes(t: torch.Tensor) -> bytes:
    return t.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes()


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(_bytes(t)).hexdigest()


def _same(t: torch.Tensor, base: SafetensorsReader, name: str) -> bool:
    """Whether ``base`` holds ``name`` with exactly these values once cast to ``t``'s dtype."""
    if name not in base:
        return False
    b = base.get(name)
    return tuple(b.shape) == tuple(t.shape) and _bytes(b.to(t.dtype)) == _bytes(t)


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file()
                  and not any(part in SKIP_DIRS for part in p.relative_to(folder).parts))


def pack(folder: str | Path, base: str | Path, out: str | Path, part_mib: float = 15.0, name: str | None = None
         ) -> list[Path]:
    folder, out = Path(folder), Path(out)
    if not folder.is_dir():
        raise SystemExit(f"pack: {folder} is not a folder")
    reader = SafetensorsReader(base)
    name = name or folder.name
    delta: dict[str, torch.Tensor] = {}
    manifest: dict = {"format": FORMAT, "folder": folder.name, "shards": {}, "tensors": {}}
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for f in _files(folder):
            rel = f.relative_to(folder).as_posix()
            if f.suffix != ".safetensors":
                tar.add(f, arcname=f"files/{rel}")
                continue
            with safe_open(str(f), framework="pt") as sf:
                meta = sf.metadata() or {}
                names = list(sf.keys())
                manifest["shards"][rel] = {"tensors": names, "metadata": meta}
                for n in names:
                    t = sf.get_tensor(n)
                    key = f"{rel}::{n}"
                    from_base = _same(t, reader, n)
                    manifest["tensors"][key] = {"sha256": _digest(t), "dtype": str(t.dtype).removeprefix("torch."),
                                                "shape": list(t.shape), "source": "base" if from_base else "delta"}
                    if not from_base:
                        delta[key] = t.contiguous()
        for arc, data in ((DELTA, save(delta)), (MANIFEST, json.dumps(manifest).encode())):
            info = tarfile.TarInfo(arc)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    blob = buf.getvalue()
    out.mkdir(parents=True, exist_ok=True)
    earlier = list(out.glob(f"{name}.part*"))  # an earlier pack of the same name: removed once the new one is in place
    step = int(part_mib * 2**20)
    n = max(1, -(-len(blob) // step))
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=out))
    parts = []
    for i in range(n):  # written aside, then renamed: whoever lists `out` (the lease's `wait`) sees whole parts only
        p = tmp / f"{name}.part{i:02d}-of-{n:02d}"
        p.write_bytes(blob[i * step:(i + 1) * step])
        parts.append(p)
    parts = [p.replace(out / p.name) for p in parts]
    tmp.rmdir()
    for old in earlier:
        if old.name not in {p.name for p in parts}:
            old.unlink()
    n_delta = sum(1 for v in manifest["tensors"].values() if v["source"] == "delta")
    print(f"packed {folder}: {len(manifest['tensors'])} tensors ({n_delta} differ from the base), "
          f"{len(blob) / 2**20:.1f} MiB in {n} parts of <= {part_mib:g} MiB: {out}/{name}.part*")
    return parts


def _complete(parts: list[str | Path]) -> list[Path]:
    """The parts in their pack's order (by the index in their names ``NAME.partII-of-NN``, whatever folders they lie
    in: a glob over .dev/s1a0, .dev/s1a1 ... or device folders 9, 10 lists them in another order), after checking that
    every part of one pack is there once."""
    paths = [Path(p) for p in parts]
    if not paths:
        raise SystemExit("carry_export: no parts given (a glob that matched nothing?)")
    found = [re.fullmatch(r"(.+)\.part(\d+)-of-(\d+)", p.name) for p in paths]
    if not all(found) or len({(m[1], m[3]) for m in found}) != 1:
        raise SystemExit(f"carry_export: {[p.name for p in paths]} are not the parts of one carry_export pack "
                         "(NAME.partII-of-NN)")
    n = int(found[0][3])
    order = sorted(range(len(paths)), key=lambda i: int(found[i][2]))
    have = [int(found[i][2]) for i in order]
    if len(set(have)) != len(have):
        raise SystemExit(f"carry_export: a part given twice: {sorted(str(p) for p in paths)}")
    if have != list(range(n)):
        raise SystemExit(f"carry_export: parts missing: have {have} of 0..{n - 1} ({found[0][1]}.part*)")
    return [paths[i] for i in order]


def _file_digest(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _join(parts: list[str | Path]) -> bytes:
    return b"".join(p.read_bytes() for p in _complete(parts))


def read_manifest(parts: list[str | Path]) -> dict:
    """What a pack holds: per tensor its dtype, shape, SHA-256 and source ("base" or "delta")."""
    with tarfile.open(fileobj=io.BytesIO(_join(parts)), mode="r") as tar:
        return json.loads(tar.extractfile(MANIFEST).read())


def unpack(parts: list[str | Path], base: str | Path, out: str | Path) -> Path:
    out = Path(out)
    blob = _join(parts)
    reader = SafetensorsReader(base)
    try:  # built aside, swapped into place whole (ds_hybrid.folders.atomic_folder): an earlier folder stays until then
        with atomic_folder(out, out.name) as tmp:
            with tarfile.open(fileobj=io.BytesIO(blob), mode="r") as tar:
                members = {m.name: m for m in tar.getmembers()}
                if MANIFEST not in members:
                    raise SystemExit(f"unpack: the parts hold no {MANIFEST}: not a carry_export pack")
                manifest = json.loads(tar.extractfile(members[MANIFEST]).read())
                if manifest.get("format") != FORMAT:
                    raise SystemExit(f"unpack: format {manifest.get('format')} (this script reads {FORMAT})")
                delta = load(tar.extractfile(members[DELTA]).read())
                for arc, m in members.items():
                    if arc.startswith("files/") and m.isfile():
                        dest = tmp / arc.removeprefix("files/")
                        dest.parent.mkdir(parents=True, exist_ok=True)
                        dest.write_bytes(tar.extractfile(m).read())
            for rel, shard in manifest["shards"].items():
                tensors = {}
                for n in shard["tensors"]:
                    key = f"{rel}::{n}"
                    spec = manifest["tensors"][key]
                    if spec["source"] == "delta":
                        t = delta[key]
                    else:
                        if n not in reader:
                            raise SystemExit(f"unpack: tensor {n} comes from the base, but {base} does not hold it: "
                                             "give the --base the pack was made with")
                        t = reader.get(n).to(getattr(torch, spec["dtype"])).contiguous()
                    if _digest(t) != spec["sha256"] or list(t.shape) != spec["shape"]:
                        raise SystemExit(f"unpack: tensor {n} ({rel}) does not match its hash: the --base differs from "
                                         "the one the pack was made with (another teacher or dtype?), or the parts "
                                         "are of two packs")
                    tensors[n] = t
                dest = tmp / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                save_file(tensors, str(dest), metadata=shard["metadata"] or None)
    except tarfile.TarError as e:
        raise SystemExit(f"unpack: the parts do not join into one pack ({e}): parts of two packs mixed, or a part "
                         "damaged on the way") from None
    print(f"unpacked {len(manifest['tensors'])} tensors, every hash checked: {out}")
    return out


def _gather_target(into: str, per_folder: int) -> Path:
    if per_folder < 1:
        sys.exit(f"gather: --per-folder {per_folder}: give at least 1 (2 parts of 15 MiB fit a device call's "
                 "64 MiB beside the working tree)")
    dest = Path(into)
    if into.endswith(("/", os.sep)) or dest.name in ("", ".", ".."):
        sys.exit(f"gather: --into {into!r} is a folder, not a prefix: give e.g. .dev/a (folders .dev/a0, .dev/a1, ...)")
    return dest


def gather(folders: list[str | Path], name: str, into: str, per_folder: int = 2) -> list[Path]:
    """The parts of pack ``name`` found in ``folders`` (the device calls' result folders), every one of them, copied
    into ``<into>0``, ``<into>1``, ... with ``per_folder`` parts each (a device call carries 64 MiB, the working tree
    included: 19 MB of it in 2026-12, so 3 parts of 15.7 MB no longer fit beside it).

    All or nothing: the new folders are built aside (the parts may lie in the folders they replace: a re-gather of
    .dev/a0 .. into .dev/a), then swapped in by renames; an interruption before the swap leaves every folder as it
    was, one during the swap puts the earlier folders back."""
    dest = _gather_target(into, per_folder)
    found: dict[str, Path] = {}
    for d in folders:
        for p in sorted(Path(d).glob(f"{name}.part*")):
            if p.name in found and _file_digest(p) != _file_digest(found[p.name]):
                sys.exit(f"gather: {p} and {found[p.name]} are two different parts of one name (two packs of "
                         f"{name}, e.g. two leases' aligns): give the folders of one pack only")
            found.setdefault(p.name, p)
    parts = _complete(list(found.values()))  # every part of the pack, or a clear error
    olds = []  # an earlier gather's folders of this prefix: <into>0, <into>1, ... while they exist (not <into>20 of
    while (dest.parent / f"{dest.name}{len(olds)}").is_dir():  # a prefix <into>2)
        olds.append(dest.parent / f"{dest.name}{len(olds)}")
    for old in olds:
        if others := [f.name for f in old.iterdir() if not f.name.startswith(f"{name}.part")]:
            sys.exit(f"gather: {old} holds other files than parts of {name} ({', '.join(sorted(others)[:3])}): "
                     "give gather another --into")
    names = [f"{dest.name}{i}" for i in range(-(-len(parts) // per_folder))]
    if blocked := [n for n in names if (dest.parent / n).exists() and not (dest.parent / n).is_dir()]:
        sys.exit(f"gather: {dest.parent / blocked[0]} is a file, not a folder: give gather another --into")
    dest.parent.mkdir(parents=True, exist_ok=True)
    staged = Path(tempfile.mkdtemp(prefix=f".{dest.name}-gather-", dir=dest.parent))
    try:
        for i, p in enumerate(parts):  # the new folders, whole, aside; nothing outside `staged` changes yet
            d = staged / "new" / names[i // per_folder]
            d.mkdir(parents=True, exist_ok=True)
            shutil.copy(p, d / p.name)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        print(f"gather stopped while copying: nothing changed ({', '.join(str(o) for o in olds) or 'no earlier folders'})",
              file=sys.stderr)
        raise
    (staged / "earlier").mkdir()
    try:  # the swap: renames only
        for old in olds:
            old.rename(staged / "earlier" / old.name)
        for n in names:
            (staged / "new" / n).rename(dest.parent / n)
    except BaseException:
        try:  # undone from what is on disk (a signal between a rename and any bookkeeping loses nothing)
            for n in names:
                if not (staged / "new" / n).exists() and (dest.parent / n).exists():  # placed
                    (dest.parent / n).rename(staged / "new" / n)
            for old in olds:
                if (staged / "earlier" / old.name).exists() and not old.exists():  # moved aside
                    (staged / "earlier" / old.name).rename(old)
        except BaseException:
            print(f"gather stopped while swapping folders and could not undo it: the earlier folders are in "
                  f"{staged / 'earlier'}, the new ones in {staged / 'new'} (and any already in place)", file=sys.stderr)
            raise
        shutil.rmtree(staged, ignore_errors=True)
        print("gather stopped while swapping folders: the earlier folders are back as they were", file=sys.stderr)
        raise
    shutil.rmtree(staged)
    out = [dest.parent / names[i // per_folder] / p.name for i, p in enumerate(parts)]
    print(f"gathered {len(parts)} parts of {name} into {[str(dest.parent / n) for n in names]}")
    return out


# what makes an align the align it is (its result), as against how it ran (micro-batch split, logging, launcher files,
# the loss kernels' settings, a hub revision pinned to its commit): a carried align must match the campaign's in these
ALIGN_RECIPE = {"": ("seed", "teacher", "mixer", "mixer_options", "dtype"),
                "data": ("source", "mixture", "text_field", "add_eos", "val_tokens", "split_seed", "max_documents",
                         "hub_config"),
                "align": ("tokens", "seq_len", "global_batch", "lr", "lr_rest", "schedule", "warmup_steps",
                          "min_lr_ratio", "clip", "weight_decay", "betas", "eps")}


def _recipe(cfg) -> dict[str, Any]:
    d = cfg.to_dict()
    return {f"{sec}.{k}" if sec else k: (d[sec] if sec else d)[k] for sec, keys in ALIGN_RECIPE.items() for k in keys}


def same_align(run_config: str | Path, config: str | Path, overrides: list[str]) -> None:
    """Exit with a message unless the align that wrote ``run_config`` (its config.yaml, e.g. a carried align's) ran
    the recipe that ``config`` with ``overrides`` asks for: the seed, teacher, mixer and its options, the data split
    and the align stage's budget and optimizer (ALIGN_RECIPE)."""
    from ds_hybrid.config import load_config

    had, want = _recipe(load_config(run_config, [])), _recipe(load_config(config, overrides))
    if diff := [k for k in want if had[k] != want[k]]:
        sys.exit(f"{run_config}: an align of {', '.join(f'{k}={had[k]!r}' for k in diff)}; this run asks for "
                 f"{', '.join(f'{k}={want[k]!r}' for k in diff)} (carry that recipe's align, or train it here)")
    print(f"seed {want['seed']}, the same align recipe as {run_config}'s")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack", help="a folder -> parts (tensors equal to the base's are left out)")
    p.add_argument("folder")
    p.add_argument("--base", required=True, help="HF folder whose tensors need not travel (the teacher)")
    p.add_argument("--out", required=True)
    p.add_argument("--part-mib", type=float, default=15.0)
    p.add_argument("--name", help="part file prefix (default: the folder's name)")
    u = sub.add_parser("unpack", help="parts -> the folder, every tensor checked against its hash")
    u.add_argument("parts", nargs="+", help="part files, or one quoted glob")
    u.add_argument("--base", required=True)
    u.add_argument("--out", required=True)
    g = sub.add_parser("gather", help="the parts found in several folders -> INTO0, INTO1, ... (PER_FOLDER each)")
    g.add_argument("folders", nargs="+")
    g.add_argument("--name", default="align")
    g.add_argument("--into", required=True, help="prefix of the folders made, e.g. .dev/a")
    g.add_argument("--per-folder", type=int, default=2)
    c = sub.add_parser("same-align", help="an align's config.yaml ran the recipe (seed, teacher, mixer, data split, "
                                          "budget, optimizer) a config asks for")
    c.add_argument("run_config")
    c.add_argument("--config", required=True)
    c.add_argument("--set", dest="overrides", action="append", default=[],
                   help="key=value, an override as train.py takes them (e.g. seed=1); repeatable")
    a = ap.parse_args(argv)
    if a.cmd == "same-align":
        same_align(a.run_config, a.config, a.overrides)
    elif a.cmd == "gather":
        def stop(signum: int, frame: Any) -> None:  # a timeout's or a closed terminal's signal undoes it like Ctrl-C
            raise SystemExit(f"gather: stopped by signal {signum}")
        for sig in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, stop)
        gather(a.folders, a.name, a.into, a.per_folder)
    elif a.cmd == "pack":
        pack(a.folder, a.base, a.out, a.part_mib, a.name)
    else:
        parts = [q for p in a.parts for q in (sorted(glob.glob(p)) if any(c in p for c in "*?[") else [p])]
        unpack(parts, a.base, a.out)


if __name__ == "__main__":
    main()
