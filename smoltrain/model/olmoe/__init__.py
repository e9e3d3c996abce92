"""OLMoE: mixture-of-experts MLPs in every layer, QK-norm over the full q / k width (transformers'
OlmoeForCausalLM)."""

from smoltrain.model.olmoe.hf import FAMILY

__all__ = ["FAMILY"]
