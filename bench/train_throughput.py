"""Training throughput of stages align and kl: tokens/s, MFU, peak memory and where a step's time goes.

One case = one stage run by the real trainer (``run_stage``) of a given source tree, so an older checkout (the
shipped defaults of an earlier commit) and this one are measured by the same code in the same lease:

    # one case, in-process (1 GPU), or under torchrun (2 GPUs); writes a JSON record
    python bench/train_throughput.py one --name kl_new --stage kl --config runs/smollm2_paper.yaml \
        --steps 30 --out /tmp/tp/kl_new.json kl.init_from=teacher
    torchrun --nproc_per_node 2 bench/train_throughput.py one --tree /tmp/old --name kl_old_2gpu ...
    # gather records into one JSON + a markdown table (old vs new per phase)
    python bench/train_throughput.py report /tmp/tp/*.json --out docs/data/train_throughput_h200

What a record holds (rank 0):
- tokens/s and step time: median over the steps after ``--warmup`` (the trainer's own per-step timing, which
  synchronises the GPU at the end of each optimizer step); peak GPU memory and the trainer's memory plan;
- MFU = FLOPs per token x tokens/s / (GPUs x peak), peak = 989 TFLOP/s (H100/H200 dense bf16), FLOPs per token
  (:func:`flops_per_token`): student forward+backward 6 x its matmul parameters, teacher forward 2 x its matmul
  parameters, lm_heads (student 6 H V, teacher 2 H V), causal softmax attention 2 T d_attn per layer forward
  (x3 with backward), and the chunked linear attention 4 C d + 8 d^2 per head per layer forward (C = 64: intra-chunk
  scores and outputs, the state read, update and the delta-rule correction; x3 with backward);
- where the timed steps' GPU time went, without the profiler's host slowdown: a CUDA event at every phase boundary
  of those steps, and each interval between two events (the GPU running what the host launched in between, and
  waiting for it) charged to the phase the host was in (:func:`span_by_phase`): "GPU span" per phase, whose sum is
  the step; span minus the kernel time launched from the phase (next item) is the GPU's idle time in it;
- a per-phase breakdown of the last ``--profile-steps`` steps under torch.profiler: host time in each phase and the
  GPU kernel time launched from it (kernels attributed by the host timestamp of their launch, so backward kernels
  launched from autograd's thread land in "backward"), kernel time by category, kernels per step, and host
  synchronisations (cudaStreamSynchronize / cudaDeviceSynchronize / cudaEventSynchronize, blocking memcpys);
- where the last warm-up step reads the GPU back on the host (:class:`SyncSites`: torch's sync-debug warnings by
  phase and calling line), and the case's ``DS_HYBRID_*`` environment knobs.

Phases: data (rows from the token stream), teacher_forward, student_forward (without the loss), loss (the
vocabulary-wide linear+KL), backward, optimizer (``engine.step``), other (the rest of the stage's step: batch
transfer, metric reductions), step_end (the trainer between steps: sync, logging). Instrumentation wraps the
stage's engines and loss from outside, so it needs no support from the tree measured.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections import defaultdict
from contextlib import contextmanager, nullcontext
from pathlib import Path

from trace_analysis import analyse_trace

PEAK_TFLOPS = 989.0
GDN_CHUNK = 64
PHASES = ("data", "teacher_forward", "student_forward", "loss", "backward", "optimizer", "other", "step_end")


# ---- FLOPs -------------------------------------------------------------------------------------------------------
def flops_per_token(stage: str, teacher_config, softmax_layers: list[int], mixer_params: int, student_params: int,
                    seq_len: int) -> dict[str, float]:
    """Model FLOPs per trained token (see the module docstring). ``student_params``/``mixer_params`` exclude the
    embedding table; the lm_heads are counted separately."""
    c = teacher_config
    H, V, L, T = c.hidden_size, c.vocab_size, c.num_hidden_layers, seq_len
    dh = getattr(c, "head_dim", None) or H // c.num_attention_heads
    d_attn = c.num_attention_heads * dh
    heads = c.num_attention_heads
    n_soft = len(softmax_layers)
    teacher_matmul = _teacher_matmul_params(c)
    attn_fwd = 2.0 * T * d_attn  # causal: QK^T and PV over T/2 keys on average, 2 FLOPs per MAC
    lin_fwd = heads * (4.0 * GDN_CHUNK * dh + 8.0 * dh * dh)
    out = {"teacher_forward": 2.0 * teacher_matmul + L * attn_fwd}
    if stage == "align":  # every layer's mixer forward+backward from the teacher's states
        out["student_fwd_bwd"] = 6.0 * mixer_params + 3.0 * L * lin_fwd
    else:
        out["teacher_forward"] += 2.0 * H * V
        out["student_fwd_bwd"] = 6.0 * student_params + 3.0 * (n_soft * attn_fwd + (L - n_soft) * lin_fwd) + 6.0 * H * V
    out["total"] = out["teacher_forward"] + out["student_fwd_bwd"]
    return out


def _teacher_matmul_params(c) -> float:
    H, I, L = c.hidden_size, c.intermediate_size, c.num_hidden_layers
    dh = getattr(c, "head_dim", None) or H // c.num_attention_heads
    attn = H * dh * (2 * c.num_attention_heads + 2 * c.num_key_value_heads)
    return float(L * (attn + 3 * H * I))


# ---- instrumentation ---------------------------------------------------------------------------------------------
BETWEEN_STEPS = "between_steps"  # the trainer between two stage steps (its sync, metrics, logging): outside dt


class Phases:
    """Host time per phase (exclusive of nested phases), and ``phase::<name>`` ranges for the profiler trace; with
    ``events`` a list, a timing event recorded on the current CUDA stream at every phase boundary, labelled with the
    phase the host is in from there on (the innermost open one)."""

    def __init__(self, event_factory=None) -> None:
        import torch

        self.torch = torch
        self.stack: list[list] = []
        self.host = defaultdict(float)
        self.calls = defaultdict(int)
        self.active = False  # accumulate only in the profiled window
        self.events: list[tuple[object, str, int]] | None = None  # (event, label, step) while the timed steps run
        self.step = 0  # the stage steps begun (the measuring script counts them)
        self.event_factory = event_factory or (lambda: torch.cuda.Event(enable_timing=True))

    def mark(self) -> None:
        if self.events is not None:
            ev = self.event_factory()
            ev.record()
            self.events.append((ev, self.stack[-1][0] if self.stack else BETWEEN_STEPS, self.step))

    @contextmanager
    def phase(self, name: str):
        t0 = time.perf_counter()
        self.stack.append([name, 0.0])
        self.mark()
        try:
            with self.torch.profiler.record_function(f"phase::{name}"):
                yield
        finally:
            dt = time.perf_counter() - t0
            _, child = self.stack.pop()
            self.mark()
            if self.active:
                self.host[name] += dt - child
                self.calls[name] += 1
            if self.stack:
                self.stack[-1][1] += dt

    def wrap(self, obj, attr: str, name: str) -> bool:
        fn = getattr(obj, attr, None)
        if fn is None or getattr(fn, "_phase_wrapped", False):
            return False

        def wrapped(*a, **kw):
            with self.phase(name):
                return fn(*a, **kw)

        wrapped._phase_wrapped = True
        setattr(obj, attr, wrapped)
        return True


SYNC_WARNING = "synchronizing CUDA operation"  # torch.cuda.set_sync_debug_mode("warn")'s message


class SyncSites:
    """Where a step reads the GPU back on the host: with ``torch.cuda.set_sync_debug_mode("warn")`` on, torch warns
    at every synchronizing CUDA operation (``.item()``, ``bool()``, a blocking device-to-host or pageable
    host-to-device copy, ``nonzero``...); each warning is charged to the Python line that called the operation (the
    innermost frame outside torch and this script, with its caller) and to the phase the host was in. Syncs inside
    extensions that do not go through an ATen operation (a library calling ``cudaStreamSynchronize`` itself) are not
    seen; the profiler's counts are."""

    def __init__(self, phases: "Phases", skip: tuple[str, ...] = ("/torch/", "/warnings.py", "train_throughput.py",
                                                                   "/contextlib.py")) -> None:
        self.phases, self.skip = phases, skip
        self.sites: dict[str, int] = defaultdict(int)

    def site(self, frames) -> str:
        own = [f for f in frames if not any(k in f.filename for k in self.skip)]
        if not own:
            return "?"
        names = [f"{'/'.join(Path(f.filename).parts[-2:])}:{f.lineno} {f.name}" for f in own[-2:]]
        return " < ".join(reversed(names))

    def warned(self, message, category, filename, lineno, file=None, line=None) -> None:
        if SYNC_WARNING not in str(message):
            return self._shown(message, category, filename, lineno, file, line)
        import traceback

        phase = self.phases.stack[-1][0] if self.phases.stack else BETWEEN_STEPS
        self.sites[f"{phase}: {self.site(traceback.extract_stack()[:-1])}"] += 1

    @contextmanager
    def recording(self, set_mode=None):
        """Record within the block. ``set_mode``: torch.cuda.set_sync_debug_mode (None: the caller warns itself)."""
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("always")
            self._shown, warnings.showwarning = warnings.showwarning, self.warned
            if set_mode:
                set_mode("warn")
            try:
                yield self
            finally:
                if set_mode:
                    set_mode("default")
                warnings.showwarning = self._shown

    def summary(self) -> dict[str, int]:
        return dict(sorted(self.sites.items(), key=lambda kv: (-kv[1], kv[0])))


def span_by_phase(times_ms: list[float], labels: list[str], steps: list[int]) -> dict[str, float]:
    """GPU ms per step by phase from events at phase boundaries: event i's label is the phase the host was in after
    recording it, so the GPU time up to event i + 1 (the work launched in between, and any wait for it) is that
    phase's. The last interval of every step (to the next step's first event) is ``between_steps``, charged with the
    next step's data to the step it follows. Each phase is averaged over the steps it occurs in (``steps[i]``: event
    i's step), so that ``between_steps`` and data, which the last timed step does not reach, are not diluted."""
    out: dict[str, float] = defaultdict(float)
    seen: dict[str, set[int]] = defaultdict(set)
    for i in range(len(times_ms) - 1):
        out[labels[i]] += times_ms[i + 1] - times_ms[i]
        seen[labels[i]].add(steps[i])
    return {k: round(v / len(seen[k]), 3) for k, v in sorted(out.items())}


def instrument(runner, phases: Phases) -> list[str]:
    """Wrap the stage's teacher, student engine, loss, backward and optimizer step. Returns what was wrapped."""
    done = []
    teacher = getattr(runner, "teacher", None)
    for obj, attr, name in ((teacher, "forward", "teacher_forward"),
                            (runner, "teacher_forward", "teacher_forward"),
                            (runner.engine, "forward", "student_forward"),
                            (getattr(runner.engine, "module", None), "loss_fn", "loss"),
                            (runner.engine, "backward", "backward"),
                            (runner.engine, "step", "optimizer")):
        if obj is not None and phases.wrap(obj, attr, name):
            done.append(f"{type(obj).__name__}.{attr} -> {name}")
    return done


# ---- one case ----------------------------------------------------------------------------------------------------
def run_one(args) -> int:
    tree = Path(args.tree).resolve()
    sys.path.insert(0, str(tree))
    os.chdir(tree)  # relative ds_configs/ and runs/ paths resolve inside the tree measured
    import importlib.util

    import torch

    import ds_hybrid

    if "ds_hybrid.kernels" not in sys.modules and (tree / "kernels" / "__init__.py").is_file():
        # a tree that is not pip-installed: map its top-level kernels/ to ds_hybrid.kernels as the install does
        spec = importlib.util.spec_from_file_location("ds_hybrid.kernels", tree / "kernels" / "__init__.py",
                                                      submodule_search_locations=[str(tree / "kernels")])
        mod = importlib.util.module_from_spec(spec)
        sys.modules["ds_hybrid.kernels"] = mod
        spec.loader.exec_module(mod)
        ds_hybrid.kernels = mod
    from ds_hybrid import data as data_mod
    from ds_hybrid import distributed as D
    from ds_hybrid import trainer as trainer_mod
    from ds_hybrid.config import load_config

    assert Path(data_mod.__file__).resolve().is_relative_to(tree), f"imported {data_mod.__file__}, not {tree}"
    cfg = load_config(args.config, args.overrides)
    s = cfg.stage(args.stage)
    total = args.warmup + args.steps + args.profile_steps
    s.tokens = total * s.global_batch * s.seq_len
    s.ckpt_every, s.export, s.eval_sequences, s.log_every = 0, False, 2, 1
    if hasattr(s, "eval_at_start"):
        s.eval_at_start = False
    cfg.out_dir = str(Path(args.workdir) / args.name)
    if D.is_main() and Path(cfg.out_dir).exists():  # a rerun starts clean (metrics.jsonl is appended to)
        import shutil

        shutil.rmtree(cfg.out_dir)

    phases = Phases()

    def sync():
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    orig_getitem = data_mod.PackedSequences.__getitem__

    def getitem(self, rows):
        with phases.phase("data"):
            return orig_getitem(self, rows)

    data_mod.PackedSequences.__getitem__ = getitem
    state = {"calls": 0, "prof": None, "wrapped": None, "t_exit": None, "trace": None, "events": None,
             "sync_sites": None}
    orig_stage_class = trainer_mod.stage_class
    profile_from = args.warmup + args.steps  # 0-based train_step index where profiling starts
    trace_path = Path(args.workdir) / f"{args.name}.trace.json"

    def start_profile():
        if not args.profile_steps or not D.is_main():
            return
        sync()
        acts = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            acts.append(torch.profiler.ProfilerActivity.CUDA)
        prof = torch.profiler.profile(activities=acts, record_shapes=True)  # (matmuls_by_shape)
        prof.__enter__()
        state["prof"] = prof
        phases.active = True

    def stage_class(name):
        cls = orig_stage_class(name)

        class Measured(cls):
            def setup(self):
                super().setup()
                state["wrapped"] = instrument(self, phases)
                state["runner"] = self

            def train_step(self, micro_batches):
                i = state["calls"]
                if phases.active and state["t_exit"] is not None:
                    phases.host["step_end"] += time.perf_counter() - state["t_exit"]
                    phases.calls["step_end"] += 1
                if i == 0 and profile_from == 0:
                    start_profile()
                phases.step = i
                if i == args.warmup and torch.cuda.is_available() and D.is_main() and args.steps:
                    phases.events = []  # the timed steps: an event at each phase boundary, and one after the last
                # the last warm-up step: where it reads the GPU back on the host (SyncSites)
                sites = SyncSites(phases) if i == args.warmup - 1 and torch.cuda.is_available() and D.is_main() \
                    else None
                with sites.recording(torch.cuda.set_sync_debug_mode) if sites else nullcontext(), \
                        phases.phase("other"):
                    out = super().train_step(micro_batches)
                if sites:
                    state["sync_sites"] = sites.summary()
                state["calls"] = i + 1
                if phases.events is not None and i + 1 == args.warmup + args.steps:
                    state["events"], phases.events = phases.events, None
                if state["prof"] is not None and i + 1 == profile_from + args.profile_steps:
                    sync()
                    phases.active = False
                    state["prof"].__exit__(None, None, None)
                    state["prof"].export_chrome_trace(str(trace_path))
                    state["trace"] = trace_path
                    state["prof"] = None
                elif i + 1 == profile_from:  # the window opens after this step: it holds whole steps, data included
                    start_profile()
                state["t_exit"] = time.perf_counter()
                return out

        Measured.__name__ = cls.__name__
        return Measured

    trainer_mod.stage_class = stage_class
    t0 = time.perf_counter()
    run_dir = trainer_mod.run_stage(cfg, args.stage, force=True)
    wall = time.perf_counter() - t0
    if not D.is_main():
        return 0
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if r.get("split") == "train"]
    timed = [r for r in train if args.warmup < r["step"] <= args.warmup + args.steps]
    runner = state["runner"]
    tc = runner.ctx.teacher_config
    # the stages count the lm_head inside _student_params; flops_per_token adds the lm_heads itself
    student_params = getattr(runner, "_student_params", 0) - tc.vocab_size * tc.hidden_size
    mixer_params = getattr(runner, "_mixer_params", 0)
    fl = flops_per_token(args.stage, tc, runner.ctx.softmax_layers, mixer_params, student_params, s.seq_len)
    world = D.world_size()
    tps = statistics.median(r["tokens_per_s"] for r in timed)
    info = json.loads((run_dir / "run_info.json").read_text())
    rec = {
        "name": args.name, "stage": args.stage, "tree": str(tree), "config": args.config, "overrides": args.overrides,
        "gpus": world, "seq_len": s.seq_len, "global_batch": s.global_batch, "micro_batch": s.micro_batch,
        "tokens_per_step": s.global_batch * s.seq_len,
        "tokens_per_s": round(tps, 1), "tokens_per_s_per_gpu": round(tps / world, 1),
        "step_s_median": round(statistics.median(r["step_time_s"] for r in timed), 4),
        "flops_per_token": fl, "mfu": round(fl["total"] * tps / world / (PEAK_TFLOPS * 1e12), 4),
        "peak_gpu_gib": round(max(r.get("peak_gpu_gib", 0.0) for r in train), 2),
        "memory_plan_total_gib": round(sum(v for k, v in info.get("memory_plan_gib", {}).items()), 2),
        "losses": [r["loss"] for r in train], "wall_s": round(wall, 1), "wrapped": state["wrapped"],
        "versions": info.get("versions"), "git_commit": info.get("git_commit"),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "env": {k: v for k, v in sorted(os.environ.items()) if k.startswith("DS_HYBRID_")},  # the knobs of the case
    }
    if state["sync_sites"] is not None:  # the last warm-up step's host reads of the GPU, by phase and call site
        rec["sync_sites_last_warmup_step"] = state["sync_sites"]
    if state["events"]:  # (the last event closed the last timed step: no between_steps after it)
        evs = state["events"]
        evs[-1][0].synchronize()
        times = [0.0] + [evs[0][0].elapsed_time(e) for e, _, _ in evs[1:]]
        rec["gpu_span_ms_per_step_by_phase"] = span_by_phase(times, [e[1] for e in evs], [e[2] for e in evs])
    if state["trace"] is not None:
        k = args.profile_steps
        rec["profile"] = analyse_trace(state["trace"], k)
        rec["profile"]["host_ms_per_step_by_phase"] = {p: round(phases.host[p] / k * 1e3, 3) for p in PHASES
                                                       if p in phases.host}
        if not args.keep_trace:
            state["trace"].unlink()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rec, indent=1))
    print(json.dumps({k: rec[k] for k in ("name", "tokens_per_s", "mfu", "peak_gpu_gib", "step_s_median")}))
    return 0


# ---- report ------------------------------------------------------------------------------------------------------
def report(paths: list[str], out: str | None) -> str:
    recs = [json.loads(Path(p).read_text()) for p in paths]
    recs.sort(key=lambda r: (r["stage"], r["name"]))
    lines = ["| case | stage | GPUs | seq x micro (global) | tokens/s | per GPU | MFU | step s | peak GiB | plan GiB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in recs:
        lines.append(f"| {r['name']} | {r['stage']} | {r['gpus']} | {r['seq_len']} x {r['micro_batch']} "
                     f"({r['global_batch']}) | {r['tokens_per_s']:,.0f} | {r['tokens_per_s_per_gpu']:,.0f} | "
                     f"{100 * r['mfu']:.1f} % | {r['step_s_median']:.3f} | {r['peak_gpu_gib']:.1f} | "
                     f"{r['memory_plan_total_gib']:.1f} |")
    prof = [r for r in recs if "profile" in r]
    spans = [r for r in recs if r.get("gpu_span_ms_per_step_by_phase")]
    if spans:  # (idle: "-" for a record without a profile; negative where a side stream's kernels, e.g. the teacher
        # overlap's, count as kernel time but run outside the events' stream)
        cols = PHASES[:-1] + (BETWEEN_STEPS,)  # (kernels launched between steps are the profile's step_end)
        lines += ["", "GPU ms per step by phase, timed steps (CUDA events on the step's stream): span / idle (span "
                  "less the profiled steps' kernel time launched from the phase)",
                  "| case | " + " | ".join(cols) + " | span | idle |", "|---|" + "---|" * (len(cols) + 2)]
        for r in spans:
            sp, kern = r["gpu_span_ms_per_step_by_phase"], r.get("profile", {}).get("kernel_ms_per_step_by_phase")
            idle = {c: sp.get(c, 0) - kern.get("step_end" if c == BETWEEN_STEPS else c, 0) for c in cols} if kern \
                else None
            cell = (lambda c: f"{sp.get(c, 0):.1f} / {idle[c]:.1f}") if idle else (lambda c: f"{sp.get(c, 0):.1f} / -")
            lines.append(f"| {r['name']} | " + " | ".join(cell(c) for c in cols) + f" | {sum(sp.values()):.1f} | "
                         + (f"{sum(idle.values()):.1f} |" if idle else "- |"))
    if prof:
        lines += ["", "Per step, ms: host time in each phase / GPU kernel time launched from it",
                  "| case | " + " | ".join(PHASES) + " | kernels | kernel ms | syncs |",
                  "|---|" + "---|" * (len(PHASES) + 3)]
        for r in prof:
            p = r["profile"]
            cells = [f"{p['host_ms_per_step_by_phase'].get(ph, 0):.1f} / "
                     f"{p['kernel_ms_per_step_by_phase'].get(ph, 0):.1f}" for ph in PHASES]
            lines.append(f"| {r['name']} | " + " | ".join(cells) + f" | {p['kernels_per_step']:.0f} | "
                         f"{p['kernel_ms_per_step']:.1f} | {p['host_syncs_per_step']:.0f} |")
        cats = sorted({c for r in prof for c in r["profile"]["kernel_ms_per_step_by_category"]})
        lines += ["", "GPU kernel ms per step by category", "| case | " + " | ".join(cats) + " |",
                  "|---|" + "---|" * len(cats)]
        for r in prof:
            c = r["profile"]["kernel_ms_per_step_by_category"]
            lines.append(f"| {r['name']} | " + " | ".join(f"{c.get(k, 0):.1f}" for k in cats) + " |")
    mms = [r for r in prof if r["profile"].get("matmuls_by_shape")]
    if mms:
        lines += ["", "Matmuls by operator and input shapes (profiled steps; kernels charged to the op that launched "
                  "them): the 12 longest a case", "| case | op | input dims | calls / step | ms / step | TFLOP/s |",
                  "|---|---|---|---|---|---|"]
        for r in mms:
            lines += [f"| {r['name']} | {m['op']} | `{m['input_dims']}` | {m['calls_per_step']:g} | "
                      f"{m['ms_per_step']:.1f} | {m['tflops'] if m['tflops'] is not None else '-'} |"
                      for m in r["profile"]["matmuls_by_shape"][:12]]
    launched = [r for r in prof if r["profile"].get("top_kernels_by_launching_op")]
    if launched:
        lines += ["", "The longest kernels and the operator that launched them (profiled steps): the 12 longest a case",
                  "| case | kernel | launched from | input dims | launches / step | ms / step |",
                  "|---|---|---|---|---|---|"]
        for r in launched:
            lines += [f"| {r['name']} | `{k['kernel'][:60]}` | {k['op']} | `{k['input_dims']}` | "
                      f"{k['launches_per_step']:g} | {k['ms_per_step']:.1f} |"
                      for k in r["profile"]["top_kernels_by_launching_op"][:12]]
    reads = [r for r in recs if r.get("sync_sites_last_warmup_step")]
    if reads:
        lines += ["", "Host reads of the GPU in the last warm-up step (torch's sync-debug warnings): phase: calling "
                  "line < its caller", "| case | reads | phase: site |", "|---|---|---|"]
        for r in reads:
            lines += [f"| {r['name']} | {n} | `{site}` |" for site, n in r["sync_sites_last_warmup_step"].items()]
    text = "\n".join(lines)
    if out:
        Path(out + ".json").write_text(json.dumps(recs, indent=1))
        Path(out + ".md").write_text(text + "\n")
    return text


def plot_losses(paths: list[str], out: str, labels: list[str] | None = None) -> dict[str, float]:
    """Loss per step of several records on one plot (same seed and data order: the curves should coincide within
    bf16 noise); returns the largest relative difference of each record from the first."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = [json.loads(Path(p).read_text()) for p in paths]
    labels = labels or [r["name"] for r in recs]
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(7, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1.4]})
    ref = recs[0]["losses"]
    diffs = {}
    for k, (r, lab) in enumerate(zip(recs, labels)):
        steps = range(1, len(r["losses"]) + 1)
        color = f"C{k}"
        ax.plot(steps, r["losses"], color=color, label=f"{lab} ({r['tokens_per_s'] / 1e3:.0f}k tokens/s)")
        rel = [(b - a) / a for a, b in zip(ref, r["losses"])]
        if k:
            ax2.plot(range(1, len(rel) + 1), [100 * x for x in rel], color=color, label=lab)
            diffs[lab] = max(abs(x) for x in rel)
    ax.set_ylabel("train loss (KL)")
    ax.legend()
    ax2.set_ylabel(f"% vs {labels[0]}")
    ax2.set_xlabel("optimizer step")
    ax2.axhline(0, color="k", lw=0.5)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    return diffs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    one = sub.add_parser("one", help="run one case")
    one.add_argument("--name", required=True)
    one.add_argument("--stage", required=True, choices=("align", "kl"))
    one.add_argument("--config", required=True)
    one.add_argument("--tree", default=str(Path(__file__).resolve().parent.parent),
                     help="source tree to measure (default: this checkout)")
    one.add_argument("--steps", type=int, default=20, help="timed optimizer steps")
    one.add_argument("--warmup", type=int, default=3)
    one.add_argument("--profile-steps", type=int, default=3, help="steps profiled after the timed ones (0: none)")
    one.add_argument("--workdir", default="/tmp/train_throughput")
    one.add_argument("--out", required=True)
    one.add_argument("--keep-trace", action="store_true")
    one.add_argument("overrides", nargs="*")
    pl = sub.add_parser("losses", help="plot the loss curves of records against the first")
    pl.add_argument("records", nargs="+")
    pl.add_argument("--labels", default=None, help="comma-separated labels")
    pl.add_argument("--out", required=True, help="PNG")
    rep = sub.add_parser("report", help="table of records")
    rep.add_argument("records", nargs="+")
    rep.add_argument("--out", default=None, help="prefix for .json and .md")
    args = ap.parse_args(argv)
    if args.cmd == "one":
        return run_one(args)
    if args.cmd == "losses":
        diffs = plot_losses(args.records, args.out, args.labels.split(",") if args.labels else None)
        print(json.dumps({k: round(v, 5) for k, v in diffs.items()}))
        return 0
    print(report(args.records, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
