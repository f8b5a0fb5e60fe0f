"""The training loop shared by stages align, kl and finetune.

    run_stage(cfg, "kl")  # validate -> data -> resume point -> models -> restore -> steps -> eval -> export -> DONE

Per optimizer step: the step's rows (a pure function of seed and step), split over ranks and accumulation
micro-batches; the stage's train_step; metrics (loss, lr, grad norm, tokens/s, step time, MFU, memory) to
TensorBoard, metrics.jsonl, the progress bar and the log. Checkpoints every ``ckpt_every`` steps and at the end.

Failure behaviour:
- a non-finite loss on any rank stops every rank before the optimizer state is saved again: the last checkpoint
  stays the last good one (exit code 3);
- SIGTERM or SIGUSR1 (e.g. Slurm's time-limit warning) makes every rank checkpoint at the end of the current step
  and exit (code 128 + signal number), to be resumed by running the same command again;
- an exception on a rank ends that process; the launcher ends the others (and a collective that waits longer than
  ``dist_timeout_minutes`` raises), so a job never hangs.
"""

from __future__ import annotations

import functools
import gc
import json
import logging
import math
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import torch

from ds_hybrid import distributed as D
from ds_hybrid import sync_free
from ds_hybrid.checkpoint import Checkpointer, atomic_write_text, check_world_size
from ds_hybrid.config import TRAIN_STAGES, RunConfig, checkpoint_due, stage_steps, validate_for_launch
from ds_hybrid.data import (PackedSequences, device_micro_batches, pin_hub_commit, prepare_streams, rank_micro_batches,
                            row_bos, step_rows, warn_unrepresented, with_hub_request)
from ds_hybrid.errors import ConfigError
from ds_hybrid.identity import mixer_option_change, teacher_id
from ds_hybrid.locks import held
from ds_hybrid.monitor import Monitor, memory_stats, peak_tflops, setup_logging
from ds_hybrid.plan import NOT_TERMS
from ds_hybrid.selection import content_fingerprint
from ds_hybrid.stages.base import HeldOut, Stage, StageContext, teacher_weights
from ds_hybrid.stages.common import (check_env_knobs, optimizer_settings, restore_optimizer_settings,
                                     shard_shape_decay, zero_stage)

log = logging.getLogger("ds_hybrid")

DONE = "DONE"
EXIT_NONFINITE = 3


class NonFiniteLoss(RuntimeError):
    pass


class StopRequested(SystemExit):
    pass


def stage_class(name: str):
    from ds_hybrid.stages.align import AlignStage
    from ds_hybrid.stages.kl import FinetuneStage, KLStage

    return {"align": AlignStage, "kl": KLStage, "finetune": FinetuneStage}[name]


def make_context(cfg: RunConfig, stage: str) -> StageContext:
    """Everything a stage needs that can be checked without building a model (cheap: config files only)."""
    from ds_hybrid.layers import resolve_softmax_layers
    from ds_hybrid.modeling.families import check_context, head_dim
    from ds_hybrid.modeling.mixers import check_mixer
    from ds_hybrid.teacher import check_vocab, job_teacher, load_teacher_config, load_tokenizer

    validate_for_launch(cfg, stage, D.world_size())
    teacher_path = job_teacher(cfg.teacher)
    teacher_config = load_teacher_config(teacher_path)
    check_mixer(cfg.mixer, head_dim(teacher_config))
    tokenizer = load_tokenizer(teacher_path)
    check_vocab(teacher_config, tokenizer)
    L = teacher_config.num_hidden_layers
    # (the main rank's reading of a selection file for every rank: ranks that built other layers would meet in
    # mismatched collectives)
    layers = [] if stage == "align" else D.main_reads(lambda: resolve_softmax_layers(cfg.softmax_layers, L))
    s = cfg.stage(stage)
    check_context(f"{stage}.seq_len", s.seq_len, teacher_config)
    if s.micro_batch == "auto":
        # (the main rank's plan for all; should it fail, every rank fails with it instead of waiting for it)
        s.micro_batch = D.main_reads(lambda: resolve_auto_micro_batch(cfg, stage, teacher_config, layers))
        log.info("%s.micro_batch: auto -> %d (largest that the memory plan fits)", stage, s.micro_batch)
    if stage == "kl":  # on the main rank (it reads samples of every tensor of two folders), its verdict for all
        from ds_hybrid.selection import check_selection_origin

        align = s.init_from or cfg.stage_dir("align") / "hf"
        # (any error there, a ConfigError or a file that cannot be read, is raised on every rank)
        D.main_reads(lambda: check_selection_origin(cfg.softmax_layers, teacher_path, align))
    return StageContext(cfg=cfg, stage=stage, s=s, tokenizer=tokenizer, teacher_path=teacher_path,
                        teacher_config=teacher_config, softmax_layers=layers, total_steps=stage_steps(s),
                        run_dir=cfg.stage_dir(stage), teacher_weights=D.main_reads(lambda: teacher_weights(teacher_path)))


def _step_batches(train: PackedSequences, step: int, global_batch: int, micro_batch: int, seed: int):
    """This rank's micro-batches of ``step``, on the device (one pinned copy)."""
    rows = step_rows(step, len(train), global_batch, seed)
    return device_micro_batches(train, rank_micro_batches(rows, D.rank(), D.world_size(), micro_batch), D.device())


def held_out(runner: Stage, held: HeldOut) -> dict[str, float]:
    """The stage's held-out evaluation, run eagerly: with compiled blocks, a no-grad forward would compile a second
    set of graphs for a few dozen sequences (on a fresh H200 the first evaluation took 27 s in stage kl and 68 s in
    align, mostly compiling; docs/BENCHMARKS.md), more than the evaluation itself costs eagerly."""
    with torch.compiler.set_stance("force_eager"):
        return runner.evaluate(held)


def prepare_data(cfg: RunConfig, stage: str) -> dict:
    """``train.py --prepare-data``: tokenize what ``stage`` reads into the token cache and return its record (cache
    path, tokens per source), building no model and touching no accelerator: a CPU node can do it before the GPU job,
    and a later run with the same data settings and teacher reuses the cache."""
    from ds_hybrid.teacher import load_tokenizer

    pin_hub_commit(cfg)
    s = cfg.stage(stage) if stage in TRAIN_STAGES else None
    if stage == "select" and cfg.select.method in ("ga_s2", "halving"):  # its probes read what a probe's kl reads
        from ds_hybrid.stages.probes import probe_stage_config

        s = probe_stage_config(cfg, Path("."))
    elif stage == "select":  # the other selectors read held-out rows only (stages.scorers)
        streams = prepare_streams(cfg.data, load_tokenizer(cfg.teacher), need_tokens=0)
        return {"data_cache": str(streams.path), **with_hub_request(streams.meta, cfg)}
    streams = prepare_streams(cfg.data, load_tokenizer(cfg.teacher), need_tokens=(s.tokens if s else 0) or math.inf,
                              seq_len=s.seq_len if s else 1)
    return {"data_cache": str(streams.path), **with_hub_request(streams.meta, cfg)}


def check_resume(stage: str, latest: tuple[Path, dict[str, Any]] | None, now: dict[str, Any],
                 longer: bool = False) -> None:
    """Refuse a resume whose steps would mean other rows or another schedule than the run that wrote the checkpoint
    (``latest``: its path and marker): the rows of step k are a function of the seed, the global batch, the row
    length and the corpus's rows, and the learning rate of step k of the stage's total steps. Checkpoints written
    before these settings were recorded are not checked. ``longer``: a run continued on purpose with more steps
    (successive halving's survivors): its new step count is not warned about."""
    if latest is None:
        return
    path, marker = latest
    check_world_size(path, marker.get("world_size"))
    was = marker.get("settings") or {}
    # (the whole stage folder: with only its checkpoints moved, the new run would write over the old one's logs)
    again = f"set it back to resume, or move {path.parent.parent} away to start the stage again"
    for key, field in (("global_batch", f"{stage}.global_batch"), ("seq_len", f"{stage}.seq_len"), ("seed", "seed"),
                       ("mixture", "data.mixture")):
        if key in was and was[key] != now[key]:
            raise ConfigError(field, now[key], f"the checkpoint {path} was written with {was[key]!r}: its steps "
                              f"stand for other rows of the corpus; {again}")
    if was and was.get("row_bos") != now.get("row_bos"):  # (a record from before it was kept: rows without BOS)
        rows = lambda t: "no BOS" if t is None else f"BOS token {t}"  # noqa: E731
        raise ConfigError("data.bos", f"rows with {rows(now.get('row_bos'))}", f"the checkpoint {path} was written "
                          f"with {rows(was.get('row_bos'))} at the start of each row: its steps stand for other rows; "
                          f"{again}")
    model = {"teacher": ("teacher", "the teacher's weights differ (another model or checkpoint of it)"),
             "softmax_layers": ("softmax_layers", f"its softmax layers were {was.get('softmax_layers')}"),
             "mixer": ("mixer", f"its mixer was {was.get('mixer')!r}"),
             "mixer_options": None,  # (compared as options below: 1e-5 written as text, a default spelt out, an
                                     # option the mixer never reads are the same model)
             "temperature": (f"{stage}.temperature", f"its loss had temperature {was.get('temperature')}"),
             "ce_weight": (f"{stage}.ce_weight", f"its loss had ce_weight {was.get('ce_weight')}")}
    for key, spec in model.items():
        if key not in was:
            continue
        if key == "mixer_options":
            if change := mixer_option_change(was[key], now[key], now["mixer"]):
                field, value, before = change
                had = (f"had {field.removeprefix('mixer_options.')}={before!r}" if "." in field
                       else f"were {before!r}")  # (a record this version cannot read as options: as written)
                raise ConfigError(field, value, f"the checkpoint {path} is of another model or loss: its mixer "
                                  f"options {had}; {again}")
        elif was[key] != now[key]:
            field, what = spec
            raise ConfigError(field, now[key] if key != "teacher" else "this run's teacher",
                              f"the checkpoint {path} is of another model or loss: {what}; {again}")
    if "frozen" in was and was["frozen"] != now["frozen"]:  # (a rate of 0 drops its parameters' optimizer groups)
        key = sorted(set(was["frozen"]) ^ set(now["frozen"]))[0]
        # (0 now: the checkpoint has that group, so any rate above 0 loads; above 0 now: it has none, so only 0 does)
        small = " (a small rate instead of 0 resumes)" if key in now["frozen"] else ""
        raise ConfigError(f"{stage}.{key}", now.get(key, 0 if key in now["frozen"] else "above 0"),
                          f"the checkpoint {path} was written with {stage}.{key} "
                          f"{'0' if key in was['frozen'] else 'above 0'}: a rate of 0 freezes those parameters and "
                          f"leaves their optimizer group out, so the checkpoint's optimizer state would not "
                          f"load{small}; {again}")
    layout = {0: 0, 1: 1, 2: 1, 3: 3}  # (ZeRO-1 and -2 write the same optimizer files)
    for key, field, what in (("zero_stage", f"{stage}.ds_config", "ZeRO stage"), ("dtype", "dtype", "dtype")):
        same = (lambda a, b: layout.get(a, a) == layout.get(b, b)) if key == "zero_stage" else (lambda a, b: a == b)
        if key in was and key in now and not same(was[key], now[key]):
            raise ConfigError(field, f"{what} {now[key]}", f"the checkpoint {path} was written under {what} "
                              f"{was[key]}, and DeepSpeed loads its optimizer state (partitioned and typed so) only "
                              f"under the same; {again}")
    moved = ("data_cache" in was and was["data_cache"] != now["data_cache"] and was.get("val_digest")
             and was["val_digest"] == now.get("val_digest") and was.get("train_sequences") == now["train_sequences"])
    if moved and D.is_main():  # (its key hashes the files' paths and times: a corpus copied, restored or re-synced)
        log.warning("%s: the token cache is %s here, %s in the run that wrote %s, but its held-out tokens and its %d "
                    "training rows are the same: taken as the same corpus (moved or re-timestamped)", stage,
                    now["data_cache"], was["data_cache"], path, now["train_sequences"])
    if ("train_sequences" in was and was["train_sequences"] != now["train_sequences"]) or \
            ("data_cache" in was and was["data_cache"] != now["data_cache"] and not moved):
        raise ConfigError("data", f"{now['train_sequences']} rows (token cache {now['data_cache']})",
                          f"the checkpoint {path} was written over {was.get('train_sequences')} rows (token cache "
                          f"{was.get('data_cache')}): the data settings, the corpus or {stage}.tokens changed, so its "
                          f"steps stand for other rows; restore them to resume, or move {path.parent.parent} away to "
                          "start the stage again")
    step = marker.get("step")
    if isinstance(step, int) and "total_steps" in now and step > now["total_steps"]:
        # (nothing would train: the stage would end marked done at step total over the model of step ``step``)
        raise ConfigError(f"{stage}.tokens", f"{now['total_steps']} steps", f"the checkpoint {path} is at step "
                          f"{step}, past this run's last step: raise {stage}.tokens to at least {step} steps' worth to "
                          f"resume it, or move {path.parent.parent} away to start the stage again")
    if "total_steps" in was and was["total_steps"] != now["total_steps"] and not longer and D.is_main():
        log.warning("%s: the checkpoint %s was written in a run of %d steps, this one has %d (%s.tokens changed): the "
                    "learning-rate schedule is stretched from here on, so the resumed steps are not the ones either "
                    "run alone would take", stage, path, was["total_steps"], now["total_steps"], stage)
    changed = [f"{stage}.{k} {was[k]!r} -> {now[k]!r}" for k in ("schedule", "warmup_steps", "min_lr_ratio", "clip")
               if k in was and was[k] != now[k]]
    if changed and D.is_main():
        log.warning("%s: resumed with this run config's step settings, not those the checkpoint %s was written with: "
                    "%s; the learning rate (or the clipping) of the resumed steps follows the new ones", stage, path,
                    "; ".join(changed))


class _Signals:
    """SIGTERM / SIGUSR1 (Slurm's warning before the time limit): checkpoint at the end of the current step, then
    exit. One record per process, installed when a stage starts: a signal that arrives while no step runs (a stage's
    setup, between stage select's probes) is kept, never dropped, and stops the stage that runs next at its next
    check (before its models are built, before its first step, after its last checkpoint: no new save needed)."""

    received: int | None = None

    @classmethod
    def install(cls) -> type[_Signals]:
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            if signal.getsignal(sig) != cls._handle:
                signal.signal(sig, cls._handle)
        return cls

    @classmethod
    def _handle(cls, signum, frame) -> None:
        cls.received = signum
        log.warning("received signal %d: checkpointing at the end of the current (or next) step, then exiting", signum)


def device_gib() -> float:
    """Memory of this rank's device: the GPU's, or on CPU the host's available memory shared by the local ranks."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(D.device()).total_memory / 2**30
    import psutil

    env = __import__("os").environ  # (torchrun and Slurm set LOCAL_WORLD_SIZE, the deepspeed launcher LOCAL_SIZE)
    local = int(env.get("LOCAL_WORLD_SIZE") or env.get("LOCAL_SIZE") or 1)
    return psutil.virtual_memory().available / 2**30 / max(1, local)


def resolve_auto_micro_batch(cfg: RunConfig, stage: str, teacher_config, softmax_layers: list[int]) -> int:
    from ds_hybrid.plan import auto_micro_batch, count_models

    counts = count_models(teacher_config, cfg, stage, softmax_layers)
    return auto_micro_batch(cfg, stage, counts, D.world_size(), device_gib(), on_gpu=torch.cuda.is_available())


def stage_plan(ctx: StageContext):
    """The memory plan of this stage on this job (printed before the models are built, kept next to the measured)."""
    from ds_hybrid.plan import count_models, make_plan

    counts = count_models(ctx.teacher_config, ctx.cfg, ctx.stage, ctx.softmax_layers)
    gib = device_gib() if torch.cuda.is_available() else 80.0
    return make_plan(ctx.cfg, ctx.stage, counts, D.world_size(), gib, on_gpu=torch.cuda.is_available())


def rank_places() -> list[dict]:
    """Where every rank runs (host, Slurm node, local rank): shows a multi-node job really spread."""
    import os
    import socket

    mine = {"rank": D.rank(), "host": socket.gethostname(), "slurm_node": os.environ.get("SLURMD_NODENAME"),
            "local_rank": D.local_rank()}
    return D.all_gather(mine)


def all_engines(runner) -> dict:
    engines = dict(runner.engines)
    if getattr(runner, "teacher", None) is not None:
        engines["teacher"] = runner.teacher
    return engines


def release_engines(runner) -> None:
    """Tear down the stage's DeepSpeed engines (``destroy``: their gradient hooks removed) and drop them, so that a
    process that runs several stages frees each one's memory: stage select runs one kl stage per probe, and an engine
    whose hooks still hold it through autograd is out of the garbage collector's reach (19 probes of Gemma-3-270M
    grew a CPU run by ~4 GiB a probe until it was killed)."""
    for name, engine in all_engines(runner).items():
        destroy = getattr(engine, "destroy", None)
        if callable(destroy):
            try:
                destroy()
            except Exception as e:  # (in a `finally`: an error here must not hide the stage's own)
                log.warning("could not tear down the %s engine: %s", name, e)
    runner.engines = {}
    for attr in ("engine", "teacher"):
        if getattr(runner, attr, None) is not None:
            setattr(runner, attr, None)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def gather_param_report(runner) -> list[dict[str, int]]:
    """Per rank: parameters held locally vs in full, for each engine (shows ZeRO-3 partitioning at work)."""
    from ds_hybrid.zero import full_shape

    mine: dict[str, Any] = {}
    for name, engine in all_engines(runner).items():
        local = full = local_bytes = 0
        for p in {id(p): p for p in engine.module.parameters()}.values():
            full += int(torch.Size(full_shape(p)).numel())
            held = p.ds_tensor if hasattr(p, "ds_tensor") else p
            local += int(held.numel())
            local_bytes += int(held.numel()) * held.element_size()
        mine[name] = {"local": local, "full": full, "local_bytes": local_bytes}
    if torch.cuda.is_available():  # everything the engines hold on this GPU once built (params, optimizer, buffers)
        mine["gpu_allocated_after_setup"] = int(torch.cuda.memory_allocated())
    return D.all_gather(mine)


def warn_repeats(stage: str, steps: int, global_batch: int, seq_len: int, train_rows: int) -> float:
    """How many passes over its training rows a stage's budget reads (the rows wrap around, epoch after epoch),
    warned of above one: a corpus smaller than the budget repeats every row that many times."""
    passes = steps * global_batch / max(train_rows, 1)
    if passes > 1:
        log.warning("%s reads %.1f passes over the corpus's %d training rows of %d tokens (%s tokens of %s): every "
                    "row is trained on that many times; a larger corpus (data.source), or fewer %s.tokens, repeats "
                    "less", stage, passes, train_rows, seq_len, f"{steps * global_batch * seq_len:,}",
                    f"{train_rows * seq_len:,}", stage)
    return passes


def set_aside_finished_run(run_dir: Path) -> Path:
    """Move a finished stage's DONE, checkpoints, metrics and TensorBoard files into ``run_dir/previous/<time>/`` (a
    rerun with ``--force`` starts at step 0 and logs afresh; nothing written is deleted; its ``hf/`` export is
    replaced by the rerun's, as before)."""
    dest = run_dir / "previous" / time.strftime("%Y%m%d-%H%M%S")
    n = 1
    while dest.exists():
        n += 1
        dest = dest.with_name(f"{dest.name.split('.')[0]}.{n}")
    dest.mkdir(parents=True)
    # DONE last: a set-aside cut short leaves the stage finished, and the next --force moves the rest
    for name in ("checkpoints", "metrics.jsonl", "tensorboard", "run_info.json", "runs.jsonl", "config.yaml", DONE):
        if (run_dir / name).exists():
            os.replace(run_dir / name, dest / name)
    log.warning("--force: the finished run's DONE, checkpoints and logs moved to %s; rerunning from step 0", dest)
    return dest


def check_finished_run(run_dir: Path, cfg: RunConfig, stage: str) -> None:
    """A finished stage is skipped: refused (naming the field, on every rank: the main rank's verdict) where its
    recorded config.yaml says it trained another model than this config asks for (another teacher, mixer, mixer
    options, softmax layers or seed: the next stage would start from it), and warned about where only the stage's own
    settings changed."""
    changed = D.main_reads(lambda: _finished_run_changes(run_dir, cfg, stage))
    if changed and D.is_main():
        log.warning("stage %s finished in %s with other settings (%s); it is not run again: add --force to train it "
                    "with these", stage, run_dir, "; ".join(changed))


def _finished_run_changes(run_dir: Path, cfg: RunConfig, stage: str) -> list[str]:
    """:func:`check_finished_run`'s verdict, on the main rank: raises for another model, returns the stage's changed
    settings."""
    import yaml

    try:
        was = yaml.safe_load((run_dir / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return []  # (an older run without the record: nothing to compare)
    if not isinstance(was, dict):
        return []
    try:
        was_layers = json.loads((run_dir / "run_info.json").read_text()).get("softmax_layers")
    except (OSError, ValueError, AttributeError):
        was_layers = None
    now = cfg.to_dict()
    fix = (f"the stage finished in {run_dir} with {{}}={{!r}}: give another out_dir for this model, or add --force to "
           "train the stage again (the finished run is set aside, not deleted)")
    if "teacher" in was and teacher_id(was["teacher"]) != teacher_id(now["teacher"]):
        raise ConfigError("teacher", now["teacher"], fix.format("teacher", was["teacher"]))
    for key in ("mixer", "seed"):
        if key in was and was[key] != now[key]:
            raise ConfigError(key, now[key], fix.format(key, was[key]))
    if stage != "align" and isinstance(was_layers, list):  # (align has none: all-linear whatever the spec)
        from ds_hybrid.layers import resolve_softmax_layers
        from ds_hybrid.teacher import load_teacher_config

        try:  # (the spec as it resolves now: a selection made again under the same spec may name other layers)
            layers = resolve_softmax_layers(cfg.softmax_layers, load_teacher_config(cfg.teacher).num_hidden_layers)
        except (ConfigError, OSError, ValueError):
            layers = None  # (a spec that no longer resolves here: nothing to compare)
        if layers is not None and sorted(layers) != sorted(was_layers):
            raise ConfigError("softmax_layers", now["softmax_layers"], fix.format("softmax_layers", was_layers))
    if isinstance(was.get("mixer_options"), dict) and \
            (change := mixer_option_change(was["mixer_options"], now["mixer_options"], cfg.mixer)):
        raise ConfigError(change[0], change[1], fix.format(change[0], change[2]))
    section = was.get(stage)
    if not isinstance(section, dict):
        return []
    return [f"{stage}.{k} {section[k]!r} -> {v!r}" for k, v in now[stage].items()
            if k in section and section[k] != v and not (k == "micro_batch" and v == "auto")]  # (recorded resolved)


def finished_on_main(run_dir: Path) -> bool:
    """Whether the stage in ``run_dir`` has finished (its DONE exists), as the main rank sees it, on every rank: one
    verdict for all. A rank that looked for itself after `--force` had moved DONE away would skip the barrier that the
    others wait at and meet them in another collective: a hang until the timeout."""
    return bool(D.broadcast_object((run_dir / DONE).is_file()))


def run_stage(cfg: RunConfig, stage: str, force: bool = False, restart: bool = True,
              data_tokens: int | None = None) -> Path:
    """Run (or resume) one training stage. ``force``: also when it has finished (DONE); then ``restart`` sets the
    finished run aside and starts at step 0 (`train.py --force`), ``restart=False`` resumes from its last checkpoint
    with the config as it is now (successive halving's survivors, continued with more tokens). ``data_tokens``: the
    budget the corpus prefix is sized for (default: the stage's tokens; halving's rounds all take the longest
    round's, so that their rows, and their order, are those of one longer probe)."""
    D.init_distributed(cfg.dist_timeout_minutes)
    setup_logging()
    signals = _Signals.install()  # before the setup: a signal during it is honoured at the first step
    check_env_knobs()
    pin_hub_commit(cfg)  # (a hub dataset: the commit this run reads, the same in every stage and resume)
    run_dir = cfg.stage_dir(stage)

    def nothing_to_do(finished: bool) -> bool:
        if finished and not force:
            check_finished_run(run_dir, cfg, stage)
            log.info("stage %s already finished (%s); nothing to do", stage, run_dir / DONE)
        return finished and not force

    if nothing_to_do(finished_on_main(run_dir)):
        return run_dir
    t_start = time.perf_counter()
    auto_micro = cfg.stage(stage).micro_batch == "auto"  # (make_context resolves it)
    ctx = make_context(cfg, stage)  # (the run config checked: a bad one is refused before anything is written)
    runner = stage_class(stage)(ctx)
    runner.check()  # e.g. the previous stage's export: refused before the corpus is tokenized
    with stage_held(run_dir, stage):
        finished = finished_on_main(run_dir)  # (again: a copy that held the lock until now may have finished it)
        if nothing_to_do(finished):
            return run_dir
        if finished and restart:  # --force: a fresh run, not a resume from the finished one's end
            if D.is_main():
                set_aside_finished_run(run_dir)
            D.barrier()
        return _run_stage(ctx, runner, run_dir, signals, restart, data_tokens, t_start, auto_micro)


def stage_held(run_dir: Path, stage: str):
    """The stage's run folder held while it runs (locks.held on ``run_dir/.stage.lock``): a second copy of the same
    stage (a job submitted again while the first, requeued, waits or runs; the same command in two shells) would
    resume from the same checkpoint and write the same checkpoint folders, metrics and TensorBoard files at once,
    each pruning and vouching for the other's files. Where the file system has no flock, a warning and no lock."""
    path = run_dir / ".stage.lock"

    def busy(holder: str):
        return ("out_dir", str(run_dir.parent), f"stage {stage} already runs in {run_dir} ({holder}; {path} is "
                f"locked): a second copy would write the same checkpoints and logs at once. Wait for it to end or stop "
                f"it (running the command again then resumes from its last checkpoint); if that process is gone (a "
                f"node that crashed can leave its lock on a shared file system until the server lets it go), delete "
                f"{path} and run again; for a separate run give another out_dir")

    return held(path, busy, cannot_lock=None)


def _run_stage(ctx: StageContext, runner: Stage, run_dir: Path, signals: type[_Signals], restart: bool,
               data_tokens: int | None, t_start: float, auto_micro: bool) -> Path:
    """run_stage's work, with the stage's run folder held."""
    cfg, stage, s = ctx.cfg, ctx.stage, ctx.s
    phase_s: dict[str, float] = {}  # where a run's wall time goes (a probe's fixed cost: docs/SELECT.md)
    torch.manual_seed(cfg.seed)

    def stop_building() -> None:  # (the main rank alone tokenizes, the others wait for it: no collective here; its
        # exit ends their wait, and the launcher's handling of the signal, a requeue, follows)
        if signals.received is not None:
            log.warning("stopped %s's token cache build on a signal: the units tokenized so far are kept; rerun the "
                        "command to go on", stage)
            raise StopRequested(128 + int(signals.received))

    streams = prepare_streams(cfg.data, ctx.tokenizer, is_main=D.is_main(), barrier=D.wait_for_main,
                              need_tokens=data_tokens or s.tokens, seq_len=s.seq_len, from_main=D.wait_for_main,
                              stop=stop_building)
    bos = row_bos(cfg.data.bos, ctx.tokenizer)
    train = PackedSequences(streams.train, s.seq_len, mixture=cfg.data.mixture, seed=cfg.seed, bos=bos)
    val = PackedSequences(streams.val, s.seq_len, max_rows=s.eval_sequences, bos=bos)
    if len(train) == 0 and cfg.data.mixture and len(PackedSequences(streams.train, s.seq_len, bos=bos)):
        raise ConfigError("data.mixture", dict(cfg.data.mixture), f"leaves no training rows at {stage}.seq_len "
                          f"{s.seq_len}: the sources that have rows are all weighted 0; give one of them a weight")
    if len(train) == 0 or len(val) == 0:
        cap = f", raise data.max_documents (now {cfg.data.max_documents})" if cfg.data.max_documents else ""
        fix = (f"shorten seq_len, add text to data.source{cap} or lower data.val_tokens (it holds whole documents out "
               "of training)" if len(train) == 0 else
               "shorten seq_len or raise data.val_tokens (whole documents held out: about every 8th document of a "
               "source's first files until its share is met, so a source of a few large documents, such as JSONL "
               "rows of whole books, may hold none out; split such text into more documents)")
        raise ConfigError(f"{stage}.seq_len", s.seq_len,
                          f"the corpus gives {len(train)} training and {len(val)} held-out sequences at this length "
                          f"({streams.meta['train_tokens']} / {streams.meta['val_tokens']} tokens; a row never spans "
                          f"two files of the corpus, whose remainders are dropped); {fix}")
    warn_unrepresented(streams, val, f"{stage}.seq_len")
    if D.is_main():
        warn_repeats(stage, stage_steps(s), s.global_batch, s.seq_len, len(train))
    if len(val) < s.eval_sequences and D.is_main():
        log.warning("%s.eval_sequences=%d, but the held-out text gives %d rows of %d tokens: every held-out score is "
                    "over those %d; raise data.val_tokens (a new token cache) or lower eval_sequences", stage,
                    s.eval_sequences, len(val), s.seq_len, len(val))

    def stop_if_signalled(where: str) -> None:
        """A signal (Slurm's warning) that came while no step ran: stop here, where nothing is left unsaved, rather
        than go on to build a 70B model or export it, train a step and write a checkpoint that may outlast the
        warning (a job that then reaches its time limit is not requeued)."""
        if D.any_rank(signals.received is not None):
            log.warning("stopped %s %s on a signal; nothing unsaved is lost; rerun the command to resume", stage, where)
            raise StopRequested(128 + int(signals.received or signal.SIGTERM))

    stop_if_signalled("before building its models")
    plan = stage_plan(ctx)
    log.info("%s", plan.table())
    ckpt = Checkpointer(run_dir / "checkpoints", s.keep_checkpoints, verify=s.ckpt_verify,
                        expected_bytes=plan.checkpoint_bytes)
    settings = {"global_batch": s.global_batch, "seq_len": s.seq_len, "seed": cfg.seed, "total_steps": ctx.total_steps,
                "train_sequences": len(train), "data_cache": streams.path.name, "mixture": cfg.data.mixture,
                "val_digest": streams.meta.get("val_digest"), "row_bos": bos,
                # what the weights and the loss are: another teacher, layer set, mixer or loss is another run
                "teacher": D.main_reads(lambda: content_fingerprint(ctx.teacher_path)),
                "softmax_layers": list(ctx.softmax_layers), "mixer": cfg.mixer,
                "mixer_options": {k: v for k, v in cfg.mixer_options.items() if k != "backend"},  # (how, not what)
                # the parameters a rate of 0 freezes (no optimizer group: another optimizer state); align trains
                # mixers alone, at lr
                "frozen": [k for k, v in (("lr", s.lr), ("lr_rest", s.lr_rest)) if v == 0 and
                           (k == "lr" or stage != "align")], "lr": s.lr, "lr_rest": s.lr_rest,
                "temperature": s.temperature, "ce_weight": s.ce_weight,
                # how the steps are taken: changed on a resume on purpose at times, so said, not refused
                "schedule": s.schedule, "warmup_steps": s.warmup_steps, "min_lr_ratio": s.min_lr_ratio, "clip": s.clip,
                # how the optimizer state is laid out on disk (partitioned, typed): DeepSpeed loads it only so
                "zero_stage": zero_stage(ctx.ds_config()), "dtype": str(ctx.dtype).removeprefix("torch.")}
    # the resume point, chosen (its files verified, damaged newer ones set aside) and checked before any model is
    # built: a 70B job learns of a mismatched checkpoint in seconds (the settings read from the newest marker before
    # any file is hashed) and of a damaged one after reading it, not after loading two models
    latest = ckpt.pick(check=lambda path, marker: check_resume(stage, (path, marker), settings, longer=not restart))
    stop_if_signalled("after picking its checkpoint, before building its models")  # (a verification takes minutes)
    # a checkpoint of a ZeRO-3 student from before 2026-12-06 (no settings in its marker) has the optimizer groups
    # of that time, which loads only into the same groups: kept for the rest of the stage
    old_groups = latest is not None and ("settings" not in latest[1] or
                                         latest[1]["settings"].get("decay_groups") == "shard")
    settings["decay_groups"] = "shard" if old_groups else "whole"
    if old_groups and zero_stage(ctx.ds_config()) == 3 and D.is_main():
        log.warning("%s: resuming a checkpoint written before 2026-12-06, whose ZeRO-3 student put every parameter "
                    "in the no-weight-decay groups (a defect since fixed); kept so until this stage ends, so that its "
                    "optimizer state loads", stage)
    monitor = None
    try:  # what setup built is released if the set-up fails too (a selection's next probe runs in this process)
        with shard_shape_decay(old_groups):
            runner.setup()
        fresh = optimizer_settings(runner.engine)  # (the run config's, before the checkpoint's are loaded)
        client = ckpt.restore(runner.engines, latest)
        start = int(client["step"]) if client else 0
        if client:
            log.info("resumed %s from step %d", stage, start)
            changed = restore_optimizer_settings(runner.engine, fresh)
            if changed and D.is_main():
                log.warning("%s: resumed with this run config's optimizer settings, not the checkpoint's: %s", stage,
                            "; ".join(changed))
            was = client.get("micro_batch")
            if was is not None and was != s.micro_batch:  # e.g. `auto` resolved again after a requeue onto other GPUs
                log.warning("%s.micro_batch is %d here, %d in the run that wrote this checkpoint: the same global "
                            "batch split into other micro-batches, so the resumed losses are not bit for bit the "
                            "uninterrupted run's; set %s.micro_batch: %d to resume exactly", stage, s.micro_batch, was,
                            stage, was)

        total = ctx.total_steps
        # a resume at an evaluation step scores it again below; one at the last step runs the final evaluation again
        rescore = bool(start) and (start == total or bool(s.eval_every) and start % s.eval_every == 0)
        monitor = Monitor(run_dir, total, start, s.log_every, stage, scores_start=rescore)
        monitor.record_run(cfg.to_dict(), {"softmax_layers": ctx.softmax_layers, "total_steps": total,
                                           "data": with_hub_request(streams.meta, cfg),
                                           "data_cache": str(streams.path),
                                           "train_sequences": len(train), "val_sequences": len(val),
                                           "train_sequences_by_source": train.source_rows,
                                           "params_per_rank": gather_param_report(runner), "ranks": rank_places(),
                                           "memory_plan_gib": {k: v / 2**30 for k, v in vars(plan).items()
                                                               if k not in NOT_TERMS},
                                           "micro_batch": s.micro_batch, "micro_batch_auto": auto_micro})
        val_rows = HeldOut.share(val, D.rank(), D.world_size())  # the same rows scored at any world size
        tokens_per_step = s.global_batch * s.seq_len
        flops_step = runner.flops_per_token() * tokens_per_step
        peak = peak_tflops(cfg.peak_tflops)
        phase_s["setup"] = time.perf_counter() - t_start
        stop_if_signalled(f"at step {start}, before its first step")
        evaluated = True
        if start == 0 and s.eval_at_start:  # the starting point, for "did this stage help" at a glance
            t0 = time.perf_counter()
            monitor.scalars(0, held_out(runner, val_rows), prefix="val")
            phase_s["first_eval"] = time.perf_counter() - t0
        elif rescore and start != total:
            # a resume at an evaluation step: a stop there skipped its score (Monitor dropped any row of it)
            monitor.scalars(start, held_out(runner, val_rows), prefix="val")
        else:
            evaluated = False
        if evaluated:  # a signal during that evaluation: nothing is unsaved, so it stops now with no save
            stop_if_signalled(f"at step {start}, after its held-out evaluation, before its next step")
        t_train = time.perf_counter()
        seen = start * tokens_per_step
        peak_gpu = None
    except BaseException:
        if monitor is not None:
            monitor.close()
        release_engines(runner)
        raise
    try:
        for step in range(start, total):
            # the next step's batches, for a stage that starts on them early (kl's teacher_overlap)
            runner.next_batches = (step + 1, None if step + 1 >= total else functools.partial(
                _step_batches, train, step + 1, s.global_batch, s.micro_batch, cfg.seed))
            t0 = time.perf_counter()
            metrics = runner.train_step(_step_batches(train, step, s.global_batch, s.micro_batch, cfg.seed))
            if torch.cuda.is_available():  # the step's own stream: work a stage started for the next step on
                torch.cuda.current_stream().synchronize()  # another stream (teacher_overlap) may run past this
            dt = time.perf_counter() - t0
            if D.any_rank(not math.isfinite(metrics["loss"])):
                last = ckpt.latest()
                where = (f"The last good checkpoint is {last[1]} (step {last[0]}): a rerun resumes there" if last else
                         "No checkpoint was written yet: a rerun starts at step 0")
                raise NonFiniteLoss(
                    f"non-finite loss at {stage} step {step + 1} (loss={metrics['loss']}); stopped without saving. "
                    f"{where}. Lower {stage}.lr (and {stage}.lr_rest), or {stage}.clip, which a resume takes from the "
                    f"run config, or check the data."
                )
            done = step + 1
            seen += tokens_per_step
            gn = runner.grad_norm if runner.grad_norm is not None else runner.engine.get_global_grad_norm()
            metrics.update(grad_norm=float(gn) if gn is not None else float("nan"), step_time_s=dt,
                           tokens_per_s=tokens_per_step / dt, tokens=float(seen), **memory_stats())
            # a step skipped on the device: counted, the schedule put back, as DeepSpeed's (its logged lr, read
            # before the step, is the one it would have used)
            sync_free.settle(runner.engine, None if gn is None else metrics["grad_norm"])
            # optimizer steps skipped so far (a non-finite gradient norm), by either step: DeepSpeed's count
            metrics["skipped_steps"] = float(getattr(runner.engine, "skipped_steps", 0))
            if peak:
                metrics["mfu"] = flops_step / dt / D.world_size() / (peak * 1e12)
            peak_gpu = max(peak_gpu or 0.0, metrics.get("peak_gpu_gib", 0.0)) if torch.cuda.is_available() else None
            monitor.scalars(done, metrics)
            kl_tokens = getattr(runner, "last_kl_tokens", None)
            if kl_tokens is not None and done % s.log_every == 0:
                monitor.histogram(done, "train/kl_per_token", kl_tokens)
            monitor.step(done, metrics)
            stop = D.any_rank(signals.received is not None)

            def save() -> None:
                t0 = time.perf_counter()
                ckpt.save(runner.engines, done, {"step": done, "stage": stage, "micro_batch": s.micro_batch},
                          settings)
                phase_s["checkpoint"] = phase_s.get("checkpoint", 0.0) + time.perf_counter() - t0

            saved = stop or checkpoint_due(done, total, s)
            if saved:
                save()
                # a signal that came during this save: the checkpoint just written serves it (a second one after
                # another step could outlast Slurm's warning at 70B, where a save takes minutes)
                stop = stop or D.any_rank(signals.received is not None)
            # (not on a stop: Slurm's grace period is for the checkpoint; the resumed run goes on from this step)
            if s.eval_every and done % s.eval_every == 0 and done != total and not stop:
                t0 = time.perf_counter()
                monitor.scalars(done, held_out(runner, val_rows), prefix="val")
                phase_s["eval"] = phase_s.get("eval", 0.0) + time.perf_counter() - t0
                # a signal that came during the evaluation: served at this step (its checkpoint, written above or
                # now), not after one more step and save
                if D.any_rank(signals.received is not None):
                    stop = True
                    if not saved:
                        save()
            if stop:
                code = 128 + int(signals.received or signal.SIGTERM)
                log.warning("stopped %s at step %d on a signal; checkpoint saved; rerun the command to resume", stage, done)
                raise StopRequested(code)
        phase_s["train"] = (time.perf_counter() - t_train - phase_s.get("checkpoint", 0.0)
                            - phase_s.get("eval", 0.0))
        saved_at_total = checkpoint_due(total, total, s)  # (a resume from it runs the final evaluation and export)
        if saved_at_total:
            stop_if_signalled(f"after its last step ({total}, checkpointed), before its final evaluation")
        t0 = time.perf_counter()
        final = held_out(runner, val_rows)
        phase_s["final_eval"] = time.perf_counter() - t0
        monitor.scalars(total, final, prefix="val")
        log.info("%s held-out: %s", stage, " ".join(f"{k}={v:.4g}" for k, v in final.items() if not k.startswith("layer")))
        for engine in all_engines(runner).values():  # ZeRO-3 may hold prefetched parameters; the export gathers its own
            engine.empty_partition_cache()
        if s.export:
            if saved_at_total:
                stop_if_signalled(f"after its last step ({total}, checkpointed), before its export")
            t0 = time.perf_counter()
            runner.export(run_dir / "hf")
            phase_s["export"] = time.perf_counter() - t0
        phase_s["total"] = time.perf_counter() - t_start
        if D.is_main():
            summary = {"stage": stage, "steps": total, "tokens": seen, "val": final,
                       "memory_plan_total_gib": plan.total / 2**30, "measured_peak_gpu_gib": peak_gpu,
                       "softmax_layers": ctx.softmax_layers, "export": str(run_dir / "hf") if s.export else None,
                       "phase_s": {k: round(v, 3) for k, v in phase_s.items()}}
            atomic_write_text(run_dir / DONE, json.dumps(summary, indent=1))
            if s.keep_checkpoints == 0:
                shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
                if (run_dir / "checkpoints").exists():  # (said, not hidden: the disk would fill with no hint why)
                    log.warning("%s: keep_checkpoints is 0 but %s could not be deleted whole; delete it by hand to "
                                "free its space", stage, run_dir / "checkpoints")
        D.barrier()
    finally:
        monitor.close()
        release_engines(runner)
    return run_dir
