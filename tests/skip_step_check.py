"""ds_hybrid/train.py's main with a NaN put into the reduced fp32 gradients before one optimizer step, whichever
optimizer step the run takes (DeepSpeed's or the sync-free one: both read ``fp32_groups_gradients_flat``), for
tests/test_throughput.py: the trainer's handling of a skipped step end to end.

    python tests/skip_step_check.py <optimizer step (1-based) to spoil> <train.py arguments...>
"""

from __future__ import annotations

import sys


def main() -> int:
    import deepspeed.runtime.engine as E

    spoil_at, argv = int(sys.argv[1]), sys.argv[2:]
    take_step = E.DeepSpeedEngine._take_model_step
    calls = [0]

    def spoiled(self, *args, **kwargs):
        calls[0] += 1
        if calls[0] == spoil_at:
            self.optimizer.fp32_groups_gradients_flat[0][0] = float("nan")
        return take_step(self, *args, **kwargs)

    E.DeepSpeedEngine._take_model_step = spoiled
    from ds_hybrid.train import main as train_main

    return train_main(argv)


if __name__ == "__main__":
    sys.exit(main())
