"""Run under 2 ranks (torchrun): build the frozen teacher engine and the hybrid student exactly as stage kl does, with
ZeRO-3 for both, and report each rank's peak resident memory growth. Used by tests/test_scale.py.

    python -m torch.distributed.run --nproc_per_node 2 tests/scale_build.py <teacher_dir> <align_hf_dir> <out.json>
"""

from __future__ import annotations

import sys
import threading
import time

import psutil


def main() -> None:
    teacher_dir, align_dir, out = sys.argv[1:4]
    from ds_hybrid import distributed as D
    from ds_hybrid.config import load_config, stage_steps
    from ds_hybrid.stages.base import StageContext, build_teacher_engine, load_hybrid
    from ds_hybrid.teacher import load_teacher_config, load_tokenizer

    D.init_distributed(10)
    cfg = load_config(None, [f"teacher={teacher_dir}", "softmax_layers=[0]", "dtype=fp32",
                             "kl.ds_config=ds_configs/student_zero3.json", "kl.teacher_ds_config=ds_configs/teacher_zero3.json",
                             "kl.global_batch=4", "kl.micro_batch=1", "kl.seq_len=16", "kl.tokens=64"])
    ctx = StageContext(cfg=cfg, stage="kl", s=cfg.kl, tokenizer=load_tokenizer(teacher_dir), teacher_path=teacher_dir,
                       teacher_config=load_teacher_config(teacher_dir), softmax_layers=[0], total_steps=stage_steps(cfg.kl),
                       run_dir=None)
    import gc

    gc.collect()
    def anon_rss() -> int:
        """Anonymous resident memory: what the process allocated itself (memory-mapped checkpoint pages, which the
        kernel can drop at any time, are file-backed and not counted)."""
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
        return psutil.Process().memory_info().rss

    base = anon_rss()
    samples = [base]
    stop = threading.Event()

    def sample():  # the peak of the build phase itself (ru_maxrss would include earlier peaks)
        while not stop.is_set():
            samples.append(anon_rss())
            time.sleep(0.005)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    teacher = build_teacher_engine(ctx)
    student = load_hybrid(ctx, align_dir, "kl.init_from")
    stop.set()
    t.join()
    peak = max(samples)
    local_t = sum(p.ds_tensor.numel() for p in teacher.module.parameters())
    local_s = sum(p.ds_tensor.numel() for p in {id(p): p for p in student.parameters()}.values())
    full_t = sum(p.ds_numel for p in teacher.module.parameters())
    mine = {"rank": D.rank(), "base_rss": base, "peak_rss": peak, "growth": peak - base, "local_teacher": local_t, "local_student": local_s,
            "full_teacher": full_t}
    from trainer_utils import write_rank_reports

    write_rank_reports(mine, out)
    D.shutdown()


if __name__ == "__main__":
    main()
