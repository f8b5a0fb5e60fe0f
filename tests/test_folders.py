"""Folders written atomically (mkdtemp, then a rename) end with a plain mkdir's mode, not mkdtemp's private 0700:
exported models, converted teachers and the corpus are read by other users and jobs of a cluster."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from torch import nn

from ds_hybrid.folders import usual_mode
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
