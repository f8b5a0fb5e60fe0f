"""Several runs of ds_hybrid/train.py made by its main() one after another in one Python process (under torchrun:
the same runs in every rank). For short runs a Python start of their own (torch, transformers, DeepSpeed: ~8 s of
CPU) is most of their cost; each run here still gets its own exit code and output, as if it had been a process.

    python tests/train_runs.py <results.json> '<JSON list of train.py argument lists>'
    python -m torch.distributed.run --nproc_per_node 2 tests/train_runs.py <results.json> '<...>'

Rank 0 writes [[returncode, stdout, stderr], ...], one per run. With several ranks the runs stop at the first that
fails (the other ranks would wait for it in a collective); in one process every run is made.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import traceback


def main() -> int:
    out, runs = sys.argv[1], json.loads(sys.argv[2])
    from ds_hybrid.train import main as train_main

    several_ranks = int(os.environ.get("WORLD_SIZE", "1")) > 1
    results = []
    for argv in runs:
        stdout, stderr = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            try:
                code = train_main(argv)
            except Exception:
                traceback.print_exc()
                code = 1
        results.append([code, stdout.getvalue(), stderr.getvalue()])
        if code and several_ranks:
            break
    if int(os.environ.get("RANK", "0")) == 0:
        with open(out, "w") as f:
            json.dump(results, f)
    return max((r[0] for r in results), default=0)


if __name__ == "__main__":
    code = main()
    if code == 0:  # as ds_hybrid/train.py does (gloo's threads torn down at exit abort now and then)
        from ds_hybrid.distributed import shutdown

        shutdown()
    sys.exit(code)
