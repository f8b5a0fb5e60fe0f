"""Evaluation on CPU: RULER tasks build offline, hold their answers, and score an oracle 1 and a mute model 0;
SWDE/FDA from local files with an oracle and a mute model; the real SmolLM2 teacher finds a needle at 1024 tokens; the
inference benchmark reports both models."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from lm_eval.api.model import LM
from trainer_utils import make_tiny_teacher

from ds_hybrid.errors import ConfigError
from ds_hybrid.evaluation import recall, report
from ds_hybrid.evaluation.decode_floor import decode_step_bytes
from ds_hybrid.evaluation.speed import bench_pair
from ds_hybrid.teacher import load_teacher, resolve_teacher

pytestmark = pytest.mark.slow
FIXTURES = Path(__file__).parent / "fixtures"


class FixedLM(LM):
    """Answers every generation request from a prompt -> answer map (or with a constant)."""

    def __init__(self, answers: dict[str, str] | None = None, constant: str = ""):
        super().__init__()
        self.answers, self.constant = answers or {}, constant

    def generate_until(self, requests, disable_tqdm: bool = False):
        return [self.answers.get(r.args[0].strip(), self.constant) for r in requests]

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError


@pytest.fixture(scope="module", autouse=True)
def offline():
    recall.prepare_offline()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = make_tiny_teacher(tmp_path_factory.mktemp("tiny") / "t", tie=False)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(d).eval(), AutoTokenizer.from_pretrained(d), str(d)


class OracleLM(FixedLM):
    """Answers every request with its document's expected outputs; records whether the prompt holds them."""

    def __init__(self):
        super().__init__()
        self.answer_in_prompt: list[tuple[str, bool]] = []

    def generate_until(self, requests, disable_tqdm: bool = False):
        for r in requests:
            self.answer_in_prompt.append((r.task_name, all(o in r.args[0] for o in r.doc["outputs"])))
        return [" " + ", ".join(r.doc["outputs"]) + "." for r in requests]


def test_every_ruler_task_builds_offline_and_scores_an_oracle_one_and_a_mute_model_zero(tiny):
    """Every task of the recall suite (RULER's and the essay haystacks) builds offline; each prompt holds its answers
    (the needles, the variables, the frequent words); an oracle scores 1, a model that answers nothing useful 0, and
    a real HF model runs through lm-eval's HFLM to a score in [0, 1]."""
    from lm_eval.models.huggingface import HFLM

    from ds_hybrid.evaluation.haystack import haystack_words

    model, tok, path = tiny
    tasks = recall.SUITES["recall"]
    specs = recall.ruler_configs(tasks, [1024], path, haystack_words(), limit=2)
    oracle = OracleLM()
    scores = recall.scores_from(recall.run_tasks(oracle, specs, None), [1024])
    assert scores == {t: {"1024": 1.0} for t in tasks}
    assert sorted({t for t, _ in oracle.answer_in_prompt}) == sorted(tasks)
    assert all(ok for _, ok in oracle.answer_in_prompt), oracle.answer_in_prompt
    mute = recall.scores_from(recall.run_tasks(FixedLM(constant=" I do not know."), specs, None), [1024])
    assert mute == {t: {"1024": 0.0} for t in tasks}
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=1, max_length=1024, device="cpu")
    scores = recall.scores_from(recall.run_tasks(lm, specs, None), [1024])
    assert set(scores) == set(tasks)
    for t in tasks:
        assert 0.0 <= scores[t]["1024"] <= 1.0, (t, scores[t])


def test_ruler_task_configs_carry_lm_evals_target_delimiters(tiny):
    """The text between a RULER question and its answer prefix is lm-eval's own (cwe.yaml: a blank line), so the
    prompts are lm-eval's and the scores comparable with published ones."""
    import lm_eval
    import yaml

    ruler = Path(lm_eval.__file__).parent / "tasks" / "ruler"
    yamls = {"niah_single_1": "niah_single_1", "niah_multikey_2": "niah_multikey_2", "niah_multikey_3": "niah_multikey_3",
             "ruler_vt": "vt", "ruler_cwe": "cwe", "ruler_fwe": "fwe"}

    def delimiter(name: str) -> str:
        text = (ruler / f"{name}.yaml").read_text()
        line = re.search(r"^target_delimiter:.*$", text, flags=re.M)
        if line:
            return yaml.safe_load(line.group(0))["target_delimiter"]
        return delimiter(re.search(r"^include: (\S+)\.yaml$", text, flags=re.M).group(1))

    specs = recall.ruler_configs(list(yamls), [1024], tiny[2], None, limit=1)
    got = {spec["task"]: spec["target_delimiter"] for spec in specs}
    assert got == {t: delimiter(y) for t, y in yamls.items()} and got["ruler_cwe"] == "\n\n"


def test_limited_ruler_runs_draw_only_the_samples_they_keep(tiny, monkeypatch):
    """lm-eval's wrappers ask their generator for 500 samples per length; with a limit, ours asks for the limit."""
    import importlib

    from ds_hybrid.evaluation.haystack import haystack_words

    _, _, path = tiny
    asked: list[int] = []
    for mod, name in recall.RULER_GENERATORS.items():
        module = importlib.import_module(f"lm_eval.tasks.ruler.{mod}")

        def spy(*args, _original=getattr(module, name), **kwargs):
            asked.append(kwargs.get("num_samples", recall.RULER_SAMPLES))
            return _original(*args, **kwargs)

        monkeypatch.setattr(module, name, spy)
    tasks = recall.SUITES["recall"]
    for spec in recall.ruler_configs(tasks, [1024], path, haystack_words(), limit=2):
        test = spec["custom_dataset"](**spec["metadata"])["test"]
        assert test["max_length"] == [1024, 1024], spec["task"]
    assert asked and max(asked) <= 2  # every RULER module's generator ran, never for more than the limit
    assert len(asked) >= len(recall.RULER_TASKS)
    for mod, name in recall.RULER_GENERATORS.items():  # the caps are undone afterwards
        assert getattr(importlib.import_module(f"lm_eval.tasks.ruler.{mod}"), name).__name__ == "spy"


@pytest.mark.parametrize("name,path", [("swde", "swde_fixture.jsonl"), ("fda", "fda_fixture.json")])
def test_based_tasks_oracle_scores_one_and_mute_scores_zero(name, path):
    records = recall.load_based_records(FIXTURES / path, f"--{name}")
    spec = [recall.based_config(name, FIXTURES / path)]
    oracle = FixedLM({recall.based_prompt(r): f" {r['value']} and more" for r in records})
    assert recall.scores_from(recall.run_tasks(oracle, spec, None), [])[f"{name}_local"]["contains"] == 1.0
    mute = FixedLM(constant="")
    assert recall.scores_from(recall.run_tasks(mute, spec, None), [])[f"{name}_local"]["contains"] == 0.0
    half = FixedLM({recall.based_prompt(r): r["value"].upper() for r in records[::2]})  # case-insensitive
    got = recall.scores_from(recall.run_tasks(half, spec, None), [])[f"{name}_local"]["contains"]
    assert got == pytest.approx(len(records[::2]) / len(records))


def test_limit_applies_to_every_length():
    import datasets

    def gen(**kwargs):  # like RULER's generators: all samples of one length, then the next
        rows = [{"max_length": L, "i": i} for L in (1024, 2048, 4096) for i in range(10)]
        return {"test": datasets.Dataset.from_list(rows)}

    test = recall._per_length_limit(gen, 3)["test"]
    assert test["max_length"] == [1024] * 3 + [2048] * 3 + [4096] * 3


def test_truncation_is_counted(tiny):
    _, tok, _ = tiny
    records = recall.load_based_records(FIXTURES / "swde_fixture.jsonl", "--swde")
    lengths = [len(tok(recall.based_prompt(r))["input_ids"]) for r in records]
    max_length = sorted(lengths)[len(lengths) // 2] + recall.BASED_MAX_GEN_TOKS
    expected = sum(n > max_length - recall.BASED_MAX_GEN_TOKS for n in lengths)
    assert 0 < recall.count_truncated(records, tok, max_length) == expected < len(records)
    assert recall.count_truncated(records, tok, 100_000) == 0


def test_bad_based_files_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="--swde.*no such file"):
        recall.load_based_records(tmp_path / "x.jsonl", "--swde")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "doc\nkey:"}) + "\n")
    with pytest.raises(ConfigError, match="record 0 needs 'value'"):
        recall.load_based_records(bad, "--swde")
    bad.write_text(json.dumps({"text": "doc\nkey:", "value": "  "}) + "\n")  # an empty answer matches everything
    with pytest.raises(ConfigError, match="record 0 has the value '  ': the answer must be non-empty text"):
        recall.load_based_records(bad, "--swde")
    for name, text in (("empty.jsonl", ""), ("rows.json", json.dumps({"rows": [{"text": "a\nb:", "value": "x"}]})),
                       ("list.json", "[]")):  # no records: refused here, not as an IndexError inside lm-eval
        (tmp_path / name).write_text(text)
        with pytest.raises(ConfigError, match=r"^--fda=.*holds no records"):
            recall.load_based_records(tmp_path / name, "--fda")
    num = tmp_path / "num.jsonl"
    num.write_text(json.dumps({"text": "the year\nyear:", "value": 1448}) + "\n")
    assert recall.load_based_records(num, "--swde")[0]["value"] == "1448"  # a number in the file: its text
    # unreadable files: refused by name, not a traceback (a JSONL file named .json; a bad line; a compressed file)
    rec = {"text": "a\nb:", "value": "x"}
    lines = tmp_path / "lines.json"
    lines.write_text(json.dumps(rec) + "\n" + json.dumps(rec) + "\n")
    with pytest.raises(ConfigError, match=r"^--swde=.*not JSON: Extra data at line 2 \(a record a line\? name the "
                                          r"file \.jsonl\)"):
        recall.load_based_records(lines, "--swde")
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps(rec) + "\n{\"text\": \n")
    with pytest.raises(ConfigError, match=r"^--fda=.*line 2 is not a JSON record"):
        recall.load_based_records(broken, "--fda")
    import gzip

    packed = tmp_path / "packed.json"
    packed.write_bytes(gzip.compress(json.dumps([rec]).encode()))
    with pytest.raises(ConfigError, match=r"^--fda=.*not UTF-8 text"):
        recall.load_based_records(packed, "--fda")
    # the two layouts in one file: a dataset takes its columns from the first record, and the other layout's
    # records lost theirs (a KeyError inside lm-eval, after the model had loaded)
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(json.dumps(rec) + "\n" + json.dumps({"context": "doc", "key": "k", "value": "x"}) + "\n")
    with pytest.raises(ConfigError, match=r"^--swde=.*record 0 is of the 'text' layout and record 1 of the "
                                          r"'context\+key' one"):
        recall.load_based_records(mixed, "--swde")
    assert len(recall.load_based_records(mixed, "--swde", rebuilt=True)) == 2  # (--window answer: one text each)
    # both layouts' fields in every record, empty where unused (as parquet gives them): nothing is lost, taken
    both = tmp_path / "both.jsonl"
    both.write_text(json.dumps({**rec, "context": None, "key": None}) + "\n"
                    + json.dumps({"text": None, "context": "doc", "key": "k", "value": "x"}) + "\n")
    assert [recall.based_prompt(r) for r in recall.load_based_records(both, "--swde")] == ["a\nb:", "doc\nk:"]


def test_real_teacher_finds_the_needle_at_1024_tokens():
    """Measured: SmolLM2-135M-Instruct (bf16, CPU, greedy) found 6/6 niah_single_1 needles at 1024 tokens.
    Chance is ~0 (a 7-digit number). Floor asserted: 3 of 4."""
    from lm_eval.models.huggingface import HFLM

    model, tok = load_teacher(None, dtype=torch.bfloat16)
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=1, max_length=1024, device="cpu")
    specs = recall.ruler_configs(["niah_single_1"], [1024], resolve_teacher(None), None, limit=4)
    score = recall.scores_from(recall.run_tasks(lm, specs, None), [1024])["niah_single_1"]["1024"]
    assert score >= 0.75


def test_inference_benchmark_reports_both_models_and_the_hybrid_cache_is_smaller(tiny, capsys):
    from ds_hybrid.transfer import build_hybrid

    teacher = tiny[0]
    hybrid = build_hybrid(teacher, [1], "gdn").eval()
    lengths = {"timed": [], "warm": []}  # key lengths that softmax attention saw in decode steps

    def spy(module, args, kwargs):
        ids = kwargs.get("input_ids")
        if ids is not None and ids.shape[1] == 1:
            lengths["current"].append(kwargs["past_key_values"].get_seq_length())

    handles = [m.register_forward_pre_hook(spy, with_kwargs=True) for m in (hybrid, teacher)]
    import ds_hybrid.evaluation.speed as speed

    real = speed.bench_model
    calls = []

    def tracked(model, context, batch, decode_tokens=32, seed=0, release=True):
        calls.append(decode_tokens)
        lengths["current"] = lengths["warm" if release else "timed"]
        return real(model, context, batch, decode_tokens, seed, release)

    speed.bench_model = tracked
    try:
        rows = bench_pair({"hybrid": hybrid, "teacher": teacher}, contexts=[64, 256], batches=[1], decode_tokens=4)
    finally:
        speed.bench_model = real
        for h in handles:
            h.remove()
    # every key length a timed decode step meets was met untimed first (cuDNN attention builds a graph per length)
    assert calls == [4] * 8 and set(lengths["timed"]) <= set(lengths["warm"]) and len(lengths["timed"]) == 16
    assert {r["model"] for r in rows} == {"hybrid", "teacher"} and len(rows) == 4
    # each row is printed as it lands (a run cut short keeps what it measured), the same numbers as returned
    printed = [json.loads(line.split(" ", 2)[2]) for line in capsys.readouterr().out.splitlines()
               if line.startswith("bench-infer row ")]
    assert printed == json.loads(json.dumps(rows))
    for r in rows:
        assert r["prefill_tokens_per_s"] > 0 and r["decode_tokens_per_s"] > 0
        assert "decode_gpu_ms_per_step" not in r  # profiled on CUDA only: never a made-up number on CPU
        model = hybrid if r["model"] == "hybrid" else teacher  # the bytes a step moves, and at what rate
        assert r["decode_step_gb"] == decode_step_bytes(model, 1, r["context"], 4).total / 1e9
        assert r["decode_gb_per_s"] == pytest.approx(r["decode_step_gb"] * r["decode_tokens_per_s"])
    cache = {(r["model"], r["context"]): r["cache_gib"] for r in rows}
    assert cache[("hybrid", 256)] < cache[("teacher", 256)]
    # the teacher's cache grows with context, the hybrid's grows 4x slower (1 softmax layer of 4)
    t_growth = cache[("teacher", 256)] - cache[("teacher", 64)]
    h_growth = cache[("hybrid", 256)] - cache[("hybrid", 64)]
    assert h_growth == pytest.approx(t_growth / 4, rel=0.05)


def test_a_failed_warm_up_is_the_row_and_the_timed_pass_keeps_the_warm_allocator(tiny, monkeypatch):
    """bench-infer's untimed pass gives back the allocator's cached blocks, the timed pass after it does not (a
    cudaMalloc in it was timed); a warm-up that fails (out of memory part way) is the row: a timed pass after it
    would time the compilation and cuDNN graph builds it left undone."""
    from ds_hybrid.evaluation import speed

    calls, real = [], speed.bench_model

    def bench_model(model, context, batch, decode_tokens=32, seed=0, release=True):
        calls.append(release)
        if fail:
            return {"context": context, "batch": batch, "error": "out of memory"}
        return real(model, context, batch, decode_tokens, seed, release)

    monkeypatch.setattr(speed, "bench_model", bench_model)
    fail = True
    rows = bench_pair({"teacher": tiny[0]}, contexts=[64], batches=[1], decode_tokens=2)
    assert calls == [True] and rows[0]["error"] == "out of memory" and "decode_step_gb" not in rows[0]
    calls.clear()
    fail = False
    rows = bench_pair({"teacher": tiny[0]}, contexts=[64], batches=[1], decode_tokens=2)
    assert calls == [True, False] and "error" not in rows[0] and rows[0]["decode_tokens_per_s"] > 0


def test_a_static_rows_step_bytes_count_the_keys_its_cache_holds(tiny):
    """A static-cache row's decode step reads the whole static cache (cache_len keys: the context and the decode
    rounded up), which its bytes and bandwidth count; an eager row's, the context's keys."""
    from ds_hybrid.graph_decode import GraphDecoder

    teacher = tiny[0]
    eager, static = bench_pair({"t": teacher}, contexts=[100], batches=[1], decode_tokens=3, modes=("eager", "static"))
    keys = GraphDecoder(teacher, max_len=100 + 3 + 1).cache_len
    assert keys > 104 and static["decode_step_keys"] == keys and eager["decode_step_keys"] == 100
    size = next(teacher.parameters()).element_size()
    for r in (eager, static):
        assert r["decode_step_gb"] == decode_step_bytes(teacher, 1, r["decode_step_keys"], size).total / 1e9


def test_speed_table_and_plot_show_gpu_columns_only_where_measured(tmp_path):
    from ds_hybrid.evaluation import report

    cpu = {"model": "hybrid", "context": 4096, "batch": 1, "prefill_tokens_per_s": 1e4, "decode_tokens_per_s": 30.0,
           "cache_gib": 0.1}
    gpu = dict(cpu, model="teacher", decode_gpu_ms_per_step=8.0, decode_gpu_bound_tokens_per_s=125.0, peak_gib=1.0)
    lines = report.speed_table([cpu, gpu, {"model": "t", "context": 65536, "batch": 8, "error": "out of memory"}])
    lines = lines.splitlines()
    assert len({line.count("|") for line in lines}) == 1  # every row has every column
    assert "| 30.0 | - | - | 0.1000 |" in lines[2] and "| 30.0 | 8.00 | 125 | 0.1000 | 1.00 | - | - |" in lines[3]
    moved = report.speed_table([dict(gpu, decode_step_gb=0.5, decode_gb_per_s=1875.0)]).splitlines()[2]
    assert moved.endswith("| 1.00 | 0.500 | 1875 |")
    report.plot_speed([cpu, gpu], tmp_path / "s.png")
    assert (tmp_path / "s.png").stat().st_size > 0


def test_answer_window_keeps_the_answer_and_the_question_within_the_budget():
    from ds_hybrid.teacher import load_tokenizer

    tok = load_tokenizer("embedded")
    filler = " ".join(f"row {i} of the table holds nothing of note." for i in range(400))
    doc = {"context": filler + " The manufacturer of the device is Acme Widgets Ltd. " + filler,
           "key": "Manufacturer", "value": "Acme Widgets"}
    prompt, cut = recall.answer_window(doc, tok, 256)
    assert cut and "Acme Widgets" in prompt and prompt.endswith("\nManufacturer:")
    assert len(tok(prompt)["input_ids"]) <= 256 < len(tok(recall.based_prompt(doc))["input_ids"])
    short = {"context": "The maker is Acme.", "key": "Maker", "value": "Acme"}
    assert recall.answer_window(short, tok, 256) == (recall.based_prompt(short), False)
    absent = dict(doc, value="Zebra Corp")  # no answer in the text: the window starts at the beginning
    prompt, cut = recall.answer_window(absent, tok, 256)
    assert cut and prompt.startswith("row 0 of the table")
    # a single text without a newline, and one whose last line (the question) is longer than the budget: both fit,
    # the answer kept and the text's end kept as the question
    one_line = {"text": doc["context"] + " Manufacturer:", "value": "Acme Widgets"}
    long_question = {"text": filler + "\n" + doc["context"] + " Manufacturer:", "value": "Acme Widgets"}
    for d in (one_line, long_question):
        prompt, cut = recall.answer_window(d, tok, 256)
        assert cut and prompt.endswith("Manufacturer:") and "Acme Widgets" in prompt
        assert len(tok(prompt)["input_ids"]) <= 256


def test_held_out_quality_reads_each_models_own_ids_and_the_kl_only_within_the_teachers_tokenizer(tiny, tmp_path,
                                                                                                    caplog):
    """Held-out rows are tokenized per tokenizer (all models read the first model's ids before 2026-12-06): a model
    whose tokenizer lowercases its input is scored on its own ids, with no KL to a teacher of another vocabulary
    mapping; a model of the teacher's tokenizer keeps its KL."""
    import shutil
    from argparse import Namespace

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ds_hybrid import cli
    from ds_hybrid.evaluation.quality import heldout_quality
    from ds_hybrid.evaluation.run import _heldout_rows

    lower = tmp_path / "lower"
    shutil.copytree(tiny[2], lower)
    spec = json.loads((lower / "tokenizer.json").read_text())
    spec["normalizer"] = {"type": "Lowercase"}
    (lower / "tokenizer.json").write_text(json.dumps(spec))
    out = tmp_path / "ev"
    assert cli.main(["eval", "--teacher", tiny[2], "--model", f"same={tiny[2]}", "--model", f"lower={lower}",
                     "--tasks", "", "--heldout-sequences", "2", "--heldout-seq-len", "64", "--out", str(out)]) == 0
    q = json.loads((out / "eval.json").read_text())["heldout_quality"]
    assert "kl_to_teacher" in q["same"] and "kl_to_teacher" not in q["lower"] and "kl_to_teacher" not in q["teacher"]
    assert "lower: its tokenizer is not the teacher's" in caplog.text
    args = Namespace(data="embedded", run_config=None, heldout_seq_len=64, heldout_sequences=2)
    own = _heldout_rows(args, AutoTokenizer.from_pretrained(lower))[0]
    theirs = _heldout_rows(args, AutoTokenizer.from_pretrained(tiny[2]))[0]
    assert not all(torch.equal(a, b) for a, b in zip(own, theirs))  # the two tokenizers' ids differ
    model = AutoModelForCausalLM.from_pretrained(lower).eval()
    assert q["lower"]["ppl"] == pytest.approx(heldout_quality(model, own)["ppl"], rel=1e-5)
    assert q["same"]["ppl"] == pytest.approx(q["teacher"]["ppl"], rel=1e-5)  # (same weights, same rows)


def test_eval_loads_the_teacher_first_only_for_a_kl_to_it(tiny, tmp_path, monkeypatch):
    """The teacher is loaded ahead of the other models (and kept for their KL) only where one of them shares its
    tokenizer; beside a model of another tokenizer alone it loads in its own turn, like any model."""
    import shutil

    from ds_hybrid import cli
    from ds_hybrid.evaluation import run as run_mod

    lower = tmp_path / "lower"
    shutil.copytree(tiny[2], lower)
    spec = json.loads((lower / "tokenizer.json").read_text())
    spec["normalizer"] = {"type": "Lowercase"}
    (lower / "tokenizer.json").write_text(json.dumps(spec))
    order, real_load = [], run_mod.load_model
    monkeypatch.setattr(run_mod, "load_model", lambda path, dev, dtype: order.append(path) or real_load(path, dev, dtype))
    args = ["eval", "--teacher", tiny[2], "--tasks", "", "--heldout-sequences", "1", "--heldout-seq-len", "64"]
    assert cli.main([*args, "--model", f"lower={lower}", "--out", str(tmp_path / "a")]) == 0
    assert order == [str(lower), tiny[2]]
    order.clear()
    assert cli.main([*args, "--model", f"lower={lower}", "--model", f"same={tiny[2]}", "--out",
                     str(tmp_path / "b")]) == 0
    assert order == [tiny[2], str(lower), tiny[2]]  # the teacher first (for same's KL), then lower and same


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the teacher parks in host memory only beside a GPU")
def test_eval_parks_the_teacher_in_host_memory_while_other_models_read_their_prompts(tiny, tmp_path, monkeypatch):
    """On a GPU the teacher (loaded for the held-out KL) waits in host memory while each other model's recall runs
    (its GPU memory given back: the tensors alive on the GPU then are one model's), and is on the GPU for its own recall and for
    each KL pass."""
    from ds_hybrid import cli
    from ds_hybrid.evaluation import run as run_mod
    from ds_hybrid.evaluation import quality as quality_mod

    loaded, seen, allocated = [], [], []
    real_load, real_run, real_quality = run_mod.load_model, recall.run_tasks, quality_mod.heldout_quality

    def load(path, dev, dtype):
        out = real_load(path, dev, dtype)
        if not loaded:  # the first model loaded: the teacher (the others not held here: their memory is freed)
            loaded.append((dev, out[0]))
        return out

    def teacher_device():
        return next(loaded[0][1].parameters()).device.type

    def live_cuda_bytes():  # (not memory_allocated(): it counts cuBLAS's workspace too, 32 MiB on an H100)
        import gc
        import warnings

        gc.collect()
        with warnings.catch_warnings():  # (isinstance on every object touches deprecated ones: torch's reduce_op)
            warnings.simplefilter("ignore")
            storages = {o.untyped_storage().data_ptr(): o.untyped_storage().nbytes() for o in gc.get_objects()
                        if torch.is_tensor(o) and o.is_cuda}
        return sum(storages.values())

    def run_tasks(lm, *a, **kw):
        seen.append(("recall", lm.model is loaded[0][1], teacher_device()))
        allocated.append(live_cuda_bytes())
        return real_run(lm, *a, **kw)

    def quality(model, rows, teacher=None, **kw):
        seen.append(("quality", model is loaded[0][1], teacher_device()))
        return real_quality(model, rows, teacher, **kw)

    monkeypatch.setattr(run_mod, "load_model", load)
    monkeypatch.setattr(recall, "run_tasks", run_tasks)
    monkeypatch.setattr(quality_mod, "heldout_quality", quality)
    out = tmp_path / "ev"
    assert cli.main(["eval", "--device", "cuda", "--teacher", tiny[2], "--model", f"a={tiny[2]}", "--model",
                     f"b={tiny[2]}", "--tasks", "niah_single_1", "--lengths", "1024", "--limit", "1",
                     "--heldout-sequences", "2", "--heldout-seq-len", "64", "--out", str(out)]) == 0
    assert loaded[0][0].type == "cpu"  # the teacher: loaded for the KL, into host memory
    # its own recall and every held-out pass on the GPU; the other models' recall with the teacher parked
    assert seen == [("recall", False, "cpu"), ("quality", False, "cuda"), ("recall", False, "cpu"),
                    ("quality", False, "cuda"), ("recall", True, "cuda"), ("quality", True, "cuda")]
    assert teacher_device() == "cpu"
    size = sum(p.numel() * p.element_size() for p in loaded[0][1].parameters())
    assert allocated[0] < 1.5 * size and allocated[1] < 1.5 * size  # a's (then b's) weights, not the teacher's too
    q = json.loads((out / "eval.json").read_text())["heldout_quality"]
    assert q["a"]["kl_to_teacher"] == pytest.approx(q["b"]["kl_to_teacher"], abs=1e-6)
    assert q["a"]["kl_to_teacher"] == pytest.approx(0.0, abs=1e-3)  # (the same weights as the teacher's)


def make_tiny_multimodal_gemma3(out: Path) -> Path:
    """A Gemma3ForConditionalGeneration folder (a 3-layer text model beside a 1-layer SigLIP tower: how Gemma 3
    4B/12B/27B ship) with the embedded teacher's tokenizer. Its config.json's text_config leaves
    max_position_embeddings out, as google/gemma-3-4b-it's does (Gemma3TextConfig's default, 131,072, applies); the
    image tokens are ids past the tokenizer's, never made from text; norms and embedding are scaled so that its logits
    are far from uniform (a perplexity near the vocabulary size would match any model's)."""
    from transformers import AutoTokenizer, Gemma3Config, Gemma3ForConditionalGeneration

    from ds_hybrid.teacher import embedded_teacher_dir

    tok = AutoTokenizer.from_pretrained(embedded_teacher_dir())
    n = len(tok)
    text = dict(vocab_size=n + 3, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=2,
                num_key_value_heads=1, head_dim=32, sliding_window=32,
                layer_types=["sliding_attention", "full_attention", "sliding_attention"])
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14)
    torch.manual_seed(0)
    cfg = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4, boi_token_index=n,
                       eoi_token_index=n + 1, image_token_index=n + 2, bos_token_id=tok.bos_token_id,
                       eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = Gemma3ForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0, 0.2)
        model.get_input_embeddings().weight.normal_(0, 0.5)  # (tied: the LM head's too)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    spec = json.loads((out / "config.json").read_text())
    del spec["text_config"]["max_position_embeddings"]
    (out / "config.json").write_text(json.dumps(spec))
    return out


def test_a_multimodal_gemma3_folder_is_evaluated_as_its_text_model(tmp_path, capsys):
    """A Gemma3ForConditionalGeneration folder as the teacher row, the text model that extract-text takes out of it as
    a model row: the teacher's layers and context are its text model's (a context the config file leaves out is its
    class default, not a fallback), both rows read the same RULER prompts and generate the same answers, and the
    teacher's held-out loss is HF's own loss of the multimodal model on the same rows, equal to the text model's, with
    no KL between the two."""
    import math
    from argparse import Namespace

    from transformers import AutoModelForCausalLM, AutoTokenizer, Gemma3Config

    from ds_hybrid import cli
    from ds_hybrid.evaluation.run import _heldout_rows
    from ds_hybrid.text_extract import extract_text

    mm = make_tiny_multimodal_gemma3(tmp_path / "gemma-3-tiny-it")
    text = extract_text(mm, tmp_path / "gemma-3-tiny-it-text")
    out = tmp_path / "ev"
    assert cli.main(["eval", "--teacher", str(mm), "--model", f"text={text}", "--tasks", "niah_single_1",
                     "--lengths", "1024", "--limit", "2", "--heldout-sequences", "2", "--heldout-seq-len", "64",
                     "--out", str(out)]) == 0
    res = json.loads((out / "eval.json").read_text())
    cfg = Gemma3Config.from_pretrained(mm).text_config
    info = res["models"]
    assert info["teacher"]["model_type"] == "gemma3" and info["text"]["model_type"] == "gemma3_text"
    assert info["teacher"]["num_layers"] == info["text"]["num_layers"] == cfg.num_hidden_layers == 3
    assert info["teacher"]["max_length"] == info["text"]["max_length"] == cfg.max_position_embeddings == 131072
    assert info["teacher"]["tokenizer"] == info["text"]["tokenizer"]
    # parameters: the multimodal folder's all, and its language model's, which are the extracted text model's
    assert info["teacher"]["text_params"] == info["text"]["params"] < info["teacher"]["params"]
    assert "text_params" not in info["text"]
    # recall: the same prompts, the same greedy answers (not empty: a mute pair would agree on anything)
    samples = {m: [json.loads(x) for x in (out / f"samples_{m}.jsonl").read_text().splitlines()]
               for m in ("teacher", "text")}
    assert len(samples["teacher"]) == 2 and res["prompt_digests"]["teacher"] == res["prompt_digests"]["text"]
    assert [s["generation"] for s in samples["teacher"]] == [s["generation"] for s in samples["text"]]
    assert all(s["generation"].strip() for s in samples["teacher"])
    assert res["scores"]["teacher"] == res["scores"]["text"]
    # held-out quality against HF's loss of the multimodal model, row by row (rows of equal length: the mean of means)
    mm_tok = AutoTokenizer.from_pretrained(mm)
    rows, bos = _heldout_rows(Namespace(data="embedded", run_config=None, heldout_seq_len=64, heldout_sequences=2),
                              mm_tok)
    # each row starts as a run's rows would (data.bos auto: BOS where this tokenizer puts one before every text)
    from ds_hybrid.data import row_bos

    assert bos == row_bos("auto", mm_tok) and (bos is None or all(int(r[0, 0]) == bos for r in rows))
    model = AutoModelForCausalLM.from_pretrained(mm, dtype=torch.float32).eval()
    assert type(model).__name__ == "Gemma3ForConditionalGeneration"
    with torch.no_grad():
        ce = sum(float(model(input_ids=r, labels=r).loss) for r in rows) / len(rows)
    q = res["heldout_quality"]
    assert q["teacher"]["tokens"] == q["text"]["tokens"] == 2 * 63
    assert q["teacher"].get("row_bos") == q["text"].get("row_bos") == bos
    assert q["teacher"]["ce"] == pytest.approx(ce, rel=1e-5)
    assert abs(q["teacher"]["ce"] - math.log(cfg.vocab_size)) > 1  # (not a uniform model's loss)
    assert q["text"]["ce"] == pytest.approx(q["teacher"]["ce"], rel=1e-5)
    assert q["text"]["kl_to_teacher"] == pytest.approx(0.0, abs=1e-5) and "kl_to_teacher" not in q["teacher"]
    # bench-infer times text decoding: the multimodal folder is refused, pointing at extract-text, before any load
    capsys.readouterr()
    assert cli.main(["bench-infer", "--teacher", str(mm), "--model", f"text={text}", "--contexts", "64",
                     "--out", str(tmp_path / "bench")]) == 2
    assert re.match(r"ds-hybrid: error: --teacher=.*multimodal.*extract-text", capsys.readouterr().err)
    assert not (tmp_path / "bench").exists()


def test_cli_eval_writes_table_json_and_plot(tiny, tmp_path):
    import subprocess
    import sys

    from trainer_utils import env

    out = tmp_path / "ev"
    p = subprocess.run([sys.executable, "-m", "ds_hybrid.cli", "eval", "--model", f"tiny={tiny[2]}", "--tasks",
                        "niah_single_1", "--lengths", "1024", "--swde", str(FIXTURES / "swde_fixture.jsonl"),
                        "--limit", "2", "--heldout-sequences", "2", "--heldout-seq-len", "128", "--out", str(out)],
                       capture_output=True, text=True, env=env(), timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads((out / "eval.json").read_text())
    assert set(res["scores"]["tiny"]) == {"niah_single_1", "swde_local"}
    assert res["heldout_quality"]["tiny"]["ppl"] > 1 and res["truncated_prompts"]["swde"]["tiny"] == 0
    assert (out / "eval.md").read_text().startswith("| task | length | tiny |")
    assert (out / "recall_vs_length.png").stat().st_size > 1000
    # the evaluation length defaults to the model's context, apart from RULER's --lengths
    assert res["models"]["tiny"]["max_length"] == json.loads((Path(tiny[2]) / "config.json").read_text())[
        "max_position_embeddings"]
    # what the model said, prompt by prompt, next to eval.json
    samples = [json.loads(x) for x in (out / "samples_tiny.jsonl").read_text().splitlines()]
    assert {s["task"] for s in samples} == {"niah_single_1", "swde_local"} and len(samples) == 4
    for s in samples:
        assert set(s) >= {"task", "id", "gold", "generation", "score"} and s["gold"] and isinstance(s["generation"], str)
        assert s["score"] and all(0 <= v <= 1 for v in s["score"].values())
    # every score says how many prompts it rests on, with its 95 % interval, in the JSON and the table
    assert res["prompts"]["tiny"] == {"niah_single_1": {"1024": 2}, "swde_local": {"contains": 2}}
    for task, row in res["scores"]["tiny"].items():
        for metric, v in row.items():
            lo, hi = res["ci95"]["tiny"][task][metric]
            assert lo <= v <= hi and (lo, hi) == pytest.approx(report.wilson_interval(v, 2))
    assert "n=2" in (out / "eval.md").read_text()
    # beside RULER's string match, the strict score; which prompts the scores come from; the held-out settings
    strict = res["strict_scores"]["tiny"]["niah_single_1"]["1024"]
    assert strict == sum(recall.strict_score(s["gold"], s["generation"]) for s in samples[:2]) / 2
    assert set(res["prompt_digests"]["tiny"]["niah_single_1"]["1024"]) == {"golds", "prompts"}
    assert res["prompt_digests"]["tiny"]["niah_single_1"]["1024"] == \
        recall.prompt_digests(samples)["niah_single_1"]["1024"]
    assert res["heldout"]["sequences"] == 2 and res["heldout"]["seq_len"] == 128
    assert res["models"]["tiny"]["tokenizer"]  # merges compare prompts within one tokenizer
    # how much of its length each RULER prompt fills (RULER's size: prompt + generation tokens), per prompt and mean
    assert res["complete"] is True
    sizes = [s["ruler_length"] for s in samples if s["task"] == "niah_single_1"]
    assert len(sizes) == 2 and all(512 < n <= 1024 for n in sizes)
    # each prompt's tokens as the model reads it: RULER's text, its delimiter and generation prefix (a few tokens
    # more than RULER's size less the generation), none cut at this length
    for s in samples[:2]:
        assert 0 < s["context_tokens"] - (s["ruler_length"] - s["max_gen_toks"]) < 64, s
    assert all("context_tokens" not in s for s in samples[2:])  # (SWDE's: counted by truncated_prompts already)
    assert res["ruler_truncated"] == {"tiny": {}}
    assert res["ruler_fill"]["tiny"] == {"niah_single_1": {"1024": round(sum(sizes) / 2 / 1024, 4)}}


def crash_on_second_load(monkeypatch) -> list[str]:
    """run.load_model fails on its second call (a simulated out-of-memory); returns the folders it was asked for."""
    from ds_hybrid.evaluation import run as run_mod

    real, calls = run_mod.load_model, []

    def load(*a, **k):
        calls.append(a[0])
        if len(calls) == 2:
            raise RuntimeError("out of memory (simulated)")
        return real(*a, **k)

    monkeypatch.setattr(run_mod, "load_model", load)
    return calls


def test_a_crash_keeps_the_scores_of_the_models_done(tiny, tmp_path, monkeypatch):
    """eval.json is rewritten after each model: the second model's crash leaves the first one's scores, marked
    partial, and its samples."""
    from ds_hybrid import cli

    crash_on_second_load(monkeypatch)
    out = tmp_path / "ev"
    with pytest.raises(RuntimeError, match="simulated"):
        cli.main(["eval", "--model", f"first={tiny[2]}", "--model", f"second={tiny[2]}", "--tasks", "niah_single_1",
                  "--lengths", "1024", "--limit", "1", "--no-quality", "--out", str(out)])
    res = json.loads((out / "eval.json").read_text())
    assert res["complete"] is False and set(res["scores"]) == {"first"} and res["prompts"]["first"]["niah_single_1"]
    assert (out / "samples_first.jsonl").is_file() and "partial: 1 of 2 models" in (out / "eval.md").read_text()
    from ds_hybrid.evaluation import merge  # merged as it is, said to be partial, its prompts' fill carried

    merged = merge.merge([str(out)])
    assert merged["partial_sources"] == [str(out / "eval.json")] and set(merged["scores"]) == {"first"}
    assert merged["ruler_fill"] == res["ruler_fill"] and res["ruler_fill"]["first"]["niah_single_1"]["1024"] > 0.5
    assert merged["ruler_truncated"] == res["ruler_truncated"] == {"first": {}}


def test_resume_keeps_the_models_done_and_evaluates_the_rest(tiny, tmp_path, monkeypatch, capsys, caplog):
    """--resume after a crash: the model the first run finished is not loaded again, its scores, counts and samples
    stay as they were, the other is evaluated, and the table is complete; other settings are refused by name."""
    from ds_hybrid import cli
    from ds_hybrid.evaluation import run as run_mod

    real = run_mod.load_model
    calls = crash_on_second_load(monkeypatch)
    out = tmp_path / "ev"
    argv = ["eval", "--model", f"first={tiny[2]}", "--model", f"second={tiny[2]}", "--tasks", "niah_single_1",
            "--lengths", "1024", "--limit", "1", "--heldout-sequences", "1", "--heldout-seq-len", "64",
            "--out", str(out)]
    with pytest.raises(RuntimeError, match="simulated"):
        cli.main(argv)
    first = json.loads((out / "eval.json").read_text())
    samples = (out / "samples_first.jsonl").read_text()
    more = list(argv)
    more[more.index("--limit") + 1] = "2"
    assert cli.main(more + ["--resume"]) == 2
    assert re.search(r"--resume=.*eval.json'?: that evaluation ran with limit = 1, this one asks for 2",
                     capsys.readouterr().err)
    # another batch size is another setting (lm-eval left-pads a batch; bf16 greedy tokens may follow it)
    assert cli.main(argv + ["--batch-size", "2", "--resume"]) == 2
    assert re.search(r"that evaluation ran with batch_size = 1, this one asks for 2", capsys.readouterr().err)
    calls.clear()
    monkeypatch.setattr(run_mod, "load_model", lambda *a, **k: (calls.append(a[0]), real(*a, **k))[1])
    earlier = json.loads((out / "eval.json").read_text())  # (as if the first run had another transformers)
    earlier["versions"]["transformers"] = "4.0.0"
    (out / "eval.json").write_text(json.dumps(earlier))
    with caplog.at_level("WARNING", logger="ds_hybrid"):
        cli.main(argv + ["--resume"])
    assert re.search(r"--resume: the models kept from .* other versions or another GPU .*transformers 4\.0\.0 -> ",
                     caplog.text)
    res = json.loads((out / "eval.json").read_text())
    assert calls == [tiny[2]]  # the second model only
    assert res["complete"] is True and set(res["scores"]) == {"first", "second"}
    for key in ("scores", "prompts", "strict_scores", "prompt_digests", "ruler_fill", "heldout_quality"):
        assert res[key]["first"] == first[key]["first"], key
    assert res["models"]["first"] == first["models"]["first"] and (out / "samples_first.jsonl").read_text() == samples
    assert res["heldout_quality"]["second"]["ppl"] > 1 and res["prompts"]["second"] == res["prompts"]["first"]
    # a model of the same name from another folder is not the one evaluated: refused
    import shutil

    other = tmp_path / "elsewhere"
    shutil.copytree(tiny[2], other)
    assert cli.main([a.replace(f"second={tiny[2]}", f"second={other}") for a in argv] + ["--resume"]) == 2
    assert re.search(r"its model 'second' was .* this one is '.*elsewhere'", capsys.readouterr().err)
    # a model of that evaluation left out of the command: rewriting eval.json would lose its scores, so refused
    i = argv.index(f"second={tiny[2]}")
    fewer = argv[:i - 1] + argv[i + 1:]  # (without "--model second=...")
    assert cli.main(fewer + ["--resume"]) == 2
    assert re.search(r"--resume=.*eval.json'?: it holds second, not named in this command", capsys.readouterr().err)
    assert set(json.loads((out / "eval.json").read_text())["scores"]) == {"first", "second"}


def test_ruler_lengths_past_the_evaluation_length_are_refused_before_a_model_loads(tiny, monkeypatch, capsys):
    """lm-eval would cut such prompts from the left (the needle with them) and score them under the length asked."""
    from ds_hybrid import cli

    monkeypatch.setattr("ds_hybrid.evaluation.run.load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    assert cli.main(["eval", "--model", f"tiny={tiny[2]}", "--tasks", "niah_single_1", "--lengths", "1024,2048",
                     "--no-quality", "--out", "/nonexistent/never"]) == 2
    assert re.search(r"error: --lengths='1024,2048': tiny is evaluated at 1024 tokens.*raise --max-length to 2048",
                     capsys.readouterr().err)
    assert cli.main(["eval", "--model", f"tiny={tiny[2]}", "--tasks", "niah_essay_single", "--lengths", "4096",
                     "--max-length", "2048", "--no-quality", "--out", "/nonexistent/never"]) == 2
    assert "error: --lengths='4096': tiny is evaluated at 2048 tokens" in capsys.readouterr().err
    # too short for a RULER prompt (found after the model had loaded; ruler_cwe's word search could loop for ever)
    assert cli.main(["eval", "--model", f"tiny={tiny[2]}", "--tasks", "niah_single_1,ruler_cwe", "--lengths",
                     "512,1024", "--no-quality", "--out", "/nonexistent/never"]) == 2
    assert re.search(r"error: --lengths='512,1024': 512 is too short for a RULER or essay prompt \(niah_single_1, "
                     r"ruler_cwe\): use lengths of 1024 tokens and up", capsys.readouterr().err)
    # held-out rows longer than the model's context: its quality would be scored past its positions
    assert cli.main(["eval", "--model", f"tiny={tiny[2]}", "--tasks", "", "--heldout-seq-len", "2048",
                     "--out", "/nonexistent/never"]) == 2
    assert re.search(r"error: --heldout-seq-len=2048: longer than tiny's context \(1024 tokens\)",
                     capsys.readouterr().err)


def test_an_evaluation_without_samples_leaves_no_earlier_samples_file_beside_it(tiny, tmp_path):
    """A held-out-quality-only evaluation into a folder an earlier recall evaluation used: its samples file was left,
    and eval-merge read it as this model's (old prompt digests and strict scores)."""
    from ds_hybrid import cli

    out = tmp_path / "ev"
    out.mkdir()
    (out / "samples_tiny.jsonl").write_text(json.dumps({"task": "niah_single_1", "id": 0, "gold": ["1"],
                                                        "generation": "1", "length": 1024}) + "\n")
    assert cli.main(["eval", "--model", f"tiny={tiny[2]}", "--tasks", "", "--heldout-sequences", "1",
                     "--heldout-seq-len", "64", "--out", str(out)]) == 0
    assert not (out / "samples_tiny.jsonl").exists()
    assert "samples" not in json.loads((out / "eval.json").read_text())["models"]["tiny"]


def test_bad_tasks_names_and_haystacks_are_refused_before_a_model_loads(tiny, tmp_path, monkeypatch, capsys):
    from ds_hybrid import cli

    monkeypatch.setattr("ds_hybrid.evaluation.run.load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    base = ["eval", "--model", f"tiny={tiny[2]}", "--lengths", "1024", "--no-quality", "--out", str(tmp_path / "o")]
    cases = [
        (["--tasks", "niah_single_1,swde"], r"--tasks='swde': swde reads a local file: pass --swde FILE"),
        (["--tasks", "niah_single_9"], r"--tasks='niah_single_9': unknown task"),
        (["--tasks", "niah_single_1", "--model", f"a/b={tiny[2]}"], r"--model='a/b': a model's name names its rows and files"),
        (["--tasks", "niah_essay_single", "--haystack", str(tmp_path / "none.txt")],
         r"--haystack='.*none\.txt': no such file"),
        (["--tasks", "niah_essay_single", "--haystack", str(tmp_path / "hay.jsonl")],
         r"--haystack='.*hay\.jsonl': not a plain-text file"),
        (["--tasks", "niah_essay_single", "--haystack", str(tmp_path / "short.txt"), "--lengths", "8192",
          "--max-length", "8192"],
         r"--haystack='.*short\.txt': holds \d+ tokens \(2400 words\) with tiny's tokenizer, fewer than the 8064 the "
         r"longest of --lengths needs"),
    ]
    (tmp_path / "hay.jsonl").write_text(json.dumps({"text": "x " * 3000}) + "\n")
    (tmp_path / "short.txt").write_text("Words. " * 2400)  # the 2,000 words a haystack needs, ~4,800 tokens
    for extra, want in cases:
        assert cli.main(base + extra) == 2, extra
        assert re.search(rf"error: {want}", capsys.readouterr().err), extra
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("gold, generation, want", [
    (["6057437"], " 6057437.", 1.0),
    (["6057437"], " 12.\nThe special magic number is 6057437.", 0.0),  # a wrong answer first: RULER's match says 1
    (["1363000"], " 13630000.", 0.0),  # inside a longer number
    (["1363000"], " The number is 1363000, as said.", 1.0),
    (["3a1e9c2d-0b4f-4c5e-9a7b-1c2d3e4f5a6b"], " 3a1e9c2d-0b4f-4c5e-9a7b-1c2d3e4f5a6b", 1.0),
    (["3a1e9c2d-0b4f-4c5e-9a7b-1c2d3e4f5a6b"], " 0a1e9c2d-0b4f-4c5e-9a7b-1c2d3e4f5a6b 3a1e9c2d-0b4f-4c5e-9a7b-1c2d3e4f5a6b",
     0.0),
    (["12", "34"], " 12 and 345", 0.5),  # several golds: each whole
    (["Apple"], " the apple.", 1.0),
    (["6057437"], " abc6057437", 0.0),  # joined to a word: not said as itself
    (["6057437"], " key2 6057437.", 1.0),  # a number inside a word is no answer
    (["6057437"], None, 0.0),
])
def test_strict_score_wants_the_first_answer_whole(gold, generation, want):
    from lm_eval.tasks.ruler.common_utils import string_match_all

    assert recall.strict_score(gold, generation) == want
    if generation is not None and want == 0.0:  # each of these RULER's metric credits
        assert string_match_all([generation], [gold]) == 1.0


def _with_samples(folder: Path, model: str, golds: list[str], gz: bool = False) -> None:
    import gzip

    lines = "".join(json.dumps({"task": "niah_single_1", "id": i, "length": 2048, "gold": [g],
                                "generation": f" {g}" if i else " 1. " + g, "score": {"2048": 1.0}}) + "\n"
                    for i, g in enumerate(golds))
    if gz:
        with gzip.open(folder / f"samples_{model}.jsonl.gz", "wt") as f:
            f.write(lines)
    else:
        (folder / f"samples_{model}.jsonl").write_text(lines)


def test_eval_merge_reads_past_a_samples_file_cut_short(tmp_path, capsys):
    """A samples file cut short (a copy stopped part way, a gzip without its end) gave a traceback: eval-merge merges
    the scores and says the file's prompts were not compared."""
    from ds_hybrid.evaluation import merge

    a = _eval_json(tmp_path / "a", {"hyb": {"niah_single_1": {"2048": 1.0}}}, {"hyb": {"niah_single_1": {"2048": 3}}})
    _with_samples(a, "hyb", ["111", "222", "333"], gz=True)
    packed = (a / "samples_hyb.jsonl.gz").read_bytes()
    damaged = bytearray(packed)
    damaged[len(packed) // 2: len(packed) // 2 + 4] = b"\xff\x00\xff\x00"  # (a deflate error: zlib.error)
    for cut in (packed[:len(packed) // 2], packed[:-9] + b"\n{\"task\":", bytes(damaged)):
        (a / "samples_hyb.jsonl.gz").write_bytes(cut)
        res = merge.merge([str(a)])
        assert res["scores"]["hyb"] == {"niah_single_1": {"2048": 1.0}} and "hyb" not in res.get("strict_scores", {})
        assert re.search(r"eval-merge: .*samples_hyb.jsonl.gz is unreadable \(\w+", capsys.readouterr().err)
    # cut at the end of a line: it reads, but holds fewer prompts than the scores count (2 of 3)
    (a / "samples_hyb.jsonl.gz").unlink()
    _with_samples(a, "hyb", ["111", "222"])
    res = merge.merge([str(a)])
    assert "hyb" not in res.get("strict_scores", {})
    assert "samples of hyb do not hold every prompt its scores count" in capsys.readouterr().err


def test_eval_merge_refuses_scores_from_other_prompts_and_carries_strict_scores(tmp_path):
    """A task's prompts depend on the tasks, lengths, limit and haystack of a run (lm-eval's generators share one
    seeded stream): two models' scores of one task and length side by side must come from the same prompts."""
    from ds_hybrid.evaluation import merge

    score = lambda m: {m: {"niah_single_1": {"2048": 1.0}}}  # noqa: E731
    count = lambda m: {m: {"niah_single_1": {"2048": 3}}}  # noqa: E731
    a = _eval_json(tmp_path / "a", score("teacher"), count("teacher"))
    b = _eval_json(tmp_path / "b", score("hyb"), count("hyb"))
    c = _eval_json(tmp_path / "c", score("other"), count("other"))
    _with_samples(a, "teacher", ["111", "222", "333"])
    _with_samples(b, "hyb", ["111", "222", "333"], gz=True)  # as bench/import_lease.py keeps them
    _with_samples(c, "other", ["111", "222", "999"])
    res = merge.merge([str(a), str(b)])
    assert res["prompt_digests"]["teacher"] == res["prompt_digests"]["hyb"] and "prompts_differ" not in res
    # computed from the samples: the first prompt's answer came after a wrong one
    assert res["strict_scores"]["hyb"]["niah_single_1"]["2048"] == pytest.approx(2 / 3)
    with pytest.raises(ConfigError, match=r"other's niah_single_1 at 2048 comes from other prompts .* than teacher's"):
        merge.merge([str(a), str(b), str(c)])
    res = merge.merge([str(a), str(c)], allow_other_prompts=True)
    assert [(d["model"], d["differs_from"]["model"]) for d in res["prompts_differ"]] == [("other", "teacher")]
    # RULER sizes prompts with each model's tokenizer: models of other tokenizers are not compared
    for folder, model, tok in ((a, "teacher", "tokA"), (c, "other", "tokB")):
        rec = json.loads((folder / "eval.json").read_text())
        rec["models"] = {model: {"model_type": "llama", "num_layers": 2, "tokenizer": tok}}
        (folder / "eval.json").write_text(json.dumps(rec))
    assert "prompts_differ" not in merge.merge([str(a), str(c)])
    # every length of every file is kept in the merge's record of the digests
    d = _eval_json(tmp_path / "d", {"hyb": {"niah_single_1": {"4096": 1.0}}}, {"hyb": {"niah_single_1": {"4096": 3}}})
    (d / "samples_hyb.jsonl").write_text("".join(json.dumps({"task": "niah_single_1", "id": i, "length": 4096,
                                                              "gold": [g], "generation": g, "score": {"4096": 1.0}})
                                                  + "\n" for i, g in enumerate(["7", "8", "9"])))
    assert set(merge.merge([str(b), str(d)])["prompt_digests"]["hyb"]["niah_single_1"]) == {"2048", "4096"}
    # held-out quality of other held-out settings: refused
    q1 = _eval_json(tmp_path / "q1", {}, {}, {"hyb": {"ppl": 20.0}})
    q2 = _eval_json(tmp_path / "q2", {}, {}, {"teacher": {"ppl": 19.0}})
    for folder, n in ((q1, 64), (q2, 32)):
        rec = json.loads((folder / "eval.json").read_text())
        rec["heldout"] = {"sequences": n, "seq_len": 1024, "data": "embedded", "run_config": None}
        (folder / "eval.json").write_text(json.dumps(rec))
    with pytest.raises(ConfigError, match=r"held-out quality rows come from .*'sequences': 32"):
        merge.merge([str(q1), str(q2)])


def test_held_out_quality_of_another_tokenizers_ids_is_left_out_of_a_merge_and_evaluated_again_on_resume(tmp_path,
                                                                                                      caplog):
    """An eval.json written before held-out rows were per tokenizer (no ``heldout_rows``) scored every model on the
    first model's ids: a model of another tokenizer there has a perplexity and KL that measure nothing. eval-merge
    leaves them out (saying so), --resume computes that model's held-out quality again (its recall kept); the first
    tokenizer's models are kept whole, and a
    file that records per-tokenizer rows keeps every model."""
    from ds_hybrid.evaluation import merge
    from ds_hybrid.evaluation.run import RESUME_SETTINGS, resumable_models

    models = {"teacher": {"path": "/t", "tokenizer": "aaaa", "max_length": 1024},
              "same": {"path": "/s", "tokenizer": "aaaa", "max_length": 1024},
              "other": {"path": "/o", "tokenizer": "bbbb", "max_length": 1024}}
    quality = {m: {"ppl": 20.0 + i} for i, m in enumerate(models)}
    old = _eval_json(tmp_path / "old", {}, {}, quality)
    rec = json.loads((old / "eval.json").read_text())
    heldout = {"sequences": 2, "seq_len": 64, "data": "embedded", "run_config": None}
    rec.update(models=models, heldout=heldout, seed=0, dtype="bf16", based_files={}, window="none", haystack=None,
               run_config=None)
    (old / "eval.json").write_text(json.dumps(rec))
    assert merge.stale_heldout_models(rec) == ["other"]
    res = merge.merge([str(old)])
    assert set(res["heldout_quality"]) == {"teacher", "same"} and res["heldout_rows"] == merge.HELDOUT_ROWS
    assert res["heldout_quality_left_out"] == [{"model": "other", "file": str(old / "eval.json")}]
    assert "held-out quality of other left out" in caplog.text
    settings = {k: rec.get(k) for k in RESUME_SETTINGS}
    paths = {m: info["path"] for m, info in models.items()}
    kept = resumable_models(old, settings, paths, paths, 1024)  # every model's recall kept; other's quality redone
    assert set(kept) == set(models) and [m for m, k in kept.items() if k["quality_pending"]] == ["other"]
    assert "heldout_quality" not in kept["other"] and kept["same"]["heldout_quality"] == quality["same"]
    rec["heldout_rows"] = merge.HELDOUT_ROWS  # written since: every model's rows were its own tokenizer's
    (old / "eval.json").write_text(json.dumps(rec))
    assert set(merge.merge([str(old)])["heldout_quality"]) == set(models)
    assert not any(k["quality_pending"] for k in resumable_models(old, settings, paths, paths, 1024).values())


def test_eval_merge_refuses_held_out_quality_of_one_tokenizer_whose_rows_start_otherwise(tmp_path):
    """Models of one tokenizer read the same held-out rows: quality from rows that started with BOS beside quality
    from rows without (a file of before row_bos, another data.bos) is not comparable; other tokenizers may differ."""
    from ds_hybrid.evaluation import merge

    def one(folder: str, model: str, tokenizer: str, bos: int | None) -> str:
        path = _eval_json(tmp_path / folder, {}, {}, {model: {"ppl": 20.0, **({} if bos is None else {"row_bos": bos})}})
        rec = json.loads((path / "eval.json").read_text())
        rec.update(models={model: {"path": f"/{model}", "tokenizer": tokenizer, "max_length": 1024}},
                   heldout_rows=merge.HELDOUT_ROWS)
        (path / "eval.json").write_text(json.dumps(rec))
        return str(path)

    old, new, other = one("old", "a", "llama", None), one("new", "b", "llama", 1), one("other", "c", "smol", None)
    with pytest.raises(ConfigError, match=r"^eval-merge='a, b': models of one tokenizer whose held-out rows start "
                                          r"otherwise \(row_bos None: a; 1: b\)"):
        merge.merge([old, new])
    assert set(merge.merge([new, other])["heldout_quality"]) == {"b", "c"}
    # one model in two files: the same record with and without row_bos None merges (a file of before it, one of
    # rows without BOS: the teacher of every SmolLM2 lease); of another start, refused by that name
    again = one("again", "c", "smol", None)
    rec = json.loads((Path(again) / "eval.json").read_text())
    rec["heldout_quality"]["c"]["row_bos"] = None
    (Path(again) / "eval.json").write_text(json.dumps(rec))
    assert merge.merge([other, again])["heldout_quality"]["c"]["ppl"] == 20.0
    rec["heldout_quality"]["c"]["row_bos"] = 1
    (Path(again) / "eval.json").write_text(json.dumps(rec))
    with pytest.raises(ConfigError, match=r"held-out quality of c here is of rows that start with token 1, an "
                                          r"earlier file's with None \(row_bos"):
        merge.merge([other, again])


def _eval_json(folder: Path, scores: dict, prompts: dict, quality: dict | None = None) -> Path:
    folder.mkdir(parents=True)
    lengths = sorted({int(k) for s in scores.values() for d in s.values() for k in d if k.isdigit()})
    (folder / "eval.json").write_text(json.dumps({"date": "d", "device": "cuda", "cuda_graphs": True, "limit": 100,
                                                  "lengths": lengths, "tasks": sorted({t for s in scores.values() for t in s}),
                                                  "scores": scores, "prompts": prompts, "heldout_quality": quality or {}}))
    return folder


def test_eval_merge_refuses_swde_scores_of_prompts_cut_at_another_length(tiny, tmp_path):
    """Two runs of one SWDE file, one at an evaluation length that cuts some prompts: what the models read differs,
    so their scores are not set side by side; two runs whose prompts all fit are."""
    from ds_hybrid import cli
    from ds_hybrid.evaluation import merge

    _, tok, path = tiny
    records = recall.load_based_records(FIXTURES / "swde_fixture.jsonl", "--swde")[:4]
    sizes = sorted(len(tok(recall.based_prompt(r))["input_ids"]) for r in records)
    short = sizes[1] + recall.BASED_MAX_GEN_TOKS  # cuts the two longest of the four
    for name, length in (("cut", short), ("whole", 1024), ("whole2", 1000)):
        assert cli.main(["eval", "--model", f"{name}={path}", "--swde", str(FIXTURES / "swde_fixture.jsonl"), "--tasks",
                         "", "--limit", "4", "--no-quality", "--max-length", str(length),
                         "--out", str(tmp_path / name)]) == 0
    res = json.loads((tmp_path / "cut" / "eval.json").read_text())
    assert res["truncated_prompts"]["swde"]["cut"] == 2
    assert merge.merge([str(tmp_path / "whole"), str(tmp_path / "whole2")])["scores"].keys() == {"whole", "whole2"}
    with pytest.raises(ConfigError, match=r"cut's swde_local at contains comes from other prompts"):
        merge.merge([str(tmp_path / "whole"), str(tmp_path / "cut")])


def test_eval_merge_joins_per_length_jobs_and_refuses_a_score_given_twice(tmp_path):
    from ds_hybrid.evaluation import merge

    a = _eval_json(tmp_path / "a", {"hyb": {"niah_single_1": {"2048": 0.77}}}, {"hyb": {"niah_single_1": {"2048": 100}}})
    b = _eval_json(tmp_path / "b", {"hyb": {"niah_single_1": {"4096": 0.53}}, "teacher": {"niah_single_1": {"4096": 0.99}}},
                   {"hyb": {"niah_single_1": {"4096": 100}}, "teacher": {"niah_single_1": {"4096": 50}}})
    q = _eval_json(tmp_path / "q", {"hyb": {"swde_local": {"contains": 1.0}}}, {"hyb": {"swde_local": {"contains": 12}}},
                   {"hyb": {"ppl": 19.8, "kl_to_teacher": 0.15}})
    assert merge.main([str(a), str(b / "eval.json"), str(q), "--out", str(tmp_path / "m")]) == 0
    res = json.loads((tmp_path / "m" / "eval.json").read_text())
    assert res["scores"] == {"hyb": {"niah_single_1": {"2048": 0.77, "4096": 0.53}, "swde_local": {"contains": 1.0}},
                             "teacher": {"niah_single_1": {"4096": 0.99}}}
    assert res["prompts"]["teacher"]["niah_single_1"]["4096"] == 50 and res["lengths"] == [2048, 4096]
    assert res["ci95"]["teacher"]["niah_single_1"]["4096"] == pytest.approx(report.wilson_interval(0.99, 50))
    assert res["heldout_quality"] == {"hyb": {"ppl": 19.8, "kl_to_teacher": 0.15}} and len(res["sources"]) == 3
    # (these files hold no prompt digests and no samples: merged, said, and listed as unchecked)
    assert {(u["model"], Path(u["file"]).parent.name) for u in res["prompts_unchecked"]} == \
        {("hyb", "a"), ("hyb", "b"), ("teacher", "b"), ("hyb", "q")}
    md = (tmp_path / "m" / "eval.md").read_text()
    assert "| niah_single_1 | 4096 | 0.530 [0.43, 0.62] n=100 | 0.990" in md and "held-out ppl | | 19.800 |" in md
    assert (tmp_path / "m" / "recall_vs_length.png").stat().st_size > 1000
    # the same cell with another value: refused, naming both files; renamed on the way in, it is a new column
    c = _eval_json(tmp_path / "c", {"hyb": {"niah_single_1": {"2048": 0.5}}}, {"hyb": {"niah_single_1": {"2048": 100}}})
    with pytest.raises(ConfigError, match=r"hyb/niah_single_1/2048 is 0.5 here but 0.77"):
        merge.merge([str(a), str(c)])
    assert merge.merge([str(a), f"seed1=hyb@{c}"])["scores"]["seed1"] == {"niah_single_1": {"2048": 0.5}}
    with pytest.raises(ConfigError, match="no eval.json"):
        merge.merge([str(tmp_path / "nowhere")])



def test_eval_merge_refuses_ruler_fill_and_truncation_counts_given_twice_with_other_values(tmp_path):
    """The teacher is in every job's file: its RULER fill, truncated RULER prompts and truncated SWDE prompts must
    agree across them (same prompts, same tokenizer) or the merge says which files differ; equal values merge."""
    from ds_hybrid.evaluation import merge

    def job(name, fill, cut, swde_cut):
        f = _eval_json(tmp_path / name, {"teacher": {"niah_single_1": {"2048": 1.0}}},
                       {"teacher": {"niah_single_1": {"2048": 100}}})
        p = json.loads((f / "eval.json").read_text())
        p.update(ruler_fill={"teacher": {"niah_single_1": {"2048": fill}}},
                 ruler_truncated={"teacher": {"niah_single_1": {"2048": cut}} if cut else {}},
                 truncated_prompts={"swde": {"teacher": swde_cut}})
        (f / "eval.json").write_text(json.dumps(p))
        return str(f)

    a, same = job("a", 0.93, 0, 1), job("same", 0.93, 0, 1)
    res = merge.merge([a, same])
    assert res["ruler_fill"] == {"teacher": {"niah_single_1": {"2048": 0.93}}}
    assert res["ruler_truncated"] == {"teacher": {}} and res["truncated_prompts"] == {"swde": {"teacher": 1}}
    with pytest.raises(ConfigError, match=r"RULER fill of teacher/niah_single_1/2048 is 0.5 here but 0.93"):
        merge.merge([a, job("fill", 0.5, 0, 1)])
    with pytest.raises(ConfigError, match=r"truncated RULER prompt count of teacher/niah_single_1/2048 is 4 here but 3"):
        merge.merge([job("cut", 0.93, 3, 1), job("cut2", 0.93, 4, 1)])
    with pytest.raises(ConfigError, match=r"truncated prompt count of teacher/swde is 2 here but 1 in .*a"):
        merge.merge([a, job("swde", 0.93, 0, 2)])
    assert merge.merge([a, f"t2=teacher@{job('renamed', 0.5, 0, 2)}"])["truncated_prompts"] == \
        {"swde": {"teacher": 1, "t2": 2}}


def test_wilson_interval_matches_the_closed_form():
    # p = 0.5 of 100: 0.5 -/+ 1.96 * sqrt(0.25 / 100 + 1.96**2 / 40000) / (1 + 1.96**2 / 100)
    assert report.wilson_interval(0.5, 100) == pytest.approx((0.4038, 0.5962), abs=1e-4)
    assert report.wilson_interval(0.0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)  # never a zero-width interval
    assert report.wilson_interval(1.0, 100) == pytest.approx((0.9630, 1.0), abs=1e-4)
    for n in (1, 7, 50, 100, 1000):  # ends exactly at p = 0 and 1 (a plot's error bars are p - lo and hi - p)
        assert report.wilson_interval(1.0, n)[1] == 1.0 and report.wilson_interval(0.0, n)[0] == 0.0
        assert all(lo <= k / n <= hi for k in range(n + 1) for lo, hi in [report.wilson_interval(k / n, n)])


def test_difference_interval_matches_newcombes_worked_examples():
    # Newcombe (1998), Statistics in Medicine 17:873, Table II, method 10: 56/70 - 48/80 and 9/10 - 3/10
    assert report.difference_interval(56 / 70, 70, 48 / 80, 80) == pytest.approx((0.2, 0.0524, 0.3339), abs=1e-4)
    assert report.difference_interval(9 / 10, 10, 3 / 10, 10) == pytest.approx((0.6, 0.1705, 0.8090), abs=1e-4)
    d, lo, hi = report.difference_interval(0.3, 50, 0.3, 80)  # equal proportions: an interval around 0
    assert d == 0 and lo < 0 < hi


def test_paired_difference_interval_matches_a_published_example_and_the_unpaired_one_without_correlation():
    # Fagerland, Lydersen & Laake (2017), "Statistical Analysis of Contingency Tables", chapter 8, Newcombe's
    # square-and-add interval for paired data (Newcombe 1998b, method 10) on the table 59 / 6 / 16 / 80:
    # -0.0621 (95 % CI -0.1186 to -0.0046)
    assert report.paired_difference_interval(59, 6, 16, 80) == pytest.approx((-0.0621, -0.1186, -0.0046), abs=1e-4)
    # no correlation left after Newcombe's correction (ad - bc <= n / 2): the unpaired interval of the same margins
    assert report.paired_difference_interval(5, 5, 5, 5) == pytest.approx(report.difference_interval(0.5, 20, 0.5, 20))
    # two models that mostly get the same prompts right: narrower than taking their answers as independent
    d, lo, hi = report.paired_difference_interval(60, 5, 2, 33)
    _, ulo, uhi = report.difference_interval(0.65, 100, 0.62, 100)
    assert d == pytest.approx(0.03) and ulo < lo < 0 < hi < uhi
    with pytest.raises(ValueError, match="no prompts"):
        report.paired_difference_interval(0, 0, 0, 0)


def test_recall_vs_k_paired_pairs_the_answers_prompt_by_prompt(tmp_path, monkeypatch):
    """--paired: a difference from the two models' samples files (the 2 x 2 table of their answers), beside the
    unpaired one where a model has none or other prompts; a merge's sources (recorded relative to where it ran) are
    found from elsewhere too, read with their renames undone; strict scores are recomputed from the answers."""
    from ds_hybrid.evaluation import by_k, merge

    L = 12
    hyb = lambda layers: {"model_type": "ds_hybrid", "num_layers": L, "softmax_layers": layers}  # noqa: E731
    answers = {"u4": [1] * 60 + [0] * 40, "sel": [1] * 60 + [1] * 5 + [0] * 35}  # sel: u4's 60 and 5 more
    folders = []
    for name, got in answers.items():
        f = _eval_json(tmp_path / name, {name: {"niah_single_1": {"2048": sum(got) / 100}}},
                       {name: {"niah_single_1": {"2048": 100}}})
        rec = json.loads((f / "eval.json").read_text())
        rec["models"] = {name: hyb(by_k.uniform_layers(L, 4) if name == "u4" else [1, 2, 4, 5])}
        (f / "eval.json").write_text(json.dumps(rec))
        (f / f"samples_{name}.jsonl").write_text("".join(
            json.dumps({"task": "niah_single_1", "id": i, "length": 2048, "gold": ["7"], "generation": "7" if v else "",
                        "score": {"2048": float(v)}, **({"doc_sha": f"d{i}"} if name == "sel" else {})}) + "\n"
            for i, v in enumerate(got)))  # (u4's records predate doc_sha: paired by id and answers)
        folders.append(f)
    merged = tmp_path / "m"
    monkeypatch.chdir(tmp_path)  # (the sources recorded as given: u4, sel)
    assert merge.main(["old_u4=u4@u4", "sel", "--out", str(merged)]) == 0
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    sel = tmp_path / "sel.json"
    from ds_hybrid.selection import make_selection, write_selection

    write_selection(sel, make_selection("x", {l: (0.0 if l in (1, 2, 4, 5) else 1.0) for l in range(L)}, True, L))
    out = tmp_path / "k"
    assert by_k.main([str(merged), "--selection", f"x={sel}", "--paired", "--out", str(out)]) == 0
    md = (out / "recall_vs_k.md").read_text()
    d, lo, hi = report.paired_difference_interval(60, 5, 0, 35)
    assert f"| x - uniform | 4 | sel - old_u4 | {d:+.2f} [{lo:+.2f}, {hi:+.2f}] * |" in md and "paired:" in md
    # --pair: any two models by name, either way round, with the count of cells whose interval excludes 0
    assert by_k.main([str(merged), "--selection", f"x={sel}", "--paired", "--pair", "sel:old_u4", "--pair",
                      "old_u4:sel", "--pair", "sel:old_u4", "--out", str(out)]) == 0  # (the first pair twice: once)
    md = (out / "recall_vs_k.md").read_text()
    assert f"\n| sel - old_u4 | {d:+.2f} [{lo:+.2f}, {hi:+.2f}] * |" in md
    assert f"\n| old_u4 - sel | {-d:+.2f} [{-hi:+.2f}, {-lo:+.2f}] * |" in md
    assert "| sel - old_u4 | 1 | 0 | 1 |" in md and "| old_u4 - sel | 0 | 1 | 1 |" in md
    for bad in ("sel", "sel:nosuch", "sel:sel"):
        with pytest.raises(ConfigError, match=r"^recall-vs-k --pair=.*write FIRST:SECOND, two models of the eval"):
            by_k.main([str(merged), "--pair", bad, "--out", str(out)])
    assert by_k.main([str(merged), "--selection", f"x={sel}", "--paired", "--strict", "--out", str(out)]) == 0
    assert f"| x - uniform | 4 | sel - old_u4 | {d:+.2f} [{lo:+.2f}, {hi:+.2f}] * |" in (out / "recall_vs_k.md").read_text()
    assert by_k.main([str(merged), "--selection", f"x={sel}", "--out", str(out)]) == 0  # unpaired: 0 inside
    d, lo, hi = report.difference_interval(0.65, 100, 0.60, 100)
    unpaired = f"| x - uniform | 4 | sel - old_u4 | {d:+.2f} [{lo:+.2f}, {hi:+.2f}]"
    assert lo < 0 and unpaired + " |" in (out / "recall_vs_k.md").read_text()
    samples = folders[1] / "samples_sel.jsonl"
    text = samples.read_text()
    for k, changed in enumerate([text.replace('"gold": ["7"]', '"gold": ["8"]', 1),  # prompt 0 is another prompt there
                                 text.replace('"doc_sha": "d3"', '"doc_sha": "zz"')]):  # prompt 3 another document
        samples.write_text(changed)
        if k == 1:  # (u4's records: digests of their own now, d0..d99 but d3 differs)
            u4 = folders[0] / "samples_u4.jsonl"
            u4.write_text("".join(json.dumps({**json.loads(line), "doc_sha": f"d{i}"}) + "\n"
                                  for i, line in enumerate(u4.read_text().splitlines())))
        assert by_k.main([str(merged), "--selection", f"x={sel}", "--paired", "--out", str(out)]) == 0
        assert unpaired + " u |" in (out / "recall_vs_k.md").read_text(), k
    samples.unlink()  # no answers of one of the two: that cell stays unpaired, said so
    assert by_k.main([str(merged), "--selection", f"x={sel}", "--paired", "--out", str(out)]) == 0
    assert unpaired + " u |" in (out / "recall_vs_k.md").read_text()


def test_demo_recall_prints_both_models_scores_with_intervals(tiny, tmp_path, capsys):
    """`make demo` on a GPU ends with ds_hybrid.demo's recall line; here the tiny model stands in for both models."""
    from ds_hybrid.demo import recall as demo_recall

    got = demo_recall(Path(tiny[2]), tiny[2], 1024, 2, tmp_path / "demo")
    assert set(got) == {"teacher", "hybrid"} and got["teacher"] == got["hybrid"] and got["hybrid"][1] == 2
    out = capsys.readouterr().out
    assert "niah_single_1 at 1024 tokens" in out and "of 2 prompts" in out
    assert (tmp_path / "demo" / "eval.json").is_file()


@pytest.mark.parametrize("kind", ["teacher", "gdn"])
def test_eval_with_cuda_graphs_generates_what_hflm_generates(tiny, kind):
    """`ds-hybrid eval --cuda-graphs`: lm-eval's greedy generations through the static-cache decoder (run eagerly on
    CPU) equal HFLM's own, prompt by prompt, left-padded batches of different lengths included."""
    from lm_eval.models.huggingface import HFLM

    from ds_hybrid.evaluation.graph_lm import graph_hflm_class
    from ds_hybrid.evaluation.haystack import haystack_words
    from ds_hybrid.transfer import build_hybrid

    model, tok, path = tiny
    if kind == "gdn":
        model = build_hybrid(model, [1], "gdn").eval()
    specs = recall.ruler_configs(["niah_single_1", "niah_essay_single"], [1024], path, haystack_words(), limit=2)
    specs.append(recall.based_config("swde", FIXTURES / "swde_fixture.jsonl", 3))
    outs = []
    for cls in (HFLM, graph_hflm_class()):
        lm = cls(pretrained=model, tokenizer=tok, batch_size=4, max_length=1200, device="cpu")
        outs.append(recall.samples_from(recall.run_tasks(lm, specs, None)))
        assert hasattr(model, "_graph_decoder") == (cls is not HFLM)  # the second pass did use the static decoder
    object.__delattr__(model, "_graph_decoder")
    assert len(outs[0]) == 7
    assert [(s["task"], s["id"], s["generation"]) for s in outs[0]] == \
        [(s["task"], s["id"], s["generation"]) for s in outs[1]]
    # a generation config with a logits processor (an instruct model's repetition_penalty): lm-eval's generate
    # applies it, so the graphs' wrapper hands those prompts to it (it raised mid-evaluation before)
    model.generation_config.repetition_penalty = 1.3
    try:
        outs = []
        for cls in (HFLM, graph_hflm_class()):
            lm = cls(pretrained=model, tokenizer=tok, batch_size=4, max_length=1200, device="cpu")
            outs.append(recall.samples_from(recall.run_tasks(lm, specs[:1], None)))
        assert [s["generation"] for s in outs[0]] == [s["generation"] for s in outs[1]]
    finally:
        model.generation_config.repetition_penalty = 1.0


def test_recall_vs_k_places_each_model_by_its_layers_not_its_name(tmp_path, capsys):
    """The comparison's table: the teacher at K = L, the all-linear student at 0, each hybrid under the selector
    whose K layers are its softmax layers (a selection file's top-K, or the uniform/smart rules), seeds kept apart."""
    from ds_hybrid.evaluation import by_k
    from ds_hybrid.layers import uniform_layers
    from ds_hybrid.selection import make_selection, write_selection

    L = 12
    ga = make_selection("ga_s2", {l: (0.0 if l in (2, 5, 9, 10) else 1.0 + l / 100) for l in range(L)}, True, L)
    write_selection(tmp_path / "ga" / "selection.json", ga)
    hyb = lambda layers: {"model_type": "ds_hybrid", "num_layers": L, "softmax_layers": layers}  # noqa: E731
    models = {"teacher": {"model_type": "llama", "num_layers": L}, "lin": hyb([]),
              "u4": hyb(uniform_layers(L, 4)), "picked": hyb([2, 5, 9, 10]), "picked_seed1": hyb([10, 9, 5, 2]),
              "odd": hyb([0, 1])}
    s = lambda v: {"niah_single_1": {"2048": v}}  # noqa: E731
    scores = {"teacher": s(1.0), "lin": s(0.0), "u4": s(0.5), "picked": s(0.7), "picked_seed1": s(0.6), "odd": s(0.1)}
    folder = _eval_json(tmp_path / "e", scores, {m: {"niah_single_1": {"2048": 100}} for m in scores},
                        {"u4": {"ppl": 20.0, "kl_to_teacher": 0.2}})
    payload = json.loads((folder / "eval.json").read_text())
    payload["models"] = models
    (folder / "eval.json").write_text(json.dumps(payload))

    out = tmp_path / "k"
    assert by_k.main([str(folder), "--selection", f"ga_s2={tmp_path / 'ga' / 'selection.json'}", "--out", str(out)]) == 0
    placed = {r["model"]: (r["selector"], r["k"]) for r in json.loads((out / "recall_vs_k.json").read_text())["models"]}
    assert placed == {"teacher": ("teacher", L), "lin": ("all_linear", 0), "u4": ("uniform", 4),
                      "picked": ("ga_s2", 4), "picked_seed1": ("ga_s2", 4), "odd": ("odd", 2)}
    md = (out / "recall_vs_k.md").read_text()
    assert "| ga_s2 | 4 | picked | 0.70 [0.60, 0.78] |" in md and "| uniform | 4 | u4 | 20.000 | 0.200 |" in md
    # each matched selector's hybrid minus uniform's at the same K (two seeds: two rows), the unexplained one left out
    assert "| ga_s2 - uniform | 4 | picked - u4 | +0.20 [+0.06, +0.33] * |" in md
    assert "| ga_s2 - uniform | 4 | picked_seed1 - u4 | +0.10 [-0.04, +0.23] |" in md and "odd - u4" not in md
    assert "no selector explains" in capsys.readouterr().out
    assert (out / "recall_vs_k.png").stat().st_size > 1000
    # --against: every selector against KL-guided selection too (one table per reference)
    assert by_k.main([str(folder), "--selection", f"ga_s2={tmp_path / 'ga' / 'selection.json'}", "--out", str(out),
                      "--against", "uniform,ga_s2"]) == 0
    md = (out / "recall_vs_k.md").read_text()
    assert "| ga_s2 - uniform | 4 | picked - u4 | +0.20 [+0.06, +0.33] * |" in md
    assert "| uniform - ga_s2 | 4 | u4 - picked | -0.20 [-0.33, -0.06] * |" in md and "difference to ga_s2" in md
    with pytest.raises(ConfigError, match=r"^recall-vs-k --against='proxy': no such selector"):
        by_k.main([str(folder), "--against", "uniform,proxy", "--out", str(out)])
    # --against teacher: every hybrid (any K, the unexplained one too) against the teacher; it used to print nothing
    assert by_k.main([str(folder), "--selection", f"ga_s2={tmp_path / 'ga' / 'selection.json'}", "--out", str(out),
                      "--against", "teacher"]) == 0
    md = (out / "recall_vs_k.md").read_text()
    assert "### 2048 tokens: difference to teacher (95 % interval" in md
    assert "| ga_s2 - teacher | 4 | picked - teacher | -0.30 [" in md and "| odd - teacher | 2 | odd - teacher |" in md
    assert "| all_linear - teacher" not in md and "| teacher - teacher" not in md
    # --strict: the same tables from the strict scores (eval-merge's), refused where there are none
    with pytest.raises(ConfigError, match=r"^recall-vs-k --strict=.*holds no strict scores"):
        by_k.main([str(folder), "--strict", "--out", str(out)])
    payload["strict_scores"] = {**scores, "picked": s(0.5)}
    (folder / "eval.json").write_text(json.dumps(payload))
    assert by_k.main([str(folder), "--selection", f"ga_s2={tmp_path / 'ga' / 'selection.json'}", "--strict",
                      "--out", str(out)]) == 0
    assert "| ga_s2 - uniform | 4 | picked - u4 | +0.00 [" in (out / "recall_vs_k.md").read_text()
    # a selector whose top-4 is uniform's: u4 is both ("uniform=same"), the base of either, compared with neither
    same = make_selection("same", {l: (0.0 if l in uniform_layers(L, 4) else 1.0) for l in range(L)}, True, L)
    write_selection(tmp_path / "same" / "selection.json", same)
    assert by_k.main([str(folder), "--selection", f"ga_s2={tmp_path / 'ga' / 'selection.json'}", "--selection",
                      f"same={tmp_path / 'same' / 'selection.json'}", "--against", "same", "--out", str(out)]) == 0
    md = (out / "recall_vs_k.md").read_text()
    assert "| uniform=same | 4 | u4 |" in md and "| ga_s2 - same | 4 | picked - u4 | +0.20 [+0.06, +0.33] * |" in md
    assert "- u4 | +0.00" not in md and "uniform=same - same" not in md
    with pytest.raises(ConfigError, match="no model has a score"):
        by_k.main([str(folder), "--task", "niah_multikey_3", "--out", str(out)])
    del payload["models"]["odd"]  # scores without a record of the model's layers: refused, not dropped
    (folder / "eval.json").write_text(json.dumps(payload))
    with pytest.raises(ConfigError, match=r"\['odd'\] have scores but no record"):
        by_k.main([str(folder), "--out", str(out)])
    payload["models"]["odd"] = hyb([0, 1])
    (folder / "eval.json").write_text(json.dumps(payload))
    # a model no selector explains is listed under its name, even a selector's name, and is no one's base
    payload["models"]["uniform"], payload["scores"]["uniform"] = hyb([0, 4, 8, 11]), s(0.9)
    payload["prompts"]["uniform"] = {"niah_single_1": {"2048": 100}}
    (folder / "eval.json").write_text(json.dumps(payload))
    assert by_k.main([str(folder), "--selection", f"ga_s2={tmp_path / 'ga' / 'selection.json'}", "--out", str(out)]) == 0
    md = (out / "recall_vs_k.md").read_text()
    assert "| uniform | 4 | uniform | 0.90" in md and "| ga_s2 - uniform | 4 | picked - u4 |" in md
    assert "picked - uniform" not in md
    for reserved in ("teacher", "all_linear", "uniform"):
        with pytest.raises(ConfigError, match=r"give each selection a name of its own"):
            by_k.main([str(folder), "--selection", f"{reserved}={tmp_path / 'ga' / 'selection.json'}", "--out", str(out)])
    other = make_selection("ga_s2", {l: float(l) for l in range(L + 1)}, True, L + 1)
    write_selection(tmp_path / "other" / "selection.json", other)
    with pytest.raises(ConfigError, match="ranks 13 layers"):
        by_k.main([str(folder), "--selection", f"x={tmp_path / 'other' / 'selection.json'}", "--out", str(out)])


def test_prompts_check_tells_a_published_samples_file_whose_prompts_today_differ(tmp_path, capsys):
    """bench/prompts_check.py rebuilds a campaign's prompts on the CPU (a model that answers nothing) and compares
    them with a samples file: its own rebuild agrees, a file with one answer changed does not (exit 1)."""
    import importlib.util
    import sys

    from trainer_utils import REPO

    spec = importlib.util.spec_from_file_location("prompts_check", REPO / "bench" / "prompts_check.py")
    pc = importlib.util.module_from_spec(spec)
    sys.modules["prompts_check"] = pc
    spec.loader.exec_module(pc)
    rebuilt = pc.rebuilt_samples(["niah_single_1", "niah_multikey_2"], 1024, 2, None, "embedded")
    assert len(rebuilt) == 4
    path = tmp_path / "samples_x.jsonl"
    path.write_text("".join(json.dumps(r, default=str) + "\n" for r in rebuilt))
    # run inside niah6, niah_multikey_2 comes after the essay tasks: other prompts (the stream moved on)
    assert pc.main([str(path), "--length", "1024", "--suite", "niah6", "--limit", "2"]) == 1
    assert "niah_single_1 at 1024: the same prompts" in capsys.readouterr().out
    changed = [dict(r) for r in rebuilt]
    changed[-1]["gold"] = ["0000000"]
    path.write_text("".join(json.dumps(r, default=str) + "\n" for r in changed))
    assert pc.compare(rebuilt, rebuilt) == {"niah_single_1": True, "niah_multikey_2": True}
    assert pc.compare(changed, rebuilt) == {"niah_single_1": True, "niah_multikey_2": False}


def test_models_of_one_run_read_the_same_ruler_cwe_prompts(tiny, tmp_path):
    """lm-eval's cwe generator shuffles with a module-level random.Random that lm-eval never reseeds: the second
    model of a run read the same golds in another order (other prompts, filed beside the first model's as if
    comparable). Each build now starts from one state: the same prompt digests for both, no prompt_mismatch."""
    from ds_hybrid import cli

    out = tmp_path / "ev"
    assert cli.main(["eval", "--model", f"first={tiny[2]}", "--model", f"second={tiny[2]}", "--tasks", "ruler_cwe",
                     "--lengths", "1024", "--limit", "2", "--no-quality", "--out", str(out)]) == 0
    res = json.loads((out / "eval.json").read_text())
    first, second = (res["prompt_digests"][m]["ruler_cwe"]["1024"] for m in ("first", "second"))
    assert first == second and res["prompt_mismatch"] == []
    assert "NOT COMPARABLE" not in (out / "eval.md").read_text()


def test_eval_flags_models_of_one_tokenizer_that_read_other_prompts(tiny, tmp_path, monkeypatch):
    """Should a generator still draw differently per model, the run says so in eval.json and eval.md."""
    from ds_hybrid import cli
    from ds_hybrid.evaluation import recall as rec

    monkeypatch.setattr(rec, "restore_module_rng", lambda name: None)  # the old behaviour
    out = tmp_path / "ev"
    assert cli.main(["eval", "--model", f"first={tiny[2]}", "--model", f"second={tiny[2]}", "--tasks", "ruler_cwe",
                     "--lengths", "1024", "--limit", "2", "--no-quality", "--out", str(out)]) == 0
    res = json.loads((out / "eval.json").read_text())
    assert [(d["task"], d["length"], d["model"], d["differs_from"]["model"]) for d in res["prompt_mismatch"]
            if d["kind"] == "prompts"] == [("ruler_cwe", "1024", "second", "first")]
    assert "NOT COMPARABLE, other prompts for models of one tokenizer: ruler_cwe at 1024: second vs first" in \
        (out / "eval.md").read_text()


def test_ruler_prompts_cut_by_lm_eval_are_counted():
    """A RULER prompt whose tokens (its delimiter and generation prefix included) pass the evaluation length less the
    generation is cut from the left by HFLM: counted per task and length (the task's max_gen_toks, else HFLM's)."""
    samples = [{"task": "niah_single_1", "length": 2048, "context_tokens": 1920, "max_gen_toks": 128},   # fits
               {"task": "niah_single_1", "length": 2048, "context_tokens": 1921, "max_gen_toks": 128},   # cut
               {"task": "niah_single_1", "length": 2048, "context_tokens": 1990},                       # 256: cut
               {"task": "ruler_cwe", "length": 2048, "context_tokens": 1928, "max_gen_toks": 120},      # fits
               {"task": "swde_local", "length": None, "context_tokens": 9999}]                          # not RULER
    assert recall.cut_ruler_prompts(samples, 2048, 256) == {"niah_single_1": {"2048": 2}}
    # the request's context and kwargs, in memory and serialised
    assert recall._request_args({"arguments": [("ctx", {"max_gen_toks": 7})]}) == ("ctx", {"max_gen_toks": 7})
    assert recall._request_args({"arguments": {"gen_args_0": {"arg_0": "ctx", "arg_1": {"until": []}}}}) == \
        ("ctx", {"until": []})
    assert recall._request_args({}) == (None, {})


def test_default_haystack_is_what_every_models_tokenizer_holds_out():
    """The essay haystack by default: the embedded corpus's held-out prose, whose share per source is counted in
    tokens; a tokenizer that makes more tokens of a document holds out fewer documents, so the haystack is what every
    evaluated model's tokenizer (and the run's split) holds out, never text one of them trained on. With the embedded
    teacher's tokenizer it is the haystack every earlier evaluation read."""
    from transformers import AutoTokenizer

    from ds_hybrid.evaluation.haystack import haystack_words, held_out_prose
    from ds_hybrid.teacher import resolve_teacher

    class CharTokens:  # one token a character: several times the tokens of a BPE tokenizer
        def __call__(self, text, **kwargs):
            return {"input_ids": list(range(len(text)))}

    tok = AutoTokenizer.from_pretrained(resolve_teacher("embedded"))
    assert haystack_words(None, [tok]) == haystack_words()
    bpe, chars, both = held_out_prose([tok]), held_out_prose([CharTokens()]), held_out_prose([tok, CharTokens()])
    assert 0 < len(chars) < len(bpe) and both == [t for t in bpe if t in set(chars)] and set(both) == set(chars)
    # another split holds out other documents
    assert held_out_prose([tok], split_seed=12345) != bpe
    # a run with data.add_eos counts each document's end-of-document token into the held-out share, as the token
    # cache does, which fills it sooner: a tokenizer of one token a document holds out 4 a source (the share of
    # 13 x 4 tokens over 13 sources), with the EOS token 2 (without it, the other 2 would be text the run trained on)
    class OneToken:
        eos_token_id = 1

        def __call__(self, text, **kwargs):
            return {"input_ids": [0]}

    plain, eos = (held_out_prose([OneToken()], val_tokens=13 * 4, add_eos=e) for e in (False, True))
    assert len(eos) == len(plain) // 2 and set(eos) < set(plain)
    assert held_out_prose([CharTokens()], add_eos=True) == chars  # (no EOS token: none appended, as the cache does)


def test_resume_refuses_a_refilled_model_folder_and_reads_older_files(tiny, tmp_path):
    """--resume keeps a model by its name, folder, length and weights: a folder written again since (same path,
    other weights) is refused by name; an eval.json of an older version (no window, cuda_graphs, haystack or
    run_config recorded, no held-out rows yet) is read with what those runs used."""
    from ds_hybrid.evaluation import run as run_mod

    folder = tiny[2]
    L = run_mod.eval_length(folder, None)
    settings = {"device": "cpu", "dtype": "torch.float32", "lengths": [1024], "tasks": ["niah_single_1"],
                "limit": 1, "seed": 0, "based_files": {}, "window": "none", "cuda_graphs": False, "haystack": None,
                "run_config": None, "heldout": None}
    old = {k: v for k, v in settings.items() if k not in ("window", "cuda_graphs", "haystack", "run_config")}
    record = {"path": folder, "max_length": L}
    out = tmp_path / "ev"
    out.mkdir()
    (out / "eval.json").write_text(json.dumps({**old, "models": {"m": record}, "scores": {"m": {"t": {"1024": 1.0}}}}))
    kept = run_mod.resumable_models(out, settings, {"m": folder}, {"m": folder}, None)
    assert kept["m"]["scores"] == {"t": {"1024": 1.0}}
    (out / "eval.json").write_text(json.dumps({**old, "models": {"m": {**record, "weights": "0" * 16}},
                                               "scores": {"m": {}}}))
    with pytest.raises(ConfigError, match=r"its model 'm' .* has other weights now"):
        run_mod.resumable_models(out, settings, {"m": folder}, {"m": folder}, None)
    (out / "eval.json").write_text(json.dumps({**old, "haystack": "/elsewhere", "models": {}, "scores": {}}))
    with pytest.raises(ConfigError, match=r"ran with haystack = '/elsewhere', this one asks for None"):
        run_mod.resumable_models(out, settings, {"m": folder}, {"m": folder}, None)


def _tiny_lm(family: str, seed: int = 0, **over):
    """A random tiny causal LM of another family than the trainer's (GPT-2: a decoder of another name, a tied head;
    Gemma 2: softcapped logits), fp32."""
    from conftest import VOCAB
    from transformers import AutoModelForCausalLM, Gemma2Config, GPT2Config

    torch.manual_seed(seed)
    cfg = (GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=128, **over) if family == "gpt2"
           else Gemma2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                             num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=128,
                             **over))
    return AutoModelForCausalLM.from_config(cfg).eval()


def test_held_out_quality_fast_path_equals_the_models_own_logits_and_other_heads_use_them(tiny):
    """The fast path (last hidden state x output embedding, chunked, no [tokens x vocab] tensor) gives the
    perplexity and KL computed from the models' own logits, for the trainer's families and a GPT-2 (whose decoder is
    ``transformer``, not ``model``: an AttributeError before); a model whose logits are transformed (Gemma 2's
    softcapping) is scored from its logits: its perplexity is HF's own loss's, where the fast path's is not."""
    import copy
    import math

    from conftest import VOCAB

    from ds_hybrid.evaluation.quality import heldout_quality, plain_head

    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(0, VOCAB, (1, 48), generator=g) for _ in range(3)]
    teacher = tiny[0]
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    gpt2, gpt2_t = _tiny_lm("gpt2", 1), _tiny_lm("gpt2", 2)
    for model, t in ((student, teacher), (gpt2, gpt2_t)):
        assert plain_head(model)
        fast, ref = (heldout_quality(model, rows, t, chunk=16, path=p) for p in ("fast", "reference"))
        assert heldout_quality(model, rows, t) == fast  # auto: the fast path, its logits checked
        assert fast.keys() == ref.keys() == {"ce", "ppl", "tokens", "kl_to_teacher"} and fast["tokens"] == 3 * 47
        for k in ("ce", "ppl", "kl_to_teacher"):
            assert fast[k] == pytest.approx(ref[k], rel=1e-5), (type(model).__name__, k)
        assert ref["kl_to_teacher"] > 1e-3
    capped = _tiny_lm("gemma2", 3, final_logit_softcapping=2.0)
    with torch.no_grad():
        capped.get_output_embeddings().weight.mul_(100.0)  # (logits far past the cap: a random init's are near 0)
    assert not plain_head(capped)
    q = heldout_quality(capped, rows)
    with torch.no_grad():  # (HF: the mean CE of a row's 47 next tokens)
        hf = [float(capped(input_ids=r, labels=r).loss) for r in rows]
    assert q["ce"] == pytest.approx(sum(hf) / len(hf), rel=1e-5) and q["ppl"] == pytest.approx(math.exp(q["ce"]))
    assert abs(heldout_quality(capped, rows, path="fast")["ce"] - q["ce"]) > 1e-2  # what the fast path would say


def test_resume_with_a_teacher_named_now_computes_the_kept_models_kl_to_it(tiny, tmp_path, monkeypatch, capsys,
                                                                          caplog):
    """A first run without --teacher (perplexity only), resumed with one: the kept model's held-out quality was kept
    without a KL, a blank in the table with no word of it. It is computed again, with the KL; its recall is kept."""
    from ds_hybrid import cli
    from ds_hybrid.evaluation import recall as recall_mod

    out = tmp_path / "ev"
    argv = ["eval", "--model", f"only={tiny[2]}", "--tasks", "niah_single_1", "--lengths", "1024", "--limit", "1",
            "--heldout-sequences", "1", "--heldout-seq-len", "64", "--out", str(out)]
    assert cli.main(argv) == 0
    first = json.loads((out / "eval.json").read_text())
    assert "kl_to_teacher" not in first["heldout_quality"]["only"]
    samples = (out / "samples_only.jsonl").read_text()
    real, ran = recall_mod.run_tasks, []
    monkeypatch.setattr(recall_mod, "run_tasks", lambda lm, *a, **k: (ran.append(lm), real(lm, *a, **k))[1])
    with caplog.at_level("INFO", logger="ds_hybrid"):
        assert cli.main(argv + ["--teacher", tiny[2], "--resume"]) == 0
    res = json.loads((out / "eval.json").read_text())
    assert len(ran) == 1 and set(res["scores"]) == {"only", "teacher"}  # the teacher's recall alone ran
    assert res["scores"]["only"] == first["scores"]["only"] and (out / "samples_only.jsonl").read_text() == samples
    q = res["heldout_quality"]["only"]
    assert q["ppl"] == pytest.approx(first["heldout_quality"]["only"]["ppl"], rel=1e-5)
    assert q["kl_to_teacher"] == pytest.approx(0.0, abs=1e-5)  # (the same weights as the teacher)
    assert "computed again, with the KL to the teacher named now" in caplog.text


def test_no_kl_to_a_teacher_of_the_same_tokenizer_and_another_vocabulary_size(tiny, tmp_path, caplog):
    """One tokenizer, output layers padded to other sizes (Qwen2.5-0.5B's 151,936 rows, 7B's 152,064): the KL pass
    raised a shape error, and --resume met it again each time. Perplexity only, said so."""
    from transformers import AutoModelForCausalLM

    from ds_hybrid import cli

    wide = tmp_path / "wide"
    m = AutoModelForCausalLM.from_pretrained(tiny[2])
    m.resize_token_embeddings(m.config.vocab_size + 8)
    m.save_pretrained(wide)
    tiny[1].save_pretrained(wide)
    out = tmp_path / "ev"
    assert cli.main(["eval", "--model", f"wide={wide}", "--teacher", tiny[2], "--tasks", "", "--heldout-sequences",
                     "1", "--heldout-seq-len", "64", "--out", str(out)]) == 0
    res = json.loads((out / "eval.json").read_text())
    assert res["heldout_quality"]["wide"]["ppl"] > 1 and "kl_to_teacher" not in res["heldout_quality"]["wide"]
    assert re.search(r"wide: its output layer has 49160 rows, the teacher's 49152 .*no KL to the teacher",
                     caplog.text)


def test_resume_computes_again_the_quality_of_rows_that_start_otherwise_now(tiny, tmp_path, monkeypatch, caplog):
    """A kept model's held-out quality whose rows started with another token than today's rows of its tokenizer
    (another data.bos; an eval.json of before row_bos, read without BOS, of a tokenizer that puts one) is computed
    again on --resume; one whose rows start the same (a file without row_bos, a tokenizer without BOS) is kept."""
    import logging

    from ds_hybrid import cli
    from ds_hybrid.evaluation import quality as quality_mod

    out = tmp_path / "ev"
    argv = ["eval", "--model", f"a={tiny[2]}", "--model", f"b={tiny[2]}", "--tasks", "", "--heldout-sequences", "1",
            "--heldout-seq-len", "64", "--out", str(out)]
    assert cli.main(argv) == 0
    res = json.loads((out / "eval.json").read_text())
    assert "row_bos" not in res["heldout_quality"]["a"]  # (SmolLM2's tokenizer: auto puts none; not recorded)
    res["heldout_quality"]["a"]["row_bos"] = 7  # as if its rows had started with token 7
    res["heldout_quality"]["a"]["ppl"] = res["heldout_quality"]["b"]["ppl"] = 123.0
    (out / "eval.json").write_text(json.dumps(res))
    real, scored = quality_mod.heldout_quality, []
    monkeypatch.setattr(quality_mod, "heldout_quality", lambda m, rows, *a, **k: scored.append(rows) or real(m, rows,
                                                                                                          *a, **k))
    with caplog.at_level(logging.INFO, logger="ds_hybrid"):
        assert cli.main(argv + ["--resume"]) == 0
    q = json.loads((out / "eval.json").read_text())["heldout_quality"]
    assert len(scored) == 1 and "--resume: a held-out quality computed again (their rows start with" in caplog.text
    assert "row_bos" not in q["a"] and q["a"]["ppl"] != 123.0 and q["b"]["ppl"] == 123.0


def test_a_failed_held_out_quality_keeps_the_recall_and_resume_computes_only_the_quality(tiny, tmp_path, monkeypatch):
    """The recall of a model is written before its held-out quality runs: a failure there (an out-of-memory with
    the KL teacher resident, a model the fast path cannot read) loses no recall; --resume keeps it and computes the
    quality alone."""
    from ds_hybrid import cli
    from ds_hybrid.evaluation import quality as quality_mod
    from ds_hybrid.evaluation import recall as recall_mod

    real, real_run_tasks = quality_mod.heldout_quality, recall_mod.run_tasks

    def fail(*a, **k):
        raise RuntimeError("out of memory in held-out quality (simulated)")

    monkeypatch.setattr(quality_mod, "heldout_quality", fail)
    out = tmp_path / "ev"
    argv = ["eval", "--model", f"only={tiny[2]}", "--tasks", "niah_single_1", "--lengths", "1024", "--limit", "1",
            "--heldout-sequences", "1", "--heldout-seq-len", "64", "--out", str(out)]
    with pytest.raises(RuntimeError, match="simulated"):
        cli.main(argv)
    first = json.loads((out / "eval.json").read_text())
    assert first["complete"] is False and "only" in first["scores"] and "only" not in first["heldout_quality"]
    assert "the held-out quality of only still to compute" in (out / "eval.md").read_text()
    monkeypatch.setattr(quality_mod, "heldout_quality", real)
    monkeypatch.setattr(recall_mod, "run_tasks", lambda *a, **k: pytest.fail("the recall ran again"))
    assert cli.main(argv + ["--resume"]) == 0
    res = json.loads((out / "eval.json").read_text())
    assert res["complete"] is True and res["scores"] == first["scores"] and res["prompts"] == first["prompts"]
    assert res["heldout_quality"]["only"]["ppl"] > 1
    # two models whose recall is kept (a run without held-out quality) and whose quality is computed on --resume:
    # each one's is written as it is done, so a failure on the second keeps the first's
    two = tmp_path / "ev2"
    argv2 = [a if a != str(out) else str(two) for a in argv] + ["--model", f"other={tiny[2]}"]
    monkeypatch.setattr(recall_mod, "run_tasks", real_run_tasks)
    assert cli.main(argv2 + ["--no-quality"]) == 0
    monkeypatch.setattr(recall_mod, "run_tasks", lambda *a, **k: pytest.fail("the recall ran again"))
    done = []

    def second_fails(*a, **k):
        done.append(1)
        if len(done) == 2:
            raise RuntimeError("out of memory in held-out quality (simulated)")
        return real(*a, **k)

    monkeypatch.setattr(quality_mod, "heldout_quality", second_fails)
    with pytest.raises(RuntimeError, match="simulated"):
        cli.main(argv2 + ["--resume"])
    kept = json.loads((two / "eval.json").read_text())
    assert set(kept["heldout_quality"]) == {"only"} and kept["complete"] is False
    monkeypatch.setattr(quality_mod, "heldout_quality", real)
    assert cli.main(argv2 + ["--resume"]) == 0
    assert set(json.loads((two / "eval.json").read_text())["heldout_quality"]) == {"only", "other"}


def test_held_out_rows_too_long_for_every_source_are_refused_and_fewer_rows_said(tiny, caplog):
    """A row never spans two documents' shards: rows longer than every held-out shard gave no rows, and a
    perplexity of 0/0 (NaN) in eval.json; fewer rows than asked passed unsaid."""
    from argparse import Namespace

    from ds_hybrid.evaluation.run import _heldout_rows

    tok = tiny[1]
    with pytest.raises(ConfigError, match=r"^--heldout-seq-len=10000000: no held-out shard holds a whole row"):
        _heldout_rows(Namespace(data="embedded", run_config=None, heldout_seq_len=10_000_000, heldout_sequences=2), tok)
    rows = _heldout_rows(Namespace(data="embedded", run_config=None, heldout_seq_len=2048, heldout_sequences=10_000),
                         tok)[0]
    assert 0 < len(rows) < 10_000 and all(r.shape == (1, 2048) for r in rows)
    assert f"held-out quality: {len(rows)} rows of 2048 tokens, not the 10000 asked" in caplog.text


def test_heldout_rows_start_as_the_runs_training_rows_do(tiny, tmp_path):
    """Held-out rows follow data.bos: the run's (--run-config) or auto; they were always read without BOS, so a
    model trained on rows that start with it was scored on rows unlike its training rows."""
    from argparse import Namespace

    import yaml

    from ds_hybrid.evaluation.run import _heldout_rows

    tok = tiny[1]
    assert tok.bos_token_id is not None and tok("a")["input_ids"][0] != tok.bos_token_id  # (SmolLM2's: auto = none)
    args = dict(data="embedded", heldout_seq_len=64, heldout_sequences=3)
    plain, none = _heldout_rows(Namespace(run_config=None, **args), tok)
    run_yaml = tmp_path / "run.yaml"
    run_yaml.write_text(yaml.safe_dump({"data": {"bos": True}, "out_dir": str(tmp_path / "run")}))
    rows, bos = _heldout_rows(Namespace(run_config=str(run_yaml), **args), tok)
    assert none is None and bos == tok.bos_token_id
    assert all(r.shape == (1, 64) and int(r[0, 0]) == bos for r in rows)
    # the same documents: a BOS row holds 63 of the tokens a plain row reads from the start of its shard
    assert torch.equal(rows[0][0, 1:], plain[0][0, :63])
    assert not any(int(r[0, 0]) == tok.bos_token_id for r in plain)


def test_a_model_named_teacher_and_unusable_swde_records_and_lengths_are_refused_up_front(tiny, tmp_path,
                                                                                          monkeypatch, capsys):
    from ds_hybrid import cli
    from ds_hybrid.evaluation.run import parse_models

    with pytest.raises(ConfigError, match=r"^--model='teacher=/a': 'teacher' is the name of the teacher's row"):
        parse_models(["teacher=/a"], "/t")
    with pytest.raises(ConfigError, match=r"^--model='teacher=/b': 'teacher' is the name of the teacher's row"):
        parse_models(["teacher=/a", "teacher=/b"], None)  # (one teacher row)
    assert parse_models(["a=/x", "a_2=/p", "a=/y"], None) == {"a": "/x", "a_2": "/p", "a_3": "/y"}  # none lost
    folder = tmp_path / "teacher"
    folder.mkdir()
    assert parse_models([str(folder)], "/t") == {"teacher_0": str(folder), "teacher": "/t"}  # a folder so named
    # without --teacher, a model named teacher is the teacher's row (the GPU campaign's teacher-only evaluations)
    assert parse_models(["teacher=/a", "h=/h"], None) == {"teacher": "/a", "h": "/h"}
    for bad_name in ("a b", "../up", ".hidden"):  # names go into file names (samples_<name>.jsonl)
        with pytest.raises(ConfigError, match=r"a model's name names its rows and files"):
            parse_models([f"{bad_name}=/m"], None)
    bad = tmp_path / "bad.jsonl"
    for rec, ok in (({"text": "", "value": "x"}, False), ({"text": None, "value": "x"}, False),
                    ({"text": 3, "value": "x"}, False), ({"context": "c", "key": " ", "value": "x"}, False),
                    ({"text": None, "context": "Maker: Acme", "key": "Maker", "value": "Acme"}, True)):
        bad.write_text(json.dumps(rec) + "\n")
        if ok:
            assert recall.load_based_records(bad, "--swde")[0]["value"] == "Acme"
        else:
            with pytest.raises(ConfigError, match=r"^--swde=.*record 0 needs 'value' and either a non-empty text"):
                recall.load_based_records(bad, "--swde")
    monkeypatch.setattr("ds_hybrid.evaluation.run.load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    assert cli.main(["eval", "--model", f"tiny={tiny[2]}", "--swde", str(FIXTURES / "swde_fixture.jsonl"), "--tasks",
                     "", "--max-length", str(recall.BASED_MAX_GEN_TOKS), "--no-quality", "--out",
                     str(tmp_path / "never")]) == 2
    assert re.search(r"error: --max-length=48: tiny would be evaluated at 48 tokens, which leaves no room for a swde "
                     r"prompt", capsys.readouterr().err)


def test_bench_infer_holds_one_model_at_a_time_and_writes_each_models_rows_as_it_finishes(tiny, tmp_path,
                                                                                           monkeypatch):
    """bench-infer loaded every model before timing any: the teacher's weights sat beside the hybrid's (the memory
    a long context needs), and a failure lost every row. Now each model is loaded, timed and let go in turn, and
    bench_infer.json holds the rows done so far."""
    from ds_hybrid import cli
    from ds_hybrid.evaluation import speed

    real_pair, timed = speed.bench_pair, []

    def pair(models, *a, **k):
        timed.append(list(models))
        return real_pair(models, *a, **k)

    monkeypatch.setattr(speed, "bench_pair", pair)
    calls = crash_on_second_load(monkeypatch)
    out = tmp_path / "bench"
    argv = ["bench-infer", "--model", f"a={tiny[2]}", "--model", f"b={tiny[2]}", "--contexts", "64", "--batches", "1",
            "--decode-tokens", "2", "--device", "cpu", "--out", str(out)]
    with pytest.raises(RuntimeError, match="simulated"):
        cli.main(argv)
    assert timed == [["a"]] and len(calls) == 2  # a timed before b was loaded
    first = json.loads((out / "bench_infer.json").read_text())
    assert first["complete"] is False and {r["model"] for r in first["rows"]} == {"a"} and list(first["models"]) == ["a"]
    assert "(partial: 1 of 2 models done; rows so far: 1)" in (out / "bench_infer.md").read_text()
    timed.clear()
    assert cli.main(argv) == 0  # (the loader fails on its second call only)
    res = json.loads((out / "bench_infer.json").read_text())
    assert timed == [["a"], ["b"]] and res["complete"] is True and {r["model"] for r in res["rows"]} == {"a", "b"}
    assert "partial" not in (out / "bench_infer.md").read_text() and (out / "bench_infer.png").is_file()


def test_bench_infer_keeps_the_rows_of_a_model_that_fails_part_way(tiny, tmp_path, monkeypatch):
    """Rows were written when a model's last row was in: a failure at its third row (or a lease's time limit) lost
    its first two. Each row is written as it lands."""
    from ds_hybrid import cli
    from ds_hybrid.evaluation import speed

    real, seen = speed.bench_model, []

    def bench_model(model, context, *a, **k):
        seen.append(context)
        if context == 48:
            raise RuntimeError("a kernel failed (simulated)")
        return real(model, context, *a, **k)

    monkeypatch.setattr(speed, "bench_model", bench_model)
    out = tmp_path / "bench"
    with pytest.raises(RuntimeError, match="simulated"):
        cli.main(["bench-infer", "--model", f"a={tiny[2]}", "--contexts", "16,32,48", "--batches", "1",
                  "--decode-tokens", "2", "--device", "cpu", "--out", str(out)])
    assert seen == [16, 16, 32, 32, 48]  # (each row: an untimed pass, then the timed one)
    res = json.loads((out / "bench_infer.json").read_text())
    assert res["complete"] is False and [(r["model"], r["context"]) for r in res["rows"]] == [("a", 16), ("a", 32)]
    assert all(r["decode_tokens_per_s"] > 0 for r in res["rows"]) and list(res["models"]) == ["a"]
    assert "(partial: 0 of 1 models done; rows so far: 2)" in (out / "bench_infer.md").read_text()


def test_recall_vs_k_takes_one_teacher_and_averages_the_plots_ends():
    """Every model that is not a hybrid was placed as the teacher (a second baseline LM was compared as one), and
    the plot's teacher and all-linear levels were the last such model's: the teacher is the model named teacher,
    else the only non-hybrid; the others are listed under their names; the ends are means over their models."""
    from ds_hybrid.evaluation import by_k

    hyb = {"model_type": "ds_hybrid", "num_layers": 4, "softmax_layers": [1]}
    lin = {"model_type": "ds_hybrid", "num_layers": 4, "softmax_layers": []}
    plain = {"model_type": "llama", "num_layers": 4}
    placed = lambda models: {r["model"]: (r["selector"], r["matched"]) for r in by_k.place_models(models, {})}  # noqa
    assert placed({"smollm2": plain, "h": hyb})["smollm2"] == ("teacher", True)
    both = placed({"teacher": plain, "pythia": {**plain, "model_type": "gpt_neox"}, "h": hyb})
    assert both["teacher"] == ("teacher", True) and both["pythia"] == ("pythia", False)
    assert [r["model"] for r in by_k.place_models({"teacher": plain, "pythia": plain, "h": hyb}, {})
            if r.get("baseline")] == ["pythia"]  # (drawn as a level, not a hybrid no selector explains)
    assert placed({"a": plain, "b": plain, "h": hyb}) == {"a": ("a", False), "b": ("b", False), "h": ("h", False)}
    rows = by_k.place_models({"teacher": plain, "lin0": lin, "lin1": lin}, {})
    level = {"teacher": 0.9, "lin0": 0.0, "lin1": 0.1}
    assert by_k.end_levels(rows, lambda r: (r["k"], level[r["model"]])) == {"teacher": (4, 0.9),
                                                                           "all_linear": (0, 0.05)}


def test_bench_infer_refuses_a_model_graphs_cannot_capture_before_timing_it(tiny, tmp_path, monkeypatch, capsys):
    """A hybrid whose linear layers run Triton's interpreter (TRITON_INTERPRET=1) cannot be captured: bench-infer
    --cuda-graphs refuses it naming the option as it is loaded, before any of its rows is timed (the refusal came
    when the first graph was made, after its eager rows; the device faked: no GPU here)."""
    import shutil

    from ds_hybrid import cli
    from ds_hybrid.evaluation import run as run_mod
    from ds_hybrid.evaluation import speed
    from ds_hybrid.transfer import build_hybrid

    hybrid = tmp_path / "hybrid"
    build_hybrid(tiny[0], [1], "gdn").save_pretrained(hybrid)
    for f in Path(tiny[2]).glob("tokenizer*"):
        shutil.copy(f, hybrid)
    real_load = run_mod.load_model
    monkeypatch.setattr(run_mod, "_device", lambda name: torch.device("cuda"))
    monkeypatch.setattr(run_mod, "load_model", lambda path, dev, dtype: real_load(path, torch.device("cpu"), dtype))
    monkeypatch.setattr(speed, "bench_pair", lambda *a, **k: pytest.fail("a row was timed"))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert cli.main(["bench-infer", "--model", f"h={hybrid}", "--contexts", "64", "--batches", "1",
                     "--decode-tokens", "4", "--cuda-graphs", "--out", str(tmp_path / "b")]) == 2
    assert "error: --cuda-graphs=True: h: TRITON_INTERPRET=1 runs the linear-attention layers" in capsys.readouterr().err


def test_bench_infer_with_cuda_graphs_refuses_too_few_decode_tokens_to_time_a_graph(tiny, monkeypatch, capsys):
    """The first two decode steps run eagerly before the capture: with --decode-tokens 2 the rows labelled
    cuda_graphs timed no graph. Refused naming the option, before a model loads (the device faked: no GPU here)."""
    from ds_hybrid import cli
    from ds_hybrid.evaluation import run as run_mod

    monkeypatch.setattr(run_mod, "_device", lambda name: torch.device("cuda"))
    monkeypatch.setattr(run_mod, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    assert cli.main(["bench-infer", "--model", f"tiny={tiny[2]}", "--contexts", "64", "--batches", "1",
                     "--decode-tokens", "2", "--cuda-graphs", "--out", "/nonexistent/never"]) == 2
    assert "error: --decode-tokens=2: with --cuda-graphs, 3 or more" in capsys.readouterr().err


def test_an_earlier_evaluation_in_out_is_kept_unless_resume_or_overwrite_says(tiny, tmp_path, monkeypatch, capsys):
    """eval (and bench-infer) into an --out holding an earlier run's record: refused before a model loads, naming
    --resume / --overwrite, the earlier files untouched; a seed lm-eval cannot take is refused by name too."""
    from ds_hybrid import cli

    out = tmp_path / "ev"
    out.mkdir()
    for f in ("eval.json", "eval.md", "bench_infer.json"):
        (out / f).write_text("earlier")  # (unreadable: taken as complete; a partial bench-infer is run again)
    monkeypatch.setattr("ds_hybrid.evaluation.run.load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    base = ["--model", f"tiny={tiny[2]}", "--out", str(out)]
    for argv, want in (
        (["eval", *base, "--tasks", "niah_single_1", "--lengths", "1024", "--no-quality"],
         r"--out='.*ev': it holds an earlier run \(eval\.json\) .*add --resume .*or add --overwrite"),
        (["bench-infer", *base, "--contexts", "64", "--device", "cpu"],
         r"--out='.*ev': it holds an earlier run \(bench_infer\.json\) .*give another --out"),
        (["eval", *base, "--tasks", "niah_single_1", "--lengths", "1024", "--seed", "-1", "--overwrite"],
         r"--seed=-1: must be between 0 and 2\*\*32 - 1"),
    ):
        assert cli.main(argv) == 2, argv
        assert re.search(rf"error: {want}", capsys.readouterr().err), argv
    assert all((out / f).read_text() == "earlier" for f in ("eval.json", "eval.md", "bench_infer.json"))
