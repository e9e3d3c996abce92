"""The model families, one line each, in the order export tries them (the first whose transformers
class computes exactly the config wins)."""

from smoltrain.model import gemma3, llama, olmoe, qwen3, qwen3_moe, qwen3_next, smollm3

FAMILIES = (
    qwen3_moe.FAMILY,
    olmoe.FAMILY,
    qwen3.FAMILY,
    llama.FAMILY,
    smollm3.FAMILY,
    gemma3.FAMILY,
    qwen3_next.FAMILY,
)

__all__ = ["FAMILIES"]
