"""bench/import_lease.py: a lease's results.tar.gz laid out as a docs/data folder, summarized, merged."""

from __future__ import annotations

import gzip
import importlib.util
import io
import json
import os
import tarfile
from pathlib import Path

import pytest

from ds_hybrid.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("import_lease", ROOT / "bench" / "import_lease.py")
import_lease = importlib.util.module_from_spec(spec)
spec.loader.exec_module(import_lease)

TASKS = ["niah_single_1", "niah_essay_single"]


def eval_payload(model: str, length: int, scores: list[float], n: int) -> dict:
    return {"date": "2026-12-03", "device": "cuda", "lengths": [length], "tasks": TASKS, "limit": n,
            "scores": {model: {t: {str(length): s} for t, s in zip(TASKS, scores)}},
            "prompts": {model: {t: {str(length): n} for t in TASKS}}, "heldout_quality": {}, "models": {}}


def metrics_rows() -> list[dict]:
    rows = [{"step": 0, "split": "val", "kl": 0.4, "ppl": 27.0, "recall_kl": 2.2}]
    rows += [{"step": s, "tokens": 131072 * s, "tokens_per_s": tps, "peak_gpu_gib": 90.0 + s / 10}
             for s, tps in ((1, 100.0), (2, 300.0), (3, 200.0))]
    rows += [{"step": 3, "split": "val", "kl": 0.15, "ppl": 21.4, "recall_kl": 0.37}]
    return rows


def make_tarball(path: Path, *, unpacked: bool = False, extra: dict[str, bytes] | None = None) -> Path:
    files: dict[str, bytes] = {
        "res/t0": b"1700000000\n",
        "res/CAMPAIGN_DONE": b"",
        "res/preflight.ok": b"",
        "res/progress.log": b"21:32:49 +17s start eval_preflight (GPU 0)\n21:55:10 +1358s campaign done\n",
        "res/campaign.log": b"same as progress\n",
        "res/versions.txt": b"triton 3.7.1 torch 2.11.0\n",
        "res/gpus.csv": b"index, name\n0, NVIDIA H200\n",
        "res/graph_decode_check.json": b'{"passed": true}',
        "res/logs/kl_a.log": b"start\n\rstep 1/3\rstep 2/3\rstep 3/3\ndone\n",
        "res/eval_teacher_1024/eval.json": json.dumps(eval_payload("teacher", 1024, [1.0, 1.0], 1)).encode(),
        "res/eval_a_2048/eval.json": json.dumps(eval_payload("a", 2048, [0.99, 0.59], 100)).encode(),
        "res/eval_a_2048/eval.md": b"| task |\n",
        "res/eval_a_2048/samples_a.jsonl": b'{"prompt": "p", "answer": "1"}\n' * 3,
        "res/triton_autotune/X/k.autotune.json": b"{}",
        "run/compare/align/metrics.jsonl": b'{"step": 0, "split": "val", "loss": 1.85}\n',
        "run/compare/align/run_info.json": b'{"stage": "align"}',
        "run/compare/align/config.yaml": b"seed: 0\n",
        "run/compare/kl_runs/a/kl/metrics.jsonl": "".join(json.dumps(r) + "\n" for r in metrics_rows()).encode(),
        "run/compare/kl_runs/a/kl/run_info.json": b'{"stage": "kl", "softmax_layers": [0, 18, 20, 23]}',
        "run/compare/kl_runs/a/kl/config.yaml": b"kl: {}\n",
        "run/compare/kl_runs/a/kl/DONE": b"{}",
        "run/compare/select/ppl/selection.json": b'{"ranking": [18, 20]}',
    }
    if unpacked:
        files["res/logs/align_unpack.log"] = b"unpacked\n"
    files.update(extra or {})
    with tarfile.open(path, "w:gz") as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def test_layout_and_summary(tmp_path):
    tb = make_tarball(tmp_path / "results.tar.gz")
    out = tmp_path / "docs" / "lease"
    summary = import_lease.import_lease(tb, out)
    names = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert names == {
        "versions.txt", "gpus.csv", "graph_decode_check.json", "campaign_progress.log", "logs/kl_a.log",
        "eval_a_2048/eval.json", "eval_a_2048/eval.md", "eval_a_2048/samples_a.jsonl.gz",
        "align_metrics.jsonl.gz", "align_run_info.json", "align_config.yaml",
        "a_kl_metrics.jsonl.gz", "a_kl_run_info.json", "a_kl_config.yaml", "selectors/ppl/selection.json"}
    # the preflight (one prompt per task), the markers and the autotune cache stay out; samples round-trip
    assert gzip.decompress((out / "eval_a_2048/samples_a.jsonl.gz").read_bytes()) == b'{"prompt": "p", "answer": "1"}\n' * 3
    assert (out / "logs/kl_a.log").read_text() == "start\nstep 3/3\ndone\n"
    rows = [json.loads(x) for x in gzip.decompress((out / "a_kl_metrics.jsonl.gz").read_bytes()).splitlines()]
    assert rows == metrics_rows()
    assert summary["align"] == "trained in this lease"
    (kl,) = summary["kl"]
    assert kl["name"] == "a" and kl["softmax_layers"] == [0, 18, 20, 23] and kl["finished"]
    assert kl["tokens_per_s_median"] == 200.0 and kl["tokens"] == 3 * 131072
    assert kl["peak_gpu_gib"] == pytest.approx(90.3)
    assert kl["first_val"] == {"step": 0, "kl": 0.4, "ppl": 27.0, "recall_kl": 2.2}
    assert kl["last_val"] == {"step": 3, "kl": 0.15, "ppl": 21.4, "recall_kl": 0.37}
    assert import_lease.needle_rows(summary["evals"]) == ["eval_a_2048: a niah_single_1 2048: 0.99"]


def test_a_snapshot_mid_write_and_the_demos_recall(tmp_path):
    """A poll's snapshot taken while a hybrid's kl wrote its metrics (the last line cut off) is summarized from its
    whole lines (json.loads raised and left a half-written folder); the demo's own recall folder is kept as it is,
    out of the evaluations merged."""
    cut = "".join(json.dumps(r) + "\n" for r in metrics_rows()[:3]) + '{"step": 3, "tok'
    tb = make_tarball(tmp_path / "results.tar.gz", extra={
        "run/compare/kl_runs/b/kl/metrics.jsonl": cut.encode(),
        "res/demo_recall/eval.json": json.dumps(eval_payload("hybrid", 2048, [0.94, 0.5], 100)).encode()})
    out = tmp_path / "lease"
    summary = import_lease.import_lease(tb, out)
    b = next(k for k in summary["kl"] if k["name"] == "b")
    assert b["tokens"] == 2 * 131072 and not b["finished"]
    assert (out / "demo_recall" / "eval.json").is_file()
    assert all("demo_recall" not in e for e in summary["evals"])


def test_evaluations_that_brought_nothing_home_are_named(tmp_path, capsys):
    """An evaluation that failed, was still running at the snapshot, or ended without its eval.json in the tarball is
    listed (it is missing from --merge, which says nothing of it); a file being written at the snapshot (a dot file)
    stays out of the folder."""
    progress = ("10:00:00 +1s start eval_preflight (GPU 0)\n10:00:05 +5s end eval_preflight rc=0\n"
                "10:01:00 +60s start eval_a_2048 (GPU 0)\n10:01:00 +60s start eval_a_4096 (GPU 0)\n"
                "10:01:00 +60s start eval_a_8192 (GPU 0)\n10:01:00 +60s start eval_a_quality (GPU 0)\n"
                "10:02:00 +120s end eval_a_2048 rc=0\n10:02:10 +130s end eval_a_4096 rc=1\n"
                "10:02:20 +140s end eval_a_quality rc=0\n")
    tb = make_tarball(tmp_path / "results.tar.gz", extra={
        "res/progress.log": progress.encode(), "res/eval_a_2048/.eval.json.tmp123": b"{half"})
    out = tmp_path / "lease"
    summary = import_lease.import_lease(tb, out)
    assert summary["evals_not_home"] == ["eval_a_4096: failed (rc 1)", "eval_a_8192: unfinished",
                                         "eval_a_quality: finished, but no eval.json in the tarball"]
    assert not any(f.name.startswith(".") for f in (out / "eval_a_2048").iterdir())
    assert import_lease.main([str(tb), str(tmp_path / "again")]) == 0
    assert "NOT HOME: eval_a_8192: unfinished" in capsys.readouterr().out


def test_unpacked_align_keeps_no_metrics(tmp_path):
    out = tmp_path / "lease"
    summary = import_lease.import_lease(make_tarball(tmp_path / "r.tar.gz", unpacked=True), out)
    assert summary["align"] == "unpacked from an earlier lease's parts"
    assert (out / "align_run_info.json").is_file() and not (out / "align_metrics.jsonl.gz").exists()


def probe_files(root: str, probes: dict[str, tuple[list[int], float, bool]]) -> dict[str, bytes]:
    """Probe run folders: NAME -> (softmax layers, held-out KL, finished)."""
    files = {}
    for name, (layers, kl, done) in probes.items():
        d = f"{root}/probes/{name}/kl"
        rows = [{"step": 4, "split": "train", "tokens": 1048576, "tokens_per_s": 7.0e4, "peak_gpu_gib": 49.0}]
        if done:
            rows.append({"step": 4, "split": "val", "kl": kl, "ce": 3.7, "ppl": 40.0, "recall_kl": 3.0})
            files[f"{d}/DONE"] = b"{}"
        files[f"{d}/metrics.jsonl"] = "".join(json.dumps(r) + "\n" for r in rows).encode()
        files[f"{d}/run_info.json"] = json.dumps({"softmax_layers": layers}).encode()
    return files


def test_probes_become_a_table_beside_their_selection(tmp_path):
    root = "run/compare/select/ga_s2"
    files = probe_files(root, {"baseline": ([], 0.93, True), "layer_000": ([0], 0.84, True),
                               "layer_001": ([1], 0.60, True), "layer_002": ([2], 0.91, True)})
    files[f"{root}/selection.json"] = json.dumps({"ranking": [1, 0, 2], "num_layers": 3, "global_layers": [1]}).encode()
    out = tmp_path / "lease"
    summary = import_lease.import_lease(make_tarball(tmp_path / "r.tar.gz", extra=files), out)
    dst = out / "selectors" / "ga_s2"
    assert summary["probes"] == ["ga_s2: probe runs and their table"]
    table = (dst / "probes.md").read_text().splitlines()
    assert [line.split(" | ")[1:3] for line in table[2:5]] == [["1", "global"], ["0", "sliding"], ["2", "sliding"]]
    assert (dst / "probes.png").is_file() and (dst / "selection.json").is_file()
    with tarfile.open(dst / "probe_runs.tar.gz") as tf:
        assert "probes/layer_001/kl/metrics.jsonl" in tf.getnames()


def test_unfinished_probes_are_kept_and_named(tmp_path):
    root = "run/compare/select/ga_s2"
    files = probe_files(root, {"baseline": ([], 0.93, True), "layer_000": ([0], 0.84, True),
                               "layer_001": ([1], 0.60, False)})
    out = tmp_path / "lease"
    summary = import_lease.import_lease(make_tarball(tmp_path / "r.tar.gz", extra=files), out)
    assert summary["probes"] == ["ga_s2: probe runs and their table (selection unfinished)"]
    md = (out / "selectors/ga_s2/probes.md").read_text()
    assert "| 1 | 0 |" in md and "| - | 1 |  | not measured (no finished probe) |" in md
    files = probe_files(root, {"layer_000": ([0], 0.84, True)})  # no all-linear probe: runs kept, no table
    summary = import_lease.import_lease(make_tarball(tmp_path / "s.tar.gz", extra=files), tmp_path / "lease2")
    assert summary["probes"][0].startswith("ga_s2: probe runs kept, no table (")
    assert (tmp_path / "lease2/selectors/ga_s2/probe_runs.tar.gz").is_file()


def test_refusals(tmp_path):
    tb = make_tarball(tmp_path / "r.tar.gz")
    out = tmp_path / "lease"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not empty"):
        import_lease.import_lease(tb, out)
    assert (out / "keep.txt").read_text() == "mine" and len(list(out.iterdir())) == 1
    bare = tmp_path / "bare.tar.gz"
    with tarfile.open(bare, "w:gz") as tf:
        info = tarfile.TarInfo("something/else.txt")
        tf.addfile(info, io.BytesIO(b""))
    with pytest.raises(ConfigError, match="no res/"):
        import_lease.import_lease(bare, tmp_path / "new")
    with pytest.raises(ConfigError, match="--campaign"):
        import_lease.import_lease(tb, tmp_path / "new2", campaign="gemma")
    assert not (tmp_path / "new2").exists()
    evil = make_tarball(tmp_path / "evil.tar.gz", extra={"../escaped.txt": b"x"})
    with pytest.raises(tarfile.TarError):
        import_lease.import_lease(evil, tmp_path / "new3")
    assert not (tmp_path / "escaped.txt").exists()


def test_merge_keeps_sources_and_renames(tmp_path):
    from ds_hybrid.evaluation.merge import main as merge_main

    old = tmp_path / "old_eval"
    old.mkdir()
    (old / "eval.json").write_text(json.dumps(eval_payload("hybrid", 2048, [0.5, 0.25], 100)))
    merged = tmp_path / "merged"
    assert merge_main([f"uniform8=hybrid@{old}", "--out", str(merged)]) == 0
    out = tmp_path / "lease"
    assert import_lease.main([str(make_tarball(tmp_path / "r.tar.gz")), str(out), "--merge", str(merged)]) == 0
    payload = json.loads((merged / "eval.json").read_text())
    assert payload["scores"]["uniform8"]["niah_single_1"] == {"2048": 0.5}  # the earlier rename kept
    assert payload["scores"]["a"]["niah_single_1"] == {"2048": 0.99}
    assert "teacher" not in payload["scores"]  # the preflight is not a result
    # the same lease imported again into the same (emptied) folder is one source, not two
    for f in sorted(out.rglob("*"), reverse=True):
        f.unlink() if f.is_file() else f.rmdir()
    assert import_lease.main([str(make_tarball(tmp_path / "r2.tar.gz")), str(out), "--merge", str(merged)]) == 0
    files = [Path(s["file"]).parent.name for s in json.loads((merged / "eval.json").read_text())["sources"]]
    assert files == ["old_eval", "eval_a_2048"]
    assert json.loads((merged / "eval.json").read_text())["scores"]["uniform8"]["niah_single_1"] == {"2048": 0.5}


def test_an_interrupted_import_leaves_no_folder_and_the_title_names_the_lease(tmp_path, monkeypatch):
    out = tmp_path / "lease"
    real = import_lease.copy_eval
    calls = []

    def dies(src, dst):  # the first evaluation copied, then stopped
        calls.append(dst)
        real(src, dst)
        raise KeyboardInterrupt

    monkeypatch.setattr(import_lease, "copy_eval", dies)
    with pytest.raises(KeyboardInterrupt):
        import_lease.import_lease(make_tarball(tmp_path / "r.tar.gz"), out)
    assert calls and not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["r.tar.gz"]
    monkeypatch.setattr(import_lease, "copy_eval", real)
    seen = []
    monkeypatch.setattr(import_lease.subprocess, "run", lambda cmd, **kw: seen.append(cmd) or
                        type("P", (), {"returncode": 1, "stderr": "no table", "stdout": ""})())
    files = probe_files("run/compare/select/ga_s2", {"baseline": ([], 0.9, True)})
    import_lease.import_lease(make_tarball(tmp_path / "s.tar.gz", extra=files), out)
    assert seen and seen[0][seen[0].index("--title") + 1] == "ga_s2 single-layer probes (lease)"


def test_merge_finds_sources_recorded_relative_to_another_folder(tmp_path, monkeypatch, capsys):
    from ds_hybrid.evaluation.merge import main as merge_main

    (tmp_path / "old_eval").mkdir()
    (tmp_path / "old_eval" / "eval.json").write_text(json.dumps(eval_payload("hybrid", 2048, [0.5, 0.25], 100)))
    monkeypatch.chdir(tmp_path)  # the merge made at the repository's root records "old_eval/eval.json"
    assert merge_main(["uniform8=hybrid@old_eval", "--out", "merged"]) == 0
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")  # the import run from a folder below it
    tb = str(make_tarball(tmp_path / "r.tar.gz"))
    assert import_lease.main([tb, "lease", "--merge", str(tmp_path / "merged")]) == 0
    payload = json.loads((tmp_path / "merged" / "eval.json").read_text())
    assert payload["scores"]["uniform8"]["niah_single_1"] == {"2048": 0.5}
    assert payload["scores"]["a"]["niah_single_1"] == {"2048": 0.99}
    # the sources stay recorded relative to the folder the merge was made in, the new one too: merged again from there
    assert [s["file"] for s in payload["sources"]] == ["old_eval/eval.json", "sub/lease/eval_a_2048/eval.json"]
    monkeypatch.chdir(tmp_path)
    assert import_lease.main([str(make_tarball(tmp_path / "r3.tar.gz", extra={
        "res/eval_b_2048/eval.json": json.dumps(eval_payload("b", 2048, [0.7, 0.1], 100)).encode()})),
        "lease3", "--merge", "merged"]) == 0
    payload = json.loads((tmp_path / "merged" / "eval.json").read_text())
    assert set(payload["scores"]) == {"uniform8", "a", "b"} and payload["scores"]["b"]["niah_single_1"] == {"2048": 0.7}
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "lease3").stat().st_mode & 0o777 == 0o777 & ~umask  # (not mkdtemp's 0700)
    monkeypatch.chdir(tmp_path / "sub")
    # a source found nowhere: refused with the import kept whole and said so
    (tmp_path / "old_eval" / "eval.json").rename(tmp_path / "old_eval" / "gone.json")
    capsys.readouterr()
    assert import_lease.main([tb, "lease2", "--merge", str(tmp_path / "merged")]) == 2
    err = capsys.readouterr().err
    assert "old_eval/eval.json is not found" in err and "the import itself is whole in lease2" in err
    assert (tmp_path / "sub" / "lease2" / "eval_a_2048" / "eval.json").is_file()
