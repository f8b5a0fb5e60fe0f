"""Quality beyond recall: held-out perplexity, and the KL to the teacher, on the corpus's held-out documents.

Two paths to the same numbers: the fast one never holds a row's [tokens x vocab] logits (the decoder's last hidden
states times the output embedding, chunked: ``losses.chunked_linear_loss``); the reference one reads the model's own
logits (``model(ids).logits``), one row at a time. The fast path is taken only where it equals the model's
logits: an output embedding that is a plain ``Linear`` without bias, no logit transform in the config (softcapping,
logit scales), and, checked on the first row, its logits on a prefix match the model's. Any causal LM is scored, a
GPT-2, a Gemma 2 or a Cohere by the reference path."""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from ds_hybrid.losses import chunked_linear_loss, next_token_labels

log = logging.getLogger("ds_hybrid")

# config fields that transform the LM head's output (Gemma 2: softcapping; Cohere: logit_scale; Granite: a divisor)
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")
CHECK_POSITIONS = 16  # the prefix on which the fast path's logits are compared with the model's


def text_config(model):
    """A model's text configuration (a multimodal model's text model's; a text model's own)."""
    cfg = model.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def plain_head(model) -> bool:
    """Whether the model's logits are, by its structure and config, its decoder's last hidden state times its output
    embedding's weight and nothing else."""
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear) or head.bias is not None:
        return False
    cfg = text_config(model)
    return all(getattr(cfg, a, None) in (None, 1, 1.0) for a in LOGIT_TRANSFORMS)


def _hidden(model, ids: torch.Tensor) -> torch.Tensor:
    return model.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state


def fast_path_ok(model, ids: torch.Tensor) -> bool:
    """:func:`plain_head`, and on a prefix of ``ids`` the hidden-state route gives the model's own logits (within
    the rounding of its dtype)."""
    if not plain_head(model):
        return False
    try:
        prefix = ids[:, :CHECK_POSITIONS]
        ref = model(input_ids=prefix, use_cache=False).logits[0].float()
        fast = _hidden(model, prefix)[0].float() @ model.get_output_embeddings().weight.float().t()
    except Exception:  # (a decoder that does not take input_ids alone, a head of another width: the reference path)
        return False
    tol = 2e-2 * float(ref.abs().max()) + 1e-3
    return bool((fast - ref).abs().max() <= tol)


def _logit_sums(ls: torch.Tensor, lt: torch.Tensor | None, labels: torch.Tensor,
                chunk: int) -> tuple[float, int, float, int]:
    """Sums of next-token CE and KL(p_teacher || p_model) over a row's positions, from its [T, V] logits, in fp32
    and by chunks of positions (as the fast path: CE over labelled positions, KL over all)."""
    ce = kl = 0.0
    for a in range(0, ls.shape[0], chunk):
        s = F.log_softmax(ls[a:a + chunk].float(), -1)
        lab = labels[a:a + chunk]
        valid = lab != -100
        ce += float(-s[valid].gather(1, lab[valid].unsqueeze(1)).sum())
        if lt is not None:
            t = F.log_softmax(lt[a:a + chunk].float(), -1)
            kl += float((t.exp() * (t - s)).sum())
    return ce, int((labels != -100).sum()), kl, ls.shape[0]


@torch.no_grad()
def heldout_quality(model, rows: list[torch.Tensor], teacher=None, chunk: int = 1024,
                    path: str = "auto") -> dict[str, float]:
    """Mean next-token CE (and its exp, perplexity) of ``model`` on ``rows`` ([1, T] token tensors); with a teacher,
    also the mean per-token KL(p_teacher || p_model) over the full vocabulary. Computed in fp32. ``path``: "auto"
    (the fast path where it equals the models' logits, checked per model on the first row), "fast" or
    "reference"."""
    if not rows:
        raise ValueError("no held-out rows to score")
    dev = next(model.parameters()).device
    tdev = next(teacher.parameters()).device if teacher is not None else None
    if path == "auto":
        first = rows[0]
        fast = fast_path_ok(model, first.to(dev)) and (teacher is None or fast_path_ok(teacher, first.to(tdev)))
        if not fast:
            log.info("held-out quality: logits read from the model%s (its LM head is not a plain projection, or "
                     "does not reproduce them)", "s" if teacher is not None else "")
    else:
        fast = path == "fast"
    sums = torch.zeros(4, dtype=torch.float64)
    for r in rows:
        ids = r.to(dev)
        labels = next_token_labels(ids).flatten()
        if fast:
            w_s = model.get_output_embeddings().weight.float()
            h_s = _hidden(model, ids).flatten(0, 1).float()
            h_t = w_t = None
            if teacher is not None:
                w_t = teacher.get_output_embeddings().weight.to(dev).float()
                h_t = _hidden(teacher, r.to(tdev)).flatten(0, 1).to(dev).float()
            _, st = chunked_linear_loss(h_s, w_s, h_t, w_t, labels=labels,
                                        kl_weight=1.0 if teacher is not None else 0.0, ce_weight=1.0, chunk=chunk)
            sums[0] += st.ce_per_token.sum().double().cpu()
            sums[1] += st.n_ce.cpu()
            if st.kl_per_token is not None:
                sums[2] += st.kl_per_token.sum().double().cpu()
                sums[3] += st.n_kl.cpu()
        else:
            ls = model(input_ids=ids, use_cache=False).logits[0]
            lt = teacher(input_ids=r.to(tdev), use_cache=False).logits[0].to(dev) if teacher is not None else None
            ce, n_ce, kl, n_kl = _logit_sums(ls, lt, labels, chunk)
            del ls, lt
            sums += torch.tensor([ce, n_ce, kl, n_kl if teacher is not None else 0], dtype=torch.float64)
    out = {"ce": float(sums[0] / sums[1]), "ppl": float(torch.exp(sums[0] / sums[1])), "tokens": int(sums[1])}
    if teacher is not None:
        out["kl_to_teacher"] = float(sums[2] / sums[3])
    return out
