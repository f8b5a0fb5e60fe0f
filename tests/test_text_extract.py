"""ds-hybrid extract-text: a multimodal Gemma 3 checkpoint (Gemma3ForConditionalGeneration) -> its language model as a
Gemma3ForCausalLM folder, checked against the multimodal model's own logits on text, and then used as a teacher."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, Gemma3Config, Gemma3ForConditionalGeneration

from ds_hybrid.cli import main as cli
from ds_hybrid.errors import ConfigError
from ds_hybrid.text_extract import extract_text

TEXT = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=2,
            num_key_value_heads=1, head_dim=32, sliding_window=16, max_position_embeddings=512,
            rope_scaling={"factor": 8.0, "rope_type": "linear"},  # as gemma-3-4b's config.json has it
            layer_types=["sliding_attention", "sliding_attention", "sliding_attention", "full_attention"])
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28,
              patch_size=14)


@pytest.fixture(scope="module")
def multimodal(tmp_path_factory) -> tuple[Path, Gemma3ForConditionalGeneration]:
    torch.manual_seed(0)
    cfg = Gemma3Config(text_config=TEXT, vision_config=VISION, mm_tokens_per_image=4, image_token_index=299,
                       boi_token_index=297, eoi_token_index=298, eos_token_id=[1, 106])  # as the -it models
    model = Gemma3ForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # non-trivial norms (fresh Gemma norms are zeros, i.e. scale 1)
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0, 0.2)
    folder = tmp_path_factory.mktemp("mm") / "gemma-3-tiny-it"
    model.save_pretrained(folder)
    (folder / "tokenizer_config.json").write_text(json.dumps({"processor_class": "Gemma3Processor"}))
    return folder, model


def logits_of(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("shard_bytes", [2**31, 40_000])  # one file; many shards with an index
def test_the_language_model_comes_out_whole(multimodal, tmp_path, shard_bytes):
    folder, mm = multimodal
    out = extract_text(folder, tmp_path / "text", shard_bytes=shard_bytes)
    assert (out / "model.safetensors.index.json").is_file() == (shard_bytes < 2**31)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "gemma3_text" and cfg["architectures"] == ["Gemma3ForCausalLM"]
    assert cfg["layer_types"] == TEXT["layer_types"] and cfg["sliding_window"] == 16
    assert cfg["rope_parameters"]["full_attention"]["rope_type"] == "linear"  # global layers' scaling kept
    assert cfg["eos_token_id"] == [1, 106]  # from the top level, where the -it checkpoints keep it
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask  # not mkdtemp's private 0700
    assert (out / "tokenizer_config.json").is_file() and (out / "generation_config.json").is_file()
    text = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(text).__name__ == "Gemma3ForCausalLM"
    ids = torch.randint(0, 290, (2, 40), generator=torch.Generator().manual_seed(1))  # past the window, no image ids
    torch.testing.assert_close(logits_of(text, ids), logits_of(mm, ids), rtol=0, atol=1e-5)
    # the vision tower and the projector stay behind
    n_text = sum(p.numel() for p in text.parameters())
    n_lm = sum(p.numel() for n, p in mm.named_parameters() if "language_model" in n or n.startswith("lm_head"))
    assert n_text == n_lm


def test_the_extracted_folder_is_a_teacher(multimodal, tmp_path):
    folder, mm = multimodal
    out = tmp_path / "text"
    assert cli(["extract-text", "--model", str(folder), "--out", str(out)]) == 0
    from ds_hybrid.transfer import build_hybrid

    teacher = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    hybrid = build_hybrid(teacher, softmax_layers=list(range(4))).eval()  # every layer softmax == the teacher
    ids = torch.randint(0, 290, (1, 24), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(logits_of(hybrid, ids), logits_of(mm, ids), rtol=0, atol=1e-5)
    mixed = build_hybrid(teacher, softmax_layers=[3]).eval()  # the global layer softmax, GDN elsewhere
    assert mixed.config.softmax_layers == [3] and torch.isfinite(logits_of(mixed, ids)).all()


def test_refusals_before_anything_is_written(multimodal, tmp_path):
    folder, _ = multimodal
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "mine.txt").write_text("keep")
    with pytest.raises(ConfigError, match=r"--out.*not empty"):
        extract_text(folder, busy)
    assert [p.name for p in busy.iterdir()] == ["mine.txt"]
    text = extract_text(folder, tmp_path / "text")
    with pytest.raises(ConfigError, match=r"--model.*'gemma3_text'.*a teacher as it is"):
        extract_text(text, tmp_path / "again")
    assert not (tmp_path / "again").exists()
    with pytest.raises(ConfigError, match=r"--shard-gib.*must be positive"):
        extract_text(folder, tmp_path / "z", shard_bytes=0)
    with pytest.raises(ConfigError, match=r"--model.*no config.json"):
        extract_text(tmp_path / "nowhere", tmp_path / "x")
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "config.json").write_text((folder / "config.json").read_text())
    from safetensors.torch import save_file

    save_file({"language_model.model.embed_tokens.weight": torch.zeros(3, 2), "audio_tower.w": torch.zeros(1)},
              str(odd / "model.safetensors"))
    with pytest.raises(ConfigError, match=r"audio_tower.w.*neither the language model's"):
        extract_text(odd, tmp_path / "y")
    assert not (tmp_path / "y").exists() and not any(p.name.startswith(".y-") for p in tmp_path.iterdir())


def test_plan_reads_a_multimodal_config_as_its_language_model(multimodal, tmp_path):
    """`ds-hybrid plan --teacher-config` on a multimodal Gemma 3 config.json plans what extract-text makes of it."""
    from ds_hybrid.config import load_config
    from ds_hybrid.plan import plan_for

    folder, _ = multimodal
    text = extract_text(folder, tmp_path / "text")
    cfg = load_config(None, ["kl.micro_batch=2", "kl.seq_len=64", "softmax_layers=[3]"])
    want = plan_for(cfg, "kl", 1, 80, str(text / "config.json"))
    got = plan_for(cfg, "kl", 1, 80, str(folder / "config.json"))
    assert got == want and got.total > 0


def test_a_hub_shaped_config(tmp_path):
    """config.json as the hub's gemma-3-4b-it writes it (transformers 4.50: no layer_types, sliding_window_pattern,
    rope_local_base_freq, linear RoPE scaling, torch_dtype at the top level; tiny sizes): the extracted teacher has
    every sixth layer global, the local RoPE base on the sliding layers, the scaling on the global ones, and the
    multimodal model's logits on text."""
    hub = {"architectures": ["Gemma3ForConditionalGeneration"], "boi_token_index": 297, "eoi_token_index": 298,
           "eos_token_id": [1, 106], "image_token_index": 299, "initializer_range": 0.02, "mm_tokens_per_image": 4,
           "model_type": "gemma3", "torch_dtype": "bfloat16", "transformers_version": "4.50.0.dev0",
           "text_config": {"hidden_size": 64, "intermediate_size": 128, "model_type": "gemma3_text",
                           "num_hidden_layers": 7, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 32,
                           "vocab_size": 300, "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
                           "sliding_window": 8, "sliding_window_pattern": 6, "rope_local_base_freq": 10000.0,
                           "rope_theta": 1000000.0, "cache_implementation": "hybrid"},
           "vision_config": {"hidden_size": 32, "image_size": 28, "intermediate_size": 64,
                             "model_type": "siglip_vision_model", "num_attention_heads": 2, "num_hidden_layers": 1,
                             "patch_size": 14, "vision_use_head": False}}
    src = tmp_path / "hub"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(hub))
    torch.manual_seed(1)
    mm = Gemma3ForConditionalGeneration(Gemma3Config.from_pretrained(src)).eval()
    mm.save_pretrained(tmp_path / "saved")
    (tmp_path / "saved" / "config.json").write_text(json.dumps(hub))  # the hub's file, not transformers 5's
    mm = Gemma3ForConditionalGeneration.from_pretrained(tmp_path / "saved", dtype=torch.float32).eval()
    out = extract_text(tmp_path / "saved", tmp_path / "text")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["layer_types"] == ["sliding_attention"] * 5 + ["full_attention", "sliding_attention"]
    assert cfg["rope_parameters"]["sliding_attention"]["rope_theta"] == 10000.0
    assert cfg["rope_parameters"]["full_attention"] == {"factor": 8.0, "rope_theta": 1000000.0, "rope_type": "linear"}
    assert cfg["dtype"] == "bfloat16" and cfg["eos_token_id"] == [1, 106]
    text = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.randint(0, 290, (2, 30), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(logits_of(text, ids), logits_of(mm, ids), rtol=0, atol=1e-5)
