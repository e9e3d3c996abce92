"""SmolLM3: Llama with no positions in every k-th layer (transformers' SmolLM3ForCausalLM)."""

from smoltrain.model.smollm3.hf import FAMILY

__all__ = ["FAMILY"]
