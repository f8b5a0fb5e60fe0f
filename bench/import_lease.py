"""Bring a GPU lease's results into the repository as a docs/data folder, and say what they hold.

A campaign lease (`bench/gpu_campaign.sh`, fetched by `OUT=$OUT bench/gpu_session.sh wait`) comes home as one
results.tar.gz: `res/` (progress log, versions, job logs, one folder per evaluation) and `run/<campaign>/` (the
stages' metrics, run_info and config). This lays it out the way docs/data keeps such a lease:

    versions.txt, gpus.csv, campaign_progress.log   the machine and the campaign's timeline
    align_run_info.json, align_config.yaml          the align the hybrids started from
    align_metrics.jsonl.gz                          (only when this lease trained it, not when it was unpacked)
    NAME_kl_{run_info.json,config.yaml,metrics.jsonl.gz}   each hybrid's stage kl (`kl_*` for a single-run campaign)
    selectors/METHOD/selection.{json,md}            stage select's outputs, when the lease ran any
    eval_*/                                         every evaluation but the preflight (one prompt per task), its
                                                    samples gzipped
    logs/                                           the job logs, progress bars reduced to their last state
    *.json, *.md, *.png at res/'s top               other records (graph checks, benchmark rows)
    selectors/METHOD/probe_runs.tar.gz, probes.*    a selection's probe runs (GA-S2's, finished or not) and their
                                                    ranking table and chart (bench/probes_table.py)

then prints each hybrid's training summary (tokens, median tokens/s, peak GiB, held-out KL, perplexity and
recall_kl at its first and last validation) and its single-needle recall. `--merge DIR` adds the lease's evaluations
to a merged table of `ds-hybrid eval-merge` (its earlier sources and their renames kept).

    python bench/import_lease.py /work/.device/14/results.tar.gz docs/data/compare_x_h200_2026-12-04 \
        --merge docs/data/compare_smollm2_merged
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ds_hybrid.errors import ConfigError  # noqa: E402
from ds_hybrid.folders import usual_mode  # noqa: E402

MARKERS = {"t0", "CAMPAIGN_DONE", "run_files.txt", "campaign.log", "progress.log"}
TOP_SUFFIXES = {".json", ".md", ".png", ".csv", ".txt"}


def last_state(text: str) -> str:
    """A log with progress bars (carriage returns) as a terminal shows it at the end: each line's last state."""
    return "\n".join(line.rsplit("\r", 1)[-1] for line in text.split("\n"))


def gzip_copy(src: Path, dst: Path) -> None:
    with open(src, "rb") as fi, gzip.open(dst, "wb") as fo:
        shutil.copyfileobj(fi, fo)


def is_preflight(eval_dir: Path) -> bool:
    """The campaigns' preflight evaluates one prompt per task: not a result."""
    prompts = json.loads((eval_dir / "eval.json").read_text()).get("prompts", {})
    counts = [n for model in prompts.values() for task in model.values() for n in task.values()]
    return bool(counts) and max(counts) <= 1


def evals_not_home(progress: str, imported: set[str]) -> list[str]:
    """The evaluation jobs of a campaign's progress log that brought nothing home: failed (rc != 0), unfinished when
    the snapshot was taken, or finished without an eval.json among ``imported`` (folder names); the preflight aside."""
    state: dict[str, str] = {}
    for m in re.finditer(r"^\S+ \+\d+s (start|end) (eval_\S+)(?: \(GPU \d+\))?(?: rc=(\d+))?$", progress, re.M):
        kind, job, rc = m.groups()
        state[job] = "unfinished" if kind == "start" else ("ok" if rc == "0" else f"failed (rc {rc})")
    out = []
    for job, s in state.items():
        if job.startswith("eval_preflight") or (s == "ok" and job in imported):
            continue
        out.append(f"{job}: {s if s != 'ok' else 'finished, but no eval.json in the tarball'}")
    return out


def copy_stage(stage_dir: Path, out: Path, prefix: str, metrics: bool = True) -> None:
    for name, target in (("run_info.json", "run_info.json"), ("config.yaml", "config.yaml")):
        if (stage_dir / name).is_file():
            shutil.copy2(stage_dir / name, out / f"{prefix}_{target}")
    if metrics and (stage_dir / "metrics.jsonl").is_file():
        gzip_copy(stage_dir / "metrics.jsonl", out / f"{prefix}_metrics.jsonl.gz")


def copy_eval(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True)
    for f in sorted(src.iterdir()):
        if f.name.startswith("."):  # (a file being written when the snapshot was taken: .eval.json.tmp...)
            continue
        if f.suffix == ".jsonl":
            gzip_copy(f, dst / (f.name + ".gz"))
        elif f.is_file():
            shutil.copy2(f, dst / f.name)


def run_root(tmp: Path, campaign: str | None) -> Path | None:
    runs = tmp / "run"
    if campaign:
        root = runs / campaign
        if not root.is_dir():
            have = sorted(p.name for p in runs.iterdir()) if runs.is_dir() else []
            raise ConfigError("--campaign", campaign, f"the tarball's run/ holds {have}; name one of them")
        return root
    dirs = sorted(p for p in runs.iterdir() if p.is_dir()) if runs.is_dir() else []
    if len(dirs) > 1:
        raise ConfigError("--campaign", None, f"the tarball holds several runs {[p.name for p in dirs]}; name one")
    return dirs[0] if dirs else None


def kl_runs(root: Path) -> dict[str, Path]:
    """NAME -> its stage kl folder (`kl_runs/NAME/kl`, or `kl` of a single-hybrid campaign as NAME 'kl')."""
    found = {p.parent.name: p for p in sorted(root.glob("kl_runs/*/kl")) if p.is_dir()}
    if (root / "kl").is_dir():
        found["kl"] = root / "kl"
    return found


def summarize_kl(name: str, kl_dir: Path) -> dict[str, Any]:
    rows = []
    for line in (kl_dir / "metrics.jsonl").read_text().splitlines():
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # the last line of a snapshot taken while it was written: cut off
            continue
    train = [r for r in rows if r.get("split") != "val" and "tokens_per_s" in r]
    val = [r for r in rows if r.get("split") == "val"]
    info = json.loads((kl_dir / "run_info.json").read_text()) if (kl_dir / "run_info.json").is_file() else {}
    out: dict[str, Any] = {"name": name, "softmax_layers": info.get("softmax_layers"),
                           "tokens": max((r.get("tokens", 0) for r in rows), default=0),
                           "tokens_per_s_median": statistics.median(r["tokens_per_s"] for r in train) if train else None,
                           "peak_gpu_gib": max((r.get("peak_gpu_gib", 0) for r in rows), default=0),
                           "finished": (kl_dir / "DONE").is_file()}
    for tag, r in (("first_val", val[0] if val else None), ("last_val", val[-1] if val else None)):
        if r:
            out[tag] = {k: r[k] for k in ("step", "kl", "ppl", "recall_kl") if k in r}
    return out


def copy_probes(probes: Path, dst: Path, lease: str) -> str:
    """A selection's probe runs as probe_runs.tar.gz in DST, with their ranking table and chart; returns what it did.
    The layer count and global layers come from the selection.json beside them, or (a selection that did not finish)
    from the probe folders started."""
    sel = probes.parent / "selection.json"
    info = json.loads(sel.read_text()) if sel.is_file() else {}
    started = [int(p.name.split("_", 1)[1]) for p in probes.glob("layer_*") if p.name.split("_", 1)[1].isdigit()]
    layers = info.get("num_layers") or (max(started) + 1 if started else 0)
    dst.mkdir(parents=True, exist_ok=True)
    with tarfile.open(dst / "probe_runs.tar.gz", "w:gz") as tf:
        tf.add(probes, arcname="probes")
    cmd = [sys.executable, str(Path(__file__).with_name("probes_table.py")), str(probes), str(dst),
           "--layers", str(layers), "--global-layers", ",".join(str(g) for g in info.get("global_layers") or []),
           "--title", f"{probes.parent.name} single-layer probes ({lease})"]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:  # e.g. the all-linear probe unfinished: the runs are kept, the table is not made
        lines = (p.stderr or p.stdout).strip().splitlines() or [f"probes_table.py rc={p.returncode}"]
        return f"{dst.name}: probe runs kept, no table ({lines[-1]})"
    return f"{dst.name}: probe runs and their table" + ("" if sel.is_file() else " (selection unfinished)")


def import_lease(tarball: Path, out: Path, campaign: str | None = None) -> dict[str, Any]:
    if out.exists() and any(out.iterdir()):
        raise ConfigError("out", str(out), "the folder exists and is not empty; choose a new one (nothing is overwritten)")
    with tempfile.TemporaryDirectory() as td:
        tmp = Path(td)
        with tarfile.open(tarball) as tf:
            tf.extractall(tmp, filter="data")  # no absolute paths, links out or devices
        res = tmp / "res"
        if not res.is_dir():
            raise ConfigError("tarball", str(tarball), "holds no res/: is it a campaign's results.tar.gz?")
        root = run_root(tmp, campaign)  # (refusals before anything is written)
        out.parent.mkdir(parents=True, exist_ok=True)
        final, out = out, Path(tempfile.mkdtemp(prefix=f".{out.name}-importing-", dir=out.parent))
        try:  # built aside, renamed into place whole: an interrupted import leaves no half folder to commit
            summary = _lay_out(res, root, out, final.name)
        except BaseException:
            shutil.rmtree(out, ignore_errors=True)
            raise
        usual_mode(out)  # (mkdtemp's 0700 otherwise)
        if final.exists():
            final.rmdir()  # (empty: checked above)
        out.rename(final)
    summary["out"] = str(final)
    summary["evals"] = [str(final / Path(e).name) for e in summary["evals"]]
    return summary


def _lay_out(res: Path, root: Path | None, out: Path, lease: str) -> dict[str, Any]:
    """The lease's results laid out in ``out`` (a fresh folder): what ``import_lease`` renames into place."""
    for f in sorted(res.iterdir()):
        if f.is_file() and f.name not in MARKERS and not f.name.endswith(".ok") and f.suffix in TOP_SUFFIXES:
            shutil.copy2(f, out / f.name)
    if (res / "progress.log").is_file():
        shutil.copy2(res / "progress.log", out / "campaign_progress.log")
    evals = []
    for d in sorted(res.glob("eval_*")):
        if d.is_dir() and (d / "eval.json").is_file() and not is_preflight(d):
            copy_eval(d, out / d.name)
            evals.append(out / d.name)
    if (res / "demo_recall").is_dir():  # the demo's own recall (teacher and hybrid at 2k): kept as it is, and
        # out of --merge (its rows are named teacher / hybrid)
        shutil.copytree(res / "demo_recall", out / "demo_recall")
    if (res / "logs").is_dir():
        (out / "logs").mkdir()
        for f in sorted((res / "logs").glob("*.log")):
            (out / "logs" / f.name).write_text(last_state(f.read_bytes().decode(errors="replace")))
    summary: dict[str, Any] = {"out": str(out), "evals": [str(e) for e in evals], "kl": []}
    if (res / "progress.log").is_file():
        summary["evals_not_home"] = evals_not_home((res / "progress.log").read_text(errors="replace"),
                                                   {e.name for e in evals})
    if root is not None:
        unpacked = (res / "logs" / "align_unpack.log").is_file()
        summary["align"] = "unpacked from an earlier lease's parts" if unpacked else "trained in this lease"
        if (root / "align").is_dir():
            copy_stage(root / "align", out, "align", metrics=not unpacked)
        for name, kl_dir in kl_runs(root).items():
            copy_stage(kl_dir, out, "kl" if name == "kl" else f"{name}_kl")
            if (kl_dir / "metrics.jsonl").is_file():
                summary["kl"].append(summarize_kl(name, kl_dir))
        for sel in sorted(root.glob("select/*/selection.json")):
            dst = out / "selectors" / sel.parent.name
            dst.mkdir(parents=True, exist_ok=True)
            for f in sel.parent.iterdir():
                if f.is_file() and f.suffix in {".json", ".md", ".png"}:
                    shutil.copy2(f, dst / f.name)
        summary["probes"] = [copy_probes(p, out / "selectors" / p.parent.name, lease)
                             for p in sorted(root.glob("select/*/probes")) if p.is_dir()]
    return summary


def needle_rows(evals: list[str], task: str = "niah_single_1") -> list[str]:
    lines = []
    for e in evals:
        d = json.loads((Path(e) / "eval.json").read_text())
        for model, tasks in d.get("scores", {}).items():
            if task in tasks:
                cells = ", ".join(f"{k}: {v:.2f}" for k, v in sorted(tasks[task].items(), key=lambda kv: int(kv[0])))
                lines.append(f"{Path(e).name}: {model} {task} {cells}")
    return lines


def merge_into(merged: Path, evals: list[str]) -> None:
    """Re-run `ds-hybrid eval-merge` over the merged table's sources plus the new evaluations, from the folder its
    sources are recorded relative to (where the merge ran, e.g. the repository's root: here or a folder above the
    merged table), so that the sources stay recorded as they were."""
    from ds_hybrid.evaluation.merge import main as merge_main

    merged = merged.resolve()
    sources = json.loads((merged / "eval.json").read_text())["sources"]
    relative = [Path(s["file"]) for s in sources if not Path(s["file"]).is_absolute()]
    root = next((d for d in (Path.cwd(), *merged.parents) if all((d / f).is_file() for f in relative)), None)
    if root is None:
        gone = next(f for f in relative if not (Path.cwd() / f).is_file())
        raise ConfigError("--merge", str(merged), f"its source {gone} is not found from here or from a folder above "
                          "the merged table: run from the folder the merge was made in")
    new = {Path(e).resolve() for e in evals}
    items = []
    for s in sources:
        folder = Path(s["file"]).parent
        if (root / folder).resolve() in new:  # the same folder imported again: once
            continue
        renames = s.get("renames") or {}
        if len(renames) > 1:
            raise ConfigError("--merge", str(merged), f"source {folder} renames several models; merge it by hand")
        items.append("".join(f"{new_}={old}@" for old, new_ in renames.items()) + str(folder))
    here = Path.cwd()
    rel = [os.path.relpath(Path(e).resolve(), root) for e in evals]
    os.chdir(root)
    try:
        merge_main([*items, *rel, "--out", os.path.relpath(merged, root)])
    finally:
        os.chdir(here)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("tarball", type=Path, help="the lease's results.tar.gz (the device tool's files_at)")
    ap.add_argument("out", type=Path, help="a new folder, e.g. docs/data/compare_NAME_h200_DATE")
    ap.add_argument("--campaign", help="the run/ folder to read when the tarball holds several (e.g. compare)")
    ap.add_argument("--merge", type=Path, help="a merged eval folder of `ds-hybrid eval-merge` to add the evals to")
    args = ap.parse_args(argv)
    try:
        summary = import_lease(args.tarball, args.out, args.campaign)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.merge:
        try:
            merge_into(args.merge, summary["evals"])
        except ConfigError as e:
            print(f"error: {e}\n(the import itself is whole in {summary['out']}; merge its evaluations by hand: "
                  f"`ds-hybrid eval-merge` with the merged table's sources and {' '.join(summary['evals'])})",
                  file=sys.stderr)
            return 2
    print(f"{summary['out']}: {len(summary['evals'])} evaluations; align {summary.get('align', 'not in the tarball')}")
    for k in summary["kl"]:
        first, last = k.get("first_val", {}), k.get("last_val", {})
        tps = k["tokens_per_s_median"]
        print(f"{k['name']} {k['softmax_layers']}: {k['tokens'] / 1e6:.1f}M tokens, "
              f"{tps:,.0f} tokens/s median, peak {k['peak_gpu_gib']:.1f} GiB" if tps else f"{k['name']}: no train rows",
              "" if k["finished"] else "(unfinished: no DONE)")
        for key in ("kl", "ppl", "recall_kl"):
            if key in last:
                print(f"  {key}: {first.get(key, float('nan')):.3f} -> {last[key]:.3f}")
    for line in summary.get("probes", []):
        print(line)
    for line in needle_rows(summary["evals"]):
        print(line)
    for line in summary.get("evals_not_home", []):
        print(f"NOT HOME: {line} (logs/ says why; its scores are not in --merge)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
