"""ds-hybrid: distil a pretrained softmax-attention LLM into a hybrid with linear attention in most layers.

Importing ds_hybrid registers the hybrid model type ("ds_hybrid") with transformers' Auto classes, so that
``AutoModelForCausalLM.from_pretrained(<saved hybrid>)`` works (no trust_remote_code needed).
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from ds_hybrid.modeling import HybridCache, HybridConfig, HybridForCausalLM, MixerOptions

__version__ = "0.1.0"

AutoConfig.register(HybridConfig.model_type, HybridConfig, exist_ok=True)
AutoModelForCausalLM.register(HybridConfig, HybridForCausalLM, exist_ok=True)
AutoModel.register(HybridConfig, HybridForCausalLM, exist_ok=True)

__all__ = ["HybridCache", "HybridConfig", "HybridForCausalLM", "MixerOptions", "__version__"]
