"""HybridConfig: a teacher's config plus which layers stay softmax and which linear mixer replaces the rest."""

from __future__ import annotations

import copy
import types
from typing import Any

from transformers import AutoConfig, PreTrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from ds_hybrid.errors import ConfigError
from ds_hybrid.modeling.families import check_family, head_dim, teacher_layer_types
from ds_hybrid.modeling.mixers import MixerOptions, check_mixer

# Read from the teacher and mirrored at the top level, where generation, lm-eval and DeepSpeed look for them.
MIRRORED = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "initializer_range", "tie_word_embeddings",
    "bos_token_id", "eos_token_id", "pad_token_id", "sliding_window",
)

# mirrored fields a hybrid's config may set apart from its teacher's (given to HybridConfig or edited in its
# config.json, they are written into teacher_config too); the others are the model's shapes and must agree
SETTABLE = ("bos_token_id", "eos_token_id", "pad_token_id", "max_position_embeddings")


def check_softmax_layers(softmax_layers: list[int], num_layers: int, field: str = "softmax_layers") -> list[int]:
    layers = list(softmax_layers)
    for i in layers:
        if isinstance(i, bool) or not isinstance(i, int):
            raise ConfigError(field, softmax_layers, "layer indices must be integers")
        if not 0 <= i < num_layers:
            raise ConfigError(field, softmax_layers, f"layer index {i} is out of range; the teacher has layers 0..{num_layers - 1}")
    dup = sorted({i for i in layers if layers.count(i) > 1})
    if dup:
        raise ConfigError(field, softmax_layers, f"layer(s) {dup} listed twice; list each softmax layer once")
    return sorted(layers)


class HybridConfig(PreTrainedConfig):
    """Config of a ds-hybrid model.

    >>> cfg = HybridConfig(teacher_config=teacher.config, softmax_layers=[3, 7], mixer="gdn")
    >>> cfg.layer_types[3], cfg.layer_types[0]
    ('full_attention', 'linear_attention')
    """

    model_type = "ds_hybrid"
    sub_configs = {"teacher_config": AutoConfig}
    keys_to_ignore_at_inference = ["past_key_values"]

    teacher_config: dict | PreTrainedConfig | None = None
    softmax_layers: list[int] | None = None
    mixer: str = "gdn"
    mixer_options: dict | None = None
    teacher_family: str | None = None
    # the weights of the teacher folder it was made from (selection.tensors_fingerprint; None: not known, e.g. built
    # from a teacher in memory): a stage refuses to start from an export of another teacher of the same shapes
    teacher_weights: str | None = None
    layer_types: list[str] | None = None
    head_dim: int | None = None
    vocab_size: int | None = None
    hidden_size: int | None = None
    intermediate_size: int | None = None
    num_hidden_layers: int | None = None
    num_attention_heads: int | None = None
    num_key_value_heads: int | None = None
    max_position_embeddings: int | None = None
    rms_norm_eps: float | None = None
    initializer_range: float | None = None
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    sliding_window: int | None = None
    use_cache: bool = True

    def __post_init__(self, **kwargs: Any):
        if self.teacher_config is None:  # transformers builds a default config for some utilities
            self.teacher_config = CONFIG_MAPPING["llama"](num_hidden_layers=2, hidden_size=64, intermediate_size=128,
                                                          num_attention_heads=2, vocab_size=128)
        elif isinstance(self.teacher_config, PreTrainedConfig):  # a copy: the hybrid's edits stay the hybrid's
            self.teacher_config = copy.deepcopy(self.teacher_config)
        elif isinstance(self.teacher_config, dict):
            d = dict(self.teacher_config)
            if "model_type" not in d:
                raise ConfigError("teacher_config.model_type", None, "the saved teacher config lost its model_type")
            if d["model_type"] not in CONFIG_MAPPING:  # (a KeyError before): the supported families, by name
                check_family(types.SimpleNamespace(model_type=d["model_type"]), "teacher_config.model_type")
            self.teacher_config = CONFIG_MAPPING[d["model_type"]](**d)
        t = self.teacher_config
        self.teacher_family = check_family(t, "teacher_config.model_type")
        for name in MIRRORED:
            theirs = getattr(t, name, None) if name != "tie_word_embeddings" else bool(t.tie_word_embeddings)
            mine = getattr(self, name, None)  # given to the constructor (a hand-edited config.json), else the default
            if mine is not None and mine != getattr(type(self), name, None) and mine != theirs:
                if name not in SETTABLE:
                    raise ConfigError(name, mine, f"differs from teacher_config.{name} ({theirs!r}), which the model "
                                      f"is built from: set teacher_config.{name} to it as well, or drop {name}")
                setattr(t, name, mine)  # (the model is built from the teacher config: it must say the same)
                theirs = mine
            setattr(self, name, theirs)
        self.head_dim = head_dim(t)
        check_mixer(self.mixer, self.head_dim)
        self.mixer_options = MixerOptions.from_dict(self.mixer_options).to_dict()
        self.softmax_layers = check_softmax_layers(self.softmax_layers or [], t.num_hidden_layers)
        kinds = teacher_layer_types(t)
        self.layer_types = [kinds[i] if i in self.softmax_layers else "linear_attention" for i in range(len(kinds))]
        if not self.architectures:
            self.architectures = ["HybridForCausalLM"]
        super().__post_init__(**kwargs)
        self._mirror_to_teacher = True  # from now on (not while transformers sets the fields one by one in __init__)

    def __setattr__(self, key: str, value: Any) -> None:
        """A mirrored field set on the hybrid's config (``resize_token_embeddings`` sets ``vocab_size``, a user a
        ``pad_token_id``) is set on the teacher config too: the model is built from the teacher config, so a saved
        hybrid would otherwise reload with the old value (a resized one not at all). ``softmax_layers`` and
        ``mixer_options`` set after construction (``from_pretrained(..., softmax_layers=[0, 1])``: transformers sets
        such overrides one by one after ``__post_init__``) are checked as the constructor checks them, and
        ``layer_types``, which the model is built from, follows ``softmax_layers`` (it kept the old layers, and a
        save and reload then built the other ones)."""
        if self.__dict__.get("_mirror_to_teacher") and key in ("softmax_layers", "mixer_options"):
            t = self.teacher_config
            if key == "mixer_options":
                value = MixerOptions.from_dict(value).to_dict()
            else:
                value = check_softmax_layers(value or [], t.num_hidden_layers)
                kinds = teacher_layer_types(t)
                super().__setattr__("layer_types", [kinds[i] if i in value else "linear_attention"
                                                    for i in range(len(kinds))])
        super().__setattr__(key, value)
        teacher = self.__dict__.get("teacher_config")
        if (key in MIRRORED and self.__dict__.get("_mirror_to_teacher") and isinstance(teacher, PreTrainedConfig)
                and getattr(teacher, key, None) != value):
            setattr(teacher, key, value)

    def _remove_keys_not_serialized(self, d: dict[str, Any]) -> None:
        super()._remove_keys_not_serialized(d)
        d.pop("_mirror_to_teacher", None)

    @property
    def linear_layers(self) -> list[int]:
        return [i for i, t in enumerate(self.layer_types) if t == "linear_attention"]

    @property
    def options(self) -> MixerOptions:
        return MixerOptions.from_dict(self.mixer_options)
