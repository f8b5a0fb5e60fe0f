"""Quality beyond recall: held-out perplexity, and the KL to the teacher, on the corpus's held-out documents."""

from __future__ import annotations

import torch

from ds_hybrid.losses import chunked_linear_loss, next_token_labels


@torch.no_grad()
def heldout_quality(model, rows: list[torch.Tensor], teacher=None, chunk: int = 1024) -> dict[str, float]:
    """Mean next-token CE (and its exp, perplexity) of ``model`` on ``rows`` ([1, T] token tensors); with a teacher,
    also the mean per-token KL(p_teacher || p_model) over the full vocabulary. Computed in fp32."""
    dev = next(model.parameters()).device
    w_s = model.lm_head.weight.float()
    w_t = teacher.lm_head.weight.to(dev).float() if teacher is not None else None
    sums = torch.zeros(4, dtype=torch.float64)
    for r in rows:
        ids = r.to(dev)
        h_s = model.model(input_ids=ids, use_cache=False).last_hidden_state.flatten(0, 1).float()
        h_t = None
        if teacher is not None:
            tdev = next(teacher.parameters()).device
            h_t = teacher.model(input_ids=r.to(tdev), use_cache=False).last_hidden_state.flatten(0, 1).to(dev).float()
        _, st = chunked_linear_loss(h_s, w_s, h_t, w_t, labels=next_token_labels(ids).flatten(),
                                    kl_weight=1.0 if teacher is not None else 0.0, ce_weight=1.0, chunk=chunk)
        sums[0] += st.ce_per_token.sum().double().cpu()
        sums[1] += st.n_ce.cpu()
        if st.kl_per_token is not None:
            sums[2] += st.kl_per_token.sum().double().cpu()
            sums[3] += st.n_kl.cpu()
    out = {"ce": float(sums[0] / sums[1]), "ppl": float(torch.exp(sums[0] / sums[1])), "tokens": int(sums[1])}
    if teacher is not None:
        out["kl_to_teacher"] = float(sums[2] / sums[3])
    return out
