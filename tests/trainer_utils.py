"""Helpers for trainer tests: a tiny real-tokenizer teacher, a small corpus, run configs, 2-rank launches."""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parent.parent
TRAIN = REPO / "ds_hybrid" / "train.py"


def make_tiny_teacher(out: Path, tie: bool = True, vocab_size: int | None = None, family: str = "llama") -> Path:
    """A 4-layer Llama (hidden 64) with the embedded teacher's tokenizer, saved as a HF folder. ``family="gemma3"``:
    the same sizes as a Gemma 3 text model (layer 2 global, the others sliding with window 32; head_dim 32);
    ``family="qwen2"``: a Qwen2 (q/k/v biases)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, Gemma3TextConfig, LlamaConfig, Qwen2Config

    from ds_hybrid.teacher import embedded_teacher_dir

    tok = AutoTokenizer.from_pretrained(embedded_teacher_dir())
    torch.manual_seed(0)
    kw = dict(vocab_size=vocab_size or len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
              tie_word_embeddings=tie, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    if family == "gemma3":
        cfg = Gemma3TextConfig(**kw, head_dim=32, sliding_window=32, query_pre_attn_scalar=32,
                               layer_types=["sliding_attention", "sliding_attention", "full_attention",
                                            "sliding_attention"], pad_token_id=tok.pad_token_id)
    elif family == "qwen2":
        cfg = Qwen2Config(**kw)
    else:
        cfg = LlamaConfig(**kw)
    model = AutoModelForCausalLM.from_config(cfg)
    # a second stop token, as real teachers have (Gemma 3's end of turn, SmolLM2-Instruct's): exports must keep it
    model.generation_config.eos_token_id = [tok.eos_token_id, tok.eos_token_id + 1]
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def make_corpus(out: Path, n_files: int = 40) -> Path:
    """Real prose: the first Python library docs (Debian python3-doc, what the embedded corpus reads)."""
    from ds_hybrid.corpus import python_docs_files

    out.mkdir(parents=True, exist_ok=True)
    files = [f for f in python_docs_files() if "/library/" in str(f)][:n_files]
    for f in files:
        shutil.copy(f, out / f.name)
    return out


def stage_section(**kw) -> dict:
    base = dict(seq_len=128, global_batch=8, micro_batch=2, log_every=1, ckpt_every=4, eval_sequences=4,
                ds_config="ds_configs/student_zero2.json", teacher_ds_config="ds_configs/teacher_zero3.json")
    base.update(kw)
    return base


def one_process_stage(steps: int, **kw) -> dict:
    """A stage section for one CPU process: steps of 4 x 64 tokens, ZeRO-1 student, plain teacher, no export."""
    base = {"seq_len": 64, "tokens": 64 * 4 * steps, "global_batch": 4, "micro_batch": 4, "ckpt_every": 0,
            "export": False, "eval_sequences": 2, "ds_config": "ds_configs/student_zero1.json",
            "teacher_ds_config": "ds_configs/single.json"}
    return {**base, **kw}


def write_config(path: Path, teacher: Path, corpus: Path, out_dir: Path, **sections) -> Path:
    cfg = {
        "run_name": "t", "out_dir": str(out_dir), "teacher": str(teacher), "softmax_layers": [1],
        "data": {"source": str(corpus), "val_tokens": 4096, "cache_dir": str(path.parent / "data_cache")},
        "align": stage_section(tokens=8 * 128 * 8, lr=3e-3),
        "kl": stage_section(tokens=8 * 128 * 8, loss_chunk_tokens=256),
        "finetune": stage_section(tokens=8 * 128 * 8, lr=1e-3, lr_rest=1e-3, warmup_steps=0),
    }
    for k, v in sections.items():
        cfg[k] = {**cfg[k], **v} if isinstance(v, dict) and isinstance(cfg.get(k), dict) else v
    path.write_text(yaml.safe_dump(cfg))
    return path


def env() -> dict:
    e = dict(os.environ)
    e.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
             HF_DATASETS_OFFLINE="1", PYTHONUNBUFFERED="1")
    return e


def torchrun_cmd(nproc: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
            str(free_port()), str(TRAIN), *args]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cmd: list[str], timeout: int = 600, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env(), cwd=cwd or REPO)


def train(stage: str, config: Path, *overrides: str, nproc: int = 2, timeout: int = 600) -> subprocess.CompletedProcess:
    if nproc == 1:
        cmd = [sys.executable, str(TRAIN), "--stage", stage, "--config", str(config), *overrides]
    else:
        cmd = torchrun_cmd(nproc, "--stage", stage, "--config", str(config), *overrides)
    return run(cmd, timeout)


def train_in_one_process(runs: list[list[str]], out: Path, nproc: int = 1,
                         timeout: int = 600) -> list[subprocess.CompletedProcess]:
    """Runs of train.py (each a list of its arguments) made one after another in one Python process per rank
    (tests/train_runs.py): for runs of a few seconds, a Python start of their own (torch, transformers, DeepSpeed:
    ~8 s of CPU) would be most of their cost. Each run gets its own returncode, stdout and stderr; under several
    ranks, the runs after a failed one are not made (their returncode is None). ``out``: the results file."""
    script = str(REPO / "tests" / "train_runs.py")
    if nproc == 1:
        cmd = [sys.executable, script, str(out), json.dumps(runs)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
               str(free_port()), script, str(out), json.dumps(runs)]
    p = run(cmd, timeout)
    assert out.is_file(), tail(p)
    results = json.loads(out.read_text())
    results += [[None, "", "not run: an earlier run failed"]] * (len(runs) - len(results))
    return [subprocess.CompletedProcess(argv, code, stdout, stderr + (p.stderr if code else ""))
            for argv, (code, stdout, stderr) in zip(runs, results)]


def metrics(run_dir: Path, split: str = "train") -> dict[int, dict]:
    """Last record per step (a resumed run appends the steps it redoes)."""
    out: dict[int, dict] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec["split"] == split:
            out[rec["step"]] = rec
    return out


def tail(p: subprocess.CompletedProcess, n: int = 4000) -> str:
    return (p.stdout[-n:] + "\n----\n" + p.stderr[-n:])


def glob_one(pattern: str) -> Path:
    found = glob.glob(pattern)
    assert len(found) == 1, found
    return Path(found[0])


def write_rank_reports(mine: dict, out: str) -> None:
    """Gather every rank's report; rank 0 writes them as one JSON list (tests/plan_measure.py, scale_build.py)."""
    from ds_hybrid import distributed as D

    everyone = D.all_gather(mine)
    if D.is_main():
        Path(out).write_text(json.dumps(everyone))
