"""`make demo`'s script (launchers/demo.sh) end to end on CPU: its GPU recipe (run_local.sh for align and kl with
the GA-S2 layers, then ds_hybrid.demo's held-out lines, generations and recall scores) at a tiny budget on the
embedded SmolLM2 teacher. (The CPU recipe is the same two commands on runs/smollm2_quickstart.yaml: 13 minutes.)"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import yaml
from trainer_utils import REPO, make_corpus

pytestmark = pytest.mark.slow


def test_demo_script_trains_prints_generations_and_recall(tmp_path):
    cfg = yaml.safe_load((REPO / "runs" / "smollm2_compare.yaml").read_text())
    tiny = dict(seq_len=64, global_batch=2, micro_batch=1, log_every=1, ckpt_every=0, eval_sequences=2,
                ds_config="ds_configs/single.json", teacher_ds_config="ds_configs/single.json")
    cfg.update(dtype="fp32", data={"source": str(make_corpus(tmp_path / "corpus", n_files=12)), "val_tokens": 4096,
                                   "num_proc": 1, "cache_dir": str(tmp_path / "cache")})
    cfg["align"].update(tiny, tokens=128)
    cfg["kl"].update(tiny, eval_recall=0)
    config = tmp_path / "demo.yaml"
    config.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable, "DEMO_RECIPE": "gpu", "DEMO_CONFIG": str(config),
           "DEMO_OUT": str(out), "DEMO_KL_TOKENS": "128", "DEMO_RECALL_PROMPTS": "2", "DEMO_RECALL_LENGTH": "1024", "NPROC": "1"}
    p = subprocess.run(["bash", "launchers/demo.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    text = p.stdout
    assert re.search(r"align: 1 steps, 128 tokens, held-out \{'loss': ", text), text[-3000:]
    assert re.search(r"kl: 1 steps, 128 tokens, held-out \{.*'kl': ", text), text[-3000:]
    assert "hybrid: gdn mixers, softmax layers [2, 5, 8, 17, 18, 20, 23, 24] of 30" in text
    for name in ("teacher", "hybrid"):  # greedy generations of both models, side by side, for the three prompts
        assert len(re.findall(rf"^ +{name} \| (The capital of France is|A Python list is|To open a file)", text,
                              re.M)) == 3, text[-3000:]
    assert re.search(r"teacher: \d\.\d\d \[\d\.\d\d, \d\.\d\d\] of 2 prompts", text)
    assert re.search(r"hybrid: \d\.\d\d \[\d\.\d\d, \d\.\d\d\] of 2 prompts", text)
    assert re.search(r"demo: \d+ s from the first stage to the recall scores", text)
    assert (out / "kl" / "hf" / "config.json").is_file() and (out / "demo_recall" / "eval.json").is_file()


def test_demo_names_a_run_without_an_export(tmp_path):
    p = subprocess.run([sys.executable, "-m", "ds_hybrid.demo", "--run", str(tmp_path)], cwd=REPO, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 2 and f"no export at {tmp_path / 'kl' / 'hf'}; run the stages first" in p.stderr, p.stderr
