"""The fast training path against its references (CPU): stacked align mixers vs one by one, compiled blocks vs
eager, the step's one host-to-device copy, micro_batch: auto from the memory plan, and the throughput benchmark."""

from __future__ import annotations

import copy
import json
import sys

import numpy as np
import pytest
import torch
from conftest import tiny_config, tiny_teacher
from trainer_utils import (
    REPO, TRAIN, free_port, make_corpus, make_tiny_teacher, metrics, run, tail, train, train_in_one_process,
    one_process_stage, write_config,
)

from ds_hybrid.config import load_config, validate_for_launch
from ds_hybrid.data import PackedSequences, device_micro_batches, rank_micro_batches, step_rows
from ds_hybrid.errors import ConfigError
from ds_hybrid.modeling.mixers import MixerOptions, build_mixer
from ds_hybrid.modeling import stacked
from ds_hybrid.modeling.stacked import stacked_forward, supports_stacked


@pytest.mark.parametrize("mixer,options", [("gdn", {}), ("gdn", {"use_gate": False, "allow_neg_eigval": True,
                                                                    "qkv_bias": True}),
                                            ("gla", {}), ("gla", {"use_gate": False, "gate_low_rank_dim": 4})])
@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("layout", stacked.ALIGN_LAYOUTS)
def test_stacked_mixers_equal_one_by_one(mixer, options, groups, layout):
    torch.manual_seed(len(options) + len(mixer))
    opts = MixerOptions.from_dict(options)
    # fp64 inputs and weights: the two paths sum in different orders, and in fp32 their gradients differed by 2e-5 on
    # one CPU (summation noise); the fla ops and the gated norm still compute in fp32 inside, which sets the bounds
    mixers = [build_mixer(mixer, 32, 4, 8, i, opts).double() for i in range(3)]
    for m in mixers:  # fresh, distinct weights per layer (the default init leaves biases and norms equal)
        for p in m.parameters():
            torch.nn.init.normal_(p, std=0.2)
    params = [p for m in mixers for p in m.parameters()]
    x = torch.randn(3, 2, 70, 32, dtype=torch.float64, requires_grad=True)  # 70 tokens: chunks of 64 + a ragged one
    ref = torch.stack([m(hidden_states=x[i])[0] for i, m in enumerate(mixers)])
    w = torch.randn_like(ref)
    g_ref = torch.autograd.grad((ref * w).sum(), [x, *params])
    limit = None
    if groups > 1:  # a pass over more elements than the limit runs the rows in groups, each through all 3 layers
        limit = 3 * 70 * stacked._width(mixers, layout)
        assert stacked.row_groups(2, limit, limit) == [range(0, 1), range(1, 2)]
    out = stacked_forward(mixers, x, max_elements=limit, layout=layout)
    g = torch.autograd.grad((out * w).sum(), [x, *params])
    assert supports_stacked(mixers)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-7)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=5e-6)


@pytest.mark.parametrize("heads", [9, 8])
def test_gdn_a_b_projections_as_one_padded_gemm_equal_the_modules(heads):
    torch.manual_seed(heads)
    m = build_mixer("gdn", 4 * heads, heads, 4, 0, MixerOptions.from_dict({})).double()
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(2, 70, 4 * heads, dtype=torch.float64)
    calls = []
    m.a_proj.register_forward_hook(lambda *a: calls.append(1))

    def run(fused: bool):
        m.fuse_ab = fused
        xi = x.clone().requires_grad_(True)
        out = m(hidden_states=xi)[0]
        return out, torch.autograd.grad((out * x[..., :1]).sum(), [xi, *m.parameters()])

    out, grads = run(True)
    assert len(calls) == (1 if heads % 8 == 0 else 0)  # 9 heads: one GEMM of 24 columns, not the modules
    ref, ref_grads = run(False)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_stacked_groups_split_rows_and_every_pass_reads_every_layer(monkeypatch):
    # a compiled pass reused for another group of layers faulted on an H200 (other parameters at other alignments
    # than Inductor compiled for): the groups must split the micro-batch's rows, never the layers
    mixers = [build_mixer("gdn", 32, 4, 8, i, MixerOptions()) for i in range(3)]
    per_row = 3 * 16 * stacked._width(mixers)
    seen = []
    real = stacked._stacked_pass
    monkeypatch.setattr(stacked, "_stacked_pass",
                        lambda ms, x, *a: seen.append((len(ms), tuple(x.shape))) or real(ms, x, *a))
    x = torch.randn(3, 5, 16, 32)
    out = stacked_forward(mixers, x, max_elements=2 * per_row)
    assert seen == [(3, (3, 2, 16, 32)), (3, (3, 1, 16, 32)), (3, (3, 2, 16, 32))]  # rows [0, 2), [2, 3), [3, 5)
    assert out.shape == x.shape
    torch.testing.assert_close(out[:, 2:3], torch.stack([m(hidden_states=x[i, 2:3])[0] for i, m in
                                                         enumerate(mixers)]), rtol=1e-4, atol=1e-5)
    assert stacked.row_groups(4, 10, None) == [range(0, 4)]  # off: one pass
    assert stacked.row_groups(1, 10, 5) == [range(0, 1)]  # a row over the limit is its own group


def test_align_stack_passes_its_row_limit_to_the_stacked_pass(monkeypatch):
    from ds_hybrid.stages.align import MixerStack

    torch.manual_seed(0)
    stack = MixerStack([build_mixer("gdn", 32, 4, 8, i, MixerOptions()) for i in range(3)])
    inputs, targets = [torch.randn(4, 16, 32) for _ in range(3)], [torch.randn(4, 16, 32) for _ in range(3)]
    ref = stack(inputs, targets)  # one by one
    seen = []
    real = stacked.row_groups
    monkeypatch.setattr(stacked, "row_groups", lambda *a: seen.append(a[2]) or real(*a))
    stack.stacked, stack.pass_elements = True, 3 * 16 * stacked._width(list(stack.mixers))  # one row a pass
    torch.testing.assert_close(stack(inputs, targets), ref, rtol=1e-4, atol=1e-6)
    assert seen == [stack.pass_elements]


def test_stacked_pass_limit_from_the_environment(monkeypatch):
    monkeypatch.setenv("DS_HYBRID_ALIGN_PASS_ELEMENTS", "2147483647")
    assert stacked.pass_elements_from_env() == 2**31 - 1
    monkeypatch.delenv("DS_HYBRID_ALIGN_PASS_ELEMENTS")
    assert stacked.pass_elements_from_env() is None
    for bad in ("lots", "0", "-5"):
        monkeypatch.setenv("DS_HYBRID_ALIGN_PASS_ELEMENTS", bad)
        with pytest.raises(ConfigError, match="DS_HYBRID_ALIGN_PASS_ELEMENTS"):
            stacked.pass_elements_from_env()
    # the stacked pass's other two knobs: defaults, values, and a typo refused by name
    for var, read, default, other in (("DS_HYBRID_ALIGN_LAYOUT", stacked.layout_from_env, "split", "one_gemm"),
                                      ("DS_HYBRID_ALIGN_STACKED", stacked.stacked_choice_from_env, "auto", "0")):
        monkeypatch.delenv(var, raising=False)
        assert read() == default
        monkeypatch.setenv(var, other)
        assert read() == other
        monkeypatch.setenv(var, "yes")
        with pytest.raises(ConfigError, match=var):
            read()


def test_split_layout_takes_one_silu_gradient_for_q_k_v():
    """The stacked pass's backward graph (dynamo + AOT autograd, as torch.compile sees it): with one GEMM, the
    gradient of its output concatenates q's, k's and v's SiLU gradients (three expressions that Inductor's pointwise
    concatenation evaluates at every element); with the split layout the three slices' gradients are concatenated as
    they are and go through one SiLU gradient, and a/b's gates have a GEMM (and a concatenation) of their own."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    torch.manual_seed(0)
    mixers = [build_mixer("gdn", 32, 4, 8, i, MixerOptions()) for i in range(3)]
    found = {}
    for layout in stacked.ALIGN_LAYOUTS:
        torch._dynamo.reset()
        graphs = []

        def keep(gm, inputs):
            graphs.append(gm)
            return make_boxed_func(gm.forward)

        fn = torch.compile(lambda x: stacked.stacked_forward(mixers, x, layout=layout),
                           backend=aot_autograd(fw_compiler=lambda gm, _: make_boxed_func(gm.forward),
                                                bw_compiler=keep))
        fn(torch.randn(3, 2, 16, 32, requires_grad=True)).sum().backward()
        nodes = [n for g in graphs for n in g.graph.nodes if n.op == "call_function"]
        cats = [[str(getattr(a, "target", "")) for a in n.args[0]] for n in nodes if "aten.cat" in str(n.target)]
        found[layout] = (sum("silu_backward" in str(n.target) for n in nodes),
                         max(sum("silu_backward" in a for a in c) for c in cats),
                         sum("bmm" in str(n.target) for n in nodes))
    torch._dynamo.reset()
    # (SiLU gradients: q|k|v and the output gate's norm; most SiLU gradients in one concatenation; batched GEMMs)
    assert found == {"one_gemm": (4, 3, 4), "split": (2, 0, 6)}, found


def test_stacked_refuses_what_it_cannot_run():
    opts = MixerOptions.from_dict({"use_short_conv": True})
    assert not supports_stacked([build_mixer("gdn", 32, 4, 8, i, opts) for i in range(2)])
    mixed = [build_mixer("gdn", 32, 4, 8, 0, MixerOptions()), build_mixer("gla", 32, 4, 8, 1, MixerOptions())]
    assert not supports_stacked(mixed)
    with pytest.raises(ValueError, match="one by one"):
        stacked_forward(mixed, torch.randn(2, 1, 8, 32))


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3"])  # gemma3: sliding + global, four norms a layer
def test_compiled_blocks_give_the_same_loss_and_gradients(monkeypatch, family):
    from ds_hybrid.stages.common import compile_blocks
    from ds_hybrid.transfer import build_hybrid

    monkeypatch.setenv("DS_HYBRID_COMPILE_BACKEND", "aot_eager")  # dynamo + autograd tracing, no C++ build
    torch._dynamo.reset()
    eager = build_hybrid(tiny_teacher(family, num_hidden_layers=4), [1], "gdn")
    compiled = copy.deepcopy(eager)
    assert compile_blocks(compiled.model.layers) == 4
    ids = torch.randint(0, 100, (2, 70))
    losses, grads = [], []
    for m in (eager, compiled):
        loss = m(ids).logits.float().log_softmax(-1).mean()
        loss.backward()
        losses.append(loss.detach())
        grads.append([p.grad for p in m.parameters()])
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-6, atol=1e-6)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert list(eager.state_dict()) == list(compiled.state_dict())  # compiled in place: checkpoints unchanged


def test_compile_mode_and_sdpa_knobs_are_checked_and_applied(monkeypatch):
    from ds_hybrid.stages.common import apply_sdpa_choice, compile_options

    assert compile_options() == {"backend": "inductor", "dynamic": False}
    monkeypatch.setenv("DS_HYBRID_COMPILE_MODE", "max-autotune-no-cudagraphs")
    assert compile_options()["mode"] == "max-autotune-no-cudagraphs"
    monkeypatch.setenv("DS_HYBRID_COMPILE_BACKEND", "aot_eager")  # a mode is Inductor's: not passed elsewhere
    assert "mode" not in compile_options()
    monkeypatch.setenv("DS_HYBRID_COMPILE_MODE", "reduce-overhead")  # CUDA graphs: refused, naming the variable
    with pytest.raises(ConfigError, match="DS_HYBRID_COMPILE_MODE"):
        compile_options()
    monkeypatch.setenv("DS_HYBRID_SDPA", "fastest")
    with pytest.raises(ConfigError, match="DS_HYBRID_SDPA"):
        apply_sdpa_choice()
    flags = (torch.backends.cuda.cudnn_sdp_enabled(), torch.backends.cuda.flash_sdp_enabled(),
             torch.backends.cuda.mem_efficient_sdp_enabled(), torch.backends.cuda.math_sdp_enabled())
    try:
        monkeypatch.setenv("DS_HYBRID_SDPA", "flash")
        assert apply_sdpa_choice() == "flash"
        assert (torch.backends.cuda.cudnn_sdp_enabled(), torch.backends.cuda.flash_sdp_enabled(),
                torch.backends.cuda.mem_efficient_sdp_enabled(), torch.backends.cuda.math_sdp_enabled()) == (
                    False, True, False, True)  # the math fallback stays for shapes flash cannot run
    finally:
        torch.backends.cuda.enable_cudnn_sdp(flags[0])
        torch.backends.cuda.enable_flash_sdp(flags[1])
        torch.backends.cuda.enable_mem_efficient_sdp(flags[2])
        torch.backends.cuda.enable_math_sdp(flags[3])


@pytest.mark.parametrize("layers", [3, 12])
def test_compiled_teacher_captures_without_a_compile_per_layer(monkeypatch, layers):
    """Stage align's capture hooks inside compiled teacher blocks: the graphs compiled do not grow with the number
    of layers or steps (12 layers with one compile per block would pass dynamo's recompile limit of 8, leaving the
    rest eager), and the captures equal the eager model's."""
    from torch._dynamo.utils import counters

    from ds_hybrid.stages.common import TeacherTrunk, compile_blocks

    monkeypatch.setenv("DS_HYBRID_COMPILE_BACKEND", "eager")
    torch._dynamo.reset()
    counters.clear()
    teacher = tiny_teacher("llama", num_hidden_layers=layers)
    ids = torch.randint(0, 100, (2, 24))
    ref_h, ref_c = TeacherTrunk(copy.deepcopy(teacher))(ids, capture=True)
    trunk = TeacherTrunk(teacher)
    compile_blocks(teacher.model.layers)
    for _ in range(3):
        h, captured = trunk(ids, capture=True)
    plain, none = trunk(ids)  # a forward without capture after capturing ones: hooks stay silent
    assert counters["stats"]["unique_graphs"] <= 4 and not counters["recompiles"]
    assert len(captured) == layers and none == []
    torch.testing.assert_close(h, ref_h)
    torch.testing.assert_close(plain, ref_h)
    for (x, y), (rx, ry) in zip(captured, ref_c):
        torch.testing.assert_close(x, rx)
        torch.testing.assert_close(y, ry)


def test_held_out_evaluation_compiles_nothing(monkeypatch):
    """The trainer's held-out evaluation runs compiled blocks eagerly: a no-grad forward through them would otherwise
    compile a second set of graphs (checked here too, so that the test can fail), and its result is the eager one."""
    from torch._dynamo.utils import counters

    from ds_hybrid.stages.base import HeldOut
    from ds_hybrid.stages.common import compile_blocks
    from ds_hybrid.trainer import held_out

    monkeypatch.setenv("DS_HYBRID_COMPILE_BACKEND", "eager")  # dynamo's graphs without Inductor's build
    torch._dynamo.reset()
    counters.clear()
    model = tiny_teacher("llama", num_hidden_layers=2)
    ref = copy.deepcopy(model)
    compile_blocks(model.model.layers)
    ids = torch.randint(0, 100, (2, 24))
    model(ids).logits.sum().backward()  # a training step compiles the blocks' graphs
    trained = counters["stats"]["unique_graphs"]

    class Runner:
        def evaluate(self, held):
            with torch.no_grad():
                return {"logit_sum": float(sum(model(b).logits.double().sum() for b in held.rows[:held.real]))}

    rows = HeldOut([ids], [ids], 1)
    got = held_out(Runner(), rows)
    assert counters["stats"]["unique_graphs"] == trained
    with torch.no_grad():
        assert got["logit_sum"] == pytest.approx(float(ref(ids).logits.double().sum()), rel=1e-6)
    Runner().evaluate(rows)  # the same evaluation outside held_out compiles more
    assert counters["stats"]["unique_graphs"] > trained


@pytest.mark.parametrize("n,world", [(16, 1), (16, 2), (3, 2), (16, 3), (16, 24), (1, 8)])
def test_held_out_rows_are_dealt_so_every_world_size_scores_the_same_rows(n, world):
    """Every row once, no row twice (the old split scored len // world rows a rank, dropping the rest or, over more
    ranks than rows, some rows twice), and every rank as many forwards (pads last, not counted)."""
    from ds_hybrid.stages.base import HeldOut, strided_share

    shares = [strided_share(n, r, world) for r in range(world)]
    assert len({len(idx) for idx, _ in shares}) == 1
    assert sorted(i for idx, real in shares for i in idx[:real]) == list(range(n))
    rows = HeldOut.share(PackedSequences(np.arange(n * 4, dtype=np.uint32), 4), 1 % world, world)
    idx, real = shares[1 % world]
    assert rows.real == real and [int(r[0, 0]) // 4 for r in rows.rows] == idx


def test_a_steps_micro_batches_come_from_one_copy():
    stream = np.arange(10 * 8, dtype=np.uint32)
    seqs = PackedSequences(stream, 8)
    rows = step_rows(3, len(seqs), 8, seed=0)
    micro = rank_micro_batches(rows, rank=1, world=2, micro_batch=2)
    got = device_micro_batches(seqs, micro, torch.device("cpu"))
    assert [b.shape for b in got] == [(2, 8), (2, 8)]
    for b, m in zip(got, micro):
        assert torch.equal(b, seqs[m]) and b.dtype == torch.int64


def _counts(stage: str = "kl", **cfg_overrides):
    from ds_hybrid.plan import count_models

    cfg = load_config(None, [f"{k}={v}" for k, v in cfg_overrides.items()])
    return cfg, count_models(tiny_config("llama", vocab_size=2000), cfg, stage, [1])


def test_auto_micro_batch_is_the_largest_divisor_whose_plan_fits():
    from ds_hybrid.plan import AUTO_MEMORY_FRACTION, GIB, auto_micro_batch, make_plan

    cfg, counts = _counts(**{"kl.global_batch": 24, "kl.seq_len": 4096, "kl.ds_config": "ds_configs/single.json",
                             "kl.teacher_ds_config": "ds_configs/single.json"})
    totals = {m: make_plan(cfg, "kl", counts, 1, micro_batch=m).total for m in (1, 2, 3, 4, 6, 8, 12, 24)}
    assert all(totals[a] < totals[b] for a, b in zip(sorted(totals), sorted(totals)[1:]))  # grows with the batch
    for want in (1, 4, 12, 24):  # size the device so that exactly `want` fits
        gib = totals[want] / AUTO_MEMORY_FRACTION / GIB * 1.0001
        assert auto_micro_batch(cfg, "kl", counts, 1, gib) == want
    assert auto_micro_batch(cfg, "kl", counts, 1, 1e-6) == 1  # nothing fits: 1 (the plan then says so)
    assert auto_micro_batch(cfg, "kl", counts, 4, 1e6) == 6  # world 4: a divisor of 24 / 4
    plan = make_plan(cfg, "kl", counts, 1, gpu_gib=totals[4] / AUTO_MEMORY_FRACTION / GIB * 1.0001)
    assert cfg.kl.micro_batch == "auto" and plan.micro_batch == 4 and "micro-batch 4" in plan.table()


def test_a_cpu_runs_plan_has_eager_blocks_and_the_torch_loss_where_auto_picks_them():
    """micro_batch auto on CPU was sized as on a GPU: compiled blocks (compile auto compiles on CUDA only) and the
    Triton kernel's workspace (kl_backend auto runs the torch reference on CPU), up to ~1.5x too large a batch."""
    from ds_hybrid.plan import make_plan

    cfg, counts = _counts(**{"kl.ds_config": "ds_configs/single.json", "kl.micro_batch": 4})
    gpu, cpu = make_plan(cfg, "kl", counts, 1), make_plan(cfg, "kl", counts, 1, on_gpu=False)
    assert cpu.activations > gpu.activations and cpu.kl_workspace > gpu.kl_workspace
    for knobs in ({"compile": True, "kl_backend": "triton"}, {"compile": False, "kl_backend": "torch"}):
        for k, v in knobs.items():  # set explicitly, the same either way
            setattr(cfg.kl, k, v)
        a, b = make_plan(cfg, "kl", counts, 1), make_plan(cfg, "kl", counts, 1, on_gpu=False)
        assert (a.activations, a.kl_workspace) == (b.activations, b.kl_workspace)


def test_auto_micro_batch_needs_a_global_batch_the_ranks_share():
    cfg = load_config(None, ["kl.global_batch=10", "kl.tokens=1e6"])
    validate_for_launch(cfg, "kl", 2)  # 10 = 2 x 5
    with pytest.raises(ConfigError, match=r"kl\.global_batch=10: must be a multiple of the world size 4"):
        validate_for_launch(cfg, "kl", 4)


def test_zero1_with_fp32_accumulation_plans_fp32_gradients():
    from ds_hybrid.plan import make_plan

    cfg, counts = _counts(**{"kl.ds_config": "ds_configs/student_zero1.json", "kl.micro_batch": 1})
    z1 = make_plan(cfg, "kl", counts, 2, dtype_bytes=2)
    # BF16_Optimizer: an fp32 gradient per trainable parameter, and under accumulation (32 / 2 ranks / micro 1) the
    # bf16 ones autograd writes, zeroed between micro-batches, not freed
    assert z1.gradients == (4 + 2) * counts.trainable
    cfg.kl.global_batch = 2  # one micro-batch a step
    assert make_plan(cfg, "kl", counts, 2, dtype_bytes=2).gradients == 4 * counts.trainable
    assert z1.optimizer_states == 12 * counts.trainable // 2  # ZeRO-1 partitions the optimizer states
    cfg.kl.ds_config = "ds_configs/student_zero2.json"
    assert make_plan(cfg, "kl", counts, 2, dtype_bytes=2).gradients == 2 * counts.trainable // 2


@pytest.mark.slow
def test_train_throughput_bench_measures_every_phase(tmp_path, monkeypatch):
    monkeypatch.setenv("DS_HYBRID_SDPA", "auto")  # a knob of the case: in its record
    teacher = make_tiny_teacher(tmp_path / "teacher")
    corpus = make_corpus(tmp_path / "corpus", n_files=12)
    cfg = write_config(tmp_path / "run.yaml", teacher, corpus, tmp_path / "out",
                       kl={"init_from": "teacher", "seq_len": 64, "ds_config": "ds_configs/student_zero1.json",
                           "teacher_ds_config": "ds_configs/single.json"})
    out = tmp_path / "kl.json"
    p = run([sys.executable, "bench/train_throughput.py", "one", "--name", "kl_cpu", "--stage", "kl", "--config",
             str(cfg), "--steps", "2", "--warmup", "1", "--profile-steps", "1", "--workdir", str(tmp_path / "w"),
             "--out", str(out), "kl.micro_batch=auto"])
    assert p.returncode == 0, tail(p)
    rec = json.loads(out.read_text())
    assert rec["tokens_per_s"] > 0 and rec["micro_batch"] == 8 and len(rec["losses"]) == 4
    assert rec["env"]["DS_HYBRID_SDPA"] == "auto"
    host = rec["profile"]["host_ms_per_step_by_phase"]
    for phase in ("data", "teacher_forward", "student_forward", "loss", "backward", "optimizer", "other"):
        assert host[phase] > 0, (phase, host)
    # FLOPs per token by hand for the tiny Llama (hidden 64, 4 layers, 4 heads of 16, 2 KV heads, MLP 128, softmax
    # layer 1 of 4, vocab of the SmolLM2 tokenizer, seq 64): teacher forward + student forward/backward
    V, H, L, T = 49152, 64, 4, 64
    teacher_mm = L * (64 * 16 * (2 * 4 + 2 * 2) + 3 * 64 * 128)
    attn = 2 * T * 64
    lin = 4 * (4 * 64 * 16 + 8 * 16 * 16)
    fl = rec["flops_per_token"]
    assert fl["teacher_forward"] == 2 * teacher_mm + L * attn + 2 * H * V
    student_mm = fl["student_fwd_bwd"] - 3 * (attn + 3 * lin) - 6 * H * V
    assert student_mm > 6 * teacher_mm  # the mixers carry full-width k/v and gates: more than the teacher
    rep = run([sys.executable, "bench/train_throughput.py", "report", str(out), "--out", str(tmp_path / "rep")])
    assert rep.returncode == 0 and "| kl_cpu | kl | 1 |" in rep.stdout, tail(rep)


@pytest.mark.parametrize("nproc", [1, 2])
def test_teacher_overlap_gives_the_same_losses(tmp_path, nproc):
    """kl.teacher_overlap: the next step's teacher forward starts inside this step (on CPU in order, on CUDA on a
    side stream); the losses of every step and the held-out scores are those of the plain path, bit for bit, on one
    rank and on two (each rank prefetches its own rows of the next step: the SmolLM2 configs' default since
    2026-12-05)."""
    teacher = make_tiny_teacher(tmp_path / "teacher")
    corpus = make_corpus(tmp_path / "corpus", n_files=12)
    runs = []
    for overlap in (False, True):
        cfg = write_config(tmp_path / f"o{overlap}.yaml", teacher, corpus, tmp_path / f"out{overlap}",
                           kl={"init_from": "teacher", "seq_len": 64, "tokens": 64 * 4 * 5, "global_batch": 4,
                               "micro_batch": 2, "ckpt_every": 0, "export": False, "teacher_overlap": overlap,
                               "ds_config": "ds_configs/student_zero1.json",
                               "teacher_ds_config": "ds_configs/single.json"})
        runs.append(["--stage", "kl", "--config", str(cfg)])
    plain, overlapped = train_in_one_process(runs, tmp_path / "runs.json", nproc=nproc)
    assert plain.returncode == 0 and overlapped.returncode == 0, tail(plain) + tail(overlapped)
    logs = overlapped.stdout + overlapped.stderr
    assert "teacher_overlap: step 2 uses the teacher forward run during step 1" in logs, logs[-3000:]
    assert "teacher_overlap" not in plain.stdout + plain.stderr
    for split in ("train", "val"):
        a, b = metrics(tmp_path / "outFalse" / "kl", split), metrics(tmp_path / "outTrue" / "kl", split)
        assert sorted(a) == sorted(b) and len(a) >= (5 if split == "train" else 2)
        for step in a:
            for key in ("loss", "kl", "kl_p90") if split == "train" else ("kl", "ce"):
                assert a[step][key] == b[step][key], (split, step, key)


def test_kl_fp32_logits_default_reaches_a_bf16_stage(tmp_path):
    """kl.fp32_logits is false by default: a bf16 stage's losses come from 16-bit logits, so they differ from those of
    `kl.fp32_logits: true` (the knob reaches the stage) but only by bf16 rounding of the logits (the same math)."""
    teacher = make_tiny_teacher(tmp_path / "teacher")
    corpus = make_corpus(tmp_path / "corpus", n_files=12)
    runs = []
    for name, extra in (("default", {}), ("fp32", {"fp32_logits": True})):
        cfg = write_config(tmp_path / f"{name}.yaml", teacher, corpus, tmp_path / name, dtype="bf16",
                           kl={"init_from": "teacher", "seq_len": 64, "tokens": 64 * 4 * 4, "global_batch": 4,
                               "micro_batch": 2, "ckpt_every": 0, "export": False, "eval_sequences": 2,
                               "ds_config": "ds_configs/student_zero1.json",
                               "teacher_ds_config": "ds_configs/single.json", **extra})
        runs.append(["--stage", "kl", "--config", str(cfg)])
    default, fp32 = train_in_one_process(runs, tmp_path / "runs.json")
    assert default.returncode == 0 and fp32.returncode == 0, tail(default) + tail(fp32)
    a, b = metrics(tmp_path / "default" / "kl"), metrics(tmp_path / "fp32" / "kl")
    assert sorted(a) == sorted(b) and len(a) == 4
    diffs = [abs(a[s]["loss"] - b[s]["loss"]) / abs(b[s]["loss"]) for s in a]
    assert max(diffs) > 0, "kl.fp32_logits changed nothing in a bf16 run"
    assert max(diffs) < 2e-3, diffs


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3"])
def test_unpacked_rows_forwards_read_nothing_on_the_host(family, monkeypatch):
    """Training forwards (no mask, no cache) under unpacked_rows: the same hidden states, and no tensor read back to
    the host (transformers' packed-sequence check was one per forward: a GPU sync)."""
    from transformers import masking_utils

    from ds_hybrid.stages.common import unpacked_rows
    from ds_hybrid.transfer import build_hybrid

    teacher = tiny_teacher(family).eval()
    models = {"teacher": teacher.model, "hybrid": build_hybrid(teacher, [1], "gdn").eval().model}
    ids = torch.randint(0, 100, (2, 24), generator=torch.Generator().manual_seed(0))
    reads = []
    for name in ("__bool__", "item", "tolist"):
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda t, *a, _real=real, **k: reads.append(1) or _real(t, *a, **k))
    found = masking_utils.find_packed_sequence_indices
    for name, model in models.items():
        with torch.no_grad():
            reads.clear()
            ref = model(input_ids=ids, use_cache=False).last_hidden_state
            assert reads, name  # the check this removes (if transformers drops it, this test says so)
            reads.clear()
            with unpacked_rows():
                out = model(input_ids=ids, use_cache=False).last_hidden_state
            assert reads == [], name
        torch.testing.assert_close(out, ref, rtol=0, atol=0)
    assert masking_utils.find_packed_sequence_indices is found
    with pytest.raises(RuntimeError), unpacked_rows():
        raise RuntimeError("restored on errors too")
    assert masking_utils.find_packed_sequence_indices is found


def test_kernel_categories_file_cudnn_attention_as_attention():
    sys.path.insert(0, str(REPO / "bench"))
    try:
        from trace_analysis import kernel_category
    finally:
        sys.path.pop(0)
    assert kernel_category("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7_64x128x64") == "attention"
    assert kernel_category("pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128>>") == "attention"
    assert kernel_category("nvjet_sm90_tst_192x192_64x4_1x2_h_bz_coopB_TNN") == "gemm"
    assert kernel_category("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64") == "gemm"
    assert kernel_category("chunk_gated_delta_rule_fwd_kernel_h_blockdim64") == "linear_attention"
    assert kernel_category("triton_poi_fused__unsafe_view_mul_silu_0") == "compiled"


def test_phase_events_charge_each_gpu_interval_to_the_phase_the_host_was_in():
    """bench/train_throughput.py's CUDA-event spans: an event at every phase boundary, labelled with the innermost
    open phase after it, and each interval to the next event charged to that label (nested phases exclusive)."""
    sys.path.insert(0, str(REPO / "bench"))
    try:
        from train_throughput import BETWEEN_STEPS, Phases, span_by_phase
    finally:
        sys.path.pop(0)

    clock = iter(range(100))

    class FakeEvent:  # an event's "GPU time": when it was recorded, in ticks of 1 ms
        def record(self):
            self.t = float(next(clock))

    ph = Phases(event_factory=FakeEvent)
    with ph.phase("other"):
        pass  # no events: not in the timed steps
    assert ph.events is None
    ph.events = []
    for step in range(2):  # two steps: data, then other { teacher_forward, student_forward { loss }, backward }
        if step:  # (the trainer fetches a step's rows before the step: the first one's before the events began)
            with ph.phase("data"):
                pass
        ph.step = step
        with ph.phase("other"):
            with ph.phase("teacher_forward"):
                pass
            with ph.phase("student_forward"):
                with ph.phase("loss"):
                    pass
            with ph.phase("backward"):
                pass
    labels = [lab for _, lab, _ in ph.events]
    assert labels[:13] == ["other", "teacher_forward", "other", "student_forward", "loss", "student_forward",
                           "other", "backward", "other", BETWEEN_STEPS, "data", BETWEEN_STEPS, "other"]
    times = [e.t - ph.events[0][0].t for e, _, _ in ph.events]
    span = span_by_phase(times, labels, [s for _, _, s in ph.events])
    # per step: 1 tick each in teacher_forward, loss and backward, 2 in student_forward (before and after loss),
    # 4 in other (before teacher, between teacher and student, between student and backward, after backward); data
    # and the two ticks between the steps occur after the first step only: averaged over that one step, not two
    assert span == {"backward": 1.0, BETWEEN_STEPS: 2.0, "data": 1.0, "loss": 1.0, "other": 4.0,
                    "student_forward": 2.0, "teacher_forward": 1.0}
    assert times[-1] == 2 * (1 + 1 + 1 + 2 + 4) + 2 + 1  # the intervals tile the timed window


def test_sync_sites_charge_each_host_read_to_its_caller_and_phase():
    """bench/train_throughput.py's SyncSites: torch's sync-debug warnings (here warned by hand: set_sync_debug_mode
    needs CUDA) are counted by the calling line and its caller and by phase; other warnings still reach the user."""
    import warnings

    sys.path.insert(0, str(REPO / "bench"))
    try:
        from train_throughput import BETWEEN_STEPS, SYNC_WARNING, Phases, SyncSites
    finally:
        sys.path.pop(0)

    def read_back():  # what torch does at .item() under set_sync_debug_mode("warn")
        warnings.warn(f"called a {SYNC_WARNING}", UserWarning)

    def optimizer_step():
        for _ in range(2):  # one call site, twice
            read_back()

    ph = Phases()
    shown = []
    real = warnings.showwarning
    warnings.showwarning = lambda message, *a, **k: shown.append(str(message))
    try:
        with SyncSites(ph).recording() as sites:
            with ph.phase("optimizer"):
                optimizer_step()
            read_back()  # between steps
            warnings.warn("an unrelated warning")
    finally:
        warnings.showwarning = real
    got = sites.summary()
    assert list(got.values()) == [2, 1] and shown == ["an unrelated warning"]
    key, between = list(got)
    assert key.startswith("optimizer: tests/test_throughput.py:") and key.endswith(" optimizer_step"), key
    assert " read_back < tests/test_throughput.py:" in key
    assert between.startswith(f"{BETWEEN_STEPS}: ") and " read_back < " in between, between


def test_matmuls_by_shape_charge_kernels_to_the_op_that_launched_them():
    """bench/trace_analysis.py's matmul breakdown on a synthetic trace: kernels (a GEMM and its split-K reduction)
    go to the leaf matmul op whose host range holds their launch, on the launching thread; FLOPs from the shapes."""
    sys.path.insert(0, str(REPO / "bench"))
    try:
        from trace_analysis import kernel_ops, matmul_flops, matmuls_by_shape
    finally:
        sys.path.pop(0)

    def op(name, tid, ts, dur, dims):
        return {"cat": "cpu_op", "name": name, "tid": tid, "ts": ts, "dur": dur, "args": {"Input Dims": dims}}

    def launch(tid, ts, corr):
        return {"cat": "cuda_runtime", "name": "cudaLaunchKernel", "tid": tid, "ts": ts, "args": {"correlation": corr}}

    def kernel(corr, dur):
        return {"cat": "kernel", "name": f"k{corr}", "ts": 0, "dur": dur, "args": {"correlation": corr}}

    logits = [[1024, 576], [576, 49152]]
    dw = [[49152, 576], [49152, 1024], [1024, 576], [], []]  # addmm_(self, dz^T, h)
    ev = [op("aten::linear", 1, 0, 1000, [[1024, 576]]), op("aten::mm", 1, 100, 100, logits),  # two steps of each
          op("aten::mm", 1, 300, 100, logits), launch(1, 150, 1), launch(1, 160, 2), launch(1, 350, 3),
          kernel(1, 900), kernel(2, 100), kernel(3, 1000),  # a GEMM and its reduction, then a second call
          op("aten::addmm_", 2, 100, 50, dw), op("aten::addmm_", 2, 500, 50, dw), launch(2, 120, 4),
          launch(2, 520, 5), kernel(4, 2000), kernel(5, 2000),
          launch(1, 700, 6), kernel(6, 5000)]  # launched outside any matmul: not charged
    rows = matmuls_by_shape(kernel_ops(ev), steps=2)
    assert [(r["op"], r["ms_per_step"], r["calls_per_step"]) for r in rows] == [
        ("aten::addmm_", 2.0, 1.0), ("aten::mm", 1.0, 1.0)]
    assert rows[1]["input_dims"] == logits
    assert rows[1]["tflops"] == round(2 * 1024 * 576 * 49152 / 1e-3 / 1e12, 1)
    assert rows[0]["tflops"] == round(2 * 49152 * 1024 * 576 / 2e-3 / 1e12, 1)
    assert matmul_flops("aten::bmm", [[30, 512, 576], [30, 576, 2328]]) == 2.0 * 30 * 512 * 576 * 2328
    assert matmul_flops("aten::baddbmm", [[30, 1, 64], [30, 512, 16], [30, 16, 64], [], []]) == 2.0 * 30 * 512 * 16 * 64
    assert matmul_flops("aten::addmm", [[64], [8, 32], [32, 64], [], []]) == 2.0 * 8 * 32 * 64  # a 1-D bias first
    assert matmul_flops("aten::addmm", [[64], [8, 32], [32, 64], [], [], [8, 64]]) == 2.0 * 8 * 32 * 64  # out=
    assert matmul_flops("aten::mm", [[8, 32]]) is None
    assert matmuls_by_shape(kernel_ops([kernel(1, 5)]), steps=1) == []  # no shapes recorded: nothing


def test_kernels_by_launching_op_find_the_innermost_enclosing_op():
    """The launching-op lookup walks nested host ranges: a launch inside a leaf op is that op's, a launch after a
    sibling ended is the enclosing op's, a launch outside every op is '-'."""
    sys.path.insert(0, str(REPO / "bench"))
    try:
        from trace_analysis import kernel_ops, kernels_by_launching_op
    finally:
        sys.path.pop(0)

    def op(name, ts, dur, dims=None):
        return {"cat": "cpu_op", "name": name, "tid": 7, "ts": ts, "dur": dur, "args": {"Input Dims": dims}}

    ev = [op("aten::zeros", 0, 100, [[4, 8]]), op("aten::zero_", 10, 80, [[4, 8]]), op("aten::fill_", 20, 60, [[4, 8]]),
          op("MyBlock", 200, 500), op("aten::mul", 210, 10, [[4], [4]]), op("aten::add", 230, 10, [[4], [4]])]
    for corr, ts in ((1, 50), (2, 300), (3, 900), (4, 215)):
        ev.append({"cat": "cuda_runtime", "name": "cudaLaunchKernel", "tid": 7, "ts": ts,
                   "args": {"correlation": corr}})
    ev += [{"cat": "kernel", "name": name, "ts": 0, "dur": dur, "args": {"correlation": corr}}
           for corr, name, dur in ((1, "FillFunctor", 3000), (2, "triton_poi_fused", 2000), (3, "stray", 1000),
                                   (4, "mul_kernel", 500))]
    rows = {r["kernel"]: (r["op"], r["input_dims"], r["ms_per_step"])
            for r in kernels_by_launching_op(kernel_ops(ev), steps=1)}
    assert rows == {"FillFunctor": ("aten::fill_", [[4, 8]], 3.0), "triton_poi_fused": ("MyBlock", None, 2.0),
                    "stray": ("-", None, 1.0), "mul_kernel": ("aten::mul", [[4], [4]], 0.5)}


def test_sync_free_optimizer_step_equals_deepspeeds_and_reads_nothing(tmp_path):
    """DS_HYBRID_OPTIMIZER_STEP=sync_free (and auto, the default) against DeepSpeed's BF16_Optimizer step
    (tests/optimizer_step_check.py): over the same fused AdamW, the same losses, weights, moments and learning rate
    bit for bit when no step is clipped and when every step is (the norm within fp32 rounding); over torch's default
    AdamW (DeepSpeed's reference path) within fp32 rounding; no host read of device data by DeepSpeed or ds_hybrid
    code in the step (DeepSpeed's: 2 a step); a NaN gradient skipped as DeepSpeed skips it (weights, moments, AdamW's
    step count, the schedule and the skipped count); a checkpoint of DeepSpeed's step resumed under the default, and
    one of the default resumed under DeepSpeed's (its default AdamW back, as the run built it)."""
    out = tmp_path / "steps.json"
    p = run([sys.executable, "tests/optimizer_step_check.py", str(out), str(tmp_path / "ckpt")])
    assert p.returncode == 0, tail(p)
    res = json.loads(out.read_text())
    same = ("losses", "weights", "master", "exp_avg", "exp_avg_sq", "adam_steps", "lr", "skipped_steps")
    for case in ("noclip", "clip"):
        ds, fu, sf, auto = (res[case][c] for c in ("deepspeed", "deepspeed_fused", "sync_free", "auto"))
        assert not ds["replaced"] and not fu["replaced"] and sf["replaced"] and auto["replaced"]
        assert not ds["fused"][0] and fu["fused"] == sf["fused"] == [True, True]
        for key in same if case == "noclip" else ("losses", "weights", "adam_steps", "lr", "skipped_steps"):
            assert sf[key] == fu[key] == auto[key], (case, key)
        for key in ("master", "exp_avg", "exp_avg_sq"):  # clipped: by a coefficient from a norm equal within fp32
            np.testing.assert_allclose(np.concatenate(sf[key]), np.concatenate(fu[key]), rtol=1e-5, atol=1e-8)
        np.testing.assert_allclose(sf["norms"], fu["norms"], rtol=1e-5)
        np.testing.assert_allclose(np.concatenate(sf["master"]), np.concatenate(ds["master"]), rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(sf["losses"], ds["losses"], rtol=1e-5)
        assert ds["reads_per_step"] >= 2 and fu["reads_per_step"] >= 2 and sf["reads_per_step"] == 0, case
        assert sf["lr"] == pytest.approx([1e-2 * 0.8**4] * 2) and sf["skipped_steps"] == 0
    fu = res["nonfinite"]["deepspeed_fused"]
    for sf in (res["nonfinite"]["sync_free"], res["nonfinite"]["auto"]):
        assert sf["finite"] and not np.isfinite(sf["norms"][2]) and sf["settled_skips"] == [False, False, True, False]
        for key in ("losses", "weights", "adam_steps", "lr", "skipped_steps"):  # (its last step is clipped: as above)
            assert sf[key] == fu[key], ("nonfinite", key)
        for key in ("master", "exp_avg", "exp_avg_sq"):
            np.testing.assert_allclose(np.concatenate(sf[key]), np.concatenate(fu[key]), rtol=1e-5, atol=1e-8)
    assert not any(res["nonfinite"]["deepspeed"]["settled_skips"])  # (DeepSpeed's own step counted its skip)
    assert fu["skipped_steps"] == 1 and fu["adam_steps"] == [3.0, 3.0] and fu["lr"] == pytest.approx([1e-2 * 0.8**3] * 2)
    assert res["noclip"]["sync_free"]["weights"] != sf["weights"]  # (the NaN step did change the run)
    resumed, ds = res["resume"]["auto"], res["resume"]["deepspeed"]
    assert resumed["replaced"] and resumed["fused"] == [True, True] and resumed["adam_steps"] == ds["adam_steps"]
    np.testing.assert_allclose(resumed["losses"], ds["losses"][2:], rtol=1e-5)
    np.testing.assert_allclose(np.concatenate(resumed["master"]), np.concatenate(ds["master"]), rtol=1e-5, atol=1e-7)
    assert resumed["lr"] == ds["lr"]
    # a checkpoint of the sync-free step (fused AdamW) resumed under DeepSpeed's: its default AdamW again, as built
    back = res["resume"]["deepspeed_after_auto"]
    assert not back["replaced"] and back["loaded_fused"] == [True, True] and back["fused"] == [False, False]
    assert back["steps_on_host"] and "None: fused True -> None" in back["changed"], back["changed"]
    assert back["adam_steps"] == ds["adam_steps"] and back["lr"] == ds["lr"]
    np.testing.assert_allclose(back["losses"], ds["losses"][2:], rtol=1e-5)
    np.testing.assert_allclose(np.concatenate(back["master"]), np.concatenate(ds["master"]), rtol=1e-5, atol=1e-7)


def test_sync_free_step_refuses_an_optimizer_it_does_not_reproduce():
    from types import SimpleNamespace

    from ds_hybrid import sync_free

    engine = SimpleNamespace(optimizer=torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))]))
    assert sync_free.apply_step_choice(engine, "deepspeed") is False
    with pytest.raises(ConfigError, match=r"DS_HYBRID_OPTIMIZER_STEP.*student_zero1.*optimizer is AdamW"):
        sync_free.apply_step_choice(engine, "sync_free")
    assert sync_free.apply_step_choice(engine, "auto") is False  # the default: DeepSpeed's step where this is not


def _kl_runs_by_optimizer_step(tmp_path, monkeypatch, steps: int, spoil_at: int | None = None, nproc: int = 1,
                               **kl) -> tuple:
    """A tiny kl stage (ZeRO-1, bf16) under DeepSpeed's optimizer step and under the default: (its config, what each
    said, each's metrics); ``spoil_at``: a NaN in that optimizer step's gradients (tests/skip_step_check.py, on
    every rank); ``nproc``: ranks (gloo)."""
    teacher = make_tiny_teacher(tmp_path / "teacher")
    corpus = make_corpus(tmp_path / "corpus", n_files=12)
    cfg = write_config(tmp_path / "run.yaml", teacher, corpus, tmp_path / "out", dtype="bf16",
                       kl={"init_from": "teacher", "seq_len": 64, "tokens": 64 * 4 * steps, "global_batch": 4,
                           "micro_batch": 2, "ckpt_every": 0, "export": False, "eval_sequences": 2,
                           "ds_config": "ds_configs/student_zero1.json", "teacher_ds_config": "ds_configs/single.json",
                           **kl})
    said = {}
    for choice in ("deepspeed", "default"):
        if choice == "default":
            monkeypatch.delenv("DS_HYBRID_OPTIMIZER_STEP", raising=False)
        else:
            monkeypatch.setenv("DS_HYBRID_OPTIMIZER_STEP", choice)
        args = ["--stage", "kl", "--config", str(cfg), f"out_dir={tmp_path / choice}"]
        script = [str(TRAIN)] if spoil_at is None else ["tests/skip_step_check.py", str(spoil_at)]
        launch = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node",
                                                      str(nproc), "--master_port", str(free_port())]
        p = run([*launch, *script, *args])
        assert p.returncode == 0, tail(p)
        said[choice] = p.stderr + p.stdout
    return cfg, said, metrics(tmp_path / "deepspeed" / "kl"), metrics(tmp_path / "default" / "kl")


def test_sync_free_step_reaches_a_kl_stage(tmp_path, monkeypatch):
    """The default (auto) reaches stage kl's engine (ZeRO-1, bf16) with the sync-free step: the run says so and its
    losses and learning rates equal those of DeepSpeed's step (over torch's default AdamW: within fp32 rounding; the
    tiny student's gradient norm stays under the clip); a bad value is refused by name before any model."""
    cfg, said, a, b = _kl_runs_by_optimizer_step(tmp_path, monkeypatch, steps=4)
    assert "DS_HYBRID_OPTIMIZER_STEP=auto: the optimizer step reads nothing on the host" in said["default"]
    assert "reads nothing on the host" not in said["deepspeed"]
    assert len(a) == 4 and list(a) == list(b)
    np.testing.assert_allclose([b[s]["loss"] for s in a], [a[s]["loss"] for s in a], rtol=1e-5)
    assert [b[s]["lr"] for s in a] == [a[s]["lr"] for s in a]
    monkeypatch.setenv("DS_HYBRID_OPTIMIZER_STEP", "fast")
    bad = train("kl", cfg, f"out_dir={tmp_path / 'bad'}", nproc=1)
    assert bad.returncode != 0 and "DS_HYBRID_OPTIMIZER_STEP" in bad.stderr + bad.stdout
    assert "kl step" not in bad.stderr + bad.stdout and "bf16_optimizer" not in bad.stderr + bad.stdout


@pytest.mark.parametrize("nproc", [1, 2])
def test_a_non_finite_gradient_norm_skips_the_step_as_deepspeed_does_in_a_kl_stage(tmp_path, monkeypatch, nproc):
    """A NaN in the reduced gradients of the second optimizer step (tests/skip_step_check.py), a cosine schedule
    that changes the lr every step: under the default (the sync-free step) the trainer logs what DeepSpeed's step
    gives: the same losses (within fp32 rounding: foreach against fused AdamW), a non-finite norm at that step, the
    schedule held there (its lr logged equals the step before's, every lr equals DeepSpeed's run's), and the run says
    it skipped. On two ranks too (each holds the reduced gradients and takes the same decision from them)."""
    _, said, a, b = _kl_runs_by_optimizer_step(tmp_path, monkeypatch, steps=5, spoil_at=2, nproc=nproc,
                                               schedule="cosine", warmup_steps=0)
    assert "reads nothing on the host" in said["default"] and "skipped an optimizer step" in said["default"]
    assert list(a) == list(b) == [1, 2, 3, 4, 5]
    assert not np.isfinite(a[2]["grad_norm"]) and not np.isfinite(b[2]["grad_norm"])
    assert all(np.isfinite(b[s]["grad_norm"]) for s in (1, 3, 4, 5))
    np.testing.assert_allclose([b[s]["loss"] for s in b], [a[s]["loss"] for s in a], rtol=1e-5)
    assert [b[s]["lr"] for s in b] == [a[s]["lr"] for s in a] 
    # each step logs the lr it used (read before it): the skipped step 2 held the schedule, so step 3 used step 2's
    assert b[1]["lr"] != b[2]["lr"] == b[3]["lr"] != b[4]["lr"]
    assert {k: v for k, v in b[2].items() if k.startswith("lr")} == {k: v for k, v in a[2].items() if k.startswith("lr")}
    # the count is logged by both steps alike: 0 before the spoiled step, 1 from it on
    assert [a[s]["skipped_steps"] for s in a] == [b[s]["skipped_steps"] for s in b] == [0, 1, 1, 1, 1]


def test_align_stage_runs_both_stacked_layouts_to_the_same_losses(tmp_path, monkeypatch):
    """Stage align with its stacked pass forced on CPU (fp32, ZeRO-1): DS_HYBRID_ALIGN_LAYOUT reaches the stack (its
    log line says which) and both layouts give the same training losses as the mixers one by one."""
    teacher = make_tiny_teacher(tmp_path / "teacher")
    corpus = make_corpus(tmp_path / "corpus", n_files=12)
    cfg = write_config(tmp_path / "run.yaml", teacher, corpus, tmp_path / "out", dtype="fp32",
                       align=one_process_stage(3))
    losses = {}
    for stacked_mode, layout in (("0", "split"), ("1", "one_gemm"), ("1", "split")):
        monkeypatch.setenv("DS_HYBRID_ALIGN_STACKED", stacked_mode)
        monkeypatch.setenv("DS_HYBRID_ALIGN_LAYOUT", layout)
        name = f"{stacked_mode}_{layout}"
        p = train("align", cfg, f"out_dir={tmp_path / name}", nproc=1)
        assert p.returncode == 0, tail(p)
        said = "one by one" if stacked_mode == "0" else f"in one stacked pass (layout {layout}"
        assert f"align: 4 mixers {said}" in p.stdout + p.stderr
        m = metrics(tmp_path / name / "align")
        losses[name] = [m[s]["loss"] for s in sorted(m)]
    ref = losses.pop("0_split")
    assert len(ref) == 3
    for name, got in losses.items():
        np.testing.assert_allclose(got, ref, rtol=1e-5, err_msg=name)


@pytest.mark.parametrize("tie", [True, False])
def test_the_logged_mfu_counts_the_lm_heads_that_run(tie):
    """MFU's matmul parameters (stages' flops_per_token): never the embedding rows (a lookup); the LM head where it
    runs: kl's teacher computes its logits in the loss (a tied head was dropped with the embedding: ~5 % low on
    SmolLM2), align's teacher trunk has no head (an untied one was counted)."""
    from ds_hybrid.stages.common import count_params, matmul_params

    model = tiny_teacher("llama", tie_word_embeddings=tie)
    cfg = model.config
    emb = cfg.vocab_size * cfg.hidden_size
    body = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n and "lm_head" not in n)
    assert count_params(model) == body + emb * (1 if tie else 2)
    assert matmul_params(model, cfg, lm_head_runs=True) == body + emb
    assert matmul_params(model, cfg, lm_head_runs=False) == body
