"""The hybrid model: config, linear mixers, cache, causal LM."""

from ds_hybrid.modeling.cache import HybridCache
from ds_hybrid.modeling.configuration import HybridConfig
from ds_hybrid.modeling.mixers import MIXERS, MixerOptions
from ds_hybrid.modeling.modeling import HybridForCausalLM

__all__ = ["HybridCache", "HybridConfig", "HybridForCausalLM", "MIXERS", "MixerOptions"]
