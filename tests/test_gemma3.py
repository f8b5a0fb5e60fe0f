"""Gemma 3 as a teacher family: the keep-global baseline, selection.json marking the teacher's global layers, the
whole pipeline (align -> select -> kl) on a tiny Gemma 3, and the fused KL kernel at Gemma's 262,144-token vocabulary.
(Transfer, all-softmax == teacher, cached generation and the HF round trip run for every family in test_model.py.)"""

from __future__ import annotations

import json
from functools import partial

import pytest
import torch
from conftest import greedy_by_reforward
from trainer_utils import make_corpus, make_tiny_teacher, tail, train_in_one_process, write_config

from ds_hybrid.errors import ConfigError
from ds_hybrid.layers import global_layers, global_layers_left_linear, keep_global_layers, keep_global_ranking
from ds_hybrid.selection import read_selection

# Gemma-3-270M: 18 layers, every sixth global (5, 11, 17), the rest sliding-window
GEMMA3_270M = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(18)]


def test_keep_global_takes_the_global_layers_first():
    assert global_layers(GEMMA3_270M) == [5, 11, 17]
    assert keep_global_layers(GEMMA3_270M, 3) == [5, 11, 17]
    six = keep_global_layers(GEMMA3_270M, 6)
    assert set(six) > {5, 11, 17} and len(six) == 6
    sliding = [l for l in six if l not in (5, 11, 17)]
    assert sliding == [0, 6, 12]  # uniform over the 15 sliding layers (the 0th, 5th and 10th of them)
    assert keep_global_layers(GEMMA3_270M, 2) == [5, 11]  # K below the global count: uniform among them
    assert keep_global_layers(GEMMA3_270M, 18) == list(range(18))
    order = keep_global_ranking(GEMMA3_270M)
    assert sorted(order[:3]) == [5, 11, 17] and sorted(order) == list(range(18))
    with pytest.raises(ConfigError, match="keep_global.*sliding-window and global"):
        keep_global_ranking(["full_attention"] * 8)


def test_sets_with_room_for_the_global_layers_that_leave_some_linear_are_named():
    chosen = {"k=2": [5, 11], "k=3": [5, 11, 12], "k=6": [0, 3, 5, 9, 11, 12], "ratio=0.167": [5, 11, 17],
              "k=4": [0, 5, 11, 17]}
    # K = 2 has no room for all three; K = 3 and 6 leave layer 17 linear; the others keep all three
    assert global_layers_left_linear(chosen, [5, 11, 17]) == {"k=3": [17], "k=6": [17]}
    assert global_layers_left_linear({"k=3": [0, 6, 12]}, [5, 11, 17]) == {"k=3": [5, 11, 17]}


@pytest.mark.slow
def test_gemma3_pipeline_align_select_kl(tmp_path):
    teacher = make_tiny_teacher(tmp_path / "teacher", family="gemma3")
    corpus = make_corpus(tmp_path / "corpus", n_files=12)
    single = {"ds_config": "ds_configs/single.json", "teacher_ds_config": "ds_configs/single.json", "seq_len": 64}
    cfg = write_config(tmp_path / "run.yaml", teacher, corpus, tmp_path / "out",
                       align={**single, "tokens": 4 * 8 * 64}, kl={**single, "tokens": 2 * 8 * 64},
                       select={"ks": [1, 2], "ratios": [], "eval_sequences": 4, "probe": {"seq_len": 64}})
    spec = json.dumps({"selection": str(tmp_path / "out" / "select" / "keep_global" / "selection.json"), "k": 1})
    # align, select (keep_global, proxy), kl on the keep_global selection: train.py's runs one after another in one
    # process (tests/train_runs.py)
    runs = [("align",), ("select", "select.method=keep_global"), ("select", "select.method=proxy"),
            ("kl", f"softmax_layers={spec}")]
    done = train_in_one_process([["--stage", stage, "--config", str(cfg), *over] for stage, *over in runs],
                                tmp_path / "runs.json")
    for p in done:
        assert p.returncode == 0, tail(p)
    for method in ("keep_global", "proxy"):
        sel = read_selection(tmp_path / "out" / "select" / method / "selection.json")
        assert sel["layer_types"] == ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"]
        assert sel["global_layers"] == [2]
        assert sel["global_kept"]["k=1"] == ([2] if 2 in sel["chosen"]["k=1"] else [])
        assert (tmp_path / "out" / "select" / method / "selection.png").stat().st_size > 0
    assert read_selection(tmp_path / "out" / "select" / "keep_global" / "selection.json")["chosen"]["k=1"] == [2]
    # the proxy's log names the sets that leave the global layer linear (keep_global's never)
    for p, method in zip(done[1:3], ("keep_global", "proxy")):
        left = global_layers_left_linear(read_selection(tmp_path / "out" / "select" / method / "selection.json")
                                         ["chosen"], [2])
        warned = "leave the teacher's global layers [2] linear" in p.stdout + p.stderr
        assert warned == (method == "proxy" and bool(left)), (method, left)
    import ds_hybrid  # noqa: F401
    from transformers import AutoModelForCausalLM

    hybrid = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "kl" / "hf").eval()
    assert hybrid.config.teacher_family == "gemma3_text" and hybrid.config.softmax_layers == [2]
    assert hybrid.config.layer_types == ["linear_attention", "linear_attention", "full_attention", "linear_attention"]
    ids = torch.randint(0, 1000, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.isfinite(hybrid(ids).logits).all()


def test_fused_kl_kernel_at_gemma_vocabulary():
    """V = 262,144 (Gemma 3): the kernel's vocab tiling and offsets against an fp64 reference, the largest logits
    planted in the last tile."""
    from ds_hybrid.kernels import fused_kl
    from ds_hybrid.losses import reference_kl_ce

    N, H, V = 5, 8, 262_144
    g = torch.Generator().manual_seed(0)
    hs, ht = torch.randn(N, H, generator=g, dtype=torch.float64), torch.randn(N, H, generator=g, dtype=torch.float64)
    ws, wt = (torch.randn(V, H, generator=g, dtype=torch.float64) * 0.3 for _ in range(2))
    ws[-3:] *= 8
    wt[-5:] *= 8
    mask = torch.ones(N, dtype=torch.bool)
    h, w = hs.clone().requires_grad_(), ws.clone().requires_grad_()
    r_loss, _ = reference_kl_ce(h, w, ht, wt, mask.double(), None)
    r_loss.backward()
    hf, wf = hs.float().requires_grad_(), ws.float().requires_grad_()
    loss, _ = partial(fused_kl.fused_linear_loss, block_v=16_384)(hf, wf, ht.float(), wt.float(), mask, chunk=4)
    loss.backward()
    assert abs(float(loss) - float(r_loss)) <= 1e-5 * abs(float(r_loss))
    for a, b in ((hf.grad, h.grad), (wf.grad, w.grad)):
        assert float((a.double() - b).norm() / b.norm()) < 1e-5


def gemma3_270m_config(vocab_size: int = 262_144):
    from transformers import Gemma3TextConfig

    rope = {"full_attention": {"rope_type": "default", "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}
    return Gemma3TextConfig(vocab_size=vocab_size, hidden_size=640, intermediate_size=2048, num_hidden_layers=18,
                            num_attention_heads=4, num_key_value_heads=1, head_dim=256, sliding_window=512,
                            query_pre_attn_scalar=256, max_position_embeddings=32768, tie_word_embeddings=True,
                            rope_parameters=rope)


def test_plan_counts_gemma3_270m_and_scales_the_kl_workspace_with_the_vocabulary():
    from ds_hybrid.config import load_config
    from ds_hybrid.plan import count_models, make_plan

    cfg = gemma3_270m_config()
    assert cfg.layer_types == GEMMA3_270M
    rc = load_config(None, ["kl.micro_batch=8", "kl.fp32_logits=true"])  # (16-bit logits: tests/test_plan.py)
    counts = count_models(cfg, rc, "kl", [5, 11, 17])
    assert counts.teacher == 268_098_176  # Gemma-3-270M's published size (170M of it the 262,144 x 640 embedding)
    assert counts.vocab == 262_144
    small = count_models(gemma3_270m_config(49_152), rc, "kl", [5, 11, 17])
    kl_big = make_plan(rc, "kl", counts, 1, 141).kl_workspace
    kl_small = make_plan(rc, "kl", small, 1, 141).kl_workspace
    assert 4.0 < kl_big / kl_small < 262_144 / 49_152 + 0.01  # the logits chunks grow with V; the rest does not
    # the Triton kernel: two fp32 logit blocks, dL/dz written over the student's; the torch reference: four fp32
    # [C, V] workspaces (the logits, log p_s, p_t, dL/dz), whatever the run's dtype
    rt = load_config(None, ["kl.micro_batch=8", "kl.kl_backend=torch", "kl.fp32_logits=true"])
    # beside a bf16 dW, the kernel's fp32 accumulator (4 V H: the 8 x 2048 tokens span several chunks, kl.dw_fp32)
    # and the reference's fp32 copy of W and fp32 dW (8 V H)
    for b in (2, 4):  # bf16 and fp32 runs
        base = make_plan(rc, "kl", counts, 1, 141, dtype_bytes=b).kl_workspace
        fp32_sums = 4 * 262_144 * 640 if b == 2 else 0
        assert make_plan(rt, "kl", counts, 1, 141, dtype_bytes=b).kl_workspace - base == (2 * 1024 * 262_144 * 4
                                                                                            + fp32_sums)


def test_fresh_gemma3_hybrid_keeps_the_mixer_norms_at_one():
    """Gemma 3's init zeroes every "*RMSNorm" (its norms scale by 1 + weight); the mixers' gated norms scale by weight
    and must stay 1, or a fresh linear layer would output zeros."""
    from conftest import tiny_config

    from ds_hybrid.modeling import HybridForCausalLM
    from ds_hybrid.modeling.mixers import GatedRMSNorm
    from ds_hybrid.transfer import hybrid_config

    for mixer in ("gdn", "gla"):
        model = HybridForCausalLM(hybrid_config(tiny_config("gemma3"), [2], mixer))
        norms = [m for m in model.modules() if isinstance(m, GatedRMSNorm)]
        assert len(norms) == 3 and all(torch.equal(n.weight, torch.ones_like(n.weight)) for n in norms)
        teacher_norm = model.model.layers[0].post_attention_layernorm.weight  # the teacher's own: zero-centred
        assert torch.equal(teacher_norm, torch.zeros_like(teacher_norm))


def test_convert_keeps_the_teachers_stop_tokens_and_generates(tmp_path, capsys):
    """Gemma 3 ships a generation_config with two stop tokens and its own "hybrid" cache: the stage-0 hybrid keeps
    the stop tokens (HF's default from the config would know one) and generates with its own cache."""
    import ds_hybrid  # noqa: F401
    from transformers import AutoModelForCausalLM, GenerationConfig

    from ds_hybrid.cli import main

    teacher = make_tiny_teacher(tmp_path / "teacher", family="gemma3")
    GenerationConfig(bos_token_id=1, eos_token_id=[2, 7], pad_token_id=0, do_sample=True, top_k=64, top_p=0.95,
                     cache_implementation="hybrid").save_pretrained(teacher)
    assert main(["convert", "--teacher", str(teacher), "--softmax-layers", "2", "--out", str(tmp_path / "h")]) == 0
    hybrid = AutoModelForCausalLM.from_pretrained(tmp_path / "h").eval()
    gen = hybrid.generation_config
    assert (gen.eos_token_id, gen.top_k, gen.top_p, gen.cache_implementation) == ([2, 7], 64, 0.95, None)
    ids = torch.randint(10, 1000, (1, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = hybrid.generate(ids, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert torch.equal(out, greedy_by_reforward(hybrid, ids, 3, [2, 7]))  # its cache gives the full forward's


def test_a_hybrid_of_a_bf16_gemma3_config_built_at_fp32_keeps_the_exact_embedding_scale():
    """Gemma 3 scales its embeddings by sqrt(hidden) held in a buffer. A teacher config saying bfloat16 (every
    official checkpoint) made the student's inner model a bf16 build: its scale rounded (sqrt(80) = 8.944 ->
    8.9375), kept by the cast to fp32, so an fp32 run's student differed from its teacher before any step."""
    from conftest import tiny_config
    from transformers import AutoModelForCausalLM

    from ds_hybrid.modeling import HybridForCausalLM
    from ds_hybrid.stages.base import with_attn_implementation
    from ds_hybrid.transfer import hybrid_config

    cfg = tiny_config("gemma3", hidden_size=80)
    cfg.dtype = torch.bfloat16
    teacher = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    hybrid = HybridForCausalLM(hybrid_config(cfg, [2], "gdn", {}))
    want = teacher.model.embed_tokens.embed_scale
    got = hybrid.model.embed_tokens.embed_scale
    assert want.dtype == got.dtype == torch.float32 and float(want) == pytest.approx(80 ** 0.5, rel=1e-7)
    assert torch.equal(got, want)
    # the run's attention implementation reaches the hybrid's softmax layers (it reached the teacher only)
    eager = HybridForCausalLM(with_attn_implementation(hybrid_config(cfg, [2], "gdn", {}), "eager"))
    assert eager.model.config._attn_implementation == "eager"
    assert HybridForCausalLM(hybrid_config(cfg, [2], "gdn", {})).model.config._attn_implementation != "eager"
