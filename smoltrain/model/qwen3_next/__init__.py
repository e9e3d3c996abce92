"""Qwen3-Next's linear attention: the gated delta rule (chunked for training, recurrent for decoding) and
its short causal convolution, both resetting at document boundaries."""
