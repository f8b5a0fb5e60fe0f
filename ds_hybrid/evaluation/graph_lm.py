"""lm-eval's HFLM with greedy generation through ds_hybrid's static-cache decoder (``ds-hybrid eval --cuda-graphs``).

Eager decoding is launch bound (docs/BENCHMARKS.md): RULER's tasks generate 30-128 tokens a prompt, so most of an
evaluation's time is Python issuing kernels. :func:`ds_hybrid.graph_decode.generate_static` replays each decode step
as a CUDA graph and returns what greedy ``generate`` returns (pads after EOS). lm-eval's stop sequences need no
stopping inside the graph: lm-eval cuts every continuation at its first stop sequence anyway, and rows that stop
early in ``generate`` keep generating there too until the whole batch stops. Sampling falls back to HFLM's path.
"""

from __future__ import annotations

import warnings
from typing import Any

from ds_hybrid.graph_decode import active_settings, generate_static


def graph_hflm_class() -> type:
    from lm_eval.models.huggingface import HFLM

    class GraphHFLM(HFLM):
        """HFLM whose greedy ``generate_until`` runs through :func:`~ds_hybrid.graph_decode.generate_static`."""

        def _model_generate(self, context, max_length: int, stop: list[str], **generation_kwargs: Any):
            kwargs = dict(generation_kwargs)
            attention_mask = kwargs.pop("attention_mask", None)
            temperature = kwargs.pop("temperature", 0.0)
            do_sample = kwargs.pop("do_sample", None)
            greedy = not do_sample and not temperature
            # the model's generation config may ask for logits processors (an instruct model's repetition_penalty):
            # lm-eval's generate applies them, the static decoder does not
            active = active_settings(self.model.generation_config, {})
            if not greedy or kwargs or active:  # what the static decoder does not do: lm-eval's own path
                asks = "sampling" if not greedy else sorted(kwargs) or active
                warnings.warn(f"--cuda-graphs: {asks} asked for, which the static decoder does not do; lm-eval's "
                              "own generate runs it", stacklevel=2)
                return super()._model_generate(context, max_length, stop, **generation_kwargs)
            return generate_static(self.model, context, self.model.generation_config, attention_mask=attention_mask,
                                   max_new_tokens=max_length - context.shape[1], do_sample=False,
                                   pad_token_id=self.tokenizer.pad_token_id)

    return GraphHFLM
