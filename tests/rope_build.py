"""Run under torchrun (one rank is enough): build the frozen teacher engine and the stage-0 hybrid student exactly
as stage kl does, in bf16 under the given ZeRO stage, and write every rotary embedding's inverse-frequency buffers
(dtype and values) of both. Used by tests/test_scale.py.

    python -m torch.distributed.run --nproc_per_node 1 tests/rope_build.py <teacher_dir> zero2|zero3 <out.json>
"""

from __future__ import annotations

import json
import sys


def main() -> None:
    teacher_dir, zero, out = sys.argv[1:4]
    from ds_hybrid import distributed as D
    from ds_hybrid.config import load_config, stage_steps
    from ds_hybrid.stages.base import StageContext, build_teacher_engine, load_hybrid
    from ds_hybrid.teacher import load_teacher_config, load_tokenizer

    D.init_distributed(10)
    teacher_ds = "ds_configs/teacher_zero3.json" if zero == "zero3" else "ds_configs/single.json"
    cfg = load_config(None, [f"teacher={teacher_dir}", "softmax_layers=[0,2]", "dtype=bf16",
                             f"kl.ds_config=ds_configs/student_{zero}.json", f"kl.teacher_ds_config={teacher_ds}",
                             "kl.global_batch=1", "kl.micro_batch=1", "kl.seq_len=16", "kl.tokens=16"])
    ctx = StageContext(cfg=cfg, stage="kl", s=cfg.kl, tokenizer=load_tokenizer(teacher_dir), teacher_path=teacher_dir,
                       teacher_config=load_teacher_config(teacher_dir), softmax_layers=[0, 2],
                       total_steps=stage_steps(cfg.kl), run_dir=None)
    teacher = build_teacher_engine(ctx)
    student = load_hybrid(ctx, "teacher", "kl.init_from")

    def freqs(model) -> dict:
        return {name.split("rotary_emb.")[-1]: {"dtype": str(b.dtype), "values": b.double().tolist()}
                for name, b in model.named_buffers() if name.endswith("inv_freq")}

    weights = {str(p.dtype) for p in student.parameters()}
    with open(out, "w") as f:
        json.dump({"teacher": freqs(teacher.module), "student": freqs(student), "student_weights": sorted(weights)}, f)
    D.shutdown()


if __name__ == "__main__":
    main()
