"""The checks a launcher makes before its first stage starts (launchers/distill_70b.slurm, launchers/run_local.sh):
every stage still to run against the job's rank count, select's probes included, and the pipeline's wiring: kl
trains the layers stage select wrote, not the config's other spec. A bad setting is found before hours of align.

    python -m ds_hybrid.launch CONFIG STAGES [key=value ...]
    # prints out_dir, select.method, teacher, the stages to run and where select writes, one a line
    (environment: LAUNCH_RANKS, the job's rank count; SELECT_ARRAY, the launcher's probe array size; STAGES_DEFAULT=1:
    STAGES is the launcher's default list, from which an eval that cannot fit the node's GPU is left out with a note
    instead of refused; EVAL_ARGS: the eval stage's options (--device, --no-quality); KNOWN_STAGES: the stage names
    the launcher runs; ERROR_PREFIX: what an error line starts with)
"""
from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from ds_hybrid.config import TRAIN_STAGES, RunConfig, load_config, validate_for_launch
from ds_hybrid.errors import ConfigError
from ds_hybrid.layers import check_selection_spec

STAGES: tuple[str, ...] = ("align", "select", "kl", "finetune", "eval")
PROBE_METHODS: tuple[str, ...] = ("ga_s2", "halving")


def selection_path(cfg: RunConfig) -> Path:
    """Where stage select writes its ranking for this run config (its score and distance_reg included)."""
    from ds_hybrid.stages.select import selection_target

    return selection_target(cfg)


def _same_path(a: str | Path, b: str | Path) -> bool:
    return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


def eval_weights_gib(cfg: RunConfig, quality: bool = True) -> float | None:
    """GiB of 16-bit weights stage eval holds on its one GPU: teacher and hybrid together where it scores held-out
    quality (the teacher stays loaded for the KL while the hybrid runs), else the larger; None where the teacher's
    config cannot be read here (said on stderr)."""
    from ds_hybrid.plan import count_models, planned_softmax_layers
    from ds_hybrid.teacher import load_teacher_config

    try:
        tc = load_teacher_config(cfg.teacher)
        counts = count_models(tc, cfg, "kl", planned_softmax_layers(cfg, tc.num_hidden_layers))
    except (ConfigError, OSError, ValueError) as e:  # (a hub id this node cannot reach, a family plan lacks)
        print(f"note: no estimate of stage eval's memory ({e}); it runs as asked", file=sys.stderr)
        return None
    both = counts.teacher + counts.student if quality else max(counts.teacher, counts.student)
    return both * 2 / 2**30


def _option(args: Sequence[str], name: str) -> str | None:
    """The value of ``--name V`` or ``--name=V`` in an argument list (the last one given), else None."""
    value = None
    for i, a in enumerate(args):
        if a.startswith(name + "="):
            value = a.split("=", 1)[1]
        elif a == name and i + 1 < len(args):
            value = args[i + 1]
    return value


def eval_fits(cfg: RunConfig, eval_args: Sequence[str] = ()) -> tuple[bool, str]:
    """Whether stage eval's models fit this node's first GPU (True where it runs elsewhere, on no GPU, or with no
    estimate). ``eval_args``: the eval options the launcher passes (--device, --dtype, --no-quality)."""
    import torch

    device = _option(eval_args, "--device") or "auto"  # (eval's default: cuda where there is one)
    if not torch.cuda.is_available() or not (device == "auto" or device.startswith("cuda")):
        return True, ""
    gpu = torch.cuda.get_device_properties(0).total_memory / 2**30
    width = 4 if _option(eval_args, "--dtype") == "fp32" else 2
    quality = "--no-quality" not in eval_args
    need = eval_weights_gib(cfg, quality)
    if need is None or need * width / 2 <= 0.9 * gpu:
        return True, ""
    alone = (eval_weights_gib(cfg, False) or need) if quality else need
    bits = 8 * width
    if quality and alone * width / 2 <= 0.9 * gpu:
        return False, (f"stage eval holds teacher and hybrid on one GPU (the teacher stays for held-out quality), "
                       f"~{need * width / 2:.0f} GiB of {bits}-bit weights, more than this node's {gpu:.0f} GiB GPU "
                       "(--no-quality in EVAL_ARGS holds one model at a time)")
    return False, (f"stage eval loads each model whole on one GPU, ~{alone * width / 2:.0f} GiB of {bits}-bit "
                   f"weights for the larger, more than this node's {gpu:.0f} GiB GPU holds")


def eval_done(cfg: RunConfig) -> bool:
    """The launcher's reading: eval.json exists and does not say it is incomplete."""
    f = Path(cfg.out_dir) / "eval" / "eval.json"
    try:
        data = json.loads(f.read_text()) if f.is_file() else None
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.get("complete", True) is not False


def check_pipeline(cfg: RunConfig, stages: list[str], world_size: int, select_array: int = 0,
                   known: tuple[str, ...] = STAGES) -> None:
    """Raises ConfigError for the first setting that would stop (or silently misdirect) a stage still to run."""
    for st in stages:
        if st not in known:
            raise ConfigError("STAGES", ",".join(stages), f"no stage {st!r}; use {', '.join(known)} (comma-separated)")
    out = Path(cfg.out_dir)

    def done(st: str) -> bool:
        return (out / st / "DONE").is_file()

    for st in stages:  # (a stage done already is skipped by the launcher: not checked)
        if st in TRAIN_STAGES and not done(st):
            validate_for_launch(cfg, st, world_size, check_init_from=False)
    sel = selection_path(cfg)
    check_against_teacher(cfg, [st for st in stages if (st in TRAIN_STAGES and not done(st)) or
                                (st == "select" and not sel.is_file())])
    if "select" in stages and not sel.is_file():
        if select_array > 0 and cfg.select.method not in PROBE_METHODS:
            raise ConfigError("SELECT_ARRAY", select_array,
                              f"select.method={cfg.select.method} has no probes to share out: each array task would "
                              "make the whole selection; leave SELECT_ARRAY=0 (it is for select.method=ga_s2)")
        if select_array > 0 and cfg.select.method == "halving":
            raise ConfigError("SELECT_ARRAY", select_array,
                              "select.method=halving: its rounds need every task running at the same time, which a "
                              "job array does not promise (a task still pending stops the others after "
                              "dist_timeout_minutes); leave SELECT_ARRAY=0 (the probes run in this job, on all its "
                              "ranks), or use select.method=ga_s2, whose probes are independent")
        if cfg.select.method in PROBE_METHODS:
            from ds_hybrid.stages.probes import check_probes_for_launch
            check_probes_for_launch(cfg, world_size)
    if "select" in stages and "kl" in stages and not done("kl"):
        spec = cfg.softmax_layers
        reads = spec.get("selection") if isinstance(spec, dict) else None
        if not isinstance(reads, (str, Path)) or not _same_path(reads, sel):
            what = f"read {reads}" if reads is not None else f"train the layers of softmax_layers={spec!r}"
            raise ConfigError("softmax_layers", spec,
                              f"stage select writes its ranking to {sel} and kl would {what} instead; set "
                              f"softmax_layers: {{selection: {sel}, ratio: <r>}} (or k: <K>; as overrides: "
                              f"softmax_layers.selection={sel} softmax_layers.ratio=<r>), or leave select out of "
                              "STAGES")
        check_selection_spec(spec)  # (kl would stop on it after align and select)
    if "select" in stages and not sel.is_file() and "align" not in stages:
        from ds_hybrid.stages.select import NEEDS_ALIGN

        align_hf = out / "align" / "hf" / "config.json"
        if cfg.select.method in NEEDS_ALIGN and not align_hf.is_file():  # (else each task of a job array, a node
            # each, is scheduled to fail at its start)
            raise ConfigError("STAGES", ",".join(stages), f"select.method={cfg.select.method} reads stage align's "
                              f"export {align_hf.parent}, which is not there, and align is not among the stages: "
                              "add align to STAGES (before select), or run it first")


def check_against_teacher(cfg: RunConfig, stages: list[str]) -> None:
    """What the stages check against the teacher's config when they start, checked here for every stage still to run
    (else kl learned of a layer index past the teacher's last, or a seq_len past its context, after align and
    select): the seq_len of each, the softmax layers where they are a list or a spacing (a selection is read by kl
    from a file that select may still write), and select's own checks (its method's rows against the context,
    keep_global's layer types, select.reference, K). A hub teacher is downloaded
    first; a teacher folder not on this node (on the compute nodes only) is said, and left to the stages."""
    from ds_hybrid.layers import resolve_softmax_layers
    from ds_hybrid.modeling.families import check_context
    from ds_hybrid.teacher import load_teacher_config, local_teacher

    if not stages:
        return
    try:  # (a hub teacher is downloaded here, before the job's ranks would wait on one rank's download)
        tc = load_teacher_config(local_teacher(cfg.teacher))
    except ConfigError as e:
        # (a family, remote code or a hub that refuses an id: the stages would too; but "models/Llama" may be a
        # relative folder on the compute nodes only, which the hub is then asked for)
        local_looking = e.fix.startswith("not a folder here and the hub") and str(cfg.teacher).count("/") == 1
        if not (e.fix.startswith("no such folder") or local_looking):
            raise
        maybe = (" If it is a hub id, not a folder of the compute nodes, fix it now: the job would fail when its first "
                 "stage starts." if local_looking else "")
        print(f"note: the teacher's folder is not here ({e}): the stages check their settings against its config "
              f"when they start.{maybe}", file=sys.stderr)
        return
    spec = cfg.softmax_layers
    for st in stages:
        if st != "select":
            check_context(f"{st}.seq_len", cfg.stage(st).seq_len, tc)
        if st in ("kl", "finetune") and not (isinstance(spec, dict) and "selection" in spec):
            resolve_softmax_layers(spec, tc.num_hidden_layers)
    if "select" in stages:  # all of select's own checks against the teacher (the rows its method reads fit the
        # context, keep_global's sliding-window layers, select.reference's layer count, K): found before align runs
        from ds_hybrid.stages.select import check_select_against_teacher
        from ds_hybrid.teacher import load_tokenizer

        check_select_against_teacher(cfg, tc, load_tokenizer(local_teacher(cfg.teacher)))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) < 2:
        print("usage: python -m ds_hybrid.launch CONFIG STAGES [key=value ...]", file=sys.stderr)
        return 2
    prefix = os.environ.get("ERROR_PREFIX", "config error: ")
    try:
        ranks = os.environ.get("LAUNCH_RANKS") or "1"
        if not re.fullmatch("[0-9]+", ranks) or int(ranks) < 1:
            raise ConfigError("LAUNCH_RANKS", ranks, "the job's rank count: 1 or more")
        array = os.environ.get("SELECT_ARRAY") or "0"
        if not re.fullmatch("[0-9]+", array):
            raise ConfigError("SELECT_ARRAY", array, "the number of probe tasks: 0 (none) or more")
        raw = os.environ.get("EVAL_ARGS", "")
        if any(c in raw for c in "'\"\\*?[$`"):  # (the launcher passes it split at spaces, no quoting: a quoted
            # path with a space was one word here and two words to eval)
            raise ConfigError("EVAL_ARGS", raw, "the launcher splits it at spaces, with no quoting, escapes or "
                              "globs: give options and paths without quotes, spaces, backslashes or * ? [ $ `")
        eval_args = raw.split()
        stages = [s for s in argv[1].split(",") if s]
        if not stages:
            raise ConfigError("STAGES", argv[1], f"name the stages to run, comma-separated (of {', '.join(STAGES)})")
        cfg = load_config(argv[0], argv[2:])
        known = tuple((os.environ.get("KNOWN_STAGES") or ",".join(STAGES)).split(","))
        check_pipeline(cfg, stages, int(ranks), int(array), known)
        if "eval" in stages and not eval_done(cfg):
            fits, why = eval_fits(cfg, eval_args)
            if not fits and os.environ.get("STAGES_DEFAULT") == "1":  # the launcher's default list: go without it
                stages = [s for s in stages if s != "eval"]
                print(f"note: {why}: eval left out of the default stages; evaluate the exported model on a GPU that "
                      "holds it (ds-hybrid eval, docs/EVAL.md)", file=sys.stderr)
            elif not fits:
                raise ConfigError("STAGES", argv[1], f"{why}; leave eval out of STAGES and evaluate the exported "
                                  "model on a GPU that holds it (ds-hybrid eval, docs/EVAL.md)")
    except ConfigError as e:
        print(f"{prefix}{e}", file=sys.stderr)
        return 2
    print(cfg.out_dir, cfg.select.method, cfg.teacher or "embedded", ",".join(stages), selection_path(cfg), sep="\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
