"""HF checkpoint folders, read and written a module at a time (never a whole state dict in memory).

    reader = SafetensorsReader("teacher/")                  # model.safetensors or sharded + index
    fill_module(student.model.layers[3].mlp, "model.layers.3.mlp.", reader)
    export_hf("out/hf", config, [("model.embed_tokens.", emb), ("model.layers.0.", layer0), ...], tokenizer)

Under ZeRO-3 each module is gathered for its copy (rank 0 reads and writes, the result is re-partitioned) and the
export writes one shard per group of modules from rank 0, so peak memory is one module's full parameters.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from contextlib import nullcontext
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ds_hybrid import distributed as D
from ds_hybrid.folders import atomic_folder
from ds_hybrid.zero import gathered, is_partitioned

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"


class SafetensorsReader:
    """Tensors of a HF folder by name, read lazily (memory-mapped) from whichever shard holds them."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        if (self.folder / INDEX).is_file():
            weight_map = json.loads((self.folder / INDEX).read_text())["weight_map"]
        elif (self.folder / SINGLE).is_file():
            with safe_open(self.folder / SINGLE, "pt") as f:
                weight_map = {k: SINGLE for k in f.keys()}
        else:
            raise FileNotFoundError(f"{self.folder} has neither {SINGLE} nor {INDEX}")
        self.weight_map: dict[str, str] = weight_map
        self._handles: dict[str, object] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def get(self, name: str) -> torch.Tensor:
        if name not in self.weight_map:
            raise KeyError(f"{name} is not in {self.folder}")
        fname = self.weight_map[name]
        if fname not in self._handles:
            self._handles[fname] = safe_open(self.folder / fname, "pt")
        return self._handles[fname].get_tensor(name)


class ShardWriter:
    """The safetensors shards of a HF folder, written one at a time, then their index.

        writer = ShardWriter(folder, n_shards)
        for i, tensors in enumerate(shards):
            writer.write(i, tensors)       # model-0000i-of-0000n.safetensors (one shard: model.safetensors)
        writer.finish()                    # model.safetensors.index.json when there are several shards

    ``single_file=False``: numbered shards and an index even for one shard (the stages' exports: their folders'
    fingerprints, which selections record, hash the index as it has always been written)."""

    def __init__(self, folder: Path, n_shards: int, single_file: bool = True):
        if n_shards < 1:
            raise ValueError(f"a HF folder needs at least one shard, got {n_shards}")
        self.folder, self.n, self.single_file = Path(folder), n_shards, single_file
        self.weight_map: dict[str, str] = {}
        self.total = 0

    def file_name(self, i: int) -> str:
        return SINGLE if self.n == 1 and self.single_file else f"model-{i + 1:05d}-of-{self.n:05d}.safetensors"

    def write(self, i: int, tensors: dict[str, torch.Tensor]) -> None:
        """Shard ``i`` (0-based) holding ``tensors`` (contiguous, none sharing storage: safetensors refuses those)."""
        if not tensors:
            return
        fname = self.file_name(i)
        save_file(tensors, str(self.folder / fname), metadata={"format": "pt"})
        for k, v in tensors.items():
            self.weight_map[k] = fname
            self.total += v.numel() * v.element_size()

    def finish(self) -> None:
        if self.n > 1 or not self.single_file:  # (the weight map in the order written)
            index = {"metadata": {"total_size": self.total}, "weight_map": self.weight_map}
            (self.folder / INDEX).write_text(json.dumps(index, indent=1))


@torch.no_grad()
def fill_module(module: nn.Module, prefix: str, reader: SafetensorsReader, tied: dict[str, str] | None = None) -> None:
    """Copy ``prefix + name`` tensors of ``reader`` into the module's parameters and persistent buffers."""
    tied = tied or {}
    params = dict(module.named_parameters())
    partitioned = any(is_partitioned(p) for p in params.values())
    with gathered(params.values(), modifier_rank=0):
        if partitioned and not D.is_main():
            return  # rank 0's copy is broadcast when the block ends
        for name, p in params.items():
            key = prefix + name
            key = tied.get(key, key) if key not in reader else key
            t = reader.get(key)
            if tuple(t.shape) != tuple(p.shape):
                raise ValueError(f"{key}: checkpoint shape {tuple(t.shape)} != model shape {tuple(p.shape)}")
            p.copy_(t.to(p.dtype))


def fill_causal_lm(model: nn.Module, reader: SafetensorsReader) -> None:
    """Fill a Llama-style causal LM (embed_tokens, layers, norm, lm_head) one module at a time."""
    fill_module(model.model.embed_tokens, "model.embed_tokens.", reader)
    fill_module(model.model.norm, "model.norm.", reader)
    if not getattr(model.config, "tie_word_embeddings", False):
        fill_module(model.lm_head, "lm_head.", reader)
    for i, layer in enumerate(model.model.layers):
        fill_module(layer, f"model.layers.{i}.", reader)


@torch.no_grad()
def module_tensors(module: nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    """Full CPU copies of a module's parameters (gathered under ZeRO-3), on rank 0; empty dict elsewhere."""
    params = dict(module.named_parameters())
    with gathered(params.values()):
        if not D.is_main():
            return {}
        return {prefix + k: v.detach().to("cpu", copy=True).contiguous() for k, v in params.items()}


def export_hf(
    out_dir: str | Path,
    config,
    groups: Iterable[list[tuple[str, nn.Module]]],
    tokenizer=None,
    skip: Iterable[str] = (),
    dtype: torch.dtype | None = None,
    generation_config=None,
) -> Path:
    """Write a sharded safetensors HF folder, one shard per group of (prefix, module), atomically (temp + rename).

    Every rank must call it (gathers are collective); only rank 0 writes. ``skip`` names tensors left out (tied
    weights, which HF re-ties from the config). ``generation_config`` (the teacher's, ``teacher_generation_config``)
    is written beside the config: the model then stops and samples as its teacher does.
    """
    out = Path(out_dir)
    skip = set(skip)
    groups = list(groups)
    # rank 0 writes into a temporary folder that takes out's place once complete; the other ranks only gather
    with atomic_folder(out, out.name) if D.is_main() else nullcontext() as tmp:
        writer = ShardWriter(tmp, len(groups), single_file=False) if tmp is not None else None
        for i, group in enumerate(groups):
            tensors: dict[str, torch.Tensor] = {}
            for prefix, module in group:
                for k, v in module_tensors(module, prefix).items():
                    if k in skip:
                        continue
                    tensors[k] = v.to(dtype) if dtype is not None and v.is_floating_point() else v
            if writer is not None:
                writer.write(i, tensors)  # (copies made above never share storage)
            del tensors
        if writer is not None:
            writer.finish()
            config.save_pretrained(tmp)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            if generation_config is not None:
                generation_config.save_pretrained(tmp)
    D.barrier()
    return out
