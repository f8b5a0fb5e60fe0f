"""The run config: one YAML file, a typed schema, validation before any model is built, `key=value` overrides.

    run_name: smollm2_gdn
    out_dir: outputs/smollm2_gdn
    teacher: embedded                 # or a local HF folder
    mixer: gdn
    softmax_layers: {uniform: 0.25}   # or [3, 7, 11], {uniform: 8} (K), {selection: <path>, ratio: 0.25}
    data: {source: embedded}          # or files/folders of text/json/jsonl/parquet, or a hub dataset name
    align: {tokens: 100_000_000, seq_len: 512, global_batch: 96}       # micro_batch: auto (from the memory plan)
    kl:    {tokens: 600_000_000, seq_len: 4096, global_batch: 32, micro_batch: 1}

    >>> cfg = load_config("runs/smollm2_quickstart.yaml", overrides=["kl.tokens=2e6", "seed=1"])

Each stage section is a :class:`StageConfig`; unset fields take the stage's defaults (:data:`STAGE_DEFAULTS`, the
paper's recipe). Every problem is a :class:`~ds_hybrid.errors.ConfigError` naming the field and the fix.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

from ds_hybrid.errors import ConfigError

log = logging.getLogger(__name__)

STAGES: tuple[str, ...] = ("align", "select", "kl", "finetune")
TRAIN_STAGES: tuple[str, ...] = ("align", "kl", "finetune")
REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass
class DataConfig:
    source: str | list[str] = "embedded"  # "embedded" = the offline mixture (docs/DATA.md), "embedded:<name>,..." some
    # of its sources (e.g. embedded:python_docs, the corpus before 2026-11-29); else files/folders or a hub name
    mixture: dict | None = None  # {source: weight}: a source's share of training rows, 1 = its natural share
    text_field: str = "text"  # column holding the text in json/jsonl/parquet sources
    add_eos: bool = False  # the paper concatenates documents without separators
    bos: bool | str = "auto"  # each row starts with the tokenizer's BOS token: true, false, or auto (where the
    # tokenizer puts one before every text it encodes, as Gemma's and Llama 3's do, so that every prompt at use starts
    # with it; SmolLM2's and Qwen's put none). A row is then BOS + seq_len - 1 tokens of the stream
    val_tokens: int = 65536  # held out, by whole documents (never trained on). Every stage scores its first rows:
    # stage select's probes, proxy and ppl rank layers by them too, so a KL-guided selection has seen the text that kl's
    # (and `ds-hybrid eval`'s) held-out KL is measured on: docs/SELECT.md
    split_seed: int = 1234  # fixes the held-out split independently of the run seed
    max_documents: int | None = None  # cap for quick runs
    cache_dir: str | None = None  # tokenized+packed cache (default: $DS_HYBRID_CACHE/data)
    num_proc: int = 4  # tokenizer processes (one unit each: a file, 256 text files, a hub shard, a corpus source)
    # a hub dataset source only: its configuration (`datasets`' name, e.g. "sample-10BT" of FineWeb) and its branch,
    # tag or commit; null = the default branch. Resolved to a commit once per run (out_dir/hub_commit.json, read by
    # every later stage, probe and resume: data.pin_hub_commit); the token cache's key holds the commit, so a dataset
    # updated on the hub is tokenized again in a new run, never mixed with tokens of the old one
    hub_config: str | None = None
    revision: str | None = None


@dataclass
class StageConfig:
    tokens: int = 0  # training budget in tokens (steps = tokens / (global_batch * seq_len), rounded down)
    seq_len: int = 512
    global_batch: int = 8  # sequences per optimizer step, summed over ranks and accumulation
    # sequences per rank per forward; "auto": the largest divisor of global_batch / world_size whose memory plan
    # (ds_hybrid.plan) fits AUTO_MEMORY_FRACTION of the device, resolved at launch and recorded in run_info
    micro_batch: int | Literal["auto"] = "auto"
    lr: float = 1e-3  # attention / mixer parameters
    lr_rest: float = 0.0  # everything else (MLPs, norms, embeddings, lm_head); 0 = frozen
    schedule: Literal["cosine", "constant", "linear"] = "cosine"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0  # floor of cosine / linear decay, as a fraction of lr
    clip: float = 1.0
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    temperature: float = 1.0  # kl
    ce_weight: float = 0.0  # kl: loss = kl + ce_weight * next-token CE
    loss_chunk_tokens: int = 1024  # tokens per chunk of the vocab-wide losses (never [tokens x vocab] at once)
    kl_backend: Literal["auto", "torch", "triton"] = "auto"  # auto: Triton kernel on CUDA, torch reference on CPU
    # the LM heads' logits in the vocab-wide losses: in the run's 16-bit dtype, rounded once, as a plain bf16 lm_head
    # writes them (false, the default: half the logits' bytes to write and read; the loss and gradients still computed
    # in fp32 from them), or fp32 GEMM outputs (true: the path before 2026-12-04; docs/BENCHMARKS.md measured both)
    fp32_logits: bool = False
    # the Triton kernel's lm_head gradient dW, summed over a micro-batch's chunks: in fp32, rounded once (true, the
    # default since 2026-12-06: 4 x vocab x hidden bytes more while the loss runs, 2 GiB at Llama-3-8B), or in
    # the weights' 16-bit dtype, each chunk's addition rounded (false: the path before; ~2.5x the error). The torch
    # reference always sums in fp32
    dw_fp32: bool = True
    ds_config: str = "ds_configs/student_zero2.json"
    teacher_ds_config: str = "ds_configs/teacher_zero3.json"
    init_from: str | None = None  # HF folder the student starts from (default: the previous stage's export);
    # "teacher": stage-0 transfer straight from the teacher, no align (ablations, benchmarks)
    gradient_checkpointing: bool = False
    # torch.compile each transformer block (student and teacher; the linear-attention kernels stay fla's Triton,
    # outside the graphs): fuses the norms, gates, activations and residual adds. Blocks of one kind share their
    # compiled code; the first steps pay the compile (~1 min, cached on disk for later runs). "auto": on CUDA,
    # off on CPU. ZeRO-3 engines are never compiled (partitioned parameters).
    compile: bool | Literal["auto"] = "auto"
    # kl: run the next step's teacher forward on a second CUDA stream as soon as this step's backward has run, so
    # that the GPU computes it while the host runs the optimizer step (DeepSpeed's waits on the GPU and then leaves it
    # idle, ~40 ms of a 580 ms SmolLM2 step: docs/BENCHMARKS.md; the sync-free step of DS_HYBRID_OPTIMIZER_STEP=auto
    # under ZeRO-1 does not wait, and the overlap still fills the host's time in it: +1-2 % on an H200, 2026-12-05).
    # Same losses; refused with a ZeRO-3 teacher. On CPU the same work runs in order (what the tests check)
    teacher_overlap: bool = False
    log_every: int = 10
    ckpt_every: int = 200  # optimizer steps between checkpoints (and one at the end); 0: none (benchmarks: a
    # killed stage then restarts from its first step)
    keep_checkpoints: int = 2  # 0: delete them once the stage is DONE (with export false: no save at the last step)
    ckpt_verify: bool = True  # resume checks the checkpoint's files against its manifest (sizes and SHA-256)
    export: bool = True  # write <stage>/hf at the end (selection probes skip it)
    eval_every: int = 0  # 0: evaluate on the held-out slice only at the end
    eval_at_start: bool = True  # also before the first step ("did this stage help"); selection probes skip it
    eval_sequences: int = 16
    # kl, finetune: > 0 also scores this many held-out rows as retrieval tests (a key-value fact planted in the row's
    # own text, asked for at its end: ds_hybrid.recall_tasks.needle_row): val recall_nll (mean -log p of the
    # answer's tokens) and, against the teacher, recall_kl. A recall signal during training, and GA-S2's
    # select.score: recall
    eval_recall: int = 0


#: selection methods that are spacing rules, not scores (their selection.json "scores" encode an order only)
SPACING_METHODS: tuple[str, ...] = ("uniform", "smart", "keep_global")
SELECT_METHODS: tuple[str, ...] = ("ga_s2", "halving", "proxy", "uniform", "smart", "keep_global", "ppl", "mse", "ar",
                                   "ar_multihop", "retrieval")


# a probe's settings where select.probe leaves them unset (select.probe is laid over these, then over the kl
# defaults): short constant-rate runs that write no checkpoint
DEFAULT_PROBE: dict[str, Any] = {"tokens": 2_000_000, "seq_len": 1024, "global_batch": 8, "micro_batch": "auto",
                                 "schedule": "constant", "ckpt_every": 1_000_000}


@dataclass
class SelectConfig:
    """Stage select. Probes are short stage-kl runs from the align export (``probe``: their settings over
    DEFAULT_PROBE, over the kl defaults; a few of the run's kl section carry over: stages.probes.probe_stage_config)."""

    method: str = "ga_s2"  # one of SELECT_METHODS
    ks: list[int] = field(default_factory=list)  # K values whose top-K sets are written to selection.json
    ratios: list[float] = field(default_factory=lambda: [0.125, 0.25])  # and ratios (round-half-up of ratio x L)
    # probe score: held-out KL at the end, mean train KL over the last `window` steps, or recall: the probe's KL to
    # the teacher on the answers of `recall_sequences` needle rows (recall_kl of eval_recall); ga_s2 only
    score: Literal["heldout", "train_window", "recall"] = "heldout"
    window: int = 10  # train_window: the last this-many probe steps
    probe: dict = field(default_factory=lambda: dict(DEFAULT_PROBE))
    halving_first_tokens: int | None = None  # halving: tokens of the first round (default probe.tokens / 4)
    halving_keep: int | None = None  # halving: stop when this many remain (default: the largest K asked for)
    # halving: a survivor's next round retrains it from the align export, or continues it from its checkpoint
    halving_survivors: Literal["retrain", "continue"] = "retrain"
    eval_sequences: int = 16  # held-out sequences for probe scores, proxy and ppl
    recall_sequences: int = 16  # ga_s2 / halving probes also record recall_nll on this many needle rows (0: none)
    ar_prompts: int = 32  # ar / ar_multihop: prompts per layer
    ar_pairs: int = 50
    ar_seed: int = 0
    # retrieval: this many held-out rows of retrieval_seq_len tokens turned into needle prompts (the teacher's copy
    # rate per head is measured on them)
    retrieval_prompts: int = 32
    retrieval_seq_len: int = 1024
    reference: str | None = None  # a full-budget selection.json to measure agreement against (top-K, Kendall tau)
    # > 0: rank greedily by importance (score scaled to [0, 1]) minus distance_reg x 1/distance to the nearest layer
    # already taken (ds_hybrid.selection.regularized_order); 0 = the method's plain ranking
    distance_reg: float = 0.0
    task_index: int | None = None  # Slurm array: run probes with index % num_tasks == task_index
    num_tasks: int | None = None  # (default: SLURM_ARRAY_TASK_ID / SLURM_ARRAY_TASK_COUNT)


#: select settings read by some methods (or scores) only: {field: (the methods or scores that read it)}
SELECT_METHOD_SETTINGS: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(("halving_first_tokens", "halving_keep", "halving_survivors"), ("halving",)),
    **dict.fromkeys(("ar_prompts", "ar_pairs"), ("ar", "ar_multihop")),
    "ar_seed": ("ar", "ar_multihop", "retrieval"),
    **dict.fromkeys(("retrieval_prompts", "retrieval_seq_len"), ("retrieval",)),
    "window": ("score train_window",),
}


def unused_select_settings(cfg: RunConfig) -> list[str]:
    """The select settings set away from their defaults that this run's method (or score) never reads: said, not
    refused, since one config commonly serves several methods (`select.method=...` per run)."""
    sc, default = cfg.select, SelectConfig()
    out = []
    for f, readers in SELECT_METHOD_SETTINGS.items():
        if getattr(sc, f) != getattr(default, f) and sc.method not in readers and f"score {sc.score}" not in readers:
            out.append(f"select.{f} (read by {', '.join(readers)})")
    return out


# The paper's recipe (RADLADS stage 1 / stage 2 budgets from the reference configs), scaled by the user's tokens.
STAGE_DEFAULTS: dict[str, dict[str, Any]] = {
    "align": dict(tokens=100_000_000, seq_len=512, global_batch=96, micro_batch="auto", lr=1e-3, lr_rest=0.0,
                  schedule="cosine", clip=1.0),
    "kl": dict(tokens=600_000_000, seq_len=4096, global_batch=32, micro_batch="auto", lr=1e-4, lr_rest=7e-6,
               schedule="constant", clip=1.0, weight_decay=0.01),
    "finetune": dict(tokens=50_000_000, seq_len=4096, global_batch=32, micro_batch="auto", lr=1e-5, lr_rest=1e-5,
                     schedule="cosine", warmup_steps=10, clip=1.0),
}


@dataclass
class RunConfig:
    run_name: str = "run"
    out_dir: str = "outputs/run"
    seed: int = 0
    teacher: str | None = "embedded"  # local HF folder or hub id; "embedded" = SmolLM2-135M-Instruct
    mixer: str = "gdn"
    mixer_options: dict = field(default_factory=dict)
    softmax_layers: Any = field(default_factory=lambda: {"uniform": 0.25})
    dtype: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    attn_implementation: str | None = None  # softmax layers: None = transformers' default (sdpa)
    dist_timeout_minutes: int = 30  # a rank stuck this long in a collective ends the job
    peak_tflops: float | None = None  # for MFU; default by GPU name (H100/H200 bf16 dense: 989)
    data: DataConfig = field(default_factory=DataConfig)
    align: StageConfig = field(default_factory=lambda: StageConfig(**STAGE_DEFAULTS["align"]))
    kl: StageConfig = field(default_factory=lambda: StageConfig(**STAGE_DEFAULTS["kl"]))
    finetune: StageConfig = field(default_factory=lambda: StageConfig(**STAGE_DEFAULTS["finetune"]))
    select: SelectConfig = field(default_factory=SelectConfig)

    def stage(self, name: str) -> StageConfig:
        if name not in TRAIN_STAGES:
            raise ConfigError("--stage", name, f"choose one of the training stages {TRAIN_STAGES}")
        return getattr(self, name)

    def stage_dir(self, name: str) -> Path:
        return Path(self.out_dir) / name

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self), default=list))


# ---- generic typed construction --------------------------------------------------------------------------------
def _type_ok(value: Any, tp: Any) -> bool:
    if tp is Any:
        return True
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in get_args(tp))
    if origin is Literal:
        return value in get_args(tp)
    if tp is type(None):
        return value is None
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin in (list, tuple):
        return isinstance(value, (list, tuple)) and all(_type_ok(v, (get_args(tp) or (Any,))[0]) for v in value)
    if origin is dict or tp is dict:
        return isinstance(value, dict)
    if isinstance(tp, type):
        return isinstance(value, tp)
    return True


def _describe(tp: Any) -> str:
    """A type as a user reads it: int, "int or 'auto'", "one of 'cosine', 'constant', 'linear'"."""
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in get_args(tp))
    if origin is Literal:
        args = get_args(tp)
        return repr(args[0]) if len(args) == 1 else "one of " + ", ".join(repr(a) for a in args)
    if tp is type(None):
        return "null"
    if origin in (list, tuple) and get_args(tp):
        return f"{origin.__name__} of {_describe(get_args(tp)[0])}"
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def _coerce(value: Any, tp: Any) -> Any:
    """YAML gives 1e6 as a float and 2_000 as an int: accept integral floats for ints (also where the type is
    ``int | None`` or ``int | 'auto'``, and for each element of a list of ints), lists for tuples."""
    takes_int = tp is int or (int in get_args(tp) and float not in get_args(tp))
    if takes_int and isinstance(value, float) and value.is_integer():
        return int(value)
    if get_origin(tp) in (list, tuple) and isinstance(value, (list, tuple)) and get_args(tp):
        value = type(value)(_coerce(v, get_args(tp)[0]) for v in value)
    if isinstance(value, str) and (tp is int or tp is float or int in get_args(tp) or float in get_args(tp)):
        try:
            num = float(value.replace("_", ""))
            return int(num) if (tp is int or int in get_args(tp)) and num.is_integer() else num
        except ValueError:
            return value
    if get_origin(tp) is tuple and isinstance(value, list):
        return tuple(value)
    return value


def _build(cls: type, data: dict[str, Any], prefix: str, base: Any = None) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(prefix or "config", data, "expected a mapping of settings")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        where = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        raise ConfigError(where, data[unknown[0]], f"unknown setting; known here: {', '.join(names)}")
    obj = base if base is not None else cls()
    for k, v in data.items():
        where = f"{prefix}.{k}" if prefix else k
        tp = hints[k]
        if dataclasses.is_dataclass(tp) or (isinstance(tp, type) and dataclasses.is_dataclass(tp)):
            setattr(obj, k, _build(tp, v, where, getattr(obj, k)))
            continue
        v = _coerce(v, tp)
        if not _type_ok(v, tp):
            raise ConfigError(where, v, f"expected {_describe(tp)}")
        setattr(obj, k, v)
    return obj


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load's loader, refusing a key given twice in one mapping: YAML keeps the last silently, so a second
    ``kl:`` section would replace the first whole (merge keys, ``<<``, may still be overridden)."""

    def flatten_mapping(self, node):  # (before merge keys add theirs: the node's own keys, once per node, since
        # flattening rewrites the node, and a mapping merged into another is flattened first as a part of it)
        checked = self.__dict__.setdefault("_checked", set())
        if id(node) not in checked:
            checked.add(id(node))
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.get(key)
                except TypeError:  # (an unhashable key: safe_load's own error follows)
                    continue
                if first is not None:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"{key!r} is given twice (first at line {first}): YAML would keep the last one "
                        "silently; keep one", key_node.start_mark)
                seen[key] = key_node.start_mark.line + 1
        super().flatten_mapping(node)


def _yaml_problem(e: yaml.YAMLError) -> str:
    """A YAML parse error in one line: what and where (line and column, 1-based)."""
    mark = getattr(e, "problem_mark", None)
    if mark is None:  # (e.g. a ReaderError: a character YAML does not take; its text says where)
        return str(e).replace("\n", " ")
    return f"{getattr(e, 'problem', None) or e} at line {mark.line + 1}, column {mark.column + 1}"


def _parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError("override", item, "write overrides as key=value, e.g. kl.tokens=2000000")
    key, raw = item.split("=", 1)
    if not raw.strip():  # (YAML reads nothing as null, which means "the default": teacher=$UNSET would distil from
        # the embedded 135M model)
        raise ConfigError(key.strip(), raw, "an empty value (an unset shell variable?): give a value, or null to "
                          "mean none")
    try:
        return key.strip(), yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise ConfigError(key.strip(), raw, f"not a YAML value ({_yaml_problem(e)}); close its brackets or "
                          "braces, e.g. 'key=[1, 2]', or quote text for YAML inside the shell's quotes, e.g. "
                          "\"key='[1'\"") from None


NOT_MERGED = ("softmax_layers", "mixer_options")  # a whole value given for these replaces the YAML's


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """``data`` (a run YAML's mapping) with ``key=value`` overrides applied in order. A dotted key sets one entry
    inside its section (``mixer_options.use_short_conv=true`` keeps the YAML's other mixer options); a mapping given
    for a section merges into it, except for softmax_layers and mixer_options, which it replaces. softmax_layers
    takes one form at a time: ``softmax_layers.uniform=0.125`` replaces a list or a selection; ``.k`` / ``.ratio``
    keep the selection file they choose from, ``.selection`` the k or ratio."""
    out = copy.deepcopy(data)
    for item in overrides:
        dotted, value = _parse_override(item)
        keys = dotted.split(".")
        if len(keys) == 2 and keys[0] == "softmax_layers":
            # one form replaces another ({uniform: 0.125} for a list or {selection, ratio}); k and ratio choose
            # from the same selection file, which stays
            was = out.get("softmax_layers")
            was = was if isinstance(was, dict) and "uniform" not in was else {}  # (a selection's keys, or some)
            keep = {k: v for k, v in was.items() if k in ("selection", "check_origin")} if keys[1] in ("k", "ratio") \
                else {k: v for k, v in was.items() if k in ("k", "ratio", "check_origin")} if keys[1] == "selection" \
                else was if keys[1] == "check_origin" else {}
            out["softmax_layers"] = {**keep, keys[1]: value}
            continue
        d = out
        for k in keys[:-1]:
            d = d.setdefault(k, {})
            if not isinstance(d, dict):
                raise ConfigError(dotted, value, f"{k} is not a section")
        leaf = keys[-1]
        merge = isinstance(value, dict) and isinstance(d.get(leaf), dict) and leaf not in NOT_MERGED
        d[leaf] = _merge(d[leaf], value) if merge else value
    return out


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    return apply_overrides({}, overrides)


def _merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) and k not in NOT_MERGED \
            else v
    return out


def config_from_dict(data: dict[str, Any]) -> RunConfig:
    if "teacher" in data and data["teacher"] in (None, ""):  # (None/"" would mean the embedded 135M model)
        raise ConfigError("teacher", data["teacher"], "empty: give a local HF folder, a hub id, or `embedded` for the "
                          "embedded SmolLM2-135M")
    cfg = _build(RunConfig, data, "")
    if "out_dir" not in data:  # two configs that differ in run_name alone write to two folders
        if not cfg.run_name or Path(cfg.run_name).name != cfg.run_name or cfg.run_name in (".", ".."):
            raise ConfigError("run_name", cfg.run_name, "names the default out_dir (outputs/<run_name>): give a plain "
                              "name without '/', or set out_dir")
        cfg.out_dir = f"outputs/{cfg.run_name}"
    if isinstance(cfg.select.probe, dict):  # (a probe setting given keeps the others' probe defaults)
        hints = typing.get_type_hints(StageConfig)  # values as the stage's types take them (2e6 -> 2000000), so
        cfg.select.probe = {k: _coerce(v, hints[k]) if k in hints else v  # that a selection's record compares
                            for k, v in {**DEFAULT_PROBE, **cfg.select.probe}.items()}  # by value
    validate_static(cfg)
    return cfg


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError("--config", str(path), "no such file; give the path of a run YAML (see runs/)")
        try:
            data = yaml.load(p.read_text(), Loader=_UniqueKeyLoader) or {}  # (safe_load's loader, see the class)
        except yaml.YAMLError as e:
            raise ConfigError("--config", str(path), f"not valid YAML: {_yaml_problem(e)}") from None
        if not isinstance(data, dict):
            raise ConfigError("--config", str(path), "the YAML must be a mapping of settings")
    data = apply_overrides(data, overrides or [])
    return config_from_dict(data)


# ---- validation that needs no model -----------------------------------------------------------------------------
def resolve_path(p: str) -> Path:
    """Relative paths are tried as given (cwd), then against the repository (shipped ds_configs/)."""
    path = Path(p).expanduser()
    if path.exists() or path.is_absolute():
        return path
    return REPO_ROOT / path if (REPO_ROOT / path).exists() else path


def stage_steps(s: StageConfig) -> int:
    return s.tokens // (s.global_batch * s.seq_len) if s.global_batch and s.seq_len else 0


def checkpoint_due(done: int, total: int, s: StageConfig) -> bool:
    """Whether a stage saves a checkpoint after optimizer step ``done`` of ``total`` (besides a stop signal's save):
    every ``ckpt_every`` steps and at the last one. The save at the last step guards the final evaluation and export;
    with keep_checkpoints 0 and no export (select's probes) it would be deleted with the DONE marker moments later, a
    full training state written for nothing each time."""
    last = done == total and (s.keep_checkpoints != 0 or s.export)
    return bool(s.ckpt_every) and (done % s.ckpt_every == 0 and done != total or last)


def validate_static(cfg: RunConfig) -> None:
    from ds_hybrid.layers import check_softmax_spec
    from ds_hybrid.modeling.mixers import MIXERS, MixerOptions

    if cfg.mixer not in MIXERS:
        raise ConfigError("mixer", cfg.mixer, f"choose one of {MIXERS}")
    MixerOptions.from_dict(cfg.mixer_options)
    check_softmax_spec(cfg.softmax_layers)
    if isinstance(cfg.data.bos, str) and cfg.data.bos != "auto":
        raise ConfigError("data.bos", cfg.data.bos, "true, false, or auto (a BOS token where the tokenizer puts one)")
    for name, seed in (("seed", cfg.seed), ("data.split_seed", cfg.data.split_seed)):
        if seed < 0:
            raise ConfigError(name, seed, "a seed is an integer >= 0 (numpy's generators take no negative seed)")
    if cfg.select.method not in SELECT_METHODS:
        raise ConfigError("select.method", cfg.select.method, f"choose one of {SELECT_METHODS}")
    if not (math.isfinite(cfg.select.distance_reg) and cfg.select.distance_reg >= 0):
        raise ConfigError("select.distance_reg", cfg.select.distance_reg,
                          "a finite penalty weight >= 0 (0: the plain ranking; the paper's 0.3)")
    if cfg.select.distance_reg and cfg.select.method in SPACING_METHODS:
        raise ConfigError("select.distance_reg", cfg.select.distance_reg,
                          f"applies to score-based methods; {cfg.select.method} is a spacing rule, not a score")
    if cfg.select.distance_reg and cfg.select.method == "halving":
        raise ConfigError("select.distance_reg", cfg.select.distance_reg, f"not with halving: {HALVING_NO_REG}")
    if cfg.select.score != "heldout" and cfg.select.method != "ga_s2":
        raise ConfigError("select.score", cfg.select.score, f"applies to ga_s2 only ({cfg.select.method} has its own "
                          "score); leave it at heldout")
    if cfg.select.score == "recall" and cfg.select.recall_sequences < 1:
        raise ConfigError("select.recall_sequences", cfg.select.recall_sequences,
                          "score: recall needs needle rows (e.g. 16)")
    if cfg.select.method == "retrieval" and cfg.select.retrieval_prompts < 1:
        raise ConfigError("select.retrieval_prompts", cfg.select.retrieval_prompts,
                          "the retrieval ranking needs at least one needle prompt")
    if cfg.select.method == "retrieval" and cfg.select.retrieval_seq_len < 128:
        raise ConfigError("select.retrieval_seq_len", cfg.select.retrieval_seq_len,
                          "a needle prompt needs room for its text, the fact and the question: use >= 128 tokens")
    for k in cfg.select.ks:
        if k < 0:
            raise ConfigError("select.ks", cfg.select.ks, "K values must be >= 0")
    for r in cfg.select.ratios:
        if not 0 <= r <= 1:
            raise ConfigError("select.ratios", cfg.select.ratios, "ratios lie in [0, 1]")
    for name, w in (cfg.data.mixture or {}).items():
        if not isinstance(w, (int, float)) or isinstance(w, bool) or not math.isfinite(w) or w < 0:
            raise ConfigError(f"data.mixture.{name}", w, "weights are finite numbers >= 0 (1 = the source's natural "
                              "share, 0 = left out of training)")
    if cfg.data.mixture and not any(w > 0 for w in cfg.data.mixture.values()):
        raise ConfigError("data.mixture", cfg.data.mixture, "at least one weight must be positive")
    if cfg.data.num_proc < 1:
        raise ConfigError("data.num_proc", cfg.data.num_proc, "use 1 or more tokenizer processes")
    if cfg.data.val_tokens < 1:
        raise ConfigError("data.val_tokens", cfg.data.val_tokens, "hold out at least one token (e.g. 65536)")
    if cfg.peak_tflops is not None and not (math.isfinite(cfg.peak_tflops) and cfg.peak_tflops > 0):
        raise ConfigError("peak_tflops", cfg.peak_tflops, "one GPU's peak dense TFLOP/s for MFU, e.g. 989 (H100/H200 "
                          "bf16), or null for the default by GPU name")
    if cfg.attn_implementation is not None and cfg.attn_implementation not in attention_implementations() \
            and "/" not in cfg.attn_implementation:  # ("org/repo:fn": a kernel from the hub, transformers' own form)
        raise ConfigError("attn_implementation", cfg.attn_implementation,
                          f"choose one of {attention_implementations()} (or null: transformers' default, sdpa)")
    if cfg.data.max_documents is not None and cfg.data.max_documents < 1:
        raise ConfigError("data.max_documents", cfg.data.max_documents, "a cap of 1 or more documents, or null for all")
    for f in ("hub_config", "revision"):
        value = getattr(cfg.data, f)
        if value is None:
            continue
        if not isinstance(value, str) or not value.strip():
            raise ConfigError(f"data.{f}", value, "a non-empty name, or null")
        from ds_hybrid.data import is_hub_source

        if not is_hub_source(cfg.data.source):
            raise ConfigError(f"data.{f}", value, f"only a hub dataset source has one; data.source is "
                              f"{cfg.data.source!r} (local files or the embedded corpus): drop data.{f}")
    if cfg.dist_timeout_minutes <= 0:
        raise ConfigError("dist_timeout_minutes", cfg.dist_timeout_minutes,
                          "minutes a rank may wait in a collective before the job ends: a positive number (e.g. 30)")
    for f in ("eval_sequences", "window"):
        if getattr(cfg.select, f) < 1:
            raise ConfigError(f"select.{f}", getattr(cfg.select, f), "must be a positive integer")
    if cfg.select.recall_sequences < 0:
        raise ConfigError("select.recall_sequences", cfg.select.recall_sequences, "needle rows: 0 (none) or more")
    if cfg.select.ar_prompts < 1:
        raise ConfigError("select.ar_prompts", cfg.select.ar_prompts, "prompts per layer: 1 or more (e.g. 32)")
    from ds_hybrid.recall_tasks import MAX_PAIRS

    if not 3 <= cfg.select.ar_pairs <= MAX_PAIRS:
        raise ConfigError("select.ar_pairs", cfg.select.ar_pairs,
                          f"key-value pairs per prompt: 3 or more (a prompt asks for 3 of them; e.g. 50), at most "
                          f"{MAX_PAIRS} (the distinct two-syllable keys)")
    for name in TRAIN_STAGES:
        check_stage(getattr(cfg, name), name)
    for f in sorted(set(cfg.select.probe) & set(PROBE_SET_BY_SELECT)):
        raise ConfigError(f"select.probe.{f}", cfg.select.probe[f], f"stage select sets it for every probe: "
                          f"{PROBE_SET_BY_SELECT[f]}; remove it from select.probe")
    if cfg.select.method in ("ga_s2", "halving"):  # its probes: short kl runs, settings of select.probe over kl's
        probe = _build(StageConfig, dict(cfg.select.probe), "select.probe", StageConfig(**STAGE_DEFAULTS["kl"]))
        check_stage(probe, "select.probe")
        if stage_steps(probe) < 1:
            need = probe.global_batch * probe.seq_len
            raise ConfigError("select.probe.tokens", probe.tokens,
                              f"gives a probe zero optimizer steps: one step takes select.probe.global_batch x seq_len "
                              f"= {need} tokens; raise it to at least {need} or shrink those")
    for f in ("halving_first_tokens", "halving_keep"):
        v = getattr(cfg.select, f)
        if v is not None and v < 1:
            raise ConfigError(f"select.{f}", v, "a positive number, or null for the default")


#: StageConfig fields stage align never reads, and why: set to anything but the default, refused by name
ALIGN_UNUSED: dict[str, str] = {
    **{f: "align matches each mixer's output to the teacher's attention output, layer by layer: no logits and no "
          "LM loss; it is a setting of stages kl and finetune"
       for f in ("temperature", "ce_weight", "loss_chunk_tokens", "kl_backend", "fp32_logits", "dw_fp32")},
    "gradient_checkpointing": "align has no student blocks to recompute: it keeps only the mixers' activations, "
                              "the teacher running without gradients; to fit memory, lower align.micro_batch or "
                              "align.seq_len",
    "eval_recall": "the recall score needs the hybrid's answer tokens, which align never computes; it is a setting "
                   "of stages kl and finetune",
    "init_from": "align always starts from the teacher (stage 0's weight transfer); to go on with an earlier align, "
                 "resume it in its own out_dir (raise align.tokens) or start kl from its export with kl.init_from",
}

#: select.probe fields that stage select sets itself for every probe (stages/probes.py), with what to set instead
PROBE_SET_BY_SELECT: dict[str, str] = {
    "eval_sequences": "set select.eval_sequences (the held-out sequences a probe is scored on)",
    "eval_recall": "set select.recall_sequences",
    "ce_weight": "a probe's score is its KL to the teacher alone (ce_weight 0)",
    "init_from": "every probe starts from the align stage's export",
    "export": "probes write no model",
    "eval_at_start": "a probe is scored once, at its end",
    "keep_checkpoints": "a probe's checkpoints are deleted when it ends",
}


def attention_implementations() -> list[str]:
    """The softmax layers' attention implementations transformers knows (its registry, paged ones aside: they serve
    continuous batching, not training), and eager."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ["eager", *sorted(k for k in ALL_ATTENTION_FUNCTIONS.valid_keys() if not k.startswith("paged|"))]


#: why the distance regularizer refuses halving's scores (stage select and select-compare --distance-reg)
HALVING_NO_REG = ("its layers stopped in earlier rounds carry their round's KL plus an offset, not a comparable KL, so "
                  "the importance scale the penalty is weighed against would be the offsets'; use ga_s2 (every "
                  "layer's KL), or another score-based selection, for a distance-regularized ranking")


def check_stage(s: StageConfig, name: str) -> None:
    """One stage section's values (``name``: align, kl, finetune or select.probe), each refused by its field."""
    for f in ("seq_len", "global_batch", "micro_batch", "log_every", "loss_chunk_tokens"):
        if f == "micro_batch" and s.micro_batch == "auto":
            continue
        if getattr(s, f) < 1:
            raise ConfigError(f"{name}.{f}", getattr(s, f), "must be a positive integer")
    if s.ckpt_every < 0:
        raise ConfigError(f"{name}.ckpt_every", s.ckpt_every, "a step count (0: no checkpoints at all)")
    if s.eval_sequences < 1:
        raise ConfigError(f"{name}.eval_sequences", s.eval_sequences,
                          "held-out sequences scored at each evaluation: 1 or more (e.g. 16)")
    for f in ("warmup_steps", "eval_every", "keep_checkpoints"):
        if getattr(s, f) < 0:
            raise ConfigError(f"{name}.{f}", getattr(s, f), "must not be negative")
    if len(s.betas) != 2 or not all(0 <= b < 1 for b in s.betas):
        raise ConfigError(f"{name}.betas", list(s.betas), "AdamW's two betas, each in [0, 1), e.g. [0.9, 0.95]")
    if not s.eps > 0:
        raise ConfigError(f"{name}.eps", s.eps, "AdamW's epsilon must be positive (e.g. 1e-8)")
    if not s.weight_decay >= 0:
        raise ConfigError(f"{name}.weight_decay", s.weight_decay, "must not be negative (0: no decay)")
    for f in ("lr", "lr_rest", "clip", "temperature", "ce_weight", "min_lr_ratio", "eps", "weight_decay"):
        if not math.isfinite(getattr(s, f)):  # (NaN passes every comparison below)
            raise ConfigError(f"{name}.{f}", getattr(s, f), "must be a finite number" +
                              (" (0 turns gradient clipping off)" if f == "clip" else ""))
    for f in ("tokens", "lr", "lr_rest", "clip", "ce_weight"):
        if getattr(s, f) < 0:
            raise ConfigError(f"{name}.{f}", getattr(s, f), "must not be negative" +
                              (" (a negative weight would train the student to raise the CE)" if f == "ce_weight" else ""))
    if s.lr == 0 and (name == "align" or s.lr_rest == 0):  # (param_groups would find nothing to train, after the
        # models are built)
        raise ConfigError(f"{name}.lr", s.lr, "nothing would train: " + (
            "stage align trains the mixers at lr" if name == "align" else
            "lr (attention and mixers) and lr_rest (the rest) are both 0") + "; give a positive rate (e.g. 1e-3)")
    if name == "finetune" and (s.ce_weight != 0 or s.temperature != 1):
        f = "ce_weight" if s.ce_weight != 0 else "temperature"
        raise ConfigError(f"finetune.{f}", getattr(s, f), "stage finetune trains on the next-token CE alone (no "
                          "teacher): ce_weight and temperature are stage kl's; remove it from the finetune section")
    if s.eval_recall < 0:
        raise ConfigError(f"{name}.eval_recall", s.eval_recall, "a number of held-out rows (0: no recall score)")
    if s.eval_recall and s.seq_len < 128:
        raise ConfigError(f"{name}.eval_recall", s.eval_recall, f"needle rows need seq_len >= 128 (this stage's "
                          f"is {s.seq_len}): raise seq_len or set eval_recall: 0")
    if s.temperature <= 0:
        raise ConfigError(f"{name}.temperature", s.temperature, "must be positive (1 is the paper's)")
    if not 0 <= s.min_lr_ratio <= 1:
        raise ConfigError(f"{name}.min_lr_ratio", s.min_lr_ratio, "a fraction of lr in [0, 1]")
    if s.min_lr_ratio and s.schedule == "constant":
        raise ConfigError(f"{name}.min_lr_ratio", s.min_lr_ratio, f"the floor of a decay, and {name}.schedule is "
                          "constant (no decay: it would do nothing): set schedule: cosine or linear, or remove it")
    if name == "align":
        default = StageConfig(**STAGE_DEFAULTS["align"])
        for f, why in ALIGN_UNUSED.items():
            if getattr(s, f) != getattr(default, f):
                raise ConfigError(f"align.{f}", getattr(s, f), f"stage align does not use it ({why}); remove it from "
                                  "the align section")
    if s.teacher_overlap and name in ("align", "finetune"):
        raise ConfigError(f"{name}.teacher_overlap", s.teacher_overlap, "applies to stage kl only (the teacher forward "
                          f"of the next step); stage {name} has nothing to overlap: remove it")


def _check_ds_batch(ds: dict, s: StageConfig, stage: str, f: str, path: str, world_size: int, dtype: str) -> None:
    """A DeepSpeed JSON's fixed batch, clipping and bf16 values against the run config, before any model is built
    (stages.common.deepspeed_config fills the "auto" ones from the run config and would refuse these only then)."""
    want: dict[str, Any] = {"train_batch_size": s.global_batch}
    if s.micro_batch != "auto":
        want["train_micro_batch_size_per_gpu"] = s.micro_batch
        want["gradient_accumulation_steps"] = s.global_batch // (s.micro_batch * world_size)
    if f == "ds_config":  # (the teacher's engine never steps: its clipping is dropped)
        want["gradient_clipping"] = s.clip
    for key, value in want.items():
        cur = ds.get(key, "auto")
        if cur != "auto" and cur != value:
            raise ConfigError(f"{stage}.{f}", path, f"DeepSpeed's {key}={cur} contradicts the run config ({value}, "
                              f"from {stage}'s section and {world_size} ranks); set it to \"auto\"")
    if s.micro_batch == "auto":
        for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
            if ds.get(key, "auto") != "auto":
                raise ConfigError(f"{stage}.{f}", path, f"DeepSpeed's {key}={ds[key]} is fixed while {stage}.micro_batch "
                                  f"is auto (chosen from the memory plan at launch): set it to \"auto\", or set "
                                  f"{stage}.micro_batch instead")
    bf16 = ds.get("bf16")
    enabled = bf16.get("enabled", "auto") if isinstance(bf16, dict) else "auto"
    if dtype != "auto" and enabled != "auto" and bool(enabled) != (dtype == "bf16"):
        raise ConfigError(f"{stage}.{f}", path, f"bf16.enabled={enabled} contradicts the run's dtype {dtype}; set it "
                          "to \"auto\"")


def check_teacher_overlap(stage: str, s: StageConfig, teacher_ds: dict) -> None:
    """kl's teacher_overlap runs the teacher's forward on a second stream: not with a ZeRO-3 teacher."""
    zero = int((teacher_ds.get("zero_optimization") or {}).get("stage", 0))
    if s.teacher_overlap and zero == 3:
        raise ConfigError(f"{stage}.teacher_overlap", s.teacher_overlap,
                          f"not with a ZeRO-3 teacher ({s.teacher_ds_config}: its parameter gathers run on "
                          "DeepSpeed's own streams): set it false, or give the teacher a ZeRO-0 config "
                          f"({stage}.teacher_ds_config: ds_configs/single.json) where it fits on one GPU")


def validate_for_launch(cfg: RunConfig, stage: str, world_size: int, check_init_from: bool = True) -> None:
    """Checks that depend on the stage and the job shape; still before any model is built. ``check_init_from``:
    False for a job's check of its later stages up front (an init_from an earlier stage writes)."""
    s = cfg.stage(stage)
    if s.tokens > 0 and stage_steps(s) == 0:
        need = s.global_batch * s.seq_len
        raise ConfigError(f"{stage}.tokens", s.tokens,
                          f"gives zero optimizer steps: one step takes global_batch x seq_len = {need} tokens; "
                          f"raise tokens to at least {need} or shrink global_batch/seq_len")
    if s.tokens == 0:
        raise ConfigError(f"{stage}.tokens", 0, "set a token budget for this stage")
    if s.micro_batch == "auto":
        if s.global_batch % world_size:
            raise ConfigError(f"{stage}.global_batch", s.global_batch,
                              f"must be a multiple of the world size {world_size} (micro_batch: auto picks a divisor "
                              f"of global_batch / world_size); e.g. global_batch={max(world_size, round(s.global_batch / world_size) * world_size)}")
    elif s.global_batch % (s.micro_batch * world_size):
        per_step = s.micro_batch * world_size
        raise ConfigError(f"{stage}.global_batch", s.global_batch,
                          f"must be a multiple of micro_batch x world_size = {s.micro_batch} x {world_size} = "
                          f"{per_step}; e.g. global_batch={max(per_step, round(s.global_batch / per_step) * per_step)}")
    for f in ("ds_config", "teacher_ds_config"):
        p = resolve_path(getattr(s, f))
        if not p.is_file():
            raise ConfigError(f"{stage}.{f}", getattr(s, f), "no such DeepSpeed JSON file (see ds_configs/)")
        try:
            ds = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{stage}.{f}", str(p), f"not valid JSON: {e}") from None
        for key in ("optimizer", "scheduler"):
            if key in ds:
                raise ConfigError(f"{stage}.{f}", str(p),
                                  f"remove the '{key}' section: ds-hybrid builds the optimizer (two learning rates) "
                                  f"and the schedule from the run config's {stage} section")
        fp16 = ds.get("fp16")
        if isinstance(fp16, dict) and fp16.get("enabled", False) not in (False, "auto"):
            raise ConfigError(f"{stage}.{f}", str(p), "remove the enabled fp16 section: ds-hybrid runs in bf16 (fp32 on "
                              "CPU) and sets DeepSpeed's bf16 section itself")
        _check_ds_batch(ds, s, stage, f, str(p), world_size, cfg.dtype)
        if f == "teacher_ds_config" and stage == "kl":
            check_teacher_overlap(stage, s, ds)
        if isinstance(ds.get("checkpoint"), dict) and ds["checkpoint"].get("writer") is not None:
            raise ConfigError(f"{stage}.{f}", str(p),
                              "remove checkpoint.writer: ds-hybrid hashes a checkpoint's files and vouches for them "
                              "(COMPLETE, then older ones pruned) as soon as save_checkpoint returns, and a "
                              "decoupled or fast writer may still be writing them then")
    if check_init_from and s.init_from is not None and s.init_from != "teacher" and \
            not Path(s.init_from).expanduser().is_dir():
        raise ConfigError(f"{stage}.init_from", s.init_from,
                          "no such folder; point at a stage's hf/ export (or 'teacher' for stage 0 without align)")
    if stage == "align" and s.lr_rest != 0:
        raise ConfigError("align.lr_rest", s.lr_rest, "stage align trains only the mixers; set lr_rest: 0")
    if math.isnan(s.lr):
        raise ConfigError(f"{stage}.lr", s.lr, "not a number")
    steps = stage_steps(s)
    # (finetune's default warmup is 10 steps); said once, by the main process (every rank loads the config)
    if s.warmup_steps >= steps and s.warmup_steps > 0 and os.environ.get("RANK", "0") in ("0", ""):
        log.warning("%s.warmup_steps=%d >= the stage's %d steps: the learning rate %s and its %s schedule never "
                    "runs; lower warmup_steps (e.g. to %d) or raise %s.tokens", stage, s.warmup_steps, steps,
                    "peaks at the last step" if s.warmup_steps == steps else
                    f"never reaches {s.lr:g} (at most {s.lr * steps / s.warmup_steps:g})", s.schedule,
                    max(steps // 10, 0), stage)
