"""Stage select's probes: short stage-kl runs from the align export with one layer restored (GA-S2) and their
successive-halving schedule. Each probe is a resumable run with its own DONE marker; a Slurm array task runs the
probes ``i`` with ``i % num_tasks == task_index`` (:func:`task_slot`). The methods are described in
:mod:`ds_hybrid.stages.select`.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import functools
import gc
import hashlib
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from ds_hybrid import distributed as D
from ds_hybrid.folders import FLOCK_FILE_SYSTEMS, atomic_write_text
from ds_hybrid.config import STAGE_DEFAULTS, RunConfig, StageConfig, _build, _coerce, stage_steps
from ds_hybrid.errors import ConfigError
from ds_hybrid.identity import mixer_option_change, teacher_id
from ds_hybrid.layers import k_for_ratio
from ds_hybrid.locks import held
from ds_hybrid.recall_tasks import MIN_ROW_TOKENS
from ds_hybrid.selection import content_fingerprint, halving_first_steps, halving_next, halving_order
from ds_hybrid.stages.common import run_dtype

log = logging.getLogger("ds_hybrid")
BASELINE = "baseline"


# ---- configuration ---------------------------------------------------------------------------------------------
# what a probe takes over from the kl section unless select.probe sets it
FROM_KL = ("ds_config", "teacher_ds_config", "lr", "lr_rest", "betas", "weight_decay", "clip", "loss_chunk_tokens",
           "kl_backend", "fp32_logits", "dw_fp32", "temperature")


def probe_stage_config(cfg: RunConfig, align_dir: Path) -> StageConfig:
    base = StageConfig(**STAGE_DEFAULTS["kl"])
    base = _build(StageConfig, {k: v for k, v in vars(cfg.kl).items() if k in FROM_KL}, "kl", base)
    s = _build(StageConfig, dict(cfg.select.probe), "select.probe", base)
    s.init_from = str(align_dir)
    s.export = False
    s.eval_sequences = cfg.select.eval_sequences
    s.eval_at_start = False  # a probe's score is its held-out KL at the end; the one at step 0 cost 17-25 % of it
    s.keep_checkpoints = 0
    s.ce_weight = 0.0
    # recorded beside the KL, so that select.score=recall reranks without training (rows long enough for a needle)
    s.eval_recall = cfg.select.recall_sequences if s.seq_len >= MIN_ROW_TOKENS else 0
    if cfg.select.recall_sequences and not s.eval_recall and cfg.select.score != "recall":
        log.info("probes record no recall score: their rows (select.probe.seq_len %d) are shorter than the %d tokens "
                 "a needle row needs", s.seq_len, MIN_ROW_TOKENS)
    if cfg.select.score == "recall" and not s.eval_recall:
        raise ConfigError("select.probe.seq_len", s.seq_len, f"score: recall needs probe rows of >= {MIN_ROW_TOKENS} "
                          "tokens (a needle, its question and answer fit beside the row's own text)")
    return s


# what a probe's score depends on, besides the align export, the data and the seed (logging, checkpoint cadence,
# micro-batching and kernels are left out: they change the work's cost, not its result beyond rounding; the losses'
# precision switches are in, in a 16-bit run: with the dtype they set how much rounding there is, and the layers'
# scores can lie closer than that, docs/SELECT.md; in an fp32 run they change nothing and are recorded as None)
PROBE_FIELDS = ("tokens", "seq_len", "global_batch", "lr", "lr_rest", "schedule", "warmup_steps", "min_lr_ratio",
                "clip", "weight_decay", "betas", "eps", "temperature", "ce_weight", "eval_sequences", "eval_recall",
                "fp32_logits", "dw_fp32")
PROBES_KEY = "PROBES.json"
# identity keys added after folders were written without them ("probe.x": a key of the identity's "probe"), with the
# value a folder without the key is taken to have run with: None, the current run's (dtype, recorded since 06:09 UTC
# on 2026-12-06); else the default in force when the key was added (late 2026-12-06), so that a run that changed it
# since is refused (fp32_logits false since 2026-12-04, dw_fp32 true since 03:21 on 2026-12-06: a folder without a
# recorded dtype may predate that, and is taken as run with the current value; an fp32 run records neither)
LATER_KEYS: dict[str, object] = {"dtype": None, "probe.fp32_logits": False, "probe.dw_fp32": True}
PRECISION_FIELDS = ("fp32_logits", "dw_fp32")
# what identifies a run's data (its text and split; not where the cache lives or how many processes tokenize it)
DATA_FIELDS = ("source", "mixture", "text_field", "add_eos", "val_tokens", "split_seed", "max_documents",
               "hub_config", "revision")  # (revision: a hub source's commit, pinned for the run: data.pin_hub_commit)


def rows_bos(cfg: RunConfig) -> int | None:
    """The token each training row of ``cfg`` starts with (``data.bos`` resolved with the teacher's tokenizer)."""
    if cfg.data.bos is False:
        return None
    from ds_hybrid.teacher import resolve_teacher

    return _row_bos(cfg.data.bos, resolve_teacher(cfg.teacher))  # (keyed by the folder the spec names now)


@functools.lru_cache(maxsize=8)
def _row_bos(bos: bool | str, teacher: str) -> int | None:
    """(Once per teacher folder: a selection's record and each probe's identity ask for it; loading a tokenizer
    takes seconds.)"""
    from ds_hybrid.data import row_bos
    from ds_hybrid.teacher import load_tokenizer

    return row_bos(bos, load_tokenizer(teacher))


def probe_identity(cfg: RunConfig, s: StageConfig, align_dir: Path, per_round: bool = False) -> dict:
    """What the probes of a selection folder were run from. ``per_round``: halving, whose rounds are kept by their
    step count, so the longest probe's tokens are not part of it."""
    d = cfg.to_dict()
    probe = {f: getattr(s, f) for f in PROBE_FIELDS if not (per_round and f == "tokens")}
    probe["betas"] = list(probe["betas"])
    dtype = {torch.bfloat16: "bf16"}.get(run_dtype(cfg), "fp32")  # (resolved: auto is bf16 on a GPU)
    if dtype == "fp32":
        probe.update(dict.fromkeys(PRECISION_FIELDS))
    data = {k: d["data"][k] for k in DATA_FIELDS}
    data["row_bos"] = rows_bos(cfg)  # (what data.bos resolves to: a record from before holds none, rows without BOS)
    return {"probe": probe, "seed": cfg.seed, "data": data, "teacher": cfg.teacher, "mixer": cfg.mixer,
            "mixer_options": d.get("mixer_options"), "align": content_fingerprint(align_dir), "dtype": dtype}


def _number(v: object) -> float | None:
    """A probe setting's number, written as a number or as text ("2e6", "2_000_000"); None for other values."""
    if isinstance(v, bool):
        return None
    v = _coerce(v, float)  # (as the config reads it)
    return float(v) if isinstance(v, (int, float)) else None


def _changed(old: dict, new: dict, prefix: str = "") -> list[tuple[str, object, object]]:
    """(setting, old value, new value) for each setting of a probe identity that differs: the teacher as what it
    names (`embedded` however written, a folder by its real path), mixer options as options (defaults filled in,
    ``backend`` left out: how the kernels run, not what trains), numbers by value (a record written before they were
    coerced holds "2e6" for 2000000)."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict) and k in ("probe", "data"):
            out += _changed(a, b, f"{prefix}{k}.")
        elif not prefix and k == "teacher" and k in old and k in new:
            if teacher_id(a) != teacher_id(b):
                out.append((k, a, b))
        elif not prefix and k == "mixer_options" and isinstance(a, dict) and isinstance(b, dict):
            if mixer_option_change(a, b, new.get("mixer") or old.get("mixer") or "gdn"):
                out.append((k, a, b))
        elif prefix == "probe." and _number(a) is not None and _number(a) == _number(b):
            continue
        elif json.dumps(a, sort_keys=True, default=str) != json.dumps(b, sort_keys=True, default=str):
            out.append((f"{prefix}{k}", a, b))
    return out


# a probe identity's keys as the run config names them
_FIELD = {"probe": "select.probe", "align": "align (its export's content fingerprint)",
          "survivors": "select.halving_survivors", "first_round_steps": "select.halving_first_tokens (in steps)",
          "data_tokens": "select.probe.tokens (the corpus prefix every round reads)"}


def inherited_names(cfg: RunConfig) -> dict[str, str]:
    """Probe identity keys whose value came from the kl section (select.probe leaves them unset), as the run config
    names them: a changed kl.lr is what changed, not a select.probe.lr the user never wrote."""
    return {f"probe.{f}": f"kl.{f}" for f in FROM_KL if f not in cfg.select.probe}


@contextlib.contextmanager
def probes_locked(out: Path):
    """Hold ``out/.probes.lock`` (exclusive): the probes folder's records (its claim, split and halving marker) are
    read and written by one task at a time."""
    with open(out / ".probes.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def holds_claim(out: Path, identity: dict) -> bool:
    """Whether the probes folder's claim (``PROBES.json``) is ``identity``'s (on the rank that reads it)."""
    try:
        return json.loads((out / "probes" / PROBES_KEY).read_text()) == json.loads(json.dumps(identity, sort_keys=True))
    except (OSError, ValueError):
        return False


def claim_probes(out: Path, identity: dict, force: bool, names: dict[str, str] | None = None) -> None:
    """Bind the probes folder of ``out`` to the settings they are run from. Probes run from other settings (another
    probe budget or lr, another align export of the same shapes, other data) are never reused: refused by name, or,
    with ``force``, set aside to ``out/previous/<time>/probes`` (kept, nothing deleted) before new ones run."""
    probes, key = out / "probes", out / "probes" / PROBES_KEY
    refusal = None
    if D.is_main():
        out.mkdir(parents=True, exist_ok=True)
        with probes_locked(out):  # Slurm array tasks started together: one at a time here
            refusal = _claim(out, probes, key, identity, force, names or {})
    refusal = D.broadcast_object(refusal)
    if refusal is not None:
        raise ConfigError(*refusal)
    D.barrier()


SPLIT_KEY = "SPLIT.json"
HALVING_DONE = "HALVING_DONE.json"  # a halving that ran to its finalists: its settings ({field: value}, as SPLIT.json)


def bind_split(out: Path, n: int, finished, agree: dict[str, Any] | None = None) -> None:
    """Tasks sharing one probes folder deal its probes by position modulo ``num_tasks``: all of them must use one
    ``num_tasks`` (task 0 of 2 and task 1 of 3 would train one probe at once in one folder and leave others to no
    task). The first task records its split in ``probes/SPLIT.json``; a task of another split is refused while the
    probes are unfinished (``finished()``, on the main rank), the recorded split named. ``agree``: other settings
    every task must share, {field: value} (halving's finalists: each task works out the next round's survivors
    itself), recorded and refused alike."""
    refusal = None
    agree = agree or {}
    if D.is_main():
        key = out / "probes" / SPLIT_KEY
        with probes_locked(out):
            try:
                record = json.loads(key.read_text())
                was = record["num_tasks"]
            except (OSError, ValueError, KeyError, TypeError):
                record, was = {}, None
            differ = [f for f, v in agree.items() if f in record and record[f] != v] if was is not None else []
            if differ and not finished():
                f = differ[0]
                refusal = (f, agree[f], f"the tasks sharing {out / 'probes'} run with {f} = {record[f]!r} "
                           f"({key}): every task of one selection must use the same, or their rounds part; "
                           f"give {f} = {record[f]!r} (or, once those tasks have ended, delete {key})")
            elif was not in (None, n) and not finished():
                refusal = ("select.num_tasks", n, f"the probes in {out / 'probes'} are dealt over {was} tasks "
                           f"({key}): every task of one selection must split them alike; run this one as one of "
                           f"{was} (num_tasks {was}, or a Slurm array of {was}), or, once those tasks have ended, "
                           f"delete {key} to deal the unfinished probes anew")
            else:
                atomic_write_text(key, json.dumps({"num_tasks": n, **agree}))
    refusal = D.broadcast_object(refusal)
    if refusal is not None:
        raise ConfigError(*refusal)


def _probes_digest(out: Path) -> str:
    """The probes folder's claim (``PROBES.json``, the settings its probes run from) as a digest: OSError if none."""
    return hashlib.sha256((out / "probes" / PROBES_KEY).read_bytes()).hexdigest()


def halving_ended(out: Path) -> bool:
    """Whether the halving whose split ``probes/SPLIT.json`` records ran to its finalists (its tasks have ended, and
    a task of another split only reads the rounds' recorded scores): ``HALVING_DONE.json`` holds the same settings
    and the same claim of the folder. A halving of other finalists started since (its split recorded over the ended
    one's), or of other settings (a --force run's new folder), has not. Read under ``.probes.lock``."""
    try:
        done = json.loads((out / "probes" / HALVING_DONE).read_text())
        split = json.loads((out / "probes" / SPLIT_KEY).read_text())
        claim = _probes_digest(out)
    except (OSError, ValueError):
        return False
    if not (isinstance(done, dict) and isinstance(split, dict)) or done.get("probes") != claim:
        return False
    settings = {k: v for k, v in done.items() if k != "probes"}
    return bool(settings) and all(split.get(k) == v for k, v in settings.items())


def mark_halving_ended(out: Path, identity: dict, settings: dict[str, Any]) -> None:
    """On the main rank, under ``.probes.lock``: record that the halving of ``settings`` ran to its finalists, where
    the folder still holds its claim and its split (a task that lagged behind a --force run of other settings, or a
    later halving of other finalists, writes nothing: that run's split keeps binding)."""
    if not D.is_main():
        return
    with probes_locked(out):
        try:
            split = json.loads((out / "probes" / SPLIT_KEY).read_text())
            claim = _probes_digest(out)
        except (OSError, ValueError):
            return
        if holds_claim(out, identity) and isinstance(split, dict) and all(split.get(k) == v
                                                                        for k, v in settings.items()):
            atomic_write_text(out / "probes" / HALVING_DONE, json.dumps({**settings, "probes": claim}))


def still_claimed(out: Path, identity: dict) -> None:
    """Before each probe: stop if the probes folder now holds another run's settings (a --force run of other
    settings set this task's probes aside since it started), instead of mixing probes of two settings."""
    key = out / "probes" / PROBES_KEY
    if not D.main_reads(lambda: holds_claim(out, identity)):
        raise ConfigError("select", str(out / "probes"), f"{key} no longer holds the settings this task started "
                          "from (another run claimed the folder, e.g. with --force, since): this task stops; rerun "
                          "it with the settings now in use")


def _claim(out: Path, probes: Path, key: Path, identity: dict, force: bool, names: dict[str, str]) -> tuple | None:
    """:func:`claim_probes` on the main rank, under the lock: the refusal (field, value, message), or None."""
    refusal = None
    changed = []
    if key.is_file():
        try:
            old = json.loads(key.read_text())
        except ValueError:
            old = {}
        if old.get("dtype") in ("bfloat16", "float32"):  # (spelled as torch's for a few commits of 2026-12-06)
            old["dtype"] = {"bfloat16": "bf16", "float32": "fp32"}[old["dtype"]]
        undated = old and "dtype" not in old  # (written before the dtype was recorded: dw_fp32's default unknown)
        if old.get("dtype") == "fp32" and isinstance(old.get("probe"), dict):
            old["probe"].update({f: None for f in PRECISION_FIELDS if f in old["probe"]})  # (recorded, one commit)
        for k, then in LATER_KEYS.items():
            *outer, name = k.split(".")
            was, now = (old.get(outer[0]), identity.get(outer[0])) if outer else (old, identity)
            if old and isinstance(was, dict) and isinstance(now, dict) and name not in was and name in now:
                # a key written before ds-hybrid recorded this setting: taken as run with the value of then
                known = then is not None and now[name] is not None and not (undated and k == "probe.dw_fp32")
                was[name] = then if known else now[name]
                if was[name] == now[name]:
                    log.warning("select: %s predates recording the probes' %s; they are reused as if run with %r "
                                "(delete the folder or use --force to rerun them)", key, k, now[name])
        changed = [(names.get(k) or _FIELD.get(k.split(".")[0], k.split(".")[0]) + k[len(k.split(".")[0]):], a, b)
                   for k, a, b in _changed(old, identity)]
    elif probes.is_dir() and any(p.name != PROBES_KEY for p in probes.iterdir()):
        log.warning("select: %s holds probes from before ds-hybrid recorded their settings; they are reused as if "
                    "run from the current ones (delete the folder to rerun them)", probes)
    what = "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in changed)
    if changed and not force:
        field, _, now = changed[0]
        pins = [f"select.probe.{k[3:]}: {a!r}" for k, a, _ in changed if k in names.values()]
        keep = (f"; the kl settings the probes take over (select.probe leaves them unset) changed: to keep them, set "
                f"{', '.join(pins)}, the values they ran with" if pins else "")
        refusal = (field, now, f"{probes} holds probes run from other settings ({what}); rerun with --force to set "
                   f"them aside (kept in {out / 'previous'}) and run new ones, or delete {probes}{keep}")
    elif changed:
        aside = stem = out / "previous" / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
        n = 1
        while (aside / "probes").exists():  # (set aside twice within one second by one process: both kept)
            n += 1
            aside = stem.with_name(f"{stem.name}.{n}")
        aside.mkdir(parents=True, exist_ok=True)
        os.replace(probes, aside / "probes")
        # the selections made from them go with them: a --force run killed before it wrote its own left the old
        # selection in place, which a plain rerun kept ("made from other settings") instead of running the probes
        made = [f for f in out.rglob("selection.*") if f.relative_to(out).parts[0] not in ("previous", "probes")]
        for f in made:
            dest = aside / "selections" / f.relative_to(out)
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(f, dest)
        log.warning("select: probes run from other settings (%s) set aside to %s%s", what, aside,
                    f", with the {len(made)} selection file(s) made from them" if made else "")
    if refusal is None:
        probes.mkdir(parents=True, exist_ok=True)
        atomic_write_text(key, json.dumps(identity, indent=1, sort_keys=True))
    return refusal


def probe_run_config(cfg: RunConfig, probe_dir: Path, layers: list[int], s: StageConfig) -> RunConfig:
    pc = copy.deepcopy(cfg)
    pc.out_dir = str(probe_dir)
    pc.softmax_layers = list(layers)
    pc.kl = copy.deepcopy(s)  # each probe its own (micro_batch: auto is resolved per probe, for its layers)
    return pc


def check_probes_for_launch(cfg: RunConfig, world_size: int) -> None:
    """A launcher's check of select's probes before its first stage (ds_hybrid.launch): the checks a probe's kl run
    makes (batch vs ranks, zero-step budgets, DeepSpeed JSONs), its errors naming the field as the user sets it."""
    from ds_hybrid.config import validate_for_launch

    s = probe_stage_config(cfg, Path(cfg.out_dir) / "align" / "hf")
    pc = probe_run_config(cfg, Path(cfg.out_dir) / "select" / cfg.select.method, [], s)
    try:
        validate_for_launch(pc, "kl", world_size, check_init_from=False)
    except ConfigError as e:
        raise ConfigError(probe_field(cfg, e.field), e.value, e.fix) from None


def requested_ks(cfg: RunConfig, num_layers: int) -> list[int]:
    ks = set(cfg.select.ks) | {k_for_ratio(r, num_layers) for r in cfg.select.ratios}
    return sorted(ks)


def check_ks(cfg: RunConfig, num_layers: int) -> list[int]:
    """The K values stage select makes (select.ks, and select.ratios as K), each within the teacher's layers; checked
    when select starts and by the launchers' check before align."""
    sc, L = cfg.select, num_layers
    ks = requested_ks(cfg, L)
    if any(k > L for k in sc.ks):
        raise ConfigError("select.ks", sc.ks, f"the teacher has {L} layers: K values lie in 0..{L}")
    if sc.method == "halving" and sc.halving_keep is not None and sc.halving_keep > L:
        raise ConfigError("select.halving_keep", sc.halving_keep, f"the teacher has {L} layers: keep at most {L}")
    return ks


def task_slot(cfg: RunConfig) -> tuple[int, int]:
    sc = cfg.select
    n = sc.num_tasks if sc.num_tasks is not None else int(os.environ.get("SLURM_ARRAY_TASK_COUNT", 1))
    # (the array's index counts only where the array is the split: num_tasks given alone, e.g. 1 for a job array that
    # is not a probe split, as the warning below says, leaves this task's index at 0, not its array task's)
    idx = sc.task_index if sc.task_index is not None else _slurm_array_index() if sc.num_tasks is None else 0
    if n < 1:
        raise ConfigError("select.num_tasks", n, "tasks sharing the probes: 1 or more (1: this task runs them all)")
    if not 0 <= idx < n:
        raise ConfigError("select.task_index", idx, f"must lie in 0..{n - 1} (num_tasks={n})")
    if sc.num_tasks is None and n > 1:
        log.warning("select: this is task %d of a %d-task Slurm array, so it runs every %d-th probe only (the others "
                    "are the other tasks'); a job array that is not a probe split: set select.num_tasks: 1", idx, n, n)
    return idx, n


def claim_holds(out: Path, identity: dict, align_dir: Path) -> None:
    """Before a selection is made from the probes' scores: the folder still holds this task's settings
    (:func:`still_claimed`: a --force run of other settings may have taken it over while this task waited), and the
    align export is still the one the probes started from (re-exported since, the selection would record the new
    export's fingerprint for the old one's ranking, and kl's origin check would take it)."""
    still_claimed(out, identity)
    if D.main_reads(lambda: "align" in identity and content_fingerprint(align_dir) != identity["align"]):
        raise ConfigError("select", str(align_dir), "the align export changed while the probes ran (its content "
                          "fingerprint is no longer the one they started from): their ranking is the old export's; "
                          "run select again on this one (--force)")


@contextlib.contextmanager
def task_held(out: Path, idx: int, n: int):
    """Hold this task's place in the probes folder while it runs: a second copy of the same task (the same
    ``task_index`` of ``num_tasks``, or a second whole run where there is one task: a job submitted twice, an array
    task started again by hand, a ``--force`` rerun, while the first still runs) would train in the same probe
    folders at once; it is refused, the running one named (locks.held on ``out/.task-<i>-of-<n>.lock``; re-entrant:
    stage select holds it around the whole selection, and ga_s2/halving, which others call directly, again)."""
    path = out / f".task-{idx}-of-{n}.lock"

    def busy(holder: str):
        return ("select.task_index", idx, f"task {idx} of {n} already runs on {out} ({holder}; {path} is locked): a "
                f"second copy, of these settings or others (--force), would train in the same probe folders at once. "
                f"Wait for it to end or stop it, then run this one again to pick up what is unfinished; if that "
                f"process is gone (a node that crashed can leave its lock on a shared file system until the server "
                f"lets it go), delete {path} and run again; for another share of the probes set select.task_index "
                f"(and select.num_tasks alike for every task)")

    def cannot_lock(e: OSError):
        return ("out_dir", str(out.parent.parent), f"cannot lock {path} ({e}): the probe tasks of a selection take "
                f"file locks (flock) in its folder; put out_dir on a file system that has them ({FLOCK_FILE_SYSTEMS}), "
                f"in a folder this job can write")

    with held(path, busy, cannot_lock):
        yield


def _slurm_array_index() -> int:
    """This Slurm array task's position in its array (``--array=1-4`` and ``--array=0-6:2`` count from 0 too)."""
    env = os.environ
    if "SLURM_ARRAY_TASK_ID" not in env:
        return 0
    task, first = int(env["SLURM_ARRAY_TASK_ID"]), int(env.get("SLURM_ARRAY_TASK_MIN", 0))
    step = int(env.get("SLURM_ARRAY_TASK_STEP", 1))
    if step < 1 or (task - first) % step:
        raise ConfigError("SLURM_ARRAY_TASK_ID", task, f"is not in the array {first}-...:{step} Slurm describes "
                          "(SLURM_ARRAY_TASK_MIN / _STEP); submit stage select as one range, e.g. --array=0-7, or set "
                          "select.task_index and select.num_tasks")
    return (task - first) // step


# ---- probes (ga_s2, halving) ----------------------------------------------------------------------------------
def probe_name(layer: int | None) -> str:
    return BASELINE if layer is None else f"layer_{layer:03d}"


def run_probe(cfg: RunConfig, probe_dir: Path, layer: int | None, s: StageConfig, force: bool = False,
              data_tokens: int | None = None) -> dict:
    """One probe: a kl run with only ``layer`` restored (None: all-linear). Returns its DONE summary.
    ``data_tokens``: the budget its corpus prefix is sized for (run_stage; default the probe's tokens)."""
    from ds_hybrid.trainer import run_stage

    pc = probe_run_config(cfg, probe_dir, [] if layer is None else [layer], s)
    try:
        run_stage(pc, "kl", force=force, restart=False, data_tokens=data_tokens)  # force: a survivor continues
    except ConfigError as e:  # a probe runs as stage kl: name the setting the user would change
        raise ConfigError(probe_field(cfg, e.field), e.value, e.fix) from None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return json.loads((probe_dir / "kl" / "DONE").read_text())


# a probe's settings that stage select sets itself, whatever select.probe says
FROM_SELECT = {"eval_sequences": "select.eval_sequences", "eval_recall": "select.recall_sequences"}


def probe_field(cfg: RunConfig, field: str) -> str:
    """The field a probe's kl.<x> error is about, as the user sets it: select.eval_sequences (and the like) for what
    select sets, select.probe.<x> for the probe's own settings (given there, or the probe defaults), kl.<x> only for
    what the probe takes over from the kl section (FROM_KL, unless select.probe sets it)."""
    if not field.startswith("kl."):
        return field
    key = field[3:].split(".")[0].split("[")[0]
    if key in FROM_SELECT:
        return FROM_SELECT[key]
    if key in FROM_KL and key not in dict(cfg.select.probe):
        return field
    return "select.probe." + field[3:]


def probe_score(probe_dir: Path, score: str, window: int) -> float:
    """A finished probe's score; a non-finite one is refused as it is read, naming the probe to run again (a
    selection, or a halving round's ranking, over it would be undefined)."""
    done = json.loads((probe_dir / "kl" / "DONE").read_text())
    if score == "heldout":
        value = float(done["val"]["kl"])
    elif score == "recall":
        if "recall_kl" not in done["val"]:
            raise ConfigError("select.score", score, f"probe {probe_dir.name} recorded no recall score (it ran with "
                              "select.recall_sequences: 0, rows under 128 tokens or an older ds-hybrid): delete its probes folder and rerun, "
                              "or use score: heldout")
        value = float(done["val"]["recall_kl"])
    else:
        recs = [json.loads(l) for l in (probe_dir / "kl" / "metrics.jsonl").read_text().splitlines()]
        train = {r["step"]: r["kl"] for r in recs if r["split"] == "train"}
        last = sorted(train)[-window:]
        value = float(sum(train[s] for s in last) / len(last))
    if not math.isfinite(value):
        raise ConfigError("select", str(probe_dir), f"this probe's {score} score is {value}: delete the folder to run "
                          "it again (with a lower select.probe.lr if its training diverged)")
    return value


def ga_s2(cfg: RunConfig, out: Path, num_layers: int, align_dir: Path,
          force: bool = False) -> tuple[dict[int, float], dict]:
    s = probe_stage_config(cfg, align_dir)
    # the identity reads samples of every tensor of the align export: on the main rank only
    ident = probe_identity(cfg, s, align_dir) if D.is_main() else {}
    idx, n = task_slot(cfg)
    with task_held(out, idx, n):
        return _ga_s2(cfg, out, num_layers, align_dir, force, s, ident, idx, n)


def _ga_s2(cfg: RunConfig, out: Path, num_layers: int, align_dir: Path, force: bool, s: StageConfig, ident: dict,
           idx: int, n: int) -> tuple[dict[int, float], dict]:
    claim_probes(out, ident, force, inherited_names(cfg))
    items: list[int | None] = [None, *range(num_layers)]
    bind_split(out, n, lambda: all((out / "probes" / probe_name(l) / "kl" / "DONE").is_file() for l in items))
    for i, layer in enumerate(items):
        if i % n != idx:
            continue
        d = out / "probes" / probe_name(layer)
        # what is done is the main rank's word, for every rank: on a shared file system another node may see a
        # DONE marker a moment later, and ranks that parted here would wait in different collectives
        if D.main_reads(lambda: (d / "kl" / "DONE").is_file()):
            log.info("probe %s already done", probe_name(layer))
            continue
        still_claimed(out, ident)
        log.info("probe %s (%d/%d)", probe_name(layer), i + 1, len(items))
        run_probe(cfg, d, layer, s)

    def read_scores():
        missing = [probe_name(l) for l in items if not (out / "probes" / probe_name(l) / "kl" / "DONE").is_file()]
        if missing:
            return missing, {}, None
        return [], {l: probe_score(out / "probes" / probe_name(l), cfg.select.score, cfg.select.window)
                    for l in range(num_layers)}, probe_score(out / "probes" / BASELINE, cfg.select.score,
                                                             cfg.select.window)

    missing, scores, baseline = D.main_reads(read_scores)
    if missing:
        return {}, {"missing": missing}
    claim_holds(out, ident, align_dir)
    tokens = len(items) * stage_steps(s) * s.global_batch * s.seq_len
    return scores, {"baseline": baseline, "tokens_spent": tokens, "probes": len(items),
                    "budget": {"probe_tokens": stage_steps(s) * s.global_batch * s.seq_len, "seq_len": s.seq_len,
                               "global_batch": s.global_batch, "lr": s.lr, "lr_rest": s.lr_rest,
                               "score": cfg.select.score}}


def _halving_round(cfg: RunConfig, d: Path, layer: int, s: StageConfig, steps: int, data_tokens: int) -> float:
    """One probe's round of successive halving: train it up to ``steps`` and return its held-out KL there, on rows
    drawn from the corpus prefix of ``data_tokens`` (the longest round's: every round sees the same rows in the same
    order, so a survivor continued over rounds trains exactly as one longer probe would).

    The score of every round is kept (``round_<steps>.json``): a resumed selection reads the scores of the rounds
    that already ran instead of the probe's latest KL, which a survivor has since improved in later rounds.
    """
    record = d / f"round_{steps:07d}.json"
    done = d / "kl" / "DONE"

    def look() -> tuple[float | None, int, bool]:
        kl = float(json.loads(record.read_text())["kl"]) if record.is_file() else None
        return kl, json.loads(done.read_text())["steps"] if done.is_file() else 0, done.is_file()

    # the main rank's look, for every rank (another node may see the files a moment later: ranks must not part)
    recorded, done_steps, was_done = D.main_reads(look)
    if recorded is not None:
        return recorded
    if done_steps > steps:
        raise ConfigError("select.halving_first_tokens", cfg.select.halving_first_tokens,
                          f"{d} trained past this run's {steps}-step round ({done_steps} steps) and holds no score of "
                          f"it ({record.name}): its rounds were other lengths (another halving_first_tokens, or an "
                          "older ds-hybrid). Set it back, or rerun with --force to set the old probes aside")
    if done_steps < steps:
        run_probe(cfg, d, layer, s, force=was_done, data_tokens=data_tokens)
    kl = D.main_reads(lambda: probe_score(d, "heldout", cfg.select.window))
    if D.is_main():
        atomic_write_text(record, json.dumps({"steps": steps, "kl": kl}))
    D.barrier()
    return kl


def _failed_marker(out: Path, idx: int, n: int) -> Path:
    return out / "probes" / f"TASK_{idx}_of_{n}.failed"


def _failed_peer(out: Path, idx: int, n: int, since: float) -> str | None:
    """Another task's failure marker written since this task started (an earlier attempt's is not this one's)."""
    for i in range(n):
        f = _failed_marker(out, i, n)
        try:
            if i != idx and f.stat().st_mtime >= since:
                return f"task {i} of {n} failed ({f}: {f.read_text().strip()[:300]})"
        except OSError:
            pass
    return None


def _round_scores_of_others(cfg: RunConfig, out: Path, layers: list[int], steps: int, since: float = 0.0,
                            task: tuple[int, int] | None = None) -> dict[int, float]:
    """Wait for the other tasks' records of this round (halving across tasks runs them all at once). The main rank
    looks, every 2 s, and every rank follows its look (a collective per look: ranks on other nodes, which may see
    the files a moment later, never part, and no rank sits in one collective for the whole wait). A task that
    failed since ``since`` (its marker, :func:`halving`) stops the wait at once."""
    records = {l: out / "probes" / probe_name(l) / f"round_{steps:07d}.json" for l in layers}
    wait = 60 * cfg.dist_timeout_minutes
    state = {"deadline": time.monotonic() + wait, "seen": None, "said": False}
    idx, n = task or task_slot(cfg)  # (halving passes its slot: an array's split is said once, not every round)

    def look() -> tuple[str, object]:
        missing = [l for l, f in records.items() if not f.is_file()]
        if not missing:
            return "done", {l: float(json.loads(f.read_text())["kl"]) for l, f in records.items()}
        if failed := _failed_peer(out, idx, n, since):
            return "error", (f"halving split over several tasks: {failed}, so probes {missing} of the {steps}-step "
                             "round will not come; rerun every task of the split together (finished probes and rounds are "
                             "kept), or run halving as one task")
        if not state["said"]:
            log.info("halving round of %d steps: waiting for the other tasks' probes %s", steps, missing)
            state["said"] = True
        now = _latest_write(out, missing)
        if state["seen"] is None or now > state["seen"]:  # a probe still at work (its metrics, checkpoints): a long
            state["seen"], state["deadline"] = now, time.monotonic() + wait  # round is not a dead task
        if time.monotonic() > state["deadline"]:
            return "error", (f"halving split over several tasks: probes {missing} of the {steps}-step round wrote "
                             f"nothing for dist_timeout_minutes={cfg.dist_timeout_minutes}. Every task must run at "
                             "the same time (rounds depend on each other); rerun the missing tasks, or run halving "
                             "as one task")
        return "wait", None

    while True:
        what, value = D.main_reads(look)
        if what == "done":
            return value
        if what == "error":
            raise RuntimeError(value)
        time.sleep(2.0)


def _latest_write(out: Path, layers: list[int]) -> float:
    """The newest modification time of anything in these probes' folders (0 when none exist yet)."""
    newest = 0.0
    for l in layers:
        d = out / "probes" / probe_name(l)
        if d.is_dir():
            for p in d.rglob("*"):
                try:
                    newest = max(newest, p.stat().st_mtime)
                except OSError:  # removed meanwhile (a checkpoint pruned)
                    pass
    return newest


def halving(cfg: RunConfig, out: Path, num_layers: int, align_dir: Path,
            force: bool = False) -> tuple[dict[int, float], dict]:
    """Successive halving over single-layer probes (docs/SELECT.md), this task's share of each round when it is
    split over tasks; a task that fails leaves a marker the others stop on instead of waiting for its probes."""
    idx, n = task_slot(cfg)
    since = time.time() - 1.0  # (a peer's marker older than this task is an earlier attempt's)
    marker = _failed_marker(out, idx, n)
    with task_held(out, idx, n):  # (outside the failure marker: a second copy refused is not this task failing)
        if n > 1 and D.is_main():
            marker.unlink(missing_ok=True)  # this task runs again: its earlier failure is no longer one
        return _halving_task(cfg, out, num_layers, align_dir, force, since, idx, n, marker)


def _halving_task(cfg: RunConfig, out: Path, num_layers: int, align_dir: Path, force: bool, since: float, idx: int,
                  n: int, marker: Path) -> tuple[dict[int, float], dict]:
    from ds_hybrid.trainer import StopRequested

    try:
        return _halving(cfg, out, num_layers, align_dir, force, since, (idx, n))
    except StopRequested:  # a time limit's checkpoint-and-requeue: the task comes back, its peers wait for it
        raise
    except BaseException as e:
        if n > 1:  # (every rank: a rank other than the main one may be the one that fails)
            marker.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(marker, f"{type(e).__name__} (rank {D.rank()}): {e}")
        raise


def _halving(cfg: RunConfig, out: Path, num_layers: int, align_dir: Path, force: bool, since: float,
             task: tuple[int, int]) -> tuple[dict[int, float], dict]:
    s = probe_stage_config(cfg, align_dir)
    cont = cfg.select.halving_survivors == "continue"
    step_tokens = s.global_batch * s.seq_len
    first_steps = halving_first_steps(cfg.select.halving_first_tokens, stage_steps(s), step_tokens)
    # rounds are kept by their step counts: the first round's length decides which those are
    ident = {**probe_identity(cfg, s, align_dir, per_round=True), "survivors": cfg.select.halving_survivors,
             "first_round_steps": first_steps, "data_tokens": stage_steps(s) * step_tokens} if D.is_main() else {}
    claim_probes(out, ident, force, inherited_names(cfg))
    keep = cfg.select.halving_keep or max([1, *requested_ks(cfg, num_layers)])  # (ks [0] or none: one finalist)
    # (its rounds are dealt anew each round: any split change waits until the halving of the recorded split has
    # ended; each task works out the survivors from keep)
    bind_split(out, task[1], lambda: halving_ended(out), {"select.halving_keep": keep})
    if cont:
        if s.schedule != "constant" or s.warmup_steps:
            raise ConfigError("select.probe.schedule", s.schedule,
                              "halving_survivors=continue resumes probes from checkpoints: use a constant lr without "
                              "warmup (or halving_survivors=retrain)")
        s.keep_checkpoints = 1
        s.ckpt_every = s.ckpt_every or 1_000_000_000  # each round ends in the checkpoint the next continues from
    else:  # retrain: a survivor's next round is a fresh, longer probe; no checkpoints at all
        s.keep_checkpoints = 0
        s.ckpt_every = 0
    idx, n = task
    alive = list(range(num_layers))
    scores: dict[int, float] = {}
    rounds = []
    spent = 0
    steps = first_steps
    prev_steps = 0
    r = 0
    while True:
        s_r = copy.deepcopy(s)
        s_r.tokens = steps * step_tokens
        round_scores = {}
        mine = [l for i, l in enumerate(alive) if i % n == idx]  # across tasks: this task's share of the round
        for layer in mine:
            d = out / "probes" / probe_name(layer)
            still_claimed(out, ident)
            round_scores[layer] = _halving_round(cfg, d, layer, s_r, steps, stage_steps(s) * step_tokens)
        round_scores.update(_round_scores_of_others(cfg, out, [l for l in alive if l not in mine], steps, since,
                                                     (idx, n)))
        round_scores = {l: round_scores[l] for l in alive}
        spent += len(alive) * (steps - prev_steps if cont else steps) * step_tokens
        scores.update(round_scores)
        rounds.append({"round": r, "steps": steps, "alive": alive, "scores": {str(k): v for k, v in round_scores.items()}})
        nxt = halving_next(alive, round_scores, steps, stage_steps(s), keep)
        if nxt is None:
            break
        survivors = nxt[0]
        for layer in alive:  # stopped probes no longer need their checkpoints
            if layer not in survivors and D.is_main():
                shutil.rmtree(out / "probes" / probe_name(layer) / "kl" / "checkpoints", ignore_errors=True)
        alive = survivors
        prev_steps, steps, r = steps, nxt[1], r + 1
    claim_holds(out, ident, align_dir)
    # every round's scores are recorded: a later run of any split reads them and trains nothing
    mark_halving_ended(out, ident, {"select.halving_keep": keep})
    final_round = {int(l) for l in rounds[-1]["alive"]}
    ordered = halving_order(rounds, num_layers)
    return ordered, {"tokens_spent": spent, "rounds": rounds, "raw_scores": {str(k): v for k, v in scores.items()},
                     "finalists": sorted(final_round),
                     "budget": {"first_round_tokens": first_steps * step_tokens, "max_probe_tokens": stage_steps(s) * step_tokens,
                                "keep": keep, "survivors": cfg.select.halving_survivors}}


# ---- forward-only scorers (proxy, ppl, ar) ---------------------------------------------------------------------
