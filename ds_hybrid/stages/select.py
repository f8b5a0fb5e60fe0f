"""Stage select: which K layers stay softmax. Writes ``<out_dir>/select/<method>/selection.json`` and a chart
(``.../<method>/distance_reg_<lambda>/`` for a distance-regularized selection, which reuses the method's probes).

Methods (``select.method``):

- ``ga_s2`` (the paper's selector): one probe per layer l, a short stage-kl run from the align export with only l
  restored to softmax, plus one all-linear probe (the baseline), all with the same data, seed and hyper-parameters
  (``select.probe`` overrides the kl section). Score = the probe's held-out KL at its end (default: every probe is
  measured on the same held-out rows, with no noise from which batch happened to come last), or its mean training
  KL over the last ``window`` steps (the reference code's loss-curve reading). Lower = more important.
- ``halving``: successive halving over the same probes. Every layer's probe trains for a first slice of tokens;
  the worse half stops; survivors run again for twice the tokens; until ``halving_keep`` remain (default: the
  largest K asked for). ``halving_survivors``: ``retrain`` (default) starts each round's probes afresh and keeps no
  checkpoint; ``continue`` resumes survivors from their checkpoints (fewer tokens, exactly a longer probe under a
  constant learning rate, but one full training state on disk per live probe: L x 1.9 GB for SmolLM2-135M, L x
  ~1 TB for a 70B). Scores are the held-out KL at each layer's last round; layers that stopped earlier rank below
  the survivors.
- ``proxy``: zero training. Held-out KL of the align checkpoint with layer l alone restored (one forward pass per
  layer over the held-out rows).
- baselines: ``uniform`` (every L/K-th layer from layer 0, as the reference configs), ``smart`` (Zebra-Llama's even
  spacing anchored at the last layer), ``keep_global`` (teachers with sliding-window and global layers, Gemma 3: the
  global layers first, then the sliding ones, each spread evenly), ``mse`` (the layer's final held-out align loss; higher = more important),
  ``ppl`` (the teacher's held-out perplexity when layer l's attention output is replaced by the aligned mixer's;
  larger increase = more important), ``ar`` / ``ar_multihop`` (teacher ablation: layer l's attention output zeroed;
  drop in the log-probability of the right answer on synthetic associative-recall prompts; see
  :mod:`ds_hybrid.recall_tasks`. Log-probability, not accuracy, because a 135M teacher sums three numbers rarely:
  accuracy would be 0 with or without any layer. Accuracy is reported beside it), ``retrieval`` (not in the paper:
  the teacher's retrieval heads, Wu et al. 2024: on held-out rows with a planted key-value fact, how often a head's
  largest attention weight at an answer position falls on the fact's token being repeated; a layer scores its best
  head's rate, higher = more important; teacher only, no align: :mod:`ds_hybrid.retrieval_heads`).

Any score-based method but halving takes ``select.distance_reg`` (lambda >= 0): the ranking becomes the greedy
order of importance (the score rescaled to [0, 1]) minus lambda x proximity to the layers already taken (1 / distance to the
nearest), :func:`ds_hybrid.selection.regularized_order`; lambda = 0 is the plain ranking. The paper reports that
spreading the layers this way does not beat plain KL-guided selection; ds-hybrid lets it be measured.

The code: probes and halving in :mod:`ds_hybrid.stages.probes`, the training-free scorers in
:mod:`ds_hybrid.stages.scorers`, this module runs a method and writes its selection.

Probes are independent and resumable: each writes its own DONE marker atomically and is never rerun; a killed
selection rerun with the same command runs only the probes that have no marker. Across a Slurm array, each task
runs probes ``i`` with ``i % num_tasks == task_index``; the task that finds every result present writes the
selection. Halving splits each round's probes the same way; its tasks must run at the same time (each waits for
the others' scores of a round before deciding the survivors), and task 0 writes the selection. The proxy, ppl, ar
and retrieval scorers load the teacher whole on every rank (each rank scores a share of the prompts / rows); use them up to
models that fit one accelerator (a teacher that does not is refused before it is loaded: ``check_whole_models_fit``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from ds_hybrid import distributed as D
from ds_hybrid.config import RunConfig
from ds_hybrid.errors import ConfigError
from ds_hybrid.layers import (chosen_sets, global_layers, global_layers_left_linear, k_for_ratio, keep_global_layers,
                              keep_global_ranking, selection_top_k, smart_layers, uniform_layers, uniform_ranking)
from ds_hybrid.modeling.families import check_context, teacher_layer_types, trained_context
from ds_hybrid.monitor import setup_logging
from ds_hybrid.select_compare import chosen_overlap
from ds_hybrid.selection import (recorded_vs_now, folder_identity, make_selection, ranking_tau, read_selection,
                                 write_selection)
from ds_hybrid.stages.probes import (DATA_FIELDS, check_ks, rows_bos, ga_s2, halving, probe_stage_config, task_held,
                                    task_slot)
from ds_hybrid.stages.scorers import (_held_out_rows, _sum_reduce, ar_scores, check_whole_models_fit, ppl_scores,
                                     proxy_scores, retrieval_scores)

log = logging.getLogger("ds_hybrid")


def plot_selection(selection: dict, path: Path, k: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    L = selection["num_layers"]
    # halving's scores carry the offsets that rank a layer stopped early below the finalists; its bars are its KLs
    raw = selection.get("raw_scores") or selection["scores"]
    scores = [raw[str(l)] for l in range(L)]
    base = selection.get("baseline")
    values = [base - v for v in scores] if (base is not None and selection["lower_is_better"]) else scores
    chosen = set(selection_top_k(selection, k))
    uniform = set(uniform_layers(L, k))
    glob = set(global_layers(selection["layer_types"])) if "sliding_attention" in selection.get("layer_types", []) else set()
    fig, ax = plt.subplots(figsize=(max(6, L * 0.3), 3.5))
    colors = ["tab:red" if l in chosen else "tab:gray" for l in range(L)]
    ax.bar(range(L), values, color=colors, hatch=["//" if l in glob else "" for l in range(L)], edgecolor="black",
           linewidth=0.3)
    for l in uniform:
        ax.plot(l, 0, marker="^", color="tab:blue", markersize=7, clip_on=False)
    what = "answer KL" if selection.get("budget", {}).get("score") == "recall" else "KL"
    ylabel = f"{what} reduction vs all-linear" if (base is not None and selection["lower_is_better"]) else "score"
    if selection["method"] == "retrieval":
        ylabel = "best head's copy rate"
    title = f"{selection['method']}: top-{k} in red, uniform-{k} marked ▲"
    if glob:
        title += f"\nteacher's global layers hatched ({len(glob & chosen)} of {len(glob)} kept)"  # (one line overflows)
    ax.set(xlabel="layer", ylabel=ylabel)
    ax.set_title(title, fontsize=10)
    ax.set_xticks(range(0, L, max(1, L // 15)))
    fig.tight_layout()
    # written whole, then renamed: the tasks of a job array that finish together each write it, and one reads it
    # back for TensorBoard (a png read half-written failed that task, and with it the array's afterok follow-up)
    path = Path(path)
    part = path.with_name(f".{path.name}.{os.getpid()}.part")
    try:
        fig.savefig(part, dpi=120, format="png")
        os.replace(part, path)
    finally:
        plt.close(fig)
        part.unlink(missing_ok=True)


def selection_target(cfg: RunConfig) -> Path:
    """Where stage select writes this run config's selection.json: ``<out_dir>/select/<method>/``, or beside it for
    another probe score (``score_<score>/``) or a distance-regularized ranking (``distance_reg_<lambda>/``), which
    reuse the method's probes."""
    sc = cfg.select
    sel_dir = cfg.stage_dir("select") / sc.method
    sel_dir = sel_dir / f"score_{sc.score}" if sc.score != "heldout" else sel_dir
    sel_dir = sel_dir / f"distance_reg_{sc.distance_reg:g}" if sc.distance_reg else sel_dir
    return sel_dir / "selection.json"


#: the methods that read stage align's export (the others read the teacher alone, or nothing)
NEEDS_ALIGN = ("ga_s2", "halving", "proxy", "ppl", "mse")


def check_select_against_teacher(cfg: RunConfig, teacher_config, tokenizer) -> list[int]:
    """What stage select checks against the teacher before any model is built, and the Slurm launcher before align
    runs (``ds_hybrid.launch``): the rows its method reads fit the teacher's context (the probes' seq_len,
    retrieval's rows, ar's longest prompt), keep_global's teacher has sliding-window layers, ``select.reference``
    ranks this teacher's layer count, and the K asked for. Returns the Ks."""
    sc = cfg.select
    L = teacher_config.num_hidden_layers
    if sc.method == "retrieval":
        check_context("select.retrieval_seq_len", sc.retrieval_seq_len, teacher_config)
    elif sc.method in ("ga_s2", "halving", "proxy", "ppl"):
        check_context("select.probe.seq_len", probe_stage_config(cfg, Path()).seq_len, teacher_config)
    elif sc.method in ("ar", "ar_multihop"):  # the longest prompt of the ones the scorer will make
        from ds_hybrid.recall_tasks import make_prompts

        longest = max(len(tokenizer(p.text + p.answer, add_special_tokens=False)["input_ids"])
                      for p in make_prompts(sc.ar_prompts, seed=sc.ar_seed, pairs=sc.ar_pairs,
                                            multihop=sc.method == "ar_multihop"))
        context = trained_context(teacher_config)
        if context and longest > context:
            raise ConfigError("select.ar_pairs", sc.ar_pairs, f"makes prompts of up to {longest} tokens, longer than "
                              f"the teacher's context ({context}): use fewer pairs (about "
                              f"{max(3, sc.ar_pairs * context // longest)})")
    elif sc.method == "keep_global":
        keep_global_ranking(teacher_layer_types(teacher_config))  # (refuses a teacher of global layers only)
    if sc.reference is not None:
        ref = read_selection(sc.reference, "select.reference")
        if ref.get("num_layers") != L:
            raise ConfigError("select.reference", sc.reference, f"ranks {ref.get('num_layers')} layers, this teacher "
                              f"has {L}: compare selections of the same teacher")
    return check_ks(cfg, L)


def run_select(cfg: RunConfig, force: bool = False) -> Path | None:
    from ds_hybrid.stages.common import check_env_knobs

    D.init_distributed(cfg.dist_timeout_minutes)
    setup_logging()
    check_env_knobs()
    from ds_hybrid.data import pin_hub_commit

    pin_hub_commit(cfg)  # (a hub dataset: the commit the align read, and every probe and task after it)
    sc = cfg.select
    from ds_hybrid.config import unused_select_settings

    if (unused := unused_select_settings(cfg)) and D.is_main():
        log.warning("select.method %s (score %s) does not read %s: set but unused in this run", sc.method, sc.score,
                    "; ".join(unused))
    out = cfg.stage_dir("select") / sc.method  # the method's probes and its plain selection
    target = selection_target(cfg)
    # a probe task holds its place from before it looks for a selection until it has written one (a second copy
    # started meanwhile is refused: stages.probes.task_held)
    held = task_held(out, *task_slot(cfg)) if sc.method in ("ga_s2", "halving") else contextlib.nullcontext()
    with held:
        return _run_select(cfg, force, out, target)


def _run_select(cfg: RunConfig, force: bool, out: Path, target: Path) -> Path | None:
    from ds_hybrid.teacher import check_vocab, job_teacher, load_teacher_config, load_tokenizer

    sc = cfg.select
    # the main rank's look, for every rank (another node may see the file a moment later: ranks must not part)
    existing = D.main_reads(lambda: _existing_selection(target, cfg))
    if existing is not None and not force:  # kept; what changed since is said (a benign kl.lr change must not block
        made, stale_align = existing        # a pipeline's later steps: --force makes it again)
        now = selection_settings(cfg)
        # (a setting recorded since counts as unchanged where it is at its default then: None, e.g. data.revision,
        # or LATER_SETTINGS')
        made_then = {**LATER_SETTINGS, **made} if made is not None else None
        changed = [k for k in sorted(set(made_then or {}) | set(now)) if (made_then or {}).get(k) != now.get(k)]
        if stale_align:
            log.warning("selection %s exists, computed from an align export that has changed since (%s): kept, and "
                        "stage kl will refuse it; rerun stage select with --force to rank this align export's layers",
                        target, stale_align)
        elif made is not None and not changed and _proxy_at_t1(target, cfg):
            log.warning("selection %s exists, scored at temperature 1 by a ds-hybrid before 2026-12-06 although the "
                        "probes' temperature is %g: kept; --force makes it again at that temperature", target,
                        probe_stage_config(cfg, Path(".")).temperature)
        elif made is not None and not changed:
            log.info("selection %s exists, from these settings; nothing to do", target)
        elif made is None:
            log.warning("selection %s exists (made by an older ds-hybrid, which did not record its settings): kept; "
                        "--force makes it again", target)
        else:
            log.warning("selection %s exists, made from other settings (%s changed since): kept; --force makes it "
                        "again (its probes are reused only where their own settings are unchanged)", target,
                        ", ".join(changed))
        return target
    teacher_path = job_teacher(cfg.teacher)
    teacher_config = load_teacher_config(teacher_path)
    tokenizer = load_tokenizer(teacher_path)
    check_vocab(teacher_config, tokenizer)
    L = teacher_config.num_hidden_layers
    ks = check_select_against_teacher(cfg, teacher_config, tokenizer)  # (before any model is built)
    align_dir = cfg.stage_dir("align") / "hf"
    if sc.method in NEEDS_ALIGN and not (align_dir / "config.json").is_file():
        raise ConfigError("select.method", sc.method, f"needs the align export {align_dir}: run stage align first")
    if sc.reference is not None:
        ref = read_selection(sc.reference, "select.reference")
        want, have = D.main_reads(lambda: recorded_vs_now(ref.get("teacher", {}), teacher_path))
        if want is not None and want != have and D.is_main():  # (allowed: e.g. a base model against its instruct)
            log.warning("select.reference %s was computed for teacher %s, this run's is %s: its agreement compares "
                        "the rankings of two teachers of the same depth", sc.reference,
                        ref.get("teacher", {}).get("path"), teacher_path)

    extra: dict[str, Any] = {}
    lower = True
    if sc.method == "ga_s2":
        scores, extra = ga_s2(cfg, out, L, align_dir, force)
        if not scores:
            log.info("this task's probes are done; still missing: %s", ", ".join(extra["missing"]))
            return None
    elif sc.method == "halving":
        scores, extra = halving(cfg, out, L, align_dir, force)
        idx, n = task_slot(cfg)
        if idx != 0:
            log.info("halving task %d of %d finished its probes; task 0 writes the selection", idx, n)
            return None
    elif sc.method == "keep_global":
        order = keep_global_ranking(teacher_layer_types(teacher_config))
        scores = {l: float(i) for i, l in enumerate(order)}
        extra = {"tokens_spent": 0, "rule": "the teacher's global layers, then its sliding-window layers, each spread"}
    elif sc.method in ("uniform", "smart"):
        order = uniform_ranking(L) if sc.method == "uniform" else sorted(range(L), key=lambda l: (-l, l))
        scores = {l: float(i) for i, l in enumerate(order)}
        extra = {"tokens_spent": 0, "rule": "uniform_layers(L, K)" if sc.method == "uniform" else "smart_layers(L, K)"}
    elif sc.method == "mse":
        done = json.loads((cfg.stage_dir("align") / "DONE").read_text())
        scores = {l: float(done["val"][f"layer{l:02d}"]) for l in range(L)}
        lower = False
        extra = {"tokens_spent": 0, "source": str(cfg.stage_dir("align") / "DONE")}
    else:
        import torch
        from transformers import AutoModelForCausalLM

        from ds_hybrid.stages.common import run_dtype

        dtype, dev = run_dtype(cfg), D.device()
        if dev.type == "cuda":  # (before either model is built: one that cannot fit is said, not an OOM mid-load;
            # the least free memory of any rank, so that every rank decides alike)
            free = torch.tensor([torch.cuda.mem_get_info(dev)[0]], dtype=torch.int64, device=dev)
            if D.world_size() > 1:
                torch.distributed.all_reduce(free, op=torch.distributed.ReduceOp.MIN)
            rows_len = (sc.retrieval_seq_len if sc.method == "retrieval" else
                        probe_stage_config(cfg, align_dir).seq_len if sc.method == "ppl" else 0)
            check_whole_models_fit(cfg, teacher_config, dtype, int(free.item()), rows_len)
        # retrieval reads the attention weights: eager attention (the others keep the fast default)
        attn = {"attn_implementation": "eager"} if sc.method == "retrieval" else {}
        # straight onto the device (device_map): built in host memory first, a node's ranks held a copy each there
        teacher = AutoModelForCausalLM.from_pretrained(teacher_path, dtype=dtype, device_map=dev, **attn).eval()
        if sc.method == "retrieval":
            scores, extra = retrieval_scores(cfg, teacher, tokenizer)
            lower = False
        elif sc.method in ("ar", "ar_multihop"):
            scores, extra = ar_scores(cfg, teacher, tokenizer, multihop=sc.method == "ar_multihop")
            lower = False
        else:
            import ds_hybrid  # noqa: F401

            student = AutoModelForCausalLM.from_pretrained(align_dir, dtype=dtype, device_map=dev).eval()
            probe = probe_stage_config(cfg, align_dir)  # the probes' held-out rows and temperature (GA-S2's, compared)
            seq_len = probe.seq_len
            rows = _held_out_rows(cfg, tokenizer, seq_len, sc.eval_sequences)
            n_tok = int(_sum_reduce(torch.tensor([sum(r.numel() for r in rows)], device=dev)).item())  # all ranks
            if sc.method == "proxy":
                scores, baseline = proxy_scores(teacher, student, rows, probe.temperature)
                extra = {"baseline": baseline, "tokens_spent": 0, "forward_tokens": n_tok * (L + 1),
                         "budget": {"heldout_sequences": sc.eval_sequences, "seq_len": seq_len,
                                    "temperature": probe.temperature}}
            else:
                scores, base_ppl = ppl_scores(teacher, student, rows)
                lower = False
                extra = {"teacher_ppl": base_ppl, "tokens_spent": 0, "forward_tokens": n_tok * (L + 1)}
    ratios = sc.ratios
    selection = make_selection(sc.method, scores, lower, L, distance_reg=sc.distance_reg, **extra)
    selection["chosen"] = chosen_sets(selection["ranking"], L, sorted(set(sc.ks)), ratios)
    # spacing rules are applied per K (their rankings are nested orders for the chart only)
    types = teacher_layer_types(teacher_config)
    rule = {"uniform": lambda k: uniform_layers(L, k), "smart": lambda k: smart_layers(L, k),
            "keep_global": lambda k: keep_global_layers(types, k)}.get(sc.method)
    if rule is not None:
        selection["chosen"] = {**{f"k={k}": rule(k) for k in sorted(set(sc.ks))},
                               **{f"ratio={r:g}": rule(k_for_ratio(r, L)) for r in ratios}}
    # (these read samples of every tensor: on the main rank, which writes the file)
    selection["teacher"] = folder_identity(teacher_path) if D.is_main() else None
    # the teacher's attention kind per layer (full / sliding) and, where it has both, which chosen sets keep its
    # global layers (Gemma 3: does KL-guided selection keep them?)
    selection["layer_types"] = types
    glob = global_layers(selection["layer_types"])
    if 0 < len(glob) < L:  # both kinds (a teacher all of sliding-window layers has no global ones to keep)
        selection["global_layers"] = glob
        selection["global_kept"] = {name: sorted(set(v) & set(glob)) for name, v in selection["chosen"].items()}
        left = global_layers_left_linear(selection["chosen"], glob) if sc.method != "keep_global" else {}
        if left and D.is_main():
            log.warning("select %s: %s leave the teacher's global layers %s linear; on Gemma-3-270M the hybrid "
                        "that kept all of them found more needles at the same KL (docs/SELECT.md): select.method "
                        "keep_global or retrieval keeps them", sc.method, ", ".join(left),
                        sorted({l for v in left.values() for l in v}))
    if sc.method in NEEDS_ALIGN:
        selection["align"] = folder_identity(align_dir) if D.is_main() else None
    selection["settings"] = selection_settings(cfg)
    selection["config_hash"] = _config_hash(cfg)
    if sc.reference is not None:
        ref = read_selection(sc.reference, "select.reference")
        selection["agreement"] = {"reference": sc.reference, "kendall_tau": ranking_tau(selection, ref),
                                  "topk_overlap": {str(k): chosen_overlap(selection, ref, k) for k in ks}}
    if D.is_main():
        write_selection(target, selection)
        k_plot = max(ks) if ks else max(1, L // 4)
        plot_selection(selection, target.parent / "selection.png", k_plot)
        _to_tensorboard(target.parent, selection, k_plot)
        chosen = ", ".join(f"{k}: {v}" for k, v in selection["chosen"].items())
        # (a spacing rule's ranking is a nested order for the chart, not what it chooses at K: the rule is said)
        order = (f"rule {extra['rule']}" if rule is not None and "rule" in extra
                 else f"ranking {selection['ranking'][:max(ks or [8])]}")
        log.info("select %s: %s | %s | tokens spent %s", sc.method, order, chosen, selection.get("tokens_spent"))
    D.barrier()
    return target


def _existing_selection(target: Path, cfg: RunConfig) -> tuple[dict | None, str | None] | None:
    """None where ``target`` is not there; else (its recorded settings or None, and, where the align export it was
    computed from has since changed, what changed)."""
    if not target.is_file():
        return None
    try:
        sel = json.loads(target.read_text())
    except ValueError:
        return None, None
    align = cfg.stage_dir("align") / "hf"
    rec = sel.get("align") or {}
    stale = None
    if rec and (align / "config.json").is_file():
        want, have = recorded_vs_now(rec, align)
        if want is not None and want != have:
            stale = f"{want} -> {have}"
    return sel.get("settings"), stale


def _proxy_at_t1(target: Path, cfg: RunConfig) -> bool:
    """A proxy selection made before the proxy scored at the probes' temperature (its budget does not record one)
    where that temperature is not 1: its scores are of another temperature than its settings say."""
    if cfg.select.method != "proxy" or probe_stage_config(cfg, Path(".")).temperature == 1.0:
        return False
    try:
        return "temperature" not in json.loads(target.read_text()).get("budget", {})
    except (OSError, ValueError):
        return False


def selection_settings(cfg: RunConfig) -> dict[str, Any]:
    """What a selection depends on, flattened to one level (``select.ks``, ``data.source``, ``kl.lr``...): the
    teacher, mixer, seed, the data's identity, the select section but the task split, and the kl settings its probes
    take over (stages.probes.probe_stage_config). Not: logging, processes, caches, kernels."""
    d = json.loads(json.dumps(cfg.to_dict(), default=str))
    out: dict[str, Any] = {k: d.get(k) for k in ("teacher", "mixer", "mixer_options", "seed")}
    out.update({f"data.{k}": d["data"].get(k) for k in DATA_FIELDS})
    out["data.row_bos"] = rows_bos(cfg)  # (a selection made before it was recorded: None, rows without BOS)
    out.update({f"select.{k}": v for k, v in d["select"].items() if k not in ("task_index", "num_tasks")})
    out.update({f"kl.{k}": d["kl"].get(k) for k in ("lr", "lr_rest", "betas", "weight_decay", "clip", "temperature",
                                                     "fp32_logits", "dw_fp32")})
    return out


# settings a selection records since a later date than the rest, with the default in force then (a selection made
# before is taken as made with it): kl.dw_fp32 since late 2026-12-06
LATER_SETTINGS: dict[str, Any] = {"kl.dw_fp32": True}


def _config_hash(cfg: RunConfig) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(selection_settings(cfg), sort_keys=True).encode()).hexdigest()[:16]


def _to_tensorboard(out: Path, selection: dict, k: int) -> None:
    from PIL import Image
    import numpy as np
    from torch.utils.tensorboard import SummaryWriter

    w = SummaryWriter(log_dir=str(out / "tensorboard"))
    for l in range(selection["num_layers"]):
        w.add_scalar(f"select/{selection['method']}/score", selection["scores"][str(l)], l)
    img = np.asarray(Image.open(out / "selection.png").convert("RGB"))
    w.add_image(f"select/{selection['method']}/chart", img, 0, dataformats="HWC")
    w.close()
