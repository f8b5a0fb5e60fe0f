"""Shared fixtures: tiny random teachers of every supported family (CPU, fp32)."""

from __future__ import annotations

import os

# Our Triton kernels run in Triton's interpreter on CPU; this must be set before anything imports triton.
os.environ.setdefault("TRITON_INTERPRET", "1")

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest
import torch
from transformers import AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

import ds_hybrid  # noqa: F401  (registers the hybrid with the Auto classes)

VOCAB = 101


def tiny_config(family: str, **overrides):
    common = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False,
    )
    if family in ("qwen3", "gemma3"):  # q/k norm; head_dim (32) != hidden / heads (16)
        common["head_dim"] = 32
    common.update(overrides)
    if family == "llama":
        return LlamaConfig(**common)
    if family == "qwen2":  # q/k/v bias; sliding window on the layers >= max_window_layers
        return Qwen2Config(**common, use_sliding_window=True, sliding_window=8, max_window_layers=2)
    if family == "qwen3":
        return Qwen3Config(**common)
    if family == "mistral":  # one sliding window for all layers
        return MistralConfig(**common, sliding_window=8)
    if family == "gemma3":  # sliding + global layers (own RoPE bases), pre/post norms, scaled embedding, tied head
        common.setdefault("layer_types", ["sliding_attention", "sliding_attention", "full_attention",
                                          "sliding_attention"][:common["num_hidden_layers"]])
        common["tie_word_embeddings"] = overrides.get("tie_word_embeddings", True)
        return Gemma3TextConfig(**common, sliding_window=8, query_pre_attn_scalar=24)
    raise ValueError(family)


FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "gemma3")


def tiny_teacher(family: str, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **overrides), attn_implementation="eager")
    return model.eval()


@torch.no_grad()
def greedy_by_reforward(model, ids: torch.Tensor, n: int, never: int | list[int] | None = None) -> torch.Tensor:
    """Greedy decoding by a full forward per token (no cache), the ``never`` ids (e.g. a generation config's
    ``eos_token_id``) excluded: what a cached ``generate(do_sample=False, min_new_tokens=n)`` must equal."""
    never = [] if never is None else [never] if isinstance(never, int) else list(never)
    seq = ids
    for _ in range(n):
        logits = model(seq, use_cache=False).logits[:, -1].float()
        if never:
            logits[:, list(never)] = float("-inf")
        seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], dim=1)
    return seq


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


# `make test` runs two xdist workers, a file at a time each, handed out in collection order: the files that take
# longest go first (measured on 2 cores, 2026-12-01), so that no long file starts last and runs alone at the end.
LONGEST_FIRST = ("test_slurm.py", "test_select.py", "test_trainer.py", "test_eval.py", "test_embedded_teacher.py",
                 "test_demo.py", "test_plan.py", "test_data.py", "test_gemma3.py", "test_model.py",
                 "test_gemma3_teacher.py", "test_scale.py", "test_faults.py", "test_throughput.py")


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file's own order is kept


@pytest.fixture(autouse=True)
def no_process_group_left_behind():
    """A test that initialises a process group in the test process leaves RANK / MASTER_PORT in its environment:
    every training subprocess the worker launches later inherits them and tries to listen on that port (which the
    test process still holds: EADDRINUSE). Fail the test that did it, not the ones after it."""
    keys = ("RANK", "MASTER_PORT")
    before = {k: os.environ.get(k) for k in keys}
    yield
    leaked = {k: os.environ[k] for k in keys if os.environ.get(k) != before[k]}
    assert not leaked, f"the test left {leaked} in the environment (a process group in the test process?)"
