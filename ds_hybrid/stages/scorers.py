"""Stage select's scorers that train nothing: the zero-training proxy (held-out KL with one layer restored), the
perplexity and associative-recall baselines, over held-out rows of the run's corpus. The methods are described in
:mod:`ds_hybrid.stages.select`.
"""

from __future__ import annotations

import logging

import torch

from ds_hybrid import distributed as D
from ds_hybrid.config import RunConfig
from ds_hybrid.errors import ConfigError

log = logging.getLogger("ds_hybrid")


def _held_out_rows(cfg: RunConfig, tokenizer, seq_len: int, n: int, shard: bool = True,
                   len_field: str | None = None) -> list[torch.Tensor]:
    """The first ``n`` held-out rows of ``seq_len`` tokens ([1, seq_len] each): this rank's share, or all of them
    (``len_field``: the setting that gave seq_len, named if the held-out text is shorter)."""
    from ds_hybrid.data import PackedSequences, prepare_streams, row_bos

    streams = prepare_streams(cfg.data, tokenizer, is_main=D.is_main(), barrier=D.wait_for_main, need_tokens=0,
                              from_main=D.wait_for_main)
    val = PackedSequences(streams.val, seq_len, max_rows=n, bos=row_bos(cfg.data.bos, tokenizer))  # (kl's rows)
    if len(val) == 0:
        raise ConfigError("select.probe.seq_len" if len_field is None else len_field, seq_len,
                          "the held-out slice is shorter than one sequence of this length")
    step = D.world_size() if shard else 1
    return [val[[i]] for i in range(D.rank() if shard else 0, len(val), step)]


#: the share of a GPU's free memory the scorers that load models whole may fill (weights and their largest passes'
#: tensors as counted below; the rest: what is not counted, the CUDA context's growth)
WHOLE_MODEL_FRACTION = 0.85


def whole_models_bytes(cfg: RunConfig, teacher_config, dtype: torch.dtype, seq_len: int) -> tuple[int, int]:
    """(weights, largest pass) of the proxy, ppl, ar, ar_multihop and retrieval scorers, which load the teacher
    (proxy and ppl: and the align export beside it) whole on every rank. The pass: ppl's whole-row logits (in the
    run's dtype, as fp32, and cross-entropy's fp32 log-softmax: (e + 8) x T x V bytes); retrieval's eager attention
    of one layer at a time (scores in the run's dtype, fp32 softmax, cast back: (2e + 4) x heads x T^2) beside its
    row's logits (e x T x V); the proxy's and ar's, small beside their weights (chunked KL; prompts of a few hundred
    tokens), not counted. ``seq_len``: ppl's rows (the probes'), retrieval's (``select.retrieval_seq_len``)."""
    from ds_hybrid.plan import count_models

    counts = count_models(teacher_config, cfg, "kl", [])  # the teacher and the all-linear align export (meta device)
    method = cfg.select.method
    e = torch.empty((), dtype=dtype).element_size()
    weights = (counts.teacher + (counts.student if method in ("proxy", "ppl") else 0)) * e
    T, V = seq_len, teacher_config.vocab_size
    if method == "ppl":
        return weights, (e + 8) * T * V
    if method == "retrieval":
        return weights, (2 * e + 4) * teacher_config.num_attention_heads * T * T + e * T * V
    return weights, 0


def check_whole_models_fit(cfg: RunConfig, teacher_config, dtype: torch.dtype, free_bytes: int,
                           seq_len: int = 0) -> int:
    """Refuse, before any model is built, a scorer whose models (:func:`whole_models_bytes`) would not fit
    ``free_bytes`` of one GPU (the least any rank has), naming the methods that shard the teacher instead. Returns
    the bytes counted."""
    from ds_hybrid.plan import GIB

    weights, work = whole_models_bytes(cfg, teacher_config, dtype, seq_len)
    need = weights + work
    if need > WHOLE_MODEL_FRACTION * free_bytes:
        method = cfg.select.method
        what = "the teacher and the align export" if method in ("proxy", "ppl") else "the teacher"
        field, value = (("select.retrieval_seq_len", cfg.select.retrieval_seq_len)
                        if method == "retrieval" and work > weights else ("select.method", method))
        raise ConfigError(field, value,
                          f"select.method={method} loads {what} whole on every GPU: {weights / GIB:.1f} GiB of "
                          f"weights at {str(dtype)[6:]}" + (f" and {work / GIB:.1f} GiB for a row's pass at "
                                                            f"{seq_len:,} tokens" if work else "")
                          + f", more than {WHOLE_MODEL_FRACTION:.0%} of the {free_bytes / GIB:.1f} GiB free on the "
                          "fullest GPU; use select.method=ga_s2 or halving (their probes shard the teacher with "
                          "ZeRO-3), uniform or smart (no model), GPUs with more memory"
                          + (", or shorter rows" if work else ""))
    return need


def _sum_reduce(t: torch.Tensor) -> torch.Tensor:
    if D.world_size() > 1:
        torch.distributed.all_reduce(t)
    return t


@torch.no_grad()
def proxy_scores(teacher, student, rows: list[torch.Tensor],
                 temperature: float = 1.0) -> tuple[dict[int, float], float]:
    """Held-out KL(teacher || align student with layer l restored), for every l, and for none (the baseline), at the
    probes' ``temperature`` (T^2 x KL of the softened distributions, as kl's and GA-S2's probes' held-out KL)."""
    from ds_hybrid.losses import chunked_linear_loss

    dev = D.device()
    hs_t = [teacher.model(input_ids=r.to(dev), use_cache=False).last_hidden_state.flatten(0, 1) for r in rows]

    def kl_now() -> float:
        tot = torch.zeros(2, dtype=torch.float64, device=dev)
        for r, h_t in zip(rows, hs_t):
            h_s = student.model(input_ids=r.to(dev), use_cache=False).last_hidden_state.flatten(0, 1)
            _, st = chunked_linear_loss(h_s, student.lm_head.weight, h_t, teacher.lm_head.weight, chunk=1024,
                                        temperature=temperature)
            tot[0] += st.kl_per_token.sum().double()
            tot[1] += st.n_kl
        tot = _sum_reduce(tot)
        return float(tot[0] / tot[1])

    baseline = kl_now()
    log.info("proxy all-linear: KL %.4f; next, each of the %d layers restored alone (one pass each)", baseline,
             len(student.model.layers))
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
    log.info("ppl teacher: %.3f; next, each of the %d layers' attention replaced by its mixer (one pass each)", base,
             len(teacher.model.layers))
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


# below this share of ar prompts answered right by the teacher, its ablation ranking is not a recall measurement
AR_TRUSTED_ACCURACY = 0.5


@torch.no_grad()
def ar_scores(cfg: RunConfig, teacher, tokenizer, multihop: bool) -> tuple[dict[int, float], dict]:
    """Drop in mean log p(answer | prompt) when layer l's attention output is zeroed (teacher ablation)."""
    from ds_hybrid.recall_tasks import encode_split, make_prompts

    sc = cfg.select
    prompts = make_prompts(sc.ar_prompts, seed=sc.ar_seed, pairs=sc.ar_pairs, multihop=multihop)
    mine = prompts[D.rank()::D.world_size()]
    dev = D.device()
    encoded = []
    for p in mine:
        ids, ans = encode_split(tokenizer, p.text, p.answer)
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
    if base_acc < AR_TRUSTED_ACCURACY and D.is_main():
        log.warning("%s: the teacher answers %.0f %% of its %d prompts right (log p(answer) %.2f): its log-prob drops "
                    "rank how much a layer disturbs the model, not how it recalls. On SmolLM2-135M (0 %%) this "
                    "ranking's hybrids found fewer needles than uniform spacing (docs/RESULTS.md section 2); for such "
                    "a teacher prefer select.method=retrieval (teacher alone) or ga_s2/ppl",
                    "ar_multihop" if multihop else "ar", 100 * base_acc, len(prompts), base_lp)
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


@torch.no_grad()
def retrieval_scores(cfg: RunConfig, teacher, tokenizer) -> tuple[dict[int, float], dict]:
    """Each layer's best head's copy rate on needle prompts made from held-out rows (ds_hybrid.retrieval_heads):
    how often, at a position that predicts an answer token, a head's largest attention weight falls on the needle's
    token that the answer repeats. ``teacher`` must return attention weights (eager attention)."""
    from ds_hybrid.retrieval_heads import CopyCounts, copy_counts, retrieval_prompts

    sc = cfg.select
    seq_len = sc.retrieval_seq_len
    rows = _held_out_rows(cfg, tokenizer, seq_len, sc.retrieval_prompts, shard=False,
                          len_field="select.retrieval_seq_len")
    from ds_hybrid.data import row_bos

    prompts = retrieval_prompts([r[0].tolist() for r in rows], tokenizer, seed=sc.ar_seed,  # the same on every rank
                                bos=row_bos(cfg.data.bos, tokenizer))
    if not prompts:
        raise ConfigError("select.retrieval_prompts", sc.retrieval_prompts, "no held-out row gave a needle prompt "
                          "whose answer tokens occur in its fact; use more rows")
    c = copy_counts(teacher, prompts[D.rank()::D.world_size()])
    dev = D.device()
    sums = _sum_reduce(torch.cat([c.hits.flatten(), c.mass.flatten(),
                                  torch.tensor([c.positions, c.correct, c.total], dtype=torch.float64)]).to(dev))
    n = c.hits.numel()
    positions, correct, total = (int(x) for x in sums[2 * n:].tolist())
    c = CopyCounts(sums[:n].view_as(c.hits).cpu(), sums[n:2 * n].view_as(c.mass).cpu(), positions, correct, total)
    scores = dict(enumerate(c.layer_scores()))
    for l, v in scores.items():
        log.info("retrieval layer %d: best head's copy rate %.3f", l, v)
    return scores, {"tokens_spent": 0, "prompts": len(prompts), "answer_positions": positions, "seq_len": seq_len,
                    "teacher_answer_accuracy": correct / max(total, 1), "copy_rate": c.copy_rate().tolist(),
                    "needle_mass": (c.mass / max(positions, 1)).tolist()}


# ---- output ----------------------------------------------------------------------------------------------------
