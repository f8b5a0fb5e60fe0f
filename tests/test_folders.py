"""Folders written atomically (ds_hybrid.folders.atomic_folder: a temporary folder, then a rename) appear whole or
not at all, and end with a plain mkdir's mode, not mkdtemp's private 0700: exported models, converted teachers and the
corpus are read by other users and jobs of a cluster."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
from torch import nn

from ds_hybrid.folders import atomic_folder, usual_mode
from ds_hybrid.hf_io import export_hf


def mkdir_mode(tmp_path: Path) -> int:
    (tmp_path / "plain").mkdir()
    return (tmp_path / "plain").stat().st_mode & 0o777


def test_usual_mode_is_what_mkdir_gives(tmp_path):
    d = Path(tempfile.mkdtemp(dir=tmp_path))
    assert d.stat().st_mode & 0o777 == 0o700
    usual_mode(d)
    assert d.stat().st_mode & 0o777 == mkdir_mode(tmp_path)


def test_an_exported_model_folder_is_readable_by_others(tmp_path):
    from transformers import LlamaConfig

    old = os.umask(0o022)
    try:
        out = export_hf(tmp_path / "hf", LlamaConfig(), [[("lm_head.", nn.Linear(2, 3))]])
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o755
    assert (out / "config.json").is_file()


def entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_atomic_folder_appears_whole_and_replaces_an_older_one(tmp_path):
    out = tmp_path / "model"
    with atomic_folder(out, "w") as tmp:
        (tmp / "a").write_text("1")
        assert not out.exists()  # nothing at out until the block ends
    assert entries(out) == ["a"] and entries(tmp_path) == ["model"]
    assert out.stat().st_mode & 0o777 == mkdir_mode(tmp_path)
    with atomic_folder(out, "w") as tmp:
        (tmp / "b").write_text("2")
    assert entries(out) == ["b"] and entries(tmp_path) == ["model", "plain"]  # (plain: mkdir_mode's) no leftovers


def test_atomic_folder_leaves_out_untouched_on_an_error(tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "old").write_text("kept")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_folder(out, "w") as tmp:
            (tmp / "half").write_text("x")
            raise RuntimeError("boom")
    assert entries(out) == ["old"] and entries(tmp_path) == ["model"]


def test_atomic_folder_keeps_a_complete_folder_and_replaces_an_interrupted_one(tmp_path):
    out = tmp_path / "teacher"
    out.mkdir()
    (out / "config.json").write_text("theirs")
    with atomic_folder(out, "convert", keep="config.json") as tmp:  # another rank converted it meanwhile
        (tmp / "config.json").write_text("ours")
    assert (out / "config.json").read_text() == "theirs" and entries(tmp_path) == ["teacher"]
    (out / "config.json").unlink()
    (out / "model.safetensors").write_text("half")  # an interrupted conversion: no config.json
    with atomic_folder(out, "convert", keep="config.json") as tmp:
        (tmp / "config.json").write_text("ours")
    assert entries(out) == ["config.json"] and (out / "config.json").read_text() == "ours"
    assert entries(tmp_path) == ["teacher"]


def test_shard_writer_names_indexes_and_reads_back(tmp_path):
    """ShardWriter (export_hf and extract-text): one shard is model.safetensors without an index, unless numbered
    shards are asked for (the stages' exports); several get numbered names and an index whose weight map lists every
    tensor in the order written, with their total size."""
    import json

    import torch

    from ds_hybrid.hf_io import INDEX, SafetensorsReader, ShardWriter

    a, b = torch.arange(6.0).view(2, 3), torch.ones(4, dtype=torch.bfloat16)
    one = tmp_path / "one"
    one.mkdir()
    w = ShardWriter(one, 1)
    w.write(0, {"a": a})
    w.finish()
    assert sorted(p.name for p in one.iterdir()) == ["model.safetensors"]
    assert torch.equal(SafetensorsReader(one).get("a"), a)
    for name, single_file, n in (("numbered", False, 1), ("two", True, 2)):
        folder = tmp_path / name
        folder.mkdir()
        w = ShardWriter(folder, n, single_file=single_file)
        w.write(0, {"a": a, "c": a.clone()})
        if n == 2:
            w.write(1, {"b": b})
        w.finish()
        index = json.loads((folder / INDEX).read_text())
        assert list(index["weight_map"]) == ["a", "c", "b"][: 2 + (n == 2)]
        assert index["metadata"]["total_size"] == 48 + 8 * (n == 2)
        assert index["weight_map"]["a"] == f"model-00001-of-0000{n}.safetensors"
        reader = SafetensorsReader(folder)
        assert torch.equal(reader.get("c"), a) and (n == 1 or torch.equal(reader.get("b"), b))


def test_atomic_folder_refusing_existing_keeps_a_folder_filled_meanwhile(tmp_path):
    """extract-text checks --out is empty, copies for minutes, then published: a folder filled meanwhile by another
    writer was swapped out and deleted. With refuse_existing it is kept and the new one dropped, named."""
    out = tmp_path / "out"
    with pytest.raises(FileExistsError, match="was filled while this was written"):
        with atomic_folder(out, "w", refuse_existing=True) as tmp:
            (tmp / "mine.txt").write_text("new")
            out.mkdir()
            (out / "theirs.txt").write_text("theirs")
    assert [p.name for p in out.iterdir()] == ["theirs.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # the temporary folder removed
    with atomic_folder(tmp_path / "empty", "w", refuse_existing=True) as tmp:  # absent or empty: published
        (tmp / "a").write_text("a")
    assert (tmp_path / "empty" / "a").read_text() == "a"
