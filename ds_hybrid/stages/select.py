"""Stage select: which K layers stay softmax. Writes ``<out_dir>/select/<method>/selection.json`` and a chart.

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
  spacing anchored at the last layer), ``mse`` (the layer's final held-out align loss; higher = more important),
  ``ppl`` (the teacher's held-out perplexity when layer l's attention output is replaced by the aligned mixer's;
  larger increase = more important), ``ar`` / ``ar_multihop`` (teacher ablation: layer l's attention output zeroed;
  drop in the log-probability of the right answer on synthetic associative-recall prompts; see
  :mod:`ds_hybrid.recall_tasks`. Log-probability, not accuracy, because a 135M teacher sums three numbers rarely:
  accuracy would be 0 with or without any layer. Accuracy is reported beside it).

Probes are independent and resumable: each writes its own DONE marker atomically and is never rerun; a killed
selection rerun with the same command runs only the probes that have no marker. Across a Slurm array, each task
runs probes ``i`` with ``i % num_tasks == task_index``; the task that finds every result present writes the
selection. Halving splits each round's probes the same way; its tasks must run at the same time (each waits for
the others' scores of a round before deciding the survivors), and task 0 writes the selection. The proxy, ppl and
ar scorers load the teacher whole on every rank (each rank scores a share of the prompts / rows); use them up to
models that fit one accelerator.
"""

from __future__ import annotations

import copy
import gc
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from ds_hybrid import distributed as D
from ds_hybrid.checkpoint import atomic_write_text
from ds_hybrid.config import STAGE_DEFAULTS, RunConfig, StageConfig, _build, stage_steps
from ds_hybrid.errors import ConfigError
from ds_hybrid.layers import k_for_ratio, uniform_layers
from ds_hybrid.monitor import setup_logging
from ds_hybrid.selection import (folder_fingerprint, kendall_tau, make_selection, rank_layers, read_selection,
                                 smart_layers, topk_overlap, uniform_ranking, write_selection)

log = logging.getLogger("ds_hybrid")
BASELINE = "baseline"


# ---- configuration ---------------------------------------------------------------------------------------------
def probe_stage_config(cfg: RunConfig, align_dir: Path) -> StageConfig:
    base = StageConfig(**STAGE_DEFAULTS["kl"])
    base = _build(StageConfig, {k: v for k, v in vars(cfg.kl).items()
                                if k in ("ds_config", "teacher_ds_config", "lr", "lr_rest", "betas", "weight_decay",
                                         "clip", "loss_chunk_tokens", "kl_backend", "temperature")}, "kl", base)
    s = _build(StageConfig, dict(cfg.select.probe), "select.probe", base)
    s.init_from = str(align_dir)
    s.export = False
    s.eval_sequences = cfg.select.eval_sequences
    s.eval_at_start = False  # a probe's score is its held-out KL at the end; the one at step 0 cost 17-25 % of it
    s.keep_checkpoints = 0
    s.ce_weight = 0.0
    return s


def probe_run_config(cfg: RunConfig, probe_dir: Path, layers: list[int], s: StageConfig) -> RunConfig:
    pc = copy.deepcopy(cfg)
    pc.out_dir = str(probe_dir)
    pc.softmax_layers = list(layers)
    pc.kl = s
    return pc


def requested_ks(cfg: RunConfig, num_layers: int) -> list[int]:
    ks = set(cfg.select.ks) | {k_for_ratio(r, num_layers) for r in cfg.select.ratios}
    return sorted(ks)


def task_slot(cfg: RunConfig) -> tuple[int, int]:
    sc = cfg.select
    idx = sc.task_index if sc.task_index is not None else int(os.environ.get("SLURM_ARRAY_TASK_ID", 0))
    n = sc.num_tasks if sc.num_tasks is not None else int(os.environ.get("SLURM_ARRAY_TASK_COUNT", 1))
    if not 0 <= idx < n:
        raise ConfigError("select.task_index", idx, f"must lie in 0..{n - 1} (num_tasks={n})")
    return idx, n


# ---- probes (ga_s2, halving) ----------------------------------------------------------------------------------
def probe_name(layer: int | None) -> str:
    return BASELINE if layer is None else f"layer_{layer:03d}"


def run_probe(cfg: RunConfig, probe_dir: Path, layer: int | None, s: StageConfig, force: bool = False) -> dict:
    """One probe: a kl run with only ``layer`` restored (None: all-linear). Returns its DONE summary."""
    from ds_hybrid.trainer import run_stage

    pc = probe_run_config(cfg, probe_dir, [] if layer is None else [layer], s)
    run_stage(pc, "kl", force=force)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return json.loads((probe_dir / "kl" / "DONE").read_text())


def probe_score(probe_dir: Path, score: str, window: int) -> float:
    done = json.loads((probe_dir / "kl" / "DONE").read_text())
    if score == "heldout":
        return float(done["val"]["kl"])
    recs = [json.loads(l) for l in (probe_dir / "kl" / "metrics.jsonl").read_text().splitlines()]
    train = {r["step"]: r["kl"] for r in recs if r["split"] == "train"}
    last = sorted(train)[-window:]
    return float(sum(train[s] for s in last) / len(last))


def ga_s2(cfg: RunConfig, out: Path, num_layers: int, align_dir: Path) -> tuple[dict[int, float], dict]:
    s = probe_stage_config(cfg, align_dir)
    idx, n = task_slot(cfg)
    items: list[int | None] = [None, *range(num_layers)]
    for i, layer in enumerate(items):
        if i % n != idx:
            continue
        d = out / "probes" / probe_name(layer)
        if (d / "kl" / "DONE").is_file():
            log.info("probe %s already done", probe_name(layer))
            continue
        log.info("probe %s (%d/%d)", probe_name(layer), i + 1, len(items))
        run_probe(cfg, d, layer, s)
    missing = [probe_name(l) for l in items if not (out / "probes" / probe_name(l) / "kl" / "DONE").is_file()]
    if missing:
        return {}, {"missing": missing}
    scores = {l: probe_score(out / "probes" / probe_name(l), cfg.select.score, cfg.select.window)
              for l in range(num_layers)}
    baseline = probe_score(out / "probes" / BASELINE, cfg.select.score, cfg.select.window)
    tokens = len(items) * stage_steps(s) * s.global_batch * s.seq_len
    return scores, {"baseline": baseline, "tokens_spent": tokens, "probes": len(items),
                    "budget": {"probe_tokens": stage_steps(s) * s.global_batch * s.seq_len, "seq_len": s.seq_len,
                               "global_batch": s.global_batch, "lr": s.lr, "lr_rest": s.lr_rest,
                               "score": cfg.select.score}}


def _halving_round(cfg: RunConfig, d: Path, layer: int, s: StageConfig, steps: int) -> float:
    """One probe's round of successive halving: train it up to ``steps`` and return its held-out KL there.

    The score of every round is kept (``round_<steps>.json``): a resumed selection reads the scores of the rounds
    that already ran instead of the probe's latest KL, which a survivor has since improved in later rounds.
    """
    record = d / f"round_{steps:07d}.json"
    if record.is_file():
        return float(json.loads(record.read_text())["kl"])
    done = d / "kl" / "DONE"
    done_steps = json.loads(done.read_text())["steps"] if done.is_file() else 0
    if done_steps > steps:
        raise RuntimeError(f"{d} went past round {steps} but holds no score of it ({record.name}): it was written by "
                           "an older ds-hybrid; delete that selection's probes folder and rerun")
    if done_steps < steps:
        run_probe(cfg, d, layer, s, force=done.is_file())
    kl = probe_score(d, "heldout", cfg.select.window)
    if D.is_main():
        atomic_write_text(record, json.dumps({"steps": steps, "kl": kl}))
    D.barrier()
    return kl


def _round_scores_of_others(cfg: RunConfig, out: Path, layers: list[int], steps: int) -> dict[int, float]:
    """Wait for the other tasks' records of this round (halving across tasks runs them all at once)."""
    records = {l: out / "probes" / probe_name(l) / f"round_{steps:07d}.json" for l in layers}
    deadline = time.monotonic() + 60 * cfg.dist_timeout_minutes
    missing = [l for l, f in records.items() if not f.is_file()]
    if missing:
        log.info("halving round of %d steps: waiting for the other tasks' probes %s", steps, missing)
    while missing:
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"halving split over several tasks: probes {missing} of the {steps}-step round did not finish "
                f"within dist_timeout_minutes={cfg.dist_timeout_minutes}. Every task must run "
                "at the same time (rounds depend on each other); rerun the missing tasks, or run halving as one task")
        time.sleep(2.0)
        missing = [l for l, f in records.items() if not f.is_file()]
    return {l: float(json.loads(f.read_text())["kl"]) for l, f in records.items()}


def halving(cfg: RunConfig, out: Path, num_layers: int, align_dir: Path) -> tuple[dict[int, float], dict]:
    s = probe_stage_config(cfg, align_dir)
    cont = cfg.select.halving_survivors == "continue"
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
    step_tokens = s.global_batch * s.seq_len
    first = cfg.select.halving_first_tokens or max(step_tokens, (stage_steps(s) * step_tokens) // 8)
    first_steps = max(1, first // step_tokens)
    keep = cfg.select.halving_keep or max(requested_ks(cfg, num_layers) or [1])
    idx, n = task_slot(cfg)
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
            round_scores[layer] = _halving_round(cfg, d, layer, s_r, steps)
        round_scores.update(_round_scores_of_others(cfg, out, [l for l in alive if l not in mine], steps))
        round_scores = {l: round_scores[l] for l in alive}
        spent += len(alive) * (steps - prev_steps if cont else steps) * step_tokens
        scores.update(round_scores)
        ranked = rank_layers(round_scores, lower_is_better=True)
        rounds.append({"round": r, "steps": steps, "alive": alive, "scores": {str(k): v for k, v in round_scores.items()}})
        if len(alive) <= keep or steps * step_tokens >= stage_steps(s) * step_tokens:
            break
        survivors = ranked[:max(keep, len(alive) // 2)]
        for layer in alive:  # stopped probes no longer need their checkpoints
            if layer not in survivors and D.is_main():
                shutil.rmtree(out / "probes" / probe_name(layer) / "kl" / "checkpoints", ignore_errors=True)
        alive = survivors
        prev_steps, steps, r = steps, min(steps * 2, stage_steps(s)), r + 1
    # layers that stopped in an earlier round rank below every layer that went further
    final_round = {int(l) for l in rounds[-1]["alive"]}
    offset = max(scores.values()) - min(scores.values()) + 1.0
    depth = {l: max(i for i, rd in enumerate(rounds) if l in rd["alive"]) for l in range(num_layers)}
    ordered = {l: scores[l] + offset * (len(rounds) - 1 - depth[l]) for l in range(num_layers)}
    return ordered, {"tokens_spent": spent, "rounds": rounds, "raw_scores": {str(k): v for k, v in scores.items()},
                     "finalists": sorted(final_round),
                     "budget": {"first_round_tokens": first_steps * step_tokens, "max_probe_tokens": stage_steps(s) * step_tokens,
                                "keep": keep, "survivors": cfg.select.halving_survivors}}


# ---- forward-only scorers (proxy, ppl, ar) ---------------------------------------------------------------------
def _held_out_rows(cfg: RunConfig, tokenizer, seq_len: int, n: int) -> list[torch.Tensor]:
    from ds_hybrid.data import PackedSequences, prepare_streams

    streams = prepare_streams(cfg.data, tokenizer, is_main=D.is_main(), barrier=D.barrier)
    val = PackedSequences(streams.val, seq_len, max_rows=n)
    if len(val) == 0:
        raise ConfigError("select.probe.seq_len", seq_len, "the held-out slice is shorter than one sequence")
    return [val[[i]] for i in range(D.rank(), len(val), D.world_size())]


def _sum_reduce(t: torch.Tensor) -> torch.Tensor:
    if D.world_size() > 1:
        torch.distributed.all_reduce(t)
    return t


@torch.no_grad()
def proxy_scores(cfg: RunConfig, teacher, student, rows: list[torch.Tensor]) -> tuple[dict[int, float], float]:
    """Held-out KL(teacher || align student with layer l restored), for every l, and for none (the baseline)."""
    from ds_hybrid.losses import chunked_linear_loss

    dev = D.device()
    hs_t = [teacher.model(input_ids=r.to(dev), use_cache=False).last_hidden_state.flatten(0, 1) for r in rows]

    def kl_now() -> float:
        tot = torch.zeros(2, dtype=torch.float64, device=dev)
        for r, h_t in zip(rows, hs_t):
            h_s = student.model(input_ids=r.to(dev), use_cache=False).last_hidden_state.flatten(0, 1)
            _, st = chunked_linear_loss(h_s, student.lm_head.weight, h_t, teacher.lm_head.weight, chunk=1024)
            tot[0] += st.kl_per_token.sum().double()
            tot[1] += st.n_kl
        tot = _sum_reduce(tot)
        return float(tot[0] / tot[1])

    baseline = kl_now()
    scores = {}
    for l, layer in enumerate(student.model.layers):
        mixer = layer.self_attn
        layer.self_attn = teacher.model.layers[l].self_attn  # restore l alone, in place
        try:
            scores[l] = kl_now()
        finally:
            layer.self_attn = mixer
        log.info("proxy layer %d: KL %.4f (all-linear %.4f)", l, scores[l], baseline)
    return scores, baseline


@torch.no_grad()
def ppl_scores(teacher, student, rows: list[torch.Tensor]) -> tuple[dict[int, float], float]:
    """Teacher held-out perplexity with layer l's attention output replaced by its aligned mixer's output."""
    dev = D.device()

    def ppl_now() -> float:
        tot = torch.zeros(2, dtype=torch.float64, device=dev)
        for r in rows:
            r = r.to(dev)
            logits = teacher(input_ids=r, use_cache=False).logits.float()
            ce = torch.nn.functional.cross_entropy(logits[0, :-1], r[0, 1:], reduction="sum")
            tot[0] += ce.double()
            tot[1] += r.shape[1] - 1
        tot = _sum_reduce(tot)
        return float(torch.exp(tot[0] / tot[1]))

    base = ppl_now()
    scores = {}
    for l, layer in enumerate(teacher.model.layers):
        mixer = student.model.layers[l].self_attn

        def swap(module, args, kwargs, output, mixer=mixer):
            x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            return (mixer(hidden_states=x)[0], *output[1:])

        h = layer.self_attn.register_forward_hook(swap, with_kwargs=True)
        try:
            scores[l] = ppl_now() - base
        finally:
            h.remove()
        log.info("ppl layer %d: +%.3f (teacher %.3f)", l, scores[l], base)
    return scores, base


@torch.no_grad()
def ar_scores(cfg: RunConfig, teacher, tokenizer, multihop: bool) -> tuple[dict[int, float], dict]:
    """Drop in mean log p(answer | prompt) when layer l's attention output is zeroed (teacher ablation)."""
    from ds_hybrid.recall_tasks import make_prompts

    sc = cfg.select
    prompts = make_prompts(sc.ar_prompts, seed=sc.ar_seed, pairs=sc.ar_pairs, multihop=multihop)
    mine = prompts[D.rank()::D.world_size()]
    dev = D.device()
    encoded = []
    for p in mine:
        ids = tokenizer(p.text, add_special_tokens=False)["input_ids"]
        ans = tokenizer(p.answer, add_special_tokens=False)["input_ids"]
        encoded.append((torch.tensor([ids + ans], device=dev), len(ids), len(ans)))

    def score_now() -> tuple[float, float]:
        tot = torch.zeros(3, dtype=torch.float64, device=dev)  # logp sum, correct, count
        for ids, n_prompt, n_ans in encoded:
            logits = teacher(input_ids=ids, use_cache=False).logits[0].float()
            logp = torch.log_softmax(logits[n_prompt - 1:n_prompt - 1 + n_ans], -1)
            target = ids[0, n_prompt:n_prompt + n_ans]
            tot[0] += logp.gather(-1, target[:, None]).sum().double()
            tot[1] += float(bool((logp.argmax(-1) == target).all()))  # greedy gives the whole answer
            tot[2] += 1
        tot = _sum_reduce(tot)
        return float(tot[0] / tot[2]), float(tot[1] / tot[2])

    base_lp, base_acc = score_now()
    scores, acc = {}, {}
    for l, layer in enumerate(teacher.model.layers):
        def zero(module, args, kwargs, output):
            return (torch.zeros_like(output[0]), *output[1:])

        h = layer.self_attn.register_forward_hook(zero, with_kwargs=True)
        try:
            lp, a = score_now()
        finally:
            h.remove()
        scores[l], acc[str(l)] = base_lp - lp, a
        log.info("%s layer %d: log-prob drop %.3f, accuracy %.3f (teacher %.3f)", "ar_multihop" if multihop else "ar",
                 l, scores[l], a, base_acc)
    return scores, {"teacher_logprob": base_lp, "teacher_accuracy": base_acc, "ablated_accuracy": acc,
                    "prompts": sc.ar_prompts, "pairs": sc.ar_pairs}


# ---- output ----------------------------------------------------------------------------------------------------
def plot_selection(selection: dict, path: Path, k: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    L = selection["num_layers"]
    scores = [selection["scores"][str(l)] for l in range(L)]
    base = selection.get("baseline")
    values = [base - v for v in scores] if (base is not None and selection["lower_is_better"]) else scores
    chosen = set(selection["ranking"][:k])
    uniform = set(uniform_layers(L, k))
    fig, ax = plt.subplots(figsize=(max(6, L * 0.3), 3.5))
    colors = ["tab:red" if l in chosen else "tab:gray" for l in range(L)]
    ax.bar(range(L), values, color=colors)
    for l in uniform:
        ax.plot(l, 0, marker="^", color="tab:blue", markersize=7, clip_on=False)
    ylabel = "KL reduction vs all-linear" if (base is not None and selection["lower_is_better"]) else "score"
    ax.set(xlabel="layer", ylabel=ylabel, title=f"{selection['method']}: top-{k} in red, uniform-{k} marked ▲")
    ax.set_xticks(range(0, L, max(1, L // 15)))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_select(cfg: RunConfig, force: bool = False) -> Path | None:
    from ds_hybrid.teacher import check_vocab, load_teacher_config, load_tokenizer, resolve_teacher

    D.init_distributed(cfg.dist_timeout_minutes)
    setup_logging()
    sc = cfg.select
    out = cfg.stage_dir("select") / sc.method
    target = out / "selection.json"
    if target.is_file() and not force:
        log.info("selection %s exists; nothing to do", target)
        return target
    teacher_path = D.broadcast_object(resolve_teacher(cfg.teacher) if D.is_main() else None)
    teacher_config = load_teacher_config(teacher_path)
    tokenizer = load_tokenizer(teacher_path)
    check_vocab(teacher_config, tokenizer)
    L = teacher_config.num_hidden_layers
    ks = requested_ks(cfg, L)
    align_dir = cfg.stage_dir("align") / "hf"
    needs_align = sc.method in ("ga_s2", "halving", "proxy", "ppl", "mse")
    if needs_align and not (align_dir / "config.json").is_file():
        raise ConfigError("select.method", sc.method, f"needs the align export {align_dir}: run stage align first")
    if sc.reference is not None:
        read_selection(sc.reference, "select.reference")

    extra: dict[str, Any] = {}
    lower = True
    if sc.method == "ga_s2":
        scores, extra = ga_s2(cfg, out, L, align_dir)
        if not scores:
            log.info("this task's probes are done; still missing: %s", ", ".join(extra["missing"]))
            return None
    elif sc.method == "halving":
        scores, extra = halving(cfg, out, L, align_dir)
        idx, n = task_slot(cfg)
        if idx != 0:
            log.info("halving task %d of %d finished its probes; task 0 writes the selection", idx, n)
            return None
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
        from transformers import AutoModelForCausalLM

        from ds_hybrid.stages.common import run_dtype

        dtype, dev = run_dtype(cfg), D.device()
        teacher = AutoModelForCausalLM.from_pretrained(teacher_path, dtype=dtype).to(dev).eval()
        if sc.method in ("ar", "ar_multihop"):
            scores, extra = ar_scores(cfg, teacher, tokenizer, multihop=sc.method == "ar_multihop")
            lower = False
        else:
            import ds_hybrid  # noqa: F401

            student = AutoModelForCausalLM.from_pretrained(align_dir, dtype=dtype).to(dev).eval()
            seq_len = int(sc.probe.get("seq_len", 1024))
            rows = _held_out_rows(cfg, tokenizer, seq_len, sc.eval_sequences)
            n_tok = sum(r.numel() for r in rows) * D.world_size()
            if sc.method == "proxy":
                scores, baseline = proxy_scores(cfg, teacher, student, rows)
                extra = {"baseline": baseline, "tokens_spent": 0, "forward_tokens": n_tok * (L + 1),
                         "budget": {"heldout_sequences": sc.eval_sequences, "seq_len": seq_len}}
            else:
                scores, base_ppl = ppl_scores(teacher, student, rows)
                lower = False
                extra = {"teacher_ppl": base_ppl, "tokens_spent": 0, "forward_tokens": n_tok * (L + 1)}
    ratios = sc.ratios
    selection = make_selection(sc.method, scores, lower, L, ks=sorted(set(sc.ks)), ratios=ratios, **extra)
    if sc.method == "uniform":
        selection["chosen"] = {**{f"k={k}": uniform_layers(L, k) for k in sorted(set(sc.ks))},
                               **{f"ratio={r:g}": uniform_layers(L, k_for_ratio(r, L)) for r in ratios}}
    if sc.method == "smart":
        selection["chosen"] = {**{f"k={k}": smart_layers(L, k) for k in sorted(set(sc.ks))},
                               **{f"ratio={r:g}": smart_layers(L, k_for_ratio(r, L)) for r in ratios}}
    selection["teacher"] = {"path": teacher_path, "fingerprint": folder_fingerprint(teacher_path)}
    if needs_align:
        selection["align"] = {"path": str(align_dir), "fingerprint": folder_fingerprint(align_dir)}
    selection["config_hash"] = _config_hash(cfg)
    if sc.reference is not None:
        ref = read_selection(sc.reference, "select.reference")
        selection["agreement"] = {"reference": sc.reference, "kendall_tau": kendall_tau(selection["ranking"], ref["ranking"]),
                                  "topk_overlap": {str(k): topk_overlap(selection["ranking"], ref["ranking"], k) for k in ks}}
    if D.is_main():
        write_selection(target, selection)
        k_plot = max(ks) if ks else max(1, L // 4)
        plot_selection(selection, out / "selection.png", k_plot)
        _to_tensorboard(out, selection, k_plot)
        chosen = ", ".join(f"{k}: {v}" for k, v in selection["chosen"].items())
        log.info("select %s: ranking %s | %s | tokens spent %s", sc.method, selection["ranking"][:max(ks or [8])],
                 chosen, selection.get("tokens_spent"))
    D.barrier()
    return target


def _config_hash(cfg: RunConfig) -> str:
    import hashlib

    d = cfg.to_dict()
    keep = {k: d[k] for k in ("teacher", "mixer", "mixer_options", "seed", "data", "select")}
    keep["kl"] = d["kl"]
    return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:16]


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
