"""A multimodal Gemma 3 checkpoint's language model as a text-only causal-LM folder a hybrid can be made from.

Gemma 3 at 4B, 12B and 27B ships only as ``Gemma3ForConditionalGeneration`` (a SigLIP vision tower, a projector
and the language model). ds-hybrid distils text models, so it takes the language model out: its config
(``text_config``, with transformers' defaults filled in), its tensors renamed to ``Gemma3ForCausalLM``'s names,
the tokenizer and generation files. Tensors are streamed one at a time into shards of at most ``shard_bytes`` (a 27B
checkpoint never sits in memory), the folder is written under a temporary name and renamed when complete, and an
existing non-empty ``out`` is refused (nothing is overwritten). The result equals the multimodal model on text
(same logits: tests/test_text_extract.py).

    ds-hybrid extract-text --model ./gemma-3-4b-it --out ./gemma-3-4b-it-text
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
from collections.abc import Sequence
from pathlib import Path

from ds_hybrid.errors import ConfigError
from ds_hybrid.folders import atomic_folder
from ds_hybrid.hf_io import SafetensorsReader, ShardWriter

# checkpoint name prefix -> Gemma3ForCausalLM's (the hub's layout as transformers writes it, and the in-memory one)
RENAMES: tuple[tuple[str, str], ...] = (
    ("language_model.model.", "model."),
    ("model.language_model.", "model."),
    ("language_model.lm_head.", "lm_head."),
    ("lm_head.", "lm_head."),
)
DROPPED = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector.")
TEXT_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
              "added_tokens.json", "chat_template.jinja", "chat_template.json", "generation_config.json")
SHARD_BYTES = 2 * 1024**3
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
               "F8_E4M3": 1, "F8_E5M2": 1}


def text_name(key: str) -> str | None:
    """The language model's name for a checkpoint tensor; None for the vision tower and projector."""
    for old, new in RENAMES:
        if key.startswith(old):
            return new + key[len(old):]
    if key.startswith(DROPPED):
        return None
    raise ConfigError("--model", key, "a tensor that is neither the language model's nor the vision tower's or "
                      "projector's: not a Gemma 3 checkpoint layout ds-hybrid knows")


def text_config(src: Path):
    """The language model's config (Gemma3TextConfig) of a multimodal Gemma 3 folder."""
    from transformers import Gemma3Config

    try:
        raw = json.loads((src / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise ConfigError("--model", str(src), f"its config.json is not valid JSON ({e})") from None
    if not isinstance(raw, dict) or raw.get("model_type") != "gemma3":
        kind = raw.get("model_type") if isinstance(raw, dict) else None
        raise ConfigError("--model", str(src), f"model_type is {kind!r}, not the multimodal 'gemma3'; "
                          "a text-only checkpoint (gemma3_text, llama, qwen2, ...) is a teacher as it is")
    config = Gemma3Config.from_pretrained(src)
    text = config.text_config
    text.architectures = ["Gemma3ForCausalLM"]
    text.tie_word_embeddings = getattr(config, "tie_word_embeddings", True)
    dtype = getattr(config, "dtype", None) or raw.get("torch_dtype")
    if dtype is not None:
        text.dtype = dtype
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):  # the -it checkpoints' eos [1, 106] sits at the
        if raw.get(key) is not None:                                # top level: a hybrid copies the teacher's ids
            setattr(text, key, raw[key])
    return text


def shard_plan(reader: SafetensorsReader, keys: Sequence[str], shard_bytes: int) -> list[list[str]]:
    """Keys grouped into shards of at most ``shard_bytes`` (a larger tensor gets a shard of its own), from the
    tensors' shapes and dtypes in the headers, without reading them."""
    from safetensors import safe_open

    sizes: dict[str, int] = {}
    by_file: dict[str, list[str]] = {}
    for k in keys:
        by_file.setdefault(reader.weight_map[k], []).append(k)
    for fname, ks in by_file.items():
        with safe_open(reader.folder / fname, "pt") as f:
            for k in ks:
                sl = f.get_slice(k)
                sizes[k] = math.prod(sl.get_shape()) * DTYPE_BYTES.get(sl.get_dtype(), 8)  # (unknown: planned large)
    plan: list[list[str]] = [[]]
    size = 0
    for k in keys:
        if plan[-1] and size + sizes[k] > shard_bytes:
            plan.append([])
            size = 0
        plan[-1].append(k)
        size += sizes[k]
    return plan


def extract_text(src: str | Path, out: str | Path, shard_bytes: int = SHARD_BYTES) -> Path:
    """Write the language model of the multimodal Gemma 3 folder ``src`` to ``out``; returns ``out``."""
    src, out = Path(src), Path(out)
    if shard_bytes <= 0:
        raise ConfigError("--shard-gib", shard_bytes / 1024**3, "must be positive (GiB per safetensors shard)")
    if not (src / "config.json").is_file():
        raise ConfigError("--model", str(src), "no config.json here: give the folder of a Gemma 3 checkpoint")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError("--out", str(out), "exists and is not empty; choose a new folder (nothing is overwritten)")
    config = text_config(src)
    try:
        reader = SafetensorsReader(src)
    except FileNotFoundError as e:
        raise ConfigError("--model", str(src), f"{e}: ds-hybrid reads safetensors checkpoints only") from None
    names = {key: text_name(key) for key in reader.weight_map}
    kept = {k: n for k, n in names.items() if n is not None}
    if len(set(kept.values())) < len(kept):
        twice = sorted({n for n in kept.values() if list(kept.values()).count(n) > 1})
        raise ConfigError("--model", str(src), f"holds the language model's {twice[:3]} under two names each")
    if "model.embed_tokens.weight" not in kept.values() or not any(".layers." in n for n in kept.values()):
        raise ConfigError("--model", str(src), "holds no language-model embedding or layers")
    try:
        with atomic_folder(out, out.name, refuse_existing=True) as tmp:  # (empty above; filled meanwhile: kept)
            plan = shard_plan(reader, sorted(kept, key=lambda k: kept[k]), shard_bytes)
            writer = ShardWriter(tmp, len(plan))
            for i, keys in enumerate(plan):  # one shard in memory at a time
                writer.write(i, {kept[k]: reader.get(k).contiguous() for k in keys})
            writer.finish()
            config.save_pretrained(tmp)
            for name in TEXT_FILES:
                if (src / name).is_file():
                    shutil.copy2(src / name, tmp / name)
    except FileExistsError as e:
        raise ConfigError("--out", str(out), str(e)) from None
    return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="ds-hybrid extract-text", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="a multimodal Gemma 3 folder (Gemma3ForConditionalGeneration)")
    ap.add_argument("--out", required=True, help="a new folder for the text-only Gemma3ForCausalLM")
    ap.add_argument("--shard-gib", type=float, default=SHARD_BYTES / 1024**3, help="largest safetensors shard")
    args = ap.parse_args(argv)
    if not (math.isfinite(args.shard_gib) and args.shard_gib * 1024**3 >= 1):
        raise ConfigError("--shard-gib", args.shard_gib, "the largest shard in GiB: a positive number (e.g. 2)")
    out = extract_text(args.model, args.out, int(args.shard_gib * 1024**3))
    print(f"{out}: the language model as Gemma3ForCausalLM; use it as the teacher (teacher: {out})")
    return 0
