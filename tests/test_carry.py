"""bench/carry_export.py: a finished stage folder leaves a GPU lease as parts holding only what differs from the
teacher, and is rebuilt on the next lease tensor for tensor (every tensor checked against its hash)."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from trainer_utils import REPO, make_corpus, make_tiny_teacher, tail, train_in_one_process, write_config

spec = importlib.util.spec_from_file_location("carry_export", REPO / "bench" / "carry_export.py")
carry = importlib.util.module_from_spec(spec)
spec.loader.exec_module(carry)


def tensors(folder):
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as sf:
            out.update({(f.name, k): sf.get_tensor(k) for k in sf.keys()})
    return out


def test_an_align_folder_travels_as_its_mixers_and_comes_back_exact(tmp_path):
    teacher = make_tiny_teacher(tmp_path / "teacher")
    corpus = make_corpus(tmp_path / "corpus", n_files=12)
    short = dict(seq_len=64, global_batch=2, micro_batch=2, tokens=4 * 2 * 64, eval_sequences=2,
                 ds_config="ds_configs/single.json", teacher_ds_config="ds_configs/single.json")
    cfg = write_config(tmp_path / "run.yaml", teacher, corpus, tmp_path / "out", align=short, kl=short)
    p, = train_in_one_process([["--stage", "align", "--config", str(cfg)]], tmp_path / "runs.json")
    assert p.returncode == 0, tail(p)
    align = tmp_path / "out" / "align"

    parts = carry.pack(align, teacher, tmp_path / "parts", part_mib=0.25)
    assert len(parts) > 1 and all(q.stat().st_size <= 0.25 * 2**20 for q in parts)
    manifest_delta = {k.split("::")[1] for k, v in carry.read_manifest(parts)["tensors"].items()
                      if v["source"] == "delta"}
    # only the trained mixers travel: every other tensor is the teacher's own
    assert manifest_delta and all(".self_attn." in n for n in manifest_delta), sorted(manifest_delta)
    before = tensors(align / "hf")
    assert len(manifest_delta) < len(before)

    # the parts come home over several device calls; gather puts them 3 to a folder for the next lease's calls (the
    # calls' folders numbered as the device tool numbers them: 9 before 10, which a path sort puts after it)
    for i, q in enumerate(parts):
        call = tmp_path / "calls" / str(9 + i // 4)
        call.mkdir(parents=True, exist_ok=True)
        shutil.copy(q, call / q.name)
    calls = sorted((tmp_path / "calls").iterdir(), key=lambda d: int(d.name))
    assert len(calls) > 1 and str(calls[1]) < str(calls[0])
    with pytest.raises(SystemExit, match="parts missing"):
        carry.gather(calls[1:], "align", str(tmp_path / "dev" / "a"))
    gathered = carry.gather(calls, "align", str(tmp_path / "dev" / "a"), per_folder=3)
    assert len(gathered) == len(parts) and len(list((tmp_path / "dev").iterdir())) == -(-len(parts) // 3)
    # a prefix whose folders hold something else (the bundle's .dev/p0...) is refused, not emptied
    (tmp_path / "dev" / "p0").mkdir()
    (tmp_path / "dev" / "p0" / "part0").write_bytes(b"bundle")
    with pytest.raises(SystemExit, match="holds other files than parts of align"):
        carry.gather(calls, "align", str(tmp_path / "dev" / "p"))
    assert (tmp_path / "dev" / "p0" / "part0").read_bytes() == b"bundle"
    shutil.rmtree(tmp_path / "dev" / "p0")
    assert [q.name for q in gathered] == [q.name for q in parts]  # in the pack's order, 3 to a folder
    # gathering the gathered folders again into the same prefix (2 to a folder now) reads them before replacing them
    blobs = [q.read_bytes() for q in gathered]
    gathered = carry.gather(sorted((tmp_path / "dev").iterdir()), "align", str(tmp_path / "dev" / "a"), per_folder=2)
    assert [q.read_bytes() for q in gathered] == blobs
    assert len(list((tmp_path / "dev").iterdir())) == -(-len(parts) // 2)  # (nothing staged is left behind)
    # one part name with two contents (two packs' parts, e.g. two leases' aligns, in the folders given): refused
    clash = tmp_path / "calls" / "clash"
    clash.mkdir()
    (clash / parts[0].name).write_bytes(b"a part of another pack")
    with pytest.raises(SystemExit, match="two different parts of one name"):
        carry.gather([*calls, clash], "align", str(tmp_path / "dev" / "a"))
    assert [q.read_bytes() for q in gathered] == blobs
    # interrupted while copying, or while swapping the folders in: every folder is as it was, nothing staged is left
    import unittest.mock

    def state() -> dict[str, bytes]:
        return {str(f.relative_to(tmp_path)): f.read_bytes() for f in sorted((tmp_path / "dev").rglob("*"))
                if f.is_file()}

    was = state()
    real_copy, real_rename = shutil.copy, Path.rename
    copies: list[str] = []

    def dies_mid_copy(src, dst):  # the third part's copy cut off half-way
        copies.append(str(dst))
        if len(copies) == 3:
            Path(dst).write_bytes(Path(src).read_bytes()[:100])
            raise KeyboardInterrupt
        return real_copy(src, dst)

    with unittest.mock.patch.object(carry.shutil, "copy", side_effect=dies_mid_copy):
        with pytest.raises(KeyboardInterrupt):
            carry.gather(sorted((tmp_path / "dev").iterdir()), "align", str(tmp_path / "dev" / "a"))
    assert len(copies) == 3 and state() == was
    assert sorted(f.name for f in (tmp_path / "dev").iterdir()) == sorted(f"a{i}" for i in range(-(-len(parts) // 2)))
    renames: list[str] = []

    def dies_mid_swap(self, target):  # the earlier folders moved aside and the first new one in, then stopped
        if Path(self).parent.name == "new" and Path(target).parent == tmp_path / "dev":
            renames.append(Path(target).name)
            if len(renames) == 2:
                raise KeyboardInterrupt
        return real_rename(self, target)

    with unittest.mock.patch.object(Path, "rename", dies_mid_swap):
        with pytest.raises(KeyboardInterrupt):
            carry.gather(sorted((tmp_path / "dev").iterdir()), "align", str(tmp_path / "dev" / "a"))
    assert renames == ["a0", "a1"] and state() == was
    assert sorted(f.name for f in (tmp_path / "dev").iterdir()) == sorted(f"a{i}" for i in range(-(-len(parts) // 2)))
    # a prefix that is a folder, or a folder size below one part, is refused before anything moves
    for into, per, match in ((str(tmp_path / "dev") + "/", 3, "is a folder, not a prefix"),
                             (str(tmp_path / "dev" / "a"), 0, "--per-folder 0: give at least 1")):
        with pytest.raises(SystemExit, match=match):
            carry.gather(calls, "align", into, per_folder=per)
    assert state() == was
    for f in (tmp_path / "dev").iterdir():
        shutil.rmtree(f)
    gathered = carry.gather(calls, "align", str(tmp_path / "dev" / "a"), per_folder=3)
    assert [q.read_bytes() for q in gathered] == blobs
    # another prefix's folders (.dev/a2's a20) are not this prefix's earlier ones
    (tmp_path / "dev" / "a20").mkdir()
    (tmp_path / "dev" / "a20" / parts[0].name).write_bytes(b"another pack")
    gathered = carry.gather(calls, "align", str(tmp_path / "dev" / "a"), per_folder=3)
    assert (tmp_path / "dev" / "a20" / parts[0].name).read_bytes() == b"another pack"
    shutil.rmtree(tmp_path / "dev" / "a20")
    parts = gathered
    with pytest.raises(SystemExit, match="a part given twice"):
        carry.unpack(parts + parts[:1], teacher, tmp_path / "lease2" / "align")

    back = carry.unpack(parts[::-1], teacher, tmp_path / "lease2" / "align")  # (any order: a glob's)
    after = tensors(back / "hf")
    assert before.keys() == after.keys()
    for k in before:
        assert before[k].dtype == after[k].dtype and torch.equal(before[k], after[k]), k
    carried = [f for f in align.rglob("*") if f.is_file() and f.suffix != ".safetensors"
               and "checkpoints" not in f.relative_to(align).parts]  # training states stay behind
    assert {"DONE", "metrics.jsonl", "config.json"} <= {f.name for f in carried}
    assert not (back / "checkpoints").exists()
    for f in carried:
            assert (back / f.relative_to(align)).read_bytes() == f.read_bytes(), f

    # the next stage starts from the rebuilt folder
    p, = train_in_one_process([["--stage", "kl", "--config", str(cfg), f"out_dir={tmp_path / 'lease2'}"]],
                              tmp_path / "runs2.json")
    assert p.returncode == 0, tail(p)
    assert (tmp_path / "lease2" / "kl" / "DONE").is_file()
    # the carried align's recipe is what a campaign's SEED and config are checked against (`same-align`, before kl)
    carry.main(["same-align", str(back / "config.yaml"), "--config", str(cfg), "--set", "align.micro_batch=1"])
    with pytest.raises(SystemExit, match="an align of seed=0; this run asks for seed=1"):
        carry.main(["same-align", str(back / "config.yaml"), "--config", str(cfg), "--set", "seed=1"])
    with pytest.raises(SystemExit, match=r"an align of mixer_options=\{\}, align.tokens=512; this run asks for "
                                         r"mixer_options=\{'use_gate': False\}, align.tokens=1024"):
        carry.main(["same-align", str(back / "config.yaml"), "--config", str(cfg), "--set", "align.tokens=1024",
                    "--set", "mixer_options.use_gate=false"])

    # another base (a different teacher) is refused, naming a tensor, and leaves nothing behind
    other = tmp_path / "other"
    shutil.copytree(teacher, other)
    f = next(other.glob("*.safetensors"))
    w = load_file(str(f))
    w["model.norm.weight"] = w["model.norm.weight"] + 1.0
    save_file(w, str(f), metadata={"format": "pt"})
    with pytest.raises(SystemExit, match="model.norm.weight .* does not match its hash"):
        carry.unpack(parts, other, tmp_path / "lease3" / "align")
    assert not (tmp_path / "lease3" / "align").exists()
    # over an earlier unpack: refused, it is kept as it was; accepted, it is replaced and nothing is left aside
    with pytest.raises(SystemExit, match="does not match its hash"):
        carry.unpack(parts, other, back)
    assert {k: v.tolist() for k, v in tensors(back / "hf").items()} == {k: v.tolist() for k, v in before.items()}
    (back / "stale").write_text("from the earlier unpack")
    carry.unpack(parts, teacher, back)
    assert not (back / "stale").exists() and tensors(back / "hf").keys() == before.keys()
    assert not [f for f in back.parent.iterdir() if f.name.startswith(".")]
    with pytest.raises(SystemExit, match="parts missing"):
        carry.unpack(parts[:1], teacher, tmp_path / "lease4" / "align")
